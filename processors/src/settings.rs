//! Live settings (SPEC.md §6, §7, §11 "configuration changes take effect
//! live"): every run-time tunable of presence and messaging, typed, with the
//! defaults of SPEC.md, folded from `setting.changed` events on the
//! compacted `settings` topic (keyed by the setting key, so the latest
//! record per key is its value).
//!
//! A process holds one [`LiveSettings`] behind a [`tokio::sync::watch`]
//! channel ([`SettingsHandle`]); [`follow`] keeps it current from the bus,
//! so a `switchboard config set` reaches every component without a
//! restart. Components read `handle.borrow()` when they decide, or wait on
//! `handle.changed()`.
//!
//! Values are checked twice: by the writer ([`LiveSettings::set`], the CLI
//! and admin API refuse bad input with the accepted values), and by the
//! fold, which keeps the previous value and logs a warning for a record it
//! cannot accept (a record from a newer version, or written by hand).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use switchboard_infra::bus::{Bus, BusError, Consumer, ConsumerConfig, Polled, Record};
use switchboard_schemas::events::SettingChanged;
use switchboard_schemas::topics::{Topic, full_name};
use switchboard_schemas::{Envelope, Event, NodeId};
use tokio::sync::watch;

use crate::policy::PolicyLimits;

/// The values a setting accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `true` or `false`.
    Bool,
    /// An integer in `min..=max`.
    Int {
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
}

impl Kind {
    /// The accepted values, for error messages.
    pub fn accepted(&self) -> String {
        match self {
            Kind::Bool => "true or false".to_owned(),
            Kind::Int { min, max } => format!("an integer from {min} to {max}"),
        }
    }
}

/// One setting's description.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettingSpec {
    /// The key, e.g. `im.offline.max_per_user`.
    pub key: &'static str,
    /// Accepted values.
    pub kind: Kind,
    /// What it does.
    pub doc: &'static str,
}

/// A setting could not be read or changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingError {
    /// No setting has this key.
    #[error("unknown setting {key}; known settings: {known}")]
    Unknown {
        /// The key asked for.
        key: String,
        /// Every key, comma-separated.
        known: String,
    },
    /// The value is not one the setting accepts.
    #[error("invalid value {value} for {key}: expected {accepted}")]
    Invalid {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// The accepted values.
        accepted: String,
    },
}

const U32: u64 = u32::MAX as u64;
const DAY_SECS: u64 = 86_400;

