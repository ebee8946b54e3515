//! The router processor: a consumer-group member over the `messages` topic,
//! holding the session directory as a global table (every record of the
//! `sessions` and `presence` topics) and the offline store of the
//! recipients whose partitions it owns.
//!
//! Outputs are events: `delivery.stanza` on `deliveries` (keyed by the
//! gateway node), `message.delivered`, `message.undelivered`,
//! `message.stored_offline` and `message.bounced` on `messages` (keyed by the
//! recipient, or the sender for bounces), and for sessions of a gateway node
//! that stopped heartbeating `session.ended` and `presence.device`
//! (unavailable). Positions are committed after the outputs are durable, so
//! a crash repeats work rather than losing it; the duplicate suppression of
//! [`SeenIds`] keeps a repeated `message.submitted` from being routed twice.
//!
//! A message goes through at most two router instances: the sender's
//! partition owner routes it (`message.submitted`); when no session takes it
//! the recipient's partition owner applies the offline rules
//! (`message.undelivered` keyed by the recipient), because the recipient's
//! offline store and its limits live there. A gateway that cannot hand a
//! delivery to its session returns it the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use switchboard_infra::bus::{
    Bus, BusError, ConsumerConfig, Polled, Record, StartFrom, TopicPartition, partition_for_key,
    positions_after,
};
use switchboard_schemas::events::{
    BounceReason, DevicePresence, MessageBounced, MessageDelivered, MessageKind,
    MessageStoredOffline, MessageSubmitted, MessageUndelivered, SessionEndReason, SessionEnded,
    StanzaDelivery, UndeliveredReason,
};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{BareJid, Envelope, Event, FullJid, NodeId};
use tokio::sync::watch;

use crate::multicast::{self, MulticastError};
use crate::policy::Policies;
use crate::router::{
    ACTIVE_MAX, ActiveClients, DEDUP_MAX, DEDUP_WINDOW, Decision, OfflineStore, RECENT_MAX,
    RecentDeliveries, RecentDelivery, STICKY_MAX, SeenIds, SessionDirectory, Stickiness, Target,
    bare_of, blocked, carbons_eligible, received_copies, route_active, sent_copies,
    storable_offline, with_delay,
};
use crate::table::GlobalTable;
use crate::xml::escape;

/// Settings of the router.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Topic prefix.
    pub prefix: String,
    /// This node (producer of the router's events; part of group names).
    pub node: NodeId,
    /// Served domains.
    pub domains: Vec<String>,
    /// Whether messages for users without a session are stored (SPEC.md §7:
    /// suppressible). Off: the sender gets `service-unavailable`.
    pub offline_enabled: bool,
    /// Most messages stored per user (SPEC.md §7, default 100).
    pub offline_max_per_user: usize,
    /// Most messages stored by this router instance (the users whose
    /// partitions it owns; SPEC.md §7 "per node", default 30,000).
    pub offline_max_per_node: usize,
    /// Silence after which IM forking stickiness ends (default 10 minutes).
    pub sticky_timeout: Duration,
    /// A gateway node silent this long is down and its sessions end
    /// (default 10 s).
    pub node_timeout: Duration,
    /// How long message ids are remembered for duplicate suppression.
    pub dedup_window: Duration,
    /// Most message ids remembered for duplicate suppression.
    pub dedup_max: usize,
    /// Multiple device messaging: carbon copies (XEP-0280) to the users'
    /// other sessions (SPEC.md §7, on by default).
    pub multi_device: bool,
    /// Instant messaging for the deployment (SPEC.md §7); off: every
    /// message is refused with `service-unavailable`.
    pub im_enabled: bool,
    /// The active-client window (SPEC.md §7, default 5 minutes).
    pub active_window: Duration,
    /// Most recipients of one broadcast message (XEP-0033; SPEC.md §7
    /// broadcast IM).
    pub broadcast_max_addresses: usize,
    /// Live settings: when set, `im.*` settings replace the fields above at
    /// each batch, so `switchboard config set` applies without a restart.
    pub settings: Option<crate::settings::SettingsHandle>,
}

impl RouterConfig {
    /// The defaults of SPEC.md §7 for `domains` under `prefix`.
    pub fn new(prefix: impl Into<String>, node: NodeId, domains: Vec<String>) -> Self {
        Self {
            prefix: prefix.into(),
            node,
            domains,
            offline_enabled: true,
            offline_max_per_user: 100,
            offline_max_per_node: 30_000,
            sticky_timeout: crate::router::STICKY_TIMEOUT,
            node_timeout: Duration::from_secs(10),
            dedup_window: DEDUP_WINDOW,
            dedup_max: DEDUP_MAX,
            multi_device: true,
            im_enabled: true,
            broadcast_max_addresses: crate::multicast::DEFAULT_MAX_ADDRESSES,
            active_window: crate::router::ACTIVE_WINDOW,
            settings: None,
        }
    }
}

/// The topics the router writes.
#[derive(Clone, Copy)]
enum Out {
    Messages,
    Deliveries,
    Sessions,
    Presence,
}

