//! Typed XMPP addresses ("JIDs"), validated and normalised per RFC 7622.
//!
//! This module is the only way network input becomes an address: every
//! `to`/`from` attribute, bound resource and roster item passes through
//! [`Jid::parse`] (or [`BareJid::parse`] / [`FullJid::parse`]) before the
//! gateway acts on it or puts it into an event. The values held by [`Jid`],
//! [`BareJid`] and [`FullJid`] are always in canonical form, so their
//! `Eq`/`Ord`/`Hash` implementations compare addresses the way RFC 7622 §3
//! says they must be compared, and their `Display` output is the string that
//! events carry (see the conversions into [`switchboard_schemas::BareJid`]
//! and [`switchboard_schemas::FullJid`]).
//!
//! The rules applied:
//!
//! - **Structure** (RFC 7622 §3.1–§3.4): `[localpart@]domainpart[/resourcepart]`.
//!   The input is split *before* any Unicode mapping (RFC 7622 §3.1,
//!   implementation note): the resourcepart is everything after the first `/`;
//!   in what precedes it, the localpart is everything before the first `@`
//!   and the domainpart the rest (RFC 7622 §3.2 steps 1–2). A separator that
//!   is present requires a non-empty part on its other side.
//! - **Localpart** (RFC 7622 §3.3): the PRECIS `UsernameCaseMapped` profile
//!   (RFC 8265 §3.3: width mapping, case mapping to lowercase, NFC, bidi
//!   rule), applied until stable (RFC 8264 §7), then the additional
//!   prohibited characters `" & ' / : < > @` of RFC 7622 §3.3.1, then a
//!   length of 1 to 1023 bytes.
//! - **Domainpart** (RFC 7622 §3.2): one trailing `.` stripped, ASCII
//!   lowercased, 1 to 1023 bytes, and within the DNS limits that RFC 7622
//!   §3.2.1 defers to (labels of 1–63 letters, digits and hyphens, not
//!   starting or ending with a hyphen; names of at most 253 bytes), or an
//!   IPv4 address, or a bracketed IPv6 literal (RFC 3986 §3.2.2).
//!   **Internationalised domain names are not supported yet:** the gateway
//!   has no IDNA2008 (RFC 5891) implementation among its dependencies, so a
//!   non-ASCII domainpart is rejected with [`JidError::DomainpartNotAscii`]
//!   and an ACE label (`xn--…`, or any label with `--` in positions 3–4) with
//!   [`JidError::DomainpartReservedLabel`], rather than being accepted in a
//!   form that would later compare differently.
//! - **Resourcepart** (RFC 7622 §3.4): the PRECIS `OpaqueString` profile
//!   (RFC 8265 §4.2: non-ASCII spaces mapped to U+0020, NFC, case preserved),
//!   applied until stable, then a length of 1 to 1023 bytes. A resourcepart
//!   starting with a space is rejected, as RFC 7622 §3.5 lists
//!   `juliet@example.com/ foo` among the strings that are not JIDs.
//!
//! The project's stricter rule for the domains it *hosts* (SPEC §3: no IP
//! addresses, no leading digit, last label not starting with a digit) is not
//! part of parsing — any RFC 7622 address can be a peer — but a separate
//! check, [`validate_hosted_domain`].
//!
//! XEP-0106 (JID Escaping) is provided by [`escape_localpart`] and
//! [`unescape_localpart`]; parsing never escapes or unescapes implicitly, so
//! `space cadet@example.com` is rejected while `space\20cadet@example.com`
//! is a valid JID.
//!
//! Every [`JidError`] maps to the `jid-malformed` stanza error condition
//! (RFC 6120 §8.3.3.8).

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use precis_profiles::precis_core;
use precis_profiles::precis_core::profile::{Profile, stabilize};
use precis_profiles::{OpaqueString, UsernameCaseMapped};

/// The maximum length in bytes of each of the localpart, domainpart and
/// resourcepart after normalisation (RFC 7622 §3.2, §3.3, §3.4).
pub const MAX_PART_BYTES: usize = 1023;

/// The maximum length in bytes of a DNS domain name in its textual form,
/// without the trailing dot (RFC 1035 §2.3.4; RFC 7622 §3.2.1 keeps the DNS
/// limits in force).
pub const MAX_DNS_NAME_BYTES: usize = 253;

/// The maximum length in bytes of one DNS label (RFC 1035 §2.3.4).
pub const MAX_DNS_LABEL_BYTES: usize = 63;

/// Inputs longer than this many times [`MAX_PART_BYTES`] are rejected before
/// the PRECIS rules run. The mappings of RFC 8265 shrink a string by at most
/// a factor of three (a halfwidth Hangul jamo triple composing into one
/// syllable, a fullwidth letter mapping to ASCII), so no input rejected here
/// could have been short enough after normalisation.
const PRECHECK_FACTOR: usize = 4;

/// The characters RFC 7622 §3.3.1 prohibits in a localpart in addition to
/// what the PRECIS `UsernameCaseMapped` profile disallows.
const LOCALPART_PROHIBITED: [char; 8] = ['"', '&', '\'', '/', ':', '<', '>', '@'];

/// The stanza error condition for a malformed address (RFC 6120 §8.3.3.8).
pub const JID_MALFORMED: &str = "jid-malformed";

/// The part of a JID an error is about (RFC 7622 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JidPart {
    /// The optional localpart before `@` (RFC 7622 §3.3).
    Localpart,
    /// The mandatory domainpart (RFC 7622 §3.2).
    Domainpart,
    /// The optional resourcepart after `/` (RFC 7622 §3.4).
    Resourcepart,
}

impl fmt::Display for JidPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Localpart => "localpart",
            Self::Domainpart => "domainpart",
            Self::Resourcepart => "resourcepart",
        })
    }
}

