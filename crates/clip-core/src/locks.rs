//! One mutex per key (an image id, a tree), made on first use and forgotten once nobody holds
//! or waits for it, so a long-running service does not keep one per key it ever saw.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

/// Mutexes by key.
#[derive(Debug)]
pub struct KeyedLocks<K>(Mutex<HashMap<K, Arc<Mutex<()>>>>);

impl<K> Default for KeyedLocks<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    /// The mutex of `key` (lock it to serialise work on that key).
    pub fn get(&self, key: &K) -> Arc<Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Held or awaited elsewhere only when someone else has a clone.
        map.retain(|_, l| Arc::strong_count(l) > 1);
        Arc::clone(map.entry(key.clone()).or_default())
    }

    /// How many keys have a mutex now.
    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether no key has a mutex.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn one_mutex_per_key_and_none_kept_for_keys_nobody_uses() {
        let locks = KeyedLocks::default();
        let a = locks.get(&"a".to_owned());
        assert!(
            Arc::ptr_eq(&a, &locks.get(&"a".to_owned())),
            "same key, same mutex"
        );
        assert!(!Arc::ptr_eq(&a, &locks.get(&"b".to_owned())));
        for i in 0..100 {
            drop(locks.get(&format!("k{i}")));
        }
        let _g = a.lock().unwrap();
        drop(locks.get(&"c".to_owned()));
        assert_eq!(
            locks.len(),
            2,
            "only `a` (held) and the one just handed out"
        );
    }
}
