//! The presence composer (SPEC.md §6; RFC 6121 §4): a member of consumer
//! group `<prefix>.presence` over the `presence` topic, with the `sessions`
//! topic read beside it, publishing each user's composed presence
//! (`presence.composed`, [`crate::compose`]) on the compacted
//! `presence_state` topic, keyed by the user.
//!
//! # State from the log only
//!
//! Both input topics are keyed by the user's bare address with the same
//! partitioner and partition count, so partition *p* of `presence` and of
//! `sessions` hold the same users. The group assigns `presence` partitions;
//! `sessions` is read by a consumer of its own (a fresh group per instance,
//! from the start) whose records count only for owned partitions.
//!
//! When a partition is assigned, its state is rebuilt by reading `presence`,
//! `sessions` and `presence_state` from the start to their ends at that
//! moment: the inputs give the composition, `presence_state` the last
//! composed value published. Records below the rebuilt positions are
//! skipped when the group or the sessions reader delivers them again, so
//! every record is folded exactly once per instance. After the rebuild,
//! every user whose composed presence differs from the last published one
//! is published (this repairs a change lost in a crash or held by the
//! throttle); a redelivered input whose output was already published
//! publishes nothing.
//!
//! # Outputs
//!
//! - `presence.composed` only when the composed value changes, through the
//!   per-user throttle (`presence.throttle_ms`, a live setting);
//! - `presence.manual_status_cleared` (reason `signed_out`) on `presence`
//!   when the user's last device went away while a manual status was set.
//!
//! Positions of `presence` are committed only after the outputs of the
//! records up to them are durable. A composed change held by the throttle
//! is not an output of a record: if the process dies first, the rebuild of
//! the next owner publishes it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use switchboard_infra::bus::{
    Bus, BusError, ConsumerConfig, Polled, Record, TopicPartition, partition_for_key,
    positions_after,
};
use switchboard_schemas::events::{
    Availability, ComposedPresence, ManualStatusClearReason, ManualStatusCleared, PresenceSources,
};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{BareJid, Envelope, Event, NodeId};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::compose::{Composer, Throttle};
use crate::runtime::decode;
use crate::settings::SettingsHandle;

/// How often expired manual statuses are looked for.
const EXPIRY_CHECK: Duration = Duration::from_secs(1);

/// Settings of the composer.
#[derive(Clone, Debug)]
pub struct PresenceConfig {
    /// Topic prefix.
    pub prefix: String,
    /// This node (producer of the composer's events).
    pub node: NodeId,
    /// How long a rebuild may read before the composer gives up.
    pub rebuild_limit: Duration,
    /// Most `presence` records taken per poll (and so per commit).
    pub max_batch: usize,
}

impl PresenceConfig {
    /// The composer of `prefix` on `node`, with a two-minute rebuild limit.
    pub fn new(prefix: impl Into<String>, node: NodeId) -> Self {
        Self {
            prefix: prefix.into(),
            node,
            rebuild_limit: Duration::from_secs(120),
            max_batch: ConsumerConfig::new("", &[]).max_batch,
        }
    }
}

/// The unavailable presence of a user nothing was ever published for.
fn unavailable(user: &BareJid) -> ComposedPresence {
    ComposedPresence {
        user: user.clone(),
        availability: Availability::Unavailable,
        show: None,
        status: None,
        sources: PresenceSources::new(),
    }
}

/// Which input topic a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Input {
    Presence,
    Sessions,
}

struct Composition {
    bus: Arc<dyn Bus>,
    config: PresenceConfig,
    presence_topic: String,
    sessions_topic: String,
    state_topic: String,
    partitions: i32,
    owned: BTreeSet<i32>,
    composer: Composer,
    /// The last composed value published per owned user.
    published: BTreeMap<BareJid, ComposedPresence>,
    throttle: Throttle<ComposedPresence>,
    /// Next offset to fold per input partition; lower offsets are folded.
    applied: BTreeMap<(Input, i32), i64>,
    /// (topic, key, value) decided but not produced yet.
    outbox: Vec<(String, String, Vec<u8>)>,
    /// Expired manual statuses whose clear was published, by when the
    /// status was set (not published again while it is read back).
    expiring: BTreeMap<BareJid, chrono::DateTime<chrono::Utc>>,
    origin: Instant,
}

