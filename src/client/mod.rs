//! The relay-client: keeps `pending_polls` long polls open towards the
//! relay server, and runs each request it receives against the backend.
//!
//! It only ever dials out; the backend needs no public endpoint.

mod forward;
pub mod transport;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::client::TokenSource;
use crate::config::ClientConfig;
use crate::tls::TlsError;
use transport::{HttpsClient, RelayTransport, TransportError};

/// Least wait after the server refused our token.
const AUTH_BACKOFF: Duration = Duration::from_secs(2);

/// How long requests in flight may run on after shutdown was asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Why the relay-client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot build the token client: {0}")]
    Http(#[from] reqwest::Error),
}

/// What every request task shares.
pub struct Ctx {
    cfg: ClientConfig,
    transport: RelayTransport,
    backend: HttpsClient,
    /// `backend_url` without a trailing slash; request paths are appended.
    backend_base: String,
    /// One permit per request in flight (`max_concurrent_requests`).
    in_flight: Arc<tokio::sync::Semaphore>,
}

/// Exponential backoff between failed polls, so a down server is not
/// hammered and a restarted one is found again quickly.
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
        now
    }
}

impl Ctx {
    pub fn new(cfg: ClientConfig) -> Result<Self, ClientError> {
        let tokens = Arc::new(TokenSource::new(&cfg.auth)?);
        let transport = RelayTransport::new(&cfg, tokens)?;
        let backend_tls = crate::tls::client_config(cfg.ca_file.as_deref())?;
        let backend = transport::https_client(backend_tls, |_| {}, cfg.backend_http2);
        let backend_base = cfg.backend_url.trim_end_matches('/').to_owned();
        let in_flight = Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_requests));
        Ok(Self {
            cfg,
            transport,
            backend,
            backend_base,
            in_flight,
        })
    }
}

/// Runs the relay-client until `shutdown` resolves; then stops polling and
/// lets requests in flight finish for a short grace period.
pub async fn run(cfg: ClientConfig, shutdown: impl Future<Output = ()>) -> Result<(), ClientError> {
    let ctx = Arc::new(Ctx::new(cfg)?);
    tracing::info!(
        relay = ctx.cfg.relay_url,
        backend = ctx.cfg.backend_name,
        target = ctx.cfg.backend_url,
        "relay-client started"
    );
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    for _ in 0..ctx.cfg.pending_polls {
        tasks.spawn(poll_loop(ctx.clone(), stop.clone(), tasks.clone()));
    }
    shutdown.await;
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight at shutdown were abandoned");
    }
    tracing::info!("relay-client stopped");
    Ok(())
}

/// One long poll after another; each request runs in its own task so the
/// poll is back at the server at once.
async fn poll_loop(ctx: Arc<Ctx>, stop: CancellationToken, tasks: TaskTracker) {
    let mut backoff = Backoff::new();
    loop {
        let polled = tokio::select! {
            r = ctx.transport.poll() => r,
            () = stop.cancelled() => return,
        };
        match polled {
            Ok(Some(req)) => {
                backoff.reset();
                let ctx = ctx.clone();
                match ctx.in_flight.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tasks.spawn(async move {
                            forward::forward(&ctx, req).await;
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
            Ok(None) => backoff.reset(),
            Err(e) => {
                let wait = match &e {
                    // Refused tokens do not get better by asking faster.
                    TransportError::Refused { .. } | TransportError::Token(_) => {
                        backoff.step().max(AUTH_BACKOFF)
                    }
                    _ => backoff.step(),
                };
                tracing::warn!(error = %e, retry_in = ?wait, "poll failed");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return,
                }
            }
        }
    }
}
