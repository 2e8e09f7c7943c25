//! Operating the relay's TLS:
//!
//! - the server certificate follows its files in the real binary: a pair
//!   renamed into place is served to new handshakes within about a second
//!   while a connection opened before keeps working; a mismatched pair or
//!   a garbage certificate is refused with one log line and the old one
//!   stays; SIGHUP reloads a pair edited in place that the periodic check
//!   cannot see; a cleartext server survives SIGHUP;
//! - client certificates of relay-clients (`tls.client_ca`,
//!   `tls.client_cert_names_backend`): v1 and v2 relay-clients with a
//!   trusted certificate relay, users need none, a missing certificate or
//!   one naming another backend gets 403, an untrusted one fails the
//!   handshake, and `/metrics` counts each refusal by reason;
//! - `server --check-config`: exit 0 on a usable configuration, 1 with the
//!   reason otherwise.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::backend::Backend;
use common::pki::{ClientCa, Identity, ServerPair};
use common::process::{Proc, wait_exit};
use common::{Relay, RelayClient, bounded, client_config, eventually};
use http_body_util::{BodyExt as _, Empty};
use http_relay::config::Transport;
use http_relay::proto::{HttpRequest, HttpResponse};
use hyper_util::rt::TokioIo;
use prost::Message as _;
use rustls::pki_types::ServerName;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const REFUSED: &str = "refused the new TLS certificate; the one in use stays";
const RELOADED: &str = "TLS certificate reloaded";
/// Bound of the wait for a replaced certificate to be served.
const RELOAD_BOUND: Duration = Duration::from_secs(5);

// --- the real binary -------------------------------------------------

/// An `http-relay server` process and the lines of its stderr.
struct Server {
    proc: Proc,
    addr: SocketAddr,
    lines: Arc<Mutex<Vec<String>>>,
    _cwd: TempDir,
}

impl Server {
    /// Starts `server --listen 127.0.0.1:0 <args>` without auth and waits
    /// for its `listening on` line.
    async fn start(args: &[&str]) -> Server {
        let cwd = tempfile::tempdir().unwrap();
        let mut child = Command::new(common::binary())
            .args(["server", "--listen", "127.0.0.1:0"])
            .args(args)
            .current_dir(cwd.path())
            .env("HTTP_RELAY_AUTH__MODE", "none")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = collect_stderr(&mut child);
        let proc = Proc(child);
        let addr = eventually(|| async {
            let lines = lines.lock().unwrap();
            let line = lines.iter().find(|l| l.contains("listening on "))?;
            let (_, addr) = line.split_once("://")?;
            addr.trim().parse().ok()
        })
        .await;
        Server {
            proc,
            addr,
            lines,
            _cwd: cwd,
        }
    }

    /// A server with TLS from `live`.
    async fn with_tls(live: &LiveFiles) -> Server {
        let (cert, key) = (live.cert.to_str().unwrap(), live.key.to_str().unwrap());
        Server::start(&["--tls-cert", cert, "--tls-key", key]).await
    }

    /// Log lines containing `needle` so far.
    fn count(&self, needle: &str) -> usize {
        let lines = self.lines.lock().unwrap();
        lines.iter().filter(|l| l.contains(needle)).count()
    }

    fn sighup(&self) {
        let pid = self.proc.0.id().to_string();
        let status = Command::new("kill").args(["-HUP", &pid]).status().unwrap();
        assert!(status.success());
    }

    fn assert_running(&mut self) {
        let exited = self.proc.0.try_wait().unwrap();
        assert!(exited.is_none(), "server exited: {exited:?}");
    }
}

fn collect_stderr(child: &mut std::process::Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (stderr, sink) = (child.stderr.take().unwrap(), lines.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// The server's `tls.cert` and `tls.key`, in a directory of their own.
struct LiveFiles {
    cert: PathBuf,
    key: PathBuf,
    _dir: TempDir,
}

impl LiveFiles {
    /// Copies of `pair`, each padded with newlines to `len` bytes (0: as
    /// they are).
    fn of(pair: &ServerPair, len: usize) -> LiveFiles {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert, padded(&pair.files.cert, len)).unwrap();
        std::fs::write(&key, padded(&pair.files.key, len)).unwrap();
        LiveFiles {
            cert,
            key,
            _dir: dir,
        }
    }
}

/// A PEM file's content padded with newlines to `len` bytes.
fn padded(path: &Path, len: usize) -> Vec<u8> {
    let mut data = std::fs::read(path).unwrap();
    assert!(data.len() <= len || len == 0);
    data.resize(len.max(data.len()), b'\n');
    data
}

/// Replaces `dst` as certbot does: a new file in the same directory,
/// renamed over it.
fn rename_into_place(dst: &Path, data: &[u8]) {
    let tmp = dst.with_extension("new");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, dst).unwrap();
}