/// Runs the composer until `shutdown` turns true. Storage errors that do
/// not clear up end it with the error (positions stay uncommitted, so the
/// next owner repeats the work).
pub async fn run(
    bus: Arc<dyn Bus>,
    config: PresenceConfig,
    mut settings: SettingsHandle,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BusError> {
    let presence_topic = full_name(&config.prefix, Topic::Presence);
    let sessions_topic = full_name(&config.prefix, Topic::Sessions);
    let partitions = bus.partitions(&presence_topic).await?;
    let mut sessions = bus
        .consumer(ConsumerConfig::new(
            format!(
                "switchboard-presence-sessions-{}",
                uuid::Uuid::now_v7().simple()
            ),
            &[&sessions_topic],
        ))
        .await?;
    let mut group = bus
        .consumer(ConsumerConfig {
            max_batch: config.max_batch,
            ..ConsumerConfig::new(format!("{}.presence", config.prefix), &[&presence_topic])
        })
        .await?;
    let interval = settings.borrow_and_update().presence_throttle();
    let mut c = Composition {
        state_topic: full_name(&config.prefix, Topic::PresenceState),
        bus,
        config,
        presence_topic,
        sessions_topic,
        partitions,
        owned: BTreeSet::new(),
        composer: Composer::default(),
        published: BTreeMap::new(),
        throttle: Throttle::new(interval),
        applied: BTreeMap::new(),
        outbox: Vec::new(),
        expiring: BTreeMap::new(),
        origin: Instant::now(),
    };
    let mut settings_open = true;
    let mut expiry = tokio::time::interval(EXPIRY_CHECK);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        let due = c.throttle.next_due().map(|d| c.origin + d);
        tokio::select! {
            polled = group.poll(Duration::from_millis(500)) => match polled {
                Ok(Polled::Records(records)) => {
                    c.on_records(Input::Presence, &records);
                    if let Err(e) = c.flush().await {
                        break Err(e);
                    }
                    // Outputs are durable; now the inputs may be skipped.
                    if let Err(e) = group.commit(&positions_after(&records)).await {
                        tracing::warn!(error = %e, "presence commit failed; records will repeat");
                    }
                }
                Ok(Polled::Assigned(tps)) => {
                    if let Err(e) = c.on_assigned(&tps).await {
                        break Err(e);
                    }
                    if let Err(e) = c.flush().await {
                        break Err(e);
                    }
                }
                Ok(Polled::Revoked(_) | Polled::Idle) => {}
                Err(e) => break Err(e),
            },
            polled = sessions.poll(Duration::from_millis(500)) => match polled {
                Ok(Polled::Records(records)) => {
                    c.on_records(Input::Sessions, &records);
                    if let Err(e) = c.flush().await {
                        break Err(e);
                    }
                }
                Ok(_) => {}
                Err(e) => break Err(e),
            },
            _ = expiry.tick() => {
                c.expire_manual_statuses();
                if let Err(e) = c.flush().await {
                    break Err(e);
                }
            }
            () = sleep_until(due) => {
                c.release_due();
                if let Err(e) = c.flush().await {
                    break Err(e);
                }
            }
            // A handle whose sender is gone (fixed settings) never changes
            // again: stop waiting on it, or this branch would be ready on
            // every turn and starve the consumers.
            changed = settings.changed(), if settings_open => {
                if changed.is_ok() {
                    let interval = settings.borrow_and_update().presence_throttle();
                    c.throttle.set_min_interval(interval);
                } else {
                    settings_open = false;
                }
            }
            _ = shutdown.changed() => break Ok(()),
        }
    };
    let _ = group.close().await;
    let _ = sessions.close().await;
    result
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Composition {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Folds live records of owned partitions not folded yet, and offers
    /// the changed users' composed presence.
    fn on_records(&mut self, input: Input, records: &[Record]) {
        let mut touched = BTreeSet::new();
        for r in records {
            if !self.owned.contains(&r.partition) {
                continue;
            }
            let next = self.applied.entry((input, r.partition)).or_insert(0);
            if r.offset < *next {
                continue;
            }
            *next = r.offset + 1;
            let Some(envelope) = decode(r) else { continue };
            let Some((user, applied)) = self.composer.apply(&envelope) else {
                continue;
            };
            if applied.manual_cleared_by_sign_out {
                let cleared = ManualStatusCleared {
                    user: user.clone(),
                    reason: ManualStatusClearReason::SignedOut,
                };
                let out = Envelope::caused_by(
                    &envelope,
                    self.config.node.clone(),
                    user.as_str(),
                    cleared,
                );
                self.queue(self.presence_topic.clone(), &out);
            }
            touched.insert(user);
        }
        let now = self.now();
        for user in touched {
            self.offer(&user, now);
        }
    }

    /// Publishes `presence.manual_status_cleared` (reason `expired`) for
    /// manual statuses past their `expires_at`.
    fn expire_manual_statuses(&mut self) {
        let expired = self.composer.expired(chrono::Utc::now());
        self.expiring
            .retain(|user, set_at| expired.iter().any(|(u, s)| u == user && s == set_at));
        for (user, set_at) in expired {
            if self.expiring.get(&user) == Some(&set_at) {
                continue;
            }
            let cleared = ManualStatusCleared {
                user: user.clone(),
                reason: ManualStatusClearReason::Expired,
            };
            let out = Envelope::new(self.config.node.clone(), user.as_str(), cleared);
            self.queue(self.presence_topic.clone(), &out);
            self.expiring.insert(user, set_at);
        }
    }

    fn offer(&mut self, user: &BareJid, now: Duration) {
        if !self.throttle.knows(user) {
            let last = self
                .published
                .get(user)
                .cloned()
                .unwrap_or_else(|| unavailable(user));
            self.throttle.seed(user, last);
        }
        let composed = self.composer.compose(user);
        if let Some(composed) = self.throttle.offer(user, composed, now) {
            self.publish(composed);
        }
    }

    fn release_due(&mut self) {
        let now = self.now();
        for (_, composed) in self.throttle.due(now) {
            self.publish(composed);
        }
    }

    fn publish(&mut self, composed: ComposedPresence) {
        let user = composed.user.clone();
        let envelope = Envelope::new(self.config.node.clone(), user.as_str(), composed.clone());
        self.queue(self.state_topic.clone(), &envelope);
        self.published.insert(user, composed);
    }

    fn queue(&mut self, topic: String, envelope: &Envelope) {
        match envelope.to_json_vec() {
            Ok(bytes) => self.outbox.push((topic, envelope.subject.clone(), bytes)),
            Err(e) => tracing::error!(error = %e, "encoding a presence output"),
        }
    }

    /// Produces everything queued; a record whose produce fails with a
    /// retriable error is tried again until it is stored.
    async fn flush(&mut self) -> Result<(), BusError> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        let outbox = std::mem::take(&mut self.outbox);
        let bus = &self.bus;
        let results = futures::future::join_all(
            outbox
                .iter()
                .map(|(topic, key, bytes)| bus.produce(topic, key.as_bytes(), Some(bytes))),
        )
        .await;
        for ((topic, key, bytes), result) in outbox.iter().zip(results) {
            let mut result = result.map(|_| ());
            let mut delay = Duration::from_millis(50);
            while let Err(e) = &result {
                if !e.is_retriable() {
                    tracing::error!(error = %e, %topic, "presence output not stored");
                    return Err(result.unwrap_err());
                }
                tracing::warn!(error = %e, %topic, "presence output not stored yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                result = bus
                    .produce(topic, key.as_bytes(), Some(bytes))
                    .await
                    .map(|_| ());
            }
        }
        Ok(())
    }

    /// Takes the new assignment: keeps partitions still owned, forgets the
    /// others, rebuilds the new ones from the log and publishes what
    /// differs from the last published state.
    async fn on_assigned(&mut self, tps: &[TopicPartition]) -> Result<(), BusError> {
        let owned: BTreeSet<i32> = tps.iter().map(|tp| tp.partition).collect();
        let fresh: BTreeSet<i32> = owned.difference(&self.owned).copied().collect();
        self.owned = owned;
        let (owned, partitions) = (self.owned.clone(), self.partitions);
        let keep = |user: &BareJid| {
            owned.contains(&partition_for_key(user.as_str().as_bytes(), partitions))
        };
        self.composer.retain(keep);
        self.published.retain(|user, _| keep(user));
        self.throttle.retain(keep);
        self.expiring.retain(|user, _| keep(user));
        self.applied.retain(|(_, p), _| owned.contains(p));
        if fresh.is_empty() {
            return Ok(());
        }
        let users = self.rebuild(&fresh).await?;
        let now = self.now();
        for user in users {
            self.offer(&user, now);
        }
        tracing::info!(
            partitions = ?fresh,
            users = self.composer.len(),
            "presence composer rebuilt"
        );
        Ok(())
    }

    /// Reads the inputs and the published state of `fresh` partitions from
    /// the start to their current ends; returns the users seen.
    async fn rebuild(&mut self, fresh: &BTreeSet<i32>) -> Result<BTreeSet<BareJid>, BusError> {
        let topics = [
            self.presence_topic.clone(),
            self.sessions_topic.clone(),
            self.state_topic.clone(),
        ];
        let mut ends = BTreeMap::new();
        for topic in &topics {
            for (p, end) in self.bus.end_offsets(topic).await?.into_iter().enumerate() {
                let p = p as i32;
                if fresh.contains(&p) && end > 0 {
                    ends.insert((topic.clone(), p), end);
                }
            }
        }
        for &p in fresh {
            for input in [Input::Presence, Input::Sessions] {
                let topic = match input {
                    Input::Presence => &self.presence_topic,
                    Input::Sessions => &self.sessions_topic,
                };
                let end = ends.get(&(topic.clone(), p)).copied().unwrap_or(0);
                self.applied.insert((input, p), end);
            }
        }
        let mut users = BTreeSet::new();
        if ends.is_empty() {
            return Ok(users);
        }
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        let mut reader = self
            .bus
            .consumer(ConsumerConfig::new(
                format!(
                    "switchboard-presence-rebuild-{}",
                    uuid::Uuid::now_v7().simple()
                ),
                &refs,
            ))
            .await?;
        let deadline = Instant::now() + self.config.rebuild_limit;
        let mut result = Ok(());
        while !ends.is_empty() {
            if Instant::now() >= deadline {
                result = Err(BusError::Timeout("rebuilding presence state"));
                break;
            }
            let records = match reader.poll(Duration::from_millis(200)).await {
                Ok(Polled::Records(records)) => records,
                Ok(_) => continue,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            for r in &records {
                let key = (r.topic.to_string(), r.partition);
                let Some(end) = ends.get(&key).copied() else {
                    continue;
                };
                if r.offset >= end {
                    continue;
                }
                if r.offset + 1 >= end {
                    ends.remove(&key);
                }
                let Some(envelope) = decode(r) else { continue };
                if *r.topic == *self.state_topic {
                    if let Event::ComposedPresence(composed) = envelope.event {
                        users.insert(composed.user.clone());
                        self.published.insert(composed.user.clone(), composed);
                    }
                } else if let Some((user, _)) = self.composer.apply(&envelope) {
                    users.insert(user);
                }
            }
        }
        let _ = reader.close().await;
        result.map(|()| users)
    }
}
