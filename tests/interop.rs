//! Fleet compatibility: a relay-client that speaks only the documented v1
//! messages (written here as a plain reqwest loop, independent of our
//! client) works against our server, and our relay-client works against a
//! minimal server that implements only v1.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use common::backend::Backend;
use common::v1server::{StreamAnswer, V1Server};
use common::{Relay, RelayClient, bounded, pattern};
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full};
use http_relay::proto::{HttpHeader, HttpRequest, HttpResponse};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use tokio::sync::mpsc;

fn header(name: &str, value: &str) -> HttpHeader {
    HttpHeader::new(name, value)
}

/// Registers `name` as a fresh v1 relay-client does: with a first poll
/// (cut short here; the name stays known).
async fn register(http: &reqwest::Client, relay: &Relay, name: &str) {
    let _ = http
        .get(format!("{}/server/request?server={name}", relay.url))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
}

/// The v1 relay-client's poll, as the Go client sends it.
async fn v1_poll(http: &reqwest::Client, relay: &Relay, name: &str) -> HttpRequest {
    let url = format!("{}/server/request?server={name}", relay.url);
    bounded(async {
        loop {
            let resp = http.get(&url).send().await.unwrap();
            match resp.status().as_u16() {
                200 => {
                    assert!(
                        resp.headers()["content-type"]
                            .to_str()
                            .unwrap()
                            .contains("cloudrobotics.http_relay.v1alpha1.HttpRequest")
                    );
                    return HttpRequest::decode(resp.bytes().await.unwrap()).unwrap();
                }
                408 => continue,
                s => panic!("poll answered {s}"),
            }
        }
    })
    .await
}

