//! Shared harness of the integration tests: the relay server and
//! relay-clients in-process on 127.0.0.1 port 0, a hyper test backend,
//! development certificates and HTTP clients that trust them.
#![allow(dead_code)]

pub mod backend;
pub mod grpc;
pub mod h2raw;
pub mod idp;
pub mod observe;
pub mod otlp;
pub mod pebble;
pub mod pki;
pub mod process;
pub mod v1server;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use http_relay::config::{ClientConfig, ServerConfig};
use http_relay::tls::DevCerts;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound of any wait in a test, so nothing hangs forever.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Development certificates shared by every test of one test binary.
pub fn certs() -> &'static DevCerts {
    static CERTS: OnceLock<(tempfile::TempDir, DevCerts)> = OnceLock::new();
    &CERTS
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let certs = DevCerts::in_dir(dir.path());
            certs.ensure().expect("dev certs");
            (dir, certs)
        })
        .1
}

/// Installs a test log subscriber once (`RUST_LOG` to see it).
pub fn init_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
    });
}

/// Runs `fut` with the test timeout.
pub async fn bounded<T>(fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_TIMEOUT, fut)
        .await
        .expect("test step timed out")
}

/// Asserts that `resp`, an answer whose backend broke off, is never
/// presented as complete: a 200 head, then a body that fails.
pub async fn assert_cut_off(resp: reqwest::Response) {
    assert_eq!(resp.status(), 200);
    let body = bounded(resp.bytes()).await;
    assert!(
        body.is_err(),
        "a short body was presented as complete: {:?} bytes",
        body.map(|b| b.len())
    );
}

/// Retries `attempt` every 20 ms until it yields `Some`, within the test
/// timeout.
pub async fn eventually<T, F, Fut>(mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    bounded(async {
        loop {
            if let Some(v) = attempt().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// A relay server running in-process.
pub struct Relay {
    pub addr: SocketAddr,
    /// `https://127.0.0.1:<port>` (or `http://` with TLS off).
    pub url: String,
    pub tls: bool,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), http_relay::server::ServerError>>>,
}

/// The server config tests start from: dev certificates, short poll.
pub fn server_config() -> ServerConfig {
    let mut cfg = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    };
    cfg.tls.cert = certs().cert.clone();
    cfg.tls.key = certs().key.clone();
    cfg.timeouts.poll = Duration::from_secs(5);
    // Protocol tests run without tokens; tests/auth.rs turns auth on.
    cfg.auth.mode = http_relay::config::AuthMode::None;
    cfg.timeouts.shutdown = Duration::from_secs(5);
    // The tests read `/metrics` on the public listener (tests/metrics.rs
    // covers where it is served by default).
    cfg.metrics_public = Some(true);
    cfg
}

impl Relay {
    /// A TLS connection to the relay (HTTP/1.1 or anything else on top),
    /// handshake done.
    pub async fn tls_connect(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tls = http_relay::tls::client_config(Some(&certs().ca_cert)).unwrap();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls));
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        bounded(connector.connect(name, tcp)).await.unwrap()
    }

    /// Starts a server with [`server_config`] changed by `edit`.
    pub async fn start(edit: impl FnOnce(&mut ServerConfig)) -> Relay {
        Self::start_with_admin(edit, None).await
    }

    /// [`Relay::start`] with an admin listener.
    pub async fn start_with_admin(
        edit: impl FnOnce(&mut ServerConfig),
        admin: Option<tokio::net::TcpListener>,
    ) -> Relay {
        init_logs();
        let mut cfg = server_config();
        edit(&mut cfg);
        let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = cfg.tls.enabled;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(http_relay::server::run_with_admin(
            cfg,
            listener,
            admin,
            async move {
                let _ = stopped.await;
            },
        ));
        let scheme = if tls { "https" } else { "http" };
        Relay {
            addr,
            url: format!("{scheme}://127.0.0.1:{}", addr.port()),
            tls,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            bounded(task).await.unwrap().unwrap();
        }
    }

    /// Signals shutdown without waiting.
    pub fn signal_stop(&mut self) -> JoinHandle<Result<(), http_relay::server::ServerError>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("server task")
    }

    /// The body of `GET <path>` on the relay.
    pub async fn get_text(&self, path: &str) -> String {
        let resp = self.http().get(format!("{}{path}", self.url)).send().await;
        resp.unwrap().text().await.unwrap()
    }

    /// An HTTP client (HTTP/1.1 and HTTP/2 by ALPN) that trusts the dev CA.
    pub fn http(&self) -> reqwest::Client {
        client_builder().build().unwrap()
    }

    /// A client without the overall limit of [`Relay::http`], for a
    /// stream that must outlive it (the caller bounds each read).
    pub fn http_unlimited(&self) -> reqwest::Client {
        client_builder().timeout(Duration::MAX).build().unwrap()
    }

    /// A client limited to HTTP/1.1.
    pub fn http1(&self) -> reqwest::Client {
        client_builder().http1_only().build().unwrap()
    }

    /// A client speaking HTTP/2 only (prior knowledge when cleartext).
    pub fn http2(&self) -> reqwest::Client {
        client_builder().http2_prior_knowledge().build().unwrap()
    }

    /// Waits until a user request for `backend` is accepted by a poll.
    pub async fn wait_for_backend(&self, backend: &str) {
        let http = self.http();
        let url = format!("{}/client/{backend}/", self.url);
        eventually(|| async {
            let resp = http.get(&url).send().await.ok()?;
            (resp.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE).then_some(())
        })
        .await
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn client_builder() -> reqwest::ClientBuilder {
    let pem = std::fs::read(&certs().ca_cert).unwrap();
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(TEST_TIMEOUT)
}

/// A relay-client running in-process.
pub struct RelayClient {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), http_relay::client::ClientError>>>,
}

