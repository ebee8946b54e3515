//! XEP-0313 page latency: one archive query as the MAM responder runs it
//! (`switchboard_projections::mam::run_query`: the id check, the page and
//! the count) against a filled archive, on SQLite and PostgreSQL.
//!
//! The dataset: `BENCH_MESSAGES` one-to-one messages (default 1,000,000)
//! among `BENCH_USERS` users (default 2,000; each writes to 20 regular
//! peers), 1 ms apart, each archived on both sides (two archive rows per
//! message, as the archive projection writes them), written through the
//! projection's own batch insert, then `VACUUM ANALYZE` (PostgreSQL) or
//! `ANALYZE` (SQLite). Then,
//! per query shape, `BENCH_QUERIES` (default 2,000) queries of random
//! users, one at a time, each timed:
//! * `first page`: the oldest 50;
//! * `last page`: the newest 50 (RSM `<before/>`, what clients ask first);
//! * `page after id`: 50 after a random message of the user's archive;
//! * `with peer, last page`: the newest 50 with one peer (`with` bare);
//! * `time range, last page`: the newest 50 within a random tenth of the
//!   time span (`start`/`end`).
//!
//! `cargo bench --bench mam_page` (PostgreSQL from
//! `infra/scripts/postgres.sh start`, database switchboard_test, a fresh
//! schema per run; `SWITCHBOARD_TEST_POSTGRES` names another;
//! `BENCH_BACKENDS=sqlite` or `postgres` runs one). Prints a Markdown table
//! for BENCHMARKS.md.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchboard_projections::Database;
use switchboard_projections::db::Ops;
use switchboard_projections::mam::{Answer, ArchiveQuery, With, run_query};
use switchboard_projections::rows::ArchiveRow;

/// Archive times start here (µs); message `i` is `i` ms later.
const T0: i64 = 1_767_605_400_000_000;
/// Messages per insert transaction.
const BATCH: usize = 5_000;
const PAGE: u32 = 50;
/// Peers each user writes to.
const PEERS: usize = 20;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

fn user(n: usize) -> String {
    format!("user{n}@example.com")
}

fn aid(i: usize) -> String {
    format!("0196a5d2-7c3e-7000-8000-{i:012x}")
}

/// Message `i`: from user `i % users`, whose `k`-th message it is, to one
/// of the sender's 20 regular peers (never the sender itself).
fn parties(i: usize, users: usize) -> (usize, usize) {
    let from = i % users;
    let k = i / users;
    let to = (from + 1 + (k % PEERS) * 97) % users;
    (from, if to == from { (to + 1) % users } else { to })
}

fn rows(i: usize, users: usize) -> [ArchiveRow; 2] {
    let (from, to) = parties(i, users);
    let (from, to) = (user(from), user(to));
    let body = format!("message {i}: the quarterly numbers look fine, see you at the review");
    let out = ArchiveRow {
        owner: from.clone(),
        archive_id: aid(i),
        at_us: T0 + i as i64 * 1000,
        peer: to.clone(),
        peer_full: None,
        direction: "out",
        kind: "chat".to_owned(),
        message_id: format!("m{i}"),
        sender: format!("{from}/desk"),
        nick: None,
        thread: None,
        subject: None,
        stanza: format!(
            "<message xmlns=\"jabber:client\" from=\"{from}/desk\" to=\"{to}\" type=\"chat\" \
             id=\"m{i}\"><body>{body}</body></message>"
        ),
        body: Some(body),
    };
    let inbound = ArchiveRow {
        owner: to,
        peer: from.clone(),
        peer_full: Some(format!("{from}/desk")),
        direction: "in",
        ..out.clone()
    };
    [out, inbound]
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
}

/// The database, and on PostgreSQL the schema made for this run (dropped at
/// the end: 10,000,000 messages take about 15 GB).
async fn open(backend: &str, dir: &std::path::Path) -> (Database, Option<String>) {
    match backend {
        "sqlite" => (
            Database::open_sqlite(&dir.join("mam.db"))
                .await
                .expect("sqlite"),
            None,
        ),
        _ => {
            let (schema, url) =
                switchboard_projections::testing::postgres_schema("bench_mam").await;
            let db = Database::open_postgres(&url).await.expect("postgres");
            (db, Some(schema))
        }
    }
}

