//! Produce-to-consume on one topic, 200-byte events, on both backends in one
//! run: throughput at saturation, throughput of many producers that each await
//! every produce (the gateways' pattern), and latency percentiles at a fixed
//! rate. CPU figures are the whole process's user + system time (from
//! `/proc/self/stat`) per 1,000 events, which moves less than throughput when
//! other work shares the cores.
//!
//! `cargo bench --bench bus` (needs Kafka: `infra/scripts/kafka.sh start`;
//! `SWITCHBOARD_TEST_KAFKA` names another broker; `BENCH_BACKENDS=embedded`
//! skips Kafka). Prints a Markdown table for BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchboard_infra::bus::embedded::{EmbeddedBus, EmbeddedConfig};
use switchboard_infra::bus::kafka::{KafkaBus, KafkaConfig};
use switchboard_infra::bus::{Bus, ConsumerConfig, Polled, TopicConfig};

const EVENT_BYTES: usize = 200;
const PARTITIONS: i32 = 12;
const KEYS: usize = 1000;
const SATURATION_EVENTS: usize = 300_000;
const IN_FLIGHT: usize = 8192;
/// Producers of the closed-loop run, each awaiting its produce before the next.
const PRODUCERS: usize = 256;
const EVENTS_PER_PRODUCER: usize = 400;
const RATE_PER_SEC: usize = 5_000;
const RATE_SECS: u64 = 10;

struct Figures {
    backend: &'static str,
    throughput: f64,
    /// CPU milliseconds per 1,000 events of the saturation run.
    cpu_ms: f64,
    closed_loop: f64,
    closed_loop_cpu_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

/// A 200-byte value whose first 8 bytes are the send time in nanoseconds
/// since `base`.
fn event(base: Instant, filler: u8) -> Vec<u8> {
    let mut v = vec![filler; EVENT_BYTES];
    let nanos = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
    v[..8].copy_from_slice(&nanos.to_le_bytes());
    v
}

/// CPU seconds (user + system) this process has used so far; 0 where
/// `/proc` is missing.
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall, in clock ticks (100 per second on Linux).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn keys() -> Arc<Vec<String>> {
    Arc::new((0..KEYS).map(|i| format!("user{i}@example.com")).collect())
}

async fn consumer_ready(bus: &dyn Bus, topic: &str) -> Box<dyn switchboard_infra::bus::Consumer> {
    let mut c = bus
        .consumer(ConsumerConfig::new(
            format!("bench-{}", uuid::Uuid::now_v7().simple()),
            &[topic],
        ))
        .await
        .expect("consumer");
    // Wait for the assignment so that timing starts with a member in place.
    while c.assignment().is_empty() {
        let _ = c.poll(Duration::from_millis(100)).await.expect("poll");
    }
    c
}

/// Events per second through produce (up to `IN_FLIGHT` unacknowledged) and
/// consume, from the first produce to the last record consumed, and CPU
/// milliseconds per 1,000 events.
async fn saturation(bus: Arc<dyn Bus>) -> (f64, f64) {
    let topic = format!("bench-sat-{}", uuid::Uuid::now_v7().simple());
    bus.create_topics(&[TopicConfig::log(&topic, PARTITIONS)])
        .await
        .expect("topic");
    let mut consumer = consumer_ready(&*bus, &topic).await;
    let keys = keys();
    let cpu = cpu_secs();
    let base = Instant::now();
    let producer = {
        let bus = bus.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let semaphore = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
            for i in 0..SATURATION_EVENTS {
                let permit = semaphore.clone().acquire_owned().await.expect("permit");
                let bus = bus.clone();
                let topic = topic.clone();
                let keys = keys.clone();
                tokio::spawn(async move {
                    let value = event(base, b'x');
                    bus.produce(&topic, keys[i % KEYS].as_bytes(), Some(&value))
                        .await
                        .expect("produce");
                    drop(permit);
                });
            }
        })
    };
    let mut seen = 0;
    while seen < SATURATION_EVENTS {
        if let Polled::Records(r) = consumer.poll(Duration::from_secs(10)).await.expect("poll") {
            seen += r.len();
        }
    }
    let elapsed = base.elapsed();
    let cpu = cpu_secs() - cpu;
    producer.await.expect("producer");
    consumer.close().await.expect("close");
    (
        SATURATION_EVENTS as f64 / elapsed.as_secs_f64(),
        cpu * 1e6 / SATURATION_EVENTS as f64,
    )
}

