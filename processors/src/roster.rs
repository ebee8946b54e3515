//! RFC 6121 §2 (rosters) and §3 (presence subscriptions) as a pure fold and
//! a pure decision function; [`crate::roster_runtime`] feeds them from the
//! `roster` topic and turns [`Effect`]s into events.
//!
//! Every event on the `roster` topic is keyed by the user whose roster it
//! concerns, so one partition holds everything about its users:
//!
//! * `roster.item_set` / `roster.item_removed`: the items (written by this
//!   processor only);
//! * subscription events (`roster.subscription_*`): *outbound* when the key
//!   is `from` (the user acted: from a client, or automatically on their
//!   behalf), *inbound* when the key is `to` (this processor forwarded the
//!   other side's action). The state machine is RFC 6121 Appendix A;
//! * `roster.queried` / `roster.update_requested`: client requests
//!   answered with an iq result or error.
//!
//! The pending inbound requests (RFC 6121 §3.1.3, "Pending In") are folded
//! from the subscription events themselves; items only from item events.

use std::collections::BTreeMap;

use switchboard_schemas::events::{
    RosterItemRemoved, RosterItemSet, RosterQueried, RosterUpdateRequested, Subscription,
    SubscriptionApproved, SubscriptionCancelled, SubscriptionDenied, SubscriptionRequested,
};
use switchboard_schemas::{BareJid, Envelope, Event};
use uuid::Uuid;

use crate::xml::{attr, escape, text_element};

/// One roster item (RFC 6121 §2.1.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// The owner's name for the contact.
    pub name: Option<String>,
    /// Groups, sorted and unique.
    pub groups: Vec<String>,
    /// The subscription state.
    pub subscription: Subscription,
    /// The owner asked to subscribe and waits (`ask="subscribe"`).
    pub ask: bool,
    /// The owner pre-approved the contact (RFC 6121 §3.4).
    pub approved: bool,
}

impl Default for Item {
    fn default() -> Self {
        Self {
            name: None,
            groups: Vec::new(),
            subscription: Subscription::None,
            ask: false,
            approved: false,
        }
    }
}

/// Whether `s` lets the owner see the contact (`to` or `both`).
fn sees(s: &Subscription) -> bool {
    matches!(s, Subscription::To | Subscription::Both)
}

/// Whether `s` lets the contact see the owner (`from` or `both`).
fn seen_by(s: &Subscription) -> bool {
    matches!(s, Subscription::From | Subscription::Both)
}

fn with_to(s: &Subscription, on: bool) -> Subscription {
    match (seen_by(s), on) {
        (true, true) => Subscription::Both,
        (true, false) => Subscription::From,
        (false, true) => Subscription::To,
        (false, false) => Subscription::None,
    }
}

fn with_from(s: &Subscription, on: bool) -> Subscription {
    match (sees(s), on) {
        (true, true) => Subscription::Both,
        (true, false) => Subscription::To,
        (false, true) => Subscription::From,
        (false, false) => Subscription::None,
    }
}

/// One user's roster and pending inbound requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserRoster {
    /// Items by contact.
    pub items: BTreeMap<String, Item>,
    /// Contacts who asked to see this user, with their text, not yet
    /// answered.
    pub pending_in: BTreeMap<String, Option<String>>,
}

impl UserRoster {
    /// The roster version (RFC 6121 §2.6): a digest of the items, so equal
    /// versions mean equal rosters whatever history led there.
    pub fn version(&self) -> String {
        // FNV-1a 64 over a canonical rendering: stable across builds.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                hash ^= u64::from(*b);
                hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
            }
            hash ^= 0xff;
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        };
        for (contact, item) in &self.items {
            feed(contact.as_bytes());
            feed(item.name.as_deref().unwrap_or("\u{0}").as_bytes());
            for g in &item.groups {
                feed(g.as_bytes());
            }
            feed(item.subscription.as_str().as_bytes());
            feed(&[u8::from(item.ask), u8::from(item.approved)]);
        }
        format!("{hash:016x}")
    }

    /// Contacts allowed to see this user's presence (RFC 6121 §4.2.2).
    pub fn watchers(&self) -> impl Iterator<Item = &str> {
        self.items
            .iter()
            .filter(|(_, i)| seen_by(&i.subscription))
            .map(|(c, _)| c.as_str())
    }

    /// Contacts whose presence this user sees (RFC 6121 §4.3).
    pub fn watched(&self) -> impl Iterator<Item = &str> {
        self.items
            .iter()
            .filter(|(_, i)| sees(&i.subscription))
            .map(|(c, _)| c.as_str())
    }
}

/// The rosters of the users whose partitions this instance owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rosters {
    users: BTreeMap<String, UserRoster>,
}

/// The direction of a subscription event, from its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// The key is the acting user.
    Outbound,
    /// The key is the other user.
    Inbound,
}

fn direction(subject: &str, from: &BareJid, to: &BareJid) -> Option<Direction> {
    if from.as_str() == to.as_str() {
        None
    } else if subject == from.as_str() {
        Some(Direction::Outbound)
    } else if subject == to.as_str() {
        Some(Direction::Inbound)
    } else {
        None
    }
}

