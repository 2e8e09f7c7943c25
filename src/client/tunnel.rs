//! The relay-client's side of the v2 transport (`docs/transport-v2.md`):
//! dial the server, upgrade one HTTP/1.1 request to `http-relay-v2`, then
//! serve HTTP/2 on that connection, each stream a request for the backend.
//!
//! The relay-client still only dials out; after the upgrade it is the
//! HTTP/2 *server* of its own connection. Request and response bodies are
//! piped between the tunnel and the backend as hyper bodies, so flow
//! control reaches end to end and a user-client that goes away resets the
//! stream, which drops the backend call.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::upgrade::Upgraded;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::{Backoff, Ctx, transport};
use crate::auth::client::TokenError;
use crate::proto::v2;
use crate::telemetry;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Body of tunnel responses and of backend requests.
pub type Body = BoxBody<Bytes, BoxError>;

/// Bound of the dial and of the upgrade exchange.
const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a tunnel could not be opened or ended.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("relay server unreachable: {0}")]
    Connect(String),
    /// The server answered the upgrade in a way that says it has no v2.
    #[error("relay server does not offer the v2 transport (it answered {0})")]
    NotOffered(StatusCode),
    #[error("relay server answered the v2 upgrade with {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("relay server refused the token ({status}): {body}")]
    Refused { status: StatusCode, body: String },
    #[error("no token for the relay server: {0}")]
    Token(#[from] TokenError),
    #[error("invalid relay URL: {0}")]
    Url(String),
    #[error("v2 connection: {0}")]
    Http(#[from] hyper::Error),
}

impl TunnelError {
    /// Our token was refused or could not be had.
    pub fn is_refusal(&self) -> bool {
        matches!(self, TunnelError::Refused { .. } | TunnelError::Token(_))
    }

    /// A refusal that a fresh token may cure: 401, or no token to send.
    pub fn is_invalid_token(&self) -> bool {
        match self {
            TunnelError::Refused { status, .. } => *status == StatusCode::UNAUTHORIZED,
            TunnelError::Token(_) => true,
            _ => false,
        }
    }

    /// Answers that say "no v2 on this path" for good: a v1-only server
    /// answers the unknown path with 4xx (`docs/transport-v2.md`,
    /// "Negotiation and fallback"). Not: a refusal of our token, a busy
    /// server, or a gateway error ([`TunnelError::is_gateway_failure`]).
    fn not_offered(status: StatusCode) -> bool {
        let transient = matches!(
            status,
            StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::REQUEST_TIMEOUT
                | StatusCode::TOO_MANY_REQUESTS
        );
        status != StatusCode::SWITCHING_PROTOCOLS && !status.is_server_error() && !transient
    }

    /// A gateway's kind of failure (a 5xx other than 503, or 408): an
    /// ingress that cannot pass the upgrade answers so, and so does one
    /// in front of a server that is restarting. `auto` tries v1
    /// meanwhile; `v2` retries.
    fn is_gateway_failure(&self) -> bool {
        matches!(self, TunnelError::Status { status, .. }
            if (status.is_server_error() && *status != StatusCode::SERVICE_UNAVAILABLE)
                || *status == StatusCode::REQUEST_TIMEOUT)
    }

    /// Whether `transport = "auto"` runs v1 polls after this failure to
    /// open a tunnel (and probes v2 again later): the server said it has
    /// no v2, a gateway failed on the upgrade, or the upgrade was refused
    /// (an ingress may refuse an upgrade it does not know with 403; v1
    /// polls then tell whether the token itself is refused).
    pub fn falls_back(&self) -> bool {
        matches!(
            self,
            TunnelError::NotOffered(_) | TunnelError::Refused { .. }
        ) || self.is_gateway_failure()
    }
}

/// The `Host` of the upgrade request: the port only when it is not the
/// scheme's, and an IPv6 literal in brackets.
fn host_header(host: &str, port: u16, tls: bool) -> String {
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    if port == if tls { 443 } else { 80 } {
        host
    } else {
        format!("{host}:{port}")
    }
}

/// A TCP connection to `uri`'s host and port through `tcp`.
async fn dial<C>(mut tcp: C, uri: http::Uri) -> Result<TcpStream, TunnelError>
where
    C: tower_service::Service<http::Uri, Response = TokioIo<TcpStream>>,
    C::Error: std::error::Error,
{
    let failed = |e: C::Error| {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg = format!("{msg}: {s}");
            source = s.source();
        }
        TunnelError::Connect(msg)
    };
    std::future::poll_fn(|cx| tcp.poll_ready(cx))
        .await
        .map_err(failed)?;
    Ok(tcp.call(uri).await.map_err(failed)?.into_inner())
}

