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
//! * [`SeenIds`]: message ids already routed, for duplicate suppression.
//! * [`Stickiness`]: IM forking state (which client of a user replied).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use chrono::{DateTime, Utc};
use switchboard_schemas::events::{BounceReason, MessageKind, Protocol};
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
    /// When it was bound (the bind event's time, the gateway's clock).
    pub bound_at: DateTime<Utc>,
    /// Its client protocol.
    pub protocol: Protocol,
    /// It enabled message carbons (XEP-0280).
    pub carbons: bool,
}

/// What the router knows of a gateway node from its heartbeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeState {
    /// When the node's process started (its latest heartbeat says).
    pub started_at: DateTime<Utc>,
    /// Time of its latest heartbeat.
    pub last_heartbeat: DateTime<Utc>,
    /// The heartbeat interval it announced.
    pub interval: chrono::Duration,
}

/// Every bound session, by full address, and the gateway nodes' heartbeats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionDirectory {
    sessions: BTreeMap<String, Session>,
    /// Presence read before its session's bind: the two come from different
    /// topics, which have no order between them.
    early_presence: BTreeMap<String, (bool, i8)>,
    /// Gateway nodes that sent a heartbeat, by node id.
    nodes: BTreeMap<String, NodeState>,
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
                        bound_at: envelope.occurred_at,
                        protocol: bound.protocol.clone(),
                        carbons: false,
                    },
                );
                available.then_some(full)
            }
            Event::SessionCarbons(c) => {
                if let Some(s) = self.sessions.get_mut(c.full_jid.as_str())
                    && s.session_id == c.session_id
                {
                    s.carbons = c.enabled;
                }
                None
            }
            Event::NodeHeartbeat(beat) => {
                let state = self
                    .nodes
                    .entry(beat.node.as_str().to_owned())
                    .or_insert(NodeState {
                        started_at: beat.started_at,
                        last_heartbeat: envelope.occurred_at,
                        interval: chrono::Duration::zero(),
                    });
                state.interval = chrono::Duration::seconds(i64::from(beat.interval_secs));
                state.started_at = state.started_at.max(beat.started_at);
                state.last_heartbeat = state.last_heartbeat.max(envelope.occurred_at);
                None
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

    /// A user's sessions, by full address. No allocation (this is on the
    /// routing hot path): the keys from `bare` on, skipping other users
    /// whose address extends `bare` with a character sorting before `/`
    /// (`bob@example.com.au/x` sorts between `bob@example.com` and
    /// `bob@example.com/x`).
    pub fn sessions_of<'a>(
        &'a self,
        bare: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a Session)> {
        use std::ops::Bound;
        let next = |full: &str| full.as_bytes().get(bare.len()).copied();
        self.sessions
            .range::<str, _>((Bound::Excluded(bare), Bound::Unbounded))
            .take_while(move |(full, _)| full.starts_with(bare) && next(full) <= Some(b'/'))
            .filter(move |(full, _)| next(full) == Some(b'/'))
            .map(|(full, s)| (full.as_str(), s))
    }

    /// A gateway node's heartbeat state.
    pub fn node(&self, node: &str) -> Option<&NodeState> {
        self.nodes.get(node)
    }

    /// Sessions whose gateway node is gone (issue 4 "Sessions"): the node's
    /// latest heartbeat is older than `timeout` at `now`, or the node
    /// restarted (a heartbeat with a later `started_at` than the bind: a
    /// process does not keep its sessions across a restart). Sessions of
    /// nodes that never sent a heartbeat are not judged.
    pub fn stale_sessions(
        &self,
        now: DateTime<Utc>,
        timeout: chrono::Duration,
    ) -> Vec<(String, Session)> {
        self.sessions
            .iter()
            .filter(|(_, s)| {
                self.nodes
                    .get(&s.node)
                    .is_some_and(|n| now - n.last_heartbeat > timeout || s.bound_at < n.started_at)
            })
            .map(|(full, s)| (full.clone(), s.clone()))
            .collect()
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

/// Payloads of instant messaging without a body: XEP-0085 chat states,
/// XEP-0184 receipts, XEP-0333 chat markers (the read/displayed state
/// SPEC.md §7 syncs across a user's devices).
fn im_payload(stanza: &str) -> bool {
    stanza.contains("urn:xmpp:chat-markers:0")
        || stanza.contains("urn:xmpp:receipts")
        || stanza.contains("http://jabber.org/protocol/chatstates")
}

/// XEP-0280 §6: whether a message is copied to the user's other
/// carbons-enabled sessions: chat; normal with a body, or with a payload
/// of instant messaging (chat states, receipts, XEP-0333 markers: a
/// device's "displayed" reaches the user's other devices, SPEC.md §7 read
/// state synced); unless marked `<private/>` (§7) or `<no-copy/>`
/// (XEP-0334).
pub fn carbons_eligible(kind: &MessageKind, has_body: bool, stanza: &str) -> bool {
    let eligible_kind = match kind {
        MessageKind::Chat => true,
        MessageKind::Normal => has_body || im_payload(stanza),
        _ => false,
    };
    eligible_kind
        && !stanza.contains("urn:xmpp:carbons:2")
        && !stanza.contains("<no-copy xmlns='urn:xmpp:hints'")
        && !stanza.contains("<no-copy xmlns=\"urn:xmpp:hints\"")
}

/// XEP-0280 §6.1 (received) and §6.2 (sent): the carbon copies of a
/// message from `sender` (full JID) delivered to `delivered` (full JIDs):
/// every other available, carbons-enabled session of the recipient and of
/// the sender, with the copy wrapped for it.
pub fn carbon_copies(
    directory: &SessionDirectory,
    sender: &str,
    recipient: &str,
    kind: &MessageKind,
    stanza: &str,
    delivered: &[String],
) -> Vec<(Target, String)> {
    let mut out = received_copies(directory, sender, recipient, kind, stanza, delivered);
    out.extend(sent_copies(directory, sender, kind, stanza, delivered));
    out
}

/// XEP-0280 §6.1: the `<received/>` copies for the recipient's other
/// available, carbons-enabled sessions (not those in `delivered`).
pub fn received_copies(
    directory: &SessionDirectory,
    sender: &str,
    recipient: &str,
    kind: &MessageKind,
    stanza: &str,
    delivered: &[String],
) -> Vec<(Target, String)> {
    wrapped_copies(
        directory,
        bare_of(recipient),
        "received",
        kind,
        stanza,
        &|full| delivered.iter().any(|d| d == full) || full == sender,
    )
}

/// XEP-0280 §6.2: the `<sent/>` copies for the sender's other available,
/// carbons-enabled sessions (not the sending one, not those in
/// `delivered`).
pub fn sent_copies(
    directory: &SessionDirectory,
    sender: &str,
    kind: &MessageKind,
    stanza: &str,
    delivered: &[String],
) -> Vec<(Target, String)> {
    wrapped_copies(directory, bare_of(sender), "sent", kind, stanza, &|full| {
        full == sender || delivered.iter().any(|d| d == full)
    })
}

fn wrapped_copies(
    directory: &SessionDirectory,
    user: &str,
    direction: &str,
    kind: &MessageKind,
    stanza: &str,
    skip: &dyn Fn(&str) -> bool,
) -> Vec<(Target, String)> {
    let mut out = Vec::new();
    for (full, s) in directory.sessions_of(user) {
        if !s.available || !s.carbons || skip(full) {
            continue;
        }
        let wrapped = format!(
            "<message xmlns='jabber:client' from='{user}' to='{to}' type='{kind}'>\
             <{direction} xmlns='urn:xmpp:carbons:2'>\
             <forwarded xmlns='urn:xmpp:forward:0'>{stanza}</forwarded>\
             </{direction}></message>",
            user = crate::xml::escape(user),
            to = crate::xml::escape(full),
            kind = kind.as_str(),
        );
        out.push((
            Target {
                full_jid: full.to_owned(),
                node: s.node.clone(),
                session_id: s.session_id,
            },
            wrapped,
        ));
    }
    out
}

/// Whether a message nobody is available for goes to offline storage
/// (XEP-0160 §4): one with a body. Body-less ones — XEP-0085 chat states
/// ("SHOULD NOT be stored offline"), XEP-0184 receipts, XEP-0333 markers —
/// are dropped without an error rather than stored as junk that would fill
/// the recipient's quota and replay stale read state at login. XEP-0334
/// §4 hints decide first: `<no-store/>` never, `<store/>` always.
pub fn storable_offline(has_body: bool, stanza: &str) -> bool {
    if stanza.contains("<no-store xmlns='urn:xmpp:hints'")
        || stanza.contains("<no-store xmlns=\"urn:xmpp:hints\"")
    {
        return false;
    }
    has_body
        || stanza.contains("<store xmlns='urn:xmpp:hints'")
        || stanza.contains("<store xmlns=\"urn:xmpp:hints\"")
}

/// XEP-0191 §3.3: what happens to a message from `sender` to `recipient`
/// (bare addresses) given their block lists: `None` when neither blocks
/// the other; when the recipient blocks the sender, `service-unavailable`
/// (the recipient appears offline); when the sender blocks the recipient,
/// `not-acceptable` (with `<blocked xmlns='urn:xmpp:blocking:errors'/>`).
/// Nothing is delivered in either case.
pub fn blocked(
    policies: &crate::policy::Policies,
    sender: &str,
    recipient: &str,
) -> Option<&'static str> {
    use switchboard_schemas::BareJid;
    let (sender, recipient) = (BareJid::new(sender), BareJid::new(recipient));
    if sender == recipient {
        return None;
    }
    if policies.get(&recipient).is_blocked(&sender) {
        Some("service-unavailable")
    } else if policies.get(&sender).is_blocked(&recipient) {
        Some("not-acceptable")
    } else {
        None
    }
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
/// tells whether a domain is served here. No stickiness: see [`route_with`].
pub fn route(
    directory: &SessionDirectory,
    to: &str,
    kind: &MessageKind,
    hosted: impl Fn(&str) -> bool,
) -> Decision {
    route_with(directory, to, kind, hosted, None)
}

/// [`route`], with the session a bare-addressed chat sticks to (SPEC.md §7
/// IM forking: once a client of the recipient replied, chat goes to that
/// client only; see [`Stickiness`]).
///
/// RFC 6121 §8.5.2.1.1 lets a server deliver a bare-addressed message to
/// one or more of the available resources with non-negative priority:
/// chat forks to all of them (until one replies), normal messages go to
/// the highest priority, headlines to all.
pub fn route_with(
    directory: &SessionDirectory,
    to: &str,
    kind: &MessageKind,
    hosted: impl Fn(&str) -> bool,
    sticky: Option<&str>,
) -> Decision {
    route_active(directory, to, kind, hosted, sticky, None)
}

/// [`route_with`], with the recipient's active client (SPEC.md §7, see
/// [`ActiveClients`]): a bare-addressed normal message whose highest
/// priority several sessions share goes to the active client alone when it
/// is one of them.
pub fn route_active(
    directory: &SessionDirectory,
    to: &str,
    kind: &MessageKind,
    hosted: impl Fn(&str) -> bool,
    sticky: Option<&str>,
    active: Option<&str>,
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
            if *kind == MessageKind::Chat
                && let Some(sticky) = sticky
                && let Some((full, s)) = candidates.iter().find(|(full, _)| *full == sticky)
            {
                return Decision::Deliver(vec![target(full, s)]);
            }
            if *kind == MessageKind::Normal
                && let Some(active) = active
                && let Some((full, s)) = candidates
                    .iter()
                    .find(|(full, s)| *full == active && s.priority == top)
            {
                return Decision::Deliver(vec![target(full, s)]);
            }
            let all = matches!(kind, MessageKind::Headline | MessageKind::Chat);
            Decision::Deliver(
                candidates
                    .into_iter()
                    .filter(|(_, s)| all || s.priority == top)
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

/// Stored messages per recipient, in arrival order, deduplicated by
/// (sender's bare address, message id): ids are unique per sender only
/// (XEP-0359), so two senders' "1" are two messages.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OfflineStore {
    queues: BTreeMap<String, Vec<Stored>>,
    total: usize,
}

fn same_message(stored: &Stored, from: &str, message_id: &str) -> bool {
    stored.message_id == message_id && bare_of(&stored.from) == bare_of(from)
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
                if queue
                    .iter()
                    .any(|s| same_message(s, stored.from.as_str(), &stored.message_id))
                {
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
                    queue.retain(|s| {
                        !same_message(s, delivered.from.as_str(), &delivered.message_id)
                    });
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

    /// Whether this message is stored for `bare`.
    pub fn contains(&self, bare: &str, from: &str, message_id: &str) -> bool {
        self.queued(bare)
            .iter()
            .any(|s| same_message(s, from, message_id))
    }

    /// Forgets everything (before a rebuild).
    pub fn clear(&mut self) {
        self.queues.clear();
        self.total = 0;
    }

    /// Forgets the users whose key `keep` refuses (their partition moved to
    /// another instance).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.queues.retain(|user, _| keep(user));
        self.total = self.queues.values().map(Vec::len).sum();
    }
}

/// Message ids already routed, per sender, for duplicate suppression (SPEC.md
/// §7: ids are stable end to end, XEP-0359). A `message.submitted` whose
/// (sender's bare address, message id) is here was delivered, stored or
/// bounced before (a redelivery after a router crash, or a client sending
/// it again) and is not routed again.
///
/// Derived from the log: the router rebuilds it from its outcome events
/// (`message.delivered`, `message.stored_offline`, `message.undelivered`,
/// `message.bounced`, which all name sender and id) when partitions are
/// assigned, and adds to it as it routes. Bounded: an id is remembered for
/// `window` after its time (event time, not wall clock: the newest time seen
/// is "now"), and at most `max` ids (the oldest go first). Keys are 128-bit
/// hashes of (sender, id), so memory per id is fixed (about 60 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenIds {
    by_key: BTreeMap<u128, i64>,
    by_time: BTreeSet<(i64, u128)>,
    newest: i64,
    window_ms: i64,
    max: usize,
}

/// Default of [`SeenIds`]' window: long enough for a client that resends
/// after reconnecting (XEP-0198 resumption, a re-login after failover).
pub const DEDUP_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);
/// Default of [`SeenIds`]' size bound.
pub const DEDUP_MAX: usize = 500_000;

