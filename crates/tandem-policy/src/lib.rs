//! The pure routing core.
//!
//! Everything here is a function of its arguments: an immutable [`PoolSnapshot`], the request's
//! routing facts and an injected RNG. Nothing does IO, reads a clock or keeps hidden state, so a
//! decision can be replayed from its inputs and tested exhaustively.

pub mod affinity;
mod capacity;
mod disagg;
mod plan;
mod policy;
mod prefix;
mod rate;
mod snapshot;

pub use capacity::{KvCapacity, KV_NEAR_TIE, KV_PLENTY};
pub use disagg::{decide, DisaggDecision, DisaggMode, DisaggReason, DisaggSettings};
pub use plan::{plan, plan_decode, Pick, Plan, PlanError, RouteRequest};
pub use policy::{
    load, policy_for, Choice, LeastLoaded, LeastRequests, Policy, PolicyKind, PowerOfTwo,
    RandomPolicy, RoundRobin, RouteFacts, RouteReason,
};
pub use prefix::{PrefixParams, PrefixPolicy};
pub use rate::{RateEstimate, DECAY_SECS, MIN_BUSY_SECS};
pub use snapshot::{EngineView, Health, PoolKind, PoolSnapshot};
