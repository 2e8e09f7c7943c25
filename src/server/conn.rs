//! Time limits of connections and upgraded streams, against peers that
//! hold a socket and a task without using them: a connection must send
//! its first request within `timeouts.header_read` and is closed after
//! `timeouts.idle_connection` without a request in flight (after
//! `timeouts.header_read` until one of its requests passed the gate), or
//! after
//! `timeouts.inactive_request` with an answer in flight that the peer
//! takes no byte of (its socket full, or, over HTTP/2, its flow-control
//! window shut); an upgraded stream is closed after
//! `timeouts.idle_stream` without a byte moving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use std::pin::Pin;
use std::task::Context;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::body::{Body, BoxError};

/// Why a connection was closed by its watchdog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    /// No complete request within `timeouts.header_read` of the accept.
    HeaderRead,
    /// No request in flight for `timeouts.idle_connection` (for
    /// `timeouts.header_read` until a request passed the gate).
    Idle,
    /// A request in flight, and the peer took no byte of what the server
    /// has to write for `timeouts.inactive_request`: it stopped reading.
    /// Its answer would hold the request's place, its buffers and (v2) a
    /// share of its tunnel's window for as long as the socket stays open.
    /// Over HTTP/2 the socket need not fill for that: a peer that opens
    /// no flow-control window (it may make it 0 from the start) leaves
    /// every answer waiting in hyper, which has no time limit of its own.
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
    /// Answers that handed hyper a frame and wait for it to ask for the
    /// next one (or to be done with them): hyper holds the frame until
    /// the peer has room for it.
    awaiting: AtomicUsize,
    /// Milliseconds after `start` of the last sign that the peer takes
    /// what it is sent (hyper asked an answer for its next frame, or a
    /// write of [`DATA_WRITE`] bytes or more went through), or of the
    /// start of a wait (the first answer began to wait).
    taken: AtomicU64,
    /// The watchdog waits for the requests in flight to end: the last
    /// one to end must wake it.
    watching_flight: AtomicBool,
    changed: Notify,
}

/// A write at least this large carries answer bytes. The frames HTTP/2
/// writes on its own (PING and SETTINGS acknowledgements, WINDOW_UPDATE,
/// RST_STREAM) take 9 to 17 bytes each and go out a few at a time; a
/// peer can have the server write those at will, but they are no sign
/// that it reads.
const DATA_WRITE: usize = 1024;

const NOT_BLOCKED: u64 = u64::MAX;

/// One request of a connection, from its head to the end (or drop) of its
/// response body.
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.last.store(a.millis(), Ordering::Relaxed);
        // Only the watchdog that waits for the requests in flight needs
        // the news, once they are all done; one that waits for the idle
        // deadline looks at `last` when it wakes. (Sequentially
        // consistent with the watchdog's flag and count: one of the two
        // sees the other's write.)
        if a.in_flight.fetch_sub(1, Ordering::SeqCst) == 1
            && a.watching_flight.load(Ordering::SeqCst)
        {
            a.changed.notify_waiters();
        }
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
            awaiting: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
            watching_flight: AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    fn millis(&self) -> u64 {
        millis_since(self.start)
    }

    /// A request's head arrived. Only the first one wakes the watchdog
    /// (it ends the wait for a first request): a watchdog that waits for
    /// the idle deadline finds later ones when it wakes, at the deadline
    /// or after `stalled` at the latest, and one that watches requests in
    /// flight need not hear of more. A request costs no wake-up of
    /// another task.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if !self.seen.swap(true, Ordering::AcqRel) {
            self.changed.notify_waiters();
        }
        InFlight(self.clone())
    }

    /// The peer took answer bytes (or hyper asked an answer for more).
    fn took(&self) {
        self.taken.store(self.millis(), Ordering::Relaxed);
    }

    /// Since when (milliseconds after `start`) every request in flight
    /// has an answer waiting for the peer's room with no sign of the peer
    /// taking anything; `None` while one does not. A request still
    /// waiting for its backend (a long poll, a quiet stream) keeps the
    /// connection: closing it would cut that request too, for the sake of
    /// a stream that may only be paused (a `<video>`).
    fn held_since(&self) -> Option<u64> {
        let awaiting = self.awaiting.load(Ordering::Acquire);
        (awaiting > 0 && awaiting >= self.in_flight.load(Ordering::Acquire))
            .then(|| self.taken.load(Ordering::Relaxed))
    }

    /// Since when writes to the peer have waited for room, if they do.
    fn blocked_since(&self) -> Option<u64> {
        let since = self.blocked.load(Ordering::Relaxed);
        (since != NOT_BLOCKED).then_some(since)
    }

    /// The instant `limit` after `since` (milliseconds after `start`).
    fn after(&self, since: u64, limit: Duration) -> Instant {
        crate::clock::after(
            self.start,
            Duration::from_millis(since).saturating_add(limit),
        )
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

    /// Whether the peer took nothing for at least `limit`: its socket
    /// stayed full, or every answer waited for its room.
    fn stalled_for(&self, limit: Duration) -> bool {
        let now = Instant::now();
        [self.blocked_since(), self.held_since()]
            .into_iter()
            .flatten()
            .any(|since| self.after(since, limit) <= now)
    }

    /// Resolves when the connection should be closed. `proven` says
    /// whether a request of the connection passed the gate
    /// (`places::Place::prove`): until one did, an idle connection is
    /// closed after `header_read`, as one that never sent a request.
    pub async fn expired(&self, limits: Limits, proven: impl Fn() -> bool) -> Expired {
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
            self.watching_flight.store(true, Ordering::SeqCst);
            if self.in_flight.load(Ordering::SeqCst) > 0 {
                // An answer that starts waiting for the peer's room does
                // not wake this loop (it would cost every frame a wake-up):
                // it is looked at again after `stalled` at the latest, so
                // such a stall is found within twice the limit.
                let deadline = [self.blocked_since(), self.held_since()]
                    .into_iter()
                    .flatten()
                    .map(|since| self.after(since, stalled))
                    .min()
                    .unwrap_or_else(|| crate::clock::from_now(stalled));
                tokio::select! {
                    () = &mut changed => {}
                    () = tokio::time::sleep_until(deadline) => {
                        if self.in_flight.load(Ordering::Acquire) > 0 && self.stalled_for(stalled) {
                            return Expired::Stalled;
                        }
                    }
                }
                self.watching_flight.store(false, Ordering::SeqCst);
                continue;
            }
            self.watching_flight.store(false, Ordering::SeqCst);
            let last = self.last.load(Ordering::Relaxed);
            let was_proven = proven();
            let limit = if was_proven {
                idle
            } else {
                idle.min(header_read)
            };
            let idle_at = self.after(last, limit);
            // Requests that begin meanwhile do not wake this wait: it ends
            // after `stalled` at the latest, to watch them for stalls.
            let deadline = idle_at.min(crate::clock::from_now(stalled));
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    if deadline == idle_at
                        && self.in_flight.load(Ordering::Acquire) == 0
                        && self.last.load(Ordering::Relaxed) == last
                        && proven() == was_proven
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
        if let Poll::Ready(Ok(n)) = polled
            && *n >= DATA_WRITE
        {
            self.0.took();
        }
        self.0.wrote(polled.is_pending());
    }

    fn flushed(&mut self, waited: bool) {
        self.0.wrote(waited);
    }
}

