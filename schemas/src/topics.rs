//! The topic catalogue: every Kafka topic, its key, retention and who
//! produces and consumes it.
//!
//! Topic names are prefixed per cluster: [`full_name`]`("switchboard",
//! Topic::Messages)` is `switchboard.messages`. Every record value is an
//! [`Envelope`](crate::Envelope) in JSON and every record key is the
//! envelope's `subject`, so the events about one user, room, node or setting
//! are totally ordered within their partition.

use serde::{Deserialize, Serialize};

/// The default topic name prefix.
pub const DEFAULT_PREFIX: &str = "switchboard";

/// The full topic name `"{prefix}.{name}"`.
pub fn full_name(prefix: &str, topic: Topic) -> String {
    format!("{prefix}.{}", topic.name())
}

/// Every topic of the catalogue, in [`Topic`] declaration order.
pub fn topics() -> &'static [TopicSpec] {
    TOPICS
}

/// A topic of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Topic {
    /// Logins, bound resources, session ends, node heartbeats.
    Sessions,
    /// Presence inputs: devices, manual status, phone lines, calendars.
    Presence,
    /// Roster items and subscription handshakes.
    Roster,
    /// One-to-one messages and their delivery outcome.
    Messages,
    /// Group-chat rooms: lifecycle, occupants, messages.
    Rooms,
    /// Managed file transfers.
    Files,
    /// User provisioning and lifecycle.
    Admin,
    /// Per-gateway-node deliveries to connected sessions.
    Deliveries,
    /// Compacted: the latest record per user.
    Users,
    /// Compacted: the latest value per setting.
    Settings,
    /// Compacted: the latest composed presence per user.
    PresenceState,
}

impl Topic {
    /// The topic's specification.
    pub fn spec(self) -> &'static TopicSpec {
        &TOPICS[self as usize]
    }

    /// The unprefixed name, e.g. `"messages"`.
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The topic with this unprefixed name.
    pub fn from_name(name: &str) -> Option<Self> {
        TOPICS
            .iter()
            .find(|spec| spec.name == name)
            .map(|spec| spec.topic)
    }
}

/// How Kafka discards old records of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cleanup {
    /// Delete records older than the retention (`cleanup.policy=delete`).
    Delete,
    /// Keep the latest record per key (`cleanup.policy=compact`).
    Compact,
}

impl Cleanup {
    /// The Kafka `cleanup.policy` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delete => "delete",
            Self::Compact => "compact",
        }
    }
}

/// A component of the system that produces or consumes topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    /// The XMPP gateway (client connections, BOSH/WebSocket later).
    XmppGateway,
    /// The SIP/SIMPLE gateway.
    SipGateway,
    /// The HTTP front: file upload/download, admin and compliance API.
    HttpApi,
    /// Composes per-user presence from its inputs.
    PresenceProcessor,
    /// Routes messages to sessions, offline storage or bounces.
    Router,
    /// Rosters, subscriptions and presence authorization.
    RosterProcessor,
    /// Group-chat rooms.
    RoomProcessor,
    /// Managed file transfer bookkeeping.
    FileProcessor,
    /// SQL projections (archive, compliance log, rosters, transfer log).
    Projections,
    /// The `switchboard user|import|...` command line.
    AdminCli,
    /// Outside analytics consumers (kcat, Kafka Connect, Flink, ...).
    Analytics,
}

impl Component {
    /// The snake_case name, e.g. `"xmpp_gateway"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::XmppGateway => "xmpp_gateway",
            Self::SipGateway => "sip_gateway",
            Self::HttpApi => "http_api",
            Self::PresenceProcessor => "presence_processor",
            Self::Router => "router",
            Self::RosterProcessor => "roster_processor",
            Self::RoomProcessor => "room_processor",
            Self::FileProcessor => "file_processor",
            Self::Projections => "projections",
            Self::AdminCli => "admin_cli",
            Self::Analytics => "analytics",
        }
    }
}

