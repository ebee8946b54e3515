//! XMPP client-to-server end to end: `switchboard serve` on a fresh data
//! directory, users made with `switchboard user add`, and a real client
//! library (slixmpp, driven by `tests/e2e/xmpp_client.py` in the venv of
//! `infra/scripts/python-env.sh`) logging in over STARTTLS (RFC 6120 §5) and
//! direct TLS (XEP-0368) with each SASL mechanism, plus the refusals: a wrong
//! password, PLAIN before TLS, malformed XML, an oversized stanza. The server
//! must still serve a fresh login after all of them, and stop on SIGTERM.
//!
//! Run twice: on the embedded default, and as gateway, processors and
//! projections processes on Kafka and PostgreSQL (`Deployment::distributed`).
//!
//! Every case runs and is reported (with the client's JSON line) before the
//! test fails, so one run shows everything that is missing. On failure the
//! tail of the server's log is printed too.
//!
//! Needs `python3` (3.11+, with venv) and PyPI the first time (the venv is
//! kept in `${SWITCHBOARD_INFRA_DIR:-.infra}/venv`).

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::xmpp::{DOMAIN, Deployment, Outcome, python, readyz, repo_root, run_with_limit};

const ALICE: &str = "alice@example.com";
const ALICE_PASSWORD: &str = "correct horse, battery = staple";
const BOB: &str = "bob@example.com";
const BOB_PASSWORD: &str = "bob's own password";

struct Harness<'a> {
    python: PathBuf,
    dep: &'a Deployment,
    failures: Vec<String>,
    passed: Vec<String>,
}

