//! XEP-0033 Extended Stanza Addressing: broadcast IM (SPEC.md §7, "one
//! message to many contacts"). The server is the multicast service
//! (XEP-0033 §2.2): a message addressed to a served domain itself, with an
//! `<addresses xmlns='http://jabber.org/protocol/address'/>` block, is
//! expanded by the router into one message per `to`, `cc` and `bcc`
//! address, each routed with the ordinary rules (offline storage, errors
//! per recipient).
//!
//! This module is the pure part: [`parse`] reads the block from the stanza
//! (as the gateway serialized it; its addresses were normalised by the
//! gateway like any `to`) under a limit on the number of addresses, and
//! [`Multicast::copy_for`] writes each recipient's stanza: the outer `to`
//! is the recipient (§5 step 8), every address carries `delivered='true'`
//! (§4.5, §5 step 6), and `bcc` addresses are removed except, for a `bcc`
//! recipient, its own (§4.6.3, §5 step 8).

use std::ops::Range;

use quick_xml::NsReader;
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::{Namespace, ResolveResult};

use crate::xml::escape;

/// XEP-0033's namespace.
pub const NS_ADDRESS: &str = "http://jabber.org/protocol/address";

/// Default of the most `to`/`cc`/`bcc` addresses one message may have.
/// XEP-0033 §8: configurable, "more than 20 and less than 100".
pub const DEFAULT_MAX_ADDRESSES: usize = 50;

/// Most `<address/>` elements of any type read from one block, whatever the
/// configured limit (the rest are not looked at: the stanza is refused).
const MAX_ELEMENTS: usize = 1_000;

/// One `<address/>` (XEP-0033 §4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// Its `type` (§4.6): `to`, `cc`, `bcc`, `replyto`, `replyroom`,
    /// `noreply`, or an extension's.
    pub kind: String,
    /// Its `jid` (§4.1).
    pub jid: Option<String>,
    /// Its `uri` (§4.2; optional to support, and not supported here).
    pub uri: Option<String>,
    /// Its `node` (§4.3).
    pub node: Option<String>,
    /// Its `desc` (§4.4).
    pub desc: Option<String>,
    /// `delivered='true'` (§4.5): already delivered, never again.
    pub delivered: bool,
}

impl Address {
    /// Whether the stanza is to be delivered to this address: a `to`, `cc`
    /// or `bcc` address not yet delivered (§4.5, §5 step 4).
    pub fn is_recipient(&self) -> bool {
        matches!(self.kind.as_str(), "to" | "cc" | "bcc") && !self.delivered
    }

    fn write(&self, out: &mut String) {
        out.push_str("<address");
        crate::xml::attr(out, "type", &self.kind);
        for (name, value) in [
            ("jid", &self.jid),
            ("uri", &self.uri),
            ("node", &self.node),
            ("desc", &self.desc),
        ] {
            if let Some(value) = value {
                crate::xml::attr(out, name, value);
            }
        }
        out.push_str(" delivered='true'/>");
    }
}

/// Why a multicast message is refused as a whole (XEP-0033 §8), before
/// anything is delivered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MulticastError {
    /// More `to`/`cc`/`bcc` addresses than the limit (§8 `not-acceptable`).
    #[error("too many addresses: {count}, at most {max} are accepted")]
    TooMany {
        /// Addresses given (counted up to an internal bound).
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A `uri` address (§4.2, optional and not supported: §8
    /// `jid-malformed`).
    #[error("uri addresses are not supported: {0}")]
    Uri(String),
    /// The block breaks a rule of §4 (`bad-request`).
    #[error("invalid addresses: {0}")]
    Invalid(&'static str),
}

impl MulticastError {
    /// The RFC 6120 §8.3.3 condition returned to the sender.
    pub fn condition(&self) -> &'static str {
        match self {
            Self::TooMany { .. } => "not-acceptable",
            Self::Uri(_) => "jid-malformed",
            Self::Invalid(_) => "bad-request",
        }
    }
}

/// A message's address block, and where it is in the stanza.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Multicast {
    /// The addresses, in document order.
    pub addresses: Vec<Address>,
    /// The stanza.
    stanza: String,
    /// The root's name and its attributes (unescaped), in order.
    root: String,
    root_attrs: Vec<(String, String)>,
    /// The root start tag's span.
    root_tag: Range<usize>,
    /// The `<addresses/>` element's span.
    block: Range<usize>,
}

