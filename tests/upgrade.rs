//! 101 upgrades: a real WebSocket through the relay (TLS to the relay,
//! relay-client to a tungstenite backend), and either side going away.

// tungstenite fixes the handshake callback's (large) error type.
#![allow(clippy::result_large_err)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Relay, RelayClient, bounded};
use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// A WebSocket backend. `/echo` echoes; `/drop` closes the TCP connection
/// after the first message. Every connection's end is reported.
struct WsBackend {
    url: String,
    ended: mpsc::UnboundedReceiver<String>,
    _task: tokio::task::JoinHandle<()>,
}

impl WsBackend {
    async fn start() -> WsBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, ended) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let path = Arc::new(std::sync::Mutex::new(String::new()));
                    let seen = path.clone();
                    let cb = move |req: &Request, resp: Response| {
                        *seen.lock().unwrap() = req.uri().path().to_owned();
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else {
                        return;
                    };
                    let path = path.lock().unwrap().clone();
                    while let Some(Ok(msg)) = ws.next().await {
                        if path == "/drop" {
                            break; // drops the TCP stream without a close frame
                        }
                        if msg.is_text() || msg.is_binary() {
                            if ws.send(msg).await.is_err() {
                                break;
                            }
                        } else if msg.is_close() {
                            // tungstenite answered the close already.
                            let _ = ws.flush().await;
                        }
                    }
                    drop(ws);
                    let _ = tx.send(path);
                });
            }
        });
        WsBackend {
            url,
            ended,
            _task: task,
        }
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Opens a WebSocket to `path` through the relay over TLS (HTTP/1.1).
async fn connect_ws(relay: &Relay, path: &str) -> Ws {
    let tls = http_relay::tls::client_config(Some(&common::certs().ca_cert)).unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = connector.connect(name, tcp).await.unwrap();
    let url = format!("wss://localhost:{}{path}", relay.addr.port());
    let (ws, resp) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws
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

    ws.close(None).await.unwrap();
    // The backend's close reply comes back through the relay.
    let reply = bounded(ws.next()).await;
    assert!(
        matches!(reply, Some(Ok(Message::Close(_))) | None),
        "{reply:?}"
    );
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
