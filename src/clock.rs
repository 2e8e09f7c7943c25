//! Deadlines that cannot overflow.
//!
//! `Instant + Duration` panics when the sum leaves the clock's range, and
//! durations reach us from configuration and from the network (an IdP's
//! `expires_in`). Every deadline is computed here instead.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

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

/// Seconds since the epoch by the wall clock, as a token's `exp` counts
/// them; `None` for a clock set before 1970 (each caller says what that
/// means for it).
pub fn unix_secs(t: SystemTime) -> Option<u64> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

/// [`unix_secs`] of now.
pub fn unix_now() -> Option<u64> {
    unix_secs(SystemTime::now())
}

/// Milliseconds since `start`, small enough to keep in an atomic.
pub fn millis_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// When bytes last moved: on an upgraded stream, in either direction, or
/// on an upload. Deadlines of "nothing moved for so long" count from it,
/// so a slow transfer that keeps moving is never cut off as idle.
#[derive(Clone, Debug)]
pub struct Progress {
    start: Instant,
    last: Arc<AtomicU64>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Progress {
    /// Bytes were read, or a write completed.
    pub fn moved(&self) {
        self.last.store(millis_since(self.start), Ordering::Relaxed);
    }

    /// Resolves once nothing has moved for `idle` (since the start, if
    /// nothing ever moved): a peer that neither sends nor reads (a write
    /// blocked on it does not count as moving).
    pub async fn stalled(&self, idle: Duration) {
        loop {
            let last = self.last.load(Ordering::Relaxed);
            let deadline = after(self.start, Duration::from_millis(last).saturating_add(idle));
            tokio::time::sleep_until(deadline).await;
            if self.last.load(Ordering::Relaxed) == last {
                return;
            }
        }
    }
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

    #[tokio::test(start_paused = true)]
    async fn a_transfer_stalls_only_without_progress() {
        let p = Progress::default();
        let started = Instant::now();
        let mover = {
            let p = p.clone();
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    p.moved();
                }
            })
        };
        p.stalled(Duration::from_secs(60)).await;
        mover.await.unwrap();
        // Last move at 150 s, then 60 s of nothing.
        let at = started.elapsed();
        assert!(
            at >= Duration::from_secs(209) && at <= Duration::from_secs(211),
            "{at:?}"
        );
    }
}
