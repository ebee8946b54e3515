//! RFC 6120 client-to-server listeners: STARTTLS on 5222 (§5) and direct TLS
//! on 5223 (XEP-0368), stream negotiation in the order TLS, SASL (§6),
//! resource binding (§7), then stanzas (§8).
//!
//! The XML parsing ([`super::stream`]) and SASL ([`crate::sasl`]) are sans-IO;
//! this module owns the sockets and turns what clients do into events.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use switchboard_infra::config::XmppSettings;
use switchboard_schemas::events::{
    AuthMechanism, BlocklistChangeRequested, BlocklistQueried, DevicePresence, DirectedPresence,
    LoginFailureReason, MessageKind, MessageSubmitted, PolicyItem, Protocol, RosterQueried,
    RosterUpdateRequested, ScramMechanism, SessionCarbons, SessionEndReason, SessionEnded,
    SessionLoginFailed, SessionLoginSucceeded, SessionResourceBound, Show, SubscriptionApproved,
    SubscriptionCancelled, SubscriptionDenied, SubscriptionRequested, VcardQueried, VcardSet,
};
use switchboard_schemas::xml::escape;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{RwLock, watch};
use uuid::Uuid;

use super::csi::QuietQueue;
use super::jid::{BareJid, FullJid};
use super::stream::{Element, Limits, StreamError, StreamEvent, StreamParser, stream_error_xml};
use crate::emit::{EmitError, EventSink};
use crate::ratelimit::LoginLimiter;
use crate::sasl::plain::PlainRequest;
use crate::sasl::scram::{ChannelBindingData, ScramAwaitingFinal, ScramServer};
use crate::sasl::{self, Mechanism, SaslError};
use crate::users::UserDirectory;

const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const NS_PING: &str = "urn:xmpp:ping";
const NS_DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
const NS_DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
const NS_VERSION: &str = "jabber:iq:version";
const NS_LAST: &str = "jabber:iq:last";
const NS_ROSTER: &str = "jabber:iq:roster";
const NS_VCARD: &str = "vcard-temp";
const NS_BLOCKING: &str = "urn:xmpp:blocking";
const NS_CSI: &str = "urn:xmpp:csi:0";
const NS_CARBONS: &str = "urn:xmpp:carbons:2";
const NS_MAM: &str = "urn:xmpp:mam:2";
/// Most items one block or unblock request may carry.
const MAX_BLOCK_ITEMS: usize = 1000;
/// Most groups one roster item may name.
const MAX_ROSTER_GROUPS: usize = 64;
/// Longest roster item name or group name, in bytes.
const MAX_ROSTER_TEXT: usize = 1024;
/// Queries the server answers about itself.
const SERVER_QUERIES: [&str; 4] = [NS_DISCO_INFO, NS_DISCO_ITEMS, NS_VERSION, NS_LAST];
/// How long a client may take to negotiate before its connection is closed.
const NEGOTIATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Most messages of one connection stored together (see [`Conn::settle`]).
const MAX_PIPELINED_MESSAGES: usize = 64;
/// Bytes taken from the transport per read (the scratch buffer's size).
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// One read buffer per worker thread, shared by the connections it runs:
    /// a read copies what the transport has straight into the connection's
    /// parser, so an idle session holds no read buffer of its own.
    static READ_SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

/// Reads what `io` has into `parser` through [`READ_SCRATCH`]; resolves to
/// the byte count (0 at end of stream). Waiting holds no buffer: the scratch
/// buffer is only borrowed inside a poll.
fn read_into<'a, S: AsyncRead + Unpin>(
    io: &'a mut S,
    parser: &'a mut StreamParser,
) -> impl Future<Output = std::io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| {
        READ_SCRATCH.with_borrow_mut(|scratch| {
            let mut read = tokio::io::ReadBuf::new(scratch);
            match Pin::new(&mut *io).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    parser.feed(read.filled());
                    Poll::Ready(Ok(read.filled().len()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        })
    })
}

/// The store of one message (a produce, not `Sync`).
type Store = Pin<Box<dyn Future<Output = Result<(), EmitError>> + Send>>;

/// A message being stored (`message.submitted`), with its stanza for the
/// error reply should the store fail.
struct PendingMessage {
    stanza: Element,
    /// Only reached through `get_mut` (never locked): the mutex makes the
    /// connection `Sync`, which its `&self` methods held across awaits need.
    store: Mutex<Store>,
    stored: Option<Result<(), EmitError>>,
}

/// Everything the listeners share.
pub struct C2sContext {
    /// Served domains (normalised).
    pub domains: Vec<String>,
    /// Settings.
    pub settings: XmppSettings,
    /// TLS configuration (certificate of the domains).
    pub tls: Arc<rustls::ServerConfig>,
    /// Users and their credentials.
    pub directory: Arc<RwLock<UserDirectory>>,
    /// Secret for fake SCRAM salts of unknown users.
    pub secret: [u8; 32],
    /// Where events go.
    pub events: EventSink,
    /// Sessions bound on this node.
    pub sessions: SessionRegistry,
    /// When the node started (XEP-0012 server uptime).
    pub started: std::time::Instant,
    /// Failed-login limits per address and account.
    pub limiter: LoginLimiter,
}

impl C2sContext {
    fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.settings.ping_interval_secs.max(1))
    }

    fn ping_timeout(&self) -> Duration {
        Duration::from_secs(self.settings.ping_timeout_secs.max(1))
    }
}

/// Sessions bound on this node, per user: enforces the per-user limit and
/// resource conflicts (RFC 6120 §7.7.2.2).
///
/// Kept small per session (SPEC.md §7's memory budget per idle session): a
/// user's sessions are a short vector, and a session's queue is a
/// [`Mailbox`] that holds no buffer while nothing waits in it.
#[derive(Default)]
pub struct SessionRegistry {
    users: Mutex<HashMap<String, Vec<Resource>>>,
    by_id: Mutex<HashMap<Uuid, Arc<Mailbox>>>,
}

/// One bound resource of a user on this node.
struct Resource {
    name: String,
    id: Uuid,
    mailbox: Arc<Mailbox>,
}

/// Stanzas a session may have queued before it is considered stuck.
const SESSION_QUEUE: usize = 1024;

/// Why a delivery did not reach a session.
#[derive(Debug, PartialEq, Eq)]
pub enum Undelivered {
    /// No such session on this node (it ended).
    NoSession,
    /// The session's queue is full (the client does not read).
    Stuck,
}

/// What a bound session is told through its [`Mailbox`].
#[derive(Debug, PartialEq, Eq)]
enum MailboxEvent {
    /// Stanzas routed to the session, oldest first.
    Stanzas(VecDeque<Routed>),
    /// A newer session bound the same resource (RFC 6120 §7.7.2.2).
    Kicked,
}

/// A bound session's queue of routed stanzas and its conflict signal: one
/// small allocation, no buffer while empty (the queue is handed over whole).
#[derive(Default)]
struct Mailbox {
    state: Mutex<MailboxState>,
    /// One waiter (the session); `notify_one` keeps a permit when the
    /// session is not waiting, so no wake-up is lost.
    notify: tokio::sync::Notify,
}

#[derive(Default)]
struct MailboxState {
    queue: VecDeque<Routed>,
    kicked: bool,
}

/// A stanza routed to a session, with the router's notification decision
/// (`delivery.stanza` `notify`, SPEC.md §7 active client).
#[derive(Debug, PartialEq, Eq)]
pub struct Routed {
    /// The stanza as it is written to the client.
    pub stanza: String,
    /// `Some(false)`: another of the user's clients is the active one, so
    /// this message does not end the session's quiet mode.
    pub notify: Option<bool>,
}

impl From<String> for Routed {
    fn from(stanza: String) -> Self {
        Self {
            stanza,
            notify: None,
        }
    }
}

impl Mailbox {
    fn push(&self, stanza: Routed) -> Result<(), Undelivered> {
        let mut state = self.state.lock().expect("mailbox lock");
        if state.queue.len() >= SESSION_QUEUE {
            return Err(Undelivered::Stuck);
        }
        state.queue.push_back(stanza);
        drop(state);
        self.notify.notify_one();
        Ok(())
    }

    fn kick(&self) {
        self.state.lock().expect("mailbox lock").kicked = true;
        self.notify.notify_one();
    }

    /// Waits for stanzas or the conflict signal; queued stanzas come first.
    /// Cancel-safe: what it returns is taken in the poll that returns it.
    async fn next(&self) -> MailboxEvent {
        loop {
            {
                let mut state = self.state.lock().expect("mailbox lock");
                if !state.queue.is_empty() {
                    return MailboxEvent::Stanzas(std::mem::take(&mut state.queue));
                }
                if state.kicked {
                    return MailboxEvent::Kicked;
                }
            }
            self.notify.notified().await;
        }
    }
}

/// Why a resource could not be bound.
#[derive(Debug, PartialEq, Eq)]
enum BindRefused {
    /// The user has the maximum number of sessions.
    Limit,
}

impl SessionRegistry {
    /// Binds `resource` for `user`; an existing session with the same
    /// resource is told to end with `<conflict/>` (the newer one wins).
    fn bind(
        &self,
        user: &str,
        resource: &str,
        id: Uuid,
        max: usize,
    ) -> Result<Arc<Mailbox>, BindRefused> {
        let mut users = self.users.lock().expect("sessions lock");
        let sessions = users.entry(user.to_owned()).or_default();
        let existing = sessions.iter().position(|r| r.name == resource);
        if existing.is_none() && sessions.len() >= max {
            if sessions.is_empty() {
                users.remove(user);
            }
            return Err(BindRefused::Limit);
        }
        let mailbox = Arc::new(Mailbox::default());
        let new = Resource {
            name: resource.to_owned(),
            id,
            mailbox: mailbox.clone(),
        };
        match existing {
            Some(i) => std::mem::replace(&mut sessions[i], new).mailbox.kick(),
            None => {
                sessions.reserve_exact(1);
                sessions.push(new);
            }
        }
        self.by_id
            .lock()
            .expect("sessions lock")
            .insert(id, mailbox.clone());
        Ok(mailbox)
    }

