//! The embedded log: a durable, partitioned, compacting log in SQLite, for the
//! single-process default.
//!
//! Design:
//! * One writer thread owns the only writing connection (rusqlite, synchronous:
//!   no hop to another thread per statement). Produce and commit requests
//!   queue to it; it takes everything waiting (group commit), writes it in one
//!   transaction with cached prepared statements, and acknowledges only after
//!   `COMMIT` returned. With `journal_mode=WAL` a committed transaction is in
//!   the WAL file before the acknowledgement, so a crash of the process (kill -9)
//!   loses nothing acknowledged; `synchronous=FULL` extends that to power loss
//!   at the cost of an fsync per batch.
//! * Each partition keeps its newest records in memory (the tail), appended by
//!   the writer after commit and dropped once every consumer holding the
//!   partition has read them (`trim_tails`, down to the newest 64, at most
//!   `tail_records`); consumers that keep up read from there and wake
//!   on their topics' watch channels (a commit wakes only the consumers of
//!   the topics it wrote), so produce-to-consume needs no SQL read. Consumers
//!   that are behind read from reading connections of their own (rusqlite,
//!   on tokio's blocking threads; see `RecordReaders`).
//! * Consumer groups live in the process: members join and leave, partitions
//!   are split round-robin in member order, and every change is a new
//!   generation that each member sees on its next poll as Revoked, then
//!   Assigned once no other member still holds the partitions (each holds
//!   its partitions until its Revoked is delivered, as in Kafka's eager
//!   rebalance).
//!   Positions are committed to `group_offsets` through the writer.
//! * A maintenance task compacts compacted topics (keeps the latest record per
//!   key) and applies retention to delete topics. Neither removes the newest
//!   record of a partition, so offsets never go backwards across restarts.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};

use crate::sqlite_wal::{self, WalReset};

use super::{
    Bus, BusError, CleanupPolicy, Consumer, ConsumerConfig, Delivery, Polled, Record, StartFrom,
    TopicConfig, TopicPartition, partition_for_key,
};

/// Most records written in one transaction.
const MAX_BATCH: usize = 8192;
/// How often the write-ahead log is checkpointed into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);
/// Page cache of each connection to the log, in SQLite's units (negative:
/// KiB): 2 MiB, about SQLite's default (2,000 KiB). The writer appends at
/// the right edge of the records' B-tree and readers read ranges once, so a
/// larger cache kept pages nobody asks for again; at 32 MiB per connection
/// the caches were about 1.9 KiB of the memory per idle session at 10,000
/// sessions (BENCHMARKS.md). The operating system's page cache holds the
/// file.
const CACHE_SIZE: i64 = -2048;
/// Appends one record (a cached prepared statement of the writer).
const INSERT_RECORD: &str =
    "INSERT INTO records (tid, part, off, key, value, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
/// Stores a group's position (a cached prepared statement of the writer).
const UPSERT_POSITION: &str = "INSERT INTO group_offsets (grp, topic, part, next_offset) \
     VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (grp, topic, part) DO UPDATE SET next_offset = excluded.next_offset";

/// How durable a commit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// Survives a crash of the process (kill -9); the last batches may be lost
    /// on power failure.
    Normal,
    /// Also survives power failure: one fsync per batch.
    Full,
}

/// Settings of the embedded log.
#[derive(Clone, Debug)]
pub struct EmbeddedConfig {
    /// The SQLite database file.
    pub path: PathBuf,
    /// Durability of each commit.
    pub synchronous: Synchronous,
    /// How often compaction and retention run.
    pub maintenance_interval: Duration,
    /// Most records kept in memory per partition for consumers that keep up;
    /// a partition keeps only what some consumer still has to read (and at
    /// least the newest 64).
    pub tail_records: usize,
    /// Tombstones on compacted topics are removed after this long.
    pub tombstone_retention: Duration,
}

