//! Raw HTTP/2 frames, for tests that send what a well-behaved client
//! library never would: more streams than allowed, header floods.
//! Header blocks use HPACK literals only (no table, no Huffman).

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};

/// Opens a prior-knowledge HTTP/2 connection to `addr`: connected, the
/// preface and an empty SETTINGS sent, split into its two halves.
pub async fn connect(
    addr: std::net::SocketAddr,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    tokio::net::tcp::OwnedWriteHalf,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (rd, mut wr) = tcp.into_split();
    wr.write_all(&client_start()).await.unwrap();
    (rd, wr)
}

/// A HEADERS frame that is a whole request without a body: `block` on
/// `stream`, with END_HEADERS and END_STREAM.
pub fn request(stream: u32, block: &[u8]) -> Vec<u8> {
    frame(HEADERS, END_STREAM | END_HEADERS, stream, block)
}

/// The client connection preface.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// SETTINGS_MAX_CONCURRENT_STREAMS.
pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;

pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame as read off the wire.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// The bytes of one frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap();
    assert!(len < 1 << 24, "frame payload too long");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The preface and an empty SETTINGS frame.
pub fn client_start() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes(bytes.try_into().unwrap()))
    }

    /// The entries of a SETTINGS frame.
    pub fn settings(&self) -> Vec<(u16, u32)> {
        self.payload
            .chunks_exact(6)
            .map(|e| {
                (
                    u16::from_be_bytes([e[0], e[1]]),
                    u32::from_be_bytes([e[2], e[3], e[4], e[5]]),
                )
            })
            .collect()
    }
}

/// Reads one frame; an error at EOF.
pub async fn read_frame(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Frame> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

/// An HPACK integer with a `bits`-bit prefix; `first` holds the bits
/// above the prefix.
fn integer(out: &mut Vec<u8>, bits: u32, first: u8, value: usize) {
    let max = (1usize << bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    integer(out, 7, 0, s.len());
    out.extend_from_slice(s);
}

/// A header field as a literal without indexing, with a new name.
pub fn literal(name: &str, value: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    string(&mut out, name.as_bytes());
    string(&mut out, value);
    out
}

/// A literal without indexing whose name is static table entry `index`.
fn literal_indexed_name(index: usize, value: &str) -> Vec<u8> {
    let mut out = Vec::new();
    integer(&mut out, 4, 0, index);
    string(&mut out, value.as_bytes());
    out
}

/// The header block of `POST http://<authority><path>`, with no other
/// header (no `content-length`).
pub fn post(path: &str, authority: &str) -> Vec<u8> {
    // Static table: 3 = `:method POST`.
    let mut out = vec![0x83, 0x86];
    out.extend(literal_indexed_name(4, path));
    out.extend(literal_indexed_name(1, authority));
    out
}

/// The header block of `GET http://<authority><path>`.
pub fn get(path: &str, authority: &str) -> Vec<u8> {
    // Static table: 2 = `:method GET`, 6 = `:scheme http`, 4 = `:path`,
    // 1 = `:authority`.
    let mut out = vec![0x82, 0x86];
    out.extend(literal_indexed_name(4, path));
    out.extend(literal_indexed_name(1, authority));
    out
}
