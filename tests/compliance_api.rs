//! The compliance API over real HTTP (the router on a TCP listener) with a
//! real database, on SQLite and PostgreSQL: authentication and roles,
//! search by participant, peer, room, time and full text, paging, the
//! conversation view, JSON-lines and CSV export, problem bodies, and the
//! audit record each query leaves in the compliance log. The token command
//! and the API mounted by `switchboard serve` are checked at the end.
//!
//! PostgreSQL comes from `infra/scripts/postgres.sh start`
//! (`SWITCHBOARD_TEST_POSTGRES` overrides the url of database
//! switchboard_test); each test works in a schema of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use switchboard_projections::Database;
use switchboard_projections::api::store::{self, Role};
use switchboard_projections::db::Ops;
use switchboard_projections::rows::ArchiveRow;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// 2026-03-02T09:00:00Z.
const T0: i64 = 1_772_442_000_000_000;
const MINUTE: i64 = 60_000_000;
const ALICE: &str = "alice@example.com";
const BOB: &str = "bob@example.com";
const CAROL: &str = "carol@example.com";
const ROOM: &str = "board@rooms.example.com";
/// Pings from alice to bob after the first messages (paging).
const PINGS: i64 = 25;

enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Backend {
    async fn sqlite() -> Self {
        Backend::Sqlite(tempfile::tempdir().expect("tempdir"))
    }

    async fn postgres() -> Self {
        let (_, url) = switchboard_projections::testing::postgres_schema("api").await;
        Backend::Postgres(url)
    }

    fn is_sqlite(&self) -> bool {
        matches!(self, Backend::Sqlite(_))
    }

    async fn open(&self) -> Database {
        match self {
            Backend::Sqlite(dir) => {
                Database::open("", &dir.path().join(switchboard_projections::SQLITE_FILE)).await
            }
            Backend::Postgres(url) => Database::open(url, std::path::Path::new("unused")).await,
        }
        .expect("open the projections database")
    }
}

/// One 1:1 message as the archive projection stores it: the sender's row
/// and the recipient's.
fn chat(n: u32, from: &str, to: &str, at_us: i64, body: &str) -> Vec<ArchiveRow> {
    let id = format!("0190c0de-0000-7000-8000-{n:012}");
    let out = ArchiveRow {
        owner: from.to_owned(),
        archive_id: id,
        at_us,
        peer: to.to_owned(),
        peer_full: None,
        direction: "out",
        kind: "chat".to_owned(),
        message_id: format!("m{n}"),
        sender: format!("{from}/laptop"),
        nick: None,
        thread: None,
        subject: None,
        body: Some(body.to_owned()),
        stanza: format!("<message type='chat'><body>{n}</body></message>"),
    };
    let inbound = ArchiveRow {
        owner: to.to_owned(),
        peer: from.to_owned(),
        peer_full: Some(format!("{from}/laptop")),
        direction: "in",
        ..out.clone()
    };
    vec![out, inbound]
}

/// The archive of every test.
fn dataset() -> Vec<ArchiveRow> {
    let mut rows = Vec::new();
    rows.extend(chat(1, ALICE, BOB, T0, "Quarterly budget review tomorrow"));
    rows.extend(chat(
        2,
        BOB,
        ALICE,
        T0 + MINUTE,
        "Sounds good, see you at the Café",
    ));
    rows.extend(chat(3, ALICE, CAROL, T0 + 2 * MINUTE, "Lunch at the cafe?"));
    rows.extend(chat(
        4,
        CAROL,
        ALICE,
        T0 + 3 * MINUTE,
        "BUDGET numbers attached",
    ));
    rows.push(ArchiveRow {
        owner: ROOM.to_owned(),
        archive_id: "0190c0de-0000-7000-8000-000000000005".to_owned(),
        at_us: T0 + 4 * MINUTE,
        peer: BOB.to_owned(),
        peer_full: Some(format!("{BOB}/desk")),
        direction: "groupchat",
        kind: "groupchat".to_owned(),
        message_id: "m5".to_owned(),
        sender: format!("{BOB}/desk"),
        nick: Some("bob".to_owned()),
        thread: None,
        subject: None,
        body: Some("Room budget meeting".to_owned()),
        stanza: "<message type='groupchat'/>".to_owned(),
    });
    rows.extend(chat(
        6,
        CAROL,
        BOB,
        T0 + 5 * MINUTE,
        "He said \"no\", then\nleft, early",
    ));
    for i in 0..PINGS {
        let n = 100 + u32::try_from(i).expect("small");
        // Two pings share each timestamp: paging must order ties too.
        rows.extend(chat(
            n,
            ALICE,
            BOB,
            T0 + (10 + i / 2) * MINUTE,
            &format!("ping {i}"),
        ));
    }
    rows
}