/// Overwrites `path` in place with as many bytes (same inode and size, no
/// truncation) and puts its modification time back, so that only a
/// forced reload can notice.
fn overwrite_unnoticeably(path: &Path, data: &[u8]) {
    let before = std::fs::metadata(path).unwrap();
    assert_eq!(before.len(), data.len() as u64);
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all(data).unwrap();
    f.set_modified(before.modified().unwrap()).unwrap();
    drop(f);
    let after = std::fs::metadata(path).unwrap();
    assert_eq!(after.modified().unwrap(), before.modified().unwrap());
    assert_eq!(after.len(), before.len());
}

// --- TLS clients --------------------------------------------------------

/// A TLS client trusting the CAs of `pairs`, speaking HTTP/1.1.
fn connector(pairs: &[&ServerPair]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for pair in pairs {
        for cert in http_relay::tls::load_certs(&pair.files.ca_cert).unwrap() {
            roots.add(cert).unwrap();
        }
    }
    common::pki::http1_connector(roots)
}

async fn tls_connect(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    tls.connect(name, tcp).await.expect("TLS handshake")
}

/// The end-entity certificate a new handshake is presented.
async fn presented(addr: SocketAddr, tls: &tokio_rustls::TlsConnector) -> Vec<u8> {
    let stream = bounded(tls_connect(addr, tls)).await;
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Polls new handshakes until `want` is presented, within
/// [`RELOAD_BOUND`]; how long it took from `since`.
async fn wait_presented(
    addr: SocketAddr,
    tls: &tokio_rustls::TlsConnector,
    want: &[u8],
    since: Instant,
) -> Duration {
    let poll = async {
        while presented(addr, tls).await != want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(RELOAD_BOUND, poll)
        .await
        .expect("the new certificate was not served within 5 s");
    since.elapsed()
}

/// An HTTP/1.1 keep-alive connection.
struct KeptConn(hyper::client::conn::http1::SendRequest<Empty<Bytes>>);

impl KeptConn {
    async fn open(addr: SocketAddr, tls: &tokio_rustls::TlsConnector) -> KeptConn {
        let stream = bounded(tls_connect(addr, tls)).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        KeptConn(sender)
    }

    /// `GET /healthz` on this very connection: status and body.
    async fn healthz(&mut self) -> (u16, Bytes) {
        let req = http::Request::get("/healthz")
            .header("host", "localhost")
            .body(Empty::new())
            .unwrap();
        let resp = bounded(self.0.send_request(req))
            .await
            .expect("request on the kept connection");
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }
}

// --- certificate reload ---------------------------------------------------

#[tokio::test]
async fn a_pair_renamed_into_place_is_served_to_new_handshakes_and_old_connections_keep_working() {
    let (old, new) = (ServerPair::new(), ServerPair::new());
    let live = LiveFiles::of(&old, 0);
    let server = Server::with_tls(&live).await;
    let tls = connector(&[&old, &new]);
    assert_eq!(presented(server.addr, &tls).await, old.der());
    let mut kept = KeptConn::open(server.addr, &tls).await;
    assert_eq!(kept.healthz().await, (200, Bytes::from("ok")));

    rename_into_place(&live.cert, &std::fs::read(&new.files.cert).unwrap());
    rename_into_place(&live.key, &std::fs::read(&new.files.key).unwrap());
    let latency = wait_presented(server.addr, &tls, &new.der(), Instant::now()).await;
    eprintln!("reload after rename: new certificate served after {latency:?}");

    assert_eq!(
        kept.healthz().await,
        (200, Bytes::from("ok")),
        "the connection opened before the swap keeps serving"
    );
    eventually(|| async { (server.count(RELOADED) == 1).then_some(()) }).await;
}

#[tokio::test]
async fn a_mismatched_pair_and_a_garbage_certificate_are_refused_once_and_the_old_one_stays() {
    let (old, new) = (ServerPair::new(), ServerPair::new());
    let live = LiveFiles::of(&old, 0);
    let mut server = Server::with_tls(&live).await;
    let tls = connector(&[&old, &new]);
    assert_eq!(presented(server.addr, &tls).await, old.der());

    let new_cert = std::fs::read(&new.files.cert).unwrap();
    let bad_changes: [(&str, &[u8]); 2] = [
        ("new certificate, old key", &new_cert),
        ("garbage certificate", b"not a certificate\n"),
    ];
    for (n, (what, cert)) in bad_changes.into_iter().enumerate() {
        let changed = Instant::now();
        rename_into_place(&live.cert, cert);
        eventually(|| async { (server.count(REFUSED) > n).then_some(()) }).await;
        tokio::time::sleep(Duration::from_secs(3).saturating_sub(changed.elapsed())).await;
        assert_eq!(
            presented(server.addr, &tls).await,
            old.der(),
            "{what}: the old certificate stays"
        );
        assert_eq!(server.count(REFUSED), n + 1, "{what}: one refusal line");
    }
    assert_eq!(server.count(RELOADED), 0);
    let mut fresh = KeptConn::open(server.addr, &tls).await;
    assert_eq!(fresh.healthz().await, (200, Bytes::from("ok")));
    server.assert_running();
}

#[tokio::test]
async fn sighup_reloads_a_pair_edited_in_place_that_the_periodic_check_cannot_see() {
    // Both pairs padded to the same sizes, so that an edit in place with
    // the old modification time leaves every stamp the watcher compares.
    const LEN: usize = 4096;
    let (old, new) = (ServerPair::new(), ServerPair::new());
    let live = LiveFiles::of(&old, LEN);
    let mut server = Server::with_tls(&live).await;
    let tls = connector(&[&old, &new]);
    assert_eq!(presented(server.addr, &tls).await, old.der());

    overwrite_unnoticeably(&live.cert, &padded(&new.files.cert, LEN));
    overwrite_unnoticeably(&live.key, &padded(&new.files.key, LEN));
    // Two check periods: the files look unchanged, so no reload yet.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        presented(server.addr, &tls).await,
        old.der(),
        "reloaded although inode, size and modification time stayed: \
         this test needs another way to tell SIGHUP from the periodic check"
    );

    let sent = Instant::now();
    server.sighup();
    let latency = wait_presented(server.addr, &tls, &new.der(), sent).await;
    eprintln!("reload on SIGHUP: new certificate served after {latency:?}");
    server.assert_running();
    assert_eq!(server.count(REFUSED), 0);
}

#[tokio::test]
async fn a_cleartext_server_logs_sighup_and_keeps_serving() {
    let mut server = Server::start(&["--no-tls"]).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let healthz = format!("http://{}/healthz", server.addr);
    let status = || async { bounded(http.get(&healthz).send()).await.unwrap().status() };
    // After a first answer, so that the process is fully up.
    assert_eq!(status().await, 200);
    assert_eq!(server.count("SIGHUP"), 0);

    server.sighup();
    eventually(|| async { (server.count("SIGHUP") == 1).then_some(()) }).await;
    assert_eq!(status().await, 200);
    server.assert_running();
}

// --- client certificates of relay-clients ------------------------------

/// A relay whose relay-client endpoints want a certificate from `ca`.
async fn mtls_relay(ca: &ClientCa, names_backend: bool) -> Relay {
    let pem = ca.pem.clone();
    Relay::start(move |cfg| {
        cfg.tls.client_ca = Some(pem);
        cfg.tls.client_cert_names_backend = names_backend;
    })
    .await
}

/// A relay-client for `backend` presenting `id`.
fn relay_client(
    relay: &Relay,
    backend: &str,
    backend_url: &str,
    id: Option<&Identity>,
    transport: Transport,
) -> RelayClient {
    let mut cfg = client_config(relay, backend, backend_url);
    cfg.transport = transport;
    cfg.tls_cert = id.map(|id| id.cert.clone());
    cfg.tls_key = id.map(|id| id.key.clone());
    RelayClient::start(cfg)
}

/// An HTTP client trusting the relay and presenting `id`.
fn http_as(id: Option<&Identity>) -> reqwest::Client {
    let ca = std::fs::read(&common::certs().ca_cert).unwrap();
    let mut builder = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()])
        .no_proxy()
        .timeout(common::TEST_TIMEOUT);
    if let Some(id) = id {
        builder = builder.identity(id.reqwest());
    }
    builder.build().unwrap()
}

