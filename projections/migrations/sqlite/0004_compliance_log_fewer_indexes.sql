-- The compliance log is appended to and walked in seq order (verify); no
-- query reads it by time or by subject, and these two indexes were half
-- of the index entries written per record. Dropping them keeps every row.
DROP INDEX IF EXISTS compliance_log_time;
DROP INDEX IF EXISTS compliance_log_subject;
