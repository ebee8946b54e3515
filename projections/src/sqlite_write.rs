//! SQLite's ingest writer: every projection batch (and the compliance API's
//! audit records) written by one thread that owns a synchronous connection
//! (rusqlite), one cached single-row statement per table.
//!
//! Why not sqlx here: through sqlx each statement is a hop to the
//! connection's worker thread and back, every bound value is copied twice
//! (into sqlx's arguments, then by SQLite), and a batch had to be cut into
//! multi-row `INSERT … VALUES` statements of a thousand rows (one SQL text
//! of tens of kilobytes, hashed and compared on every statement-cache
//! lookup) to amortise the hop. A profile of all five projections
//! catching up (BENCHMARKS.md) put a third of the process's time in that
//! machinery; a prepared single-row statement stepped in a loop on the
//! thread that owns the connection has none of it.
//!
//! The connection is the only one writing projection rows; the sqlx pool of
//! [`crate::Database`] still writes API tokens and replays' resets (single
//! statements or transactions that start by writing, which wait for the
//! writer in SQLite's busy handler). Everything that reads before it writes
//! in one transaction (the compliance chain's head) goes through this
//! writer, and its transactions start `IMMEDIATE`, so no transaction here
//! ever works on a snapshot another writer has moved on from.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior, params};
use switchboard_infra::sqlite_wal::{self, WalReset};
use tokio::sync::oneshot;

use crate::compliance::{self, ComplianceRecord};
use crate::db::{Applied, Ops, PositionUpdate, push_owner_token};
use crate::rows::{ArchiveRow, FileRow, RosterOp, SessionOp, SessionStep};
use crate::{ProjectionError, sql};

/// SQLite: one archived message's content (its rowid chosen by the writer).
const MESSAGE_INSERT: &str = "INSERT INTO archive_messages (row_id, archive_id, at_us, kind, \
     message_id, sender, nick, thread, subject, body, stanza) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT (archive_id) DO NOTHING";

/// SQLite: the rowid of a message stored before.
const MESSAGE_ROW: &str = "SELECT row_id FROM archive_messages WHERE archive_id = ?1";

/// SQLite: one message's full-text entry (the index is contentless; the
/// writer gives it the body and the owners' words).
const FTS_INSERT: &str = "INSERT INTO archive_fts (rowid, body, owners) VALUES (?1, ?2, ?3)";

/// SQLite: one archive row (idempotent).
const ARCHIVE_ROW_INSERT: &str = "INSERT INTO archive (owner, archive_id, at_us, peer, \
     peer_full, direction, msg_row) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
     ON CONFLICT (owner, archive_id) DO NOTHING";

/// SQLite: one file-transfer log row (idempotent).
const FILE_INSERT: &str = "INSERT INTO file_transfers (id, at_us, transfer_id, direction, \
     status, uploader, downloader, to_jid, stored_name, real_name, path, size, bytes_transferred, \
     transport, content_type, upload_id, failure_reason, failure_text) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18) \
     ON CONFLICT (id) DO NOTHING";

/// SQLite: one chained compliance record, unless its event is logged
/// already (a conflict on the sequence number stays an error).
const COMPLIANCE_INSERT: &str = "INSERT INTO compliance_log (seq, event_id, event_type, \
     subject, at_us, topic, part, offs, record, prev_hash, hash) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT (event_id) DO NOTHING";

/// What the writer thread is asked to do.
enum Job {
    /// A projection's batch.
    Apply {
        group: String,
        positions: Vec<PositionUpdate>,
        ops: Arc<Ops>,
        /// For archive rows: the work that needs no database, done by the
        /// caller.
        plan: Option<ArchivePlan>,
        reply: oneshot::Sender<Result<Applied, ProjectionError>>,
    },
    /// Records appended to the compliance chain (the API's audit records):
    /// the new head's sequence number.
    Chain {
        entries: Vec<ComplianceRecord>,
        reply: oneshot::Sender<Result<i64, ProjectionError>>,
    },
    /// Close the connection, then reply.
    Close(oneshot::Sender<()>),
}

