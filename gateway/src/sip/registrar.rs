//! RFC 3261 §10: the registrar's bindings (address-of-record → contact with
//! expiry), with RFC 5626 §4.1 `+sip.instance` naming the device when the
//! client gives one. A binding is a device session: its resource (the
//! device part of its address) comes from the instance or the contact, so a
//! refresh keeps its session.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::Flow;
use super::pidf::DeviceState;

/// One registered contact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// The address-of-record, `user@domain`.
    pub aor: String,
    /// The resource naming this device (`sip-` and 12 hex digits).
    pub resource: String,
    /// The contact URI.
    pub contact: String,
    /// The device session.
    pub session_id: Uuid,
    /// When the binding lapses.
    pub expires_at: Instant,
    /// Where requests to the device go (the flow the REGISTER came on).
    pub flow: Flow,
    /// Call-ID of the REGISTERs (RFC 3261 §10.3 step 7).
    pub call_id: String,
    /// Highest CSeq seen for that Call-ID.
    pub cseq: u32,
    /// The client's User-Agent.
    pub user_agent: Option<String>,
    /// When the log last recorded the binding (`session.resource_bound`):
    /// a restart rebuilds it from there (see [`super::restore`]).
    pub logged_at: Instant,
    /// The device state its publications last gave (None: registered only).
    pub device_state: Option<DeviceState>,
}

impl Binding {
    /// The full address of the device session, `user@domain/resource`.
    pub fn full_jid(&self) -> String {
        format!("{}/{}", self.aor, self.resource)
    }
}

/// The resource of a contact: from `+sip.instance` when given (RFC 5626
/// §4.1), else from the contact URI.
pub fn resource_for(contact: &str, instance: Option<&str>) -> String {
    let digest = Sha256::digest(instance.unwrap_or(contact).as_bytes());
    let mut s = String::from("sip-");
    for b in &digest[..6] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// What an update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A new binding (a new device session).
    Added(Binding),
    /// An existing binding got a new expiry or contact.
    Refreshed(Binding),
    /// A binding was removed (Expires 0, or `*`).
    Removed(Binding),
}

/// Why an update was refused (RFC 3261 §10.3 step 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// Same Call-ID with a CSeq not above the stored one: out of order.
    OutOfOrder,
}

/// All bindings of this node.
#[derive(Debug, Default)]
pub struct Registrar {
    bindings: BTreeMap<(String, String), Binding>,
    by_session: HashMap<Uuid, (String, String)>,
}

/// A contact to bind.
#[derive(Debug, Clone)]
pub struct ContactUpdate<'a> {
    /// The contact URI.
    pub contact: &'a str,
    /// `+sip.instance`, if any.
    pub instance: Option<&'a str>,
    /// Granted seconds; 0 removes.
    pub expires_secs: u32,
}

impl Registrar {
    /// Adds, refreshes or removes one contact of `aor` (RFC 3261 §10.3
    /// steps 7-8).
    #[allow(clippy::too_many_arguments)]
    pub fn update(
        &mut self,
        aor: &str,
        update: &ContactUpdate<'_>,
        flow: &Flow,
        call_id: &str,
        cseq: u32,
        user_agent: Option<&str>,
        now: Instant,
    ) -> Result<Option<Change>, Refused> {
        let resource = resource_for(update.contact, update.instance);
        let key = (aor.to_owned(), resource.clone());
        if let Some(existing) = self.bindings.get(&key)
            && existing.call_id == call_id
            && cseq <= existing.cseq
        {
            return Err(Refused::OutOfOrder);
        }
        if update.expires_secs == 0 {
            return Ok(self.remove(aor, &resource).map(Change::Removed));
        }
        let expires_at = now + Duration::from_secs(u64::from(update.expires_secs));
        if let Some(existing) = self.bindings.get_mut(&key) {
            existing.contact = update.contact.to_owned();
            existing.expires_at = expires_at;
            existing.flow = flow.clone();
            existing.call_id = call_id.to_owned();
            existing.cseq = cseq;
            return Ok(Some(Change::Refreshed(existing.clone())));
        }
        let binding = Binding {
            aor: aor.to_owned(),
            resource,
            contact: update.contact.to_owned(),
            session_id: Uuid::now_v7(),
            expires_at,
            flow: flow.clone(),
            call_id: call_id.to_owned(),
            cseq,
            user_agent: user_agent.map(str::to_owned),
            logged_at: now,
            device_state: None,
        };
        self.by_session.insert(binding.session_id, key.clone());
        self.bindings.insert(key, binding.clone());
        Ok(Some(Change::Added(binding)))
    }

    /// Puts back a binding rebuilt from the log after a restart; an existing
    /// binding of the same device (a REGISTER that came first) wins.
    pub fn restore(&mut self, binding: Binding) -> bool {
        let key = (binding.aor.clone(), binding.resource.clone());
        if self.bindings.contains_key(&key) {
            return false;
        }
        self.by_session.insert(binding.session_id, key.clone());
        self.bindings.insert(key, binding);
        true
    }

    /// The binding of a device by its full address, mutably.
    pub fn by_full_jid_mut(&mut self, full_jid: &str) -> Option<&mut Binding> {
        let (aor, resource) = full_jid.split_once('/')?;
        self.bindings
            .get_mut(&(aor.to_owned(), resource.to_owned()))
    }

