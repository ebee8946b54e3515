//! SASL (RFC 4422) mechanisms offered to clients: SCRAM-SHA-256(-PLUS),
//! SCRAM-SHA-1(-PLUS) and PLAIN, as sans-IO state machines for RFC 6120 §6.
//!
//! The caller owns the stream: it advertises [`offered`] mechanisms, parses
//! the `mechanism` attribute into a [`Mechanism`], base64-decodes
//! `<auth/>`/`<response/>` payloads (RFC 6120 §6.4.2), looks up the user's
//! credential by the username a mechanism reports, and turns a [`SaslError`]
//! into `<failure/>` with [`SaslError::condition`] (RFC 6120 §6.5).

use std::fmt;
use std::str::FromStr;

use precis_profiles::UsernameCaseMapped;
use precis_profiles::precis_core::profile::PrecisFastInvocation;
use switchboard_schemas::BareJid;
use switchboard_schemas::events::{AuthMechanism, ScramMechanism};

pub mod plain;
pub mod scram;

/// A SASL mechanism as named in `<mechanisms/>` and the `mechanism`
/// attribute of `<auth/>` (RFC 6120 §6.4.1-§6.4.2, RFC 4422 §3.1).
///
/// Variants are declared in preference order (strongest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mechanism {
    /// `SCRAM-SHA-256-PLUS` (RFC 7677 §2, RFC 5802 §4/§6).
    ScramSha256Plus,
    /// `SCRAM-SHA-1-PLUS` (RFC 5802 §4/§6).
    ScramSha1Plus,
    /// `SCRAM-SHA-256` (RFC 7677 §2).
    ScramSha256,
    /// `SCRAM-SHA-1` (RFC 5802 §4).
    ScramSha1,
    /// `PLAIN` (RFC 4616 §2): only over TLS (RFC 6120 §6.4.2, §13.8).
    Plain,
}

impl Mechanism {
    /// Every supported mechanism, in preference order (RFC 6120 §6.3.3).
    pub const ALL: [Self; 5] = [
        Self::ScramSha256Plus,
        Self::ScramSha1Plus,
        Self::ScramSha256,
        Self::ScramSha1,
        Self::Plain,
    ];

