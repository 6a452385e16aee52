//! Field transforms and JSON merge patch (RFC 7396) for document writes.
//!
//! A transform is an object with exactly one reserved key, standing where a value would:
//! `{"$increment": n}`, `{"$serverTimestamp": true}`, `{"$arrayUnion": [...]}`,
//! `{"$arrayRemove": [...]}`. Transforms are resolved against the stored document inside the
//! write transaction, so concurrent increments never lose one another.

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Map, Number, Value};

use crate::error::ApiError;

/// Checks `data` before it is applied: an object, no reserved `$` names except well-formed
/// transforms (when `transforms_allowed`), nesting within `max_depth`.
pub fn check_input(
    data: &Value,
    max_depth: usize,
    transforms_allowed: bool,
) -> Result<(), ApiError> {
    if !data.is_object() {
        return Err(ApiError::invalid_with(
            "data must be a JSON object",
            json!({"field": "data"}),
        ));
    }
    if data.as_object().and_then(transform_of).is_some() {
        return Err(ApiError::invalid_with(
            "data itself cannot be a transform; put it under a field",
            json!({"field": "data"}),
        ));
    }
    check_node(data, "", 0, max_depth, transforms_allowed)
}

fn check_node(
    v: &Value,
    path: &str,
    depth: usize,
    max_depth: usize,
    transforms: bool,
) -> Result<(), ApiError> {
    if depth > max_depth {
        return Err(ApiError::invalid_with(
            format!("data is nested deeper than {max_depth} levels"),
            json!({"field": path}),
        ));
    }
    match v {
        Value::Object(map) => {
            if let Some(t) = transform_of(map) {
                if !transforms {
                    return Err(ApiError::invalid_with(
                        format!("`{t}` is not allowed here"),
                        json!({"field": path}),
                    ));
                }
                return check_transform(map, path);
            }
            for (key, child) in map {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if key.contains('\0') {
                    return Err(nul_error(&child_path));
                }
                if key.starts_with('$') {
                    return Err(ApiError::invalid_with(
                        format!("field names starting with `$` are reserved: `{child_path}`"),
                        json!({"field": child_path}),
                    ));
                }
                check_node(child, &child_path, depth + 1, max_depth, transforms)?;
            }
            Ok(())
        }
        Value::Array(items) => items
            .iter()
            .try_for_each(|i| check_node(i, path, depth + 1, max_depth, false)),
        Value::String(text) if text.contains('\0') => Err(nul_error(path)),
        _ => Ok(()),
    }
}

/// U+0000 is refused in every stored string: PostgreSQL cannot hold it in `jsonb`, and both
/// databases must accept the same documents.
fn nul_error(path: &str) -> ApiError {
    ApiError::invalid_with(
        format!("`{path}` contains the character U+0000, which cannot be stored"),
        json!({"field": path}),
    )
}

/// The transform name when `map` is a transform object (one key, starting with `$`).
fn transform_of(map: &Map<String, Value>) -> Option<&str> {
    if map.len() == 1 {
        let key = map.keys().next().expect("one key");
        if key.starts_with('$') {
            return Some(key.as_str());
        }
    }
    None
}

fn check_transform(map: &Map<String, Value>, path: &str) -> Result<(), ApiError> {
    let (name, arg) = map.iter().next().expect("one key");
    let bad = |msg: &str| ApiError::invalid_with(msg.to_string(), json!({"field": path}));
    match name.as_str() {
        "$increment" if arg.is_number() => Ok(()),
        "$increment" => Err(bad("$increment takes a number")),
        "$serverTimestamp" if arg == &Value::Bool(true) => Ok(()),
        "$serverTimestamp" => Err(bad("$serverTimestamp takes true")),
        "$arrayUnion" | "$arrayRemove" if arg.is_array() => Ok(()),
        "$arrayUnion" | "$arrayRemove" => Err(bad("array transforms take a list")),
        other => Err(bad(&format!(
            "unknown transform `{other}`; use $increment, $serverTimestamp, $arrayUnion or $arrayRemove"
        ))),
    }
}

