-- The embedded log: topics, their records, and consumer-group positions.
CREATE TABLE topics (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL UNIQUE,
    partitions    INTEGER NOT NULL CHECK (partitions > 0),
    cleanup       TEXT    NOT NULL CHECK (cleanup IN ('delete', 'compact')),
    retention_ms  INTEGER
);

-- One row per record; (tid, part, off) is the record's address. Offsets grow
-- by one per record within a partition; compaction and retention leave gaps.
CREATE TABLE records (
    tid    INTEGER NOT NULL,
    part   INTEGER NOT NULL,
    off    INTEGER NOT NULL,
    key    BLOB    NOT NULL,
    value  BLOB,
    ts     INTEGER NOT NULL,
    PRIMARY KEY (tid, part, off)
) WITHOUT ROWID;

-- Committed consumer-group positions: the offset of the next record to read.
CREATE TABLE group_offsets (
    grp          TEXT    NOT NULL,
    topic        TEXT    NOT NULL,
    part         INTEGER NOT NULL,
    next_offset  INTEGER NOT NULL,
    PRIMARY KEY (grp, topic, part)
) WITHOUT ROWID;
