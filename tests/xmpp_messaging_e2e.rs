//! XMPP message routing end to end: `switchboard serve` (embedded log) on a
//! fresh data directory, users made with `switchboard user add`, and real
//! slixmpp clients (`tests/e2e/xmpp_messaging.py` in the venv of
//! `infra/scripts/python-env.sh`) over STARTTLS with SCRAM-SHA-256:
//!
//! a. alice and bob, both online, exchange chat messages (to the bare JID,
//!    the reply to the full JID; `from` is the sender's full JID);
//! b. a message to carol while she is offline is stored and delivered when
//!    she next sends initial presence, with a XEP-0203 delay from the domain;
//! c. it is delivered once: carol's next login does not get it again;
//! d. after SIGTERM and a restart on the same data directory (state comes
//!    from the log), alice and bob still chat, and a message stored for
//!    carol before the restart is delivered after it (without the one
//!    delivered in b coming back).
//!
//! Run twice: on the embedded default, and as gateway, processors and
//! projections processes on Kafka and PostgreSQL (`Deployment::distributed`).
//!
//! Every case runs and is reported (with the client's JSON line) before the
//! test fails; on failure the tail of the server's log is printed too
//! (`SWITCHBOARD_TEST_LOG` sets its filter, default `info`). Progress goes to
//! stderr (`-- --nocapture`). Needs `python3` (3.11+, with venv) and PyPI the
//! first time.

mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::xmpp::{DOMAIN, Deployment, Outcome, Server, python};

const USERS: [(&str, &str); 3] = [
    ("alice@example.com", "alice's password"),
    ("bob@example.com", "bob: another, password"),
    ("carol@example.com", "carol = 3rd password"),
];
const ALICE: usize = 0;
const BOB: usize = 1;
const CAROL: usize = 2;

impl Outcome {
    /// "error (stage): detail" of a failed run.
    fn why(&self) -> String {
        let mut s = self.str("error").unwrap_or("no JSON outcome").to_owned();
        if let Some(stage) = self.str("stage") {
            s += &format!(" at {stage}");
        }
        if let Some(detail) = self.str("detail") {
            s += &format!(": {detail}");
        }
        s
    }
    /// A login refused with not-authorized (provisioning not seen yet).
    fn refused_login(&self) -> bool {
        self.str("error") == Some("not-authorized")
    }
}

struct Harness<'a> {
    python: PathBuf,
    dep: &'a Deployment,
    failures: Vec<String>,
    passed: Vec<String>,
    started: Instant,
    server: Option<Server>,
}

