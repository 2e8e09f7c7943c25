//! End-to-end tracing: the real server and relay-client binaries export
//! over OTLP/gRPC to an in-test receiver; a streamed response of several
//! chunks and a WebSocket exchange must form one trace per request, with
//! the span tree and chunk spans of `docs/telemetry.md`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::backend::Backend;
use common::observe::wait_gauge;
use common::otlp::{Received, Receiver};
use common::process::{Proc, sigterm, wait_exit, wait_for_line};
use common::ws::WsBackend;
use common::{bounded, eventually, pattern};
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

/// Server and relay-client processes exporting to `otlp`, relay in
/// cleartext with auth off (both covered elsewhere).
struct Stack {
    url: String,
    server: Proc,
    clients: Vec<Proc>,
}

/// Exports to `otlp`; with `None`, to nothing at all.
fn export_to(cmd: &mut Command, otlp: Option<&Receiver>) {
    match otlp {
        Some(otlp) => cmd.env("HTTP_RELAY_TELEMETRY__OTLP_ENDPOINT", otlp.endpoint()),
        None => cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT"),
    };
}

fn start_server(otlp: Option<&Receiver>, extra_env: &[(&str, &str)]) -> (Proc, String) {
    let mut cmd = Command::new(common::binary());
    cmd.args(["server", "--listen", "127.0.0.1:0", "--no-tls"])
        .env("HTTP_RELAY_AUTH__MODE", "none")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    export_to(&mut cmd, otlp);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut server = Proc(cmd.spawn().unwrap());
    let line = wait_for_line(&mut server.0, "listening on http://");
    let url = line[line.find("http://").unwrap()..].trim().to_owned();
    (server, url)
}

