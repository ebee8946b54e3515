//! The server harness of the SIP end-to-end tests: the XMPP harness's
//! `switchboard serve` deployment with SIP on ports of its own, SIPp
//! (`infra/scripts/sipp.sh`) running the scenarios of `tests/sip/`, and the
//! events read back from the embedded log once the server stopped.

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchboard_schemas::Envelope;

use super::xmpp::{DOMAIN, Deployment, free_port, readyz, repo_root, run_with_limit};

/// The running server; killed if the test panics before stopping it.
pub struct Server(Child);

impl Server {
    /// SIGTERM, then a clean exit within 20 s.
    pub fn stop(mut self) -> Result<(), String> {
        let pid = self.0.id().to_string();
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
            match self.0.try_wait().unwrap() {
                Some(exit) if exit.success() => return Ok(()),
                Some(exit) => return Err(format!("exit status {exit} after SIGTERM")),
                None if Instant::now() > deadline => {
                    return Err("still running 20 s after SIGTERM".to_owned());
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A deployment with SIP on `sip` (UDP and TCP) and `sips` (TLS).
pub struct SipDeployment {
    pub base: Deployment,
    pub sip: SocketAddr,
    pub sips: SocketAddr,
    /// On Kafka (one `serve` process with every role): bootstrap servers
    /// and a topic prefix of its own; else the embedded log.
    pub kafka: Option<(String, String)>,
    /// More `SWITCHBOARD__…` settings for `serve`.
    pub env: Vec<(String, String)>,
}

/// A free UDP and TCP port pair (the same number for both).
fn free_udp_tcp_port() -> u16 {
    loop {
        let port = free_port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Default for SipDeployment {
    fn default() -> Self {
        Self::new()
    }
}

impl SipDeployment {
    pub fn new() -> Self {
        Self {
            base: Deployment::new(),
            sip: SocketAddr::from(([127, 0, 0, 1], free_udp_tcp_port())),
            sips: SocketAddr::from(([127, 0, 0, 1], free_port())),
            kafka: None,
            env: Vec::new(),
        }
    }

    /// The same on the test Kafka (`SWITCHBOARD_TEST_KAFKA`, default
    /// 127.0.0.1:9092, as `infra/scripts/kafka.sh start` runs it).
    pub fn on_kafka() -> Self {
        let unique = uuid::Uuid::now_v7().simple().to_string();
        Self {
            kafka: Some((
                super::kafka_bootstrap(),
                format!("sip{}", &unique[unique.len() - 12..]),
            )),
            ..Self::new()
        }
    }

    fn prefix(&self) -> &str {
        self.kafka
            .as_ref()
            .map_or("switchboard", |(_, p)| p.as_str())
    }

    /// `switchboard` with this deployment's environment.
    pub fn command(&self) -> Command {
        let mut cmd = self.base.command();
        cmd.env("SWITCHBOARD__SIP__UDP_LISTEN", self.sip.to_string())
            .env("SWITCHBOARD__SIP__TCP_LISTEN", self.sip.to_string())
            .env("SWITCHBOARD__SIP__TLS_LISTEN", self.sips.to_string())
            // Small enough that an oversized request fits in one datagram.
            .env("SWITCHBOARD__SIP__MAX_MESSAGE_BYTES", "32768")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        if let Some((bootstrap, prefix)) = &self.kafka {
            cmd.env("SWITCHBOARD__BUS__BACKEND", "kafka")
                .env("SWITCHBOARD__BUS__KAFKA__BOOTSTRAP_SERVERS", bootstrap)
                .env("SWITCHBOARD__BUS__TOPIC_PREFIX", prefix);
        }
        cmd
    }

    /// `switchboard serve`, appending to the log; waits until /readyz is
    /// 200 and the SIP TCP and TLS ports accept.
    pub fn start(&self) -> Result<Server, String> {
        use std::io::Write;
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.base.log)
            .unwrap();
        writeln!(log, "===== switchboard serve (sip test: starting) =====").unwrap();
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
            if readyz(&self.base.http)
                && [self.sip, self.sips]
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

    /// `switchboard user add <jid> --password-stdin`; panics if it fails.
    /// On Kafka the catalogue's topics are created first (`bus topics`):
    /// the deployment's prefix is new.
    pub fn add_user(&self, jid: &str, password: &str) {
        use std::io::Write;
        if self.kafka.is_some() {
            let out = self
                .command()
                .args(["bus", "topics"])
                .env("SWITCHBOARD_LOG", "warn")
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "switchboard bus topics: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
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
            "switchboard user add {jid}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
        );
    }

    /// Every event of a topic (`sessions`, `messages`, ...), once the
    /// server has stopped (the embedded log is locked while it runs).
    pub fn events(&self, topic: &str) -> Vec<Envelope> {
        let data = self.base.data.clone();
        let topic = format!("{}.{topic}", self.prefix());
        let kafka = self.kafka.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            use switchboard_infra::bus::{ConsumerConfig, Polled};
            let mut config = switchboard_infra::config::Config {
                data_dir: data,
                domains: vec![DOMAIN.to_owned()],
                ..Default::default()
            };
            if let Some((bootstrap, prefix)) = kafka {
                config.bus.backend = switchboard_infra::config::Backend::Kafka;
                config.bus.kafka.bootstrap_servers = bootstrap;
                config.bus.topic_prefix = prefix;
            }
            let bus = switchboard_infra::bus::open(&config).await.unwrap();
            let ends = bus.end_offsets(&topic).await.unwrap();
            let mut positions = vec![0i64; ends.len()];
            let mut consumer = bus
                .consumer(ConsumerConfig::new(
                    format!("sip-test-reader-{}", uuid::Uuid::now_v7().simple()),
                    &[&topic],
                ))
                .await
                .unwrap();
            let mut out = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(30);
            while positions.iter().zip(&ends).any(|(p, e)| p < e) && Instant::now() < deadline {
                if let Polled::Records(records) =
                    consumer.poll(Duration::from_millis(200)).await.unwrap()
                {
                    for r in records {
                        positions[r.partition as usize] = r.offset + 1;
                        if let Some(v) = r.value.as_deref() {
                            out.push(Envelope::from_json_slice(v).unwrap());
                        }
                    }
                }
            }
            let _ = consumer.close().await;
            out
        })
    }
}

/// The result of one SIPp run.
pub struct SippRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The message trace (`-trace_msg`).
    pub messages: String,
    /// The error trace (`-trace_err`).
    pub errors: String,
}

impl SippRun {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    pub fn report(&self) -> String {
        let tail = |s: &str| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        format!(
            "sipp exit {:?}\n--- stderr ---\n{}\n--- errors ---\n{}\n--- messages (tail) ---\n{}",
            self.code,
            tail(&self.stderr),
            tail(&self.errors),
            tail(&self.messages)
        )
    }
}

/// The `sipp` binary from `infra/scripts/sipp.sh path` (installs it).
pub fn sipp() -> PathBuf {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("infra/scripts/sipp.sh"))
        .arg("path")
        .current_dir(repo_root());
    let (code, out, err) = run_with_limit(cmd, Duration::from_secs(600));
    match (
        code,
        out.lines().rev().map(str::trim).find(|l| !l.is_empty()),
    ) {
        (Some(0), Some(path)) if std::path::Path::new(path).exists() => PathBuf::from(path),
        _ => panic!("infra/scripts/sipp.sh path failed (exit {code:?})\n{out}\n{err}"),
    }
}

/// Runs a scenario of `tests/sip/` against `target` with extra arguments
/// (`-key`, `-au`, `-ap`, `-m`, `-t` ...).
pub fn run_scenario(target: SocketAddr, scenario: &str, args: &[&str]) -> SippRun {
    run_scenario_at(target, scenario, free_udp_tcp_port(), args)
}

/// A free UDP and TCP port for a SIPp instance others must reach.
pub fn free_sip_port() -> u16 {
    free_udp_tcp_port()
}

/// [`run_scenario`] with SIPp on a given local port.
pub fn run_scenario_at(target: SocketAddr, scenario: &str, port: u16, args: &[&str]) -> SippRun {
    let dir = tempfile::tempdir().unwrap();
    let messages = dir.path().join("messages.log");
    let errors = dir.path().join("errors.log");
    let mut cmd = Command::new(sipp());
    cmd.current_dir(dir.path())
        .arg(target.to_string())
        .arg("-sf")
        .arg(repo_root().join("tests/sip").join(scenario))
        .args(["-i", "127.0.0.1", "-p", &port.to_string()])
        .args(["-nostdin", "-trace_msg", "-trace_err", "-timeout", "30s"])
        .arg("-message_file")
        .arg(&messages)
        .arg("-error_file")
        .arg(&errors)
        .args(["-key", "domain", DOMAIN])
        .args(args);
    let (code, stdout, stderr) = run_with_limit(cmd, Duration::from_secs(60));
    SippRun {
        code,
        stdout,
        stderr,
        messages: std::fs::read_to_string(&messages).unwrap_or_default(),
        errors: std::fs::read_to_string(&errors).unwrap_or_default(),
    }
}
