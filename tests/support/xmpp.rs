//! The server harness of the XMPP end-to-end tests: a `switchboard serve`
//! deployment on a fresh data directory with its own ports, users made with
//! `switchboard user add`, and the venv python that runs the client scripts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The one domain the deployments serve.
pub const DOMAIN: &str = "example.com";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn free_port() -> u16 {
    // The kernel may hand a port just released out again; a port given to
    // one listener of this test process is not given to another (an HTTP
    // and a SIP listener of one server once got the same).
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// Runs `cmd` for at most `limit` (killed past it): (exit code, stdout,
/// stderr); the code is None when it was killed.
pub fn run_with_limit(mut cmd: Command, limit: Duration) -> (Option<i32>, String, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    // Read both pipes on threads so a chatty child never blocks on them.
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
pub fn python() -> PathBuf {
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
            "infra/scripts/python-env.sh path failed (exit {code:?}); the XMPP end-to-end \
             tests need python3 >= 3.11 with venv and PyPI (or an existing .infra/venv).\n\
             stdout:\n{out}\nstderr:\n{err}"
        ),
    }
}

/// A raw HTTP/1.1 GET; returns the status.
pub fn http_status(addr: &str, path: &str) -> Option<u16> {
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

/// Whether `/readyz` at `addr` answers 200.
pub fn readyz(addr: &str) -> bool {
    http_status(addr, "/readyz") == Some(200)
}

/// One deployment: a data directory, a log file and fixed ports, kept
/// across restarts. Either the embedded default (one process) or
/// [`Deployment::distributed`]: gateway, processors and projections as
/// separate processes on Kafka and PostgreSQL.
pub struct Deployment {
    _dir: tempfile::TempDir,
    pub data: PathBuf,
    pub log: PathBuf,
    pub http: String,
    pub c2s: SocketAddr,
    pub c2s_tls: SocketAddr,
    /// Set for the Kafka + PostgreSQL topology.
    pub distributed: Option<Distributed>,
}

/// The shared services and the non-gateway processes of a distributed
/// deployment.
pub struct Distributed {
    /// Kafka bootstrap servers.
    pub kafka: String,
    /// The deployment's topic prefix (unique per test).
    pub prefix: String,
    /// The projections' PostgreSQL url (a schema of its own per test).
    pub database_url: String,
    /// (role, data directory, HTTP address) of the other processes.
    others: Vec<(&'static str, PathBuf, String)>,
}

/// The running processes; killed if the test panics before stopping them.
pub struct Server(Vec<Child>);

impl Server {
    /// How the first process that ended did, if one did.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        for child in &mut self.0 {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
        }
        Ok(None)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for child in &mut self.0 {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Default for Deployment {
    fn default() -> Self {
        Self::new()
    }
}

impl Deployment {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr = || SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self {
            data: dir.path().join("data"),
            log: dir.path().join("server.log"),
            http: format!("127.0.0.1:{}", free_port()),
            c2s: addr(),
            c2s_tls: addr(),
            _dir: dir,
            distributed: None,
        }
    }

    /// Gateway, processors and projections as three `switchboard serve
    /// --role` processes on the test Kafka (`SWITCHBOARD_TEST_KAFKA`, default
    /// 127.0.0.1:9092) and PostgreSQL (`SWITCHBOARD_TEST_POSTGRES`, default
    /// the `switchboard_test` database of `infra/scripts/postgres.sh`), with a
    /// topic prefix and a database schema of their own.
    pub fn distributed() -> Self {
        let mut dep = Self::new();
        let unique = uuid::Uuid::now_v7().simple().to_string();
        let (_, database_url) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(switchboard_projections::testing::postgres_schema("e2e"));
        let root = dep.data.parent().unwrap().to_owned();
        dep.distributed = Some(Distributed {
            kafka: std::env::var("SWITCHBOARD_TEST_KAFKA")
                .unwrap_or_else(|_| "127.0.0.1:9092".to_owned()),
            prefix: format!("e2e{}", &unique[unique.len() - 12..]),
            database_url,
            others: ["processors", "projections"]
                .into_iter()
                .map(|role| {
                    (
                        role,
                        root.join(format!("data-{role}")),
                        format!("127.0.0.1:{}", free_port()),
                    )
                })
                .collect(),
        });
        dep
    }

    /// `switchboard` with this deployment's environment only (the gateway
    /// node's, for a distributed deployment).
    pub fn command(&self) -> Command {
        self.command_for("gateway", &self.data, &self.http)
    }

    fn command_for(&self, role: &str, data: &Path, http: &str) -> Command {
        // SWITCHBOARD_TEST_LOG: the server's log filter (default info).
        let filter = std::env::var("SWITCHBOARD_TEST_LOG").unwrap_or_else(|_| "info".into());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        for (k, _) in std::env::vars() {
            if k.starts_with("SWITCHBOARD") {
                cmd.env_remove(k);
            }
        }
        let (c2s, c2s_tls) = if role == "gateway" {
            (self.c2s.to_string(), self.c2s_tls.to_string())
        } else {
            ("127.0.0.1:0".to_owned(), "127.0.0.1:0".to_owned())
        };
        cmd.env("SWITCHBOARD_LOG", filter)
            .env("NO_COLOR", "1")
            .env("SWITCHBOARD__DATA_DIR", data)
            .env("SWITCHBOARD__DOMAINS", format!("[\"{DOMAIN}\"]"))
            .env("SWITCHBOARD__HTTP__LISTEN", http)
            .env("SWITCHBOARD__XMPP__C2S_LISTEN", c2s)
            .env("SWITCHBOARD__XMPP__C2S_TLS_LISTEN", c2s_tls)
            .env("SWITCHBOARD__SIP__UDP_LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD__SIP__TCP_LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD__SIP__TLS_LISTEN", "127.0.0.1:0");
        if let Some(d) = &self.distributed {
            cmd.env("SWITCHBOARD__NODE_ID", role)
                .env("SWITCHBOARD__BUS__BACKEND", "kafka")
                .env("SWITCHBOARD__BUS__KAFKA__BOOTSTRAP_SERVERS", &d.kafka)
                .env("SWITCHBOARD__BUS__TOPIC_PREFIX", &d.prefix)
                .env("SWITCHBOARD__DATABASE__URL", &d.database_url);
        }
        cmd
    }

    pub fn cert(&self) -> PathBuf {
        self.data.join("tls/cert.pem")
    }

    /// The last lines of the server's log (all runs), for failure messages.
    pub fn log_tail(&self) -> String {
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

    /// `switchboard serve` (one process per role when distributed, all
    /// appending to the log); waits until every /readyz is 200 and both XMPP
    /// ports accept.
    pub fn start(&self) -> Result<Server, String> {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        writeln!(log, "===== switchboard serve (test: starting) =====").unwrap();
        let mut processes = vec![(self.command(), self.http.clone())];
        if let Some(d) = &self.distributed {
            processes[0].0.args(["serve", "--role", "gateway"]);
            for (role, data, http) in &d.others {
                let mut cmd = self.command_for(role, data, http);
                cmd.args(["serve", "--role", role]);
                processes.push((cmd, http.clone()));
            }
        } else {
            processes[0].0.arg("serve");
        }
        let mut https = Vec::new();
        let mut children = Vec::new();
        for (mut cmd, http) in processes {
            children.push(
                cmd.stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log.try_clone().unwrap())
                    .spawn()
                    .unwrap(),
            );
            https.push(http);
        }
        let mut server = Server(children);
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut ready = vec![false; https.len()];
        loop {
            if let Some(status) = server.try_wait().unwrap() {
                return Err(format!("switchboard serve exited early: {status}"));
            }
            for (r, http) in ready.iter_mut().zip(&https) {
                if !*r {
                    *r = readyz(http);
                }
            }
            let all_ready = ready.iter().all(|r| *r);
            if all_ready
                && [self.c2s, self.c2s_tls]
                    .iter()
                    .all(|a| TcpStream::connect_timeout(a, Duration::from_secs(1)).is_ok())
            {
                return Ok(server);
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "server not ready within 90 s (readyz per process: {ready:?}, c2s {} / \
                     c2s_tls {} not accepting)",
                    self.c2s, self.c2s_tls
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM to every process, then a clean exit within 20 s.
    pub fn stop(&self, mut server: Server) -> Result<(), String> {
        for child in &server.0 {
            let pid = child.id().to_string();
            if !Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
            {
                return Err(format!("kill -TERM {pid} failed"));
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        for child in &mut server.0 {
            loop {
                match child.try_wait().unwrap() {
                    Some(exit) if exit.success() => break,
                    Some(exit) => return Err(format!("exit status {exit} after SIGTERM")),
                    None if Instant::now() > deadline => {
                        return Err("still running 20 s after SIGTERM".to_owned());
                    }
                    None => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        Ok(())
    }

    /// `switchboard user add <jid> --password-stdin`; panics if it fails.
    pub fn add_user(&self, jid: &str, password: &str) {
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

/// One run of a Python client: its last JSON line and exit code.
pub struct Outcome {
    /// The JSON line (Null when there was none).
    pub json: serde_json::Value,
    /// The exit code.
    pub code: Option<i32>,
    /// What to print when a case fails.
    pub report: String,
}

impl Outcome {
    /// A string field of the JSON line.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.json.get(key).and_then(serde_json::Value::as_str)
    }

    /// Whether a field of the JSON line is `true`.
    pub fn bool(&self, key: &str) -> bool {
        self.json.get(key).and_then(serde_json::Value::as_bool) == Some(true)
    }
}

impl Deployment {
    /// Runs `tests/e2e/<script> --timeout <timeout> <command> --host
    /// 127.0.0.1 --port <c2s> --cafile <cert> <args>` with the venv python
    /// and returns its last JSON line.
    pub fn client(
        &self,
        python: &Path,
        script: &str,
        command: &str,
        timeout: u64,
        args: &[&str],
    ) -> Outcome {
        let mut cmd = Command::new(python);
        cmd.arg("-u")
            .arg(repo_root().join("tests/e2e").join(script))
            .args(["--timeout", &timeout.to_string(), command])
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &self.c2s.port().to_string(),
            ])
            .arg("--cafile")
            .arg(self.cert())
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
            json: serde_json::from_str(line).unwrap_or(serde_json::Value::Null),
            code,
            report: format!(
                "client {script} {command} {args:?}\n  exit: {code:?}\n  json: {line}\n  stderr (tail):\n{err_tail}"
            ),
        }
    }
}
