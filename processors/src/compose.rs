//! RFC 6121 §4 (presence), RFC 4480 (RPID activities: on-the-phone,
//! meeting): the pure composition of a user's presence inputs into one
//! [`ComposedPresence`] (SPEC.md §6), and the per-user change throttle.
//!
//! # Inputs (per user)
//!
//! - the manual status: at most one (`presence.manual_status_set` replaces
//!   it, `presence.manual_status_cleared` removes it);
//! - each device's presence (`presence.device`: XMPP resources with their
//!   priority, SIP devices). A device drops out when it sends unavailable
//!   presence or its session ends (`session.ended`, read from `sessions`);
//! - each phone line's state (`presence.phone_line`);
//! - the calendar's busy flag (`presence.calendar`);
//! - each third-party application's state (`presence.third_party`).
//!
//! # Precedence (first rule that applies decides)
//!
//! 1. Manual *invisible* (XEP-0126): watchers see `unavailable`; sources
//!    `{manual}` only (nothing else leaks).
//! 2. No available device: `unavailable`, no sources.
//! 3. Manual *dnd* / *away* / *available*: that availability, `<show/>`
//!    `dnd` / `away` / none, the manual text. It overrides every system
//!    input below (SPEC.md §6).
//! 4. A phone line off-hook, ringing or held (a held call still occupies
//!    the user): `on_call`, `<show/>dnd`, status "On the phone".
//! 5. A third-party application asserting `dnd`, `on_call`, `in_meeting` or
//!    `away` (the most severe in that order wins; ties go to the first
//!    application by name): that availability with `<show/>dnd` (`away`
//!    for `away`) and the application's text. Third-party `available` or
//!    `unavailable` never overrides devices: an application cannot sign a
//!    user out or in.
//! 6. Calendar busy: `in_meeting`, `<show/>dnd`, status "In a meeting".
//! 7. The best device: highest priority, then the smallest device name
//!    (determinism); its `<show/>` maps `chat`/none → `available`,
//!    `away`/`xa` → `away`, `dnd` → `dnd`, with its status text.
//!
//! `sources` lists every input kind holding an active state (manual set,
//! an available device, a line in a call, a third-party assertion, calendar
//! busy), except under rule 1 and 2 where they are `{manual}` and empty.
//!
//! # Order across topics
//!
//! Within one topic the log order is the order of events (they are keyed
//! by the user), so the fold takes them as they come: clocks of different
//! nodes are never compared there. Device presence arrives on `presence`,
//! session ends on `sessions`, and the topics have no order between them,
//! so only there the fold compares `occurred_at`. A session end leaves a tombstone
//! (time of the end per device); a device presence that occurred before the
//! tombstone is stale and ignored, and a later bind of the same address
//! lifts the tombstone. A session end for a session other than the one last
//! bound to the address (a replaced session, RFC 6120 §7.7.2.2) removes
//! nothing.
//!
//! Manual status is cleared when the user's last device goes away (SPEC.md
//! §6: signed out of all devices) if it was set before that moment. The fold
//! does this itself, so it needs no event to stay right; the composer
//! publishes `presence.manual_status_cleared` with reason `signed_out` as a
//! record of it, which the fold ignores on reading it back.
//!
//! Every function here is pure and deterministic: the same events in any
//! batching give the same state (checked by property tests below).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use switchboard_schemas::events::{
    Availability, ComposedPresence, LineState, ManualState, ManualStatusClearReason,
    PresenceSource, PresenceSources, Show,
};
use switchboard_schemas::{BareJid, Envelope, Event};
use uuid::Uuid;

use crate::small_map::SmallMap;

/// Status text of rule 4.
pub const ON_THE_PHONE: &str = "On the phone";
/// Status text of rule 6.
pub const IN_A_MEETING: &str = "In a meeting";
/// Session-end tombstones kept per user (the oldest go first).
const MAX_TOMBSTONES: usize = 64;

/// The manual status in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manual {
    /// The chosen state.
    pub state: ManualState,
    /// Its text.
    pub text: Option<String>,
    /// When it was set.
    pub set_at: DateTime<Utc>,
    /// When it expires by itself.
    pub expires_at: Option<DateTime<Utc>>,
}

/// An available device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// `<show/>`.
    pub show: Option<Show>,
    /// Status text.
    pub status: Option<String>,
    /// Priority.
    pub priority: i8,
    /// When its presence occurred.
    pub at: DateTime<Utc>,
}

/// A third-party application's assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThirdParty {
    /// The asserted availability.
    pub availability: Availability,
    /// The application's text.
    pub status: Option<String>,
}

/// The session last bound to a full address.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bound {
    session_id: Uuid,
    at: DateTime<Utc>,
    /// The SIP `Contact` URI, which names the device of a SIP session.
    contact: Option<String>,
}

/// One user's presence inputs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserPresence {
    manual: Option<Manual>,
    devices: SmallMap<String, Device>,
    lines: SmallMap<String, LineState>,
    calendar_busy: bool,
    third_party: SmallMap<String, ThirdParty>,
    bound: SmallMap<String, Bound>,
    /// Device name → when its session ended.
    ended: SmallMap<String, DateTime<Utc>>,
}