impl Default for SeenIds {
    fn default() -> Self {
        Self::new(DEDUP_WINDOW, DEDUP_MAX)
    }
}

fn dedup_key(sender: &str, message_id: &str) -> u128 {
    let half = |salt: u8| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        salt.hash(&mut h);
        bare_of(sender).hash(&mut h);
        message_id.hash(&mut h);
        h.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

impl SeenIds {
    /// Remembers ids for `window`, at most `max` of them.
    pub fn new(window: std::time::Duration, max: usize) -> Self {
        Self {
            by_key: BTreeMap::new(),
            by_time: BTreeSet::new(),
            newest: i64::MIN,
            window_ms: i64::try_from(window.as_millis()).unwrap_or(i64::MAX),
            max: max.max(1),
        }
    }

    /// Whether (sender, id) was routed within the window.
    pub fn contains(&self, sender: &str, message_id: &str) -> bool {
        self.by_key.contains_key(&dedup_key(sender, message_id))
    }

    /// Remembers (sender, id) as routed at `at`.
    pub fn insert(&mut self, sender: &str, message_id: &str, at: DateTime<Utc>) {
        let at = at.timestamp_millis();
        let key = dedup_key(sender, message_id);
        if let Some(old) = self.by_key.insert(key, at) {
            if old >= at {
                self.by_key.insert(key, old);
                return;
            }
            self.by_time.remove(&(old, key));
        }
        self.by_time.insert((at, key));
        self.newest = self.newest.max(at);
        let horizon = self.newest.saturating_sub(self.window_ms);
        while let Some(&(time, oldest)) = self.by_time.first() {
            if time >= horizon && self.by_time.len() <= self.max {
                break;
            }
            self.by_time.pop_first();
            self.by_key.remove(&oldest);
        }
    }

    /// Remembers the outcome events of routing (see the type's doc);
    /// `owned` tells whether a sender's partition is this instance's.
    pub fn apply(&mut self, envelope: &Envelope, owned: impl Fn(&str) -> bool) {
        let (from, id) = match &envelope.event {
            Event::MessageDelivered(d) if !d.carbon => (d.from.as_str(), &d.message_id),
            Event::MessageStoredOffline(s) => (s.from.as_str(), &s.message_id),
            Event::MessageUndelivered(u) => (u.from.as_str(), &u.message_id),
            Event::MessageBounced(b) => (b.from.as_str(), &b.message_id),
            _ => return,
        };
        if owned(bare_of(from)) {
            self.insert(from, id, envelope.occurred_at);
        }
    }

    /// Number of ids remembered.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Forgets everything (before a rebuild).
    pub fn clear(&mut self) {
        self.by_key.clear();
        self.by_time.clear();
        self.newest = i64::MIN;
    }
}

/// IM forking stickiness (SPEC.md §7): once a client of user B replies to A,
/// A's bare-addressed chat to B goes to that client only, until that session
/// ends or the conversation is silent for `timeout`.
///
/// Folded from the `messages` partition of A (where B's replies to A arrive
/// as `message.delivered` / `message.stored_offline`, keyed by A), plus A's
/// own messages to B, which keep it alive. Times are event times. Bounded:
/// at most `max` conversations (the least recently active go first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stickiness {
    /// (A bare, B bare) -> (B's full address that replied, last activity).
    conversations: BTreeMap<(String, String), (String, DateTime<Utc>)>,
    timeout: chrono::Duration,
    max: usize,
}

