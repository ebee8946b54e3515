//! Configuration: one TOML file (every field optional, unknown fields refused)
//! with environment overrides.
//!
//! An environment variable `SWITCHBOARD__<SECTION>__<FIELD>` overrides the
//! field at that path (`SWITCHBOARD__BUS__BACKEND=kafka`,
//! `SWITCHBOARD__BUS__KAFKA__BOOTSTRAP_SERVERS=10.0.0.5:9092`). Its value is
//! read as a TOML value when it is one (`42`, `true`, `["a", "b"]`) and as a
//! string otherwise. `switchboard.example.toml` lists every field with its
//! default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bus::embedded::{EmbeddedConfig, Synchronous};
use crate::bus::kafka::KafkaConfig;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "SWITCHBOARD__";

/// A configuration that cannot be used, naming the field at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// A field has a wrong type, an unknown name or an invalid value.
    #[error("invalid config field `{field}` ({origin}): {message}")]
    Field {
        /// Dotted path of the field, e.g. `bus.kafka.linger_ms`.
        field: String,
        /// Where the value came from: the file or an environment variable.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration of a node.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name of this node: recorded as the producing node of every event and
    /// used for its delivery partition. Letters, digits, `-` and `_`.
    pub node_id: String,
    /// Directory for the embedded log, the SQLite database and generated
    /// certificates; created if missing.
    pub data_dir: PathBuf,
    /// The IM domains served; the first is the default domain.
    pub domains: Vec<String>,
    /// The bus.
    pub bus: BusSettings,
    /// The SQL database of the projections.
    pub database: DatabaseSettings,
    /// The HTTP API (health, readiness, metrics, administration).
    pub http: HttpSettings,
    /// TLS certificates.
    pub tls: TlsSettings,
    /// Authentication.
    pub auth: AuthSettings,
    /// The XMPP gateway.
    pub xmpp: XmppSettings,
    /// Message routing.
    pub messaging: MessagingSettings,
    /// The SIP gateway.
    pub sip: SipSettings,
    /// The compliance profile: which events the compliance log records.
    pub compliance: ComplianceSettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: "node1".to_owned(),
            data_dir: PathBuf::from("./data"),
            domains: vec!["localhost".to_owned()],
            bus: BusSettings::default(),
            database: DatabaseSettings::default(),
            http: HttpSettings::default(),
            tls: TlsSettings::default(),
            auth: AuthSettings::default(),
            xmpp: XmppSettings::default(),
            messaging: MessagingSettings::default(),
            sip: SipSettings::default(),
            compliance: ComplianceSettings::default(),
        }
    }
}

/// The compliance profile (SPEC.md §10): which events the tamper-evident
/// compliance log records.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ComplianceSettings {
    /// Run the compliance log at all.
    pub enabled: bool,
    /// One-to-one messages and their outcomes (`message.*`).
    pub messages: bool,
    /// Room joins and exits (`room.joined`, `room.left`).
    pub room_joins_exits: bool,
    /// Room messages and subject changes (`room.message`, `room.subject_changed`).
    pub room_messages: bool,
    /// Managed file transfers (`file.*`).
    pub file_transfers: bool,
    /// Logins, resource bindings and session ends (`session.*` but heartbeats).
    pub logins: bool,
    /// Presence changes (`presence.*`).
    pub presence: bool,
}

impl Default for ComplianceSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            messages: true,
            room_joins_exits: true,
            room_messages: true,
            file_transfers: true,
            logins: true,
            presence: false,
        }
    }
}

