//! Graceful shutdown (new work refused with 503, requests in flight
//! finish, and are cut off at the deadline), in-process and of the real
//! binary on SIGTERM, and the embedded default start (development
//! certificates created on the fly).

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use common::backend::Backend;
use common::observe::within;
use common::process::{Proc, sigterm, wait_exit, wait_for_line};
use common::{Relay, RelayClient, bounded, eventually};
use futures::StreamExt as _;

#[tokio::test]
async fn in_flight_requests_finish_and_new_ones_are_refused() {
    let backend = Backend::start().await;
    let mut relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let http = relay.http();
    let before = backend.hits.load(SeqCst);
    let slow = tokio::spawn({
        let http = http.clone();
        let url = format!("{}/client/robot-1/slow?ms=1500", relay.url);
        async move { http.get(url).send().await.unwrap() }
    });
    // In flight: the backend is working on it.
    eventually(|| async { (backend.hits.load(SeqCst) > before).then_some(()) }).await;
    let stopped = relay.signal_stop();

    // Shutdown has begun once new user requests are refused.
    let refused = eventually(|| async {
        let r = http
            .get(format!("{}/client/robot-1/x", relay.url))
            .send()
            .await
            .unwrap();
        (r.status() == 503).then_some(r)
    })
    .await;
    let text = refused.text().await.unwrap();
    assert!(
        text.contains("shutting down"),
        "no new work while draining: {text}"
    );
    let poll = http
        .get(format!("{}/server/request?server=robot-1", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(poll.status(), 503, "no new polls while draining");

    let resp = bounded(slow).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "slow");
    bounded(stopped).await.unwrap().unwrap();
}

#[tokio::test]
async fn run_returns_at_the_shutdown_deadline_despite_an_endless_stream() {
    let backend = Backend::start().await;
    let mut relay = Relay::start(|c| c.timeouts.shutdown = Duration::from_secs(1)).await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let resp = relay
        .http()
        .get(format!("{}/client/robot-1/forever", relay.url))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    bounded(body.next()).await.unwrap().unwrap();
    assert_eq!(backend.open_streams.load(SeqCst), 1);

    let stopped = relay.signal_stop();
    // The 1 s drain deadline, plus the server's short grace for closing
    // connections, plus slack: an endless stream must not hold `run`.
    let returned = tokio::time::timeout(Duration::from_secs(8), stopped).await;
    returned
        .expect("server still running 8 s after shutdown with a 1 s deadline")
        .unwrap()
        .unwrap();
    // The relay-client can no longer deliver, so it ends the backend call.
    within(Duration::from_secs(5), "backend call dropped", || async {
        (backend.open_streams.load(SeqCst) == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn binary_cuts_off_an_endless_stream_at_the_shutdown_deadline() {
    let backend = Backend::start().await;
    let mut server = Proc(
        Command::new(common::binary())
            .args(["server", "--listen", "127.0.0.1:0", "--no-tls"])
            .env("HTTP_RELAY_AUTH__MODE", "none")
            .env("HTTP_RELAY_TIMEOUTS__SHUTDOWN", "1s")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = wait_for_line(&mut server.0, "listening on http://");
    let url = line[line.find("http://").unwrap()..].trim().to_owned();
    let _client = RelayClient::start(http_relay::config::ClientConfig {
        relay_url: url.clone(),
        backend_name: "robot-1".into(),
        backend_url: backend.url.clone(),
        ..Default::default()
    });
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = eventually(|| async {
        let r = http
            .get(format!("{url}/client/robot-1/forever"))
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(r)
    })
    .await;
    let mut body = resp.bytes_stream();
    bounded(body.next()).await.unwrap().unwrap();

    sigterm(&server.0);
    // Drained for 1 s, then the connections are closed: the stream ends
    // (with an error, as the body is incomplete) and the process exits 0.
    let cut = tokio::time::timeout(Duration::from_secs(8), async {
        while let Some(Ok(_)) = body.next().await {}
    })
    .await;
    assert!(cut.is_ok(), "stream still open 8 s after SIGTERM");
    assert_eq!(wait_exit(&mut server.0), Some(0));
}

#[tokio::test]
async fn binary_serves_on_the_embedded_default_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Backend::start().await;
    let mut server = Proc(
        Command::new(common::binary())
            .args(["server", "--listen", "127.0.0.1:0"])
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = wait_for_line(&mut server.0, "listening on https://");
    let url = line[line.find("https://").unwrap()..].trim().to_owned();
    let ca = dir.path().join("certs/ca.pem");
    assert!(ca.exists(), "dev CA created under certs/");
    assert!(dir.path().join("certs/server.key").exists());

    // The embedded default authenticates with the development issuer.
    let mint = |role: &str| {
        let out = Command::new(common::binary())
            .args(["token", "--role", role, "--backend", "robot-1"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let relay_token = dir.path().join("relay.token");
    std::fs::write(&relay_token, mint("relay")).unwrap();
    let user_token = mint("user");

    let mut client = Proc(
        Command::new(common::binary())
            .args(["client", "--relay-url", &url, "--backend-name", "robot-1"])
            .args(["--backend-url", &backend.url, "--token-file"])
            .arg(&relay_token)
            .arg("--ca-file")
            .arg(&ca)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pem = std::fs::read(&ca).unwrap();
    let http = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .no_proxy()
        .build()
        .unwrap();
    let unauthenticated = http
        .get(format!("{url}/client/robot-1/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let text = eventually(|| async {
        let r = http
            .get(format!("{url}/client/robot-1/hello?x=1"))
            .bearer_auth(&user_token)
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        r.text().await.ok()
    })
    .await;
    assert!(text.contains("uri: /hello?x=1"), "{text}");
    assert!(
        !text.to_lowercase().contains("authorization"),
        "token not relayed: {text}"
    );

    sigterm(&client.0);
    assert_eq!(wait_exit(&mut client.0), Some(0));
    sigterm(&server.0);
    assert_eq!(wait_exit(&mut server.0), Some(0));
}

#[test]
fn bad_config_fails_at_start_naming_key_and_source() {
    let out = Command::new(common::binary())
        .args(["server", "--listen", "127.0.0.1:0"])
        .env("HTTP_RELAY_TIMEOUTS__POLL", "soon")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("timeouts.poll"), "{err}");
    assert!(err.contains("http_relay_"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("s.toml");
    std::fs::write(&file, "[limits]\nmax_request_body = \"lots\"\n").unwrap();
    let out = Command::new(common::binary())
        .args(["server", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.max_request_body"), "{err}");
    assert!(err.contains("s.toml"), "{err}");

    let out = Command::new(common::binary())
        .args(["client", "--relay-url", "https://127.0.0.1:1"])
        .env_remove("HTTP_RELAY_BACKEND_NAME")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("backend_name"));
}

/// A v1 request still waiting for its answer's head at the drain deadline
/// gets a status (503) before the server closes its connections, not a
/// connection dropped without a word.
#[tokio::test]
async fn a_request_unanswered_at_the_shutdown_deadline_gets_a_status() {
    let mut relay = Relay::start(|c| c.timeouts.shutdown = Duration::from_secs(1)).await;
    let http = relay.http();
    // A relay-client that takes the request and never answers.
    let poll_url = format!("{}/server/request?server=mute", relay.url);
    let _ = http
        .get(&poll_url)
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    let poller = tokio::spawn({
        let http = http.clone();
        async move { http.get(poll_url).send().await }
    });
    let user = tokio::spawn({
        let http = http.clone();
        let url = format!("{}/client/mute/x", relay.url);
        async move { http.get(url).send().await }
    });
    let taken = bounded(poller).await.unwrap().unwrap();
    assert_eq!(taken.status(), 200);
    let stopped = relay.signal_stop();
    let resp = bounded(user)
        .await
        .unwrap()
        .expect("an answer, not a dropped connection");
    assert_eq!(resp.status(), 503);
    bounded(stopped).await.unwrap().unwrap();
}

/// A v1 relay-client stopped while a request still waits on its backend
/// past the grace period tells the server so: the user gets an error at
/// once, not at `timeouts.inactive_request` (a minute).
#[tokio::test]
async fn a_request_the_relay_client_abandons_at_shutdown_fails_at_once() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| c.timeouts.inactive_request = Duration::from_secs(60)).await;
    let mut cfg = common::client_config(&relay, "robot-1", &backend.url);
    cfg.transport = http_relay::config::Transport::V1;
    let mut client = RelayClient::start(cfg);
    relay.wait_for_backend("robot-1").await;
    let user = tokio::spawn({
        let http = relay.http();
        let url = format!("{}/client/robot-1/hang", relay.url);
        async move { http.get(url).send().await }
    });
    eventually(|| async { (backend.hanging.load(SeqCst) == 1).then_some(()) }).await;
    // Returns once the grace (10 s) is over and the request abandoned.
    client.stop().await;
    let started = std::time::Instant::now();
    let resp = bounded(user).await.unwrap().expect("an answer");
    assert_eq!(resp.status(), 502);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        started.elapsed()
    );
}