/// What applying one event changed beyond the inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    /// The last device went away and took the manual status with it.
    pub manual_cleared_by_sign_out: bool,
}

impl UserPresence {
    /// The manual status in force.
    pub fn manual(&self) -> Option<&Manual> {
        self.manual.as_ref()
    }

    /// The available devices by name.
    pub fn devices(&self) -> &SmallMap<String, Device> {
        &self.devices
    }

    /// Folds one event about this user. Events about other subjects or of
    /// other kinds change nothing.
    pub fn apply(&mut self, envelope: &Envelope) -> Applied {
        let at = envelope.occurred_at;
        let had_devices = !self.devices.is_empty();
        match &envelope.event {
            Event::DevicePresence(d) => {
                let stale = self.ended.get(&d.device).is_some_and(|end| at <= *end);
                if stale {
                    return Applied::default();
                }
                if d.available {
                    self.devices.insert(
                        d.device.clone(),
                        Device {
                            show: d.show.clone(),
                            status: d.status.clone(),
                            priority: d.priority,
                            at,
                        },
                    );
                } else {
                    self.devices.remove(&d.device);
                }
            }
            Event::SessionResourceBound(b) => {
                let full = b.full_jid.as_str().to_owned();
                for name in std::iter::once(&full).chain(b.contact.as_ref()) {
                    if self.ended.get(name).is_some_and(|end| *end < at) {
                        self.ended.remove(name);
                    }
                }
                self.bound.insert(
                    full,
                    Bound {
                        session_id: b.session_id,
                        at,
                        contact: b.contact.clone(),
                    },
                );
            }
            Event::SessionEnded(e) => {
                let Some(full) = e.full_jid.as_ref().map(|f| f.as_str().to_owned()) else {
                    return Applied::default();
                };
                let current = self.bound.get(&full);
                if current.is_some_and(|b| b.session_id != e.session_id) {
                    // A replaced session ended after its successor bound
                    // (`sessions` is in order per user).
                    return Applied::default();
                }
                let contact = current.and_then(|b| b.contact.clone());
                self.bound.remove(&full);
                for name in std::iter::once(full).chain(contact) {
                    if self.devices.get(&name).is_none_or(|d| d.at <= at) {
                        self.devices.remove(&name);
                    }
                    let end = self.ended.get_or_insert_with(name, || at);
                    *end = (*end).max(at);
                }
                while self.ended.len() > MAX_TOMBSTONES {
                    let oldest = self
                        .ended
                        .iter()
                        .min_by_key(|(name, end)| (**end, (*name).clone()))
                        .map(|(name, _)| name.clone());
                    if let Some(oldest) = oldest {
                        self.ended.remove(&oldest);
                    }
                }
            }
            Event::ManualStatusSet(m) => {
                self.manual = Some(Manual {
                    state: m.state.clone(),
                    text: m.text.clone(),
                    set_at: at,
                    expires_at: m.expires_at,
                });
            }
            // Sign-out clears are the fold's own doing (see the module
            // documentation); reading the record back changes nothing.
            Event::ManualStatusCleared(c) if c.reason != ManualStatusClearReason::SignedOut => {
                self.manual = None;
            }
            Event::PhoneLineState(l) => {
                if l.state == LineState::OnHook {
                    self.lines.remove(&l.line_id);
                } else {
                    self.lines.insert(l.line_id.clone(), l.state.clone());
                }
            }
            Event::CalendarState(c) => self.calendar_busy = c.busy,
            Event::ThirdPartyPresence(t) => match &t.availability {
                Some(availability) => {
                    self.third_party.insert(
                        t.application.clone(),
                        ThirdParty {
                            availability: availability.clone(),
                            status: t.status.clone(),
                        },
                    );
                }
                None => {
                    self.third_party.remove(&t.application);
                }
            },
            _ => {}
        }
        let mut applied = Applied::default();
        if had_devices
            && self.devices.is_empty()
            && self.manual.as_ref().is_some_and(|m| m.set_at <= at)
        {
            self.manual = None;
            applied.manual_cleared_by_sign_out = true;
        }
        applied
    }

    fn in_call(&self) -> bool {
        self.lines
            .values()
            .any(|s| matches!(s, LineState::OffHook | LineState::Ringing | LineState::Held))
    }

    /// The third-party assertion of rule 5, if any.
    fn third_party_assertion(&self) -> Option<&ThirdParty> {
        let rank = |a: &Availability| match a {
            Availability::Dnd => Some(0),
            Availability::OnCall => Some(1),
            Availability::InMeeting => Some(2),
            Availability::Away => Some(3),
            _ => None,
        };
        self.third_party
            .values()
            .filter_map(|t| rank(&t.availability).map(|r| (r, t)))
            .min_by_key(|(r, _)| *r)
            .map(|(_, t)| t)
    }

