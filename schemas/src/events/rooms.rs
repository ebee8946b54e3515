//! XEP-0045: multi-user chat rooms.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::address::{BareJid, FullJid, RoomJid};
use crate::macros::string_enum;

string_enum! {
    /// An occupant's role in a room (XEP-0045 §5.1).
    pub enum Role {
        /// May kick, grant voice, change the subject.
        Moderator = "moderator",
        /// May speak.
        Participant = "participant",
        /// Present without voice.
        Visitor = "visitor",
        /// Not present.
        None = "none",
    }
}

string_enum! {
    /// A user's long-lived affiliation with a room (XEP-0045 §5.2).
    pub enum Affiliation {
        /// Owner.
        Owner = "owner",
        /// Administrator.
        Admin = "admin",
        /// Member.
        Member = "member",
        /// Banned.
        Outcast = "outcast",
        /// No affiliation.
        None = "none",
    }
}

/// A room was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RoomCreated {
    /// The room.
    pub room: RoomJid,
    /// The creating user (the first owner).
    pub creator: BareJid,
    /// Whether the room survives being empty.
    pub persistent: bool,
}

/// A room's configuration changed (XEP-0045 §10.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RoomConfigured {
    /// The room.
    pub room: RoomJid,
    /// The owner who changed it; absent for system defaults.
    #[serde(default)]
    pub by: Option<BareJid>,
    /// The complete configuration after the change, by field name
    /// (`muc#roomconfig_*` names without the prefix, e.g. `maxusers`).
    #[serde(default)]
    pub settings: BTreeMap<String, serde_json::Value>,
}

/// An occupant joined a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RoomJoined {
    /// The room.
    pub room: RoomJid,
    /// The occupant's real session address.
    pub occupant: FullJid,
    /// The occupant's nickname in the room.
    pub nick: String,
    /// The role granted.
    pub role: Role,
    /// The occupant's affiliation.
    pub affiliation: Affiliation,
}

/// An occupant left a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RoomLeft {
    /// The room.
    pub room: RoomJid,
    /// The occupant's real session address.
    pub occupant: FullJid,
    /// The occupant's nickname.
    pub nick: String,
    /// The status text of the unavailable presence, if any.
    #[serde(default)]
    pub status: Option<String>,
}

/// An occupant sent a message to the room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RoomMessage {
    /// The room.
    pub room: RoomJid,
    /// The stable message id (XEP-0359).
    pub message_id: String,
    /// The sender's real session address.
    pub from: FullJid,
    /// The sender's nickname.
    pub from_nick: String,
    /// The body text.
    #[serde(default)]
    pub body: Option<String>,
    /// The original stanza as received (XML), kept as evidence.
    pub stanza: String,
}

/// A room's subject changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RoomSubjectChanged {
    /// The room.
    pub room: RoomJid,
    /// The changer's real session address.
    pub by: FullJid,
    /// The changer's nickname.
    pub by_nick: String,
    /// The new subject; empty clears it.
    pub subject: String,
}

/// A user's affiliation with a room changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RoomAffiliationChanged {
    /// The room.
    pub room: RoomJid,
    /// The user whose affiliation changed.
    pub user: BareJid,
    /// The new affiliation.
    pub affiliation: Affiliation,
    /// Who changed it; absent for the system.
    #[serde(default)]
    pub by: Option<BareJid>,
    /// The reason given.
    #[serde(default)]
    pub reason: Option<String>,
}

/// An occupant's role in a room changed (voice, moderation, kick).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RoomRoleChanged {
    /// The room.
    pub room: RoomJid,
    /// The occupant's nickname.
    pub nick: String,
    /// The new role; `none` removes the occupant (kick).
    pub role: Role,
    /// Who changed it; absent for the system.
    #[serde(default)]
    pub by: Option<BareJid>,
    /// The reason given.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A room was destroyed (XEP-0045 §10.9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RoomDestroyed {
    /// The room.
    pub room: RoomJid,
    /// Who destroyed it; absent for the system (e.g. idle timeout).
    #[serde(default)]
    pub by: Option<BareJid>,
    /// The reason given.
    #[serde(default)]
    pub reason: Option<String>,
    /// A room the occupants are invited to move to.
    #[serde(default)]
    pub alternate_venue: Option<RoomJid>,
}
