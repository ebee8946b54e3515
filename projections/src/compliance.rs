//! The compliance log (SPEC.md §10): every event of the compliance profile,
//! append-only and tamper-evident.
//!
//! Records are numbered 1, 2, 3 … without gaps (`seq`). Each carries the
//! SHA-256 of the previous record (`prev_hash`; 32 zero bytes for the first)
//! and its own hash over a canonical encoding of its fields
//! ([`record_hash`]), so editing a record breaks its own hash, deleting one
//! breaks the numbering and the next record's `prev_hash`, and deleting the
//! newest ones disagrees with the chain head (`compliance_head`).
//! [`crate::Database::verify_compliance`] walks the chain and names the first
//! bad record.
//!
//! The log holds the event exactly as it was read from the bus (`record`),
//! so it is evidence in its own right.

use sha2::{Digest, Sha256};
use switchboard_infra::config::ComplianceSettings;
use switchboard_schemas::topics::Topic;

/// The hash before the first record: 32 zero bytes, hex.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain separation prefix of the canonical encoding; a new encoding gets a
/// new prefix.
const ENCODING_V1: &[u8] = b"switchboard-compliance-v1\n";

/// Which events the compliance log records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// The log runs at all.
    pub enabled: bool,
    /// `message.*`.
    pub messages: bool,
    /// `room.joined`, `room.left`.
    pub room_joins_exits: bool,
    /// `room.message`, `room.subject_changed`.
    pub room_messages: bool,
    /// `file.*`.
    pub file_transfers: bool,
    /// `session.*` except node heartbeats.
    pub logins: bool,
    /// `presence.*`.
    pub presence: bool,
}

impl Default for Profile {
    fn default() -> Self {
        Self::from(&ComplianceSettings::default())
    }
}

impl From<&ComplianceSettings> for Profile {
    fn from(s: &ComplianceSettings) -> Self {
        Self {
            enabled: s.enabled,
            messages: s.messages,
            room_joins_exits: s.room_joins_exits,
            room_messages: s.room_messages,
            file_transfers: s.file_transfers,
            logins: s.logins,
            presence: s.presence,
        }
    }
}

impl Profile {
    /// Whether an event of this type is recorded. Unknown types of a
    /// recorded family (newer versions, new events) are recorded too.
    pub fn records(&self, event_type: &str) -> bool {
        if !self.enabled {
            return false;
        }
        let (family, name) = event_type.split_once('.').unwrap_or((event_type, ""));
        match family {
            "message" => self.messages,
            "room" => match name {
                "joined" | "left" => self.room_joins_exits,
                "message" | "subject_changed" => self.room_messages,
                _ => false,
            },
            "file" => self.file_transfers,
            "session" => self.logins && name != "node_heartbeat",
            "presence" => self.presence && name != "composed",
            _ => false,
        }
    }

    /// The topics holding the recorded events.
    pub fn topics(&self) -> Vec<Topic> {
        if !self.enabled {
            return Vec::new();
        }
        let mut topics = Vec::new();
        if self.logins {
            topics.push(Topic::Sessions);
        }
        if self.presence {
            topics.push(Topic::Presence);
        }
        if self.messages {
            topics.push(Topic::Messages);
        }
        if self.room_joins_exits || self.room_messages {
            topics.push(Topic::Rooms);
        }
        if self.file_transfers {
            topics.push(Topic::Files);
        }
        topics
    }
}

/// One record of the compliance log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComplianceRecord {
    /// Position in the chain, from 1.
    pub seq: i64,
    /// The event id (or `topic/partition/offset` for a record that is not a
    /// readable event).
    pub event_id: String,
    /// The event type (`undecodable` for a record that is not an event).
    pub event_type: String,
    /// The event's subject (the record key).
    pub subject: String,
    /// When the event occurred, microseconds since the Unix epoch.
    pub at_us: i64,
    /// Topic the event was read from.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The event as stored on the bus (JSON).
    pub record: String,
    /// Hex SHA-256 of the previous record.
    pub prev_hash: String,
    /// Hex SHA-256 of this record.
    pub hash: String,
}

