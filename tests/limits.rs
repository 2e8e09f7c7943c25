//! The server's resource limits, each against a peer that would exhaust
//! it: connections and file descriptors, requests per backend, buffered
//! request bodies, backend names, HTTP/2 streams, resets and header
//! floods, and the time limits of silent, slow and idle connections and
//! of upgraded streams. Small limits keep the tests fast; tests against
//! the real binary also bound its peak RSS.

mod common;

use std::convert::Infallible;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use bytesize::ByteSize;
use common::backend::Backend;
use common::h2raw;
use common::observe::{gauge, within};
use common::process::{Proc, rss_kib};
use common::{Relay, RelayClient, bounded, client_config, eventually, read_head};
use http::{Request, Response, StatusCode};
use http_relay::config::Transport;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;

// === Helpers ===

/// Reads and discards until the peer closes (EOF or error): how long
/// that took, or `None` if the connection was still open after `limit`.
async fn wait_closed(s: &mut (impl AsyncRead + Unpin), limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    let drained = tokio::time::timeout(limit, async {
        while let Ok(1..) = s.read(&mut buf).await {}
    })
    .await;
    drained.ok().map(|()| start.elapsed())
}

/// `GET path` on an HTTP/1.1 keep-alive connection: status and body
/// (bodies with a `Content-Length` only).
async fn http1_get(s: &mut (impl AsyncRead + AsyncWrite + Unpin), path: &str) -> (u16, String) {
    common::http1_get(s, path, "").await
}

/// Starts a relay-client of `name` on `transport` and waits until the
/// relay routes to it.
async fn relay_client(relay: &Relay, name: &str, url: &str, transport: Transport) -> RelayClient {
    let mut cfg = client_config(relay, name, url);
    cfg.transport = transport;
    let client = RelayClient::start(cfg);
    relay.wait_for_backend(name).await;
    client
}

/// A cleartext HTTP/2 (prior knowledge) client; no TLS, no pool reuse
/// across tests.
fn h2c_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .no_proxy()
        .timeout(common::TEST_TIMEOUT)
        .build()
        .unwrap()
}

/// A backend that switches every request to a raw byte stream (`101`):
/// on `/echo` it echoes, on `/flood` it writes without end; on `/late`
/// it reads to the user's half-close, then writes 20 KiB over 2 s; on
/// `/deaf` it reads nothing, and after a second writes "bye" and
/// half-closes; on `/reset` it writes 64 KiB and resets the connection. `ended` counts upgraded connections that are over.
struct UpgradeBackend {
    url: String,
    ended: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for UpgradeBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl UpgradeBackend {
    async fn start() -> UpgradeBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let ended = Arc::new(AtomicUsize::new(0));
        let count = ended.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let count = count.clone();
                let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let path = req.uri().path().to_owned();
                    let on_upgrade = hyper::upgrade::on(&mut req);
                    let count = count.clone();
                    tokio::spawn(async move {
                        let Ok(upgraded) = on_upgrade.await else {
                            return;
                        };
                        if path.ends_with("/reset") {
                            // 64 KiB, then the connection fails (RST).
                            let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
                                return;
                            };
                            let mut tcp = parts.io.into_inner();
                            let _ = tcp.write_all(&[b'r'; 64 * 1024]).await;
                            let _ = tcp.set_zero_linger();
                            return;
                        }
                        let mut io = TokioIo::new(upgraded);
                        let mut buf = vec![0u8; 64 * 1024];
                        if path.ends_with("/flood") {
                            let block = vec![7u8; 64 * 1024];
                            while io.write_all(&block).await.is_ok() {}
                        } else if path.ends_with("/late") {
                            while let Ok(1..) = io.read(&mut buf).await {}
                            for _ in 0..20 {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                if io.write_all(&[b'l'; 1024]).await.is_err() {
                                    break;
                                }
                            }
                            let _ = io.shutdown().await;
                        } else if path.ends_with("/deaf") {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            let _ = io.write_all(b"bye").await;
                            let _ = io.shutdown().await;
                            std::future::pending::<()>().await;
                        } else {
                            while let Ok(n @ 1..) = io.read(&mut buf).await {
                                if io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                        count.fetch_add(1, SeqCst);
                    });
                    async {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .status(StatusCode::SWITCHING_PROTOCOLS)
                                .header("connection", "upgrade")
                                .header("upgrade", "x-test")
                                .body(http_body_util::Empty::<Bytes>::new())
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades(),
                );
            }
        });
        UpgradeBackend { url, ended, task }
    }
}

/// Opens an upgraded byte stream to `path` through a cleartext relay.
async fn open_upgrade(relay: &Relay, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: x-test\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

/// The relay binary, cleartext on a free port, as a process.
struct ServerProc {
    proc: Proc,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl ServerProc {
    /// Starts it with `env`, under `ulimit -n <fds>` when given, and waits
    /// until it listens.
    async fn start(fds: Option<u32>, env: &[(&str, &str)]) -> ServerProc {
        let dir = tempfile::tempdir().unwrap();
        let ulimit = fds
            .map(|n| format!("ulimit -n {n} || exit 99; "))
            .unwrap_or_default();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "{ulimit}exec \"$0\" server --listen 127.0.0.1:0 --no-tls"
            ))
            .arg(common::binary())
            .current_dir(dir.path())
            .env("HTTP_RELAY_AUTH__MODE", "none")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                sink.lock().unwrap().push(line);
            }
        });
        let proc = Proc(child);
        let addr = within(Duration::from_secs(20), "server listening", || async {
            let log = log.lock().unwrap();
            let line = log.iter().find(|l| l.contains("listening on http://"))?;
            let at = line.find("http://")? + "http://".len();
            let addr: String = line[at..]
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
            addr.parse().ok()
        })
        .await;
        ServerProc {
            proc,
            addr,
            log,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// CPU time (user + system) the process has used, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }

    /// Open file descriptors of the process.
    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    fn logged(&self, needle: &str) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(needle)).count()
    }

    /// Asserts the server is still running, answers `/healthz` on a new
    /// connection, and its peak RSS stayed under `max_mib`; returns the
    /// peak in KiB.
    async fn assert_healthy(&mut self, max_mib: u64) -> u64 {
        assert!(
            self.proc.0.try_wait().unwrap().is_none(),
            "the server exited"
        );
        let resp = bounded(h2c_client().get(format!("{}/healthz", self.url())).send())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (rss, peak) = rss_kib(self.pid());
        assert!(
            peak < max_mib * 1024,
            "peak RSS {peak} KiB (now {rss} KiB) over {max_mib} MiB"
        );
        peak
    }
}

// === Connections ===

/// Connections beyond `limits.max_connections` are closed at accept,
/// unserved and counted, when every place is held by a connection that
/// proved itself (a request passed the gate; with auth off, any request
/// for a backend); a freed place admits a new connection.
#[tokio::test]
async fn connections_beyond_max_connections_are_closed_at_accept() {
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.limits.max_connections = 4;
    })
    .await;
    let mut held = held_connections(&relay, 4, "/client/nobody/x", 503).await;
    for _ in 0..3 {
        assert_closed_unserved(TcpStream::connect(relay.addr).await.unwrap()).await;
    }
    // The held connections are still served.
    for s in &mut held {
        assert_eq!(http1_get(s, "/client/nobody/x").await.0, 503);
    }
    drop(held.pop());
    let refused = refused_connections(&relay).await;
    assert!(refused >= 3.0, "relay_connections_refused_total {refused}");
}

/// `n` keep-alive connections, each answered `status` for `GET path`.
async fn held_connections(relay: &Relay, n: usize, path: &str, status: u16) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        assert_eq!(http1_get(&mut s, path).await.0, status);
        held.push(s);
    }
    held
}