fn attrs(e: &BytesStart<'_>) -> Result<Vec<(String, String)>, MulticastError> {
    let mut out = Vec::new();
    for a in e.attributes() {
        let a = a.map_err(|_| MulticastError::Invalid("malformed attribute"))?;
        let key = String::from_utf8(a.key.as_ref().to_vec())
            .map_err(|_| MulticastError::Invalid("malformed attribute"))?;
        let value = a
            .unescape_value()
            .map_err(|_| MulticastError::Invalid("malformed attribute value"))?;
        out.push((key, value.into_owned()));
    }
    Ok(out)
}

fn in_ns(ns: &ResolveResult<'_>) -> bool {
    matches!(ns, ResolveResult::Bound(Namespace(n)) if *n == NS_ADDRESS.as_bytes())
}

/// Reads the XEP-0033 block of a message stanza: `Ok(None)` when it has
/// none. Refuses a block with more than `max` recipients (`to`, `cc`,
/// `bcc` not yet delivered), a `uri` address, an address without a `jid`
/// (unless `noreply`, §4), with both `jid` and `uri`, without a `type`, or
/// a second block (its `bcc` addresses would reach everyone).
pub fn parse(stanza: &str, max: usize) -> Result<Option<Multicast>, MulticastError> {
    let mut reader = NsReader::from_str(stanza);
    let mut depth = 0usize;
    // The root's name, attributes and start tag span.
    type Root = (String, Vec<(String, String)>, Range<usize>);
    let mut root: Option<Root> = None;
    let mut block: Option<Range<usize>> = None;
    let mut block_start = 0usize;
    let mut in_block = false;
    let mut addresses: Vec<Address> = Vec::new();
    loop {
        let before = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
        let (ours, event) = match reader.read_resolved_event() {
            Ok((ns, event)) => (in_ns(&ns), event),
            Err(_) => return Err(MulticastError::Invalid("malformed stanza")),
        };
        let after = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
        let empty = matches!(event, Event::Empty(_));
        match event {
            Event::Start(e) | Event::Empty(e) => {
                if depth == 0 {
                    let name = String::from_utf8(e.local_name().as_ref().to_vec())
                        .map_err(|_| MulticastError::Invalid("malformed stanza"))?;
                    root = Some((name, attrs(&e)?, before..after));
                } else if depth == 1 && ours && e.local_name().as_ref() == b"addresses" {
                    if block.is_some() || in_block {
                        return Err(MulticastError::Invalid("more than one addresses element"));
                    }
                    block_start = before;
                    if empty {
                        block = Some(before..after);
                    } else {
                        in_block = true;
                    }
                } else if depth == 2 && in_block && ours && e.local_name().as_ref() == b"address" {
                    if addresses.len() >= MAX_ELEMENTS {
                        return Err(MulticastError::TooMany {
                            count: addresses.iter().filter(|a| a.is_recipient()).count(),
                            max,
                        });
                    }
                    let mut a = Address {
                        kind: String::new(),
                        jid: None,
                        uri: None,
                        node: None,
                        desc: None,
                        delivered: false,
                    };
                    let mut typed = false;
                    for (key, value) in attrs(&e)? {
                        match key.as_str() {
                            "type" => {
                                a.kind = value;
                                typed = true;
                            }
                            "jid" => a.jid = Some(value),
                            "uri" => a.uri = Some(value),
                            "node" => a.node = Some(value),
                            "desc" => a.desc = Some(value),
                            "delivered" => a.delivered = value == "true",
                            _ => {}
                        }
                    }
                    if !typed {
                        return Err(MulticastError::Invalid("an address without a type"));
                    }
                    if a.jid.is_some() && a.uri.is_some() {
                        return Err(MulticastError::Invalid("an address with both jid and uri"));
                    }
                    addresses.push(a);
                }
                if !empty {
                    depth += 1;
                }
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                if depth == 1 && in_block {
                    in_block = false;
                    block = Some(block_start..after);
                }
                if depth == 0 {
                    break;
                }
            }
            Event::Eof => {
                if depth != 0 {
                    return Err(MulticastError::Invalid("malformed stanza"));
                }
                break;
            }
            _ => {}
        }
        if depth == 0 && root.is_some() {
            // An empty root element: nothing inside.
            break;
        }
    }
    let Some(block) = block else {
        return Ok(None);
    };
    let Some((root, root_attrs, root_tag)) = root else {
        return Ok(None);
    };
    for a in &addresses {
        if a.is_recipient() {
            if let Some(uri) = &a.uri {
                return Err(MulticastError::Uri(uri.clone()));
            }
            if a.jid.is_none() {
                return Err(MulticastError::Invalid("a recipient address without a jid"));
            }
        }
    }
    let count = addresses.iter().filter(|a| a.is_recipient()).count();
    if !addresses
        .iter()
        .any(|a| matches!(a.kind.as_str(), "to" | "cc" | "bcc"))
    {
        return Err(MulticastError::Invalid("no to, cc or bcc address"));
    }
    if count > max {
        return Err(MulticastError::TooMany { count, max });
    }
    Ok(Some(Multicast {
        addresses,
        stanza: stanza.to_owned(),
        root,
        root_attrs,
        root_tag,
        block,
    }))
}

