//! The relay server: TLS listener, HTTP/1.1 + HTTP/2 connections, routing
//! of user-client and relay-client requests, graceful shutdown.
//!
//! [`run`] takes the listener and the shutdown signal from its caller, so
//! tests bind port 0 and stop the server themselves.

pub mod body;
pub mod conn;
mod gate;
mod load;
mod peers;
mod pipe;
mod places;
mod relay;
mod stream;
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
use tokio_util::sync::CancellationToken;

pub use self::user::{Route, route};
use crate::auth::Authenticator;
use crate::auth::dev::{DevIssuer, DevIssuerError};
use crate::broker::{Broker, BrokerConfig};
use crate::config::{AuthMode, DEV_CERT_DIR, DEV_ISSUER, ServerConfig};
use crate::error::RelayError;
use crate::observed::Observed;
use crate::telemetry::Metrics;
use crate::telemetry::limit::LogLimiter;
use crate::tls::client_cert::PeerCert;
use crate::tls::reload::ReloadingCert;
use crate::tls::{self, DevCerts, TlsError};
use body::{Body, full};
use conn::Activity;

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
    #[error("{what}: {reason}")]
    Check { what: String, reason: String },
    #[error(transparent)]
    Telemetry(#[from] crate::telemetry::TelemetryError),
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
    /// Requests per backend (`limits.max_requests_per_backend`).
    pub load: Arc<load::BackendLoad>,
    /// Bytes of buffered v1 request bodies (`limits.max_buffered_bytes`).
    pub body_budget: Arc<load::BodyBudget>,
}

/// How long a v1 request body waits for room in `limits.max_buffered_bytes`.
const BODY_BUDGET_WAIT: Duration = Duration::from_secs(2);

/// Refusal lines logged per reason and second, before they are summed up.
const REFUSAL_LINES_PER_SECOND: u32 = 5;

/// The public listener's TLS: its configurations, and where its
/// certificate comes from.
pub struct PublicTls {
    pub handshake: Arc<Handshake>,
    pub source: CertSource,
}

/// What the accept loop needs for a handshake.
pub struct Handshake {
    /// Every normal handshake.
    pub main: Arc<rustls::ServerConfig>,
    /// With ACME: the TLS-ALPN-01 challenge handshakes.
    pub challenge: Option<Arc<rustls::ServerConfig>>,
}

/// The server certificate's source.
pub enum CertSource {
    /// `tls.cert`/`tls.key`, followed by [`ReloadingCert::watch`].
    Files(Arc<ReloadingCert>),
    /// `[tls.acme]`, driven by [`tls::acme::Acme::spawn`].
    Acme(Box<tls::acme::Acme>),
}

/// Builds the TLS configurations, creating the development certificates
/// on the embedded default (`certs/`) when they are absent.
pub fn public_tls(cfg: &ServerConfig) -> Result<Option<PublicTls>, ServerError> {
    if !cfg.tls.enabled {
        return Ok(None);
    }
    if let Some(settings) = &cfg.tls.acme {
        let acme = tls::acme::Acme::new(settings)?;
        let main = tls::server_config_with(acme.resolver.clone(), cfg.tls.client_ca.as_deref())?;
        return Ok(Some(PublicTls {
            handshake: Arc::new(Handshake {
                main,
                challenge: Some(acme.challenge.clone()),
            }),
            source: CertSource::Acme(Box::new(acme)),
        }));
    }
    if cfg.tls.is_dev_default() && DevCerts::in_dir(std::path::Path::new(DEV_CERT_DIR)).ensure()? {
        tracing::warn!(
            dir = DEV_CERT_DIR,
            "created a development CA and server certificate; clients trust it with --ca-file {DEV_CERT_DIR}/ca.pem"
        );
    }
    let cert = ReloadingCert::load(&cfg.tls.cert, &cfg.tls.key)?;
    let main = tls::server_config_with(cert.clone(), cfg.tls.client_ca.as_deref())?;
    Ok(Some(PublicTls {
        handshake: Arc::new(Handshake {
            main,
            challenge: None,
        }),
        source: CertSource::Files(cert),
    }))
}

/// Completes a handshake: a TLS-ALPN-01 challenge is answered and its
/// connection ends (`Ok(None)`); anything else gets the main
/// configuration.
async fn handshake(
    hs: &Handshake,
    tcp: tokio::net::TcpStream,
) -> std::io::Result<Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
    let start =
        tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
    if let Some(challenge) = &hs.challenge
        && rustls_acme::is_tls_alpn_challenge(&start.client_hello())
    {
        let mut tls = start.into_stream(challenge.clone()).await?;
        use tokio::io::AsyncWriteExt as _;
        let _ = tls.shutdown().await;
        return Ok(None);
    }
    start.into_stream(hs.main.clone()).await.map(Some)
}

