//! The projections' SQL shared by the backends' code. The text is the same
//! on SQLite and PostgreSQL (`$n` parameters, `ON CONFLICT`) unless a
//! constant says otherwise; SQLite's single-row inserts are in
//! [`crate::sqlite_write`], PostgreSQL's `UNNEST` inserts here.

/// Compare-and-set of a consumer position: only from the position the writer
/// read. `$1` new offset, `$2` group, `$3` topic, `$4` partition, `$5`
/// expected offset.
pub const UPDATE_POSITION: &str = "UPDATE projection_positions SET next_offset = $1 \
     WHERE consumer_group = $2 AND topic = $3 AND part = $4 AND next_offset = $5";

/// The first position of a partition (nothing stored yet).
pub const INSERT_POSITION: &str = "INSERT INTO projection_positions \
     (consumer_group, topic, part, next_offset) VALUES ($1, $2, $3, $4) \
     ON CONFLICT (consumer_group, topic, part) DO NOTHING";

/// Stored positions of a group.
pub const SELECT_POSITIONS: &str =
    "SELECT topic, part, next_offset FROM projection_positions WHERE consumer_group = $1";

/// Forgets a group's positions (replay).
pub const DELETE_POSITIONS: &str = "DELETE FROM projection_positions WHERE consumer_group = $1";

/// RFC 6121 §2.1: a roster item is replaced as a whole.
pub const ROSTER_SET: &str = "INSERT INTO roster_items \
     (owner, contact, name, groups, subscription, ask, approved, updated_us, event_id) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
     ON CONFLICT (owner, contact) DO UPDATE SET name = excluded.name, \
     groups = excluded.groups, subscription = excluded.subscription, ask = excluded.ask, \
     approved = excluded.approved, \
     updated_us = excluded.updated_us, event_id = excluded.event_id";

/// Removes a roster item.
pub const ROSTER_REMOVE: &str = "DELETE FROM roster_items WHERE owner = $1 AND contact = $2";

/// Columns and parameters shared by the session upserts: `$1` session id,
/// `$2` user, `$3` protocol, `$4` node, `$5` event time, `$6` remote address,
/// `$7` mechanism, `$8` tls, `$9` reason, `$10` text, `$11` full address,
/// `$12`-`$15` client name, version, os, user agent, `$16` SIP contact.
macro_rules! session_upsert {
    ($outcome:literal, $reason_cols:literal, $time_col:literal, $update:literal) => {
        concat!(
            "INSERT INTO sessions (session_id, user_jid, protocol, node, first_us, outcome, \
             remote_addr, mechanism, tls, ",
            $reason_cols,
            ", full_jid, client_name, client_version, client_os, user_agent, sip_contact, ",
            $time_col,
            ") VALUES ($1, $2, $3, $4, $5, '",
            $outcome,
            "', $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $5) \
             ON CONFLICT (session_id) DO UPDATE SET ",
            $update
        )
    };
}

/// `session.login_attempted`.
pub const SESSION_ATTEMPTED: &str = session_upsert!(
    "attempted",
    "failure_reason, failure_text",
    "attempted_us",
    "remote_addr = excluded.remote_addr, mechanism = excluded.mechanism, tls = excluded.tls, \
     attempted_us = excluded.attempted_us"
);

/// `session.login_succeeded`.
pub const SESSION_SUCCEEDED: &str = session_upsert!(
    "succeeded",
    "failure_reason, failure_text",
    "succeeded_us",
    "outcome = 'succeeded', succeeded_us = excluded.succeeded_us, \
     remote_addr = excluded.remote_addr, mechanism = excluded.mechanism"
);

/// `session.login_failed`.
pub const SESSION_FAILED: &str = session_upsert!(
    "failed",
    "failure_reason, failure_text",
    "failed_us",
    "outcome = 'failed', failed_us = excluded.failed_us, failure_reason = excluded.failure_reason, \
     failure_text = excluded.failure_text, remote_addr = excluded.remote_addr, \
     mechanism = excluded.mechanism"
);

/// `session.resource_bound` (a SIP registration without login events starts
/// the row as succeeded).
pub const SESSION_BOUND: &str = session_upsert!(
    "succeeded",
    "failure_reason, failure_text",
    "bound_us",
    "full_jid = excluded.full_jid, client_name = excluded.client_name, \
     client_version = excluded.client_version, client_os = excluded.client_os, \
     user_agent = excluded.user_agent, sip_contact = excluded.sip_contact, \
     bound_us = excluded.bound_us"
);

/// `session.ended`.
pub const SESSION_ENDED: &str = session_upsert!(
    "succeeded",
    "end_reason, end_text",
    "ended_us",
    "ended_us = excluded.ended_us, end_reason = excluded.end_reason, \
     end_text = excluded.end_text, full_jid = COALESCE(excluded.full_jid, sessions.full_jid)"
);

/// PostgreSQL's archive message insert without its conflict clause.
macro_rules! pg_archive_messages_unnest {
    () => {
        "INSERT INTO archive_messages (archive_id, at_us, kind, message_id, sender, nick, \
         thread, subject, body, stanza) \
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], \
         $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])"
    };
}

