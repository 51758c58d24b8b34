//! Tandem's single configuration file.
//!
//! Sources, lowest precedence first:
//! 1. the TOML file (optional; without it every key comes from the layers
//!    below or its default),
//! 2. environment variables `TANDEM__SECTION__KEY` (prefix `TANDEM`, `__`
//!    between path segments, names case-insensitive; empty values count as
//!    unset). Values that look like booleans or numbers are parsed as such
//!    (so, by the `config` crate's rules, `1.7` for an integer key becomes
//!    2), and the two `pools.*.endpoints` keys take a comma-separated list,
//! 3. explicit command-line overrides, `("dotted.key", "value")` pairs; the
//!    two `endpoints` keys are split on commas here too.
//!
//! Unknown keys are errors in every layer, so a typo never silently falls
//! back to a default. After deserialising, endpoint URLs are normalised and
//! [`Config::validate`] runs; [`render`] prints the effective result.
//!
//! `tandem.example.toml` next to this crate lists every key with its default.

mod engines;
pub mod keys;
mod routing;
mod schema;
mod validate;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;

use config::builder::DefaultState;
use config::{ConfigBuilder, Environment, File, FileFormat};

pub use engines::{OutlierConfig, TlsConfig};
pub use keys::{parse_keys, KeyFile, KeyFileError, Priority, Tenant, TenantLimits};
pub use routing::{
    AdmissionConfig, KvEventsConfig, PolicyName, PrefixFeed, PrefixIndexConfig, RoutingConfig,
};
pub use schema::{
    AuthConfig, Config, DisaggregationConfig, DisaggregationMode, DnsConfig, Endpoint,
    EndpointSpec, HealthConfig, LimitsBackend, LimitsConfig, LogFormat, LoggingConfig, ModelConfig,
    OtlpProtocol, PoolConfig, PoolsConfig, Protocol, Ratio, RetryConfig, ServerConfig,
    TelemetryConfig, TimeoutsConfig, DEFAULT_GROUP,
};
pub use validate::{MAX_GROUPS, MAX_GROUP_WEIGHT};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, a value had the wrong type, or
    /// a key is unknown or missing. The message is the `config` crate's,
    /// which names the key and its source.
    #[error("{0}")]
    Load(String),
    /// The configuration parsed but a value is not acceptable.
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl From<config::ConfigError> for ConfigError {
    fn from(e: config::ConfigError) -> Self {
        ConfigError::Load(e.to_string())
    }
}

const ENV_PREFIX: &str = "TANDEM";
const ENV_SEPARATOR: &str = "__";
const LIST_SEPARATOR: &str = ",";

/// Keys whose environment / override values are comma-separated lists.
/// Listed explicitly so that no other value containing a comma (a logging
/// filter such as `info,tandem_proxy=debug`) is ever split.
const LIST_KEYS: [&str; 2] = ["pools.prefill.endpoints", "pools.decode.endpoints"];

/// Loads, normalises and validates the configuration.
///
/// `env`: `None` reads the process environment; `Some(map)` uses only that
/// map (tests, or callers that captured the environment themselves).
pub fn load(
    file: Option<&Path>,
    env: Option<HashMap<String, String>>,
    overrides: &[(String, String)],
) -> Result<Config, ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = file {
        // The format is fixed rather than guessed from the extension so
        // that any file name works (e.g. a mounted `tandem.conf`).
        builder = builder.add_source(File::from(path).format(FileFormat::Toml).required(true));
    }
    builder = builder.add_source(environment(env));
    for (key, value) in overrides {
        builder = if LIST_KEYS.contains(&key.as_str()) {
            let items: Vec<String> = value.split(LIST_SEPARATOR).map(str::to_owned).collect();
            builder.set_override(key.as_str(), items)?
        } else {
            builder.set_override(key.as_str(), value.as_str())?
        };
    }
    finish(builder)
}

/// Parses and validates a TOML document alone: no environment, no overrides.
pub fn from_toml_str(s: &str) -> Result<Config, ConfigError> {
    let builder = config::Config::builder().add_source(File::from_str(s, FileFormat::Toml));
    finish(builder)
}

