//! Routing throughput through the router (issue 4: ≥ 20,000 messages/s on
//! one core) on the embedded log.
//!
//! `taskset -c 0 cargo bench --bench router` (build first, so only the run
//! is pinned: `cargo bench --bench router --no-run`). `BENCH_MESSAGES`
//! (200,000) chat messages between `BENCH_USERS` (1,000) users, all online
//! with one available session each, are written to `messages` first; then
//! the router (`switchboard_processors::runtime`) starts on a current-thread
//! runtime (one thread runs the router, the log's writer task and the
//! reader counting deliveries; SQLite work runs on sqlx's worker threads)
//! and routes them. Every message becomes a `delivery.stanza` and a
//! `message.delivered`. Measured: messages/s from the first delivery read to
//! the last (routing only), and from the router's start (including its
//! start-up: the session table and the rebuild of its state from the log);
//! CPU microseconds per message of the tokio thread and of the SQLite
//! threads. Under `taskset -c 0` all of them share one core.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchboard_infra::bus::embedded::{EmbeddedBus, EmbeddedConfig};
use switchboard_infra::bus::{Bus, ConsumerConfig, Polled, TopicConfig};
use switchboard_processors::runtime::{RouterConfig, run};
use switchboard_schemas::events::{
    DevicePresence, MessageKind, MessageSubmitted, Protocol, SessionResourceBound,
};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{BareJid, Envelope, FullJid, NodeId};

const PREFIX: &str = "bench";

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn produce_all(bus: &Arc<dyn Bus>, events: Vec<Envelope>) {
    let chunks: Vec<Vec<Envelope>> = events.chunks(4096).map(<[Envelope]>::to_vec).collect();
    for chunk in chunks {
        let futures = chunk.iter().map(|e| {
            let topic = full_name(PREFIX, e.topic().expect("catalogued"));
            let bytes = e.to_json_vec().expect("encode");
            let bus = bus.clone();
            async move {
                bus.produce(&topic, e.subject.as_bytes(), Some(&bytes))
                    .await
                    .expect("produce")
            }
        });
        futures::future::join_all(futures).await;
    }
}

fn main() {
    // The bus's own tasks and the reader that counts deliveries.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench());
}

async fn bench() {
    let messages = env_num("BENCH_MESSAGES", 200_000);
    let users = env_num("BENCH_USERS", 1_000).max(2);
    let dir = tempfile::tempdir().expect("tempdir");
    let bus: Arc<dyn Bus> = Arc::new(
        EmbeddedBus::open(EmbeddedConfig::new(dir.path().join("bus.sqlite")))
            .await
            .expect("embedded log"),
    );
    bus.create_topics(&TopicConfig::catalogue(PREFIX))
        .await
        .expect("topics");
    let user = |i: usize| format!("user{i}@example.com");
    let mut setup = Vec::new();
    for i in 0..users {
        let full = format!("{}/r", user(i));
        setup.push(Envelope::new(
            NodeId::new("gw1"),
            user(i),
            SessionResourceBound {
                session_id: uuid::Uuid::now_v7(),
                full_jid: FullJid::new(full.clone()),
                protocol: Protocol::Xmpp,
                contact: None,
                priority: 0,
                client: Default::default(),
            },
        ));
        setup.push(Envelope::new(
            NodeId::new("gw1"),
            user(i),
            DevicePresence {
                user: BareJid::new(user(i)),
                device: full,
                protocol: Protocol::Xmpp,
                available: true,
                show: None,
                status: None,
                priority: 0,
            },
        ));
    }
    produce_all(&bus, setup).await;
    let submitted: Vec<Envelope> = (0..messages)
        .map(|n| {
            let (from, to) = (n % users, (n + 1) % users);
            let from_full = format!("{}/r", user(from));
            Envelope::new(
                NodeId::new("gw1"),
                user(from),
                MessageSubmitted {
                    message_id: format!("m{n}"),
                    from: FullJid::new(from_full.clone()),
                    to: user(to),
                    kind: MessageKind::Chat,
                    body: Some(format!("message number {n}")),
                    thread: None,
                    subject: None,
                    stanza: format!(
                        "<message xmlns='jabber:client' from='{from_full}' to='{}' type='chat' \
                         id='m{n}'><body>message number {n}</body></message>",
                        user(to)
                    ),
                },
            )
        })
        .collect();
    produce_all(&bus, submitted).await;

    let deliveries = full_name(PREFIX, Topic::Deliveries);
    let mut reader = bus
        .consumer(ConsumerConfig::new("bench-reader", &[&deliveries]))
        .await
        .expect("reader");
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let router = tokio::spawn(run(
        bus.clone(),
        RouterConfig::new(PREFIX, NodeId::new("proc1"), vec!["example.com".to_owned()]),
        stop_rx,
    ));
    let cpu_before = thread_cpu_secs();
    let mut seen = 0usize;
    let mut first = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < messages && Instant::now() < deadline {
        if let Polled::Records(records) =
            reader.poll(Duration::from_millis(100)).await.expect("poll")
        {
            first.get_or_insert_with(Instant::now);
            seen += records.len();
        }
    }
    let end = Instant::now();
    let cpu_after = thread_cpu_secs();
    let _ = stop.send(true);
    let _ = router.await;
    let first = first.expect("deliveries");
    let routing = seen.saturating_sub(1) as f64 / (end - first).as_secs_f64();
    let overall = seen as f64 / (end - started).as_secs_f64();
    let cpu = |name: &str| {
        let at = |m: &BTreeMap<String, f64>| m.get(name).copied().unwrap_or(0.0);
        (at(&cpu_after) - at(&cpu_before)) / seen as f64 * 1e6
    };
    let main_us = cpu("router-");
    let sqlite_us = cpu("sqlx-sq");
    println!(
        "| messages | users | routed | routing msg/s | incl. start-up msg/s | start-up s | CPU µs/msg: tokio thread (router, log writer, reader) | SQLite threads |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {messages} | {users} | {seen} | {routing:.0} | {overall:.0} | {:.2} | {main_us:.1} | {sqlite_us:.1} |",
        (first - started).as_secs_f64()
    );
}

/// CPU seconds (user + system) of this process's threads by name prefix
/// (the first 15 bytes Linux keeps), from `/proc/self/task/*/stat`; empty
/// elsewhere.
fn thread_cpu_secs() -> BTreeMap<String, f64> {
    // USER_HZ is 100 on Linux.
    const TICKS_PER_SEC: f64 = 100.0;
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return by_name;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.split_once(") ") else {
            continue;
        };
        let name = head.split_once(" (").map_or("", |(_, n)| n);
        let name: String = name.chars().take(7).collect();
        // After the name: state, ppid, ... utime and stime are the 12th
        // and 13th fields.
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: f64 = [11, 12]
            .iter()
            .filter_map(|i| fields.get(*i)?.parse::<f64>().ok())
            .sum();
        *by_name.entry(name).or_insert(0.0) += ticks / TICKS_PER_SEC;
    }
    by_name
}
