//! RFC 3863 (PIDF) with RFC 4479 data-model persons and RFC 4480 (RPID)
//! activities: reading published presence into device or phone-line inputs,
//! and writing composed presence into NOTIFY bodies. RFC 8048 §7 maps the
//! values to and from XMPP (`away` ⇄ away/xa, `busy` ⇄ dnd, note ⇄ status).
//!
//! Parsing is bounded: no DTD, no entities other than XML's five and
//! character references, at most [`MAX_DEPTH`] levels, [`MAX_ELEMENTS`]
//! elements and [`MAX_TEXT`] bytes of kept text.

use std::collections::BTreeSet;

use quick_xml::events::Event;
use quick_xml::reader::Reader;
use switchboard_schemas::events::{Availability, ComposedPresence, Show};

/// Deepest nesting read.
pub const MAX_DEPTH: usize = 16;
/// Most elements in one document.
pub const MAX_ELEMENTS: usize = 512;
/// Longest note kept, in bytes.
pub const MAX_TEXT: usize = 1024;

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PidfError {
    /// Not well-formed, or not UTF-8.
    #[error("malformed pidf: {0}")]
    Malformed(String),
    /// A DTD or an unknown entity (refused, RFC 3863 §4.1 needs neither).
    #[error("pidf with a dtd or entity is refused")]
    Restricted,
    /// Over a limit.
    #[error("pidf over the {0} limit")]
    Limit(&'static str),
    /// The root is not a PIDF `<presence>`.
    #[error("not a pidf presence document")]
    NotPidf,
}

/// One `<tuple>` (RFC 3863 §4.1.2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tuple {
    /// Its `id`.
    pub id: String,
    /// `<basic>`: open (true) or closed.
    pub basic: Option<bool>,
    /// `<contact>`.
    pub contact: Option<String>,
}

/// A published presence document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pidf {
    /// The `entity` attribute (`pres:` or `sip:` URI).
    pub entity: String,
    /// The tuples.
    pub tuples: Vec<Tuple>,
    /// RPID activities (local names, e.g. `away`, `busy`, `on-the-phone`).
    pub activities: BTreeSet<String>,
    /// The first `<note>` (person notes first, then tuple and document).
    pub note: Option<String>,
}

/// The device input a publication means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// Available (some tuple open).
    pub available: bool,
    /// XMPP show.
    pub show: Option<Show>,
    /// Status text.
    pub status: Option<String>,
}

impl Pidf {
    /// RFC 8048 §7.2: basic open/closed ⇄ available; RPID `away` (and
    /// `vacation`, `sleeping`) → away; `busy` (and `meeting`,
    /// `performance`, `presentation`) → dnd; note → status.
    pub fn device_state(&self) -> DeviceState {
        let available = self.tuples.iter().any(|t| t.basic == Some(true));
        let has = |names: &[&str]| names.iter().any(|n| self.activities.contains(*n));
        let show = if !available {
            None
        } else if has(&[
            "busy",
            "meeting",
            "performance",
            "presentation",
            "on-the-phone",
        ]) {
            Some(Show::Dnd)
        } else if has(&["away", "vacation", "sleeping", "steering"]) {
            Some(Show::Away)
        } else {
            None
        };
        DeviceState {
            available,
            show,
            status: self.note.clone(),
        }
    }

    /// Whether RPID says the person is on the phone (RFC 4480 §3.2
    /// `on-the-phone`): the publication is line (phone) presence.
    pub fn on_the_phone(&self) -> bool {
        self.activities.contains("on-the-phone")
    }
}

fn local(name: &[u8]) -> &[u8] {
    match name.iter().rposition(|b| *b == b':') {
        Some(i) => &name[i + 1..],
        None => name,
    }
}

fn reference(name: &str) -> Result<char, PidfError> {
    let c = match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        _ => {
            let code = if let Some(hex) = name.strip_prefix("#x") {
                u32::from_str_radix(hex, 16).ok()
            } else if let Some(dec) = name.strip_prefix('#') {
                dec.parse().ok()
            } else {
                return Err(PidfError::Restricted);
            };
            return code
                .and_then(char::from_u32)
                .ok_or_else(|| PidfError::Malformed("bad character reference".into()));
        }
    };
    Ok(c)
}

