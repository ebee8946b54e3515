//! The conformance suite every bus implementation passes: one set of checks,
//! instantiated per backend by [`crate::bus_conformance_suite`].
//!
//! Crash checks run the `switchboard bus produce|consume` commands as child
//! processes and kill them with SIGKILL, so they need the binary; the macro is
//! therefore used from the workspace's integration tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Bus, Consumer, ConsumerConfig, Polled, Record, TopicConfig, TopicPartition};

/// How a backend is set up for the suite.
#[async_trait]
pub trait Fixture: Send + Sync {
    /// A handle on the log. For the embedded log it is the one instance this
    /// process may hold; [`Fixture::release`] closes it.
    async fn open(&self) -> Arc<dyn Bus>;

    /// Drops this process's handle so that a child process can open the log.
    async fn release(&self) {}

    /// The `switchboard` binary, configured (by environment) for this log.
    fn command(&self) -> tokio::process::Command;

    /// A compacted topic that the backend compacts quickly.
    fn compacted_topic(&self, name: &str, partitions: i32) -> TopicConfig;

    /// Makes compaction run now where the backend allows it.
    async fn compact(&self, bus: &dyn Bus);

    /// Kills the broker with SIGKILL and starts it again. Returns `false` when
    /// the broker is this process (the embedded log), where the producer-crash
    /// check covers it.
    async fn crash_broker(&self) -> bool;
}

/// A name unique to this run, for topics and groups.
pub fn unique(base: &str) -> String {
    format!("conformance-{base}-{}", uuid::Uuid::now_v7().simple())
}

const STEP: Duration = Duration::from_millis(200);

/// Polls `consumer` until `done` says so or `limit` passes; returns the
/// records seen. Rebalance events are skipped.
pub async fn drain(
    consumer: &mut dyn Consumer,
    limit: Duration,
    mut done: impl FnMut(&[Record]) -> bool,
) -> Vec<Record> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = Vec::new();
    while tokio::time::Instant::now() < deadline && !done(&seen) {
        match consumer.poll(STEP).await.expect("poll") {
            Polled::Records(records) => seen.extend(records),
            Polled::Assigned(_) | Polled::Revoked(_) | Polled::Idle => {}
        }
    }
    seen
}

/// Reads `topic` from the beginning with a fresh group until `count` records
/// arrived or nothing came for a while.
pub async fn read_all(bus: &dyn Bus, topic: &str, count: usize) -> Vec<Record> {
    let mut consumer = bus
        .consumer(ConsumerConfig::new(unique("reader"), &[topic]))
        .await
        .expect("consumer");
    let mut seen: Vec<Record> = Vec::new();
    let mut idle = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while seen.len() < count && idle < 40 && tokio::time::Instant::now() < deadline {
        match consumer.poll(STEP).await.expect("poll") {
            Polled::Records(records) => {
                idle = 0;
                seen.extend(records);
            }
            // Kafka needs a while to join the group; count idle polls only
            // once something is assigned.
            Polled::Idle if !consumer.assignment().is_empty() => idle += 1,
            _ => {}
        }
    }
    consumer.close().await.expect("close");
    seen
}

fn value_str(r: &Record) -> String {
    String::from_utf8(r.value.as_deref().unwrap_or_default().to_vec()).expect("utf8 value")
}

/// A new topic of `partitions` partitions holding records `0..n` (value =
/// the number as text, key `k<number>`).
async fn numbered_topic(bus: &dyn Bus, base: &str, partitions: i32, n: usize) -> String {
    let topic = unique(base);
    bus.create_topics(&[TopicConfig::log(&topic, partitions)])
        .await
        .unwrap();
    for i in 0..n {
        bus.produce(
            &topic,
            format!("k{i}").as_bytes(),
            Some(i.to_string().as_bytes()),
        )
        .await
        .unwrap();
    }
    topic
}