/// The effective configuration as TOML; `from_toml_str(&render(c))` gives
/// back an equal `Config` for any `c` that passed [`Config::validate`].
///
/// Keys whose value is unset (`None`) are omitted, since TOML has no null.
///
/// # Panics
///
/// If `cfg` holds a value TOML cannot represent (an integer above
/// `i64::MAX`, a non-UTF-8 path); `validate()` rejects both.
pub fn render(cfg: &Config) -> String {
    toml::to_string(cfg).expect("a validated configuration is always representable as TOML")
}

fn environment(env: Option<HashMap<String, String>>) -> Environment {
    // `try_parsing` is needed for the list splitting below to happen at all
    // (the `config` crate only splits when it parses), and makes numbers and
    // booleans typed. `with_list_parse_key` restricts the splitting to the
    // endpoint lists; the keys are matched after lowercasing and `__` -> `.`.
    let mut source = Environment::with_prefix(ENV_PREFIX)
        .separator(ENV_SEPARATOR)
        .try_parsing(true)
        .list_separator(LIST_SEPARATOR)
        .ignore_empty(true);
    for key in LIST_KEYS {
        source = source.with_list_parse_key(key);
    }
    // `config::Map` is a HashMap or an IndexMap depending on the crate's
    // features; collecting works for either.
    source.source(env.map(|m| m.into_iter().collect()))
}

fn finish(builder: ConfigBuilder<DefaultState>) -> Result<Config, ConfigError> {
    let raw = builder.build()?;
    require_pools(&raw)?;
    known_policies(&raw)?;
    let mut cfg: Config = raw.try_deserialize()?;
    normalize(&mut cfg);
    cfg.validate()?;
    Ok(cfg)
}

/// Serde names an unknown policy as "enum PolicyName does not have variant constructor …",
/// which names neither the choices nor the spelling they take; say both.
fn known_policies(raw: &config::Config) -> Result<(), ConfigError> {
    for key in ["pools.prefill.policy", "pools.decode.policy"] {
        let Ok(value) = raw.get::<String>(key) else {
            continue;
        };
        if !PolicyName::ALL.iter().any(|p| p.as_str() == value) {
            let choices: Vec<&str> = PolicyName::ALL.iter().map(|p| p.as_str()).collect();
            return Err(ConfigError::Invalid {
                key: key.to_owned(),
                reason: format!("unknown policy \"{value}\"; one of: {}", choices.join(", ")),
            });
        }
    }
    Ok(())
}

/// Serde would report a missing pool as "missing field `prefill`" without
/// saying where; name the table instead, since it is the one thing an
/// operator must always write.
fn require_pools(raw: &config::Config) -> Result<(), ConfigError> {
    for key in ["pools.prefill", "pools.decode"] {
        match raw.get::<config::Value>(key) {
            Ok(_) => {}
            Err(config::ConfigError::NotFound(_)) => {
                return Err(ConfigError::Invalid {
                    key: key.to_owned(),
                    reason: format!(
                        "the [{key}] table is required (it may be empty for the prefill pool \
                         when disaggregation.mode = \"never\")"
                    ),
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Canonical endpoint spelling, so that rendered output is stable:
/// surrounding whitespace (from `a, b` lists) and the optional trailing "/"
/// are dropped. Invalid URLs are left exactly as written so that the
/// validation error quotes what the operator typed.
fn normalize(cfg: &mut Config) {
    cfg.pools
        .prefill
        .policy
        .get_or_insert(PolicyName::default_prefill());
    cfg.pools
        .decode
        .policy
        .get_or_insert(PolicyName::default_decode());
    for pool in [&mut cfg.pools.prefill, &mut cfg.pools.decode] {
        for ep in &mut pool.endpoints {
            let trimmed = ep.url.trim();
            if validate::check_url(trimmed).is_ok() {
                ep.url = validate::normalize_url(trimmed).to_owned();
            }
        }
    }
}