impl Harness<'_> {
    /// `xmpp_messaging.py --timeout <timeout> <command> <common args> <args>`.
    fn client(&self, command: &str, timeout: u64, args: &[&str]) -> Outcome {
        self.dep
            .client(&self.python, "xmpp_messaging.py", command, timeout, args)
    }

    fn chat(&self, a: usize, b: usize) -> Outcome {
        let (a, a_pw) = USERS[a];
        let (b, b_pw) = USERS[b];
        self.client(
            "chat",
            20,
            &[
                "--a",
                a,
                "--a-password",
                a_pw,
                "--b",
                b,
                "--b-password",
                b_pw,
            ],
        )
    }

    /// `chat`, retried for a while as long as a login is refused: users are
    /// events, and the gateway may not have seen them yet right after a
    /// (re)start.
    fn first_chat(&self, a: usize, b: usize) -> Outcome {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let o = self.chat(a, b);
            if !o.refused_login() || Instant::now() > deadline {
                return o;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn send(&self, from: usize, to: usize, body: &str) -> Outcome {
        let (a, a_pw) = USERS[from];
        let args = [
            "--a",
            a,
            "--a-password",
            a_pw,
            "--to",
            USERS[to].0,
            "--body",
            body,
        ];
        self.client("send", 20, &args)
    }

    fn receive(&self, who: usize, body: &str, timeout: u64, expect_delay: bool) -> Outcome {
        let (b, b_pw) = USERS[who];
        let mut args = vec!["--b", b, "--b-password", b_pw, "--expect-body", body];
        if expect_delay {
            args.push("--expect-delay");
        }
        self.client("receive", timeout, &args)
    }

    /// Records (and prints) a case: `problems` empty means it passed.
    fn check(&mut self, name: &str, outcome: &Outcome, mut problems: Vec<String>) {
        let at = self.started.elapsed().as_secs_f32();
        if problems.is_empty() {
            eprintln!("PASS {name} (at {at:.1} s)");
            self.passed.push(name.to_owned());
            return;
        }
        if let Some(exit) = self.server_exit() {
            problems.push(format!("the server is not running ({exit})"));
        }
        let failure = format!("[{name}] {}\n{}", problems.join("; "), outcome.report);
        eprintln!("FAIL (at {at:.1} s) {failure}\n");
        self.failures.push(failure);
    }

    /// How the server ended, if it did.
    fn server_exit(&mut self) -> Option<String> {
        match self.server.as_mut().map(Server::try_wait) {
            None => Some("not started".to_owned()),
            Some(Ok(Some(status))) => Some(format!("exited: {status}")),
            Some(_) => None,
        }
    }

    /// A failure that is not a client run (stop, restart).
    fn fail(&mut self, name: &str, problem: &str) {
        eprintln!("FAIL [{name}] {problem}\n");
        self.failures.push(format!("[{name}] {problem}"));
    }

    /// SIGTERM (a clean exit wanted), then `switchboard serve` again on the
    /// same data directory. False when the server is not back.
    fn restart(&mut self) -> bool {
        if let Some(server) = self.server.take()
            && let Err(e) = self.dep.stop(server)
        {
            self.fail("SIGTERM before the restart", &e);
        }
        match self.dep.start() {
            Ok(server) => self.server = Some(server),
            Err(e) => self.fail("restart", &e),
        }
        self.server.is_some()
    }

    /// a and d: both directions of a chat between online users.
    fn check_chat(&mut self, name: &str, o: &Outcome, a: usize, b: usize) {
        let (a, b) = (USERS[a].0, USERS[b].0);
        let mut p = Vec::new();
        if o.json.get("a_jid").is_none() {
            p.push(format!("login failed: {}", o.why()));
        } else {
            if !o.bool("a_to_b") {
                p.push(match o.str("from_seen") {
                    None => format!(
                        "{b} did not get {a}'s message to its bare JID ({})",
                        o.why()
                    ),
                    Some(f) => format!("{b} got {a}'s message from {f:?}, not {a}'s full JID"),
                });
            }
            if !o.bool("b_to_a") {
                p.push(match o.str("reply_from_seen") {
                    None => format!("{a} did not get {b}'s reply to its full JID"),
                    Some(f) => format!("{a} got {b}'s reply from {f:?}, not {b}'s full JID"),
                });
            }
            for key in ["a_errors", "b_errors"] {
                if let Some(e) = o.json.get(key) {
                    p.push(format!("the sender got an error: {key} = {e}"));
                }
            }
        }
        if p.is_empty() && (!o.bool("ok") || o.code != Some(0)) {
            p.push(format!("not ok (exit {:?})", o.code));
        }
        self.check(name, o, p);
    }

    /// b and d: a `send` to an offline user, no error for the sender.
    fn check_send(&mut self, name: &str, o: &Outcome) {
        let mut p = Vec::new();
        if !o.bool("ok") || o.code != Some(0) {
            p.push(format!("send failed (exit {:?}): {}", o.code, o.why()));
        }
        self.check(name, o, p);
    }

    /// b and d: the offline message is delivered, from alice, delayed.
    fn check_offline_delivery(&mut self, name: &str, o: &Outcome, not_again: Option<&str>) {
        let mut p = Vec::new();
        if !o.bool("logged_in") {
            p.push(format!("login failed: {}", o.why()));
        } else if !o.bool("received") {
            p.push(format!(
                "the offline message was not delivered ({})",
                o.why()
            ));
        } else {
            let alice = format!("{}/", USERS[ALICE].0);
            if !o.str("from").is_some_and(|f| f.starts_with(&alice)) {
                p.push(format!("from {:?}, not alice's full JID", o.str("from")));
            }
            if !o.bool("delay") {
                p.push("no <delay xmlns='urn:xmpp:delay'/> (XEP-0203)".to_owned());
            } else {
                if o.str("delay_from") != Some(DOMAIN) {
                    p.push(format!(
                        "delay from {:?}, wanted {DOMAIN}",
                        o.str("delay_from")
                    ));
                }
                if o.str("stamp").is_none_or(str::is_empty) {
                    p.push("delay without a stamp".to_owned());
                }
            }
        }
        if let Some(old) = not_again {
            let others = o.json.get("others").and_then(Value::as_array);
            if others.is_some_and(|v| v.iter().any(|b| b.as_str() == Some(old))) {
                p.push(format!("the message delivered before ({old:?}) came again"));
            }
        }
        if p.is_empty() && (!o.bool("ok") || o.code != Some(0)) {
            p.push(format!("not ok (exit {:?}): {}", o.code, o.why()));
        }
        self.check(name, o, p);
    }
}

#[test]
fn xmpp_messages_are_routed_and_offline_messages_delivered() {
    scenario(&Deployment::new());
}

/// The same cases with gateway, processors and projections as separate
/// processes on Kafka and PostgreSQL.
#[test]
fn xmpp_messages_are_routed_on_kafka_and_postgres() {
    scenario(&Deployment::distributed());
}

fn scenario(dep: &Deployment) {
    let python = python();
    let server = dep
        .start()
        .unwrap_or_else(|e| panic!("{e}\n{}", dep.log_tail()));
    assert!(
        dep.cert().exists(),
        "no certificate at {}",
        dep.cert().display()
    );
    for (jid, password) in USERS {
        dep.add_user(jid, password);
    }
    let mut h = Harness {
        python,
        dep,
        failures: Vec::new(),
        passed: Vec::new(),
        started: Instant::now(),
        server: Some(server),
    };
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();

    // a. Both online.
    let o = h.first_chat(ALICE, BOB);
    h.check_chat("a. chat alice <-> bob", &o, ALICE, BOB);

    // b. carol is offline: stored, then delivered with a delay on her login.
    let offline_body = format!("for carol while offline {unique}");
    let o = h.send(ALICE, CAROL, &offline_body);
    h.check_send("b. send alice -> offline carol", &o);
    let o = h.receive(CAROL, &offline_body, 20, true);
    let delivered = o.bool("received");
    h.check_offline_delivery("b. carol gets the offline message, delayed", &o, None);

    // c. ... once (only meaningful when b delivered it).
    let o = h.receive(CAROL, &offline_body, 8, false);
    let p = if !delivered {
        vec!["not checked: the message was not delivered in b".to_owned()]
    } else if !o.bool("logged_in") {
        vec![format!("login failed: {}", o.why())]
    } else if o.bool("ok") {
        vec!["the offline message was delivered a second time".to_owned()]
    } else if o.str("error") != Some("not-received") {
        vec![format!("unexpected outcome: {}", o.why())]
    } else {
        Vec::new()
    };
    h.check("c. carol's next login does not get it again", &o, p);

    // d. Restart on the same data directory: the state comes from the log.
    let before_restart = format!("for carol before the restart {unique}");
    let o = h.send(ALICE, CAROL, &before_restart);
    h.check_send("d. send alice -> offline carol before the restart", &o);
    if h.restart() {
        let o = h.first_chat(ALICE, BOB);
        h.check_chat("d. chat alice <-> bob after the restart", &o, ALICE, BOB);
        let o = h.receive(CAROL, &before_restart, 20, true);
        h.check_offline_delivery(
            "d. carol gets the message stored before the restart, not the old one",
            &o,
            Some(&offline_body),
        );
    }
    if let Some(server) = h.server.take()
        && let Err(e) = dep.stop(server)
    {
        h.fail("final SIGTERM", &e);
    }

    let Harness {
        failures, passed, ..
    } = h;
    if !failures.is_empty() {
        panic!(
            "{} XMPP messaging case(s) failed, {} passed ({})\n\n{}\n\n{}",
            failures.len(),
            passed.len(),
            passed.join(", "),
            failures.join("\n\n"),
            dep.log_tail()
        );
    }
}