/// Default silence after which stickiness ends (SPEC.md §7).
pub const STICKY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// Most conversations a router instance keeps stickiness for.
pub const STICKY_MAX: usize = 200_000;

impl Default for Stickiness {
    fn default() -> Self {
        Self::new(STICKY_TIMEOUT, STICKY_MAX)
    }
}

impl Stickiness {
    /// Stickiness ending after `timeout` of silence, for at most `max`
    /// conversations.
    pub fn new(timeout: std::time::Duration, max: usize) -> Self {
        Self {
            conversations: BTreeMap::new(),
            timeout: chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX),
            max: max.max(1),
        }
    }

    /// Changes the silence after which stickiness ends (a live setting).
    pub fn set_timeout(&mut self, timeout: std::time::Duration) {
        self.timeout = chrono::Duration::from_std(timeout).unwrap_or(chrono::Duration::MAX);
    }

    /// `replier` (a full address of B) sent a message to `to` (A) at `at`.
    pub fn replied(&mut self, replier: &str, to: &str, at: DateTime<Utc>) {
        if !replier.contains('/') {
            return;
        }
        let key = (bare_of(to).to_owned(), bare_of(replier).to_owned());
        if key.0 == key.1 {
            return;
        }
        match self.conversations.get_mut(&key) {
            Some((full, last)) if *last <= at => {
                full.clear();
                full.push_str(replier);
                *last = at;
            }
            Some(_) => {}
            None => {
                if self.conversations.len() >= self.max {
                    self.evict(at);
                }
                self.conversations.insert(key, (replier.to_owned(), at));
            }
        }
    }

    fn evict(&mut self, now: DateTime<Utc>) {
        let timeout = self.timeout;
        self.conversations
            .retain(|_, (_, last)| now - *last <= timeout);
        while self.conversations.len() >= self.max {
            let oldest = self
                .conversations
                .iter()
                .min_by_key(|(_, (_, last))| *last)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.conversations.remove(&k),
                None => break,
            };
        }
    }

    /// The client of `peer` that `user`'s chat sticks to at `now`, if any.
    /// It ends (and is forgotten) after `timeout` of silence, or when that
    /// session is no longer available or was bound after the reply (a new
    /// session with the same resource is another session). A hit counts as
    /// activity.
    pub fn target(
        &mut self,
        directory: &SessionDirectory,
        user: &str,
        peer: &str,
        now: DateTime<Utc>,
    ) -> Option<String> {
        let key = (bare_of(user).to_owned(), bare_of(peer).to_owned());
        let (full, last) = self.conversations.get(&key)?;
        let alive = now - *last <= self.timeout
            && directory
                .session(full)
                .is_some_and(|s| s.available && s.priority >= 0 && s.bound_at <= *last);
        if !alive {
            self.conversations.remove(&key);
            return None;
        }
        let full = full.clone();
        if let Some(entry) = self.conversations.get_mut(&key) {
            entry.1 = entry.1.max(now);
        }
        Some(full)
    }

    /// Applies an event of the `messages` topic (see the type's doc).
    pub fn apply(&mut self, envelope: &Envelope) {
        match &envelope.event {
            Event::MessageDelivered(d) if !d.carbon => {
                self.replied(d.from.as_str(), d.to.as_str(), envelope.occurred_at);
            }
            Event::MessageStoredOffline(s) => {
                self.replied(s.from.as_str(), s.to.as_str(), envelope.occurred_at);
            }
            _ => {}
        }
    }

    /// Number of sticky conversations.
    pub fn len(&self) -> usize {
        self.conversations.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.conversations.is_empty()
    }

    /// Forgets everything (before a rebuild).
    pub fn clear(&mut self) {
        self.conversations.clear();
    }
}