/// Records with the same key are read in the order they were produced, from
/// one partition.
pub async fn per_key_order(f: &dyn Fixture) {
    let bus = f.open().await;
    let topic = unique("order");
    bus.create_topics(&[TopicConfig::log(&topic, 6)])
        .await
        .unwrap();
    let keys = 12;
    let per_key = 60;
    let mut tasks = Vec::new();
    for k in 0..keys {
        let bus = bus.clone();
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("user{k}@example.com");
            let mut last = None;
            for seq in 0..per_key {
                let d = bus
                    .produce(
                        &topic,
                        key.as_bytes(),
                        Some(format!("{k}:{seq}").as_bytes()),
                    )
                    .await
                    .unwrap();
                assert_eq!(
                    d.partition,
                    super::partition_for_key(key.as_bytes(), 6),
                    "the Java clients' partitioner"
                );
                if let Some((partition, offset)) = last {
                    assert_eq!(partition, d.partition, "one key, one partition");
                    assert!(d.offset > offset, "offsets grow");
                }
                last = Some((d.partition, d.offset));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let ends = bus.end_offsets(&topic).await.unwrap();
    assert_eq!(ends.len(), 6);
    assert_eq!(ends.iter().sum::<i64>(), (keys * per_key) as i64);
    let records = read_all(&*bus, &topic, keys * per_key).await;
    assert_eq!(records.len(), keys * per_key);
    for r in &records {
        assert!(r.offset < ends[r.partition as usize]);
    }
    let mut by_key: HashMap<Vec<u8>, Vec<(i32, i64, usize)>> = HashMap::new();
    for r in &records {
        let v = value_str(r);
        let seq: usize = v.split(':').nth(1).unwrap().parse().unwrap();
        by_key
            .entry(r.key.to_vec())
            .or_default()
            .push((r.partition, r.offset, seq));
    }
    assert_eq!(by_key.len(), keys);
    for (key, seen) in by_key {
        let seqs: Vec<usize> = seen.iter().map(|s| s.2).collect();
        assert_eq!(
            seqs,
            (0..per_key).collect::<Vec<_>>(),
            "order of {:?}",
            String::from_utf8_lossy(&key)
        );
        assert!(seen.iter().all(|s| s.0 == seen[0].0));
    }
}

/// A consumer that seeks to 0 sees every record again.
pub async fn replay_from_zero(f: &dyn Fixture) {
    let bus = f.open().await;
    let n = 300;
    let topic = numbered_topic(&*bus, "replay", 3, n).await;
    let group = unique("replay-group");
    let mut c = bus
        .consumer(ConsumerConfig::new(&group, &[&topic]))
        .await
        .unwrap();
    let first = drain(&mut *c, Duration::from_secs(60), |s| s.len() >= n).await;
    assert_eq!(first.len(), n);
    c.commit(&super::positions_after(&first)).await.unwrap();
    // Everything is committed: nothing more arrives.
    let none = drain(&mut *c, Duration::from_secs(1), |s| !s.is_empty()).await;
    assert!(none.is_empty());
    for tp in c.assignment() {
        c.seek(&tp, 0).await.unwrap();
    }
    let again = drain(&mut *c, Duration::from_secs(60), |s| s.len() >= n).await;
    let values: BTreeSet<String> = again.iter().map(value_str).collect();
    assert_eq!(values, (0..n).map(|i| i.to_string()).collect());
    c.close().await.unwrap();
}

/// Records after the committed position go to the next member of the group;
/// committed ones do not.
pub async fn uncommitted_redelivered(f: &dyn Fixture) {
    let bus = f.open().await;
    let n = 400;
    let topic = numbered_topic(&*bus, "redeliver", 4, n).await;
    let group = unique("redeliver-group");
    let mut c1 = bus
        .consumer(ConsumerConfig::new(&group, &[&topic]))
        .await
        .unwrap();
    let seen = drain(&mut *c1, Duration::from_secs(60), |s| s.len() >= n).await;
    assert_eq!(seen.len(), n);
    // Commit the first half of each partition.
    let mut per_partition: BTreeMap<i32, Vec<&Record>> = BTreeMap::new();
    for r in &seen {
        per_partition.entry(r.partition).or_default().push(r);
    }
    let mut committed = BTreeSet::new();
    let mut positions = Vec::new();
    for records in per_partition.values() {
        let half = &records[..records.len() / 2];
        if let Some(last) = half.last() {
            positions.push((last.topic_partition(), last.offset + 1));
        }
        committed.extend(half.iter().map(|r| value_str(r)));
    }
    c1.commit(&positions).await.unwrap();
    c1.close().await.unwrap();

    let mut c2 = bus
        .consumer(ConsumerConfig::new(&group, &[&topic]))
        .await
        .unwrap();
    // The committed positions read back, and nothing for a partition
    // that never had a commit.
    let tps: Vec<_> = positions.iter().map(|(tp, _)| tp.clone()).collect();
    let read_back = c2.committed(&tps).await.unwrap();
    let wanted: Vec<Option<i64>> = positions.iter().map(|(_, o)| Some(*o)).collect();
    assert_eq!(read_back, wanted);
    let never = c2
        .committed(&[TopicPartition::new(&unique("uncommitted"), 0)])
        .await
        .unwrap();
    assert_eq!(never, vec![None]);
    let expected = n - committed.len();
    let again = drain(&mut *c2, Duration::from_secs(60), |s| s.len() >= expected).await;
    let again_values: BTreeSet<String> = again.iter().map(value_str).collect();
    let all: BTreeSet<String> = (0..n).map(|i| i.to_string()).collect();
    let uncommitted: BTreeSet<String> = all.difference(&committed).cloned().collect();
    assert_eq!(again_values, uncommitted);
    c2.close().await.unwrap();
}

/// A poll dropped before it completes (e.g. the losing branch of a
/// `select!`) loses nothing: every record still arrives, once.
pub async fn poll_is_cancel_safe(f: &dyn Fixture) {
    let bus = f.open().await;
    let n = 500;
    let topic = numbered_topic(&*bus, "cancel", 4, n).await;
    let mut c = bus
        .consumer(ConsumerConfig::new(unique("cancel-group"), &[&topic]))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut timeout = Duration::from_micros(20);
    while seen.len() < n && tokio::time::Instant::now() < deadline {
        // Most polls are cut short; some complete.
        if let Ok(polled) = tokio::time::timeout(timeout, c.poll(STEP)).await
            && let Polled::Records(records) = polled.unwrap()
        {
            seen.extend(records.iter().map(value_str));
        }
        timeout = if timeout > Duration::from_millis(5) {
            Duration::from_micros(20)
        } else {
            timeout * 2
        };
    }
    let distinct: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), n, "records lost to cancelled polls");
    assert_eq!(seen.len(), n, "records repeated by cancelled polls");
    c.close().await.unwrap();
}

