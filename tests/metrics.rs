//! Prometheus metrics: the fleet's `broker_*` names and labels, the added
//! gauges and counters, the admin listener, and deletion of a reaped
//! backend's series.

mod common;

use std::time::Duration;

use common::backend::Backend;
use common::{Relay, RelayClient};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn scrape(http: &reqwest::Client, url: &str) -> String {
    let resp = http.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    resp.text().await.unwrap()
}

/// The value of the series whose line starts with `series`.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn counters_move_after_traffic() {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "robot-1", &backend.url).await;
    let http = relay.http();
    let before = scrape(&http, &relay.url).await;
    let client_req = "broker_requests{backend=\"robot-1\",method=\"client\"}";
    let n0 = value(&before, client_req).unwrap_or(0.0);
    for _ in 0..3 {
        let r = http
            .get(format!("{}/client/robot-1/bytes/1000", relay.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.bytes().await.unwrap().len(), 1000);
    }
    let text = scrape(&http, &relay.url).await;
    assert_eq!(value(&text, client_req), Some(n0 + 3.0), "{text}");
    assert!(
        !text.contains("broker_requests_total"),
        "fleet names unchanged"
    );
    assert!(
        value(
            &text,
            "broker_responses{backend=\"robot-1\",method=\"client\",result=\"ok\"}"
        )
        .unwrap()
            >= 3.0
    );
    assert!(
        value(
            &text,
            "broker_requests{backend=\"robot-1\",method=\"server_request\"}"
        )
        .unwrap()
            >= 3.0
    );
    assert!(
        value(
            &text,
            "broker_requests{backend=\"robot-1\",method=\"server_response\"}"
        )
        .unwrap()
            >= 3.0
    );
    assert!(
        value(
            &text,
            "broker_responses_durations_count{backend=\"robot-1\",method=\"client\"}"
        )
        .unwrap()
            >= 3.0
    );
    assert!(
        value(
            &text,
            "broker_backend_responses_durations_count{backend=\"robot-1\",method=\"client\"}"
        )
        .unwrap()
            >= 3.0
    );
    assert!(
        value(
            &text,
            "broker_overhead_durations_count{backend=\"robot-1\",method=\"client\"}"
        )
        .unwrap()
            >= 3.0
    );
    assert!(value(&text, "relay_bytes_total{direction=\"to_user\"}").unwrap() >= 3000.0);
    assert_eq!(value(&text, "relay_connected_backends"), Some(1.0));
    assert!(text.contains("relay_active_requests"));
    assert!(text.contains("relay_active_streams"));

    // Unknown backends are counted by result, all under one label value:
    // user-clients pick the names.
    let unknown = "broker_responses{backend=\"-\",method=\"client\",result=\"unknown_client\"}";
    let u0 = value(&scrape(&http, &relay.url).await, unknown).unwrap_or(0.0);
    for name in ["nobody", "someone", "anyone"] {
        let r = http
            .get(format!("{}/client/{name}/x", relay.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
    }
    let text = scrape(&http, &relay.url).await;
    assert_eq!(value(&text, unknown), Some(u0 + 3.0), "{text}");
    assert!(!text.contains("nobody"), "{text}");

    // TLS handshake failures are counted.
    let mut tcp = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let _ = tcp.read_to_end(&mut Vec::new()).await;
    let text = scrape(&http, &relay.url).await;
    assert!(
        value(&text, "relay_tls_handshake_failures_total").unwrap() >= 1.0,
        "{text}"
    );
}

/// The admin listener has the public one's time limits: a connection
/// that sends no request is closed after `timeouts.header_read`.
#[tokio::test]
async fn a_silent_admin_connection_is_closed() {
    use tokio::io::AsyncReadExt as _;
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = admin.local_addr().unwrap();
    let _relay = Relay::start_with_admin(
        |c| {
            c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
            c.timeouts.header_read = Duration::from_secs(1);
        },
        Some(admin),
    )
    .await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(
        read.is_ok(),
        "a silent admin connection still open after 10 s"
    );
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));
}

#[tokio::test]
async fn admin_listener_takes_metrics_off_the_public_port() {
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_url = format!("http://{}", admin.local_addr().unwrap());
    let relay = Relay::start_with_admin(
        |c| {
            c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
            c.metrics_public = None;
        },
        Some(admin),
    )
    .await;
    let http = relay.http();
    let public = http
        .get(format!("{}/metrics", relay.url))
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    let text = scrape(
        &reqwest::Client::builder().no_proxy().build().unwrap(),
        &admin_url,
    )
    .await;
    assert!(text.contains("relay_connected_backends"));
}

#[tokio::test]
async fn series_of_a_reaped_backend_are_deleted() {
    let backend = Backend::start().await;
    let relay = Relay::start(|c| {
        c.timeouts.poll = Duration::from_millis(100);
        c.timeouts.inactive_backend = Duration::from_millis(400);
    })
    .await;
    let mut client = RelayClient::connect(&relay, "churn", &backend.url).await;
    let http = relay.http();
    assert_eq!(
        http.get(format!("{}/client/churn/x", relay.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert!(
        scrape(&http, &relay.url)
            .await
            .contains("backend=\"churn\"")
    );
    client.stop().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = scrape(&http, &relay.url).await;
    assert!(!text.contains("backend=\"churn\""), "{text}");
    assert_eq!(value(&text, "relay_connected_backends"), Some(0.0));
}

/// With TLS on (the relay faces the internet itself), `/metrics` is not
/// on the public listener unless `metrics_public = true`; with TLS off
/// (behind an ingress) it is, as the fleet's scrapers expect.
#[tokio::test]
async fn metrics_are_public_only_behind_an_ingress_or_when_asked() {
    let status = |relay: &Relay| {
        let (http, url) = (relay.http(), relay.url.clone());
        async move {
            http.get(format!("{url}/metrics"))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    let mut tls = Relay::start(|c| c.metrics_public = None).await;
    assert!(tls.url.starts_with("https://"));
    assert_eq!(status(&tls).await, 404, "TLS on: not public by default");
    tls.stop().await;

    let mut asked = Relay::start(|c| c.metrics_public = Some(true)).await;
    assert_eq!(status(&asked).await, 200);
    asked.stop().await;

    let mut clear = Relay::start(|c| {
        c.metrics_public = None;
        c.tls.enabled = false;
    })
    .await;
    assert!(clear.url.starts_with("http://"));
    assert_eq!(status(&clear).await, 200, "TLS off: public by default");
    clear.stop().await;

    let mut closed = Relay::start(|c| {
        c.metrics_public = Some(false);
        c.tls.enabled = false;
    })
    .await;
    assert_eq!(status(&closed).await, 404);
    closed.stop().await;
}