impl Multicast {
    /// The recipients, each once (the first of its addresses decides
    /// whether it is a `bcc`, unless it is also a visible one), in document
    /// order: (address index, jid).
    pub fn recipients(&self) -> Vec<(usize, &str)> {
        let mut out: Vec<(usize, &str)> = Vec::new();
        for (i, a) in self.addresses.iter().enumerate() {
            let Some(jid) = a.jid.as_deref().filter(|_| a.is_recipient()) else {
                continue;
            };
            match out.iter_mut().find(|(_, j)| *j == jid) {
                Some((first, _)) => {
                    // A visible address wins over a bcc one.
                    if self.addresses[*first].kind == "bcc" && a.kind != "bcc" {
                        *first = i;
                    }
                }
                None => out.push((i, jid)),
            }
        }
        out
    }

    /// The stanza for the recipient of address `index` (see the module's
    /// doc): `to` is its address, every address is marked delivered, `bcc`
    /// addresses are gone except its own when it is one.
    pub fn copy_for(&self, index: usize) -> String {
        let recipient = &self.addresses[index];
        let to = recipient.jid.as_deref().unwrap_or_default();
        let mut out = String::with_capacity(self.stanza.len() + 64);
        out.push('<');
        out.push_str(&self.root);
        let mut wrote_to = false;
        for (key, value) in &self.root_attrs {
            if key == "to" {
                crate::xml::attr(&mut out, "to", to);
                wrote_to = true;
            } else if key.starts_with("xmlns") {
                out.push_str(&format!(" {key}='{}'", escape(value)));
            } else {
                crate::xml::attr(&mut out, key, value);
            }
        }
        if !wrote_to {
            crate::xml::attr(&mut out, "to", to);
        }
        out.push('>');
        out.push_str(&self.stanza[self.root_tag.end..self.block.start]);
        out.push_str("<addresses xmlns='");
        out.push_str(NS_ADDRESS);
        out.push_str("'>");
        for (i, a) in self.addresses.iter().enumerate() {
            if a.kind == "bcc" && i != index {
                continue;
            }
            a.write(&mut out);
        }
        out.push_str("</addresses>");
        out.push_str(&self.stanza[self.block.end..]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stanza(addresses: &str) -> String {
        format!(
            "<message xmlns='jabber:client' to='example.com' from='alice@example.com/a' type='chat' id='m1'>\
             <body>hi &amp; bye</body><addresses xmlns='{NS_ADDRESS}'>{addresses}</addresses>\
             <origin-id xmlns='urn:xmpp:sid:0' id='m1'/></message>"
        )
    }

    #[test]
    fn a_message_without_a_block_is_not_multicast() {
        let plain = "<message xmlns='jabber:client' to='example.com'><body>x</body></message>";
        assert_eq!(parse(plain, 50), Ok(None));
        assert_eq!(parse("<message to='example.com'/>", 50), Ok(None));
        // Same local name, another namespace: not XEP-0033.
        let other = "<message to='example.com'><addresses xmlns='urn:other'><address type='to' jid='b@example.com'/></addresses></message>";
        assert_eq!(parse(other, 50), Ok(None));
    }

    #[test]
    fn recipients_are_to_cc_and_bcc_once_and_not_delivered_ones() {
        let s = stanza(
            "<address type='to' jid='bob@example.com' desc='Bob'/>\
             <address type='cc' jid='carol@example.com/phone'/>\
             <address type='bcc' jid='dave@example.com'/>\
             <address type='to' jid='erin@example.com' delivered='true'/>\
             <address type='replyto' jid='alice@example.com'/>\
             <address type='noreply'/>\
             <address type='bcc' jid='bob@example.com'/>",
        );
        let m = parse(&s, 50).unwrap().unwrap();
        let r: Vec<&str> = m.recipients().into_iter().map(|(_, j)| j).collect();
        assert_eq!(
            r,
            [
                "bob@example.com",
                "carol@example.com/phone",
                "dave@example.com"
            ]
        );
    }

    #[test]
    fn copies_mark_every_address_delivered_and_hide_bcc() {
        let s = stanza(
            "<address type='to' jid='bob@example.com' desc='Bob &amp; co'/>\
             <address type='cc' jid='carol@example.com'/>\
             <address type='bcc' jid='dave@example.com'/>\
             <address type='bcc' jid='frank@example.com'/>",
        );
        let m = parse(&s, 50).unwrap().unwrap();
        let to_bob = m.copy_for(0);
        assert_eq!(
            to_bob,
            format!(
                "<message xmlns='jabber:client' to='bob@example.com' from='alice@example.com/a' type='chat' id='m1'>\
                 <body>hi &amp; bye</body><addresses xmlns='{NS_ADDRESS}'>\
                 <address type='to' jid='bob@example.com' desc='Bob &amp; co' delivered='true'/>\
                 <address type='cc' jid='carol@example.com' delivered='true'/>\
                 </addresses><origin-id xmlns='urn:xmpp:sid:0' id='m1'/></message>"
            )
        );
        // A bcc recipient sees its own bcc address only (XEP-0033 §4.6.3).
        let to_dave = m.copy_for(2);
        assert!(to_dave.contains(" to='dave@example.com'"));
        assert!(to_dave.contains("<address type='bcc' jid='dave@example.com' delivered='true'/>"));
        assert!(!to_dave.contains("frank"), "{to_dave}");
        // The copy is a block the parser reads again: nothing to deliver.
        let again = parse(&to_dave, 50).unwrap().unwrap();
        assert!(again.recipients().is_empty());
        assert!(again.addresses.iter().all(|a| a.delivered));
    }

    #[test]
    fn the_limit_is_on_recipients_at_the_boundary() {
        let list = |n: usize| {
            (0..n)
                .map(|i| format!("<address type='to' jid='u{i}@example.com'/>"))
                .collect::<String>()
        };
        // Delivered and non-recipient addresses do not count.
        let extra =
            "<address type='to' jid='x@example.com' delivered='true'/><address type='noreply'/>";
        let at = stanza(&format!("{}{extra}", list(20)));
        assert_eq!(parse(&at, 20).unwrap().unwrap().recipients().len(), 20);
        let over = stanza(&list(21));
        let err = parse(&over, 20).unwrap_err();
        assert_eq!(err, MulticastError::TooMany { count: 21, max: 20 });
        assert_eq!(err.condition(), "not-acceptable");
        assert_eq!(
            err.to_string(),
            "too many addresses: 21, at most 20 are accepted"
        );
        // A huge block stops being read at the internal bound.
        let huge = stanza(&list(5000));
        assert!(matches!(
            parse(&huge, 50),
            Err(MulticastError::TooMany { max: 50, .. })
        ));
    }

    #[test]
    fn bad_blocks_are_refused_with_their_condition() {
        let cases = [
            (
                "<address type='to' uri='sip:bob@example.com'/>",
                "jid-malformed",
            ),
            ("<address jid='bob@example.com'/>", "bad-request"),
            ("<address type='to' desc='Bob'/>", "bad-request"),
            (
                "<address type='to' jid='bob@example.com' uri='sip:b@example.com'/>",
                "bad-request",
            ),
            ("<address type='noreply'/>", "bad-request"),
        ];
        for (block, condition) in cases {
            let err = parse(&stanza(block), 50).unwrap_err();
            assert_eq!(err.condition(), condition, "{block}");
        }
        let two = format!(
            "<message to='example.com'><addresses xmlns='{NS_ADDRESS}'><address type='to' jid='b@example.com'/></addresses>\
             <addresses xmlns='{NS_ADDRESS}'><address type='bcc' jid='c@example.com'/></addresses></message>"
        );
        assert_eq!(parse(&two, 50).unwrap_err().condition(), "bad-request");
        assert_eq!(
            parse("<message><addresses", 50).unwrap_err().condition(),
            "bad-request"
        );
    }
}