/// Why a string is not a valid XMPP address (RFC 7622), or not a domain
/// this deployment may host (SPEC §3).
///
/// Messages name the part and the rule but never echo the whole input (it
/// is network data and may be large); at most the offending character is
/// quoted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JidError {
    /// An `@` with nothing before it (RFC 7622 §3.3: a localpart, if
    /// present, is 1 to 1023 bytes).
    #[error("localpart is empty (RFC 7622 §3.3)")]
    EmptyLocalpart,
    /// The localpart is longer than 1023 bytes after normalisation
    /// (RFC 7622 §3.3).
    #[error("localpart is {len} bytes long; at most 1023 are allowed (RFC 7622 §3.3)")]
    LocalpartTooLong {
        /// Length in bytes (after normalisation, or of the raw input when it
        /// was too long to be worth normalising).
        len: usize,
    },
    /// The localpart contains one of `" & ' / : < > @`, directly or after
    /// width mapping of a fullwidth variant (RFC 7622 §3.3.1).
    #[error("localpart contains the prohibited character {ch:?} (RFC 7622 §3.3.1)")]
    LocalpartProhibitedChar {
        /// The prohibited character.
        ch: char,
    },
    /// The localpart does not conform to the PRECIS `UsernameCaseMapped`
    /// profile (RFC 8265 §3.3), e.g. it contains a space or a symbol.
    #[error("localpart violates the PRECIS UsernameCaseMapped profile (RFC 8265 §3.3): {reason}")]
    LocalpartPrecis {
        /// What the PRECIS rules objected to.
        reason: String,
    },
    /// The domainpart is empty or missing (RFC 7622 §3.2), e.g. `juliet@`
    /// or `/foobar`.
    #[error("domainpart is empty (RFC 7622 §3.2)")]
    EmptyDomainpart,
    /// The domainpart is longer than 1023 bytes (RFC 7622 §3.2).
    #[error("domainpart is {len} bytes long; at most 1023 are allowed (RFC 7622 §3.2)")]
    DomainpartTooLong {
        /// Length in bytes.
        len: usize,
    },
    /// The domain name is longer than DNS allows (RFC 1035 §2.3.4, kept in
    /// force by RFC 7622 §3.2.1).
    #[error("domain name is {len} bytes long; DNS allows at most 253 (RFC 1035 §2.3.4)")]
    DomainNameTooLong {
        /// Length in bytes.
        len: usize,
    },
    /// The domainpart contains a non-ASCII character. Internationalised
    /// domain names need IDNA2008 (RFC 7622 §3.2.2, RFC 5891), which this
    /// gateway does not implement yet.
    #[error(
        "domainpart contains the non-ASCII character {ch:?}; internationalised domain names \
         (IDNA2008, RFC 7622 §3.2.2) are not supported"
    )]
    DomainpartNotAscii {
        /// The first non-ASCII character.
        ch: char,
    },
    /// A domain label is empty (`a..b`, `.a`, or more than one trailing dot).
    #[error("domainpart contains an empty label (RFC 7622 §3.2, RFC 1035 §2.3.1)")]
    DomainpartEmptyLabel,
    /// A domain label is longer than 63 bytes (RFC 1035 §2.3.4).
    #[error("domain label is {len} bytes long; DNS allows at most 63 (RFC 1035 §2.3.4)")]
    DomainpartLabelTooLong {
        /// Length in bytes.
        len: usize,
    },
    /// A domain label contains something other than letters, digits and
    /// hyphens (RFC 5890 §2.3.1 LDH labels).
    #[error(
        "domainpart contains the character {ch:?}; labels are letters, digits and hyphens \
         (RFC 5890 §2.3.1)"
    )]
    DomainpartInvalidChar {
        /// The offending character.
        ch: char,
    },
    /// A domain label starts or ends with a hyphen (RFC 5890 §2.3.1).
    #[error("a domain label starts or ends with '-' (RFC 5890 §2.3.1)")]
    DomainpartHyphen,
    /// A domain label has `--` in positions 3 and 4: an IDNA A-label
    /// (`xn--…`) or a reserved label (RFC 5890 §2.3.1). A-labels are not
    /// supported without IDNA2008.
    #[error(
        "domain label has \"--\" in positions 3-4 (an IDNA A-label or reserved LDH label, \
         RFC 5890 §2.3.1); internationalised domain names are not supported"
    )]
    DomainpartReservedLabel,
    /// The last label is all digits but the domainpart is not a valid IPv4
    /// address (RFC 3986 §3.2.2 `IPv4address`; top-level domains are never
    /// numeric).
    #[error("domainpart looks numeric but is not a valid IPv4 address (RFC 7622 §3.2)")]
    DomainpartInvalidIpv4,
    /// A bracketed domainpart is not a valid IPv6 literal (RFC 3986 §3.2.2;
    /// `IPvFuture` and zone identifiers are not accepted).
    #[error("domainpart is not a valid IPv6 literal (RFC 7622 §3.2, RFC 3986 §3.2.2)")]
    DomainpartInvalidIpLiteral,
    /// A `/` with nothing after it (RFC 7622 §3.4: a resourcepart, if
    /// present, is 1 to 1023 bytes).
    #[error("resourcepart is empty (RFC 7622 §3.4)")]
    EmptyResourcepart,
    /// The resourcepart is longer than 1023 bytes after normalisation
    /// (RFC 7622 §3.4).
    #[error("resourcepart is {len} bytes long; at most 1023 are allowed (RFC 7622 §3.4)")]
    ResourcepartTooLong {
        /// Length in bytes.
        len: usize,
    },
    /// The resourcepart starts with a space (after mapping non-ASCII spaces
    /// to U+0020); RFC 7622 §3.5 lists `juliet@example.com/ foo` as not a
    /// JID.
    #[error("resourcepart starts with a space (RFC 7622 §3.5)")]
    ResourcepartLeadingSpace,
    /// The resourcepart does not conform to the PRECIS `OpaqueString`
    /// profile (RFC 8265 §4.2), e.g. it contains a control character.
    #[error("resourcepart violates the PRECIS OpaqueString profile (RFC 8265 §4.2): {reason}")]
    ResourcepartPrecis {
        /// What the PRECIS rules objected to.
        reason: String,
    },
    /// A full JID was required but the address has no resourcepart
    /// (RFC 7622 §3.4, RFC 6120 §7).
    #[error("a full JID needs a resourcepart (RFC 7622 §3.4)")]
    MissingResourcepart,
    /// A bare JID was required but the address has a resourcepart
    /// (RFC 7622 §3.4).
    #[error("a bare JID must not have a resourcepart (RFC 7622 §3.4)")]
    UnexpectedResourcepart,
    /// A hosted domain must not be an IP address (SPEC §3).
    #[error("a hosted domain must not be an IP address (SPEC §3)")]
    HostedDomainIpAddress,
    /// A hosted domain must not start with a digit (SPEC §3, e.g.
    /// `5.cisco.com`).
    #[error("a hosted domain must not start with a digit (SPEC §3)")]
    HostedDomainLeadingDigit,
    /// The last label of a hosted domain must not start with a digit
    /// (SPEC §3, e.g. `cisco.5com`).
    #[error("the last label of a hosted domain must not start with a digit (SPEC §3)")]
    HostedDomainLastLabelDigit,
}

impl JidError {
    /// The stanza error condition to answer with: always `jid-malformed`
    /// (RFC 6120 §8.3.3.8), whichever part is wrong.
    pub fn stanza_error_condition(&self) -> &'static str {
        JID_MALFORMED
    }

    /// Which part of the address is wrong, if the error is about one part
    /// (not for [`JidError::MissingResourcepart`] and
    /// [`JidError::UnexpectedResourcepart`], which are about the kind of
    /// address; the hosted-domain errors are about the domainpart).
    pub fn part(&self) -> Option<JidPart> {
        match self {
            Self::EmptyLocalpart
            | Self::LocalpartTooLong { .. }
            | Self::LocalpartProhibitedChar { .. }
            | Self::LocalpartPrecis { .. } => Some(JidPart::Localpart),
            Self::EmptyDomainpart
            | Self::DomainpartTooLong { .. }
            | Self::DomainNameTooLong { .. }
            | Self::DomainpartNotAscii { .. }
            | Self::DomainpartEmptyLabel
            | Self::DomainpartLabelTooLong { .. }
            | Self::DomainpartInvalidChar { .. }
            | Self::DomainpartHyphen
            | Self::DomainpartReservedLabel
            | Self::DomainpartInvalidIpv4
            | Self::DomainpartInvalidIpLiteral
            | Self::HostedDomainIpAddress
            | Self::HostedDomainLeadingDigit
            | Self::HostedDomainLastLabelDigit => Some(JidPart::Domainpart),
            Self::EmptyResourcepart
            | Self::ResourcepartTooLong { .. }
            | Self::ResourcepartLeadingSpace
            | Self::ResourcepartPrecis { .. } => Some(JidPart::Resourcepart),
            Self::MissingResourcepart | Self::UnexpectedResourcepart => None,
        }
    }
}

// ---------------------------------------------------------------------------
// Part normalisation
// ---------------------------------------------------------------------------

/// Describes a PRECIS failure without echoing the input.
fn describe_precis(err: &precis_core::Error) -> String {
    match err {
        precis_core::Error::Invalid => "empty after mapping, fails the bidi rule (RFC 5893), \
                                        or does not stabilise (RFC 8264 §7)"
            .to_owned(),
        precis_core::Error::BadCodepoint(info) => format!(
            "code point U+{:04X} at position {} is not allowed ({})",
            info.cp, info.position, info.property
        ),
        precis_core::Error::Unexpected(unexpected) => unexpected.to_string(),
    }
}

fn enforce_username(s: &str) -> Result<Cow<'_, str>, precis_core::Error> {
    UsernameCaseMapped::new().enforce(s)
}