impl InFlight {
    /// `body` as the answer of this request: counted in flight until it
    /// is done with, and watched for a peer that takes none of it.
    pub fn answer(self, body: Body) -> Body {
        Answer {
            body,
            awaiting: false,
            request: self,
        }
        .boxed()
    }
}

/// The body of an answer in flight ([`InFlight::answer`]). Length and end
/// pass through, so a `Content-Length` stays.
struct Answer {
    body: Body,
    /// Handed hyper a frame; hyper has not asked for the next one yet.
    awaiting: bool,
    request: InFlight,
}

impl Answer {
    fn set_awaiting(&mut self, awaiting: bool) {
        if self.awaiting != awaiting {
            self.awaiting = awaiting;
            let activity = &self.request.0;
            if awaiting {
                // The first answer to wait starts the connection's wait.
                if activity.awaiting.fetch_add(1, Ordering::AcqRel) == 0 {
                    activity.took();
                }
            } else {
                activity.awaiting.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if this.awaiting {
            // hyper asks for more once it sent the last frame on: the
            // peer had room for it. (A new answer's first poll is no such
            // sign: else a peer could hold its stalled streams by sending
            // a cheap request now and then.)
            this.request.0.took();
        }
        this.set_awaiting(matches!(polled, Poll::Ready(Some(Ok(_)))));
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.set_awaiting(false);
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
            tokio::spawn(async move { a.expired(limits(), || true).await })
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
            tokio::spawn(async move { a.expired(limits(), || true).await })
        };
        drop(a.begin());
        a.wrote(true);
        assert_eq!(watch.await.unwrap(), Expired::Idle);
    }

    fn frames(n: usize) -> Body {
        let frames = (0..n).map(|_| Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"x"))));
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    /// An answer that handed hyper a frame hyper cannot send on (the
    /// peer's HTTP/2 window is shut, and nothing fills the socket)
    /// expires the connection; one that hyper keeps asking for more does
    /// not, nor does one whose peer takes data on the connection, nor one
    /// that waits for its backend.
    #[tokio::test(start_paused = true)]
    async fn an_answer_the_peer_has_no_room_for_expires_the_connection() {
        use crate::observed::Observer as _;
        let watched = |a: &Arc<Activity>| {
            let a = a.clone();
            tokio::spawn(async move { a.expired(limits(), || true).await })
        };

        // Read frame by frame, however slowly.
        let a = Activity::new();
        let watch = watched(&a);
        let mut body = a.begin().answer(frames(30));
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            body.frame().await.unwrap().unwrap();
        }
        assert!(!watch.is_finished(), "a slow reader is no stalled one");
        // Then no room for the frame just handed over.
        let stalled = Instant::now();
        assert_eq!(watch.await.unwrap(), Expired::Stalled);
        let after = stalled.elapsed();
        assert!(
            after >= Duration::from_secs(60) && after <= Duration::from_secs(121),
            "{after:?}"
        );
        drop(body);

        // The frame waits, but the peer takes other answers' data.
        let a = Activity::new();
        let watch = watched(&a);
        let mut body = a.begin().answer(frames(1));
        body.frame().await.unwrap().unwrap();
        let mut writes = Writes(a.clone());
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            writes.wrote(&Poll::Ready(Ok(16 * 1024)));
        }
        assert!(!watch.is_finished(), "a connection that moves data");
        // Only control frames go out from then on.
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            writes.wrote(&Poll::Ready(Ok(17)));
        }
        assert!(watch.is_finished());
        assert_eq!(watch.await.unwrap(), Expired::Stalled);
        drop(body);

        // A cheap request now and then does not hold stalled answers.
        let a = Activity::new();
        let watch = watched(&a);
        let mut stalled = a.begin().answer(frames(1));
        stalled.frame().await.unwrap().unwrap();
        let started = Instant::now();
        let mut cheap = Vec::new();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            let mut body = a.begin().answer(frames(1));
            body.frame().await.unwrap().unwrap();
            cheap.push(body);
        }
        assert_eq!(watch.await.unwrap(), Expired::Stalled);
        assert!(
            started.elapsed() <= Duration::from_secs(121),
            "{:?}",
            started.elapsed()
        );
        drop((stalled, cheap));

        // Another request that waits for its backend keeps the connection.
        let a = Activity::new();
        let watch = watched(&a);
        let mut stalled = a.begin().answer(frames(1));
        stalled.frame().await.unwrap().unwrap();
        let long_poll = a.begin();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(
            !watch.is_finished(),
            "a request waiting for its backend was cut"
        );
        drop(long_poll);
        assert_eq!(watch.await.unwrap(), Expired::Stalled);
        drop(stalled);

        // Waiting for its backend: never the peer's fault.
        let a = Activity::new();
        let watch = watched(&a);
        let pending = futures_util::stream::pending::<Result<Frame<Bytes>, BoxError>>();
        let mut body = a
            .begin()
            .answer(http_body_util::StreamBody::new(pending).boxed());
        let polled = tokio::time::timeout(Duration::from_millis(1), body.frame()).await;
        assert!(polled.is_err(), "no frame yet");
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!watch.is_finished());
        drop(body);
        // Done with: the idle limit.
        assert_eq!(watch.await.unwrap(), Expired::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_expires_at_the_header_deadline() {
        let a = Activity::new();
        let got = a.expired(limits(), || true).await;
        assert_eq!(got, Expired::HeaderRead);
        assert!(a.start.elapsed() >= Duration::from_secs(10));
        assert!(a.start.elapsed() < Duration::from_secs(11));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_end_of_the_last_request() {
        let a = Activity::new();
        let watch = watched(&a, &Arc::new(AtomicBool::new(true)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let req = a.begin();
        // A long request is never idle.
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert!(!watch.is_finished());
        drop(req);
        let ended = Instant::now();
        assert_eq!(watch.await.unwrap(), Expired::Idle);
        assert_idle_for(ended, 119, 121);
    }

    /// The connection was closed between `lo` and `hi` seconds after
    /// `ended`, its last request's end.
    fn assert_idle_for(ended: Instant, lo: u64, hi: u64) {
        let idle = ended.elapsed();
        assert!(
            idle >= Duration::from_secs(lo) && idle <= Duration::from_secs(hi),
            "{idle:?}"
        );
    }

    /// The watchdog of `a`, with `proven` as the connection's standing.
    fn watched(a: &Arc<Activity>, proven: &Arc<AtomicBool>) -> tokio::task::JoinHandle<Expired> {
        let (a, proven) = (a.clone(), proven.clone());
        tokio::spawn(async move {
            a.expired(limits(), move || proven.load(Ordering::Relaxed))
                .await
        })
    }

    /// Until a request passed the gate, an idle connection is closed
    /// after `header_read`; from then on after the idle limit.
    #[tokio::test(start_paused = true)]
    async fn an_unproven_connection_idles_only_as_long_as_the_header_deadline() {
        let proven = Arc::new(AtomicBool::new(false));
        let a = Activity::new();
        let watch = watched(&a, &proven);
        drop(a.begin());
        let ended = Instant::now();
        assert_eq!(watch.await.unwrap(), Expired::Idle);
        assert_idle_for(ended, 10, 11);

        let a = Activity::new();
        let watch = watched(&a, &proven);
        let req = a.begin();
        proven.store(true, Ordering::Relaxed);
        drop(req);
        let ended = Instant::now();
        assert_eq!(watch.await.unwrap(), Expired::Idle);
        assert_idle_for(ended, 119, 121);
    }
}
