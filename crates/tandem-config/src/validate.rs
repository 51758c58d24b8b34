//! Semantic checks that serde cannot express. Each failure names the dotted
//! key (with `[i]` for list items) so an operator can find it in the file,
//! the environment (`TANDEM__A__B`) or the command line alike.

use std::collections::HashSet;
use std::net::Ipv6Addr;

use crate::routing::PrefixFeed;
use crate::schema::{Config, DisaggregationMode, DnsConfig, LimitsBackend, PoolConfig, Protocol};
use crate::ConfigError;

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// `value > 0`, for the many settings where zero would disable the feature
/// by accident (a 0 ms timeout, a 0 s interval).
fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(())
}

fn positive_weight(key: &str, weight: f64) -> Result<(), ConfigError> {
    if !(weight.is_finite() && weight > 0.0) {
        return Err(invalid(
            key,
            format!("must be a finite number greater than 0; got {weight}"),
        ));
    }
    Ok(())
}

impl Config {
    /// Checks everything the schema alone cannot; returns the first problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_integer_range()?;

        self.validate_server()?;
        self.validate_limits()?;
        self.validate_auth()?;

        let block = self.model.block_size;
        if !(1..=1024).contains(&block) {
            return Err(invalid(
                "model.block_size",
                format!("must be between 1 and 1024 tokens; got {block}"),
            ));
        }
        let paths = [
            ("model.tokenizer", &self.model.tokenizer),
            ("model.chat_template", &self.model.chat_template),
        ];
        for (key, path) in paths {
            let Some(path) = path else { continue };
            if path.as_os_str().is_empty() {
                return Err(invalid(
                    key,
                    "must not be empty; omit the key for the built-in",
                ));
            }
            // TOML strings are UTF-8, so `render` could not print this path.
            if path.to_str().is_none() {
                return Err(invalid(key, format!("must be valid UTF-8; got {path:?}")));
            }
        }
        if self.model.served_model_name.as_deref() == Some("") {
            return Err(invalid(
                "model.served_model_name",
                "must not be empty; omit the key to take it from the engines",
            ));
        }

        let never = self.disaggregation.mode == DisaggregationMode::Never;
        validate_pool("pools.prefill", &self.pools.prefill, !never)?;
        validate_pool("pools.decode", &self.pools.decode, true)?;
        self.validate_groups()?;
        let tol = self.pools.ratio_tolerance;
        if !(tol > 0.0 && tol <= 10.0) {
            return Err(invalid(
                "pools.ratio_tolerance",
                format!("must be greater than 0 and at most 10; got {tol}"),
            ));
        }

        let t = &self.timeouts;
        positive("timeouts.connect_ms", t.connect_ms)?;
        positive("timeouts.prefill_ms", t.prefill_ms)?;
        positive("timeouts.handoff_ms", t.handoff_ms)?;
        positive("timeouts.first_token_ms", t.first_token_ms)?;
        positive("timeouts.idle_ms", t.idle_ms)?;
        positive("timeouts.prefill_lease_ms", t.prefill_lease_ms)?;
        positive("timeouts.per_token_ms", t.per_token_ms)?;
        positive("timeouts.release_ms", t.release_ms)?;

        // Attempts count the first try, so 0 would mean "never send it".
        let attempts = [
            ("retries.prefill_attempts", self.retries.prefill_attempts),
            ("retries.decode_attempts", self.retries.decode_attempts),
        ];
        for (key, n) in attempts {
            if n < 1 {
                return Err(invalid(
                    key,
                    "must be at least 1 (it counts the first attempt)",
                ));
            }
        }

        let h = &self.health;
        positive("health.interval_ms", h.interval_ms)?;
        positive("health.timeout_ms", h.timeout_ms)?;
        positive("health.scrape_interval_ms", h.scrape_interval_ms)?;
        positive("health.unhealthy_after", u64::from(h.unhealthy_after))?;
        positive("health.healthy_after", u64::from(h.healthy_after))?;
        self.outlier.validate()?;
        self.tls.validate()?;

        let r = &self.routing;
        if !(r.release_ratio >= 1.0 && r.release_ratio.is_finite()) {
            return Err(invalid(
                "routing.release_ratio",
                format!("must be a finite number >= 1; got {}", r.release_ratio),
            ));
        }
        if !(r.cache_weight > 0.0 && r.cache_weight.is_finite()) {
            return Err(invalid(
                "routing.cache_weight",
                format!("must be a finite number > 0; got {}", r.cache_weight),
            ));
        }
        positive("routing.expected_output_tokens", r.expected_output_tokens)?;
        let a = &self.admission;
        positive("admission.max_wait_ms", a.max_wait_ms)?;
        positive(
            "admission.interactive_max_wait_ms",
            a.interactive_max_wait_ms,
        )?;
        positive("admission.batch_max_wait_ms", a.batch_max_wait_ms)?;
        if let Some(n) = a.max_queued_per_tenant {
            positive("admission.max_queued_per_tenant", u64::from(n))?;
        }

