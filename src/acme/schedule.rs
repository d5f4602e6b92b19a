//! When to renew, and when to retry after a failure.
//!
//! Renewal starts when `renewal_window_ratio` of the lifetime is left (a
//! third by default: day 60 of a 90-day certificate), moved earlier by a
//! random share of a quarter of that window (at most 12 hours), so many
//! names, or many servers, do not all renew in the same second.
//!
//! A failed attempt is retried after 1 minute, then 2, 4, 8 ... up to a day,
//! each ±10% at random; a CA's `Retry-After` (rate limits) is never cut
//! short. The working certificate keeps serving meanwhile.

use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::storage::RenewalRecord;
use crate::config::{FIRST_RETRY_DELAY, MAX_RETRY_DELAY};
use crate::tls::info::CertInfo;

/// The most that jitter moves a renewal earlier.
const MAX_RENEWAL_JITTER: Duration = Duration::from_secs(12 * 3600);

/// When to start renewing `cert`. `jitter` is in `0.0..=1.0`.
pub fn renewal_time(cert: &CertInfo, ratio: f64, jitter: f64) -> SystemTime {
    let window = cert.lifetime().mul_f64(ratio.clamp(0.0, 1.0));
    let spread = (window / 4).min(MAX_RENEWAL_JITTER);
    let start = cert.not_after - window;
    start - spread.mul_f64(jitter.clamp(0.0, 1.0))
}

/// When the next order is due: at once without a certificate, at its
/// renewal time with one, and never before a failure's retry time. (A
/// failed forced renewal of a certificate that is not due therefore moves
/// nothing: the next try is the scheduled one.)
pub fn next_attempt(
    cert: Option<&CertInfo>,
    record: &RenewalRecord,
    ratio: f64,
    jitter: f64,
) -> SystemTime {
    let renew_at = cert.map_or(UNIX_EPOCH, |cert| renewal_time(cert, ratio, jitter));
    let retry_at = record
        .retry_at
        .map_or(UNIX_EPOCH, |at| UNIX_EPOCH + Duration::from_secs(at));
    renew_at.max(retry_at)
}

/// How long to wait after the `failures`-th failure in a row (1-based).
/// `jitter` is in `0.0..=1.0`; `retry_after` is what the CA asked for.
pub fn retry_delay(failures: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let base = FIRST_RETRY_DELAY
        .saturating_mul(1 << doublings)
        .min(MAX_RETRY_DELAY);
    let jittered = base.mul_f64(0.9 + 0.2 * jitter.clamp(0.0, 1.0));
    jittered.max(retry_after.unwrap_or_default())
}

/// A number in `0.0..1.0`, different on every call; only for spreading
/// timers, so std's randomly keyed hasher is random enough.
pub fn jitter() -> f64 {
    let bits = RandomState::new().hash_one(SystemTime::now());
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn cert(days: u64) -> CertInfo {
        let not_before = UNIX_EPOCH + Duration::from_secs(1_000_000);
        CertInfo {
            names: vec!["a.test".into()],
            issuer: "CA".into(),
            not_before,
            not_after: not_before + Duration::from_secs(days * 86_400),
        }
    }

    #[test]
    fn a_90_day_certificate_renews_on_day_60_or_up_to_12_hours_before() {
        let cert = cert(90);
        let day = |n: u64| cert.not_before + Duration::from_secs(n * 86_400);
        assert_eq!(renewal_time(&cert, 1.0 / 3.0, 0.0), day(60));
        assert_eq!(
            renewal_time(&cert, 1.0 / 3.0, 1.0),
            day(60) - Duration::from_secs(12 * 3600)
        );
        let jittered = renewal_time(&cert, 1.0 / 3.0, jitter());
        assert!(jittered <= day(60) && jittered >= day(60) - Duration::from_secs(12 * 3600));
    }

    #[test]
    fn short_certificates_get_a_proportional_spread() {
        // A 6-day certificate: window 2 days, spread half a day at most.
        let cert = cert(6);
        let earliest = renewal_time(&cert, 1.0 / 3.0, 1.0);
        let latest = renewal_time(&cert, 1.0 / 3.0, 0.0);
        assert_eq!(latest - Duration::from_secs(12 * 3600), earliest);
        assert!(earliest > cert.not_before);
    }

    #[test]
    fn retries_double_from_a_minute_up_to_a_day() {
        let at = |n| retry_delay(n, 0.5, None);
        assert_eq!(at(1), Duration::from_secs(60));
        assert_eq!(at(2), Duration::from_secs(120));
        assert_eq!(at(5), Duration::from_secs(960));
        assert_eq!(at(12), Duration::from_secs(86_400));
        assert_eq!(at(500), Duration::from_secs(86_400));
        assert_eq!(retry_delay(1, 0.0, None), Duration::from_secs(54));
        assert_eq!(retry_delay(1, 1.0, None), Duration::from_secs(66));
    }

    #[test]
    fn a_retry_after_from_the_ca_is_never_cut_short() {
        let asked = Duration::from_secs(3 * 3600);
        assert_eq!(retry_delay(1, 0.5, Some(asked)), asked);
        assert_eq!(
            retry_delay(20, 0.5, Some(asked)),
            Duration::from_secs(86_400)
        );
    }

    #[test]
    fn the_next_attempt_waits_for_renewal_time_and_for_retries() {
        let cert = cert(90);
        let unix = |time: SystemTime| time.duration_since(UNIX_EPOCH).expect("after").as_secs();
        let renew_at = renewal_time(&cert, 1.0 / 3.0, 0.0);
        let fresh = RenewalRecord::default();
        assert_eq!(
            next_attempt(None, &fresh, 1.0 / 3.0, 0.0),
            UNIX_EPOCH,
            "at once"
        );
        assert_eq!(next_attempt(Some(&cert), &fresh, 1.0 / 3.0, 0.0), renew_at);
        let failed_early = RenewalRecord {
            failures: 1,
            retry_at: Some(unix(cert.not_before) + 60),
            ..RenewalRecord::default()
        };
        assert_eq!(
            next_attempt(Some(&cert), &failed_early, 1.0 / 3.0, 0.0),
            renew_at,
            "a failed forced renewal does not pull the schedule in"
        );
        let failed_when_due = RenewalRecord {
            failures: 3,
            retry_at: Some(unix(renew_at) + 240),
            ..RenewalRecord::default()
        };
        assert_eq!(
            next_attempt(Some(&cert), &failed_when_due, 1.0 / 3.0, 0.0),
            renew_at + Duration::from_secs(240)
        );
        assert_eq!(
            next_attempt(None, &failed_when_due, 1.0 / 3.0, 0.0),
            renew_at + Duration::from_secs(240),
            "no certificate: the retry time"
        );
    }

    #[test]
    fn jitter_stays_in_range_and_varies() {
        let samples: Vec<f64> = (0..64).map(|_| jitter()).collect();
        assert!(samples.iter().all(|j| (0.0..1.0).contains(j)));
        assert!(samples.windows(2).any(|pair| pair[0] != pair[1]));
    }
}
