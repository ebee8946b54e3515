//! The API's SQL: tokens, archive searches (keyset paged) and audit records
//! appended to the compliance chain. The statements are the same on both
//! backends except the full-text condition (SQLite FTS5, PostgreSQL
//! `websearch_to_tsquery` over the `body_tsv` GIN index).

use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{QueryBuilder, Row};

use crate::compliance::{self, QueryAudit};
use crate::{Database, ProjectionError, sql};

/// Prefix of every token (lets scanners recognise leaked tokens).
pub const TOKEN_PREFIX: &str = "sbt_";

/// The roles a token carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads the archive and the compliance log (SPEC.md §10).
    ComplianceOfficer,
    /// Administers the deployment (tokens, users); cannot read the archive.
    Administrator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 2] = [Role::ComplianceOfficer, Role::Administrator];

    /// The name on the command line and in the database.
    pub fn name(self) -> &'static str {
        match self {
            Role::ComplianceOfficer => "compliance-officer",
            Role::Administrator => "administrator",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| TokenError::UnknownRole(s.to_owned()))
    }
}

/// Errors of token management.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] ProjectionError),
    /// An unknown role name.
    #[error("unknown role {0:?} (known: compliance-officer, administrator)")]
    UnknownRole(String),
    /// A token of that name exists (revoked or not).
    #[error("a token named {0:?} exists already")]
    NameTaken(String),
    /// No token of that name.
    #[error("no token named {0:?}")]
    NoSuchToken(String),
    /// A name that is empty, too long or has control characters.
    #[error("invalid token name {0:?}: 1 to 128 characters, no control characters")]
    BadName(String),
    /// No randomness.
    #[error("no randomness for the token: {0}")]
    Random(String),
}

impl From<sqlx::Error> for TokenError {
    fn from(e: sqlx::Error) -> Self {
        TokenError::Db(e.into())
    }
}

/// A token as stored (never the token itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    /// UUIDv7.
    pub id: String,
    /// Who holds it.
    pub name: String,
    /// Its role.
    pub role: String,
    /// Creation time, microseconds since the Unix epoch.
    pub created_us: i64,
    /// Revocation time, if revoked.
    pub revoked_us: Option<i64>,
}

/// The hex SHA-256 of a token: what the database stores. A token is 256
/// random bits, so an unsalted hash is not open to guessing.
pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut out = String::with_capacity(64);
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

pub(crate) fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

/// Creates a token; returns it (the only time it is seen) and its record.
pub async fn create_token(
    db: &Database,
    name: &str,
    role: Role,
) -> Result<(String, TokenInfo), TokenError> {
    if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(TokenError::BadName(name.to_owned()));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| TokenError::Random(e.to_string()))?;
    let mut token = String::from(TOKEN_PREFIX);
    for b in secret {
        token.push_str(&format!("{b:02x}"));
    }
    let info = TokenInfo {
        id: uuid::Uuid::now_v7().to_string(),
        name: name.to_owned(),
        role: role.name().to_owned(),
        created_us: now_us(),
        revoked_us: None,
    };
    let hash = token_hash(&token);
    const INSERT: &str = "INSERT INTO api_tokens (id, name, role, secret_hash, created_us) \
                          VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO NOTHING";
    let inserted = match db {
        Database::Sqlite { main, .. } => sqlx::query(INSERT)
            .bind(&info.id)
            .bind(&info.name)
            .bind(&info.role)
            .bind(&hash)
            .bind(info.created_us)
            .execute(&main.write)
            .await?
            .rows_affected(),
        Database::Postgres(pool) => sqlx::query(INSERT)
            .bind(&info.id)
            .bind(&info.name)
            .bind(&info.role)
            .bind(&hash)
            .bind(info.created_us)
            .execute(pool)
            .await?
            .rows_affected(),
    };
    if inserted == 0 {
        return Err(TokenError::NameTaken(name.to_owned()));
    }
    Ok((token, info))
}