/// Where and how to dial the server.
pub struct Dialer {
    /// Dials as the v1 transport does ([`transport::tcp_connector`]).
    tcp: HttpConnector,
    uri: http::Uri,
    host: String,
    port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    /// `relay_url`'s path prefix, without a trailing slash.
    prefix: String,
    backend_query: String,
}

impl Dialer {
    pub fn new(ctx: &Ctx) -> Result<Self, TunnelError> {
        let url = &ctx.cfg.relay_url;
        let uri: http::Uri = url
            .parse()
            .map_err(|e| TunnelError::Url(format!("{url}: {e}")))?;
        let https = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .ok_or_else(|| TunnelError::Url(format!("{url}: no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let mut cfg = crate::tls::client_config_with(
                ctx.cfg.ca_file.as_deref(),
                ctx.cfg.relay_identity(),
            )
            .map_err(|e| TunnelError::Url(e.to_string()))?;
            // The upgrade is an HTTP/1.1 exchange.
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            let name = ServerName::try_from(host.clone())
                .map_err(|e| TunnelError::Url(format!("{url}: {e}")))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(cfg)), name))
        } else {
            None
        };
        let tcp = transport::tcp_connector(
            HttpConnector::new(),
            Some(transport::relay_keepalive(&ctx.cfg)),
        );
        Ok(Self {
            tcp,
            uri: uri.clone(),
            host,
            port,
            tls,
            prefix: uri.path().trim_end_matches('/').to_owned(),
            backend_query: form_urlencoded::byte_serialize(ctx.cfg.backend_name.as_bytes())
                .collect(),
        })
    }

    /// Dials and upgrades.
    pub async fn open(&self, ctx: &Ctx) -> Result<Opened, TunnelError> {
        tokio::time::timeout(OPEN_TIMEOUT, self.open_inner(ctx))
            .await
            .map_err(|_| TunnelError::Connect("timed out".into()))?
    }

    async fn open_inner(&self, ctx: &Ctx) -> Result<Opened, TunnelError> {
        let tcp = dial(self.tcp.clone(), self.uri.clone()).await?;
        match &self.tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| TunnelError::Connect(e.to_string()))?;
                self.upgrade(ctx, tls).await
            }
            None => self.upgrade(ctx, tcp).await,
        }
    }

    async fn upgrade<T>(&self, ctx: &Ctx, io: T) -> Result<Opened, TunnelError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let token = ctx.transport.tokens().token().await?;
        let authority = host_header(&self.host, self.port, self.tls.is_some());
        let mut req = Request::get(format!(
            "{}{}?server={}",
            self.prefix,
            v2::CONNECT_PATH,
            self.backend_query
        ))
        .header(header::HOST, authority)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, v2::UPGRADE_TOKEN)
        .body(Empty::new())
        .map_err(|e| TunnelError::Url(e.to_string()))?;
        if let Some(token) = &token {
            let mut value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| TunnelError::Token(TokenError::Invalid))?;
            value.set_sensitive(true);
            req.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            let server_time = resp
                .headers()
                .get(header::DATE)
                .and_then(|d| d.to_str().ok())
                .and_then(|d| httpdate::parse_http_date(d).ok());
            return Ok(Opened {
                upgraded: hyper::upgrade::on(resp).await?,
                token,
                server_time,
            });
        }
        let body = http_body_util::Limited::new(resp.into_body(), 4096)
            .collect()
            .await
            .map(|c| String::from_utf8_lossy(&c.to_bytes()).trim().to_owned())
            .unwrap_or_default();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            // A fresh token may cure it (a claim granted since), at the
            // token source's pace.
            if let Some(sent) = &token {
                ctx.transport.tokens().invalidate(sent).await;
            }
            return Err(TunnelError::Refused { status, body });
        }
        if TunnelError::not_offered(status) {
            return Err(TunnelError::NotOffered(status));
        }
        Err(TunnelError::Status { status, body })
    }
}

