//! The relay-client: keeps `pending_polls` long polls open towards the
//! relay server, and runs each request it receives against the backend.
//!
//! It only ever dials out; the backend needs no public endpoint.

mod forward;
pub mod transport;
mod tunnel;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::client::TokenSource;
use crate::config::{ClientConfig, Transport};
use crate::tls::TlsError;
use transport::{HttpsClient, RelayTransport};
use tunnel::TunnelError;

/// Least backoff step after the server refused our token (each wait is
/// spread over half to one and a half times its step, as all are).
const AUTH_BACKOFF: Duration = Duration::from_secs(2);

/// How long requests in flight may run on after shutdown was asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long requests abandoned then have to tell the server so: longer
/// than a chunk post's retries (`forward::POST_RETRY_WINDOW`).
const ABANDON_WAIT: Duration = Duration::from_secs(4);

/// Why the relay-client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot build the token client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Tunnel(#[from] TunnelError),
    #[error("transport = \"v2\", but the relay server does not offer v2 (it answered {0})")]
    V2NotOffered(http::StatusCode),
}

/// What every request task shares.
pub struct Ctx {
    cfg: ClientConfig,
    transport: RelayTransport,
    backend: HttpsClient,
    /// The backend client of v2 streams (bodies piped, not buffered).
    backend_stream: HttpsClient<tunnel::Body>,
    /// `backend_url` without a trailing slash; request paths are appended.
    backend_base: String,
    /// One permit per request in flight (`max_concurrent_requests`).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// Set while the server offers no v2: most likely the fleet's Go
    /// server, whose chunks must stay small ([`Ctx::max_chunk`]).
    v1_only_server: std::sync::atomic::AtomicBool,
    /// Whether the last v1 poll was answered (not refused): a refused v2
    /// upgrade is then not our token's, and is not probed again at the
    /// pace of a refusal.
    polls_answered: std::sync::atomic::AtomicBool,
    /// Cancelled when the shutdown's grace is over: v1 requests still in
    /// flight tell the server they are abandoned
    /// ([`forward::forward_until`]).
    abandon: CancellationToken,
}

/// Largest chunk posted to a server that offers no v2, as the Go
/// relay-client sends. The Go server hands each chunk to its user-client
/// while it holds the lock of its whole broker, until the previous chunk
/// is written out: with a slow user, a large chunk stops every poll and
/// post of every robot on that server for as long.
pub const V1_SERVER_MAX_CHUNK: u64 = 50 * 1024;

/// A poll answered empty sooner than this was not a long poll.
const FAST_EMPTY_POLL: Duration = Duration::from_millis(100);
/// The longest wait after such a poll.
const FAST_EMPTY_POLL_MAX_WAIT: Duration = Duration::from_secs(1);

/// Exponential backoff between failed polls, so a down server is not
/// hammered and a restarted one is found again quickly. Each wait is
/// spread over half to one and a half times its step: after a server
/// restart, a whole fleet must not redial in lockstep.
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    pub(crate) fn new() -> Self {
        Self { next: Self::MIN }
    }
    pub(crate) fn reset(&mut self) {
        self.next = Self::MIN;
    }
    pub(crate) fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        now.mul_f64(0.5 + fastrand::f64())
    }

    /// The wait after a failed call; a refused token does not get better
    /// by asking faster.
    pub(crate) fn after_failure(&mut self, refused: bool) -> Duration {
        if refused {
            // Raised before the spread, not after: a floor under the
            // spread wait would make a fleet refused at the same moment
            // (a key or audience change on the server) retry in step.
            self.next = self.next.max(AUTH_BACKOFF);
        }
        self.step()
    }
}

impl Ctx {
    pub fn new(cfg: ClientConfig) -> Result<Self, ClientError> {
        let tokens = Arc::new(TokenSource::new(&cfg.auth)?);
        let transport = RelayTransport::new(&cfg, tokens)?;
        let backend_tls = crate::tls::client_config(cfg.ca_file.as_deref())?;
        let backend = transport::https_client(backend_tls.clone(), |_| {}, cfg.backend_http2, None);
        let backend_stream = transport::https_client(backend_tls, |_| {}, cfg.backend_http2, None);
        let backend_base = cfg.backend_url.trim_end_matches('/').to_owned();
        let in_flight = Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_requests));
        Ok(Self {
            cfg,
            transport,
            backend,
            backend_stream,
            backend_base,
            in_flight,
            v1_only_server: std::sync::atomic::AtomicBool::new(false),
            polls_answered: std::sync::atomic::AtomicBool::new(false),
            abandon: CancellationToken::new(),
        })
    }

    /// Whether the server offered no v2 when last asked (most likely the
    /// fleet's Go server).
    pub fn v1_only_server(&self) -> bool {
        self.v1_only_server
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Largest body per (v1) response chunk: `max_chunk_size`, but at
    /// most [`V1_SERVER_MAX_CHUNK`] unless the last poll answer said the
    /// server is ours: the fleet's Go server needs them small. Whatever
    /// the transport setting, the poll that brought a request said so.
    pub fn max_chunk(&self) -> u64 {
        let max = self.cfg.max_chunk_size.as_u64();
        if self.transport.server_marked() {
            max
        } else {
            max.min(V1_SERVER_MAX_CHUNK)
        }
    }
}

