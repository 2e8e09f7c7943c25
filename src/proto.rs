//! The v1 wire messages (`PROTOCOL.md`, "Messages") and their conversions
//! to and from `http` types.
//!
//! The structs are written with the prost derive instead of generated, so the
//! build needs no `protoc`. Field numbers and `optional` presence are the
//! contract with the fleet's relay-clients and servers: do not renumber.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

/// Content type of a serialized [`HttpRequest`] answer to a poll.
pub const REQUEST_CONTENT_TYPE: &str =
    "application/vnd.google.protobuf;proto=cloudrobotics.http_relay.v1alpha1.HttpRequest";
/// Content type of a serialized [`HttpResponse`] posted by a relay-client.
pub const RESPONSE_CONTENT_TYPE: &str =
    "application/vnd.google.protobuf;proto=cloudrobotics.http_relay.v1alpha1.HttpResponse";
/// Content type of the user-to-backend bytes of an upgraded connection.
pub const STREAM_CONTENT_TYPE: &str = "application/octet-data";
/// Query parameter (`=1`) of a `/server/requeststream` call by a
/// relay-client that takes 410 as the user-client's half-close: it shuts
/// down the backend's write side and goes on relaying the backend's bytes.
/// Without it the server never answers 410 while the request lasts
/// (`docs/PROTOCOL.md`, "How this implementation meets them"); a server
/// that does not know it ignores it.
pub const HALF_CLOSE_PARAM: &str = "half_close";
/// Header (`1`) of our server's 410 to such a call when the user-client
/// half-closed. A 410 without it (a Go server's, or one from a server that
/// does not know the parameter) means the request is over: the relay-client
/// tells the two apart by this mark, not by a guess at which server it
/// talks to.
pub const HALF_CLOSED_HEADER: &str = "x-relay-half-closed";
/// Header of our server's poll answers (200 and 408 to
/// `/server/request`), with the value [`SERVER_MARK`]. It tells a
/// relay-client that it need not keep its chunks as small as the Go server
/// needs them (`client::V1_SERVER_MAX_CHUNK`); a relay-client on
/// `transport = "v1"` never asks whether the server offers v2.
pub const SERVER_MARK_HEADER: &str = "x-relay-server";
pub const SERVER_MARK: &str = "http-relay";

/// Headers that describe one connection, not the message; never relayed
/// (except `connection`/`upgrade` on a 101, which *is* about the
/// connection being handed over), on either transport. The proxy
/// credentials and challenge are for the proxy next to the user-client
/// (RFC 9110, sections 11.7.1 and 11.7.2), as Go's `ReverseProxy` holds:
/// relayed, a user's proxy password would reach the robot.
pub const HOP_BY_HOP: [HeaderName; 7] = [
    http::header::CONNECTION,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
];

/// Whether `headers` holds one of `names`. One pass over the names a
/// message holds is cheaper than a lookup for each of `names`, and
/// usually none of them is there: on the hot path, the removals are made
/// only when there is something to remove.
pub fn holds_any(headers: &HeaderMap, names: &[HeaderName]) -> bool {
    headers.keys().any(|k| names.contains(k))
}

/// Removes the headers a `Connection` header names (they are about one
/// connection, RFC 9110 section 7.6.1), but `upgrade` when `keep_upgrade`;
/// `Connection` itself stays for the caller. At most [`MAX_HEADERS`]
/// names are taken: a long list of one name repeated would only cost.
pub fn remove_connection_named(headers: &mut HeaderMap, keep_upgrade: bool) {
    if !headers.contains_key(http::header::CONNECTION) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == http::header::UPGRADE))
        .take(MAX_HEADERS)
        .collect();
    for name in named {
        headers.remove(name);
    }
}

/// Removes every header named in `names`, looking each one up only when
/// [`holds_any`] found one.
pub fn remove_all(headers: &mut HeaderMap, names: &[HeaderName]) {
    if holds_any(headers, names) {
        for name in names {
            headers.remove(name);
        }
    }
}

