//! User-client requests: translate HTTP into a relayed request, and the
//! relay-client's chunks back into an HTTP response (or an upgraded pipe).

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt as _;

use std::sync::Arc;

use tracing::Instrument as _;
use tracing::field::Empty;

use super::State;
use super::body::{Body, RelayBody, empty};
use crate::broker::{BrokerError, Exchange};
use crate::error::RelayError;
use crate::proto::{self, HttpRequest, ProtoError, ResponseChunk, ResponseHead};
use crate::telemetry::metrics::{self, Direction, method};
use crate::telemetry::{self, Metrics};

/// Where a user-client request goes (`PROTOCOL.md`, "Choosing the backend").
#[derive(Debug, PartialEq, Eq)]
pub struct Route {
    pub backend: String,
    /// The path forwarded to the backend.
    pub path: String,
}

/// `/client/<name>/<rest>` forwards `/<rest>`; any other path goes to the
/// backend named by `X-Server-Name`, unchanged.
///
/// A path with a `%` that starts no `%XX` escape is refused (400), as the
/// Go server refuses it: `http` lets it through, Go's URL parser does
/// not, and the fleet's Go relay-client, which parses every relayed URL,
/// crashes on the error, every request and session of its robot with it.
///
/// A service worker's script is refused (403) unless its path is inside
/// `/client/<name>/`: a worker may control every page under its script's
/// directory, and the directory of `/client/<name>` (or of any path
/// routed by `X-Server-Name`) takes in every backend's pages, which one
/// backend's worker could then read and answer in the user's name.
pub fn route(path: &str, headers: &HeaderMap) -> Result<Route, RelayError> {
    if !escapes_valid(path) {
        return Err(RelayError::BadPathEscape);
    }
    if let Some(rest) = path.strip_prefix("/client/") {
        let (name, tail) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None if is_service_worker_script(headers) => {
                return Err(RelayError::ServiceWorkerScope);
            }
            None => (rest, "/"),
        };
        if name.is_empty() {
            return Err(RelayError::NoBackendName);
        }
        if !crate::proto::valid_backend_name(name) {
            return Err(RelayError::BadBackendName);
        }
        return Ok(Route {
            backend: name.to_owned(),
            path: tail.to_owned(),
        });
    }
    let name = headers
        .get("x-server-name")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or(RelayError::NoBackendName)?;
    if !crate::proto::valid_backend_name(name) {
        return Err(RelayError::BadBackendName);
    }
    if is_service_worker_script(headers) {
        return Err(RelayError::ServiceWorkerScope);
    }
    Ok(Route {
        backend: name.to_owned(),
        path: path.to_owned(),
    })
}

/// Whether a browser is fetching a service worker's script: it says so
/// with `Service-Worker: script` and `Sec-Fetch-Dest: serviceworker`
/// (Service Workers, "Update"; Fetch Metadata).
fn is_service_worker_script(headers: &HeaderMap) -> bool {
    headers.contains_key("service-worker")
        || headers
            .get("sec-fetch-dest")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"serviceworker"))
}

use crate::proto::HOP_BY_HOP;

/// Joins the `cookie` fields that an HTTP/2 user-client may send apart
/// (RFC 9113, section 8.2.3) into one, as the Go server does: relayed
/// apart, they would reach an HTTP/1.1 backend as several `Cookie` lines,
/// which RFC 6265 forbids and many frameworks read only the first of.
pub(super) fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = http::HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// Answer headers by which a backend would act on the relay's whole
/// origin (or host), which every backend shares (`/client/<name>/…`):
/// - `Service-Worker-Allowed`: a worker of one backend's pages could then
///   serve every other backend's;
/// - `Clear-Site-Data`: it would wipe the origin's cookies, the relay's
///   token cookie among them;
/// - `NEL` and `Report-To`: the browser would report every later request
///   to the origin (URLs and all, whatever the backend) to a collector of
///   that backend's choosing, for as long as it says;
/// - `Alt-Svc`: it would send the origin's traffic to another endpoint;
/// - `Strict-Transport-Security`: the relay's operator decides that, not
///   a backend (`includeSubDomains` reaches past the relay's own host);
/// - `Accept-CH` and `Critical-CH`: which client hints the browser sends
///   to the whole origin, every other backend included.
const ORIGIN_WIDE: [HeaderName; 8] = [
    HeaderName::from_static("service-worker-allowed"),
    HeaderName::from_static("clear-site-data"),
    HeaderName::from_static("nel"),
    HeaderName::from_static("report-to"),
    http::header::ALT_SVC,
    http::header::STRICT_TRANSPORT_SECURITY,
    HeaderName::from_static("accept-ch"),
    HeaderName::from_static("critical-ch"),
];

