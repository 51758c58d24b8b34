//! Loading, layering, serde shapes and rendering. Validation rules are in
//! `tests/validation.rs`.

mod engines;
mod validation;

use std::collections::HashMap;
use std::path::PathBuf;

use crate::*;

pub(crate) const SMALLEST: &str = r#"
[server]
listen = "127.0.0.1:8000"
[pools.prefill]
endpoints = ["http://127.0.0.1:8101", "http://127.0.0.1:8102"]
[pools.decode]
endpoints = ["http://127.0.0.1:8201"]
"#;

/// The pools of `SMALLEST` (and of `tandem.example.toml`).
const POOLS: &str = r#"
[pools.prefill]
endpoints = ["http://127.0.0.1:8101", "http://127.0.0.1:8102"]
[pools.decode]
endpoints = ["http://127.0.0.1:8201"]
"#;

/// `extra` TOML (whole tables) followed by the smallest pools.
pub(crate) fn with_pools(extra: &str) -> String {
    format!("{extra}\n{POOLS}")
}

pub(crate) fn pool(urls: &[&str]) -> PoolConfig {
    PoolConfig {
        endpoints: urls.iter().map(|u| Endpoint::new(*u)).collect(),
        ..PoolConfig::default()
    }
}

/// A prefill pool as loading leaves it: the default policy filled in.
pub(crate) fn prefill_pool(urls: &[&str]) -> PoolConfig {
    PoolConfig {
        policy: Some(PolicyName::Prefix),
        ..pool(urls)
    }
}

pub(crate) fn decode_pool(urls: &[&str]) -> PoolConfig {
    PoolConfig {
        policy: Some(PolicyName::KvCapacity),
        ..pool(urls)
    }
}

fn smallest_config() -> Config {
    Config::new(PoolsConfig::new(
        pool(&["http://127.0.0.1:8101", "http://127.0.0.1:8102"]),
        pool(&["http://127.0.0.1:8201"]),
    ))
}

