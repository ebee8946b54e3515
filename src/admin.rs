//! User administration: `switchboard user ...`.
//!
//! Every change is an event: `user.*` on the `admin` log (the audit record)
//! and the user's full record as `user.state` on the compacted `users` topic
//! (what gateways authenticate against). Passwords are turned into salted
//! SCRAM keys in the command itself; the plaintext never leaves it.
//!
//! A running `switchboard serve` listens on `data_dir/admin.sock` (mode
//! 0600, so file permissions are the authentication). The command sends its
//! request there when the socket answers, so it works while the server holds
//! the embedded log; otherwise it opens the bus itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use switchboard_gateway::users::UserDirectory;
use switchboard_infra::bus::Bus;
use switchboard_infra::config::Config;
use switchboard_schemas::events::{
    DigestCredential, ScramCredential, UserCredentialsChanged, UserDeleted, UserDisabled,
    UserEnabled, UserProvisioned, UserState,
};
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{BareJid, Envelope, Event, NodeId};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::RwLock;

/// Longest request line accepted on the admin socket.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// How long loading the user directory may take.
const LOAD_LIMIT: Duration = Duration::from_secs(30);

/// One administration operation. Credentials arrive already derived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
// Setting changes (`config set`) join the user operations here.
#[allow(clippy::enum_variant_names)]
pub enum Request {
    /// Provision a new user.
    UserAdd {
        /// Normalised bare address.
        user: String,
        /// Display name.
        display_name: Option<String>,
        /// SCRAM keys of the initial password.
        credentials: Vec<ScramCredential>,
        /// SIP digest secrets of the initial password.
        #[serde(default)]
        digest: Vec<DigestCredential>,
        /// Who asks.
        by: String,
    },
    /// Replace a user's credentials.
    UserPasswd {
        /// Normalised bare address.
        user: String,
        /// SCRAM keys of the new password.
        credentials: Vec<ScramCredential>,
        /// SIP digest secrets of the new password.
        #[serde(default)]
        digest: Vec<DigestCredential>,
        /// Who asks.
        by: String,
    },
    /// Disable a user.
    UserDisable {
        /// Normalised bare address.
        user: String,
        /// Why.
        reason: Option<String>,
        /// Who asks.
        by: String,
    },
    /// Enable a disabled user.
    UserEnable {
        /// Normalised bare address.
        user: String,
        /// Who asks.
        by: String,
    },
    /// Delete a user.
    UserDelete {
        /// Normalised bare address.
        user: String,
        /// Who asks.
        by: String,
    },
    /// List users.
    UserList,
    /// Change a live setting (`switchboard config set`).
    SettingSet {
        /// The setting key.
        key: String,
        /// The new value, already checked by the command.
        value: serde_json::Value,
        /// Who asks.
        by: String,
    },
    /// Read a live setting.
    SettingGet {
        /// The setting key.
        key: String,
    },
    /// Read every live setting.
    SettingList,
}

/// A user as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSummary {
    /// Bare address.
    pub user: String,
    /// Whether logins are allowed.
    pub enabled: bool,
    /// Display name.
    pub display_name: Option<String>,
}

/// The outcome of a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Done.
    Done {
        /// What was done.
        message: String,
    },
    /// The users.
    Users {
        /// In address order.
        users: Vec<UserSummary>,
    },
    /// Live settings and their values.
    Settings {
        /// By key.
        settings: std::collections::BTreeMap<String, serde_json::Value>,
    },
    /// Refused or failed.
    Error {
        /// Why.
        message: String,
    },
}

/// Executes requests against the bus, keeping the directory it checks up to
/// date with its own writes (read-your-writes).
pub struct Admin {
    bus: Arc<dyn Bus>,
    node: NodeId,
    admin_topic: String,
    users_topic: String,
    directory: Arc<RwLock<UserDirectory>>,
    prefix: String,
    /// The live settings this process follows (none in a one-off command).
    settings: Option<switchboard_processors::settings::SettingsHandle>,
}

impl Admin {
    /// Loads the user directory and returns the executor.
    pub async fn load(bus: Arc<dyn Bus>, config: &Config) -> anyhow::Result<Self> {
        let users_topic = full_name(&config.bus.topic_prefix, Topic::Users);
        let directory = UserDirectory::load(&*bus, &users_topic, LOAD_LIMIT).await?;
        Ok(Self::with_directory(
            bus,
            config,
            Arc::new(RwLock::new(directory)),
        ))
    }

    /// An executor sharing a directory that something else keeps up to date.
    pub fn with_directory(
        bus: Arc<dyn Bus>,
        config: &Config,
        directory: Arc<RwLock<UserDirectory>>,
    ) -> Self {
        Self {
            bus,
            node: NodeId::new(config.node_id.clone()),
            admin_topic: full_name(&config.bus.topic_prefix, Topic::Admin),
            users_topic: full_name(&config.bus.topic_prefix, Topic::Users),
            directory,
            prefix: config.bus.topic_prefix.clone(),
            settings: None,
        }
    }

    /// Answers settings requests from `settings` (kept current by a
    /// follower) instead of reading the topic each time.
    #[must_use]
    pub fn with_settings(
        mut self,
        settings: switchboard_processors::settings::SettingsHandle,
    ) -> Self {
        self.settings = Some(settings);
        self
    }

    /// Whether `user` (normalised) is provisioned.
    pub async fn has_user(&self, user: &str) -> bool {
        self.directory.read().await.get(user).is_some()
    }

    /// Executes one request; refusals come back as [`Response::Error`].
    pub async fn execute(&self, request: Request) -> Response {
        match self.try_execute(request).await {
            Ok(r) => r,
            Err(e) => Response::Error {
                message: format!("{e:#}"),
            },
        }
    }

