//! The projections' database: SQLite (a file under `data_dir`, the embedded
//! default) or PostgreSQL (`database.url`), each with its own numbered
//! migrations (`projections/migrations/{sqlite,postgres}/`).
//!
//! Every batch is one transaction: compare-and-set of the consumer positions,
//! then the rows. The statements are the same text on both backends; the
//! code that runs them is instantiated once per backend by `backend!`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use switchboard_infra::bus::TopicPartition;

use crate::compliance::{ComplianceRecord, Verification};
use crate::rows::{ArchiveRow, FileRow, RosterOp, SessionOp};
use crate::{ProjectionError, ProjectionKind, sql};

/// How often the SQLite write-ahead log is checkpointed.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(250);
/// How long a SQLite connection waits for another's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Page cache of the main file's writer: its inserts land all over the
/// archive's indexes and full-text index, and 8 MiB in place of 64 cost about
/// 5 % of the ingest (BENCHMARKS.md).
const MAIN_WRITER_CACHE_KIB: u32 = 65_536;
/// Page cache of the compliance file's writer: it appends (records in
/// sequence, event ids time-ordered), so what it caches is pages it does not
/// read again. At 64 MiB it held about 1.6 KiB per idle session at 10,000
/// sessions (every login is a compliance record; BENCHMARKS.md).
const COMPLIANCE_WRITER_CACHE_KIB: u32 = 4096;
/// Records per page when verifying the compliance chain.
const VERIFY_PAGE: i64 = 5000;

/// The position change of one partition in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PositionUpdate {
    /// The partition.
    pub tp: TopicPartition,
    /// The position the writer read (and sought to).
    pub expected: i64,
    /// The position after the batch.
    pub next: i64,
}

/// The rows a batch writes, per projection.
#[derive(Debug)]
pub enum Ops {
    /// Roster changes in order.
    Rosters(Vec<RosterOp>),
    /// Session changes in order.
    Sessions(Vec<SessionOp>),
    /// Archive rows.
    Archive(Vec<ArchiveRow>),
    /// File-transfer log rows.
    Files(Vec<FileRow>),
    /// Compliance entries, not yet chained.
    Compliance(Vec<ComplianceRecord>),
}

impl Ops {
    /// No rows, for a projection.
    pub fn empty(kind: ProjectionKind) -> Self {
        match kind {
            ProjectionKind::Rosters => Ops::Rosters(Vec::new()),
            ProjectionKind::Sessions => Ops::Sessions(Vec::new()),
            ProjectionKind::Archive => Ops::Archive(Vec::new()),
            ProjectionKind::Files => Ops::Files(Vec::new()),
            ProjectionKind::Compliance => Ops::Compliance(Vec::new()),
        }
    }

    /// The rows of consecutive polls as one batch, in order, each row moved
    /// once into a vector of the batch's size. (Extending one vector per
    /// poll regrew it by doubling: in a message burst, with polls of a few
    /// records, the copies and the fresh pages of its regrowths were about
    /// 3 % of the server's CPU.)
    pub fn concat(kind: ProjectionKind, mut parts: Vec<Ops>) -> Ops {
        if parts.len() == 1 {
            return parts.pop().unwrap_or_else(|| Ops::empty(kind));
        }
        let rows = parts.iter().map(Ops::len).sum();
        let mut all = match kind {
            ProjectionKind::Rosters => Ops::Rosters(Vec::with_capacity(rows)),
            ProjectionKind::Sessions => Ops::Sessions(Vec::with_capacity(rows)),
            ProjectionKind::Archive => Ops::Archive(Vec::with_capacity(rows)),
            ProjectionKind::Files => Ops::Files(Vec::with_capacity(rows)),
            ProjectionKind::Compliance => Ops::Compliance(Vec::with_capacity(rows)),
        };
        for part in parts {
            all.extend(part);
        }
        all
    }

    /// Appends the rows of a later batch of the same projection (order is
    /// kept). Rows of another projection are a programming error and are
    /// dropped with a debug assertion.
    fn extend(&mut self, later: Ops) {
        match (self, later) {
            (Ops::Rosters(a), Ops::Rosters(b)) => a.extend(b),
            (Ops::Sessions(a), Ops::Sessions(b)) => a.extend(b),
            (Ops::Archive(a), Ops::Archive(b)) => a.extend(b),
            (Ops::Files(a), Ops::Files(b)) => a.extend(b),
            (Ops::Compliance(a), Ops::Compliance(b)) => a.extend(b),
            (a, b) => debug_assert!(false, "rows of two projections merged: {a:?} / {b:?}"),
        }
    }

