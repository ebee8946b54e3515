//! SASL (RFC 4422) mechanisms offered to clients: SCRAM-SHA-256(-PLUS),
//! SCRAM-SHA-1(-PLUS) and PLAIN.

pub mod scram;
