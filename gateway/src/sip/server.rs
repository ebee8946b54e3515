//! The SIP listeners (RFC 3261 §18): UDP and TCP on 5060, TLS on 5061, and
//! the methods this gateway serves: REGISTER (§10, digest per §22),
//! PUBLISH (RFC 3903), SUBSCRIBE/NOTIFY for `presence` (RFC 6665, RFC 3856),
//! MESSAGE (RFC 3428) and OPTIONS (§11).
//!
//! Parsing, transactions, digest, PIDF and the registrar, publication and
//! subscription tables are the sans-IO cores of [`super`]; this module owns
//! the sockets, keeps those tables behind one lock and turns what clients
//! do into events, answering a request only once its events are durable.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use rsip::Method;
use sha2::{Digest, Sha256};
use switchboard_infra::bus::{Bus, BusError, ConsumerConfig, Polled, StartFrom};
use switchboard_infra::config::SipSettings;
use switchboard_schemas::events::{
    AuthMechanism, ClientInfo, ComposedPresence, DevicePresence, LineState, LoginFailureReason,
    MessageKind, MessageSubmitted, MessageUndelivered, PhoneLineState, Protocol, SessionEndReason,
    SessionEnded, SessionLoginFailed, SessionLoginSucceeded, SessionResourceBound,
    UndeliveredReason,
};
use switchboard_schemas::{BareJid, Envelope, Event, FullJid};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{RwLock, mpsc, watch};
use uuid::Uuid;

use super::blocks::{Applied, Policies};
use super::digest::{self, NonceCheck, Nonces};
use super::message::{self, Limits, Message, ParseError, Request, Response};
use super::pidf;
use super::publish::{Publications, Target};
use super::registrar::{Change, ContactUpdate, Registrar};
use super::subscribe::{self, Subscription, Subscriptions, dialog_key};
use super::transaction::{Arrival, Key, T1, Transactions};
use super::{Flow, Transport};
use crate::emit::{EmitError, EventSink};
use crate::ratelimit::LoginLimiter;
use crate::users::UserDirectory;

/// RFC 3261 §17.1.2.2: T2, the cap of the retransmit interval.
const T2: Duration = Duration::from_secs(4);
/// How often lapsed bindings, publications, subscriptions and transactions
/// are swept and rate-limited NOTIFYs sent.
const TICK: Duration = Duration::from_millis(200);
/// The event packages served (RFC 6665 §8.2.2 `Allow-Events`).
const ALLOW_EVENTS: &str = "presence, presence.winfo";
/// When the device presence of registrations rebuilt at start-up is
/// repeated (see [`SipContext::reannounce`]).
const REANNOUNCE_AFTER: Duration = Duration::from_secs(3);
/// Messages a connection may have queued for writing.
const CONNECTION_QUEUE: usize = 256;

/// The composed presence of every user, folded from `presence_state`.
#[derive(Debug, Default)]
pub struct PresenceTable {
    users: BTreeMap<String, ComposedPresence>,
}

impl PresenceTable {
    /// Applies one record of the compacted `presence_state` topic; returns
    /// the user whose presence changed.
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Option<String> {
        let user = String::from_utf8_lossy(key).into_owned();
        match value.map(Envelope::from_json_slice) {
            None => {
                self.users.remove(&user);
                Some(user)
            }
            Some(Ok(Envelope {
                event: Event::ComposedPresence(p),
                ..
            })) => {
                let user = p.user.as_str().to_owned();
                if self.users.get(&user) == Some(&p) {
                    return None;
                }
                self.users.insert(user.clone(), p);
                Some(user)
            }
            Some(_) => None,
        }
    }

    /// A user's composed presence.
    pub fn get(&self, user: &str) -> Option<&ComposedPresence> {
        self.users.get(user)
    }
}

/// Everything the listeners share.
pub struct SipContext {
    /// Served domains (normalised).
    pub domains: Vec<String>,
    /// Settings.
    pub settings: SipSettings,
    /// The digest realm.
    pub realm: String,
    /// Users and their digest secrets.
    pub directory: Arc<RwLock<UserDirectory>>,
    /// Where events go.
    pub events: EventSink,
    /// Failed-authentication limits per address and account.
    pub limiter: LoginLimiter,
    nonces: Nonces,
    presence: RwLock<PresenceTable>,
    state: Mutex<State>,
    udp: OnceLock<Arc<UdpSocket>>,
    local: Mutex<HashMap<Transport, SocketAddr>>,
    connections: Mutex<HashMap<u64, mpsc::Sender<Vec<u8>>>>,
    next_conn: AtomicU64,
    /// TCP and TLS connections open (with TLS handshakes under way), for
    /// `sip.max_connections`.
    open_connections: AtomicUsize,
}

#[derive(Default)]
struct State {
    transactions: Transactions,
    registrar: Registrar,
    publications: Publications,
    subscriptions: Subscriptions,
    /// The users' block lists (who may not watch them).
    policies: Policies,
    /// Requests this node sent over UDP awaiting a response, by branch
    /// (RFC 3261 §17.1.2.2 Timer E and F).
    outgoing: HashMap<String, Outgoing>,
}

struct Outgoing {
    bytes: Vec<u8>,
    flow: Flow,
    next: Instant,
    interval: Duration,
    give_up: Instant,
    /// The subscription the request notifies, if a NOTIFY.
    dialog: Option<String>,
}

/// Counters for tests and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Registered contacts.
    pub bindings: usize,
    /// Live publications.
    pub publications: usize,
    /// Live subscriptions.
    pub subscriptions: usize,
}

