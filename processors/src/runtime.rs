//! The router processor: a consumer-group member over the `messages` topic,
//! holding the session directory as a global table (every record of the
//! `sessions` and `presence` topics) and the offline store of the
//! recipients whose partitions it owns.
//!
//! Outputs are events: `delivery.stanza` on `deliveries` (keyed by the
//! gateway node), `message.delivered`, `message.stored_offline` and
//! `message.bounced` on `messages` (keyed by the recipient, or the sender
//! for bounces). Positions are committed after the outputs are durable, so a
//! crash repeats work rather than losing it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use switchboard_infra::bus::{
    Bus, BusError, ConsumerConfig, Polled, Record, StartFrom, TopicPartition, partition_for_key,
    positions_after,
};
use switchboard_schemas::events::{
    BounceReason, MessageBounced, MessageDelivered, MessageKind, MessageStoredOffline, Protocol,
    StanzaDelivery,
};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{BareJid, Envelope, Event, FullJid, NodeId};
use tokio::sync::watch;

use crate::router::{Decision, OfflineStore, SessionDirectory, Target, bare_of, route, with_delay};

/// Settings of the router.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Topic prefix.
    pub prefix: String,
    /// This node (producer of the router's events; part of group names).
    pub node: NodeId,
    /// Served domains.
    pub domains: Vec<String>,
    /// Most messages stored per user (SPEC.md §7, default 100).
    pub offline_max_per_user: usize,
}

/// The topics the router writes.
#[derive(Clone, Copy)]
enum Out {
    Messages,
    Deliveries,
}

struct Router {
    bus: Arc<dyn Bus>,
    config: RouterConfig,
    directory: SessionDirectory,
    offline: OfflineStore,
    owned: BTreeSet<i32>,
    messages_topic: String,
    deliveries_topic: String,
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
    let table_topics = [
        full_name(&config.prefix, Topic::Sessions),
        full_name(&config.prefix, Topic::Presence),
    ];
    let table_refs: Vec<&str> = table_topics.iter().map(String::as_str).collect();
    // The global table: a group of its own per instance, read from the start.
    let mut table = bus
        .consumer(ConsumerConfig::new(
            format!("switchboard-router-table-{}", uuid::Uuid::now_v7().simple()),
            &table_refs,
        ))
        .await?;
    let mut messages = bus
        .consumer(ConsumerConfig::new(
            // Deployments sharing a cluster (other prefixes) get their own group.
            format!("{}.router", config.prefix),
            &[&messages_topic],
        ))
        .await?;
    // The table is "live" once read to the end it had at start: before
    // that it replays history (old sessions, long gone), which must neither
    // route messages nor release stored ones.
    let mut table_ends = Vec::new();
    for topic in &table_topics {
        for (partition, end) in bus.end_offsets(topic).await?.into_iter().enumerate() {
            if end > 0 {
                table_ends.push((TopicPartition::new(topic, partition as i32), end));
            }
        }
    }
    let mut router = Router {
        deliveries_topic: full_name(&config.prefix, Topic::Deliveries),
        bus,
        config,
        directory: SessionDirectory::default(),
        offline: OfflineStore::default(),
        owned: BTreeSet::new(),
        messages_topic,
        partitions,
        outbox: Vec::new(),
    };
    let mut live = table_ends.is_empty();
    loop {
        tokio::select! {
            polled = table.poll(Duration::from_millis(500)) => {
                if let Polled::Records(records) = polled? {
                    if live {
                        router.on_table(&records).await;
                    } else {
                        for r in &records {
                            if let Some(envelope) = decode(r) {
                                router.directory.apply(&envelope);
                            }
                        }
                        let read = positions_after(&records);
                        table_ends.retain(|(tp, end)| {
                            !read.iter().any(|(t, position)| t == tp && position >= end)
                        });
                        if table_ends.is_empty() {
                            live = true;
                            tracing::info!(sessions = router.directory.len(), "router session table caught up");
                            router.release_all_offline().await;
                        }
                    }
                    router.flush().await;
                }
            }
            polled = messages.poll(Duration::from_millis(500)), if live => {
                match polled? {
                    Polled::Records(records) => {
                        router.on_messages(&records).await;
                        router.flush().await;
                        // Outputs are durable; now the inputs may be skipped.
                        if let Err(e) = messages.commit(&positions_after(&records)).await {
                            tracing::warn!(error = %e, "router commit failed; records will repeat");
                        }
                    }
                    Polled::Assigned(tps) => router.on_assigned(&tps).await?,
                    Polled::Revoked(_) | Polled::Idle => {}
                }
            }
            _ = shutdown.changed() => break,
        }
    }
    let _ = messages.close().await;
    let _ = table.close().await;
    Ok(())
}

