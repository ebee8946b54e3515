//! RFC 3903: the event state compositor's publications. Every successful
//! PUBLISH gets a new entity-tag (`SIP-ETag`, §4.1); a refresh or
//! modification names the current one in `SIP-If-Match` (§4.2); an unknown
//! tag is `412 Conditional Request Failed` (§6 step 4); Expires 0 removes
//! the publication (§4.5).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What a publication is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A device's presence (its full address).
    Device(String),
    /// A phone line appearance (SPEC.md §5).
    Line(String),
}

/// One publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The publishing user, `user@domain`.
    pub aor: String,
    /// Its current entity-tag.
    pub etag: String,
    /// What it publishes for.
    pub target: Target,
    /// When it lapses.
    pub expires_at: Instant,
}

/// `SIP-If-Match` named no live publication of this user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownEtag;

/// The publications of this node.
#[derive(Debug, Default)]
pub struct Publications {
    by_etag: HashMap<String, Publication>,
}

fn new_etag() -> String {
    let mut bytes = [0u8; 12];
    getrandom::fill(&mut bytes).expect("random etag");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Publications {
    /// An initial publication (no `SIP-If-Match`); returns it with its tag.
    pub fn create(
        &mut self,
        aor: &str,
        target: Target,
        expires_secs: u32,
        now: Instant,
    ) -> Publication {
        let p = Publication {
            aor: aor.to_owned(),
            etag: new_etag(),
            target,
            expires_at: now + Duration::from_secs(u64::from(expires_secs)),
        };
        self.by_etag.insert(p.etag.clone(), p.clone());
        p
    }

    /// A refresh or modification of the publication tagged `etag`: a new
    /// tag and expiry; `target` replaces the old one when given.
    pub fn update(
        &mut self,
        aor: &str,
        etag: &str,
        target: Option<Target>,
        expires_secs: u32,
        now: Instant,
    ) -> Result<(Publication, Publication), UnknownEtag> {
        let old = match self.by_etag.get(etag) {
            Some(p) if p.aor == aor && p.expires_at > now => self.by_etag.remove(etag),
            _ => None,
        }
        .ok_or(UnknownEtag)?;
        let p = Publication {
            aor: aor.to_owned(),
            etag: new_etag(),
            target: target.unwrap_or_else(|| old.target.clone()),
            expires_at: now + Duration::from_secs(u64::from(expires_secs)),
        };
        self.by_etag.insert(p.etag.clone(), p.clone());
        Ok((old, p))
    }

    /// The live publication of `aor` tagged `etag`.
    pub fn get(&self, aor: &str, etag: &str) -> Option<&Publication> {
        self.by_etag.get(etag).filter(|p| p.aor == aor)
    }

    /// Removes the publication tagged `etag` (Expires 0).
    pub fn remove(&mut self, aor: &str, etag: &str) -> Result<Publication, UnknownEtag> {
        match self.by_etag.get(etag) {
            Some(p) if p.aor == aor => self.by_etag.remove(etag).ok_or(UnknownEtag),
            _ => Err(UnknownEtag),
        }
    }

    /// Removes and returns publications that lapsed by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Publication> {
        let lapsed: Vec<String> = self
            .by_etag
            .values()
            .filter(|p| p.expires_at <= now)
            .map(|p| p.etag.clone())
            .collect();
        lapsed
            .iter()
            .filter_map(|e| self.by_etag.remove(e))
            .collect()
    }

    /// Number of publications.
    pub fn len(&self) -> usize {
        self.by_etag.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_etag.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_lifecycle() {
        let mut p = Publications::default();
        let now = Instant::now();
        let dev = Target::Device("alice@example.com/sip-1".into());
        let first = p.create("alice@example.com", dev.clone(), 60, now);
        // Refresh: a new tag; the old one is gone.
        let (old, second) = p
            .update("alice@example.com", &first.etag, None, 60, now)
            .unwrap();
        assert_eq!(old.etag, first.etag);
        assert_ne!(second.etag, first.etag);
        assert_eq!(second.target, dev);
        assert_eq!(
            p.update("alice@example.com", &first.etag, None, 60, now),
            Err(UnknownEtag)
        );
        // Another user cannot touch it.
        assert_eq!(
            p.remove("mallory@example.com", &second.etag),
            Err(UnknownEtag)
        );
        assert_eq!(
            p.update("mallory@example.com", &second.etag, None, 60, now),
            Err(UnknownEtag)
        );
        // Expired: unknown to refreshes, and removed by expiry.
        let later = now + Duration::from_secs(61);
        assert_eq!(
            p.update("alice@example.com", &second.etag, None, 60, later),
            Err(UnknownEtag)
        );
        assert_eq!(p.expire(later).len(), 1);
        assert!(p.is_empty());
        let third = p.create("alice@example.com", dev, 60, now);
        assert_eq!(
            p.remove("alice@example.com", &third.etag).unwrap().etag,
            third.etag
        );
        assert_eq!(p.remove("alice@example.com", &third.etag), Err(UnknownEtag));
    }
}
