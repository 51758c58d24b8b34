//! W3C Trace Context (`traceparent`, `tracestate`): what the client sent, and what each engine leg
//! carries so the prefill and decode engines' spans join the client's trace under Tandem's span.
//!
//! Parsing follows the W3C recommendation: an invalid `traceparent` is ignored (and its
//! `tracestate` with it) and Tandem starts a fresh trace; a future version is read by its version-00
//! prefix and re-sent as version 00. How the request span itself is tied to the trace is a
//! [`TraceLink`]: the default only mints ids, the OpenTelemetry build (`tandem-app`'s `otel`
//! feature) makes the exported span the parent the engines see.

use std::fmt;

use axum::http::{HeaderMap, HeaderValue};

/// The `sampled` bit of `trace-flags`.
pub const SAMPLED: u8 = 0x01;

/// One `traceparent` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    /// The caller's span (in a parsed header) or Tandem's span (in one Tandem sends).
    pub parent_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parse a `traceparent` value; `None` when the W3C rules say to ignore it.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim_matches(|c| c == ' ' || c == '\t');
        let b = s.as_bytes();
        if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let version = hex_byte(&b[0..2])?;
        match version {
            0xff => return None,
            // Version 00 is exactly 55 characters; later versions may append `-`-led fields.
            0x00 if b.len() != 55 => return None,
            _ if b.len() > 55 && b[55] != b'-' => return None,
            _ => {}
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        for (i, out) in trace_id.iter_mut().enumerate() {
            *out = hex_byte(&b[3 + 2 * i..5 + 2 * i])?;
        }
        for (i, out) in parent_id.iter_mut().enumerate() {
            *out = hex_byte(&b[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&b[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn parent_id_hex(&self) -> String {
        hex(&self.parent_id)
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

/// Lower-case hex only: the W3C grammar has no upper case.
fn hex_byte(b: &[u8]) -> Option<u8> {
    fn nib(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(nib(b[0])? << 4 | nib(b[1])?)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The trace headers a client sent, validated.
#[derive(Debug, Clone, Default)]
pub struct Incoming {
    pub parent: Option<TraceParent>,
    /// Forwarded unchanged, and only with a valid `traceparent`; several header lines are joined
    /// with commas, as the spec allows.
    pub tracestate: Option<HeaderValue>,
}

impl Incoming {
    pub fn from_headers(h: &HeaderMap) -> Self {
        // Several traceparent lines make the header invalid.
        let mut tp = h.get_all("traceparent").iter();
        let parent = match (tp.next(), tp.next()) {
            (Some(v), None) => v.to_str().ok().and_then(TraceParent::parse),
            _ => None,
        };
        let tracestate = parent.and_then(|_| {
            let parts: Vec<&str> = h
                .get_all("tracestate")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .collect();
            if parts.is_empty() {
                return None;
            }
            HeaderValue::from_str(&parts.join(",")).ok()
        });
        Incoming { parent, tracestate }
    }
}

/// What every engine leg of one request carries.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub traceparent: HeaderValue,
    pub tracestate: Option<HeaderValue>,
    pub context: TraceParent,
}

impl Outgoing {
    pub fn new(context: TraceParent, tracestate: Option<HeaderValue>) -> Self {
        let traceparent =
            HeaderValue::from_str(&context.to_string()).expect("a formatted traceparent is ASCII");
        Outgoing {
            traceparent,
            tracestate,
            context,
        }
    }
}

/// Ties a request's span to the caller's trace and names the span the engines should see as
/// their parent. Called once per request, with the request span current.
pub trait TraceLink: Send + Sync + fmt::Debug {
    fn link(&self, span: &tracing::Span, parent: Option<&TraceParent>) -> TraceParent;
}

/// No exporter: keep the caller's trace id (or mint one) and mint Tandem's span id, so both legs
/// still land in one trace at the engines. A trace Tandem starts is sampled, so engines that
/// trace with a parent-based sampler keep recording as they would without Tandem in front.
#[derive(Debug, Default)]
pub struct W3cLink;

impl TraceLink for W3cLink {
    fn link(&self, _span: &tracing::Span, parent: Option<&TraceParent>) -> TraceParent {
        TraceParent {
            trace_id: parent.map_or_else(|| nonzero(rand::random()), |p| p.trace_id),
            parent_id: nonzero(rand::random()),
            flags: parent.map_or(SAMPLED, |p| p.flags),
        }
    }
}

/// An all-zero id is invalid; random ones are zero with probability 2^-64 or less.
fn nonzero<const N: usize>(mut id: [u8; N]) -> [u8; N] {
    if id == [0; N] {
        id[N - 1] = 1;
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_the_spec_example() {
        let t = TraceParent::parse(GOOD).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id_hex(), "00f067aa0ba902b7");
        assert!(t.sampled());
        assert_eq!(t.to_string(), GOOD);
        assert_eq!(TraceParent::parse(&format!(" {GOOD}\t")), Some(t));
    }

    #[test]
    fn rejects_what_the_spec_says_to_ignore() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_prefix_and_resent_as_00() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-adds";
        assert_eq!(TraceParent::parse(v).unwrap().to_string(), GOOD);
    }

    #[test]
    fn tracestate_rides_only_with_a_valid_traceparent() {
        let mut h = HeaderMap::new();
        h.insert("tracestate", HeaderValue::from_static("a=1"));
        h.append("tracestate", HeaderValue::from_static("b=2"));
        assert!(Incoming::from_headers(&h).tracestate.is_none());
        h.insert("traceparent", HeaderValue::from_static(GOOD));
        let i = Incoming::from_headers(&h);
        assert_eq!(i.tracestate.unwrap(), "a=1,b=2");
        h.append("traceparent", HeaderValue::from_static(GOOD));
        let i = Incoming::from_headers(&h);
        assert!(i.parent.is_none() && i.tracestate.is_none());
    }

    #[test]
    fn the_w3c_link_keeps_the_callers_trace_and_mints_its_own_span() {
        let parent = TraceParent::parse(GOOD).unwrap();
        let span = tracing::Span::none();
        let ours = W3cLink.link(&span, Some(&parent));
        assert_eq!(ours.trace_id, parent.trace_id);
        assert_ne!(ours.parent_id, parent.parent_id);
        assert_eq!(ours.flags, parent.flags);
        let fresh = W3cLink.link(&span, None);
        assert_ne!(fresh.trace_id, [0; 16]);
        assert!(fresh.sampled());
        assert!(TraceParent::parse(&fresh.to_string()).is_some());
    }
}