struct Api {
    addr: SocketAddr,
    db: Database,
    officer: String,
    admin: String,
    _server: tokio::task::JoinHandle<()>,
}

async fn start(backend: &Backend) -> Api {
    let db = backend.open().await;
    db.apply("test.archive", &[], Ops::Archive(dataset()))
        .await
        .expect("seed the archive");
    let (officer, _) = store::create_token(&db, "officer-olga", Role::ComplianceOfficer)
        .await
        .expect("officer token");
    let (admin, _) = store::create_token(&db, "admin-adam", Role::Administrator)
        .await
        .expect("admin token");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = switchboard_projections::api::router(db.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, router).await.expect("serve");
    });
    Api {
        addr,
        db,
        officer,
        admin,
        _server: server,
    }
}

/// A response: status, headers (lowercase names) and the decoded body.
struct Response {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.clone()).expect("utf-8")
    }

    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(String::as_str).unwrap_or("")
    }
}

fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn path(base: &str, params: &[(&str, &str)]) -> String {
    if params.is_empty() {
        return base.to_owned();
    }
    let query: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    format!("{base}?{}", query.join("&"))
}

/// A minimal HTTP/1.1 client: one GET per connection, chunked bodies
/// decoded.
async fn get(addr: SocketAddr, target: &str, token: Option<&str>) -> Response {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request =
        format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut raw))
        .await
        .expect("response within 30 s")
        .expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let head = String::from_utf8(raw[..split].to_vec()).expect("ascii head");
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = std::str::from_utf8(&data[..eol]).expect("ascii size");
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .expect("hex chunk size");
        data = &data[eol + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

async fn search(api: &Api, params: &[(&str, &str)]) -> Value {
    let r = get(
        api.addr,
        &path("/api/v1/archive/messages", params),
        Some(&api.officer),
    )
    .await;
    assert_eq!(r.status, 200, "{params:?}: {}", r.text());
    r.json()
}

/// `(archive id suffix, owner)` of each item.
fn ids(page: &Value) -> Vec<(String, String)> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|m| {
            let id = m["archive_id"].as_str().expect("id");
            (
                id.trim_start_matches("0190c0de-0000-7000-8000-")
                    .trim_start_matches('0')
                    .to_owned(),
                m["owner"].as_str().expect("owner").to_owned(),
            )
        })
        .collect()
}

fn numbers(page: &Value) -> Vec<String> {
    ids(page).into_iter().map(|(n, _)| n).collect()
}

