//! The server's side of the v2 transport (`docs/transport-v2.md`): the
//! upgrade that opens a relay-client's tunnel, and relaying a user request
//! as one HTTP/2 stream on it.
//!
//! After the upgrade the server is the HTTP/2 *client* of the connection
//! the relay-client dialled. Bodies are piped between the user's
//! connection and the request's stream (`super::stream`), so HTTP/2 flow
//! control reaches from the user-client to the backend and nothing
//! buffers a whole body.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::mpsc;

use super::body::{Body, BoxError, empty};
use super::user::{
    Route, announce_trailers, child, confine_to_backend, join_cookies, refuse_declared_oversize,
    strip_hop_by_hop, take_host,
};
use super::{State, gate, relay};
use crate::auth::Claims;
use crate::broker::{BrokerError, ReadyTunnel, Tunnel, TunnelRequest};
use crate::error::RelayError;
use crate::proto::v2;
use crate::telemetry::{self, metrics::Direction};

/// `GET /server/connect?server=<name>` with `Upgrade: http-relay-v2`:
/// verifies the relay token for `<name>` and turns the connection into
/// the name's tunnel.
pub async fn connect(
    state: &State,
    mut req: Request<Incoming>,
) -> Result<Response<Body>, RelayError> {
    let backend = relay::backend_param(&req)?;
    let claims = gate::relay_token(state, req.headers(), &backend).await?;
    gate::relay_access(state, claims.as_ref(), &backend)?;
    gate::relay_cert(state, req.extensions(), &backend)?;
    gate::backend_room(state, &backend)?;
    gate::tunnel_room(state, &backend)?;
    let offered = req.version() == http::Version::HTTP_11
        && req
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case(v2::UPGRADE_TOKEN));
    if !offered {
        return Err(RelayError::UpgradeRequired);
    }
    if state.broker.is_draining() {
        return Err(BrokerError::Draining.into());
    }
    let expires = claims.as_ref().map(token_lifetime);
    // Past its `exp` but within `auth.leeway`: the token verifies, but a
    // connection could not outlive it by a moment. Opened, it would close
    // at once, and user requests waiting for the name would be sent there.
    if expires == Some(Duration::ZERO) {
        return Err(RelayError::Auth(crate::auth::AuthError::Expired));
    }
    super::places::Place::prove(req.extensions());
    let on_upgrade = hyper::upgrade::on(&mut req);
    let place = super::places::Place::of(req.extensions());
    tokio::spawn(super::places::Place::hold(
        place,
        run(state.clone(), backend, on_upgrade, expires),
    ));
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    resp.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(v2::UPGRADE_TOKEN));
    Ok(resp)
}

/// How long the token behind a tunnel stays valid: the connection does
/// not outlive it (the relay-client reconnects with a fresh token first).
/// A verified token always has an `exp`; one that cannot be read (or a
/// clock before 1970) gives no time at all rather than forever.
fn token_lifetime(claims: &Claims) -> Duration {
    let now = crate::clock::unix_now().unwrap_or(u64::MAX);
    let left = claims.expires_at().map_or(0, |exp| exp.saturating_sub(now));
    Duration::from_secs(left)
}

