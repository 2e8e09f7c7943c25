//! Fleet compatibility: a relay-client that speaks only the documented v1
//! messages (written here as a plain reqwest loop, independent of our
//! client) works against our server, and our relay-client works against a
//! minimal server that implements only v1.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::backend::Backend;
use common::{Relay, RelayClient, bounded, pattern};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use http_relay::proto::{HttpHeader, HttpRequest, HttpResponse};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use tokio::sync::mpsc;

fn header(name: &str, value: &str) -> HttpHeader {
    HttpHeader {
        name: Some(name.into()),
        value: Some(value.into()),
    }
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
    // Register the name first, as a fresh v1 client does.
    let poll_url = format!("{}/server/request?server=v1bot", relay.url);
    let _ = http
        .get(&poll_url)
        .timeout(Duration::from_millis(200))
        .send()
        .await;

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
    assert_eq!(req.url.as_deref(), Some("http://invalid/some/path?x=1"));
    assert_eq!(req.host.as_deref(), Some("user.example"));
    assert_eq!(req.body.as_deref(), Some(&b"hello"[..]));
    let xa: Vec<_> = req
        .header
        .iter()
        .filter(|h| h.name.as_deref() == Some("x-a"))
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
    let _ = http
        .get(format!("{}/server/request?server=ids", relay.url))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
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

#[tokio::test]
async fn invalid_backend_answers_become_502_not_panics() {
    let relay = Relay::start(|_| {}).await;
    let http = relay.http();
    let _ = http
        .get(format!("{}/server/request?server=bad", relay.url))
        .timeout(Duration::from_millis(200))
        .send()
        .await;

    let cases: Vec<(HttpResponse, &str)> = vec![
        (
            HttpResponse {
                status_code: Some(200),
                header: vec![header("bad name", "x")],
                eof: Some(true),
                ..Default::default()
            },
            "invalid header name",
        ),
        (
            HttpResponse {
                status_code: Some(200),
                header: vec![header("x-ok", "line\r\nbreak")],
                eof: Some(true),
                ..Default::default()
            },
            "invalid value",
        ),
        (
            HttpResponse {
                status_code: Some(1000),
                eof: Some(true),
                ..Default::default()
            },
            "invalid status code",
        ),
        (
            HttpResponse {
                status_code: Some(-5),
                eof: Some(true),
                ..Default::default()
            },
            "invalid status code",
        ),
        (
            HttpResponse {
                body: Some(Bytes::from_static(b"no status")),
                ..Default::default()
            },
            "status_code",
        ),
        (
            HttpResponse {
                status_code: Some(103),
                eof: Some(true),
                ..Default::default()
            },
            "invalid status code 103",
        ),
        (
            HttpResponse {
                status_code: Some(200),
                header: vec![header("x", "y"); 2000],
                eof: Some(true),
                ..Default::default()
            },
            "header entries",
        ),
    ];
    for (mut chunk, expect) in cases {
        let user = user_get(&relay, "/client/bad/x");
        let req = v1_poll(&http, &relay, "bad").await;
        chunk.id = req.id;
        assert_eq!(v1_post(&http, &relay, &chunk).await, 200);
        let resp = bounded(user).await.unwrap();
        assert_eq!(resp.status(), 502);
        let text = resp.text().await.unwrap();
        assert!(text.contains(expect), "{expect:?} not in {text:?}");
    }
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
    let _ = http
        .get(format!("{}/server/request?server=tr", relay.url))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
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
    let tls = http_relay::tls::client_config(Some(&common::certs().ca_cert)).unwrap();
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .build();
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(https);
    let req = Request::get(url)
        .header("te", "trailers")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    (
        String::from_utf8(collected.to_bytes().to_vec()).unwrap(),
        trailers,
    )
}

#[tokio::test]
async fn posts_for_a_departed_user_client_get_400_at_once() {
    let relay = Relay::start(|c| c.timeouts.inactive_request = Duration::from_secs(60)).await;
    let http = relay.http();
    let _ = http
        .get(format!("{}/server/request?server=gone", relay.url))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
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

// === A server that implements only v1 ===

type Chunks = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<HttpResponse>>>>;

/// A minimal v1 server: one queue of requests, chunks by id, no upgrades.
struct V1Server {
    url: String,
    queue: mpsc::Sender<HttpRequest>,
    chunks: Chunks,
    _task: tokio::task::JoinHandle<()>,
}

impl V1Server {
    async fn start() -> V1Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (queue, rx) = mpsc::channel::<HttpRequest>(16);
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let chunks: Chunks = Arc::default();
        let shared = chunks.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (rx, chunks) = (rx.clone(), shared.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        v1_handle(req, rx.clone(), chunks.clone())
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        V1Server {
            url,
            queue,
            chunks,
            _task: task,
        }
    }

    /// Queues a request and returns the receiver of its chunks.
    async fn send(&self, req: HttpRequest) -> mpsc::UnboundedReceiver<HttpResponse> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.chunks
            .lock()
            .unwrap()
            .insert(req.id.clone().unwrap(), tx);
        self.queue.send(req).await.unwrap();
        rx
    }
}

async fn v1_handle(
    req: Request<Incoming>,
    queue: Arc<tokio::sync::Mutex<mpsc::Receiver<HttpRequest>>>,
    chunks: Chunks,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let status_only = |s: StatusCode| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = s;
        r
    };
    Ok(match req.uri().path() {
        "/server/request" => {
            let next = tokio::time::timeout(Duration::from_secs(1), async {
                queue.lock().await.recv().await
            })
            .await;
            match next {
                Ok(Some(r)) => Response::new(Full::new(Bytes::from(r.encode_to_vec()))),
                _ => status_only(StatusCode::REQUEST_TIMEOUT),
            }
        }
        "/server/response" => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let chunk = HttpResponse::decode(body).unwrap();
            let id = chunk.id.clone().unwrap_or_default();
            let sender = chunks.lock().unwrap().get(&id).cloned();
            match sender {
                Some(tx) if tx.send(chunk).is_ok() => {
                    Response::new(Full::new(Bytes::from_static(b"ok")))
                }
                _ => status_only(StatusCode::BAD_REQUEST),
            }
        }
        _ => status_only(StatusCode::GONE),
    })
}

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

#[tokio::test]
async fn our_relay_client_works_against_a_v1_only_server() {
    let backend = Backend::start().await;
    let server = V1Server::start().await;
    let cfg = http_relay::config::ClientConfig {
        relay_url: server.url.clone(),
        backend_name: "robot".into(),
        backend_url: backend.url.clone(),
        ..Default::default()
    };
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

    // A 3 MiB answer is cut into chunks of at most 1 MiB, in order.
    let n = 3 * 1024 * 1024 + 5;
    let rx = server
        .send(HttpRequest {
            id: Some("robot:11111111111111111111111111111111".into()),
            method: Some("GET".into()),
            url: Some(format!("http://invalid/bytes/{n}")),
            ..Default::default()
        })
        .await;
    let chunks = collect(rx).await;
    assert!(chunks.len() >= 4, "{} chunks", chunks.len());
    assert!(
        chunks
            .iter()
            .all(|c| c.body.as_ref().is_none_or(|b| b.len() <= 1024 * 1024))
    );
    let body: Vec<u8> = chunks
        .iter()
        .flat_map(|c| c.body.clone().unwrap_or_default())
        .collect();
    assert_eq!(body, pattern(n, n as u64));

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