/// What `http-relay server --check-config` checks beyond parsing: the
/// certificate and key load and belong together, the client CA bundle
/// and every JWKS file parse. Returns notes on what the first start
/// would create; creates nothing itself.
pub fn check(cfg: &ServerConfig) -> Result<Vec<String>, ServerError> {
    let mut notes = Vec::new();
    if let Some(ca) = cfg.tls.client_ca.as_deref().filter(|_| cfg.tls.enabled) {
        tls::client_verifier(ca)?;
    }
    if let Some(acme) = cfg.tls.acme.as_ref().filter(|_| cfg.tls.enabled) {
        tls::client_config(acme.directory_ca_file.as_deref())?;
        notes.push(format!(
            "tls: certificate for {} from {} (cache {})",
            acme.domains.join(", "),
            acme.directory_url,
            acme.cache_dir.display()
        ));
    } else if cfg.tls.enabled {
        if cfg.tls.is_dev_default() && !cfg.tls.cert.exists() {
            notes.push(format!(
                "tls: no certificate configured; a development CA and certificate will be created under {DEV_CERT_DIR}/"
            ));
        } else {
            tls::server_config(&cfg.tls.cert, &cfg.tls.key)?;
        }
    } else {
        notes.push("tls: off (cleartext; put a TLS terminator in front)".to_owned());
    }
    if cfg.auth.mode == AuthMode::None {
        notes.push("auth: OFF (auth.mode = \"none\")".to_owned());
    }
    for issuer in cfg
        .auth
        .issuers
        .iter()
        .filter(|_| cfg.auth.mode != AuthMode::None)
    {
        let Some(path) = &issuer.jwks_file else {
            continue;
        };
        if issuer.issuer == DEV_ISSUER && !path.exists() {
            notes.push(format!(
                "auth: the development issuer's key will be created at {}",
                path.display()
            ));
            continue;
        }
        let text = std::fs::read_to_string(path).map_err(|e| ServerError::Check {
            what: format!("auth.issuers.jwks_file {}", path.display()),
            reason: e.to_string(),
        })?;
        serde_json::from_str::<jsonwebtoken::jwk::JwkSet>(&text).map_err(|e| {
            ServerError::Check {
                what: format!("auth.issuers.jwks_file {}", path.display()),
                reason: format!("not a JWK set: {e}"),
            }
        })?;
    }
    cfg.telemetry.validate()?;
    Ok(notes)
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
    let public_tls = public_tls(&cfg)?;
    let scheme = if public_tls.is_some() {
        "https"
    } else {
        "http"
    };
    // SIGHUP reloads the certificate (`ReloadingCert::watch`); without TLS
    // it must still not end the process, as its default action would.
    // Registered before the listener is announced, so that no SIGHUP
    // after that line can end the process.
    let hangup = crate::tls::reload::hangup();
    let (acceptor, on_hangup, _acme) = match public_tls {
        Some(PublicTls {
            handshake,
            source: CertSource::Files(cert),
        }) => (Some(handshake), tokio::spawn(cert.watch(hangup)), None),
        Some(PublicTls {
            handshake,
            source: CertSource::Acme(acme),
        }) => (
            Some(handshake),
            tokio::spawn(ignore_hangup(hangup)),
            Some(AbortOnDrop((*acme).spawn().await)),
        ),
        None => (None, tokio::spawn(ignore_hangup(hangup)), None),
    };
    let _on_hangup = AbortOnDrop(on_hangup);
    tracing::info!("listening on {scheme}://{}", listener.local_addr()?);
    let broker = Broker::new(BrokerConfig {
        poll_timeout: cfg.timeouts.poll,
        relay_timeout: cfg.timeouts.relay,
        inactive_request: cfg.timeouts.inactive_request,
        inactive_backend: cfg.timeouts.inactive_backend,
    });
    let auth = authenticator(&cfg)?;
    if cfg.timeouts.poll >= GO_CALL_TIMEOUT {
        tracing::warn!(
            poll = ?cfg.timeouts.poll,
            "timeouts.poll is not below the fleet's Go relay-client's 60 s call timeout: such a relay-client gives its polls up before they are answered"
        );
    }
    let stop_refresh = CancellationToken::new();
    if let Some(auth) = &auth {
        auth.spawn_refresh(stop_refresh.clone());
    }
    let _stop_refresh = stop_refresh.drop_guard();
    let backend_load = load::BackendLoad::new(cfg.limits.max_requests_per_backend);
    let body_budget = Arc::new(load::BodyBudget::new(
        cfg.limits.max_buffered_bytes.as_u64(),
        BODY_BUDGET_WAIT,
    ));
    let state = State {
        cfg: Arc::new(cfg),
        broker: broker.clone(),
        auth,
        metrics: Arc::new(Metrics::new()),
        refusal_log: Arc::new(LogLimiter::new(
            REFUSAL_LINES_PER_SECOND,
            Duration::from_secs(1),
        )),
        load: backend_load,
        body_budget,
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
        broker.abort_all();
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

/// How long the fleet's Go relay-client waits for any call to the server
/// (its HTTP client's `Timeout`).
const GO_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The authenticator of `cfg`, creating the development issuer's key when
/// the configuration trusts it and it is absent.
fn authenticator(cfg: &ServerConfig) -> Result<Option<Arc<Authenticator>>, ServerError> {
    if cfg.auth.mode == AuthMode::None {
        tracing::warn!(
            "AUTHENTICATION IS OFF (auth.mode = \"none\"): anyone who reaches this relay can use every backend"
        );
        return Ok(None);
    }
    for (issuer, gap) in open_audience_gaps(&cfg.auth) {
        tracing::warn!(issuer, "{gap}");
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

/// What an issuer that signs a token for any audience its holder asks
/// for (`OPEN_AUDIENCE_ISSUERS`) leaves open: with it an audience proves
/// nothing, and only the role's claims tell a robot or a user apart.
/// One warning per role left without claims, for each such issuer.
fn open_audience_gaps(auth: &crate::config::AuthConfig) -> Vec<(&str, &'static str)> {
    let mut gaps = Vec::new();
    for issuer in &auth.issuers {
        let name = issuer.issuer.trim_end_matches('/');
        if !crate::config::OPEN_AUDIENCE_ISSUERS.contains(&name) {
            continue;
        }
        if auth.relay_claims.is_empty() {
            gaps.push((
                issuer.issuer.as_str(),
                "this issuer signs tokens for any audience their holder asks for, and auth.relay_claims is empty: anyone it issues tokens to can act as any relay-client; require the robots' identities in auth.relay_claims",
            ));
        }
        if auth.user_claims.is_empty() {
            gaps.push((
                issuer.issuer.as_str(),
                "this issuer signs tokens for any audience their holder asks for, and auth.user_claims is empty: anyone it issues tokens to can use every backend without user_claims of its own (auth.backends); require your users' identities in auth.user_claims",
            ));
        }
    }
    gaps
}

async fn ignore_hangup(hangup: Option<crate::tls::reload::Hangup>) {
    let Some(mut hangup) = hangup else {
        return;
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP: nothing to reload (TLS off, or certificates by ACME)");
    }
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

fn connection_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.timeouts.header_read);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(cfg.limits.max_streams_per_connection)
        // HTTP/2 rapid reset (CVE-2023-44487): a peer whose streams keep
        // being reset before they are served, or keep failing, gets
        // GOAWAY (ENHANCE_YOUR_CALM). CONTINUATION floods end at the
        // header list limit.
        .max_pending_accept_reset_streams(RESET_STREAMS_PENDING)
        .max_local_error_reset_streams(RESET_STREAMS_LOCAL_ERROR)
        .max_header_list_size(MAX_HEADER_LIST);
    builder
}

/// Streams a peer may reset before the server took them up, at once.
const RESET_STREAMS_PENDING: usize = 20;
/// Streams the server may reset for a peer's protocol errors, per
/// connection, before the connection is closed.
const RESET_STREAMS_LOCAL_ERROR: usize = 256;
/// Largest HTTP/2 header list of a request (decoded): room for large
/// cookies and tokens, four times hyper's default. (HTTP/1.1 heads are
/// bounded by hyper's read buffer, about 400 KiB, and 100 headers.)
const MAX_HEADER_LIST: u32 = 64 * 1024;

/// Accepts connections and hands each to its own task; the TLS handshake
/// and everything after it happen there, never in this loop.
async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<Arc<Handshake>>,
    state: State,
    graceful: &GracefulShutdown,
    stop: CancellationToken,
    force_close: CancellationToken,
) -> Result<(), ServerError> {
    let builder = Arc::new(connection_builder(&state.cfg));
    let limits = conn::Limits {
        header_read: state.cfg.timeouts.header_read,
        idle: state.cfg.timeouts.idle_connection,
        stalled: state.cfg.timeouts.inactive_request,
    };
    let places = places::Places::new(
        state.cfg.limits.max_connections,
        state.cfg.connections_per_ip(),
    );
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
        // Over `limits.max_connections` with every place proven, or over
        // `limits.max_connections_per_ip`: closed at once, before any work.
        let admission = match places.admit(peer.ip()) {
            Ok(admission) => admission,
            Err(refusal) => {
                match refusal {
                    places::Refusal::Full => state.metrics.connections_refused.inc(),
                    places::Refusal::Source => state.metrics.connections_refused_per_ip.inc(),
                }
                drop(tcp);
                continue;
            }
        };
        if matches!(admission, places::Admission::Evicted { .. }) {
            state.metrics.connections_evicted.inc();
        }
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            tcp,
            peer,
            acceptor: acceptor.clone(),
            state: state.clone(),
            builder: builder.clone(),
            watcher: graceful.watcher(),
            force_close: force_close.clone(),
        };
        tokio::spawn(connection.run(admission, limits));
    }
}

