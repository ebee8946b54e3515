//! RFC 5802 (SCRAM), RFC 7677 (SCRAM-SHA-256) and RFC 9266 (`tls-exporter`
//! channel binding): credential derivation and the server side of the
//! exchange, sans-IO, for RFC 6120 §6.
//!
//! ```text
//! client-first  --ScramServer::start-->        ScramAwaitingCredential
//!     (caller looks up the credential for .username())
//!               --.server_first(credential)--> server-first, ScramAwaitingFinal
//! client-final  --.finish-->                   server-final `v=...`, Authenticated
//! ```
//!
//! Passwords are prepared with the PRECIS OpaqueString profile (RFC 8265
//! §4), the successor of the SASLprep (RFC 4013) that RFC 5802 §2.2 names;
//! the two agree on all but exotic inputs. Plaintext passwords are never
//! stored; `Debug` output never shows keys, the server secret or passwords.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use precis_profiles::OpaqueString;
use precis_profiles::precis_core::profile::PrecisFastInvocation;
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use switchboard_schemas::BareJid;
use switchboard_schemas::events::{ScramCredential, ScramMechanism};

use super::{Authenticated, Mechanism, SaslError, check_authzid, prepare_username};

/// The smallest accepted PBKDF2 iteration count (RFC 5802 §5.1 `i=`,
/// RFC 7677 §4: at least 4096).
pub const MIN_ITERATIONS: u32 = 4096;

/// The longest accepted client-first or client-final message, in bytes
/// (RFC 5802 §9: bounding work an unauthenticated peer can cause).
pub const MAX_MESSAGE_LEN: usize = 4096;

/// Salt length of [`new_credentials`] (RFC 5802 §5.1 `s=`).
pub const SALT_LEN: usize = 16;

/// Random bytes in a server nonce, before base64 (RFC 5802 §5.1 `r=`).
const NONCE_BYTES: usize = 18;

/// Why a credential could not be derived (RFC 5802 §3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The password is empty or not an OpaqueString (RFC 8265 §4.2).
    #[error("password is not a valid OpaqueString")]
    InvalidPassword,
    /// Fewer than [`MIN_ITERATIONS`] (RFC 7677 §4).
    #[error("iteration count {0} is below {MIN_ITERATIONS}")]
    TooFewIterations(u32),
    /// An empty salt (RFC 5802 §5.1 `s=`).
    #[error("empty salt")]
    EmptySalt,
    /// Not SCRAM-SHA-1 or SCRAM-SHA-256 (RFC 5802 §4, RFC 7677 §2).
    #[error("unsupported SCRAM mechanism {0}")]
    UnsupportedMechanism(String),
    /// The system random source failed.
    #[error("no randomness available")]
    Random,
}

/// The hash function `H` of a SCRAM mechanism (RFC 5802 §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hash {
    Sha1,
    Sha256,
}

impl Hash {
    pub(crate) fn of(mechanism: &ScramMechanism) -> Option<Self> {
        match mechanism {
            ScramMechanism::ScramSha1 => Some(Self::Sha1),
            ScramMechanism::ScramSha256 => Some(Self::Sha256),
            ScramMechanism::Other(_) => None,
        }
    }

    fn len(self) -> usize {
        match self {
            Self::Sha1 => 20,
            Self::Sha256 => 32,
        }
    }

    fn h(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Sha1 => Sha1::digest(data).to_vec(),
            Self::Sha256 => Sha256::digest(data).to_vec(),
        }
    }

    fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        fn run<M: Mac + KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            let mut mac = <M as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
            parts.iter().for_each(|p| mac.update(p));
            mac.finalize().into_bytes().to_vec()
        }
        match self {
            Self::Sha1 => run::<Hmac<Sha1>>(key, parts),
            Self::Sha256 => run::<Hmac<Sha256>>(key, parts),
        }
    }

    /// `(StoredKey, ServerKey)` for an already prepared password (RFC 5802
    /// §3): `SaltedPassword := Hi(password, salt, i)`, `ClientKey :=
    /// HMAC(SaltedPassword, "Client Key")`, `StoredKey := H(ClientKey)`,
    /// `ServerKey := HMAC(SaltedPassword, "Server Key")`.
    pub(crate) fn keys(self, password: &str, salt: &[u8], iterations: u32) -> (Vec<u8>, Vec<u8>) {
        let mut salted = vec![0; self.len()];
        match self {
            Self::Sha1 => {
                pbkdf2::pbkdf2_hmac::<Sha1>(password.as_bytes(), salt, iterations, &mut salted)
            }
            Self::Sha256 => {
                pbkdf2::pbkdf2_hmac::<Sha256>(password.as_bytes(), salt, iterations, &mut salted)
            }
        }
        let client_key = self.hmac(&salted, &[b"Client Key"]);
        (self.h(&client_key), self.hmac(&salted, &[b"Server Key"]))
    }
}

