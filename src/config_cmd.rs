//! `switchboard config set|get|list`: live settings (SPEC.md §11: changes
//! take effect without a restart).
//!
//! A change is a `setting.changed` event on the compacted `settings` topic,
//! which every component follows (`switchboard_processors::settings`). Like
//! the user commands, the request goes through a running server's admin
//! socket when one answers, and straight to the bus otherwise. Keys and
//! values are checked here first: an unknown key or a bad value ends the
//! command with status 2 and names the key and the accepted values.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::bail;
use serde_json::Value;
use switchboard_infra::bus::Bus;
use switchboard_processors::settings::{self, LiveSettings, SettingsHandle};
use switchboard_schemas::NodeId;

use crate::admin::{self, Request, Response};

/// How long reading the settings topic may take.
const LOAD_LIMIT: Duration = Duration::from_secs(30);
/// How long a change may take to reach this process's follower.
const VISIBLE_LIMIT: Duration = Duration::from_secs(10);

fn by() -> String {
    format!(
        "admin-cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".to_owned())
    )
}

/// `config set KEY VALUE`.
pub async fn set(
    config: &switchboard_infra::config::Config,
    key: &str,
    value: &str,
) -> anyhow::Result<()> {
    let value = settings::parse_value(key, value)?;
    let request = Request::SettingSet {
        key: key.to_owned(),
        value,
        by: by(),
    };
    print(admin::submit(config, request).await?)
}

/// `config get KEY`.
pub async fn get(config: &switchboard_infra::config::Config, key: &str) -> anyhow::Result<()> {
    settings::spec(key)?;
    print(
        admin::submit(
            config,
            Request::SettingGet {
                key: key.to_owned(),
            },
        )
        .await?,
    )
}

/// `config list`.
pub async fn list(config: &switchboard_infra::config::Config) -> anyhow::Result<()> {
    print(admin::submit(config, Request::SettingList).await?)
}

fn print(response: Response) -> anyhow::Result<()> {
    match response {
        Response::Done { message } => println!("{message}"),
        Response::Settings { settings } => {
            for (key, value) in settings {
                println!("{key} = {value}");
            }
        }
        Response::Users { .. } => bail!("unexpected answer to a settings request"),
        Response::Error { message } => bail!("{message}"),
    }
    Ok(())
}

/// The settings in force: the process's follower when it has one, the
/// topic read to its end otherwise.
async fn current(
    bus: &dyn Bus,
    prefix: &str,
    handle: Option<&SettingsHandle>,
) -> anyhow::Result<LiveSettings> {
    Ok(match handle {
        Some(h) => h.borrow().clone(),
        None => settings::load(bus, prefix, LOAD_LIMIT).await?,
    })
}

/// Executes a settings request for the admin executor.
pub async fn execute(
    bus: &dyn Bus,
    prefix: &str,
    node: NodeId,
    handle: Option<&SettingsHandle>,
    request: Request,
) -> anyhow::Result<Response> {
    match request {
        Request::SettingGet { key } => {
            let value = current(bus, prefix, handle).await?.get(&key)?;
            Ok(Response::Settings {
                settings: BTreeMap::from([(key, value)]),
            })
        }
        Request::SettingList => Ok(Response::Settings {
            settings: current(bus, prefix, handle)
                .await?
                .list()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        }),
        Request::SettingSet { key, value, by } => {
            let now = current(bus, prefix, handle).await?;
            let change = settings::publish(bus, prefix, node, &now, &key, value, &by).await?;
            if let Some(handle) = handle {
                // Read-your-writes: answer once this process follows it.
                wait_visible(handle.clone(), &key, &change.value).await;
            }
            Ok(Response::Done {
                message: format!("setting.changed: {} = {}", change.key, change.value),
            })
        }
        other => bail!("not a settings request: {other:?}"),
    }
}

async fn wait_visible(mut handle: SettingsHandle, key: &str, value: &Value) {
    let visible = |h: &SettingsHandle| h.borrow().get(key).ok().as_ref() == Some(value);
    let _ = tokio::time::timeout(VISIBLE_LIMIT, async {
        while !visible(&handle) {
            if handle.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
}