/// Status and body of `GET <path>`.
async fn get(http: &reqwest::Client, relay: &Relay, path: &str) -> (u16, String) {
    let resp = bounded(http.get(format!("{}{path}", relay.url)).send())
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Asserts a 403 with one line of reason containing `reason`.
async fn assert_refused(http: &reqwest::Client, relay: &Relay, path: &str, reason: &str) {
    let (status, body) = get(http, relay, path).await;
    assert_eq!(status, 403, "{path}: {body}");
    assert_eq!(body.lines().count(), 1, "{path}: one line: {body:?}");
    assert!(body.contains(reason), "{path}: {body:?}");
}

/// A value of the relay's `/metrics`, 0 when the series is absent.
async fn metric(relay: &Relay, series: &str) -> u64 {
    let (status, text) = get(&relay.http(), relay, "/metrics").await;
    assert_eq!(status, 200, "/metrics: {text}");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().unwrap())
}

async fn refusals(relay: &Relay, reason: &str) -> u64 {
    let series = format!("relay_client_cert_refusals_total{{reason=\"{reason}\"}}");
    metric(relay, &series).await
}

/// A user request (no client certificate) through `backend`: status.
async fn user_status(relay: &Relay, backend: &str) -> u16 {
    get(&relay.http(), relay, &format!("/client/{backend}/hello"))
        .await
        .0
}

