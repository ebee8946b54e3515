//! XMPP (RFC 6120/6121) client-to-server protocol.

pub mod csi;
pub mod jid;
pub mod server;
pub mod stream;
