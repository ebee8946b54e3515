//! The bus on Apache Kafka, through rdkafka (librdkafka).
//!
//! Producer: idempotent (`enable.idempotence=true`, hence `acks=all`), no
//! compression, `linger.ms` 0 by default and Nagle off, for the IM hot path;
//! keys are partitioned with `murmur2_random` (the Java clients' partitioner,
//! matching the embedded log). A produce returns on the delivery report, i.e.
//! once every in-sync replica has the record.
//!
//! Consumer: a group member with auto-commit and auto offset store off;
//! positions move only by [`Consumer::commit`]. Rebalance callbacks of
//! librdkafka run inside the poll that serves the consumer queue; they queue
//! [`Polled::Assigned`]/[`Polled::Revoked`] events that the next
//! [`Consumer::poll`] returns before any record fetched after them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{
    Bus, BusError, CleanupPolicy, Consumer, ConsumerConfig, Delivery, Polled, Record, StartFrom,
    TopicConfig, TopicPartition,
};

/// Settings of the Kafka backend.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// `bootstrap.servers`, e.g. `127.0.0.1:9092`.
    pub bootstrap_servers: String,
    /// Replication factor of created topics.
    pub replication_factor: i32,
    /// Producer `linger.ms`.
    pub linger_ms: u32,
    /// `client.id` prefix.
    pub client_id: String,
    /// Consumer `session.timeout.ms`: how soon a member that died is replaced.
    pub session_timeout_ms: u32,
    /// Producer `message.timeout.ms`: how long a produce retries before failing.
    pub message_timeout_ms: u32,
}

impl KafkaConfig {
    /// Defaults for a cluster at `bootstrap_servers`.
    pub fn new(bootstrap_servers: impl Into<String>) -> Self {
        Self {
            bootstrap_servers: bootstrap_servers.into(),
            replication_factor: 1,
            linger_ms: 0,
            client_id: "switchboard".to_owned(),
            session_timeout_ms: 6000,
            message_timeout_ms: 60_000,
        }
    }
}

/// Whether a Kafka error code is worth retrying.
pub(crate) fn is_retriable(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::QueueFull
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::CoordinatorLoadInProgress
            | RDKafkaErrorCode::NotCoordinator
            | RDKafkaErrorCode::RebalanceInProgress
            | RDKafkaErrorCode::PreferredLeaderNotAvailable
    )
}

/// The Kafka bus: one idempotent producer shared by all callers.
#[derive(Clone)]
pub struct KafkaBus {
    config: KafkaConfig,
    producer: FutureProducer,
    partitions: Arc<Mutex<HashMap<String, i32>>>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("bootstrap_servers", &self.config.bootstrap_servers)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Creates the producer. No connection is made until first use.
    pub fn connect(config: KafkaConfig) -> Result<Self, BusError> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap_servers)
            .set("client.id", format!("{}-producer", config.client_id))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger_ms.to_string())
            .set("compression.type", "none")
            .set("partitioner", "murmur2_random")
            .set("socket.nagle.disable", "true")
            .set("message.timeout.ms", config.message_timeout_ms.to_string())
            .set("queue.buffering.max.messages", "1000000")
            .create()?;
        Ok(Self {
            config,
            producer,
            partitions: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>, BusError> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", &self.config.bootstrap_servers)
            .set("client.id", format!("{}-admin", self.config.client_id))
            .create()?)
    }

    async fn fetch_partitions(&self, topic: &str) -> Result<i32, BusError> {
        let producer = self.producer.clone();
        let name = topic.to_owned();
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&name), Duration::from_secs(10))
        })
        .await
        .map_err(|_| BusError::Closed)??;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
            return Err(BusError::UnknownTopic(topic.to_owned()));
        };
        if t.error().is_some() || t.partitions().is_empty() {
            return Err(BusError::UnknownTopic(topic.to_owned()));
        }
        Ok(t.partitions().len() as i32)
    }
}