/// Runs one tunnel: the HTTP/2 handshake (the server as the client), the
/// broker registration, and the connection until it ends, is closed, or
/// its token expires.
async fn run(state: State, backend: String, on_upgrade: OnUpgrade, expires: Option<Duration>) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(backend, error = %e, "v2 upgrade failed");
            return;
        }
    };
    let heard = Arc::new(AtomicU64::new(0));
    // The handshake is boxed while it runs and the connection after it:
    // the task of every idle tunnel then holds a pointer, not room for
    // the handshake's state and the connection (moved, it takes room
    // twice in an async fn's state).
    let handshake = h2::client::Builder::new()
        .initial_window_size(v2::STREAM_WINDOW)
        .initial_connection_window_size(v2::CONNECTION_WINDOW)
        .max_frame_size(v2::MAX_FRAME)
        .max_header_list_size(v2::MAX_HEADER_LIST)
        .max_send_buffer_size(v2::SEND_BUFFER)
        .enable_push(false)
        // DATA the relay-client had sent before a user's cancellation
        // reached it is answered with resets that h2 counts against a
        // limit for the connection's whole life (1,024), then closes it:
        // users closing busy downloads would take the tunnel from every
        // user of the backend (`docs/transport-v2.md`, "Cancellation").
        // The peer is an authenticated relay-client; any reset it
        // provokes costs it a frame.
        .max_local_error_reset_streams(None)
        .handshake::<_, Bytes>(crate::observed::Observed::new(
            TokioIo::new(upgraded),
            Heard(heard.clone()),
        ));
    let handshake = Box::pin(async move {
        let (sender, conn) = handshake.await?;
        Ok::<_, h2::Error>((sender, Box::new(conn)))
    })
    .await;
    let (sender, mut conn) = match handshake {
        Ok(pair) => pair,
        Err(e) => {
            tracing::info!(backend, error = %e, "v2 handshake with relay-client failed");
            return;
        }
    };
    let pings = conn.ping_pong();
    let mut watch = sender.clone();
    let tunnel = Tunnel::new(sender);
    state.broker.register_tunnel(&backend, tunnel.clone());
    state.metrics.tunnels.inc();
    tracing::info!(backend, "relay-client connected over v2");
    let expiry = async {
        match expires {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    // The gauge counts tunnels that take requests: it drops once, when the
    // tunnel stops taking them (GOAWAY, or the end of the connection).
    // A user's request may flag it first, finding its handle refusing
    // (`Broker::ready_tunnel`); the gauge keeps its own count.
    let retired = AtomicBool::new(false);
    let retire = || {
        tunnel.refuse_new();
        if !retired.swap(true, Ordering::Relaxed) {
            state.metrics.tunnels.dec();
        }
    };
    let alive = keep_alive(pings, heard);
    let closing = tunnel.closing();
    tokio::pin!(expiry, alive, closing);
    loop {
        tokio::select! {
            // The connection first: it reads the frames (a GOAWAY among
            // them) that the branches below look at.
            biased;
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::info!(backend, error = %e, "v2 connection of relay-client ended");
                }
                break;
            }
            e = goaway(&mut watch), if !retired.load(Ordering::Relaxed) => {
                // Streams in flight finish; new requests go to the name's
                // other routes. The connection ends with its last stream.
                retire();
                tracing::info!(backend, reason = %e, "relay-client going away; its tunnel takes no new requests");
            }
            e = &mut alive => {
                tracing::info!(backend, error = %e, "v2 relay-client stopped answering pings; its connection is closed");
                break;
            }
            () = &mut closing => break,
            () = &mut expiry => {
                tracing::info!(backend, "relay-client token expired; its v2 connection is closed");
                break;
            }
        }
    }
    retire();
    tunnel.close();
    state.broker.unregister_tunnel(&backend, &tunnel);
    tracing::info!(backend, "relay-client v2 connection closed");
}

/// Resolves once the relay-client sent GOAWAY: from then on h2 refuses
/// new streams on the connection. `SendRequest::poll_ready` registers no
/// wakeup for that; `run` polls this right after the connection, which
/// has just read the frame.
fn goaway(sender: &mut h2::client::SendRequest<Bytes>) -> impl Future<Output = h2::Error> + '_ {
    std::future::poll_fn(move |cx| match sender.poll_ready(cx) {
        Poll::Ready(Err(e)) => Poll::Ready(e),
        _ => Poll::Pending,
    })
}

/// Counts the reads of the relay-client's connection that brought bytes:
/// a connection that is heard from needs no ping to prove it alive.
struct Heard(Arc<AtomicU64>);

impl crate::observed::Observer for Heard {
    fn read(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

use crate::lock;

/// Keeps a tunnel honest: after `v2::PING_INTERVAL` with nothing read
/// from the relay-client, pings it; returns when the answer does not come
/// within `v2::PING_TIMEOUT` and nothing else was read meanwhile. A
/// connection that died without a FIN (NAT state dropped, cable pulled)
/// must not keep the name; a busy one on a slow link, whose answer waits
/// behind megabytes of data, is alive.
async fn keep_alive(pings: Option<h2::PingPong>, heard: Arc<AtomicU64>) -> String {
    // h2 hands the handle out once, to the one caller: `run`.
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    let mut seen = heard.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(v2::PING_INTERVAL).await;
        let now = heard.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            continue;
        }
        let pong = pings.ping(h2::Ping::opaque());
        tokio::pin!(pong);
        loop {
            match tokio::time::timeout(v2::PING_TIMEOUT, &mut pong).await {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => return e.to_string(),
                Err(_) => {
                    let now = heard.load(Ordering::Relaxed);
                    if now == seen {
                        return format!("no answer within {:?}", v2::PING_TIMEOUT);
                    }
                    seen = now;
                }
            }
        }
        seen = heard.load(Ordering::Relaxed);
    }
}

