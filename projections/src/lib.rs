//! SQL projections of the log: rosters, sessions and logins, the chat
//! archive, the file-transfer log and the tamper-evident compliance log
//! (SPEC.md §9-§10), on SQLite (the embedded default) or PostgreSQL.
//!
//! Each projection is a consumer-group member ([`runner`]) that applies a
//! batch of events and stores its consumer position (group, topic, partition,
//! next offset) in the same SQL transaction as the rows ([`db`]). On
//! assignment it seeks to the stored position, so the bus's own commits play
//! no part in correctness: a crash at any point leaves neither a gap nor a
//! duplicate. Position updates are compare-and-set, so a member that lost its
//! partition (or a replay that reset it) cannot write stale rows.
//!
//! Architecture Invariant: the projections read the log and write SQL; they
//! never produce events that others fold. The one exception is [`mam`], which
//! answers XEP-0313 archive queries with deliveries to the asking session.

pub mod api;
pub mod compliance;
pub mod db;
pub mod mam;
pub mod metrics;
pub mod rows;
pub mod runner;
pub mod sql;
#[doc(hidden)]
pub mod sqlite_write;
#[doc(hidden)]
pub mod testing;

use std::fmt;
use std::str::FromStr;

use switchboard_schemas::topics::Topic;

pub use compliance::Profile;
pub use db::Database;
pub use runner::{ProjectionStatus, RunnerConfig, Status};

/// Errors of the projections.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    /// The database returned an error.
    #[error("projection database: {0}")]
    Sql(#[from] sqlx::Error),
    /// SQLite's projection writer returned an error.
    #[error("projection database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database schema could not be migrated.
    #[error("projection database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The bus returned an error.
    #[error("bus: {0}")]
    Bus(#[from] switchboard_infra::bus::BusError),
    /// An unknown projection name.
    #[error("unknown projection {0:?} (known: rosters, sessions, archive, files, compliance)")]
    UnknownProjection(String),
    /// A projection task ended abnormally.
    #[error("projection task failed: {0}")]
    Task(String),
    /// An operation would lose data and was not done.
    #[error("refused: {0}")]
    Refused(String),
    /// The database url is not usable.
    #[error("invalid database url: {0}")]
    Url(String),
}

/// One projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProjectionKind {
    /// Roster items (RFC 6121 §2) from `roster.item_set` / `roster.item_removed`.
    Rosters,
    /// Sessions and logins from `session.*`.
    Sessions,
    /// The chat archive: 1:1 messages (each side) and room messages.
    Archive,
    /// The file-transfer log (SPEC.md §9) from `file.*`.
    Files,
    /// The compliance log: the events of the compliance profile, hash-chained.
    Compliance,
}

impl ProjectionKind {
    /// Every projection, in the order they are started.
    pub const ALL: [ProjectionKind; 5] = [
        ProjectionKind::Rosters,
        ProjectionKind::Sessions,
        ProjectionKind::Archive,
        ProjectionKind::Files,
        ProjectionKind::Compliance,
    ];

    /// The name used on the command line, in metrics and in group names.
    pub fn name(self) -> &'static str {
        match self {
            ProjectionKind::Rosters => "rosters",
            ProjectionKind::Sessions => "sessions",
            ProjectionKind::Archive => "archive",
            ProjectionKind::Files => "files",
            ProjectionKind::Compliance => "compliance",
        }
    }

    /// The consumer group of this projection under a topic prefix.
    pub fn group(self, prefix: &str) -> String {
        format!("{prefix}.projection.{}", self.name())
    }

    /// The topics the projection reads.
    pub fn topics(self, profile: &Profile) -> Vec<Topic> {
        match self {
            ProjectionKind::Rosters => vec![Topic::Roster],
            ProjectionKind::Sessions => vec![Topic::Sessions],
            ProjectionKind::Archive => vec![Topic::Messages, Topic::Rooms],
            ProjectionKind::Files => vec![Topic::Files],
            ProjectionKind::Compliance => profile.topics(),
        }
    }
}

impl fmt::Display for ProjectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ProjectionKind {
    type Err = ProjectionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProjectionKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| ProjectionError::UnknownProjection(s.to_owned()))
    }
}

/// The projections database a configuration names: PostgreSQL at
/// `database.url`, else SQLite at `data_dir/switchboard.db`.
pub async fn open_database(
    config: &switchboard_infra::config::Config,
) -> Result<Database, ProjectionError> {
    Database::open(
        &config.database.url,
        &config.data_path(std::path::Path::new(SQLITE_FILE)),
    )
    .await
}

/// The SQLite file of the embedded default, relative to `data_dir`.
pub const SQLITE_FILE: &str = "switchboard.db";

/// Runner settings from a configuration.
pub fn runner_config(config: &switchboard_infra::config::Config) -> RunnerConfig {
    RunnerConfig {
        local_domains: config
            .domains
            .iter()
            .map(|d| d.to_ascii_lowercase())
            .collect(),
        profile: Profile::from(&config.compliance),
        ..RunnerConfig::new(config.bus.topic_prefix.clone())
    }
}

/// Starts a runner for every projection in `status`; each stops when
/// `shutdown` turns true.
pub fn spawn_all(
    bus: &std::sync::Arc<dyn switchboard_infra::bus::Bus>,
    db: &Database,
    config: &std::sync::Arc<RunnerConfig>,
    status: &Status,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    status
        .all()
        .iter()
        .map(|slot| {
            let task = runner::run(
                bus.clone(),
                db.clone(),
                slot.kind(),
                config.clone(),
                slot.clone(),
                shutdown.clone(),
            );
            let kind = slot.kind();
            tokio::spawn(async move {
                if let Err(e) = task.await {
                    tracing::error!(projection = %kind, error = %e, "projection stopped");
                }
            })
        })
        .collect()
}