/// Runs the relay-client until `shutdown` resolves; then stops taking
/// requests and lets those in flight finish for a short grace period.
///
/// With `transport = "auto"` it connects over v2 when the server offers
/// it and falls back to v1 polls otherwise, re-probing v2 every
/// [`REPROBE`] (`docs/transport-v2.md`, "Negotiation").
pub async fn run(cfg: ClientConfig, shutdown: impl Future<Output = ()>) -> Result<(), ClientError> {
    let ctx = Arc::new(Ctx::new(cfg)?);
    let dialer = match ctx.cfg.transport {
        Transport::V1 => None,
        Transport::Auto | Transport::V2 => Some(tunnel::Dialer::new(&ctx)?),
    };
    tracing::info!(
        relay = ctx.cfg.relay_url,
        backend = ctx.cfg.backend_name,
        target = ctx.cfg.backend_url,
        transport = ?ctx.cfg.transport,
        "relay-client started"
    );
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    let driver = drive(ctx.clone(), dialer, stop.clone(), tasks.clone());
    tokio::pin!(driver);
    let result = tokio::select! {
        r = &mut driver => r,
        () = shutdown => {
            stop.cancel();
            driver.await
        }
    };
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        ctx.abandon.cancel();
        let told = tokio::time::timeout(ABANDON_WAIT, tasks.wait())
            .await
            .is_ok();
        tracing::warn!(
            told_the_server = told,
            "requests still in flight at shutdown were abandoned"
        );
    }
    tracing::info!("relay-client stopped");
    result
}

/// How often a relay-client on v1 polls asks again whether the server
/// offers v2.
pub const REPROBE: Duration = Duration::from_secs(300);