    /// The composed presence (precedence in the module documentation).
    pub fn compose(&self, user: &BareJid) -> ComposedPresence {
        let composed = |availability, show, status: Option<String>, sources| ComposedPresence {
            user: user.clone(),
            availability,
            show,
            status,
            sources,
        };
        if let Some(Manual {
            state: ManualState::Invisible,
            ..
        }) = &self.manual
        {
            return composed(
                Availability::Unavailable,
                None,
                None,
                PresenceSources::from([PresenceSource::Manual]),
            );
        }
        if self.devices.is_empty() {
            return composed(
                Availability::Unavailable,
                None,
                None,
                PresenceSources::new(),
            );
        }
        let third_party = self.third_party_assertion();
        let mut sources = PresenceSources::from([PresenceSource::Device]);
        if self.manual.is_some() {
            sources.insert(PresenceSource::Manual);
        }
        if self.in_call() {
            sources.insert(PresenceSource::Phone);
        }
        if third_party.is_some() {
            sources.insert(PresenceSource::ThirdParty);
        }
        if self.calendar_busy {
            sources.insert(PresenceSource::Calendar);
        }
        if let Some(manual) = &self.manual {
            let (availability, show) = match &manual.state {
                ManualState::Dnd => (Availability::Dnd, Some(Show::Dnd)),
                ManualState::Away => (Availability::Away, Some(Show::Away)),
                ManualState::Available => (Availability::Available, None),
                // A state this version does not know: shown as its name,
                // available otherwise.
                ManualState::Invisible | ManualState::Other(_) => (Availability::Available, None),
            };
            return composed(availability, show, manual.text.clone(), sources);
        }
        if self.in_call() {
            return composed(
                Availability::OnCall,
                Some(Show::Dnd),
                Some(ON_THE_PHONE.to_owned()),
                sources,
            );
        }
        if let Some(t) = third_party {
            let show = if t.availability == Availability::Away {
                Show::Away
            } else {
                Show::Dnd
            };
            return composed(
                t.availability.clone(),
                Some(show),
                t.status.clone(),
                sources,
            );
        }
        if self.calendar_busy {
            return composed(
                Availability::InMeeting,
                Some(Show::Dnd),
                Some(IN_A_MEETING.to_owned()),
                sources,
            );
        }
        let best = self
            .devices
            .values()
            .enumerate()
            .max_by_key(|(i, d)| (d.priority, std::cmp::Reverse(*i)))
            .map(|(_, d)| d);
        let Some(best) = best else {
            return composed(
                Availability::Unavailable,
                None,
                None,
                PresenceSources::new(),
            );
        };
        let (availability, show) = match &best.show {
            None | Some(Show::Chat) => (Availability::Available, best.show.clone()),
            Some(Show::Away | Show::Xa) => (Availability::Away, best.show.clone()),
            Some(Show::Dnd) => (Availability::Dnd, Some(Show::Dnd)),
            Some(Show::Other(_)) => (Availability::Available, None),
        };
        composed(availability, show, best.status.clone(), sources)
    }
}

/// The subject user of a presence or session event, if it is one the
/// composer folds.
pub fn subject_user(event: &Event) -> Option<&BareJid> {
    match event {
        Event::DevicePresence(e) => Some(&e.user),
        Event::ManualStatusSet(e) => Some(&e.user),
        Event::ManualStatusCleared(e) => Some(&e.user),
        Event::PhoneLineState(e) => Some(&e.user),
        Event::CalendarState(e) => Some(&e.user),
        Event::ThirdPartyPresence(e) => Some(&e.user),
        Event::SessionEnded(e) => Some(&e.user),
        _ => None,
    }
}

/// The bare address a `session.resource_bound` belongs to.
fn bound_user(event: &Event) -> Option<BareJid> {
    match event {
        Event::SessionResourceBound(b) => Some(BareJid::new(
            b.full_jid
                .as_str()
                .split_once('/')
                .map_or(b.full_jid.as_str(), |(bare, _)| bare),
        )),
        _ => None,
    }
}

/// The composition state of many users: the fold of the `presence` and
/// `sessions` events about them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Composer {
    users: BTreeMap<BareJid, UserPresence>,
}

impl Composer {
    /// Folds one event; returns the user it concerned and what it changed.
    pub fn apply(&mut self, envelope: &Envelope) -> Option<(BareJid, Applied)> {
        let user = match subject_user(&envelope.event) {
            Some(user) => user.clone(),
            None => bound_user(&envelope.event)?,
        };
        let applied = self.users.entry(user.clone()).or_default().apply(envelope);
        Some((user, applied))
    }

    /// The composed presence of a user (unavailable when never seen).
    pub fn compose(&self, user: &BareJid) -> ComposedPresence {
        self.users.get(user).map_or_else(
            || UserPresence::default().compose(user),
            |u| u.compose(user),
        )
    }

    /// One user's inputs.
    pub fn user(&self, user: &BareJid) -> Option<&UserPresence> {
        self.users.get(user)
    }

    /// Every user with state.
    pub fn users(&self) -> impl Iterator<Item = &BareJid> {
        self.users.keys()
    }