/// The relay's own headers: set by the server on a stream's request and
/// by the relay-client on its response head, never passed through from a
/// user or a backend.
const RELAY_HEADERS: [HeaderName; 3] = [
    HeaderName::from_static(v2::REQUEST_ID),
    HeaderName::from_static(v2::STATUS),
    HeaderName::from_static(v2::UPGRADE),
];

/// User-to-backend reads queued for the tunnel stream of an upgrade.
const PIPE_QUEUE: usize = 8;

/// Tunnels one bodiless request is opened on, at most, when each one
/// turns out not to have processed it.
const REOPEN_TRIES: usize = 3;

/// Whether the relay-client said it never processed the stream: it was
/// above the last stream id of the relay-client's GOAWAY (RFC 9113,
/// section 6.8; h2 fails only those streams with the remote GOAWAY), or
/// refused with `REFUSED_STREAM` (section 8.7).
fn unprocessed(e: &h2::Error) -> bool {
    e.is_remote() && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM))
}

/// Why reading the user's request body failed: told to the user-client
/// rather than reported as a failure of the tunnel stream it reset.
enum UserBody {
    /// Past `limits.max_request_body` (413).
    TooLarge,
    /// A malformed chunk, a connection that broke (400, as on v1).
    Unreadable(String),
}

/// `<backend>:<uuid>`, the request's id on the tunnel and in its span.
fn request_id(backend: &str) -> String {
    let mut buf = uuid::Uuid::encode_buffer();
    let uuid = uuid::Uuid::new_v4().simple().encode_lower(&mut buf);
    let mut id = String::with_capacity(backend.len() + 1 + uuid.len());
    id.push_str(backend);
    id.push(':');
    id.push_str(uuid);
    id
}

/// The URI of the stream's request: the user's authority, the path at the
/// backend and the user's query.
fn backend_uri(
    authority: http::uri::Authority,
    path: &str,
    query: Option<&str>,
) -> Result<http::Uri, RelayError> {
    let mut forwarded = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
    forwarded.push_str(path);
    if let Some(q) = query {
        forwarded.push('?');
        forwarded.push_str(q);
    }
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(
        http::uri::PathAndQuery::try_from(forwarded)
            .map_err(|e| RelayError::Tunnel(format!("cannot build the request's path: {e}")))?,
    );
    http::Uri::from_parts(parts)
        .map_err(|e| RelayError::Tunnel(format!("cannot build the request's URI: {e}")))
}

