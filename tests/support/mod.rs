//! Fixtures shared by the integration tests: the two bus backends.

#![allow(dead_code)]

pub mod sip;
pub mod xmpp;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchboard_infra::bus::conformance::Fixture;
use switchboard_infra::bus::embedded::{EmbeddedBus, EmbeddedConfig};
use switchboard_infra::bus::kafka::{KafkaBus, KafkaConfig};
use switchboard_infra::bus::{Bus, TopicConfig};

/// Kafka of the test run: `SWITCHBOARD_TEST_KAFKA`, else the broker that
/// `infra/scripts/kafka.sh start` runs.
pub fn kafka_bootstrap() -> String {
    std::env::var("SWITCHBOARD_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn base_command() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
    cmd.env("SWITCHBOARD_LOG", "warn");
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD__") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// The embedded log in a temporary directory.
pub struct EmbeddedFixture {
    dir: tempfile::TempDir,
    bus: tokio::sync::Mutex<Option<EmbeddedBus>>,
    /// Records kept in memory per partition; `None`: the default.
    tail_records: Option<usize>,
}

impl EmbeddedFixture {
    pub async fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
            bus: tokio::sync::Mutex::new(None),
            tail_records: None,
        }
    }

    /// A log that keeps only `records` per partition in memory, so that
    /// consumers read nearly everything from the database.
    #[allow(dead_code)]
    pub async fn with_tail(records: usize) -> Self {
        Self {
            tail_records: Some(records),
            ..Self::new().await
        }
    }

    fn config(&self) -> EmbeddedConfig {
        let mut c = EmbeddedConfig::new(self.dir.path().join("bus.sqlite"));
        c.maintenance_interval = Duration::from_secs(3600);
        if let Some(records) = self.tail_records {
            c.tail_records = records;
        }
        c
    }
}

#[async_trait]
impl Fixture for EmbeddedFixture {
    async fn open(&self) -> Arc<dyn Bus> {
        let mut slot = self.bus.lock().await;
        if slot.is_none() {
            *slot = Some(EmbeddedBus::open(self.config()).await.expect("open log"));
        }
        Arc::new(slot.clone().expect("open"))
    }

    async fn release(&self) {
        self.bus.lock().await.take();
    }

    fn command(&self) -> tokio::process::Command {
        let mut cmd = base_command();
        cmd.env("SWITCHBOARD__DATA_DIR", self.dir.path())
            .env("SWITCHBOARD__BUS__BACKEND", "embedded");
        if let Some(records) = self.tail_records {
            cmd.env(
                "SWITCHBOARD__BUS__EMBEDDED__TAIL_RECORDS",
                records.to_string(),
            );
        }
        cmd
    }

    fn compacted_topic(&self, name: &str, partitions: i32) -> TopicConfig {
        TopicConfig::compacted(name, partitions)
    }

    async fn compact(&self, _bus: &dyn Bus) {
        let bus = self.bus.lock().await.clone().expect("open");
        bus.maintain().await.expect("maintenance");
    }

    async fn crash_broker(&self) -> bool {
        false
    }
}

/// The Kafka broker started by `infra/scripts/kafka.sh`.
pub struct KafkaFixture {
    dir: tempfile::TempDir,
}

impl KafkaFixture {
    pub async fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn config() -> KafkaConfig {
        let mut c = KafkaConfig::new(kafka_bootstrap());
        c.client_id = "switchboard-test".to_owned();
        c
    }
}

#[async_trait]
impl Fixture for KafkaFixture {
    async fn open(&self) -> Arc<dyn Bus> {
        Arc::new(KafkaBus::connect(Self::config()).expect("kafka client"))
    }

    fn command(&self) -> tokio::process::Command {
        let mut cmd = base_command();
        cmd.env("SWITCHBOARD__DATA_DIR", self.dir.path())
            .env("SWITCHBOARD__BUS__BACKEND", "kafka")
            .env(
                "SWITCHBOARD__BUS__KAFKA__BOOTSTRAP_SERVERS",
                kafka_bootstrap(),
            );
        cmd
    }

    fn compacted_topic(&self, name: &str, partitions: i32) -> TopicConfig {
        let mut t = TopicConfig::compacted(name, partitions);
        t.kafka_overrides = [
            ("segment.ms", "100"),
            ("min.cleanable.dirty.ratio", "0.001"),
            ("min.compaction.lag.ms", "0"),
            ("delete.retention.ms", "100"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        t
    }

    async fn compact(&self, _bus: &dyn Bus) {}

    async fn crash_broker(&self) -> bool {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/infra/scripts/kafka.sh");
        for action in ["kill9", "start"] {
            let status = tokio::process::Command::new("bash")
                .args([script, action])
                .status()
                .await
                .expect("run kafka.sh");
            assert!(status.success(), "kafka.sh {action} failed");
        }
        true
    }
}

/// Every event on `topic` now (read with a fresh group up to the ends the
/// topic had when called), in offset order per partition.
pub async fn read_events(
    bus: &std::sync::Arc<dyn switchboard_infra::bus::Bus>,
    topic: &str,
) -> Vec<switchboard_schemas::Envelope> {
    use switchboard_infra::bus::{ConsumerConfig, Polled};
    let ends = bus.end_offsets(topic).await.expect("ends");
    let mut positions = vec![0i64; ends.len()];
    let mut out = Vec::new();
    if ends.iter().all(|e| *e == 0) {
        return out;
    }
    let mut consumer = bus
        .consumer(ConsumerConfig::new(
            format!("test-read-{}", uuid::Uuid::now_v7().simple()),
            &[topic],
        ))
        .await
        .expect("consumer");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while positions.iter().zip(&ends).any(|(p, e)| p < e) {
        assert!(tokio::time::Instant::now() < deadline, "reading {topic}");
        if let Polled::Records(records) = consumer
            .poll(std::time::Duration::from_millis(100))
            .await
            .expect("poll")
        {
            for r in records {
                positions[r.partition as usize] = r.offset + 1;
                out.push(
                    switchboard_schemas::Envelope::from_json_slice(
                        r.value.as_deref().expect("value"),
                    )
                    .expect("decode"),
                );
            }
        }
    }
    let _ = consumer.close().await;
    out
}