    /// Users whose manual status has expired at `now`, with when that
    /// status was set. Composition does not look at the clock: the composer
    /// publishes `presence.manual_status_cleared` (reason `expired`) for
    /// these, and the fold clears the status when it reads that back, in
    /// log order with the user's own changes.
    pub fn expired(&self, now: DateTime<Utc>) -> Vec<(BareJid, DateTime<Utc>)> {
        self.users
            .iter()
            .filter_map(|(user, p)| {
                let m = p.manual.as_ref()?;
                m.expires_at
                    .is_some_and(|e| e <= now)
                    .then(|| (user.clone(), m.set_at))
            })
            .collect()
    }

    /// Keeps only the users for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&BareJid) -> bool) {
        self.users.retain(|user, _| keep(user));
    }

    /// Number of users with state.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether no user has state.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// A per-user rate cap on composed presence changes (SPEC.md §6 presence
/// change throttle; for SIP watchers RFC 3856 §6.10 asks for no more than
/// one notification per 5 s). A change goes out at once when the user's
/// previous one is at least `min_interval` old; otherwise it waits, and a
/// burst coalesces into its newest state, sent when the interval has passed.
/// A pending state equal to the last sent one is dropped.
///
/// Pure: time is passed in by the caller.
#[derive(Debug, Clone)]
pub struct Throttle<T> {
    min_interval: Duration,
    users: BTreeMap<BareJid, Slot<T>>,
}

#[derive(Debug, Clone)]
struct Slot<T> {
    /// `None`: nothing sent through this throttle yet.
    last_sent_at: Option<Duration>,
    last_sent: Option<T>,
    pending: Option<T>,
}

impl<T: Clone + PartialEq> Throttle<T> {
    /// A throttle letting one change per `min_interval` through per user;
    /// zero lets everything through.
    pub fn new(min_interval: Duration) -> Self {
        Self {
            min_interval,
            users: BTreeMap::new(),
        }
    }

    /// The current interval.
    pub fn min_interval(&self) -> Duration {
        self.min_interval
    }

    /// Changes the interval (live settings); pending states keep waiting
    /// for the new interval.
    pub fn set_min_interval(&mut self, min_interval: Duration) {
        self.min_interval = min_interval;
    }

    /// Offers a new state at time `now` (any monotonic clock as a duration
    /// since its origin). Returns it when it may go out now; a state equal
    /// to the last one sent cancels whatever was pending and sends nothing.
    pub fn offer(&mut self, user: &BareJid, state: T, now: Duration) -> Option<T> {
        let min_interval = self.min_interval;
        let slot = self.users.entry(user.clone()).or_insert_with(|| Slot {
            last_sent_at: None,
            last_sent: None,
            pending: None,
        });
        if slot.last_sent.as_ref() == Some(&state) {
            slot.pending = None;
            return None;
        }
        let quiet = slot
            .last_sent_at
            .is_none_or(|at| now.saturating_sub(at) >= min_interval);
        if quiet && slot.pending.is_none() {
            slot.last_sent_at = Some(now);
            slot.last_sent = Some(state.clone());
            Some(state)
        } else {
            slot.pending = Some(state);
            None
        }
    }

    /// States whose wait is over at `now`, in user order; they count as
    /// sent.
    pub fn due(&mut self, now: Duration) -> Vec<(BareJid, T)> {
        let mut out = Vec::new();
        for (user, slot) in &mut self.users {
            let quiet = slot
                .last_sent_at
                .is_none_or(|at| now.saturating_sub(at) >= self.min_interval);
            if quiet && let Some(state) = slot.pending.take() {
                slot.last_sent_at = Some(now);
                slot.last_sent = Some(state.clone());
                out.push((user.clone(), state));
            }
        }
        out
    }

    /// When the next pending state falls due, if any.
    pub fn next_due(&self) -> Option<Duration> {
        self.users
            .values()
            .filter(|s| s.pending.is_some())
            .map(|s| {
                s.last_sent_at
                    .map_or(Duration::ZERO, |at| at + self.min_interval)
            })
            .min()
    }

    /// Forgets users for which `keep` is false (partitions moved away).
    pub fn retain(&mut self, mut keep: impl FnMut(&BareJid) -> bool) {
        self.users.retain(|user, _| keep(user));
    }

    /// Records `state` as the last one sent, at no particular time (the
    /// last composed state read back from the log): the next different
    /// state goes out at once.
    pub fn seed(&mut self, user: &BareJid, state: T) {
        self.users.insert(
            user.clone(),
            Slot {
                last_sent_at: None,
                last_sent: Some(state),
                pending: None,
            },
        );
    }

    /// Whether the throttle knows `user`.
    pub fn knows(&self, user: &BareJid) -> bool {
        self.users.contains_key(user)
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use proptest::prelude::*;
    use switchboard_schemas::events::{
        CalendarState, DevicePresence, ManualStatusCleared, ManualStatusSet, PhoneLineState,
        Protocol, SessionEndReason, SessionEnded, SessionResourceBound, ThirdPartyPresence,
    };
    use switchboard_schemas::{FullJid, NodeId};

    use super::*;

    const ALICE: &str = "alice@example.com";

    fn at(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_800_000_000_000 + ms).unwrap()
    }

