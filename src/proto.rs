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

/// One header value; repeated headers travel as one entry per value.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpHeader {
    #[prost(string, optional, tag = "1")]
    pub name: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// A user-client request handed to a relay-client by a poll.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpRequest {
    /// `"<backend>:<32 hex chars>"`, chosen by the server.
    #[prost(string, optional, tag = "1")]
    pub id: Option<String>,
    #[prost(string, optional, tag = "2")]
    pub method: Option<String>,
    /// `"http://invalid/<path>?<query>"`.
    #[prost(string, optional, tag = "3")]
    pub url: Option<String>,
    #[prost(message, repeated, tag = "4")]
    pub header: Vec<HttpHeader>,
    #[prost(bytes = "bytes", optional, tag = "5")]
    pub body: Option<Bytes>,
    /// The user-client's `Host` header.
    #[prost(string, optional, tag = "6")]
    pub host: Option<String>,
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
}

/// Why a message from the network could not be turned into HTTP.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("malformed protobuf message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("invalid header name {0:?}")]
    HeaderName(String),
    #[error("invalid value for header {0:?}")]
    HeaderValue(String),
    #[error("invalid status code {0}")]
    Status(i32),
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("more than {MAX_HEADERS} header entries")]
    TooManyHeaders,
    #[error("invalid url {0:?}")]
    Url(String),
}

/// Turns a header map into wire headers, one entry per value.
///
/// Values that are not valid UTF-8 cannot be carried in a proto `string`;
/// they are passed as lossy UTF-8 rather than dropped silently.
pub fn headers_to_proto(headers: &HeaderMap) -> Vec<HttpHeader> {
    headers
        .iter()
        .map(|(name, value)| HttpHeader {
            name: Some(name.as_str().to_owned()),
            value: Some(String::from_utf8_lossy(value.as_bytes()).into_owned()),
        })
        .collect()
}

/// Most header (or trailer) entries accepted in one message; far above
/// what real responses carry, far below what would strain a `HeaderMap`.
pub const MAX_HEADERS: usize = 1024;

/// Turns wire headers into a header map, appending repeated names.
pub fn headers_from_proto(headers: &[HttpHeader]) -> Result<HeaderMap, ProtoError> {
    if headers.len() > MAX_HEADERS {
        return Err(ProtoError::TooManyHeaders);
    }
    let mut map = HeaderMap::with_capacity(headers.len());
    for h in headers {
        let name = h.name.as_deref().unwrap_or_default();
        let value = h.value.as_deref().unwrap_or_default();
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| ProtoError::HeaderName(name.to_owned()))?;
        let value = HeaderValue::from_str(value)
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
/// comes from its own configuration.
pub fn path_and_query(url: &str) -> Result<http::uri::PathAndQuery, ProtoError> {
    let uri: http::Uri = url.parse().map_err(|_| ProtoError::Url(url.to_owned()))?;
    match uri.path_and_query() {
        Some(pq) => Ok(pq.clone()),
        None => Ok(http::uri::PathAndQuery::from_static("/")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

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
        let bad_name = [HttpHeader {
            name: Some("bad name".into()),
            value: Some("v".into()),
        }];
        assert!(matches!(
            headers_from_proto(&bad_name),
            Err(ProtoError::HeaderName(_))
        ));
        let bad_value = [HttpHeader {
            name: Some("x".into()),
            value: Some("a\nb".into()),
        }];
        assert!(matches!(
            headers_from_proto(&bad_value),
            Err(ProtoError::HeaderValue(_))
        ));
        let many = vec![
            HttpHeader {
                name: Some("x".into()),
                value: Some("v".into()),
            };
            MAX_HEADERS + 1
        ];
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
    fn urls_keep_path_and_query() {
        let url = relay_url("/a/b", Some("q=1&r=%20"));
        assert_eq!(url, "http://invalid/a/b?q=1&r=%20");
        assert_eq!(path_and_query(&url).unwrap().as_str(), "/a/b?q=1&r=%20");
        assert_eq!(path_and_query("http://invalid").unwrap().as_str(), "/");
    }
}
