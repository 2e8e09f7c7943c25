//! The in-memory rendezvous of user-client requests and relay-clients.
//!
//! A relay-client's long poll waits in its backend's queue; a user-client
//! request is handed to the newest waiting poll, or, when none waits,
//! queued until a poll arrives and takes it directly (`PROTOCOL.md`,
//! "Relay-client endpoints"). Every per-request resource lives in one [`Exchange`], whose
//! `Drop` forgets the request id at once: when the user-client goes away,
//! hyper drops the response body, the body drops the exchange, and the
//! relay-client's next post for that id gets 400.
//!
//! There is no global lock on the hot path: backends and requests live in
//! sharded maps, and each backend has its own small queue.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::proto::{HttpRequest, MAX_TRAILER_BYTES, MAX_TRAILERS, ProtoError, ResponseChunk};

/// Chunks buffered between a relay-client's posts and a slow user-client.
/// Small on purpose: a full channel makes the relay-client's post wait,
/// which is the relay's backpressure.
const RESPONSE_CHANNEL: usize = 4;
/// User-to-backend reads buffered for an upgraded connection.
const STREAM_CHANNEL: usize = 16;
/// Queued reads are joined into one `/server/requeststream` answer up to
/// this much (a read of the user's is at most 64 KiB).
const MAX_STREAM_READ: usize = 1 << 20;
/// The same for a relay-client that did not ask for `half_close`: the Go
/// relay-client, whose 60 s call timeout also covers copying the answer
/// to its backend, and which closes the backend connection when it
/// passes. The Go server answered one read of at most 10 KiB; a megabyte
/// would not cross a weak mobile link in time.
const GO_STREAM_READ: usize = 16 * 1024;
/// Longest a chunk post waits for room for its chunk (at most
/// `inactive_request`): below the Go relay-client's 60 s call timeout.
/// That client posts the same chunk again when its call times out, and a
/// post still waiting here would then deliver it twice.
const MAX_POST_WAIT: Duration = Duration::from_secs(45);
/// Longest request-stream read while the server drains.
const DRAINING_WAIT: Duration = Duration::from_secs(1);
/// Tunnels one request tries before it falls back to v1 polls, each one
/// found refusing (`Broker::ready_tunnel`).
const READY_TRIES: usize = 8;

/// Why a broker operation failed. Mapped to HTTP in `crate::error`.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No relay-client has polled for this name (or it was forgotten).
    #[error("unknown client {0:?}: no relay-client is connected for this backend")]
    UnknownBackend(String),
    /// The backend is known but no poll was free within the relay timeout.
    #[error("relay-client for {0:?} did not pick up the request in time")]
    NoFreePoll(String),
    /// A poll saw no request within the poll timeout (408 to the poller).
    #[error("no request arrived")]
    PollTimeout,
    /// The request id is not (or no longer) known.
    #[error("unknown request id {0:?}")]
    UnknownRequest(String),
    /// A response chunk without an id.
    #[error("response has no id")]
    MissingId,
    /// The user-to-backend stream of an upgraded request has ended.
    #[error("request stream is over")]
    StreamClosed,
    /// The user-client half-closed its side of an upgraded request, told
    /// to a relay-client that asked for it ([`crate::proto::HALF_CLOSE_PARAM`]).
    #[error("the user-client closed its side")]
    HalfClosed,
    /// No chunk arrived for the inactive-request timeout.
    #[error("backend did not answer within {0:?}")]
    Inactive(Duration),
    /// The server is shutting down and takes no new work.
    #[error("relay is shutting down")]
    Draining,
    /// An id collision; never expected with 128 random bits.
    #[error("duplicate request id {0:?}")]
    DuplicateId(String),
    /// The relay-client posted a chunk that cannot be relayed; the
    /// user-client was told (502) and the request is over.
    #[error("response refused: {0}")]
    Refused(String),
    /// What the user side sees of a refused chunk.
    #[error("invalid response from backend: {0}")]
    BadResponse(ProtoError),
    /// The poll that took the request went away before its answer left,
    /// and no other poll was waiting ([`Broker::hand_back`]).
    #[error("the relay-client's poll went away before it could take the request")]
    Undelivered,
}

/// What the user side receives for each relay-client post: a checked
/// chunk, or why the relay-client's answer cannot be relayed.
pub type Delivery = Result<ResponseChunk, ProtoError>;

/// A connected v2 relay-client (`docs/transport-v2.md`): the server's
/// HTTP/2 client handle on the relay-client's connection. Requests are
/// sent on it by the user side; the broker only hands it out.
pub struct Tunnel {
    sender: h2::client::SendRequest<Bytes>,
    in_flight: AtomicUsize,
    closed: CancellationToken,
    /// The relay-client said GOAWAY: the streams in flight go on, new
    /// requests go elsewhere.
    refusing: AtomicBool,
}

impl Tunnel {
    pub fn new(sender: h2::client::SendRequest<Bytes>) -> Arc<Self> {
        Arc::new(Self {
            sender,
            in_flight: AtomicUsize::new(0),
            closed: CancellationToken::new(),
            refusing: AtomicBool::new(false),
        })
    }

    /// A handle to send one request on.
    pub fn sender(&self) -> h2::client::SendRequest<Bytes> {
        self.sender.clone()
    }

    /// Takes no new requests from now on (expiry, shutdown, and the end of
    /// the connection, which closes it).
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Resolves once [`Tunnel::close`] was called.
    pub async fn closing(&self) {
        self.closed.cancelled().await;
    }

    /// Takes no new requests, but keeps the connection for the streams
    /// in flight (the relay-client is going away gracefully).
    pub fn refuse_new(&self) {
        self.refusing.store(true, Ordering::Release);
    }

    /// Whether the tunnel takes no new requests.
    pub fn is_closed(&self) -> bool {
        self.is_gone() || self.refusing.load(Ordering::Acquire)
    }

    /// Whether the connection is over. A tunnel that only refuses new
    /// requests stays listed until then: its streams keep the backend
    /// known, and shutdown must still find it to close it.
    fn is_gone(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Requests in flight on this tunnel.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// One request in flight on a tunnel; counted while alive (active
/// requests, shutdown drain, the tunnel's load).
pub struct TunnelRequest {
    broker: Broker,
    tunnel: Arc<Tunnel>,
}

impl TunnelRequest {
    pub fn tunnel(&self) -> &Tunnel {
        &self.tunnel
    }
}

/// A tunnel whose connection takes a new stream now
/// ([`Broker::ready_tunnel`]): the request's place on it and the handle
/// to open the stream with.
pub struct ReadyTunnel {
    request: TunnelRequest,
    sender: h2::client::SendRequest<Bytes>,
}

/// A stream opened on a tunnel ([`Broker::open_stream`]).
pub struct OpenedStream {
    /// Counts the request on the tunnel that carries it.
    pub request: TunnelRequest,
    pub response: h2::client::ResponseFuture,
    /// The request body's side of the stream.
    pub body: h2::SendStream<Bytes>,
}

/// What `send_request` consumes, for a second try.
fn copy_head(head: &http::Request<()>) -> http::Request<()> {
    let mut out = http::Request::new(());
    *out.method_mut() = head.method().clone();
    *out.uri_mut() = head.uri().clone();
    *out.version_mut() = head.version();
    *out.headers_mut() = head.headers().clone();
    out
}

impl Drop for TunnelRequest {
    fn drop(&mut self) {
        self.tunnel.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self
            .broker
            .inner
            .tunnel_requests
            .fetch_sub(1, Ordering::AcqRel)
            == 1
        {
            self.broker.inner.request_ended.notify_waiters();
        }
    }
}

/// Timing rules of the broker (`PROTOCOL.md`, "Server-side timing rules").
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub poll_timeout: Duration,
    pub relay_timeout: Duration,
    pub inactive_request: Duration,
    pub inactive_backend: Duration,
}

/// Cheap-to-clone handle on the shared broker state.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: BrokerConfig,
    backends: DashMap<String, Arc<Backend>>,
    requests: DashMap<String, Arc<Pending>>,
    /// Cancelled when the server begins to drain.
    draining: CancellationToken,
    /// Cancelled when the drain's deadline passed ([`Broker::abort_all`]).
    aborted: CancellationToken,
    /// Woken whenever a request ends, so a drain can wait for zero.
    request_ended: Notify,
    /// Requests in flight on v2 tunnels.
    tunnel_requests: AtomicUsize,
}