    /// Queues a stanza for the session `id` of this node.
    pub fn deliver(&self, id: Uuid, stanza: impl Into<Routed>) -> Result<(), Undelivered> {
        let mailbox = self
            .by_id
            .lock()
            .expect("sessions lock")
            .get(&id)
            .cloned()
            .ok_or(Undelivered::NoSession)?;
        mailbox.push(stanza.into())
    }

    fn unbind(&self, user: &str, resource: &str, id: Uuid) {
        self.by_id.lock().expect("sessions lock").remove(&id);
        let mut users = self.users.lock().expect("sessions lock");
        if let Some(sessions) = users.get_mut(user) {
            sessions.retain(|r| !(r.name == resource && r.id == id));
            if sessions.is_empty() {
                users.remove(user);
            }
        }
    }

    /// Sessions bound on this node.
    pub fn count(&self) -> usize {
        self.users
            .lock()
            .expect("sessions lock")
            .values()
            .map(Vec::len)
            .sum()
    }
}

/// Accepts connections until `shutdown` turns true. `direct_tls`: the TLS
/// handshake comes first (XEP-0368); otherwise STARTTLS (RFC 6120 §5).
pub async fn serve(
    listener: TcpListener,
    direct_tls: bool,
    ctx: Arc<C2sContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "xmpp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(tcp, peer, direct_tls, ctx, shutdown).await {
                tracing::debug!(%peer, error = %e, "xmpp connection ended");
            }
        });
    }
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    direct_tls: bool,
    ctx: Arc<C2sContext>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(ctx.tls.clone());
    let mut conn = Conn::new(ctx.clone(), peer, shutdown);
    // The negotiation before TLS and the handshake are boxed (freed when
    // done): this future is as large as the largest future it awaits, and
    // the session keeps it whole; 3,360 bytes unboxed, 2,736 boxed.
    let tcp = if direct_tls {
        tcp
    } else {
        let mut tcp = tcp;
        match Box::pin(conn.run(&mut tcp)).await? {
            Next::StartTls => tcp,
            Next::Closed => return Ok(()),
        }
    };
    let mut tls = Box::pin(tokio::time::timeout(
        NEGOTIATION_TIMEOUT,
        acceptor.accept(tcp),
    ))
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "tls handshake"))??;
    let (_, server) = tls.get_ref();
    // RFC 9266: tls-exporter is only offered on TLS 1.3.
    let binding = if server.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) {
        let mut cb = [0u8; ChannelBindingData::LEN];
        match server.export_keying_material(
            &mut cb,
            ChannelBindingData::EXPORTER_LABEL.as_bytes(),
            None,
        ) {
            Ok(_) => Some(ChannelBindingData::tls_exporter(cb.to_vec())),
            Err(_) => None,
        }
    } else {
        None
    };
    conn.secured(binding);
    let _ = conn.run(&mut tls).await?;
    let _ = tls.shutdown().await;
    Ok(())
}

enum Next {
    StartTls,
    Closed,
}

/// SASL exchange in progress.
enum Sasl {
    None,
    Scram {
        mechanism: Mechanism,
        state: Box<ScramAwaitingFinal>,
        user: Option<BareJid>,
    },
}

struct Bound {
    jid: FullJid,
    session_id: Uuid,
    /// Stanzas routed to this session (from the `deliveries` topic) and
    /// the conflict signal.
    mailbox: Arc<Mailbox>,
}

struct Conn {
    ctx: Arc<C2sContext>,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    parser: StreamParser,
    tls: bool,
    binding: Option<ChannelBindingData>,
    header_sent: bool,
    domain: Option<String>,
    user: Option<BareJid>,
    mechanism: Option<AuthMechanism>,
    sasl: Sasl,
    auth_failures: u32,
    bound: Option<Bound>,
    session_id: Uuid,
    out: String,
    last_activity: tokio::time::Instant,
    ping_sent: Option<tokio::time::Instant>,
    /// XEP-0352 quiet mode.
    quiet: QuietQueue,
    /// Messages parsed but not yet stored, in stream order.
    pending: Vec<PendingMessage>,
}

/// What the connection's timer is for.
enum Timer {
    Negotiation,
    Ping,
    PingTimeout,
}

/// What a handled element asks of the connection.
enum Step {
    Continue,
    StartTls,
    /// Close after a stream error (already queued) or `</stream:stream>`.
    Close(SessionEndReason),
}

impl Conn {
    fn new(ctx: Arc<C2sContext>, peer: SocketAddr, shutdown: watch::Receiver<bool>) -> Self {
        let limits = Limits {
            max_stanza_bytes: ctx.settings.max_stanza_bytes,
            max_depth: ctx.settings.max_depth,
            max_attributes: ctx.settings.max_attributes,
            ..Limits::default()
        };
        Self {
            ctx,
            peer,
            shutdown,
            parser: StreamParser::new(limits),
            tls: false,
            binding: None,
            header_sent: false,
            domain: None,
            user: None,
            mechanism: None,
            sasl: Sasl::None,
            auth_failures: 0,
            bound: None,
            session_id: Uuid::now_v7(),
            out: String::new(),
            last_activity: tokio::time::Instant::now(),
            ping_sent: None,
            quiet: QuietQueue::default(),
            pending: Vec::new(),
        }
    }

    /// The transport is now TLS (RFC 6120 §5.4.3.3: a fresh stream follows).
    fn secured(&mut self, binding: Option<ChannelBindingData>) {
        self.tls = true;
        self.binding = binding;
        self.header_sent = false;
        self.parser.reset();
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
    ) -> std::io::Result<Next> {
        let result = self.drive(io).await;
        self.settle().await;
        if let Some(bound) = self.bound.take() {
            self.ctx.sessions.unbind(
                &bound.jid.bare().to_string(),
                bound.jid.resource(),
                bound.session_id,
            );
            let reason = match &result {
                Ok((_, reason)) => reason.clone(),
                Err(_) => SessionEndReason::ConnectionLost,
            };
            let ended = SessionEnded {
                session_id: bound.session_id,
                user: bound.jid.bare().into(),
                full_jid: Some((&bound.jid).into()),
                protocol: Protocol::Xmpp,
                reason,
                text: None,
            };
            // Boxed for the same reason as `handle` in `drive`.
            if let Err(e) =
                Box::pin(self.ctx.events.emit(&bound.jid.bare().to_string(), ended)).await
            {
                tracing::error!(error = %e, "session end not stored");
            }
        }
        result.map(|(next, _)| next)
    }

