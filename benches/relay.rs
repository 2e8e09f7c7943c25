//! The relay measured side by side with the direct connection, in one
//! run: the real `http-relay` binaries (server and relay-client, each its
//! own process) between a bench client and a hyper backend on 127.0.0.1.
//!
//! `cargo bench --bench relay` prints one table per configuration
//! (transport v1 or v2, user side cleartext or TLS) with, for each
//! scenario, the direct figure, the relayed one and their ratio:
//!
//! - S1 download of `RELAY_BENCH_MIB` MiB (default 100): MiB/s;
//! - S2 1 KiB GETs one at a time (`RELAY_BENCH_SERIAL`, default 1000):
//!   p50 and p99, and the latency the relay adds;
//! - S3 1 KiB GETs, 64 concurrent (`RELAY_BENCH_CONCURRENT`, default
//!   5000 requests): requests per second;
//! - S4 upload of `RELAY_BENCH_MIB` MiB: MiB/s and the peak RSS growth of
//!   the server and relay-client processes during it;
//! - S5 idle relay-clients (`RELAY_BENCH_IDLE`, default 5000): server RSS
//!   per idle v1 poll and per idle v2 connection (config `idle`);
//! - S6 a user-client reading `RELAY_BENCH_SLOW_MIB` MiB (default 1024) at
//!   5 MiB/s: peak RSS growth of server and relay-client (cleartext
//!   configurations);
//! - S7 WebSocket echo round trip (`RELAY_BENCH_SERIAL` messages): p50;
//! - S8 S3 with tracing exported at 0 % and 100 % (to an in-bench OTLP
//!   sink that discards what it gets), against tracing off;
//! - the fleet comparison (config `go`): S1 to S3 over v1 through our
//!   server and relay-client, our server with the fleet's Go relay-client,
//!   and the Go relay server with the Go relay-client. The Go binaries are
//!   not part of this repository: `RELAY_BENCH_GO_DIR` names a directory
//!   with `bin/http-relay-server` and `bin/http-relay-client` built from
//!   the upstream sources.
//!
//! The direct path of a TLS configuration is TLS too (the same backend
//! behind rustls); throughputs are the median of three runs.
//!
//! `RELAY_BENCH_QUICK=1` shrinks every size so that a run takes well
//! under a minute; `RELAY_BENCH_CONFIGS=v1-clear,v2-tls,...` picks
//! configurations (default all four, `idle` and `tracing`; `go` on
//! request).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::backend::Backend;
use common::process::{Proc, reset_peak, rss_kib};
use common::ws::WsBackend;
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

const MIB: usize = 1024 * 1024;

struct Params {
    mib: usize,
    serial: usize,
    concurrent: usize,
    idle: usize,
    slow_mib: usize,
}

impl Params {
    fn from_env() -> Params {
        let quick = std::env::var("RELAY_BENCH_QUICK").is_ok_and(|v| v == "1");
        let num = |key: &str, full: usize, small: usize| {
            std::env::var(key)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(if quick { small } else { full })
        };
        Params {
            mib: num("RELAY_BENCH_MIB", 100, 16),
            serial: num("RELAY_BENCH_SERIAL", 1000, 200),
            concurrent: num("RELAY_BENCH_CONCURRENT", 5000, 1000),
            idle: num("RELAY_BENCH_IDLE", 5000, 500),
            slow_mib: num("RELAY_BENCH_SLOW_MIB", 1024, 32),
        }
    }
}

/// The server and relay-client processes of one configuration.
struct Stack {
    url: String,
    server: Proc,
    /// The relay-client of `bench`.
    client: Proc,
    /// The relay-client of `bench-ws`, if any.
    _ws_client: Option<Proc>,
}