impl Rosters {
    /// A user's roster, if it has anything.
    pub fn get(&self, user: &str) -> Option<&UserRoster> {
        self.users.get(user)
    }

    /// Users with a roster.
    pub fn users(&self) -> impl Iterator<Item = &str> {
        self.users.keys().map(String::as_str)
    }

    /// Keeps only the users `keep` says (after a partition moved away).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.users.retain(|u, _| keep(u));
    }

    /// Sets an item (what `roster.item_set` says).
    pub fn set_item(&mut self, owner: &str, contact: &str, item: Item) {
        self.users
            .entry(owner.to_owned())
            .or_default()
            .items
            .insert(contact.to_owned(), item);
    }

    /// Removes an item (what `roster.item_removed` says).
    pub fn remove_item(&mut self, owner: &str, contact: &str) {
        if let Some(r) = self.users.get_mut(owner) {
            r.items.remove(contact);
        }
    }

    /// Folds one event of the `roster` topic into the state.
    pub fn apply(&mut self, envelope: &Envelope) {
        let subject = envelope.subject.as_str();
        match &envelope.event {
            Event::RosterItemSet(set) => self.set_item(
                set.user.as_str(),
                set.contact.as_str(),
                Item {
                    name: set.name.clone(),
                    groups: set.groups.clone(),
                    subscription: set.subscription.clone(),
                    ask: set.ask,
                    approved: set.approved,
                },
            ),
            Event::RosterItemRemoved(removed) => {
                self.remove_item(removed.user.as_str(), removed.contact.as_str());
            }
            Event::SubscriptionRequested(e)
                if direction(subject, &e.from, &e.to) == Some(Direction::Inbound) =>
            {
                self.users
                    .entry(subject.to_owned())
                    .or_default()
                    .pending_in
                    .insert(e.from.as_str().to_owned(), e.status.clone());
            }
            Event::SubscriptionApproved(SubscriptionApproved { from, to, .. })
            | Event::SubscriptionDenied(SubscriptionDenied { from, to, .. }) => {
                if direction(subject, from, to) == Some(Direction::Outbound)
                    && let Some(r) = self.users.get_mut(subject)
                {
                    r.pending_in.remove(to.as_str());
                }
            }
            Event::SubscriptionCancelled(SubscriptionCancelled { from, to, .. }) => {
                if direction(subject, from, to) == Some(Direction::Inbound)
                    && let Some(r) = self.users.get_mut(subject)
                {
                    r.pending_in.remove(from.as_str());
                }
            }
            _ => {}
        }
    }
}

/// What a watcher may do under the owner's policy (SPEC.md §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Approve without asking the owner (auto-authorize, allowed list).
    Allow,
    /// Ask the owner.
    Ask,
    /// Refuse (blocked user or domain, default block).
    Block,
}

/// Limits and policy the decisions need.
pub struct Policy<'a> {
    /// Maximum items per roster, 0 for no limit (SPEC.md §6, default 200).
    pub max_contacts: usize,
    /// Maximum watchers per user, 0 for no limit (default 200).
    pub max_watchers: usize,
    /// The owner's verdict on a watcher: `(owner, watcher)`.
    pub verdict: &'a dyn Fn(&str, &str) -> Verdict,
}

/// A subscription-related presence stanza type (RFC 6121 §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscriptionStanza {
    /// `subscribe`.
    Subscribe,
    /// `subscribed`.
    Subscribed,
    /// `unsubscribe`.
    Unsubscribe,
    /// `unsubscribed`.
    Unsubscribed,
}

impl SubscriptionStanza {
    /// The `type` attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subscribe => "subscribe",
            Self::Subscribed => "subscribed",
            Self::Unsubscribe => "unsubscribe",
            Self::Unsubscribed => "unsubscribed",
        }
    }
}

/// The answer to a client's roster request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `<iq type='result'/>`, with the stanza's payload (may be empty).
    Result(String),
    /// `<iq type='error'>` with an error type and a defined condition
    /// (RFC 6120 §8.3.3).
    Error(&'static str, &'static str),
}

/// Where an answer goes: the asking session on the node that sent the
/// request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Asker {
    /// The gateway node (the request's envelope node).
    pub node: String,
    /// The session.
    pub session_id: Uuid,
    /// Its address.
    pub device: String,
    /// The iq id.
    pub iq_id: String,
}

