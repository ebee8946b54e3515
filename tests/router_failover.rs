//! Router failover on real Kafka (issue 4 "Tests"): one `switchboard serve
//! --role gateway` and two `switchboard serve --role processors` processes,
//! each with its own data directory and node id, on a topic prefix of their
//! own. alice sends 10,000 chat messages to bob over XMPP; once bob has
//! received some, the processor instance that routes alice's messages (the
//! owner of her partition, read from the `deliveries` topic) is killed with
//! SIGKILL. Every message must reach bob exactly once: none lost, none
//! twice.
//!
//! Needs the broker of `infra/scripts/kafka.sh start` (or
//! `SWITCHBOARD_TEST_KAFKA`). The client is a minimal XMPP client in this
//! file (STARTTLS, SASL PLAIN, bind, presence), pinned to the gateway's
//! self-signed certificate.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use support::xmpp::{free_port, readyz};
use switchboard_infra::bus::kafka::KafkaBus;
use switchboard_infra::bus::{Bus, ConsumerConfig, Polled, TopicConfig};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{Envelope, Event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

const DOMAIN: &str = "example.com";
const MESSAGES: usize = 10_000;
const PASSWORD: &str = "failover password";

/// One `switchboard serve` process with its own data directory.
struct Process {
    name: String,
    child: Child,
    data: PathBuf,
    log: PathBuf,
    http: String,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let start = lines.len().saturating_sub(40);
        format!("--- {} log ---\n{}", self.name, lines[start..].join("\n"))
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    prefix: String,
    c2s: SocketAddr,
}

impl Cluster {
    fn command(&self, node: &str) -> (Command, PathBuf, PathBuf, String) {
        let data = self.dir.path().join(node);
        let log = self.dir.path().join(format!("{node}.log"));
        let http = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        for (k, _) in std::env::vars() {
            if k.starts_with("SWITCHBOARD") {
                cmd.env_remove(k);
            }
        }
        let c2s_tls = format!("127.0.0.1:{}", free_port());
        cmd.env("SWITCHBOARD_LOG", "info")
            .env("NO_COLOR", "1")
            .env("SWITCHBOARD__NODE_ID", node)
            .env("SWITCHBOARD__DATA_DIR", &data)
            .env("SWITCHBOARD__DOMAINS", format!("[\"{DOMAIN}\"]"))
            .env("SWITCHBOARD__HTTP__LISTEN", &http)
            .env("SWITCHBOARD__XMPP__C2S_LISTEN", self.c2s.to_string())
            .env("SWITCHBOARD__XMPP__C2S_TLS_LISTEN", c2s_tls)
            .env("SWITCHBOARD__SIP__UDP_LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD__SIP__TCP_LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD__SIP__TLS_LISTEN", "127.0.0.1:0")
            .env("SWITCHBOARD__BUS__BACKEND", "kafka")
            .env(
                "SWITCHBOARD__BUS__KAFKA__BOOTSTRAP_SERVERS",
                support::kafka_bootstrap(),
            )
            .env("SWITCHBOARD__BUS__KAFKA__SESSION_TIMEOUT_MS", "6000")
            .env("SWITCHBOARD__BUS__TOPIC_PREFIX", &self.prefix);
        (cmd, data, log, http)
    }

    fn start(&self, node: &str, role: &str) -> Process {
        let (mut cmd, data, log, http) = self.command(node);
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .args(["serve", "--role", role])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut p = Process {
            name: node.to_owned(),
            child,
            data,
            log,
            http,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !readyz(&p.http) {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("{node} exited early: {status}\n{}", p.tail());
            }
            assert!(Instant::now() < deadline, "{node} not ready\n{}", p.tail());
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    fn add_user(&self, jid: &str) {
        let (mut cmd, _, _, _) = self.command("gw1");
        let mut child = cmd
            .args(["user", "add", jid, "--password-stdin"])
            .env("SWITCHBOARD_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(format!("{PASSWORD}\n").as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "user add {jid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Accepts exactly the pinned certificate, with real signature checks.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the pinned certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn tls_config(cert: &Path) -> Arc<rustls::ClientConfig> {
    let cert = CertificateDer::from_pem_file(cert).expect("gateway certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { cert, provider }))
            .with_no_client_auth(),
    )
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header() -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{DOMAIN}' xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    )
}

struct Conn {
    tls: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    async fn read_until(&mut self, pat: &[u8]) -> std::io::Result<Vec<u8>> {
        loop {
            if let Some(at) = find(&self.buf, pat) {
                let rest = self.buf.split_off(at + pat.len());
                return Ok(std::mem::replace(&mut self.buf, rest));
            }
            let mut chunk = [0u8; 8192];
            let n = self.tls.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// RFC 6120: STARTTLS, SASL PLAIN, bind `resource`, initial presence.
/// Err("auth") when the login is refused (the user not seen yet).
async fn login(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    user: &str,
    resource: &str,
) -> Result<Conn, String> {
    let io = |e: std::io::Error| e.to_string();
    let mut tcp = TcpStream::connect(addr).await.map_err(io)?;
    tcp.set_nodelay(true).map_err(io)?;
    tcp.write_all(header().as_bytes()).await.map_err(io)?;
    let mut seen = Vec::new();
    while find(&seen, b"</stream:features>").is_none() {
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err("closed before features".into());
        }
        seen.extend_from_slice(&chunk[..n]);
    }
    tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await
        .map_err(io)?;
    let mut seen = Vec::new();
    while find(&seen, b"<proceed").is_none() {
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err("closed before proceed".into());
        }
        seen.extend_from_slice(&chunk[..n]);
    }
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from(DOMAIN.to_owned()).unwrap(), tcp)
        .await
        .map_err(io)?;
    let mut c = Conn {
        tls: stream,
        buf: Vec::new(),
    };
    c.tls.write_all(header().as_bytes()).await.map_err(io)?;
    c.read_until(b"</stream:features>").await.map_err(io)?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{PASSWORD}"));
    c.tls
        .write_all(
            format!(
                "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
            )
            .as_bytes(),
        )
        .await
        .map_err(io)?;
    let answer = c.read_until(b"ss").await.map_err(io)?;
    if find(&answer, b"failure").is_some() || find(&answer, b"success").is_none() {
        return Err("auth".into());
    }
    c.read_until(b">").await.map_err(io)?;
    c.tls.write_all(header().as_bytes()).await.map_err(io)?;
    c.read_until(b"</stream:features>").await.map_err(io)?;
    c.tls
        .write_all(
            format!(
                "<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
                 <resource>{resource}</resource></bind></iq>"
            )
            .as_bytes(),
        )
        .await
        .map_err(io)?;
    c.read_until(b"</iq>").await.map_err(io)?;
    c.tls.write_all(b"<presence/>").await.map_err(io)?;
    Ok(c)
}

async fn login_retrying(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    user: &str,
    resource: &str,
) -> Conn {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match login(addr, tls.clone(), user, resource).await {
            Ok(c) => return c,
            Err(e) if Instant::now() < deadline => {
                eprintln!("login {user}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => panic!("login {user}: {e}"),
        }
    }
}

/// The node id of the router that delivered alice's message `m0`.
async fn router_of_first_message(prefix: &str) -> Option<String> {
    let bus = KafkaBus::connect(support::KafkaFixture::config()).ok()?;
    let topic = full_name(prefix, Topic::Deliveries);
    let mut consumer = bus
        .consumer(ConsumerConfig::new(
            format!("{prefix}-probe-{}", uuid::Uuid::now_v7().simple()),
            &[&topic],
        ))
        .await
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut found = None;
    while found.is_none() && Instant::now() < deadline {
        if let Ok(Polled::Records(records)) = consumer.poll(Duration::from_millis(200)).await {
            found = records.iter().find_map(|r| {
                let e = Envelope::from_json_slice(r.value.as_deref()?).ok()?;
                match &e.event {
                    Event::StanzaDelivery(d) if d.message_id.as_deref() == Some("m0") => {
                        Some(e.node.as_str().to_owned())
                    }
                    _ => None,
                }
            });
        }
    }
    let _ = consumer.close().await;
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_router_instance_loses_and_repeats_nothing() {
    let cluster = Cluster {
        dir: tempfile::tempdir().unwrap(),
        prefix: format!("rf{}", &uuid::Uuid::now_v7().simple().to_string()[20..]),
        c2s: SocketAddr::from(([127, 0, 0, 1], free_port())),
    };
    // Topics made (and their leaders elected) before the servers start: a
    // server's first reads right after creating fresh topics can meet
    // NotLeaderForPartition.
    {
        let bus = KafkaBus::connect(support::KafkaFixture::config()).expect("kafka");
        bus.create_topics(&TopicConfig::catalogue(&cluster.prefix))
            .await
            .expect("topics");
        for topic in TopicConfig::catalogue(&cluster.prefix) {
            let deadline = Instant::now() + Duration::from_secs(30);
            while bus.end_offsets(&topic.name).await.is_err() {
                assert!(Instant::now() < deadline, "{} has no leader", topic.name);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let gateway = cluster.start("gw1", "gateway");
    let mut processors: BTreeMap<String, Process> = ["proc1", "proc2"]
        .into_iter()
        .map(|n| (n.to_owned(), cluster.start(n, "processors")))
        .collect();
    cluster.add_user(&format!("alice@{DOMAIN}"));
    cluster.add_user(&format!("bob@{DOMAIN}"));
    let tls = tls_config(&gateway.data.join("tls/cert.pem"));
    let bob = login_retrying(cluster.c2s, tls.clone(), "bob", "phone").await;
    let mut alice = login_retrying(cluster.c2s, tls, "alice", "laptop").await;

    // bob counts every body "n" he receives.
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<usize>();
    let reader = tokio::spawn(async move {
        let mut bob = bob;
        loop {
            let Ok(stanza) = bob.read_until(b"</message>").await else {
                return;
            };
            if let Some(start) = find(&stanza, b"<body>") {
                let rest = &stanza[start + 6..];
                if let Some(end) = find(rest, b"</body>")
                    && let Some(n) = std::str::from_utf8(&rest[..end])
                        .ok()
                        .and_then(|s| s.parse().ok())
                {
                    let _ = got_tx.send(n);
                }
            }
        }
    });

    let started = Instant::now();
    let sender = tokio::spawn(async move {
        for n in 0..MESSAGES {
            let stanza = format!(
                "<message to='bob@{DOMAIN}' type='chat' id='m{n}'><body>{n}</body></message>"
            );
            alice.tls.write_all(stanza.as_bytes()).await.unwrap();
            if n % 100 == 99 {
                alice.tls.flush().await.unwrap();
                // A steady stream, so the kill falls in the middle of it.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        alice.tls.flush().await.unwrap();
        alice
    });

    let mut counts = vec![0u32; MESSAGES];
    let mut received = 0usize;
    let mut killed = None;
    let deadline = Instant::now() + Duration::from_secs(150);
    while received < MESSAGES && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), got_rx.recv()).await {
            Ok(Some(n)) if n < MESSAGES => {
                counts[n] += 1;
                received += usize::from(counts[n] == 1);
            }
            Ok(None) => break,
            _ => {}
        }
        if killed.is_none() && received >= 2_000 {
            let owner = router_of_first_message(&cluster.prefix)
                .await
                .expect("the router of alice's first message");
            let victim = processors.get_mut(&owner).expect("a processor");
            eprintln!(
                "kill -9 {owner} after {received} messages received, at {:.1} s",
                started.elapsed().as_secs_f64()
            );
            victim.child.kill().unwrap();
            victim.child.wait().unwrap();
            killed = Some((owner, received));
        }
    }
    // Late duplicates, if any, would arrive now.
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle {
        if let Ok(Some(n)) = tokio::time::timeout(Duration::from_millis(200), got_rx.recv()).await
            && n < MESSAGES
        {
            counts[n] += 1;
        }
    }
    let _alice = sender.await.unwrap();
    reader.abort();
    let missing: Vec<usize> = (0..MESSAGES).filter(|n| counts[*n] == 0).collect();
    let twice: Vec<usize> = (0..MESSAGES).filter(|n| counts[*n] > 1).collect();
    let logs = || {
        let mut s = gateway.tail();
        for p in processors.values() {
            s += "\n";
            s += &p.tail();
        }
        s
    };
    eprintln!(
        "{} messages, {} received once, {} missing, {} twice, in {:.1} s",
        MESSAGES,
        counts.iter().filter(|c| **c == 1).count(),
        missing.len(),
        twice.len(),
        started.elapsed().as_secs_f64()
    );
    let (owner, at) = killed.expect("a processor was killed mid-stream");
    assert!(at < MESSAGES, "the kill happened mid-stream");
    assert!(
        missing.is_empty() && twice.is_empty(),
        "after kill -9 of {owner}: missing {:?}, twice {:?}\n{}",
        &missing[..missing.len().min(20)],
        &twice[..twice.len().min(20)],
        logs()
    );
}
