//! The v2 transport (`docs/transport-v2.md`): one role-flipped HTTP/2
//! connection per relay-client. Requests reach the relay-client as
//! streams, bodies stream both ways under flow control, trailers and
//! upgrades are native, cancellation works both ways, and v1 remains the
//! fallback on both sides.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use common::backend::Backend;
use common::observe::{gauge, wait_gauge};
use common::{Relay, RelayClient, bounded, client_config, eventually, h2raw, pattern, sha256_hex};
use futures::StreamExt as _;
use http_relay::config::Transport;

/// Starts a v2 relay-client for `name` and waits until the relay has
/// `tunnels` tunnels.
async fn v2_client(relay: &Relay, name: &str, backend: &str, tunnels: f64) -> RelayClient {
    let mut cfg = client_config(relay, name, backend);
    cfg.transport = Transport::V2;
    let client = RelayClient::start(cfg);
    wait_tunnels(relay, tunnels).await;
    client
}

async fn wait_tunnels(relay: &Relay, want: f64) {
    wait_gauge(
        &relay.http(),
        &relay.url,
        "relay_tunnels",
        want,
        Duration::from_secs(10),
    )
    .await
}

/// A relay, a v2 relay-client for `robot-1` and the test backend; waits
/// until the tunnel is up.
async fn v2_stack(
    edit: impl FnOnce(&mut http_relay::config::ServerConfig),
) -> (Relay, RelayClient, Backend) {
    let backend = Backend::start().await;
    let relay = Relay::start(edit).await;
    let client = v2_client(&relay, "robot-1", &backend.url, 1.0).await;
    (relay, client, backend)
}

#[tokio::test]
async fn requests_travel_as_streams_of_one_connection() {
    let (relay, _client, backend) = v2_stack(|_| {}).await;
    let http = relay.http();
    let resp = http
        .post(format!("{}/client/robot-1/echo/me?q=1", relay.url))
        .header("host", "user.example")
        .header("x-h", "1")
        .header("x-h", "2")
        .body("body!")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("method: POST\n"), "{text}");
    assert!(text.contains("uri: /echo/me?q=1\n"), "{text}");
    assert!(text.contains("host: user.example\n"), "{text}");
    assert!(text.contains("x-h: 1\nx-h: 2\n"), "{text}");
    assert!(
        !text.contains("x-relay-"),
        "internal headers leaked: {text}"
    );
    assert!(text.ends_with("\n\nbody!"), "{text}");
    // No poll ever reached the server: the name is served by the tunnel.
    let metrics = http
        .get(format!("{}/metrics", relay.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !metrics.contains("method=\"server_request\""),
        "a v1 poll was made: {metrics}"
    );
    assert_eq!(backend.hits.load(SeqCst), 1);

    // Status codes and repeated response headers pass.
    let resp = http
        .get(format!("{}/client/robot-1/status/418", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 418);
    let resp = http
        .get(format!("{}/client/robot-1/multi", relay.url))
        .send()
        .await
        .unwrap();
    let cookies: Vec<_> = resp.headers().get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
}

/// A slow upload is not cut off while its bytes keep moving, by the
/// server or by the relay-client: the backend may answer only once it has
/// the whole body, however long it takes.
#[tokio::test]
async fn a_slow_upload_that_keeps_moving_outlasts_the_inactive_deadline() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| c.timeouts.inactive_request = Duration::from_millis(800)).await;
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.transport = Transport::V2;
    cfg.backend_timeout = Duration::from_millis(800);
    let _client = RelayClient::start(cfg);
    wait_tunnels(&relay, 1.0).await;
    // 30 pieces of 100 bytes, 100 ms apart: about 3 s in all.
    let pieces = futures::stream::iter(0..30).then(|_| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, std::io::Error>(vec![7u8; 100])
    });
    let resp = relay
        .http()
        .post(format!("{}/client/robot-1/count", relay.url))
        .body(reqwest::Body::wrap_stream(pieces))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "3000 21000");
}

/// POSTs "hello" to the test backend's echo with `req`'s headers; the
/// backend's description of what it got, which must be a plain request
/// (no upgrade) with the whole body.
async fn hello_echoed(req: reqwest::RequestBuilder) {
    let resp = req.body("hello").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("method: POST\n"), "{text}");
    assert!(text.contains("body-len: 5\n"), "{text}");
    assert!(!text.contains("upgrade"), "switched: {text}");
    assert!(text.ends_with("\n\nhello"), "{text}");
}

/// An upgrade request with a body of its own (an `h2c` upgrade of a POST)
/// is relayed as a plain request: its body reaches the backend.
#[tokio::test]
async fn an_upgrade_request_with_a_body_keeps_its_body() {
    let (relay, _client, _backend) = v2_stack(|_| {}).await;
    let url = format!("{}/client/robot-1/echo", relay.url);
    hello_echoed(
        relay
            .http1()
            .post(url)
            .header("connection", "upgrade")
            .header("upgrade", "h2c"),
    )
    .await;
}

/// The relay's own headers come from the server alone: a user who sends
/// `x-relay-upgrade` does not turn a plain POST into an upgrade (which
/// would drop its body and hand it a raw pipe to the backend).
#[tokio::test]
async fn user_sent_relay_headers_are_not_taken_for_the_servers() {
    let (relay, _client, _backend) = v2_stack(|_| {}).await;
    let url = format!("{}/client/robot-1/echo", relay.url);
    hello_echoed(
        relay
            .http()
            .post(url)
            .header("x-relay-upgrade", "websocket")
            .header("x-relay-status", "101"),
    )
    .await;
}

#[tokio::test]
async fn large_bodies_stream_both_ways_byte_exact() {
    let (relay, _client, _backend) = v2_stack(|c| {
        c.limits.max_request_body = bytesize::ByteSize::mib(128);
    })
    .await;
    let http = relay.http();
    let n = 100 * 1024 * 1024;
    let resp = http
        .get(format!("{}/client/robot-1/bytes/{n}", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(n, n as u64)));

    let upload = pattern(96 * 1024 * 1024, 7);
    let resp = http
        .post(format!("{}/client/robot-1/hash", relay.url))
        .body(upload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), sha256_hex(&upload));
}

