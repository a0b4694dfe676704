//! Cache admission: which misses are worth caching. Pure logic.

/// Admits a key to a cache on its second miss. Caching costs a fresh
/// snapshot, an insert and, once the cache is full, an eviction; a key seen
/// once (a crawl, traffic spread over more links than fit) never pays it back.
/// Memory is fixed: each key may be remembered in one of two slots (from the
/// two halves of its hash), so two keys asked for in turn that share one slot
/// are both admitted. With one slot, about a fifth of a thousand hot links
/// shared theirs with another and, asked for in turn, were never admitted.
pub struct Doorkeeper {
    seen: Box<[u64]>,
}

impl Doorkeeper {
    pub const SLOTS: usize = 4096;

    /// Whether `key` missed before (and was not displaced since); remembers it either way.
    pub fn admit(&mut self, key: u64) -> bool {
        let first = key as usize % Self::SLOTS;
        let second = (key >> 32) as usize % Self::SLOTS;
        if self.seen[first] == key || self.seen[second] == key {
            return true;
        }
        // Where it displaces nothing, if it can.
        let slot = if self.seen[first] != 0 && self.seen[second] == 0 {
            second
        } else {
            first
        };
        self.seen[slot] = key;
        false
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

    /// A key whose two slots are `first` and `second`.
    fn key(first: u64, second: u64) -> u64 {
        first | second << 32
    }

    #[test]
    fn doorkeeper_admits_a_key_on_its_second_miss() {
        let mut door = Doorkeeper::default();
        assert!(!door.admit(key(42, 1)));
        assert!(door.admit(key(42, 1)));
        assert!(
            door.admit(key(42, 1)),
            "still remembered while nothing else lands in its slots"
        );
    }

    #[test]
    fn doorkeeper_admits_two_keys_asked_for_in_turn_that_share_a_slot() {
        let mut door = Doorkeeper::default();
        let (one, rival) = (key(42, 1), key(42, 2));
        assert!(!door.admit(one));
        assert!(!door.admit(rival));
        assert!(door.admit(one), "the rival took its other slot");
        assert!(door.admit(rival));
    }

    #[test]
    fn doorkeeper_forgets_a_key_when_others_take_both_its_slots() {
        let mut door = Doorkeeper::default();
        let one = key(42, 1);
        assert!(!door.admit(one));
        assert!(!door.admit(key(1, 0)), "takes the key's second slot");
        assert!(!door.admit(key(42, 1 + Doorkeeper::SLOTS as u64)), "both full: takes its first");
        assert!(!door.admit(one), "forgotten");
        assert!(!door.admit(key(7, 3)), "other slots: a first miss");
    }
}
