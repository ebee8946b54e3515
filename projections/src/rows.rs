//! Pure mapping from events to the rows of each projection (no I/O).

use switchboard_infra::bus::Record;
use switchboard_schemas::events::MessageKind;
use switchboard_schemas::{Envelope, Event};

use crate::compliance::{ComplianceRecord, Profile};

/// A bus record and, when it is a readable event, its envelope.
#[derive(Debug)]
pub struct Item<'a> {
    /// The record.
    pub record: &'a Record,
    /// The decoded event; `None` for a tombstone or an unreadable value.
    pub envelope: Option<Envelope>,
}

impl<'a> Item<'a> {
    /// Decodes a record; an unreadable value is logged and kept as `None`.
    pub fn decode(record: &'a Record) -> Self {
        let envelope = record
            .value
            .as_deref()
            .and_then(|v| match Envelope::from_json_slice(v) {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(topic = %record.topic, partition = record.partition,
                        offset = record.offset, error = %e, "undecodable event");
                    None
                }
            });
        Self { record, envelope }
    }
}

/// Microseconds since the Unix epoch.
fn micros(e: &Envelope) -> i64 {
    e.occurred_at.timestamp_micros()
}

fn bare(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(b, _)| b)
}

fn domain(jid: &str) -> &str {
    let b = bare(jid);
    b.rsplit_once('@').map_or(b, |(_, d)| d)
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A roster change, applied in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RosterOp {
    /// Insert or replace an item.
    Set {
        /// Roster owner.
        owner: String,
        /// Contact.
        contact: String,
        /// Name.
        name: Option<String>,
        /// Groups as a JSON array.
        groups: String,
        /// Subscription state.
        subscription: String,
        /// Pending subscription request.
        ask: bool,
        /// Pre-approved subscription (RFC 6121 §3.4).
        approved: bool,
        /// Event time.
        at_us: i64,
        /// Event id.
        event_id: String,
    },
    /// Remove an item.
    Remove {
        /// Roster owner.
        owner: String,
        /// Contact.
        contact: String,
    },
}

/// Roster changes of a batch.
pub fn roster_ops(items: &[Item<'_>]) -> Vec<RosterOp> {
    let mut ops = Vec::new();
    for e in items.iter().filter_map(|i| i.envelope.as_ref()) {
        match &e.event {
            Event::RosterItemSet(s) => {
                let mut groups = s.groups.clone();
                groups.sort();
                groups.dedup();
                ops.push(RosterOp::Set {
                    owner: s.user.as_str().to_owned(),
                    contact: s.contact.as_str().to_owned(),
                    name: s.name.clone(),
                    groups: serde_json::Value::from(groups).to_string(),
                    subscription: s.subscription.as_str().to_owned(),
                    ask: s.ask,
                    approved: s.approved,
                    at_us: micros(e),
                    event_id: e.id.to_string(),
                });
            }
            Event::RosterItemRemoved(r) => ops.push(RosterOp::Remove {
                owner: r.user.as_str().to_owned(),
                contact: r.contact.as_str().to_owned(),
            }),
            _ => {}
        }
    }
    ops
}

/// A change to a session's row, applied in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionOp {
    /// What happened.
    pub step: SessionStep,
    /// Session id.
    pub session_id: String,
    /// The user (bare).
    pub user: String,
    /// Protocol.
    pub protocol: String,
    /// Producing node.
    pub node: String,
    /// Event time.
    pub at_us: i64,
    /// Client address.
    pub remote_addr: Option<String>,
    /// Mechanism.
    pub mechanism: Option<String>,
    /// TLS.
    pub tls: Option<bool>,
    /// Failure or end reason.
    pub reason: Option<String>,
    /// Failure or end text.
    pub text: Option<String>,
    /// Full address.
    pub full_jid: Option<String>,
    /// Client name.
    pub client_name: Option<String>,
    /// Client version.
    pub client_version: Option<String>,
    /// Client operating system.
    pub client_os: Option<String>,
    /// User agent.
    pub user_agent: Option<String>,
    /// SIP contact.
    pub sip_contact: Option<String>,
}

/// The session event a [`SessionOp`] comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionStep {
    /// `session.login_attempted`.
    Attempted,
    /// `session.login_succeeded`.
    Succeeded,
    /// `session.login_failed`.
    Failed,
    /// `session.resource_bound`.
    Bound,
    /// `session.ended`.
    Ended,
}