    /// Rows (or row changes) this batch writes.
    pub fn len(&self) -> usize {
        match self {
            Ops::Rosters(v) => v.len(),
            Ops::Sessions(v) => v.len(),
            Ops::Archive(v) => v.len(),
            Ops::Files(v) => v.len(),
            Ops::Compliance(v) => v.len(),
        }
    }

    /// Whether the batch writes no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What applying a batch did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Rows and positions are stored.
    Done,
    /// A stored position differs from the expected one (another member or a
    /// replay moved it); nothing was written.
    Conflict,
}

/// An open projections database.
#[derive(Clone, Debug)]
pub enum Database {
    /// SQLite: two files, each with one writer of projection rows (its own
    /// thread and connection, [`crate::sqlite_write`]), one sqlx connection
    /// for the other writes (API tokens, resets) and a pool of readers (see
    /// [`SqliteFile`]).
    Sqlite {
        /// Rosters, sessions, archive, files, API tokens.
        main: Arc<SqliteFile>,
        /// The compliance log.
        compliance: Arc<SqliteFile>,
    },
    /// PostgreSQL.
    Postgres(PgPool),
}

/// One SQLite file of the projections: all migrations are applied to each
/// (the tables a file does not use stay empty), and each has its own
/// writer thread, so the files are written at the same time. The
/// compliance log has a file of its own because one SQLite file takes one
/// writer at a time: with every projection in one file, the archive's and
/// the compliance log's transactions took turns, and the ingest of both was
/// the sum of their times (BENCHMARKS.md).
#[derive(Debug)]
pub struct SqliteFile {
    /// The sqlx writing connection (resets, migrations).
    pub write: SqlitePool,
    /// Read-only connections.
    pub read: SqlitePool,
    /// The writer of projection rows.
    #[doc(hidden)]
    pub writer: crate::sqlite_write::Writer,
}

impl SqliteFile {
    /// Opens a SQLite database file, creating and migrating it.
    async fn open(path: &Path, writer_cache_kib: u32) -> Result<Self, ProjectionError> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(sqlx::Error::Io)?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // A crash of the process loses nothing committed; the projection
            // can be rebuilt from the log after a power loss.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .pragma("cache_size", "-65536")
            // Statement journals (multi-row upserts, triggers) stay in memory.
            .pragma("temp_store", "memory")
            // A write-ahead log that grew in a burst is cut back to this
            // when it starts again (in steady state it is not cut).
            .pragma(
                "journal_size_limit",
                switchboard_infra::sqlite_wal::JOURNAL_SIZE_LIMIT.to_string(),
            );
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone().pragma("wal_autocheckpoint", "0"))
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&write).await?;
        // Checkpoints run beside the writer rather than inside its commits.
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        let watched = write.clone();
        tokio::spawn(async move {
            while !watched.is_closed() {
                tokio::time::sleep(CHECKPOINT_INTERVAL).await;
                if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&checkpointer)
                    .await
                {
                    tracing::debug!(error = %e, "projections checkpoint failed");
                }
            }
            checkpointer.close().await;
        });
        let read = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        let writer = crate::sqlite_write::Writer::open(path, BUSY_TIMEOUT, writer_cache_kib)?;
        Ok(SqliteFile {
            write,
            read,
            writer,
        })
    }

    async fn close(&self) {
        self.writer.close().await;
        self.read.close().await;
        self.write.close().await;
    }
}

/// The compliance log's file beside the main one: `switchboard.db` ->
/// `switchboard-compliance.db`.
pub fn compliance_path(path: &Path) -> std::path::PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name = format!("{stem}-compliance");
    if let Some(ext) = path.extension() {
        name.push('.');
        name.push_str(&ext.to_string_lossy());
    }
    path.with_file_name(name)
}

