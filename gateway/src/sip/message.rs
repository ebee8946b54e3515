//! RFC 3261 §7 (message format), §18.3 (framing), §20 (header fields):
//! parsing SIP messages from bytes under limits, and building responses
//! (§8.2.6).
//!
//! The raw text is checked first (size, header count, header line length,
//! `Content-Length`), folded lines are unfolded and compact header names
//! expanded (§7.3.1, §7.3.3); then rsip tokenizes the message and the
//! headers every request needs (Via, From, To, Call-ID, CSeq) are checked
//! and extracted. Nothing here does I/O.

use std::net::SocketAddr;

use rsip::Method;
use rsip::headers::{ToTypedHeader, UntypedHeader};

/// Limits on one message (SPEC.md §5; `[sip]` settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest message, start line to the end of the body.
    pub max_message_bytes: usize,
    /// Most header lines (after unfolding).
    pub max_headers: usize,
    /// Longest header line (after unfolding).
    pub max_header_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 65_535,
            max_headers: 64,
            max_header_line_bytes: 4096,
        }
    }
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Larger than [`Limits::max_message_bytes`].
    #[error("message larger than {0} bytes")]
    TooLarge(usize),
    /// More header lines than [`Limits::max_headers`].
    #[error("more than {0} header lines")]
    TooManyHeaders(usize),
    /// A header line longer than [`Limits::max_header_line_bytes`].
    #[error("header line longer than {0} bytes")]
    HeaderLineTooLong(usize),
    /// `Content-Length` is not a number or appears twice with different values.
    #[error("invalid content-length")]
    BadContentLength,
    /// `Content-Length` announces more bytes than arrived (RFC 3261 §18.3).
    #[error("content-length {declared} exceeds the {available} body bytes received")]
    Truncated {
        /// Announced.
        declared: usize,
        /// Received.
        available: usize,
    },
    /// A stream transport message without `Content-Length` (RFC 3261 §18.3).
    #[error("content-length is required over stream transports")]
    MissingContentLength,
    /// The start line or a header does not parse.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A mandatory header (RFC 3261 §8.1.1) is missing or invalid.
    #[error("missing or invalid {0} header")]
    MissingHeader(&'static str),
    /// A request method this server does not know (answered 501).
    #[error("method {0} is not implemented")]
    UnknownMethod(String),
}

/// What a stream buffer holds at its start (RFC 3261 §18.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framed {
    /// Not a whole message yet.
    Incomplete,
    /// CRLF keep-alives (RFC 5626 §4.4.1) of this many bytes: skip them.
    KeepAlive(usize),
    /// A whole message of this many bytes.
    Message(usize),
}

const HEADER_END: &[u8] = b"\r\n\r\n";

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Finds the first message in a stream buffer: the header block ends with an
/// empty line and `Content-Length` gives the body (mandatory over streams,
/// RFC 3261 §18.3). Refuses as soon as the limits are exceeded, without
/// waiting for more data.
pub fn frame(buf: &[u8], limits: &Limits) -> Result<Framed, ParseError> {
    let crlf = buf
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    if crlf > 0 {
        return Ok(Framed::KeepAlive(crlf));
    }
    let Some(end) = find(buf, HEADER_END) else {
        if buf.len() > limits.max_message_bytes {
            return Err(ParseError::TooLarge(limits.max_message_bytes));
        }
        return Ok(Framed::Incomplete);
    };
    let head = &buf[..end + HEADER_END.len()];
    let declared = content_length(head)?.ok_or(ParseError::MissingContentLength)?;
    let total = head.len().saturating_add(declared);
    if total > limits.max_message_bytes {
        return Err(ParseError::TooLarge(limits.max_message_bytes));
    }
    if buf.len() < total {
        return Ok(Framed::Incomplete);
    }
    Ok(Framed::Message(total))
}

/// The full name of a compact header name (RFC 3261 §7.3.3, RFC 3265 §7.2
/// `o`/`u`, RFC 3903 has none).
fn expand(name: &str) -> &str {
    match name.to_ascii_lowercase().as_str() {
        "v" => "Via",
        "f" => "From",
        "t" => "To",
        "i" => "Call-ID",
        "m" => "Contact",
        "l" => "Content-Length",
        "c" => "Content-Type",
        "e" => "Content-Encoding",
        "k" => "Supported",
        "s" => "Subject",
        "o" => "Event",
        "u" => "Allow-Events",
        _ => name,
    }
}

