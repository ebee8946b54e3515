//! Processors: consumer-group members whose state is derived from the log
//! only and rebuilt when a partition moves to them.
//!
//! Architecture Invariant: a processor knows events, not client protocols;
//! it never talks to a client. What it decides goes out as events, including
//! deliveries for the gateway node holding a session.

pub mod compose;
pub mod multicast;
pub mod policy;
pub mod presence;
pub mod roster;
pub mod roster_runtime;
pub mod router;
pub mod runtime;
pub mod settings;
pub mod small_map;
mod table;
pub mod xml;