/// Revokes a token by name; revoking twice keeps the first time.
pub async fn revoke_token(db: &Database, name: &str) -> Result<TokenInfo, TokenError> {
    const REVOKE: &str = "UPDATE api_tokens SET revoked_us = COALESCE(revoked_us, $1) \
                          WHERE name = $2";
    let updated = match db {
        Database::Sqlite { main, .. } => sqlx::query(REVOKE)
            .bind(now_us())
            .bind(name)
            .execute(&main.write)
            .await?
            .rows_affected(),
        Database::Postgres(pool) => sqlx::query(REVOKE)
            .bind(now_us())
            .bind(name)
            .execute(pool)
            .await?
            .rows_affected(),
    };
    if updated == 0 {
        return Err(TokenError::NoSuchToken(name.to_owned()));
    }
    list_tokens(db)
        .await?
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| TokenError::NoSuchToken(name.to_owned()))
}

const TOKEN_COLUMNS: &str = "SELECT id, name, role, created_us, revoked_us FROM api_tokens";

macro_rules! token_info {
    ($row:expr) => {
        TokenInfo {
            id: $row.try_get(0)?,
            name: $row.try_get(1)?,
            role: $row.try_get(2)?,
            created_us: $row.try_get(3)?,
            revoked_us: $row.try_get(4)?,
        }
    };
}

/// Every token, oldest first.
pub async fn list_tokens(db: &Database) -> Result<Vec<TokenInfo>, TokenError> {
    let sql = format!("{TOKEN_COLUMNS} ORDER BY id");
    let mut out = Vec::new();
    match db {
        Database::Sqlite { main, .. } => {
            for row in sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_all(&main.write)
                .await?
            {
                out.push(token_info!(row));
            }
        }
        Database::Postgres(pool) => {
            for row in sqlx::query(sqlx::AssertSqlSafe(sql))
                .fetch_all(pool)
                .await?
            {
                out.push(token_info!(row));
            }
        }
    }
    Ok(out)
}

/// The unrevoked token with this text, if any.
pub async fn authenticate(
    db: &Database,
    token: &str,
) -> Result<Option<TokenInfo>, ProjectionError> {
    let sql = format!("{TOKEN_COLUMNS} WHERE secret_hash = $1 AND revoked_us IS NULL");
    let hash = token_hash(token);
    let row = match db {
        Database::Sqlite { main, .. } => {
            match sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(hash)
                .fetch_optional(&main.read)
                .await?
            {
                Some(row) => Some(token_info!(row)),
                None => None,
            }
        }
        Database::Postgres(pool) => {
            match sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(hash)
                .fetch_optional(pool)
                .await?
            {
                Some(row) => Some(token_info!(row)),
                None => None,
            }
        }
    };
    Ok(row)
}

/// Appends an audit record to the compliance chain, serialised with the
/// compliance projection's writer (SQLite: the projections' writer thread;
/// PostgreSQL: the head row locked `FOR UPDATE`).
pub async fn append_audit(db: &Database, audit: &QueryAudit) -> Result<i64, ProjectionError> {
    let pool = match db {
        Database::Sqlite { compliance, .. } => {
            return compliance.writer.chain(vec![audit.entry()]).await;
        }
        Database::Postgres(pool) => pool,
    };
    let mut entries = [audit.entry()];
    let mut tx = pool.begin().await?;
    let head = sqlx::query(sql::COMPLIANCE_HEAD_POSTGRES)
        .fetch_one(&mut *tx)
        .await?;
    let head_seq: i64 = head.try_get(0)?;
    let head_hash: String = head.try_get(1)?;
    let (seq, hash) = compliance::chain(&mut entries, head_seq, &head_hash);
    for r in &entries {
        sqlx::query(sql::COMPLIANCE_INSERT_ONE)
            .bind(r.seq)
            .bind(r.event_id.as_str())
            .bind(r.event_type.as_str())
            .bind(r.subject.as_str())
            .bind(r.at_us)
            .bind(r.topic.as_str())
            .bind(r.partition)
            .bind(r.offset)
            .bind(r.record.as_str())
            .bind(r.prev_hash.as_str())
            .bind(r.hash.as_str())
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(sql::COMPLIANCE_SET_HEAD)
        .bind(seq)
        .bind(hash)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(seq)
}

/// One archived message as the API returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    /// The event id (UUIDv7), shared by both sides of a 1:1 message.
    pub archive_id: String,
    /// Whose archive the row is in (a user or a room).
    pub owner: String,
    /// The other side (the sender, in a room's archive).
    pub peer: String,
    /// The other side's full address, if known.
    pub peer_full: Option<String>,
    /// `out`, `in` or `groupchat`.
    pub direction: String,
    /// Message type.
    pub kind: String,
    /// Stable message id.
    pub message_id: String,
    /// Full address of the sender.
    pub sender: String,
    /// Room nickname.
    pub nick: Option<String>,
    /// Thread.
    pub thread: Option<String>,
    /// Subject.
    pub subject: Option<String>,
    /// Body.
    pub body: Option<String>,
    /// The stanza as received.
    pub stanza: String,
    /// Time, RFC 3339 (UTC, microseconds).
    pub at: String,
    /// Time, microseconds since the Unix epoch.
    pub at_us: i64,
}

