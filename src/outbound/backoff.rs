//! When to try again: exponential backoff with full jitter, and `Retry-After`.
//!
//! Full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter"):
//! before retry n the wait is uniform in `[0, min(max, base * 2^(n-1))]`.
//! It is three lines, so we keep it here rather than adopt `backon`, whose
//! value (sleeping and looping) our scheduler already does with its own timers.

use std::time::{Duration, SystemTime};

/// A `Retry-After` longer than this is cut to it: a receiver cannot park a
/// job for longer than a day per attempt.
pub const RETRY_AFTER_MS_MAX: u64 = 24 * 3600 * 1000;

/// The full-jitter wait before the next attempt, after `failed_attempts` (>= 1) failures.
pub fn full_jitter_ms(failed_attempts: u32, base_ms: u64, max_ms: u64, rng: &mut fastrand::Rng) -> u64 {
    rng.u64(0..=backoff_ceiling_ms(failed_attempts, base_ms, max_ms))
}

/// `min(max_ms, base_ms * 2^(failed_attempts - 1))`, without overflow.
pub fn backoff_ceiling_ms(failed_attempts: u32, base_ms: u64, max_ms: u64) -> u64 {
    let shift = failed_attempts.saturating_sub(1).min(63);
    base_ms.checked_shl(shift).filter(|v| v >> shift == base_ms).unwrap_or(u64::MAX).min(max_ms)
}

/// Parses a `Retry-After` value: delay-seconds or an HTTP-date (RFC 9110
/// §10.2.3). A date in the past means no delay. Capped at `RETRY_AFTER_MS_MAX`.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let delay = if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        Duration::from_secs(value.parse::<u64>().unwrap_or(u64::MAX))
    } else {
        let at = httpdate::parse_http_date(value).ok()?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    };
    Some(delay.min(Duration::from_millis(RETRY_AFTER_MS_MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_and_saturates() {
        assert_eq!(backoff_ceiling_ms(1, 1000, 300_000), 1000);
        assert_eq!(backoff_ceiling_ms(2, 1000, 300_000), 2000);
        assert_eq!(backoff_ceiling_ms(9, 1000, 300_000), 256_000);
        assert_eq!(backoff_ceiling_ms(10, 1000, 300_000), 300_000);
        assert_eq!(backoff_ceiling_ms(u32::MAX, 1000, 300_000), 300_000);
        assert_eq!(backoff_ceiling_ms(0, 1000, 300_000), 1000);
    }

    #[test]
    fn jitter_stays_under_the_ceiling_and_spreads() {
        let mut rng = fastrand::Rng::with_seed(7);
        let samples: Vec<u64> = (0..1000).map(|_| full_jitter_ms(4, 100, 10_000, &mut rng)).collect();
        assert!(samples.iter().all(|&s| s <= 800));
        assert!(samples.iter().any(|&s| s < 200) && samples.iter().any(|&s| s > 600));
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(90)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&past, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-3", now), None);
        assert_eq!(parse_retry_after("", now), None);
        let huge = parse_retry_after("99999999999999999999999", now);
        assert_eq!(huge, Some(Duration::from_millis(RETRY_AFTER_MS_MAX)));
    }
}
