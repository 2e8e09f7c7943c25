//! W3C Trace Context (`traceparent`, `tracestate`) read from and written
//! into request headers.
//!
//! Both relay roles read one context and write one on every relayed
//! request, so this is on the hot path. The SDK's propagator, reached
//! through `opentelemetry::global`, takes a process-wide lock on each
//! call, splits the header into a `Vec`, and accepts ids of any length
//! (`00-1-2-01` is a valid context to it). These functions read and write
//! the fixed layout of the specification directly: the same contexts
//! travel, malformed ones are refused, and nothing global is touched.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// `version "-" trace-id "-" parent-id "-" trace-flags`: 2, 32, 16 and 2
/// lowercase hex digits (Trace Context §3.2.2).
const LEN: usize = 55;

/// The valid remote context `headers` carry, if any.
///
/// A `traceparent` is taken when it has the layout of version `00`, all
/// lowercase hex, and ids that are not all zeros (§3.2.2.3, §3.2.2.4).
/// A later version is read by the same layout, with anything after the
/// first 55 characters behind a `-` (§3.2.4); version `ff` is invalid.
/// Only the sampled flag is kept (§3.2.2.5: unknown flags are not passed
/// on). More than one `traceparent` is no valid context (the trace
/// restarts). Several `tracestate` fields are one list, in order
/// (§3.3.1.1); a list that does not parse is dropped, the context kept.
pub fn incoming(headers: &HeaderMap) -> Option<SpanContext> {
    let mut parents = headers.get_all(TRACEPARENT).iter();
    let value = parents.next()?.as_bytes().trim_ascii();
    if parents.next().is_some() {
        return None;
    }
    let (head, rest) = value.split_at_checked(LEN)?;
    let version = hex_field(&head[..2])?;
    let well_formed = match version {
        0 => rest.is_empty(),
        0xff => false,
        _ => rest.is_empty() || rest.first() == Some(&b'-'),
    };
    if !well_formed || head[2] != b'-' || head[35] != b'-' || head[52] != b'-' {
        return None;
    }
    let trace_id = TraceId::from(hex_field(&head[3..35])?);
    let span_id = SpanId::from(u64::try_from(hex_field(&head[36..52])?).ok()?);
    let flags = u8::try_from(hex_field(&head[53..55])?).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let state = trace_state(headers).unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        state,
    ))
}

/// The `tracestate` fields of `headers` as one list; `None` when there
/// is none or it does not parse.
fn trace_state(headers: &HeaderMap) -> Option<TraceState> {
    let mut fields = headers.get_all(TRACESTATE).iter();
    let first = fields.next()?.to_str().ok()?;
    match fields.next() {
        None => first.parse().ok(),
        Some(second) => {
            let mut joined = format!("{first},{}", second.to_str().ok()?);
            for more in fields {
                joined.push(',');
                joined.push_str(more.to_str().ok()?);
            }
            joined.parse().ok()
        }
    }
}

/// The value of a field of lowercase hex digits (at most 32 of them).
fn hex_field(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |acc, &d| {
        let nibble = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u128::from(nibble))
    })
}

