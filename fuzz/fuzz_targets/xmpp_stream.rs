//! Fuzzes the sans-IO XMPP stream parser (RFC 6120 §4, §11):
//! `switchboard_gateway::xmpp::stream::StreamParser`.
//!
//! The first input byte picks the limits and where the rest is split in two;
//! both halves are fed in turn, draining `next()` after each. Checked:
//! - nothing panics;
//! - feeding the same bytes at once gives the same events and error;
//! - every stanza serializes with `to_xml` to XML that parses back to an
//!   equal element, standalone and inside a fresh stream.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_gateway::xmpp::stream::{
    Element, Limits, NS_CLIENT, StreamError, StreamEvent, StreamParser,
};

const HEADER: &str = "<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>";

fn drive(limits: &Limits, chunks: &[&[u8]]) -> (Vec<StreamEvent>, Option<StreamError>) {
    let mut parser = StreamParser::new(limits.clone());
    let mut events = Vec::new();
    for chunk in chunks {
        parser.feed(chunk);
        loop {
            match parser.next() {
                Ok(Some(event)) => events.push(event),
                Ok(None) => break,
                Err(e) => {
                    // Rendering the error must not panic either.
                    let _ = e.to_xml();
                    return (events, Some(e));
                }
            }
        }
    }
    (events, None)
}

fn check_round_trip(stanza: &Element) {
    let unlimited = Limits {
        max_stanza_bytes: usize::MAX,
        max_depth: usize::MAX,
        max_attributes: usize::MAX,
        max_name_bytes: usize::MAX,
        max_header_bytes: usize::MAX,
    };
    let xml = stanza.to_xml();
    match Element::parse(xml.as_bytes(), &unlimited) {
        Ok(again) => assert_eq!(&again, stanza, "standalone round trip of {xml}"),
        Err(e) => panic!("to_xml output {xml:?} does not parse: {e}"),
    }
    let in_stream = format!("{HEADER}{}", stanza.to_xml_in(NS_CLIENT));
    let (events, error) = drive(&unlimited, &[in_stream.as_bytes()]);
    assert_eq!(error, None, "{in_stream}");
    assert_eq!(events.len(), 2, "{in_stream}");
    assert_eq!(
        events[1],
        StreamEvent::Stanza(stanza.clone()),
        "stream round trip of {in_stream}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    // Low bit: small limits (so the fuzzer reaches them) or the defaults.
    let limits = if control & 1 == 1 {
        Limits {
            max_stanza_bytes: 512,
            max_depth: 4,
            max_attributes: 4,
            max_name_bytes: 16,
            max_header_bytes: 256,
        }
    } else {
        Limits::default()
    };
    let at = usize::from(control >> 1) * rest.len() / 127;
    let (first, second) = rest.split_at(at.min(rest.len()));

    let split = drive(&limits, &[first, second]);
    let whole = drive(&limits, &[rest]);
    assert_eq!(split, whole, "split at {at} changed the outcome");

    for event in &split.0 {
        if let StreamEvent::Stanza(stanza) = event {
            check_round_trip(stanza);
        }
    }
});