/// An upgraded v2 connection.
pub struct Opened {
    upgraded: Upgraded,
    /// The token it presented.
    token: Option<String>,
    /// The server's clock when it answered (its `Date`).
    server_time: Option<SystemTime>,
}

/// When a connection opened with `token` should be replaced by one with a
/// fresh token: the server closes it when the token expires, by its own
/// clock. `server_time` is that clock when the connection opened; the
/// robot's own clock (often wrong on a robot that just booted) only
/// stands in without it. Off by an hour either way, the robot would
/// otherwise redial every second, or lose its connection, streams and
/// all, at expiry.
fn renewal_in(token: Option<&str>, server_time: Option<SystemTime>) -> Option<Duration> {
    // Read as the server reads it: it closes the connection at that time.
    let exp = crate::auth::client::unverified_exp(token?)?;
    let now = match server_time.and_then(crate::clock::unix_secs) {
        // A server clock past `exp` cannot have let the token in: that
        // `Date` is someone else's (a proxy's).
        Some(t) if t <= exp => t,
        _ => crate::clock::unix_now()?,
    };
    let left = Duration::from_secs(exp.saturating_sub(now));
    // The token source's rule, and never in a tight loop.
    Some(crate::auth::client::refresh_after(left).max(Duration::from_secs(1)))
}

/// A connection that lasted this long was a working one: the next
/// reconnect starts the backoff afresh.
const STABLE: Duration = Duration::from_secs(10);

/// After a working connection ends, the redial waits a random part of
/// this. A server that drains closes every tunnel at once: without the
/// spread its whole fleet would redial (TLS handshake, token check) into
/// the same instant, at a peer replica or at the restarted server. The
/// server holds requests for a name that is redialling
/// (`timeouts.relay`), so users see the wait, not an error.
const REDIAL_SPREAD: Duration = Duration::from_secs(1);

/// The wait before redialling after a working connection ended.
fn redial_wait() -> Duration {
    REDIAL_SPREAD.mul_f64(fastrand::f64())
}

