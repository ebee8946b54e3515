//! RFC 5802 / RFC 7677: SCRAM (being written).
