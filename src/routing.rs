//! Which partition of a table partitioned by range on one timestamp holds a
//! value: what PostgreSQL's tuple routing does (`get_partition_for_tuple`),
//! for the queue's insert path, which writes rows without the executor.
//!
//! A range partition descriptor lists the distinct bounds in order, and for
//! each gap between them (and before the first, after the last) the partition
//! covering it, if any. A value belongs to the gap after the last bound not
//! above it.

/// One bound of a range partition, as the partition descriptor holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// `MINVALUE`: below every value.
    Min,
    /// A timestamp, in PostgreSQL's microseconds (±infinity are i64::MIN and MAX).
    Value(i64),
    /// `MAXVALUE`: above every value.
    Max,
}

impl Bound {
    fn at_or_below(self, value: i64) -> bool {
        match self {
            Bound::Min => true,
            Bound::Value(bound) => bound <= value,
            Bound::Max => false,
        }
    }
}

/// The gap of `bounds` (sorted, as the descriptor keeps them) that `value`
/// falls in: 0 below the first bound, `bounds.len()` at or above the last.
pub fn slot(bounds: &[Bound], value: i64) -> usize {
    bounds.partition_point(|b| b.at_or_below(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000_000;

    #[test]
    fn a_value_falls_in_the_gap_after_the_last_bound_not_above_it() {
        let bounds = [Bound::Value(0), Bound::Value(DAY), Bound::Value(2 * DAY)];
        assert_eq!(slot(&bounds, -1), 0);
        assert_eq!(slot(&bounds, 0), 1, "a lower bound is inclusive");
        assert_eq!(slot(&bounds, DAY - 1), 1);
        assert_eq!(slot(&bounds, DAY), 2, "an upper bound is exclusive");
        assert_eq!(slot(&bounds, 2 * DAY), 3);
    }

    #[test]
    fn minvalue_is_below_everything_and_maxvalue_above() {
        let bounds = [Bound::Min, Bound::Value(DAY), Bound::Max];
        assert_eq!(slot(&bounds, i64::MIN), 1);
        assert_eq!(slot(&bounds, DAY), 2);
        assert_eq!(slot(&bounds, i64::MAX), 2);
    }

    #[test]
    fn infinite_timestamps_are_ordinary_values() {
        let bounds = [Bound::Value(i64::MIN), Bound::Value(0)];
        assert_eq!(
            slot(&bounds, i64::MIN),
            1,
            "-infinity is in a range that starts at it"
        );
        assert_eq!(slot(&bounds, i64::MAX), 2);
    }

    #[test]
    fn no_bounds_is_one_gap() {
        assert_eq!(slot(&[], 42), 0);
    }
}
