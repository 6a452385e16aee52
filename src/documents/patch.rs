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
        // Integers beyond the signed 64-bit range would be stored as given on a missing
        // field, or as a rounded double by one database and not the other.
        "$increment" if arg.is_u64() && !arg.is_i64() => Err(bad(
            "$increment takes an integer within the signed 64-bit range, or a double",
        )),
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

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Resolves the transforms in `value` (at `path`) against `old`, the stored value at the same
/// place.
fn resolve(
    value: &Value,
    old: Option<&Value>,
    now: DateTime<Utc>,
    path: &str,
) -> Result<Value, ApiError> {
    match value {
        Value::Object(map) => {
            if let Some(name) = transform_of(map) {
                let arg = &map[name];
                return Ok(match name {
                    "$increment" => increment(old, arg).ok_or_else(|| {
                        ApiError::invalid_with(
                            format!("`$increment` at `{path}` would overflow"),
                            json!({"field": path}),
                        )
                    })?,
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
                });
            }
            let old_map = old.and_then(Value::as_object);
            map.iter()
                .map(|(k, v)| {
                    resolve(v, old_map.and_then(|m| m.get(k)), now, &join(path, k))
                        .map(|v| (k.clone(), v))
                })
                .collect::<Result<Map<_, _>, _>>()
                .map(Value::Object)
        }
        other => Ok(other.clone()),
    }
}

/// `old + by`, keeping integers integral; a missing or non-numeric `old` counts as 0. `None`
/// when the sum does not fit: past the 64-bit signed range for integers, not finite for
/// floats (JSON has no infinity).
fn increment(old: Option<&Value>, by: &Value) -> Option<Value> {
    let old = old.filter(|v| v.is_number());
    let integer = |v: &Value| {
        v.as_i64()
            .map(i128::from)
            .or_else(|| v.as_u64().map(i128::from))
    };
    match (old, by) {
        (None, by) => Some(by.clone()),
        (Some(a), b) => match (integer(a), integer(b)) {
            (Some(x), Some(y)) => {
                // The sum stays within 64-bit signed integers, which both databases hold
                // exactly.
                i64::try_from(x + y).map(|n| json!(n)).ok()
            }
            _ => Number::from_f64(a.as_f64()? + b.as_f64()?).map(Value::Number),
        },
    }
}

/// The data to store for a full write (create or replace): transforms resolved against the
/// document being replaced, if any.
pub fn apply_set(new: &Value, old: Option<&Value>, now: DateTime<Utc>) -> Result<Value, ApiError> {
    resolve(new, old, now, "")
}

/// JSON merge patch of `patch` onto `old`: objects merge key by key, `null` deletes, any
/// other value (arrays included) replaces; transforms resolve against the old value.
pub fn apply_merge(old: &Value, patch: &Value, now: DateTime<Utc>) -> Result<Value, ApiError> {
    merge_at(old, patch, now, "")
}

fn merge_at(old: &Value, patch: &Value, now: DateTime<Utc>, path: &str) -> Result<Value, ApiError> {
    match (old, patch) {
        (_, Value::Object(p)) if transform_of(p).is_some() => resolve(patch, Some(old), now, path),
        (Value::Object(o), Value::Object(p)) => {
            let mut out = o.clone();
            for (k, v) in p {
                if v.is_null() {
                    out.remove(k);
                } else {
                    let merged = match out.get(k) {
                        Some(existing) => merge_at(existing, v, now, &join(path, k))?,
                        None => merge_at(&Value::Null, v, now, &join(path, k))?,
                    };
                    out.insert(k.clone(), merged);
                }
            }
            Ok(Value::Object(out))
        }
        (_, Value::Object(_)) => merge_at(&Value::Object(Map::new()), patch, now, path),
        (_, other) => Ok(other.clone()),
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
        let out = apply_merge(&old, &patch, now).unwrap();
        assert_eq!(
            out,
            json!({"b": {"d": 3, "e": 4}, "n": 7, "tags": ["x", "y"], "m": 1.5})
        );
        let out = apply_merge(
            &out,
            &json!({"tags": {"$arrayRemove": ["x"]}, "s": {"$serverTimestamp": true}}),
            now,
        )
        .unwrap();
        assert_eq!(out["tags"], json!(["y"]));
        assert!(out["s"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn increments_that_do_not_fit_are_errors_not_floats_or_nulls() {
        let now = Utc::now();
        let inc = |old: Value, by: Value| {
            apply_merge(&json!({"n": old}), &json!({"n": {"$increment": by}}), now)
                .map(|v| v["n"].clone())
        };
        assert_eq!(inc(json!(1), json!(2)).unwrap(), json!(3));
        assert_eq!(inc(json!(1), json!(0.5)).unwrap(), json!(1.5));
        assert_eq!(inc(json!("text"), json!(2)).unwrap(), json!(2));
        assert_eq!(inc(json!(i64::MAX - 1), json!(1)).unwrap(), json!(i64::MAX));
        assert_eq!(
            inc(json!(i64::MIN + 1), json!(-1)).unwrap(),
            json!(i64::MIN)
        );
        assert!(inc(json!(i64::MAX), json!(1)).is_err());
        assert!(inc(json!(i64::MIN), json!(-1)).is_err());
        assert!(inc(json!(u64::MAX), json!(1)).is_err());
        assert!(inc(json!(1.7e308), json!(1.7e308)).is_err());
        assert!(inc(json!(-1.7e308), json!(-1.7e308)).is_err());
        let err = inc(json!(i64::MAX), json!(1)).unwrap_err().to_string();
        assert!(
            err.contains("`n`") && !err.contains("9223372036854775807"),
            "{err}"
        );
    }

    #[test]
    fn reserved_names_and_bad_transforms_are_refused() {
        assert!(check_input(&json!({"$x": 1}), 32, false).is_err());
        assert!(check_input(&json!({"a": {"$y": 1, "b": 2}}), 32, true).is_err());
        assert!(check_input(&json!({"a": {"$increment": "1"}}), 32, true).is_err());
        assert!(check_input(&json!({"a": {"$increment": 1}}), 32, false).is_err());
        assert!(check_input(&json!({"a": {"$increment": 1}}), 32, true).is_ok());
        assert!(check_input(&json!({"a": {"$increment": u64::MAX}}), 32, true).is_err());
        assert!(check_input(&json!({"a": {"$increment": i64::MIN}}), 32, true).is_ok());
        assert!(check_input(&json!({"a": [{"$increment": 1}]}), 32, true).is_err());
        assert!(check_input(&json!([1]), 32, true).is_err());
        let deep = (0..40).fold(json!(1), |acc, _| json!({"a": acc}));
        assert!(check_input(&deep, 32, false).is_err());
    }
}
