//! Logging, OpenTelemetry tracing (OTLP export) and Prometheus metrics.
//!
//! The library only creates `tracing` spans (named `relay.*`, see
//! `docs/telemetry.md`); [`init`] connects them to an OTLP exporter in the
//! binary. W3C trace context travels in `traceparent` headers: the server
//! continues the user-client's trace and injects its own context into the
//! relayed request; the relay-client continues that and injects into the
//! backend call and into its posts to the server.

pub mod context;
pub mod limit;
pub mod log;
pub mod metrics;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::HeaderMap;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::FilterExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

pub use metrics::Metrics;

/// Output format of log lines.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// OTLP transport.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    #[default]
    Grpc,
    Http,
}

/// `[telemetry]` of both roles. The standard `OTEL_*` variables work too
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_SERVICE_NAME`,
/// `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`,
/// `OTEL_RESOURCE_ATTRIBUTES`); keys set here win.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP collector, e.g. `http://127.0.0.1:4317` (grpc) or
    /// `http://127.0.0.1:4318` (http). Empty: export off, unless
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    pub otlp_endpoint: String,
    pub otlp_protocol: OtlpProtocol,
    /// Defaults to `http-relay-server` / `http-relay-client`.
    pub service_name: Option<String>,
    /// Parent-based ratio sampler; unset: `OTEL_TRACES_SAMPLER`, else
    /// every trace.
    pub sample_ratio: Option<f64>,
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("telemetry.sample_ratio must be within 0..=1, not {0}")]
    Ratio(f64),
}

/// Keeps the tracer provider; [`Telemetry::shutdown`] flushes the spans.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still batched (on graceful shutdown).
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "flushing spans failed");
        }
    }
}

/// Bound of one export attempt: an unreachable collector costs this much
/// of a background thread, never a relayed request.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

fn endpoint(cfg: &TelemetryConfig) -> Option<String> {
    if !cfg.otlp_endpoint.is_empty() {
        return Some(cfg.otlp_endpoint.clone());
    }
    std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
}

impl TelemetryConfig {
    /// Settings that would stop the exporter from starting.
    pub fn validate(&self) -> Result<(), TelemetryError> {
        match self.sample_ratio {
            Some(r) if !(0.0..=1.0).contains(&r) => Err(TelemetryError::Ratio(r)),
            _ => Ok(()),
        }
    }
}

/// Installs logging and (when an endpoint is configured) the OTLP span
/// export. Must run inside the tokio runtime (the gRPC exporter needs it).
pub fn init(
    cfg: &TelemetryConfig,
    default_service: &str,
    format: LogFormat,
) -> Result<Telemetry, TelemetryError> {
    ROOT_SPANS.store(cfg.sample_ratio != Some(0.0), Ordering::Relaxed);
    let provider = match endpoint(cfg) {
        Some(endpoint) => Some(provider(cfg, &endpoint, default_service)?),
        None => None,
    };
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    use std::io::IsTerminal as _;
    let filter = log_filter(EnvFilter::try_from_default_env().ok());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // `RUST_LOG` filters the log lines only: spans are exported whatever
    // the log level. A line inside a request names its trace and span ids
    // (`log::TraceIds`), not the request span's fields: those spans exist
    // only while exporting, so lines read the same with export on or off,
    // and formatting every request span's fields (at creation and at each
    // `record`) for the few lines ever written cost about 6 % of the
    // server's instructions at 100 % sampling.
    let filter = filter.and(
        tracing_subscriber::filter::filter_fn(|m| !m.is_span())
            .with_max_level_hint(tracing::Level::TRACE),
    );
    let fmt = match format {
        LogFormat::Human => fmt
            .map_event_format(|inner| log::TraceIds {
                inner,
                style: log::Style::Text,
            })
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(false)
            .with_span_list(false)
            .map_event_format(|inner| log::TraceIds {
                inner,
                style: log::Style::Json,
            })
            .with_filter(filter)
            .boxed(),
    };
    // Only the relay's own spans are exported: the exporter's hyper, h2
    // and tonic spans would otherwise feed back into it.
    let otel = provider.as_ref().map(|p| {
        // The layer's extra attributes (source location, thread, busy and
        // idle time, target) are off: they are not part of the span model
        // (`docs/telemetry.md`), and they were eight more attributes on
        // every chunk span plus two clock reads on every poll.
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("http-relay"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_target(false)
            // Nothing reads OpenTelemetry's "current context": spans are
            // passed explicitly, so entering one need not activate it.
            .with_context_activation(false)
            // The level hint matters: without one, the dependencies'
            // trace-level spans (h2 makes several per frame) would all be
            // built and offered to this filter.
            .with_filter(
                tracing_subscriber::filter::filter_fn(|m| {
                    m.target().starts_with("http_relay") && *m.level() <= tracing::Level::INFO
                })
                .with_max_level_hint(tracing::Level::INFO),
            )
    });
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(Telemetry { provider })
}

/// The log filter: `RUST_LOG` if set, else `info`; either way h2's line
/// for each PING acknowledgement it never asked for is dropped. A peer
/// (any HTTP/2 user-client, or a relay-client on its tunnel) can send
/// those at will, for 17 bytes each and with no answer to wait for: a
/// flood of log lines, and the CPU to write them, for free.
fn log_filter(from_env: Option<EnvFilter>) -> EnvFilter {
    let filter = from_env.unwrap_or_else(|| EnvFilter::new("info"));
    match "h2::proto::ping_pong=error".parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

fn provider(
    cfg: &TelemetryConfig,
    endpoint: &str,
    default_service: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = match cfg.otlp_protocol {
        OtlpProtocol::Http => {
            let url = if endpoint.ends_with("/v1/traces") {
                endpoint.to_owned()
            } else {
                format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .with_timeout(EXPORT_TIMEOUT)
                .build()?
        }
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()?,
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if let Some(name) = &cfg.service_name {
        resource = resource.with_service_name(name.clone());
    } else if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(default_service.to_owned());
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let mut builder = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource);
    cfg.validate()?;
    if let Some(ratio) = cfg.sample_ratio {
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            ratio,
        ))));
    }
    Ok(builder.build())
}

