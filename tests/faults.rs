//! Faults: a dead network path to the server, an unreachable backend.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::observe::within;
use common::{Relay, RelayClient, bounded, client_config};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy whose connections can be frozen: bytes stop flowing but
/// the sockets stay open, as when a robot's network path dies silently.
struct FreezingProxy {
    addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl FreezingProxy {
    async fn start(target: SocketAddr) -> FreezingProxy {
        Self::with_uplink(target, None).await
    }

    /// Bytes towards `target` pass at most at `uplink` bytes per second
    /// (a robot's slow uplink), the other way at full speed.
    async fn with_uplink(target: SocketAddr, uplink: Option<usize>) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (f, a) = (frozen.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((down, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let Ok(up) = TcpStream::connect(target).await else {
                    continue;
                };
                // Connections made after the freeze work again.
                let frozen_now = Arc::new(AtomicBool::new(false));
                let conn_frozen = if f.load(Ordering::SeqCst) {
                    frozen_now
                } else {
                    f.clone()
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pump(dr, uw, conn_frozen.clone(), uplink));
                tokio::spawn(pump(ur, dw, conn_frozen, None));
            }
        });
        FreezingProxy {
            addr,
            frozen,
            accepted,
            _task: task,
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
    rate: Option<usize>,
) {
    // A tenth of a second's worth at a time when throttled.
    let piece = rate.map_or(64 * 1024, |r| (r / 10).max(1));
    let mut buf = vec![0u8; piece];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Swallow everything and keep the sockets open.
            std::future::pending::<()>().await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
        if let Some(rate) = rate {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
    }
}

#[tokio::test]
async fn relay_client_notices_a_dead_connection_within_seconds() {
    let backend = common::backend::Backend::start().await;
    // A request handed to a poll on the frozen connection is never
    // answered; it is reaped with 504 after this.
    let relay = Relay::start(|c| c.timeouts.inactive_request = Duration::from_secs(2)).await;
    let proxy = FreezingProxy::start(relay.addr).await;
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.relay_url = format!("https://127.0.0.1:{}", proxy.addr.port());
    cfg.relay_ping_interval = Duration::from_secs(1);
    cfg.relay_ping_timeout = Duration::from_secs(1);
    let _client = RelayClient::start(cfg);
    relay.wait_for_backend("robot-1").await;
    let before = proxy.accepted.load(Ordering::SeqCst);

    proxy.frozen.store(true, Ordering::SeqCst);
    // Pings go unanswered; the client drops the connection and dials again
    // (well before its 120 s call timeout).
    tokio::time::timeout(Duration::from_secs(10), async {
        while proxy.accepted.load(Ordering::SeqCst) == before {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("no new connection within 10 s of the path dying");

    // A new connection alone serves nobody: requests must be relayed over
    // it. Polls still parked on the frozen connection may take a request
    // first (504), so ask until one is answered by the backend.
    let http = relay.http();
    let hits = backend.hits.load(Ordering::SeqCst);
    let text = within(
        Duration::from_secs(20),
        "a request served after the redial",
        || async {
            let resp = http
                .get(format!("{}/client/robot-1/after-redial", relay.url))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .ok()?;
            if resp.status() != 200 {
                return None;
            }
            resp.text().await.ok()
        },
    )
    .await;
    assert!(text.contains("uri: /after-redial"), "{text}");
    assert!(backend.hits.load(Ordering::SeqCst) > hits);
}

/// A v2 relay-client of `robot-1` that reaches the relay through `proxy`,
/// pinging every second with a second to answer; ready when it returns.
async fn v2_client_through(relay: &Relay, proxy: &FreezingProxy, backend: &str) -> RelayClient {
    let mut cfg = client_config(relay, "robot-1", backend);
    cfg.transport = http_relay::config::Transport::V2;
    cfg.relay_url = format!("https://127.0.0.1:{}", proxy.addr.port());
    cfg.relay_ping_interval = Duration::from_secs(1);
    cfg.relay_ping_timeout = Duration::from_secs(1);
    let client = RelayClient::start(cfg);
    relay.wait_for_backend("robot-1").await;
    client
}

/// v2: a path that dies without a FIN (the proxy swallows everything) is
/// noticed after `relay_ping_interval + relay_ping_timeout` of silence,
/// and the relay-client dials again.
#[tokio::test]
async fn v2_relay_client_notices_a_dead_connection_within_seconds() {
    let backend = common::backend::Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let proxy = FreezingProxy::start(relay.addr).await;
    let _client = v2_client_through(&relay, &proxy, &backend.url).await;
    let before = proxy.accepted.load(Ordering::SeqCst);
    proxy.frozen.store(true, Ordering::SeqCst);
    within(Duration::from_secs(10), "a new connection", || async {
        (proxy.accepted.load(Ordering::SeqCst) > before).then_some(())
    })
    .await;
    within(Duration::from_secs(20), "a request served", || async {
        let resp = relay
            .http()
            .get(format!("{}/client/robot-1/after-redial", relay.url))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        (resp.status() == 200).then_some(())
    })
    .await;
}

/// v2: on a slow uplink busy with a download, the relay-client's pings
/// wait behind the answer's bytes for longer than `relay_ping_timeout`;
/// the tunnel is alive all the same (the server takes those bytes), and
/// the download completes on the one connection.
#[tokio::test]
async fn a_slow_uplink_busy_with_a_download_keeps_its_tunnel() {
    const SIZE: usize = 4 << 20;
    let backend = common::backend::Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let proxy = FreezingProxy::with_uplink(relay.addr, Some(1 << 20)).await;
    let _client = v2_client_through(&relay, &proxy, &backend.url).await;
    let resp = relay
        .http()
        .get(format!("{}/client/robot-1/bytes/{SIZE}", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), SIZE);
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1, "tunnel redialled");
}

#[tokio::test]
async fn unreachable_backend_gets_a_clear_502() {
    // A port with nothing listening.
    let free = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "robot-1", &dead).await;
    let resp = bounded(
        relay
            .http()
            .get(format!("{}/client/robot-1/x", relay.url))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 502);
    assert!(resp.text().await.unwrap().contains("backend unreachable"));
}