/// Drops a backend's [`ORIGIN_WIDE`] answer headers, and a `Set-Cookie`
/// of the relay's own token cookie (`auth.token_cookie`), which would
/// sign the user in with a token of the backend's choosing. A backend's
/// other cookies stay: the browser scopes them as it would behind any
/// reverse proxy.
pub(super) fn confine_to_backend(headers: &mut HeaderMap, token_cookie: Option<&str>) {
    // One pass over the answer's names, usually without a removal.
    crate::proto::remove_all(headers, &ORIGIN_WIDE);
    let Some(name) = token_cookie else {
        return;
    };
    if let http::header::Entry::Occupied(entry) = headers.entry(http::header::SET_COOKIE) {
        let (_, values) = entry.remove_entry_mult();
        let kept: Vec<_> = values
            .filter(|v| {
                let cookie = v
                    .as_bytes()
                    .split(|b| *b == b'=')
                    .next()
                    .unwrap_or_default();
                cookie.trim_ascii() != name.as_bytes()
            })
            .collect();
        for v in kept {
            headers.append(http::header::SET_COOKIE, v);
        }
    }
}

/// Removes hop-by-hop headers and the ones `Connection` names. On an
/// upgrade, `Connection` and `Upgrade` are what the backend must see.
/// `TE: trailers` stays: gRPC backends require it.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if !crate::proto::holds_any(headers, &HOP_BY_HOP) && !headers.contains_key(header::TE) {
        return;
    }
    crate::proto::remove_connection_named(headers, upgrade);
    for name in &HOP_BY_HOP {
        let keep = upgrade && (name == header::CONNECTION || name == header::UPGRADE);
        if !keep {
            headers.remove(name);
        }
    }
    let te_trailers = headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        })
    });
    headers.remove(header::TE);
    if te_trailers {
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
    }
}

fn is_upgrade_request(req: &Request<Incoming>) -> bool {
    req.version() <= http::Version::HTTP_11 && req.headers().contains_key(header::UPGRADE)
}

/// The `Upgrade` token of an HTTP/1.1 upgrade request that v2 relays as
/// an upgrade. Its stream's request body carries the bytes after the
/// switch, so a request that has a body of its own (an `h2c` upgrade of a
/// POST) travels as a plain request instead: `Upgrade` is hop-by-hop, and
/// the body must not be lost.
pub(super) fn upgrade_token(req: &Request<Incoming>) -> Option<http::HeaderValue> {
    if !is_upgrade_request(req) || !http_body::Body::is_end_stream(req.body()) {
        return None;
    }
    req.headers().get(header::UPGRADE).cloned()
}