/// What a decision asks of the runtime.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Store the item (`roster.item_set` keyed by the owner) and push it to
    /// the owner's sessions (RFC 6121 §2.1.6).
    SetItem {
        /// The owner.
        owner: String,
        /// The contact.
        contact: String,
        /// The whole item.
        item: Item,
    },
    /// Remove the item and push `subscription='remove'`.
    RemoveItem {
        /// The owner.
        owner: String,
        /// The contact.
        contact: String,
    },
    /// Produce an event on the `roster` topic keyed by `key`: a forwarded
    /// (inbound) copy, or an action on the owner's behalf.
    Emit {
        /// The partition key (a bare JID).
        key: String,
        /// The event.
        event: Event,
    },
    /// Deliver a subscription stanza from `from` to `to`'s available
    /// sessions.
    Notify {
        /// The recipient.
        to: String,
        /// The other user.
        from: String,
        /// The stanza type.
        kind: SubscriptionStanza,
        /// Text from the other user.
        status: Option<String>,
    },
    /// Deliver `of`'s current presence to `to`'s available sessions.
    SendPresence {
        /// Whose presence.
        of: String,
        /// To whom.
        to: String,
    },
    /// Deliver unavailable presence from `of` to `to`'s sessions.
    SendUnavailable {
        /// Whose presence.
        of: String,
        /// To whom.
        to: String,
    },
    /// A presence error to the acting user's sessions (RFC 6120 §8.3): the
    /// subscription request to `contact` cannot be carried out.
    RefuseRequest {
        /// The acting user.
        to: String,
        /// The contact.
        contact: String,
        /// The defined condition.
        condition: &'static str,
    },
    /// Answer a client's request.
    Answer(Asker, Answer),
}

fn item_effect(owner: &str, contact: &str, old: Option<&Item>, new: Item) -> Option<Effect> {
    (old != Some(&new)).then(|| Effect::SetItem {
        owner: owner.to_owned(),
        contact: contact.to_owned(),
        item: new,
    })
}

/// Decides what one event of the `roster` topic causes, given the state
/// before it. The caller then folds the event ([`Rosters::apply`]) and the
/// item effects into the state.
pub fn decide(rosters: &Rosters, envelope: &Envelope, policy: &Policy<'_>) -> Vec<Effect> {
    let subject = envelope.subject.as_str();
    let mut out = Vec::new();
    match &envelope.event {
        Event::SubscriptionRequested(e) => match direction(subject, &e.from, &e.to) {
            Some(Direction::Outbound) => outbound_subscribe(rosters, e, policy, &mut out),
            Some(Direction::Inbound) => inbound_subscribe(rosters, e, policy, &mut out),
            None => {}
        },
        Event::SubscriptionApproved(e) => match direction(subject, &e.from, &e.to) {
            Some(Direction::Outbound) => outbound_subscribed(rosters, e, policy, &mut out),
            Some(Direction::Inbound) => inbound_subscribed(rosters, e, &mut out),
            None => {}
        },
        Event::SubscriptionCancelled(e) => match direction(subject, &e.from, &e.to) {
            Some(Direction::Outbound) => outbound_unsubscribe(rosters, e, &mut out),
            Some(Direction::Inbound) => inbound_unsubscribe(rosters, e, &mut out),
            None => {}
        },
        Event::SubscriptionDenied(e) => match direction(subject, &e.from, &e.to) {
            Some(Direction::Outbound) => outbound_unsubscribed(rosters, e, &mut out),
            Some(Direction::Inbound) => inbound_unsubscribed(rosters, e, &mut out),
            None => {}
        },
        Event::RosterQueried(q) => out.push(query(rosters, q, envelope.node.as_str())),
        Event::RosterUpdateRequested(u) => {
            update(rosters, u, envelope.node.as_str(), policy, &mut out)
        }
        _ => {}
    }
    out
}

fn lookup<'a>(rosters: &'a Rosters, owner: &str, contact: &str) -> Option<&'a Item> {
    rosters.get(owner).and_then(|r| r.items.get(contact))
}

fn roster_full(rosters: &Rosters, owner: &str, max: usize) -> bool {
    max > 0 && rosters.get(owner).is_some_and(|r| r.items.len() >= max)
}

fn watchers_full(rosters: &Rosters, owner: &str, max: usize) -> bool {
    max > 0
        && rosters
            .get(owner)
            .is_some_and(|r| r.watchers().count() >= max)
}

/// RFC 6121 §3.1.2 and A.2.1: the user asks to see the contact.
fn outbound_subscribe(
    rosters: &Rosters,
    e: &SubscriptionRequested,
    policy: &Policy<'_>,
    out: &mut Vec<Effect>,
) {
    let (user, contact) = (e.from.as_str(), e.to.as_str());
    let old = lookup(rosters, user, contact);
    if old.is_none() && roster_full(rosters, user, policy.max_contacts) {
        out.push(Effect::RefuseRequest {
            to: user.to_owned(),
            contact: contact.to_owned(),
            condition: "resource-constraint",
        });
        return;
    }
    let mut item = old.cloned().unwrap_or_default();
    if !sees(&item.subscription) {
        item.ask = true;
    }
    out.extend(item_effect(user, contact, old, item));
    out.push(Effect::Emit {
        key: contact.to_owned(),
        event: e.clone().into(),
    });
}