fn enforce_opaque(s: &str) -> Result<Cow<'_, str>, precis_core::Error> {
    OpaqueString::new().enforce(s)
}

fn is_localpart_prohibited(c: char) -> bool {
    LOCALPART_PROHIBITED.contains(&c)
}

/// Normalises a localpart (RFC 7622 §3.3; RFC 8265 §3.3).
fn normalize_localpart(raw: &str) -> Result<String, JidError> {
    if raw.is_empty() {
        return Err(JidError::EmptyLocalpart);
    }
    if raw.len() > PRECHECK_FACTOR * MAX_PART_BYTES {
        return Err(JidError::LocalpartTooLong { len: raw.len() });
    }
    // Checked before PRECIS for the clearer message, and again after it,
    // because width mapping turns e.g. U+FF20 FULLWIDTH COMMERCIAL AT into '@'.
    if let Some(ch) = raw.chars().find(|&c| is_localpart_prohibited(c)) {
        return Err(JidError::LocalpartProhibitedChar { ch });
    }
    let out = stabilize(raw, enforce_username).map_err(|e| JidError::LocalpartPrecis {
        reason: describe_precis(&e),
    })?;
    if let Some(ch) = out.chars().find(|&c| is_localpart_prohibited(c)) {
        return Err(JidError::LocalpartProhibitedChar { ch });
    }
    if out.is_empty() {
        return Err(JidError::EmptyLocalpart);
    }
    if out.len() > MAX_PART_BYTES {
        return Err(JidError::LocalpartTooLong { len: out.len() });
    }
    Ok(out.into_owned())
}

/// Normalises a resourcepart (RFC 7622 §3.4; RFC 8265 §4.2).
fn normalize_resourcepart(raw: &str) -> Result<String, JidError> {
    if raw.is_empty() {
        return Err(JidError::EmptyResourcepart);
    }
    if raw.len() > PRECHECK_FACTOR * MAX_PART_BYTES {
        return Err(JidError::ResourcepartTooLong { len: raw.len() });
    }
    let out = stabilize(raw, enforce_opaque).map_err(|e| JidError::ResourcepartPrecis {
        reason: describe_precis(&e),
    })?;
    if out.is_empty() {
        return Err(JidError::EmptyResourcepart);
    }
    if out.starts_with(' ') {
        return Err(JidError::ResourcepartLeadingSpace);
    }
    if out.len() > MAX_PART_BYTES {
        return Err(JidError::ResourcepartTooLong { len: out.len() });
    }
    Ok(out.into_owned())
}

/// Normalises a domainpart (RFC 7622 §3.2), ASCII only (see the module
/// documentation).
fn normalize_domainpart(raw: &str) -> Result<String, JidError> {
    if raw.len() > MAX_PART_BYTES {
        return Err(JidError::DomainpartTooLong { len: raw.len() });
    }
    // IP-literal (RFC 3986 §3.2.2): IPv6 only, printed in RFC 5952 form.
    if let Some(inner) = raw.strip_prefix('[') {
        let addr: Ipv6Addr = inner
            .strip_suffix(']')
            .and_then(|inner| inner.parse().ok())
            .ok_or(JidError::DomainpartInvalidIpLiteral)?;
        return Ok(format!("[{addr}]"));
    }
    // RFC 7622 §3.2: a final label separator is stripped (once).
    let name = raw.strip_suffix('.').unwrap_or(raw);
    if name.is_empty() {
        return Err(JidError::EmptyDomainpart);
    }
    if let Some(ch) = name.chars().find(|c| !c.is_ascii()) {
        return Err(JidError::DomainpartNotAscii { ch });
    }
    let name = name.to_ascii_lowercase();
    for label in name.split('.') {
        if label.is_empty() {
            return Err(JidError::DomainpartEmptyLabel);
        }
        if let Some(ch) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(JidError::DomainpartInvalidChar { ch });
        }
        if label.len() > MAX_DNS_LABEL_BYTES {
            return Err(JidError::DomainpartLabelTooLong { len: label.len() });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(JidError::DomainpartHyphen);
        }
        if label.get(2..4) == Some("--") {
            return Err(JidError::DomainpartReservedLabel);
        }
    }
    if name.len() > MAX_DNS_NAME_BYTES {
        return Err(JidError::DomainNameTooLong { len: name.len() });
    }
    // A numeric last label: only a dotted-quad IPv4 address qualifies.
    let last = name.rsplit('.').next().unwrap_or_default();
    if last.bytes().all(|b| b.is_ascii_digit()) {
        let addr: Ipv4Addr = name.parse().map_err(|_| JidError::DomainpartInvalidIpv4)?;
        return Ok(addr.to_string());
    }
    Ok(name)
}

/// Checks that `domain` is a domain this deployment may host, and returns
/// it normalised.
///
/// First the RFC 7622 §3.2 domainpart rules apply (as in parsing), then the
/// project rule of SPEC §3 (seed: "the domain portion … cannot start with a
/// number and cannot contain an IP address"; "the last label must not start
/// with a number"): not an IPv4 or IPv6 address, not starting with a digit
/// (`5.cisco.com`), last label not starting with a digit (`cisco.5com`,
/// `abc.1om`). Names are at most 253 bytes, within SPEC §3's 255 characters.
///
/// This is deliberately not part of parsing: peers on other servers may use
/// any RFC 7622 domainpart.
pub fn validate_hosted_domain(domain: &str) -> Result<String, JidError> {
    let domain = normalize_domainpart(domain)?;
    if domain.starts_with('[') || domain.parse::<Ipv4Addr>().is_ok() {
        return Err(JidError::HostedDomainIpAddress);
    }
    if domain.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(JidError::HostedDomainLeadingDigit);
    }
    let last = domain.rsplit('.').next().unwrap_or_default();
    if last.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(JidError::HostedDomainLastLabelDigit);
    }
    Ok(domain)
}

/// Splits a JID string into its raw parts (RFC 7622 §3.1–§3.2): the
/// resourcepart after the first `/`, then the localpart before the first `@`
/// of what remains. No mapping happens before the split.
fn split(s: &str) -> (Option<&str>, &str, Option<&str>) {
    let (rest, resource) = match s.split_once('/') {
        Some((rest, resource)) => (rest, Some(resource)),
        None => (s, None),
    };
    let (local, domain) = match rest.split_once('@') {
        Some((local, domain)) => (Some(local), domain),
        None => (None, rest),
    };
    (local, domain, resource)
}

// ---------------------------------------------------------------------------
// BareJid
// ---------------------------------------------------------------------------

/// A bare JID `[localpart@]domainpart` (RFC 7622 §3): a user account, or a
/// server or service when it has no localpart.
///
/// Always normalised: the localpart per PRECIS `UsernameCaseMapped`
/// (RFC 8265 §3.3) and RFC 7622 §3.3.1, the domainpart per RFC 7622 §3.2.
/// Equality, ordering and hashing are those of the normalised parts, so
/// `Juliet@Example.COM` and `juliet@example.com` are the same address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BareJid {
    local: Option<String>,
    domain: String,
}

impl BareJid {
    /// Builds a bare JID from separate, not yet normalised parts
    /// (RFC 7622 §3.2, §3.3). The localpart is taken as is: apply
    /// [`escape_localpart`] first to a user name that may contain spaces or
    /// the characters of RFC 7622 §3.3.1 (XEP-0106 §4).
    pub fn new(local: Option<&str>, domain: &str) -> Result<Self, JidError> {
        Ok(Self {
            local: local.map(normalize_localpart).transpose()?,
            domain: normalize_domainpart(domain)?,
        })
    }

    /// Parses `[localpart@]domainpart` (RFC 7622 §3.1); an address with a
    /// resourcepart is rejected with [`JidError::UnexpectedResourcepart`].
    pub fn parse(s: &str) -> Result<Self, JidError> {
        match Jid::parse(s)? {
            Jid::Bare(bare) => Ok(bare),
            Jid::Full(_) => Err(JidError::UnexpectedResourcepart),
        }
    }

