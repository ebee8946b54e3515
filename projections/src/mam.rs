//! XEP-0313 message archive management, paged with XEP-0059 result set
//! management: the responder that answers clients' archive queries from the
//! chat archive projection.
//!
//! The gateway checks a client's query form and records it as
//! `message.archive_queried` on `messages`, keyed by the asking user. The
//! responder is a consumer-group member (`<prefix>.mam`) over `messages`:
//! for each query it reads one page of the asker's own archive and produces,
//! keyed by the asking session's gateway node on `deliveries`, one result
//! message per archived message (§4.2) and then the final `<iq type='result'>`
//! with `<fin/>` (§4.3), in that order. Ids that name no message of the
//! archive get `item-not-found` (§4.1.3, XEP-0059 §2.5).
//!
//! Paging is keyset paging on the archive id (the event's UUIDv7: time
//! ordered, unique within an archive): a page after an id reads forwards
//! from it, a page before an id (or the last page) backwards, each one index
//! range scan of `(owner, archive_id)` whatever the archive's size.
//!
//! A query waits (at most [`MamConfig::archive_wait`]) until the archive
//! projection has applied its own partition up to the query: the asker's
//! messages sent before the query are then in the answer. Messages from
//! others are keyed by their senders and may still be on their way.
//!
//! Delivery is at least once: positions are committed after the answers are
//! stored, so a crash may answer a query twice. Queries older than
//! [`MamConfig::max_age`] when read (a responder that was down) are skipped:
//! their sessions are gone.
//!
//! The projections otherwise never produce events; this responder produces
//! deliveries only, never events other components fold.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::Row;
use switchboard_infra::bus::{
    Bus, BusError, ConsumerConfig, Delivery, Polled, Record, StartFrom, TopicPartition,
    positions_after,
};
use switchboard_schemas::events::{MessageArchiveQueried, Protocol, StanzaDelivery};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::xml::escape;
use switchboard_schemas::{Envelope, Event, NodeId};
use tokio::sync::watch;

use crate::{Database, ProjectionError, ProjectionKind};

/// XEP-0313 namespace.
pub const NS_MAM: &str = "urn:xmpp:mam:2";
const NS_RSM: &str = "http://jabber.org/protocol/rsm";
const NS_FORWARD: &str = "urn:xmpp:forward:0";
const NS_DELAY: &str = "urn:xmpp:delay";
const NS_STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

/// Most results in one page (XEP-0059 §2.1: a responder may return fewer
/// items than asked). The gateway caps `max` to the same value.
pub const MAX_PAGE: u32 = 250;
/// Longest archive id or cursor worth looking up (archive ids are 36-byte
/// UUIDs); anything longer names no message.
pub const MAX_ID_BYTES: usize = 128;
/// The envelope type the responder answers (a cheap filter before decoding).
const QUERY_TYPE: &[u8] = b"message.archive_queried";

/// Whether a record's bytes hold [`QUERY_TYPE`]: every record of the
/// messages topic passes here, and a byte-by-byte window comparison was
/// 1 % of the server's CPU in an XMPP message burst (memchr's SIMD search
/// instead).
fn may_be_query(value: &[u8]) -> bool {
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(QUERY_TYPE));
    FINDER.find(value).is_some()
}

/// Settings of the responder.
#[derive(Clone, Debug)]
pub struct MamConfig {
    /// Topic prefix.
    pub prefix: String,
    /// This node (producer of the deliveries).
    pub node: NodeId,
    /// Longest wait for the archive projection to reach a query's position.
    pub archive_wait: Duration,
    /// Queries older than this when read are not answered.
    pub max_age: Duration,
    /// Most records per poll.
    pub max_batch: usize,
}

impl MamConfig {
    /// Defaults: wait up to 2 s for the archive, answer queries up to 60 s
    /// old, 256 records per poll.
    pub fn new(prefix: impl Into<String>, node: NodeId) -> Self {
        Self {
            prefix: prefix.into(),
            node,
            archive_wait: Duration::from_secs(2),
            max_age: Duration::from_secs(60),
            max_batch: 256,
        }
    }

    /// The responder's consumer group.
    pub fn group(&self) -> String {
        format!("{}.mam", self.prefix)
    }
}

/// XEP-0313 §4.1.1: `with` as a bare address matches every resource of it,
/// as a full address only that resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum With {
    /// A bare address: the archive's `peer`.
    Bare(String),
    /// A full address: the archive's `peer_full`.
    Full(String),
}

/// One archive query, as the responder runs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveQuery {
    /// The archive's owner (bare address).
    pub owner: String,
    /// Only messages with this address.
    pub with: Option<With>,
    /// Only messages at or after this time (µs since the epoch).
    pub start_us: Option<i64>,
    /// Only messages at or before this time (µs since the epoch).
    pub end_us: Option<i64>,
    /// Form field `after-id` (XEP-0313 §4.1.3): part of the result set.
    pub after_id: Option<String>,
    /// Form field `before-id`: part of the result set.
    pub before_id: Option<String>,
    /// XEP-0059 `after`: the page's lower bound, not part of the result set.
    pub page_after: Option<String>,
    /// XEP-0059 `before`: the page's upper bound.
    pub page_before: Option<String>,
    /// Read backwards (XEP-0059 `before`, with or without an id).
    pub backward: bool,
    /// Most results.
    pub max: u32,
    /// XEP-0313 `flip-page`: results of the page in reverse order.
    pub flip: bool,
}

