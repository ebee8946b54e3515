//! RFC 6121 §2-3: roster items and the presence subscription handshake.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use uuid::Uuid;

use crate::address::{BareJid, FullJid};
use crate::macros::string_enum;

string_enum! {
    /// The presence subscription state of a roster item (RFC 6121 §2.1.2.5).
    pub enum Subscription {
        /// Neither side sees the other.
        None = "none",
        /// The owner sees the contact.
        To = "to",
        /// The contact sees the owner.
        From = "from",
        /// Both see each other.
        Both = "both",
    }
}

/// A roster item was added or changed; carries the whole item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RosterItemSet {
    /// The roster owner.
    pub user: BareJid,
    /// The contact.
    pub contact: BareJid,
    /// The owner's name for the contact.
    #[serde(default)]
    pub name: Option<String>,
    /// Groups, sorted and unique.
    #[serde(default)]
    pub groups: Vec<String>,
    /// The subscription state.
    pub subscription: Subscription,
    /// Whether the owner's subscription request is pending (`ask="subscribe"`).
    #[serde(default)]
    pub ask: bool,
    /// Whether the owner pre-approved the contact's subscription (RFC 6121
    /// §3.4, `approved="true"`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub approved: bool,
}

/// A roster item was removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RosterItemRemoved {
    /// The roster owner.
    pub user: BareJid,
    /// The removed contact.
    pub contact: BareJid,
}

/// A client asked for its roster (RFC 6121 §2.1.3); the roster processor
/// answers the asking session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RosterQueried {
    /// The roster owner.
    pub user: BareJid,
    /// The asking session's address.
    pub device: FullJid,
    /// The asking session (on the envelope's node).
    pub session_id: Uuid,
    /// The request id to answer.
    pub iq_id: String,
    /// The roster version the client has cached (RFC 6121 §2.6), if any.
    #[serde(default)]
    pub version: Option<String>,
}

/// A client asked to add, change or remove a roster item (RFC 6121 §2.3,
/// §2.5); the roster processor decides and answers the asking session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RosterUpdateRequested {
    /// The roster owner.
    pub user: BareJid,
    /// The asking session's address.
    pub device: FullJid,
    /// The asking session (on the envelope's node).
    pub session_id: Uuid,
    /// The request id to answer.
    pub iq_id: String,
    /// The contact.
    pub contact: BareJid,
    /// The owner's name for the contact.
    #[serde(default)]
    pub name: Option<String>,
    /// Groups, sorted and unique.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Remove the item (`subscription="remove"`).
    #[serde(default)]
    pub remove: bool,
}

/// A user set their vCard (XEP-0054 §3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VcardSet {
    /// The user.
    pub user: BareJid,
    /// The `<vCard xmlns='vcard-temp'>` element as XML (size-limited by the
    /// gateway).
    pub vcard: String,
}

/// A client asked for a user's vCard (XEP-0054 §3.1, §3.3); keyed by the
/// owner of the vCard so the processor holding it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VcardQueried {
    /// Whose vCard.
    pub owner: BareJid,
    /// The asking session's address.
    pub device: FullJid,
    /// The asking session (on the envelope's node).
    pub session_id: Uuid,
    /// The request id to answer.
    pub iq_id: String,
}

/// A client asked for its block list (XEP-0191 §3.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BlocklistQueried {
    /// The user.
    pub user: BareJid,
    /// The asking session's address.
    pub device: FullJid,
    /// The asking session (on the envelope's node).
    pub session_id: Uuid,
    /// The request id to answer.
    pub iq_id: String,
}

/// A client asked to block or unblock addresses (XEP-0191 §3.3, §3.4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BlocklistChangeRequested {
    /// The user.
    pub user: BareJid,
    /// The asking session's address.
    pub device: FullJid,
    /// The asking session (on the envelope's node).
    pub session_id: Uuid,
    /// The request id to answer.
    pub iq_id: String,
    /// Block (true) or unblock (false).
    pub block: bool,
    /// Users or domains; an empty unblock unblocks everything (§3.5).
    #[serde(default)]
    pub items: Vec<super::PolicyItem>,
}

macro_rules! subscription_event {
    ($(#[doc = $doc:literal])+ $name:ident) => {
        $(#[doc = $doc])+
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
        pub struct $name {
            /// The user acting.
            pub from: BareJid,
            /// The other user.
            pub to: BareJid,
            /// Optional text from the acting user.
            #[serde(default)]
            pub status: Option<String>,
        }
    };
}

subscription_event! {
    /// `from` asks to see `to`'s presence (`<presence type="subscribe"/>`).
    SubscriptionRequested
}

subscription_event! {
    /// `from` allows `to` to see `from`'s presence (`type="subscribed"`).
    SubscriptionApproved
}

subscription_event! {
    /// `from` denies or revokes `to`'s subscription to `from`'s presence
    /// (`type="unsubscribed"`).
    SubscriptionDenied
}

subscription_event! {
    /// `from` stops watching `to`'s presence (`type="unsubscribe"`).
    SubscriptionCancelled
}