    /// The normalised localpart (RFC 7622 §3.3), if any. It is still
    /// XEP-0106-escaped; see [`unescape_localpart`] for display.
    pub fn local(&self) -> Option<&str> {
        self.local.as_deref()
    }

    /// The normalised domainpart (RFC 7622 §3.2).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Whether this is a domain-only JID such as `example.com`
    /// (RFC 7622 §3: no localpart).
    pub fn is_domain(&self) -> bool {
        self.local.is_none()
    }

    /// The full JID of a session of this entity, with `resource` validated
    /// and normalised per RFC 7622 §3.4 (PRECIS `OpaqueString`, RFC 8265
    /// §4.2).
    pub fn with_resource(&self, resource: &str) -> Result<FullJid, JidError> {
        Ok(FullJid {
            bare: self.clone(),
            resource: normalize_resourcepart(resource)?,
        })
    }
}

impl fmt::Display for BareJid {
    /// The canonical string form `[localpart@]domainpart` (RFC 7622 §3.1).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(local) = &self.local {
            f.write_str(local)?;
            f.write_str("@")?;
        }
        f.write_str(&self.domain)
    }
}

impl FromStr for BareJid {
    type Err = JidError;

    /// Same as [`BareJid::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<&BareJid> for switchboard_schemas::BareJid {
    /// The canonical string, as events carry it (schemas `address.rs`).
    fn from(jid: &BareJid) -> Self {
        Self::new(jid.to_string())
    }
}

impl From<BareJid> for switchboard_schemas::BareJid {
    /// The canonical string, as events carry it (schemas `address.rs`).
    fn from(jid: BareJid) -> Self {
        Self::from(&jid)
    }
}

impl TryFrom<&switchboard_schemas::BareJid> for BareJid {
    type Error = JidError;

    /// Re-validates an address read from an event (RFC 7622 §3). Values
    /// produced by this module always pass and compare equal to the
    /// original.
    fn try_from(jid: &switchboard_schemas::BareJid) -> Result<Self, Self::Error> {
        Self::parse(jid.as_str())
    }
}

// ---------------------------------------------------------------------------
// FullJid
// ---------------------------------------------------------------------------

/// A full JID `[localpart@]domainpart/resourcepart` (RFC 7622 §3): one
/// session (or other resource) of an entity.
///
/// The bare part is normalised as for [`BareJid`]; the resourcepart per
/// PRECIS `OpaqueString` (RFC 8265 §4.2), case preserved, so
/// `juliet@example.com/Balcony` and `juliet@example.com/balcony` differ.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FullJid {
    bare: BareJid,
    resource: String,
}

impl FullJid {
    /// Builds a full JID from separate, not yet normalised parts
    /// (RFC 7622 §3.2–§3.4).
    pub fn new(local: Option<&str>, domain: &str, resource: &str) -> Result<Self, JidError> {
        BareJid::new(local, domain)?.with_resource(resource)
    }

    /// Parses `[localpart@]domainpart/resourcepart` (RFC 7622 §3.1); an
    /// address without a resourcepart is rejected with
    /// [`JidError::MissingResourcepart`].
    pub fn parse(s: &str) -> Result<Self, JidError> {
        match Jid::parse(s)? {
            Jid::Full(full) => Ok(full),
            Jid::Bare(_) => Err(JidError::MissingResourcepart),
        }
    }

    /// The bare JID: this address without its resourcepart (RFC 7622 §3).
    pub fn bare(&self) -> &BareJid {
        &self.bare
    }

    /// The bare JID, consuming this one.
    pub fn into_bare(self) -> BareJid {
        self.bare
    }

    /// The normalised localpart (RFC 7622 §3.3), if any.
    pub fn local(&self) -> Option<&str> {
        self.bare.local()
    }

    /// The normalised domainpart (RFC 7622 §3.2).
    pub fn domain(&self) -> &str {
        self.bare.domain()
    }

    /// The resourcepart (RFC 7622 §3.4), case preserved; may contain `/`
    /// and `@`.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// The same entity with another resourcepart (RFC 7622 §3.4).
    pub fn with_resource(&self, resource: &str) -> Result<FullJid, JidError> {
        self.bare.with_resource(resource)
    }
}

impl fmt::Display for FullJid {
    /// The canonical string form `[localpart@]domainpart/resourcepart`
    /// (RFC 7622 §3.1).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.bare, self.resource)
    }
}

impl FromStr for FullJid {
    type Err = JidError;

    /// Same as [`FullJid::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<&FullJid> for switchboard_schemas::FullJid {
    /// The canonical string, as events carry it (schemas `address.rs`).
    fn from(jid: &FullJid) -> Self {
        Self::new(jid.to_string())
    }
}

impl From<FullJid> for switchboard_schemas::FullJid {
    /// The canonical string, as events carry it (schemas `address.rs`).
    fn from(jid: FullJid) -> Self {
        Self::from(&jid)
    }
}

impl TryFrom<&switchboard_schemas::FullJid> for FullJid {
    type Error = JidError;

    /// Re-validates an address read from an event (RFC 7622 §3); it must
    /// have a resourcepart.
    fn try_from(jid: &switchboard_schemas::FullJid) -> Result<Self, Self::Error> {
        Self::parse(jid.as_str())
    }
}

// ---------------------------------------------------------------------------
// Jid
// ---------------------------------------------------------------------------

/// Any XMPP address, bare or full (RFC 7622 §3): what a stanza's `to` and
/// `from` attributes hold.
///
/// Ordered by bare JID, then resourcepart (a bare JID sorts before its full
/// JIDs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Jid {
    /// `[localpart@]domainpart`.
    Bare(BareJid),
    /// `[localpart@]domainpart/resourcepart`.
    Full(FullJid),
}

impl Jid {
    /// Parses and normalises `[localpart@]domainpart[/resourcepart]`
    /// (RFC 7622 §3.1–§3.4). Never panics, whatever the input.
    pub fn parse(s: &str) -> Result<Self, JidError> {
        let (local, domain, resource) = split(s);
        let bare = BareJid::new(local, domain)?;
        Ok(match resource {
            Some(resource) => Self::Full(bare.with_resource(resource)?),
            None => Self::Bare(bare),
        })
    }

    /// Builds a JID from separate, not yet normalised parts
    /// (RFC 7622 §3.2–§3.4).
    pub fn new(
        local: Option<&str>,
        domain: &str,
        resource: Option<&str>,
    ) -> Result<Self, JidError> {
        let bare = BareJid::new(local, domain)?;
        Ok(match resource {
            Some(resource) => Self::Full(bare.with_resource(resource)?),
            None => Self::Bare(bare),
        })
    }

    /// The bare JID (RFC 7622 §3): this address without any resourcepart.
    pub fn bare(&self) -> &BareJid {
        match self {
            Self::Bare(bare) => bare,
            Self::Full(full) => full.bare(),
        }
    }

    /// The bare JID, consuming this one.
    pub fn into_bare(self) -> BareJid {
        match self {
            Self::Bare(bare) => bare,
            Self::Full(full) => full.into_bare(),
        }
    }

    /// The normalised localpart (RFC 7622 §3.3), if any.
    pub fn local(&self) -> Option<&str> {
        self.bare().local()
    }

    /// The normalised domainpart (RFC 7622 §3.2).
    pub fn domain(&self) -> &str {
        self.bare().domain()
    }

    /// The resourcepart (RFC 7622 §3.4), if any, case preserved.
    pub fn resource(&self) -> Option<&str> {
        match self {
            Self::Bare(_) => None,
            Self::Full(full) => Some(full.resource()),
        }
    }

    /// Whether this address has no resourcepart.
    pub fn is_bare(&self) -> bool {
        matches!(self, Self::Bare(_))
    }

