//! Response bodies: small fixed ones, and the streamed body of a relayed
//! response that owns its request's [`Exchange`].

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Limited};
use tokio::time::Sleep;

use std::sync::Arc;

use crate::broker::Exchange;
use crate::error::RelayError;
use crate::proto::{ProtoError, ResponseChunk};
use crate::telemetry::Metrics;
use crate::telemetry::metrics::Direction;

/// Boxed error of response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body type of every server response.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body with the given bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// `body`, holding `guard` until the body is done with (sent or dropped).
/// Length and end are passed through, so a `Content-Length` stays.
pub fn holding<G: Send + Sync + Unpin + 'static>(body: Body, guard: G) -> Body {
    Holding {
        body,
        _guard: guard,
    }
    .boxed()
}

struct Holding<G> {
    body: Body,
    _guard: G,
}

impl<G: Unpin> http_body::Body for Holding<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An empty body.
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// Reads a whole request body of at most `limit` bytes (413 above it).
pub async fn read_limited<B>(body: B, limit: u64) -> Result<Bytes, RelayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                RelayError::BodyTooLarge(limit)
            } else {
                RelayError::ReadBody(e.to_string())
            }
        })
}

/// Why a relayed body ended early.
#[derive(Debug, thiserror::Error)]
pub enum RelayBodyError {
    #[error("no data from backend for {0:?}")]
    Inactive(Duration),
    #[error("relay request aborted before the backend finished")]
    Aborted,
    #[error("invalid response from backend: {0}")]
    Invalid(ProtoError),
}

/// The body of a relayed response: the data of the relay-client's chunks,
/// then their trailers (`PROTOCOL.md`: trailers arrive on the last chunks).
///
/// It owns the [`Exchange`], so hyper dropping the body when the
/// user-client goes away frees the request at once.
pub struct RelayBody {
    exchange: Exchange,
    metrics: Arc<Metrics>,
    /// Body bytes sent so far (`relay.bytes_out`).
    sent: usize,
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
    done: bool,
    idle: Pin<Box<Sleep>>,
    /// When the request came, while the backend's time is still to be
    /// recorded from the last chunk (a Go relay-client's way).
    backend_time: Option<std::time::Instant>,
}

impl RelayBody {
    /// Starts with what the first chunk carried: body, trailers (including
    /// the `grpc-*` headers of a trailers-only reply) and maybe `eof`.
    pub fn new(
        exchange: Exchange,
        first: ResponseChunk,
        trailers: HeaderMap,
        metrics: Arc<Metrics>,
        backend_time: Option<std::time::Instant>,
    ) -> Result<Self, ProtoError> {
        let idle = Box::pin(tokio::time::sleep(exchange.inactive_timeout()));
        let mut body = Self {
            exchange,
            metrics,
            sent: 0,
            data: None,
            trailers: (!trailers.is_empty()).then_some(trailers),
            done: false,
            idle,
            backend_time,
        };
        body.absorb(first)?;
        Ok(body)
    }

    fn absorb(&mut self, chunk: ResponseChunk) -> Result<(), ProtoError> {
        if !chunk.trailers.is_empty() {
            let t = self.trailers.get_or_insert_with(HeaderMap::new);
            // A later chunk's trailer replaces an earlier one of the same
            // name (e.g. `grpc-status` copied from a trailers-only header);
            // repeated values within one chunk are all kept. The broker
            // caps the total; `try_append` keeps even a miscount from
            // panicking.
            for name in chunk.trailers.keys() {
                t.remove(name);
            }
            for (name, value) in &chunk.trailers {
                t.try_append(name.clone(), value.clone())
                    .map_err(|_| ProtoError::TooManyTrailers)?;
            }
        }
        if chunk.eof {
            self.done = true;
            if let (Some(ms), Some(started)) = (chunk.backend_duration_ms, self.backend_time.take())
            {
                let total = started.elapsed().as_secs_f64();
                self.metrics
                    .backend_time(self.exchange.backend(), total, ms);
            }
        }
        if !chunk.body.is_empty() {
            self.data = Some(chunk.body);
        }
        Ok(())
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        self.exchange
            .span()
            .record("relay.bytes_out", crate::telemetry::int(self.sent));
    }
}

impl http_body::Body for RelayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(data) = this.data.take() {
                this.sent += data.len();
                this.metrics.bytes(Direction::ToUser, data.len());
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match this.exchange.poll_chunk(cx) {
                Poll::Ready(Some(delivery)) => {
                    let deadline = crate::clock::from_now(this.exchange.inactive_timeout());
                    this.idle.as_mut().reset(deadline);
                    if let Err(e) = delivery.and_then(|chunk| this.absorb(chunk)) {
                        // Aborts the user's stream (HTTP/2 reset, HTTP/1.1
                        // connection closed): a short body is never
                        // presented as complete.
                        this.done = true;
                        this.trailers = None;
                        return Poll::Ready(Some(Err(RelayBodyError::Invalid(e).into())));
                    }
                }
                Poll::Ready(None) => {
                    this.done = true;
                    this.trailers = None;
                    return Poll::Ready(Some(Err(RelayBodyError::Aborted.into())));
                }
                Poll::Pending => {
                    ready!(this.idle.as_mut().poll(cx));
                    this.done = true;
                    this.trailers = None;
                    let timeout = this.exchange.inactive_timeout();
                    return Poll::Ready(Some(Err(RelayBodyError::Inactive(timeout).into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
