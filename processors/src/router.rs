//! Message routing (RFC 6121 §8.5) and the offline store (XEP-0160), as
//! pure folds over events: no I/O here; [`crate::runtime`] feeds them.
//!
//! * [`SessionDirectory`]: every bound session of the deployment and whether
//!   it is available, folded from the `sessions` and `presence` topics (a
//!   global table every router instance holds in full).
//! * [`route`]: where a message goes.
//! * [`OfflineStore`]: stored messages per recipient, folded from
//!   `message.stored_offline` and `message.delivered` on the `messages`
//!   topic, whose key is the recipient for those events.

use std::collections::BTreeMap;

use switchboard_schemas::events::{BounceReason, MessageKind};
use switchboard_schemas::{Envelope, Event};
use uuid::Uuid;

/// A bound session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// The gateway node holding it.
    pub node: String,
    /// Its id.
    pub session_id: Uuid,
    /// Whether it sent available presence (RFC 6121 §4.2).
    pub available: bool,
    /// Its presence priority (RFC 6121 §4.7.2.3).
    pub priority: i8,
}

/// Every bound session, by full address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionDirectory {
    sessions: BTreeMap<String, Session>,
    /// Presence read before its session's bind: the two come from different
    /// topics, which have no order between them.
    early_presence: BTreeMap<String, (bool, i8)>,
}

/// Presence updates remembered for sessions whose bind was not read yet.
const MAX_EARLY_PRESENCE: usize = 100_000;

/// The bare part of an address (before the first `/`).
pub fn bare_of(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(bare, _)| bare)
}

fn domain_of(jid: &str) -> &str {
    let bare = bare_of(jid);
    bare.rsplit_once('@').map_or(bare, |(_, domain)| domain)
}

impl SessionDirectory {
    /// Applies an event of the `sessions` or `presence` topic. Returns the
    /// full address of a session that just became available.
    pub fn apply(&mut self, envelope: &Envelope) -> Option<String> {
        match &envelope.event {
            Event::SessionResourceBound(bound) => {
                let full = bound.full_jid.as_str().to_owned();
                let (available, priority) = self
                    .early_presence
                    .remove(&full)
                    .unwrap_or((false, bound.priority));
                self.sessions.insert(
                    full.clone(),
                    Session {
                        node: envelope.node.as_str().to_owned(),
                        session_id: bound.session_id,
                        available,
                        priority,
                    },
                );
                available.then_some(full)
            }
            Event::SessionEnded(ended) => {
                let full = ended.full_jid.as_ref()?.as_str();
                self.early_presence.remove(full);
                if self
                    .sessions
                    .get(full)
                    .is_some_and(|s| s.session_id == ended.session_id)
                {
                    self.sessions.remove(full);
                }
                None
            }
            Event::DevicePresence(presence) => {
                let Some(session) = self.sessions.get_mut(&presence.device) else {
                    // Keep only the newest, and only a bounded number.
                    if self.early_presence.len() < MAX_EARLY_PRESENCE {
                        self.early_presence.insert(
                            presence.device.clone(),
                            (presence.available, presence.priority),
                        );
                    }
                    return None;
                };
                let was = session.available;
                session.available = presence.available;
                session.priority = presence.priority;
                (!was && presence.available).then(|| presence.device.clone())
            }
            _ => None,
        }
    }

    /// The session bound to this full address.
    pub fn session(&self, full: &str) -> Option<&Session> {
        self.sessions.get(full)
    }

    /// A user's sessions, by full address.
    pub fn sessions_of<'a>(
        &'a self,
        bare: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Session)> {
        let prefix = format!("{bare}/");
        self.sessions
            .range(prefix.clone()..)
            .take_while(move |(full, _)| full.starts_with(&prefix))
            .map(|(full, s)| (full.as_str(), s))
    }

    /// Number of bound sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is bound.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

/// A session a stanza is to be pushed to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Full address of the session.
    pub full_jid: String,
    /// Gateway node holding it.
    pub node: String,
    /// Its id.
    pub session_id: Uuid,
}

