//! RFC 6121 §3.1 (subscription requests and their approval), XEP-0191
//! (blocking), SPEC.md §6: the pure presence authorization model.
//!
//! Deployment-wide limits come from [`PolicyLimits`] (a view of the live
//! settings, `crate::settings`); each user's own lists come from the
//! `roster.blocked`, `roster.unblocked`, `roster.allowed`,
//! `roster.disallowed` and `roster.policy_set` events, folded by
//! [`UserPolicy::apply`] (or [`Policies::apply`] for many users).
//!
//! # Who may see whom
//!
//! A watcher W sees user U's composed presence ([`UserPolicy::visible`])
//! only when availability sharing is on (off: users see only themselves),
//! W is not blocked by U, and W holds an approved subscription (or is U).
//! Everyone else sees U as *unavailable*: a blocked watcher cannot tell a
//! block from an absence.
//!
//! # Deciding a subscription request ([`UserPolicy::decide`])
//!
//! 1. Sharing off → deny (nothing passes in or out).
//! 2. The user's own entries for W's address, then for W's domain (the
//!    most specific entry wins; at one level, blocked beats allowed):
//!    blocked → deny, allowed → approve.
//! 3. The user's default (`roster.policy_set`): allow → approve, block →
//!    deny, ask → ask the user.
//! 4. No default set: auto-authorize on (the deployment default) →
//!    approve, off → ask.
//!
//! # Limits (0 means no limit)
//!
//! - Contact list size ([`PolicyLimits::admit_contacts`]): a batch add is
//!   partial; at 195 of 200, adding 6 adds 5 and rejects 1.
//!   [`PolicyLimits::can_be_added`]: a user whose own list is full cannot be
//!   added by others (the reciprocal add would overflow it).
//! - Watchers per user ([`PolicyLimits::admit_watcher`]).
//! - Ad-hoc subscriptions, to someone not on the roster
//!   ([`PolicyLimits::admit_ad_hoc`]): on/off, most active per user, and a
//!   time to live.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use switchboard_schemas::events::{
    Availability, ComposedPresence, DefaultPolicy, PolicyItem, PresenceSources,
};
use switchboard_schemas::{BareJid, Envelope, Event};

/// The deployment-wide authorization settings (SPEC.md §6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyLimits {
    /// Availability sharing for the deployment.
    pub availability_sharing: bool,
    /// Approve subscription requests without asking ("allow users to view
    /// availability without approval").
    pub auto_authorize: bool,
    /// Most contacts per user; 0 = no limit.
    pub max_contacts: u32,
    /// Most watchers per user; 0 = no limit.
    pub max_watchers: u32,
    /// Whether ad-hoc subscriptions are allowed.
    pub ad_hoc_enabled: bool,
    /// Most active ad-hoc subscriptions per user; 0 = no limit.
    pub ad_hoc_max_per_user: u32,
    /// Lifetime of an ad-hoc subscription in seconds; 0 = until cancelled.
    pub ad_hoc_ttl_secs: u64,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        Self {
            availability_sharing: true,
            auto_authorize: true,
            max_contacts: 200,
            max_watchers: 200,
            ad_hoc_enabled: true,
            ad_hoc_max_per_user: 50,
            ad_hoc_ttl_secs: 3600,
        }
    }
}

/// How many of a batch of contacts may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Added, taken from the front of the batch.
    pub accepted: usize,
    /// Rejected because the list is full ("User's contact list is over
    /// limit").
    pub rejected: usize,
}

/// Why an ad-hoc subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdHocRefused {
    /// Ad-hoc subscriptions are off for the deployment.
    #[error("ad-hoc subscriptions are disabled")]
    Disabled,
    /// The watcher already holds the maximum.
    #[error("at most {max} ad-hoc subscriptions may be active")]
    Limit {
        /// The limit.
        max: u32,
    },
}

fn under(limit: u32, count: usize) -> bool {
    limit == 0 || count < limit as usize
}

impl PolicyLimits {
    /// A user with `current` contacts asks to add `requested` more.
    pub fn admit_contacts(&self, current: usize, requested: usize) -> Admitted {
        let room = if self.max_contacts == 0 {
            requested
        } else {
            (self.max_contacts as usize).saturating_sub(current)
        };
        let accepted = requested.min(room);
        Admitted {
            accepted,
            rejected: requested - accepted,
        }
    }

