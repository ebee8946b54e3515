//! A map kept as a sorted vector, for per-user state that holds a handful
//! of entries (a user's devices, sessions, phone lines): iteration in key
//! order like a `BTreeMap` (folds stay deterministic), but no tree node per
//! map. A `BTreeMap` allocates a node with room for eleven entries at its
//! first insert; a user with one device paid for eleven, twice (devices
//! and sessions). Lookups are binary searches; inserts and removals move
//! the entries after them, which is cheap at these sizes.

use std::borrow::Borrow;

/// A sorted-vector map; capacity grows one entry at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmallMap<K, V> {
    entries: Vec<(K, V)>,
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<K: Ord, V> SmallMap<K, V> {
    fn find<Q>(&self, key: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.entries.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    /// The value of `key`.
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    /// Sets `key` to `value`; returns the value it had.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.entries.reserve_exact(1);
                self.entries.insert(i, (key, value));
                None
            }
        }
    }

    /// The value of `key`, inserted from `default` when missing.
    pub fn get_or_insert_with(&mut self, key: K, default: impl FnOnce() -> V) -> &mut V {
        let i = match self.find(&key) {
            Ok(i) => i,
            Err(i) => {
                self.entries.reserve_exact(1);
                self.entries.insert(i, (key, default()));
                i
            }
        };
        &mut self.entries[i].1
    }

    /// Removes `key`; returns its value.
    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Ord + ?Sized,
    {
        let i = self.find(key).ok()?;
        let (_, value) = self.entries.remove(i);
        if self.entries.is_empty() {
            self.entries = Vec::new();
        }
        Some(value)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    /// Values in key order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// The same operations on a `BTreeMap` and a `SmallMap` leave the
        /// same entries in the same order.
        #[test]
        fn behaves_like_a_btreemap(ops in prop::collection::vec((any::<bool>(), 0u8..16, any::<u16>()), 0..200)) {
            let mut tree = BTreeMap::new();
            let mut small = SmallMap::default();
            for (insert, k, v) in ops {
                if insert {
                    prop_assert_eq!(tree.insert(k, v), small.insert(k, v));
                } else {
                    prop_assert_eq!(tree.remove(&k), small.remove(&k));
                }
                prop_assert_eq!(tree.get(&k), small.get(&k));
                prop_assert_eq!(tree.len(), small.len());
            }
            let a: Vec<(u8, u16)> = tree.into_iter().collect();
            let b: Vec<(u8, u16)> = small.iter().map(|(k, v)| (*k, *v)).collect();
            prop_assert_eq!(a, b);
        }
    }

    #[test]
    fn get_or_insert_with_keeps_an_existing_value() {
        let mut m = SmallMap::default();
        *m.get_or_insert_with("b", || 1) += 10;
        *m.get_or_insert_with("b", || 100) += 1;
        *m.get_or_insert_with("a", || 5) += 0;
        assert_eq!(m.iter().collect::<Vec<_>>(), [(&"a", &5), (&"b", &12)]);
    }
}
