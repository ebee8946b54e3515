//! Compliance search over a large archive: a deterministic dataset
//! generator, then first-page latencies of the API's search (the same
//! `store::page` the HTTP handlers run) on SQLite or PostgreSQL.
//!
//! ```sh
//! SB_ROWS=1000000 cargo bench -p switchboard-projections --bench compliance_search
//! SB_BACKEND=postgres SB_ROWS=1000000 cargo bench -p switchboard-projections --bench compliance_search
//! ```
//!
//! - `SB_ROWS`: archive rows (each 1:1 message between two local users is two
//!   rows, the sender's and the recipient's); default 1,000,000.
//! - `SB_BACKEND`: `sqlite` (default; file `SB_DB`, default
//!   `target/compliance-bench.db`) or `postgres` (schema `compliance_bench`
//!   of `SB_PG`, default the switchboard_test database).
//! - The dataset is kept: a later run with the same `SB_ROWS` reuses it
//!   (generation is the slow part); more rows are appended to a smaller one.
//! - `SB_QUERIES`: queries per kind (default 200).
//! - `SB_HTTP=host:port` and `SB_TOKEN`: the same searches through the
//!   compliance API of a running `switchboard serve` over that database
//!   (`GET /api/v1/archive/messages`, a new connection per request, each
//!   query audited into the compliance log as always): what a client waits
//!   for, HTTP, JSON and the audit record included. `benches/compliance-http.sh`
//!   starts such a server on the SQLite dataset.
//!
//! Dataset: 20,000 users in one domain; sender and recipient uniform; one
//! message every 50 ms of simulated time from 2026-01-01; bodies of 6-20
//! words drawn from a 20,000-word vocabulary with Zipf-like frequencies
//! (word rank r has weight 1/r), some with diacritics.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchboard_projections::Database;
use switchboard_projections::api::store::{self, Search};
use switchboard_projections::db::Ops;
use switchboard_projections::rows::ArchiveRow;

const USERS: u64 = 20_000;
const VOCABULARY: usize = 20_000;
/// 2026-01-01T00:00:00Z.
const START_US: i64 = 1_767_225_600_000_000;
const STEP_US: i64 = 50_000;
const BATCH_MESSAGES: u64 = 5_000;
const PAGE: i64 = 50;

/// xorshift64*: deterministic, good enough for a dataset.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The vocabulary: pronounceable words, every 7th with a diacritic.
fn vocabulary() -> Vec<String> {
    const SYLLABLES: [&str; 16] = [
        "ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "bri", "dan", "fel", "gor", "hus", "jin",
        "pel", "zor",
    ];
    (0..VOCABULARY)
        .map(|i| {
            let mut w = String::new();
            let mut n = i + 16;
            while n > 0 {
                w.push_str(SYLLABLES[n % 16]);
                n /= 16;
            }
            if i % 7 == 3 {
                w = w.replacen('e', "é", 1);
            }
            w
        })
        .collect()
}

/// Cumulative Zipf weights (rank r: 1/r).
fn zipf_table() -> Vec<f64> {
    let mut acc = 0.0;
    (1..=VOCABULARY)
        .map(|r| {
            acc += 1.0 / r as f64;
            acc
        })
        .collect()
}

fn word<'a>(rng: &mut Rng, words: &'a [String], cdf: &[f64]) -> &'a str {
    let total = cdf[cdf.len() - 1];
    let x = (rng.next() >> 11) as f64 / (1u64 << 53) as f64 * total;
    let i = cdf.partition_point(|c| *c < x).min(words.len() - 1);
    &words[i]
}

fn user(n: u64) -> String {
    format!("user{n}@example.com")
}