impl ArchiveQuery {
    /// The query an event asks for; `max` is capped at [`MAX_PAGE`].
    pub fn from_event(q: &MessageArchiveQueried) -> Self {
        let with = q.with.as_ref().map(|w| {
            if w.contains('/') {
                With::Full(w.clone())
            } else {
                With::Bare(w.clone())
            }
        });
        let (page_before, backward) = match &q.page_before {
            None => (None, false),
            Some(id) if id.is_empty() => (None, true),
            Some(id) => (Some(id.clone()), true),
        };
        Self {
            owner: q.user.as_str().to_owned(),
            with,
            start_us: q.start.map(|t| t.timestamp_micros()),
            end_us: q.end.map(|t| t.timestamp_micros()),
            after_id: q.after_id.clone(),
            before_id: q.before_id.clone(),
            page_after: q.page_after.clone(),
            page_before,
            backward,
            max: q.max.min(MAX_PAGE),
            flip: q.flip_page,
        }
    }

    /// The distinct ids the query names, each of which must be in the
    /// archive.
    fn named_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = [
            &self.after_id,
            &self.before_id,
            &self.page_after,
            &self.page_before,
        ]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// One archived message of a page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Archived {
    /// The archive id (XEP-0313 result `id`).
    pub archive_id: String,
    /// When it was archived (µs since the epoch).
    pub at_us: i64,
    /// The original stanza.
    pub stanza: String,
}

/// One page of results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The results in the order they are sent.
    pub items: Vec<Archived>,
    /// The first and last archive ids of the page in archive order
    /// (unaffected by flipping), if any.
    pub first_last: Option<(String, String)>,
    /// Whether the page reaches the end of the result set in the paging
    /// direction (XEP-0313 §4.3 `complete`).
    pub complete: bool,
    /// Messages in the whole result set (XEP-0059 `count`).
    pub count: i64,
}

/// The answer to a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A page.
    Page(Page),
    /// A named id is not in the owner's archive.
    ItemNotFound,
}

/// A bound parameter of a generated statement.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Param {
    Text(String),
    Int(i64),
}

/// Appends the result set's conditions (`$1` is the owner); the page bounds
/// too when `page` is true.
fn conditions(q: &ArchiveQuery, page: bool, sql: &mut String, params: &mut Vec<Param>) {
    params.push(Param::Text(q.owner.clone()));
    sql.push_str(" WHERE a.owner = $1");
    let mut push = |sql: &mut String, clause: &str, p: Param| {
        params.push(p);
        sql.push_str(&format!(" AND {clause} ${}", params.len()));
    };
    match &q.with {
        Some(With::Bare(b)) => push(sql, "a.peer =", Param::Text(b.clone())),
        Some(With::Full(f)) => push(sql, "a.peer_full =", Param::Text(f.clone())),
        None => {}
    }
    if let Some(t) = q.start_us {
        push(sql, "a.at_us >=", Param::Int(t));
    }
    if let Some(t) = q.end_us {
        push(sql, "a.at_us <=", Param::Int(t));
    }
    let mut bounds = vec![(&q.after_id, ">"), (&q.before_id, "<")];
    if page {
        bounds.extend([(&q.page_after, ">"), (&q.page_before, "<")]);
    }
    for (id, op) in bounds {
        if let Some(id) = id {
            push(sql, &format!("a.archive_id {op}"), Param::Text(id.clone()));
        }
    }
}

/// The page statement: one more row than `max` tells whether the result
/// set goes on.
fn page_statement(q: &ArchiveQuery) -> (String, Vec<Param>) {
    let mut sql = String::from(
        "SELECT a.archive_id, a.at_us, m.stanza FROM archive a \
         JOIN archive_messages m ON m.archive_id = a.archive_id",
    );
    let mut params = Vec::new();
    conditions(q, true, &mut sql, &mut params);
    let order = if q.backward { "DESC" } else { "ASC" };
    sql.push_str(&format!(
        " ORDER BY a.archive_id {order} LIMIT {}",
        u64::from(q.max) + 1
    ));
    (sql, params)
}

/// The count of the whole result set (without the page bounds).
fn count_statement(q: &ArchiveQuery) -> (String, Vec<Param>) {
    let mut sql = String::from("SELECT COUNT(*) FROM archive a");
    let mut params = Vec::new();
    conditions(q, false, &mut sql, &mut params);
    (sql, params)
}

/// How many of `ids` are in the owner's archive.
fn found_statement(owner: &str, ids: &[&str]) -> (String, Vec<Param>) {
    let mut sql =
        String::from("SELECT COUNT(*) FROM archive a WHERE a.owner = $1 AND a.archive_id IN (");
    let mut params = vec![Param::Text(owner.to_owned())];
    for (i, id) in ids.iter().enumerate() {
        params.push(Param::Text((*id).to_owned()));
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("${}", params.len()));
    }
    sql.push(')');
    (sql, params)
}

