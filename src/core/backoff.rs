//! Retry spacing for deliveries and polls: exponential, capped, with jitter so that many
//! rows failing together do not retry together.

use std::time::Duration;

/// Delay before attempt `attempt + 1` after `attempt` failures (1-based): doubles from
/// `initial` up to `max`, then "equal jitter" — half fixed, half drawn from `random`.
pub fn retry_delay(attempt: u32, initial: Duration, max: Duration, random: u64) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let base = initial
        .as_millis()
        .saturating_mul(1u128 << exp)
        .min(max.as_millis())
        .max(1) as u64;
    let half = base / 2;
    Duration::from_millis(half + random % (base - half + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps_with_bounded_jitter() {
        let ms = Duration::from_millis;
        for r in [0, 1, 7, 1_000_003, u64::MAX] {
            let d1 = retry_delay(1, ms(1000), ms(60_000), r);
            assert!(d1 >= ms(500) && d1 <= ms(1000), "{d1:?}");
            let d3 = retry_delay(3, ms(1000), ms(60_000), r);
            assert!(d3 >= ms(2000) && d3 <= ms(4000), "{d3:?}");
            let d20 = retry_delay(20, ms(1000), ms(60_000), r);
            assert!(d20 >= ms(30_000) && d20 <= ms(60_000), "{d20:?}");
        }
        assert_eq!(retry_delay(1, ms(1000), ms(60_000), 0), ms(500));
    }
}