fn start_stack(
    tls: bool,
    transport: &str,
    backend: &str,
    ws_backend: Option<&str>,
    env: &[(&str, &str)],
    dir: &std::path::Path,
) -> Stack {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_http-relay"));
    cmd.args(["server", "--listen", "127.0.0.1:0"])
        .current_dir(dir)
        .env("HTTP_RELAY_AUTH__MODE", "none")
        .env("HTTP_RELAY_LIMITS__MAX_REQUEST_BODY", "2GiB")
        // Every peer of the bench is on 127.0.0.1 (S5: thousands of them).
        .env("HTTP_RELAY_LIMITS__MAX_CONNECTIONS_PER_IP", "1000000")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if !tls {
        cmd.arg("--no-tls");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    workers(&mut cmd);
    let mut server = Proc(cmd.spawn().expect("server starts"));
    let stderr = server.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if let Some(at) = line.find("listening on ") {
                let _ = tx.send(line[at + "listening on ".len()..].trim().to_owned());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("server listening");
    let client = |name: &str, backend: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_http-relay"));
        cmd.args([
            "client",
            "--relay-url",
            &url,
            "--backend-name",
            name,
            "--backend-url",
            backend,
        ])
        .current_dir(dir)
        .env("HTTP_RELAY_TRANSPORT", transport)
        .env("HTTP_RELAY_MAX_CONCURRENT_REQUESTS", "1024")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if tls {
            cmd.args(["--ca-file", "certs/ca.pem"]);
        }
        for (k, v) in env {
            if k.contains("TELEMETRY") {
                cmd.env(k, v);
            }
        }
        workers(&mut cmd);
        Proc(cmd.spawn().expect("client starts"))
    };
    Stack {
        client: client("bench", backend),
        _ws_client: ws_backend.map(|ws| client("bench-ws", ws)),
        url,
        server,
    }
}

/// `RELAY_BENCH_WORKERS=n`: the relay processes run `n` runtime workers
/// (default: one per core).
fn workers(cmd: &mut Command) {
    if let Ok(n) = std::env::var("RELAY_BENCH_WORKERS") {
        cmd.env("TOKIO_WORKER_THREADS", n);
    }
}

fn http_client(tls_ca: Option<&std::path::Path>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(600));
    if let Some(ca) = tls_ca {
        let pem = std::fs::read(ca).expect("ca");
        b = b.tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("pem")]);
    }
    b.build().expect("client")
}

async fn wait_ready(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(r) = http.get(format!("{base}/bytes/1")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{base} not ready");
}

async fn download(http: &reqwest::Client, base: &str, mib: usize) -> f64 {
    let started = Instant::now();
    let resp = http
        .get(format!("{base}/bytes/{}", mib * MIB))
        .send()
        .await
        .expect("download");
    let mut body = resp.bytes_stream();
    let mut n = 0;
    while let Some(chunk) = body.next().await {
        n += chunk.expect("body").len();
    }
    assert_eq!(n, mib * MIB);
    mib as f64 / started.elapsed().as_secs_f64()
}

async fn upload(http: &reqwest::Client, base: &str, data: &bytes::Bytes) -> f64 {
    let started = Instant::now();
    let resp = http
        .post(format!("{base}/hash"))
        .body(data.clone())
        .send()
        .await
        .expect("upload");
    assert_eq!(resp.status(), 200, "upload answered {}", resp.status());
    let _ = resp.bytes().await;
    (data.len() / MIB) as f64 / started.elapsed().as_secs_f64()
}

/// Throughput figures are the median of this many runs, direct and
/// relayed alike: one run on a shared 2-core machine varies by half.
const RUNS: usize = 3;

/// The median of `RUNS` results of `f`.
async fn median<F, Fut>(mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let mut v = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        v.push(f().await);
    }
    v.sort_by(f64::total_cmp);
    v[RUNS / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn serial(http: &reqwest::Client, base: &str, n: usize) -> (Duration, Duration) {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let r = http
            .get(format!("{base}/bytes/1024"))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), 200, "serial request");
        let body = r.bytes().await.expect("body");
        assert_eq!(body.len(), 1024);
        lat.push(started.elapsed());
    }
    lat.sort();
    (percentile(&lat, 0.5), percentile(&lat, 0.99))
}

