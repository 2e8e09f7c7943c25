//! Cross-site requests carrying a cookie token.
//!
//! A browser attaches cookies to requests that other sites make it send:
//! a form post, a `fetch` with credentials, a WebSocket (`SameSite=None`
//! cookies always; browsers differ on cookies without `SameSite`). A token
//! read from a cookie therefore proves who the user is, not that the user
//! meant the request: a page elsewhere could post to a robot's API, or
//! open an `exec` WebSocket to it, in the user's name. Such requests must
//! come from the relay's own origin or from one in `auth.cookie_origins`,
//! as the browser tells in `Sec-Fetch-Site` (every current browser) or,
//! older ones, in `Origin`. Tokens in headers need no check: no other
//! site can make a browser send them.
//!
//! The rules are those of Go's `net/http.CrossOriginProtection` (safe
//! methods pass: another site can make a browser send a GET, but cannot
//! read the answer without the backend's CORS consent), with two
//! additions: a WebSocket handshake is a GET that does act, and is
//! checked like a post; and `<object>`/`<embed>` loads from other sites
//! are refused, as the Fetch Metadata resource isolation policy does.

use http::{HeaderMap, Method};

use super::AuthError;

/// Refuses a request whose cookie token a browser sent on another site's
/// behalf. `host` is the request's authority (`Host`, or `:authority` on
/// HTTP/2); `trusted` are the configured origins, normalised by
/// [`parse_origin`].
pub fn check(
    method: &Method,
    headers: &HeaderMap,
    host: Option<&str>,
    trusted: &[String],
) -> Result<(), AuthError> {
    let origin = headers.get(http::header::ORIGIN).map(|v| v.as_bytes());
    let site = headers.get("sec-fetch-site").map(|v| v.as_bytes());
    let same_origin = match site {
        Some(site) => site == b"same-origin" || site == b"none",
        // Browsers before Fetch Metadata send `Origin` with every
        // cross-origin request but a GET navigation or subresource, and
        // with every WebSocket.
        None => origin.is_none_or(|o| same_host(o, host)),
    };
    if same_origin || origin.is_some_and(|o| trusted.iter().any(|t| t.as_bytes() == o)) {
        return Ok(());
    }
    let upgrade = headers.contains_key(http::header::UPGRADE)
        || fetch_is(headers, "sec-fetch-mode", &["websocket"]);
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let plugin = fetch_is(headers, "sec-fetch-dest", &["object", "embed"]);
    if safe && !upgrade && !plugin {
        return Ok(());
    }
    // The origin is the sender's to choose, and the reason is logged and
    // answered: a real one fits (RFC 1035 names are at most 253 bytes).
    Err(AuthError::CrossSite(origin.map_or_else(
        || "another site".to_owned(),
        |o| {
            format!(
                "origin {}",
                String::from_utf8_lossy(&o[..o.len().min(MAX_SHOWN_ORIGIN)])
            )
        },
    )))
}

/// Bytes of a refused `Origin` named in the reason.
const MAX_SHOWN_ORIGIN: usize = 300;

/// Whether Fetch Metadata header `name` is one of `values`.
fn fetch_is(headers: &HeaderMap, name: &str, values: &[&str]) -> bool {
    headers
        .get(name)
        .is_some_and(|v| values.iter().any(|w| v.as_bytes() == w.as_bytes()))
}

/// Whether `origin` (`scheme://host[:port]`) names `host`; default ports
/// count as absent on both sides (a proxy may write `Host: relay:443`).
fn same_host(origin: &[u8], host: Option<&str>) -> bool {
    let (Some(origin), Some(host)) = (
        std::str::from_utf8(origin).ok().and_then(parse_origin),
        host,
    ) else {
        return false;
    };
    let (scheme, authority) = origin.split_once("://").unwrap_or_default();
    let host = host.to_ascii_lowercase();
    authority == without_default_port(scheme, &host)
}

fn without_default_port<'a>(scheme: &str, authority: &'a str) -> &'a str {
    let default = if scheme == "https" { ":443" } else { ":80" };
    authority.strip_suffix(default).unwrap_or(authority)
}