impl EmbeddedConfig {
    /// Defaults for a log stored at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            synchronous: Synchronous::Normal,
            maintenance_interval: Duration::from_secs(60),
            tail_records: 4096,
            tombstone_retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// A record held in a partition's in-memory tail.
#[derive(Clone)]
struct TailRecord {
    offset: i64,
    key: Bytes,
    value: Option<Bytes>,
    timestamp_ms: i64,
}

/// The committed end and newest records of one partition.
struct Tail {
    /// Offset of the first record the tail covers; records in
    /// `[start, end)` missing from `records` were compacted away.
    start: i64,
    /// Offset after the last committed record.
    end: i64,
    records: VecDeque<TailRecord>,
}

impl Tail {
    /// Drops the oldest records while more than `keep` are held and the
    /// oldest matches `drop`; the tail then covers from the first one kept.
    fn drop_oldest(&mut self, keep: usize, drop: impl Fn(&TailRecord) -> bool) {
        while self.records.len() > keep && self.records.front().is_some_and(&drop) {
            if let Some(old) = self.records.pop_front() {
                self.start = old.offset + 1;
            }
        }
    }
}

struct PartitionState {
    tail: RwLock<Tail>,
}

/// Fewest records a partition's tail keeps once every consumer has read
/// them: the records a consumer that is handed the partition (a rebalance, a
/// restart) most likely starts from, its group's last commit being at most a
/// batch behind.
const TAIL_KEEP: usize = 64;

/// How far one consumer has read its assigned partitions: its positions,
/// which it alone moves, and which the bus reads to keep in a tail only the
/// records some consumer has yet to read, beyond [`TAIL_KEEP`] (see
/// [`trim_tails`]).
struct Cursor {
    /// Per entry of the consumer's assignment, in its order: the topic, the
    /// partition and the consumer's position in it.
    marks: Vec<(Arc<TopicState>, usize, AtomicI64)>,
}

struct TopicState {
    id: i64,
    name: Arc<str>,
    cleanup: CleanupPolicy,
    retention_ms: Option<i64>,
    partitions: Vec<PartitionState>,
    /// Bumped after every commit that appended records to this topic.
    appended: watch::Sender<u64>,
}

/// One member's view of its group.
struct Group {
    members: BTreeMap<u64, Vec<String>>,
    generation: u64,
    assignments: BTreeMap<u64, Vec<TopicPartition>>,
    /// Which member holds each partition: from the delivery of its
    /// `Assigned` to the delivery of its `Revoked` (or its leaving). A new
    /// generation's `Assigned` waits until none of its partitions is held by
    /// another member, as Kafka's eager rebalance waits for every member to
    /// rejoin: the previous owner finishes what it polled (its outputs, its
    /// commits) before the next one starts, which reads the positions it
    /// committed.
    held: BTreeMap<TopicPartition, u64>,
}

enum WriteOp {
    Produce {
        topic: Arc<TopicState>,
        partition: usize,
        key: Bytes,
        value: Option<Bytes>,
        reply: oneshot::Sender<Result<Delivery, BusError>>,
    },
    Commit {
        group: String,
        positions: Vec<(TopicPartition, i64)>,
        reply: oneshot::Sender<Result<(), BusError>>,
    },
    Maintain {
        reply: oneshot::Sender<Result<(), BusError>>,
    },
}

struct Inner {
    config: EmbeddedConfig,
    /// Held (flock) while the log is open: one process at a time.
    _lock: std::fs::File,
    writer: mpsc::Sender<WriteOp>,
    readers: SqlitePool,
    /// Connections that read records for consumers that are behind.
    record_readers: Arc<RecordReaders>,
    topics: RwLock<HashMap<String, Arc<TopicState>>>,
    groups: Mutex<HashMap<String, Group>>,
    /// Bumped after every group membership change.
    group_changed: watch::Sender<u64>,
    next_member: AtomicU64,
    /// Transactions the writer has committed; the checkpointer skips a
    /// round when it has not moved.
    commits: AtomicU64,
    /// The cursors of the consumers that hold an assignment.
    cursors: Mutex<Vec<Weak<Cursor>>>,
}

impl Inner {
    /// The topics, as of now.
    fn all_topics(&self) -> Vec<Arc<TopicState>> {
        self.topics
            .read()
            .expect("topics lock")
            .values()
            .cloned()
            .collect()
    }
}

/// The embedded durable log.
#[derive(Clone)]
pub struct EmbeddedBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EmbeddedBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBus")
            .field("path", &self.inner.config.path)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl EmbeddedBus {
    /// Opens (creating if needed) the log at `config.path` and starts its
    /// writer and maintenance tasks on the current tokio runtime.
    pub async fn open(config: EmbeddedConfig) -> Result<Self, BusError> {
        if let Some(dir) = config.path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)
                .map_err(|e| BusError::Config(format!("cannot create {}: {e}", dir.display())))?;
        }
        let lock = lock_file(&config.path)?;
        let options = SqliteConnectOptions::from_str("sqlite:")?
            .filename(&config.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match config.synchronous {
                Synchronous::Normal => SqliteSynchronous::Normal,
                Synchronous::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", CACHE_SIZE.to_string())
            // Checkpoints run on their own connection (checkpoint_task), not
            // inside a producer's commit, where they would add milliseconds.
            .pragma("wal_autocheckpoint", "0")
            .pragma(
                "journal_size_limit",
                sqlite_wal::JOURNAL_SIZE_LIMIT.to_string(),
            );
        let mut writer_conn = SqliteConnection::connect_with(&options).await?;
        sqlx::migrate!("./migrations/embedded_log")
            .run_direct(None, &mut writer_conn, false)
            .await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options.clone().read_only(true))
            .await?;

        let record_readers = Arc::new(RecordReaders {
            path: config.path.clone(),
            idle: Mutex::new(Vec::new()),
        });
        let (tx, rx) = mpsc::channel(MAX_BATCH * 4);
        let inner = Arc::new(Inner {
            config,
            _lock: lock,
            writer: tx,
            readers,
            record_readers,
            topics: RwLock::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            group_changed: watch::channel(0).0,
            next_member: AtomicU64::new(1),
            commits: AtomicU64::new(0),
            cursors: Mutex::new(Vec::new()),
        });
        load_topics(&inner, &mut writer_conn).await?;
        writer_conn.close().await?;
        let writer_conn = open_writing(&inner.config)?;
        let checkpoint_conn = open_writing(&inner.config)?;
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("embedded-log-writer".into())
            .spawn(move || writer_thread(&weak, writer_conn, rx))
            .map_err(|e| BusError::Config(format!("cannot start the log writer: {e}")))?;
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("embedded-log-checkpoint".into())
            .spawn(move || checkpoint_thread(&weak, &checkpoint_conn))
            .map_err(|e| BusError::Config(format!("cannot start the log checkpointer: {e}")))?;
        tokio::spawn(maintenance_task(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// Runs compaction and retention now (they also run periodically).
    pub async fn maintain(&self) -> Result<(), BusError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .send(WriteOp::Maintain { reply })
            .await
            .map_err(|_| BusError::Closed)?;
        rx.await.map_err(|_| BusError::Closed)?
    }

    fn topic(&self, name: &str) -> Result<Arc<TopicState>, BusError> {
        self.inner
            .topics
            .read()
            .expect("topics lock")
            .get(name)
            .cloned()
            .ok_or_else(|| BusError::UnknownTopic(name.to_owned()))
    }
}

/// A writing connection of the writer or checkpoint thread, with the same
/// settings as the migrating one: WAL, the configured `synchronous`, no
/// automatic checkpoints (the checkpoint thread does them).
fn open_writing(config: &EmbeddedConfig) -> Result<rusqlite::Connection, BusError> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        &config.path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| storage_error(&e))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(|e| storage_error(&e))?;
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| storage_error(&e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(BusError::Config(format!(
            "{}: journal_mode is {mode}, the log needs wal",
            config.path.display()
        )));
    }
    let synchronous = match config.synchronous {
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(|e| storage_error(&e))?;
    conn.pragma_update(None, "cache_size", CACHE_SIZE)
        .map_err(|e| storage_error(&e))?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .map_err(|e| storage_error(&e))?;
    conn.pragma_update(None, "journal_size_limit", sqlite_wal::JOURNAL_SIZE_LIMIT)
        .map_err(|e| storage_error(&e))?;
    conn.set_prepared_statement_cache_capacity(16);
    Ok(conn)
}

/// Reads the records of one partition from `from` up to (not including)
/// `end`, at most `limit`, in offset order.
const SELECT_RECORDS: &str = "SELECT off, key, value, ts FROM records \
     WHERE tid = ?1 AND part = ?2 AND off >= ?3 AND off < ?4 ORDER BY off LIMIT ?5";
/// Idle reading connections kept for the next read.
const IDLE_RECORD_READERS: usize = 4;

/// Reading connections for consumers that are behind the in-memory tails
/// (a catch-up, a replay): rusqlite on tokio's blocking threads, one
/// connection per read in progress, a few kept idle. Through sqlx each row
/// was copied out of SQLite (`sqlite3_value_dup`) and sent on its own to the
/// async side; a profile of the projections catching up put about a sixth
/// of the process's time there (BENCHMARKS.md).
struct RecordReaders {
    path: PathBuf,
    idle: Mutex<Vec<rusqlite::Connection>>,
}

impl RecordReaders {
    /// The records of one partition (see [`SELECT_RECORDS`]); runs on the
    /// calling thread, which may block.
    fn read(
        &self,
        topic: &Arc<str>,
        tid: i64,
        partition: i32,
        from: i64,
        end: i64,
        limit: usize,
    ) -> Result<Vec<Record>, BusError> {
        let idle = self.idle.lock().expect("readers lock").pop();
        let conn = match idle {
            Some(conn) => conn,
            None => open_reading(&self.path)?,
        };
        let read = (|| {
            let mut statement = conn.prepare_cached(SELECT_RECORDS)?;
            let mut rows = statement.query(rusqlite::params![
                tid,
                partition,
                from,
                end,
                i64::try_from(limit).unwrap_or(i64::MAX)
            ])?;
            let mut out = Vec::with_capacity(limit.min(4096));
            while let Some(row) = rows.next()? {
                out.push(Record {
                    topic: topic.clone(),
                    partition,
                    offset: row.get(0)?,
                    key: Bytes::from(row.get::<_, Vec<u8>>(1)?),
                    value: row.get::<_, Option<Vec<u8>>>(2)?.map(Bytes::from),
                    timestamp_ms: row.get(3)?,
                });
            }
            Ok::<_, rusqlite::Error>(out)
        })();
        let mut idle = self.idle.lock().expect("readers lock");
        if idle.len() < IDLE_RECORD_READERS {
            idle.push(conn);
        }
        read.map_err(|e| storage_error(&e))
    }
}

/// A read-only connection of [`RecordReaders`].
fn open_reading(path: &std::path::Path) -> Result<rusqlite::Connection, BusError> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| storage_error(&e))?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(|e| storage_error(&e))?;
    conn.pragma_update(None, "cache_size", CACHE_SIZE)
        .map_err(|e| storage_error(&e))?;
    Ok(conn)
}

