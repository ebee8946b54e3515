//! RFC 6120 §6-7 (SASL, resource binding), RFC 3261 §22 (SIP digest): sessions.
//!
//! Architecture Invariant: no session event carries a password, a SASL
//! exchange, a digest response or any other credential material; only the
//! mechanism name.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Protocol;
use crate::address::{BareJid, FullJid, NodeId};
use crate::macros::string_enum;

string_enum! {
    /// The authentication mechanism: a SASL mechanism (RFC 4422) for XMPP,
    /// an authentication scheme for SIP.
    pub enum AuthMechanism {
        /// SCRAM-SHA-1 (RFC 5802).
        ScramSha1 = "SCRAM-SHA-1",
        /// SCRAM-SHA-1 with channel binding.
        ScramSha1Plus = "SCRAM-SHA-1-PLUS",
        /// SCRAM-SHA-256 (RFC 7677).
        ScramSha256 = "SCRAM-SHA-256",
        /// SCRAM-SHA-256 with channel binding.
        ScramSha256Plus = "SCRAM-SHA-256-PLUS",
        /// PLAIN (RFC 4616), over TLS only.
        Plain = "PLAIN",
        /// EXTERNAL (RFC 4422 Appendix A), e.g. client certificates.
        External = "EXTERNAL",
        /// SIP digest authentication (RFC 3261 §22.4, RFC 8760).
        Digest = "Digest",
    }
}

string_enum! {
    /// Why a login failed.
    pub enum LoginFailureReason {
        /// Wrong password or proof.
        BadCredentials = "bad_credentials",
        /// No such user.
        UnknownUser = "unknown_user",
        /// The user is disabled.
        AccountDisabled = "account_disabled",
        /// Too many attempts; throttled.
        RateLimited = "rate_limited",
        /// The mechanism is not offered or not allowed here.
        MechanismNotAllowed = "mechanism_not_allowed",
        /// The connection must be encrypted first.
        TlsRequired = "tls_required",
        /// The user already has the maximum number of sessions.
        SessionLimitReached = "session_limit_reached",
    }
}

string_enum! {
    /// Why a session ended.
    pub enum SessionEndReason {
        /// The client logged out (stream close, REGISTER with Expires 0).
        Logout = "logout",
        /// The connection broke and was not resumed.
        ConnectionLost = "connection_lost",
        /// Idle or registration expiry.
        Timeout = "timeout",
        /// Replaced by a new session with the same resource.
        Conflict = "conflict",
        /// The gateway node holding the session went down.
        NodeDown = "node_down",
        /// Terminated by an administrator or policy.
        Kicked = "kicked",
    }
}

/// A client started authenticating on a gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionLoginAttempted {
    /// The gateway-assigned session id (UUIDv7), shared by every event of
    /// this session.
    pub session_id: Uuid,
    /// The user the client claims to be (normalised, maybe unknown).
    pub user: BareJid,
    /// The client protocol.
    pub protocol: Protocol,
    /// The client's address as the gateway sees it, `ip:port`.
    pub remote_addr: String,
    /// The mechanism the client chose.
    pub mechanism: AuthMechanism,
    /// Whether the connection is encrypted (TLS).
    pub tls: bool,
}

/// A client authenticated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionLoginSucceeded {
    /// The session id of the login attempt.
    pub session_id: Uuid,
    /// The authenticated user.
    pub user: BareJid,
    /// The client protocol.
    pub protocol: Protocol,
    /// The client's address, `ip:port`.
    pub remote_addr: String,
    /// The mechanism used.
    pub mechanism: AuthMechanism,
}

/// A client failed to authenticate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionLoginFailed {
    /// The session id of the login attempt.
    pub session_id: Uuid,
    /// The user the client claimed to be.
    pub user: BareJid,
    /// The client protocol.
    pub protocol: Protocol,
    /// The client's address, `ip:port`.
    pub remote_addr: String,
    /// The mechanism tried.
    pub mechanism: AuthMechanism,
    /// Why it failed.
    pub reason: LoginFailureReason,
    /// Human-readable detail for operators (never credential material).
    #[serde(default)]
    pub text: Option<String>,
}

/// Software information a client reported (XEP-0092, SIP User-Agent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClientInfo {
    /// Client name, e.g. `Gajim`.
    #[serde(default)]
    pub name: Option<String>,
    /// Client version.
    #[serde(default)]
    pub version: Option<String>,
    /// Operating system.
    #[serde(default)]
    pub os: Option<String>,
    /// Raw SIP `User-Agent` or HTTP `User-Agent` header.
    #[serde(default)]
    pub user_agent: Option<String>,
}

/// An authenticated session bound a resource (XMPP) or registered a contact
/// (SIP) and is now routable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionResourceBound {
    /// The session id.
    pub session_id: Uuid,
    /// The session's full address.
    pub full_jid: FullJid,
    /// The client protocol.
    pub protocol: Protocol,
    /// The registered SIP `Contact` URI, for SIP sessions.
    #[serde(default)]
    pub contact: Option<String>,
    /// Initial priority (-128..127; RFC 6121 §4.7.2.3).
    #[serde(default)]
    pub priority: i8,
    /// Client software, as far as known.
    #[serde(default)]
    pub client: ClientInfo,
}

/// A session enabled or disabled message carbons (XEP-0280 §4, §5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionCarbons {
    /// The session.
    pub session_id: Uuid,
    /// Its address.
    pub full_jid: FullJid,
    /// Whether it wants copies of its user's messages.
    pub enabled: bool,
}

/// A session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SessionEnded {
    /// The session id.
    pub session_id: Uuid,
    /// The user.
    pub user: BareJid,
    /// The full address, if a resource was bound.
    #[serde(default)]
    pub full_jid: Option<FullJid>,
    /// The client protocol.
    pub protocol: Protocol,
    /// Why it ended.
    pub reason: SessionEndReason,
    /// Human-readable detail.
    #[serde(default)]
    pub text: Option<String>,
}

/// A gateway node is alive. Sent every `interval_secs`; a node silent for
/// three intervals is considered down and its sessions ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct NodeHeartbeat {
    /// The node.
    pub node: NodeId,
    /// When the node started.
    pub started_at: DateTime<Utc>,
    /// Seconds until the next heartbeat.
    pub interval_secs: u32,
    /// Active sessions per protocol.
    #[serde(default)]
    pub sessions: BTreeMap<Protocol, u64>,
}
