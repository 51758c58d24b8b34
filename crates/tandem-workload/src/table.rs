//! A plain-text comparison table: metrics down, policies across, so that a glance along a row
//! compares policies on one metric.

use crate::report::Summary;

type Cell = fn(&Summary) -> Option<String>;

fn ms(v: f64) -> String {
    format!("{v:.1}")
}

fn pct(v: f64) -> String {
    format!("{:.1}", v * 100.0)
}

fn rate(v: f64) -> String {
    format!("{v:.2}")
}

/// Render summaries side by side: one row per metric, one column per `(policy, summary)`.
///
/// Metric names are left-aligned, values right-aligned under their policy; `-` marks a value a
/// summary lacks, and rows no summary has (e.g. decode spread without disaggregation) are
/// omitted. Times in ms, rates per second, hit rates and attainment in percent.
pub fn side_by_side(columns: &[(&str, &Summary)]) -> String {
    let rows = rows();
    let mut table: Vec<Vec<String>> = Vec::with_capacity(rows.len() + 1);
    let mut header = vec!["metric".to_string()];
    header.extend(columns.iter().map(|(name, _)| name.to_string()));
    table.push(header);
    for (label, cell) in &rows {
        let values: Vec<Option<String>> = columns.iter().map(|(_, s)| cell(s)).collect();
        if values.iter().all(Option::is_none) {
            continue;
        }
        let mut row = vec![label.to_string()];
        row.extend(values.into_iter().map(|v| v.unwrap_or_else(|| "-".into())));
        table.push(row);
    }
    let widths: Vec<usize> = (0..=columns.len())
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (i, row) in table.iter().enumerate() {
        let mut line = format!("{:<w$}", row[0], w = widths[0]);
        for (c, v) in row.iter().enumerate().skip(1) {
            line.push_str(&format!("  {v:>w$}", w = widths[c]));
        }
        out.push_str(line.trim_end());
        out.push('\n');
        if i == 0 {
            let total = widths.iter().sum::<usize>() + 2 * columns.len();
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out
}

fn rows() -> Vec<(&'static str, Cell)> {
    let mut rows: Vec<(&'static str, Cell)> = vec![
        ("requests ok", |s| Some(s.ok.to_string())),
        ("requests failed", |s| Some(s.failed.to_string())),
        ("duration s", |s| Some(format!("{:.1}", s.duration_s))),
        ("throughput req/s", |s| Some(rate(s.requests_per_s))),
        ("output tok/s", |s| {
            Some(format!("{:.0}", s.output_tokens_per_s))
        }),
        ("goodput req/s", |s| Some(rate(s.goodput_requests_per_s))),
        ("SLO attainment %", |s| Some(pct(s.slo_attainment))),
        ("SLO TTFT/TPOT ms", |s| {
            Some(format!("{}/{}", s.slo.ttft_ms, s.slo.tpot_ms))
        }),
    ];
    macro_rules! dist {
        ($field:ident, $name:literal) => {
            rows.push((concat!($name, " p50 ms"), |s| s.$field.map(|d| ms(d.p50))));
            rows.push((concat!($name, " p90 ms"), |s| s.$field.map(|d| ms(d.p90))));
            rows.push((concat!($name, " p99 ms"), |s| s.$field.map(|d| ms(d.p99))));
            rows.push((concat!($name, " mean ms"), |s| s.$field.map(|d| ms(d.mean))));
        };
    }
    dist!(ttft_ms, "TTFT");
    dist!(queue_ms, "· queue");
    dist!(prefill_ms, "· prefill");
    dist!(handoff_ms, "· handoff");
    dist!(decode_first_token_ms, "· decode 1st tok");
    dist!(tpot_ms, "TPOT");
    dist!(itl_ms, "ITL");
    dist!(e2e_ms, "E2E");
    rows.push(("prefix hit %", |s| s.prefix_hit_rate.map(pct)));
    rows.push(("hit upper bound %", |s| s.hit_upper_bound.map(pct)));
    rows.push(("hit / bound %", |s| s.hit_vs_bound.map(pct)));
    macro_rules! spread {
        ($role:ident, $name:literal) => {
            rows.push((concat!($name, " engines"), |s| {
                (!s.$role.per_engine.is_empty()).then(|| s.$role.per_engine.len().to_string())
            }));
            rows.push((concat!($name, " req max/mean"), |s| {
                s.$role.requests_max_over_mean.map(rate)
            }));
            rows.push((concat!($name, " req min/mean"), |s| {
                s.$role.requests_min_over_mean.map(rate)
            }));
            rows.push((concat!($name, " tok max/mean"), |s| {
                s.$role.prompt_tokens_max_over_mean.map(rate)
            }));
            rows.push((concat!($name, " tok min/mean"), |s| {
                s.$role.prompt_tokens_min_over_mean.map(rate)
            }));
        };
    }
    spread!(prefill_load, "prefill");
    spread!(decode_load, "decode");
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Outcome, Slo};

    fn summary(ttft: f64, engines: &[&str]) -> Summary {
        let outcomes: Vec<Outcome> = engines
            .iter()
            .map(|e| Outcome {
                ok: true,
                ttft_ms: ttft,
                e2e_ms: ttft + 90.0,
                output_tokens: 10,
                prompt_tokens: 100,
                cached_tokens: 50,
                prefill_engine: Some((*e).into()),
                ..Outcome::default()
            })
            .collect();
        let slo = Slo {
            ttft_ms: 500.0,
            tpot_ms: 20.0,
        };
        Summary::from_outcomes(&outcomes, slo, 10.0)
    }

    #[test]
    fn aligned_columns_and_missing_rows() {
        let a = summary(123.456, &["e1", "e2"]);
        let b = summary(7.0, &["e1", "e1", "e1"]).with_hit_bound(0.8);
        let text = side_by_side(&[("round-robin", &a), ("prefix", &b)]);
        println!("{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("metric"), "{text}");
        assert!(lines[0].ends_with("round-robin  prefix"), "{text}");
        assert!(lines[1].chars().all(|c| c == '-'));
        // Every value line is as wide as the header (right-aligned last column).
        for l in &lines[2..] {
            assert_eq!(l.chars().count(), lines[0].chars().count(), "{l}");
        }
        let row = |name: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(name))
                .map(|l| l.split_whitespace().rev().take(2).collect::<Vec<_>>())
        };
        assert_eq!(row("TTFT p50 ms"), Some(vec!["7.0", "123.5"]));
        assert_eq!(row("hit upper bound %"), Some(vec!["80.0", "-"]));
        assert_eq!(row("prefill req max/mean"), Some(vec!["1.00", "1.00"]));
        // No decode engines anywhere: no decode rows.
        assert!(!text.contains("decode"), "{text}");
        assert_eq!(row("requests ok"), Some(vec!["3", "2"]));
    }

    #[test]
    fn the_coordinators_phases_get_rows_when_a_run_has_them() {
        let o = |phases| Outcome {
            ok: true,
            ttft_ms: 10.0,
            e2e_ms: 20.0,
            output_tokens: 2,
            phases_ms: phases,
            ..Outcome::default()
        };
        let slo = Slo {
            ttft_ms: 500.0,
            tpot_ms: 20.0,
        };
        let with = Summary::from_outcomes(&[o(Some([0.5, 6.0, 0.0, 3.5])), o(None)], slo, 1.0);
        let without = Summary::from_outcomes(&[o(None)], slo, 1.0);
        assert_eq!(with.prefill_ms.unwrap().count, 1);
        let text = side_by_side(&[("a", &with), ("b", &without)]);
        let row = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .map(|l| l.split_whitespace().rev().take(2).collect::<Vec<_>>())
        };
        assert_eq!(row("· prefill p50 ms"), Some(vec!["-", "6.0"]));
        assert_eq!(row("· decode 1st tok p99 ms"), Some(vec!["-", "3.5"]));
        assert!(side_by_side(&[("b", &without)]).find("· queue").is_none());
    }
}