/// One backend name: its polls and requests waiting for each other.
struct Backend {
    meeting: Mutex<Meeting>,
    last_seen: Mutex<Instant>,
    /// Connected v2 relay-clients of this name.
    tunnels: Mutex<Vec<Arc<Tunnel>>>,
    /// A v2 relay-client served this name once: when its tunnel is gone,
    /// it is expected back ([`Broker::await_route`]).
    had_tunnel: AtomicBool,
    /// Woken when a tunnel registers, and, once the name had a tunnel,
    /// when a poll starts waiting.
    route_added: Notify,
}

/// At most one of the two queues is non-empty: a poll that arrives takes
/// the oldest queued request, a request that arrives takes the newest
/// waiting poll. One lock for both, so neither can miss the other.
#[derive(Default)]
struct Meeting {
    polls: VecDeque<oneshot::Sender<HttpRequest>>,
    requests: VecDeque<Queued>,
    /// Names queued requests, so one that gives up can leave the queue.
    next_ticket: u64,
}

/// A request that found no poll waiting. A poll that arrives takes it
/// directly, in its own task: no wakeup of the user's task stands between
/// the relay-client's poll and its answer. `taken` tells the user's task.
struct Queued {
    ticket: u64,
    req: HttpRequest,
    taken: oneshot::Sender<()>,
}

/// A poll's slot for the request handed to it. Dropped with the poll
/// (the relay-client's connection closed while hyper had not yet run the
/// poll to its end), it gives a request already in it back to the broker
/// ([`Broker::hand_back`]).
struct PollSlot<'a> {
    broker: &'a Broker,
    backend: Arc<Backend>,
    rx: oneshot::Receiver<HttpRequest>,
    /// The poll ran to its end and answers for what is in the slot.
    done: bool,
}

impl PollSlot<'_> {
    /// Closes the slot and takes what was handed to it in the meantime:
    /// after this, no request can arrive in it unseen.
    fn take(&mut self) -> Option<HttpRequest> {
        self.done = true;
        self.rx.close();
        self.rx.try_recv().ok()
    }
}

impl Drop for PollSlot<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(req) = self.take() {
            self.broker.hand_back(&self.backend, req);
        }
    }
}

/// Removes a queued request from its backend's queue, at the latest when
/// dropped (the user's task went away).
struct Unqueue<'a> {
    backend: &'a Backend,
    ticket: u64,
    left: bool,
}

impl Unqueue<'_> {
    /// Takes the request out of the queue; `false` if a poll took it
    /// first. Under the queue's lock, so the answer is final.
    fn leave(&mut self) -> bool {
        self.left = true;
        let ticket = self.ticket;
        let mut m = lock(&self.backend.meeting);
        // Tickets grow in queue order: a binary search, not a scan, when
        // many requests give up together (their relay-client went away).
        match m.requests.binary_search_by_key(&ticket, |q| q.ticket) {
            Ok(i) => m.requests.remove(i).is_some(),
            Err(_) => false,
        }
    }
}

impl Drop for Unqueue<'_> {
    fn drop(&mut self) {
        if !self.left {
            self.leave();
        }
    }
}

/// What the relay-client side needs to reach a live request.
struct Pending {
    backend: Arc<str>,
    responses: mpsc::Sender<Delivery>,
    /// User-to-backend bytes of an upgraded connection.
    stream: tokio::sync::Mutex<mpsc::Receiver<Bytes>>,
    /// The request's `relay.request` span: parent of its chunk spans.
    span: tracing::Span,
    /// Whether that span is sampled (chunk spans only then).
    traced: bool,
    /// Sequence number of the next response chunk.
    seq: AtomicU64,
    /// Set once the connection is upgraded: chunks are stream bytes.
    upgraded: AtomicBool,
    /// Trailer entries and bytes posted so far, capped per response.
    trailer_entries: AtomicU64,
    trailer_bytes: AtomicU64,
}

impl Pending {
    /// Counts a chunk's trailers; `false` once the response's total
    /// passes [`MAX_TRAILERS`] or [`MAX_TRAILER_BYTES`].
    fn admit_trailers(&self, chunk: &ResponseChunk) -> bool {
        if chunk.trailers.is_empty() {
            return true;
        }
        let entries = self
            .trailer_entries
            .fetch_add(chunk.trailers.len() as u64, Ordering::Relaxed)
            + chunk.trailers.len() as u64;
        let bytes = self
            .trailer_bytes
            .fetch_add(chunk.trailer_bytes() as u64, Ordering::Relaxed)
            + chunk.trailer_bytes() as u64;
        entries <= MAX_TRAILERS as u64 && bytes <= MAX_TRAILER_BYTES as u64
    }
}

use crate::lock;

impl Backend {
    /// Hands `req` to the newest waiting poll, or queues it (`None`: a
    /// poll took it; else its ticket). Newest first: after a
    /// relay-client's network changed, its old polls may sit on a dead
    /// connection the server has not noticed yet, while its fresh ones
    /// are live. Older polls that lose out simply time out and poll again.
    fn offer(&self, mut req: HttpRequest, taken: oneshot::Sender<()>) -> Option<u64> {
        let mut m = lock(&self.meeting);
        while let Some(tx) = m.polls.pop_back() {
            match tx.send(req) {
                Ok(()) => return None,
                // That poll went away; try the next one.
                Err(back) => req = back,
            }
        }
        m.next_ticket += 1;
        let ticket = m.next_ticket;
        m.requests.push_back(Queued { ticket, req, taken });
        Some(ticket)
    }
    fn new() -> Self {
        Self {
            meeting: Mutex::new(Meeting::default()),
            last_seen: Mutex::new(Instant::now()),
            tunnels: Mutex::new(Vec::new()),
            had_tunnel: AtomicBool::new(false),
            route_added: Notify::new(),
        }
    }

    fn touch(&self) {
        *lock(&self.last_seen) = Instant::now();
    }

    fn has_waiting_poll(&self) -> bool {
        lock(&self.meeting).polls.iter().any(|tx| !tx.is_closed())
    }

    /// A request waits for a poll: the relay-client is expected back.
    fn has_queued_request(&self) -> bool {
        !lock(&self.meeting).requests.is_empty()
    }

    fn has_tunnel(&self) -> bool {
        lock(&self.tunnels).iter().any(|t| !t.is_gone())
    }
}