/// The handle of the writer thread; clones share it.
#[derive(Clone, Debug)]
pub struct Writer {
    jobs: Arc<Mutex<Option<std::sync::mpsc::Sender<Job>>>>,
}

impl Writer {
    /// Opens the writing connection to an existing, migrated database and
    /// starts its thread; `cache_kib` is its page cache.
    pub(crate) fn open(
        path: &Path,
        busy_timeout: Duration,
        cache_kib: u32,
    ) -> Result<Self, ProjectionError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(busy_timeout)?;
        conn.execute_batch(&format!(
            // As the sqlx connections (crate::db): WAL, a crash of the
            // process loses nothing committed, statement journals in memory;
            // checkpoints run beside the writer, not in its commits.
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
             PRAGMA cache_size = -{cache_kib}; PRAGMA temp_store = memory; \
             PRAGMA journal_size_limit = {}; PRAGMA wal_autocheckpoint = 0;",
            sqlite_wal::JOURNAL_SIZE_LIMIT
        ))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("projections-writer".to_owned())
            .spawn(move || run(conn, &rx))
            .map_err(|e| ProjectionError::Task(format!("projections writer thread: {e}")))?;
        Ok(Writer {
            jobs: Arc::new(Mutex::new(Some(tx))),
        })
    }

    fn send(&self, job: Job) -> Result<(), ProjectionError> {
        let jobs = self.jobs.lock().expect("writer lock");
        let sender = jobs.as_ref().ok_or_else(closed)?;
        sender.send(job).map_err(|_| closed())
    }

    /// Applies one batch: positions (compare-and-set) and rows in one
    /// transaction.
    pub(crate) async fn apply(
        &self,
        group: &str,
        positions: &[PositionUpdate],
        ops: Arc<Ops>,
    ) -> Result<Applied, ProjectionError> {
        let plan = match &*ops {
            Ops::Archive(rows) => Some(ArchivePlan::new(rows)?),
            _ => None,
        };
        let (reply, done) = oneshot::channel();
        self.send(Job::Apply {
            group: group.to_owned(),
            positions: positions.to_vec(),
            ops,
            plan,
            reply,
        })?;
        done.await.map_err(|_| closed())?
    }

    /// Chains `entries` after the compliance log's head and appends them;
    /// returns the new head's sequence number.
    pub(crate) async fn chain(
        &self,
        entries: Vec<ComplianceRecord>,
    ) -> Result<i64, ProjectionError> {
        let (reply, done) = oneshot::channel();
        self.send(Job::Chain { entries, reply })?;
        done.await.map_err(|_| closed())?
    }

    /// Finishes the queued jobs and closes the connection.
    pub(crate) async fn close(&self) {
        let sender = self.jobs.lock().expect("writer lock").take();
        if let Some(sender) = sender {
            let (reply, done) = oneshot::channel();
            if sender.send(Job::Close(reply)).is_ok() {
                let _ = done.await;
            }
        }
    }
}

fn closed() -> ProjectionError {
    ProjectionError::Task("the projections database is closed".to_owned())
}

/// The writer thread: jobs in order until closed (or every handle is gone).
fn run(mut conn: Connection, jobs: &std::sync::mpsc::Receiver<Job>) {
    let wal = WalReset::install(&conn, "projections");
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Apply {
                group,
                positions,
                ops,
                plan,
                reply,
            } => {
                let result = apply(&mut conn, &group, &positions, &ops, plan.as_ref());
                wal.after_commit(&conn);
                let _ = reply.send(result);
            }
            Job::Chain { entries, reply } => {
                let result = append_chain(&mut conn, &entries);
                let _ = reply.send(result.map_err(ProjectionError::from));
            }
            Job::Close(reply) => {
                drop(conn);
                let _ = reply.send(());
                return;
            }
        }
    }
}

