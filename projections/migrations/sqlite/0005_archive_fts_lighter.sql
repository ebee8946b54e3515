-- The full-text index, lighter to write (measured with
-- benches/projections_ingest.rs, BENCHMARKS.md):
-- * columnsize=0: no per-message row of token counts (the %_docsize table);
--   only bm25 ranking reads it, and no query here ranks.
-- * hashsize 8 MiB: FTS5 buffers terms in memory and writes a segment when
--   the buffer passes this size or at commit; with 1 MiB (the default) one
--   projection transaction of 32,768 records wrote several small segments
--   that then had to be merged.
-- * automerge 8: segments are merged 8 at a time instead of 4, so each
--   entry is rewritten fewer times as the index grows.
-- The index is rebuilt from archive_messages (its content table).
DROP TRIGGER archive_fts_insert;
DROP TRIGGER archive_fts_delete;
DROP TRIGGER archive_fts_update;
DROP TABLE archive_fts;

CREATE VIRTUAL TABLE archive_fts USING fts5(
    body,
    content = 'archive_messages',
    content_rowid = 'row_id',
    columnsize = 0,
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO archive_fts (archive_fts, rank) VALUES ('hashsize', 8388608);
INSERT INTO archive_fts (archive_fts, rank) VALUES ('automerge', 8);
INSERT INTO archive_fts (archive_fts) VALUES ('rebuild');

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