/// The SHA-256 of a record, hex: over `ENCODING_V1`, then every field in
/// declaration order, integers as fixed-width big-endian, strings as a
/// big-endian u64 byte length followed by their UTF-8 bytes, and the
/// previous hash as its hex text (length-prefixed like any string).
pub fn record_hash(r: &ComplianceRecord) -> String {
    record_hash_at(r, r.seq, &r.prev_hash)
}

/// [`record_hash`] of `r` as it would be at `seq` after `prev_hash` (the
/// writer chains records without copying them).
pub(crate) fn record_hash_at(r: &ComplianceRecord, seq: i64, prev_hash: &str) -> String {
    let mut h = Sha256::new();
    h.update(ENCODING_V1);
    h.update(seq.to_be_bytes());
    for s in [&r.event_id, &r.event_type, &r.subject] {
        field(&mut h, s);
    }
    h.update(r.at_us.to_be_bytes());
    field(&mut h, &r.topic);
    h.update(r.partition.to_be_bytes());
    h.update(r.offset.to_be_bytes());
    field(&mut h, &r.record);
    field(&mut h, prev_hash);
    hex(&h.finalize())
}

fn field(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

/// The event type of an audit record: a query of the compliance API.
pub const AUDIT_EVENT_TYPE: &str = "compliance.query";

/// The `topic` of an audit record: it was not read from the bus but written
/// by the API (its partition and offset are -1).
pub const AUDIT_TOPIC: &str = "api";

/// A query of the compliance API, recorded in the compliance log before it
/// is answered (SPEC.md §10: who asked what, when).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryAudit {
    /// The token's id.
    pub token_id: String,
    /// The token's name (who asked).
    pub token_name: String,
    /// The token's role.
    pub role: String,
    /// The operation (`GET /api/v1/archive/search` ...).
    pub operation: String,
    /// The validated parameters (what was asked).
    pub parameters: std::collections::BTreeMap<String, String>,
    /// When, microseconds since the Unix epoch.
    pub at_us: i64,
}

impl QueryAudit {
    /// The log entry (not yet chained): a fresh UUIDv7 as the event id, the
    /// token's name as the subject and the audit as a JSON `record`.
    pub fn entry(&self) -> ComplianceRecord {
        let event_id = uuid::Uuid::now_v7().to_string();
        let record = serde_json::json!({
            "id": event_id,
            "type": AUDIT_EVENT_TYPE,
            "version": 1,
            "occurred_at_us": self.at_us,
            "token_id": self.token_id,
            "token_name": self.token_name,
            "role": self.role,
            "operation": self.operation,
            "parameters": self.parameters,
        });
        ComplianceRecord {
            seq: 0,
            event_id,
            event_type: AUDIT_EVENT_TYPE.to_owned(),
            subject: self.token_name.clone(),
            at_us: self.at_us,
            topic: AUDIT_TOPIC.to_owned(),
            partition: -1,
            offset: -1,
            record: record.to_string(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }
}

/// What is wrong with a chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Break {
    /// A record is missing: `expected` should follow the previous record, the
    /// next one present is `found` (`None`: the chain ends early, the head
    /// names a later record).
    Missing {
        /// The missing sequence number.
        expected: i64,
        /// The record found in its place.
        found: Option<i64>,
    },
    /// The record's stored hash is not the hash of its contents (it was
    /// edited).
    HashMismatch {
        /// The record.
        seq: i64,
    },
    /// The record does not carry the previous record's hash.
    PrevHashMismatch {
        /// The record.
        seq: i64,
    },
    /// The head names a different newest record than the chain ends with.
    HeadMismatch {
        /// The head's sequence number.
        head_seq: i64,
        /// The last record in the table.
        last_seq: i64,
    },
}

impl Break {
    /// The first bad record's sequence number.
    pub fn seq(&self) -> i64 {
        match self {
            Break::Missing { expected, .. } => *expected,
            Break::HashMismatch { seq } | Break::PrevHashMismatch { seq } => *seq,
            Break::HeadMismatch { last_seq, .. } => last_seq + 1,
        }
    }
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Break::Missing {
                expected,
                found: Some(found),
            } => write!(
                f,
                "record {expected} is missing (the chain jumps to record {found})"
            ),
            Break::Missing {
                expected,
                found: None,
            } => write!(f, "record {expected} is missing (the chain ends before it)"),
            Break::HashMismatch { seq } => {
                write!(
                    f,
                    "record {seq} was altered (its hash does not match its contents)"
                )
            }
            Break::PrevHashMismatch { seq } => write!(
                f,
                "record {seq} does not follow record {} (previous hash differs)",
                seq - 1
            ),
            Break::HeadMismatch { head_seq, last_seq } => write!(
                f,
                "the chain head names record {head_seq} but the log ends at record {last_seq}"
            ),
        }
    }
}

