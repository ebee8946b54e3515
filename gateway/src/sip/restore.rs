//! Registrations across a restart (RFC 3261 §10.2.1: a binding lasts until
//! its expiry, whatever happens to the registrar's process): the bindings
//! this node held are rebuilt from the log when the gateway starts.
//!
//! The log has, per device session, `session.resource_bound` (protocol sip,
//! the contact, emitted by this node) when the binding is made and again
//! when a refresh extends it past what the log covers, `session.ended` when
//! it is removed or lapses, and `presence.device` for what its publications
//! said. A binding is logged at `logged_at` and granted at most
//! `register_max_expires_secs`, and a refresh is logged again once
//! `now + granted` would pass `logged_at + max`; so `logged_at + max` is
//! never before the real expiry, and is at most `max - granted` after it.
//! That is the expiry a rebuilt binding gets.
//!
//! `session.ended` with reason `node_down` is the router ending the
//! sessions of a node that stopped (or restarted): the registrations
//! themselves are still valid, so those ends are not taken as removals.
//! Only bindings this node can reach again are rebuilt: UDP contacts whose
//! host is an IP literal (a TCP or TLS flow died with the process: RFC
//! 5626 §4.2, the client makes a new one and registers on it). Each
//! rebuilt binding is a new device session (new session id, same address),
//! announced with `session.resource_bound` and `presence.device` carrying
//! its last published state. Subscriptions and publications are not
//! rebuilt: their clients refresh them (a refresh of a subscription this
//! node no longer knows is answered 481, RFC 6665 §4.1.2.2, and the client
//! subscribes again).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use chrono::{DateTime, Utc};
use switchboard_schemas::events::{Protocol, SessionEndReason};
use switchboard_schemas::{Envelope, Event};
use uuid::Uuid;

use super::pidf::DeviceState;
use super::{Flow, Transport};

/// A binding as the log tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    /// `user@domain`.
    pub aor: String,
    /// The device's resource (`sip-…`).
    pub resource: String,
    /// The session id the log knows it by.
    pub session_id: Uuid,
    /// The contact URI.
    pub contact: String,
    /// The client's User-Agent.
    pub user_agent: Option<String>,
    /// When the session was bound.
    pub bound_at: DateTime<Utc>,
    /// The latest `session.resource_bound` of the session (bind or logged
    /// refresh).
    pub logged_at: DateTime<Utc>,
    /// The last available device state of its publications.
    pub state: Option<DeviceState>,
}

/// The fold of `sessions` and `presence` records into this node's live
/// bindings. Apply the `sessions` records first, then `presence`.
#[derive(Debug, Default)]
pub struct Fold {
    node: String,
    by_full: HashMap<String, Logged>,
}

impl Fold {
    /// A fold for the bindings of `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            by_full: HashMap::new(),
        }
    }

    /// Applies one event.
    pub fn apply(&mut self, envelope: &Envelope) {
        let ours = envelope.node.as_str() == self.node;
        match &envelope.event {
            Event::SessionResourceBound(b) if ours && b.protocol == Protocol::Sip => {
                let Some(contact) = &b.contact else {
                    return;
                };
                let full = b.full_jid.as_str();
                let Some((aor, resource)) = full.split_once('/') else {
                    return;
                };
                match self.by_full.get_mut(full) {
                    Some(l) if l.session_id == b.session_id => {
                        l.logged_at = l.logged_at.max(envelope.occurred_at);
                        l.contact.clone_from(contact);
                    }
                    _ => {
                        self.by_full.insert(
                            full.to_owned(),
                            Logged {
                                aor: aor.to_owned(),
                                resource: resource.to_owned(),
                                session_id: b.session_id,
                                contact: contact.clone(),
                                user_agent: b.client.user_agent.clone(),
                                bound_at: envelope.occurred_at,
                                logged_at: envelope.occurred_at,
                                state: None,
                            },
                        );
                    }
                }
            }
            Event::SessionEnded(e) if e.reason != SessionEndReason::NodeDown => {
                let Some(full) = e.full_jid.as_ref().map(|f| f.as_str()) else {
                    return;
                };
                if self
                    .by_full
                    .get(full)
                    .is_some_and(|l| l.session_id == e.session_id)
                {
                    self.by_full.remove(full);
                }
            }
            Event::DevicePresence(p) if ours && p.protocol == Protocol::Sip && p.available => {
                if let Some(l) = self.by_full.get_mut(&p.device)
                    && envelope.occurred_at >= l.bound_at
                {
                    l.state = Some(DeviceState {
                        available: true,
                        show: p.show.clone(),
                        status: p.status.clone(),
                    });
                }
            }
            _ => {}
        }
    }

    /// The bindings still live at `now` with a registration granted at most
    /// `max_expires_secs`, each with the seconds it has left and the flow
    /// that reaches it; the unreachable ones are left out.
    pub fn live(self, now: DateTime<Utc>, max_expires_secs: u32) -> Vec<(Logged, u64, Flow)> {
        let mut out: Vec<_> = self
            .by_full
            .into_values()
            .filter_map(|l| {
                let expires = l.logged_at + chrono::Duration::seconds(i64::from(max_expires_secs));
                let left = (expires - now).num_seconds();
                let flow = udp_flow(&l.contact)?;
                (left > 0).then(|| (l, left.unsigned_abs(), flow))
            })
            .collect();
        out.sort_by(|a, b| (&a.0.aor, &a.0.resource).cmp(&(&b.0.aor, &b.0.resource)));
        out
    }
}

