//! The roster processor: a consumer-group member over the `roster` topic
//! (rosters, subscriptions, authorization policy: RFC 6121 §2-§3, SPEC.md
//! §6) that also fans composed presence out to authorized watchers (RFC
//! 6121 §4.2-§4.4).
//!
//! State:
//! * owned partitions of `roster`: [`Rosters`] and [`Policies`], rebuilt on
//!   assignment by reading each partition from the start up to the group's
//!   committed position; the group consumer then goes on from there, so
//!   every record after the last commit is decided again (at least once;
//!   the decisions are idempotent);
//! * global tables, read by a group of its own from the start: the session
//!   directory (`sessions`, `presence`) and every user's composed presence
//!   (`presence_state`).
//!
//! Item events this instance writes are applied at once and skipped when
//! they come back through the consumer; everything else it writes (forwarded
//! subscription events, approvals on a user's behalf) is an input like any
//! other.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use switchboard_infra::bus::{
    Bus, BusError, ConsumerConfig, Polled, StartFrom, TopicPartition, partition_for_key,
    positions_after,
};
use switchboard_schemas::events::{
    Availability, BlocklistChangeRequested, ComposedPresence, DeliveryTarget, PolicyBlocked,
    PolicyItem, PolicyUnblocked, PresenceDelivery, Protocol, StanzaDelivery,
};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{BareJid, Envelope, Event, NodeId};
use tokio::sync::watch;
use uuid::Uuid;

use crate::policy::{Decision, Policies, PolicyLimits};
use crate::roster::{
    Answer, Asker, Effect, Policy, Rosters, Verdict, decide, item_removed_event, item_set_event,
    item_xml,
};
use crate::router::{SessionDirectory, bare_of};
use crate::runtime::decode;
use crate::table::GlobalTable;
use crate::xml::{attr, escape, text_element};

/// Settings of the roster processor.
#[derive(Clone, Debug)]
pub struct RosterConfig {
    /// Topic prefix.
    pub prefix: String,
    /// This node (producer of the processor's events).
    pub node: NodeId,
}

const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

struct RosterProcessor {
    bus: Arc<dyn Bus>,
    config: RosterConfig,
    limits: watch::Receiver<PolicyLimits>,
    directory: SessionDirectory,
    composed: BTreeMap<String, ComposedPresence>,
    rosters: Rosters,
    policies: Policies,
    /// XEP-0054 vCards of owned users.
    vcards: BTreeMap<String, String>,
    /// RFC 6121 §4.6.3: where each session of an owned user sent directed
    /// available presence (in memory: directed presence is not replayed).
    directed: BTreeMap<String, BTreeSet<String>>,
    /// Directed presence and the unavailable presence of §4.6.3 read from
    /// the table, in order, waiting for the table to reach the ends it had
    /// when they were read (the addressee's bind and initial presence,
    /// stored before, may sit in partitions not read yet): (to, stanza).
    deferred: Vec<(String, String)>,
    owned: BTreeSet<i32>,
    partitions: i32,
    roster_topic: String,
    deliveries_topic: String,
    /// Ids of state events (items, block list) written by this instance
    /// and applied at once, not read back yet.
    own_items: HashSet<Uuid>,
    /// Records to produce (topic, key, value) before committing.
    outbox: Vec<(String, String, Vec<u8>)>,
    pushes: u64,
}

