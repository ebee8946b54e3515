-- A full-text search within one owner's archive (a participant, a room, a
-- conversation) on a large archive cost a full-text lookup per row of the
-- owner's archive, each after a join to its message (a random page of the
-- messages table): 1,000 rows for one participant at 10,000,000 messages
-- made a first page take 250 ms (BENCHMARKS.md). Two changes:
--
-- * Each archive row carries its message's rowid (`msg_row`, the
--   message's rowid in archive_fts too), so only the page's rows are
--   joined to their messages.
-- * The full-text index also indexes each message's owners (a token per
--   owner: the hex of its bare address, one word whatever the address
--   holds), so the owner's matches come from one full-text query (the
--   intersection of two doclists), not a lookup per row. The index holds
--   no copy of the text (contentless, deletable by rowid); the projection
--   writes its entries (body and owners) with the rows.
ALTER TABLE archive ADD COLUMN msg_row INTEGER;
UPDATE archive SET msg_row = (
    SELECT m.row_id FROM archive_messages m WHERE m.archive_id = archive.archive_id
);

DROP TRIGGER archive_fts_insert;
DROP TRIGGER archive_fts_delete;
DROP TRIGGER archive_fts_update;
DROP TABLE archive_fts;

CREATE VIRTUAL TABLE archive_fts USING fts5(
    body,
    owners,
    content = '',
    contentless_delete = 1,
    tokenize = 'unicode61 remove_diacritics 2'
);
INSERT INTO archive_fts (archive_fts, rank) VALUES ('hashsize', 8388608);
INSERT INTO archive_fts (archive_fts, rank) VALUES ('automerge', 8);
INSERT INTO archive_fts (rowid, body, owners)
SELECT m.row_id, m.body, (
    SELECT group_concat(hex(a.owner), ' ') FROM archive a WHERE a.archive_id = m.archive_id
)
FROM archive_messages m ORDER BY m.row_id;

CREATE TRIGGER archive_fts_delete AFTER DELETE ON archive_messages BEGIN
    DELETE FROM archive_fts WHERE rowid = old.row_id;
END;