struct Router {
    bus: Arc<dyn Bus>,
    config: RouterConfig,
    directory: SessionDirectory,
    offline: OfflineStore,
    seen: SeenIds,
    sticky: Stickiness,
    /// `message.stored_offline` produced but not read back yet: (recipient,
    /// sender, id). Counted against the limits until read back.
    pending_stored: BTreeSet<(String, String, String)>,
    /// Sessions a gateway handed a message back from (gone or stuck) whose
    /// end was not read yet: not chosen again meanwhile, so a message does
    /// not circle between the store and a dead session.
    gone: BTreeSet<uuid::Uuid>,
    owned: BTreeSet<i32>,
    messages_topic: String,
    deliveries_topic: String,
    sessions_topic: String,
    presence_topic: String,
    roster_topic: String,
    /// Every user's block list (XEP-0191), from the roster topic.
    blocks: Policies,
    /// Every user's active client (SPEC.md §7).
    active: ActiveClients,
    /// The time of the event being handled (decisions use event time).
    now: DateTime<Utc>,
    /// Deliveries of chat and normal messages handed to gateway nodes
    /// lately, handed back when a node is declared down.
    recent: RecentDeliveries,
    partitions: i32,
    /// Events decided but not yet produced (topic, key, value); produced
    /// together, in order, by [`Router::flush`] before positions are
    /// committed.
    outbox: Vec<(Out, String, Vec<u8>)>,
}

/// Runs the router until `shutdown` turns true.
pub async fn run(
    bus: Arc<dyn Bus>,
    config: RouterConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BusError> {
    let messages_topic = full_name(&config.prefix, Topic::Messages);
    let partitions = bus.partitions(&messages_topic).await?;
    // The roster topic is in the table for the block lists (XEP-0191):
    // a block acknowledged before a message applies to it.
    let table_topics = [
        full_name(&config.prefix, Topic::Sessions),
        full_name(&config.prefix, Topic::Presence),
        full_name(&config.prefix, Topic::Roster),
    ];
    // The global table: a group of its own per instance, read from the start.
    let mut table = GlobalTable::open(&*bus, "switchboard-router-table", &table_topics).await?;
    let mut messages = bus
        .consumer(ConsumerConfig::new(
            // Deployments sharing a cluster (other prefixes) get their own group.
            format!("{}.router", config.prefix),
            &[&messages_topic],
        ))
        .await?;
    let mut router = Router {
        deliveries_topic: full_name(&config.prefix, Topic::Deliveries),
        sessions_topic: table_topics[0].clone(),
        presence_topic: table_topics[1].clone(),
        roster_topic: table_topics[2].clone(),
        blocks: Policies::default(),
        active: ActiveClients::new(config.active_window, ACTIVE_MAX),
        now: Utc::now(),
        // Longer than a node is given to be declared down, plus its
        // heartbeat interval and some clock skew between nodes.
        recent: RecentDeliveries::new(config.node_timeout + Duration::from_secs(30), RECENT_MAX),
        bus,
        seen: SeenIds::new(config.dedup_window, config.dedup_max),
        sticky: Stickiness::new(config.sticky_timeout, STICKY_MAX),
        config,
        directory: SessionDirectory::default(),
        offline: OfflineStore::default(),
        pending_stored: BTreeSet::new(),
        gone: BTreeSet::new(),
        owned: BTreeSet::new(),
        messages_topic,
        partitions,
        outbox: Vec::new(),
    };
    let mut nodes_check = tokio::time::interval(Duration::from_secs(1));
    nodes_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            polled = table.consumer.poll(Duration::from_millis(500)) => {
                if let Polled::Records(records) = polled? {
                    if table.live() {
                        router.on_table(&records);
                    } else {
                        // History: the directory only.
                        for r in &records {
                            if let Some(envelope) = router.decode_table(r) {
                                router.directory.apply(&envelope);
                                router.blocks.apply(&envelope);
                                router.active.apply(&router.directory, &envelope);
                            }
                        }
                    }
                    if table.track(&records) {
                        tracing::info!(sessions = router.directory.len(), "router session table caught up");
                        router.release_all_offline();
                    }
                    // The table is not committed (read from the start by a
                    // group of its own); what did not go out here goes out
                    // at the user's next available presence.
                    router.flush().await;
                }
            }
            polled = messages.poll(Duration::from_millis(500)), if table.live() => {
                match polled? {
                    Polled::Records(records) => {
                        let bus = router.bus.clone();
                        table.barrier(&*bus, |records| router.on_table(records)).await?;
                        router.on_messages(&records);
                        if router.flush().await {
                            // Outputs are durable; now the inputs may be skipped.
                            if let Err(e) = messages.commit(&positions_after(&records)).await {
                                tracing::warn!(error = %e, "router commit failed; records will repeat");
                            }
                        } else {
                            // Some output was not stored: read the batch
                            // again (what was stored suppresses its repeat).
                            let mut first: BTreeMap<TopicPartition, i64> = BTreeMap::new();
                            for r in &records {
                                first.entry(r.topic_partition()).or_insert(r.offset);
                            }
                            for (tp, offset) in &first {
                                if let Err(e) = messages.seek(tp, *offset).await {
                                    tracing::error!(error = %e, "router cannot read a batch again");
                                }
                            }
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            // The memory of what was routed is the log's.
                            let owned: Vec<TopicPartition> = router
                                .owned
                                .iter()
                                .map(|p| TopicPartition::new(&router.messages_topic, *p))
                                .collect();
                            router.on_assigned(&owned).await?;
                        }
                    }
                    Polled::Assigned(tps) => router.on_assigned(&tps).await?,
                    Polled::Revoked(_) | Polled::Idle => {}
                }
            }
            _ = nodes_check.tick(), if table.live() => {
                router.end_sessions_of_dead_nodes(Utc::now());
                router.flush().await;
            }
            _ = shutdown.changed() => break,
        }
    }
    let _ = messages.close().await;
    let _ = table.consumer.close().await;
    Ok(())
}

