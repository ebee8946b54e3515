//! The roster processor on the embedded bus (issue 4 "Authorization and
//! limits"): a watcher from a blocked domain is denied; the contact-list
//! limit holds at exactly its value, and a live change of it applies at
//! once; a restarted processor rebuilds the same rosters from the log.

mod support;

use std::sync::Arc;
use std::time::Duration;

use switchboard_infra::bus::conformance::Fixture;
use switchboard_infra::bus::{Bus, BusError, TopicConfig};
use switchboard_processors::policy::PolicyLimits;
use switchboard_processors::roster_runtime::{self, RosterConfig};
use switchboard_schemas::events::{
    ClientInfo, DevicePresence, PolicyBlocked, PolicyItem, Protocol, RosterQueried,
    RosterUpdateRequested, SessionResourceBound, Subscription, SubscriptionRequested,
};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{BareJid, Envelope, Event, FullJid, NodeId};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use support::{EmbeddedFixture, read_events};

const PREFIX: &str = "switchboard";
const ALICE: &str = "alice@example.com";
const DEVICE: &str = "alice@example.com/laptop";

struct Running {
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<(), BusError>>,
}

impl Running {
    fn start(bus: &Arc<dyn Bus>, limits: watch::Receiver<PolicyLimits>) -> Self {
        let (shutdown, rx) = watch::channel(false);
        let config = RosterConfig {
            prefix: PREFIX.to_owned(),
            node: NodeId::new("proc1"),
        };
        let task = tokio::spawn(roster_runtime::run(bus.clone(), config, limits, rx));
        Self { shutdown, task }
    }

    async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.task.await.expect("join").expect("ran cleanly");
    }
}

async fn produce(bus: &Arc<dyn Bus>, topic: Topic, key: &str, event: impl Into<Event>) {
    let envelope = Envelope::new(NodeId::new("gw1"), key, event);
    bus.produce(
        &full_name(PREFIX, topic),
        key.as_bytes(),
        Some(&envelope.to_json_vec().expect("encode")),
    )
    .await
    .expect("produce");
}

