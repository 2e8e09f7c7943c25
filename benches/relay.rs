//! Relay throughput and latency, end to end over loopback TLS:
//! user-client (reqwest, HTTP/2) -> relay server -> relay-client -> hyper
//! backend, everything in one process.
//!
//! `cargo bench --bench relay` prints:
//! - download throughput of a 100 MiB response (median of 3 runs);
//! - upload throughput of a 50 MiB request body (median of 3 runs);
//! - latency of small GETs (p50/p99 of 300 sequential requests), and
//!   requests/s with 32 concurrent user-clients (2000 requests).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::backend::Backend;
use common::{Relay, RelayClient};

const MIB: usize = 1024 * 1024;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let backend = Backend::start().await;
        let relay = Relay::start(|_| {}).await;
        let _client = RelayClient::connect(&relay, "bench", &backend.url).await;
        let http = relay.http();

        let n = 100 * MIB;
        let url = format!("{}/client/bench/bytes/{n}", relay.url);
        let mut runs = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let body = http
                .get(&url)
                .send()
                .await
                .expect("send")
                .bytes()
                .await
                .expect("body");
            assert_eq!(body.len(), n);
            runs.push(n as f64 / MIB as f64 / t.elapsed().as_secs_f64());
        }
        println!(
            "download 100 MiB: {:.0} MiB/s (median of 3: {runs:.0?})",
            median(runs.clone())
        );

        let data = bytes::Bytes::from(common::pattern(50 * MIB, 1));
        let url = format!("{}/client/bench/hash", relay.url);
        let mut runs = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let resp = http
                .post(&url)
                .body(data.clone())
                .send()
                .await
                .expect("send");
            assert_eq!(resp.status(), 200);
            resp.bytes().await.expect("body");
            runs.push(50.0 / t.elapsed().as_secs_f64());
        }
        println!(
            "upload 50 MiB: {:.0} MiB/s (median of 3: {runs:.0?})",
            median(runs.clone())
        );

        let url = format!("{}/client/bench/small", relay.url);
        for _ in 0..20 {
            http.get(&url)
                .send()
                .await
                .expect("warm-up")
                .bytes()
                .await
                .expect("body");
        }
        let mut lat = Vec::new();
        for _ in 0..300 {
            let t = Instant::now();
            let resp = http.get(&url).send().await.expect("send");
            resp.bytes().await.expect("body");
            lat.push(t.elapsed());
        }
        lat.sort();
        println!(
            "small GET latency: p50 {:.2} ms, p99 {:.2} ms (300 sequential)",
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3
        );

        let t = Instant::now();
        let total = 2000;
        let mut tasks = Vec::new();
        for w in 0..32 {
            let http = http.clone();
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                for _ in (w..total).step_by(32) {
                    http.get(&url)
                        .send()
                        .await
                        .expect("send")
                        .bytes()
                        .await
                        .expect("body");
                }
            }));
        }
        for task in tasks {
            task.await.expect("worker");
        }
        println!(
            "small GET throughput: {:.0} req/s (2000 requests, 32 concurrent)",
            total as f64 / t.elapsed().as_secs_f64()
        );
    });
}
