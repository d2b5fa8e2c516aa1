//! `tracing` setup for the binaries: level from `RUST_LOG` (default `info`),
//! to stderr.
//!
//! Log lines carry what clients sent (users, skus, request ids, subjects,
//! error messages quoting them). So that no value can forge a log line or
//! send a terminal escape, every formatted event goes through
//! [`Escaping`]: its control characters are escaped, all but the newline
//! that ends the event. That is also why human logs have no colours: the
//! formatter's own colour escapes would be escaped too.

use std::io::Write;

use tracing_subscriber::fmt::MakeWriter;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event, span fields (`tx`, `trace_id`) first.
    #[default]
    Human,
    /// One JSON object per line, with the fields of every enclosing span
    /// (`tx`, `trace_id`, `participant`) in `spans`.
    Json,
}

/// Installs the subscriber: level from `RUST_LOG` (else `default_level`),
/// to stderr, in `format`.
pub fn init(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(false);
    let _ = match format {
        LogFormat::Human => builder
            .with_writer(Escaping::new(std::io::stderr, Style::Human))
            .try_init(),
        LogFormat::Json => builder
            .with_writer(Escaping::new(std::io::stderr, Style::Json))
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
    };
}

/// How [`Escaping`] writes a control character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// As Rust writes it in a string: `\n`, `\r`, `\t`, `\u{1b}`.
    Human,
    /// As JSON does (`\u007f`), so the line stays valid JSON. serde_json
    /// escapes the characters below U+0020 itself; this catches DEL and the
    /// C1 controls (U+0080 to U+009F), which it leaves raw.
    Json,
}

/// A [`MakeWriter`] whose writers escape every control character of an
/// event but the newline that ends it: one event, one line, no terminal
/// escapes, whatever its fields hold.
#[derive(Debug, Clone)]
pub struct Escaping<M> {
    inner: M,
    style: Style,
}

impl<M> Escaping<M> {
    pub fn new(inner: M, style: Style) -> Self {
        Escaping { inner, style }
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Escaping<M> {
    type Writer = EscapingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter {
            inner: self.inner.make_writer(),
            style: self.style,
            event: Vec::new(),
        }
    }
}

/// Collects one event (the formatter makes one writer per event) and writes
/// it escaped when dropped.
pub struct EscapingWriter<W: Write> {
    inner: W,
    style: Style,
    event: Vec<u8>,
}

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.event.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write> Drop for EscapingWriter<W> {
    fn drop(&mut self) {
        if self.event.is_empty() {
            return;
        }
        let line = escape_event(&String::from_utf8_lossy(&self.event), self.style);
        let _ = self.inner.write_all(line.as_bytes());
        let _ = self.inner.flush();
    }
}

/// `event` with every control character escaped in `style`, except one
/// newline at its end, which it always ends with.
pub fn escape_event(event: &str, style: Style) -> String {
    let body = event.strip_suffix('\n').unwrap_or(event);
    let mut out = String::with_capacity(body.len() + 1);
    for c in body.chars() {
        match (c, style) {
            (c, _) if !c.is_control() => out.push(c),
            ('\n', Style::Human) => out.push_str("\\n"),
            ('\r', Style::Human) => out.push_str("\\r"),
            ('\t', Style::Human) => out.push_str("\\t"),
            (c, Style::Human) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            (c, Style::Json) => out.push_str(&format!("\\u{:04x}", c as u32)),
        }
    }
    out.push('\n');
    out
}

/// Makes any panic abort the whole process after printing it. A panic
/// means a broken invariant (or a dead writer thread); a service that lost
/// a thread or a task must not keep answering. The process restarts and
/// recovers from its durable log instead. Except a panic in code run by
/// [`crate::contain::contained`] (a participant's own operation code):
/// that one is logged and returned as an error.
pub fn abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if crate::contain::is_contained() {
            tracing::error!(%info, "panic in the service's own code: that request fails, the service goes on");
            return;
        }
        default(info);
        tracing::error!(%info, "panic: aborting the process");
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A `MakeWriter` into a shared buffer.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    fn logged(style: Style, event: impl FnOnce()) -> String {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(Escaping::new(out.clone(), style));
        match style {
            Style::Human => tracing::subscriber::with_default(builder.finish(), event),
            Style::Json => tracing::subscriber::with_default(builder.json().finish(), event),
        }
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_field_with_a_newline_cannot_forge_a_line() {
        let user = "alice\nFAKE line\r\u{1b}[2J\u{7f}\u{85}";
        let human = logged(
            Style::Human,
            || tracing::info!(%user, "purchase refused: {}", user),
        );
        assert_eq!(human.lines().count(), 1, "one event, one line: {human:?}");
        assert!(human.ends_with('\n'));
        assert!(
            human.contains(r"alice\nFAKE line\r\u{1b}[2J\u{7f}\u{85}"),
            "{human}"
        );
        assert!(!human.trim_end_matches('\n').chars().any(char::is_control));

        let json = logged(Style::Json, || tracing::info!(%user, "purchase refused"));
        assert_eq!(json.lines().count(), 1, "{json:?}");
        assert!(!json.trim_end_matches('\n').chars().any(char::is_control));
        // Still JSON, with the value intact once decoded.
        let v: serde_json::Value = serde_json::from_str(json.trim_end()).unwrap();
        assert_eq!(v["fields"]["user"], user);
    }
}
