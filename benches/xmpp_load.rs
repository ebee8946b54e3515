//! XMPP load generator: logs N clients in over STARTTLS (SASL PLAIN over
//! TLS, resource binding, initial presence), then exchanges chat messages
//! between pairs, against any XMPP server. Used side by side on Switchboard
//! and Prosody by `benches/xmpp-compare.sh`; prints one Markdown table row.
//!
//! Environment: `XMPP_ADDR` (127.0.0.1:5222), `XMPP_DOMAIN` (example.com),
//! `XMPP_CERT` (PEM of the server's self-signed certificate, pinned),
//! `XMPP_USERS` (200), `XMPP_USER_PREFIX` (user), `XMPP_PASSWORD` (pw),
//! `XMPP_RATE` (messages/s of the latency phase, 2000), `XMPP_SECS` (10),
//! `XMPP_BURST` (messages per pair in the saturation phase, 200),
//! `SERVER_PID` (to read the server's RSS), `XMPP_LABEL` (row label),
//! `XMPP_SLOW=1` (the slowest deliveries of the fixed-rate phase, and how
//! many took over 10 ms per 100 ms of sending time, on stderr).
//!
//! On stderr after the burst: the CPU time the server (`SERVER_PID`) and
//! this load generator each used during it, per message delivered. Both
//! run on one machine, so the load generator's share bounds what any
//! server could reach here: with `c` cores, at most `c ÷ (its CPU time
//! per message)` messages/s.
//!
//! `XMPP_MODE` picks what runs:
//! * `messages` (default): the logins, the fixed-rate phase and the burst.
//! * `idle`: logs `XMPP_USERS` sessions in, waits `XMPP_IDLE_SETTLE_MS`
//!   (2000), and prints the server's RSS growth per idle session (VmRSS
//!   after − before, ÷ sessions) while they stay connected.
//! * `provision`: creates users `XMPP_USER_PREFIX`0.. through a running
//!   Switchboard's admin socket (`XMPP_ADMIN_SOCKET`), 64 requests in
//!   flight, with SCRAM keys derived once (`XMPP_ITERATIONS`, 4096) and
//!   shared by all of them: one process instead of one CLI call per user.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures::StreamExt;
use hdrhistogram::Histogram;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn env_num(name: &str, default: u64) -> u64 {
    env(name, &default.to_string()).parse().unwrap_or(default)
}

/// Accepts exactly the pinned certificate (self-signed test servers), with
/// real signature checks.
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
            Err(rustls::Error::General(
                "certificate is not the pinned one".into(),
            ))
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

struct Conn {
    tls: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    /// Writes and flushes: tokio-rustls' `write` reports bytes as written
    /// once the TLS library has them, which may keep them (the socket
    /// would block) until the next flush; a client that then only reads
    /// never sends them, and the login stalls until the server's timeout.
    async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.tls.write_all(bytes).await?;
        self.tls.flush().await?;
        Ok(())
    }

    async fn read_until(&mut self, pat: &[u8]) -> anyhow::Result<Vec<u8>> {
        loop {
            if let Some(at) = find(&self.buf, pat) {
                let rest = self.buf.split_off(at + pat.len());
                return Ok(std::mem::replace(&mut self.buf, rest));
            }
            let mut chunk = [0u8; 8192];
            let n = self.tls.read(&mut chunk).await?;
            anyhow::ensure!(
                n > 0,
                "server closed the connection after {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

async fn read_plain_until(tcp: &mut TcpStream, pat: &[u8]) -> anyhow::Result<()> {
    let mut seen = Vec::new();
    while find(&seen, pat).is_none() {
        let mut chunk = [0u8; 4096];
        let n = tcp.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "server closed the connection");
        seen.extend_from_slice(&chunk[..n]);
    }
    Ok(())
}

fn header(domain: &str) -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{domain}' xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    )
}

/// RFC 6120: STARTTLS, SASL PLAIN, bind, initial presence.
async fn login(
    addr: &str,
    domain: &str,
    tls: Arc<rustls::ClientConfig>,
    user: &str,
    password: &str,
) -> anyhow::Result<Conn> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(header(domain).as_bytes()).await?;
    read_plain_until(&mut tcp, b"</stream:features>").await?;
    tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        .await?;
    read_plain_until(&mut tcp, b"<proceed").await?;
    let name = ServerName::try_from(domain.to_owned())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await?;
    let mut c = Conn {
        tls: stream,
        buf: Vec::new(),
    };
    c.send(header(domain).as_bytes()).await?;
    c.read_until(b"</stream:features>").await?;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
    c.send(
        format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>")
            .as_bytes(),
    )
    .await?;
    let answer = c.read_until(b"success").await?;
    anyhow::ensure!(find(&answer, b"failure").is_none(), "authentication failed");
    c.read_until(b">").await?;
    c.send(header(domain).as_bytes()).await?;
    c.read_until(b"</stream:features>").await?;
    c.send(
        b"<iq type='set' id='bind1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
          <resource>load</resource></bind></iq>",
    )
    .await?;
    c.read_until(b"</iq>").await?;
    c.send(b"<presence/>").await?;
    Ok(c)
}

