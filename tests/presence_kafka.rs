//! The presence composer on real Kafka: a restart rebuilds from the log and
//! publishes nothing twice, also when the group's positions go back (a
//! crash before the commit). Needs the broker of `infra/scripts/kafka.sh
//! start` (or `SWITCHBOARD_TEST_KAFKA`).

mod support;

use std::sync::Arc;
use std::time::Duration;

use switchboard_infra::bus::conformance::Fixture;
use switchboard_infra::bus::{Bus, ConsumerConfig, Polled, TopicConfig, TopicPartition};
use switchboard_processors::presence::{self, PresenceConfig};
use switchboard_processors::settings::{self, LiveSettings};
use switchboard_schemas::events::{
    Availability, ComposedPresence, DevicePresence, ManualState, ManualStatusSet, Protocol,
};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{BareJid, Envelope, Event, NodeId};
use tokio::sync::watch;
use uuid::Uuid;

use support::KafkaFixture;

const ALICE: &str = "alice@example.com";

struct Harness {
    bus: Arc<dyn Bus>,
    prefix: String,
}

impl Harness {
    async fn new() -> Self {
        let fixture = KafkaFixture::new().await;
        let bus = fixture.open().await;
        let prefix = format!("presence-{}", Uuid::now_v7().simple());
        bus.create_topics(&TopicConfig::catalogue(&prefix))
            .await
            .expect("topics");
        Self { bus, prefix }
    }

    fn start(
        &self,
    ) -> (
        watch::Sender<bool>,
        tokio::task::JoinHandle<Result<(), switchboard_infra::bus::BusError>>,
    ) {
        let (tx, rx) = watch::channel(false);
        let settings = settings::fixed(LiveSettings {
            presence_throttle_ms: 0,
            ..LiveSettings::default()
        });
        let mut config = PresenceConfig::new(self.prefix.clone(), NodeId::new("node1"));
        config.max_batch = 1;
        let task = tokio::spawn(presence::run(self.bus.clone(), config, settings, rx));
        (tx, task)
    }

    async fn produce(&self, event: impl Into<Event>) {
        let envelope = Envelope::new(NodeId::new("gw1"), ALICE, event);
        let topic = full_name(&self.prefix, envelope.topic().expect("catalogued"));
        self.bus
            .produce(
                &topic,
                ALICE.as_bytes(),
                Some(&envelope.to_json_vec().expect("encode")),
            )
            .await
            .expect("produce");
    }

    async fn composed(&self) -> Vec<ComposedPresence> {
        let topic = full_name(&self.prefix, Topic::PresenceState);
        let ends = self.bus.end_offsets(&topic).await.expect("ends");
        let mut out = Vec::new();
        if ends.iter().all(|e| *e == 0) {
            return out;
        }
        let mut positions = vec![0i64; ends.len()];
        let mut consumer = self
            .bus
            .consumer(ConsumerConfig::new(
                format!("test-read-{}", Uuid::now_v7().simple()),
                &[&topic],
            ))
            .await
            .expect("consumer");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while positions.iter().zip(&ends).any(|(p, e)| p < e) {
            assert!(tokio::time::Instant::now() < deadline, "reading {topic}");
            if let Polled::Records(records) = consumer
                .poll(Duration::from_millis(200))
                .await
                .expect("poll")
            {
                for r in records {
                    positions[r.partition as usize] = r.offset + 1;
                    let e = Envelope::from_json_slice(r.value.as_deref().expect("value"))
                        .expect("decode");
                    if let Event::ComposedPresence(c) = e.event {
                        out.push(c);
                    }
                }
            }
        }
        let _ = consumer.close().await;
        out
    }

    async fn wait_composed(&self, n: usize) -> Vec<ComposedPresence> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let all = self.composed().await;
            if all.len() >= n {
                assert_eq!(all.len(), n, "{all:#?}");
                return all;
            }
            assert!(tokio::time::Instant::now() < deadline, "{all:#?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn device(status: &str) -> DevicePresence {
    DevicePresence {
        user: BareJid::new(ALICE),
        device: format!("{ALICE}/laptop"),
        protocol: Protocol::Xmpp,
        available: true,
        show: None,
        status: Some(status.to_owned()),
        priority: 0,
    }
}

fn manual(state: ManualState) -> ManualStatusSet {
    ManualStatusSet {
        user: BareJid::new(ALICE),
        state,
        text: None,
        expires_at: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_and_redelivery_publish_nothing_twice_on_kafka() {
    let h = Harness::new().await;
    let (stop, task) = h.start();
    h.produce(device("working")).await;
    h.wait_composed(1).await;
    h.produce(manual(ManualState::Away)).await;
    let out = h.wait_composed(2).await;
    assert_eq!(out[1].availability, Availability::Away);
    // Replayed one record at a time, the inputs would pass through Away
    // again on their way here.
    h.produce(manual(ManualState::Available)).await;
    let out = h.wait_composed(3).await;
    assert_eq!(out[2].availability, Availability::Available);
    let _ = stop.send(true);
    task.await.expect("join").expect("composer");

    // Rewind the group to the start: every input is delivered again.
    let presence = full_name(&h.prefix, Topic::Presence);
    let mut member = h
        .bus
        .consumer(ConsumerConfig::new(
            format!("{}.presence", h.prefix),
            &[&presence],
        ))
        .await
        .expect("member");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "no assignment");
        if let Polled::Assigned(tps) = member.poll(Duration::from_millis(500)).await.expect("poll")
        {
            let rewind: Vec<(TopicPartition, i64)> = tps.into_iter().map(|tp| (tp, 0)).collect();
            member.commit(&rewind).await.expect("rewind");
            break;
        }
    }
    member.close().await.expect("close");
    // The rewind took: a member now gets the first input again.
    let mut member = h
        .bus
        .consumer(ConsumerConfig::new(
            format!("{}.presence", h.prefix),
            &[&presence],
        ))
        .await
        .expect("member");
    let first = loop {
        assert!(tokio::time::Instant::now() < deadline, "no redelivery");
        if let Polled::Records(records) =
            member.poll(Duration::from_millis(500)).await.expect("poll")
        {
            break records[0].offset;
        }
    };
    assert_eq!(first, 0);
    member.close().await.expect("close");

    let (stop, task) = h.start();
    // Live again: a new change is published once, and nothing before it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    h.produce(manual(ManualState::Dnd)).await;
    let out = h.wait_composed(4).await;
    assert_eq!(out[3].availability, Availability::Dnd);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h.composed().await.len(), 4);
    let _ = stop.send(true);
    task.await.expect("join").expect("composer");
}