/// One accepted connection, served on its own task.
///
/// The task's future is allocated per connection and, for a v2 tunnel or
/// a WebSocket, freed right after the upgrade, between the upgraded
/// connection's own allocations: it is kept small (one future, the
/// builder shared) so that what it leaves behind stays small too.
struct Connection {
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    acceptor: Option<Arc<Handshake>>,
    state: State,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: hyper_util::server::graceful::Watcher,
    force_close: CancellationToken,
}

impl Connection {
    /// Waits for the connection's place if it evicted another one; then
    /// the TLS handshake (if any), then HTTP until the peer is done, the
    /// connection's time limits run out, the drain ends or a newcomer
    /// evicts it.
    async fn run(self, admission: places::Admission, limits: conn::Limits) {
        let Some(place) = admission.place().await else {
            self.state.metrics.connections_refused.inc();
            return;
        };
        let peer = self.peer;
        let mut evicted = std::pin::pin!(place.evicted());
        let metrics = self.state.metrics.clone();
        let activity = Activity::new();
        let watchdog = activity.clone();
        let writes = activity.clone();
        let standing = place.clone();
        let expired = async move {
            let why = watchdog.expired(limits, || standing.is_proven()).await;
            tracing::debug!(%peer, reason = ?why, "closing connection");
        };
        let state = self.state;
        let service = move |peer_cert: PeerCert| {
            hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let state = state.clone();
                let in_flight = activity.begin();
                req.extensions_mut().insert(peer_cert.clone());
                req.extensions_mut().insert(place.clone());
                async move {
                    let resp = dispatch(&state, req).await;
                    Ok::<_, Infallible>(resp.map(|b| in_flight.answer(b)))
                }
            })
        };
        let gone = || tracing::debug!(%peer, "closed to make room for a new connection");
        // The arms differ in the connection's type only. One type for both
        // (an enum) would make every cleartext connection's future as
        // large as a TLS one's, and the per-tunnel RSS with it.
        match self.acceptor {
            Some(acceptor) => {
                let handshake =
                    tokio::time::timeout(limits.header_read, handshake(&acceptor, self.tcp));
                let shaken = tokio::select! {
                    r = handshake => r,
                    () = &mut evicted => return gone(),
                };
                let tls = match shaken {
                    Ok(Ok(Some(tls))) => tls,
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => {
                        metrics.tls_handshake_failures.inc();
                        if is_client_cert_error(&e) {
                            metrics.client_cert_refusal("untrusted");
                        }
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        metrics.tls_handshake_failures.inc();
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let peer_cert = PeerCert(
                    tls.get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first().cloned()),
                );
                let io = TokioIo::new(Observed::new(tls, conn::Writes(writes)));
                let conn = self
                    .builder
                    .serve_connection_with_upgrades(io, service(peer_cert));
                tokio::select! {
                    r = self.watcher.watch(conn.into_owned()) => if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with error");
                    },
                    () = expired => {}
                    () = self.force_close.cancelled() => {}
                    () = &mut evicted => gone(),
                }
            }
            None => {
                let io = TokioIo::new(Observed::new(self.tcp, conn::Writes(writes)));
                let conn = self
                    .builder
                    .serve_connection_with_upgrades(io, service(PeerCert::default()));
                tokio::select! {
                    r = self.watcher.watch(conn.into_owned()) => if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "connection ended with error");
                    },
                    () = expired => {}
                    () = self.force_close.cancelled() => {}
                    () = &mut evicted => gone(),
                }
            }
        }
    }
}

