//! A connection's place among the `limits.max_connections` that relay
//! clients and users share, and among its source's
//! (`limits.max_connections_per_ip`).
//!
//! A connection has *proven* itself once one of its requests passed the
//! gate (a valid token for what it asked; with auth off, any request for a
//! backend or a relay endpoint). Until then it is only a socket that
//! anyone can open: when every place is taken, a new connection takes the
//! place of the oldest unproven one, which is closed. Without that, a few
//! addresses opening connections that never authenticate (a handful of
//! IPv6 /64s at `max_connections_per_ip` each) would lock out every
//! user and every relay-client that comes after them; with it, they would
//! have to open connections faster than a newcomer can send its first
//! request. Proven connections are never closed to make room.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

use super::peers::{PeerSlot, Peers};

/// How long a new connection waits for the place of the connection it
/// evicted: that one's task only has to notice and drop its socket (and,
/// over HTTP/2, its streams' tasks to see the connection gone).
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// Every place of the listener.
#[derive(Debug)]
pub struct Places {
    connections: Arc<Semaphore>,
    sources: Option<Arc<Peers>>,
    unproven: Mutex<Unproven>,
}

/// The open connections that have not proven themselves, oldest first.
#[derive(Debug, Default)]
struct Unproven {
    next: u64,
    open: BTreeMap<u64, Arc<Eviction>>,
}

/// How a connection is told to go, and to whom its place goes then.
///
/// Its connection's task polls [`Evicted`] at every wake-up, several
/// times per request: an atomic flag and waker cost it a few
/// instructions, where a `CancellationToken` took a lock each time.
#[derive(Debug, Default)]
struct Eviction {
    go: AtomicBool,
    waker: AtomicWaker,
    /// The newcomer that evicted it: the place is handed to it directly
    /// when dropped, so no other connection can take it on the way.
    heir: Mutex<Option<oneshot::Sender<OwnedSemaphorePermit>>>,
}

/// Why a connection was refused at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Every place is held by a connection that proved itself.
    Full,
    /// Its source has `limits.max_connections_per_ip` open.
    Source,
}

/// A connection let in at accept.
#[derive(Debug)]
pub enum Admission {
    /// A place was free.
    Free {
        places: Arc<Places>,
        permit: OwnedSemaphorePermit,
        source: Option<PeerSlot>,
    },
    /// The oldest unproven connection was told to close; its place is
    /// this connection's once given back ([`Admission::place`]).
    Evicted {
        places: Arc<Places>,
        source: Option<PeerSlot>,
        handed: oneshot::Receiver<OwnedSemaphorePermit>,
    },
}

impl Places {
    /// `max` connections in all; `per_source` from each source, if set.
    pub fn new(max: usize, per_source: Option<usize>) -> Arc<Self> {
        Arc::new(Self {
            connections: Arc::new(Semaphore::new(max)),
            sources: per_source.map(Peers::new),
            unproven: Mutex::new(Unproven::default()),
        })
    }

