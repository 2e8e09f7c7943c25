//! Prometheus metrics of the server, served at `/metrics` (and on
//! `admin_listen`).
//!
//! The `broker_*` names and labels are those of the fleet's existing
//! dashboards (`PROTOCOL.md`, "Metrics the fleet's dashboards already
//! read"): counters are exposed without a `_total` suffix, which is why
//! this uses the classic text format of the `prometheus` crate.

use prometheus::{
    Encoder as _, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// `method` label values of the `broker_*` series.
pub mod method {
    pub const CLIENT: &str = "client";
    pub const SERVER_REQUEST: &str = "server_request";
    pub const SERVER_RESPONSE: &str = "server_response";
}

/// `result` label values of `broker_responses`.
pub mod result {
    pub const OK: &str = "ok";
    pub const TIMEOUT: &str = "timeout";
    pub const MISSING_MESSAGE: &str = "missing_message";
    pub const MISSING_HEADER: &str = "missing_header";
    pub const UNKNOWN_CLIENT: &str = "unknown_client";
    pub const BAD_MESSAGE: &str = "bad_message";
    pub const BAD_RESPONSE: &str = "bad_response";
    pub const UNAUTHORIZED: &str = "unauthorized";
    pub const ERROR: &str = "error";
    pub const ALL: [&str; 9] = [
        OK,
        TIMEOUT,
        MISSING_MESSAGE,
        MISSING_HEADER,
        UNKNOWN_CLIENT,
        BAD_MESSAGE,
        BAD_RESPONSE,
        UNAUTHORIZED,
        ERROR,
    ];
}

/// `backend` label of user requests for names no relay-client polls for.
pub const UNKNOWN_BACKEND: &str = "-";

const METHODS: [&str; 3] = [
    method::CLIENT,
    method::SERVER_REQUEST,
    method::SERVER_RESPONSE,
];

/// Every metric of the server.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    responses: IntCounterVec,
    durations: HistogramVec,
    backend_durations: HistogramVec,
    overhead: HistogramVec,
    pub connected_backends: IntGauge,
    pub active_requests: IntGauge,
    pub active_streams: IntGauge,
    /// Connected v2 relay-clients (`docs/transport-v2.md`).
    pub tunnels: IntGauge,
    bytes: IntCounterVec,
    auth_failures: IntCounterVec,
    client_cert_refusals: IntCounterVec,
    pub tls_handshake_failures: IntCounter,
    /// Connections closed unserved for `limits.max_connections`: at
    /// accept, or when the place of the connection they evicted did not
    /// come within a second.
    pub connections_refused: IntCounter,
    /// Connections closed at accept for `limits.max_connections_per_ip`.
    pub connections_refused_per_ip: IntCounter,
    /// Unproven connections closed to make room for a new one
    /// (`server::places`).
    pub connections_evicted: IntCounter,
}

/// Direction of relayed bytes.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    ToBackend,
    ToUser,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToBackend => "to_backend",
            Direction::ToUser => "to_user",
        }
    }
}