/// PostgreSQL's archive row insert without its conflict clause.
macro_rules! pg_archive_unnest {
    () => {
        "INSERT INTO archive (owner, archive_id, at_us, peer, peer_full, direction) \
         SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], \
         $6::text[])"
    };
}

/// SQLite: the rowid a transaction's first new message may take.
pub const SQLITE_NEXT_MESSAGE_ROW: &str =
    "SELECT COALESCE(MAX(row_id), 0) + 1 FROM archive_messages";

/// SQLite: drops one message's full-text entry.
pub const SQLITE_FTS_DELETE: &str = "DELETE FROM archive_fts WHERE rowid = $1";

/// SQLite: writes one stored message's full-text entry from the tables (its
/// body, and every archive row's owner, as [`crate::db::owner_token`]
/// spells them).
pub const SQLITE_FTS_REINDEX: &str = "INSERT INTO archive_fts (rowid, body, owners) \
     SELECT m.row_id, m.body, (SELECT group_concat(hex(a.owner), ' ') FROM archive a \
     WHERE a.archive_id = m.archive_id) FROM archive_messages m WHERE m.row_id = $1";

/// PostgreSQL: a batch of archived message contents, one array per column.
/// A key already stored fails the statement (see `db::postgres_write::apply`).
pub const PG_ARCHIVE_MESSAGES_UNNEST: &str = pg_archive_messages_unnest!();

/// [`PG_ARCHIVE_MESSAGES_UNNEST`] skipping keys already stored.
pub const PG_ARCHIVE_MESSAGES_UNNEST_SKIP: &str = concat!(
    pg_archive_messages_unnest!(),
    " ON CONFLICT (archive_id) DO NOTHING"
);

/// PostgreSQL: a batch of archive rows, one array per column. A key already
/// stored fails the statement.
pub const PG_ARCHIVE_UNNEST: &str = pg_archive_unnest!();

/// [`PG_ARCHIVE_UNNEST`] skipping keys already stored.
pub const PG_ARCHIVE_UNNEST_SKIP: &str = concat!(
    pg_archive_unnest!(),
    " ON CONFLICT (owner, archive_id) DO NOTHING"
);

/// PostgreSQL: a batch of file-transfer log rows, one array per column.
pub const PG_FILES_UNNEST: &str = "INSERT INTO file_transfers (id, at_us, transfer_id, \
     direction, status, uploader, downloader, to_jid, stored_name, real_name, path, size, \
     bytes_transferred, transport, content_type, upload_id, failure_reason, failure_text) \
     SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[], \
     $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::int8[], \
     $13::int8[], $14::text[], $15::text[], $16::text[], $17::text[], $18::text[]) \
     ON CONFLICT (id) DO NOTHING";

/// PostgreSQL: event ids (one array) already in the compliance log, one
/// probe of the `event_id` index per id. (`event_id = ANY($1)` let the
/// planner pick a parallel scan of the whole log once a batch's array was
/// long enough: a cost growing with the log, paid on every batch.)
pub const PG_COMPLIANCE_EXISTING: &str = "SELECT c.event_id FROM UNNEST($1::text[]) AS u(id) \
     CROSS JOIN LATERAL (SELECT event_id FROM compliance_log WHERE event_id = u.id LIMIT 1) AS c";

/// PostgreSQL: a batch of chained compliance records, one array per column.
pub const PG_COMPLIANCE_UNNEST: &str = "INSERT INTO compliance_log (seq, event_id, event_type, \
     subject, at_us, topic, part, offs, record, prev_hash, hash) \
     SELECT * FROM UNNEST($1::int8[], $2::text[], $3::text[], $4::text[], $5::int8[], \
     $6::text[], $7::int4[], $8::int8[], $9::text[], $10::text[], $11::text[])";

/// One chained compliance record.
pub const COMPLIANCE_INSERT_ONE: &str = "INSERT INTO compliance_log (seq, event_id, event_type, \
     subject, at_us, topic, part, offs, record, prev_hash, hash) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// The chain head (SQLite: the write transaction already serialises writers).
pub const COMPLIANCE_HEAD_SQLITE: &str = "SELECT seq, hash FROM compliance_head WHERE id = 1";

/// The chain head, locked until the transaction ends (PostgreSQL: writers of
/// several instances take turns).
pub const COMPLIANCE_HEAD_POSTGRES: &str =
    "SELECT seq, hash FROM compliance_head WHERE id = 1 FOR UPDATE";

/// Moves the chain head.
pub const COMPLIANCE_SET_HEAD: &str = "UPDATE compliance_head SET seq = $1, hash = $2 WHERE id = 1";

/// Compliance records that were not read from the bus (a rebuild cannot
/// restore them).
pub const COMPLIANCE_COUNT_TOPIC: &str = "SELECT COUNT(*) FROM compliance_log WHERE topic = $1";

