//! vLLM's native gRPC (`vllm-proto` 0.6.0, vllm-grpc.md) as an engine transport: the pure
//! conversions between the OpenAI surface Tandem serves and vLLM's `GenerateRequest` /
//! `GenerateResponse`, so a gRPC engine's answer is byte-for-byte what an HTTP engine would
//! have written (ids and timestamps aside).
//!
//! - [`request`]: an OpenAI body + Tandem's prompt token ids → the `GenerateRequest` of one leg
//!   (colocated, prefill, decode), and `kv_transfer_params` between JSON and `Struct`.
//! - [`render`]: `GenerateResponse` messages → SSE events or the JSON body.

// Wired in by the gRPC transport.
#![allow(dead_code)]

pub(crate) mod render;
pub(crate) mod request;

// Unused until then too.
#[allow(unused_imports)]
pub(crate) use render::{stream_error, stream_usage, Chunk, RenderError, RenderSpec, Renderer};
#[allow(unused_imports)]
pub(crate) use request::{
    generate_request, json_to_struct, stringify_remote_port, struct_to_json, Leg, OpenAiRequest,
    RequestError,
};
