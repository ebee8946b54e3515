//! RFC 6120 §4 (XML streams) and §11 (XML usage): a sans-IO parser of the
//! client-to-server XML stream.
//!
//! The server owns the socket; this module only turns bytes into
//! [`StreamEvent`]s. Bytes go in through [`StreamParser::feed`], events come
//! out of [`StreamParser::next`], which returns `Ok(None)` ("Incomplete") when
//! more bytes are needed, in the manner of mini-redis' `Frame::check` /
//! `Frame::parse`:
//!
//! 1. a small resumable byte scanner finds where the next top-level construct
//!    (the stream header, a stanza, `</stream:stream>`) ends. It looks at each
//!    byte once, however the input is split, and enforces the size and depth
//!    limits while the stanza is still incomplete (RFC 6120 §13.12: a peer
//!    that sends an endless stanza is stopped once it passes
//!    [`Limits::max_stanza_bytes`], not when it finishes);
//! 2. the complete stanza is then parsed by `quick_xml::Reader` into an
//!    [`Element`] tree, with namespaces resolved against the declarations of
//!    the stream header (RFC 6120 §4.8) and the restrictions of RFC 6120 §11
//!    applied: no DTD, no comments, no processing instructions, no entity
//!    references other than the five predefined ones and character
//!    references. Entities are never expanded beyond those, DTDs never read.
//!
//! Consumed bytes are discarded, so the buffer holds at most one incomplete
//! construct (bounded by the limits) plus whatever was fed since the last
//! call to [`StreamParser::next`]. Any error is fatal to the stream (RFC 6120
//! §4.9.1.1): the parser keeps returning it, and the caller sends
//! [`stream_error_xml`] and closes the connection.
//!
//! [`Element`] is also the stanza representation for the rest of the
//! gateway: it has accessors, a builder and a serializer ([`Element::to_xml`])
//! whose output parses back to an equal element.

use quick_xml::events::{BytesStart, Event};
use quick_xml::reader::Reader;
use std::fmt;

/// The streams namespace (RFC 6120 §4.8.1, §11.2).
pub const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
/// The client-to-server content namespace (RFC 6120 §4.8.2).
pub const NS_CLIENT: &str = "jabber:client";
/// The server-to-server content namespace (RFC 6120 §4.8.2), refused here.
pub const NS_SERVER: &str = "jabber:server";
/// The namespace of stream error conditions (RFC 6120 §4.9.2).
pub const NS_STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
/// The namespace bound to the `xml` prefix (Namespaces in XML 1.0 §3),
/// used by `xml:lang` (RFC 6120 §4.7.4).
pub const NS_XML: &str = "http://www.w3.org/XML/1998/namespace";
const NS_XMLNS: &str = "http://www.w3.org/2000/xmlns/";

/// Resource limits (RFC 6120 §13.12: "Denial of Service"). Exceeding any of
/// them is a `<policy-violation/>` stream error (RFC 6120 §4.9.3.14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest stanza, in bytes from its `<` to its final `>`
    /// (default 256 KiB). Enforced while the stanza is still arriving.
    pub max_stanza_bytes: usize,
    /// Deepest element nesting, the stanza root being depth 1 (default 32).
    pub max_depth: usize,
    /// Most attributes on one element, namespace declarations included
    /// (default 64).
    pub max_attributes: usize,
    /// Longest element or attribute name, prefix included, in bytes
    /// (default 256).
    pub max_name_bytes: usize,
    /// Largest stream header, XML declaration included, in bytes
    /// (default 4 KiB).
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
            max_attributes: 64,
            max_name_bytes: 256,
            max_header_bytes: 4 * 1024,
        }
    }
}

/// Which of the [`Limits`] a peer exceeded (RFC 6120 §4.9.3.14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// [`Limits::max_stanza_bytes`].
    StanzaBytes,
    /// [`Limits::max_depth`].
    Depth,
    /// [`Limits::max_attributes`].
    Attributes,
    /// [`Limits::max_name_bytes`].
    NameBytes,
    /// [`Limits::max_header_bytes`].
    HeaderBytes,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Limit::StanzaBytes => "stanza size",
            Limit::Depth => "element depth",
            Limit::Attributes => "attribute count",
            Limit::NameBytes => "name length",
            Limit::HeaderBytes => "stream header size",
        })
    }
}

/// The XML constructs that RFC 6120 §11.1 forbids in a stream
/// (`<restricted-xml/>`, RFC 6120 §4.9.3.18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restricted {
    /// A document type declaration or other markup declaration (`<!DOCTYPE`,
    /// `<!ENTITY`, ...).
    Dtd,
    /// A comment (`<!-- -->`).
    Comment,
    /// A processing instruction, or an XML declaration anywhere but before
    /// the stream header.
    ProcessingInstruction,
    /// An entity reference other than `&amp; &lt; &gt; &quot; &apos;` (the
    /// name is carried). Character references (`&#...;`) are allowed.
    EntityReference(String),
}

impl fmt::Display for Restricted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Restricted::Dtd => f.write_str("DTD or markup declaration"),
            Restricted::Comment => f.write_str("comment"),
            Restricted::ProcessingInstruction => f.write_str("processing instruction"),
            Restricted::EntityReference(name) => write!(f, "entity reference &{name};"),
        }
    }
}

/// A stream-level error (RFC 6120 §4.9). Each variant maps to one defined
/// condition of RFC 6120 §4.9.3, see [`StreamError::condition`]. All of them
/// are unrecoverable: the stream must be closed (RFC 6120 §4.9.1.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// `<not-well-formed/>` (RFC 6120 §4.9.3.13, §11.3): not well-formed
    /// XML or XML namespaces, mismatched tags, bad UTF-8, illegal characters,
    /// or non-whitespace character data between stanzas.
    #[error("not well-formed: {0}")]
    NotWellFormed(String),
    /// `<restricted-xml/>` (RFC 6120 §4.9.3.18, §11.1).
    #[error("restricted XML: {0}")]
    RestrictedXml(Restricted),
    /// `<policy-violation/>` (RFC 6120 §4.9.3.14): a [`Limits`] entry was
    /// exceeded.
    #[error("policy violation: {limit} exceeds the limit of {max}")]
    PolicyViolation {
        /// Which limit.
        limit: Limit,
        /// Its configured value.
        max: usize,
    },
    /// `<invalid-namespace/>` (RFC 6120 §4.9.3.10, §4.8): the stream element
    /// is not qualified by the streams namespace, or the content namespace
    /// is not `jabber:client`.
    #[error("invalid namespace: {0}")]
    InvalidNamespace(String),
    /// `<bad-format/>` (RFC 6120 §4.9.3.1): well-formed XML that is not a
    /// stream (e.g. a root element that is not `stream`, an empty-element
    /// stream header, a malformed `version`).
    #[error("bad format: {0}")]
    BadFormat(String),
    /// `<unsupported-version/>` (RFC 6120 §4.9.3.25, §4.7.5): `version` is
    /// missing (pre-1.0) or its major version is not 1.
    #[error("unsupported version: {0}")]
    UnsupportedVersion(String),
    /// `<unsupported-encoding/>` (RFC 6120 §4.9.3.22, §11.6): the XML
    /// declaration names an encoding other than UTF-8.
    #[error("unsupported encoding: {0}")]
    UnsupportedEncoding(String),
}

impl StreamError {
    /// The name of the defined-condition element (RFC 6120 §4.9.3).
    pub fn condition(&self) -> &'static str {
        match self {
            StreamError::NotWellFormed(_) => "not-well-formed",
            StreamError::RestrictedXml(_) => "restricted-xml",
            StreamError::PolicyViolation { .. } => "policy-violation",
            StreamError::InvalidNamespace(_) => "invalid-namespace",
            StreamError::BadFormat(_) => "bad-format",
            StreamError::UnsupportedVersion(_) => "unsupported-version",
            StreamError::UnsupportedEncoding(_) => "unsupported-encoding",
        }
    }

    /// The `<stream:error/>` and closing tag to send for this error, with its
    /// description as `<text/>` (RFC 6120 §4.9.2); see [`stream_error_xml`].
    pub fn to_xml(&self) -> String {
        stream_error_xml(self.condition(), Some(&self.to_string()))
    }
}

fn nwf(reason: impl Into<String>) -> StreamError {
    StreamError::NotWellFormed(reason.into())
}

fn policy(limit: Limit, max: usize) -> StreamError {
    StreamError::PolicyViolation { limit, max }
}

/// Renders a stream error followed by the closing stream tag (RFC 6120
/// §4.9.2, §4.4):
/// `<stream:error><CONDITION xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>
/// <text xmlns='...'>TEXT</text></stream:error></stream:stream>`.
///
/// `condition` should be a defined condition of RFC 6120 §4.9.3 (e.g.
/// [`StreamError::condition`]); anything that is not an XML name is replaced
/// by `undefined-condition`. The text is escaped. The caller must have sent
/// its own stream header first, since the `stream` prefix is declared there
/// (RFC 6120 §4.9.1.2).
pub fn stream_error_xml(condition: &str, text: Option<&str>) -> String {
    let condition = if is_ncname(condition) {
        condition
    } else {
        "undefined-condition"
    };
    let mut out = String::from("<stream:error><");
    out.push_str(condition);
    out.push_str(" xmlns='");
    out.push_str(NS_STREAM_ERRORS);
    out.push_str("'/>");
    if let Some(text) = text {
        out.push_str("<text xmlns='");
        out.push_str(NS_STREAM_ERRORS);
        out.push_str("'>");
        escape_into(&mut out, text, false);
        out.push_str("</text>");
    }
    out.push_str("</stream:error></stream:stream>");
    out
}

