//! SIP end to end: `switchboard serve` (embedded log, and Kafka) on a fresh data
//! directory, users made with `switchboard user add`, SIPp (Debian
//! `sip-tester`, via `infra/scripts/sipp.sh`) running `tests/sip/*.xml`, and
//! a raw UDP client where the exact bytes matter:
//!
//! a. digest REGISTER (RFC 3261 §22): 401 challenge, then 200 with the
//!    binding, over UDP and over TCP; a wrong password gets 403; OPTIONS
//!    over TLS (a rustls client checking the server's certificate);
//! b. PUBLISH (RFC 3903): SIP-ETag issued, refreshed and modified with
//!    SIP-If-Match, 412 on an unknown tag, Expires 0 removes;
//! c. SUBSCRIBE to presence (RFC 6665, RFC 3856): 200, the immediate NOTIFY
//!    (active, PIDF), and on Expires 0 the final NOTIFY (terminated); a
//!    watcher gets a NOTIFY when the presentity's composed presence changes
//!    (bob publishes away with a note); bob's `presence.winfo` subscription
//!    (RFC 3857/3858) lists his watchers and is notified of a new one;
//! d. MESSAGE (RFC 3428) in: 202;
//! e. MESSAGE between two SIP users through the router: the registered
//!    device receives it (RFC 7572 §5 translation of the delivery), after
//!    the message of d, stored while bob had no device (XEP-0160 offline
//!    storage released when his registration makes him available);
//! f. a MESSAGE retransmitted over UDP (the same bytes, the same branch) is
//!    answered twice from its transaction and stored once;
//! g. malformed requests get 400 (and garbage nothing) while a parallel
//!    SIPp client keeps being served;
//! i. a SIP MESSAGE reaches an XMPP user (slixmpp) with the sender's SIP
//!    device address as `from`;
//! j. an XMPP message (slixmpp) reaches a registered SIP device as a SIP
//!    MESSAGE (RFC 7572 §5);
//! k. pjsua2 (PJSIP's user agent, `tests/e2e/sip_pjsua.py`) over UDP and
//!    TCP with a slixmpp user: digest REGISTER (401 then 200; 403 for a
//!    wrong password), SUBSCRIBE to the XMPP user's presence with a NOTIFY
//!    of its change, a PUBLISH the XMPP user sees, MESSAGE both ways, an
//!    unsubscribe within the dialog and the unregistration;
//! l. a SIP watcher blocked by the XMPP user it watches (XEP-0191): its
//!    subscription ends `terminated;reason=rejected` (RFC 6665 §4.2.2), a
//!    new SUBSCRIBE gets 403, and after the unblock it is active again;
//! h. the log holds what happened: session.login_succeeded and
//!    session.login_failed (protocol sip), session.resource_bound (protocol
//!    sip, with the contact), presence.device from the publication (away, note),
//!    message.submitted once per message.
//!
//! Every case runs and is reported before the test fails; the server's log
//! tail is printed on failure.

mod support;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use support::sip::{SipDeployment, SippRun, run_scenario};

/// A SIPp run that succeeded and whose message trace shows every text
/// (SIPp does not expand keys inside its regexps, so texts are checked
/// here).
fn traced(run: &SippRun, texts: &[&str]) -> Result<(), String> {
    match texts.iter().find(|t| !run.messages.contains(**t)) {
        _ if !run.ok() => Err(run.report()),
        Some(missing) => Err(format!("{missing:?} not in the trace\n{}", run.report())),
        None => Ok(()),
    }
}
use switchboard_gateway::sip::digest;
use switchboard_schemas::Event;
use switchboard_schemas::events::{DigestAlgorithm, Protocol, Show};

const ALICE: (&str, &str) = ("alice@example.com", "alice secret");
const BOB: (&str, &str) = ("bob@example.com", "bob: secret, too");
const CAROL: (&str, &str) = ("carol@example.com", "carol's xmpp password");
const DAVE: (&str, &str) = ("dave@example.com", "dave's sip password");
/// A user and password.
type Account = (&'static str, &'static str);
/// pjsua2 users (SIP) and their XMPP correspondents, one pair per transport.
const PJSUA: [(&str, Account, Account); 2] = [
    (
        "udp",
        ("erin@example.com", "erin's pjsua password"),
        ("frank@example.com", "frank's xmpp password"),
    ),
    (
        "tcp",
        ("grace@example.com", "grace: pjsua over tcp"),
        ("heidi@example.com", "heidi's xmpp password"),
    ),
];