/// Writes `sc` into `headers` as `TraceContextPropagator::inject_context`
/// does (`traceparent` of version `00` with the sampled flag only, then
/// `tracestate`, replacing both), without `format!`. Nothing for an
/// invalid context.
pub fn write(sc: &SpanContext, headers: &mut HeaderMap) {
    if !sc.is_valid() {
        return;
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; LEN];
    out[..2].copy_from_slice(b"00");
    let flags = (sc.trace_flags() & TraceFlags::SAMPLED).to_u8();
    let fields: [(&[u8], usize); 3] = [
        (&sc.trace_id().to_bytes(), 3),
        (&sc.span_id().to_bytes(), 36),
        (&[flags], 53),
    ];
    for (bytes, at) in fields {
        for (i, b) in bytes.iter().enumerate() {
            out[at + 2 * i] = HEX[usize::from(b >> 4)];
            out[at + 2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
    }
    if let Ok(v) = HeaderValue::from_bytes(&out) {
        headers.insert(TRACEPARENT, v);
    }
    if let Ok(v) = HeaderValue::from_str(&sc.trace_state().header()) {
        headers.insert(TRACESTATE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::propagation::TextMapPropagator as _;
    use opentelemetry::trace::TraceContextExt as _;
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    fn headers(traceparent: &str, tracestate: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, HeaderValue::from_str(traceparent).unwrap());
        if let Some(s) = tracestate {
            h.insert(TRACESTATE, HeaderValue::from_str(s).unwrap());
        }
        h
    }

    fn theirs(h: &HeaderMap) -> Option<SpanContext> {
        let cx = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(h));
        let sc = cx.span().span_context().clone();
        sc.is_valid().then_some(sc)
    }

    /// Every context the specification calls valid is read as the SDK's
    /// propagator reads it: ids, sampled flag, trace state.
    #[test]
    fn valid_contexts_are_read_as_the_propagator_reads_them() {
        let cases = [
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                None,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
                None,
            ),
            // Unknown flags are dropped, the sampled bit kept.
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff",
                None,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-02",
                None,
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
            ),
            // A state that does not parse is dropped, the context kept.
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                Some("not a list member"),
            ),
            // A later version: the first four fields, then `-` and more.
            (
                "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-holds",
                None,
            ),
            (
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                None,
            ),
            (
                " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 ",
                None,
            ),
        ];
        for (parent, state) in cases {
            let h = headers(parent, state);
            let ours = incoming(&h).unwrap_or_else(|| panic!("{parent} is valid"));
            assert_eq!(Some(&ours), theirs(&h).as_ref(), "{parent} {state:?}");
            assert!(ours.is_remote());
        }
    }

    /// Several `tracestate` fields are one list, in order.
    #[test]
    fn tracestate_fields_are_one_list() {
        let mut h = headers(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some("rojo=00f067aa0ba902b7"),
        );
        h.append(TRACESTATE, HeaderValue::from_static("congo=t61rcWkgMzE"));
        h.append(TRACESTATE, HeaderValue::from_static("x=1,y=2"));
        let sc = incoming(&h).unwrap();
        assert_eq!(
            sc.trace_state().header(),
            "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE,x=1,y=2"
        );
        h.append(TRACESTATE, HeaderValue::from_static("not a member"));
        let sc = incoming(&h).unwrap();
        assert_eq!(sc.trace_state().header(), "");
    }

    /// Malformed contexts are refused, including those the SDK's
    /// propagator takes: ids of the wrong length, a sign before them.
    #[test]
    fn malformed_contexts_are_refused() {
        let cases = [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-B7AD6B7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0A",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "0x-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01.",
            "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
            "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-+7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-+1",
            // What the SDK's propagator reads as trace 1, span 2.
            "00-1-2-01",
        ];
        for parent in cases {
            assert_eq!(incoming(&headers(parent, None)), None, "{parent:?}");
        }
        assert_eq!(incoming(&HeaderMap::new()), None);
        // Two of them: no valid context, whichever would parse.
        let mut twice = headers(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            None,
        );
        twice.append(
            TRACEPARENT,
            HeaderValue::from_static("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        );
        assert_eq!(incoming(&twice), None);
        let mut opaque = HeaderMap::new();
        opaque.insert(TRACEPARENT, HeaderValue::from_bytes(&[0xff; 60]).unwrap());
        assert_eq!(incoming(&opaque), None);
        // The lenient reading this module exists to avoid.
        assert!(theirs(&headers("00-1-2-01", None)).is_some());
    }

    /// The writer matches the crate's propagator, header for header, and
    /// what it writes is read back unchanged.
    #[test]
    fn contexts_are_written_as_the_propagator_writes_them() {
        let state = TraceState::from_key_value([("vendor", "x1")]).unwrap();
        let cases = [
            (TraceFlags::SAMPLED, TraceState::default()),
            (TraceFlags::default(), state.clone()),
            (TraceFlags::new(0xff), state),
        ];
        for (flags, state) in cases {
            let sc = SpanContext::new(
                TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                flags,
                true,
                state,
            );
            let mut ours = HeaderMap::new();
            write(&sc, &mut ours);
            let mut expected = HeaderMap::new();
            let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
            TraceContextPropagator::new()
                .inject_context(&cx, &mut opentelemetry_http::HeaderInjector(&mut expected));
            assert_eq!(ours, expected);
            let back = incoming(&ours).unwrap();
            assert_eq!(back.trace_id(), sc.trace_id());
            assert_eq!(back.span_id(), sc.span_id());
            assert_eq!(back.is_sampled(), sc.is_sampled());
            assert_eq!(back.trace_state(), sc.trace_state());
        }
        let mut none = HeaderMap::new();
        write(&SpanContext::empty_context(), &mut none);
        assert!(none.is_empty());
    }
}
