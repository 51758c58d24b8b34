//! One test per validation rule: the error is `Invalid` and names the key.

use super::{pool, with_pools};
use crate::*;

/// Asserts `doc` fails validation on `key`; returns the reason.
fn invalid_toml(doc: &str, key: &str) -> String {
    match from_toml_str(doc) {
        Err(ConfigError::Invalid { key: k, reason }) => {
            assert_eq!(k, key, "reason: {reason}\n{doc}");
            reason
        }
        other => panic!("expected Invalid {{ key: {key} }}, got {other:?}\n{doc}"),
    }
}

/// Asserts that loading with only these command-line overrides (plus two
/// one-endpoint pools) fails on `key`; returns the reason. Going through
/// `load` checks that string overrides reach validation with their types.
fn invalid_override(overrides: &[(&str, &str)], key: &str) -> String {
    let pools = [
        ("pools.prefill.endpoints", "http://p:1"),
        ("pools.decode.endpoints", "http://d:1"),
    ];
    let cli: Vec<(String, String)> = pools
        .iter()
        .chain(overrides)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match load(None, Some(Default::default()), &cli) {
        Err(ConfigError::Invalid { key: k, reason }) => {
            assert_eq!(k, key, "reason: {reason}");
            reason
        }
        other => panic!("expected Invalid {{ key: {key} }}, got {other:?}"),
    }
}

/// A document whose decode pool has these endpoints (TOML array items).
fn decode_endpoints(items: &str) -> String {
    format!(
        "[pools.prefill]\nendpoints = [\"http://p:1\"]\n[pools.decode]\nendpoints = [{items}]\n"
    )
}

#[test]
fn good_endpoint_urls_are_accepted() {
    for url in [
        "http://a:1",
        "https://a.b-c_d.example:65535",
        "http://10.0.0.1:8000/",
        "http://[::1]:8000",
        "https://[2001:db8::2]:443/",
    ] {
        let doc = decode_endpoints(&format!("\"{url}\""));
        assert!(
            from_toml_str(&doc).is_ok(),
            "{url} rejected: {:?}",
            from_toml_str(&doc)
        );
    }
}

#[test]
fn bad_endpoint_urls_are_rejected_with_the_index() {
    let cases = [
        ("ftp://a:1", "http://"),
        ("a:1", "http://"),
        ("not a url", "http://"),
        ("", "http://"),
        ("HTTP://a:1", "http://"),
        ("http://a", "explicit port"),
        ("http://a/", "explicit port"),
        ("http://a:1/v1", "no path"),
        ("http://a:1/v1/", "no path"),
        ("http://a:1?x=1", "no path, query or fragment"),
        ("http://a:1#f", "no path, query or fragment"),
        ("http://user@a:1", "user info"),
        ("http://:8000", "host"),
        ("http://", "host"),
        ("http://a b:1", "invalid host"),
        ("http://a:b:1", "invalid host"),
        ("http://::1:8000", "invalid host"),
        ("http://a:0", "invalid port"),
        ("http://a:65536", "invalid port"),
        ("http://a:", "invalid port"),
        ("http://a:+80", "invalid port"),
        ("http://a:80x", "invalid port"),
        ("http://[::1]", "explicit port"),
        ("http://[::1:8000", "unterminated"),
        ("http://[zz::1]:8000", "invalid IPv6"),
        ("http://[::1]x:8000", "unexpected text"),
    ];
    for (url, expect) in cases {
        let doc = decode_endpoints(&format!("\"http://d:1\", \"{url}\""));
        let reason = invalid_toml(&doc, "pools.decode.endpoints[1]");
        assert!(reason.contains(expect), "{url}: {reason}");
    }
}

#[test]
fn bad_urls_in_weighted_tables_and_prefill_are_named_too() {
    let doc = decode_endpoints("{ url = \"http://d\", weight = 2.0 }");
    invalid_toml(&doc, "pools.decode.endpoints[0]");
    let doc = "[pools.prefill]\nendpoints = [\"http://p:1\", \"http://p:2\", \"p:3\"]\n\
               [pools.decode]\nendpoints = [\"http://d:1\"]\n";
    invalid_toml(doc, "pools.prefill.endpoints[2]");
}

