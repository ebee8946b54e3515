//! RFC 6665 (SIP events) with the RFC 3856 presence package: dialog-bound
//! subscriptions, their expiry, and the notification rate limit of RFC 3856
//! §6.10 (at most one NOTIFY per presentity per 5 s to a watcher; changes in
//! between are coalesced into one NOTIFY carrying the newest state).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::Flow;

/// One subscription: the notifier's side of its dialog (RFC 6665 §4.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Dialog id: Call-ID, the watcher's tag, our tag.
    pub key: String,
    /// The event package (`presence`, `presence.winfo`).
    pub event: String,
    /// The watcher, `user@domain`.
    pub watcher: String,
    /// The presentity watched, `user@domain`.
    pub presentity: String,
    /// The watcher's Contact (the remote target, RFC 3261 §12.1.1).
    pub remote_target: String,
    /// The dialog's Call-ID.
    pub call_id: String,
    /// The watcher's From value (our To in NOTIFYs).
    pub remote: String,
    /// Our To value with our tag (our From in NOTIFYs).
    pub local: String,
    /// Our next CSeq in this dialog.
    pub local_cseq: u32,
    /// Where NOTIFYs go.
    pub flow: Flow,
    /// When it lapses.
    pub expires_at: Instant,
    /// When the last NOTIFY went out.
    pub last_notify: Option<Instant>,
    /// A state change is waiting for the rate limit.
    pub pending: bool,
}

/// The subscriptions of this node.
#[derive(Debug, Default)]
pub struct Subscriptions {
    by_key: HashMap<String, Subscription>,
    /// `presence` subscriptions by presentity.
    by_presentity: BTreeMap<String, BTreeSet<String>>,
    /// `presence.winfo` subscriptions by presentity: kept apart so a new
    /// watcher costs a look at the (few) winfo subscriptions, not at every
    /// watcher.
    winfo_by_presentity: BTreeMap<String, BTreeSet<String>>,
}

/// The presence event package (RFC 3856).
pub const PRESENCE: &str = "presence";
/// The watcher information template package for presence (RFC 3857).
pub const WINFO: &str = "presence.winfo";

/// A watcher information document (RFC 3858 §4) listing `watchers` of
/// `resource` (a `sip:` URI), all active: subscriptions are auto-authorized
/// (SPEC.md §5). `version` counts the documents sent in the subscription.
pub fn watcherinfo(resource: &str, version: u32, watchers: &[&Subscription]) -> String {
    use super::pidf::escape;
    let mut out = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<watcherinfo xmlns=\"urn:ietf:params:xml:ns:watcherinfo\" version=\"{version}\" state=\"full\">\n<watcher-list resource=\"{}\" package=\"presence\">\n",
        escape(resource)
    );
    for w in watchers {
        let id: String = w
            .key
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
            .to_string();
        out.push_str(&format!(
            "<watcher id=\"w{id}\" event=\"subscribe\" status=\"active\">sip:{}</watcher>\n",
            escape(&w.watcher)
        ));
    }
    out.push_str("</watcher-list>\n</watcherinfo>\n");
    out
}

/// A dialog id (RFC 3261 §12: Call-ID, remote tag, local tag).
pub fn dialog_key(call_id: &str, remote_tag: &str, local_tag: &str) -> String {
    format!("{call_id}\n{remote_tag}\n{local_tag}")
}

impl Subscriptions {
    /// Adds a new subscription; a new watcher is news for the presentity's
    /// `presence.winfo` subscriptions.
    pub fn insert(&mut self, s: Subscription) {
        self.index_mut(&s.event)
            .entry(s.presentity.clone())
            .or_default()
            .insert(s.key.clone());
        let watcher_of = (s.event == PRESENCE).then(|| s.presentity.clone());
        self.by_key.insert(s.key.clone(), s);
        if let Some(p) = watcher_of {
            self.watchers_changed(&p);
        }
    }

    /// The subscription of a dialog.
    pub fn get(&self, key: &str) -> Option<&Subscription> {
        self.by_key.get(key)
    }

    /// The subscription of a dialog, to change.
    pub fn get_mut(&mut self, key: &str) -> Option<&mut Subscription> {
        self.by_key.get_mut(key)
    }

    /// Ends a subscription.
    pub fn remove(&mut self, key: &str) -> Option<Subscription> {
        let s = self.by_key.remove(key)?;
        let index = self.index_mut(&s.event);
        if let Some(keys) = index.get_mut(&s.presentity) {
            keys.remove(key);
            if keys.is_empty() {
                index.remove(&s.presentity);
            }
        }
        if s.event == PRESENCE {
            self.watchers_changed(&s.presentity);
        }
        Some(s)
    }

    /// The presentity's state changed: every watcher gets a NOTIFY, now or
    /// when its rate limit allows.
    pub fn changed(&mut self, presentity: &str) {
        self.mark(presentity, PRESENCE);
    }

    /// The presentity's watchers changed: its `presence.winfo`
    /// subscriptions (RFC 3857) get a NOTIFY.
    pub fn watchers_changed(&mut self, presentity: &str) {
        self.mark(presentity, WINFO);
    }

    fn index_mut(&mut self, event: &str) -> &mut BTreeMap<String, BTreeSet<String>> {
        if event == WINFO {
            &mut self.winfo_by_presentity
        } else {
            &mut self.by_presentity
        }
    }