fn local(user: &str) -> &str {
    user.split('@').next().unwrap()
}

/// A raw UDP SIP client.
struct Raw {
    socket: UdpSocket,
    server: SocketAddr,
}

impl Raw {
    fn new(server: SocketAddr) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Self { socket, server }
    }

    fn port(&self) -> u16 {
        self.socket.local_addr().unwrap().port()
    }

    fn send(&self, bytes: &[u8]) {
        self.socket
            .send_to(bytes, self.server)
            .expect("sending a datagram");
    }

    /// The next datagram as text, if one comes within the timeout.
    fn recv(&self) -> Option<String> {
        let mut buf = vec![0u8; 65_536];
        let (n, _) = self.socket.recv_from(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }
}

fn header<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn param<'a>(challenge: &'a str, name: &str) -> Option<&'a str> {
    let start = challenge.find(&format!("{name}=\""))? + name.len() + 2;
    let end = challenge[start..].find('"')? + start;
    Some(&challenge[start..end])
}

/// Case a: OPTIONS over TLS (RFC 3261 §26.2; SIPp in Debian has no TLS),
/// verifying the server's certificate for the domain.
fn options_over_tls(d: &SipDeployment) -> Result<(), String> {
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(d.base.cert()).map_err(|x| e(&x))? {
        roots.add(cert.map_err(|x| e(&x))?).map_err(|x| e(&x))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|x| e(&x))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from("example.com").map_err(|x| e(&x))?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|x| e(&x))?;
    let mut tcp = std::net::TcpStream::connect(d.sips).map_err(|x| e(&x))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let port = 5061;
    let request = format!(
        "OPTIONS sip:example.com SIP/2.0\r\n\
         Via: SIP/2.0/TLS 127.0.0.1:{port};branch=z9hG4bKtls1;rport\r\n\
         From: <sip:probe@example.com>;tag=tls1\r\n\
         To: <sip:example.com>\r\n\
         Call-ID: tls-1@127.0.0.1\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).map_err(|x| e(&x))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tls.read(&mut buf).map_err(|x| e(&x))?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    let answer = String::from_utf8_lossy(&answer);
    if answer.starts_with("SIP/2.0 200")
        && header(&answer, "Allow").is_some_and(|a| a.contains("MESSAGE"))
    {
        Ok(())
    } else {
        Err(format!("expected 200 with Allow, got:\n{answer}"))
    }
}

fn message_request(
    port: u16,
    from: &str,
    to: &str,
    call_id: &str,
    cseq: u32,
    authorization: Option<&str>,
    text: &str,
) -> String {
    format!(
        "MESSAGE sip:{to} SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK{call_id}{cseq};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:{from}>;tag=raw1\r\n\
         To: <sip:{to}>\r\n\
         Call-ID: {call_id}@127.0.0.1\r\n\
         CSeq: {cseq} MESSAGE\r\n\
         {}\
         Content-Type: text/plain;charset=UTF-8\r\n\
         Content-Length: {}\r\n\r\n{text}",
        authorization
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default(),
        text.len()
    )
}