/// Keeps a v2 connection up until `stop`: serves `first`, reconnects when
/// a connection ends, and replaces each connection with a fresh one (a
/// fresh token) before its token expires; the old one finishes its
/// streams. Returns [`TunnelError::NotOffered`] if a reconnect finds v2
/// gone (the caller falls back to v1). Each connection is served on
/// `tasks`, so that a shutdown waits for its streams in flight.
pub async fn run(
    ctx: Arc<Ctx>,
    dialer: &Dialer,
    first: Opened,
    stop: CancellationToken,
    tasks: &TaskTracker,
) -> Result<(), TunnelError> {
    let mut next = Some(first);
    let mut backoff = Backoff::new();
    let mut previous: Option<CancellationToken> = None;
    loop {
        let Opened {
            upgraded,
            token,
            server_time,
        } = match next.take() {
            Some(conn) => conn,
            None => {
                let opened = tokio::select! {
                    r = dialer.open(&ctx) => r,
                    () = stop.cancelled() => return Ok(()),
                };
                match opened {
                    Ok(conn) => conn,
                    Err(e @ TunnelError::NotOffered(_)) => return Err(e),
                    Err(e) => {
                        let wait = backoff.after_failure(e.is_refusal());
                        tracing::warn!(error = %e, retry_in = ?wait, "v2 connection failed");
                        tokio::select! {
                            () = tokio::time::sleep(wait) => continue,
                            () = stop.cancelled() => return Ok(()),
                        }
                    }
                }
            }
        };
        tracing::info!("connected to the relay server over v2");
        let opened_at = tokio::time::Instant::now();
        // The connection before this one (replaced for its token) stops
        // taking streams and finishes those in flight.
        if let Some(old) = previous.take() {
            old.cancel();
        }
        let conn_stop = stop.child_token();
        let served = tasks.spawn(serve(ctx.clone(), upgraded, conn_stop.clone()));
        let renew = renewal_in(token.as_deref(), server_time);
        let renewal = async {
            match renew {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = served => {
                match r {
                    Ok(Ok(())) => tracing::info!("v2 connection closed"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "v2 connection failed"),
                    Err(e) => tracing::warn!(error = %e, "v2 connection task failed"),
                }
                if stop.is_cancelled() {
                    return Ok(());
                }
                // A connection the server (or something on the way) closes
                // as soon as it is open must not make a tight loop of
                // handshakes.
                let wait = if opened_at.elapsed() >= STABLE {
                    backoff.reset();
                    redial_wait()
                } else {
                    let wait = backoff.step();
                    tracing::debug!(retry_in = ?wait, "v2 connection ended soon after it opened");
                    wait
                };
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = stop.cancelled() => return Ok(()),
                }
            }
            () = renewal => {
                backoff.reset();
                tracing::info!("token close to expiry: opening a new v2 connection");
                previous = Some(conn_stop);
            }
            () = stop.cancelled() => return Ok(()),
        }
    }
}

/// Why a served connection ended with an error.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error("nothing heard from the server for {0:?}")]
    Silent(Duration),
}

/// Serves one upgraded connection as the HTTP/2 server until it ends or
/// `stop` asks for a graceful end (GOAWAY; streams in flight finish).
///
/// The connection is alive while bytes come from the server, or while the
/// server's end takes the bytes sent to it (a write that had to wait for
/// room in the socket's buffer went through). hyper's own keep-alive
/// pings every `relay_ping_interval` without request frames read, and its
/// timeout would count only the answer: on a slow uplink busy with a
/// download, a ping waits behind megabytes of the answer, and a healthy
/// tunnel would be dropped with every transfer on it. So its timeout is
/// left far out, and the connection is given up after
/// `relay_ping_interval + relay_ping_timeout` without either sign of life.
async fn serve(
    ctx: Arc<Ctx>,
    upgraded: Upgraded,
    stop: CancellationToken,
) -> Result<(), ServeError> {
    let (ping, ping_timeout) = (ctx.cfg.relay_ping_interval, ctx.cfg.relay_ping_timeout);
    let progress = crate::clock::Progress::default();
    let io = TokioIo::new(crate::observed::Observed::new(
        TokioIo::new(upgraded),
        Alive {
            progress: progress.clone(),
            blocked: false,
        },
    ));
    let silence = ping.saturating_add(ping_timeout);
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(ctx, req).await) }
    });
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(v2::STREAM_WINDOW)
        .initial_connection_window_size(v2::CONNECTION_WINDOW)
        .max_frame_size(v2::MAX_FRAME)
        .max_header_list_size(v2::MAX_HEADER_LIST)
        // Overload is answered 503 by `handle`, not queued by HTTP/2.
        .max_concurrent_streams(u32::MAX)
        // Upload DATA the server had sent before the reset of its stream
        // reached it would count against h2's limit of resets for the
        // connection's life, which closes it (`docs/transport-v2.md`,
        // "Cancellation").
        .max_local_error_reset_streams(None)
        .keep_alive_interval(ping)
        .keep_alive_timeout(KEEP_ALIVE_ANSWER)
        // A backend's answer without `Date` gets the server's, from the
        // cloud's clock, as on v1: not the robot's, often wrong.
        .auto_date_header(false);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let stalled = progress.stalled(silence);
    tokio::pin!(stalled);
    tokio::select! {
        r = conn.as_mut() => Ok(r?),
        () = &mut stalled => Err(ServeError::Silent(silence)),
        () = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => Ok(r?),
                () = stalled => Err(ServeError::Silent(silence)),
            }
        }
    }
}

