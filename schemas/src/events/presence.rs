//! RFC 6121 §4 (presence), RFC 3863/4480 (PIDF, RPID): presence inputs and
//! composed presence.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Protocol;
use crate::address::BareJid;
use crate::macros::string_enum;

string_enum! {
    /// The XMPP `<show/>` value (RFC 6121 §4.7.2.1); absent means online.
    pub enum Show {
        /// Actively interested in chatting.
        Chat = "chat",
        /// Temporarily away.
        Away = "away",
        /// Away for an extended period.
        Xa = "xa",
        /// Do not disturb.
        Dnd = "dnd",
    }
}

string_enum! {
    /// A status a user chooses by hand; it overrides system presence.
    pub enum ManualState {
        /// Available.
        Available = "available",
        /// Away.
        Away = "away",
        /// Do not disturb.
        Dnd = "dnd",
        /// Appear offline (XEP-0126).
        Invisible = "invisible",
    }
}

string_enum! {
    /// Why a manual status was cleared.
    pub enum ManualStatusClearReason {
        /// The user cleared it.
        UserCleared = "user_cleared",
        /// Its expiry passed.
        Expired = "expired",
        /// The user signed out of all devices.
        SignedOut = "signed_out",
    }
}

string_enum! {
    /// The state of a phone line appearance.
    pub enum LineState {
        /// Idle.
        OnHook = "on_hook",
        /// In a call.
        OffHook = "off_hook",
        /// Ringing.
        Ringing = "ringing",
        /// A call is on hold.
        Held = "held",
    }
}

string_enum! {
    /// A user's composed availability as shown to watchers.
    pub enum Availability {
        /// Available.
        Available = "available",
        /// Away or idle.
        Away = "away",
        /// Do not disturb.
        Dnd = "dnd",
        /// On the phone.
        OnCall = "on_call",
        /// In a meeting (calendar).
        InMeeting = "in_meeting",
        /// No available device.
        Unavailable = "unavailable",
    }
}

string_enum! {
    /// A kind of presence input folded into composed presence.
    pub enum PresenceSource {
        /// A manual status.
        Manual = "manual",
        /// A device (XMPP resource or SIP registration/publication).
        Device = "device",
        /// A phone line.
        Phone = "phone",
        /// A calendar.
        Calendar = "calendar",
        /// A third-party application.
        ThirdParty = "third_party",
    }
}

/// A device's presence changed: an XMPP resource's broadcast presence or a
/// SIP PUBLISH/registration state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DevicePresence {
    /// The user.
    pub user: BareJid,
    /// The device: a full JID for XMPP, the `Contact` URI for SIP.
    pub device: String,
    /// The device's protocol.
    pub protocol: Protocol,
    /// Whether the device is available.
    pub available: bool,
    /// The `<show/>` value; absent means online.
    #[serde(default)]
    pub show: Option<Show>,
    /// Free-text status.
    #[serde(default)]
    pub status: Option<String>,
    /// Priority (-128..127).
    #[serde(default)]
    pub priority: i8,
}

/// A session sent presence to one address (RFC 6121 §4.6 directed
/// presence); keyed by the sender's bare JID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DirectedPresence {
    /// The sending session.
    pub from: crate::address::FullJid,
    /// The addressee: a bare or full JID.
    pub to: String,
    /// Available (true) or unavailable presence.
    pub available: bool,
    /// The presence stanza as sent, with `from` set by the server.
    pub stanza: String,
}

/// A user set a manual status (one at a time; replaces the previous one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ManualStatusSet {
    /// The user.
    pub user: BareJid,
    /// The chosen state.
    pub state: ManualState,
    /// Free-text status.
    #[serde(default)]
    pub text: Option<String>,
    /// When the status expires by itself.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// A user's manual status was cleared; system presence applies again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ManualStatusCleared {
    /// The user.
    pub user: BareJid,
    /// Why.
    pub reason: ManualStatusClearReason,
}

/// A phone line's state changed (PUBLISH from call control for a line
/// appearance).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PhoneLineState {
    /// The user the line belongs to.
    pub user: BareJid,
    /// The line appearance id, e.g. the directory number.
    pub line_id: String,
    /// The line state.
    pub state: LineState,
}

/// A user's calendar busy state changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CalendarState {
    /// The user.
    pub user: BareJid,
    /// Whether the calendar shows the user busy now.
    pub busy: bool,
    /// When the current busy or free period ends.
    #[serde(default)]
    pub until: Option<DateTime<Utc>>,
}

