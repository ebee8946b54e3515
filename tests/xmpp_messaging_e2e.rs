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
//! Every case runs and is reported (with the client's JSON line) before the
//! test fails; on failure the tail of the server's log is printed too
//! (`SWITCHBOARD_TEST_LOG` sets its filter, default `info`). Progress goes to
//! stderr (`-- --nocapture`). Needs `python3` (3.11+, with venv) and PyPI the
//! first time.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const DOMAIN: &str = "example.com";
const USERS: [(&str, &str); 3] = [
    ("alice@example.com", "alice's password"),
    ("bob@example.com", "bob: another, password"),
    ("carol@example.com", "carol = 3rd password"),
];
const ALICE: usize = 0;
const BOB: usize = 1;
const CAROL: usize = 2;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Runs `cmd` for at most `limit` (killed past it): (exit code, stdout, stderr).
fn run_with_limit(mut cmd: Command, limit: Duration) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pipe = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = pipe(Box::new(child.stdout.take().unwrap()));
    let err = pipe(Box::new(child.stderr.take().unwrap()));
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
    (code, out.join().unwrap(), err.join().unwrap())
}

/// The venv's python from `infra/scripts/python-env.sh path`.
fn python() -> PathBuf {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("infra/scripts/python-env.sh"))
        .arg("path")
        .current_dir(repo_root());
    let (code, out, err) = run_with_limit(cmd, Duration::from_secs(600));
    match (
        code,
        out.lines().rev().map(str::trim).find(|l| !l.is_empty()),
    ) {
        (Some(0), Some(path)) if Path::new(path).exists() => PathBuf::from(path),
        _ => panic!(
            "infra/scripts/python-env.sh path failed (exit {code:?}); this test needs \
             python3 >= 3.11 with venv and PyPI (or an existing .infra/venv).\n\
             stdout:\n{out}\nstderr:\n{err}"
        ),
    }
}

fn readyz(addr: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let request = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut response = String::new();
    stream.write_all(request.as_bytes()).is_ok()
        && stream.read_to_string(&mut response).is_ok()
        && response.split(' ').nth(1) == Some("200")
}

/// One deployment: a data directory, a log file and fixed ports, kept
/// across restarts.
struct Deployment {
    _dir: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
    http: String,
    c2s: SocketAddr,
    c2s_tls: SocketAddr,
}

/// The running server; killed if the test panics before stopping it.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Deployment {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = || SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self {
            data: dir.path().join("data"),
            log: dir.path().join("server.log"),
            http: format!("127.0.0.1:{}", free_port()),
            c2s: addr(),
            c2s_tls: addr(),
            _dir: dir,
        }
    }

    fn command(&self) -> Command {
        // SWITCHBOARD_TEST_LOG: the server's log filter (default info).
        let filter = std::env::var("SWITCHBOARD_TEST_LOG").unwrap_or_else(|_| "info".into());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        for (k, _) in std::env::vars() {
            if k.starts_with("SWITCHBOARD") {
                cmd.env_remove(k);
            }
        }
        cmd.env("SWITCHBOARD_LOG", filter)
            .env("NO_COLOR", "1")
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

    /// The last lines of the server's log (all runs), for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(80);
        format!(
            "--- server log ({}), last {} lines ---\n{}",
            self.log.display(),
            lines.len() - start,
            lines[start..].join("\n")
        )
    }

    /// `switchboard serve`, appending to the log; waits until /readyz is
    /// 200 and both XMPP ports accept.
    fn start(&self) -> Result<Server, String> {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(log, "===== switchboard serve (test: starting) =====").unwrap();
        let child = self
            .command()
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut server = Server(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = server.0.try_wait().unwrap() {
                return Err(format!("switchboard serve exited early: {status}"));
            }
            if readyz(&self.http)
                && [self.c2s, self.c2s_tls]
                    .iter()
                    .all(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).is_ok())
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err("server not ready within 60 s".to_owned());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then a clean exit within 20 s.
    fn stop(&self, mut server: Server) -> Result<(), String> {
        let pid = server.0.id().to_string();
        if !Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
        {
            return Err("kill -TERM failed".to_owned());
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match server.0.try_wait().unwrap() {
                Some(exit) if exit.success() => return Ok(()),
                Some(exit) => return Err(format!("exit status {exit} after SIGTERM")),
                None if Instant::now() > deadline => {
                    return Err("still running 20 s after SIGTERM".to_owned());
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn add_user(&self, jid: &str, password: &str) {
        let mut child = self
            .command()
            .args(["user", "add", jid, "--password-stdin"])
            .env("SWITCHBOARD_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(format!("{password}\n").as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "switchboard user add {jid}: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
    }
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
        let port = self.dep.c2s.port().to_string();
        let cert = self.dep.cert();
        let mut cmd = Command::new(&self.python);
        cmd.arg("-u")
            .arg(repo_root().join("tests/e2e/xmpp_messaging.py"))
            .args(["--timeout", &timeout.to_string(), command])
            .args(["--host", "127.0.0.1", "--port", &port])
            .arg("--cafile")
            .arg(&cert)
            .args(args)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env_remove("PYTHONPATH")
            .env_remove("PYTHONHOME");
        let (code, out, err) = run_with_limit(cmd, Duration::from_secs(timeout + 20));
        let line = out
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        let err_lines: Vec<&str> = err.lines().collect();
        let err_tail = err_lines[err_lines.len().saturating_sub(15)..].join("\n");
        Outcome {
            json: serde_json::from_str(line).unwrap_or(Value::Null),
            code,
            report: format!(
                "client {command} {args:?}\n  exit: {code:?}\n  json: {line}\n  stderr (tail):\n{err_tail}"
            ),
        }
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
        match self.server.as_mut().map(|s| s.0.try_wait()) {
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
    let python = python();
    let dep = Deployment::new();
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
        dep: &dep,
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