/// The bus's storage error for an error of the writer's SQLite connection;
/// I/O errors stay retriable.
fn storage_error(e: &rusqlite::Error) -> BusError {
    BusError::Storage(storage_sqlx_error(e))
}

fn storage_sqlx_error(e: &rusqlite::Error) -> sqlx::Error {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::SystemIoFailure | rusqlite::ErrorCode::DiskFull) => {
            sqlx::Error::Io(std::io::Error::other(e.to_string()))
        }
        _ => sqlx::Error::Protocol(e.to_string()),
    }
}

/// Takes the exclusive lock beside the log file, so that a second process (or
/// a second open in this one) gets a clear error instead of interleaved
/// writers. The operating system releases it when the process dies.
fn lock_file(path: &std::path::Path) -> Result<std::fs::File, BusError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| BusError::Config(format!("cannot open {}: {e}", path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(BusError::Config(format!(
            "the embedded log {} is already open (another process or another open of it)",
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(BusError::Config(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

async fn load_topics(inner: &Inner, conn: &mut SqliteConnection) -> Result<(), BusError> {
    let rows = sqlx::query("SELECT id, name, partitions, cleanup, retention_ms FROM topics")
        .fetch_all(&mut *conn)
        .await?;
    for row in rows {
        let id: i64 = row.get(0);
        let name: String = row.get(1);
        let partitions: i64 = row.get(2);
        let cleanup: String = row.get(3);
        let retention_ms: Option<i64> = row.get(4);
        let ends: Vec<(i64, i64)> =
            sqlx::query_as("SELECT part, MAX(off) + 1 FROM records WHERE tid = ? GROUP BY part")
                .bind(id)
                .fetch_all(&mut *conn)
                .await?;
        let ends: HashMap<i64, i64> = ends.into_iter().collect();
        let state = TopicState {
            id,
            name: Arc::from(name.as_str()),
            cleanup: if cleanup == "compact" {
                CleanupPolicy::Compact
            } else {
                CleanupPolicy::Delete
            },
            retention_ms,
            partitions: (0..partitions)
                .map(|p| {
                    let end = ends.get(&p).copied().unwrap_or(0);
                    PartitionState {
                        tail: RwLock::new(Tail {
                            start: end,
                            end,
                            records: VecDeque::new(),
                        }),
                    }
                })
                .collect(),
            appended: watch::channel(0).0,
        };
        inner
            .topics
            .write()
            .expect("topics lock")
            .insert(name, Arc::new(state));
    }
    Ok(())
}

/// A commit of group positions waiting for the writer.
type PendingCommit = (
    String,
    Vec<(TopicPartition, i64)>,
    oneshot::Sender<Result<(), BusError>>,
);

struct PendingProduce {
    topic: Arc<TopicState>,
    partition: usize,
    offset: i64,
    key: Bytes,
    value: Option<Bytes>,
    reply: oneshot::Sender<Result<Delivery, BusError>>,
}

/// The writer thread: takes every waiting request (up to [`MAX_BATCH`]),
/// writes them in one transaction and answers each once it is committed.
fn writer_thread(
    inner: &Weak<Inner>,
    mut conn: rusqlite::Connection,
    mut rx: mpsc::Receiver<WriteOp>,
) {
    // Next offset to assign per (topic id, partition); initialised lazily
    // from the committed end of the partition.
    let mut next: HashMap<(i64, usize), i64> = HashMap::new();
    let mut produces = Vec::with_capacity(MAX_BATCH);
    let mut commits = Vec::new();
    let mut maintains = Vec::new();
    let wal = WalReset::install(&conn, "embedded log");
    while let Some(first) = rx.blocking_recv() {
        let mut op = Some(first);
        let mut taken = 0;
        while let Some(current) = op.take() {
            taken += 1;
            match current {
                WriteOp::Produce {
                    topic,
                    partition,
                    key,
                    value,
                    reply,
                } => {
                    let slot = next.entry((topic.id, partition)).or_insert_with(|| {
                        topic.partitions[partition]
                            .tail
                            .read()
                            .expect("tail lock")
                            .end
                    });
                    let offset = *slot;
                    *slot += 1;
                    produces.push(PendingProduce {
                        topic,
                        partition,
                        offset,
                        key,
                        value,
                        reply,
                    });
                }
                WriteOp::Commit {
                    group,
                    positions,
                    reply,
                } => commits.push((group, positions, reply)),
                WriteOp::Maintain { reply } => maintains.push(reply),
            }
            if taken < MAX_BATCH {
                match rx.try_recv() {
                    Ok(more) => op = Some(more),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
                }
            }
        }
        let ts = now_ms();
        let result = if produces.is_empty() && commits.is_empty() {
            Ok(())
        } else {
            write_batch(&mut conn, &produces, &commits, ts)
        };
        match result {
            Ok(()) => {
                if let Some(inner) = inner.upgrade() {
                    inner.commits.fetch_add(1, Ordering::Relaxed);
                    publish(&inner, &produces, ts);
                }
                for p in produces.drain(..) {
                    let _ = p.reply.send(Ok(Delivery {
                        partition: p.partition as i32,
                        offset: p.offset,
                    }));
                }
                for (_, _, reply) in commits.drain(..) {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "embedded log: write failed");
                // Nothing of the batch is durable: hand the offsets out again.
                next.clear();
                for p in produces.drain(..) {
                    let _ = p.reply.send(Err(BusError::Storage(storage_sqlx_error(&e))));
                }
                for (_, _, reply) in commits.drain(..) {
                    let _ = reply.send(Err(BusError::Storage(storage_sqlx_error(&e))));
                }
            }
        }
        wal.after_commit(&conn);
        for reply in maintains.drain(..) {
            let result = match inner.upgrade() {
                Some(inner) => maintain(&inner, &conn),
                None => Err(BusError::Closed),
            };
            let _ = reply.send(result);
        }
    }
}

/// One transaction: the records of the batch, then the groups' positions.
/// Dropping the transaction on an error rolls it back.
fn write_batch(
    conn: &mut rusqlite::Connection,
    produces: &[PendingProduce],
    commits: &[PendingCommit],
    ts: i64,
) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if !produces.is_empty() {
        let mut insert = tx.prepare_cached(INSERT_RECORD)?;
        for p in produces {
            insert.execute(rusqlite::params![
                p.topic.id,
                p.partition as i64,
                p.offset,
                &p.key[..],
                p.value.as_deref(),
                ts
            ])?;
        }
    }
    if !commits.is_empty() {
        let mut upsert = tx.prepare_cached(UPSERT_POSITION)?;
        for (group, positions, _) in commits {
            for (tp, offset) in positions {
                upsert.execute(rusqlite::params![
                    group,
                    &*tp.topic,
                    i64::from(tp.partition),
                    offset
                ])?;
            }
        }
    }
    tx.commit()
}

/// Makes committed records visible to consumers.
fn publish(inner: &Inner, produces: &[PendingProduce], ts: i64) {
    if produces.is_empty() {
        return;
    }
    let limit = inner.config.tail_records.max(1);
    let mut touched: Vec<&Arc<TopicState>> = Vec::new();
    for p in produces {
        if !touched.iter().any(|t| Arc::ptr_eq(t, &p.topic)) {
            touched.push(&p.topic);
        }
        let mut tail = p.topic.partitions[p.partition]
            .tail
            .write()
            .expect("tail lock");
        tail.records.push_back(TailRecord {
            offset: p.offset,
            key: p.key.clone(),
            value: p.value.clone(),
            timestamp_ms: ts,
        });
        tail.end = p.offset + 1;
        tail.drop_oldest(limit, |_| true);
    }
    for topic in touched {
        topic.appended.send_modify(|v| *v = v.wrapping_add(1));
    }
}

/// Copies the write-ahead log into the database file every
/// [`CHECKPOINT_INTERVAL`] after new commits, beside the writer rather than
/// inside its commits. Small, frequent checkpoints keep each one short: at
/// 5,000 events/s, 500 ms checkpoints put the p99 latency at 2.1-2.6 ms,
/// 100 ms ones at 1.6-1.8 ms (BENCHMARKS.md).
fn checkpoint_thread(inner: &Weak<Inner>, conn: &rusqlite::Connection) {
    let mut checkpointed = 0;
    loop {
        std::thread::sleep(CHECKPOINT_INTERVAL);
        let Some(strong) = inner.upgrade() else {
            return;
        };
        trim_tails(&strong);
        let commits = strong.commits.load(Ordering::Relaxed);
        drop(strong);
        if commits == checkpointed {
            continue;
        }
        checkpointed = commits;
        if let Err(e) = conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)") {
            tracing::warn!(error = %e, "embedded log: checkpoint failed");
        }
    }
}

/// Drops from the partitions' tails the records every consumer holding the
/// partition has read, down to [`TAIL_KEEP`] (a partition nobody holds keeps
/// that many), and gives back the room of a tail that shrank. The tails
/// serve consumers that keep up; bounded only by `tail_records` per
/// partition (4,096 by default, 132 partitions), they kept every login's
/// events of the last thousands of sessions in memory, about 1.7 KiB per
/// idle session at 10,000 sessions (BENCHMARKS.md). A consumer that is
/// behind keeps what it has yet to read (up to `tail_records`), so trimming
/// never sends a consumer that keeps up to the database; one handed a
/// partition with its group's commit more than [`TAIL_KEEP`] behind reads
/// the difference from there.
fn trim_tails(inner: &Inner) {
    let cursors: Vec<Arc<Cursor>> = {
        let mut list = inner.cursors.lock().expect("cursors lock");
        list.retain(|c| c.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    };
    // The lowest position over the consumers holding each partition.
    let mut low: HashMap<(i64, usize), i64> = HashMap::new();
    for cursor in &cursors {
        for (topic, partition, mark) in &cursor.marks {
            let mark = mark.load(Ordering::Relaxed);
            low.entry((topic.id, *partition))
                .and_modify(|l| *l = (*l).min(mark))
                .or_insert(mark);
        }
    }
    drop(cursors);
    let topics = inner.all_topics();
    for topic in topics {
        for (index, partition) in topic.partitions.iter().enumerate() {
            let low = low.get(&(topic.id, index)).copied().unwrap_or(i64::MAX);
            let trimmable = |tail: &Tail| {
                let len = tail.records.len();
                (len > TAIL_KEEP && tail.records.front().is_some_and(|r| r.offset < low))
                    || tail.records.capacity() > 4 * len.max(TAIL_KEEP)
            };
            if !trimmable(&partition.tail.read().expect("tail lock")) {
                continue;
            }
            let mut tail = partition.tail.write().expect("tail lock");
            tail.drop_oldest(TAIL_KEEP, |r| r.offset < low);
            let keep = 2 * tail.records.len().max(TAIL_KEEP);
            if tail.records.capacity() > 2 * keep {
                tail.records.shrink_to(keep);
            }
        }
    }
}

async fn maintenance_task(inner: Weak<Inner>) {
    let interval = match inner.upgrade() {
        Some(i) => i.config.maintenance_interval,
        None => return,
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let (reply, rx) = oneshot::channel();
        if strong
            .writer
            .send(WriteOp::Maintain { reply })
            .await
            .is_err()
        {
            return;
        }
        drop(strong);
        if let Ok(Err(e)) = rx.await {
            tracing::warn!(error = %e, "embedded log: maintenance failed");
        }
    }
}

/// Compaction of compacted topics and retention of delete topics. Runs on the
/// writer's connection, between batches.
fn maintain(inner: &Inner, conn: &rusqlite::Connection) -> Result<(), BusError> {
    let topics = inner.all_topics();
    let now = now_ms();
    for topic in topics {
        match topic.cleanup {
            CleanupPolicy::Compact => {
                let tombstone_cutoff = now
                    - i64::try_from(inner.config.tombstone_retention.as_millis())
                        .unwrap_or(i64::MAX);
                // Keep the newest record per key; drop tombstones once old,
                // but never the newest record of a partition.
                conn.execute(
                    "DELETE FROM records WHERE tid = ?1 AND ( \
                       off < (SELECT MAX(r.off) FROM records r \
                              WHERE r.tid = records.tid AND r.part = records.part AND r.key = records.key) \
                       OR (value IS NULL AND ts < ?2 AND off < (SELECT MAX(r.off) FROM records r \
                              WHERE r.tid = records.tid AND r.part = records.part)))",
                    rusqlite::params![topic.id, tombstone_cutoff],
                )
                .map_err(|e| storage_error(&e))?;
                for partition in &topic.partitions {
                    let mut tail = partition.tail.write().expect("tail lock");
                    let mut seen = HashSet::new();
                    let mut kept: VecDeque<TailRecord> = tail
                        .records
                        .iter()
                        .rev()
                        .filter(|r| seen.insert(r.key.clone()))
                        .cloned()
                        .collect();
                    kept.make_contiguous().reverse();
                    tail.records = kept;
                }
            }
            CleanupPolicy::Delete => {
                let Some(retention) = topic.retention_ms else {
                    continue;
                };
                let cutoff = now - retention;
                conn.execute(
                    "DELETE FROM records WHERE tid = ?1 AND ts < ?2 AND off < (SELECT MAX(r.off) \
                     FROM records r WHERE r.tid = records.tid AND r.part = records.part)",
                    rusqlite::params![topic.id, cutoff],
                )
                .map_err(|e| storage_error(&e))?;
                for partition in &topic.partitions {
                    let mut tail = partition.tail.write().expect("tail lock");
                    tail.drop_oldest(1, |r| r.timestamp_ms < cutoff);
                }
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn create_topics(&self, topics: &[TopicConfig]) -> Result<(), BusError> {
        for t in topics {
            if t.partitions <= 0 {
                return Err(BusError::Config(format!(
                    "topic {} needs at least one partition",
                    t.name
                )));
            }
            if let Ok(existing) = self.topic(&t.name) {
                let actual = existing.partitions.len() as i32;
                if actual != t.partitions {
                    return Err(BusError::PartitionMismatch {
                        topic: t.name.clone(),
                        expected: t.partitions,
                        actual,
                    });
                }
                continue;
            }
            let cleanup = match t.cleanup {
                CleanupPolicy::Delete => "delete",
                CleanupPolicy::Compact => "compact",
            };
            // The reading pool is read-only and the writer task is for the hot
            // path; topic creation is rare and uses a short-lived connection.
            let options = SqliteConnectOptions::from_str("sqlite:")?
                .filename(&self.inner.config.path)
                .busy_timeout(Duration::from_secs(10));
            let mut conn = SqliteConnection::connect_with(&options).await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO topics (name, partitions, cleanup, retention_ms) VALUES (?, ?, ?, ?) \
                 ON CONFLICT (name) DO UPDATE SET name = excluded.name RETURNING id",
            )
            .bind(&t.name)
            .bind(i64::from(t.partitions))
            .bind(cleanup)
            .bind(t.retention_ms)
            .fetch_one(&mut conn)
            .await?;
            conn.close().await?;
            let state = TopicState {
                id,
                name: Arc::from(t.name.as_str()),
                cleanup: t.cleanup,
                retention_ms: t.retention_ms,
                partitions: (0..t.partitions)
                    .map(|_| PartitionState {
                        tail: RwLock::new(Tail {
                            start: 0,
                            end: 0,
                            records: VecDeque::new(),
                        }),
                    })
                    .collect(),
                appended: watch::channel(0).0,
            };
            self.inner
                .topics
                .write()
                .expect("topics lock")
                .entry(t.name.clone())
                .or_insert_with(|| Arc::new(state));
        }
        Ok(())
    }

    async fn produce(
        &self,
        topic: &str,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Delivery, BusError> {
        let topic = self.topic(topic)?;
        let partition = partition_for_key(key, topic.partitions.len() as i32) as usize;
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .send(WriteOp::Produce {
                topic,
                partition,
                key: Bytes::copy_from_slice(key),
                value: value.map(Bytes::copy_from_slice),
                reply,
            })
            .await
            .map_err(|_| BusError::Closed)?;
        rx.await.map_err(|_| BusError::Closed)?
    }

    async fn consumer(&self, config: ConsumerConfig) -> Result<Box<dyn Consumer>, BusError> {
        let mut appended = Vec::with_capacity(config.topics.len());
        for t in &config.topics {
            appended.push(self.topic(t)?.appended.subscribe());
        }
        let member = self.inner.next_member.fetch_add(1, Ordering::Relaxed);
        {
            let mut groups = self.inner.groups.lock().expect("groups lock");
            let group = groups.entry(config.group.clone()).or_insert_with(|| Group {
                members: BTreeMap::new(),
                generation: 0,
                assignments: BTreeMap::new(),
                held: BTreeMap::new(),
            });
            group.members.insert(member, config.topics.clone());
            rebalance(&self.inner, group);
        }
        self.inner
            .group_changed
            .send_modify(|v| *v = v.wrapping_add(1));
        Ok(Box::new(EmbeddedConsumer {
            bus: self.clone(),
            member,
            appended,
            group_changed: self.inner.group_changed.subscribe(),
            config,
            generation: 0,
            awaiting: false,
            assignment: Vec::new(),
            cursor: None,
            pending: VecDeque::new(),
            next_partition: 0,
            left: false,
        }))
    }

    async fn partitions(&self, topic: &str) -> Result<i32, BusError> {
        Ok(self.topic(topic)?.partitions.len() as i32)
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, BusError> {
        Ok(self
            .topic(topic)?
            .partitions
            .iter()
            .map(|p| p.tail.read().expect("tail lock").end)
            .collect())
    }

    fn backend(&self) -> &'static str {
        "embedded"
    }
}

/// Splits every subscribed topic's partitions round-robin over the members
/// subscribed to it, in member order, and starts a new generation.
fn rebalance(inner: &Inner, group: &mut Group) {
    let topics = inner.topics.read().expect("topics lock");
    let mut assignments: BTreeMap<u64, Vec<TopicPartition>> =
        group.members.keys().map(|m| (*m, Vec::new())).collect();
    let mut names: Vec<&String> = group.members.values().flatten().collect();
    names.sort();
    names.dedup();
    for name in names {
        let Some(topic) = topics.get(name) else {
            continue;
        };
        let members: Vec<u64> = group
            .members
            .iter()
            .filter(|(_, ts)| ts.contains(name))
            .map(|(m, _)| *m)
            .collect();
        for p in 0..topic.partitions.len() {
            let owner = members[p % members.len()];
            if let Some(list) = assignments.get_mut(&owner) {
                list.push(TopicPartition {
                    topic: topic.name.clone(),
                    partition: p as i32,
                });
            }
        }
    }
    group.assignments = assignments;
    group.generation += 1;
}

struct EmbeddedConsumer {
    bus: EmbeddedBus,
    member: u64,
    config: ConsumerConfig,
    /// One per subscribed topic: bumped when records were appended to it.
    appended: Vec<watch::Receiver<u64>>,
    group_changed: watch::Receiver<u64>,
    generation: u64,
    /// The assignment of `generation` is not delivered yet (its partitions
    /// are still held by other members, or this one's `Revoked` is queued).
    awaiting: bool,
    assignment: Vec<TopicPartition>,
    /// The topic and position of each entry of `assignment` (registered in
    /// the bus while the assignment is held, for the tails' trimming).
    cursor: Option<Arc<Cursor>>,
    pending: VecDeque<Polled>,
    next_partition: usize,
    left: bool,
}

impl EmbeddedConsumer {
    /// Applies a new group generation: queues `Revoked` for what this member
    /// holds (released when delivered), then, on this or a later poll, once
    /// no other member holds any of the new partitions, `Assigned`.
    async fn check_generation(&mut self) -> Result<(), BusError> {
        let (generation, assigned, free) = {
            let groups = self.bus.inner.groups.lock().expect("groups lock");
            let Some(group) = groups.get(&self.config.group) else {
                return Ok(());
            };
            if group.generation == self.generation && !self.awaiting {
                return Ok(());
            }
            let assigned = group
                .assignments
                .get(&self.member)
                .cloned()
                .unwrap_or_default();
            // No other member holds any of them.
            let free = assigned
                .iter()
                .all(|tp| group.held.get(tp).is_none_or(|m| *m == self.member));
            (group.generation, assigned, free)
        };
        if generation != self.generation {
            self.generation = generation;
            self.awaiting = true;
            if !self.assignment.is_empty() {
                self.pending
                    .push_back(Polled::Revoked(std::mem::take(&mut self.assignment)));
                self.cursor = None;
            }
        }
        if !self.awaiting || !self.pending.is_empty() || !free {
            return Ok(());
        }
        // Everything that waits comes first, so that a poll cancelled here
        // changes nothing and the next poll starts over (cancel safety).
        let mut marks = Vec::with_capacity(assigned.len());
        for tp in &assigned {
            let topic = self.bus.topic(&tp.topic)?;
            let committed: Option<i64> = sqlx::query_scalar(
                "SELECT next_offset FROM group_offsets WHERE grp = ? AND topic = ? AND part = ?",
            )
            .bind(&self.config.group)
            .bind(&*tp.topic)
            .bind(i64::from(tp.partition))
            .fetch_optional(&self.bus.inner.readers)
            .await?;
            let position = match (committed, self.config.start) {
                (Some(offset), _) => offset,
                (None, StartFrom::Earliest) => 0,
                (None, StartFrom::Latest) => {
                    topic.partitions[tp.partition as usize]
                        .tail
                        .read()
                        .expect("tail lock")
                        .end
                }
            };
            marks.push((topic, tp.partition as usize, AtomicI64::new(position)));
        }
        {
            let mut groups = self.bus.inner.groups.lock().expect("groups lock");
            let Some(group) = groups.get_mut(&self.config.group) else {
                return Ok(());
            };
            // A generation that started meanwhile is taken on the next poll.
            if group.generation != generation
                || assigned
                    .iter()
                    .any(|tp| group.held.get(tp).is_some_and(|m| *m != self.member))
            {
                return Ok(());
            }
            for tp in &assigned {
                group.held.insert(tp.clone(), self.member);
            }
        }
        self.awaiting = false;
        let cursor = Arc::new(Cursor { marks });
        self.bus
            .inner
            .cursors
            .lock()
            .expect("cursors lock")
            .push(Arc::downgrade(&cursor));
        self.cursor = Some(cursor);
        self.assignment = assigned.clone();
        self.pending.push_back(Polled::Assigned(assigned));
        Ok(())
    }

    /// Moves the position in the assignment's `index`th partition.
    fn mark(&self, index: usize, position: i64) {
        if let Some((_, _, mark)) = self.cursor.as_ref().and_then(|c| c.marks.get(index)) {
            mark.store(position, Ordering::Relaxed);
        }
    }

    /// Gives up the partitions of a delivered `Revoked` and wakes the
    /// members waiting for them (leaving gives up all of them, in `leave`).
    fn release(&self, tps: &[TopicPartition]) {
        let inner = &self.bus.inner;
        {
            let mut groups = inner.groups.lock().expect("groups lock");
            if let Some(group) = groups.get_mut(&self.config.group) {
                group
                    .held
                    .retain(|tp, m| *m != self.member || !tps.contains(tp));
            }
        }
        inner.group_changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Reads available records from the assigned partitions, starting with a
    /// different partition each time so that none starves.
    async fn fetch(&mut self) -> Result<Vec<Record>, BusError> {
        let mut out = Vec::new();
        let Some(cursor) = self.cursor.clone() else {
            return Ok(out);
        };
        // Positions move only when the records are returned (cancel safety).
        let mut moved: Vec<(usize, i64)> = Vec::new();
        let n = cursor.marks.len();
        for i in 0..n {
            if out.len() >= self.config.max_batch {
                break;
            }
            let index = (self.next_partition + i) % n;
            let (topic, partition, mark) = &cursor.marks[index];
            let position = mark.load(Ordering::Relaxed);
            let want = self.config.max_batch - out.len();
            let before = out.len();
            let from_db = {
                let tail = topic.partitions[*partition].tail.read().expect("tail lock");
                if position >= tail.end {
                    None
                } else if position >= tail.start {
                    let first = tail.records.partition_point(|r| r.offset < position);
                    out.extend(tail.records.range(first..).take(want).map(|r| Record {
                        topic: topic.name.clone(),
                        partition: *partition as i32,
                        offset: r.offset,
                        key: r.key.clone(),
                        value: r.value.clone(),
                        timestamp_ms: r.timestamp_ms,
                    }));
                    None
                } else {
                    Some(tail.end)
                }
            };
            if let Some(end) = from_db {
                let readers = self.bus.inner.record_readers.clone();
                let (name, tid, partition) = (topic.name.clone(), topic.id, *partition as i32);
                let rows = tokio::task::spawn_blocking(move || {
                    readers.read(&name, tid, partition, position, end, want)
                })
                .await
                .map_err(|e| {
                    if e.is_cancelled() {
                        BusError::Closed
                    } else {
                        BusError::Storage(sqlx::Error::Protocol(format!("log read: {e}")))
                    }
                })??;
                out.extend(rows);
                if out.len() == before {
                    // Everything below the tail was compacted or expired.
                    let start = topic.partitions[partition as usize]
                        .tail
                        .read()
                        .expect("tail lock")
                        .start;
                    moved.push((index, start));
                    continue;
                }
            }
            if let Some(last) = out[before..].last() {
                moved.push((index, last.offset + 1));
            }
        }
        for (index, position) in moved {
            self.mark(index, position);
        }
        if n > 0 {
            self.next_partition = (self.next_partition + 1) % n;
        }
        Ok(out)
    }

    fn leave(&mut self) {
        if self.left {
            return;
        }
        self.left = true;
        self.cursor = None;
        let inner = &self.bus.inner;
        {
            let mut groups = inner.groups.lock().expect("groups lock");
            if let Some(group) = groups.get_mut(&self.config.group) {
                group.members.remove(&self.member);
                group.held.retain(|_, m| *m != self.member);
                rebalance(inner, group);
            }
        }
        inner.group_changed.send_modify(|v| *v = v.wrapping_add(1));
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn poll(&mut self, timeout: Duration) -> Result<Polled, BusError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.group_changed.borrow_and_update();
            self.check_generation().await?;
            if let Some(event) = self.pending.pop_front() {
                if let Polled::Revoked(tps) = &event {
                    self.release(tps);
                }
                return Ok(event);
            }
            for appended in &mut self.appended {
                appended.borrow_and_update();
            }
            let records = self.fetch().await?;
            if !records.is_empty() {
                return Ok(Polled::Records(records));
            }
            let appended = &mut self.appended;
            let appended = async move {
                match appended.as_mut_slice() {
                    [] => std::future::pending().await,
                    [one] => one.changed().await,
                    many => {
                        futures::future::select_all(many.iter_mut().map(|r| Box::pin(r.changed())))
                            .await
                            .0
                    }
                }
            };
            tokio::select! {
                changed = appended => {
                    if changed.is_err() {
                        return Err(BusError::Closed);
                    }
                }
                _ = self.group_changed.changed() => {}
                () = tokio::time::sleep_until(deadline) => return Ok(Polled::Idle),
            }
        }
    }

    async fn commit(&mut self, positions: &[(TopicPartition, i64)]) -> Result<(), BusError> {
        {
            let groups = self.bus.inner.groups.lock().expect("groups lock");
            // The holder commits: the member that was delivered the
            // partition and has not yet been delivered its revocation.
            let group = groups.get(&self.config.group);
            for (tp, _) in positions {
                if group.is_none_or(|g| g.held.get(tp) != Some(&self.member)) {
                    return Err(BusError::NotAssigned(tp.clone()));
                }
            }
        }
        let (reply, rx) = oneshot::channel();
        self.bus
            .inner
            .writer
            .send(WriteOp::Commit {
                group: self.config.group.clone(),
                positions: positions.to_vec(),
                reply,
            })
            .await
            .map_err(|_| BusError::Closed)?;
        rx.await.map_err(|_| BusError::Closed)?
    }

    async fn seek(&mut self, tp: &TopicPartition, offset: i64) -> Result<(), BusError> {
        let Some(index) = self.assignment.iter().position(|a| a == tp) else {
            return Err(BusError::NotAssigned(tp.clone()));
        };
        self.mark(index, offset.max(0));
        Ok(())
    }

    async fn committed(&mut self, tps: &[TopicPartition]) -> Result<Vec<Option<i64>>, BusError> {
        let mut out = Vec::with_capacity(tps.len());
        for tp in tps {
            out.push(
                sqlx::query_scalar(
                    "SELECT next_offset FROM group_offsets WHERE grp = ? AND topic = ? AND part = ?",
                )
                .bind(&self.config.group)
                .bind(&*tp.topic)
                .bind(i64::from(tp.partition))
                .fetch_optional(&self.bus.inner.readers)
                .await?,
            );
        }
        Ok(out)
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.assignment.clone()
    }

    async fn close(mut self: Box<Self>) -> Result<(), BusError> {
        self.leave();
        Ok(())
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn records(consumer: &mut Box<dyn Consumer>) -> Vec<Record> {
        loop {
            match consumer.poll(Duration::from_secs(5)).await.expect("poll") {
                Polled::Records(records) => return records,
                Polled::Idle => panic!("no records within 5 s"),
                Polled::Assigned(_) | Polled::Revoked(_) => {}
            }
        }
    }

    async fn assigned(consumer: &mut Box<dyn Consumer>) {
        loop {
            match consumer.poll(Duration::from_secs(5)).await.expect("poll") {
                Polled::Assigned(_) => return,
                Polled::Idle => panic!("no assignment within 5 s"),
                Polled::Records(r) => panic!("records before the assignment: {}", r.len()),
                Polled::Revoked(_) => {}
            }
        }
    }

    /// (start, records held, capacity) of the tail of `topic`'s partition 0.
    fn tail(bus: &EmbeddedBus, topic: &str) -> (i64, usize, usize) {
        let topic = bus.topic(topic).expect("topic");
        let tail = topic.partitions[0].tail.read().expect("tail lock");
        (tail.start, tail.records.len(), tail.records.capacity())
    }

    /// A log in `dir` with one topic `t` of one partition.
    async fn one_partition(dir: &tempfile::TempDir) -> EmbeddedBus {
        let bus = EmbeddedBus::open(EmbeddedConfig::new(dir.path().join("log.db")))
            .await
            .expect("open");
        bus.create_topics(&[TopicConfig::log("t", 1)])
            .await
            .expect("topic");
        bus
    }

    /// Produces `v<i>` for every `i` of `range` to `t`.
    async fn produce(bus: &EmbeddedBus, range: std::ops::Range<usize>) {
        for i in range {
            bus.produce("t", b"k", Some(format!("v{i}").as_bytes()))
                .await
                .expect("produce");
        }
    }

    fn value(record: &Record) -> String {
        String::from_utf8(record.value.as_deref().expect("value").to_vec()).expect("utf-8")
    }

    #[tokio::test]
    async fn tails_keep_what_a_consumer_has_yet_to_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bus = one_partition(&dir).await;
        let mut a = bus
            .consumer(ConsumerConfig {
                max_batch: 100,
                ..ConsumerConfig::new("a", &["t"])
            })
            .await
            .expect("consumer a");
        assigned(&mut a).await;
        produce(&bus, 0..300).await;
        let first = records(&mut a).await;
        assert_eq!(first.len(), 100);
        trim_tails(&bus.inner);
        // What `a` has read is gone; what it has not is kept.
        assert_eq!(tail(&bus, "t").0, 100);
        assert_eq!(tail(&bus, "t").1, 200);

        // A consumer from the start reads the trimmed part from the
        // database and the rest from the tail, in order, unchanged.
        let mut b = bus
            .consumer(ConsumerConfig::new("b", &["t"]))
            .await
            .expect("consumer b");
        let mut read = Vec::new();
        while read.len() < 300 {
            read.extend(records(&mut b).await);
        }
        let offsets: Vec<i64> = read.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (0..300).collect::<Vec<i64>>());
        assert!(
            read.iter()
                .enumerate()
                .all(|(i, r)| value(r) == format!("v{i}"))
        );
        // `a` is still at 100: nothing it has to read went.
        trim_tails(&bus.inner);
        assert_eq!(tail(&bus, "t").0, 100);

        let mut rest = Vec::new();
        while rest.len() < 200 {
            rest.extend(records(&mut a).await);
        }
        assert_eq!(rest.first().map(|r| r.offset), Some(100));
        trim_tails(&bus.inner);
        // Both have read everything: the tail keeps its last TAIL_KEEP and
        // gives its room back.
        let (start, held, capacity) = tail(&bus, "t");
        assert_eq!((start, held), (300 - TAIL_KEEP as i64, TAIL_KEEP));
        assert!(capacity <= 4 * TAIL_KEEP, "capacity {capacity}");

        // With no consumer at all, a partition keeps TAIL_KEEP.
        drop((a, b));
        produce(&bus, 300..310).await;
        trim_tails(&bus.inner);
        let (start, held, _) = tail(&bus, "t");
        assert_eq!((start, held), (310 - TAIL_KEEP as i64, TAIL_KEEP));
    }

    #[tokio::test]
    async fn a_consumer_that_seeks_back_keeps_the_tail_from_there() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bus = one_partition(&dir).await;
        let mut a = bus
            .consumer(ConsumerConfig::new("a", &["t"]))
            .await
            .expect("consumer a");
        assigned(&mut a).await;
        produce(&bus, 0..200).await;
        let mut read = 0;
        while read < 200 {
            read += records(&mut a).await.len();
        }
        a.seek(&TopicPartition::new("t", 0), 20)
            .await
            .expect("seek");
        trim_tails(&bus.inner);
        assert_eq!(tail(&bus, "t").0, 20);
        let again = records(&mut a).await;
        assert_eq!(again.first().map(value).as_deref(), Some("v20"));
    }
}