fn start_client(
    otlp: Option<&Receiver>,
    url: &str,
    name: &str,
    backend: &str,
    extra_env: &[(&str, &str)],
) -> Proc {
    let mut cmd = Command::new(common::binary());
    cmd.args([
        "client",
        "--relay-url",
        url,
        "--backend-name",
        name,
        "--backend-url",
        backend,
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    export_to(&mut cmd, otlp);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    Proc(cmd.spawn().unwrap())
}

impl Stack {
    /// Starts the server and one relay-client per `(name, backend_url)`,
    /// all with `env`, and waits until every backend is reachable.
    async fn start(
        otlp: &Receiver,
        env: &[(&str, &str)],
        backends: &[(&str, &str)],
    ) -> (Stack, reqwest::Client) {
        Self::start_with(otlp, env, env, backends).await
    }

    /// [`Stack::start`] with separate environments for the server and
    /// the relay-clients.
    async fn start_with(
        otlp: &Receiver,
        server_env: &[(&str, &str)],
        client_env: &[(&str, &str)],
        backends: &[(&str, &str)],
    ) -> (Stack, reqwest::Client) {
        let (server, url) = start_server(Some(otlp), server_env);
        let clients = backends
            .iter()
            .map(|(name, backend)| start_client(Some(otlp), &url, name, backend, client_env))
            .collect();
        let stack = Stack {
            url,
            server,
            clients,
        };
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        for (name, _) in backends {
            wait_backend(&http, &stack.url, name).await;
        }
        (stack, http)
    }

    /// Stops the clients, then the server, each with SIGTERM (which
    /// flushes their spans), and checks they exit 0.
    fn stop(mut self) {
        for c in &mut self.clients {
            sigterm(&c.0);
            assert_eq!(wait_exit(&mut c.0), Some(0));
        }
        sigterm(&self.server.0);
        assert_eq!(wait_exit(&mut self.server.0), Some(0));
    }
}

async fn wait_backend(http: &reqwest::Client, url: &str, name: &str) {
    eventually(|| async {
        let r = http
            .get(format!("{url}/client/{name}/ready"))
            .send()
            .await
            .ok()?;
        (r.status() != 503).then_some(())
    })
    .await
}

/// `(seq, bytes)` of chunk spans, in order.
fn seq_and_bytes(chunks: &[&Received]) -> Vec<(i64, i64)> {
    let mut v: Vec<(i64, i64)> = chunks
        .iter()
        .map(|c| {
            (
                c.int("relay.chunk.seq").unwrap(),
                c.int("relay.chunk.bytes").unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn by_name<'a>(spans: &'a [Received], name: &str) -> Vec<&'a Received> {
    spans.iter().filter(|s| s.name() == name).collect()
}

fn one<'a>(spans: &'a [Received], name: &str) -> &'a Received {
    let found = by_name(spans, name);
    assert_eq!(
        found.len(),
        1,
        "expected one {name}, got {}: {spans:#?}",
        found.len()
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_from_user_client_to_backend_with_chunk_spans_over_v1() {
    one_trace_with_chunk_spans("v1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_trace_from_user_client_to_backend_with_chunk_spans_over_v2() {
    one_trace_with_chunk_spans("v2").await;
}

/// The same trace shape whatever the transport: chunk spans stand for
/// posted chunks on v1 and for DATA frames on v2.
async fn one_trace_with_chunk_spans(transport: &str) {
    let otlp = Receiver::start().await;
    let backend = Backend::start().await;
    let ws = WsBackend::start().await;
    let (stack, http) = Stack::start_with(
        &otlp,
        &[],
        &[("HTTP_RELAY_TRANSPORT", transport)],
        &[("robot-1", &backend.url), ("ws", &ws.url)],
    )
    .await;

    // 1. A streamed response of several chunks (4 events 300 ms apart,
    // each flushed on its own), under a user-supplied traceparent.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let resp = http
        .get(format!("{}/client/robot-1/sse?n=4&delay_ms=300", stack.url))
        .header("traceparent", format!("00-{trace}-{parent}-01"))
        .send()
        .await
        .unwrap();
    let sse_body = resp.bytes().await.unwrap();

    // 2. A request whose backend echoes its headers: the traceparent the
    // backend saw.
    let trace2 = "0af7651916cd43dd8448eb211c80319c";
    let text = http
        .get(format!("{}/client/robot-1/echo", stack.url))
        .header("traceparent", format!("00-{trace2}-b7ad6b7169203331-01"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let seen = text
        .lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .expect("backend got a traceparent")
        .to_owned();
    assert!(seen.starts_with(&format!("00-{trace2}-")), "{seen}");

    // 3. A WebSocket exchange.
    let tcp = tokio::net::TcpStream::connect(stack.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let (mut sock, _) = tokio_tungstenite::client_async(
        format!(
            "ws://{}/client/ws/echo",
            stack.url.trim_start_matches("http://")
        ),
        tcp,
    )
    .await
    .unwrap();
    let blob = pattern(1000, 5);
    sock.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(
        bounded(sock.next()).await.unwrap().unwrap(),
        Message::binary(blob)
    );
    sock.send(Message::text("bye")).await.unwrap();
    assert_eq!(
        bounded(sock.next()).await.unwrap().unwrap(),
        Message::text("bye")
    );
    sock.close(None).await.unwrap();
    let _ = bounded(sock.next()).await;
    drop(sock);
    // The upgraded connection is over on the server (its spans closed)
    // once no stream and no request is in flight any more.
    for gauge in ["relay_active_streams", "relay_active_requests"] {
        wait_gauge(&http, &stack.url, gauge, 0.0, Duration::from_secs(10)).await;
    }

    stack.stop();
    let spans = otlp.spans();

    // --- the SSE request ---
    let t1: Vec<Received> = spans
        .iter()
        .filter(|s| s.trace_id() == trace)
        .cloned()
        .collect();
    let services: std::collections::BTreeSet<_> = t1.iter().map(|s| s.service.as_str()).collect();
    assert!(
        services.contains("http-relay-server") && services.contains("http-relay-client"),
        "{services:?}"
    );
    let root = one(&t1, "relay.request");
    assert_eq!(
        root.parent_id(),
        parent,
        "the user-supplied traceparent is the root's parent"
    );
    assert_eq!(root.service, "http-relay-server");
    assert_eq!(root.string("http.request.method").as_deref(), Some("GET"));
    assert_eq!(
        root.string("url.path").as_deref(),
        Some("/client/robot-1/sse")
    );
    assert_eq!(root.string("relay.backend").as_deref(), Some("robot-1"));
    assert_eq!(root.int("http.response.status_code"), Some(200));
    assert!(
        root.string("relay.request_id")
            .is_some_and(|id| id.starts_with("robot-1:"))
    );
    assert_eq!(root.int("relay.bytes_out"), Some(sse_body.len() as i64));
    for child in ["relay.enqueue", "relay.first_chunk"] {
        assert_eq!(one(&t1, child).parent_id(), root.span_id(), "{child}");
    }
    let server_chunks = by_name(&t1, "relay.response_chunk");
    assert!(
        server_chunks.len() >= 4,
        "{} chunk spans",
        server_chunks.len()
    );
    assert!(
        server_chunks
            .iter()
            .all(|c| c.parent_id() == root.span_id())
    );
    let mut seqs: Vec<i64> = server_chunks
        .iter()
        .map(|c| c.int("relay.chunk.seq").unwrap())
        .collect();
    seqs.sort();
    assert_eq!(seqs, (0..server_chunks.len() as i64).collect::<Vec<_>>());
    let bytes: i64 = server_chunks
        .iter()
        .map(|c| c.int("relay.chunk.bytes").unwrap())
        .sum();
    assert_eq!(
        bytes,
        sse_body.len() as i64,
        "chunk spans account for every byte"
    );
    assert_eq!(
        server_chunks
            .iter()
            .filter(|c| c.bool("relay.chunk.eof") == Some(true))
            .count(),
        1
    );

    let job = one(&t1, "relay.client.request");
    assert_eq!(job.service, "http-relay-client");
    assert_eq!(
        job.parent_id(),
        root.span_id(),
        "the relay-client continues the server's span"
    );
    let call = one(&t1, "relay.backend_request");
    assert_eq!(call.parent_id(), job.span_id());
    assert_eq!(call.int("http.response.status_code"), Some(200));
    let client_chunks = by_name(&t1, "relay.client.chunk");
    assert_eq!(
        client_chunks.len(),
        server_chunks.len(),
        "one span per chunk on both sides"
    );
    assert!(client_chunks.iter().all(|c| c.parent_id() == job.span_id()));
    assert_eq!(seq_and_bytes(&client_chunks), seq_and_bytes(&server_chunks));

    // --- the echo request: the backend's traceparent is the client's
    // backend-call span ---
    let t2: Vec<Received> = spans
        .iter()
        .filter(|s| s.trace_id() == trace2)
        .cloned()
        .collect();
    let call2 = one(&t2, "relay.backend_request");
    assert!(
        seen.contains(&call2.span_id()),
        "{seen} names {}",
        call2.span_id()
    );

    // --- the WebSocket exchange: stream chunk spans both ways ---
    // (The readiness probe of the ws backend is a plain GET; skip it.)
    let ws_root = spans
        .iter()
        .find(|s| {
            s.name() == "relay.request"
                && s.string("relay.backend").as_deref() == Some("ws")
                && s.int("http.response.status_code") == Some(101)
        })
        .expect("ws relay.request answered 101");
    let ws_spans: Vec<&Received> = spans
        .iter()
        .filter(|s| s.trace_id() == ws_root.trace_id())
        .collect();
    let stream_chunks: Vec<&&Received> = ws_spans
        .iter()
        .filter(|s| s.name() == "relay.stream_chunk")
        .collect();
    for dir in ["to_backend", "to_user"] {
        assert!(
            stream_chunks
                .iter()
                .any(|s| s.string("relay.direction").as_deref() == Some(dir)
                    && s.int("relay.chunk.bytes").unwrap_or(0) > 0
                    && s.parent_id() == ws_root.span_id()),
            "no {dir} stream chunk: {stream_chunks:#?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sample_ratio_zero_exports_nothing() {
    let otlp = Receiver::start().await;
    let backend = Backend::start().await;
    let env = [("HTTP_RELAY_TELEMETRY__SAMPLE_RATIO", "0")];
    let (stack, http) = Stack::start(&otlp, &env, &[("robot-1", &backend.url)]).await;
    for _ in 0..5 {
        let r = http
            .get(format!("{}/client/robot-1/x", stack.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // Control: a sampled parent is still honoured (parent-based sampler),
    // which shows the export itself works in this run.
    let sampled = "11111111111111111111111111111111";
    let r = http
        .get(format!("{}/client/robot-1/x", stack.url))
        .header("traceparent", format!("00-{sampled}-2222222222222222-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    stack.stop();
    let spans = otlp.spans();
    assert!(
        spans.iter().any(|s| s.trace_id() == sampled),
        "control trace exported"
    );
    let others: Vec<_> = spans.iter().filter(|s| s.trace_id() != sampled).collect();
    assert!(
        others.is_empty(),
        "unsampled requests exported spans: {others:#?}"
    );
}

/// The `traceparent` the backend saw, from its description of the request.
fn backend_traceparent(text: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix("traceparent: "))
        .unwrap_or_else(|| panic!("backend saw no traceparent: {text}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_unsampled_decision_travels_to_the_backend() {
    let otlp = Receiver::start().await;
    let backend = Backend::start().await;
    // The server samples nothing; the relay-client runs on its defaults.
    let (server, url) = start_server(Some(&otlp), &[("HTTP_RELAY_TELEMETRY__SAMPLE_RATIO", "0")]);
    let client = start_client(Some(&otlp), &url, "robot-1", &backend.url, &[]);
    let stack = Stack {
        url,
        server,
        clients: vec![client],
    };
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    wait_backend(&http, &stack.url, "robot-1").await;
    let get = |traceparent: Option<String>| {
        let mut req = http.get(format!("{}/client/robot-1/x", stack.url));
        if let Some(tp) = traceparent {
            req = req.header("traceparent", tp);
        }
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            backend_traceparent(&r.text().await.unwrap())
        }
    };

    // No incoming context: a valid one with the sampled flag off, a new
    // trace per request.
    let (a, b) = (get(None).await, get(None).await);
    for tp in [&a, &b] {
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!((parts[0], parts[3]), ("00", "00"), "unsampled: {tp}");
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16), "{tp}");
        assert!(
            parts[1] != "0".repeat(32) && parts[2] != "0".repeat(16),
            "{tp}"
        );
    }
    assert_ne!(a.split('-').nth(1), b.split('-').nth(1));

    // An incoming unsampled context is the trace that reaches the backend.
    let unsampled = "33333333333333333333333333333333";
    let seen = get(Some(format!("00-{unsampled}-4444444444444444-00"))).await;
    assert!(seen.starts_with(&format!("00-{unsampled}-")), "{seen}");
    assert!(seen.ends_with("-00"), "{seen}");

    // A malformed context asking to be sampled (ids too short, which a
    // lenient parser reads as trace 1, span 2) is not followed: the
    // request gets a fresh unsampled context, and nothing is exported.
    let seen = get(Some("00-1-2-01".to_owned())).await;
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen}");
    assert_eq!((parts[1].len(), parts[3]), (32, "00"), "{seen}");
    assert_ne!(parts[1], format!("{:032x}", 1), "{seen}");

    // Control: a sampled parent is recorded, so export works in this run.
    let sampled = "55555555555555555555555555555555";
    let seen = get(Some(format!("00-{sampled}-6666666666666666-01"))).await;
    assert!(
        seen.starts_with(&format!("00-{sampled}-")) && seen.ends_with("-01"),
        "{seen}"
    );
    stack.stop();
    let spans = otlp.spans();
    assert!(
        spans.iter().any(|s| s.trace_id() == sampled),
        "control trace exported"
    );
    let others: Vec<_> = spans.iter().filter(|s| s.trace_id() != sampled).collect();
    assert!(
        others.is_empty(),
        "unsampled requests exported spans: {others:#?}"
    );
}

/// A log line written inside an exported span names that span's trace and
/// span ids, in both log formats and on both transports; the line about
/// one request names its id itself (`docs/telemetry.md`).
#[tokio::test(flavor = "multi_thread")]
async fn log_lines_inside_a_request_carry_its_trace_and_span_ids() {
    for (format, transport) in [
        ("json", "v1"),
        ("human", "v1"),
        ("json", "v2"),
        ("human", "v2"),
    ] {
        let otlp = Receiver::start().await;
        let (server, url) = start_server(Some(&otlp), &[]);
        // Nothing listens on the backend port: the relay-client answers
        // 502 and logs a warning inside its `relay.client.request` span.
        let mut cmd = Command::new(common::binary());
        cmd.args(["--log-format", format, "client", "--relay-url", &url])
            .args(["--backend-name", "robot-1"])
            .args(["--backend-url", "http://127.0.0.1:9"])
            .env("HTTP_RELAY_TRANSPORT", transport)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        export_to(&mut cmd, Some(&otlp));
        let mut client = Proc(cmd.spawn().unwrap());
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        wait_backend(&http, &url, "robot-1").await;
        let line = wait_for_line(&mut client.0, "answering with an error");
        let stack = Stack {
            url,
            server,
            clients: vec![client],
        };
        stack.stop();
        let spans = otlp.spans();
        let job = one(&spans, "relay.client.request");
        let (trace, span) = (job.trace_id(), job.span_id());
        let id = job.string("relay.request_id").unwrap();
        assert!(!id.is_empty() && id != "-", "{transport}");
        match format {
            "json" => {
                let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                assert_eq!(v["trace_id"], trace.as_str(), "{line}");
                assert_eq!(v["span_id"], span.as_str(), "{line}");
                assert_eq!(v["fields"]["message"], "answering with an error");
                assert_eq!(v["fields"]["id"], id.as_str(), "{line}");
            }
            _ => {
                assert!(
                    line.trim_end()
                        .ends_with(&format!(" trace_id={trace} span_id={span}")),
                    "{line}"
                );
                assert!(line.contains(&format!(" id={id:?} ")), "{line}");
            }
        }
    }
}

/// A relay that exports nothing makes no sampling decision: the trace
/// context reaches the backend as the user-client sent it, over v1 and v2,
/// and none appears where none was sent.
#[tokio::test(flavor = "multi_thread")]
async fn without_an_exporter_the_trace_context_passes_through_untouched() {
    let backend = Backend::start().await;
    let (server, url) = start_server(None, &[]);
    let client = |name: &str, transport: &str| {
        start_client(
            None,
            &url,
            name,
            &backend.url,
            &[("HTTP_RELAY_TRANSPORT", transport)],
        )
    };
    let clients = vec![client("robot-v1", "v1"), client("robot-v2", "v2")];
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for name in ["robot-v1", "robot-v2"] {
        wait_backend(&http, &url, name).await;
        let sent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let r = http
            .get(format!("{url}/client/{name}/x"))
            .header("traceparent", sent)
            .header("tracestate", "vendor=x1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert_eq!(backend_traceparent(&text), sent, "{name}");
        assert!(text.contains("tracestate: vendor=x1"), "{name}: {text}");
        let r = http
            .get(format!("{url}/client/{name}/x"))
            .send()
            .await
            .unwrap();
        let text = r.text().await.unwrap();
        assert!(!text.contains("traceparent"), "{name}: {text}");
    }
    Stack {
        url,
        server,
        clients,
    }
    .stop();
}