/// Runs a generated statement on one backend's pool: the rows.
macro_rules! fetch {
    ($pool:expr, $statement:expr) => {{
        let (sql, params) = $statement;
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        for p in &params {
            query = match p {
                Param::Text(s) => query.bind(s.as_str()),
                Param::Int(i) => query.bind(*i),
            };
        }
        query.fetch_all($pool).await?
    }};
}

/// Runs a query on the archive.
pub async fn run_query(db: &Database, q: &ArchiveQuery) -> Result<Answer, ProjectionError> {
    let ids = q.named_ids();
    if ids.iter().any(|id| id.len() > MAX_ID_BYTES) {
        return Ok(Answer::ItemNotFound);
    }
    macro_rules! on_pool {
        ($pool:expr) => {{
            let pool = $pool;
            if !ids.is_empty() {
                let rows = fetch!(pool, found_statement(&q.owner, &ids));
                let found: i64 = rows[0].try_get(0)?;
                if usize::try_from(found).unwrap_or(0) < ids.len() {
                    return Ok(Answer::ItemNotFound);
                }
            }
            let mut items = Vec::new();
            for row in fetch!(pool, page_statement(q)) {
                items.push(Archived {
                    archive_id: row.try_get(0)?,
                    at_us: row.try_get(1)?,
                    stanza: row.try_get(2)?,
                });
            }
            let count: i64 = fetch!(pool, count_statement(q))[0].try_get(0)?;
            (items, count)
        }};
    }
    let (mut items, count) = match db {
        Database::Sqlite { main, .. } => on_pool!(&main.read),
        Database::Postgres(pool) => on_pool!(pool),
    };
    let max = usize::try_from(q.max).unwrap_or(usize::MAX);
    let complete = items.len() <= max;
    items.truncate(max);
    if q.backward {
        items.reverse();
    }
    let first_last = match (items.first(), items.last()) {
        (Some(f), Some(l)) => Some((f.archive_id.clone(), l.archive_id.clone())),
        _ => None,
    };
    if q.flip {
        items.reverse();
    }
    Ok(Answer::Page(Page {
        items,
        first_last,
        complete,
        count,
    }))
}

