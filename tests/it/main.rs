//! Integration tests: the real `tandem` binary, run as `tandem sim` processes on port 0.
//!
//! Every process prints a JSON ready line with its bound addresses; tests wait for that line,
//! never for a fixed time.

mod batch;
mod bench_trace;
mod coordinator;
mod engine_surface;
mod fault_suite;
mod faults;
mod front_door;
mod fuzz;
mod kv_events;
mod kv_probe;
#[cfg(feature = "nixl")]
mod nixl;
mod observability;
mod openai_fields;
#[cfg(feature = "otel")]
mod otel;
mod outlier;
mod overload;
mod pd;
mod policy_pairs;
mod priority;
mod protocols;
mod recommend;
mod routing;
mod side_endpoints;
mod sim_grpc;
mod splits;
mod support;
mod tenants;
mod tls;