    /// The registered mechanism name (RFC 4422 §3.1).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScramSha256Plus => "SCRAM-SHA-256-PLUS",
            Self::ScramSha1Plus => "SCRAM-SHA-1-PLUS",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha1 => "SCRAM-SHA-1",
            Self::Plain => "PLAIN",
        }
    }

    /// Whether this is a channel-binding `-PLUS` variant (RFC 5802 §4).
    pub fn is_plus(self) -> bool {
        matches!(self, Self::ScramSha256Plus | Self::ScramSha1Plus)
    }

    /// The kind of stored credential the mechanism verifies against
    /// (RFC 5802 §3); PLAIN can use either, so it has none.
    pub fn scram_mechanism(self) -> Option<ScramMechanism> {
        match self {
            Self::ScramSha256Plus | Self::ScramSha256 => Some(ScramMechanism::ScramSha256),
            Self::ScramSha1Plus | Self::ScramSha1 => Some(ScramMechanism::ScramSha1),
            Self::Plain => None,
        }
    }

    /// The mechanism as recorded in session events (RFC 6120 §6).
    pub fn auth_mechanism(self) -> AuthMechanism {
        AuthMechanism::from(self.as_str())
    }

    /// Checks that a mechanism chosen by the client is one [`offered`] on
    /// this stream (RFC 6120 §6.5.4 `encryption-required`, §6.5.7
    /// `invalid-mechanism`).
    pub fn ensure_offered(
        self,
        tls: bool,
        channel_binding_available: bool,
    ) -> Result<(), SaslError> {
        match self {
            Self::Plain if !tls => Err(SaslError::EncryptionRequired),
            m if m.is_plus() && !channel_binding_available => Err(SaslError::InvalidMechanism),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for Mechanism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Mechanism {
    type Err = SaslError;

    /// Parses the `mechanism` attribute (RFC 6120 §6.4.2); names are
    /// case-sensitive (RFC 4422 §3.1), anything else is `invalid-mechanism`
    /// (RFC 6120 §6.5.7).
    fn from_str(name: &str) -> Result<Self, SaslError> {
        Self::ALL
            .into_iter()
            .find(|m| m.as_str() == name)
            .ok_or(SaslError::InvalidMechanism)
    }
}

/// The mechanisms to advertise in `<mechanisms/>`, in preference order
/// (RFC 6120 §6.3.3-§6.3.4): PLAIN only over TLS (RFC 6120 §13.8, RFC 4616
/// §5), `-PLUS` only when `tls-exporter` data is available (RFC 5802 §6,
/// RFC 9266 §3).
pub fn offered(tls: bool, channel_binding_available: bool) -> Vec<Mechanism> {
    Mechanism::ALL
        .into_iter()
        .filter(|m| m.ensure_offered(tls, channel_binding_available).is_ok())
        .collect()
}

/// A successful authentication (RFC 6120 §6.4.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The authentication identity: the simple user name (RFC 6120 §6.3.7),
    /// prepared with the UsernameCaseMapped profile (RFC 8265 §3.3,
    /// RFC 7622 §3.3), i.e. the localpart.
    pub username: String,
    /// The authorization identity, when the client sent one (RFC 6120
    /// §6.3.8); always the user's own bare JID.
    pub authzid: Option<BareJid>,
}

/// Why a SASL exchange failed, as RFC 6120 §6.5 conditions and, for SCRAM,
/// RFC 5802 §7 `server-error-value`s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// The client sent `<abort/>` (RFC 6120 §6.4.4, §6.5.1).
    #[error("the client aborted the exchange")]
    Aborted,
    /// The mechanism needs TLS first (RFC 6120 §6.5.4).
    #[error("the mechanism requires an encrypted stream")]
    EncryptionRequired,
    /// The authzid is not the user's own bare JID (RFC 6120 §6.5.6).
    #[error("authorization identity not allowed")]
    InvalidAuthzid,
    /// The mechanism is unknown or not offered here (RFC 6120 §6.5.7).
    #[error("mechanism not offered")]
    InvalidMechanism,
    /// Syntax error, bad encoding or over-long message (RFC 6120 §6.5.8;
    /// RFC 5802 §7 `invalid-encoding`).
    #[error("malformed SASL message: {0}")]
    Malformed(&'static str),
    /// The username is badly escaped or fails PRECIS (RFC 5802 §5.1, §7
    /// `invalid-username-encoding`).
    #[error("invalid username encoding")]
    InvalidUsername,
    /// The client sent a mandatory `m=` extension (RFC 5802 §5.1, §7
    /// `extensions-not-supported`).
    #[error("SCRAM mandatory extensions are not supported")]
    ExtensionsNotSupported,
    /// `p=` with a non-`-PLUS` mechanism (RFC 5802 §6, §7
    /// `channel-binding-not-supported`).
    #[error("channel binding requested with a non-PLUS mechanism")]
    ChannelBindingNotSupported,
    /// A channel-binding type other than `tls-exporter` (RFC 5802 §6, §7
    /// `unsupported-channel-binding-type`; RFC 9266 §2).
    #[error("unsupported channel binding type")]
    UnsupportedChannelBindingType,
    /// `y` although the server offered `-PLUS`: a possible downgrade attack
    /// (RFC 5802 §6, §7 `server-does-support-channel-binding`).
    #[error("the server supports channel binding (possible downgrade)")]
    ChannelBindingDowngrade,
    /// `c=` differs from the GS2 header and channel-binding data (RFC 5802
    /// §6, §7 `channel-bindings-dont-match`).
    #[error("channel bindings don't match")]
    ChannelBindingMismatch,
    /// The client-final nonce is not client nonce + server nonce (RFC 5802
    /// §5.1 `r=`).
    #[error("nonce mismatch")]
    NonceMismatch,
    /// Wrong password or proof, or unknown user (RFC 6120 §6.5.10; RFC 5802
    /// §7 `invalid-proof`).
    #[error("authentication failed")]
    NotAuthorized,
    /// A server-side problem, e.g. an unusable stored credential or no
    /// randomness (RFC 6120 §6.5.11).
    #[error("temporary authentication failure: {0}")]
    TemporaryFailure(&'static str),
}

impl SaslError {
    /// The RFC 6120 §6.5 defined condition for `<failure/>`.
    pub fn condition(&self) -> &'static str {
        match self {
            Self::Aborted => "aborted",
            Self::EncryptionRequired => "encryption-required",
            Self::InvalidAuthzid => "invalid-authzid",
            Self::InvalidMechanism => "invalid-mechanism",
            Self::Malformed(_)
            | Self::InvalidUsername
            | Self::ExtensionsNotSupported
            | Self::ChannelBindingNotSupported
            | Self::UnsupportedChannelBindingType => "malformed-request",
            Self::ChannelBindingDowngrade
            | Self::ChannelBindingMismatch
            | Self::NonceMismatch
            | Self::NotAuthorized => "not-authorized",
            Self::TemporaryFailure(_) => "temporary-auth-failure",
        }
    }

    /// The SCRAM `server-error-value` (RFC 5802 §7) for an `e=` server-final
    /// message, when the failure is a SCRAM one.
    pub fn server_error(&self) -> Option<&'static str> {
        Some(match self {
            Self::Aborted | Self::EncryptionRequired | Self::InvalidMechanism => return None,
            Self::Malformed(_) => "invalid-encoding",
            Self::InvalidUsername => "invalid-username-encoding",
            Self::ExtensionsNotSupported => "extensions-not-supported",
            Self::ChannelBindingNotSupported => "channel-binding-not-supported",
            Self::UnsupportedChannelBindingType => "unsupported-channel-binding-type",
            Self::ChannelBindingDowngrade => "server-does-support-channel-binding",
            Self::ChannelBindingMismatch => "channel-bindings-dont-match",
            Self::NotAuthorized => "invalid-proof",
            Self::NonceMismatch | Self::InvalidAuthzid | Self::TemporaryFailure(_) => "other-error",
        })
    }
}