macro_rules! live_settings {
    ($(
        $(#[doc = $doc:literal])+
        $field:ident : $ty:ident = $default:expr, $key:literal, $kind:expr;
    )+) => {
        /// Every live setting, typed. `Default` holds the SPEC.md defaults.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct LiveSettings {
            $( $(#[doc = $doc])+ pub $field: $ty, )+
        }

        impl Default for LiveSettings {
            fn default() -> Self {
                Self { $( $field: $default, )+ }
            }
        }

        /// Every setting, in key order of declaration.
        pub const SPECS: &[SettingSpec] = &[
            $( SettingSpec { key: $key, kind: $kind, doc: concat!($($doc),+) }, )+
        ];

        impl LiveSettings {
            /// The current value of `key`.
            pub fn get(&self, key: &str) -> Result<Value, SettingError> {
                match key {
                    $( $key => Ok(Value::from(self.$field)), )+
                    _ => Err(unknown(key)),
                }
            }

            /// Sets `key` to `value` after checking it; on error nothing
            /// changes.
            pub fn set(&mut self, key: &str, value: &Value) -> Result<(), SettingError> {
                let spec = spec(key)?;
                check(spec, value)?;
                match key {
                    $( $key => self.$field = convert!($ty, value), )+
                    _ => return Err(unknown(key)),
                }
                Ok(())
            }
        }
    };
}

macro_rules! convert {
    (bool, $v:expr) => {
        $v.as_bool().unwrap_or_default()
    };
    (u32, $v:expr) => {
        $v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or_default()
    };
    (u64, $v:expr) => {
        $v.as_u64().unwrap_or_default()
    };
}

live_settings! {
    /// Availability sharing for the deployment; off: users see only
    /// themselves (SPEC.md §6).
    availability_sharing: bool = true, "presence.availability_sharing", Kind::Bool;
    /// Approve presence subscriptions without asking the user.
    auto_authorize: bool = true, "presence.auto_authorize", Kind::Bool;
    /// Most contacts per user; 0 = no limit.
    max_contacts: u32 = 200, "presence.max_contacts", Kind::Int { min: 0, max: U32 };
    /// Most watchers per user; 0 = no limit.
    max_watchers: u32 = 200, "presence.max_watchers", Kind::Int { min: 0, max: U32 };
    /// Whether users may watch someone not on their roster.
    ad_hoc_enabled: bool = true, "presence.ad_hoc.enabled", Kind::Bool;
    /// Most active ad-hoc subscriptions per user; 0 = no limit.
    ad_hoc_max_per_user: u32 = 50, "presence.ad_hoc.max_per_user", Kind::Int { min: 0, max: U32 };
    /// Lifetime of an ad-hoc subscription in seconds; 0 = until cancelled.
    ad_hoc_ttl_secs: u64 = 3600, "presence.ad_hoc.ttl_secs", Kind::Int { min: 0, max: 365 * DAY_SECS };
    /// Shortest interval between two composed presence changes of one
    /// user, in milliseconds; 0 = no throttle.
    presence_throttle_ms: u64 = 1000, "presence.throttle_ms", Kind::Int { min: 0, max: 3_600_000 };
    /// Instant messaging for the deployment (SPEC.md §7).
    im_enabled: bool = true, "im.enabled", Kind::Bool;
    /// Whether messages to users without a session are stored.
    offline_enabled: bool = true, "im.offline.enabled", Kind::Bool;
    /// Most stored messages per user.
    offline_max_per_user: u32 = 100, "im.offline.max_per_user", Kind::Int { min: 0, max: U32 };
    /// Most stored messages per node.
    offline_max_per_node: u32 = 30_000, "im.offline.max_per_node", Kind::Int { min: 0, max: U32 };
    /// Multiple device messaging: carbons, synced read state, active client.
    multi_device_enabled: bool = true, "im.multi_device.enabled", Kind::Bool;
    /// How long a conversation stays with the client that replied, in
    /// seconds of silence.
    forking_stickiness_secs: u64 = 600, "im.forking.stickiness_secs", Kind::Int { min: 0, max: DAY_SECS };
    /// The window in which a client that sent available presence or a
    /// message counts as the active client, in seconds.
    active_client_window_secs: u64 = 300, "im.active_client.window_secs", Kind::Int { min: 0, max: DAY_SECS };
    /// Most stanzas buffered for a client in quiet mode (XEP-0352) before
    /// the buffer is flushed.
    quiet_mode_buffer_limit: u32 = 100, "im.quiet_mode.buffer_limit", Kind::Int { min: 1, max: 100_000 };
    /// Most recipients (`to`, `cc`, `bcc` addresses) of one broadcast
    /// message (XEP-0033 §8: more than 20 and less than 100 recommended).
    broadcast_max_addresses: u32 = 50, "im.broadcast.max_addresses", Kind::Int { min: 1, max: 1_000 };
}

fn unknown(key: &str) -> SettingError {
    SettingError::Unknown {
        key: key.to_owned(),
        known: SPECS.iter().map(|s| s.key).collect::<Vec<_>>().join(", "),
    }
}

/// The description of `key`.
pub fn spec(key: &str) -> Result<&'static SettingSpec, SettingError> {
    SPECS
        .iter()
        .find(|s| s.key == key)
        .ok_or_else(|| unknown(key))
}

fn check(spec: &SettingSpec, value: &Value) -> Result<(), SettingError> {
    let ok = match spec.kind {
        Kind::Bool => value.is_boolean(),
        Kind::Int { min, max } => value.as_u64().is_some_and(|n| (min..=max).contains(&n)),
    };
    if ok {
        Ok(())
    } else {
        Err(SettingError::Invalid {
            key: spec.key.to_owned(),
            value: value.to_string(),
            accepted: spec.kind.accepted(),
        })
    }
}

/// Parses a value typed on the command line (`true`/`false`, `on`/`off`,
/// or an integer) for `key`, checking it.
pub fn parse_value(key: &str, text: &str) -> Result<Value, SettingError> {
    let spec = spec(key)?;
    let trimmed = text.trim();
    let value = match spec.kind {
        Kind::Bool => match trimmed.to_ascii_lowercase().as_str() {
            "true" | "on" | "yes" => Value::Bool(true),
            "false" | "off" | "no" => Value::Bool(false),
            _ => Value::String(text.to_owned()),
        },
        Kind::Int { .. } => trimmed
            .parse::<u64>()
            .map_or_else(|_| Value::String(text.to_owned()), Value::from),
    };
    check(spec, &value)?;
    Ok(value)
}

impl LiveSettings {
    /// Every setting with its current value, in declaration order.
    pub fn list(&self) -> BTreeMap<&'static str, Value> {
        SPECS
            .iter()
            .filter_map(|s| self.get(s.key).ok().map(|v| (s.key, v)))
            .collect()
    }

    /// Folds one record of the `settings` topic. A tombstone (no value)
    /// resets the key to its default; a record that does not check is
    /// skipped with a warning and the previous value stays.
    pub fn apply_record(&mut self, key: &[u8], value: Option<&[u8]>) {
        let key = String::from_utf8_lossy(key);
        let Some(value) = value else {
            if let Ok(default) = LiveSettings::default().get(&key) {
                let _ = self.set(&key, &default);
            }
            return;
        };
        match Envelope::from_json_slice(value) {
            Ok(envelope) => self.apply(&envelope),
            Err(e) => tracing::warn!(%key, error = %e, "undecodable setting record skipped"),
        }
    }

    /// Folds one `setting.changed` event; other events change nothing.
    pub fn apply(&mut self, envelope: &Envelope) {
        if let Event::SettingChanged(change) = &envelope.event
            && let Err(e) = self.set(&change.key, &change.value)
        {
            tracing::warn!(error = %e, "setting record not applied");
        }
    }

    /// The authorization limits (`crate::policy`).
    pub fn policy(&self) -> PolicyLimits {
        PolicyLimits {
            availability_sharing: self.availability_sharing,
            auto_authorize: self.auto_authorize,
            max_contacts: self.max_contacts,
            max_watchers: self.max_watchers,
            ad_hoc_enabled: self.ad_hoc_enabled,
            ad_hoc_max_per_user: self.ad_hoc_max_per_user,
            ad_hoc_ttl_secs: self.ad_hoc_ttl_secs,
        }
    }

    /// The presence change throttle interval.
    pub fn presence_throttle(&self) -> Duration {
        Duration::from_millis(self.presence_throttle_ms)
    }

    /// The `setting.changed` event that sets `key` to `value` (checked),
    /// with the current value as `previous` when it differs from the
    /// default.
    pub fn change(
        &self,
        key: &str,
        value: Value,
        changed_by: &str,
    ) -> Result<SettingChanged, SettingError> {
        let mut next = self.clone();
        next.set(key, &value)?;
        let current = self.get(key)?;
        let default = LiveSettings::default().get(key)?;
        Ok(SettingChanged {
            key: key.to_owned(),
            value,
            previous: (current != default).then_some(current),
            changed_by: changed_by.to_owned(),
        })
    }
}

