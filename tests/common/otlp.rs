//! An OTLP/HTTP trace collector for tests: the mock upstream answering `POST /v1/traces` the way a
//! collector does, and the spans it received, decoded from protobuf with the opentelemetry-proto
//! definitions.

use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use prost::Message;
use serde_json::{Map, Value};

use super::{wait_until, MockUpstream, Recorded, Reply};

/// A collector's answer accepting everything.
pub fn otlp_accepted() -> Reply {
    otlp_answer(ExportTraceServiceResponse::default())
}

/// A collector's answer refusing `rejected` spans of the request (a partial success).
pub fn otlp_partially_rejected(rejected: i64) -> Reply {
    otlp_answer(ExportTraceServiceResponse {
        partial_success: Some(ExportTracePartialSuccess {
            rejected_spans: rejected,
            error_message: "over quota".into(),
        }),
    })
}

fn otlp_answer(response: ExportTraceServiceResponse) -> Reply {
    Reply::Raw(
        200,
        vec![("content-type", "application/x-protobuf")],
        Bytes::from(response.encode_to_vec()),
    )
}

/// A collector on 127.0.0.1:0 accepting everything.
pub async fn collector() -> MockUpstream {
    MockUpstream::start(|_| otlp_accepted()).await
}

/// The base endpoint of a mock collector, as `[otel] endpoint` takes it.
pub fn endpoint_of(collector: &MockUpstream) -> String {
    format!("http://{}", collector.addr)
}

/// An endpoint nothing listens on: the port was bound and released.
pub fn endpoint_nobody_listens_on() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// One span as the collector received it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub kind: i32,
    pub attributes: Map<String, Value>,
    pub events: Vec<String>,
    pub status_code: i32,
    pub status_message: String,
    pub resource: Map<String, Value>,
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes.get(key)
    }

    pub fn str(&self, key: &str) -> Option<&str> {
        self.attr(key).and_then(Value::as_str)
    }

    pub fn int(&self, key: &str) -> Option<i64> {
        self.attr(key).and_then(Value::as_i64)
    }
}

/// Every span in the requests `collector` received so far.
pub fn received_spans(collector: &MockUpstream) -> Vec<ReceivedSpan> {
    collector.requests().iter().flat_map(decode).collect()
}

/// Waits until `collector` has received at least `n` spans.
pub async fn wait_spans(collector: &MockUpstream, n: usize) -> Vec<ReceivedSpan> {
    wait_until(&format!("{n} spans at the collector"), || {
        received_spans(collector).len() >= n
    })
    .await;
    received_spans(collector)
}

/// The spans of one export request.
pub fn decode(request: &Recorded) -> Vec<ReceivedSpan> {
    assert_eq!(request.path_and_query, "/v1/traces");
    assert_eq!(
        request.header("content-type"),
        Some("application/x-protobuf")
    );
    let export = ExportTraceServiceRequest::decode(request.body.as_ref()).unwrap();
    let mut spans = Vec::new();
    for resource_spans in export.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
            let status = span.status.unwrap_or_default();
            spans.push(ReceivedSpan {
                name: span.name,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent_span_id: hex(&span.parent_span_id),
                kind: span.kind,
                attributes: attributes(&span.attributes),
                events: span.events.into_iter().map(|e| e.name).collect(),
                status_code: status.code,
                status_message: status.message,
                resource: resource.clone(),
            });
        }
    }
    spans
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(attributes: &[KeyValue]) -> Map<String, Value> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.as_ref().map_or(Value::Null, json)))
        .collect()
}

fn json(value: &AnyValue) -> Value {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => Value::from(s.clone()),
        Some(any_value::Value::BoolValue(b)) => Value::from(*b),
        Some(any_value::Value::IntValue(i)) => Value::from(*i),
        Some(any_value::Value::DoubleValue(d)) => Value::from(*d),
        Some(any_value::Value::ArrayValue(a)) => a.values.iter().map(json).collect(),
        Some(other) => Value::from(format!("{other:?}")),
        None => Value::Null,
    }
}

/// The process-wide value of `openrouter_otel_spans_dropped_total` on the Prometheus page.
pub fn spans_dropped_metric() -> f64 {
    openrouter_proxy::record::metrics::handle()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix("openrouter_otel_spans_dropped_total "))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}
