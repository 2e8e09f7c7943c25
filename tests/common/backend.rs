//! A real hyper backend for the tests (HTTP/1.1 and h2c on one port).
//!
//! Routes:
//! - `/status/<code>`: answers that status.
//! - `/redirect`: 302 to `/elsewhere` (must be passed through).
//! - `/multi`: repeated `set-cookie` values.
//! - `/bytes/<n>`: `n` bytes of [`super::pattern`] with seed `n`, streamed.
//! - `/hash`: SHA-256 of the request body.
//! - `/lazy/<n>`: `n` bytes made as they are sent (64 KiB blocks of
//!   [`super::pattern`]), for bodies too large to hold in memory.
//! - `/count`: the request body's length and a checksum, read as it
//!   streams in: `<bytes> <sum of all bytes mod 2^64>`.
//! - `/sse?n=N&delay_ms=D`: N server-sent events, D ms apart.
//! - `/forever?delay_ms=D`: server-sent events, D ms apart (default 200),
//!   until the body is dropped.
//! - `/slow?ms=M`: answers after M ms.
//! - `/hang`: never answers (counted in [`Backend::hanging`]).
//! - anything else: a description of the request as text lines
//!   (`method`, `uri`, `host`, each header, `body-len`), then the body.
//!
//! Every answer of the last kind carries `x-backend: <label>` (`test`
//! unless started with [`Backend::start_labeled`]), so tests with several
//! backends can tell which one answered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::task::JoinHandle;

type Body = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(b.into()).boxed()
}

/// A running test backend.
pub struct Backend {
    pub addr: SocketAddr,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Requests that reached the backend.
    pub hits: Arc<AtomicUsize>,
    /// `/sse`, `/forever` and `/lazy` bodies currently being sent (a dropped body
    /// decrements it).
    pub open_streams: Arc<AtomicUsize>,
    /// `/hang` handlers currently waiting (a dropped handler decrements it).
    pub hanging: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the handlers of one backend share.
#[derive(Clone)]
struct Shared {
    label: Arc<str>,
    open: Arc<AtomicUsize>,
    hanging: Arc<AtomicUsize>,
}

impl Backend {
    pub async fn start() -> Backend {
        Self::start_labeled("test").await
    }

    /// A backend whose described requests carry `x-backend: <label>`.
    pub async fn start_labeled(label: &str) -> Backend {
        Self::start_with(label, None).await
    }

    /// The same backend behind TLS (`url` is then `https://localhost:<port>`),
    /// for measuring a direct TLS connection against a relayed one.
    pub async fn start_tls(tls: Arc<rustls::ServerConfig>) -> Backend {
        Self::start_with("test", Some(tokio_rustls::TlsAcceptor::from(tls))).await
    }

    async fn start_with(label: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Backend {
        let scheme = if tls.is_some() {
            "https://localhost"
        } else {
            "http://127.0.0.1"
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let open_streams = Arc::new(AtomicUsize::new(0));
        let hanging = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let shared = Shared {
            label: Arc::from(label),
            open: open_streams.clone(),
            hanging: hanging.clone(),
        };
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let (counter, shared, tls) = (counter.clone(), shared.clone(), tls.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        handle(req, shared.clone())
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                                .await;
                        }
                        Some(tls) => {
                            let Ok(stream) = tls.accept(tcp).await else {
                                return;
                            };
                            let _ = builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await;
                        }
                    }
                });
            }
        });
        Backend {
            addr,
            url: format!("{scheme}:{}", addr.port()),
            hits,
            open_streams,
            hanging,
            task,
        }
    }
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

