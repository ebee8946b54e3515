-- PostgreSQL's archive never used `archive_messages.row_id` (SQLite's
-- full-text index needs integer rowids; here the full text is a column of
-- the message): the archive id is the key. One index entry fewer per
-- archived message (about 3 % of the archive's statement time,
-- BENCHMARKS.md). Dropping the column drops its primary key; the table is
-- not rewritten.
ALTER TABLE archive_messages DROP COLUMN row_id;