/// The outcome of a verification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    /// Records checked.
    pub records: i64,
    /// The hash of the newest record checked.
    pub head_hash: String,
    /// The first break, if any.
    pub broken: Option<Break>,
}

/// Checks records in `seq` order, continuing from the state of earlier calls.
#[derive(Debug)]
pub(crate) struct Verifier {
    pub(crate) expected_seq: i64,
    pub(crate) prev_hash: String,
}

impl Default for Verifier {
    fn default() -> Self {
        Self {
            expected_seq: 1,
            prev_hash: GENESIS_HASH.to_owned(),
        }
    }
}

impl Verifier {
    /// Checks the next record.
    pub(crate) fn check(&mut self, r: &ComplianceRecord) -> Result<(), Break> {
        if r.seq != self.expected_seq {
            return Err(Break::Missing {
                expected: self.expected_seq,
                found: Some(r.seq),
            });
        }
        if record_hash(r) != r.hash {
            return Err(Break::HashMismatch { seq: r.seq });
        }
        if r.prev_hash != self.prev_hash {
            return Err(Break::PrevHashMismatch { seq: r.seq });
        }
        self.expected_seq += 1;
        self.prev_hash.clone_from(&r.hash);
        Ok(())
    }

    /// Checks the end of the chain against the head.
    pub(crate) fn finish(&self, head_seq: i64, head_hash: &str) -> Result<(), Break> {
        let last_seq = self.expected_seq - 1;
        if head_seq > last_seq {
            return Err(Break::Missing {
                expected: last_seq + 1,
                found: None,
            });
        }
        if head_seq != last_seq || head_hash != self.prev_hash {
            return Err(Break::HeadMismatch { head_seq, last_seq });
        }
        Ok(())
    }
}

