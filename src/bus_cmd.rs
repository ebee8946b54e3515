//! `switchboard bus ...`: operator diagnostics on the bus, also used by the
//! crash tests of the conformance suite (which kill these processes).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use futures::StreamExt;
use switchboard_infra::bus::{self, ConsumerConfig, Polled, StartFrom, TopicConfig};
use switchboard_infra::config::Config;

#[derive(Debug, Subcommand)]
pub enum BusCommand {
    /// Create the catalogue's topics (if missing) and list them.
    Topics,
    /// Produce `count` records (value = sequence number) and print
    /// `ack <seq> <partition> <offset>` for each durable acknowledgement.
    Produce {
        /// Full topic name.
        #[arg(long)]
        topic: String,
        /// How many records.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Produces in flight at once.
        #[arg(long, default_value_t = 64)]
        in_flight: usize,
    },
    /// Consume as a member of `group`, printing `rec <partition> <offset>
    /// <value>` per record and `committed <partition> <offset>` per commit.
    Consume {
        /// Full topic name.
        #[arg(long)]
        topic: String,
        /// Consumer group.
        #[arg(long)]
        group: String,
        /// Commit after this many records.
        #[arg(long, default_value_t = 100)]
        commit_every: usize,
        /// Stop after this many records (0: never).
        #[arg(long, default_value_t = 0)]
        max: usize,
        /// Start at the end instead of the beginning when the group has no
        /// committed position.
        #[arg(long)]
        latest: bool,
    },
}

pub async fn run(config: &Config, cmd: BusCommand) -> anyhow::Result<()> {
    let bus = bus::open(config)
        .await
        .with_context(|| format!("opening the {:?} bus", config.bus.backend))?;
    let mut out = std::io::stdout().lock();
    match cmd {
        BusCommand::Topics => {
            let topics = TopicConfig::catalogue(&config.bus.topic_prefix);
            bus.create_topics(&topics).await?;
            for t in topics {
                writeln!(out, "{}\t{}\t{:?}", t.name, t.partitions, t.cleanup)?;
            }
        }
        BusCommand::Produce {
            topic,
            count,
            in_flight,
        } => {
            let mut acks = futures::stream::iter(0..count)
                .map(|seq| {
                    let bus = bus.clone();
                    let topic = topic.clone();
                    async move {
                        let value = seq.to_string();
                        let key = format!("key{}", seq % 64);
                        let d = bus
                            .produce(&topic, key.as_bytes(), Some(value.as_bytes()))
                            .await;
                        (seq, d)
                    }
                })
                .buffer_unordered(in_flight.max(1));
            while let Some((seq, d)) = acks.next().await {
                let d = d.with_context(|| format!("producing record {seq}"))?;
                writeln!(out, "ack {seq} {} {}", d.partition, d.offset)?;
            }
        }
        BusCommand::Consume {
            topic,
            group,
            commit_every,
            max,
            latest,
        } => {
            let mut consumer_config = ConsumerConfig::new(group, &[&topic]);
            if latest {
                consumer_config.start = StartFrom::Latest;
            }
            let mut consumer = bus.consumer(consumer_config).await?;
            let mut uncommitted = Vec::new();
            let mut total = 0usize;
            loop {
                match consumer.poll(Duration::from_millis(500)).await? {
                    Polled::Records(records) => {
                        for r in records {
                            let value = String::from_utf8_lossy(r.value.as_deref().unwrap_or(b""))
                                .into_owned();
                            writeln!(out, "rec {} {} {value}", r.partition, r.offset)?;
                            uncommitted.push(r);
                            total += 1;
                            if uncommitted.len() >= commit_every.max(1) {
                                commit(&mut *consumer, &mut uncommitted, &mut out).await?;
                            }
                            if max > 0 && total >= max {
                                commit(&mut *consumer, &mut uncommitted, &mut out).await?;
                                consumer.close().await?;
                                return Ok(());
                            }
                        }
                    }
                    Polled::Revoked(_) => uncommitted.clear(),
                    Polled::Assigned(_) | Polled::Idle => {}
                }
            }
        }
    }
    Ok(())
}

async fn commit(
    consumer: &mut dyn bus::Consumer,
    uncommitted: &mut Vec<bus::Record>,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let positions = bus::positions_after(uncommitted);
    consumer.commit(&positions).await?;
    let by_partition: BTreeMap<i32, i64> =
        positions.iter().map(|(tp, o)| (tp.partition, *o)).collect();
    for (partition, offset) in by_partition {
        writeln!(out, "committed {partition} {offset}")?;
    }
    uncommitted.clear();
    Ok(())
}
