//! The bus: one interface over two implementations.
//!
//! * [`kafka::KafkaBus`]: Apache Kafka through rdkafka, for deployments that run
//!   gateways, processors and projections as separate processes.
//! * [`embedded::EmbeddedBus`]: a durable log in SQLite under `./data`, for the
//!   single-binary default.
//!
//! Both are held to one conformance suite (`tests/bus_conformance.rs`, the
//! [`crate::bus_conformance_suite`] macro). The contract:
//!
//! * [`Bus::produce`] returns only once the record is durable (Kafka: acknowledged
//!   by all in-sync replicas of an idempotent producer; embedded: committed to the
//!   SQLite write-ahead log). An acknowledged record is never lost by a crash of
//!   the producer, of a consumer or of the broker.
//! * Records with the same key go to the same partition (murmur2, the partitioner
//!   Kafka's Java clients use, on both backends) and are read in produce order.
//! * Consumers are members of a consumer group. Partitions are split among the
//!   members; rebalances reach the member in-band as [`Polled::Assigned`] and
//!   [`Polled::Revoked`] (the assignment and revocation callbacks), always before
//!   any record of a newly assigned partition. Delivery is at least once: a
//!   position is stored only by an explicit [`Consumer::commit`], and everything
//!   after the committed position is delivered again to the next owner.
//! * [`Consumer::seek`] moves the position of an assigned partition, e.g. to 0
//!   for a replay.
//! * Compacted topics eventually keep only the latest record per key.

pub mod conformance;
pub mod embedded;
pub mod kafka;
pub mod metered;
mod murmur2;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

pub use murmur2::partition_for_key;

/// A topic and one of its partitions.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Full (prefixed) topic name.
    pub topic: Arc<str>,
    /// Partition number, from 0.
    pub partition: i32,
}

impl TopicPartition {
    /// A topic partition.
    pub fn new(topic: &str, partition: i32) -> Self {
        Self {
            topic: Arc::from(topic),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// One record read from the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Full (prefixed) topic name.
    pub topic: Arc<str>,
    /// Partition the record is in.
    pub partition: i32,
    /// Offset of the record within its partition.
    pub offset: i64,
    /// The record key (for events: the subject).
    pub key: Bytes,
    /// The value; `None` is a tombstone on compacted topics.
    pub value: Option<Bytes>,
    /// Milliseconds since the Unix epoch at which the bus stored the record.
    pub timestamp_ms: i64,
}

impl Record {
    /// The topic partition this record belongs to.
    pub fn topic_partition(&self) -> TopicPartition {
        TopicPartition {
            topic: self.topic.clone(),
            partition: self.partition,
        }
    }
}

/// Where a durably stored record landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Partition the record was written to.
    pub partition: i32,
    /// Its offset in that partition.
    pub offset: i64,
}

/// How a topic cleans up old records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CleanupPolicy {
    /// Records older than the retention are deleted.
    Delete,
    /// Only the latest record per key is kept.
    Compact,
}

/// A topic to create, with its full (prefixed) name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicConfig {
    /// Full topic name.
    pub name: String,
    /// Number of partitions.
    pub partitions: i32,
    /// Cleanup policy.
    pub cleanup: CleanupPolicy,
    /// Retention of delete topics in milliseconds; `None` keeps records forever.
    pub retention_ms: Option<i64>,
    /// Extra Kafka topic configuration (e.g. `segment.ms`); ignored by the
    /// embedded log.
    pub kafka_overrides: Vec<(String, String)>,
}

impl TopicConfig {
    /// A delete-policy topic kept forever.
    pub fn log(name: impl Into<String>, partitions: i32) -> Self {
        Self {
            name: name.into(),
            partitions,
            cleanup: CleanupPolicy::Delete,
            retention_ms: None,
            kafka_overrides: Vec::new(),
        }
    }

    /// A compacted topic.
    pub fn compacted(name: impl Into<String>, partitions: i32) -> Self {
        Self {
            cleanup: CleanupPolicy::Compact,
            ..Self::log(name, partitions)
        }
    }

    /// The topics of the schema catalogue under `prefix`.
    pub fn catalogue(prefix: &str) -> Vec<TopicConfig> {
        switchboard_schemas::topics::topics()
            .iter()
            .map(|spec| TopicConfig {
                name: switchboard_schemas::topics::full_name(prefix, spec.topic),
                partitions: i32::try_from(spec.partitions).unwrap_or(i32::MAX),
                cleanup: match spec.cleanup {
                    switchboard_schemas::topics::Cleanup::Delete => CleanupPolicy::Delete,
                    switchboard_schemas::topics::Cleanup::Compact => CleanupPolicy::Compact,
                },
                retention_ms: spec.retention_ms,
                kafka_overrides: Vec::new(),
            })
            .collect()
    }
}

/// Where a consumer group starts on a partition that has no committed position.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StartFrom {
    /// The oldest record still stored.
    #[default]
    Earliest,
    /// Only records produced after the assignment.
    Latest,
}

/// How to join a consumer group.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// Consumer group id.
    pub group: String,
    /// Full topic names to subscribe to.
    pub topics: Vec<String>,
    /// Start position for partitions without a committed position.
    pub start: StartFrom,
    /// Maximum records returned by one poll.
    pub max_batch: usize,
}

