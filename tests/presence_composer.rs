//! The presence composer on the embedded bus: inputs in, composed presence
//! out only on change, manual status cleared at sign-out, the same output
//! after a restart (rebuilt from the log), nothing published twice after a
//! redelivery, and the throttle coalescing a burst.

mod support;

use std::sync::Arc;
use std::time::Duration;

use switchboard_infra::bus::conformance::Fixture;
use switchboard_infra::bus::{Bus, ConsumerConfig, Polled, TopicConfig, TopicPartition};
use switchboard_processors::presence::{self, PresenceConfig};
use switchboard_processors::settings::{self, LiveSettings};
use switchboard_schemas::events::{
    Availability, ClientInfo, ComposedPresence, DevicePresence, ManualState,
    ManualStatusClearReason, ManualStatusSet, Protocol, SessionEndReason, SessionEnded,
    SessionResourceBound, Show,
};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{BareJid, Envelope, Event, FullJid, NodeId};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use support::EmbeddedFixture;

const PREFIX: &str = "switchboard";
const ALICE: &str = "alice@example.com";

struct Running {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), switchboard_infra::bus::BusError>>,
}

impl Running {
    async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.task
            .await
            .expect("join")
            .expect("composer ran cleanly");
    }
}

fn start(bus: &Arc<dyn Bus>, throttle_ms: u64) -> Running {
    start_with(
        bus,
        throttle_ms,
        PresenceConfig::new(PREFIX, NodeId::new("node1")),
    )
}

fn start_with(bus: &Arc<dyn Bus>, throttle_ms: u64, config: PresenceConfig) -> Running {
    let (shutdown, rx) = watch::channel(false);
    let settings = settings::fixed(LiveSettings {
        presence_throttle_ms: throttle_ms,
        ..LiveSettings::default()
    });
    let task = tokio::spawn(presence::run(bus.clone(), config, settings, rx));
    Running { shutdown, task }
}

async fn open() -> (EmbeddedFixture, Arc<dyn Bus>) {
    let fixture = EmbeddedFixture::new().await;
    let bus = fixture.open().await;
    bus.create_topics(&TopicConfig::catalogue(PREFIX))
        .await
        .expect("topics");
    (fixture, bus)
}

async fn produce(bus: &Arc<dyn Bus>, topic: Topic, user: &str, event: impl Into<Event>) {
    let envelope = Envelope::new(NodeId::new("gw1"), user, event);
    bus.produce(
        &full_name(PREFIX, topic),
        user.as_bytes(),
        Some(&envelope.to_json_vec().expect("encode")),
    )
    .await
    .expect("produce");
}

fn full(resource: &str) -> FullJid {
    FullJid::new(format!("{ALICE}/{resource}"))
}

async fn bind(bus: &Arc<dyn Bus>, resource: &str, session: Uuid) {
    let bound = SessionResourceBound {
        session_id: session,
        full_jid: full(resource),
        protocol: Protocol::Xmpp,
        contact: None,
        priority: 0,
        client: ClientInfo::default(),
    };
    produce(bus, Topic::Sessions, ALICE, bound).await;
}

async fn end(bus: &Arc<dyn Bus>, resource: &str, session: Uuid) {
    let ended = SessionEnded {
        session_id: session,
        user: BareJid::new(ALICE),
        full_jid: Some(full(resource)),
        protocol: Protocol::Xmpp,
        reason: SessionEndReason::Logout,
        text: None,
    };
    produce(bus, Topic::Sessions, ALICE, ended).await;
}

async fn device(bus: &Arc<dyn Bus>, resource: &str, show: Option<Show>, status: &str) {
    let presence = DevicePresence {
        user: BareJid::new(ALICE),
        device: full(resource).as_str().to_owned(),
        protocol: Protocol::Xmpp,
        available: true,
        show,
        status: Some(status.to_owned()),
        priority: 5,
    };
    produce(bus, Topic::Presence, ALICE, presence).await;
}

async fn manual(bus: &Arc<dyn Bus>, state: ManualState) {
    let set = ManualStatusSet {
        user: BareJid::new(ALICE),
        state,
        text: Some("by hand".to_owned()),
        expires_at: None,
    };
    produce(bus, Topic::Presence, ALICE, set).await;
}