async fn concurrent(http: &reqwest::Client, base: &str, n: usize) -> f64 {
    let started = Instant::now();
    let url = format!("{base}/bytes/1024");
    let results = futures::stream::iter(0..n)
        .map(|_| {
            let http = http.clone();
            let url = url.clone();
            async move {
                let r = http.get(url).send().await?.error_for_status()?;
                r.bytes().await
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, n, "failed requests");
    n as f64 / started.elapsed().as_secs_f64()
}

/// WebSocket echo round trips (cleartext or TLS to `addr`); p50.
async fn ws_echo(addr: &str, path: &str, tls: Option<&std::path::Path>, n: usize) -> Duration {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let _ = tcp.set_nodelay(true);
    let mut lat = Vec::with_capacity(n);
    macro_rules! rounds {
        ($ws:expr) => {{
            let mut ws = $ws;
            for i in 0..n {
                let msg = Message::text(format!("ping {i}"));
                let started = Instant::now();
                ws.send(msg.clone()).await.expect("send");
                let got = ws.next().await.expect("echo").expect("echo");
                lat.push(started.elapsed());
                assert_eq!(got, msg);
            }
            let _ = ws.close(None).await;
        }};
    }
    match tls {
        None => {
            let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), tcp)
                .await
                .expect("ws");
            rounds!(ws);
        }
        Some(ca) => {
            let mut cfg = http_relay::tls::client_config(Some(ca)).expect("tls");
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let stream = connector.connect(name, tcp).await.expect("tls");
            let port = addr.rsplit(':').next().unwrap_or_default();
            let (ws, _) =
                tokio_tungstenite::client_async(format!("wss://localhost:{port}{path}"), stream)
                    .await
                    .expect("ws");
            rounds!(ws);
        }
    }
    lat.sort();
    percentile(&lat, 0.5)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Backends besides the cleartext one.
struct Backends {
    /// The same backend behind TLS, for the direct path of TLS configurations.
    tls: Backend,
}

/// S1, S2 (p50, p99) and S3 of one path, direct or relayed.
struct Path {
    s1: f64,
    s2: (Duration, Duration),
    s3: f64,
}

async fn measure_path(p: &Params, http: &reqwest::Client, base: &str) -> Path {
    wait_ready(http, base).await;
    let _ = serial(http, base, 50).await; // warm-up
    Path {
        s1: median(|| download(http, base, p.mib)).await,
        s2: serial(http, base, p.serial).await,
        s3: median(|| concurrent(http, base, p.concurrent)).await,
    }
}

/// What the direct path of one configuration measured.
struct Direct {
    s1: f64,
    s2: (Duration, Duration),
    s3: f64,
    s4: f64,
    s7: Duration,
}

/// The direct path of one configuration: the same client straight to the
/// backend, over TLS when the relayed path's user side is TLS.
async fn measure_direct(
    p: &Params,
    backend: &Backend,
    ws: &WsBackend,
    data: &bytes::Bytes,
    ca: Option<&std::path::Path>,
) -> Direct {
    let http = http_client(ca);
    let base = backend.url.clone();
    let Path { s1, s2, s3 } = measure_path(p, &http, &base).await;
    Direct {
        s1,
        s2,
        s3,
        s4: median(|| upload(&http, &base, data)).await,
        s7: ws_echo(
            ws.url.trim_start_matches("http://"),
            "/echo",
            None,
            p.serial,
        )
        .await,
    }
}

async fn measure_relayed(
    p: &Params,
    backends: &Backends,
    backend: &Backend,
    ws: &WsBackend,
    data: &bytes::Bytes,
    transport: &str,
    tls: bool,
) {
    let dir = tempfile::tempdir().expect("dir");
    let stack = start_stack(tls, transport, &backend.url, Some(&ws.url), &[], dir.path());
    let ca = dir.path().join("certs/ca.pem");
    let ca = tls.then_some(ca.as_path());
    let http = http_client(ca);
    let base = format!("{}/client/bench", stack.url);
    wait_ready(&http, &base).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("{}/client/bench-ws/", stack.url))
        .send()
        .await
        .map_or(true, |r| r.status() == 503)
    {
        assert!(Instant::now() < deadline, "bench-ws not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Path { s1, s2, s3 } = measure_path(p, &http, &base).await;
    let (server_before, _) = rss_kib(stack.server.0.id());
    let (client_before, _) = rss_kib(stack.client.0.id());
    reset_peak(stack.server.0.id());
    reset_peak(stack.client.0.id());
    let s4 = median(|| upload(&http, &base, data)).await;
    let server_peak = rss_kib(stack.server.0.id()).1.saturating_sub(server_before);
    let client_peak = rss_kib(stack.client.0.id()).1.saturating_sub(client_before);
    let ws_addr = stack
        .url
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_owned();
    let s7 = ws_echo(&ws_addr, "/client/bench-ws/echo", ca, p.serial.min(500)).await;
    let s6 = if tls {
        None
    } else {
        Some(slow_reader(&http, &base, &stack, p.slow_mib).await)
    };
    drop(stack);
    let direct = if tls {
        let tls_ca = Some(common::certs().ca_cert.as_path());
        measure_direct(p, &backends.tls, ws, data, tls_ca).await
    } else {
        measure_direct(p, backend, ws, data, None).await
    };

    let name = format!(
        "{transport}, user side {}",
        if tls { "TLS" } else { "cleartext" }
    );
    println!("\n### {name}\n");
    if tls {
        println!("(direct: TLS to the backend; S7 direct is cleartext)\n");
    }
    println!("| scenario | direct | relayed | relayed/direct |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| S1 download {} MiB | {:.0} MiB/s | {:.0} MiB/s | {:.2} |",
        p.mib,
        direct.s1,
        s1,
        s1 / direct.s1
    );
    println!(
        "| S2 1 KiB serial p50 / p99 | {:.3} / {:.3} ms | {:.3} / {:.3} ms | added +{:.0} / +{:.0} µs |",
        ms(direct.s2.0),
        ms(direct.s2.1),
        ms(s2.0),
        ms(s2.1),
        (ms(s2.0) - ms(direct.s2.0)) * 1000.0,
        (ms(s2.1) - ms(direct.s2.1)) * 1000.0
    );
    println!(
        "| S3 1 KiB, 64 concurrent | {:.0} req/s | {:.0} req/s | {:.2} |",
        direct.s3,
        s3,
        s3 / direct.s3
    );
    println!(
        "| S4 upload {} MiB | {:.0} MiB/s | {:.0} MiB/s | {:.2} (peak RSS growth: server +{:.1} MiB, relay-client +{:.1} MiB) |",
        data.len() / MIB,
        direct.s4,
        s4,
        s4 / direct.s4,
        server_peak as f64 / 1024.0,
        client_peak as f64 / 1024.0
    );
    println!(
        "| S7 WebSocket echo p50 | {:.3} ms | {:.3} ms | added +{:.0} µs |",
        ms(direct.s7),
        ms(s7),
        (ms(s7) - ms(direct.s7)) * 1000.0
    );
    if let Some((server, client)) = s6 {
        println!(
            "| S6 {} MiB read at 5 MiB/s | | peak RSS growth: server +{:.1} MiB, relay-client +{:.1} MiB | |",
            p.slow_mib,
            server as f64 / 1024.0,
            client as f64 / 1024.0
        );
    }
}

/// S6: reads `mib` MiB at 5 MiB/s; returns the peak RSS growth (KiB) of
/// the server and the relay-client meanwhile.
async fn slow_reader(http: &reqwest::Client, base: &str, stack: &Stack, mib: usize) -> (u64, u64) {
    const RATE: f64 = 5.0 * MIB as f64;
    let (server_before, _) = rss_kib(stack.server.0.id());
    let (client_before, _) = rss_kib(stack.client.0.id());
    reset_peak(stack.server.0.id());
    reset_peak(stack.client.0.id());
    let resp = http
        .get(format!("{base}/lazy/{}", mib * MIB))
        .send()
        .await
        .expect("slow download");
    let mut body = resp.bytes_stream();
    let started = Instant::now();
    let mut n = 0usize;
    while let Some(chunk) = body.next().await {
        n += chunk.expect("body").len();
        let due = Duration::from_secs_f64(n as f64 / RATE);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    assert_eq!(n, mib * MIB);
    (
        rss_kib(stack.server.0.id()).1.saturating_sub(server_before),
        rss_kib(stack.client.0.id()).1.saturating_sub(client_before),
    )
}

/// S5: server RSS per idle v1 poll and per idle v2 connection.
async fn measure_idle(p: &Params) {
    let dir = tempfile::tempdir().expect("dir");
    let env = [("HTTP_RELAY_TIMEOUTS__POLL", "10m")];
    let mut rows = Vec::new();
    for kind in ["v1 poll", "v2 connection"] {
        let stack = start_stack(false, "v1", "http://127.0.0.1:9", None, &env, dir.path());
        let base = stack.url.clone();
        let http = http_client(None);
        // The stack's own relay-client is one backend; wait for it.
        wait_gauge_at_least(&http, &base, "relay_connected_backends", 1).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (before, _) = rss_kib(stack.server.0.id());
        let mut held = Vec::new();
        if kind == "v1 poll" {
            // HTTP/2 connections of up to POLLS_PER_CONNECTION polls each,
            // within the server's `limits.max_streams_per_connection`.
            for c in 0..p.idle.div_ceil(POLLS_PER_CONNECTION) {
                let h2 = reqwest::Client::builder()
                    .no_proxy()
                    .http2_prior_knowledge()
                    .timeout(Duration::from_secs(600))
                    .build()
                    .expect("client");
                let first = c * POLLS_PER_CONNECTION;
                for i in first..(first + POLLS_PER_CONNECTION).min(p.idle) {
                    let url = format!("{base}/server/request?server=idle-{i}");
                    let h2 = h2.clone();
                    held.push(tokio::spawn(async move {
                        let _ = h2.get(url).send().await;
                    }));
                }
            }
        } else {
            let addr = base.trim_start_matches("http://").to_owned();
            for i in 0..p.idle {
                held.push(tokio::spawn(idle_tunnel(addr.clone(), format!("idle-{i}"))));
            }
        }
        wait_gauge_at_least(&http, &base, "relay_connected_backends", p.idle as u64 + 1).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (after, _) = rss_kib(stack.server.0.id());
        rows.push((kind, after.saturating_sub(before) as f64 / p.idle as f64));
        for h in held {
            h.abort();
        }
        drop(stack);
    }
    println!("\n### S5 idle relay-clients ({} each, cleartext)\n", p.idle);
    println!("| kind | server RSS per idle backend |");
    println!("| --- | --- |");
    for (kind, kib) in rows {
        println!("| {kind} | {kib:.1} KiB |");
    }
}

/// Idle v1 polls multiplexed on one HTTP/2 connection in S5 (the server
/// allows 256 streams per connection by default).
const POLLS_PER_CONNECTION: usize = 200;

/// One idle v2 relay-client: the upgrade, then an HTTP/2 server that
/// nobody calls.
async fn idle_tunnel(addr: String, name: String) {
    let Ok(tcp) = tokio::net::TcpStream::connect(&addr).await else {
        return;
    };
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(tcp))
    .await
    else {
        return;
    };
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let Ok(req) = http::Request::get(format!("/server/connect?server={name}"))
        .header("host", addr.as_str())
        .header("connection", "upgrade")
        .header("upgrade", "http-relay-v2")
        .body(http_body_util::Empty::new())
    else {
        return;
    };
    let Ok(resp) = sender.send_request(req).await else {
        return;
    };
    let Ok(upgraded) = hyper::upgrade::on(resp).await else {
        return;
    };
    let svc = hyper::service::service_fn(|_req| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
        ))
    });
    let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(upgraded, svc)
        .await;
}