#[test]
fn duplicate_endpoints_in_a_pool_are_rejected() {
    for items in [
        "\"http://a:1\", \"http://a:1\"",
        "\"http://a:1\", \"http://a:1/\"",
        "\"http://a:1\", \"http://A:1\"",
        "\"http://a:1\", { url = \"http://a:1\", weight = 2.0 }",
    ] {
        let doc = decode_endpoints(items);
        let reason = invalid_toml(&doc, "pools.decode.endpoints[1]");
        assert!(reason.contains("duplicate"), "{items}: {reason}");
    }
    let reason = invalid_toml(
        &decode_endpoints("\"http://a:1\", \"http://b:1\", \"http://a:1/\""),
        "pools.decode.endpoints[2]",
    );
    assert!(reason.contains("duplicate"), "{reason}");
    // The same engine may appear in both pools.
    let doc = "[pools.prefill]\nendpoints = [\"http://a:1\"]\n\
               [pools.decode]\nendpoints = [\"http://a:1\"]\n";
    assert!(from_toml_str(doc).is_ok());
}

#[test]
fn endpoint_weights_must_be_finite_and_positive() {
    for w in ["0", "0.0", "-1.0", "nan", "inf"] {
        let doc = decode_endpoints(&format!(
            "\"http://a:1\", {{ url = \"http://b:1\", weight = {w} }}"
        ));
        let reason = invalid_toml(&doc, "pools.decode.endpoints[1].weight");
        assert!(reason.contains("greater than 0"), "{w}: {reason}");
    }
}

#[test]
fn decode_pool_needs_endpoints_or_dns() {
    let doc = "[pools.prefill]\nendpoints = [\"http://p:1\"]\n[pools.decode]\n";
    invalid_toml(doc, "pools.decode.endpoints");
    let doc =
        "[disaggregation]\nmode = \"never\"\n[pools.prefill]\n[pools.decode]\nendpoints = []\n";
    invalid_toml(doc, "pools.decode.endpoints");
    let doc = "[pools.prefill]\nendpoints = [\"http://p:1\"]\n\
               [pools.decode.dns]\nname = \"decode\"\nport = 8000\n";
    let cfg = from_toml_str(doc).unwrap();
    let dns = cfg.pools.decode.dns.unwrap();
    assert_eq!(
        (dns.scheme.as_str(), dns.interval_secs, dns.weight),
        ("http", 5, 1.0)
    );
}

#[test]
fn prefill_pool_may_be_empty_only_when_mode_is_never() {
    for mode in ["always", "conditional"] {
        let doc = format!(
            "[disaggregation]\nmode = \"{mode}\"\n[pools.prefill]\n\
             [pools.decode]\nendpoints = [\"http://d:1\"]\n"
        );
        let reason = invalid_toml(&doc, "pools.prefill.endpoints");
        assert!(reason.contains("never"), "{reason}");
    }
    let doc = "[pools.prefill.dns]\nname = \"prefill\"\nport = 8000\n\
               [pools.decode]\nendpoints = [\"http://d:1\"]\n";
    assert!(from_toml_str(doc).is_ok());
}

#[test]
fn dns_settings_are_checked() {
    let cases = [
        ("name = \"\"\nport = 1", "pools.decode.dns.name"),
        ("name = \"http://svc\"\nport = 1", "pools.decode.dns.name"),
        ("name = \"svc:8000\"\nport = 1", "pools.decode.dns.name"),
        ("name = \"svc\"\nport = 0", "pools.decode.dns.port"),
        (
            "name = \"svc\"\nport = 1\nscheme = \"ftp\"",
            "pools.decode.dns.scheme",
        ),
        (
            "name = \"svc\"\nport = 1\ninterval_secs = 0",
            "pools.decode.dns.interval_secs",
        ),
        (
            "name = \"svc\"\nport = 1\nweight = 0.0",
            "pools.decode.dns.weight",
        ),
    ];
    for (table, key) in cases {
        let doc =
            format!("[pools.prefill]\nendpoints = [\"http://p:1\"]\n[pools.decode.dns]\n{table}\n");
        invalid_toml(&doc, key);
    }
    // A port that does not fit u16 is a type error from the loader.
    let doc = "[pools.prefill]\nendpoints = [\"http://p:1\"]\n\
               [pools.decode.dns]\nname = \"svc\"\nport = 70000\n";
    assert!(matches!(from_toml_str(doc), Err(ConfigError::Load(_))));
}

