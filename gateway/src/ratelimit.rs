//! Limits on failed logins per remote address and per account (SPEC.md
//! §13), sans-IO: callers pass the current instant.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `max` failures per key in any `window`.
#[derive(Debug)]
struct Windows<K> {
    max: usize,
    window: Duration,
    failures: HashMap<K, VecDeque<Instant>>,
}

impl<K: Hash + Eq + Clone> Windows<K> {
    fn new(max: usize, window: Duration) -> Self {
        Self {
            max,
            window,
            failures: HashMap::new(),
        }
    }

    fn prune(&mut self, key: &K, now: Instant) -> usize {
        let Some(times) = self.failures.get_mut(key) else {
            return 0;
        };
        while times
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.window)
        {
            times.pop_front();
        }
        let n = times.len();
        if n == 0 {
            self.failures.remove(key);
        }
        n
    }

    fn limited(&mut self, key: &K, now: Instant) -> bool {
        self.max > 0 && self.prune(key, now) >= self.max
    }

    fn record(&mut self, key: K, now: Instant) {
        self.prune(&key, now);
        let times = self.failures.entry(key).or_default();
        times.push_back(now);
        while times.len() > self.max.max(1) {
            times.pop_front();
        }
    }
}

/// Failed-login limits shared by every connection of a node.
#[derive(Debug)]
pub struct LoginLimiter {
    by_address: Mutex<Windows<IpAddr>>,
    by_account: Mutex<Windows<String>>,
}

/// What is limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limited {
    /// Too many failures from this address.
    Address,
    /// Too many failures for this account.
    Account,
}

impl LoginLimiter {
    /// At most `per_address` failures per address and `per_account` per
    /// account in any `window`; 0 switches a limit off.
    pub fn new(per_address: usize, per_account: usize, window: Duration) -> Self {
        Self {
            by_address: Mutex::new(Windows::new(per_address, window)),
            by_account: Mutex::new(Windows::new(per_account, window)),
        }
    }

    /// Whether a login attempt from `address` (for `account`, once known)
    /// must be refused now.
    pub fn check(
        &self,
        address: IpAddr,
        account: Option<&str>,
        now: Instant,
    ) -> Result<(), Limited> {
        if self
            .by_address
            .lock()
            .expect("limiter lock")
            .limited(&address, now)
        {
            return Err(Limited::Address);
        }
        if let Some(account) = account
            && self
                .by_account
                .lock()
                .expect("limiter lock")
                .limited(&account.to_owned(), now)
        {
            return Err(Limited::Account);
        }
        Ok(())
    }

    /// Records a failed login.
    pub fn failed(&self, address: IpAddr, account: Option<&str>, now: Instant) {
        self.by_address
            .lock()
            .expect("limiter lock")
            .record(address, now);
        if let Some(account) = account {
            self.by_account
                .lock()
                .expect("limiter lock")
                .record(account.to_owned(), now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn address_limit_at_exactly_max_and_expiry() {
        let l = LoginLimiter::new(3, 0, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..2 {
            l.failed(A, None, t0 + Duration::from_secs(i));
        }
        assert_eq!(l.check(A, None, t0 + Duration::from_secs(2)), Ok(()));
        l.failed(A, None, t0 + Duration::from_secs(2));
        assert_eq!(
            l.check(A, None, t0 + Duration::from_secs(3)),
            Err(Limited::Address)
        );
        assert_eq!(l.check(B, None, t0 + Duration::from_secs(3)), Ok(()));
        // The first failure leaves the window at t0 + 60 s.
        assert_eq!(l.check(A, None, t0 + Duration::from_secs(60)), Ok(()));
    }

    #[test]
    fn account_limit_spans_addresses() {
        let l = LoginLimiter::new(0, 2, Duration::from_secs(60));
        let t0 = Instant::now();
        l.failed(A, Some("alice@example.com"), t0);
        l.failed(B, Some("alice@example.com"), t0);
        assert_eq!(
            l.check(B, Some("alice@example.com"), t0),
            Err(Limited::Account)
        );
        assert_eq!(l.check(B, Some("bob@example.com"), t0), Ok(()));
        assert_eq!(l.check(A, None, t0), Ok(()), "address limit is off");
    }
}