/// The opening `<stream:stream ...>` tag sent by the client (RFC 6120 §4.2,
/// §4.7), after its namespaces were checked (RFC 6120 §4.8): the element is
/// `stream` in the streams namespace and the default namespace is
/// `jabber:client`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    /// `to`: the server's domain (RFC 6120 §4.7.2), unvalidated.
    pub to: Option<String>,
    /// `from`: the client's JID (RFC 6120 §4.7.1), unvalidated.
    pub from: Option<String>,
    /// `id` (RFC 6120 §4.7.3); clients should not send one.
    pub id: Option<String>,
    /// `version` as (major, minor) (RFC 6120 §4.7.5); the major is always 1.
    pub version: (u32, u32),
    /// `xml:lang` (RFC 6120 §4.7.4).
    pub lang: Option<String>,
    /// The prefix bound to the streams namespace, normally `stream`
    /// (RFC 6120 §4.8.5); the closing tag must use it.
    pub prefix: String,
}

/// One event of the client's stream (RFC 6120 §4.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// The stream header (RFC 6120 §4.2, §4.7).
    Header(StreamHeader),
    /// A complete first-level child of the stream: a stanza (RFC 6120 §8)
    /// or a negotiation element such as `<starttls/>` or `<auth/>`.
    Stanza(Element),
    /// The closing `</stream:stream>` tag (RFC 6120 §4.4).
    Close,
}

/// A node of an element's content (RFC 6120 §8: stanzas are XML elements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// A child element.
    Element(Element),
    /// Character data, unescaped, with line ends normalized (XML 1.0 §2.11).
    /// The parser merges adjacent text (including CDATA sections) into one
    /// node and never produces empty text.
    Text(String),
}

/// A namespace-resolved XML element (RFC 6120 §4.8, §8).
///
/// Names: `name` is the local name and `namespace` the resolved namespace
/// URI (the empty string for no namespace); prefixes are not kept.
///
/// Attribute keys: an unprefixed attribute is keyed by its name (`to`); an
/// `xml:` attribute keeps its prefix (`xml:lang`); an attribute in any other
/// namespace is keyed in Clark notation, `{namespace-uri}local`. Namespace
/// declarations (`xmlns`, `xmlns:p`) are not attributes. Values are
/// unescaped and normalized as XML 1.0 §3.3.3 requires.
///
/// Elements built by hand should use valid XML names and keep text as the
/// parser does (the builder methods do): then `to_xml` output parses back to
/// an equal element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Local name.
    pub name: String,
    /// Resolved namespace URI, inherited from the default namespace in scope.
    pub namespace: String,
    /// Attributes in document order, values unescaped.
    pub attributes: Vec<(String, String)>,
    /// Child elements and text, in document order.
    pub children: Vec<Node>,
}

impl Element {
    /// A new element without attributes or children.
    pub fn new(name: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            namespace: namespace.into(),
            attributes: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Builder: sets an attribute (replacing an existing one with that key).
    #[must_use]
    pub fn with_attr(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_attr(key, value);
        self
    }

    /// Builder: appends a child element.
    #[must_use]
    pub fn with_child(mut self, child: Element) -> Self {
        self.children.push(Node::Element(child));
        self
    }

    /// Builder: appends text (merged into a preceding text node; empty text
    /// is ignored).
    #[must_use]
    pub fn with_text(mut self, text: impl AsRef<str>) -> Self {
        self.push_text(text.as_ref());
        self
    }

    /// Sets an attribute, replacing the value of an existing one with the
    /// same key (keeping its position) or appending it.
    pub fn set_attr(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        let value = value.into();
        match self.attributes.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => self.attributes.push((key, value)),
        }
    }

    /// Removes an attribute, returning its value.
    pub fn remove_attr(&mut self, key: &str) -> Option<String> {
        let i = self.attributes.iter().position(|(k, _)| k == key)?;
        Some(self.attributes.remove(i).1)
    }

    /// Appends a child element.
    pub fn push_child(&mut self, child: Element) {
        self.children.push(Node::Element(child));
    }

    /// Appends text, merging it into a preceding text node; empty text is
    /// ignored.
    pub fn push_text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if let Some(Node::Text(last)) = self.children.last_mut() {
            last.push_str(text);
        } else {
            self.children.push(Node::Text(text.to_owned()));
        }
    }

    /// The value of an attribute, by key (see the type's docs for keys).
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The first child element with this local name and namespace.
    pub fn child(&self, name: &str, namespace: &str) -> Option<&Element> {
        self.children_named(name, namespace).next()
    }

    /// The child elements with this local name and namespace.
    pub fn children_named<'a>(
        &'a self,
        name: &str,
        namespace: &str,
    ) -> impl Iterator<Item = &'a Element> {
        self.elements()
            .filter(move |e| e.name == name && e.namespace == namespace)
    }

    /// All child elements.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The concatenated text children (not descendants).
    pub fn text(&self) -> String {
        self.children
            .iter()
            .filter_map(|n| match n {
                Node::Text(t) => Some(t.as_str()),
                Node::Element(_) => None,
            })
            .collect()
    }

    /// Serializes the element as a standalone document fragment: the root
    /// declares its namespace (unless it is empty), descendants declare
    /// theirs only where it differs from their parent's. Text and attribute
    /// values are escaped (`& < > " '`, and the characters XML would
    /// otherwise normalize away); characters not allowed in XML 1.0 become
    /// U+FFFD. `Element::parse(e.to_xml())` gives back `e`.
    pub fn to_xml(&self) -> String {
        self.to_xml_in("")
    }

    /// Serializes the element for writing into a context whose default
    /// namespace is `parent_namespace`: `to_xml_in(NS_CLIENT)` gives a stanza
    /// ready for a client stream, without a redundant `xmlns`
    /// (RFC 6120 §4.8.2).
    pub fn to_xml_in(&self, parent_namespace: &str) -> String {
        let mut out = String::new();
        self.write_xml(&mut out, parent_namespace);
        out
    }

    /// `default_ns` is the default namespace in scope.
    fn write_xml(&self, out: &mut String, default_ns: &str) {
        // The XML namespace cannot be declared as the default namespace
        // (Namespaces in XML 1.0 §3), so an element in it keeps the
        // predeclared `xml` prefix and leaves the default as it is.
        let in_xml_ns = self.namespace == NS_XML;
        let (prefix, children_ns) = if in_xml_ns {
            ("xml:", default_ns)
        } else {
            ("", self.namespace.as_str())
        };
        out.push('<');
        out.push_str(prefix);
        out.push_str(&self.name);
        if !in_xml_ns && self.namespace != default_ns {
            out.push_str(" xmlns='");
            escape_into(out, &self.namespace, true);
            out.push('\'');
        }
        // Attributes in other namespaces get generated prefixes, declared
        // here (Clark-notation keys, see the type's docs).
        let mut prefixed: Vec<&str> = Vec::new();
        for (key, _) in &self.attributes {
            if let Some((uri, _)) = split_clark(key)
                && uri != NS_XML
                && !prefixed.contains(&uri)
            {
                out.push_str(" xmlns:ns");
                out.push_str(&prefixed.len().to_string());
                out.push_str("='");
                escape_into(out, uri, true);
                out.push('\'');
                prefixed.push(uri);
            }
        }
        for (key, value) in &self.attributes {
            out.push(' ');
            match split_clark(key) {
                Some((NS_XML, local)) => {
                    out.push_str("xml:");
                    out.push_str(local);
                }
                Some((uri, local)) => {
                    let i = prefixed.iter().position(|p| *p == uri).unwrap_or(0);
                    out.push_str("ns");
                    out.push_str(&i.to_string());
                    out.push(':');
                    out.push_str(local);
                }
                None => out.push_str(key),
            }
            out.push_str("='");
            escape_into(out, value, true);
            out.push('\'');
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for child in &self.children {
            match child {
                Node::Element(e) => e.write_xml(out, children_ns),
                Node::Text(t) => escape_into(out, t, false),
            }
        }
        out.push_str("</");
        out.push_str(prefix);
        out.push_str(&self.name);
        out.push('>');
    }

    /// Parses one standalone element (optionally surrounded by whitespace)
    /// with the same rules as a stanza in a stream (RFC 6120 §11), but no
    /// inherited namespaces: an unprefixed element without `xmlns` has the
    /// empty namespace. Useful for stored XML and for tests.
    pub fn parse(input: &[u8], limits: &Limits) -> Result<Element, StreamError> {
        if input.len() > limits.max_stanza_bytes {
            return Err(policy(Limit::StanzaBytes, limits.max_stanza_bytes));
        }
        parse_fragment(input, &[], limits)
    }
}

/// `{uri}local` → `(uri, local)`.
fn split_clark(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix('{')?;
    let close = rest.rfind('}')?;
    Some((&rest[..close], &rest[close + 1..]))
}

/// Escapes text or an attribute value (quoted with `'`). Beyond the five
/// predefined entities, `\r` (and in attributes `\t` and `\n`) are written
/// as character references so that XML 1.0 end-of-line and attribute-value
/// normalization give them back unchanged.
fn escape_into(out: &mut String, s: &str, attr: bool) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\r' => out.push_str("&#xD;"),
            '\n' if attr => out.push_str("&#xA;"),
            '\t' if attr => out.push_str("&#x9;"),
            c if is_xml_char(c) => out.push(c),
            _ => out.push('\u{FFFD}'),
        }
    }
}

/// XML 1.0 `Char` (§2.2).
fn is_xml_char(c: char) -> bool {
    matches!(c,
        '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..='\u{10FFFF}')
}

/// XML 1.0 `NameStartChar` (§2.3) without `:`.
fn is_name_start(c: char) -> bool {
    matches!(c,
        'A'..='Z' | '_' | 'a'..='z' | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}'
        | '\u{F8}'..='\u{2FF}' | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}'
        | '\u{200C}'..='\u{200D}' | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}'
        | '\u{3001}'..='\u{D7FF}' | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}'
        | '\u{10000}'..='\u{EFFFF}')
}