/// Every event on `topic` now, in offset order per partition.
async fn read_all(bus: &Arc<dyn Bus>, topic: Topic) -> Vec<Envelope> {
    let topic = full_name(PREFIX, topic);
    let ends = bus.end_offsets(&topic).await.expect("ends");
    let mut positions = vec![0i64; ends.len()];
    let mut out = Vec::new();
    if ends.iter().all(|e| *e == 0) {
        return out;
    }
    let mut consumer = bus
        .consumer(ConsumerConfig::new(
            format!("test-read-{}", Uuid::now_v7().simple()),
            &[&topic],
        ))
        .await
        .expect("consumer");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while positions.iter().zip(&ends).any(|(p, e)| p < e) {
        assert!(tokio::time::Instant::now() < deadline, "reading {topic}");
        if let Polled::Records(records) = consumer
            .poll(Duration::from_millis(100))
            .await
            .expect("poll")
        {
            for r in records {
                positions[r.partition as usize] = r.offset + 1;
                out.push(
                    Envelope::from_json_slice(r.value.as_deref().expect("value")).expect("decode"),
                );
            }
        }
    }
    let _ = consumer.close().await;
    out
}

fn composed(envelopes: &[Envelope]) -> Vec<ComposedPresence> {
    envelopes
        .iter()
        .filter_map(|e| match &e.event {
            Event::ComposedPresence(c) => Some(c.clone()),
            _ => None,
        })
        .collect()
}