fn assert_problem(r: &Response, status: u16, parameter: Option<&str>) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/problem+json");
    let p = r.json();
    assert_eq!(p["status"], status);
    assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
    assert!(p["type"].as_str().is_some(), "{p}");
    assert!(p["detail"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
    assert_eq!(p["parameter"].as_str(), parameter, "{p}");
    p
}

async fn compliance_rows(db: &Database) -> Vec<(i64, String, String, String)> {
    const SQL: &str = "SELECT seq, event_type, subject, record FROM compliance_log ORDER BY seq";
    let rows: Vec<(i64, String, String, String)> = match db {
        Database::Sqlite { compliance, .. } => {
            sqlx::query_as(SQL).fetch_all(&compliance.write).await
        }
        Database::Postgres(pool) => sqlx::query_as(SQL).fetch_all(pool).await,
    }
    .expect("read the compliance log");
    rows
}

async fn authentication_and_roles(backend: Backend) {
    let api = start(&backend).await;
    let target = "/api/v1/archive/messages?participant=alice%40example.com";
    let none = get(api.addr, target, None).await;
    let p = assert_problem(&none, 401, None);
    assert_eq!(p["type"], "about:blank");
    assert!(none.header("www-authenticate").starts_with("Bearer"));
    assert_problem(&get(api.addr, target, Some("sbt_0123")).await, 401, None);
    // The hash of a valid token is not a token.
    let hash = store::token_hash(&api.officer);
    assert_problem(&get(api.addr, target, Some(&hash)).await, 401, None);
    // Wrong role, both ways.
    let p = assert_problem(&get(api.addr, target, Some(&api.admin)).await, 403, None);
    assert!(
        p["detail"].as_str().unwrap().contains("compliance-officer"),
        "{p}"
    );
    assert_problem(
        &get(api.addr, "/api/v1/tokens", Some(&api.officer)).await,
        403,
        None,
    );
    // Refused requests leave no audit record.
    assert!(compliance_rows(&api.db).await.is_empty());

    // The administrator lists tokens: names and roles, never secrets.
    let r = get(api.addr, "/api/v1/tokens", Some(&api.admin)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let listed = r.text();
    let names: BTreeSet<String> = r.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            format!(
                "{}:{}",
                t["name"].as_str().unwrap(),
                t["role"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "admin-adam:administrator".to_owned(),
            "officer-olga:compliance-officer".to_owned()
        ])
    );
    for secret in [&api.officer, &api.admin] {
        assert!(!listed.contains(secret.as_str()));
        assert!(!listed.contains(&store::token_hash(secret)));
    }
    // Only hashes are stored.
    const TOKENS: &str = "SELECT name, role, secret_hash FROM api_tokens";
    let stored: Vec<(String, String, String)> = match &api.db {
        Database::Sqlite { main, .. } => sqlx::query_as(TOKENS).fetch_all(&main.write).await,
        Database::Postgres(pool) => sqlx::query_as(TOKENS).fetch_all(pool).await,
    }
    .unwrap();
    let dump = format!("{stored:?}");
    assert!(!dump.contains(api.officer.trim_start_matches("sbt_")));
    assert!(dump.contains(&store::token_hash(&api.officer)));

    // A revoked token stops working at once.
    assert_eq!(get(api.addr, target, Some(&api.officer)).await.status, 200);
    store::revoke_token(&api.db, "officer-olga").await.unwrap();
    assert_problem(&get(api.addr, target, Some(&api.officer)).await, 401, None);
    // The OpenAPI document needs no token and is the committed file.
    let doc = get(api.addr, "/api/openapi.json", None).await;
    assert_eq!(doc.status, 200);
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/projections/openapi.json"
    ))
    .unwrap();
    assert_eq!(doc.text(), committed);
    assert_eq!(doc.json()["openapi"], "3.1.0");
}