/// XML 1.0 `NameChar` (§2.3) without `:`.
fn is_name_char(c: char) -> bool {
    is_name_start(c)
        || matches!(c, '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
}

/// Namespaces in XML 1.0 `NCName`.
fn is_ncname(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(is_name_start) && chars.all(is_name_char)
}

/// XML whitespace (§2.3 `S`).
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Splits and checks a qualified name (Namespaces in XML 1.0 §4).
fn split_qname(qname: &str) -> Result<(Option<&str>, &str), StreamError> {
    let (prefix, local) = match qname.split_once(':') {
        Some((p, l)) => (Some(p), l),
        None => (None, qname),
    };
    if prefix.is_some_and(|p| !is_ncname(p)) || !is_ncname(local) {
        return Err(nwf(format!("invalid name {qname:?}")));
    }
    Ok((prefix, local))
}

/// Appends character data (a Text event or CDATA section): checks that
/// every character is an XML `Char` and normalizes line ends (XML 1.0
/// §2.11).
fn push_char_data(out: &mut String, raw: &str) -> Result<(), StreamError> {
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                chars.next_if_eq(&'\n');
                out.push('\n');
            }
            c if is_xml_char(c) => out.push(c),
            c => return Err(nwf(format!("character U+{:04X} not allowed", c as u32))),
        }
    }
    Ok(())
}

/// Resolves the body of a reference (`amp`, `#60`, `#x3C`): the five
/// predefined entities and character references of legal characters;
/// any other entity is restricted (RFC 6120 §11.1).
fn resolve_reference(name: &str) -> Result<char, StreamError> {
    match name {
        "amp" => return Ok('&'),
        "lt" => return Ok('<'),
        "gt" => return Ok('>'),
        "quot" => return Ok('"'),
        "apos" => return Ok('\''),
        _ => {}
    }
    if let Some(num) = name.strip_prefix('#') {
        let (digits, radix) = match num.strip_prefix('x') {
            Some(hex) => (hex, 16),
            None => (num, 10),
        };
        let valid = !digits.is_empty() && digits.chars().all(|c| c.is_digit(radix));
        return valid
            .then(|| u32::from_str_radix(digits, radix).ok())
            .flatten()
            .and_then(char::from_u32)
            .filter(|c| is_xml_char(*c))
            .ok_or_else(|| nwf(format!("invalid character reference &{name};")));
    }
    if is_ncname(name) {
        Err(StreamError::RestrictedXml(Restricted::EntityReference(
            name.to_owned(),
        )))
    } else {
        Err(nwf(format!("malformed reference &{name};")))
    }
}

/// Unescapes and normalizes an attribute value (XML 1.0 §3.3.3: literal
/// whitespace and line ends become spaces; references are resolved).
fn unescape_attr(raw: &str) -> Result<String, StreamError> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find(['&', '<', '\r', '\n', '\t']) {
        push_char_data(&mut out, &rest[..i])?;
        let tail = &rest[i..];
        match tail.as_bytes()[0] {
            b'&' => {
                let end = tail
                    .find(';')
                    .ok_or_else(|| nwf("unterminated reference in attribute value"))?;
                out.push(resolve_reference(&tail[1..end])?);
                rest = &tail[end + 1..];
            }
            b'<' => return Err(nwf("'<' in attribute value")),
            b'\r' => {
                out.push(' ');
                rest = tail.strip_prefix("\r\n").unwrap_or(&tail[1..]);
            }
            _ => {
                out.push(' ');
                rest = &tail[1..];
            }
        }
    }
    push_char_data(&mut out, rest)?;
    Ok(out)
}

/// quick-xml's attribute iterator accepts `a='1'b='2'`; XML requires
/// whitespace after each attribute value.
fn check_attribute_spacing(raw: &[u8]) -> Result<(), StreamError> {
    let mut quote = 0u8;
    let mut just_closed = false;
    for &b in raw {
        if just_closed && !is_ws(b) {
            return Err(nwf("missing whitespace between attributes"));
        }
        just_closed = false;
        if quote == 0 {
            if b == b'\'' || b == b'"' {
                quote = b;
            }
        } else if b == quote {
            quote = 0;
            just_closed = true;
        }
    }
    Ok(())
}

fn utf8(bytes: &[u8]) -> Result<&str, StreamError> {
    std::str::from_utf8(bytes).map_err(|_| nwf("invalid UTF-8"))
}

fn xml_error(e: &quick_xml::Error) -> StreamError {
    nwf(e.to_string())
}

/// A start tag with its names checked, declarations split from attributes,
/// attribute values unescaped; namespaces not yet resolved.
struct RawStart {
    qname: String,
    /// `(prefix, uri)`; the default namespace has prefix "".
    decls: Vec<(String, String)>,
    /// `(qualified name, value)`.
    attrs: Vec<(String, String)>,
}

fn read_start(e: &BytesStart<'_>, limits: &Limits) -> Result<RawStart, StreamError> {
    let qname = utf8(e.name().into_inner())?;
    if qname.len() > limits.max_name_bytes {
        return Err(policy(Limit::NameBytes, limits.max_name_bytes));
    }
    split_qname(qname)?;
    check_attribute_spacing(e.attributes_raw())?;
    let mut decls = Vec::new();
    let mut attrs = Vec::new();
    for (i, attr) in e.attributes().enumerate() {
        if i >= limits.max_attributes {
            return Err(policy(Limit::Attributes, limits.max_attributes));
        }
        let attr = attr.map_err(|e| nwf(e.to_string()))?;
        let key = utf8(attr.key.as_ref())?;
        if key.len() > limits.max_name_bytes {
            return Err(policy(Limit::NameBytes, limits.max_name_bytes));
        }
        split_qname(key)?;
        let value = unescape_attr(utf8(&attr.value)?)?;
        if key == "xmlns" {
            if value == NS_XML || value == NS_XMLNS {
                return Err(nwf(format!("{value} cannot be the default namespace")));
            }
            decls.push((String::new(), value));
        } else if let Some(prefix) = key.strip_prefix("xmlns:") {
            if prefix == "xml" {
                if value != NS_XML {
                    return Err(nwf("the xml prefix cannot be rebound"));
                }
            } else if prefix == "xmlns" || value == NS_XML || value == NS_XMLNS {
                return Err(nwf(format!("reserved namespace binding {key}")));
            } else if value.is_empty() {
                return Err(nwf(format!("prefix {prefix} cannot be undeclared")));
            } else {
                decls.push((prefix.to_owned(), value));
            }
        } else {
            attrs.push((key.to_owned(), value));
        }
    }
    Ok(RawStart {
        qname: qname.to_owned(),
        decls,
        attrs,
    })
}

/// Namespace declarations as `(prefix, uri)`; the default namespace has
/// prefix "".
type Bindings = Vec<(String, String)>;

/// Namespace bindings in scope, innermost last (prefix "" = default).
struct Scope<'a> {
    base: &'a [(String, String)],
    bindings: Vec<(String, String)>,
    marks: Vec<usize>,
}

impl<'a> Scope<'a> {
    fn new(base: &'a [(String, String)]) -> Self {
        Self {
            base,
            bindings: Vec::new(),
            marks: Vec::new(),
        }
    }

    fn lookup(&self, prefix: &str) -> Option<&str> {
        if prefix == "xml" {
            return Some(NS_XML);
        }
        self.bindings
            .iter()
            .rev()
            .chain(self.base.iter().rev())
            .find(|(p, _)| p == prefix)
            .map(|(_, uri)| uri.as_str())
    }

    /// Pushes the declarations of `start` and resolves it into an element.
    fn open(&mut self, start: RawStart) -> Result<Element, StreamError> {
        self.marks.push(self.bindings.len());
        self.bindings.extend(start.decls);
        let (prefix, local) = split_qname(&start.qname)?;
        let namespace = match prefix {
            Some("xmlns") => return Err(nwf("element with the xmlns prefix")),
            Some(p) => self
                .lookup(p)
                .ok_or_else(|| nwf(format!("unbound prefix {p}")))?,
            None => self.lookup("").unwrap_or(""),
        }
        .to_owned();
        let mut attributes: Vec<(String, String)> = Vec::with_capacity(start.attrs.len());
        for (qname, value) in start.attrs {
            let key = match split_qname(&qname)? {
                (None, _) => qname,
                (Some("xml"), _) => qname,
                (Some(p), local) => {
                    let uri = self
                        .lookup(p)
                        .ok_or_else(|| nwf(format!("unbound prefix {p}")))?;
                    format!("{{{uri}}}{local}")
                }
            };
            if attributes.iter().any(|(k, _)| *k == key) {
                return Err(nwf(format!("duplicate attribute {key}")));
            }
            attributes.push((key, value));
        }
        Ok(Element {
            name: local.to_owned(),
            namespace,
            attributes,
            children: Vec::new(),
        })
    }

    fn close(&mut self) {
        if let Some(mark) = self.marks.pop() {
            self.bindings.truncate(mark);
        }
    }
}