/// RFC 6121 §3.1.3 and A.3.1: a request arrives for the contact.
fn inbound_subscribe(
    rosters: &Rosters,
    e: &SubscriptionRequested,
    policy: &Policy<'_>,
    out: &mut Vec<Effect>,
) {
    let (watcher, owner) = (e.from.as_str(), e.to.as_str());
    let item = lookup(rosters, owner, watcher);
    let approve = |out: &mut Vec<Effect>| {
        out.push(Effect::Emit {
            key: owner.to_owned(),
            event: SubscriptionApproved {
                from: e.to.clone(),
                to: e.from.clone(),
                status: None,
            }
            .into(),
        });
    };
    let deny = |out: &mut Vec<Effect>| {
        out.push(Effect::Emit {
            key: owner.to_owned(),
            event: SubscriptionDenied {
                from: e.to.clone(),
                to: e.from.clone(),
                status: None,
            }
            .into(),
        });
    };
    // Already subscribed or pre-approved: the server answers for the
    // contact (§3.1.3, §3.4).
    if item.is_some_and(|i| seen_by(&i.subscription) || i.approved) {
        approve(out);
        return;
    }
    let verdict = (policy.verdict)(owner, watcher);
    // SPEC.md §6: a user at the limit cannot be added by others.
    let full = (item.is_none() && roster_full(rosters, owner, policy.max_contacts))
        || watchers_full(rosters, owner, policy.max_watchers);
    match verdict {
        Verdict::Block => deny(out),
        _ if full => deny(out),
        Verdict::Allow => {
            approve(out);
            // SPEC.md §6: reciprocal auto-add when the contact accepts.
            if !item.is_some_and(|i| sees(&i.subscription) || i.ask) {
                out.push(Effect::Emit {
                    key: owner.to_owned(),
                    event: SubscriptionRequested {
                        from: e.to.clone(),
                        to: e.from.clone(),
                        status: None,
                    }
                    .into(),
                });
            }
        }
        Verdict::Ask => out.push(Effect::Notify {
            to: owner.to_owned(),
            from: watcher.to_owned(),
            kind: SubscriptionStanza::Subscribe,
            status: e.status.clone(),
        }),
    }
}

/// RFC 6121 §3.1.5 and A.2.2 (and §3.4 pre-approval): the owner lets the
/// other user see them.
fn outbound_subscribed(
    rosters: &Rosters,
    e: &SubscriptionApproved,
    policy: &Policy<'_>,
    out: &mut Vec<Effect>,
) {
    let (owner, watcher) = (e.from.as_str(), e.to.as_str());
    let old = lookup(rosters, owner, watcher);
    let pending = rosters
        .get(owner)
        .is_some_and(|r| r.pending_in.contains_key(watcher));
    let mut item = old.cloned().unwrap_or_default();
    if pending || seen_by(&item.subscription) {
        if old.is_none() && roster_full(rosters, owner, policy.max_contacts) {
            return;
        }
        item.subscription = with_from(&item.subscription, true);
        item.approved = false;
        out.extend(item_effect(owner, watcher, old, item));
        out.push(Effect::Emit {
            key: watcher.to_owned(),
            event: e.clone().into(),
        });
        out.push(Effect::SendPresence {
            of: owner.to_owned(),
            to: watcher.to_owned(),
        });
    } else if old.is_some() || !roster_full(rosters, owner, policy.max_contacts) {
        // §3.4: no request yet, so this pre-approves one.
        item.approved = true;
        out.extend(item_effect(owner, watcher, old, item));
    }
}

/// RFC 6121 §3.1.6 and A.3.2: the user's request was approved.
fn inbound_subscribed(rosters: &Rosters, e: &SubscriptionApproved, out: &mut Vec<Effect>) {
    let (owner, user) = (e.from.as_str(), e.to.as_str());
    let Some(old) = lookup(rosters, user, owner) else {
        return;
    };
    // Ignored unless a request is pending (A.3.2 "no state change").
    if !old.ask {
        return;
    }
    let mut item = old.clone();
    item.ask = false;
    item.subscription = with_to(&item.subscription, true);
    out.extend(item_effect(user, owner, Some(old), item));
    out.push(Effect::Notify {
        to: user.to_owned(),
        from: owner.to_owned(),
        kind: SubscriptionStanza::Subscribed,
        status: e.status.clone(),
    });
}

/// RFC 6121 §3.3.2 and A.2.3: the user stops watching the contact.
fn outbound_unsubscribe(rosters: &Rosters, e: &SubscriptionCancelled, out: &mut Vec<Effect>) {
    let (user, contact) = (e.from.as_str(), e.to.as_str());
    if let Some(old) = lookup(rosters, user, contact) {
        let mut item = old.clone();
        item.ask = false;
        item.subscription = with_to(&item.subscription, false);
        out.extend(item_effect(user, contact, Some(old), item));
    }
    out.push(Effect::Emit {
        key: contact.to_owned(),
        event: e.clone().into(),
    });
}

/// RFC 6121 §3.3.3 and A.3.3: a watcher stopped watching the owner.
fn inbound_unsubscribe(rosters: &Rosters, e: &SubscriptionCancelled, out: &mut Vec<Effect>) {
    let (watcher, owner) = (e.from.as_str(), e.to.as_str());
    let Some(old) = lookup(rosters, owner, watcher) else {
        return;
    };
    if !seen_by(&old.subscription) && !old.approved {
        return;
    }
    let mut item = old.clone();
    item.approved = false;
    item.subscription = with_from(&item.subscription, false);
    out.extend(item_effect(owner, watcher, Some(old), item));
    out.push(Effect::Notify {
        to: owner.to_owned(),
        from: watcher.to_owned(),
        kind: SubscriptionStanza::Unsubscribe,
        status: e.status.clone(),
    });
    // §3.3.3: the watcher stops seeing the owner.
    out.push(Effect::SendUnavailable {
        of: owner.to_owned(),
        to: watcher.to_owned(),
    });
}