/// A connection that sends `GET /healthz` and is closed without an
/// answer, within 5 s.
async fn assert_closed_unserved(mut s: TcpStream) {
    // The request may or may not reach the socket before it is closed.
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "a connection over the limit stayed open");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
}

/// With every place taken, a new connection takes the place of the
/// oldest one that never passed the gate (it only asked for `/healthz`),
/// which is closed; the others are still served.
#[tokio::test]
async fn a_newcomer_takes_the_place_of_the_oldest_connection_that_never_passed_the_gate() {
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.limits.max_connections = 4;
    })
    .await;
    let mut held = held_connections(&relay, 4, "/healthz", 200).await;
    let mut newcomer = TcpStream::connect(relay.addr).await.unwrap();
    assert_eq!(
        http1_get(&mut newcomer, "/healthz").await,
        (200, "ok".into())
    );
    let mut oldest = held.remove(0);
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), oldest.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the oldest connection stayed open");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    for s in &mut held {
        assert_eq!(http1_get(s, "/healthz").await.0, 200);
    }
    drop(held);
    let http = relay.http();
    let evicted = within(Duration::from_secs(10), "the eviction counter", || {
        gauge(&http, &relay.url, "relay_connections_evicted_total")
    })
    .await;
    assert!(evicted >= 1.0, "relay_connections_evicted_total {evicted}");
}

/// Until a request passed the gate, an idle connection is closed after
/// `timeouts.header_read`; one that passed it keeps
/// `timeouts.idle_connection`. (HTTP/2: on HTTP/1.1, `header_read` also
/// bounds the wait for every next request head.)
#[tokio::test]
async fn a_connection_that_never_passed_the_gate_idles_out_at_the_header_deadline() {
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.header_read = Duration::from_secs(1);
    })
    .await;
    let (mut unproven_rd, mut unproven_wr) = h2raw::connect(relay.addr).await;
    h2_exchange(&mut unproven_rd, &mut unproven_wr, 1, "/healthz").await;
    let idle = Instant::now();
    let (mut proven_rd, mut proven_wr) = h2raw::connect(relay.addr).await;
    h2_exchange(&mut proven_rd, &mut proven_wr, 1, "/client/nobody/x").await;
    let closed = wait_closed(&mut unproven_rd, Duration::from_secs(5))
        .await
        .expect("an idle unproven connection still open after 5 s");
    assert!(
        closed >= Duration::from_millis(500) && idle.elapsed() >= Duration::from_millis(900),
        "closed after {closed:?}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h2_exchange(&mut proven_rd, &mut proven_wr, 3, "/client/nobody/x").await;
}

/// `GET path` as `stream` of a raw HTTP/2 connection, until the answer
/// ends; the connection must not go away meanwhile.
async fn h2_exchange(
    rd: &mut (impl AsyncRead + Unpin),
    wr: &mut (impl AsyncWrite + Unpin),
    stream: u32,
    path: &str,
) {
    let req = h2raw::get(path, "localhost");
    wr.write_all(&h2raw::request(stream, &req)).await.unwrap();
    loop {
        let f = bounded(h2raw::read_frame(rd)).await.unwrap();
        assert_ne!(f.kind, h2raw::GOAWAY, "closed with a request in flight");
        if f.kind == h2raw::SETTINGS && f.flags & h2raw::ACK == 0 {
            let ack = h2raw::frame(h2raw::SETTINGS, h2raw::ACK, 0, &[]);
            wr.write_all(&ack).await.unwrap();
        }
        if f.stream == stream && f.flags & h2raw::END_STREAM != 0 {
            return;
        }
    }
}

/// One address gets at most `limits.max_connections_per_ip` connections
/// (more are closed at accept, unserved and counted); others are served
/// meanwhile, and a closed connection gives its address's place back.
#[tokio::test]
async fn connections_beyond_max_connections_per_ip_are_closed_at_accept() {
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.limits.max_connections_per_ip = Some(3);
    })
    .await;
    let from = |ip: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        socket.connect(relay.addr).await.unwrap()
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = from("127.0.0.1").await;
        assert_eq!(http1_get(&mut s, "/healthz").await, (200, "ok".into()));
        held.push(s);
    }
    let mut s = from("127.0.0.1").await;
    let _ = s
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "a fourth connection from one address stayed open"
    );
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
    // Another address is served meanwhile.
    let mut other = from("127.0.0.2").await;
    assert_eq!(http1_get(&mut other, "/healthz").await.0, 200);
    // A place given back.
    drop(held.pop());
    let mut s = within(Duration::from_secs(10), "a place given back", || async {
        let mut s = from("127.0.0.1").await;
        let req = b"GET /healthz HTTP/1.1\r\nhost: localhost\r\n\r\n";
        s.write_all(req).await.ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.ok()?;
        (&head == b"HTTP/1.1 200").then_some(s)
    })
    .await;
    drop(s.shutdown().await);
    drop(s);
    drop(held.pop());
    let http = relay.http();
    let refused = within(Duration::from_secs(10), "the refusal counter", || {
        gauge(&http, &relay.url, "relay_connections_refused_per_ip_total")
    })
    .await;
    assert!(
        refused >= 1.0,
        "relay_connections_refused_per_ip_total {refused}"
    );
}

/// Upgraded connections (WebSockets, v2 tunnels) keep their place in
/// `limits.max_connections` after the `101`; closing them gives it back.
#[tokio::test]
async fn upgraded_connections_count_against_max_connections() {
    let backend = UpgradeBackend::start().await;
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.limits.max_connections = 6;
    })
    .await;
    // The relay-client's tunnel is one of the six.
    let _client = relay_client(&relay, "ws", &backend.url, Transport::V2).await;
    let mut upgraded = Vec::new();
    let refused = loop {
        assert!(
            upgraded.len() < 10,
            "10 upgraded connections under a limit of 6"
        );
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        let req = "GET /client/ws/echo HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: x-test\r\n\r\n";
        let _ = s.write_all(req.as_bytes()).await;
        let mut head = [0u8; 12];
        match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut head)).await {
            Ok(Ok(_)) => {
                assert_eq!(&head, b"HTTP/1.1 101");
                read_head(&mut s).await;
                upgraded.push(s);
            }
            Ok(Err(e)) => break e,
            Err(_) => panic!("neither upgraded nor refused within 5 s"),
        }
    };
    assert!(
        (1..=5).contains(&upgraded.len()),
        "{} upgraded before a refusal ({refused})",
        upgraded.len()
    );
    // The upgraded connections still work.
    for s in &mut upgraded {
        s.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        bounded(s.read_exact(&mut echo)).await.unwrap();
        assert_eq!(&echo, b"ping");
    }
    drop(upgraded);
    let refused = refused_connections(&relay).await;
    assert!(refused >= 1.0, "relay_connections_refused_total {refused}");
}

/// `relay_connections_refused_total`, once the server exposes it.
async fn refused_connections(relay: &Relay) -> f64 {
    let http = relay.http();
    within(Duration::from_secs(10), "the refusal counter", || {
        gauge(&http, &relay.url, "relay_connections_refused_total")
    })
    .await
}

