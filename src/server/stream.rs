//! One user request as an HTTP/2 stream on a tunnel (`docs/transport-v2.md`,
//! "Flow control" and "Cancellation"): its request body sent under the
//! stream's flow control, its response body read with the window given
//! back only as the user-client takes the bytes.
//!
//! The server drives the `h2` client directly instead of through hyper's
//! client connection: hyper's adds a dispatch task and channel between
//! the handler and the connection, paid on every request and, in memory,
//! by every idle tunnel.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tokio::sync::oneshot;

use super::body::Body;

/// Sends `body` on `tx` as the user-client delivers it, never more than
/// the stream's window ahead of the relay-client. A body that fails (the
/// user went away, the limit was passed) resets the stream, and so does
/// `abandoned` when its sender is dropped: the response side is gone,
/// nobody waits for the exchange. Without it (an upgraded connection) the
/// body's end is the stream's end. `awaiting_user` is set while the next
/// frame is awaited from the user-client, not while the relay-client's
/// window is: a stall then is the user's.
pub async fn send_body(
    mut body: Body,
    mut tx: SendStream<Bytes>,
    abandoned: Option<oneshot::Receiver<Infallible>>,
    awaiting_user: Arc<AtomicBool>,
) {
    let pump = async {
        loop {
            // Room for at least one byte before a frame is taken from the
            // user: the frame then waits in h2's send buffer, not here.
            tx.reserve_capacity(1);
            while tx.capacity() == 0 {
                match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
                    Some(Ok(_)) => {}
                    // The stream is closed or reset: nothing more to send.
                    Some(Err(_)) | None => return Err(None),
                }
            }
            awaiting_user.store(true, Ordering::Relaxed);
            let frame = tokio::select! {
                frame = body.frame() => frame,
                reason = std::future::poll_fn(|cx| tx.poll_reset(cx)) => {
                    tracing::debug!(?reason, "tunnel stream reset by the relay-client");
                    return Err(None);
                }
            };
            awaiting_user.store(false, Ordering::Relaxed);
            match frame {
                None => return tx.send_data(Bytes::new(), true).map_err(|_| None),
                Some(Err(e)) => return Err(Some(e)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = body.is_end_stream();
                        tx.send_data(data, end).map_err(|_| None)?;
                        if end {
                            return Ok(());
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            return tx.send_trailers(trailers).map_err(|_| None);
                        }
                    }
                },
            }
        }
    };
    // Never sent on: the sender's drop is the signal.
    let abandoned = async move {
        match abandoned {
            Some(rx) => {
                let _ = rx.await;
            }
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        outcome = pump => outcome,
        () = abandoned => Err(None),
    };
    if let Err(error) = outcome {
        if let Some(e) = error {
            tracing::debug!(error = %e, "user request body failed; tunnel stream reset");
        }
        tx.send_reset(Reason::CANCEL);
    }
}

/// The response body of a tunnel stream, as the user side reads it.
///
/// A reader that stops taking bytes holds the stream's window, and with
/// it part of the tunnel's connection window, shared by every stream of
/// the relay-client: sixteen such readers would stop all of them. So a
/// body that has bytes waiting for its reader (received, not yet taken)
/// and has not been read for `reader_limit` is cut off: its stream is
/// dropped, which resets it and gives the window of those bytes back to
/// the connection. A reader that waits for bytes the backend has not sent
/// yet is not stalled.
///
/// Only HTTP/2 user-clients (and upgraded connections) are watched here:
/// an HTTP/1 user's connection has a watchdog of its own, which closes a
/// connection that takes no bytes at all (`conn::Expired::Stalled`).
#[derive(Debug)]
pub struct RecvBody {
    watch: Arc<ReaderWatch>,
    data_done: bool,
    /// Dropped with the body: its watchdog ends at once.
    _watched: Option<oneshot::Sender<Infallible>>,
    /// Dropped with the body: a request body still being sent is reset
    /// (see [`send_body`]), the exchange is over.
    _exchange: Option<oneshot::Sender<Infallible>>,
}

/// What the watchdog of a [`RecvBody`] looks at.
#[derive(Debug)]
struct ReaderWatch {
    /// `None` once the watchdog cut the body off.
    stream: Mutex<Option<RecvStream>>,
    start: tokio::time::Instant,
    /// When the body was last read (milliseconds from `start`).
    read: AtomicU64,
}

impl RecvBody {
    pub fn new(
        stream: RecvStream,
        exchange: Option<oneshot::Sender<Infallible>>,
        reader_limit: Option<Duration>,
    ) -> Self {
        let watch = Arc::new(ReaderWatch {
            stream: Mutex::new(Some(stream)),
            start: tokio::time::Instant::now(),
            read: AtomicU64::new(0),
        });
        let watched = reader_limit.map(|limit| {
            let (watched, closed) = oneshot::channel();
            tokio::spawn(watch_reader(Arc::downgrade(&watch), limit, closed));
            watched
        });
        Self {
            watch,
            data_done: false,
            _watched: watched,
            _exchange: exchange,
        }
    }

    fn poll_stream(
        data_done: &mut bool,
        cx: &mut Context<'_>,
        stream: &mut RecvStream,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !*data_done {
            match ready!(stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The window reopens as the user takes the bytes: a
                    // slow reader slows the backend, nothing piles up here.
                    let _ = stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => *data_done = true,
            }
        }
        match ready!(stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }
}

/// Cuts the body of `watch` off once bytes have waited for its reader and
/// it has not been read for `limit`; ends with the body (`closed`).
async fn watch_reader(
    watch: Weak<ReaderWatch>,
    limit: Duration,
    mut closed: oneshot::Receiver<Infallible>,
) {
    let period = (limit / 4).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            _ = &mut closed => return,
        }
        let Some(watch) = watch.upgrade() else {
            return;
        };
        let read = watch.read.load(Ordering::Relaxed);
        let unread = crate::clock::millis_since(watch.start).saturating_sub(read);
        if Duration::from_millis(unread) < limit {
            continue;
        }
        let mut stream = crate::lock(&watch.stream);
        let waiting = stream
            .as_mut()
            .is_some_and(|s| s.flow_control().used_capacity() > 0);
        if waiting {
            drop(stream.take());
            tracing::debug!(?limit, "user-client took no bytes; tunnel stream reset");
            return;
        }
    }
}

impl HttpBody for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let Self {
            watch, data_done, ..
        } = &mut *self;
        let now = crate::clock::millis_since(watch.start);
        watch.read.store(now, Ordering::Relaxed);
        let mut stream = crate::lock(&watch.stream);
        match stream.as_mut() {
            Some(stream) => Self::poll_stream(data_done, cx, stream),
            None => Poll::Ready(Some(Err(h2::Error::from(Reason::CANCEL)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        crate::lock(&self.watch.stream)
            .as_ref()
            .is_some_and(RecvStream::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