    /// Whether this address has a resourcepart.
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Full(_))
    }

    /// The full JID, if this address has a resourcepart.
    pub fn as_full(&self) -> Option<&FullJid> {
        match self {
            Self::Bare(_) => None,
            Self::Full(full) => Some(full),
        }
    }

    /// The same entity with the given resourcepart (RFC 7622 §3.4),
    /// replacing any it has.
    pub fn with_resource(&self, resource: &str) -> Result<FullJid, JidError> {
        self.bare().with_resource(resource)
    }
}

impl PartialOrd for Jid {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Jid {
    /// By bare JID, then resourcepart, a bare JID first.
    fn cmp(&self, other: &Self) -> Ordering {
        self.bare()
            .cmp(other.bare())
            .then_with(|| self.resource().cmp(&other.resource()))
    }
}

impl fmt::Display for Jid {
    /// The canonical string form (RFC 7622 §3.1).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bare(bare) => bare.fmt(f),
            Self::Full(full) => full.fmt(f),
        }
    }
}

impl FromStr for Jid {
    type Err = JidError;

    /// Same as [`Jid::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<BareJid> for Jid {
    fn from(bare: BareJid) -> Self {
        Self::Bare(bare)
    }
}

impl From<FullJid> for Jid {
    fn from(full: FullJid) -> Self {
        Self::Full(full)
    }
}

impl TryFrom<Jid> for FullJid {
    type Error = JidError;

    /// Fails with [`JidError::MissingResourcepart`] for a bare JID.
    fn try_from(jid: Jid) -> Result<Self, Self::Error> {
        match jid {
            Jid::Full(full) => Ok(full),
            Jid::Bare(_) => Err(JidError::MissingResourcepart),
        }
    }
}

// ---------------------------------------------------------------------------
// XEP-0106 JID escaping
// ---------------------------------------------------------------------------

/// The XEP-0106 §4.2 escape table: character and the two hex digits after
/// the backslash.
const ESCAPES: [(char, &str); 10] = [
    (' ', "20"),
    ('"', "22"),
    ('&', "26"),
    ('\'', "27"),
    ('/', "2f"),
    (':', "3a"),
    ('<', "3c"),
    ('>', "3e"),
    ('@', "40"),
    ('\\', "5c"),
];

/// The character an escape sequence `\` + `hex` stands for (XEP-0106 §4.2;
/// only the lowercase forms of the table are escape sequences).
fn unescaped_char(hex: &str) -> Option<char> {
    ESCAPES
        .iter()
        .find(|(_, code)| *code == hex)
        .map(|(ch, _)| *ch)
}

/// Whether `s` starts with one of the two-hex-digit codes of XEP-0106 §4.2.
fn starts_with_escape_code(s: &str) -> bool {
    s.get(..2).and_then(unescaped_char).is_some()
}

/// Escapes a user name for use as a localpart (XEP-0106 §4.2, "Escaping
/// Transformation").
///
/// Space and `" & ' / : < > @` become `\20 \22 \26 \27 \2f \3a \3c \3e \40`;
/// a backslash becomes `\5c` only where it would otherwise start an escape
/// sequence (it is followed by one of those codes or by `5c`), and stays as
/// it is otherwise, so `c:\net` escapes to `c\3a\net` and `c:\5commas` to
/// `c\3a\5c5commas`. [`unescape_localpart`] inverts this exactly.
///
/// XEP-0106 §3.3 forbids escaping a string that starts or ends with a space
/// (it would start or end with `\20`); callers reject such user names. The
/// result still has to pass RFC 7622 localpart validation, which will also
/// case-fold it.
pub fn escape_localpart(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, ch) in s.char_indices() {
        if ch == '\\' {
            if starts_with_escape_code(&s[i + 1..]) {
                out.push_str("\\5c");
            } else {
                out.push('\\');
            }
        } else if let Some((_, code)) = ESCAPES.iter().find(|(c, _)| *c == ch) {
            out.push('\\');
            out.push_str(code);
        } else {
            out.push(ch);
        }
    }
    out
}

