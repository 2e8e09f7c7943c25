//! The relay-client's side of the v1 protocol: long polls, response chunk
//! posts and request-stream reads (`PROTOCOL.md`, "Relay-client
//! endpoints").

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use prost::Message as _;

use std::sync::Arc;

use crate::auth::client::{TokenError, TokenSource};
use crate::config::ClientConfig;
use crate::proto::{self, HttpRequest, HttpResponse};
use crate::tls::TlsError;

/// Largest poll answer accepted (a request with its whole body).
const MAX_POLL_ANSWER: usize = 1 << 30;
/// Largest request-stream answer accepted.
const MAX_STREAM_ANSWER: usize = 64 << 20;
/// Client-side bound on a call, above the server's poll timeout, so a
/// silently dead HTTP/1.1 connection does not hang a poll forever.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) type HttpsClient<B = Full<Bytes>> =
    Client<hyper_rustls::HttpsConnector<HttpConnector>, B>;

/// Why a call to the relay server failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("relay server unreachable: {0}")]
    Connect(#[from] hyper_util::client::legacy::Error),
    #[error("relay server call timed out")]
    Timeout,
    #[error("relay server answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("reading answer from relay server: {0}")]
    Body(String),
    #[error("malformed request from relay server: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("invalid relay URL: {0}")]
    Url(String),
    #[error("no token for the relay server: {0}")]
    Token(#[from] TokenError),
    /// 401/403: the server refused our token.
    #[error(
        "relay server refused the token ({status}): {body}; the token presented audience {presented}"
    )]
    Refused {
        status: StatusCode,
        body: String,
        presented: String,
    },
}

impl TransportError {
    /// Our token was refused or could not be had: asking faster does not
    /// help (`Backoff::after_failure`).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            TransportError::Refused { .. } | TransportError::Token(_)
        )
    }

    /// Whether the server cannot have taken the call in: the connection
    /// was never made, our token was refused (checked before the body is
    /// read), or the server was unavailable (503: draining, or an ingress
    /// without an upstream). Only such a call is safe to repeat: a chunk
    /// post repeated after the server took it would duplicate its bytes.
    pub fn not_taken(&self) -> bool {
        match self {
            TransportError::Connect(e) => e.is_connect(),
            _ if self.is_refusal() => true,
            TransportError::Status { status, .. } => *status == StatusCode::SERVICE_UNAVAILABLE,
            _ => false,
        }
    }
}

/// The token a call presented (a response extension).
#[derive(Clone)]
struct SentToken(Option<String>);

/// What the server said to a response chunk.
#[derive(Debug, PartialEq, Eq)]
pub enum PostOutcome {
    Accepted,
    /// 400: the request id is unknown (user-client gone or request
    /// reaped); the relay-client must stop and close the backend call.
    Gone,
}

/// What one request-stream read returned.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamRead {
    Bytes(Bytes),
    /// 410 marked [`proto::HALF_CLOSED_HEADER`] (our server): the
    /// user-client's side is over (a half-close).
    Closed,
    /// 410 without the mark: a Go server's (the request is over), or an
    /// older build of ours (a half-close).
    Unmarked,
    /// 400: the request itself is over.
    Gone,
}

/// HTTPS/HTTP client for the relay server; one HTTP/2 connection is
/// shared by all polls and posts, and pinged so a dead server is noticed
/// within seconds.
#[derive(Clone)]
pub struct RelayTransport {
    client: HttpsClient,
    tokens: Arc<TokenSource>,
    base: String,
    backend_query: String,
    /// Whether the last poll answer carried our server's mark
    /// ([`proto::SERVER_MARK_HEADER`]).
    marked: Arc<std::sync::atomic::AtomicBool>,
}

/// TCP keep-alive of a connection: the first probe after `idle` without
/// traffic, then one every `interval`, given up after three unanswered.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TcpKeepalive {
    pub idle: Duration,
    pub interval: Duration,
}