/// How long hyper's keep-alive waits for a ping's answer: longer than any
/// transfer, so that only [`serve`]'s own rule ends a connection.
const KEEP_ALIVE_ANSWER: Duration = Duration::from_secs(24 * 3600);

/// Records signs that the server is there: bytes read, and a write that
/// went through after the socket's buffer had been full (the server's end
/// acknowledged bytes).
struct Alive {
    progress: crate::clock::Progress,
    blocked: bool,
}

impl crate::observed::Observer for Alive {
    fn read(&mut self) {
        self.progress.moved();
    }

    fn wrote(&mut self, polled: &std::task::Poll<std::io::Result<usize>>) {
        match polled {
            std::task::Poll::Pending => self.blocked = true,
            std::task::Poll::Ready(Ok(n)) if *n > 0 && self.blocked => {
                self.blocked = false;
                self.progress.moved();
            }
            std::task::Poll::Ready(_) => {}
        }
    }
}

/// An error answer of the relay-client itself; the line names the request
/// (log lines carry no span fields, `docs/telemetry.md`).
fn text(status: StatusCode, id: &str, msg: &str) -> Response<Body> {
    tracing::warn!(id, %status, msg, "answering with an error");
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// One stream of the tunnel: the relayed request, run against the backend.
async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    let id = req
        .headers()
        .get(v2::REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    // Over the cap: a fast 503 rather than tasks and sockets piling up.
    let Ok(permit) = ctx.in_flight.clone().try_acquire_owned() else {
        let max = ctx.cfg.max_concurrent_requests;
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            &id,
            &format!("relay-client busy: {max} requests in flight (max_concurrent_requests)"),
        );
    };
    let span = telemetry::request_span(req.headers(), || {
        tracing::info_span!(
            "relay.client.request",
            relay.request_id = id.as_str(),
            http.request.method = req.method().as_str(),
            url.path = req.uri().path(),
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    });
    // Shared with the task of an upgraded connection: an open backend
    // connection counts as a request in flight until it closes.
    let permit = Arc::new(permit);
    let resp = forward(&ctx, req, &span, &id, &permit)
        .instrument(span.clone())
        .await;
    span.record(
        "http.response.status_code",
        i64::from(resp.status().as_u16()),
    );
    // The permit is held until the response body is over; each frame
    // that leaves is a `relay.client.chunk` of a sampled request.
    let mut chunks = ClientChunks {
        span: telemetry::is_sampled(&span).then_some(span),
        seq: 0,
        pending: None,
        ended: false,
    };
    let (parts, body) = resp.into_parts();
    let body = body
        .map_frame(move |f| {
            let _in_flight = &permit;
            match f.data_ref() {
                Some(d) if d.is_empty() => {}
                Some(d) => chunks.data(d.len()),
                None => chunks.end(),
            }
            f
        })
        .boxed();
    Response::from_parts(parts, body)
}

/// `relay.client.chunk` spans of one response body: one per frame; a
/// frame's span is made when the next frame (or the end) is seen, so the
/// last one carries `eof` (`docs/telemetry.md`).
struct ClientChunks {
    span: Option<tracing::Span>,
    seq: u64,
    pending: Option<usize>,
    ended: bool,
}

impl ClientChunks {
    fn data(&mut self, bytes: usize) {
        if let Some(previous) = self.pending.replace(bytes) {
            self.chunk(previous, false);
        }
    }

    fn chunk(&mut self, bytes: usize, eof: bool) {
        if let Some(parent) = &self.span {
            drop(tracing::info_span!(parent: parent, "relay.client.chunk",
                relay.chunk.seq = telemetry::int(self.seq),
                relay.chunk.bytes = telemetry::int(bytes),
                relay.chunk.eof = eof));
        }
        self.seq += 1;
    }

    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            let last = self.pending.take().unwrap_or(0);
            self.chunk(last, true);
        }
    }
}

impl Drop for ClientChunks {
    fn drop(&mut self) {
        self.end();
    }
}

