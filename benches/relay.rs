//! Relay throughput and latency, end to end over loopback TLS:
//! user-client (reqwest, HTTP/2) -> relay server -> relay-client -> hyper
//! backend, everything in one process, and what tracing costs.
//!
//! `cargo bench --bench relay` runs three modes, each in a fresh process
//! (the tracing subscriber is global):
//! - `off`: no OpenTelemetry export;
//! - `sampled-0`: OTLP export on, `sample_ratio = 0`;
//! - `sampled-100`: OTLP export on, every request traced (to an in-process
//!   OTLP/gRPC receiver).
//!
//! Each mode measures: download of a 100 MiB response (median of 5),
//! upload of a 50 MiB body (median of 3), small-GET latency (p50/p99 of
//! 300 sequential requests) and small-GET throughput (2000 requests, 32
//! concurrent). `RELAY_BENCH_MODE=<mode>` runs one mode only.

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::backend::Backend;
use common::otlp::Receiver;
use common::{Relay, RelayClient};
use http_relay::telemetry::{self, LogFormat, TelemetryConfig};

const MIB: usize = 1024 * 1024;
const MODES: [&str; 3] = ["off", "sampled-0", "sampled-100"];
/// Rounds over all modes.
const ROUNDS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// One mode's results.
struct Results {
    download: f64,
    upload: f64,
    p50_ms: f64,
    p99_ms: f64,
    rps: f64,
}

impl Results {
    fn line(&self, mode: &str) -> String {
        format!(
            "RESULT {mode} {:.1} {:.1} {:.3} {:.3} {:.0}",
            self.download, self.upload, self.p50_ms, self.p99_ms, self.rps
        )
    }

    fn parse(line: &str) -> Option<(String, Results)> {
        let mut it = line.strip_prefix("RESULT ")?.split(' ');
        let mode = it.next()?.to_owned();
        let mut num = || it.next()?.parse::<f64>().ok();
        Some((
            mode,
            Results {
                download: num()?,
                upload: num()?,
                p50_ms: num()?,
                p99_ms: num()?,
                rps: num()?,
            },
        ))
    }
}

async fn measure() -> Results {
    let backend = Backend::start().await;
    let relay = Relay::start(|_| {}).await;
    let _client = RelayClient::connect(&relay, "bench", &backend.url).await;
    let http = relay.http();

    let n = 100 * MIB;
    let url = format!("{}/client/bench/bytes/{n}", relay.url);
    let mut runs = Vec::new();
    for _ in 0..5 {
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
    let download = median(runs);

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
    let upload = median(runs);

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
    Results {
        download,
        upload,
        p50_ms: percentile(&lat, 0.5).as_secs_f64() * 1e3,
        p99_ms: percentile(&lat, 0.99).as_secs_f64() * 1e3,
        rps: total as f64 / t.elapsed().as_secs_f64(),
    }
}

fn run_mode(mode: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let receiver = Receiver::start().await;
        let telemetry = match mode {
            "off" => None,
            _ => {
                let cfg = TelemetryConfig {
                    otlp_endpoint: receiver.endpoint(),
                    sample_ratio: Some(if mode == "sampled-0" { 0.0 } else { 1.0 }),
                    ..TelemetryConfig::default()
                };
                Some(
                    telemetry::init(&cfg, "http-relay-bench", LogFormat::Human).expect("telemetry"),
                )
            }
        };
        let results = measure().await;
        if let Some(t) = telemetry {
            let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
        }
        println!("{}", results.line(mode));
        eprintln!("{mode}: {} spans received", receiver.spans().len());
    });
}

fn main() {
    if let Ok(mode) = std::env::var("RELAY_BENCH_MODE") {
        run_mode(&mode);
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    // Rounds alternate the modes, so drift of the machine hits all alike;
    // each figure is the median over the rounds.
    let mut rounds: Vec<Vec<Results>> = MODES.iter().map(|_| Vec::new()).collect();
    for _ in 0..ROUNDS {
        for (i, mode) in MODES.iter().enumerate() {
            let out = std::process::Command::new(&exe)
                .env("RELAY_BENCH_MODE", mode)
                .env("RUST_LOG", "error")
                .output()
                .expect("run mode");
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            let text = String::from_utf8_lossy(&out.stdout);
            let (_, r) = text
                .lines()
                .find_map(Results::parse)
                .expect("mode printed results");
            rounds[i].push(r);
        }
    }
    let all: Vec<(String, Results)> = MODES
        .iter()
        .zip(rounds)
        .map(|(mode, rs)| {
            let pick = |f: fn(&Results) -> f64| median(rs.iter().map(f).collect());
            let r = Results {
                download: pick(|r| r.download),
                upload: pick(|r| r.upload),
                p50_ms: pick(|r| r.p50_ms),
                p99_ms: pick(|r| r.p99_ms),
                rps: pick(|r| r.rps),
            };
            (mode.to_string(), r)
        })
        .collect();
    let base = &all[0].1;
    println!(
        "mode         download MiB/s   upload MiB/s   small GET p50 / p99 ms   small GET req/s"
    );
    for (mode, r) in &all {
        println!(
            "{mode:<12} {:>8.0} ({:+5.1}%) {:>7.0} ({:+5.1}%)   {:>6.2} / {:>6.2} ({:+5.1}%)   {:>7.0} ({:+5.1}%)",
            r.download,
            (r.download / base.download - 1.0) * 100.0,
            r.upload,
            (r.upload / base.upload - 1.0) * 100.0,
            r.p50_ms,
            r.p99_ms,
            (r.p50_ms / base.p50_ms - 1.0) * 100.0,
            r.rps,
            (r.rps / base.rps - 1.0) * 100.0,
        );
    }
}