/// An origin, normalised as browsers write it in `Origin`:
/// `scheme://host[:port]` in lower case, http or https, without a default
/// port, with nothing after the authority but a `/`; `None` otherwise
/// (wildcards, user info, paths, queries and fragments are no origins).
pub fn parse_origin(s: &str) -> Option<String> {
    if s.contains(['#', '*']) {
        return None;
    }
    let uri: http::Uri = s.parse().ok()?;
    let scheme = uri.scheme_str()?;
    let authority = uri.authority()?.as_str().to_ascii_lowercase();
    let bare = uri
        .path_and_query()
        .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/");
    if !(scheme == "https" || scheme == "http")
        || !bare
        || authority.contains('@')
        || authority.ends_with(':')
    {
        return None;
    }
    Some(format!(
        "{scheme}://{}",
        without_default_port(scheme, &authority)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    const HOST: Option<&str> = Some("relay.example.com");

    fn ok(method: Method, pairs: &[(&'static str, &'static str)]) -> bool {
        let trusted = ["https://app.example.com".to_owned()];
        check(&method, &headers(pairs), HOST, &trusted).is_ok()
    }

    /// The sender's `Origin` is named in the refusal, cut to a length a
    /// real one fits in.
    #[test]
    fn a_refused_origin_is_named_at_bounded_length() {
        let mut h = HeaderMap::new();
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        let long = format!("https://{}.example.com", "a".repeat(10_000));
        h.insert("origin", long.parse().unwrap());
        let e = check(&Method::POST, &h, HOST, &[]).unwrap_err().to_string();
        assert!(e.contains("origin https://aaa"), "{e}");
        assert!(e.len() < 400, "{} bytes", e.len());
    }

    #[test]
    fn fetch_metadata() {
        assert!(ok(Method::POST, &[("sec-fetch-site", "same-origin")]));
        assert!(ok(Method::GET, &[("sec-fetch-site", "none")]));
        // Another site's form post, or its WebSocket.
        assert!(!ok(
            Method::POST,
            &[
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-mode", "navigate")
            ]
        ));
        assert!(!ok(
            Method::GET,
            &[
                ("sec-fetch-site", "same-site"),
                ("sec-fetch-mode", "websocket"),
                ("origin", "https://other.example.com"),
            ]
        ));
        assert!(!ok(
            Method::GET,
            &[("sec-fetch-site", "cross-site"), ("upgrade", "websocket")]
        ));
        // Its links, images and reads it cannot see the answer of.
        assert!(ok(
            Method::GET,
            &[
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-mode", "navigate")
            ]
        ));
        assert!(ok(
            Method::GET,
            &[
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-dest", "image")
            ]
        ));
        // But no plugin content.
        assert!(!ok(
            Method::GET,
            &[
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-dest", "embed")
            ]
        ));
        // A trusted origin may do anything.
        assert!(ok(
            Method::POST,
            &[
                ("sec-fetch-site", "same-site"),
                ("origin", "https://app.example.com")
            ]
        ));
        assert!(ok(
            Method::GET,
            &[
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-mode", "websocket"),
                ("origin", "https://app.example.com")
            ]
        ));
    }

    #[test]
    fn origin_without_fetch_metadata() {
        assert!(ok(Method::POST, &[]));
        assert!(ok(Method::POST, &[("origin", "https://relay.example.com")]));
        assert!(ok(Method::POST, &[("origin", "https://app.example.com")]));
        assert!(ok(Method::GET, &[("origin", "https://evil.example")]));
        assert!(!ok(Method::POST, &[("origin", "https://evil.example")]));
        assert!(!ok(
            Method::GET,
            &[("origin", "https://evil.example"), ("upgrade", "websocket")]
        ));
        assert!(!ok(Method::POST, &[("origin", "null")]));
        // The port is part of the origin; a default one is no port.
        assert!(!ok(
            Method::POST,
            &[("origin", "https://relay.example.com:8443")]
        ));
        let trusted = ["https://app.example.com".to_owned()];
        let post = |origin: &'static str, host: &str| {
            check(
                &Method::POST,
                &headers(&[("origin", origin)]),
                Some(host),
                &trusted,
            )
            .is_ok()
        };
        assert!(post("https://relay.example.com", "relay.example.com:443"));
        assert!(post("https://relay.example.com", "Relay.Example.com"));
        assert!(post("http://[::1]:8080", "[::1]:8080"));
        assert!(!post("https://relay.example.com", "relay.example.com:8443"));
        let e = check(
            &Method::POST,
            &headers(&[("origin", "https://evil.example")]),
            HOST,
            &[],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "cookie token sent from origin https://evil.example"
        );
        assert_eq!(e.status(), http::StatusCode::FORBIDDEN);
    }

    #[test]
    fn configured_origins() {
        for (given, normal) in [
            (
                "https://App.Example.com:8443",
                "https://app.example.com:8443",
            ),
            ("https://app.example.com:443", "https://app.example.com"),
            ("https://app.example.com/", "https://app.example.com"),
            ("http://localhost:3000", "http://localhost:3000"),
            ("http://[::1]:80", "http://[::1]"),
        ] {
            assert_eq!(parse_origin(given).as_deref(), Some(normal), "{given}");
        }
        for bad in [
            "app.example.com",
            "https://a.b/x",
            "https://a.b?q",
            "https://a.b#f",
            "https://*.a.b",
            "https://a.b:",
            "ftp://a.b",
            "https://u@a.b",
            "",
        ] {
            assert_eq!(parse_origin(bad), None, "{bad}");
        }
    }
}