/// Out of file descriptors, the server backs off instead of spinning or
/// crashing, keeps serving its connections, and recovers once they are
/// free.
#[tokio::test]
async fn out_of_file_descriptors_the_server_backs_off_and_recovers() {
    // Connections waiting for their first request stay open meanwhile.
    let mut server =
        ServerProc::start(Some(64), &[("HTTP_RELAY_TIMEOUTS__HEADER_READ", "60s")]).await;
    let mut early = TcpStream::connect(server.addr).await.unwrap();
    assert_eq!(http1_get(&mut early, "/healthz").await.0, 200);

    // More connections than descriptors: the kernel completes them (up to
    // the listen backlog of 128), the server cannot accept them all.
    let mut flood = Vec::new();
    for _ in 0..150 {
        flood.push(TcpStream::connect(server.addr).await.unwrap());
    }
    within(Duration::from_secs(10), "accept failing", || async {
        (server.logged("accept failed") > 0).then_some(())
    })
    .await;
    let fds = server.open_fds();
    assert!(fds >= 60, "only {fds} descriptors open");
    let (before, logged_before) = (server.cpu_ticks(), server.logged("accept failed"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = server.cpu_ticks() - before;
    // A busy loop would burn ~200 ticks (2 s at 100 Hz); backing off
    // costs next to nothing.
    assert!(
        spent <= 40,
        "{spent} ticks of CPU in 2 s without descriptors"
    );
    // One failed accept per 100 ms of backoff.
    let failures = server.logged("accept failed") - logged_before;
    assert!(failures <= 40, "{failures} accept failures logged in 2 s");
    // Connections it has are still served.
    assert_eq!(http1_get(&mut early, "/healthz").await.0, 200);

    drop(flood);
    within(Duration::from_secs(10), "serving again", || async {
        let resp = h2c_client()
            .get(format!("{}/healthz", server.url()))
            .send()
            .await
            .ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;
    let peak = server.assert_healthy(100).await;
    eprintln!(
        "fd exhaustion: {fds} fds open, {spent} CPU ticks in 2 s, {failures} accept failures logged, peak RSS {peak} KiB"
    );
}

// === Time limits of connections ===

/// A connection that sends nothing, before or after its TLS handshake,
/// is closed at `timeouts.header_read`.
#[tokio::test]
async fn a_silent_connection_is_closed_at_the_header_deadline() {
    let relay = Relay::start(|c| c.timeouts.header_read = Duration::from_millis(500)).await;
    // No TLS handshake.
    let mut tcp = TcpStream::connect(relay.addr).await.unwrap();
    let took = wait_closed(&mut tcp, Duration::from_secs(5))
        .await
        .expect("a silent TCP connection still open after 5 s");
    assert!(took >= Duration::from_millis(400), "closed after {took:?}");
    // A handshake, then no request.
    let started = Instant::now();
    let mut tls = relay.tls_connect().await;
    let took = wait_closed(&mut tls, Duration::from_secs(5))
        .await
        .expect("a TLS connection without a request still open after 5 s");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed after {took:?}"
    );
    assert_eq!(relay.get_text("/healthz").await, "ok");
}

/// A relay-client's chunk post that stops half way is answered 400 at
/// `timeouts.inactive_request`: it does not hold its connection and its
/// buffer for ever.
#[tokio::test]
async fn a_chunk_post_that_stalls_is_cut_off_at_the_inactive_deadline() {
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.inactive_request = Duration::from_millis(500);
    })
    .await;
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    s.write_all(
        b"POST /server/response HTTP/1.1\r\nhost: localhost\r\n\
          content-length: 100000\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    assert_400_after_silence(&mut s).await;
}
/// The answer to a request whose body stopped coming: 400 at the 500 ms
/// deadline of silence, not before.
async fn assert_400_after_silence(s: &mut TcpStream) {
    let started = Instant::now();
    let head = tokio::time::timeout(Duration::from_secs(5), read_head(s))
        .await
        .expect("a stalled body still open after 5 s");
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "answered after {:?}",
        started.elapsed()
    );
}

/// A user's upload that stops coming, or that breaks, is the user's
/// error on either transport: 400 at the deadline of silence, and 400
/// for a malformed chunked body (v2 answered these 504, "backend did not
/// answer", and 502, "relay-client connection failed"). A backend that
/// stops taking an upload is still a 504.
#[tokio::test]
async fn a_stalled_or_broken_upload_is_answered_400_on_both_transports() {
    for transport in [Transport::V1, Transport::V2] {
        let backend = Backend::start().await;
        let relay = Relay::start(|c| {
            c.tls.enabled = false;
            c.timeouts.inactive_request = Duration::from_millis(500);
        })
        .await;
        let _client = relay_client(&relay, "robot-1", &backend.url, transport).await;
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        s.write_all(
            b"POST /client/robot-1/count HTTP/1.1\r\nhost: localhost\r\n\
              content-length: 100000\r\n\r\n0123456789",
        )
        .await
        .unwrap();
        assert_400_after_silence(&mut s).await;
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        s.write_all(
            b"POST /client/robot-1/count HTTP/1.1\r\nhost: localhost\r\n\
              transfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
        )
        .await
        .unwrap();
        let head = bounded(read_head(&mut s)).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{transport:?}: {head}");
        // A backend that takes no bytes and does not answer is the
        // backend's fault, however much of the upload is still to come
        // (on v2 it waits for the tunnel's window, not for the user).
        let resp = bounded(
            relay
                .http()
                .post(format!("{}/client/robot-1/hang", relay.url))
                .body(vec![7u8; 16 << 20])
                .send(),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 504, "{transport:?}");
    }
}

/// A chunk post whose bytes keep coming, however slowly, is read whole:
/// the deadline is one of silence, not of the whole post.
#[tokio::test]
async fn a_slow_chunk_post_that_keeps_moving_is_read_whole() {
    use prost::Message as _;
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.inactive_request = Duration::from_millis(500);
    })
    .await;
    let chunk = http_relay::proto::HttpResponse {
        id: Some("robot-1:feedfeedfeedfeedfeedfeedfeedfeed".into()),
        status_code: Some(200),
        body: Some(Bytes::from(vec![b'x'; 30])),
        ..Default::default()
    }
    .encode_to_vec();
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    let head = format!(
        "POST /server/response HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n",
        chunk.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // About 2 s in all, 200 ms between pieces.
    for piece in chunk.chunks(chunk.len().div_ceil(10)) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(piece).await.unwrap();
    }
    let head = read_head(&mut s).await;
    // Decoded: the server found the id unknown (it was not cut off).
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let mut body = vec![0u8; 4096];
    let n = bounded(s.read(&mut body)).await.unwrap();
    let body = String::from_utf8_lossy(&body[..n]);
    assert!(body.contains("feedfeed"), "{body}");
}

/// A v1 upload that keeps moving, however slowly, is read whole: the
/// deadline is one of silence (`timeouts.inactive_request`), not of the
/// whole upload. One that stops gets 400 at that deadline.
#[tokio::test]
async fn a_slow_v1_upload_that_keeps_moving_is_relayed_whole() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.inactive_request = Duration::from_millis(500);
    })
    .await;
    let _client = relay_client(&relay, "slow-up", &backend.url, Transport::V1).await;
    let data = common::pattern(100_000, 3);
    let head_for = |data: &[u8]| {
        format!(
            "POST /client/slow-up/hash HTTP/1.1\r\nhost: localhost\r\ncontent-length: {}\r\n\r\n",
            data.len()
        )
    };
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    s.write_all(head_for(&data).as_bytes()).await.unwrap();
    // About 2 s in all, 200 ms between pieces.
    for piece in data.chunks(10_000) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s.write_all(piece).await.unwrap();
    }
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = vec![0u8; 64];
    bounded(s.read_exact(&mut body)).await.unwrap();
    assert_eq!(String::from_utf8(body).unwrap(), common::sha256_hex(&data));

    // Half of it, then nothing.
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    s.write_all(head_for(&data).as_bytes()).await.unwrap();
    s.write_all(&data[..50_000]).await.unwrap();
    assert_400_after_silence(&mut s).await;
}