/// Settings of the SIP gateway (SPEC.md §5).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SipSettings {
    /// UDP listener (RFC 3261 §18).
    pub udp_listen: SocketAddr,
    /// TCP listener (RFC 3261 §18).
    pub tcp_listen: SocketAddr,
    /// TLS listener (RFC 3261 §26.2, `sips:`).
    pub tls_listen: SocketAddr,
    /// Digest realm (RFC 3261 §22.1); empty means the default domain.
    /// Changing it invalidates stored digest secrets until passwords are set
    /// again, as the realm is part of them.
    pub realm: String,
    /// Largest message accepted, in bytes (start line, headers and body).
    pub max_message_bytes: usize,
    /// Most header lines in one message.
    pub max_headers: usize,
    /// Longest header line, in bytes.
    pub max_header_line_bytes: usize,
    /// Registration Expires when the client names none (RFC 3261 §10.2.1.1).
    pub register_default_expires_secs: u32,
    /// Longest registration granted.
    pub register_max_expires_secs: u32,
    /// Shortest registration accepted (423 Interval Too Brief below it).
    pub register_min_expires_secs: u32,
    /// Publication Expires when the client names none (RFC 3903 §4.1).
    pub publish_default_expires_secs: u32,
    /// Subscription Expires when the client names none, and the maximum
    /// (SPEC.md §5: 3600 s; RFC 3856 §6.4).
    pub subscribe_max_expires_secs: u32,
    /// Seconds a digest nonce is valid; an older one is answered
    /// `stale=true` (RFC 3261 §22.4, RFC 7616 §3.3).
    pub nonce_lifetime_secs: u64,
    /// Minimum seconds between two NOTIFYs about one presentity to one
    /// watcher (RFC 3856 §6.10: 5 s).
    pub notify_min_interval_secs: u64,
    /// A TCP or TLS connection that sends nothing (not even an RFC 5626
    /// CRLF keepalive) for this long is closed; 0: never.
    pub idle_timeout_secs: u64,
    /// Most TCP and TLS connections at once; more are closed at accept.
    pub max_connections: usize,
    /// Requests of one TCP or TLS connection being handled at once; past
    /// it the connection is not read until one finishes.
    pub max_requests_per_connection: usize,
}

impl Default for SipSettings {
    fn default() -> Self {
        Self {
            udp_listen: SocketAddr::from(([0, 0, 0, 0], 5060)),
            tcp_listen: SocketAddr::from(([0, 0, 0, 0], 5060)),
            tls_listen: SocketAddr::from(([0, 0, 0, 0], 5061)),
            realm: String::new(),
            max_message_bytes: 65_535,
            max_headers: 64,
            max_header_line_bytes: 4096,
            register_default_expires_secs: 3600,
            register_max_expires_secs: 7200,
            register_min_expires_secs: 60,
            publish_default_expires_secs: 3600,
            subscribe_max_expires_secs: 3600,
            nonce_lifetime_secs: 300,
            notify_min_interval_secs: 5,
            idle_timeout_secs: 600,
            max_connections: 100_000,
            max_requests_per_connection: 32,
        }
    }
}

impl SipSettings {
    /// The digest realm: `realm`, or the default domain when it is empty.
    pub fn realm_or<'a>(&'a self, default_domain: &'a str) -> &'a str {
        if self.realm.is_empty() {
            default_domain
        } else {
            &self.realm
        }
    }
}

/// Message routing settings (SPEC.md §7).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MessagingSettings {
    /// Most messages stored for one offline user; beyond it the sender gets
    /// an error.
    pub offline_max_per_user: usize,
    /// Whether messages for users without a session are stored (XEP-0160);
    /// off: the sender gets `service-unavailable`.
    pub offline_enabled: bool,
    /// Most messages stored by one router instance (the users whose
    /// partitions it owns); beyond it the sender gets `resource-constraint`.
    pub offline_max_per_node: usize,
    /// IM forking: silence after which chat to a user stops sticking to the
    /// client that replied and goes to all of the user's clients again.
    pub sticky_timeout_secs: u64,
    /// A gateway node that sent no heartbeat for this long is down: its
    /// sessions end and their messages go to offline storage.
    pub node_timeout_secs: u64,
}