/// `GET /healthz` over a fresh TLS connection presenting `id`: the
/// response, or the error of the handshake or of the exchange.
async fn raw_healthz(relay: &Relay, id: &Identity) -> std::io::Result<String> {
    let ca = Some(common::certs().ca_cert.as_path());
    let cfg = http_relay::tls::client_config_with(ca, Some((&id.cert, &id.key))).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(relay.addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut stream = bounded(tls.connect(name, tcp)).await?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = String::new();
    bounded(stream.read_to_string(&mut out)).await?;
    Ok(out)
}

/// One short poll as the relay-client of `backend`, which registers it.
async fn register(relay: &Relay, http: &reqwest::Client, backend: &str) {
    let url = format!("{}/server/request?server={backend}", relay.url);
    let _ = http
        .get(url)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
}

/// Long-polls as the relay-client of `backend` until a request arrives;
/// its id.
async fn next_request(relay: &Relay, http: &reqwest::Client, backend: &str) -> String {
    let url = format!("{}/server/request?server={backend}", relay.url);
    loop {
        let resp = http.get(&url).timeout(Duration::from_secs(2)).send().await;
        if let Ok(resp) = resp.and_then(|r| r.error_for_status()) {
            let req = HttpRequest::decode(resp.bytes().await.unwrap()).unwrap();
            return req.id.unwrap();
        }
    }
}

/// A relay-client of `robot-a` with its own certificate relays a user's
/// request (the user has none) over `transport`, without a refusal.
async fn relays_with_certificate(transport: Transport) -> Relay {
    let ca = ClientCa::new("fleet CA");
    let backend = Backend::start().await;
    let relay = mtls_relay(&ca, true).await;
    let id = ca.issue("robot-a");
    let _client = relay_client(&relay, "robot-a", &backend.url, Some(&id), transport);
    relay.wait_for_backend("robot-a").await;

    let resp = bounded(
        relay
            .http()
            .get(format!("{}/client/robot-a/hello", relay.url))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-backend"], "test");
    assert!(resp.text().await.unwrap().contains("uri: /hello"));
    for reason in ["missing", "wrong_name", "untrusted"] {
        assert_eq!(refusals(&relay, reason).await, 0, "{reason}");
    }
    relay
}

#[tokio::test]
async fn a_v1_relay_client_with_a_trusted_certificate_relays() {
    let relay = relays_with_certificate(Transport::V1).await;
    assert_eq!(metric(&relay, "relay_tunnels").await, 0);
}

#[tokio::test]
async fn a_v2_relay_client_with_a_trusted_certificate_relays() {
    let relay = relays_with_certificate(Transport::V2).await;
    assert_eq!(metric(&relay, "relay_tunnels").await, 1, "relayed over v2");
}

#[tokio::test]
async fn a_relay_client_without_a_certificate_gets_403() {
    let ca = ClientCa::new("fleet CA");
    let backend = Backend::start().await;
    let relay = mtls_relay(&ca, false).await;
    // One transport after the other, so that each is seen refused.
    let mut clients = Vec::new();
    for (name, transport) in [("robot-a", Transport::V1), ("robot-b", Transport::V2)] {
        let before = refusals(&relay, "missing").await;
        clients.push(relay_client(&relay, name, &backend.url, None, transport));
        eventually(|| async { (refusals(&relay, "missing").await > before).then_some(()) }).await;
        assert_eq!(user_status(&relay, name).await, 503, "{transport:?}");
    }

    let http = http_as(None);
    let reason = "a client certificate is required";
    for path in [
        "/server/request?server=robot-a",
        "/server/connect?server=robot-a",
    ] {
        assert_refused(&http, &relay, path, reason).await;
    }
    assert_eq!(refusals(&relay, "wrong_name").await, 0);
}

#[tokio::test]
async fn names_backend_refuses_the_certificate_of_another_robot() {
    let ca = ClientCa::new("fleet CA");
    let backend = Backend::start().await;
    let relay = mtls_relay(&ca, true).await;
    let robot_b = ca.issue("robot-b");
    let _client = relay_client(
        &relay,
        "robot-a",
        &backend.url,
        Some(&robot_b),
        Transport::V1,
    );
    eventually(|| async { (refusals(&relay, "wrong_name").await >= 1).then_some(()) }).await;
    assert_eq!(user_status(&relay, "robot-a").await, 503);

    let http = http_as(Some(&robot_b));
    let reason = "does not name this backend";
    for path in [
        "/server/request?server=robot-a",
        "/server/connect?server=robot-a",
    ] {
        assert_refused(&http, &relay, path, reason).await;
    }
    // The same certificate is good for its own name: the long poll is
    // held open instead of refused.
    let own = http
        .get(format!("{}/server/request?server=robot-b", relay.url))
        .send();
    if let Ok(resp) = tokio::time::timeout(Duration::from_secs(1), own).await {
        assert_ne!(resp.unwrap().status(), 403);
    }
    assert_eq!(refusals(&relay, "missing").await, 0);
}

#[tokio::test]
async fn a_certificate_of_another_robot_cannot_answer_or_read_a_request() {
    let ca = ClientCa::new("fleet CA");
    let relay = mtls_relay(&ca, true).await;
    let (robot_a, robot_b) = (
        http_as(Some(&ca.issue("robot-a"))),
        http_as(Some(&ca.issue("robot-b"))),
    );
    register(&relay, &robot_a, "robot-a").await;
    let user = tokio::spawn({
        let (http, url) = (relay.http(), format!("{}/client/robot-a/secret", relay.url));
        async move { http.get(url).send().await.unwrap() }
    });
    let id = bounded(next_request(&relay, &robot_a, "robot-a")).await;

    let answer = HttpResponse {
        id: Some(id.clone()),
        status_code: Some(200),
        body: Some(Bytes::from_static(b"from robot-a")),
        eof: Some(true),
        ..Default::default()
    };
    let post = |http: &reqwest::Client, path: String, body: Vec<u8>| {
        let req = http.post(format!("{}{path}", relay.url)).body(body).send();
        async move { bounded(req).await.unwrap() }
    };
    let stream = format!("/server/requeststream?id={id}");
    for (http, reason) in [(&http_as(None), "missing"), (&robot_b, "wrong_name")] {
        let resp = post(http, "/server/response".into(), answer.encode_to_vec()).await;
        assert_eq!(
            resp.status(),
            403,
            "{reason}: {}",
            resp.text().await.unwrap()
        );
        let resp = post(http, stream.clone(), Vec::new()).await;
        assert_eq!(
            resp.status(),
            403,
            "{reason}: {}",
            resp.text().await.unwrap()
        );
    }
    assert_eq!(refusals(&relay, "missing").await, 2);
    assert_eq!(refusals(&relay, "wrong_name").await, 2);

    let resp = post(&robot_a, "/server/response".into(), answer.encode_to_vec()).await;
    assert_eq!(resp.status(), 200);
    let resp = bounded(user).await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "from robot-a");
}

#[tokio::test]
async fn an_untrusted_client_certificate_fails_the_handshake() {
    let (ca, rogue) = (ClientCa::new("fleet CA"), ClientCa::new("rogue CA"));
    let backend = Backend::start().await;
    let relay = mtls_relay(&ca, false).await;
    let trusted = raw_healthz(&relay, &ca.issue("robot-a")).await.unwrap();
    assert!(trusted.starts_with("HTTP/1.1 200"), "{trusted}");
    let err = raw_healthz(&relay, &rogue.issue("robot-a"))
        .await
        .unwrap_err();
    eprintln!("untrusted client certificate: {err}");
    assert!(
        metric(&relay, "relay_tls_handshake_failures_total").await >= 1,
        "the server saw a failed handshake"
    );

    // A relay-client with it never gets to poll; users need no certificate.
    let rogue_id = rogue.issue("robot-b");
    let _client = relay_client(
        &relay,
        "robot-b",
        &backend.url,
        Some(&rogue_id),
        Transport::V1,
    );
    eventually(|| async { (refusals(&relay, "untrusted").await >= 2).then_some(()) }).await;
    assert_eq!(user_status(&relay, "robot-b").await, 503);
    assert_eq!(get(&relay.http(), &relay, "/healthz").await.0, 200);
}

#[tokio::test]
async fn metrics_count_each_client_certificate_refusal_by_reason() {
    let (ca, rogue) = (ClientCa::new("fleet CA"), ClientCa::new("rogue CA"));
    let relay = mtls_relay(&ca, true).await;
    let poll = "/server/request?server=robot-a";
    assert_refused(&http_as(None), &relay, poll, "required").await;
    let robot_b = ca.issue("robot-b");
    assert_refused(&http_as(Some(&robot_b)), &relay, poll, "does not name").await;
    raw_healthz(&relay, &rogue.issue("robot-a"))
        .await
        .unwrap_err();

    for reason in ["missing", "wrong_name", "untrusted"] {
        assert_eq!(refusals(&relay, reason).await, 1, "{reason}");
    }
}

// --- server --check-config ------------------------------------------------

/// Runs `server --check-config <args>` in `cwd`: exit code, stdout, stderr.
fn check_config(cwd: &Path, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let child = Command::new(common::binary())
        .args(["server", "--check-config"])
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    let code = wait_exit(&mut proc.0).expect("exit code");
    let read = |r: &mut dyn std::io::Read| {
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        s
    };
    let out = read(proc.0.stdout.as_mut().unwrap());
    let err = read(proc.0.stderr.as_mut().unwrap());
    (code, out, err)
}

/// Asserts exit 1 with `error: ...<reason>...` on stderr.
fn assert_check_fails(result: (i32, String, String), reason: &str) {
    let (code, out, err) = result;
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(reason), "{reason:?} not in {err:?}");
    assert!(!out.contains("configuration OK"), "{out}");
}

