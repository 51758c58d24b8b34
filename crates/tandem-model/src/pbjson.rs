//! `google.protobuf.Struct` ↔ JSON, for `kv_transfer_params` on vLLM's gRPC (vllm-grpc.md §6):
//! one conversion for the coordinator's gRPC transport and the simulated engine's gRPC server.
//!
//! A `Struct` has one number type, the double. The two sides differ in what they make of it on
//! the way back, so the caller says which: vLLM's server hands the engine `json!(f64)`, so
//! `5600` arrives as `5600.0` ([`Numbers::Doubles`], what the sim must reproduce); the
//! coordinator turns integral doubles within ±2^53 back into integers ([`Numbers::Integral`])
//! because an HTTP decode engine's NixlConnector needs `remote_port`, `tp_size` and block ids as
//! ints.

use prost_types::value::Kind;
use serde_json::Value;

/// The largest integer a double holds exactly (2^53).
pub const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_992.0;

/// How numbers come back out of a `Struct`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numbers {
    /// Every number stays a JSON float, as vLLM's server converts them.
    Doubles,
    /// Integral doubles within ±2^53 become JSON integers.
    Integral,
}

/// JSON → `Struct`; `None` unless `v` is an object. Every number becomes a double (the only
/// number a `Struct` has): integers above 2^53 lose precision, as on any protobuf path.
pub fn json_to_struct(v: &Value) -> Option<prost_types::Struct> {
    let Value::Object(m) = v else { return None };
    Some(prost_types::Struct {
        fields: m
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect(),
    })
}

fn json_to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_value).collect(),
        }),
        Value::Object(_) => Kind::StructValue(json_to_struct(v).unwrap_or_default()),
    };
    prost_types::Value { kind: Some(kind) }
}

/// `Struct` → JSON. Keys come out sorted (a `Struct` is a sorted map); NaN and infinities, which
/// JSON cannot hold, become `null`.
pub fn struct_to_json(s: &prost_types::Struct, numbers: Numbers) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v, numbers)))
            .collect(),
    )
}

fn value_to_json(v: &prost_types::Value, numbers: Numbers) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => number_to_json(*n, numbers),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(l)) => {
            Value::Array(l.values.iter().map(|v| value_to_json(v, numbers)).collect())
        }
        Some(Kind::StructValue(s)) => struct_to_json(s, numbers),
    }
}

fn number_to_json(n: f64, numbers: Numbers) -> Value {
    if numbers == Numbers::Integral && n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER {
        // `-0.0` is integral and non-negative here: it becomes 0.
        return if n >= 0.0 {
            Value::from(n as u64)
        } else {
            Value::from(n as i64)
        };
    }
    serde_json::Number::from_f64(n).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn numbers_come_back_as_each_side_needs_them() {
        let s = json_to_struct(&json!({"remote_port": 5600, "ids": [1, 2], "x": 0.5, "p": "5600"}))
            .unwrap();
        assert_eq!(
            struct_to_json(&s, Numbers::Integral),
            json!({"ids": [1, 2], "p": "5600", "remote_port": 5600, "x": 0.5})
        );
        assert_eq!(
            struct_to_json(&s, Numbers::Doubles),
            json!({"ids": [1.0, 2.0], "p": "5600", "remote_port": 5600.0, "x": 0.5})
        );
        assert!(json_to_struct(&json!([1])).is_none());
        let big = json_to_struct(&json!({"n": 1e300, "neg": -3})).unwrap();
        assert_eq!(
            struct_to_json(&big, Numbers::Integral),
            json!({"n": 1e300, "neg": -3})
        );
    }
}