async fn fill(db: &Database, messages: usize, users: usize) -> Duration {
    let started = Instant::now();
    let mut i = 0;
    while i < messages {
        let end = (i + BATCH).min(messages);
        let batch: Vec<ArchiveRow> = (i..end).flat_map(|n| rows(n, users)).collect();
        db.apply("bench", &[], Ops::Archive(batch))
            .await
            .expect("insert");
        i = end;
    }
    // Statistics and the visibility map as a running deployment's
    // autovacuum keeps them.
    match db {
        Database::Postgres(pool) => {
            sqlx::query("VACUUM ANALYZE")
                .execute(pool)
                .await
                .expect("vacuum");
        }
        Database::Sqlite { main, .. } => {
            sqlx::query("ANALYZE")
                .execute(&main.write)
                .await
                .expect("analyze");
        }
    }
    started.elapsed()
}

fn base(owner: String) -> ArchiveQuery {
    ArchiveQuery {
        owner,
        with: None,
        start_us: None,
        end_us: None,
        after_id: None,
        before_id: None,
        page_after: None,
        page_before: None,
        backward: false,
        max: PAGE,
        flip: false,
    }
}

/// One query of the shape, for random users.
fn shape(name: &str, rng: &mut Rng, messages: usize, users: usize) -> ArchiveQuery {
    let span = messages as i64 * 1000;
    match name {
        "first page" => base(user(rng.below(users))),
        "last page" => ArchiveQuery {
            backward: true,
            ..base(user(rng.below(users)))
        },
        "page after id" => {
            let i = rng.below(messages);
            ArchiveQuery {
                page_after: Some(aid(i)),
                ..base(user(parties(i, users).0))
            }
        }
        "with peer, last page" => {
            let i = rng.below(messages);
            let (from, to) = parties(i, users);
            ArchiveQuery {
                with: Some(With::Bare(user(to))),
                backward: true,
                ..base(user(from))
            }
        }
        _ => {
            let start = T0 + (rng.below(9) as i64) * span / 10;
            ArchiveQuery {
                start_us: Some(start),
                end_us: Some(start + span / 10),
                backward: true,
                ..base(user(rng.below(users)))
            }
        }
    }
}

const SHAPES: [&str; 5] = [
    "first page",
    "last page",
    "page after id",
    "with peer, last page",
    "time range, last page",
];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let messages = env_usize("BENCH_MESSAGES", 1_000_000);
    let users = env_usize("BENCH_USERS", 2_000);
    let queries = env_usize("BENCH_QUERIES", 2_000);
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".to_owned());
    println!(
        "{messages} messages ({} archive rows) among {users} users; {queries} queries per shape, \
         pages of {PAGE}\n",
        messages * 2
    );
    println!("| backend | query | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for backend in backends.split(',').map(str::trim) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, schema) = open(backend, dir.path()).await;
        let took = fill(&db, messages, users).await;
        eprintln!(
            "{backend}: filled in {:.1} s ({:.0} messages/s)",
            took.as_secs_f64(),
            messages as f64 / took.as_secs_f64()
        );
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for name in SHAPES {
            // Warm-up: a tenth as many, not counted.
            for _ in 0..queries / 10 {
                let _ = run_query(&db, &shape(name, &mut rng, messages, users)).await;
            }
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut results = 0usize;
            for _ in 0..queries {
                let q = shape(name, &mut rng, messages, users);
                let t = Instant::now();
                let answer = run_query(&db, &q).await.expect("query");
                h.record(t.elapsed().as_micros().max(1) as u64)
                    .expect("record");
                match answer {
                    Answer::Page(p) => results += p.items.len(),
                    Answer::ItemNotFound => panic!("item-not-found for {q:?}"),
                }
            }
            assert!(results > 0, "{name}: every page was empty");
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "| {backend} | {name} | {:.2} | {:.2} | {:.2} | {:.2} |",
                ms(0.5),
                ms(0.95),
                ms(0.99),
                h.max() as f64 / 1000.0
            );
        }
        db.close().await;
        if let Some(schema) = schema {
            switchboard_projections::testing::drop_postgres_schema(&schema).await;
        }
    }
}