/// One header value; repeated headers travel as one entry per value.
///
/// The .proto declares both fields `string`, but Go peers send whatever
/// bytes a header holds (`PROTOCOL.md`, "What the Go peers actually
/// send"). Decoded as `bytes` (the same wire type), so one odd header
/// cannot make the whole message, and with it the request id, unreadable;
/// [`headers_from_proto`] then validates them as HTTP.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpHeader {
    #[prost(bytes = "bytes", optional, tag = "1")]
    pub name: Option<Bytes>,
    #[prost(bytes = "bytes", optional, tag = "2")]
    pub value: Option<Bytes>,
}

impl HttpHeader {
    /// An entry with the given name and value.
    pub fn new(name: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        Self {
            name: Some(Bytes::copy_from_slice(name.as_ref())),
            value: Some(Bytes::copy_from_slice(value.as_ref())),
        }
    }
}

/// A user-client request handed to a relay-client by a poll.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    /// `"<backend>:<32 hex chars>"`, chosen by the server.
    #[prost(string, optional, tag = "1")]
    pub id: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub method: Option<String>,
    /// `"http://invalid/<path>?<query>"`. Bytes, not a string, for the
    /// reason `PROTOCOL.md` gives for `HttpHeader` ("What the Go peers
    /// actually send"): a Go server copies the user's raw query and
    /// `Host`, which need not be UTF-8, and a strict decoder would reject
    /// the whole message (and lose the request) instead of this one
    /// field. Same wire format as `string`.
    #[prost(bytes = "bytes", optional, tag = "3")]
    pub url: Option<Bytes>,
    #[prost(message, repeated, tag = "4")]
    pub header: Vec<HttpHeader>,
    #[prost(bytes = "bytes", optional, tag = "5")]
    pub body: Option<Bytes>,
    /// The user-client's `Host` header (bytes, as `url`).
    #[prost(bytes = "bytes", optional, tag = "6")]
    pub host: Option<Bytes>,
}

/// One chunk of a backend's answer, posted by a relay-client.
///
/// The first chunk carries `status_code` and `header`; a chunk without
/// `status_code` is a continuation. The last one has `eof` and any trailers.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpResponse {
    #[prost(int32, optional, tag = "1")]
    pub status_code: Option<i32>,
    #[prost(message, repeated, tag = "2")]
    pub header: Vec<HttpHeader>,
    #[prost(bytes = "bytes", optional, tag = "3")]
    pub body: Option<Bytes>,
    #[prost(string, optional, tag = "4")]
    pub id: Option<String>,
    #[prost(bool, optional, tag = "5")]
    pub eof: Option<bool>,
    #[prost(message, repeated, tag = "6")]
    pub trailer: Vec<HttpHeader>,
    #[prost(int64, optional, tag = "7")]
    pub backend_duration_ms: Option<i64>,
    /// Ours, not the fleet's (a Go server skips it): the backend's answer
    /// broke off. v1 has no other way to say so, and an `eof` would make
    /// a cut body look complete to a user-client reading a chunked or
    /// HTTP/2 answer. The request then ends as failed.
    #[prost(bool, optional, tag = "1000")]
    pub aborted: Option<bool>,
}

/// Why a message from the network could not be turned into HTTP.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("malformed protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("malformed protobuf message: a field runs past its end")]
    Truncated,
    #[error("invalid header name \"{0}\"")]
    HeaderName(String),
    #[error("invalid value for header {0:?}")]
    HeaderValue(String),
    #[error("more than {MAX_TRAILERS} trailer entries or {MAX_TRAILER_BYTES} trailer bytes")]
    TooManyTrailers,
    #[error("invalid status code {0}")]
    Status(i32),
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("the backend's answer broke off")]
    Aborted,
    /// Not of a message: carried on a request's answer channel to say
    /// that its poll went away with it (`broker::BrokerError::Undelivered`).
    #[error("the relay-client's poll went away before it could take the request")]
    Undelivered,
    #[error("more than {MAX_HEADERS} header entries")]
    TooManyHeaders,
    #[error("invalid url {0:?}")]
    Url(String),
}

/// A header name in Go's canonical form (`CanonicalMIMEHeaderKey`): the
/// first letter and every letter after `-` upper case, the rest lower case.
///
/// Every v1 peer writes names this way, and the Go server matches some of
/// them case-sensitively: it copies the `grpc-*` headers of a trailers-only
/// reply into trailers only when they start with `Grpc-` (`PROTOCOL.md`,
/// "What the Go peers actually send").
pub fn canonical_name(name: &str) -> String {
    let mut upper = true;
    name.chars()
        .map(|c| {
            let out = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            out
        })
        .collect()
}