async fn forward(
    ctx: &Ctx,
    req: Request<Incoming>,
    span: &tracing::Span,
    id: &str,
    permit: &Arc<tokio::sync::OwnedSemaphorePermit>,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let upgrade = parts.headers.get(v2::UPGRADE).cloned();
    let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let uri = format!("{}{}", ctx.backend_base, pq);
    let mut headers = parts.headers;
    headers.remove(v2::REQUEST_ID);
    if upgrade.is_some() {
        headers.remove(v2::UPGRADE);
    }
    headers.remove(header::HOST);
    if !ctx.cfg.backend_http2
        && let Some(authority) = parts
            .uri
            .authority()
            .filter(|a| a.host() != "relay.invalid")
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, host);
    }
    if let Some(token) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, token.clone());
    }
    // An instrumented backend joins the trace, under the backend call's
    // span (or learns that the request is unsampled).
    let backend_span = if telemetry::is_sampled(span) {
        tracing::info_span!(
            "relay.backend_request",
            otel.kind = "client",
            http.request.method = parts.method.as_str(),
            url.path = parts.uri.path(),
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        )
    } else {
        tracing::Span::none()
    };
    if !backend_span.is_disabled() {
        telemetry::inject(&backend_span, &mut headers);
    }
    // The stream's request body is the backend request's body, piped; on
    // an upgrade it is the user's side of the upgraded connection.
    // The upload moving counts as the backend call's progress: a backend
    // may answer only once it has the whole body, however long it takes.
    let progress = crate::clock::Progress::default();
    // hyper sends a GET or HEAD without a declared length as bodiless: a
    // user's body of unknown length (chunked, or HTTP/2 without a length)
    // is then declared chunked, or it would be dropped.
    if upgrade.is_none()
        && !http_body::Body::is_end_stream(&body)
        && matches!(parts.method, http::Method::GET | http::Method::HEAD)
        && !headers.contains_key(header::CONTENT_LENGTH)
    {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let (backend_body, user_bytes) = if upgrade.is_some() {
        (
            Empty::new().map_err(|never| match never {}).boxed(),
            Some(body),
        )
    } else {
        let moving = progress.clone();
        let body = body.map_frame(move |f| {
            if f.is_data() {
                moving.moved();
            }
            f
        });
        (body.map_err(BoxError::from).boxed(), None)
    };
    let mut out = match Request::builder()
        .method(parts.method)
        .uri(&uri)
        .body(backend_body)
    {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                id,
                &format!("invalid request URL {uri:?}: {e}"),
            );
        }
    };
    *out.headers_mut() = headers;
    // The response head is due within `backend_timeout` of the last
    // upload byte that moved (or of the start). The span is held across
    // the call, not entered on each poll.
    let limit = ctx.cfg.backend_timeout;
    let called = tokio::select! {
        r = ctx.backend_stream.request(out) => Ok(r),
        () = progress.stalled(limit) => Err(()),
    };
    if let Ok(Ok(r)) = &called {
        backend_span.record("http.response.status_code", i64::from(r.status().as_u16()));
    } else {
        backend_span.record("otel.status_code", "ERROR");
    }
    drop(backend_span);
    let resp = match called {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            span.record("otel.status_code", "ERROR");
            return text(
                StatusCode::BAD_GATEWAY,
                id,
                &format!("backend unreachable: {e}"),
            );
        }
        Err(_) => {
            span.record("otel.status_code", "ERROR");
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                id,
                &format!("backend did not answer within {limit:?}"),
            );
        }
    };
    if let (Some(user_bytes), StatusCode::SWITCHING_PROTOCOLS) = (user_bytes, resp.status()) {
        return switched(resp, user_bytes, permit.clone());
    }
    let (mut head, body) = resp.into_parts();
    crate::proto::remove_connection_named(&mut head.headers, false);
    crate::proto::remove_all(&mut head.headers, &crate::proto::HOP_BY_HOP);
    // Only the relay-client says that a stream switched.
    head.headers.remove(v2::STATUS);
    Response::from_parts(head, body.map_err(BoxError::from).boxed())
}

