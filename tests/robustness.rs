//! Input from the internet and from configuration that must not hurt:
//! a flood of bad tokens does not flood the log, absurd durations and
//! colliding audience templates are refused at start, an IdP's absurd
//! `expires_in` does not panic the relay-client, and a backend that never
//! answers (or a flood of requests) cannot pin the relay-client's tasks.

mod common;

use std::convert::Infallible;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::backend::Backend;
use common::process::{Proc, sigterm, wait_exit};
use common::{Relay, RelayClient, bounded, client_config, eventually};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Collects a child's stderr lines in the background.
fn collect_stderr(child: &mut std::process::Child) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

/// The value of `key=<number>` in a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[tokio::test]
async fn a_flood_of_bad_tokens_is_counted_but_not_logged_line_by_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(common::binary())
        .args(["server", "--listen", "127.0.0.1:0", "--no-tls"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect_stderr(&mut child);
    let mut server = Proc(child);
    let url = eventually(|| async {
        let lines = lines.lock().unwrap();
        let line = lines.iter().find(|l| l.contains("listening on http://"))?;
        Some(line[line.find("http://").unwrap()..].trim().to_owned())
    })
    .await;

    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    const FLOOD: u64 = 300;
    let mut refused = Vec::new();
    for _ in 0..FLOOD {
        refused.push(
            http.get(format!("{url}/client/robot-1/x"))
                .bearer_auth("not-a-jwt")
                .send(),
        );
    }
    for r in futures::future::join_all(refused).await {
        assert_eq!(r.unwrap().status(), 401);
    }
    // Every refusal is counted.
    let metrics = http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(&format!(
            "relay_auth_failures_total{{reason=\"malformed\"}} {FLOOD}"
        )),
        "{metrics}"
    );
    // The lines: a few per second, then summaries that account for the
    // rest (written once each window is over).
    let (logged, suppressed) = eventually(|| async {
        let lines = lines.lock().unwrap();
        let logged = lines
            .iter()
            .filter(|l| l.contains("authentication failed") && !l.contains("more times"))
            .count() as u64;
        let suppressed: u64 = lines
            .iter()
            .filter(|l| l.contains("more times"))
            .filter_map(|l| field(l, "suppressed"))
            .sum();
        (logged + suppressed == FLOOD).then_some((logged, suppressed))
    })
    .await;
    assert!(
        logged <= 20,
        "{logged} refusal lines for {FLOOD} refusals (suppressed {suppressed})"
    );
    sigterm(&server.0);
    assert_eq!(wait_exit(&mut server.0), Some(0));
}

/// Runs the binary with `env` and returns its exit code and stderr.
fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(common::binary());
    cmd.args(args)
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = Proc(cmd.spawn().unwrap());
    let code = wait_exit(&mut child.0);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
    (code, err)
}