    async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
    ) -> std::io::Result<(Next, SessionEndReason)> {
        let negotiation_deadline = tokio::time::Instant::now() + NEGOTIATION_TIMEOUT;
        loop {
            loop {
                let step = match self.parser.next() {
                    // Boxed: handling a stanza needs far more state than
                    // waiting does, and the task's future is as large as its
                    // largest state; idle sessions keep only the small one.
                    Ok(Some(event)) => Box::pin(self.handle(event)).await,
                    Ok(None) => break,
                    Err(e) => {
                        self.settle().await;
                        self.stream_error(&e);
                        Step::Close(SessionEndReason::Other("stream_error".to_owned()))
                    }
                };
                match step {
                    Step::Continue => {}
                    Step::StartTls => {
                        self.flush(io).await?;
                        return Ok((Next::StartTls, SessionEndReason::Logout));
                    }
                    Step::Close(reason) => {
                        self.settle().await;
                        self.out.push_str("</stream:stream>");
                        self.flush(io).await?;
                        let _ = io.shutdown().await;
                        drain(io).await;
                        return Ok((Next::Closed, reason));
                    }
                }
            }
            // Everything parsed from this read is handled: its messages are
            // stored together, then the replies go out in one write.
            self.settle().await;
            self.parser.release_idle();
            self.flush(io).await?;
            let negotiating = self.bound.is_none();
            let bound_mailbox = self.bound.as_ref().map(|b| b.mailbox.clone());
            let mailbox = async {
                match &bound_mailbox {
                    Some(m) => m.next().await,
                    None => std::future::pending().await,
                }
            };
            // XEP-0199 §5: an idle session is pinged; one that does not
            // answer within the timeout is dead and closed.
            let (timer_at, timer) = if negotiating {
                (negotiation_deadline, Timer::Negotiation)
            } else if let Some(sent) = self.ping_sent {
                (sent + self.ctx.ping_timeout(), Timer::PingTimeout)
            } else {
                (self.last_activity + self.ctx.ping_interval(), Timer::Ping)
            };
            let n = tokio::select! {
                read = read_into(io, &mut self.parser) => read?,
                event = mailbox => match event {
                    MailboxEvent::Stanzas(stanzas) => {
                        for routed in stanzas {
                            for s in self.quiet.offer(routed.stanza, routed.notify) {
                                self.out.push_str(&s);
                            }
                        }
                        continue;
                    }
                    MailboxEvent::Kicked => {
                        self.queue_stream_error("conflict", Some("replaced by a newer session"));
                        self.out.push_str("</stream:stream>");
                        self.flush(io).await?;
                        return Ok((Next::Closed, SessionEndReason::Conflict));
                    }
                },
                () = tokio::time::sleep_until(timer_at) => {
                    if matches!(timer, Timer::Ping) {
                        self.out.push_str(&format!(
                            "<iq type='get' id='ping-{}' from='{}'><ping xmlns='urn:xmpp:ping'/></iq>",
                            Uuid::now_v7().simple(),
                            escape(&self.domain.clone().unwrap_or_default())
                        ));
                        self.ping_sent = Some(tokio::time::Instant::now());
                        continue;
                    }
                    self.queue_stream_error("connection-timeout", None);
                    self.out.push_str("</stream:stream>");
                    self.flush(io).await?;
                    return Ok((Next::Closed, SessionEndReason::Timeout));
                }
                _ = self.shutdown.changed() => {
                    self.queue_stream_error("system-shutdown", None);
                    self.out.push_str("</stream:stream>");
                    self.flush(io).await?;
                    return Ok((Next::Closed, SessionEndReason::NodeDown));
                }
            };
            if n == 0 {
                return Ok((Next::Closed, SessionEndReason::ConnectionLost));
            }
            // Any traffic shows the peer is alive.
            self.last_activity = tokio::time::Instant::now();
            self.ping_sent = None;
        }
    }

    async fn flush<S: AsyncWrite + Unpin>(&mut self, io: &mut S) -> std::io::Result<()> {
        if !self.out.is_empty() {
            io.write_all(self.out.as_bytes()).await?;
            io.flush().await?;
            // Freed once written, so that an idle session holds no buffer.
            self.out = String::new();
        }
        Ok(())
    }

    /// Waits until the pending messages are stored and answers those that
    /// could not be with an error (RFC 6120 §8.3). Their produces start in
    /// stream order (the first poll enqueues each, in order) and are stored
    /// together (one group commit on the embedded log); RFC 6120 §10.1's
    /// in-order processing holds because every other stanza settles the
    /// messages before it first.
    async fn settle(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        std::future::poll_fn(|cx| {
            let mut done = true;
            for p in pending.iter_mut().filter(|p| p.stored.is_none()) {
                let store = p
                    .store
                    .get_mut()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match store.as_mut().poll(cx) {
                    Poll::Ready(stored) => p.stored = Some(stored),
                    Poll::Pending => done = false,
                }
            }
            if done { Poll::Ready(()) } else { Poll::Pending }
        })
        .await;
        for p in pending {
            if let Some(Err(err)) = p.stored {
                tracing::error!(error = %err, "message not stored");
                self.stanza_error(&p.stanza, "wait", "internal-server-error");
            }
        }
    }

    /// RFC 6120 §4.9.1.1: an error before the header still opens a stream.
    fn open_if_needed(&mut self) {
        if !self.header_sent {
            let domain = self
                .domain
                .clone()
                .unwrap_or_else(|| self.ctx.domains[0].clone());
            self.out.push_str(&format!(
                "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
                 xmlns:stream='http://etherx.jabber.org/streams' id='{}' from='{}' \
                 version='1.0' xml:lang='en'>",
                Uuid::now_v7().simple(),
                escape(&domain)
            ));
            self.header_sent = true;
        }
    }

    fn stream_error(&mut self, e: &StreamError) {
        self.open_if_needed();
        // The stream is closed by the caller, once.
        let xml = e.to_xml();
        self.out
            .push_str(xml.strip_suffix("</stream:stream>").unwrap_or(&xml));
    }

    fn queue_stream_error(&mut self, condition: &str, text: Option<&str>) {
        self.open_if_needed();
        // `stream_error_xml` closes the stream too; keep only the error.
        let xml = stream_error_xml(condition, text);
        self.out
            .push_str(xml.strip_suffix("</stream:stream>").unwrap_or(&xml));
    }

    async fn handle(&mut self, event: StreamEvent) -> Step {
        if !matches!(&event, StreamEvent::Stanza(e) if e.name == "message") {
            self.settle().await;
        }
        match event {
            StreamEvent::Header(header) => {
                let to = header.to.as_deref().map(str::to_ascii_lowercase);
                let Some(domain) = to.filter(|d| self.ctx.domains.contains(d)) else {
                    self.queue_stream_error("host-unknown", None);
                    return Step::Close(SessionEndReason::Other("host_unknown".to_owned()));
                };
                if self.domain.as_ref().is_some_and(|d| *d != domain) {
                    self.queue_stream_error("host-unknown", Some("the domain changed"));
                    return Step::Close(SessionEndReason::Other("host_unknown".to_owned()));
                }
                self.domain = Some(domain);
                self.header_sent = false;
                self.open_if_needed();
                let features = self.features();
                self.out.push_str(&features);
                Step::Continue
            }
            StreamEvent::Close => Step::Close(SessionEndReason::Logout),
            StreamEvent::Stanza(element) => self.element(element).await,
        }
    }

    /// RFC 6120 §4.3.2 stream features, in negotiation order (XEP-0170).
    fn features(&self) -> String {
        let mut f = String::from("<stream:features>");
        if !self.tls {
            f.push_str("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>");
            if self.ctx.settings.require_starttls {
                f.push_str("<required/>");
            }
            f.push_str("</starttls>");
        }
        if self.user.is_none() && (self.tls || !self.ctx.settings.require_starttls) {
            f.push_str("<mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>");
            for m in sasl::offered(self.tls, self.binding.is_some()) {
                f.push_str(&format!("<mechanism>{}</mechanism>", m.as_str()));
            }
            f.push_str("</mechanisms>");
            if self.binding.is_some() {
                // XEP-0440: the channel-binding types this server supports.
                f.push_str(
                    "<sasl-channel-binding xmlns='urn:xmpp:sasl-cb:0'>\
                     <channel-binding type='tls-exporter'/></sasl-channel-binding>",
                );
            }
        }
        if self.user.is_some() {
            // RFC 6121 §2.6.1 roster versioning and §3.4.1 pre-approval.
            f.push_str(
                "<bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/>\
                 <session xmlns='urn:ietf:params:xml:ns:xmpp-session'><optional/></session>\
                 <ver xmlns='urn:xmpp:features:rosterver'/>\
                 <sub xmlns='urn:xmpp:features:pre-approval'/>\
                 <csi xmlns='urn:xmpp:csi:0'/>",
            );
        }
        f.push_str("</stream:features>");
        f
    }

    async fn element(&mut self, e: Element) -> Step {
        match (e.namespace.as_str(), e.name.as_str()) {
            (NS_TLS, "starttls") if !self.tls => {
                self.out
                    .push_str("<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
                Step::StartTls
            }
            (NS_TLS, _) => {
                self.out
                    .push_str("<failure xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>");
                Step::Close(SessionEndReason::Other("tls_failure".to_owned()))
            }
            (NS_SASL, _) if self.user.is_some() => {
                self.queue_stream_error("policy-violation", Some("already authenticated"));
                Step::Close(SessionEndReason::Other("protocol".to_owned()))
            }
            // RFC 6120 §5.3.1: TLS is mandatory-to-negotiate.
            (NS_SASL, _) if !self.tls && self.ctx.settings.require_starttls => {
                self.queue_stream_error("policy-violation", Some("use STARTTLS first"));
                Step::Close(SessionEndReason::Other("tls_required".to_owned()))
            }
            (NS_SASL, "auth") => self.auth(&e).await,
            (NS_SASL, "response") => self.response(&e).await,
            (NS_SASL, "abort") => {
                self.sasl = Sasl::None;
                self.sasl_failure(&SaslError::Aborted);
                Step::Continue
            }
            (NS_SASL, _) => {
                self.sasl_failure(&SaslError::Malformed("unexpected SASL element"));
                Step::Continue
            }
            _ if self.user.is_none() => {
                // RFC 6120 §6.4.4 / §4.9.3.12: nothing else before auth.
                self.queue_stream_error("not-authorized", None);
                Step::Close(SessionEndReason::Other("not_authorized".to_owned()))
            }
            (_, "iq") => {
                // SPEC.md §7: an iq from a quiet client releases its queue.
                for s in self.quiet.release() {
                    self.out.push_str(&s);
                }
                self.iq(e).await
            }
            _ if self.bound.is_none() => {
                self.queue_stream_error("not-authorized", Some("bind a resource first"));
                Step::Close(SessionEndReason::Other("not_authorized".to_owned()))
            }
            // XEP-0352 §3: client state indication nonzas.
            (NS_CSI, "inactive") => {
                self.quiet.set_inactive();
                Step::Continue
            }
            (NS_CSI, "active") => {
                for s in self.quiet.set_active() {
                    self.out.push_str(&s);
                }
                Step::Continue
            }
            (_, "presence") => self.presence(e).await,
            (_, "message") => self.message(e).await,
            _ => {
                self.queue_stream_error("unsupported-stanza-type", None);
                Step::Close(SessionEndReason::Other("protocol".to_owned()))
            }
        }
    }

    fn sasl_failure(&mut self, e: &SaslError) {
        self.out.push_str(&format!(
            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><{}/></failure>",
            e.condition()
        ));
    }

    async fn credential_of(&self, user: &BareJid, mechanism: &ScramMechanism) -> Lookup {
        let directory = self.ctx.directory.read().await;
        match directory.get(&user.to_string()) {
            None => Lookup::Unknown,
            Some(state) if !state.enabled => Lookup::Disabled,
            Some(state) => Lookup::Found(
                state
                    .credentials
                    .iter()
                    .find(|c| c.mechanism == *mechanism)
                    .cloned(),
            ),
        }
    }

    /// RFC 6120 §6.4.2: `<auth mechanism='…'>` with the initial response.
    async fn auth(&mut self, e: &Element) -> Step {
        let domain = self.domain.clone().unwrap_or_default();
        let mechanism: Mechanism = match e.attr("mechanism").unwrap_or_default().parse() {
            Ok(m) => m,
            Err(err) => {
                self.sasl_failure(&err);
                return Step::Continue;
            }
        };
        if self
            .ctx
            .limiter
            .check(self.peer.ip(), None, std::time::Instant::now())
            .is_err()
        {
            return self.rate_limited(None, mechanism).await;
        }
        if let Err(err) = mechanism.ensure_offered(self.tls, self.binding.is_some()) {
            self.sasl_failure(&err);
            return self
                .failed(
                    None,
                    mechanism,
                    &err,
                    LoginFailureReason::MechanismNotAllowed,
                )
                .await;
        }
        let initial = match decode_sasl(&e.text()) {
            Ok(bytes) => bytes,
            Err(err) => {
                self.sasl_failure(&err);
                return Step::Continue;
            }
        };
        match mechanism {
            Mechanism::Plain => {
                let request = match PlainRequest::parse(&initial, &domain) {
                    Ok(r) => r,
                    Err(err) => {
                        self.sasl_failure(&err);
                        return self
                            .failed(None, mechanism, &err, LoginFailureReason::BadCredentials)
                            .await;
                    }
                };
                let user = BareJid::new(Some(request.username()), &domain).ok();
                if self.account_limited(user.as_ref()) {
                    return self.rate_limited(user, mechanism).await;
                }
                let lookup = match &user {
                    Some(u) => self.credential_of(u, &ScramMechanism::ScramSha256).await,
                    None => Lookup::Unknown,
                };
                let (credential, reason) = lookup.split();
                match request.verify(credential.as_ref()) {
                    Ok(_) if reason.is_none() => self.succeeded(user, mechanism, None).await,
                    Ok(_) => {
                        let err = SaslError::NotAuthorized;
                        self.out.push_str(
                            "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><account-disabled/></failure>",
                        );
                        self.failed(user, mechanism, &err, LoginFailureReason::AccountDisabled)
                            .await
                    }
                    Err(err) => {
                        self.sasl_failure(&err);
                        self.failed(
                            user,
                            mechanism,
                            &err,
                            reason.unwrap_or(LoginFailureReason::BadCredentials),
                        )
                        .await
                    }
                }
            }
            _ => {
                let server = ScramServer::new(domain.clone(), self.ctx.secret);
                let awaiting = match server.start(
                    mechanism,
                    &initial,
                    self.binding.as_ref(),
                    self.binding.is_some(),
                ) {
                    Ok(a) => a,
                    Err(err) => {
                        self.sasl_failure(&err);
                        return self
                            .failed(None, mechanism, &err, LoginFailureReason::BadCredentials)
                            .await;
                    }
                };
                let user = BareJid::new(Some(awaiting.username()), &domain).ok();
                if self.account_limited(user.as_ref()) {
                    return self.rate_limited(user, mechanism).await;
                }
                let lookup = match &user {
                    Some(u) => self.credential_of(u, awaiting.credential_mechanism()).await,
                    None => Lookup::Unknown,
                };
                let disabled = matches!(lookup, Lookup::Disabled);
                let (credential, _) = lookup.split();
                match awaiting.server_first(if disabled { None } else { credential.as_ref() }) {
                    Ok((first, state)) => {
                        self.out.push_str(&format!(
                            "<challenge xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</challenge>",
                            B64.encode(first)
                        ));
                        self.sasl = Sasl::Scram {
                            mechanism,
                            state: Box::new(state),
                            user,
                        };
                        Step::Continue
                    }
                    Err(err) => {
                        self.sasl_failure(&err);
                        self.failed(user, mechanism, &err, LoginFailureReason::BadCredentials)
                            .await
                    }
                }
            }
        }
    }

    /// RFC 6120 §6.4.3: the client's `<response/>` to a challenge.
    async fn response(&mut self, e: &Element) -> Step {
        let Sasl::Scram {
            mechanism,
            state,
            user,
        } = std::mem::replace(&mut self.sasl, Sasl::None)
        else {
            self.sasl_failure(&SaslError::Malformed("no exchange in progress"));
            return Step::Continue;
        };
        let data = match decode_sasl(&e.text()) {
            Ok(d) => d,
            Err(err) => {
                self.sasl_failure(&err);
                return self
                    .failed(user, mechanism, &err, LoginFailureReason::BadCredentials)
                    .await;
            }
        };
        match state.finish(&data) {
            Ok((server_final, _)) => {
                let disabled = match &user {
                    Some(u) => matches!(
                        self.credential_of(u, &ScramMechanism::ScramSha256).await,
                        Lookup::Disabled
                    ),
                    None => true,
                };
                if disabled {
                    self.out.push_str(
                        "<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><account-disabled/></failure>",
                    );
                    return self
                        .failed(
                            user,
                            mechanism,
                            &SaslError::NotAuthorized,
                            LoginFailureReason::AccountDisabled,
                        )
                        .await;
                }
                self.succeeded(user, mechanism, Some(server_final)).await
            }
            Err(err) => {
                let reason = match &user {
                    Some(u) => match self.credential_of(u, &ScramMechanism::ScramSha256).await {
                        Lookup::Unknown => LoginFailureReason::UnknownUser,
                        Lookup::Disabled => LoginFailureReason::AccountDisabled,
                        Lookup::Found(_) => LoginFailureReason::BadCredentials,
                    },
                    None => LoginFailureReason::UnknownUser,
                };
                self.sasl_failure(&err);
                self.failed(user, mechanism, &err, reason).await
            }
        }
    }

    async fn succeeded(
        &mut self,
        user: Option<BareJid>,
        mechanism: Mechanism,
        additional: Option<Vec<u8>>,
    ) -> Step {
        let Some(user) = user else {
            self.sasl_failure(&SaslError::NotAuthorized);
            return Step::Continue;
        };
        let event = SessionLoginSucceeded {
            session_id: self.session_id,
            user: (&user).into(),
            protocol: Protocol::Xmpp,
            remote_addr: self.peer.to_string(),
            mechanism: mechanism.auth_mechanism(),
        };
        if let Err(e) = self.ctx.events.emit(&user.to_string(), event).await {
            tracing::error!(error = %e, "login not stored; refusing it");
            self.sasl_failure(&SaslError::TemporaryFailure("event store unavailable"));
            return Step::Continue;
        }
        match additional {
            Some(data) => self.out.push_str(&format!(
                "<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</success>",
                B64.encode(data)
            )),
            None => self
                .out
                .push_str("<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>"),
        }
        self.user = Some(user);
        self.mechanism = Some(mechanism.auth_mechanism());
        // RFC 6120 §6.4.6: a new stream follows SASL success.
        self.header_sent = false;
        self.parser.reset();
        Step::Continue
    }

    fn account_limited(&self, user: Option<&BareJid>) -> bool {
        let account = user.map(ToString::to_string);
        self.ctx
            .limiter
            .check(
                self.peer.ip(),
                account.as_deref(),
                std::time::Instant::now(),
            )
            .is_err()
    }

    /// Too many recent failures for this address or account: refused
    /// without checking credentials (RFC 6120 §6.5.12).
    async fn rate_limited(&mut self, user: Option<BareJid>, mechanism: Mechanism) -> Step {
        let err = SaslError::TemporaryFailure("too many failed logins");
        self.sasl_failure(&err);
        self.report_failure(user, mechanism, &err, LoginFailureReason::RateLimited)
            .await;
        self.queue_stream_error(
            "policy-violation",
            Some("too many failed logins; try later"),
        );
        Step::Close(SessionEndReason::Other("rate_limited".to_owned()))
    }

    async fn failed(
        &mut self,
        user: Option<BareJid>,
        mechanism: Mechanism,
        err: &SaslError,
        reason: LoginFailureReason,
    ) -> Step {
        let account = user.as_ref().map(ToString::to_string);
        self.ctx.limiter.failed(
            self.peer.ip(),
            account.as_deref(),
            std::time::Instant::now(),
        );
        self.report_failure(user, mechanism, err, reason).await;
        self.auth_failures += 1;
        if self.auth_failures >= self.ctx.settings.max_auth_failures_per_connection {
            self.queue_stream_error("policy-violation", Some("too many failed authentications"));
            return Step::Close(SessionEndReason::Other("auth_failures".to_owned()));
        }
        Step::Continue
    }

    /// Stores a `session.login_failed` event (never the credentials).
    async fn report_failure(
        &mut self,
        user: Option<BareJid>,
        mechanism: Mechanism,
        err: &SaslError,
        reason: LoginFailureReason,
    ) {
        let subject = user
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_else(|| format!("unknown@{}", self.domain.clone().unwrap_or_default()));
        let event = SessionLoginFailed {
            session_id: self.session_id,
            user: switchboard_schemas::BareJid::new(subject.clone()),
            protocol: Protocol::Xmpp,
            remote_addr: self.peer.to_string(),
            mechanism: mechanism.auth_mechanism(),
            reason,
            text: Some(err.condition().to_owned()),
        };
        if let Err(e) = self.ctx.events.emit(&subject, event).await {
            tracing::error!(error = %e, "login failure not stored");
        }
    }

    async fn iq(&mut self, e: Element) -> Step {
        let id = e.attr("id").unwrap_or_default().to_owned();
        let kind = e.attr("type").unwrap_or_default().to_owned();
        if let Some(bind) = e.child("bind", NS_BIND).filter(|_| kind == "set") {
            return self.bind(&id, bind).await;
        }
        if self.bound.is_none() {
            self.stanza_error(&e, "cancel", "not-authorized");
            return Step::Continue;
        }
        let to_server = e
            .attr("to")
            .is_none_or(|to| Some(to.to_ascii_lowercase()) == self.domain);
        match kind.as_str() {
            "get" | "set" => {
                let child_ns = e.elements().next().map(|c| c.namespace.clone());
                match child_ns.as_deref() {
                    Some(NS_ROSTER) => return self.roster(&e, &id, &kind).await,
                    Some(NS_VCARD) => return self.vcard(&e, &id, &kind).await,
                    Some(NS_MAM) => return self.mam(&e, &id, &kind).await,
                    Some(NS_CARBONS) if to_server && kind == "set" => {
                        return self.carbons(&e, &id).await;
                    }
                    Some(NS_BLOCKING)
                        if to_server || e.attr("to").is_some_and(|t| self.is_own_bare(t)) =>
                    {
                        return self.blocking(&e, &id, &kind).await;
                    }
                    // RFC 3921 §3: legacy session establishment, a no-op.
                    Some(NS_SESSION) if to_server => self.result(&id),
                    // XEP-0199 §4: client-to-server ping.
                    Some(NS_PING) if to_server && kind == "get" => self.result(&id),
                    Some(ns) if to_server && kind == "get" && SERVER_QUERIES.contains(&ns) => {
                        self.server_query(&id, ns);
                    }
                    // RFC 6120 §8.4: anything else this server does not serve.
                    _ => self.stanza_error(&e, "cancel", "service-unavailable"),
                }
            }
            // Results and errors addressed to the server need no answer.
            _ => {}
        }
        Step::Continue
    }

    /// RFC 6120 §7: resource binding.
    async fn bind(&mut self, id: &str, bind: &Element) -> Step {
        if self.bound.is_some() {
            self.stanza_error_raw(id, "cancel", "not-allowed");
            return Step::Continue;
        }
        let Some(user) = self.user.clone() else {
            return Step::Continue;
        };
        let requested = bind
            .child("resource", NS_BIND)
            .map(|r| r.text())
            .filter(|r| !r.is_empty());
        let resource =
            requested.unwrap_or_else(|| Uuid::now_v7().simple().to_string()[20..].to_owned());
        let jid = match user.with_resource(&resource) {
            Ok(j) => j,
            Err(_) => {
                self.stanza_error_raw(id, "modify", "bad-request");
                return Step::Continue;
            }
        };
        let mailbox = match self.ctx.sessions.bind(
            &user.to_string(),
            jid.resource(),
            self.session_id,
            self.ctx.settings.max_sessions_per_user,
        ) {
            Ok(k) => k,
            Err(BindRefused::Limit) => {
                // RFC 6120 §7.6.2.1: the user has too many sessions.
                self.stanza_error_raw(id, "wait", "resource-constraint");
                let event = SessionLoginFailed {
                    session_id: self.session_id,
                    user: (&user).into(),
                    protocol: Protocol::Xmpp,
                    remote_addr: self.peer.to_string(),
                    mechanism: self.mechanism.clone().unwrap_or(AuthMechanism::Plain),
                    reason: LoginFailureReason::SessionLimitReached,
                    text: Some(format!(
                        "at most {} sessions",
                        self.ctx.settings.max_sessions_per_user
                    )),
                };
                let _ = self.ctx.events.emit(&user.to_string(), event).await;
                return Step::Continue;
            }
        };
        let event = SessionResourceBound {
            session_id: self.session_id,
            full_jid: (&jid).into(),
            protocol: Protocol::Xmpp,
            contact: Some(self.peer.to_string()),
            priority: 0,
            client: Default::default(),
        };
        if let Err(e) = self.ctx.events.emit(&user.to_string(), event).await {
            tracing::error!(error = %e, "bind not stored");
            self.ctx
                .sessions
                .unbind(&user.to_string(), jid.resource(), self.session_id);
            self.stanza_error_raw(id, "wait", "internal-server-error");
            return Step::Continue;
        }
        self.out.push_str(&format!(
            "<iq type='result' id='{}'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><jid>{}</jid></bind></iq>",
            escape(id),
            escape(&jid.to_string())
        ));
        self.bound = Some(Bound {
            jid,
            session_id: self.session_id,
            mailbox,
        });
        Step::Continue
    }

    /// RFC 6121 §2.1.3 (get), §2.3 and §2.5 (set): roster requests become
    /// events; the roster processor answers the session.
    async fn roster(&mut self, e: &Element, id: &str, kind: &str) -> Step {
        let Some(bound) = &self.bound else {
            return Step::Continue;
        };
        // §2.1.5: only the user's own roster, addressed to the account.
        if let Some(to) = e.attr("to")
            && !super::jid::Jid::parse(to).is_ok_and(|j| {
                j.bare() == bound.jid.bare() && matches!(j, super::jid::Jid::Bare(_))
            })
        {
            self.stanza_error(e, "auth", "forbidden");
            return Step::Continue;
        }
        let Some(query) = e.child("query", NS_ROSTER) else {
            self.stanza_error(e, "modify", "bad-request");
            return Step::Continue;
        };
        let user = bound.jid.bare().to_string();
        let event: switchboard_schemas::Event = if kind == "get" {
            RosterQueried {
                user: bound.jid.bare().into(),
                device: (&bound.jid).into(),
                session_id: bound.session_id,
                iq_id: id.to_owned(),
                version: query.attr("ver").map(str::to_owned),
            }
            .into()
        } else {
            match roster_item(query) {
                Ok((contact, name, groups, remove)) => RosterUpdateRequested {
                    user: bound.jid.bare().into(),
                    device: (&bound.jid).into(),
                    session_id: bound.session_id,
                    iq_id: id.to_owned(),
                    contact: (&contact).into(),
                    name,
                    groups,
                    remove,
                }
                .into(),
                Err(condition) => {
                    self.stanza_error(e, "modify", condition);
                    return Step::Continue;
                }
            }
        };
        self.store(e, &user, event, "roster request").await;
        Step::Continue
    }

    /// Stores a client's request as `event` keyed by `key`. When the bus
    /// refuses it, the stanza gets `internal-server-error` (RFC 6120
    /// §8.3.3.6), never silence; returns whether it was stored.
    async fn store(
        &mut self,
        e: &Element,
        key: &str,
        event: impl Into<switchboard_schemas::Event>,
        what: &str,
    ) -> bool {
        match self.ctx.events.emit(key, event).await {
            Ok(_) => true,
            Err(err) => {
                tracing::error!(error = %err, what, "request not stored");
                self.stanza_error(e, "wait", "internal-server-error");
                false
            }
        }
    }

    /// XEP-0280 §4 (enable) and §5 (disable): the session's choice becomes
    /// `session.carbons`, acknowledged once durable; the router copies
    /// messages to the sessions that enabled carbons.
    async fn carbons(&mut self, e: &Element, id: &str) -> Step {
        let Some(bound) = &self.bound else {
            return Step::Continue;
        };
        let enabled = match e.elements().next().map(|c| c.name.as_str()) {
            Some("enable") => true,
            Some("disable") => false,
            _ => {
                self.stanza_error(e, "modify", "bad-request");
                return Step::Continue;
            }
        };
        let event = SessionCarbons {
            session_id: bound.session_id,
            full_jid: (&bound.jid).into(),
            enabled,
        };
        let key = bound.jid.bare().to_string();
        if self.store(e, &key, event, "carbons choice").await {
            self.result(id);
        }
        Step::Continue
    }

    /// XEP-0313 §4 (a query of the user's own archive, paged with XEP-0059)
    /// and §5.1 (form fields): a `get` is answered here with the form; a
    /// `set` is checked (XEP-0004 form `FORM_TYPE` urn:xmpp:mam:2 with
    /// `with`, `start`, `end`, `after-id`, `before-id`; RSM `max`, `after`,
    /// `before`; `flip-page`) and becomes `message.archive_queried`, which
    /// the archive's responder answers with the results and `<fin/>`. A bad
    /// form or an unknown field gets `bad-request`, RSM `index`
    /// `feature-not-implemented` (XEP-0059 §2.4), another user's archive
    /// `forbidden`. `max` is capped at 250 results, 50 when none is asked.
    async fn mam(&mut self, e: &Element, id: &str, kind: &str) -> Step {
        const NS_DATA: &str = "jabber:x:data";
        const NS_RSM: &str = "http://jabber.org/protocol/rsm";
        const DEFAULT_PAGE: u32 = 50;
        const MAX_PAGE: u32 = 250;
        /// Longest query id, archive id or field value accepted.
        const MAX_VALUE: usize = 1024;
        /// Most form fields (the form has six).
        const MAX_FIELDS: usize = 16;
        struct Request {
            query_id: Option<String>,
            fields: BTreeMap<String, String>,
            max: Option<u32>,
            after: Option<String>,
            before: Option<String>,
            flip: bool,
        }
        /// The query's parts, or the error (type, condition).
        fn request(query: &Element) -> Result<Request, (&'static str, &'static str)> {
            const BAD: (&str, &str) = ("modify", "bad-request");
            let value = |el: &Element| {
                let text = el.text();
                (text.len() <= MAX_VALUE).then_some(text).ok_or(BAD)
            };
            let query_id = query.attr("queryid").map(str::to_owned);
            if query_id.as_ref().is_some_and(|q| q.len() > MAX_VALUE) {
                return Err(BAD);
            }
            let mut r = Request {
                query_id,
                fields: BTreeMap::new(),
                max: None,
                after: None,
                before: None,
                flip: false,
            };
            let (mut forms, mut sets) = (0, 0);
            for child in query.elements() {
                match (child.namespace.as_str(), child.name.as_str()) {
                    (NS_DATA, "x") => {
                        forms += 1;
                        // XEP-0004 §3.1: a filled-in form is a submission.
                        if forms > 1 || child.attr("type") != Some("submit") {
                            return Err(BAD);
                        }
                        for (n, field) in child.elements().filter(|f| f.name == "field").enumerate()
                        {
                            let var = field.attr("var").ok_or(BAD)?;
                            let mut values = field.elements().filter(|v| v.name == "value");
                            let (first, None) = (values.next(), values.next()) else {
                                return Err(BAD);
                            };
                            let known =
                                ["FORM_TYPE", "with", "start", "end", "after-id", "before-id"];
                            if n >= MAX_FIELDS
                                || !known.contains(&var)
                                || r.fields.contains_key(var)
                            {
                                return Err(BAD);
                            }
                            let text = first.map(value).transpose()?.unwrap_or_default();
                            r.fields.insert(var.to_owned(), text);
                        }
                        if r.fields.get("FORM_TYPE").is_some_and(|t| t != NS_MAM) {
                            return Err(BAD);
                        }
                    }
                    (NS_RSM, "set") => {
                        sets += 1;
                        if sets > 1 {
                            return Err(BAD);
                        }
                        for part in child.elements() {
                            match part.name.as_str() {
                                "max" if r.max.is_none() => {
                                    r.max = Some(value(part)?.trim().parse().map_err(|_| BAD)?);
                                }
                                "after" if r.after.is_none() => {
                                    r.after = Some(value(part)?).filter(|a| !a.is_empty());
                                    if r.after.is_none() {
                                        return Err(BAD);
                                    }
                                }
                                "before" if r.before.is_none() => r.before = Some(value(part)?),
                                "index" => return Err(("cancel", "feature-not-implemented")),
                                _ => return Err(BAD),
                            }
                        }
                    }
                    (NS_MAM, "flip-page") => r.flip = true,
                    _ => return Err(BAD),
                }
            }
            Ok(r)
        }
        let Some(bound) = &self.bound else {
            return Step::Continue;
        };
        let (user, device, session_id) = (
            bound.jid.bare().clone(),
            bound.jid.clone(),
            bound.session_id,
        );
        if e.attr("to").is_some_and(|to| !self.is_own_bare(to)) {
            self.stanza_error(e, "auth", "forbidden");
            return Step::Continue;
        }
        let Some(query) = e.child("query", NS_MAM) else {
            self.stanza_error(e, "modify", "bad-request");
            return Step::Continue;
        };
        if kind == "get" {
            let mut form = String::from(
                "<x xmlns='jabber:x:data' type='form'><field var='FORM_TYPE' type='hidden'>\
                 <value>urn:xmpp:mam:2</value></field><field var='with' type='jid-single'/>",
            );
            for var in ["start", "end", "after-id", "before-id"] {
                form.push_str(&format!("<field var='{var}' type='text-single'/>"));
            }
            self.out.push_str(&format!(
                "<iq type='result' id='{}'><query xmlns='{NS_MAM}'>{form}</x></query></iq>",
                escape(id)
            ));
            return Step::Continue;
        }
        let r = match request(query) {
            Ok(r) => r,
            Err((kind, condition)) => {
                self.stanza_error(e, kind, condition);
                return Step::Continue;
            }
        };
        let field = |var: &str| r.fields.get(var).filter(|v| !v.is_empty());
        let time = |var: &str| {
            field(var)
                .map(|t| chrono::DateTime::parse_from_rfc3339(t).map(|t| t.to_utc()))
                .transpose()
        };
        let with = match field("with").map(|w| super::jid::Jid::parse(w)) {
            None => None,
            Some(Ok(jid)) => Some(jid.to_string()),
            Some(Err(_)) => {
                self.stanza_error(e, "modify", "bad-request");
                return Step::Continue;
            }
        };
        let (Ok(start), Ok(end)) = (time("start"), time("end")) else {
            self.stanza_error(e, "modify", "bad-request");
            return Step::Continue;
        };
        let event = switchboard_schemas::events::MessageArchiveQueried {
            user: (&user).into(),
            device: (&device).into(),
            session_id,
            iq_id: id.to_owned(),
            query_id: r.query_id.clone(),
            with,
            start,
            end,
            after_id: field("after-id").cloned(),
            before_id: field("before-id").cloned(),
            max: r.max.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE),
            page_after: r.after.clone(),
            page_before: r.before.clone(),
            flip_page: r.flip,
        };
        if let Err(err) = self.ctx.events.emit(&user.to_string(), event).await {
            tracing::error!(error = %err, "archive query not stored");
            self.stanza_error(e, "wait", "internal-server-error");
        }
        Step::Continue
    }

    fn is_own_bare(&self, to: &str) -> bool {
        self.bound.as_ref().is_some_and(|b| {
            super::jid::Jid::parse(to)
                .is_ok_and(|j| matches!(&j, super::jid::Jid::Bare(bare) if bare == b.jid.bare()))
        })
    }

    /// XEP-0054: a vCard set is stored as an event and acknowledged once
    /// durable (§3.2); a get goes to the processor holding the owner's
    /// vCard (§3.1 one's own, §3.3 another user's).
    async fn vcard(&mut self, e: &Element, id: &str, kind: &str) -> Step {
        let Some(bound) = &self.bound else {
            return Step::Continue;
        };
        let (Some(vcard), Some(me)) = (e.child("vCard", NS_VCARD), Some(bound.jid.clone())) else {
            self.stanza_error(e, "modify", "bad-request");
            return Step::Continue;
        };
        let owner = match e.attr("to").map(super::jid::Jid::parse) {
            None => me.bare().clone(),
            Some(Ok(super::jid::Jid::Bare(bare))) => bare,
            Some(Ok(super::jid::Jid::Full(_))) => {
                // vCards belong to accounts, not to sessions.
                self.stanza_error(e, "cancel", "service-unavailable");
                return Step::Continue;
            }
            Some(Err(_)) => {
                self.stanza_error(e, "modify", "jid-malformed");
                return Step::Continue;
            }
        };
        let event: switchboard_schemas::Event = if kind == "set" {
            if &owner != me.bare() {
                // §3.2: only one's own vCard.
                self.stanza_error(e, "auth", "forbidden");
                return Step::Continue;
            }
            VcardSet {
                user: me.bare().into(),
                vcard: vcard.to_xml(),
            }
            .into()
        } else {
            if !self.ctx.domains.iter().any(|d| d == owner.domain()) {
                self.stanza_error(e, "cancel", "remote-server-not-found");
                return Step::Continue;
            }
            VcardQueried {
                owner: (&owner).into(),
                device: (&me).into(),
                session_id: bound.session_id,
                iq_id: id.to_owned(),
            }
            .into()
        };
        if self
            .store(e, &owner.to_string(), event, "vcard request")
            .await
            && kind == "set"
        {
            self.result(id);
        }
        Step::Continue
    }

    /// XEP-0191: block list get (§3.2), block (§3.3) and unblock (§3.4,
    /// §3.5); the processor holding the user's policy answers.
    async fn blocking(&mut self, e: &Element, id: &str, kind: &str) -> Step {
        let Some(bound) = &self.bound else {
            return Step::Continue;
        };
        let user = bound.jid.bare().to_string();
        let (device, session_id) = ((&bound.jid).into(), bound.session_id);
        let event: switchboard_schemas::Event = match (kind, e.elements().next()) {
            ("get", Some(c)) if c.name == "blocklist" => BlocklistQueried {
                user: bound.jid.bare().into(),
                device,
                session_id,
                iq_id: id.to_owned(),
            }
            .into(),
            ("set", Some(c)) if c.name == "block" || c.name == "unblock" => {
                let block = c.name == "block";
                let mut items = Vec::new();
                for item in c.elements().filter(|i| i.name == "item") {
                    match item.attr("jid").map(super::jid::Jid::parse) {
                        Some(Ok(jid)) => items.push(if jid.bare().local().is_none() {
                            PolicyItem::Domain(jid.bare().domain().to_owned())
                        } else {
                            PolicyItem::User(jid.bare().into())
                        }),
                        _ => {
                            self.stanza_error(e, "modify", "jid-malformed");
                            return Step::Continue;
                        }
                    }
                }
                // §3.3: a block names at least one address.
                if (block && items.is_empty()) || items.len() > MAX_BLOCK_ITEMS {
                    self.stanza_error(e, "modify", "bad-request");
                    return Step::Continue;
                }
                items.sort();
                items.dedup();
                BlocklistChangeRequested {
                    user: bound.jid.bare().into(),
                    device,
                    session_id,
                    iq_id: id.to_owned(),
                    block,
                    items,
                }
                .into()
            }
            _ => {
                self.stanza_error(e, "modify", "bad-request");
                return Step::Continue;
            }
        };
        self.store(e, &user, event, "blocking request").await;
        Step::Continue
    }

    /// RFC 6121 §3: subscription requests and answers become events keyed
    /// by the acting user; the roster processor runs the state machine.
    async fn subscription(&mut self, e: &Element, kind: &str) -> Step {
        let Some(bound) = &self.bound else {
            return Step::Continue;
        };
        let Some(to) = e
            .attr("to")
            .and_then(|to| super::jid::Jid::parse(to).ok())
            .map(|j| j.bare().clone())
        else {
            self.stanza_error(e, "modify", "jid-malformed");
            return Step::Continue;
        };
        if &to == bound.jid.bare() {
            // §3.1.1 addresses another entity; nothing to do for oneself.
            return Step::Continue;
        }
        let status = e
            .child("status", &e.namespace)
            .map(|c| c.text())
            .filter(|t| !t.is_empty());
        let (from, to) = (bound.jid.bare().into(), (&to).into());
        let event: switchboard_schemas::Event = match kind {
            "subscribe" => SubscriptionRequested { from, to, status }.into(),
            "subscribed" => SubscriptionApproved { from, to, status }.into(),
            "unsubscribe" => SubscriptionCancelled { from, to, status }.into(),
            _ => SubscriptionDenied { from, to, status }.into(),
        };
        let key = bound.jid.bare().to_string();
        self.store(e, &key, event, "subscription").await;
        Step::Continue
    }

    /// RFC 6121 §4.2: presence without `to` is broadcast presence, an input
    /// of the user's composed presence.
    async fn presence(&mut self, e: Element) -> Step {
        if self.bound.is_none() {
            return Step::Continue;
        }
        match e.attr("type") {
            Some(kind @ ("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed")) => {
                let kind = kind.to_owned();
                return self.subscription(&e, &kind).await;
            }
            // §4.3: probes are the server's business; errors need no answer.
            Some("probe" | "error") => return Step::Continue,
            Some("unavailable") | None => {}
            Some(_) => {
                self.stanza_error(&e, "modify", "bad-request");
                return Step::Continue;
            }
        }
        let Some(bound) = &self.bound else {
            return Step::Continue;
        };
        if let Some(to) = e.attr("to").map(str::to_owned) {
            return self.directed_presence(e, &to).await;
        }
        let child_text = |name: &str| {
            e.child(name, &e.namespace)
                .map(|c| c.text())
                .filter(|t| !t.is_empty())
        };
        let event = DevicePresence {
            user: bound.jid.bare().into(),
            device: bound.jid.to_string(),
            protocol: Protocol::Xmpp,
            available: e.attr("type") != Some("unavailable"),
            show: child_text("show").map(|s| Show::from(s.as_str())),
            status: child_text("status"),
            priority: child_text("priority")
                .and_then(|p| p.trim().parse::<i8>().ok())
                .unwrap_or(0),
        };
        if let Err(err) = self
            .ctx
            .events
            .emit(&bound.jid.bare().to_string(), event)
            .await
        {
            tracing::error!(error = %err, "presence not stored");
            self.stanza_error(&e, "wait", "internal-server-error");
        }
        Step::Continue
    }

    /// RFC 6121 §4.6: presence to one address becomes `presence.directed`;
    /// the roster processor delivers it (and the unavailable presence when
    /// the session ends, §4.6.3).
    async fn directed_presence(&mut self, mut e: Element, to: &str) -> Step {
        let Some(bound) = &self.bound else {
            return Step::Continue;
        };
        let target = match super::jid::Jid::parse(to) {
            Ok(j) => j,
            Err(_) => {
                self.stanza_error(&e, "modify", "jid-malformed");
                return Step::Continue;
            }
        };
        if !self.ctx.domains.iter().any(|d| d == target.bare().domain()) {
            // No server-to-server connections (RFC 6120 §8.3.3.16).
            self.stanza_error(&e, "cancel", "remote-server-not-found");
            return Step::Continue;
        }
        if target.bare() == bound.jid.bare() && matches!(target, super::jid::Jid::Bare(_)) {
            return Step::Continue;
        }
        e.set_attr("from", bound.jid.to_string());
        let event = DirectedPresence {
            from: (&bound.jid).into(),
            to: target.to_string(),
            available: e.attr("type") != Some("unavailable"),
            stanza: e.to_xml(),
        };
        let key = bound.jid.bare().to_string();
        self.store(&e, &key, event, "directed presence").await;
        Step::Continue
    }

    /// RFC 6121 §5: a message becomes `message.submitted`; delivery is the
    /// router's. It is accepted only once durably stored: the store is
    /// queued here and awaited by [`Conn::settle`] before anything else of
    /// the stream is handled or answered.
    async fn message(&mut self, mut e: Element) -> Step {
        if self.bound.is_none() {
            return Step::Continue;
        }
        let Some(to) = e.attr("to").map(str::to_owned) else {
            self.settle().await;
            self.stanza_error(&e, "modify", "bad-request");
            return Step::Continue;
        };
        let to = match super::jid::Jid::parse(&to) {
            Ok(j) => j.to_string(),
            Err(_) => {
                self.settle().await;
                self.stanza_error(&e, "modify", "jid-malformed");
                return Step::Continue;
            }
        };
        let Some(bound) = &self.bound else {
            return Step::Continue;
        };
        let from = bound.jid.to_string();
        e.set_attr("from", from.clone());
        let id = e
            .attr("id")
            .map(str::to_owned)
            .unwrap_or_else(|| Uuid::now_v7().to_string());
        let child_text = |name: &str| {
            e.child(name, &e.namespace)
                .map(|c| c.text())
                .filter(|t| !t.is_empty())
        };
        let event = MessageSubmitted {
            message_id: id,
            from: (&bound.jid).into(),
            to,
            kind: MessageKind::from(e.attr("type").unwrap_or("normal")),
            body: child_text("body"),
            thread: child_text("thread"),
            subject: child_text("subject"),
            stanza: e.to_xml(),
        };
        let ctx = self.ctx.clone();
        let subject = bound.jid.bare().to_string();
        self.pending.push(PendingMessage {
            stanza: e,
            store: Mutex::new(Box::pin(async move {
                ctx.events.emit(&subject, event).await.map(drop)
            })),
            stored: None,
        });
        if self.pending.len() >= MAX_PIPELINED_MESSAGES {
            self.settle().await;
        }
        Step::Continue
    }

    /// Answers a `get` query addressed to the server itself.
    fn server_query(&mut self, id: &str, ns: &str) {
        let payload = match ns {
            // XEP-0030 §3.1: identity and the features this server implements.
            NS_DISCO_INFO => {
                let mut q = String::from(
                    "<query xmlns='http://jabber.org/protocol/disco#info'>\
                     <identity category='server' type='im' name='Switchboard'/>",
                );
                for feature in [
                    NS_DISCO_INFO,
                    NS_DISCO_ITEMS,
                    NS_PING,
                    NS_VERSION,
                    NS_LAST,
                    NS_ROSTER,
                    NS_VCARD,
                    NS_BLOCKING,
                    NS_CARBONS,
                    NS_MAM,
                ] {
                    q.push_str(&format!("<feature var='{feature}'/>"));
                }
                q.push_str("</query>");
                q
            }
            // XEP-0030 §4.1: no services hosted on other addresses yet.
            NS_DISCO_ITEMS => "<query xmlns='http://jabber.org/protocol/disco#items'/>".to_owned(),
            // XEP-0092 §3: name and version; the OS is left out on purpose.
            NS_VERSION => format!(
                "<query xmlns='jabber:iq:version'><name>Switchboard</name><version>{}</version></query>",
                env!("CARGO_PKG_VERSION")
            ),
            // XEP-0012 §5: asked of a server, the seconds since it started.
            _ => format!(
                "<query xmlns='jabber:iq:last' seconds='{}'/>",
                self.ctx.started.elapsed().as_secs()
            ),
        };
        let from = self.domain.clone().unwrap_or_default();
        self.out.push_str(&format!(
            "<iq type='result' id='{}' from='{}'>{payload}</iq>",
            escape(id),
            escape(&from)
        ));
    }

    fn result(&mut self, id: &str) {
        self.out
            .push_str(&format!("<iq type='result' id='{}'/>", escape(id)));
    }

    /// RFC 6120 §8.3: the stanza comes back with `type='error'`.
    fn stanza_error(&mut self, e: &Element, kind: &str, condition: &str) {
        let mut reply = Element::new(e.name.clone(), e.namespace.clone());
        if let Some(id) = e.attr("id") {
            reply = reply.with_attr("id", id);
        }
        if let Some(to) = e.attr("to") {
            reply = reply.with_attr("from", to);
        }
        reply = reply.with_attr("type", "error").with_child(
            Element::new("error", e.namespace.clone())
                .with_attr("type", kind)
                .with_child(Element::new(condition, NS_STANZAS)),
        );
        self.out.push_str(&reply.to_xml_in(&e.namespace));
    }

    fn stanza_error_raw(&mut self, id: &str, kind: &str, condition: &str) {
        self.out.push_str(&format!(
            "<iq type='error' id='{}'><error type='{kind}'><{condition} xmlns='{NS_STANZAS}'/></error></iq>",
            escape(id)
        ));
    }
}

