//! W3C trace context (`traceparent`) carried in NATS headers, so one
//! purchase is one trace across the coordinator and both participants: the
//! coordinator continues the client's trace (or starts one) and sends a
//! child context with every prepare and decision.

use async_nats::HeaderMap;
use rand::Rng;

pub const HEADER: &str = "traceparent";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits.
    pub trace_id: String,
    /// 16 lowercase hex digits: the sender's span.
    pub span_id: String,
}

fn hex(bytes: usize) -> String {
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceContext {
    /// A new trace.
    pub fn root() -> TraceContext {
        TraceContext {
            trace_id: hex(16),
            span_id: hex(8),
        }
    }

    /// Parses `00-<trace-id>-<span-id>-<flags>`; all-zero ids are invalid.
    pub fn parse(value: &str) -> Option<TraceContext> {
        let mut parts = value.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || !is_hex(version, 2) || version == "ff" || !is_hex(flags, 2) {
            return None;
        }
        if !is_hex(trace, 32)
            || !is_hex(span, 16)
            || trace.bytes().all(|b| b == b'0')
            || span.bytes().all(|b| b == b'0')
        {
            return None;
        }
        Some(TraceContext {
            trace_id: trace.into(),
            span_id: span.into(),
        })
    }

    /// The context in a message's headers, if valid.
    pub fn from_headers(headers: Option<&HeaderMap>) -> Option<TraceContext> {
        TraceContext::parse(headers?.get(HEADER)?.as_str())
    }

    /// The same trace, a new span.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            trace_id: self.trace_id.clone(),
            span_id: hex(8),
        }
    }

    pub fn header_value(&self) -> String {
        format!("00-{}-{}-01", self.trace_id, self.span_id)
    }

    /// Headers carrying this context.
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER, self.header_value().as_str());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let t = TraceContext::root();
        assert_eq!(TraceContext::parse(&t.header_value()), Some(t.clone()));
        let c = t.child();
        assert_eq!(c.trace_id, t.trace_id);
        assert_ne!(c.span_id, t.span_id);
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            TraceContext::parse(ok).unwrap().trace_id,
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad}");
        }
    }
}