/// Turns a header map into wire headers, one entry per value, with names
/// in Go's canonical form ([`canonical_name`]) and values as their bytes.
pub fn headers_to_proto(headers: &HeaderMap) -> Vec<HttpHeader> {
    let mut out = Vec::with_capacity(headers.len());
    let mut last: Option<(&HeaderName, Bytes)> = None;
    for (name, value) in headers {
        // Repeated values share one canonical name.
        let wire = match &last {
            Some((n, w)) if *n == name => w.clone(),
            _ => Bytes::from(canonical_name(name.as_str())),
        };
        last = Some((name, wire.clone()));
        out.push(HttpHeader {
            name: Some(wire),
            value: Some(Bytes::copy_from_slice(value.as_bytes())),
        });
    }
    out
}

/// Most header (or trailer) entries accepted in one message; far above
/// what real responses carry, far below what would strain a `HeaderMap`.
pub const MAX_HEADERS: usize = 1024;

/// Most trailer entries one relayed response may accumulate over all its
/// chunks.
pub const MAX_TRAILERS: usize = MAX_HEADERS;

/// Most trailer bytes (names and values) one relayed response may
/// accumulate over all its chunks.
pub const MAX_TRAILER_BYTES: usize = 256 * 1024;

/// A response chunk refused before it was decoded, and the request it
/// names, if it can be read: that user-client is told at once.
#[derive(Debug)]
pub struct RefusedChunk {
    pub id: Option<String>,
    pub error: ProtoError,
}

/// Decodes one response chunk of a relay-client (`POST /server/response`).
///
/// The entries of `header` and `trailer` are counted on the wire first:
/// decoded, an empty entry (two bytes) becomes a struct of 48, so a chunk
/// of the default size limit made of them alone would take half a GiB
/// before any count could be checked.
pub fn decode_response(buf: Bytes) -> Result<HttpResponse, RefusedChunk> {
    let refused = |id: Option<&[u8]>, error| RefusedChunk {
        id: id.and_then(|id| String::from_utf8(id.to_vec()).ok()),
        error,
    };
    let scan = scan_response(&buf).map_err(|e| refused(None, e))?;
    if scan.headers > MAX_HEADERS {
        return Err(refused(scan.id, ProtoError::TooManyHeaders));
    }
    if scan.trailers > MAX_TRAILERS {
        return Err(refused(scan.id, ProtoError::TooManyTrailers));
    }
    // Well formed at the top, a chunk can still fail inside a field (a
    // header entry of the wrong wire type): its request is named too.
    let id = scan.id.map(<[u8]>::to_vec);
    <HttpResponse as prost::Message>::decode(buf).map_err(|e| refused(id.as_deref(), e.into()))
}

/// What [`decode_response`] reads of a message before decoding it.
struct ResponseScan<'a> {
    headers: usize,
    trailers: usize,
    /// The last `id` field, as a decoder would take it.
    id: Option<&'a [u8]>,
}

/// Reads the top-level fields of an `HttpResponse` by the wire format
/// alone (a message that is not well formed is an error). Groups, which
/// none of our messages has, are refused.
fn scan_response(mut buf: &[u8]) -> Result<ResponseScan<'_>, ProtoError> {
    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first()?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
    let mut scan = ResponseScan {
        headers: 0,
        trailers: 0,
        id: None,
    };
    while !buf.is_empty() {
        let key = varint(&mut buf).ok_or(ProtoError::Truncated)?;
        let skip = match key & 7 {
            0 => varint(&mut buf).map(|_| 0),
            1 => Some(8),
            2 => varint(&mut buf).and_then(|n| usize::try_from(n).ok()),
            5 => Some(4),
            _ => None,
        }
        .ok_or(ProtoError::Truncated)?;
        let field = buf.get(..skip).ok_or(ProtoError::Truncated)?;
        match (key >> 3, key & 7) {
            (2, _) => scan.headers += 1,
            (6, _) => scan.trailers += 1,
            (4, 2) => scan.id = Some(field),
            _ => {}
        }
        buf = &buf[skip..];
    }
    Ok(scan)
}