/// RFC 6121 §3.2 and A.2.4: the owner denies or revokes a subscription.
fn outbound_unsubscribed(rosters: &Rosters, e: &SubscriptionDenied, out: &mut Vec<Effect>) {
    let (owner, watcher) = (e.from.as_str(), e.to.as_str());
    let old = lookup(rosters, owner, watcher);
    let pending = rosters
        .get(owner)
        .is_some_and(|r| r.pending_in.contains_key(watcher));
    let was_seen = old.is_some_and(|i| seen_by(&i.subscription));
    if let Some(old) = old {
        let mut item = old.clone();
        item.approved = false;
        item.subscription = with_from(&item.subscription, false);
        out.extend(item_effect(owner, watcher, Some(old), item));
    }
    if pending || was_seen {
        out.push(Effect::Emit {
            key: watcher.to_owned(),
            event: e.clone().into(),
        });
    }
    if was_seen {
        out.push(Effect::SendUnavailable {
            of: owner.to_owned(),
            to: watcher.to_owned(),
        });
    }
}

/// RFC 6121 §3.2.3 and A.3.4: the user's subscription was denied or revoked.
fn inbound_unsubscribed(rosters: &Rosters, e: &SubscriptionDenied, out: &mut Vec<Effect>) {
    let (owner, user) = (e.from.as_str(), e.to.as_str());
    let Some(old) = lookup(rosters, user, owner) else {
        return;
    };
    if !old.ask && !sees(&old.subscription) {
        return;
    }
    let mut item = old.clone();
    item.ask = false;
    item.subscription = with_to(&item.subscription, false);
    out.extend(item_effect(user, owner, Some(old), item));
    out.push(Effect::Notify {
        to: user.to_owned(),
        from: owner.to_owned(),
        kind: SubscriptionStanza::Unsubscribed,
        status: e.status.clone(),
    });
}

/// Renders an item as RFC 6121 §2.1.2 `<item/>`.
pub fn item_xml(out: &mut String, contact: &str, item: Option<&Item>) {
    out.push_str("<item");
    attr(out, "jid", contact);
    match item {
        None => attr(out, "subscription", "remove"),
        Some(item) => {
            attr(out, "subscription", item.subscription.as_str());
            if let Some(name) = &item.name {
                attr(out, "name", name);
            }
            if item.ask {
                attr(out, "ask", "subscribe");
            }
            if item.approved {
                attr(out, "approved", "true");
            }
        }
    }
    match item {
        Some(item) if !item.groups.is_empty() => {
            out.push('>');
            for g in &item.groups {
                text_element(out, "group", g);
            }
            out.push_str("</item>");
        }
        _ => out.push_str("/>"),
    }
}

/// RFC 6121 §2.1.3 and §2.6.3: the roster, or an empty result when the
/// client's cached version is current.
fn query(rosters: &Rosters, q: &RosterQueried, node: &str) -> Effect {
    let asker = Asker {
        node: node.to_owned(),
        session_id: q.session_id,
        device: q.device.as_str().to_owned(),
        iq_id: q.iq_id.clone(),
    };
    let empty = UserRoster::default();
    let roster = rosters.get(q.user.as_str()).unwrap_or(&empty);
    let version = roster.version();
    if q.version.as_deref() == Some(version.as_str()) {
        return Effect::Answer(asker, Answer::Result(String::new()));
    }
    let mut payload = format!(
        "<query xmlns='jabber:iq:roster' ver='{}'>",
        escape(&version)
    );
    for (contact, item) in &roster.items {
        item_xml(&mut payload, contact, Some(item));
    }
    payload.push_str("</query>");
    Effect::Answer(asker, Answer::Result(payload))
}