/// A chunk post made of empty header entries, two bytes each, is refused
/// by its entry count before it is decoded: decoded, each entry would be
/// a struct of 48 bytes, and two posts of 15 MiB (under the default chunk
/// limit) about a GiB and a half.
#[tokio::test]
async fn a_chunk_post_of_empty_entries_is_refused_before_it_is_decoded() {
    let mut server = ServerProc::start(None, &[]).await;
    let before = rss_kib(server.pid()).1;
    let flood = Bytes::from([0x12u8, 0x00].repeat(15 << 19));
    let http = h2c_client();
    let post = || async {
        let resp = http
            .post(format!("{}/server/response", server.url()))
            .header("content-type", http_relay::proto::RESPONSE_CONTENT_TYPE)
            .body(flood.clone())
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.text().await.unwrap())
    };
    let (a, b) = tokio::join!(post(), post());
    for (status, body) in [a, b] {
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("header entries"), "{body}");
    }
    // The two bodies themselves (30 MiB) are read whole, as any chunk.
    let peak = server.assert_healthy(before / 1024 + 100).await;
    eprintln!("peak RSS {peak} KiB, {before} KiB before");
}

/// Request headers trickled byte by byte (slowloris) are cut off at
/// `timeouts.header_read`: the first request's over TLS, and a later
/// request's on a keep-alive connection.
#[tokio::test]
async fn slowloris_headers_are_cut_off_at_the_header_deadline() {
    /// Trickles a never-ending header onto `s` until it is closed;
    /// returns how long the peer took to close it.
    async fn trickle(s: impl AsyncRead + AsyncWrite + Unpin) -> Duration {
        let (mut rd, mut wr) = tokio::io::split(s);
        let writer = async move {
            let _ = wr
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nx-slow: ")
                .await;
            while wr.write_all(b"a").await.is_ok() && wr.flush().await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            took = wait_closed(&mut rd, Duration::from_secs(5)) => {
                took.expect("a slowloris connection still open after 5 s")
            }
            () = writer => unreachable!(),
        }
    }

    let header_read = Duration::from_millis(500);
    let tls_relay = Relay::start(|c| c.timeouts.header_read = header_read).await;
    let took = trickle(tls_relay.tls_connect().await).await;
    assert!(took >= Duration::from_millis(300), "closed after {took:?}");

    // With TLS off, on a connection that has served a request already.
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.header_read = header_read;
    })
    .await;
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    assert_eq!(http1_get(&mut s, "/healthz").await.0, 200);
    let took = trickle(s).await;
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    assert_eq!(tls_relay.get_text("/healthz").await, "ok");
}

/// An HTTP/2 connection that pings but never sends a request is closed
/// at `timeouts.header_read`.
#[tokio::test]
async fn an_http2_connection_without_a_request_is_closed_at_the_header_deadline() {
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.header_read = Duration::from_millis(500);
    })
    .await;
    let (mut rd, mut wr) = h2raw::connect(relay.addr).await;
    let started = Instant::now();
    let pinger = tokio::spawn(async move {
        let ping = h2raw::frame(h2raw::PING, 0, 0, &[0; 8]);
        while wr.write_all(&ping).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut pongs = 0;
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match h2raw::read_frame(&mut rd).await {
                Ok(f) if f.kind == h2raw::PING && f.flags & h2raw::ACK != 0 => pongs += 1,
                Ok(f) if f.kind == h2raw::GOAWAY => return "GOAWAY",
                Ok(_) => {}
                Err(_) => return "EOF",
            }
        }
    })
    .await;
    pinger.abort();
    let end = end.expect("a connection without requests still open after 5 s");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400),
        "{end} after {took:?} ({pongs} pongs)"
    );
    assert!(pongs >= 2, "the connection did not answer pings: {pongs}");
}

/// A connection without a request in flight for
/// `timeouts.idle_connection` is closed, on HTTP/2 and HTTP/1.1; a request
/// longer than that keeps it open.
#[tokio::test]
async fn an_idle_connection_is_closed_after_idle_connection() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        // Longer than the idle limit: hyper's HTTP/1.1 header timer also
        // runs between requests, and must not be what closes them here.
        c.timeouts.header_read = Duration::from_secs(5);
        c.timeouts.idle_connection = Duration::from_secs(1);
    })
    .await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;

    // HTTP/2: a 2.5 s request on a connection with a 1 s idle limit.
    let (mut rd, mut wr) = h2raw::connect(relay.addr).await;
    let slow = h2raw::get("/client/robot-1/slow?ms=2500", "localhost");
    wr.write_all(&h2raw::request(1, &slow)).await.unwrap();
    let mut body = Vec::new();
    loop {
        let f = bounded(h2raw::read_frame(&mut rd)).await.unwrap();
        assert_ne!(f.kind, h2raw::GOAWAY, "closed with a request in flight");
        if f.kind == h2raw::SETTINGS && f.flags & h2raw::ACK == 0 {
            let ack = h2raw::frame(h2raw::SETTINGS, h2raw::ACK, 0, &[]);
            wr.write_all(&ack).await.unwrap();
        }
        if f.stream == 1 && f.kind == h2raw::DATA {
            body.extend_from_slice(&f.payload);
        }
        if f.stream == 1 && f.flags & h2raw::END_STREAM != 0 {
            break;
        }
    }
    assert_eq!(body, b"slow");
    let idle = wait_closed(&mut rd, Duration::from_secs(5))
        .await
        .expect("an idle HTTP/2 connection still open after 5 s");
    assert!(
        idle >= Duration::from_millis(800) && idle < Duration::from_secs(3),
        "closed after {idle:?}"
    );

    // HTTP/1.1 keep-alive.
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    assert_eq!(http1_get(&mut s, "/healthz").await.0, 200);
    let idle = wait_closed(&mut s, Duration::from_secs(4))
        .await
        .expect("an idle HTTP/1.1 connection still open after 4 s");
    assert!(
        idle >= Duration::from_millis(800) && idle < Duration::from_secs(3),
        "closed after {idle:?}"
    );
}

// === Requests ===

/// A backend's requests beyond `limits.max_requests_per_backend` get 503
/// with `Retry-After: 1` and a reason; other backends are unaffected, and
/// the count falls as requests end.
#[tokio::test]
async fn requests_beyond_max_requests_per_backend_get_503() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| c.limits.max_requests_per_backend = 3).await;
    let _one = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let _two = RelayClient::connect(&relay, "robot-2", &backend.url).await;
    let http = relay.http();
    let held: Vec<_> = (0..3)
        .map(|_| {
            let req = http.get(format!("{}/client/robot-1/hang", relay.url));
            tokio::spawn(req.send())
        })
        .collect();
    eventually(|| async { (backend.hanging.load(SeqCst) == 3).then_some(()) }).await;

    let resp = bounded(http.get(format!("{}/client/robot-1/x", relay.url)).send())
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let text = resp.text().await.unwrap();
    assert!(text.contains("max_requests_per_backend"), "{text}");
    assert_eq!(text.trim_end().lines().count(), 1, "{text}");

    let other = bounded(http.get(format!("{}/client/robot-2/x", relay.url)).send())
        .await
        .unwrap();
    assert_eq!(other.status(), 200);

    // User-clients that go away free their places.
    for h in held {
        h.abort();
    }
    common::observe::until_ok(&http, &format!("{}/client/robot-1/x", relay.url)).await;
}

/// A relay whose v1 path holds at most three bodies of 1 MiB at once
/// (`limits.max_buffered_bytes`), with a v1 relay-client for `robot-1`.
async fn three_mib_budget() -> (Relay, RelayClient, Backend) {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| {
        c.limits.max_request_body = ByteSize::mib(1);
        c.limits.max_buffered_bytes = ByteSize::mib(3);
    })
    .await;
    let client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    (relay, client, backend)
}

