//! The relay server: TLS listener, HTTP/1.1 + HTTP/2 connections, routing
//! of user-client and relay-client requests, graceful shutdown.
//!
//! [`run`] takes the listener and the shutdown signal from its caller, so
//! tests bind port 0 and stop the server themselves.

pub mod body;
mod gate;
mod pipe;
mod relay;
mod tunnel;
mod user;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use self::user::{Route, route};
use crate::auth::Authenticator;
use crate::auth::dev::{DevIssuer, DevIssuerError};
use crate::broker::{Broker, BrokerConfig};
use crate::config::{AuthMode, DEV_CERT_DIR, DEV_ISSUER, ServerConfig};
use crate::error::RelayError;
use crate::telemetry::Metrics;
use crate::telemetry::limit::LogLimiter;
use crate::tls::{self, DevCerts, TlsError};
use body::{Body, full};

/// A TLS handshake that takes longer than this is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After the drain, connections get this long to say goodbye.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("listener failed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    DevIssuer(#[from] DevIssuerError),
    #[error("cannot build the key fetch client: {0}")]
    Http(#[from] reqwest::Error),
}

/// What every handler shares.
#[derive(Clone)]
pub struct State {
    pub cfg: Arc<ServerConfig>,
    pub broker: Broker,
    /// `None` with `auth.mode = "none"`.
    pub auth: Option<Arc<Authenticator>>,
    pub metrics: Arc<Metrics>,
    /// Rate limit of the refusal log lines.
    pub refusal_log: Arc<LogLimiter>,
}

/// Refusal lines logged per reason and second, before they are summed up.
const REFUSAL_LINES_PER_SECOND: u32 = 5;

/// Builds the TLS acceptor, creating the development certificates on the
/// embedded default (`certs/`) when they are absent.
pub fn tls_acceptor(cfg: &ServerConfig) -> Result<Option<TlsAcceptor>, ServerError> {
    if !cfg.tls.enabled {
        return Ok(None);
    }
    if cfg.tls.is_dev_default() && DevCerts::in_dir(std::path::Path::new(DEV_CERT_DIR)).ensure()? {
        tracing::warn!(
            dir = DEV_CERT_DIR,
            "created a development CA and server certificate; clients trust it with --ca-file {DEV_CERT_DIR}/ca.pem"
        );
    }
    let server = tls::server_config(&cfg.tls.cert, &cfg.tls.key)?;
    Ok(Some(TlsAcceptor::from(server)))
}

/// Serves the relay on `listener` until `shutdown` resolves, then drains:
/// no new requests or polls are taken, requests in flight run on until
/// they end or `timeouts.shutdown` passes.
pub async fn run(
    cfg: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    run_with_admin(cfg, listener, None, shutdown).await
}

/// [`run`] with an admin listener for `/metrics` and `/healthz`.
pub async fn run_with_admin(
    cfg: ServerConfig,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let acceptor = tls_acceptor(&cfg)?;
    let scheme = if acceptor.is_some() { "https" } else { "http" };
    tracing::info!("listening on {scheme}://{}", listener.local_addr()?);
    let broker = Broker::new(BrokerConfig {
        poll_timeout: cfg.timeouts.poll,
        relay_timeout: cfg.timeouts.relay,
        inactive_request: cfg.timeouts.inactive_request,
        inactive_backend: cfg.timeouts.inactive_backend,
    });
    let auth = authenticator(&cfg)?;
    let stop_refresh = CancellationToken::new();
    if let Some(auth) = &auth {
        auth.spawn_refresh(stop_refresh.clone());
    }
    let _stop_refresh = stop_refresh.drop_guard();
    let state = State {
        cfg: Arc::new(cfg),
        broker: broker.clone(),
        auth,
        metrics: Arc::new(Metrics::new()),
        refusal_log: Arc::new(LogLimiter::new(
            REFUSAL_LINES_PER_SECOND,
            Duration::from_secs(1),
        )),
    };
    let stop_accepting = CancellationToken::new();
    if let Some(admin) = admin {
        tracing::info!("admin listening on http://{}", admin.local_addr()?);
        tokio::spawn(admin_loop(admin, state.clone(), stop_accepting.clone()));
    }
    let graceful = GracefulShutdown::new();
    let reaper = tokio::spawn(reap_backends(
        broker.clone(),
        state.metrics.clone(),
        state.cfg.timeouts.inactive_backend,
    ));
    let log_flush = tokio::spawn(flush_refusal_log(state.refusal_log.clone()));
    let _log_flush = AbortOnDrop(log_flush);

    // Cancelled after the close grace: connections still open then are
    // dropped, so nothing of the server outlives `run`.
    let force_close = CancellationToken::new();
    let _force_close = force_close.clone().drop_guard();
    let mut accept = Box::pin(accept_loop(
        listener,
        acceptor,
        state.clone(),
        &graceful,
        stop_accepting.clone(),
        force_close.clone(),
    ));
    tokio::select! {
        r = &mut accept => {
            reaper.abort();
            return r;
        }
        () = shutdown => {}
    }

    tracing::info!(
        in_flight = broker.active_requests(),
        "shutting down: draining requests in flight"
    );
    broker.begin_drain();
    // Keep accepting while draining: a relay-client may need a new
    // connection to deliver the rest of an answer already in flight.
    let drain = tokio::time::timeout(state.cfg.timeouts.shutdown, broker.drained());
    let finished = tokio::select! {
        r = drain => r.is_ok(),
        r = &mut accept => { r?; true }
    };
    if !finished {
        tracing::warn!(
            left = broker.active_requests(),
            "shutdown deadline passed with requests in flight"
        );
    }
    stop_accepting.cancel();
    let _ = accept.await;
    reaper.abort();
    // v2 connections are not watched by the graceful shutdown (they left
    // hyper's server at the upgrade): close them here.
    broker.close_tunnels();
    if tokio::time::timeout(CLOSE_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("connections still open after the close grace; dropping them");
    }
    force_close.cancel();
    tracing::info!("server stopped");
    Ok(())
}

