//! RFC 3261 §17.2.2: non-INVITE server transactions, matched per §17.2.3
//! (branch, sent-by, method). A retransmitted request is never executed
//! twice: while the transaction is Trying it is absorbed, once a final
//! response exists (Completed) it gets that response again, until Timer J
//! (64·T1 over UDP, zero over reliable transports) ends the transaction.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// RFC 3261 §17.1.1.1: T1, the round-trip estimate.
pub const T1: Duration = Duration::from_millis(500);
/// RFC 3261 §17.2.2: Timer J over unreliable transports.
pub const TIMER_J: Duration = Duration::from_secs(32);

/// A transaction key (RFC 3261 §17.2.3): the top Via's branch and sent-by,
/// and the method (CSeq method; ACK is never a non-INVITE transaction).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// The branch (with the `z9hG4bK` magic cookie), or for pre-RFC 3261
    /// clients the Call-ID, From tag and CSeq (§17.2.3's fallback).
    pub branch: String,
    /// The Via sent-by.
    pub sent_by: String,
    /// The method.
    pub method: String,
}

impl Key {
    /// The key of a request.
    pub fn of(req: &super::message::Request) -> Self {
        let branch = match &req.via.branch {
            Some(b) if b.starts_with("z9hG4bK") => b.clone(),
            _ => format!(
                "{}|{}|{}",
                req.call_id,
                req.from.tag.as_deref().unwrap_or(""),
                req.cseq
            ),
        };
        Self {
            branch,
            sent_by: req.via.sent_by.to_ascii_lowercase(),
            method: req.method.to_string(),
        }
    }
}

#[derive(Debug)]
enum State {
    /// Received, no final response yet (RFC 3261 §17.2.2 Trying).
    Trying,
    /// A final response was sent; retransmissions get it again.
    Completed { response: Vec<u8>, until: Instant },
}

/// What to do with an arriving request.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// A new transaction: execute the request.
    New,
    /// A retransmission while the request is being executed: drop it
    /// (RFC 3261 §17.2.2: no provisional response was sent).
    Absorbed,
    /// A retransmission after the final response: send it again.
    Retransmit(Vec<u8>),
}

/// The server transactions of one gateway node.
#[derive(Debug, Default)]
pub struct Transactions {
    table: HashMap<Key, State>,
    /// Completed transactions in the order their Timer J fires (Timer J is
    /// constant, so completion order is expiry order): expiry pops from the
    /// front instead of scanning the table.
    timers: VecDeque<(Instant, Key)>,
}

impl Transactions {
    /// Matches an arriving request (RFC 3261 §17.2.3).
    pub fn arrive(&mut self, key: &Key) -> Arrival {
        match self.table.get(key) {
            None => {
                self.table.insert(key.clone(), State::Trying);
                Arrival::New
            }
            Some(State::Trying) => Arrival::Absorbed,
            Some(State::Completed { response, .. }) => Arrival::Retransmit(response.clone()),
        }
    }

    /// Records the final response (Trying → Completed). Over a reliable
    /// transport Timer J is zero and the transaction ends at once.
    pub fn complete(&mut self, key: &Key, response: Vec<u8>, reliable: bool, now: Instant) {
        if reliable {
            self.table.remove(key);
        } else {
            let until = now + TIMER_J;
            self.table
                .insert(key.clone(), State::Completed { response, until });
            self.timers.push_back((until, key.clone()));
        }
    }

    /// Forgets a transaction without a response (its request was dropped).
    pub fn abandon(&mut self, key: &Key) {
        self.table.remove(key);
    }

    /// Ends transactions whose Timer J fired (Completed → Terminated).
    pub fn expire(&mut self, now: Instant) {
        while let Some((until, _)) = self.timers.front() {
            if *until > now {
                break;
            }
            let (until, key) = self.timers.pop_front().expect("front exists");
            // Only if it is still that completion (not a newer transaction
            // with the same key).
            if matches!(self.table.get(&key), Some(State::Completed { until: u, .. }) if *u == until)
            {
                self.table.remove(&key);
            }
        }
    }

    /// Live transactions.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(branch: &str) -> Key {
        Key {
            branch: branch.into(),
            sent_by: "10.0.0.1:5060".into(),
            method: "MESSAGE".into(),
        }
    }

    #[test]
    fn retransmissions_are_absorbed_then_answered_from_the_transaction() {
        let mut t = Transactions::default();
        let now = Instant::now();
        assert_eq!(t.arrive(&key("z9hG4bK1")), Arrival::New);
        assert_eq!(t.arrive(&key("z9hG4bK1")), Arrival::Absorbed);
        t.complete(
            &key("z9hG4bK1"),
            b"SIP/2.0 202 Accepted".to_vec(),
            false,
            now,
        );
        assert_eq!(
            t.arrive(&key("z9hG4bK1")),
            Arrival::Retransmit(b"SIP/2.0 202 Accepted".to_vec())
        );
        // Another branch is another transaction.
        assert_eq!(t.arrive(&key("z9hG4bK2")), Arrival::New);
        // Timer J ends the completed one; the Trying one stays.
        t.expire(now + TIMER_J - Duration::from_millis(1));
        assert_eq!(t.len(), 2);
        t.expire(now + TIMER_J);
        assert_eq!(t.len(), 1);
        assert_eq!(t.arrive(&key("z9hG4bK1")), Arrival::New);
    }

    #[test]
    fn reliable_transports_end_at_once() {
        let mut t = Transactions::default();
        assert_eq!(t.arrive(&key("z9hG4bK3")), Arrival::New);
        t.complete(&key("z9hG4bK3"), b"r".to_vec(), true, Instant::now());
        assert!(t.is_empty());
        assert_eq!(t.arrive(&key("z9hG4bK4")), Arrival::New);
        t.abandon(&key("z9hG4bK4"));
        assert!(t.is_empty());
    }
}