async fn search_filters(backend: Backend) {
    let sqlite = backend.is_sqlite();
    let api = start(&backend).await;
    // participant: the user's own archive, both directions, time order.
    let alice = search(&api, &[("participant", ALICE), ("limit", "6")]).await;
    assert_eq!(numbers(&alice), ["1", "2", "3", "4", "100", "101"]);
    assert!(ids(&alice).iter().all(|(_, owner)| owner == ALICE));
    let first = &alice["items"][0];
    assert_eq!(first["direction"], "out");
    assert_eq!(first["peer"], BOB);
    assert_eq!(first["at"], "2026-03-02T09:00:00.000000Z");
    assert_eq!(first["at_us"], T0);
    assert_eq!(first["body"], "Quarterly budget review tomorrow");
    assert_eq!(alice["items"][1]["direction"], "in");
    // Addresses are compared case-insensitively.
    let upper = search(
        &api,
        &[("participant", "ALICE@Example.com"), ("limit", "6")],
    )
    .await;
    assert_eq!(numbers(&upper), numbers(&alice));
    // peer.
    let with_carol = search(&api, &[("participant", ALICE), ("peer", CAROL)]).await;
    assert_eq!(numbers(&with_carol), ["3", "4"]);
    assert_eq!(with_carol["next_cursor"], Value::Null);
    // room, and the sender in the room.
    let room = search(&api, &[("room", ROOM)]).await;
    assert_eq!(ids(&room), [("5".to_owned(), ROOM.to_owned())]);
    assert_eq!(room["items"][0]["nick"], "bob");
    assert_eq!(
        numbers(&search(&api, &[("room", ROOM), ("peer", ALICE)]).await).len(),
        0
    );
    assert_eq!(
        numbers(&search(&api, &[("room", ROOM), ("peer", BOB)]).await),
        ["5"]
    );
    // time range: start inclusive, end exclusive.
    let range = search(
        &api,
        &[
            ("participant", ALICE),
            ("start", "2026-03-02T09:01:00Z"),
            ("end", "2026-03-02T10:03:00+01:00"),
        ],
    )
    .await;
    assert_eq!(numbers(&range), ["2", "3"]);
    // full text: case-insensitive, every word required, phrases.
    let budget = search(&api, &[("participant", ALICE), ("q", "budget")]).await;
    assert_eq!(numbers(&budget), ["1", "4"]);
    let everywhere = search(&api, &[("q", "BUDGET")]).await;
    assert_eq!(
        ids(&everywhere).into_iter().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            ("1".to_owned(), ALICE.to_owned()),
            ("1".to_owned(), BOB.to_owned()),
            ("4".to_owned(), CAROL.to_owned()),
            ("4".to_owned(), ALICE.to_owned()),
            ("5".to_owned(), ROOM.to_owned()),
        ])
    );
    assert_eq!(
        numbers(&search(&api, &[("participant", ALICE), ("q", "budget tomorrow")]).await),
        ["1"]
    );
    assert_eq!(
        numbers(&search(&api, &[("participant", ALICE), ("q", "\"budget review\"")]).await),
        ["1"]
    );
    assert!(
        numbers(&search(&api, &[("participant", ALICE), ("q", "\"review budget\"")]).await)
            .is_empty()
    );
    // Diacritics: the accented word finds the accented text on both
    // backends, in any case. SQLite's FTS5 (remove_diacritics) also folds
    // accents, so either spelling finds both; PostgreSQL's 'simple'
    // configuration keeps them apart.
    let accented = numbers(&search(&api, &[("participant", ALICE), ("q", "CAFÉ")]).await);
    let plain = numbers(&search(&api, &[("participant", ALICE), ("q", "cafe")]).await);
    if sqlite {
        assert_eq!(accented, ["2", "3"]);
        assert_eq!(plain, ["2", "3"]);
    } else {
        assert_eq!(accented, ["2"]);
        assert_eq!(plain, ["3"]);
    }
    // Each archive's copy, in time order.
    let at: Vec<i64> = everywhere["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["at_us"].as_i64().unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] <= w[1]));
    // Words that are operators elsewhere are plain words here.
    assert!(numbers(&search(&api, &[("q", "budget OR ping")]).await).is_empty());
}

async fn paging_and_conversation(backend: Backend) {
    let api = start(&backend).await;
    // Alice's archive with bob: messages 1, 2 and the pings, pages of 4.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut params = vec![("participant", ALICE), ("peer", BOB), ("limit", "4")];
        if let Some(c) = &cursor {
            params.push(("cursor", c.as_str()));
        }
        let page = search(&api, &params).await;
        pages += 1;
        let n = numbers(&page);
        assert!(n.len() <= 4);
        seen.extend(n);
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = ["1".to_owned(), "2".to_owned()]
        .into_iter()
        .chain((100..100 + PINGS).map(|n| n.to_string()))
        .collect();
    assert_eq!(seen, expected, "every message once, in time order");
    assert_eq!(pages, expected.len().div_ceil(4));

    // The conversation: both directions, each message once, from either side.
    let conv = |a: &'static str, b: &'static str, extra: Vec<(&'static str, &'static str)>| {
        let mut p = vec![("participant", a), ("peer", b), ("limit", "500")];
        p.extend(extra);
        path("/api/v1/archive/conversation", &p)
    };
    let ab = get(api.addr, &conv(ALICE, BOB, vec![]), Some(&api.officer)).await;
    assert_eq!(ab.status, 200, "{}", ab.text());
    let ab = ab.json();
    assert_eq!(numbers(&ab), expected);
    let ba = get(api.addr, &conv(BOB, ALICE, vec![]), Some(&api.officer))
        .await
        .json();
    assert_eq!(numbers(&ba), expected);
    let ts: Vec<i64> = ab["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["at_us"].as_i64().unwrap())
        .collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "time order");
    let senders: Vec<&str> = ab["items"]
        .as_array()
        .unwrap()
        .iter()
        .take(2)
        .map(|m| m["sender"].as_str().unwrap())
        .collect();
    assert_eq!(
        senders,
        ["alice@example.com/laptop", "bob@example.com/laptop"]
    );
    // Paged and filtered conversations.
    let small = get(
        api.addr,
        &path(
            "/api/v1/archive/conversation",
            &[("participant", CAROL), ("peer", ALICE), ("limit", "1")],
        ),
        Some(&api.officer),
    )
    .await
    .json();
    assert_eq!(numbers(&small), ["3"]);
    let cursor = small["next_cursor"].as_str().expect("a second page");
    let rest = get(
        api.addr,
        &path(
            "/api/v1/archive/conversation",
            &[("participant", CAROL), ("peer", ALICE), ("cursor", cursor)],
        ),
        Some(&api.officer),
    )
    .await
    .json();
    assert_eq!(numbers(&rest), ["4"]);
    assert_eq!(rest["next_cursor"], Value::Null);
    let found = get(
        api.addr,
        &conv(BOB, ALICE, vec![("q", "ping 7")]),
        Some(&api.officer),
    )
    .await
    .json();
    assert_eq!(numbers(&found), ["107"]);
    // A conversation needs both sides.
    let r = get(
        api.addr,
        &path("/api/v1/archive/conversation", &[("participant", ALICE)]),
        Some(&api.officer),
    )
    .await;
    assert_problem(&r, 400, Some("peer"));
}

