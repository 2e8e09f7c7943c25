//! One relayed request on the relay-client: call the backend, cut its
//! answer into chunks, and pipe upgraded connections.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::time::Instant;

use super::transport::{PostOutcome, StreamRead, TransportError};
use tracing::Instrument as _;
use tracing::field::Empty;

use super::{Backoff, Ctx};
use crate::proto::{self, HttpRequest, HttpResponse};
use crate::telemetry;

/// Why a relayed request ended early on the relay-client.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("request without id")]
    NoId,
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("user-client went away")]
    Gone,
}

/// Runs one request end to end. Errors are logged, never propagated: one
/// bad request must not disturb the others.
pub async fn forward(ctx: &Ctx, req: HttpRequest) {
    let id = req.id.clone().unwrap_or_default();
    // Continue the trace the server put into the relayed headers.
    let trace = trace_headers(&req);
    let span = telemetry::request_span(&trace, || {
        tracing::info_span!(
            "relay.client.request",
            relay.request_id = id.as_str(),
            http.request.method = req.method.as_deref().unwrap_or(""),
            url.path = Empty,
            http.response.status_code = Empty,
            otel.status_code = Empty,
        )
    });
    match forward_inner(ctx, req, &span)
        .instrument(span.clone())
        .await
    {
        Ok(()) => tracing::debug!(parent: &span, id, "request done"),
        Err(ForwardError::Gone) => {
            tracing::debug!(parent: &span, id, "user-client went away; backend call closed")
        }
        Err(e) => {
            span.record("otel.status_code", "ERROR");
            tracing::warn!(parent: &span, id, error = %e, "request failed");
        }
    }
}

/// [`forward`] until `abandoned` (the relay-client's shutdown grace is
/// over). The backend call is then dropped and the server told that the
/// answer will not come ([`HttpResponse::aborted`]): its user gets an
/// error (or a cut answer, if the head went out) at once, not at
/// `timeouts.inactive_request`. A Go server skips the mark and ends the
/// request when it reaps it, as with a Go relay-client.
pub async fn forward_until(ctx: &Ctx, req: HttpRequest, abandoned: impl Future<Output = ()>) {
    let id = req.id.clone();
    tokio::select! {
        // A request that ends as the grace does needs no word.
        biased;
        () = forward(ctx, req) => {}
        () = abandoned => {
            let Some(id) = id else { return };
            let chunk = HttpResponse {
                id: Some(id.clone()),
                aborted: Some(true),
                ..Default::default()
            };
            match post(ctx, &chunk).await {
                Ok(()) | Err(ForwardError::Gone) => {
                    tracing::debug!(id, "request abandoned at shutdown: the server was told");
                }
                Err(e) => tracing::debug!(id, error = %e, "request abandoned at shutdown"),
            }
        }
    }
}

/// Answers a request 503 because `max_concurrent_requests` are in flight.
pub async fn refuse_busy(ctx: &Ctx, req: HttpRequest) {
    let Some(id) = req.id else { return };
    let max = ctx.cfg.max_concurrent_requests;
    let msg = format!("relay-client busy: {max} requests in flight (max_concurrent_requests)");
    if let Err(e) = post_error(ctx, &id, StatusCode::SERVICE_UNAVAILABLE, &msg).await {
        tracing::debug!(id, error = %e, "could not refuse request");
    }
}

/// The W3C trace-context headers of a relayed request.
fn trace_headers(req: &HttpRequest) -> HeaderMap {
    let mut out = HeaderMap::new();
    for h in &req.header {
        let name = h.name.as_deref().unwrap_or_default();
        if (name.eq_ignore_ascii_case(b"traceparent") || name.eq_ignore_ascii_case(b"tracestate"))
            && let (Ok(n), Ok(v)) = (
                http::HeaderName::from_bytes(name),
                HeaderValue::from_bytes(h.value.as_deref().unwrap_or_default()),
            )
        {
            out.append(n, v);
        }
    }
    out
}