/// Relays one user-client request.
pub async fn handle(state: &State, req: Request<Incoming>) -> Result<Response<Body>, RelayError> {
    let route = route(req.uri().path(), req.headers())?;
    let started = std::time::Instant::now();
    let span = telemetry::request_span(req.headers(), || {
        tracing::info_span!(
            "relay.request",
            otel.kind = "server",
            http.request.method = req.method().as_str(),
            url.path = req.uri().path(),
            relay.backend = route.backend.as_str(),
            relay.request_id = Empty,
            http.response.status_code = Empty,
            enduser.id = Empty,
            relay.bytes_in = Empty,
            relay.bytes_out = Empty,
            otel.status_code = Empty,
        )
    });
    // Names nobody polls for are one series: user-clients choose them, and
    // must not grow the metric set without bound.
    let backend = if state.broker.knows_backend(&route.backend) {
        route.backend.clone()
    } else {
        metrics::UNKNOWN_BACKEND.to_owned()
    };
    state.metrics.request(method::CLIENT, &backend);
    let result = relay_request(state, req, route, span.clone(), started)
        .instrument(span.clone())
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    match &result {
        Ok(resp) => {
            span.record(
                "http.response.status_code",
                i64::from(resp.status().as_u16()),
            );
            state
                .metrics
                .response(method::CLIENT, metrics::result::OK, &backend);
        }
        Err(e) => {
            span.record("http.response.status_code", i64::from(e.status().as_u16()));
            span.record("otel.status_code", "ERROR");
            state
                .metrics
                .response(method::CLIENT, e.metric_result(), &backend);
        }
    }
    state.metrics.duration(method::CLIENT, &backend, elapsed);
    result
}

async fn relay_request(
    state: &State,
    mut req: Request<Incoming>,
    route: Route,
    span: tracing::Span,
    started: std::time::Instant,
) -> Result<Response<Body>, RelayError> {
    let traced = telemetry::is_sampled(&span);
    let subject = super::gate::user(state, &mut req, &route.backend).await?;
    if let Some(sub) = &subject {
        span.record("enduser.id", sub.as_str());
    }
    // Fast refusal before reading (up to 64 MiB of) body for nobody.
    if !state.broker.knows_backend(&route.backend) {
        return Err(BrokerError::UnknownBackend(route.backend).into());
    }
    // Held until the response body is done with, or, for an upgraded
    // connection, until the connection ends.
    let admitted = super::load::Admission::new(state.load.admit(&route.backend)?);
    let resp = relay_admitted(state, req, route, span, started, traced, &admitted).await?;
    Ok(resp.map(|b| super::body::holding(b, admitted)))
}

/// Bounds the looks for a route of one request: each look after the
/// first follows an arrival (a tunnel or a poll), so this only matters if
/// routes kept arriving and leaving at once.
const ROUTE_TRIES: usize = 16;

