//! The v1 protocol as a user-client and a relay-client see it
//! (`PROTOCOL.md`): routing, status codes, preservation of the request and
//! response, reaping, the relay-client endpoints' error answers and size
//! limit, and a relay reached under a path prefix.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::backend::Backend;
use common::observe::{wait_gauge, within};
use common::{Relay, RelayClient, bounded, client_config};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use http_relay::proto::{HttpRequest, HttpResponse};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use reqwest::StatusCode;

fn line<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix(": ")))
        .collect()
}

#[tokio::test]
async fn both_routing_forms_reach_the_backend() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let http = relay.http();

    let text = relay.get_text("/client/robot-1/any/path?q=1&r=a%20b").await;
    assert_eq!(line(&text, "uri"), ["/any/path?q=1&r=a%20b"]);

    for path in ["/client/robot-1", "/client/robot-1/"] {
        let text = relay.get_text(path).await;
        assert_eq!(line(&text, "uri"), ["/"], "{path}");
    }

    let resp = http
        .get(format!("{}/pkg.Service/Method?x=2", relay.url))
        .header("x-server-name", "robot-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert_eq!(line(&text, "uri"), ["/pkg.Service/Method?x=2"]);
}

/// Poll answers carry our server's mark (a relay-client learns from it
/// that it need not keep its chunks as small as for the Go server);
/// refusals and answers to user-clients do not.
#[tokio::test]
async fn relay_client_calls_are_answered_with_the_servers_mark() {
    let relay = Relay::start(|c| c.timeouts.poll = Duration::from_millis(200)).await;
    let http = relay.http();
    let mark = |r: &reqwest::Response| {
        r.headers()
            .get(http_relay::proto::SERVER_MARK_HEADER)
            .map(|v| v.to_str().unwrap_or_default().to_owned())
    };
    let poll = http
        .get(format!("{}/server/request?server=robot-1", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(poll.status(), StatusCode::REQUEST_TIMEOUT);
    assert_eq!(mark(&poll).as_deref(), Some("http-relay"));
    let refused = http
        .post(format!("{}/server/request", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(mark(&refused), None);
    let user = http
        .get(format!("{}/client/robot-1/", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(mark(&user), None);
}

/// Our relay-client on `transport = "v1"` posts `max_chunk_size` (1 MiB)
/// chunks to our server, which marks its poll answers: a 3 MiB answer
/// takes a handful of posts, not the 62 of 50 KiB chunks kept for the Go
/// server.
#[tokio::test]
async fn on_v1_our_server_gets_full_size_chunks() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.transport = http_relay::config::Transport::V1;
    let _client = RelayClient::start(cfg);
    relay.wait_for_backend("robot-1").await;
    let http = relay.http();
    let n = 3 * 1024 * 1024;
    let body = http
        .get(format!("{}/client/robot-1/bytes/{n}", relay.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.len(), n);
    let posts = common::observe::labelled_sum(
        &relay.get_text("/metrics").await,
        "broker_requests",
        &["method=\"server_response\"", "backend=\"robot-1\""],
    );
    assert!((1.0..=20.0).contains(&posts), "{posts} chunk posts");
}

#[tokio::test]
async fn missing_and_unknown_backend_names() {
    let relay = Relay::start(|_| {}).await;
    let http = relay.http();
    let resp = http
        .get(format!("{}/client/", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let resp = http
        .get(format!("{}/some/path", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    let resp = http
        .get(format!("{}/client/nobody/x", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.unwrap().contains("unknown client"));

    let resp = http
        .get(format!("{}/healthz", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "ok");
}

/// Cookie fields that an HTTP/2 user-client sends apart reach the backend
/// as one `Cookie` line, on both transports, as the Go server relays them.
#[tokio::test]
async fn cookie_fields_of_an_http2_user_reach_the_backend_as_one_line() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    for (name, transport) in [
        ("robot-v1", http_relay::config::Transport::V1),
        ("robot-v2", http_relay::config::Transport::V2),
    ] {
        let mut cfg = client_config(&relay, name, &backend.url);
        cfg.transport = transport;
        let _client = RelayClient::start(cfg);
        relay.wait_for_backend(name).await;
        let resp = relay
            .http2()
            .get(format!("{}/client/{name}/x", relay.url))
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        let text = resp.text().await.unwrap();
        assert_eq!(line(&text, "cookie"), ["a=1; b=2"], "{transport:?}: {text}");
    }
}

#[tokio::test]
async fn method_host_headers_body_and_status_are_preserved() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let http = relay.http1();

    let resp = http
        .request(
            reqwest::Method::PATCH,
            format!("{}/client/robot-1/thing", relay.url),
        )
        .header("host", "robot.example.com")
        .header("x-multi", "one")
        .header("x-multi", "two")
        .header("connection", "x-secret")
        .header("x-secret", "hop")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic dXNlcjpwcm94eS1wYXNzd29yZA==")
        .body("payload")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backend"], "test");
    let text = resp.text().await.unwrap();
    assert_eq!(line(&text, "method"), ["PATCH"]);
    assert_eq!(line(&text, "host"), ["robot.example.com"]);
    assert_eq!(line(&text, "x-multi"), ["one", "two"]);
    assert!(
        line(&text, "x-secret").is_empty(),
        "named by Connection: {text}"
    );
    assert!(line(&text, "keep-alive").is_empty(), "hop-by-hop: {text}");
    assert!(
        line(&text, "proxy-authorization").is_empty(),
        "the user's proxy credentials: {text}"
    );
    assert_eq!(line(&text, "body-len"), ["7"]);
    assert!(text.ends_with("\n\npayload"));

    for code in [201, 204, 404, 418, 500, 503] {
        let resp = http
            .get(format!("{}/client/robot-1/status/{code}", relay.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), code);
    }

    let resp = http
        .get(format!("{}/client/robot-1/redirect", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        302,
        "redirects are passed through, not followed"
    );
    assert_eq!(resp.headers()["location"], "/elsewhere");

    let resp = http
        .get(format!("{}/client/robot-1/multi", relay.url))
        .send()
        .await
        .unwrap();
    let cookies: Vec<_> = resp.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
}

#[tokio::test]
async fn same_listener_serves_http1_and_http2() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let url = format!("{}/client/robot-1/v", relay.url);

    let resp = relay.http1().get(&url).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(resp.status(), 200);
    let resp = relay.http().get(&url).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "ALPN picks h2");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn cleartext_serves_http1_and_h2c() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| c.tls.enabled = false).await;
    assert!(relay.url.starts_with("http://"));
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let url = format!("{}/client/robot-1/v", relay.url);

    let resp = relay.http1().get(&url).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert_eq!(resp.status(), 200);
    let resp = relay.http2().get(&url).send().await.unwrap();
    assert_eq!(
        resp.version(),
        reqwest::Version::HTTP_2,
        "h2c prior knowledge"
    );
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn oversize_request_body_gets_413() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| c.limits.max_request_body = bytesize::ByteSize::kib(64)).await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let before = backend.hits.load(std::sync::atomic::Ordering::SeqCst);

    let resp = relay
        .http()
        .post(format!("{}/client/robot-1/hash", relay.url))
        .body(vec![0u8; 65 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    // A streamed body without Content-Length is cut at the limit too.
    let stream = futures::stream::iter((0..80).map(|_| Ok::<_, std::io::Error>(vec![1u8; 1024])));
    let resp = relay
        .http()
        .post(format!("{}/client/robot-1/hash", relay.url))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(
        backend.hits.load(std::sync::atomic::Ordering::SeqCst),
        before
    );
}

#[tokio::test]
async fn silent_backend_is_reaped_with_504() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| c.timeouts.inactive_request = Duration::from_millis(500)).await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let resp = bounded(
        relay
            .http()
            .get(format!("{}/client/robot-1/hang", relay.url))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 504);
}

#[tokio::test]
async fn registered_backend_without_free_poll_times_out() {
    let relay = Relay::start(|c| {
        c.timeouts.poll = Duration::from_millis(100);
        c.timeouts.relay = Duration::from_millis(300);
    })
    .await;
    let http = relay.http();
    // A raw poll registers the name, then times out with 408.
    let resp = http
        .get(format!("{}/server/request?server=idle", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 408);
    let resp = http
        .get(format!("{}/client/idle/x", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.unwrap().contains("did not pick up"));
}

/// The wait for a poll (`timeouts.relay`) starts when the request's body
/// is in, not when the request arrived: an upload that took longer than
/// that limit, finished while no poll waits, is still picked up by the
/// next poll (it was answered 503 at once).
#[tokio::test]
async fn a_long_upload_still_waits_for_the_next_poll() {
    use futures::StreamExt as _;
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.relay = Duration::from_millis(800);
    })
    .await;
    let http = relay.http();
    register(&http, &relay, "robot-1").await;
    // 1.5 s of upload, in ten pieces.
    let pieces = futures::stream::iter(0..10).then(|i| async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        Ok::<_, std::io::Error>(bytes::Bytes::from(format!("piece {i};")))
    });
    let upload = tokio::spawn({
        let http = http.clone();
        let url = format!("{}/client/robot-1/upload", relay.url);
        async move {
            let resp = http
                .post(url)
                .body(reqwest::Body::wrap_stream(pieces))
                .send()
                .await
                .unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    });
    // The poll comes a moment after the upload has ended.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert!(
        !upload.is_finished(),
        "answered before a poll came: {:?}",
        upload.await
    );
    let req = raw_poll(&http, &relay, "robot-1").await;
    let body = req.body.clone().unwrap_or_default();
    assert!(body.ends_with(b"piece 9;"), "{body:?}");
    let chunk = HttpResponse {
        id: req.id.clone(),
        status_code: Some(201),
        eof: Some(true),
        ..Default::default()
    };
    assert_eq!(raw_post(&http, &relay, &chunk).await, 200);
    assert_eq!(bounded(upload).await.unwrap().0, 201);
}

#[tokio::test]
async fn inactive_backends_are_forgotten() {
    let relay = Relay::start(|c| {
        c.timeouts.poll = Duration::from_millis(50);
        c.timeouts.relay = Duration::from_millis(100);
        c.timeouts.inactive_backend = Duration::from_millis(300);
    })
    .await;
    let http = relay.http();
    let poll = format!("{}/server/request?server=gone", relay.url);
    assert_eq!(http.get(&poll).send().await.unwrap().status(), 408);
    let user = format!("{}/client/gone/x", relay.url);
    let text = http.get(&user).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("unknown client"), "still known: {text}");
    // Forgotten once no poll came for 300 ms (the reaper looks every
    // 75 ms): well within a few seconds.
    within(Duration::from_secs(5), "backend forgotten", || async {
        let resp = http.get(&user).send().await.ok()?;
        let status = resp.status();
        let text = resp.text().await.ok()?;
        (status == 503 && text.contains("unknown client")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn relay_endpoints_reject_bad_input() {
    let relay = Relay::start(|_| {}).await;
    let http = relay.http();

    let resp = http
        .get(format!("{}/server/request", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "poll without server name");

    let resp = http
        .post(format!("{}/server/response", relay.url))
        .body(&b"\xff\xff\xff\xff garbage"[..])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "malformed protobuf");
    assert!(resp.text().await.unwrap().contains("malformed"));

    let chunk = http_relay::proto::HttpResponse {
        id: Some("robot-1:00000000000000000000000000000000".into()),
        status_code: Some(200),
        ..Default::default()
    };
    let resp = http
        .post(format!("{}/server/response", relay.url))
        .body(chunk.encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "unknown id");

    let resp = http
        .post(format!(
            "{}/server/requeststream?id=robot-1:nope",
            relay.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 410, "unknown stream");

    let resp = http
        .get(format!("{}/server/response", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    // The server still works after all that.
    let resp = http
        .get(format!("{}/healthz", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn many_concurrent_requests_to_several_backends_never_mix() {
    // Each backend labels its answers, so an answer shows who gave it.
    let backends = [
        Backend::start_labeled("backend-0").await,
        Backend::start_labeled("backend-1").await,
        Backend::start_labeled("backend-2").await,
    ];
    let relay = Relay::start(|_| {}).await;
    let mut clients = Vec::new();
    for (i, b) in backends.iter().enumerate() {
        clients.push(RelayClient::connect(&relay, &format!("robot-{i}"), &b.url).await);
    }
    let before: Vec<usize> = backends.iter().map(|b| b.hits.load(SeqCst)).collect();
    let http = relay.http();
    let mut tasks = Vec::new();
    for n in 0..150usize {
        let http = http.clone();
        let url = format!("{}/client/robot-{}/req/{n}?n={n}", relay.url, n % 3);
        tasks.push(tokio::spawn(async move {
            let body = format!("body-{n}");
            let resp = http.post(&url).body(body.clone()).send().await.unwrap();
            assert_eq!(resp.status(), 200, "{n}");
            let label = resp.headers()["x-backend"].to_str().unwrap().to_owned();
            (n, label, resp.text().await.unwrap(), body)
        }));
    }
    for t in tasks {
        let (n, label, text, body) = bounded(t).await.unwrap();
        assert_eq!(label, format!("backend-{}", n % 3), "request {n}");
        assert_eq!(line(&text, "uri"), [format!("/req/{n}?n={n}").as_str()]);
        assert!(text.ends_with(&format!("\n\n{body}")), "{n}: {text}");
    }
    let served: Vec<usize> = backends
        .iter()
        .zip(&before)
        .map(|(b, before)| b.hits.load(SeqCst) - before)
        .collect();
    assert_eq!(served, [50, 50, 50], "requests that reached each backend");
}

#[tokio::test]
async fn several_relay_clients_share_one_name() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _ca = RelayClient::connect(&relay, "shared", &a.url).await;
    let _cb = RelayClient::connect(&relay, "shared", &b.url).await;
    let http = relay.http();
    let before = (
        a.hits.load(std::sync::atomic::Ordering::SeqCst),
        b.hits.load(std::sync::atomic::Ordering::SeqCst),
    );
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let http = http.clone();
        let url = format!("{}/client/shared/slow?ms=50", relay.url);
        tasks.push(tokio::spawn(async move {
            http.get(&url).send().await.unwrap().status()
        }));
    }
    for t in tasks {
        assert_eq!(bounded(t).await.unwrap(), StatusCode::OK);
    }
    let after = (
        a.hits.load(std::sync::atomic::Ordering::SeqCst),
        b.hits.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "both clients served: {before:?} -> {after:?}"
    );
}

/// Registers `name` with a raw poll that gives up at once, so that user
/// requests for it wait for the next poll instead of failing with 503.
async fn register(http: &reqwest::Client, relay: &Relay, name: &str) {
    let _ = http
        .get(format!("{}/server/request?server={name}", relay.url))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
}

/// A raw v1 poll for `name`: the next relayed request.
async fn raw_poll(http: &reqwest::Client, relay: &Relay, name: &str) -> HttpRequest {
    let url = format!("{}/server/request?server={name}", relay.url);
    bounded(async {
        loop {
            let resp = http.get(&url).send().await.unwrap();
            match resp.status().as_u16() {
                200 => return HttpRequest::decode(resp.bytes().await.unwrap()).unwrap(),
                408 => continue,
                s => panic!("poll answered {s}"),
            }
        }
    })
    .await
}

async fn raw_post(http: &reqwest::Client, relay: &Relay, chunk: &HttpResponse) -> StatusCode {
    http.post(format!("{}/server/response", relay.url))
        .body(chunk.encode_to_vec())
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn oversize_response_chunk_gets_413_and_the_user_request_still_ends() {
    let relay = Relay::start(|c| {
        c.limits.max_response_chunk = bytesize::ByteSize::kib(64);
        c.timeouts.inactive_request = Duration::from_secs(1);
    })
    .await;
    let http = relay.http();
    register(&http, &relay, "v1bot").await;
    let user = |path: &'static str| {
        let (http, url) = (relay.http(), format!("{}/client/v1bot{path}", relay.url));
        tokio::spawn(async move { http.get(url).send().await.unwrap() })
    };
    let chunk = |id: Option<String>, len: usize| HttpResponse {
        id,
        status_code: Some(200),
        body: Some(vec![b'x'; len].into()),
        eof: Some(true),
        ..Default::default()
    };

    // Control: a chunk just under the limit is taken.
    let small = user("/small");
    let id = raw_poll(&http, &relay, "v1bot").await.id;
    assert_eq!(
        raw_post(&http, &relay, &chunk(id, 63 * 1024)).await,
        StatusCode::OK
    );
    let resp = bounded(small).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().len(), 63 * 1024);

    let big = user("/big");
    let id = raw_poll(&http, &relay, "v1bot").await.id;
    assert_eq!(
        raw_post(&http, &relay, &chunk(id, 65 * 1024)).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // Nothing more comes from the relay-client: the user-client gets an
    // error status once the request is reaped (1 s), not a hang.
    let resp = tokio::time::timeout(Duration::from_secs(10), big)
        .await
        .expect("user request still open 10 s after the refused chunk")
        .unwrap();
    assert!(
        [502, 504].contains(&resp.status().as_u16()),
        "{}",
        resp.status()
    );
    wait_gauge(
        &http,
        &relay.url,
        "relay_active_requests",
        0.0,
        Duration::from_secs(5),
    )
    .await;
}

/// A reverse proxy that serves the relay under `/prefix` only, as an
/// ingress with a path rule does, and records every path asked for.
struct PrefixProxy {
    url: String,
    paths: Arc<Mutex<Vec<String>>>,
    _task: tokio::task::JoinHandle<()>,
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

impl PrefixProxy {
    async fn start(target: &str) -> PrefixProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let paths: Arc<Mutex<Vec<String>>> = Arc::default();
        let upstream = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build_http::<Full<Bytes>>();
        let (seen, target) = (paths.clone(), target.to_owned());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (seen, upstream, target) = (seen.clone(), upstream.clone(), target.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        forward(req, seen.clone(), upstream.clone(), target.clone())
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        PrefixProxy {
            url,
            paths,
            _task: task,
        }
    }
}

async fn forward(
    req: http::Request<Incoming>,
    seen: Arc<Mutex<Vec<String>>>,
    upstream: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
    target: String,
) -> Result<http::Response<ProxyBody>, hyper::Error> {
    let path = req.uri().path().to_owned();
    seen.lock().unwrap().push(path.clone());
    let Some(rest) = path.strip_prefix("/prefix").filter(|r| r.starts_with('/')) else {
        let mut resp = http::Response::new(Full::new(Bytes::from_static(b"no route")));
        *resp.status_mut() = StatusCode::NOT_FOUND;
        return Ok(resp.map(|b| b.map_err(|never| match never {}).boxed()));
    };
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let (mut parts, body) = req.into_parts();
    parts.uri = format!("{target}{rest}{query}").parse().unwrap();
    parts.headers.remove(http::header::HOST);
    let body = Full::new(body.collect().await?.to_bytes());
    match upstream
        .request(http::Request::from_parts(parts, body))
        .await
    {
        Ok(resp) => Ok(resp.map(BodyExt::boxed)),
        Err(e) => {
            let mut resp = http::Response::new(Full::new(Bytes::from(e.to_string())));
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            Ok(resp.map(|b| b.map_err(|never| match never {}).boxed()))
        }
    }
}

#[tokio::test]
async fn relay_url_with_a_path_prefix() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| c.tls.enabled = false).await;
    let proxy = PrefixProxy::start(&relay.url).await;
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.relay_url = format!("{}/prefix", proxy.url);
    let _client = RelayClient::start(cfg);

    // Served only if the relay-client polls and posts under the prefix.
    let text = within(Duration::from_secs(10), "a request served", || async {
        let resp = relay
            .http()
            .get(format!("{}/client/robot-1/through?x=1", relay.url))
            .send()
            .await
            .ok()?;
        (resp.status() == 200).then_some(resp.text().await.ok()?)
    })
    .await;
    assert_eq!(line(&text, "uri"), ["/through?x=1"]);
    let paths = proxy.paths.lock().unwrap().clone();
    for expected in ["/prefix/server/request", "/prefix/server/response"] {
        assert!(paths.iter().any(|p| p == expected), "{expected}: {paths:?}");
    }
    assert!(
        paths.iter().all(|p| p.starts_with("/prefix/server/")),
        "{paths:?}"
    );
}