/// Prepares a password with OpaqueString (RFC 8265 §4.2) in place of
/// SASLprep (RFC 5802 §2.2, RFC 4013).
pub(crate) fn prepare_password(password: &str) -> Option<String> {
    OpaqueString::enforce(password).ok().map(|p| p.into_owned())
}

/// A stored credential, decoded and checked (RFC 5802 §3).
pub(crate) struct Keys {
    pub(crate) hash: Hash,
    pub(crate) salt: Vec<u8>,
    pub(crate) iterations: u32,
    pub(crate) stored_key: Vec<u8>,
    pub(crate) server_key: Vec<u8>,
}

impl Keys {
    /// `Ok(None)` for a mechanism this server does not implement; an error
    /// for a corrupt credential.
    pub(crate) fn decode(credential: &ScramCredential) -> Result<Option<Self>, SaslError> {
        let Some(hash) = Hash::of(&credential.mechanism) else {
            return Ok(None);
        };
        let bad = SaslError::TemporaryFailure("corrupt stored credential");
        let decode = |b64: &str, len: Option<usize>| {
            B64.decode(b64)
                .ok()
                .filter(|v| !v.is_empty() && len.is_none_or(|len| v.len() == len))
                .ok_or(bad.clone())
        };
        if credential.iterations == 0 {
            return Err(bad);
        }
        Ok(Some(Self {
            hash,
            salt: decode(&credential.salt_b64, None)?,
            iterations: credential.iterations,
            stored_key: decode(&credential.stored_key_b64, Some(hash.len()))?,
            server_key: decode(&credential.server_key_b64, Some(hash.len()))?,
        }))
    }
}

/// Derives a stored credential from a password (RFC 5802 §3, RFC 7677 §2):
/// prepares it with OpaqueString (RFC 8265 §4.2), then computes `StoredKey`
/// and `ServerKey`. Refuses fewer than [`MIN_ITERATIONS`] (RFC 7677 §4).
pub fn derive(
    mechanism: ScramMechanism,
    password: &str,
    salt: &[u8],
    iterations: u32,
) -> Result<ScramCredential, CredentialError> {
    let hash = Hash::of(&mechanism)
        .ok_or_else(|| CredentialError::UnsupportedMechanism(mechanism.to_string()))?;
    if iterations < MIN_ITERATIONS {
        return Err(CredentialError::TooFewIterations(iterations));
    }
    if salt.is_empty() {
        return Err(CredentialError::EmptySalt);
    }
    let password = prepare_password(password).ok_or(CredentialError::InvalidPassword)?;
    let (stored_key, server_key) = hash.keys(&password, salt, iterations);
    Ok(ScramCredential {
        mechanism,
        salt_b64: B64.encode(salt),
        iterations,
        stored_key_b64: B64.encode(stored_key),
        server_key_b64: B64.encode(server_key),
    })
}

/// [`derive()`] with a fresh random [`SALT_LEN`]-byte salt (RFC 5802 §5.1
/// `s=`, §9).
pub fn new_credentials(
    mechanism: ScramMechanism,
    password: &str,
    iterations: u32,
) -> Result<ScramCredential, CredentialError> {
    let mut salt = [0; SALT_LEN];
    getrandom::fill(&mut salt).map_err(|_| CredentialError::Random)?;
    derive(mechanism, password, &salt, iterations)
}

/// `tls-exporter` channel-binding data of the TLS connection (RFC 9266 §2):
/// the [`Self::LEN`]-byte TLS exporter output for [`Self::EXPORTER_LABEL`]
/// with an empty context, obtained by the caller from its TLS library.
#[derive(Clone, PartialEq, Eq)]
pub struct ChannelBindingData(Vec<u8>);

impl ChannelBindingData {
    /// The channel-binding type name (RFC 9266 §2, RFC 5802 §7 `cb-name`).
    pub const TYPE: &'static str = "tls-exporter";
    /// The TLS exporter label (RFC 9266 §2).
    pub const EXPORTER_LABEL: &'static str = "EXPORTER-Channel-Binding";
    /// The exporter output length in bytes (RFC 9266 §2).
    pub const LEN: usize = 32;

    /// Wraps `tls-exporter` bytes (RFC 9266 §2).
    pub fn tls_exporter(data: impl Into<Vec<u8>>) -> Self {
        Self(data.into())
    }

