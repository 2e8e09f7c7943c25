//! Read buffers of the byte pipes of upgraded connections (WebSocket,
//! exec), on the server and on the relay-client alike.

use bytes::BytesMut;

/// Read size of one direction of an upgraded connection.
pub const PIPE_READ: usize = 64 * 1024;

/// Below this much room, the next read gets a fresh [`PIPE_READ`].
const MIN_SPARE: usize = 4096;

/// Makes room for the next read in `buf`. Reads are split off the same
/// allocation until it is full, so queued small reads (a keystroke each)
/// share one buffer instead of pinning a whole [`PIPE_READ`] apiece; the
/// allocation is reused once every read split off it has been sent.
pub fn spare(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < MIN_SPARE {
        buf.reserve(PIPE_READ);
    }
}
