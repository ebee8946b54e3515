//! Who may watch whom over SIP: SPEC.md §5 auto-authorizes SIP presence
//! subscriptions unless the watcher is blocked. The users' lists are the
//! policy events of the `roster` topic (`roster.blocked`, `roster.unblocked`,
//! `roster.allowed`, `roster.disallowed`, `roster.policy_set`, keyed by the
//! user they protect), folded here as the roster processor folds them: the
//! most specific entry decides (an address before its domain; at one level
//! blocked beats allowed), then the user's default (`block` refuses; `allow`
//! and `ask` authorize, there being no one to ask over SIP).
//!
//! A blocked watcher's SUBSCRIBE is refused 403 (RFC 6665 §4.2.1.1, RFC 3856
//! §6.6), and a subscription that a new block covers ends with a NOTIFY
//! `terminated;reason=rejected` (RFC 6665 §4.2.2, §8.2.1).

use std::collections::{BTreeSet, HashMap};

use switchboard_schemas::Event;
use switchboard_schemas::events::{DefaultPolicy, PolicyItem};

/// One list entry, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Entry {
    User(String),
    Domain(String),
}

impl From<&PolicyItem> for Entry {
    fn from(item: &PolicyItem) -> Self {
        match item {
            PolicyItem::User(u) => Self::User(u.as_str().to_lowercase()),
            PolicyItem::Domain(d) => Self::Domain(d.to_lowercase()),
        }
    }
}

#[derive(Debug, Default)]
struct Lists {
    blocked: BTreeSet<Entry>,
    allowed: BTreeSet<Entry>,
    default_blocks: bool,
}

/// What a policy event did to a user's lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Not a policy event.
    Nothing,
    /// The user's lists changed and may now refuse watchers they did not.
    Tightened(String),
    /// The user's lists changed and refuse no one new.
    Loosened(String),
}

/// Every user's lists.
#[derive(Debug, Default)]
pub struct Policies {
    users: HashMap<String, Lists>,
}

impl Policies {
    /// Folds one event of the `roster` topic.
    pub fn apply(&mut self, event: &Event) -> Applied {
        let (user, tightened) = match event {
            Event::PolicyBlocked(e) => {
                let lists = self.lists(e.user.as_str());
                lists.blocked.insert(Entry::from(&e.item));
                (e.user.as_str(), true)
            }
            Event::PolicyUnblocked(e) => {
                self.lists(e.user.as_str())
                    .blocked
                    .remove(&Entry::from(&e.item));
                (e.user.as_str(), false)
            }
            Event::PolicyAllowed(e) => {
                self.lists(e.user.as_str())
                    .allowed
                    .insert(Entry::from(&e.item));
                (e.user.as_str(), false)
            }
            Event::PolicyDisallowed(e) => {
                self.lists(e.user.as_str())
                    .allowed
                    .remove(&Entry::from(&e.item));
                (e.user.as_str(), true)
            }
            Event::PolicyDefaultSet(e) => {
                let blocks = e.default == DefaultPolicy::Block;
                self.lists(e.user.as_str()).default_blocks = blocks;
                (e.user.as_str(), blocks)
            }
            _ => return Applied::Nothing,
        };
        let user = user.to_lowercase();
        if tightened {
            Applied::Tightened(user)
        } else {
            Applied::Loosened(user)
        }
    }

    fn lists(&mut self, user: &str) -> &mut Lists {
        self.users.entry(user.to_lowercase()).or_default()
    }

    /// Whether `user` refuses `watcher` (both bare addresses).
    pub fn blocks(&self, user: &str, watcher: &str) -> bool {
        let Some(lists) = self.users.get(&user.to_lowercase()) else {
            return false;
        };
        let watcher = watcher.to_lowercase();
        let domain = watcher
            .rsplit_once('@')
            .map_or(watcher.as_str(), |(_, d)| d)
            .to_owned();
        for entry in [Entry::User(watcher), Entry::Domain(domain)] {
            if lists.blocked.contains(&entry) {
                return true;
            }
            if lists.allowed.contains(&entry) {
                return false;
            }
        }
        lists.default_blocks
    }
}

#[cfg(test)]
mod tests {
    use switchboard_schemas::BareJid;
    use switchboard_schemas::events::{
        PolicyAllowed, PolicyBlocked, PolicyDefaultSet, PolicyDisallowed, PolicyUnblocked,
    };

    use super::*;

    fn user(u: &str) -> PolicyItem {
        PolicyItem::User(BareJid::new(u))
    }

    #[test]
    fn the_most_specific_entry_decides() {
        let bob = || BareJid::new("bob@example.com");
        let mut p = Policies::default();
        assert!(!p.blocks("bob@example.com", "dave@example.com"));
        assert_eq!(
            p.apply(&Event::from(PolicyBlocked {
                user: bob(),
                item: user("Dave@example.com"),
            })),
            Applied::Tightened("bob@example.com".into())
        );
        assert!(p.blocks("BOB@example.com", "dave@example.com"));
        assert!(!p.blocks("bob@example.com", "erin@example.com"));
        // A blocked domain, with one of its users allowed.
        p.apply(&Event::from(PolicyBlocked {
            user: bob(),
            item: PolicyItem::Domain("evil.example".into()),
        }));
        p.apply(&Event::from(PolicyAllowed {
            user: bob(),
            item: user("friend@evil.example"),
        }));
        assert!(p.blocks("bob@example.com", "mallory@evil.example"));
        assert!(!p.blocks("bob@example.com", "friend@evil.example"));
        // At one level blocked beats allowed.
        p.apply(&Event::from(PolicyAllowed {
            user: bob(),
            item: user("dave@example.com"),
        }));
        assert!(p.blocks("bob@example.com", "dave@example.com"));
        assert_eq!(
            p.apply(&Event::from(PolicyUnblocked {
                user: bob(),
                item: user("dave@example.com"),
            })),
            Applied::Loosened("bob@example.com".into())
        );
        assert!(!p.blocks("bob@example.com", "dave@example.com"));
        // Default block: only the allowed get through.
        p.apply(&Event::from(PolicyDefaultSet {
            user: bob(),
            default: DefaultPolicy::Block,
        }));
        assert!(p.blocks("bob@example.com", "erin@example.com"));
        assert!(!p.blocks("bob@example.com", "dave@example.com"));
        assert!(matches!(
            p.apply(&Event::from(PolicyDisallowed {
                user: bob(),
                item: user("dave@example.com"),
            })),
            Applied::Tightened(_)
        ));
        assert!(p.blocks("bob@example.com", "dave@example.com"));
    }
}
