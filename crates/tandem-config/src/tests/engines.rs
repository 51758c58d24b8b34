//! `[outlier]` and `[tls]`: defaults, each validation rule, and the round trip through `render`.

use super::{with_pools, SMALLEST};
use crate::*;

fn invalid(doc: &str, key: &str) -> String {
    match from_toml_str(doc) {
        Err(ConfigError::Invalid { key: k, reason }) => {
            assert_eq!(k, key, "reason: {reason}\n{doc}");
            reason
        }
        other => panic!("expected Invalid {{ key: {key} }}, got {other:?}\n{doc}"),
    }
}

#[test]
fn outlier_and_tls_defaults() {
    let cfg = from_toml_str(SMALLEST).unwrap();
    let o = &cfg.outlier;
    assert_eq!(o.consecutive_failures, 5);
    assert_eq!(o.base_ejection_ms, 30_000);
    assert_eq!(o.max_ejection_ms, 300_000);
    assert_eq!(o.max_ejection_percent, 50);
    assert_eq!(o.slow_start_ms, 30_000);
    assert_eq!(o.slow_start_min_percent, 10);
    assert!(o.ejects());
    assert_eq!(cfg.tls.ca_file, None);
    assert!(cfg.tls.system_roots);
}

#[test]
fn zero_turns_ejection_and_slow_start_off() {
    let cfg = from_toml_str(&with_pools(
        "[outlier]\nconsecutive_failures = 0\nslow_start_ms = 0\n",
    ))
    .unwrap();
    assert!(!cfg.outlier.ejects());
    assert_eq!(cfg.outlier.slow_start_ms, 0);
}

#[test]
fn outlier_rules_name_their_key() {
    let r = invalid(
        &with_pools("[outlier]\nbase_ejection_ms = 0\n"),
        "outlier.base_ejection_ms",
    );
    assert!(r.contains("consecutive_failures = 0"), "{r}");
    let r = invalid(
        &with_pools("[outlier]\nbase_ejection_ms = 1000\nmax_ejection_ms = 999\n"),
        "outlier.max_ejection_ms",
    );
    assert!(r.contains("at least base_ejection_ms (1000)"), "{r}");
    invalid(
        &with_pools("[outlier]\nmax_ejection_percent = 101\n"),
        "outlier.max_ejection_percent",
    );
    for p in [0, 101] {
        invalid(
            &with_pools(&format!("[outlier]\nslow_start_min_percent = {p}\n")),
            "outlier.slow_start_min_percent",
        );
    }
    // 100 % is allowed: the last routable engine is still kept.
    assert!(from_toml_str(&with_pools("[outlier]\nmax_ejection_percent = 100\n")).is_ok());
}

#[test]
fn unknown_outlier_and_tls_keys_are_errors() {
    for doc in [
        "[outlier]\nconsecutive_5xx = 3\n",
        "[tls]\ninsecure_skip_verify = true\n",
    ] {
        let e = from_toml_str(&with_pools(doc)).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
    }
}

#[test]
fn tls_rules_name_their_key() {
    invalid(&with_pools("[tls]\nca_file = \"\"\n"), "tls.ca_file");
    let r = invalid(
        &with_pools("[tls]\nsystem_roots = false\n"),
        "tls.system_roots",
    );
    assert!(r.contains("needs tls.ca_file"), "{r}");
    let cfg = from_toml_str(&with_pools(
        "[tls]\nca_file = \"/ca.pem\"\nsystem_roots = false\n",
    ))
    .unwrap();
    assert_eq!(
        cfg.tls.ca_file.as_deref(),
        Some(std::path::Path::new("/ca.pem"))
    );
}

#[test]
fn outlier_and_tls_come_from_the_environment_and_render_back() {
    let env: std::collections::HashMap<String, String> = [
        ("TANDEM__OUTLIER__CONSECUTIVE_FAILURES", "3"),
        ("TANDEM__OUTLIER__SLOW_START_MS", "0"),
        ("TANDEM__TLS__CA_FILE", "/etc/tandem/ca.pem"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let cli = [
        ("pools.prefill.endpoints", "https://p:1"),
        ("pools.decode.endpoints", "https://d:1"),
        ("outlier.max_ejection_percent", "100"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let cfg = load(None, Some(env), &cli).unwrap();
    assert_eq!(cfg.outlier.consecutive_failures, 3);
    assert_eq!(cfg.outlier.slow_start_ms, 0);
    assert_eq!(cfg.outlier.max_ejection_percent, 100);
    assert_eq!(
        cfg.tls.ca_file.as_deref(),
        Some(std::path::Path::new("/etc/tandem/ca.pem"))
    );
    let text = render(&cfg);
    assert!(
        text.contains("[outlier]") && text.contains("[tls]"),
        "{text}"
    );
    assert_eq!(from_toml_str(&text).unwrap(), cfg, "rendered:\n{text}");
}