    /// The raw bytes (RFC 5802 §7 `cbind-data`).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for ChannelBindingData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelBindingData({} bytes)", self.0.len())
    }
}

/// Server-wide SCRAM settings and the entry point of an exchange (RFC 5802
/// §5): the domain authzids must belong to (RFC 6120 §6.3.8), and the secret
/// from which fake salts for unknown users are derived (RFC 5802 §9, so an
/// exchange for an unknown user only fails at the proof).
#[derive(Clone)]
pub struct ScramServer {
    domain: String,
    secret: [u8; 32],
    fake_iterations: u32,
    #[cfg(test)]
    nonce: Option<String>,
}

impl fmt::Debug for ScramServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramServer")
            .field("domain", &self.domain)
            .field("fake_iterations", &self.fake_iterations)
            .finish_non_exhaustive()
    }
}

impl ScramServer {
    /// Settings for `domain` (RFC 6120 §6.3.8) with a long-lived `secret`
    /// for fake salts (RFC 5802 §9); fake credentials use
    /// [`MIN_ITERATIONS`] until [`Self::with_fake_iterations`].
    pub fn new(domain: impl Into<String>, secret: [u8; 32]) -> Self {
        Self {
            domain: domain.into(),
            secret,
            fake_iterations: MIN_ITERATIONS,
            #[cfg(test)]
            nonce: None,
        }
    }

    /// Sets the iteration count shown for unknown users; use the count new
    /// credentials get so it does not stand out (RFC 5802 §5.1 `i=`, §9).
    pub fn with_fake_iterations(mut self, iterations: u32) -> Self {
        self.fake_iterations = iterations.max(MIN_ITERATIONS);
        self
    }

    /// Test-only: a fixed server nonce, for the RFC 5802 §5 / RFC 7677 §3
    /// examples.
    #[cfg(test)]
    pub(crate) fn with_nonce(mut self, nonce: &str) -> Self {
        self.nonce = Some(nonce.to_owned());
        self
    }

    /// Parses a client-first message (RFC 5802 §5.1, §7) for `mechanism`,
    /// applying the GS2 channel-binding rules of RFC 5802 §6: `n` and `y`
    /// only with non-`-PLUS` mechanisms, `y` refused when `plus_offered`
    /// (downgrade), `p=tls-exporter` only with `-PLUS` mechanisms and
    /// `channel_binding` data (RFC 9266 §3). `channel_binding` is `None` when
    /// not on TLS or exporter data is unavailable.
    pub fn start(
        &self,
        mechanism: Mechanism,
        client_first: &[u8],
        channel_binding: Option<&ChannelBindingData>,
        plus_offered: bool,
    ) -> Result<ScramAwaitingCredential, SaslError> {
        let scram = mechanism
            .scram_mechanism()
            .ok_or(SaslError::InvalidMechanism)?;
        let hash = Hash::of(&scram).ok_or(SaslError::InvalidMechanism)?;
        if mechanism.is_plus() && channel_binding.is_none() {
            return Err(SaslError::InvalidMechanism);
        }
        let message = text(client_first)?;
        let (flag, rest) = message.split_once(',').ok_or(MALFORMED)?;
        let (authzid, bare) = rest.split_once(',').ok_or(MALFORMED)?;
        let gs2_header = &message[..message.len() - bare.len()];

        let mut cbind_input = gs2_header.as_bytes().to_vec();
        match (flag, flag.strip_prefix("p=")) {
            ("n" | "y", _) if mechanism.is_plus() => {
                return Err(SaslError::Malformed(
                    "-PLUS mechanism without channel binding",
                ));
            }
            ("y", _) if plus_offered => return Err(SaslError::ChannelBindingDowngrade),
            ("n" | "y", _) => {}
            (_, Some(_)) if !mechanism.is_plus() => {
                return Err(SaslError::ChannelBindingNotSupported);
            }
            (_, Some(ChannelBindingData::TYPE)) => {
                cbind_input.extend_from_slice(channel_binding.ok_or(MALFORMED)?.as_bytes());
            }
            (_, Some(name))
                if !name.is_empty()
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') =>
            {
                return Err(SaslError::UnsupportedChannelBindingType);
            }
            _ => return Err(MALFORMED),
        }
        let authzid = match authzid {
            "" => None,
            a => Some(sasl_name(a.strip_prefix("a=").ok_or(MALFORMED)?).ok_or(MALFORMED)?),
        };

        let mut attrs = bare.split(',');
        let user = attrs.next().unwrap_or_default();
        if user.starts_with("m=") {
            return Err(SaslError::ExtensionsNotSupported);
        }
        let user = user.strip_prefix("n=").ok_or(MALFORMED)?;
        let username = prepare_username(&sasl_name(user).ok_or(SaslError::InvalidUsername)?)?;
        let client_nonce = attrs
            .next()
            .and_then(|r| r.strip_prefix("r="))
            .ok_or(MALFORMED)?;
        if !valid_nonce(client_nonce) {
            return Err(SaslError::Malformed("invalid nonce"));
        }
        // Further attributes are optional extensions, ignored (RFC 5802 §7).
        let authzid = check_authzid(&username, authzid.as_deref(), &self.domain)?;

        Ok(ScramAwaitingCredential {
            fake: self.fake_keys(hash, &scram, &username),
            hash,
            scram,
            nonce: format!("{client_nonce}{}", self.server_nonce()?),
            client_first_bare: bare.to_owned(),
            cbind_input,
            username,
            authzid,
        })
    }

