//! Getting finished spans to the collector off the request path: a bounded queue in front of the
//! SDK's batch processor (its own thread), an OTLP/HTTP client on that thread's own runtime, and
//! the count of every span the collector did not accept.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use opentelemetry::Context;
use opentelemetry_http::hyper::HyperClient;
use opentelemetry_http::{HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Span, SpanData, SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use prost::Message;

use crate::config::OtelConfig;

/// Spans the collector did not accept: refused by the full queue, in a failed or timed-out
/// export, rejected in a partial success, or ended after shutdown.
#[derive(Debug, Default)]
pub struct Drops(AtomicU64);

impl Drops {
    pub fn add(&self, spans: u64) {
        if spans > 0 {
            self.0.fetch_add(spans, Ordering::Relaxed);
            metrics::counter!(super::SPANS_DROPPED).increment(spans);
        }
    }

    pub fn total(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The bound on finished spans not yet handed to the exporter. The SDK's processor has the same
/// bound but drops silently; admitting here first makes every refusal countable.
#[derive(Debug)]
pub struct Gate {
    queued: AtomicUsize,
    capacity: usize,
    closed: AtomicBool,
    pub drops: Drops,
}

impl Gate {
    pub fn new(capacity: usize) -> Gate {
        Gate {
            queued: AtomicUsize::new(0),
            capacity,
            closed: AtomicBool::new(false),
            drops: Drops::default(),
        }
    }

    /// Two racing spans at the bound may both be refused; never more than `capacity` are queued.
    fn admit(&self) -> bool {
        if self.is_closed() {
            return false;
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// After shutdown began, spans still ending are never exported.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// The SDK's batch processor behind [`Gate`].
#[derive(Debug)]
struct BoundedProcessor {
    inner: BatchSpanProcessor,
    gate: Arc<Gate>,
}

impl SpanProcessor for BoundedProcessor {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.gate.admit() {
            self.inner.on_end(span);
        } else {
            self.gate.drops.add(1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.gate.closed.store(true, Ordering::Release);
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// The OTLP exporter, releasing queue places as batches leave and counting failed batches.
#[derive(Debug)]
struct CountingExporter<E> {
    inner: E,
    gate: Arc<Gate>,
    failing: AtomicBool,
}

impl<E: SpanExporter> SpanExporter for CountingExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        self.gate.queued.fetch_sub(spans, Ordering::AcqRel);
        let result = self.inner.export(batch).await;
        match &result {
            Err(error) => {
                self.gate.drops.add(spans as u64);
                // One line when the collector goes away and one when it is back, not one per batch.
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%error, "trace export failed; spans are dropped and counted until it recovers");
                }
            }
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("trace export recovered");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// OTLP/HTTP over hyper-util and rustls (the stack the proxy already uses), driven by a runtime
/// of its own. The SDK's batch processor runs exports on its dedicated thread with a plain
/// executor; blocking that thread on this runtime keeps every byte of export I/O off the
/// runtime that serves requests, and works whatever runtime (if any) built the tracer.
#[derive(Debug)]
struct ExportClient {
    inner: HyperClient<HttpsConnector<HttpConnector>>,
    runtime: ExportRuntime,
    gate: Arc<Gate>,
}

#[async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let response = self.runtime.block_on(self.inner.send_bytes(request))??;
        if response.status().is_success() {
            // A partial success names the spans the collector refused; the export itself is Ok.
            if let Ok(answer) = ExportTraceServiceResponse::decode(response.body().as_ref()) {
                let rejected = answer.partial_success.map_or(0, |p| p.rejected_spans);
                self.gate.drops.add(u64::try_from(rejected).unwrap_or(0));
            }
        }
        Ok(response)
    }
}

/// A current-thread runtime that can be dropped anywhere, also inside another runtime.
#[derive(Debug)]
struct ExportRuntime(Option<tokio::runtime::Runtime>);

impl ExportRuntime {
    fn block_on<F: std::future::Future>(&self, future: F) -> Result<F::Output, HttpError> {
        match &self.0 {
            Some(runtime) => Ok(runtime.block_on(future)),
            None => Err("the export runtime is gone".into()),
        }
    }
}

impl Drop for ExportRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn export_client(config: &OtelConfig, gate: Arc<Gate>) -> Result<ExportClient, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the trace export runtime: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    // The system's roots (a cluster CA mounted for the collector) where there are any, else
    // the bundled ones; plain http needs neither.
    let tls = match HttpsConnectorBuilder::new().with_provider_and_native_roots(provider.clone()) {
        Ok(builder) => builder,
        Err(_) => HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
            .map_err(|e| format!("TLS set-up for trace export failed: {e}"))?,
    };
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.export_timeout));
    let connector = tls
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(ExportClient {
        inner: HyperClient::new(connector, config.export_timeout, None),
        runtime: ExportRuntime(Some(runtime)),
        gate,
    })
}

/// The batch pipeline: gate -> SDK batch processor (own thread) -> counting exporter -> OTLP.
pub fn processor(
    config: &OtelConfig,
    traces_url: &str,
    gate: Arc<Gate>,
) -> Result<impl SpanProcessor + 'static, String> {
    let otlp = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(export_client(config, gate.clone())?)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(traces_url)
        .with_timeout(config.export_timeout)
        .build()
        .map_err(|e| format!("cannot build the trace exporter: {e}"))?;
    let exporter = CountingExporter {
        inner: otlp,
        gate: gate.clone(),
        failing: AtomicBool::new(false),
    };
    let batches = BatchConfigBuilder::default()
        .with_max_queue_size(config.max_queue_size)
        .with_max_export_batch_size(config.max_export_batch_size)
        .with_scheduled_delay(config.export_interval)
        .build();
    Ok(BoundedProcessor {
        inner: BatchSpanProcessor::builder(exporter)
            .with_batch_config(batches)
            .build(),
        gate,
    })
}