/// Whether a failed handshake was a client certificate that does not
/// chain to `tls.client_ca` (or is otherwise unusable).
fn is_client_cert_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|e| {
            matches!(
                e,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
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

/// Connections the admin listener serves at once (scrapers, probes);
/// more are closed at accept.
const ADMIN_CONNECTIONS: usize = 64;

/// Serves `/metrics` and `/healthz` on the admin listener (cleartext,
/// HTTP/1.1 and h2c) until `stop`, with the public listener's time
/// limits: a private interface is no reason for a connection that says
/// nothing to hold a task for good.
async fn admin_loop(listener: TcpListener, state: State, stop: CancellationToken) {
    let builder = connection_builder(&state.cfg);
    let limits = conn::Limits {
        header_read: state.cfg.timeouts.header_read,
        idle: state.cfg.timeouts.idle_connection,
        stalled: state.cfg.timeouts.inactive_request,
    };
    let connections = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS));
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
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(tcp);
            continue;
        };
        let state = state.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let activity = Activity::new();
            let requests = activity.clone();
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let in_flight = requests.begin();
                let resp = match req.uri().path() {
                    "/metrics" => metrics_response(&state),
                    "/healthz" => Response::new(full("ok")),
                    _ => RelayError::NotFound.into_response(),
                };
                async move { Ok::<_, Infallible>(resp.map(|b| in_flight.answer(b))) }
            });
            let io = TokioIo::new(Observed::new(tcp, conn::Writes(activity.clone())));
            tokio::select! {
                _ = builder.serve_connection(io, service) => {}
                // The admin listener is private: no gate to pass.
                _ = activity.expired(limits, || true) => {}
            }
        });
    }
}

