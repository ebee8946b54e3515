//! Projection ingest: events already on the embedded log, then every
//! projection (rosters, sessions, archive, files, compliance) catches up at
//! once, as `switchboard serve` runs them; events/s = events on the log /
//! time until every projection's stored positions reach the log's end.
//!
//! `cargo bench --bench projections_ingest` (PostgreSQL from
//! `infra/scripts/postgres.sh start`, database switchboard_test, a fresh
//! schema per run; `SWITCHBOARD_TEST_POSTGRES` names another;
//! `BENCH_BACKENDS=sqlite` or `postgres` runs one; `BENCH_EVENTS` sets the
//! count, default 200,000; `BENCH_PROJECTIONS=archive,compliance` runs a
//! subset; `BENCH_BATCH` / `BENCH_TRANSACTION` set the records per poll and
//! per transaction; `BENCH_READ_ONLY=1` first times reading the log alone).
//! Prints a Markdown table for BENCHMARKS.md.

/// The `switchboard` binary's allocator (`src/main.rs`), so that the figures
/// are those of `switchboard serve`, which runs the projections in-process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_infra::bus::embedded::{EmbeddedBus, EmbeddedConfig};
use switchboard_infra::bus::{Bus, TopicConfig};
use switchboard_projections::{Database, ProjectionKind, RunnerConfig, runner, testing};
use switchboard_schemas::events::*;
use switchboard_schemas::topics::full_name;
use switchboard_schemas::{BareJid, Envelope, Event, FullJid, NodeId};

const PREFIX: &str = "switchboard";
const USERS: usize = 2000;

/// The event mix: 94 % one-to-one chat messages (two archive rows and a
/// compliance record each), 4 % session events, 1 % roster changes, 1 %
/// file transfers.
fn event(i: usize) -> Envelope {
    let user = |n: usize| format!("user{}@example.com", n % USERS);
    let node = NodeId::new("node1");
    let from = user(i);
    let e: Event = match i % 100 {
        0..=3 => SessionLoginAttempted {
            session_id: uuid::Uuid::now_v7(),
            user: BareJid::new(from.clone()),
            protocol: Protocol::Xmpp,
            remote_addr: "192.0.2.1:5000".to_owned(),
            mechanism: AuthMechanism::ScramSha256,
            tls: true,
        }
        .into(),
        4 => RosterItemSet {
            user: BareJid::new(from.clone()),
            contact: BareJid::new(user(i + 1)),
            name: Some("Contact".to_owned()),
            groups: vec!["work".to_owned()],
            subscription: Subscription::Both,
            ask: false,
            approved: false,
        }
        .into(),
        5 => FileUploadCompleted {
            transfer_id: uuid::Uuid::now_v7(),
            uploader: BareJid::new(from.clone()),
            bytes_transferred: 100_000,
            to: user(i + 1),
            stored_name: format!("f{i}"),
            real_name: "report.pdf".to_owned(),
            path: "files/im/20260105/09/".to_owned(),
            size: 100_000,
            method: TransferMethod::HttpUpload,
        }
        .into(),
        _ => MessageSubmitted {
            message_id: format!("m{i}"),
            from: FullJid::new(format!("{from}/desk")),
            to: user(i + 17),
            kind: MessageKind::Chat,
            body: Some(format!(
                "message {i}: the quarterly numbers look fine, see you at the review"
            )),
            thread: None,
            subject: None,
            stanza: format!(
                "<message type='chat' id='m{i}'><body>message {i}: the quarterly numbers \
                 look fine, see you at the review</body></message>"
            ),
        }
        .into(),
    };
    Envelope::new(node, from, e)
}