/// An event of the log, or `None` (logged) for a record this version
/// cannot decode: processors skip it rather than stop.
pub(crate) fn decode(record: &Record) -> Option<Envelope> {
    let value = record.value.as_deref()?;
    match Envelope::from_json_slice(value) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(topic = %record.topic, offset = record.offset, error = %e, "undecodable event skipped");
            None
        }
    }
}

/// Most sessions remembered as gone before their end is read.
const MAX_GONE: usize = 10_000;

/// Chat and normal messages are never dropped once routed: their deliveries
/// name the sender so a gateway can hand them back.
fn returnable(kind: &MessageKind) -> bool {
    matches!(kind, MessageKind::Chat | MessageKind::Normal)
}

impl Router {
    fn owns(&self, bare: &str) -> bool {
        self.owned
            .contains(&partition_for_key(bare.as_bytes(), self.partitions))
    }

    /// The state of newly owned partitions is rebuilt from the log: the
    /// offline store and stickiness from the owned partitions, the
    /// duplicate memory from every partition (a sender's outcomes are keyed
    /// by its recipients).
    async fn on_assigned(&mut self, tps: &[TopicPartition]) -> Result<(), BusError> {
        self.owned = tps.iter().map(|tp| tp.partition).collect();
        self.offline.clear();
        self.seen.clear();
        self.sticky.clear();
        self.pending_stored.clear();
        if self.owned.is_empty() {
            return Ok(());
        }
        let ends = self.bus.end_offsets(&self.messages_topic).await?;
        if ends.iter().all(|e| *e == 0) {
            return Ok(());
        }
        let mut reader = self
            .bus
            .consumer(ConsumerConfig {
                start: StartFrom::Earliest,
                ..ConsumerConfig::new(
                    format!(
                        "switchboard-router-rebuild-{}",
                        uuid::Uuid::now_v7().simple()
                    ),
                    &[&self.messages_topic],
                )
            })
            .await?;
        let mut positions = vec![0i64; ends.len()];
        let caught_up =
            |positions: &[i64]| positions.iter().zip(&ends).all(|(pos, end)| pos >= end);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        let (owned, partitions) = (self.owned.clone(), self.partitions);
        let owns = |bare: &str| owned.contains(&partition_for_key(bare.as_bytes(), partitions));
        while !caught_up(&positions) && tokio::time::Instant::now() < deadline {
            if let Polled::Records(records) = reader.poll(Duration::from_millis(200)).await? {
                for r in &records {
                    let Some(slot) = positions.get_mut(r.partition as usize) else {
                        continue;
                    };
                    if r.offset >= ends[r.partition as usize] {
                        continue;
                    }
                    *slot = r.offset + 1;
                    // Most of the log is submitted messages, which no part
                    // of this state needs: not decoded.
                    if r.value
                        .as_deref()
                        .is_some_and(|v| has_type(v, "message.submitted"))
                    {
                        continue;
                    }
                    let Some(envelope) = decode(r) else { continue };
                    self.seen.apply(&envelope, owns);
                    if owned.contains(&r.partition) {
                        self.offline.apply(&envelope);
                        self.sticky.apply(&envelope);
                    }
                }
            }
        }
        if !caught_up(&positions) {
            tracing::error!("router rebuild did not reach the end of the log within 120 s");
        }
        let _ = reader.close().await;
        tracing::info!(
            stored = self.offline.total(),
            seen = self.seen.len(),
            sticky = self.sticky.len(),
            "router state rebuilt"
        );
        Ok(())
    }