#[test]
fn grpc_pools_take_a_metrics_url_and_http_pools_refuse_one() {
    let doc = "[pools.prefill]\nprotocol = \"grpc\"\n\
               endpoints = [{ url = \"http://p:50051\", metrics = \"http://p:8000\" }]\n\
               [pools.decode]\nendpoints = [\"http://d:1\"]\n";
    let cfg = from_toml_str(doc).expect("a gRPC prefill pool with a metrics URL");
    assert_eq!(cfg.pools.prefill.protocol, Protocol::Grpc);
    assert_eq!(
        cfg.pools.prefill.endpoints[0].metrics.as_deref(),
        Some("http://p:8000")
    );
    let doc = "[pools.prefill]\nendpoints = [{ url = \"http://p:1\", metrics = \"http://p:2\" }]\n\
               [pools.decode]\nendpoints = [\"http://d:1\"]\n";
    let reason = invalid_toml(doc, "pools.prefill.endpoints[0].metrics");
    assert!(reason.contains("only a gRPC engine"), "{reason}");
    let doc = "[pools.prefill]\nprotocol = \"grpc\"\n\
               endpoints = [{ url = \"http://p:1\", metrics = \"p:2\" }]\n\
               [pools.decode]\nendpoints = [\"http://d:1\"]\n";
    invalid_toml(doc, "pools.prefill.endpoints[0].metrics");
}

#[test]
fn timeouts_must_be_positive() {
    for key in [
        "connect_ms",
        "prefill_ms",
        "handoff_ms",
        "first_token_ms",
        "idle_ms",
        "prefill_lease_ms",
    ] {
        let key = format!("timeouts.{key}");
        let reason = invalid_override(&[(&key, "0")], &key);
        assert!(reason.contains("greater than 0"), "{reason}");
    }
}

#[test]
fn attempts_must_be_at_least_one() {
    for key in ["retries.prefill_attempts", "retries.decode_attempts"] {
        let reason = invalid_override(&[(key, "0")], key);
        assert!(reason.contains("at least 1"), "{reason}");
    }
}

#[test]
fn ratio_tolerance_range() {
    for bad in ["0", "-0.5", "10.5", "nan"] {
        invalid_override(&[("pools.ratio_tolerance", bad)], "pools.ratio_tolerance");
    }
    for good in ["0.01", "10"] {
        let doc = format!("[pools]\nratio_tolerance = {good}\n") + &with_pools("");
        assert!(from_toml_str(&doc).is_ok(), "{good}");
    }
}

#[test]
fn block_size_range() {
    for bad in ["0", "1025"] {
        invalid_override(&[("model.block_size", bad)], "model.block_size");
    }
    for good in ["1", "1024"] {
        let doc = with_pools(&format!("[model]\nblock_size = {good}"));
        assert!(from_toml_str(&doc).is_ok(), "{good}");
    }
}

#[test]
fn other_positive_settings() {
    for key in [
        "server.max_body_bytes",
        "health.interval_ms",
        "health.timeout_ms",
        "health.scrape_interval_ms",
        "health.unhealthy_after",
        "health.healthy_after",
    ] {
        invalid_override(&[(key, "0")], key);
    }
    // Zero is meaningful for these: no grace period, no request history.
    let doc = with_pools("[server]\nshutdown_grace_secs = 0\nrecent_requests = 0");
    assert!(from_toml_str(&doc).is_ok());
}

