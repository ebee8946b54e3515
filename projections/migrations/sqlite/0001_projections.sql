-- Projections on SQLite (the embedded default). Times are microseconds since
-- the Unix epoch (UTC); ids of archive rows and log rows are the event's
-- UUIDv7 (time-ordered text).

-- Consumer positions, written in the same transaction as the rows.
CREATE TABLE projection_positions (
    consumer_group TEXT NOT NULL,
    topic          TEXT NOT NULL,
    part           INTEGER NOT NULL,
    next_offset    INTEGER NOT NULL,
    PRIMARY KEY (consumer_group, topic, part)
) WITHOUT ROWID;

-- RFC 6121 §2: roster items.
CREATE TABLE roster_items (
    owner        TEXT NOT NULL,
    contact      TEXT NOT NULL,
    name         TEXT,
    groups       TEXT NOT NULL,          -- JSON array, sorted
    subscription TEXT NOT NULL,          -- none | to | from | both
    ask          INTEGER NOT NULL,       -- 1: subscription request pending
    approved     INTEGER NOT NULL,       -- RFC 6121 §3.4 pre-approval
    updated_us   INTEGER NOT NULL,
    event_id     TEXT NOT NULL,
    PRIMARY KEY (owner, contact)
) WITHOUT ROWID;

-- Sessions and logins: one row per session id.
CREATE TABLE sessions (
    session_id     TEXT PRIMARY KEY,
    user_jid       TEXT NOT NULL,
    protocol       TEXT NOT NULL,
    node           TEXT NOT NULL,
    first_us       INTEGER NOT NULL,
    outcome        TEXT NOT NULL,        -- attempted | succeeded | failed
    remote_addr    TEXT,
    mechanism      TEXT,
    tls            INTEGER,
    failure_reason TEXT,
    failure_text   TEXT,
    full_jid       TEXT,
    client_name    TEXT,
    client_version TEXT,
    client_os      TEXT,
    user_agent     TEXT,
    sip_contact    TEXT,
    attempted_us   INTEGER,
    succeeded_us   INTEGER,
    failed_us      INTEGER,
    bound_us       INTEGER,
    ended_us       INTEGER,
    end_reason     TEXT,
    end_text       TEXT
);
CREATE INDEX sessions_user_time ON sessions (user_jid, first_us);
CREATE INDEX sessions_time ON sessions (first_us);

-- Chat archive. The content of each archived message is stored once
-- (archive_messages); each archive it belongs to has a row in archive: both
-- sides of a 1:1 message, the room for room messages.
CREATE TABLE archive_messages (
    row_id     INTEGER PRIMARY KEY,      -- stable rowid for the FTS index
    archive_id TEXT NOT NULL UNIQUE,     -- event id (UUIDv7): time-ordered, unique
    at_us      INTEGER NOT NULL,
    kind       TEXT NOT NULL,            -- chat | normal | headline | groupchat
    message_id TEXT NOT NULL,            -- XEP-0359 origin-id / stanza id
    sender     TEXT NOT NULL,            -- full address of the sender
    nick       TEXT,                     -- room nickname of the sender
    thread     TEXT,
    subject    TEXT,
    body       TEXT,
    stanza     TEXT NOT NULL             -- the stanza as received (evidence)
);
CREATE INDEX archive_messages_time ON archive_messages (at_us);

CREATE TABLE archive (
    owner      TEXT NOT NULL,            -- bare address of the archive's owner (user or room)
    archive_id TEXT NOT NULL,            -- archive_messages.archive_id
    at_us      INTEGER NOT NULL,
    peer       TEXT NOT NULL,            -- bare address of the other side
    peer_full  TEXT,                     -- full address of the other side, if known
    direction  TEXT NOT NULL,            -- out | in | groupchat
    PRIMARY KEY (owner, archive_id)
) WITHOUT ROWID;
CREATE INDEX archive_owner_peer_time ON archive (owner, peer, at_us);

CREATE VIRTUAL TABLE archive_fts USING fts5(
    body,
    content = 'archive_messages',
    content_rowid = 'row_id',
    tokenize = 'unicode61 remove_diacritics 2'
);
CREATE TRIGGER archive_fts_insert AFTER INSERT ON archive_messages BEGIN
    INSERT INTO archive_fts (rowid, body) VALUES (new.row_id, new.body);
END;
CREATE TRIGGER archive_fts_delete AFTER DELETE ON archive_messages BEGIN
    INSERT INTO archive_fts (archive_fts, rowid, body) VALUES ('delete', old.row_id, old.body);
END;
CREATE TRIGGER archive_fts_update AFTER UPDATE ON archive_messages BEGIN
    INSERT INTO archive_fts (archive_fts, rowid, body) VALUES ('delete', old.row_id, old.body);
    INSERT INTO archive_fts (rowid, body) VALUES (new.row_id, new.body);
END;

-- File-transfer log (SPEC.md §9): one row per file.* event.
CREATE TABLE file_transfers (
    id                TEXT PRIMARY KEY,  -- event id (UUIDv7): the sequence
    at_us             INTEGER NOT NULL,
    transfer_id       TEXT NOT NULL,
    direction         TEXT NOT NULL,     -- upload | download
    status            TEXT NOT NULL,     -- started | completed | failed
    uploader          TEXT NOT NULL,
    downloader        TEXT,
    to_jid            TEXT NOT NULL,
    stored_name       TEXT NOT NULL,
    real_name         TEXT NOT NULL,
    path              TEXT NOT NULL,
    size              INTEGER NOT NULL,
    bytes_transferred INTEGER,
    transport         TEXT NOT NULL,     -- http_upload | socks5
    content_type      TEXT,
    upload_id         TEXT,
    failure_reason    TEXT,
    failure_text      TEXT
);
CREATE INDEX file_transfers_time ON file_transfers (at_us);
CREATE INDEX file_transfers_uploader ON file_transfers (uploader, at_us);
CREATE INDEX file_transfers_downloader ON file_transfers (downloader, at_us);

-- Compliance log: append-only hash chain (see projections/src/compliance.rs).
CREATE TABLE compliance_log (
    seq        INTEGER PRIMARY KEY,      -- 1, 2, 3 ... without gaps
    event_id   TEXT NOT NULL UNIQUE,
    event_type TEXT NOT NULL,
    subject    TEXT NOT NULL,
    at_us      INTEGER NOT NULL,
    topic      TEXT NOT NULL,
    part       INTEGER NOT NULL,
    offs       INTEGER NOT NULL,
    record     TEXT NOT NULL,            -- the event as stored in the log (JSON)
    prev_hash  TEXT NOT NULL,            -- hex SHA-256 of the previous record
    hash       TEXT NOT NULL             -- hex SHA-256 of this record's canonical encoding
);
CREATE INDEX compliance_log_time ON compliance_log (at_us);
CREATE INDEX compliance_log_subject ON compliance_log (subject, at_us);

-- The newest record of the chain (seq 0 and the zero hash when empty).
CREATE TABLE compliance_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO compliance_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TRIGGER compliance_log_no_update BEFORE UPDATE ON compliance_log BEGIN
    SELECT RAISE(ABORT, 'the compliance log is append-only');
END;
CREATE TRIGGER compliance_log_no_delete BEFORE DELETE ON compliance_log BEGIN
    SELECT RAISE(ABORT, 'the compliance log is append-only');
END;