/// Counts an open stream (or a waiting handler) while alive.
struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn new(counter: Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        OpenGuard(counter)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `n` server-sent events (`None`: endless), `delay` apart, counted in
/// `open` until the body ends or is dropped.
fn events(n: Option<u64>, delay: Duration, open: Arc<AtomicUsize>) -> Response<Body> {
    let guard = Arc::new(OpenGuard::new(open));
    let stream = futures::stream::unfold(0u64, move |i| {
        let _alive = guard.clone();
        async move {
            if n.is_some_and(|n| i >= n) {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(delay).await;
            }
            let frame = Frame::data(Bytes::from(format!("data: event {i}\n\n")));
            Some((Ok::<_, Infallible>(frame), i + 1))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(stream).boxed())
        .unwrap()
}

async fn handle(req: Request<Incoming>, shared: Shared) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    let resp = if let Some(code) = path.strip_prefix("/status/") {
        let code = code.parse().unwrap_or(500);
        let mut r = Response::new(full(format!("status {code}")));
        *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r
    } else if path == "/redirect" {
        Response::builder()
            .status(302)
            .header("location", "/elsewhere")
            .body(full("moved"))
            .unwrap()
    } else if path == "/origin-wide" {
        Response::builder()
            .header("set-cookie", "relay_token=chosen-by-the-backend; Path=/")
            .header("set-cookie", "a=1; Path=/")
            .header("service-worker-allowed", "/")
            .header("clear-site-data", "\"cookies\"")
            .header("nel", r#"{"report_to":"g","max_age":31536000,"success_fraction":1.0}"#)
            .header("report-to", r#"{"group":"g","max_age":31536000,"endpoints":[{"url":"https://collector.example/"}]}"#)
            .header("alt-svc", r#"h2="elsewhere.example:443"; ma=86400"#)
            .header("strict-transport-security", "max-age=31536000; includeSubDomains")
            .header("accept-ch", "Sec-CH-UA-Model, Sec-CH-UA-Platform-Version")
            .header("critical-ch", "Sec-CH-UA-Model")
            .body(full("origin-wide"))
            .unwrap()
    } else if path == "/multi" {
        Response::builder()
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            .body(full("multi"))
            .unwrap()
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        let n: usize = n.parse().unwrap_or(0);
        let data = Bytes::from(super::pattern(n, n as u64));
        let chunks: Vec<Result<Frame<Bytes>, Infallible>> = (0..n)
            .step_by(64 * 1024)
            .map(|i| Ok(Frame::data(data.slice(i..(i + 64 * 1024).min(n)))))
            .collect();
        Response::new(StreamBody::new(futures::stream::iter(chunks)).boxed())
    } else if let Some(n) = path.strip_prefix("/lazy/") {
        let n: usize = n.parse().unwrap_or(0);
        let block = Bytes::from(super::pattern(64 * 1024, 64));
        // Counted as an open stream until the body is over or dropped.
        let open = OpenGuard::new(shared.open);
        let stream = futures::stream::unfold(0usize, move |sent| {
            let block = block.clone();
            let _open = &open;
            async move {
                (sent < n).then(|| {
                    let len = block.len().min(n - sent);
                    (
                        Ok::<_, Infallible>(Frame::data(block.slice(..len))),
                        sent + len,
                    )
                })
            }
        });
        Response::new(StreamBody::new(stream).boxed())
    } else if path == "/count" {
        let mut body = req.into_body();
        let (mut n, mut sum) = (0u64, 0u64);
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                n += data.len() as u64;
                sum = data.iter().fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
            }
        }
        Response::new(full(format!("{n} {sum}")))
    } else if path == "/hash" {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        Response::new(full(super::sha256_hex(&body)))
    } else if path == "/sse" || path == "/forever" {
        let n = (path == "/sse").then(|| query(&req, "n").unwrap_or(3));
        let delay = Duration::from_millis(query(&req, "delay_ms").unwrap_or(200));
        events(n, delay, shared.open)
    } else if path == "/slow" {
        let ms = query(&req, "ms").unwrap_or(500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Response::new(full("slow"))
    } else if path == "/hang" {
        // Dropped with the handler future when the caller goes away.
        let _waiting = OpenGuard::new(shared.hanging);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Response::new(full("late"))
    } else {
        describe(req, &shared.label).await
    };
    Ok(resp)
}

/// The request as text: one `key: value` line each, a blank line, the body.
async fn describe(req: Request<Incoming>, label: &str) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut text = format!("method: {}\nuri: {}\n", parts.method, parts.uri);
    for (name, value) in &parts.headers {
        text.push_str(&format!(
            "{name}: {}\n",
            value.to_str().unwrap_or("<binary>")
        ));
    }
    text.push_str(&format!("body-len: {}\n\n", body.len()));
    let mut out = text.into_bytes();
    out.extend_from_slice(&body);
    Response::builder()
        .header("x-backend", label)
        .body(full(out))
        .unwrap()
}

/// A backend that writes its answers by hand, for what no HTTP library
/// would send (a body cut short, odd framing or headers): `serve` gets
/// each accepted connection. Returns its URL.
pub async fn raw_backend<F, Fut>(serve: F) -> String
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp));
        }
    });
    url
}