/// Session changes of a batch.
pub fn session_ops(items: &[Item<'_>]) -> Vec<SessionOp> {
    let mut ops = Vec::new();
    for e in items.iter().filter_map(|i| i.envelope.as_ref()) {
        let base = |step, session_id: &uuid::Uuid, user: &str, protocol: &str| SessionOp {
            step,
            session_id: session_id.to_string(),
            user: user.to_owned(),
            protocol: protocol.to_owned(),
            node: e.node.as_str().to_owned(),
            at_us: micros(e),
            remote_addr: None,
            mechanism: None,
            tls: None,
            reason: None,
            text: None,
            full_jid: None,
            client_name: None,
            client_version: None,
            client_os: None,
            user_agent: None,
            sip_contact: None,
        };
        let op = match &e.event {
            Event::SessionLoginAttempted(a) => SessionOp {
                remote_addr: Some(a.remote_addr.clone()),
                mechanism: Some(a.mechanism.as_str().to_owned()),
                tls: Some(a.tls),
                ..base(
                    SessionStep::Attempted,
                    &a.session_id,
                    a.user.as_str(),
                    a.protocol.as_str(),
                )
            },
            Event::SessionLoginSucceeded(s) => SessionOp {
                remote_addr: Some(s.remote_addr.clone()),
                mechanism: Some(s.mechanism.as_str().to_owned()),
                ..base(
                    SessionStep::Succeeded,
                    &s.session_id,
                    s.user.as_str(),
                    s.protocol.as_str(),
                )
            },
            Event::SessionLoginFailed(f) => SessionOp {
                remote_addr: Some(f.remote_addr.clone()),
                mechanism: Some(f.mechanism.as_str().to_owned()),
                reason: Some(f.reason.as_str().to_owned()),
                text: f.text.clone(),
                ..base(
                    SessionStep::Failed,
                    &f.session_id,
                    f.user.as_str(),
                    f.protocol.as_str(),
                )
            },
            Event::SessionResourceBound(b) => SessionOp {
                full_jid: Some(b.full_jid.as_str().to_owned()),
                client_name: b.client.name.clone(),
                client_version: b.client.version.clone(),
                client_os: b.client.os.clone(),
                user_agent: b.client.user_agent.clone(),
                sip_contact: b.contact.clone(),
                ..base(
                    SessionStep::Bound,
                    &b.session_id,
                    bare(b.full_jid.as_str()),
                    b.protocol.as_str(),
                )
            },
            Event::SessionEnded(x) => SessionOp {
                reason: Some(x.reason.as_str().to_owned()),
                text: x.text.clone(),
                full_jid: x.full_jid.as_ref().map(|j| j.as_str().to_owned()),
                ..base(
                    SessionStep::Ended,
                    &x.session_id,
                    x.user.as_str(),
                    x.protocol.as_str(),
                )
            },
            _ => continue,
        };
        ops.push(op);
    }
    ops
}

/// One row of the chat archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveRow {
    /// Bare address of the archive's owner (a user, or a room).
    pub owner: String,
    /// The event id (UUIDv7): time-ordered and unique.
    pub archive_id: String,
    /// Event time.
    pub at_us: i64,
    /// Bare address of the other side.
    pub peer: String,
    /// Full address of the other side, if known.
    pub peer_full: Option<String>,
    /// `out`, `in` or `groupchat`.
    pub direction: &'static str,
    /// Message type.
    pub kind: String,
    /// The stable message id.
    pub message_id: String,
    /// Full address of the sender.
    pub sender: String,
    /// Room nickname of the sender.
    pub nick: Option<String>,
    /// Thread.
    pub thread: Option<String>,
    /// Subject.
    pub subject: Option<String>,
    /// Body.
    pub body: Option<String>,
    /// Stanza as received.
    pub stanza: String,
}