/// CSV columns of [`Message`], in order.
pub const CSV_COLUMNS: [&str; 15] = [
    "archive_id",
    "at",
    "at_us",
    "owner",
    "peer",
    "peer_full",
    "direction",
    "kind",
    "message_id",
    "sender",
    "nick",
    "thread",
    "subject",
    "body",
    "stanza",
];

impl Message {
    /// The CSV fields, in [`CSV_COLUMNS`] order.
    pub fn csv_fields(&self) -> [String; 15] {
        let o = |v: &Option<String>| v.clone().unwrap_or_default();
        [
            self.archive_id.clone(),
            self.at.clone(),
            self.at_us.to_string(),
            self.owner.clone(),
            self.peer.clone(),
            o(&self.peer_full),
            self.direction.clone(),
            self.kind.clone(),
            self.message_id.clone(),
            self.sender.clone(),
            o(&self.nick),
            o(&self.thread),
            o(&self.subject),
            o(&self.body),
            self.stanza.clone(),
        ]
    }
}

/// Where a page starts: after this archive row in time order (time, then
/// archive id, then owner: the archive's key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Time of the last row returned.
    pub at_us: i64,
    /// Its archive id.
    pub archive_id: String,
    /// Its owner.
    pub owner: String,
}

/// Longest cursor text accepted.
const MAX_CURSOR_BYTES: usize = 8192;

impl Cursor {
    const VERSION: &'static str = "c2";

    fn of(m: &Message) -> Self {
        Cursor {
            at_us: m.at_us,
            archive_id: m.archive_id.clone(),
            owner: m.owner.clone(),
        }
    }

    /// The opaque text form.
    pub fn encode(&self) -> String {
        format!(
            "{}.{:x}.{}.{}",
            Self::VERSION,
            self.at_us,
            hex(self.archive_id.as_bytes()),
            hex(self.owner.as_bytes())
        )
    }