/// Shows bytes from the network in an error line: printable ASCII as is,
/// anything else escaped, at most 64 bytes.
fn shown(bytes: &[u8]) -> String {
    let mut s: String = bytes
        .iter()
        .take(64)
        .flat_map(|b| b.escape_ascii())
        .map(char::from)
        .collect();
    if bytes.len() > 64 {
        s.push_str("...");
    }
    s
}

/// Turns wire headers into a header map, appending repeated names.
///
/// Names must be HTTP tokens and values HTTP field values (no control
/// characters); anything else is an error naming the header, never a
/// header silently altered or dropped.
pub fn headers_from_proto(headers: &[HttpHeader]) -> Result<HeaderMap, ProtoError> {
    if headers.len() > MAX_HEADERS {
        return Err(ProtoError::TooManyHeaders);
    }
    let mut map = HeaderMap::with_capacity(headers.len());
    for h in headers {
        let name = h.name.as_deref().unwrap_or_default();
        let value = h.value.as_deref().unwrap_or_default();
        let name = HeaderName::from_bytes(name).map_err(|_| ProtoError::HeaderName(shown(name)))?;
        let value = HeaderValue::from_bytes(value)
            .map_err(|_| ProtoError::HeaderValue(name.as_str().to_owned()))?;
        map.try_append(name, value)
            .map_err(|_| ProtoError::TooManyHeaders)?;
    }
    Ok(map)
}

/// Validates a relayed status code (`100..=999` as `http` accepts it).
pub fn status_from_proto(code: i32) -> Result<StatusCode, ProtoError> {
    u16::try_from(code)
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(ProtoError::Status(code))
}

/// The head of a relayed response, from the first chunk.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub headers: HeaderMap,
}

/// A response chunk checked where it enters the server
/// (`/server/response`): status and headers are valid HTTP, so the
/// relay-client learns at once that its post was refused, and the
/// user-client gets a clean error instead of waiting for a timeout.
#[derive(Debug)]
pub struct ResponseChunk {
    /// Present on the first chunk (`status_code` set).
    pub head: Option<ResponseHead>,
    pub body: Bytes,
    /// Trailers carried by this chunk (usually the last ones).
    pub trailers: HeaderMap,
    pub eof: bool,
    pub backend_duration_ms: Option<i64>,
}

impl ResponseChunk {
    /// Validates a decoded message. The `header` of a chunk without
    /// `status_code` is ignored, as v1 peers do.
    pub fn from_message(msg: HttpResponse) -> Result<Self, ProtoError> {
        if msg.aborted == Some(true) {
            return Err(ProtoError::Aborted);
        }
        let head = match msg.status_code {
            Some(code) => {
                let status = status_from_proto(code)?;
                // Only 101 may be relayed as an interim status; any other
                // 1xx would be taken for the final answer.
                if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                    return Err(ProtoError::Status(code));
                }
                Some(ResponseHead {
                    status,
                    headers: headers_from_proto(&msg.header)?,
                })
            }
            None => None,
        };
        let trailers = if msg.trailer.is_empty() {
            HeaderMap::new()
        } else {
            headers_from_proto(&msg.trailer)?
        };
        Ok(Self {
            head,
            body: msg.body.unwrap_or_default(),
            trailers,
            eof: msg.eof == Some(true),
            backend_duration_ms: msg.backend_duration_ms,
        })
    }

    /// Bytes of names and values of this chunk's trailers.
    pub fn trailer_bytes(&self) -> usize {
        self.trailers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum()
    }
}

/// The placeholder authority of relayed URLs (`PROTOCOL.md`, "Messages").
const URL_PREFIX: &str = "http://invalid";

/// Builds the message `url` field from a path and an optional query.
pub fn relay_url(path: &str, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{URL_PREFIX}{path}?{q}"),
        None => format!("{URL_PREFIX}{path}"),
    }
}