async fn v1_post(http: &reqwest::Client, relay: &Relay, chunk: &HttpResponse) -> u16 {
    http.post(format!("{}/server/response", relay.url))
        .body(chunk.encode_to_vec())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// Sends a user request in the background; the answer comes on the handle.
fn user_get(relay: &Relay, path: &str) -> tokio::task::JoinHandle<reqwest::Response> {
    let http = relay.http();
    let url = format!("{}{path}", relay.url);
    tokio::spawn(async move { http.get(url).header("te", "trailers").send().await.unwrap() })
}

#[tokio::test]
async fn v1_relay_client_gets_requests_and_streams_chunks() {
    let relay = Relay::start(|_| {}).await;
    let http = relay.http();
    register(&http, &relay, "v1bot").await;

    let user = tokio::spawn({
        let http = relay.http();
        let url = format!("{}/client/v1bot/some/path?x=1", relay.url);
        async move {
            http.post(url)
                .header("host", "user.example")
                .header("x-a", "1")
                .header("x-a", "2")
                .body("hello")
                .send()
                .await
                .unwrap()
        }
    });
    let req = v1_poll(&http, &relay, "v1bot").await;
    let id = req.id.clone().unwrap();
    assert!(id.starts_with("v1bot:"));
    assert_eq!(id.len(), "v1bot:".len() + 32);
    assert!(id["v1bot:".len()..].chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(req.method.as_deref(), Some("POST"));
    assert_eq!(
        req.url.as_deref(),
        Some(&b"http://invalid/some/path?x=1"[..])
    );
    assert_eq!(req.host.as_deref(), Some(&b"user.example"[..]));
    assert_eq!(req.body.as_deref(), Some(&b"hello"[..]));
    // Names travel in Go's canonical form, as every v1 peer writes them.
    let xa: Vec<_> = req
        .header
        .iter()
        .filter(|h| h.name.as_deref() == Some(&b"X-A"[..]))
        .map(|h| h.value.clone().unwrap())
        .collect();
    assert_eq!(xa, ["1", "2"]);

    let first = HttpResponse {
        id: Some(id.clone()),
        status_code: Some(207),
        header: vec![header("x-from", "v1"), header("x-from", "again")],
        body: Some(Bytes::from_static(b"part one, ")),
        ..Default::default()
    };
    assert_eq!(v1_post(&http, &relay, &first).await, 200);
    let middle = HttpResponse {
        id: Some(id.clone()),
        body: Some(Bytes::from_static(b"part two")),
        ..Default::default()
    };
    assert_eq!(v1_post(&http, &relay, &middle).await, 200);
    let last = HttpResponse {
        id: Some(id.clone()),
        eof: Some(true),
        ..Default::default()
    };
    assert_eq!(v1_post(&http, &relay, &last).await, 200);

    let resp = bounded(user).await.unwrap();
    assert_eq!(resp.status().as_u16(), 207);
    let from: Vec<_> = resp.headers().get_all("x-from").iter().collect();
    assert_eq!(from, ["v1", "again"]);
    assert_eq!(resp.text().await.unwrap(), "part one, part two");

    // The request is over: its id is unknown now.
    assert_eq!(v1_post(&http, &relay, &middle).await, 400);
}

#[tokio::test]
async fn ids_are_unique() {
    let relay = Relay::start(|_| {}).await;
    let http = relay.http();
    register(&http, &relay, "ids").await;
    let mut users = Vec::new();
    for _ in 0..20 {
        users.push(user_get(&relay, "/client/ids/x"));
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..20 {
        let req = v1_poll(&http, &relay, "ids").await;
        assert!(seen.insert(req.id.clone().unwrap()), "duplicate id");
        let done = HttpResponse {
            id: req.id,
            status_code: Some(200),
            eof: Some(true),
            ..Default::default()
        };
        assert_eq!(v1_post(&http, &relay, &done).await, 200);
    }
    for u in users {
        assert_eq!(bounded(u).await.unwrap().status(), 200);
    }
}

/// A v1 post answered with its status and body.
async fn v1_post_text(
    http: &reqwest::Client,
    relay: &Relay,
    chunk: &HttpResponse,
) -> (u16, String) {
    let resp = http
        .post(format!("{}/server/response", relay.url))
        .body(chunk.encode_to_vec())
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// A header entry with raw bytes, as a Go peer may send it.
fn raw_header(name: &[u8], value: &[u8]) -> HttpHeader {
    HttpHeader::new(name, value)
}

#[tokio::test]
async fn invalid_backend_answers_become_502_at_once_and_the_post_400() {
    // Far above the test timeout: a user-client left waiting for the
    // reaper would fail the test.
    let relay = Relay::start(|c| c.timeouts.inactive_request = Duration::from_secs(120)).await;
    let http = relay.http();
    register(&http, &relay, "bad").await;

    let first = |header: Vec<HttpHeader>| HttpResponse {
        status_code: Some(200),
        header,
        eof: Some(true),
        ..Default::default()
    };
    let cases: Vec<(HttpResponse, &str)> = vec![
        (
            first(vec![header("X-Good", "1"), header("bad name", "x")]),
            "invalid header name \"bad name\"",
        ),
        (
            first(vec![header("X-Good", "1"), header("x-ok", "line\r\nbreak")]),
            "invalid value for header \"x-ok\"",
        ),
        // Bytes that are not UTF-8 in `string` fields: Go peers send them.
        (
            first(vec![header("X-Good", "1"), raw_header(b"X-Caf\xe9", b"v")]),
            "invalid header name \"X-Caf\\xe9\"",
        ),
        (
            first(vec![
                header("X-Good", "1"),
                raw_header(b"X-Nul", b"a\0\xff"),
            ]),
            "invalid value for header \"x-nul\"",
        ),
        (
            HttpResponse {
                status_code: Some(200),
                eof: Some(true),
                trailer: vec![raw_header(b"\xff\xfe", b"v")],
                ..Default::default()
            },
            "invalid header name \"\\xff\\xfe\"",
        ),
        (
            HttpResponse {
                status_code: Some(1000),
                eof: Some(true),
                ..Default::default()
            },
            "invalid status code 1000",
        ),
        (
            HttpResponse {
                status_code: Some(-5),
                eof: Some(true),
                ..Default::default()
            },
            "invalid status code -5",
        ),
        (
            HttpResponse {
                status_code: Some(103),
                eof: Some(true),
                ..Default::default()
            },
            "invalid status code 103",
        ),
        (first(vec![header("x", "y"); 2000]), "header entries"),
    ];
    for (mut chunk, expect) in cases {
        let user = user_get(&relay, "/client/bad/x");
        let req = v1_poll(&http, &relay, "bad").await;
        chunk.id = req.id.clone();
        let (status, text) = v1_post_text(&http, &relay, &chunk).await;
        assert_eq!(status, 400, "{expect}: {text}");
        assert!(text.contains(expect), "post: {expect:?} not in {text:?}");
        assert_eq!(text.trim().lines().count(), 1, "one line: {text:?}");
        let resp = bounded(user).await.unwrap();
        assert_eq!(resp.status(), 502);
        // Nothing of the refused chunk reaches the user-client.
        assert!(resp.headers().get("x-good").is_none());
        let text = resp.text().await.unwrap();
        assert!(text.contains(expect), "user: {expect:?} not in {text:?}");
        // The request is over: a later post for it is 400 too.
        let later = HttpResponse {
            id: req.id,
            eof: Some(true),
            ..Default::default()
        };
        assert_eq!(v1_post(&http, &relay, &later).await, 400);
    }

    // A first chunk without a status passes the post (it could be a
    // continuation) and fails the user side.
    let user = user_get(&relay, "/client/bad/x");
    let req = v1_poll(&http, &relay, "bad").await;
    let no_status = HttpResponse {
        id: req.id,
        body: Some(Bytes::from_static(b"no status")),
        ..Default::default()
    };
    assert_eq!(v1_post(&http, &relay, &no_status).await, 200);
    let resp = bounded(user).await.unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("status_code"));

    assert_eq!(
        http.get(format!("{}/healthz", relay.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn header_values_with_bytes_that_are_not_utf8_are_relayed_as_bytes() {
    // obs-text (0x80-0xff) is a valid HTTP field value; it travels as is.
    let relay = Relay::start(|_| {}).await;
    let http = relay.http();
    register(&http, &relay, "latin").await;
    let user = user_get(&relay, "/client/latin/x");
    let req = v1_poll(&http, &relay, "latin").await;
    let chunk = HttpResponse {
        id: req.id,
        status_code: Some(200),
        header: vec![raw_header(b"X-Name", b"Andr\xe9")],
        body: Some(Bytes::from_static(b"ok")),
        eof: Some(true),
        ..Default::default()
    };
    assert_eq!(v1_post(&http, &relay, &chunk).await, 200);
    let resp = bounded(user).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-name"].as_bytes(), b"Andr\xe9");
}

#[tokio::test]
async fn trailer_floods_are_refused_cleanly() {
    // Trailers accumulate over chunks; past the cap the post is refused,
    // the user's stream is reset, and the server (and the user's
    // connection) stay up.
    let relay = Relay::start(|_| {}).await;
    let http = relay.http();
    register(&http, &relay, "flood").await;
    let user = tokio::spawn({
        let url = format!("{}/client/flood/t", relay.url);
        async move { h2_get_result(&url).await }
    });
    let req = v1_poll(&http, &relay, "flood").await;
    let id = req.id.unwrap();
    let first = HttpResponse {
        id: Some(id.clone()),
        status_code: Some(200),
        body: Some(Bytes::from_static(b"start")),
        ..Default::default()
    };
    assert_eq!(v1_post(&http, &relay, &first).await, 200);
    let mut refused = None;
    for i in 0..40 {
        let chunk = HttpResponse {
            id: Some(id.clone()),
            trailer: (0..1000)
                .map(|j| header(&format!("x-t-{i}-{j}"), "v"))
                .collect(),
            ..Default::default()
        };
        let (status, text) = v1_post_text(&http, &relay, &chunk).await;
        if status != 200 {
            refused = Some((i, status, text));
            break;
        }
    }
    let (i, status, text) = refused.expect("trailer flood was never refused");
    assert_eq!(status, 400);
    assert!(text.contains("trailer"), "{text}");
    assert!(i < 32, "refused only after {i} chunks of 1000 trailers");
    let result = bounded(user).await.unwrap();
    assert!(
        result.is_err(),
        "the user's stream must fail, got {result:?}"
    );
    assert_eq!(
        http.get(format!("{}/healthz", relay.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn trailers_on_the_last_chunk_reach_the_user_client() {
    let relay = Relay::start(|_| {}).await;
    let http = relay.http();
    register(&http, &relay, "tr").await;
    // A raw HTTP/2 user-client, to read trailers.
    let user = tokio::spawn({
        let url = format!("{}/client/tr/t", relay.url);
        async move { h2_get_with_trailers(&url).await }
    });
    let req = v1_poll(&http, &relay, "tr").await;
    let id = req.id.unwrap();
    for chunk in [
        HttpResponse {
            id: Some(id.clone()),
            status_code: Some(200),
            body: Some(Bytes::from_static(b"a")),
            ..Default::default()
        },
        HttpResponse {
            id: Some(id.clone()),
            body: Some(Bytes::from_static(b"b")),
            trailer: vec![header("x-checksum", "ab")],
            ..Default::default()
        },
        HttpResponse {
            id: Some(id.clone()),
            eof: Some(true),
            trailer: vec![header("x-status", "done")],
            ..Default::default()
        },
    ] {
        assert_eq!(v1_post(&http, &relay, &chunk).await, 200);
    }
    let (body, trailers) = bounded(user).await.unwrap();
    assert_eq!(body, "ab");
    assert_eq!(trailers.get("x-checksum").unwrap(), "ab");
    assert_eq!(trailers.get("x-status").unwrap(), "done");
}

/// GET over HTTP/2 with hyper, returning the body and the trailers.
pub async fn h2_get_with_trailers(url: &str) -> (String, http::HeaderMap) {
    get_with_trailers(url, true).await.unwrap()
}

/// GET over HTTP/2 with hyper; an error if the body fails.
async fn h2_get_result(url: &str) -> Result<(String, http::HeaderMap), String> {
    get_with_trailers(url, true).await
}

/// GET with `TE: trailers` over HTTP/2 or HTTP/1.1 (hyper, TLS),
/// returning the body and the trailers, or how the body failed.
async fn get_with_trailers(url: &str, http2: bool) -> Result<(String, http::HeaderMap), String> {
    let tls = http_relay::tls::client_config(Some(&common::certs().ca_cert)).unwrap();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let https = if http2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(http2)
            .build(https);
    let req = Request::get(url)
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    Ok((
        String::from_utf8(collected.to_bytes().to_vec()).unwrap(),
        trailers,
    ))
}

/// Starts a user GET (HTTP/1.1 or HTTP/2, `TE: trailers`) on a fresh
/// backend name polled by a Go-like v1 relay-client, answers it with
/// `chunks`, and returns what the user-client got.
async fn relay_chunks_to(
    relay: &Relay,
    http2: bool,
    name: &str,
    chunks: Vec<HttpResponse>,
) -> Result<(String, http::HeaderMap), String> {
    let http = relay.http();
    register(&http, relay, name).await;
    let user = tokio::spawn({
        let url = format!("{}/client/{name}/t", relay.url);
        async move { get_with_trailers(&url, http2).await }
    });
    let id = v1_poll(&http, relay, name).await.id;
    for mut chunk in chunks {
        chunk.id = id.clone();
        assert_eq!(v1_post(&http, relay, &chunk).await, 200);
    }
    bounded(user).await.unwrap()
}

#[tokio::test]
async fn undeclared_trailers_of_a_go_relay_client_reach_http1_and_http2_user_clients() {
    let relay = Relay::start(|_| {}).await;
    // A quick answer: the Go relay-client posts one chunk with the head,
    // the body, eof and the trailers, and never a `Trailer` header.
    let one_chunk = || {
        vec![HttpResponse {
            status_code: Some(200),
            header: vec![header("Content-Type", "text/plain")],
            body: Some(Bytes::from_static(b"abc")),
            eof: Some(true),
            trailer: vec![header("X-Checksum", "sum-abc")],
            ..Default::default()
        }]
    };
    for (http2, name) in [(false, "tr-h1"), (true, "tr-h2")] {
        let (body, trailers) = relay_chunks_to(&relay, http2, name, one_chunk())
            .await
            .unwrap();
        assert_eq!(body, "abc", "http2={http2}");
        assert_eq!(
            trailers.get("x-checksum").map(|v| v.to_str().unwrap()),
            Some("sum-abc"),
            "http2={http2}: {trailers:?}"
        );
    }

    // A gRPC reply streamed over several chunks: its trailer names are
    // known from the content type, on HTTP/1.1 too.
    let grpc = || {
        vec![
            HttpResponse {
                status_code: Some(200),
                header: vec![header("Content-Type", "application/grpc")],
                body: Some(Bytes::from_static(b"\0\0\0\0\0")),
                ..Default::default()
            },
            HttpResponse {
                eof: Some(true),
                trailer: vec![header("Grpc-Status", "0"), header("Grpc-Message", "")],
                ..Default::default()
            },
        ]
    };
    for (http2, name) in [(false, "grpc-h1"), (true, "grpc-h2")] {
        let (_, trailers) = relay_chunks_to(&relay, http2, name, grpc()).await.unwrap();
        assert_eq!(trailers["grpc-status"], "0", "http2={http2}: {trailers:?}");
    }

    // A longer stream whose trailer names nobody announced at head time:
    // HTTP/2 user-clients get the trailers; HTTP/1.1 ones get the whole
    // body (hyper writes no undeclared trailers; docs/PROTOCOL.md).
    let streamed = || {
        vec![
            HttpResponse {
                status_code: Some(200),
                body: Some(Bytes::from_static(b"part 1, ")),
                ..Default::default()
            },
            HttpResponse {
                body: Some(Bytes::from_static(b"part 2")),
                eof: Some(true),
                trailer: vec![header("X-Checksum", "late")],
                ..Default::default()
            },
        ]
    };
    let (body, trailers) = relay_chunks_to(&relay, true, "late-h2", streamed())
        .await
        .unwrap();
    assert_eq!(body, "part 1, part 2");
    assert_eq!(trailers["x-checksum"], "late");
    let (body, _) = relay_chunks_to(&relay, false, "late-h1", streamed())
        .await
        .unwrap();
    assert_eq!(body, "part 1, part 2");
}

/// A backend that declares `Trailer: X-Checksum` and sends it after a
/// chunked body, over HTTP/1.1.
async fn trailer_backend() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("x-checksum", "sum-of-body".parse().unwrap());
                    let frames: Vec<Result<hyper::body::Frame<Bytes>, Infallible>> = vec![
                        Ok(hyper::body::Frame::data(Bytes::from_static(b"body"))),
                        Ok(hyper::body::Frame::trailers(trailers)),
                    ];
                    let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("trailer", "x-checksum")
                            .body(body)
                            .unwrap(),
                    )
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (url, task)
}

#[tokio::test]
async fn declared_trailers_of_a_backend_reach_http1_user_clients_through_our_client() {
    let (backend, _task) = trailer_backend().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "declared", &backend).await;
    for http2 in [false, true] {
        let url = format!("{}/client/declared/x", relay.url);
        let (body, trailers) = get_with_trailers(&url, http2).await.unwrap();
        assert_eq!(body, "body");
        assert_eq!(trailers["x-checksum"], "sum-of-body", "http2={http2}");
    }
}

#[tokio::test]
async fn posts_for_a_departed_user_client_get_400_at_once() {
    let relay = Relay::start(|c| c.timeouts.inactive_request = Duration::from_secs(60)).await;
    let http = relay.http();
    register(&http, &relay, "gone").await;
    let user = user_get(&relay, "/client/gone/x");
    let req = v1_poll(&http, &relay, "gone").await;
    let id = req.id.unwrap();
    let first = HttpResponse {
        id: Some(id.clone()),
        status_code: Some(200),
        body: Some(Bytes::from_static(b"start")),
        ..Default::default()
    };
    assert_eq!(v1_post(&http, &relay, &first).await, 200);
    let resp = bounded(user).await.unwrap();
    drop(resp);
    let more = HttpResponse {
        id: Some(id),
        body: Some(Bytes::from_static(b"more")),
        ..Default::default()
    };
    // Well under the 60 s inactivity timeout: the id is freed at once.
    bounded(async {
        while v1_post(&http, &relay, &more).await != 400 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A Go relay-client closes its whole backend connection when a
/// `/server/requeststream` call is answered 410, so the user-client's
/// half-close must not be told that way: what the backend says after it
/// still reaches the user, as through the Go server. The peer here reads
/// the request stream as the Go client does (no `half_close` parameter)
/// and stops its backend's output once told 410.
#[tokio::test]
async fn a_go_relay_client_still_relays_the_backend_after_the_users_half_close() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let relay = Relay::start(|c| c.timeouts.poll = Duration::from_secs(20)).await;
    let http = relay.http();
    register(&http, &relay, "exec").await;
    let mut user = relay.tls_connect().await;
    user.write_all(
        b"GET /client/exec/x HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: x-test\r\n\r\n",
    )
    .await
    .unwrap();
    let req = v1_poll(&http, &relay, "exec").await;
    let id = req.id.unwrap();
    let head = HttpResponse {
        id: Some(id.clone()),
        status_code: Some(101),
        header: vec![header("Connection", "Upgrade"), header("Upgrade", "x-test")],
        ..Default::default()
    };
    assert_eq!(v1_post(&http, &relay, &head).await, 200);
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        got.push(bounded(user.read_u8()).await.unwrap());
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    user.write_all(b"question").await.unwrap();
    user.shutdown().await.unwrap();

    // The Go client's request-stream loop.
    let closed = Arc::new(AtomicBool::new(false));
    let stream_url = format!("{}/server/requeststream?id={id}", relay.url);
    let reader = {
        let http = http.clone();
        let closed = closed.clone();
        tokio::spawn(async move {
            let mut to_backend = Vec::new();
            loop {
                let resp = http.post(&stream_url).send().await.unwrap();
                match resp.status().as_u16() {
                    200 => to_backend.extend_from_slice(&resp.bytes().await.unwrap()),
                    410 => {
                        closed.store(true, SeqCst);
                        return to_backend;
                    }
                    s => panic!("request stream answered {s}"),
                }
            }
        })
    };
    // The backend answers in pieces, longer than a request-stream wait,
    // while its connection is open.
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if closed.load(SeqCst) {
            break;
        }
        let piece = format!("answer-{i} ");
        let chunk = HttpResponse {
            id: Some(id.clone()),
            body: Some(Bytes::from(piece)),
            ..Default::default()
        };
        assert_eq!(v1_post(&http, &relay, &chunk).await, 200);
    }
    let eof = HttpResponse {
        id: Some(id.clone()),
        eof: Some(true),
        ..Default::default()
    };
    assert_eq!(v1_post(&http, &relay, &eof).await, 200);
    let ended = std::time::Instant::now();
    let mut answer = Vec::new();
    bounded(user.read_to_end(&mut answer)).await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answer),
        "answer-0 answer-1 answer-2 answer-3 answer-4 answer-5 "
    );
    // The request over, the stream's end is told at once, not after the
    // 20 s wait of a silent read.
    assert_eq!(bounded(reader).await.unwrap(), b"question");
    assert!(
        ended.elapsed() < Duration::from_secs(5),
        "{:?}",
        ended.elapsed()
    );
}

/// A `%` that starts no escape passes `http`'s URI parser but not Go's,
/// and the fleet's Go relay-client crashes on the error: such a path is
/// answered 400 before it is relayed, as the Go server answers it.
#[tokio::test]
async fn a_stray_percent_in_a_path_is_refused_before_it_reaches_a_relay_client() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let relay = Relay::start(|_| {}).await;
    let http = relay.http();
    register(&http, &relay, "pct").await;
    for path in ["/client/pct/100%", "/client/pct/a%zz/b"] {
        let mut s = relay.tls_connect().await;
        let req = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = bounded(s.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("invalid URL escape"), "{path}: {answer}");
    }
    // Nothing was queued for the backend's relay-client.
    let poll = http
        .get(format!("{}/server/request?server=pct", relay.url))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(poll.is_err_and(|e| e.is_timeout()));
}

/// The Go relay-client gives the backend's time on its last chunk, not
/// on the first: a longer answer still counts in the backend-time and
/// overhead histograms.
#[tokio::test]
async fn backend_time_on_the_last_chunk_is_recorded() {
    let relay = Relay::start(|_| {}).await;
    let http = relay.http();
    register(&http, &relay, "timed").await;
    let user = user_get(&relay, "/client/timed/x");
    let req = v1_poll(&http, &relay, "timed").await;
    let id = req.id.unwrap();
    let head = HttpResponse {
        id: Some(id.clone()),
        status_code: Some(200),
        body: Some(Bytes::from_static(b"part one, ")),
        ..Default::default()
    };
    assert_eq!(v1_post(&http, &relay, &head).await, 200);
    let last = HttpResponse {
        id: Some(id),
        body: Some(Bytes::from_static(b"part two")),
        eof: Some(true),
        backend_duration_ms: Some(1250),
        ..Default::default()
    };
    assert_eq!(v1_post(&http, &relay, &last).await, 200);
    let resp = bounded(user).await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "part one, part two");
    let metrics = relay.get_text("/metrics").await;
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("backend=\"timed\""))
            .map(str::to_owned)
    };
    let count = line("broker_backend_responses_durations_count");
    assert!(
        count.as_deref().is_some_and(|l| l.ends_with(" 1")),
        "{metrics}"
    );
    let sum = line("broker_backend_responses_durations_sum");
    assert!(
        sum.as_deref().is_some_and(|l| l.ends_with(" 1.25")),
        "{metrics}"
    );
    let overhead = line("broker_overhead_durations_count");
    assert!(
        overhead.as_deref().is_some_and(|l| l.ends_with(" 1")),
        "{metrics}"
    );
}

// === Our relay-client against a server that implements only v1 ===

async fn collect(mut rx: mpsc::UnboundedReceiver<HttpResponse>) -> Vec<HttpResponse> {
    let mut out = Vec::new();
    bounded(async {
        while let Some(c) = rx.recv().await {
            let eof = c.eof == Some(true);
            out.push(c);
            if eof {
                break;
            }
        }
    })
    .await;
    out
}

/// A Go server copies the user's raw query into `url`, with bytes that a
/// strict URI parser refuses (`"`, `<`, `>`, bytes that are not UTF-8):
/// the request reaches the backend with those percent-encoded, as a
/// browser would have sent them, and the next one is served.
#[tokio::test]
async fn a_raw_query_from_a_go_server_reaches_the_backend_percent_encoded() {
    let backend = Backend::start().await;
    let server = V1Server::start().await;
    let _client = RelayClient::start(server.client_config(&backend.url));
    let rx = server
        .send(HttpRequest {
            id: Some("robot:0123456789abcdef0123456789abcdef".into()),
            method: Some("GET".into()),
            url: Some(Bytes::from_static(
                b"http://invalid/echo/x?q=\xff\xfe&m=up{job=\"a\"}&s=<b>",
            )),
            host: Some(Bytes::from_static(b"h\xe9.example")),
            ..Default::default()
        })
        .await;
    let chunks = collect(rx).await;
    assert_eq!(chunks[0].status_code, Some(200));
    let body: Vec<u8> = chunks
        .iter()
        .flat_map(|c| c.body.clone().unwrap_or_default())
        .collect();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("uri: /echo/x?q=%FF%FE&m=up%7Bjob=%22a%22%7D&s=%3Cb%3E\n"),
        "{text}"
    );
    let rx = server
        .send(HttpRequest {
            id: Some("robot:1123456789abcdef0123456789abcdef".into()),
            method: Some("GET".into()),
            url: Some("http://invalid/status/201".into()),
            ..Default::default()
        })
        .await;
    assert_eq!(collect(rx).await[0].status_code, Some(201));
}

/// A chunk post the server did not take in (503, as an ingress without
/// an upstream answers) is posted again, as the Go relay-client does: the
/// answer arrives whole, once.
#[tokio::test]
async fn a_chunk_post_the_server_did_not_take_is_posted_again() {
    let backend = Backend::start().await;
    let server = V1Server::start().await;
    server.refuse_posts(2);
    let _client = RelayClient::start(server.client_config(&backend.url));
    let rx = server
        .send(HttpRequest {
            id: Some("robot:0123456789abcdef0123456789abcdef".into()),
            method: Some("GET".into()),
            url: Some("http://invalid/bytes/1000".into()),
            ..Default::default()
        })
        .await;
    let chunks = collect(rx).await;
    assert_eq!(chunks[0].status_code, Some(200));
    let body: Vec<u8> = chunks
        .iter()
        .flat_map(|c| c.body.clone().unwrap_or_default())
        .collect();
    assert_eq!(body, common::pattern(1000, 1000));
}

/// The Go server answers every poll 408 at once while it shuts down. Our
/// relay-client then slows its polls down as after a failure, rather than
/// polling again at once (a tight loop over HTTP/2 until the server
/// exits).
#[tokio::test]
async fn polls_answered_empty_at_once_are_slowed_down() {
    let backend = Backend::start().await;
    let server = V1Server::start().await;
    let _client = RelayClient::start(server.client_config(&backend.url));
    common::eventually(|| async { (server.polls() >= 4).then_some(()) }).await;
    server.shut_down();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = server.polls();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let polls = server.polls() - before;
    // Four pending polls, each waiting a doubling step from 100 ms (half
    // to one and a half times it) up to 1 s: a few each in 2 s, not
    // thousands.
    assert!(polls <= 40, "{polls} polls in 2 s");
}

/// With `transport = "v1"` (no question about v2 asked), the relay-client
/// still keeps its chunks small for a server that has not marked its
/// answers as ours: a Go server's broker holds its lock while a chunk
/// waits for its user. It used to send `max_chunk_size` (1 MiB).
#[tokio::test]
async fn on_v1_chunks_stay_small_for_an_unmarked_server() {
    let backend = Backend::start().await;
    let server = V1Server::start().await;
    let mut cfg = server.client_config(&backend.url);
    cfg.transport = http_relay::config::Transport::V1;
    let _client = RelayClient::start(cfg);
    let n = 3 * 1024 * 1024;
    let rx = server
        .send(HttpRequest {
            id: Some("robot:22222222222222222222222222222222".into()),
            method: Some("GET".into()),
            url: Some(format!("http://invalid/bytes/{n}").into()),
            ..Default::default()
        })
        .await;
    let chunks = collect(rx).await;
    let sizes: Vec<usize> = chunks
        .iter()
        .map(|c| c.body.as_ref().map_or(0, |b| b.len()))
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), n);
    assert!(
        sizes.iter().all(|s| *s <= 50 * 1024),
        "largest chunk {:?}",
        sizes.iter().max()
    );
}