/// The rows of message `n` (deterministic in `n`).
fn message(n: u64, words: &[String], cdf: &[f64]) -> [ArchiveRow; 2] {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ n.wrapping_mul(0xA24B_AED4_963E_E407) | 1);
    let from = rng.below(USERS);
    let to = (from + 1 + rng.below(USERS - 1)) % USERS;
    let len = 6 + rng.below(15);
    let body: Vec<&str> = (0..len).map(|_| word(&mut rng, words, cdf)).collect();
    let body = body.join(" ");
    let at_us = START_US + i64::try_from(n).unwrap_or(i64::MAX) * STEP_US;
    let uuid = uuid::Uuid::from_u64_pair(0x0190_0000_0000_7000 | (n >> 48), n);
    let (from, to) = (user(from), user(to));
    let out = ArchiveRow {
        owner: from.clone(),
        archive_id: uuid.to_string(),
        at_us,
        peer: to.clone(),
        peer_full: None,
        direction: "out",
        kind: "chat".to_owned(),
        message_id: format!("bench-{n}"),
        sender: format!("{from}/desk"),
        nick: None,
        thread: None,
        subject: None,
        stanza: format!("<message type='chat' to='{to}'><body>{body}</body></message>"),
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

async fn count(db: &Database) -> i64 {
    const SQL: &str = "SELECT COUNT(*) FROM archive";
    match db {
        Database::Sqlite { main, .. } => sqlx::query_scalar(SQL).fetch_one(&main.write).await,
        Database::Postgres(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await,
    }
    .expect("count")
}

async fn generate(db: &Database, rows: u64, words: &[String], cdf: &[f64]) {
    let have = u64::try_from(count(db).await).unwrap_or(0);
    let messages = rows / 2;
    let mut next = have / 2;
    if next >= messages {
        println!("dataset: {have} rows present, reused");
        return;
    }
    let started = Instant::now();
    println!("dataset: {have} rows present, generating up to {rows}");
    while next < messages {
        let end = (next + BATCH_MESSAGES).min(messages);
        let batch: Vec<ArchiveRow> = (next..end).flat_map(|n| message(n, words, cdf)).collect();
        db.apply("bench.archive", &[], Ops::Archive(batch))
            .await
            .expect("insert");
        next = end;
        if next % 250_000 == 0 {
            if let Database::Sqlite { main, .. } = db {
                // Keep the WAL small (no checkpointer runs here).
                sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                    .execute(&main.write)
                    .await
                    .expect("checkpoint");
            }
            let secs = started.elapsed().as_secs_f64();
            println!(
                "  {} rows, {:.0} rows/s",
                next * 2,
                (next * 2 - have) as f64 / secs
            );
        }
    }
    if let Database::Postgres(pool) = db {
        // Both tables: the full-text plan reads `archive_messages`'
        // statistics (`api::store::postgres_common_term`).
        sqlx::query("ANALYZE archive, archive_messages")
            .execute(pool)
            .await
            .expect("analyze");
    }
    if let Database::Sqlite { main, .. } = db {
        sqlx::query("ANALYZE")
            .execute(&main.write)
            .await
            .expect("analyze");
    }
    println!(
        "dataset: {} rows in {:.1} s",
        messages * 2,
        started.elapsed().as_secs_f64()
    );
}

async fn open(backend: &str) -> Database {
    if backend == "postgres" {
        let base = std::env::var("SB_PG").unwrap_or_else(|_| {
            "postgres://switchboard:switchboard@127.0.0.1:5432/switchboard_test".to_owned()
        });
        let admin = sqlx::PgPool::connect(&base).await.expect("PostgreSQL");
        sqlx::query("CREATE SCHEMA IF NOT EXISTS compliance_bench")
            .execute(&admin)
            .await
            .expect("schema");
        admin.close().await;
        Database::open(
            &format!("{base}?options[search_path]=compliance_bench"),
            std::path::Path::new("unused"),
        )
        .await
        .expect("open")
    } else {
        let path = std::env::var("SB_DB").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../target/compliance-bench.db").to_owned()
        });
        Database::open("", std::path::Path::new(&path))
            .await
            .expect("open")
    }
}