#[async_trait]
impl Bus for KafkaBus {
    async fn create_topics(&self, topics: &[TopicConfig]) -> Result<(), BusError> {
        let admin = self.admin()?;
        let retention: Vec<String> = topics
            .iter()
            .map(|t| t.retention_ms.unwrap_or(-1).to_string())
            .collect();
        let new_topics: Vec<NewTopic<'_>> = topics
            .iter()
            .zip(&retention)
            .map(|(t, retention)| {
                let mut nt = NewTopic::new(
                    &t.name,
                    t.partitions,
                    TopicReplication::Fixed(self.config.replication_factor),
                );
                nt = match t.cleanup {
                    CleanupPolicy::Delete => nt
                        .set("cleanup.policy", "delete")
                        .set("retention.ms", retention),
                    CleanupPolicy::Compact => nt.set("cleanup.policy", "compact"),
                };
                for (k, v) in &t.kafka_overrides {
                    nt = nt.set(k, v);
                }
                nt
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin.create_topics(&new_topics, &options).await?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(BusError::Config(format!("creating topic {name}: {code}")));
                }
            }
        }
        for t in topics {
            // A topic is usable once its metadata shows its partitions.
            let mut attempts = 0;
            let actual = loop {
                match self.fetch_partitions(&t.name).await {
                    Ok(n) => break n,
                    Err(e) if attempts < 50 => {
                        attempts += 1;
                        tracing::debug!(topic = %t.name, error = %e, "waiting for topic metadata");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e),
                }
            };
            if actual != t.partitions {
                return Err(BusError::PartitionMismatch {
                    topic: t.name.clone(),
                    expected: t.partitions,
                    actual,
                });
            }
            self.partitions
                .lock()
                .expect("partitions lock")
                .insert(t.name.clone(), actual);
        }
        Ok(())
    }

    async fn produce(
        &self,
        topic: &str,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<Delivery, BusError> {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).key(key);
        if let Some(v) = value {
            record = record.payload(v);
        }
        match self.producer.send(record, Duration::from_secs(5)).await {
            Ok(d) => Ok(Delivery {
                partition: d.partition,
                offset: d.offset,
            }),
            Err((e, _)) => Err(BusError::Kafka(e)),
        }
    }

    async fn consumer(&self, config: ConsumerConfig) -> Result<Box<dyn Consumer>, BusError> {
        let events = Arc::new(Mutex::new(VecDeque::new()));
        let context = RebalanceContext {
            events: events.clone(),
        };
        let consumer: StreamConsumer<RebalanceContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.config.bootstrap_servers)
            .set("client.id", format!("{}-consumer", self.config.client_id))
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set(
                "auto.offset.reset",
                match config.start {
                    StartFrom::Earliest => "earliest",
                    StartFrom::Latest => "latest",
                },
            )
            .set(
                "session.timeout.ms",
                self.config.session_timeout_ms.to_string(),
            )
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", "100")
            .set("socket.nagle.disable", "true")
            .set("partition.assignment.strategy", "range")
            .create_with_context(context)?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Box::new(KafkaConsumer {
            consumer: Arc::new(consumer),
            events,
            stash: VecDeque::new(),
            max_batch: config.max_batch.max(1),
        }))
    }

    async fn partitions(&self, topic: &str) -> Result<i32, BusError> {
        if let Some(n) = self.partitions.lock().expect("partitions lock").get(topic) {
            return Ok(*n);
        }
        let n = self.fetch_partitions(topic).await?;
        self.partitions
            .lock()
            .expect("partitions lock")
            .insert(topic.to_owned(), n);
        Ok(n)
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, BusError> {
        let partitions = self.partitions(topic).await?;
        // One request per partition, all at once: callers (the router's
        // session-table barrier) ask before every batch.
        let queries = (0..partitions).map(|p| {
            let producer = self.producer.clone();
            let name = topic.to_owned();
            tokio::task::spawn_blocking(move || {
                // Right after a topic is created its partitions may have no
                // leader for a moment: retriable, so wait it out.
                let deadline = std::time::Instant::now() + Duration::from_secs(15);
                loop {
                    match producer
                        .client()
                        .fetch_watermarks(&name, p, Duration::from_secs(10))
                    {
                        Ok((_, high)) => return Ok(high),
                        Err(e)
                            if e.rdkafka_error_code().is_some_and(is_retriable)
                                && std::time::Instant::now() < deadline =>
                        {
                            std::thread::sleep(Duration::from_millis(100));
                        }
                        Err(e) => return Err(BusError::from(e)),
                    }
                }
            })
        });
        futures::future::try_join_all(queries)
            .await
            .map_err(|_| BusError::Closed)?
            .into_iter()
            .collect()
    }

    fn backend(&self) -> &'static str {
        "kafka"
    }
}

/// Queues rebalance events for the consumer's next poll.
struct RebalanceContext {
    events: Arc<Mutex<VecDeque<Polled>>>,
}

impl ClientContext for RebalanceContext {}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

impl ConsumerContext for RebalanceContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let event = match rebalance {
            Rebalance::Assign(tpl) => Polled::Assigned(partitions_of(tpl)),
            Rebalance::Revoke(tpl) => Polled::Revoked(partitions_of(tpl)),
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "kafka consumer rebalance failed");
                return;
            }
        };
        self.events.lock().expect("events lock").push_back(event);
    }
}