        if self.logging.level.trim().is_empty() {
            return Err(invalid("logging.level", "must not be empty, e.g. \"info\""));
        }
        let t = &self.telemetry;
        if let Some(e) = &t.otlp_endpoint {
            if !(e.starts_with("http://") || e.starts_with("https://"))
                || e.len() <= "https://".len()
            {
                return Err(invalid(
                    "telemetry.otlp_endpoint",
                    format!("must be an http(s) URL such as http://otel-collector:4318/v1/traces; got {e:?}"),
                ));
            }
        }
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(invalid(
                "telemetry.sample_ratio",
                format!("must be between 0 and 1; got {}", t.sample_ratio),
            ));
        }
        if t.service_name.trim().is_empty() {
            return Err(invalid("telemetry.service_name", "must not be empty"));
        }
        Ok(())
    }

    /// Group names (they become metric labels), and a split over groups both pools can serve.
    fn validate_groups(&self) -> Result<(), ConfigError> {
        for (prefix, pool) in [
            ("pools.prefill", &self.pools.prefill),
            ("pools.decode", &self.pools.decode),
        ] {
            for (i, ep) in pool.endpoints.iter().enumerate() {
                if let Some(g) = &ep.group {
                    check_group(g)
                        .map_err(|r| invalid(format!("{prefix}.endpoints[{i}].group"), r))?;
                }
            }
            if let Some(g) = pool.dns.as_ref().and_then(|d| d.group.as_ref()) {
                check_group(g).map_err(|r| invalid(format!("{prefix}.dns.group"), r))?;
            }
        }
        let never = self.disaggregation.mode == DisaggregationMode::Never;
        let mut total = 0u64;
        for (g, &w) in &self.pools.groups {
            let key = format!("pools.groups.{g}");
            check_group(g).map_err(|r| invalid(&key, r))?;
            if w > MAX_GROUP_WEIGHT {
                return Err(invalid(key, format!("must be at most {MAX_GROUP_WEIGHT}")));
            }
            total += u64::from(w);
            let served = |pool: &PoolConfig| pool.groups().any(|pg| pg == g);
            let missing = if !served(&self.pools.decode) {
                Some("pools.decode")
            } else if !never && !served(&self.pools.prefill) {
                Some("pools.prefill")
            } else {
                None
            };
            if let (true, Some(pool)) = (w > 0, missing) {
                return Err(invalid(
                    key,
                    format!(
                        "no endpoint or `dns` table of {pool} is in group `{g}`: a weighted \
                         group needs engines in both pools"
                    ),
                ));
            }
        }
        if !self.pools.groups.is_empty() && total == 0 {
            return Err(invalid(
                "pools.groups",
                "at least one group needs a weight greater than 0",
            ));
        }
        if self.pools.group_names().len() > MAX_GROUPS {
            return Err(invalid(
                "pools.groups",
                format!("at most {MAX_GROUPS} engine groups (they are metric labels)"),
            ));
        }
        Ok(())
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        positive("server.max_body_bytes", s.max_body_bytes as u64)?;
        positive("server.header_read_timeout_ms", s.header_read_timeout_ms)?;
        positive("server.body_read_timeout_ms", s.body_read_timeout_ms)?;
        positive("server.max_connections", s.max_connections as u64)?;
        // The HTTP parser's own limit is twice this (see `tandem-proxy`'s front door); below
        // 1 KiB ordinary clients' headers would not fit.
        const MAX_HEADER_BYTES: usize = 16 * 1024 * 1024;
        if !(1024..=MAX_HEADER_BYTES).contains(&s.max_header_bytes) {
            return Err(invalid(
                "server.max_header_bytes",
                format!(
                    "must be between 1024 and {MAX_HEADER_BYTES} bytes; got {}",
                    s.max_header_bytes
                ),
            ));
        }
        if !(1..=10_000).contains(&s.max_headers) {
            return Err(invalid(
                "server.max_headers",
                format!("must be between 1 and 10000; got {}", s.max_headers),
            ));
        }
        if let Some(a) = s.admin_listen {
            if a == s.listen && a.port() != 0 {
                return Err(invalid(
                    "server.admin_listen",
                    "must differ from server.listen (unset it to serve /metrics and /admin on listen)",
                ));
            }
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if let Some(path) = &a.keys_file {
            if path.as_os_str().is_empty() {
                return Err(invalid(
                    "auth.keys_file",
                    "must not be empty; omit the key to turn authentication off",
                ));
            }
            if path.to_str().is_none() {
                return Err(invalid("auth.keys_file", "must be valid UTF-8"));
            }
        }
        if let Some(var) = &a.keys_env {
            if var.is_empty() || var.contains('=') || var.contains('\0') {
                return Err(invalid(
                    "auth.keys_env",
                    "must be an environment variable name",
                ));
            }
        }
        positive("auth.reload_interval_ms", a.reload_interval_ms)
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        positive("limits.max_n", u64::from(l.max_n))?;
        if l.max_best_of < l.max_n {
            return Err(invalid(
                "limits.max_best_of",
                format!(
                    "must be at least limits.max_n ({}), since best_of defaults to n; got {}",
                    l.max_n, l.max_best_of
                ),
            ));
        }
        if l.max_tokens == Some(0) {
            return Err(invalid(
                "limits.max_tokens",
                "must be greater than 0; omit the key for no cap",
            ));
        }
        positive("limits.redis_timeout_ms", l.redis_timeout_ms)?;
        positive("limits.redis_retry_ms", l.redis_retry_ms)?;
        let prefix = &l.redis_key_prefix;
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':'))
        {
            return Err(invalid(
                "limits.redis_key_prefix",
                format!("must be non-empty A-Z, a-z, 0-9, '.', '_', '-', ':'; got {prefix:?}"),
            ));
        }
        match (&l.backend, &l.redis_url) {
            (LimitsBackend::Redis, None) => Err(invalid(
                "limits.redis_url",
                "backend = \"redis\" needs redis_url, e.g. \"redis://redis:6379\"",
            )),
            (_, Some(url)) => {
                let ok = ["redis://", "unix://", "redis+unix://"]
                    .iter()
                    .any(|s| url.len() > s.len() && url.starts_with(s));
                if ok {
                    Ok(())
                } else {
                    // Without the URL itself: it may carry a password.
                    Err(invalid(
                        "limits.redis_url",
                        "must start with redis://, unix:// or redis+unix:// (TLS, rediss://, is not supported)",
                    ))
                }
            }
            (LimitsBackend::Local, None) => Ok(()),
        }
    }

    /// TOML integers are signed 64-bit, so a larger value (reachable only
    /// through a command-line override or code) could not be rendered by
    /// `render()`; reject it here rather than let `config check` fail later.
    fn validate_integer_range(&self) -> Result<(), ConfigError> {
        let t = &self.timeouts;
        let values = [
            ("server.max_body_bytes", self.server.max_body_bytes as u64),
            (
                "server.shutdown_grace_secs",
                self.server.shutdown_grace_secs,
            ),
            ("server.recent_requests", self.server.recent_requests as u64),
            (
                "server.max_header_bytes",
                self.server.max_header_bytes as u64,
            ),
            ("server.max_headers", self.server.max_headers as u64),
            (
                "server.header_read_timeout_ms",
                self.server.header_read_timeout_ms,
            ),
            (
                "server.body_read_timeout_ms",
                self.server.body_read_timeout_ms,
            ),
            ("server.max_connections", self.server.max_connections as u64),
            ("limits.max_tokens", self.limits.max_tokens.unwrap_or(0)),
            ("limits.redis_timeout_ms", self.limits.redis_timeout_ms),
            ("limits.redis_retry_ms", self.limits.redis_retry_ms),
            ("auth.reload_interval_ms", self.auth.reload_interval_ms),
            ("timeouts.connect_ms", t.connect_ms),
            ("timeouts.prefill_ms", t.prefill_ms),
            ("timeouts.handoff_ms", t.handoff_ms),
            ("timeouts.first_token_ms", t.first_token_ms),
            ("timeouts.idle_ms", t.idle_ms),
            ("timeouts.prefill_lease_ms", t.prefill_lease_ms),
            ("timeouts.per_token_ms", t.per_token_ms),
            ("timeouts.release_ms", t.release_ms),
            (
                "disaggregation.local_when_prefill_queue_tokens",
                self.disaggregation.local_when_prefill_queue_tokens,
            ),
            ("health.interval_ms", self.health.interval_ms),
            ("health.timeout_ms", self.health.timeout_ms),
            ("health.scrape_interval_ms", self.health.scrape_interval_ms),
            (
                "routing.request_cost_tokens",
                self.routing.request_cost_tokens,
            ),
            (
                "routing.release_slack_tokens",
                self.routing.release_slack_tokens,
            ),
            (
                "routing.expected_output_tokens",
                self.routing.expected_output_tokens,
            ),
            ("admission.max_wait_ms", self.admission.max_wait_ms),
            (
                "admission.interactive_max_wait_ms",
                self.admission.interactive_max_wait_ms,
            ),
            (
                "admission.batch_max_wait_ms",
                self.admission.batch_max_wait_ms,
            ),
            (
                "admission.max_prefill_queue_tokens",
                self.admission.max_prefill_queue_tokens,
            ),
            (
                "admission.retry_after_secs",
                self.admission.retry_after_secs,
            ),
            (
                "pools.prefill.prefix_index.max_blocks",
                self.pools.prefill.prefix_index.max_blocks,
            ),
            (
                "pools.prefill.prefix_index.ttl_secs",
                self.pools.prefill.prefix_index.ttl_secs,
            ),
            (
                "pools.decode.prefix_index.max_blocks",
                self.pools.decode.prefix_index.max_blocks,
            ),
            (
                "pools.decode.prefix_index.ttl_secs",
                self.pools.decode.prefix_index.ttl_secs,
            ),
        ];
        let dns = [
            ("prefill", &self.pools.prefill),
            ("decode", &self.pools.decode),
        ]
        .into_iter()
        .filter_map(|(name, p)| {
            let d = p.dns.as_ref()?;
            Some((format!("pools.{name}.dns.interval_secs"), d.interval_secs))
        });
        let all = values
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .chain(dns);
        for (key, value) in all {
            if value > i64::MAX as u64 {
                return Err(invalid(key, format!("must be at most {}", i64::MAX)));
            }
        }
        Ok(())
    }
}