/// Moves a compliance log that an older version kept in the main file
/// into the compliance file: first a copy (records, head, the compliance
/// groups' positions) in one transaction of the compliance file, unless it
/// holds records already; then the main file's copy is emptied in one
/// transaction of its own. A crash between the two leaves a copy in each,
/// and the next start empties the main file's.
async fn move_compliance_log(
    main_path: &Path,
    main: &SqliteFile,
    compliance: &SqliteFile,
) -> Result<(), ProjectionError> {
    const ANY: &str = "SELECT EXISTS (SELECT 1 FROM compliance_log)";
    if !sqlx::query_scalar::<_, bool>(ANY)
        .fetch_one(&main.write)
        .await?
    {
        return Ok(());
    }
    if !sqlx::query_scalar::<_, bool>(ANY)
        .fetch_one(&compliance.write)
        .await?
    {
        tracing::info!(
            from = %main_path.display(),
            "moving the compliance log into its own file"
        );
        let mut conn = compliance.write.acquire().await?;
        sqlx::query("ATTACH DATABASE $1 AS old")
            .bind(main_path.to_string_lossy().into_owned())
            .execute(&mut *conn)
            .await?;
        let copied = async {
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            for statement in sql::SQLITE_COMPLIANCE_MOVE {
                sqlx::query(statement).execute(&mut *tx).await?;
            }
            tx.commit().await
        }
        .await;
        sqlx::query("DETACH DATABASE old")
            .execute(&mut *conn)
            .await?;
        copied?;
    }
    let mut tx = main.write.begin().await?;
    for statement in sql::SQLITE_COMPLIANCE_CLEAR
        .iter()
        .chain(sql::SQLITE_COMPLIANCE_TRIGGERS.iter())
    {
        sqlx::query(*statement).execute(&mut *tx).await?;
    }
    sqlx::query(sql::COMPLIANCE_SET_HEAD)
        .bind(0i64)
        .bind(crate::compliance::GENESIS_HASH)
        .execute(&mut *tx)
        .await?;
    sqlx::query(sql::SQLITE_COMPLIANCE_MOVED_POSITIONS)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// The SQLite file that holds `kind`.
fn sqlite_file<'a>(
    main: &'a SqliteFile,
    compliance: &'a SqliteFile,
    kind: ProjectionKind,
) -> &'a SqliteFile {
    if kind == ProjectionKind::Compliance {
        compliance
    } else {
        main
    }
}

impl Database {
    /// Opens (and migrates) the database: PostgreSQL when `url` is a
    /// `postgres://` URL, else SQLite at `sqlite_path`.
    pub async fn open(url: &str, sqlite_path: &Path) -> Result<Self, ProjectionError> {
        if url.is_empty() {
            Self::open_sqlite(sqlite_path).await
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Self::open_postgres(url).await
        } else {
            Err(ProjectionError::Url(
                "must be a postgres:// URL, or empty for SQLite".to_owned(),
            ))
        }
    }

    /// Opens a SQLite database file, creating and migrating it, and the
    /// compliance log's file beside it ([`compliance_path`]), moving a
    /// compliance log written before it had a file of its own.
    pub async fn open_sqlite(path: &Path) -> Result<Self, ProjectionError> {
        let main = SqliteFile::open(path, MAIN_WRITER_CACHE_KIB).await?;
        let compliance =
            SqliteFile::open(&compliance_path(path), COMPLIANCE_WRITER_CACHE_KIB).await?;
        move_compliance_log(path, &main, &compliance).await?;
        Ok(Database::Sqlite {
            main: Arc::new(main),
            compliance: Arc::new(compliance),
        })
    }

    /// Connects to PostgreSQL and migrates the schema (in the first schema
    /// of the connection's `search_path`, e.g. `?options[search_path]=x`).
    pub async fn open_postgres(url: &str) -> Result<Self, ProjectionError> {
        let options =
            PgConnectOptions::from_str(url).map_err(|e| ProjectionError::Url(e.to_string()))?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await?;
        Ok(Database::Postgres(pool))
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self {
            Database::Sqlite { .. } => "sqlite",
            Database::Postgres(_) => "postgres",
        }
    }

    /// The SQLite writing pool, if this is SQLite.
    pub fn sqlite(&self) -> Option<&SqlitePool> {
        match self {
            Database::Sqlite { main, .. } => Some(&main.write),
            Database::Postgres(_) => None,
        }
    }

    /// The PostgreSQL pool, if this is PostgreSQL.
    pub fn postgres(&self) -> Option<&PgPool> {
        match self {
            Database::Postgres(pool) => Some(pool),
            Database::Sqlite { .. } => None,
        }
    }

    /// Closes the pools.
    pub async fn close(&self) {
        match self {
            Database::Sqlite { main, compliance } => {
                main.close().await;
                compliance.close().await;
            }
            Database::Postgres(pool) => pool.close().await,
        }
    }

    /// The stored positions of a projection's consumer group (on SQLite,
    /// in the projection's file).
    pub async fn positions(
        &self,
        kind: ProjectionKind,
        group: &str,
    ) -> Result<BTreeMap<TopicPartition, i64>, ProjectionError> {
        match self {
            // A reader sees every committed transaction (WAL), without
            // queueing behind the writer.
            Database::Sqlite { main, compliance } => {
                sqlite::positions(&sqlite_file(main, compliance, kind).read, group).await
            }
            Database::Postgres(pool) => postgres::positions(pool, group).await,
        }
    }

