//! Deliveries: stanzas addressed to the gateway node holding a session.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Protocol;
use crate::address::FullJid;

/// A stanza to write to one session. The envelope subject is the id of the
/// gateway node holding the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StanzaDelivery {
    /// The target session.
    pub session_id: Uuid,
    /// The target session's address: a full JID, or the SIP `Contact` URI.
    pub to: String,
    /// The target session's protocol.
    pub protocol: Protocol,
    /// The XMPP stanza to deliver (XML); the SIP gateway translates it
    /// (RFC 7572 messages, RFC 8048 presence).
    pub stanza: String,
    /// The stable id of the message delivered, for acknowledgement and
    /// duplicate suppression.
    #[serde(default)]
    pub message_id: Option<String>,
    /// The original sender of a routed chat or normal message. Set when the
    /// message must not be lost: a gateway that cannot hand it to the
    /// session returns it as `message.undelivered`. Absent for errors,
    /// headlines and other stanzas that are dropped instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<FullJid>,
    /// SPEC.md §7 active client: for a message with a body, whether the
    /// user is to be notified on this session — it is the user's active
    /// client (the last to send available presence or a message within
    /// the window, 5 minutes by default), or no client is active. A
    /// gateway holding the session in quiet mode (XEP-0352) flushes its
    /// buffer for `true` and may keep buffering for `false`. Absent: not
    /// decided (body-less stanzas, presence, older routers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<bool>,
}