enum Lookup {
    Unknown,
    Disabled,
    Found(Option<switchboard_schemas::events::ScramCredential>),
}

impl Lookup {
    fn split(
        self,
    ) -> (
        Option<switchboard_schemas::events::ScramCredential>,
        Option<LoginFailureReason>,
    ) {
        match self {
            Lookup::Unknown => (None, Some(LoginFailureReason::UnknownUser)),
            Lookup::Disabled => (None, Some(LoginFailureReason::AccountDisabled)),
            Lookup::Found(c) => (c, None),
        }
    }
}

/// Reads and discards what the peer still sends after the server closed its
/// side (RFC 6120 §4.4), for a moment: closing a socket with unread input
/// resets the connection, and the peer may then lose the stream error.
async fn drain<S: AsyncRead + Unpin>(io: &mut S) {
    const DRAIN_LIMIT: Duration = Duration::from_secs(2);
    const DRAIN_BYTES: usize = 4 * 1024 * 1024;
    let mut buf = vec![0u8; 4096];
    let _ = tokio::time::timeout(DRAIN_LIMIT, async {
        let mut total = 0;
        while total < DRAIN_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// Pushes stanzas routed to sessions of this node (the `deliveries`
/// topic, keyed by node) into those sessions until `shutdown`.
pub async fn deliveries(
    bus: Arc<dyn switchboard_infra::bus::Bus>,
    topic: String,
    node: String,
    ctx: Arc<C2sContext>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), switchboard_infra::bus::BusError> {
    use switchboard_infra::bus::{ConsumerConfig, Polled, StartFrom};
    use switchboard_schemas::events::{MessageUndelivered, UndeliveredReason};
    use switchboard_schemas::{Envelope, Event};
    // Sessions do not survive a restart, so neither do their deliveries:
    // a new group starting at the end.
    let mut consumer = bus
        .consumer(ConsumerConfig {
            start: StartFrom::Latest,
            ..ConsumerConfig::new(
                format!("switchboard-gateway-{node}-{}", Uuid::now_v7().simple()),
                &[&topic],
            )
        })
        .await?;
    let mut recent = RecentDeliveries::default();
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
            let d = match envelope.event {
                Event::StanzaDelivery(d) => d,
                // RFC 6121 §4.2.2, §4.4.2: composed presence for several
                // sessions; presence to a session gone meanwhile is dropped
                // (the next login probes anew).
                Event::PresenceDelivery(p) => {
                    for target in &p.targets {
                        let _ = ctx
                            .sessions
                            .deliver(target.session_id, p.stanza_for(&target.to));
                    }
                    continue;
                }
                _ => continue,
            };
            // Deliveries to this node's SIP sessions are the SIP gateway's.
            if d.protocol != Protocol::Xmpp {
                continue;
            }
            // SPEC.md §7: a message id is stable end to end; a router that
            // repeats work after a crash must not show a message twice.
            if let Some(id) = &d.message_id
                && !recent.first_time(d.session_id, id, &d.stanza)
            {
                tracing::debug!(to = %d.to, message = %id, "duplicate delivery suppressed");
                continue;
            }
            let returned = d.sender.as_ref().map(|_| d.stanza.clone());
            let routed = Routed {
                stanza: d.stanza,
                notify: d.notify,
            };
            let Err(why) = ctx.sessions.deliver(d.session_id, routed) else {
                continue;
            };
            // The session ended (or is stuck) after the router chose it: a
            // chat or normal message goes back to the router, which routes
            // it again or stores it (XEP-0160); anything else is dropped.
            let (Some(stanza), Some(from), Some(message_id)) = (returned, d.sender, d.message_id)
            else {
                tracing::debug!(to = %d.to, ?why, "delivery to a gone session dropped");
                continue;
            };
            let reason = match why {
                Undelivered::Stuck => UndeliveredReason::QueueFull,
                Undelivered::NoSession => UndeliveredReason::SessionGone,
            };
            let bare =
                d.to.split_once('/')
                    .map_or(d.to.as_str(), |(b, _)| b)
                    .to_owned();
            let undelivered = MessageUndelivered {
                message_id,
                from,
                to: d.to,
                reason,
                session_id: Some(d.session_id),
                stanza,
            };
            if let Err(e) = ctx.events.emit(&bare, undelivered).await {
                tracing::error!(error = %e, "undelivered message not handed back");
            }
        }
    }
    let _ = consumer.close().await;
    Ok(())
}

/// Deliveries recently pushed to sessions of this node, to drop repeats
/// (same session, message id and stanza). Bounded: the oldest of
/// [`RecentDeliveries::MAX`] are forgotten first.
#[derive(Default)]
struct RecentDeliveries {
    set: std::collections::BTreeSet<(Uuid, u64)>,
    order: std::collections::VecDeque<(Uuid, u64)>,
}

impl RecentDeliveries {
    const MAX: usize = 100_000;

    /// Whether this delivery was not pushed before (and remembers it).
    fn first_time(&mut self, session: Uuid, message_id: &str, stanza: &str) -> bool {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        message_id.hash(&mut h);
        stanza.hash(&mut h);
        let key = (session, h.finish());
        if !self.set.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > Self::MAX
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

#[test]
fn recent_deliveries_drop_repeats_per_session_within_a_bound() {
    let mut recent = RecentDeliveries::default();
    let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
    assert!(recent.first_time(a, "m1", "<message id='m1'/>"));
    assert!(!recent.first_time(a, "m1", "<message id='m1'/>"));
    // Another session, or another stanza (an error, a delayed copy).
    assert!(recent.first_time(b, "m1", "<message id='m1'/>"));
    assert!(recent.first_time(a, "m1", "<message id='m1'><delay/></message>"));
    for i in 0..RecentDeliveries::MAX {
        recent.first_time(b, &format!("x{i}"), "s");
    }
    assert_eq!(recent.order.len(), RecentDeliveries::MAX);
    assert_eq!(recent.set.len(), RecentDeliveries::MAX);
    // The oldest were forgotten.
    assert!(recent.first_time(a, "m1", "<message id='m1'/>"));
}

/// A session's mailbox: stanzas in order, handed over whole; a full queue
/// is `Stuck`; an ended session is `NoSession`.
#[tokio::test]
async fn mailbox_queues_in_order_and_bounds_the_queue() {
    let registry = SessionRegistry::default();
    let id = Uuid::now_v7();
    assert_eq!(
        registry.deliver(id, "x".to_owned()),
        Err(Undelivered::NoSession)
    );
    let mailbox = registry
        .bind("a@example.com", "phone", id, 10)
        .expect("bound");
    registry.deliver(id, "<one/>".to_owned()).expect("queued");
    registry.deliver(id, "<two/>".to_owned()).expect("queued");
    assert_eq!(
        mailbox.next().await,
        MailboxEvent::Stanzas(["<one/>".to_owned().into(), "<two/>".to_owned().into()].into())
    );
    // Waiting, then woken by a delivery from another task.
    let waiting = tokio::spawn({
        let mailbox = mailbox.clone();
        async move { mailbox.next().await }
    });
    tokio::task::yield_now().await;
    registry.deliver(id, "<three/>".to_owned()).expect("queued");
    assert_eq!(
        waiting.await.expect("joined"),
        MailboxEvent::Stanzas(["<three/>".to_owned().into()].into())
    );
    for _ in 0..SESSION_QUEUE {
        registry.deliver(id, "<m/>".to_owned()).expect("queued");
    }
    assert_eq!(
        registry.deliver(id, "<m/>".to_owned()),
        Err(Undelivered::Stuck)
    );
    registry.unbind("a@example.com", "phone", id);
    assert_eq!(
        registry.deliver(id, "<m/>".to_owned()),
        Err(Undelivered::NoSession)
    );
    assert_eq!(registry.count(), 0);
}

/// RFC 6120 §7.7.2.2: the newer session with a resource wins, the older one
/// is told; the per-user limit counts resources, and an unbind of the
/// replaced session leaves the newer one bound.
#[tokio::test]
async fn registry_kicks_the_older_session_and_enforces_the_limit() {
    let registry = SessionRegistry::default();
    let (old, new, other) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let first = registry.bind("a@example.com", "r", old, 2).expect("bound");
    let second = registry.bind("a@example.com", "r", new, 2).expect("bound");
    assert_eq!(first.next().await, MailboxEvent::Kicked);
    registry
        .bind("a@example.com", "s", other, 2)
        .expect("bound");
    assert_eq!(
        registry.bind("a@example.com", "t", Uuid::now_v7(), 2).err(),
        Some(BindRefused::Limit)
    );
    assert_eq!(registry.count(), 2);
    registry.unbind("a@example.com", "r", old);
    assert_eq!(registry.count(), 2);
    registry
        .deliver(new, "<m/>".to_owned())
        .expect("newer one still bound");
    assert_eq!(
        second.next().await,
        MailboxEvent::Stanzas(["<m/>".to_owned().into()].into())
    );
    registry.unbind("a@example.com", "r", new);
    registry.unbind("a@example.com", "s", other);
    assert_eq!(registry.count(), 0);
    assert!(registry.users.lock().expect("lock").is_empty());
    // A refused bind leaves no empty entry behind.
    assert_eq!(
        registry.bind("b@example.com", "r", Uuid::now_v7(), 0).err(),
        Some(BindRefused::Limit)
    );
    assert!(registry.users.lock().expect("lock").is_empty());
}

/// What a roster set asks for.
type RosterItemRequest = (BareJid, Option<String>, Vec<String>, bool);

/// RFC 6121 §2.3.2 and §2.5.2: the one `<item/>` of a roster set, as
/// (contact, name, groups, remove), or the stanza error condition.
fn roster_item(query: &Element) -> Result<RosterItemRequest, &'static str> {
    let mut items = query.elements().filter(|c| c.name == "item");
    let (Some(item), None) = (items.next(), items.next()) else {
        return Err("bad-request");
    };
    let contact = item
        .attr("jid")
        .and_then(|j| super::jid::Jid::parse(j).ok())
        .ok_or("jid-malformed")?;
    let super::jid::Jid::Bare(contact) = contact else {
        return Err("bad-request");
    };
    let remove = match item.attr("subscription") {
        None | Some("none" | "to" | "from" | "both") => false,
        Some("remove") => true,
        Some(_) => return Err("bad-request"),
    };
    let name = item
        .attr("name")
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    if name.as_ref().is_some_and(|n| n.len() > MAX_ROSTER_TEXT) {
        return Err("not-acceptable");
    }
    let mut groups: Vec<String> = item
        .elements()
        .filter(|g| g.name == "group")
        .map(|g| g.text())
        .collect();
    // §2.3.3: empty or duplicate groups and oversized names are refused.
    if groups
        .iter()
        .any(|g| g.is_empty() || g.len() > MAX_ROSTER_TEXT)
        || groups.len() > MAX_ROSTER_GROUPS
    {
        return Err("not-acceptable");
    }
    groups.sort();
    let before = groups.len();
    groups.dedup();
    if groups.len() != before {
        return Err("bad-request");
    }
    Ok((contact, name, groups, remove))
}

/// RFC 6120 §6.4.2: `=` is an empty response; otherwise base64.
fn decode_sasl(text: &str) -> Result<Vec<u8>, SaslError> {
    let text = text.trim();
    if text == "=" || text.is_empty() {
        return Ok(Vec::new());
    }
    B64.decode(text)
        .map_err(|_| SaslError::Malformed("invalid base64"))
}
