//! RFC 3261 §22 and RFC 7616 (HTTP Digest, SHA-256 and MD5; RFC 8760 for
//! SIP): the challenge (§22.1, `WWW-Authenticate` in a 401), the client's
//! `Authorization` and its verification against the stored
//! `HA1 = H(username:realm:password)`.
//!
//! Nonces carry their issue time and an HMAC over it with the node secret,
//! so they need no table: a nonce whose MAC fails is invalid, one older than
//! the lifetime is stale (answered with `stale=true`, RFC 7616 §3.3).

use hmac::{Hmac, KeyInit, Mac};
use md5::Md5;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use switchboard_schemas::events::DigestAlgorithm;

/// Why an `Authorization` header was refused as unreadable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Not the Digest scheme.
    #[error("not a digest authorization")]
    NotDigest,
    /// A parameter is malformed or a required one is missing.
    #[error("malformed digest parameter: {0}")]
    Malformed(&'static str),
    /// An algorithm this server does not offer.
    #[error("unsupported digest algorithm")]
    UnsupportedAlgorithm,
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// `H(data)` in lower-case hex for the algorithm (RFC 7616 §3.4.2).
pub fn h(algorithm: &DigestAlgorithm, data: &[u8]) -> String {
    match algorithm {
        DigestAlgorithm::Sha256 => hex(&Sha256::digest(data)),
        // MD5 (RFC 3261 §22.4) and unknown future values fall back to MD5's
        // role only where a stored secret named them; offered are the two.
        _ => hex(&Md5::digest(data)),
    }
}

/// `HA1 = H(username:realm:password)` (RFC 7616 §3.4.2) for storing.
pub fn ha1(algorithm: &DigestAlgorithm, username: &str, realm: &str, password: &str) -> String {
    h(
        algorithm,
        format!("{username}:{realm}:{password}").as_bytes(),
    )
}

/// The algorithms offered, one challenge each (RFC 8760 §2.4). MD5 comes
/// first: RFC 3261-era clients (and SIPp) answer only the first challenge
/// and fail on one they do not know, while RFC 8760 clients choose the
/// first they support, so SHA-256 first would lock the older ones out. Both
/// secrets are stored for every user.
pub const OFFERED: [DigestAlgorithm; 2] = [DigestAlgorithm::Md5, DigestAlgorithm::Sha256];

/// Issues and checks nonces.
#[derive(Clone)]
pub struct Nonces {
    secret: [u8; 32],
    lifetime_secs: u64,
}

/// What a nonce is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    /// Issued by this deployment and not expired.
    Fresh,
    /// Issued here but older than the lifetime: challenge with `stale=true`.
    Stale,
    /// Not issued here.
    Invalid,
}

impl Nonces {
    /// Nonces under `secret`, valid `lifetime_secs`.
    pub fn new(secret: [u8; 32], lifetime_secs: u64) -> Self {
        Self {
            secret,
            lifetime_secs,
        }
    }

    fn mac(&self, issued: u64) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.secret)
            .expect("hmac accepts any key length");
        mac.update(b"sip-nonce:");
        mac.update(&issued.to_be_bytes());
        hex(&mac.finalize().into_bytes()[..16])
    }

    /// A nonce issued at `now` (Unix seconds).
    pub fn issue(&self, now: u64) -> String {
        format!("{now:016x}{}", self.mac(now))
    }

    /// Checks a nonce at `now` (Unix seconds).
    pub fn check(&self, nonce: &str, now: u64) -> NonceCheck {
        if nonce.len() != 48 || !nonce.is_ascii() {
            return NonceCheck::Invalid;
        }
        let Ok(issued) = u64::from_str_radix(&nonce[..16], 16) else {
            return NonceCheck::Invalid;
        };
        if !bool::from(self.mac(issued).as_bytes().ct_eq(&nonce.as_bytes()[16..])) {
            return NonceCheck::Invalid;
        }
        if issued > now.saturating_add(5) || now - issued.min(now) > self.lifetime_secs {
            return NonceCheck::Stale;
        }
        NonceCheck::Fresh
    }
}

/// A `WWW-Authenticate` value (RFC 3261 §22.1, RFC 7616 §3.3).
pub fn challenge(algorithm: &DigestAlgorithm, realm: &str, nonce: &str, stale: bool) -> String {
    format!(
        "Digest realm=\"{realm}\", nonce=\"{nonce}\", algorithm={}, qop=\"auth\"{}",
        algorithm.as_str(),
        if stale { ", stale=true" } else { "" }
    )
}

