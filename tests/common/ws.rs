//! A tungstenite WebSocket backend for the upgrade and tracing tests.

// tungstenite fixes the handshake callback's (large) error type.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use futures::{SinkExt as _, StreamExt as _};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// A WebSocket backend. `/echo` echoes; `/drop` closes the TCP connection
/// after the first message. Every connection's end is reported.
pub struct WsBackend {
    pub url: String,
    pub ended: mpsc::UnboundedReceiver<String>,
    _task: tokio::task::JoinHandle<()>,
}

impl WsBackend {
    pub async fn start() -> WsBackend {
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