impl SipContext {
    /// A context; `secret` keys the digest nonces.
    pub fn new(
        domains: Vec<String>,
        settings: SipSettings,
        directory: Arc<RwLock<UserDirectory>>,
        events: EventSink,
        limiter: LoginLimiter,
        secret: [u8; 32],
    ) -> Self {
        let default_domain = domains.first().cloned().unwrap_or_default();
        let realm = settings.realm_or(&default_domain).to_owned();
        let nonces = Nonces::new(secret, settings.nonce_lifetime_secs);
        Self {
            domains,
            settings,
            realm,
            directory,
            events,
            limiter,
            nonces,
            presence: RwLock::new(PresenceTable::default()),
            state: Mutex::new(State::default()),
            udp: OnceLock::new(),
            local: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            open_connections: AtomicUsize::new(0),
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_message_bytes: self.settings.max_message_bytes,
            max_headers: self.settings.max_headers,
            max_header_line_bytes: self.settings.max_header_line_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("sip state lock")
    }

    /// Live bindings, publications and subscriptions.
    pub fn counts(&self) -> Counts {
        let s = self.lock();
        Counts {
            bindings: s.registrar.len(),
            publications: s.publications.len(),
            subscriptions: s.subscriptions.len(),
        }
    }

    fn serves(&self, domain: &str) -> bool {
        self.domains.iter().any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// The host:port this node names in Via and Contact for a transport.
    fn local_host(&self, transport: Transport) -> String {
        let addr = self
            .local
            .lock()
            .expect("local lock")
            .get(&transport)
            .copied();
        let domain = self
            .domains
            .first()
            .map(String::as_str)
            .unwrap_or("localhost");
        match addr {
            Some(a) if !a.ip().is_unspecified() => a.to_string(),
            Some(a) => format!("{domain}:{}", a.port()),
            None => domain.to_owned(),
        }
    }

    fn contact(&self, transport: Transport) -> String {
        let host = self.local_host(transport);
        match transport {
            Transport::Udp => format!("<sip:{host}>"),
            Transport::Tcp => format!("<sip:{host};transport=tcp>"),
            Transport::Tls => format!("<sips:{host};transport=tls>"),
        }
    }

    /// Sends bytes on a flow (RFC 3261 §18.2.2: the connection the request
    /// came on; over UDP to the address it came from, which is what
    /// `received`/`rport` name, RFC 3581 §4).
    async fn send(&self, flow: &Flow, bytes: Vec<u8>) {
        match flow.transport {
            Transport::Udp => {
                let Some(socket) = self.udp.get() else {
                    return;
                };
                if let Err(e) = socket.send_to(&bytes, flow.peer).await {
                    tracing::debug!(peer = %flow.peer, error = %e, "sip udp send failed");
                }
            }
            Transport::Tcp | Transport::Tls => {
                let tx = self
                    .connections
                    .lock()
                    .expect("connections lock")
                    .get(&flow.conn)
                    .cloned();
                match tx {
                    Some(tx) => {
                        if tx.try_send(bytes).is_err() {
                            tracing::debug!(peer = %flow.peer, "sip connection queue full or closed");
                        }
                    }
                    None => tracing::debug!(peer = %flow.peer, "sip connection gone"),
                }
            }
        }
    }

    /// Sends a request this node originates; over UDP it is retransmitted
    /// until answered (RFC 3261 §17.1.2.2).
    async fn send_request(
        &self,
        flow: &Flow,
        branch: String,
        bytes: Vec<u8>,
        dialog: Option<String>,
    ) {
        if flow.transport == Transport::Udp {
            let now = Instant::now();
            self.lock().outgoing.insert(
                branch,
                Outgoing {
                    bytes: bytes.clone(),
                    flow: flow.clone(),
                    next: now + T1,
                    interval: T1,
                    give_up: now + T1 * 64,
                    dialog,
                },
            );
        }
        self.send(flow, bytes).await;
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_token() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("random token");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn short_hash(data: &str) -> String {
    Sha256::digest(data.as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Serves UDP datagrams until `shutdown` turns true; also runs the timers.
pub async fn serve_udp(
    socket: UdpSocket,
    ctx: Arc<SipContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    let socket = Arc::new(socket);
    if let Ok(addr) = socket.local_addr() {
        ctx.local
            .lock()
            .expect("local lock")
            .insert(Transport::Udp, addr);
    }
    let _ = ctx.udp.set(socket.clone());
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "sip udp receive failed");
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let bytes = buf[..n].to_vec();
        let ctx = ctx.clone();
        let flow = Flow {
            transport: Transport::Udp,
            peer,
            conn: 0,
        };
        tokio::spawn(async move { ctx.handle(&bytes, flow).await });
    }
}

/// Accepts TCP (or, with `tls`, TLS) connections until `shutdown`.
pub async fn serve_tcp(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    ctx: Arc<SipContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    let transport = if tls.is_some() {
        Transport::Tls
    } else {
        Transport::Tcp
    };
    if let Ok(addr) = listener.local_addr() {
        ctx.local
            .lock()
            .expect("local lock")
            .insert(transport, addr);
    }
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "sip accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        // Counted from the accept (not when the task runs): a burst of
        // connections cannot overshoot the limit.
        let open = ctx.open_connections.fetch_add(1, Ordering::Relaxed);
        if open >= ctx.settings.max_connections {
            ctx.open_connections.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(%peer, open, "sip connection refused: sip.max_connections reached");
            drop(tcp);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let acceptor = acceptor.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            match acceptor {
                None => connection(tcp, peer, Transport::Tcp, ctx.clone(), shutdown).await,
                Some(acceptor) => {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(tls)) => {
                            connection(tls, peer, Transport::Tls, ctx.clone(), shutdown).await;
                        }
                        _ => tracing::debug!(%peer, "sip tls handshake failed"),
                    }
                }
            }
            ctx.open_connections.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// One TCP or TLS connection: messages framed by Content-Length (RFC 3261
/// §18.3); a framing error is answered 400 and closes the connection, as
/// the stream cannot be resynchronised. Limits: a connection silent for
/// `sip.idle_timeout_secs` is closed (RFC 5626 §4.4.1 keepalives count as
/// traffic), and at most `sip.max_requests_per_connection` of its requests
/// are handled at once (past that it is not read: TCP flow control holds
/// the client back).
async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    transport: Transport,
    ctx: Arc<SipContext>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let conn = ctx.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(CONNECTION_QUEUE);
    ctx.connections
        .lock()
        .expect("connections lock")
        .insert(conn, tx.clone());
    let (mut rd, mut wr) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if wr.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let flow = Flow {
        transport,
        peer,
        conn,
    };
    let limits = ctx.limits();
    let idle = match ctx.settings.idle_timeout_secs {
        0 => Duration::MAX,
        secs => Duration::from_secs(secs),
    };
    let in_flight = Arc::new(tokio::sync::Semaphore::new(
        ctx.settings.max_requests_per_connection.max(1),
    ));
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16_384];
    'read: loop {
        let n = tokio::select! {
            r = tokio::time::timeout(idle, rd.read(&mut chunk)) => match r {
                Ok(Ok(0) | Err(_)) => break,
                Ok(Ok(n)) => n,
                Err(_) => {
                    tracing::debug!(%peer, "sip connection idle: closed");
                    break;
                }
            },
            _ = shutdown.changed() => break,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match message::frame(&buf, &limits) {
                Ok(message::Framed::Incomplete) => break,
                Ok(message::Framed::KeepAlive(n)) => {
                    // RFC 5626 §4.4.1: a double CRLF ping gets a CRLF pong.
                    if n >= 4 {
                        let _ = tx.try_send(b"\r\n".to_vec());
                    }
                    buf.drain(..n);
                }
                Ok(message::Framed::Message(n)) => {
                    let bytes: Vec<u8> = buf.drain(..n).collect();
                    let permit = tokio::select! {
                        p = in_flight.clone().acquire_owned() => p.expect("never closed"),
                        _ = shutdown.changed() => break 'read,
                    };
                    let ctx = ctx.clone();
                    let flow = flow.clone();
                    tokio::spawn(async move {
                        ctx.handle(&bytes, flow).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    if let Some(answer) = message::salvage_response(&buf, 400, &e.to_string()) {
                        let _ = tx.send(answer).await;
                    }
                    break 'read;
                }
            }
        }
    }
    ctx.connections
        .lock()
        .expect("connections lock")
        .remove(&conn);
    drop(tx);
    let _ = writer.await;
}

/// The outcome of a request handler: the final response and what follows
/// it once it is sent.
struct Reply {
    bytes: Vec<u8>,
    after: After,
}

enum After {
    Nothing,
    /// A NOTIFY with the current state on this dialog.
    Notify(String),
    /// A final NOTIFY (terminated) for a subscription no longer kept.
    FinalNotify(Box<Subscription>),
}

impl From<Vec<u8>> for Reply {
    fn from(bytes: Vec<u8>) -> Self {
        Self {
            bytes,
            after: After::Nothing,
        }
    }
}

/// Who a request proved to be.
enum Authenticated {
    /// The request proved to come from the claimed user.
    User,
    /// The request was answered (challenge or refusal).
    Answered(Vec<u8>),
}

impl SipContext {
    /// Handles one received message.
    pub async fn handle(self: &Arc<Self>, bytes: &[u8], flow: Flow) {
        let parsed = message::parse(bytes, &self.limits(), flow.transport.reliable());
        let mut req = match parsed {
            Ok(Message::Request(req)) => req,
            Ok(Message::Response(resp)) => {
                self.response(&resp).await;
                return;
            }
            Err(e) => {
                // RFC 3261 §16.3/§21.4.1: a request that does not parse is
                // answered 400 when a response can be formed; over UDP
                // anything else is dropped.
                let code = match e {
                    ParseError::UnknownMethod(_) => 501,
                    _ => 400,
                };
                tracing::debug!(peer = %flow.peer, error = %e, "sip message refused");
                if let Some(answer) = message::salvage_response(bytes, code, &e.to_string()) {
                    self.send(&flow, answer).await;
                }
                return;
            }
        };
        if req.method == Method::Ack {
            return;
        }
        req.stamp_received(flow.peer);
        let key = Key::of(&req);
        let arrival = self.lock().transactions.arrive(&key);
        match arrival {
            Arrival::Absorbed => return,
            Arrival::Retransmit(bytes) => {
                self.send(&flow, bytes).await;
                return;
            }
            Arrival::New => {}
        }
        let reply = self.dispatch(&req, &flow).await;
        self.lock().transactions.complete(
            &key,
            reply.bytes.clone(),
            flow.transport.reliable(),
            Instant::now(),
        );
        self.send(&flow, reply.bytes).await;
        match reply.after {
            After::Nothing => {}
            After::Notify(dialog) => self.notify(&dialog, Instant::now()).await,
            After::FinalNotify(sub) => self.final_notify(*sub, "timeout").await,
        }
    }

    async fn dispatch(self: &Arc<Self>, req: &Request, flow: &Flow) -> Reply {
        match req.method {
            Method::Register => self.register(req, flow).await.into(),
            Method::Options => message::response(
                req,
                200,
                Some(&random_token()),
                &[
                    ("Allow", message::ALLOW.to_owned()),
                    ("Accept", "application/pidf+xml, text/plain".to_owned()),
                    ("Allow-Events", ALLOW_EVENTS.to_owned()),
                    ("Contact", self.contact(flow.transport)),
                ],
                None,
            )
            .into(),
            Method::Message => self.message(req, flow).await.into(),
            Method::Publish => self.publish(req, flow).await.into(),
            Method::Subscribe => self.subscribe(req, flow).await,
            // No subscription of this node's makes NOTIFYs to it.
            Method::Notify => message::response(req, 481, None, &[], None).into(),
            _ => message::response(
                req,
                405,
                Some(&random_token()),
                &[("Allow", message::ALLOW.to_owned())],
                None,
            )
            .into(),
        }
    }

    /// RFC 3261 §22.1-§22.4 (RFC 7616, RFC 8760): checks `Authorization`
    /// and proves the request comes from `claimed` (the From or To user).
    async fn authenticate(&self, req: &Request, flow: &Flow, claimed: &str) -> Authenticated {
        let challenge = |stale: bool| {
            let nonce = self.nonces.issue(unix_now());
            let headers: Vec<(&str, String)> = digest::OFFERED
                .iter()
                .map(|a| {
                    (
                        "WWW-Authenticate",
                        digest::challenge(a, &self.realm, &nonce, stale),
                    )
                })
                .collect();
            Authenticated::Answered(message::response(
                req,
                401,
                Some(&random_token()),
                &headers,
                None,
            ))
        };
        let forbidden = |why: &str| {
            Authenticated::Answered(message::response(
                req,
                403,
                Some(&random_token()),
                &[("Warning", format!("399 switchboard \"{why}\""))],
                None,
            ))
        };
        let now = Instant::now();
        if self
            .limiter
            .check(flow.peer.ip(), Some(claimed), now)
            .is_err()
        {
            return forbidden("too many failed attempts");
        }
        for value in req.header_values("Authorization") {
            let Ok(creds) = digest::parse_authorization(value) else {
                return Authenticated::Answered(message::response(
                    req,
                    400,
                    Some(&random_token()),
                    &[(
                        "Warning",
                        "399 switchboard \"malformed authorization\"".to_owned(),
                    )],
                    None,
                ));
            };
            if creds.realm != self.realm {
                continue;
            }
            match self.nonces.check(&creds.nonce, unix_now()) {
                NonceCheck::Fresh => {}
                NonceCheck::Stale => return challenge(true),
                NonceCheck::Invalid => return challenge(false),
            }
            let username = creds.username.to_lowercase();
            let user = if username.contains('@') {
                username
            } else {
                let domain = claimed.rsplit_once('@').map_or("", |(_, d)| d);
                format!("{username}@{domain}")
            };
            if user != claimed {
                self.limiter.failed(flow.peer.ip(), Some(claimed), now);
                return forbidden("credentials are not for this address");
            }
            let (ha1, reason) = {
                let directory = self.directory.read().await;
                match directory.get(&user) {
                    Some(state) if state.enabled => (
                        directory
                            .digest_ha1(&user, &creds.algorithm(), &self.realm)
                            .map(str::to_owned),
                        LoginFailureReason::BadCredentials,
                    ),
                    Some(_) => (None, LoginFailureReason::AccountDisabled),
                    None => (None, LoginFailureReason::UnknownUser),
                }
            };
            let ok = ha1.is_some_and(|ha1| digest::verify(&creds, &req.method.to_string(), &ha1));
            if !ok {
                self.limiter.failed(flow.peer.ip(), Some(claimed), now);
                // Every failed login is on the record (SPEC.md §10); never
                // the digest response itself.
                let failed = SessionLoginFailed {
                    session_id: Uuid::now_v7(),
                    user: BareJid::new(claimed),
                    protocol: Protocol::Sip,
                    remote_addr: flow.peer.to_string(),
                    mechanism: AuthMechanism::Digest,
                    reason,
                    text: Some(format!("{} {}", req.method, creds.algorithm().as_str())),
                };
                if let Err(e) = self.events.emit(claimed, failed).await {
                    tracing::error!(error = %e, "sip login failure not stored");
                }
                return forbidden("bad credentials");
            }
            return Authenticated::User;
        }
        challenge(false)
    }

    /// The user a request is from (From URI), if it names a served domain.
    fn sender_of(&self, req: &Request) -> Option<String> {
        let address = req.from.address()?;
        let domain = address.rsplit_once('@')?.1;
        self.serves(domain).then_some(address.to_lowercase())
    }

    /// RFC 3261 §10.3: REGISTER.
    async fn register(&self, req: &Request, flow: &Flow) -> Vec<u8> {
        let tag = random_token();
        let Some(aor) = req.to.address().map(|a| a.to_lowercase()) else {
            return message::response(req, 400, Some(&tag), &[], None);
        };
        if !aor.rsplit_once('@').is_some_and(|(_, d)| self.serves(d)) {
            return message::response(req, 404, Some(&tag), &[], None);
        }
        match self.authenticate(req, flow, &aor).await {
            Authenticated::Answered(r) => return r,
            Authenticated::User => {}
        }
        let contacts = req.header_list("Contact");
        let header_expires = req.expires();
        let now = Instant::now();
        let user_agent = req.header("User-Agent");
        let mut changes = Vec::new();
        if contacts.iter().any(|c| c.trim() == "*") {
            // RFC 3261 §10.3 step 6: `*` only alone and with Expires 0.
            if contacts.len() != 1 || header_expires != Some(0) {
                return message::response(req, 400, Some(&tag), &[], None);
            }
            changes.extend(
                self.lock()
                    .registrar
                    .remove_all(&aor)
                    .into_iter()
                    .map(Change::Removed),
            );
        }
        let s = &self.settings;
        let mut updates = Vec::new();
        for c in contacts.iter().filter(|c| c.trim() != "*") {
            let Some(typed) = message::parse_contact(c) else {
                return message::response(
                    req,
                    400,
                    Some(&tag),
                    &[(
                        "Warning",
                        "399 switchboard \"malformed Contact\"".to_owned(),
                    )],
                    None,
                );
            };
            let expires = typed
                .param("expires")
                .and_then(|e| e.parse::<u32>().ok())
                .or(header_expires)
                .unwrap_or(s.register_default_expires_secs);
            if expires > 0 && expires < s.register_min_expires_secs {
                return message::response(
                    req,
                    423,
                    Some(&tag),
                    &[("Min-Expires", s.register_min_expires_secs.to_string())],
                    None,
                );
            }
            let instance = typed.param("+sip.instance").map(str::to_owned);
            updates.push((
                typed.uri.to_string(),
                instance,
                expires.min(s.register_max_expires_secs),
            ));
        }
        {
            let mut state = self.lock();
            for (contact, instance, expires) in &updates {
                let update = ContactUpdate {
                    contact,
                    instance: instance.as_deref(),
                    expires_secs: *expires,
                };
                match state.registrar.update(
                    &aor,
                    &update,
                    flow,
                    &req.call_id,
                    req.cseq,
                    user_agent,
                    now,
                ) {
                    Ok(Some(change)) => changes.push(change),
                    Ok(None) => {}
                    Err(_) => {
                        return message::response(
                            req,
                            500,
                            Some(&tag),
                            &[("Warning", "399 switchboard \"out of order\"".to_owned())],
                            None,
                        );
                    }
                }
            }
        }
        for change in &changes {
            let result = match change {
                Change::Added(b) => self.binding_started(b).await,
                Change::Removed(b) => self.binding_ended(b, SessionEndReason::Logout).await,
                Change::Refreshed(b) => self.log_refresh(b, now).await,
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "sip registration event not stored");
                // Undo what the client will not hear about.
                let mut state = self.lock();
                for c in &changes {
                    if let Change::Added(b) = c {
                        state.registrar.remove(&b.aor, &b.resource);
                    }
                }
                return message::response(req, 500, Some(&tag), &[], None);
            }
        }
        let bound: Vec<(&str, String)> = {
            let state = self.lock();
            state
                .registrar
                .of(&aor)
                .map(|b| {
                    let left = b.expires_at.saturating_duration_since(now).as_secs();
                    ("Contact", format!("<{}>;expires={left}", b.contact))
                })
                .collect()
        };
        message::response(req, 200, Some(&tag), &bound, None)
    }

    async fn binding_started(&self, b: &super::registrar::Binding) -> Result<(), EmitError> {
        self.events
            .emit(
                &b.aor,
                SessionLoginSucceeded {
                    session_id: b.session_id,
                    user: BareJid::new(b.aor.clone()),
                    protocol: Protocol::Sip,
                    remote_addr: b.flow.peer.to_string(),
                    mechanism: AuthMechanism::Digest,
                },
            )
            .await?;
        self.announce(b, None).await
    }

    /// `session.resource_bound` for a binding and its `presence.device`
    /// (what its publications last said, else available): at a new
    /// binding, at a refresh the log must cover (see [`super::restore`]),
    /// and for a binding rebuilt after a restart.
    async fn announce(
        &self,
        b: &super::registrar::Binding,
        state: Option<&pidf::DeviceState>,
    ) -> Result<(), EmitError> {
        let full = FullJid::new(b.full_jid());
        self.events
            .emit(
                &b.aor,
                SessionResourceBound {
                    session_id: b.session_id,
                    full_jid: full.clone(),
                    protocol: Protocol::Sip,
                    contact: Some(b.contact.clone()),
                    priority: 0,
                    client: ClientInfo {
                        user_agent: b.user_agent.clone(),
                        ..ClientInfo::default()
                    },
                },
            )
            .await?;
        let available = state.is_none_or(|s| s.available);
        self.device(&b.aor, &b.full_jid(), available, state).await
    }

    /// A refresh is logged again (the same session's
    /// `session.resource_bound`, then its device presence) once the binding
    /// would outlive `logged_at + register_max_expires_secs`, the expiry a
    /// restart rebuilds it with (see [`super::restore`]).
    async fn log_refresh(
        &self,
        b: &super::registrar::Binding,
        now: Instant,
    ) -> Result<(), EmitError> {
        let max = Duration::from_secs(u64::from(self.settings.register_max_expires_secs));
        if b.expires_at <= b.logged_at + max {
            return Ok(());
        }
        self.announce(b, b.device_state.as_ref()).await?;
        if let Some(bound) = self.lock().registrar.by_full_jid_mut(&b.full_jid()) {
            bound.logged_at = now;
        }
        Ok(())
    }

    /// Rebuilds this node's registrations from the log (`sessions`, then
    /// `presence`, read to their ends; see [`super::restore`]) and announces
    /// each as a new device session. Returns their session ids.
    pub async fn restore(
        &self,
        bus: &Arc<dyn Bus>,
        sessions: &str,
        presence: &str,
        node: &str,
    ) -> Result<Vec<Uuid>, BusError> {
        let mut fold = super::restore::Fold::new(node);
        for topic in [sessions, presence] {
            read_to_end(bus, topic, |envelope| fold.apply(envelope)).await?;
        }
        let now = Instant::now();
        let mut restored = Vec::new();
        {
            let mut state = self.lock();
            for (logged, left, flow) in
                fold.live(chrono::Utc::now(), self.settings.register_max_expires_secs)
            {
                let binding = super::registrar::Binding {
                    aor: logged.aor,
                    resource: logged.resource,
                    contact: logged.contact,
                    session_id: Uuid::now_v7(),
                    expires_at: now + Duration::from_secs(left),
                    flow,
                    // Any REGISTER of the device refreshes it (§10.3 step 7).
                    call_id: String::new(),
                    cseq: 0,
                    user_agent: logged.user_agent,
                    logged_at: now,
                    device_state: logged.state,
                };
                if state.registrar.restore(binding.clone()) {
                    restored.push(binding);
                }
            }
        }
        for b in &restored {
            if let Err(e) = self.announce(b, b.device_state.as_ref()).await {
                tracing::error!(error = %e, device = %b.full_jid(), "rebuilt sip registration not announced");
                self.lock().registrar.remove(&b.aor, &b.resource);
            }
        }
        Ok(restored.iter().map(|b| b.session_id).collect())
    }

    /// Folds a `roster` event into the block lists; a block ends the
    /// presence subscriptions it now refuses with a final NOTIFY
    /// `terminated;reason=rejected` (RFC 6665 §4.2.2: the subscription ended
    /// through a change in authorization policy).
    pub async fn policy_event(&self, event: &Event) {
        let rejected: Vec<Subscription> = {
            let mut state = self.lock();
            let Applied::Tightened(user) = state.policies.apply(event) else {
                return;
            };
            let keys: Vec<String> = state
                .subscriptions
                .watchers_of(&user)
                .into_iter()
                .filter(|s| state.policies.blocks(&user, &s.watcher))
                .map(|s| s.key.clone())
                .collect();
            keys.iter()
                .filter_map(|k| state.subscriptions.remove(k))
                .collect()
        };
        for sub in rejected {
            tracing::info!(watcher = %sub.watcher, presentity = %sub.presentity, "sip subscription rejected by a block");
            self.final_notify(sub, "rejected").await;
        }
    }

    /// The device presence of rebuilt bindings, again. A rebind of an
    /// address the router already knew starts unavailable, and a router
    /// rebuilding its table at the same start may read the `presence`
    /// record before the `sessions` one; the repeat, once that rebuild is
    /// over, makes the device available there (and releases what was
    /// stored for it meanwhile).
    pub async fn reannounce(&self, sessions: &[Uuid]) {
        let bindings: Vec<_> = {
            let state = self.lock();
            sessions
                .iter()
                .filter_map(|id| state.registrar.by_session(*id).cloned())
                .collect()
        };
        for b in bindings {
            let state = b.device_state.as_ref();
            let available = state.is_none_or(|s| s.available);
            if let Err(e) = self.device(&b.aor, &b.full_jid(), available, state).await {
                tracing::error!(error = %e, device = %b.full_jid(), "rebuilt sip registration not re-announced");
            }
        }
    }

    async fn binding_ended(
        &self,
        b: &super::registrar::Binding,
        reason: SessionEndReason,
    ) -> Result<(), EmitError> {
        self.device(&b.aor, &b.full_jid(), false, None).await?;
        self.events
            .emit(
                &b.aor,
                SessionEnded {
                    session_id: b.session_id,
                    user: BareJid::new(b.aor.clone()),
                    full_jid: Some(FullJid::new(b.full_jid())),
                    protocol: Protocol::Sip,
                    reason,
                    text: None,
                },
            )
            .await?;
        Ok(())
    }

    /// `presence.device` for a SIP device. The device is named by its full
    /// address (the registration's session), so the router sees the session
    /// become available.
    async fn device(
        &self,
        aor: &str,
        device: &str,
        available: bool,
        state: Option<&pidf::DeviceState>,
    ) -> Result<(), EmitError> {
        self.events
            .emit(
                aor,
                DevicePresence {
                    user: BareJid::new(aor),
                    device: device.to_owned(),
                    protocol: Protocol::Sip,
                    available,
                    show: state.and_then(|s| s.show.clone()),
                    status: state.and_then(|s| s.status.clone()),
                    priority: 0,
                },
            )
            .await?;
        Ok(())
    }

    /// RFC 3428: MESSAGE in, accepted (202) once `message.submitted` is
    /// durable; the router delivers it.
    async fn message(&self, req: &Request, flow: &Flow) -> Vec<u8> {
        let tag = random_token();
        let Some(sender) = self.sender_of(req) else {
            return message::response(req, 403, Some(&tag), &[], None);
        };
        match self.authenticate(req, flow, &sender).await {
            Authenticated::Answered(r) => return r,
            Authenticated::User => {}
        }
        if req.content_type().is_some_and(|t| t != "text/plain") {
            return message::response(
                req,
                415,
                Some(&tag),
                &[("Accept", "text/plain".to_owned())],
                None,
            );
        }
        let Ok(body) = String::from_utf8(req.body.clone()) else {
            return message::response(req, 400, Some(&tag), &[], None);
        };
        let Some(to) = message::uri_address(&req.uri).map(|a| a.to_lowercase()) else {
            return message::response(req, 404, Some(&tag), &[], None);
        };
        let from = {
            let state = self.lock();
            let mine: Vec<_> = state.registrar.of(&sender).collect();
            mine.iter()
                .find(|b| b.flow.peer == flow.peer)
                .or(mine.first())
                .map(|b| b.full_jid())
                .unwrap_or_else(|| format!("{sender}/sip"))
        };
        // RFC 3428 has no message id: the transaction's identity is stable
        // across retransmissions and resubmission of the same request.
        let id = format!(
            "sip-{}",
            short_hash(&format!(
                "{}\n{}\n{}",
                req.call_id,
                req.cseq,
                req.from.tag.as_deref().unwrap_or("")
            ))
        );
        let stanza = format!(
            "<message xmlns=\"jabber:client\" from=\"{}\" to=\"{}\" id=\"{id}\" type=\"chat\"><body>{}</body></message>",
            pidf::escape(&from),
            pidf::escape(&to),
            pidf::escape(&body)
        );
        let event = MessageSubmitted {
            message_id: id,
            from: FullJid::new(from),
            to,
            kind: MessageKind::Chat,
            body: Some(body),
            thread: None,
            subject: None,
            stanza,
        };
        match self.events.emit(&sender, event).await {
            Ok(_) => message::response(req, 202, Some(&tag), &[], None),
            Err(e) => {
                tracing::error!(error = %e, "sip message not stored");
                message::response(req, 500, Some(&tag), &[], None)
            }
        }
    }

    /// RFC 3903 §6: PUBLISH of presence (PIDF) by the user for themself.
    async fn publish(&self, req: &Request, flow: &Flow) -> Vec<u8> {
        let tag = random_token();
        let Some(user) = self.sender_of(req) else {
            return message::response(req, 403, Some(&tag), &[], None);
        };
        match self.authenticate(req, flow, &user).await {
            Authenticated::Answered(r) => return r,
            Authenticated::User => {}
        }
        if req.event().as_deref() != Some("presence") {
            return message::response(
                req,
                489,
                Some(&tag),
                &[("Allow-Events", "presence".to_owned())],
                None,
            );
        }
        if message::uri_address(&req.uri)
            .map(|a| a.to_lowercase())
            .as_deref()
            != Some(user.as_str())
        {
            return message::response(
                req,
                403,
                Some(&tag),
                &[(
                    "Warning",
                    "399 switchboard \"only your own presence can be published\"".to_owned(),
                )],
                None,
            );
        }
        let doc = if req.body.is_empty() {
            None
        } else {
            if req.content_type().as_deref() != Some("application/pidf+xml") {
                return message::response(
                    req,
                    415,
                    Some(&tag),
                    &[("Accept", "application/pidf+xml".to_owned())],
                    None,
                );
            }
            match pidf::parse(&req.body) {
                Ok(d) => Some(d),
                Err(e) => {
                    return message::response(
                        req,
                        400,
                        Some(&tag),
                        &[("Warning", format!("399 switchboard \"{e}\""))],
                        None,
                    );
                }
            }
        };
        let expires = req
            .expires()
            .unwrap_or(self.settings.publish_default_expires_secs)
            .min(self.settings.register_max_expires_secs);
        let if_match = req.header("SIP-If-Match").map(str::trim).map(str::to_owned);
        let now = Instant::now();
        let device_id = {
            let state = self.lock();
            let mine: Vec<_> = state.registrar.of(&user).collect();
            mine.iter()
                .find(|b| b.flow.peer == flow.peer)
                .map(|b| b.full_jid())
                .unwrap_or_else(|| {
                    format!(
                        "{user}/{}",
                        super::registrar::resource_for(&format!("publisher {}", flow.peer), None)
                    )
                })
        };
        let line_of = |d: &pidf::Pidf| {
            d.tuples
                .iter()
                .find_map(|t| t.contact.clone().or_else(|| Some(t.id.clone())))
                .filter(|l| !l.is_empty())
                .unwrap_or_else(|| "default".to_owned())
        };
        let target_of = |d: &pidf::Pidf, old: Option<&Target>| {
            if d.on_the_phone() {
                Target::Line(line_of(d))
            } else {
                match old {
                    Some(Target::Line(l)) => Target::Line(l.clone()),
                    _ => Target::Device(device_id.clone()),
                }
            }
        };
        let unknown = || message::response(req, 412, Some(&tag), &[], None);
        let outcome = match (&if_match, &doc) {
            (None, None) => {
                return message::response(
                    req,
                    400,
                    Some(&tag),
                    &[(
                        "Warning",
                        "399 switchboard \"an initial publication needs a body\"".to_owned(),
                    )],
                    None,
                );
            }
            (None, Some(d)) if expires > 0 => {
                let p = self
                    .lock()
                    .publications
                    .create(&user, target_of(d, None), expires, now);
                Published::Changed(p.etag, p.target, d.clone())
            }
            (None, Some(_)) => return message::response(req, 400, Some(&tag), &[], None),
            (Some(etag), _) if expires == 0 => match self.lock().publications.remove(&user, etag) {
                Ok(p) => Published::Removed(p.target),
                Err(_) => return unknown(),
            },
            (Some(etag), None) => {
                match self
                    .lock()
                    .publications
                    .update(&user, etag, None, expires, now)
                {
                    Ok((_, p)) => Published::Refreshed(p.etag),
                    Err(_) => return unknown(),
                }
            }
            (Some(etag), Some(d)) => {
                let mut state = self.lock();
                let old = match state.publications.get(&user, etag) {
                    Some(p) => p.target.clone(),
                    None => return unknown(),
                };
                match state.publications.update(
                    &user,
                    etag,
                    Some(target_of(d, Some(&old))),
                    expires,
                    now,
                ) {
                    Ok((_, p)) => Published::Changed(p.etag, p.target, d.clone()),
                    Err(_) => return unknown(),
                }
            }
        };
        let result = match &outcome {
            Published::Changed(_, target, d) => self.published(&user, target, Some(d)).await,
            Published::Removed(target) => self.published(&user, target, None).await,
            Published::Refreshed(_) => Ok(()),
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "sip publication not stored");
            return message::response(req, 500, Some(&tag), &[], None);
        }
        match outcome {
            Published::Changed(etag, ..) | Published::Refreshed(etag) => message::response(
                req,
                200,
                Some(&tag),
                &[("SIP-ETag", etag), ("Expires", expires.to_string())],
                None,
            ),
            Published::Removed(_) => {
                message::response(req, 200, Some(&tag), &[("Expires", "0".to_owned())], None)
            }
        }
    }

    /// The events of a publication's new state (None: it was removed or
    /// lapsed): device presence, or line state (SPEC.md §5).
    async fn published(
        &self,
        user: &str,
        target: &Target,
        doc: Option<&pidf::Pidf>,
    ) -> Result<(), EmitError> {
        match target {
            Target::Line(line) => {
                let state = if doc.is_some_and(pidf::Pidf::on_the_phone) {
                    LineState::OffHook
                } else {
                    LineState::OnHook
                };
                self.events
                    .emit(
                        user,
                        PhoneLineState {
                            user: BareJid::new(user),
                            line_id: line.clone(),
                            state,
                        },
                    )
                    .await?;
                Ok(())
            }
            Target::Device(device) => match doc {
                Some(d) => {
                    let state = d.device_state();
                    if let Some(b) = self.lock().registrar.by_full_jid_mut(device) {
                        b.device_state = Some(state.clone());
                    }
                    self.device(user, device, state.available, Some(&state))
                        .await
                }
                None => {
                    // Back to what the registration alone says.
                    let registered = match self.lock().registrar.by_full_jid_mut(device) {
                        Some(b) => {
                            b.device_state = None;
                            true
                        }
                        None => false,
                    };
                    self.device(user, device, registered, None).await
                }
            },
        }
    }

    /// RFC 6665 §4.2 and RFC 3856: SUBSCRIBE to `presence`.
    async fn subscribe(&self, req: &Request, flow: &Flow) -> Reply {
        let tag = random_token();
        let event = match req.event().as_deref() {
            Some(subscribe::PRESENCE) => subscribe::PRESENCE,
            Some(subscribe::WINFO) => subscribe::WINFO,
            _ => {
                return message::response(
                    req,
                    489,
                    Some(&tag),
                    &[("Allow-Events", ALLOW_EVENTS.to_owned())],
                    None,
                )
                .into();
            }
        };
        let Some(watcher) = self.sender_of(req) else {
            return message::response(req, 403, Some(&tag), &[], None).into();
        };
        match self.authenticate(req, flow, &watcher).await {
            Authenticated::Answered(r) => return r.into(),
            Authenticated::User => {}
        }
        let max = self.settings.subscribe_max_expires_secs;
        let expires = req.expires().unwrap_or(max).min(max);
        let now = Instant::now();
        let remote_tag = req.from.tag.clone().unwrap_or_default();
        let contact_header = self.contact(flow.transport);
        if let Some(local_tag) = &req.to.tag {
            // A refresh or an unsubscribe within the dialog (RFC 6665 §4.2.1.2).
            let key = dialog_key(&req.call_id, &remote_tag, local_tag);
            let mut state = self.lock();
            // The Request-URI is our Contact there, not the presentity: the
            // dialog names the subscription, and only its watcher may use it.
            if !state
                .subscriptions
                .get(&key)
                .is_some_and(|s| s.watcher == watcher && s.event == event)
            {
                return message::response(req, 481, None, &[], None).into();
            }
            let ok = message::response(
                req,
                200,
                None,
                &[
                    ("Expires", expires.to_string()),
                    ("Contact", contact_header),
                ],
                None,
            );
            if expires == 0 {
                let sub = state.subscriptions.remove(&key).expect("checked above");
                return Reply {
                    bytes: ok,
                    after: After::FinalNotify(Box::new(sub)),
                };
            }
            if let Some(sub) = state.subscriptions.get_mut(&key) {
                sub.expires_at = now + Duration::from_secs(u64::from(expires));
                sub.flow = flow.clone();
            }
            return Reply {
                bytes: ok,
                after: After::Notify(key),
            };
        }
        let Some(presentity) = message::uri_address(&req.uri).map(|a| a.to_lowercase()) else {
            return message::response(req, 404, Some(&tag), &[], None).into();
        };
        // RFC 3857 §5.1: watcher information is for the presentity only.
        if event == subscribe::WINFO && presentity != watcher {
            return message::response(
                req,
                403,
                Some(&tag),
                &[(
                    "Warning",
                    "399 switchboard \"only your own watchers can be watched\"".to_owned(),
                )],
                None,
            )
            .into();
        }
        if self.directory.read().await.get(&presentity).is_none() {
            return message::response(req, 404, Some(&tag), &[], None).into();
        }
        // SPEC.md §5: auto-authorized unless blocked; RFC 6665 §4.2.1.1 and
        // RFC 3856 §6.6: an unauthorized subscriber gets 403.
        if event == subscribe::PRESENCE && self.lock().policies.blocks(&presentity, &watcher) {
            return message::response(
                req,
                403,
                Some(&tag),
                &[(
                    "Warning",
                    "399 switchboard \"not authorized to watch this presentity\"".to_owned(),
                )],
                None,
            )
            .into();
        }
        let Some(target) = req
            .header_list("Contact")
            .first()
            .and_then(|c| message::parse_contact(c))
            .map(|c| c.uri.to_string())
        else {
            return message::response(
                req,
                400,
                Some(&tag),
                &[("Warning", "399 switchboard \"contact required\"".to_owned())],
                None,
            )
            .into();
        };
        let key = dialog_key(&req.call_id, &remote_tag, &tag);
        let sub = Subscription {
            key: key.clone(),
            event: event.to_owned(),
            watcher,
            presentity,
            remote_target: target,
            call_id: req.call_id.clone(),
            remote: req.from.raw.clone(),
            local: format!("{};tag={tag}", req.to.raw),
            local_cseq: 0,
            flow: flow.clone(),
            expires_at: now + Duration::from_secs(u64::from(expires)),
            last_notify: None,
            pending: false,
        };
        let ok = message::response(
            req,
            200,
            Some(&tag),
            &[
                ("Expires", expires.to_string()),
                ("Contact", contact_header),
            ],
            None,
        );
        if expires == 0 {
            // A fetch: one NOTIFY with the state, then the end (RFC 6665 §4.4.3).
            return Reply {
                bytes: ok,
                after: After::FinalNotify(Box::new(sub)),
            };
        }
        self.lock().subscriptions.insert(sub);
        Reply {
            bytes: ok,
            after: After::Notify(key),
        }
    }

    /// Builds a NOTIFY in a subscription's dialog (RFC 6665 §4.2.2, RFC 3856
    /// §6.7: PIDF body).
    async fn notify_request(
        &self,
        sub: &Subscription,
        cseq: u32,
        state: &str,
    ) -> (String, Vec<u8>) {
        let resource = format!("sip:{}", sub.presentity);
        let (content_type, body) = if sub.event == subscribe::WINFO {
            // RFC 3858 §4: the version counts the documents of this
            // subscription from 0.
            let state = self.lock();
            let watchers = state.subscriptions.watchers_of(&sub.presentity);
            (
                "application/watcherinfo+xml",
                subscribe::watcherinfo(&resource, cseq.saturating_sub(1), &watchers),
            )
        } else {
            let presence = self.presence.read().await;
            (
                "application/pidf+xml",
                pidf::render(&resource, presence.get(&sub.presentity)),
            )
        };
        let branch = format!("z9hG4bK{}", random_token());
        let transport = sub.flow.transport;
        let head = format!(
            "NOTIFY {target} SIP/2.0\r\nVia: SIP/2.0/{t} {host};branch={branch};rport\r\nMax-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\nCSeq: {cseq} NOTIFY\r\nContact: {contact}\r\nEvent: {event}\r\nSubscription-State: {state}\r\nServer: switchboard\r\n",
            event = sub.event,
            target = sub.remote_target,
            t = transport.token(),
            host = self.local_host(transport),
            from = sub.local,
            to = sub.remote,
            call_id = sub.call_id,
            contact = self.contact(transport),
        );
        let bytes = message::finish(head, Some((content_type, body.as_bytes())));
        (branch, bytes)
    }

    /// Sends a NOTIFY with the current state on a live subscription.
    async fn notify(&self, key: &str, now: Instant) {
        let (sub, cseq) = {
            let mut state = self.lock();
            let Some(cseq) = state.subscriptions.notified(key, now) else {
                return;
            };
            let Some(sub) = state.subscriptions.get(key) else {
                return;
            };
            (sub.clone(), cseq)
        };
        let left = sub
            .expires_at
            .saturating_duration_since(now)
            .as_secs()
            .max(1);
        let (branch, bytes) = self
            .notify_request(&sub, cseq, &format!("active;expires={left}"))
            .await;
        self.send_request(
            &target_flow(&sub.remote_target, &sub.flow),
            branch,
            bytes,
            Some(sub.key.clone()),
        )
        .await;
    }

    /// The final NOTIFY of a subscription (RFC 6665 §4.2.2,
    /// `Subscription-State: terminated;reason=...`).
    async fn final_notify(&self, sub: Subscription, reason: &str) {
        let cseq = sub.local_cseq + 1;
        let (branch, bytes) = self
            .notify_request(&sub, cseq, &format!("terminated;reason={reason}"))
            .await;
        self.send_request(
            &target_flow(&sub.remote_target, &sub.flow),
            branch,
            bytes,
            None,
        )
        .await;
    }

    /// A response to a request this node sent: stops retransmission; a
    /// NOTIFY answered 481 (or any failure but 401/407) ends its
    /// subscription (RFC 6665 §4.2.2).
    async fn response(&self, resp: &Response) {
        let Some(branch) = &resp.branch else {
            return;
        };
        if resp.code < 200 {
            if let Some(o) = self.lock().outgoing.get_mut(branch) {
                // RFC 3261 §17.1.2.2: after a provisional response, T2.
                o.interval = T2;
            }
            return;
        }
        let outgoing = self.lock().outgoing.remove(branch);
        if let Some(Outgoing {
            dialog: Some(key), ..
        }) = outgoing
            && resp.code >= 300
            && !matches!(resp.code, 401 | 407)
        {
            self.lock().subscriptions.remove(&key);
        }
    }

    /// Timers: transactions (Timer J), outgoing retransmissions (Timers E
    /// and F), lapsed bindings, publications and subscriptions, and
    /// rate-limited NOTIFYs.
    pub async fn tick(&self, now: Instant) {
        let min_interval = Duration::from_secs(self.settings.notify_min_interval_secs);
        let (resend, timed_out, bindings, publications, subscriptions, due) = {
            let mut state = self.lock();
            state.transactions.expire(now);
            let mut resend = Vec::new();
            let mut timed_out = Vec::new();
            state.outgoing.retain(|_, o| {
                if now >= o.give_up {
                    if let Some(d) = &o.dialog {
                        timed_out.push(d.clone());
                    }
                    return false;
                }
                if now >= o.next {
                    resend.push((o.flow.clone(), o.bytes.clone()));
                    o.interval = (o.interval * 2).min(T2);
                    o.next = now + o.interval;
                }
                true
            });
            for key in &timed_out {
                state.subscriptions.remove(key);
            }
            (
                resend,
                timed_out,
                state.registrar.expire(now),
                state.publications.expire(now),
                state.subscriptions.expire(now),
                state.subscriptions.due(now, min_interval),
            )
        };
        let _ = timed_out;
        for (flow, bytes) in resend {
            self.send(&flow, bytes).await;
        }
        for b in bindings {
            if let Err(e) = self.binding_ended(&b, SessionEndReason::Timeout).await {
                tracing::error!(error = %e, "sip registration expiry not stored");
            }
        }
        for p in publications {
            if let Err(e) = self.published(&p.aor, &p.target, None).await {
                tracing::error!(error = %e, "sip publication expiry not stored");
            }
        }
        for s in subscriptions {
            self.final_notify(s, "timeout").await;
        }
        for key in due {
            self.notify(&key, now).await;
        }
    }

    /// RFC 7572 §5: a delivered XMPP `<message>` becomes a SIP MESSAGE to
    /// the device's registered contact.
    pub async fn deliver(&self, session: Uuid, stanza: &str) -> bool {
        let Some(binding) = self.lock().registrar.by_session(session).cloned() else {
            return false;
        };
        let Some(parsed) = parse_message_stanza(stanza) else {
            return true;
        };
        // RFC 7572 §5: chat and normal messages become MESSAGE requests.
        // An error (a bounce of something this device sent) has no SIP form:
        // its MESSAGE was answered long ago; group chat is not for SIP
        // clients (SPEC.md §5); headlines are sent like normal messages.
        if matches!(parsed.kind.as_str(), "error" | "groupchat") {
            tracing::debug!(kind = %parsed.kind, "message type not sent to a sip device");
            return true;
        }
        let Some(body) = parsed.body else {
            // Chat states and receipts have no SIP form.
            return true;
        };
        let from_bare = parsed.from.split('/').next().unwrap_or("").to_owned();
        let transport = binding.flow.transport;
        let branch = format!("z9hG4bK{}", random_token());
        let call_id = format!("{}@{}", random_token(), self.local_host(transport));
        let head = format!(
            "MESSAGE {target} SIP/2.0\r\nVia: SIP/2.0/{t} {host};branch={branch};rport\r\nMax-Forwards: 70\r\nFrom: <sip:{from}>;tag={tag}\r\nTo: <sip:{to}>\r\nCall-ID: {call_id}\r\nCSeq: 1 MESSAGE\r\nServer: switchboard\r\n",
            target = binding.contact,
            t = transport.token(),
            host = self.local_host(transport),
            from = from_bare,
            tag = random_token(),
            to = binding.aor,
            call_id = call_id,
        );
        let bytes = message::finish(head, Some(("text/plain;charset=UTF-8", body.as_bytes())));
        self.send_request(
            &target_flow(&binding.contact, &binding.flow),
            branch,
            bytes,
            None,
        )
        .await;
        true
    }

    /// Applies a `presence_state` record; watchers of a changed user get a
    /// NOTIFY as the rate limit allows.
    pub async fn presence_changed(&self, key: &[u8], value: Option<&[u8]>) {
        let changed = self.presence.write().await.apply(key, value);
        if let Some(user) = changed {
            self.lock().subscriptions.changed(&user);
        }
    }
}

/// Where a request to a remote target goes (RFC 3261 §8.1.2, §18.1.1):
/// over TCP and TLS the connection the client opened (servers do not
/// connect to clients here); over UDP the target URI's address when it is
/// an IP literal, else the address the client's requests came from.
fn target_flow(target: &str, flow: &Flow) -> Flow {
    if flow.transport != Transport::Udp {
        return flow.clone();
    }
    let Ok(uri) = rsip::Uri::try_from(target) else {
        return flow.clone();
    };
    let rsip::Host::IpAddr(ip) = uri.host_with_port.host else {
        return flow.clone();
    };
    let port = uri.host_with_port.port.map(|p| *p.value()).unwrap_or(5060);
    Flow {
        transport: Transport::Udp,
        peer: SocketAddr::new(ip, port),
        conn: 0,
    }
}

enum Published {
    Changed(String, Target, pidf::Pidf),
    Refreshed(String),
    Removed(Target),
}

/// The parts of a `<message/>` stanza a SIP MESSAGE carries.
struct MessageStanza {
    from: String,
    /// The `type` attribute (RFC 6121 §5.2.2), `normal` when absent.
    kind: String,
    body: Option<String>,
}

fn parse_message_stanza(stanza: &str) -> Option<MessageStanza> {
    use quick_xml::events::Event as X;
    let mut reader = quick_xml::reader::Reader::from_str(stanza);
    let mut from = None;
    let mut kind = "normal".to_owned();
    let mut body: Option<String> = None;
    let mut depth = 0usize;
    let mut in_body = false;
    loop {
        match reader.read_event().ok()? {
            X::Start(e) => {
                depth += 1;
                if depth == 1 {
                    if e.local_name().as_ref() != b"message" {
                        return None;
                    }
                    for a in e.attributes().flatten() {
                        match a.key.as_ref() {
                            b"from" => from = Some(a.unescape_value().ok()?.into_owned()),
                            b"type" => kind = a.unescape_value().ok()?.into_owned(),
                            _ => {}
                        }
                    }
                } else if depth == 2 && e.local_name().as_ref() == b"body" && body.is_none() {
                    in_body = true;
                    body = Some(String::new());
                }
                if depth > 32 {
                    return None;
                }
            }
            X::End(_) => {
                depth = depth.saturating_sub(1);
                in_body = false;
            }
            X::Text(t) if in_body => {
                body.as_mut()?.push_str(std::str::from_utf8(&t).ok()?);
            }
            X::GeneralRef(r) if in_body => {
                let c = match std::str::from_utf8(&r).ok()? {
                    "amp" => '&',
                    "lt" => '<',
                    "gt" => '>',
                    "quot" => '"',
                    "apos" => '\'',
                    other => {
                        let n = other
                            .strip_prefix("#x")
                            .and_then(|h| u32::from_str_radix(h, 16).ok())
                            .or_else(|| other.strip_prefix('#').and_then(|d| d.parse().ok()))?;
                        char::from_u32(n)?
                    }
                };
                body.as_mut()?.push(c);
            }
            X::Eof => break,
            _ => {}
        }
    }
    Some(MessageStanza {
        from: from?,
        kind,
        body,
    })
}

/// Runs the timers every 200 ms until `shutdown`.
pub async fn timers(ctx: Arc<SipContext>, mut shutdown: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => ctx.tick(Instant::now()).await,
            _ = shutdown.changed() => return,
        }
    }
}