impl Broker {
    pub fn new(cfg: BrokerConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                backends: DashMap::new(),
                requests: DashMap::new(),
                draining: CancellationToken::new(),
                aborted: CancellationToken::new(),
                request_ended: Notify::new(),
                tunnel_requests: AtomicUsize::new(0),
            }),
        }
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.cfg
    }

    /// Long poll of a relay-client for `backend`; registers the name.
    ///
    /// Answers the next request, or [`BrokerError::PollTimeout`] after the
    /// poll timeout, or [`BrokerError::Draining`] once shutdown began.
    pub async fn poll(&self, backend: &str) -> Result<HttpRequest, BrokerError> {
        if self.inner.draining.is_cancelled() {
            return Err(BrokerError::Draining);
        }
        let b = {
            // Touched while the map entry is held, so the reaper cannot
            // remove the backend between lookup and queueing this poll.
            let entry = self
                .inner
                .backends
                .entry(backend.to_owned())
                .or_insert_with(|| Arc::new(Backend::new()));
            entry.touch();
            entry.clone()
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut m = lock(&b.meeting);
            while let Some(q) = m.requests.pop_front() {
                // A request whose user gave up in the meantime is skipped.
                if q.taken.send(()).is_ok() {
                    drop(m);
                    b.touch();
                    return Ok(q.req);
                }
            }
            m.polls.retain(|t| !t.is_closed());
            m.polls.push_back(tx);
        }
        if b.had_tunnel.load(Ordering::Acquire) {
            b.route_added.notify_waiters();
        }
        // Whatever ends this future, a request already handed to it is
        // not lost with it (`PollSlot`).
        let mut slot = PollSlot {
            broker: self,
            backend: b.clone(),
            rx,
            done: false,
        };
        let outcome = tokio::select! {
            r = &mut slot.rx => r.map_err(|_| BrokerError::PollTimeout),
            () = tokio::time::sleep(self.inner.cfg.poll_timeout) => Err(BrokerError::PollTimeout),
            () = self.inner.draining.cancelled() => Err(BrokerError::Draining),
        };
        b.touch();
        match outcome {
            Ok(req) => {
                slot.done = true;
                Ok(req)
            }
            // A request handed over in the instant the timer fired must
            // not be lost.
            Err(e) => slot.take().ok_or(e),
        }
    }

    /// A request whose poll went away (its connection closed) after the
    /// request was handed to it. It never left the server: it goes to the
    /// next waiting poll, or waits for one as a new request would, for
    /// `relay_timeout` (a relay-client that restarts polls again within
    /// it), and is failed then. Its user would otherwise wait
    /// `inactive_request` for an answer that cannot come. A request whose
    /// user has left goes nowhere: the relay-client would run it at the
    /// backend for nobody, and its answers would be refused.
    fn hand_back(&self, b: &Arc<Backend>, req: HttpRequest) {
        let id = req.id.clone().unwrap_or_default();
        let Ok(pending) = self.pending(&id) else {
            return;
        };
        let (taken, was_taken) = oneshot::channel();
        let Some(ticket) = b.offer(req, taken) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.undelivered(b, ticket, &id);
            return;
        };
        let (broker, backend) = (self.clone(), b.clone());
        runtime.spawn(async move {
            tokio::select! {
                Ok(()) = was_taken => {}
                // Its user left: out of the queue, quietly.
                () = pending.responses.closed() => {
                    Unqueue {
                        backend: &backend,
                        ticket,
                        left: false,
                    }
                    .leave();
                }
                () = tokio::time::sleep(broker.inner.cfg.relay_timeout) => {
                    broker.undelivered(&backend, ticket, &id);
                }
                () = broker.inner.draining.cancelled() => {
                    broker.undelivered(&backend, ticket, &id);
                }
            }
        });
    }

    /// Takes request `id` (queued as `ticket`) out of `b`'s queue, unless
    /// a poll took it first, and tells its user it was not delivered.
    fn undelivered(&self, b: &Backend, ticket: u64, id: &str) {
        let mut queued = Unqueue {
            backend: b,
            ticket,
            left: false,
        };
        if !queued.leave() {
            return;
        }
        let pending = self.inner.requests.get(id).map(|p| p.clone());
        if let Some(pending) = pending {
            let _ = pending.responses.try_send(Err(ProtoError::Undelivered));
        }
    }

    /// Registers a v2 relay-client connection for `backend` (which becomes
    /// known, as with a first poll).
    pub fn register_tunnel(&self, backend: &str, tunnel: Arc<Tunnel>) {
        let entry = self
            .inner
            .backends
            .entry(backend.to_owned())
            .or_insert_with(|| Arc::new(Backend::new()));
        entry.touch();
        {
            let mut tunnels = lock(&entry.tunnels);
            tunnels.retain(|t| !t.is_gone());
            tunnels.push(tunnel);
        }
        entry.had_tunnel.store(true, Ordering::Release);
        entry.route_added.notify_waiters();
    }

    /// Forgets a tunnel that closed; the name stays known for the
    /// inactive-backend timeout, as after a last poll.
    pub fn unregister_tunnel(&self, backend: &str, tunnel: &Arc<Tunnel>) {
        if let Some(b) = self.inner.backends.get(backend) {
            b.touch();
            lock(&b.tunnels).retain(|t| !Arc::ptr_eq(t, tunnel) && !t.is_gone());
        }
    }

    /// The least busy open tunnel of `backend`, if it has one, counted as
    /// carrying one more request while the returned guard lives.
    ///
    /// Of equally busy ones, the newest: a relay-client that redials after
    /// its network changed leaves a silent old tunnel behind until the
    /// keep-alive finds it gone, and requests sent there would hang (v1
    /// hands requests to the newest poll for the same reason).
    pub fn tunnel(&self, backend: &str) -> Result<Option<TunnelRequest>, BrokerError> {
        if self.inner.draining.is_cancelled() {
            return Err(BrokerError::Draining);
        }
        let Some(b) = self.inner.backends.get(backend).map(|b| b.clone()) else {
            return Ok(None);
        };
        let tunnel = lock(&b.tunnels)
            .iter()
            .filter(|t| !t.is_closed())
            .rev()
            .min_by_key(|t| t.in_flight())
            .cloned();
        Ok(tunnel.map(|tunnel| {
            tunnel.in_flight.fetch_add(1, Ordering::Relaxed);
            self.inner.tunnel_requests.fetch_add(1, Ordering::AcqRel);
            TunnelRequest {
                broker: self.clone(),
                tunnel,
            }
        }))
    }

    /// Waits, when that is worth it, for a route of `backend` to arrive;
    /// called when a request found no tunnel ready. `Ok(true)`: a tunnel
    /// may be there now, look again; `Ok(false)`: take the v1 path.
    ///
    /// A v2 relay-client whose connection dropped (its network changed,
    /// the server missed its pings) redials within its backoff, a second
    /// or so. A request that arrived in that gap used to join the v1
    /// queue, where no poll was coming, and got a 503 after
    /// `timeouts.relay` although the relay-client was back long before.
    /// So a name that had a tunnel, and has neither an open tunnel nor a
    /// waiting poll, holds the request (its body unread) until a tunnel
    /// registers or a poll starts waiting, within `deadline`; then
    /// [`BrokerError::NoFreePoll`], as from the v1 queue.
    pub async fn await_route(&self, backend: &str, deadline: Instant) -> Result<bool, BrokerError> {
        let Some(b) = self.inner.backends.get(backend).map(|b| b.clone()) else {
            return Ok(false);
        };
        if !b.had_tunnel.load(Ordering::Acquire) {
            return Ok(false);
        }
        // Listening before looking, so an arrival in between is not missed.
        let arrived = b.route_added.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        if lock(&b.tunnels).iter().any(|t| !t.is_closed()) {
            return Ok(true);
        }
        if b.has_waiting_poll() {
            return Ok(false);
        }
        tokio::select! {
            () = arrived => Ok(true),
            () = tokio::time::sleep_until(deadline) => Err(BrokerError::NoFreePoll(backend.to_owned())),
            () = self.inner.draining.cancelled() => Err(BrokerError::Draining),
        }
    }

    /// A tunnel of `backend` ready for one more stream, and the handle to
    /// open it with; `None` when no tunnel takes it (the caller falls back
    /// to v1 polls).
    ///
    /// A relay-client's GOAWAY is read by its connection's task, which
    /// then takes the tunnel off the routes. A request that picked the
    /// tunnel in between finds the handle refusing: the tunnel is flagged
    /// here and the next route is tried, so that the request is not
    /// failed for that race. Nothing was sent on the refusing connection.
    ///
    /// The wait for a handle is timed by the span `waiting` makes (the
    /// request's `relay.enqueue`), made once and only if a tunnel is found.
    pub async fn ready_tunnel(
        &self,
        backend: &str,
        waiting: impl Fn() -> tracing::Span,
    ) -> Result<Option<ReadyTunnel>, BrokerError> {
        // Each failed try takes one tunnel off the routes: the bound only
        // matters if tunnels kept arriving and refusing at once.
        let mut span = None;
        for _ in 0..READY_TRIES {
            let Some(treq) = self.tunnel(backend)? else {
                return Ok(None);
            };
            // Held, not entered (see `server::user::child`).
            span.get_or_insert_with(&waiting);
            match treq.tunnel.sender().ready().await {
                Ok(sender) => {
                    return Ok(Some(ReadyTunnel {
                        request: treq,
                        sender,
                    }));
                }
                Err(e) => {
                    tracing::debug!(backend, error = %e, "v2 tunnel refuses new streams; trying the next route");
                    treq.tunnel.refuse_new();
                }
            }
        }
        Ok(None)
    }

    /// Opens `head`'s stream on `route`, or on the next tunnel of
    /// `backend` if that connection turned out to refuse it: a GOAWAY can
    /// be read by its connection's task at any instant after the handle
    /// was ready. A refused `send_request` sent nothing, so the stream
    /// goes elsewhere whatever the body (which is sent after this). The
    /// head is copied for that; a request that h2 itself finds malformed
    /// fails at once and takes no tunnel off the routes.
    pub async fn open_stream(
        &self,
        backend: &str,
        route: ReadyTunnel,
        head: &http::Request<()>,
        end_of_stream: bool,
    ) -> Result<OpenedStream, h2::Error> {
        let ReadyTunnel {
            mut request,
            mut sender,
        } = route;
        let mut tries = 1;
        loop {
            let e = match sender.send_request(copy_head(head), end_of_stream) {
                Ok((response, body)) => {
                    return Ok(OpenedStream {
                        request,
                        response,
                        body,
                    });
                }
                Err(e) => e,
            };
            // A connection-level refusal, not an error of this request.
            if !(e.is_go_away() || e.is_io()) {
                return Err(e);
            }
            tracing::debug!(backend, error = %e, "v2 tunnel refused a new stream; trying the next route");
            request.tunnel.refuse_new();
            match self.ready_tunnel(backend, tracing::Span::none).await {
                Ok(Some(next)) if tries < READY_TRIES => {
                    (request, sender) = (next.request, next.sender);
                }
                _ => return Err(e),
            }
            tries += 1;
        }
    }

    /// Connections of `backend`'s v2 relay-clients not yet over,
    /// including those that only refuse new requests.
    pub fn tunnels_of(&self, backend: &str) -> usize {
        self.inner.backends.get(backend).map_or(0, |b| {
            lock(&b.tunnels).iter().filter(|t| !t.is_gone()).count()
        })
    }

    /// Number of open v2 tunnels.
    pub fn tunnel_count(&self) -> usize {
        self.inner
            .backends
            .iter()
            .map(|b| lock(&b.tunnels).iter().filter(|t| !t.is_closed()).count())
            .sum()
    }

    /// Starts relaying `req` to `backend`: assigns the id, registers the
    /// request and hands it to a waiting poll within the relay timeout.
    /// `span` becomes the parent of the request's chunk spans.
    pub async fn relay(
        &self,
        backend: &str,
        req: HttpRequest,
        span: tracing::Span,
    ) -> Result<Exchange, BrokerError> {
        let deadline = crate::clock::from_now(self.inner.cfg.relay_timeout);
        self.relay_until(backend, req, span, deadline).await
    }

    /// [`Broker::relay`], handed to a poll by `deadline`: the relay
    /// timeout of a request that already waited for a route
    /// ([`Broker::await_route`]) counts from its arrival.
    pub async fn relay_until(
        &self,
        backend: &str,
        mut req: HttpRequest,
        span: tracing::Span,
        deadline: Instant,
    ) -> Result<Exchange, BrokerError> {
        if self.inner.draining.is_cancelled() {
            return Err(BrokerError::Draining);
        }
        let b = self
            .inner
            .backends
            .get(backend)
            .map(|b| b.clone())
            .ok_or_else(|| BrokerError::UnknownBackend(backend.to_owned()))?;

        let id = format!("{backend}:{}", uuid::Uuid::new_v4().simple());
        let (resp_tx, resp_rx) = mpsc::channel(RESPONSE_CHANNEL);
        let (stream_tx, stream_rx) = mpsc::channel(STREAM_CHANNEL);
        let pending = Arc::new(Pending {
            backend: Arc::from(backend),
            responses: resp_tx,
            stream: tokio::sync::Mutex::new(stream_rx),
            traced: crate::telemetry::is_sampled(&span),
            span,
            seq: AtomicU64::new(0),
            upgraded: AtomicBool::new(false),
            trailer_entries: AtomicU64::new(0),
            trailer_bytes: AtomicU64::new(0),
        });
        match self.inner.requests.entry(id.clone()) {
            Entry::Occupied(_) => return Err(BrokerError::DuplicateId(id)),
            Entry::Vacant(v) => {
                v.insert(pending.clone());
            }
        }
        let exchange = Exchange {
            guard: RequestGuard {
                broker: self.clone(),
                id: id.clone(),
            },
            responses: resp_rx,
            stream: Some(stream_tx),
            inactive: self.inner.cfg.inactive_request,
            shared: pending,
        };
        req.id = Some(id);
        self.hand_to_poll(&b, backend, req, deadline).await?;
        Ok(exchange)
    }

    async fn hand_to_poll(
        &self,
        b: &Backend,
        name: &str,
        req: HttpRequest,
        deadline: Instant,
    ) -> Result<(), BrokerError> {
        let (taken, mut was_taken) = oneshot::channel();
        let Some(ticket) = b.offer(req, taken) else {
            return Ok(());
        };
        // Leaves the queue however this future ends, unless a poll took
        // the request.
        let mut queued = Unqueue {
            backend: b,
            ticket,
            left: false,
        };
        let gave_up = tokio::select! {
            // Only a poll removes the entry but this task, and it says so
            // first: the request is on its way.
            Ok(()) = &mut was_taken => {
                queued.left = true;
                return Ok(());
            }
            () = tokio::time::sleep_until(deadline) => BrokerError::NoFreePoll(name.to_owned()),
            () = self.inner.draining.cancelled() => BrokerError::Draining,
        };
        if queued.leave() {
            Err(gave_up)
        } else {
            // Taken in the instant this gave up: it is on its way.
            Ok(())
        }
    }

    /// Delivers one response chunk from a relay-client, checked or not
    /// (see [`ResponseChunk::from_message`]).
    ///
    /// A chunk that cannot be relayed (invalid, or past the trailer caps)
    /// is delivered as a failure, so the user-client gets its 502 at once,
    /// and answered [`BrokerError::Refused`] (400 to the relay-client).
    ///
    /// Waits while the user-client is slow to read (backpressure), but at
    /// most the inactive-request timeout: a user-client that stopped
    /// reading gets its request reaped.
    pub async fn respond(&self, id: &str, chunk: Delivery) -> Result<(), BrokerError> {
        let pending = self.pending(id)?;
        let chunk = match chunk {
            Ok(c) if !pending.admit_trailers(&c) => Err(ProtoError::TooManyTrailers),
            other => other,
        };
        let refused = chunk.as_ref().err().map(ToString::to_string);
        let span = if pending.traced {
            let seq = crate::telemetry::int(pending.seq.fetch_add(1, Ordering::Relaxed));
            let (bytes, eof) = chunk.as_ref().map_or((0, true), |c| (c.body.len(), c.eof));
            let bytes = crate::telemetry::int(bytes);
            if pending.upgraded.load(Ordering::Relaxed) {
                tracing::info_span!(parent: &pending.span, "relay.stream_chunk",
                    relay.direction = "to_user", relay.chunk.seq = seq, relay.chunk.bytes = bytes, relay.chunk.eof = eof)
            } else {
                tracing::info_span!(parent: &pending.span, "relay.response_chunk",
                    relay.chunk.seq = seq, relay.chunk.bytes = bytes, relay.chunk.eof = eof)
            }
        } else {
            tracing::Span::none()
        };
        let send = tokio::time::timeout(
            self.inner.cfg.inactive_request.min(MAX_POST_WAIT),
            pending.responses.send(chunk),
        );
        let sent = send.await;
        drop(span);
        if let Some(reason) = refused {
            // Whether or not the user-client was still there to be told,
            // this request is over.
            self.forget(id);
            return Err(BrokerError::Refused(reason));
        }
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(BrokerError::UnknownRequest(id.to_owned())),
            Err(_) => {
                // Reaped: the relay-client must stop, as for any gone id.
                self.forget(id);
                Err(BrokerError::UnknownRequest(id.to_owned()))
            }
        }
    }

    /// Next user-to-backend bytes of an upgraded request: waits up to the
    /// poll timeout and then answers empty; [`BrokerError::UnknownRequest`]
    /// once the request is gone.
    ///
    /// The user-client's half-close is [`BrokerError::HalfClosed`]
    /// only with `half_close` (a relay-client that asked for it, see
    /// [`crate::proto::HALF_CLOSE_PARAM`]). A Go relay-client closes the
    /// whole backend connection on 410, losing what the backend still had
    /// to say, so for it the stream stays open and silent until the
    /// request ends, as the Go server keeps it.
    ///
    /// While the server drains, a read waits at most [`DRAINING_WAIT`]:
    /// short enough not to hold up the shutdown, long enough that the
    /// relay-client's next read does not come back at once, round after
    /// round, for the rest of the shutdown.
    pub async fn request_stream(&self, id: &str, half_close: bool) -> Result<Bytes, BrokerError> {
        let pending = self.pending(id)?;
        let mut rx = pending.stream.lock().await;
        let draining = self.inner.draining.is_cancelled();
        let wait = if draining {
            self.inner.cfg.poll_timeout.min(DRAINING_WAIT)
        } else {
            self.inner.cfg.poll_timeout
        };
        let first = tokio::select! {
            // Queued bytes first, whatever else is ready.
            biased;
            r = rx.recv() => r,
            () = tokio::time::sleep(wait) => return Ok(Bytes::new()),
            () = self.inner.draining.cancelled(), if !draining => return Ok(Bytes::new()),
        };
        let Some(first) = first else {
            if half_close {
                // The user's end of input, unless the request itself is
                // over (reaped, or its answer ended): that is no
                // half-close.
                return Err(if self.inner.requests.contains_key(id) {
                    BrokerError::HalfClosed
                } else {
                    BrokerError::UnknownRequest(id.to_owned())
                });
            }
            return tokio::select! {
                // The user's task dropped its end: the request is over.
                () = pending.responses.closed() => Err(BrokerError::StreamClosed),
                () = tokio::time::sleep(wait) => Ok(Bytes::new()),
                () = self.inner.draining.cancelled(), if !draining => Ok(Bytes::new()),
            };
        };
        // Coalesce what is already queued, to save round trips.
        let bytes = if rx.is_empty() || (!half_close && first.len() >= GO_STREAM_READ) {
            first
        } else {
            let limit = if half_close {
                MAX_STREAM_READ
            } else {
                GO_STREAM_READ
            };
            let mut buf = BytesMut::from(first);
            while buf.len() < limit {
                match rx.try_recv() {
                    Ok(more) => buf.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            buf.freeze()
        };
        if pending.traced {
            let seq = crate::telemetry::int(pending.seq.fetch_add(1, Ordering::Relaxed));
            // A span of its own per chunk that crossed the relay.
            drop(
                tracing::info_span!(parent: &pending.span, "relay.stream_chunk",
                relay.direction = "to_backend", relay.chunk.seq = seq,
                relay.chunk.bytes = crate::telemetry::int(bytes.len()), relay.chunk.eof = false),
            );
        }
        Ok(bytes)
    }

    /// The backend a live request belongs to, looked up (never parsed from
    /// the id string).
    pub fn owner(&self, id: &str) -> Option<Arc<str>> {
        self.inner.requests.get(id).map(|p| p.backend.clone())
    }

    fn pending(&self, id: &str) -> Result<Arc<Pending>, BrokerError> {
        // Clone out of the map: no shard lock may be held across an await.
        self.inner
            .requests
            .get(id)
            .map(|p| p.clone())
            .ok_or_else(|| BrokerError::UnknownRequest(id.to_owned()))
    }

    fn forget(&self, id: &str) {
        if self.inner.requests.remove(id).is_some() {
            self.inner.request_ended.notify_waiters();
        }
    }

    /// Forgets backends that have not polled for the inactive-backend
    /// timeout and have no poll waiting. Returns the names forgotten.
    pub fn reap_backends(&self) -> Vec<String> {
        let limit = self.inner.cfg.inactive_backend;
        let mut reaped = Vec::new();
        self.inner.backends.retain(|name, b| {
            let keep = b.has_waiting_poll()
                || b.has_queued_request()
                || b.has_tunnel()
                || lock(&b.last_seen).elapsed() < limit;
            if !keep {
                reaped.push(name.clone());
            }
            keep
        });
        reaped
    }

    /// Whether a relay-client has polled for `backend` recently enough.
    pub fn knows_backend(&self, backend: &str) -> bool {
        self.inner.backends.contains_key(backend)
    }

    /// Number of known backends.
    pub fn backend_count(&self) -> usize {
        self.inner.backends.len()
    }

    /// Number of requests in flight (including upgraded connections).
    pub fn active_requests(&self) -> usize {
        self.inner.requests.len() + self.inner.tunnel_requests.load(Ordering::Acquire)
    }

    /// Stops taking new requests and answers waiting polls; requests in
    /// flight go on.
    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.inner.draining.is_cancelled()
    }

    /// Closes every tunnel (the end of a shutdown): their connections
    /// are dropped by their tasks.
    pub fn close_tunnels(&self) {
        for b in self.inner.backends.iter() {
            for t in lock(&b.tunnels).iter() {
                t.close();
            }
        }
    }

    pub fn begin_drain(&self) {
        self.inner.draining.cancel();
    }

    /// Ends every request still in flight: the drain deadline passed.
    /// A user-client still waiting for its answer's head gets a 503 now,
    /// before the server closes the connections, not a dropped connection
    /// without a word. (Answers already streaming end with their
    /// connections: cut, never complete.)
    pub fn abort_all(&self) {
        self.inner.aborted.cancel();
        self.inner.requests.clear();
        self.inner.request_ended.notify_waiters();
    }

    /// Resolves when no request is in flight any more.
    pub async fn drained(&self) {
        loop {
            let ended = self.inner.request_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.active_requests() == 0 {
                return;
            }
            ended.await;
        }
    }
}

