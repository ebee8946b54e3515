//! Gateways: the client protocols (XMPP, SIP) as sans-IO cores plus tokio
//! servers, turning client actions into events and pushing deliveries back to
//! connected sessions.
//!
//! Architecture Invariant: gateways hold only connection state. Anything that
//! must survive a gateway crash is an event on the bus before it is
//! acknowledged to a client.
//!
//! Architecture Invariant: the protocol cores (`xmpp::stream`, `xmpp::jid`,
//! `sasl`) do no I/O: they consume bytes or values and return results or
//! `Incomplete`; the servers own the sockets.

pub mod emit;
pub mod heartbeat;
pub mod ratelimit;
pub mod sasl;
pub mod sip;
pub mod tls;
pub mod users;
pub mod xmpp;