fn apply(
    conn: &mut Connection,
    group: &str,
    positions: &[PositionUpdate],
    ops: &Ops,
    plan: Option<&ArchivePlan>,
) -> Result<Applied, ProjectionError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    for p in positions {
        if !set_position(&tx, group, p)? {
            // Dropping the transaction rolls it back.
            return Ok(Applied::Conflict);
        }
    }
    match ops {
        Ops::Rosters(ops) => rosters(&tx, ops)?,
        Ops::Sessions(ops) => sessions(&tx, ops)?,
        Ops::Archive(rows) => match plan {
            Some(plan) => archive(&tx, rows, plan)?,
            None => archive(&tx, rows, &ArchivePlan::new(rows)?)?,
        },
        Ops::Files(rows) => files(&tx, rows)?,
        Ops::Compliance(entries) => {
            chain(&tx, entries)?;
        }
    }
    tx.commit()?;
    Ok(Applied::Done)
}

/// Compare-and-set of one position: only from the position the runner read
/// (a first position only where none is stored).
fn set_position(
    tx: &rusqlite::Transaction<'_>,
    group: &str,
    p: &PositionUpdate,
) -> Result<bool, rusqlite::Error> {
    let updated = tx.prepare_cached(sql::UPDATE_POSITION)?.execute(params![
        p.next,
        group,
        &*p.tp.topic,
        p.tp.partition,
        p.expected
    ])?;
    if updated == 1 {
        return Ok(true);
    }
    if p.expected != 0 {
        return Ok(false);
    }
    let inserted = tx.prepare_cached(sql::INSERT_POSITION)?.execute(params![
        group,
        &*p.tp.topic,
        p.tp.partition,
        p.next
    ])?;
    Ok(inserted == 1)
}

fn rosters(tx: &rusqlite::Transaction<'_>, ops: &[RosterOp]) -> Result<(), rusqlite::Error> {
    let mut set = tx.prepare_cached(sql::ROSTER_SET)?;
    let mut remove = tx.prepare_cached(sql::ROSTER_REMOVE)?;
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
                set.execute(params![
                    owner,
                    contact,
                    name,
                    groups,
                    subscription,
                    ask,
                    approved,
                    at_us,
                    event_id
                ])?;
            }
            RosterOp::Remove { owner, contact } => {
                remove.execute(params![owner, contact])?;
            }
        }
    }
    Ok(())
}

fn sessions(tx: &rusqlite::Transaction<'_>, ops: &[SessionOp]) -> Result<(), rusqlite::Error> {
    for op in ops {
        let statement = match op.step {
            SessionStep::Attempted => sql::SESSION_ATTEMPTED,
            SessionStep::Succeeded => sql::SESSION_SUCCEEDED,
            SessionStep::Failed => sql::SESSION_FAILED,
            SessionStep::Bound => sql::SESSION_BOUND,
            SessionStep::Ended => sql::SESSION_ENDED,
        };
        tx.prepare_cached(statement)?.execute(params![
            op.session_id,
            op.user,
            op.protocol,
            op.node,
            op.at_us,
            op.remote_addr,
            op.mechanism,
            op.tls,
            op.reason,
            op.text,
            op.full_jid,
            op.client_name,
            op.client_version,
            op.client_os,
            op.user_agent,
            op.sip_contact
        ])?;
    }
    Ok(())
}

/// An archive batch's work that needs no database, done by the caller
/// before the writer thread takes the batch (that thread is the bottleneck
/// of the SQLite projections, so what can be done elsewhere is).
#[derive(Debug)]
pub(crate) struct ArchivePlan {
    /// The batch's messages in order of first appearance: the index of
    /// their first row, and the owners' words of their full-text entry.
    messages: Vec<(u32, String)>,
    /// Every row, in key order (owner, archive id), with its message's
    /// index in `messages`.
    keyed: Vec<(u32, u32)>,
}

