//! # switchboard-schemas: the public, versioned event interface
//!
//! Every login, presence update, message, room event and file transfer of
//! Switchboard is an [`Envelope`] on a Kafka topic. This crate defines them:
//!
//! - [`address`]: typed, already-normalised addresses ([`BareJid`],
//!   [`FullJid`], [`RoomJid`], [`NodeId`]);
//! - [`envelope`]: the [`Envelope`] and its flat JSON shape;
//! - [`events`]: the payload structs, the [`Event`] enum and the
//!   [`catalogue`] of (type, version) entries;
//! - [`topics`]: the topic catalogue ([`topics::topics`], [`topics::full_name`]);
//! - [`schema`] and [`asyncapi`]: the published JSON Schema and AsyncAPI
//!   documents, generated from the types above. The checked-in copies live in
//!   `schemas/json/` and `schemas/asyncapi.yaml`; `tests/published.rs` keeps
//!   them equal to the generator (`SWITCHBOARD_BLESS=1 cargo test -p
//!   switchboard-schemas` rewrites them).
//!
//! Architecture Invariant: this crate depends on serde-family crates only
//! (serde, serde_json, uuid, chrono, schemars). No I/O, no async runtime, no
//! knowledge of Kafka clients, SQL or protocols beyond the event shapes.
//!
//! # Versioning rules
//!
//! An event is identified by its envelope `type` (e.g. `message.submitted`)
//! and `version` (an integer, starting at 1). Consumers select the payload
//! schema by both.
//!
//! - **Additive change** (a new optional field, a new value of a
//!   forward-compatible string enum): keep the version. The new field gets
//!   `#[serde(default)]` so records written before the change still decode,
//!   and old consumers ignore it (payload structs never use
//!   `deny_unknown_fields`). String enums keep unknown values in an
//!   `Other(String)` variant instead of rejecting them.
//! - **Breaking change** (removing or renaming a field, changing its type or
//!   meaning, making an optional field required): write a new struct (e.g.
//!   `MessageSubmittedV2`) and a new catalogue line with the next version.
//!   The old struct and line stay in the catalogue, because the log keeps the
//!   old records forever and replays must decode them. Producers switch to
//!   the new version; consumers handle both.
//! - A consumer that meets a (type, version) it does not know gets
//!   [`Event::Unknown`], which re-encodes unchanged, so it can skip or
//!   forward it.
//! - Every catalogue entry has a hand-reviewed golden example in
//!   `schemas/golden/<type>.v<version>.json`. A golden file is never
//!   rewritten to make a test pass: if it stops decoding or re-encoding
//!   identically, the change was breaking and needs a new version.

#![warn(missing_docs)]

pub mod address;
pub mod asyncapi;
pub mod envelope;
pub mod events;
pub(crate) mod macros;
pub mod schema;
pub mod topics;
pub mod xml;

pub use address::{BareJid, FullJid, NodeId, RoomJid};
pub use envelope::{Envelope, EnvelopeError};
pub use events::{Event, EventDescriptor, EventPayload, catalogue};
pub use topics::{Topic, TopicSpec};