/// Sends a MESSAGE, answers the 401 with SHA-256 digest credentials, and
/// returns the authenticated request (sent once) and its answer.
fn authenticated_message(
    raw: &Raw,
    (user, password): (&str, &str),
    to: &str,
    call_id: &str,
    text: &str,
) -> Result<(String, String), String> {
    raw.send(message_request(raw.port(), user, to, call_id, 1, None, text).as_bytes());
    let challenge = raw.recv().ok_or("no answer to the first MESSAGE")?;
    if !challenge.starts_with("SIP/2.0 401") {
        return Err(format!("expected 401, got:\n{challenge}"));
    }
    let www = challenge
        .lines()
        .filter_map(|l| l.strip_prefix("WWW-Authenticate: "))
        .find(|c| c.contains("algorithm=SHA-256"))
        .ok_or("no SHA-256 challenge")?;
    let nonce = param(www, "nonce").ok_or("no nonce")?;
    let realm = param(www, "realm").ok_or("no realm")?;
    let uri = format!("sip:{to}");
    let creds = digest::Credentials {
        username: local(user).to_owned(),
        realm: realm.to_owned(),
        nonce: nonce.to_owned(),
        uri: uri.clone(),
        response: String::new(),
        algorithm: Some(DigestAlgorithm::Sha256),
        cnonce: Some("c0ffee".to_owned()),
        nc: Some("00000001".to_owned()),
        qop: Some("auth".to_owned()),
    };
    let ha1 = digest::ha1(&DigestAlgorithm::Sha256, local(user), realm, password);
    let response = digest::expected_response(&creds, "MESSAGE", &ha1);
    let authorization = format!(
        "Digest username=\"{}\", realm=\"{realm}\", nonce=\"{nonce}\", uri=\"{uri}\", \
         response=\"{response}\", algorithm=SHA-256, cnonce=\"c0ffee\", nc=00000001, qop=auth",
        local(user)
    );
    let request = message_request(raw.port(), user, to, call_id, 2, Some(&authorization), text);
    raw.send(request.as_bytes());
    let answer = raw.recv().ok_or("no answer to the authenticated MESSAGE")?;
    Ok((request, answer))
}

/// Case f: the same authenticated MESSAGE datagram twice.
fn retransmitted_message(server: SocketAddr, text: &str) -> Result<(), String> {
    let raw = Raw::new(server);
    let (request, first) = authenticated_message(&raw, ALICE, "bob@example.com", "retrans", text)?;
    // The retransmission, after the answer (Completed state).
    raw.send(request.as_bytes());
    let second = raw.recv().ok_or("no answer to the retransmission")?;
    for answer in [&first, &second] {
        if !answer.starts_with("SIP/2.0 202") {
            return Err(format!("expected 202, got:\n{answer}"));
        }
    }
    if header(&first, "To") != header(&second, "To") {
        return Err("the retransmission was answered by a new transaction (other To tag)".into());
    }
    Ok(())
}

