//! SQLite keeps the compliance log in a file of its own
//! (`switchboard-compliance.db` beside `switchboard.db`). A log that an
//! older version kept in the main file moves there at the next start,
//! with its chain head and its group's positions, also when a crash
//! interrupted an earlier move; new records chain on.

use std::path::Path;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use switchboard_infra::bus::TopicPartition;
use switchboard_projections::compliance::ComplianceRecord;
use switchboard_projections::db::{Ops, PositionUpdate, compliance_path};
use switchboard_projections::{Database, ProjectionKind};

const GROUP: &str = "sb.projection.compliance";
const TOPIC: &str = "sb.messages";

fn entries(from: i64, to: i64) -> Vec<ComplianceRecord> {
    (from..to)
        .map(|n| ComplianceRecord {
            seq: 0,
            event_id: format!("event-{n}"),
            event_type: "message.submitted".to_owned(),
            subject: "alice@example.com".to_owned(),
            at_us: n * 1_000,
            topic: TOPIC.to_owned(),
            partition: 0,
            offset: n,
            record: format!("{{\"n\":{n}}}"),
            prev_hash: String::new(),
            hash: String::new(),
        })
        .collect()
}

async fn append(db: &Database, from: i64, to: i64) {
    let update = PositionUpdate {
        tp: TopicPartition::new(TOPIC, 0),
        expected: from,
        next: to,
    };
    db.apply(GROUP, &[update], Ops::Compliance(entries(from, to)))
        .await
        .expect("apply");
}

/// Rows of `sql` in the file at `path`.
async fn count(path: &Path, sql: &'static str) -> i64 {
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::new().filename(path))
        .await
        .expect("open");
    let n = sqlx::query_scalar(sql)
        .fetch_one(&pool)
        .await
        .expect("count");
    pool.close().await;
    n
}

/// Puts the compliance file's log, head and positions into the main file,
/// as an older version kept them; `keep` leaves the compliance file as it
/// is (a crash after a move's copy, before the main file was emptied).
async fn into_main_file(main: &Path, keep: bool) {
    let compliance = compliance_path(main);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::new().filename(main))
        .await
        .expect("open");
    let mut conn = pool.acquire().await.expect("connection");
    sqlx::query("ATTACH DATABASE $1 AS c")
        .bind(compliance.to_string_lossy().into_owned())
        .execute(&mut *conn)
        .await
        .expect("attach");
    for statement in [
        "INSERT INTO compliance_log SELECT * FROM c.compliance_log",
        "UPDATE compliance_head SET seq = (SELECT seq FROM c.compliance_head), \
         hash = (SELECT hash FROM c.compliance_head)",
        "INSERT INTO projection_positions SELECT * FROM c.projection_positions",
    ] {
        sqlx::query(statement)
            .execute(&mut *conn)
            .await
            .expect(statement);
    }
    sqlx::query("DETACH DATABASE c")
        .execute(&mut *conn)
        .await
        .expect("detach");
    drop(conn);
    pool.close().await;
    if !keep {
        for suffix in ["", "-wal", "-shm"] {
            let mut name = compliance.as_os_str().to_owned();
            name.push(suffix);
            let _ = std::fs::remove_file(&name);
        }
    }
}

async fn moves_into_its_own_file(crash_after_copy: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let main = dir.path().join("switchboard.db");
    let db = Database::open_sqlite(&main).await.expect("open");
    append(&db, 0, 30).await;
    let before = db.snapshot(ProjectionKind::Compliance).await.expect("rows");
    assert_eq!(before.len(), 30);
    db.close().await;
    assert_eq!(
        count(&main, "SELECT COUNT(*) FROM compliance_log").await,
        0,
        "new records go to the compliance file"
    );

    into_main_file(&main, crash_after_copy).await;
    assert_eq!(
        count(&main, "SELECT COUNT(*) FROM compliance_log").await,
        30
    );

    let db = Database::open_sqlite(&main).await.expect("reopen");
    assert_eq!(
        db.snapshot(ProjectionKind::Compliance).await.expect("rows"),
        before,
        "every record moved once"
    );
    let positions = db
        .positions(ProjectionKind::Compliance, GROUP)
        .await
        .expect("positions");
    assert_eq!(positions.get(&TopicPartition::new(TOPIC, 0)), Some(&30));
    let v = db.verify_compliance().await.expect("verify");
    assert_eq!((v.records, v.broken), (30, None));
    // New records chain on the moved head; the stored position fences a
    // writer that read an older one.
    append(&db, 30, 45).await;
    let v = db.verify_compliance().await.expect("verify");
    assert_eq!((v.records, v.broken), (45, None));
    db.close().await;
    for sql in [
        "SELECT COUNT(*) FROM compliance_log",
        "SELECT seq FROM compliance_head",
        "SELECT COUNT(*) FROM projection_positions WHERE consumer_group LIKE '%compliance'",
    ] {
        assert_eq!(count(&main, sql).await, 0, "main file: {sql}");
    }
}

#[tokio::test]
async fn a_compliance_log_in_the_main_file_moves_into_its_own() {
    moves_into_its_own_file(false).await;
}

#[tokio::test]
async fn a_move_interrupted_after_its_copy_completes_without_duplicates() {
    moves_into_its_own_file(true).await;
}

#[test]
fn the_compliance_file_sits_beside_the_main_one() {
    assert_eq!(
        compliance_path(Path::new("/data/switchboard.db")),
        Path::new("/data/switchboard-compliance.db")
    );
    assert_eq!(compliance_path(Path::new("p")), Path::new("p-compliance"));
}
