//! Streamed and large bodies: server-sent events arrive while the backend
//! is still sending, large bodies arrive byte-exact, and a user-client that
//! goes away frees its request at once.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::backend::Backend;
use common::{Relay, RelayClient, bounded, pattern, sha256_hex};
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

    // A long stream: 600 events 50 ms apart (30 s).
    let resp = relay
        .http()
        .get(format!(
            "{}/client/robot-1/sse?n=600&delay_ms=50",
            relay.url
        ))
        .send()
        .await
        .unwrap();
    let mut body = resp.bytes_stream();
    bounded(body.next()).await.unwrap().unwrap();
    assert_eq!(backend.open_streams.load(Ordering::SeqCst), 1);
    drop(body);

    // The relay-client's next post gets 400 and it drops the backend call.
    bounded(async {
        while backend.open_streams.load(Ordering::SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