    /// Issue 4 "Sessions": the sessions of gateway nodes that stopped
    /// heartbeating end. Only the owner of the user's partition emits (one
    /// instance per user); the events are applied at once, so the next check
    /// does not repeat them, and after a restart the log has them.
    fn end_sessions_of_dead_nodes(&mut self, now: DateTime<Utc>) {
        let timeout =
            chrono::Duration::from_std(self.config.node_timeout).unwrap_or(chrono::Duration::MAX);
        let stale = self.directory.stale_sessions(now, timeout);
        self.hand_back_deliveries(&stale);
        self.recent.expire(now);
        if self.owned.is_empty() {
            return;
        }
        for (full, session) in stale {
            let bare = bare_of(&full).to_owned();
            if !self.owns(&bare) {
                continue;
            }
            tracing::info!(session = %full, node = %session.node, "gateway node down: ending its session");
            let unavailable = DevicePresence {
                user: BareJid::new(bare.clone()),
                device: full.clone(),
                protocol: session.protocol.clone(),
                available: false,
                show: None,
                status: None,
                priority: session.priority,
            };
            let ended = SessionEnded {
                session_id: session.session_id,
                user: BareJid::new(bare.clone()),
                full_jid: Some(FullJid::new(full.clone())),
                protocol: session.protocol.clone(),
                reason: SessionEndReason::NodeDown,
                text: Some(format!(
                    "gateway node {} stopped heartbeating",
                    session.node
                )),
            };
            for (out, event) in [
                (Out::Presence, Event::from(unavailable)),
                (Out::Sessions, Event::from(ended)),
            ] {
                if let Some(envelope) = self.emit_to(out, &bare, event) {
                    self.directory.apply(&envelope);
                }
            }
        }
    }

    /// Issue 4 "Sessions" ([`RecentDeliveries`]): what this instance
    /// delivered to the sessions of a node declared down, since its last
    /// heartbeat less one interval (everything retained after a restart of
    /// the node), goes back to the recipients' routers. Every instance does
    /// this for its own deliveries, whoever owns the recipients.
    fn hand_back_deliveries(&mut self, stale: &[(String, crate::router::Session)]) {
        let mut gone = BTreeMap::new();
        for (_, session) in stale {
            let Some(node) = self.directory.node(&session.node) else {
                continue;
            };
            let since = if session.bound_at < node.started_at {
                DateTime::<Utc>::MIN_UTC
            } else {
                node.last_heartbeat - node.interval
            };
            gone.insert(session.session_id, since);
        }
        for d in self.recent.take(&gone) {
            tracing::info!(to = %d.to, node = %d.node, message = %d.message_id, "delivery to a node declared down handed back");
            let undelivered = MessageUndelivered {
                message_id: d.message_id,
                from: FullJid::new(d.sender),
                to: d.to.clone(),
                reason: UndeliveredReason::NodeDown,
                session_id: Some(d.session_id),
                stanza: d.stanza,
            };
            self.emit(bare_of(&d.to), undelivered);
        }
    }

    /// Sends stored messages to every owned user who is available now.
    fn release_all_offline(&mut self) {
        let users: Vec<String> = self
            .offline
            .users()
            .filter(|u| self.owns(u))
            .map(str::to_owned)
            .collect();
        for bare in users {
            if let Some(full) = self.available_session(&bare) {
                self.flush_offline(&bare, &full);
            }
        }
    }

    fn available_session(&self, bare: &str) -> Option<String> {
        self.directory
            .sessions_of(bare)
            .filter(|(_, s)| s.available && s.priority >= 0 && !self.gone.contains(&s.session_id))
            .max_by_key(|(_, s)| s.priority)
            .map(|(full, _)| full.to_owned())
    }

    /// A record of the table, decoded; of the roster topic only the block
    /// list changes (the rest is not decoded).
    fn decode_table(&self, r: &Record) -> Option<Envelope> {
        if *r.topic == *self.roster_topic
            && !r
                .value
                .as_deref()
                .is_some_and(|v| has_type(v, "roster.blocked") || has_type(v, "roster.unblocked"))
        {
            return None;
        }
        decode(r)
    }

    fn on_table(&mut self, records: &[Record]) {
        for r in records {
            let Some(envelope) = self.decode_table(r) else {
                continue;
            };
            self.now = envelope.occurred_at;
            self.blocks.apply(&envelope);
            if let Event::SessionEnded(ended) = &envelope.event {
                self.gone.remove(&ended.session_id);
            }
            let became = self.directory.apply(&envelope);
            self.active.apply(&self.directory, &envelope);
            if let Some(full) = became {
                // XEP-0160 §3: stored messages go out at available presence.
                let bare = bare_of(&full).to_owned();
                if self.owns(&bare) && !self.offline.queued(&bare).is_empty() {
                    self.flush_offline(&bare, &full);
                }
            }
        }
    }

    fn flush_offline(&mut self, bare: &str, full: &str) {
        let Some(session) = self.directory.session(full).cloned() else {
            return;
        };
        let target = Target {
            full_jid: full.to_owned(),
            node: session.node,
            session_id: session.session_id,
        };
        let domain = bare.rsplit_once('@').map_or(bare, |(_, d)| d).to_owned();
        for stored in self.offline.queued(bare).to_vec() {
            let stanza = with_delay(&stored.stanza, &domain, &stored.stamp);
            let sender = FullJid::new(stored.from.clone());
            if self.push(
                &target,
                stanza,
                Some(stored.message_id.clone()),
                Some(&sender),
            ) {
                let delivered = MessageDelivered {
                    message_id: stored.message_id.clone(),
                    from: sender,
                    to: FullJid::new(full),
                    carbon: false,
                };
                if let Some(envelope) = self.emit(bare, delivered) {
                    self.offline.apply(&envelope);
                }
            }
        }
    }

