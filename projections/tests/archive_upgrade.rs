//! Upgrading a SQLite archive written before migration 0006: its rows get
//! their message's rowid (`msg_row`), and a full-text search within one
//! owner's archive (which checks the index by `msg_row`, then joins the
//! page's messages by it) finds exactly the matching messages.

use std::path::Path;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use switchboard_projections::Database;
use switchboard_projections::api::store::{self, Search};

/// Message rowids deliberately out of the archive ids' order.
const MESSAGES: [(i64, &str, &str); 4] = [
    (40, "0001", "the budget is approved"),
    (10, "0002", "lunch at noon"),
    (30, "0003", "budget review moved"),
    (20, "0004", "see you at the budget meeting"),
];

#[tokio::test]
async fn rows_archived_before_0006_get_their_message_row_and_are_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("p.db");
    let migrations = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    let migrator = sqlx::migrate::Migrator::new(migrations)
        .await
        .expect("migrations");
    let old = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true),
        )
        .await
        .expect("sqlite");
    migrator.run_to(5, &old).await.expect("migrate to 0005");
    for (i, (row_id, archive_id, body)) in MESSAGES.iter().enumerate() {
        let at_us = 1_000_000 * (i as i64 + 1);
        sqlx::query(
            "INSERT INTO archive_messages (row_id, archive_id, at_us, kind, message_id, sender, \
             body, stanza) VALUES ($1, $2, $3, 'chat', $4, 'alice@example.com/desk', $5, '<message/>')",
        )
        .bind(row_id)
        .bind(archive_id)
        .bind(at_us)
        .bind(format!("m{i}"))
        .bind(body)
        .execute(&old)
        .await
        .expect("message");
        for (owner, peer, direction) in [
            ("alice@example.com", "bob@example.com", "out"),
            ("bob@example.com", "alice@example.com", "in"),
        ] {
            sqlx::query(
                "INSERT INTO archive (owner, archive_id, at_us, peer, direction) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(owner)
            .bind(archive_id)
            .bind(at_us)
            .bind(peer)
            .bind(direction)
            .execute(&old)
            .await
            .expect("archive row");
        }
    }
    old.close().await;

    let db = Database::open_sqlite(&path).await.expect("upgrade");
    let pool = db.sqlite().expect("sqlite pool");
    let unmatched: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM archive a LEFT JOIN archive_messages m \
         ON m.archive_id = a.archive_id WHERE a.msg_row IS NOT m.row_id",
    )
    .fetch_one(pool)
    .await
    .expect("count");
    assert_eq!(unmatched, 0, "every row points at its own message");
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM archive WHERE msg_row IS NOT NULL")
        .fetch_one(pool)
        .await
        .expect("count");
    assert_eq!(rows, 8);

    let search = Search {
        participant: Some("bob@example.com".to_owned()),
        text: Some(vec!["budget".to_owned()]),
        ..Search::default()
    };
    let (page, next) = store::page(&db, &search, None, 10).await.expect("page");
    assert!(next.is_none());
    let found: Vec<(&str, &str, &str)> = page
        .iter()
        .map(|m| {
            (
                m.archive_id.as_str(),
                m.owner.as_str(),
                m.body.as_deref().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            ("0001", "bob@example.com", "the budget is approved"),
            ("0003", "bob@example.com", "budget review moved"),
            ("0004", "bob@example.com", "see you at the budget meeting"),
        ]
    );
    db.close().await;
}

/// A 1:1 message archived on both sides, as the archive projection stores it.
fn rows(n: u32) -> Vec<switchboard_projections::rows::ArchiveRow> {
    use switchboard_projections::rows::ArchiveRow;
    let row = |owner: &str, peer: &str, direction: &'static str| ArchiveRow {
        owner: owner.to_owned(),
        archive_id: format!("{n:04}"),
        at_us: i64::from(n) * 1_000,
        peer: peer.to_owned(),
        peer_full: None,
        direction,
        kind: "chat".to_owned(),
        message_id: format!("m{n}"),
        sender: "alice@example.com/desk".to_owned(),
        nick: None,
        thread: None,
        subject: None,
        body: Some(format!("note {n} budget")),
        stanza: "<message/>".to_owned(),
    };
    vec![
        row("alice@example.com", "bob@example.com", "out"),
        row("bob@example.com", "alice@example.com", "in"),
    ]
}

#[tokio::test]
async fn a_batch_repeating_stored_messages_points_every_row_at_the_stored_one() {
    use switchboard_projections::db::Ops;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::open_sqlite(&dir.path().join("p.db"))
        .await
        .expect("sqlite");
    // 0..1500 archived on the sender's side only (as when the recipient's
    // domain was not yet served); then 1000..2500 on both sides (messages
    // already stored get their recipient's row: the first chunk of 1,024
    // messages mixes stored and new ones, the next is all new); then
    // 0..2500 again.
    for (range, sides) in [(0..1500, 1), (1000..2500, 2), (0..2500, 2)] {
        let batch: Vec<_> = range
            .flat_map(|n| rows(n).into_iter().take(sides))
            .collect();
        db.apply("test.archive", &[], Ops::Archive(batch))
            .await
            .expect("apply");
    }
    let pool = db.sqlite().expect("sqlite pool");
    let (messages, archive, unmatched): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM archive_messages), (SELECT COUNT(*) FROM archive), \
         (SELECT COUNT(*) FROM archive a LEFT JOIN archive_messages m \
          ON m.archive_id = a.archive_id WHERE a.msg_row IS NOT m.row_id)",
    )
    .fetch_one(pool)
    .await
    .expect("counts");
    assert_eq!((messages, archive, unmatched), (2500, 5000, 0));
    let search = Search {
        participant: Some("bob@example.com".to_owned()),
        text: Some(vec!["budget".to_owned()]),
        ..Search::default()
    };
    let (page, _) = store::page(&db, &search, None, 3000).await.expect("page");
    let found: Vec<(String, Option<String>)> =
        page.into_iter().map(|m| (m.archive_id, m.body)).collect();
    let want: Vec<(String, Option<String>)> = (0..2500)
        .map(|n| (format!("{n:04}"), Some(format!("note {n} budget"))))
        .collect();
    assert_eq!(found, want);
    db.close().await;
}
