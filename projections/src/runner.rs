//! A projection as a consumer-group member.
//!
//! On assignment the runner reads the positions stored with the rows and
//! seeks there (offset 0 when none is stored); the bus's committed offsets
//! are not used. The records read while the previous transaction is being
//! written become one transaction: the positions move by compare-and-set
//! from the values the previous transaction left (or the runner sought to),
//! then the rows are written. If a position moved meanwhile (a rebalance gave the
//! partition to another member that wrote first, or a rebuild reset it) the
//! transaction writes nothing and the runner seeks to the stored positions.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchboard_infra::bus::{Bus, Consumer, ConsumerConfig, Polled, Record, TopicPartition};
use switchboard_schemas::topics::full_name;
use tokio::sync::watch;

use crate::db::{Applied, Database, Ops, PositionUpdate};
use crate::rows::{self, Item};
use crate::{Profile, ProjectionError, ProjectionKind, metrics};

/// A projection is ready again once its lag is at most this many records.
pub const READY_LAG: i64 = 1_000;
/// A ready projection turns not ready when its lag exceeds this.
pub const NOT_READY_LAG: i64 = 100_000;
/// How often the lag is measured.
const LAG_INTERVAL: Duration = Duration::from_secs(2);
/// Longest pause between retries of a failing database.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Settings shared by the runners of one process.
#[derive(Clone, Debug)]
pub struct RunnerConfig {
    /// Topic prefix.
    pub prefix: String,
    /// Served domains (lowercase): a 1:1 message to one of them is archived
    /// on the recipient's side too. Empty: every domain counts as served.
    pub local_domains: Vec<String>,
    /// The compliance profile.
    pub profile: Profile,
    /// Most records per poll.
    pub max_batch: usize,
    /// Most records per transaction: what was read while the previous
    /// transaction was being written, merged (at least `max_batch`).
    pub max_transaction: usize,
}

impl RunnerConfig {
    /// Defaults under a topic prefix: every domain served, the default
    /// profile, 8192 records per poll, 32,768 per transaction.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            local_domains: Vec::new(),
            profile: Profile::default(),
            max_batch: 8192,
            max_transaction: 32_768,
        }
    }

    fn is_local(&self, domain: &str) -> bool {
        self.local_domains.is_empty()
            || self
                .local_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// The full topic names a projection reads.
    pub fn topics(&self, kind: ProjectionKind) -> Vec<String> {
        kind.topics(&self.profile)
            .into_iter()
            .map(|t| full_name(&self.prefix, t))
            .collect()
    }
}

/// Health of one projection in this process.
#[derive(Debug)]
pub struct ProjectionStatus {
    kind: ProjectionKind,
    lag: AtomicI64,
    ready: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl ProjectionStatus {
    fn new(kind: ProjectionKind) -> Self {
        Self {
            kind,
            lag: AtomicI64::new(-1),
            ready: AtomicBool::new(false),
            last_error: Mutex::new(None),
        }
    }

    /// The projection.
    pub fn kind(&self) -> ProjectionKind {
        self.kind
    }

    /// Records not yet applied on this member's partitions (-1: not measured
    /// yet).
    pub fn lag(&self) -> i64 {
        self.lag.load(Ordering::Acquire)
    }

    /// Whether the projection has caught up (and not fallen far behind since).
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// The last database error, while it persists.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn set_lag(&self, lag: i64) {
        self.lag.store(lag, Ordering::Release);
        metrics::LAG.with_label_values(&[self.kind.name()]).set(lag);
        if lag <= READY_LAG {
            self.ready.store(true, Ordering::Release);
        } else if lag > NOT_READY_LAG {
            self.ready.store(false, Ordering::Release);
        }
    }

    fn set_error(&self, error: Option<String>) {
        if let Ok(mut e) = self.last_error.lock() {
            *e = error;
        }
    }
}

/// Health of every projection run by this process (for `/readyz`).
#[derive(Debug)]
pub struct Status {
    projections: Vec<Arc<ProjectionStatus>>,
}

impl Status {
    /// Status slots for `kinds`, all not ready.
    pub fn new(kinds: &[ProjectionKind]) -> Arc<Self> {
        Arc::new(Self {
            projections: kinds
                .iter()
                .map(|k| Arc::new(ProjectionStatus::new(*k)))
                .collect(),
        })
    }

    /// The slot of one projection.
    pub fn get(&self, kind: ProjectionKind) -> Option<Arc<ProjectionStatus>> {
        self.projections.iter().find(|p| p.kind == kind).cloned()
    }

