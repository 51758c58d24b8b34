//! OpenTelemetry export of request spans (the `otel` feature): a batch OTLP/HTTP exporter behind a
//! `tracing` layer, and the [`TraceLink`] that makes the exported request span the parent the
//! engines see in `traceparent`.

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::Context;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tandem_config::{OtlpProtocol, TelemetryConfig};
use tandem_proxy::trace::{TraceLink, TraceParent, W3cLink};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The exporter's provider; [`shutdown`] flushes what is still batched.
pub type Provider = SdkTracerProvider;

/// The provider for `cfg.otlp_endpoint` (which the caller checked is set).
pub fn provider(cfg: &TelemetryConfig, endpoint: &str) -> Result<Provider, String> {
    let protocol = match cfg.otlp_protocol {
        OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
        OtlpProtocol::HttpJson => Protocol::HttpJson,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol)
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint {endpoint}: {e}"))?;
    // A client's sampling decision stands; traces Tandem starts are sampled at the ratio.
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sample_ratio)));
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(
            Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build())
}

/// The `tracing` layer that turns spans into OpenTelemetry spans.
pub fn layer<S>(
    p: &Provider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(p.tracer("tandem"))
}

/// Flush and stop the exporter (blocks: call it off the async runtime's workers).
pub fn shutdown(p: Provider) {
    if let Err(e) = p.shutdown() {
        eprintln!("warning: flushing spans at shutdown failed: {e}");
    }
}

/// Parent the request span on the client's span, then hand the engines the request span's ids.
#[derive(Debug, Default)]
pub struct OtelLink;

impl TraceLink for OtelLink {
    fn link(&self, span: &tracing::Span, parent: Option<&TraceParent>) -> TraceParent {
        if let Some(p) = parent {
            let remote = SpanContext::new(
                TraceId::from_bytes(p.trace_id),
                SpanId::from_bytes(p.parent_id),
                TraceFlags::new(p.flags),
                true,
                TraceState::default(),
            );
            // Fails only when the span is filtered out; then the ids below are not valid either.
            let _ = span.set_parent(Context::new().with_remote_span_context(remote));
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return W3cLink.link(span, parent);
        }
        TraceParent {
            trace_id: sc.trace_id().to_bytes(),
            parent_id: sc.span_id().to_bytes(),
            flags: sc.trace_flags().to_u8(),
        }
    }
}
