//! The write-ahead log of a SQLite database written by one thread, with
//! checkpoints run beside it on another connection: the embedded log's
//! (`bus::embedded`) and the projections' files.
//!
//! Under writes that never pause (a message load, a replay, a bulk fill),
//! the passive checkpoints beside the writer never reach the end of the
//! write-ahead log, and SQLite starts the log again only once one does, so
//! it grows without bound (25 GB in two minutes of archive fill). Past
//! [`RESET_BYTES`] in use the writer, the only one and between its
//! transactions, runs a passive checkpoint itself: with no write in between
//! it reaches the end (unless a reader holds an older snapshot; the next
//! transaction tries again), and the next transaction starts the log from
//! the beginning of the same file. Passive, not `TRUNCATE`: that one waits
//! in the busy handler for every reader to leave the log, which stalled
//! producers for tens of milliseconds (BENCHMARKS.md, p99 at 2,000
//! messages/s).

use std::cell::Cell;
use std::ffi::c_int;

use rusqlite::Connection;

/// Size in use of the write-ahead log past which the writer checkpoints it
/// between transactions, so that the log starts again.
pub const RESET_BYTES: i64 = 128 << 20;

/// `journal_size_limit`: what a write-ahead log that starts again is cut
/// to. Above [`RESET_BYTES`], so that in steady state the file is reused
/// from its start and never cut. Cutting it is the writer's work, inside a
/// commit, and freeing the blocks (on a file system mounted with `discard`,
/// a synchronous discard per extent) took 22-32 ms each time: with the
/// limit at 64 MiB, every producer of the embedded log stalled about 50 ms
/// every 1.8 s at 2,000 XMPP messages/s (BENCHMARKS.md). Only a log that
/// grew past this (a reader holding an old snapshot) is cut.
pub const JOURNAL_SIZE_LIMIT: i64 = 256 << 20;

thread_local! {
    /// Frames in the write-ahead log after the last commit on this thread
    /// (a writer's), from SQLite's WAL hook.
    static WAL_FRAMES: Cell<i64> = const { Cell::new(0) };
}

/// SQLite's WAL hook (`sqlite3_wal_hook`): called after each commit, on the
/// committing thread, with the frames now in the log.
fn note_wal_frames(_: &rusqlite::hooks::Wal, frames: c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.with(|f| f.set(i64::from(frames)));
    Ok(())
}

/// Keeps one writer's write-ahead log from growing without bound (see the
/// module's documentation). Lives on the writer's thread.
pub struct WalReset {
    frame_bytes: i64,
    reset_bytes: i64,
    what: &'static str,
}

impl WalReset {
    /// Registers the WAL hook on the writer's connection; to be called on the
    /// thread that commits through it, after `wal_autocheckpoint` was set
    /// (that pragma replaces the hook). `what` names the file in logs.
    pub fn install(conn: &Connection, what: &'static str) -> Self {
        Self::with_reset_bytes(conn, what, RESET_BYTES)
    }

    fn with_reset_bytes(conn: &Connection, what: &'static str, reset_bytes: i64) -> Self {
        conn.wal_hook(Some(note_wal_frames));
        WAL_FRAMES.with(|f| f.set(0));
        // A frame is a page and its 24-byte header.
        let page_size = conn
            .pragma_query_value(None, "page_size", |r| r.get::<_, i64>(0))
            .unwrap_or(4096);
        Self {
            frame_bytes: page_size + 24,
            reset_bytes,
            what,
        }
    }

    /// After a transaction: checkpoints if the log in use (frames since it
    /// started, not the file's size) is past the limit.
    pub fn after_commit(&self, conn: &Connection) {
        if WAL_FRAMES.with(Cell::get) * self.frame_bytes <= self.reset_bytes {
            return;
        }
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            // The next commit reports the new count (small if the log
            // started again, large again if a reader kept it from starting).
            Ok(()) => WAL_FRAMES.with(|f| f.set(0)),
            Err(e) => tracing::warn!(error = %e, file = self.what, "writer's checkpoint failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The log's size in use comes from the WAL hook; past the limit the
    /// writer's checkpoint lets the log start again at the next commit,
    /// from the start of the same file (not cut, so no blocks are freed).
    #[test]
    fn a_large_log_starts_again_in_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("wal.db");
        let conn = Connection::open(&path).expect("open");
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0; \
             PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}; \
             CREATE TABLE t (v BLOB);"
        ))
        .expect("set up");
        let reset_bytes = 1 << 20;
        let write = |n: usize| {
            for _ in 0..n {
                conn.execute("INSERT INTO t (v) VALUES (zeroblob(3000))", [])
                    .expect("insert");
            }
        };
        let frames = || WAL_FRAMES.with(Cell::get);
        // Under the limit nothing happens; the log keeps growing.
        let unbounded = WalReset::with_reset_bytes(&conn, "test", i64::MAX);
        write(600);
        let grown = frames();
        assert!(grown * (4096 + 24) > reset_bytes, "{grown} frames");
        unbounded.after_commit(&conn);
        write(1);
        assert!(frames() > grown);
        let reset = WalReset::with_reset_bytes(&conn, "test", reset_bytes);
        write(1);
        let wal = dir.path().join("wal.db-wal");
        let file_size = std::fs::metadata(&wal).expect("wal").len();
        reset.after_commit(&conn);
        write(1);
        assert!(frames() < 10, "{} frames after the reset", frames());
        assert_eq!(std::fs::metadata(&wal).expect("wal").len(), file_size);
    }
}
