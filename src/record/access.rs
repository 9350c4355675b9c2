//! The access-log line, one per request. With the JSON log format on standard output it is
//! serialized from a struct into a reused buffer and written in one call: the same line the
//! `tracing` JSON formatter writes (timestamp, level, message, the fields, target), without
//! formatting each field through `Debug` into a string of its own. Lines written that way wait
//! in a buffer (`[log] access_buffer_bytes`) and go out together when it fills, on a timer and
//! when the proxy stops. Otherwise (the text format, or a program embedding the proxy with its
//! own subscriber) the line is a `tracing` event.

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use serde::Serialize;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};

static DIRECT_JSON: AtomicBool = AtomicBool::new(false);

/// Says that the process logs JSON lines to standard output through `tracing-subscriber`'s JSON
/// formatter (flattened events, no span): access lines are then written directly in that shape.
pub fn write_json_to_stdout() {
    DIRECT_JSON.store(true, Ordering::Relaxed);
}

/// Access lines waiting to be written together.
static PENDING: Mutex<Pending> = Mutex::new(Pending {
    bytes: Vec::new(),
    limit: 0,
});

/// Lines gathered until `limit` bytes wait; a limit of 0 writes each line as it comes.
struct Pending {
    bytes: Vec<u8>,
    limit: usize,
}

impl Pending {
    /// Adds `line`; writes to the writer `out` opens (standard output's lock, taken only then)
    /// once the buffer is full, or at once without a buffer.
    fn push<W: Write>(&mut self, line: &[u8], out: impl FnOnce() -> W) -> io::Result<()> {
        if self.limit == 0 && self.bytes.is_empty() {
            return out().write_all(line);
        }
        self.bytes.extend_from_slice(line);
        if self.bytes.len() >= self.limit {
            return self.flush(&mut out());
        }
        Ok(())
    }

    /// Writes what waits in one call. Lines that cannot be written (standard output closed) are
    /// dropped rather than kept growing.
    fn flush(&mut self, out: &mut impl Write) -> io::Result<()> {
        if self.bytes.is_empty() {
            return Ok(());
        }
        let written = out.write_all(&self.bytes).and_then(|()| out.flush());
        self.bytes.clear();
        written
    }
}

/// Gathers directly written access lines up to `limit` bytes before writing them (0: none).
pub fn buffer_lines(limit: usize) {
    let mut pending = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
    pending.limit = limit;
    if limit > 0 {
        // Room for the last line that crosses the limit, so the buffer never grows.
        pending.bytes.reserve(limit + 4096);
    }
}

/// Writes the access lines that wait, if any: on a timer and when the proxy stops.
pub fn flush() {
    let mut pending = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
    let _ = pending.flush(&mut io::stdout().lock());
}

/// Whether the log filter lets the access line through (`info` for target `access`).
pub fn enabled() -> bool {
    tracing::enabled!(target: "access", tracing::Level::INFO)
}

/// The fields of the line, in the order they are written. Never the key, headers or bodies:
/// only what routing and accounting decided.
#[derive(Serialize)]
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub caller: &'a str,
    pub requested_model: &'a str,
    pub served_model: &'a str,
    pub upstream: &'a str,
    pub key: &'a str,
    pub attempts: usize,
    pub status: u16,
    pub response_status: u16,
    pub outcome: &'static str,
    pub error: &'a str,
    pub stream_error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttfb_ms: Option<f64>,
    pub duration_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub overhead_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    pub cache: &'a str,
    pub cache_tier: &'a str,
    pub coalesced: bool,
    pub batch_id: &'a str,
    pub bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<&'a str>,
}

impl AccessLine<'static> {
    /// A complete request's line with every field set, as for a streamed answer with usage (for
    /// tests and benchmarks).
    #[doc(hidden)]
    pub fn example() -> AccessLine<'static> {
        AccessLine {
            request_id: "18ed65f61255553900000000",
            method: "POST",
            path: "/v1/chat/completions",
            route: "fast",
            caller: "team-a",
            requested_model: "fast",
            served_model: "openai/gpt-4o-mini",
            upstream: "default",
            key: "primary",
            attempts: 1,
            status: 200,
            response_status: 200,
            outcome: "complete",
            error: "",
            stream_error: "",
            ttfb_ms: Some(0.264_163),
            duration_ms: 0.265_354,
            overhead_ms: Some(0.046_906),
            prompt_tokens: Some(512),
            completion_tokens: Some(128),
            cost_usd: Some(0.000_123),
            cache: "MISS",
            cache_tier: "",
            coalesced: false,
            batch_id: "",
            bytes: 1234,
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
        }
    }
}

/// The line as a whole: what the `tracing` formatter puts around the fields.
#[derive(Serialize)]
struct Envelope<'a> {
    timestamp: &'a str,
    level: &'static str,
    message: &'static str,
    #[serde(flatten)]
    fields: &'a AccessLine<'a>,
    target: &'static str,
}

