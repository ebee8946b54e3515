//! `switchboard config set|get|list`: live settings change without a
//! restart, through a running server or straight on the bus, and bad input
//! is refused with status 2, naming the key and the accepted values.

use std::process::Stdio;
use std::time::Duration;

use switchboard_infra::bus::Bus;
use switchboard_infra::bus::embedded::{EmbeddedBus, EmbeddedConfig};
use switchboard_processors::settings;

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

/// Runs `switchboard config ARGS`; returns (exit code, stdout, stderr).
async fn config(data: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let child = switchboard(data)
        .arg("config")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("config command finished")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn settings_without_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();

    let (code, out, err) = config(data, &["get", "im.offline.max_per_user"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "im.offline.max_per_user = 100\n");

    let (code, out, err) = config(data, &["set", "im.offline.max_per_user", "250"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "setting.changed: im.offline.max_per_user = 250\n");
    let (code, out, err) = config(data, &["set", "presence.auto_authorize", "off"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "setting.changed: presence.auto_authorize = false\n");

    let (_, out, _) = config(data, &["get", "im.offline.max_per_user"]).await;
    assert_eq!(out, "im.offline.max_per_user = 250\n");
    let (code, out, err) = config(data, &["list"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), settings::SPECS.len(), "{out}");
    assert!(out.contains("im.offline.max_per_user = 250\n"), "{out}");
    assert!(out.contains("presence.auto_authorize = false\n"), "{out}");
    assert!(out.contains("presence.max_contacts = 200\n"), "{out}");

    // Bad input: status 2, the key and the accepted values named, nothing
    // written.
    let (code, _, err) = config(data, &["set", "im.offline.max_per_user", "lots"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "invalid value \"lots\" for im.offline.max_per_user: expected an integer from 0 to 4294967295"
        ),
        "{err}"
    );
    let (code, _, err) = config(data, &["set", "im.enabled", "maybe"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("im.enabled: expected true or false"), "{err}");
    let (code, _, err) = config(data, &["set", "im.no_such_thing", "1"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("unknown setting im.no_such_thing; known settings: "),
        "{err}"
    );
    assert!(err.contains("im.offline.max_per_user"), "{err}");
    let (code, _, err) = config(data, &["get", "im.no_such_thing"]).await;
    assert_eq!(code, 2, "{err}");

    // The log holds the two changes, the first with no previous value (it
    // was the default), as setting.changed records keyed by the setting.
    let bus = EmbeddedBus::open(EmbeddedConfig::new(data.join("bus.sqlite")))
        .await
        .unwrap();
    let records =
        switchboard_infra::bus::conformance::read_all(&bus, "switchboard.settings", usize::MAX)
            .await;
    assert_eq!(records.len(), 2);
    let loaded = settings::load(&bus, "switchboard", Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(loaded.offline_max_per_user, 250);
    assert!(!loaded.auto_authorize);
    assert_eq!(bus.backend(), "embedded");
}

#[tokio::test]
async fn a_set_through_the_running_server_is_live_at_once() {
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !data.join("admin.sock").exists() {
        assert!(tokio::time::Instant::now() < deadline, "no admin socket");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The server holds the embedded log; the command goes through its
    // socket, and the server answers only once its own follower has the
    // new value: a get right after reads it from the follower.
    let (code, out, err) = config(&data, &["set", "presence.max_watchers", "7"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "setting.changed: presence.max_watchers = 7\n");
    let (code, out, err) = config(&data, &["get", "presence.max_watchers"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "presence.max_watchers = 7\n");
    let (code, out, _) = config(&data, &["set", "presence.max_watchers", "8"]).await;
    assert_eq!(code, 0);
    assert_eq!(out, "setting.changed: presence.max_watchers = 8\n");
    let (_, out, _) = config(&data, &["list"]).await;
    assert!(out.contains("presence.max_watchers = 8\n"), "{out}");
    let (code, _, err) = config(&data, &["set", "presence.max_watchers", "-1"]).await;
    assert_eq!(code, 2, "{err}");

    let pid = server.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(server.wait().await.unwrap().success());

    // Persisted: after the restart, without a server, the value stays.
    let (_, out, _) = config(&data, &["get", "presence.max_watchers"]).await;
    assert_eq!(out, "presence.max_watchers = 8\n");
}

#[tokio::test]
async fn the_follower_sees_a_change_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let bus: std::sync::Arc<dyn Bus> = std::sync::Arc::new(
        EmbeddedBus::open(EmbeddedConfig::new(dir.path().join("bus.sqlite")))
            .await
            .unwrap(),
    );
    bus.create_topics(&switchboard_infra::bus::TopicConfig::catalogue(
        "switchboard",
    ))
    .await
    .unwrap();
    let node = switchboard_schemas::NodeId::new("node1");
    let current = settings::LiveSettings::default();
    settings::publish(
        &*bus,
        "switchboard",
        node.clone(),
        &current,
        "im.forking.stickiness_secs",
        serde_json::json!(60),
        "test",
    )
    .await
    .unwrap();
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let mut handle = settings::follow(
        bus.clone(),
        "switchboard",
        Duration::from_secs(10),
        shutdown,
    )
    .await
    .unwrap();
    // What was written before the start is there at once.
    assert_eq!(handle.borrow_and_update().forking_stickiness_secs, 60);
    let mut limits = settings::policy_limits(handle.clone());
    assert_eq!(limits.borrow_and_update().max_contacts, 200);

    let now = handle.borrow().clone();
    settings::publish(
        &*bus,
        "switchboard",
        node,
        &now,
        "presence.max_contacts",
        serde_json::json!(195),
        "test",
    )
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(10), handle.changed())
        .await
        .expect("the change arrives")
        .unwrap();
    assert_eq!(handle.borrow().max_contacts, 195);
    assert_eq!(handle.borrow().forking_stickiness_secs, 60);
    tokio::time::timeout(Duration::from_secs(10), limits.changed())
        .await
        .expect("the limits follow")
        .unwrap();
    assert_eq!(limits.borrow().max_contacts, 195);
}