async fn wait_gauge_at_least(http: &reqwest::Client, base: &str, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let value = common::observe::gauge(http, base, name)
            .await
            .unwrap_or(0.0);
        if value >= want as f64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {value}, wanted {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An OTLP/gRPC receiver that accepts every export and keeps nothing:
/// S8 measures what tracing costs the relay, not what decoding spans
/// costs a collector (which runs elsewhere, not on the relay's cores).
async fn otlp_sink() -> (String, tokio::task::JoinHandle<()>) {
    use http_body_util::BodyExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let mut body = req.into_body();
                        while let Some(Ok(_)) = body.frame().await {}
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let frames = vec![
                            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                bytes::Bytes::from_static(&[0, 0, 0, 0, 0]),
                            )),
                            Ok(hyper::body::Frame::trailers(trailers)),
                        ];
                        hyper::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(http_body_util::StreamBody::new(futures::stream::iter(
                                frames,
                            )))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
            });
        }
    });
    (format!("http://{addr}"), task)
}

/// S8: S3 with the server and relay-client exporting spans. The three
/// stacks run side by side (idle ones cost nothing) and are measured in
/// turns, `S8_ROUNDS` times, each figure the median of its turns: on a
/// shared machine, stacks measured one after the other drifted apart by
/// a fifth with nothing changed.
async fn measure_tracing(p: &Params, backend: &Backend) {
    let (endpoint, _sink) = otlp_sink().await;
    let configs = [("off", None), ("0 %", Some("0")), ("100 %", Some("1"))];
    let dir = tempfile::tempdir().expect("dir");
    let http = http_client(None);
    let mut stacks = Vec::new();
    for (label, ratio) in configs {
        let mut env = Vec::new();
        if let Some(r) = ratio {
            env.push(("HTTP_RELAY_TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()));
            env.push(("HTTP_RELAY_TELEMETRY__SAMPLE_RATIO", r));
        }
        let sub = dir.path().join(label.replace([' ', '%'], ""));
        std::fs::create_dir_all(&sub).expect("dir");
        let stack = start_stack(false, "v2", &backend.url, None, &env, &sub);
        let base = format!("{}/client/bench", stack.url);
        wait_ready(&http, &base).await;
        let _ = concurrent(&http, &base, 200).await;
        stacks.push((label, stack, base, Vec::new(), Vec::new()));
    }
    for round in 0..S8_ROUNDS {
        // The order turns each round: the 100 % stack's export must not
        // always fall into the same neighbour's turn.
        for i in 0..stacks.len() {
            let n = stacks.len();
            let (_, _, base, rps, p50) = &mut stacks[(i + round) % n];
            rps.push(concurrent(&http, base, p.concurrent).await);
            p50.push(serial(&http, base, (p.serial / 4).max(1)).await.0);
        }
    }
    println!("\n### S8 tracing (v2, cleartext; medians of {S8_ROUNDS} interleaved rounds)\n");
    println!("| tracing | S3 req/s | cost | S2 p50 |");
    println!("| --- | --- | --- | --- |");
    let mid = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut base = None;
    for (label, _stack, _, rps, p50) in stacks {
        let rps = mid(rps);
        let p50 = mid(p50.iter().map(|d| ms(*d)).collect());
        let off = *base.get_or_insert(rps);
        println!(
            "| {label} | {rps:.0} | {:+.0} % | {p50:.3} ms |",
            (rps / off - 1.0) * 100.0
        );
    }
}

/// Turns of S8 (each one S3 run and a quarter of S2 per configuration).
const S8_ROUNDS: usize = 7;

/// A port that was free a moment ago (the Go server takes a port number,
/// not a listener).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

/// The Go relay-client for backend `bench` of the server at `relay`
/// (host:port), on its defaults but for the log level: WARN, as quiet as
/// our processes are on the hot path.
fn go_client(go: &std::path::Path, relay: &str, backend: &str) -> Proc {
    let child = Command::new(go.join("bin/http-relay-client"))
        .args(["-relay_scheme", "http", "-relay_address", relay])
        .args(["-backend_scheme", "http", "-backend_address", backend])
        .args(["-server_name", "bench", "-disable_auth_for_remote"])
        .args(["-log_level", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("Go relay-client starts");
    Proc(child)
}

/// The fleet comparison (config `go`), v1, cleartext.
async fn measure_fleet(p: &Params, backend: &Backend) {
    let Some(go) = std::env::var_os("RELAY_BENCH_GO_DIR").map(std::path::PathBuf::from) else {
        println!(
            "\n### fleet comparison: not run (RELAY_BENCH_GO_DIR names no directory with the Go binaries)"
        );
        return;
    };
    let backend_addr = backend.url.trim_start_matches("http://").to_owned();
    let http = http_client(None);
    let mut rows = Vec::new();
    {
        let dir = tempfile::tempdir().expect("dir");
        let stack = start_stack(false, "v1", &backend.url, None, &[], dir.path());
        rows.push((
            "our server + our relay-client (v1)",
            measure_path(p, &http, &format!("{}/client/bench", stack.url)).await,
        ));
        drop(stack);
    }
    {
        let dir = tempfile::tempdir().expect("dir");
        // Our server alone: its stack's relay-client is stopped before the
        // Go one polls, so every request reaches the Go relay-client (the
        // server skips the polls of a relay-client that went away).
        let Stack {
            url,
            server,
            client,
            ..
        } = start_stack(false, "v1", "http://127.0.0.1:9", None, &[], dir.path());
        drop(client);
        let relay = url.trim_start_matches("http://").to_owned();
        let _client = go_client(&go, &relay, &backend_addr);
        rows.push((
            "our server + Go relay-client",
            measure_path(p, &http, &format!("{url}/client/bench")).await,
        ));
        drop(server);
    }
    {
        let port = free_port();
        let _server = Proc(
            Command::new(go.join("bin/http-relay-server"))
                .args(["-port", &port.to_string(), "-log_level", "4"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("Go relay server starts"),
        );
        let relay = format!("127.0.0.1:{port}");
        // The Go relay-client gives up when its first poll is refused.
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&relay).is_err() {
            assert!(Instant::now() < deadline, "Go relay server not listening");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _client = go_client(&go, &relay, &backend_addr);
        rows.push((
            "Go relay server + Go relay-client",
            measure_path(p, &http, &format!("http://{relay}/client/bench")).await,
        ));
    }
    let direct = measure_path(p, &http, &backend.url).await;
    println!("\n### Fleet comparison (v1, cleartext)\n");
    println!(
        "| path | S1 download {} MiB | S2 added p50 / p99 | S3 1 KiB, 64 concurrent |",
        p.mib
    );
    println!("| --- | --- | --- | --- |");
    println!(
        "| direct | {:.0} MiB/s | ({:.3} / {:.3} ms) | {:.0} req/s |",
        direct.s1,
        ms(direct.s2.0),
        ms(direct.s2.1),
        direct.s3
    );
    let added = |x: &Path| {
        (
            (ms(x.s2.0) - ms(direct.s2.0)) * 1000.0,
            (ms(x.s2.1) - ms(direct.s2.1)) * 1000.0,
        )
    };
    for (name, x) in &rows {
        let (p50, p99) = added(x);
        println!(
            "| {name} | {:.0} MiB/s ({:.3}) | +{p50:.0} / +{p99:.0} µs | {:.0} req/s ({:.2}) |",
            x.s1,
            x.s1 / direct.s1,
            x.s3,
            x.s3 / direct.s3
        );
    }
    let (ours, go_relay) = (&rows[1].1, &rows[2].1);
    // Noise can make a tiny added latency zero or negative: no ratio then.
    let s2 = match (added(go_relay).0, added(ours).0) {
        (theirs, ours) if ours > 0.0 => format!("{:.2}x smaller", theirs / ours),
        _ => "not comparable (added latency at or below zero)".to_owned(),
    };
    println!(
        "\nour server + Go relay-client against the Go relay: S2 added p50 {s2}, S3 {:.2}x the throughput, S1 {:.2}x",
        ours.s3 / go_relay.s3,
        ours.s1 / go_relay.s1
    );
}

fn main() {
    let p = Params::from_env();
    let configs = std::env::var("RELAY_BENCH_CONFIGS")
        .unwrap_or_else(|_| "v1-clear,v1-tls,v2-clear,v2-tls,idle,tracing".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let backend = Backend::start().await;
        let ws = WsBackend::start().await;
        let data = bytes::Bytes::from(common::pattern(p.mib * MIB, 1));
        let certs = common::certs();
        let backends = Backends {
            tls: Backend::start_tls(
                http_relay::tls::server_config(&certs.cert, &certs.key).expect("tls"),
            )
            .await,
        };
        println!(
            "relay benchmark: {} MiB bodies, {} serial requests, {} concurrent requests; \
             direct = the same client straight to the backend; throughput: median of {RUNS} runs",
            p.mib, p.serial, p.concurrent
        );
        for config in configs.split(',') {
            match config.trim() {
                "tracing" => measure_tracing(&p, &backend).await,
                "go" => measure_fleet(&p, &backend).await,
                "idle" => measure_idle(&p).await,
                c => {
                    let Some((transport, side)) = c.split_once('-') else {
                        continue;
                    };
                    measure_relayed(
                        &p,
                        &backends,
                        &backend,
                        &ws,
                        &data,
                        transport,
                        side == "tls",
                    )
                    .await;
                }
            }
        }
    });
}
