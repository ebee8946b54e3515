//! RFC 4616: the PLAIN mechanism, verified against stored SCRAM credentials
//! (RFC 5802 §3), so no plaintext password is ever stored.
//!
//! PLAIN sends the password in the clear: the caller must offer and accept
//! it only on a TLS-protected stream (RFC 4616 §5, RFC 6120 §6.4.2, §13.8);
//! see [`super::offered`] and [`super::Mechanism::ensure_offered`].

use std::fmt;

use subtle::ConstantTimeEq;
use switchboard_schemas::BareJid;
use switchboard_schemas::events::ScramCredential;

use super::scram::{Hash, Keys, MIN_ITERATIONS, prepare_password};
use super::{Authenticated, SaslError, check_authzid, prepare_username};

/// The longest accepted PLAIN message, in bytes (RFC 4616 §2 allows 255
/// octets per field; we allow some slack).
pub const MAX_MESSAGE_LEN: usize = 1024;

/// A parsed PLAIN message `[authzid] NUL authcid NUL passwd` (RFC 4616 §2),
/// waiting for the caller to look up the credential of [`Self::username`].
/// `Debug` never shows the password.
pub struct PlainRequest {
    username: String,
    authzid: Option<BareJid>,
    password: String,
}

impl fmt::Debug for PlainRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlainRequest")
            .field("username", &self.username)
            .field("authzid", &self.authzid)
            .finish_non_exhaustive()
    }
}

impl PlainRequest {
    /// Parses the (base64-decoded) initial response (RFC 4616 §2, RFC 6120
    /// §6.4.2): UTF-8, at most [`MAX_MESSAGE_LEN`] bytes, exactly two NULs,
    /// non-empty authcid and password. The authcid is prepared as a
    /// localpart (RFC 6120 §6.3.7, RFC 8265 §3.3); an authzid must be the
    /// user's own bare JID in `domain` (RFC 6120 §6.3.8).
    pub fn parse(message: &[u8], domain: &str) -> Result<Self, SaslError> {
        if message.len() > MAX_MESSAGE_LEN {
            return Err(SaslError::Malformed("message too long"));
        }
        let message =
            std::str::from_utf8(message).map_err(|_| SaslError::Malformed("not UTF-8"))?;
        let fields: Vec<&str> = message.split('\0').collect();
        let [authzid, authcid, password] = fields[..] else {
            return Err(SaslError::Malformed("PLAIN needs exactly three fields"));
        };
        if authcid.is_empty() || password.is_empty() {
            return Err(SaslError::Malformed("empty authcid or password"));
        }
        let username = prepare_username(authcid)?;
        let authzid = check_authzid(&username, Some(authzid), domain)?;
        Ok(Self {
            username,
            authzid,
            password: password.to_owned(),
        })
    }

    /// The authentication identity, prepared (RFC 4616 §2, RFC 8265 §3.3).
    pub fn username(&self) -> &str {
        &self.username
    }

    /// The checked authorization identity (RFC 4616 §2, RFC 6120 §6.3.8).
    pub fn authzid(&self) -> Option<&BareJid> {
        self.authzid.as_ref()
    }

    /// Verifies the password against a stored SCRAM credential (RFC 4616
    /// §2 "verify", RFC 5802 §3): prepares it with OpaqueString (RFC 8265
    /// §4.2), derives `StoredKey`/`ServerKey` with the stored salt and
    /// iteration count and compares both in constant time. `None` (unknown
    /// user) does comparable work and fails the same way (RFC 6120 §6.5.10
    /// `not-authorized`); a corrupt credential is `temporary-auth-failure`.
    pub fn verify(self, credential: Option<&ScramCredential>) -> Result<Authenticated, SaslError> {
        let keys = credential.map(Keys::decode).transpose()?.flatten();
        let password = prepare_password(&self.password);
        let ok = match (keys, password) {
            (Some(k), Some(pw)) => {
                let (stored, server) = k.hash.keys(&pw, &k.salt, k.iterations);
                (stored.ct_eq(&k.stored_key) & server.ct_eq(&k.server_key)).into()
            }
            (None, pw) => {
                let pw = pw.as_deref().unwrap_or_default();
                let _ = Hash::Sha256.keys(pw, b"switchboard dummy salt", MIN_ITERATIONS);
                false
            }
            (Some(_), None) => false,
        };
        if !ok {
            return Err(SaslError::NotAuthorized);
        }
        Ok(Authenticated {
            username: self.username,
            authzid: self.authzid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sasl::scram::derive;
    use proptest::prelude::*;
    use switchboard_schemas::events::ScramMechanism;

    fn verify(
        msg: &[u8],
        credential: Option<&ScramCredential>,
    ) -> Result<Authenticated, SaslError> {
        PlainRequest::parse(msg, "example.com")?.verify(credential)
    }

    #[test]
    fn verifies_against_scram_credentials() {
        for mech in [ScramMechanism::ScramSha1, ScramMechanism::ScramSha256] {
            let c = derive(mech, "pencil", b"saltsaltsaltsalt", 4096).unwrap();
            let auth = verify(b"\0User\0pencil", Some(&c)).unwrap();
            assert_eq!(
                auth,
                Authenticated {
                    username: "user".into(),
                    authzid: None
                }
            );
            let auth = verify(b"user@example.com\0user\0pencil", Some(&c)).unwrap();
            assert_eq!(auth.authzid.unwrap().as_str(), "user@example.com");
            assert_eq!(
                verify(b"\0user\0crayon", Some(&c)),
                Err(SaslError::NotAuthorized)
            );
            assert_eq!(
                verify(b"\0user\0pencil", None),
                Err(SaslError::NotAuthorized)
            );
        }
    }

    #[test]
    fn rejects_malformed_messages() {
        for bad in [
            &b"user\0pencil"[..],
            b"\0user\0pen\0cil",
            b"\0\0pencil",
            b"\0user\0",
            b"\0us\xffer\0pw",
        ] {
            assert_eq!(
                verify(bad, None).unwrap_err().condition(),
                "malformed-request"
            );
        }
        let long = [b"\0user\0".as_slice(), &[b'x'; MAX_MESSAGE_LEN]].concat();
        assert_eq!(
            verify(&long, None),
            Err(SaslError::Malformed("message too long"))
        );
        assert_eq!(
            verify(b"romeo@example.com\0juliet\0pw", None),
            Err(SaslError::InvalidAuthzid)
        );
        let req = PlainRequest::parse(b"\0user\0secret-pw", "example.com").unwrap();
        assert!(!format!("{req:?}").contains("secret-pw"));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(msg in proptest::collection::vec(any::<u8>(), 0..1100)) {
            let _ = verify(&msg, None);
        }
    }
}
