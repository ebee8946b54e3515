//! A global table: every record of some topics (`sessions`, `presence`,
//! ...), read from the start by a consumer group of its own, next to a
//! consumer-group member of another topic whose records it decides.
//!
//! The topics are separate logs, so a record of the member's topic can be
//! read before a table record stored earlier (a message before the carbons
//! choice its sender saw acknowledged, XEP-0280 §4; a roster request before
//! the session that sent it). [`GlobalTable::barrier`] reads the table up to
//! the ends it has at the time of the call, so everything stored before the
//! batch in hand is applied first.

use std::collections::BTreeMap;
use std::time::Duration;

use switchboard_infra::bus::{
    Bus, BusError, Consumer, ConsumerConfig, Polled, Record, StartFrom, TopicPartition,
    positions_after,
};

/// Longest a batch waits for the table to catch up before it is decided
/// anyway (logged).
const BARRIER_WAIT: Duration = Duration::from_secs(2);

/// The read of a global table and how far it got.
pub(crate) struct GlobalTable {
    /// The table's consumer (polled by the owner's loop).
    pub consumer: Box<dyn Consumer>,
    topics: Vec<String>,
    /// Position (next offset) reached in each partition.
    read: BTreeMap<TopicPartition, i64>,
    /// Partitions not yet read to the end they had at start.
    catching_up: Vec<(TopicPartition, i64)>,
    live: bool,
}

impl GlobalTable {
    /// Subscribes a fresh group (named from `name`) to `topics`, from the
    /// start, and notes the ends the table must reach to be live.
    pub async fn open(bus: &dyn Bus, name: &str, topics: &[String]) -> Result<Self, BusError> {
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        let consumer = bus
            .consumer(ConsumerConfig {
                start: StartFrom::Earliest,
                ..ConsumerConfig::new(format!("{name}-{}", uuid::Uuid::now_v7().simple()), &refs)
            })
            .await?;
        let mut catching_up = Vec::new();
        for topic in topics {
            for (partition, end) in bus.end_offsets(topic).await?.into_iter().enumerate() {
                if end > 0 {
                    catching_up.push((TopicPartition::new(topic, partition as i32), end));
                }
            }
        }
        Ok(Self {
            consumer,
            topics: topics.to_vec(),
            read: BTreeMap::new(),
            live: catching_up.is_empty(),
            catching_up,
        })
    }

    /// Read to the ends it had at start: before that the table replays
    /// history (old sessions, long gone), which must not cause deliveries.
    pub fn live(&self) -> bool {
        self.live
    }

    /// Notes the positions `records` reached; true when they made the table
    /// live.
    pub fn track(&mut self, records: &[Record]) -> bool {
        for (tp, position) in positions_after(records) {
            let slot = self.read.entry(tp).or_insert(0);
            *slot = (*slot).max(position);
        }
        if self.live {
            return false;
        }
        let read = &self.read;
        self.catching_up
            .retain(|(tp, end)| read.get(tp).is_none_or(|position| position < end));
        self.live = self.catching_up.is_empty();
        self.live
    }

    /// Reads the table up to the ends it has now, handing every batch to
    /// `apply` (the table is live by then), before the caller decides the
    /// records it holds.
    pub async fn barrier(
        &mut self,
        bus: &dyn Bus,
        mut apply: impl FnMut(&[Record]),
    ) -> Result<(), BusError> {
        let mut behind: Vec<(TopicPartition, i64)> = Vec::new();
        for topic in &self.topics {
            for (partition, end) in bus.end_offsets(topic).await?.into_iter().enumerate() {
                let tp = TopicPartition::new(topic, partition as i32);
                if end > self.read.get(&tp).copied().unwrap_or(0) {
                    behind.push((tp, end));
                }
            }
        }
        let deadline = tokio::time::Instant::now() + BARRIER_WAIT;
        while !behind.is_empty() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    partitions = behind.len(),
                    "table still behind its end; deciding anyway"
                );
                break;
            }
            if let Polled::Records(records) = self.consumer.poll(left).await? {
                self.track(&records);
                apply(&records);
                let read = &self.read;
                behind.retain(|(tp, end)| read.get(tp).is_none_or(|position| position < end));
            }
        }
        Ok(())
    }
}