/// A process's live settings, kept current by [`follow`].
pub type SettingsHandle = watch::Receiver<LiveSettings>;

/// A handle that never changes (tests, tools).
pub fn fixed(settings: LiveSettings) -> SettingsHandle {
    watch::channel(settings).1
}

/// The authorization limits of `settings`, kept current by a task that
/// ends when `settings`' sender goes away.
pub fn policy_limits(mut settings: SettingsHandle) -> watch::Receiver<PolicyLimits> {
    let (tx, rx) = watch::channel(settings.borrow_and_update().policy());
    tokio::spawn(async move {
        while settings.changed().await.is_ok() {
            let limits = settings.borrow_and_update().policy();
            tx.send_if_modified(|current| {
                let changed = *current != limits;
                if changed {
                    *current = limits;
                }
                changed
            });
        }
    });
    rx
}

fn fold_records(settings: &mut LiveSettings, records: &[Record]) {
    for r in records {
        settings.apply_record(&r.key, r.value.as_deref());
    }
}

/// Reads `consumer` (subscribed to the settings topic, from the start) up
/// to the ends the topic has now, folding into `settings`.
async fn catch_up(
    bus: &dyn Bus,
    topic: &str,
    consumer: &mut dyn Consumer,
    settings: &mut LiveSettings,
    limit: Duration,
) -> Result<(), BusError> {
    let ends = bus.end_offsets(topic).await?;
    let mut positions = vec![0i64; ends.len()];
    let deadline = tokio::time::Instant::now() + limit;
    while positions.iter().zip(&ends).any(|(p, e)| p < e) {
        if tokio::time::Instant::now() >= deadline {
            return Err(BusError::Timeout("reading the settings topic"));
        }
        if let Polled::Records(records) = consumer.poll(Duration::from_millis(200)).await? {
            for r in &records {
                if let Some(p) = positions.get_mut(r.partition as usize) {
                    *p = (*p).max(r.offset + 1);
                }
            }
            fold_records(settings, &records);
        }
    }
    Ok(())
}

