//! The API key file (`[auth] keys_file`, or the variable `[auth] keys_env` names): tenants and
//! the keys that authenticate as them.
//!
//! ```toml
//! [[tenants]]
//! name = "team-a"                 # [A-Za-z0-9._-], at most 64 characters; a metric label
//! priority = "interactive"        # "interactive" | "default" | "batch"
//! weight = 2                      # share of its class's admissions when tenants wait; 1..=1000
//! requests_per_minute = 60        # each limit optional: unset = unlimited
//! tokens_per_minute = 200000      # prompt + output tokens
//! max_concurrent_requests = 8
//!
//! [[keys]]
//! key_sha256 = "5e884898da28…"    # hex SHA-256 of the key (keeps the key itself out of the file)
//! tenant = "team-a"
//!
//! [[keys]]
//! key = "sk-team-a-2"             # or the key itself; hashed as soon as it is read
//! tenant = "team-a"
//! ```
//!
//! Several keys may name one tenant (a rotation: add the new key, move clients, remove the old
//! one), and they share its budgets. Nothing here ever puts a key, or a string from the file that
//! might be one, into an error message: errors name the item (`keys[2]`) and the field.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A tenant's admission class: waiters of a higher class are admitted first, and a full
/// admission queue sheds the lowest class first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Priority {
    Interactive,
    #[default]
    Default,
    Batch,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Default => "default",
            Priority::Batch => "batch",
        }
    }
}

/// A tenant's budgets; `None` = unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Prompt tokens (taken at admission) plus output tokens (taken as they stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Requests of this tenant in flight at once, streams included (per Tandem process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
}

impl TenantLimits {
    pub fn unlimited(&self) -> bool {
        *self == TenantLimits::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    pub priority: Priority,
    /// Its share of its class's admissions while tenants of the class wait (default 1).
    pub weight: u32,
    pub limits: TenantLimits,
    /// The engine group (`pools.groups`, an endpoint's `group`) its requests are pinned to,
    /// unless one names another with `x-tandem-group`; a group the configuration does not know
    /// is ignored (the split decides).
    pub group: Option<String>,
}

/// A key as the file gives it. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySecret {
    Plain(String),
    Sha256([u8; 32]),
}

impl fmt::Debug for KeySecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySecret::Plain(_) => f.write_str("Plain(<redacted>)"),
            KeySecret::Sha256(_) => f.write_str("Sha256(<redacted>)"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    pub secret: KeySecret,
    /// Index into [`KeyFile::tenants`].
    pub tenant: usize,
}

