//! Infrastructure shared by every role: the bus (Kafka and the embedded log),
//! configuration, metrics and storage pools.
//!
//! Architecture invariant: nothing here knows a client protocol; gateways,
//! processors and projections depend on this crate, never the reverse.

pub mod bus;
pub mod config;
pub mod metrics;
pub mod sqlite_wal;
pub mod tls;