struct KafkaConsumer {
    consumer: Arc<StreamConsumer<RebalanceContext>>,
    events: Arc<Mutex<VecDeque<Polled>>>,
    /// Records fetched after a rebalance event, returned after it.
    stash: VecDeque<Record>,
    max_batch: usize,
}

fn to_record(m: &BorrowedMessage<'_>) -> Record {
    Record {
        topic: Arc::from(m.topic()),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(Bytes::copy_from_slice).unwrap_or_default(),
        value: m.payload().map(Bytes::copy_from_slice),
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
    }
}

impl KafkaConsumer {
    fn next_event(&self) -> Option<Polled> {
        self.events.lock().expect("events lock").pop_front()
    }

    fn has_event(&self) -> bool {
        !self.events.lock().expect("events lock").is_empty()
    }
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn poll(&mut self, timeout: Duration) -> Result<Polled, BusError> {
        if let Some(event) = self.next_event() {
            return Ok(event);
        }
        if !self.stash.is_empty() {
            let n = self.stash.len().min(self.max_batch);
            return Ok(Polled::Records(self.stash.drain(..n).collect()));
        }
        let first = match tokio::time::timeout(timeout, self.consumer.recv()).await {
            Err(_) => {
                return Ok(self.next_event().unwrap_or(Polled::Idle));
            }
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(m)) => to_record(&m),
        };
        // A record received in the same poll that ran a rebalance callback
        // belongs after the event.
        if self.has_event() {
            self.stash.push_back(first);
            return Ok(self.next_event().unwrap_or(Polled::Idle));
        }
        let mut batch = vec![first];
        while batch.len() < self.max_batch {
            match self.consumer.recv().now_or_never() {
                Some(Ok(m)) => {
                    let record = to_record(&m);
                    if self.has_event() {
                        self.stash.push_back(record);
                        break;
                    }
                    batch.push(record);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    break;
                }
                None => break,
            }
        }
        Ok(Polled::Records(batch))
    }

    async fn commit(&mut self, positions: &[(TopicPartition, i64)]) -> Result<(), BusError> {
        if positions.is_empty() {
            return Ok(());
        }
        let assignment = self.consumer.assignment()?;
        let mut tpl = TopicPartitionList::new();
        for (tp, offset) in positions {
            if assignment.find_partition(&tp.topic, tp.partition).is_none() {
                return Err(BusError::NotAssigned(tp.clone()));
            }
            tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset))?;
        }
        let consumer = self.consumer.clone();
        tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|_| BusError::Closed)??;
        Ok(())
    }

    async fn seek(&mut self, tp: &TopicPartition, offset: i64) -> Result<(), BusError> {
        let assignment = self.consumer.assignment()?;
        if assignment.find_partition(&tp.topic, tp.partition).is_none() {
            return Err(BusError::NotAssigned(tp.clone()));
        }
        self.stash
            .retain(|r| !(r.partition == tp.partition && *r.topic == *tp.topic));
        let consumer = self.consumer.clone();
        let (topic, partition) = (tp.topic.clone(), tp.partition);
        tokio::task::spawn_blocking(move || {
            // Right after an assignment the fetcher may not be started yet;
            // librdkafka then answers with a state error for a moment.
            let mut attempt = 0;
            loop {
                match consumer.seek(
                    &topic,
                    partition,
                    Offset::Offset(offset),
                    Duration::from_secs(10),
                ) {
                    Err(KafkaError::Seek(_)) if attempt < 50 => {
                        attempt += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    other => return other,
                }
            }
        })
        .await
        .map_err(|_| BusError::Closed)??;
        Ok(())
    }

    async fn committed(&mut self, tps: &[TopicPartition]) -> Result<Vec<Option<i64>>, BusError> {
        if tps.is_empty() {
            return Ok(Vec::new());
        }
        let mut tpl = TopicPartitionList::new();
        for tp in tps {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        let consumer = self.consumer.clone();
        let answer = tokio::task::spawn_blocking(move || {
            consumer.committed_offsets(tpl, Duration::from_secs(10))
        })
        .await
        .map_err(|_| BusError::Closed)??;
        Ok(tps
            .iter()
            .map(|tp| {
                match answer
                    .find_partition(&tp.topic, tp.partition)
                    .map(|e| e.offset())
                {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                }
            })
            .collect())
    }

    fn assignment(&self) -> Vec<TopicPartition> {
        self.consumer
            .assignment()
            .map(|tpl| partitions_of(&tpl))
            .unwrap_or_default()
    }

    async fn close(self: Box<Self>) -> Result<(), BusError> {
        let consumer = self.consumer;
        tokio::task::spawn_blocking(move || {
            consumer.unsubscribe();
            drop(consumer);
        })
        .await
        .map_err(|_| BusError::Closed)?;
        Ok(())
    }
}