/// The specification of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// The topic.
    pub topic: Topic,
    /// The unprefixed name, e.g. `"messages"`.
    pub name: &'static str,
    /// What the record key (the envelope `subject`) is.
    pub key: &'static str,
    /// Default partition count.
    pub partitions: u32,
    /// Cleanup policy.
    pub cleanup: Cleanup,
    /// Retention in milliseconds; `None` keeps records forever.
    pub retention_ms: Option<i64>,
    /// Components that write the topic.
    pub producers: &'static [Component],
    /// Components that read the topic.
    pub consumers: &'static [Component],
    /// What the topic is for.
    pub description: &'static str,
}

use Component::*;

const LOG_PARTITIONS: u32 = 12;
const USER_KEY: &str = "The bare address of the user the event is about.";

static TOPICS: &[TopicSpec] = &[
    TopicSpec {
        topic: Topic::Sessions,
        name: "sessions",
        key: "The bare address of the user logging in; the node id for node heartbeats.",
        partitions: LOG_PARTITIONS,
        cleanup: Cleanup::Delete,
        retention_ms: None,
        producers: &[XmppGateway, SipGateway, HttpApi],
        consumers: &[PresenceProcessor, Router, Projections, Analytics],
        description: "Login attempts and outcomes, bound resources, session ends and gateway \
                      node heartbeats. Never carries credential material.",
    },
    TopicSpec {
        topic: Topic::Presence,
        name: "presence",
        key: USER_KEY,
        partitions: LOG_PARTITIONS,
        cleanup: Cleanup::Delete,
        retention_ms: None,
        producers: &[XmppGateway, SipGateway, HttpApi],
        consumers: &[PresenceProcessor, Projections, Analytics],
        description: "Presence inputs per user: device presence, manual status, phone line \
                      state and calendar state, folded into composed presence by the presence \
                      processor.",
    },
    TopicSpec {
        topic: Topic::Roster,
        name: "roster",
        key: "The bare address of the roster owner, or of the user acting in a \
              subscription handshake.",
        partitions: LOG_PARTITIONS,
        cleanup: Cleanup::Delete,
        retention_ms: None,
        producers: &[XmppGateway, SipGateway, HttpApi, RosterProcessor, AdminCli],
        consumers: &[RosterProcessor, PresenceProcessor, Projections, Analytics],
        description: "Roster items and the presence subscription handshake (RFC 6121).",
    },
    TopicSpec {
        topic: Topic::Messages,
        name: "messages",
        key: "The bare address of the user the event is about: the sender for submitted \
              and bounced messages, the recipient for delivered, stored and displayed ones.",
        partitions: LOG_PARTITIONS,
        cleanup: Cleanup::Delete,
        retention_ms: None,
        producers: &[XmppGateway, SipGateway, HttpApi, Router],
        consumers: &[Router, Projections, Analytics],
        description: "One-to-one messages as submitted, with the original stanza as \
                      evidence, and their outcome: delivered, stored offline, bounced, \
                      displayed.",
    },
    TopicSpec {
        topic: Topic::Rooms,
        name: "rooms",
        key: "The room address.",
        partitions: LOG_PARTITIONS,
        cleanup: Cleanup::Delete,
        retention_ms: None,
        producers: &[XmppGateway, HttpApi, RoomProcessor],
        consumers: &[RoomProcessor, Projections, Analytics],
        description: "Group-chat rooms (XEP-0045): creation, configuration, joins and \
                      exits, messages, subject, affiliation and role changes, destruction.",
    },
    TopicSpec {
        topic: Topic::Files,
        name: "files",
        key: "The bare address of the uploader or downloader.",
        partitions: LOG_PARTITIONS,
        cleanup: Cleanup::Delete,
        retention_ms: None,
        producers: &[HttpApi, XmppGateway, FileProcessor],
        consumers: &[FileProcessor, Projections, Analytics],
        description: "Managed file transfers (XEP-0363): every upload and download, with \
                      the fields of the file-transfer log.",
    },
    TopicSpec {
        topic: Topic::Admin,
        name: "admin",
        key: "The bare address of the user administered.",
        partitions: LOG_PARTITIONS,
        cleanup: Cleanup::Delete,
        retention_ms: None,
        producers: &[AdminCli, HttpApi],
        consumers: &[RosterProcessor, PresenceProcessor, Projections, Analytics],
        description: "User provisioning and lifecycle: provisioned, credentials changed, \
                      disabled, enabled, deleted. Credentials are salted SCRAM keys only.",
    },
    TopicSpec {
        topic: Topic::Deliveries,
        name: "deliveries",
        key: "The id of the gateway node holding the target session.",
        partitions: LOG_PARTITIONS,
        cleanup: Cleanup::Delete,
        retention_ms: Some(24 * 60 * 60 * 1000),
        producers: &[Router, PresenceProcessor, RosterProcessor, RoomProcessor],
        consumers: &[XmppGateway, SipGateway, HttpApi],
        description: "Stanzas to push to connected sessions, addressed to the gateway node \
                      holding each session. Short retention: a delivery older than a day is \
                      moot.",
    },
    TopicSpec {
        topic: Topic::Users,
        name: "users",
        key: "The user's bare address; a null value (tombstone) deletes the user.",
        partitions: LOG_PARTITIONS,
        cleanup: Cleanup::Compact,
        retention_ms: None,
        producers: &[AdminCli, HttpApi],
        consumers: &[XmppGateway, SipGateway, HttpApi, Projections],
        description: "Compacted: the latest user record per bare address, read by the \
                      gateways to authenticate.",
    },
    TopicSpec {
        topic: Topic::Settings,
        name: "settings",
        key: "The setting key, e.g. `im.offline.max_per_user`.",
        partitions: LOG_PARTITIONS,
        cleanup: Cleanup::Compact,
        retention_ms: None,
        producers: &[AdminCli, HttpApi],
        consumers: &[
            XmppGateway,
            SipGateway,
            HttpApi,
            PresenceProcessor,
            Router,
            RosterProcessor,
            RoomProcessor,
            FileProcessor,
            Projections,
        ],
        description: "Compacted: the latest value per setting key; every component applies \
                      changes live.",
    },
    TopicSpec {
        topic: Topic::PresenceState,
        name: "presence_state",
        key: USER_KEY,
        partitions: LOG_PARTITIONS,
        cleanup: Cleanup::Compact,
        retention_ms: None,
        producers: &[PresenceProcessor],
        consumers: &[Router, HttpApi, Projections, Analytics],
        description: "Compacted: the latest composed presence per user.",
    },
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::catalogue;

    #[test]
    fn topic_specs_follow_declaration_order() {
        for (index, spec) in topics().iter().enumerate() {
            assert_eq!(spec.topic as usize, index, "{}", spec.name);
            assert_eq!(spec.topic.spec(), spec);
            assert_eq!(Topic::from_name(spec.name), Some(spec.topic));
        }
    }

    #[test]
    fn every_event_topic_is_in_the_catalogue() {
        let known: BTreeSet<Topic> = topics().iter().map(|spec| spec.topic).collect();
        for event in catalogue() {
            assert!(known.contains(&event.topic), "{}", event.id());
        }
    }

    #[test]
    fn names_are_unique_and_snake_case() {
        let names: BTreeSet<&str> = topics().iter().map(|spec| spec.name).collect();
        assert_eq!(names.len(), topics().len());
        for name in names {
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            let serialized = serde_json::to_value(Topic::from_name(name).unwrap()).unwrap();
            assert_eq!(serialized, serde_json::json!(name));
        }
    }

    #[test]
    fn compacted_topics_have_no_retention() {
        for spec in topics() {
            if spec.cleanup == Cleanup::Compact {
                assert_eq!(spec.retention_ms, None, "{}", spec.name);
            }
            assert!(spec.partitions > 0);
            assert!(!spec.producers.is_empty() && !spec.consumers.is_empty());
        }
    }

    #[test]
    fn component_names_match_serde() {
        for component in topics()
            .iter()
            .flat_map(|s| s.producers.iter().chain(s.consumers))
        {
            let serialized = serde_json::to_value(component).unwrap();
            assert_eq!(serialized, serde_json::json!(component.as_str()));
        }
    }

    #[test]
    fn full_name_uses_the_prefix() {
        assert_eq!(
            full_name(DEFAULT_PREFIX, Topic::Messages),
            "switchboard.messages"
        );
        assert_eq!(
            full_name("acme", Topic::PresenceState),
            "acme.presence_state"
        );
    }
}