/// Both members polled until they hold disjoint, non-empty shares that
/// together make `all`.
async fn split(a: &mut dyn Consumer, b: &mut dyn Consumer, all: &BTreeSet<TopicPartition>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let _ = a.poll(STEP).await.unwrap();
        let _ = b.poll(STEP).await.unwrap();
        let sa: BTreeSet<_> = a.assignment().into_iter().collect();
        let sb: BTreeSet<_> = b.assignment().into_iter().collect();
        if !sa.is_empty() && !sb.is_empty() && sa.is_disjoint(&sb) {
            let union: BTreeSet<_> = sa.union(&sb).cloned().collect();
            if union == *all {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "members never split the partitions: {sa:?} {sb:?}"
        );
    }
}

/// A topic of `partitions` and a fresh group on it: (topic, group).
async fn group_topic(bus: &dyn Bus, name: &str, partitions: i32) -> (String, String) {
    let topic = unique(name);
    bus.create_topics(&[TopicConfig::log(&topic, partitions)])
        .await
        .unwrap();
    (topic, unique(&format!("{name}-group")))
}

/// Two members split the partitions; when one leaves, the other takes all.
pub async fn group_split_and_takeover(f: &dyn Fixture) {
    let bus = f.open().await;
    let partitions = 4;
    let (topic, group) = group_topic(bus.as_ref(), "split", partitions).await;
    let mut a = bus
        .consumer(ConsumerConfig::new(&group, &[&topic]))
        .await
        .unwrap();
    let mut b = bus
        .consumer(ConsumerConfig::new(&group, &[&topic]))
        .await
        .unwrap();
    let all: BTreeSet<TopicPartition> = (0..partitions)
        .map(|p| TopicPartition::new(&topic, p))
        .collect();
    split(a.as_mut(), b.as_mut(), &all).await;
    b.close().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let _ = a.poll(STEP).await.unwrap();
        let sa: BTreeSet<_> = a.assignment().into_iter().collect();
        if sa == all {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "survivor never took over: {sa:?}"
        );
    }
    // The survivor now receives records of every partition.
    for i in 0..40 {
        bus.produce(&topic, format!("key{i}").as_bytes(), Some(b"x"))
            .await
            .unwrap();
    }
    let seen = drain(&mut *a, Duration::from_secs(60), |s| s.len() >= 40).await;
    let parts: BTreeSet<i32> = seen.iter().map(|r| r.partition).collect();
    assert_eq!(parts.len(), partitions as usize);
    a.close().await.unwrap();
}