impl Default for MessagingSettings {
    fn default() -> Self {
        Self {
            offline_max_per_user: 100,
            offline_enabled: true,
            offline_max_per_node: 30_000,
            sticky_timeout_secs: 600,
            node_timeout_secs: 10,
        }
    }
}

/// Settings of the XMPP gateway (SPEC.md §4).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct XmppSettings {
    /// Client-to-server listener with STARTTLS (RFC 6120 §5).
    pub c2s_listen: SocketAddr,
    /// Client-to-server listener with direct TLS (XEP-0368).
    pub c2s_tls_listen: SocketAddr,
    /// Refuse everything but STARTTLS before TLS. Turning this off allows
    /// plaintext sessions (SCRAM only; PLAIN never without TLS).
    pub require_starttls: bool,
    /// Largest stanza accepted, in bytes; larger ones end the stream with
    /// `policy-violation`.
    pub max_stanza_bytes: usize,
    /// Deepest element nesting inside a stanza.
    pub max_depth: usize,
    /// Most attributes on one element.
    pub max_attributes: usize,
    /// Most sessions one user may have at once (SPEC.md §4, default 10).
    pub max_sessions_per_user: usize,
    /// Failed authentications on one connection before it is closed.
    pub max_auth_failures_per_connection: u32,
    /// Seconds of silence after which the server pings a session (XEP-0199).
    pub ping_interval_secs: u64,
    /// Seconds a pinged session has to show life before it is closed.
    pub ping_timeout_secs: u64,
}

impl Default for XmppSettings {
    fn default() -> Self {
        Self {
            c2s_listen: SocketAddr::from(([0, 0, 0, 0], 5222)),
            c2s_tls_listen: SocketAddr::from(([0, 0, 0, 0], 5223)),
            require_starttls: true,
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
            max_attributes: 64,
            max_sessions_per_user: 10,
            max_auth_failures_per_connection: 3,
            ping_interval_secs: 60,
            ping_timeout_secs: 30,
        }
    }
}

/// Authentication settings.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// PBKDF2 iterations of newly stored SCRAM credentials (at least 4096,
    /// RFC 7677 §4). Existing credentials keep theirs until the next
    /// password change.
    pub scram_iterations: u32,
    /// Failed logins from one remote address within the window before
    /// further attempts from it are refused (0: no limit).
    pub max_failures_per_address: usize,
    /// Failed logins for one account within the window before further
    /// attempts for it are refused (0: no limit).
    pub max_failures_per_account: usize,
    /// The window of the two limits above, in seconds.
    pub failure_window_secs: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            scram_iterations: 4096,
            max_failures_per_address: 20,
            max_failures_per_account: 10,
            failure_window_secs: 300,
        }
    }
}

/// Which bus implementation to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// The embedded durable log under `data_dir` (single process).
    Embedded,
    /// An Apache Kafka cluster.
    Kafka,
}

/// Settings of the bus.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusSettings {
    /// `embedded` (default) or `kafka`.
    pub backend: Backend,
    /// Prefix of every topic name (`<prefix>.messages`), so that several
    /// deployments can share one Kafka cluster.
    pub topic_prefix: String,
    /// Settings of the embedded log.
    pub embedded: EmbeddedSettings,
    /// Settings of the Kafka backend.
    pub kafka: KafkaSettings,
}

impl Default for BusSettings {
    fn default() -> Self {
        Self {
            backend: Backend::Embedded,
            topic_prefix: "switchboard".to_owned(),
            embedded: EmbeddedSettings::default(),
            kafka: KafkaSettings::default(),
        }
    }
}

/// Settings of the embedded log.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedSettings {
    /// File of the log, relative to `data_dir` unless absolute.
    pub file: PathBuf,
    /// `normal`: acknowledged events survive a crash of the process;
    /// `full`: they also survive power loss (one fsync per batch).
    pub synchronous: Synchronous,
    /// Seconds between compaction/retention runs.
    pub maintenance_interval_secs: u64,
    /// Most records kept in memory per partition for consumers that keep up
    /// (only those some consumer still has to read, and the newest 64).
    pub tail_records: usize,
}