/// A parsed and checked key document.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyFile {
    pub tenants: Vec<Tenant>,
    pub keys: Vec<KeyEntry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyFileError {
    /// Not TOML, or not this shape. The message has every quoted string taken out, since a
    /// misplaced key would otherwise be quoted back.
    #[error("not a valid key file{}: {message}", .line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Syntax {
        line: Option<usize>,
        message: String,
    },
    #[error("`{item}`: {reason}")]
    Invalid { item: String, reason: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Doc {
    #[serde(default)]
    tenants: Vec<TenantDoc>,
    #[serde(default)]
    keys: Vec<KeyDoc>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantDoc {
    name: String,
    #[serde(default)]
    priority: Priority,
    weight: Option<u32>,
    // Spelled out: serde cannot deny unknown fields through `flatten`.
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
    max_concurrent_requests: Option<u32>,
    group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyDoc {
    key: Option<String>,
    key_sha256: Option<String>,
    tenant: String,
}

/// The largest tenant weight: a wider range would let one tenant's share round the others'
/// to nothing.
pub const MAX_WEIGHT: u32 = 1000;

/// Parse and check a key document.
pub fn parse_keys(text: &str) -> Result<KeyFile, KeyFileError> {
    let doc: Doc = toml::from_str(text).map_err(|e| KeyFileError::Syntax {
        line: e
            .span()
            .map(|s| text[..s.start.min(text.len())].lines().count().max(1)),
        message: redact(e.message()),
    })?;
    let mut tenants: Vec<Tenant> = Vec::with_capacity(doc.tenants.len());
    for (i, t) in doc.tenants.into_iter().enumerate() {
        let item = format!("tenants[{i}]");
        check_name(&t.name).map_err(|reason| invalid(format!("{item}.name"), reason))?;
        if tenants.iter().any(|o| o.name == t.name) {
            return Err(invalid(
                format!("{item}.name"),
                format!("tenant `{}` is declared twice", t.name),
            ));
        }
        let l = TenantLimits {
            requests_per_minute: t.requests_per_minute,
            tokens_per_minute: t.tokens_per_minute,
            max_concurrent_requests: t.max_concurrent_requests,
        };
        for (field, v) in [
            ("requests_per_minute", l.requests_per_minute),
            ("tokens_per_minute", l.tokens_per_minute),
            (
                "max_concurrent_requests",
                l.max_concurrent_requests.map(u64::from),
            ),
        ] {
            match v {
                Some(0) => {
                    return Err(invalid(
                        format!("{item}.{field}"),
                        "must be greater than 0; omit it for no limit (remove a tenant's keys to shut it out)",
                    ))
                }
                // Redis scripts compute in doubles: keep every budget exact there.
                Some(n) if n > 1 << 50 => {
                    return Err(invalid(format!("{item}.{field}"), "must be at most 2^50"))
                }
                _ => {}
            }
        }
        let weight = t.weight.unwrap_or(1);
        if !(1..=MAX_WEIGHT).contains(&weight) {
            return Err(invalid(
                format!("{item}.weight"),
                format!("must be 1 to {MAX_WEIGHT}"),
            ));
        }
        if let Some(g) = &t.group {
            // The same rule as the groups the pools name, which it must match.
            crate::validate::check_group(g)
                .map_err(|reason| invalid(format!("{item}.group"), reason))?;
        }
        tenants.push(Tenant {
            name: t.name,
            priority: t.priority,
            weight,
            limits: l,
            group: t.group,
        });
    }
    let mut keys = Vec::with_capacity(doc.keys.len());
    for (i, k) in doc.keys.into_iter().enumerate() {
        let item = format!("keys[{i}]");
        let secret = match (k.key, k.key_sha256) {
            (Some(key), None) => {
                check_key(&key).map_err(|reason| invalid(format!("{item}.key"), reason))?;
                KeySecret::Plain(key)
            }
            (None, Some(hex)) => KeySecret::Sha256(parse_sha256(&hex).ok_or_else(|| {
                invalid(
                    format!("{item}.key_sha256"),
                    "must be 64 hex digits (the SHA-256 of the key)",
                )
            })?),
            _ => return Err(invalid(item, "needs exactly one of `key` and `key_sha256`")),
        };
        let tenant = tenants
            .iter()
            .position(|t| t.name == k.tenant)
            .ok_or_else(|| {
                invalid(
                    format!("{item}.tenant"),
                    "names no tenant declared under [[tenants]]",
                )
            })?;
        keys.push(KeyEntry { secret, tenant });
    }
    Ok(KeyFile { tenants, keys })
}

impl KeyFile {
    /// Both documents' tenants and keys; a tenant declared in both is an error.
    pub fn merge(mut self, other: KeyFile) -> Result<KeyFile, KeyFileError> {
        let base = self.tenants.len();
        for t in &other.tenants {
            if self.tenants.iter().any(|o| o.name == t.name) {
                return Err(invalid(
                    "tenants",
                    format!(
                        "tenant `{}` is declared in both the key file and the key variable",
                        t.name
                    ),
                ));
            }
        }
        self.tenants.extend(other.tenants);
        self.keys.extend(other.keys.into_iter().map(|k| KeyEntry {
            tenant: k.tenant + base,
            ..k
        }));
        Ok(self)
    }
}

fn invalid(item: impl Into<String>, reason: impl Into<String>) -> KeyFileError {
    KeyFileError::Invalid {
        item: item.into(),
        reason: reason.into(),
    }
}

/// Tenant names become metric labels and Redis keys: short, and from a plain alphabet.
fn check_name(name: &str) -> Result<(), String> {
    crate::validate::check_label(name, 64)
}

/// A key must fit in an `Authorization: Bearer` header as clients send it.
fn check_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > 512 {
        return Err("must be 1 to 512 characters");
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces");
    }
    Ok(())
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// `msg` with the contents of every double-quoted string replaced by `…`.
fn redact(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut quoted = false;
    for c in msg.chars() {
        if c == '"' {
            if quoted {
                out.push('…');
            }
            quoted = !quoted;
            out.push(c);
        } else if !quoted {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"
[[tenants]]
name = "team-a"
priority = "interactive"
weight = 3
requests_per_minute = 60
tokens_per_minute = 1000

[[tenants]]
name = "free"

[[keys]]
key = "sk-a-1"
tenant = "team-a"

[[keys]]
key_sha256 = "5E884898DA28047151D0E56F8DC6292773603D0D6AABBDD62A11EF721D1542D8"
tenant = "free"
"#;

    #[test]
    fn a_document_parses_with_its_tenants_and_keys() {
        let f = parse_keys(DOC).unwrap();
        assert_eq!(f.tenants.len(), 2);
        assert_eq!(f.tenants[0].priority, Priority::Interactive);
        assert_eq!(f.tenants[0].limits.requests_per_minute, Some(60));
        assert_eq!(f.tenants[0].limits.max_concurrent_requests, None);
        assert!(f.tenants[1].limits.unlimited());
        assert_eq!(f.tenants[1].priority, Priority::Default);
        assert_eq!(f.tenants[0].weight, 3);
        assert_eq!(f.tenants[1].weight, 1);
        assert_eq!(f.keys[0].secret, KeySecret::Plain("sk-a-1".into()));
        assert_eq!(f.keys[1].tenant, 1);
        let KeySecret::Sha256(h) = f.keys[1].secret else {
            panic!("a hash")
        };
        assert_eq!(h[0], 0x5e);
        assert_eq!(h[31], 0xd8);
    }

    #[test]
    fn a_tenant_may_pin_an_engine_group() {
        let f = parse_keys("[[tenants]]\nname = \"t\"\ngroup = \"canary\"\n").unwrap();
        assert_eq!(f.tenants[0].group.as_deref(), Some("canary"));
        assert_eq!(parse_keys(DOC).unwrap().tenants[0].group, None);
        let e = parse_keys("[[tenants]]\nname = \"t\"\ngroup = \"a b\"\n").unwrap_err();
        assert!(matches!(e, KeyFileError::Invalid { ref item, .. } if item == "tenants[0].group"));
        let long = format!(
            "[[tenants]]\nname = \"t\"\ngroup = \"{}\"\n",
            "g".repeat(33)
        );
        assert!(parse_keys(&long).is_err());
    }

    #[test]
    fn an_empty_document_has_no_keys() {
        assert_eq!(parse_keys("").unwrap(), KeyFile::default());
    }

    #[test]
    fn debug_output_never_shows_a_key() {
        let f = parse_keys(DOC).unwrap();
        let text = format!("{f:?}");
        assert!(!text.contains("sk-a-1"), "{text}");
        assert!(!text.to_lowercase().contains("5e8848"), "{text}");
    }

    fn err(doc: &str) -> String {
        parse_keys(doc).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_item_and_never_quote_a_key() {
        let secret = "sk-very-secret-value";
        for doc in [
            // A key in a number's place: serde quotes the value it did not expect.
            format!("[[tenants]]\nname = \"a\"\nrequests_per_minute = \"{secret}\""),
            format!("[[keys]]\nkey = \"{secret}\"\ntenant = \"nobody\""),
            format!("[[keys]]\nkey = \"{secret}\"\nkey_sha256 = \"00\"\ntenant = \"a\""),
            format!("[[keys]]\nkey = \"{secret} x\"\ntenant = \"a\""),
            format!("[[keys]]\nkey = \"{secret}\ntenant = \"a\""),
            secret.to_string(),
        ] {
            let e = err(&doc);
            assert!(!e.contains("very-secret"), "{e}");
            assert!(!e.is_empty());
        }
        assert!(err("[[keys]]\nkey = \"k\"\ntenant = \"nobody\"").contains("keys[0].tenant"));
    }

    #[test]
    fn each_rule_is_enforced() {
        let cases = [
            ("[[tenants]]\nname = \"a b\"", "tenants[0].name"),
            (
                "[[tenants]]\nname = \"a\"\n[[tenants]]\nname = \"a\"",
                "tenants[1].name",
            ),
            (
                "[[tenants]]\nname = \"a\"\ntokens_per_minute = 0",
                "tenants[0].tokens_per_minute",
            ),
            (
                "[[tenants]]\nname = \"a\"\n[[keys]]\ntenant = \"a\"",
                "keys[0]",
            ),
            ("[[tenants]]\nname = \"a\"\nweight = 0", "tenants[0].weight"),
            (
                "[[tenants]]\nname = \"a\"\nweight = 1001",
                "tenants[0].weight",
            ),
            (
                "[[tenants]]\nname = \"a\"\n[[keys]]\nkey_sha256 = \"abc\"\ntenant = \"a\"",
                "keys[0].key_sha256",
            ),
            (
                "[[tenants]]\nname = \"a\"\n[[keys]]\nkey = \"\"\ntenant = \"a\"",
                "keys[0].key",
            ),
        ];
        for (doc, item) in cases {
            match parse_keys(doc) {
                Err(KeyFileError::Invalid { item: i, .. }) => assert_eq!(i, item, "{doc}"),
                other => panic!("{doc}: {other:?}"),
            }
        }
        assert!(matches!(
            parse_keys("[[tenants]]\nname = \"a\"\nrpm = 3"),
            Err(KeyFileError::Syntax { line: Some(_), .. })
        ));
    }

    #[test]
    fn merging_shifts_tenant_indexes_and_refuses_a_tenant_twice() {
        let a = parse_keys(DOC).unwrap();
        let b =
            parse_keys("[[tenants]]\nname = \"env\"\n[[keys]]\nkey = \"sk-env\"\ntenant = \"env\"")
                .unwrap();
        let m = a.clone().merge(b).unwrap();
        assert_eq!(m.tenants[m.keys[2].tenant].name, "env");
        assert!(a.clone().merge(a).is_err());
    }
}