async fn relay_admitted(
    state: &State,
    mut req: Request<Incoming>,
    route: Route,
    span: tracing::Span,
    started: std::time::Instant,
    traced: bool,
    admitted: &super::load::Admission,
) -> Result<Response<Body>, RelayError> {
    // A relay-client connected over v2 takes the request as a stream; v1
    // polls are the fallback (`docs/transport-v2.md`). A v2 relay-client
    // that is redialling is waited for (`Broker::await_route`).
    let routing = std::time::Instant::now();
    let deadline = crate::clock::from_now(state.cfg.timeouts.relay);
    let mut ready = None;
    for _ in 0..ROUTE_TRIES {
        ready = state
            .broker
            .ready_tunnel(&route.backend, || {
                child(traced, || tracing::info_span!("relay.enqueue"))
            })
            .await?;
        if ready.is_some() || !state.broker.await_route(&route.backend, deadline).await? {
            break;
        }
    }
    if let Some(route_to) = ready {
        return super::tunnel::relay(state, req, route, route_to, &span, admitted).await;
    }
    let route_wait = routing.elapsed();
    let on_upgrade = is_upgrade_request(&req).then(|| hyper::upgrade::on(&mut req));
    let place = super::places::Place::of(req.extensions());
    let version = req.version();
    let (parts, body) = req.into_parts();

    let limit = state.cfg.limits.max_request_body.as_u64();
    let declared = refuse_declared_oversize(&parts.headers, limit)?;
    // v1 carries the whole body in one message (`PROTOCOL.md`, "What v1
    // cannot do").
    // An upload that stops must not hold the request (and its share of the
    // body budget) forever; one that keeps moving, however slowly, is read
    // whole, as the Go server does.
    let idle = state.cfg.timeouts.inactive_request;
    let progress = crate::clock::Progress::default();
    let moving = progress.clone();
    let body = http_body_util::BodyExt::map_frame(body, move |f| {
        moving.moved();
        f
    });
    let (body, reserved) = tokio::select! {
        read = state.body_budget.read(body, limit, declared) => read?,
        () = progress.stalled(idle) => {
            return Err(RelayError::ReadBody(format!("no body bytes for {idle:?}")));
        }
    };

    // The wait for a poll starts once the body is in: the upload's time
    // is the user's, and a long one must not leave a request that finds
    // every poll busy no time at all. What the wait for a redialling
    // tunnel took counts, as above.
    let deadline = crate::clock::from_now(state.cfg.timeouts.relay.saturating_sub(route_wait));
    span.record("relay.bytes_in", telemetry::int(body.len()));
    state.metrics.bytes(Direction::ToBackend, body.len());
    let mut headers = parts.headers;
    let host = take_host(&mut headers, &parts.uri);
    strip_hop_by_hop(&mut headers, on_upgrade.is_some());
    join_cookies(&mut headers);
    telemetry::pass_on(&span, &mut headers);
    let message = HttpRequest {
        id: None,
        method: Some(parts.method.as_str().to_owned()),
        host: host.map(Bytes::from),
        url: Some(proto::relay_url(&route.path, parts.uri.query()).into()),
        header: proto::headers_to_proto(&headers),
        body: Some(body),
    };

    let enqueue = child(traced, || tracing::info_span!("relay.enqueue"));
    let mut exchange = state
        .broker
        .relay_until(&route.backend, message, span.clone(), deadline)
        .await?;
    drop(enqueue);
    span.record("relay.request_id", exchange.id());
    let inactive = exchange.inactive_timeout();
    let first_chunk = child(traced, || tracing::info_span!("relay.first_chunk"));
    let first = exchange
        .next_chunk()
        .await?
        .ok_or(BrokerError::Inactive(inactive))?;
    drop(first_chunk);
    // The relay-client answers only once it has read its poll's answer,
    // and with that the last copy of the body is gone: the budget is free
    // again, however long the answer streams.
    drop(reserved);
    // Our relay-client gives the backend's time on the first chunk (time
    // to the head); the Go relay-client on the last one (the whole call),
    // as the Go server reads it: the body records it then.
    let backend_time = match first.backend_duration_ms {
        Some(ms) => {
            state
                .metrics
                .backend_time(&route.backend, started.elapsed().as_secs_f64(), ms);
            None
        }
        None => Some(started),
    };
    let resp = respond(
        exchange,
        first,
        on_upgrade.map(|u| {
            let admission = admitted.clone();
            (u, Upgraded { place, admission })
        }),
        version,
        state,
        backend_time,
    )?;
    Ok(resp)
}

/// 413 before any body is read when the declared length is over `limit`;
/// otherwise the declared length, if any.
pub(super) fn refuse_declared_oversize(
    headers: &HeaderMap,
    limit: u64,
) -> Result<Option<u64>, RelayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(RelayError::BodyTooLarge(limit));
    }
    Ok(declared)
}

/// Removes the user-client's `Host` from the relayed headers and returns
/// it (or the request's authority, for HTTP/2): it travels on its own.
pub(super) fn take_host(headers: &mut HeaderMap, uri: &http::Uri) -> Option<String> {
    headers
        .remove(header::HOST)
        .and_then(|v| v.to_str().ok().map(str::to_owned))
        .or_else(|| uri.authority().map(|a| a.to_string()))
}

/// A child span, or none when the request is not traced.
///
/// Phase spans (`relay.enqueue`, `relay.first_chunk`) are held across
/// their wait, not entered: an instrumented future enters and leaves its
/// span on every poll, which cost each layer a registry lookup and a
/// clock read per poll, and no log line is written inside those waits.
pub(super) fn child(traced: bool, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if traced {
        make()
    } else {
        tracing::Span::none()
    }
}

