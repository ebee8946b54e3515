//! The projections on both SQL backends (SQLite file, PostgreSQL schema),
//! fed from the embedded log: every projection's rows, replay equality
//! through `switchboard replay`, tamper detection through `switchboard
//! compliance verify`, kill -9 during ingest, fencing of stale writers,
//! duplicate events, lag and readiness.
//!
//! PostgreSQL comes from `infra/scripts/postgres.sh start`
//! (`SWITCHBOARD_TEST_POSTGRES` overrides the url of database
//! switchboard_test); each test works in a schema of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchboard_infra::bus::embedded::{EmbeddedBus, EmbeddedConfig};
use switchboard_infra::bus::{Bus, TopicConfig, TopicPartition};
use switchboard_projections::db::{Applied, Ops, PositionUpdate};
use switchboard_projections::rows::ArchiveRow;
use switchboard_projections::{Database, ProjectionKind, RunnerConfig, Status, runner};
use switchboard_schemas::events::*;
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{BareJid, Envelope, Event, FullJid, NodeId, RoomJid};

const PREFIX: &str = "switchboard";

/// One SQL backend plus a data directory holding the embedded log.
#[async_trait]
trait DbFixture: Send + Sync {
    /// The data directory (bus log and, for SQLite, the database).
    fn data_dir(&self) -> &std::path::Path;
    /// `database.url` for the binary (empty: SQLite under the data dir).
    fn url(&self) -> String;
    /// Opens the database.
    async fn open(&self) -> Database {
        switchboard_projections::Database::open(
            &self.url(),
            &self.data_dir().join(switchboard_projections::SQLITE_FILE),
        )
        .await
        .expect("open projections database")
    }
    /// Changes the compliance log behind the projections' back (as someone
    /// with database rights could): `statements` run with the append-only
    /// guard lifted.
    async fn tamper(&self, db: &Database, statements: &[&str]);
}

struct SqliteFixture {
    dir: tempfile::TempDir,
}

impl SqliteFixture {
    async fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

#[async_trait]
impl DbFixture for SqliteFixture {
    fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }
    fn url(&self) -> String {
        String::new()
    }
    async fn tamper(&self, db: &Database, statements: &[&str]) {
        let Database::Sqlite { compliance, .. } = db else {
            panic!("not sqlite")
        };
        let pool = &compliance.write;
        let mut tx = pool.begin().await.unwrap();
        for s in [
            "DROP TRIGGER IF EXISTS compliance_log_no_update",
            "DROP TRIGGER IF EXISTS compliance_log_no_delete",
        ]
        .iter()
        .chain(statements)
        {
            sqlx::query(sqlx::AssertSqlSafe(*s))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
}

struct PostgresFixture {
    dir: tempfile::TempDir,
    url: String,
}

impl PostgresFixture {
    async fn new() -> Self {
        let (_, url) = switchboard_projections::testing::postgres_schema("projections").await;
        Self {
            dir: tempfile::tempdir().unwrap(),
            url,
        }
    }
}

#[async_trait]
impl DbFixture for PostgresFixture {
    fn data_dir(&self) -> &std::path::Path {
        self.dir.path()
    }
    fn url(&self) -> String {
        self.url.clone()
    }
    async fn tamper(&self, db: &Database, statements: &[&str]) {
        let pool = db.postgres().unwrap();
        let mut tx = pool.begin().await.unwrap();
        for s in ["ALTER TABLE compliance_log DISABLE TRIGGER USER"]
            .iter()
            .chain(statements)
            .chain(&["ALTER TABLE compliance_log ENABLE TRIGGER USER"])
        {
            sqlx::query(sqlx::AssertSqlSafe(*s))
                .execute(&mut *tx)
                .await
                .unwrap();
        }
        tx.commit().await.unwrap();
    }
}

async fn open_bus(f: &dyn DbFixture) -> EmbeddedBus {
    let mut c = EmbeddedConfig::new(f.data_dir().join("bus.sqlite"));
    c.maintenance_interval = Duration::from_secs(3600);
    let bus = EmbeddedBus::open(c).await.expect("open log");
    bus.create_topics(&TopicConfig::catalogue(PREFIX))
        .await
        .unwrap();
    bus
}

fn command(f: &dyn DbFixture) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD__") {
            cmd.env_remove(k);
        }
    }
    cmd.env("SWITCHBOARD_LOG", "warn")
        .env("SWITCHBOARD__DATA_DIR", f.data_dir())
        .env("SWITCHBOARD__BUS__BACKEND", "embedded")
        .env("SWITCHBOARD__DATABASE__URL", f.url())
        .env("SWITCHBOARD__DOMAINS", "[\"example.com\"]")
        .kill_on_drop(true);
    cmd
}