    /// Applies one batch: positions (compare-and-set) and rows in one
    /// transaction. The rows are shared (`Arc`) because SQLite's writer
    /// thread reads them while the caller keeps them for a retry.
    pub async fn apply(
        &self,
        group: &str,
        positions: &[PositionUpdate],
        ops: impl Into<Arc<Ops>>,
    ) -> Result<Applied, ProjectionError> {
        match self {
            Database::Sqlite { main, compliance } => {
                let ops = ops.into();
                let file = match *ops {
                    Ops::Compliance(_) => compliance,
                    _ => main,
                };
                file.writer.apply(group, positions, ops).await
            }
            Database::Postgres(pool) => {
                postgres_write::apply(pool, group, positions, &ops.into()).await
            }
        }
    }

    /// Empties a projection and forgets its positions, in one transaction,
    /// so that its runner rebuilds it from the start of the log. The
    /// compliance log is refused while it holds records that are not on the
    /// bus (the compliance API's audit records), which a rebuild would lose.
    pub async fn reset(&self, kind: ProjectionKind, group: &str) -> Result<(), ProjectionError> {
        if kind == ProjectionKind::Compliance {
            let audits = match self {
                Database::Sqlite { compliance, .. } => {
                    sqlite::count_topic(&compliance.write, crate::compliance::AUDIT_TOPIC).await?
                }
                Database::Postgres(pool) => {
                    postgres::count_topic(pool, crate::compliance::AUDIT_TOPIC).await?
                }
            };
            if audits > 0 {
                return Err(ProjectionError::Refused(format!(
                    "the compliance log holds {audits} audit records of the compliance API that \
                     are not on the bus; a rebuild would lose them"
                )));
            }
        }
        match self {
            Database::Sqlite { main, compliance } => {
                sqlite::reset(&sqlite_file(main, compliance, kind).write, kind, group).await
            }
            Database::Postgres(pool) => postgres::reset(pool, kind, group).await,
        }
    }

    /// Every row of a projection as text, in key order (see
    /// [`crate::sql::snapshot_query`]).
    pub async fn snapshot(
        &self,
        kind: ProjectionKind,
    ) -> Result<Vec<Vec<Option<String>>>, ProjectionError> {
        match self {
            Database::Sqlite { main, compliance } => {
                sqlite::snapshot(&sqlite_file(main, compliance, kind).read, kind).await
            }
            Database::Postgres(pool) => postgres::snapshot(pool, kind).await,
        }
    }

    /// Walks the compliance chain in one consistent snapshot and reports the
    /// first bad record, if any.
    pub async fn verify_compliance(&self) -> Result<Verification, ProjectionError> {
        match self {
            Database::Sqlite { compliance, .. } => sqlite::verify(&compliance.read).await,
            Database::Postgres(pool) => postgres::verify(pool).await,
        }
    }
}