/// Whether every `%` of `path` starts a `%XX` escape (two hex digits).
fn escapes_valid(path: &str) -> bool {
    let b = path.as_bytes();
    let mut i = 0;
    while let Some(at) = b[i..].iter().position(|&c| c == b'%') {
        let at = i + at;
        match b.get(at + 1..at + 3) {
            Some([h, l]) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => i = at + 3,
            _ => return false,
        }
    }
    true
}

/// Builds the user-client's response from the first chunk.
/// What the task of an upgraded connection keeps until it ends: its
/// connection's place (`limits.max_connections`) and its request's
/// admission (`limits.max_requests_per_backend`).
struct Upgraded {
    place: Option<super::places::Place>,
    admission: super::load::Admission,
}

fn respond(
    exchange: Exchange,
    mut first: ResponseChunk,
    on_upgrade: Option<(OnUpgrade, Upgraded)>,
    version: http::Version,
    state: &State,
    backend_time: Option<std::time::Instant>,
) -> Result<Response<Body>, RelayError> {
    let metrics = state.metrics.clone();
    let ResponseHead {
        status,
        mut headers,
    } = first
        .head
        .take()
        .ok_or(RelayError::BadBackendResponse(ProtoError::Missing(
            "status_code",
        )))?;
    confine_to_backend(&mut headers, state.cfg.auth.token_cookie.as_deref());

    if status == StatusCode::SWITCHING_PROTOCOLS {
        let (on_upgrade, Upgraded { place, admission }) =
            on_upgrade.ok_or(RelayError::UnexpectedUpgrade)?;
        let mut resp = Response::new(empty());
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        let ended = first.eof;
        let first_body = std::mem::take(&mut first.body);
        let stalled = state.cfg.timeouts.idle_stream;
        let piped = pipe(on_upgrade, exchange, first_body, ended, metrics, stalled);
        tokio::spawn(super::places::Place::hold(place, async move {
            let _admission = admission;
            piped.await
        }));
        return Ok(resp);
    }

    strip_hop_by_hop(&mut headers, false);
    headers.remove(header::TE);
    // A gRPC "trailers-only" reply has its status in the headers; gRPC
    // clients read it from the trailers (`PROTOCOL.md`, "gRPC detail").
    let mut trailers = HeaderMap::new();
    if headers.contains_key("grpc-status") {
        for (name, value) in &headers {
            if name.as_str().starts_with("grpc-") {
                trailers.append(name.clone(), value.clone());
            }
        }
    }
    if version <= http::Version::HTTP_11 {
        announce_trailers(&mut headers, trailers.keys().chain(first.trailers.keys()));
    }
    let body = RelayBody::new(exchange, first, trailers, metrics, backend_time)
        .map_err(RelayError::BadBackendResponse)?;
    let mut resp = Response::new(http_body_util::BodyExt::boxed(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    Ok(resp)
}

/// Trailers that gRPC replies end with.
const GRPC_TRAILERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];

/// Declares, in the `Trailer` header of an HTTP/1.1 response, the trailer
/// names known when the head is written: those the backend declared
/// (our relay-client forwards its `Trailer` header), those already on the
/// first chunk (a Go relay-client sends a quick answer as one chunk), and
/// gRPC's for a gRPC reply.
///
/// hyper's HTTP/1.1 encoder writes only trailers the head declared, and a
/// Go relay-client never forwards `Trailer` (`PROTOCOL.md`, "What the Go
/// peers actually send"). Undeclared trailers of a longer stream reach
/// HTTP/2 user-clients only; `PROTOCOL.md` says why.
pub(super) fn announce_trailers<'a>(
    headers: &mut HeaderMap,
    known: impl Iterator<Item = &'a HeaderName>,
) {
    // A body with a length is not chunked: HTTP/1.1 has no trailers then.
    if headers.contains_key(header::CONTENT_LENGTH) {
        return;
    }
    // Declared names, each once and no more than a header map may hold: a
    // relay-client's `Trailer` value can be megabytes of one name.
    let mut names: Vec<HeaderName> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let declared = headers
        .get_all(header::TRAILER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok());
    for name in declared {
        if names.len() == crate::proto::MAX_HEADERS {
            break;
        }
        if seen.insert(name.clone()) {
            names.push(name);
        }
    }
    let declared = names.len();
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let implied = GRPC_TRAILERS
        .iter()
        .filter(|_| grpc)
        .map(|n| HeaderName::from_static(n));
    for name in known.cloned().chain(implied) {
        if seen.insert(name.clone()) {
            names.push(name);
        }
    }
    if names.len() == declared {
        return;
    }
    let list = names
        .iter()
        .map(HeaderName::as_str)
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(v) = http::HeaderValue::from_str(&list) {
        headers.insert(header::TRAILER, v);
    }
}