/// Case g: malformed requests next to a working SIPp client.
fn malformed_requests(d: &SipDeployment) -> Result<(), String> {
    let sip = d.sip;
    let parallel = std::thread::spawn(move || {
        run_scenario(sip, "options.xml", &["-m", "300", "-r", "100", "-l", "20"])
    });
    let raw = Raw::new(d.sip);
    let port = raw.port();
    let base = |i: usize, extra: &str| {
        format!(
            "OPTIONS sip:example.com SIP/2.0\r\n\
             Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bKbad{i};rport\r\n\
             From: <sip:probe@example.com>;tag=bad{i}\r\n\
             To: <sip:example.com>\r\n\
             Call-ID: bad-{i}@127.0.0.1\r\n\
             CSeq: 1 OPTIONS\r\n\
             {extra}\r\n"
        )
    };
    let cases = [
        base(1, "Content-Length: 12\r\n"), // announces more than it has
        base(2, "Content-Length: x\r\n"),
        base(3, "Broken header line without colon\r\n"),
        base(4, &format!("Subject: {}\r\n", "s".repeat(40_000))), // over the 32 KiB limit
        base(5, &"X-Filler: y\r\n".repeat(200)),                  // too many headers
    ];
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        raw.send(case.as_bytes());
        match raw.recv() {
            Some(answer) if answer.starts_with("SIP/2.0 400") => {}
            Some(answer) => failures.push(format!("case {}: {answer}", i + 1)),
            None => failures.push(format!("case {}: no answer", i + 1)),
        }
    }
    // Garbage cannot be answered: nothing comes back, and nothing breaks.
    raw.send(b"\x00\x01\x02 not sip at all\r\n\r\n");
    raw.socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    if let Some(answer) = raw.recv() {
        failures.push(format!("garbage was answered: {answer}"));
    }
    let run = parallel.join().unwrap();
    if !run.ok() {
        failures.push(format!("the parallel client failed:\n{}", run.report()));
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

#[test]
fn sip_end_to_end_embedded() {
    suite(&SipDeployment::new());
}

/// The same on Kafka (`infra/scripts/kafka.sh start`, or
/// `SWITCHBOARD_TEST_KAFKA`).
#[test]
fn sip_end_to_end_kafka() {
    suite(&SipDeployment::on_kafka());
}

fn suite(d: &SipDeployment) {
    for (user, password) in [ALICE, BOB, CAROL, DAVE] {
        d.add_user(user, password);
    }
    for (_, sip_user, xmpp_user) in PJSUA {
        for (user, password) in [sip_user, xmpp_user] {
            d.add_user(user, password);
        }
    }
    let server = d
        .start()
        .unwrap_or_else(|e| panic!("{e}\n{}", d.base.log_tail()));
    let mut failures: Vec<String> = Vec::new();
    let mut check = |name: &str, result: Result<(), String>| {
        eprintln!(
            "-- {name}: {}",
            if result.is_ok() { "ok" } else { "FAILED" }
        );
        if let Err(e) = result {
            failures.push(format!("{name}: {e}"));
        }
    };
    let sipp = |scenario: &str, args: &[&str]| {
        let run = run_scenario(d.sip, scenario, args);
        if run.ok() { Ok(()) } else { Err(run.report()) }
    };
    let alice = ["-key", "user", "alice", "-au", "alice", "-ap", ALICE.1];

    check(
        "a. register over udp",
        sipp("register.xml", &[&alice[..], &["-m", "1"]].concat()),
    );
    check(
        "a. register over tcp",
        sipp(
            "register.xml",
            &[&alice[..], &["-m", "1", "-t", "t1"]].concat(),
        ),
    );
    check("a. options over tls", options_over_tls(d));
    check(
        "a. register with a wrong password",
        sipp(
            "register_bad.xml",
            &[
                "-key", "user", "alice", "-au", "alice", "-ap", "wrong", "-m", "1",
            ],
        ),
    );
    check(
        "b. publish etag lifecycle",
        sipp("publish.xml", &[&alice[..], &["-m", "1"]].concat()),
    );
    check(
        "c. subscribe with the initial notify",
        sipp(
            "subscribe.xml",
            &[&alice[..], &["-key", "presentity", "bob", "-m", "1"]].concat(),
        ),
    );
    check(
        "c. subscribe over tcp (NOTIFYs on the client's connection)",
        sipp(
            "subscribe.xml",
            &[
                &alice[..],
                &["-key", "presentity", "bob", "-m", "1", "-t", "t1"],
            ]
            .concat(),
        ),
    );
    // c. a change of bob's presence reaches alice's subscription through
    // the presence composer (presence.device → presence_state → NOTIFY).
    let sip = d.sip;
    let watcher = std::thread::spawn(move || {
        run_scenario(
            sip,
            "watch.xml",
            &[
                "-key",
                "user",
                "alice",
                "-au",
                "alice",
                "-ap",
                ALICE.1,
                "-key",
                "presentity",
                "bob",
                "-key",
                "note",
                "gone-fishing",
                "-m",
                "1",
            ],
        )
    });
    std::thread::sleep(Duration::from_secs(1));
    let published = sipp(
        "publish_away.xml",
        &[
            "-key",
            "user",
            "bob",
            "-au",
            "bob",
            "-ap",
            BOB.1,
            "-key",
            "note",
            "gone-fishing",
            "-m",
            "1",
        ],
    );
    let watched = watcher.join().unwrap();
    check(
        "c. notify on a change",
        published.and(traced(&watched, &["gone-fishing"])),
    );
    // c. bob watches his watchers (presence.winfo): alice is one (case c
    // left her subscription active); dave subscribing shows up next.
    let sip = d.sip;
    let winfo = std::thread::spawn(move || {
        run_scenario(
            sip,
            "winfo.xml",
            &[
                "-key",
                "user",
                "bob",
                "-au",
                "bob",
                "-ap",
                BOB.1,
                "-key",
                "first",
                "alice@example.com",
                "-key",
                "second",
                "dave@example.com",
                "-m",
                "1",
            ],
        )
    });
    std::thread::sleep(Duration::from_secs(1));
    let dave_watches = sipp(
        "subscribe_hold.xml",
        &[
            "-key",
            "user",
            "dave",
            "-au",
            "dave",
            "-ap",
            DAVE.1,
            "-key",
            "presentity",
            "bob",
            "-m",
            "1",
        ],
    );
    let winfo = winfo.join().unwrap();
    check(
        "c. watcher info",
        dave_watches.and(traced(
            &winfo,
            &[
                "sip:alice@example.com</watcher>",
                "sip:dave@example.com</watcher>",
            ],
        )),
    );
    check(
        "d. message in",
        sipp(
            "message.xml",
            &[
                &alice[..],
                &["-key", "to", "bob", "-key", "text", "hello-bob", "-m", "1"],
            ]
            .concat(),
        ),
    );
    // e. bob's device listens on one port and registers that contact from
    // another; alice's message reaches it through the router.
    let sip = d.sip;
    let device_port = support::sip::free_sip_port();
    let bob_device = std::thread::spawn(move || {
        support::sip::run_scenario_at(
            sip,
            "receive_message.xml",
            device_port,
            // Two: the message of case d, stored while bob had no device,
            // comes first when his device registers; then alice's new one.
            &["-m", "2"],
        )
    });
    let port = device_port.to_string();
    let registered = sipp(
        "register_contact.xml",
        &[
            "-key",
            "user",
            "bob",
            "-au",
            "bob",
            "-ap",
            BOB.1,
            "-key",
            "contact_port",
            &port,
            "-m",
            "1",
        ],
    );
    let sent = sipp(
        "message.xml",
        &[
            &alice[..],
            &[
                "-key",
                "to",
                "bob",
                "-key",
                "text",
                "routed-to-bob",
                "-m",
                "1",
            ],
        ]
        .concat(),
    );
    let received = bob_device.join().unwrap();
    check(
        "e. message to a registered sip device",
        registered
            .and(sent)
            .and(traced(&received, &["hello-bob", "routed-to-bob"])),
    );
    check(
        "f. udp retransmission",
        retransmitted_message(d.sip, "once-only"),
    );
    check("g. malformed requests", malformed_requests(d));

    // i. SIP → XMPP: carol on slixmpp receives alice's SIP MESSAGE.
    let python = support::xmpp::python();
    let carol = {
        let base = &d.base;
        std::thread::scope(|scope| {
            let receiver = scope.spawn(|| {
                base.client(
                    &python,
                    "xmpp_messaging.py",
                    "receive",
                    20,
                    &[
                        "--b",
                        CAROL.0,
                        "--b-password",
                        CAROL.1,
                        "--expect-body",
                        "sip-to-xmpp",
                    ],
                )
            });
            std::thread::sleep(Duration::from_secs(4));
            let raw = Raw::new(d.sip);
            let sent = authenticated_message(&raw, ALICE, CAROL.0, "toxmpp", "sip-to-xmpp");
            (sent, receiver.join().unwrap())
        })
    };
    check(
        "i. sip message to an xmpp user",
        match carol {
            (Ok((_, answer)), outcome)
                if answer.starts_with("SIP/2.0 202") && outcome.bool("ok") =>
            {
                match outcome.str("from") {
                    Some(from) if from.starts_with("alice@example.com/") => Ok(()),
                    other => Err(format!("from {other:?}\n{}", outcome.report)),
                }
            }
            (sent, outcome) => Err(format!("{sent:?}\n{}", outcome.report)),
        },
    );
    // j. XMPP → SIP: carol on slixmpp sends to dave's registered SIP device.
    let sip = d.sip;
    let device_port = support::sip::free_sip_port();
    let dave_device = std::thread::spawn(move || {
        support::sip::run_scenario_at(sip, "receive_message.xml", device_port, &["-m", "1"])
    });
    let port = device_port.to_string();
    let registered = sipp(
        "register_contact.xml",
        &[
            "-key",
            "user",
            "dave",
            "-au",
            "dave",
            "-ap",
            DAVE.1,
            "-key",
            "contact_port",
            &port,
            "-m",
            "1",
        ],
    );
    let sent = d.base.client(
        &python,
        "xmpp_messaging.py",
        "send",
        20,
        &[
            "--a",
            CAROL.0,
            "--a-password",
            CAROL.1,
            "--to",
            DAVE.0,
            "--body",
            "xmpp-to-sip",
        ],
    );
    let received = dave_device.join().unwrap();
    check(
        "j. xmpp message to a sip device",
        registered
            .and(if sent.bool("ok") {
                Ok(())
            } else {
                Err(sent.report)
            })
            .and(traced(&received, &["xmpp-to-sip"])),
    );
    // k. pjsua2 (PJSIP) as an independent SIP peer next to slixmpp, over
    // UDP and TCP (tests/e2e/sip_pjsua.py): digest REGISTER (401, 200; a
    // wrong password 403), SUBSCRIBE to an XMPP user's presence and a
    // NOTIFY of its change, PUBLISH seen by the XMPP user, MESSAGE both
    // ways, unsubscribe in the dialog and unregister.
    for (transport, (sip_user, sip_password), (xmpp_user, xmpp_password)) in PJSUA {
        let sip = d.sip.to_string();
        let outcome = d.base.client(
            &python,
            "sip_pjsua.py",
            "interwork",
            75,
            &[
                "--sip",
                &sip,
                "--transport",
                transport,
                "--sip-user",
                sip_user,
                "--sip-password",
                sip_password,
                "--xmpp-user",
                xmpp_user,
                "--xmpp-password",
                xmpp_password,
            ],
        );
        check(
            &format!("k. pjsua2 over {transport} with an xmpp user"),
            if outcome.bool("ok") {
                Ok(())
            } else {
                Err(outcome.report)
            },
        );
    }
    // l. SPEC.md §5: a SIP subscription is authorized unless the watcher is
    // blocked; the XMPP user blocking the pjsua2 watcher ends its
    // subscription (terminated;reason=rejected), a new SUBSCRIBE gets 403,
    // and after the unblock it is active again.
    let (_, (sip_user, sip_password), (xmpp_user, xmpp_password)) = PJSUA[0];
    let sip = d.sip.to_string();
    let outcome = d.base.client(
        &python,
        "sip_pjsua.py",
        "blocked",
        60,
        &[
            "--sip",
            &sip,
            "--sip-user",
            sip_user,
            "--sip-password",
            sip_password,
            "--xmpp-user",
            xmpp_user,
            "--xmpp-password",
            xmpp_password,
        ],
    );
    check(
        "l. a blocked sip watcher",
        if outcome.bool("ok") {
            Ok(())
        } else {
            Err(outcome.report)
        },
    );
    check("stopping the server", server.stop());
    let sessions = d.events("sessions");
    let bound: Vec<_> = sessions
        .iter()
        .filter_map(|e| match &e.event {
            Event::SessionResourceBound(b) if b.protocol == Protocol::Sip => Some(b),
            _ => None,
        })
        .collect();
    let mut h = Vec::new();
    if !bound
        .iter()
        .any(|b| b.full_jid.as_str().starts_with("alice@example.com/sip-") && b.contact.is_some())
    {
        h.push(format!(
            "no sip session.resource_bound for alice: {bound:?}"
        ));
    }
    if !sessions.iter().any(|e| {
        matches!(&e.event, Event::SessionLoginFailed(f)
            if f.protocol == Protocol::Sip && f.user.as_str() == ALICE.0)
    }) {
        h.push("no sip session.login_failed for alice's wrong password".to_owned());
    }
    if !sessions.iter().any(|e| {
        matches!(&e.event, Event::SessionLoginSucceeded(f)
            if f.protocol == Protocol::Sip && f.user.as_str() == ALICE.0)
    }) {
        h.push("no sip session.login_succeeded for alice".to_owned());
    }
    let presence = d.events("presence");
    if !presence.iter().any(|e| {
        matches!(&e.event, Event::DevicePresence(p)
            if p.protocol == Protocol::Sip && p.available && p.show == Some(Show::Away)
                && p.status.as_deref() == Some("at lunch"))
    }) {
        h.push("no presence.device away/at lunch from the publication".to_owned());
    }
    let messages = d.events("messages");
    let submitted = |text: &str| {
        messages
            .iter()
            .filter(|e| matches!(&e.event, Event::MessageSubmitted(m) if m.body.as_deref().map(str::trim) == Some(text)))
            .count()
    };
    for (text, expected) in [("hello-bob", 1), ("once-only", 1), ("routed-to-bob", 1)] {
        let n = submitted(text);
        if n != expected {
            h.push(format!(
                "{n} message.submitted with {text:?}, expected {expected}"
            ));
        }
    }
    check(
        "h. events in the log",
        if h.is_empty() {
            Ok(())
        } else {
            Err(h.join("\n"))
        },
    );
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n\n"),
        d.base.log_tail()
    );
}