/// Picks and keeps the transport until `stop`.
async fn drive(
    ctx: Arc<Ctx>,
    dialer: Option<tunnel::Dialer>,
    stop: CancellationToken,
    tasks: TaskTracker,
) -> Result<(), ClientError> {
    let Some(dialer) = dialer else {
        start_polls(&ctx, &stop, &tasks);
        stop.cancelled().await;
        return Ok(());
    };
    // Polls running while the server does not offer v2.
    let mut v1: Option<CancellationToken> = None;
    let mut backoff = Backoff::new();
    loop {
        let opened = tokio::select! {
            r = dialer.open(&ctx) => r,
            () = stop.cancelled() => return Ok(()),
        };
        let err = match opened {
            Ok(conn) => {
                if let Some(polls) = v1.take() {
                    tracing::info!("the server offers v2 now: v1 polls stop");
                    polls.cancel();
                }
                ctx.v1_only_server
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                ctx.polls_answered
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                backoff.reset();
                match tunnel::run(ctx.clone(), &dialer, conn, stop.clone(), &tasks).await {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        let wait = match err {
            TunnelError::NotOffered(status) if ctx.cfg.transport == Transport::V2 => {
                return Err(ClientError::V2NotOffered(status));
            }
            e if ctx.cfg.transport == Transport::Auto && e.falls_back() => {
                if matches!(e, TunnelError::NotOffered(_)) {
                    ctx.v1_only_server
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                // A 401 may be our token's, which a fresh one cures: v2 is
                // probed again as a refused call is retried, until a poll
                // is answered (then the refusal is not the token's). A
                // server (or ingress) without v2 only every REPROBE, and
                // so after a 403 (a valid token, or an ingress refusing
                // upgrades): such an ingress must not get a fleet's
                // handshakes every few seconds.
                let polls_answered = ctx
                    .polls_answered
                    .load(std::sync::atomic::Ordering::Relaxed);
                let wait = if e.is_invalid_token() && !polls_answered {
                    backoff.after_failure(true)
                } else {
                    REPROBE
                };
                if v1.is_none() {
                    tracing::info!(answer = %e, reprobe = ?wait, "no v2 connection to the server: using v1 polls");
                    let polls = stop.child_token();
                    start_polls(&ctx, &polls, &tasks);
                    v1 = Some(polls);
                }
                wait
            }
            other => {
                let wait = if v1.is_some() {
                    REPROBE
                } else {
                    backoff.after_failure(other.is_refusal())
                };
                tracing::warn!(error = %other, retry_in = ?wait, "v2 connection failed");
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = stop.cancelled() => return Ok(()),
        }
    }
}

fn start_polls(ctx: &Arc<Ctx>, stop: &CancellationToken, tasks: &TaskTracker) {
    for _ in 0..ctx.cfg.pending_polls {
        tasks.spawn(poll_loop(ctx.clone(), stop.clone(), tasks.clone()));
    }
}

/// One long poll after another; each request runs in its own task so the
/// poll is back at the server at once.
async fn poll_loop(ctx: Arc<Ctx>, stop: CancellationToken, tasks: TaskTracker) {
    let mut backoff = Backoff::new();
    loop {
        let started = tokio::time::Instant::now();
        let polled = tokio::select! {
            r = ctx.transport.poll() => r,
            () = stop.cancelled() => return,
        };
        let answered = match &polled {
            Ok(_) => Some(true),
            Err(e) if e.is_refusal() => Some(false),
            Err(_) => None,
        };
        if let Some(answered) = answered {
            ctx.polls_answered
                .store(answered, std::sync::atomic::Ordering::Relaxed);
        }
        match polled {
            Ok(Some(req)) => {
                backoff.reset();
                let ctx = ctx.clone();
                match ctx.in_flight.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tasks.spawn(async move {
                            forward::forward_until(&ctx, req, ctx.abandon.cancelled()).await;
                            drop(permit);
                        });
                    }
                    // Over the cap: answer at once rather than pile up
                    // tasks and sockets on the robot.
                    Err(_) => {
                        tasks.spawn(async move { forward::refuse_busy(&ctx, req).await });
                    }
                }
            }
            // A long poll that ends at once with nothing is a server
            // that is going away (the Go server answers every poll 408
            // while it shuts down): over HTTP/2, nothing else would slow
            // the next poll down.
            Ok(None) if started.elapsed() < FAST_EMPTY_POLL => {
                // At most a second or so: the server may be back soon
                // (restarted), and no request reaches a poll not made.
                let wait = backoff.step().min(FAST_EMPTY_POLL_MAX_WAIT);
                tracing::debug!(retry_in = ?wait, "poll answered empty at once");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return,
                }
            }
            Ok(None) => backoff.reset(),
            Err(e) => {
                let wait = backoff.after_failure(e.is_refusal());
                tracing::warn!(error = %e, retry_in = ?wait, "poll failed");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits double up to the cap, each spread around its step.
    #[test]
    fn backoff_doubles_with_jitter() {
        let mut waits = Vec::new();
        for _ in 0..20 {
            let mut b = Backoff::new();
            waits.push((0..10).map(|_| b.step()).collect::<Vec<_>>());
        }
        for run in &waits {
            let mut step = Backoff::MIN;
            for wait in run {
                assert!(
                    *wait >= step / 2 && *wait < step * 3 / 2,
                    "{wait:?} for {step:?}"
                );
                step = (step * 2).min(Backoff::MAX);
            }
        }
        // Twenty clients do not wait alike.
        assert!(waits.iter().any(|w| w[0] != waits[0][0]));
    }

    /// Refused calls wait at least about `AUTH_BACKOFF`, spread like every
    /// other wait: a fleet refused at once does not retry in step.
    #[test]
    fn refusals_back_off_spread() {
        let first: Vec<Duration> = (0..50)
            .map(|_| Backoff::new().after_failure(true))
            .collect();
        for w in &first {
            assert!(*w >= AUTH_BACKOFF / 2 && *w < AUTH_BACKOFF * 3 / 2, "{w:?}");
        }
        let (min, max) = (first.iter().min(), first.iter().max());
        let spread = max.zip(min).map(|(a, b)| *a - *b).unwrap_or_default();
        assert!(spread > AUTH_BACKOFF / 2, "spread over {spread:?}");
        // Then it doubles from there.
        let mut b = Backoff::new();
        b.after_failure(true);
        let second = b.after_failure(true);
        assert!(
            second >= AUTH_BACKOFF && second < AUTH_BACKOFF * 3,
            "{second:?}"
        );
    }
}