/// How every connection of the relay-client is dialled, to the server (v1
/// and v2) and to the backend: a name's IPv6 and IPv4 addresses raced
/// (Happy Eyeballs), each address given its share of a 10 s limit, so an
/// address that drops packets (IPv6 broken on the robot's network) does
/// not hold the dial until the kernel gives up.
pub(crate) fn tcp_connector<R>(
    mut http: HttpConnector<R>,
    keepalive: Option<TcpKeepalive>,
) -> HttpConnector<R> {
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(10)));
    if let Some(k) = keepalive {
        http.set_keepalive(Some(k.idle));
        http.set_keepalive_interval(Some(k.interval));
        http.set_keepalive_retries(Some(3));
    }
    http
}

/// TCP keep-alive of connections to the server.
///
/// HTTP/2 pings find a dead path for calls over HTTP/2. Over HTTP/1.1
/// (cleartext, or a front that offers no h2) a poll on a path that died
/// after it was sent (the robot changed networks) would wait out
/// `CALL_TIMEOUT` while users get errors for want of a poll: TCP
/// keep-alive finds it in about the same time. Whole seconds, at least
/// one: the kernel refuses zero.
pub(crate) fn relay_keepalive(cfg: &ClientConfig) -> TcpKeepalive {
    TcpKeepalive {
        idle: cfg.relay_ping_interval.max(Duration::from_secs(1)),
        interval: (cfg.relay_ping_timeout / 3).max(Duration::from_secs(1)),
    }
}

pub(crate) fn https_client<B>(
    tls: rustls::ClientConfig,
    configure: impl FnOnce(&mut hyper_util::client::legacy::Builder),
    http2_only: bool,
    keepalive: Option<TcpKeepalive>,
) -> HttpsClient<B>
where
    B: http_body::Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let http = tcp_connector(HttpConnector::new(), keepalive);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        // One HTTP/2 connection carries every user's calls to a gRPC
        // backend: DATA it had sent for calls that users cancelled must
        // not count towards h2's limit of resets for the connection's
        // life, which closes it (`docs/transport-v2.md`, "Cancellation").
        .http2_max_local_error_reset_streams(None);
    if http2_only {
        builder.http2_only(true);
    }
    configure(&mut builder);
    builder.build(https)
}

impl RelayTransport {
    pub fn new(cfg: &ClientConfig, tokens: Arc<TokenSource>) -> Result<Self, TlsError> {
        let tls = crate::tls::client_config_with(cfg.ca_file.as_deref(), cfg.relay_identity())?;
        let ping = cfg.relay_ping_interval;
        let ping_timeout = cfg.relay_ping_timeout;
        let keepalive = relay_keepalive(cfg);
        let client = https_client(
            tls,
            |b| {
                b.http2_keep_alive_interval(ping)
                    .http2_keep_alive_timeout(ping_timeout)
                    .http2_keep_alive_while_idle(true)
                    .pool_idle_timeout(Duration::from_secs(90));
            },
            false,
            Some(keepalive),
        );
        Ok(Self {
            client,
            tokens,
            base: cfg.relay_url.trim_end_matches('/').to_owned(),
            backend_query: form_urlencoded::byte_serialize(cfg.backend_name.as_bytes()).collect(),
            marked: Arc::default(),
        })
    }

    /// Whether the server said it is ours (its last poll answer had
    /// [`proto::SERVER_MARK_HEADER`]), not the fleet's Go server.
    pub fn server_marked(&self) -> bool {
        self.marked.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where the relay token comes from (shared with the v2 transport).
    pub fn tokens(&self) -> &Arc<TokenSource> {
        &self.tokens
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Bytes,
    ) -> Result<hyper::Response<hyper::body::Incoming>, TransportError> {
        let uri = format!("{}{}", self.base, path_and_query);
        let mut req = Request::builder()
            .method(method)
            .uri(&uri)
            .body(Full::new(body.clone()))
            .map_err(|e| TransportError::Url(format!("{uri}: {e}")))?;
        let headers = req.headers_mut();
        // Calls made inside a span (chunk posts) carry its context.
        crate::telemetry::inject(&tracing::Span::current(), headers);
        let token = self.tokens.token().await?;
        if let Some(token) = &token {
            let mut value = http::HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| TransportError::Token(TokenError::Invalid))?;
            // Kept out of HPACK tables and debug output.
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        if !body.is_empty() {
            headers.insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(proto::RESPONSE_CONTENT_TYPE),
            );
        }
        let mut resp = match tokio::time::timeout(CALL_TIMEOUT, self.client.request(req)).await {
            Ok(r) => r?,
            Err(_) => return Err(TransportError::Timeout),
        };
        // For a refusal: which token the server saw.
        resp.extensions_mut().insert(SentToken(token));
        Ok(resp)
    }