    /// Removes one binding.
    pub fn remove(&mut self, aor: &str, resource: &str) -> Option<Binding> {
        let b = self
            .bindings
            .remove(&(aor.to_owned(), resource.to_owned()))?;
        self.by_session.remove(&b.session_id);
        Some(b)
    }

    /// Removes every binding of `aor` (`Contact: *`, RFC 3261 §10.2.2).
    pub fn remove_all(&mut self, aor: &str) -> Vec<Binding> {
        let resources: Vec<String> = self.of(aor).map(|b| b.resource.clone()).collect();
        resources
            .iter()
            .filter_map(|r| self.remove(aor, r))
            .collect()
    }

    /// Removes and returns the bindings that lapsed by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Binding> {
        let lapsed: Vec<(String, String)> = self
            .bindings
            .iter()
            .filter(|(_, b)| b.expires_at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        lapsed
            .into_iter()
            .filter_map(|(aor, r)| self.remove(&aor, &r))
            .collect()
    }

    /// The bindings of `aor`.
    pub fn of<'a>(&'a self, aor: &'a str) -> impl Iterator<Item = &'a Binding> {
        self.bindings
            .range((aor.to_owned(), String::new())..)
            .take_while(move |((a, _), _)| a == aor)
            .map(|(_, b)| b)
    }

    /// The binding of a device session.
    pub fn by_session(&self, id: Uuid) -> Option<&Binding> {
        self.by_session.get(&id).and_then(|k| self.bindings.get(k))
    }

    /// Number of bindings.
    pub fn len(&self) -> usize {
        self.bindings.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.bindings.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::Transport;

    fn flow() -> Flow {
        Flow {
            transport: Transport::Udp,
            peer: "10.0.0.1:5060".parse().unwrap(),
            conn: 0,
        }
    }

    fn contact(c: &str, expires: u32) -> ContactUpdate<'_> {
        ContactUpdate {
            contact: c,
            instance: None,
            expires_secs: expires,
        }
    }

    #[test]
    fn bindings_are_added_refreshed_removed_and_expire() {
        let mut r = Registrar::default();
        let now = Instant::now();
        let aor = "alice@example.com";
        let Some(Change::Added(b)) = r
            .update(
                aor,
                &contact("sip:alice@10.0.0.1", 60),
                &flow(),
                "c1",
                1,
                None,
                now,
            )
            .unwrap()
        else {
            panic!("not added");
        };
        assert_eq!(
            b.full_jid(),
            format!("{aor}/{}", resource_for("sip:alice@10.0.0.1", None))
        );
        assert_eq!(
            r.by_session(b.session_id).unwrap().contact,
            "sip:alice@10.0.0.1"
        );
        // The same Call-ID with an old CSeq is out of order.
        assert_eq!(
            r.update(
                aor,
                &contact("sip:alice@10.0.0.1", 60),
                &flow(),
                "c1",
                1,
                None,
                now
            ),
            Err(Refused::OutOfOrder)
        );
        let Some(Change::Refreshed(again)) = r
            .update(
                aor,
                &contact("sip:alice@10.0.0.1", 120),
                &flow(),
                "c1",
                2,
                None,
                now,
            )
            .unwrap()
        else {
            panic!("not refreshed");
        };
        assert_eq!(
            again.session_id, b.session_id,
            "a refresh keeps the session"
        );
        r.update(
            aor,
            &contact("sip:alice@10.0.0.2", 30),
            &flow(),
            "c2",
            1,
            None,
            now,
        )
        .unwrap();
        assert_eq!(r.of(aor).count(), 2);
        assert_eq!(r.of("al@example.com").count(), 0);
        let lapsed = r.expire(now + Duration::from_secs(30));
        assert_eq!(lapsed.len(), 1);
        assert_eq!(lapsed[0].contact, "sip:alice@10.0.0.2");
        let Some(Change::Removed(gone)) = r
            .update(
                aor,
                &contact("sip:alice@10.0.0.1", 0),
                &flow(),
                "c1",
                3,
                None,
                now,
            )
            .unwrap()
        else {
            panic!("not removed");
        };
        assert_eq!(gone.session_id, b.session_id);
        assert!(r.is_empty());
        assert!(r.by_session(b.session_id).is_none());
    }

    #[test]
    fn instance_names_the_device() {
        let a = resource_for("sip:a@1.2.3.4", Some("<urn:uuid:1>"));
        let b = resource_for("sip:a@5.6.7.8", Some("<urn:uuid:1>"));
        assert_eq!(a, b);
        assert_ne!(a, resource_for("sip:a@1.2.3.4", None));
        assert_eq!(a.len(), 16);
        let mut r = Registrar::default();
        let now = Instant::now();
        r.update("a@x", &contact("sip:a@1", 60), &flow(), "c", 1, None, now)
            .unwrap();
        r.update("a@x", &contact("sip:a@2", 60), &flow(), "c", 2, None, now)
            .unwrap();
        assert_eq!(r.remove_all("a@x").len(), 2);
        assert!(r.is_empty());
    }
}