/// The stanzas delivered so far to Alice's session.
async fn delivered(bus: &Arc<dyn Bus>) -> Vec<String> {
    read_events(bus, &full_name(PREFIX, Topic::Deliveries))
        .await
        .into_iter()
        .flat_map(|e| match e.event {
            Event::StanzaDelivery(d) if d.to == DEVICE => vec![d.stanza],
            Event::PresenceDelivery(p) => p
                .targets
                .iter()
                .filter(|t| t.to == DEVICE)
                .map(|t| p.stanza_for(&t.to))
                .collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// Waits until a stanza delivered to Alice contains every one of `parts`.
async fn wait_delivery(bus: &Arc<dyn Bus>, parts: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = delivered(bus)
            .await
            .into_iter()
            .find(|s| parts.iter().all(|p| s.contains(p)))
        {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery with {parts:?}; have {:#?}",
            delivered(bus).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn update(iq: &str, contact: &str) -> RosterUpdateRequested {
    RosterUpdateRequested {
        user: BareJid::new(ALICE),
        device: FullJid::new(DEVICE),
        session_id: Uuid::nil(),
        iq_id: iq.to_owned(),
        contact: BareJid::new(contact),
        name: None,
        groups: Vec::new(),
        remove: false,
    }
}

fn query(iq: &str, version: Option<String>) -> RosterQueried {
    RosterQueried {
        user: BareJid::new(ALICE),
        device: FullJid::new(DEVICE),
        session_id: Uuid::nil(),
        iq_id: iq.to_owned(),
        version,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_domain_contact_limit_live_change_and_rebuild() {
    let fixture = EmbeddedFixture::new().await;
    let bus = fixture.open().await;
    bus.create_topics(&TopicConfig::catalogue(PREFIX))
        .await
        .expect("topics");
    let (limits_tx, limits) = watch::channel(PolicyLimits {
        max_contacts: 2,
        ..PolicyLimits::default()
    });
    let running = Running::start(&bus, limits.clone());
    // Alice is online.
    produce(
        &bus,
        Topic::Sessions,
        ALICE,
        SessionResourceBound {
            session_id: Uuid::nil(),
            full_jid: FullJid::new(DEVICE),
            protocol: Protocol::Xmpp,
            contact: None,
            priority: 0,
            client: ClientInfo::default(),
        },
    )
    .await;
    produce(
        &bus,
        Topic::Presence,
        ALICE,
        DevicePresence {
            user: BareJid::new(ALICE),
            device: DEVICE.to_owned(),
            protocol: Protocol::Xmpp,
            available: true,
            show: None,
            status: None,
            priority: 0,
        },
    )
    .await;

    // Alice blocks a whole domain; a user there asks to see her.
    produce(
        &bus,
        Topic::Roster,
        ALICE,
        PolicyBlocked {
            user: BareJid::new(ALICE),
            item: PolicyItem::Domain("evil.example".to_owned()),
        },
    )
    .await;
    let mallory = "mallory@evil.example";
    produce(
        &bus,
        Topic::Roster,
        mallory,
        SubscriptionRequested {
            from: BareJid::new(mallory),
            to: BareJid::new(ALICE),
            status: None,
        },
    )
    .await;
    // Denied: Mallory's item ends without a pending request, and Alice was
    // neither asked nor given an item.
    let roster_topic = full_name(PREFIX, Topic::Roster);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events = read_events(&bus, &roster_topic).await;
        let mallory_item = events.iter().rev().find_map(|e| match &e.event {
            Event::RosterItemSet(i) if i.user.as_str() == mallory => Some(i.clone()),
            _ => None,
        });
        if let Some(item) = mallory_item.filter(|i| !i.ask) {
            assert_eq!(item.subscription, Subscription::None);
            assert!(
                !events.iter().any(|e| matches!(&e.event,
                    Event::RosterItemSet(i) if i.user.as_str() == ALICE)),
                "alice got an item for a blocked watcher"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no denial: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !delivered(&bus)
            .await
            .iter()
            .any(|s| s.contains("type='subscribe'")),
        "alice was asked about a blocked watcher"
    );

    // The contact limit (2): the third add is refused, exactly.
    for (iq, contact) in [
        ("add-1", "b@example.com"),
        ("add-2", "c@example.com"),
        ("add-3", "d@example.com"),
    ] {
        produce(&bus, Topic::Roster, ALICE, update(iq, contact)).await;
    }
    wait_delivery(&bus, &["id='add-1'", "type='result'"]).await;
    wait_delivery(&bus, &["id='add-2'", "type='result'"]).await;
    wait_delivery(&bus, &["id='add-3'", "type='error'", "resource-constraint"]).await;

    // Raised at run time: the same add now succeeds, without a restart.
    limits_tx
        .send(PolicyLimits {
            max_contacts: 3,
            ..PolicyLimits::default()
        })
        .expect("limits");
    produce(&bus, Topic::Roster, ALICE, update("add-4", "d@example.com")).await;
    wait_delivery(&bus, &["id='add-4'", "type='result'"]).await;

    // The roster as the running processor has it ...
    produce(&bus, Topic::Roster, ALICE, query("q-1", None)).await;
    let full = wait_delivery(&bus, &["id='q-1'", "type='result'"]).await;
    for contact in ["b@example.com", "c@example.com", "d@example.com"] {
        assert!(full.contains(&format!("jid='{contact}'")), "{full}");
    }
    let version = full
        .split("ver='")
        .nth(1)
        .and_then(|v| v.split('\'').next())
        .expect("a version")
        .to_owned();
    running.stop().await;

    // ... and as a new instance rebuilds it from the log: same version, so
    // the cached-version query gets an empty result.
    let running = Running::start(&bus, limits);
    produce(&bus, Topic::Roster, ALICE, query("q-2", Some(version))).await;
    let again = wait_delivery(&bus, &["id='q-2'"]).await;
    assert!(again.ends_with("type='result'/>"), "{again}");
    running.stop().await;
}

/// RFC 6121 §4.4.2 fan-out: a composed presence change goes to every
/// watcher's available XMPP sessions as one `delivery.presence` per gateway
/// node, listing the sessions; each gets the stanza with its own `to`. SIP
/// devices are not listed (their subscriptions get NOTIFYs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composed_presence_goes_out_as_one_delivery_per_gateway_node() {
    use switchboard_schemas::events::{Availability, ComposedPresence, RosterItemSet};
    let fixture = EmbeddedFixture::new().await;
    let bus = fixture.open().await;
    bus.create_topics(&TopicConfig::catalogue(PREFIX))
        .await
        .expect("topics");
    let (_limits_tx, limits) = watch::channel(PolicyLimits::default());
    let running = Running::start(&bus, limits);
    for contact in ["bob@example.com", "carol@example.com", "dave@example.com"] {
        let item: RosterItemSet = serde_json::from_value(serde_json::json!({
            "user": ALICE, "contact": contact, "subscription": "both",
        }))
        .expect("roster item");
        produce(&bus, Topic::Roster, ALICE, item).await;
    }
    let sessions = [
        ("bob@example.com/phone", "gw1", Protocol::Xmpp),
        ("bob@example.com/sip", "gw1", Protocol::Sip),
        ("carol@example.com/desk", "gw1", Protocol::Xmpp),
        ("dave@example.com/pc", "gw2", Protocol::Xmpp),
    ];
    let mut ids = std::collections::BTreeMap::new();
    for (full, node, protocol) in sessions {
        let bare = full.split_once('/').unwrap().0;
        let id = Uuid::now_v7();
        ids.insert(full, id);
        for event in [
            Event::from(SessionResourceBound {
                session_id: id,
                full_jid: FullJid::new(full),
                protocol: protocol.clone(),
                contact: None,
                priority: 0,
                client: ClientInfo::default(),
            }),
            Event::from(DevicePresence {
                user: BareJid::new(bare),
                device: full.to_owned(),
                protocol: protocol.clone(),
                available: true,
                show: None,
                status: None,
                priority: 0,
            }),
        ] {
            let topic = match event {
                Event::DevicePresence(_) => Topic::Presence,
                _ => Topic::Sessions,
            };
            let envelope = Envelope::new(NodeId::new(node), bare, event);
            bus.produce(
                &full_name(PREFIX, topic),
                bare.as_bytes(),
                Some(&envelope.to_json_vec().expect("encode")),
            )
            .await
            .expect("produce");
        }
    }
    // The roster (and, by the table's barrier, the sessions) are read once
    // a later roster request is answered.
    produce(&bus, Topic::Roster, ALICE, query("fan-q", None)).await;
    wait_delivery(&bus, &["id='fan-q'", "type='result'"]).await;
    let composed: ComposedPresence = serde_json::from_value(serde_json::json!({
        "user": ALICE, "availability": "available", "status": "fan-out check", "sources": [],
    }))
    .expect("composed presence");
    assert_eq!(composed.availability, Availability::Available);
    produce(&bus, Topic::PresenceState, ALICE, composed).await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let batches = loop {
        let batches: Vec<(String, switchboard_schemas::events::PresenceDelivery)> =
            read_events(&bus, &full_name(PREFIX, Topic::Deliveries))
                .await
                .into_iter()
                .filter_map(|e| match e.event {
                    Event::PresenceDelivery(d) if d.stanza.contains("fan-out check") => {
                        Some((e.subject.clone(), d))
                    }
                    _ => None,
                })
                .collect();
        if batches.iter().map(|(_, d)| d.targets.len()).sum::<usize>() >= 3 {
            break batches;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no fan-out: {batches:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut by_node: Vec<(String, Vec<String>)> = batches
        .iter()
        .map(|(node, d)| {
            let mut to: Vec<String> = d.targets.iter().map(|t| t.to.clone()).collect();
            to.sort();
            (node.clone(), to)
        })
        .collect();
    by_node.sort();
    assert_eq!(
        by_node,
        [
            (
                "gw1".to_owned(),
                vec![
                    "bob@example.com/phone".to_owned(),
                    "carol@example.com/desk".to_owned()
                ]
            ),
            ("gw2".to_owned(), vec!["dave@example.com/pc".to_owned()]),
        ]
    );
    let (_, gw2) = batches.iter().find(|(n, _)| n == "gw2").unwrap();
    assert_eq!(gw2.targets[0].session_id, ids["dave@example.com/pc"]);
    assert_eq!(
        gw2.stanza_for(&gw2.targets[0].to),
        "<presence to='dave@example.com/pc' from='alice@example.com'><status>fan-out check</status></presence>"
    );
    running.stop().await;
}