/// SPEC.md §7 active client: per user, the session that last sent
/// available presence or a message; it is *the active client* while that
/// activity is at most `window` old (5 minutes by default, the live
/// setting `im.active_client.window_secs`), its session is still bound and
/// available. Times are event times (`occurred_at`), so the boundary is
/// exact and replays decide the same: activity exactly `window` old is
/// still active, a microsecond more is not.
///
/// What it means for routing ("gets notifications"):
/// * every delivery of a message with a body says whether to notify on
///   that session (`delivery.stanza` `notify`): yes on the active client,
///   and on every session while no client is active; no on the others. A
///   gateway holding a session in quiet mode (XEP-0352) flushes its buffer
///   on a `notify` message, so quiet mode ends "on a message while no
///   other client is active";
/// * a bare-addressed normal message whose highest priority several
///   sessions share goes to the active client alone when it is one of
///   them (RFC 6121 §8.5.2.1.1 lets the server pick among them); chat
///   forks as before (forking and stickiness decide chat).
///
/// Folded from `presence.device` (every instance reads all of it) and the
/// `message.submitted` of the users whose `messages` partitions the
/// instance owns: with several router instances, a user's own messages
/// count only where that user's partition is owned (presence everywhere).
/// One entry per user; at most `max` users (the oldest go first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveClients {
    users: BTreeMap<String, (String, Uuid, DateTime<Utc>)>,
    window: chrono::Duration,
    max: usize,
}

/// Default of the active-client window (SPEC.md §7: 5 minutes).
pub const ACTIVE_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);
/// Most users an instance remembers the active client of.
pub const ACTIVE_MAX: usize = 1_000_000;

impl Default for ActiveClients {
    fn default() -> Self {
        Self::new(ACTIVE_WINDOW, ACTIVE_MAX)
    }
}