impl ArchivePlan {
    fn new(rows: &[ArchiveRow]) -> Result<Self, ProjectionError> {
        if u32::try_from(rows.len()).is_err() {
            return Err(too_large());
        }
        let mut index: HashMap<&str, u32> = HashMap::with_capacity(rows.len());
        let mut messages: Vec<(u32, String)> = Vec::with_capacity(rows.len());
        let mut keyed: Vec<(u32, u32)> = Vec::with_capacity(rows.len());
        for (i, r) in (0u32..).zip(rows) {
            let next = messages.len() as u32;
            let m = *index.entry(r.archive_id.as_str()).or_insert(next);
            if m == next {
                messages.push((i, String::new()));
            }
            let words = &mut messages[m as usize].1;
            if !words.is_empty() {
                words.push(' ');
            }
            push_owner_token(words, &r.owner);
            keyed.push((i, m));
        }
        // The rows in key order: a batch's rows of one owner then go to
        // neighbouring places of the owner-first B-trees (the key and the
        // `with` index), one descent and a few pages each, rather than one
        // descent per row in arrival order.
        keyed.sort_unstable_by(|&(a, _), &(b, _)| {
            let (a, b) = (&rows[a as usize], &rows[b as usize]);
            (a.owner.as_str(), a.archive_id.as_str())
                .cmp(&(b.owner.as_str(), b.archive_id.as_str()))
        });
        Ok(ArchivePlan { messages, keyed })
    }
}

/// A batch of four billion rows or more (no runner builds one).
fn too_large() -> ProjectionError {
    ProjectionError::Task("an archive batch of 2^32 rows or more".to_owned())
}

/// The content once per message, each new one with the next rowid and its
/// full-text entry (body and the owners' words); then a row per archive, in
/// key order, each pointing at its message's rowid; then the full-text
/// entries of messages stored before (a replay, or a domain newly served),
/// written again from the tables since their owners may have grown.
///
/// Rowids from `MAX(row_id) + 1` on stay free until this transaction
/// commits: it started `IMMEDIATE`, so no other transaction writes
/// meanwhile.
fn archive(
    tx: &rusqlite::Transaction<'_>,
    rows: &[ArchiveRow],
    plan: &ArchivePlan,
) -> Result<(), rusqlite::Error> {
    let mut next: i64 = tx.query_row(sql::SQLITE_NEXT_MESSAGE_ROW, [], |r| r.get(0))?;
    let mut row_ids: Vec<i64> = Vec::with_capacity(plan.messages.len());
    let mut stored_before = Vec::new();
    {
        let mut insert = tx.prepare_cached(MESSAGE_INSERT)?;
        let mut index = tx.prepare_cached(FTS_INSERT)?;
        let mut find = tx.prepare_cached(MESSAGE_ROW)?;
        for (first, owners) in &plan.messages {
            let r = &rows[*first as usize];
            let inserted = insert.execute(params![
                next,
                r.archive_id,
                r.at_us,
                r.kind,
                r.message_id,
                r.sender,
                r.nick,
                r.thread,
                r.subject,
                r.body,
                r.stanza
            ])?;
            if inserted == 1 {
                index.execute(params![next, r.body, owners])?;
                row_ids.push(next);
                next += 1;
            } else {
                let row_id: i64 = find.query_row(params![r.archive_id], |row| row.get(0))?;
                row_ids.push(row_id);
                stored_before.push(row_id);
            }
        }
    }
    let mut insert = tx.prepare_cached(ARCHIVE_ROW_INSERT)?;
    for &(row, message) in &plan.keyed {
        let r = &rows[row as usize];
        insert.execute(params![
            r.owner,
            r.archive_id,
            r.at_us,
            r.peer,
            r.peer_full,
            r.direction,
            row_ids[message as usize]
        ])?;
    }
    let mut delete = tx.prepare_cached(sql::SQLITE_FTS_DELETE)?;
    let mut reindex = tx.prepare_cached(sql::SQLITE_FTS_REINDEX)?;
    for row_id in stored_before {
        delete.execute(params![row_id])?;
        reindex.execute(params![row_id])?;
    }
    Ok(())
}