impl Default for EmbeddedSettings {
    fn default() -> Self {
        Self {
            file: PathBuf::from("bus.sqlite"),
            synchronous: Synchronous::Normal,
            maintenance_interval_secs: 60,
            tail_records: 4096,
        }
    }
}

/// Settings of the Kafka backend.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Replication factor of the topics created at start.
    pub replication_factor: i32,
    /// Producer `linger.ms`: 0 for the lowest latency.
    pub linger_ms: u32,
    /// Consumer `session.timeout.ms`: how soon a dead member's partitions move.
    pub session_timeout_ms: u32,
    /// Producer `message.timeout.ms`: how long a produce retries before it fails.
    pub message_timeout_ms: u32,
}

impl Default for KafkaSettings {
    fn default() -> Self {
        let k = KafkaConfig::new("127.0.0.1:9092");
        Self {
            bootstrap_servers: k.bootstrap_servers,
            replication_factor: k.replication_factor,
            linger_ms: k.linger_ms,
            session_timeout_ms: k.session_timeout_ms,
            message_timeout_ms: k.message_timeout_ms,
        }
    }
}

/// Settings of the SQL database.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `postgres://user:password@host/db`; empty for SQLite in
    /// `data_dir/switchboard.db`.
    pub url: String,
}

/// Settings of the HTTP API.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Address of the HTTP API.
    pub listen: SocketAddr,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 5280)),
        }
    }
}

/// TLS certificate and key (PEM). Both empty: a self-signed certificate for
/// `domains` is generated under `data_dir/tls` at first start.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// Certificate chain (PEM).
    pub cert_path: Option<PathBuf>,
    /// Private key (PEM).
    pub key_path: Option<PathBuf>,
}

