//! Deadlines that cannot overflow.
//!
//! `Instant + Duration` panics when the sum leaves the clock's range, and
//! durations reach us from configuration and from the network (an IdP's
//! `expires_in`). Every deadline is computed here instead.

use std::time::Duration;

use tokio::time::Instant;

/// About thirty years: later than any deadline that matters, early enough
/// for every clock.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `from + d`, or a far-future instant when that would overflow.
pub fn after(from: Instant, d: Duration) -> Instant {
    from.checked_add(d)
        .or_else(|| from.checked_add(FAR_FUTURE))
        .unwrap_or(from)
}

/// `now + d`, saturating like [`after`].
pub fn from_now(d: Duration) -> Instant {
    after(Instant::now(), d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_durations_saturate() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now + Duration::from_secs(86_400 * 365));
        assert_eq!(
            after(now, Duration::from_secs(1)),
            now + Duration::from_secs(1)
        );
    }
}