/// The parameters of an `Authorization: Digest ...` header (RFC 7616 §3.4).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Credentials {
    /// `username`.
    pub username: String,
    /// `realm`.
    pub realm: String,
    /// `nonce`.
    pub nonce: String,
    /// `uri` (the digest-uri).
    pub uri: String,
    /// `response`.
    pub response: String,
    /// `algorithm` (MD5 when absent, RFC 3261 §22.4).
    pub algorithm: Option<DigestAlgorithm>,
    /// `cnonce`.
    pub cnonce: Option<String>,
    /// `nc`.
    pub nc: Option<String>,
    /// `qop`.
    pub qop: Option<String>,
}

impl Credentials {
    /// The algorithm named, MD5 when none.
    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm.clone().unwrap_or(DigestAlgorithm::Md5)
    }
}

/// Most parameters read from one header.
const MAX_PARAMS: usize = 32;

/// Parses an `Authorization` value.
pub fn parse_authorization(value: &str) -> Result<Credentials, DigestError> {
    let value = value.trim();
    let (scheme, rest) = value
        .split_once([' ', '\t'])
        .ok_or(DigestError::NotDigest)?;
    if !scheme.eq_ignore_ascii_case("digest") {
        return Err(DigestError::NotDigest);
    }
    let mut c = Credentials::default();
    let mut rest = rest.trim_start();
    let mut count = 0;
    while !rest.is_empty() {
        count += 1;
        if count > MAX_PARAMS {
            return Err(DigestError::Malformed("too many parameters"));
        }
        let (name, after) = rest
            .split_once('=')
            .ok_or(DigestError::Malformed("parameter"))?;
        let name = name.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (val, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, ch)) = chars.next() {
                match ch {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            out.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    _ => out.push(ch),
                }
            }
            let end = end.ok_or(DigestError::Malformed("unterminated quoted string"))?;
            (out, &quoted[end + 1..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        match name.as_str() {
            "username" => c.username = val,
            "realm" => c.realm = val,
            "nonce" => c.nonce = val,
            "uri" => c.uri = val,
            "response" => c.response = val.to_ascii_lowercase(),
            "algorithm" => {
                c.algorithm = Some(match val.to_ascii_uppercase().as_str() {
                    "MD5" => DigestAlgorithm::Md5,
                    "SHA-256" => DigestAlgorithm::Sha256,
                    _ => return Err(DigestError::UnsupportedAlgorithm),
                })
            }
            "cnonce" => c.cnonce = Some(val),
            "nc" => c.nc = Some(val),
            "qop" => c.qop = Some(val.to_ascii_lowercase()),
            _ => {}
        }
        rest = remaining.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    if c.username.is_empty() {
        return Err(DigestError::Malformed("username"));
    }
    if c.nonce.is_empty() {
        return Err(DigestError::Malformed("nonce"));
    }
    if c.uri.is_empty() {
        return Err(DigestError::Malformed("uri"));
    }
    if c.response.is_empty() {
        return Err(DigestError::Malformed("response"));
    }
    match c.qop.as_deref() {
        None | Some("auth")
            if c.qop.is_none()
                || (c.cnonce.as_deref().is_some_and(|s| !s.is_empty())
                    && c.nc.as_deref().is_some_and(|s| !s.is_empty())) => {}
        Some("auth") => {
            return Err(DigestError::Malformed(
                "cnonce and nc are required with qop",
            ));
        }
        _ => return Err(DigestError::Malformed("qop")),
    }
    Ok(c)
}

/// The expected `response` (RFC 7616 §3.4.1; RFC 2069 form without qop,
/// which RFC 3261 §22.4 keeps for compatibility).
pub fn expected_response(c: &Credentials, method: &str, ha1_hex: &str) -> String {
    let algorithm = c.algorithm();
    let ha2 = h(&algorithm, format!("{method}:{}", c.uri).as_bytes());
    match c.qop.as_deref() {
        Some(qop) => h(
            &algorithm,
            format!(
                "{ha1_hex}:{}:{}:{}:{qop}:{ha2}",
                c.nonce,
                c.nc.as_deref().unwrap_or(""),
                c.cnonce.as_deref().unwrap_or("")
            )
            .as_bytes(),
        ),
        None => h(
            &algorithm,
            format!("{ha1_hex}:{}:{ha2}", c.nonce).as_bytes(),
        ),
    }
}

/// Whether the response proves knowledge of the password (constant time).
pub fn verify(c: &Credentials, method: &str, ha1_hex: &str) -> bool {
    let expected = expected_response(c, method, ha1_hex);
    bool::from(expected.as_bytes().ct_eq(c.response.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_2617_example_response() {
        // RFC 2617 §3.5 (the same computation as RFC 3261 §22.4 with MD5).
        let c = Credentials {
            username: "Mufasa".into(),
            realm: "testrealm@host.com".into(),
            nonce: "dcd98b7102dd2f0e8b11d0f600bfb0c093".into(),
            uri: "/dir/index.html".into(),
            response: "6629fae49393a05397450978507c4ef1".into(),
            algorithm: None,
            cnonce: Some("0a4f113b".into()),
            nc: Some("00000001".into()),
            qop: Some("auth".into()),
        };
        let ha1 = ha1(
            &DigestAlgorithm::Md5,
            "Mufasa",
            "testrealm@host.com",
            "Circle Of Life",
        );
        assert!(verify(&c, "GET", &ha1));
        let wrong = super::ha1(&DigestAlgorithm::Md5, "Mufasa", "testrealm@host.com", "x");
        assert!(!verify(&c, "GET", &wrong));
    }

    #[test]
    fn rfc_7616_sha256_example() {
        // RFC 7616 §3.9.1.
        let c = parse_authorization(
            "Digest username=\"Mufasa\", realm=\"http-auth@example.org\", \
             uri=\"/dir/index.html\", algorithm=SHA-256, \
             nonce=\"7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v\", nc=00000001, \
             cnonce=\"f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ\", qop=auth, \
             response=\"753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1\", \
             opaque=\"FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS\"",
        )
        .unwrap();
        assert_eq!(c.algorithm(), DigestAlgorithm::Sha256);
        let ha1 = ha1(
            &DigestAlgorithm::Sha256,
            "Mufasa",
            "http-auth@example.org",
            "Circle of Life",
        );
        assert!(verify(&c, "GET", &ha1));
    }

    #[test]
    fn nonces_expire_and_cannot_be_forged() {
        let nonces = Nonces::new([7; 32], 300);
        let n = nonces.issue(1_000_000);
        assert_eq!(nonces.check(&n, 1_000_100), NonceCheck::Fresh);
        assert_eq!(nonces.check(&n, 1_000_301), NonceCheck::Stale);
        let mut forged = n.clone();
        forged.replace_range(47..48, if n.ends_with('0') { "1" } else { "0" });
        assert_eq!(nonces.check(&forged, 1_000_100), NonceCheck::Invalid);
        let other = Nonces::new([8; 32], 300);
        assert_eq!(other.check(&n, 1_000_100), NonceCheck::Invalid);
        assert_eq!(nonces.check("short", 1), NonceCheck::Invalid);
        assert_eq!(nonces.check(&"é".repeat(24), 1), NonceCheck::Invalid);
    }

    #[test]
    fn malformed_authorizations_are_refused() {
        assert_eq!(
            parse_authorization("Basic dXNlcjpwYXNz"),
            Err(DigestError::NotDigest)
        );
        assert_eq!(
            parse_authorization("Digest username=\"a\", nonce=\"n\", uri=\"sip:x\""),
            Err(DigestError::Malformed("response"))
        );
        assert_eq!(
            parse_authorization(
                "Digest username=\"a\", nonce=\"n\", uri=\"sip:x\", response=\"r\", qop=auth"
            ),
            Err(DigestError::Malformed(
                "cnonce and nc are required with qop"
            ))
        );
        assert_eq!(
            parse_authorization(
                "Digest username=\"a\", nonce=\"n\", uri=\"sip:x\", response=\"r\", algorithm=SHA-512-256"
            ),
            Err(DigestError::UnsupportedAlgorithm)
        );
        assert!(parse_authorization("Digest username=\"a").is_err());
        let many = format!("Digest {}", "a=b, ".repeat(40));
        assert_eq!(
            parse_authorization(&many),
            Err(DigestError::Malformed("too many parameters"))
        );
    }
}
