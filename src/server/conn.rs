//! Time limits of connections and upgraded streams, against peers that
//! hold a socket and a task without using them: a connection must send
//! its first request within `timeouts.header_read` and is closed after
//! `timeouts.idle_connection` without a request in flight; an upgraded
//! stream is closed after `timeouts.idle_stream` without a byte moving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Why a connection was closed by its watchdog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// No complete request within `timeouts.header_read` of the accept.
    HeaderRead,
    /// No request in flight for `timeouts.idle_connection`.
    Idle,
}

/// What the watchdog of one connection knows about its requests.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    seen: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds after `start` of the last request's end.
    last: AtomicU64,
    changed: Notify,
}

/// One request of a connection, from its head to the end (or drop) of its
/// response body.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.last.store(a.millis(), Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
        a.changed.notify_waiters();
    }
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            seen: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
            changed: Notify::new(),
        })
    }

    fn millis(&self) -> u64 {
        millis_since(self.start)
    }

    /// A request's head arrived.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.seen.store(true, Ordering::Release);
        self.changed.notify_waiters();
        InFlight(self.clone())
    }

    /// Resolves when the connection should be closed.
    pub async fn expired(&self, header_read: Duration, idle: Duration) -> Expired {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self.seen.load(Ordering::Acquire) {
                tokio::select! {
                    () = tokio::time::sleep_until(crate::clock::after(self.start, header_read)) => {
                        if !self.seen.load(Ordering::Acquire) {
                            return Expired::HeaderRead;
                        }
                    }
                    () = &mut changed => {}
                }
                continue;
            }
            if self.in_flight.load(Ordering::Acquire) > 0 {
                changed.await;
                continue;
            }
            let last = self.last.load(Ordering::Relaxed);
            let deadline =
                crate::clock::after(self.start, Duration::from_millis(last).saturating_add(idle));
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    if self.in_flight.load(Ordering::Acquire) == 0
                        && self.last.load(Ordering::Relaxed) == last
                    {
                        return Expired::Idle;
                    }
                }
                () = &mut changed => {}
            }
        }
    }
}

/// A connection's place in `limits.max_connections`, in every request's
/// extensions: an upgraded connection (WebSocket, exec, a v2 tunnel)
/// leaves hyper, and its task keeps the place until it ends.
#[derive(Clone, Debug)]
pub struct Place {
    _permit: Arc<tokio::sync::OwnedSemaphorePermit>,
}

impl Place {
    pub fn new(permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        Self {
            _permit: Arc::new(permit),
        }
    }

    /// The place of the connection a request came on, if any.
    pub fn of(ext: &http::Extensions) -> Option<Place> {
        ext.get::<Place>().cloned()
    }

    /// Runs `task` holding the place.
    pub async fn hold<F: std::future::Future>(place: Option<Place>, task: F) -> F::Output {
        let _place = place;
        task.await
    }
}

use crate::clock::millis_since;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_expires_at_the_header_deadline() {
        let a = Activity::new();
        let got = a
            .expired(Duration::from_secs(10), Duration::from_secs(120))
            .await;
        assert_eq!(got, Expired::HeaderRead);
        assert!(a.start.elapsed() >= Duration::from_secs(10));
        assert!(a.start.elapsed() < Duration::from_secs(11));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_end_of_the_last_request() {
        let a = Activity::new();
        let watch = {
            let a = a.clone();
            tokio::spawn(async move {
                a.expired(Duration::from_secs(10), Duration::from_secs(120))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let req = a.begin();
        // A long request is never idle.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!watch.is_finished());
        drop(req);
        let ended = Instant::now();
        assert_eq!(watch.await.unwrap(), Expired::Idle);
        let idle = ended.elapsed();
        assert!(
            idle >= Duration::from_secs(119) && idle <= Duration::from_secs(121),
            "{idle:?}"
        );
    }
}