async fn fill(bus: &Arc<dyn Bus>, n: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    let workers = 32;
    for w in 0..workers {
        let bus = bus.clone();
        tasks.spawn(async move {
            for i in (w..n).step_by(workers) {
                let e = event(i);
                let topic = full_name(PREFIX, e.topic().expect("catalogue event"));
                bus.produce(
                    &topic,
                    e.subject.as_bytes(),
                    Some(&e.to_json_vec().unwrap()),
                )
                .await
                .expect("produce");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("producer");
    }
}

/// The database, and on PostgreSQL the schema made for this run (dropped at
/// the end: a run leaves about 500 MB).
async fn open_db(backend: &str, dir: &std::path::Path) -> (Database, Option<String>) {
    match backend {
        "sqlite" => (
            Database::open_sqlite(&dir.join("switchboard.db"))
                .await
                .expect("sqlite"),
            None,
        ),
        _ => {
            let (schema, url) = testing::postgres_schema("bench").await;
            let db = Database::open_postgres(&url).await.expect("postgres");
            (db, Some(schema))
        }
    }
}

/// What reading costs alone: one consumer group per projection reads that
/// projection's topics to the end, all at once, decoding and writing nothing.
async fn read_only(bus: &Arc<dyn Bus>, n: usize) {
    use switchboard_infra::bus::{ConsumerConfig, Polled};
    let config = RunnerConfig::new(PREFIX);
    let mut tasks = tokio::task::JoinSet::new();
    for kind in ProjectionKind::ALL {
        let topics = config.topics(kind);
        let bus = bus.clone();
        let max_batch = config.max_batch;
        tasks.spawn(async move {
            let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
            let mut end = 0i64;
            for t in &topics {
                end += bus.end_offsets(t).await.expect("ends").iter().sum::<i64>();
            }
            let mut consumer = bus
                .consumer(ConsumerConfig {
                    max_batch,
                    ..ConsumerConfig::new(format!("read-only-{kind}"), &refs)
                })
                .await
                .expect("consumer");
            let mut read = 0i64;
            while read < end {
                if let Polled::Records(r) = consumer
                    .poll(Duration::from_millis(500))
                    .await
                    .expect("poll")
                {
                    read += r.len() as i64;
                }
            }
            let _ = consumer.close().await;
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("reader");
    }
    let _ = n;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".to_owned());
    let mut table = Vec::new();
    for backend in backends.split(',') {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = EmbeddedConfig::new(dir.path().join("bus.sqlite"));
        c.maintenance_interval = Duration::from_secs(3600);
        let embedded = EmbeddedBus::open(c).await.expect("log");
        embedded
            .create_topics(&TopicConfig::catalogue(PREFIX))
            .await
            .expect("topics");
        let bus: Arc<dyn Bus> = Arc::new(embedded);
        let filled = Instant::now();
        fill(&bus, n).await;
        eprintln!("{backend}: {n} events on the log in {:?}", filled.elapsed());
        if std::env::var("BENCH_READ_ONLY").is_ok_and(|v| v == "1") {
            let t = Instant::now();
            read_only(&bus, n).await;
            let s = t.elapsed().as_secs_f64();
            eprintln!(
                "{backend}: the log read alone (each projection's topics, no decoding, no writes): {s:.2} s, {:.0} events/s",
                n as f64 / s
            );
        }
        let (db, schema) = open_db(backend, dir.path()).await;
        let mut config = RunnerConfig {
            local_domains: vec!["example.com".to_owned()],
            ..RunnerConfig::new(PREFIX)
        };
        if let Some(b) = std::env::var("BENCH_BATCH")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            config.max_batch = b;
        }
        if let Some(t) = std::env::var("BENCH_TRANSACTION")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            config.max_transaction = t;
        }
        let config = Arc::new(config);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let kinds: Vec<ProjectionKind> = match std::env::var("BENCH_PROJECTIONS") {
            Ok(names) => names
                .split(',')
                .map(|n| n.parse().expect("projection"))
                .collect(),
            Err(_) => ProjectionKind::ALL.to_vec(),
        };
        for kind in kinds {
            let (bus, db, config) = (bus.clone(), db.clone(), config.clone());
            tasks.spawn(async move {
                let t = Instant::now();
                runner::catch_up(bus, db, kind, config)
                    .await
                    .expect("catch up");
                (kind, t.elapsed())
            });
        }
        let mut per_kind = Vec::new();
        while let Some(r) = tasks.join_next().await {
            per_kind.push(r.expect("runner"));
        }
        let elapsed = started.elapsed();
        per_kind.sort();
        let archive = db
            .snapshot(ProjectionKind::Archive)
            .await
            .expect("rows")
            .len();
        let compliance = db.verify_compliance().await.expect("verify");
        assert_eq!(compliance.broken, None);
        eprintln!("{backend}: {per_kind:?}");
        table.push(format!(
            "| {backend} | {n} | {:.2} | {:.0} | {archive} | {} |",
            elapsed.as_secs_f64(),
            n as f64 / elapsed.as_secs_f64(),
            compliance.records
        ));
        db.close().await;
        if let Some(schema) = schema {
            testing::drop_postgres_schema(&schema).await;
        }
    }
    println!("| database | events | seconds | events/s | archive rows | compliance records |");
    println!("|---|---|---|---|---|---|");
    for row in table {
        println!("{row}");
    }
}
