//! Outlier detection's metrics (`pool/outlier.rs`): ejections by reason, who is out now, and the
//! weight each engine has while it slow-starts. Engine labels are the configured or discovered
//! URLs, as every per-engine family's.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tandem_policy::PoolKind;

use super::EngineLabels;
use crate::pool::{OutlierState, Pools};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub pool: &'static str,
    pub engine: String,
    /// `pool::Failure::as_str`: 5xx, timeout, connection, kv_transfer.
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct OutlierMetrics {
    pub(super) ejections: Family<EjectionLabels, Counter>,
    skipped: Family<EngineLabels, Counter>,
    ejected: Family<EngineLabels, Gauge>,
    pub(super) weight: Family<EngineLabels, Gauge<f64, AtomicU64>>,
}

fn labels(pool: PoolKind, url: &str) -> EngineLabels {
    EngineLabels {
        pool: pool.as_str(),
        engine: url.to_string(),
    }
}

impl OutlierMetrics {
    pub(super) fn register(r: &mut Registry) -> Self {
        let m = OutlierMetrics {
            ejections: Family::default(),
            skipped: Family::default(),
            ejected: Family::default(),
            weight: Family::default(),
        };
        r.register(
            "tandem_engine_ejections",
            "Engines taken out of rotation by outlier detection, by the failure that did it (5xx, timeout, connection, kv_transfer)",
            m.ejections.clone(),
        );
        r.register(
            "tandem_engine_ejections_skipped",
            "Failures past outlier.consecutive_failures that ejected nothing: the pool was at max_ejection_percent or had no other routable engine",
            m.skipped.clone(),
        );
        r.register(
            "tandem_engine_ejected",
            "1 while outlier detection holds the engine out of rotation",
            m.ejected.clone(),
        );
        r.register(
            "tandem_engine_effective_weight",
            "The weight policies give the engine now: its configured weight, ramped up from outlier.slow_start_min_percent over slow_start_ms after it comes back",
            m.weight.clone(),
        );
        m
    }

    pub fn ejected(&self, pool: PoolKind, url: &str, reason: &'static str) {
        self.ejections
            .get_or_create(&EjectionLabels {
                pool: pool.as_str(),
                engine: url.to_string(),
                reason,
            })
            .inc();
    }

    pub fn skipped(&self, pool: PoolKind, url: &str) {
        self.skipped.get_or_create(&labels(pool, url)).inc();
    }

    /// Refresh the gauges from a published pool view.
    pub(super) fn observe(&self, p: &Pools) {
        for kind in [PoolKind::Prefill, PoolKind::Decode] {
            for e in p.pool(kind) {
                let l = labels(kind, &e.engine.url);
                let o = &e.status.outlier;
                self.ejected
                    .get_or_create(&l)
                    .set(i64::from(o.state == OutlierState::Ejected));
                self.weight
                    .get_or_create(&l)
                    .set(e.engine.weight * o.weight_factor);
            }
        }
    }
}
