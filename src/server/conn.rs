//! Time limits of connections and upgraded streams, against peers that
//! hold a socket and a task without using them: a connection must send
//! its first request within `timeouts.header_read` and is closed after
//! `timeouts.idle_connection` without a request in flight, or after
//! `timeouts.inactive_request` with an answer in flight that the peer
//! takes no byte of; an upgraded stream is closed after
//! `timeouts.idle_stream` without a byte moving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
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
    /// A request in flight, and the peer took no byte of what the server
    /// has to write for `timeouts.inactive_request`: it stopped reading.
    /// Its answer would hold the request's place, its buffers and (v2) a
    /// share of its tunnel's window for as long as the socket stays open.
    Stalled,
}

/// The time limits [`Activity::expired`] applies.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub header_read: Duration,
    pub idle: Duration,
    pub stalled: Duration,
}

/// What the watchdog of one connection knows about its requests.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    seen: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds after `start` of the last request's end.
    last: AtomicU64,
    /// Milliseconds after `start` since when writes to the peer wait for
    /// room in the socket, or [`NOT_BLOCKED`].
    blocked: AtomicU64,
    changed: Notify,
}

const NOT_BLOCKED: u64 = u64::MAX;

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
            blocked: AtomicU64::new(NOT_BLOCKED),
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

    /// A write to the peer had to wait (`true`), or went through.
    fn wrote(&self, waited: bool) {
        if waited {
            if self.blocked.load(Ordering::Relaxed) == NOT_BLOCKED {
                self.blocked.store(self.millis(), Ordering::Relaxed);
                // The watchdog times a stall only once there is one.
                self.changed.notify_waiters();
            }
        } else if self.blocked.load(Ordering::Relaxed) != NOT_BLOCKED {
            self.blocked.store(NOT_BLOCKED, Ordering::Relaxed);
        }
    }

    /// Whether writes have waited for room for at least `limit`.
    fn stalled_for(&self, limit: Duration) -> bool {
        let since = self.blocked.load(Ordering::Relaxed);
        since != NOT_BLOCKED && Duration::from_millis(self.millis().saturating_sub(since)) >= limit
    }

    /// Resolves when the connection should be closed.
    pub async fn expired(&self, limits: Limits) -> Expired {
        let Limits {
            header_read,
            idle,
            stalled,
        } = limits;
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
                let since = self.blocked.load(Ordering::Relaxed);
                if since == NOT_BLOCKED {
                    changed.await;
                    continue;
                }
                let deadline = crate::clock::after(
                    self.start,
                    Duration::from_millis(since).saturating_add(stalled),
                );
                tokio::select! {
                    () = &mut changed => {}
                    () = tokio::time::sleep_until(deadline) => {
                        if self.in_flight.load(Ordering::Acquire) > 0 && self.stalled_for(stalled) {
                            return Expired::Stalled;
                        }
                    }
                }
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

/// Tells a connection's [`Activity`] when writes to its socket (or TLS
/// stream) wait for room and when they go through: a slow reader lets
/// some through now and then, a stalled one none.
pub struct Writes(pub Arc<Activity>);

impl crate::observed::Observer for Writes {
    fn wrote(&mut self, polled: &Poll<std::io::Result<usize>>) {
        self.0.wrote(polled.is_pending());
    }

    fn flushed(&mut self, waited: bool) {
        self.0.wrote(waited);
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

    fn limits() -> Limits {
        Limits {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(120),
            stalled: Duration::from_secs(60),
        }
    }

    /// Writes that wait for room for the stall limit, with a request in
    /// flight, close the connection; writes that go through now and then,
    /// however slowly, do not; nor do waiting writes without a request.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_takes_no_bytes_expires_the_connection() {
        let a = Activity::new();
        let watch = {
            let a = a.clone();
            tokio::spawn(async move { a.expired(limits()).await })
        };
        let req = a.begin();
        for _ in 0..20 {
            a.wrote(true);
            tokio::time::sleep(Duration::from_secs(50)).await;
            a.wrote(false);
        }
        assert!(!watch.is_finished(), "a slow reader is no stalled one");
        let stalled = Instant::now();
        a.wrote(true);
        a.wrote(true);
        assert_eq!(watch.await.unwrap(), Expired::Stalled);
        let after = stalled.elapsed();
        assert!(
            after >= Duration::from_secs(60) && after <= Duration::from_secs(76),
            "{after:?}"
        );
        drop(req);
        // Without a request in flight, only the idle limit counts.
        let a = Activity::new();
        let watch = {
            let a = a.clone();
            tokio::spawn(async move { a.expired(limits()).await })
        };
        drop(a.begin());
        a.wrote(true);
        assert_eq!(watch.await.unwrap(), Expired::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_expires_at_the_header_deadline() {
        let a = Activity::new();
        let got = a.expired(limits()).await;
        assert_eq!(got, Expired::HeaderRead);
        assert!(a.start.elapsed() >= Duration::from_secs(10));
        assert!(a.start.elapsed() < Duration::from_secs(11));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_end_of_the_last_request() {
        let a = Activity::new();
        let watch = {
            let a = a.clone();
            tokio::spawn(async move { a.expired(limits()).await })
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
