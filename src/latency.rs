//! Delivery latencies in logarithmic buckets, so `subscription_health` can
//! give percentiles from per-minute counts instead of sorting a day of
//! deliveries. Bucket 0 holds latencies below 0.1 ms; bucket b ≥ 1 holds
//! [0.1 × 1.1^(b−1), 0.1 × 1.1^b) ms, and the view reports a bucket as
//! 0.1 × 1.1^(b − 0.5) ms: within 5% of any latency in it. SQL reaches
//! `bucket` as `linkhooks.latency_bucket()` (the worker's fold, the view and
//! the 0.4.0 → 0.5.0 upgrade); the view has the reported middle in SQL.

const FIRST_MS: f64 = 0.1;
const GROWTH: f64 = 1.1;
/// 0.1 ms × 1.1^250 is about 25 days: longer latencies share the last bucket.
const LAST: i16 = 250;

/// The bucket of a latency in milliseconds (negative or NaN counts as 0).
pub fn bucket(ms: f64) -> i16 {
    if ms.is_nan() || ms < FIRST_MS {
        return 0;
    }
    let b = ((ms / FIRST_MS).ln() / GROWTH.ln()).floor() + 1.0;
    b.clamp(1.0, LAST as f64) as i16
}

/// What the view reports for a bucket: its geometric middle.
#[cfg(test)]
fn reported_ms(bucket: i16) -> f64 {
    if bucket == 0 {
        FIRST_MS / 2.0
    } else {
        FIRST_MS * GROWTH.powf(bucket as f64 - 0.5)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reported_latency_is_within_five_percent() {
        for ms in [0.1, 0.37, 1.0, 3.3, 12.0, 250.0, 2_000.0, 30_000.0, 3_600_000.0] {
            let reported = reported_ms(bucket(ms));
            assert!(
                (reported - ms).abs() / ms < 0.05,
                "{ms} ms reported as {reported}"
            );
        }
    }

    #[test]
    fn buckets_grow_with_the_latency() {
        let buckets: Vec<i16> = [0.05, 0.1, 0.2, 1.0, 10.0, 100.0, 1_000.0]
            .into_iter()
            .map(bucket)
            .collect();
        assert!(buckets.windows(2).all(|w| w[0] < w[1]), "{buckets:?}");
    }

    #[test]
    fn odd_input_lands_in_the_end_buckets() {
        assert_eq!(bucket(-3.0), 0);
        assert_eq!(bucket(f64::NAN), 0);
        assert_eq!(bucket(0.0), 0);
        assert_eq!(bucket(f64::INFINITY), LAST);
        assert_eq!(bucket(1e15), LAST);
    }
}