/// Reads every record of `topic` from its start to the end it has now (a
/// group of its own), handing each event to `apply` in partition order.
async fn read_to_end(
    bus: &Arc<dyn Bus>,
    topic: &str,
    mut apply: impl FnMut(&Envelope),
) -> Result<(), BusError> {
    let ends = bus.end_offsets(topic).await?;
    if ends.iter().all(|e| *e <= 0) {
        return Ok(());
    }
    let mut positions = vec![0i64; ends.len()];
    let mut consumer = bus
        .consumer(ConsumerConfig::new(
            format!("switchboard-sip-restore-{}", Uuid::now_v7().simple()),
            &[topic],
        ))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while positions.iter().zip(&ends).any(|(p, e)| p < e) {
        if Instant::now() > deadline {
            tracing::warn!(
                topic,
                "sip restore: the topic was not read to its end in 120 s"
            );
            break;
        }
        if let Polled::Records(records) = consumer.poll(Duration::from_millis(200)).await? {
            for r in records {
                if let Some(p) = positions.get_mut(r.partition as usize) {
                    *p = (*p).max(r.offset + 1);
                }
                if let Some(Ok(envelope)) = r.value.as_deref().map(Envelope::from_json_slice) {
                    apply(&envelope);
                }
            }
        }
    }
    let _ = consumer.close().await;
    Ok(())
}