    /// Whether someone may add a user whose own list holds `their_contacts`.
    pub fn can_be_added(&self, their_contacts: usize) -> bool {
        under(self.max_contacts, their_contacts)
    }

    /// Whether a user with `current` watchers may get one more.
    pub fn admit_watcher(&self, current: usize) -> bool {
        under(self.max_watchers, current)
    }

    /// Whether a watcher with `active` ad-hoc subscriptions may start one
    /// more; `Ok` carries its lifetime (`None`: until cancelled).
    pub fn admit_ad_hoc(&self, active: usize) -> Result<Option<Duration>, AdHocRefused> {
        if !self.ad_hoc_enabled {
            return Err(AdHocRefused::Disabled);
        }
        if !under(self.ad_hoc_max_per_user, active) {
            return Err(AdHocRefused::Limit {
                max: self.ad_hoc_max_per_user,
            });
        }
        Ok((self.ad_hoc_ttl_secs > 0).then(|| Duration::from_secs(self.ad_hoc_ttl_secs)))
    }
}

/// The outcome of a subscription request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Approve without asking the user.
    Approve,
    /// Deny without asking the user.
    Deny,
    /// Ask the user (RFC 6121 §3.1.3: deliver the request to them).
    Ask,
}

/// The domain part of a bare address (the whole address for a domain JID).
fn domain_of(jid: &BareJid) -> &str {
    jid.as_str()
        .rsplit_once('@')
        .map_or(jid.as_str(), |(_, domain)| domain)
}

/// One user's blocked and allowed lists and default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserPolicy {
    blocked: BTreeSet<PolicyItem>,
    allowed: BTreeSet<PolicyItem>,
    default: Option<DefaultPolicy>,
}

impl UserPolicy {
    /// Folds one policy event of this user; other events change nothing.
    pub fn apply(&mut self, envelope: &Envelope) {
        match &envelope.event {
            Event::PolicyBlocked(e) => {
                self.blocked.insert(e.item.clone());
            }
            Event::PolicyUnblocked(e) => {
                self.blocked.remove(&e.item);
            }
            Event::PolicyAllowed(e) => {
                self.allowed.insert(e.item.clone());
            }
            Event::PolicyDisallowed(e) => {
                self.allowed.remove(&e.item);
            }
            Event::PolicyDefaultSet(e) => self.default = Some(e.default.clone()),
            _ => {}
        }
    }

    /// The blocked list.
    pub fn blocked(&self) -> &BTreeSet<PolicyItem> {
        &self.blocked
    }

    /// The allowed list.
    pub fn allowed(&self) -> &BTreeSet<PolicyItem> {
        &self.allowed
    }

    /// The user's own default, if set.
    pub fn default_policy(&self) -> Option<&DefaultPolicy> {
        self.default.as_ref()
    }

    /// The entry deciding about `watcher`: `Some(true)` blocked,
    /// `Some(false)` allowed, `None` neither.
    fn listed(&self, watcher: &BareJid) -> Option<bool> {
        let user = PolicyItem::User(watcher.clone());
        let domain = PolicyItem::Domain(domain_of(watcher).to_owned());
        [user, domain].into_iter().find_map(|item| {
            if self.blocked.contains(&item) {
                Some(true)
            } else if self.allowed.contains(&item) {
                Some(false)
            } else {
                None
            }
        })
    }

    /// Whether `watcher` is blocked, by address or by domain.
    pub fn is_blocked(&self, watcher: &BareJid) -> bool {
        self.listed(watcher) == Some(true)
    }

    /// Decides `watcher`'s request to see this user's presence.
    pub fn decide(&self, limits: &PolicyLimits, watcher: &BareJid) -> Decision {
        if !limits.availability_sharing {
            return Decision::Deny;
        }
        match self.listed(watcher) {
            Some(true) => return Decision::Deny,
            Some(false) => return Decision::Approve,
            None => {}
        }
        match &self.default {
            Some(DefaultPolicy::Allow) => Decision::Approve,
            Some(DefaultPolicy::Block) => Decision::Deny,
            Some(DefaultPolicy::Ask) => Decision::Ask,
            // A default this version does not know: the safe choice.
            Some(DefaultPolicy::Other(_)) => Decision::Ask,
            None if limits.auto_authorize => Decision::Approve,
            None => Decision::Ask,
        }
    }