fn env(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn overrides(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Env that supplies both pools, for tests that load without a file.
const ENV_POOLS: [(&str, &str); 2] = [
    ("TANDEM__POOLS__PREFILL__ENDPOINTS", "http://p:1"),
    ("TANDEM__POOLS__DECODE__ENDPOINTS", "http://d:1"),
];

fn load_err(r: Result<Config, ConfigError>) -> String {
    match r {
        Err(ConfigError::Load(msg)) => msg,
        other => panic!("expected a load error, got {other:?}"),
    }
}

/// A file in the temp dir, removed on drop. Named per test (and process) so
/// parallel tests never share one.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("tandem-config-{}-{name}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn smallest_file_loads_with_all_defaults() {
    let cfg = from_toml_str(SMALLEST).unwrap();
    assert_eq!(cfg, smallest_config());
    // Spot-check the documented defaults themselves, not just Default impls.
    assert_eq!(cfg.server.listen.to_string(), "127.0.0.1:8000");
    assert_eq!(cfg.server.max_body_bytes, 33_554_432);
    assert_eq!(cfg.server.shutdown_grace_secs, 30);
    assert_eq!(cfg.server.recent_requests, 1024);
    assert_eq!(cfg.server.max_header_bytes, 65_536);
    assert_eq!(cfg.server.max_headers, 100);
    assert_eq!(cfg.server.header_read_timeout_ms, 10_000);
    assert_eq!(cfg.server.body_read_timeout_ms, 30_000);
    assert_eq!(cfg.server.max_connections, 10_000);
    assert_eq!(cfg.limits.max_n, 16);
    assert_eq!(cfg.limits.max_best_of, 16);
    assert_eq!(cfg.limits.max_tokens, None);
    assert_eq!(cfg.model.block_size, 16);
    assert_eq!(cfg.model.tokenizer, None);
    assert_eq!(cfg.pools.ratio_tolerance, 0.25);
    assert_eq!(cfg.pools.target_ratio, None);
    assert_eq!(cfg.pools.decode.protocol, Protocol::Http);
    assert_eq!(cfg.pools.decode.policy, Some(PolicyName::KvCapacity));
    assert_eq!(cfg.pools.prefill.policy, Some(PolicyName::Prefix));
    assert_eq!(cfg.timeouts.prefill_lease_ms, 450_000);
    assert_eq!(cfg.retries.prefill_attempts, 3);
    assert_eq!(cfg.disaggregation.mode, DisaggregationMode::Conditional);
    assert!(!cfg.disaggregation.enforce);
    assert_eq!(cfg.disaggregation.local_max_uncached_tokens, 256);
    assert_eq!(cfg.disaggregation.local_when_prefill_queue_tokens, 16_384);
    assert_eq!(cfg.health.unhealthy_after, 2);
    assert_eq!(cfg.logging.format, LogFormat::Text);
    assert_eq!(cfg.logging.level, "info");
}

#[test]
fn example_file_documents_the_defaults() {
    let text = include_str!("../tandem.example.toml");
    assert_eq!(from_toml_str(text).unwrap(), smallest_config());
    // And through the file path, as `tandem --config` would load it.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tandem.example.toml");
    let cfg = load(Some(&path), env(&[]), &[]).unwrap();
    assert_eq!(cfg, smallest_config());
}

#[test]
fn file_with_any_extension_is_toml() {
    let f = TempFile::new("any-ext.conf", SMALLEST);
    assert_eq!(load(Some(&f.0), env(&[]), &[]).unwrap(), smallest_config());
}

#[test]
fn missing_file_is_a_load_error_naming_it() {
    let path = PathBuf::from("/nonexistent/tandem-test.toml");
    let msg = load_err(load(Some(&path), env(&[]), &[]));
    assert!(msg.contains("/nonexistent/tandem-test.toml"), "{msg}");
}

#[test]
fn toml_syntax_error_is_a_load_error() {
    let msg = load_err(from_toml_str("[server\nlisten = 1"));
    assert!(!msg.is_empty());
}

#[test]
fn unknown_top_level_key_is_an_error_naming_it() {
    let msg = load_err(from_toml_str(&with_pools("bogus_key = 1")));
    assert!(msg.contains("bogus_key"), "{msg}");
    let msg = load_err(from_toml_str(&with_pools("[bogus_section]\nx = 1")));
    assert!(msg.contains("bogus_section"), "{msg}");
}

#[test]
fn unknown_nested_keys_are_errors_naming_them() {
    let msg = load_err(from_toml_str(&with_pools(
        "[server]\nlisten_addr = \"0.0.0.0:1\"",
    )));
    assert!(msg.contains("listen_addr"), "{msg}");
    // Keys are case-sensitive in the file: `Server` is not `server`.
    let msg = load_err(from_toml_str(&with_pools(
        "[Server]\nlisten = \"0.0.0.0:1\"",
    )));
    assert!(msg.contains("Server"), "{msg}");

    let doc = r#"
[pools.prefill]
endpoints = ["http://p:1"]
[pools.decode]
endpoints = [{ url = "http://d:1", wieght = 2.0 }]
"#;
    let msg = load_err(from_toml_str(doc));
    assert!(msg.contains("wieght"), "{msg}");

    let doc = r#"
[pools.prefill]
endpoints = ["http://p:1"]
[pools.decode.dns]
name = "d"
port = 8000
intervall_secs = 3
"#;
    let msg = load_err(from_toml_str(doc));
    assert!(msg.contains("intervall_secs"), "{msg}");

    let doc = "[pools]\nratio = \"1:1\"\n".to_owned() + POOLS;
    let msg = load_err(from_toml_str(&doc));
    assert!(msg.contains("ratio"), "{msg}");
}

#[test]
fn wrong_type_is_a_load_error_naming_the_key() {
    let msg = load_err(from_toml_str(&with_pools("[timeouts]\nidle_ms = \"soon\"")));
    assert!(msg.contains("timeouts.idle_ms"), "{msg}");
    let msg = load_err(from_toml_str(&with_pools(
        "[disaggregation]\nmode = \"sometimes\"",
    )));
    assert!(msg.contains("sometimes"), "{msg}");
    let msg = load_err(from_toml_str(&with_pools(
        "[server]\nlisten = \"localhost\"",
    )));
    assert!(msg.contains("server.listen"), "{msg}");
}

#[test]
fn missing_pool_tables_are_named() {
    let only_decode = "[pools.decode]\nendpoints = [\"http://d:1\"]\n";
    let only_prefill = "[pools.prefill]\nendpoints = [\"http://p:1\"]\n";
    for (doc, key) in [
        ("", "pools.prefill"),
        ("[server]\nlisten = \"127.0.0.1:1\"\n", "pools.prefill"),
        (only_decode, "pools.prefill"),
        (only_prefill, "pools.decode"),
    ] {
        match from_toml_str(doc) {
            Err(ConfigError::Invalid { key: k, reason }) => {
                assert_eq!(k, key, "{doc}");
                assert!(reason.contains("required"), "{reason}");
            }
            other => panic!("{doc:?}: expected Invalid, got {other:?}"),
        }
    }
}

#[test]
fn empty_prefill_table_is_allowed_when_never_disaggregating() {
    let doc = r#"
[disaggregation]
mode = "never"
[pools.prefill]
[pools.decode]
endpoints = ["http://d:1"]
"#;
    let cfg = from_toml_str(doc).unwrap();
    assert!(cfg.pools.prefill.endpoints.is_empty());
    assert_eq!(cfg.disaggregation.mode, DisaggregationMode::Never);
}

#[test]
fn env_overrides_are_typed_and_lists_split() {
    let cfg = load(
        None,
        env(&[
            ("TANDEM__SERVER__LISTEN", "0.0.0.0:9000"),
            ("TANDEM__DISAGGREGATION__MODE", "never"),
            ("TANDEM__DISAGGREGATION__ENFORCE", "true"),
            ("TANDEM__POOLS__PREFILL__ENDPOINTS", "http://p:1"),
            ("TANDEM__POOLS__DECODE__ENDPOINTS", "http://a:1,http://b:2"),
            ("TANDEM__POOLS__RATIO_TOLERANCE", "0.5"),
            ("TANDEM__POOLS__TARGET_RATIO", "3:1"),
            ("TANDEM__TIMEOUTS__PREFILL_MS", "5"),
            ("TANDEM__MODEL__SERVED_MODEL_NAME", "123"),
            // Commas outside the list keys must not split anything.
            ("TANDEM__LOGGING__LEVEL", "info,tandem_proxy=debug"),
        ]),
        &[],
    )
    .unwrap();
    assert_eq!(cfg.server.listen.to_string(), "0.0.0.0:9000");
    assert_eq!(cfg.disaggregation.mode, DisaggregationMode::Never);
    assert!(cfg.disaggregation.enforce);
    assert_eq!(cfg.pools.prefill, prefill_pool(&["http://p:1"]));
    assert_eq!(cfg.pools.decode, decode_pool(&["http://a:1", "http://b:2"]));
    assert_eq!(cfg.pools.ratio_tolerance, 0.5);
    assert_eq!(
        cfg.pools.target_ratio.map(|r| r.to_string()).as_deref(),
        Some("3:1")
    );
    assert_eq!(cfg.timeouts.prefill_ms, 5);
    // A numeric-looking name is still a name.
    assert_eq!(cfg.model.served_model_name.as_deref(), Some("123"));
    assert_eq!(cfg.logging.level, "info,tandem_proxy=debug");
}

#[test]
fn env_names_are_case_insensitive_and_unprefixed_vars_ignored() {
    let cfg = load(
        None,
        env(&[
            ("tandem__server__listen", "0.0.0.0:9001"),
            ("Tandem__Timeouts__Idle_Ms", "7"),
            ("TANDEM_SERVER__LISTEN", "garbage"),
            ("PATH", "/usr/bin"),
            ENV_POOLS[0],
            ENV_POOLS[1],
        ]),
        &[],
    )
    .unwrap();
    assert_eq!(cfg.server.listen.to_string(), "0.0.0.0:9001");
    assert_eq!(cfg.timeouts.idle_ms, 7);
}

#[test]
fn env_unknown_key_is_an_error_naming_it() {
    let msg = load_err(load(
        None,
        env(&[
            ENV_POOLS[0],
            ENV_POOLS[1],
            ("TANDEM__SERVER__LISTN", "0.0.0.0:1"),
        ]),
        &[],
    ));
    assert!(msg.contains("listn"), "{msg}");
}

#[test]
fn env_empty_value_counts_as_unset() {
    let cfg = load(
        None,
        env(&[ENV_POOLS[0], ENV_POOLS[1], ("TANDEM__MODEL__TOKENIZER", "")]),
        &[],
    )
    .unwrap();
    assert_eq!(cfg.model.tokenizer, None);
}

#[test]
fn env_list_replaces_the_file_list_and_items_are_trimmed() {
    let f = TempFile::new("env-list.toml", SMALLEST);
    let cfg = load(
        Some(&f.0),
        env(&[(
            "TANDEM__POOLS__PREFILL__ENDPOINTS",
            "http://x:1/, http://y:2",
        )]),
        &[],
    )
    .unwrap();
    assert_eq!(
        cfg.pools.prefill,
        prefill_pool(&["http://x:1", "http://y:2"])
    );
    assert_eq!(cfg.pools.decode, decode_pool(&["http://127.0.0.1:8201"]));
}

/// Pins a `config` crate behaviour that the docs warn about: with
/// `try_parsing`, an environment value that looks like a float is a float,
/// and a float given for an integer key is rounded rather than rejected.
/// If the crate ever starts rejecting it, this test should change to expect
/// an error.
#[test]
fn env_float_for_an_integer_key_is_rounded() {
    let cfg = load(
        None,
        env(&[
            ENV_POOLS[0],
            ENV_POOLS[1],
            ("TANDEM__TIMEOUTS__IDLE_MS", "1.7"),
        ]),
        &[],
    )
    .unwrap();
    assert_eq!(cfg.timeouts.idle_ms, 2);
}

#[test]
fn env_bad_number_is_an_error_naming_the_key() {
    let msg = load_err(load(
        None,
        env(&[
            ENV_POOLS[0],
            ENV_POOLS[1],
            ("TANDEM__TIMEOUTS__PREFILL_MS", "soon"),
        ]),
        &[],
    ));
    assert!(msg.contains("timeouts.prefill_ms"), "{msg}");
}

#[test]
fn cli_override_beats_env_beats_file() {
    let doc = with_pools("[server]\nlisten = \"127.0.0.1:1001\"\n[timeouts]\nidle_ms = 1");
    let f = TempFile::new("precedence.toml", &doc);
    let env_vars = env(&[
        ("TANDEM__SERVER__LISTEN", "127.0.0.1:1002"),
        ("TANDEM__TIMEOUTS__IDLE_MS", "2"),
    ]);
    let cli = overrides(&[
        ("server.listen", "127.0.0.1:1003"),
        ("timeouts.idle_ms", "3"),
    ]);

    let file_only = load(Some(&f.0), env(&[]), &[]).unwrap();
    assert_eq!(file_only.server.listen.port(), 1001);
    assert_eq!(file_only.timeouts.idle_ms, 1);

    let with_env = load(Some(&f.0), env_vars.clone(), &[]).unwrap();
    assert_eq!(with_env.server.listen.port(), 1002);
    assert_eq!(with_env.timeouts.idle_ms, 2);

    let with_cli = load(Some(&f.0), env_vars, &cli).unwrap();
    assert_eq!(with_cli.server.listen.port(), 1003);
    assert_eq!(with_cli.timeouts.idle_ms, 3);
}

#[test]
fn cli_overrides_parse_strings_into_typed_values() {
    let cli = overrides(&[
        ("pools.prefill.endpoints", "http://p:1"),
        ("pools.decode.endpoints", "http://a:1,http://b:2"),
        ("timeouts.prefill_ms", "5"),
        ("disaggregation.enforce", "true"),
        ("disaggregation.mode", "always"),
        ("pools.ratio_tolerance", "0.5"),
        ("pools.target_ratio", "2:1"),
        ("pools.decode.policy", "round-robin"),
        ("logging.format", "json"),
        ("logging.level", "debug,hyper=info"),
        ("model.tokenizer", "/m/tokenizer.json"),
    ]);
    let cfg = load(None, env(&[]), &cli).unwrap();
    assert_eq!(cfg.pools.prefill, prefill_pool(&["http://p:1"]));
    assert_eq!(
        cfg.pools.decode.endpoints,
        pool(&["http://a:1", "http://b:2"]).endpoints
    );
    assert_eq!(cfg.pools.decode.policy, Some(PolicyName::RoundRobin));
    assert_eq!(cfg.timeouts.prefill_ms, 5);
    assert!(cfg.disaggregation.enforce);
    assert_eq!(cfg.disaggregation.mode, DisaggregationMode::Always);
    assert_eq!(cfg.pools.ratio_tolerance, 0.5);
    assert_eq!(
        cfg.pools.target_ratio,
        Some(Ratio {
            prefill: 2,
            decode: 1
        })
    );
    assert_eq!(cfg.logging.format, LogFormat::Json);
    assert_eq!(cfg.logging.level, "debug,hyper=info");
    assert_eq!(
        cfg.model.tokenizer,
        Some(PathBuf::from("/m/tokenizer.json"))
    );
}

#[test]
fn cli_override_errors_name_the_key() {
    let msg = load_err(load(
        None,
        env(&ENV_POOLS),
        &overrides(&[("server.bogus", "1")]),
    ));
    assert!(msg.contains("bogus"), "{msg}");
    let msg = load_err(load(
        None,
        env(&ENV_POOLS),
        &overrides(&[("timeouts.idle_ms", "soon")]),
    ));
    assert!(msg.contains("timeouts.idle_ms"), "{msg}");
}

#[test]
fn weighted_endpoint_tables() {
    let doc = r#"
[pools.prefill]
endpoints = [
    "http://p:1",
    { url = "http://p:2", weight = 2.5 },
    { url = "http://p:3", weight = 3 },
    { url = "http://p:4" },
]
[pools.decode]
endpoints = [{ url = "http://d:1/", weight = 0.5 }]
"#;
    let cfg = from_toml_str(doc).unwrap();
    let weights: Vec<(&str, f64)> = cfg
        .pools
        .prefill
        .endpoints
        .iter()
        .map(|e| (e.url.as_str(), e.weight))
        .collect();
    assert_eq!(
        weights,
        [
            ("http://p:1", 1.0),
            ("http://p:2", 2.5),
            ("http://p:3", 3.0),
            ("http://p:4", 1.0)
        ]
    );
    // The trailing "/" is normalised away.
    assert_eq!(cfg.pools.decode.endpoints[0].url, "http://d:1");

    let msg = load_err(from_toml_str(
        "[pools.prefill]\nendpoints = [1]\n[pools.decode]\nendpoints = [\"http://d:1\"]",
    ));
    assert!(msg.contains("endpoint URL string or a table"), "{msg}");
}

#[test]
fn endpoint_spec_renders_weight_one_as_a_plain_string() {
    let plain = serde_json::to_value(Endpoint::new("http://a:1")).unwrap();
    assert_eq!(plain, serde_json::json!("http://a:1"));
    let weighted = serde_json::to_value(Endpoint {
        weight: 2.0,
        ..Endpoint::new("http://a:1")
    })
    .unwrap();
    assert_eq!(
        weighted,
        serde_json::json!({ "url": "http://a:1", "weight": 2.0 })
    );
    let back: Endpoint = serde_json::from_value(weighted).unwrap();
    assert_eq!(back.weight, 2.0);
}

#[test]
fn ratio_parses_and_renders() {
    let r: Ratio = "2:1".parse().unwrap();
    assert_eq!(
        r,
        Ratio {
            prefill: 2,
            decode: 1
        }
    );
    assert_eq!(r.value(), 2.0);
    assert_eq!(r.to_string(), "2:1");
    assert_eq!("1:4".parse::<Ratio>().unwrap().value(), 0.25);
    for bad in ["2", "0:1", "1:0", "a:b", "2:1:1", "", ":", "-1:1"] {
        assert!(bad.parse::<Ratio>().is_err(), "{bad:?} should not parse");
    }
    assert!("0:1".parse::<Ratio>().unwrap_err().contains("> 0"));

    let cfg = from_toml_str(&format!("[pools]\ntarget_ratio = \"3:2\"\n{POOLS}")).unwrap();
    assert_eq!(
        cfg.pools.target_ratio,
        Some(Ratio {
            prefill: 3,
            decode: 2
        })
    );
    assert!(render(&cfg).contains("target_ratio = \"3:2\""));

    for bad in ["\"2\"", "\"0:1\"", "2"] {
        let doc = format!("[pools]\ntarget_ratio = {bad}\n{POOLS}");
        let msg = load_err(from_toml_str(&doc));
        assert!(msg.contains("pools.target_ratio"), "{bad}: {msg}");
    }
}

#[test]
fn render_round_trips_the_smallest_file() {
    let cfg = from_toml_str(SMALLEST).unwrap();
    let text = render(&cfg);
    assert_eq!(from_toml_str(&text).unwrap(), cfg);
    // Every section is spelled out, so `config check` shows the defaults.
    for section in [
        "[server]",
        "[model]",
        "[pools.prefill]",
        "[pools.decode]",
        "[timeouts]",
        "[retries]",
        "[disaggregation]",
        "[health]",
        "[logging]",
        "[limits]",
    ] {
        assert!(text.contains(section), "{section} missing from:\n{text}");
    }
}

#[test]
fn render_round_trips_a_config_with_every_option_set() {
    let mut cfg = smallest_config();
    cfg.server.listen = "[::1]:9000".parse().unwrap();
    cfg.server.max_body_bytes = 1;
    cfg.server.max_header_bytes = 4096;
    cfg.server.header_read_timeout_ms = 300;
    cfg.limits.max_n = 2;
    cfg.limits.max_tokens = Some(4096);
    cfg.model.tokenizer = Some("/m/tokenizer.json".into());
    cfg.model.chat_template = Some("/m/template.jinja".into());
    cfg.model.served_model_name = Some("llama".into());
    cfg.model.block_size = 32;
    cfg.pools.target_ratio = Some(Ratio {
        prefill: 3,
        decode: 2,
    });
    cfg.pools.ratio_tolerance = 0.1;
    cfg.pools.prefill.endpoints[1].weight = 2.5;
    cfg.pools.prefill.policy = Some(PolicyName::Random);
    cfg.pools.prefill.endpoints[0].kv_events = Some("tcp://10.0.0.1:5557".into());
    cfg.pools.prefill.prefix_index.ttl_secs = 60;
    cfg.routing.release_ratio = 2.5;
    cfg.admission.max_queued = 7;
    cfg.admission.max_queued_per_tenant = Some(3);
    cfg.admission.batch_max_wait_ms = 60_000;
    cfg.admission.shed = false;
    cfg.pools.decode.endpoints = vec![Endpoint {
        weight: 0.5,
        ..Endpoint::new("https://[fe80::1]:8443")
    }];
    cfg.pools.decode.dns = Some(DnsConfig {
        name: "vllm-decode.ns.svc.cluster.local".into(),
        port: 8000,
        scheme: "https".into(),
        interval_secs: 10,
        weight: 2.0,
        metrics_port: Some(8001),
        group: Some("canary".into()),
    });
    cfg.pools.prefill.endpoints[1].group = Some("canary".into());
    cfg.pools.groups = [("default".to_owned(), 95), ("canary".to_owned(), 5)].into();
    cfg.pools.decode.policy = Some(PolicyName::RoundRobin);
    cfg.pools.decode.kv_events = Some(KvEventsConfig::default());
    cfg.timeouts.idle_ms = i64::MAX as u64;
    cfg.retries.decode_attempts = 1;
    cfg.disaggregation.mode = DisaggregationMode::Always;
    cfg.disaggregation.enforce = true;
    cfg.health.healthy_after = 5;
    cfg.logging = LoggingConfig {
        format: LogFormat::Json,
        level: "debug".into(),
    };
    cfg.validate().unwrap();

    let text = render(&cfg);
    assert_eq!(from_toml_str(&text).unwrap(), cfg, "rendered:\n{text}");
}

#[test]
fn error_messages_name_the_key() {
    let e = ConfigError::Invalid {
        key: "pools.decode.endpoints[1]".into(),
        reason: "must have an explicit port".into(),
    };
    assert_eq!(
        e.to_string(),
        "invalid value for `pools.decode.endpoints[1]`: must have an explicit port"
    );
}

#[test]
fn an_unknown_policy_names_the_key_and_every_choice() {
    let text = "[pools.prefill]\nendpoints = [\"http://127.0.0.1:8101\"]\npolicy = \"kv_capacity\"\n[pools.decode]\nendpoints = [\"http://127.0.0.1:8201\"]\n";
    match from_toml_str(text) {
        Err(ConfigError::Invalid { key, reason }) => {
            assert_eq!(key, "pools.prefill.policy");
            assert!(reason.contains("\"kv_capacity\""), "{reason}");
            for p in PolicyName::ALL {
                assert!(reason.contains(p.as_str()), "{reason} lacks {}", p.as_str());
            }
        }
        other => panic!("expected an invalid policy, got {other:?}"),
    }
    // Every spelling listed loads.
    for p in PolicyName::ALL {
        let text = format!(
            "[pools.prefill]\nendpoints = [\"http://127.0.0.1:8101\"]\n[pools.decode]\nendpoints = [\"http://127.0.0.1:8201\"]\npolicy = \"{}\"\n",
            p.as_str()
        );
        assert_eq!(from_toml_str(&text).unwrap().pools.decode.policy, Some(p));
    }
}
