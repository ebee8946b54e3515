//! `switchboard serve` on a fresh data directory: starts with no other
//! service, makes its certificate, answers health/readiness/metrics, emits
//! node heartbeats to the embedded log, and stops cleanly on SIGTERM.

use std::time::Duration;

use switchboard_infra::bus::conformance::read_all;
use switchboard_infra::bus::embedded::{EmbeddedBus, EmbeddedConfig};
use switchboard_schemas::{Envelope, Event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.1 GET; returns (status, body).
async fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn switchboard() -> tokio::process::Command {
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
        .env("SWITCHBOARD__SIP__TLS_LISTEN", "127.0.0.1:0");
    cmd
}

#[tokio::test]
async fn serve_starts_on_a_fresh_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = switchboard()
        .arg("serve")
        .env("SWITCHBOARD__DATA_DIR", &data)
        .env("SWITCHBOARD__HTTP__LISTEN", &addr)
        .env("SWITCHBOARD__NODE_ID", "test-node")
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, body)) = get(&addr, "/readyz").await {
            assert_eq!(body, "ready\n");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get(&addr, "/healthz").await.unwrap().0, 200);
    assert!(data.join("tls/cert.pem").exists(), "certificate generated");
    assert!(data.join("bus.sqlite").exists(), "embedded log created");
    // The first heartbeat is produced at start.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, metrics) = get(&addr, "/metrics").await.unwrap();
        assert_eq!(status, 200);
        if metrics
            .contains("switchboard_bus_produced_records_total{backend=\"embedded\",outcome=\"ok\"}")
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no produce metric: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    assert!(exit.success(), "exit status {exit}");

    // The heartbeat is in the log as a versioned event keyed by the node.
    let bus = EmbeddedBus::open(EmbeddedConfig::new(data.join("bus.sqlite")))
        .await
        .unwrap();
    let records = read_all(&bus, "switchboard.sessions", 1).await;
    let record = records.first().expect("a heartbeat");
    assert_eq!(&record.key[..], b"test-node");
    let envelope = Envelope::from_json_slice(record.value.as_deref().unwrap()).unwrap();
    assert_eq!(envelope.subject, "test-node");
    assert!(
        matches!(envelope.event, Event::NodeHeartbeat(_)),
        "{envelope:?}"
    );
}

#[tokio::test]
async fn bad_config_names_the_field_and_fails() {
    let out = switchboard()
        .args(["config", "check"])
        .env("SWITCHBOARD__BUS__KAFKA__LINGER_MS", "soon")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bus.kafka.linger_ms"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[bus]\nbackend = \"kafak\"\n").unwrap();
    let out = switchboard()
        .args(["--config", file.to_str().unwrap(), "serve"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bus.backend"), "{stderr}");
}

#[tokio::test]
async fn roles_need_a_shared_bus() {
    let dir = tempfile::tempdir().unwrap();
    let out = switchboard()
        .args(["serve", "--role", "gateway"])
        .env("SWITCHBOARD__DATA_DIR", dir.path())
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bus.backend"), "{stderr}");
}