/// Splits RFC 4180 CSV into records.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') => quoted = true,
            (false, ',') => record.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (false, c) => field.push(c),
        }
    }
    records
}

async fn export(backend: Backend) {
    let api = start(&backend).await;
    let all = search(&api, &[("participant", BOB), ("limit", "500")]).await;
    let expected = all["items"].as_array().unwrap().clone();
    // Messages 1, 2 and 6 and the pings.
    assert_eq!(expected.len(), 3 + usize::try_from(PINGS).unwrap());

    let r = get(
        api.addr,
        &path(
            "/api/v1/archive/export",
            &[("participant", BOB), ("format", "jsonl")],
        ),
        Some(&api.officer),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), "application/x-ndjson");
    assert_eq!(r.header("transfer-encoding"), "chunked", "streamed");
    assert!(r.header("content-disposition").starts_with("attachment"));
    let lines: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines, expected);

    let r = get(
        api.addr,
        &path(
            "/api/v1/archive/export",
            &[("participant", BOB), ("peer", CAROL), ("format", "csv")],
        ),
        Some(&api.officer),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").starts_with("text/csv"));
    assert_eq!(r.header("transfer-encoding"), "chunked", "streamed");
    let text = r.text();
    assert!(text.ends_with("\r\n"));
    let records = parse_csv(&text);
    assert_eq!(records.len(), 2, "{text}");
    let header = &records[0];
    assert_eq!(header[0], "archive_id");
    let col = |name: &str| header.iter().position(|h| h == name).expect(name);
    let row = &records[1];
    assert_eq!(row.len(), header.len());
    assert_eq!(row[col("body")], "He said \"no\", then\nleft, early");
    assert_eq!(row[col("owner")], BOB);
    assert_eq!(row[col("direction")], "in");
    assert_eq!(row[col("at_us")], (T0 + 5 * MINUTE).to_string());
    assert_eq!(row[col("peer_full")], "carol@example.com/laptop");
    assert_eq!(row[col("nick")], "");

    // A large export spans several database pages and stays in order.
    let many: Vec<ArchiveRow> = (0..2500u32)
        .flat_map(|i| {
            chat(
                10_000 + i,
                "dave@example.com",
                "erin@example.com",
                T0 + 100 * MINUTE + i64::from(i),
                "bulk",
            )
        })
        .collect();
    api.db
        .apply("test.archive", &[], Ops::Archive(many))
        .await
        .unwrap();
    let r = get(
        api.addr,
        &path(
            "/api/v1/archive/export",
            &[("participant", "dave@example.com"), ("format", "jsonl")],
        ),
        Some(&api.officer),
    )
    .await;
    assert_eq!(r.status, 200);
    let at: Vec<i64> = r
        .text()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["at_us"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(at.len(), 2500);
    assert!(at.windows(2).all(|w| w[0] < w[1]));

    // A term in thousands of messages, without an owner: searched in time
    // order on SQLite (the matches-first plan for rare terms is covered
    // above); pages continue exactly.
    let first = search(&api, &[("q", "bulk"), ("limit", "3")]).await;
    let cursor = first["next_cursor"]
        .as_str()
        .expect("more pages")
        .to_owned();
    let second = search(&api, &[("q", "bulk"), ("limit", "3"), ("cursor", &cursor)]).await;
    let got: Vec<(String, String)> = ids(&first).into_iter().chain(ids(&second)).collect();
    let want: Vec<(String, String)> = (10_000..10_003)
        .flat_map(|n: u32| {
            [
                (n.to_string(), "dave@example.com".to_owned()),
                (n.to_string(), "erin@example.com".to_owned()),
            ]
        })
        .collect();
    assert_eq!(got, want);
    let later = search(
        &api,
        &[
            ("q", "BULK"),
            ("start", "2026-03-02T10:40:00.001Z"),
            ("limit", "1"),
        ],
    )
    .await;
    assert_eq!(
        ids(&later),
        [("11000".to_owned(), "dave@example.com".to_owned())]
    );

    for (params, parameter) in [
        (vec![("participant", BOB)], "format"),
        (vec![("format", "xml")], "format"),
        (vec![("format", "csv"), ("limit", "5")], "limit"),
    ] {
        let r = get(
            api.addr,
            &path("/api/v1/archive/export", &params),
            Some(&api.officer),
        )
        .await;
        assert_problem(&r, 400, Some(parameter));
    }
}

async fn bad_parameters(backend: Backend) {
    let api = start(&backend).await;
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("limit", "0")], "limit"),
        (vec![("limit", "many")], "limit"),
        (vec![("start", "last tuesday")], "start"),
        (vec![("end", "2026-03-02")], "end"),
        (
            vec![
                ("start", "2026-03-02T10:00:00Z"),
                ("end", "2026-03-02T09:00:00Z"),
            ],
            "end",
        ),
        (vec![("cursor", "not-a-cursor")], "cursor"),
        (
            vec![("participant", "alice@example.com/phone")],
            "participant",
        ),
        (vec![("peer", "")], "peer"),
        (vec![("q", "   ")], "q"),
        (vec![("q", "***")], "q"),
        (vec![("room", ROOM), ("participant", ALICE)], "room"),
        (vec![("sender", ALICE)], "sender"),
        (vec![("peer", ALICE), ("peer", BOB)], "peer"),
    ];
    for (params, parameter) in cases {
        let r = get(
            api.addr,
            &path("/api/v1/archive/messages", &params),
            Some(&api.officer),
        )
        .await;
        let p = assert_problem(&r, 400, Some(parameter));
        assert_eq!(p["type"], "/problems/invalid-parameter", "{params:?}");
    }
    // Authentication comes first: a bad parameter without a token is 401.
    assert_problem(
        &get(api.addr, "/api/v1/archive/messages?limit=0", None).await,
        401,
        None,
    );
    // Malformed requests are not queries: nothing was recorded.
    assert!(compliance_rows(&api.db).await.is_empty());
}

