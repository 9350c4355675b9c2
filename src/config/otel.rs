//! The `[otel]` table: where traces go, how many are sampled, and the export queue's bounds.
//! Absent, the proxy does no tracing work at all.

use std::time::Duration;

use serde::Deserialize;

use super::error::{Invalid, KeyPath};
use super::BaseUrl;

/// Traces to an OpenTelemetry collector over OTLP/HTTP (protobuf).
///
/// The standard variables `OTEL_EXPORTER_OTLP_ENDPOINT` (and `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`),
/// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` override the keys here when set and not
/// empty: OpenTelemetry documents that environment variables override equivalent configuration
/// in code, and this table is that code. They take effect only when `[otel]` is present.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// The collector's OTLP/HTTP base URL; spans are POSTed to `<endpoint>/v1/traces`.
    pub endpoint: String,
    /// Share of new traces recorded, 0.0 to 1.0. Parent-based: a request whose `traceparent` says
    /// sampled is always recorded, one that says not sampled never is.
    pub sample_ratio: f64,
    /// The `service.name` resource attribute.
    pub service_name: String,
    /// Record prompts and answers on spans (`gen_ai.input.messages`, `gen_ai.output.messages`).
    /// They may hold personal data; off by default.
    pub capture_content: bool,
    /// Finished spans waiting for export; beyond it new spans are dropped and counted in
    /// `openrouter_otel_spans_dropped_total`.
    pub max_queue_size: usize,
    /// Spans sent in one export request.
    pub max_export_batch_size: usize,
    /// Longest wait between two exports while spans are queued.
    #[serde(with = "super::humantime_serde")]
    pub export_interval: Duration,
    /// Bound on each export request; a failed one is retried with backoff until this long after
    /// the first. A batch not accepted by then is dropped and counted.
    #[serde(with = "super::humantime_serde")]
    pub export_timeout: Duration,
}

impl Default for OtelConfig {
    fn default() -> Self {
        Self {
            endpoint: "http://localhost:4318".to_owned(),
            sample_ratio: 1.0,
            service_name: "openrouter-proxy".to_owned(),
            capture_content: false,
            max_queue_size: 2048,
            max_export_batch_size: 512,
            export_interval: Duration::from_secs(5),
            export_timeout: Duration::from_secs(10),
        }
    }
}

/// Bound on the queue: each queued span holds its attributes in memory.
const MAX_QUEUE_SIZE: usize = 1_000_000;

impl OtelConfig {
    pub(crate) fn validate(&self) -> Result<(), Invalid> {
        let at = |key: &str| KeyPath::new("otel").key(key);
        if self.endpoint.contains('@') {
            return Err(Invalid::new(
                at("endpoint"),
                "must not carry credentials; send them with OTEL_EXPORTER_OTLP_HEADERS",
            ));
        }
        BaseUrl::parse(&self.endpoint).map_err(|reason| Invalid::new(at("endpoint"), reason))?;
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(Invalid::new(
                at("sample_ratio"),
                "must be between 0.0 and 1.0",
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err(Invalid::new(at("service_name"), "must not be empty"));
        }
        if self.max_queue_size == 0 || self.max_queue_size > MAX_QUEUE_SIZE {
            return Err(Invalid::new(
                at("max_queue_size"),
                format!("must be between 1 and {MAX_QUEUE_SIZE}"),
            ));
        }
        if self.max_export_batch_size == 0 || self.max_export_batch_size > self.max_queue_size {
            return Err(Invalid::new(
                at("max_export_batch_size"),
                "must be between 1 and max_queue_size",
            ));
        }
        Invalid::if_zero(
            "otel",
            &[
                ("export_interval", self.export_interval),
                ("export_timeout", self.export_timeout),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn absent_means_off_and_empty_table_means_defaults() {
        assert_eq!(Config::parse("").unwrap().otel, None);
        let otel = Config::parse("[otel]").unwrap().otel.unwrap();
        assert_eq!(otel.endpoint, "http://localhost:4318");
        assert_eq!(otel.sample_ratio, 1.0);
        assert_eq!(otel.service_name, "openrouter-proxy");
        assert!(!otel.capture_content);
    }

    #[test]
    fn the_issue_example_parses() {
        let text = "[otel]\nendpoint = \"http://otel-collector:4318\"\nsample_ratio = 0.25\n\
                    service_name = \"gateway\"\ncapture_content = true\nexport_timeout = \"2s\"\n";
        let otel = Config::parse(text).unwrap().otel.unwrap();
        assert_eq!(otel.endpoint, "http://otel-collector:4318");
        assert_eq!(otel.sample_ratio, 0.25);
        assert!(otel.capture_content);
        assert_eq!(otel.export_timeout, std::time::Duration::from_secs(2));
    }

    #[test]
    fn bad_values_name_their_key_and_line() {
        let cases = [
            ("endpoint = \"otel-collector:4318\"", "otel.endpoint"),
            (
                "endpoint = \"https://user:secret@collector\"",
                "otel.endpoint",
            ),
            ("sample_ratio = 1.5", "otel.sample_ratio"),
            ("sample_ratio = -0.1", "otel.sample_ratio"),
            ("sample_ratio = nan", "otel.sample_ratio"),
            ("service_name = \" \"", "otel.service_name"),
            ("max_queue_size = 0", "otel.max_queue_size"),
            ("max_export_batch_size = 4096", "otel.max_export_batch_size"),
            ("export_timeout = \"0s\"", "otel.export_timeout"),
            ("export_interval = \"0s\"", "otel.export_interval"),
            ("endpont = \"http://x\"", "otel.endpont"),
        ];
        for (line, key) in cases {
            let err = Config::parse(&format!("[otel]\n{line}\n")).unwrap_err();
            assert_eq!(err.key.as_deref(), Some(key), "{line}: {err}");
            assert_eq!(err.line, Some(2), "{line}: {err}");
            assert!(!err.to_string().contains("secret"), "{err}");
        }
    }
}
