//! The router's rules on the embedded bus (SPEC.md §7, issue 4 "Router" and
//! "Sessions"): the router runtime (`switchboard_processors::runtime`) runs
//! in-process against a fresh embedded log; the tests write the events
//! gateways would write and read what the router decides.
//!
//! - duplicate suppression: a `message.submitted` seen again (same sender
//!   and id) is not delivered twice, also by a router started afterwards
//!   (the memory comes from the log);
//! - gateway node failover: a node that stops heartbeating has its sessions
//!   ended once (session.ended node_down + presence.device unavailable),
//!   by the owning instance only, not again after a restart; messages then go
//!   to offline storage; a restarted node's old sessions end too;
//! - a message handed back by a gateway (`message.undelivered`) goes to
//!   another available session, else to offline storage;
//! - offline limits at exactly the boundary (per user, per node), and
//!   storage suppressed: the sender gets an error stanza;
//! - IM forking and stickiness (event time, not wall clock);
//! - an output the bus did not store: the batch is read again, nothing lost
//!   and nothing twice.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use switchboard_infra::bus::embedded::{EmbeddedBus, EmbeddedConfig};
use switchboard_infra::bus::{Bus, Consumer, ConsumerConfig, Polled, TopicConfig};
use switchboard_processors::runtime::{RouterConfig, run};
use switchboard_schemas::events::{
    BounceReason, DevicePresence, MessageKind, MessageSubmitted, MessageUndelivered, NodeHeartbeat,
    Protocol, SessionEndReason, SessionResourceBound, UndeliveredReason,
};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{BareJid, Envelope, Event, FullJid, NodeId};
use tokio::sync::watch;
use uuid::Uuid;

const PREFIX: &str = "rt";

struct Harness {
    _dir: tempfile::TempDir,
    bus: Arc<dyn Bus>,
    reader: Box<dyn Consumer>,
    /// Everything the reader has seen on messages, deliveries, sessions and
    /// presence.
    seen: Vec<Envelope>,
}

struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("router stops")
            .expect("router task");
    }
}

fn config() -> RouterConfig {
    RouterConfig::new(PREFIX, NodeId::new("proc1"), vec!["example.com".to_owned()])
}

fn stanza(from: &str, to: &str, id: &str, kind: &str) -> String {
    format!(
        "<message xmlns='jabber:client' from='{from}' to='{to}' type='{kind}' id='{id}'><body>{id}</body></message>"
    )
}