/// Runs the roster processor until `shutdown` turns true. `limits` carries
/// the deployment's live authorization settings.
pub async fn run(
    bus: Arc<dyn Bus>,
    config: RosterConfig,
    limits: watch::Receiver<PolicyLimits>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BusError> {
    let roster_topic = full_name(&config.prefix, Topic::Roster);
    let partitions = bus.partitions(&roster_topic).await?;
    let table_topics = [
        full_name(&config.prefix, Topic::Sessions),
        full_name(&config.prefix, Topic::Presence),
        full_name(&config.prefix, Topic::PresenceState),
    ];
    let mut table = GlobalTable::open(&*bus, "switchboard-roster-table", &table_topics).await?;
    let mut group = bus
        .consumer(ConsumerConfig {
            start: StartFrom::Earliest,
            ..ConsumerConfig::new(format!("{}.roster", config.prefix), &[&roster_topic])
        })
        .await?;
    let mut p = RosterProcessor {
        deliveries_topic: full_name(&config.prefix, Topic::Deliveries),
        bus,
        config,
        limits,
        directory: SessionDirectory::default(),
        composed: BTreeMap::new(),
        rosters: Rosters::default(),
        policies: Policies::default(),
        vcards: BTreeMap::new(),
        directed: BTreeMap::new(),
        deferred: Vec::new(),
        owned: BTreeSet::new(),
        partitions,
        roster_topic,
        own_items: HashSet::new(),
        outbox: Vec::new(),
        pushes: 0,
    };
    loop {
        tokio::select! {
            polled = table.consumer.poll(Duration::from_millis(500)) => {
                if let Polled::Records(records) = polled? {
                    let envelopes: Vec<Envelope> = records.iter().filter_map(decode).collect();
                    p.on_table(&envelopes, table.live());
                    if table.track(&records) {
                        tracing::info!(sessions = p.directory.len(), "roster processor tables caught up");
                    }
                    if !p.deferred.is_empty() {
                        p.barrier(&mut table).await?;
                        p.release_deferred();
                    }
                    p.flush().await?;
                }
            }
            polled = group.poll(Duration::from_millis(500)), if table.live() => {
                match polled? {
                    Polled::Records(records) => {
                        // The sessions that sent these requests are known first.
                        p.barrier(&mut table).await?;
                        p.release_deferred();
                        for r in &records {
                            if let Some(envelope) = decode(r) {
                                p.on_roster(&envelope);
                            }
                        }
                        p.flush().await?;
                        if let Err(e) = group.commit(&positions_after(&records)).await {
                            tracing::warn!(error = %e, "roster commit failed; records will repeat");
                        }
                    }
                    Polled::Assigned(tps) => {
                        let committed = group.committed(&tps).await?;
                        p.rebuild(&tps, &committed).await?;
                    }
                    Polled::Revoked(_) | Polled::Idle => {}
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    let _ = group.close().await;
    let _ = table.consumer.close().await;
    Ok(())
}

/// RFC 6121 §4.2-§4.4: the presence stanza a watcher receives for a
/// composed presence, from the user's bare address.
pub fn presence_stanza(composed: &ComposedPresence, to: &str) -> String {
    stanza_of(composed, Some(to))
}

/// [`presence_stanza`] without the `to` attribute, for a
/// [`PresenceDelivery`] (the gateway adds each target's).
pub fn presence_template(composed: &ComposedPresence) -> String {
    stanza_of(composed, None)
}

fn stanza_of(composed: &ComposedPresence, to: Option<&str>) -> String {
    let mut s = String::from("<presence");
    attr(&mut s, "from", composed.user.as_str());
    if let Some(to) = to {
        attr(&mut s, "to", to);
    }
    if composed.availability == Availability::Unavailable {
        s.push_str(" type='unavailable'/>");
        return s;
    }
    s.push('>');
    if let Some(show) = &composed.show {
        text_element(&mut s, "show", show.as_str());
    }
    if let Some(status) = &composed.status {
        text_element(&mut s, "status", status);
    }
    s.push_str("</presence>");
    s
}

impl RosterProcessor {
    /// Reads the table up to the ends it has now ([`GlobalTable::barrier`]),
    /// folding what it reads.
    async fn barrier(&mut self, table: &mut GlobalTable) -> Result<(), BusError> {
        let bus = self.bus.clone();
        table
            .barrier(&*bus, |records| {
                let envelopes: Vec<Envelope> = records.iter().filter_map(decode).collect();
                self.on_table(&envelopes, true);
            })
            .await
    }

    fn owns(&self, bare: &str) -> bool {
        self.owned
            .contains(&partition_for_key(bare.as_bytes(), self.partitions))
    }

    /// Reads the newly assigned partitions from the start up to the group's
    /// committed positions; the consumer resumes after those.
    async fn rebuild(
        &mut self,
        tps: &[TopicPartition],
        committed: &[Option<i64>],
    ) -> Result<(), BusError> {
        self.owned = tps.iter().map(|tp| tp.partition).collect();
        self.rosters = Rosters::default();
        self.policies = Policies::default();
        self.vcards.clear();
        self.own_items.clear();
        let ends: BTreeMap<i32, i64> = tps
            .iter()
            .zip(committed)
            .filter_map(|(tp, c)| c.filter(|c| *c > 0).map(|c| (tp.partition, c)))
            .collect();
        if ends.is_empty() {
            return Ok(());
        }
        let mut reader = self
            .bus
            .consumer(ConsumerConfig {
                start: StartFrom::Earliest,
                ..ConsumerConfig::new(
                    format!("switchboard-roster-rebuild-{}", Uuid::now_v7().simple()),
                    &[&self.roster_topic],
                )
            })
            .await?;
        let mut positions: BTreeMap<i32, i64> = ends.keys().map(|p| (*p, 0)).collect();
        let caught_up =
            |positions: &BTreeMap<i32, i64>| ends.iter().all(|(p, end)| positions[p] >= *end);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !caught_up(&positions) && tokio::time::Instant::now() < deadline {
            if let Polled::Records(records) = reader.poll(Duration::from_millis(200)).await? {
                for r in &records {
                    let Some(end) = ends.get(&r.partition) else {
                        continue;
                    };
                    if r.offset >= *end {
                        continue;
                    }
                    positions.insert(r.partition, r.offset + 1);
                    if let Some(envelope) = decode(r) {
                        self.fold(&envelope);
                    }
                }
            }
        }
        if !caught_up(&positions) {
            tracing::error!("roster rebuild did not reach the committed positions within 120 s");
        }
        let _ = reader.close().await;
        tracing::info!(users = self.rosters.users().count(), "roster state rebuilt");
        Ok(())
    }

    /// A batch of table records: first every state change (the records of
    /// one batch come partition by partition, not in production order), then
    /// what they cause, so that an action sees the sessions and presence of
    /// the whole batch.
    fn on_table(&mut self, envelopes: &[Envelope], live: bool) {
        let mut available = Vec::new();
        for envelope in envelopes {
            if let Event::ComposedPresence(composed) = &envelope.event {
                self.composed
                    .insert(composed.user.as_str().to_owned(), composed.clone());
            } else if let Some(full) = self.directory.apply(envelope) {
                available.push(full);
            }
        }
        if !live {
            return;
        }
        let mut fanned = BTreeSet::new();
        for envelope in envelopes {
            match &envelope.event {
                Event::ComposedPresence(composed) => {
                    let user = composed.user.as_str().to_owned();
                    if self.owns(&user) && fanned.insert(user.clone()) {
                        self.fan_out(&user);
                    }
                }
                Event::DirectedPresence(d) if self.owns(bare_of(d.from.as_str())) => {
                    self.directed_presence(d);
                }
                Event::SessionEnded(ended) => {
                    if let Some(full) = &ended.full_jid
                        && let Some(targets) = self.directed.remove(full.as_str())
                    {
                        for to in targets {
                            let stanza = unavailable(full.as_str(), &to);
                            self.deferred.push((to, stanza));
                        }
                    }
                }
                _ => {}
            }
        }
        for full in available {
            let bare = bare_of(&full).to_owned();
            if self.owns(&bare) {
                self.on_available(&bare, &full);
            }
        }
    }

    /// RFC 6121 §4.2.1-§4.2.2: a session's initial presence gets the
    /// presence of every contact the user sees, and the subscription
    /// requests still waiting for an answer (§3.1.3).
    fn on_available(&mut self, bare: &str, full: &str) {
        let Some(roster) = self.rosters.get(bare) else {
            return;
        };
        let sharing = self.limits.borrow().availability_sharing;
        let mut stanzas = Vec::new();
        if sharing {
            for contact in roster.watched() {
                if let Some(c) = self.composed.get(contact)
                    && c.availability != Availability::Unavailable
                {
                    stanzas.push(presence_stanza(c, full));
                }
            }
        }
        for (from, status) in &roster.pending_in {
            stanzas.push(subscription_stanza(
                from,
                full,
                "subscribe",
                status.as_deref(),
            ));
        }
        if let Some(session) = self.directory.session(full).cloned() {
            for stanza in stanzas {
                self.deliver(&session.node, session.session_id, full, stanza);
            }
        }
    }

    /// RFC 6121 §4.6.2: directed presence goes to the addressee's session
    /// (full JID) or available sessions (bare JID); the addressees of
    /// available presence are remembered for §4.6.3. The delivery waits in
    /// `deferred` for the table's barrier: the topics' partitions are read
    /// in no order between them, so the addressee's bind or initial
    /// presence, stored before the directed presence was sent, can still be
    /// unread.
    fn directed_presence(&mut self, d: &switchboard_schemas::events::DirectedPresence) {
        let from = d.from.as_str().to_owned();
        if d.available {
            self.directed
                .entry(from.clone())
                .or_default()
                .insert(d.to.clone());
        } else if let Some(targets) = self.directed.get_mut(&from) {
            targets.remove(&d.to);
        }
        self.deferred.push((d.to.clone(), d.stanza.clone()));
    }

    /// Delivers the deferred directed presence, in the order read; the
    /// caller has read the table to the ends it had after they were read.
    fn release_deferred(&mut self) {
        for (to, stanza) in std::mem::take(&mut self.deferred) {
            self.presence_to(&to, &stanza);
        }
    }

    /// Delivers `stanza` to `to`: that session for a full JID, every
    /// available session for a bare one.
    fn presence_to(&mut self, to: &str, stanza: &str) {
        let targets: Vec<(String, Uuid, String)> = if to.contains('/') {
            self.directory
                .session(to)
                .map(|s| (s.node.clone(), s.session_id, to.to_owned()))
                .into_iter()
                .collect()
        } else {
            self.directory
                .sessions_of(to)
                .filter(|(_, s)| s.available)
                .map(|(full, s)| (s.node.clone(), s.session_id, full.to_owned()))
                .collect()
        };
        for (node, session_id, full) in targets {
            self.deliver(&node, session_id, &full, stanza.to_owned());
        }
    }

    /// RFC 6121 §4.2.2 and §4.4.2: a user's composed presence goes to every
    /// watcher's available sessions; what each sees follows the user's
    /// policy (a blocked watcher sees unavailable).
    fn fan_out(&mut self, user: &str) {
        let Some(composed) = self.composed.get(user).cloned() else {
            return;
        };
        let Some(roster) = self.rosters.get(user) else {
            return;
        };
        let limits = self.limits.borrow().clone();
        let policy = self.policies.get(&composed.user);
        // One delivery per gateway node and stanza variant (what a blocked
        // watcher sees differs), each listing its sessions.
        let mut out: BTreeMap<(String, String), Vec<DeliveryTarget>> = BTreeMap::new();
        for watcher in roster.watchers() {
            let shown = policy.visible(&limits, &composed, &BareJid::new(watcher), true);
            let mut template = None;
            for (full, session) in self.directory.sessions_of(watcher) {
                // SIP watchers get NOTIFYs from their own subscriptions.
                if session.available && session.protocol == Protocol::Xmpp {
                    let stanza = template
                        .get_or_insert_with(|| presence_template(&shown))
                        .clone();
                    out.entry((session.node.clone(), stanza))
                        .or_default()
                        .push(DeliveryTarget {
                            session_id: session.session_id,
                            to: full.to_owned(),
                        });
                }
            }
        }
        for ((node, stanza), targets) in out {
            let delivery = PresenceDelivery { stanza, targets };
            let envelope = Envelope::new(self.config.node.clone(), node.as_str(), delivery);
            let topic = self.deliveries_topic.clone();
            self.queue(&topic, &node, &envelope);
        }
    }

    /// Folds an event of an owned partition into the state.
    fn fold(&mut self, envelope: &Envelope) {
        self.rosters.apply(envelope);
        self.policies.apply(envelope);
        if let Event::VcardSet(v) = &envelope.event {
            self.vcards
                .insert(v.user.as_str().to_owned(), v.vcard.clone());
        }
    }

    fn on_roster(&mut self, envelope: &Envelope) {
        if matches!(
            envelope.event,
            Event::RosterItemSet(_)
                | Event::RosterItemRemoved(_)
                | Event::PolicyBlocked(_)
                | Event::PolicyUnblocked(_)
        ) && self.own_items.remove(&envelope.id)
        {
            return;
        }
        match &envelope.event {
            Event::VcardQueried(q) => {
                // XEP-0054 §3.1: no vCard is an empty one.
                let vcard = self
                    .vcards
                    .get(q.owner.as_str())
                    .cloned()
                    .unwrap_or_else(|| "<vCard xmlns='vcard-temp'/>".to_owned());
                let asker = Asker {
                    node: envelope.node.as_str().to_owned(),
                    session_id: q.session_id,
                    device: q.device.as_str().to_owned(),
                    iq_id: q.iq_id.clone(),
                };
                self.answer(&asker, Answer::Result(vcard));
                return;
            }
            Event::BlocklistQueried(q) => {
                let mut payload = String::from("<blocklist xmlns='urn:xmpp:blocking'>");
                for item in self.policies.get(&q.user).blocked() {
                    payload.push_str("<item");
                    attr(&mut payload, "jid", policy_jid(item));
                    payload.push_str("/>");
                }
                payload.push_str("</blocklist>");
                let asker = Asker {
                    node: envelope.node.as_str().to_owned(),
                    session_id: q.session_id,
                    device: q.device.as_str().to_owned(),
                    iq_id: q.iq_id.clone(),
                };
                self.answer(&asker, Answer::Result(payload));
                return;
            }
            Event::BlocklistChangeRequested(c) => {
                self.change_blocklist(envelope, c);
                return;
            }
            _ => {}
        }
        let limits = self.limits.borrow().clone();
        let policies = &self.policies;
        let verdict = |owner: &str, watcher: &str| match policies
            .get(&BareJid::new(owner))
            .decide(&limits, &BareJid::new(watcher))
        {
            Decision::Approve => Verdict::Allow,
            Decision::Ask => Verdict::Ask,
            Decision::Deny => Verdict::Block,
        };
        let policy = Policy {
            max_contacts: limits.max_contacts as usize,
            max_watchers: limits.max_watchers as usize,
            verdict: &verdict,
        };
        let effects = decide(&self.rosters, envelope, &policy);
        self.fold(envelope);
        for effect in effects {
            self.effect(envelope, effect);
        }
    }

    fn effect(&mut self, cause: &Envelope, effect: Effect) {
        match effect {
            Effect::SetItem {
                owner,
                contact,
                item,
            } => {
                self.rosters.set_item(&owner, &contact, item.clone());
                let event = item_set_event(&owner, &contact, &item);
                self.emit_item(cause, &owner, event.into());
                let mut payload = String::new();
                item_xml(&mut payload, &contact, Some(&item));
                self.push(cause, &owner, &payload);
            }
            Effect::RemoveItem { owner, contact } => {
                self.rosters.remove_item(&owner, &contact);
                self.emit_item(cause, &owner, item_removed_event(&owner, &contact).into());
                let mut payload = String::new();
                item_xml(&mut payload, &contact, None);
                self.push(cause, &owner, &payload);
            }
            Effect::Emit { key, event } => {
                let envelope =
                    Envelope::caused_by(cause, self.config.node.clone(), key.clone(), event);
                self.queue(&self.roster_topic.clone(), &key, &envelope);
            }
            Effect::Notify {
                to,
                from,
                kind,
                status,
            } => {
                self.send_to_available(&to, |full| {
                    subscription_stanza(&from, full, kind.as_str(), status.as_deref())
                });
            }
            Effect::SendPresence { of, to } => {
                if let Some(composed) = self.composed.get(&of).cloned()
                    && composed.availability != Availability::Unavailable
                    && self.limits.borrow().availability_sharing
                {
                    self.send_to_available(&to, |full| presence_stanza(&composed, full));
                }
            }
            Effect::SendUnavailable { of, to } => {
                self.send_to_available(&to, |full| unavailable(&of, full));
            }
            Effect::RefuseRequest {
                to,
                contact,
                condition,
            } => {
                self.send_to_available(&to, |full| {
                    let mut s = String::from("<presence type='error'");
                    attr(&mut s, "from", &contact);
                    attr(&mut s, "to", full);
                    s.push_str(&format!(
                        "><error type='wait'><{condition} xmlns='{NS_STANZAS}'/></error></presence>"
                    ));
                    s
                });
            }
            Effect::Answer(asker, answer) => self.answer(&asker, answer),
        }
    }

    /// XEP-0191 §3.3-§3.5: blocks or unblocks, answers the asking session,
    /// pushes the change to the user's sessions; a newly blocked user gets
    /// unavailable presence, a newly unblocked one the current presence.
    fn change_blocklist(&mut self, cause: &Envelope, c: &BlocklistChangeRequested) {
        let policy = self.policies.get(&c.user).clone();
        let items: Vec<PolicyItem> = if c.block {
            c.items
                .iter()
                .filter(|i| !policy.blocked().contains(*i))
                .cloned()
                .collect()
        } else if c.items.is_empty() {
            policy.blocked().iter().cloned().collect()
        } else {
            c.items
                .iter()
                .filter(|i| policy.blocked().contains(*i))
                .cloned()
                .collect()
        };
        let user = c.user.as_str().to_owned();
        for item in &items {
            let event: Event = if c.block {
                PolicyBlocked {
                    user: c.user.clone(),
                    item: item.clone(),
                }
                .into()
            } else {
                PolicyUnblocked {
                    user: c.user.clone(),
                    item: item.clone(),
                }
                .into()
            };
            let envelope =
                Envelope::caused_by(cause, self.config.node.clone(), user.clone(), event);
            self.policies.apply(&envelope);
            self.own_items.insert(envelope.id);
            let topic = self.roster_topic.clone();
            self.queue(&topic, &user, &envelope);
        }
        let asker = Asker {
            node: cause.node.as_str().to_owned(),
            session_id: c.session_id,
            device: c.device.as_str().to_owned(),
            iq_id: c.iq_id.clone(),
        };
        self.answer(&asker, Answer::Result(String::new()));
        if items.is_empty() {
            return;
        }
        let element = if c.block { "block" } else { "unblock" };
        let mut payload = format!("<{element} xmlns='urn:xmpp:blocking'>");
        for item in &items {
            payload.push_str("<item");
            attr(&mut payload, "jid", policy_jid(item));
            payload.push_str("/>");
        }
        payload.push_str(&format!("</{element}>"));
        self.push_iq(cause, &user, &payload);
        if c.block {
            for item in &items {
                if let PolicyItem::User(blocked) = item {
                    let (of, to) = (user.clone(), blocked.as_str().to_owned());
                    self.effect(cause, Effect::SendUnavailable { of, to });
                }
            }
        } else {
            self.fan_out(&user);
        }
    }

    /// RFC 6120 §8.2.3: the iq result or error for a client's request.
    fn answer(&mut self, asker: &Asker, answer: Answer) {
        let mut s = String::from("<iq");
        attr(&mut s, "to", &asker.device);
        attr(&mut s, "id", &asker.iq_id);
        match answer {
            Answer::Result(payload) if payload.is_empty() => s.push_str(" type='result'/>"),
            Answer::Result(payload) => {
                s.push_str(" type='result'>");
                s.push_str(&payload);
                s.push_str("</iq>");
            }
            Answer::Error(kind, condition) => s.push_str(&format!(
                " type='error'><error type='{kind}'><{condition} xmlns='{NS_STANZAS}'/></error></iq>"
            )),
        }
        self.deliver(&asker.node, asker.session_id, &asker.device, s);
    }

    /// RFC 6121 §2.1.6: a roster push to every session of the owner.
    fn push(&mut self, cause: &Envelope, owner: &str, item: &str) {
        let version = self
            .rosters
            .get(owner)
            .map(|r| r.version())
            .unwrap_or_default();
        let payload = format!(
            "<query xmlns='jabber:iq:roster' ver='{}'>{item}</query>",
            escape(&version)
        );
        self.push_iq(cause, owner, &payload);
    }

    /// An `<iq type='set'/>` push of `payload` to every session of `owner`,
    /// including the one whose request caused it even when the session
    /// table has not read its bind yet (the tables and the `roster` topic
    /// are read by different consumers).
    fn push_iq(&mut self, cause: &Envelope, owner: &str, payload: &str) {
        let mut targets: Vec<(String, Uuid, String)> = self
            .directory
            .sessions_of(owner)
            .map(|(full, s)| (s.node.clone(), s.session_id, full.to_owned()))
            .collect();
        let asker = match &cause.event {
            Event::RosterUpdateRequested(r) => Some((r.session_id, r.device.as_str())),
            Event::BlocklistChangeRequested(r) => Some((r.session_id, r.device.as_str())),
            _ => None,
        };
        if let Some((session_id, device)) = asker
            && bare_of(device) == owner
            && !targets.iter().any(|(_, id, _)| *id == session_id)
        {
            targets.push((
                cause.node.as_str().to_owned(),
                session_id,
                device.to_owned(),
            ));
        }
        for (node, session_id, full) in targets {
            self.pushes += 1;
            let mut s = String::from("<iq type='set'");
            attr(&mut s, "to", &full);
            attr(&mut s, "id", &format!("push-{}", self.pushes));
            s.push('>');
            s.push_str(payload);
            s.push_str("</iq>");
            self.deliver(&node, session_id, &full, s);
        }
    }

    fn send_to_available(&mut self, bare: &str, stanza: impl Fn(&str) -> String) {
        let targets: Vec<(String, Uuid, String)> = self
            .directory
            .sessions_of(bare)
            .filter(|(_, s)| s.available)
            .map(|(full, s)| (s.node.clone(), s.session_id, full.to_owned()))
            .collect();
        for (node, session_id, full) in targets {
            let s = stanza(&full);
            self.deliver(&node, session_id, &full, s);
        }
    }

    fn deliver(&mut self, node: &str, session_id: Uuid, to: &str, stanza: String) {
        let delivery = StanzaDelivery {
            session_id,
            to: to.to_owned(),
            protocol: Protocol::Xmpp,
            stanza,
            message_id: None,
            sender: None,
            notify: None,
        };
        let envelope = Envelope::new(self.config.node.clone(), node, delivery);
        let topic = self.deliveries_topic.clone();
        self.queue(&topic, node, &envelope);
    }

    fn emit_item(&mut self, cause: &Envelope, owner: &str, event: Event) {
        let envelope = Envelope::caused_by(cause, self.config.node.clone(), owner, event);
        self.own_items.insert(envelope.id);
        let topic = self.roster_topic.clone();
        self.queue(&topic, owner, &envelope);
    }

    fn queue(&mut self, topic: &str, key: &str, envelope: &Envelope) {
        match envelope.to_json_vec() {
            Ok(bytes) => self.outbox.push((topic.to_owned(), key.to_owned(), bytes)),
            Err(e) => tracing::error!(error = %e, "encoding an event"),
        }
    }

    /// Produces everything queued, in order per key, before positions are
    /// committed. A record that fails is retried; one that keeps failing
    /// stops the processor with the inputs uncommitted, so they repeat at
    /// the next start instead of being lost.
    async fn flush(&mut self) -> Result<(), BusError> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        let outbox = std::mem::take(&mut self.outbox);
        let bus = &self.bus;
        let results = futures::future::join_all(
            outbox
                .iter()
                .map(|(topic, key, value)| bus.produce(topic, key.as_bytes(), Some(value))),
        )
        .await;
        for ((topic, key, value), result) in outbox.iter().zip(results) {
            let mut result = result.map(|_| ());
            let mut attempt = 0;
            while let Err(e) = &result {
                attempt += 1;
                if attempt > 5 || !e.is_retriable() {
                    tracing::error!(error = %e, topic, "roster output not stored");
                    return result;
                }
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                result = bus
                    .produce(topic, key.as_bytes(), Some(value))
                    .await
                    .map(|_| ());
            }
        }
        Ok(())
    }
}

/// `<presence type='unavailable'/>` from `from` to `to`.
fn unavailable(from: &str, to: &str) -> String {
    let mut s = String::from("<presence");
    attr(&mut s, "from", from);
    attr(&mut s, "to", to);
    s.push_str(" type='unavailable'/>");
    s
}

/// The JID an XEP-0191 item names: a user's bare JID or a domain.
fn policy_jid(item: &PolicyItem) -> &str {
    match item {
        PolicyItem::User(user) => user.as_str(),
        PolicyItem::Domain(domain) => domain,
    }
}

fn subscription_stanza(from: &str, to: &str, kind: &str, status: Option<&str>) -> String {
    let mut s = String::from("<presence");
    attr(&mut s, "from", from);
    attr(&mut s, "to", to);
    attr(&mut s, "type", kind);
    match status {
        Some(status) => {
            s.push('>');
            text_element(&mut s, "status", status);
            s.push_str("</presence>");
        }
        None => s.push_str("/>"),
    }
    s
}