/// Header lines of a head (start line excluded), unfolded (RFC 3261 §7.3.1),
/// with limits checked.
fn header_lines(head: &str, limits: &Limits) -> Result<Vec<(String, String)>, ParseError> {
    let mut lines: Vec<String> = Vec::new();
    for raw in head.split("\r\n").skip(1) {
        if raw.is_empty() {
            continue;
        }
        if raw.starts_with([' ', '\t']) {
            let Some(last) = lines.last_mut() else {
                return Err(ParseError::Malformed("continuation line first".into()));
            };
            last.push(' ');
            last.push_str(raw.trim_start());
        } else {
            if lines.len() >= limits.max_headers {
                return Err(ParseError::TooManyHeaders(limits.max_headers));
            }
            lines.push(raw.to_owned());
        }
        if lines
            .last()
            .is_some_and(|l| l.len() > limits.max_header_line_bytes)
        {
            return Err(ParseError::HeaderLineTooLong(limits.max_header_line_bytes));
        }
    }
    lines
        .into_iter()
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| ParseError::Malformed("header line without a colon".into()))?;
            let name = name.trim_end();
            if name.is_empty() || !name.bytes().all(is_token) {
                return Err(ParseError::Malformed("invalid header name".into()));
            }
            Ok((expand(name).to_owned(), value.trim().to_owned()))
        })
        .collect()
}

/// RFC 3261 §25.1 `token` characters.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b)
}

/// The `Content-Length` of a head, if any (RFC 3261 §20.14).
fn content_length(head: &[u8]) -> Result<Option<usize>, ParseError> {
    let text = std::str::from_utf8(head).map_err(|_| ParseError::Malformed("not utf-8".into()))?;
    let mut found: Option<usize> = None;
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") || name.eq_ignore_ascii_case("l") {
            let value = value.trim();
            if value.is_empty() || value.len() > 9 || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ParseError::BadContentLength);
            }
            let n: usize = value.parse().map_err(|_| ParseError::BadContentLength)?;
            if found.is_some_and(|f| f != n) {
                return Err(ParseError::BadContentLength);
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// A name-addr or addr-spec with parameters (From, To, Contact; RFC 3261
/// §20.10, §20.20, §20.39).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameAddr {
    /// The URI.
    pub uri: rsip::Uri,
    /// The `tag` parameter (RFC 3261 §19.3).
    pub tag: Option<String>,
    /// The header value as received.
    pub raw: String,
}

impl NameAddr {
    fn parse_from(value: &str) -> Option<Self> {
        let typed = rsip::headers::From::new(tighten(value)).typed().ok()?;
        let tag = typed.tag().map(|t| t.value().to_owned());
        Some(Self {
            uri: typed.uri,
            tag,
            raw: value.to_owned(),
        })
    }

    /// `user@host` of the URI (host without port), lower-cased host.
    pub fn address(&self) -> Option<String> {
        uri_address(&self.uri)
    }
}