/// Reads the `settings` topic to its end and returns the settings then in
/// force. `limit` bounds the time it may take.
pub async fn load(bus: &dyn Bus, prefix: &str, limit: Duration) -> Result<LiveSettings, BusError> {
    let topic = full_name(prefix, Topic::Settings);
    let mut settings = LiveSettings::default();
    if bus.end_offsets(&topic).await?.iter().all(|e| *e == 0) {
        return Ok(settings);
    }
    let mut consumer = bus
        .consumer(ConsumerConfig::new(
            format!(
                "switchboard-settings-load-{}",
                uuid::Uuid::now_v7().simple()
            ),
            &[&topic],
        ))
        .await?;
    let result = catch_up(bus, &topic, &mut *consumer, &mut settings, limit).await;
    let _ = consumer.close().await;
    result.map(|()| settings)
}

/// Reads the settings to the end of the topic, then follows it in a task
/// until `shutdown` turns true, publishing every change on the returned
/// handle. `limit` bounds the initial read.
pub async fn follow(
    bus: Arc<dyn Bus>,
    prefix: &str,
    limit: Duration,
    shutdown: watch::Receiver<bool>,
) -> Result<SettingsHandle, BusError> {
    follow_from(bus, prefix, LiveSettings::default(), limit, shutdown).await
}