    /// Whether `watcher` may see `owner`'s presence, given whether it holds
    /// an approved subscription to it.
    pub fn may_see(
        &self,
        limits: &PolicyLimits,
        owner: &BareJid,
        watcher: &BareJid,
        subscribed: bool,
    ) -> bool {
        if watcher == owner {
            return true;
        }
        limits.availability_sharing && subscribed && !self.is_blocked(watcher)
    }

    /// What `watcher` sees of `composed` (this user's composed presence):
    /// itself when [`Self::may_see`], otherwise unavailable with nothing
    /// else.
    pub fn visible(
        &self,
        limits: &PolicyLimits,
        composed: &ComposedPresence,
        watcher: &BareJid,
        subscribed: bool,
    ) -> ComposedPresence {
        if self.may_see(limits, &composed.user, watcher, subscribed) {
            composed.clone()
        } else {
            ComposedPresence {
                user: composed.user.clone(),
                availability: Availability::Unavailable,
                show: None,
                status: None,
                sources: PresenceSources::new(),
            }
        }
    }
}

/// The policies of many users, folded from the `roster` topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policies {
    users: BTreeMap<BareJid, UserPolicy>,
}

impl Policies {
    /// Folds one event; policy events go to their user.
    pub fn apply(&mut self, envelope: &Envelope) {
        let user = match &envelope.event {
            Event::PolicyBlocked(e) => &e.user,
            Event::PolicyUnblocked(e) => &e.user,
            Event::PolicyAllowed(e) => &e.user,
            Event::PolicyDisallowed(e) => &e.user,
            Event::PolicyDefaultSet(e) => &e.user,
            _ => return,
        };
        self.users.entry(user.clone()).or_default().apply(envelope);
    }

    /// A user's policy (the empty policy when none was set).
    pub fn get(&self, user: &BareJid) -> &UserPolicy {
        static EMPTY: UserPolicy = UserPolicy {
            blocked: BTreeSet::new(),
            allowed: BTreeSet::new(),
            default: None,
        };
        self.users.get(user).unwrap_or(&EMPTY)
    }

    /// Keeps only the users for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&BareJid) -> bool) {
        self.users.retain(|user, _| keep(user));
    }
}

#[cfg(test)]
mod tests {
    use switchboard_schemas::NodeId;
    use switchboard_schemas::events::{
        PolicyAllowed, PolicyBlocked, PolicyDefaultSet, PolicyDisallowed, PolicyUnblocked,
        PresenceSource, Show,
    };

    use super::*;

    const ALICE: &str = "alice@example.com";

    fn jid(s: &str) -> BareJid {
        BareJid::new(s)
    }

    fn user(s: &str) -> PolicyItem {
        PolicyItem::User(jid(s))
    }

    fn domain(s: &str) -> PolicyItem {
        PolicyItem::Domain(s.to_owned())
    }

    fn policy(events: Vec<Event>) -> UserPolicy {
        let mut p = UserPolicy::default();
        for e in events {
            p.apply(&Envelope::new(NodeId::new("n1"), ALICE, e));
        }
        p
    }

    fn blocked(item: PolicyItem) -> Event {
        PolicyBlocked {
            user: jid(ALICE),
            item,
        }
        .into()
    }

    fn allowed(item: PolicyItem) -> Event {
        PolicyAllowed {
            user: jid(ALICE),
            item,
        }
        .into()
    }

    fn default(d: DefaultPolicy) -> Event {
        PolicyDefaultSet {
            user: jid(ALICE),
            default: d,
        }
        .into()
    }

    fn composed() -> ComposedPresence {
        ComposedPresence {
            user: jid(ALICE),
            availability: Availability::Dnd,
            show: Some(Show::Dnd),
            status: Some("busy".to_owned()),
            sources: PresenceSources::from([PresenceSource::Device]),
        }
    }

    #[test]
    fn contact_batch_is_partial_at_the_limit() {
        let limits = PolicyLimits::default();
        assert_eq!(
            limits.admit_contacts(195, 6),
            Admitted {
                accepted: 5,
                rejected: 1
            }
        );
        assert_eq!(
            limits.admit_contacts(195, 5),
            Admitted {
                accepted: 5,
                rejected: 0
            }
        );
        assert_eq!(
            limits.admit_contacts(199, 1),
            Admitted {
                accepted: 1,
                rejected: 0
            }
        );
        assert_eq!(
            limits.admit_contacts(200, 1),
            Admitted {
                accepted: 0,
                rejected: 1
            }
        );
        // A list over the limit (the limit was lowered) admits nothing.
        assert_eq!(
            limits.admit_contacts(250, 3),
            Admitted {
                accepted: 0,
                rejected: 3
            }
        );
        let unlimited = PolicyLimits {
            max_contacts: 0,
            ..PolicyLimits::default()
        };
        assert_eq!(
            unlimited.admit_contacts(100_000, 6),
            Admitted {
                accepted: 6,
                rejected: 0
            }
        );
    }

