//! Immutable views of the two pools, as the control loop last published them plus the
//! coordinator's own in-flight accounting.

use std::sync::Arc;

/// Which pool an engine belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolKind {
    Prefill,
    Decode,
}

impl PoolKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Prefill => "prefill",
            PoolKind::Decode => "decode",
        }
    }
}

/// An engine's routable state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// Not probed yet: not routable.
    Unknown,
    Healthy,
    Unhealthy,
    /// Left discovery or shutting down: in-flight requests finish, nothing new is routed.
    Draining,
    /// Passing its probes but taken out of rotation by outlier detection (its requests failed
    /// too often in a row); in-flight requests finish, nothing new is routed.
    Ejected,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Draining => "draining",
            Health::Ejected => "ejected",
        }
    }
}

/// One engine as a policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineView {
    /// Stable index into the pool's engine table (never reused while the process runs).
    pub id: usize,
    pub url: Arc<str>,
    pub health: Health,
    /// Relative capacity for mixed GPUs (1.0 = baseline), as the coordinator weighs the engine
    /// now: less than configured while it ramps up after coming back (slow start).
    pub weight: f64,
    /// Requests the coordinator has in flight on this engine.
    pub inflight: u32,
    /// Prompt tokens the coordinator has sent to this engine for prefill and not seen finish.
    pub queued_prefill_tokens: u64,
    /// Served model name from the engine's `/v1/models`, once known.
    pub model: Option<Arc<str>>,
    /// KV block size from the engine's `vllm:cache_config_info` (or gRPC `ServerInfo`), once
    /// known.
    pub block_size: Option<u32>,
    /// The engine's version where its protocol reports it (gRPC `ServerInfo.engine_version`).
    pub engine_version: Option<Arc<str>>,
    /// vLLM's `num_gpu_blocks` from `vllm:cache_config_info`, once known.
    pub kv_total_blocks: Option<u64>,
    /// Blocks in use at the last scrape (`kv_cache_usage_perc × num_gpu_blocks`), once known.
    pub kv_used_blocks: Option<u64>,
    /// Blocks the coordinator has promised to requests the last scrape cannot have seen yet.
    pub kv_reserved_blocks: u64,
    /// Prefill throughput the coordinator measured on this engine (tokens/s of uncached prompt
    /// per second busy with its prefill legs, decayed); `None` until measured.
    pub prefill_tokens_per_sec: Option<f64>,
    /// The engine group it belongs to (model version, GPU type; the coordinator's `default`
    /// when configured without one); `None` only in views built without groups. A P/D pair is
    /// never planned across groups.
    pub group: Option<Arc<str>>,
}

impl EngineView {
    /// A healthy engine with weight 1 and nothing else known (tests and benches start here).
    pub fn healthy(id: usize, url: impl Into<Arc<str>>) -> Self {
        EngineView {
            id,
            url: url.into(),
            health: Health::Healthy,
            weight: 1.0,
            inflight: 0,
            queued_prefill_tokens: 0,
            model: None,
            block_size: None,
            engine_version: None,
            kv_total_blocks: None,
            kv_used_blocks: None,
            kv_reserved_blocks: 0,
            prefill_tokens_per_sec: None,
            group: None,
        }
    }

    pub fn routable(&self) -> bool {
        self.health == Health::Healthy
    }

    /// Free KV blocks as the coordinator knows them: total − used at the last scrape − its own
    /// reservations since. `None` until a scrape has told us the capacity.
    pub fn kv_free_blocks(&self) -> Option<u64> {
        let total = self.kv_total_blocks?;
        let used = self.kv_used_blocks.unwrap_or(0);
        Some(
            total
                .saturating_sub(used)
                .saturating_sub(self.kv_reserved_blocks),
        )
    }

    /// Whether a prefill on `self` can hand its KV to `decode`: the same group, and the same
    /// model, block size and engine version where both are known (vLLM refuses mismatched block sizes at the NIXL
    /// handshake; gRPC's `ServerInfo` has no compatibility hash, so equal versions stand in).
    pub fn compatible_with(&self, decode: &EngineView) -> bool {
        fn agree<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
        }
        self.group == decode.group
            && agree(&self.model, &decode.model)
            && agree(&self.block_size, &decode.block_size)
            && agree(&self.engine_version, &decode.engine_version)
    }
}

/// Both pools at one moment. Published whole; never mutated after publication.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolSnapshot {
    pub prefill: Vec<EngineView>,
    pub decode: Vec<EngineView>,
}

impl PoolSnapshot {
    /// Only the engines of `group` in both pools (a view with `group: None` counts as
    /// `default_group`'s): what a request routed to that group may be planned on.
    pub fn in_group(mut self, group: &str, default_group: &str) -> PoolSnapshot {
        let keep = |e: &EngineView| e.group.as_deref().unwrap_or(default_group) == group;
        self.prefill.retain(keep);
        self.decode.retain(keep);
        self
    }

    /// Whether both pools (only decode when `need_prefill` is false) have a routable engine in
    /// `group`.
    pub fn group_routable(&self, group: &str, default_group: &str, need_prefill: bool) -> bool {
        let any = |es: &[EngineView]| {
            es.iter()
                .any(|e| e.routable() && e.group.as_deref().unwrap_or(default_group) == group)
        };
        any(&self.decode) && (!need_prefill || any(&self.prefill))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_group(id: usize, group: Option<&str>) -> EngineView {
        EngineView {
            group: group.map(Arc::from),
            ..EngineView::healthy(id, format!("http://e{id}"))
        }
    }

    #[test]
    fn pairs_never_cross_groups_and_views_filter_by_group() {
        let a = in_group(0, Some("canary"));
        let b = in_group(1, Some("default"));
        let c = in_group(2, Some("canary"));
        assert!(a.compatible_with(&c));
        assert!(!a.compatible_with(&b));
        let snap = PoolSnapshot {
            prefill: vec![a.clone(), b.clone(), in_group(3, None)],
            decode: vec![c.clone(), b.clone()],
        };
        let only = snap.clone().in_group("canary", "default");
        assert_eq!(only.prefill, vec![a]);
        assert_eq!(only.decode, vec![c]);
        let dflt = snap.clone().in_group("default", "default");
        assert_eq!(
            dflt.prefill.iter().map(|e| e.id).collect::<Vec<_>>(),
            [1, 3]
        );
        assert!(snap.group_routable("canary", "default", true));
        assert!(!snap.group_routable("blue", "default", false));
    }
}