    async fn try_execute(&self, request: Request) -> anyhow::Result<Response> {
        if let Request::SettingSet { .. } | Request::SettingGet { .. } | Request::SettingList =
            request
        {
            return crate::config_cmd::execute(
                &*self.bus,
                &self.prefix,
                self.node.clone(),
                self.settings.as_ref(),
                request,
            )
            .await;
        }
        let mut directory = self.directory.write().await;
        let (user, audit, state): (String, Event, Option<UserState>) = match request {
            Request::UserList => {
                return Ok(Response::Users {
                    users: directory
                        .iter()
                        .map(|u| UserSummary {
                            user: u.user.as_str().to_owned(),
                            enabled: u.enabled,
                            display_name: u.display_name.clone(),
                        })
                        .collect(),
                });
            }
            Request::UserAdd {
                user,
                display_name,
                credentials,
                digest,
                by,
            } => {
                if directory.get(&user).is_some() {
                    bail!("user {user} already exists");
                }
                let jid = BareJid::new(user.clone());
                let state = UserState {
                    user: jid.clone(),
                    display_name: display_name.clone(),
                    locale: None,
                    enabled: true,
                    credentials: credentials.clone(),
                    digest: digest.clone(),
                };
                let audit = UserProvisioned {
                    user: jid,
                    display_name,
                    locale: None,
                    credentials,
                    digest,
                    by: Some(by),
                };
                (user, audit.into(), Some(state))
            }
            Request::UserPasswd {
                user,
                credentials,
                digest,
                by,
            } => {
                let mut state = existing(&directory, &user)?;
                state.credentials = credentials.clone();
                state.digest = digest.clone();
                let audit = UserCredentialsChanged {
                    user: state.user.clone(),
                    credentials,
                    digest,
                    by: Some(by),
                };
                (user, audit.into(), Some(state))
            }
            Request::UserDisable { user, reason, by } => {
                let mut state = existing(&directory, &user)?;
                state.enabled = false;
                let audit = UserDisabled {
                    user: state.user.clone(),
                    reason,
                    by: Some(by),
                };
                (user, audit.into(), Some(state))
            }
            Request::UserEnable { user, by } => {
                let mut state = existing(&directory, &user)?;
                state.enabled = true;
                let audit = UserEnabled {
                    user: state.user.clone(),
                    by: Some(by),
                };
                (user, audit.into(), Some(state))
            }
            Request::UserDelete { user, by } => {
                let state = existing(&directory, &user)?;
                let audit = UserDeleted {
                    user: state.user,
                    by: Some(by),
                };
                (user, audit.into(), None)
            }
            Request::SettingSet { .. } | Request::SettingGet { .. } | Request::SettingList => {
                bail!("settings requests are answered above")
            }
        };
        let message = format!("{}: {}", audit.event_type(), user);
        // The audit record first: the log must hold every change that took
        // effect, and the state record is what makes it take effect.
        let audit = Envelope::new(self.node.clone(), user.clone(), audit);
        self.bus
            .produce(
                &self.admin_topic,
                user.as_bytes(),
                Some(&audit.to_json_vec()?),
            )
            .await
            .context("storing the audit event")?;
        let value = match state {
            Some(state) => Some(
                Envelope::caused_by(&audit, self.node.clone(), user.clone(), state)
                    .to_json_vec()?,
            ),
            None => None,
        };
        let delivery = self
            .bus
            .produce(&self.users_topic, user.as_bytes(), value.as_deref())
            .await
            .context("storing the user record")?;
        directory.apply(user.as_bytes(), value.as_deref(), delivery.offset);
        Ok(Response::Done { message })
    }
}

fn existing(directory: &UserDirectory, user: &str) -> anyhow::Result<UserState> {
    directory
        .get(user)
        .cloned()
        .with_context(|| format!("no user {user}"))
}

/// The admin socket of a server using `config`.
pub fn socket_path(config: &Config) -> PathBuf {
    config.data_dir.join("admin.sock")
}

/// Serves requests on `path` until the task is dropped.
pub async fn serve_socket(path: &Path, admin: Arc<Admin>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        // A socket left by a process that died; nothing answers on it.
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding the admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        let (stream, _) = listener.accept().await?;
        let admin = admin.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES as u64));
            let response = match reader.read_line(&mut line).await {
                Ok(_) => match serde_json::from_str::<Request>(&line) {
                    Ok(request) => admin.execute(request).await,
                    Err(e) => Response::Error {
                        message: format!("malformed request: {e}"),
                    },
                },
                Err(e) => Response::Error {
                    message: format!("reading the request: {e}"),
                },
            };
            if let Ok(mut bytes) = serde_json::to_vec(&response) {
                bytes.push(b'\n');
                let _ = write.write_all(&bytes).await;
            }
        });
    }
}

/// Sends `request` to a running server, or executes it on the bus directly
/// when none answers.
pub async fn submit(config: &Config, request: Request) -> anyhow::Result<Response> {
    let path = socket_path(config);
    if let Ok(stream) = tokio::net::UnixStream::connect(&path).await {
        let (read, mut write) = stream.into_split();
        let mut bytes = serde_json::to_vec(&request)?;
        bytes.push(b'\n');
        write.write_all(&bytes).await?;
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await?;
        return serde_json::from_str(&line)
            .with_context(|| format!("unreadable answer from {}", path.display()));
    }
    let bus = switchboard_infra::bus::open(config)
        .await
        .with_context(|| format!("opening the {:?} bus", config.bus.backend))?;
    bus.create_topics(&switchboard_infra::bus::TopicConfig::catalogue(
        &config.bus.topic_prefix,
    ))
    .await?;
    let admin = Admin::load(bus, config).await?;
    Ok(admin.execute(request).await)
}
