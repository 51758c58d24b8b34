//! How Tandem treats its engines beyond routing: outlier ejection and slow start (`[outlier]`)
//! and TLS to `https://` engines (`[tls]`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// Passive outlier detection, as Envoy does it: request legs report each outcome, and an engine
/// whose legs fail `consecutive_failures` times in a row is taken out of rotation for
/// `base_ejection_ms × (its ejections so far)`, at most `max_ejection_ms`; it returns once that
/// time has passed and a health probe succeeds, then ramps its weight up over `slow_start_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierConfig {
    /// Failed legs in a row (5xx, timeouts, broken connections; for a prefill engine also failed
    /// KV transfers, counted on their own) that eject an engine; 0 = never eject.
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th in a row lasts n times this (the count falls by
    /// one for every `base_ejection_ms` the engine then stays in rotation).
    pub base_ejection_ms: u64,
    /// The longest one ejection lasts.
    pub max_ejection_ms: u64,
    /// Most engines of a pool out at once, as a percentage of the pool (rounded down); the last
    /// routable engine of a pool is never ejected whatever this says.
    pub max_ejection_percent: u32,
    /// An engine that comes back (from an ejection or from failing probes) or is discovered
    /// after start-up ramps its weight linearly from `slow_start_min_percent` of its configured
    /// weight to all of it over this many milliseconds; 0 = no slow start.
    pub slow_start_ms: u64,
    /// The weight a slow start begins at, as a percentage of the configured weight (1..=100).
    pub slow_start_min_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            max_ejection_percent: 50,
            slow_start_ms: 30_000,
            slow_start_min_percent: 10,
        }
    }
}

impl OutlierConfig {
    /// Whether engines are ever ejected.
    pub fn ejects(&self) -> bool {
        self.consecutive_failures > 0
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid {
            key: format!("outlier.{key}"),
            reason,
        };
        for (key, v) in [
            ("base_ejection_ms", self.base_ejection_ms),
            ("max_ejection_ms", self.max_ejection_ms),
            ("slow_start_ms", self.slow_start_ms),
        ] {
            // TOML integers are signed 64-bit (see `render`).
            if v > i64::MAX as u64 {
                return Err(invalid(key, format!("must be at most {}", i64::MAX)));
            }
        }
        if self.base_ejection_ms == 0 {
            return Err(invalid(
                "base_ejection_ms",
                "must be greater than 0 (set consecutive_failures = 0 to turn ejection off)".into(),
            ));
        }
        if self.max_ejection_ms < self.base_ejection_ms {
            return Err(invalid(
                "max_ejection_ms",
                format!(
                    "must be at least base_ejection_ms ({}); got {}",
                    self.base_ejection_ms, self.max_ejection_ms
                ),
            ));
        }
        if self.max_ejection_percent > 100 {
            return Err(invalid(
                "max_ejection_percent",
                format!(
                    "must be between 0 and 100; got {}",
                    self.max_ejection_percent
                ),
            ));
        }
        if !(1..=100).contains(&self.slow_start_min_percent) {
            return Err(invalid(
                "slow_start_min_percent",
                format!(
                    "must be between 1 and 100; got {}",
                    self.slow_start_min_percent
                ),
            ));
        }
        Ok(())
    }
}

/// TLS to engines whose URL is `https://` (HTTP and gRPC alike; SNI and verification use the
/// URL's host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// A PEM bundle of CA certificates trusted for engines, besides the system's (e.g. a
    /// cluster's private CA from a mounted Secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Trust the operating system's certificate store too.
    pub system_roots: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            ca_file: None,
            system_roots: true,
        }
    }
}

impl TlsConfig {
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |reason: &str| ConfigError::Invalid {
            key: "tls.ca_file".into(),
            reason: reason.into(),
        };
        if let Some(path) = &self.ca_file {
            if path.as_os_str().is_empty() {
                return Err(invalid("must not be empty; omit the key for none"));
            }
            if path.to_str().is_none() {
                return Err(invalid("must be valid UTF-8"));
            }
        } else if !self.system_roots {
            return Err(ConfigError::Invalid {
                key: "tls.system_roots".into(),
                reason: "false needs tls.ca_file, or no https:// engine could be trusted".into(),
            });
        }
        Ok(())
    }
}
