//! Streamed and large bodies: server-sent events arrive while the backend
//! is still sending, large bodies arrive byte-exact, a user-client that
//! goes away frees its request at once, and keep-alive chunks carry a
//! quiet stream past the inactive-request timeout.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::backend::Backend;
use common::observe::{gauge, wait_gauge, within};
use common::{Relay, RelayClient, bounded, client_config, pattern, sha256_hex};
use futures::StreamExt as _;

#[tokio::test]
async fn first_event_arrives_before_the_backend_finishes() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;

    // 4 events 700 ms apart: the backend needs about 2.1 s in all.
    let started = Instant::now();
    let resp = relay
        .http()
        .get(format!("{}/client/robot-1/sse?n=4&delay_ms=700", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let first = bounded(body.next()).await.unwrap().unwrap();
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).starts_with("data: event 0"));
    let mut rest = Vec::new();
    while let Some(chunk) = bounded(body.next()).await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let done_at = started.elapsed();
    assert!(
        first_at + Duration::from_millis(1500) < done_at,
        "first event at {first_at:?} came only shortly before the end at {done_at:?}"
    );
    let text = String::from_utf8(rest).unwrap();
    assert!(text.contains("event 3"), "{text}");
}

#[tokio::test]
async fn hundred_mib_response_arrives_byte_exact() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let n = 100 * 1024 * 1024;
    let resp = relay
        .http()
        .get(format!("{}/client/robot-1/bytes/{n}", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = bounded(resp.bytes()).await.unwrap();
    assert_eq!(body.len(), n);
    assert_eq!(sha256_hex(&body), sha256_hex(&pattern(n, n as u64)));
}

#[tokio::test]
async fn fifty_mib_request_body_arrives_byte_exact() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let data = pattern(50 * 1024 * 1024, 7);
    let expected = sha256_hex(&data);
    let resp = relay
        .http()
        .post(format!("{}/client/robot-1/hash", relay.url))
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), expected);
}

#[tokio::test]
async fn user_client_that_goes_away_frees_the_backend_call() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let http = relay.http();

    // A stream that never ends by itself: only the relay can end it.
    let resp = http
        .get(format!("{}/client/robot-1/forever?delay_ms=200", relay.url))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    bounded(body.next()).await.unwrap().unwrap();
    assert_eq!(backend.open_streams.load(Ordering::SeqCst), 1);
    let in_flight = gauge(&http, &relay.url, "relay_active_requests").await;
    assert!(in_flight >= Some(1.0), "stream not counted: {in_flight:?}");
    drop(body);

    // The relay-client's next post (at most 200 ms later) gets 400 and it
    // drops the backend call; nothing of the request stays on the server.
    within(
        FREED,
        "backend stream dropped after the user left",
        || async { (backend.open_streams.load(Ordering::SeqCst) == 0).then_some(()) },
    )
    .await;
    wait_gauge(&http, &relay.url, "relay_active_requests", 0.0, FREED).await;
}

/// How long freeing a departed user-client's request may take: a few of
/// the backend's 200 ms event intervals, far below any reaping timeout.
const FREED: Duration = Duration::from_secs(5);

/// A backend that sends one event, stays silent for 3 s, then sends the
/// last one, relayed by a server that reaps after 1 s without a chunk and
/// a relay-client with `keepalive`. Returns the user's body, or the error
/// that cut it.
async fn quiet_stream(keepalive: Duration) -> Result<String, String> {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| c.timeouts.inactive_request = Duration::from_secs(1)).await;
    let mut cfg = client_config(&relay, "robot-1", &backend.url);
    cfg.keepalive_interval = keepalive;
    let _client = RelayClient::start(cfg);
    relay.wait_for_backend("robot-1").await;

    let resp = relay
        .http()
        .get(format!(
            "{}/client/robot-1/sse?n=2&delay_ms=3000",
            relay.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    let mut text = Vec::new();
    while let Some(chunk) = bounded(body.next()).await {
        match chunk {
            Ok(c) => text.extend_from_slice(&c),
            Err(e) => {
                return Err(format!("{e:?} after {:?}", String::from_utf8_lossy(&text)));
            }
        }
    }
    Ok(String::from_utf8(text).unwrap())
}

#[tokio::test]
async fn keepalive_chunks_keep_a_quiet_stream_past_inactive_request() {
    let body = quiet_stream(Duration::from_millis(300)).await;
    assert_eq!(
        body.as_deref(),
        Ok("data: event 0\n\ndata: event 1\n\n"),
        "the 3 s of silence are bridged by keep-alive chunks"
    );
}

#[tokio::test]
async fn quiet_stream_without_keepalive_is_cut_at_inactive_request() {
    // The control of the test above: the same silence with keep-alives
    // rarer than the server's inactive-request timeout.
    let body = quiet_stream(Duration::from_secs(10)).await;
    assert!(
        !body.as_deref().is_ok_and(|b| b.contains("event 1")),
        "stream survived 3 s of silence without keep-alives: {body:?}"
    );
}

/// v1 has no abort message of the fleet's: a backend answer that breaks
/// off is marked `aborted` by our relay-client, and the user-client sees
/// the answer fail (a 502, or a body that errors), never a complete short
/// body, on chunked HTTP/1.1 and on HTTP/2.
#[tokio::test]
async fn v1_a_backend_answer_that_breaks_off_never_looks_complete() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let url = common::backend::raw_backend(|mut tcp| async move {
        let mut buf = [0u8; 4096];
        let _ = tcp.read(&mut buf).await;
        let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n7530\r\n";
        let _ = tcp.write_all(head.as_bytes()).await;
        let _ = tcp.write_all(&[b'x'; 20000]).await;
        // Gone, 10000 bytes into a chunk of 30000.
    })
    .await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::start(client_config(&relay, "robot-1", &url));
    relay.wait_for_backend("robot-1").await;
    for http in [relay.http1(), relay.http2()] {
        let resp = bounded(http.get(format!("{}/client/robot-1/x", relay.url)).send())
            .await
            .unwrap();
        if resp.status() == 502 {
            continue;
        }
        common::assert_cut_off(resp).await;
    }
}

/// Headers a backend names in its `Connection` header are about its
/// connection to the relay-client: they reach no user-client, on v1 or
/// v2 (the relay-client must drop them with `Connection` itself).
#[tokio::test]
async fn headers_named_in_a_backends_connection_header_stay_behind() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let url = common::backend::raw_backend(|mut tcp| async move {
        let mut buf = [0u8; 4096];
        while let Ok(1..) = tcp.read(&mut buf).await {
            let answer = "HTTP/1.1 200 OK\r\nconnection: x-hop\r\nx-hop: 1\r\n\
                          x-end: 2\r\ncontent-length: 2\r\n\r\nok";
            if tcp.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    for transport in [
        http_relay::config::Transport::V1,
        http_relay::config::Transport::V2,
    ] {
        let relay = Relay::start(|_| {}).await;
        let mut cfg = client_config(&relay, "robot-1", &url);
        cfg.transport = transport;
        let _client = RelayClient::start(cfg);
        relay.wait_for_backend("robot-1").await;
        let resp = bounded(
            relay
                .http()
                .get(format!("{}/client/robot-1/x", relay.url))
                .send(),
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-end"], "2", "{transport:?}");
        assert!(
            !resp.headers().contains_key("x-hop"),
            "{transport:?}: {:?}",
            resp.headers()
        );
    }
}