fn validate_pool(prefix: &str, pool: &PoolConfig, required: bool) -> Result<(), ConfigError> {
    positive(
        &format!("{prefix}.prefix_index.max_blocks"),
        pool.prefix_index.max_blocks,
    )?;
    positive(
        &format!("{prefix}.prefix_index.ttl_secs"),
        pool.prefix_index.ttl_secs,
    )?;
    if pool.prefix_index.feed == PrefixFeed::Precise
        && pool.kv_events.is_none()
        && pool.endpoints.iter().any(|e| e.kv_events.is_none())
    {
        return Err(invalid(
            format!("{prefix}.prefix_index.feed"),
            "\"precise\" needs the engines' KV-event endpoints: a `kv_events` table for the pool \
             (port, replay_port, topic) or `kv_events = \"tcp://host:port\"` on every endpoint",
        ));
    }
    if let Some(k) = &pool.kv_events {
        positive(&format!("{prefix}.kv_events.port"), u64::from(k.port))?;
    }
    if required && pool.endpoints.is_empty() && pool.dns.is_none() {
        let why = if prefix == "pools.prefill" {
            " (only disaggregation.mode = \"never\" may leave the prefill pool empty)"
        } else {
            ""
        };
        return Err(invalid(
            format!("{prefix}.endpoints"),
            format!("the pool needs at least one endpoint or a `dns` table{why}"),
        ));
    }
    // Compared case-insensitively: with no path left, the whole URL is
    // scheme, host and port, none of which are case-sensitive.
    let mut seen = HashSet::new();
    for (i, ep) in pool.endpoints.iter().enumerate() {
        let key = format!("{prefix}.endpoints[{i}]");
        check_url(&ep.url).map_err(|reason| invalid(&key, reason))?;
        positive_weight(&format!("{key}.weight"), ep.weight)?;
        if let Some(m) = &ep.metrics {
            if pool.protocol != Protocol::Grpc {
                return Err(invalid(
                    format!("{key}.metrics"),
                    "only a gRPC engine has a separate metrics URL (an HTTP engine serves /metrics at its url)",
                ));
            }
            check_url(m).map_err(|reason| invalid(format!("{key}.metrics"), reason))?;
        }
        for (k, v) in [
            ("kv_events", &ep.kv_events),
            ("kv_events_replay", &ep.kv_events_replay),
        ] {
            if let Some(v) = v {
                check_zmq(v).map_err(|reason| invalid(format!("{key}.{k}"), reason))?;
            }
        }
        let norm = normalize_url(&ep.url).to_ascii_lowercase();
        if !seen.insert(norm) {
            return Err(invalid(
                key,
                format!("duplicate endpoint {:?} in this pool", ep.url),
            ));
        }
    }
    if let Some(dns) = &pool.dns {
        validate_dns(&format!("{prefix}.dns"), dns)?;
    }
    Ok(())
}