fn decode(record: &Record) -> Option<Envelope> {
    let value = record.value.as_deref()?;
    match Envelope::from_json_slice(value) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(topic = %record.topic, offset = record.offset, error = %e, "undecodable event skipped");
            None
        }
    }
}

impl Router {
    fn owns(&self, bare: &str) -> bool {
        self.owned
            .contains(&partition_for_key(bare.as_bytes(), self.partitions))
    }

    /// The offline store of newly owned partitions is rebuilt from the log.
    async fn on_assigned(&mut self, tps: &[TopicPartition]) -> Result<(), BusError> {
        self.owned = tps.iter().map(|tp| tp.partition).collect();
        let owned = self.owned.clone();
        let partitions = self.partitions;
        self.offline
            .retain(|user| owned.contains(&partition_for_key(user.as_bytes(), partitions)));
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
        let caught_up = |positions: &[i64]| {
            positions
                .iter()
                .zip(&ends)
                .enumerate()
                .all(|(p, (pos, end))| !owned.contains(&(p as i32)) || pos >= end)
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        while !caught_up(&positions) && tokio::time::Instant::now() < deadline {
            if let Polled::Records(records) = reader.poll(Duration::from_millis(200)).await? {
                for r in &records {
                    positions[r.partition as usize] = r.offset + 1;
                    if owned.contains(&r.partition)
                        && let Some(envelope) = decode(r)
                    {
                        self.offline.apply(&envelope);
                    }
                }
            }
        }
        let _ = reader.close().await;
        tracing::info!(
            stored = self.offline.total(),
            "router offline store rebuilt"
        );
        Ok(())
    }

    /// Sends stored messages to every owned user who is available now.
    async fn release_all_offline(&mut self) {
        let users: Vec<String> = self
            .offline
            .users()
            .filter(|u| self.owns(u))
            .map(str::to_owned)
            .collect();
        for bare in users {
            let available = self
                .directory
                .sessions_of(&bare)
                .find(|(_, s)| s.available && s.priority >= 0)
                .map(|(full, _)| full.to_owned());
            if let Some(full) = available {
                self.flush_offline(&bare, &full).await;
            }
        }
    }

    async fn on_table(&mut self, records: &[Record]) {
        for r in records {
            let Some(envelope) = decode(r) else { continue };
            if let Some(full) = self.directory.apply(&envelope) {
                // XEP-0160 §3: stored messages go out at available presence.
                let bare = bare_of(&full).to_owned();
                if self.owns(&bare) && !self.offline.queued(&bare).is_empty() {
                    self.flush_offline(&bare, &full).await;
                }
            }
        }
    }

    async fn flush_offline(&mut self, bare: &str, full: &str) {
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
            if self.push(&target, stanza, Some(stored.message_id.clone())) {
                let delivered = MessageDelivered {
                    message_id: stored.message_id.clone(),
                    from: FullJid::new(stored.from.clone()),
                    to: FullJid::new(full),
                    carbon: false,
                };
                if let Some(envelope) = self.emit(bare, delivered) {
                    self.offline.apply(&envelope);
                }
            }
        }
    }

    async fn on_messages(&mut self, records: &[Record]) {
        for r in records {
            let Some(envelope) = decode(r) else { continue };
            match &envelope.event {
                Event::MessageSubmitted(m) => self.on_submitted(m, &envelope).await,
                Event::MessageStoredOffline(_) | Event::MessageDelivered(_) => {
                    self.offline.apply(&envelope);
                    // Stored while the recipient came online: send it now.
                    if let Event::MessageStoredOffline(s) = &envelope.event {
                        let bare = s.to.as_str().to_owned();
                        let available = self
                            .directory
                            .sessions_of(&bare)
                            .find(|(_, s)| s.available && s.priority >= 0)
                            .map(|(full, _)| full.to_owned());
                        if let Some(full) = available {
                            self.flush_offline(&bare, &full).await;
                        }
                    }
                }
                _ => {}
            }
        }
    }