/// The per-backend code: the same statements over `$db`'s pool.
macro_rules! backend {
    ($module:ident, $db:ty, $clear_compliance:expr) => {
        mod $module {
            use sqlx::{Pool, Row};

            use super::*;
            use crate::compliance::{self, Verifier};

            type Db = $db;

            pub(super) async fn positions(
                pool: &Pool<Db>,
                group: &str,
            ) -> Result<BTreeMap<TopicPartition, i64>, ProjectionError> {
                let rows = sqlx::query(sql::SELECT_POSITIONS)
                    .bind(group)
                    .fetch_all(pool)
                    .await?;
                let mut out = BTreeMap::new();
                for row in rows {
                    let topic: String = row.try_get(0)?;
                    let part: i32 = row.try_get(1)?;
                    let next: i64 = row.try_get(2)?;
                    out.insert(TopicPartition::new(&topic, part), next);
                }
                Ok(out)
            }

            pub(super) async fn reset(
                pool: &Pool<Db>,
                kind: ProjectionKind,
                group: &str,
            ) -> Result<(), ProjectionError> {
                let mut tx = pool.begin().await?;
                if kind == ProjectionKind::Compliance {
                    for statement in $clear_compliance {
                        sqlx::query(statement).execute(&mut *tx).await?;
                    }
                    sqlx::query(sql::COMPLIANCE_SET_HEAD)
                        .bind(0i64)
                        .bind(compliance::GENESIS_HASH)
                        .execute(&mut *tx)
                        .await?;
                } else {
                    for statement in sql::clear_statements(kind) {
                        sqlx::query(*statement).execute(&mut *tx).await?;
                    }
                }
                sqlx::query(sql::DELETE_POSITIONS)
                    .bind(group)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }

            pub(super) async fn count_topic(
                pool: &Pool<Db>,
                topic: &str,
            ) -> Result<i64, ProjectionError> {
                Ok(sqlx::query_scalar(sql::COMPLIANCE_COUNT_TOPIC)
                    .bind(topic)
                    .fetch_one(pool)
                    .await?)
            }

            pub(super) async fn snapshot(
                pool: &Pool<Db>,
                kind: ProjectionKind,
            ) -> Result<Vec<Vec<Option<String>>>, ProjectionError> {
                let rows = sqlx::query(sql::snapshot_query(kind))
                    .fetch_all(pool)
                    .await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in rows {
                    let mut cols = Vec::with_capacity(row.len());
                    for i in 0..row.len() {
                        cols.push(row.try_get::<Option<String>, _>(i)?);
                    }
                    out.push(cols);
                }
                Ok(out)
            }

            pub(super) async fn verify(pool: &Pool<Db>) -> Result<Verification, ProjectionError> {
                let mut tx = pool.begin().await?;
                if <Db as sqlx::Database>::NAME == "PostgreSQL" {
                    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                        .execute(&mut *tx)
                        .await?;
                }
                let head = sqlx::query(sql::COMPLIANCE_HEAD_SQLITE)
                    .fetch_one(&mut *tx)
                    .await?;
                let head_seq: i64 = head.try_get(0)?;
                let head_hash: String = head.try_get(1)?;
                let mut verifier = Verifier::default();
                let mut after = 0i64;
                let mut records = 0i64;
                loop {
                    let page = sqlx::query(sql::COMPLIANCE_PAGE)
                        .bind(after)
                        .bind(VERIFY_PAGE)
                        .fetch_all(&mut *tx)
                        .await?;
                    if page.is_empty() {
                        break;
                    }
                    for row in &page {
                        let r = ComplianceRecord {
                            seq: row.try_get(0)?,
                            event_id: row.try_get(1)?,
                            event_type: row.try_get(2)?,
                            subject: row.try_get(3)?,
                            at_us: row.try_get(4)?,
                            topic: row.try_get(5)?,
                            partition: row.try_get(6)?,
                            offset: row.try_get(7)?,
                            record: row.try_get(8)?,
                            prev_hash: row.try_get(9)?,
                            hash: row.try_get(10)?,
                        };
                        after = r.seq;
                        if let Err(b) = verifier.check(&r) {
                            tx.rollback().await?;
                            return Ok(Verification {
                                records,
                                head_hash: verifier.prev_hash.clone(),
                                broken: Some(b),
                            });
                        }
                        records += 1;
                    }
                }
                tx.rollback().await?;
                let broken = verifier.finish(head_seq, &head_hash).err();
                Ok(Verification {
                    records,
                    head_hash: verifier.prev_hash.clone(),
                    broken,
                })
            }
        }
    };
}

backend!(
    sqlite,
    sqlx::Sqlite,
    sql::SQLITE_COMPLIANCE_CLEAR
        .iter()
        .chain(sql::SQLITE_COMPLIANCE_TRIGGERS.iter())
        .copied()
);
backend!(postgres, sqlx::Postgres, [sql::POSTGRES_COMPLIANCE_CLEAR]);

/// SQLite: the word of an archive owner in the full-text index's `owners`
/// column: the hex of its bare address (what SQLite's `hex()` gives for the
/// text, which migration 0006 and [`sql::SQLITE_FTS_REINDEX`] use), one
/// word whatever the address holds.
pub(crate) fn owner_token(owner: &str) -> String {
    let mut out = String::with_capacity(owner.len() * 2);
    push_owner_token(&mut out, owner);
    out
}