impl Harness {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let bus: Arc<dyn Bus> = Arc::new(
            EmbeddedBus::open(EmbeddedConfig::new(dir.path().join("bus.sqlite")))
                .await
                .unwrap(),
        );
        bus.create_topics(&TopicConfig::catalogue(PREFIX))
            .await
            .unwrap();
        let topics: Vec<String> = [
            Topic::Messages,
            Topic::Deliveries,
            Topic::Sessions,
            Topic::Presence,
        ]
        .into_iter()
        .map(|t| full_name(PREFIX, t))
        .collect();
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        let reader = bus
            .consumer(ConsumerConfig::new("test-reader", &refs))
            .await
            .unwrap();
        Self {
            _dir: dir,
            bus,
            reader,
            seen: Vec::new(),
        }
    }

    fn start(&self, config: RouterConfig) -> Running {
        let (stop, rx) = watch::channel(false);
        let bus = self.bus.clone();
        let task = tokio::spawn(async move {
            run(bus, config, rx).await.expect("router runs");
        });
        Running { stop, task }
    }

    async fn produce(&self, envelope: &Envelope) {
        let topic = full_name(PREFIX, envelope.topic().expect("catalogued"));
        self.bus
            .produce(
                &topic,
                envelope.subject.as_bytes(),
                Some(&envelope.to_json_vec().unwrap()),
            )
            .await
            .unwrap();
    }

    /// A session of `full` on gateway `node`, with available presence.
    async fn bind(&self, full: &str, node: &str, priority: i8) -> Uuid {
        let id = Uuid::now_v7();
        let bare = full.split_once('/').unwrap().0;
        self.produce(&Envelope::new(
            NodeId::new(node),
            bare,
            SessionResourceBound {
                session_id: id,
                full_jid: FullJid::new(full),
                protocol: Protocol::Xmpp,
                contact: None,
                priority,
                client: Default::default(),
            },
        ))
        .await;
        self.produce(&Envelope::new(
            NodeId::new(node),
            bare,
            DevicePresence {
                user: BareJid::new(bare),
                device: full.to_owned(),
                protocol: Protocol::Xmpp,
                available: true,
                show: None,
                status: None,
                priority,
            },
        ))
        .await;
        id
    }

    /// A task heartbeating for `node` every 500 ms until aborted.
    fn keep_beating(&self, node: &str, started_at: DateTime<Utc>) -> tokio::task::JoinHandle<()> {
        let bus = self.bus.clone();
        let node = node.to_owned();
        tokio::spawn(async move {
            loop {
                let e = Envelope::new(
                    NodeId::new(&node),
                    &node,
                    NodeHeartbeat {
                        node: NodeId::new(&node),
                        started_at,
                        interval_secs: 1,
                        sessions: Default::default(),
                    },
                );
                let _ = bus
                    .produce(
                        &full_name(PREFIX, Topic::Sessions),
                        node.as_bytes(),
                        Some(&e.to_json_vec().unwrap()),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    async fn heartbeat(&self, node: &str, started_at: DateTime<Utc>) {
        self.produce(&Envelope::new(
            NodeId::new(node),
            node,
            NodeHeartbeat {
                node: NodeId::new(node),
                started_at,
                interval_secs: 1,
                sessions: Default::default(),
            },
        ))
        .await;
    }

    fn submitted(from: &str, to: &str, id: &str, kind: MessageKind) -> Envelope {
        Envelope::new(
            NodeId::new("gw1"),
            from.split_once('/').unwrap().0,
            MessageSubmitted {
                message_id: id.to_owned(),
                from: FullJid::new(from),
                to: to.to_owned(),
                stanza: stanza(from, to, id, kind.as_str()),
                kind,
                body: Some(id.to_owned()),
                thread: None,
                subject: None,
            },
        )
    }

    async fn submit(&self, from: &str, to: &str, id: &str) {
        self.produce(&Self::submitted(from, to, id, MessageKind::Chat))
            .await;
    }

    async fn read_for(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            if let Polled::Records(records) =
                self.reader.poll(Duration::from_millis(50)).await.unwrap()
            {
                for r in records {
                    if let Some(v) = r.value.as_deref() {
                        self.seen.push(Envelope::from_json_slice(v).unwrap());
                    }
                }
            }
        }
    }

    /// Reads until `done` holds of everything seen (or fails after 20 s).
    async fn wait(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let end = Instant::now() + Duration::from_secs(20);
        while !done(self) {
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}; seen:\n{}",
                self.dump()
            );
            self.read_for(Duration::from_millis(50)).await;
        }
    }

    fn dump(&self) -> String {
        self.seen
            .iter()
            .map(|e| format!("{} {} {:?}", e.event.event_type(), e.subject, e.event))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Deliveries of message `id` to `to` (a full address).
    fn deliveries(&self, id: &str, to: &str) -> usize {
        self.seen
            .iter()
            .filter(|e| {
                matches!(&e.event, Event::StanzaDelivery(d)
                    if d.message_id.as_deref() == Some(id) && d.to == to
                        && !d.stanza.contains("type='error'"))
            })
            .count()
    }

    /// Error stanzas with `condition` delivered to `to` for message `id`.
    fn errors(&self, id: &str, to: &str, condition: &str) -> usize {
        self.seen
            .iter()
            .filter(|e| {
                matches!(&e.event, Event::StanzaDelivery(d)
                    if d.message_id.as_deref() == Some(id) && d.to == to
                        && d.stanza.contains("type='error'")
                        && d.stanza.contains(&format!("<{condition} ")))
            })
            .count()
    }

    fn stored(&self, id: &str) -> usize {
        self.seen
            .iter()
            .filter(|e| matches!(&e.event, Event::MessageStoredOffline(s) if s.message_id == id))
            .count()
    }

    fn bounced(&self, id: &str, reason: &BounceReason) -> usize {
        self.seen
            .iter()
            .filter(|e| {
                matches!(&e.event, Event::MessageBounced(b)
                    if b.message_id == id && b.reason == *reason)
            })
            .count()
    }

    fn ended(&self, session: Uuid) -> usize {
        self.seen
            .iter()
            .filter(|e| {
                matches!(&e.event, Event::SessionEnded(s)
                    if s.session_id == session && s.reason == SessionEndReason::NodeDown)
            })
            .count()
    }

    fn unavailable(&self, full: &str) -> usize {
        self.seen
            .iter()
            .filter(|e| {
                matches!(&e.event, Event::DevicePresence(p) if p.device == full && !p.available)
            })
            .count()
    }
}

const ALICE: &str = "alice@example.com/a";
const BOB: &str = "bob@example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_seen_again_is_not_delivered_twice() {
    let mut h = Harness::new().await;
    let bob_phone = format!("{BOB}/phone");
    h.bind(ALICE, "gw1", 0).await;
    h.bind(&bob_phone, "gw1", 0).await;
    let router = h.start(config());
    h.submit(ALICE, BOB, "m1").await;
    // The same id again (a client resend or a redelivery), and another
    // sender's "m1", which is another message.
    h.submit(ALICE, BOB, "m1").await;
    h.bind("dave@example.com/d", "gw1", 0).await;
    h.submit("dave@example.com/d", BOB, "m1").await;
    h.submit(ALICE, BOB, "m2").await;
    h.wait("m2 delivered", |h| h.deliveries("m2", &bob_phone) == 1)
        .await;
    h.read_for(Duration::from_millis(500)).await;
    let from_alice = h
        .seen
        .iter()
        .filter(|e| {
            matches!(&e.event, Event::StanzaDelivery(d)
                if d.message_id.as_deref() == Some("m1") && d.stanza.contains(ALICE))
        })
        .count();
    assert_eq!(from_alice, 1, "{}", h.dump());
    assert_eq!(h.deliveries("m1", &bob_phone), 2, "alice's and dave's m1");
    router.stop().await;

    // A new router instance (state rebuilt from the log) sees alice's m1
    // once more: still suppressed; m3 goes through.
    h.submit(ALICE, BOB, "m1").await;
    h.submit(ALICE, BOB, "m3").await;
    let router = h.start(config());
    h.wait("m3 delivered", |h| h.deliveries("m3", &bob_phone) == 1)
        .await;
    h.read_for(Duration::from_millis(500)).await;
    assert_eq!(h.deliveries("m1", &bob_phone), 2, "{}", h.dump());
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_silent_gateway_node_end_once() {
    let mut h = Harness::new().await;
    let now = Utc::now();
    h.heartbeat("gw-a", now).await;
    h.heartbeat("gw-b", now).await;
    h.bind(ALICE, "gw-b", 0).await;
    // Users spread over partitions, so both router instances own some.
    let users: Vec<String> = (0..8).map(|i| format!("u{i}@example.com/r")).collect();
    let mut ids = Vec::new();
    for u in &users {
        ids.push(h.bind(u, "gw-a", 0).await);
    }
    let config = RouterConfig {
        node_timeout: Duration::from_secs(2),
        ..config()
    };
    let one = h.start(config.clone());
    let two = h.start(RouterConfig {
        node: NodeId::new("proc2"),
        ..config.clone()
    });
    // gw-b keeps beating, gw-a is silent.
    let beat = h.keep_beating("gw-b", now);
    h.wait("every gw-a session ended", |h| {
        ids.iter().all(|id| h.ended(*id) >= 1) && users.iter().all(|u| h.unavailable(u) >= 1)
    })
    .await;
    // Messages for them now go to offline storage.
    h.submit(ALICE, "u0@example.com", "late").await;
    h.wait("late stored", |h| h.stored("late") == 1).await;
    // Nothing twice, from either instance; alice (gw-b) untouched.
    h.read_for(Duration::from_secs(3)).await;
    for (id, u) in ids.iter().zip(&users) {
        assert_eq!(h.ended(*id), 1, "{u}\n{}", h.dump());
        assert_eq!(h.unavailable(u), 1, "{u}");
    }
    assert_eq!(h.unavailable(ALICE), 0);
    one.stop().await;
    two.stop().await;
    // After a restart (state from the log): nothing again.
    let three = h.start(config.clone());
    h.read_for(Duration::from_secs(4)).await;
    for id in &ids {
        assert_eq!(h.ended(*id), 1);
    }
    // gw-b restarts under the same id (its heartbeat has a later start):
    // alice's session, bound before, ends; a session bound after does not.
    beat.abort();
    let restarted = Utc::now();
    h.heartbeat("gw-b", restarted).await;
    let carol = h.bind("carol@example.com/c", "gw-b", 0).await;
    h.wait("alice's old session ended", |h| {
        h.seen.iter().any(|e| {
            matches!(&e.event, Event::SessionEnded(s)
                if s.full_jid.as_ref().map(FullJid::as_str) == Some(ALICE)
                    && s.reason == SessionEndReason::NodeDown)
        })
    })
    .await;
    h.heartbeat("gw-b", restarted).await;
    h.read_for(Duration::from_millis(1500)).await;
    assert_eq!(h.ended(carol), 0);
    three.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_handed_back_goes_to_another_session_or_offline() {
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw1", 0).await;
    let phone = format!("{BOB}/phone");
    let laptop = format!("{BOB}/laptop");
    let phone_id = h.bind(&phone, "gw1", 5).await;
    let laptop_id = h.bind(&laptop, "gw1", 1).await;
    let router = h.start(config());
    let back = |id: &str, to: &str, session| {
        Envelope::new(
            NodeId::new("gw1"),
            BOB,
            MessageUndelivered {
                message_id: id.to_owned(),
                from: FullJid::new(ALICE),
                to: to.to_owned(),
                reason: UndeliveredReason::SessionGone,
                session_id: Some(session),
                stanza: stanza(ALICE, to, id, "chat"),
            },
        )
    };
    // The phone's session is gone: the laptop gets it.
    h.produce(&back("h1", &phone, phone_id)).await;
    h.wait("h1 to the laptop", |h| h.deliveries("h1", &laptop) == 1)
        .await;
    assert_eq!(h.deliveries("h1", &phone), 0);
    assert_eq!(h.stored("h1"), 0);
    // The laptop's is gone too, and the phone's end was read: stored.
    h.produce(&Envelope::new(
        NodeId::new("gw1"),
        BOB,
        switchboard_schemas::events::SessionEnded {
            session_id: phone_id,
            user: BareJid::new(BOB),
            full_jid: Some(FullJid::new(&phone)),
            protocol: Protocol::Xmpp,
            reason: SessionEndReason::ConnectionLost,
            text: None,
        },
    ))
    .await;
    h.read_for(Duration::from_millis(300)).await;
    h.produce(&back("h2", &laptop, laptop_id)).await;
    h.wait("h2 stored", |h| h.stored("h2") == 1).await;
    assert_eq!(h.deliveries("h2", &laptop), 0);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_back_from_a_full_queue_is_stored_and_sent_again() {
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw1", 0).await;
    let phone = format!("{BOB}/phone");
    let phone_id = h.bind(&phone, "gw1", 0).await;
    let router = h.start(config());
    h.produce(&Envelope::new(
        NodeId::new("gw1"),
        BOB,
        MessageUndelivered {
            message_id: "q1".to_owned(),
            from: FullJid::new(ALICE),
            to: phone.clone(),
            reason: UndeliveredReason::QueueFull,
            session_id: Some(phone_id),
            stanza: stanza(ALICE, &phone, "q1", "chat"),
        },
    ))
    .await;
    // The only session is slow, not gone: stored, then sent to it again
    // (with the XEP-0203 delay of the store).
    h.wait("q1 stored and sent again", |h| {
        h.stored("q1") == 1 && h.deliveries("q1", &phone) == 1
    })
    .await;
    let again = h
        .seen
        .iter()
        .find_map(|e| match &e.event {
            Event::StanzaDelivery(d) if d.message_id.as_deref() == Some("q1") => {
                Some(d.stanza.clone())
            }
            _ => None,
        })
        .unwrap();
    assert!(again.contains("urn:xmpp:delay"), "{again}");
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_limits_at_the_boundary_and_suppression() {
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw1", 0).await;
    let router = h.start(RouterConfig {
        offline_max_per_user: 3,
        offline_max_per_node: 5,
        ..config()
    });
    // Per user: the 3rd is stored, the 4th refused (service-unavailable).
    for id in ["c1", "c2", "c3", "c4"] {
        h.submit(ALICE, "carol@example.com", id).await;
    }
    h.wait("c4 refused", |h| {
        h.bounced("c4", &BounceReason::OfflineLimit) == 1
    })
    .await;
    for id in ["c1", "c2", "c3"] {
        assert_eq!(h.stored(id), 1, "{id}");
    }
    assert_eq!(h.stored("c4"), 0);
    assert_eq!(
        h.errors("c4", ALICE, "service-unavailable"),
        1,
        "{}",
        h.dump()
    );
    // Per node: 3 stored so far; 2 more fit (5 in all), the 6th does not.
    for (id, to) in [
        ("d1", "dave@example.com"),
        ("e1", "erin@example.com"),
        ("f1", "frank@example.com"),
    ] {
        h.submit(ALICE, to, id).await;
    }
    h.wait("f1 refused", |h| {
        h.bounced("f1", &BounceReason::OfflineLimit) == 1
    })
    .await;
    assert_eq!(h.stored("d1") + h.stored("e1"), 2);
    assert_eq!(h.stored("f1"), 0);
    assert_eq!(
        h.errors("f1", ALICE, "resource-constraint"),
        1,
        "{}",
        h.dump()
    );
    router.stop().await;

    // Storage suppressed: nothing stored, the sender is told.
    let router = h.start(RouterConfig {
        offline_enabled: false,
        ..config()
    });
    h.submit(ALICE, "gina@example.com", "g1").await;
    h.wait("g1 refused", |h| {
        h.bounced("g1", &BounceReason::RecipientUnavailable) == 1
    })
    .await;
    assert_eq!(h.stored("g1"), 0);
    assert_eq!(h.errors("g1", ALICE, "service-unavailable"), 1);
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_forks_until_a_client_replies_then_sticks() {
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw1", 0).await;
    let phone = format!("{BOB}/phone");
    let laptop = format!("{BOB}/laptop");
    h.bind(&phone, "gw1", 0).await;
    h.bind(&laptop, "gw1", 0).await;
    let router = h.start(config());
    h.submit(ALICE, BOB, "f1").await;
    h.wait("f1 forked", |h| {
        h.deliveries("f1", &phone) == 1 && h.deliveries("f1", &laptop) == 1
    })
    .await;
    // bob answers from the laptop.
    h.submit(&laptop, "alice@example.com", "r1").await;
    h.wait("r1 delivered", |h| h.deliveries("r1", ALICE) == 1)
        .await;
    h.submit(ALICE, BOB, "f2").await;
    h.wait("f2 to the laptop", |h| h.deliveries("f2", &laptop) == 1)
        .await;
    // Eleven minutes of silence (event time): forked again.
    let mut later = Harness::submitted(ALICE, BOB, "f3", MessageKind::Chat);
    later.occurred_at += chrono::Duration::minutes(11);
    h.produce(&later).await;
    h.wait("f3 forked", |h| {
        h.deliveries("f3", &phone) == 1 && h.deliveries("f3", &laptop) == 1
    })
    .await;
    h.read_for(Duration::from_millis(300)).await;
    assert_eq!(h.deliveries("f2", &phone), 0, "{}", h.dump());
    router.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_name_the_session_protocol() {
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw1", 0).await;
    let dave = "dave@example.com/sip-phone";
    let id = Uuid::now_v7();
    h.produce(&Envelope::new(
        NodeId::new("gw1"),
        "dave@example.com",
        SessionResourceBound {
            session_id: id,
            full_jid: FullJid::new(dave),
            protocol: Protocol::Sip,
            contact: Some("sip:dave@127.0.0.1:5070".to_owned()),
            priority: 0,
            client: Default::default(),
        },
    ))
    .await;
    h.produce(&Envelope::new(
        NodeId::new("gw1"),
        "dave@example.com",
        DevicePresence {
            user: BareJid::new("dave@example.com"),
            device: dave.to_owned(),
            protocol: Protocol::Sip,
            available: true,
            show: None,
            status: None,
            priority: 0,
        },
    ))
    .await;
    let router = h.start(config());
    h.submit(ALICE, "dave@example.com", "s1").await;
    h.wait("s1 delivered", |h| h.deliveries("s1", dave) == 1)
        .await;
    let protocols: Vec<Protocol> = h
        .seen
        .iter()
        .filter_map(|e| match &e.event {
            Event::StanzaDelivery(d) if d.to == dave => Some(d.protocol.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(protocols, [Protocol::Sip]);
    router.stop().await;
}

/// A bus whose first `fail` produces to the deliveries topic fail.
struct FlakyBus {
    inner: Arc<dyn Bus>,
    fail: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl Bus for FlakyBus {
    async fn create_topics(
        &self,
        topics: &[TopicConfig],
    ) -> Result<(), switchboard_infra::bus::BusError> {
        self.inner.create_topics(topics).await
    }

    async fn produce(
        &self,
        topic: &str,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<switchboard_infra::bus::Delivery, switchboard_infra::bus::BusError> {
        use std::sync::atomic::Ordering;
        if topic == full_name(PREFIX, Topic::Deliveries)
            && self
                .fail
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(switchboard_infra::bus::BusError::Timeout("injected"));
        }
        self.inner.produce(topic, key, value).await
    }

    async fn consumer(
        &self,
        config: ConsumerConfig,
    ) -> Result<Box<dyn Consumer>, switchboard_infra::bus::BusError> {
        self.inner.consumer(config).await
    }

    async fn partitions(&self, topic: &str) -> Result<i32, switchboard_infra::bus::BusError> {
        self.inner.partitions(topic).await
    }

    async fn end_offsets(&self, topic: &str) -> Result<Vec<i64>, switchboard_infra::bus::BusError> {
        self.inner.end_offsets(topic).await
    }

    fn backend(&self) -> &'static str {
        "flaky"
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_output_failed_is_read_again() {
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw1", 0).await;
    let phone = format!("{BOB}/phone");
    h.bind(&phone, "gw1", 0).await;
    for id in ["p1", "p2", "p3"] {
        h.submit(ALICE, BOB, id).await;
    }
    // The first two deliveries fail to be stored.
    let flaky: Arc<dyn Bus> = Arc::new(FlakyBus {
        inner: h.bus.clone(),
        fail: std::sync::atomic::AtomicUsize::new(2),
    });
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        run(flaky, config(), rx).await.expect("router runs");
    });
    h.wait("every message delivered", |h| {
        ["p1", "p2", "p3"]
            .iter()
            .all(|id| h.deliveries(id, &phone) >= 1)
    })
    .await;
    h.read_for(Duration::from_millis(1500)).await;
    for id in ["p1", "p2", "p3"] {
        // One recorded outcome each; a delivery stored before the failure
        // (p3) goes out again identical, which the gateway drops (same
        // session, id and stanza).
        let outcomes = h
            .seen
            .iter()
            .filter(|e| matches!(&e.event, Event::MessageDelivered(d) if d.message_id == id))
            .count();
        assert_eq!(outcomes, 1, "{id}\n{}", h.dump());
        let copies: std::collections::BTreeSet<(Uuid, String)> = h
            .seen
            .iter()
            .filter_map(|e| match &e.event {
                Event::StanzaDelivery(d) if d.message_id.as_deref() == Some(id) => {
                    Some((d.session_id, d.stanza.clone()))
                }
                _ => None,
            })
            .collect();
        assert_eq!(copies.len(), 1, "{id}: identical repeats only");
    }
    Running { stop, task }.stop().await;
}

/// SPEC.md §7 "IM on/off" and issue 4 "Live settings": with IM turned off
/// by a live setting the sender is refused, and turned back on (no restart)
/// the next message is delivered; the offline limit follows the live value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_off_and_offline_limit_follow_live_settings() {
    use switchboard_processors::settings::LiveSettings;
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw1", 0).await;
    let bob_phone = format!("{BOB}/phone");
    h.bind(&bob_phone, "gw1", 0).await;
    let (settings_tx, settings) = watch::channel(LiveSettings {
        im_enabled: false,
        ..LiveSettings::default()
    });
    let router = h.start(RouterConfig {
        settings: Some(settings),
        ..config()
    });
    h.submit(ALICE, BOB, "off1").await;
    h.wait("off1 refused", |h| {
        h.bounced("off1", &BounceReason::ImDisabled) == 1
    })
    .await;
    assert_eq!(h.deliveries("off1", &bob_phone), 0);
    assert_eq!(h.errors("off1", ALICE, "service-unavailable"), 1);

    settings_tx
        .send(LiveSettings {
            offline_max_per_user: 1,
            ..LiveSettings::default()
        })
        .unwrap();
    h.submit(ALICE, BOB, "on1").await;
    h.wait("on1 delivered", |h| h.deliveries("on1", &bob_phone) == 1)
        .await;
    // The live per-user limit (1): the second stored message is refused.
    for id in ["s1", "s2"] {
        h.submit(ALICE, "carol@example.com", id).await;
    }
    h.wait("s2 refused", |h| {
        h.bounced("s2", &BounceReason::OfflineLimit) == 1
    })
    .await;
    assert_eq!(h.stored("s1"), 1);
    router.stop().await;
}

/// The session table and the messages are separate logs: a message stored
/// after its recipient's session was bound (and acknowledged) must find that
/// session, never overtake it into offline storage or an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_never_overtakes_the_session_it_follows() {
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw1", 0).await;
    let router = h.start(config());
    h.submit(ALICE, BOB, "warm-up").await;
    h.wait("the router is live", |h| h.stored("warm-up") == 1)
        .await;
    let rounds = 30;
    for i in 0..rounds {
        let full = format!("{BOB}/r{i}");
        h.bind(&full, "gw1", 0).await;
        h.submit(ALICE, &full, &format!("m{i}")).await;
    }
    h.wait("every message delivered", |h| {
        (0..rounds).all(|i| h.deliveries(&format!("m{i}"), &format!("{BOB}/r{i}")) == 1)
    })
    .await;
    for i in 0..rounds {
        assert_eq!(h.stored(&format!("m{i}")), 0, "m{i} stored\n{}", h.dump());
    }
    router.stop().await;
}

/// A broadcast message (XEP-0033) from alice to the server with `addresses`.
fn broadcast(id: &str, addresses: &[(&str, &str)]) -> Envelope {
    let block: String = addresses
        .iter()
        .map(|(kind, jid)| format!("<address type='{kind}' jid='{jid}'/>"))
        .collect();
    let stanza = format!(
        "<message xmlns='jabber:client' from='{ALICE}' to='example.com' type='chat' id='{id}'>\
         <body>{id}</body><addresses xmlns='http://jabber.org/protocol/address'>{block}</addresses></message>"
    );
    Envelope::new(
        NodeId::new("gw1"),
        "alice@example.com",
        MessageSubmitted {
            message_id: id.to_owned(),
            from: FullJid::new(ALICE),
            to: "example.com".to_owned(),
            kind: MessageKind::Chat,
            body: Some(id.to_owned()),
            thread: None,
            subject: None,
            stanza,
        },
    )
}

impl Harness {
    /// The stanza of the (non-error) delivery of message `id` to `to`.
    fn delivered_stanza(&self, id: &str, to: &str) -> Option<String> {
        self.seen.iter().find_map(|e| match &e.event {
            Event::StanzaDelivery(d)
                if d.message_id.as_deref() == Some(id)
                    && d.to == to
                    && !d.stanza.contains("type='error'") =>
            {
                Some(d.stanza.clone())
            }
            _ => None,
        })
    }

    fn stored_stanza(&self, id: &str, to: &str) -> Option<String> {
        self.seen.iter().find_map(|e| match &e.event {
            Event::MessageStoredOffline(s) if s.message_id == id && s.to.as_str() == to => {
                s.stanza.clone()
            }
            _ => None,
        })
    }

    fn all_deliveries(&self, id: &str) -> usize {
        self.seen
            .iter()
            .filter(|e| {
                matches!(&e.event, Event::StanzaDelivery(d)
                    if d.message_id.as_deref() == Some(id) && !d.stanza.contains("type='error'"))
            })
            .count()
    }
}

/// SPEC.md §7 broadcast IM through XEP-0033: one message to the server
/// reaches every `to`/`cc`/`bcc` address with the per-recipient rules
/// (delivered, stored offline, or an error from that recipient), `bcc`
/// addresses hidden from everyone but themselves (§4.6.3), every address
/// marked delivered (§4.5); over the limit, or with an address of another
/// domain, nothing is delivered and the sender gets the error (§8).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_reaches_each_address_with_the_per_recipient_rules() {
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw1", 0).await;
    let bob = format!("{BOB}/phone");
    let dave = "dave@example.com/d";
    h.bind(&bob, "gw1", 0).await;
    h.bind(dave, "gw1", 0).await;
    let router = h.start(RouterConfig {
        broadcast_max_addresses: 5,
        ..config()
    });
    // bob (to), carol (cc, offline), dave (bcc), frank (bcc, offline), and
    // bob again as bcc (five addresses, the limit; bob gets it once,
    // visibly).
    h.produce(&broadcast(
        "b1",
        &[
            ("to", BOB),
            ("cc", "carol@example.com"),
            ("bcc", "dave@example.com"),
            ("bcc", "frank@example.com"),
            ("bcc", BOB),
        ],
    ))
    .await;
    h.wait("b1 to everyone", |h| {
        h.deliveries("b1", &bob) == 1 && h.deliveries("b1", dave) == 1 && h.stored("b1") == 2
    })
    .await;
    let to_bob = h.delivered_stanza("b1", &bob).unwrap();
    assert!(to_bob.contains(" to='bob@example.com'"), "{to_bob}");
    assert!(
        to_bob.contains("<address type='cc' jid='carol@example.com' delivered='true'/>"),
        "{to_bob}"
    );
    assert!(!to_bob.contains("type='bcc'"), "bcc hidden: {to_bob}");
    let to_dave = h.delivered_stanza("b1", dave).unwrap();
    assert!(to_dave.contains("<address type='bcc' jid='dave@example.com' delivered='true'/>"));
    assert!(!to_dave.contains("frank"), "{to_dave}");
    let to_carol = h.stored_stanza("b1", "carol@example.com").unwrap();
    assert!(to_carol.contains(" to='carol@example.com'"));
    assert!(!to_carol.contains("type='bcc'"), "{to_carol}");
    let to_frank = h.stored_stanza("b1", "frank@example.com").unwrap();
    assert!(to_frank.contains("jid='frank@example.com' delivered='true'/>"));
    assert!(!to_frank.contains("dave"), "{to_frank}");
    assert_eq!(h.errors("b1", ALICE, "service-unavailable"), 0);

    // Six addresses, limit 5: refused as a whole.
    let six = [
        ("to", BOB),
        ("to", "carol@example.com"),
        ("to", "dave@example.com"),
        ("to", "frank@example.com"),
        ("to", "gina@example.com"),
        ("to", "hank@example.com"),
    ];
    h.produce(&broadcast("b2", &six)).await;
    // An address on another domain: refused as a whole too.
    h.produce(&broadcast("b3", &[("to", BOB), ("cc", "x@elsewhere.org")]))
        .await;
    // Exactly the limit.
    h.produce(&broadcast("b4", &six[..5])).await;
    h.wait("b4 delivered, b2 and b3 refused", |h| {
        h.deliveries("b4", &bob) == 1
            && h.errors("b2", ALICE, "not-acceptable") == 1
            && h.errors("b3", ALICE, "forbidden") == 1
    })
    .await;
    h.read_for(Duration::from_millis(300)).await;
    for id in ["b2", "b3"] {
        assert_eq!(h.all_deliveries(id) + h.stored(id), 0, "{id}\n{}", h.dump());
    }
    let refusal = h
        .seen
        .iter()
        .find_map(|e| match &e.event {
            Event::StanzaDelivery(d)
                if d.message_id.as_deref() == Some("b2") && d.stanza.contains("type='error'") =>
            {
                Some(d.stanza.clone())
            }
            _ => None,
        })
        .unwrap();
    assert!(
        refusal.contains("<error type='modify'><not-acceptable")
            && refusal.contains("too many addresses: 6, at most 5 are accepted"),
        "{refusal}"
    );
    assert_eq!(
        h.bounced("b2", &BounceReason::Other("too_many_addresses".to_owned())),
        1
    );
    router.stop().await;

    // Offline storage off: the offline recipients' copies come back as
    // errors from each of them; bob still gets his.
    let router = h.start(RouterConfig {
        offline_enabled: false,
        ..config()
    });
    h.produce(&broadcast(
        "b5",
        &[
            ("to", BOB),
            ("cc", "carol@example.com"),
            ("bcc", "frank@example.com"),
        ],
    ))
    .await;
    h.wait("b5 to bob, refused for carol and frank", |h| {
        h.deliveries("b5", &bob) == 1 && h.errors("b5", ALICE, "service-unavailable") == 2
    })
    .await;
    let from: Vec<bool> = ["carol@example.com", "frank@example.com"]
        .iter()
        .map(|who| {
            h.seen.iter().any(|e| {
                matches!(&e.event, Event::StanzaDelivery(d)
                    if d.message_id.as_deref() == Some("b5")
                        && d.stanza.contains(&format!("from='{who}'")))
            })
        })
        .collect();
    assert_eq!(from, [true, true], "{}", h.dump());
    router.stop().await;
}

impl Harness {
    /// A message with exactly this stanza (and body).
    async fn submit_stanza(
        &self,
        from: &str,
        to: &str,
        id: &str,
        kind: MessageKind,
        body: Option<&str>,
        stanza: String,
    ) {
        self.produce(&Envelope::new(
            NodeId::new("gw1"),
            from.split_once('/').unwrap().0,
            MessageSubmitted {
                message_id: id.to_owned(),
                from: FullJid::new(from),
                to: to.to_owned(),
                kind,
                body: body.map(str::to_owned),
                thread: None,
                subject: None,
                stanza,
            },
        ))
        .await;
    }

    async fn enable_carbons(&self, full: &str, session_id: Uuid) {
        let bare = full.split_once('/').unwrap().0;
        self.produce(&Envelope::new(
            NodeId::new("gw1"),
            bare,
            switchboard_schemas::events::SessionCarbons {
                session_id,
                full_jid: FullJid::new(full),
                enabled: true,
            },
        ))
        .await;
    }

    async fn policy(&self, event: impl Into<Event>, user: &str) {
        self.produce(&Envelope::new(NodeId::new("proc1"), user, event))
            .await;
    }

    fn undelivered(&self, id: &str) -> usize {
        self.seen
            .iter()
            .filter(|e| matches!(&e.event, Event::MessageUndelivered(u) if u.message_id == id))
            .count()
    }
}

/// SPEC.md §7 read state synced across devices: an XEP-0333 marker (a
/// body-less chat, or normal, message) reaches the recipient and, as an
/// XEP-0280 `<sent/>` carbon, the sender's other devices; body-less
/// messages for someone with no session are not stored offline
/// (XEP-0160 §4) and no error comes back; XEP-0334 hints override.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_reach_the_other_devices_and_are_not_stored_offline() {
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw1", 0).await;
    let phone = format!("{BOB}/phone");
    let laptop = format!("{BOB}/laptop");
    h.bind(&phone, "gw1", 0).await;
    let laptop_id = h.bind(&laptop, "gw1", 0).await;
    h.enable_carbons(&laptop, laptop_id).await;
    let router = h.start(config());
    let marker = |kind: &str, id: &str, to: &str| {
        format!(
            "<message xmlns='jabber:client' from='{phone}' to='{to}' type='{kind}' id='{id}'>\
             <displayed xmlns='urn:xmpp:chat-markers:0' id='m0'/></message>"
        )
    };
    for (kind, id) in [(MessageKind::Chat, "k1"), (MessageKind::Normal, "k2")] {
        let stanza = marker(kind.as_str(), id, "alice@example.com");
        h.submit_stanza(&phone, "alice@example.com", id, kind, None, stanza)
            .await;
    }
    let sent_to_laptop = |h: &Harness, id: &str| {
        h.seen.iter().any(|e| {
            matches!(&e.event, Event::StanzaDelivery(d)
                if d.message_id.as_deref() == Some(id) && d.to == laptop
                    && d.stanza.contains("<sent xmlns='urn:xmpp:carbons:2'>")
                    && d.stanza.contains("urn:xmpp:chat-markers:0"))
        })
    };
    h.wait("markers to alice and bob's laptop", |h| {
        h.deliveries("k1", ALICE) == 1
            && h.deliveries("k2", ALICE) == 1
            && sent_to_laptop(h, "k1")
            && sent_to_laptop(h, "k2")
    })
    .await;
    // carol has no session: a marker and a chat state are dropped, a body
    // with <no-store/> too; a body-less message with <store/> is stored.
    let carol = "carol@example.com";
    h.submit_stanza(
        &phone,
        carol,
        "k3",
        MessageKind::Chat,
        None,
        marker("chat", "k3", carol),
    )
    .await;
    let composing = format!(
        "<message xmlns='jabber:client' from='{phone}' to='{carol}' type='chat' id='k4'>\
         <composing xmlns='http://jabber.org/protocol/chatstates'/></message>"
    );
    h.submit_stanza(&phone, carol, "k4", MessageKind::Chat, None, composing)
        .await;
    let no_store = format!(
        "<message xmlns='jabber:client' from='{phone}' to='{carol}' type='chat' id='k5'>\
         <body>x</body><no-store xmlns='urn:xmpp:hints'/></message>"
    );
    h.submit_stanza(&phone, carol, "k5", MessageKind::Chat, Some("x"), no_store)
        .await;
    let store = format!(
        "<message xmlns='jabber:client' from='{phone}' to='{carol}' type='chat' id='k6'>\
         <received xmlns='urn:xmpp:receipts' id='r'/><store xmlns='urn:xmpp:hints'/></message>"
    );
    h.submit_stanza(&phone, carol, "k6", MessageKind::Chat, None, store)
        .await;
    h.wait("k6 stored", |h| h.stored("k6") == 1).await;
    h.read_for(Duration::from_millis(300)).await;
    for id in ["k3", "k4", "k5"] {
        assert_eq!(h.stored(id) + h.undelivered(id), 0, "{id}\n{}", h.dump());
        assert_eq!(h.errors(id, &phone, "service-unavailable"), 0, "{id}");
    }
    router.stop().await;
}

/// XEP-0191 §3.3 in the router: a message from a contact the recipient
/// blocks (by address or by domain) is not delivered or stored, and the
/// sender gets `service-unavailable` from the recipient; a message to a
/// contact the sender blocks gets `not-acceptable` with `<blocked/>`.
/// Unblocking applies to the next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recipients_block_list_applies() {
    use switchboard_schemas::events::{PolicyBlocked, PolicyItem, PolicyUnblocked};
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw1", 0).await;
    let phone = format!("{BOB}/phone");
    h.bind(&phone, "gw1", 0).await;
    let router = h.start(config());
    h.policy(
        PolicyBlocked {
            user: BareJid::new(BOB),
            item: PolicyItem::User(BareJid::new("alice@example.com")),
        },
        BOB,
    )
    .await;
    h.policy(
        PolicyBlocked {
            user: BareJid::new("carol@example.com"),
            item: PolicyItem::Domain("example.com".to_owned()),
        },
        "carol@example.com",
    )
    .await;
    h.submit(ALICE, BOB, "x1").await;
    h.submit(&phone, "alice@example.com", "x2").await;
    h.submit(ALICE, "carol@example.com", "x3").await;
    h.wait("all three refused", |h| {
        h.bounced("x1", &BounceReason::Blocked) == 1
            && h.bounced("x2", &BounceReason::Blocked) == 1
            && h.bounced("x3", &BounceReason::Blocked) == 1
    })
    .await;
    h.read_for(Duration::from_millis(300)).await;
    assert_eq!(h.deliveries("x1", &phone), 0, "{}", h.dump());
    assert_eq!(h.errors("x1", ALICE, "service-unavailable"), 1);
    assert_eq!(h.deliveries("x2", ALICE), 0);
    let x2 = h
        .seen
        .iter()
        .find_map(|e| match &e.event {
            Event::StanzaDelivery(d) if d.message_id.as_deref() == Some("x2") => {
                Some(d.stanza.clone())
            }
            _ => None,
        })
        .unwrap();
    assert!(
        x2.contains("<error type='cancel'><not-acceptable")
            && x2.contains("<blocked xmlns='urn:xmpp:blocking:errors'/>"),
        "{x2}"
    );
    assert_eq!(h.stored("x3") + h.undelivered("x3"), 0);
    assert_eq!(h.errors("x3", ALICE, "service-unavailable"), 1);
    // bob unblocks alice: her next message arrives.
    h.policy(
        PolicyUnblocked {
            user: BareJid::new(BOB),
            item: PolicyItem::User(BareJid::new("alice@example.com")),
        },
        BOB,
    )
    .await;
    h.submit(ALICE, BOB, "x4").await;
    h.wait("x4 delivered", |h| h.deliveries("x4", &phone) == 1)
        .await;
    router.stop().await;
}

/// SPEC.md §7 active client: the client that last sent available presence
/// or a message within 5 minutes (event time) is notified; the others get
/// the message without notification (`notify` false, so a quiet-mode
/// buffer there is not flushed); with no client active every one is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_client_is_notified_within_the_window() {
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw1", 0).await;
    let phone = format!("{BOB}/phone");
    let laptop = format!("{BOB}/laptop");
    h.bind(&phone, "gw1", 0).await;
    h.bind(&laptop, "gw1", 0).await;
    let router = h.start(config());
    // Whole seconds: event times travel in the log at microsecond precision.
    let t0 = DateTime::from_timestamp(Utc::now().timestamp() + 1, 0).unwrap();
    let at = |mut e: Envelope, secs: i64| {
        e.occurred_at = t0 + chrono::Duration::seconds(secs);
        e
    };
    // bob writes from the phone at t0 (to carol: alice's chat is not made
    // sticky by a reply).
    h.produce(&at(
        Harness::submitted(&phone, "carol@example.com", "p1", MessageKind::Chat),
        0,
    ))
    .await;
    // (Partitions are read in no order between them: p1 first.)
    h.wait("p1 stored", |h| h.stored("p1") == 1).await;
    for (id, kind, secs) in [
        ("a1", MessageKind::Chat, 300),
        ("a3", MessageKind::Normal, 300),
        ("a2", MessageKind::Chat, 301),
    ] {
        h.produce(&at(Harness::submitted(ALICE, BOB, id, kind), secs))
            .await;
    }
    let notify = |h: &Harness, id: &str, to: &str| {
        h.seen.iter().find_map(|e| match &e.event {
            Event::StanzaDelivery(d) if d.message_id.as_deref() == Some(id) && d.to == to => {
                Some(d.notify)
            }
            _ => None,
        })
    };
    h.wait("a2 forked", |h| {
        h.deliveries("a2", &phone) == 1 && h.deliveries("a2", &laptop) == 1
    })
    .await;
    // Exactly 300 s after the phone's message: the phone is notified only.
    assert_eq!(notify(&h, "a1", &phone), Some(Some(true)), "{}", h.dump());
    assert_eq!(notify(&h, "a1", &laptop), Some(Some(false)));
    // 301 s: no client is active, both are notified.
    assert_eq!(notify(&h, "a2", &phone), Some(Some(true)));
    assert_eq!(notify(&h, "a2", &laptop), Some(Some(true)));
    // A normal message the two share by priority: the active client alone.
    assert_eq!(h.deliveries("a3", &phone), 1, "{}", h.dump());
    assert_eq!(h.deliveries("a3", &laptop), 0);
    router.stop().await;
}

/// Issue 4 "Sessions": messages routed to a gateway node that then stops
/// heartbeating are not lost with it. Those routed since its last heartbeat
/// less one interval go back to the recipient's router (`message.undelivered`,
/// `node_down`) and are stored offline once; an older one (which the node
/// had time to write out) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_routed_to_a_node_that_dies_are_stored_offline() {
    let mut h = Harness::new().await;
    h.bind(ALICE, "gw-b", 0).await;
    let bob = format!("{BOB}/phone");
    h.bind(&bob, "gw-a", 0).await;
    let beat = Utc::now();
    // A process started before the sessions were bound.
    let started = beat - chrono::Duration::seconds(60);
    h.heartbeat("gw-a", started).await;
    let router = h.start(RouterConfig {
        node_timeout: Duration::from_secs(2),
        ..config()
    });
    // Whole microseconds: event times travel in the log at that precision.
    let at = |mut e: Envelope, millis: i64| {
        e.occurred_at = DateTime::from_timestamp_micros(beat.timestamp_micros()).unwrap()
            + chrono::Duration::milliseconds(millis);
        e
    };
    // gw-b keeps beating (alice's node), gw-a never again.
    let alive = h.keep_beating("gw-b", started);
    // 1.5 s before gw-a's heartbeat (its interval is 1 s), and after it.
    for (id, millis) in [("early", -1500), ("late1", 200), ("late2", 300)] {
        h.produce(&at(
            Harness::submitted(ALICE, BOB, id, MessageKind::Chat),
            millis,
        ))
        .await;
    }
    h.wait("routed to gw-a", |h| {
        ["early", "late1", "late2"]
            .iter()
            .all(|id| h.deliveries(id, &bob) == 1)
    })
    .await;
    h.wait("late ones stored offline", |h| {
        h.stored("late1") == 1 && h.stored("late2") == 1
    })
    .await;
    h.read_for(Duration::from_secs(3)).await;
    assert_eq!(h.stored("late1"), 1, "{}", h.dump());
    assert_eq!(h.stored("late2"), 1);
    assert_eq!(h.undelivered("late1"), 1, "handed back once");
    assert_eq!(h.stored("early"), 0);
    assert_eq!(h.undelivered("early"), 0);
    alive.abort();
    router.stop().await;
}