/// Extracts `/<path>?<query>` from a message `url`, whatever its authority.
///
/// Only the path and query matter to the relay-client: the backend address
/// comes from its own configuration. The Go server copies the user's raw
/// query into `url`, and Go's HTTP server takes bytes in a query that
/// `http::Uri` refuses (`"`, `<`, `>`, bytes past ASCII), and a `#`,
/// which `http::Uri` would take for the start of a fragment and drop with
/// the rest of the query. Such a URL gets every byte outside RFC 3986's
/// characters, and `#`, percent-encoded, as a browser would have sent
/// them. Any other is passed on byte for byte.
pub fn path_and_query(url: &[u8]) -> Result<http::uri::PathAndQuery, ProtoError> {
    let parsed = std::str::from_utf8(url)
        .ok()
        .filter(|u| !u.contains('#'))
        .and_then(|u| u.parse::<http::Uri>().ok());
    let uri = match parsed {
        Some(uri) => uri,
        None => escape_url(url)
            .parse::<http::Uri>()
            .map_err(|_| ProtoError::Url(String::from_utf8_lossy(url).into_owned()))?,
    };
    match uri.path_and_query() {
        Some(pq) => Ok(pq.clone()),
        None => Ok(http::uri::PathAndQuery::from_static("/")),
    }
}