/// Parses a PIDF document.
pub fn parse(body: &[u8]) -> Result<Pidf, PidfError> {
    let text = std::str::from_utf8(body).map_err(|_| PidfError::Malformed("not utf-8".into()))?;
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let mut elements = 0usize;
    let mut pidf = Pidf::default();
    let mut root_seen = false;
    let mut current_text = String::new();
    let (mut person_note, mut other_note): (Option<String>, Option<String>) = (None, None);
    loop {
        let event = reader
            .read_event()
            .map_err(|e| PidfError::Malformed(e.to_string()))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let empty = matches!(event, Event::Empty(_));
                elements += 1;
                if elements > MAX_ELEMENTS {
                    return Err(PidfError::Limit("element count"));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(PidfError::Limit("depth"));
                }
                let name = local(e.name().as_ref()).to_vec();
                if stack.is_empty() {
                    if root_seen || name != b"presence" {
                        return Err(PidfError::NotPidf);
                    }
                    root_seen = true;
                }
                let in_activities = stack.last().is_some_and(|p| p == b"activities");
                if in_activities {
                    let activity = String::from_utf8_lossy(&name).into_owned();
                    if pidf.activities.len() < 32 && activity.len() <= 64 {
                        pidf.activities.insert(activity);
                    }
                }
                for attr in e.attributes() {
                    let attr = attr.map_err(|e| PidfError::Malformed(e.to_string()))?;
                    let key = local(attr.key.as_ref());
                    let value = attr.unescape_value().map_err(|_| PidfError::Restricted)?;
                    if name == b"presence" && key == b"entity" && stack.is_empty() {
                        pidf.entity = value.chars().take(MAX_TEXT).collect();
                    } else if name == b"tuple" && key == b"id" {
                        if pidf.tuples.len() >= 64 {
                            return Err(PidfError::Limit("tuple count"));
                        }
                        pidf.tuples.push(Tuple {
                            id: value.chars().take(128).collect(),
                            ..Tuple::default()
                        });
                    }
                }
                current_text.clear();
                if !empty {
                    stack.push(name);
                }
            }
            Event::End(_) => {
                let name = stack.pop().unwrap_or_default();
                let text = current_text.trim().to_owned();
                let in_tuple = stack.iter().any(|n| n == b"tuple");
                let in_person = stack.iter().any(|n| n == b"person");
                match name.as_slice() {
                    b"basic" if in_tuple => {
                        if let Some(t) = pidf.tuples.last_mut() {
                            t.basic = match text.as_str() {
                                "open" => Some(true),
                                "closed" => Some(false),
                                _ => None,
                            };
                        }
                    }
                    b"contact" if in_tuple => {
                        if let Some(t) = pidf.tuples.last_mut() {
                            t.contact = Some(text);
                        }
                    }
                    b"note" if !text.is_empty() => {
                        let slot = if in_person {
                            &mut person_note
                        } else {
                            &mut other_note
                        };
                        if slot.is_none() {
                            *slot = Some(text);
                        }
                    }
                    _ => {}
                }
                current_text.clear();
            }
            Event::Text(t) => {
                let raw = std::str::from_utf8(&t)
                    .map_err(|_| PidfError::Malformed("not utf-8".into()))?;
                if current_text.len() + raw.len() > MAX_TEXT {
                    return Err(PidfError::Limit("text"));
                }
                current_text.push_str(raw);
            }
            Event::CData(t) => {
                let raw = std::str::from_utf8(&t)
                    .map_err(|_| PidfError::Malformed("not utf-8".into()))?;
                if current_text.len() + raw.len() > MAX_TEXT {
                    return Err(PidfError::Limit("text"));
                }
                current_text.push_str(raw);
            }
            Event::GeneralRef(r) => {
                let name = std::str::from_utf8(&r)
                    .map_err(|_| PidfError::Malformed("not utf-8".into()))?;
                if current_text.len() >= MAX_TEXT {
                    return Err(PidfError::Limit("text"));
                }
                current_text.push(reference(name)?);
            }
            Event::DocType(_) => return Err(PidfError::Restricted),
            Event::Decl(_) | Event::Comment(_) | Event::PI(_) => {}
            Event::Eof => break,
        }
    }
    if !root_seen {
        return Err(PidfError::NotPidf);
    }
    if !stack.is_empty() {
        return Err(PidfError::Malformed("unclosed element".into()));
    }
    pidf.note = person_note.or(other_note);
    Ok(pidf)
}

/// Escapes text for XML content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {}
            c => out.push(c),
        }
    }
    out
}