#[tokio::test]
async fn our_relay_client_works_against_a_v1_only_server() {
    let backend = Backend::start().await;
    let server = V1Server::start().await;
    let cfg = server.client_config(&backend.url);
    let _client = RelayClient::start(cfg);

    let rx = server
        .send(HttpRequest {
            id: Some("robot:0123456789abcdef0123456789abcdef".into()),
            method: Some("PUT".into()),
            host: Some("user.example".into()),
            url: Some("http://invalid/echo/me?q=1".into()),
            header: vec![header("x-h", "1"), header("x-h", "2")],
            body: Some(Bytes::from_static(b"body!")),
        })
        .await;
    let chunks = collect(rx).await;
    assert_eq!(chunks[0].status_code, Some(200));
    assert!(chunks[1..].iter().all(|c| c.status_code.is_none()));
    assert_eq!(chunks.iter().filter(|c| c.eof == Some(true)).count(), 1);
    assert!(chunks[0].backend_duration_ms.is_some());
    let body: Vec<u8> = chunks
        .iter()
        .flat_map(|c| c.body.clone().unwrap_or_default())
        .collect();
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("method: PUT\n"), "{text}");
    assert!(text.contains("uri: /echo/me?q=1\n"), "{text}");
    assert!(text.contains("host: user.example\n"), "{text}");
    assert!(text.contains("x-h: 1\nx-h: 2\n"), "{text}");
    assert!(text.ends_with("\n\nbody!"), "{text}");

    // A 3 MiB answer is cut into chunks of at most 50 KiB, in order: a
    // server without v2 gets the Go relay-client's chunk size, not
    // `max_chunk_size` (1 MiB).
    let n = 3 * 1024 * 1024 + 5;
    let rx = server
        .send(HttpRequest {
            id: Some("robot:11111111111111111111111111111111".into()),
            method: Some("GET".into()),
            url: Some(format!("http://invalid/bytes/{n}").into()),
            ..Default::default()
        })
        .await;
    let chunks = collect(rx).await;
    assert!(chunks.len() >= 62, "{} chunks", chunks.len());
    // The backend streamed it (`Transfer-Encoding: chunked`): that was
    // about the backend's connection and is not relayed.
    let names: Vec<String> = chunks[0]
        .header
        .iter()
        .map(|h| String::from_utf8_lossy(h.name.as_deref().unwrap_or_default()).to_lowercase())
        .collect();
    assert!(
        !names.contains(&"transfer-encoding".to_owned()),
        "{names:?}"
    );
    assert!(
        chunks
            .iter()
            .all(|c| c.body.as_ref().is_none_or(|b| b.len() <= 50 * 1024))
    );
    let body: Vec<u8> = chunks
        .iter()
        .flat_map(|c| c.body.clone().unwrap_or_default())
        .collect();
    assert_eq!(body, pattern(n, n as u64));

    // An empty post carries its length, as from the Go relay-client.
    let rx = server
        .send(HttpRequest {
            id: Some("robot:44444444444444444444444444444444".into()),
            method: Some("POST".into()),
            url: Some("http://invalid/echo/empty".into()),
            ..Default::default()
        })
        .await;
    let body: Vec<u8> = collect(rx)
        .await
        .iter()
        .flat_map(|c| c.body.clone().unwrap_or_default())
        .collect();
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("content-length: 0\n"), "{text}");

    // A redirect is passed through, not followed.
    let rx = server
        .send(HttpRequest {
            id: Some("robot:22222222222222222222222222222222".into()),
            method: Some("GET".into()),
            url: Some("http://invalid/redirect".into()),
            ..Default::default()
        })
        .await;
    let chunks = collect(rx).await;
    assert_eq!(chunks[0].status_code, Some(302));
}