    fn env(ms: i64, event: impl Into<Event>) -> Envelope {
        Envelope {
            occurred_at: at(ms),
            ..Envelope::new(NodeId::new("n1"), ALICE, event)
        }
    }

    fn alice() -> BareJid {
        BareJid::new(ALICE)
    }

    fn device(ms: i64, resource: &str, available: bool, show: Option<Show>, prio: i8) -> Envelope {
        env(
            ms,
            DevicePresence {
                user: alice(),
                device: format!("{ALICE}/{resource}"),
                protocol: Protocol::Xmpp,
                available,
                show,
                status: Some(format!("{resource} status")),
                priority: prio,
            },
        )
    }

    fn bound(ms: i64, resource: &str, session: u128) -> Envelope {
        env(
            ms,
            SessionResourceBound {
                session_id: Uuid::from_u128(session),
                full_jid: FullJid::new(format!("{ALICE}/{resource}")),
                protocol: Protocol::Xmpp,
                contact: None,
                priority: 0,
                client: Default::default(),
            },
        )
    }

    fn ended(ms: i64, resource: &str, session: u128) -> Envelope {
        env(
            ms,
            SessionEnded {
                session_id: Uuid::from_u128(session),
                user: alice(),
                full_jid: Some(FullJid::new(format!("{ALICE}/{resource}"))),
                protocol: Protocol::Xmpp,
                reason: SessionEndReason::Logout,
                text: None,
            },
        )
    }

    fn manual(ms: i64, state: ManualState) -> Envelope {
        env(
            ms,
            ManualStatusSet {
                user: alice(),
                state,
                text: Some("by hand".to_owned()),
                expires_at: None,
            },
        )
    }

    fn line(ms: i64, id: &str, state: LineState) -> Envelope {
        env(
            ms,
            PhoneLineState {
                user: alice(),
                line_id: id.to_owned(),
                state,
            },
        )
    }

    fn calendar(ms: i64, busy: bool) -> Envelope {
        env(
            ms,
            CalendarState {
                user: alice(),
                busy,
                until: None,
            },
        )
    }

    fn third(ms: i64, app: &str, availability: Option<Availability>) -> Envelope {
        env(
            ms,
            ThirdPartyPresence {
                user: alice(),
                application: app.to_owned(),
                availability,
                status: Some(format!("{app} says so")),
            },
        )
    }

    fn fold(events: &[Envelope]) -> ComposedPresence {
        let mut composer = Composer::default();
        for e in events {
            composer.apply(e);
        }
        composer.compose(&alice())
    }

    fn sources(list: &[PresenceSource]) -> PresenceSources {
        list.iter().cloned().collect()
    }

    #[test]
    fn nobody_seen_is_unavailable() {
        let c = fold(&[]);
        assert_eq!(c.availability, Availability::Unavailable);
        assert!(c.sources.is_empty());
    }

    #[test]
    fn highest_priority_device_decides() {
        let c = fold(&[
            device(1, "phone", true, Some(Show::Away), 1),
            device(2, "laptop", true, None, 5),
        ]);
        assert_eq!(c.availability, Availability::Available);
        assert_eq!(c.show, None);
        assert_eq!(c.status.as_deref(), Some("laptop status"));
        assert_eq!(c.sources, sources(&[PresenceSource::Device]));
        let c = fold(&[
            device(1, "phone", true, Some(Show::Xa), 9),
            device(2, "laptop", true, None, 5),
        ]);
        assert_eq!(c.availability, Availability::Away);
        assert_eq!(c.show, Some(Show::Xa));
    }

    #[test]
    fn equal_priorities_go_to_the_smallest_device_name() {
        let c = fold(&[
            device(1, "b", true, Some(Show::Dnd), 0),
            device(2, "a", true, Some(Show::Away), 0),
        ]);
        assert_eq!(c.show, Some(Show::Away));
    }

    #[test]
    fn unavailable_or_ended_devices_drop_out() {
        let c = fold(&[
            device(1, "phone", true, Some(Show::Away), 9),
            device(2, "laptop", true, None, 5),
            device(3, "phone", false, None, 0),
        ]);
        assert_eq!(c.status.as_deref(), Some("laptop status"));
        let c = fold(&[
            bound(0, "laptop", 1),
            device(1, "laptop", true, None, 5),
            ended(2, "laptop", 1),
        ]);
        assert_eq!(c.availability, Availability::Unavailable);
    }

    #[test]
    fn presence_read_after_its_session_end_is_stale() {
        // The sessions topic was read ahead of the presence topic.
        let c = fold(&[
            bound(0, "laptop", 1),
            ended(2, "laptop", 1),
            device(1, "laptop", true, None, 5),
        ]);
        assert_eq!(c.availability, Availability::Unavailable);
        // A new session of the same address lifts the tombstone.
        let c = fold(&[
            bound(0, "laptop", 1),
            ended(2, "laptop", 1),
            device(1, "laptop", true, None, 5),
            bound(3, "laptop", 2),
            device(4, "laptop", true, Some(Show::Dnd), 5),
        ]);
        assert_eq!(c.availability, Availability::Dnd);
    }