/// Creates `users` accounts through the admin socket (one JSON request per
/// connection, as `switchboard user add` sends it).
async fn provision(users: usize, prefix: &str, domain: &str, password: &str) -> anyhow::Result<()> {
    use switchboard_schemas::events::ScramMechanism;
    let socket = env("XMPP_ADMIN_SOCKET", "data/admin.sock");
    let iterations = u32::try_from(env_num("XMPP_ITERATIONS", 4096))?;
    let credentials = [ScramMechanism::ScramSha256, ScramMechanism::ScramSha1]
        .into_iter()
        .map(|m| switchboard_gateway::sasl::scram::new_credentials(m, password, iterations))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(0..users)
        .map(|i| {
            let request = serde_json::json!({
                "op": "user_add",
                "user": format!("{prefix}{i}@{domain}"),
                "display_name": null,
                "credentials": credentials,
                "by": "xmpp_load",
            });
            let socket = socket.clone();
            async move {
                let mut stream = tokio::net::UnixStream::connect(&socket).await?;
                let mut line = serde_json::to_vec(&request)?;
                line.push(b'\n');
                stream.write_all(&line).await?;
                let mut answer = String::new();
                stream.read_to_string(&mut answer).await?;
                let answer: serde_json::Value = serde_json::from_str(answer.trim())?;
                anyhow::ensure!(answer["result"] == "done", "user {i}: {answer}");
                Ok(())
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| e.to_string()))
        .collect();
    eprintln!(
        "provisioned {} of {users} users in {:.1} s",
        users - failed.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(first) = failed.first() {
        anyhow::bail!("{} users not provisioned, first: {first}", failed.len());
    }
    Ok(())
}

/// Logs `users` sessions in, 32 at a time; one result per user.
async fn try_login_all(
    users: usize,
    addr: &str,
    domain: &str,
    tls: &Arc<rustls::ClientConfig>,
    prefix: &str,
    password: &str,
) -> Vec<anyhow::Result<Conn>> {
    futures::stream::iter(0..users)
        .map(|i| {
            let user = format!("{prefix}{i}");
            let tls = tls.clone();
            async move {
                login(addr, domain, tls, &user, password)
                    .await
                    .map_err(|e| anyhow::anyhow!("{user}: {e}"))
            }
        })
        .buffered(32)
        .collect::<Vec<_>>()
        .await
}

/// Logs `users` sessions in, 32 at a time; fails if any login fails.
async fn login_all(
    users: usize,
    addr: &str,
    domain: &str,
    tls: &Arc<rustls::ClientConfig>,
    prefix: &str,
    password: &str,
) -> anyhow::Result<Vec<Conn>> {
    try_login_all(users, addr, domain, tls, prefix, password)
        .await
        .into_iter()
        .collect()
}

fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// CPU time (user + system, all threads) a process has used, from
/// `/proc/PID/stat` (fields 14 and 15, in the kernel's fixed 100 Hz
/// `USER_HZ` ticks).
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it don't.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((user + system) * 10))
}

/// Whether `XMPP_SLOW=1` (read once: it is asked per arrival).
fn slow_report() -> bool {
    static SLOW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SLOW.get_or_init(|| std::env::var("XMPP_SLOW").is_ok_and(|v| v == "1"))
}

/// Every arrival as (sent µs since the start, latency µs), kept only with
/// `XMPP_SLOW=1` (see [`print_slow`]).
static ARRIVALS: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

/// With `XMPP_SLOW=1`: the slowest deliveries of the fixed-rate phase and
/// how many took over 10 ms per 100 ms of sending time, on stderr, to tell
/// a periodic stall from scattered ones.
fn print_slow(until_us: u64) {
    let mut arrivals: Vec<(u64, u64)> = ARRIVALS
        .lock()
        .expect("arrivals")
        .iter()
        .copied()
        .filter(|(sent, _)| *sent < until_us)
        .collect();
    arrivals.sort_by_key(|(_, latency)| std::cmp::Reverse(*latency));
    for (sent, latency) in arrivals.iter().take(15) {
        eprintln!(
            "slow: sent at {:.1} ms, {:.2} ms",
            *sent as f64 / 1000.0,
            *latency as f64 / 1000.0
        );
    }
    let mut buckets: BTreeMap<u64, usize> = BTreeMap::new();
    for (sent, latency) in &arrivals {
        if *latency > 10_000 {
            *buckets.entry(sent / 100_000).or_default() += 1;
        }
    }
    let line: Vec<String> = buckets
        .iter()
        .map(|(b, n)| format!("{}ms:{n}", b * 100))
        .collect();
    eprintln!("over 10 ms by 100 ms of sending: {}", line.join(" "));
}

/// Counts `<body>t=NANOS</body>` arrivals and their latency.
async fn receive(
    mut read: ReadHalf<TlsStream<TcpStream>>,
    base: Instant,
    latencies: Arc<Mutex<Histogram<u64>>>,
    received: Arc<std::sync::atomic::AtomicU64>,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16384];
    loop {
        let n = match read.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let now = u64::try_from(base.elapsed().as_micros()).unwrap_or(u64::MAX);
        while let Some(start) = find(&buf, b"<body>t=") {
            let Some(end) = find(&buf[start..], b"</body>") else {
                break;
            };
            let value = &buf[start + 8..start + end];
            if let Some(sent) = std::str::from_utf8(value)
                .ok()
                .and_then(|v| v.split(':').next())
                .and_then(|v| v.parse::<u64>().ok())
            {
                let latency = now.saturating_sub(sent).max(1);
                let _ = latencies.lock().expect("histogram").record(latency);
                if slow_report() {
                    ARRIVALS.lock().expect("arrivals").push((sent, latency));
                }
                received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            buf.drain(..start + end + 7);
        }
        if buf.len() > 1 << 20 {
            buf.clear();
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = env("XMPP_ADDR", "127.0.0.1:5222");
    let domain = env("XMPP_DOMAIN", "example.com");
    let users = env_num("XMPP_USERS", 200) as usize;
    let prefix = env("XMPP_USER_PREFIX", "user");
    let password = env("XMPP_PASSWORD", "pw");
    let rate = env_num("XMPP_RATE", 2000);
    let secs = env_num("XMPP_SECS", 10);
    let burst = env_num("XMPP_BURST", 200);
    let label = env("XMPP_LABEL", "server");
    let pid = std::env::var("SERVER_PID").ok();
    let mode = env("XMPP_MODE", "messages");
    if mode == "provision" {
        return provision(users, &prefix, &domain, &password).await;
    }
    let cert_path = env("XMPP_CERT", "data/tls/cert.pem");
    let cert = CertificateDer::from_pem_file(&cert_path)
        .map_err(|e| anyhow::anyhow!("{cert_path}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned { cert, provider }))
            .with_no_client_auth(),
    );

    if mode == "idle" {
        let rss_before = pid.as_deref().and_then(rss_kib);
        let started = Instant::now();
        let results = try_login_all(users, &addr, &domain, &tls, &prefix, &password).await;
        let login_secs = started.elapsed().as_secs_f64();
        let mut conns = Vec::with_capacity(users);
        for r in results {
            match r {
                Ok(c) => conns.push(c),
                Err(e) => eprintln!("login failed: {e}"),
            }
        }
        anyhow::ensure!(!conns.is_empty(), "no session logged in");
        tokio::time::sleep(Duration::from_millis(env_num("XMPP_IDLE_SETTLE_MS", 2000))).await;
        let rss_after = pid.as_deref().and_then(rss_kib);
        let (before, after, per_session) = match (rss_before, rss_after) {
            (Some(b), Some(a)) => (
                format!("{:.1}", b as f64 / 1024.0),
                format!("{:.1}", a as f64 / 1024.0),
                format!("{:.1}", a.saturating_sub(b) as f64 / conns.len() as f64),
            ),
            _ => ("n/a".to_owned(), "n/a".to_owned(), "n/a".to_owned()),
        };
        println!(
            "| {label} | {} of {users} | {:.0} | {before} | {after} | {per_session} |",
            conns.len(),
            conns.len() as f64 / login_secs
        );
        return Ok(());
    }

    // Logins.
    let rss_before = pid.as_deref().and_then(rss_kib);
    let started = Instant::now();
    let conns = login_all(users, &addr, &domain, &tls, &prefix, &password).await?;
    let login_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = pid.as_deref().and_then(rss_kib);
    let logins_per_sec = users as f64 / login_secs;

    // Messages: client i talks to client i ^ 1.
    let base = Instant::now();
    let latencies = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut writers: Vec<Arc<tokio::sync::Mutex<WriteHalf<TlsStream<TcpStream>>>>> = Vec::new();
    for c in conns {
        let (read, write) = tokio::io::split(c.tls);
        tokio::spawn(receive(read, base, latencies.clone(), received.clone()));
        writers.push(Arc::new(tokio::sync::Mutex::new(write)));
    }
    let jid = |i: usize| format!("{prefix}{i}@{domain}");
    let send = |i: usize, n: u64| {
        let writer = writers[i].clone();
        let to = jid(i ^ 1);
        async move {
            let now = base.elapsed().as_micros();
            let stanza = format!(
                "<message to='{to}' type='chat' id='m{n}'><body>t={now}:{n}</body></message>"
            );
            let mut writer = writer.lock().await;
            // Flushed: see `Conn::send`.
            let _ = writer.write_all(stanza.as_bytes()).await;
            let _ = writer.flush().await;
        }
    };
    // Fixed rate, for latency.
    let total = rate * secs;
    let per_ms = (rate / 1000).max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let mut n = 0u64;
    let pairs = users - users % 2;
    while n < total {
        ticker.tick().await;
        for _ in 0..per_ms {
            send((n as usize) % pairs, n).await;
            n += 1;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.load(std::sync::atomic::Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got_rate_phase = received.load(std::sync::atomic::Ordering::Relaxed);
    if slow_report() {
        print_slow(u64::try_from(base.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
    let (p50, p99) = {
        let h = latencies.lock().expect("histogram");
        (
            h.value_at_quantile(0.5) as f64 / 1000.0,
            h.value_at_quantile(0.99) as f64 / 1000.0,
        )
    };
    // Saturation: every client sends `burst` messages as fast as it can.
    let before = received.load(std::sync::atomic::Ordering::Relaxed);
    let burst_total = burst * pairs as u64;
    let started = Instant::now();
    let cpu_before = (pid.as_deref().and_then(cpu_time), cpu_time("self"));
    futures::future::join_all((0..pairs).map(|i| async move {
        for k in 0..burst {
            send(i, 1_000_000 + k).await;
        }
    }))
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while received.load(std::sync::atomic::Ordering::Relaxed) - before < burst_total
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let burst_got = received.load(std::sync::atomic::Ordering::Relaxed) - before;
    let messages_per_sec = burst_got as f64 / started.elapsed().as_secs_f64();
    if let ((Some(s0), Some(l0)), Some(s1), Some(l1)) = (
        cpu_before,
        pid.as_deref().and_then(cpu_time),
        cpu_time("self"),
    ) {
        let per = |d: Duration| d.as_secs_f64() * 1e6 / burst_got.max(1) as f64;
        eprintln!(
            "burst: {burst_got} messages in {:.2} s; CPU per message: server {:.1} µs, load generator {:.1} µs",
            started.elapsed().as_secs_f64(),
            per(s1.saturating_sub(s0)),
            per(l1.saturating_sub(l0)),
        );
    }
    let per_session = match (rss_before, rss_after) {
        (Some(b), Some(a)) => format!("{:.1}", a.saturating_sub(b) as f64 / users as f64),
        _ => "n/a".to_owned(),
    };
    println!(
        "| {label} | {users} | {logins_per_sec:.0} | {messages_per_sec:.0} ({burst_got}/{burst_total}) | {p50:.2} | {p99:.2} ({got_rate_phase}/{total} at {rate}/s) | {per_session} |"
    );
    Ok(())
}
