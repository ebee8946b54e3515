//! The envelope every event travels in.
//!
//! JSON shape (flat and stable; field order as produced):
//!
//! ```json
//! {"id":"0196…","type":"message.submitted","version":1,
//!  "occurred_at":"2026-01-05T09:30:00.123456Z","node":"node1",
//!  "subject":"alice@example.com","causation_id":null,
//!  "correlation_id":"0196…","payload":{…}}
//! ```
//!
//! `type` and `version` select the payload struct from the
//! [`catalogue`](crate::catalogue). An unknown pair decodes into
//! [`Event::Unknown`] and re-encodes unchanged; unknown top-level or payload
//! fields are ignored (additive changes never break a consumer). Encoding a
//! known event again drops unknown payload fields.

use std::fmt;

use chrono::{DateTime, SubsecRound, Utc};
use schemars::JsonSchema;
use serde::de::Error as _;
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::address::NodeId;
use crate::events::Event;
use crate::topics::Topic;

/// An event with its metadata: the unit written to and read from topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique event id, a UUIDv7 (time-ordered).
    pub id: Uuid,
    /// When the event happened, UTC, microsecond precision.
    pub occurred_at: DateTime<Utc>,
    /// The node that produced the event.
    pub node: NodeId,
    /// The entity the event is about: a bare user address, a room address,
    /// a node id or a setting key. It is the Kafka record key.
    pub subject: String,
    /// The id of the event that directly caused this one.
    pub causation_id: Option<Uuid>,
    /// The id of the first event of the causal chain.
    pub correlation_id: Option<Uuid>,
    /// The event.
    pub event: Event,
}

impl Envelope {
    /// A new root event: fresh UUIDv7 id, occurred now, no causation or
    /// correlation.
    pub fn new(node: NodeId, subject: impl Into<String>, event: impl Into<Event>) -> Self {
        Self {
            id: Uuid::now_v7(),
            occurred_at: Utc::now().trunc_subsecs(6),
            node,
            subject: subject.into(),
            causation_id: None,
            correlation_id: None,
            event: event.into(),
        }
    }

    /// A new event caused by `parent`: causation is `parent.id`, correlation
    /// is `parent`'s correlation, or `parent.id` if it was a root.
    pub fn caused_by(
        parent: &Envelope,
        node: NodeId,
        subject: impl Into<String>,
        event: impl Into<Event>,
    ) -> Self {
        Self {
            causation_id: Some(parent.id),
            correlation_id: Some(parent.correlation_id.unwrap_or(parent.id)),
            ..Self::new(node, subject, event)
        }
    }

    /// The topic of the event (see [`Event::topic`]).
    pub fn topic(&self) -> Option<Topic> {
        self.event.topic()
    }

    /// Encodes the envelope as JSON.
    pub fn to_json_vec(&self) -> Result<Vec<u8>, EnvelopeError> {
        serde_json::to_vec(self).map_err(EnvelopeError::Encode)
    }

    /// Decodes an envelope from JSON.
    pub fn from_json_slice(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        serde_json::from_slice(bytes).map_err(EnvelopeError::Decode)
    }
}

/// An envelope could not be encoded or decoded.
#[derive(Debug)]
pub enum EnvelopeError {
    /// Encoding failed.
    Encode(serde_json::Error),
    /// The bytes are not an envelope, or a known event's payload does not
    /// match its type. Not retriable.
    Decode(serde_json::Error),
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Encode(error) => write!(f, "cannot encode event envelope: {error}"),
            Self::Decode(error) => write!(f, "cannot decode event envelope: {error}"),
        }
    }
}

impl std::error::Error for EnvelopeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Encode(error) | Self::Decode(error) => Some(error),
        }
    }
}

/// The wire form: decoded first with a raw payload, then the payload is
/// selected by `(type, version)`. Its schema (with `P` replaced by the
/// payload's) is the published envelope schema.
#[derive(Deserialize, JsonSchema)]
pub(crate) struct WireEnvelope<P> {
    /// Unique event id, a UUIDv7 (time-ordered); consumers deduplicate on it.
    id: Uuid,
    /// The event type, `family.name`; with `version` it selects the payload
    /// schema.
    #[serde(rename = "type")]
    event_type: String,
    /// The payload version of this event type.
    version: u32,
    /// When the event happened (RFC 3339, UTC).
    #[serde(deserialize_with = "rfc3339")]
    occurred_at: DateTime<Utc>,
    /// The node that produced the event.
    node: NodeId,
    /// The entity the event is about: a bare user address, a room address, a
    /// node id or a setting key. It is the Kafka record key.
    subject: String,
    /// The id of the event that directly caused this one.
    #[serde(default)]
    causation_id: Option<Uuid>,
    /// The id of the first event of the causal chain.
    #[serde(default)]
    correlation_id: Option<Uuid>,
    /// The event payload.
    payload: P,
}

/// An RFC 3339 timestamp (RFC 3339 §5.6, the schema's `date-time`) by
/// chrono's RFC 3339 parser: chrono's `FromStr`, which serde uses for a
/// `DateTime`, goes through its general format interpreter, about 1 % of
/// the server's CPU in an XMPP message burst (every consumer decodes every
/// envelope).
fn rfc3339<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    struct Rfc3339;

    impl serde::de::Visitor<'_> for Rfc3339 {
        type Value = DateTime<Utc>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an RFC 3339 date-time")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| E::custom(format_args!("invalid RFC 3339 date-time {text:?}: {e}")))
        }
    }

    deserializer.deserialize_str(Rfc3339)
}