    #[test]
    fn a_sip_device_drops_out_when_its_registration_ends() {
        let contact = "sip:alice@10.0.0.7:5060;transport=tcp";
        let session = Uuid::from_u128(9);
        let full = FullJid::new(format!("{ALICE}/sip-desk"));
        let events = [
            env(
                0,
                SessionResourceBound {
                    session_id: session,
                    full_jid: full.clone(),
                    protocol: Protocol::Sip,
                    contact: Some(contact.to_owned()),
                    priority: 0,
                    client: Default::default(),
                },
            ),
            env(
                1,
                DevicePresence {
                    user: alice(),
                    device: contact.to_owned(),
                    protocol: Protocol::Sip,
                    available: true,
                    show: None,
                    status: Some("desk phone".to_owned()),
                    priority: 0,
                },
            ),
        ];
        let c = fold(&events);
        assert_eq!(c.availability, Availability::Available);
        assert_eq!(c.status.as_deref(), Some("desk phone"));
        let mut all = events.to_vec();
        all.push(env(
            2,
            SessionEnded {
                session_id: session,
                user: alice(),
                full_jid: Some(full),
                protocol: Protocol::Sip,
                reason: SessionEndReason::Timeout,
                text: None,
            },
        ));
        assert_eq!(fold(&all).availability, Availability::Unavailable);
    }

    #[test]
    fn end_of_a_replaced_session_keeps_its_successor() {
        let c = fold(&[
            bound(0, "laptop", 1),
            device(1, "laptop", true, None, 0),
            bound(2, "laptop", 2),
            device(3, "laptop", true, None, 0),
            ended(4, "laptop", 1),
        ]);
        assert_eq!(c.availability, Availability::Available);
    }

    #[test]
    fn manual_overrides_system_presence() {
        let system = [
            device(1, "laptop", true, None, 0),
            line(2, "1001", LineState::OffHook),
            calendar(3, true),
            third(4, "webex", Some(Availability::InMeeting)),
        ];
        for (state, availability, show) in [
            (ManualState::Dnd, Availability::Dnd, Some(Show::Dnd)),
            (ManualState::Away, Availability::Away, Some(Show::Away)),
            (ManualState::Available, Availability::Available, None),
        ] {
            let mut events = system.to_vec();
            events.push(manual(5, state));
            let c = fold(&events);
            assert_eq!(c.availability, availability);
            assert_eq!(c.show, show);
            assert_eq!(c.status.as_deref(), Some("by hand"));
            assert!(c.sources.contains(&PresenceSource::Manual));
            assert!(c.sources.contains(&PresenceSource::Phone));
        }
    }

    #[test]
    fn invisible_shows_unavailable_and_leaks_nothing() {
        let c = fold(&[
            device(1, "laptop", true, None, 0),
            line(2, "1001", LineState::OffHook),
            manual(3, ManualState::Invisible),
        ]);
        assert_eq!(c.availability, Availability::Unavailable);
        assert_eq!(c.status, None);
        assert_eq!(c.sources, sources(&[PresenceSource::Manual]));
    }

    #[test]
    fn one_manual_status_at_a_time_and_clearing_restores_system_presence() {
        let c = fold(&[
            device(1, "laptop", true, None, 0),
            manual(2, ManualState::Dnd),
            manual(3, ManualState::Away),
        ]);
        assert_eq!(c.availability, Availability::Away);
        let c = fold(&[
            device(1, "laptop", true, None, 0),
            manual(2, ManualState::Dnd),
            env(
                3,
                ManualStatusCleared {
                    user: alice(),
                    reason: ManualStatusClearReason::UserCleared,
                },
            ),
        ]);
        assert_eq!(c.availability, Availability::Available);
        assert_eq!(c.sources, sources(&[PresenceSource::Device]));
    }

    #[test]
    fn last_device_gone_clears_the_manual_status() {
        let mut user = UserPresence::default();
        user.apply(&device(1, "laptop", true, None, 0));
        user.apply(&device(2, "phone", true, None, 0));
        user.apply(&manual(3, ManualState::Dnd));
        assert!(
            !user
                .apply(&device(4, "laptop", false, None, 0))
                .manual_cleared_by_sign_out
        );
        assert!(user.manual().is_some());
        assert!(
            user.apply(&device(5, "phone", false, None, 0))
                .manual_cleared_by_sign_out
        );
        assert!(user.manual().is_none());
        // A manual status set with no device stays until devices come and go.
        user.apply(&manual(6, ManualState::Away));
        assert!(user.manual().is_some());
        // The composer's own record of the clear changes nothing on reading.
        user.apply(&device(7, "laptop", true, None, 0));
        user.apply(&env(
            8,
            ManualStatusCleared {
                user: alice(),
                reason: ManualStatusClearReason::SignedOut,
            },
        ));
        assert!(user.manual().is_some());
    }