fn files(tx: &rusqlite::Transaction<'_>, rows: &[FileRow]) -> Result<(), rusqlite::Error> {
    let mut insert = tx.prepare_cached(FILE_INSERT)?;
    for r in rows {
        insert.execute(params![
            r.id,
            r.at_us,
            r.transfer_id,
            r.direction,
            r.status,
            r.uploader,
            r.downloader,
            r.to_jid,
            r.stored_name,
            r.real_name,
            r.path,
            r.size,
            r.bytes_transferred,
            r.transport,
            r.content_type,
            r.upload_id,
            r.failure_reason,
            r.failure_text
        ])?;
    }
    Ok(())
}

/// Chains the entries after the head, each whose event is not logged yet
/// (the same event twice, in the batch or already logged, is recorded
/// once: its insert does nothing and the chain does not move), and moves
/// the head; returns the new head's sequence number.
fn chain(
    tx: &rusqlite::Transaction<'_>,
    entries: &[ComplianceRecord],
) -> Result<i64, rusqlite::Error> {
    let (mut seq, mut hash): (i64, String) =
        tx.query_row(sql::COMPLIANCE_HEAD_SQLITE, [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let head = seq;
    let mut insert = tx.prepare_cached(COMPLIANCE_INSERT)?;
    for e in entries {
        let next = compliance::record_hash_at(e, seq + 1, &hash);
        let inserted = insert.execute(params![
            seq + 1,
            e.event_id,
            e.event_type,
            e.subject,
            e.at_us,
            e.topic,
            e.partition,
            e.offset,
            e.record,
            hash,
            next
        ])?;
        if inserted == 1 {
            seq += 1;
            hash = next;
        }
    }
    if seq != head {
        tx.prepare_cached(sql::COMPLIANCE_SET_HEAD)?
            .execute(params![seq, hash])?;
    }
    Ok(seq)
}

/// The API's audit records, appended to the chain.
fn append_chain(
    conn: &mut Connection,
    entries: &[ComplianceRecord],
) -> Result<i64, rusqlite::Error> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let seq = chain(&tx, entries)?;
    tx.commit()?;
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::owner_token;

    fn row(owner: &str, archive_id: &str) -> ArchiveRow {
        ArchiveRow {
            owner: owner.to_owned(),
            archive_id: archive_id.to_owned(),
            at_us: 1,
            peer: "peer@example.com".to_owned(),
            peer_full: None,
            direction: "in",
            kind: "chat".to_owned(),
            message_id: "m".to_owned(),
            sender: "peer@example.com/a".to_owned(),
            nick: None,
            thread: None,
            subject: None,
            body: Some("hello".to_owned()),
            stanza: "<message/>".to_owned(),
        }
    }

    /// Rows of one message that are not next to each other still make one
    /// message, whose words are its owners in row order; rows come out in
    /// key order with their message's index.
    #[test]
    fn a_plan_groups_a_message_s_rows_wherever_they_are() {
        let rows = [
            row("carol@example.com", "id-1"),
            row("bob@example.com", "id-2"),
            row("alice@example.com", "id-1"),
        ];
        let plan = ArchivePlan::new(&rows).expect("plan");
        let messages: Vec<(u32, &str)> = plan
            .messages
            .iter()
            .map(|(first, words)| (*first, words.as_str()))
            .collect();
        let first = format!(
            "{} {}",
            owner_token("carol@example.com"),
            owner_token("alice@example.com")
        );
        let second = owner_token("bob@example.com");
        assert_eq!(messages, [(0, first.as_str()), (1, second.as_str())]);
        assert_eq!(plan.keyed, [(2, 0), (1, 1), (0, 0)]);
    }
}
