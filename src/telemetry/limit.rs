//! Rate limit of repetitive log lines.
//!
//! Anyone on the internet can make the relay refuse a token; a log line
//! per refusal would let them flood the log (and the disk behind it). A
//! [`LogLimiter`] lets a few lines per key through in each window and
//! counts the rest, so that one summary line can say how many were held
//! back. Metrics keep counting every event: only the lines are limited.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// What to do with one event.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log the line.
    Log,
    /// Count it, do not log it.
    Suppress,
}

struct Slot {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

/// At most `per_window` lines per key and window.
pub struct LogLimiter {
    per_window: u32,
    window: Duration,
    slots: Mutex<HashMap<&'static str, Slot>>,
}

impl LogLimiter {
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The window length, for a caller that flushes summaries on a timer.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Decides one event of `key`. When a new window begins, `summary` is
    /// called first with the count held back in the windows before.
    pub fn check(&self, key: &'static str, summary: impl FnOnce(&'static str, u64)) -> Verdict {
        let now = Instant::now();
        let mut slots = crate::lock(&self.slots);
        let slot = slots.entry(key).or_insert(Slot {
            window_start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(slot.window_start) >= self.window {
            if slot.suppressed > 0 {
                summary(key, slot.suppressed);
            }
            *slot = Slot {
                window_start: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if slot.logged < self.per_window {
            slot.logged += 1;
            Verdict::Log
        } else {
            slot.suppressed += 1;
            Verdict::Suppress
        }
    }

    /// Reports, through `summary`, every key whose window has ended with
    /// lines held back, so a flood that stops is still summed up.
    pub fn flush(&self, mut summary: impl FnMut(&'static str, u64)) {
        let now = Instant::now();
        let mut slots = crate::lock(&self.slots);
        slots.retain(|key, slot| {
            if now.duration_since(slot.window_start) < self.window {
                return true;
            }
            if slot.suppressed > 0 {
                summary(key, slot.suppressed);
            }
            false
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_few_lines_per_window_then_one_summary() {
        let limiter = LogLimiter::new(3, Duration::from_secs(1));
        let mut summaries = Vec::new();
        let verdicts: Vec<_> = (0..100)
            .map(|_| limiter.check("expired", |k, n| summaries.push((k, n))))
            .collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Log).count(), 3);
        // Another key has its own budget.
        assert_eq!(limiter.check("malformed", |_, _| {}), Verdict::Log);
        assert!(summaries.is_empty());
        tokio::time::advance(Duration::from_millis(1001)).await;
        let mut summaries = Vec::new();
        assert_eq!(
            limiter.check("expired", |k, n| summaries.push((k, n))),
            Verdict::Log
        );
        assert_eq!(summaries, [("expired", 97)]);
    }

    #[tokio::test(start_paused = true)]
    async fn flush_sums_up_a_flood_that_stopped() {
        let limiter = LogLimiter::new(1, Duration::from_secs(1));
        for _ in 0..10 {
            limiter.check("bad_signature", |_, _| {});
        }
        let mut seen = Vec::new();
        limiter.flush(|k, n| seen.push((k, n)));
        assert!(seen.is_empty(), "window still open");
        tokio::time::advance(Duration::from_secs(2)).await;
        limiter.flush(|k, n| seen.push((k, n)));
        assert_eq!(seen, [("bad_signature", 9)]);
        limiter.flush(|k, n| seen.push((k, n)));
        assert_eq!(seen.len(), 1, "summed up once");
    }
}