/// A compacted topic ends up with the latest value per key.
pub async fn compaction_keeps_latest(f: &dyn Fixture) {
    let bus = f.open().await;
    let topic = unique("compact");
    bus.create_topics(&[f.compacted_topic(&topic, 1)])
        .await
        .unwrap();
    let keys = 10;
    let versions = 5;
    for v in 0..versions {
        for k in 0..keys {
            bus.produce(
                &topic,
                format!("key{k}").as_bytes(),
                Some(format!("v{v}").as_bytes()),
            )
            .await
            .unwrap();
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        // A later record closes the segment holding the versions (Kafka
        // compacts only closed segments).
        tokio::time::sleep(Duration::from_millis(300)).await;
        bus.produce(&topic, b"roll", Some(b"r")).await.unwrap();
        f.compact(&*bus).await;
        let records = read_all(&*bus, &topic, usize::MAX).await;
        let mut latest: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in &records {
            latest
                .entry(String::from_utf8_lossy(&r.key).into_owned())
                .or_default()
                .push(value_str(r));
        }
        let compacted = (0..keys).all(|k| {
            latest.get(&format!("key{k}")).map(Vec::as_slice)
                == Some(&[format!("v{}", versions - 1)][..])
        });
        if compacted {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not compacted: {latest:?}"
        );
    }
}

/// Runs `cmd` until its stdout lines satisfy `enough`, kills it with SIGKILL,
/// and returns every line it wrote, including those still in the pipe (a
/// child keeps working between the check and the kill).
async fn run_child_then_kill9(
    mut cmd: tokio::process::Command,
    mut enough: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn switchboard");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !enough(&out) {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => out.push(line),
            Ok(Ok(None)) => break,
            Ok(Err(e)) => panic!("reading child output: {e}"),
            Err(_) => panic!("child produced too little output: {} lines", out.len()),
        }
    }
    // `start_kill` sends SIGKILL on Unix.
    child.start_kill().expect("kill -9");
    let _ = child.wait().await;
    while let Ok(Some(line)) = lines.next_line().await {
        out.push(line);
    }
    out
}

/// A producer killed with SIGKILL mid-stream loses nothing it had been told
/// was stored.
pub async fn producer_kill9_loses_no_ack(f: &dyn Fixture) {
    let bus = f.open().await;
    let topic = unique("producer-crash");
    bus.create_topics(&[TopicConfig::log(&topic, 4)])
        .await
        .unwrap();
    drop(bus);
    f.release().await;
    let mut cmd = f.command();
    cmd.args(["bus", "produce", "--topic", &topic, "--count", "1000000"]);
    let lines = run_child_then_kill9(cmd, |l| {
        l.iter().filter(|l| l.starts_with("ack ")).count() >= 3000
    })
    .await;
    let acked: BTreeSet<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("ack "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    assert!(acked.len() >= 3000);
    let bus = f.open().await;
    let stored: BTreeSet<String> = read_all(&*bus, &topic, usize::MAX)
        .await
        .iter()
        .map(value_str)
        .collect();
    let lost: Vec<&String> = acked.difference(&stored).take(10).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged records lost, e.g. {lost:?}",
        acked.difference(&stored).count()
    );
}

/// A consumer killed with SIGKILL: the group's next member gets everything
/// after the last commit, so nothing is lost, and nothing before it.
pub async fn consumer_kill9_redelivers(f: &dyn Fixture) {
    let bus = f.open().await;
    let n = 3000;
    let topic = numbered_topic(&*bus, "consumer-crash", 3, n).await;
    drop(bus);
    f.release().await;
    let group = unique("consumer-crash-group");
    let mut cmd = f.command();
    cmd.args([
        "bus",
        "consume",
        "--topic",
        &topic,
        "--group",
        &group,
        "--commit-every",
        "100",
    ]);
    let lines = run_child_then_kill9(cmd, |l| {
        l.iter().filter(|l| l.starts_with("committed ")).count() >= 5
    })
    .await;
    let mut child_seen = BTreeSet::new();
    let mut committed: BTreeMap<i32, i64> = BTreeMap::new();
    for line in &lines {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts[0] {
            "rec" => {
                child_seen.insert(parts[3].to_owned());
            }
            "committed" => {
                committed.insert(parts[1].parse().unwrap(), parts[2].parse().unwrap());
            }
            _ => {}
        }
    }
    assert!(!committed.is_empty());
    let bus = f.open().await;
    let mut c = bus
        .consumer(ConsumerConfig::new(&group, &[&topic]))
        .await
        .unwrap();
    let mut first_offset: BTreeMap<i32, i64> = BTreeMap::new();
    let mut all: BTreeSet<String> = child_seen.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while all.len() < n && tokio::time::Instant::now() < deadline {
        if let Polled::Records(records) = c.poll(STEP).await.unwrap() {
            for r in records {
                first_offset.entry(r.partition).or_insert(r.offset);
                all.insert(value_str(&r));
            }
        }
    }
    assert_eq!(all.len(), n, "records lost after a consumer crash");
    for (partition, position) in &committed {
        if let Some(first) = first_offset.get(partition) {
            assert!(
                first >= position,
                "partition {partition}: committed {position} but redelivered from {first}"
            );
        }
    }
    c.close().await.unwrap();
}

