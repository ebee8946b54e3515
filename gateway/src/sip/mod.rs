//! SIP (RFC 3261) and SIMPLE: the registrar with digest authentication,
//! presence publication (RFC 3903) and subscription (RFC 6665, RFC 3856)
//! with PIDF/RPID bodies (RFC 3863, RFC 4480), and instant messages
//! (RFC 3428).
//!
//! The cores ([`message`], [`transaction`], [`digest`], [`pidf`], [`blocks`],
//! [`registrar`], [`publish`], [`subscribe`], [`restore`]) do no I/O;
//! [`server`] owns the UDP, TCP and TLS sockets and turns requests into
//! events.

use std::net::SocketAddr;

pub mod blocks;
pub mod digest;
pub mod message;
pub mod pidf;
pub mod publish;
pub mod registrar;
pub mod restore;
pub mod server;
pub mod subscribe;
pub mod transaction;

/// A transport (RFC 3261 §18).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP: unreliable, transaction timers apply.
    Udp,
    /// TCP.
    Tcp,
    /// TLS over TCP (RFC 3261 §26.2).
    Tls,
}

impl Transport {
    /// Whether the transport is reliable (RFC 3261 §17: Timer J is zero).
    pub fn reliable(self) -> bool {
        !matches!(self, Self::Udp)
    }

    /// The Via sent-protocol transport token.
    pub fn token(self) -> &'static str {
        match self {
            Self::Udp => "UDP",
            Self::Tcp => "TCP",
            Self::Tls => "TLS",
        }
    }
}

/// Where a message came from and where answers and requests to that client
/// go: the peer address and, over TCP/TLS, the connection (RFC 3261 §18.2.2:
/// responses on the connection the request came on; RFC 5626 §5 reuses it
/// for requests to the client).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Flow {
    /// The transport.
    pub transport: Transport,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The connection number (0 for UDP).
    pub conn: u64,
}
