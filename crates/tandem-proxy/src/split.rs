//! Canary and traffic splits: which engine group a request is routed in, chosen once per
//! request before planning. The `x-tandem-group` header wins when it names a known group, then
//! the tenant's pinned group, then the weighted split of `pools.groups`. The split is a smooth
//! weighted round-robin over the requests it decides, so over any run of `Σ weights` of them each
//! group gets exactly its weight (a 5 % canary gets 5 of every 100), spread out rather than in
//! bursts. Pure apart from the one atomic counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tandem_config::{PoolsConfig, DEFAULT_GROUP};
use tandem_policy::PoolSnapshot;

/// The header that names a request's group.
pub const GROUP_HEADER: &str = "x-tandem-group";

/// Why a request went to its group (`tandem_group_selected_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Header,
    Tenant,
    Split,
    /// The chosen group had no routable engine in a pool; the request went to the first group
    /// that had (the default group first).
    Fallback,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Header => "header",
            Reason::Tenant => "tenant",
            Reason::Split => "split",
            Reason::Fallback => "fallback",
        }
    }
}

/// The configured groups and the split's schedule.
#[derive(Debug)]
pub struct Splits {
    /// Every configured group name, sorted (`default` included): the only metric labels.
    known: Vec<Arc<str>>,
    /// One period of the smooth weighted round-robin: an index into `known` per slot.
    schedule: Vec<usize>,
    /// Fallback order: `default`, then the weighted groups by weight, descending.
    fallback: Vec<usize>,
    /// Requests the split has decided so far.
    drawn: AtomicU64,
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Splits {
    pub fn new(pools: &PoolsConfig) -> Splits {
        let known: Vec<Arc<str>> = pools.group_names().into_iter().map(Arc::from).collect();
        let index = |g: &str| known.iter().position(|k| &**k == g).expect("a known group");
        let mut weights: Vec<(usize, u32)> = pools
            .groups
            .iter()
            .filter(|(_, &w)| w > 0)
            .map(|(g, &w)| (index(g), w))
            .collect();
        if weights.is_empty() {
            weights.push((index(DEFAULT_GROUP), 1));
        }
        let g = weights.iter().fold(0, |acc, &(_, w)| gcd(acc, w));
        for (_, w) in &mut weights {
            *w /= g;
        }
        let schedule = smooth_wrr(&weights);
        let mut by_weight = weights.clone();
        by_weight.sort_by_key(|&(i, w)| (std::cmp::Reverse(w), i));
        let mut fallback = vec![index(DEFAULT_GROUP)];
        fallback.extend(by_weight.iter().map(|&(i, _)| i));
        fallback.dedup();
        Splits {
            known,
            schedule,
            fallback,
            drawn: AtomicU64::new(0),
        }
    }

    /// The configured group named `name`, if any.
    pub fn known(&self, name: &str) -> Option<&Arc<str>> {
        self.known.iter().find(|k| &***k == name)
    }

    /// Every configured group.
    pub fn names(&self) -> &[Arc<str>] {
        &self.known
    }

    /// The split's pick for the `n`-th request it decides.
    pub fn draw(&self, n: u64) -> &Arc<str> {
        let slot = (n % self.schedule.len() as u64) as usize;
        &self.known[self.schedule[slot]]
    }

    /// The group for one request: `header` (already checked to be known), else the tenant's
    /// pinned group when known, else the next draw of the split.
    pub fn choose(&self, header: Option<&Arc<str>>, tenant: Option<&str>) -> (Arc<str>, Reason) {
        if let Some(h) = header {
            return (h.clone(), Reason::Header);
        }
        if let Some(t) = tenant.and_then(|t| self.known(t)) {
            return (t.clone(), Reason::Tenant);
        }
        let n = self.drawn.fetch_add(1, Ordering::Relaxed);
        (self.draw(n).clone(), Reason::Split)
    }

    /// `group` if both pools (only decode when `need_prefill` is false) have a routable engine
    /// in it, else the first fallback group that has, else `group` (planning then fails as
    /// it would without groups).
    pub fn settle(
        &self,
        snap: &PoolSnapshot,
        group: Arc<str>,
        need_prefill: bool,
    ) -> (Arc<str>, bool) {
        if snap.group_routable(&group, DEFAULT_GROUP, need_prefill) {
            return (group, false);
        }
        self.fallback
            .iter()
            .map(|&i| &self.known[i])
            .find(|g| snap.group_routable(g, DEFAULT_GROUP, need_prefill))
            .map_or((group, false), |g| (g.clone(), true))
    }
}

/// One period of nginx's smooth weighted round-robin over `(item, weight)`: each item appears
/// exactly `weight` times, interleaved as evenly as the weights allow.
fn smooth_wrr(weights: &[(usize, u32)]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&(_, w)| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        for (c, &(_, w)) in current.iter_mut().zip(weights) {
            *c += i64::from(w);
        }
        let best = (0..weights.len())
            .max_by_key(|&i| (current[i], std::cmp::Reverse(i)))
            .expect("at least one group");
        current[best] -= total;
        out.push(weights[best].0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_config::{Endpoint, PoolConfig};
    use tandem_policy::EngineView;

    fn pools(groups: &[(&str, u32)], endpoint_groups: &[&str]) -> PoolsConfig {
        let pool = PoolConfig {
            endpoints: endpoint_groups
                .iter()
                .enumerate()
                .map(|(i, g)| Endpoint {
                    group: Some(g.to_string()),
                    ..Endpoint::new(format!("http://e{i}:1"))
                })
                .collect(),
            ..PoolConfig::default()
        };
        let mut p = PoolsConfig::new(pool.clone(), pool);
        p.groups = groups.iter().map(|&(g, w)| (g.to_owned(), w)).collect();
        p
    }

    #[test]
    fn a_five_percent_canary_gets_five_percent_of_10000_draws() {
        let s = Splits::new(&pools(
            &[("default", 95), ("canary", 5)],
            &["default", "canary"],
        ));
        let canary = (0..10_000)
            .filter(|_| &*s.choose(None, None).0 == "canary")
            .count();
        assert_eq!(canary, 500);
        // Spread out, not in a burst: never two canaries within 19 draws of each other.
        let picks: Vec<bool> = (0..200).map(|n| &**s.draw(n) == "canary").collect();
        let at: Vec<usize> = (0..200).filter(|&i| picks[i]).collect();
        assert!(at.windows(2).all(|w| w[1] - w[0] == 20), "{at:?}");
        // Any window of 1,000 consecutive draws is within ±1 %.
        for start in [0u64, 7, 333, 9_000] {
            let c = (start..start + 1_000)
                .filter(|&n| &**s.draw(n) == "canary")
                .count();
            assert!((40..=60).contains(&c), "{c}");
        }
    }

    #[test]
    fn uneven_weights_hold_exactly_over_a_period() {
        let s = Splits::new(&pools(&[("a", 3), ("b", 7), ("c", 0)], &["a", "b", "c"]));
        let mut counts = std::collections::HashMap::new();
        for n in 0..1_000 {
            *counts.entry(s.draw(n).to_string()).or_insert(0) += 1;
        }
        assert_eq!(counts["a"], 300);
        assert_eq!(counts["b"], 700);
        assert!(!counts.contains_key("c"));
        assert!(s.known("c").is_some());
    }

    #[test]
    fn header_then_tenant_then_split() {
        let s = Splits::new(&pools(&[("default", 1)], &["default", "canary"]));
        let canary = s.known("canary").cloned();
        assert_eq!(
            s.choose(canary.as_ref(), Some("default")),
            ("canary".into(), Reason::Header)
        );
        assert_eq!(
            s.choose(None, Some("canary")),
            ("canary".into(), Reason::Tenant)
        );
        // A pinned group the configuration does not know is ignored.
        assert_eq!(
            s.choose(None, Some("gone")),
            ("default".into(), Reason::Split)
        );
        assert!(s.known("gone").is_none());
        // No weights at all: everything to `default`.
        let plain = Splits::new(&pools(&[], &["default"]));
        assert_eq!(&*plain.choose(None, None).0, "default");
        assert_eq!(plain.names().len(), 1);
    }

    #[test]
    fn a_group_without_routable_engines_falls_back_to_default() {
        let s = Splits::new(&pools(
            &[("default", 95), ("canary", 5)],
            &["default", "canary"],
        ));
        let view = |id: usize, g: &str, healthy: bool| EngineView {
            group: Some(g.into()),
            health: if healthy {
                tandem_policy::Health::Healthy
            } else {
                tandem_policy::Health::Unhealthy
            },
            ..EngineView::healthy(id, format!("http://e{id}"))
        };
        let snap = PoolSnapshot {
            prefill: vec![view(0, "default", true), view(1, "canary", true)],
            decode: vec![view(2, "default", true), view(3, "canary", false)],
        };
        assert_eq!(
            s.settle(&snap, "canary".into(), true),
            ("default".into(), true)
        );
        assert_eq!(
            s.settle(&snap, "default".into(), true),
            ("default".into(), false)
        );
    }
}