/// Removes a request id from the broker when dropped.
struct RequestGuard {
    broker: Broker,
    id: String,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.broker.forget(&self.id);
    }
}

/// The user-client side of one relayed request. Dropping it frees the
/// request at once (id, channels, the relay-client's slot).
pub struct Exchange {
    guard: RequestGuard,
    responses: mpsc::Receiver<Delivery>,
    stream: Option<mpsc::Sender<Bytes>>,
    inactive: Duration,
    shared: Arc<Pending>,
}

impl Exchange {
    pub fn id(&self) -> &str {
        &self.guard.id
    }

    /// The backend the request is for.
    pub fn backend(&self) -> &str {
        &self.shared.backend
    }

    /// The next chunk; `Ok(None)` if the request was reaped from the
    /// relay-client side, an error after the inactive-request timeout or
    /// when the relay-client's answer could not be relayed.
    pub async fn next_chunk(&mut self) -> Result<Option<ResponseChunk>, BrokerError> {
        let Self {
            guard,
            responses,
            inactive,
            ..
        } = self;
        let next = tokio::select! {
            r = tokio::time::timeout(*inactive, responses.recv()) => r,
            // The drain's deadline passed: the server is going away.
            () = guard.broker.inner.aborted.cancelled() => return Err(BrokerError::Draining),
        };
        match next {
            Err(_) => Err(BrokerError::Inactive(*inactive)),
            Ok(None) => Ok(None),
            Ok(Some(Err(ProtoError::Undelivered))) => Err(BrokerError::Undelivered),
            Ok(Some(delivery)) => delivery.map(Some).map_err(BrokerError::BadResponse),
        }
    }

