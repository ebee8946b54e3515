//! Presence fan-out (issue 4 Performance) on the embedded log or Kafka, in one
//! process: the presence composer (`switchboard_processors::presence`) and
//! the roster processor (`roster_runtime`, which sends composed presence to
//! every authorized watcher's sessions).
//!
//! `cargo bench --bench presence_fanout` (`BENCH_BACKEND=kafka` for
//! Kafka). Set-up: `BENCH_USERS` (1,000)
//! users, each with `BENCH_CONTACTS` (200) contacts in mutual subscription
//! (user *i* and users *i±1..i±100*), every user online with one available
//! session. Then, with the throttle at its default (1 s; every change is on
//! a user not changed for longer than that):
//!
//! 1. *latency*: `BENCH_CHANGES` (200) status changes, one every 100 ms,
//!    each on another user. Measured per change: the time from the produce
//!    of the `presence.device` input to each watcher's delivery (the
//!    `delivery.presence` record of the gateway node that lists the
//!    watcher's session), and to the last of its watchers.
//! 2. *sustained fan-out*: `BENCH_FANOUT_RATE` (100) changes/s for
//!    `BENCH_SECS` (5) s; deliveries/s and the time to a change's last
//!    watcher.
//!
//!    2b. *full fan-out at the composer's rate*: throttle 0,
//!    `BENCH_FULL_RATE` (2,000) changes/s for `BENCH_SECS` s, each to all
//!    its watchers.
//! 3. *composer alone* (roster processor stopped, throttle 0):
//!    `BENCH_COMPOSE_RATE` (2,000) changes/s for `BENCH_SECS` s; composed
//!    outputs/s and input-to-`presence.composed` latency.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchboard_infra::bus::embedded::{EmbeddedBus, EmbeddedConfig};
use switchboard_infra::bus::kafka::{KafkaBus, KafkaConfig};
use switchboard_infra::bus::{Bus, ConsumerConfig, Polled, StartFrom, TopicConfig};
use switchboard_processors::presence::{self, PresenceConfig};
use switchboard_processors::roster_runtime::{self, RosterConfig};
use switchboard_processors::settings::{self, LiveSettings};
use switchboard_schemas::events::{DevicePresence, Protocol, RosterItemSet, SessionResourceBound};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{BareJid, Envelope, Event, FullJid, NodeId};
use tokio::sync::watch;

/// The topic prefix: `bench` on the embedded log, a fresh one per run on
/// Kafka (the broker keeps earlier runs' topics).
fn prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| {
        if kafka() {
            format!("bench-presence-{}", uuid::Uuid::now_v7().simple())
        } else {
            "bench".to_owned()
        }
    })
}

