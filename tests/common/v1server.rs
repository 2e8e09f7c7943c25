//! A minimal v1-only relay server that behaves like the fleet's Go server
//! where our peers must cope with it (`PROTOCOL.md`, "What the Go peers
//! actually send"). It has no `/server/connect`: v2 is not offered.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use http_relay::proto::{HttpHeader, HttpRequest, HttpResponse};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message as _;
use tokio::sync::mpsc;

use super::bounded;

type Chunks = Arc<Mutex<HashMap<String, mpsc::UnboundedSender<HttpResponse>>>>;

/// A minimal v1 server: one queue of requests, chunks by id, no upgrades.
/// User-client requests are relayed the way the Go server does it
/// (`PROTOCOL.md`, "What the Go peers actually send"): request headers go
/// out with canonical names, the response head is flushed on the first
/// chunk, trailers of the chunks follow the body, and `grpc-*` headers of
/// the first chunk are copied into trailers only when their name starts
/// with `Grpc-`, case-sensitively.
pub struct V1Server {
    pub url: String,
    shared: Arc<V1Shared>,
    _task: tokio::task::JoinHandle<()>,
}

struct V1Shared {
    queue: mpsc::Sender<HttpRequest>,
    pending: tokio::sync::Mutex<mpsc::Receiver<HttpRequest>>,
    chunks: Chunks,
    next_id: std::sync::atomic::AtomicU64,
    /// What `/server/connect` gets: as unknown as any other path, or what
    /// an ingress in front of the server answers an upgrade it cannot pass.
    connect: Mutex<StatusCode>,
    connect_calls: std::sync::atomic::AtomicUsize,
    /// Chunk posts still to be answered 503 without being looked at.
    unavailable_posts: std::sync::atomic::AtomicUsize,
    /// Answers of the next `/server/requeststream` calls, in order.
    stream: Mutex<std::collections::VecDeque<StreamAnswer>>,
    /// Shutting down: every poll gets 408 at once, as from the Go server.
    shutting_down: std::sync::atomic::AtomicBool,
    /// Polls received so far.
    polls: std::sync::atomic::AtomicUsize,
}