    #[test]
    fn a_user_at_the_limit_cannot_be_added_by_others() {
        let limits = PolicyLimits::default();
        assert!(limits.can_be_added(199));
        assert!(!limits.can_be_added(200));
        let unlimited = PolicyLimits {
            max_contacts: 0,
            ..PolicyLimits::default()
        };
        assert!(unlimited.can_be_added(1_000_000));
    }

    #[test]
    fn watchers_are_capped_at_exactly_the_limit() {
        let limits = PolicyLimits::default();
        assert!(limits.admit_watcher(199));
        assert!(!limits.admit_watcher(200));
        let three = PolicyLimits {
            max_watchers: 3,
            ..PolicyLimits::default()
        };
        assert!(three.admit_watcher(2));
        assert!(!three.admit_watcher(3));
        let unlimited = PolicyLimits {
            max_watchers: 0,
            ..PolicyLimits::default()
        };
        assert!(unlimited.admit_watcher(10_000));
    }

    #[test]
    fn ad_hoc_subscriptions_on_off_limit_and_ttl() {
        let limits = PolicyLimits {
            ad_hoc_max_per_user: 2,
            ad_hoc_ttl_secs: 60,
            ..PolicyLimits::default()
        };
        assert_eq!(limits.admit_ad_hoc(1), Ok(Some(Duration::from_secs(60))));
        assert_eq!(limits.admit_ad_hoc(2), Err(AdHocRefused::Limit { max: 2 }));
        let off = PolicyLimits {
            ad_hoc_enabled: false,
            ..limits
        };
        assert_eq!(off.admit_ad_hoc(0), Err(AdHocRefused::Disabled));
        let forever = PolicyLimits {
            ad_hoc_max_per_user: 0,
            ad_hoc_ttl_secs: 0,
            ..limits
        };
        assert_eq!(forever.admit_ad_hoc(10_000), Ok(None));
        assert_eq!(
            AdHocRefused::Limit { max: 2 }.to_string(),
            "at most 2 ad-hoc subscriptions may be active"
        );
    }

    #[test]
    fn auto_authorize_is_the_default() {
        let limits = PolicyLimits::default();
        let p = UserPolicy::default();
        assert_eq!(
            p.decide(&limits, &jid("bob@example.com")),
            Decision::Approve
        );
        let manual = PolicyLimits {
            auto_authorize: false,
            ..PolicyLimits::default()
        };
        assert_eq!(p.decide(&manual, &jid("bob@example.com")), Decision::Ask);
    }

    #[test]
    fn user_default_allow_block_ask() {
        let limits = PolicyLimits {
            auto_authorize: false,
            ..PolicyLimits::default()
        };
        let bob = jid("bob@example.com");
        for (d, expected) in [
            (DefaultPolicy::Allow, Decision::Approve),
            (DefaultPolicy::Block, Decision::Deny),
            (DefaultPolicy::Ask, Decision::Ask),
        ] {
            assert_eq!(policy(vec![default(d)]).decide(&limits, &bob), expected);
        }
        // A user's own default wins over auto-authorize.
        assert_eq!(
            policy(vec![default(DefaultPolicy::Ask)]).decide(&PolicyLimits::default(), &bob),
            Decision::Ask
        );
    }

    #[test]
    fn block_by_address_and_by_domain() {
        let limits = PolicyLimits::default();
        let p = policy(vec![
            blocked(user("mallory@example.net")),
            blocked(domain("spam.example.org")),
        ]);
        assert!(p.is_blocked(&jid("mallory@example.net")));
        assert!(!p.is_blocked(&jid("trent@example.net")));
        assert!(p.is_blocked(&jid("anyone@spam.example.org")));
        assert!(p.is_blocked(&jid("spam.example.org")));
        // A subdomain is another domain.
        assert!(!p.is_blocked(&jid("eve@sub.spam.example.org")));
        assert_eq!(
            p.decide(&limits, &jid("x@spam.example.org")),
            Decision::Deny
        );
        assert_eq!(
            p.decide(&limits, &jid("bob@example.com")),
            Decision::Approve
        );
    }