/// The client config tests start from: the v1 transport, whose
/// conformance most test files check; `tests/transport_v2.rs` sets v2.
pub fn client_config(relay: &Relay, backend_name: &str, backend_url: &str) -> ClientConfig {
    ClientConfig {
        relay_url: relay.url.clone(),
        backend_name: backend_name.to_owned(),
        backend_url: backend_url.to_owned(),
        ca_file: Some(certs().ca_cert.clone()),
        transport: http_relay::config::Transport::V1,
        ..ClientConfig::default()
    }
}

impl RelayClient {
    pub fn start(cfg: ClientConfig) -> RelayClient {
        init_logs();
        cfg.validate().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(http_relay::client::run(cfg, async move {
            let _ = stopped.await;
        }));
        RelayClient {
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Starts a client for `backend_name` and waits until it polls.
    pub async fn connect(relay: &Relay, backend_name: &str, backend_url: &str) -> RelayClient {
        let c = RelayClient::start(client_config(relay, backend_name, backend_url));
        relay.wait_for_backend(backend_name).await;
        c
    }

    pub async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            bounded(task).await.unwrap().unwrap();
        }
    }
}

impl Drop for RelayClient {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Path of the built binary, for tests that run the real process.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_http-relay"))
}

/// SHA-256 of `data`, hex.
pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` deterministic pseudo-random bytes (xorshift), for byte-exact checks.
pub fn pattern(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// Reads an HTTP/1.1 head byte by byte (nothing after it is consumed).
pub async fn read_head(s: &mut (impl tokio::io::AsyncRead + Unpin)) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = bounded(s.read_u8())
            .await
            .expect("connection closed in the head");
        head.push(b);
    }
    String::from_utf8(head).unwrap()
}

/// `GET path` on an HTTP/1.1 keep-alive connection, with `headers`
/// (complete lines, each ending in CRLF) added: status and body (bodies
/// with a `Content-Length` only).
pub async fn http1_get(
    s: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    path: &str,
    headers: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let req = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n{headers}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(s).await;
    let status = head[9..12].parse().unwrap();
    let len = head
        .lines()
        .find_map(|l| {
            let l = l.to_ascii_lowercase();
            Some(l.strip_prefix("content-length:")?.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    bounded(s.read_exact(&mut body)).await.unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}