/// Relays one user request as a stream on the tunnel of `route_to`
/// (`Broker::ready_tunnel`).
pub async fn relay(
    state: &State,
    mut req: Request<Incoming>,
    route: Route,
    route_to: ReadyTunnel,
    span: &tracing::Span,
    admitted: &super::load::Admission,
) -> Result<Response<Body>, RelayError> {
    let upgrade = super::user::upgrade_token(&req);
    let on_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let place = super::places::Place::of(req.extensions());
    let version = req.version();
    let (parts, body) = req.into_parts();

    let limit = state.cfg.limits.max_request_body.as_u64();
    refuse_declared_oversize(&parts.headers, limit)?;
    let id = request_id(&route.backend);
    span.record("relay.request_id", id.as_str());

    let mut headers = parts.headers;
    let host = take_host(&mut headers, &parts.uri);
    strip_hop_by_hop(&mut headers, false);
    join_cookies(&mut headers);
    // The relay's own headers are the server's word to the relay-client
    // (`docs/transport-v2.md`, "Framing"): a user's copy would be taken
    // for it (an `x-relay-upgrade` would switch a plain request).
    crate::proto::remove_all(&mut headers, &RELAY_HEADERS);
    if upgrade.is_some() {
        // The stream's body is the connection's bytes after the switch: a
        // declared length (a WebSocket GET may carry `content-length: 0`)
        // would make HTTP/2 reset the stream at the first byte past it.
        headers.remove(header::CONTENT_LENGTH);
    }
    telemetry::pass_on(span, &mut headers);
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert(HeaderName::from_static(v2::REQUEST_ID), v);
    }
    // Values new with every request stay out of the tunnel's HPACK
    // tables (sent as "never indexed"): indexed, each would evict the
    // entries that later requests could have reused, and cost both ends
    // an insertion and an eviction per request.
    for name in [v2::REQUEST_ID, "traceparent"] {
        if let Some(v) = headers.get_mut(name) {
            v.set_sensitive(true);
        }
    }
    if let Some(token) = &upgrade {
        headers.insert(HeaderName::from_static(v2::UPGRADE), token.clone());
    }
    // The user's Host travels as the authority (the relay-client sets Host
    // from it for HTTP/1 backends, as v1 does with `host`).
    let authority = host
        .and_then(|h| http::uri::Authority::try_from(h).ok())
        .unwrap_or_else(|| http::uri::Authority::from_static("relay.invalid"));
    let uri = backend_uri(authority, &route.path, parts.uri.query())?;

    let metrics = state.metrics.clone();
    // The upload moving counts as activity: the backend may answer only
    // once it has the whole body, however long that takes to arrive.
    let progress = crate::clock::Progress::default();
    let moving = progress.clone();
    // Set when the user's body fails: the stream is reset, and the
    // user-client is told why, not just that the stream failed.
    let body_failed = Arc::new(std::sync::OnceLock::<UserBody>::new());
    let (body, to_backend): (Body, _) = if upgrade.is_some() {
        // The stream's request body is the user-to-backend direction of
        // the upgraded connection, fed once the user's side is upgraded.
        let (tx, rx) = mpsc::channel::<Bytes>(PIPE_QUEUE);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, BoxError>(Frame::data(b)), rx))
        });
        (StreamBody::new(stream).boxed(), Some(tx))
    } else {
        let failed = body_failed.clone();
        let counted = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
            .map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    metrics.bytes(Direction::ToBackend, d.len());
                    moving.moved();
                }
                f
            })
            .map_err(move |e| {
                let _ = failed.set(if e.is::<http_body_util::LengthLimitError>() {
                    UserBody::TooLarge
                } else {
                    UserBody::Unreadable(e.to_string())
                });
                e
            });
        (counted.boxed(), None)
    };
    let mut out = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(())
        .map_err(|e| RelayError::Tunnel(format!("cannot build request: {e}")))?;
    *out.headers_mut() = headers;

    let traced = telemetry::is_sampled(span);
    let body_done = http_body::Body::is_end_stream(&body);
    // A body of known size gets its length (as hyper's client does, and
    // also when the user's HTTP/2 stream simply ended with its headers),
    // so that a backend that insists on `content-length` sees an empty
    // POST as one: neither an HTTP/1.1 nor an HTTP/2 user-client need
    // send the header.
    let known = if body_done {
        Some(0)
    } else {
        http_body::Body::size_hint(&body).exact()
    };
    if let Some(len) = known
        && (len != 0
            || !matches!(
                *out.method(),
                Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
            ))
    {
        out.headers_mut()
            .entry(header::CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(len));
    }
    let opened = state
        .broker
        .open_stream(&route.backend, route_to, &out, body_done)
        .await
        .map_err(|e| RelayError::Tunnel(e.to_string()))?;
    let (mut treq, mut response, send) = (opened.request, opened.response, opened.body);
    // The body is sent beside the response, on its own task: a full-duplex
    // call reads answers while it still sends. The response side going
    // away ends it. For an upgraded connection that is the end of the
    // pipe (`pipe` keeps the response body): until then the user's bytes
    // go to the backend after the backend's side has ended, and the
    // user's half-close is END_STREAM, as on a TCP connection.
    let awaiting_user = Arc::new(AtomicBool::new(false));
    let (exchange, sending) = if body_done {
        (None, None)
    } else {
        let (exchange, abandoned) = tokio::sync::oneshot::channel();
        let sending = tokio::spawn(super::stream::send_body(
            body,
            send,
            Some(abandoned),
            awaiting_user.clone(),
        ));
        (Some(exchange), Some(sending))
    };
    // The response head is due within `inactive_request` of the last
    // byte of the request body that moved (or of the start).
    let inactive = state.cfg.timeouts.inactive_request;
    let first_chunk = child(traced, || tracing::info_span!("relay.first_chunk"));
    let mut reopened = 0;
    let resp = loop {
        let resp = tokio::select! {
            r = &mut response => r,
            () = progress.stalled(inactive) => {
                // Waiting for the user's next bytes, not for the
                // relay-client's window: the user's upload stalled (400,
                // as on v1). A backend that stopped reading is a 504.
                if upgrade.is_none() && awaiting_user.load(Ordering::Relaxed) {
                    return Err(RelayError::ReadBody(format!("no body bytes for {inactive:?}")));
                }
                return Err(BrokerError::Inactive(inactive).into());
            }
        };
        // A stream the relay-client never processed (RFC 9113, sections
        // 6.8 and 8.7) goes to the next tunnel if nothing of the user's
        // was sent on it: a stream the server opened as the relay-client's
        // GOAWAY was on its way (a token renewal, a relay-client stopping)
        // would otherwise fail though a fresh tunnel is there to take it.
        match resp {
            Err(e) if body_done && reopened < REOPEN_TRIES && unprocessed(&e) => {
                let Some(next) = state
                    .broker
                    .ready_tunnel(&route.backend, tracing::Span::none)
                    .await?
                else {
                    break Err(e);
                };
                tracing::debug!(id, error = %e, "v2 stream not processed; opening it on the next tunnel");
                let opened = state
                    .broker
                    .open_stream(&route.backend, next, &out, true)
                    .await
                    .map_err(|e| RelayError::Tunnel(e.to_string()))?;
                (treq, response) = (opened.request, opened.response);
                reopened += 1;
            }
            r => break r,
        }
    };
    drop(first_chunk);
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            return Err(match body_failed.get() {
                Some(UserBody::TooLarge) => RelayError::BodyTooLarge(limit),
                Some(UserBody::Unreadable(reason)) => RelayError::ReadBody(reason.clone()),
                None => RelayError::Tunnel(e.to_string()),
            });
        }
    };
    // Only a request that asked for an upgrade can switch: on any other,
    // the relay-client's mark would only lengthen the reader's limit.
    let switched = upgrade.is_some()
        && resp
            .headers()
            .get(v2::STATUS)
            .is_some_and(|v| v.as_bytes() == b"101");
    // An HTTP/2 user who takes no bytes for this long gives the stream's
    // window back (see `RecvBody`); on an upgraded connection, the idle
    // limit. An HTTP/1 user's connection has a watchdog of its own.
    let reader_limit = if switched {
        Some(state.cfg.timeouts.idle_stream)
    } else {
        (version >= http::Version::HTTP_2).then_some(inactive)
    };
    let resp = resp.map(|recv| super::stream::RecvBody::new(recv, exchange, reader_limit));
    let (mut head, body) = resp.into_parts();
    crate::proto::remove_all(&mut head.headers, &RELAY_HEADERS);
    confine_to_backend(&mut head.headers, state.cfg.auth.token_cookie.as_deref());

    if let (true, Some(on_upgrade), Some(to_backend), Some(token)) =
        (switched, on_upgrade, to_backend, upgrade)
    {
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *resp.headers_mut() = head.headers;
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        resp.headers_mut().insert(header::UPGRADE, token);
        let idle = state.cfg.timeouts.inactive_request;
        let chunks = ChunkSpans::new(span, traced, "relay.stream_chunk");
        let piped = pipe(
            on_upgrade,
            body,
            (to_backend, sending),
            treq,
            state.metrics.clone(),
            super::pipe::Times {
                idle,
                stalled: state.cfg.timeouts.idle_stream,
            },
            chunks,
        );
        let admission = admitted.clone();
        tokio::spawn(super::places::Place::hold(place, async move {
            let _admission = admission;
            piped.await
        }));
        return Ok(resp);
    }

    strip_hop_by_hop(&mut head.headers, false);
    head.headers.remove(header::TE);
    if version <= http::Version::HTTP_11 {
        announce_trailers(&mut head.headers, std::iter::empty());
    }
    let metrics = state.metrics.clone();
    let mut chunks = ChunkSpans::new(span, traced, "relay.response_chunk");
    // The guard lives as long as the body: the request is in flight
    // (drain, gauges, the tunnel's load) until the user has it all or
    // went away, which resets the tunnel stream.
    let body = body
        .map_frame(move |f| {
            let _in_flight = &treq;
            match f.data_ref() {
                Some(d) => {
                    metrics.bytes(Direction::ToUser, d.len());
                    chunks.data(d.len());
                }
                // Trailers end the stream.
                None => chunks.end(),
            }
            f
        })
        .map_err(BoxError::from)
        .boxed();
    Ok(Response::from_parts(head, body))
}