    #[test]
    fn unblock_restores_and_the_most_specific_entry_wins() {
        let limits = PolicyLimits::default();
        let p = policy(vec![
            blocked(user("mallory@example.net")),
            PolicyUnblocked {
                user: jid(ALICE),
                item: user("mallory@example.net"),
            }
            .into(),
        ]);
        assert!(!p.is_blocked(&jid("mallory@example.net")));
        // Domain blocked, one of its users allowed.
        let p = policy(vec![
            blocked(domain("example.net")),
            allowed(user("trent@example.net")),
        ]);
        assert_eq!(
            p.decide(&limits, &jid("trent@example.net")),
            Decision::Approve
        );
        assert_eq!(p.decide(&limits, &jid("eve@example.net")), Decision::Deny);
        // Domain allowed, one of its users blocked; both lists at one level:
        // blocked wins.
        let p = policy(vec![
            default(DefaultPolicy::Block),
            allowed(domain("example.com")),
            blocked(user("carol@example.com")),
            allowed(user("dave@example.org")),
            blocked(user("dave@example.org")),
        ]);
        assert_eq!(
            p.decide(&limits, &jid("bob@example.com")),
            Decision::Approve
        );
        assert_eq!(p.decide(&limits, &jid("carol@example.com")), Decision::Deny);
        assert_eq!(p.decide(&limits, &jid("dave@example.org")), Decision::Deny);
        assert_eq!(p.decide(&limits, &jid("erin@example.org")), Decision::Deny);
        let p = policy(vec![
            default(DefaultPolicy::Block),
            allowed(domain("example.com")),
            PolicyDisallowed {
                user: jid(ALICE),
                item: domain("example.com"),
            }
            .into(),
        ]);
        assert_eq!(p.decide(&limits, &jid("bob@example.com")), Decision::Deny);
    }

    #[test]
    fn blocked_watcher_sees_unavailable() {
        let limits = PolicyLimits::default();
        let p = policy(vec![blocked(domain("example.net"))]);
        let seen = p.visible(&limits, &composed(), &jid("eve@example.net"), true);
        assert_eq!(seen.availability, Availability::Unavailable);
        assert_eq!((seen.show, seen.status), (None, None));
        assert!(seen.sources.is_empty());
        let seen = p.visible(&limits, &composed(), &jid("bob@example.com"), true);
        assert_eq!(seen, composed());
        // Without a subscription nobody sees anything but themselves.
        let seen = p.visible(&limits, &composed(), &jid("bob@example.com"), false);
        assert_eq!(seen.availability, Availability::Unavailable);
        assert!(p.may_see(&limits, &jid(ALICE), &jid(ALICE), false));
    }

    #[test]
    fn sharing_off_shows_users_only_themselves() {
        let off = PolicyLimits {
            availability_sharing: false,
            ..PolicyLimits::default()
        };
        let p = policy(vec![allowed(user("bob@example.com"))]);
        assert_eq!(p.decide(&off, &jid("bob@example.com")), Decision::Deny);
        assert!(!p.may_see(&off, &jid(ALICE), &jid("bob@example.com"), true));
        assert!(p.may_see(&off, &jid(ALICE), &jid(ALICE), false));
        assert_eq!(
            p.visible(&off, &composed(), &jid("bob@example.com"), true)
                .availability,
            Availability::Unavailable
        );
    }

    #[test]
    fn policies_fold_per_user() {
        let mut all = Policies::default();
        all.apply(&Envelope::new(
            NodeId::new("n1"),
            ALICE,
            blocked(domain("example.net")),
        ));
        all.apply(&Envelope::new(
            NodeId::new("n1"),
            "bob@example.com",
            PolicyBlocked {
                user: jid("bob@example.com"),
                item: user(ALICE),
            },
        ));
        assert!(all.get(&jid(ALICE)).is_blocked(&jid("x@example.net")));
        assert!(!all.get(&jid(ALICE)).is_blocked(&jid("bob@example.com")));
        assert!(all.get(&jid("bob@example.com")).is_blocked(&jid(ALICE)));
        assert_eq!(all.get(&jid("nobody@example.com")), &UserPolicy::default());
    }
}