    #[test]
    fn expired_manual_statuses_are_listed_and_cleared_by_their_event() {
        let mut composer = Composer::default();
        composer.apply(&device(1, "laptop", true, None, 0));
        composer.apply(&env(
            2,
            ManualStatusSet {
                user: alice(),
                state: ManualState::Dnd,
                text: None,
                expires_at: Some(at(1000)),
            },
        ));
        assert!(composer.expired(at(999)).is_empty());
        assert_eq!(composer.expired(at(1000)), vec![(alice(), at(2))]);
        // Still composed until the clear is read back.
        assert_eq!(composer.compose(&alice()).availability, Availability::Dnd);
        composer.apply(&env(
            1001,
            ManualStatusCleared {
                user: alice(),
                reason: ManualStatusClearReason::Expired,
            },
        ));
        assert!(composer.expired(at(5000)).is_empty());
        assert_eq!(
            composer.compose(&alice()).availability,
            Availability::Available
        );
        // Without an expiry nothing expires.
        composer.apply(&manual(1002, ManualState::Away));
        assert!(composer.expired(at(i64::from(i32::MAX))).is_empty());
    }

    #[test]
    fn a_late_session_end_does_not_clear_a_newer_manual_status() {
        let mut user = UserPresence::default();
        user.apply(&bound(0, "laptop", 1));
        user.apply(&device(1, "laptop", true, None, 0));
        user.apply(&manual(5, ManualState::Dnd));
        assert!(
            !user
                .apply(&ended(3, "laptop", 1))
                .manual_cleared_by_sign_out
        );
        assert!(user.manual().is_some());
    }

    #[test]
    fn phone_in_call_means_on_the_phone() {
        for state in [LineState::OffHook, LineState::Ringing, LineState::Held] {
            let c = fold(&[
                device(1, "laptop", true, None, 0),
                calendar(2, true),
                line(3, "1001", state),
            ]);
            assert_eq!(c.availability, Availability::OnCall);
            assert_eq!(c.show, Some(Show::Dnd));
            assert_eq!(c.status.as_deref(), Some(ON_THE_PHONE));
        }
        // Per line: one line back on hook leaves the other in its call.
        let c = fold(&[
            device(1, "laptop", true, None, 0),
            line(2, "1001", LineState::OffHook),
            line(3, "1002", LineState::OffHook),
            line(4, "1001", LineState::OnHook),
        ]);
        assert_eq!(c.availability, Availability::OnCall);
        let c = fold(&[
            device(1, "laptop", true, None, 0),
            line(2, "1001", LineState::OffHook),
            line(4, "1001", LineState::OnHook),
        ]);
        assert_eq!(c.availability, Availability::Available);
        assert_eq!(c.sources, sources(&[PresenceSource::Device]));
    }

    #[test]
    fn third_party_beats_calendar_and_cannot_sign_in_or_out() {
        let c = fold(&[
            device(1, "laptop", true, None, 0),
            calendar(2, true),
            third(3, "zoom", Some(Availability::Away)),
            third(4, "webex", Some(Availability::Dnd)),
        ]);
        assert_eq!(c.availability, Availability::Dnd);
        assert_eq!(c.status.as_deref(), Some("webex says so"));
        let c = fold(&[
            device(1, "laptop", true, None, 0),
            third(3, "zoom", Some(Availability::Away)),
        ]);
        assert_eq!(
            (c.availability, c.show),
            (Availability::Away, Some(Show::Away))
        );
        let c = fold(&[
            device(1, "laptop", true, None, 0),
            third(3, "zoom", Some(Availability::Unavailable)),
        ]);
        assert_eq!(c.availability, Availability::Available);
        let c = fold(&[third(3, "zoom", Some(Availability::Available))]);
        assert_eq!(c.availability, Availability::Unavailable);
        let c = fold(&[
            device(1, "laptop", true, None, 0),
            third(3, "zoom", Some(Availability::Dnd)),
            third(4, "zoom", None),
        ]);
        assert_eq!(c.availability, Availability::Available);
    }

    #[test]
    fn calendar_busy_means_in_a_meeting() {
        let c = fold(&[device(1, "laptop", true, None, 0), calendar(2, true)]);
        assert_eq!(c.availability, Availability::InMeeting);
        assert_eq!(c.status.as_deref(), Some(IN_A_MEETING));
        assert_eq!(
            c.sources,
            sources(&[PresenceSource::Device, PresenceSource::Calendar])
        );
        let c = fold(&[
            device(1, "laptop", true, None, 0),
            calendar(2, true),
            calendar(3, false),
        ]);
        assert_eq!(c.availability, Availability::Available);
    }

    #[test]
    fn system_inputs_without_a_device_are_unavailable() {
        let c = fold(&[line(2, "1001", LineState::OffHook), calendar(3, true)]);
        assert_eq!(c.availability, Availability::Unavailable);
    }

