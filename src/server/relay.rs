//! Relay-client endpoints (`PROTOCOL.md`, "Relay-client endpoints"):
//! `/server/request`, `/server/response`, `/server/requeststream`.

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use prost::Message as _;

use super::body::{Body, full, read_limited};
use super::{State, gate};
use crate::broker::BrokerError;
use crate::error::RelayError;
use crate::proto::{self, ResponseChunk};
use crate::telemetry::metrics::{method, result};

/// Dispatches `/server/<what>`.
///
/// Only the poll runs inline: thousands of idle polls each hold this
/// future, so the other (larger) handlers are boxed to keep it small.
pub async fn handle(state: &State, req: Request<Incoming>) -> Result<Response<Body>, RelayError> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/server/request") => poll(state, &req).await,
        (&Method::POST, "/server/response") => Box::pin(response(state, req)).await,
        (&Method::POST, "/server/requeststream") => Box::pin(request_stream(state, &req)).await,
        (&Method::GET, proto::v2::CONNECT_PATH) => {
            Box::pin(super::tunnel::connect(state, req)).await
        }
        (
            _,
            "/server/request" | "/server/response" | "/server/requeststream" | "/server/connect",
        ) => Err(RelayError::MethodNotAllowed),
        _ => Err(RelayError::NotFound),
    }
}

/// The value of query parameter `name`, percent-decoded.
pub fn query_param(req: &Request<Incoming>, name: &'static str) -> Result<String, RelayError> {
    req.uri()
        .query()
        .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == name))
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
        .ok_or(RelayError::MissingParam(name))
}

/// The backend a relay-client serves (`server=<name>`), a valid name.
pub fn backend_param(req: &Request<Incoming>) -> Result<String, RelayError> {
    let name = query_param(req, "server")?;
    if !proto::valid_backend_name(&name) {
        return Err(RelayError::BadBackendName);
    }
    Ok(name)
}

fn ok_with(content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut resp = Response::new(full(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

/// `GET /server/request?server=<name>`: long poll for the next request.
async fn poll(state: &State, req: &Request<Incoming>) -> Result<Response<Body>, RelayError> {
    let backend = backend_param(req)?;
    // Boxed while it runs (a key refresh may be behind it), so the idle
    // wait below holds only what it needs.
    let claims = Box::pin(gate::relay_token(state, req.headers(), &backend)).await?;
    gate::relay_access(state, claims.as_ref(), &backend)?;
    gate::relay_cert(state, req.extensions(), &backend)?;
    super::places::Place::prove(req.extensions());
    gate::backend_room(state, &backend)?;
    let m = &state.metrics;
    m.request(method::SERVER_REQUEST, &backend);
    let started = std::time::Instant::now();
    let polled = state.broker.poll(&backend).await;
    m.duration(
        method::SERVER_REQUEST,
        &backend,
        started.elapsed().as_secs_f64(),
    );
    match polled {
        Ok(request) => {
            m.response(method::SERVER_REQUEST, result::OK, &backend);
            Ok(ok_with(
                proto::REQUEST_CONTENT_TYPE,
                request.encode_to_vec().into(),
            ))
        }
        Err(e) => {
            let e = RelayError::from(e);
            m.response(method::SERVER_REQUEST, e.metric_result(), &backend);
            Err(e)
        }
    }
}

/// `POST /server/response`: one chunk of a backend's answer.
async fn response(state: &State, req: Request<Incoming>) -> Result<Response<Body>, RelayError> {
    // Verify the token before reading the body; the owner is known only
    // once the message is decoded.
    let claims = gate::relay_token(state, req.headers(), "-").await?;
    gate::relay_role(state, claims.as_ref())?;
    gate::relay_cert_presented(state, req.extensions())?;
    // A relay token: proven before a chunk of up to 16 MiB is read, so
    // the connection is not evicted in the middle of it.
    super::places::Place::prove(req.extensions());
    let (parts, body) = req.into_parts();
    let limit = state.cfg.limits.max_response_chunk.as_u64();
    // A chunk whose bytes stop for as long as a request may go without a
    // chunk would hold its connection and buffer for ever.
    let idle = state.cfg.timeouts.inactive_request;
    let progress = crate::clock::Progress::default();
    let moving = progress.clone();
    let body = body.map_frame(move |f| {
        moving.moved();
        f
    });
    let body = tokio::select! {
        r = read_limited(body, limit) => r?,
        () = progress.stalled(idle) => {
            return Err(RelayError::ReadBody(format!("chunk stalled for {idle:?}")));
        }
    };
    // Checked here, where the relay-client can still be told (400) and
    // the user-client answered at once (502), instead of after the head.
    let (id, chunk) = match crate::proto::decode_response(body) {
        Ok(mut msg) => {
            let id = msg.id.take().ok_or(BrokerError::MissingId)?;
            (id, ResponseChunk::from_message(msg))
        }
        // Refused before decoding, but the request it answers is known.
        Err(proto::RefusedChunk {
            id: Some(id),
            error,
        }) => (id, Err(error)),
        Err(refused) => return Err(RelayError::BadMessage(refused.error)),
    };
    // The owner comes from the broker, never from the id string.
    let owner = state
        .broker
        .owner(&id)
        .ok_or_else(|| BrokerError::UnknownRequest(id.clone()))?;
    gate::relay_access(state, claims.as_ref(), &owner)?;
    gate::relay_cert(state, &parts.extensions, &owner)?;
    let m = &state.metrics;
    m.request(method::SERVER_RESPONSE, &owner);
    if let Err(e) = state.broker.respond(&id, chunk).await {
        let e = RelayError::from(e);
        m.response(method::SERVER_RESPONSE, e.metric_result(), &owner);
        return Err(e);
    }
    m.response(method::SERVER_RESPONSE, result::OK, &owner);
    let mut resp = Response::new(full(Bytes::from_static(b"ok")));
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

/// `POST /server/requeststream?id=<id>`: next user-to-backend bytes of an
/// upgraded connection.
async fn request_stream(
    state: &State,
    req: &Request<Incoming>,
) -> Result<Response<Body>, RelayError> {
    let id = query_param(req, "id")?;
    let claims = gate::relay_token(state, req.headers(), "-").await?;
    gate::relay_cert_presented(state, req.extensions())?;
    let half_close = query_param(req, proto::HALF_CLOSE_PARAM).is_ok_and(|v| v == "1");
    // To a relay-client that takes 410 for the user's half-close, a gone
    // request is a 400, as for chunk posts: it must not take the end of a
    // reaped upload for the end of the user's input. A Go relay-client
    // knows only 410 here.
    let gone = || {
        if half_close {
            BrokerError::UnknownRequest(id.clone())
        } else {
            BrokerError::StreamClosed
        }
    };
    let owner = state.broker.owner(&id).ok_or_else(gone)?;
    gate::relay_access(state, claims.as_ref(), &owner)?;
    gate::relay_cert(state, req.extensions(), &owner)?;
    super::places::Place::prove(req.extensions());
    let bytes = state
        .broker
        .request_stream(&id, half_close)
        .await
        .map_err(|e| match e {
            BrokerError::UnknownRequest(_) => gone(),
            e => e,
        })?;
    Ok(ok_with(proto::STREAM_CONTENT_TYPE, bytes))
}
