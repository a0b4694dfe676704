//! Cache admission: which misses are worth caching. Pure logic.

/// Admits a key to a cache on its second miss. Caching costs a fresh
/// snapshot, an insert and, once the cache is full, an eviction; a key seen
/// once (a crawl, traffic spread over more links than fit) never pays it back.
/// One slot per hash bucket remembers the last miss there, so memory is fixed
/// and a key asked for again soon is admitted.
pub struct Doorkeeper {
    seen: Box<[u64]>,
}

impl Doorkeeper {
    pub const SLOTS: usize = 4096;

    /// Whether `key` missed before (and was not displaced since); remembers it either way.
    pub fn admit(&mut self, key: u64) -> bool {
        let slot = &mut self.seen[key as usize % Self::SLOTS];
        let again = *slot == key;
        *slot = key;
        again
    }
}

impl Default for Doorkeeper {
    fn default() -> Self {
        Doorkeeper {
            seen: vec![0; Self::SLOTS].into_boxed_slice(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Doorkeeper;

    #[test]
    fn doorkeeper_admits_a_key_on_its_second_miss() {
        let mut door = Doorkeeper::default();
        assert!(!door.admit(42));
        assert!(door.admit(42));
        assert!(
            door.admit(42),
            "still remembered while nothing else lands in its slot"
        );
    }

    #[test]
    fn doorkeeper_forgets_a_key_when_another_takes_its_slot() {
        let mut door = Doorkeeper::default();
        let rival = 42 + Doorkeeper::SLOTS as u64;
        assert!(!door.admit(42));
        assert!(!door.admit(rival));
        assert!(!door.admit(42), "the rival replaced it");
        assert!(!door.admit(7), "another slot: a first miss");
    }
}