    /// Takes the current live settings (SPEC.md §7 tunables) into the
    /// configuration the decisions read.
    fn refresh_settings(&mut self) {
        let Some(handle) = &self.config.settings else {
            return;
        };
        let s = handle.borrow().clone();
        self.config.im_enabled = s.im_enabled;
        self.config.offline_enabled = s.offline_enabled;
        self.config.offline_max_per_user = s.offline_max_per_user as usize;
        self.config.offline_max_per_node = s.offline_max_per_node as usize;
        self.config.multi_device = s.multi_device_enabled;
        self.config.broadcast_max_addresses = s.broadcast_max_addresses as usize;
        let window = Duration::from_secs(s.active_client_window_secs);
        if window != self.config.active_window {
            self.config.active_window = window;
            self.active.set_window(window);
        }
        let sticky = Duration::from_secs(s.forking_stickiness_secs);
        if sticky != self.config.sticky_timeout {
            self.config.sticky_timeout = sticky;
            self.sticky.set_timeout(sticky);
        }
    }

    fn on_messages(&mut self, records: &[Record]) {
        self.refresh_settings();
        for r in records {
            let Some(envelope) = decode(r) else { continue };
            self.now = envelope.occurred_at;
            match &envelope.event {
                Event::MessageSubmitted(m) => self.on_submitted(m, &envelope),
                Event::MessageUndelivered(u) => self.on_undelivered(u),
                Event::MessageStoredOffline(s) => {
                    self.pending_stored.remove(&(
                        s.to.as_str().to_owned(),
                        bare_of(s.from.as_str()).to_owned(),
                        s.message_id.clone(),
                    ));
                    self.offline.apply(&envelope);
                    self.sticky.apply(&envelope);
                    // Stored while the recipient came online: send it now.
                    let bare = s.to.as_str().to_owned();
                    if let Some(full) = self.available_session(&bare) {
                        self.flush_offline(&bare, &full);
                    }
                }
                Event::MessageDelivered(_) => {
                    self.offline.apply(&envelope);
                    self.sticky.apply(&envelope);
                }
                _ => {}
            }
        }
    }

    fn on_submitted(&mut self, m: &MessageSubmitted, envelope: &Envelope) {
        let sender = m.from.as_str();
        if self.seen.contains(sender, &m.message_id) {
            tracing::debug!(id = %m.message_id, from = %sender, "duplicate message suppressed");
            return;
        }
        self.seen
            .insert(sender, &m.message_id, envelope.occurred_at);
        self.active.apply(&self.directory, envelope);
        if !self.config.im_enabled {
            // SPEC.md §7: IM off for the deployment; the sender is told.
            self.bounce(
                &m.message_id,
                &m.from,
                &m.to,
                &m.kind,
                (BounceReason::ImDisabled, "service-unavailable"),
                None,
            );
            return;
        }
        if !m.to.contains('@')
            && !m.to.contains('/')
            && self.config.domains.contains(&m.to)
            && m.stanza.contains(multicast::NS_ADDRESS)
        {
            self.on_multicast(m, envelope);
            return;
        }
        self.route_one(m, &m.to, &m.stanza, envelope, true);
    }