impl ActiveClients {
    /// Active for `window` after the last activity, at most `max` users.
    pub fn new(window: std::time::Duration, max: usize) -> Self {
        Self {
            users: BTreeMap::new(),
            window: chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX),
            max: max.max(1),
        }
    }

    /// Changes the window (a live setting).
    pub fn set_window(&mut self, window: std::time::Duration) {
        self.window = chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
    }

    /// Session `session_id` at `full` was active at `at`.
    pub fn touch(&mut self, full: &str, session_id: Uuid, at: DateTime<Utc>) {
        let bare = bare_of(full);
        if let Some(entry) = self.users.get_mut(bare) {
            if entry.2 <= at {
                *entry = (full.to_owned(), session_id, at);
            }
            return;
        }
        if self.users.len() >= self.max {
            let window = self.window;
            self.users.retain(|_, (_, _, last)| at - *last <= window);
            if self.users.len() >= self.max
                && let Some(oldest) = self
                    .users
                    .iter()
                    .min_by_key(|(_, (_, _, last))| *last)
                    .map(|(k, _)| k.clone())
            {
                self.users.remove(&oldest);
            }
        }
        self.users
            .insert(bare.to_owned(), (full.to_owned(), session_id, at));
    }

    /// Folds activity: available presence of a bound session (from the
    /// table), a message sent by one (from the owned partitions).
    pub fn apply(&mut self, directory: &SessionDirectory, envelope: &Envelope) {
        let full = match &envelope.event {
            Event::DevicePresence(p) if p.available => p.device.as_str(),
            Event::MessageSubmitted(m) => m.from.as_str(),
            _ => return,
        };
        if let Some(session) = directory.session(full) {
            self.touch(full, session.session_id, envelope.occurred_at);
        }
    }

    /// The active client of `bare` at `now`, if any.
    pub fn active<'a>(
        &'a self,
        directory: &SessionDirectory,
        bare: &str,
        now: DateTime<Utc>,
    ) -> Option<&'a str> {
        let (full, session_id, last) = self.users.get(bare_of(bare))?;
        let alive = now - *last <= self.window
            && directory
                .session(full)
                .is_some_and(|s| s.session_id == *session_id && s.available);
        alive.then_some(full.as_str())
    }

    /// Whether a message with a body delivered to `target` at `now` is to
    /// notify there: `target` is the active client, or none is active.
    pub fn notify(&self, directory: &SessionDirectory, target: &str, now: DateTime<Utc>) -> bool {
        self.active(directory, target, now)
            .is_none_or(|active| active == target)
    }

    /// Number of users remembered.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Issue 4 "Sessions": the chat and normal messages an instance handed to
/// gateway nodes lately. A delivery is a record of `deliveries` that the
/// node's gateway reads; a gateway that dies never reads (or never writes
/// out) the last ones, and nothing else would. When the node is declared
/// down, the deliveries to its sessions since its last heartbeat less one
/// interval (the last moment it is known to have kept up) go back to the
/// recipients' routers as `message.undelivered` (`node_down`), which send
/// them to another session or store them offline (XEP-0160): at least
/// once. A message the gateway wrote out just before dying may come
/// twice (same id); none is lost. After a restart of the node (a later
/// process start), every retained delivery to its earlier sessions goes
/// back, as the time of the crash is not known.
///
/// Retained for `window` of event time and at most `max` deliveries (the
/// oldest go first).
#[derive(Debug)]
pub struct RecentDeliveries {
    entries: std::collections::VecDeque<RecentDelivery>,
    window: chrono::Duration,
    max: usize,
}

/// A delivery remembered by [`RecentDeliveries`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentDelivery {
    /// Event time of the routing decision.
    pub at: DateTime<Utc>,
    /// The session's gateway node.
    pub node: String,
    /// The session.
    pub session_id: Uuid,
    /// Its full address.
    pub to: String,
    /// The stanza delivered.
    pub stanza: String,
    /// The message id.
    pub message_id: String,
    /// The original sender.
    pub sender: String,
}

/// Most deliveries an instance remembers for node failover.
pub const RECENT_MAX: usize = 200_000;

impl RecentDeliveries {
    /// Remembers deliveries for `window`, at most `max` of them.
    pub fn new(window: std::time::Duration, max: usize) -> Self {
        Self {
            entries: std::collections::VecDeque::new(),
            window: chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX),
            max: max.max(1),
        }
    }

    /// Remembers one delivery; forgets those older than the window before
    /// it (event time) and the oldest over the limit.
    pub fn record(&mut self, delivery: RecentDelivery) {
        let horizon = delivery.at - self.window;
        while self
            .entries
            .front()
            .is_some_and(|e| e.at < horizon || self.entries.len() >= self.max)
        {
            self.entries.pop_front();
        }
        self.entries.push_back(delivery);
    }

    /// Forgets deliveries older than the window at `now` (called while
    /// nothing is routed, so memory does not stay taken).
    pub fn expire(&mut self, now: DateTime<Utc>) {
        let horizon = now - self.window;
        while self.entries.front().is_some_and(|e| e.at < horizon) {
            self.entries.pop_front();
        }
        if self.entries.is_empty() && self.entries.capacity() > 1024 {
            self.entries.shrink_to_fit();
        }
    }

    /// Takes the deliveries to sessions in `gone` (session id → deliveries
    /// at or after this time count) out of the memory, in order.
    pub fn take(&mut self, gone: &BTreeMap<Uuid, DateTime<Utc>>) -> Vec<RecentDelivery> {
        if gone.is_empty() || self.entries.is_empty() {
            return Vec::new();
        }
        let mut taken = Vec::new();
        self.entries.retain(|e| match gone.get(&e.session_id) {
            Some(since) if e.at >= *since => {
                taken.push(e.clone());
                false
            }
            _ => true,
        });
        taken
    }

    /// Deliveries remembered.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Adds an XEP-0203 delay element to a stored stanza, unless it has one