    fn server_nonce(&self) -> Result<String, SaslError> {
        #[cfg(test)]
        if let Some(nonce) = &self.nonce {
            return Ok(nonce.clone());
        }
        let mut bytes = [0; NONCE_BYTES];
        getrandom::fill(&mut bytes).map_err(|_| SaslError::TemporaryFailure("no randomness"))?;
        Ok(B64.encode(bytes))
    }

    /// Deterministic keys for an unknown user (RFC 5802 §9): salt and keys
    /// are HMAC-SHA-256(secret, label, mechanism, domain, username).
    fn fake_keys(&self, hash: Hash, scram: &ScramMechanism, username: &str) -> Keys {
        let derive = |label: &str, len: usize| {
            let parts = [label, scram.as_str(), &self.domain, username];
            let mut out = Hash::Sha256.hmac(&self.secret, &[parts.join("\0").as_bytes()]);
            out.truncate(len);
            out
        };
        Keys {
            hash,
            salt: derive("switchboard fake salt", SALT_LEN),
            iterations: self.fake_iterations,
            stored_key: derive("switchboard fake stored key", hash.len()),
            server_key: derive("switchboard fake server key", hash.len()),
        }
    }
}

const MALFORMED: SaslError = SaslError::Malformed("invalid SCRAM syntax");

/// A bounded UTF-8 SCRAM message (RFC 5802 §7: UTF-8; §9: bounded).
fn text(message: &[u8]) -> Result<&str, SaslError> {
    if message.len() > MAX_MESSAGE_LEN {
        return Err(SaslError::Malformed("message too long"));
    }
    std::str::from_utf8(message).map_err(|_| SaslError::Malformed("not UTF-8"))
}

/// Decodes a `saslname` (RFC 5802 §5.1, §7): `=2C` is `,`, `=3D` is `=`, any
/// other `=` is an error; must be non-empty.
fn sasl_name(value: &str) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        out.push(match rest.get(i + 1..i + 3)? {
            "2C" => ',',
            "3D" => '=',
            _ => return None,
        });
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    (!out.is_empty()).then_some(out)
}

/// A nonce is printable ASCII except `,` (RFC 5802 §7 `printable`).
fn valid_nonce(nonce: &str) -> bool {
    !nonce.is_empty()
        && nonce
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// After client-first (RFC 5802 §5): waiting for the caller to look up the
/// stored credential of [`Self::username`] (RFC 5802 §3).
pub struct ScramAwaitingCredential {
    hash: Hash,
    scram: ScramMechanism,
    nonce: String,
    client_first_bare: String,
    cbind_input: Vec<u8>,
    fake: Keys,
    username: String,
    authzid: Option<BareJid>,
}

impl fmt::Debug for ScramAwaitingCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramAwaitingCredential")
            .field("mechanism", &self.scram)
            .field("username", &self.username)
            .field("authzid", &self.authzid)
            .finish_non_exhaustive()
    }
}

impl ScramAwaitingCredential {
    /// The authentication identity from `n=`, unescaped and prepared as a
    /// localpart (RFC 5802 §5.1, RFC 6120 §6.3.7, RFC 8265 §3.3).
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The authorization identity from `a=`, already checked to be the
    /// user's own bare JID (RFC 5802 §5.1, RFC 6120 §6.3.8).
    pub fn authzid(&self) -> Option<&BareJid> {
        self.authzid.as_ref()
    }

    /// The kind of credential to look up (RFC 5802 §3, RFC 7677 §2).
    pub fn credential_mechanism(&self) -> &ScramMechanism {
        &self.scram
    }

