//! At most so many a second: a budget that starts over each second. For
//! events a flood could otherwise multiply (`link.miss` from a scanner).
//! Pure logic.

#[derive(Debug, Default, Clone, Copy)]
pub struct PerSecond {
    second: i64,
    used: i64,
}

impl PerSecond {
    /// How many of `limit` are left in the second `now_second`.
    pub fn remaining(&mut self, limit: i64, now_second: i64) -> i64 {
        if now_second != self.second {
            self.second = now_second;
            self.used = 0;
        }
        (limit - self.used).max(0)
    }

    /// Counts `n` against the current second.
    pub fn spend(&mut self, n: i64) {
        self.used += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_s_budget_is_spent_once_and_starts_over_the_next_second() {
        let mut budget = PerSecond::default();
        assert_eq!(budget.remaining(100, 7), 100);
        budget.spend(60);
        assert_eq!(budget.remaining(100, 7), 40);
        budget.spend(40);
        assert_eq!(budget.remaining(100, 7), 0);
        assert_eq!(budget.remaining(100, 8), 100);
    }
}