/// RFC 6121 §2.3 (add or update) and §2.5 (remove).
fn update(
    rosters: &Rosters,
    u: &RosterUpdateRequested,
    node: &str,
    policy: &Policy<'_>,
    out: &mut Vec<Effect>,
) {
    let asker = Asker {
        node: node.to_owned(),
        session_id: u.session_id,
        device: u.device.as_str().to_owned(),
        iq_id: u.iq_id.clone(),
    };
    let (user, contact) = (u.user.as_str(), u.contact.as_str());
    let old = lookup(rosters, user, contact);
    if u.remove {
        let Some(old) = old else {
            // §2.5.3: removing what is not there.
            out.push(Effect::Answer(
                asker,
                Answer::Error("cancel", "item-not-found"),
            ));
            return;
        };
        // §2.5.2: removal cancels both directions; the item goes at once,
        // so the contact's side gets the inbound copies directly.
        if sees(&old.subscription) || old.ask {
            out.push(Effect::Emit {
                key: contact.to_owned(),
                event: SubscriptionCancelled {
                    from: u.user.clone(),
                    to: u.contact.clone(),
                    status: None,
                }
                .into(),
            });
        }
        if seen_by(&old.subscription) {
            out.push(Effect::Emit {
                key: contact.to_owned(),
                event: SubscriptionDenied {
                    from: u.user.clone(),
                    to: u.contact.clone(),
                    status: None,
                }
                .into(),
            });
            out.push(Effect::SendUnavailable {
                of: user.to_owned(),
                to: contact.to_owned(),
            });
        }
        out.push(Effect::RemoveItem {
            owner: user.to_owned(),
            contact: contact.to_owned(),
        });
        out.push(Effect::Answer(asker, Answer::Result(String::new())));
        return;
    }
    if old.is_none() && roster_full(rosters, user, policy.max_contacts) {
        // SPEC.md §6: the contact list is at its maximum size.
        out.push(Effect::Answer(
            asker,
            Answer::Error("wait", "resource-constraint"),
        ));
        return;
    }
    let mut item = old.cloned().unwrap_or_default();
    item.name = u.name.clone();
    let mut groups = u.groups.clone();
    groups.sort();
    groups.dedup();
    item.groups = groups;
    out.extend(item_effect(user, contact, old, item));
    out.push(Effect::Answer(asker, Answer::Result(String::new())));
}

/// The `roster.item_set` event of a [`Effect::SetItem`].
pub fn item_set_event(owner: &str, contact: &str, item: &Item) -> RosterItemSet {
    RosterItemSet {
        user: BareJid::new(owner),
        contact: BareJid::new(contact),
        name: item.name.clone(),
        groups: item.groups.clone(),
        subscription: item.subscription.clone(),
        ask: item.ask,
        approved: item.approved,
    }
}