/// Builds chained records from entries (with `seq`, `prev_hash` and `hash`
/// still empty), continuing after `(head_seq, head_hash)`. Returns the new
/// head.
pub(crate) fn chain(
    entries: &mut [ComplianceRecord],
    head_seq: i64,
    head_hash: &str,
) -> (i64, String) {
    let mut seq = head_seq;
    let mut prev = head_hash.to_owned();
    for e in entries.iter_mut() {
        seq += 1;
        e.seq = seq;
        e.prev_hash = prev;
        e.hash = record_hash(e);
        prev = e.hash.clone();
    }
    (seq, prev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: i64) -> ComplianceRecord {
        ComplianceRecord {
            seq: 0,
            event_id: format!("id-{n}"),
            event_type: "message.submitted".to_owned(),
            subject: "alice@example.com".to_owned(),
            at_us: 1_700_000_000_000_000 + n,
            topic: "switchboard.messages".to_owned(),
            partition: 3,
            offset: n,
            record: format!("{{\"n\":{n}}}"),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    fn chained(n: i64) -> Vec<ComplianceRecord> {
        let mut v: Vec<_> = (0..n).map(entry).collect();
        chain(&mut v, 0, GENESIS_HASH);
        v
    }

    fn verify(records: &[ComplianceRecord], head: (i64, &str)) -> Result<(), Break> {
        let mut v = Verifier::default();
        for r in records {
            v.check(r)?;
        }
        v.finish(head.0, head.1)
    }

    #[test]
    fn sha256_matches_the_standard_vector() {
        assert_eq!(
            hex(&Sha256::digest(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn intact_chain_verifies_and_chains_continue() {
        let mut v = chained(3);
        let (seq, hash) = (v[2].seq, v[2].hash.clone());
        let mut more = vec![entry(3), entry(4)];
        let head = chain(&mut more, seq, &hash);
        v.extend(more);
        assert_eq!(verify(&v, (head.0, &head.1)), Ok(()));
        assert_eq!(v.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
    }

    #[test]
    fn every_field_is_covered_by_the_hash() {
        let base = chained(1).remove(0);
        let edits: Vec<fn(&mut ComplianceRecord)> = vec![
            |r| r.seq += 1,
            |r| r.event_id.push('x'),
            |r| r.event_type.push('x'),
            |r| r.subject.push('x'),
            |r| r.at_us += 1,
            |r| r.topic.push('x'),
            |r| r.partition += 1,
            |r| r.offset += 1,
            |r| r.record.push(' '),
            |r| r.prev_hash = "1".repeat(64),
        ];
        for edit in edits {
            let mut r = base.clone();
            edit(&mut r);
            assert_ne!(record_hash(&r), base.hash, "{r:?}");
        }
        // Moving bytes between adjacent fields changes the hash too.
        let mut a = base.clone();
        a.event_id = "ab".to_owned();
        a.event_type = "c".to_owned();
        let mut b = base;
        b.event_id = "a".to_owned();
        b.event_type = "bc".to_owned();
        assert_ne!(record_hash(&a), record_hash(&b));
    }

    #[test]
    fn edits_and_deletions_name_the_first_bad_record() {
        let v = chained(5);
        let head = (5, v[4].hash.as_str());
        let mut edited = v.clone();
        edited[2].record = "{\"n\":99}".to_owned();
        assert_eq!(verify(&edited, head), Err(Break::HashMismatch { seq: 3 }));

        let mut rehashed = edited.clone();
        rehashed[2].hash = record_hash(&rehashed[2]);
        assert_eq!(
            verify(&rehashed, head),
            Err(Break::PrevHashMismatch { seq: 4 })
        );

        let mut deleted = v.clone();
        deleted.remove(1);
        let err = verify(&deleted, head).unwrap_err();
        assert_eq!(
            err,
            Break::Missing {
                expected: 2,
                found: Some(3)
            }
        );
        assert_eq!(err.seq(), 2);

        let truncated = &v[..3];
        assert_eq!(
            verify(truncated, head),
            Err(Break::Missing {
                expected: 4,
                found: None
            })
        );
    }

    #[test]
    fn profile_selects_families() {
        let p = Profile::default();
        assert!(p.records("message.submitted"));
        assert!(p.records("message.reacted"), "unknown events of a family");
        assert!(p.records("room.joined") && p.records("room.left"));
        assert!(p.records("room.message"));
        assert!(!p.records("room.configured"));
        assert!(p.records("file.download_completed"));
        assert!(p.records("session.login_failed"));
        assert!(!p.records("session.node_heartbeat"));
        assert!(!p.records("presence.device"), "presence is off by default");
        assert!(!p.records("user.provisioned"));
        let off = Profile {
            enabled: false,
            ..p
        };
        assert!(!off.records("message.submitted"));
        assert!(off.topics().is_empty());
        let no_rooms = Profile {
            enabled: true,
            room_joins_exits: false,
            room_messages: false,
            ..off
        };
        assert!(!no_rooms.topics().contains(&Topic::Rooms));
        assert!(no_rooms.topics().contains(&Topic::Messages));
    }
}