/// The backend switched protocols: answer the stream 200 with the 101's
/// headers and `x-relay-status: 101`, then pipe the backend connection
/// with the stream's two bodies, each read written at once.
fn switched(
    resp: Response<Incoming>,
    mut user_bytes: Incoming,
    permit: Arc<tokio::sync::OwnedSemaphorePermit>,
) -> Response<Body> {
    let mut headers = resp.headers().clone();
    crate::proto::remove_all(&mut headers, &crate::proto::HOP_BY_HOP);
    headers.insert(v2::STATUS, HeaderValue::from_static("101"));
    let on_upgrade = hyper::upgrade::on(resp);
    let (to_user, from_backend) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
    // Sent when the stream's response body ends; dropped unsent when the
    // stream goes away first (the user-client left, the stream was reset).
    let (ended, gone) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        // The connection is a request in flight until it closes.
        let _in_flight = permit;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "backend upgrade failed");
                return;
            }
        };
        let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
        // The stream's END_STREAM is the user's half-close, passed on; a
        // failed stream is no half-close, and the backend gets none.
        let to_backend = async move {
            while let Some(frame) = user_bytes.frame().await {
                let Ok(frame) = frame else { return };
                if let Ok(data) = frame.into_data()
                    && wr.write_all(&data).await.is_err()
                {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        };
        // Owns the sender: the stream's response body ends (END_STREAM)
        // as soon as the backend closes its side.
        let to_user_side = async move {
            let mut buf = BytesMut::new();
            loop {
                crate::readbuf::spare(&mut buf);
                match rd.read_buf(&mut buf).await {
                    Ok(0) => break,
                    // Reset, not END_STREAM: the user must not take a
                    // failed connection for one the backend closed.
                    Err(e) => {
                        let _ = to_user.send(Err(e)).await;
                        break;
                    }
                    Ok(_) => {
                        if to_user.send(Ok(buf.split().freeze())).await.is_err() {
                            break;
                        }
                    }
                }
            }
        };
        // The user may half-close first: the backend still talks. The
        // backend's end (the response body ended) or the stream's end
        // ends both directions now, as the server ends the pipe then:
        // even a write to a backend that stopped reading, so that neither
        // the task nor the backend socket outlives the stream.
        let both = async { tokio::join!(to_backend, to_user_side) };
        tokio::select! {
            _ = both => {}
            _ = gone => {}
        }
    });
    let stream = futures_util::stream::unfold(
        (from_backend, Some(ended)),
        |(mut rx, mut ended)| async move {
            match rx.recv().await {
                Some(Ok(b)) => Some((Ok::<_, BoxError>(Frame::data(b)), (rx, ended))),
                Some(Err(e)) => Some((Err(BoxError::from(e)), (rx, ended))),
                None => {
                    if let Some(ended) = ended.take() {
                        let _ = ended.send(());
                    }
                    None
                }
            }
        },
    );
    let mut out = Response::new(StreamBody::new(stream).boxed());
    *out.headers_mut() = headers;
    out
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    /// A name that resolves to fixed addresses.
    #[derive(Clone)]
    struct Fixed(Vec<std::net::SocketAddr>);

    impl tower_service::Service<hyper_util::client::legacy::connect::dns::Name> for Fixed {
        type Response = std::vec::IntoIter<std::net::SocketAddr>;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
            std::future::ready(Ok(self.0.clone().into_iter()))
        }
    }

    #[test]
    fn the_upgrade_names_its_host_as_a_url_would() {
        assert_eq!(host_header("relay.test", 443, true), "relay.test");
        assert_eq!(host_header("relay.test", 80, true), "relay.test:80");
        assert_eq!(host_header("relay.test", 80, false), "relay.test");
        assert_eq!(host_header("::1", 8443, true), "[::1]:8443");
        assert_eq!(host_header("::1", 443, true), "[::1]");
        assert_eq!(host_header("127.0.0.1", 8080, false), "127.0.0.1:8080");
    }

    /// Redials after a server's drain are spread over a second, not made
    /// at once by a whole fleet.
    #[test]
    fn redials_after_a_working_connection_are_spread() {
        let waits: Vec<Duration> = (0..200).map(|_| redial_wait()).collect();
        assert!(waits.iter().all(|w| *w < REDIAL_SPREAD), "{waits:?}");
        let (min, max) = (waits.iter().min(), waits.iter().max());
        let spread = max.zip(min).map(|(a, b)| *a - *b).unwrap_or_default();
        assert!(spread > REDIAL_SPREAD / 2, "spread over {spread:?}");
    }

    /// The server's name resolving to an address that drops connection
    /// attempts (an IPv6 path broken on the robot's network) and to one
    /// that works: the tunnel reaches the second within its open timeout,
    /// as v1 polls do. It used to wait on the first until the timeout.
    #[tokio::test]
    async fn the_dial_moves_on_from_an_address_that_drops_connection_attempts() {
        // A full accept queue: the kernel drops further SYNs.
        let full = tokio::net::TcpSocket::new_v4().expect("socket");
        full.bind(([127, 0, 0, 1], 0).into()).expect("bind");
        let full = full.listen(0).expect("listen");
        let full_addr = full.local_addr().expect("addr");
        let _queued = TcpStream::connect(full_addr).await.expect("queued");
        let good = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let good_addr = good.local_addr().expect("addr");

        let tcp = transport::tcp_connector(
            HttpConnector::new_with_resolver(Fixed(vec![full_addr, good_addr])),
            None,
        );
        let uri: http::Uri = "http://relay.test/".parse().expect("uri");
        let dialled = tokio::time::timeout(OPEN_TIMEOUT, dial(tcp, uri))
            .await
            .expect("dialled within the open timeout")
            .expect("connected");
        assert_eq!(dialled.peer_addr().expect("peer"), good_addr);
        let (_accepted, from) = good.accept().await.expect("accept");
        assert_eq!(from, dialled.local_addr().expect("local"));
    }

    fn token_expiring(exp: serde_json::Value) -> String {
        let claims = serde_json::json!({ "exp": exp });
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"not checked here"),
        )
        .expect("token")
    }

    #[test]
    fn renewal_comes_before_expiry_for_integer_and_decimal_exp() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        for exp in [
            serde_json::json!(now + 100),
            serde_json::json!(now as f64 + 100.4),
        ] {
            let renew = renewal_in(Some(&token_expiring(exp.clone())), None).expect("a renewal");
            // 80 % of the life, and at least 10 s before expiry.
            assert!(
                renew >= Duration::from_secs(75) && renew <= Duration::from_secs(81),
                "{exp}: {renew:?}"
            );
        }
        assert_eq!(renewal_in(None, None), None);
    }

    /// A `Date` past the token's `exp` is not the server's clock.
    #[test]
    fn a_date_past_expiry_is_not_believed() {
        let now = SystemTime::now();
        let exp = now.duration_since(UNIX_EPOCH).expect("clock").as_secs() + 100;
        let token = token_expiring(serde_json::json!(exp));
        let late = now + Duration::from_secs(3600);
        let renew = renewal_in(Some(&token), Some(late)).expect("a renewal");
        assert!(renew >= Duration::from_secs(75), "{renew:?}");
    }

    /// The server's clock decides, whatever the robot's says.
    #[test]
    fn renewal_follows_the_servers_clock() {
        let hour = Duration::from_secs(3600);
        for server_now in [SystemTime::now() + 3 * hour, SystemTime::now() - 3 * hour] {
            let exp = server_now
                .duration_since(UNIX_EPOCH)
                .expect("clock")
                .as_secs()
                + 100;
            let token = token_expiring(serde_json::json!(exp));
            let renew = renewal_in(Some(&token), Some(server_now)).expect("a renewal");
            assert!(
                renew >= Duration::from_secs(75) && renew <= Duration::from_secs(81),
                "{renew:?}"
            );
        }
    }
}
