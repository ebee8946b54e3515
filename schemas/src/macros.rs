//! Declarative macros that keep the catalogue free of boilerplate.
//!
//! - `string_enum!`: a forward-compatible string enum (known values plus an
//!   `Other(String)` catch-all), serialized as a plain JSON string.
//! - `event_catalogue!`: the [`Event`](crate::Event) enum, its dispatch
//!   methods and the [`catalogue`](crate::catalogue) of descriptors.

/// Joins doc-comment lines into one trimmed description.
pub(crate) fn doc_text(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|line| line.trim())
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

/// Defines a forward-compatible string enum.
///
/// Known values get a variant each; any other string deserializes into
/// `Other(String)` and serializes back unchanged, so an older consumer never
/// rejects a value added later. Construct values with `From<&str>` /
/// `From<String>` so a known string never ends up in `Other`.
macro_rules! string_enum {
    (
        $(#[doc = $doc:literal])+
        pub enum $name:ident {
            $( $(#[doc = $vdoc:literal])+ $variant:ident = $value:literal, )+
        }
    ) => {
        $(#[doc = $doc])+
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $( $(#[doc = $vdoc])+ $variant, )+
            /// A value unknown to this version, kept verbatim.
            Other(String),
        }

        impl $name {
            /// The values known to this version, in declaration order.
            pub const KNOWN: &'static [&'static str] = &[$($value),+];

            /// The wire value.
            pub fn as_str(&self) -> &str {
                match self {
                    $( Self::$variant => $value, )+
                    Self::Other(other) => other,
                }
            }
        }

        impl ::core::convert::From<&str> for $name {
            fn from(value: &str) -> Self {
                match value {
                    $( $value => Self::$variant, )+
                    other => Self::Other(other.to_owned()),
                }
            }
        }

        impl ::core::convert::From<String> for $name {
            fn from(value: String) -> Self {
                match value.as_str() {
                    $( $value => Self::$variant, )+
                    _ => Self::Other(value),
                }
            }
        }

        impl ::core::fmt::Display for $name {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                String::deserialize(deserializer).map(Self::from)
            }
        }

        impl ::schemars::JsonSchema for $name {
            fn schema_name() -> ::std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }

            fn json_schema(_: &mut ::schemars::SchemaGenerator) -> ::schemars::Schema {
                let mut known: Vec<::serde_json::Value> = vec![
                    $( ::serde_json::json!({
                        "const": $value,
                        "description": $crate::macros::doc_text(&[$($vdoc),+]),
                    }), )+
                ];
                known.push(::serde_json::json!({
                    "type": "string",
                    "description": "A value added after this version; consumers must accept it.",
                }));
                ::schemars::json_schema!({
                    "description": $crate::macros::doc_text(&[$($doc),+]),
                    "type": "string",
                    "anyOf": known,
                })
            }
        }
    };
}

/// Defines the event catalogue: one line per (event type, version).
///
/// ```text
/// /// One-line summary (variant doc and catalogue summary).
/// PayloadStruct => "family.name" v 1 on TopicVariant,
/// ```
///
/// Generates the [`Event`](crate::Event) enum (one variant per payload struct
/// plus `Unknown`), `Event::{event_type, version, topic, from_payload_json}`,
/// [`EventPayload`](crate::EventPayload) and `From<Payload> for Event` for
/// every payload, and [`catalogue`](crate::catalogue). A duplicated
/// (type, version) pair is an unreachable-pattern warning (an error under
/// `-D warnings`) and fails the catalogue unit test.
macro_rules! event_catalogue {
    (
        $(
            $(#[doc = $doc:literal])+
            $variant:ident => $type:literal v $version:literal on $topic:ident,
        )+
    ) => {
        /// Every event of the catalogue, plus [`Event::Unknown`] for event
        /// types or versions this build does not know.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum Event {
            $( $(#[doc = $doc])+ $variant($variant), )+
            /// An event whose (type, version) is not in this build's catalogue.
            /// Kept verbatim and re-serialized unchanged, so older consumers
            /// can skip or forward events introduced after them.
            Unknown {
                /// The envelope's `type`.
                event_type: String,
                /// The envelope's `version`.
                version: u32,
                /// The raw payload.
                payload: ::serde_json::Value,
            },
        }

        impl Event {
            /// The envelope `type`, e.g. `"message.submitted"`.
            pub fn event_type(&self) -> &str {
                match self {
                    $( Self::$variant(_) => $type, )+
                    Self::Unknown { event_type, .. } => event_type,
                }
            }

            /// The payload version of this event type.
            pub fn version(&self) -> u32 {
                match self {
                    $( Self::$variant(_) => $version, )+
                    Self::Unknown { version, .. } => *version,
                }
            }

            /// The topic this event is published to. For [`Event::Unknown`]
            /// this is the topic of another version of the same type, if this
            /// build knows one.
            pub fn topic(&self) -> Option<$crate::topics::Topic> {
                match self {
                    $( Self::$variant(_) => Some($crate::topics::Topic::$topic), )+
                    Self::Unknown { event_type, .. } => catalogue()
                        .iter()
                        .find(|descriptor| descriptor.event_type == event_type)
                        .map(|descriptor| descriptor.topic),
                }
            }

            /// Decodes a payload (its JSON text) selected by `(event_type,
            /// version)`. Unknown pairs become [`Event::Unknown`]; a known pair
            /// whose payload does not match its struct is an error. The text
            /// goes straight into the payload's struct: through a
            /// `serde_json::Value` first, every key and string was allocated
            /// twice.
            pub fn from_payload_json(
                event_type: &str,
                version: u32,
                payload: &str,
            ) -> Result<Self, ::serde_json::Error> {
                match (event_type, version) {
                    $( ($type, $version) => ::serde_json::from_str(payload).map(Self::$variant), )+
                    _ => Ok(Self::Unknown {
                        event_type: event_type.to_owned(),
                        version,
                        payload: ::serde_json::from_str(payload)?,
                    }),
                }
            }

            /// Serializes only the payload.
            pub(crate) fn serialize_payload<S: ::serde::Serializer>(
                &self,
                serializer: S,
            ) -> Result<S::Ok, S::Error> {
                match self {
                    $( Self::$variant(payload) => ::serde::Serialize::serialize(payload, serializer), )+
                    Self::Unknown { payload, .. } => ::serde::Serialize::serialize(payload, serializer),
                }
            }
        }

        $(
            impl $crate::EventPayload for $variant {
                const EVENT_TYPE: &'static str = $type;
                const VERSION: u32 = $version;
                const TOPIC: $crate::topics::Topic = $crate::topics::Topic::$topic;
            }

            impl ::core::convert::From<$variant> for Event {
                fn from(payload: $variant) -> Self {
                    Self::$variant(payload)
                }
            }
        )+

        static CATALOGUE: &[$crate::EventDescriptor] = &[
            $( $crate::EventDescriptor {
                event_type: $type,
                version: $version,
                topic: $crate::topics::Topic::$topic,
                summary: concat!($($doc),+).trim_ascii(),
                payload_schema: $crate::events::payload_schema::<$variant>,
            }, )+
        ];

        /// Every (event type, version) this build knows, in catalogue order.
        pub fn catalogue() -> &'static [$crate::EventDescriptor] {
            CATALOGUE
        }
    };
}

pub(crate) use {event_catalogue, string_enum};