/// Routes a request to its handler and maps any error to its response.
pub async fn dispatch(state: &State, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path();
    let relay_call = path.starts_with("/server/");
    let poll = path == "/server/request";
    let result = if path == "/healthz" {
        let mut resp = Response::new(full("ok"));
        *resp.status_mut() = StatusCode::OK;
        Ok(resp)
    } else if path == "/metrics" {
        // The server's own metrics (`PROTOCOL.md`); never relayed. With an
        // admin listener they are served only there.
        if state.cfg.metrics_on_public_listener() {
            Ok(metrics_response(state))
        } else {
            Err(RelayError::NotFound)
        }
    } else if relay_call {
        relay::handle(state, req).await
    } else {
        // Boxed: an idle v1 poll holds this future for up to a minute and
        // must not pay for the user path's larger state.
        Box::pin(user::handle(state, req)).await
    };
    let mut resp = result.unwrap_or_else(|e: RelayError| {
        // Unknown names and timeouts are routine on a public relay; only
        // failures of the relay path itself are worth an info line.
        let status = e.status();
        if status == StatusCode::BAD_GATEWAY || status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::info!(error = %e, "request failed");
        } else {
            tracing::debug!(error = %e, %status, "request refused");
        }
        e.into_response()
    });
    if poll && matches!(resp.status(), StatusCode::OK | StatusCode::REQUEST_TIMEOUT) {
        resp.headers_mut().insert(
            crate::proto::SERVER_MARK_HEADER,
            http::HeaderValue::from_static(crate::proto::SERVER_MARK),
        );
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AuthConfig, IssuerConfig};

    /// Each role without claims is named, for either spelling of Google's
    /// issuer; an issuer that keeps to its audiences needs none.
    #[test]
    fn an_open_audience_issuer_needs_claims_for_both_roles() {
        let issuer = |iss: &str| IssuerConfig {
            issuer: iss.to_owned(),
            jwks_uri: Some("https://www.googleapis.com/oauth2/v3/certs".to_owned()),
            jwks_file: None,
            algorithms: Vec::new(),
        };
        let claims = || [("sub".to_owned(), "x".to_owned())].into();
        for iss in ["https://accounts.google.com", "accounts.google.com/"] {
            let mut auth = AuthConfig {
                issuers: vec![issuer(iss)],
                ..AuthConfig::default()
            };
            let named = |auth: &AuthConfig| -> Vec<&str> {
                open_audience_gaps(auth)
                    .into_iter()
                    .map(|(_, gap)| {
                        if gap.contains("auth.relay_claims is empty") {
                            "relay"
                        } else {
                            "user"
                        }
                    })
                    .collect()
            };
            assert_eq!(named(&auth), ["relay", "user"], "{iss}");
            auth.relay_claims = claims();
            assert_eq!(named(&auth), ["user"], "{iss}");
            auth.user_claims = claims();
            assert!(named(&auth).is_empty(), "{iss}");
        }
        let own = AuthConfig {
            issuers: vec![issuer("https://idp.example")],
            ..AuthConfig::default()
        };
        assert!(open_audience_gaps(&own).is_empty());
    }
}
