//! The parts of an upgraded connection's byte pipe that both transports
//! share: reading the user's side into a bounded channel, and ending the
//! two directions together.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::mpsc;

use crate::clock::Progress;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::Direction;

/// Reads the user's side into `to_backend`, each read sent at once, until
/// the user half-closes (`true`) or the read or the channel fails
/// (`false`). Dropping the sender tells the relay-client the direction is
/// over. `on_read` sees each read's size (chunk spans).
pub async fn user_to_backend<R: AsyncRead + Unpin>(
    mut rd: R,
    to_backend: mpsc::Sender<Bytes>,
    metrics: Arc<Metrics>,
    progress: Progress,
    mut on_read: impl FnMut(usize),
) -> bool {
    let mut buf = BytesMut::new();
    loop {
        crate::readbuf::spare(&mut buf);
        match rd.read_buf(&mut buf).await {
            Ok(0) => return true,
            Err(_) => return false,
            Ok(n) => {
                progress.moved();
                metrics.bytes(Direction::ToBackend, n);
                on_read(n);
                if to_backend.send(buf.split().freeze()).await.is_err() {
                    return false;
                }
            }
        }
    }
}

/// The time bounds of one pipe.
#[derive(Clone, Copy, Debug)]
pub struct Times {
    /// How long the backend may go without moving a byte after the user's
    /// half-close.
    pub idle: Duration,
    /// `timeouts.idle_stream`.
    pub stalled: Duration,
}

/// Runs both directions, each ending with `true` when its sender closed
/// it cleanly (a half-close), `false` on a failure.
///
/// After the user's half-close the backend may still talk, while its
/// bytes move: until `idle` passes without one. The backend's end ends
/// the pipe, as nginx ends an upgraded connection whose upstream closed:
/// a backend's close is seldom a half-close, and a user-client that does
/// not close in turn would hold the stream. After a failure on either
/// side nobody is listening: end now. Whatever the state, nothing moving
/// for `stalled` (`timeouts.idle_stream`: the user neither sends nor
/// reads) ends both.
///
/// Returns whether both directions ended cleanly.
pub async fn both_ways(
    downstream: impl Future<Output = bool>,
    upstream: impl Future<Output = bool>,
    times: Times,
    progress: &Progress,
) -> bool {
    let Times { idle, stalled } = times;
    tokio::pin!(downstream, upstream);
    let run = async {
        tokio::select! {
            // The user's side may be mid-way: no clean end of both.
            _ = &mut downstream => false,
            clean = &mut upstream => {
                if !clean {
                    return false;
                }
                tokio::select! {
                    clean = &mut downstream => clean,
                    () = progress.stalled(idle) => false,
                }
            }
        }
    };
    tokio::select! {
        clean = run => clean,
        () = progress.stalled(stalled) => {
            tracing::debug!(after = ?stalled, "upgraded connection closed: nothing moved");
            false
        }
    }
}