/// Writes `span`'s context into `headers` (replacing any `traceparent`).
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    use opentelemetry::trace::TraceContextExt as _;
    let cx = span.context();
    context::write(cx.span().span_context(), headers);
}

/// Whether spans are exported at all. Without an exporter no request
/// spans are made: as context of the few log lines inside a request they
/// cost about a sixth of the relay's CPU on small requests.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an exporter was configured).
pub(crate) fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// `false` when `sample_ratio = 0`: request spans are then created only
/// under a sampled parent, so unsampled traffic pays nothing for tracing.
static ROOT_SPANS: AtomicBool = AtomicBool::new(true);

/// The span of one relayed request: `make()` continuing the trace in
/// `headers`, or a disabled span when the request is not sampled or
/// nothing is exported.
///
/// Sampling is parent-based: with a valid incoming context, its sampled
/// flag decides, so an unsampled request builds no span objects on any
/// hop. Without one, a root span is made unless `sample_ratio = 0`. The
/// headers are parsed once: `traceparent` parsing was a visible part of
/// the per-request cost of tracing.
pub fn request_span(headers: &HeaderMap, make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    use opentelemetry::trace::TraceContextExt as _;
    if !exporting() {
        return tracing::Span::none();
    }
    let incoming = context::incoming(headers);
    let wanted = match &incoming {
        Some(sc) => sc.is_sampled(),
        None => ROOT_SPANS.load(Ordering::Relaxed),
    };
    if !wanted {
        return tracing::Span::none();
    }
    let span = make();
    // A `traceparent` from upstream is continued; without one the span is
    // a root, whatever span happens to be current.
    let parent = match incoming {
        Some(sc) => opentelemetry::Context::new().with_remote_span_context(sc),
        None => opentelemetry::Context::new(),
    };
    let _ = span.set_parent(parent);
    span
}

/// Writes the trace context the next hop continues from into `headers`:
/// `span`'s, or, for a request without a span, an unsampled one
/// ([`propagate_unsampled`]). A relay that exports nothing leaves the
/// headers as they came: it makes no sampling decision to pass on.
pub fn pass_on(span: &tracing::Span, headers: &mut HeaderMap) {
    if !span.is_disabled() {
        inject(span, headers);
    } else if exporting() {
        propagate_unsampled(headers);
    }
}

/// Writes the trace context of a request that has no span of its own.
///
/// The head sampling decision must travel (W3C Trace Context): an
/// unsampled request still carries a valid `traceparent` with the sampled
/// flag off, so the next hops (relay-client, backend) record nothing for
/// it instead of starting sampled traces of their own. An incoming valid
/// context is kept as it is; otherwise a fresh unsampled one is made,
/// which costs two random ids and no span.
pub fn propagate_unsampled(headers: &mut HeaderMap) {
    use opentelemetry::trace::{SpanContext, TraceFlags, TraceState};
    use opentelemetry_sdk::trace::{IdGenerator as _, RandomIdGenerator};
    if context::incoming(headers).is_some() {
        return;
    }
    let ids = RandomIdGenerator::default();
    let sc = SpanContext::new(
        ids.new_trace_id(),
        ids.new_span_id(),
        TraceFlags::default(),
        false,
        TraceState::default(),
    );
    context::write(&sc, headers);
}

/// Whether `span` is recorded (exported). Children of an unrecorded span
/// are not created at all: at `sample_ratio = 0` a request then costs one
/// span per side instead of one per chunk.
pub fn is_sampled(span: &tracing::Span) -> bool {
    use opentelemetry::trace::TraceContextExt as _;
    !span.is_disabled() && span.context().span().span_context().is_sampled()
}

/// A count as a span attribute value: the OpenTelemetry bridge exports
/// only `i64` as an integer (unsigned values would become strings).
pub fn int(n: impl TryInto<i64>) -> i64 {
    n.try_into().unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// h2's line for an unasked PING acknowledgement is dropped whatever
    /// `RUST_LOG` says; its other lines, and ours, pass.
    #[test]
    fn unasked_ping_acks_write_no_log_line() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicUsize;
        use tracing_subscriber::layer::SubscriberExt as _;
        struct Count(Arc<AtomicUsize>);
        impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Count {
            fn on_event(
                &self,
                _: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        for env in [None, Some(EnvFilter::new("debug"))] {
            let lines = Arc::new(AtomicUsize::new(0));
            let subscriber = tracing_subscriber::registry()
                .with(log_filter(env))
                .with(Count(lines.clone()));
            tracing::subscriber::with_default(subscriber, || {
                tracing::warn!(target: "h2::proto::ping_pong", "recv PING ack that we never sent");
                tracing::warn!(target: "h2::proto::streams::recv", "remotely-reset streams reached limit");
                tracing::info!(target: "http_relay::server", "listening");
            });
            assert_eq!(lines.load(Ordering::SeqCst), 2);
        }
    }
}