/// One page of the chain, in order.
pub const COMPLIANCE_PAGE: &str = "SELECT seq, event_id, event_type, subject, at_us, topic, part, \
     offs, record, prev_hash, hash FROM compliance_log WHERE seq > $1 ORDER BY seq LIMIT $2";

/// SQLite: the append-only triggers, dropped and recreated around a rebuild
/// (the same text as in the migration).
pub const SQLITE_COMPLIANCE_TRIGGERS: [&str; 2] = [
    "CREATE TRIGGER compliance_log_no_update BEFORE UPDATE ON compliance_log BEGIN \
     SELECT RAISE(ABORT, 'the compliance log is append-only'); END",
    "CREATE TRIGGER compliance_log_no_delete BEFORE DELETE ON compliance_log BEGIN \
     SELECT RAISE(ABORT, 'the compliance log is append-only'); END",
];

/// SQLite: copies a compliance log kept in the main file (attached as
/// `old`) by an older version into the compliance file (see
/// `db::move_compliance_log`).
pub const SQLITE_COMPLIANCE_MOVE: [&str; 3] = [
    "INSERT INTO compliance_log SELECT * FROM old.compliance_log ORDER BY seq",
    "UPDATE compliance_head SET seq = (SELECT seq FROM old.compliance_head WHERE id = 1), \
     hash = (SELECT hash FROM old.compliance_head WHERE id = 1) WHERE id = 1",
    "INSERT INTO projection_positions SELECT * FROM old.projection_positions \
     WHERE consumer_group LIKE '%.projection.compliance'",
];

/// SQLite: the compliance groups' positions left in the main file once
/// the compliance log moved.
pub const SQLITE_COMPLIANCE_MOVED_POSITIONS: &str =
    "DELETE FROM projection_positions WHERE consumer_group LIKE '%.projection.compliance'";

/// SQLite: emptying the compliance log for a rebuild.
pub const SQLITE_COMPLIANCE_CLEAR: [&str; 3] = [
    "DROP TRIGGER compliance_log_no_update",
    "DROP TRIGGER compliance_log_no_delete",
    "DELETE FROM compliance_log",
];

/// PostgreSQL: emptying the compliance log for a rebuild (`TRUNCATE` fires no
/// row triggers).
pub const POSTGRES_COMPLIANCE_CLEAR: &str = "TRUNCATE compliance_log";

/// A canonical dump of a projection's rows for comparisons (every column as
/// text, in key order). The compliance dump leaves out the chain columns
/// (`seq`, `prev_hash`, `hash`): a rebuild chains the same records, possibly
/// in another order across partitions.
pub fn snapshot_query(kind: crate::ProjectionKind) -> &'static str {
    use crate::ProjectionKind::*;
    match kind {
        Rosters => {
            "SELECT owner, contact, name, groups, subscription, CAST(ask AS TEXT), CAST(approved AS TEXT), \
             CAST(updated_us AS TEXT), event_id FROM roster_items ORDER BY owner, contact"
        }
        Sessions => {
            "SELECT session_id, user_jid, protocol, node, CAST(first_us AS TEXT), outcome, \
             remote_addr, mechanism, CAST(tls AS TEXT), failure_reason, failure_text, full_jid, \
             client_name, client_version, client_os, user_agent, sip_contact, \
             CAST(attempted_us AS TEXT), CAST(succeeded_us AS TEXT), CAST(failed_us AS TEXT), \
             CAST(bound_us AS TEXT), CAST(ended_us AS TEXT), end_reason, end_text \
             FROM sessions ORDER BY session_id"
        }
        Archive => {
            "SELECT a.owner, a.archive_id, CAST(a.at_us AS TEXT), a.peer, a.peer_full, \
             a.direction, m.kind, m.message_id, m.sender, m.nick, m.thread, m.subject, m.body, \
             m.stanza FROM archive a JOIN archive_messages m ON m.archive_id = a.archive_id \
             ORDER BY a.owner, a.archive_id"
        }
        Files => {
            "SELECT id, CAST(at_us AS TEXT), transfer_id, direction, status, uploader, downloader, \
             to_jid, stored_name, real_name, path, CAST(size AS TEXT), \
             CAST(bytes_transferred AS TEXT), transport, content_type, upload_id, failure_reason, \
             failure_text FROM file_transfers ORDER BY id"
        }
        Compliance => {
            "SELECT event_id, event_type, subject, CAST(at_us AS TEXT), topic, CAST(part AS TEXT), \
             CAST(offs AS TEXT), record FROM compliance_log ORDER BY event_id"
        }
    }
}

/// Empties a projection's tables for a rebuild (the compliance log has its
/// own statements, see [`SQLITE_COMPLIANCE_CLEAR`]).
pub fn clear_statements(kind: crate::ProjectionKind) -> &'static [&'static str] {
    use crate::ProjectionKind::*;
    match kind {
        Rosters => &["DELETE FROM roster_items"],
        Sessions => &["DELETE FROM sessions"],
        Archive => &["DELETE FROM archive", "DELETE FROM archive_messages"],
        Files => &["DELETE FROM file_transfers"],
        Compliance => &["DELETE FROM compliance_log"],
    }
}
