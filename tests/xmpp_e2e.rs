//! XMPP client-to-server end to end: `switchboard serve` on a fresh data
//! directory, users made with `switchboard user add`, and a real client
//! library (slixmpp, driven by `tests/e2e/xmpp_client.py` in the venv of
//! `infra/scripts/python-env.sh`) logging in over STARTTLS (RFC 6120 §5) and
//! direct TLS (XEP-0368) with each SASL mechanism, plus the refusals: a wrong
//! password, PLAIN before TLS, malformed XML, an oversized stanza. The server
//! must still serve a fresh login after all of them, and stop on SIGTERM.
//!
//! Every case runs and is reported (with the client's JSON line) before the
//! test fails, so one run shows everything that is missing. On failure the
//! tail of the server's log is printed too.
//!
//! Needs `python3` (3.11+, with venv) and PyPI the first time (the venv is
//! kept in `${SWITCHBOARD_INFRA_DIR:-.infra}/venv`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const DOMAIN: &str = "example.com";
const ALICE: &str = "alice@example.com";
const ALICE_PASSWORD: &str = "correct horse, battery = staple";
const BOB: &str = "bob@example.com";
const BOB_PASSWORD: &str = "bob's own password";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for `child` at most `limit`; kills it past that. Returns
/// (exit code, stdout, stderr); the code is None when it was killed.
fn run_with_limit(mut cmd: Command, limit: Duration) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    // Read both pipes on threads so a chatty child never blocks on them.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (code, out_reader.join().unwrap(), err_reader.join().unwrap())
}

/// The venv's python from `infra/scripts/python-env.sh path`.
fn python() -> PathBuf {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("infra/scripts/python-env.sh"))
        .arg("path")
        .current_dir(repo_root());
    let (code, out, err) = run_with_limit(cmd, Duration::from_secs(600));
    let path = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::trim);
    match (code, path) {
        (Some(0), Some(path)) if Path::new(path).exists() => PathBuf::from(path),
        _ => panic!(
            "infra/scripts/python-env.sh path failed (exit {code:?}); the XMPP end-to-end \
             test needs python3 >= 3.11 with venv and PyPI (or an existing \
             .infra/venv).\nstdout:\n{out}\nstderr:\n{err}"
        ),
    }
}

/// A raw HTTP/1.1 GET; returns the status.
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut stream =
        TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split(' ').nth(1)?.parse().ok()
}

/// `switchboard` with this deployment's environment only.
struct Deployment {
    _dir: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
    http: String,
    c2s: SocketAddr,
    c2s_tls: SocketAddr,
}

impl Deployment {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let log = dir.path().join("server.log");
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            data,
            log,
            http: format!("127.0.0.1:{}", free_port()),
            c2s: addr(free_port()),
            c2s_tls: addr(free_port()),
            _dir: dir,
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        for (k, _) in std::env::vars() {
            if k.starts_with("SWITCHBOARD") {
                cmd.env_remove(k);
            }
        }
        cmd.env("SWITCHBOARD_LOG", "info")
            .env("SWITCHBOARD__DATA_DIR", &self.data)
            .env("SWITCHBOARD__DOMAINS", format!("[\"{DOMAIN}\"]"))
            .env("SWITCHBOARD__HTTP__LISTEN", &self.http)
            .env("SWITCHBOARD__XMPP__C2S_LISTEN", self.c2s.to_string())
            .env(
                "SWITCHBOARD__XMPP__C2S_TLS_LISTEN",
                self.c2s_tls.to_string(),
            );
        cmd
    }

    fn cert(&self) -> PathBuf {
        self.data.join("tls/cert.pem")
    }

    /// The last lines of the server's log, for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(60);
        format!(
            "--- server log ({}), last {} lines ---\n{}",
            self.log.display(),
            lines.len() - start,
            lines[start..].join("\n")
        )
    }
}

/// The running server; killed if the test panics before stopping it.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start_server(dep: &Deployment) -> Server {
    let log = std::fs::File::create(&dep.log).unwrap();
    let child = dep
        .command()
        .arg("serve")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = Server { child };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut ready = false;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!(
                "switchboard serve exited early: {status}\n{}",
                dep.log_tail()
            );
        }
        if !ready {
            ready = http_status(&dep.http, "/readyz") == Some(200);
        }
        if ready
            && [dep.c2s, dep.c2s_tls]
                .iter()
                .all(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).is_ok())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server not ready within 60 s (readyz: {ready}, c2s {} / c2s_tls {} not accepting)\n{}",
            dep.c2s,
            dep.c2s_tls,
            dep.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        dep.cert().exists(),
        "no certificate at {}",
        dep.cert().display()
    );
    server
}

fn add_user(dep: &Deployment, jid: &str, password: &str) {
    let mut child = dep
        .command()
        .args(["user", "add", jid, "--password-stdin"])
        .env("SWITCHBOARD_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "switchboard user add {jid}: {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        dep.log_tail()
    );
}

/// One run of the Python client: its JSON line and exit code.
struct Outcome {
    json: Value,
    code: Option<i32>,
    report: String,
}

impl Outcome {
    fn str(&self, key: &str) -> Option<&str> {
        self.json.get(key).and_then(Value::as_str)
    }
    fn bool(&self, key: &str) -> bool {
        self.json.get(key).and_then(Value::as_bool) == Some(true)
    }
}

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

fn stop(mut server: Server, dep: &Deployment) -> Result<(), String> {
    let pid = server.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    if !status.success() {
        return Err("kill -TERM failed".to_owned());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(exit) = server.child.try_wait().unwrap() {
            return if exit.success() {
                Ok(())
            } else {
                Err(format!(
                    "exit status {exit} after SIGTERM\n{}",
                    dep.log_tail()
                ))
            };
        }
        if Instant::now() > deadline {
            return Err(format!(
                "still running 20 s after SIGTERM\n{}",
                dep.log_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn xmpp_clients_log_in_and_abuse_is_refused() {
    let python = python();
    let dep = Deployment::new();
    let server = start_server(&dep);
    add_user(&dep, ALICE, ALICE_PASSWORD);
    add_user(&dep, BOB, BOB_PASSWORD);

    let mut h = Harness {
        python,
        dep: &dep,
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
    if http_status(&dep.http, "/readyz") != Some(200) {
        h.failures
            .push("/readyz is not 200 after the cases".to_owned());
    }

    let stopped = stop(server, &dep);
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
