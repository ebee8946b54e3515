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

/// Composed presence for many sessions of one gateway node in one record
/// (RFC 6121 §4.2.2 and §4.4.2 fan-out): a status change seen by hundreds
/// of watchers is one record per node and stanza variant, not one per
/// watcher session. The envelope subject is the gateway node's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PresenceDelivery {
    /// The presence stanza without its `to` attribute; each target gets
    /// it with its own (see [`PresenceDelivery::stanza_for`]).
    pub stanza: String,
    /// The sessions to write it to.
    pub targets: Vec<DeliveryTarget>,
}

/// One session a [`PresenceDelivery`] goes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DeliveryTarget {
    /// The session.
    pub session_id: Uuid,
    /// Its full JID.
    pub to: String,
}

impl PresenceDelivery {
    /// The stanza for `to`: the `to` attribute (XML-escaped) added to the
    /// first element's start tag, after its name.
    pub fn stanza_for(&self, to: &str) -> String {
        let mut out = String::with_capacity(self.stanza.len() + to.len() + 8);
        let name_end = self
            .stanza
            .char_indices()
            .skip(1)
            .find(|(_, c)| c.is_whitespace() || *c == '/' || *c == '>')
            .map_or(self.stanza.len(), |(i, _)| i);
        out.push_str(&self.stanza[..name_end]);
        out.push_str(" to='");
        crate::xml::escape_into(&mut out, to);
        out.push('\'');
        out.push_str(&self.stanza[name_end..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_target_gets_its_own_to() {
        let d = PresenceDelivery {
            stanza: "<presence from='a@x'><show>away</show></presence>".to_owned(),
            targets: Vec::new(),
        };
        assert_eq!(
            d.stanza_for("b@x/r'1"),
            "<presence to='b@x/r&apos;1' from='a@x'><show>away</show></presence>"
        );
        let empty = PresenceDelivery {
            stanza: "<presence/>".to_owned(),
            targets: Vec::new(),
        };
        assert_eq!(empty.stanza_for("b@x/r"), "<presence to='b@x/r'/>");
    }
}
