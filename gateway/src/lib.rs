//! Gateways: the client protocols (XMPP, SIP) as sans-IO cores plus tokio
//! servers, turning client actions into events and pushing deliveries back to
//! connected sessions.
//!
//! Architecture Invariant: gateways hold only connection state. Anything that
//! must survive a gateway crash is an event on the bus before it is
//! acknowledged to a client.

pub mod heartbeat;