/// Runs the binary to completion: (success, stdout).
async fn run_cli(f: &dyn DbFixture, args: &[&str]) -> (bool, String) {
    let out = command(f)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .await
        .expect("run switchboard");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn runner_config() -> Arc<RunnerConfig> {
    Arc::new(RunnerConfig {
        local_domains: vec!["example.com".to_owned()],
        ..RunnerConfig::new(PREFIX)
    })
}

async fn produce(bus: &dyn Bus, envelopes: &[Envelope]) {
    for e in envelopes {
        let topic = full_name(PREFIX, e.topic().expect("catalogue event"));
        bus.produce(
            &topic,
            e.subject.as_bytes(),
            Some(&e.to_json_vec().unwrap()),
        )
        .await
        .unwrap();
    }
}

/// Every projection to the log's end. A batch that fails every time (the
/// runner retries it with backoff) fails the test here instead of hanging it.
async fn catch_up_all(bus: &EmbeddedBus, db: &Database) {
    for kind in ProjectionKind::ALL {
        let caught_up = runner::catch_up(Arc::new(bus.clone()), db.clone(), kind, runner_config());
        tokio::time::timeout(Duration::from_secs(60), caught_up)
            .await
            .unwrap_or_else(|_| panic!("{kind} did not catch up in 60 s"))
            .unwrap();
    }
}

fn env(subject: &str, event: impl Into<Event>) -> Envelope {
    Envelope::new(NodeId::new("node1"), subject, event)
}

fn chat(from: &str, to: &str, id: &str, body: &str) -> Envelope {
    let bare = from.split('/').next().unwrap();
    env(
        bare,
        MessageSubmitted {
            message_id: id.to_owned(),
            from: FullJid::new(from),
            to: to.to_owned(),
            kind: MessageKind::Chat,
            body: Some(body.to_owned()),
            thread: Some("t1".to_owned()),
            subject: None,
            stanza: format!("<message type='chat' id='{id}'><body>{body}</body></message>"),
        },
    )
}

/// A bit of everything the projections read.
fn scenario() -> Vec<Envelope> {
    let sid = uuid::Uuid::now_v7();
    let failed = uuid::Uuid::now_v7();
    let upload = uuid::Uuid::now_v7();
    let alice = || BareJid::new("alice@example.com");
    let item = |contact: &str, subscription, groups: &[&str]| RosterItemSet {
        user: alice(),
        contact: BareJid::new(contact),
        name: Some(contact.split('@').next().unwrap().to_uppercase()),
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        subscription,
        ask: false,
        approved: false,
    };
    vec![
        env(
            "alice@example.com",
            item("bob@example.com", Subscription::None, &["work"]),
        ),
        env(
            "alice@example.com",
            item("bob@example.com", Subscription::Both, &["work", "friends"]),
        ),
        env(
            "alice@example.com",
            item("carol@example.com", Subscription::To, &[]),
        ),
        env(
            "alice@example.com",
            RosterItemRemoved {
                user: alice(),
                contact: BareJid::new("carol@example.com"),
            },
        ),
        env(
            "alice@example.com",
            SessionLoginAttempted {
                session_id: sid,
                user: alice(),
                protocol: Protocol::Xmpp,
                remote_addr: "192.0.2.7:51000".to_owned(),
                mechanism: AuthMechanism::ScramSha256,
                tls: true,
            },
        ),
        env(
            "alice@example.com",
            SessionLoginSucceeded {
                session_id: sid,
                user: alice(),
                protocol: Protocol::Xmpp,
                remote_addr: "192.0.2.7:51000".to_owned(),
                mechanism: AuthMechanism::ScramSha256,
            },
        ),
        env(
            "alice@example.com",
            SessionResourceBound {
                session_id: sid,
                full_jid: FullJid::new("alice@example.com/phone"),
                protocol: Protocol::Xmpp,
                contact: None,
                priority: 5,
                client: ClientInfo {
                    name: Some("Gajim".to_owned()),
                    version: Some("1.9".to_owned()),
                    os: None,
                    user_agent: None,
                },
            },
        ),
        env(
            "alice@example.com",
            SessionEnded {
                session_id: sid,
                user: alice(),
                full_jid: Some(FullJid::new("alice@example.com/phone")),
                protocol: Protocol::Xmpp,
                reason: SessionEndReason::Logout,
                text: None,
            },
        ),
        env(
            "mallory@example.com",
            SessionLoginFailed {
                session_id: failed,
                user: BareJid::new("mallory@example.com"),
                protocol: Protocol::Xmpp,
                remote_addr: "198.51.100.1:4000".to_owned(),
                mechanism: AuthMechanism::Plain,
                reason: LoginFailureReason::BadCredentials,
                text: None,
            },
        ),
        chat(
            "alice@example.com/phone",
            "bob@example.com",
            "m1",
            "Hello Bob, the résumé is attached",
        ),
        chat(
            "bob@example.com/laptop",
            "alice@example.com/phone",
            "m2",
            "Thanks Alice",
        ),
        chat(
            "alice@example.com/phone",
            "dave@remote.org",
            "m3",
            "Hi Dave",
        ),
        env(
            "room@conference.example.com",
            RoomMessage {
                room: RoomJid::new("room@conference.example.com"),
                message_id: "r1".to_owned(),
                from: FullJid::new("bob@example.com/laptop"),
                from_nick: "bob".to_owned(),
                body: Some("Morning all".to_owned()),
                stanza: "<message type='groupchat'><body>Morning all</body></message>".to_owned(),
            },
        ),
        env(
            "alice@example.com",
            FileUploadCompleted {
                transfer_id: upload,
                uploader: alice(),
                bytes_transferred: 1234,
                to: "bob@example.com".to_owned(),
                stored_name: "a1b2c3".to_owned(),
                real_name: "plan.pdf".to_owned(),
                path: "files/im/20260105/09/".to_owned(),
                size: 1234,
                method: TransferMethod::HttpUpload,
            },
        ),
        env(
            "bob@example.com",
            FileDownloadCompleted {
                transfer_id: uuid::Uuid::now_v7(),
                downloader: BareJid::new("bob@example.com"),
                upload_id: upload,
                uploader: alice(),
                bytes_transferred: 1234,
                to: "bob@example.com".to_owned(),
                stored_name: "a1b2c3".to_owned(),
                real_name: "plan.pdf".to_owned(),
                path: "files/im/20260105/09/".to_owned(),
                size: 1234,
                method: TransferMethod::HttpUpload,
            },
        ),
        env(
            "alice@example.com",
            DevicePresence {
                user: alice(),
                device: "phone".to_owned(),
                protocol: Protocol::Xmpp,
                available: true,
                show: None,
                status: None,
                priority: 5,
            },
        ),
    ]
}

fn col(row: &[Option<String>], i: usize) -> &str {
    row[i].as_deref().unwrap_or("NULL")
}

/// Each projection holds what the scenario says, and the full-text index
/// finds the archive's bodies.
async fn projects_each_kind(f: &dyn DbFixture) {
    let bus = open_bus(f).await;
    let db = f.open().await;
    let events = scenario();
    produce(&bus, &events).await;
    catch_up_all(&bus, &db).await;

    let rosters = db.snapshot(ProjectionKind::Rosters).await.unwrap();
    assert_eq!(rosters.len(), 1, "carol was removed: {rosters:?}");
    let bob = &rosters[0];
    assert_eq!(
        (
            col(bob, 0),
            col(bob, 1),
            col(bob, 2),
            col(bob, 3),
            col(bob, 4)
        ),
        (
            "alice@example.com",
            "bob@example.com",
            "BOB",
            "[\"friends\",\"work\"]",
            "both"
        )
    );

    let sessions = db.snapshot(ProjectionKind::Sessions).await.unwrap();
    assert_eq!(sessions.len(), 2);
    let by_user: BTreeMap<&str, &Vec<Option<String>>> =
        sessions.iter().map(|r| (col(r, 1), r)).collect();
    let a = by_user["alice@example.com"];
    assert_eq!(col(a, 5), "succeeded");
    assert_eq!(col(a, 6), "192.0.2.7:51000");
    assert_eq!(col(a, 7), "SCRAM-SHA-256");
    assert_eq!(col(a, 11), "alice@example.com/phone");
    assert_eq!((col(a, 12), col(a, 13)), ("Gajim", "1.9"));
    assert_eq!(col(a, 22), "logout");
    assert!(a[21].is_some() && a[20].is_some(), "bound and ended times");
    let m = by_user["mallory@example.com"];
    assert_eq!((col(m, 5), col(m, 9)), ("failed", "bad_credentials"));

    let archive = db.snapshot(ProjectionKind::Archive).await.unwrap();
    // m1 and m2 on both sides, m3 (remote recipient) on the sender's, r1 in the room.
    assert_eq!(archive.len(), 6, "{archive:#?}");
    let sides: BTreeSet<(&str, &str, &str, &str)> = archive
        .iter()
        .map(|r| (col(r, 0), col(r, 7), col(r, 5), col(r, 3)))
        .collect();
    for side in [
        ("alice@example.com", "m1", "out", "bob@example.com"),
        ("bob@example.com", "m1", "in", "alice@example.com"),
        ("bob@example.com", "m2", "out", "alice@example.com"),
        ("alice@example.com", "m2", "in", "bob@example.com"),
        ("alice@example.com", "m3", "out", "dave@remote.org"),
        (
            "room@conference.example.com",
            "r1",
            "groupchat",
            "bob@example.com",
        ),
    ] {
        assert!(sides.contains(&side), "{side:?} missing from {sides:?}");
    }
    let m1_ids: BTreeSet<&str> = archive
        .iter()
        .filter(|r| col(r, 7) == "m1")
        .map(|r| col(r, 1))
        .collect();
    assert_eq!(m1_ids.len(), 1, "both sides share one archive id");
    assert_eq!(search(&db, "résumé").await, ["m1", "m1"]);
    if db.backend() == "sqlite" {
        // unicode61 remove_diacritics; PostgreSQL's `simple` config keeps them.
        assert_eq!(search(&db, "resume").await, ["m1", "m1"]);
    }
    assert_eq!(search(&db, "alice").await, ["m2", "m2"]);

    let files = db.snapshot(ProjectionKind::Files).await.unwrap();
    assert_eq!(files.len(), 2);
    let dirs: BTreeSet<(&str, &str, &str)> = files
        .iter()
        .map(|r| (col(r, 3), col(r, 4), col(r, 6)))
        .collect();
    assert!(dirs.contains(&("upload", "completed", "NULL")));
    assert!(dirs.contains(&("download", "completed", "bob@example.com")));
    assert!(
        files
            .iter()
            .all(|r| col(r, 9) == "plan.pdf" && col(r, 11) == "1234")
    );

    let compliance = db.snapshot(ProjectionKind::Compliance).await.unwrap();
    let types: BTreeSet<&str> = compliance.iter().map(|r| col(r, 1)).collect();
    // Everything but roster changes and presence (off by default).
    assert_eq!(compliance.len(), events.len() - 4 - 1, "{types:?}");
    assert!(!types.contains("presence.device") && !types.contains("roster.item_set"));
    let v = db.verify_compliance().await.unwrap();
    assert_eq!(v.broken, None);
    assert_eq!(v.records, compliance.len() as i64);
}

/// Message ids of archive rows whose body matches `query`, sorted.
async fn search(db: &Database, query: &str) -> Vec<String> {
    let mut ids: Vec<String> = match db {
        Database::Sqlite { main, .. } => sqlx::query_scalar(
            "SELECT m.message_id FROM archive_fts f \
             JOIN archive_messages m ON m.row_id = f.rowid \
             JOIN archive a ON a.archive_id = m.archive_id WHERE archive_fts MATCH $1",
        )
        .bind(query)
        .fetch_all(&main.read)
        .await
        .unwrap(),
        Database::Postgres(pool) => sqlx::query_scalar(
            "SELECT m.message_id FROM archive_messages m \
             JOIN archive a ON a.archive_id = m.archive_id \
             WHERE m.body_tsv @@ websearch_to_tsquery('simple', $1)",
        )
        .bind(query)
        .fetch_all(pool)
        .await
        .unwrap(),
    };
    ids.sort();
    ids
}

/// `switchboard replay` rebuilds every projection with rows equal to the
/// originals; the rebuilt compliance log verifies.
async fn replay_rebuilds_equal_rows(f: &dyn DbFixture) {
    let bus = open_bus(f).await;
    let db = f.open().await;
    let mut events = scenario();
    for i in 0..300 {
        events.push(chat(
            &format!("u{}@example.com/r", i % 7),
            &format!("u{}@example.com", (i + 1) % 7),
            &format!("bulk{i}"),
            &format!("message number {i}"),
        ));
    }
    produce(&bus, &events).await;
    catch_up_all(&bus, &db).await;
    let mut before = BTreeMap::new();
    for kind in ProjectionKind::ALL {
        before.insert(kind, db.snapshot(kind).await.unwrap());
    }
    assert!(before.values().all(|rows| !rows.is_empty()));
    drop(bus); // the binary takes the log
    for kind in ProjectionKind::ALL {
        let (ok, out) = run_cli(f, &["replay", kind.name()]).await;
        assert!(ok, "replay {kind} failed: {out}");
        assert!(out.starts_with(&format!("replayed {kind}:")), "{out}");
        let after = db.snapshot(kind).await.unwrap();
        assert_eq!(after, before[&kind], "{kind} differs after a rebuild");
    }
    let v = db.verify_compliance().await.unwrap();
    assert_eq!(v.broken, None);
    assert_eq!(v.records, before[&ProjectionKind::Compliance].len() as i64);
    assert!(
        !run_cli(f, &["replay", "nonsense"]).await.0,
        "an unknown projection is refused"
    );

    // A record that is not on the bus (an audit record of the compliance
    // API) cannot be rebuilt: the rebuild is refused and nothing is lost.
    let audit = "INSERT INTO compliance_log (seq, event_id, event_type, subject, at_us, topic, \
                 part, offs, record, prev_hash, hash) SELECT MAX(seq) + 1, 'audit-1', \
                 'compliance.query', 'officer', 1, 'api', -1, -1, '{}', '', '' FROM compliance_log";
    match &db {
        Database::Sqlite { compliance, .. } => {
            sqlx::query(audit).execute(&compliance.write).await.unwrap();
        }
        Database::Postgres(pool) => {
            sqlx::query(audit).execute(pool).await.unwrap();
        }
    }
    let (ok, out) = run_cli(f, &["replay", "compliance"]).await;
    assert!(!ok, "a rebuild losing audit records must be refused: {out}");
    assert_eq!(
        db.snapshot(ProjectionKind::Compliance).await.unwrap().len(),
        before[&ProjectionKind::Compliance].len() + 1
    );
}

/// Editing or deleting a compliance record is detected by `switchboard
/// compliance verify`, which names the first bad record.
async fn tamper_is_detected(f: &dyn DbFixture) {
    let bus = open_bus(f).await;
    let db = f.open().await;
    let events: Vec<Envelope> = (0..20)
        .map(|i| {
            chat(
                "alice@example.com/a",
                "bob@example.com",
                &format!("t{i}"),
                "original text",
            )
        })
        .collect();
    produce(&bus, &events).await;
    catch_up_all(&bus, &db).await;
    drop(bus);
    let (ok, out) = run_cli(f, &["compliance", "verify"]).await;
    assert!(ok, "{out}");
    assert!(
        out.starts_with("compliance log intact: 20 records"),
        "{out}"
    );

    // Appending through the projection is the only write the table takes.
    let edit =
        "UPDATE compliance_log SET record = replace(record, 'original', 'doctored') WHERE seq = 7";
    let refused = match &db {
        Database::Sqlite { compliance, .. } => {
            sqlx::query(edit).execute(&compliance.write).await.is_err()
        }
        Database::Postgres(pool) => sqlx::query(edit).execute(pool).await.is_err(),
    };
    assert!(refused, "the append-only guard refuses an update");

    f.tamper(&db, &[edit]).await;
    let (ok, out) = run_cli(f, &["compliance", "verify"]).await;
    assert!(!ok, "an edited record must fail verification: {out}");
    assert!(out.contains("broken at record 7:"), "{out}");
    assert!(out.contains("altered"), "{out}");

    // Undo the edit, then delete a record instead.
    f.tamper(
        &db,
        &["UPDATE compliance_log SET record = replace(record, 'doctored', 'original') WHERE seq = 7"],
    )
    .await;
    assert!(run_cli(f, &["compliance", "verify"]).await.0);
    f.tamper(&db, &["DELETE FROM compliance_log WHERE seq = 12"])
        .await;
    let (ok, out) = run_cli(f, &["compliance", "verify"]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("broken at record 12:"), "{out}");
    assert!(out.contains("missing"), "{out}");

    // Deleting the newest records is caught by the chain head.
    f.tamper(&db, &["DELETE FROM compliance_log WHERE seq >= 12"])
        .await;
    let (ok, out) = run_cli(f, &["compliance", "verify"]).await;
    assert!(!ok, "{out}");
    assert!(out.contains("broken at record 12:"), "{out}");
}

/// A projection process killed with SIGKILL in the middle of ingesting:
/// after a restart every event is in each projection exactly once.
async fn kill9_during_ingest(f: &dyn DbFixture) {
    let n = 40_000usize;
    let bus = open_bus(f).await;
    let mut events = Vec::with_capacity(n);
    for i in 0..n {
        events.push(chat(
            &format!("u{}@example.com/r", i % 50),
            &format!("u{}@example.com", (i + 7) % 50),
            &format!("k{i}"),
            &format!("body {i}"),
        ));
    }
    // Produce concurrently: the order across keys does not matter.
    let bus_arc: Arc<dyn Bus> = Arc::new(bus.clone());
    let topic = full_name(PREFIX, Topic::Messages);
    futures_lite_join(&bus_arc, &topic, &events).await;
    drop(bus_arc);
    drop(bus);
    let db = f.open().await;

    let mut child = command(f)
        .args(["projections", "run", "archive", "compliance"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let seen_at_kill = loop {
        let count = compliance_count(&db).await;
        if count >= (n / 5) as i64 {
            break count;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ingest too slow: {count}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    child.start_kill().expect("kill -9");
    let _ = child.wait().await;
    let after_kill = compliance_count(&db).await;
    assert!(
        after_kill < n as i64,
        "the kill came after the ingest finished ({seen_at_kill}/{after_kill} of {n}); nothing tested"
    );

    let (ok, out) = run_cli(
        f,
        &[
            "projections",
            "run",
            "--until-caught-up",
            "archive",
            "compliance",
        ],
    )
    .await;
    assert!(ok, "{out}");

    let archive = db.snapshot(ProjectionKind::Archive).await.unwrap();
    assert_eq!(archive.len(), 2 * n, "each message on both sides");
    let mut per_message: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &archive {
        *per_message.entry(col(r, 7)).or_default() += 1;
    }
    assert_eq!(per_message.len(), n, "no message missing");
    assert!(per_message.values().all(|c| *c == 2), "no duplicate");
    let compliance = db.snapshot(ProjectionKind::Compliance).await.unwrap();
    assert_eq!(compliance.len(), n);
    let ids: BTreeSet<&str> = compliance.iter().map(|r| col(r, 0)).collect();
    assert_eq!(ids.len(), n, "no duplicate compliance record");
    let v = db.verify_compliance().await.unwrap();
    assert_eq!((v.broken, v.records), (None, n as i64));
    let positions = db
        .positions(
            ProjectionKind::Compliance,
            &ProjectionKind::Compliance.group(PREFIX),
        )
        .await
        .unwrap();
    assert_eq!(positions.values().sum::<i64>(), n as i64);
}

async fn futures_lite_join(bus: &Arc<dyn Bus>, topic: &str, events: &[Envelope]) {
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in events.chunks(events.len().div_ceil(16)) {
        let bus = bus.clone();
        let topic = topic.to_owned();
        let chunk: Vec<(String, Vec<u8>)> = chunk
            .iter()
            .map(|e| (e.subject.clone(), e.to_json_vec().unwrap()))
            .collect();
        tasks.spawn(async move {
            for (key, value) in chunk {
                bus.produce(&topic, key.as_bytes(), Some(&value))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

async fn compliance_count(db: &Database) -> i64 {
    let q = "SELECT COUNT(*) FROM compliance_log";
    match db {
        Database::Sqlite { compliance, .. } => sqlx::query_scalar(q)
            .fetch_one(&compliance.read)
            .await
            .unwrap(),
        Database::Postgres(pool) => sqlx::query_scalar(q).fetch_one(pool).await.unwrap(),
    }
}

/// A writer whose position is stale (another member or a rebuild moved it)
/// writes nothing.
async fn stale_writer_is_fenced(f: &dyn DbFixture) {
    let db = f.open().await;
    let group = "fence-test";
    let tp = TopicPartition::new("switchboard.messages", 3);
    let row = |id: &str| ArchiveRow {
        owner: "alice@example.com".to_owned(),
        archive_id: id.to_owned(),
        at_us: 1,
        peer: "bob@example.com".to_owned(),
        peer_full: None,
        direction: "out",
        kind: "chat".to_owned(),
        message_id: id.to_owned(),
        sender: "alice@example.com/a".to_owned(),
        nick: None,
        thread: None,
        subject: None,
        body: Some("x".to_owned()),
        stanza: "<message/>".to_owned(),
    };
    let update = |expected, next| PositionUpdate {
        tp: tp.clone(),
        expected,
        next,
    };
    let first = db
        .apply(group, &[update(0, 10)], Ops::Archive(vec![row("a")]))
        .await
        .unwrap();
    assert_eq!(first, Applied::Done);
    // A second writer that also read position 0 is refused.
    let stale = db
        .apply(group, &[update(0, 5)], Ops::Archive(vec![row("b")]))
        .await
        .unwrap();
    assert_eq!(stale, Applied::Conflict);
    let wrong = db
        .apply(group, &[update(7, 12)], Ops::Archive(vec![row("c")]))
        .await
        .unwrap();
    assert_eq!(wrong, Applied::Conflict);
    let next = db
        .apply(group, &[update(10, 12)], Ops::Archive(vec![row("d")]))
        .await
        .unwrap();
    assert_eq!(next, Applied::Done);
    let ids: Vec<String> = db
        .snapshot(ProjectionKind::Archive)
        .await
        .unwrap()
        .iter()
        .map(|r| col(r, 1).to_owned())
        .collect();
    assert_eq!(ids, ["a", "d"]);
    assert_eq!(
        db.positions(ProjectionKind::Archive, group).await.unwrap()[&tp],
        12
    );
}

/// The same event twice on the log (a producer retried) is archived and
/// recorded once.
async fn duplicate_events_are_recorded_once(f: &dyn DbFixture) {
    let bus = open_bus(f).await;
    let db = f.open().await;
    let m = chat("alice@example.com/a", "bob@example.com", "dup", "once");
    produce(&bus, &[m.clone(), m.clone()]).await;
    catch_up_all(&bus, &db).await;
    // Once more after the first copies are stored: a later batch finds the
    // event already in the log's tables, not only twice in itself.
    produce(&bus, &[m]).await;
    catch_up_all(&bus, &db).await;
    assert_eq!(db.snapshot(ProjectionKind::Archive).await.unwrap().len(), 2);
    assert_eq!(
        db.snapshot(ProjectionKind::Compliance).await.unwrap().len(),
        1
    );
    assert_eq!(db.verify_compliance().await.unwrap().broken, None);
}

/// A projection far behind reports its lag (metric and status) and is not
/// ready until it has caught up.
async fn lag_is_reported(f: &dyn DbFixture) {
    let bus = open_bus(f).await;
    let db = f.open().await;
    let n = 3000usize;
    let events: Vec<Envelope> = (0..n)
        .map(|i| {
            chat(
                "alice@example.com/a",
                "bob@example.com",
                &format!("l{i}"),
                "lagging",
            )
        })
        .collect();
    let bus_arc: Arc<dyn Bus> = Arc::new(bus.clone());
    futures_lite_join(&bus_arc, &full_name(PREFIX, Topic::Messages), &events).await;
    let status = Status::new(&[ProjectionKind::Archive]);
    let slot = status.get(ProjectionKind::Archive).unwrap();
    let config = Arc::new(RunnerConfig {
        max_batch: 1,
        ..(*runner_config()).clone()
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(runner::run(
        bus_arc,
        db.clone(),
        ProjectionKind::Archive,
        config,
        slot.clone(),
        stop_rx,
    ));
    while slot.lag() < 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let first = slot.lag();
    assert!(first > runner::READY_LAG, "lag {first} at assignment");
    assert!(!status.ready());
    assert!(
        status.report().contains("projection archive lag"),
        "{}",
        status.report()
    );
    let metrics = switchboard_infra::metrics::render();
    assert!(
        metrics.contains("switchboard_projection_lag_records{projection=\"archive\"}"),
        "{metrics}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while !status.ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never caught up: lag {}",
            slot.lag()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(slot.lag() <= runner::READY_LAG);
    let _ = stop_tx.send(true);
    task.await.unwrap().unwrap();
}

macro_rules! projection_suite {
    ($name:ident, $fixture:expr) => {
        mod $name {
            use super::*;
            projection_suite!(@tests $fixture;
                projects_each_kind,
                replay_rebuilds_equal_rows,
                tamper_is_detected,
                kill9_during_ingest,
                stale_writer_is_fenced,
                duplicate_events_are_recorded_once,
                lag_is_reported,
            );
        }
    };
    (@tests $fixture:expr; $($check:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                let fixture = $fixture.await;
                tokio::time::timeout(Duration::from_secs(300), super::$check(&fixture))
                    .await
                    .expect(concat!(stringify!($check), " timed out"));
            }
        )*
    };
}

projection_suite!(sqlite, SqliteFixture::new());
projection_suite!(postgres, PostgresFixture::new());
