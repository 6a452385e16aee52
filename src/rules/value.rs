//! JSON ↔ CEL value conversion and the `auth` / `resource` / `request` activation.
//!
//! We convert by hand rather than through `cel::to_value` because serde hands positive JSON
//! integers over as `u64`, which would make them CEL `uint`s; rules compare against `int`
//! literals, so integers must become `Int`.
//!
//! The conversion recurses, and so does the interpreter over the values it gets (conversion
//! to its own representation, equality, dropping): every entry point checks the input's
//! depth against [`MAX_VALUE_DEPTH`] first ([`too_deep`], [`auth_too_deep`], the lookup
//! cache), so no recursion here or there goes deeper.

use std::collections::HashMap;
use std::sync::Arc;

use cel::objects::{Key, Map};
use cel::Value;
use chrono::{DateTime, FixedOffset, SecondsFormat, Utc};
use serde_json::Value as Json;

use super::limits::{json_depth, MAX_VALUE_DEPTH};
use super::{AuthInfo, RequestInfo, RuleInput};

/// Which part of `input`, if any, is nested deeper than [`MAX_VALUE_DEPTH`].
pub(crate) fn too_deep(input: &RuleInput) -> Option<&'static str> {
    if auth_too_deep(input.auth.as_ref()) {
        return Some("auth.claims");
    }
    if input
        .resource
        .as_ref()
        .is_some_and(|r| json_depth(r) > MAX_VALUE_DEPTH)
    {
        return Some("resource");
    }
    if input
        .request
        .data
        .as_ref()
        .is_some_and(|d| json_depth(d) > MAX_VALUE_DEPTH)
    {
        return Some("request.data");
    }
    None
}

/// Whether the caller's custom claims are nested deeper than [`MAX_VALUE_DEPTH`].
pub(crate) fn auth_too_deep(auth: Option<&AuthInfo>) -> bool {
    auth.is_some_and(|a| json_depth(&a.claims) > MAX_VALUE_DEPTH)
}

/// A fetched document for `get()`, or `Err` when it is nested too deeply to convert.
pub(crate) fn fetched_to_cel(doc: &Json) -> Result<Value, ()> {
    if json_depth(doc) > MAX_VALUE_DEPTH {
        return Err(());
    }
    Ok(document_to_cel(doc))
}

/// Faithful conversion: objects → maps, arrays → lists, integers → `Int` (`UInt` only above
/// `i64::MAX`), other numbers → `Float`, null → `Null`. Callers bound the depth first.
pub(crate) fn json_to_cel(json: &Json) -> Value {
    match json {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::String(Arc::new(s.clone())),
        Json::Array(items) => Value::List(Arc::new(items.iter().map(json_to_cel).collect())),
        Json::Object(fields) => map_value(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), json_to_cel(v)))
                .collect(),
        ),
    }
}

fn map_value(fields: HashMap<String, Value>) -> Value {
    let map: HashMap<Key, Value> = fields.into_iter().map(|(k, v)| (k.into(), v)).collect();
    Value::Map(Map { map: Arc::new(map) })
}

/// A stored document `{id, data, version, created_at, updated_at}` as CEL. The two metadata
/// times become CEL timestamps (when they parse as RFC 3339) so rules can compare them with
/// `request.time` without calling `timestamp()`.
pub(crate) fn document_to_cel(doc: &Json) -> Value {
    let Json::Object(fields) = doc else {
        return json_to_cel(doc);
    };
    map_value(
        fields
            .iter()
            .map(|(k, v)| {
                let value = match (k.as_str(), v) {
                    ("created_at" | "updated_at", Json::String(s)) => {
                        match DateTime::parse_from_rfc3339(s) {
                            Ok(t) => Value::Timestamp(t),
                            Err(_) => json_to_cel(v),
                        }
                    }
                    _ => json_to_cel(v),
                };
                (k.clone(), value)
            })
            .collect(),
    )
}

pub(crate) fn auth_to_cel(auth: Option<&AuthInfo>) -> Value {
    let Some(auth) = auth else {
        return Value::Null;
    };
    let mut fields = HashMap::new();
    fields.insert("uid".to_string(), Value::from(auth.uid.as_str()));
    fields.insert("role".to_string(), Value::from(auth.role.as_str()));
    fields.insert(
        "email".to_string(),
        auth.email
            .as_deref()
            .map(Value::from)
            .unwrap_or(Value::Null),
    );
    fields.insert(
        "email_verified".to_string(),
        Value::Bool(auth.email_verified),
    );
    fields.insert("is_anonymous".to_string(), Value::Bool(auth.is_anonymous));
    // Claims are always a map so `auth.claims.x` is a "no such key" deny, not a type error.
    let claims = match &auth.claims {
        Json::Object(_) => json_to_cel(&auth.claims),
        _ => map_value(HashMap::new()),
    };
    fields.insert("claims".to_string(), claims);
    map_value(fields)
}

pub(crate) fn timestamp(time: DateTime<Utc>) -> Value {
    Value::Timestamp(time.with_timezone(&FixedOffset::east_opt(0).expect("UTC offset")))
}

pub(crate) fn request_to_cel(request: &RequestInfo) -> Value {
    let mut fields = HashMap::new();
    fields.insert("method".to_string(), Value::from(request.method.as_str()));
    fields.insert("time".to_string(), timestamp(request.time));
    fields.insert(
        "data".to_string(),
        request
            .data
            .as_ref()
            .map(json_to_cel)
            .unwrap_or(Value::Null),
    );
    for (name, value) in &request.extra {
        fields
            .entry(name.clone())
            .or_insert_with(|| json_to_cel(value));
    }
    map_value(fields)
}

/// Only `request.time` is known when a rule is pushed down into a query.
pub(crate) fn request_time_only(now: DateTime<Utc>) -> Value {
    let mut fields = HashMap::new();
    fields.insert("time".to_string(), timestamp(now));
    map_value(fields)
}

/// The JSON literal a known CEL value stands for in a `where` clause, if it has one.
/// Only scalars: the query engine's comparisons are defined on them, and CEL list/map
/// equality has no counterpart there.
pub(crate) fn scalar_to_json(value: &Value) -> Option<Json> {
    match value {
        Value::Null => Some(Json::Null),
        Value::Bool(b) => Some(Json::Bool(*b)),
        Value::Int(i) => Some(Json::from(*i)),
        Value::UInt(u) => Some(Json::from(*u)),
        Value::Float(f) => serde_json::Number::from_f64(*f).map(Json::Number),
        Value::String(s) => Some(Json::String(s.to_string())),
        _ => None,
    }
}

pub(crate) fn timestamp_to_json(time: &DateTime<FixedOffset>) -> Json {
    Json::String(
        time.with_timezone(&Utc)
            .to_rfc3339_opts(SecondsFormat::AutoSi, true),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_numbers_keep_their_cel_kind() {
        assert_eq!(json_to_cel(&json!(3)), Value::Int(3));
        assert!(matches!(json_to_cel(&json!(3.5)), Value::Float(f) if f == 3.5));
        assert!(matches!(json_to_cel(&json!(u64::MAX)), Value::UInt(u) if u == u64::MAX));
        assert_eq!(json_to_cel(&json!(null)), Value::Null);
    }

    #[test]
    fn document_times_become_timestamps() {
        let doc = document_to_cel(&json!({"id": "a", "created_at": "2024-01-02T03:04:05Z"}));
        let Value::Map(map) = doc else {
            panic!("not a map")
        };
        assert!(matches!(
            map.map.get(&Key::from("created_at")),
            Some(Value::Timestamp(_))
        ));
    }
}