impl ConsumerConfig {
    /// A group member subscribed to `topics`, starting from the earliest record.
    pub fn new(group: impl Into<String>, topics: &[&str]) -> Self {
        Self {
            group: group.into(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            start: StartFrom::Earliest,
            max_batch: 1024,
        }
    }
}

/// What one poll of a consumer returned.
#[derive(Debug)]
pub enum Polled {
    /// Records, in offset order per partition.
    Records(Vec<Record>),
    /// These partitions are now this member's; positions are the committed
    /// ones (or [`StartFrom`]) unless the caller seeks before the next poll.
    Assigned(Vec<TopicPartition>),
    /// These partitions are no longer this member's. Records not committed
    /// before this point will be delivered again to the new owner.
    Revoked(Vec<TopicPartition>),
    /// Nothing arrived within the timeout.
    Idle,
}

/// Errors of the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The topic does not exist.
    #[error("unknown topic {0}")]
    UnknownTopic(String),
    /// A commit or seek named a partition this member does not own.
    #[error("partition {0} is not assigned to this consumer")]
    NotAssigned(TopicPartition),
    /// A topic exists with a different number of partitions.
    #[error("topic {topic} has {actual} partitions, the catalogue says {expected}")]
    PartitionMismatch {
        /// Topic name.
        topic: String,
        /// Partitions in the catalogue.
        expected: i32,
        /// Partitions found.
        actual: i32,
    },
    /// The bus has shut down.
    #[error("the bus is closed")]
    Closed,
    /// An operation did not finish in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Kafka returned an error.
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The embedded log's storage returned an error.
    #[error("embedded log storage: {0}")]
    Storage(#[from] sqlx::Error),
    /// The embedded log's schema could not be migrated.
    #[error("embedded log migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Invalid settings.
    #[error("invalid bus configuration: {0}")]
    Config(String),
}

impl BusError {
    /// Whether retrying the same operation later may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            BusError::Timeout(_) => true,
            BusError::Kafka(e) => e.rdkafka_error_code().is_some_and(kafka::is_retriable),
            BusError::Storage(sqlx::Error::PoolTimedOut | sqlx::Error::Io(_)) => true,
            _ => false,
        }
    }
}

/// A producer and consumer factory over one log (Kafka or embedded).
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Creates the topics that do not exist yet; existing topics are checked
    /// for a matching partition count.
    async fn create_topics(&self, topics: &[TopicConfig]) -> Result<(), BusError>;

    /// Writes one record and returns once it is durable.
    async fn produce(
        &self,
        topic: &str,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Delivery, BusError>;

    /// Joins a consumer group.
    async fn consumer(&self, config: ConsumerConfig) -> Result<Box<dyn Consumer>, BusError>;

    /// Number of partitions of a topic.
    async fn partitions(&self, topic: &str) -> Result<i32, BusError>;

    /// The offset after the last stored record of each partition of `topic`
    /// (the high watermark), indexed by partition. A reader that has reached
    /// these positions has caught up.
    async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, BusError>;

    /// A short name for logs and metrics (`kafka` or `embedded`).
    fn backend(&self) -> &'static str;
}

/// A member of a consumer group.
#[async_trait]
pub trait Consumer: Send {
    /// Waits up to `timeout` for records or a rebalance. Cancel-safe: a poll
    /// dropped before it completes loses and repeats nothing.
    async fn poll(&mut self, timeout: Duration) -> Result<Polled, BusError>;

    /// Stores the positions (the offsets of the next records to read) of
    /// partitions this member owns, durably.
    async fn commit(&mut self, positions: &[(TopicPartition, i64)]) -> Result<(), BusError>;

    /// Moves the position of an assigned partition; the next poll reads from
    /// `offset` (or the oldest stored record after it).
    async fn seek(&mut self, tp: &TopicPartition, offset: i64) -> Result<(), BusError>;

    /// The group's committed positions of `tps` (assigned or not), `None`
    /// where nothing was committed. Processors that rebuild state from the
    /// log read up to these before resuming.
    async fn committed(&mut self, tps: &[TopicPartition]) -> Result<Vec<Option<i64>>, BusError>;

    /// The partitions this member owns now.
    fn assignment(&self) -> Vec<TopicPartition>;

    /// Leaves the group so that the partitions move to the other members at once.
    async fn close(self: Box<Self>) -> Result<(), BusError>;
}

/// The positions to commit after processing `records`: one per partition, the
/// offset after the last record.
pub fn positions_after(records: &[Record]) -> Vec<(TopicPartition, i64)> {
    let mut positions: std::collections::BTreeMap<TopicPartition, i64> = Default::default();
    for r in records {
        let next = r.offset + 1;
        positions
            .entry(r.topic_partition())
            .and_modify(|p| *p = (*p).max(next))
            .or_insert(next);
    }
    positions.into_iter().collect()
}

/// Opens the bus the configuration names and creates the catalogue's topics.
pub async fn open(config: &crate::config::Config) -> Result<Arc<dyn Bus>, BusError> {
    let bus: Arc<dyn Bus> = match config.bus.backend {
        crate::config::Backend::Embedded => {
            Arc::new(embedded::EmbeddedBus::open(config.embedded_bus()).await?)
        }
        crate::config::Backend::Kafka => Arc::new(kafka::KafkaBus::connect(config.kafka_bus())?),
    };
    Ok(Arc::new(metered::MeteredBus::new(bus)))
}
