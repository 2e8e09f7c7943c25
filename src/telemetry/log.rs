//! Trace ids on log lines, read when a line is written.
//!
//! Recording `trace_id` and `span_id` as span fields formatted two hex ids
//! per request in every layer (and exported them as two more attributes),
//! for log lines that most requests never write. [`TraceIds`] instead
//! looks up the OpenTelemetry context of the innermost exported span in
//! the event's scope, only for lines that are written.

use std::fmt;

use opentelemetry::trace::TraceContextExt as _;
use tracing::{Event, Subscriber};
use tracing_subscriber::Registry;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// How [`TraceIds`] adds the ids to a formatted line.
#[derive(Clone, Copy, Debug)]
pub enum Style {
    /// ` trace_id=… span_id=…` at the end of the line.
    Text,
    /// Two top-level keys of the JSON object.
    Json,
}

/// Wraps an event format: lines inside a span that OpenTelemetry exports
/// carry that span's `trace_id` and `span_id`. Only for a subscriber
/// built on [`Registry`], as [`super::init`] builds it.
pub struct TraceIds<F> {
    pub inner: F,
    pub style: Style,
}

impl<S, N, F> FormatEvent<S, N> for TraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some((trace, span)) = ids(event) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.strip_suffix('\n').unwrap_or(&line);
        match self.style {
            Style::Json => match body.strip_suffix('}') {
                Some(open) => {
                    let sep = if open.ends_with('{') { "" } else { "," };
                    writeln!(
                        writer,
                        r#"{open}{sep}"trace_id":"{trace}","span_id":"{span}"}}"#
                    )
                }
                None => writeln!(writer, "{body}"),
            },
            Style::Text => writeln!(writer, "{body} trace_id={trace} span_id={span}"),
        }
    }
}

/// The ids of the innermost span around `event` that has a valid
/// OpenTelemetry context (none without an exporter).
///
/// The walk goes through the registry, not the log layer's own view: the
/// log filter (`RUST_LOG=warn`, say) may hide the request spans from the
/// log layer, but a line must name its trace whatever the log level.
fn ids(event: &Event<'_>) -> Option<(opentelemetry::TraceId, opentelemetry::SpanId)> {
    if !super::exporting() {
        return None;
    }
    // The global subscriber: a scoped one (tests) is not seen from here.
    let dispatch = tracing::dispatcher::get_default(tracing::Dispatch::clone);
    let registry = dispatch.downcast_ref::<Registry>()?;
    let start = match event.parent() {
        Some(id) => id.clone(),
        None if event.is_contextual() => dispatch.current_span().id()?.clone(),
        None => return None,
    };
    let mut next = registry.span(&start);
    while let Some(span) = next {
        if let Some(cx) = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch) {
            let sc = cx.span().span_context().clone();
            if sc.is_valid() {
                return Some((sc.trace_id(), sc.span_id()));
            }
        }
        next = span.parent();
    }
    None
}