fn validate_dns(prefix: &str, dns: &DnsConfig) -> Result<(), ConfigError> {
    if dns.name.is_empty() {
        return Err(invalid(format!("{prefix}.name"), "must not be empty"));
    }
    if !dns.name.chars().all(is_host_char) {
        return Err(invalid(
            format!("{prefix}.name"),
            format!(
                "must be a bare DNS name such as \"vllm-prefill.ns.svc.cluster.local\" \
                 (no scheme, port or path); got {:?}",
                dns.name
            ),
        ));
    }
    if dns.port == 0 {
        return Err(invalid(format!("{prefix}.port"), "must be greater than 0"));
    }
    if dns.scheme != "http" && dns.scheme != "https" {
        return Err(invalid(
            format!("{prefix}.scheme"),
            format!("must be \"http\" or \"https\"; got {:?}", dns.scheme),
        ));
    }
    positive(&format!("{prefix}.interval_secs"), dns.interval_secs)?;
    positive_weight(&format!("{prefix}.weight"), dns.weight)
}

fn is_host_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')
}

/// The canonical spelling of an endpoint URL: without the optional trailing
/// "/", so `http://a:1` and `http://a:1/` are the same engine.
pub(crate) fn normalize_url(url: &str) -> &str {
    url.strip_suffix('/').unwrap_or(url)
}