async fn audit_records(backend: Backend) {
    let api = start(&backend).await;
    let params = [("participant", ALICE), ("q", "budget"), ("limit", "10")];
    let r = get(
        api.addr,
        &path("/api/v1/archive/messages", &params),
        Some(&api.officer),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("switchboard-audit-seq"), "1");
    let conv = get(
        api.addr,
        &path(
            "/api/v1/archive/conversation",
            &[("participant", ALICE), ("peer", BOB)],
        ),
        Some(&api.officer),
    )
    .await;
    assert_eq!(conv.header("switchboard-audit-seq"), "2");
    let export = get(
        api.addr,
        &path(
            "/api/v1/archive/export",
            &[("room", ROOM), ("format", "csv")],
        ),
        Some(&api.officer),
    )
    .await;
    assert_eq!(export.status, 200);
    assert_eq!(export.header("switchboard-audit-seq"), "3");

    let log = compliance_rows(&api.db).await;
    assert_eq!(log.len(), 3);
    let expected = [
        (
            "GET /api/v1/archive/messages",
            serde_json::json!({"participant": ALICE, "q": "budget", "limit": "10"}),
        ),
        (
            "GET /api/v1/archive/conversation",
            serde_json::json!({"participant": ALICE, "peer": BOB}),
        ),
        (
            "GET /api/v1/archive/export",
            serde_json::json!({"room": ROOM, "format": "csv"}),
        ),
    ];
    let before = chrono::Utc::now().timestamp_micros();
    for ((seq, event_type, subject, record), (operation, parameters)) in log.iter().zip(expected) {
        assert_eq!(event_type, "compliance.query");
        assert_eq!(subject, "officer-olga");
        let record: Value = serde_json::from_str(record).unwrap();
        assert_eq!(record["type"], "compliance.query", "seq {seq}");
        assert_eq!(record["token_name"], "officer-olga");
        assert_eq!(record["role"], "compliance-officer");
        assert_eq!(record["operation"], operation);
        assert_eq!(record["parameters"], parameters);
        let at = record["occurred_at_us"].as_i64().unwrap();
        assert!(at <= before && at > before - 60_000_000, "when: {at}");
        assert!(
            !record.to_string().contains(&api.officer),
            "no token in the log"
        );
    }
    // The audit records are part of the hash chain, and the chain holds.
    let v = api.db.verify_compliance().await.unwrap();
    assert_eq!(v.records, 3);
    assert_eq!(v.broken, None);
}

