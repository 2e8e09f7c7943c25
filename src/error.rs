//! The one place where relay errors become HTTP status codes.
//!
//! Handlers return [`RelayError`]; [`RelayError::into_response`] answers
//! with the status and a one-line plain-text reason. Nothing else in the
//! server picks an error status.

use bytes::Bytes;
use http::{Response, StatusCode, header};

use crate::auth::AuthError;
use crate::broker::BrokerError;
use crate::proto::ProtoError;
use crate::server::body::{Body, full};

/// Everything a server handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("no backend named: use /client/<name>/... or the X-Server-Name header")]
    NoBackendName,
    #[error("missing query parameter {0:?}")]
    MissingParam(&'static str),
    #[error("invalid backend name: 1 to 63 of A-Z a-z 0-9 . _ -")]
    BadBackendName,
    #[error("invalid URL escape in the path: a % must start %XX")]
    BadPathEscape,
    #[error(
        "a service worker's script must be inside /client/<name>/: its scope would take in every backend"
    )]
    ServiceWorkerScope,
    #[error("too many backends connected (limits.max_backends = {0})")]
    TooManyBackends(usize),
    #[error(
        "too many v2 connections for this backend (limits.max_tunnels_per_backend = {0}); retry later"
    )]
    TooManyTunnels(usize),
    #[error(
        "too many requests for this backend (limits.max_requests_per_backend = {0}); retry later"
    )]
    BackendBusy(usize),
    #[error(
        "the relay is holding too many request bodies (limits.max_buffered_bytes); retry later"
    )]
    BufferFull,
    #[error("request body larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("cannot read request body: {0}")]
    ReadBody(String),
    #[error("malformed message from relay-client: {0}")]
    BadMessage(ProtoError),
    #[error("invalid response from backend: {0}")]
    BadBackendResponse(ProtoError),
    #[error("backend switched protocols although the request asked for no upgrade")]
    UnexpectedUpgrade,
    #[error("{0}")]
    Broker(#[from] BrokerError),
    #[error("{0}")]
    Auth(AuthError),
    #[error("{0}")]
    ClientCert(crate::tls::client_cert::CertRefusal),
    #[error("not found")]
    NotFound,
    #[error("this endpoint needs an HTTP/1.1 upgrade to http-relay-v2")]
    UpgradeRequired,
    #[error("relay-client connection failed: {0}")]
    Tunnel(String),
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl RelayError {
    /// The HTTP status of each error (`PROTOCOL.md` fixes most of them).
    pub fn status(&self) -> StatusCode {
        use BrokerError as B;
        match self {
            RelayError::NoBackendName
            | RelayError::MissingParam(_)
            | RelayError::BadBackendName
            | RelayError::BadPathEscape => StatusCode::BAD_REQUEST,
            RelayError::TooManyBackends(_)
            | RelayError::BackendBusy(_)
            | RelayError::BufferFull => StatusCode::SERVICE_UNAVAILABLE,
            RelayError::TooManyTunnels(_) => StatusCode::TOO_MANY_REQUESTS,
            RelayError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RelayError::ReadBody(_) | RelayError::BadMessage(_) => StatusCode::BAD_REQUEST,
            RelayError::BadBackendResponse(_) | RelayError::UnexpectedUpgrade => {
                StatusCode::BAD_GATEWAY
            }
            RelayError::NotFound => StatusCode::NOT_FOUND,
            RelayError::ServiceWorkerScope => StatusCode::FORBIDDEN,
            RelayError::UpgradeRequired => StatusCode::UPGRADE_REQUIRED,
            RelayError::Tunnel(_) => StatusCode::BAD_GATEWAY,
            RelayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RelayError::Auth(e) => e.status(),
            RelayError::ClientCert(_) => StatusCode::FORBIDDEN,
            RelayError::Broker(e) => match e {
                B::UnknownBackend(_) | B::NoFreePoll(_) | B::Draining => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                B::PollTimeout => StatusCode::REQUEST_TIMEOUT,
                B::UnknownRequest(_) | B::MissingId | B::Refused(_) => StatusCode::BAD_REQUEST,
                B::BadResponse(_) | B::Undelivered => StatusCode::BAD_GATEWAY,
                B::StreamClosed | B::HalfClosed => StatusCode::GONE,
                B::Inactive(_) => StatusCode::GATEWAY_TIMEOUT,
                B::DuplicateId(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// The `result` label of `broker_responses` for this error.
    pub fn metric_result(&self) -> &'static str {
        use crate::telemetry::metrics::result as r;
        match self {
            RelayError::Broker(BrokerError::UnknownBackend(_)) => r::UNKNOWN_CLIENT,
            RelayError::Broker(
                BrokerError::NoFreePoll(_) | BrokerError::Inactive(_) | BrokerError::PollTimeout,
            ) => r::TIMEOUT,
            RelayError::Broker(BrokerError::UnknownRequest(_) | BrokerError::MissingId) => {
                r::MISSING_MESSAGE
            }
            RelayError::BadMessage(_) | RelayError::Broker(BrokerError::Refused(_)) => {
                r::BAD_MESSAGE
            }
            RelayError::Broker(BrokerError::BadResponse(_)) => r::BAD_RESPONSE,
            RelayError::NoBackendName | RelayError::MissingParam(_) => r::MISSING_HEADER,
            RelayError::BadBackendResponse(_)
            | RelayError::UnexpectedUpgrade
            | RelayError::Tunnel(_) => r::BAD_RESPONSE,
            RelayError::Auth(_) | RelayError::ClientCert(_) => r::UNAUTHORIZED,
            _ => r::ERROR,
        }
    }

    /// A plain-text response with the status and the reason in one line.
    pub fn into_response(self) -> Response<Body> {
        let status = self.status();
        let mut resp = Response::new(full(Bytes::from(format!("{self}\n"))));
        *resp.status_mut() = status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if matches!(
            self,
            RelayError::BackendBusy(_)
                | RelayError::BufferFull
                | RelayError::TooManyBackends(_)
                | RelayError::TooManyTunnels(_)
        ) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        if matches!(self, RelayError::Broker(BrokerError::HalfClosed)) {
            resp.headers_mut().insert(
                crate::proto::HALF_CLOSED_HEADER,
                http::HeaderValue::from_static("1"),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_statuses() {
        let s = |e: BrokerError| RelayError::from(e).status().as_u16();
        assert_eq!(s(BrokerError::UnknownBackend("x".into())), 503);
        assert_eq!(s(BrokerError::PollTimeout), 408);
        assert_eq!(s(BrokerError::UnknownRequest("x".into())), 400);
        assert_eq!(s(BrokerError::StreamClosed), 410);
        assert_eq!(
            s(BrokerError::Inactive(std::time::Duration::from_secs(1))),
            504
        );
        assert!(
            RelayError::from(BrokerError::UnknownBackend("x".into()))
                .to_string()
                .contains("unknown client")
        );
    }

    /// Only the user's half-close carries the mark that tells it from a
    /// request that is over (both are 410, as the fleet's server says).
    #[test]
    fn the_half_close_is_marked() {
        let marked = |e: BrokerError| {
            let r = RelayError::from(e).into_response();
            (
                r.status().as_u16(),
                r.headers().contains_key(crate::proto::HALF_CLOSED_HEADER),
            )
        };
        assert_eq!(marked(BrokerError::HalfClosed), (410, true));
        assert_eq!(marked(BrokerError::StreamClosed), (410, false));
    }
}