#[test]
fn check_config_accepts_a_usable_configuration_and_names_what_is_wrong() {
    let (a, b) = (ServerPair::new(), ServerPair::new());
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let no_auth = [("HTTP_RELAY_AUTH__MODE", "none")];
    let tls_args = |cert: &Path, key: &Path| {
        [
            "--tls-cert".into(),
            path(cert),
            "--tls-key".into(),
            path(key),
        ]
    };
    let run = |args: &[String], env: &[(&str, &str)]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        check_config(cwd, &args, env)
    };

    let (code, out, err) = run(&tls_args(&a.files.cert, &a.files.key), &no_auth);
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    assert!(out.lines().any(|l| l == "configuration OK"), "{out}");
    assert!(out.contains("note: auth: OFF"), "{out}");

    // The embedded default: notes on what the first start would create,
    // and nothing created by the check itself.
    let (code, out, _) = run(&[], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("note: tls:") && out.contains("configuration OK"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_dir(cwd).unwrap().count(),
        0,
        "the check created files"
    );

    let mismatched = run(&tls_args(&a.files.cert, &b.files.key), &no_auth);
    assert_check_fails(mismatched, "does not match the certificate");

    let missing = cwd.join("missing.pem");
    assert_check_fails(
        run(&tls_args(&missing, &a.files.key), &no_auth),
        "missing.pem",
    );

    let toml = cwd.join("server.toml");
    let with = |extra: &str| {
        let text = format!(
            "[tls]\ncert = {:?}\nkey = {:?}\n{extra}",
            path(&a.files.cert),
            path(&a.files.key)
        );
        std::fs::write(&toml, text).unwrap();
        run(&["--config".into(), path(&toml)], &[])
    };
    assert_check_fails(with("certificate_chain = \"x.pem\"\n"), "certificate_chain");

    let jwks = cwd.join("jwks.json");
    std::fs::write(&jwks, "{ not json").unwrap();
    let issuer = format!(
        "[[auth.issuers]]\nissuer = \"https://idp.example\"\njwks_file = {:?}\n",
        path(&jwks)
    );
    assert_check_fails(with(&issuer), "not a JWK set");
}