/// The authenticator of `cfg`, creating the development issuer's key when
/// the configuration trusts it and it is absent.
fn authenticator(cfg: &ServerConfig) -> Result<Option<Arc<Authenticator>>, ServerError> {
    if cfg.auth.mode == AuthMode::None {
        tracing::warn!(
            "AUTHENTICATION IS OFF (auth.mode = \"none\"): anyone who reaches this relay can use every backend"
        );
        return Ok(None);
    }
    for issuer in &cfg.auth.issuers {
        if let (DEV_ISSUER, Some(jwks)) = (issuer.issuer.as_str(), &issuer.jwks_file) {
            let (_, created) = DevIssuer::ensure(jwks)?;
            if created {
                tracing::info!(jwks = %jwks.display(), "created the development token issuer key");
            }
            tracing::warn!(
                "trusting the development token issuer; mint tokens with `http-relay token`, use a real identity provider in production"
            );
        }
    }
    Ok(Authenticator::new(&cfg.auth)?)
}

/// Aborts a background task when the server returns, however it returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sums up held-back refusal lines once their window is over, so a flood
/// that stops is still reported.
async fn flush_refusal_log(limiter: Arc<LogLimiter>) {
    let mut tick = tokio::time::interval(limiter.window());
    loop {
        tick.tick().await;
        limiter.flush(gate::log_suppressed);
    }
}

async fn reap_backends(broker: Broker, metrics: Arc<Metrics>, inactive: Duration) {
    let period = (inactive / 4).clamp(Duration::from_millis(50), Duration::from_secs(60));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        for name in broker.reap_backends() {
            tracing::info!(backend = name, "forgot inactive backend");
            metrics.forget_backend(&name);
        }
    }
}

fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        // Relay-clients multiplex many polls and posts on one connection.
        .max_concurrent_streams(1024);
    builder
}

/// Accepts connections and hands each to its own task; the TLS handshake
/// and everything after it happen there, never in this loop.
async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    state: State,
    graceful: &GracefulShutdown,
    stop: CancellationToken,
    force_close: CancellationToken,
) -> Result<(), ServerError> {
    let builder = connection_builder();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return Ok(()),
        };
        let _ = tcp.set_nodelay(true);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let state = state.clone();
        let force_close = force_close.clone();
        tokio::spawn(async move {
            let metrics = state.metrics.clone();
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(dispatch(&state, req).await) }
            });
            match acceptor {
                Some(acceptor) => {
                    let tls =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                metrics.tls_handshake_failures.inc();
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                metrics.tls_handshake_failures.inc();
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                    tokio::select! {
                        r = watcher.watch(conn.into_owned()) => if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "connection ended with error");
                        },
                        () = force_close.cancelled() => {}
                    }
                }
                None => {
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
                    tokio::select! {
                        r = watcher.watch(conn.into_owned()) => if let Err(e) = r {
                            tracing::debug!(%peer, error = %e, "connection ended with error");
                        },
                        () = force_close.cancelled() => {}
                    }
                }
            }
        });
    }
}

/// The Prometheus exposition, with the gauges read from the broker.
fn metrics_response(state: &State) -> Response<Body> {
    let m = &state.metrics;
    m.connected_backends
        .set(i64::try_from(state.broker.backend_count()).unwrap_or(i64::MAX));
    m.active_requests
        .set(i64::try_from(state.broker.active_requests()).unwrap_or(i64::MAX));
    let mut resp = Response::new(full(m.encode()));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(crate::telemetry::metrics::CONTENT_TYPE),
    );
    resp
}

/// Serves `/metrics` and `/healthz` on the admin listener (cleartext,
/// HTTP/1.1 and h2c) until `stop`.
async fn admin_loop(listener: TcpListener, state: State, stop: CancellationToken) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let tcp = tokio::select! {
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = match req.uri().path() {
                    "/metrics" => metrics_response(&state),
                    "/healthz" => Response::new(full("ok")),
                    _ => RelayError::NotFound.into_response(),
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = builder.serve_connection(TokioIo::new(tcp), service).await;
        });
    }
}

/// Routes a request to its handler and maps any error to its response.
pub async fn dispatch(state: &State, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let result = if path == "/healthz" {
        let mut resp = Response::new(full("ok"));
        *resp.status_mut() = StatusCode::OK;
        Ok(resp)
    } else if path == "/metrics" {
        // The server's own metrics (`PROTOCOL.md`); never relayed. With an
        // admin listener they are served only there.
        if state.cfg.admin_listen.is_some() {
            Err(RelayError::NotFound)
        } else {
            Ok(metrics_response(state))
        }
    } else if path.starts_with("/server/") {
        relay::handle(state, req).await
    } else {
        user::handle(state, req).await
    };
    result.unwrap_or_else(|e: RelayError| {
        // Unknown names and timeouts are routine on a public relay; only
        // failures of the relay path itself are worth an info line.
        let status = e.status();
        if status == StatusCode::BAD_GATEWAY || status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::info!(error = %e, "request failed");
        } else {
            tracing::debug!(error = %e, %status, "request refused");
        }
        e.into_response()
    })
}