/// Parses one element from `input` (a complete stanza as delimited by the
/// scanner, or a standalone fragment) with `base` namespace bindings in
/// scope. Whitespace may surround the element; nothing else.
fn parse_fragment(
    input: &[u8],
    base: &[(String, String)],
    limits: &Limits,
) -> Result<Element, StreamError> {
    let text = utf8(input)?;
    let mut reader = Reader::from_str(text);
    {
        let config = reader.config_mut();
        config.check_end_names = true;
        config.allow_unmatched_ends = false;
        config.allow_dangling_amp = false;
        config.expand_empty_elements = false;
        config.trim_text(false);
    }
    let mut scope = Scope::new(base);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let event = reader.read_event().map_err(|e| xml_error(&e))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) if root.is_none() => {
                let empty = matches!(event, Event::Empty(_));
                if stack.len() >= limits.max_depth {
                    return Err(policy(Limit::Depth, limits.max_depth));
                }
                let element = scope.open(read_start(e, limits)?)?;
                stack.push(element);
                if empty {
                    finish(&mut stack, &mut scope, &mut root);
                }
            }
            Event::End(_) => {
                if stack.is_empty() {
                    return Err(nwf("unexpected closing tag"));
                }
                finish(&mut stack, &mut scope, &mut root);
            }
            Event::Text(t) => {
                let raw = utf8(&t)?;
                match stack.last_mut() {
                    Some(parent) => {
                        if raw.contains("]]>") {
                            return Err(nwf("']]>' in character data"));
                        }
                        let mut s = String::new();
                        push_char_data(&mut s, raw)?;
                        parent.push_text(&s);
                    }
                    None if raw.bytes().all(is_ws) => {}
                    None => return Err(nwf("character data outside the element")),
                }
            }
            Event::CData(t) => {
                let parent = stack
                    .last_mut()
                    .ok_or_else(|| nwf("CDATA outside the element"))?;
                let mut s = String::new();
                push_char_data(&mut s, utf8(&t)?)?;
                parent.push_text(&s);
            }
            Event::GeneralRef(r) => {
                let c = resolve_reference(utf8(&r)?)?;
                let parent = stack
                    .last_mut()
                    .ok_or_else(|| nwf("reference outside the element"))?;
                parent.push_text(c.encode_utf8(&mut [0; 4]));
            }
            Event::Comment(_) => return Err(StreamError::RestrictedXml(Restricted::Comment)),
            Event::DocType(_) => return Err(StreamError::RestrictedXml(Restricted::Dtd)),
            Event::PI(_) | Event::Decl(_) => {
                return Err(StreamError::RestrictedXml(
                    Restricted::ProcessingInstruction,
                ));
            }
            Event::Start(_) | Event::Empty(_) => {
                return Err(nwf("more than one root element"));
            }
            Event::Eof => {
                return root.ok_or_else(|| nwf("unexpected end of element"));
            }
        }
    }
}

fn finish(stack: &mut Vec<Element>, scope: &mut Scope<'_>, root: &mut Option<Element>) {
    scope.close();
    if let Some(done) = stack.pop() {
        match stack.last_mut() {
            Some(parent) => parent.children.push(Node::Element(done)),
            None => *root = Some(done),
        }
    }
}

/// Parses an XML declaration (XML 1.0 §2.8) that precedes the stream
/// header: version 1.x, encoding UTF-8 if given (RFC 6120 §11.5, §11.6).
fn check_declaration(input: &[u8]) -> Result<(), StreamError> {
    let mut reader = Reader::from_str(utf8(input)?);
    match reader.read_event().map_err(|e| xml_error(&e))? {
        Event::Decl(decl) => {
            let version = decl.version().map_err(|e| xml_error(&e))?;
            if !version.starts_with(b"1.") {
                return Err(nwf("XML version must be 1.x"));
            }
            if let Some(encoding) = decl.encoding() {
                let encoding = encoding.map_err(|e| nwf(e.to_string()))?;
                if !encoding.eq_ignore_ascii_case(b"UTF-8") {
                    return Err(StreamError::UnsupportedEncoding(
                        String::from_utf8_lossy(&encoding).into_owned(),
                    ));
                }
            }
            Ok(())
        }
        _ => Err(StreamError::RestrictedXml(
            Restricted::ProcessingInstruction,
        )),
    }
}

/// Parses `version` (RFC 6120 §4.7.5): two integers, leading zeros ignored.
fn parse_version(v: &str) -> Result<(u32, u32), StreamError> {
    let number = |s: &str| -> Option<u32> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let s = s.trim_start_matches('0');
        Some(if s.is_empty() {
            0
        } else {
            s.parse().unwrap_or(u32::MAX)
        })
    };
    let (major, minor) = v
        .split_once('.')
        .and_then(|(a, b)| Some((number(a)?, number(b)?)))
        .ok_or_else(|| StreamError::BadFormat(format!("malformed version {v:?}")))?;
    if major != 1 {
        return Err(StreamError::UnsupportedVersion(v.to_owned()));
    }
    Ok((major, minor))
}

/// Parses and checks the stream header tag (RFC 6120 §4.7, §4.8). Returns
/// the header, the namespace bindings it declares (in scope for every
/// stanza) and its qualified name (for the closing tag).
fn parse_header(
    input: &[u8],
    limits: &Limits,
) -> Result<(StreamHeader, Bindings, String), StreamError> {
    let mut reader = Reader::from_str(utf8(input)?);
    let start = match reader.read_event().map_err(|e| xml_error(&e))? {
        Event::Start(e) => e,
        Event::Empty(_) => {
            return Err(StreamError::BadFormat(
                "the stream header is an empty element".into(),
            ));
        }
        _ => return Err(nwf("expected the stream header")),
    };
    let raw = read_start(&start, limits)?;
    let bindings = raw.decls.clone();
    let qname = raw.qname.clone();
    let mut scope = Scope::new(&[]);
    let element = scope.open(raw)?;
    if element.namespace != NS_STREAMS {
        return Err(StreamError::InvalidNamespace(format!(
            "stream element in namespace {:?}, expected {NS_STREAMS}",
            element.namespace
        )));
    }
    if element.name != "stream" {
        return Err(StreamError::BadFormat(format!(
            "root element {:?} is not a stream",
            element.name
        )));
    }
    match scope.lookup("") {
        Some(NS_CLIENT) => {}
        Some(other) => {
            return Err(StreamError::InvalidNamespace(format!(
                "content namespace {other:?}, expected {NS_CLIENT}"
            )));
        }
        None => {
            return Err(StreamError::InvalidNamespace(format!(
                "no content namespace, expected {NS_CLIENT}"
            )));
        }
    }
    let version = match element.attr("version") {
        Some(v) => parse_version(v)?,
        None => {
            return Err(StreamError::UnsupportedVersion(
                "no version (pre-1.0 stream)".into(),
            ));
        }
    };
    let prefix = split_qname(&qname)?.0.unwrap_or_default().to_owned();
    let header = StreamHeader {
        to: element.attr("to").map(str::to_owned),
        from: element.attr("from").map(str::to_owned),
        id: element.attr("id").map(str::to_owned),
        version,
        lang: element.attr("xml:lang").map(str::to_owned),
        prefix,
    };
    Ok((header, bindings, qname))
}

/// The byte scanner's state, kept across calls so that every byte is
/// examined once however the input is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Between top-level constructs: whitespace is consumed.
    Idle,
    /// Character data inside a stanza.
    Content,
    /// Just after `<`.
    Lt,
    /// Inside a start tag: the open quote (0 if none), and whether the last
    /// byte outside quotes was `/`.
    StartTag { quote: u8, slash: bool },
    /// Inside a closing tag.
    EndTag,
    /// After `<!`.
    Bang,
    /// After `<!-`.
    BangDash,
    /// After `<![` and this many bytes of `CDATA[`.
    CDataOpen(u8),
    /// Inside a CDATA section, after this many `]` (at most 2).
    CData(u8),
    /// Inside `<?...`, after a `?` or not (only before the header).
    Pi { question: bool },
}

/// What the scanner found.
enum Scan {
    Incomplete,
    /// An XML declaration / PI ending at this offset (header phase).
    Decl(usize),
    /// The stream header start tag ending at this offset.
    Header(usize),
    /// A complete stanza ending at this offset.
    Stanza(usize),
    /// A closing tag at stream level ending at this offset.
    Close(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Header,
    Stream,
    Closed,
}

/// A sans-IO parser of the client-to-server XML stream (RFC 6120 §4).
///
/// Feed it bytes as they arrive and call [`next`](Self::next) until it
/// returns `Ok(None)`; do so after every [`feed`](Self::feed), so that the
/// buffer holds no more than one incomplete stanza and one read's worth of
/// bytes. After an error the parser only returns that error again, until
/// [`reset`](Self::reset).
#[derive(Debug)]
pub struct StreamParser {
    limits: Limits,
    buf: Vec<u8>,
    /// Start of the unconsumed bytes in `buf`.
    head: usize,
    /// Scanner position in `buf` (>= head).
    pos: usize,
    lex: Lex,
    /// Open elements of the stanza being scanned.
    depth: usize,
    /// Names of the open elements, so that a mismatched closing tag is
    /// refused when it arrives rather than when the stanza would end.
    open: Vec<Vec<u8>>,
    /// The tag name being scanned.
    name: Vec<u8>,
    /// Whether the scanner is inside that name.
    in_name: bool,
    phase: Phase,
    /// An XML declaration was consumed before the header.
    decl_seen: bool,
    /// Header bytes consumed so far (the declaration).
    header_used: usize,
    /// Namespace bindings declared on the stream header.
    bindings: Bindings,
    /// Qualified name of the stream element, e.g. `stream:stream`.
    stream_qname: String,
    failed: Option<StreamError>,
}

impl StreamParser {
    /// A parser expecting a stream header (RFC 6120 §4.2).
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buf: Vec::new(),
            head: 0,
            pos: 0,
            lex: Lex::Idle,
            depth: 0,
            open: Vec::new(),
            name: Vec::new(),
            in_name: false,
            phase: Phase::Header,
            decl_seen: false,
            header_used: 0,
            bindings: Vec::new(),
            stream_qname: String::new(),
            failed: None,
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Bytes fed but not yet consumed by an event.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.head
    }

    /// Appends received bytes. Consumed bytes are discarded here (amortized:
    /// when they make up at least half of the buffer). Bytes fed after an
    /// error are dropped.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.head > 0 && self.head >= self.buf.len() / 2 {
            self.buf.drain(..self.head);
            self.pos = self.pos.saturating_sub(self.head);
            self.head = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Frees the input buffer when everything fed was consumed, so that an
    /// idle stream holds no buffer; the next [`StreamParser::feed`] allocates
    /// what it needs. The scanner's name buffers go too: with nothing
    /// unconsumed no stanza is open.
    pub fn release_idle(&mut self) {
        if self.head == self.buf.len() {
            self.buf = Vec::new();
            self.head = 0;
            self.pos = 0;
            if self.open.is_empty() {
                self.open = Vec::new();
                self.name = Vec::new();
            }
        }
    }

