//! The compliance search chooses how to run a full-text search from the
//! term's number of matches (`api::store`). SQLite: from the matches,
//! window by window of time, or in one owner's archive from one query of
//! the term and the owner's word; PostgreSQL: ordered on the messages' time
//! for a common term, from the GIN index for a rare one. Whichever runs,
//! every page must hold exactly the rows a plain scan finds, in time order,
//! also when the messages' rowids do not follow their times and when more
//! messages than one window share a time.

use switchboard_projections::api::store::{self, Cursor, Search};
use switchboard_projections::db::Ops;
use switchboard_projections::rows::ArchiveRow;
use switchboard_projections::{Database, testing};

/// Messages in the dataset; the first `TIED` share one time.
const MESSAGES: u64 = 24_000;
const TIED: u64 = 5_000;
const T0: i64 = 1_767_225_600_000_000;

/// Message `n`: inserted in order `n` (its rowid), at a time that does not
/// follow `n` (a permutation), with "everywhere" in every body, "common" in every other one and
/// "uncommon" in every 97th.
fn message(n: u64) -> ArchiveRow {
    let at_us = if n < TIED {
        T0 + 500_000
    } else {
        // A bijection of TIED..MESSAGES onto itself, far from the identity.
        let k = n - TIED;
        let span = MESSAGES - TIED;
        T0 + ((k * 4_099) % span) as i64 * 1_000
    };
    let from = format!("user{}@example.com", n % 7);
    let to = format!("user{}@example.com", (n + 3) % 7);
    let mut body = format!("message {n} everywhere");
    if n.is_multiple_of(2) {
        body.push_str(" common");
    }
    if n.is_multiple_of(97) {
        body.push_str(" uncommon");
    }
    ArchiveRow {
        owner: from.clone(),
        archive_id: format!("{n:08}"),
        at_us,
        peer: to,
        peer_full: None,
        direction: "out",
        kind: "chat".to_owned(),
        message_id: format!("m{n}"),
        sender: format!("{from}/desk"),
        nick: None,
        thread: None,
        subject: None,
        body: Some(body),
        stanza: "<message/>".to_owned(),
    }
}

/// What the search must return: a plain filter over the dataset, in the
/// search's order (time, archive id, owner).
fn expected(rows: &[ArchiveRow], word: &str, search: &Search) -> Vec<String> {
    let mut hits: Vec<&ArchiveRow> = rows
        .iter()
        .filter(|r| {
            r.body
                .as_deref()
                .is_some_and(|b| b.split(' ').any(|w| w == word))
                && search.start_us.is_none_or(|s| r.at_us >= s)
                && search.end_us.is_none_or(|e| r.at_us < e)
                && search.peer.as_ref().is_none_or(|p| &r.peer == p)
                && search.participant.as_ref().is_none_or(|p| &r.owner == p)
        })
        .collect();
    hits.sort_by(|a, b| {
        (a.at_us, &a.archive_id, &a.owner).cmp(&(b.at_us, &b.archive_id, &b.owner))
    });
    hits.iter().map(|r| r.archive_id.clone()).collect()
}

/// Every page of a search, concatenated.
async fn all_pages(db: &Database, search: &Search, limit: i64) -> Vec<String> {
    let mut out = Vec::new();
    let mut after: Option<Cursor> = None;
    loop {
        let (page, next) = store::page(db, search, after.clone(), limit)
            .await
            .expect("page");
        assert!(page.len() as i64 <= limit);
        out.extend(page.into_iter().map(|m| m.archive_id));
        match next {
            Some(c) => after = Some(c),
            None => return out,
        }
    }
}

#[tokio::test]
async fn sqlite_pages_equal_a_plain_scan() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::open_sqlite(&dir.path().join("p.db"))
        .await
        .expect("sqlite");
    pages_equal_a_plain_scan(&db).await;
    db.close().await;
}

/// PostgreSQL chooses too: a common term ordered on the messages' time, a
/// rare one from the GIN index (`api::store::postgres_common_term`).
#[tokio::test]
async fn postgres_pages_equal_a_plain_scan() {
    let (schema, url) = testing::postgres_schema("search").await;
    let db = Database::open_postgres(&url).await.expect("postgres");
    pages_equal_a_plain_scan(&db).await;
    db.close().await;
    testing::drop_postgres_schema(&schema).await;
}

async fn pages_equal_a_plain_scan(db: &Database) {
    let rows: Vec<ArchiveRow> = (0..MESSAGES).map(message).collect();
    for chunk in rows.chunks(2_000) {
        db.apply("test.archive", &[], Ops::Archive(chunk.to_vec()))
            .await
            .expect("insert");
    }
    check_pages(db, &rows).await;
    if let Some(pool) = db.postgres() {
        // With statistics the common words are known as common, and their
        // searches run ordered on the messages' time.
        sqlx::query("ANALYZE archive_messages")
            .execute(pool)
            .await
            .expect("analyze");
        check_pages(db, &rows).await;
    }
}

async fn check_pages(db: &Database, rows: &[ArchiveRow]) {
    let text = |w: &str| Some(vec![w.to_owned()]);
    let searches = [
        // 12,000 matches: window by window.
        Search {
            text: text("common"),
            ..Search::default()
        },
        // A time range that starts inside the tie and ends inside the rest.
        Search {
            text: text("common"),
            start_us: Some(T0 + 500_000),
            end_us: Some(T0 + 3_000_000),
            ..Search::default()
        },
        // A filter that leaves few of the term's matches.
        Search {
            text: text("common"),
            peer: Some("user3@example.com".to_owned()),
            ..Search::default()
        },
        // A rare term: its matches drive.
        Search {
            text: text("uncommon"),
            ..Search::default()
        },
        // Every message matches: the first window is the smallest (a time
        // range across the tie keeps the pages few).
        Search {
            text: text("everywhere"),
            start_us: Some(T0 + 400_000),
            end_us: Some(T0 + 2_500_000),
            ..Search::default()
        },
        // One owner: message by message.
        Search {
            text: text("common"),
            participant: Some("user5@example.com".to_owned()),
            ..Search::default()
        },
        // One owner, a term in every message, a time range.
        Search {
            text: text("everywhere"),
            participant: Some("user2@example.com".to_owned()),
            start_us: Some(T0 + 2_000_000),
            end_us: Some(T0 + 9_000_000),
            ..Search::default()
        },
    ];
    for search in &searches {
        let want = expected(rows, &search.text.as_ref().unwrap()[0], search);
        assert!(!want.is_empty(), "{search:?}");
        for limit in [211, 977] {
            let got = all_pages(db, search, limit).await;
            assert_eq!(got.len(), want.len(), "{search:?} limit {limit}");
            assert!(got == want, "{search:?} limit {limit}: order differs");
        }
    }
}
