//! RFC 7622: XMPP addresses (JIDs), and cluster node ids.
//!
//! These are transparent string newtypes: on the wire they are plain JSON
//! strings. They hold **already-normalised** values: validation and
//! normalisation (RFC 7622 case folding of localpart and domain, XEP-0106
//! escaping, length limits) happen once, in the gateway, before an event is
//! produced. Constructors here do not check anything, so a consumer never
//! rejects an event because its own rules are older or stricter.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

macro_rules! address {
    ($(#[doc = $doc:literal])+ $name:ident) => {
        $(#[doc = $doc])+
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps an already-normalised value (not validated here).
            pub fn new(value: impl Into<String>) -> Self {
                Self(value.into())
            }

            /// The address as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// The address as an owned string.
            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "description": crate::macros::doc_text(&[$($doc),+]),
                })
            }
        }
    };
}

address! {
    /// A bare JID `localpart@domain` identifying a user (RFC 7622 §3),
    /// normalised by the gateway.
    BareJid
}

address! {
    /// A full JID `localpart@domain/resource` identifying one session of a
    /// user (RFC 7622 §3), normalised by the gateway; the resource may
    /// itself contain `/`.
    FullJid
}

address! {
    /// A group-chat room address `room@service` (XEP-0045), normalised by the
    /// gateway.
    RoomJid
}

address! {
    /// The id of a cluster node (a gateway or processor instance), e.g.
    /// `node1`; unique within a cluster.
    NodeId
}

impl FullJid {
    /// The bare part: everything before the first `/` (RFC 7622: the
    /// resource is everything after it).
    pub fn bare(&self) -> BareJid {
        BareJid::new(
            self.0
                .split_once('/')
                .map_or(self.as_str(), |(bare, _)| bare),
        )
    }

    /// The resource: everything after the first `/`, if any.
    pub fn resource(&self) -> Option<&str> {
        self.0.split_once('/').map(|(_, resource)| resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_jid_splits_at_the_first_slash() {
        let jid = FullJid::new("alice@example.com/laptop/work");
        assert_eq!(jid.bare(), BareJid::new("alice@example.com"));
        assert_eq!(jid.resource(), Some("laptop/work"));
        let no_resource = FullJid::new("alice@example.com");
        assert_eq!(no_resource.bare().as_str(), "alice@example.com");
        assert_eq!(no_resource.resource(), None);
    }

    #[test]
    fn addresses_are_plain_json_strings() {
        let jid = BareJid::new("bob@example.com");
        assert_eq!(
            serde_json::to_value(&jid).unwrap(),
            serde_json::json!("bob@example.com")
        );
        let back: BareJid = serde_json::from_str("\"bob@example.com\"").unwrap();
        assert_eq!(back, jid);
        assert_eq!(jid.to_string(), "bob@example.com");
    }
}