    /// Every slot.
    pub fn all(&self) -> &[Arc<ProjectionStatus>] {
        &self.projections
    }

    /// Whether every projection has caught up.
    pub fn ready(&self) -> bool {
        self.projections.iter().all(|p| p.ready())
    }

    /// One line per projection that is not ready: `name lag N`.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for p in &self.projections {
            if !p.ready() {
                out.push_str(&format!("projection {} lag {}", p.kind, p.lag()));
                if let Some(e) = p.last_error() {
                    out.push_str(&format!(" error: {e}"));
                }
                out.push('\n');
            }
        }
        out
    }
}

/// Runs one projection until `shutdown` turns true.
///
/// Reading and writing overlap: while one transaction is being written (a
/// task of its own), the runner keeps polling and decoding, and everything
/// read meanwhile (at most [`RunnerConfig::max_transaction`] records) becomes
/// the next transaction. Each transaction still carries the compare-and-set
/// of its partitions' positions, from the positions the previous one left.
pub async fn run(
    bus: Arc<dyn Bus>,
    db: Database,
    kind: ProjectionKind,
    config: Arc<RunnerConfig>,
    status: Arc<ProjectionStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ProjectionError> {
    let topics = config.topics(kind);
    if topics.is_empty() {
        // Nothing to read (e.g. compliance disabled).
        status.set_lag(0);
        let _ = shutdown.wait_for(|stop| *stop).await;
        return Ok(());
    }
    let group = kind.group(&config.prefix);
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut consumer = bus
        .consumer(ConsumerConfig {
            max_batch: config.max_batch,
            ..ConsumerConfig::new(group.clone(), &topic_refs)
        })
        .await?;
    let max_transaction = config.max_transaction.max(config.max_batch).max(1);
    let mut runner = Runner {
        bus,
        db,
        kind,
        config,
        status,
        group,
        topics,
        positions: BTreeMap::new(),
        applied: BTreeMap::new(),
        pending: Vec::new(),
    };
    let lanes = lanes(kind, &runner.db);
    runner.pending.resize_with(lanes, || None);
    let mut inflight: Vec<Option<InFlight>> = (0..lanes).map(|_| None).collect();
    let mut lag_tick = tokio::time::interval(LAG_INTERVAL);
    lag_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        for (lane, slot) in inflight.iter_mut().enumerate() {
            if slot.is_none() {
                *slot = runner.start_pending(lane, &shutdown);
            }
        }
        let can_read = runner.pending_records() < max_transaction;
        let busy = inflight.iter().any(Option::is_some);
        tokio::select! {
            polled = consumer.poll(Duration::from_millis(500)), if can_read => {
                let step = match polled {
                    Ok(Polled::Assigned(tps)) => {
                        runner.drain(&mut inflight).await;
                        runner.on_assigned(&mut *consumer, &tps, &mut shutdown).await
                    }
                    Ok(Polled::Revoked(tps)) => {
                        runner.drain(&mut inflight).await;
                        for tp in &tps {
                            runner.positions.remove(tp);
                            runner.applied.remove(tp);
                        }
                        runner.resync(&mut *consumer, &mut shutdown).await
                    }
                    Ok(Polled::Records(records)) => {
                        runner.on_records(&records);
                        Ok(())
                    }
                    Ok(Polled::Idle) => Ok(()),
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = step {
                    break Err(e);
                }
            }
            (lane, finished) = next_finished(&mut inflight), if busy => {
                let done = inflight[lane].take().expect("in flight");
                if let Some(end) = runner.after_applied(&done, finished, &mut inflight, &mut *consumer, &mut shutdown).await {
                    break end;
                }
            }
            _ = lag_tick.tick() => runner.measure_lag().await,
            _ = shutdown.changed() => break Ok(()),
        }
        if *shutdown.borrow() {
            break Ok(());
        }
    };
    // A transaction under way is finished (or given up, when the database
    // fails) rather than cut off.
    runner.drain(&mut inflight).await;
    let _ = consumer.close().await;
    result
}

/// The first transaction under way to finish, of any lane, with its lane.
/// (Pending while none is under way.)
async fn next_finished(
    inflight: &mut [Option<InFlight>],
) -> (
    usize,
    Result<Result<Option<Applied>, ProjectionError>, tokio::task::JoinError>,
) {
    std::future::poll_fn(|cx| {
        for (lane, slot) in inflight.iter_mut().enumerate() {
            if let Some(done) = slot
                && let std::task::Poll::Ready(finished) =
                    std::pin::Pin::new(&mut done.handle).poll(cx)
            {
                return std::task::Poll::Ready((lane, finished));
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// The rows read but not yet handed to the database, and the position
/// changes that go with them.
struct Pending {
    updates: BTreeMap<TopicPartition, PositionUpdate>,
    /// The rows of each poll, joined once when the transaction starts
    /// ([`Ops::concat`]).
    parts: Vec<Ops>,
    records: usize,
}

/// A transaction being written by its own task.
struct InFlight {
    handle: tokio::task::JoinHandle<Result<Option<Applied>, ProjectionError>>,
    updates: Vec<PositionUpdate>,
    records: usize,
}

/// Applies one transaction, retrying with backoff while the database fails;
/// `None` when shutting down first.
async fn apply_with_retry(
    db: Database,
    group: String,
    updates: Vec<PositionUpdate>,
    ops: Ops,
    status: Arc<ProjectionStatus>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Option<Applied>, ProjectionError> {
    let mut backoff = Duration::from_millis(100);
    let ops = Arc::new(ops);
    loop {
        match db.apply(&group, &updates, ops.clone()).await {
            Ok(applied) => {
                status.set_error(None);
                return Ok(Some(applied));
            }
            Err(e) => {
                tracing::warn!(projection = %status.kind, error = %e, "applying a batch failed; retrying");
                status.set_error(Some(e.to_string()));
                if pause(&mut backoff, &mut shutdown).await {
                    return Ok(None);
                }
            }
        }
    }
}

/// Sleeps for the backoff (doubling it); true when shutting down.
async fn pause(backoff: &mut Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = shutdown.changed() => return true,
    }
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
    *shutdown.borrow()
}

/// Result of [`catch_up`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaughtUp {
    /// The positions reached, per partition.
    pub positions: BTreeMap<TopicPartition, i64>,
}

/// Runs one projection until its stored positions reach the ends the topics
/// had when it started, then stops.
pub async fn catch_up(
    bus: Arc<dyn Bus>,
    db: Database,
    kind: ProjectionKind,
    config: Arc<RunnerConfig>,
) -> Result<CaughtUp, ProjectionError> {
    let group = kind.group(&config.prefix);
    let mut targets = Vec::new();
    for topic in config.topics(kind) {
        for (partition, end) in bus.end_offsets(&topic).await?.into_iter().enumerate() {
            if end > 0 {
                targets.push((TopicPartition::new(&topic, partition as i32), end));
            }
        }
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let status = Arc::new(ProjectionStatus::new(kind));
    let mut task = tokio::spawn(run(bus, db.clone(), kind, config, status, stop_rx));
    loop {
        let positions = db.positions(kind, &group).await?;
        let done = targets
            .iter()
            .all(|(tp, end)| positions.get(tp).is_some_and(|p| p >= end));
        if done {
            let _ = stop_tx.send(true);
            task.await
                .map_err(|e| ProjectionError::Task(e.to_string()))??;
            return Ok(CaughtUp { positions });
        }
        tokio::select! {
            finished = &mut task => {
                finished.map_err(|e| ProjectionError::Task(e.to_string()))??;
                return Err(ProjectionError::Bus(switchboard_infra::bus::BusError::Closed));
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

struct Runner {
    bus: Arc<dyn Bus>,
    db: Database,
    kind: ProjectionKind,
    config: Arc<RunnerConfig>,
    status: Arc<ProjectionStatus>,
    group: String,
    topics: Vec<String>,
    /// The next offset to read per owned partition: what the database will
    /// hold once the transaction under way and the pending rows are stored.
    positions: BTreeMap<TopicPartition, i64>,
    /// The positions the database is known to hold (for the lag).
    applied: BTreeMap<TopicPartition, i64>,
    /// Rows read while a transaction was under way, per lane.
    pending: Vec<Option<Pending>>,
}

impl Runner {
    /// Reads the stored positions, retrying while the database fails.
    async fn stored_positions(
        &self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<BTreeMap<TopicPartition, i64>, ProjectionError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.db.positions(self.kind, &self.group).await {
                Ok(p) => {
                    self.status.set_error(None);
                    return Ok(p);
                }
                Err(e) => {
                    tracing::warn!(projection = %self.kind, error = %e, "reading positions failed; retrying");
                    self.status.set_error(Some(e.to_string()));
                    if pause(&mut backoff, shutdown).await {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn pending_records(&self) -> usize {
        self.pending.iter().flatten().map(|p| p.records).sum()
    }

    /// Hands a lane's pending rows to a task that writes them in one
    /// transaction.
    fn start_pending(&mut self, lane: usize, shutdown: &watch::Receiver<bool>) -> Option<InFlight> {
        let pending = self.pending[lane].take()?;
        let updates: Vec<PositionUpdate> = pending.updates.into_values().collect();
        let handle = tokio::spawn(apply_with_retry(
            self.db.clone(),
            self.group.clone(),
            updates.clone(),
            Ops::concat(self.kind, pending.parts),
            self.status.clone(),
            shutdown.clone(),
        ));
        Some(InFlight {
            handle,
            updates,
            records: pending.records,
        })
    }

    /// The outcome of a transaction: `Some(Done)` stored, `Some(Conflict)` a
    /// position had moved (nothing stored; the rows read after it are
    /// dropped too and the caller seeks back), `None` given up at shutdown.
    fn on_applied(
        &mut self,
        done: &InFlight,
        finished: Result<Result<Option<Applied>, ProjectionError>, tokio::task::JoinError>,
    ) -> Result<Option<Applied>, ProjectionError> {
        let outcome = finished.map_err(|e| ProjectionError::Task(e.to_string()))??;
        match outcome {
            Some(Applied::Done) => {
                for u in &done.updates {
                    self.applied.insert(u.tp.clone(), u.next);
                }
                metrics::APPLIED
                    .with_label_values(&[self.kind.name()])
                    .inc_by(done.records as u64);
            }
            Some(Applied::Conflict) => {
                tracing::info!(projection = %self.kind, "stored position moved; seeking to it");
                metrics::CONFLICTS
                    .with_label_values(&[self.kind.name()])
                    .inc();
            }
            None => {}
        }
        Ok(outcome)
    }

    /// Handles a finished transaction; on a conflict waits for the other
    /// lanes' transactions and seeks to the stored positions. `Some` ends the
    /// runner.
    async fn after_applied(
        &mut self,
        done: &InFlight,
        finished: Result<Result<Option<Applied>, ProjectionError>, tokio::task::JoinError>,
        inflight: &mut [Option<InFlight>],
        consumer: &mut dyn Consumer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<Result<(), ProjectionError>> {
        match self.on_applied(done, finished) {
            Ok(Some(Applied::Done)) => None,
            Ok(Some(Applied::Conflict)) => {
                self.drain(inflight).await;
                self.resync(consumer, shutdown).await.err().map(Err)
            }
            Ok(None) => Some(Ok(())),
            Err(e) => Some(Err(e)),
        }
    }

    /// Waits for the transactions under way and drops the pending rows (the
    /// caller then seeks to the stored positions).
    async fn drain(&mut self, inflight: &mut [Option<InFlight>]) {
        for slot in inflight.iter_mut() {
            let Some(done) = slot.take() else {
                continue;
            };
            match done.handle.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(projection = %self.kind, error = %e, "a transaction failed while stopping or rebalancing");
                }
                Err(e) => {
                    tracing::warn!(projection = %self.kind, error = %e, "a transaction task failed");
                }
            }
        }
        self.pending.iter_mut().for_each(|p| *p = None);
    }

    async fn on_assigned(
        &mut self,
        consumer: &mut dyn Consumer,
        tps: &[TopicPartition],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ProjectionError> {
        for tp in tps {
            self.positions.insert(tp.clone(), 0);
        }
        self.resync(consumer, shutdown).await?;
        tracing::info!(projection = %self.kind, partitions = tps.len(), "partitions assigned");
        self.measure_lag().await;
        Ok(())
    }

    /// Seeks every owned partition to its stored position.
    async fn resync(
        &mut self,
        consumer: &mut dyn Consumer,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ProjectionError> {
        self.pending.iter_mut().for_each(|p| *p = None);
        let stored = self.stored_positions(shutdown).await?;
        let owned: Vec<TopicPartition> = self.positions.keys().cloned().collect();
        for tp in owned {
            let position = stored.get(&tp).copied().unwrap_or(0);
            consumer.seek(&tp, position).await?;
            self.positions.insert(tp.clone(), position);
            self.applied.insert(tp, position);
        }
        Ok(())
    }

    /// Decodes a poll's new records into the pending rows of their lanes.
    fn on_records(&mut self, records: &[Record]) {
        let lanes = self.pending.len();
        if lanes <= 1 {
            self.add_records(0, records.iter());
        } else {
            for lane in 0..lanes {
                self.add_records(
                    lane,
                    records
                        .iter()
                        .filter(|r| r.partition.unsigned_abs() as usize % lanes == lane),
                );
            }
        }
    }

    fn add_records<'r>(&mut self, lane: usize, records: impl Iterator<Item = &'r Record>) {
        let pending = self.pending[lane].get_or_insert_with(|| Pending {
            updates: BTreeMap::new(),
            parts: Vec::new(),
            records: 0,
        });
        let mut fresh: Vec<&Record> = Vec::new();
        for r in records {
            let tp = r.topic_partition();
            let Some(position) = self.positions.get_mut(&tp) else {
                continue; // not ours (any more)
            };
            if r.offset < *position {
                continue; // already read
            }
            let update = pending.updates.entry(tp.clone()).or_insert(PositionUpdate {
                tp,
                expected: *position,
                next: *position,
            });
            update.next = r.offset + 1;
            *position = r.offset + 1;
            fresh.push(r);
        }
        if fresh.is_empty() {
            if pending.records == 0 {
                self.pending[lane] = None;
            }
            return;
        }
        let items: Vec<Item<'_>> = fresh.iter().map(|r| Item::decode(r)).collect();
        let undecodable = items
            .iter()
            .filter(|i| i.envelope.is_none() && i.record.value.is_some())
            .count();
        if undecodable > 0 {
            metrics::UNDECODABLE
                .with_label_values(&[self.kind.name()])
                .inc_by(undecodable as u64);
        }
        pending.parts.push(ops(self.kind, &self.config, &items));
        pending.records += fresh.len();
    }

    /// Lag of the owned partitions: end offsets minus applied positions.
    async fn measure_lag(&mut self) {
        if self.applied.is_empty() {
            return;
        }
        let mut lag = 0i64;
        for topic in &self.topics {
            match self.bus.end_offsets(topic).await {
                Ok(ends) => {
                    for (partition, end) in ends.into_iter().enumerate() {
                        let tp = TopicPartition::new(topic, partition as i32);
                        if let Some(position) = self.applied.get(&tp) {
                            lag += (end - position).max(0);
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(projection = %self.kind, error = %e, "end offsets unavailable");
                    return;
                }
            }
        }
        self.status.set_lag(lag);
    }
}

/// The rows of decoded records for one projection.
fn ops(kind: ProjectionKind, config: &RunnerConfig, items: &[Item<'_>]) -> Ops {
    match kind {
        ProjectionKind::Rosters => Ops::Rosters(rows::roster_ops(items)),
        ProjectionKind::Sessions => Ops::Sessions(rows::session_ops(items)),
        ProjectionKind::Archive => Ops::Archive(rows::archive_rows(items, &|d| config.is_local(d))),
        ProjectionKind::Files => Ops::Files(rows::file_rows(items)),
        ProjectionKind::Compliance => {
            Ops::Compliance(rows::compliance_entries(items, &config.profile))
        }
    }
}

/// How many transactions of a projection may be under way at once, each for
/// its own partitions (a lane is the partitions `p` with `p % lanes` equal to
/// its number). On PostgreSQL the archive, the heaviest projection, writes on
/// two connections at once (two server processes, so two cores); the
/// positions' compare-and-set is per partition, so lanes never write the
/// same partition. SQLite has one writer anyway, and the compliance log is
/// one chain whose head every transaction locks.
fn lanes(kind: ProjectionKind, db: &Database) -> usize {
    match (kind, db) {
        (ProjectionKind::Archive, Database::Postgres(_)) => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(after: Duration, outcome: Applied) -> Option<InFlight> {
        Some(InFlight {
            handle: tokio::spawn(async move {
                tokio::time::sleep(after).await;
                Ok(Some(outcome))
            }),
            updates: Vec::new(),
            records: 0,
        })
    }

    /// Every lane's transaction is awaited, not only the first two: the
    /// first to finish is reported with its lane, whichever it is.
    #[tokio::test]
    async fn the_first_transaction_to_finish_is_taken_from_any_lane() {
        let mut inflight = vec![
            in_flight(Duration::from_secs(3600), Applied::Done),
            None,
            in_flight(Duration::from_secs(3600), Applied::Done),
            in_flight(Duration::from_millis(10), Applied::Conflict),
        ];
        let (lane, finished) = next_finished(&mut inflight).await;
        assert_eq!(lane, 3);
        assert!(matches!(finished, Ok(Ok(Some(Applied::Conflict)))));
        for slot in inflight.iter().flatten() {
            slot.handle.abort();
        }
    }
}