/// `PRODUCERS` tasks each producing `EVENTS_PER_PRODUCER` events one at a
/// time (awaiting each acknowledgement), like gateway sessions: events/s
/// through produce and consume, and CPU milliseconds per 1,000 events.
async fn closed_loop(bus: Arc<dyn Bus>) -> (f64, f64) {
    let topic = format!("bench-closed-{}", uuid::Uuid::now_v7().simple());
    bus.create_topics(&[TopicConfig::log(&topic, PARTITIONS)])
        .await
        .expect("topic");
    let mut consumer = consumer_ready(&*bus, &topic).await;
    let keys = keys();
    let total = PRODUCERS * EVENTS_PER_PRODUCER;
    let cpu = cpu_secs();
    let base = Instant::now();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            let bus = bus.clone();
            let topic = topic.clone();
            let keys = keys.clone();
            tokio::spawn(async move {
                for i in 0..EVENTS_PER_PRODUCER {
                    let value = event(base, b'z');
                    let key = &keys[(p * EVENTS_PER_PRODUCER + i) % KEYS];
                    bus.produce(&topic, key.as_bytes(), Some(&value))
                        .await
                        .expect("produce");
                }
            })
        })
        .collect();
    let mut seen = 0;
    while seen < total {
        if let Polled::Records(r) = consumer.poll(Duration::from_secs(10)).await.expect("poll") {
            seen += r.len();
        }
    }
    let elapsed = base.elapsed();
    let cpu = cpu_secs() - cpu;
    for p in producers {
        p.await.expect("producer");
    }
    consumer.close().await.expect("close");
    (
        total as f64 / elapsed.as_secs_f64(),
        cpu * 1e6 / total as f64,
    )
}

/// Latency from produce call to consume at `RATE_PER_SEC`.
async fn latency(bus: Arc<dyn Bus>) -> Histogram<u64> {
    let topic = format!("bench-lat-{}", uuid::Uuid::now_v7().simple());
    bus.create_topics(&[TopicConfig::log(&topic, PARTITIONS)])
        .await
        .expect("topic");
    let mut consumer = consumer_ready(&*bus, &topic).await;
    let keys = keys();
    let base = Instant::now();
    let total = RATE_PER_SEC * RATE_SECS as usize;
    let per_tick = RATE_PER_SEC / 1000;
    let producer = {
        let bus = bus.clone();
        let topic = topic.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(Duration::from_millis(1));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut i = 0;
            while i < total {
                ticker.tick().await;
                for _ in 0..per_tick {
                    let bus = bus.clone();
                    let topic = topic.clone();
                    let key = keys[i % KEYS].clone();
                    tokio::spawn(async move {
                        let value = event(base, b'y');
                        bus.produce(&topic, key.as_bytes(), Some(&value))
                            .await
                            .expect("produce");
                    });
                    i += 1;
                }
            }
        })
    };
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let warmup = RATE_PER_SEC; // the first second
    let mut seen = 0;
    while seen < total {
        if let Polled::Records(records) =
            consumer.poll(Duration::from_secs(10)).await.expect("poll")
        {
            let now = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX);
            for r in records {
                seen += 1;
                let value = r.value.expect("value");
                let sent = u64::from_le_bytes(value[..8].try_into().expect("8 bytes"));
                if seen > warmup {
                    histogram
                        .record(now.saturating_sub(sent) / 1000)
                        .expect("in range");
                }
            }
        }
    }
    producer.await.expect("producer");
    consumer.close().await.expect("close");
    histogram
}

async fn measure(backend: &'static str, open: impl Fn() -> Arc<dyn Bus>) -> Figures {
    let (throughput, cpu_ms) = saturation(open()).await;
    let (closed_loop, closed_loop_cpu_ms) = closed_loop(open()).await;
    let h = latency(open()).await;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Figures {
        backend,
        throughput,
        cpu_ms,
        closed_loop,
        closed_loop_cpu_ms,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: h.max() as f64 / 1000.0,
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let backends = std::env::var("BENCH_BACKENDS").unwrap_or_else(|_| "embedded,kafka".into());
    let mut results = Vec::new();
    runtime.block_on(async {
        if backends.contains("embedded") {
            let dir = tempfile::tempdir().expect("tempdir");
            let bus: Arc<dyn Bus> = Arc::new(
                EmbeddedBus::open(EmbeddedConfig::new(dir.path().join("bus.sqlite")))
                    .await
                    .expect("embedded log"),
            );
            results
                .push(measure("embedded (SQLite WAL, synchronous=normal)", || bus.clone()).await);
            drop(bus);
        }
        if backends.contains("kafka") {
            let bootstrap = std::env::var("SWITCHBOARD_TEST_KAFKA")
                .unwrap_or_else(|_| "127.0.0.1:9092".to_owned());
            let bus: Arc<dyn Bus> =
                Arc::new(KafkaBus::connect(KafkaConfig::new(bootstrap)).expect("kafka"));
            results.push(
                measure("kafka (1 broker, acks=all, idempotent, linger 0)", || {
                    bus.clone()
                })
                .await,
            );
        }
    });
    println!(
        "| backend | throughput (events/s, {SATURATION_EVENTS} events) | CPU ms/1k | {PRODUCERS} producers awaiting each (events/s) | CPU ms/1k | p50 ms @ {RATE_PER_SEC}/s | p99 ms | p99.9 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for f in results {
        println!(
            "| {} | {:.0} | {:.1} | {:.0} | {:.1} | {:.3} | {:.3} | {:.3} | {:.3} |",
            f.backend,
            f.throughput,
            f.cpu_ms,
            f.closed_loop,
            f.closed_loop_cpu_ms,
            f.p50_ms,
            f.p99_ms,
            f.p999_ms,
            f.max_ms
        );
    }
}