/// Waits until the composed events of Alice number `n`, and returns them.
async fn wait_composed(bus: &Arc<dyn Bus>, n: usize) -> Vec<ComposedPresence> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let all = composed(&read_all(bus, Topic::PresenceState).await);
        if all.len() >= n {
            assert_eq!(all.len(), n, "more composed events than expected: {all:#?}");
            return all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {n} composed events, have {all:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits long enough for a running composer to have published anything it
/// was going to, then checks the count did not move.
async fn assert_still(bus: &Arc<dyn Bus>, n: usize) {
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        composed(&read_all(bus, Topic::PresenceState).await).len(),
        n,
        "unexpected composed events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composes_publishes_changes_only_and_clears_manual_at_sign_out() {
    let (_fixture, bus) = open().await;
    let composer = start(&bus, 0);
    let session = Uuid::now_v7();
    bind(&bus, "laptop", session).await;
    device(&bus, "laptop", None, "working").await;
    let out = wait_composed(&bus, 1).await;
    assert_eq!(out[0].availability, Availability::Available);
    assert_eq!(out[0].status.as_deref(), Some("working"));

    // The same presence again changes nothing.
    device(&bus, "laptop", None, "working").await;
    manual(&bus, ManualState::Dnd).await;
    let out = wait_composed(&bus, 2).await;
    assert_eq!(out[1].availability, Availability::Dnd);
    assert_eq!(out[1].show, Some(Show::Dnd));
    assert_eq!(out[1].status.as_deref(), Some("by hand"));

    // The last device goes away: unavailable, and the manual status is
    // cleared with reason signed_out.
    end(&bus, "laptop", session).await;
    let out = wait_composed(&bus, 3).await;
    assert_eq!(out[2].availability, Availability::Unavailable);
    let cleared: Vec<_> = read_all(&bus, Topic::Presence)
        .await
        .into_iter()
        .filter_map(|e| match e.event {
            Event::ManualStatusCleared(c) => Some(c),
            _ => None,
        })
        .collect();
    assert_eq!(cleared.len(), 1);
    assert_eq!(cleared[0].reason, ManualStatusClearReason::SignedOut);
    assert_eq!(cleared[0].user.as_str(), ALICE);

    // Back online: the manual status is gone, devices decide again.
    bind(&bus, "laptop", Uuid::now_v7()).await;
    device(&bus, "laptop", Some(Show::Away), "lunch").await;
    let out = wait_composed(&bus, 4).await;
    assert_eq!(out[3].availability, Availability::Away);
    assert_still(&bus, 4).await;
    composer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_rebuilds_the_same_state_and_publishes_nothing_twice() {
    let (_fixture, bus) = open().await;
    let composer = start(&bus, 0);
    bind(&bus, "laptop", Uuid::now_v7()).await;
    device(&bus, "laptop", None, "working").await;
    wait_composed(&bus, 1).await;
    manual(&bus, ManualState::Away).await;
    let before = wait_composed(&bus, 2).await;
    composer.stop().await;

    // A restart rebuilds from the log: nothing new to say.
    let composer = start(&bus, 0);
    assert_still(&bus, 2).await;
    // The rebuilt state is the one before: a manual change on top of it
    // composes against the same device.
    manual(&bus, ManualState::Available).await;
    let out = wait_composed(&bus, 3).await;
    assert_eq!(out[..2], before[..]);
    assert_eq!(out[2].availability, Availability::Available);
    assert_eq!(out[2].status.as_deref(), Some("by hand"));
    composer.stop().await;

    // Redelivery: the group's positions go back to the start, as after a
    // crash before the commit. Every input comes again; nothing is
    // published twice.
    let presence = full_name(PREFIX, Topic::Presence);
    let mut member = bus
        .consumer(ConsumerConfig::new(
            format!("{PREFIX}.presence"),
            &[&presence],
        ))
        .await
        .expect("member");
    loop {
        if let Polled::Assigned(tps) = member.poll(Duration::from_millis(200)).await.expect("poll")
        {
            let rewind: Vec<(TopicPartition, i64)> = tps.into_iter().map(|tp| (tp, 0)).collect();
            member.commit(&rewind).await.expect("rewind");
            break;
        }
    }
    member.close().await.expect("close");
    // The rewind took: a member now gets the first input again.
    let mut member = bus
        .consumer(ConsumerConfig::new(
            format!("{PREFIX}.presence"),
            &[&presence],
        ))
        .await
        .expect("member");
    let first = loop {
        if let Polled::Records(records) =
            member.poll(Duration::from_millis(200)).await.expect("poll")
        {
            break records[0].offset;
        }
    };
    assert_eq!(first, 0);
    member.close().await.expect("close");
    // One record per poll, so every intermediate state would show.
    let composer = start_with(
        &bus,
        0,
        PresenceConfig {
            max_batch: 1,
            ..PresenceConfig::new(PREFIX, NodeId::new("node1"))
        },
    );
    assert_still(&bus, 3).await;
    // And it is live.
    manual(&bus, ManualState::Dnd).await;
    let out = wait_composed(&bus, 4).await;
    assert_eq!(out[3].availability, Availability::Dnd);
    composer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_coalesces_a_burst_into_its_newest_state() {
    let (_fixture, bus) = open().await;
    let composer = start(&bus, 800);
    bind(&bus, "laptop", Uuid::now_v7()).await;
    device(&bus, "laptop", None, "one").await;
    let out = wait_composed(&bus, 1).await;
    assert_eq!(out[0].status.as_deref(), Some("one"));
    for status in ["two", "three", "four", "five"] {
        device(&bus, "laptop", None, status).await;
    }
    let out = wait_composed(&bus, 2).await;
    assert_eq!(out[1].status.as_deref(), Some("five"));
    assert_still(&bus, 2).await;
    composer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_manual_status_is_cleared() {
    let (_fixture, bus) = open().await;
    let composer = start(&bus, 0);
    bind(&bus, "laptop", Uuid::now_v7()).await;
    device(&bus, "laptop", None, "working").await;
    wait_composed(&bus, 1).await;
    let expired: ManualStatusSet = serde_json::from_value(serde_json::json!({
        "user": ALICE,
        "state": "dnd",
        "text": "until 2001",
        "expires_at": "2001-01-01T00:00:00Z",
    }))
    .expect("payload");
    produce(&bus, Topic::Presence, ALICE, expired).await;
    let out = wait_composed(&bus, 3).await;
    assert_eq!(out[1].availability, Availability::Dnd);
    assert_eq!(out[2].availability, Availability::Available);
    let cleared: Vec<_> = read_all(&bus, Topic::Presence)
        .await
        .into_iter()
        .filter_map(|e| match e.event {
            Event::ManualStatusCleared(c) => Some(c.reason),
            _ => None,
        })
        .collect();
    assert_eq!(cleared, [ManualStatusClearReason::Expired]);
    assert_still(&bus, 3).await;
    composer.stop().await;
}

/// Composed events, once the last one of every user in `users` has status
/// `status`; checks no user got the same composed presence twice in a row.
async fn wait_last(bus: &Arc<dyn Bus>, users: &[String], status: &str) -> Vec<ComposedPresence> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let all = composed(&read_all(bus, Topic::PresenceState).await);
        let last = |u: &String| all.iter().rev().find(|c| c.user.as_str() == u);
        if users
            .iter()
            .all(|u| last(u).and_then(|c| c.status.as_deref()) == Some(status))
        {
            for u in users {
                let mine: Vec<_> = all.iter().filter(|c| c.user.as_str() == u).collect();
                assert!(
                    mine.windows(2).all(|w| w[0] != w[1]),
                    "{u} published twice: {mine:#?}"
                );
            }
            return all;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected every user at {status}; not there: {:?}",
            users
                .iter()
                .filter(|u| last(u).and_then(|c| c.status.as_deref()) != Some(status))
                .map(|u| (u.clone(), last(u).and_then(|c| c.status.clone())))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn user_device(bus: &Arc<dyn Bus>, user: &str, status: &str) {
    let presence = DevicePresence {
        user: BareJid::new(user),
        device: format!("{user}/laptop"),
        protocol: Protocol::Xmpp,
        available: true,
        show: None,
        status: Some(status.to_owned()),
        priority: 0,
    };
    produce(bus, Topic::Presence, user, presence).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_split_the_users_and_the_survivor_takes_over() {
    let (_fixture, bus) = open().await;
    let one = start_with(&bus, 0, PresenceConfig::new(PREFIX, NodeId::new("node1")));
    let two = start_with(&bus, 0, PresenceConfig::new(PREFIX, NodeId::new("node2")));
    let users: Vec<String> = (0..30).map(|i| format!("user{i}@example.com")).collect();
    // Until both members publish (both joined and split the partitions).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    loop {
        round += 1;
        for u in &users {
            user_device(&bus, u, &format!("warm {round}")).await;
        }
        let all = wait_last(&bus, &users, &format!("warm {round}")).await;
        let envelopes = read_all(&bus, Topic::PresenceState).await;
        let nodes: std::collections::BTreeSet<&str> =
            envelopes.iter().map(|e| e.node.as_str()).collect();
        if nodes.len() == 2 && all.len() == envelopes.len() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "one member did all the work"
        );
    }
    let before = composed(&read_all(&bus, Topic::PresenceState).await).len();

    // One member leaves; the other takes its partitions over, rebuilds them
    // and publishes the next change of every user exactly once.
    one.stop().await;
    for u in &users {
        user_device(&bus, u, "after").await;
    }
    let all = wait_last(&bus, &users, "after").await;
    assert_eq!(all.len(), before + users.len());
    let after_by: std::collections::BTreeSet<String> = read_all(&bus, Topic::PresenceState)
        .await
        .into_iter()
        .filter(|e| matches!(&e.event, Event::ComposedPresence(c) if c.status.as_deref() == Some("after")))
        .map(|e| e.node.as_str().to_owned())
        .collect();
    assert_eq!(
        after_by,
        std::collections::BTreeSet::from(["node2".to_owned()])
    );
    assert_still(&bus, before + users.len()).await;
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_throttle_change_takes_effect_without_a_restart() {
    let (_fixture, bus) = open().await;
    let (settings_tx, settings_rx) = watch::channel(LiveSettings {
        presence_throttle_ms: 3_600_000,
        ..LiveSettings::default()
    });
    let (shutdown, rx) = watch::channel(false);
    let composer = Running {
        shutdown,
        task: tokio::spawn(presence::run(
            bus.clone(),
            PresenceConfig::new(PREFIX, NodeId::new("node1")),
            settings_rx,
            rx,
        )),
    };
    device(&bus, "laptop", None, "one").await;
    wait_composed(&bus, 1).await;
    // Held by the hour-long throttle.
    device(&bus, "laptop", None, "two").await;
    assert_still(&bus, 1).await;
    // An administrator lowers it: the held change goes out at once.
    settings_tx.send_modify(|s| s.presence_throttle_ms = 0);
    let out = wait_composed(&bus, 2).await;
    assert_eq!(out[1].status.as_deref(), Some("two"));
    composer.stop().await;
}
