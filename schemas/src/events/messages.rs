//! RFC 6121 §5 (messages), XEP-0359 (stable ids), XEP-0160 (offline),
//! XEP-0333 (displayed markers), RFC 3428 (SIP MESSAGE): one-to-one messages.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use uuid::Uuid;

use crate::address::{BareJid, FullJid};
use crate::macros::string_enum;

string_enum! {
    /// The message type (RFC 6121 §5.2.2).
    pub enum MessageKind {
        /// One-to-one chat.
        Chat = "chat",
        /// A standalone message.
        Normal = "normal",
        /// An alert that expects no reply.
        Headline = "headline",
        /// A group-chat message.
        Groupchat = "groupchat",
        /// An error reply.
        Error = "error",
    }
}

string_enum! {
    /// Why a message bounced.
    pub enum BounceReason {
        /// No session, and offline storage is off or suppressed.
        RecipientUnavailable = "recipient_unavailable",
        /// The recipient's or node's offline queue is full.
        OfflineLimit = "offline_limit",
        /// The recipient blocks the sender.
        Blocked = "blocked",
        /// Instant messaging is disabled.
        ImDisabled = "im_disabled",
    }
}

/// A client submitted a message to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageSubmitted {
    /// The stable message id (XEP-0359 origin-id, else the stanza id),
    /// unique per sender; duplicates from redelivery share it.
    pub message_id: String,
    /// The sending session.
    pub from: FullJid,
    /// The addressee as given: a bare or full JID.
    pub to: String,
    /// The message type.
    pub kind: MessageKind,
    /// The body text.
    #[serde(default)]
    pub body: Option<String>,
    /// The conversation thread id.
    #[serde(default)]
    pub thread: Option<String>,
    /// The subject.
    #[serde(default)]
    pub subject: Option<String>,
    /// The original stanza as received (XML), kept as evidence.
    pub stanza: String,
}

/// A message was handed to a recipient session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageDelivered {
    /// The message id.
    pub message_id: String,
    /// The original sender.
    pub from: FullJid,
    /// The receiving session.
    pub to: FullJid,
    /// Whether this was a carbon copy (XEP-0280) rather than the routed copy.
    #[serde(default)]
    pub carbon: bool,
}

/// A message was stored for delivery at the recipient's next login.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageStoredOffline {
    /// The message id.
    pub message_id: String,
    /// The original sender.
    pub from: FullJid,
    /// The recipient.
    pub to: BareJid,
    /// The stanza as submitted, so the store can deliver it later.
    /// Added in v1 without a version change (absent in older records).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stanza: Option<String>,
}

string_enum! {
    /// Why a routed message did not reach a session.
    pub enum UndeliveredReason {
        /// The router found no available session of the recipient: the
        /// recipient's router applies the offline store rules.
        NoSession = "no_session",
        /// The session the router chose ended before the gateway could hand
        /// the message over.
        SessionGone = "session_gone",
        /// The session's outgoing queue was full.
        QueueFull = "queue_full",
        /// The gateway node holding the session stopped heartbeating.
        NodeDown = "node_down",
    }
}

/// A chat or normal message did not reach a session; the router owning the
/// recipient routes it again (another available session) or applies the
/// offline rules (store, or an error to the sender). Keyed by the
/// recipient's bare address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageUndelivered {
    /// The message id.
    pub message_id: String,
    /// The original sender.
    pub from: FullJid,
    /// The addressee: the session's full address, or the bare address.
    pub to: String,
    /// Why.
    pub reason: UndeliveredReason,
    /// The session that did not take it, if one was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Uuid>,
    /// The stanza as it was to be delivered.
    pub stanza: String,
}

/// A message could not be delivered; the sender is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageBounced {
    /// The message id.
    pub message_id: String,
    /// The original sender.
    pub from: FullJid,
    /// The addressee as given.
    pub to: String,
    /// Why.
    pub reason: BounceReason,
    /// Text returned to the sender, e.g. "Your IM could not be delivered."
    #[serde(default)]
    pub text: Option<String>,
}

/// A recipient displayed (read) a message (XEP-0333 `displayed`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageDisplayed {
    /// The id of the message displayed.
    pub message_id: String,
    /// The session that displayed it.
    pub by: FullJid,
    /// The original sender, who is notified.
    pub sender: BareJid,
}

/// A client queried its message archive (XEP-0313 §4, paged with XEP-0059);
/// the archive's responder answers the asking session with one result
/// message per archived message and the final `<fin/>`. The gateway has
/// checked the form: the filters are well-formed and `max` is within the
/// server's page cap. Recorded like the other message events, so archive
/// reads are part of the compliance log when messages are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MessageArchiveQueried {
    /// The archive's owner, who asked (a user reads only their own archive).
    pub user: BareJid,
    /// The asking session's address.
    pub device: FullJid,
    /// The asking session (on the envelope's node).
    pub session_id: Uuid,
    /// The request id to answer.
    pub iq_id: String,
    /// The client's `queryid`, echoed in every result (XEP-0313 §4.1).
    #[serde(default)]
    pub query_id: Option<String>,
    /// Form field `with`: only messages exchanged with this address; a bare
    /// address matches all of its resources, a full address only itself.
    #[serde(default)]
    pub with: Option<String>,
    /// Form field `start`: only messages at or after this time.
    #[serde(default)]
    pub start: Option<DateTime<Utc>>,
    /// Form field `end`: only messages at or before this time.
    #[serde(default)]
    pub end: Option<DateTime<Utc>>,
    /// Form field `after-id`: only messages after this archive id.
    #[serde(default)]
    pub after_id: Option<String>,
    /// Form field `before-id`: only messages before this archive id.
    #[serde(default)]
    pub before_id: Option<String>,
    /// Most results in the page (XEP-0059 `max`, at most the server's cap).
    pub max: u32,
    /// XEP-0059 `after`: the page that follows this archive id.
    #[serde(default)]
    pub page_after: Option<String>,
    /// XEP-0059 `before`: the page that precedes this archive id; an empty
    /// string asks for the last page.
    #[serde(default)]
    pub page_before: Option<String>,
    /// XEP-0313 `flip-page`: the page's results in reverse order.
    #[serde(default)]
    pub flip_page: bool,
}