    /// Starts over for a stream restart (RFC 6120 §4.3.3): after TLS
    /// negotiation (§5.4.3.3) and SASL success (§6.4.6) the client sends a
    /// new stream header. Unconsumed bytes are discarded: the client must
    /// not send anything between the command and its completion, and bytes
    /// sent in the clear before TLS must never be read as if they had come
    /// over TLS. Errors are cleared; the limits are kept.
    pub fn reset(&mut self) {
        let limits = std::mem::take(&mut self.limits);
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        *self = Self::new(limits);
        self.buf = buf;
    }

    /// Returns the next event, `Ok(None)` if more bytes are needed, or the
    /// stream error to send (RFC 6120 §4.9). Whitespace between stanzas
    /// (keepalives, RFC 6120 §4.6, §11.7) is consumed silently.
    #[allow(clippy::should_implement_trait)] // fallible and resumable, not an Iterator
    pub fn next(&mut self) -> Result<Option<StreamEvent>, StreamError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = match self.phase {
            Phase::Header => self.next_header(),
            Phase::Stream => self.next_in_stream(),
            Phase::Closed => self.after_close(),
        };
        if let Err(e) = &result {
            self.failed = Some(e.clone());
            self.buf = Vec::new();
            self.head = 0;
            self.pos = 0;
        }
        result
    }

    fn skip_whitespace(&mut self) {
        while self.buf.get(self.head).copied().is_some_and(is_ws) {
            self.head += 1;
        }
        self.pos = self.head;
    }

    fn consume(&mut self, end: usize) {
        self.head = end;
        self.pos = end;
        self.lex = Lex::Idle;
        self.depth = 0;
        self.open.clear();
    }

    /// From idle: skips whitespace and starts scanning at `<`.
    fn start_markup(&mut self, what: &str) -> Result<bool, StreamError> {
        if self.lex != Lex::Idle {
            return Ok(true);
        }
        self.skip_whitespace();
        match self.buf.get(self.head) {
            None => Ok(false),
            Some(b'<') => {
                self.lex = Lex::Lt;
                self.pos = self.head + 1;
                self.depth = 0;
                self.open.clear();
                Ok(true)
            }
            Some(_) => Err(nwf(format!("character data {what}"))),
        }
    }

    fn next_header(&mut self) -> Result<Option<StreamEvent>, StreamError> {
        loop {
            if !self.start_markup("before the stream header")? {
                return Ok(None);
            }
            let budget = self
                .limits
                .max_header_bytes
                .saturating_sub(self.header_used);
            let window_end = self.buf.len().min(self.head.saturating_add(budget));
            match self.scan(window_end)? {
                Scan::Incomplete if window_end < self.buf.len() => {
                    return Err(policy(Limit::HeaderBytes, self.limits.max_header_bytes));
                }
                Scan::Incomplete => return Ok(None),
                Scan::Decl(end) => {
                    check_declaration(&self.buf[self.head..end])?;
                    self.decl_seen = true;
                    self.header_used += end - self.head;
                    self.consume(end);
                }
                Scan::Header(end) => {
                    let (header, bindings, qname) =
                        parse_header(&self.buf[self.head..end], &self.limits)?;
                    self.bindings = bindings;
                    self.stream_qname = qname;
                    self.phase = Phase::Stream;
                    self.consume(end);
                    return Ok(Some(StreamEvent::Header(header)));
                }
                Scan::Stanza(_) | Scan::Close(_) => {
                    return Err(nwf("expected the stream header"));
                }
            }
        }
    }

    fn next_in_stream(&mut self) -> Result<Option<StreamEvent>, StreamError> {
        if !self.start_markup("outside a stanza")? {
            return Ok(None);
        }
        let window_end = self
            .buf
            .len()
            .min(self.head.saturating_add(self.limits.max_stanza_bytes));
        match self.scan(window_end)? {
            Scan::Incomplete if window_end < self.buf.len() => {
                Err(policy(Limit::StanzaBytes, self.limits.max_stanza_bytes))
            }
            Scan::Incomplete => Ok(None),
            Scan::Stanza(end) => {
                let element =
                    parse_fragment(&self.buf[self.head..end], &self.bindings, &self.limits)?;
                if element.namespace == NS_SERVER {
                    return Err(StreamError::InvalidNamespace(format!(
                        "{NS_SERVER} content on a client stream"
                    )));
                }
                self.consume(end);
                Ok(Some(StreamEvent::Stanza(element)))
            }
            Scan::Close(end) => {
                let tag = &self.buf[self.head..end];
                let name = tag
                    .strip_prefix(b"</")
                    .and_then(|t| t.strip_suffix(b">"))
                    .map(|t| {
                        let trimmed = t.iter().rposition(|b| !is_ws(*b)).map_or(0, |i| i + 1);
                        &t[..trimmed]
                    });
                if name != Some(self.stream_qname.as_bytes()) {
                    return Err(nwf(format!(
                        "closing tag {:?} does not match {}",
                        String::from_utf8_lossy(tag),
                        self.stream_qname
                    )));
                }
                self.phase = Phase::Closed;
                self.consume(end);
                Ok(Some(StreamEvent::Close))
            }
            Scan::Decl(_) | Scan::Header(_) => Err(nwf("unexpected markup")),
        }
    }

    fn after_close(&mut self) -> Result<Option<StreamEvent>, StreamError> {
        self.skip_whitespace();
        if self.head < self.buf.len() {
            return Err(nwf("data after the closing stream tag"));
        }
        Ok(None)
    }

    /// Advances the scanner over `buf[pos..window_end]`.
    fn scan(&mut self, window_end: usize) -> Result<Scan, StreamError> {
        let header = self.phase == Phase::Header;
        let decl_allowed = header && !self.decl_seen;
        let max_depth = self.limits.max_depth;
        // Longer names are refused by the stanza parser; the scanner only
        // needs enough of them to compare.
        let max_name = self.limits.max_name_bytes.saturating_add(1);
        let buf = &self.buf[..window_end];
        let mut pos = self.pos;
        let mut lex = self.lex;
        let mut depth = self.depth;
        let result = loop {
            let Some(&b) = buf.get(pos) else {
                break Ok(Scan::Incomplete);
            };
            pos += 1;
            lex = match lex {
                Lex::Idle => break Err(nwf("scanner not started")),
                Lex::Content if b == b'<' => Lex::Lt,
                Lex::Content => match buf[pos..].iter().position(|&c| c == b'<') {
                    Some(i) => {
                        pos += i + 1;
                        Lex::Lt
                    }
                    None => {
                        pos = buf.len();
                        Lex::Content
                    }
                },
                Lex::Lt => match b {
                    b'/' if header => break Err(nwf("closing tag before the stream header")),
                    b'/' => {
                        self.name.clear();
                        self.in_name = true;
                        Lex::EndTag
                    }
                    b'!' => Lex::Bang,
                    b'?' if decl_allowed => Lex::Pi { question: false },
                    b'?' => {
                        break Err(StreamError::RestrictedXml(
                            Restricted::ProcessingInstruction,
                        ));
                    }
                    b'>' | b'<' | b'=' | b'\'' | b'"' => break Err(nwf("malformed tag")),
                    b if is_ws(b) => break Err(nwf("malformed tag")),
                    _ => {
                        self.name.clear();
                        self.name.push(b);
                        self.in_name = true;
                        Lex::StartTag {
                            quote: 0,
                            slash: false,
                        }
                    }
                },
                Lex::StartTag { quote, .. } if quote != 0 => match b {
                    b'<' => break Err(nwf("'<' in attribute value")),
                    b if b == quote => Lex::StartTag {
                        quote: 0,
                        slash: false,
                    },
                    _ => lex,
                },
                Lex::StartTag { slash, .. } => match b {
                    b'"' | b'\'' => Lex::StartTag {
                        quote: b,
                        slash: false,
                    },
                    b'/' => Lex::StartTag {
                        quote: 0,
                        slash: true,
                    },
                    b'<' => break Err(nwf("'<' inside a tag")),
                    b'>' if header => break Ok(Scan::Header(pos)),
                    b'>' => {
                        self.in_name = false;
                        if depth + 1 > max_depth {
                            break Err(policy(Limit::Depth, max_depth));
                        }
                        if !slash {
                            depth += 1;
                            self.open.push(std::mem::take(&mut self.name));
                        } else if depth == 0 {
                            break Ok(Scan::Stanza(pos));
                        }
                        Lex::Content
                    }
                    _ => {
                        if self.in_name {
                            if is_ws(b) {
                                self.in_name = false;
                            } else if self.name.len() < max_name {
                                self.name.push(b);
                            }
                        }
                        Lex::StartTag {
                            quote: 0,
                            slash: false,
                        }
                    }
                },
                Lex::EndTag => match b {
                    b'>' if depth == 0 => break Ok(Scan::Close(pos)),
                    b'>' => {
                        // XML 1.0 §3 (well-formedness: element type match).
                        if self.open.pop().as_deref() != Some(self.name.as_slice()) {
                            break Err(nwf("closing tag does not match the open element"));
                        }
                        depth -= 1;
                        if depth == 0 {
                            break Ok(Scan::Stanza(pos));
                        }
                        Lex::Content
                    }
                    b'<' => break Err(nwf("'<' inside a closing tag")),
                    b if is_ws(b) => {
                        self.in_name = false;
                        Lex::EndTag
                    }
                    _ => {
                        if !self.in_name {
                            break Err(nwf("malformed closing tag"));
                        }
                        if self.name.len() < max_name {
                            self.name.push(b);
                        }
                        Lex::EndTag
                    }
                },
                Lex::Bang => match b {
                    b'-' => Lex::BangDash,
                    b'[' if depth == 0 => break Err(nwf("CDATA section outside a stanza")),
                    b'[' => Lex::CDataOpen(0),
                    b'A'..=b'Z' => break Err(StreamError::RestrictedXml(Restricted::Dtd)),
                    _ => break Err(nwf("malformed markup declaration")),
                },
                Lex::BangDash if b == b'-' => {
                    break Err(StreamError::RestrictedXml(Restricted::Comment));
                }
                Lex::BangDash => break Err(nwf("malformed comment")),
                Lex::CDataOpen(n) => {
                    if b != b"CDATA["[usize::from(n)] {
                        break Err(nwf("malformed CDATA section"));
                    }
                    if n == 5 {
                        Lex::CData(0)
                    } else {
                        Lex::CDataOpen(n + 1)
                    }
                }
                Lex::CData(n) => match b {
                    b']' => Lex::CData((n + 1).min(2)),
                    b'>' if n == 2 => Lex::Content,
                    _ => Lex::CData(0),
                },
                Lex::Pi { question } => match b {
                    b'>' if question => break Ok(Scan::Decl(pos)),
                    b'?' => Lex::Pi { question: true },
                    _ => Lex::Pi { question: false },
                },
            };
        };
        self.pos = pos;
        self.lex = lex;
        self.depth = depth;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HEADER: &str = "<?xml version='1.0'?><stream:stream to='example.com' \
        xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' \
        version='1.0' xml:lang='en'>";

    /// Feeds `chunks` one at a time, draining events after each; stops at
    /// the first error.
    fn drive<'a>(
        limits: &Limits,
        chunks: impl IntoIterator<Item = &'a [u8]>,
    ) -> (Vec<StreamEvent>, Option<StreamError>) {
        let mut parser = StreamParser::new(limits.clone());
        let mut events = Vec::new();
        for chunk in chunks {
            parser.feed(chunk);
            loop {
                match parser.next() {
                    Ok(Some(event)) => events.push(event),
                    Ok(None) => break,
                    Err(e) => return (events, Some(e)),
                }
            }
        }
        (events, None)
    }

    fn run(input: &str) -> (Vec<StreamEvent>, Option<StreamError>) {
        drive(&Limits::default(), [input.as_bytes()])
    }

    /// The error from `HEADER` + `rest`, asserting there is one.
    fn error_after_header(rest: &[u8]) -> StreamError {
        let mut input = HEADER.as_bytes().to_vec();
        input.extend_from_slice(rest);
        let (_, error) = drive(&Limits::default(), [input.as_slice()]);
        error.expect("an error")
    }

    fn stanzas(events: &[StreamEvent]) -> Vec<&Element> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Stanza(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// Releasing the buffers between reads (as the server does after each
    /// read) changes nothing in what is parsed, whatever the split.
    #[test]
    fn releasing_idle_buffers_between_reads_keeps_the_events() {
        let input = format!(
            "{HEADER}<message to='a@example.com'><body>one</body></message> \
             <iq type='get' id='1'><query xmlns='jabber:iq:roster'><item jid='b@example.com'/>\
             </query></iq><presence/></stream:stream>"
        );
        let (whole, error) = run(&input);
        assert!(error.is_none());
        assert_eq!(whole.len(), 5);
        for size in [1, 2, 7, 64] {
            let mut parser = StreamParser::new(Limits::default());
            let mut events = Vec::new();
            for chunk in input.as_bytes().chunks(size) {
                parser.feed(chunk);
                while let Some(event) = parser.next().expect("no error") {
                    events.push(event);
                }
                parser.release_idle();
            }
            assert_eq!(events, whole, "chunks of {size}");
            assert_eq!(parser.buf.capacity(), 0);
            assert_eq!(parser.open.capacity() + parser.name.capacity(), 0);
        }
    }

    #[test]
    fn mismatched_closing_tag_is_refused_before_the_stanza_ends() {
        let mut p = StreamParser::new(Limits::default());
        p.feed(HEADER.as_bytes());
        assert!(matches!(p.next(), Ok(Some(StreamEvent::Header(_)))));
        // Depth-wise this stanza is still open; name-wise it is broken.
        p.feed(b"<message><body>hi</message>");
        let err = p.next().unwrap_err();
        assert_eq!(err.condition(), "not-well-formed");
        // Matching names nested deeper are fine.
        let mut p = StreamParser::new(Limits::default());
        p.feed(HEADER.as_bytes());
        p.next().unwrap();
        p.feed(b"<message><body>a</body><x xmlns='urn:x'><y/></x ></message>");
        assert!(matches!(p.next(), Ok(Some(StreamEvent::Stanza(_)))));
    }

    #[test]
    fn header_attributes_version_and_namespaces() {
        let (events, error) = run(HEADER);
        assert_eq!(error, None);
        assert_eq!(
            events,
            vec![StreamEvent::Header(StreamHeader {
                to: Some("example.com".into()),
                from: None,
                id: None,
                version: (1, 0),
                lang: Some("en".into()),
                prefix: "stream".into(),
            })]
        );
        // Any prefix for the streams namespace, no XML declaration, leading
        // zeros in the version, escaped attribute values.
        let (events, error) = run("<s:stream xmlns:s='http://etherx.jabber.org/streams' \
             xmlns='jabber:client' version='01.002' from='juliet@im.example.com' \
             id='a&amp;b'>");
        assert_eq!(error, None);
        let StreamEvent::Header(h) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(h.version, (1, 2));
        assert_eq!(h.prefix, "s");
        assert_eq!(h.from.as_deref(), Some("juliet@im.example.com"));
        assert_eq!(h.id.as_deref(), Some("a&b"));
    }

    #[test]
    fn header_errors() {
        let cases = [
            // Stream namespace wrong.
            (
                "<stream:stream xmlns='jabber:client' xmlns:stream='http://wrong.example/' version='1.0'>",
                "invalid-namespace",
            ),
            // Content namespace wrong or missing.
            (
                "<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>",
                "invalid-namespace",
            ),
            (
                "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>",
                "invalid-namespace",
            ),
            (
                "<stream:foo xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>",
                "bad-format",
            ),
            (
                "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'/>",
                "bad-format",
            ),
            (
                "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='2.0'>",
                "unsupported-version",
            ),
            (
                "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
                "unsupported-version",
            ),
            (
                "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='one'>",
                "bad-format",
            ),
            (
                "<?xml version='1.0' encoding='ISO-8859-1'?><stream:stream>",
                "unsupported-encoding",
            ),
            (
                "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]>",
                "restricted-xml",
            ),
            ("<!-- hi -->", "restricted-xml"),
            ("<?php x ?>", "restricted-xml"),
            (
                "<?xml version='1.0'?><?xml version='1.0'?>",
                "restricted-xml",
            ),
            ("hello", "not-well-formed"),
            ("</stream:stream>", "not-well-formed"),
            (
                "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0' to='&foo;'>",
                "restricted-xml",
            ),
            (
                "<stream:stream xmlns='jabber:client' version='1.0'>",
                "not-well-formed",
            ),
        ];
        for (input, condition) in cases {
            let (events, error) = run(input);
            assert!(events.is_empty(), "{input}");
            assert_eq!(
                error.as_ref().map(StreamError::condition),
                Some(condition),
                "{input}: {error:?}"
            );
        }
    }

    #[test]
    fn header_size_limit() {
        let big = format!(
            "<stream:stream xmlns='jabber:client' xmlns:stream='{NS_STREAMS}' version='1.0' to='{}'>",
            "a".repeat(5000)
        );
        let (_, error) = run(&big);
        assert_eq!(
            error,
            Some(policy(
                Limit::HeaderBytes,
                Limits::default().max_header_bytes
            ))
        );
        // Refused as soon as the limit is passed, before the tag ends.
        let (_, error) = run(&big[..4200]);
        assert!(matches!(
            error,
            Some(StreamError::PolicyViolation {
                limit: Limit::HeaderBytes,
                ..
            })
        ));
    }

    #[test]
    fn nested_elements_and_namespaces() {
        let input = format!(
            "{HEADER}<iq type='get' id='r1'><query xmlns='jabber:iq:roster'>\
             <item jid='a@b'/><item jid='c@d' name='C &amp; D'>text<![CDATA[<raw>]]>&#x41;</item>\
             </query></iq><stream:features/>"
        );
        let (events, error) = run(&input);
        assert_eq!(error, None);
        let s = stanzas(&events);
        assert_eq!(s.len(), 2);
        let iq = s[0];
        assert_eq!((iq.name.as_str(), iq.namespace.as_str()), ("iq", NS_CLIENT));
        assert_eq!(iq.attr("type"), Some("get"));
        let query = iq.child("query", "jabber:iq:roster").expect("query");
        let items: Vec<_> = query.children_named("item", "jabber:iq:roster").collect();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].attr("jid"), Some("a@b"));
        assert_eq!(items[1].attr("name"), Some("C & D"));
        assert_eq!(items[1].text(), "text<raw>A");
        assert_eq!(items[1].children, vec![Node::Text("text<raw>A".into())]);
        assert!(iq.child("query", NS_CLIENT).is_none());
        // The stream prefix declared on the header is in scope.
        assert_eq!(s[1].name, "features");
        assert_eq!(s[1].namespace, NS_STREAMS);
    }

    #[test]
    fn prefixed_and_xml_attributes() {
        let input = format!(
            "{HEADER}<message xml:lang='fr' xmlns:x='urn:x' x:a='1' b='2'><x:body>hi</x:body></message>"
        );
        let (events, error) = run(&input);
        assert_eq!(error, None);
        let m = stanzas(&events)[0];
        assert_eq!(
            m.attributes,
            vec![
                ("xml:lang".to_string(), "fr".to_string()),
                ("{urn:x}a".to_string(), "1".to_string()),
                ("b".to_string(), "2".to_string()),
            ]
        );
        assert_eq!(
            m.child("body", "urn:x").map(Element::text),
            Some("hi".into())
        );
        let again = Element::parse(m.to_xml().as_bytes(), &Limits::default()).expect("parse");
        assert_eq!(&again, m);
    }

    #[test]
    fn element_in_the_xml_namespace_round_trips() {
        // Found by the fuzzer: the XML namespace cannot be declared as the
        // default namespace, so it must be written with the xml prefix.
        let input = format!("{HEADER}<iq><query><xml:item jid='a'><b/></xml:item></query></iq>");
        let (events, error) = run(&input);
        assert_eq!(error, None);
        let iq = stanzas(&events)[0];
        let item = iq
            .child("query", NS_CLIENT)
            .and_then(|q| q.child("item", NS_XML));
        assert_eq!(
            item.and_then(|i| i.child("b", NS_CLIENT))
                .map(|b| b.name.as_str()),
            Some("b")
        );
        let xml = iq.to_xml_in(NS_CLIENT);
        assert_eq!(
            xml,
            "<iq><query><xml:item jid='a'><b/></xml:item></query></iq>"
        );
        assert_eq!(
            Element::parse(iq.to_xml().as_bytes(), &Limits::default()).as_ref(),
            Ok(iq)
        );
    }

    #[test]
    fn attribute_and_text_normalization() {
        let input = format!("{HEADER}<m a='x\ty\r\nz&#xA;'>l1\r\nl2\rl3</m>");
        let (events, error) = run(&input);
        assert_eq!(error, None);
        let m = stanzas(&events)[0];
        assert_eq!(m.attr("a"), Some("x y z\n"));
        assert_eq!(m.text(), "l1\nl2\nl3");
    }

    #[test]
    fn whitespace_keepalives_are_skipped() {
        let input = format!("{HEADER} \n\t <presence/>\n\n \r\n<presence/>   ");
        let (events, error) = run(&input);
        assert_eq!(error, None);
        assert_eq!(stanzas(&events).len(), 2);
        // Keepalives alone after the header produce no event and no growth.
        let mut parser = StreamParser::new(Limits::default());
        parser.feed(HEADER.as_bytes());
        assert!(matches!(parser.next(), Ok(Some(StreamEvent::Header(_)))));
        for _ in 0..10_000 {
            parser.feed(b" ");
            assert_eq!(parser.next(), Ok(None));
        }
        assert_eq!(parser.buffered(), 0);
        assert!(parser.buf.len() < 16, "{}", parser.buf.len());
    }

    #[test]
    fn close_and_data_after_close() {
        let (events, error) = run(&format!("{HEADER}<presence/></stream:stream>\n"));
        assert_eq!(error, None);
        assert_eq!(events.last(), Some(&StreamEvent::Close));
        assert_eq!(events.len(), 3);
        let (_, error) = run(&format!("{HEADER}</stream:stream><presence/>"));
        assert_eq!(error.map(|e| e.condition()), Some("not-well-formed"));
        // Close tag must match the header's qualified name.
        let (_, error) = run(&format!("{HEADER}</stream>"));
        assert_eq!(error.map(|e| e.condition()), Some("not-well-formed"));
        let (events, error) = run(&format!("{HEADER}</stream:stream  >"));
        assert_eq!((events.len(), error), (2, None));
    }

    #[test]
    fn reset_after_stanza() {
        let mut parser = StreamParser::new(Limits::default());
        parser.feed(
            format!("{HEADER}<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><inject/>")
                .as_bytes(),
        );
        assert!(matches!(parser.next(), Ok(Some(StreamEvent::Header(_)))));
        let Ok(Some(StreamEvent::Stanza(starttls))) = parser.next() else {
            panic!("expected starttls")
        };
        assert_eq!(starttls.namespace, "urn:ietf:params:xml:ns:xmpp-tls");
        // Bytes after <starttls/> are plaintext leftovers: reset drops them.
        parser.reset();
        assert_eq!(parser.buffered(), 0);
        parser.feed(b"<message/>");
        assert_eq!(
            parser.next().map_err(|e| e.condition()),
            Err("bad-format"),
            "a stanza without a new header is refused"
        );
        parser.reset();
        parser.feed(format!("{HEADER}<message/>").as_bytes());
        assert!(matches!(parser.next(), Ok(Some(StreamEvent::Header(_)))));
        assert!(matches!(parser.next(), Ok(Some(StreamEvent::Stanza(_)))));
        assert_eq!(parser.next(), Ok(None));
    }

    #[test]
    fn error_conditions_in_stanzas() {
        let cases: &[(&[u8], &str)] = &[
            (b"<message><!DOCTYPE foo></message>", "restricted-xml"),
            (b"<!DOCTYPE foo>", "restricted-xml"),
            (b"<message>&foo;</message>", "restricted-xml"),
            (b"<message a='&foo;'/>", "restricted-xml"),
            (b"<message><!-- c --></message>", "restricted-xml"),
            (b"<!-- c -->", "restricted-xml"),
            (b"<message><?pi x?></message>", "restricted-xml"),
            (b"<?xml version='1.0'?>", "restricted-xml"),
            (b"<message><body>\xff</body></message>", "not-well-formed"),
            (b"<message><body>\xc3</body></message>", "not-well-formed"),
            (b"<message></msg>", "not-well-formed"),
            (b"<a><b></a></b>", "not-well-formed"),
            (b"hello", "not-well-formed"),
            (b"<![CDATA[x]]>", "not-well-formed"),
            (b"<m>&amp</m>", "not-well-formed"),
            (b"<m>&#0;</m>", "not-well-formed"),
            (b"<m>&#xD800;</m>", "not-well-formed"),
            (b"<m>\x01</m>", "not-well-formed"),
            (b"<m>]]></m>", "not-well-formed"),
            (b"<m a='1' a='2'/>", "not-well-formed"),
            (
                b"<m xmlns:p='u' xmlns:q='u' p:a='1' q:a='2'/>",
                "not-well-formed",
            ),
            (b"<m a='1'b='2'/>", "not-well-formed"),
            (b"<m a=1/>", "not-well-formed"),
            (b"<p:m/>", "not-well-formed"),
            (b"<m p:a='1'/>", "not-well-formed"),
            (b"<m xmlns:p=''/>", "not-well-formed"),
            (b"<m xmlns:xml='urn:other'/>", "not-well-formed"),
            (b"<1m/>", "not-well-formed"),
            (b"< m/>", "not-well-formed"),
            (b"<m a='<'/>", "not-well-formed"),
            (b"<m xmlns='jabber:server'/>", "invalid-namespace"),
        ];
        for (input, condition) in cases {
            let error = error_after_header(input);
            assert_eq!(
                error.condition(),
                *condition,
                "{}: {error}",
                String::from_utf8_lossy(input)
            );
        }
    }

    fn nested(depth: usize) -> String {
        let mut s = String::new();
        for _ in 0..depth {
            s.push_str("<a>");
        }
        for _ in 0..depth {
            s.push_str("</a>");
        }
        s
    }

    #[test]
    fn depth_limit() {
        let max = Limits::default().max_depth;
        let (events, error) = run(&format!("{HEADER}{}", nested(max)));
        assert_eq!((stanzas(&events).len(), error), (1, None));
        let (events, error) = run(&format!("{HEADER}{}", nested(max + 1)));
        assert_eq!(stanzas(&events).len(), 0);
        assert_eq!(error, Some(policy(Limit::Depth, max)));
        // An empty element counts too.
        let limits = Limits {
            max_depth: 2,
            ..Limits::default()
        };
        let input = format!("{HEADER}<a><b><c/></b></a>");
        let (_, error) = drive(&limits, [input.as_bytes()]);
        assert_eq!(error, Some(policy(Limit::Depth, 2)));
        // Refused before the stanza is complete.
        let (_, error) = run(&format!("{HEADER}{}", "<a>".repeat(max + 1)));
        assert_eq!(error, Some(policy(Limit::Depth, max)));
    }

    #[test]
    fn attribute_and_name_limits() {
        let max = Limits::default().max_attributes;
        let attrs = |n: usize| (0..n).map(|i| format!(" a{i}='v'")).collect::<String>();
        let (events, error) = run(&format!("{HEADER}<m{}/>", attrs(max)));
        assert_eq!((stanzas(&events).len(), error), (1, None));
        let error = error_after_header(format!("<m{}/>", attrs(max + 1)).as_bytes());
        assert_eq!(error, policy(Limit::Attributes, max));
        let name_max = Limits::default().max_name_bytes;
        let error = error_after_header(format!("<{}/>", "n".repeat(name_max + 1)).as_bytes());
        assert_eq!(error, policy(Limit::NameBytes, name_max));
        let error = error_after_header(format!("<m {}='1'/>", "n".repeat(name_max + 1)).as_bytes());
        assert_eq!(error, policy(Limit::NameBytes, name_max));
    }

    #[test]
    fn oversized_stanza_refused_before_it_ends() {
        let limits = Limits::default();
        let mut parser = StreamParser::new(limits.clone());
        parser.feed(HEADER.as_bytes());
        assert!(matches!(parser.next(), Ok(Some(StreamEvent::Header(_)))));
        parser.feed(b"<message><body>");
        let chunk = vec![b'a'; 16 * 1024];
        let mut fed = 0usize;
        let error = loop {
            assert!(fed < 10 * 1024 * 1024, "10 MB accepted without error");
            parser.feed(&chunk);
            fed += chunk.len();
            assert!(parser.buffered() <= limits.max_stanza_bytes + chunk.len());
            match parser.next() {
                Ok(None) => {}
                Ok(Some(e)) => panic!("unexpected {e:?}"),
                Err(e) => break e,
            }
        };
        assert_eq!(error, policy(Limit::StanzaBytes, limits.max_stanza_bytes));
        assert!(fed <= limits.max_stanza_bytes + chunk.len(), "{fed}");
        // The parser stays failed and stops buffering.
        parser.feed(&chunk);
        assert_eq!(parser.next(), Err(error));
        assert_eq!(parser.buffered(), 0);
    }

    #[test]
    fn stanza_of_exactly_the_limit_is_accepted() {
        let limits = Limits {
            max_stanza_bytes: 64,
            ..Limits::default()
        };
        let exact = format!("<m>{}</m>", "x".repeat(64 - 7));
        assert_eq!(exact.len(), 64);
        let input = format!("{HEADER}{exact}{exact}");
        let (events, error) = drive(&limits, [input.as_bytes()]);
        assert_eq!((stanzas(&events).len(), error), (2, None));
        let over = format!("{HEADER}<m>{}</m>", "x".repeat(64 - 6));
        let (events, error) = drive(&limits, [over.as_bytes()]);
        assert_eq!(stanzas(&events).len(), 0);
        assert_eq!(error, Some(policy(Limit::StanzaBytes, 64)));
    }

    #[test]
    fn large_stanza_byte_by_byte_is_linear() {
        // 200 KiB of small tags fed one byte at a time: quadratic re-parsing
        // would take minutes.
        let body: String = "<b>x</b>".repeat(25_000);
        let input = format!("{HEADER}<m>{body}</m>");
        let (events, error) = drive(&Limits::default(), input.as_bytes().chunks(1));
        assert_eq!(error, None);
        assert_eq!(stanzas(&events)[0].children.len(), 25_000);
    }

    #[test]
    fn limits_at_usize_max_do_not_overflow() {
        // Found by the fuzzer: head + limit overflowed.
        let unlimited = Limits {
            max_stanza_bytes: usize::MAX,
            max_depth: usize::MAX,
            max_attributes: usize::MAX,
            max_name_bytes: usize::MAX,
            max_header_bytes: usize::MAX,
        };
        let input = format!("{HEADER}<m a='1'><b/></m>");
        let (events, error) = drive(&unlimited, input.as_bytes().chunks(7));
        assert_eq!((stanzas(&events).len(), error), (1, None));
    }

    #[test]
    fn stream_error_rendering() {
        assert_eq!(
            stream_error_xml("not-well-formed", Some("a < b")),
            "<stream:error><not-well-formed xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>a &lt; b</text>\
             </stream:error></stream:stream>"
        );
        assert_eq!(
            stream_error_xml("bad'><x", None),
            "<stream:error><undefined-condition xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             </stream:error></stream:stream>"
        );
        let e = policy(Limit::Depth, 32);
        assert!(e.to_xml().starts_with("<stream:error><policy-violation "));
    }

    #[test]
    fn builder_and_serializer() {
        let m = Element::new("message", NS_CLIENT)
            .with_attr("to", "romeo@example.net")
            .with_attr("type", "chat")
            .with_child(
                Element::new("body", NS_CLIENT)
                    .with_text("a<b & 'c' \"d\"")
                    .with_text(""),
            )
            .with_child(Element::new("x", "urn:x").with_attr("{urn:y}k", "v"));
        assert_eq!(
            m.to_xml_in(NS_CLIENT),
            "<message to='romeo@example.net' type='chat'><body>a&lt;b &amp; &apos;c&apos; \
             &quot;d&quot;</body><x xmlns='urn:x' xmlns:ns0='urn:y' ns0:k='v'/></message>"
        );
        assert!(m.to_xml().starts_with("<message xmlns='jabber:client' "));
        let (events, error) = run(&format!("{HEADER}{}", m.to_xml_in(NS_CLIENT)));
        assert_eq!(error, None);
        assert_eq!(stanzas(&events), vec![&m]);
        let mut m = m;
        m.set_attr("type", "normal");
        assert_eq!(m.attr("type"), Some("normal"));
        assert_eq!(m.remove_attr("to"), Some("romeo@example.net".into()));
        assert_eq!(m.attributes.len(), 1);
        // Characters XML cannot carry are replaced, never emitted raw.
        let odd = Element::new("a", "").with_text("\u{1}");
        assert_eq!(odd.to_xml(), "<a>\u{FFFD}</a>");
    }

    // ---- property tests ----

    fn arb_char() -> impl Strategy<Value = char> {
        prop_oneof![
            4 => prop::char::range('a', 'z'),
            2 => prop::sample::select(vec!['&', '<', '>', '"', '\'', ']', ';', '#', ' ', '\t', '\n', '\r']),
            1 => any::<char>().prop_filter("XML Char", |c| is_xml_char(*c)),
        ]
    }

    fn arb_string() -> impl Strategy<Value = String> {
        prop::collection::vec(arb_char(), 0..12).prop_map(|v| v.into_iter().collect())
    }

    fn arb_name() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z][a-z0-9._-]{0,5}", "[éА-Я_][a-z·-]{0,3}"]
    }

    fn arb_ns() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "",
            NS_CLIENT,
            NS_STREAMS,
            "jabber:iq:roster",
            "urn:x:a&b<'\"c",
            "urn:{y}",
            NS_XML,
        ])
        .prop_map(str::to_owned)
    }

    fn arb_key() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => arb_name(),
            1 => Just("xml:lang".to_owned()),
            1 => (arb_ns().prop_filter("Clark keys", |n| !n.is_empty() && n != NS_XML), arb_name())
                .prop_map(|(ns, n)| format!("{{{ns}}}{n}")),
        ]
    }

    fn arb_element() -> impl Strategy<Value = Element> {
        let leaf = (
            arb_name(),
            arb_ns(),
            prop::collection::vec((arb_key(), arb_string()), 0..4),
        )
            .prop_map(|(name, ns, attrs)| {
                let mut e = Element::new(name, ns);
                for (k, v) in attrs {
                    e.set_attr(k, v);
                }
                e
            });
        leaf.prop_recursive(4, 48, 5, |inner| {
            (
                inner.clone(),
                prop::collection::vec(
                    prop_oneof![
                        inner.prop_map(Node::Element),
                        arb_string().prop_map(Node::Text)
                    ],
                    0..5,
                ),
            )
                .prop_map(|(mut e, children)| {
                    e.children.clear();
                    for child in children {
                        match child {
                            Node::Element(c) => e.push_child(c),
                            Node::Text(t) => e.push_text(&t),
                        }
                    }
                    e
                })
        })
    }

    /// A top-level stanza may not be in jabber:server; the generator never
    /// makes one, but make sure.
    fn arb_stanza() -> impl Strategy<Value = Element> {
        arb_element().prop_filter("not jabber:server", |e| e.namespace != NS_SERVER)
    }

    fn stream_text(stanzas: &[Element], gaps: &[String], close: bool) -> String {
        let mut s = HEADER.to_owned();
        for (i, e) in stanzas.iter().enumerate() {
            s.push_str(gaps.get(i).map_or("", String::as_str));
            s.push_str(&e.to_xml_in(NS_CLIENT));
        }
        if close {
            s.push_str("</stream:stream>");
        }
        s
    }

    fn chunked(input: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut last = 0;
        for c in cuts.into_iter().chain([input.len()]) {
            chunks.push(input[last..c].to_vec());
            last = c;
        }
        chunks
    }

    proptest! {
        #[test]
        fn to_xml_round_trips(e in arb_element()) {
            let xml = e.to_xml();
            let parsed = Element::parse(xml.as_bytes(), &Limits::default());
            prop_assert_eq!(parsed.as_ref(), Ok(&e), "{}", xml);
        }

        #[test]
        fn split_points_do_not_matter(
            elements in prop::collection::vec(arb_stanza(), 0..5),
            gaps in prop::collection::vec("[ \t\r\n]{0,3}", 0..5),
            close in any::<bool>(),
            cuts in prop::collection::vec(any::<usize>(), 0..12),
        ) {
            let input = stream_text(&elements, &gaps, close);
            let limits = Limits::default();
            let whole = drive(&limits, [input.as_bytes()]);
            prop_assert_eq!(&whole.1, &None);
            prop_assert_eq!(stanzas(&whole.0), elements.iter().collect::<Vec<_>>());
            prop_assert_eq!(whole.0.last() == Some(&StreamEvent::Close), close);
            let bytewise = drive(&limits, input.as_bytes().chunks(1));
            prop_assert_eq!(&bytewise, &whole);
            let chunks = chunked(input.as_bytes(), &cuts);
            let split = drive(&limits, chunks.iter().map(Vec::as_slice));
            prop_assert_eq!(&split, &whole);
        }

        #[test]
        fn split_points_do_not_matter_for_broken_input(
            elements in prop::collection::vec(arb_stanza(), 1..4),
            mutations in prop::collection::vec(
                (any::<usize>(), prop::sample::select(b"<>/!?-[]&;'\"= x\xff\xc3".to_vec())),
                1..4,
            ),
            cuts in prop::collection::vec(any::<usize>(), 0..8),
        ) {
            let mut input = stream_text(&elements, &[], true).into_bytes();
            for (at, byte) in mutations {
                let at = at % input.len();
                input[at] = byte;
            }
            let limits = Limits { max_depth: 3, max_attributes: 3, max_stanza_bytes: 300, ..Limits::default() };
            let whole = drive(&limits, [input.as_slice()]);
            let bytewise = drive(&limits, input.chunks(1));
            prop_assert_eq!(&bytewise, &whole);
            let chunks = chunked(&input, &cuts);
            let split = drive(&limits, chunks.iter().map(Vec::as_slice));
            prop_assert_eq!(&split, &whole);
            for s in stanzas(&whole.0) {
                let again = Element::parse(s.to_xml().as_bytes(), &Limits::default());
                prop_assert_eq!(again.as_ref(), Ok(s));
            }
        }
    }
}
