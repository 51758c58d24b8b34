//! Fault injection, set by command-line flags at start and at runtime through `POST /admin/faults`.
//!
//! Faults are deterministic counters and switches, never random rates, so a test says exactly
//! which request fails. Counted faults ("the next N requests") decrement as they fire.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The runtime-settable fault switches. Every field is optional in a `POST /admin/faults` body;
/// absent fields are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// Fail the next N generation requests with HTTP 500.
    pub fail_next: Option<u64>,
    /// Accept the next N generation requests and never answer them.
    pub stall_next: Option<u64>,
    /// Cut every response stream after this many streamed tokens (0 = off).
    pub die_after_tokens: Option<u64>,
    /// Refuse the next N KV reads served by this engine's side channel (prefill role).
    pub kv_refuse_next: Option<u64>,
    /// Corrupt the bytes of the next N KV reads served by this engine (prefill role).
    pub kv_corrupt_next: Option<u64>,
    /// Receive NIXL handshakes but never answer them (the decode side times out).
    pub handshake_stall: Option<bool>,
    /// Delay, in real milliseconds, before each request is accepted for processing.
    pub slow_accept_ms: Option<u64>,
    /// Hold every free KV block, so new requests wait and running ones are preempted.
    pub exhaust_kv: Option<bool>,
    /// The next N requests sample EOS as their first token (a prefill then returns null
    /// `kv_transfer_params`, exercising the proxy's fallback).
    pub eos_next: Option<u64>,
}

/// Shared fault state. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    fail_next: AtomicU64,
    stall_next: AtomicU64,
    die_after_tokens: AtomicU64,
    kv_refuse_next: AtomicU64,
    kv_corrupt_next: AtomicU64,
    handshake_stall: Arc<AtomicBool>,
    slow_accept_ms: AtomicU64,
    exhaust_kv: AtomicBool,
    eos_next: AtomicU64,
}

/// Take one from a counter if it is positive.
fn take(c: &AtomicU64) -> bool {
    c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

impl Faults {
    pub fn new(spec: &FaultSpec) -> Self {
        let f = Faults::default();
        f.apply(spec);
        f
    }

    /// Apply the fields present in `spec`.
    pub fn apply(&self, spec: &FaultSpec) {
        let i = &self.inner;
        let set = |a: &AtomicU64, v: Option<u64>| {
            if let Some(v) = v {
                a.store(v, Ordering::SeqCst);
            }
        };
        set(&i.fail_next, spec.fail_next);
        set(&i.stall_next, spec.stall_next);
        set(&i.die_after_tokens, spec.die_after_tokens);
        set(&i.kv_refuse_next, spec.kv_refuse_next);
        set(&i.kv_corrupt_next, spec.kv_corrupt_next);
        set(&i.slow_accept_ms, spec.slow_accept_ms);
        set(&i.eos_next, spec.eos_next);
        if let Some(v) = spec.handshake_stall {
            i.handshake_stall.store(v, Ordering::SeqCst);
        }
        if let Some(v) = spec.exhaust_kv {
            i.exhaust_kv.store(v, Ordering::SeqCst);
        }
    }

    /// The current state, every field present.
    pub fn snapshot(&self) -> FaultSpec {
        let i = &self.inner;
        FaultSpec {
            fail_next: Some(i.fail_next.load(Ordering::SeqCst)),
            stall_next: Some(i.stall_next.load(Ordering::SeqCst)),
            die_after_tokens: Some(i.die_after_tokens.load(Ordering::SeqCst)),
            kv_refuse_next: Some(i.kv_refuse_next.load(Ordering::SeqCst)),
            kv_corrupt_next: Some(i.kv_corrupt_next.load(Ordering::SeqCst)),
            handshake_stall: Some(i.handshake_stall.load(Ordering::SeqCst)),
            slow_accept_ms: Some(i.slow_accept_ms.load(Ordering::SeqCst)),
            exhaust_kv: Some(i.exhaust_kv.load(Ordering::SeqCst)),
            eos_next: Some(i.eos_next.load(Ordering::SeqCst)),
        }
    }

    pub fn take_fail(&self) -> bool {
        take(&self.inner.fail_next)
    }

    pub fn take_stall(&self) -> bool {
        take(&self.inner.stall_next)
    }

    pub fn take_kv_refuse(&self) -> bool {
        take(&self.inner.kv_refuse_next)
    }

    pub fn take_kv_corrupt(&self) -> bool {
        take(&self.inner.kv_corrupt_next)
    }

    pub fn take_eos(&self) -> bool {
        take(&self.inner.eos_next)
    }

    /// `Some(n)` when streams are cut after `n` tokens.
    pub fn die_after_tokens(&self) -> Option<u64> {
        match self.inner.die_after_tokens.load(Ordering::SeqCst) {
            0 => None,
            n => Some(n),
        }
    }

    pub fn slow_accept_ms(&self) -> u64 {
        self.inner.slow_accept_ms.load(Ordering::SeqCst)
    }

    pub fn exhaust_kv(&self) -> bool {
        self.inner.exhaust_kv.load(Ordering::SeqCst)
    }

    /// The flag the side channel watches to stall handshakes.
    pub fn handshake_stall_flag(&self) -> Arc<AtomicBool> {
        self.inner.handshake_stall.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_fire_exactly_n_times_and_partial_updates_keep_others() {
        let f = Faults::new(&FaultSpec {
            fail_next: Some(2),
            ..Default::default()
        });
        assert!(f.take_fail());
        assert!(f.take_fail());
        assert!(!f.take_fail());
        f.apply(&FaultSpec {
            die_after_tokens: Some(3),
            ..Default::default()
        });
        assert_eq!(f.die_after_tokens(), Some(3));
        assert_eq!(f.snapshot().fail_next, Some(0));
        let body = r#"{"kv_refuse_next": 1, "bogus": 1}"#;
        assert!(serde_json::from_str::<FaultSpec>(body).is_err());
    }
}
