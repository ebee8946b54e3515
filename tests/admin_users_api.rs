//! User administration over the HTTP API (`/api/v1/users`, issue 3
//! "Users"), against `switchboard serve` on the embedded default:
//! - authentication and role: no token 401, a compliance officer's 403;
//! - add, list, password change, disable/enable, delete, with 400 naming
//!   the field at fault, 404 for an unknown user and 409 for a duplicate;
//! - the same directory as the CLI (`switchboard user list` sees an
//!   API-made user), and the password set over HTTP is the one a real client
//!   (slixmpp) logs in with, while a disabled user cannot;
//! - the password is nowhere in the data directory (log, databases).

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use support::xmpp::{Deployment, Outcome, python};

struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// One HTTP/1.1 request with an optional bearer token and JSON body.
fn request(addr: &str, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> Reply {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the HTTP API");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(head.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Reply { status, body }
}

/// Checks a problem body: status, content and the field it names.
fn problem(r: &Reply, status: u16, parameter: Option<&str>) {
    assert_eq!(r.status, status, "{}", r.body);
    let body = r.json();
    assert_eq!(body["status"], status, "{}", r.body);
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(body["parameter"].as_str(), parameter, "{}", r.body);
}

fn token(dep: &Deployment, role: &str, name: &str) -> String {
    let out = dep
        .command()
        .args(["token", "create", "--role", role, "--name", name])
        .env("SWITCHBOARD_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn cli_users(dep: &Deployment) -> String {
    let out = dep
        .command()
        .args(["user", "list"])
        .env("SWITCHBOARD_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn login(dep: &Deployment, python: &Path, jid: &str, password: &str, expect_fail: bool) -> Outcome {
    let mut args = vec![
        "--jid",
        jid,
        "--password",
        password,
        "--mode",
        "starttls",
        "--mechanism",
        "SCRAM-SHA-256",
    ];
    if expect_fail {
        args.push("--expect-fail");
    }
    dep.client(python, "xmpp_client.py", "login", 20, &args)
}

/// Authentication itself failed (a SASL `<failure/>`), nothing else.
fn refused(o: &Outcome) -> bool {
    !o.bool("ok") && o.bool("sasl_failure")
}

/// Every file under `dir` that contains `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

#[test]
fn users_are_administered_over_http() {
    let python = python();
    let dep = Deployment::new();
    let server = dep
        .start()
        .unwrap_or_else(|e| panic!("{e}\n{}", dep.log_tail()));
    let admin = token(&dep, "administrator", "adam");
    let officer = token(&dep, "compliance-officer", "olga");
    let http = dep.http.as_str();
    let alice = "alice@example.com";
    let password = "correct horse 7d1e";
    let add = json!({"user": "Alice@Example.com", "password": password, "display_name": "Alice"})
        .to_string();

    // Authentication first, then the role.
    problem(
        &request(http, "GET", "/api/v1/users", None, None),
        401,
        None,
    );
    problem(
        &request(http, "POST", "/api/v1/users", Some(&officer), Some(&add)),
        403,
        None,
    );

    // Add (the address is normalised), then the same again: 409.
    let r = request(http, "POST", "/api/v1/users", Some(&admin), Some(&add));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"user": alice, "enabled": true, "display_name": "Alice"})
    );
    problem(
        &request(http, "POST", "/api/v1/users", Some(&admin), Some(&add)),
        409,
        Some("user"),
    );
    // Bad requests name what is wrong.
    for (body, parameter) in [
        (
            json!({"user": "bob@elsewhere.org", "password": "x"}),
            "user",
        ),
        (json!({"user": "not an address@", "password": "x"}), "user"),
        (
            json!({"user": "bob@example.com", "password": ""}),
            "password",
        ),
        (json!({"user": "bob@example.com"}), "body"),
        (
            json!({"user": "bob@example.com", "password": "x", "admin": true}),
            "body",
        ),
    ] {
        let r = request(
            http,
            "POST",
            "/api/v1/users",
            Some(&admin),
            Some(&body.to_string()),
        );
        problem(&r, 400, Some(parameter));
    }
    problem(
        &request(
            http,
            "POST",
            "/api/v1/users",
            Some(&admin),
            Some("{not json"),
        ),
        400,
        Some("body"),
    );

    // Listed over HTTP and by the CLI (the same directory).
    let r = request(http, "GET", "/api/v1/users", Some(&admin), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["items"],
        json!([{"user": alice, "enabled": true, "display_name": "Alice"}])
    );
    assert!(
        cli_users(&dep).starts_with(&format!("{alice}\tenabled\tAlice")),
        "{}",
        cli_users(&dep)
    );

    // The password set over HTTP is the one a real client logs in with.
    let o = login(&dep, &python, alice, password, false);
    assert!(o.bool("ok"), "{}", o.report);

    // A new password: the old one fails, the new one works.
    let new_password = "battery staple 91c0";
    let r = request(
        http,
        "PUT",
        "/api/v1/users/alice@example.com/password",
        Some(&admin),
        Some(&json!({"password": new_password}).to_string()),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let o = login(&dep, &python, alice, password, true);
    assert!(refused(&o), "old password still works: {}", o.report);
    let o = login(&dep, &python, alice, new_password, false);
    assert!(o.bool("ok"), "{}", o.report);
    problem(
        &request(
            http,
            "PUT",
            "/api/v1/users/nobody@example.com/password",
            Some(&admin),
            Some(&json!({"password": "x"}).to_string()),
        ),
        404,
        Some("user"),
    );

    // Disabled: listed so, and logins fail; enabled again: they work.
    let r = request(
        http,
        "POST",
        "/api/v1/users/alice@example.com/disable",
        Some(&admin),
        Some(&json!({"reason": "left the company"}).to_string()),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = request(http, "GET", "/api/v1/users", Some(&admin), None);
    assert_eq!(r.json()["items"][0]["enabled"], false, "{}", r.body);
    let o = login(&dep, &python, alice, new_password, true);
    assert!(refused(&o), "a disabled user logged in: {}", o.report);
    let r = request(
        http,
        "POST",
        "/api/v1/users/alice@example.com/enable",
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let o = login(&dep, &python, alice, new_password, false);
    assert!(o.bool("ok"), "{}", o.report);

    // Deleted: gone from the list; deleting again is 404.
    let r = request(
        http,
        "DELETE",
        "/api/v1/users/alice@example.com",
        Some(&admin),
        None,
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = request(http, "GET", "/api/v1/users", Some(&admin), None);
    assert_eq!(r.json()["items"], json!([]), "{}", r.body);
    problem(
        &request(
            http,
            "DELETE",
            "/api/v1/users/alice@example.com",
            Some(&admin),
            None,
        ),
        404,
        Some("user"),
    );

    // The routes are in the served OpenAPI document.
    let doc = request(http, "GET", "/api/openapi.json", None, None).json();
    for path in ["/api/v1/users", "/api/v1/users/{user}/password"] {
        assert!(doc["paths"][path].is_object(), "{path} not documented");
    }

    dep.stop(server).unwrap();
    // No plaintext password anywhere: log, log of events, databases.
    for p in [password, new_password] {
        let found = files_containing(dep.data.parent().unwrap(), p.as_bytes());
        assert!(found.is_empty(), "{p:?} found in {found:?}");
    }
}