/// [`follow`], with the settings the topic's records are folded onto:
/// values from the configuration file, which a `setting.changed` replaces.
pub async fn follow_from(
    bus: Arc<dyn Bus>,
    prefix: &str,
    initial: LiveSettings,
    limit: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<SettingsHandle, BusError> {
    let topic = full_name(prefix, Topic::Settings);
    let mut consumer = bus
        .consumer(ConsumerConfig::new(
            format!("switchboard-settings-{}", uuid::Uuid::now_v7().simple()),
            &[&topic],
        ))
        .await?;
    let mut settings = initial;
    catch_up(&*bus, &topic, &mut *consumer, &mut settings, limit).await?;
    let (tx, rx) = watch::channel(settings.clone());
    tokio::spawn(async move {
        loop {
            tokio::select! {
                polled = consumer.poll(Duration::from_millis(500)) => match polled {
                    Ok(Polled::Records(records)) => {
                        fold_records(&mut settings, &records);
                        tx.send_if_modified(|current| {
                            if *current == settings {
                                false
                            } else {
                                current.clone_from(&settings);
                                true
                            }
                        });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "settings follower poll failed");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                },
                _ = shutdown.changed() => break,
            }
        }
        let _ = consumer.close().await;
    });
    Ok(rx)
}

/// Writes a checked change of `key` to the `settings` topic and returns the
/// event written. `current` is the settings in force (for `previous`).
pub async fn publish(
    bus: &dyn Bus,
    prefix: &str,
    node: NodeId,
    current: &LiveSettings,
    key: &str,
    value: Value,
    changed_by: &str,
) -> Result<SettingChanged, PublishError> {
    let change = current.change(key, value, changed_by)?;
    let envelope = Envelope::new(node, key, change.clone());
    let bytes = envelope
        .to_json_vec()
        .map_err(|e| PublishError::Encode(e.to_string()))?;
    bus.produce(
        &full_name(prefix, Topic::Settings),
        key.as_bytes(),
        Some(&bytes),
    )
    .await?;
    Ok(change)
}

/// A setting change could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The key or value was refused.
    #[error(transparent)]
    Setting(#[from] SettingError),
    /// The event could not be encoded.
    #[error("cannot encode the setting event: {0}")]
    Encode(String),
    /// The bus did not store it.
    #[error("cannot store the setting: {0}")]
    Bus(#[from] BusError),
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn changed(key: &str, value: Value) -> Envelope {
        Envelope::new(
            NodeId::new("n1"),
            key,
            SettingChanged {
                key: key.to_owned(),
                value,
                previous: None,
                changed_by: "test".to_owned(),
            },
        )
    }

    #[test]
    fn defaults_are_the_spec_defaults() {
        let s = LiveSettings::default();
        assert!(s.availability_sharing && s.auto_authorize && s.im_enabled);
        assert!(s.offline_enabled && s.multi_device_enabled && s.ad_hoc_enabled);
        assert_eq!((s.max_contacts, s.max_watchers), (200, 200));
        assert_eq!(
            (s.offline_max_per_user, s.offline_max_per_node),
            (100, 30_000)
        );
        assert_eq!(s.forking_stickiness_secs, 600);
        assert_eq!(s.active_client_window_secs, 300);
        assert_eq!(s.policy(), PolicyLimits::default());
        assert_eq!(s.list().len(), SPECS.len());
        for spec in SPECS {
            assert!(!spec.doc.is_empty(), "{}", spec.key);
            assert_eq!(s.list()[spec.key], s.get(spec.key).unwrap());
        }
    }

    #[test]
    fn fold_applies_the_latest_value_per_key() {
        let mut s = LiveSettings::default();
        s.apply(&changed("im.offline.max_per_user", json!(250)));
        s.apply(&changed("presence.auto_authorize", json!(false)));
        s.apply(&changed("im.offline.max_per_user", json!(10)));
        assert_eq!(s.offline_max_per_user, 10);
        assert!(!s.auto_authorize);
        assert!(!s.policy().auto_authorize);
        assert_eq!(s.get("im.offline.max_per_user"), Ok(json!(10)));
    }

    #[test]
    fn fold_skips_records_it_cannot_accept() {
        let mut s = LiveSettings::default();
        s.apply(&changed("im.offline.max_per_user", json!(250)));
        s.apply(&changed("im.offline.max_per_user", json!("lots")));
        s.apply(&changed("im.offline.max_per_user", json!(-1)));
        s.apply(&changed("im.offline.max_per_user", json!(1u64 << 40)));
        s.apply(&changed("from.a.newer.version", json!(1)));
        assert_eq!(s.offline_max_per_user, 250);
        let expected = LiveSettings {
            offline_max_per_user: 250,
            ..LiveSettings::default()
        };
        assert_eq!(s, expected);
    }

    #[test]
    fn tombstone_resets_to_the_default() {
        let mut s = LiveSettings::default();
        let record = changed("presence.max_watchers", json!(7))
            .to_json_vec()
            .unwrap();
        s.apply_record(b"presence.max_watchers", Some(&record));
        assert_eq!(s.max_watchers, 7);
        s.apply_record(b"presence.max_watchers", Some(b"not json"));
        assert_eq!(s.max_watchers, 7);
        s.apply_record(b"presence.max_watchers", None);
        assert_eq!(s.max_watchers, 200);
    }

    #[test]
    fn values_are_checked_at_the_boundaries() {
        let mut s = LiveSettings::default();
        assert!(s.set("im.quiet_mode.buffer_limit", &json!(1)).is_ok());
        assert!(s.set("im.quiet_mode.buffer_limit", &json!(100_000)).is_ok());
        let err = s.set("im.quiet_mode.buffer_limit", &json!(0)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value 0 for im.quiet_mode.buffer_limit: expected an integer from 1 to 100000"
        );
        assert!(
            s.set("im.quiet_mode.buffer_limit", &json!(100_001))
                .is_err()
        );
        assert_eq!(s.quiet_mode_buffer_limit, 100_000);
        assert!(s.set("presence.max_contacts", &json!(u32::MAX)).is_ok());
        assert!(
            s.set("presence.max_contacts", &json!(u64::from(u32::MAX) + 1))
                .is_err()
        );
        assert!(s.set("im.enabled", &json!(1)).is_err());
        assert!(s.set("im.enabled", &json!(false)).is_ok());
        assert!(!s.im_enabled);
    }

    #[test]
    fn command_line_values_parse_with_clear_errors() {
        assert_eq!(parse_value("im.enabled", "off"), Ok(json!(false)));
        assert_eq!(parse_value("im.enabled", "TRUE"), Ok(json!(true)));
        assert_eq!(parse_value("presence.max_contacts", " 0 "), Ok(json!(0)));
        let err = parse_value("presence.max_contacts", "many").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid value \"many\" for presence.max_contacts: expected an integer from 0 to 4294967295"
        );
        let err = parse_value("im.enabled", "maybe").unwrap_err();
        assert!(err.to_string().ends_with("expected true or false"), "{err}");
        let err = parse_value("im.nope", "1").unwrap_err();
        assert!(
            err.to_string().starts_with(
                "unknown setting im.nope; known settings: presence.availability_sharing, "
            ),
            "{err}"
        );
    }

    #[test]
    fn change_carries_the_previous_non_default_value() {
        let mut s = LiveSettings::default();
        let c = s.change("presence.max_contacts", json!(300), "me").unwrap();
        assert_eq!((c.value, c.previous), (json!(300), None));
        s.apply(&changed("presence.max_contacts", json!(300)));
        let c = s.change("presence.max_contacts", json!(5), "me").unwrap();
        assert_eq!(c.previous, Some(json!(300)));
        assert!(s.change("presence.max_contacts", json!(-5), "me").is_err());
    }
}