#[tokio::test]
async fn a_user_client_that_goes_away_ends_the_backend_call() {
    let (relay, _client, backend) = v2_stack(|c| {
        // v1 would keep the request for a minute; v2 resets the stream.
        c.timeouts.inactive_request = Duration::from_secs(60);
    })
    .await;
    let resp = relay
        .http()
        .get(format!("{}/client/robot-1/forever", relay.url))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    bounded(body.next()).await.unwrap().unwrap();
    assert_eq!(backend.open_streams.load(SeqCst), 1);
    drop(body);
    common::observe::within(Duration::from_secs(5), "backend stream dropped", || async {
        (backend.open_streams.load(SeqCst) == 0).then_some(())
    })
    .await;
    wait_gauge(
        &relay.http(),
        &relay.url,
        "relay_active_requests",
        0.0,
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test]
async fn quiet_streams_need_no_keepalive_chunks() {
    // v1 reaps a stream without chunks for inactive_request; a v2 stream
    // is alive as long as its connection is.
    let (relay, _client, _backend) = v2_stack(|c| {
        c.timeouts.inactive_request = Duration::from_secs(1);
    })
    .await;
    let text = relay
        .http()
        .get(format!(
            "{}/client/robot-1/sse?n=2&delay_ms=2500",
            relay.url
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text, "data: event 0\n\ndata: event 1\n\n");
}

#[tokio::test]
async fn v1_and_v2_relay_clients_serve_one_name_together() {
    let (relay, _v2, backend) = v2_stack(|_| {}).await;
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.transport = Transport::V1;
    let _v1 = RelayClient::start(cfg);
    // The v1 relay-client's polls arrive; requests keep being served.
    eventually(|| async {
        let text = relay.get_text("/metrics").await;
        text.contains("method=\"server_request\"").then_some(())
    })
    .await;
    for _ in 0..10 {
        let r = relay
            .http()
            .get(format!("{}/client/robot-1/x", relay.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        gauge(&relay.http(), &relay.url, "relay_tunnels").await,
        Some(1.0)
    );
}

/// Opens a WebSocket to `path` through the relay over TLS (HTTP/1.1).
async fn connect_ws(
    relay: &Relay,
    path: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let stream = relay.tls_connect().await;
    let url = format!("wss://localhost:{}{path}", relay.addr.port());
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let mut req = url.into_client_request().unwrap();
    // Some clients declare their empty handshake body; the length must
    // not follow the request into the upgraded stream.
    req.headers_mut()
        .insert("content-length", http::HeaderValue::from_static("0"));
    let (ws, resp) = tokio_tungstenite::client_async(req, stream).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

#[tokio::test]
async fn websockets_are_one_bidirectional_stream() {
    use futures::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let mut ws_backend = common::ws::WsBackend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = v2_client(&relay, "ws", &ws_backend.url, 1.0).await;

    let mut ws = bounded(connect_ws(&relay, "/client/ws/echo")).await;
    for i in 0..20 {
        // Each message is answered before the next is sent: bytes are
        // written as they are read, with no flush timer in between.
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(
            bounded(ws.next()).await.unwrap().unwrap(),
            Message::text(text)
        );
    }
    let blob = pattern(300 * 1024, 5);
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(
        bounded(ws.next()).await.unwrap().unwrap(),
        Message::binary(blob)
    );
    ws.close(None).await.unwrap();
    let closed = bounded(ws.next()).await;
    assert!(
        matches!(closed, Some(Ok(Message::Close(_))) | None),
        "{closed:?}"
    );
    assert_eq!(
        bounded(ws_backend.ended.recv()).await.as_deref(),
        Some("/echo")
    );

    // The backend going away ends the user's connection.
    let mut ws = bounded(connect_ws(&relay, "/client/ws/drop")).await;
    ws.send(Message::text("bye")).await.unwrap();
    let end = bounded(async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    let () = end;
    wait_gauge(
        &relay.http(),
        &relay.url,
        "relay_active_streams",
        0.0,
        Duration::from_secs(10),
    )
    .await;
}

/// A tonic client of the echo service through the relay (TLS, backend
/// named by header), and the relay-client over `transport`.
async fn grpc_through(
    transport: Transport,
) -> (
    Relay,
    RelayClient,
    common::grpc::pb::echo_client::EchoClient<
        tonic::service::interceptor::InterceptedService<
            tonic::transport::Channel,
            fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
        >,
    >,
    tokio::task::JoinHandle<()>,
) {
    let (addr, svc) = common::grpc::start().await;
    let relay = Relay::start(|_| {}).await;
    let mut cfg = client_config(&relay, "grpc-robot", &format!("http://{addr}"));
    cfg.backend_http2 = true;
    cfg.transport = transport;
    let client = RelayClient::start(cfg);
    relay.wait_for_backend("grpc-robot").await;
    let ca = std::fs::read(&common::certs().ca_cert).unwrap();
    let channel = tonic::transport::Channel::from_shared(relay.url.clone())
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("localhost"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    fn name(mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut()
            .insert("x-server-name", "grpc-robot".parse().unwrap());
        Ok(r)
    }
    let grpc =
        common::grpc::pb::echo_client::EchoClient::with_interceptor(channel, name as fn(_) -> _);
    (relay, client, grpc, svc)
}

#[tokio::test]
async fn interactive_bidi_grpc_answers_each_message_before_the_next() {
    use common::grpc::pb::EchoRequest;
    let (_relay, _client, mut grpc, _svc) = grpc_through(Transport::V2).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let mut replies = bounded(grpc.bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .unwrap()
        .into_inner();
    for i in 0..10 {
        tx.send(EchoRequest {
            message: format!("ping {i}"),
            ..Default::default()
        })
        .await
        .unwrap();
        // The request stream is still open: v1 would wait for its end.
        let reply = bounded(replies.next()).await.unwrap().unwrap();
        assert_eq!(reply.message, format!("ping {i}"));
    }
    drop(tx);
    assert!(bounded(replies.next()).await.is_none());

    // Error statuses (trailers-only and after replies) arrive intact.
    let err = bounded(grpc.unary(EchoRequest {
        message: "no".into(),
        fail_with: tonic::Code::PermissionDenied as i32,
        ..Default::default()
    }))
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let mut stream = bounded(grpc.server_stream(EchoRequest {
        message: "s".into(),
        count: 3,
        fail_with: tonic::Code::ResourceExhausted as i32,
        ..Default::default()
    }))
    .await
    .unwrap()
    .into_inner();
    let mut got = 0;
    let status = loop {
        match bounded(stream.next()).await {
            Some(Ok(_)) => got += 1,
            Some(Err(s)) => break s,
            None => panic!("stream ended without its status"),
        }
    };
    assert_eq!((got, status.code()), (3, tonic::Code::ResourceExhausted));
}

/// A backend that declares a Content-Length and fails half way.
async fn failing_backend() -> String {
    common::backend::raw_backend(|mut tcp| async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await;
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n";
        let _ = tcp.write_all(head.as_bytes()).await;
        let _ = tcp.write_all(&[b'x'; 30000]).await;
        // Gone, 70000 bytes short.
    })
    .await
}

#[tokio::test]
async fn a_failing_backend_never_looks_complete_to_the_user_client() {
    let backend = failing_backend().await;
    let relay = Relay::start(|_| {}).await;
    let _client = v2_client(&relay, "robot-1", &backend, 1.0).await;
    for http in [relay.http1(), relay.http2()] {
        // The failure may be seen before the head went out (the
        // connection or stream ends without a response) or after it (the
        // body fails): never as a complete response.
        let sent = bounded(http.get(format!("{}/client/robot-1/x", relay.url)).send()).await;
        let Ok(resp) = sent else { continue };
        common::assert_cut_off(resp).await;
    }
}

#[tokio::test]
async fn an_oversize_streamed_upload_gets_413() {
    let (relay, _client, _backend) = v2_stack(|c| {
        c.limits.max_request_body = bytesize::ByteSize::mib(1);
    })
    .await;
    // No Content-Length: the limit is found while streaming.
    let chunks = futures::stream::iter(
        (0..40).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; 64 * 1024]))),
    );
    let resp = relay
        .http()
        .post(format!("{}/client/robot-1/hash", relay.url))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
}

/// `server`'s v1 polls serve a request (a 201 from the test backend).
async fn served_over_v1_polls(server: &common::v1server::V1Server) {
    let mut rx = server
        .send(http_relay::proto::HttpRequest {
            id: Some("robot:0123456789abcdef0123456789abcdef".into()),
            method: Some("GET".into()),
            url: Some("http://invalid/status/201".into()),
            ..Default::default()
        })
        .await;
    let first = bounded(rx.recv()).await.unwrap();
    assert_eq!(first.status_code, Some(201));
}

/// A relay-client config for `server` with `transport`.
fn v1_server_client(
    server: &common::v1server::V1Server,
    backend: &Backend,
    transport: Transport,
) -> http_relay::config::ClientConfig {
    let mut cfg = server.client_config(&backend.url);
    cfg.transport = transport;
    cfg
}

#[tokio::test]
async fn auto_falls_back_to_v1_and_v2_fails_clearly_against_a_v1_only_server() {
    let backend = Backend::start().await;
    let server = common::v1server::V1Server::start().await;
    // v2 only: the client stops with a clear error.
    let err = bounded(http_relay::client::run(
        v1_server_client(&server, &backend, Transport::V2),
        std::future::pending(),
    ))
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("does not offer v2"), "{err}");
    // auto: v1 polls serve the request.
    let _client = RelayClient::start(v1_server_client(&server, &backend, Transport::Auto));
    served_over_v1_polls(&server).await;
}

/// What an ingress in front of a v1 server may answer an upgrade it
/// cannot pass: `auto` serves over v1 polls after a 403 or a 502, and
/// `v2` keeps trying after a 502 (a server being restarted behind its
/// ingress answers so too) instead of giving up.
#[tokio::test]
async fn auto_falls_back_after_a_refused_or_failed_upgrade_and_v2_retries_a_gateway_error() {
    let backend = Backend::start().await;
    for status in [
        http::StatusCode::FORBIDDEN,
        http::StatusCode::BAD_GATEWAY,
        http::StatusCode::NOT_IMPLEMENTED,
    ] {
        let server = common::v1server::V1Server::start().await;
        server.answer_connect(status);
        let _client = RelayClient::start(v1_server_client(&server, &backend, Transport::Auto));
        served_over_v1_polls(&server).await;
    }

    let server = common::v1server::V1Server::start().await;
    server.answer_connect(http::StatusCode::BAD_GATEWAY);
    let run = tokio::spawn(http_relay::client::run(
        v1_server_client(&server, &backend, Transport::V2),
        std::future::pending(),
    ));
    eventually(|| async { (server.connect_calls() >= 3).then_some(()) }).await;
    assert!(!run.is_finished(), "gave up: {:?}", run.await);
    run.abort();
}

/// An upgrade refused while v1 polls are answered is not the token's
/// fault: v2 is probed again every few minutes, not at the pace of a
/// refused token (before: again after 1-3 s, 2-6 s, 4-12 s, then every
/// 10 s, forever, from every robot). So at once after a 403 (a valid
/// token, or an ingress that does not pass upgrades), and after a 401
/// once a poll is answered.
#[tokio::test]
async fn an_upgrade_refused_while_polls_work_is_not_retried_at_once() {
    let backend = &Backend::start().await;
    let mut runs = Vec::new();
    for status in [http::StatusCode::FORBIDDEN, http::StatusCode::UNAUTHORIZED] {
        runs.push(async move {
            let server = common::v1server::V1Server::start().await;
            server.answer_connect(status);
            let started = std::time::Instant::now();
            let _client = RelayClient::start(v1_server_client(&server, backend, Transport::Auto));
            served_over_v1_polls(&server).await;
            // The refusal pace would have made a third call by 9 s.
            let until = std::time::Duration::from_secs(12);
            tokio::time::sleep(until.saturating_sub(started.elapsed())).await;
            let calls = server.connect_calls();
            assert!(calls <= 2, "{status}: {calls} upgrade calls in {until:?}");
        });
    }
    futures::future::join_all(runs).await;
}

/// A server (or something on the way) that closes each v2 connection as
/// soon as it is open does not get a tight loop of reconnects: the
/// relay-client backs off.
#[tokio::test]
async fn connections_closed_at_once_are_redialled_with_backoff() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, SeqCst);
                // The upgrade succeeds; then the connection ends.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(1..) => {}
                        _ => break,
                    }
                    head.extend_from_slice(&buf);
                }
                let _ = tcp
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                          upgrade: http-relay-v2\r\n\r\n",
                    )
                    .await;
            }
        })
    };
    let backend = Backend::start().await;
    let mut cfg = http_relay::config::ClientConfig {
        relay_url: url,
        backend_name: "robot".into(),
        backend_url: backend.url.clone(),
        ..Default::default()
    };
    cfg.transport = Transport::V2;
    let _client = RelayClient::start(cfg);
    eventually(|| async { (accepted.load(SeqCst) >= 2).then_some(()) }).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Backoff from 100 ms, doubling: about five connections in 2 s.
    let n = accepted.load(SeqCst);
    assert!(n <= 12, "{n} connections in about 2 s");
    server.abort();
}