/// The `roster.item_removed` event of a [`Effect::RemoveItem`].
pub fn item_removed_event(owner: &str, contact: &str) -> RosterItemRemoved {
    RosterItemRemoved {
        user: BareJid::new(owner),
        contact: BareJid::new(contact),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use switchboard_schemas::NodeId;

    use super::*;

    const A: &str = "alice@example.com";
    const B: &str = "bob@example.com";
    const C: &str = "carol@example.com";

    /// Runs events through decide/apply the way the runtime does, keeping
    /// the log (inputs and item events in order) and the other effects.
    struct Sim {
        rosters: Rosters,
        log: Vec<Envelope>,
        queue: VecDeque<Envelope>,
        effects: Vec<Effect>,
    }

    impl Sim {
        fn new() -> Self {
            Self {
                rosters: Rosters::default(),
                log: Vec::new(),
                queue: VecDeque::new(),
                effects: Vec::new(),
            }
        }

        fn send(&mut self, key: &str, event: impl Into<Event>, policy: &Policy<'_>) {
            self.queue
                .push_back(Envelope::new(NodeId::new("gw1"), key, event));
            while let Some(env) = self.queue.pop_front() {
                self.log.push(env.clone());
                let effects = decide(&self.rosters, &env, policy);
                self.rosters.apply(&env);
                for effect in effects {
                    match effect {
                        Effect::SetItem {
                            owner,
                            contact,
                            item,
                        } => {
                            self.rosters.set_item(&owner, &contact, item.clone());
                            self.log.push(Envelope::new(
                                NodeId::new("p1"),
                                owner.clone(),
                                item_set_event(&owner, &contact, &item),
                            ));
                        }
                        Effect::RemoveItem { owner, contact } => {
                            self.rosters.remove_item(&owner, &contact);
                            self.log.push(Envelope::new(
                                NodeId::new("p1"),
                                owner.clone(),
                                item_removed_event(&owner, &contact),
                            ));
                        }
                        Effect::Emit { key, event } => {
                            self.queue
                                .push_back(Envelope::new(NodeId::new("p1"), key, event));
                        }
                        other => self.effects.push(other),
                    }
                }
            }
        }

        fn item(&self, owner: &str, contact: &str) -> Option<Item> {
            lookup(&self.rosters, owner, contact).cloned()
        }

        fn notified(&self, to: &str, kind: SubscriptionStanza) -> Vec<String> {
            self.effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Notify {
                        to: t,
                        from,
                        kind: k,
                        ..
                    } if t == to && *k == kind => Some(from.clone()),
                    _ => None,
                })
                .collect()
        }

        /// The state rebuilt by folding the log from the start.
        fn rebuilt(&self) -> Rosters {
            let mut r = Rosters::default();
            for env in &self.log {
                r.apply(env);
            }
            r
        }
    }

    fn request(from: &str, to: &str) -> SubscriptionRequested {
        SubscriptionRequested {
            from: BareJid::new(from),
            to: BareJid::new(to),
            status: Some("hi".to_owned()),
        }
    }

    fn approve(from: &str, to: &str) -> SubscriptionApproved {
        SubscriptionApproved {
            from: BareJid::new(from),
            to: BareJid::new(to),
            status: None,
        }
    }

    fn allow(_: &str, _: &str) -> Verdict {
        Verdict::Allow
    }

    fn ask(_: &str, _: &str) -> Verdict {
        Verdict::Ask
    }

    fn policy(verdict: &dyn Fn(&str, &str) -> Verdict) -> Policy<'_> {
        Policy {
            max_contacts: 200,
            max_watchers: 200,
            verdict,
        }
    }

    fn both() -> Subscription {
        Subscription::Both
    }

    #[test]
    fn auto_authorize_ends_in_mutual_subscription() {
        let p = policy(&allow);
        let mut sim = Sim::new();
        sim.send(A, request(A, B), &p);
        let a = sim.item(A, B).unwrap();
        let b = sim.item(B, A).unwrap();
        assert_eq!((a.subscription, a.ask), (both(), false));
        assert_eq!((b.subscription, b.ask), (both(), false));
        assert_eq!(sim.notified(A, SubscriptionStanza::Subscribed), vec![B]);
        assert_eq!(sim.notified(B, SubscriptionStanza::Subscribed), vec![A]);
        assert!(sim.notified(B, SubscriptionStanza::Subscribe).is_empty());
        assert!(sim.rosters.get(B).unwrap().pending_in.is_empty());
        assert_eq!(sim.rebuilt(), sim.rosters);
    }

    #[test]
    fn ask_policy_waits_for_the_contact() {
        let p = policy(&ask);
        let mut sim = Sim::new();
        sim.send(A, request(A, B), &p);
        let a = sim.item(A, B).unwrap();
        assert_eq!((a.subscription.clone(), a.ask), (Subscription::None, true));
        assert_eq!(sim.item(B, A), None, "no item for a pending request");
        assert_eq!(sim.notified(B, SubscriptionStanza::Subscribe), vec![A]);
        assert!(sim.rosters.get(B).unwrap().pending_in.contains_key(A));

        sim.send(B, approve(B, A), &p);
        let a = sim.item(A, B).unwrap();
        let b = sim.item(B, A).unwrap();
        assert_eq!((a.subscription, a.ask), (Subscription::To, false));
        assert_eq!((b.subscription, b.ask), (Subscription::From, false));
        assert_eq!(sim.notified(A, SubscriptionStanza::Subscribed), vec![B]);
        assert!(sim.effects.contains(&Effect::SendPresence {
            of: B.to_owned(),
            to: A.to_owned()
        }));
        assert!(sim.rosters.get(B).unwrap().pending_in.is_empty());
        assert_eq!(sim.rebuilt(), sim.rosters);
    }

    #[test]
    fn blocked_watcher_is_denied() {
        let block_a = |_: &str, w: &str| {
            if w == A {
                Verdict::Block
            } else {
                Verdict::Allow
            }
        };
        let p = policy(&block_a);
        let mut sim = Sim::new();
        sim.send(A, request(A, B), &p);
        let a = sim.item(A, B).unwrap();
        assert_eq!((a.subscription, a.ask), (Subscription::None, false));
        assert_eq!(sim.notified(A, SubscriptionStanza::Unsubscribed), vec![B]);
        assert!(sim.notified(B, SubscriptionStanza::Subscribe).is_empty());
        assert_eq!(sim.rebuilt(), sim.rosters);
    }

    #[test]
    fn pre_approval_answers_the_later_request() {
        let p = policy(&ask);
        let mut sim = Sim::new();
        sim.send(B, approve(B, A), &p);
        assert!(sim.item(B, A).unwrap().approved);
        sim.send(A, request(A, B), &p);
        assert!(sim.notified(B, SubscriptionStanza::Subscribe).is_empty());
        let b = sim.item(B, A).unwrap();
        assert_eq!((b.subscription, b.approved), (Subscription::From, false));
        assert_eq!(sim.item(A, B).unwrap().subscription, Subscription::To);
        assert_eq!(sim.rebuilt(), sim.rosters);
    }

    #[test]
    fn unsubscribe_and_revoke_walk_back_each_direction() {
        let p = policy(&allow);
        let mut sim = Sim::new();
        sim.send(A, request(A, B), &p);
        sim.send(
            A,
            SubscriptionCancelled {
                from: BareJid::new(A),
                to: BareJid::new(B),
                status: None,
            },
            &p,
        );
        assert_eq!(sim.item(A, B).unwrap().subscription, Subscription::From);
        assert_eq!(sim.item(B, A).unwrap().subscription, Subscription::To);
        assert_eq!(sim.notified(B, SubscriptionStanza::Unsubscribe), vec![A]);
        assert!(sim.effects.contains(&Effect::SendUnavailable {
            of: B.to_owned(),
            to: A.to_owned()
        }));
        // Bob revokes Alice's view of him... she has none now; Alice
        // revokes Bob's view of her.
        sim.send(
            A,
            SubscriptionDenied {
                from: BareJid::new(A),
                to: BareJid::new(B),
                status: None,
            },
            &p,
        );
        assert_eq!(sim.item(A, B).unwrap().subscription, Subscription::None);
        assert_eq!(sim.item(B, A).unwrap().subscription, Subscription::None);
        assert_eq!(sim.notified(B, SubscriptionStanza::Unsubscribed), vec![A]);
        assert_eq!(sim.rebuilt(), sim.rosters);
    }

    fn asker() -> (FullJidLike, Uuid) {
        (format!("{A}/laptop"), Uuid::nil())
    }

    type FullJidLike = String;

    fn update_req(contact: &str, remove: bool) -> RosterUpdateRequested {
        let (device, session_id) = asker();
        RosterUpdateRequested {
            user: BareJid::new(A),
            device: switchboard_schemas::FullJid::new(device),
            session_id,
            iq_id: format!("set-{contact}"),
            contact: BareJid::new(contact),
            name: Some("Friend".to_owned()),
            groups: vec!["b".to_owned(), "a".to_owned(), "a".to_owned()],
            remove,
        }
    }

    fn answers(sim: &Sim) -> Vec<(String, Answer)> {
        sim.effects
            .iter()
            .filter_map(|e| match e {
                Effect::Answer(a, answer) => Some((a.iq_id.clone(), answer.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn roster_set_keeps_subscription_and_sorts_groups() {
        let p = policy(&allow);
        let mut sim = Sim::new();
        sim.send(A, request(A, B), &p);
        sim.send(A, update_req(B, false), &p);
        let a = sim.item(A, B).unwrap();
        assert_eq!(a.subscription, both());
        assert_eq!(a.groups, vec!["a", "b"]);
        assert_eq!(a.name.as_deref(), Some("Friend"));
        assert_eq!(
            answers(&sim),
            vec![(format!("set-{B}"), Answer::Result(String::new()))]
        );
    }

    #[test]
    fn roster_remove_cancels_both_directions() {
        let p = policy(&allow);
        let mut sim = Sim::new();
        sim.send(A, request(A, B), &p);
        sim.send(A, update_req(B, true), &p);
        assert_eq!(sim.item(A, B), None);
        assert_eq!(sim.item(B, A).unwrap().subscription, Subscription::None);
        sim.send(A, update_req(C, true), &p);
        assert_eq!(
            answers(&sim),
            vec![
                (format!("set-{B}"), Answer::Result(String::new())),
                (
                    format!("set-{C}"),
                    Answer::Error("cancel", "item-not-found")
                ),
            ]
        );
        assert_eq!(sim.rebuilt(), sim.rosters);
    }

    #[test]
    fn contact_limit_is_exact_and_protects_the_full_user() {
        let small = Policy {
            max_contacts: 2,
            max_watchers: 200,
            verdict: &allow,
        };
        let mut sim = Sim::new();
        sim.send(A, update_req(B, false), &small);
        sim.send(A, update_req(C, false), &small);
        sim.send(A, update_req("dave@example.com", false), &small);
        let got: Vec<Answer> = answers(&sim).into_iter().map(|(_, a)| a).collect();
        assert_eq!(
            got,
            vec![
                Answer::Result(String::new()),
                Answer::Result(String::new()),
                Answer::Error("wait", "resource-constraint"),
            ]
        );
        // Alice is full: Erin cannot add her.
        let erin = "erin@example.com";
        sim.send(erin, request(erin, A), &small);
        assert_eq!(sim.item(A, erin), None);
        let e = sim.item(erin, A).unwrap();
        assert_eq!((e.subscription, e.ask), (Subscription::None, false));
        assert_eq!(
            sim.notified(erin, SubscriptionStanza::Unsubscribed),
            vec![A]
        );
        // An existing contact can still subscribe.
        sim.send(B, request(B, A), &small);
        assert_eq!(sim.item(A, B).unwrap().subscription, both());
    }

    #[test]
    fn query_returns_items_or_nothing_when_current() {
        let p = policy(&allow);
        let mut sim = Sim::new();
        sim.send(A, request(A, B), &p);
        let (device, session_id) = asker();
        let q = |version: Option<String>| RosterQueried {
            user: BareJid::new(A),
            device: switchboard_schemas::FullJid::new(device.clone()),
            session_id,
            iq_id: "q".to_owned(),
            version,
        };
        sim.send(A, q(None), &p);
        let version = sim.rosters.get(A).unwrap().version();
        let Some((_, Answer::Result(full))) = answers(&sim).pop() else {
            panic!("no answer");
        };
        assert_eq!(
            full,
            format!(
                "<query xmlns='jabber:iq:roster' ver='{version}'><item jid='{B}' subscription='both'/></query>"
            )
        );
        sim.send(A, q(Some(version.clone())), &p);
        assert_eq!(
            answers(&sim).pop().unwrap().1,
            Answer::Result(String::new())
        );
        sim.send(A, update_req(B, false), &p);
        assert_ne!(sim.rosters.get(A).unwrap().version(), version);
    }

    #[test]
    fn self_subscription_is_ignored() {
        let p = policy(&allow);
        let mut sim = Sim::new();
        sim.send(A, request(A, A), &p);
        assert!(sim.rosters.get(A).is_none());
        assert!(sim.effects.is_empty());
    }
}