/// v1 request bodies held in memory are bounded by
/// `limits.max_buffered_bytes`: concurrent uploads beyond it get 503, the
/// others succeed, and the room comes back.
#[tokio::test]
async fn buffered_v1_bodies_are_bounded_by_max_buffered_bytes() {
    let (relay, _client, _backend) = three_mib_budget().await;
    let http = relay.http();
    let body = common::pattern(1 << 20, 1);
    // Each body stays reserved until its answer, 3 s later; a body
    // waits at most 2 s for room.
    let url = format!("{}/client/robot-1/slow?ms=3000", relay.url);
    let uploads = (0..8).map(|_| http.post(&url).body(body.clone()).send());
    let started = Instant::now();
    let (mut ok, mut full) = (0, 0);
    for resp in bounded(futures::future::join_all(uploads)).await {
        let resp = resp.unwrap();
        match resp.status().as_u16() {
            200 => ok += 1,
            503 => {
                assert_eq!(resp.headers()["retry-after"], "1");
                let text = resp.text().await.unwrap();
                assert!(text.contains("max_buffered_bytes"), "{text}");
                full += 1;
            }
            s => panic!("status {s}: {}", resp.text().await.unwrap()),
        }
    }
    eprintln!(
        "max_buffered_bytes: {ok} of 8 uploads succeeded, {full} got 503, in {:?}",
        started.elapsed()
    );
    // A declared length is reserved whole before the body is read, so
    // exactly the three that fit go through and the rest are refused
    // after their 2 s wait, not split among all of them.
    assert_eq!((ok, full), (3, 5), "uploads that fitted / got 503");
    // The room is given back.
    let resp = bounded(http.post(&url).body(body).send()).await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// A v1 body counts against `limits.max_buffered_bytes` until the
/// relay-client answers, not for as long as its answer streams: uploads
/// whose answers go on (a download, events) leave room for others.
#[tokio::test]
async fn v1_bodies_leave_the_budget_once_answered() {
    use futures::StreamExt as _;
    let (relay, _client, _backend) = three_mib_budget().await;
    let http = relay.http();
    let body = common::pattern(1 << 20, 1);
    let streaming = format!("{}/client/robot-1/forever?delay_ms=100", relay.url);
    let mut answers = Vec::new();
    for _ in 0..3 {
        let resp = bounded(http.post(&streaming).body(body.clone()).send())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut events = resp.bytes_stream();
        bounded(events.next()).await.unwrap().unwrap();
        answers.push(events);
    }
    // The three answers still stream; a fourth upload fits.
    let resp = bounded(
        http.post(format!("{}/client/robot-1/x", relay.url))
            .body(body)
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    for mut events in answers {
        bounded(events.next()).await.unwrap().unwrap();
    }
}

/// Bodies on the v2 transport stream through and are not counted in
/// `limits.max_buffered_bytes`: uploads held by a backend that does not
/// read them leave room for another.
#[tokio::test]
async fn v2_bodies_stream_past_max_buffered_bytes() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| {
        c.limits.max_request_body = ByteSize::mib(1);
        c.limits.max_buffered_bytes = ByteSize::mib(1);
    })
    .await;
    let _client = relay_client(&relay, "robot-1", &backend.url, Transport::V2).await;
    let http = relay.http();
    let body = common::pattern(1 << 20, 2);
    // Two uploads of the whole budget each, to a backend that never
    // reads them.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let req = http
                .post(format!("{}/client/robot-1/hang", relay.url))
                .body(body.clone());
            tokio::spawn(req.send())
        })
        .collect();
    eventually(|| async { (backend.hanging.load(SeqCst) == 2).then_some(()) }).await;
    let resp = bounded(
        http.post(format!("{}/client/robot-1/hash", relay.url))
            .body(body.clone())
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), common::sha256_hex(&body));
    for h in held {
        assert!(!h.is_finished(), "{:?}", h.await);
        h.abort();
    }
}

// === Backend names ===

/// Backend names from the network must be 1 to 63 of `[A-Za-z0-9._-]`:
/// anything else is 400, in user paths, `X-Server-Name` and relay-client
/// calls alike.
#[tokio::test]
async fn backend_names_from_the_network_are_validated() {
    let relay = Relay::start(|c| c.timeouts.poll = Duration::from_secs(1)).await;
    let http = relay.http();
    let too_long = "a".repeat(64);
    let longest = format!("Az09._-{}", "x".repeat(56));
    let bad_request = |resp: reqwest::Response, what: String| async move {
        assert_eq!(resp.status(), 400, "{what}");
        let text = resp.text().await.unwrap();
        assert!(text.contains("invalid backend name"), "{what}: {text}");
    };
    for name in [
        too_long.as_str(),
        "a%20b",
        "caf%C3%A9",
        "a:b",
        "a+b",
        "a~b",
        "a%2Fb",
    ] {
        let resp = bounded(http.get(format!("{}/client/{name}/x", relay.url)).send());
        bad_request(resp.await.unwrap(), format!("path {name}")).await;
    }
    for name in [too_long.as_str(), "a b", "a/b", "a:b", "a\tb"] {
        let resp = http
            .get(format!("{}/x", relay.url))
            .header("x-server-name", name)
            .send();
        bad_request(bounded(resp).await.unwrap(), format!("header {name:?}")).await;
    }
    for name in [too_long.as_str(), "a%20b", "a%2Fb", "a+b", "%00"] {
        let poll = http.get(format!("{}/server/request?server={name}", relay.url));
        bad_request(bounded(poll.send()).await.unwrap(), format!("poll {name}")).await;
        let connect = relay
            .http1()
            .get(format!("{}/server/connect?server={name}", relay.url))
            .header("connection", "upgrade")
            .header("upgrade", "http-relay-v2");
        bad_request(
            bounded(connect.send()).await.unwrap(),
            format!("connect {name}"),
        )
        .await;
    }
    // The longest valid name passes the check (nobody serves it).
    let resp = bounded(http.get(format!("{}/client/{longest}/x", relay.url)).send())
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let poll = http.get(format!("{}/server/request?server={longest}", relay.url));
    assert_eq!(bounded(poll.send()).await.unwrap().status(), 408);
}

/// A relay-client of a new backend name beyond `limits.max_backends` gets
/// 503; the known backends keep working.
#[tokio::test]
async fn relay_clients_beyond_max_backends_get_503() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| c.limits.max_backends = 2).await;
    let _one = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let _two = RelayClient::connect(&relay, "robot-2", &backend.url).await;
    let http = relay.http();
    let poll = http.get(format!("{}/server/request?server=robot-3", relay.url));
    let resp = bounded(poll.send()).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let text = resp.text().await.unwrap();
    assert!(text.contains("max_backends"), "{text}");
    let connect = relay
        .http1()
        .get(format!("{}/server/connect?server=robot-3", relay.url))
        .header("connection", "upgrade")
        .header("upgrade", "http-relay-v2");
    let resp = bounded(connect.send()).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.unwrap().contains("max_backends"));
    // A real relay-client of the third name does not get in.
    let _three = RelayClient::start(client_config(&relay, "robot-3", &backend.url));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resp = bounded(http.get(format!("{}/client/robot-3/x", relay.url)).send())
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.unwrap().contains("unknown client"));
    for name in ["robot-1", "robot-2"] {
        let resp = bounded(http.get(format!("{}/client/{name}/x", relay.url)).send())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{name}");
    }
    assert_eq!(
        gauge(&http, &relay.url, "relay_connected_backends").await,
        Some(2.0)
    );
}