/// An answer of the v1 server to a `/server/requeststream` call.
pub enum StreamAnswer {
    /// 200 with these bytes of the user's.
    Bytes(&'static [u8]),
    /// The user's bytes taken off the queue, and the answer cut short:
    /// the connection ends after part of the body.
    Lost(&'static [u8]),
    /// 410: the request is over.
    Gone,
}

type V1Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

impl V1Server {
    pub async fn start() -> V1Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (queue, rx) = mpsc::channel::<HttpRequest>(16);
        let shared = Arc::new(V1Shared {
            queue,
            pending: tokio::sync::Mutex::new(rx),
            chunks: Arc::default(),
            next_id: Default::default(),
            connect: Mutex::new(StatusCode::GONE),
            connect_calls: Default::default(),
            unavailable_posts: Default::default(),
            stream: Default::default(),
            shutting_down: Default::default(),
            polls: Default::default(),
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| v1_handle(req, s.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        V1Server {
            url,
            shared,
            _task: task,
        }
    }

    /// A relay-client config for backend `robot` of this server.
    pub fn client_config(&self, backend_url: &str) -> http_relay::config::ClientConfig {
        http_relay::config::ClientConfig {
            relay_url: self.url.clone(),
            backend_name: "robot".into(),
            backend_url: backend_url.to_owned(),
            ..Default::default()
        }
    }

    /// Answers `/server/connect` with `status` from now on.
    pub fn answer_connect(&self, status: StatusCode) {
        *self.shared.connect.lock().unwrap() = status;
    }

    /// Answers the next `n` chunk posts 503 (as an ingress without an
    /// upstream does), without taking them in.
    pub fn refuse_posts(&self, n: usize) {
        self.shared
            .unavailable_posts
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// Answers the next `/server/requeststream` calls with `answers`; the
    /// calls after them wait 1 s and get 200 without bytes.
    pub fn stream_answers(&self, answers: Vec<StreamAnswer>) {
        self.shared.stream.lock().unwrap().extend(answers);
    }

    /// Answers every poll 408 at once from now on, as the Go server does
    /// while it shuts down.
    pub fn shut_down(&self) {
        self.shared
            .shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Polls received so far.
    pub fn polls(&self) -> usize {
        self.shared.polls.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Calls of `/server/connect` so far.
    pub fn connect_calls(&self) -> usize {
        self.shared
            .connect_calls
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Queues a request and returns the receiver of its chunks.
    pub async fn send(&self, req: HttpRequest) -> mpsc::UnboundedReceiver<HttpResponse> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared
            .chunks
            .lock()
            .unwrap()
            .insert(req.id.clone().unwrap(), tx);
        self.shared.queue.send(req).await.unwrap();
        rx
    }
}

fn v1_body(bytes: impl Into<Bytes>) -> V1Body {
    Full::new(bytes.into()).boxed()
}

async fn v1_handle(
    req: Request<Incoming>,
    s: Arc<V1Shared>,
) -> Result<Response<V1Body>, Infallible> {
    let status_only = |st: StatusCode| {
        let mut r = Response::new(v1_body(Bytes::new()));
        *r.status_mut() = st;
        r
    };
    Ok(match req.uri().path() {
        "/server/request" => {
            s.polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if s.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(status_only(StatusCode::REQUEST_TIMEOUT));
            }
            let next = tokio::time::timeout(Duration::from_secs(1), async {
                s.pending.lock().await.recv().await
            })
            .await;
            match next {
                Ok(Some(r)) => Response::new(v1_body(r.encode_to_vec())),
                _ => status_only(StatusCode::REQUEST_TIMEOUT),
            }
        }
        "/server/response"
            if s.unavailable_posts
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok() =>
        {
            status_only(StatusCode::SERVICE_UNAVAILABLE)
        }
        "/server/response" => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let chunk = HttpResponse::decode(body).unwrap();
            let id = chunk.id.clone().unwrap_or_default();
            let sender = s.chunks.lock().unwrap().get(&id).cloned();
            match sender {
                Some(tx) if tx.send(chunk).is_ok() => Response::new(v1_body("ok")),
                _ => status_only(StatusCode::BAD_REQUEST),
            }
        }
        "/server/requeststream" => {
            let next = s.stream.lock().unwrap().pop_front();
            match next {
                Some(StreamAnswer::Bytes(b)) => Response::new(v1_body(b)),
                Some(StreamAnswer::Lost(b)) => {
                    // More declared than sent: hyper closes the connection.
                    // (A body of unknown size: a known one would have to
                    // match the header.)
                    let frames = futures::stream::iter([Ok::<_, Infallible>(
                        hyper::body::Frame::data(Bytes::from_static(b)),
                    )]);
                    let mut r = Response::new(http_body_util::StreamBody::new(frames).boxed());
                    r.headers_mut()
                        .insert(http::header::CONTENT_LENGTH, (b.len() + 100).into());
                    r
                }
                Some(StreamAnswer::Gone) => status_only(StatusCode::GONE),
                None => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Response::new(v1_body(Bytes::new()))
                }
            }
        }
        "/server/connect" => {
            s.connect_calls
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let status = *s.connect.lock().unwrap();
            status_only(status)
        }
        p if p.starts_with("/server/") => status_only(StatusCode::GONE),
        _ => go_user_request(req, &s).await,
    })
}

/// Go's `CanonicalMIMEHeaderKey`, as the Go server's `r.Header` holds it.
fn go_canonical(name: &str) -> String {
    let mut upper = true;
    name.chars()
        .map(|c| {
            let c2 = if upper {
                c.to_ascii_uppercase()
            } else {
                c.to_ascii_lowercase()
            };
            upper = c == '-';
            c2
        })
        .collect()
}

/// The Go server's user-client path (routing by `X-Server-Name`).
async fn go_user_request(req: Request<Incoming>, s: &V1Shared) -> Response<V1Body> {
    let (parts, body) = req.into_parts();
    let backend = parts.headers["x-server-name"].to_str().unwrap().to_owned();
    let body = body.collect().await.unwrap().to_bytes();
    let n = s.next_id.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let id = format!("{backend}:{n:032x}");
    let header = parts
        .headers
        .iter()
        .map(|(k, v)| HttpHeader::new(go_canonical(k.as_str()), v.as_bytes()))
        .collect();
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.chunks.lock().unwrap().insert(id.clone(), tx);
    s.queue
        .send(HttpRequest {
            id: Some(id),
            method: Some(parts.method.to_string()),
            host: Some("relay.example".into()),
            url: Some(format!("http://invalid{}", parts.uri.path()).into()),
            header,
            body: Some(body),
        })
        .await
        .unwrap();
    let first = bounded(rx.recv()).await.unwrap();
    let mut resp = Response::builder().status(first.status_code.unwrap() as u16);
    for h in &first.header {
        resp = resp.header(h.name.as_deref().unwrap(), h.value.as_deref().unwrap());
    }
    // The head goes out now (Go flushes after the first chunk's body);
    // body and trailers follow as chunks arrive.
    let (frames, frames_rx) = mpsc::channel::<Result<hyper::body::Frame<Bytes>, Infallible>>(16);
    tokio::spawn(async move {
        let mut trailers = http::HeaderMap::new();
        let mut chunk = Some(first.clone());
        while let Some(c) = chunk.take() {
            if let Some(b) = c.body.clone().filter(|b| !b.is_empty()) {
                let _ = frames.send(Ok(hyper::body::Frame::data(b))).await;
            }
            for t in &c.trailer {
                trailers.append(
                    http::HeaderName::from_bytes(t.name.as_deref().unwrap()).unwrap(),
                    http::HeaderValue::from_bytes(t.value.as_deref().unwrap()).unwrap(),
                );
            }
            if c.eof != Some(true) {
                chunk = rx.recv().await;
            }
        }
        for h in &first.header {
            if h.name.as_deref().unwrap().starts_with(b"Grpc-") {
                trailers.append(
                    http::HeaderName::from_bytes(h.name.as_deref().unwrap()).unwrap(),
                    http::HeaderValue::from_bytes(h.value.as_deref().unwrap()).unwrap(),
                );
            }
        }
        if !trailers.is_empty() {
            let _ = frames
                .send(Ok(hyper::body::Frame::trailers(trailers)))
                .await;
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(frames_rx);
    resp.body(http_body_util::StreamBody::new(stream).boxed())
        .unwrap()
}