/// Query-string escape (RFC 3986 unreserved characters kept).
fn escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One search through the compliance API; the number of items returned.
async fn http_page(addr: &str, token: &str, search: &Search) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut target = format!("/api/v1/archive/messages?limit={PAGE}");
    let mut param = |name: &str, value: &str| {
        target.push_str(&format!("&{name}={}", escape(value)));
    };
    if let Some(p) = &search.participant {
        param("participant", p);
    }
    if let Some(p) = &search.peer {
        param("peer", p);
    }
    if let Some(t) = search.start_us {
        param("start", &store::rfc3339(t));
    }
    if let Some(t) = search.end_us {
        param("end", &store::rfc3339(t));
    }
    if let Some(terms) = &search.text {
        param("q", &terms.join(" "));
    }
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("receive");
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{target}: {head}");
    let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
    json["items"].as_array().map_or(0, Vec::len)
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn main() {
    let rows: u64 = std::env::var("SB_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let queries: u64 = std::env::var("SB_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let backend = std::env::var("SB_BACKEND").unwrap_or_else(|_| "sqlite".to_owned());
    let http = std::env::var("SB_HTTP").ok().map(|addr| {
        (
            addr,
            std::env::var("SB_TOKEN").expect("SB_TOKEN with SB_HTTP"),
        )
    });
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let words = vocabulary();
        let cdf = zipf_table();
        let db = open(&backend).await;
        generate(&db, rows, &words, &cdf).await;
        let present = count(&db).await;
        let messages = u64::try_from(present).unwrap_or(0) / 2;
        let span_us = i64::try_from(messages).unwrap_or(0) * STEP_US;
        let through = if http.is_some() { ", through HTTP" } else { "" };
        println!(
            "backend {backend}{through}, {present} archive rows, first page of {PAGE}, \
             {queries} queries per kind"
        );
        println!("| query | p50 ms | p95 ms | p99 ms | max ms | mean rows |");
        println!("|---|---|---|---|---|---|");
        let mut rng = Rng(42);
        // Kinds: (name, builder)
        type Build = fn(&mut Rng, &[String], i64) -> Search;
        let kinds: [(&str, Build); 6] = [
            ("participant", |r, _, _| Search {
                participant: Some(user(r.below(USERS))),
                ..Search::default()
            }),
            ("participant + peer (a pair that talked)", |r, w, span| {
                // The sides of a random existing message.
                let n = r.below(u64::try_from(span / STEP_US).unwrap_or(1).max(1));
                let [out, _] = message(n, w, &zipf_table());
                Search {
                    participant: Some(out.owner),
                    peer: Some(out.peer),
                    ..Search::default()
                }
            }),
            ("participant + one-day range", |r, _, span| Search {
                participant: Some(user(r.below(USERS))),
                start_us: Some(START_US + (r.next() as i64 & i64::MAX) % span.max(1)),
                end_us: None,
                ..Search::default()
            }),
            ("full text, rare word (rank 1000-20000)", |r, w, _| Search {
                text: Some(vec![
                    w[1000 + usize::try_from(r.below(19_000)).unwrap_or(0)].clone(),
                ]),
                ..Search::default()
            }),
            ("full text, common word (rank 10-100)", |r, w, _| Search {
                text: Some(vec![
                    w[10 + usize::try_from(r.below(90)).unwrap_or(0)].clone(),
                ]),
                ..Search::default()
            }),
            ("full text + participant", |r, w, _| Search {
                participant: Some(user(r.below(USERS))),
                text: Some(vec![w[usize::try_from(r.below(200)).unwrap_or(0)].clone()]),
                ..Search::default()
            }),
        ];
        for (name, build) in kinds {
            let mut h = Histogram::<u64>::new(3).expect("histogram");
            let mut found = 0usize;
            for _ in 0..queries {
                let mut search = build(&mut rng, &words, span_us);
                if name.contains("range") {
                    search.end_us = search.start_us.map(|s| s + 86_400_000_000);
                }
                let t = Instant::now();
                found += match &http {
                    Some((addr, token)) => http_page(addr, token, &search).await,
                    None => store::page(&db, &search, None, PAGE)
                        .await
                        .expect("page")
                        .0
                        .len(),
                };
                h.record(ms(t.elapsed())).expect("record");
            }
            let q = |p: f64| h.value_at_quantile(p) as f64 / 1000.0;
            println!(
                "| {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} |",
                q(0.5),
                q(0.95),
                q(0.99),
                h.max() as f64 / 1000.0,
                found as f64 / queries as f64
            );
        }
        db.close().await;
    });
}