// === Upgraded streams ===

/// An upgraded stream with no byte moving for `timeouts.idle_stream` is
/// closed (v1 and v2); one that keeps talking stays open past it.
#[tokio::test]
async fn a_silent_upgraded_stream_is_closed_after_idle_stream() {
    for transport in [Transport::V1, Transport::V2] {
        let backend = UpgradeBackend::start().await;
        let relay = Relay::start(|c| {
            c.tls.enabled = false;
            c.timeouts.idle_stream = Duration::from_secs(1);
        })
        .await;
        let _client = relay_client(&relay, "ws", &backend.url, transport).await;
        let mut s = open_upgrade(&relay, "/client/ws/echo").await;
        // 2.4 s of talking, longer than the idle limit.
        for i in 0..8 {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            let msg = format!("ping {i}");
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut echo = vec![0u8; msg.len()];
            bounded(s.read_exact(&mut echo)).await.unwrap();
            assert_eq!(echo, msg.as_bytes(), "{transport:?}");
        }
        let silent = wait_closed(&mut s, Duration::from_secs(5))
            .await
            .unwrap_or_else(|| panic!("{transport:?}: silent stream still open after 5 s"));
        assert!(
            silent >= Duration::from_millis(800),
            "{transport:?}: closed after {silent:?} of silence"
        );
        // The backend's side is closed too.
        within(
            Duration::from_secs(10),
            "backend connection closed",
            || async { (backend.ended.load(SeqCst) == 1).then_some(()) },
        )
        .await;
    }
}

/// After the user's half-close, the backend may go on talking as long as
/// its bytes keep moving, not for `timeouts.inactive_request` in all
/// (v1 and v2).
#[tokio::test]
async fn after_the_users_half_close_the_backend_talks_while_it_moves() {
    for transport in [Transport::V1, Transport::V2] {
        let backend = UpgradeBackend::start().await;
        let relay = Relay::start(|c| {
            c.tls.enabled = false;
            c.timeouts.inactive_request = Duration::from_millis(500);
        })
        .await;
        let _client = relay_client(&relay, "ws", &backend.url, transport).await;
        let mut s = open_upgrade(&relay, "/client/ws/late").await;
        s.write_all(b"question").await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        bounded(s.read_to_end(&mut answer)).await.unwrap();
        assert_eq!(answer, vec![b'l'; 20 * 1024], "{transport:?}");
    }
}

/// A front of the relay for its relay-clients that passes the v1 calls on
/// and has no v2: `/server/connect` is a 404, as from an ingress that does
/// not route it. Its URL.
async fn front_without_v2(relay_url: String) -> String {
    use http_body_util::BodyExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (http, relay_url) = (http.clone(), relay_url.clone());
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (http, relay_url) = (http.clone(), relay_url.clone());
                async move {
                    let mut answer = Response::new(http_body_util::Full::new(Bytes::new()));
                    if req.uri().path().ends_with("/server/connect") {
                        *answer.status_mut() = StatusCode::NOT_FOUND;
                        return Ok::<_, Infallible>(answer);
                    }
                    let target = format!("{relay_url}{}", req.uri());
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|c| c.to_bytes())
                        .unwrap_or_default();
                    let mut headers = parts.headers;
                    headers.remove(http::header::HOST);
                    let sent = http
                        .request(parts.method, target)
                        .headers(headers)
                        .body(body)
                        .send()
                        .await;
                    let Ok(resp) = sent else {
                        *answer.status_mut() = StatusCode::BAD_GATEWAY;
                        return Ok(answer);
                    };
                    *answer.status_mut() = resp.status();
                    for (k, v) in resp.headers() {
                        if k != http::header::CONTENT_LENGTH && k != http::header::TRANSFER_ENCODING
                        {
                            answer.headers_mut().append(k, v.clone());
                        }
                    }
                    *answer.body_mut() =
                        http_body_util::Full::new(resp.bytes().await.unwrap_or_default());
                    Ok(answer)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    url
}

/// A relay-client that finds no v2 (a front that does not route it) takes
/// our server's 410 for what it is, the user's half-close, and relays the
/// backend's answer to the end. It used to guess from the missing v2 that
/// it spoke to the fleet's Go server, take the 410 for the end of the
/// request and close the backend connection.
#[tokio::test]
async fn without_v2_the_users_half_close_is_still_a_half_close() {
    let backend = UpgradeBackend::start().await;
    let relay = Relay::start(|c| c.tls.enabled = false).await;
    let mut cfg = client_config(&relay, "ws", &backend.url);
    cfg.relay_url = front_without_v2(relay.url.clone()).await;
    cfg.transport = Transport::Auto;
    let _client = RelayClient::start(cfg);
    relay.wait_for_backend("ws").await;
    let mut s = open_upgrade(&relay, "/client/ws/late").await;
    s.write_all(b"question").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    bounded(s.read_to_end(&mut answer)).await.unwrap();
    assert_eq!(
        answer.len(),
        20 * 1024,
        "the backend's answer after the half-close"
    );
    assert!(answer.iter().all(|b| *b == b'l'));
}

/// A backend connection that fails is no clean close for the user, on
/// either transport: over TLS the user sees the connection cut (no
/// `close_notify`), not the end of the backend's output.
#[tokio::test]
async fn a_failed_backend_connection_is_not_a_clean_close() {
    for transport in [Transport::V1, Transport::V2] {
        let backend = UpgradeBackend::start().await;
        let relay = Relay::start(|_| {}).await;
        let _client = relay_client(&relay, "ws", &backend.url, transport).await;
        let mut s = relay.tls_connect().await;
        s.write_all(
            b"GET /client/ws/reset HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: x-test\r\n\r\n",
        )
        .await
        .unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{transport:?}: {head}");
        let mut got = Vec::new();
        let end = bounded(s.read_to_end(&mut got)).await;
        let e = end.expect_err("a clean close after a failed backend connection");
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof,
            "{transport:?}: {e}"
        );
        assert!(got.len() <= 64 * 1024);
    }
}

/// v2: a backend that stopped reading, then closed its side, ends the
/// stream: the relay-client's write blocked on that backend does not hold
/// its task, socket and request slot for ever.
#[tokio::test]
async fn v2_a_deaf_backend_does_not_keep_the_relay_clients_slot() {
    let backend = UpgradeBackend::start().await;
    // How long the user's last bytes may wait for the backend to take
    // them, once both sides have closed.
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.inactive_request = Duration::from_secs(1);
    })
    .await;
    let mut cfg = client_config(&relay, "ws", &backend.url);
    cfg.transport = Transport::V2;
    cfg.max_concurrent_requests = 1;
    let _client = RelayClient::start(cfg);
    relay.wait_for_backend("ws").await;
    let mut s = open_upgrade(&relay, "/client/ws/deaf").await;
    // Sent until the buffers on the way are full; meanwhile the backend
    // says "bye" and closes its side.
    let block = vec![1u8; 64 * 1024];
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        while s.write_all(&block).await.is_ok() {}
    })
    .await;
    let mut bye = Vec::new();
    let _ = bounded(s.read_to_end(&mut bye)).await;
    assert_eq!(bye, b"bye");
    drop(s);
    // The slot is free again: a new upgraded stream gets its echo.
    within(Duration::from_secs(20), "a new stream served", || async {
        let mut s = TcpStream::connect(relay.addr).await.ok()?;
        s.write_all(
            b"GET /client/ws/echo HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: x-test\r\n\r\n",
        )
        .await
        .ok()?;
        let head = read_head(&mut s).await;
        if !head.starts_with("HTTP/1.1 101") {
            return None;
        }
        s.write_all(b"ping").await.ok()?;
        let mut echo = [0u8; 4];
        bounded(s.read_exact(&mut echo)).await.ok()?;
        (&echo == b"ping").then_some(())
    })
    .await;
}