/// Resolves the transforms in `value` against `old` (the stored value at the same place).
fn resolve(value: &Value, old: Option<&Value>, now: DateTime<Utc>) -> Value {
    match value {
        Value::Object(map) => {
            if let Some(name) = transform_of(map) {
                let arg = &map[name];
                return match name {
                    "$increment" => increment(old, arg),
                    "$serverTimestamp" => json!(now.to_rfc3339_opts(SecondsFormat::Micros, true)),
                    "$arrayUnion" => {
                        let mut items = old.and_then(Value::as_array).cloned().unwrap_or_default();
                        for x in arg.as_array().into_iter().flatten() {
                            if !items.contains(x) {
                                items.push(x.clone());
                            }
                        }
                        Value::Array(items)
                    }
                    _ => {
                        let remove = arg.as_array().cloned().unwrap_or_default();
                        let items = old.and_then(Value::as_array).cloned().unwrap_or_default();
                        Value::Array(items.into_iter().filter(|x| !remove.contains(x)).collect())
                    }
                };
            }
            let old_map = old.and_then(Value::as_object);
            Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), resolve(v, old_map.and_then(|m| m.get(k)), now)))
                    .collect(),
            )
        }
        other => other.clone(),
    }
}

/// `old + by`, keeping integers integral; a missing or non-numeric `old` counts as 0.
fn increment(old: Option<&Value>, by: &Value) -> Value {
    let old = old.filter(|v| v.is_number());
    match (old.and_then(Value::as_i64), by.as_i64()) {
        (Some(a), Some(b)) => match a.checked_add(b) {
            Some(sum) => json!(sum),
            None => float(a as f64 + b as f64),
        },
        (None, Some(b)) if old.is_none() => json!(b),
        _ => float(old.and_then(Value::as_f64).unwrap_or(0.0) + by.as_f64().unwrap_or(0.0)),
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f)
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

/// The data to store for a full write (create or replace): transforms resolved against the
/// document being replaced, if any.
pub fn apply_set(new: &Value, old: Option<&Value>, now: DateTime<Utc>) -> Value {
    resolve(new, old, now)
}

/// JSON merge patch of `patch` onto `old`: objects merge key by key, `null` deletes, any
/// other value (arrays included) replaces; transforms resolve against the old value.
pub fn apply_merge(old: &Value, patch: &Value, now: DateTime<Utc>) -> Value {
    match (old, patch) {
        (_, Value::Object(p)) if transform_of(p).is_some() => resolve(patch, Some(old), now),
        (Value::Object(o), Value::Object(p)) => {
            let mut out = o.clone();
            for (k, v) in p {
                if v.is_null() {
                    out.remove(k);
                } else {
                    let merged = match out.get(k) {
                        Some(existing) => apply_merge(existing, v, now),
                        None => apply_merge(&Value::Null, v, now),
                    };
                    out.insert(k.clone(), merged);
                }
            }
            Value::Object(out)
        }
        (_, Value::Object(p)) => {
            apply_merge(&Value::Object(Map::new()), &Value::Object(p.clone()), now)
        }
        (_, other) => other.clone(),
    }
}

/// Nesting depth of a value (scalars are 0).
pub fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_patch_follows_rfc_7396_and_resolves_transforms() {
        let now = Utc::now();
        let old = json!({"a": 1, "b": {"c": 2, "d": 3}, "n": 5, "tags": ["x"]});
        let patch = json!({"a": null, "b": {"c": null, "e": 4}, "n": {"$increment": 2},
                           "tags": {"$arrayUnion": ["x", "y"]}, "m": {"$increment": 1.5}});
        let out = apply_merge(&old, &patch, now);
        assert_eq!(
            out,
            json!({"b": {"d": 3, "e": 4}, "n": 7, "tags": ["x", "y"], "m": 1.5})
        );
        let out = apply_merge(
            &out,
            &json!({"tags": {"$arrayRemove": ["x"]}, "s": {"$serverTimestamp": true}}),
            now,
        );
        assert_eq!(out["tags"], json!(["y"]));
        assert!(out["s"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn reserved_names_and_bad_transforms_are_refused() {
        assert!(check_input(&json!({"$x": 1}), 32, false).is_err());
        assert!(check_input(&json!({"a": {"$y": 1, "b": 2}}), 32, true).is_err());
        assert!(check_input(&json!({"a": {"$increment": "1"}}), 32, true).is_err());
        assert!(check_input(&json!({"a": {"$increment": 1}}), 32, false).is_err());
        assert!(check_input(&json!({"a": {"$increment": 1}}), 32, true).is_ok());
        assert!(check_input(&json!({"a": [{"$increment": 1}]}), 32, true).is_err());
        assert!(check_input(&json!([1]), 32, true).is_err());
        let deep = (0..40).fold(json!(1), |acc, _| json!({"a": acc}));
        assert!(check_input(&deep, 32, false).is_err());
    }
}