    async fn on_submitted(
        &mut self,
        m: &switchboard_schemas::events::MessageSubmitted,
        envelope: &Envelope,
    ) {
        let domains = &self.config.domains;
        let decision = route(&self.directory, &m.to, &m.kind, |d| {
            domains.iter().any(|h| h == d)
        });
        match decision {
            Decision::Deliver(targets) => {
                for t in targets {
                    if self.push(&t, m.stanza.clone(), Some(m.message_id.clone())) {
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
            Decision::StoreOffline => {
                let bare = bare_of(&m.to).to_owned();
                if self.owns(&bare)
                    && self.offline.queued(&bare).len() >= self.config.offline_max_per_user
                {
                    self.bounce(m, BounceReason::OfflineLimit, "resource-constraint")
                        .await;
                    return;
                }
                let stored = MessageStoredOffline {
                    message_id: m.message_id.clone(),
                    from: m.from.clone(),
                    to: BareJid::new(bare.clone()),
                    stanza: Some(m.stanza.clone()),
                };
                self.emit(&bare, stored);
            }
            Decision::Drop => {
                tracing::debug!(id = %m.message_id, "message dropped per RFC 6121 §8.5");
            }
            Decision::Bounce { reason, condition } => self.bounce(m, reason, condition).await,
        }
        let _ = envelope;
    }

    /// RFC 6120 §8.3: the sender's session gets the message back as an error.
    async fn bounce(
        &mut self,
        m: &switchboard_schemas::events::MessageSubmitted,
        reason: BounceReason,
        condition: &'static str,
    ) {
        if m.kind == MessageKind::Error {
            return;
        }
        let bounced = MessageBounced {
            message_id: m.message_id.clone(),
            from: m.from.clone(),
            to: m.to.clone(),
            reason,
            text: None,
        };
        self.emit(bare_of(m.from.as_str()), bounced);
        let Some(session) = self.directory.session(m.from.as_str()).cloned() else {
            return;
        };
        let stanza = format!(
            "<message xmlns='jabber:client' type='error' id='{}' from='{}' to='{}'>\
             <error type='cancel'><{condition} xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>",
            escape(&m.message_id),
            escape(&m.to),
            escape(m.from.as_str()),
        );
        let target = Target {
            full_jid: m.from.as_str().to_owned(),
            node: session.node,
            session_id: session.session_id,
        };
        self.push(&target, stanza, Some(m.message_id.clone()));
    }

    /// Queues a delivery for the gateway node holding the session.
    fn push(&mut self, target: &Target, stanza: String, message_id: Option<String>) -> bool {
        let delivery = StanzaDelivery {
            session_id: target.session_id,
            to: target.full_jid.clone(),
            protocol: Protocol::Xmpp,
            stanza,
            message_id,
            sender: None,
        };
        let envelope = Envelope::new(self.config.node.clone(), target.node.clone(), delivery);
        let bytes = match envelope.to_json_vec() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "encoding a delivery");
                return false;
            }
        };
        self.outbox
            .push((Out::Deliveries, target.node.clone(), bytes));
        true
    }

    /// Produces everything queued, concurrently; the bus keeps the order of
    /// records with the same key because they are enqueued in order.
    async fn flush(&mut self) {
        if self.outbox.is_empty() {
            return;
        }
        let bus = &self.bus;
        let (messages, deliveries) = (&self.messages_topic, &self.deliveries_topic);
        let results = futures::future::join_all(self.outbox.iter().map(|(out, key, bytes)| {
            let topic = match out {
                Out::Messages => messages,
                Out::Deliveries => deliveries,
            };
            bus.produce(topic, key.as_bytes(), Some(bytes))
        }))
        .await;
        for result in results {
            if let Err(e) = result {
                tracing::error!(error = %e, "router output not stored");
            }
        }
        self.outbox.clear();
    }

    /// Queues an event on the `messages` topic.
    fn emit(&mut self, subject: &str, event: impl Into<Event>) -> Option<Envelope> {
        let envelope = Envelope::new(self.config.node.clone(), subject, event);
        let bytes = envelope.to_json_vec().ok()?;
        self.outbox.push((Out::Messages, subject.to_owned(), bytes));
        Some(envelope)
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}