/// v2: users who stop reading large answers give the tunnel's window
/// back after `timeouts.inactive_request`. Each unread stream holds its
/// stream window of the connection's: twenty of them would hold all of
/// it, and no stream of that relay-client would move any more.
#[tokio::test]
async fn v2_users_who_stop_reading_do_not_stop_the_tunnel() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.inactive_request = Duration::from_secs(1);
    })
    .await;
    let _client = relay_client(&relay, "big", &backend.url, Transport::V2).await;
    let mut stalled = Vec::new();
    for _ in 0..20 {
        stalled.push(unread_answer(&relay, "/client/big/lazy/268435456").await);
    }
    // The buffers on the way fill up, then every unread stream holds its
    // window: a new answer waits for some to be given back.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let resp = bounded(
        h2c_client()
            .get(format!("{}/client/big/bytes/1048576", relay.url))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let body = bounded(resp.bytes()).await.unwrap();
    assert_eq!(body.len(), 1 << 20);
    // The stalled ones were cut off, not answered whole.
    // Cut off, their backend calls dropped (not answered whole).
    within(
        Duration::from_secs(20),
        "stalled answers cut off",
        || async { (backend.open_streams.load(SeqCst) == 0).then_some(()) },
    )
    .await;
    for s in stalled {
        assert_cut_short(s).await;
    }
}

/// An HTTP/1.1 GET of `path` whose answer is started and then not read
/// (a small receive buffer: little of it is taken on the way).
async fn unread_answer(relay: &Relay, path: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(relay.addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

/// Reads what is left of an answer of 256 MiB: the connection was closed
/// with far less of it sent.
async fn assert_cut_short(mut s: TcpStream) {
    let mut read = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = bounded(s.read(&mut buf)).await {
        read += n;
    }
    assert!(read < 64 << 20, "{read} bytes of a cut-off answer");
}

/// v1: a user-client that stops reading its answer, its socket still
/// open, is closed after `timeouts.inactive_request`: its request no
/// longer holds its place under `limits.max_requests_per_backend`.
#[tokio::test]
async fn a_v1_user_who_stops_reading_gives_its_request_place_back() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.inactive_request = Duration::from_secs(1);
        c.limits.max_requests_per_backend = 1;
    })
    .await;
    let _client = relay_client(&relay, "big", &backend.url, Transport::V1).await;
    let s = unread_answer(&relay, "/client/big/lazy/268435456").await;
    // Not read any further; meanwhile the one place is taken.
    let http = h2c_client();
    let url = format!("{}/client/big/bytes/1000", relay.url);
    let resp = bounded(http.get(&url).send()).await.unwrap();
    assert_eq!(resp.status(), 503);
    within(Duration::from_secs(20), "the place given back", || async {
        let resp = http.get(&url).send().await.ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;
    // The stalled connection was closed, its answer cut short.
    assert_cut_short(s).await;
}

/// The same with HTTP/2 user-clients, which stop reading by giving no
/// window: their tunnel streams are reset, and their connection, on
/// which nothing moves any more, is closed as an HTTP/1 one would be.
#[tokio::test]
async fn v2_http2_users_who_stop_reading_do_not_stop_the_tunnel() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.inactive_request = Duration::from_secs(1);
    })
    .await;
    let _client = relay_client(&relay, "big", &backend.url, Transport::V2).await;
    let tcp = TcpStream::connect(relay.addr).await.unwrap();
    let (mut h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut unread = Vec::new();
    for _ in 0..20 {
        let req = Request::get(format!("http://localhost/client/big/lazy/{}", 256 << 20))
            .body(())
            .unwrap();
        h2 = h2.ready().await.unwrap();
        let (response, _) = h2.send_request(req, true).unwrap();
        unread.push(response);
    }
    let mut bodies = Vec::new();
    for response in unread {
        let resp = bounded(response).await.unwrap();
        assert_eq!(resp.status(), 200);
        // Kept, never read: no window is given back.
        bodies.push(resp.into_body());
    }
    // Every unread stream comes to hold its window of the tunnel.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let resp = bounded(
        h2c_client()
            .get(format!("{}/client/big/bytes/1048576", relay.url))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(bounded(resp.bytes()).await.unwrap().len(), 1 << 20);
    within(
        Duration::from_secs(20),
        "unread answers cut off",
        || async { (backend.open_streams.load(SeqCst) == 0).then_some(()) },
    )
    .await;
    // The user's connection took nothing for the limit: closed.
    let _ = bounded(conn).await.unwrap();
    drop(bodies);
}

/// An HTTP/2 peer may shut its flow-control window from the start
/// (`SETTINGS_INITIAL_WINDOW_SIZE` 0) and never open it: no answer can
/// then be sent, nothing fills the socket, and hyper waits for room
/// without end. Such a connection is closed after
/// `timeouts.inactive_request`, with no token needed to make it; before,
/// it held its place under `limits.max_connections` and every stream's
/// task for good.
#[tokio::test]
async fn an_http2_peer_that_opens_no_window_is_closed() {
    use tokio::io::AsyncWriteExt as _;
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.timeouts.inactive_request = Duration::from_secs(1);
    })
    .await;
    let (mut rd, mut wr) = h2raw::connect(relay.addr).await;
    // SETTINGS_INITIAL_WINDOW_SIZE (4) = 0.
    let zero_window = [0, 4, 0, 0, 0, 0];
    wr.write_all(&h2raw::frame(h2raw::SETTINGS, 0, 0, &zero_window))
        .await
        .unwrap();
    for stream in [1, 3, 5] {
        wr.write_all(&h2raw::request(stream, &h2raw::get("/healthz", "relay")))
            .await
            .unwrap();
    }
    let started = tokio::time::Instant::now();
    let mut heads = 0;
    let end = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match h2raw::read_frame(&mut rd).await {
                Ok(f) if f.kind == h2raw::SETTINGS && f.flags & h2raw::ACK == 0 => {
                    let ack = h2raw::frame(h2raw::SETTINGS, h2raw::ACK, 0, &[]);
                    let _ = wr.write_all(&ack).await;
                }
                // A client library answers pings on its own.
                Ok(f) if f.kind == h2raw::PING && f.flags & h2raw::ACK == 0 => {
                    let pong = h2raw::frame(h2raw::PING, h2raw::ACK, 0, &f.payload);
                    let _ = wr.write_all(&pong).await;
                }
                Ok(f) if f.kind == h2raw::HEADERS => heads += 1,
                Ok(f) if f.kind == h2raw::DATA && !f.payload.is_empty() => {
                    panic!("data sent beyond a window of 0")
                }
                Ok(f) if f.kind == h2raw::GOAWAY => return "GOAWAY",
                Ok(_) => {}
                Err(_) => return "EOF",
            }
        }
    })
    .await
    .expect("still open 15 s after `timeouts.inactive_request` (1 s)");
    assert_eq!(heads, 3, "closed ({end}) before the answers' heads");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "closed ({end}) after {:?}",
        started.elapsed()
    );
}