    async fn read_body(
        resp: hyper::Response<hyper::body::Incoming>,
        limit: usize,
    ) -> Result<Bytes, TransportError> {
        Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| TransportError::Body(e.to_string()))
    }

    async fn unexpected(&self, resp: hyper::Response<hyper::body::Incoming>) -> TransportError {
        let status = resp.status();
        let sent = resp
            .extensions()
            .get::<SentToken>()
            .and_then(|t| t.0.clone());
        let body = Self::read_body(resp, 4096).await.unwrap_or_default();
        let body = String::from_utf8_lossy(&body).trim().to_owned();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let presented = sent
                .as_deref()
                .map_or_else(|| "<none>".into(), crate::auth::client::presented_audience);
            // A fresh token may cure it, which the next call fetches
            // (unless another call already did, or the token is too young
            // to drop: `TokenSource::invalidate`).
            if let Some(sent) = &sent {
                self.tokens.invalidate(sent).await;
            }
            return TransportError::Refused {
                status,
                body,
                presented,
            };
        }
        TransportError::Status { status, body }
    }

    /// One long poll: `Ok(None)` on 408 (nothing arrived).
    pub async fn poll(&self) -> Result<Option<HttpRequest>, TransportError> {
        let path = format!("/server/request?server={}", self.backend_query);
        let resp = self.call(Method::GET, &path, Bytes::new()).await?;
        if matches!(resp.status(), StatusCode::OK | StatusCode::REQUEST_TIMEOUT) {
            // Each answer says again: the relay URL may have moved to
            // another server since.
            let marked = resp
                .headers()
                .get(proto::SERVER_MARK_HEADER)
                .is_some_and(|v| v == proto::SERVER_MARK);
            self.marked
                .store(marked, std::sync::atomic::Ordering::Relaxed);
        }
        match resp.status() {
            StatusCode::OK => {
                let body = Self::read_body(resp, MAX_POLL_ANSWER).await?;
                Ok(Some(HttpRequest::decode(body)?))
            }
            StatusCode::REQUEST_TIMEOUT => Ok(None),
            _ => Err(self.unexpected(resp).await),
        }
    }

    /// Posts one response chunk.
    pub async fn post_response(&self, chunk: &HttpResponse) -> Result<PostOutcome, TransportError> {
        let resp = self
            .call(
                Method::POST,
                "/server/response",
                chunk.encode_to_vec().into(),
            )
            .await?;
        match resp.status() {
            StatusCode::OK => {
                // Drain the short "ok" so the connection can be reused.
                let _ = Self::read_body(resp, 4096).await;
                Ok(PostOutcome::Accepted)
            }
            StatusCode::BAD_REQUEST => Ok(PostOutcome::Gone),
            _ => Err(self.unexpected(resp).await),
        }
    }

    /// Reads the next user-to-backend bytes of an upgraded request.
    pub async fn request_stream(&self, id: &str) -> Result<StreamRead, TransportError> {
        let id: String = form_urlencoded::byte_serialize(id.as_bytes()).collect();
        // Our server then marks a 410 that is the user's half-close
        // (`forward::pipe`).
        let path = format!(
            "/server/requeststream?id={id}&{}=1",
            proto::HALF_CLOSE_PARAM
        );
        let resp = self.call(Method::POST, &path, Bytes::new()).await?;
        match resp.status() {
            StatusCode::OK => Ok(StreamRead::Bytes(
                Self::read_body(resp, MAX_STREAM_ANSWER).await?,
            )),
            // 400: the id is unknown (request over or reaped).
            StatusCode::BAD_REQUEST => Ok(StreamRead::Gone),
            StatusCode::GONE if resp.headers().contains_key(proto::HALF_CLOSED_HEADER) => {
                Ok(StreamRead::Closed)
            }
            StatusCode::GONE => Ok(StreamRead::Unmarked),
            _ => Err(self.unexpected(resp).await),
        }
    }
}