/// Appends [`owner_token`] of `owner` to `out` (the ingest path builds a
/// message's words in one string).
pub(crate) fn push_owner_token(out: &mut String, owner: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in owner.bytes() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

/// PostgreSQL's batch writes (SQLite's are [`crate::sqlite_write`]).
mod postgres_write {
    use sqlx::{Pool, Row, Transaction};

    use super::*;
    use crate::compliance;
    use crate::rows::SessionStep;

    type Db = sqlx::Postgres;

    /// Applies a batch with the archive's plain inserts; a key already
    /// stored (the same event twice on the log, in another batch: a
    /// producer retried) fails that transaction, and the batch is applied
    /// again with `ON CONFLICT DO NOTHING`. The conflict checks cost about a
    /// sixth of the archive's statement time (an index probe per row
    /// before its insert, BENCHMARKS.md), and the exactly-once positions
    /// already keep a record from being applied twice, so the common case
    /// goes without them.
    pub(super) async fn apply(
        pool: &Pool<Db>,
        group: &str,
        positions: &[PositionUpdate],
        ops: &Ops,
    ) -> Result<Applied, ProjectionError> {
        match apply_with(pool, group, positions, ops, Conflicts::Fail).await {
            Err(ProjectionError::Sql(sqlx::Error::Database(e))) if e.is_unique_violation() => {
                tracing::debug!(error = %e, group, "batch holds stored keys; applied again skipping them");
                apply_with(pool, group, positions, ops, Conflicts::Skip).await
            }
            other => other,
        }
    }

    /// What the archive's inserts do with a key already stored.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(super) enum Conflicts {
        /// Fail the statement (unique violation).
        Fail,
        /// Skip the row (`ON CONFLICT DO NOTHING`).
        Skip,
    }

    impl Conflicts {
        /// The statement of the two that does this.
        pub(super) fn pick(self, fail: &'static str, skip: &'static str) -> &'static str {
            match self {
                Conflicts::Fail => fail,
                Conflicts::Skip => skip,
            }
        }
    }

    async fn apply_with(
        pool: &Pool<Db>,
        group: &str,
        positions: &[PositionUpdate],
        ops: &Ops,
        conflicts: Conflicts,
    ) -> Result<Applied, ProjectionError> {
        let mut tx = pool.begin().await?;
        for p in positions {
            if !set_position(&mut tx, group, p).await? {
                tx.rollback().await?;
                return Ok(Applied::Conflict);
            }
        }
        match ops {
            Ops::Rosters(ops) => rosters(&mut tx, ops).await?,
            Ops::Sessions(ops) => sessions(&mut tx, ops).await?,
            Ops::Archive(rows) => archive(&mut tx, rows, conflicts).await?,
            Ops::Files(rows) => files(&mut tx, rows).await?,
            Ops::Compliance(entries) => compliance(&mut tx, entries).await?,
        }
        tx.commit().await?;
        Ok(Applied::Done)
    }

    async fn set_position(
        tx: &mut Transaction<'static, Db>,
        group: &str,
        p: &PositionUpdate,
    ) -> Result<bool, ProjectionError> {
        let updated = sqlx::query(sql::UPDATE_POSITION)
            .bind(p.next)
            .bind(group)
            .bind(&*p.tp.topic)
            .bind(p.tp.partition)
            .bind(p.expected)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        if updated == 1 {
            return Ok(true);
        }
        if p.expected != 0 {
            return Ok(false);
        }
        let inserted = sqlx::query(sql::INSERT_POSITION)
            .bind(group)
            .bind(&*p.tp.topic)
            .bind(p.tp.partition)
            .bind(p.next)
            .execute(&mut **tx)
            .await?
            .rows_affected();
        Ok(inserted == 1)
    }

    async fn rosters(
        tx: &mut Transaction<'static, Db>,
        ops: &[RosterOp],
    ) -> Result<(), ProjectionError> {
        for op in ops {
            match op {
                RosterOp::Set {
                    owner,
                    contact,
                    name,
                    groups,
                    subscription,
                    ask,
                    approved,
                    at_us,
                    event_id,
                } => {
                    sqlx::query(sql::ROSTER_SET)
                        .bind(owner)
                        .bind(contact)
                        .bind(name)
                        .bind(groups)
                        .bind(subscription)
                        .bind(*ask)
                        .bind(*approved)
                        .bind(*at_us)
                        .bind(event_id)
                        .execute(&mut **tx)
                        .await?;
                }
                RosterOp::Remove { owner, contact } => {
                    sqlx::query(sql::ROSTER_REMOVE)
                        .bind(owner)
                        .bind(contact)
                        .execute(&mut **tx)
                        .await?;
                }
            }
        }
        Ok(())
    }

    async fn sessions(
        tx: &mut Transaction<'static, Db>,
        ops: &[SessionOp],
    ) -> Result<(), ProjectionError> {
        for op in ops {
            let statement = match op.step {
                SessionStep::Attempted => sql::SESSION_ATTEMPTED,
                SessionStep::Succeeded => sql::SESSION_SUCCEEDED,
                SessionStep::Failed => sql::SESSION_FAILED,
                SessionStep::Bound => sql::SESSION_BOUND,
                SessionStep::Ended => sql::SESSION_ENDED,
            };
            sqlx::query(statement)
                .bind(&op.session_id)
                .bind(&op.user)
                .bind(&op.protocol)
                .bind(&op.node)
                .bind(op.at_us)
                .bind(&op.remote_addr)
                .bind(&op.mechanism)
                .bind(op.tls)
                .bind(&op.reason)
                .bind(&op.text)
                .bind(&op.full_jid)
                .bind(&op.client_name)
                .bind(&op.client_version)
                .bind(&op.client_os)
                .bind(&op.user_agent)
                .bind(&op.sip_contact)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    async fn archive(
        tx: &mut Transaction<'static, Db>,
        rows: &[ArchiveRow],
        conflicts: Conflicts,
    ) -> Result<(), ProjectionError> {
        // The content once per message, then a row per archive.
        let mut ids = BTreeSet::new();
        let messages: Vec<&ArchiveRow> = rows
            .iter()
            .filter(|r| ids.insert(r.archive_id.as_str()))
            .collect();
        postgres_inserts::archive_messages(tx, &messages, conflicts).await?;
        // The rows in key order: a batch's rows of one owner then go
        // to neighbouring places of the owner-first B-trees (the key
        // and the `with` index), one descent and a few pages each,
        // rather than one descent per row in arrival order.
        let mut keyed: Vec<&ArchiveRow> = rows.iter().collect();
        keyed.sort_unstable_by(|a, b| {
            (a.owner.as_str(), a.archive_id.as_str())
                .cmp(&(b.owner.as_str(), b.archive_id.as_str()))
        });
        // The same event twice in one batch is one row.
        keyed.dedup_by(|a, b| a.owner == b.owner && a.archive_id == b.archive_id);
        postgres_inserts::archive(tx, &keyed, conflicts).await
    }

    async fn files(
        tx: &mut Transaction<'static, Db>,
        rows: &[FileRow],
    ) -> Result<(), ProjectionError> {
        postgres_inserts::files(tx, rows).await
    }

    async fn compliance(
        tx: &mut Transaction<'static, Db>,
        entries: &[ComplianceRecord],
    ) -> Result<(), ProjectionError> {
        if entries.is_empty() {
            return Ok(());
        }
        // The same event twice (in the batch or already logged) is
        // recorded once.
        let mut seen = postgres_inserts::existing_events(tx, entries).await?;
        let mut fresh: Vec<ComplianceRecord> = Vec::with_capacity(entries.len());
        for e in entries {
            if seen.insert(e.event_id.clone()) {
                fresh.push(e.clone());
            }
        }
        if fresh.is_empty() {
            return Ok(());
        }
        let head = sqlx::query(sql::COMPLIANCE_HEAD_POSTGRES)
            .fetch_one(&mut **tx)
            .await?;
        let head_seq: i64 = head.try_get(0)?;
        let head_hash: String = head.try_get(1)?;
        let (seq, hash) = compliance::chain(&mut fresh, head_seq, &head_hash);
        postgres_inserts::compliance(tx, &fresh).await?;
        sqlx::query(sql::COMPLIANCE_SET_HEAD)
            .bind(seq)
            .bind(hash)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// PostgreSQL's batch inserts: one statement per table and batch, each
/// column bound as one array and expanded by `UNNEST` (a few binds instead
/// of one per value, one parse and plan for any batch size).
mod postgres_inserts {
    use sqlx::{Postgres, Row, Transaction};

    use super::*;

    type Tx = Transaction<'static, Postgres>;

    /// Rows per statement: large batches are split so that one statement's
    /// arrays stay a few megabytes.
    const CHUNK: usize = 8192;

    /// The messages' contents (the full-text index is a column of the
    /// message, `body_tsv`).
    pub(super) async fn archive_messages(
        tx: &mut Tx,
        messages: &[&ArchiveRow],
        conflicts: postgres_write::Conflicts,
    ) -> Result<(), ProjectionError> {
        let statement = conflicts.pick(
            sql::PG_ARCHIVE_MESSAGES_UNNEST,
            sql::PG_ARCHIVE_MESSAGES_UNNEST_SKIP,
        );
        for chunk in messages.chunks(CHUNK) {
            sqlx::query(statement)
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.archive_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(chunk.iter().map(|r| r.at_us).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.kind.as_str()).collect::<Vec<_>>())
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.message_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(chunk.iter().map(|r| r.sender.as_str()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.nick.as_deref()).collect::<Vec<_>>())
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.thread.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.subject.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(chunk.iter().map(|r| r.body.as_deref()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.stanza.as_str()).collect::<Vec<_>>())
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// The archive rows (PostgreSQL's do not carry their message's row).
    pub(super) async fn archive(
        tx: &mut Tx,
        rows: &[&ArchiveRow],
        conflicts: postgres_write::Conflicts,
    ) -> Result<(), ProjectionError> {
        let statement = conflicts.pick(sql::PG_ARCHIVE_UNNEST, sql::PG_ARCHIVE_UNNEST_SKIP);
        for chunk in rows.chunks(CHUNK) {
            sqlx::query(statement)
                .bind(chunk.iter().map(|r| r.owner.as_str()).collect::<Vec<_>>())
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.archive_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(chunk.iter().map(|r| r.at_us).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.peer.as_str()).collect::<Vec<_>>())
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.peer_full.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(chunk.iter().map(|r| r.direction).collect::<Vec<_>>())
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    pub(super) async fn files(tx: &mut Tx, rows: &[FileRow]) -> Result<(), ProjectionError> {
        for chunk in rows.chunks(CHUNK) {
            sqlx::query(sql::PG_FILES_UNNEST)
                .bind(chunk.iter().map(|r| r.id.as_str()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.at_us).collect::<Vec<_>>())
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.transfer_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(chunk.iter().map(|r| r.direction).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.status).collect::<Vec<_>>())
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.uploader.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.downloader.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(chunk.iter().map(|r| r.to_jid.as_str()).collect::<Vec<_>>())
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.stored_name.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.real_name.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(chunk.iter().map(|r| r.path.as_str()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.size).collect::<Vec<_>>())
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.bytes_transferred)
                        .collect::<Vec<_>>(),
                )
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.transport.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.content_type.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.upload_id.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.failure_reason.as_deref())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.failure_text.as_deref())
                        .collect::<Vec<_>>(),
                )
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// The event ids of `entries` already in the compliance log.
    pub(super) async fn existing_events(
        tx: &mut Tx,
        entries: &[ComplianceRecord],
    ) -> Result<BTreeSet<String>, ProjectionError> {
        let mut seen = BTreeSet::new();
        for chunk in entries.chunks(CHUNK) {
            let ids: Vec<&str> = chunk.iter().map(|e| e.event_id.as_str()).collect();
            for row in sqlx::query(sql::PG_COMPLIANCE_EXISTING)
                .bind(ids)
                .fetch_all(&mut **tx)
                .await?
            {
                let id: String = row.try_get(0)?;
                seen.insert(id);
            }
        }
        Ok(seen)
    }

    pub(super) async fn compliance(
        tx: &mut Tx,
        records: &[ComplianceRecord],
    ) -> Result<(), ProjectionError> {
        for chunk in records.chunks(CHUNK) {
            sqlx::query(sql::PG_COMPLIANCE_UNNEST)
                .bind(chunk.iter().map(|r| r.seq).collect::<Vec<_>>())
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.event_id.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.event_type.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(chunk.iter().map(|r| r.subject.as_str()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.at_us).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.topic.as_str()).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.partition).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.offset).collect::<Vec<_>>())
                .bind(chunk.iter().map(|r| r.record.as_str()).collect::<Vec<_>>())
                .bind(
                    chunk
                        .iter()
                        .map(|r| r.prev_hash.as_str())
                        .collect::<Vec<_>>(),
                )
                .bind(chunk.iter().map(|r| r.hash.as_str()).collect::<Vec<_>>())
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn removal(n: usize) -> RosterOp {
        RosterOp::Remove {
            owner: format!("owner{n}@example.com"),
            contact: "contact@example.com".to_owned(),
        }
    }

    fn owners(ops: &Ops) -> Vec<String> {
        let Ops::Rosters(v) = ops else {
            panic!("not roster ops: {ops:?}")
        };
        v.iter()
            .map(|op| match op {
                RosterOp::Set { owner, .. } | RosterOp::Remove { owner, .. } => owner.clone(),
            })
            .collect()
    }

    #[test]
    fn concat_keeps_every_row_in_poll_order() {
        let part = |r: std::ops::Range<usize>| Ops::Rosters(r.map(removal).collect());
        let all = Ops::concat(
            ProjectionKind::Rosters,
            vec![part(0..3), part(3..3), part(3..7)],
        );
        let expected: Vec<String> = (0..7).map(|n| format!("owner{n}@example.com")).collect();
        assert_eq!(owners(&all), expected);
        let Ops::Rosters(v) = &all else {
            unreachable!()
        };
        assert_eq!(v.capacity(), 7, "sized once");
        assert_eq!(
            owners(&Ops::concat(ProjectionKind::Rosters, vec![part(0..2)])).len(),
            2
        );
        assert!(Ops::concat(ProjectionKind::Rosters, Vec::new()).is_empty());
    }
}