/// An upgraded stream whose user stops reading, so that the relay's
/// writes block, is closed after `timeouts.idle_stream` (v1 and v2).
#[tokio::test]
async fn an_upgraded_stream_whose_user_stops_reading_is_closed() {
    for transport in [Transport::V1, Transport::V2] {
        let backend = UpgradeBackend::start().await;
        let relay = Relay::start(|c| {
            c.tls.enabled = false;
            c.timeouts.idle_stream = Duration::from_secs(1);
        })
        .await;
        let _client = relay_client(&relay, "ws", &backend.url, transport).await;
        let mut s = open_upgrade(&relay, "/client/ws/flood").await;
        // Not reading: the pipe ends on the relay while nothing moves.
        let http = relay.http();
        within(Duration::from_secs(5), "stream open", || async {
            (gauge(&http, &relay.url, "relay_active_streams").await == Some(1.0)).then_some(())
        })
        .await;
        let started = Instant::now();
        within(Duration::from_secs(6), "stalled stream closed", || async {
            (gauge(&http, &relay.url, "relay_active_streams").await == Some(0.0)).then_some(())
        })
        .await;
        let stalled = started.elapsed();
        // What was written before is still there, then the end.
        wait_closed(&mut s, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("{transport:?}: the flood did not end"));
        within(
            Duration::from_secs(10),
            "backend connection closed",
            || async { (backend.ended.load(SeqCst) == 1).then_some(()) },
        )
        .await;
        eprintln!("{transport:?}: stalled stream closed {stalled:?} after the relay saw it open");
    }
}

// === HTTP/2 ===

/// `limits.max_streams_per_connection` is announced and enforced
/// (REFUSED_STREAM beyond it), and a client whose streams keep being
/// refused gets GOAWAY after 256 of them; another connection is served.
#[tokio::test]
async fn http2_streams_beyond_the_limit_are_refused_and_refusals_end_the_connection() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| {
        c.tls.enabled = false;
        c.limits.max_streams_per_connection = 4;
    })
    .await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let (mut rd, mut wr) = h2raw::connect(relay.addr).await;
    let settings = bounded(async {
        loop {
            let f = h2raw::read_frame(&mut rd).await.unwrap();
            if f.kind == h2raw::SETTINGS && f.flags & h2raw::ACK == 0 {
                return f;
            }
        }
    })
    .await;
    assert!(
        settings
            .settings()
            .contains(&(h2raw::MAX_CONCURRENT_STREAMS, 4)),
        "{:?}",
        settings.settings()
    );
    wr.write_all(&h2raw::frame(h2raw::SETTINGS, h2raw::ACK, 0, &[]))
        .await
        .unwrap();
    let hang = h2raw::get("/client/robot-1/hang", "localhost");
    for id in [1, 3, 5, 7] {
        let headers = h2raw::request(id, &hang);
        wr.write_all(&headers).await.unwrap();
    }
    eventually(|| async { (backend.hanging.load(SeqCst) == 4).then_some(()) }).await;
    let hits = backend.hits.load(SeqCst);
    // 400 more streams at once, all over the limit.
    let mut burst = Vec::new();
    for id in (9..).step_by(2).take(400) {
        burst.extend(h2raw::request(id, &hang));
    }
    let _ = wr.write_all(&burst).await;
    let (mut refused, mut first_refused, mut goaway) = (0, None, None);
    bounded(async {
        loop {
            let Ok(f) = h2raw::read_frame(&mut rd).await else {
                return;
            };
            match f.kind {
                h2raw::RST_STREAM => {
                    assert_eq!(f.error_code(), Some(h2raw::REFUSED_STREAM), "{f:?}");
                    first_refused.get_or_insert(f.stream);
                    refused += 1;
                }
                h2raw::GOAWAY => goaway = f.error_code(),
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(first_refused, Some(9));
    assert_eq!(goaway, Some(h2raw::ENHANCE_YOUR_CALM), "{refused} refused");
    assert!((250..=260).contains(&refused), "{refused} streams refused");
    eprintln!("max streams: {refused} streams refused before GOAWAY");
    // The backend never saw the refused streams.
    assert_eq!(backend.hits.load(SeqCst), hits);
    let resp = bounded(
        h2c_client()
            .get(format!("{}/client/robot-1/x", relay.url))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
}

/// HTTP/2 rapid reset (CVE-2023-44487): a client that opens and cancels
/// streams in a loop gets GOAWAY within a few hundred streams, while
/// another client is served.
#[tokio::test]
async fn http2_rapid_reset_gets_goaway_while_others_are_served() {
    let mut server = ServerProc::start(None, &[]).await;
    let (mut rd, mut wr) = h2raw::connect(server.addr).await;
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        loop {
            match h2raw::read_frame(&mut rd).await {
                Ok(f) if f.kind == h2raw::GOAWAY => {
                    let last = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
                    return Some((f.error_code(), last, started.elapsed()));
                }
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    });
    let request = h2raw::get("/client/robot-1/x", "localhost");
    let cancel = h2raw::CANCEL.to_be_bytes();
    let (mut id, mut resets) = (1u32, 0);
    // Batches of 50 opened-and-cancelled streams, as attack tools send
    // them, until the server says stop (or 10000 streams).
    while resets < 10_000 && !reader.is_finished() {
        let mut batch = Vec::new();
        for _ in 0..50 {
            batch.extend(h2raw::request(id, &request));
            batch.extend(h2raw::frame(h2raw::RST_STREAM, 0, id, &cancel));
            id += 2;
        }
        if wr.write_all(&batch).await.is_err() {
            break;
        }
        resets += 50;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (code, last_stream, after) = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the server did not end the connection")
        .unwrap()
        .unwrap_or_else(|| panic!("closed without GOAWAY after {resets} resets"));
    assert_eq!(code, Some(h2raw::ENHANCE_YOUR_CALM));
    assert!(
        resets < 1000,
        "{resets} resets sent before the connection ended"
    );
    assert!(last_stream < 2000, "GOAWAY after stream {last_stream}");
    // Another client is served.
    let peak = server.assert_healthy(100).await;
    eprintln!(
        "rapid reset: GOAWAY after {after:?}, last stream {last_stream} ({} streams), {resets} resets sent; peak RSS {peak} KiB",
        last_stream.div_ceil(2)
    );
}

/// A CONTINUATION flood (a header block that never ends) is cut off
/// before 1 MiB, and the server stays healthy.
#[tokio::test]
async fn an_http2_continuation_flood_is_cut_off() {
    let mut server = ServerProc::start(None, &[]).await;
    let (mut rd, mut wr) = h2raw::connect(server.addr).await;
    let reader = tokio::spawn(async move {
        loop {
            match h2raw::read_frame(&mut rd).await {
                Ok(f) if f.kind == h2raw::GOAWAY => return format!("GOAWAY {:?}", f.error_code()),
                Ok(_) => {}
                Err(e) => return format!("closed: {e}"),
            }
        }
    });
    let head = h2raw::get("/healthz", "localhost");
    wr.write_all(&h2raw::frame(h2raw::HEADERS, h2raw::END_STREAM, 1, &head))
        .await
        .unwrap();
    // 16 KiB frames of valid header fields, without END_HEADERS.
    let mut fill = Vec::new();
    let field = h2raw::literal("x-fill", &[b'f'; 100]);
    while fill.len() + field.len() <= 16 * 1024 {
        fill.extend_from_slice(&field);
    }
    let frame = h2raw::frame(h2raw::CONTINUATION, 0, 1, &fill);
    let started = Instant::now();
    let mut sent = head.len();
    while sent < 1 << 20 && !reader.is_finished() {
        if wr.write_all(&frame).await.is_err() {
            break;
        }
        sent += fill.len();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("the server did not close the flooding connection")
        .unwrap();
    assert!(sent < 1 << 20, "{sent} bytes of headers sent; {end}");
    let peak = server.assert_healthy(100).await;
    eprintln!(
        "continuation flood: {end} after {} KiB in {:?}; peak RSS {peak} KiB",
        sent / 1024,
        started.elapsed()
    );
}