/// The UDP flow to a contact whose host is an IP literal (RFC 3263 §4.2:
/// port 5060 when none is given); None for other transports or hosts.
pub fn udp_flow(contact: &str) -> Option<Flow> {
    let uri = rsip::Uri::try_from(contact).ok()?;
    if !matches!(uri.scheme, Some(rsip::Scheme::Sip) | None) {
        return None;
    }
    let udp = uri.params.iter().all(|p| match p {
        rsip::Param::Transport(t) => t.to_string().eq_ignore_ascii_case("udp"),
        _ => true,
    });
    if !udp {
        return None;
    }
    let ip: IpAddr = match &uri.host_with_port.host {
        rsip::Host::IpAddr(ip) => *ip,
        rsip::Host::Domain(_) => return None,
    };
    let port = uri.host_with_port.port.map_or(5060, |p| *p.value());
    Some(Flow {
        transport: Transport::Udp,
        peer: SocketAddr::new(ip, port),
        conn: 0,
    })
}

#[cfg(test)]
mod tests {
    use switchboard_schemas::events::{
        ClientInfo, DevicePresence, SessionEnded, SessionResourceBound, Show,
    };
    use switchboard_schemas::{BareJid, FullJid, NodeId};

    use super::*;

    const FULL: &str = "bob@example.com/sip-0123456789ab";

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    fn env(node: &str, secs: i64, event: impl Into<Event>) -> Envelope {
        let mut e = Envelope::new(NodeId::new(node), "bob@example.com", event);
        e.occurred_at = at(secs);
        e
    }

    fn bound(id: Uuid, contact: &str) -> SessionResourceBound {
        SessionResourceBound {
            session_id: id,
            full_jid: FullJid::new(FULL),
            protocol: Protocol::Sip,
            contact: Some(contact.to_owned()),
            priority: 0,
            client: ClientInfo::default(),
        }
    }

    fn ended(id: Uuid, reason: SessionEndReason) -> SessionEnded {
        SessionEnded {
            session_id: id,
            user: BareJid::new("bob@example.com"),
            full_jid: Some(FullJid::new(FULL)),
            protocol: Protocol::Sip,
            reason,
            text: None,
        }
    }

    fn presence(show: Option<Show>, status: Option<&str>, available: bool) -> DevicePresence {
        DevicePresence {
            user: BareJid::new("bob@example.com"),
            device: FULL.to_owned(),
            protocol: Protocol::Sip,
            available,
            show,
            status: status.map(str::to_owned),
            priority: 0,
        }
    }

    #[test]
    fn a_live_binding_comes_back_with_its_published_state() {
        let id = Uuid::now_v7();
        let mut fold = Fold::new("gw1");
        fold.apply(&env(
            "gw1",
            0,
            bound(id, "sip:bob@127.0.0.1:5070;transport=UDP"),
        ));
        // A logged refresh moves the expiry on.
        fold.apply(&env(
            "gw1",
            3000,
            bound(id, "sip:bob@127.0.0.1:5070;transport=UDP"),
        ));
        // The router ending the node's sessions at a restart is no removal.
        fold.apply(&env("gw1", 3100, ended(id, SessionEndReason::NodeDown)));
        fold.apply(&env(
            "gw1",
            10,
            presence(Some(Show::Away), Some("lunch"), true),
        ));
        fold.apply(&env("gw1", 3100, presence(None, None, false)));
        let live = fold.live(at(3600), 7200);
        assert_eq!(live.len(), 1);
        let (l, left, flow) = &live[0];
        assert_eq!(
            (l.aor.as_str(), l.resource.as_str()),
            ("bob@example.com", "sip-0123456789ab")
        );
        assert_eq!(*left, 3000 + 7200 - 3600);
        assert_eq!(flow.peer, "127.0.0.1:5070".parse().unwrap());
        assert_eq!(
            l.state,
            Some(DeviceState {
                available: true,
                show: Some(Show::Away),
                status: Some("lunch".to_owned())
            })
        );
        // Past its expiry it stays gone.
        let mut fold = Fold::new("gw1");
        fold.apply(&env("gw1", 0, bound(id, "sip:bob@127.0.0.1:5070")));
        assert!(fold.live(at(7200), 7200).is_empty());
    }

    #[test]
    fn ended_unreachable_and_foreign_bindings_stay_gone() {
        let id = Uuid::now_v7();
        let mut fold = Fold::new("gw1");
        fold.apply(&env("gw1", 0, bound(id, "sip:bob@127.0.0.1:5070")));
        fold.apply(&env("gw1", 5, ended(id, SessionEndReason::Logout)));
        assert!(fold.live(at(10), 7200).is_empty());
        // The end of an older session of the same device removes nothing.
        let mut fold = Fold::new("gw1");
        let newer = Uuid::now_v7();
        fold.apply(&env("gw1", 0, bound(newer, "sip:bob@127.0.0.1:5070")));
        fold.apply(&env("gw1", 5, ended(id, SessionEndReason::Timeout)));
        assert_eq!(fold.live(at(10), 7200).len(), 1);
        for contact in [
            "sip:bob@127.0.0.1:5070;transport=tcp",
            "sips:bob@127.0.0.1:5071",
            "sip:bob@phone.example.com",
        ] {
            let mut fold = Fold::new("gw1");
            fold.apply(&env("gw1", 0, bound(id, contact)));
            assert!(fold.live(at(10), 7200).is_empty(), "{contact}");
        }
        let mut fold = Fold::new("gw1");
        fold.apply(&env("gw2", 0, bound(id, "sip:bob@127.0.0.1:5070")));
        assert!(fold.live(at(10), 7200).is_empty());
    }

    #[test]
    fn udp_flows_default_to_port_5060() {
        assert_eq!(
            udp_flow("sip:bob@10.0.0.7").unwrap().peer,
            "10.0.0.7:5060".parse().unwrap()
        );
    }
}