/// Archive rows of a batch. XEP-0313 §7 (business rules): messages with a
/// body are archived, of type chat or normal (and headline); errors and
/// bodiless messages (chat states, receipts) are not. A 1:1 message gives a
/// row in the sender's archive (`out`) and, when the recipient's domain is
/// served here (`is_local`), one in the recipient's (`in`), both with the
/// same archive id. Room messages go to the room's archive.
pub fn archive_rows(items: &[Item<'_>], is_local: &dyn Fn(&str) -> bool) -> Vec<ArchiveRow> {
    let mut rows = Vec::new();
    for e in items.iter().filter_map(|i| i.envelope.as_ref()) {
        match &e.event {
            Event::MessageSubmitted(m) => {
                if matches!(m.kind, MessageKind::Error | MessageKind::Groupchat) || m.body.is_none()
                {
                    continue;
                }
                let sender_bare = bare(m.from.as_str()).to_owned();
                let recipient_bare = bare(&m.to).to_owned();
                let to_full = (m.to.contains('/')).then(|| m.to.clone());
                let out = ArchiveRow {
                    owner: sender_bare.clone(),
                    archive_id: e.id.to_string(),
                    at_us: micros(e),
                    peer: recipient_bare.clone(),
                    peer_full: to_full,
                    direction: "out",
                    kind: m.kind.as_str().to_owned(),
                    message_id: m.message_id.clone(),
                    sender: m.from.as_str().to_owned(),
                    nick: None,
                    thread: m.thread.clone(),
                    subject: m.subject.clone(),
                    body: m.body.clone(),
                    stanza: m.stanza.clone(),
                };
                let inbound = (recipient_bare != sender_bare && is_local(domain(&recipient_bare)))
                    .then(|| ArchiveRow {
                        owner: recipient_bare,
                        peer: sender_bare,
                        peer_full: Some(m.from.as_str().to_owned()),
                        direction: "in",
                        ..out.clone()
                    });
                rows.push(out);
                rows.extend(inbound);
            }
            Event::RoomMessage(m) => {
                if m.body.is_none() {
                    continue;
                }
                rows.push(ArchiveRow {
                    owner: m.room.as_str().to_owned(),
                    archive_id: e.id.to_string(),
                    at_us: micros(e),
                    peer: bare(m.from.as_str()).to_owned(),
                    peer_full: Some(m.from.as_str().to_owned()),
                    direction: "groupchat",
                    kind: "groupchat".to_owned(),
                    message_id: m.message_id.clone(),
                    sender: m.from.as_str().to_owned(),
                    nick: Some(m.from_nick.clone()),
                    thread: None,
                    subject: None,
                    body: m.body.clone(),
                    stanza: m.stanza.clone(),
                });
            }
            _ => {}
        }
    }
    rows
}

/// One row of the file-transfer log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileRow {
    /// Event id: the log's sequence.
    pub id: String,
    /// Event time.
    pub at_us: i64,
    /// Transfer id.
    pub transfer_id: String,
    /// `upload` or `download`.
    pub direction: &'static str,
    /// `started`, `completed` or `failed`.
    pub status: &'static str,
    /// Uploader.
    pub uploader: String,
    /// Downloader.
    pub downloader: Option<String>,
    /// Where the file was shared.
    pub to_jid: String,
    /// Stored name.
    pub stored_name: String,
    /// Real name.
    pub real_name: String,
    /// Storage path.
    pub path: String,
    /// Size in bytes.
    pub size: i64,
    /// Bytes transferred.
    pub bytes_transferred: Option<i64>,
    /// Transfer mechanism.
    pub transport: String,
    /// Declared MIME type.
    pub content_type: Option<String>,
    /// Upload a download refers to.
    pub upload_id: Option<String>,
    /// Failure reason.
    pub failure_reason: Option<String>,
    /// Failure text.
    pub failure_text: Option<String>,
}