impl AccessLine<'_> {
    /// Writes the line (the caller checked [`enabled`]).
    pub fn write(&self) {
        if DIRECT_JSON.load(Ordering::Relaxed) {
            self.write_json();
        } else {
            self.event();
        }
    }

    fn write_json(&self) {
        thread_local! {
            static BUFFERS: RefCell<(String, Vec<u8>)> = RefCell::default();
        }
        BUFFERS.with_borrow_mut(|(timestamp, line)| {
            timestamp.clear();
            line.clear();
            let _ = SystemTime.format_time(&mut Writer::new(timestamp));
            if self.json_line(timestamp, line).is_ok() {
                // Lines never interleave: they are whole in the buffer, and written under the
                // standard output lock as the formatter writes its own.
                let mut pending = PENDING.lock().unwrap_or_else(PoisonError::into_inner);
                let _ = pending.push(line, || io::stdout().lock());
            }
        });
    }

    /// The line with its newline, as the `tracing` JSON formatter writes it, appended to `out`.
    pub fn json_line(&self, timestamp: &str, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let envelope = Envelope {
            timestamp,
            level: "INFO",
            message: "request",
            fields: self,
            target: "access",
        };
        serde_json::to_writer(&mut *out, &envelope)?;
        out.push(b'\n');
        Ok(())
    }

    /// The line as a `tracing` event, for whatever subscriber is installed.
    pub fn event(&self) {
        tracing::info!(
            target: "access",
            request_id = self.request_id,
            method = self.method,
            path = self.path,
            route = self.route,
            caller = self.caller,
            requested_model = self.requested_model,
            served_model = self.served_model,
            upstream = self.upstream,
            key = self.key,
            attempts = self.attempts,
            status = self.status,
            response_status = self.response_status,
            outcome = self.outcome,
            error = self.error,
            stream_error = self.stream_error,
            ttfb_ms = self.ttfb_ms,
            duration_ms = self.duration_ms,
            overhead_ms = self.overhead_ms,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            cost_usd = self.cost_usd,
            cache = self.cache,
            cache_tier = self.cache_tier,
            coalesced = self.coalesced,
            batch_id = self.batch_id,
            bytes = self.bytes,
            trace_id = self.trace_id,
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What the `tracing` JSON formatter, set up as the binary sets it up, writes for `line`.
    fn formatted_by_tracing(line: &AccessLine<'_>) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || line.event());
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    /// The example line, with characters that need escaping and, without `usage`, none of
    /// the optional fields.
    fn sample(usage: bool) -> AccessLine<'static> {
        let mut line = AccessLine::example();
        line.request_id = "18ed65f612555539\"00000000";
        line.stream_error = "cut \u{1} short";
        if !usage {
            line.overhead_ms = None;
            line.prompt_tokens = None;
            line.completion_tokens = None;
            line.cost_usd = None;
            line.trace_id = None;
        }
        line
    }

    #[test]
    fn the_direct_line_is_the_line_tracing_writes() {
        for usage in [false, true] {
            let line = sample(usage);
            let expected = formatted_by_tracing(&line);
            let value: serde_json::Value = serde_json::from_str(&expected).unwrap();
            let timestamp = value["timestamp"].as_str().unwrap();
            let mut direct = Vec::new();
            line.json_line(timestamp, &mut direct).unwrap();
            assert_eq!(String::from_utf8(direct).unwrap(), expected);
        }
    }

    /// Records each write call it receives.
    #[derive(Default)]
    struct Writes(Vec<Vec<u8>>);

    impl Write for Writes {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.push(bytes.to_vec());
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn pending(limit: usize) -> (Pending, Writes) {
        let pending = Pending {
            bytes: Vec::new(),
            limit,
        };
        (pending, Writes::default())
    }

    #[test]
    fn buffered_lines_go_out_together_when_the_buffer_fills_or_is_flushed() {
        let (mut pending, mut out) = pending(30);
        pending.push(b"first line\n", || &mut out).unwrap();
        pending.push(b"second line\n", || &mut out).unwrap();
        assert!(out.0.is_empty(), "written before the buffer filled");
        // The third line crosses the limit: all three in one write.
        pending.push(b"third line\n", || &mut out).unwrap();
        assert_eq!(
            out.0,
            vec![b"first line\nsecond line\nthird line\n".to_vec()]
        );
        pending.push(b"fourth\n", || &mut out).unwrap();
        assert_eq!(out.0.len(), 1);
        pending.flush(&mut out).unwrap();
        assert_eq!(out.0[1], b"fourth\n");
        // Nothing waits: a flush writes nothing.
        pending.flush(&mut out).unwrap();
        assert_eq!(out.0.len(), 2);
    }

    #[test]
    fn without_a_buffer_each_line_is_written_at_once() {
        let (mut pending, mut out) = pending(0);
        pending.push(b"one\n", || &mut out).unwrap();
        pending.push(b"two\n", || &mut out).unwrap();
        assert_eq!(out.0, vec![b"one\n".to_vec(), b"two\n".to_vec()]);
    }
}