/// Byte pipe of an upgraded connection (`PROTOCOL.md`, "Upgrades"):
/// backend-to-user bytes come as response chunks, user-to-backend bytes
/// wait for the relay-client's `/server/requeststream` calls.
///
/// The user-client closing its side ends the request stream: 410 to a
/// relay-client that asked for it (ours), silence to the others until the
/// request ends ([`crate::proto::HALF_CLOSE_PARAM`]). The backend's `eof`
/// closes the user-client's side and ends the pipe.
async fn pipe(
    on_upgrade: OnUpgrade,
    mut exchange: Exchange,
    first: Bytes,
    ended: bool,
    metrics: Arc<Metrics>,
    stalled: Duration,
) {
    let upgraded = match on_upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(id = exchange.id(), error = %e, "user-client upgrade failed");
            return;
        }
    };
    let (rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
    let Some(to_backend) = exchange.take_stream() else {
        return;
    };
    let id = exchange.id().to_owned();
    let span = exchange.span().clone();
    metrics.active_streams.inc();

    // The end of the sender is the user's half-close.
    let progress = crate::clock::Progress::default();
    let down_progress = progress.clone();
    let upstream =
        super::pipe::user_to_backend(rd, to_backend, metrics.clone(), progress.clone(), |_| {});
    let idle = exchange.inactive_timeout();
    let down_metrics = metrics.clone();
    let down_span = span.clone();
    let downstream = async move {
        let mut sent = 0usize;
        if !first.is_empty() {
            sent += first.len();
            down_metrics.bytes(Direction::ToUser, first.len());
            if wr.write_all(&first).await.is_err() {
                return false;
            }
            down_progress.moved();
        }
        // Ends on the backend's eof, or broken off: the relay-client's
        // `aborted`, reaping, inactivity. Only the eof is a clean end for
        // the user (TLS `close_notify`, then FIN); a break is not made to
        // look like one, as on v2.
        let mut finished = ended;
        while !finished {
            let Ok(Some(chunk)) = exchange.next_chunk().await else {
                break;
            };
            if !chunk.body.is_empty() {
                sent += chunk.body.len();
                down_metrics.bytes(Direction::ToUser, chunk.body.len());
                if wr.write_all(&chunk.body).await.is_err() {
                    return false;
                }
                down_progress.moved();
            }
            finished = chunk.eof;
        }
        down_span.record("relay.bytes_out", telemetry::int(sent));
        if !finished {
            return false;
        }
        let _ = wr.shutdown().await;
        true
    };
    // Keep-alive chunks do not extend the bound after a half-close: only
    // bytes move `progress`.
    let times = super::pipe::Times { idle, stalled };
    let _ = super::pipe::both_ways(downstream, upstream, times, &progress).await;
    metrics.active_streams.dec();
    tracing::debug!(parent: &span, id, "upgraded connection closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relay-client's `Trailer` and `Connection` values can be megabytes
    /// of one name: each name is kept once, and no more names than a
    /// header map may hold are taken.
    #[test]
    fn long_trailer_and_connection_lists_are_bounded() {
        let mut headers = HeaderMap::new();
        let repeated = "x-a, ".repeat(200_000);
        headers.insert(header::TRAILER, repeated.parse().unwrap());
        let known: Vec<HeaderName> = (0..crate::proto::MAX_HEADERS)
            .map(|i| HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap())
            .collect();
        announce_trailers(&mut headers, known.iter());
        let listed: Vec<&str> = headers[header::TRAILER]
            .to_str()
            .unwrap()
            .split(", ")
            .collect();
        assert_eq!(listed.len(), 1 + known.len());
        assert_eq!(listed[0], "x-a");
        assert_eq!(
            listed[1..],
            known.iter().map(HeaderName::as_str).collect::<Vec<_>>()
        );

        let names: String = (0..5_000).map(|i| format!("x-{i},")).collect();
        headers.insert(header::CONNECTION, names.parse().unwrap());
        headers.insert("x-1", http::HeaderValue::from_static("named"));
        headers.insert("x-4999", http::HeaderValue::from_static("past the cap"));
        strip_hop_by_hop(&mut headers, false);
        assert!(!headers.contains_key("x-1"));
        assert!(!headers.contains_key(header::CONNECTION));
        assert_eq!(headers["x-4999"], "past the cap");
    }

    #[test]
    fn routing_forms() {
        let none = HeaderMap::new();
        // Escapes: valid ones pass as they are, a stray `%` is refused.
        assert_eq!(
            route("/client/r/a%2Fb%e9?", &none).unwrap().path,
            "/a%2Fb%e9?"
        );
        for bad in [
            "/client/r/100%",
            "/client/r/a%zz",
            "/client/r/%4",
            "/pkg.Svc/%",
        ] {
            assert!(
                matches!(route(bad, &none), Err(RelayError::BadPathEscape)),
                "{bad}"
            );
        }
        let r = route("/client/robot-1/a/b", &none).unwrap();
        assert_eq!((r.backend.as_str(), r.path.as_str()), ("robot-1", "/a/b"));
        assert_eq!(route("/client/robot-1", &none).unwrap().path, "/");
        assert_eq!(route("/client/robot-1/", &none).unwrap().path, "/");
        assert!(matches!(
            route("/client/", &none),
            Err(RelayError::NoBackendName)
        ));
        assert!(matches!(
            route("/pkg.Svc/Call", &none),
            Err(RelayError::NoBackendName)
        ));

        // A service worker's script only inside `/client/<name>/`.
        for (name, value) in [
            ("service-worker", "script"),
            ("sec-fetch-dest", "serviceworker"),
        ] {
            let mut sw = HeaderMap::new();
            sw.insert(name, value.parse().unwrap());
            assert_eq!(route("/client/robot-1/sw.js", &sw).unwrap().path, "/sw.js");
            assert_eq!(route("/client/robot-1/", &sw).unwrap().path, "/");
            assert!(matches!(
                route("/client/robot-1", &sw),
                Err(RelayError::ServiceWorkerScope)
            ));
            sw.insert("x-server-name", "robot-1".parse().unwrap());
            assert!(matches!(
                route("/sw.js", &sw),
                Err(RelayError::ServiceWorkerScope)
            ));
        }
        let mut other = HeaderMap::new();
        other.insert("sec-fetch-dest", "document".parse().unwrap());
        assert_eq!(route("/client/robot-1", &other).unwrap().path, "/");

        let mut h = HeaderMap::new();
        h.insert("x-server-name", "robot-2".parse().unwrap());
        let r = route("/pkg.Svc/Call", &h).unwrap();
        assert_eq!(
            (r.backend.as_str(), r.path.as_str()),
            ("robot-2", "/pkg.Svc/Call")
        );
    }
}