/// Registrations outlive a restart of `switchboard serve` (RFC 3261 §10.2.1:
/// a binding lasts until its expiry): bob's device registers, the server
/// restarts, and alice's MESSAGE reaches the device without it registering
/// again (the gateway rebuilt the binding from the log).
#[test]
fn sip_registration_survives_a_restart_embedded() {
    registration_survives_a_restart(&SipDeployment::new());
}

/// The same on Kafka.
#[test]
fn sip_registration_survives_a_restart_kafka() {
    registration_survives_a_restart(&SipDeployment::on_kafka());
}

fn registration_survives_a_restart(d: &SipDeployment) {
    for (user, password) in [ALICE, BOB] {
        d.add_user(user, password);
    }
    let fail = |what: &str, detail: String| -> ! {
        panic!("{what}: {detail}\n{}", d.base.log_tail());
    };
    let sipp = |scenario: &str, args: &[&str]| {
        let run = run_scenario(d.sip, scenario, args);
        if run.ok() { Ok(()) } else { Err(run.report()) }
    };
    let server = d.start().unwrap_or_else(|e| fail("first start", e));
    let device_port = support::sip::free_sip_port();
    let port = device_port.to_string();
    if let Err(e) = sipp(
        "register_contact.xml",
        &[
            "-key",
            "user",
            "bob",
            "-au",
            "bob",
            "-ap",
            BOB.1,
            "-key",
            "contact_port",
            &port,
            "-m",
            "1",
        ],
    ) {
        fail("bob's registration", e);
    }
    if let Err(e) = server.stop() {
        fail("first stop", e);
    }
    let server = d.start().unwrap_or_else(|e| fail("second start", e));
    let sip = d.sip;
    let device = std::thread::spawn(move || {
        support::sip::run_scenario_at(sip, "receive_message.xml", device_port, &["-m", "1"])
    });
    std::thread::sleep(Duration::from_millis(500));
    let sent = sipp(
        "message.xml",
        &[
            "-key",
            "user",
            "alice",
            "-au",
            "alice",
            "-ap",
            ALICE.1,
            "-key",
            "to",
            "bob",
            "-key",
            "text",
            "after-the-restart",
            "-m",
            "1",
        ],
    );
    let received = device.join().unwrap();
    let outcome = sent.and(traced(&received, &["after-the-restart"]));
    let stopped = server.stop();
    if let Err(e) = outcome {
        fail("the message after the restart", e);
    }
    if let Err(e) = stopped {
        fail("second stop", e);
    }
    // Two sessions of the same device: the registration, and the binding
    // rebuilt at the second start.
    let bound: Vec<_> = d
        .events("sessions")
        .into_iter()
        .filter_map(|e| match e.event {
            Event::SessionResourceBound(b)
                if b.protocol == Protocol::Sip && b.full_jid.as_str().starts_with("bob@") =>
            {
                Some(b)
            }
            _ => None,
        })
        .collect();
    if bound.len() != 2
        || bound[0].full_jid != bound[1].full_jid
        || bound[0].session_id == bound[1].session_id
    {
        fail("sessions in the log", format!("{bound:?}"));
    }
}