impl Config {
    /// Reads `path` (defaults when `None`) and applies environment overrides
    /// from `env` (usually `std::env::vars()`).
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (mut table, origin) = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                let table: toml::Table =
                    toml::from_str(&text).map_err(|e| ConfigError::Syntax {
                        path: path.to_owned(),
                        message: e.to_string(),
                    })?;
                (table, format!("file {}", path.display()))
            }
            None => (toml::Table::new(), "defaults".to_owned()),
        };
        let mut origins: BTreeMap<String, String> = BTreeMap::new();
        for (name, raw) in env {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let keys: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            if keys.iter().any(String::is_empty) {
                return Err(ConfigError::Field {
                    field: keys.join("."),
                    origin: format!("environment variable {name}"),
                    message: "empty path segment".to_owned(),
                });
            }
            set_path(&mut table, &keys, parse_env_value(&raw)).map_err(|message| {
                ConfigError::Field {
                    field: keys.join("."),
                    origin: format!("environment variable {name}"),
                    message,
                }
            })?;
            origins.insert(keys.join("."), format!("environment variable {name}"));
        }
        let origin_of = |field: &str| {
            origins
                .iter()
                .find(|(k, _)| field == k.as_str() || field.starts_with(&format!("{k}.")))
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| origin.clone())
        };
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let field = e.path().to_string();
                ConfigError::Field {
                    origin: origin_of(&field),
                    message: e.inner().to_string(),
                    field,
                }
            })?;
        config
            .validate()
            .map_err(|(field, message)| ConfigError::Field {
                origin: origin_of(field),
                field: field.to_owned(),
                message,
            })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 64
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !name_ok(&self.node_id) {
            return Err((
                "node_id",
                format!(
                    "{:?} must be 1-64 letters, digits, '-' or '_'",
                    self.node_id
                ),
            ));
        }
        if self.domains.is_empty() {
            return Err(("domains", "at least one domain is required".to_owned()));
        }
        for d in &self.domains {
            validate_domain(d).map_err(|m| ("domains", format!("{d:?}: {m}")))?;
        }
        let prefix_ok = !self.bus.topic_prefix.is_empty()
            && self.bus.topic_prefix.len() <= 100
            && self
                .bus
                .topic_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !prefix_ok {
            return Err((
                "bus.topic_prefix",
                format!(
                    "{:?} must be 1-100 letters, digits, '.', '-' or '_'",
                    self.bus.topic_prefix
                ),
            ));
        }
        if self.bus.backend == Backend::Kafka && self.bus.kafka.bootstrap_servers.trim().is_empty()
        {
            return Err((
                "bus.kafka.bootstrap_servers",
                "required when bus.backend is kafka".to_owned(),
            ));
        }
        if self.bus.kafka.replication_factor < 1 {
            return Err((
                "bus.kafka.replication_factor",
                "must be at least 1".to_owned(),
            ));
        }
        if self.bus.embedded.maintenance_interval_secs == 0 {
            return Err((
                "bus.embedded.maintenance_interval_secs",
                "must be at least 1".to_owned(),
            ));
        }
        if self.auth.scram_iterations < 4096 {
            return Err((
                "auth.scram_iterations",
                format!(
                    "{} is below the minimum of 4096",
                    self.auth.scram_iterations
                ),
            ));
        }
        if self.xmpp.max_stanza_bytes < 10_000 {
            return Err((
                "xmpp.max_stanza_bytes",
                "must be at least 10000 (RFC 6120 §13.12)".to_owned(),
            ));
        }
        if self.xmpp.max_sessions_per_user == 0 {
            return Err((
                "xmpp.max_sessions_per_user",
                "must be at least 1".to_owned(),
            ));
        }
        if self.sip.max_message_bytes < 1500 {
            return Err((
                "sip.max_message_bytes",
                "must be at least 1500 (RFC 3261 §18.1.1)".to_owned(),
            ));
        }
        if self.sip.max_headers == 0 || self.sip.max_header_line_bytes < 256 {
            return Err((
                "sip.max_headers",
                "max_headers must be at least 1 and max_header_line_bytes at least 256".to_owned(),
            ));
        }
        if self.sip.register_min_expires_secs > self.sip.register_max_expires_secs {
            return Err((
                "sip.register_min_expires_secs",
                "must not exceed register_max_expires_secs".to_owned(),
            ));
        }
        if self.bus.embedded.tail_records == 0 {
            return Err(("bus.embedded.tail_records", "must be at least 1".to_owned()));
        }
        if self.tls.cert_path.is_some() != self.tls.key_path.is_some() {
            return Err((
                "tls.cert_path",
                "cert_path and key_path are set together or not at all".to_owned(),
            ));
        }
        let url = &self.database.url;
        if !url.is_empty() && !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err((
                "database.url",
                "must be a postgres:// URL, or empty for the embedded SQLite database".to_owned(),
            ));
        }
        Ok(())
    }

    /// Resolves a path relative to `data_dir`.
    pub fn data_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.data_dir.join(path)
        }
    }

    /// Settings of the embedded log.
    pub fn embedded_bus(&self) -> EmbeddedConfig {
        let mut c = EmbeddedConfig::new(self.data_path(&self.bus.embedded.file));
        c.synchronous = self.bus.embedded.synchronous;
        c.maintenance_interval = Duration::from_secs(self.bus.embedded.maintenance_interval_secs);
        c.tail_records = self.bus.embedded.tail_records;
        c
    }

    /// Settings of the Kafka backend.
    pub fn kafka_bus(&self) -> KafkaConfig {
        let k = &self.bus.kafka;
        let mut c = KafkaConfig::new(k.bootstrap_servers.clone());
        c.replication_factor = k.replication_factor;
        c.linger_ms = k.linger_ms;
        c.session_timeout_ms = k.session_timeout_ms;
        c.message_timeout_ms = k.message_timeout_ms;
        c.client_id = format!("switchboard-{}", self.node_id);
        c
    }
}