    /// Produces the server-first message `r=...,s=...,i=...` (RFC 5802
    /// §5.1, §7). `None` (unknown user) or a credential for another
    /// mechanism proceeds with fake keys and fails at the proof (RFC 5802
    /// §9); a corrupt credential is `temporary-auth-failure`.
    pub fn server_first(
        self,
        credential: Option<&ScramCredential>,
    ) -> Result<(Vec<u8>, ScramAwaitingFinal), SaslError> {
        let keys = match credential.map(Keys::decode).transpose()?.flatten() {
            Some(keys) if keys.hash == self.hash => keys,
            _ => self.fake,
        };
        let server_first = format!(
            "r={},s={},i={}",
            self.nonce,
            B64.encode(&keys.salt),
            keys.iterations
        );
        let auth_message_prefix = format!("{},{server_first}", self.client_first_bare);
        let state = ScramAwaitingFinal {
            keys,
            nonce: self.nonce,
            auth_message_prefix,
            cbind_input: self.cbind_input,
            username: self.username,
            authzid: self.authzid,
        };
        Ok((server_first.into_bytes(), state))
    }
}

/// After server-first (RFC 5802 §5): waiting for client-final.
pub struct ScramAwaitingFinal {
    keys: Keys,
    nonce: String,
    auth_message_prefix: String,
    cbind_input: Vec<u8>,
    username: String,
    authzid: Option<BareJid>,
}

impl fmt::Debug for ScramAwaitingFinal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScramAwaitingFinal")
            .field("username", &self.username)
            .field("authzid", &self.authzid)
            .finish_non_exhaustive()
    }
}

impl ScramAwaitingFinal {
    /// Verifies client-final `c=...,r=...,p=...` (RFC 5802 §5.1, §7): the
    /// channel binding equals the GS2 header plus `tls-exporter` data
    /// (RFC 5802 §6, RFC 9266 §3), the nonce is client + server nonce, and
    /// `H(ClientProof XOR ClientSignature) == StoredKey` in constant time
    /// (RFC 5802 §3). Returns server-final `v=ServerSignature`.
    pub fn finish(self, client_final: &[u8]) -> Result<(Vec<u8>, Authenticated), SaslError> {
        let message = text(client_final)?;
        let (without_proof, proof) = message.rsplit_once(",p=").ok_or(MALFORMED)?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|c| c.strip_prefix("c="))
            .ok_or(MALFORMED)?;
        let nonce = attrs
            .next()
            .and_then(|r| r.strip_prefix("r="))
            .ok_or(MALFORMED)?;
        let cbind = B64.decode(cbind).map_err(|_| MALFORMED)?;
        let proof = B64.decode(proof).map_err(|_| MALFORMED)?;
        if !bool::from(cbind.ct_eq(&self.cbind_input)) {
            return Err(SaslError::ChannelBindingMismatch);
        }
        if nonce != self.nonce {
            return Err(SaslError::NonceMismatch);
        }