/// Where a message goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// To these sessions.
    Deliver(Vec<Target>),
    /// Into the recipient's offline store.
    StoreOffline,
    /// Nowhere, silently (RFC 6121 §8.5.2.1.2 for headlines, errors).
    Drop,
    /// Back to the sender with a stanza error.
    Bounce {
        /// Why, for the event.
        reason: BounceReason,
        /// RFC 6120 §8.3.3 condition for the error stanza.
        condition: &'static str,
    },
}

/// RFC 6121 §8.5: routes a message of `kind` addressed to `to` (an already
/// normalised address) given the sessions of the deployment. `hosted`
/// tells whether a domain is served here.
pub fn route(
    directory: &SessionDirectory,
    to: &str,
    kind: &MessageKind,
    hosted: impl Fn(&str) -> bool,
) -> Decision {
    if !hosted(domain_of(to)) {
        // Server-to-server federation is not offered (yet).
        return Decision::Bounce {
            reason: BounceReason::Other("remote_server_not_found".to_owned()),
            condition: "remote-server-not-found",
        };
    }
    if !bare_of(to).contains('@') {
        // Messages to the server itself are not served.
        return Decision::Bounce {
            reason: BounceReason::Other("service_unavailable".to_owned()),
            condition: "service-unavailable",
        };
    }
    // §8.5.3.1: a full address with a bound session gets it.
    if to.contains('/')
        && let Some(session) = directory.session(to)
    {
        return Decision::Deliver(vec![target(to, session)]);
    }
    match kind {
        // §8.5.3.2.2 / §8.5.2.1.3: no one to take it, and no offline store.
        MessageKind::Groupchat => Decision::Bounce {
            reason: BounceReason::RecipientUnavailable,
            condition: "service-unavailable",
        },
        MessageKind::Error => Decision::Drop,
        _ => {
            // §8.5.2.1.1: available resources with non-negative priority;
            // chat and normal go to the highest priority, headline to all.
            let candidates: Vec<(&str, &Session)> = directory
                .sessions_of(bare_of(to))
                .filter(|(_, s)| s.available && s.priority >= 0)
                .collect();
            let Some(top) = candidates.iter().map(|(_, s)| s.priority).max() else {
                return match kind {
                    MessageKind::Headline => Decision::Drop,
                    _ => Decision::StoreOffline,
                };
            };
            Decision::Deliver(
                candidates
                    .into_iter()
                    .filter(|(_, s)| *kind == MessageKind::Headline || s.priority == top)
                    .map(|(full, s)| target(full, s))
                    .collect(),
            )
        }
    }
}

fn target(full: &str, session: &Session) -> Target {
    Target {
        full_jid: full.to_owned(),
        node: session.node.clone(),
        session_id: session.session_id,
    }
}

/// A stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Its id.
    pub message_id: String,
    /// The sender's full address.
    pub from: String,
    /// The original stanza.
    pub stanza: String,
    /// When it was stored (XEP-0203 delay stamp), RFC 3339.
    pub stamp: String,
}

/// Stored messages per recipient, in arrival order, deduplicated by id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OfflineStore {
    queues: BTreeMap<String, Vec<Stored>>,
    total: usize,
}

impl OfflineStore {
    /// Applies an event of the `messages` topic.
    pub fn apply(&mut self, envelope: &Envelope) {
        match &envelope.event {
            Event::MessageStoredOffline(stored) => {
                let queue = self
                    .queues
                    .entry(stored.to.as_str().to_owned())
                    .or_default();
                if queue.iter().any(|s| s.message_id == stored.message_id) {
                    return;
                }
                queue.push(Stored {
                    message_id: stored.message_id.clone(),
                    from: stored.from.as_str().to_owned(),
                    stanza: stored.stanza.clone().unwrap_or_default(),
                    stamp: envelope
                        .occurred_at
                        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                });
                self.total += 1;
            }
            Event::MessageDelivered(delivered) => {
                let bare = bare_of(delivered.to.as_str());
                if let Some(queue) = self.queues.get_mut(bare) {
                    let before = queue.len();
                    queue.retain(|s| s.message_id != delivered.message_id);
                    self.total -= before - queue.len();
                    if queue.is_empty() {
                        self.queues.remove(bare);
                    }
                }
            }
            _ => {}
        }
    }