impl Serialize for Envelope {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Payload<'a>(&'a Event);

        impl Serialize for Payload<'_> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                self.0.serialize_payload(serializer)
            }
        }

        let mut state = serializer.serialize_struct("Envelope", 9)?;
        state.serialize_field("id", &self.id)?;
        state.serialize_field("type", self.event.event_type())?;
        state.serialize_field("version", &self.event.version())?;
        state.serialize_field("occurred_at", &self.occurred_at)?;
        state.serialize_field("node", &self.node)?;
        state.serialize_field("subject", &self.subject)?;
        state.serialize_field("causation_id", &self.causation_id)?;
        state.serialize_field("correlation_id", &self.correlation_id)?;
        state.serialize_field("payload", &Payload(&self.event))?;
        state.end()
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // The payload is kept as its JSON text until the type and version
        // (anywhere in the object) are known.
        let wire = WireEnvelope::<Box<serde_json::value::RawValue>>::deserialize(deserializer)?;
        let event = Event::from_payload_json(&wire.event_type, wire.version, wire.payload.get())
            .map_err(|error| {
                D::Error::custom(format_args!(
                    "invalid payload for {} v{}: {error}",
                    wire.event_type, wire.version
                ))
            })?;
        Ok(Self {
            id: wire.id,
            occurred_at: wire.occurred_at,
            node: wire.node,
            subject: wire.subject,
            causation_id: wire.causation_id,
            correlation_id: wire.correlation_id,
            event,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::BareJid;
    use crate::events::{ManualStatusClearReason, ManualStatusCleared};

    fn cleared() -> ManualStatusCleared {
        ManualStatusCleared {
            user: BareJid::new("alice@example.com"),
            reason: ManualStatusClearReason::SignedOut,
        }
    }

    #[test]
    fn caused_by_chains_causation_and_correlation() {
        let node = NodeId::new("node1");
        let root = Envelope::new(node.clone(), "alice@example.com", cleared());
        assert_eq!((root.causation_id, root.correlation_id), (None, None));
        assert_eq!(root.id.get_version_num(), 7);
        let child = Envelope::caused_by(&root, node.clone(), "alice@example.com", cleared());
        assert_eq!(child.causation_id, Some(root.id));
        assert_eq!(child.correlation_id, Some(root.id));
        let grandchild = Envelope::caused_by(&child, node, "alice@example.com", cleared());
        assert_eq!(grandchild.causation_id, Some(child.id));
        assert_eq!(grandchild.correlation_id, Some(root.id));
        assert_eq!(grandchild.topic(), Some(Topic::Presence));
    }

    #[test]
    fn json_round_trip() {
        let envelope = Envelope::new(NodeId::new("node1"), "alice@example.com", cleared());
        let bytes = envelope.to_json_vec().unwrap();
        assert_eq!(Envelope::from_json_slice(&bytes).unwrap(), envelope);
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["type"], "presence.manual_status_cleared");
        assert_eq!(value["version"], 1);
        assert_eq!(value["payload"]["reason"], "signed_out");
    }

    /// `occurred_at` is read as RFC 3339 §5.6 `date-time`: any offset
    /// (converted to UTC), fractions of a second, an escaped string; a time
    /// that is not RFC 3339 is an error naming it.
    #[test]
    fn occurred_at_is_rfc3339() {
        let at = |t: &str| {
            let json = format!(
                r#"{{"id":"0196a5d2-7c3e-7000-8000-000000000001","type":"presence.manual_status_cleared",
                "version":1,"occurred_at":"{t}","node":"node1","subject":"alice@example.com",
                "payload":{{"user":"alice@example.com","reason":"signed_out"}}}}"#
            );
            Envelope::from_json_slice(json.as_bytes()).map(|e| e.occurred_at.to_rfc3339())
        };
        assert_eq!(
            at("2026-01-05T09:30:00Z").unwrap(),
            "2026-01-05T09:30:00+00:00"
        );
        assert_eq!(
            at("2026-01-05T11:30:00.123456+02:00").unwrap(),
            "2026-01-05T09:30:00.123456+00:00"
        );
        assert_eq!(
            at(r"2026-01-05T09:30:00\u005A").unwrap(),
            "2026-01-05T09:30:00+00:00"
        );
        for bad in ["2026-01-05", "2026-13-05T09:30:00Z", "yesterday", ""] {
            let message = at(bad).unwrap_err().to_string();
            assert!(message.contains("RFC 3339"), "{bad}: {message}");
        }
    }

    #[test]
    fn malformed_known_payload_is_an_error() {
        let json = br#"{"id":"0196a5d2-7c3e-7000-8000-000000000001","type":"presence.manual_status_cleared",
            "version":1,"occurred_at":"2026-01-05T09:30:00Z","node":"node1",
            "subject":"alice@example.com","payload":{"user":42}}"#;
        let error = Envelope::from_json_slice(json).unwrap_err();
        assert!(matches!(error, EnvelopeError::Decode(_)));
        let message = error.to_string();
        assert!(
            message.contains("presence.manual_status_cleared v1"),
            "{message}"
        );
    }
}