#[test]
fn absurd_durations_are_refused_at_start_naming_the_key() {
    let server = ["server", "--listen", "127.0.0.1:0", "--no-tls"];
    for key in [
        "TIMEOUTS__RELAY",
        "TIMEOUTS__POLL",
        "TIMEOUTS__INACTIVE_REQUEST",
        "AUTH__UNKNOWN_KID_COOLDOWN",
    ] {
        let var = format!("HTTP_RELAY_{key}");
        let (code, err) = run_with_env(&server, &[(&var, "300000000000y")]);
        let dotted = key.to_lowercase().replace("__", ".");
        assert_eq!(code, Some(1), "{key}: {err}");
        assert!(
            err.contains(&dotted) && err.contains("at most"),
            "{key}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    let client = [
        "client",
        "--relay-url",
        "http://127.0.0.1:9",
        "--backend-name",
        "r",
    ];
    for key in ["KEEPALIVE_INTERVAL", "FLUSH_INTERVAL", "BACKEND_TIMEOUT"] {
        let var = format!("HTTP_RELAY_{key}");
        let (code, err) = run_with_env(&client, &[(&var, "300000000000y")]);
        assert_eq!(code, Some(1), "{key}: {err}");
        assert!(err.contains(&key.to_lowercase()), "{key}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn audience_templates_that_can_collide_are_refused_at_start() {
    let server = ["server", "--listen", "127.0.0.1:0", "--no-tls"];
    // A user token for backend `relay-X` would be a relay token for X.
    let (code, err) = run_with_env(
        &server,
        &[
            ("HTTP_RELAY_AUTH__USER_AUDIENCE", "{backend}"),
            ("HTTP_RELAY_AUTH__RELAY_AUDIENCE", "relay-{backend}"),
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("auth.relay_audience"), "{err}");
    assert!(err.contains("same audience"), "{err}");
    // Fixed parts that differ at the end cannot collide.
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(common::binary())
        .args(server)
        .current_dir(dir.path())
        .env("HTTP_RELAY_AUTH__USER_AUDIENCE", "{backend}.users")
        .env("HTTP_RELAY_AUTH__RELAY_AUDIENCE", "{backend}.relays")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = common::process::wait_for_line(&mut child, "listening on");
    assert!(line.contains("http://"), "{line}");
    let mut child = Proc(child);
    sigterm(&child.0);
    assert_eq!(wait_exit(&mut child.0), Some(0));
}

/// An OIDC issuer whose token endpoint answers an absurd `expires_in`.
async fn issuer_with_expires_in(expires_in: u64) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (base, count) = (url.clone(), calls.clone());
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (base, count) = (base.clone(), count.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let body = if req.uri().path().ends_with("openid-configuration") {
                        serde_json::json!({"issuer": base, "token_endpoint": format!("{base}/token")})
                    } else {
                        count.fetch_add(1, SeqCst);
                        serde_json::json!({"access_token": "opaque", "expires_in": expires_in})
                    };
                    async move {
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body.to_string())))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (url, calls)
}

#[tokio::test]
async fn an_absurd_token_lifetime_from_the_idp_does_not_break_the_relay_client() {
    let (issuer, calls) = issuer_with_expires_in(u64::MAX).await;
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "pw").unwrap();
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.auth.issuer = Some(issuer);
    cfg.auth.client_id = Some("robot-1".into());
    cfg.auth.client_secret_file = Some(secret.path().to_owned());
    cfg.auth.audience = Some("relay".into());
    let _client = RelayClient::start(cfg);
    relay.wait_for_backend("robot-1").await;
    for _ in 0..5 {
        let r = relay
            .http()
            .get(format!("{}/client/robot-1/x", relay.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // One token, cached (its life clamped, not believed to be forever
    // or turned into an overflow).
    assert_eq!(calls.load(SeqCst), 1);
}

#[tokio::test]
async fn a_backend_that_never_answers_does_not_pin_the_relay_client() {
    let backend = Backend::start().await;
    // The server would wait a minute; the relay-client gives up first.
    let relay = Relay::start(|c| c.timeouts.inactive_request = Duration::from_secs(60)).await;
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.backend_timeout = Duration::from_secs(1);
    let _client = RelayClient::start(cfg);
    relay.wait_for_backend("robot-1").await;
    let resp = bounded(
        relay
            .http()
            .get(format!("{}/client/robot-1/hang", relay.url))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 504);
    let text = resp.text().await.unwrap();
    assert!(text.contains("did not answer within 1s"), "{text}");
    // The backend call was dropped: no handler is left hanging.
    eventually(|| async { (backend.hanging.load(SeqCst) == 0).then_some(()) }).await;
}

#[tokio::test]
async fn requests_over_the_relay_clients_cap_are_refused_at_once() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.max_concurrent_requests = 2;
    // v1 cannot tell the relay-client that a user-client left before the
    // backend's head: the backend timeout is what frees the permits.
    cfg.backend_timeout = Duration::from_secs(3);
    let _client = RelayClient::start(cfg);
    relay.wait_for_backend("robot-1").await;
    let http = relay.http();
    let hang = |http: reqwest::Client| {
        let url = format!("{}/client/robot-1/hang", relay.url);
        tokio::spawn(async move { http.get(url).send().await })
    };
    let held = [hang(http.clone()), hang(http.clone())];
    eventually(|| async { (backend.hanging.load(SeqCst) == 2).then_some(()) }).await;
    let resp = bounded(http.get(format!("{}/client/robot-1/x", relay.url)).send())
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    let text = resp.text().await.unwrap();
    assert!(text.contains("max_concurrent_requests"), "{text}");
    // Once the held calls time out, the permits are back.
    for h in held {
        assert_eq!(bounded(h).await.unwrap().unwrap().status(), 504);
    }
    common::observe::until_ok(&http, &format!("{}/client/robot-1/x", relay.url)).await;
}