async fn forward_inner(
    ctx: &Ctx,
    req: HttpRequest,
    span: &tracing::Span,
) -> Result<(), ForwardError> {
    let id = req.id.clone().ok_or(ForwardError::NoId)?;
    let started = Instant::now();
    let mut backend_req = match backend_request(ctx, req) {
        Ok(r) => r,
        Err(msg) => return post_error(ctx, &id, StatusCode::BAD_REQUEST, &msg).await,
    };
    span.record("url.path", backend_req.uri().path());
    let wants_upgrade = backend_req.headers().contains_key(header::UPGRADE);
    let backend_span = if telemetry::is_sampled(span) {
        tracing::info_span!(
            "relay.backend_request",
            otel.kind = "client",
            http.request.method = backend_req.method().as_str(),
            url.path = backend_req.uri().path(),
            http.response.status_code = Empty,
            otel.status_code = Empty,
        )
    } else {
        tracing::Span::none()
    };
    // An instrumented backend joins the trace (an unsampled one learns
    // that it is unsampled).
    let carrier = if backend_span.is_disabled() {
        span
    } else {
        &backend_span
    };
    telemetry::inject(carrier, backend_req.headers_mut());
    // Bounded: a backend that never answers must not keep a task and a
    // socket here long after the user-client got its 504.
    let limit = ctx.cfg.backend_timeout;
    // The span is held across the call, not entered on each poll.
    let called = tokio::time::timeout(limit, ctx.backend.request(backend_req)).await;
    let resp = match called {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            backend_span.record("otel.status_code", "ERROR");
            drop(backend_span);
            let msg = format!("backend unreachable: {e}");
            return post_error(ctx, &id, StatusCode::BAD_GATEWAY, &msg).await;
        }
        Err(_) => {
            backend_span.record("otel.status_code", "ERROR");
            drop(backend_span);
            let msg = format!("backend did not answer within {limit:?}");
            return post_error(ctx, &id, StatusCode::GATEWAY_TIMEOUT, &msg).await;
        }
    };
    backend_span.record(
        "http.response.status_code",
        i64::from(resp.status().as_u16()),
    );
    drop(backend_span);
    span.record(
        "http.response.status_code",
        i64::from(resp.status().as_u16()),
    );
    let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
    // Headers about the backend connection stay here (a 101 keeps
    // `Connection` and `Upgrade`: they announce the switch to the user).
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let hop_by_hop: &[HeaderName] = if switching {
        &RESPONSE_HOP_BY_HOP_101
    } else {
        &proto::HOP_BY_HOP
    };
    let header = if proto::holds_any(resp.headers(), hop_by_hop) {
        let mut headers = resp.headers().clone();
        proto::remove_connection_named(&mut headers, switching);
        proto::remove_all(&mut headers, hop_by_hop);
        proto::headers_to_proto(&headers)
    } else {
        proto::headers_to_proto(resp.headers())
    };
    let first = HttpResponse {
        id: Some(id.clone()),
        status_code: Some(i32::from(resp.status().as_u16())),
        header,
        backend_duration_ms: Some(duration_ms),
        ..Default::default()
    };
    if switching && wants_upgrade {
        return pipe(ctx, id, first, resp).await;
    }
    let chunker = Chunker::new(ctx, first, false);
    chunker.run(resp.into_body()).await
}

