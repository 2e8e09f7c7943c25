//! 101 upgrades: a real WebSocket through the relay (TLS to the relay,
//! relay-client to a tungstenite backend), and either side going away.

mod common;

use std::time::Duration;

use common::ws::WsBackend;
use common::{Relay, RelayClient, bounded};
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Opens a WebSocket to `path` through the relay over TLS (HTTP/1.1).
async fn connect_ws(relay: &Relay, path: &str) -> Ws {
    let (ws, resp) = try_ws(relay, path).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

type Handshake = Result<
    (
        Ws,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
>;

/// A WebSocket handshake to `path` through the relay over TLS.
async fn try_ws(relay: &Relay, path: &str) -> Handshake {
    let stream = relay.tls_connect().await;
    let url = format!("wss://localhost:{}{path}", relay.addr.port());
    tokio_tungstenite::client_async(url, stream).await
}

/// An open WebSocket counts against `limits.max_requests_per_backend`
/// until it closes, on both transports: sessions cannot pile up past the
/// limit once their 101 has been sent.
#[tokio::test]
async fn open_websockets_count_against_the_per_backend_limit() {
    for transport in [
        http_relay::config::Transport::V1,
        http_relay::config::Transport::V2,
    ] {
        let mut backend = WsBackend::start().await;
        let relay = Relay::start(|c| c.limits.max_requests_per_backend = 1).await;
        let mut cfg = common::client_config(&relay, "ws", &backend.url);
        cfg.transport = transport;
        let _client = RelayClient::start(cfg);
        relay.wait_for_backend("ws").await;
        let mut first = bounded(connect_ws(&relay, "/client/ws/echo")).await;
        first.send(Message::text("one")).await.unwrap();
        assert_eq!(
            bounded(first.next()).await.unwrap().unwrap(),
            Message::text("one")
        );
        // A second session for the name is refused while the first is open.
        match try_ws(&relay, "/client/ws/echo").await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 503, "{transport:?}");
            }
            other => panic!(
                "{transport:?}: second session not refused: {:?}",
                other.map(|r| r.1)
            ),
        }
        // Once the first ends, its place is free again.
        first.close(None).await.unwrap();
        bounded(backend.ended.recv()).await;
        let mut again = common::eventually(|| async {
            try_ws(&relay, "/client/ws/echo").await.ok().map(|r| r.0)
        })
        .await;
        again.send(Message::text("two")).await.unwrap();
        assert_eq!(
            bounded(again.next()).await.unwrap().unwrap(),
            Message::text("two")
        );
    }
}

#[tokio::test]
async fn websocket_echo_text_binary_and_close() {
    let mut backend = WsBackend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "ws", &backend.url).await;
    let mut ws = bounded(connect_ws(&relay, "/client/ws/echo")).await;

    for i in 0..5 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(
            bounded(ws.next()).await.unwrap().unwrap(),
            Message::text(text)
        );
    }
    let blob: Vec<u8> = common::pattern(300 * 1024, 3);
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(
        bounded(ws.next()).await.unwrap().unwrap(),
        Message::binary(blob)
    );

    ws.close(Some(CloseFrame {
        code: CloseCode::Library(4321),
        reason: "done here".into(),
    }))
    .await
    .unwrap();
    // The backend answers the close with the same code and reason; that
    // frame crosses the relay before the connection ends.
    match bounded(ws.next()).await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Library(4321));
            assert_eq!(frame.reason.as_str(), "done here");
        }
        other => panic!("expected the backend's close frame, got {other:?}"),
    }
    assert_eq!(bounded(backend.ended.recv()).await.unwrap(), "/echo");
}

#[tokio::test]
async fn backend_going_away_ends_the_user_connection() {
    let backend = WsBackend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "ws", &backend.url).await;
    let mut ws = bounded(connect_ws(&relay, "/client/ws/drop")).await;
    ws.send(Message::text("bye")).await.unwrap();
    // Within seconds, the user side sees the end (an error or the end of
    // the stream, as there was no close frame).
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        end.is_ok(),
        "user connection still open 10 s after the backend left"
    );
}

#[tokio::test]
async fn user_going_away_ends_the_backend_connection() {
    let mut backend = WsBackend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "ws", &backend.url).await;
    let mut ws = bounded(connect_ws(&relay, "/client/ws/echo")).await;
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(
        bounded(ws.next()).await.unwrap().unwrap(),
        Message::text("ping")
    );
    drop(ws); // TCP closed without a close frame
    let ended = tokio::time::timeout(Duration::from_secs(10), backend.ended.recv()).await;
    assert_eq!(
        ended.ok().flatten().as_deref(),
        Some("/echo"),
        "backend still connected 10 s after the user left"
    );
}

#[tokio::test]
async fn upgraded_bytes_do_not_wait_for_the_flush_interval() {
    // A flush interval far beyond the wait below: an echo that waited for
    // it would not arrive in time. Every read of an upgraded connection
    // is sent at once.
    let backend = WsBackend::start().await;
    let relay = Relay::start(|_| {}).await;
    let mut cfg = common::client_config(&relay, "ws", &backend.url);
    cfg.flush_interval = Duration::from_secs(50);
    let _client = RelayClient::start(cfg);
    relay.wait_for_backend("ws").await;
    let mut ws = bounded(connect_ws(&relay, "/client/ws/echo")).await;
    for i in 0..3 {
        let text = format!("typed {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echo = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo held back by the flush interval");
        assert_eq!(echo.unwrap().unwrap(), Message::text(text));
    }
}
