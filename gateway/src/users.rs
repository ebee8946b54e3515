//! The user directory: the latest record of every user, folded from the
//! compacted `users` topic. Gateways authenticate against it; the
//! administration commands check it before they change a user.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use switchboard_infra::bus::{Bus, BusError, Consumer, ConsumerConfig, Polled};
use switchboard_schemas::events::UserState;
use switchboard_schemas::{Envelope, Event};
use tokio::sync::RwLock;

/// Errors while loading the directory.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The topic did not reach its end in time.
    #[error("the users topic was not read to its end within {0:?}")]
    Timeout(Duration),
}

/// Every user's latest record, by normalised bare address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserDirectory {
    users: BTreeMap<String, UserState>,
    /// Offset of the record each user's state came from: a record is applied
    /// only if newer, so a writer that applies its own write at once (read
    /// your writes) is not undone by a follower still reading older ones.
    offsets: HashMap<String, i64>,
}

impl UserDirectory {
    /// Applies one record of the `users` topic: a `user.state` event sets
    /// the user, a tombstone (no value) removes the user named by the key.
    /// Records that do not decode are skipped with a warning: one bad record
    /// must not lock every user out.
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>, offset: i64) {
        let name = String::from_utf8_lossy(key).into_owned();
        if self.offsets.get(&name).is_some_and(|o| *o >= offset) {
            return;
        }
        self.offsets.insert(name.clone(), offset);
        let Some(value) = value else {
            self.users.remove(&name);
            return;
        };
        match Envelope::from_json_slice(value) {
            Ok(Envelope {
                event: Event::UserState(state),
                ..
            }) => {
                self.users.insert(state.user.as_str().to_owned(), state);
            }
            Ok(other) => {
                tracing::warn!(
                    event = other.event.event_type(),
                    "unexpected event on users topic"
                );
            }
            Err(e) => tracing::warn!(error = %e, "undecodable record on users topic"),
        }
    }

    /// The user with this normalised bare address.
    pub fn get(&self, bare: &str) -> Option<&UserState> {
        self.users.get(bare)
    }

    /// The SIP digest secret (HA1, RFC 3261 §22.4) of an enabled or
    /// disabled user for this algorithm and realm.
    pub fn digest_ha1(
        &self,
        bare: &str,
        algorithm: &switchboard_schemas::events::DigestAlgorithm,
        realm: &str,
    ) -> Option<&str> {
        self.users
            .get(bare)?
            .digest
            .iter()
            .find(|d| &d.algorithm == algorithm && d.realm == realm)
            .map(|d| d.ha1_hex.as_str())
    }

    /// All users in address order.
    pub fn iter(&self) -> impl Iterator<Item = &UserState> {
        self.users.values()
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Reads the `users` topic from the beginning to its current end.
    pub async fn load(bus: &dyn Bus, topic: &str, limit: Duration) -> Result<Self, DirectoryError> {
        let mut directory = Self::default();
        let consumer = catch_up(bus, topic, limit, &mut directory).await?;
        consumer.close().await?;
        Ok(directory)
    }

    /// Loads the directory, then keeps it up to date from the topic in a
    /// background task (until the returned directory is dropped everywhere).
    pub async fn follow(
        bus: Arc<dyn Bus>,
        topic: &str,
        limit: Duration,
    ) -> Result<Arc<RwLock<Self>>, DirectoryError> {
        let mut directory = Self::default();
        let mut consumer = catch_up(&*bus, topic, limit, &mut directory).await?;
        let shared = Arc::new(RwLock::new(directory));
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                let polled = consumer.poll(Duration::from_secs(1)).await;
                let Some(shared) = weak.upgrade() else {
                    break;
                };
                match polled {
                    Ok(Polled::Records(records)) => {
                        let mut directory = shared.write().await;
                        for r in records {
                            directory.apply(&r.key, r.value.as_deref(), r.offset);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "following the users topic");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            let _ = consumer.close().await;
        });
        Ok(shared)
    }
}

/// Reads `topic` from the beginning to its end as of the call into
/// `directory`; returns the consumer, positioned after what it read.
async fn catch_up(
    bus: &dyn Bus,
    topic: &str,
    limit: Duration,
    directory: &mut UserDirectory,
) -> Result<Box<dyn Consumer>, DirectoryError> {
    let ends = bus.end_offsets(topic).await?;
    let group = format!("switchboard-users-reader-{}", uuid::Uuid::now_v7().simple());
    let mut consumer = bus.consumer(ConsumerConfig::new(group, &[topic])).await?;
    let mut positions = vec![0i64; ends.len()];
    let deadline = tokio::time::Instant::now() + limit;
    let caught_up = |positions: &[i64]| positions.iter().zip(&ends).all(|(p, e)| p >= e);
    while !caught_up(&positions) {
        if tokio::time::Instant::now() >= deadline {
            let _ = consumer.close().await;
            return Err(DirectoryError::Timeout(limit));
        }
        if let Polled::Records(records) = consumer.poll(Duration::from_millis(200)).await? {
            for r in records {
                if let Some(p) = positions.get_mut(r.partition as usize) {
                    *p = (*p).max(r.offset + 1);
                }
                directory.apply(&r.key, r.value.as_deref(), r.offset);
            }
        }
    }
    Ok(consumer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_schemas::{BareJid, NodeId};

    fn state(user: &str, enabled: bool) -> Vec<u8> {
        Envelope::new(
            NodeId::new("n1"),
            user,
            UserState {
                user: BareJid::new(user),
                display_name: None,
                locale: None,
                enabled,
                credentials: Vec::new(),
                digest: Vec::new(),
            },
        )
        .to_json_vec()
        .unwrap()
    }

    #[test]
    fn latest_record_wins_and_tombstone_removes() {
        let mut d = UserDirectory::default();
        let alice = "alice@example.com";
        d.apply(alice.as_bytes(), Some(&state(alice, true)), 0);
        d.apply(b"bob@example.com", Some(&state("bob@example.com", true)), 0);
        d.apply(alice.as_bytes(), Some(&state(alice, false)), 1);
        assert!(!d.get(alice).unwrap().enabled);
        // An older record read late does not undo a newer one.
        d.apply(alice.as_bytes(), Some(&state(alice, true)), 0);
        assert!(!d.get(alice).unwrap().enabled);
        d.apply(b"bob@example.com", None, 1);
        assert!(d.get("bob@example.com").is_none());
        assert_eq!(d.len(), 1);
        d.apply(b"carol@example.com", Some(b"not json"), 0);
        assert_eq!(d.len(), 1);
    }
}