/// `BENCH_BACKEND=kafka` runs on the broker of `infra/scripts/kafka.sh`
/// (or `SWITCHBOARD_TEST_KAFKA`).
fn kafka() -> bool {
    std::env::var("BENCH_BACKEND").is_ok_and(|b| b == "kafka")
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn user(i: usize) -> String {
    format!("user{i}@example.com")
}

async fn produce_all(bus: &Arc<dyn Bus>, events: &[Envelope]) {
    for chunk in events.chunks(4096) {
        let futures = chunk.iter().map(|e| {
            let topic = full_name(prefix(), e.topic().expect("catalogued"));
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

fn device(i: usize, status: &str) -> Envelope {
    Envelope::new(
        NodeId::new("gw1"),
        user(i),
        DevicePresence {
            user: BareJid::new(user(i)),
            device: format!("{}/r", user(i)),
            protocol: Protocol::Xmpp,
            available: true,
            show: None,
            status: Some(status.to_owned()),
            priority: 0,
        },
    )
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn report(name: &str, h: &Histogram<u64>) {
    println!(
        "{name}: n={} p50={:.3} ms p99={:.3} ms p99.9={:.3} ms max={:.3} ms",
        h.len(),
        ms(h, 0.5),
        ms(h, 0.99),
        ms(h, 0.999),
        h.max() as f64 / 1000.0
    );
}

/// The change number carried in a status text `c<n>`.
fn change_of(text: &str) -> Option<usize> {
    let start = text.find("<status>c")? + "<status>c".len();
    let end = text[start..].find('<')? + start;
    text[start..end].parse().ok()
}

/// Records the latency of each composed output of a bench change; returns
/// how many there were.
fn drain_composed(
    records: Vec<switchboard_infra::bus::Record>,
    sent: &BTreeMap<usize, Instant>,
    latency: &mut Histogram<u64>,
) -> u64 {
    let now = Instant::now();
    let mut outputs = 0;
    for r in records {
        let Some(value) = r.value.as_deref() else {
            continue;
        };
        if let Ok(Envelope {
            event: Event::ComposedPresence(c),
            ..
        }) = Envelope::from_json_slice(value)
            && let Some(n) = c
                .status
                .as_deref()
                .and_then(|s| s.strip_prefix('c'))
                .and_then(|s| s.parse::<usize>().ok())
            && let Some(at) = sent.get(&n)
        {
            outputs += 1;
            let _ = latency.record(now.duration_since(*at).as_micros() as u64);
        }
    }
    outputs
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(bench());
}

struct Changes {
    sent: BTreeMap<usize, Instant>,
    watchers: usize,
    seen: BTreeMap<usize, usize>,
    per_delivery: Histogram<u64>,
    to_last: Histogram<u64>,
    deliveries: u64,
}

impl Changes {
    fn new(watchers: usize) -> Self {
        Self {
            sent: BTreeMap::new(),
            watchers,
            seen: BTreeMap::new(),
            per_delivery: Histogram::new(3).expect("histogram"),
            to_last: Histogram::new(3).expect("histogram"),
            deliveries: 0,
        }
    }

    fn delivered(&mut self, n: usize, at: Instant) {
        let Some(sent) = self.sent.get(&n) else {
            return;
        };
        let micros = at.duration_since(*sent).as_micros() as u64;
        self.deliveries += 1;
        let _ = self.per_delivery.record(micros);
        let seen = self.seen.entry(n).or_insert(0);
        *seen += 1;
        if *seen == self.watchers {
            let _ = self.to_last.record(micros);
        }
    }

    fn complete(&self) -> bool {
        self.sent
            .keys()
            .all(|n| self.seen.get(n).copied().unwrap_or(0) >= self.watchers)
    }
}

async fn drain_deliveries(
    consumer: &mut Box<dyn switchboard_infra::bus::Consumer>,
    changes: &mut Changes,
    wait: Duration,
) {
    if let Polled::Records(records) = consumer.poll(wait).await.expect("poll") {
        let now = Instant::now();
        for r in records {
            let Some(value) = r.value.as_deref() else {
                continue;
            };
            // Composed presence comes as one record per gateway node and
            // stanza variant, listing the watchers' sessions.
            if let Ok(Envelope {
                event: Event::PresenceDelivery(d),
                ..
            }) = Envelope::from_json_slice(value)
                && let Some(n) = change_of(&d.stanza)
            {
                for _ in &d.targets {
                    changes.delivered(n, now);
                }
            }
        }
    }
}

async fn bench() {
    let users = env_num("BENCH_USERS", 1_000).max(4);
    let contacts = (env_num("BENCH_CONTACTS", 200) / 2 * 2).min(users - 2);
    let changes_n = env_num("BENCH_CHANGES", 200).min(users);
    let fanout_rate = env_num("BENCH_FANOUT_RATE", 100).max(1);
    let compose_rate = env_num("BENCH_COMPOSE_RATE", 2_000).max(1);
    let full_rate = env_num("BENCH_FULL_RATE", 2_000).max(1);
    let secs = env_num("BENCH_SECS", 5).max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let bus: Arc<dyn Bus> = if kafka() {
        let bootstrap =
            std::env::var("SWITCHBOARD_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
        Arc::new(KafkaBus::connect(KafkaConfig::new(bootstrap)).expect("kafka"))
    } else {
        Arc::new(
            EmbeddedBus::open(EmbeddedConfig::new(dir.path().join("bus.sqlite")))
                .await
                .expect("embedded log"),
        )
    };
    println!("backend: {}", bus.backend());
    bus.create_topics(&TopicConfig::catalogue(prefix()))
        .await
        .expect("topics");

    let started = Instant::now();
    let mut setup = Vec::new();
    for i in 0..users {
        setup.push(Envelope::new(
            NodeId::new("gw1"),
            user(i),
            SessionResourceBound {
                session_id: uuid::Uuid::now_v7(),
                full_jid: FullJid::new(format!("{}/r", user(i))),
                protocol: Protocol::Xmpp,
                contact: None,
                priority: 0,
                client: Default::default(),
            },
        ));
        setup.push(device(i, "online"));
        for d in 1..=contacts / 2 {
            for j in [(i + d) % users, (i + users - d) % users] {
                let item: RosterItemSet = serde_json::from_value(serde_json::json!({
                    "user": user(i),
                    "contact": user(j),
                    "subscription": "both",
                }))
                .expect("roster item");
                setup.push(Envelope::new(NodeId::new("gw1"), user(i), item));
            }
        }
    }
    produce_all(&bus, &setup).await;
    println!(
        "set-up: {users} users x {contacts} contacts, {} events written in {:.1} s",
        setup.len(),
        started.elapsed().as_secs_f64()
    );
    drop(setup);

    let mut deliveries = bus
        .consumer(ConsumerConfig {
            start: StartFrom::Latest,
            ..ConsumerConfig::new("bench-gateway", &[&full_name(prefix(), Topic::Deliveries)])
        })
        .await
        .expect("deliveries consumer");
    let (settings_tx, settings_rx) = watch::channel(LiveSettings::default());
    let (stop_composer, composer_rx) = watch::channel(false);
    let composer = tokio::spawn(presence::run(
        bus.clone(),
        PresenceConfig::new(prefix(), NodeId::new("node1")),
        settings_rx.clone(),
        composer_rx,
    ));
    let (stop_roster, roster_rx) = watch::channel(false);
    let roster = tokio::spawn(roster_runtime::run(
        bus.clone(),
        RosterConfig {
            prefix: prefix().to_owned(),
            node: NodeId::new("node1"),
        },
        settings::policy_limits(settings_rx.clone()),
        roster_rx,
    ));

    // Warm-up: until a change reaches all its watchers, both processors
    // have caught up with the set-up.
    let warm = Instant::now();
    let mut warmup = Changes::new(contacts);
    let mut n = 1_000_000;
    loop {
        let i = n % users;
        warmup.sent.clear();
        warmup.seen.clear();
        warmup.sent.insert(n, Instant::now());
        produce_all(&bus, &[device(i, &format!("c{n}"))]).await;
        let until = Instant::now() + Duration::from_secs(5);
        while !warmup.complete() && Instant::now() < until {
            drain_deliveries(&mut deliveries, &mut warmup, Duration::from_millis(100)).await;
        }
        if warmup.complete() {
            break;
        }
        println!(
            "warming up: change {n} reached {} of {contacts} watchers",
            warmup.seen.get(&n).copied().unwrap_or(0)
        );
        assert!(warm.elapsed() < Duration::from_secs(600), "no fan-out");
        n += 1;
    }
    println!(
        "processors caught up in {:.1} s",
        warm.elapsed().as_secs_f64()
    );
    // Let every user's throttle window from the start-up pass.
    let settle = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < settle {
        drain_deliveries(&mut deliveries, &mut warmup, Duration::from_millis(100)).await;
    }

    // 1. One change at a time.
    let mut one = Changes::new(contacts);
    for c in 0..changes_n {
        let i = (c * 7 + 3) % users;
        one.sent.insert(c, Instant::now());
        produce_all(&bus, &[device(i, &format!("c{c}"))]).await;
        let next = Instant::now() + Duration::from_millis(100);
        while Instant::now() < next {
            drain_deliveries(&mut deliveries, &mut one, Duration::from_millis(10)).await;
        }
    }
    let until = Instant::now() + Duration::from_secs(30);
    while !one.complete() && Instant::now() < until {
        drain_deliveries(&mut deliveries, &mut one, Duration::from_millis(100)).await;
    }
    println!("\n1. one change every 100 ms, {changes_n} changes, {contacts} watchers each");
    report("   input -> each watcher's delivery", &one.per_delivery);
    report("   input -> last watcher's delivery", &one.to_last);
    println!(
        "   deliveries {} of {}",
        one.deliveries,
        changes_n * contacts
    );

    let settle = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < settle {
        drain_deliveries(&mut deliveries, &mut one, Duration::from_millis(100)).await;
    }

    // 2. Sustained fan-out.
    let mut sustained = Changes::new(contacts);
    let total = fanout_rate * secs;
    let period = Duration::from_secs_f64(1.0 / fanout_rate as f64);
    let begin = Instant::now();
    for c in 0..total {
        let n = 10_000 + c;
        let i = (c * 7 + 5) % users;
        let at = begin + period * c as u32;
        while Instant::now() < at {
            drain_deliveries(&mut deliveries, &mut sustained, Duration::from_millis(1)).await;
        }
        sustained.sent.insert(n, Instant::now());
        produce_all(&bus, &[device(i, &format!("c{n}"))]).await;
    }
    let until = Instant::now() + Duration::from_secs(60);
    while !sustained.complete() && Instant::now() < until {
        drain_deliveries(&mut deliveries, &mut sustained, Duration::from_millis(100)).await;
    }
    let elapsed = begin.elapsed().as_secs_f64();
    println!(
        "\n2. sustained: {fanout_rate} changes/s for {secs} s ({} deliveries expected)",
        total * contacts
    );
    report(
        "   input -> each watcher's delivery",
        &sustained.per_delivery,
    );
    report("   input -> last watcher's delivery", &sustained.to_last);
    println!(
        "   deliveries {} in {elapsed:.2} s = {:.0}/s",
        sustained.deliveries,
        sustained.deliveries as f64 / elapsed
    );

    // 2b. Full fan-out at the composer's rate: every change reaches all its
    // watchers, throttle off (1,000 users changing 2,000 times a second
    // would otherwise be coalesced by the 1 s throttle).
    settings_tx.send_modify(|s| s.presence_throttle_ms = 0);
    let settle = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < settle {
        drain_deliveries(&mut deliveries, &mut sustained, Duration::from_millis(100)).await;
    }
    let mut full = Changes::new(contacts);
    let total = full_rate * secs;
    let period = Duration::from_secs_f64(1.0 / full_rate as f64);
    let begin = Instant::now();
    let mut c = 0;
    while c < total {
        // Produce what is due now, concurrently, then read.
        let due = ((begin.elapsed().as_secs_f64() / period.as_secs_f64()) as usize + 1).min(total);
        let mut batch = Vec::new();
        while c < due {
            let n = 50_000 + c;
            full.sent.insert(n, Instant::now());
            batch.push(device((c * 7 + 1) % users, &format!("c{n}")));
            c += 1;
        }
        produce_all(&bus, &batch).await;
        drain_deliveries(&mut deliveries, &mut full, Duration::from_millis(1)).await;
    }
    let until = Instant::now() + Duration::from_secs(60);
    while !full.complete() && Instant::now() < until {
        drain_deliveries(&mut deliveries, &mut full, Duration::from_millis(100)).await;
    }
    let elapsed = begin.elapsed().as_secs_f64();
    println!(
        "\n2b. full fan-out: {full_rate} changes/s for {secs} s, throttle 0 ({} deliveries expected)",
        total * contacts
    );
    report("   input -> each watcher's delivery", &full.per_delivery);
    report("   input -> last watcher's delivery", &full.to_last);
    println!(
        "   deliveries {} in {elapsed:.2} s = {:.0}/s; changes complete {} of {total}",
        full.deliveries,
        full.deliveries as f64 / elapsed,
        full.sent
            .keys()
            .filter(|n| full.seen.get(n).copied().unwrap_or(0) >= contacts)
            .count()
    );

    // 3. The composer alone.
    let _ = stop_roster.send(true);
    roster.await.expect("join").expect("roster processor");
    settings_tx.send_modify(|s| s.presence_throttle_ms = 0);
    let mut composed = bus
        .consumer(ConsumerConfig {
            start: StartFrom::Latest,
            ..ConsumerConfig::new(
                format!("{}-composed", prefix()),
                &[&full_name(prefix(), Topic::PresenceState)],
            )
        })
        .await
        .expect("composed consumer");
    // Join before measuring.
    let _ = composed.poll(Duration::from_millis(500)).await;
    let total = compose_rate * secs;
    let mut sent: BTreeMap<usize, Instant> = BTreeMap::new();
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    let mut outputs = 0u64;
    let period = Duration::from_secs_f64(1.0 / compose_rate as f64);
    let begin = Instant::now();
    let mut c = 0;
    while c < total {
        // Produce what is due now, concurrently, then read.
        let due = ((begin.elapsed().as_secs_f64() / period.as_secs_f64()) as usize + 1).min(total);
        let mut batch = Vec::new();
        while c < due {
            let n = 100_000 + c;
            sent.insert(n, Instant::now());
            batch.push(device(c % users, &format!("c{n}")));
            c += 1;
        }
        produce_all(&bus, &batch).await;
        if let Polled::Records(records) =
            composed.poll(Duration::from_millis(1)).await.expect("poll")
        {
            outputs += drain_composed(records, &sent, &mut latency);
        }
    }
    let produced_in = begin.elapsed().as_secs_f64();
    let until = Instant::now() + Duration::from_secs(30);
    while outputs < total as u64 && Instant::now() < until {
        if let Polled::Records(records) = composed
            .poll(Duration::from_millis(100))
            .await
            .expect("poll")
        {
            outputs += drain_composed(records, &sent, &mut latency);
        }
    }
    let elapsed = begin.elapsed().as_secs_f64();
    println!(
        "\n3. composer alone, throttle 0: {compose_rate} changes/s for {secs} s (inputs written in {produced_in:.2} s)"
    );
    report("   input -> presence.composed", &latency);
    println!(
        "   composed {outputs} of {total} in {elapsed:.2} s = {:.0}/s",
        outputs as f64 / elapsed
    );
    let _ = stop_composer.send(true);
    composer.await.expect("join").expect("composer");
}