fn buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric. The definitions are static: a failure here
    /// is a programming error, caught by the unit test below.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique counter");
            c
        };
        let histogram = |name: &str, help: &str| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets()),
                &["method", "backend"],
            )
            .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique histogram");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            registry
                .register(Box::new(g.clone()))
                .expect("unique gauge");
            g
        };
        let requests = counter(
            "broker_requests",
            "Requests by endpoint and backend",
            &["method", "backend"],
        );
        let responses = counter(
            "broker_responses",
            "Answers by endpoint, result and backend",
            &["method", "result", "backend"],
        );
        let durations = histogram("broker_responses_durations", "Time to answer, seconds");
        let backend_durations = histogram(
            "broker_backend_responses_durations",
            "Backend time reported by the relay-client, seconds",
        );
        let overhead = histogram(
            "broker_overhead_durations",
            "Relay time minus backend time, seconds",
        );
        let connected_backends = gauge("relay_connected_backends", "Backends known to the broker");
        let active_requests = gauge("relay_active_requests", "Relayed requests in flight");
        let active_streams = gauge("relay_active_streams", "Upgraded connections in flight");
        let tunnels = gauge(
            "relay_tunnels",
            "Relay-clients connected over the v2 transport",
        );
        let bytes = counter(
            "relay_bytes_total",
            "Body bytes relayed by direction",
            &["direction"],
        );
        let auth_failures = counter(
            "relay_auth_failures_total",
            "Refused authentications by reason",
            &["reason"],
        );
        let client_cert_refusals = counter(
            "relay_client_cert_refusals_total",
            "Relay-client requests refused for their client certificate, by reason",
            &["reason"],
        );
        let tls_handshake_failures = IntCounter::new(
            "relay_tls_handshake_failures_total",
            "Failed TLS handshakes",
        )
        .expect("valid counter");
        registry
            .register(Box::new(tls_handshake_failures.clone()))
            .expect("unique counter");
        let connections_refused = IntCounter::new(
            "relay_connections_refused_total",
            "Connections closed unserved because limits.max_connections were open",
        )
        .expect("valid counter");
        registry
            .register(Box::new(connections_refused.clone()))
            .expect("unique counter");
        let connections_refused_per_ip = IntCounter::new(
            "relay_connections_refused_per_ip_total",
            "Connections closed at accept because limits.max_connections_per_ip were open from their address",
        )
        .expect("valid counter");
        registry
            .register(Box::new(connections_refused_per_ip.clone()))
            .expect("unique counter");
        let connections_evicted = IntCounter::new(
            "relay_connections_evicted_total",
            "Connections closed before any of their requests passed authentication, to make room for a new one at limits.max_connections",
        )
        .expect("valid counter");
        registry
            .register(Box::new(connections_evicted.clone()))
            .expect("unique counter");
        Self {
            registry,
            requests,
            responses,
            durations,
            backend_durations,
            overhead,
            connected_backends,
            active_requests,
            active_streams,
            tunnels,
            bytes,
            auth_failures,
            client_cert_refusals,
            tls_handshake_failures,
            connections_refused,
            connections_refused_per_ip,
            connections_evicted,
        }
    }

    pub fn request(&self, method: &str, backend: &str) {
        self.requests.with_label_values(&[method, backend]).inc();
    }

    pub fn response(&self, method: &str, result: &str, backend: &str) {
        self.responses
            .with_label_values(&[method, result, backend])
            .inc();
    }

    pub fn duration(&self, method: &str, backend: &str, seconds: f64) {
        self.durations
            .with_label_values(&[method, backend])
            .observe(seconds);
    }

    /// Backend time and relay overhead of one answer.
    /// `total` seconds since the request came, `backend_ms` of them the
    /// relay-client's call of the backend (`backend_duration_ms`).
    pub fn backend_time(&self, backend: &str, total: f64, backend_ms: i64) {
        let backend_seconds = backend_ms.max(0) as f64 / 1000.0;
        self.backend_durations
            .with_label_values(&[method::CLIENT, backend])
            .observe(backend_seconds);
        self.overhead
            .with_label_values(&[method::CLIENT, backend])
            .observe((total - backend_seconds).max(0.0));
    }

    pub fn bytes(&self, direction: Direction, n: usize) {
        self.bytes
            .with_label_values(&[direction.as_str()])
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    pub fn auth_failure(&self, reason: &str) {
        self.auth_failures.with_label_values(&[reason]).inc();
    }

    pub fn client_cert_refusal(&self, reason: &str) {
        self.client_cert_refusals.with_label_values(&[reason]).inc();
    }

    /// Deletes every series of a reaped backend, so a fleet that churns
    /// names does not grow the metric set without bound.
    pub fn forget_backend(&self, backend: &str) {
        for m in METHODS {
            let _ = self.requests.remove_label_values(&[m, backend]);
            let _ = self.durations.remove_label_values(&[m, backend]);
            let _ = self.backend_durations.remove_label_values(&[m, backend]);
            let _ = self.overhead.remove_label_values(&[m, backend]);
            for r in result::ALL {
                let _ = self.responses.remove_label_values(&[m, r, backend]);
            }
        }
    }

    /// The exposition text (Prometheus text format 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for these metric types.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Content type of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_names_come_out_unchanged() {
        let m = Metrics::new();
        m.request(method::CLIENT, "robot-1");
        m.response(method::CLIENT, result::OK, "robot-1");
        m.duration(method::CLIENT, "robot-1", 0.01);
        m.backend_time("robot-1", 0.02, 10);
        let text = m.encode();
        assert!(text.contains("# TYPE broker_requests counter"), "{text}");
        assert!(
            text.contains("broker_requests{backend=\"robot-1\",method=\"client\"} 1"),
            "{text}"
        );
        assert!(!text.contains("broker_requests_total"), "{text}");
        assert!(
            text.contains(
                "broker_responses{backend=\"robot-1\",method=\"client\",result=\"ok\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("broker_responses_durations_bucket{"),
            "{text}"
        );
        assert!(
            text.contains("broker_backend_responses_durations_count"),
            "{text}"
        );
        assert!(text.contains("broker_overhead_durations_sum"), "{text}");

        m.forget_backend("robot-1");
        assert!(
            !m.encode().contains("robot-1"),
            "series of a reaped backend are deleted"
        );
    }

    #[test]
    fn dashboard_queries_only_existing_metrics() {
        let m = Metrics::new();
        m.request(method::CLIENT, "b");
        m.response(method::CLIENT, result::OK, "b");
        m.duration(method::CLIENT, "b", 0.1);
        m.backend_time("b", 0.2, 100);
        m.bytes(Direction::ToUser, 1);
        m.auth_failure("expired");
        m.tls_handshake_failures.inc();
        let text = m.encode();
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/observability/grafana/dashboards/http-relay.json"
        );
        let dash: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut checked = 0;
        for panel in dash["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if !(word.starts_with("broker_") || word.starts_with("relay_")) {
                        continue;
                    }
                    let family = ["_bucket", "_count", "_sum"]
                        .iter()
                        .find_map(|s| word.strip_suffix(s))
                        .unwrap_or(word);
                    assert!(
                        text.contains(&format!("# TYPE {family} ")),
                        "{word} in the dashboard is not exposed"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked >= 10, "{checked}");
    }
}