/// Accepts exactly `http[s]://HOST:PORT[/]`. Hand-written because the shape
/// is this narrow; a general URL parser would accept (and we would have to
/// reject again) user info, paths, queries and fragments.
pub(crate) fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("must start with \"http://\" or \"https://\"; got {url:?}"))?;
    let authority = normalize_url(rest);
    if let Some(c) = authority.chars().find(|c| matches!(c, '/' | '?' | '#')) {
        return Err(format!(
            "must be just scheme, host and port (no path, query or fragment, found {c:?}); \
             got {url:?}"
        ));
    }
    if authority.contains('@') {
        return Err(format!("must not contain user info; got {url:?}"));
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let (v6, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("has an unterminated IPv6 address; got {url:?}"))?;
        if v6.parse::<Ipv6Addr>().is_err() {
            return Err(format!("has an invalid IPv6 address {v6:?}; got {url:?}"));
        }
        if !after.is_empty() && !after.starts_with(':') {
            return Err(format!(
                "has unexpected text {after:?} after the IPv6 address; got {url:?}"
            ));
        }
        (v6, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(format!("must have a host; got {url:?}"));
    }
    // Bracketed IPv6 hosts were parsed above; anything else must be a name or
    // an IPv4 address, which rules out a stray ':' or spaces.
    if !authority.starts_with('[') && !host.chars().all(is_host_char) {
        return Err(format!("has an invalid host {host:?}; got {url:?}"));
    }
    let port = port.ok_or_else(|| {
        format!(
            "must have an explicit port, e.g. \"{}:8000\"",
            normalize_url(url)
        )
    })?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok(()),
        _ => Err(format!(
            "has an invalid port {port:?} (1-65535); got {url:?}"
        )),
    }
}

/// A ZMQ TCP endpoint Tandem can connect to: `tcp://host:port` with a port.
fn check_zmq(s: &str) -> Result<(), String> {
    let rest = s
        .strip_prefix("tcp://")
        .ok_or_else(|| format!("expected tcp://host:port; got {s:?}"))?;
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
            Ok(())
        }
        _ => Err(format!("expected tcp://host:port with a port; got {s:?}")),
    }
}

/// The most engine groups a configuration may name, `default` included.
pub const MAX_GROUPS: usize = 16;
/// The largest weight of one group in `pools.groups`.
pub const MAX_GROUP_WEIGHT: u32 = 10_000;

/// A name that becomes a metric label (and a header value or Redis key): 1 to `max` characters
/// of a plain alphabet.
pub(crate) fn check_label(name: &str, max: usize) -> Result<(), String> {
    let ok = (1..=max).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "must be 1 to {max} characters of A-Z, a-z, 0-9, '.', '_', '-'; got {name:?}"
        ))
    }
}

/// Group names become metric labels and a header's value.
pub(crate) fn check_group(name: &str) -> Result<(), String> {
    check_label(name, 32)
}