/// Prepares a simple user name with UsernameCaseMapped (RFC 6120 §6.3.7,
/// RFC 8265 §3.3, RFC 7622 §3.3.1).
fn prepare_username(username: &str) -> Result<String, SaslError> {
    UsernameCaseMapped::enforce(username)
        .map(|u| u.into_owned())
        .map_err(|_| SaslError::InvalidUsername)
}

/// Accepts an authzid only when absent/empty or equal to the user's own bare
/// JID `username@domain` (RFC 6120 §6.3.8, §6.5.6).
fn check_authzid(
    username: &str,
    authzid: Option<&str>,
    domain: &str,
) -> Result<Option<BareJid>, SaslError> {
    let Some(authzid) = authzid.filter(|a| !a.is_empty()) else {
        return Ok(None);
    };
    let (local, dom) = authzid.split_once('@').ok_or(SaslError::InvalidAuthzid)?;
    let local = prepare_username(local).map_err(|_| SaslError::InvalidAuthzid)?;
    let domain = domain.to_lowercase();
    if local != username || dom.contains('/') || dom.to_lowercase() != domain {
        return Err(SaslError::InvalidAuthzid);
    }
    Ok(Some(BareJid::new(format!("{username}@{domain}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_in_preference_order() {
        use Mechanism::*;
        assert_eq!(offered(false, false), [ScramSha256, ScramSha1]);
        assert_eq!(offered(true, false), [ScramSha256, ScramSha1, Plain]);
        assert_eq!(offered(true, true), Mechanism::ALL);
    }

    #[test]
    fn parses_mechanism_attribute() {
        for m in Mechanism::ALL {
            assert_eq!(m.as_str().parse::<Mechanism>(), Ok(m));
            assert_eq!(m.auth_mechanism().as_str(), m.as_str());
        }
        assert_eq!(
            "scram-sha-1".parse::<Mechanism>(),
            Err(SaslError::InvalidMechanism)
        );
        assert_eq!(
            "DIGEST-MD5".parse::<Mechanism>(),
            Err(SaslError::InvalidMechanism)
        );
        assert_eq!(
            Mechanism::Plain.ensure_offered(false, false),
            Err(SaslError::EncryptionRequired)
        );
    }

    #[test]
    fn authzid_must_be_own_bare_jid() {
        let ok = |a| check_authzid("juliet", a, "example.com");
        assert_eq!(ok(None), Ok(None));
        assert_eq!(ok(Some("")), Ok(None));
        assert_eq!(
            ok(Some("Juliet@Example.COM")),
            Ok(Some(BareJid::new("juliet@example.com")))
        );
        for bad in [
            "romeo@example.com",
            "juliet@example.org",
            "juliet@example.com/r",
            "juliet",
        ] {
            assert_eq!(ok(Some(bad)), Err(SaslError::InvalidAuthzid), "{bad}");
        }
    }
}