/// A backend that answers an upgrade with 101 and then says nothing,
/// ignoring even the end of its input; any other request gets 200 "ok".
async fn silent_upgrade_backend() -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                loop {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match tcp.read(&mut b).await {
                            Ok(1) => head.push(b[0]),
                            _ => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                    if head.contains("upgrade: websocket") {
                        let _ = tcp
                            .write_all(
                                b"HTTP/1.1 101 Switching Protocols\r\n\
                                  connection: upgrade\r\nupgrade: websocket\r\n\r\n",
                            )
                            .await;
                        std::future::pending::<()>().await;
                    }
                    let _ = tcp
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            });
        }
    });
    url
}

/// The relay-client's side of an upgraded connection ends with its stream:
/// when the stream ends (the user-client went away, nothing moved), the
/// backend connection is closed even if the backend never speaks again
/// and stopped reading, and its place among the relay-client's
/// `max_concurrent_requests` (held while it is open) is free.
#[tokio::test]
async fn an_upgraded_connection_ends_with_its_user_even_with_a_silent_backend() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let backend = silent_upgrade_backend().await;
    // With nothing moving either way, the server ends the stream soon.
    let relay = Relay::start(|c| c.timeouts.idle_stream = Duration::from_secs(2)).await;
    let mut cfg = client_config(&relay, "robot-1", &backend);
    cfg.transport = Transport::V2;
    cfg.max_concurrent_requests = 1;
    let _client = RelayClient::start(cfg);
    wait_tunnels(&relay, 1.0).await;
    let plain = || async {
        relay
            .http()
            .get(format!("{}/client/robot-1/plain", relay.url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(plain().await, 200);

    let mut user = relay.tls_connect().await;
    user.write_all(
        b"GET /client/robot-1/ws HTTP/1.1\r\nhost: localhost\r\n\
          connection: upgrade\r\nupgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        bounded(user.read_exact(&mut b)).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // Open, the connection takes the relay-client's one place.
    assert_eq!(plain().await, 503);
    // The user sends more than the way to a backend that reads nothing
    // can hold (the relay-client's write to it blocks, and so does the
    // server's read of the user), then goes away: the server ends the
    // stream once nothing has moved for `idle_stream`.
    let (rd, mut wr) = tokio::io::split(user);
    let writer = tokio::spawn(async move {
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..512 {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
        }
        wr
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    writer.abort();
    let _ = writer.await;
    drop(rd);
    eventually(|| async { (plain().await == 200).then_some(()) }).await;
}

/// A relay-client told to stop lets its v2 streams in flight finish
/// before `run` returns (and the process exits).
#[tokio::test]
async fn a_stopping_relay_client_finishes_its_v2_streams() {
    let (relay, mut client, backend) = v2_stack(|_| {}).await;
    let before = backend.hits.load(SeqCst);
    let slow = tokio::spawn({
        let http = relay.http();
        let url = format!("{}/client/robot-1/slow?ms=1500", relay.url);
        async move { http.get(url).send().await.unwrap() }
    });
    eventually(|| async { (backend.hits.load(SeqCst) > before).then_some(()) }).await;
    client.stop().await;
    // `run` returned: the answer has left the relay-client.
    let resp = tokio::time::timeout(Duration::from_millis(500), slow)
        .await
        .expect("the stream was still running after the relay-client stopped")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "slow");
}

#[tokio::test]
async fn the_auto_default_uses_v2_against_our_server() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.transport = Transport::Auto;
    let _client = RelayClient::start(cfg);
    wait_tunnels(&relay, 1.0).await;
    let r = relay
        .http()
        .get(format!("{}/client/robot-1/x", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// A relay trusting `idp`, with audiences `u/{backend}` and `r/{backend}`
/// and no clock leeway (token expiry is what the tests watch).
async fn jwt_relay(idp: &common::idp::Idp) -> Relay {
    let relay = Relay::start(|c| {
        c.auth.mode = http_relay::config::AuthMode::Jwt;
        c.auth.user_audience = "u/{backend}".into();
        c.auth.relay_audience = "r/{backend}".into();
        c.auth.issuers = vec![http_relay::config::IssuerConfig {
            issuer: idp.url.clone(),
            jwks_uri: None,
            jwks_file: None,
            algorithms: Vec::new(),
        }];
        c.auth.leeway = Duration::ZERO;
        c.timeouts.relay = Duration::from_secs(1);
    })
    .await;
    // Keys loaded once a token is judged on its merits (not 503).
    let probe = idp.sign("rsa-1", &idp.claims("u/nobody", "probe"));
    eventually(|| async {
        let r = relay
            .http()
            .get(format!("{}/client/nobody/x", relay.url))
            .bearer_auth(&probe)
            .send()
            .await
            .ok()?;
        (r.status() != 503 || !r.text().await.ok()?.contains("identity provider")).then_some(())
    })
    .await;
    relay
}

/// A token of `idp` for `aud` that expires in `secs`.
fn token(idp: &common::idp::Idp, aud: &str, secs: u64) -> String {
    let mut claims = idp.claims(aud, "robot");
    claims["exp"] = serde_json::json!(jsonwebtoken::get_current_timestamp() + secs);
    idp.sign("rsa-1", &claims)
}

#[tokio::test]
async fn opening_a_tunnel_needs_the_relay_token_of_that_backend() {
    let idp = common::idp::Idp::start().await;
    let relay = jwt_relay(&idp).await;
    let open = |token: Option<String>| {
        let http = relay.http1();
        let url = format!("{}/server/connect?server=robot-1", relay.url);
        async move {
            let mut req = http
                .get(url)
                .header("connection", "upgrade")
                .header("upgrade", "http-relay-v2");
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            req.send().await.unwrap().status().as_u16()
        }
    };
    assert_eq!(open(None).await, 401);
    assert_eq!(
        open(Some(token(&idp, "u/robot-1", 60))).await,
        403,
        "a user token"
    );
    assert_eq!(
        open(Some(token(&idp, "r/robot-2", 60))).await,
        403,
        "another robot's"
    );
    assert_eq!(open(Some(token(&idp, "r/robot-1", 60))).await, 101);
}

#[tokio::test]
async fn a_tunnel_does_not_outlive_its_token_and_a_fresh_one_keeps_it_serving() {
    let idp = common::idp::Idp::start().await;
    let backend = Backend::start().await;
    let relay = jwt_relay(&idp).await;
    let user = token(&idp, "u/robot-1", 3600);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), token(&idp, "r/robot-1", 4)).unwrap();
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.transport = Transport::V2;
    cfg.auth.token_file = Some(file.path().to_owned());
    let _client = RelayClient::start(cfg);
    let http = relay.http();
    let tunnels = |want: f64| {
        wait_gauge(
            &http,
            &relay.url,
            "relay_tunnels",
            want,
            Duration::from_secs(15),
        )
    };
    tunnels(1.0).await;
    let get = || async {
        relay
            .http()
            .get(format!("{}/client/robot-1/x", relay.url))
            .bearer_auth(&user)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(get().await, 200);
    // Nobody renews the token: the server closes the tunnel when it
    // expires, and the relay-client cannot reopen it with the old token.
    tunnels(0.0).await;
    assert_eq!(get().await, 503);

    // A fresh token (as a token file rotation brings it) opens it again.
    std::fs::write(file.path(), token(&idp, "r/robot-1", 6)).unwrap();
    tunnels(1.0).await;
    assert_eq!(get().await, 200);
    // Before that one expires, the next rotation is taken up by a new
    // connection made before the old one closes: requests go on being
    // served through the expiry of the first.
    std::fs::write(file.path(), token(&idp, "r/robot-1", 3600)).unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut served = 0;
    while tokio::time::Instant::now() < until {
        assert_eq!(get().await, 200, "after {served} requests");
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tunnels(1.0).await;
}

/// RFC 7519 allows a decimal NumericDate, and the verifier accepts one:
/// the tunnel must still close when such a token expires.
#[tokio::test]
async fn a_token_with_a_decimal_exp_does_not_outlive_it_either() {
    let idp = common::idp::Idp::start().await;
    let backend = Backend::start().await;
    let relay = jwt_relay(&idp).await;
    let mut claims = idp.claims("r/robot-1", "robot");
    claims["exp"] = serde_json::json!(jsonwebtoken::get_current_timestamp() as f64 + 4.5);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), idp.sign("rsa-1", &claims)).unwrap();
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.transport = Transport::V2;
    cfg.auth.token_file = Some(file.path().to_owned());
    let _client = RelayClient::start(cfg);
    let http = relay.http();
    for want in [1.0, 0.0] {
        wait_gauge(
            &http,
            &relay.url,
            "relay_tunnels",
            want,
            Duration::from_secs(15),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gibibyte_each_way_costs_the_processes_bounded_memory() {
    use std::process::{Command, Stdio};
    const GIB: usize = 1 << 30;
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = Command::new(common::binary())
        .args(["server", "--listen", "127.0.0.1:0", "--no-tls"])
        .current_dir(dir.path())
        .env("HTTP_RELAY_AUTH__MODE", "none")
        .env("HTTP_RELAY_LIMITS__MAX_REQUEST_BODY", "2GiB")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = common::process::wait_for_line(&mut server, "listening on http://");
    let url = line[line.find("http://").unwrap()..].trim().to_owned();
    let server = common::process::Proc(server);
    let client = common::process::Proc(
        Command::new(common::binary())
            .args(["client", "--relay-url", &url, "--backend-name", "big"])
            .args(["--backend-url", &backend.url])
            .current_dir(dir.path())
            .env("HTTP_RELAY_TRANSPORT", "v2")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    wait_gauge(&http, &url, "relay_tunnels", 1.0, Duration::from_secs(15)).await;
    let ok = http
        .get(format!("{url}/client/big/lazy/1000"))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.bytes().await.unwrap().len(), 1000);
    let pids = [server.0.id(), client.0.id()];
    let before: Vec<u64> = pids
        .iter()
        .map(|p| common::process::rss_kib(*p).0)
        .collect();
    for p in pids {
        common::process::reset_peak(p);
    }

    let block = bytes::Bytes::from(pattern(64 * 1024, 64));
    let block_sum = block
        .iter()
        .fold(0u64, |s, b| s.wrapping_add(u64::from(*b)));
    let blocks = (GIB / block.len()) as u64;
    let want_sum = block_sum.wrapping_mul(blocks);

    // Download: 1 GiB made by the backend as it is sent.
    let resp = http
        .get(format!("{url}/client/big/lazy/{GIB}"))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    let (mut n, mut sum) = (0usize, 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.unwrap();
        n += chunk.len();
        sum = chunk.iter().fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
    }
    assert_eq!((n, sum), (GIB, want_sum), "download");

    // Upload: 1 GiB streamed in 64 KiB pieces, counted by the backend.
    let pieces =
        futures::stream::iter((0..blocks).map(move |_| Ok::<_, std::io::Error>(block.clone())));
    let resp = http
        .post(format!("{url}/client/big/count"))
        .body(reqwest::Body::wrap_stream(pieces))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.text().await.unwrap(),
        format!("{GIB} {want_sum}"),
        "upload"
    );

    // Each process grew by a few windows, not by the bodies (generous
    // bound for CI machines; the bench reports the figures).
    for (i, pid) in pids.iter().enumerate() {
        let growth_mib = common::process::rss_kib(*pid).1.saturating_sub(before[i]) / 1024;
        let who = ["server", "relay-client"][i];
        assert!(
            growth_mib < 64,
            "{who} peak RSS grew by {growth_mib} MiB for 1 GiB each way"
        );
    }
}

/// Opens a tunnel for `name` by hand, as a relay-client that speaks just
/// enough HTTP/2 to be connected: the upgrade, the preface read, SETTINGS
/// sent and acknowledged. Frames after that are the caller's.
async fn hand_made_tunnel(relay: &Relay, name: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let req = format!(
        "GET /server/connect?server={name} HTTP/1.1\r\nhost: relay\r\n\
         connection: upgrade\r\nupgrade: http-relay-v2\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 1, "closed before the 101");
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101 "), "{head:?}");
    // The relay-client times its token renewal by this clock.
    assert!(head.contains("\r\ndate: "), "{head:?}");
    let mut preface = [0u8; 24];
    s.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface[..], h2raw::PREFACE);
    s.write_all(&h2raw::frame(h2raw::SETTINGS, 0, 0, &[]))
        .await
        .unwrap();
    s.write_all(&h2raw::frame(h2raw::SETTINGS, h2raw::ACK, 0, &[]))
        .await
        .unwrap();
    s
}

/// A relay-client whose connection stays open but that no longer answers
/// the server's pings (a NAT that dropped the connection's state, a hung
/// machine) loses its tunnel within a ping interval and a ping timeout
/// (10 s each); one that answers keeps its tunnel, and so does one that
/// is heard from all along (on a busy slow link the answer waits behind
/// the data).
#[tokio::test]
async fn a_tunnel_whose_relay_client_stops_answering_pings_is_closed() {
    use tokio::io::AsyncWriteExt as _;
    let relay = Relay::start(|c| c.tls.enabled = false).await;
    let started = tokio::time::Instant::now();
    let mut silent = hand_made_tunnel(&relay, "robot-1").await;
    let live = hand_made_tunnel(&relay, "robot-2").await;
    let chatty = hand_made_tunnel(&relay, "robot-3").await;
    wait_tunnels(&relay, 3.0).await;

    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = answered.clone();
    let live = tokio::spawn(async move {
        let (mut rd, mut wr) = live.into_split();
        while let Ok(f) = h2raw::read_frame(&mut rd).await {
            if f.kind == h2raw::PING && f.flags & h2raw::ACK == 0 {
                let pong = h2raw::frame(h2raw::PING, h2raw::ACK, 0, &f.payload);
                if wr.write_all(&pong).await.is_err() {
                    break;
                }
                count.fetch_add(1, SeqCst);
            }
        }
    });
    // Sends a frame every 500 ms and never answers a ping.
    let chatty = tokio::spawn(async move {
        let (mut rd, mut wr) = chatty.into_split();
        let drain = async { while h2raw::read_frame(&mut rd).await.is_ok() {} };
        let talk = async {
            let ping = h2raw::frame(h2raw::PING, 0, 0, &[7; 8]);
            while wr.write_all(&ping).await.is_ok() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        };
        tokio::select! {
            () = drain => {}
            () = talk => {}
        }
    });

    let mut pings = 0;
    let end = tokio::time::timeout(Duration::from_secs(45), async {
        loop {
            match h2raw::read_frame(&mut silent).await {
                Ok(f) if f.kind == h2raw::PING && f.flags & h2raw::ACK == 0 => pings += 1,
                Ok(f) if f.kind == h2raw::GOAWAY => return "GOAWAY",
                Ok(_) => {}
                Err(_) => return "EOF",
            }
        }
    })
    .await
    .expect("a relay-client that answers no ping still connected after 45 s");
    let took = started.elapsed();
    assert!(pings >= 1, "closed ({end}) without a ping, after {took:?}");
    assert!(
        took >= Duration::from_secs(15),
        "closed ({end}) after {took:?}, before a ping could go unanswered"
    );
    wait_tunnels(&relay, 2.0).await;
    assert!(
        !live.is_finished(),
        "the relay-client that answers lost its tunnel"
    );
    assert!(
        answered.load(SeqCst) >= 1,
        "the live tunnel was never pinged"
    );
    assert!(
        !chatty.is_finished(),
        "the relay-client that is heard from lost its tunnel"
    );
    live.abort();
    chatty.abort();
}

/// A relay-client that says GOAWAY (it rotates its token, or stops) keeps
/// the streams it has, and new requests for its name go to its other
/// routes at once (here a v1 relay-client), not to a connection that
/// refuses them.
#[tokio::test]
async fn a_tunnel_that_said_goaway_takes_no_new_requests_and_keeps_its_streams() {
    use tokio::io::AsyncWriteExt as _;
    let backend = Backend::start().await;
    let relay = Relay::start(|c| c.tls.enabled = false).await;
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.transport = Transport::V1;
    let _v1 = RelayClient::start(cfg);
    let http = relay.http();
    let url = format!("{}/client/robot-1/hello", relay.url);
    eventually(|| async {
        let ok = http.get(&url).send().await.is_ok_and(|r| r.status() == 200);
        ok.then_some(())
    })
    .await;

    let tunnel = hand_made_tunnel(&relay, "robot-1").await;
    wait_tunnels(&relay, 1.0).await;
    let (mut rd, mut wr) = tunnel.into_split();
    // The tunnel is preferred: this request becomes a stream on it, which
    // the hand-made relay-client leaves unanswered for now.
    let held = tokio::spawn({
        let http = http.clone();
        let url = url.clone();
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    let stream = loop {
        let f = bounded(h2raw::read_frame(&mut rd)).await.unwrap();
        if f.kind == h2raw::HEADERS {
            break f.stream;
        }
    };
    let mut goaway = stream.to_be_bytes().to_vec();
    goaway.extend_from_slice(&0u32.to_be_bytes());
    wr.write_all(&h2raw::frame(h2raw::GOAWAY, 0, 0, &goaway))
        .await
        .unwrap();
    wait_tunnels(&relay, 0.0).await;
    for _ in 0..3 {
        let resp = bounded(http.get(&url).send()).await.unwrap();
        assert_eq!(resp.status(), 200, "a new request after the GOAWAY");
    }
    assert!(!held.is_finished(), "the stream in flight was cut");
    // The stream in flight still gets its answer.
    let mut head = h2raw::literal(":status", b"200");
    head.extend(h2raw::literal("content-length", b"0"));
    wr.write_all(&h2raw::frame(
        h2raw::HEADERS,
        h2raw::END_HEADERS | h2raw::END_STREAM,
        stream,
        &head,
    ))
    .await
    .unwrap();
    assert_eq!(bounded(held).await.unwrap().unwrap(), 200);
}

/// A stream the server opened as the relay-client's GOAWAY was on its way
/// (a token renewal: the new tunnel is up, the old one says GOAWAY) was
/// never processed, and says so: the last stream id of the GOAWAY is
/// below it. The request goes to the next tunnel instead of failing.
#[tokio::test]
async fn a_request_the_goaway_left_unprocessed_goes_to_the_next_tunnel() {
    use tokio::io::AsyncWriteExt as _;
    let backend = Backend::start().await;
    let relay = Relay::start(|c| c.tls.enabled = false).await;
    let old = hand_made_tunnel(&relay, "robot-1").await;
    wait_tunnels(&relay, 1.0).await;
    let (mut rd, mut wr) = old.into_split();
    let http = relay.http();
    let held = tokio::spawn({
        let url = format!("{}/client/robot-1/hello", relay.url);
        async move {
            let resp = http.get(url).send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    });
    let stream = loop {
        let f = bounded(h2raw::read_frame(&mut rd)).await.unwrap();
        if f.kind == h2raw::HEADERS {
            break f.stream;
        }
    };
    let _new = v2_client(&relay, "robot-1", &backend.url, 2.0).await;
    // GOAWAY, NO_ERROR, last stream id below the held request's.
    let mut goaway = (stream - 1).to_be_bytes().to_vec();
    goaway.extend_from_slice(&0u32.to_be_bytes());
    wr.write_all(&h2raw::frame(h2raw::GOAWAY, 0, 0, &goaway))
        .await
        .unwrap();
    let (status, text) = bounded(held).await.unwrap();
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("uri: /hello\n"), "{text}");
    assert_eq!(backend.hits.load(SeqCst), 1);
}

/// A request that arrives while a v2 relay-client redials (its tunnel
/// dropped, its new one not yet up) is held for the tunnel and then
/// served, not queued for v1 polls that never come (a 503 after
/// `timeouts.relay`). If no route comes back in that time, it still gets
/// its 503.
#[tokio::test]
async fn a_request_waits_for_a_redialling_relay_client() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.relay = Duration::from_secs(8);
    })
    .await;
    let http = relay.http();
    let url = format!("{}/client/robot-1/hello", relay.url);

    let tunnel = hand_made_tunnel(&relay, "robot-1").await;
    wait_tunnels(&relay, 1.0).await;
    drop(tunnel);
    wait_tunnels(&relay, 0.0).await;

    let held = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!held.is_finished(), "answered without a relay-client");
    let _client = v2_client(&relay, "robot-1", &backend.url, 1.0).await;
    assert_eq!(bounded(held).await.unwrap().unwrap(), 200);

    // Nobody comes back for robot-2: a 503 once `timeouts.relay` passed.
    let tunnel = hand_made_tunnel(&relay, "robot-2").await;
    wait_tunnels(&relay, 2.0).await;
    drop(tunnel);
    wait_tunnels(&relay, 1.0).await;
    let started = tokio::time::Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        http.get(format!("{}/client/robot-2/hello", relay.url))
            .send(),
    )
    .await
    .expect("no answer 20 s after `timeouts.relay` (8 s)")
    .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(
        started.elapsed() >= Duration::from_secs(7),
        "{:?}",
        started.elapsed()
    );
}

/// One name's relay token opens at most `limits.max_tunnels_per_backend`
/// connections at once (429 beyond, `Retry-After` given); a place frees
/// when a connection ends, and other names are not affected.
#[tokio::test]
async fn one_names_tunnels_are_capped() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.limits.max_tunnels_per_backend = 2;
    })
    .await;
    let refused = || async {
        let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
        s.write_all(
            b"GET /server/connect?server=robot-1 HTTP/1.1\r\nhost: relay\r\n\
              connection: upgrade\r\nupgrade: http-relay-v2\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = vec![0u8; 512];
        let n = bounded(s.read(&mut head)).await.unwrap();
        String::from_utf8_lossy(&head[..n]).to_ascii_lowercase()
    };
    let first = hand_made_tunnel(&relay, "robot-1").await;
    let _second = hand_made_tunnel(&relay, "robot-1").await;
    wait_tunnels(&relay, 2.0).await;
    let head = refused().await;
    assert!(head.starts_with("http/1.1 429 "), "{head}");
    assert!(head.contains("retry-after: "), "{head}");
    assert!(head.contains("max_tunnels_per_backend"), "{head}");
    let _other = hand_made_tunnel(&relay, "robot-2").await;
    drop(first);
    wait_tunnels(&relay, 2.0).await;
    let _third = hand_made_tunnel(&relay, "robot-1").await;
}

/// A user-client may send an empty POST without `content-length`: over
/// HTTP/2 (END_STREAM on its HEADERS) or HTTP/1.1 (no framing header at
/// all). The backend behind the tunnel sees `content-length: 0` either
/// way, so one that insists on the header (411) does not refuse it.
#[tokio::test]
async fn an_empty_post_reaches_the_backend_with_its_length() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (relay, _client, _backend) = v2_stack(|c| c.tls.enabled = false).await;

    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    s.write_all(
        b"POST /client/robot-1/empty HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    bounded(s.read_to_end(&mut answer)).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text.contains("\nmethod: POST\n"), "{text}");
    assert!(text.contains("\ncontent-length: 0\n"), "HTTP/1.1: {text}");

    let (mut rd, mut wr) = h2raw::connect(relay.addr).await;
    let post = h2raw::post("/client/robot-1/empty", "localhost");
    wr.write_all(&h2raw::request(1, &post)).await.unwrap();
    let mut body = Vec::new();
    loop {
        let f = bounded(h2raw::read_frame(&mut rd)).await.unwrap();
        if f.stream != 1 {
            continue;
        }
        assert_ne!(f.kind, h2raw::RST_STREAM, "the request was reset");
        if f.kind == h2raw::DATA {
            body.extend_from_slice(&f.payload);
        }
        if f.flags & h2raw::END_STREAM != 0 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("method: POST\n"), "{text}");
    assert!(text.contains("\ncontent-length: 0\n"), "HTTP/2: {text}");
}

/// A GET with a body of unknown length (chunked) reaches an HTTP/1.1
/// backend with its body: hyper would send it bodiless without a
/// declared framing.
#[tokio::test]
async fn a_chunked_get_body_reaches_the_backend() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (relay, _client, _backend) = v2_stack(|_| {}).await;
    let mut s = relay.tls_connect().await;
    s.write_all(
        b"GET /client/robot-1/echo HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\
          transfer-encoding: chunked\r\n\r\n3\r\nque\r\n2\r\nry\r\n0\r\n\r\n",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let _ = bounded(s.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("\n\nquery"), "{text}");
}

/// Rounds of cancelled streams that a connection must live through; h2's
/// stock limit closed it within 5 to 16 of them.
const CANCEL_ROUNDS: usize = 30;
/// Streams cancelled at once in each round: more than the 50 reset
/// streams h2 remembers, and, with the canary, fewer than the 200
/// concurrent streams the test backend's HTTP/2 server takes.
const CANCELLED_AT_ONCE: usize = 150;

/// A stream of another user through the tunnel (an event every 20 ms),
/// read all along: its task ends, with what ended the stream, as soon as
/// it is cut, however many events it had buffered, or when no event came
/// for 5 s.
async fn canary(relay: &Relay) -> tokio::task::JoinHandle<String> {
    let resp = relay
        .http_unlimited()
        .get(format!("{}/client/robot-1/forever?delay_ms=20", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = resp.bytes_stream();
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), events.next()).await {
                Ok(Some(Ok(_))) => {}
                other => return format!("{other:?}"),
            }
        }
    })
}

