-- The archive rows of a message by its archive id: the compliance API's
-- full-text search finds messages (archive_messages) first and then the
-- archives they are in.
CREATE INDEX archive_by_id ON archive (archive_id);