/// Domain rules of SPEC.md §3: at most 255 characters, labels of letters,
/// digits and `-`, no label starting with `-`, the last label not starting
/// with a digit (so no IP addresses).
pub fn validate_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() || domain.len() > 255 {
        return Err("must be 1-255 characters".to_owned());
    }
    let labels: Vec<&str> = domain.split('.').collect();
    for label in &labels {
        if label.is_empty() || label.len() > 63 {
            return Err("labels must be 1-63 characters".to_owned());
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err("labels may hold only letters, digits and '-'".to_owned());
        }
        if label.starts_with('-') {
            return Err("a label may not start with '-'".to_owned());
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.starts_with(|c: char| c.is_ascii_digit()))
    {
        return Err("the last label may not start with a digit".to_owned());
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = keys.split_last().ok_or("empty name")?;
    let mut current = table;
    for key in parents {
        let entry = current
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{key}` is not a section"))?;
    }
    current.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(
            Some(&path),
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        )
    }

    #[test]
    fn example_file_is_the_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../switchboard.example.toml");
        let loaded = Config::load(Some(&path), std::iter::empty()).unwrap();
        assert_eq!(loaded, Config::default());
    }

    #[test]
    fn unknown_field_is_named() {
        let err = load_str("[bus]\nbakend = \"kafka\"\n", &[]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("bus.bakend"), "{msg}");
        assert!(msg.contains("unknown field"), "{msg}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = load_str("[bus.kafka]\nlinger_ms = \"soon\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("bus.kafka.linger_ms"), "{err}");
    }

    #[test]
    fn env_overrides_file() {
        let c = load_str(
            "[bus]\nbackend = \"embedded\"\n",
            &[
                ("SWITCHBOARD__BUS__BACKEND", "kafka"),
                ("SWITCHBOARD__BUS__KAFKA__LINGER_MS", "3"),
                (
                    "SWITCHBOARD__BUS__KAFKA__BOOTSTRAP_SERVERS",
                    "10.1.1.1:9092",
                ),
                ("UNRELATED", "x"),
            ],
        )
        .unwrap();
        assert_eq!(c.bus.backend, Backend::Kafka);
        assert_eq!(c.bus.kafka.linger_ms, 3);
        assert_eq!(c.bus.kafka.bootstrap_servers, "10.1.1.1:9092");
    }

    #[test]
    fn bad_env_override_names_variable() {
        let err = load_str("", &[("SWITCHBOARD__BUS__KAFKA__LINGER_MS", "-1")]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("bus.kafka.linger_ms"), "{msg}");
        assert!(msg.contains("SWITCHBOARD__BUS__KAFKA__LINGER_MS"), "{msg}");
    }

    #[test]
    fn invalid_values_are_refused() {
        for (text, field) in [
            ("node_id = \"a b\"\n", "node_id"),
            ("domains = [\"joe.10\"]\n", "domains"),
            ("domains = []\n", "domains"),
            ("[bus]\ntopic_prefix = \"a/b\"\n", "bus.topic_prefix"),
            ("[database]\nurl = \"mysql://x\"\n", "database.url"),
            ("[tls]\ncert_path = \"/x.pem\"\n", "tls.cert_path"),
            ("[http]\nlisten = \"nowhere\"\n", "http.listen"),
        ] {
            let err = load_str(text, &[]).unwrap_err();
            assert!(err.to_string().contains(field), "{text}: {err}");
        }
    }

    #[test]
    fn domain_rules_follow_the_spec() {
        assert!(validate_domain("cisco.com").is_ok());
        assert!(validate_domain("5joe.cisco.com").is_ok());
        assert!(validate_domain("10.10.10.1").is_err());
        assert!(validate_domain("5.cisco.5com").is_err());
        assert!(validate_domain("-a.com").is_err());
        assert!(validate_domain(&"a".repeat(256)).is_err());
    }
}