/// The chunk spans of one relayed body (`docs/telemetry.md`): one per
/// DATA frame that crossed the relay, as v1 makes one per posted chunk.
/// A response frame's span is made when the next frame (or the end) is
/// seen, so the last one carries `eof` without a span of its own. Also
/// records the request's `relay.bytes_out` once the body is over, however
/// it ends.
struct ChunkSpans {
    parent: tracing::Span,
    traced: bool,
    name: &'static str,
    seq: u64,
    bytes: usize,
    /// The response frame whose span waits for the next frame.
    pending: Option<usize>,
    ended: bool,
}

impl ChunkSpans {
    fn new(parent: &tracing::Span, traced: bool, name: &'static str) -> Self {
        Self {
            parent: parent.clone(),
            traced,
            name,
            seq: 0,
            bytes: 0,
            pending: None,
            ended: false,
        }
    }

    fn span(&mut self, bytes: usize, eof: bool, direction: &'static str) {
        if !self.traced {
            return;
        }
        let seq = telemetry::int(self.seq);
        let n = telemetry::int(bytes);
        self.seq += 1;
        if self.name == "relay.stream_chunk" {
            drop(
                tracing::info_span!(parent: &self.parent, "relay.stream_chunk",
                relay.direction = direction, relay.chunk.seq = seq, relay.chunk.bytes = n, relay.chunk.eof = eof),
            );
        } else {
            drop(
                tracing::info_span!(parent: &self.parent, "relay.response_chunk",
                relay.chunk.seq = seq, relay.chunk.bytes = n, relay.chunk.eof = eof),
            );
        }
    }