/// Reverses [`escape_localpart`] (XEP-0106 §4.3, "Unescaping
/// Transformation"), e.g. for showing a localpart to a person or mapping it
/// back to a directory user name.
///
/// Each `\` followed by one of the codes `20 22 26 27 2f 3a 3c 3e 40 5c`
/// becomes the character it stands for; every other backslash is kept
/// literally.
pub fn unescape_localpart(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        match after.get(..2).and_then(unescaped_char) {
            Some(ch) => {
                out.push(ch);
                rest = &after[2..];
            }
            None => {
                out.push('\\');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    fn parts(jid: &Jid) -> (Option<&str>, &str, Option<&str>) {
        (jid.local(), jid.domain(), jid.resource())
    }

    /// RFC 7622 §3.5, table 1 (legal JIDs), with the parts each must yield.
    #[test]
    fn rfc7622_valid_examples() {
        let cases: &[(&str, Option<&str>, &str, Option<&str>)] = &[
            ("juliet@example.com", Some("juliet"), "example.com", None),
            (
                "juliet@example.com/foo",
                Some("juliet"),
                "example.com",
                Some("foo"),
            ),
            (
                "juliet@example.com/foo bar",
                Some("juliet"),
                "example.com",
                Some("foo bar"),
            ),
            (
                "juliet@example.com/foo@bar",
                Some("juliet"),
                "example.com",
                Some("foo@bar"),
            ),
            (
                r"foo\20bar@example.com",
                Some(r"foo\20bar"),
                "example.com",
                None,
            ),
            (
                "fussball@example.com",
                Some("fussball"),
                "example.com",
                None,
            ),
            ("fußball@example.com", Some("fußball"), "example.com", None),
            ("π@example.com", Some("π"), "example.com", None),
            ("Σ@example.com/foo", Some("σ"), "example.com", Some("foo")),
            ("σ@example.com/foo", Some("σ"), "example.com", Some("foo")),
            ("ς@example.com/foo", Some("ς"), "example.com", Some("foo")),
            ("king@example.com/♚", Some("king"), "example.com", Some("♚")),
            ("example.com", None, "example.com", None),
            ("example.com/foobar", None, "example.com", Some("foobar")),
            (
                "a.example.com/b@example.net",
                None,
                "a.example.com",
                Some("b@example.net"),
            ),
        ];
        for &(input, local, domain, resource) in cases {
            let jid = Jid::parse(input).unwrap_or_else(|e| panic!("{input:?} rejected: {e}"));
            assert_eq!(parts(&jid), (local, domain, resource), "{input:?}");
        }
        // Canonical forms print back unchanged, others in normalised form.
        assert_eq!(
            Jid::parse("juliet@example.com/foo bar")
                .unwrap()
                .to_string(),
            "juliet@example.com/foo bar"
        );
        assert_eq!(
            Jid::parse("Σ@example.com/foo").unwrap().to_string(),
            "σ@example.com/foo"
        );
        assert_eq!(
            Jid::parse("a.example.com/b@example.net")
                .unwrap()
                .to_string(),
            "a.example.com/b@example.net"
        );
    }

    /// RFC 7622 §3.5, table 2 (strings that violate the rules), plus the
    /// brief's fullwidth-@ case, each with the reason it must fail for.
    #[test]
    fn rfc7622_invalid_examples() {
        let must_fail = |input: &str| match Jid::parse(input) {
            Ok(jid) => panic!("{input:?} must be rejected, parsed as {jid}"),
            Err(err) => err,
        };
        assert_eq!(
            must_fail("\"juliet\"@example.com"),
            JidError::LocalpartProhibitedChar { ch: '"' }
        );
        assert!(matches!(
            must_fail("foo bar@example.com"),
            JidError::LocalpartPrecis { .. }
        ));
        assert_eq!(
            must_fail("juliet@example.com/ foo"),
            JidError::ResourcepartLeadingSpace
        );
        // U+3000 IDEOGRAPHIC SPACE maps to U+0020 first (RFC 8265 §4.2.1).
        assert_eq!(
            must_fail("juliet@example.com/\u{3000}foo"),
            JidError::ResourcepartLeadingSpace
        );
        assert_eq!(must_fail("@example.com/"), JidError::EmptyLocalpart);
        assert!(matches!(
            must_fail("henryⅣ@example.com"),
            JidError::LocalpartPrecis { .. }
        ));
        assert!(matches!(
            must_fail("♚@example.com"),
            JidError::LocalpartPrecis { .. }
        ));
        // No ASCII '@': the whole string is the domainpart (splitting happens
        // before width mapping, RFC 7622 §3.1), which is not a valid domain.
        assert_eq!(
            must_fail("henry＠example.com"),
            JidError::DomainpartNotAscii { ch: '＠' }
        );
        // Inside a localpart, width mapping turns U+FF20 into a prohibited '@'.
        assert_eq!(
            must_fail("henry＠home@example.com"),
            JidError::LocalpartProhibitedChar { ch: '@' }
        );
        assert_eq!(
            must_fail("a／b@example.com"),
            JidError::LocalpartProhibitedChar { ch: '/' }
        );
        assert_eq!(must_fail("juliet@"), JidError::EmptyDomainpart);
        assert_eq!(must_fail("/foobar"), JidError::EmptyDomainpart);
        assert_eq!(must_fail(""), JidError::EmptyDomainpart);
        assert_eq!(must_fail("example.com/"), JidError::EmptyResourcepart);
        assert_eq!(must_fail("@example.com"), JidError::EmptyLocalpart);
        assert!(matches!(
            must_fail("user@host@example.com"),
            JidError::DomainpartInvalidChar { ch: '@' }
        ));
        assert!(matches!(
            must_fail("juliet@example.com/a\u{0}b"),
            JidError::ResourcepartPrecis { .. }
        ));
    }

    #[test]
    fn every_error_is_jid_malformed() {
        for input in [
            "\"juliet\"@example.com",
            "foo bar@example.com",
            "juliet@example.com/ foo",
            "@example.com/",
            "henry＠example.com",
            "juliet@",
            "/foobar",
            "a..b",
            "[::g]",
            "1.2.3",
        ] {
            let err = Jid::parse(input).unwrap_err();
            assert_eq!(err.stanza_error_condition(), "jid-malformed", "{input:?}");
        }
        assert_eq!(
            validate_hosted_domain("10.0.0.1")
                .unwrap_err()
                .stanza_error_condition(),
            "jid-malformed"
        );
        assert_eq!(JidError::EmptyLocalpart.part(), Some(JidPart::Localpart));
        assert_eq!(JidError::DomainpartHyphen.part(), Some(JidPart::Domainpart));
        assert_eq!(
            JidError::EmptyResourcepart.part(),
            Some(JidPart::Resourcepart)
        );
        assert_eq!(JidError::MissingResourcepart.part(), None);
    }

    #[test]
    fn localpart_and_domain_are_case_insensitive_resource_is_not() {
        let a = Jid::parse("Juliet@Example.COM/Balcony").unwrap();
        let b = Jid::parse("juliet@example.com/Balcony").unwrap();
        let c = Jid::parse("juliet@example.com/balcony").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "juliet@example.com/Balcony");
        assert_ne!(b, c);
        assert_eq!(a.bare(), c.bare());
        let set: HashSet<Jid> = [a, b, c].into_iter().collect();
        assert_eq!(set.len(), 2);
        // Σ and σ fold together; final sigma ς does not (RFC 8265 §3.3).
        assert_eq!(
            BareJid::parse("Σ@example.com").unwrap(),
            BareJid::parse("σ@example.com").unwrap()
        );
        assert_ne!(
            BareJid::parse("ς@example.com").unwrap(),
            BareJid::parse("σ@example.com").unwrap()
        );
        // ß is lowercase already and is not case-folded to "ss".
        assert_ne!(
            BareJid::parse("fußball@example.com").unwrap(),
            BareJid::parse("fussball@example.com").unwrap()
        );
        // Width mapping and NFC (RFC 8265 §3.3.2).
        assert_eq!(
            BareJid::parse("ＪＵＬＩＥＴ@example.com").unwrap().local(),
            Some("juliet")
        );
        assert_eq!(
            BareJid::parse("e\u{301}@example.com").unwrap(),
            BareJid::parse("é@example.com").unwrap()
        );
        // The resource keeps its case but is NFC-normalised (RFC 8265 §4.2).
        assert_eq!(
            Jid::parse("example.com/Re\u{301}s").unwrap().resource(),
            Some("Rés")
        );
        assert_eq!(
            Jid::parse("example.com/a\u{a0}b").unwrap().resource(),
            Some("a b")
        );
    }

    #[test]
    fn length_limits_are_1023_bytes_after_normalisation() {
        let at = |n: usize| "a".repeat(n);
        assert_eq!(
            Jid::parse(&format!("{}@example.com", at(1023)))
                .unwrap()
                .local()
                .map(str::len),
            Some(1023)
        );
        assert_eq!(
            Jid::parse(&format!("{}@example.com", at(1024))),
            Err(JidError::LocalpartTooLong { len: 1024 })
        );
        // Counted after mapping: 1024 fullwidth letters (3 bytes each) map to
        // 1024 ASCII bytes; 1023 of them fit.
        assert!(Jid::parse(&format!("{}@example.com", "Ａ".repeat(1023))).is_ok());
        assert_eq!(
            Jid::parse(&format!("{}@example.com", "Ａ".repeat(1024))),
            Err(JidError::LocalpartTooLong { len: 1024 })
        );
        assert_eq!(
            Jid::parse(&format!("{}@example.com", "é".repeat(512))),
            Err(JidError::LocalpartTooLong { len: 1024 })
        );
        assert_eq!(
            Jid::parse(&format!("example.com/{}", at(1023)))
                .unwrap()
                .resource()
                .map(str::len),
            Some(1023)
        );
        assert_eq!(
            Jid::parse(&format!("example.com/{}", at(1024))),
            Err(JidError::ResourcepartTooLong { len: 1024 })
        );
        // The domainpart: 1023/1024 bytes per RFC 7622, but DNS caps names at
        // 253 bytes and labels at 63.
        let label = |c: char, n: usize| c.to_string().repeat(n);
        let d253 = format!(
            "{}.{}.{}.{}",
            label('a', 63),
            label('b', 63),
            label('c', 63),
            label('d', 61)
        );
        assert_eq!(d253.len(), 253);
        assert_eq!(Jid::parse(&d253).unwrap().domain(), d253);
        assert_eq!(Jid::parse(&format!("{d253}.")).unwrap().domain(), d253);
        assert_eq!(
            Jid::parse(&format!("{d253}e")),
            Err(JidError::DomainNameTooLong { len: 254 })
        );
        assert_eq!(
            Jid::parse(&label('a', 64)),
            Err(JidError::DomainpartLabelTooLong { len: 64 })
        );
        let d1023 = std::iter::repeat_n("abcdefg", 128)
            .collect::<Vec<_>>()
            .join(".");
        assert_eq!(d1023.len(), 1023);
        assert_eq!(
            Jid::parse(&d1023),
            Err(JidError::DomainNameTooLong { len: 1023 })
        );
        assert_eq!(
            Jid::parse(&format!("{d1023}x")),
            Err(JidError::DomainpartTooLong { len: 1024 })
        );
        // Huge inputs are refused before PRECIS runs.
        assert_eq!(
            Jid::parse(&format!("{}@example.com", at(100_000))),
            Err(JidError::LocalpartTooLong { len: 100_000 })
        );
    }

    #[test]
    fn domainpart_rules() {
        let domain = |s: &str| Jid::parse(s).map(|j| j.domain().to_owned());
        assert_eq!(domain("EXAMPLE.com."), Ok("example.com".to_owned()));
        assert_eq!(domain("localhost"), Ok("localhost".to_owned()));
        assert_eq!(domain("juliet@127.0.0.1/r"), Ok("127.0.0.1".to_owned()));
        assert_eq!(
            domain("[2001:0DB8:0:0:0:0:0:1]"),
            Ok("[2001:db8::1]".to_owned())
        );
        assert_eq!(domain("juliet@[::1]/r"), Ok("[::1]".to_owned()));
        assert_eq!(domain("3com.com"), Ok("3com.com".to_owned()));
        assert_eq!(domain("example.com.."), Err(JidError::DomainpartEmptyLabel));
        assert_eq!(domain("."), Err(JidError::EmptyDomainpart));
        assert_eq!(domain(".example"), Err(JidError::DomainpartEmptyLabel));
        assert_eq!(domain("a..b"), Err(JidError::DomainpartEmptyLabel));
        assert_eq!(domain("-a.example"), Err(JidError::DomainpartHyphen));
        assert_eq!(domain("a-.example"), Err(JidError::DomainpartHyphen));
        assert_eq!(
            domain("xn--bcher-kva.example"),
            Err(JidError::DomainpartReservedLabel)
        );
        assert_eq!(
            domain("_xmpp.example"),
            Err(JidError::DomainpartInvalidChar { ch: '_' })
        );
        assert_eq!(
            domain("example.com:5222"),
            Err(JidError::DomainpartInvalidChar { ch: ':' })
        );
        assert_eq!(
            domain("bücher.example"),
            Err(JidError::DomainpartNotAscii { ch: 'ü' })
        );
        assert_eq!(domain("1.2.3"), Err(JidError::DomainpartInvalidIpv4));
        assert_eq!(domain("1.2.3.256"), Err(JidError::DomainpartInvalidIpv4));
        assert_eq!(domain("[::g]"), Err(JidError::DomainpartInvalidIpLiteral));
        assert_eq!(domain("[::1"), Err(JidError::DomainpartInvalidIpLiteral));
        assert_eq!(domain("[::1]."), Err(JidError::DomainpartInvalidIpLiteral));
        assert_eq!(
            domain("[fe80::1%25eth0]"),
            Err(JidError::DomainpartInvalidIpLiteral)
        );
        assert_eq!(
            domain("::1"),
            Err(JidError::DomainpartInvalidChar { ch: ':' })
        );
    }

    #[test]
    fn hosted_domains_follow_the_project_rule() {
        assert_eq!(
            validate_hosted_domain("Cisco.COM."),
            Ok("cisco.com".to_owned())
        );
        assert_eq!(
            validate_hosted_domain("a1.example-2.org"),
            Ok("a1.example-2.org".to_owned())
        );
        // SPEC §3 / seed: joe@5.cisco.com, joe@cisco.5com, joe@10.10.10.1 invalid.
        assert_eq!(
            validate_hosted_domain("5.cisco.com"),
            Err(JidError::HostedDomainLeadingDigit)
        );
        assert_eq!(
            validate_hosted_domain("cisco.5com"),
            Err(JidError::HostedDomainLastLabelDigit)
        );
        assert_eq!(
            validate_hosted_domain("Abc.1om"),
            Err(JidError::HostedDomainLastLabelDigit)
        );
        assert_eq!(
            validate_hosted_domain("10.10.10.1"),
            Err(JidError::HostedDomainIpAddress)
        );
        assert_eq!(
            validate_hosted_domain("[::1]"),
            Err(JidError::HostedDomainIpAddress)
        );
        assert_eq!(validate_hosted_domain(""), Err(JidError::EmptyDomainpart));
        assert_eq!(
            validate_hosted_domain("a_b.com"),
            Err(JidError::DomainpartInvalidChar { ch: '_' })
        );
        // ...while parsing accepts all of them as peers' addresses, and a
        // leading digit in the localpart is fine (5joe@cisco.com).
        for jid in [
            "joe@5.cisco.com",
            "joe@cisco.5com",
            "joe@10.10.10.1",
            "5joe@cisco.com",
        ] {
            assert!(Jid::parse(jid).is_ok(), "{jid}");
        }
        assert!(validate_hosted_domain(BareJid::parse("5joe@cisco.com").unwrap().domain()).is_ok());
    }

    #[test]
    fn typed_accessors_and_constructors() {
        let full = FullJid::parse("Juliet@Example.com/Balcony/East").unwrap();
        assert_eq!(full.local(), Some("juliet"));
        assert_eq!(full.domain(), "example.com");
        assert_eq!(full.resource(), "Balcony/East");
        assert_eq!(full.bare().to_string(), "juliet@example.com");
        assert_eq!(
            full.with_resource("Orchard").unwrap().to_string(),
            "juliet@example.com/Orchard"
        );
        assert_eq!(full.with_resource(""), Err(JidError::EmptyResourcepart));
        assert_eq!(full.clone().into_bare(), *full.bare());

        assert_eq!(
            FullJid::parse("juliet@example.com"),
            Err(JidError::MissingResourcepart)
        );
        assert_eq!(
            BareJid::parse("juliet@example.com/x"),
            Err(JidError::UnexpectedResourcepart)
        );
        assert_eq!(
            "juliet@example.com".parse::<BareJid>().unwrap().to_string(),
            "juliet@example.com"
        );
        assert!("example.com".parse::<BareJid>().unwrap().is_domain());
        assert!("juliet@example.com/x".parse::<FullJid>().is_ok());

        let jid: Jid = "romeo@example.net/Orchard".parse().unwrap();
        assert!(jid.is_full() && !jid.is_bare());
        assert_eq!(jid.as_full().map(FullJid::resource), Some("Orchard"));
        assert_eq!(jid.bare().to_string(), "romeo@example.net");
        assert_eq!(jid.with_resource("Garden").unwrap().resource(), "Garden");
        assert_eq!(
            FullJid::try_from(jid.clone()).unwrap().resource(),
            "Orchard"
        );
        assert_eq!(
            FullJid::try_from(Jid::from(jid.into_bare())),
            Err(JidError::MissingResourcepart)
        );

        assert_eq!(
            BareJid::new(Some("Romeo"), "Example.NET.")
                .unwrap()
                .to_string(),
            "romeo@example.net"
        );
        assert_eq!(
            BareJid::new(Some("a b"), "example.net").unwrap_err().part(),
            Some(JidPart::Localpart)
        );
        assert_eq!(
            Jid::new(None, "example.net", Some("x")).unwrap(),
            Jid::parse("example.net/x").unwrap()
        );
        assert_eq!(
            FullJid::new(Some("r"), "example.net", " x"),
            Err(JidError::ResourcepartLeadingSpace)
        );
    }

    #[test]
    fn ordering_is_by_bare_then_resource() {
        let mut jids: Vec<Jid> = ["b@x.org", "a@x.org/2", "a@x.org", "a@x.org/1"]
            .iter()
            .map(|s| Jid::parse(s).unwrap())
            .collect();
        jids.sort();
        let sorted: Vec<String> = jids.iter().map(Jid::to_string).collect();
        assert_eq!(sorted, ["a@x.org", "a@x.org/1", "a@x.org/2", "b@x.org"]);
    }

    #[test]
    fn schemas_conversions_round_trip() {
        let bare = BareJid::parse("Juliet@Example.com").unwrap();
        let event_bare = switchboard_schemas::BareJid::from(&bare);
        assert_eq!(event_bare.as_str(), "juliet@example.com");
        assert_eq!(BareJid::try_from(&event_bare).unwrap(), bare);

        let full = FullJid::parse("juliet@example.com/Balcony/1").unwrap();
        let event_full = switchboard_schemas::FullJid::from(full.clone());
        assert_eq!(event_full.as_str(), "juliet@example.com/Balcony/1");
        assert_eq!(
            event_full.bare(),
            switchboard_schemas::BareJid::from(full.bare())
        );
        assert_eq!(FullJid::try_from(&event_full).unwrap(), full);

        // Events from elsewhere are re-validated.
        assert!(BareJid::try_from(&switchboard_schemas::BareJid::new("a b@example.com")).is_err());
        assert_eq!(
            FullJid::try_from(&switchboard_schemas::FullJid::new("a@example.com")),
            Err(JidError::MissingResourcepart)
        );
    }

    /// XEP-0106 §5, table 3: (user name, escaped localpart) with the domain
    /// `example.com`.
    const XEP0106_EXAMPLES: [(&str, &str); 12] = [
        ("space cadet", r"space\20cadet"),
        ("call me \"ishmael\"", r"call\20me\20\22ishmael\22"),
        ("at&t guy", r"at\26t\20guy"),
        ("d'artagnan", r"d\27artagnan"),
        ("/.fanboy", r"\2f.fanboy"),
        ("::foo::", r"\3a\3afoo\3a\3a"),
        ("<foo>", r"\3cfoo\3e"),
        ("user@host", r"user\40host"),
        (r"c:\net", r"c\3a\net"),
        (r"c:\\net", r"c\3a\\net"),
        (r"c:\cool stuff", r"c\3a\cool\20stuff"),
        (r"c:\5commas", r"c\3a\5c5commas"),
    ];

    #[test]
    fn xep0106_examples_round_trip() {
        for (user, escaped) in XEP0106_EXAMPLES {
            assert_eq!(escape_localpart(user), escaped, "escape {user:?}");
            assert_eq!(unescape_localpart(escaped), user, "unescape {escaped:?}");
            // The unescaped form is not a JID; the escaped one is, unchanged.
            let unescaped_jid = format!("{user}@example.com");
            let escaped_jid = format!("{escaped}@example.com");
            assert!(
                Jid::parse(&unescaped_jid).is_err(),
                "{unescaped_jid:?} must be rejected"
            );
            let jid = Jid::parse(&escaped_jid).unwrap_or_else(|e| panic!("{escaped_jid:?}: {e}"));
            assert_eq!(jid.local(), Some(escaped));
            assert_eq!(jid.to_string(), escaped_jid);
            assert_eq!(unescape_localpart(jid.local().unwrap_or_default()), user);
        }
    }

    #[test]
    fn xep0106_backslash_and_edge_cases() {
        // A backslash is escaped only where it would start an escape sequence.
        assert_eq!(escape_localpart(r"\"), r"\");
        assert_eq!(escape_localpart(r"a\b"), r"a\b");
        assert_eq!(escape_localpart(r"\20"), r"\5c20");
        assert_eq!(escape_localpart(r"\5c"), r"\5c5c");
        assert_eq!(escape_localpart(r"\2F"), r"\2F");
        assert_eq!(escape_localpart(r"\\20"), r"\\5c20");
        assert_eq!(escape_localpart("\\ "), r"\\20");
        assert_eq!(escape_localpart(""), "");
        assert_eq!(escape_localpart("π"), "π");
        // Unescaping leaves anything that is not an escape sequence alone.
        assert_eq!(unescape_localpart(r"\"), r"\");
        assert_eq!(unescape_localpart(r"a\2"), r"a\2");
        assert_eq!(unescape_localpart(r"\2F"), r"\2F");
        assert_eq!(unescape_localpart(r"\41"), r"\41");
        assert_eq!(unescape_localpart(r"\5c20"), r"\20");
        assert_eq!(unescape_localpart(r"\\20"), "\\ ");
        assert_eq!(unescape_localpart("\\\u{e9}"), "\\\u{e9}");
        assert_eq!(unescape_localpart(r"foo\20bar"), "foo bar");
    }

    /// Strings built from the characters that matter to JID parsing: mostly
    /// `local@domain/resource` shapes with awkward characters in each part,
    /// some free-form.
    fn jidish() -> impl Strategy<Value = String> {
        let local = prop_oneof![
            3 => "[a-zA-Z0-9ßΣσςπＡＢİ\\\\._\u{301}\u{5d0}\u{627}-]{1,8}",
            1 => "[a-zA-Z0-9♚Ⅳ＠／'\u{200d}\u{301}\u{5d0}\u{627}١]{0,6}",
        ];
        let domain = prop_oneof![
            4 => "[a-zA-Z0-9]([a-zA-Z0-9-]{0,3}[a-zA-Z0-9])?(\\.[a-zA-Z0-9]{1,4}){0,3}\\.?",
            1 => "[a-zA-Z0-9.-]{0,14}|\\[[0-9a-fA-F:.]{0,14}\\]?|[0-9.]{1,16}|[a-zé。]{1,6}",
        ];
        let resource = prop_oneof![
            3 => "[a-zA-Z /@.\u{3000}\u{a0}\u{301}Ⅳ♚ﬀ]{1,10}",
            1 => "\\PC{0,10}|[\u{0}\u{7f}\u{200d}a]{1,3}",
        ];
        prop_oneof![
            4 => (
                proptest::option::of(local),
                domain,
                proptest::option::of(resource),
            )
                .prop_map(|(local, domain, resource)| {
                    let mut s = local.map(|l| l + "@").unwrap_or_default();
                    s.push_str(&domain);
                    if let Some(resource) = resource {
                        s.push('/');
                        s.push_str(&resource);
                    }
                    s
                }),
            1 => "[a-zA-Z0-9@/.\\- \\\\\"&'<>:\\[\\]ßΣπＡ＠\u{3000}\u{301}]{0,24}",
        ]
    }

    fn assert_canonical(s: &str) -> Result<(), TestCaseError> {
        if let Ok(jid) = Jid::parse(s) {
            let shown = jid.to_string();
            let again = Jid::parse(&shown);
            prop_assert_eq!(again.as_ref(), Ok(&jid), "{:?} -> {:?}", s, shown);
            prop_assert_eq!(again.map(|j| j.to_string()), Ok(shown));
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn display_then_parse_is_identity_on_jidish_strings(s in jidish()) {
            assert_canonical(&s)?;
        }

        #[test]
        fn display_then_parse_is_identity_on_arbitrary_strings(s in any::<String>()) {
            assert_canonical(&s)?;
        }

        #[test]
        fn display_then_parse_is_identity_on_plausible_jids(
            local in proptest::option::of("[a-zA-Z0-9ßΣπ\\\\.\u{301}-]{1,10}"),
            domain in "[a-zA-Z0-9-]{1,10}(\\.[a-zA-Z0-9-]{1,10}){0,3}\\.?",
            resource in proptest::option::of("\\PC{1,12}"),
        ) {
            let mut s = String::new();
            if let Some(local) = &local {
                s.push_str(local);
                s.push('@');
            }
            s.push_str(&domain);
            if let Some(resource) = &resource {
                s.push('/');
                s.push_str(resource);
            }
            assert_canonical(&s)?;
        }

        #[test]
        fn parsing_never_panics(s in "\\PC{0,64}|.{0,64}") {
            let _ = Jid::parse(&s);
            let _ = BareJid::parse(&s);
            let _ = FullJid::parse(&s);
            let _ = validate_hosted_domain(&s);
        }

        #[test]
        fn escaping_round_trips(s in "[a-z \\\\\"&'/:<>@0-9cfe]{0,16}|\\PC{0,16}") {
            let escaped = escape_localpart(&s);
            prop_assert_eq!(unescape_localpart(&escaped), s);
            for ch in LOCALPART_PROHIBITED {
                prop_assert!(!escaped.contains(ch));
            }
            prop_assert!(!escaped.contains(' '));
        }
    }
}