macro_rules! api_suite {
    ($backend:ident, $fixture:expr) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn authentication_and_roles() {
                super::authentication_and_roles($fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn search_filters() {
                super::search_filters($fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn paging_and_conversation() {
                super::paging_and_conversation($fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn export() {
                super::export($fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn bad_parameters() {
                super::bad_parameters($fixture).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn audit_records() {
                super::audit_records($fixture).await;
            }
        }
    };
}

api_suite!(sqlite, Backend::sqlite().await);
api_suite!(postgres, Backend::postgres().await);

fn switchboard(data: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD") {
            cmd.env_remove(k);
        }
    }
    cmd.env("SWITCHBOARD_LOG", "warn")
        .env("SWITCHBOARD__DATA_DIR", data)
        .env("SWITCHBOARD__XMPP__C2S_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD__XMPP__C2S_TLS_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD__SIP__UDP_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD__SIP__TCP_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD__SIP__TLS_LISTEN", "127.0.0.1:0");
    cmd
}

async fn token_cmd(data: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = switchboard(data)
        .arg("token")
        .args(args)
        .output()
        .await
        .expect("run switchboard token");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `switchboard token` against the data directory of `switchboard serve`,
/// whose HTTP listener serves the API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (ok, stdout, stderr) = token_cmd(
        &data,
        &["create", "--role", "compliance-officer", "--name", "olga"],
    )
    .await;
    assert!(ok, "{stderr}");
    let token = stdout.trim().to_owned();
    assert!(token.starts_with("sbt_") && token.len() == 68, "{token:?}");
    assert!(stderr.contains("not shown again"), "{stderr}");
    let (ok, _, stderr) = token_cmd(&data, &["create", "--role", "root", "--name", "x"]).await;
    assert!(!ok);
    assert!(stderr.contains("unknown role \"root\""), "{stderr}");
    let (ok, _, stderr) = token_cmd(
        &data,
        &["create", "--role", "administrator", "--name", "olga"],
    )
    .await;
    assert!(!ok);
    assert!(stderr.contains("exists already"), "{stderr}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = switchboard(&data)
        .arg("serve")
        .env("SWITCHBOARD__HTTP__LISTEN", addr.to_string())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(addr).await.is_err()
        || get(addr, "/readyz", None).await.status != 200
    {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let target = "/api/v1/archive/messages?participant=alice%40example.com";
    let r = get(addr, target, Some(&token)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["items"], serde_json::json!([]));
    assert_eq!(r.header("switchboard-audit-seq"), "1");
    assert_problem(&get(addr, target, None).await, 401, None);
    assert_eq!(get(addr, "/api/openapi.json", None).await.status, 200);

    // Revoked from the command line while the server runs.
    let (ok, stdout, stderr) = token_cmd(&data, &["revoke", "olga"]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("revoked token \"olga\""), "{stdout}");
    assert_problem(&get(addr, target, Some(&token)).await, 401, None);
    let (ok, stdout, _) = token_cmd(&data, &["list"]).await;
    assert!(ok);
    assert!(stdout.starts_with("olga\tcompliance-officer\t"), "{stdout}");
    assert!(stdout.contains("revoked 20"), "{stdout}");
    let (ok, _, stderr) = token_cmd(&data, &["revoke", "nobody"]).await;
    assert!(!ok);
    assert!(stderr.contains("no token named \"nobody\""), "{stderr}");

    let pid = child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    assert!(exit.success(), "exit status {exit}");

    // Neither the database nor its WAL holds the token's secret part.
    let secret = token.trim_start_matches("sbt_");
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{} holds the token",
                path.display()
            );
        }
    }
}