async fn assert_alive(
    canary: tokio::task::JoinHandle<String>,
    round: usize,
) -> tokio::task::JoinHandle<String> {
    assert!(
        !canary.is_finished(),
        "the canary stream ended in round {round}: {:?}",
        canary.await
    );
    canary
}

/// Users that cancel downloads while their bytes are crossing the tunnel
/// do not wear it out. h2 answers each DATA frame that arrives for a
/// stream it reset and no longer remembers (it remembers 50, for a
/// second) with a reset of its own, and by default closes the connection
/// (GOAWAY `ENHANCE_YOUR_CALM`) after 1,024 of those in its life: every
/// user of the backend would lose their streams to a few users closing
/// busy connections (`docs/transport-v2.md`, "Cancellation").
#[tokio::test(flavor = "multi_thread")]
async fn cancelled_downloads_do_not_wear_out_the_tunnel() {
    let (relay, _client, backend) = v2_stack(|_| {}).await;
    cancel_downloads_in_rounds(&relay, &backend).await;
}

/// The same for the relay-client's one HTTP/2 connection to its backend
/// (`backend_http2`, as for gRPC), which carries every user's calls: the
/// DATA the backend had sent for cancelled calls must not close it.
#[tokio::test(flavor = "multi_thread")]
async fn cancelled_downloads_do_not_wear_out_an_http2_backend_connection() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.transport = Transport::V2;
    cfg.backend_http2 = true;
    let _client = RelayClient::start(cfg);
    wait_tunnels(&relay, 1.0).await;
    cancel_downloads_in_rounds(&relay, &backend).await;
}

async fn cancel_downloads_in_rounds(relay: &Relay, backend: &Backend) {
    let mut canary = canary(relay).await;
    for round in 0..CANCEL_ROUNDS {
        let http = relay.http2();
        let url = format!("{}/client/robot-1/lazy/{}", relay.url, 1u64 << 30);
        let started =
            futures::future::join_all((0..CANCELLED_AT_ONCE).map(|_| http.get(&url).send())).await;
        let readers: Vec<_> = started
            .into_iter()
            .map(|r| {
                let mut body = r.unwrap().bytes_stream();
                tokio::spawn(async move { while let Some(Ok(_)) = body.next().await {} })
            })
            .collect();
        // Every stream is moving when all of them are cancelled at once.
        tokio::time::sleep(Duration::from_millis(150)).await;
        for r in &readers {
            r.abort();
        }
        drop(http);
        for r in readers {
            let _ = r.await;
        }
        canary = assert_alive(canary, round).await;
    }
    common::observe::within(
        Duration::from_secs(10),
        "cancelled backend streams dropped",
        || async { (backend.open_streams.load(SeqCst) == 1).then_some(()) },
    )
    .await;
}