    /// Lets a connection from `ip` in, or says why not. Never waits: the
    /// accept loop calls it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refusal> {
        let source = match &self.sources {
            Some(sources) => Some(sources.admit(ip).ok_or(Refusal::Source)?),
            None => None,
        };
        if let Ok(permit) = self.connections.clone().try_acquire_owned() {
            return Ok(Admission::Free {
                places: self.clone(),
                permit,
                source,
            });
        }
        match self.evict_oldest() {
            Some(handed) => Ok(Admission::Evicted {
                places: self.clone(),
                source,
                handed,
            }),
            None => Err(Refusal::Full),
        }
    }

    /// Tells the oldest unproven connection to go; its place will come
    /// through the receiver.
    fn evict_oldest(&self) -> Option<oneshot::Receiver<OwnedSemaphorePermit>> {
        let (_, eviction) = self.lock().open.pop_first()?;
        let (heir, handed) = oneshot::channel();
        *lock(&eviction.heir) = Some(heir);
        eviction.go.store(true, Ordering::Release);
        eviction.waker.wake();
        Some(handed)
    }

    fn place(self: &Arc<Self>, permit: OwnedSemaphorePermit, source: Option<PeerSlot>) -> Place {
        let eviction = Arc::new(Eviction::default());
        let id = {
            let mut unproven = self.lock();
            let id = unproven.next;
            unproven.next += 1;
            unproven.open.insert(id, eviction.clone());
            id
        };
        Place(Arc::new(Held {
            places: self.clone(),
            id,
            proven: AtomicBool::new(false),
            eviction,
            permit: Some(permit),
            _source: source,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Unproven> {
        lock(&self.unproven)
    }

    /// Open connections that have not proven themselves.
    #[cfg(test)]
    fn unproven(&self) -> usize {
        self.lock().open.len()
    }
}

impl Admission {
    /// The connection's place: at once if one was free, else once the
    /// evicted connection handed its own over (`None` if that takes
    /// longer than [`EVICTION_WAIT`]; the place then goes back to all).
    ///
    /// Called on the connection's task, not in the accept loop: what it
    /// allocates lives as long as the connection, and among the accept
    /// loop's allocations (every connection's task, freed after an
    /// upgrade) it would keep those freed tasks' memory from being used
    /// again. That cost 5.7 KiB of RSS per idle v2 tunnel.
    pub async fn place(self) -> Option<Place> {
        match self {
            Admission::Free {
                places,
                permit,
                source,
            } => Some(places.place(permit, source)),
            Admission::Evicted {
                places,
                source,
                handed,
            } => {
                let permit = tokio::time::timeout(EVICTION_WAIT, handed)
                    .await
                    .ok()?
                    .ok()?;
                Some(places.place(permit, source))
            }
        }
    }
}

/// A connection's place, in every request's extensions: an upgraded
/// connection (WebSocket, exec, a v2 tunnel) leaves hyper, and its task
/// keeps the place until it ends.
#[derive(Clone, Debug)]
pub struct Place(Arc<Held>);

#[derive(Debug)]
struct Held {
    places: Arc<Places>,
    id: u64,
    /// Written under the places' lock only, so a connection is either
    /// proven or evicted, never both.
    proven: AtomicBool,
    eviction: Arc<Eviction>,
    permit: Option<OwnedSemaphorePermit>,
    _source: Option<PeerSlot>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.proven.load(Ordering::Acquire) {
            self.places.lock().open.remove(&self.id);
        }
        let heir = lock(&self.eviction.heir).take();
        if let (Some(heir), Some(permit)) = (heir, self.permit.take()) {
            // A newcomer that gave up waiting sends it back: dropped, the
            // permit returns to the semaphore.
            let _ = heir.send(permit);
        }
    }
}

/// Locks `m`; what it guards stays consistent whatever panicked while
/// holding it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Place {
    /// The place of the connection a request came on, if any.
    pub fn of(ext: &http::Extensions) -> Option<Place> {
        ext.get::<Place>().cloned()
    }

    /// Runs `task` holding the place.
    pub async fn hold<F: std::future::Future>(place: Option<Place>, task: F) -> F::Output {
        let _place = place;
        task.await
    }

    /// A request of this connection passed the gate: the connection is
    /// never evicted from now on, and keeps the longer idle limit. (One
    /// already told to go stays told: it is closing.)
    pub fn prove(ext: &http::Extensions) {
        let Some(place) = ext.get::<Place>() else {
            return;
        };
        let held = &place.0;
        if held.proven.load(Ordering::Acquire) {
            return;
        }
        let mut unproven = held.places.lock();
        if unproven.open.remove(&held.id).is_some() {
            held.proven.store(true, Ordering::Release);
        }
    }

    /// Whether a request of this connection passed the gate.
    pub fn is_proven(&self) -> bool {
        self.0.proven.load(Ordering::Acquire)
    }

    /// Resolves when a new connection took this one's place.
    pub fn evicted(&self) -> Evicted {
        Evicted(self.0.eviction.clone())
    }
}

/// See [`Place::evicted`].
#[derive(Debug)]
pub struct Evicted(Arc<Eviction>);

impl Drop for Evicted {
    fn drop(&mut self) {
        // The waker holds its task's memory, the whole connection future:
        // an upgraded connection's place outlives that task by hours.
        drop(self.0.waker.take());
    }
}

impl Future for Evicted {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let eviction = &self.0;
        if eviction.go.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        eviction.waker.register(cx.waker());
        // Told between the first look and the registration: that wake
        // found no waker.
        if eviction.go.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn free(a: Result<Admission, Refusal>) -> Place {
        match a {
            Ok(Admission::Free {
                places,
                permit,
                source,
            }) => places.place(permit, source),
            other => panic!("no free place: {other:?}"),
        }
    }

    fn extensions(place: &Place) -> http::Extensions {
        let mut ext = http::Extensions::new();
        ext.insert(place.clone());
        ext
    }

    /// With every place taken, a newcomer evicts the oldest unproven
    /// connection and gets its place once that one is gone; proven
    /// connections are never evicted, and with only those open the
    /// newcomer is refused.
    #[tokio::test]
    async fn a_newcomer_takes_the_place_of_the_oldest_unproven_connection() {
        let places = Places::new(3, None);
        let first = free(places.admit(ip("192.0.2.1")));
        let second = free(places.admit(ip("192.0.2.2")));
        let third = free(places.admit(ip("192.0.2.3")));
        Place::prove(&extensions(&first));
        assert_eq!(places.unproven(), 2);

        let Ok(newcomer @ Admission::Evicted { .. }) = places.admit(ip("192.0.2.4")) else {
            panic!("no eviction");
        };
        // The oldest unproven is `second`, not the proven `first`.
        let evicted = second.evicted();
        tokio::time::timeout(Duration::from_secs(1), evicted)
            .await
            .expect("the oldest unproven connection was told to close");
        assert!(!first.0.eviction.go.load(Ordering::Acquire));
        assert!(!third.0.eviction.go.load(Ordering::Acquire));
        // Its place comes once it is given back.
        let waiting = tokio::spawn(newcomer.place());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a place that was not given back");
        drop(second);
        let newcomer = waiting.await.unwrap().expect("the evicted place");
        assert!(!newcomer.is_proven());

        // Proven, all three: nobody to evict.
        Place::prove(&extensions(&third));
        Place::prove(&extensions(&newcomer));
        assert_eq!(places.unproven(), 0);
        assert_eq!(
            places.admit(ip("192.0.2.5")).err(),
            Some(Refusal::Full),
            "a proven connection was evicted"
        );
        drop(first);
        let last = free(places.admit(ip("192.0.2.5")));
        drop((last, third, newcomer));
        assert_eq!(places.unproven(), 0, "no connection, no entry");
    }

    /// An evicted connection's place goes to the newcomer that evicted it,
    /// even when another connection arrives before the newcomer's task
    /// asks for it; and a request passing the gate on an evicted
    /// connection does not make it proven.
    #[tokio::test]
    async fn an_evicted_place_is_handed_to_its_newcomer() {
        let places = Places::new(2, None);
        let a = free(places.admit(ip("192.0.2.1")));
        let b = free(places.admit(ip("192.0.2.2")));
        let newcomer = places.admit(ip("192.0.2.3")).unwrap();
        assert!(a.0.eviction.go.load(Ordering::Acquire));
        Place::prove(&extensions(&a));
        assert!(!a.is_proven(), "an evicted connection was proven");
        drop(a);
        // Not back among the free places: the next one evicts `b`.
        let Ok(next @ Admission::Evicted { .. }) = places.admit(ip("192.0.2.4")) else {
            panic!("the evicted place went to another connection");
        };
        assert!(b.0.eviction.go.load(Ordering::Acquire));
        let newcomer = newcomer.place().await.expect("the handed place");
        drop(b);
        let next = next.place().await.expect("the place of b");
        drop((newcomer, next));
        assert_eq!(places.unproven(), 0);
    }

    /// A dropped [`Evicted`] keeps no waker: the waker would keep its
    /// task's memory (the whole connection future) for as long as the
    /// place lives, which for an upgraded connection is hours.
    #[tokio::test]
    async fn a_dropped_eviction_future_keeps_no_waker() {
        struct Task;
        impl std::task::Wake for Task {
            fn wake(self: Arc<Self>) {}
        }
        let places = Places::new(1, None);
        let place = free(places.admit(ip("192.0.2.1")));
        let task = Arc::new(Task);
        let waker = std::task::Waker::from(task.clone());
        {
            let mut evicted = std::pin::pin!(place.evicted());
            let polled = evicted
                .as_mut()
                .poll(&mut std::task::Context::from_waker(&waker));
            assert!(polled.is_pending());
            assert_eq!(Arc::strong_count(&task), 3, "registered");
        }
        assert_eq!(Arc::strong_count(&task), 2, "the waker outlived its future");
        drop((waker, place));
    }

    /// A place that is not given back in time leaves the newcomer without
    /// one; a source at its limit is refused without evicting anyone.
    #[tokio::test(start_paused = true)]
    async fn an_eviction_is_bounded_and_a_full_source_evicts_nobody() {
        let places = Places::new(1, Some(1));
        let held = free(places.admit(ip("192.0.2.1")));
        assert_eq!(places.admit(ip("192.0.2.1")).err(), Some(Refusal::Source));
        assert!(
            !held.0.eviction.go.load(Ordering::Acquire),
            "evicted for its own source"
        );
        let newcomer = places.admit(ip("192.0.2.2")).unwrap();
        assert!(held.0.eviction.go.load(Ordering::Acquire));
        // The evicted connection hangs on to its place.
        assert!(newcomer.place().await.is_none());
        drop(held);
        // The source of the newcomer that gave up was given back too.
        let _again = free(places.admit(ip("192.0.2.2")));
    }
}