/// already (a delayed message that came back undelivered keeps its first
/// stamp: XEP-0203 §3, the time of the original storage).
pub fn with_delay(stanza: &str, domain: &str, stamp: &str) -> String {
    if stanza.contains("<delay xmlns='urn:xmpp:delay'") {
        return stanza.to_owned();
    }
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
    use switchboard_schemas::events::Protocol;
    use switchboard_schemas::events::{
        DevicePresence, MessageDelivered, MessageStoredOffline, SessionEndReason, SessionEnded,
        SessionResourceBound,
    };
    use switchboard_schemas::{BareJid, FullJid, NodeId};

    fn env(event: impl Into<Event>) -> Envelope {
        Envelope::new(NodeId::new("gw1"), "x", event)
    }

    #[test]
    fn carbons_go_to_the_other_enabled_sessions_of_both_users() {
        use switchboard_schemas::events::SessionCarbons;
        let mut dir = SessionDirectory::default();
        let enable = |dir: &mut SessionDirectory, full: &str, id: Uuid| {
            dir.apply(&env(SessionCarbons {
                session_id: id,
                full_jid: FullJid::new(full),
                enabled: true,
            }));
        };
        for full in [
            "alice@example.com/a",
            "alice@example.com/b",
            "bob@example.com/x",
            "bob@example.com/y",
        ] {
            let id = bind(&mut dir, full, 0, true);
            enable(&mut dir, full, id);
        }
        bind(&mut dir, "alice@example.com/plain", 0, true);
        let idle = bind(&mut dir, "alice@example.com/idle", 0, false);
        enable(&mut dir, "alice@example.com/idle", idle);
        // A stale id does not enable the session bound under that address.
        enable(&mut dir, "alice@example.com/plain", Uuid::now_v7());

        let stanza = "<message xmlns='jabber:client' from='bob@example.com/x' to='alice@example.com' type='chat'><body>hi</body></message>";
        let copies = carbon_copies(
            &dir,
            "bob@example.com/x",
            "alice@example.com",
            &MessageKind::Chat,
            stanza,
            &["alice@example.com/a".to_owned()],
        );
        let to: Vec<(&str, bool)> = copies
            .iter()
            .map(|(t, s)| {
                (
                    t.full_jid.as_str(),
                    s.contains("<received xmlns='urn:xmpp:carbons:2'>"),
                )
            })
            .collect();
        assert_eq!(
            to,
            vec![("alice@example.com/b", true), ("bob@example.com/y", false)]
        );
        let (_, sent) = &copies[1];
        assert!(
            sent.contains(
                "<sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
            )
        );
        assert!(sent.contains(stanza));
        assert!(sent.starts_with("<message xmlns='jabber:client' from='bob@example.com' to='bob@example.com/y' type='chat'>"));
    }

    #[test]
    fn carbon_eligibility() {
        let plain = "<message><body>x</body></message>";
        assert!(carbons_eligible(&MessageKind::Chat, true, plain));
        assert!(carbons_eligible(
            &MessageKind::Chat,
            false,
            "<message><composing/></message>"
        ));
        assert!(carbons_eligible(&MessageKind::Normal, true, plain));
        assert!(!carbons_eligible(&MessageKind::Normal, false, "<message/>"));
        // XEP-0280 §6: IM payloads without a body (XEP-0333 markers).
        assert!(carbons_eligible(
            &MessageKind::Normal,
            false,
            "<message><displayed xmlns='urn:xmpp:chat-markers:0' id='1'/></message>"
        ));
        assert!(storable_offline(true, plain));
        assert!(!storable_offline(false, "<message><composing/></message>"));
        assert!(!storable_offline(
            true,
            "<message><body>x</body><no-store xmlns='urn:xmpp:hints'/></message>"
        ));
        assert!(storable_offline(
            false,
            "<message><store xmlns='urn:xmpp:hints'/></message>"
        ));
        assert!(!carbons_eligible(&MessageKind::Headline, true, plain));
        assert!(!carbons_eligible(&MessageKind::Groupchat, true, plain));
        assert!(!carbons_eligible(
            &MessageKind::Chat,
            true,
            "<message><body>x</body><private xmlns='urn:xmpp:carbons:2'/></message>"
        ));
        assert!(!carbons_eligible(
            &MessageKind::Chat,
            true,
            "<message><body>x</body><no-copy xmlns='urn:xmpp:hints'/></message>"
        ));
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
        let d = route(&dir, "bob@example.com", &MessageKind::Normal, hosted);
        assert_eq!(
            delivered_to(&d),
            ["bob@example.com/laptop", "bob@example.com/tablet"]
        );
        // Headlines go to every non-negative available resource, and so
        // does chat (IM forking) while it sticks to none.
        for kind in [MessageKind::Headline, MessageKind::Chat] {
            let d = route(&dir, "bob@example.com", &kind, hosted);
            assert_eq!(
                delivered_to(&d),
                [
                    "bob@example.com/laptop",
                    "bob@example.com/phone",
                    "bob@example.com/tablet"
                ]
            );
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn env_at(event: impl Into<Event>, secs: i64) -> Envelope {
        let mut e = env(event);
        e.occurred_at = at(secs);
        e
    }

    fn delivered(from: &str, to: &str, id: &str) -> MessageDelivered {
        MessageDelivered {
            message_id: id.to_owned(),
            from: FullJid::new(from),
            to: FullJid::new(to),
            carbon: false,
        }
    }

    fn bind_at(dir: &mut SessionDirectory, full: &str, secs: i64) -> Uuid {
        let id = Uuid::now_v7();
        dir.apply(&env_at(
            SessionResourceBound {
                session_id: id,
                full_jid: FullJid::new(full),
                protocol: Protocol::Xmpp,
                contact: None,
                priority: 0,
                client: Default::default(),
            },
            secs,
        ));
        dir.apply(&env_at(presence(full, true, 0), secs));
        id
    }

    #[test]
    fn forking_sticks_to_the_client_that_replied_until_silence_or_its_end() {
        let mut dir = SessionDirectory::default();
        bind_at(&mut dir, "bob@example.com/phone", 0);
        let laptop = bind_at(&mut dir, "bob@example.com/laptop", 0);
        let mut sticky = Stickiness::new(std::time::Duration::from_secs(600), 100);
        let chat = |dir: &SessionDirectory, sticky: &mut Stickiness, now: i64| {
            let to = sticky.target(dir, "alice@example.com", "bob@example.com", at(now));
            delivered_to(&route_with(
                dir,
                "bob@example.com",
                &MessageKind::Chat,
                hosted,
                to.as_deref(),
            ))
        };
        // Nobody replied: both clients get it.
        assert_eq!(chat(&dir, &mut sticky, 1).len(), 2);
        // bob replies from the laptop (his message delivered to alice).
        sticky.apply(&env_at(
            delivered("bob@example.com/laptop", "alice@example.com/x", "r1"),
            10,
        ));
        assert_eq!(chat(&dir, &mut sticky, 20), ["bob@example.com/laptop"]);
        // alice's messages keep it alive: 9 minutes later, and 9 more.
        assert_eq!(chat(&dir, &mut sticky, 560), ["bob@example.com/laptop"]);
        assert_eq!(chat(&dir, &mut sticky, 1100), ["bob@example.com/laptop"]);
        // Ten minutes of silence (exactly 600 s still sticks, 601 s not).
        assert_eq!(chat(&dir, &mut sticky, 1700), ["bob@example.com/laptop"]);
        assert_eq!(chat(&dir, &mut sticky, 2301).len(), 2);
        // Again sticky; then the laptop's session ends: fork again.
        sticky.apply(&env_at(
            delivered("bob@example.com/laptop", "alice@example.com/x", "r2"),
            2400,
        ));
        assert_eq!(chat(&dir, &mut sticky, 2410), ["bob@example.com/laptop"]);
        dir.apply(&env_at(
            SessionEnded {
                session_id: laptop,
                user: BareJid::new("bob@example.com"),
                full_jid: Some(FullJid::new("bob@example.com/laptop")),
                protocol: Protocol::Xmpp,
                reason: SessionEndReason::Logout,
                text: None,
            },
            2420,
        ));
        assert_eq!(chat(&dir, &mut sticky, 2430), ["bob@example.com/phone"]);
        // A new session with the laptop's resource is not the one that
        // replied: no stickiness to it.
        bind_at(&mut dir, "bob@example.com/laptop", 2440);
        assert_eq!(chat(&dir, &mut sticky, 2450).len(), 2);
        assert!(sticky.is_empty());
        // Other senders and normal messages are not affected.
        sticky.apply(&env_at(
            delivered("bob@example.com/phone", "alice@example.com/x", "r3"),
            2500,
        ));
        assert_eq!(
            sticky.target(&dir, "carol@example.com", "bob@example.com", at(2510)),
            None
        );
        assert_eq!(
            route_with(
                &dir,
                "bob@example.com",
                &MessageKind::Normal,
                hosted,
                Some("bob@example.com/phone")
            ),
            route(&dir, "bob@example.com", &MessageKind::Normal, hosted)
        );
    }

    #[test]
    fn the_active_client_is_the_last_active_within_the_window() {
        use switchboard_schemas::events::MessageSubmitted;
        let mut dir = SessionDirectory::default();
        let mut active = ActiveClients::new(std::time::Duration::from_secs(300), 100);
        let phone = "bob@example.com/phone";
        let laptop = "bob@example.com/laptop";
        let fold = |dir: &mut SessionDirectory, active: &mut ActiveClients, e: Envelope| {
            dir.apply(&e);
            active.apply(dir, &e);
        };
        bind_at(&mut dir, phone, 0);
        active.apply(&dir, &env_at(presence(phone, true, 0), 0));
        bind_at(&mut dir, laptop, 10);
        active.apply(&dir, &env_at(presence(laptop, true, 0), 10));
        // The laptop sent available presence last: active until exactly
        // 300 s later.
        assert_eq!(
            active.active(&dir, "bob@example.com", at(310)),
            Some(laptop)
        );
        assert!(active.notify(&dir, laptop, at(310)));
        assert!(!active.notify(&dir, phone, at(310)));
        assert_eq!(active.active(&dir, "bob@example.com", at(311)), None);
        // Nobody active: every session is notified.
        assert!(active.notify(&dir, phone, at(311)) && active.notify(&dir, laptop, at(311)));
        // A message from the phone makes it the active client; an older
        // event read afterwards changes nothing.
        let sent = |from: &str, secs| {
            env_at(
                MessageSubmitted {
                    message_id: "m".to_owned(),
                    from: FullJid::new(from),
                    to: "alice@example.com".to_owned(),
                    kind: MessageKind::Chat,
                    body: Some("x".to_owned()),
                    thread: None,
                    subject: None,
                    stanza: String::new(),
                },
                secs,
            )
        };
        fold(&mut dir, &mut active, sent(phone, 400));
        fold(&mut dir, &mut active, sent(laptop, 399));
        assert_eq!(active.active(&dir, "bob@example.com", at(450)), Some(phone));
        // A normal message shared by equal priorities goes to it alone;
        // chat still forks.
        let normal = route_active(
            &dir,
            "bob@example.com",
            &MessageKind::Normal,
            hosted,
            None,
            active.active(&dir, "bob@example.com", at(450)),
        );
        assert_eq!(delivered_to(&normal), [phone]);
        let chat = route_active(
            &dir,
            "bob@example.com",
            &MessageKind::Chat,
            hosted,
            None,
            Some(phone),
        );
        assert_eq!(delivered_to(&chat).len(), 2);
        // Unavailable presence from the phone: no longer active.
        fold(
            &mut dir,
            &mut active,
            env_at(presence(phone, false, 0), 460),
        );
        assert_eq!(active.active(&dir, "bob@example.com", at(470)), None);
        assert_eq!(
            delivered_to(&route_active(
                &dir,
                "bob@example.com",
                &MessageKind::Normal,
                hosted,
                None,
                None
            )),
            [laptop]
        );
    }

    #[test]
    fn recent_deliveries_are_taken_once_from_the_cutoff() {
        let t0 = at(1000);
        let delivery = |secs: i64, session: Uuid, id: &str| RecentDelivery {
            at: t0 + chrono::Duration::seconds(secs),
            node: "gw".to_owned(),
            session_id: session,
            to: "bob@example.com/r".to_owned(),
            stanza: format!("<message id='{id}'/>"),
            message_id: id.to_owned(),
            sender: "alice@example.com/r".to_owned(),
        };
        let (dead, alive) = (Uuid::now_v7(), Uuid::now_v7());
        let mut recent = RecentDeliveries::new(std::time::Duration::from_secs(30), 4);
        recent.record(delivery(0, dead, "old"));
        recent.record(delivery(10, dead, "before-cutoff"));
        recent.record(delivery(20, dead, "at-cutoff"));
        recent.record(delivery(21, alive, "other-session"));
        // The limit drops the oldest.
        recent.record(delivery(25, dead, "last"));
        assert_eq!(recent.len(), 4);
        let gone = BTreeMap::from([(dead, t0 + chrono::Duration::seconds(20))]);
        let ids: Vec<String> = recent
            .take(&gone)
            .into_iter()
            .map(|d| d.message_id)
            .collect();
        assert_eq!(ids, ["at-cutoff", "last"]);
        assert!(recent.take(&gone).is_empty(), "taken once");
        assert_eq!(recent.len(), 2);
        // The window: 30 s of event time.
        recent.expire(t0 + chrono::Duration::seconds(45));
        assert_eq!(recent.len(), 1);
        recent.expire(t0 + chrono::Duration::seconds(52));
        assert!(recent.is_empty());
    }

    #[test]
    fn stickiness_is_bounded() {
        let mut sticky = Stickiness::new(std::time::Duration::from_secs(600), 3);
        for i in 0..10 {
            sticky.apply(&env_at(
                delivered(&format!("u{i}@example.com/r"), "alice@example.com/x", "m"),
                i,
            ));
        }
        assert_eq!(sticky.len(), 3);
    }

    #[test]
    fn seen_ids_are_per_sender_and_bounded_by_time_and_count() {
        let mut seen = SeenIds::new(std::time::Duration::from_secs(60), 1000);
        seen.insert("alice@example.com/a", "1", at(0));
        // Another resource of the same sender: the same message.
        assert!(seen.contains("alice@example.com/b", "1"));
        // Another sender's "1" is another message.
        assert!(!seen.contains("bob@example.com/a", "1"));
        seen.insert("alice@example.com/a", "2", at(60));
        assert!(
            seen.contains("alice@example.com/a", "1"),
            "exactly 60 s: kept"
        );
        seen.insert("alice@example.com/a", "3", at(61));
        assert!(
            !seen.contains("alice@example.com/a", "1"),
            "61 s: forgotten"
        );
        assert_eq!(seen.len(), 2);
        // Count bound: the oldest go first.
        let mut seen = SeenIds::new(std::time::Duration::from_secs(600), 3);
        for i in 0..5 {
            seen.insert("alice@example.com/a", &i.to_string(), at(i));
        }
        assert_eq!(seen.len(), 3);
        assert!(!seen.contains("alice@example.com/a", "1"));
        assert!(seen.contains("alice@example.com/a", "2"));
        // Rebuilt from outcome events of owned senders only.
        let mut seen = SeenIds::default();
        seen.apply(
            &env_at(
                delivered("alice@example.com/a", "bob@example.com/b", "m1"),
                0,
            ),
            |s| s == "alice@example.com",
        );
        seen.apply(
            &env_at(
                delivered("carol@example.com/a", "bob@example.com/b", "m2"),
                0,
            ),
            |s| s == "alice@example.com",
        );
        assert!(seen.contains("alice@example.com/x", "m1"));
        assert!(!seen.contains("carol@example.com/a", "m2"));
    }

    #[test]
    fn silent_or_restarted_nodes_make_their_sessions_stale() {
        use switchboard_schemas::events::NodeHeartbeat;
        let mut dir = SessionDirectory::default();
        let beat = |node: &str, started: i64, secs: i64| {
            let mut e = env_at(
                NodeHeartbeat {
                    node: NodeId::new(node),
                    started_at: at(started),
                    interval_secs: 5,
                    sessions: Default::default(),
                },
                secs,
            );
            e.node = NodeId::new(node);
            e
        };
        dir.apply(&beat("gw1", 0, 0));
        bind_at(&mut dir, "bob@example.com/a", 1);
        // A node never heard of: its sessions are not judged.
        let mut other = env_at(
            SessionResourceBound {
                session_id: Uuid::now_v7(),
                full_jid: FullJid::new("carol@example.com/a"),
                protocol: Protocol::Xmpp,
                contact: None,
                priority: 0,
                client: Default::default(),
            },
            1,
        );
        other.node = NodeId::new("gw9");
        dir.apply(&other);
        let timeout = chrono::Duration::seconds(10);
        dir.apply(&beat("gw1", 0, 5));
        assert!(
            dir.stale_sessions(at(15), timeout).is_empty(),
            "exactly 10 s"
        );
        let stale = dir.stale_sessions(at(16), timeout);
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].0, "bob@example.com/a");
        // A heartbeat again: alive.
        dir.apply(&beat("gw1", 0, 14));
        assert!(dir.stale_sessions(at(16), timeout).is_empty());
        // The node restarted (kill -9, same node id): sessions bound before
        // its new start are gone, newer ones are not.
        dir.apply(&beat("gw1", 20, 20));
        bind_at(&mut dir, "dave@example.com/a", 21);
        let stale: Vec<String> = dir
            .stale_sessions(at(22), timeout)
            .into_iter()
            .map(|(f, _)| f)
            .collect();
        assert_eq!(stale, ["bob@example.com/a"]);
    }

    #[test]
    fn offline_ids_are_per_sender() {
        let mut store = OfflineStore::default();
        for from in ["alice@example.com/x", "dave@example.com/y"] {
            store.apply(&env(MessageStoredOffline {
                message_id: "1".to_owned(),
                from: FullJid::new(from),
                to: BareJid::new("carol@example.com"),
                stanza: Some("<message id='1'/>".to_owned()),
            }));
        }
        assert_eq!(store.queued("carol@example.com").len(), 2);
        store.apply(&env(delivered(
            "dave@example.com/other",
            "carol@example.com/phone",
            "1",
        )));
        assert_eq!(store.queued("carol@example.com").len(), 1);
        assert!(store.contains("carol@example.com", "alice@example.com/x", "1"));
        // A stanza that has a delay keeps it.
        let once = with_delay("<message id='1'/>", "example.com", "T1");
        assert_eq!(with_delay(&once, "example.com", "T2"), once);
    }

    #[test]
    fn sessions_of_a_user_only() {
        let mut dir = SessionDirectory::default();
        for full in [
            "bob@example.com.au/x",
            "bob@example.com-x/y",
            "bob@example.com/a",
            "bob@example.com/b",
            "bob@example.comm/z",
            "bo@example.com/q",
        ] {
            bind(&mut dir, full, 0, true);
        }
        let mine: Vec<&str> = dir.sessions_of("bob@example.com").map(|(f, _)| f).collect();
        assert_eq!(mine, ["bob@example.com/a", "bob@example.com/b"]);
        assert_eq!(dir.sessions_of("bob@example").count(), 0);
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