/// Removes the optional whitespace around `;` and `=` outside quoted
/// strings (RFC 3261 §25.1 SEMI and EQUAL allow it; rsip does not).
pub fn tighten(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut quoted = false;
    let mut chars = value.trim().chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && (c == ';' || c == '=') {
            while out.ends_with([' ', '\t']) {
                out.pop();
            }
            out.push(c);
            while chars.peek().is_some_and(|n| *n == ' ' || *n == '\t') {
                chars.next();
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// A `Contact` value (RFC 3261 §20.10, §25.1 `contact-param`): the URI and
/// the header's parameters. rsip's tokenizer rejects a quoted parameter
/// value holding `<`/`>`, as RFC 5626 `+sip.instance="<urn:uuid:…>"` (sent
/// by PJSIP over TCP) does, so the parameters are split here and only the
/// URI goes to rsip.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContactValue {
    pub uri: rsip::Uri,
    /// Header parameters in order, names lower-cased, values unquoted.
    pub params: Vec<(String, Option<String>)>,
}

impl ContactValue {
    /// A header parameter's value by (case-insensitive) name.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Splits `text` at unquoted occurrences of `sep`.
fn split_unquoted(text: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut quoted, mut escaped, mut start) = (false, false, 0);
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Parses one `Contact` value (not `*`); None when it is not a SIP URI with
/// well-formed parameters.
pub fn parse_contact(value: &str) -> Option<ContactValue> {
    let v = value.trim();
    // `name-addr` (an optional display name, then `<URI>`) or `addr-spec`,
    // whose `;` parameters then belong to the header (RFC 3261 §20.10).
    let mut quoted = false;
    let lt = v.char_indices().find_map(|(i, c)| {
        if c == '"' {
            quoted = !quoted;
        }
        (c == '<' && !quoted).then_some(i)
    });
    let (uri_text, rest) = match lt {
        Some(lt) => {
            let gt = v[lt..].find('>')? + lt;
            (&v[lt + 1..gt], &v[gt + 1..])
        }
        None => v.split_at(v.find(';').unwrap_or(v.len())),
    };
    let uri = rsip::Uri::try_from(uri_text.trim()).ok()?;
    if !matches!(uri.scheme, Some(rsip::Scheme::Sip | rsip::Scheme::Sips)) {
        return None;
    }
    let rest = rest.trim();
    let mut params = Vec::new();
    if !rest.is_empty() {
        let rest = rest.strip_prefix(';')?;
        for p in split_unquoted(rest, ';') {
            let (name, value) = match p.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim())),
                None => (p.trim(), None),
            };
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.!%*_+`'~".contains(c))
            {
                return None;
            }
            let value = match value {
                Some(v) if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') => {
                    Some(v[1..v.len() - 1].to_owned())
                }
                Some(v) if v.is_empty() || v.contains('"') => return None,
                Some(v) => Some(v.to_owned()),
                None => None,
            };
            params.push((name.to_ascii_lowercase(), value));
        }
    }
    Some(ContactValue { uri, params })
}

/// `user@host` of a SIP URI (RFC 3261 §19.1.1), the host lower-cased and the
/// port dropped; None without a user part.
pub fn uri_address(uri: &rsip::Uri) -> Option<String> {
    let user = uri.user()?;
    if user.is_empty() {
        return None;
    }
    Some(format!(
        "{user}@{}",
        uri.host_with_port.host.to_string().to_ascii_lowercase()
    ))
}

/// The top Via of a request (RFC 3261 §20.42) as far as transactions and
/// responses need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopVia {
    /// The transport named in the sent-protocol (`UDP`, `TCP`, `TLS`).
    pub transport: String,
    /// The sent-by host and port.
    pub sent_by: String,
    /// The sent-by host alone.
    pub host: String,
    /// The `branch` parameter.
    pub branch: Option<String>,
    /// Whether an `rport` parameter (RFC 3581 §3) is present.
    pub rport: bool,
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method.
    pub method: Method,
    /// The Request-URI.
    pub uri: rsip::Uri,
    /// Header fields in order: full name, value.
    pub headers: Vec<(String, String)>,
    /// The body (exactly `Content-Length` bytes).
    pub body: Vec<u8>,
    /// Each Via value, top first (comma-separated values split).
    pub vias: Vec<String>,
    /// The top Via.
    pub via: TopVia,
    /// From.
    pub from: NameAddr,
    /// To.
    pub to: NameAddr,
    /// Call-ID.
    pub call_id: String,
    /// CSeq number.
    pub cseq: u32,
}

/// A parsed response (to a request this server sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub code: u16,
    /// Call-ID.
    pub call_id: String,
    /// CSeq number.
    pub cseq: u32,
    /// CSeq method.
    pub cseq_method: String,
    /// The top Via's branch.
    pub branch: Option<String>,
}

/// A parsed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A request.
    Request(Box<Request>),
    /// A response.
    Response(Response),
}

/// Looks up header values by full name, case-insensitively.
fn values<'a, 'b>(
    headers: &'a [(String, String)],
    name: &'b str,
) -> impl Iterator<Item = &'a str> + use<'a, 'b> {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

impl Request {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        values(&self.headers, name).next()
    }

    /// Every header line's value, unsplit (for headers whose values contain
    /// commas, such as `Authorization`, RFC 3261 §7.3.1).
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        values(&self.headers, name).collect()
    }

    /// Every value of a header, comma-separated lists split (RFC 3261 §7.3.1).
    pub fn header_list(&self, name: &str) -> Vec<String> {
        values(&self.headers, name).flat_map(split_list).collect()
    }

    /// The `Expires` header as a number of seconds (RFC 3261 §20.19).
    pub fn expires(&self) -> Option<u32> {
        self.header("Expires")?.trim().parse().ok()
    }

    /// The event package of `Event` (RFC 6665 §8.2.1), lower-cased, without
    /// parameters.
    pub fn event(&self) -> Option<String> {
        let value = self.header("Event")?;
        let package = value.split(';').next()?.trim();
        (!package.is_empty()).then(|| package.to_ascii_lowercase())
    }

    /// The media type of `Content-Type`, lower-cased, without parameters.
    pub fn content_type(&self) -> Option<String> {
        let value = self.header("Content-Type")?;
        Some(value.split(';').next()?.trim().to_ascii_lowercase())
    }

    /// Sets `received` and fills `rport` in the top Via (RFC 3261 §18.2.1,
    /// RFC 3581 §4) for a request that arrived from `peer`.
    pub fn stamp_received(&mut self, peer: SocketAddr) {
        let Some(top) = self.vias.first_mut() else {
            return;
        };
        let ip = peer.ip().to_string();
        let mut params: Vec<String> = top.split(';').map(str::to_owned).collect();
        let mut has_received = false;
        for p in params.iter_mut().skip(1) {
            let name = p
                .split('=')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            if name == "rport" {
                *p = format!("rport={}", peer.port());
            } else if name == "received" {
                *p = format!("received={ip}");
                has_received = true;
            }
        }
        if !has_received && (self.via.host != ip || self.via.rport) {
            params.push(format!("received={ip}"));
        }
        *top = params.join(";");
    }
}

/// Splits a header value at commas outside quotes and angle brackets.
pub fn split_list(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let (mut quoted, mut angle, mut escaped) = (false, false, false);
    for c in value.chars() {
        if escaped {
            escaped = false;
            current.push(c);
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '<' if !quoted => angle = true,
            '>' if !quoted => angle = false,
            ',' if !quoted && !angle => {
                let item = current.trim();
                if !item.is_empty() {
                    out.push(item.to_owned());
                }
                current.clear();
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    let item = current.trim();
    if !item.is_empty() {
        out.push(item.to_owned());
    }
    out
}

fn cseq_of(headers: &[(String, String)]) -> Result<(u32, String), ParseError> {
    let value = values(headers, "CSeq")
        .next()
        .ok_or(ParseError::MissingHeader("CSeq"))?;
    let mut parts = value.split_whitespace();
    let number = parts
        .next()
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or(ParseError::MissingHeader("CSeq"))?;
    let method = parts.next().ok_or(ParseError::MissingHeader("CSeq"))?;
    if parts.next().is_some() {
        return Err(ParseError::MissingHeader("CSeq"));
    }
    Ok((number, method.to_ascii_uppercase()))
}

fn top_via(value: &str) -> Result<TopVia, ParseError> {
    let typed = rsip::headers::Via::new(tighten(value))
        .typed()
        .map_err(|_| ParseError::MissingHeader("Via"))?;
    let branch = typed.branch().map(|b| b.to_string());
    let rport = value.split(';').skip(1).any(|p| {
        p.split('=')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case("rport")
    });
    Ok(TopVia {
        transport: typed.transport.to_string().to_ascii_uppercase(),
        sent_by: typed.uri.host_with_port.to_string(),
        host: typed.uri.host_with_port.host.to_string(),
        branch,
        rport,
    })
}

/// Parses one message. `stream`: it came over TCP or TLS, where
/// `Content-Length` is mandatory; over UDP a missing one means the rest of
/// the datagram, and bytes beyond it are discarded (RFC 3261 §18.3).
pub fn parse(bytes: &[u8], limits: &Limits, stream: bool) -> Result<Message, ParseError> {
    if bytes.len() > limits.max_message_bytes {
        return Err(ParseError::TooLarge(limits.max_message_bytes));
    }
    // Leading CRLFs before a start line are ignored (RFC 3261 §7.5).
    let start = bytes
        .iter()
        .take_while(|b| matches!(b, b'\r' | b'\n'))
        .count();
    let bytes = &bytes[start..];
    let end = find(bytes, HEADER_END)
        .ok_or_else(|| ParseError::Malformed("no empty line after the headers".into()))?;
    let head_bytes = &bytes[..end + 2];
    let head = std::str::from_utf8(head_bytes)
        .map_err(|_| ParseError::Malformed("headers are not utf-8".into()))?;
    let available = bytes.len() - end - HEADER_END.len();
    let body_len = match content_length(&bytes[..end + HEADER_END.len()])? {
        Some(declared) if declared > available => {
            return Err(ParseError::Truncated {
                declared,
                available,
            });
        }
        Some(declared) => declared,
        None if stream => return Err(ParseError::MissingContentLength),
        None => available,
    };
    let body = &bytes[end + HEADER_END.len()..end + HEADER_END.len() + body_len];
    let start_line = head.split("\r\n").next().unwrap_or("");
    if start_line.len() > limits.max_header_line_bytes {
        return Err(ParseError::HeaderLineTooLong(limits.max_header_line_bytes));
    }
    let headers = header_lines(head, limits)?;

    // rsip tokenizes the normalised text: start line, one header per line.
    let mut normalised = String::with_capacity(head.len() + 2);
    normalised.push_str(start_line);
    normalised.push_str("\r\n");
    for (name, value) in &headers {
        normalised.push_str(name);
        normalised.push_str(": ");
        normalised.push_str(value);
        normalised.push_str("\r\n");
    }
    normalised.push_str("\r\n");
    let is_response = start_line.starts_with("SIP/");
    if !is_response {
        let method = start_line.split(' ').next().unwrap_or("");
        if method.parse::<Method>().is_err() {
            if !method.is_empty() && method.bytes().all(is_token) && start_line.ends_with("SIP/2.0")
            {
                return Err(ParseError::UnknownMethod(method.to_owned()));
            }
            return Err(ParseError::Malformed("invalid request line".into()));
        }
    }
    let parsed = rsip::SipMessage::try_from(normalised.as_bytes())
        .map_err(|e| ParseError::Malformed(short(&e.to_string())))?;

    let call_id = values(&headers, "Call-ID")
        .next()
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .ok_or(ParseError::MissingHeader("Call-ID"))?
        .to_owned();
    let (cseq, cseq_method) = cseq_of(&headers)?;
    let vias: Vec<String> = values(&headers, "Via").flat_map(split_list).collect();
    let via = top_via(vias.first().ok_or(ParseError::MissingHeader("Via"))?)?;
    match parsed {
        rsip::SipMessage::Response(r) => Ok(Message::Response(Response {
            code: r.status_code.code(),
            call_id,
            cseq,
            cseq_method,
            branch: via.branch,
        })),
        rsip::SipMessage::Request(r) => {
            if r.version != rsip::Version::V2 {
                return Err(ParseError::Malformed("not SIP/2.0".into()));
            }
            if cseq_method != r.method.to_string() {
                return Err(ParseError::MissingHeader("CSeq"));
            }
            let from = values(&headers, "From")
                .next()
                .and_then(NameAddr::parse_from)
                .ok_or(ParseError::MissingHeader("From"))?;
            let to = values(&headers, "To")
                .next()
                .and_then(NameAddr::parse_from)
                .ok_or(ParseError::MissingHeader("To"))?;
            Ok(Message::Request(Box::new(Request {
                method: r.method,
                uri: r.uri,
                headers,
                body: body.to_vec(),
                vias,
                via,
                from,
                to,
                call_id,
                cseq,
            })))
        }
    }
}

fn short(s: &str) -> String {
    let mut s = s.replace(['\r', '\n'], " ");
    if s.len() > 120 {
        let mut cut = 120;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Standard reason phrases (RFC 3261 §21, RFC 3903 §11.2.1, RFC 6665 §8.3).
pub fn reason(code: u16) -> &'static str {
    match code {
        100 => "Trying",
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        412 => "Conditional Request Failed",
        413 => "Request Entity Too Large",
        415 => "Unsupported Media Type",
        423 => "Interval Too Brief",
        480 => "Temporarily Unavailable",
        481 => "Call/Transaction Does Not Exist",
        489 => "Bad Event",
        500 => "Server Internal Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The methods this server answers (RFC 3261 §20.5 `Allow`).
pub const ALLOW: &str = "REGISTER, OPTIONS, MESSAGE, SUBSCRIBE, NOTIFY, PUBLISH";

/// Builds a response to `req` (RFC 3261 §8.2.6.2): Via (as stamped), From,
/// Call-ID and CSeq copied; To copied with `to_tag` added when it has none.
pub fn response(
    req: &Request,
    code: u16,
    to_tag: Option<&str>,
    extra: &[(&str, String)],
    body: Option<(&str, &[u8])>,
) -> Vec<u8> {
    let mut out = String::with_capacity(512);
    out.push_str(&format!("SIP/2.0 {code} {}\r\n", reason(code)));
    for via in &req.vias {
        out.push_str(&format!("Via: {via}\r\n"));
    }
    out.push_str(&format!("From: {}\r\n", req.from.raw));
    match (&req.to.tag, to_tag) {
        (None, Some(tag)) if code > 100 => {
            out.push_str(&format!("To: {};tag={tag}\r\n", req.to.raw))
        }
        _ => out.push_str(&format!("To: {}\r\n", req.to.raw)),
    }
    out.push_str(&format!("Call-ID: {}\r\n", req.call_id));
    out.push_str(&format!("CSeq: {} {}\r\n", req.cseq, req.method));
    for (name, value) in extra {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("Server: switchboard\r\n");
    finish(out, body)
}

/// Appends Content-Type and Content-Length and the body.
pub fn finish(mut head: String, body: Option<(&str, &[u8])>) -> Vec<u8> {
    match body {
        Some((content_type, bytes)) => {
            head.push_str(&format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
                bytes.len()
            ));
            let mut out = head.into_bytes();
            out.extend_from_slice(bytes);
            out
        }
        None => {
            head.push_str("Content-Length: 0\r\n\r\n");
            head.into_bytes()
        }
    }
}

/// A response built from the raw lines of a message that did not parse, if
/// it has the headers a response needs (RFC 3261 §8.2.6.2); over UDP a
/// message without them is dropped (nothing can be answered).
pub fn salvage_response(bytes: &[u8], code: u16, warning: &str) -> Option<Vec<u8>> {
    let limit = bytes.len().min(65_535);
    let text = String::from_utf8_lossy(&bytes[..limit]);
    let head = text.split("\r\n\r\n").next()?;
    let mut lines = head.split("\r\n");
    let start = lines.next()?;
    if start.starts_with("SIP/") {
        return None;
    }
    let mut via = Vec::new();
    let (mut from, mut to, mut call_id, mut cseq) = (None, None, None, None);
    for line in lines.take(256) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if value.is_empty() || value.len() > 1024 {
            continue;
        }
        match expand(name.trim()).to_ascii_lowercase().as_str() {
            "via" => via.push(value.to_owned()),
            "from" => from = Some(value.to_owned()),
            "to" => to = Some(value.to_owned()),
            "call-id" => call_id = Some(value.to_owned()),
            "cseq" => cseq = Some(value.to_owned()),
            _ => {}
        }
    }
    if via.is_empty() {
        return None;
    }
    let (from, to, call_id, cseq) = (from?, to?, call_id?, cseq?);
    let mut out = format!("SIP/2.0 {code} {}\r\n", reason(code));
    for v in via {
        out.push_str(&format!("Via: {v}\r\n"));
    }
    let warning = warning.replace(['"', '\\'], "'");
    out.push_str(&format!(
        "From: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq}\r\nWarning: 399 switchboard \"{warning}\"\r\nServer: switchboard\r\n"
    ));
    Some(finish(out, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const REGISTER: &str = "REGISTER sip:example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK776asdhds;rport\r\n\
Max-Forwards: 70\r\n\
To: Alice <sip:alice@example.com>\r\n\
From: Alice <sip:alice@example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.example.com\r\n\
CSeq: 314159 REGISTER\r\n\
Contact: <sip:alice@10.0.0.1:5070>;expires=600, <sip:alice@10.0.0.2>\r\n\
Content-Length: 0\r\n\r\n";

    fn req(text: &str) -> Request {
        match parse(text.as_bytes(), &Limits::default(), false).unwrap() {
            Message::Request(r) => *r,
            Message::Response(_) => panic!("a response"),
        }
    }

    #[test]
    fn contacts_with_outbound_parameters_parse() {
        // PJSIP over TCP (RFC 5626 §4.2): a quoted instance id with `<>`.
        let c = parse_contact(
            "<sip:alice@127.0.0.1:32965;transport=TCP;ob>;reg-id=1;\
             +sip.instance=\"<urn:uuid:00000000-0000-0000-0000-0000a30f0000>\"",
        )
        .unwrap();
        assert_eq!(c.uri.host_with_port.to_string(), "127.0.0.1:32965");
        assert_eq!(c.param("reg-id"), Some("1"));
        assert_eq!(
            c.param("+SIP.instance"),
            Some("<urn:uuid:00000000-0000-0000-0000-0000a30f0000>")
        );
        // A display name with `<` in quotes, and addr-spec parameters.
        let c = parse_contact("\"A <b>\" <sip:a@h>;expires=60").unwrap();
        assert_eq!(c.param("expires"), Some("60"));
        let c = parse_contact("sip:a@h:5070 ; expires = 30").unwrap();
        assert_eq!(c.uri.to_string(), "sip:a@h:5070");
        assert_eq!(c.param("expires"), Some("30"));
        for bad in [
            "<sip:a@h",
            "<mailto:a@h>",
            "<sip:a@h>x",
            "<sip:a@h>;=1",
            "<sip:a@h>;a=\"x",
        ] {
            assert!(parse_contact(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn parses_a_register() {
        let r = req(REGISTER);
        assert_eq!(r.method, Method::Register);
        assert_eq!(r.call_id, "a84b4c76e66710@pc33.example.com");
        assert_eq!(r.cseq, 314159);
        assert_eq!(r.from.tag.as_deref(), Some("1928301774"));
        assert_eq!(r.to.tag, None);
        assert_eq!(r.from.address().as_deref(), Some("alice@example.com"));
        assert_eq!(r.via.branch.as_deref(), Some("z9hG4bK776asdhds"));
        assert!(r.via.rport);
        assert_eq!(r.via.transport, "UDP");
        assert_eq!(r.header_list("Contact").len(), 2);
    }

    #[test]
    fn compact_and_folded_headers() {
        let text = "MESSAGE sip:bob@example.com SIP/2.0\r\n\
v: SIP/2.0/TCP host.example.com;branch=z9hG4bKx\r\n\
t: <sip:bob@example.com>\r\n\
f: <sip:alice@example.com>\r\n ;tag=abc\r\n\
i: call1\r\n\
CSeq: 1 MESSAGE\r\n\
c: text/plain\r\n\
l: 5\r\n\r\nhello";
        let r = req(text);
        assert_eq!(r.from.tag.as_deref(), Some("abc"));
        assert_eq!(r.content_type().as_deref(), Some("text/plain"));
        assert_eq!(r.body, b"hello");
    }

    #[test]
    fn limits_are_enforced() {
        let limits = Limits {
            max_message_bytes: 2000,
            max_headers: 8,
            max_header_line_bytes: 256,
        };
        let big = format!("{REGISTER}{}", "x".repeat(2000));
        assert_eq!(
            parse(big.as_bytes(), &limits, false),
            Err(ParseError::TooLarge(2000))
        );
        let many = REGISTER.replace("Max-Forwards: 70\r\n", &"Subject: x\r\n".repeat(9));
        assert_eq!(
            parse(many.as_bytes(), &limits, false),
            Err(ParseError::TooManyHeaders(8))
        );
        let long = REGISTER.replace("Max-Forwards: 70", &format!("Subject: {}", "y".repeat(300)));
        assert_eq!(
            parse(long.as_bytes(), &limits, false),
            Err(ParseError::HeaderLineTooLong(256))
        );
    }

    #[test]
    fn content_length_rules() {
        let body = REGISTER.replace("Content-Length: 0\r\n\r\n", "Content-Length: 10\r\n\r\nabc");
        assert_eq!(
            parse(body.as_bytes(), &Limits::default(), false),
            Err(ParseError::Truncated {
                declared: 10,
                available: 3
            })
        );
        // Extra datagram bytes beyond Content-Length are discarded.
        let extra = REGISTER.replace("Content-Length: 0\r\n\r\n", "Content-Length: 2\r\n\r\nabc");
        assert_eq!(req(&extra).body, b"ab");
        let none = REGISTER.replace("Content-Length: 0\r\n", "");
        assert_eq!(
            parse(none.as_bytes(), &Limits::default(), true),
            Err(ParseError::MissingContentLength)
        );
        let bad = REGISTER.replace("Content-Length: 0", "Content-Length: -1");
        assert_eq!(
            parse(bad.as_bytes(), &Limits::default(), false),
            Err(ParseError::BadContentLength)
        );
    }

    #[test]
    fn missing_headers_and_unknown_methods() {
        let no_call_id = REGISTER.replace("Call-ID: a84b4c76e66710@pc33.example.com\r\n", "");
        assert_eq!(
            parse(no_call_id.as_bytes(), &Limits::default(), false),
            Err(ParseError::MissingHeader("Call-ID"))
        );
        let unknown = REGISTER
            .replace("REGISTER sip", "FROB sip")
            .replace("314159 REGISTER", "314159 FROB");
        assert_eq!(
            parse(unknown.as_bytes(), &Limits::default(), false),
            Err(ParseError::UnknownMethod("FROB".into()))
        );
        let garbage = b"\x00\x01garbage\r\n\r\n";
        assert!(parse(garbage, &Limits::default(), false).is_err());
        assert!(salvage_response(garbage, 400, "bad").is_none());
        let salvaged = salvage_response(no_call_id.as_bytes(), 400, "x");
        assert!(salvaged.is_none(), "no Call-ID, no response");
        let broken = REGISTER.replace("Max-Forwards: 70", "Max-Forwards: seventy\r\nBroken line");
        let answer =
            String::from_utf8(salvage_response(broken.as_bytes(), 400, "bad").unwrap()).unwrap();
        assert!(answer.starts_with("SIP/2.0 400 Bad Request\r\n"));
        assert!(answer.contains("Call-ID: a84b4c76e66710@pc33.example.com\r\n"));
    }

    #[test]
    fn stream_framing() {
        let limits = Limits::default();
        assert_eq!(frame(b"\r\n\r\nREG", &limits), Ok(Framed::KeepAlive(4)));
        assert_eq!(
            frame(b"REGISTER sip:x SIP/2.0\r\n", &limits),
            Ok(Framed::Incomplete)
        );
        let two = format!("{REGISTER}{REGISTER}");
        assert_eq!(
            frame(two.as_bytes(), &limits),
            Ok(Framed::Message(REGISTER.len()))
        );
        let with_body =
            REGISTER.replace("Content-Length: 0\r\n\r\n", "Content-Length: 4\r\n\r\nab");
        assert_eq!(frame(with_body.as_bytes(), &limits), Ok(Framed::Incomplete));
        let huge = REGISTER.replace("Content-Length: 0", "Content-Length: 999999");
        assert_eq!(
            frame(huge.as_bytes(), &limits),
            Err(ParseError::TooLarge(65_535))
        );
        assert_eq!(
            frame(&vec![b'a'; 70_000], &limits),
            Err(ParseError::TooLarge(65_535))
        );
    }

    #[test]
    fn received_and_rport() {
        let mut r = req(REGISTER);
        r.stamp_received("192.0.2.4:61000".parse().unwrap());
        assert_eq!(
            r.vias[0],
            "SIP/2.0/UDP 10.0.0.1:5070;branch=z9hG4bK776asdhds;rport=61000;received=192.0.2.4"
        );
        let resp = String::from_utf8(response(&r, 200, Some("t1"), &[], None)).unwrap();
        assert!(resp.contains("To: Alice <sip:alice@example.com>;tag=t1\r\n"));
        assert!(resp.contains("CSeq: 314159 REGISTER\r\n"));
        assert!(resp.ends_with("Content-Length: 0\r\n\r\n"));
    }
}