    /// Polling form of [`Exchange::next_chunk`] without the timer, for
    /// response bodies that keep their own.
    pub fn poll_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Delivery>> {
        self.responses.poll_recv(cx)
    }

    pub fn inactive_timeout(&self) -> Duration {
        self.inactive
    }

    /// The sender of user-to-backend bytes, for an upgraded connection.
    /// Dropping it tells the relay-client the stream is over (410).
    pub fn take_stream(&mut self) -> Option<mpsc::Sender<Bytes>> {
        // Later response chunks are stream bytes (`relay.stream_chunk`).
        self.shared.upgraded.store(true, Ordering::Relaxed);
        self.stream.take()
    }

    /// The request's `relay.request` span.
    pub fn span(&self) -> &tracing::Span {
        &self.shared.span
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn broker() -> Broker {
        Broker::new(BrokerConfig {
            poll_timeout: Duration::from_millis(200),
            relay_timeout: Duration::from_millis(200),
            inactive_request: Duration::from_millis(300),
            inactive_backend: Duration::from_millis(100),
        })
    }

    fn request() -> HttpRequest {
        HttpRequest {
            method: Some("GET".into()),
            url: Some("http://invalid/".into()),
            ..Default::default()
        }
    }

    /// A tunnel over an in-memory connection, and the relay-client's end
    /// of it: a bare HTTP/2 server (each side's connection is driven by
    /// its own task; the server's hands its connection back on request).
    async fn tunnel_pair() -> (
        Arc<Tunnel>,
        tokio::task::JoinHandle<h2::server::Connection<tokio::io::DuplexStream, Bytes>>,
        tokio_util::sync::CancellationToken,
    ) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let stop = tokio_util::sync::CancellationToken::new();
        let server = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut conn = h2::server::handshake(theirs).await.expect("handshake");
                // Answers pings and reads frames until told to stop.
                tokio::select! {
                    _ = conn.accept() => {}
                    () = stop.cancelled() => {}
                }
                conn
            })
        };
        let (sender, conn) = h2::client::handshake(ours).await.expect("handshake");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        (Tunnel::new(sender), server, stop)
    }

    /// A name whose tunnel went away holds a request until a route comes:
    /// a tunnel (look again) or a poll (take the v1 path). A name that
    /// never had a tunnel queues for polls at once, as before.
    #[tokio::test]
    async fn a_request_waits_for_a_route_only_where_a_tunnel_went_away() {
        let b = broker();
        let soon = || crate::clock::from_now(Duration::from_secs(5));
        b.poll("v1-only").await.expect_err("no request: 408");
        assert!(!b.await_route("v1-only", soon()).await.unwrap());
        assert!(!b.await_route("unknown", soon()).await.unwrap());

        let (t, _server, _stop) = tunnel_pair().await;
        b.register_tunnel("r", t.clone());
        assert!(
            b.await_route("r", soon()).await.unwrap(),
            "a tunnel is open"
        );
        t.close();
        b.unregister_tunnel("r", &t);

        // A request that waits for "r", in the background.
        let wait = || {
            let b = b.clone();
            tokio::spawn(async move { b.await_route("r", soon()).await })
        };

        // A tunnel comes back.
        let waiting = wait();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        let (t2, _server2, _stop2) = tunnel_pair().await;
        b.register_tunnel("r", t2.clone());
        assert!(waiting.await.unwrap().unwrap());
        t2.close();
        b.unregister_tunnel("r", &t2);

        // A poll comes instead: look again, then go to it.
        let waiting = wait();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let poll = tokio::spawn({
            let b = b.clone();
            async move { b.poll("r").await }
        });
        assert!(waiting.await.unwrap().unwrap());
        assert!(!b.await_route("r", soon()).await.unwrap(), "a poll waits");
        poll.abort();
        let _ = poll.await;

        // Nothing comes: the deadline.
        let deadline = crate::clock::from_now(Duration::from_millis(100));
        assert!(matches!(
            b.await_route("r", deadline).await,
            Err(BrokerError::NoFreePoll(_))
        ));
    }

    /// Requests go to the least busy tunnel, and of equally busy ones to
    /// the newest.
    #[tokio::test]
    async fn the_newest_of_the_least_busy_tunnels_is_picked() {
        let b = broker();
        let (old, _old_server, _old_stop) = tunnel_pair().await;
        let (new, _new_server, _new_stop) = tunnel_pair().await;
        b.register_tunnel("r", old.clone());
        b.register_tunnel("r", new.clone());
        let first = b.tunnel("r").unwrap().unwrap();
        assert!(Arc::ptr_eq(&first.tunnel, &new));
        let second = b.tunnel("r").unwrap().unwrap();
        assert!(Arc::ptr_eq(&second.tunnel, &old), "the less busy one");
        drop(first);
        let third = b.tunnel("r").unwrap().unwrap();
        assert!(Arc::ptr_eq(&third.tunnel, &new));
    }

    /// Has the relay-client's end of a pair say GOAWAY, and waits until
    /// our end has read it (its handle refuses new streams).
    async fn go_away(
        tunnel: &Tunnel,
        server: tokio::task::JoinHandle<h2::server::Connection<tokio::io::DuplexStream, Bytes>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        stop.cancel();
        let mut conn = server.await.expect("server task");
        conn.graceful_shutdown();
        tokio::spawn(async move { while conn.accept().await.is_some() {} });
        let mut sender = tunnel.sender();
        for _ in 0..200 {
            let polled =
                std::future::poll_fn(|cx| std::task::Poll::Ready(sender.poll_ready(cx))).await;
            if matches!(polled, std::task::Poll::Ready(Err(_))) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("GOAWAY not read within 2 s");
    }

    #[tokio::test]
    async fn request_skips_a_tunnel_whose_goaway_was_just_read() {
        let b = broker();
        let (leaving, server, stop) = tunnel_pair().await;
        let (staying, _server, _stop) = tunnel_pair().await;
        b.register_tunnel("r", staying.clone());
        b.register_tunnel("r", leaving.clone());
        // The relay-client said GOAWAY, and the connection read it, but
        // the tunnel is still on the routes (its task has not seen it):
        // equally loaded and newer, it is the first one picked.
        go_away(&leaving, server, stop).await;
        assert!(!leaving.is_closed());
        let ReadyTunnel {
            request: treq,
            mut sender,
        } = route_of_r(&b).await;
        assert!(Arc::ptr_eq(&treq.tunnel, &staying));
        assert!(leaving.is_closed(), "the refusing tunnel left the routes");
        let (_response, _send) = sender
            .send_request(get(), true)
            .expect("the stream opens on the tunnel that stays");
        drop(treq);

        // With no other tunnel, the request goes to v1 polls.
        let b = broker();
        let (leaving, server, stop) = tunnel_pair().await;
        b.register_tunnel("r", leaving.clone());
        go_away(&leaving, server, stop).await;
        assert!(
            b.ready_tunnel("r", tracing::Span::none)
                .await
                .expect("ready")
                .is_none()
        );
        assert!(leaving.is_closed());
        assert!(
            b.ready_tunnel("other", tracing::Span::none)
                .await
                .expect("ready")
                .is_none()
        );
    }

    /// The route `ready_tunnel` finds for backend "r"; there must be one.
    async fn route_of_r(b: &Broker) -> ReadyTunnel {
        b.ready_tunnel("r", tracing::Span::none)
            .await
            .expect("ready")
            .expect("a tunnel takes it")
    }

    fn get() -> http::Request<()> {
        http::Request::get("http://relay.invalid/")
            .body(())
            .expect("request")
    }

    #[tokio::test]
    async fn a_stream_refused_by_a_goaway_read_meanwhile_opens_on_the_next_tunnel() {
        let b = broker();
        let (leaving, server, stop) = tunnel_pair().await;
        b.register_tunnel("r", leaving.clone());
        // The handle was ready; then the relay-client's GOAWAY was read
        // before the stream was opened, and a second tunnel came up.
        let route = route_of_r(&b).await;
        let (staying, _server, _stop) = tunnel_pair().await;
        b.register_tunnel("r", staying.clone());
        go_away(&leaving, server, stop).await;
        let opened = b
            .open_stream("r", route, &get(), true)
            .await
            .expect("opened on the next tunnel");
        assert!(Arc::ptr_eq(&opened.request.tunnel, &staying));
        assert!(leaving.is_closed());
        assert_eq!(leaving.in_flight(), 0, "the refused try is not counted");
        assert_eq!(staying.in_flight(), 1);
        drop(opened);

        // A request that h2 refuses for itself (a connection-specific
        // header) fails without taking the tunnel off the routes.
        let route = route_of_r(&b).await;
        let mut bad = get();
        bad.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("x"),
        );
        assert!(b.open_stream("r", route, &bad, true).await.is_err());
        assert!(!staying.is_closed());

        // With no tunnel left, the stream's error is the answer.
        let b = broker();
        let (leaving, server, stop) = tunnel_pair().await;
        b.register_tunnel("r", leaving.clone());
        let route = route_of_r(&b).await;
        go_away(&leaving, server, stop).await;
        let refused = b.open_stream("r", route, &get(), true).await;
        assert!(refused.is_err_and(|e| e.is_go_away()));
        assert!(leaving.is_closed());
    }

    #[tokio::test]
    async fn unknown_backend_until_first_poll() {
        let b = broker();
        assert!(matches!(
            b.relay("r", request(), tracing::Span::none()).await,
            Err(BrokerError::UnknownBackend(_))
        ));
        assert!(matches!(b.poll("r").await, Err(BrokerError::PollTimeout)));
        assert!(matches!(
            b.relay("r", request(), tracing::Span::none()).await,
            Err(BrokerError::NoFreePoll(_))
        ));
        assert_eq!(b.active_requests(), 0, "a failed hand-off frees the id");
    }

    /// A request for "r" handed to a waiting poll: the user side's
    /// exchange and what the poll got.
    async fn delivered(b: &Broker) -> (Exchange, HttpRequest) {
        let poller = {
            let b = b.clone();
            tokio::spawn(async move { b.poll("r").await })
        };
        tokio::task::yield_now().await;
        let ex = b
            .relay("r", request(), tracing::Span::none())
            .await
            .unwrap();
        (ex, poller.await.unwrap().unwrap())
    }

    #[tokio::test]
    async fn request_reaches_poll_and_chunks_flow_back() {
        let b = broker();
        let (mut ex, got) = delivered(&b).await;
        let id = got.id.clone().unwrap();
        assert!(id.starts_with("r:"));
        assert_eq!(id.len(), 2 + 32);
        assert_eq!(b.owner(&id).as_deref(), Some("r"));

        b.respond(&id, chunk(Some(200), HeaderMap::new()))
            .await
            .unwrap();
        let got = ex.next_chunk().await.unwrap().unwrap();
        assert_eq!(got.head.unwrap().status, 200);

        drop(ex);
        assert!(matches!(
            b.respond(&id, chunk(None, HeaderMap::new())).await,
            Err(BrokerError::UnknownRequest(_))
        ));
        assert_eq!(b.active_requests(), 0);
    }

    /// Requests that find no poll wait in order; each poll that arrives
    /// takes the oldest at once.
    #[tokio::test]
    async fn queued_requests_go_to_arriving_polls_in_order() {
        let b = broker();
        assert!(matches!(b.poll("r").await, Err(BrokerError::PollTimeout)));
        let users: Vec<_> = (0..3)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move {
                    let mut req = request();
                    req.url = Some(format!("http://invalid/{i}").into());
                    let ex = b.relay("r", req, tracing::Span::none()).await?;
                    Ok::<_, BrokerError>(ex.id().to_owned())
                })
            })
            .collect();
        // Each is queued before the next is made.
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        let mut ids = Vec::new();
        for i in 0..3 {
            let got = b.poll("r").await.unwrap();
            assert_eq!(
                got.url.as_deref(),
                Some(format!("http://invalid/{i}").as_bytes())
            );
            ids.push(got.id.unwrap());
        }
        for (user, id) in users.into_iter().zip(ids) {
            assert_eq!(user.await.unwrap().unwrap(), id);
        }
    }

    /// A poll that goes away (its connection closed) after a request was
    /// handed to it, before it could answer with it: the request goes to
    /// the next waiting poll, or to the next one that comes within the
    /// relay timeout; after that its user is told, instead of waiting
    /// `inactive_request`.
    #[tokio::test]
    async fn a_request_in_a_poll_that_went_away_is_not_lost() {
        use std::future::Future as _;
        let b = broker();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        for next_poll in [true, false] {
            // The poll is waiting: polled once, then never again.
            let mut gone = Box::pin(b.poll("r"));
            assert!(gone.as_mut().poll(&mut cx).is_pending());
            let ex = b
                .relay("r", request(), tracing::Span::none())
                .await
                .unwrap();
            let next = next_poll.then(|| {
                let b = b.clone();
                tokio::spawn(async move { b.poll("r").await })
            });
            tokio::task::yield_now().await;
            drop(gone);
            match next {
                Some(next) => {
                    let got = next.await.unwrap().unwrap();
                    assert_eq!(got.id.as_deref(), Some(ex.id()));
                }
                None => {
                    // Queued again: a poll that comes within the relay
                    // timeout (a restarted relay-client's) takes it.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let got = b.poll("r").await.unwrap();
                    assert_eq!(got.id.as_deref(), Some(ex.id()));
                }
            }
        }
        // No poll comes: the user is told at the relay timeout (200 ms
        // here), not at `inactive_request`.
        let mut ex = given_back(&b).await;
        let started = Instant::now();
        assert!(matches!(
            ex.next_chunk().await,
            Err(BrokerError::Undelivered)
        ));
        assert!(started.elapsed() < Duration::from_millis(290));
        let backend = b.inner.backends.get("r").map(|e| e.clone()).unwrap();
        assert_eq!(lock(&backend.meeting).requests.len(), 0);
    }

    /// A request of backend `r` handed to a poll that then went away
    /// (polled once, then dropped), with no other poll waiting.
    async fn given_back(b: &Broker) -> Exchange {
        use std::future::Future as _;
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut gone = Box::pin(b.poll("r"));
        assert!(gone.as_mut().poll(&mut cx).is_pending());
        let ex = b
            .relay("r", request(), tracing::Span::none())
            .await
            .unwrap();
        drop(gone);
        ex
    }

    /// A request given back by a poll that went away leaves the queue
    /// when its user leaves: the next poll does not get it.
    #[tokio::test]
    async fn a_request_given_back_leaves_with_its_user() {
        let b = broker();
        let ex = given_back(&b).await;
        let backend = b.inner.backends.get("r").map(|e| e.clone()).unwrap();
        assert_eq!(lock(&backend.meeting).requests.len(), 1, "queued again");
        drop(ex);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(lock(&backend.meeting).requests.len(), 0);
        assert!(matches!(b.poll("r").await, Err(BrokerError::PollTimeout)));
    }

    /// A queued request whose user-client went away, or that waited past
    /// the relay timeout, leaves the queue: no poll gets it.
    #[tokio::test]
    async fn a_queued_request_given_up_reaches_no_poll() {
        let b = broker();
        assert!(matches!(b.poll("r").await, Err(BrokerError::PollTimeout)));
        let gone = {
            let b = b.clone();
            tokio::spawn(async move { b.relay("r", request(), tracing::Span::none()).await })
        };
        tokio::task::yield_now().await;
        gone.abort();
        assert!(matches!(gone.await, Err(e) if e.is_cancelled()));
        assert!(matches!(
            b.relay("r", request(), tracing::Span::none()).await,
            Err(BrokerError::NoFreePoll(_))
        ));
        assert_eq!(b.active_requests(), 0);
        // Gone from the queue, bodies and all, not merely skipped later.
        let backend = b.inner.backends.get("r").map(|e| e.clone()).unwrap();
        assert_eq!(lock(&backend.meeting).requests.len(), 0);
        assert!(matches!(b.poll("r").await, Err(BrokerError::PollTimeout)));
    }

    fn chunk(status: Option<u16>, trailers: HeaderMap) -> Delivery {
        Ok(ResponseChunk {
            head: status.map(|s| crate::proto::ResponseHead {
                status: http::StatusCode::from_u16(s).unwrap(),
                headers: HeaderMap::new(),
            }),
            body: Bytes::new(),
            trailers,
            eof: false,
            backend_duration_ms: None,
        })
    }

    async fn started(b: &Broker) -> (Exchange, String) {
        let poller = {
            let b = b.clone();
            tokio::spawn(async move { b.poll("r").await })
        };
        tokio::task::yield_now().await;
        let ex = b
            .relay("r", request(), tracing::Span::none())
            .await
            .unwrap();
        let id = poller.await.unwrap().unwrap().id.unwrap();
        (ex, id)
    }

    #[tokio::test]
    async fn a_refused_chunk_fails_the_user_side_and_ends_the_request() {
        let b = broker();
        let (mut ex, id) = started(&b).await;
        let refused = b
            .respond(&id, Err(ProtoError::HeaderName("x\\xff".into())))
            .await;
        assert!(matches!(refused, Err(BrokerError::Refused(r)) if r.contains("x\\xff")));
        assert!(matches!(
            ex.next_chunk().await,
            Err(BrokerError::BadResponse(ProtoError::HeaderName(_)))
        ));
        assert_eq!(b.active_requests(), 0);
    }

    #[tokio::test]
    async fn trailers_are_capped_over_all_chunks() {
        let b = broker();
        let (mut ex, id) = started(&b).await;
        let mut many = HeaderMap::new();
        for i in 0..MAX_TRAILERS / 2 {
            many.append(
                http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                http::HeaderValue::from_static("v"),
            );
        }
        b.respond(&id, chunk(Some(200), many.clone()))
            .await
            .unwrap();
        b.respond(&id, chunk(None, many.clone())).await.unwrap();
        assert!(matches!(
            b.respond(&id, chunk(None, many)).await,
            Err(BrokerError::Refused(_))
        ));
        assert!(ex.next_chunk().await.unwrap().is_some());
        assert!(ex.next_chunk().await.unwrap().is_some());
        assert!(matches!(
            ex.next_chunk().await,
            Err(BrokerError::BadResponse(ProtoError::TooManyTrailers))
        ));
    }

    #[tokio::test]
    async fn stalled_user_client_gets_reaped() {
        let b = broker();
        let poller = {
            let b = b.clone();
            tokio::spawn(async move { b.poll("r").await })
        };
        tokio::task::yield_now().await;
        let _ex = b
            .relay("r", request(), tracing::Span::none())
            .await
            .unwrap();
        let id = poller.await.unwrap().unwrap().id.unwrap();
        for _ in 0..RESPONSE_CHANNEL {
            b.respond(&id, chunk(None, HeaderMap::new())).await.unwrap();
        }
        assert!(matches!(
            b.respond(&id, chunk(None, HeaderMap::new())).await,
            Err(BrokerError::UnknownRequest(_))
        ));
        assert_eq!(b.active_requests(), 0);
    }

    #[tokio::test]
    async fn idle_backends_are_forgotten() {
        let b = broker();
        let _ = b.poll("r").await;
        assert!(b.knows_backend("r"));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(b.reap_backends(), vec!["r".to_owned()]);
        assert!(!b.knows_backend("r"));
    }

    /// A request waiting for its relay-client's next poll keeps the name
    /// known past the inactive-backend timeout; that poll then takes it.
    #[tokio::test]
    async fn a_queued_request_keeps_its_backend() {
        let b = broker();
        let _ = b.poll("r").await;
        let user = {
            let b = b.clone();
            tokio::spawn(async move { b.relay("r", request(), tracing::Span::none()).await })
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(b.reap_backends().is_empty());
        assert!(b.poll("r").await.is_ok());
        assert!(user.await.unwrap().is_ok());
    }

    /// A broker with the default poll timeout (30 s) and long inactivity
    /// limits, for request-stream reads.
    fn stream_broker() -> Broker {
        Broker::new(BrokerConfig {
            poll_timeout: Duration::from_secs(30),
            relay_timeout: Duration::from_secs(30),
            inactive_request: Duration::from_secs(300),
            inactive_backend: Duration::from_secs(300),
        })
    }

    /// A request on [`stream_broker`], delivered to a poll and switched
    /// to a stream: the broker, its exchange, its id and the sender of
    /// the user's bytes.
    async fn streaming() -> (Broker, Exchange, String, mpsc::Sender<Bytes>) {
        let b = stream_broker();
        let (mut ex, got) = delivered(&b).await;
        let id = got.id.unwrap();
        let to_backend = ex.take_stream().unwrap();
        (b, ex, id, to_backend)
    }

    /// A request-stream read of `id` in a task of its own.
    fn spawn_read(
        b: &Broker,
        id: &str,
        half_close: bool,
    ) -> tokio::task::JoinHandle<Result<Bytes, BrokerError>> {
        let b = b.clone();
        let id = id.to_owned();
        tokio::spawn(async move { b.request_stream(&id, half_close).await })
    }

    /// During a drain a request-stream read still waits (briefly) for
    /// bytes: the relay-client's reads do not spin.
    #[tokio::test(start_paused = true)]
    async fn request_stream_reads_wait_while_draining() {
        let (b, _ex, id, to_backend) = streaming().await;
        // A read waiting when the drain begins is answered at once.
        let reader = spawn_read(&b, &id, true);
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        b.begin_drain();
        assert!(reader.await.unwrap().unwrap().is_empty());
        assert!(started.elapsed() < Duration::from_millis(10));
        // Later reads wait for bytes, up to the draining wait.
        let started = tokio::time::Instant::now();
        assert!(b.request_stream(&id, true).await.unwrap().is_empty());
        assert_eq!(started.elapsed(), DRAINING_WAIT);
        to_backend.send(Bytes::from_static(b"typed")).await.unwrap();
        assert_eq!(b.request_stream(&id, true).await.unwrap(), "typed");
    }

    /// A chunk post waits for room at most 45 s, however long
    /// `inactive_request`: then the request is over (400 to the post).
    #[tokio::test(start_paused = true)]
    async fn a_chunk_post_waits_for_room_less_than_a_go_call_lasts() {
        let b = stream_broker();
        let (_ex, got) = delivered(&b).await;
        let id = got.id.unwrap();
        for _ in 0..RESPONSE_CHANNEL {
            b.respond(&id, chunk(None, HeaderMap::new())).await.unwrap();
        }
        let started = tokio::time::Instant::now();
        assert!(matches!(
            b.respond(&id, chunk(None, HeaderMap::new())).await,
            Err(BrokerError::UnknownRequest(_))
        ));
        assert_eq!(started.elapsed(), MAX_POST_WAIT);
    }

    /// Queued reads are joined into one answer, less for a relay-client
    /// that did not ask for `half_close` (the Go relay-client).
    #[tokio::test]
    async fn request_stream_answers_join_queued_reads() {
        let (b, _ex, id, to_backend) = streaming().await;
        let read = Bytes::from(vec![7u8; 10 * 1024]);
        for _ in 0..8 {
            to_backend.send(read.clone()).await.unwrap();
        }
        // Go: 10 KiB, then one more read past 16 KiB.
        assert_eq!(b.request_stream(&id, false).await.unwrap().len(), 20 * 1024);
        assert_eq!(b.request_stream(&id, false).await.unwrap().len(), 20 * 1024);
        // Ours: all that is queued.
        assert_eq!(b.request_stream(&id, true).await.unwrap().len(), 40 * 1024);
    }

    /// The user's half-close is a 410 only for a relay-client that asked
    /// for it; for the others the stream stays open, silent, until the
    /// request is over.
    #[tokio::test(start_paused = true)]
    async fn the_users_half_close_is_told_only_when_asked() {
        let (b, ex, id, to_backend) = streaming().await;
        to_backend.send(Bytes::from_static(b"last")).await.unwrap();
        drop(to_backend);
        // Bytes sent before the close come first, whichever the caller.
        assert_eq!(b.request_stream(&id, false).await.unwrap(), "last");
        let started = tokio::time::Instant::now();
        assert!(b.request_stream(&id, false).await.unwrap().is_empty());
        assert_eq!(started.elapsed(), Duration::from_secs(30));
        assert!(matches!(
            b.request_stream(&id, true).await,
            Err(BrokerError::HalfClosed)
        ));
        // A silent read ends when the request does.
        let reader = spawn_read(&b, &id, false);
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        drop(ex);
        assert!(matches!(
            reader.await.unwrap(),
            Err(BrokerError::StreamClosed)
        ));
        assert!(started.elapsed() < Duration::from_millis(10));
        // A request that is over is no half-close.
        assert!(matches!(
            b.request_stream(&id, true).await,
            Err(BrokerError::UnknownRequest(_))
        ));
    }

    /// A request that ends while the user is still sending (reaped, or
    /// its answer over) is not the user's end of input.
    #[tokio::test]
    async fn a_request_that_ends_is_no_half_close() {
        let (b, ex, id, to_backend) = streaming().await;
        let reader = spawn_read(&b, &id, true);
        tokio::task::yield_now().await;
        // The pipe's end drops its sender first, then the exchange.
        b.forget(&id);
        drop(to_backend);
        drop(ex);
        assert!(matches!(
            reader.await.unwrap(),
            Err(BrokerError::UnknownRequest(_))
        ));
    }

    #[tokio::test]
    async fn drain_answers_polls() {
        let b = broker();
        let poller = {
            let b = b.clone();
            tokio::spawn(async move { b.poll("r").await })
        };
        tokio::task::yield_now().await;
        b.begin_drain();
        assert!(matches!(poller.await.unwrap(), Err(BrokerError::Draining)));
        b.drained().await;
    }
}