impl Harness<'_> {
    fn client(&self, args: &[&str]) -> Outcome {
        let script = repo_root().join("tests/e2e/xmpp_client.py");
        let mut cmd = Command::new(&self.python);
        cmd.arg("-u")
            .arg(&script)
            .args(["--timeout", "20"])
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME");
        let (code, out, err) = run_with_limit(cmd, Duration::from_secs(40));
        let line = out
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let json = serde_json::from_str(line).unwrap_or(Value::Null);
        let err_tail: String = {
            let lines: Vec<&str> = err.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        let report = format!(
            "client {args:?}\n  exit: {code:?}\n  json: {line}\n  stderr (tail):\n{err_tail}"
        );
        Outcome { json, code, report }
    }

    /// `login` with `mechanism` over `mode` as `jid`.
    fn login(
        &self,
        jid: &str,
        password: &str,
        mode: &str,
        mechanism: &str,
        extra: &[&str],
    ) -> Outcome {
        let port = match mode {
            "directtls" => self.dep.c2s_tls.port(),
            _ => self.dep.c2s.port(),
        }
        .to_string();
        let cert = self.dep.cert();
        let mut args = vec![
            "login",
            "--jid",
            jid,
            "--password",
            password,
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--mode",
            mode,
            "--mechanism",
            mechanism,
            "--cafile",
            cert.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.client(&args)
    }

    /// Records a case: `problems` empty means it passed.
    fn check(&mut self, name: &str, outcome: &Outcome, problems: &[String]) {
        if problems.is_empty() {
            self.passed.push(name.to_owned());
        } else {
            self.failures.push(format!(
                "[{name}] {}\n{}",
                problems.join("; "),
                outcome.report
            ));
        }
    }

    /// A successful login of `jid` with exactly `mechanism`.
    fn expect_login(&mut self, name: &str, jid: &str, password: &str, mode: &str, mechanism: &str) {
        let outcome = self.login(jid, password, mode, mechanism, &[]);
        let problems = login_problems(&outcome, jid, mechanism);
        self.check(name, &outcome, &problems);
    }
}

fn login_problems(o: &Outcome, jid: &str, mechanism: &str) -> Vec<String> {
    let mut p = Vec::new();
    if !o.bool("ok") {
        p.push(format!(
            "login failed: {} (stage {})",
            o.str("error").unwrap_or("?"),
            o.str("stage").unwrap_or("?")
        ));
        return p;
    }
    if o.code != Some(0) {
        p.push(format!("exit code {:?}", o.code));
    }
    if o.str("mechanism") != Some(mechanism) {
        p.push(format!(
            "mechanism {:?}, wanted {mechanism}",
            o.str("mechanism")
        ));
    }
    match o.str("jid").and_then(|j| j.split_once('/')) {
        Some((bare, resource)) if bare == jid && !resource.is_empty() => {}
        other => p.push(format!("bound JID {other:?} is not {jid}/<resource>")),
    }
    if o.str("tls") != Some("TLSv1.3") {
        p.push(format!("TLS {:?}, wanted TLSv1.3", o.str("tls")));
    }
    if mechanism.ends_with("-PLUS") && o.str("gs2_header") != Some("p=tls-exporter,,") {
        p.push(format!(
            "channel binding {:?}, wanted p=tls-exporter",
            o.str("gs2_header")
        ));
    }
    // RFC 6120 §8.2.3: an IQ get is always answered (a result or an error).
    if !o
        .str("ping")
        .is_some_and(|s| s == "result" || s.starts_with("error"))
    {
        p.push(format!(
            "IQ to the server not answered: {:?}",
            o.str("ping")
        ));
    }
    p
}

#[test]
fn xmpp_clients_log_in_and_abuse_is_refused() {
    scenario(&Deployment::new());
}

/// The same cases with gateway, processors and projections as separate
/// processes on Kafka and PostgreSQL.
#[test]
fn xmpp_clients_log_in_and_abuse_is_refused_on_kafka_and_postgres() {
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
    dep.add_user(ALICE, ALICE_PASSWORD);
    dep.add_user(BOB, BOB_PASSWORD);

    let mut h = Harness {
        python,
        dep,
        failures: Vec::new(),
        passed: Vec::new(),
    };

    // The first login may race the user's provisioning reaching the gateway
    // (users are events): retry a refusal for a short while.
    let deadline = Instant::now() + Duration::from_secs(15);
    let first = loop {
        let o = h.login(ALICE, ALICE_PASSWORD, "starttls", "SCRAM-SHA-256", &[]);
        if o.bool("ok") || o.str("error") != Some("not-authorized") || Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let problems = login_problems(&first, ALICE, "SCRAM-SHA-256");
    h.check("starttls SCRAM-SHA-256", &first, &problems);

    h.expect_login(
        "starttls SCRAM-SHA-1",
        ALICE,
        ALICE_PASSWORD,
        "starttls",
        "SCRAM-SHA-1",
    );
    h.expect_login(
        "starttls SCRAM-SHA-256-PLUS",
        ALICE,
        ALICE_PASSWORD,
        "starttls",
        "SCRAM-SHA-256-PLUS",
    );
    h.expect_login(
        "starttls SCRAM-SHA-1-PLUS",
        ALICE,
        ALICE_PASSWORD,
        "starttls",
        "SCRAM-SHA-1-PLUS",
    );
    h.expect_login(
        "direct TLS SCRAM-SHA-256",
        ALICE,
        ALICE_PASSWORD,
        "directtls",
        "SCRAM-SHA-256",
    );
    h.expect_login(
        "direct TLS SCRAM-SHA-256-PLUS (bob)",
        BOB,
        BOB_PASSWORD,
        "directtls",
        "SCRAM-SHA-256-PLUS",
    );
    h.expect_login("starttls PLAIN", ALICE, ALICE_PASSWORD, "starttls", "PLAIN");

    // Wrong password, and an unknown user: a SASL <failure><not-authorized/>.
    for (name, jid, mechanism) in [
        ("wrong password SCRAM-SHA-256", ALICE, "SCRAM-SHA-256"),
        ("wrong password PLAIN", ALICE, "PLAIN"),
        (
            "unknown user SCRAM-SHA-1",
            "nobody@example.com",
            "SCRAM-SHA-1",
        ),
    ] {
        let o = h.login(
            jid,
            "not the password",
            "starttls",
            mechanism,
            &["--expect-fail"],
        );
        let mut p = Vec::new();
        if o.bool("ok") {
            p.push("authenticated with a wrong password".to_owned());
        } else if !o.bool("sasl_failure") || o.str("error") != Some("not-authorized") {
            p.push(format!(
                "wanted a SASL failure not-authorized, got {:?} (stage {:?})",
                o.str("error"),
                o.str("stage")
            ));
        }
        if o.code != Some(0) && p.is_empty() {
            p.push(format!("exit code {:?}", o.code));
        }
        h.check(name, &o, &p);
    }

    // Before TLS: STARTTLS is required, no SASL mechanism is offered, and
    // PLAIN with the right password is refused anyway (RFC 6120 §5.3.1, §13.8).
    let c2s_port = dep.c2s.port().to_string();
    let o = h.client(&[
        "plain-before-tls",
        "--jid",
        ALICE,
        "--password",
        ALICE_PASSWORD,
        "--host",
        "127.0.0.1",
        "--port",
        &c2s_port,
    ]);
    let mut p = Vec::new();
    if !o.bool("starttls") || !o.bool("starttls_required") {
        p.push("<starttls><required/></starttls> not offered".to_owned());
    }
    match o
        .json
        .get("mechanisms_before_tls")
        .and_then(Value::as_array)
    {
        Some(m) if m.is_empty() => {}
        other => p.push(format!("mechanisms offered before TLS: {other:?}")),
    }
    match o.str("plain_auth") {
        Some("failure" | "stream-error" | "closed") => {}
        other => p.push(format!("PLAIN before TLS: {other:?}")),
    }
    if p.is_empty() && (!o.bool("ok") || o.code != Some(0)) {
        p.push(format!("not ok (exit {:?})", o.code));
    }
    h.check("PLAIN before TLS refused", &o, &p);

    // Stream errors end the stream and the connection (RFC 6120 §4.9.1.1).
    let big = (300 * 1024).to_string();
    let cert = dep.cert();
    let cert = cert.to_str().unwrap();
    let raw_base = [
        "raw",
        "--host",
        "127.0.0.1",
        "--port",
        &c2s_port,
        "--domain",
        DOMAIN,
    ];
    let cases: Vec<(&str, &str, Vec<&str>)> = vec![
        (
            "malformed XML -> not-well-formed",
            "not-well-formed",
            vec!["--send", "<message><body>hi</message>"],
        ),
        (
            "oversized stanza before TLS -> policy-violation",
            "policy-violation",
            vec!["--oversized", &big],
        ),
        (
            "oversized stanza after STARTTLS + auth -> policy-violation",
            "policy-violation",
            vec![
                "--tls",
                "starttls",
                "--cafile",
                cert,
                "--jid",
                ALICE,
                "--password",
                ALICE_PASSWORD,
                "--to",
                BOB,
                "--oversized",
                &big,
            ],
        ),
    ];
    for (name, condition, extra) in cases {
        let mut args: Vec<&str> = raw_base.to_vec();
        args.extend(extra);
        args.extend(["--expect-condition", condition]);
        let o = h.client(&args);
        let mut p = Vec::new();
        if o.str("condition") != Some(condition) {
            p.push(format!(
                "stream error {:?}, wanted {condition} (error {:?}, stage {:?})",
                o.str("condition"),
                o.str("error"),
                o.str("stage")
            ));
        }
        if !o.bool("closed") {
            p.push("connection not closed".to_owned());
        }
        if p.is_empty() && o.code != Some(0) {
            p.push(format!("exit code {:?}", o.code));
        }
        h.check(name, &o, &p);
    }

    // The server keeps serving after all of that.
    h.expect_login(
        "fresh login after the refusals",
        ALICE,
        ALICE_PASSWORD,
        "starttls",
        "SCRAM-SHA-256",
    );
    if !readyz(&dep.http) {
        h.failures
            .push("/readyz is not 200 after the cases".to_owned());
    }

    let stopped = dep.stop(server);
    let Harness {
        failures, passed, ..
    } = h;
    let mut failures = failures;
    if let Err(e) = stopped {
        failures.push(format!("[SIGTERM] {e}"));
    }
    if !failures.is_empty() {
        panic!(
            "{} XMPP end-to-end case(s) failed, {} passed ({})\n\n{}\n\n{}",
            failures.len(),
            passed.len(),
            passed.join(", "),
            failures.join("\n\n"),
            dep.log_tail()
        );
    }
}