/// `url` with every byte percent-encoded that is not unreserved, a
/// delimiter of RFC 3986 (but `#`) or `%`.
fn escape_url(url: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(url.len() + 16);
    for &b in url {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?[]%".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Whether `name` may name a backend: 1 to 63 of `A-Z a-z 0-9 . _ -`.
/// Names come off the network (paths, headers, query parameters) and each
/// known one costs memory and metric series, so anything else is refused.
pub fn valid_backend_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The v2 transport (`docs/transport-v2.md`): one upgraded connection per
/// relay-client, on which the server is the HTTP/2 client and the
/// relay-client the HTTP/2 server in front of its backend.
pub mod v2 {
    use std::time::Duration;

    /// Path of the upgrade request, next to the v1 endpoints.
    pub const CONNECT_PATH: &str = "/server/connect";
    /// The `Upgrade` token of the opening request.
    pub const UPGRADE_TOKEN: &str = "http-relay-v2";
    /// The relayed request's id (logs; the same id space as v1).
    pub const REQUEST_ID: &str = "x-relay-request-id";
    /// On a relayed upgrade: the user's `Upgrade` token (request) and
    /// the backend's status, 101 (response). The stream's two bodies are
    /// then the two directions of the upgraded connection.
    pub const UPGRADE: &str = "x-relay-upgrade";
    pub const STATUS: &str = "x-relay-status";

    /// HTTP/2 settings of the tunnel, the same on both ends: fixed
    /// windows (the stream window bounds memory per request, the
    /// connection window is far larger so one unread stream cannot pin
    /// the others), large frames and a header list as large as v1 allows.
    pub const STREAM_WINDOW: u32 = 2 << 20;
    pub const CONNECTION_WINDOW: u32 = 32 << 20;
    pub const MAX_FRAME: u32 = 64 << 10;
    pub const MAX_HEADER_LIST: u32 = 1 << 20;
    /// What one stream's sender may queue beyond the peer's window: one
    /// read of the body it relays, with room to spare.
    pub const SEND_BUFFER: usize = 1 << 20;
    /// Server-side ping of a tunnel (the relay-client pings on its own
    /// `relay_ping_interval`).
    pub const PING_INTERVAL: Duration = Duration::from_secs(10);
    pub const PING_TIMEOUT: Duration = Duration::from_secs(10);
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    /// Entries are counted on the wire, whatever the other fields, and the
    /// decoded message is the one prost makes.
    #[test]
    fn response_entries_are_counted_before_decoding() {
        let entry = |n: usize| {
            (0..n)
                .map(|i| HttpHeader {
                    name: Some(format!("x-{i}").into_bytes().into()),
                    value: Some(Bytes::from_static(b"v")),
                })
                .collect::<Vec<_>>()
        };
        let msg = HttpResponse {
            id: Some("a:1".into()),
            status_code: Some(200),
            header: entry(MAX_HEADERS),
            body: Some(Bytes::from_static(b"body")),
            eof: Some(true),
            trailer: entry(MAX_TRAILERS),
            backend_duration_ms: Some(-1),
            aborted: None,
        };
        let wire = Bytes::from(msg.encode_to_vec());
        assert_eq!(decode_response(wire).unwrap(), msg);
        // The abort mark: a chunk that ends its request as failed.
        let cut = HttpResponse {
            aborted: Some(true),
            ..msg.clone()
        };
        let cut = decode_response(Bytes::from(cut.encode_to_vec())).unwrap();
        assert!(matches!(
            ResponseChunk::from_message(cut),
            Err(ProtoError::Aborted)
        ));
        let refused = |wire: Bytes| decode_response(wire).unwrap_err();

        let over = |header, trailer| HttpResponse {
            header: entry(header),
            trailer: entry(trailer),
            ..msg.clone()
        };
        // Refused with the id, so that its user-client is told.
        let r = refused(Bytes::from(over(MAX_HEADERS + 1, 0).encode_to_vec()));
        assert!(matches!(r.error, ProtoError::TooManyHeaders), "{r:?}");
        assert_eq!(r.id.as_deref(), Some("a:1"));
        let r = refused(Bytes::from(over(0, MAX_TRAILERS + 1).encode_to_vec()));
        assert!(matches!(r.error, ProtoError::TooManyTrailers), "{r:?}");
        // Empty entries, two bytes each: refused however small.
        let r = refused([0x12, 0x00].repeat(MAX_HEADERS + 1).into());
        assert!(matches!(r.error, ProtoError::TooManyHeaders), "{r:?}");
        assert_eq!(r.id, None);
        // Id "a:1" (field 4), then a header entry (field 2) whose key
        // (field 1, a string) comes as a varint: refused when decoded,
        // still with its id.
        let r = refused(Bytes::from_static(&[
            0x22, 0x03, b'a', b':', b'1', 0x12, 0x02, 0x08, 0x01,
        ]));
        assert!(matches!(r.error, ProtoError::Decode(_)), "{r:?}");
        assert_eq!(r.id.as_deref(), Some("a:1"));
    }

    #[test]
    fn a_response_that_runs_past_its_end_is_refused() {
        let wire = HttpResponse {
            id: Some("a:1".into()),
            body: Some(Bytes::from_static(b"body")),
            ..Default::default()
        }
        .encode_to_vec();
        // Cut anywhere but between the two fields (body, then id: six
        // bytes each).
        assert_eq!(wire.len(), 11);
        for cut in (1..wire.len()).filter(|&c| c != 6) {
            let partial = Bytes::copy_from_slice(&wire[..cut]);
            assert!(decode_response(partial).is_err(), "cut at {cut}");
        }
        // A group (wire type 3), an unterminated varint, a length past the
        // end.
        for bad in [&[0x1b, 0x1c][..], &[0x08, 0x80], &[0x1a, 0x05, b'x']] {
            assert!(
                decode_response(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn continuation_chunk_has_no_status() {
        let chunk = HttpResponse {
            id: Some("a:1".into()),
            body: Some(Bytes::from_static(b"x")),
            ..Default::default()
        };
        let decoded = HttpResponse::decode(chunk.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded.status_code, None);
        assert_eq!(decoded.eof, None);
        assert_eq!(decoded.body.as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn field_numbers_match_the_contract() {
        // HttpRequest{id="i"}: tag 1, wire type 2 -> 0x0a.
        let req = HttpRequest {
            id: Some("i".into()),
            host: Some("h".into()),
            ..Default::default()
        };
        assert_eq!(req.encode_to_vec(), vec![0x0a, 1, b'i', 0x32, 1, b'h']);
        // HttpResponse{status_code=200, eof=true}: tag 1 varint, tag 5 varint.
        let resp = HttpResponse {
            status_code: Some(200),
            eof: Some(true),
            ..Default::default()
        };
        assert_eq!(resp.encode_to_vec(), vec![0x08, 0xc8, 0x01, 0x28, 0x01]);
    }

    #[test]
    fn repeated_headers_round_trip() {
        let mut map = HeaderMap::new();
        map.append("set-cookie", HeaderValue::from_static("a=1"));
        map.append("set-cookie", HeaderValue::from_static("b=2"));
        let wire = headers_to_proto(&map);
        assert_eq!(wire.len(), 2);
        let back = headers_from_proto(&wire).unwrap();
        let values: Vec<_> = back.get_all("set-cookie").iter().collect();
        assert_eq!(values, ["a=1", "b=2"]);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        assert!(HttpResponse::decode(&b"\xff\xff\xff"[..]).is_err());
        let bad_name = [HttpHeader::new("bad name", "v")];
        assert!(matches!(
            headers_from_proto(&bad_name),
            Err(ProtoError::HeaderName(_))
        ));
        let bad_value = [HttpHeader::new("x", "a\nb")];
        assert!(matches!(
            headers_from_proto(&bad_value),
            Err(ProtoError::HeaderValue(_))
        ));
        let many = vec![HttpHeader::new("x", "v"); MAX_HEADERS + 1];
        assert!(matches!(
            headers_from_proto(&many),
            Err(ProtoError::TooManyHeaders)
        ));
        assert!(status_from_proto(-1).is_err());
        assert!(status_from_proto(99).is_err());
        assert!(status_from_proto(70000).is_err());
        assert_eq!(status_from_proto(418).unwrap(), StatusCode::IM_A_TEAPOT);
    }

    #[test]
    fn names_are_written_in_go_canonical_form() {
        assert_eq!(canonical_name("grpc-status"), "Grpc-Status");
        assert_eq!(canonical_name("content-type"), "Content-Type");
        assert_eq!(canonical_name("x-server-name"), "X-Server-Name");
        assert_eq!(canonical_name("www-authenticate"), "Www-Authenticate");
        assert_eq!(canonical_name("te"), "Te");
        assert_eq!(canonical_name("x--a"), "X--A");
        let mut map = HeaderMap::new();
        map.append("grpc-status", HeaderValue::from_static("7"));
        map.append("set-cookie", HeaderValue::from_static("a=1"));
        map.append("set-cookie", HeaderValue::from_static("b=2"));
        let names: Vec<_> = headers_to_proto(&map)
            .into_iter()
            .map(|h| h.name.unwrap())
            .collect();
        assert_eq!(names, ["Grpc-Status", "Set-Cookie", "Set-Cookie"]);
    }

    #[test]
    fn header_bytes_that_are_not_utf8_decode_and_are_validated() {
        // HttpResponse{id="a:1", header=[{name=b"x-\xff", value=b"v"}]}, as a
        // Go peer may send it.
        let mut wire = vec![0x22, 3, b'a', b':', b'1'];
        let header = [0x0a, 3, b'x', b'-', 0xff, 0x12, 1, b'v'];
        wire.push(0x12);
        wire.push(header.len() as u8);
        wire.extend_from_slice(&header);
        let decoded = HttpResponse::decode(wire.as_slice()).unwrap();
        assert_eq!(decoded.id.as_deref(), Some("a:1"));
        let err = headers_from_proto(&decoded.header).unwrap_err();
        assert_eq!(err.to_string(), "invalid header name \"x-\\xff\"");
        // obs-text in a value is valid HTTP and passes as its bytes.
        let map = headers_from_proto(&[HttpHeader::new("x-v", b"caf\xe9")]).unwrap();
        assert_eq!(map["x-v"].as_bytes(), b"caf\xe9");
        assert!(headers_from_proto(&[HttpHeader::new("x-v", b"a\0b")]).is_err());
    }

    #[test]
    fn urls_keep_path_and_query() {
        let url = relay_url("/a/b", Some("q=1&r=%20"));
        assert_eq!(url, "http://invalid/a/b?q=1&r=%20");
        assert_eq!(
            path_and_query(url.as_bytes()).unwrap().as_str(),
            "/a/b?q=1&r=%20"
        );
        assert_eq!(path_and_query(b"http://invalid").unwrap().as_str(), "/");
        // What a Go server copies from a user's raw query.
        let raw = b"http://invalid/api?query=up{job=\"x\"}&s=<a>&n=\xc3\xa9\xff";
        assert_eq!(
            path_and_query(raw).unwrap().as_str(),
            "/api?query=up%7Bjob=%22x%22%7D&s=%3Ca%3E&n=%C3%A9%FF"
        );
        // A `#` in the query (Go keeps it there) is no fragment.
        assert_eq!(
            path_and_query(b"http://invalid/a?b=1#2&c=3")
                .unwrap()
                .as_str(),
            "/a?b=1%232&c=3"
        );
        // Parsable ones are not touched.
        assert_eq!(
            path_and_query(b"http://invalid/a?b={c}|d")
                .unwrap()
                .as_str(),
            "/a?b={c}|d"
        );
    }
}