    fn data(&mut self, n: usize) {
        // Empty frames (an END_STREAM on its own) carry no chunk.
        if n == 0 {
            return;
        }
        self.bytes += n;
        if self.name == "relay.stream_chunk" {
            self.span(n, false, "to_user");
        } else if let Some(previous) = self.pending.replace(n) {
            self.span(previous, false, "to_user");
        }
    }

    fn upstream(&mut self, n: usize) {
        if n > 0 {
            self.span(n, false, "to_backend");
        }
    }

    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            let last = self.pending.take().unwrap_or(0);
            self.span(last, true, "to_user");
        }
    }
}

impl Drop for ChunkSpans {
    fn drop(&mut self) {
        if self.name == "relay.response_chunk" {
            self.end();
        }
        self.parent
            .record("relay.bytes_out", telemetry::int(self.bytes));
    }
}

/// Pipes an upgraded user connection through its tunnel stream: user
/// bytes go out as the stream's request body, backend bytes come as its
/// response body, each written as soon as it is read.
async fn pipe(
    on_upgrade: OnUpgrade,
    mut from_backend: super::stream::RecvBody,
    (to_backend, sending): (mpsc::Sender<Bytes>, Option<tokio::task::JoinHandle<()>>),
    treq: TunnelRequest,
    metrics: std::sync::Arc<crate::telemetry::Metrics>,
    times: super::pipe::Times,
    chunks: ChunkSpans,
) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "user-client upgrade failed");
            return;
        }
    };
    metrics.active_streams.inc();
    let (rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
    let chunks = std::sync::Arc::new(std::sync::Mutex::new(chunks));
    let up_chunks = chunks.clone();
    // The end of the sender ends the stream's request body (END_STREAM).
    let progress = crate::clock::Progress::default();
    let down_progress = progress.clone();
    let upstream = super::pipe::user_to_backend(
        rd,
        to_backend,
        metrics.clone(),
        progress.clone(),
        move |n| lock(&up_chunks).upstream(n),
    );
    let down_metrics = metrics.clone();
    // The response body is kept to the end of the pipe, not of the
    // backend's direction: its drop resets the stream (and stops a
    // request body that waits for room the relay-client may never give),
    // while the user's direction may go on after the backend's has ended.
    let from_backend = &mut from_backend;
    let downstream = async move {
        while let Some(frame) = from_backend.frame().await {
            // A failed stream (the backend's connection failed, the
            // relay-client went away) is no end of the backend's output:
            // no clean close for the user, whose TLS then reports the
            // connection cut.
            let Ok(frame) = frame else { return false };
            if let Ok(data) = frame.into_data() {
                down_metrics.bytes(Direction::ToUser, data.len());
                lock(&chunks).data(data.len());
                if wr.write_all(&data).await.is_err() {
                    return false;
                }
                down_progress.moved();
            }
        }
        let _ = wr.shutdown().await;
        true
    };
    let clean = super::pipe::both_ways(downstream, upstream, times, &progress).await;
    if clean && let Some(sending) = sending {
        // Both sides closed, the user's first: its last bytes still reach
        // the relay-client, then END_STREAM, as the last bytes and FIN of
        // a TCP connection would. Dropping the response body before would
        // reset the stream over them.
        let _ = tokio::time::timeout(times.idle, sending).await;
    }
    metrics.active_streams.dec();
    drop(treq);
}