    /// The messages stored for a user.
    pub fn queued(&self, bare: &str) -> &[Stored] {
        self.queues.get(bare).map_or(&[], Vec::as_slice)
    }

    /// Users with stored messages.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.queues.keys().map(String::as_str)
    }

    /// Messages stored for every user.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Forgets the users whose key `keep` refuses (their partition moved to
    /// another instance).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.queues.retain(|user, _| keep(user));
        self.total = self.queues.values().map(Vec::len).sum();
    }
}

/// Adds an XEP-0203 delay element to a stored stanza.
pub fn with_delay(stanza: &str, domain: &str, stamp: &str) -> String {
    let delay = format!("<delay xmlns='urn:xmpp:delay' from='{domain}' stamp='{stamp}'/>");
    if let Some(head) = stanza.strip_suffix("/>") {
        format!("{head}>{delay}</message>")
    } else if let Some(at) = stanza.rfind("</") {
        format!("{}{delay}{}", &stanza[..at], &stanza[at..])
    } else {
        stanza.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_schemas::events::{
        DevicePresence, MessageDelivered, MessageStoredOffline, Protocol, SessionEndReason,
        SessionEnded, SessionResourceBound,
    };
    use switchboard_schemas::{BareJid, FullJid, NodeId};

    fn env(event: impl Into<Event>) -> Envelope {
        Envelope::new(NodeId::new("gw1"), "x", event)
    }

    fn bind(dir: &mut SessionDirectory, full: &str, priority: i8, available: bool) -> Uuid {
        let id = Uuid::now_v7();
        dir.apply(&env(SessionResourceBound {
            session_id: id,
            full_jid: FullJid::new(full),
            protocol: Protocol::Xmpp,
            contact: None,
            priority: 0,
            client: Default::default(),
        }));
        if available {
            dir.apply(&env(presence(full, true, priority)));
        }
        id
    }

    fn presence(full: &str, available: bool, priority: i8) -> DevicePresence {
        DevicePresence {
            user: BareJid::new(bare_of(full)),
            device: full.to_owned(),
            protocol: Protocol::Xmpp,
            available,
            show: None,
            status: None,
            priority,
        }
    }

    fn hosted(d: &str) -> bool {
        d == "example.com"
    }

    fn delivered_to(d: &Decision) -> Vec<String> {
        match d {
            Decision::Deliver(t) => t.iter().map(|t| t.full_jid.clone()).collect(),
            other => panic!("not delivered: {other:?}"),
        }
    }

    #[test]
    fn bare_address_goes_to_highest_priority_available() {
        let mut dir = SessionDirectory::default();
        bind(&mut dir, "bob@example.com/phone", 1, true);
        bind(&mut dir, "bob@example.com/laptop", 5, true);
        bind(&mut dir, "bob@example.com/tablet", 5, true);
        bind(&mut dir, "bob@example.com/idle", 9, false);
        bind(&mut dir, "bob@example.com/negative", -1, true);
        bind(&mut dir, "bobby@example.com/x", 50, true);
        let d = route(&dir, "bob@example.com", &MessageKind::Chat, hosted);
        assert_eq!(
            delivered_to(&d),
            ["bob@example.com/laptop", "bob@example.com/tablet"]
        );
        // Headlines go to every non-negative available resource.
        let d = route(&dir, "bob@example.com", &MessageKind::Headline, hosted);
        assert_eq!(delivered_to(&d).len(), 3);
    }

    #[test]
    fn full_address_with_session_gets_it_even_unavailable() {
        let mut dir = SessionDirectory::default();
        bind(&mut dir, "bob@example.com/idle", 0, false);
        let d = route(&dir, "bob@example.com/idle", &MessageKind::Chat, hosted);
        assert_eq!(delivered_to(&d), ["bob@example.com/idle"]);
        // No such resource: treated as the bare address; nobody available.
        let d = route(&dir, "bob@example.com/gone", &MessageKind::Chat, hosted);
        assert_eq!(d, Decision::StoreOffline);
    }

    #[test]
    fn nobody_available() {
        let dir = SessionDirectory::default();
        for (kind, expected) in [
            (MessageKind::Chat, Decision::StoreOffline),
            (MessageKind::Normal, Decision::StoreOffline),
            (MessageKind::Headline, Decision::Drop),
            (MessageKind::Error, Decision::Drop),
        ] {
            assert_eq!(route(&dir, "carol@example.com", &kind, hosted), expected);
        }
        assert!(matches!(
            route(&dir, "carol@example.com", &MessageKind::Groupchat, hosted),
            Decision::Bounce {
                condition: "service-unavailable",
                ..
            }
        ));
        assert!(matches!(
            route(&dir, "x@elsewhere.org", &MessageKind::Chat, hosted),
            Decision::Bounce {
                condition: "remote-server-not-found",
                ..
            }
        ));
    }

    #[test]
    fn presence_read_before_the_bind_counts() {
        let mut dir = SessionDirectory::default();
        assert_eq!(
            dir.apply(&env(presence("bob@example.com/a", true, 3))),
            None
        );
        let id = Uuid::now_v7();
        let became = dir.apply(&env(SessionResourceBound {
            session_id: id,
            full_jid: FullJid::new("bob@example.com/a"),
            protocol: Protocol::Xmpp,
            contact: None,
            priority: 0,
            client: Default::default(),
        }));
        assert_eq!(became, Some("bob@example.com/a".to_owned()));
        assert_eq!(
            delivered_to(&route(&dir, "bob@example.com", &MessageKind::Chat, hosted)),
            ["bob@example.com/a"]
        );
        assert_eq!(dir.session("bob@example.com/a").unwrap().priority, 3);
    }

    #[test]
    fn session_end_and_unavailable_presence() {
        let mut dir = SessionDirectory::default();
        let id = bind(&mut dir, "bob@example.com/a", 0, true);
        dir.apply(&env(presence("bob@example.com/a", false, 0)));
        assert_eq!(
            route(&dir, "bob@example.com", &MessageKind::Chat, hosted),
            Decision::StoreOffline
        );
        assert_eq!(
            dir.apply(&env(presence("bob@example.com/a", true, 0))),
            Some("bob@example.com/a".to_owned())
        );
        // An end for another session of the same resource changes nothing.
        let end = |session_id| {
            env(SessionEnded {
                session_id,
                user: BareJid::new("bob@example.com"),
                full_jid: Some(FullJid::new("bob@example.com/a")),
                protocol: Protocol::Xmpp,
                reason: SessionEndReason::Logout,
                text: None,
            })
        };
        dir.apply(&end(Uuid::now_v7()));
        assert_eq!(dir.len(), 1);
        dir.apply(&end(id));
        assert!(dir.is_empty());
    }

    #[test]
    fn offline_store_dedups_and_removes_on_delivery() {
        let mut store = OfflineStore::default();
        let stored = |id: &str| {
            env(MessageStoredOffline {
                message_id: id.to_owned(),
                from: FullJid::new("alice@example.com/x"),
                to: BareJid::new("carol@example.com"),
                stanza: Some(format!("<message id='{id}'><body>hi</body></message>")),
            })
        };
        store.apply(&stored("m1"));
        store.apply(&stored("m1"));
        store.apply(&stored("m2"));
        assert_eq!(store.queued("carol@example.com").len(), 2);
        store.apply(&env(MessageDelivered {
            message_id: "m1".to_owned(),
            from: FullJid::new("alice@example.com/x"),
            to: FullJid::new("carol@example.com/phone"),
            carbon: false,
        }));
        assert_eq!(store.queued("carol@example.com")[0].message_id, "m2");
        assert_eq!(store.total(), 1);
    }

    #[test]
    fn delay_is_added_inside_the_message() {
        assert_eq!(
            with_delay(
                "<message id='1'><body>x</body></message>",
                "example.com",
                "T"
            ),
            "<message id='1'><body>x</body><delay xmlns='urn:xmpp:delay' from='example.com' stamp='T'/></message>"
        );
        assert_eq!(
            with_delay("<message id='1'/>", "example.com", "T"),
            "<message id='1'><delay xmlns='urn:xmpp:delay' from='example.com' stamp='T'/></message>"
        );
    }
}