#[test]
fn admission_settings_are_checked() {
    for key in [
        "admission.max_wait_ms",
        "admission.interactive_max_wait_ms",
        "admission.batch_max_wait_ms",
        "admission.max_queued_per_tenant",
    ] {
        invalid_override(&[(key, "0")], key);
    }
    let doc = with_pools(
        "[admission]\nmax_queued = 8\nmax_queued_per_tenant = 2\ninteractive_max_wait_ms = 500\n\
         batch_max_wait_ms = 90000\nshed = false",
    );
    let cfg = from_toml_str(&doc).unwrap();
    let a = &cfg.admission;
    assert_eq!(a.max_queued_per_tenant, Some(2));
    assert!(!a.shed);
    assert_eq!(a.max_wait_ms_for(Priority::Interactive), 500);
    assert_eq!(a.max_wait_ms_for(Priority::Default), 5_000);
    assert_eq!(a.max_wait_ms_for(Priority::Batch), 90_000);
    // Unset, one tenant may fill the queue (with [auth] off every request is one tenant).
    assert_eq!(AdmissionConfig::default().max_queued_per_tenant, None);
}

#[test]
fn front_door_settings_are_checked() {
    for key in [
        "server.header_read_timeout_ms",
        "server.body_read_timeout_ms",
        "server.max_connections",
        "limits.max_n",
        "limits.max_tokens",
    ] {
        invalid_override(&[(key, "0")], key);
    }
    for bad in ["0", "1023", "16777217"] {
        let reason = invalid_override(
            &[("server.max_header_bytes", bad)],
            "server.max_header_bytes",
        );
        assert!(reason.contains("between 1024 and"), "{reason}");
    }
    for bad in ["0", "10001"] {
        invalid_override(&[("server.max_headers", bad)], "server.max_headers");
    }
    let reason = invalid_override(
        &[("limits.max_n", "8"), ("limits.max_best_of", "4")],
        "limits.max_best_of",
    );
    assert!(reason.contains("at least limits.max_n (8)"), "{reason}");
    let doc = with_pools(
        "[server]\nmax_header_bytes = 1024\nmax_headers = 1\n\
         [limits]\nmax_n = 1\nmax_best_of = 1\nmax_tokens = 1",
    );
    let cfg = from_toml_str(&doc).unwrap();
    assert_eq!(cfg.limits.max_tokens, Some(1));
    let unknown = from_toml_str(&with_pools("[limits]\nmax_nn = 2"));
    assert!(
        matches!(&unknown, Err(ConfigError::Load(m)) if m.contains("max_nn")),
        "{unknown:?}"
    );
}

#[test]
fn empty_strings_are_rejected_where_unset_is_the_way_to_say_default() {
    for key in [
        "model.tokenizer",
        "model.chat_template",
        "model.served_model_name",
    ] {
        invalid_override(&[(key, "")], key);
    }
    invalid_toml(&with_pools("[logging]\nlevel = \" \""), "logging.level");
}

#[test]
fn integers_beyond_toml_range_are_rejected() {
    // Reachable only from the command line (TOML and the environment parse
    // integers as i64); `render` could not print such a value.
    let reason = invalid_override(
        &[("timeouts.idle_ms", "18446744073709551615")],
        "timeouts.idle_ms",
    );
    assert!(reason.contains("at most"), "{reason}");
}

#[test]
fn validate_is_usable_on_a_built_config() {
    let mut cfg = Config::new(PoolsConfig::new(
        pool(&["http://p:1"]),
        pool(&["http://d:1"]),
    ));
    assert!(cfg.validate().is_ok());
    cfg.pools.decode = pool(&[]);
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::Invalid { key, .. }) if key == "pools.decode.endpoints"
    ));
}