/// A user's composed presence: the deterministic fold of all presence
/// inputs, as watchers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ComposedPresence {
    /// The user.
    pub user: BareJid,
    /// The composed availability.
    pub availability: Availability,
    /// The XMPP `<show/>` value watchers receive; absent means online.
    #[serde(default)]
    pub show: Option<Show>,
    /// The status text watchers receive.
    #[serde(default)]
    pub status: Option<String>,
    /// The kinds of input that contributed (sorted, unique).
    #[serde(default)]
    pub sources: PresenceSources,
}

/// The kinds of input behind a composed presence: a set (sorted, unique;
/// on the wire an array, as a `BTreeSet` was), kept in a vector. Every
/// composed presence held in memory (the composer's per user, the roster
/// processor's, the router's) has one; as a `BTreeSet` each allocated an
/// eleven-entry node of 272 bytes for its one or two entries, about 1 KiB
/// per online user across the processors (BENCHMARKS.md, idle sessions).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct PresenceSources(Vec<PresenceSource>);

impl PresenceSources {
    /// No source.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Adds a source; false if it was there.
    pub fn insert(&mut self, source: PresenceSource) -> bool {
        match self.0.binary_search(&source) {
            Ok(_) => false,
            Err(at) => {
                self.0.insert(at, source);
                true
            }
        }
    }

    /// Whether `source` is in the set.
    pub fn contains(&self, source: &PresenceSource) -> bool {
        self.0.binary_search(source).is_ok()
    }

    /// Whether no source contributed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The sources, in order.
    pub fn iter(&self) -> std::slice::Iter<'_, PresenceSource> {
        self.0.iter()
    }
}

impl FromIterator<PresenceSource> for PresenceSources {
    fn from_iter<I: IntoIterator<Item = PresenceSource>>(iter: I) -> Self {
        let mut sources: Vec<PresenceSource> = iter.into_iter().collect();
        sources.sort_unstable();
        sources.dedup();
        Self(sources)
    }
}

impl<const N: usize> From<[PresenceSource; N]> for PresenceSources {
    fn from(sources: [PresenceSource; N]) -> Self {
        sources.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a PresenceSources {
    type Item = &'a PresenceSource;
    type IntoIter = std::slice::Iter<'a, PresenceSource>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// Decoded as a set: in order, each once, whatever the array's order.
impl<'de> Deserialize<'de> for PresenceSources {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Vec::<PresenceSource>::deserialize(deserializer).map(|v| v.into_iter().collect())
    }
}

/// The schema of the set it stands for (an array of unique items).
impl JsonSchema for PresenceSources {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        <BTreeSet<PresenceSource> as JsonSchema>::schema_name()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        <BTreeSet<PresenceSource> as JsonSchema>::json_schema(generator)
    }

    fn inline_schema() -> bool {
        <BTreeSet<PresenceSource> as JsonSchema>::inline_schema()
    }
}

/// A third-party application's presence input changed (e.g. a screen-share
/// or conferencing tool reporting that the user is presenting). One state
/// per `(user, application)`; a later event for the same application
/// replaces the earlier one, and `availability` absent withdraws it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ThirdPartyPresence {
    /// The user.
    pub user: BareJid,
    /// The reporting application's identifier, e.g. `webex`.
    pub application: String,
    /// The availability the application asserts; absent withdraws its input.
    #[serde(default)]
    pub availability: Option<Availability>,
    /// Free-text status the application suggests.
    #[serde(default)]
    pub status: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_a_set_on_the_wire_and_in_memory() {
        let decoded: PresenceSources =
            serde_json::from_str(r#"["phone","device","phone","x_new","calendar"]"#)
                .expect("decode");
        let as_set: BTreeSet<PresenceSource> =
            serde_json::from_str(r#"["phone","device","phone","x_new","calendar"]"#)
                .expect("decode as a set");
        // Same order and members as the set, and encoded as the set is.
        assert_eq!(
            decoded.iter().cloned().collect::<Vec<_>>(),
            as_set.iter().cloned().collect::<Vec<_>>()
        );
        assert_eq!(
            serde_json::to_string(&decoded).expect("encode"),
            serde_json::to_string(&as_set).expect("encode the set")
        );
        let mut sources = PresenceSources::from([PresenceSource::Manual]);
        assert!(sources.insert(PresenceSource::Device));
        assert!(!sources.insert(PresenceSource::Manual));
        assert!(sources.contains(&PresenceSource::Device));
        assert!(!sources.contains(&PresenceSource::Phone));
        assert_eq!(
            serde_json::to_string(&sources).expect("encode"),
            r#"["manual","device"]"#
        );
    }
}