    /// SPEC.md §7 broadcast IM, XEP-0033: a message to a served domain
    /// with an address block goes to each `to`, `cc` and `bcc` address
    /// (each once, with its own copy of the stanza; see [`multicast`]),
    /// routed by the ordinary rules: each recipient's offline storage and
    /// limits apply, and errors come back per recipient. The block as a
    /// whole is refused first, with nothing delivered, when it has more
    /// recipients than `im.broadcast.max_addresses` (`not-acceptable`,
    /// XEP-0033 §8), a `uri` address (`jid-malformed`), breaks §4
    /// (`bad-request`), or names an address this server cannot deliver to
    /// (another domain, or a domain itself: `forbidden`, §5 step 5).
    /// The sender's other devices get one `<sent/>` carbon of the message
    /// as sent (its `bcc` addresses are the sender's own).
    fn on_multicast(&mut self, m: &MessageSubmitted, envelope: &Envelope) {
        if m.kind == MessageKind::Error {
            return;
        }
        let parsed = multicast::parse(&m.stanza, self.config.broadcast_max_addresses);
        let refuse = |router: &mut Self, reason: &str, condition: &'static str, text: String| {
            router.bounce(
                &m.message_id,
                &m.from,
                &m.to,
                &m.kind,
                (BounceReason::Other(reason.to_owned()), condition),
                Some(&text),
            );
        };
        let block = match parsed {
            Ok(Some(block)) => block,
            Ok(None) => {
                // Messages to the server itself are not served.
                self.bounce(
                    &m.message_id,
                    &m.from,
                    &m.to,
                    &m.kind,
                    (
                        BounceReason::Other("service_unavailable".to_owned()),
                        "service-unavailable",
                    ),
                    None,
                );
                return;
            }
            Err(e) => {
                let reason = match e {
                    MulticastError::TooMany { .. } => "too_many_addresses",
                    _ => "bad_addresses",
                };
                refuse(self, reason, e.condition(), e.to_string());
                return;
            }
        };
        let recipients = block.recipients();
        let hosted = |jid: &str| {
            let bare = bare_of(jid);
            bare.rsplit_once('@')
                .is_some_and(|(_, d)| self.config.domains.iter().any(|h| h == d))
        };
        if let Some((_, jid)) = recipients.iter().find(|(_, jid)| !hosted(jid)) {
            let text = format!("cannot deliver to {jid}: not a user of this server");
            refuse(self, "multicast_forbidden", "forbidden", text);
            return;
        }
        let mut delivered_to = Vec::new();
        for (index, jid) in recipients {
            let copy = block.copy_for(index);
            delivered_to.extend(self.route_one(m, jid, &copy, envelope, false));
        }
        if self.config.multi_device && carbons_eligible(&m.kind, m.body.is_some(), &m.stanza) {
            for (target, stanza) in sent_copies(
                &self.directory,
                m.from.as_str(),
                &m.kind,
                &m.stanza,
                &delivered_to,
            ) {
                self.push(&target, stanza, Some(m.message_id.clone()), None);
            }
        }
    }

    /// Routes message `m` to `to` as `stanza` (RFC 6121 §8.5, SPEC.md §7
    /// forking and stickiness), with its carbons: the recipient's, and the
    /// sender's when `sent_carbons`. Returns the sessions it was delivered
    /// to.
    fn route_one(
        &mut self,
        m: &MessageSubmitted,
        to: &str,
        stanza: &str,
        envelope: &Envelope,
        sent_carbons: bool,
    ) -> Vec<String> {
        let sender = m.from.as_str();
        if let Some(condition) = blocked(&self.blocks, bare_of(sender), bare_of(to)) {
            self.bounce(
                &m.message_id,
                &m.from,
                to,
                &m.kind,
                (BounceReason::Blocked, condition),
                None,
            );
            return Vec::new();
        }
        let sticky = if m.kind == MessageKind::Chat && !to.contains('/') {
            self.sticky
                .target(&self.directory, bare_of(sender), to, envelope.occurred_at)
        } else {
            None
        };
        let domains = &self.config.domains;
        let active = self.active.active(&self.directory, to, self.now);
        let decision = route_active(
            &self.directory,
            to,
            &m.kind,
            |d| domains.iter().any(|h| h == d),
            sticky.as_deref(),
            active,
        );
        let mut delivered_to = Vec::new();
        let copied = self.config.multi_device
            && carbons_eligible(&m.kind, m.body.is_some(), stanza)
            && matches!(decision, Decision::Deliver(_) | Decision::StoreOffline);
        match decision {
            Decision::Deliver(targets) => {
                let returned_to = returnable(&m.kind).then_some(&m.from);
                delivered_to = targets.iter().map(|t| t.full_jid.clone()).collect();
                for t in targets {
                    if self.push(
                        &t,
                        stanza.to_owned(),
                        Some(m.message_id.clone()),
                        returned_to,
                    ) {
                        let delivered = MessageDelivered {
                            message_id: m.message_id.clone(),
                            from: m.from.clone(),
                            to: FullJid::new(t.full_jid.clone()),
                            carbon: false,
                        };
                        self.emit(bare_of(&t.full_jid), delivered);
                    }
                }
            }
            Decision::StoreOffline if !storable_offline(m.body.is_some(), stanza) => {
                tracing::debug!(id = %m.message_id, "body-less message for nobody available dropped");
            }
            Decision::StoreOffline => {
                // The recipient's router applies the offline rules.
                let undelivered = MessageUndelivered {
                    message_id: m.message_id.clone(),
                    from: m.from.clone(),
                    to: to.to_owned(),
                    reason: UndeliveredReason::NoSession,
                    session_id: None,
                    stanza: stanza.to_owned(),
                };
                self.emit(bare_of(to), undelivered);
            }
            Decision::Drop => {
                tracing::debug!(id = %m.message_id, "message dropped per RFC 6121 §8.5");
            }
            Decision::Bounce { reason, condition } => {
                self.bounce(
                    &m.message_id,
                    &m.from,
                    to,
                    &m.kind,
                    (reason, condition),
                    None,
                );
            }
        }
        if copied {
            let mut copies =
                received_copies(&self.directory, sender, to, &m.kind, stanza, &delivered_to);
            if sent_carbons {
                copies.extend(sent_copies(
                    &self.directory,
                    sender,
                    &m.kind,
                    stanza,
                    &delivered_to,
                ));
            }
            for (target, stanza) in copies {
                self.push(&target, stanza, Some(m.message_id.clone()), None);
            }
        }
        delivered_to
    }

    /// A chat or normal message no session took (the recipient's partition
    /// is ours): another available session of the recipient gets it (the
    /// one that failed excluded), else XEP-0160 offline storage within the
    /// limits of SPEC.md §7, else an error to the sender (RFC 6120 §8.3).
    fn on_undelivered(&mut self, u: &MessageUndelivered) {
        let bare = bare_of(&u.to).to_owned();
        if u.reason != UndeliveredReason::NoSession {
            // A full queue is a slow reader, not a dead session: it may take
            // the message later (from the store, when it is read back).
            if let Some(id) = u.session_id
                && u.reason != UndeliveredReason::QueueFull
            {
                if self.gone.len() >= MAX_GONE {
                    self.gone.clear();
                }
                self.gone.insert(id);
            }
            let timeout = chrono::Duration::from_std(self.config.node_timeout)
                .unwrap_or(chrono::Duration::MAX);
            let now = Utc::now();
            // Not a session of a node that stopped heartbeating either (its
            // end may not be read yet): the message would be lost there.
            let alive = |node: &str| {
                self.directory
                    .node(node)
                    .is_none_or(|n| now - n.last_heartbeat <= timeout)
            };
            let other = self
                .directory
                .sessions_of(&bare)
                .filter(|(_, s)| {
                    s.available
                        && s.priority >= 0
                        && Some(s.session_id) != u.session_id
                        && !self.gone.contains(&s.session_id)
                        && alive(&s.node)
                })
                .max_by_key(|(_, s)| s.priority)
                .map(|(full, s)| Target {
                    full_jid: full.to_owned(),
                    node: s.node.clone(),
                    session_id: s.session_id,
                });
            if let Some(t) = other {
                if self.push(
                    &t,
                    u.stanza.clone(),
                    Some(u.message_id.clone()),
                    Some(&u.from),
                ) {
                    let delivered = MessageDelivered {
                        message_id: u.message_id.clone(),
                        from: u.from.clone(),
                        to: FullJid::new(t.full_jid.clone()),
                        carbon: false,
                    };
                    self.emit(&bare, delivered);
                }
                return;
            }
        }
        if !storable_offline(u.stanza.contains("<body"), &u.stanza) {
            return;
        }
        let sender_bare = bare_of(u.from.as_str()).to_owned();
        if self.offline.contains(&bare, u.from.as_str(), &u.message_id)
            || self.pending_stored.contains(&(
                bare.clone(),
                sender_bare.clone(),
                u.message_id.clone(),
            ))
        {
            return;
        }
        let queued = self.offline.queued(&bare).len()
            + self
                .pending_stored
                .range((bare.clone(), String::new(), String::new())..)
                .take_while(|(to, _, _)| *to == bare)
                .count();
        let total = self.offline.total() + self.pending_stored.len();
        let refusal = if !self.config.offline_enabled {
            // RFC 6121 §8.5.2.1.1 / XEP-0160 §3: no offline storage.
            Some((BounceReason::RecipientUnavailable, "service-unavailable"))
        } else if queued >= self.config.offline_max_per_user {
            // XEP-0160 §3: the recipient's offline storage is full.
            Some((BounceReason::OfflineLimit, "service-unavailable"))
        } else if total >= self.config.offline_max_per_node {
            // RFC 6120 §8.3.3.18: the server lacks the resources.
            Some((BounceReason::OfflineLimit, "resource-constraint"))
        } else {
            None
        };
        if let Some((reason, condition)) = refusal {
            self.bounce(
                &u.message_id,
                &u.from,
                &u.to,
                &MessageKind::Chat,
                (reason, condition),
                None,
            );
            return;
        }
        let stored = MessageStoredOffline {
            message_id: u.message_id.clone(),
            from: u.from.clone(),
            to: BareJid::new(bare.clone()),
            stanza: Some(u.stanza.clone()),
        };
        if self.emit(&bare, stored).is_some() {
            self.pending_stored
                .insert((bare, sender_bare, u.message_id.clone()));
        }
    }

    /// RFC 6120 §8.3: the sender's session gets the message back as an error.
    fn bounce(
        &mut self,
        message_id: &str,
        from: &FullJid,
        to: &str,
        kind: &MessageKind,
        (reason, condition): (BounceReason, &'static str),
        text: Option<&str>,
    ) {
        if *kind == MessageKind::Error {
            return;
        }
        // XEP-0191 §3.3: to a contact the sender blocks.
        let blocked_by_sender = reason == BounceReason::Blocked && condition == "not-acceptable";
        let bounced = MessageBounced {
            message_id: message_id.to_owned(),
            from: from.clone(),
            to: to.to_owned(),
            reason,
            text: text.map(str::to_owned),
        };
        self.emit(bare_of(from.as_str()), bounced);
        let Some(session) = self.directory.session(from.as_str()).cloned() else {
            return;
        };
        // RFC 6120 §8.3.3: the error type each condition usually has.
        let error_type = match condition {
            _ if blocked_by_sender => "cancel",
            "resource-constraint" => "wait",
            "not-acceptable" | "bad-request" | "jid-malformed" => "modify",
            "forbidden" => "auth",
            _ => "cancel",
        };
        let mut text = text.map_or_else(String::new, |t| {
            format!(
                "<text xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'>{}</text>",
                escape(t)
            )
        });
        if blocked_by_sender {
            text.push_str("<blocked xmlns='urn:xmpp:blocking:errors'/>");
        }
        let stanza = format!(
            "<message xmlns='jabber:client' type='error' id='{}' from='{}' to='{}'>\
             <error type='{error_type}'><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>{text}</error></message>",
            escape(message_id),
            escape(to),
            escape(from.as_str()),
        );
        let target = Target {
            full_jid: from.as_str().to_owned(),
            node: session.node,
            session_id: session.session_id,
        };
        self.push(&target, stanza, Some(message_id.to_owned()), None);
    }

    /// Queues a delivery for the gateway node holding the session.
    fn push(
        &mut self,
        target: &Target,
        stanza: String,
        message_id: Option<String>,
        sender: Option<&FullJid>,
    ) -> bool {
        let delivery = StanzaDelivery {
            session_id: target.session_id,
            to: target.full_jid.clone(),
            // The gateway of the session's protocol takes it (XMPP and SIP
            // gateways of a node read the same deliveries).
            protocol: self
                .directory
                .session(&target.full_jid)
                .filter(|s| s.session_id == target.session_id)
                .map_or(switchboard_schemas::events::Protocol::Xmpp, |s| {
                    s.protocol.clone()
                }),
            notify: stanza.contains("<body").then(|| {
                self.active
                    .notify(&self.directory, &target.full_jid, self.now)
            }),
            stanza,
            message_id,
            sender: sender.cloned(),
        };
        if let (Some(sender), Some(message_id)) = (&delivery.sender, &delivery.message_id) {
            self.recent.record(RecentDelivery {
                at: self.now,
                node: target.node.clone(),
                session_id: target.session_id,
                to: target.full_jid.clone(),
                stanza: delivery.stanza.clone(),
                message_id: message_id.clone(),
                sender: sender.as_str().to_owned(),
            });
        }
        let hint = delivery.stanza.len() + 512;
        let envelope = Envelope::new(self.config.node.clone(), target.node.clone(), delivery);
        let Some(bytes) = encode(&envelope, hint) else {
            return false;
        };
        self.outbox
            .push((Out::Deliveries, target.node.clone(), bytes));
        true
    }

    /// Produces everything queued, concurrently, in two waves: the
    /// deliveries first, then (only if they were all stored) the events that
    /// record outcomes. Returns whether everything was stored. A crash
    /// between the two leaves deliveries without their `message.delivered`
    /// (the message is routed again and the gateway drops the repeat), never
    /// a recorded outcome without its delivery, which duplicate suppression
    /// would then keep from ever being sent. The bus keeps the order of
    /// records with the same key because they are enqueued in order.
    async fn flush(&mut self) -> bool {
        if self.outbox.is_empty() {
            return true;
        }
        let mut stored = true;
        let bus = &self.bus;
        let topics = [
            &self.messages_topic,
            &self.deliveries_topic,
            &self.sessions_topic,
            &self.presence_topic,
        ];
        for deliveries in [true, false] {
            if !stored {
                // A delivery is missing: no outcome is recorded, the batch
                // is routed again (the gateway drops the repeats).
                break;
            }
            let wave = self
                .outbox
                .iter()
                .filter(|(out, _, _)| matches!(out, Out::Deliveries) == deliveries);
            let results = futures::future::join_all(wave.map(|(out, key, bytes)| {
                let topic = match out {
                    Out::Messages => topics[0],
                    Out::Deliveries => topics[1],
                    Out::Sessions => topics[2],
                    Out::Presence => topics[3],
                };
                bus.produce(topic, key.as_bytes(), Some(bytes))
            }))
            .await;
            for result in results {
                if let Err(e) = result {
                    tracing::error!(error = %e, "router output not stored");
                    stored = false;
                }
            }
        }
        self.outbox.clear();
        stored
    }

    /// Queues an event on the `messages` topic.
    fn emit(&mut self, subject: &str, event: impl Into<Event>) -> Option<Envelope> {
        self.emit_to(Out::Messages, subject, event.into())
    }

    fn emit_to(&mut self, out: Out, subject: &str, event: Event) -> Option<Envelope> {
        let envelope = Envelope::new(self.config.node.clone(), subject, event);
        let bytes = encode(&envelope, 512)?;
        self.outbox.push((out, subject.to_owned(), bytes));
        Some(envelope)
    }
}