#[test]
fn auth_limits_backend_and_admin_listener_are_checked() {
    for key in [
        "limits.redis_timeout_ms",
        "limits.redis_retry_ms",
        "auth.reload_interval_ms",
    ] {
        invalid_override(&[(key, "0")], key);
    }
    let reason = invalid_override(&[("limits.backend", "redis")], "limits.redis_url");
    assert!(reason.contains("needs redis_url"), "{reason}");
    // The URL may carry a password: the reason never quotes it.
    let reason = invalid_override(
        &[("limits.redis_url", "rediss://:hunter2@r:6379")],
        "limits.redis_url",
    );
    assert!(!reason.contains("hunter2"), "{reason}");
    invalid_override(
        &[("limits.redis_key_prefix", "a b")],
        "limits.redis_key_prefix",
    );
    invalid_override(&[("auth.keys_file", "")], "auth.keys_file");
    invalid_override(&[("auth.keys_env", "A=B")], "auth.keys_env");
    invalid_override(
        &[
            ("server.listen", "127.0.0.1:8000"),
            ("server.admin_listen", "127.0.0.1:8000"),
        ],
        "server.admin_listen",
    );
    let ok = with_pools(
        "[server]\nadmin_listen = \"127.0.0.1:0\"\n\
         [limits]\nbackend = \"redis\"\nredis_url = \"unix:///run/redis.sock\"\n\
         [auth]\nkeys_file = \"/etc/tandem/keys.toml\"",
    );
    let cfg = from_toml_str(&ok).unwrap();
    assert!(cfg.auth.enabled());
    assert_eq!(cfg.limits.backend, LimitsBackend::Redis);
    assert_eq!(from_toml_str(&render(&cfg)).unwrap(), cfg);
    assert!(!Config::new(cfg.pools.clone()).auth.enabled());
}

/// Two pools with a `default` and a `canary` engine each, then `extra`.
fn grouped(extra: &str) -> String {
    format!(
        "[pools]\n{extra}\n\
         [pools.prefill]\nendpoints = [\"http://p:1\", {{ url = \"http://p:2\", group = \"canary\" }}]\n\
         [pools.decode]\nendpoints = [\"http://d:1\", {{ url = \"http://d:2\", group = \"canary\" }}]\n"
    )
}

#[test]
fn group_splits_are_accepted_and_name_every_group() {
    let cfg = from_toml_str(&grouped("groups = { default = 95, canary = 5 }")).unwrap();
    assert_eq!(cfg.pools.groups["canary"], 5);
    assert_eq!(
        cfg.pools.prefill.endpoints[1].group.as_deref(),
        Some("canary")
    );
    assert_eq!(cfg.pools.group_names(), ["canary", "default"]);
    // A weight-0 group is header- and tenant-only; no table at all sends everything to default.
    from_toml_str(&grouped("groups = { default = 1, canary = 0 }")).unwrap();
    let plain = from_toml_str(&grouped("")).unwrap();
    assert!(plain.pools.groups.is_empty());
}

#[test]
fn group_splits_are_validated() {
    let r = invalid_toml(
        &grouped("groups = { default = 95, blue = 5 }"),
        "pools.groups.blue",
    );
    assert!(r.contains("pools.decode"), "{r}");
    let r = invalid_toml(
        &grouped("groups = { default = 0, canary = 0 }"),
        "pools.groups",
    );
    assert!(r.contains("greater than 0"), "{r}");
    let r = invalid_toml(
        &grouped("groups = { canary = 10001 }"),
        "pools.groups.canary",
    );
    assert!(r.contains("at most 10000"), "{r}");
    invalid_toml(&grouped("groups = { \"a b\" = 1 }"), "pools.groups.a b");
    let long = "g".repeat(33);
    let doc = decode_endpoints(&format!("{{ url = \"http://d:1\", group = \"{long}\" }}"));
    let r = invalid_toml(&doc, "pools.decode.endpoints[0].group");
    assert!(r.contains("1 to 32"), "{r}");
    // A weighted group missing from the prefill pool.
    let doc = "[pools]\ngroups = { canary = 1 }\n[pools.prefill]\nendpoints = [\"http://p:1\"]\n\
               [pools.decode]\nendpoints = [{ url = \"http://d:1\", group = \"canary\" }]\n";
    let r = invalid_toml(doc, "pools.groups.canary");
    assert!(r.contains("pools.prefill"), "{r}");
    // Too many groups to be metric labels.
    let many: Vec<String> = (0..MAX_GROUPS)
        .map(|i| format!("{{ url = \"http://d:{}\", group = \"g{i}\" }}", i + 1))
        .collect();
    invalid_toml(&decode_endpoints(&many.join(", ")), "pools.groups");
}