/// The broker is killed with SIGKILL while a producer runs; every record
/// acknowledged before or after is there when it is back.
pub async fn broker_kill9_loses_no_ack(f: &dyn Fixture) {
    let bus = f.open().await;
    let topic = unique("broker-crash");
    bus.create_topics(&[TopicConfig::log(&topic, 4)])
        .await
        .unwrap();
    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let producer = {
        let bus = bus.clone();
        let topic = topic.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            let mut failures = 0usize;
            for i in 0..6000 {
                match bus
                    .produce(
                        &topic,
                        format!("k{i}").as_bytes(),
                        Some(i.to_string().as_bytes()),
                    )
                    .await
                {
                    Ok(_) => {
                        acked.lock().unwrap().insert(i.to_string());
                    }
                    Err(_) => failures += 1,
                }
                if i % 1000 == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            failures
        })
    };
    while acked.lock().unwrap().len() < 1000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !f.crash_broker().await {
        producer.await.unwrap();
        return;
    }
    let failures = producer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 1000,
        "producer made no progress after the crash"
    );
    let stored: BTreeSet<String> = read_all(&*bus, &topic, acked.len())
        .await
        .iter()
        .map(value_str)
        .collect();
    let lost = acked.difference(&stored).count();
    assert_eq!(
        lost, 0,
        "{lost} acknowledged records lost ({failures} produces failed)"
    );
}

/// A partition moves to a member that joins only after its holder lets go
/// (Kafka's eager rebalance; the embedded log's holds): while the holder
/// does not poll, the newcomer is assigned nothing, so it cannot start on a
/// partition whose previous owner is still finishing what it polled. Once
/// the holder polls, they split the partitions.
pub async fn partitions_move_after_the_holder_lets_go(f: &dyn Fixture) {
    let bus = f.open().await;
    let partitions = 2;
    let (topic, group) = group_topic(bus.as_ref(), "handover", partitions).await;
    let mut a = bus
        .consumer(ConsumerConfig::new(&group, &[&topic]))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while a.assignment().len() < partitions as usize {
        let _ = a.poll(STEP).await.unwrap();
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first member never got every partition"
        );
    }
    let mut b = bus
        .consumer(ConsumerConfig::new(&group, &[&topic]))
        .await
        .unwrap();
    for _ in 0..5 {
        let _ = b.poll(STEP).await.unwrap();
        assert!(
            b.assignment().is_empty(),
            "the newcomer got {:?} while the holder had not polled",
            b.assignment()
        );
    }
    let all: BTreeSet<TopicPartition> = (0..partitions)
        .map(|p| TopicPartition::new(&topic, p))
        .collect();
    split(a.as_mut(), b.as_mut(), &all).await;
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// Instantiates the suite for one backend: `bus_conformance_suite!(name, async
/// fn returning a Fixture)` makes a test module `name` with one
/// `#[tokio::test]` per check. [`broker_kill9_loses_no_ack`] is left out: it
/// restarts a shared broker, so it runs in a test binary of its own.
#[macro_export]
macro_rules! bus_conformance_suite {
    ($name:ident, $fixture:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::bus_conformance_suite!(@tests $fixture;
                per_key_order,
                replay_from_zero,
                uncommitted_redelivered,
                poll_is_cancel_safe,
                group_split_and_takeover,
                partitions_move_after_the_holder_lets_go,
                compaction_keeps_latest,
                producer_kill9_loses_no_ack,
                consumer_kill9_redelivers,
            );
        }
    };
    (@tests $fixture:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let fixture = $fixture.await;
                tokio::time::timeout(
                    std::time::Duration::from_secs(240),
                    $crate::bus::conformance::$check(&fixture),
                )
                .await
                .expect(concat!(stringify!($check), " timed out"));
            }
        )*
    };
}