/// Whether an encoded envelope is of `event_type`, without decoding it: the
/// envelope's `type` is its second field, after the 36-character id.
fn has_type(value: &[u8], event_type: &str) -> bool {
    let head = &value[..value.len().min(80)];
    let needle = format!("\"type\":\"{event_type}\"");
    head.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// JSON of an envelope into a buffer sized up front (`hint`): growing a
/// `Vec` from empty costs several reallocations per event on the hot path.
fn encode(envelope: &Envelope, hint: usize) -> Option<Vec<u8>> {
    let mut bytes = Vec::with_capacity(hint);
    match serde_json::to_writer(&mut bytes, envelope) {
        Ok(()) => Some(bytes),
        Err(e) => {
            tracing::error!(error = %e, event = envelope.event.event_type(), "encoding an event");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_is_read_without_decoding() {
        let e = Envelope::new(
            NodeId::new("n"),
            "a@example.com",
            MessageDelivered {
                message_id: "1".to_owned(),
                from: FullJid::new("a@example.com/r"),
                to: FullJid::new("b@example.com/r"),
                carbon: false,
            },
        );
        let bytes = encode(&e, 0).unwrap();
        assert!(has_type(&bytes, "message.delivered"));
        assert!(!has_type(&bytes, "message.submitted"));
    }
}