/// [`proto::HOP_BY_HOP`] but `Connection` and `Upgrade`.
const RESPONSE_HOP_BY_HOP_101: [HeaderName; 3] = [
    header::TRANSFER_ENCODING,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Turns the relayed message into the backend request: path and query
/// from its URL, the backend's scheme and authority, and the user-client's
/// `Host` (HTTP/1 backends; HTTP/2 ones take the authority).
fn backend_request(ctx: &Ctx, req: HttpRequest) -> Result<Request<Full<Bytes>>, String> {
    let method = http::Method::from_bytes(req.method.as_deref().unwrap_or("GET").as_bytes())
        .map_err(|_| format!("invalid method {:?}", req.method))?;
    let url = req.url.as_deref().unwrap_or(b"/");
    let pq = proto::path_and_query(url).map_err(|e| e.to_string())?;
    let uri = format!("{}{}", ctx.backend_base, pq);
    let mut headers = proto::headers_from_proto(&req.header).map_err(|e| e.to_string())?;
    // The body is whole; hyper frames it with its own Content-Length.
    headers.remove(header::TRANSFER_ENCODING);
    if !ctx.cfg.backend_http2
        && let Some(host) = req
            .host
            .as_deref()
            .and_then(|h| HeaderValue::from_bytes(h).ok())
    {
        headers.insert(header::HOST, host);
    }
    let body = req.body.unwrap_or_default();
    // hyper writes no length for an empty body; a backend may want one on
    // a method that carries a body (411), and the Go relay-client sends it.
    if body.is_empty()
        && matches!(
            method,
            http::Method::POST | http::Method::PUT | http::Method::PATCH
        )
    {
        headers
            .entry(header::CONTENT_LENGTH)
            .or_insert(HeaderValue::from_static("0"));
    }
    let mut out = Request::builder()
        .method(method)
        .uri(&uri)
        .body(Full::new(body))
        .map_err(|e| format!("invalid request URL {uri:?}: {e}"))?;
    *out.headers_mut() = headers;
    Ok(out)
}

/// Answers the user-client with an error of the relay-client's own.
pub(super) async fn post_error(
    ctx: &Ctx,
    id: &str,
    status: StatusCode,
    msg: &str,
) -> Result<(), ForwardError> {
    tracing::warn!(id, %status, msg, "answering with an error");
    let mut header = HeaderMap::new();
    header.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    let chunk = HttpResponse {
        id: Some(id.to_owned()),
        status_code: Some(i32::from(status.as_u16())),
        header: proto::headers_to_proto(&header),
        body: Some(Bytes::from(format!("{msg}\n"))),
        eof: Some(true),
        ..Default::default()
    };
    post(ctx, &chunk).await
}

/// How long a chunk post that the server did not take in is tried again.
/// Long enough for a fresh token after a key rotation, a reconnect after
/// a dropped connection, or a brief 503; short, because a server that is
/// gone for longer has lost the request with its memory (a restarted one
/// answers 400 for its id), and the backend call should end.
const POST_RETRY_WINDOW: Duration = Duration::from_secs(3);

async fn post(ctx: &Ctx, chunk: &HttpResponse) -> Result<(), ForwardError> {
    let give_up = crate::clock::from_now(POST_RETRY_WINDOW);
    let mut backoff = Backoff::new();
    let mut attempt = 1;
    loop {
        let e = match ctx.transport.post_response(chunk).await {
            Ok(PostOutcome::Accepted) => return Ok(()),
            Ok(PostOutcome::Gone) => return Err(ForwardError::Gone),
            Err(e) => e,
        };
        // Repeated only when the server cannot have taken it: a repeated
        // chunk that it did take would duplicate its bytes.
        let wait = backoff.after_failure(e.is_refusal());
        if !e.not_taken() || Instant::now() + wait > give_up {
            return Err(e.into());
        }
        tracing::debug!(
            id = chunk.id.as_deref().unwrap_or_default(),
            attempt,
            error = %e,
            retry_in = ?wait,
            "chunk post not taken; trying again"
        );
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// Cuts a body into response chunks (`PROTOCOL.md`, step 3): at
/// `max_chunk_size`, when the oldest unsent byte is `flush_interval` old,
/// and an empty keep-alive chunk after `keepalive_interval` of silence
/// (for upgraded connections: at every read). Posts are sequential: chunk
/// order is the byte order.
struct Chunker<'a> {
    ctx: &'a Ctx,
    id: String,
    /// Sequence number of the next chunk.
    seq: u64,
    /// Whether the request is traced (chunk spans only then).
    traced: bool,
    first: Option<HttpResponse>,
    buf: BytesMut,
    trailers: HeaderMap,
    /// Send every read at once (upgraded connections): no flush delay.
    immediate: bool,
}

impl<'a> Chunker<'a> {
    fn new(ctx: &'a Ctx, first: HttpResponse, immediate: bool) -> Self {
        Self {
            ctx,
            id: first.id.clone().unwrap_or_default(),
            seq: 0,
            // Created inside the request's span.
            traced: telemetry::is_sampled(&tracing::Span::current()),
            first: Some(first),
            buf: BytesMut::new(),
            trailers: HeaderMap::new(),
            immediate,
        }
    }

    async fn run<B>(mut self, body: B) -> Result<(), ForwardError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let max = usize::try_from(self.ctx.max_chunk()).unwrap_or(usize::MAX);
        let flush = self.ctx.cfg.flush_interval;
        let keepalive = self.ctx.cfg.keepalive_interval;
        let mut body = body;
        // The first chunk waits one flush interval, so a small answer
        // travels as one post: headers, body and eof together. An upgraded
        // connection sends its head at once, and then what it read as soon
        // as nothing more is ready, never through a timer: tokio's timers
        // tick in whole milliseconds, and each round trip of an
        // interactive session would wait for one.
        let mut deadline = if self.immediate {
            self.send(false).await?;
            None
        } else {
            Some(crate::clock::from_now(flush))
        };
        let mut idle_since = Instant::now();
        loop {
            let wake = deadline.unwrap_or_else(|| crate::clock::after(idle_since, keepalive));
            let frame = if body.is_end_stream() {
                None
            } else if self.immediate && !self.buf.is_empty() {
                // An upgraded stream coalesces what is ready now (a bulk
                // copy fills chunks) and posts as soon as nothing is.
                match futures_util::FutureExt::now_or_never(body.frame()) {
                    Some(f) => Some(f),
                    None => {
                        self.send(false).await?;
                        idle_since = Instant::now();
                        continue;
                    }
                }
            } else {
                tokio::select! {
                    f = body.frame() => Some(f),
                    () = tokio::time::sleep_until(wake) => {
                        // Time to flush buffered bytes, or send a keep-alive.
                        self.send(false).await?;
                        deadline = None;
                        idle_since = Instant::now();
                        continue;
                    }
                }
            };
            match frame {
                None | Some(None) => return self.send(true).await,
                Some(Some(Err(e))) => {
                    // Never an `eof`: that would make the cut body look
                    // complete. Our server ends the request as failed; a Go
                    // server skips the mark and reaps the request later.
                    tracing::warn!(id = self.id, error = %e, "backend body failed");
                    return self.abort().await;
                }
                Some(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        self.buf.extend_from_slice(&data);
                        if !self.immediate {
                            deadline.get_or_insert_with(|| crate::clock::from_now(flush));
                        }
                        while self.buf.len() >= max {
                            let rest = self.buf.split_off(max);
                            self.send(false).await?;
                            self.buf = rest;
                        }
                        if self.buf.is_empty() && self.first.is_none() {
                            deadline = None;
                            idle_since = Instant::now();
                        }
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            self.trailers.extend(t);
                        }
                    }
                },
            }
        }
    }

    /// The next chunk: the first one (the head) if it is still unsent,
    /// with the bytes buffered so far.
    fn next_chunk(&mut self) -> HttpResponse {
        let mut chunk = self.first.take().unwrap_or_else(|| HttpResponse {
            id: Some(self.id.clone()),
            ..Default::default()
        });
        let body = self.buf.split().freeze();
        if !body.is_empty() {
            chunk.body = Some(body);
        }
        chunk
    }

    /// Posts what is buffered with the [`HttpResponse::aborted`] mark.
    async fn abort(&mut self) -> Result<(), ForwardError> {
        let mut chunk = self.next_chunk();
        chunk.aborted = Some(true);
        match post(self.ctx, &chunk).await {
            // Our server ends the request at once and says so.
            Ok(()) | Err(ForwardError::Gone) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn send(&mut self, eof: bool) -> Result<(), ForwardError> {
        let mut chunk = self.next_chunk();
        if eof {
            chunk.eof = Some(true);
            chunk.trailer = proto::headers_to_proto(&std::mem::take(&mut self.trailers));
        }
        let span = if self.traced {
            tracing::info_span!(
                "relay.client.chunk",
                relay.chunk.seq = telemetry::int(self.seq),
                relay.chunk.bytes = telemetry::int(chunk.body.as_ref().map_or(0, Bytes::len)),
                relay.chunk.eof = eof,
            )
        } else {
            tracing::Span::none()
        };
        self.seq += 1;
        // The post carries this span's context (see `RelayTransport`).
        post(self.ctx, &chunk).instrument(span).await
    }
}

/// Consecutive failed request-stream reads before giving up.
const STREAM_RETRIES: u32 = 5;

/// Pipes an upgraded backend connection (`PROTOCOL.md`, "Upgrades"):
/// backend bytes go out as response chunks; user bytes come from
/// `/server/requeststream` until 410, which half-closes the backend side
/// (we ask our server for that 410 at the user's half-close;
/// [`proto::HALF_CLOSE_PARAM`]). A read that failed after the server may
/// have answered it closes the backend connection.
async fn pipe(
    ctx: &Ctx,
    id: String,
    first: HttpResponse,
    resp: hyper::Response<hyper::body::Incoming>,
) -> Result<(), ForwardError> {
    let upgraded = match hyper::upgrade::on(resp).await {
        Ok(u) => u,
        Err(e) => {
            return post_error(
                ctx,
                &id,
                StatusCode::BAD_GATEWAY,
                &format!("backend upgrade failed: {e}"),
            )
            .await;
        }
    };
    let (rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
    let from_backend = async {
        let stream = tokio_util::io::ReaderStream::with_capacity(rd, crate::readbuf::PIPE_READ);
        let body = StreamBody::new(futures_util::StreamExt::map(stream, |r| {
            r.map(http_body::Frame::data)
        }));
        // Bytes of an upgraded connection go out as soon as they are read:
        // an interactive session must not wait for a flush timer.
        Chunker::new(ctx, first, true).run(body).await
    };
    let to_backend = async {
        // A call the server did not take (a reconnect, a 503) is retried.
        // One it may have answered is not: its answer carried the user's
        // next bytes off the server, and going on would write the stream
        // with a hole in it (`kubectl cp` would land corrupt). Like the Go
        // relay-client, the connection is given up instead.
        let mut backoff = Backoff::new();
        let mut failures = 0;
        loop {
            match ctx.transport.request_stream(&id).await {
                Ok(StreamRead::Bytes(b)) => {
                    backoff.reset();
                    failures = 0;
                    if !b.is_empty() && wr.write_all(&b).await.is_err() {
                        break;
                    }
                }
                Ok(StreamRead::Closed) => break,
                // Only a server that offered no v2 (most likely the Go
                // one) ends the request with a 410.
                Ok(StreamRead::Unmarked) if !ctx.v1_only_server() => break,
                Ok(StreamRead::Unmarked | StreamRead::Gone) => {
                    tracing::debug!(id, "request over: closing the backend connection");
                    return false;
                }
                Err(e) if e.not_taken() && failures < STREAM_RETRIES => {
                    failures += 1;
                    let wait = backoff.after_failure(e.is_refusal());
                    tracing::debug!(id, error = %e, retry_in = ?wait, "request stream read not taken");
                    tokio::time::sleep(wait).await;
                }
                Err(e) if e.not_taken() => {
                    tracing::warn!(id, error = %e, "request stream unavailable: closing the backend connection");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(
                        id,
                        error = %e,
                        "request stream failed, user bytes may be lost: closing the backend connection"
                    );
                    return false;
                }
            }
        }
        let _ = wr.shutdown().await;
        true
    };
    let mut from_backend = Box::pin(from_backend);
    tokio::select! {
        // The backend's end first: its eof may be posted already.
        biased;
        r = &mut from_backend => r,
        whole = to_backend => {
            if whole {
                return from_backend.await;
            }
            // Both halves dropped: the backend connection closes, and the
            // user's side ends with it.
            drop(from_backend);
            let eof = HttpResponse {
                id: Some(id.clone()),
                eof: Some(true),
                ..Default::default()
            };
            post(ctx, &eof).await
        }
    }
}