/// Follows the `roster` topic from its start (a group of its own) for the
/// users' block lists (see [`super::blocks`]); other roster events are
/// skipped before decoding.
pub async fn follow_policies(
    bus: Arc<dyn Bus>,
    topic: String,
    ctx: Arc<SipContext>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BusError> {
    const POLICY_TYPES: [&[u8]; 5] = [
        b"\"roster.blocked\"",
        b"\"roster.unblocked\"",
        b"\"roster.allowed\"",
        b"\"roster.disallowed\"",
        b"\"roster.policy_set\"",
    ];
    let mut consumer = bus
        .consumer(ConsumerConfig::new(
            format!("switchboard-sip-policies-{}", Uuid::now_v7().simple()),
            &[&topic],
        ))
        .await?;
    loop {
        let polled = tokio::select! {
            p = consumer.poll(Duration::from_millis(500)) => p,
            _ = shutdown.changed() => break,
        };
        match polled {
            Ok(Polled::Records(records)) => {
                for r in records {
                    let Some(value) = r.value.as_deref() else {
                        continue;
                    };
                    if !POLICY_TYPES
                        .iter()
                        .any(|t| value.windows(t.len()).any(|w| w == *t))
                    {
                        continue;
                    }
                    if let Ok(envelope) = Envelope::from_json_slice(value) {
                        ctx.policy_event(&envelope.event).await;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "following the block lists");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let _ = consumer.close().await;
    Ok(())
}

/// Follows the compacted `presence_state` topic from its start (a group of
/// its own): the composed presence NOTIFYs carry.
pub async fn follow_presence(
    bus: Arc<dyn Bus>,
    topic: String,
    ctx: Arc<SipContext>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BusError> {
    let mut consumer = bus
        .consumer(ConsumerConfig::new(
            format!("switchboard-sip-presence-{}", Uuid::now_v7().simple()),
            &[&topic],
        ))
        .await?;
    loop {
        let polled = tokio::select! {
            p = consumer.poll(Duration::from_millis(500)) => p,
            _ = shutdown.changed() => break,
        };
        match polled {
            Ok(Polled::Records(records)) => {
                for r in records {
                    ctx.presence_changed(&r.key, r.value.as_deref()).await;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "following presence_state");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let _ = consumer.close().await;
    Ok(())
}

/// Reads this node's deliveries (from the end, a group of its own) and
/// sends those for SIP sessions (`protocol` sip) as SIP MESSAGEs; a chat or
/// normal message for a registration that has ended goes back to the router
/// as `message.undelivered` (reason `session_gone`).
pub async fn deliveries(
    bus: Arc<dyn Bus>,
    topic: String,
    node: String,
    ctx: Arc<SipContext>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BusError> {
    let mut consumer = bus
        .consumer(ConsumerConfig {
            start: StartFrom::Latest,
            ..ConsumerConfig::new(
                format!("switchboard-sip-{node}-{}", Uuid::now_v7().simple()),
                &[&topic],
            )
        })
        .await?;
    loop {
        let polled = tokio::select! {
            p = consumer.poll(Duration::from_millis(500)) => p?,
            _ = shutdown.changed() => break,
        };
        let Polled::Records(records) = polled else {
            continue;
        };
        for r in records.iter().filter(|r| r.key.as_ref() == node.as_bytes()) {
            let Some(Ok(envelope)) = r.value.as_deref().map(Envelope::from_json_slice) else {
                continue;
            };
            let Event::StanzaDelivery(d) = envelope.event else {
                continue;
            };
            // Deliveries to this node's XMPP sessions are the XMPP gateway's.
            if d.protocol != Protocol::Sip {
                continue;
            }
            if ctx.deliver(d.session_id, &d.stanza).await {
                continue;
            }
            // The registration ended after the router chose it: a chat or
            // normal message (those name their sender) goes back to the
            // recipient's router, which routes it again or stores it.
            let (Some(from), Some(message_id)) = (d.sender, d.message_id) else {
                tracing::debug!(to = %d.to, "delivery to a gone sip session dropped");
                continue;
            };
            let bare =
                d.to.split_once('/')
                    .map_or(d.to.as_str(), |(b, _)| b)
                    .to_owned();
            let undelivered = MessageUndelivered {
                message_id,
                from,
                to: d.to,
                reason: UndeliveredReason::SessionGone,
                session_id: Some(d.session_id),
                stanza: d.stanza,
            };
            if let Err(e) = ctx.events.emit(&bare, undelivered).await {
                tracing::error!(error = %e, "undelivered sip message not handed back");
            }
        }
    }
    let _ = consumer.close().await;
    Ok(())
}

/// The bus side of the SIP gateway.
pub struct BusTopics {
    /// The bus.
    pub bus: Arc<dyn Bus>,
    /// The full name of the `deliveries` topic.
    pub deliveries: String,
    /// The full name of the `presence_state` topic.
    pub presence_state: String,
    /// The full name of the `sessions` topic (registrations rebuilt at start).
    pub sessions: String,
    /// The full name of the `presence` topic (their published states).
    pub presence: String,
    /// The full name of the `roster` topic (the users' block lists).
    pub roster: String,
    /// This node's id (the deliveries key).
    pub node: String,
}

/// Socket buffers of the UDP listener: at thousands of requests per second
/// the Linux default (208 KiB) overflows during a burst, and each dropped
/// request costs its client a retransmission (RFC 3261 §17.1.2.2: 500 ms,
/// then doubling). The kernel caps the size at `net.core.rmem_max` /
/// `wmem_max`.
const UDP_BUFFER_BYTES: usize = 4 << 20;

/// The UDP listener, with [`UDP_BUFFER_BYTES`] buffers.
fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = socket
        .set_recv_buffer_size(UDP_BUFFER_BYTES)
        .and_then(|()| socket.set_send_buffer_size(UDP_BUFFER_BYTES))
    {
        tracing::warn!(error = %e, "sip udp socket buffers left at the system default");
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

/// Binds the UDP, TCP and TLS listeners of `ctx.settings` and spawns them
/// with the timers, the presence follower and the deliveries reader.
pub async fn spawn(
    ctx: Arc<SipContext>,
    tls: Arc<rustls::ServerConfig>,
    topics: BusTopics,
    shutdown: &watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, std::io::Error> {
    let named = |what: &'static str, addr: SocketAddr| {
        move |e: std::io::Error| {
            std::io::Error::new(
                e.kind(),
                format!("binding the SIP {what} listener to {addr}: {e}"),
            )
        }
    };
    match ctx
        .restore(
            &topics.bus,
            &topics.sessions,
            &topics.presence,
            &topics.node,
        )
        .await
    {
        Ok(restored) => {
            tracing::info!(
                bindings = restored.len(),
                "sip registrations rebuilt from the log"
            );
            if !restored.is_empty() {
                let ctx = ctx.clone();
                let mut shutdown = shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = tokio::time::sleep(REANNOUNCE_AFTER) => ctx.reannounce(&restored).await,
                        _ = shutdown.changed() => {}
                    }
                });
            }
        }
        Err(e) => tracing::error!(error = %e, "sip registrations not rebuilt from the log"),
    }
    let s = &ctx.settings;
    let udp = udp_socket(s.udp_listen).map_err(named("UDP", s.udp_listen))?;
    let tcp = TcpListener::bind(s.tcp_listen)
        .await
        .map_err(named("TCP", s.tcp_listen))?;
    let tls_listener = TcpListener::bind(s.tls_listen)
        .await
        .map_err(named("TLS", s.tls_listen))?;
    tracing::info!(
        udp = %udp.local_addr()?,
        tcp = %tcp.local_addr()?,
        tls = %tls_listener.local_addr()?,
        "SIP listening"
    );
    let mut tasks = vec![
        tokio::spawn(serve_udp(udp, ctx.clone(), shutdown.clone())),
        tokio::spawn(serve_tcp(tcp, None, ctx.clone(), shutdown.clone())),
        tokio::spawn(serve_tcp(
            tls_listener,
            Some(tls),
            ctx.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(timers(ctx.clone(), shutdown.clone())),
    ];
    let presence = follow_presence(
        topics.bus.clone(),
        topics.presence_state,
        ctx.clone(),
        shutdown.clone(),
    );
    tasks.push(tokio::spawn(async move {
        if let Err(e) = presence.await {
            tracing::error!(error = %e, "sip presence follower stopped");
        }
    }));
    let policies = follow_policies(
        topics.bus.clone(),
        topics.roster,
        ctx.clone(),
        shutdown.clone(),
    );
    tasks.push(tokio::spawn(async move {
        if let Err(e) = policies.await {
            tracing::error!(error = %e, "sip block list follower stopped");
        }
    }));
    let deliveries = deliveries(
        topics.bus,
        topics.deliveries,
        topics.node,
        ctx,
        shutdown.clone(),
    );
    tasks.push(tokio::spawn(async move {
        if let Err(e) = deliveries.await {
            tracing::error!(error = %e, "sip deliveries consumer stopped");
        }
    }));
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_requests_go_to_the_target_address() {
        let flow = Flow {
            transport: Transport::Udp,
            peer: "192.0.2.1:5099".parse().unwrap(),
            conn: 0,
        };
        assert_eq!(
            target_flow("sip:bob@127.0.0.1:40915;transport=UDP", &flow).peer,
            "127.0.0.1:40915".parse().unwrap()
        );
        assert_eq!(
            target_flow("sip:bob@10.0.0.7", &flow).peer,
            "10.0.0.7:5060".parse().unwrap()
        );
        assert_eq!(target_flow("sip:bob@phone.example.com", &flow), flow);
        let tcp = Flow {
            transport: Transport::Tcp,
            ..flow
        };
        assert_eq!(target_flow("sip:bob@127.0.0.1:40915", &tcp), tcp);
    }

    #[test]
    fn message_stanzas_become_sip_bodies() {
        let m = parse_message_stanza(
            "<message xmlns='jabber:client' from='alice@example.com/laptop' to='bob@example.com' type='chat'><body>fish &amp; chips &#x263A;</body><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
        )
        .unwrap();
        assert_eq!(m.from, "alice@example.com/laptop");
        assert_eq!(m.kind, "chat");
        assert_eq!(m.body.as_deref(), Some("fish & chips ☺"));
        let bounce = parse_message_stanza(
            "<message from='bob@example.com' type='error'><body>x</body><error type='cancel'/></message>",
        )
        .unwrap();
        assert_eq!(bounce.kind, "error");
        let state = parse_message_stanza(
            "<message from='a@x/y'><composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
        )
        .unwrap();
        assert_eq!(state.body, None);
        assert!(parse_message_stanza("<iq from='a@x/y'/>").is_none());
        assert!(parse_message_stanza("<message><body>no from</body></message>").is_none());
    }

    #[test]
    fn presence_table_follows_the_topic() {
        let mut t = PresenceTable::default();
        let p = ComposedPresence {
            user: BareJid::new("bob@example.com"),
            availability: switchboard_schemas::events::Availability::Away,
            show: None,
            status: None,
            sources: Default::default(),
        };
        let bytes = Envelope::new(
            switchboard_schemas::NodeId::new("n"),
            "bob@example.com",
            p.clone(),
        )
        .to_json_vec()
        .unwrap();
        assert_eq!(
            t.apply(b"bob@example.com", Some(&bytes)).as_deref(),
            Some("bob@example.com")
        );
        assert_eq!(t.get("bob@example.com"), Some(&p));
        // The same state again is no change.
        assert_eq!(t.apply(b"bob@example.com", Some(&bytes)), None);
        assert_eq!(t.apply(b"bob@example.com", Some(b"junk")), None);
        assert_eq!(
            t.apply(b"bob@example.com", None).as_deref(),
            Some("bob@example.com")
        );
        assert!(t.get("bob@example.com").is_none());
    }
}