        let Keys {
            hash,
            stored_key,
            server_key,
            ..
        } = &self.keys;
        let auth_message = [
            self.auth_message_prefix.as_bytes(),
            b",",
            without_proof.as_bytes(),
        ];
        let client_signature = hash.hmac(stored_key, &auth_message);
        if proof.len() != client_signature.len() {
            return Err(SaslError::NotAuthorized);
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        if !bool::from(hash.h(&client_key).ct_eq(stored_key)) {
            return Err(SaslError::NotAuthorized);
        }
        let server_signature = hash.hmac(server_key, &auth_message);
        let server_final = format!("v={}", B64.encode(server_signature)).into_bytes();
        Ok((
            server_final,
            Authenticated {
                username: self.username,
                authzid: self.authzid,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DOMAIN: &str = "example.com";

    /// A minimal SCRAM client (RFC 5802 §3, §5) to drive exchanges.
    struct Client {
        hash: Hash,
        password: String,
        gs2_header: String,
        cb_data: Vec<u8>,
        client_first_bare: String,
        nonce: String,
    }

    impl Client {
        fn new(mech: Mechanism, user: &str, password: &str, nonce: &str) -> Self {
            let hash = Hash::of(&mech.scram_mechanism().unwrap()).unwrap();
            let gs2 = if mech.is_plus() {
                "p=tls-exporter,,"
            } else {
                "n,,"
            };
            Self::custom(hash, gs2, &[], user, password, nonce)
        }

        fn custom(hash: Hash, gs2: &str, cb: &[u8], user: &str, pw: &str, nonce: &str) -> Self {
            let user = user.replace('=', "=3D").replace(',', "=2C");
            Self {
                hash,
                password: pw.to_owned(),
                gs2_header: gs2.to_owned(),
                cb_data: cb.to_vec(),
                client_first_bare: format!("n={user},r={nonce}"),
                nonce: nonce.to_owned(),
            }
        }

        fn first(&self) -> Vec<u8> {
            format!("{}{}", self.gs2_header, self.client_first_bare).into_bytes()
        }

        /// Client-final for a server-first.
        fn r#final(&self, server_first: &[u8]) -> Vec<u8> {
            let sf = std::str::from_utf8(server_first).unwrap();
            let mut attrs = sf.split(',').map(|a| &a[2..]);
            let (nonce, salt, i) = (
                attrs.next().unwrap(),
                attrs.next().unwrap(),
                attrs.next().unwrap(),
            );
            assert!(nonce.starts_with(&self.nonce));
            let mut salted = vec![0; self.hash.len()];
            let (salt, i) = (B64.decode(salt).unwrap(), i.parse().unwrap());
            let pw = prepare_password(&self.password).unwrap();
            match self.hash {
                Hash::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(pw.as_bytes(), &salt, i, &mut salted),
                Hash::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(pw.as_bytes(), &salt, i, &mut salted),
            }
            let client_key = self.hash.hmac(&salted, &[b"Client Key"]);
            let cbind = [self.gs2_header.as_bytes(), &self.cb_data].concat();
            let without_proof = format!("c={},r={nonce}", B64.encode(cbind));
            let auth = format!("{},{sf},{without_proof}", self.client_first_bare);
            let sig = self
                .hash
                .hmac(&self.hash.h(&client_key), &[auth.as_bytes()]);
            let proof: Vec<u8> = client_key.iter().zip(sig).map(|(k, s)| k ^ s).collect();
            format!("{without_proof},p={}", B64.encode(proof)).into_bytes()
        }
    }

    fn server() -> ScramServer {
        ScramServer::new(DOMAIN, [7; 32])
    }

    fn cred(mech: ScramMechanism, pw: &str) -> ScramCredential {
        derive(mech, pw, b"0123456789abcdef", MIN_ITERATIONS).unwrap()
    }

    fn exchange(
        mech: Mechanism,
        client: &Client,
        cb: Option<&ChannelBindingData>,
        credential: Option<&ScramCredential>,
    ) -> Result<Authenticated, SaslError> {
        let pending = server().start(mech, &client.first(), cb, true)?;
        let (sf, state) = pending.server_first(credential)?;
        state.finish(&client.r#final(&sf)).map(|(_, auth)| auth)
    }

    fn rfc_vector(mech: Mechanism, cnonce: &str, snonce: &str, salt: &str, proof: &[u8], v: &[u8]) {
        let salt_bytes = B64.decode(salt).unwrap();
        let credential =
            derive(mech.scram_mechanism().unwrap(), "pencil", &salt_bytes, 4096).unwrap();
        let client = Client::new(mech, "user", "pencil", cnonce);
        assert_eq!(client.first(), format!("n,,n=user,r={cnonce}").into_bytes());
        let pending = server()
            .with_nonce(snonce)
            .start(mech, &client.first(), None, false)
            .unwrap();
        assert_eq!(pending.username(), "user");
        let (sf, state) = pending.server_first(Some(&credential)).unwrap();
        assert_eq!(
            sf,
            format!("r={cnonce}{snonce},s={salt},i=4096").into_bytes()
        );
        assert_eq!(client.r#final(&sf), proof);
        let (server_final, auth) = state.finish(proof).unwrap();
        assert_eq!(server_final, v);
        assert_eq!(
            auth,
            Authenticated {
                username: "user".into(),
                authzid: None
            }
        );
    }

    #[test]
    fn rfc5802_section5_scram_sha1() {
        rfc_vector(
            Mechanism::ScramSha1,
            "fyko+d2lbbFgONRv9qkxdawL",
            "3rfcNHYJY1ZVvWVs7j",
            "QSXCR+Q6sek8bf92",
            b"c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            b"v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        );
    }

    #[test]
    fn rfc7677_section3_scram_sha256() {
        rfc_vector(
            Mechanism::ScramSha256,
            "rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            "W22ZaJ0SNY7soEsUEjb6gQ==",
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
              p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        );
    }

    #[test]
    fn wrong_password_is_not_authorized() {
        let c = cred(ScramMechanism::ScramSha256, "pencil");
        let client = Client::new(Mechanism::ScramSha256, "user", "crayon", "abc");
        let err = exchange(Mechanism::ScramSha256, &client, None, Some(&c)).unwrap_err();
        assert_eq!(
            (err.condition(), err.server_error()),
            ("not-authorized", Some("invalid-proof"))
        );
    }

    #[test]
    fn tampered_nonce_fails() {
        let c = cred(ScramMechanism::ScramSha1, "pencil");
        let client = Client::new(Mechanism::ScramSha1, "user", "pencil", "abc");
        let (sf, state) = server()
            .start(Mechanism::ScramSha1, &client.first(), None, false)
            .unwrap()
            .server_first(Some(&c))
            .unwrap();
        let tampered = String::from_utf8(client.r#final(&sf))
            .unwrap()
            .replacen(",r=abc", ",r=abd", 1);
        assert_eq!(
            state.finish(tampered.as_bytes()).unwrap_err(),
            SaslError::NonceMismatch
        );
    }

    #[test]
    fn plus_with_tls_exporter() {
        let c = cred(ScramMechanism::ScramSha256, "pencil");
        let data = ChannelBindingData::tls_exporter([1; 32]);
        let cb = || Some(&data);
        let good = Client::custom(
            Hash::Sha256,
            "p=tls-exporter,,",
            &[1; 32],
            "user",
            "pencil",
            "n1",
        );
        assert!(exchange(Mechanism::ScramSha256Plus, &good, cb(), Some(&c)).is_ok());
        let bad = Client::custom(
            Hash::Sha256,
            "p=tls-exporter,,",
            &[2; 32],
            "user",
            "pencil",
            "n1",
        );
        let err = exchange(Mechanism::ScramSha256Plus, &bad, cb(), Some(&c)).unwrap_err();
        assert_eq!(err, SaslError::ChannelBindingMismatch);
        assert_eq!(err.server_error(), Some("channel-bindings-dont-match"));
        // Other channel-binding types, GS2 flags inconsistent with the
        // mechanism, and -PLUS without exporter data are refused.
        let srv = server();
        let start = |m, msg: &[u8], cb: Option<&ChannelBindingData>| {
            srv.start(m, msg, cb, true).map(|_| ()).unwrap_err()
        };
        let plus = Mechanism::ScramSha256Plus;
        assert_eq!(
            start(plus, b"p=tls-unique,,n=u,r=x", cb()),
            SaslError::UnsupportedChannelBindingType
        );
        assert_eq!(
            start(plus, b"n,,n=u,r=x", cb()).condition(),
            "malformed-request"
        );
        assert_eq!(
            start(plus, b"p=tls-exporter,,n=u,r=x", None),
            SaslError::InvalidMechanism
        );
        let plain = Mechanism::ScramSha256;
        assert_eq!(
            start(plain, b"p=tls-exporter,,n=u,r=x", cb()),
            SaslError::ChannelBindingNotSupported
        );
        assert_eq!(
            start(Mechanism::Plain, b"n,,n=u,r=x", None),
            SaslError::InvalidMechanism
        );
    }

    #[test]
    fn y_flag_downgrade_detection() {
        let c = cred(ScramMechanism::ScramSha1, "pencil");
        let client = Client::custom(Hash::Sha1, "y,,", &[], "user", "pencil", "n1");
        let srv = server();
        let err = srv
            .start(Mechanism::ScramSha1, &client.first(), None, true)
            .unwrap_err();
        assert_eq!(
            err.server_error(),
            Some("server-does-support-channel-binding")
        );
        // Without -PLUS on offer, `y` is fine (RFC 5802 §6).
        let (sf, state) = srv
            .start(Mechanism::ScramSha1, &client.first(), None, false)
            .unwrap()
            .server_first(Some(&c))
            .unwrap();
        assert!(state.finish(&client.r#final(&sf)).is_ok());
    }

    #[test]
    fn unknown_user_fails_at_proof_like_a_wrong_password() {
        let client = Client::new(Mechanism::ScramSha256, "ghost", "pencil", "abc");
        let srv = server().with_nonce("S");
        let first = |srv: &ScramServer| {
            srv.start(Mechanism::ScramSha256, &client.first(), None, false)
                .unwrap()
                .server_first(None)
                .unwrap()
        };
        let (sf, state) = first(&srv);
        assert_eq!(first(&srv).0, sf, "fake salt is deterministic");
        let sf_text = String::from_utf8(sf.clone()).unwrap();
        let salt = B64
            .decode(
                sf_text
                    .split(",s=")
                    .nth(1)
                    .unwrap()
                    .split(',')
                    .next()
                    .unwrap(),
            )
            .unwrap();
        assert_eq!(salt.len(), SALT_LEN);
        assert!(sf_text.ends_with(",i=4096"));
        assert_eq!(
            state.finish(&client.r#final(&sf)).unwrap_err(),
            SaslError::NotAuthorized
        );
        // A credential for another mechanism behaves the same.
        let sha1 = cred(ScramMechanism::ScramSha1, "pencil");
        let (sf, state) = srv
            .start(Mechanism::ScramSha256, &client.first(), None, false)
            .unwrap()
            .server_first(Some(&sha1))
            .unwrap();
        assert_eq!(
            state.finish(&client.r#final(&sf)).unwrap_err(),
            SaslError::NotAuthorized
        );
    }

    #[test]
    fn parses_names_authzid_and_limits() {
        let srv = server();
        let start = |msg: &str| srv.start(Mechanism::ScramSha1, msg.as_bytes(), None, false);
        let p = start("n,a=Ju=2Cl=3Diet@example.com,n=Ju=2Cl=3Diet,r=x,ext=1").unwrap();
        assert_eq!(p.username(), "ju,l=iet");
        assert_eq!(p.authzid().unwrap().as_str(), "ju,l=iet@example.com");
        assert_eq!(
            start("n,a=romeo@example.com,n=juliet,r=x").unwrap_err(),
            SaslError::InvalidAuthzid
        );
        assert_eq!(
            start("n,,m=foo,n=u,r=x").unwrap_err(),
            SaslError::ExtensionsNotSupported
        );
        assert_eq!(
            start("n,,n=u=2D,r=x").unwrap_err(),
            SaslError::InvalidUsername
        );
        assert_eq!(
            start("n,,n=u,r=a\u{7f}b").unwrap_err().condition(),
            "malformed-request"
        );
        assert_eq!(
            start("n,,n=u,r=").unwrap_err().condition(),
            "malformed-request"
        );
        let long = format!("n,,n=u,r={}", "x".repeat(MAX_MESSAGE_LEN));
        assert_eq!(
            start(&long).unwrap_err(),
            SaslError::Malformed("message too long")
        );
        assert_eq!(
            derive(ScramMechanism::ScramSha1, "pencil", b"salt", 4095),
            Err(CredentialError::TooFewIterations(4095))
        );
        assert_eq!(
            derive(ScramMechanism::ScramSha1, "", b"salt", 4096),
            Err(CredentialError::InvalidPassword)
        );
    }

    #[test]
    fn new_credentials_are_salted_and_debug_is_redacted() {
        let a = new_credentials(ScramMechanism::ScramSha256, "pencil", 4096).unwrap();
        let b = new_credentials(ScramMechanism::ScramSha256, "pencil", 4096).unwrap();
        assert_ne!(a.salt_b64, b.salt_b64);
        assert_eq!(B64.decode(&a.salt_b64).unwrap().len(), SALT_LEN);
        let client = Client::new(Mechanism::ScramSha256, "user", "pencil", "abc");
        assert!(exchange(Mechanism::ScramSha256, &client, None, Some(&a)).is_ok());

        let pending = server()
            .start(Mechanism::ScramSha256, &client.first(), None, false)
            .unwrap();
        let (_, state) = pending.server_first(Some(&a)).unwrap();
        for debug in [
            format!("{:?}", server()),
            format!("{state:?}"),
            format!("{a:?}"),
        ] {
            assert!(
                !debug.contains(&a.stored_key_b64) && !debug.contains("[7, 7"),
                "{debug}"
            );
        }
        assert!(!format!("{:?}", ChannelBindingData::tls_exporter([9; 32])).contains('9'));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(first in proptest::collection::vec(any::<u8>(), 0..300),
                                last in proptest::collection::vec(any::<u8>(), 0..300),
                                text in "[a-zA-Z0-9=,+/ pcnry-]{0,80}") {
            let srv = server();
            let data = ChannelBindingData::tls_exporter([1; 32]);
        let cb = || Some(&data);
            for mech in Mechanism::ALL {
                let _ = srv.start(mech, &first, cb(), true);
                let _ = srv.start(mech, text.as_bytes(), cb(), false);
            }
            let pending = srv.start(Mechanism::ScramSha1, b"n,,n=user,r=abc", None, false).unwrap();
            let (_, state) = pending.server_first(None).unwrap();
            let _ = state.finish(&last);
            let pending = srv.start(Mechanism::ScramSha1, b"n,,n=user,r=abc", None, false).unwrap();
            let (_, state) = pending.server_first(None).unwrap();
            let _ = state.finish(text.as_bytes());
        }
    }
}