/// File-transfer log rows of a batch (SPEC.md §9).
pub fn file_rows(items: &[Item<'_>]) -> Vec<FileRow> {
    let mut rows = Vec::new();
    for e in items.iter().filter_map(|i| i.envelope.as_ref()) {
        macro_rules! row {
            ($f:expr, $dir:literal, $status:literal, $uploader:expr, $downloader:expr,
             $bytes:expr, $ctype:expr, $upload:expr, $reason:expr, $text:expr) => {
                FileRow {
                    id: e.id.to_string(),
                    at_us: micros(e),
                    transfer_id: $f.transfer_id.to_string(),
                    direction: $dir,
                    status: $status,
                    uploader: $uploader,
                    downloader: $downloader,
                    to_jid: $f.to.clone(),
                    stored_name: $f.stored_name.clone(),
                    real_name: $f.real_name.clone(),
                    path: $f.path.clone(),
                    size: saturating_i64($f.size),
                    bytes_transferred: $bytes,
                    transport: $f.method.as_str().to_owned(),
                    content_type: $ctype,
                    upload_id: $upload,
                    failure_reason: $reason,
                    failure_text: $text,
                }
            };
        }
        let row = match &e.event {
            Event::FileUploadStarted(f) => row!(
                f,
                "upload",
                "started",
                f.uploader.as_str().to_owned(),
                None,
                None,
                f.content_type.clone(),
                None,
                None,
                None
            ),
            Event::FileUploadCompleted(f) => row!(
                f,
                "upload",
                "completed",
                f.uploader.as_str().to_owned(),
                None,
                Some(saturating_i64(f.bytes_transferred)),
                None,
                None,
                None,
                None
            ),
            Event::FileUploadFailed(f) => row!(
                f,
                "upload",
                "failed",
                f.uploader.as_str().to_owned(),
                None,
                Some(saturating_i64(f.bytes_transferred)),
                None,
                None,
                Some(f.reason.as_str().to_owned()),
                f.text.clone()
            ),
            Event::FileDownloadStarted(f) => row!(
                f,
                "download",
                "started",
                f.uploader.as_str().to_owned(),
                Some(f.downloader.as_str().to_owned()),
                None,
                None,
                Some(f.upload_id.to_string()),
                None,
                None
            ),
            Event::FileDownloadCompleted(f) => row!(
                f,
                "download",
                "completed",
                f.uploader.as_str().to_owned(),
                Some(f.downloader.as_str().to_owned()),
                Some(saturating_i64(f.bytes_transferred)),
                None,
                Some(f.upload_id.to_string()),
                None,
                None
            ),
            Event::FileDownloadFailed(f) => row!(
                f,
                "download",
                "failed",
                f.uploader.as_str().to_owned(),
                Some(f.downloader.as_str().to_owned()),
                Some(saturating_i64(f.bytes_transferred)),
                None,
                Some(f.upload_id.to_string()),
                Some(f.reason.as_str().to_owned()),
                f.text.clone()
            ),
            _ => continue,
        };
        rows.push(row);
    }
    rows
}

/// Compliance entries of a batch (not yet chained). A record that is not a
/// readable event is kept too (type `undecodable`, id
/// `topic/partition/offset`): the log never silently loses input.
pub fn compliance_entries(items: &[Item<'_>], profile: &Profile) -> Vec<ComplianceRecord> {
    let mut out = Vec::new();
    for item in items {
        let r = item.record;
        let Some(value) = r.value.as_deref() else {
            continue;
        };
        let (event_id, event_type, subject, at_us) = match &item.envelope {
            Some(e) => {
                if !profile.records(e.event.event_type()) {
                    continue;
                }
                (
                    e.id.to_string(),
                    e.event.event_type().to_owned(),
                    e.subject.clone(),
                    micros(e),
                )
            }
            None => (
                format!("{}/{}/{}", r.topic, r.partition, r.offset),
                "undecodable".to_owned(),
                String::from_utf8_lossy(&r.key).into_owned(),
                r.timestamp_ms.saturating_mul(1000),
            ),
        };
        out.push(ComplianceRecord {
            seq: 0,
            event_id,
            event_type,
            subject,
            at_us,
            topic: r.topic.to_string(),
            partition: r.partition,
            offset: r.offset,
            record: String::from_utf8_lossy(value).into_owned(),
            prev_hash: String::new(),
            hash: String::new(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use switchboard_schemas::events::{
        MessageSubmitted, RosterItemRemoved, RosterItemSet, Subscription,
    };
    use switchboard_schemas::{BareJid, FullJid, NodeId};

    use super::*;

    fn record(e: &Envelope, offset: i64) -> Record {
        Record {
            topic: Arc::from("t"),
            partition: 0,
            offset,
            key: e.subject.clone().into_bytes().into(),
            value: Some(e.to_json_vec().unwrap().into()),
            timestamp_ms: 0,
        }
    }

    fn env(subject: &str, event: impl Into<Event>) -> Envelope {
        Envelope::new(NodeId::new("n1"), subject, event)
    }

    fn message(to: &str, body: Option<&str>, kind: MessageKind) -> Envelope {
        env(
            "alice@example.com",
            MessageSubmitted {
                message_id: "m1".to_owned(),
                from: FullJid::new("alice@example.com/phone"),
                to: to.to_owned(),
                kind,
                body: body.map(str::to_owned),
                thread: None,
                subject: None,
                stanza: "<message/>".to_owned(),
            },
        )
    }

    #[test]
    fn a_local_message_is_archived_on_both_sides_with_one_id() {
        let envs = [
            message("bob@example.com/laptop", Some("hi"), MessageKind::Chat),
            message("carol@elsewhere.org", Some("hi"), MessageKind::Chat),
            message("bob@example.com", None, MessageKind::Chat),
            message("bob@example.com", Some("x"), MessageKind::Error),
        ];
        let records: Vec<Record> = envs
            .iter()
            .enumerate()
            .map(|(i, e)| record(e, i as i64))
            .collect();
        let items: Vec<Item<'_>> = records.iter().map(Item::decode).collect();
        let rows = archive_rows(&items, &|d| d == "example.com");
        assert_eq!(rows.len(), 3, "{rows:#?}");
        let (out, inbound) = (&rows[0], &rows[1]);
        assert_eq!(
            (out.owner.as_str(), out.peer.as_str(), out.direction),
            ("alice@example.com", "bob@example.com", "out")
        );
        assert_eq!(out.peer_full.as_deref(), Some("bob@example.com/laptop"));
        assert_eq!(
            (
                inbound.owner.as_str(),
                inbound.peer.as_str(),
                inbound.direction
            ),
            ("bob@example.com", "alice@example.com", "in")
        );
        assert_eq!(
            inbound.peer_full.as_deref(),
            Some("alice@example.com/phone")
        );
        assert_eq!(out.archive_id, inbound.archive_id);
        assert_eq!(out.archive_id, envs[0].id.to_string());
        assert_eq!(
            rows[2].owner, "alice@example.com",
            "remote recipient: only the sender's side"
        );
    }

    #[test]
    fn roster_ops_keep_order_and_sort_groups() {
        let envs = [
            env(
                "a@x",
                RosterItemSet {
                    user: BareJid::new("a@x"),
                    contact: BareJid::new("b@x"),
                    name: Some("B".to_owned()),
                    groups: vec!["z".to_owned(), "a".to_owned(), "z".to_owned()],
                    subscription: Subscription::Both,
                    ask: false,
                    approved: false,
                },
            ),
            env(
                "a@x",
                RosterItemRemoved {
                    user: BareJid::new("a@x"),
                    contact: BareJid::new("b@x"),
                },
            ),
        ];
        let records: Vec<Record> = envs
            .iter()
            .enumerate()
            .map(|(i, e)| record(e, i as i64))
            .collect();
        let items: Vec<Item<'_>> = records.iter().map(Item::decode).collect();
        let ops = roster_ops(&items);
        assert!(
            matches!(&ops[0], RosterOp::Set { groups, subscription, .. } if groups == "[\"a\",\"z\"]" && subscription == "both")
        );
        assert!(matches!(&ops[1], RosterOp::Remove { contact, .. } if contact == "b@x"));
    }

    #[test]
    fn compliance_keeps_undecodable_records() {
        let r = Record {
            topic: Arc::from("switchboard.messages"),
            partition: 2,
            offset: 7,
            key: b"k".to_vec().into(),
            value: Some(b"not json".to_vec().into()),
            timestamp_ms: 5,
        };
        let items = [Item::decode(&r)];
        let entries = compliance_entries(&items, &Profile::default());
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].event_id, "switchboard.messages/2/7");
        assert_eq!(entries[0].event_type, "undecodable");
        assert_eq!(entries[0].record, "not json");
    }
}