/// A TCP connection to the SIP port, reading with a timeout.
struct Tcp(std::net::TcpStream);

impl Tcp {
    fn open(server: SocketAddr) -> Self {
        let s = std::net::TcpStream::connect(server).expect("connecting");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Self(s)
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.0.write_all(bytes)
    }

    /// Reads until `want` answers (`SIP/2.0 ` start lines) came, or the
    /// server closed the connection (None), or the timeout (what came).
    fn answers(&mut self, want: usize) -> Option<String> {
        use std::io::Read;
        let mut got = Vec::new();
        let mut buf = [0u8; 65_536];
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            if text.matches("SIP/2.0 ").count() >= want {
                return Some(text);
            }
            match self.0.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(_) => return Some(text),
            }
        }
    }

    /// Whether the server closes the connection within `within`.
    fn closed_within(&mut self, within: Duration) -> bool {
        use std::io::Read;
        self.0.set_read_timeout(Some(within)).unwrap();
        let mut buf = [0u8; 1024];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn options_over_tcp(i: usize) -> String {
    format!(
        "OPTIONS sip:example.com SIP/2.0\r\n\
         Via: SIP/2.0/TCP 127.0.0.1:5099;branch=z9hG4bKlim{i};rport\r\n\
         From: <sip:probe@example.com>;tag=lim{i}\r\n\
         To: <sip:example.com>\r\n\
         Call-ID: lim-{i}@127.0.0.1\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// TCP connection limits: a connection that sends nothing for
/// `sip.idle_timeout_secs` is closed, one that sends RFC 5626 §4.4.1 CRLF
/// keepalives is not; past `sip.max_connections` a new connection is closed
/// at once; 100 pipelined requests on a connection allowed 2 at a time are
/// all answered.
#[test]
fn sip_connection_limits() {
    let mut d = SipDeployment::new();
    d.env = [
        ("SWITCHBOARD__SIP__IDLE_TIMEOUT_SECS", "2"),
        ("SWITCHBOARD__SIP__MAX_CONNECTIONS", "3"),
        ("SWITCHBOARD__SIP__MAX_REQUESTS_PER_CONNECTION", "2"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .into();
    let server = d
        .start()
        .unwrap_or_else(|e| panic!("{e}\n{}", d.base.log_tail()));
    let mut failures = Vec::new();
    // The readiness probe's connections may still be counted: let them go.
    std::thread::sleep(Duration::from_millis(300));

    let mut silent = Tcp::open(d.sip);
    let mut chatty = Tcp::open(d.sip);
    let started = std::time::Instant::now();
    let keepalive = std::thread::spawn(move || {
        for _ in 0..5 {
            if chatty.send(b"\r\n\r\n").is_err() {
                return (chatty, false);
            }
            std::thread::sleep(Duration::from_millis(800));
        }
        (chatty, true)
    });
    if !silent.closed_within(Duration::from_secs(8)) {
        failures.push("a silent connection was not closed within 8 s".to_owned());
    } else if started.elapsed() < Duration::from_millis(1500) {
        failures.push(format!(
            "a silent connection was closed after {:?}, before its 2 s",
            started.elapsed()
        ));
    }
    let (mut chatty, kept) = keepalive.join().unwrap();
    // 4 s of keepalives (twice the idle limit): still served.
    match chatty.send(options_over_tcp(0).as_bytes()) {
        Ok(()) if kept => match chatty.answers(1) {
            Some(a) if a.contains("SIP/2.0 200") => {}
            other => failures.push(format!("a kept-alive connection: {other:?}")),
        },
        _ => failures.push("a kept-alive connection was closed".to_owned()),
    }

    // Pipelined requests, two handled at a time: every one is answered.
    let mut busy = Tcp::open(d.sip);
    let burst: String = (1..=100).map(options_over_tcp).collect();
    match busy
        .send(burst.as_bytes())
        .ok()
        .and_then(|()| busy.answers(100))
    {
        Some(a) if a.matches("SIP/2.0 200").count() == 100 => {}
        other => failures.push(format!(
            "100 pipelined requests: {} answered",
            other.map_or(0, |a| a.matches("SIP/2.0 200").count())
        )),
    }
    // chatty and busy are open; a third fits, a fourth is closed at once.
    let mut third = Tcp::open(d.sip);
    let mut fourth = Tcp::open(d.sip);
    if !fourth.closed_within(Duration::from_secs(1)) {
        failures.push("a connection past sip.max_connections was kept".to_owned());
    }
    match third
        .send(options_over_tcp(200).as_bytes())
        .ok()
        .and_then(|()| third.answers(1))
    {
        Some(a) if a.contains("SIP/2.0 200") => {}
        other => failures.push(format!("the third connection: {other:?}")),
    }
    drop((chatty, busy, third));
    if let Err(e) = server.stop() {
        failures.push(e);
    }
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        d.base.log_tail()
    );
}