    #[test]
    fn throttle_passes_the_first_change_and_coalesces_a_burst() {
        let user = alice();
        let mut t = Throttle::new(Duration::from_secs(1));
        let ms = Duration::from_millis;
        assert_eq!(t.offer(&user, 1, ms(0)), Some(1));
        assert_eq!(t.offer(&user, 2, ms(100)), None);
        assert_eq!(t.offer(&user, 3, ms(200)), None);
        assert_eq!(t.next_due(), Some(ms(1000)));
        assert!(t.due(ms(999)).is_empty());
        assert_eq!(t.due(ms(1000)), vec![(user.clone(), 3)]);
        assert_eq!(t.next_due(), None);
        // A burst that returns to the sent state sends nothing.
        assert_eq!(t.offer(&user, 4, ms(1100)), None);
        assert_eq!(t.offer(&user, 3, ms(1200)), None);
        assert!(t.due(ms(5000)).is_empty());
        // After a quiet interval a change passes at once; the same state
        // again sends nothing.
        assert_eq!(t.offer(&user, 5, ms(5000)), Some(5));
        assert_eq!(t.offer(&user, 5, ms(9000)), None);
        // A seeded state counts as sent.
        t.seed(&user, 7);
        assert_eq!(t.offer(&user, 7, ms(9001)), None);
        assert_eq!(t.offer(&user, 8, ms(9002)), Some(8));
        // Zero interval: everything passes.
        let mut t = Throttle::new(Duration::ZERO);
        assert_eq!(t.offer(&user, 1, ms(0)), Some(1));
        assert_eq!(t.offer(&user, 2, ms(0)), Some(2));
        assert_eq!(t.offer(&user, 1, ms(0)), Some(1));
    }

    #[test]
    fn throttle_is_per_user() {
        let (a, b) = (alice(), BareJid::new("bob@example.com"));
        let mut t = Throttle::new(Duration::from_secs(1));
        assert_eq!(t.offer(&a, 1, Duration::ZERO), Some(1));
        assert_eq!(t.offer(&b, 1, Duration::ZERO), Some(1));
        assert_eq!(t.offer(&a, 2, Duration::from_millis(10)), None);
        assert_eq!(t.offer(&b, 2, Duration::from_millis(2000)), Some(2));
    }

    fn arb_event() -> impl Strategy<Value = Envelope> {
        let resource = prop::sample::select(vec!["a", "b", "c"]);
        let show = prop::option::of(prop::sample::select(vec![
            Show::Away,
            Show::Dnd,
            Show::Xa,
            Show::Chat,
        ]));
        let ms = 0i64..50;
        prop_oneof![
            (ms.clone(), resource.clone(), any::<bool>(), show, -2i8..3)
                .prop_map(|(t, r, a, s, p)| device(t, r, a, s, p)),
            (ms.clone(), resource.clone(), 0u128..3).prop_map(|(t, r, s)| bound(t, r, s)),
            (ms.clone(), resource, 0u128..3).prop_map(|(t, r, s)| ended(t, r, s)),
            (
                ms.clone(),
                prop::sample::select(vec![
                    ManualState::Available,
                    ManualState::Away,
                    ManualState::Dnd,
                    ManualState::Invisible
                ])
            )
                .prop_map(|(t, s)| manual(t, s)),
            ms.clone().prop_map(|t| env(
                t,
                ManualStatusCleared {
                    user: alice(),
                    reason: ManualStatusClearReason::UserCleared
                }
            )),
            (
                ms.clone(),
                prop::sample::select(vec!["1", "2"]),
                prop::sample::select(vec![
                    LineState::OnHook,
                    LineState::OffHook,
                    LineState::Ringing
                ])
            )
                .prop_map(|(t, l, s)| line(t, l, s)),
            (ms.clone(), any::<bool>()).prop_map(|(t, b)| calendar(t, b)),
            (
                ms,
                prop::sample::select(vec!["x", "y"]),
                prop::option::of(prop::sample::select(vec![
                    Availability::Dnd,
                    Availability::Away,
                    Availability::InMeeting
                ]))
            )
                .prop_map(|(t, a, v)| third(t, a, v)),
        ]
    }

    proptest! {
        /// One-by-one, batched (any split points) and all-at-once folds give
        /// the same state and composed presence.
        #[test]
        fn batching_does_not_change_the_result(
            events in prop::collection::vec(arb_event(), 0..40),
            cuts in prop::collection::vec(0usize..40, 0..6),
        ) {
            let mut one_by_one = Composer::default();
            let mut after_each = Vec::new();
            for e in &events {
                one_by_one.apply(e);
                after_each.push(one_by_one.compose(&alice()));
            }

            let mut batched = Composer::default();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(events.len())).collect();
            cuts.push(events.len());
            cuts.sort_unstable();
            let mut start = 0;
            for cut in cuts {
                for e in &events[start..cut] {
                    batched.apply(e);
                }
                if cut > 0 {
                    prop_assert_eq!(&batched.compose(&alice()), &after_each[cut - 1]);
                }
                start = cut;
            }

            let mut all_at_once = Composer::default();
            events.iter().for_each(|e| { all_at_once.apply(e); });

            prop_assert_eq!(&one_by_one, &batched);
            prop_assert_eq!(&one_by_one, &all_at_once);
            prop_assert_eq!(one_by_one.compose(&alice()), all_at_once.compose(&alice()));
        }
    }
}
