//! `switchboard user ...`: users are events, passwords never stored, and the
//! commands work both on a stopped deployment and through a running server.

use std::process::Stdio;
use std::time::Duration;

use switchboard_infra::bus::conformance::read_all;
use switchboard_infra::bus::embedded::{EmbeddedBus, EmbeddedConfig};
use switchboard_schemas::{Envelope, Event};
use tokio::io::AsyncWriteExt;

const PASSWORD: &str = "correct horse battery staple";

fn switchboard(data: &std::path::Path) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SWITCHBOARD") {
            cmd.env_remove(k);
        }
    }
    cmd.env("SWITCHBOARD_LOG", "warn")
        .env("SWITCHBOARD__XMPP__C2S_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD__XMPP__C2S_TLS_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD__SIP__UDP_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD__SIP__TCP_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD__SIP__TLS_LISTEN", "127.0.0.1:0")
        .env("SWITCHBOARD__DATA_DIR", data)
        .env("SWITCHBOARD__DOMAINS", "[\"example.com\"]");
    cmd
}

/// Runs `switchboard user ARGS` with `stdin`; returns (success, stdout, stderr).
async fn user(data: &std::path::Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = switchboard(data)
        .arg("user")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("user command finished")
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn admin_events(data: &std::path::Path) -> Vec<Envelope> {
    let bus = EmbeddedBus::open(EmbeddedConfig::new(data.join("bus.sqlite")))
        .await
        .unwrap();
    read_all(&bus, "switchboard.admin", usize::MAX)
        .await
        .iter()
        .map(|r| Envelope::from_json_slice(r.value.as_deref().unwrap()).unwrap())
        .collect()
}

#[tokio::test]
async fn user_lifecycle_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let line = format!("{PASSWORD}\n");

    let (ok, out, err) = user(
        data,
        &["add", "Alice@Example.COM", "--password-stdin"],
        &line,
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "user.provisioned: alice@example.com");

    // Addresses are unique case-insensitively.
    let (ok, _, err) = user(
        data,
        &["add", "ALICE@example.com", "--password-stdin"],
        &line,
    )
    .await;
    assert!(!ok);
    assert!(err.contains("already exists"), "{err}");
    // Only served domains; malformed addresses are named.
    let (ok, _, err) = user(
        data,
        &["add", "bob@elsewhere.org", "--password-stdin"],
        &line,
    )
    .await;
    assert!(!ok);
    assert!(err.contains("not a served domain"), "{err}");
    let (ok, _, err) = user(
        data,
        &["add", "b\"ob@example.com", "--password-stdin"],
        &line,
    )
    .await;
    assert!(!ok);
    assert!(err.contains("not a valid address"), "{err}");
    let (ok, _, err) = user(
        data,
        &["add", "carol@example.com", "--password-stdin"],
        "\n",
    )
    .await;
    assert!(!ok);
    assert!(err.contains("empty"), "{err}");

    let (ok, _, err) = user(
        data,
        &["disable", "alice@example.com", "--reason", "left"],
        "",
    )
    .await;
    assert!(ok, "{err}");
    let (_, out, _) = user(data, &["list"], "").await;
    assert_eq!(out, "alice@example.com\tdisabled\t\n");
    let (ok, _, err) = user(data, &["enable", "alice@example.com"], "").await;
    assert!(ok, "{err}");
    let (ok, _, err) = user(
        data,
        &["passwd", "alice@example.com", "--password-stdin"],
        "new one\n",
    )
    .await;
    assert!(ok, "{err}");
    let (ok, _, err) = user(data, &["delete", "alice@example.com"], "").await;
    assert!(ok, "{err}");
    let (_, out, _) = user(data, &["list"], "").await;
    assert_eq!(out, "");
    let (ok, _, err) = user(data, &["delete", "alice@example.com"], "").await;
    assert!(!ok);
    assert!(err.contains("no user"), "{err}");

    let types: Vec<String> = admin_events(data)
        .await
        .iter()
        .map(|e| e.event.event_type().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "user.provisioned",
            "user.disabled",
            "user.enabled",
            "user.credentials_changed",
            "user.deleted"
        ]
    );
}

#[tokio::test]
async fn user_add_through_a_running_server_stores_only_scram_keys() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = switchboard(&data)
        .arg("serve")
        .env("SWITCHBOARD__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !data.join("admin.sock").exists() {
        assert!(tokio::time::Instant::now() < deadline, "no admin socket");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The server holds the embedded log; the command goes through its socket.
    let (ok, out, err) = user(
        &data,
        &["add", "bob@example.com", "--password-stdin"],
        &format!("{PASSWORD}\n"),
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "user.provisioned: bob@example.com");
    let (_, out, _) = user(&data, &["list"], "").await;
    assert_eq!(out, "bob@example.com\tenabled\t\n");

    let pid = server.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let status = server.wait().await.unwrap();
    assert!(status.success());
    assert!(
        !data.join("admin.sock").exists(),
        "socket removed at shutdown"
    );

    let events = admin_events(&data).await;
    let Some(Event::UserProvisioned(p)) = events.first().map(|e| &e.event) else {
        panic!("no user.provisioned: {events:?}");
    };
    let mechanisms: Vec<&str> = p.credentials.iter().map(|c| c.mechanism.as_str()).collect();
    assert_eq!(mechanisms, ["SCRAM-SHA-256", "SCRAM-SHA-1"]);
    assert!(p.credentials.iter().all(|c| c.iterations >= 4096));
    // The password is nowhere in the log's files.
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes
                    .windows(PASSWORD.len())
                    .any(|w| w == PASSWORD.as_bytes()),
                "plaintext password in {}",
                path.display()
            );
        }
    }
}