    fn mark(&mut self, presentity: &str, event: &str) {
        let index = if event == WINFO {
            &self.winfo_by_presentity
        } else {
            &self.by_presentity
        };
        if let Some(keys) = index.get(presentity) {
            for k in keys {
                if let Some(s) = self.by_key.get_mut(k) {
                    s.pending = true;
                }
            }
        }
    }

    /// Subscriptions with a change whose rate limit (`min_interval` since
    /// their last NOTIFY) allows one now (RFC 3856 §6.10).
    pub fn due(&self, now: Instant, min_interval: Duration) -> Vec<String> {
        self.by_key
            .values()
            .filter(|s| s.pending && s.expires_at > now)
            .filter(|s| s.last_notify.is_none_or(|t| now >= t + min_interval))
            .map(|s| s.key.clone())
            .collect()
    }

    /// A NOTIFY is going out now: returns its CSeq and clears the pending mark.
    pub fn notified(&mut self, key: &str, now: Instant) -> Option<u32> {
        let s = self.by_key.get_mut(key)?;
        s.pending = false;
        s.last_notify = Some(now);
        s.local_cseq += 1;
        Some(s.local_cseq)
    }

    /// Removes and returns subscriptions that lapsed by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Subscription> {
        let lapsed: Vec<String> = self
            .by_key
            .values()
            .filter(|s| s.expires_at <= now)
            .map(|s| s.key.clone())
            .collect();
        lapsed.iter().filter_map(|k| self.remove(k)).collect()
    }

    /// The `presence` subscriptions to a presentity (its watchers, for
    /// `presence.winfo`).
    pub fn watchers_of(&self, presentity: &str) -> Vec<&Subscription> {
        self.by_presentity
            .get(presentity)
            .into_iter()
            .flatten()
            .filter_map(|k| self.by_key.get(k))
            .collect()
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Transport;

    fn sub(key: &str, presentity: &str, now: Instant) -> Subscription {
        Subscription {
            key: key.into(),
            event: "presence".into(),
            watcher: "w@example.com".into(),
            presentity: presentity.into(),
            remote_target: "sip:w@10.0.0.1".into(),
            call_id: key.into(),
            remote: "<sip:w@example.com>;tag=a".into(),
            local: "<sip:p@example.com>;tag=b".into(),
            local_cseq: 0,
            flow: Flow {
                transport: Transport::Udp,
                peer: "10.0.0.1:5060".parse().unwrap(),
                conn: 0,
            },
            expires_at: now + Duration::from_secs(3600),
            last_notify: None,
            pending: false,
        }
    }

    #[test]
    fn notifications_are_rate_limited_and_coalesced() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        let five = Duration::from_secs(5);
        s.insert(sub("k1", "bob@example.com", t0));
        // The initial NOTIFY.
        assert_eq!(s.notified("k1", t0), Some(1));
        // Three changes within 5 s: nothing due until 5 s passed, then one.
        s.changed("bob@example.com");
        s.changed("bob@example.com");
        assert!(s.due(t0 + Duration::from_secs(1), five).is_empty());
        s.changed("bob@example.com");
        assert!(s.due(t0 + Duration::from_millis(4999), five).is_empty());
        assert_eq!(s.due(t0 + five, five), vec!["k1".to_owned()]);
        assert_eq!(s.notified("k1", t0 + five), Some(2));
        assert!(
            s.due(t0 + five * 3, five).is_empty(),
            "nothing changed since"
        );
        // Another presentity's change does not concern this watcher.
        s.changed("carol@example.com");
        assert!(s.due(t0 + five * 3, five).is_empty());
    }

    #[test]
    fn subscriptions_expire_and_unindex() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        s.insert(sub("k1", "bob@example.com", t0));
        let mut short = sub("k2", "bob@example.com", t0);
        short.expires_at = t0 + Duration::from_secs(10);
        s.insert(short);
        assert_eq!(s.watchers_of("bob@example.com").len(), 2);
        let lapsed = s.expire(t0 + Duration::from_secs(10));
        assert_eq!(lapsed.len(), 1);
        assert_eq!(lapsed[0].key, "k2");
        assert_eq!(s.watchers_of("bob@example.com").len(), 1);
        assert!(s.remove("k1").is_some());
        assert!(s.is_empty());
        assert!(s.watchers_of("bob@example.com").is_empty());
        assert_eq!(dialog_key("c", "a", "b"), "c\na\nb");
    }

    #[test]
    fn watcher_info_lists_presence_watchers_only() {
        let mut s = Subscriptions::default();
        let t0 = Instant::now();
        s.insert(sub("k1", "bob@example.com", t0));
        let mut winfo = sub("k2", "bob@example.com", t0);
        winfo.event = WINFO.into();
        winfo.watcher = "bob@example.com".into();
        s.insert(winfo);
        let watchers = s.watchers_of("bob@example.com");
        assert_eq!(watchers.len(), 1);
        let doc = watcherinfo("sip:bob@example.com", 3, &watchers);
        assert!(doc.contains("version=\"3\""));
        assert!(doc.contains("status=\"active\">sip:w@example.com</watcher>"));
        // A presence change concerns presence subscriptions, a watcher change
        // winfo subscriptions.
        s.changed("bob@example.com");
        assert_eq!(s.due(t0, Duration::from_secs(5)), vec!["k1".to_owned()]);
        s.notified("k1", t0);
        s.watchers_changed("bob@example.com");
        assert_eq!(s.due(t0, Duration::from_secs(5)), vec!["k2".to_owned()]);
    }
}
