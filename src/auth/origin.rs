//! Cross-site requests carrying a cookie token.
//!
//! A browser attaches cookies to requests that other sites make it send:
//! a form post, a `fetch` with credentials, a WebSocket (`SameSite=None`
//! cookies always; browsers differ on cookies without `SameSite`). A token
//! read from a cookie therefore proves who the user is, not that the user
//! meant the request: a page elsewhere could open an `exec` WebSocket to a
//! robot in the user's name. Such requests must come from the relay's own
//! origin or from one in `auth.cookie_origins`, as the browser tells in
//! `Sec-Fetch-Site` (every current browser) or, older ones, in `Origin`.
//! Tokens in headers need no check: no other site can make a browser send
//! them.
//!
//! The rules follow the Fetch Metadata resource isolation policy, as Go's
//! `net/http.CrossOriginProtection` applies it, with one difference: a
//! WebSocket handshake is a GET but no navigation, so it is checked too.

use http::{HeaderMap, Method};

use super::AuthError;

/// Refuses a request whose cookie token a browser sent on another site's
/// behalf. `host` is the request's authority (`Host`, or `:authority` on
/// HTTP/2); `trusted` are the configured origins (`scheme://host[:port]`,
/// lower case).
pub fn check(
    method: &Method,
    headers: &HeaderMap,
    host: Option<&str>,
    trusted: &[String],
) -> Result<(), AuthError> {
    let origin = headers.get(http::header::ORIGIN).map(|v| v.as_bytes());
    let is_trusted =
        || origin.is_some_and(|o| trusted.iter().any(|t| t.as_bytes().eq_ignore_ascii_case(o)));
    let refused = || {
        let from = origin.map_or_else(
            || "another site".to_owned(),
            |o| format!("origin {}", String::from_utf8_lossy(o)),
        );
        AuthError::CrossSite(from)
    };
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.as_bytes();
        if site == b"same-origin" || site == b"none" || is_trusted() {
            return Ok(());
        }
        // A link followed from another site: a navigation changes nothing
        // by itself (`SameSite=Lax` cookies go along with it anyway).
        let navigation = headers
            .get("sec-fetch-mode")
            .is_some_and(|m| m.as_bytes() == b"navigate");
        if navigation && (method == Method::GET || method == Method::HEAD) {
            return Ok(());
        }
        return Err(refused());
    }
    // Browsers before Fetch Metadata: `Origin` comes with every
    // cross-origin request but a navigation, and with every WebSocket.
    match origin {
        None => Ok(()),
        Some(o) if is_trusted() || same_host(o, host) => Ok(()),
        Some(_) => Err(refused()),
    }
}

/// Whether `origin` (`scheme://host[:port]`) names `host`.
fn same_host(origin: &[u8], host: Option<&str>) -> bool {
    let Some(host) = host else {
        return false;
    };
    let rest = origin
        .strip_prefix(b"https://")
        .or_else(|| origin.strip_prefix(b"http://"));
    rest.is_some_and(|r| r.eq_ignore_ascii_case(host.as_bytes()))
}

/// A configured origin, normalised: `scheme://host[:port]` with an http
/// or https scheme and nothing after the authority but a `/`; `None`
/// otherwise.
pub fn parse_origin(s: &str) -> Option<String> {
    let uri: http::Uri = s.parse().ok()?;
    let scheme = uri.scheme_str()?;
    let authority = uri.authority()?;
    let bare = uri
        .path_and_query()
        .is_none_or(|p| p.as_str().is_empty() || p.as_str() == "/");
    if !(scheme == "https" || scheme == "http") || !bare || authority.as_str().contains('@') {
        return None;
    }
    Some(format!(
        "{scheme}://{}",
        authority.as_str().to_ascii_lowercase()
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

    #[test]
    fn fetch_metadata() {
        assert!(ok(Method::POST, &[("sec-fetch-site", "same-origin")]));
        assert!(ok(Method::GET, &[("sec-fetch-site", "none")]));
        // Another site's form post, fetch or WebSocket.
        assert!(!ok(
            Method::POST,
            &[
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-mode", "navigate")
            ]
        ));
        assert!(!ok(
            Method::GET,
            &[("sec-fetch-site", "cross-site"), ("sec-fetch-mode", "cors")]
        ));
        assert!(!ok(
            Method::GET,
            &[
                ("sec-fetch-site", "same-site"),
                ("sec-fetch-mode", "websocket"),
                ("origin", "https://other.example.com"),
            ]
        ));
        // A link from another site.
        assert!(ok(
            Method::GET,
            &[
                ("sec-fetch-site", "cross-site"),
                ("sec-fetch-mode", "navigate")
            ]
        ));
        // A trusted origin.
        assert!(ok(
            Method::POST,
            &[
                ("sec-fetch-site", "same-site"),
                ("origin", "https://APP.example.com")
            ]
        ));
    }

    #[test]
    fn origin_without_fetch_metadata() {
        assert!(ok(Method::POST, &[]));
        assert!(ok(Method::GET, &[("origin", "https://relay.example.com")]));
        assert!(ok(Method::GET, &[("origin", "https://app.example.com")]));
        assert!(!ok(Method::GET, &[("origin", "https://evil.example")]));
        assert!(!ok(Method::GET, &[("origin", "null")]));
        // The port is part of the origin.
        assert!(!ok(
            Method::GET,
            &[("origin", "https://relay.example.com:8443")]
        ));
        let e = check(
            &Method::GET,
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
        assert_eq!(
            parse_origin("https://App.Example.com:8443").as_deref(),
            Some("https://app.example.com:8443")
        );
        assert_eq!(
            parse_origin("http://localhost:3000").as_deref(),
            Some("http://localhost:3000")
        );
        assert_eq!(
            parse_origin("https://app.example.com/").as_deref(),
            Some("https://app.example.com")
        );
        for bad in [
            "app.example.com",
            "https://a.b/x",
            "https://a.b?q",
            "ftp://a.b",
            "https://u@a.b",
            "",
        ] {
            assert_eq!(parse_origin(bad), None, "{bad}");
        }
    }
}