    /// Parses the text form.
    pub fn decode(s: &str) -> Option<Cursor> {
        if s.len() > MAX_CURSOR_BYTES {
            return None;
        }
        let mut parts = s.split('.');
        if parts.next()? != Self::VERSION {
            return None;
        }
        let at_us = i64::from_str_radix(parts.next()?, 16).ok()?;
        let archive_id = unhex(parts.next()?)?;
        let owner = unhex(parts.next()?)?;
        if parts.next().is_some() || at_us < 0 {
            return None;
        }
        Some(Cursor {
            at_us,
            archive_id,
            owner,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

/// What to look for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Selection {
    /// Archive rows matching filters.
    #[default]
    All,
    /// The messages between two addresses, each once.
    Conversation {
        /// One side.
        a: String,
        /// The other side.
        b: String,
    },
}

/// A search over the archive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Search {
    /// Rows or a conversation.
    pub selection: Selection,
    /// The archive's owner (a user's own archive).
    pub participant: Option<String>,
    /// The other side (the sender, in a room).
    pub peer: Option<String>,
    /// A room's archive.
    pub room: Option<String>,
    /// From this time (inclusive), µs.
    pub start_us: Option<i64>,
    /// Up to this time (exclusive), µs.
    pub end_us: Option<i64>,
    /// Full text: terms and phrases that must all occur (already validated).
    pub text: Option<Vec<String>>,
}

impl Search {
    /// Whether the rows come from one owner's archive (participant, room or
    /// conversation).
    fn one_owner(&self) -> bool {
        self.participant.is_some()
            || self.room.is_some()
            || matches!(self.selection, Selection::Conversation { .. })
    }
}

/// FTS5 query text: each term or phrase quoted, all required, in the
/// `body` column.
pub(crate) fn fts5_query(terms: &[String]) -> String {
    let terms = terms
        .iter()
        .map(|t| format!("\"{}\"", t.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(" ");
    format!("body : ({terms})")
}

/// FTS5 query text of a search restricted to owners' archives: the terms
/// (as [`fts5_query`]) and, for each owner restriction, the owners' words
/// in the `owners` column ([`crate::db::owner_token`]): a participant's or
/// a room's archive, or either side of a conversation. FTS5 intersects the
/// term's and the owner's doclists in one pass, so a term within one
/// participant's archive costs about as many seeks as the participant has
/// matches, not a lookup per archive row.
fn fts5_owner_query(terms: &[String], search: &Search) -> String {
    let word = |owner: &str| format!("\"{}\"", crate::db::owner_token(owner));
    let mut query = fts5_query(terms);
    for owner in search.participant.iter().chain(&search.room) {
        query.push_str(&format!(" AND owners : ({})", word(owner)));
    }
    if let Selection::Conversation { a, b } = &search.selection {
        query.push_str(&format!(" AND owners : ({} OR {})", word(a), word(b)));
    }
    query
}

/// `websearch_to_tsquery` text with the same meaning: each term or phrase
/// quoted (so `or` and `-` are words), all required.
pub(crate) fn websearch_query(terms: &[String]) -> String {
    terms
        .iter()
        .map(|t| format!("\"{}\"", t.replace('"', " ")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The columns of an archive row (one per owner) with its message's content
/// (stored once).
const MESSAGE_COLUMNS: &str = "SELECT a.owner, a.archive_id, a.at_us, a.peer, a.peer_full, \
     a.direction, m.kind, m.message_id, m.sender, m.nick, m.thread, m.subject, m.body, m.stanza ";

/// Archive rows first (the owner's index), then their messages.
const FROM_ARCHIVE: &str =
    "FROM archive a JOIN archive_messages m ON m.archive_id = a.archive_id WHERE 1 = 1";

/// SQLite: the archive rows alone, filtered, checked against the full-text
/// index by their `msg_row`, ordered and cut to the page (the query's end
/// is [`ARCHIVE_FIRST_END`]); only the page's rows are then joined to their
/// messages, by rowid. Joining every candidate first cost a random page of
/// the messages table per row: 1,000 rows for one participant's archive
/// at 10,000,000 messages made a first page take 250 ms (BENCHMARKS.md).
const FROM_ARCHIVE_ROWS: &str = "FROM (SELECT a.owner, a.archive_id, a.at_us, a.peer, \
     a.peer_full, a.direction, a.msg_row FROM archive a WHERE 1 = 1";

/// The end of a [`FROM_ARCHIVE_ROWS`] query, after its `LIMIT`.
const ARCHIVE_FIRST_END: &str =
    ") a JOIN archive_messages m ON m.row_id = a.msg_row ORDER BY a.at_us, a.archive_id, a.owner";

/// Messages in time order first, then their archive rows.
const FROM_MESSAGES_BY_TIME: &str = "FROM archive_messages m INDEXED BY archive_messages_time \
     JOIN archive a ON a.archive_id = m.archive_id WHERE 1 = 1";

/// A full-text term with at least this many matching messages is searched
/// in time order (SQLite: window by window), a rarer one from its matches.
const COMMON_TERM_MATCHES: i64 = 2_000;
/// Messages in the first time window of a common-term search; each next
/// window is twice as large, up to [`MAX_WINDOW_MESSAGES`].
const FIRST_WINDOW_MESSAGES: i64 = 4_096;
/// Most messages in one window.
const MAX_WINDOW_MESSAGES: i64 = 262_144;

/// How a query runs. PostgreSQL's planner chooses from the GIN and btree
/// statistics itself; SQLite knows nothing of how many rows an FTS5 match
/// yields, so the API chooses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// PostgreSQL: `body_tsv @@ websearch_to_tsquery(…)`. With a common
    /// term and no owner, ordered on the message's time, so that the
    /// planner walks the messages' time index and stops at the page; else
    /// on the archive row's time, which leaves it the GIN index (the
    /// matches drive). The API tells common from rare
    /// ([`postgres_common_term`]): the planner estimates every lexeme
    /// missing from the column's statistics (`most_common_elems`) at one
    /// fixed count, so it walked the time index for rare terms too, reading
    /// half a million messages for a term with 767 (BENCHMARKS.md).
    Postgres {
        /// Order on `m.at_us` rather than `a.at_us`.
        message_time: bool,
    },
    /// SQLite without full text, or restricted to one owner's archive: the
    /// archive index drives; with a term, each row's `msg_row` is looked up
    /// among the term's matches within the owner's messages (one FTS5 query,
    /// [`fts5_owner_query`]); only the page is joined to its messages
    /// ([`FROM_ARCHIVE_ROWS`]).
    SqliteArchiveFirst,
    /// SQLite, no owner, a rare term: the term's matches drive.
    SqliteMatchesFirst,
    /// SQLite, no owner, a common term: messages in time order drive, one
    /// window of time at a time, each checked against the term's matches
    /// among the window's rowids (see [`Window`]).
    SqliteTimeFirst(Window),
}

/// One window of a common-term search on SQLite: the messages with
/// `from_us <= at_us < to_us` (no upper bound when `to_us` is `None`), whose
/// rowids all lie in `lo..=hi`. FTS5 reads a term's doclist from a rowid on
/// (`rowid BETWEEN`), so the matches looked at are those of the window's
/// rowid span only: as many as the window holds when rowids follow time (as
/// they do for messages archived as they arrive), never fewer than needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Window {
    from_us: i64,
    to_us: Option<i64>,
    lo: i64,
    hi: i64,
}

fn build<DB: sqlx::Database>(
    q: &mut QueryBuilder<DB>,
    search: &Search,
    plan: Plan,
    after: Option<Cursor>,
    limit: i64,
) where
    for<'t> String: sqlx::Encode<'t, DB>,
    String: sqlx::Type<DB>,
    for<'t> i64: sqlx::Encode<'t, DB>,
    i64: sqlx::Type<DB>,
{
    // The time of an archive row is its message's time; order on the side
    // that drives.
    let (from, time) = match plan {
        Plan::SqliteTimeFirst(_) => (FROM_MESSAGES_BY_TIME, "m.at_us"),
        Plan::Postgres { message_time: true } => (FROM_ARCHIVE, "m.at_us"),
        Plan::SqliteArchiveFirst => (FROM_ARCHIVE_ROWS, "a.at_us"),
        _ => (FROM_ARCHIVE, "a.at_us"),
    };
    q.push(from);
    if let Selection::Conversation { a, b } = &search.selection {
        q.push(" AND a.direction <> 'groupchat' AND ((a.owner = ")
            .push_bind(a.clone())
            .push(" AND a.peer = ")
            .push_bind(b.clone())
            .push(") OR (a.owner = ")
            .push_bind(b.clone())
            .push(" AND a.peer = ")
            .push_bind(a.clone())
            .push(" AND NOT EXISTS (SELECT 1 FROM archive x WHERE x.owner = ")
            .push_bind(a.clone())
            .push(" AND x.archive_id = a.archive_id)))");
    }
    if let Some(room) = &search.room {
        q.push(" AND a.direction = 'groupchat' AND a.owner = ")
            .push_bind(room.clone());
    }
    if let Some(p) = &search.participant {
        q.push(" AND a.owner = ").push_bind(p.clone());
    }
    if let Some(p) = &search.peer {
        q.push(" AND a.peer = ").push_bind(p.clone());
    }
    if let Some(t) = search.start_us {
        q.push(format!(" AND {time} >= ")).push_bind(t);
    }
    if let Some(t) = search.end_us {
        q.push(format!(" AND {time} < ")).push_bind(t);
    }
    if let Some(terms) = &search.text {
        match plan {
            Plan::Postgres { .. } => {
                q.push(" AND m.body_tsv @@ websearch_to_tsquery('simple', ")
                    .push_bind(websearch_query(terms))
                    .push(")");
            }
            Plan::SqliteMatchesFirst => {
                q.push(" AND m.row_id IN (SELECT rowid FROM archive_fts WHERE archive_fts MATCH ")
                    .push_bind(fts5_query(terms))
                    .push(")");
            }
            Plan::SqliteTimeFirst(w) => {
                q.push(" AND m.at_us >= ").push_bind(w.from_us);
                if let Some(to) = w.to_us {
                    q.push(" AND m.at_us < ").push_bind(to);
                }
                q.push(" AND m.row_id IN (SELECT rowid FROM archive_fts WHERE archive_fts MATCH ")
                    .push_bind(fts5_query(terms))
                    .push(" AND rowid BETWEEN ")
                    .push_bind(w.lo)
                    .push(" AND ")
                    .push_bind(w.hi)
                    .push(")");
            }
            Plan::SqliteArchiveFirst => {
                q.push(" AND a.msg_row IN (SELECT rowid FROM archive_fts WHERE archive_fts MATCH ")
                    .push_bind(fts5_owner_query(terms, search))
                    .push(")");
            }
        }
    }
    if let Some(c) = after {
        q.push(format!(" AND ({time} > "))
            .push_bind(c.at_us)
            .push(format!(" OR ({time} = "))
            .push_bind(c.at_us)
            .push(" AND (a.archive_id > ")
            .push_bind(c.archive_id.clone())
            .push(" OR (a.archive_id = ")
            .push_bind(c.archive_id.clone())
            .push(" AND a.owner > ")
            .push_bind(c.owner)
            .push("))))");
    }
    q.push(format!(" ORDER BY {time}, a.archive_id, a.owner LIMIT "))
        .push_bind(limit);
    if plan == Plan::SqliteArchiveFirst {
        q.push(ARCHIVE_FIRST_END);
    }
}

macro_rules! message {
    ($row:expr) => {{
        let at_us: i64 = $row.try_get(2)?;
        Message {
            owner: $row.try_get(0)?,
            archive_id: $row.try_get(1)?,
            at_us,
            peer: $row.try_get(3)?,
            peer_full: $row.try_get(4)?,
            direction: $row.try_get(5)?,
            kind: $row.try_get(6)?,
            message_id: $row.try_get(7)?,
            sender: $row.try_get(8)?,
            nick: $row.try_get(9)?,
            thread: $row.try_get(10)?,
            subject: $row.try_get(11)?,
            body: $row.try_get(12)?,
            stanza: $row.try_get(13)?,
            at: rfc3339(at_us),
        }
    }};
}

/// SQLite: how to run a search (see [`Plan`]); `None` for a common term
/// without an owner, which runs window by window ([`sqlite_windows`]).
async fn sqlite_plan(
    pool: &sqlx::SqlitePool,
    search: &Search,
) -> Result<Option<Plan>, sqlx::Error> {
    let Some(terms) = &search.text else {
        return Ok(Some(Plan::SqliteArchiveFirst));
    };
    if search.one_owner() {
        return Ok(Some(Plan::SqliteArchiveFirst));
    }
    let matches: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT rowid FROM archive_fts WHERE archive_fts MATCH $1 LIMIT $2)",
    )
    .bind(fts5_query(terms))
    .bind(COMMON_TERM_MATCHES)
    .fetch_one(pool)
    .await?;
    Ok((matches < COMMON_TERM_MATCHES).then_some(Plan::SqliteMatchesFirst))
}

/// The next window of at most `size` messages from `from_us` on, in time
/// order: its end is the time of the last message read, exclusive, so that
/// messages sharing that time fall wholly into the next window. `None` when
/// no message is left.
async fn sqlite_window(
    pool: &sqlx::SqlitePool,
    from_us: i64,
    size: i64,
) -> Result<Option<Window>, sqlx::Error> {
    let (n, lo, hi, last): (i64, Option<i64>, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT COUNT(*), MIN(row_id), MAX(row_id), MAX(at_us) FROM (SELECT row_id, at_us \
         FROM archive_messages INDEXED BY archive_messages_time WHERE at_us >= $1 \
         ORDER BY at_us LIMIT $2)",
    )
    .bind(from_us)
    .bind(size)
    .fetch_one(pool)
    .await?;
    let (Some(lo), Some(hi), Some(last)) = (lo, hi, last) else {
        return Ok(None);
    };
    Ok(Some(Window {
        from_us,
        // Fewer than asked: everything from `from_us` on is in the window.
        to_us: (n == size).then_some(last),
        lo,
        hi,
    }))
}

/// A common-term search on SQLite: window after window of messages in time
/// order (doubling in size) until the page is full or the time range ends.
async fn sqlite_windows(
    pool: &sqlx::SqlitePool,
    search: &Search,
    after: Option<&Cursor>,
    fetch: i64,
    out: &mut Vec<Message>,
) -> Result<(), ProjectionError> {
    let mut from_us = search
        .start_us
        .into_iter()
        .chain(after.map(|c| c.at_us))
        .max()
        .unwrap_or(i64::MIN);
    let mut size = FIRST_WINDOW_MESSAGES;
    while (out.len() as i64) < fetch && search.end_us.is_none_or(|end| from_us < end) {
        let Some(window) = sqlite_window(pool, from_us, size).await? else {
            break;
        };
        if window.to_us == Some(from_us) {
            // More than `size` messages share this one time: widen.
            size = size.saturating_mul(2);
            continue;
        }
        let mut q = QueryBuilder::<sqlx::Sqlite>::new(MESSAGE_COLUMNS);
        build(
            &mut q,
            search,
            Plan::SqliteTimeFirst(window),
            after.cloned(),
            fetch - out.len() as i64,
        );
        for row in q.build().fetch_all(pool).await? {
            out.push(message!(row));
        }
        let Some(to) = window.to_us else {
            break;
        };
        from_us = to;
        size = (size * 2).min(MAX_WINDOW_MESSAGES);
    }
    Ok(())
}

/// PostgreSQL: whether a term is common enough for the time-ordered plan.
/// Yes when every lexeme of the terms is among the column's most common
/// elements (`pg_stats.most_common_elems` of `body_tsv`, kept by
/// `ANALYZE`): the planner's estimates are then real and it chooses between
/// walking the time index and the GIN index itself. Otherwise the planner
/// assumes one fixed count, and the matches are counted (up to
/// [`COMMON_TERM_MATCHES`]; such a term is below the statistics' least
/// common element, so the count reads a short GIN list). Counting every
/// term cost a common one up to 60 ms at 10,000,000 messages; going by the
/// statistics alone sent terms with 2,000-12,000 matches to their matches
/// (BENCHMARKS.md).
async fn postgres_common_term(pool: &sqlx::PgPool, terms: &[String]) -> Result<bool, sqlx::Error> {
    let known: Option<bool> = sqlx::query_scalar(
        "SELECT bool_and(l.lexeme = ANY (s.most_common_elems::text::text[])) \
         FROM unnest(to_tsvector('simple', $1)) l, pg_stats s \
         WHERE s.schemaname = current_schema() AND s.tablename = 'archive_messages' \
         AND s.attname = 'body_tsv'",
    )
    .bind(terms.join(" "))
    .fetch_one(pool)
    .await?;
    if known == Some(true) {
        return Ok(true);
    }
    let matches: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT 1 FROM archive_messages \
         WHERE body_tsv @@ websearch_to_tsquery('simple', $1) LIMIT $2) s",
    )
    .bind(websearch_query(terms))
    .bind(COMMON_TERM_MATCHES)
    .fetch_one(pool)
    .await?;
    Ok(matches >= COMMON_TERM_MATCHES)
}

/// RFC 3339 text of a time in microseconds (UTC).
pub fn rfc3339(at_us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(at_us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_default()
}

/// One page of a search: at most `limit` rows after `after`, in time order,
/// and the cursor of the next page when there may be one.
pub async fn page(
    db: &Database,
    search: &Search,
    after: Option<Cursor>,
    limit: i64,
) -> Result<(Vec<Message>, Option<Cursor>), ProjectionError> {
    let mut out = Vec::new();
    // One row more than asked tells whether another page follows.
    let fetch = limit + 1;
    match db {
        Database::Sqlite { main, .. } => {
            if let Some(plan) = sqlite_plan(&main.read, search).await? {
                let mut q = QueryBuilder::<sqlx::Sqlite>::new(MESSAGE_COLUMNS);
                build(&mut q, search, plan, after, fetch);
                for row in q.build().fetch_all(&main.read).await? {
                    out.push(message!(row));
                }
            } else {
                sqlite_windows(&main.read, search, after.as_ref(), fetch, &mut out).await?;
            }
        }
        Database::Postgres(pool) => {
            let mut q = QueryBuilder::<sqlx::Postgres>::new(MESSAGE_COLUMNS);
            let message_time = match &search.text {
                Some(terms) if !search.one_owner() => postgres_common_term(pool, terms).await?,
                _ => false,
            };
            let plan = Plan::Postgres { message_time };
            build(&mut q, search, plan, after, fetch);
            for row in q.build().fetch_all(pool).await? {
                out.push(message!(row));
            }
        }
    }
    let more = out.len() as i64 > limit;
    out.truncate(usize::try_from(limit).unwrap_or(0));
    let next = if more {
        out.last().map(Cursor::of)
    } else {
        None
    };
    Ok((out, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            at_us: 1_700_000_000_123_456,
            archive_id: "0190c0de-0000-7000-8000-000000000001".to_owned(),
            owner: "zoë@example.com".to_owned(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        for bad in [
            "",
            "c2",
            "c2.1",
            "c2.1.61",
            "c1.1.61.62",
            "c2.x.61.62",
            "c2.1.6.62",
            "c2.1.zz.62",
            "c2.1.61.62.63",
            "c2.-1.61.62",
            "c2.1.ff.62",
        ] {
            assert_eq!(Cursor::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn full_text_queries_quote_every_term() {
        let terms = vec!["café".to_owned(), "say \"hi\"".to_owned(), "or".to_owned()];
        assert_eq!(
            fts5_query(&terms),
            "body : (\"café\" \"say \"\"hi\"\"\" \"or\")"
        );
        let search = Search {
            participant: Some("ana@example.com".to_owned()),
            selection: Selection::Conversation {
                a: "ana@example.com".to_owned(),
                b: "b@x".to_owned(),
            },
            ..Search::default()
        };
        assert_eq!(
            fts5_owner_query(&terms[..1], &search),
            "body : (\"café\") AND owners : (\"616E61406578616D706C652E636F6D\") \
             AND owners : (\"616E61406578616D706C652E636F6D\" OR \"624078\")"
        );
        assert_eq!(websearch_query(&terms), "\"café\" \"say  hi \" \"or\"");
    }

    #[test]
    fn token_hash_is_sha256_hex() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            "compliance-officer".parse::<Role>().unwrap(),
            Role::ComplianceOfficer
        );
        assert!("root".parse::<Role>().is_err());
    }
}