/// A PIDF document for `entity` (a `sip:` URI) showing composed presence
/// (RFC 3863 §4, RFC 4480 activities, RFC 8048 §7.1 mapping); None means
/// nothing is known: closed.
pub fn render(entity: &str, presence: Option<&ComposedPresence>) -> String {
    let (open, activity) = match presence.map(|p| (&p.availability, &p.show)) {
        None | Some((Availability::Unavailable, _)) => (false, None),
        Some((Availability::OnCall, _)) => (true, Some("on-the-phone")),
        Some((Availability::InMeeting, _)) => (true, Some("meeting")),
        Some((Availability::Dnd, _)) | Some((_, Some(Show::Dnd))) => (true, Some("busy")),
        Some((Availability::Away, _)) | Some((_, Some(Show::Away | Show::Xa))) => {
            (true, Some("away"))
        }
        Some(_) => (true, None),
    };
    let mut out = String::with_capacity(512);
    out.push_str(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<presence xmlns=\"urn:ietf:params:xml:ns:pidf\" \
         xmlns:dm=\"urn:ietf:params:xml:ns:pidf:data-model\" \
         xmlns:rpid=\"urn:ietf:params:xml:ns:pidf:rpid\" entity=\"",
    );
    out.push_str(&escape(entity));
    out.push_str("\">\n<tuple id=\"switchboard\"><status><basic>");
    out.push_str(if open { "open" } else { "closed" });
    out.push_str("</basic></status></tuple>\n");
    let note = presence.and_then(|p| p.status.as_deref());
    if activity.is_some() || note.is_some() {
        out.push_str("<dm:person id=\"p\">");
        if let Some(a) = activity {
            out.push_str(&format!("<rpid:activities><rpid:{a}/></rpid:activities>"));
        }
        if let Some(n) = note {
            out.push_str(&format!("<dm:note>{}</dm:note>", escape(n)));
        }
        out.push_str("</dm:person>\n");
    }
    out.push_str("</presence>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_schemas::BareJid;

    const AWAY: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<presence xmlns="urn:ietf:params:xml:ns:pidf"
    xmlns:dm="urn:ietf:params:xml:ns:pidf:data-model"
    xmlns:rpid="urn:ietf:params:xml:ns:pidf:rpid"
    entity="pres:alice@example.com">
  <tuple id="t1"><status><basic>open</basic></status><contact>sip:alice@10.0.0.1</contact>
    <note>tuple note</note></tuple>
  <dm:person id="p1">
    <rpid:activities><rpid:away/></rpid:activities>
    <dm:note>Out to lunch &amp; back at 2</dm:note>
  </dm:person>
</presence>"#;

    #[test]
    fn reads_pidf_with_rpid() {
        let p = parse(AWAY.as_bytes()).unwrap();
        assert_eq!(p.entity, "pres:alice@example.com");
        assert_eq!(p.tuples.len(), 1);
        assert_eq!(p.tuples[0].contact.as_deref(), Some("sip:alice@10.0.0.1"));
        let d = p.device_state();
        assert!(d.available);
        assert_eq!(d.show, Some(Show::Away));
        assert_eq!(d.status.as_deref(), Some("Out to lunch & back at 2"));
        assert!(!p.on_the_phone());
        let busy = AWAY.replace("rpid:away", "rpid:busy");
        assert_eq!(
            parse(busy.as_bytes()).unwrap().device_state().show,
            Some(Show::Dnd)
        );
        let closed = AWAY.replace(">open<", ">closed<");
        let d = parse(closed.as_bytes()).unwrap().device_state();
        assert!(!d.available);
        assert_eq!(d.show, None);
        let phone = AWAY.replace("rpid:away", "rpid:on-the-phone");
        assert!(parse(phone.as_bytes()).unwrap().on_the_phone());
    }

    #[test]
    fn refuses_dtds_entities_and_oversized_documents() {
        let dtd = "<?xml version=\"1.0\"?><!DOCTYPE x [<!ENTITY a \"b\">]><presence entity=\"x\">&a;</presence>";
        assert_eq!(parse(dtd.as_bytes()), Err(PidfError::Restricted));
        let entity = "<presence entity=\"x\"><note>&xxe;</note></presence>";
        assert_eq!(parse(entity.as_bytes()), Err(PidfError::Restricted));
        let deep = format!(
            "<presence entity=\"x\">{}{}</presence>",
            "<a>".repeat(20),
            "</a>".repeat(20)
        );
        assert_eq!(parse(deep.as_bytes()), Err(PidfError::Limit("depth")));
        let many = format!("<presence entity=\"x\">{}</presence>", "<a/>".repeat(600));
        assert_eq!(
            parse(many.as_bytes()),
            Err(PidfError::Limit("element count"))
        );
        assert_eq!(parse(b"<other/>"), Err(PidfError::NotPidf));
        assert_eq!(parse(b""), Err(PidfError::NotPidf));
        assert!(parse(b"<presence><a></b></presence>").is_err());
        assert!(parse(b"\xff\xfe").is_err());
    }

    #[test]
    fn renders_composed_presence_that_reads_back() {
        let composed = ComposedPresence {
            user: BareJid::new("bob@example.com"),
            availability: Availability::Dnd,
            show: Some(Show::Dnd),
            status: Some("in a <meeting>".into()),
            sources: Default::default(),
        };
        let doc = render("sip:bob@example.com", Some(&composed));
        let back = parse(doc.as_bytes()).unwrap();
        assert_eq!(back.entity, "sip:bob@example.com");
        let d = back.device_state();
        assert!(d.available);
        assert_eq!(d.show, Some(Show::Dnd));
        assert_eq!(d.status.as_deref(), Some("in a <meeting>"));
        let none = parse(render("sip:bob@example.com", None).as_bytes()).unwrap();
        assert!(!none.device_state().available);
    }
}