/// A unary gRPC call over h2c with hyper, as a strict gRPC client sees
/// it: the response headers and the HTTP/2 trailers, separately.
async fn h2c_grpc_unary(
    url: &str,
    backend: &str,
    req: &common::grpc::pb::EchoRequest,
) -> (http::HeaderMap, Option<http::HeaderMap>) {
    let msg = req.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let req = Request::post(format!("{url}/relaytest.echo.Echo/Unary"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-server-name", backend)
        .body(Full::new(Bytes::from(framed)))
        .unwrap();
    let resp = bounded(client.request(req)).await.unwrap();
    let headers = resp.headers().clone();
    let collected = bounded(resp.into_body().collect()).await.unwrap();
    (headers, collected.trailers().cloned())
}

#[tokio::test]
async fn grpc_error_statuses_survive_the_go_server_with_our_relay_client() {
    let (addr, _svc) = common::grpc::start().await;
    let server = V1Server::start().await;
    let cfg = http_relay::config::ClientConfig {
        relay_url: server.url.clone(),
        backend_name: "grpc-robot".into(),
        backend_url: format!("http://{addr}"),
        backend_http2: true,
        ..Default::default()
    };
    let _client = RelayClient::start(cfg);

    // A trailers-only error: the Go server turns the status into trailers
    // only if our relay-client wrote `Grpc-Status` in canonical case.
    let failing = common::grpc::pb::EchoRequest {
        message: "no".into(),
        fail_with: tonic::Code::PermissionDenied as i32,
        ..Default::default()
    };
    let (_, trailers) = h2c_grpc_unary(&server.url, "grpc-robot", &failing).await;
    let trailers = trailers.expect("no HTTP/2 trailers: a gRPC client reports UNKNOWN");
    assert_eq!(trailers["grpc-status"], "7", "{trailers:?}");

    // And through a real gRPC client, with a success for contrast.
    let channel = tonic::transport::Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = common::grpc::pb::echo_client::EchoClient::with_interceptor(
        channel,
        |mut r: tonic::Request<()>| {
            r.metadata_mut()
                .insert("x-server-name", "grpc-robot".parse().unwrap());
            Ok(r)
        },
    );
    let err = bounded(grpc.unary(failing)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("failed as asked"), "{err:?}");
    let ok = common::grpc::pb::EchoRequest {
        message: "yes".into(),
        ..Default::default()
    };
    let reply = bounded(grpc.unary(ok)).await.unwrap().into_inner();
    assert_eq!(reply.message, "yes");
}

/// A request-stream read that failed after the server may have answered
/// it took the user's bytes with it: the relay-client closes the backend
/// connection, as the Go relay-client does, instead of writing on with a
/// hole in the stream; and the user's side ends.
#[tokio::test]
async fn a_lost_request_stream_answer_closes_the_backend_connection() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    // A backend that switches protocols, then keeps what it reads until
    // its connection ends.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_url = format!("http://{}", listener.local_addr().unwrap());
    let (got_tx, got_rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(s.read_u8().await.unwrap());
        }
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: x-test\r\n\r\n",
        )
        .await
        .unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        let _ = got_tx.send(got);
    });
    let server = V1Server::start().await;
    server.stream_answers(vec![
        StreamAnswer::Bytes(b"abc"),
        StreamAnswer::Lost(b"de"),
        StreamAnswer::Bytes(b"xyz"),
        StreamAnswer::Gone,
    ]);
    let _client = RelayClient::start(server.client_config(&backend_url));
    let rx = server
        .send(HttpRequest {
            id: Some("robot:33333333333333333333333333333333".into()),
            method: Some("GET".into()),
            url: Some("http://invalid/ws".into()),
            header: vec![header("Connection", "Upgrade"), header("Upgrade", "x-test")],
            ..Default::default()
        })
        .await;
    // The backend's connection ends after the bytes before the loss.
    let got = bounded(got_rx).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&got), "abc");
    // The user's side: the 101, then the end.
    let chunks = collect(rx).await;
    assert_eq!(chunks[0].status_code, Some(101));
    assert_eq!(chunks.last().unwrap().eof, Some(true));
}