/// XEP-0082 date-time of an archive time.
fn stamp(at_us: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(at_us)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// XEP-0313 §4.2: one result, the archived stanza forwarded (XEP-0297) with
/// its archiving time (XEP-0203), from the archive's address.
pub fn result_message(owner: &str, to: &str, query_id: Option<&str>, item: &Archived) -> String {
    let query_id = query_id
        .map(|q| format!(" queryid='{}'", escape(q)))
        .unwrap_or_default();
    format!(
        "<message from='{}' to='{}'><result xmlns='{NS_MAM}'{query_id} id='{}'>\
         <forwarded xmlns='{NS_FORWARD}'><delay xmlns='{NS_DELAY}' stamp='{}'/>{}</forwarded>\
         </result></message>",
        escape(owner),
        escape(to),
        escape(&item.archive_id),
        stamp(item.at_us),
        item.stanza,
    )
}

/// XEP-0313 §4.3: the final answer with the page's XEP-0059 `first`,
/// `last` and `count`.
pub fn fin_iq(iq_id: &str, to: &str, page: &Page) -> String {
    let mut set = format!("<set xmlns='{NS_RSM}'>");
    if let Some((first, last)) = &page.first_last {
        set.push_str(&format!(
            "<first>{}</first><last>{}</last>",
            escape(first),
            escape(last)
        ));
    }
    set.push_str(&format!("<count>{}</count></set>", page.count));
    format!(
        "<iq type='result' id='{}' to='{}'><fin xmlns='{NS_MAM}' complete='{}'>{set}</fin></iq>",
        escape(iq_id),
        escape(to),
        page.complete
    )
}

/// RFC 6120 §8.3: an error answer to the query.
pub fn error_iq(iq_id: &str, to: &str, kind: &str, condition: &str) -> String {
    format!(
        "<iq type='error' id='{}' to='{}'><error type='{kind}'><{condition} xmlns='{NS_STANZAS}'/></error></iq>",
        escape(iq_id),
        escape(to)
    )
}

/// The stanzas answering one query, in order.
pub fn answer_stanzas(q: &MessageArchiveQueried, answer: &Answer) -> Vec<String> {
    let to = q.device.as_str();
    match answer {
        Answer::ItemNotFound => vec![error_iq(&q.iq_id, to, "cancel", "item-not-found")],
        Answer::Page(page) => {
            let mut out: Vec<String> = page
                .items
                .iter()
                .map(|item| result_message(q.user.as_str(), to, q.query_id.as_deref(), item))
                .collect();
            out.push(fin_iq(&q.iq_id, to, page));
            out
        }
    }
}

type Produce<'a> = Pin<Box<dyn Future<Output = Result<Delivery, BusError>> + Send + 'a>>;

/// Produces `records` concurrently, started in order (so records with one
/// key keep their order), and waits for all; the first error, if any.
async fn produce_in_order(
    bus: &dyn Bus,
    records: &[(String, String, Vec<u8>)],
) -> Result<(), BusError> {
    let mut pending: Vec<Option<Produce<'_>>> = records
        .iter()
        .map(|(topic, key, value)| Some(bus.produce(topic, key.as_bytes(), Some(value))))
        .collect();
    let mut first_error = None;
    std::future::poll_fn(|cx| {
        let mut waiting = false;
        for slot in &mut pending {
            if let Some(fut) = slot {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(result) => {
                        if let Err(e) = result
                            && first_error.is_none()
                        {
                            first_error = Some(e);
                        }
                        *slot = None;
                    }
                    Poll::Pending => waiting = true,
                }
            }
        }
        if waiting {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    first_error.map_or(Ok(()), Err)
}

struct Responder {
    bus: Arc<dyn Bus>,
    db: Database,
    config: Arc<MamConfig>,
    deliveries_topic: String,
    archive_group: String,
    /// The archive projection's positions, as last read.
    archive_positions: BTreeMap<TopicPartition, i64>,
    outbox: Vec<(String, String, Vec<u8>)>,
}

/// Runs the responder until `shutdown` turns true.
pub async fn run(
    bus: Arc<dyn Bus>,
    db: Database,
    config: Arc<MamConfig>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ProjectionError> {
    let topic = full_name(&config.prefix, Topic::Messages);
    let mut consumer = bus
        .consumer(ConsumerConfig {
            start: StartFrom::Earliest,
            max_batch: config.max_batch,
            ..ConsumerConfig::new(config.group(), &[&topic])
        })
        .await?;
    let mut responder = Responder {
        deliveries_topic: full_name(&config.prefix, Topic::Deliveries),
        archive_group: ProjectionKind::Archive.group(&config.prefix),
        archive_positions: BTreeMap::new(),
        outbox: Vec::new(),
        bus,
        db,
        config,
    };
    let result = loop {
        tokio::select! {
            polled = consumer.poll(Duration::from_millis(500)) => {
                match polled {
                    Ok(Polled::Records(records)) => {
                        if let Err(e) = responder.on_records(&records, &mut shutdown).await {
                            break Err(e);
                        }
                        if let Err(e) = consumer.commit(&positions_after(&records)).await {
                            tracing::warn!(error = %e, "mam commit failed; queries will repeat");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break Err(e.into()),
                }
            }
            _ = shutdown.changed() => break Ok(()),
        }
        if *shutdown.borrow() {
            break Ok(());
        }
    };
    let _ = consumer.close().await;
    result
}

impl Responder {
    async fn on_records(
        &mut self,
        records: &[Record],
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ProjectionError> {
        let now_ms = Utc::now().timestamp_millis();
        // One wait for the whole batch: a lagging archive delays it once.
        let wait_until = Instant::now() + self.config.archive_wait;
        let max_age_ms = i64::try_from(self.config.max_age.as_millis()).unwrap_or(i64::MAX);
        for r in records {
            let Some(value) = r.value.as_deref() else {
                continue;
            };
            if !may_be_query(value) {
                continue;
            }
            let envelope = match Envelope::from_json_slice(value) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(offset = r.offset, error = %e, "undecodable event skipped");
                    continue;
                }
            };
            let Event::MessageArchiveQueried(q) = &envelope.event else {
                continue;
            };
            if now_ms.saturating_sub(r.timestamp_ms) > max_age_ms {
                tracing::debug!(user = %q.user.as_str(), "stale archive query skipped");
                continue;
            }
            // A user reads only their own archive (the gateway checked it).
            let device_bare = q.device.as_str().split('/').next().unwrap_or_default();
            if device_bare != q.user.as_str() || envelope.subject != q.user.as_str() {
                tracing::warn!(user = %q.user.as_str(), device = %q.device.as_str(),
                    "archive query for another user's archive skipped");
                continue;
            }
            self.wait_for_archive(&r.topic_partition(), r.offset, wait_until, shutdown)
                .await?;
            let answer = self.answer(&ArchiveQuery::from_event(q), shutdown).await?;
            for stanza in answer_stanzas(q, &answer) {
                self.deliver(&envelope, q, stanza);
            }
        }
        self.flush().await
    }

    /// Waits until the archive projection applied `tp` past `offset`, or
    /// until `deadline`.
    async fn wait_for_archive(
        &mut self,
        tp: &TopicPartition,
        offset: i64,
        deadline: Instant,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), ProjectionError> {
        loop {
            if self.archive_positions.get(tp).is_some_and(|p| *p > offset) {
                return Ok(());
            }
            match self
                .db
                .positions(ProjectionKind::Archive, &self.archive_group)
                .await
            {
                Ok(p) => self.archive_positions = p,
                Err(e) => tracing::warn!(error = %e, "reading the archive's positions failed"),
            }
            if self.archive_positions.get(tp).is_some_and(|p| *p > offset) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::debug!(partition = %tp, offset, "archive behind; answering with what it has");
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    /// Runs a query, retrying while the database fails (the query is not
    /// lost: nothing is committed until it is answered).
    async fn answer(
        &self,
        q: &ArchiveQuery,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Answer, ProjectionError> {
        let mut backoff = Duration::from_millis(100);
        loop {
            match run_query(&self.db, q).await {
                Ok(a) => return Ok(a),
                Err(e) => {
                    tracing::warn!(error = %e, "archive query failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return Err(e),
                    }
                    if *shutdown.borrow() {
                        return Err(e);
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn deliver(&mut self, cause: &Envelope, q: &MessageArchiveQueried, stanza: String) {
        let delivery = StanzaDelivery {
            session_id: q.session_id,
            to: q.device.as_str().to_owned(),
            protocol: Protocol::Xmpp,
            stanza,
            message_id: None,
            sender: None,
            notify: None,
        };
        let node = cause.node.as_str();
        let envelope = Envelope::caused_by(cause, self.config.node.clone(), node, delivery);
        match envelope.to_json_vec() {
            Ok(bytes) => {
                self.outbox
                    .push((self.deliveries_topic.clone(), node.to_owned(), bytes));
            }
            Err(e) => tracing::error!(error = %e, "encoding a delivery"),
        }
    }

    /// Produces the answers, in order per gateway node, before positions are
    /// committed; retries a few times, then stops with the queries
    /// uncommitted so that they repeat at the next start.
    async fn flush(&mut self) -> Result<(), ProjectionError> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        let outbox = std::mem::take(&mut self.outbox);
        let mut attempt = 0u32;
        loop {
            match produce_in_order(&*self.bus, &outbox).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 5 && e.is_retriable() => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "archive answers not stored; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_records_naming_the_query_type_are_decoded() {
        assert!(may_be_query(
            br#"{"id":"x","type":"message.archive_queried","payload":{}}"#
        ));
        assert!(may_be_query(b"message.archive_queried"));
        assert!(!may_be_query(
            br#"{"id":"x","type":"message.submitted","payload":{"body":"message.archive_querie"}}"#
        ));
        assert!(!may_be_query(b""));
    }

    fn query() -> ArchiveQuery {
        ArchiveQuery {
            owner: "alice@example.com".to_owned(),
            with: None,
            start_us: None,
            end_us: None,
            after_id: None,
            before_id: None,
            page_after: None,
            page_before: None,
            backward: false,
            max: 10,
            flip: false,
        }
    }

    #[test]
    fn statements_number_parameters_in_order() {
        let q = ArchiveQuery {
            with: Some(With::Full("bob@example.com/x".to_owned())),
            start_us: Some(5),
            end_us: Some(9),
            after_id: Some("a".to_owned()),
            page_before: Some("p".to_owned()),
            backward: true,
            ..query()
        };
        let (sql, params) = page_statement(&q);
        assert_eq!(
            sql,
            "SELECT a.archive_id, a.at_us, m.stanza FROM archive a JOIN archive_messages m \
             ON m.archive_id = a.archive_id WHERE a.owner = $1 AND a.peer_full = $2 \
             AND a.at_us >= $3 AND a.at_us <= $4 AND a.archive_id > $5 AND a.archive_id < $6 \
             ORDER BY a.archive_id DESC LIMIT 11"
        );
        assert_eq!(params.len(), 6);
        assert_eq!(params[5], Param::Text("p".to_owned()));
        let (sql, params) = count_statement(&q);
        assert!(!sql.contains("$6") && params.len() == 5, "{sql}");
        let (sql, params) = found_statement("o", &["x", "y"]);
        assert!(sql.ends_with("IN ($2, $3)"), "{sql}");
        assert_eq!(params.len(), 3);
    }

    #[test]
    fn event_fields_become_the_query() {
        let event = MessageArchiveQueried {
            user: switchboard_schemas::BareJid::new("alice@example.com"),
            device: switchboard_schemas::FullJid::new("alice@example.com/a"),
            session_id: uuid::Uuid::nil(),
            iq_id: "i".to_owned(),
            query_id: None,
            with: Some("bob@example.com".to_owned()),
            start: None,
            end: None,
            after_id: None,
            before_id: None,
            max: 10_000,
            page_after: None,
            page_before: Some(String::new()),
            flip_page: false,
        };
        let q = ArchiveQuery::from_event(&event);
        assert_eq!(q.max, MAX_PAGE);
        assert!(
            q.backward && q.page_before.is_none(),
            "empty before: last page"
        );
        assert_eq!(q.with, Some(With::Bare("bob@example.com".to_owned())));
    }

    #[test]
    fn stanzas_follow_xep_0313() {
        let item = Archived {
            archive_id: "id-1".to_owned(),
            at_us: 1_767_605_400_123_456,
            stanza: "<message xmlns='jabber:client'><body>hi</body></message>".to_owned(),
        };
        let m = result_message("a@x", "a@x/r", Some("q'1"), &item);
        assert_eq!(
            m,
            "<message from='a@x' to='a@x/r'><result xmlns='urn:xmpp:mam:2' queryid='q&apos;1' id='id-1'>\
             <forwarded xmlns='urn:xmpp:forward:0'><delay xmlns='urn:xmpp:delay' stamp='2026-01-05T09:30:00.123456Z'/>\
             <message xmlns='jabber:client'><body>hi</body></message></forwarded></result></message>"
        );
        let page = Page {
            items: vec![item],
            first_last: Some(("id-1".to_owned(), "id-1".to_owned())),
            complete: false,
            count: 7,
        };
        assert_eq!(
            fin_iq("i1", "a@x/r", &page),
            "<iq type='result' id='i1' to='a@x/r'><fin xmlns='urn:xmpp:mam:2' complete='false'>\
             <set xmlns='http://jabber.org/protocol/rsm'><first>id-1</first><last>id-1</last>\
             <count>7</count></set></fin></iq>"
        );
        let empty = Page {
            items: vec![],
            first_last: None,
            complete: true,
            count: 0,
        };
        assert!(fin_iq("i", "t", &empty).contains(
            "complete='true'><set xmlns='http://jabber.org/protocol/rsm'><count>0</count></set>"
        ));
    }

    use crate::db::Ops;
    use crate::rows::ArchiveRow;
    use switchboard_infra::bus::TopicConfig;
    use switchboard_infra::bus::embedded::{EmbeddedBus, EmbeddedConfig};
    use switchboard_schemas::{BareJid, FullJid};

    const ALICE: &str = "alice@example.com";
    const BOB: &str = "bob@example.com";
    const CAROL: &str = "carol@example.com";
    /// Archive times start here (µs); message `i` is `i` ms later.
    const T0: i64 = 1_767_605_400_000_000;

    fn aid(i: usize) -> String {
        format!("0196a5d2-7c3e-7000-8000-{i:012x}")
    }

    /// A database of the backend under test.
    struct Fixture {
        _dir: tempfile::TempDir,
        db: Database,
    }

    async fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open_sqlite(&dir.path().join("p.db"))
            .await
            .unwrap();
        Fixture { _dir: dir, db }
    }

    /// PostgreSQL from `infra/scripts/postgres.sh start`
    /// (`SWITCHBOARD_TEST_POSTGRES` overrides the url), a schema of its own.
    async fn postgres() -> Fixture {
        let (_, url) = crate::testing::postgres_schema("mam").await;
        let db = Database::open_postgres(&url).await.unwrap();
        Fixture {
            _dir: tempfile::tempdir().unwrap(),
            db,
        }
    }

    /// 1,000 messages in Alice's archive: even ones with Bob (his phone when
    /// `i % 4 == 0`, else his laptop), odd ones with Carol; and Bob's side of
    /// the ones with him.
    async fn fill(db: &Database) {
        let mut rows = Vec::new();
        for i in 0..1000 {
            let (peer, full) = if i % 2 == 0 {
                let r = if i % 4 == 0 { "phone" } else { "laptop" };
                (BOB, format!("{BOB}/{r}"))
            } else {
                (CAROL, format!("{CAROL}/desk"))
            };
            let row = ArchiveRow {
                owner: ALICE.to_owned(),
                archive_id: aid(i),
                at_us: T0 + i as i64 * 1000,
                peer: peer.to_owned(),
                peer_full: Some(full.clone()),
                direction: "in",
                kind: "chat".to_owned(),
                message_id: format!("m{i}"),
                sender: full.clone(),
                nick: None,
                thread: None,
                subject: None,
                body: Some(format!("n{i}")),
                stanza: format!(
                    "<message xmlns='jabber:client' from='{full}' to='{ALICE}' type='chat'><body>n{i}</body></message>"
                ),
            };
            if peer == BOB {
                rows.push(ArchiveRow {
                    owner: BOB.to_owned(),
                    direction: "out",
                    peer: ALICE.to_owned(),
                    peer_full: None,
                    ..row.clone()
                });
            }
            rows.push(row);
        }
        db.apply("test", &[], Ops::Archive(rows)).await.unwrap();
    }

    async fn page(db: &Database, q: &ArchiveQuery) -> Page {
        match run_query(db, q).await.unwrap() {
            Answer::Page(p) => p,
            Answer::ItemNotFound => panic!("item-not-found for {q:?}"),
        }
    }

    fn ids(p: &Page) -> Vec<String> {
        p.items.iter().map(|i| i.archive_id.clone()).collect()
    }

    /// Numbers of the messages of a page.
    fn numbers(p: &Page) -> Vec<usize> {
        p.items
            .iter()
            .map(|i| usize::from_str_radix(&i.archive_id[24..], 16).unwrap())
            .collect()
    }

    async fn pages_forward_and_backward(db: &Database) {
        fill(db).await;
        // Forward through all 1,000, 100 at a time.
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let p = page(
                db,
                &ArchiveQuery {
                    page_after: after.clone(),
                    max: 100,
                    ..query()
                },
            )
            .await;
            assert_eq!(p.count, 1000);
            seen.extend(ids(&p));
            let (first, last) = p.first_last.clone().unwrap();
            assert_eq!(
                (first, last.clone()),
                (ids(&p)[0].clone(), ids(&p)[99].clone())
            );
            after = Some(last);
            if p.complete {
                break;
            }
            assert!(seen.len() < 1000, "complete only on the last page");
        }
        assert_eq!(seen, (0..1000).map(aid).collect::<Vec<_>>());
        // Past the end: empty and complete.
        let p = page(
            db,
            &ArchiveQuery {
                page_after: after,
                ..query()
            },
        )
        .await;
        assert!(p.items.is_empty() && p.complete && p.first_last.is_none());
        // The last page, then backwards.
        let p = page(
            db,
            &ArchiveQuery {
                backward: true,
                max: 300,
                ..query()
            },
        )
        .await;
        assert_eq!(numbers(&p), (700..1000).collect::<Vec<_>>());
        assert!(!p.complete);
        let before = p.first_last.unwrap().0;
        let p = page(
            db,
            &ArchiveQuery {
                backward: true,
                page_before: Some(before),
                max: 800,
                ..query()
            },
        )
        .await;
        assert_eq!(
            numbers(&p),
            (0..700).collect::<Vec<_>>(),
            "capped by max only"
        );
        assert!(p.complete, "reached the start");
        // flip-page: the same page, newest first; first/last unchanged.
        let flipped = page(
            db,
            &ArchiveQuery {
                backward: true,
                max: 3,
                flip: true,
                ..query()
            },
        )
        .await;
        assert_eq!(numbers(&flipped), vec![999, 998, 997]);
        assert_eq!(flipped.first_last, Some((aid(997), aid(999))));
        // max 0: the count only (XEP-0059 §2.6).
        let p = page(db, &ArchiveQuery { max: 0, ..query() }).await;
        assert!(p.items.is_empty() && p.count == 1000 && !p.complete);
    }

    async fn filters(db: &Database) {
        fill(db).await;
        let with = |w: With| ArchiveQuery {
            with: Some(w),
            max: 250,
            ..query()
        };
        let p = page(db, &with(With::Bare(BOB.to_owned()))).await;
        assert_eq!(p.count, 500);
        assert_eq!(numbers(&p), (0..500).step_by(2).collect::<Vec<_>>());
        let p = page(db, &with(With::Full(format!("{BOB}/phone")))).await;
        assert_eq!(p.count, 250);
        assert!(p.complete);
        assert!(numbers(&p).iter().all(|n| n % 4 == 0));
        let p = page(db, &with(With::Bare("nobody@example.com".to_owned()))).await;
        assert!(p.items.is_empty() && p.count == 0 && p.complete);
        // start and end are inclusive.
        let p = page(
            db,
            &ArchiveQuery {
                start_us: Some(T0 + 10_000),
                end_us: Some(T0 + 19_000),
                ..query()
            },
        )
        .await;
        assert_eq!(numbers(&p), (10..20).collect::<Vec<_>>());
        assert_eq!(p.count, 10);
        assert!(
            p.complete,
            "max 10 of exactly 10: the one more row asked for is not there"
        );
        // after-id and before-id bound the result set (and the count).
        let p = page(
            db,
            &ArchiveQuery {
                after_id: Some(aid(100)),
                before_id: Some(aid(106)),
                with: Some(With::Bare(CAROL.to_owned())),
                ..query()
            },
        )
        .await;
        assert_eq!(numbers(&p), vec![101, 103, 105]);
        assert_eq!(p.count, 3);
        assert!(p.complete);
        // Unknown ids, or another user's ids: item-not-found.
        for bad in [
            ArchiveQuery {
                page_after: Some("nope".to_owned()),
                ..query()
            },
            ArchiveQuery {
                before_id: Some(aid(5000)),
                ..query()
            },
            ArchiveQuery {
                page_before: Some("x".repeat(MAX_ID_BYTES + 1)),
                backward: true,
                ..query()
            },
            // Carol's messages are not in Bob's archive.
            ArchiveQuery {
                owner: BOB.to_owned(),
                after_id: Some(aid(1)),
                ..query()
            },
        ] {
            assert_eq!(
                run_query(db, &bad).await.unwrap(),
                Answer::ItemNotFound,
                "{bad:?}"
            );
        }
        // Bob's archive holds his side only.
        let p = page(
            db,
            &ArchiveQuery {
                owner: BOB.to_owned(),
                ..query()
            },
        )
        .await;
        assert_eq!(p.count, 500);
    }

    fn chat(i: usize) -> Envelope {
        Envelope::new(
            NodeId::new("gw1"),
            ALICE,
            switchboard_schemas::events::MessageSubmitted {
                message_id: format!("m{i}"),
                from: FullJid::new("alice@example.com/a"),
                to: BOB.to_owned(),
                kind: switchboard_schemas::events::MessageKind::Chat,
                body: Some(format!("n{i}")),
                thread: None,
                subject: None,
                stanza: format!(
                    "<message xmlns='jabber:client' from='alice@example.com/a' to='{BOB}' type='chat' id='m{i}'><body>n{i}</body></message>"
                ),
            },
        )
    }

    fn archive_query(device: &str, iq: &str, max: u32) -> Envelope {
        Envelope::new(
            NodeId::new("gw1"),
            ALICE,
            MessageArchiveQueried {
                user: BareJid::new(ALICE),
                device: FullJid::new(device),
                session_id: uuid::Uuid::nil(),
                iq_id: iq.to_owned(),
                query_id: Some("q1".to_owned()),
                with: None,
                start: None,
                end: None,
                after_id: None,
                before_id: None,
                max,
                page_after: None,
                page_before: None,
                flip_page: false,
            },
        )
    }

    /// The whole path on the embedded log: messages and a query produced
    /// at once, the archive projection and the responder running; the
    /// answer (results in order, then `<fin/>`) arrives on `deliveries`
    /// keyed by the gateway node, and includes every message the asker sent
    /// before asking. A query naming a session of another user is skipped.
    async fn answers_on_deliveries(f: &Fixture) {
        let dir = tempfile::tempdir().unwrap();
        let bus: Arc<dyn Bus> = Arc::new(
            EmbeddedBus::open(EmbeddedConfig::new(dir.path().join("bus.sqlite")))
                .await
                .unwrap(),
        );
        bus.create_topics(&TopicConfig::catalogue("sb"))
            .await
            .unwrap();
        let messages = full_name("sb", Topic::Messages);
        let mut batch: Vec<Envelope> = (0..30).map(chat).collect();
        batch.push(archive_query("mallory@example.com/m", "evil", 10));
        batch.push(archive_query("alice@example.com/a", "mam-1", 20));
        for e in &batch {
            bus.produce(&messages, ALICE.as_bytes(), Some(&e.to_json_vec().unwrap()))
                .await
                .unwrap();
        }
        let mut deliveries = bus
            .consumer(ConsumerConfig::new(
                "reader",
                &[&full_name("sb", Topic::Deliveries)],
            ))
            .await
            .unwrap();
        let (stop, stopped) = watch::channel(false);
        let runner_config = Arc::new(crate::RunnerConfig::new("sb"));
        let status = crate::Status::new(&[ProjectionKind::Archive]);
        let archive = tokio::spawn(crate::runner::run(
            bus.clone(),
            f.db.clone(),
            ProjectionKind::Archive,
            runner_config,
            status.get(ProjectionKind::Archive).unwrap(),
            stopped.clone(),
        ));
        let responder = tokio::spawn(run(
            bus.clone(),
            f.db.clone(),
            Arc::new(MamConfig {
                archive_wait: Duration::from_secs(20),
                ..MamConfig::new("sb", NodeId::new("proj1"))
            }),
            stopped,
        ));
        let mut got: Vec<(String, StanzaDelivery)> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !got.iter().any(|(_, d)| d.stanza.contains("<fin")) {
            assert!(Instant::now() < deadline, "no answer: {got:?}");
            if let Polled::Records(rs) = deliveries.poll(Duration::from_millis(200)).await.unwrap()
            {
                for r in rs {
                    let e = Envelope::from_json_slice(r.value.as_deref().unwrap()).unwrap();
                    let Event::StanzaDelivery(d) = e.event else {
                        panic!("{e:?}")
                    };
                    got.push((String::from_utf8(r.key.to_vec()).unwrap(), d));
                }
            }
        }
        stop.send(true).unwrap();
        archive.await.unwrap().unwrap();
        responder.await.unwrap().unwrap();
        assert_eq!(got.len(), 21, "20 results and the fin");
        for (i, (key, d)) in got.iter().enumerate() {
            assert_eq!(key, "gw1");
            assert_eq!(d.to, "alice@example.com/a");
            if i < 20 {
                assert!(d.stanza.starts_with("<message from='alice@example.com' to='alice@example.com/a'><result xmlns='urn:xmpp:mam:2' queryid='q1' id='"), "{}", d.stanza);
                assert!(
                    d.stanza.contains(&format!("<body>n{i}</body>")),
                    "in order: {}",
                    d.stanza
                );
            }
        }
        let fin = &got[20].1.stanza;
        assert!(fin.starts_with("<iq type='result' id='mam-1' to='alice@example.com/a'><fin xmlns='urn:xmpp:mam:2' complete='false'>"), "{fin}");
        assert!(
            fin.contains("<count>30</count>"),
            "every message sent before the query: {fin}"
        );
        assert!(!got.iter().any(|(_, d)| d.stanza.contains("evil")));
    }

    macro_rules! backend_tests {
        ($backend:ident, $fixture:expr) => {
            mod $backend {
                use super::*;

                #[tokio::test]
                async fn pages_forward_and_backward() {
                    super::pages_forward_and_backward(&$fixture.await.db).await;
                }

                #[tokio::test]
                async fn filters() {
                    super::filters(&$fixture.await.db).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn answers_on_deliveries() {
                    super::answers_on_deliveries(&$fixture.await).await;
                }
            }
        };
    }

    backend_tests!(on_sqlite, sqlite());
    backend_tests!(on_postgres, postgres());
}
