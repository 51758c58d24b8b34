use super::*;
use std::collections::BTreeSet;

#[test]
fn ttft_edges_rise_at_most_ten_percent_between_10_ms_and_10_s() {
    // The bound a `histogram_quantile` estimate's error rests on (the demo checks its p99).
    for w in TTFT_BUCKETS.windows(2) {
        assert!(w[1] > w[0], "edges ascend: {w:?}");
        if (0.01..10.0).contains(&w[0]) {
            assert!(w[1] / w[0] <= 1.1 + 1e-9, "step {w:?} over 10 %");
        }
    }
}

/// Every sample name the registry can expose, from its `# TYPE` lines.
fn exported(m: &Metrics) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in m.encode().lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut it = rest.split(' ');
        let (Some(name), Some(kind)) = (it.next(), it.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
}

#[test]
fn every_name_is_prefixed_and_every_dashboard_query_names_an_exported_metric() {
    let m = Metrics::new(Some(2.0), true);
    // Families appear in the exposition once they have a child: give each one.
    let e = EngineLabels {
        pool: "decode",
        engine: "http://d".into(),
    };
    m.requests
        .get_or_create(&RequestLabels {
            route: "local",
            outcome: "ok",
            group: "default".into(),
        })
        .inc();
    m.ttft
        .get_or_create(&TtftLabels {
            route: "local",
            model: "m".into(),
            group: "default".into(),
        })
        .observe(0.1);
    m.group_selected("default", "split");
    m.phase
        .get_or_create(&PhaseLabels { phase: "queue" })
        .observe(0.1);
    m.route_decisions
        .get_or_create(&RouteLabels {
            pool: "decode",
            policy: "p",
            reason: "r",
        })
        .inc();
    m.disagg_decisions
        .get_or_create(&DisaggLabels {
            decision: "local",
            reason: "r",
        })
        .inc();
    m.retries
        .get_or_create(&RetryLabels {
            leg: "decode",
            reason: "r",
        })
        .inc();
    for g in [
        &m.engine_up,
        &m.engine_inflight,
        &m.engine_prefill_queue,
        &m.engine_kv_total,
        &m.engine_kv_free,
    ] {
        g.get_or_create(&e).set(1);
    }
    m.pool_engines
        .get_or_create(&PoolStateLabels {
            pool: "decode",
            state: "healthy",
        })
        .set(1);
    m.pd_ratio
        .get_or_create(&RatioLabels { kind: "live" })
        .set(1.0);
    m.handoff("delivered");
    for f in [&m.admission_queued, &m.admission_rejected] {
        f.get_or_create(&AdmissionLabels {
            class: "batch",
            reason: "r",
        })
        .inc();
    }
    m.admission_waiting
        .get_or_create(&ClassLabels { class: "batch" })
        .set(1);
    m.outlier.ejected(PoolKind::Decode, "http://d", "5xx");
    m.outlier.weight.get_or_create(&e).set(1.0);
    let names = exported(&m);
    assert!(names.iter().all(|n| n.starts_with("tandem_")), "{names:?}");
    for family in [
        "tandem_requests_total",
        "tandem_ttft_seconds_bucket",
        "tandem_phase_seconds_bucket",
        "tandem_itl_seconds_bucket",
        "tandem_tpot_seconds_bucket",
        "tandem_e2e_seconds_bucket",
        "tandem_route_decisions_total",
        "tandem_disaggregation_decisions_total",
        "tandem_engine_up",
        "tandem_engine_inflight",
        "tandem_engine_kv_free_blocks",
        "tandem_engine_prefill_queue_tokens",
        "tandem_pool_engines",
        "tandem_pd_ratio",
        "tandem_handoffs_total",
        "tandem_handoffs_pinned",
        "tandem_engine_ejections_total",
        "tandem_engine_effective_weight",
        "tandem_admission_queued_total",
        "tandem_admission_rejected_total",
        "tandem_admission_waiting",
        "tandem_admission_waiting_peak",
    ] {
        assert!(names.contains(family), "{family} not exported");
    }

    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/grafana/tandem.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard file"))
            .expect("dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 6);
    let mut checked = 0;
    for p in panels {
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {} has no query", p["title"]);
        for t in targets {
            let expr = t["expr"].as_str().expect("expr");
            let mut found = 0;
            for (i, _) in expr.match_indices("tandem_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(names.contains(&name), "{name} in `{expr}` is not exported");
                found += 1;
            }
            assert!(found > 0, "`{expr}` names no Tandem metric");
            checked += found;
        }
    }
    assert!(checked >= 19);
}
