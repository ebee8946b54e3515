//! RFC 5802/7677 (SCRAM): user administration and settings.
//!
//! Credentials are salted SCRAM keys only (`StoredKey`, `ServerKey`); a
//! password never appears in an event. [`ScramCredential`]'s `Debug` output
//! redacts them.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::address::BareJid;
use crate::macros::string_enum;

string_enum! {
    /// A SCRAM mechanism.
    pub enum ScramMechanism {
        /// SCRAM-SHA-1 (RFC 5802).
        ScramSha1 = "SCRAM-SHA-1",
        /// SCRAM-SHA-256 (RFC 7677).
        ScramSha256 = "SCRAM-SHA-256",
    }
}

/// Salted SCRAM keys for one mechanism (RFC 5802 §3), base64-encoded.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ScramCredential {
    /// The mechanism the keys are for.
    pub mechanism: ScramMechanism,
    /// The salt, base64.
    pub salt_b64: String,
    /// The PBKDF2 iteration count.
    pub iterations: u32,
    /// `StoredKey = H(ClientKey)`, base64.
    pub stored_key_b64: String,
    /// `ServerKey = HMAC(SaltedPassword, "Server Key")`, base64.
    pub server_key_b64: String,
}

impl fmt::Debug for ScramCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramCredential")
            .field("mechanism", &self.mechanism)
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

string_enum! {
    /// A SIP digest algorithm (RFC 7616 §3.4.1, RFC 8760).
    pub enum DigestAlgorithm {
        /// MD5 (RFC 3261 §22.4).
        Md5 = "MD5",
        /// SHA-256 (RFC 7616, RFC 8760).
        Sha256 = "SHA-256",
    }
}

/// A SIP digest secret (RFC 3261 §22.4, RFC 7616 §3.4.2):
/// `HA1 = H(username ":" realm ":" password)` in lower-case hex, where the
/// username is the user's localpart. It is password-equivalent for this
/// realm, so it is treated like the SCRAM keys: never logged (`Debug`
/// redacts it), never in session events.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DigestCredential {
    /// The hash algorithm.
    pub algorithm: DigestAlgorithm,
    /// The realm the secret is for.
    pub realm: String,
    /// `H(username:realm:password)`, lower-case hex.
    pub ha1_hex: String,
}

impl fmt::Debug for DigestCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DigestCredential")
            .field("algorithm", &self.algorithm)
            .field("realm", &self.realm)
            .finish_non_exhaustive()
    }
}

/// A user was provisioned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserProvisioned {
    /// The user.
    pub user: BareJid,
    /// Display name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Preferred locale (BCP 47), e.g. `en-US`.
    #[serde(default)]
    pub locale: Option<String>,
    /// Initial credentials; empty for directory (LDAP bind) users.
    #[serde(default)]
    pub credentials: Vec<ScramCredential>,
    /// SIP digest secrets of the same password (added in v1 without a
    /// version change; absent in older records and for directory users).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub digest: Vec<DigestCredential>,
    /// The administrator who did it.
    #[serde(default)]
    pub by: Option<String>,
}

/// A user's credentials were replaced (password change or reset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserCredentialsChanged {
    /// The user.
    pub user: BareJid,
    /// The complete new credential list.
    pub credentials: Vec<ScramCredential>,
    /// SIP digest secrets of the same password (added in v1 without a
    /// version change; absent in older records and for directory users).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub digest: Vec<DigestCredential>,
    /// Who changed them: an administrator, or the user.
    #[serde(default)]
    pub by: Option<String>,
}

/// A user was disabled: logins fail and existing sessions end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserDisabled {
    /// The user.
    pub user: BareJid,
    /// The reason given.
    #[serde(default)]
    pub reason: Option<String>,
    /// The administrator who did it.
    #[serde(default)]
    pub by: Option<String>,
}

/// A disabled user was enabled again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserEnabled {
    /// The user.
    pub user: BareJid,
    /// The administrator who did it.
    #[serde(default)]
    pub by: Option<String>,
}

/// A user was deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserDeleted {
    /// The user.
    pub user: BareJid,
    /// The administrator who did it.
    #[serde(default)]
    pub by: Option<String>,
}

/// The latest record of a user, on the compacted `users` topic; a deleted
/// user is a tombstone (null value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UserState {
    /// The user.
    pub user: BareJid,
    /// Display name.
    #[serde(default)]
    pub display_name: Option<String>,
    /// Preferred locale (BCP 47).
    #[serde(default)]
    pub locale: Option<String>,
    /// Whether the user may log in.
    pub enabled: bool,
    /// Current credentials.
    #[serde(default)]
    pub credentials: Vec<ScramCredential>,
    /// SIP digest secrets of the same password (added in v1 without a
    /// version change; absent in older records and for directory users).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub digest: Vec<DigestCredential>,
}

/// A setting changed. On the compacted `settings` topic, keyed by `key`, so
/// the latest record per key is the setting's current value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SettingChanged {
    /// The setting key, e.g. `im.offline.max_per_user`.
    pub key: String,
    /// The new value.
    pub value: serde_json::Value,
    /// The previous value; absent when it was the default.
    #[serde(default)]
    pub previous: Option<serde_json::Value>,
    /// Who changed it: an administrator principal.
    pub changed_by: String,
}
