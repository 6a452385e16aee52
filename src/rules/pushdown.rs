//! Pushdown: partial evaluation of a `read` rule with `auth` and `request.time` known and the
//! stored document unknown, producing a `where` filter for the query engine.
//!
//! Every boolean subexpression gets two document sets: where it is `true` and where it is
//! `false` (where it errors is neither). With the specification semantics `eval.rs` gives the
//! skeleton, they combine exactly: true(a && b) = true(a) ∩ true(b), false(a && b) =
//! false(a) ∪ false(b), `||` dually, `!` swaps them. Each set is either exact or an upper
//! bound (a superset), so a rule with a part we cannot express still yields a pre-filter
//! ([`Pushdown::Partial`]) that is safe: it only drops documents the rule would deny.

use cel::common::ast::{operators, Expr, IdedExpr};
use cel::{Context, Value};
use chrono::{DateTime, Utc};
use serde_json::{json, Value as Json};
use std::sync::{Arc, Mutex};

use super::check::refs;
use super::eval::{eval, with_context, LookupCache};
use super::value::{
    auth_to_cel, auth_too_deep, request_time_only, scalar_to_json, timestamp_to_json,
};
use super::AuthInfo;

/// What a `read` rule means for a query by one caller.
#[derive(Debug, Clone, PartialEq)]
pub enum Pushdown {
    /// The rule admits every document (e.g. `true`, or `auth != null` for a signed-in caller).
    Allow,
    /// The rule admits no document.
    Deny,
    /// Exactly the documents matching this `where` filter; no per-row evaluation needed.
    Filter(Json),
    /// Only documents matching this `where` filter can be admitted: filter in SQL, then
    /// evaluate the rule on each row.
    Partial { filter: Json },
    /// Nothing expressible: evaluate the rule on each row.
    Residual,
}

pub(crate) fn pushdown(expr: &IdedExpr, auth: Option<&AuthInfo>, now: DateTime<Utc>) -> Pushdown {
    // Evaluation denies such a caller every document; so does the query.
    if auth_too_deep(auth) {
        return Pushdown::Deny;
    }
    let sets = with_context(Arc::new(Mutex::new(LookupCache::default())), |ctx| {
        ctx.add_variable_from_value("auth", auth_to_cel(auth));
        ctx.add_variable_from_value("request", request_time_only(now));
        analyze(expr, ctx)
    });
    match (sets.t.cond, sets.t.exact) {
        (Cond::True, true) => Pushdown::Allow,
        (Cond::False, _) => Pushdown::Deny,
        (Cond::True, false) => Pushdown::Residual,
        (cond, true) => Pushdown::Filter(cond.to_where()),
        (cond, false) => Pushdown::Partial {
            filter: cond.to_where(),
        },
    }
}

/// A filter over documents. `True`/`False` never survive into the output: they are folded
/// away by [`and`]/[`or`] or become `Allow`/`Deny`.
#[derive(Debug, Clone, PartialEq)]
enum Cond {
    True,
    False,
    Clause(String, &'static str, Json),
    And(Vec<Cond>),
    Or(Vec<Cond>),
}

impl Cond {
    fn clause(field: &str, op: &'static str, value: Json) -> Cond {
        Cond::Clause(field.to_string(), op, value)
    }

    /// The public `where` syntax: a conjunction is an array of clauses, a disjunction an
    /// `{"or": [...]}` object.
    fn to_where(&self) -> Json {
        match self {
            Cond::And(items) => Json::Array(items.iter().map(Cond::node).collect()),
            Cond::Or(_) => self.node(),
            other => Json::Array(vec![other.node()]),
        }
    }

    fn node(&self) -> Json {
        match self {
            Cond::Clause(field, op, value) => json!([field, op, value]),
            Cond::And(items) => json!({"and": items.iter().map(Cond::node).collect::<Vec<_>>()}),
            Cond::Or(items) => json!({"or": items.iter().map(Cond::node).collect::<Vec<_>>()}),
            // Unreachable after folding; kept total with always-true/false clauses.
            Cond::True => json!({"and": []}),
            Cond::False => json!({"or": []}),
        }
    }
}

fn and(a: Cond, b: Cond) -> Cond {
    match (a, b) {
        (Cond::False, _) | (_, Cond::False) => Cond::False,
        (Cond::True, x) | (x, Cond::True) => x,
        (Cond::And(mut xs), Cond::And(ys)) => {
            xs.extend(ys);
            Cond::And(xs)
        }
        (Cond::And(mut xs), y) => {
            xs.push(y);
            Cond::And(xs)
        }
        (x, Cond::And(mut ys)) => {
            ys.insert(0, x);
            Cond::And(ys)
        }
        (x, y) => Cond::And(vec![x, y]),
    }
}

fn or(a: Cond, b: Cond) -> Cond {
    match (a, b) {
        (Cond::True, _) | (_, Cond::True) => Cond::True,
        (Cond::False, x) | (x, Cond::False) => x,
        (Cond::Or(mut xs), Cond::Or(ys)) => {
            xs.extend(ys);
            Cond::Or(xs)
        }
        (Cond::Or(mut xs), y) => {
            xs.push(y);
            Cond::Or(xs)
        }
        (x, Cond::Or(mut ys)) => {
            ys.insert(0, x);
            Cond::Or(ys)
        }
        (x, y) => Cond::Or(vec![x, y]),
    }
}

/// A document set: exact, or an upper bound when `exact` is false.
#[derive(Debug, Clone)]
struct Bound {
    cond: Cond,
    exact: bool,
}

impl Bound {
    fn exact(cond: Cond) -> Bound {
        Bound { cond, exact: true }
    }
    fn upper(cond: Cond) -> Bound {
        let exact = cond == Cond::False;
        Bound { cond, exact }
    }
    fn is_exactly_all(&self) -> bool {
        self.exact && self.cond == Cond::True
    }
}

fn meet(a: Bound, b: Bound) -> Bound {
    let exact = a.exact && b.exact;
    let cond = and(a.cond, b.cond);
    // An empty upper bound is exact.
    let exact = exact || cond == Cond::False;
    Bound { cond, exact }
}

fn join(a: Bound, b: Bound) -> Bound {
    let exact = (a.exact && b.exact) || a.is_exactly_all() || b.is_exactly_all();
    Bound {
        cond: or(a.cond, b.cond),
        exact,
    }
}

/// Where a boolean subexpression is true and where it is false.
#[derive(Debug, Clone)]
struct Sets {
    t: Bound,
    f: Bound,
}

impl Sets {
    fn unknown() -> Sets {
        Sets {
            t: Bound::upper(Cond::True),
            f: Bound::upper(Cond::True),
        }
    }
    fn constant(value: Option<bool>) -> Sets {
        let (t, f) = match value {
            Some(true) => (Cond::True, Cond::False),
            Some(false) => (Cond::False, Cond::True),
            None => (Cond::False, Cond::False),
        };
        Sets {
            t: Bound::exact(t),
            f: Bound::exact(f),
        }
    }
    fn error() -> Sets {
        Sets::constant(None)
    }
    fn not(self) -> Sets {
        Sets {
            t: self.f,
            f: self.t,
        }
    }
}

fn analyze(expr: &IdedExpr, ctx: &Context) -> Sets {
    if refs(expr).foldable() {
        return Sets::constant(match eval(expr, ctx) {
            Ok(Value::Bool(b)) => Some(b),
            _ => None,
        });
    }
    match &expr.expr {
        Expr::Call(call) if call.target.is_none() => {
            match (call.func_name.as_str(), call.args.as_slice()) {
                (operators::LOGICAL_AND, [a, b]) => {
                    let (a, b) = (analyze(a, ctx), analyze(b, ctx));
                    Sets {
                        t: meet(a.t, b.t),
                        f: join(a.f, b.f),
                    }
                }
                (operators::LOGICAL_OR, [a, b]) => {
                    let (a, b) = (analyze(a, ctx), analyze(b, ctx));
                    Sets {
                        t: join(a.t, b.t),
                        f: meet(a.f, b.f),
                    }
                }
                (operators::LOGICAL_NOT, [a]) => analyze(a, ctx).not(),
                (operators::CONDITIONAL, [c, a, b]) => {
                    let (c, a, b) = (analyze(c, ctx), analyze(a, ctx), analyze(b, ctx));
                    Sets {
                        t: join(meet(c.t.clone(), a.t), meet(c.f.clone(), b.t)),
                        f: join(meet(c.t, a.f), meet(c.f, b.f)),
                    }
                }
                (operators::IN, [item, container]) => membership(item, container, ctx),
                (op, [l, r]) => match compare_op(op) {
                    Some(op) => comparison(op, l, r, ctx),
                    None => Sets::unknown(),
                },
                _ => Sets::unknown(),
            }
        }
        // `has(resource.data.a.b)`
        Expr::Select(select) if select.test => match field_path(&select.operand) {
            Some(Field::Data(mut path)) => {
                let parent = path.join(".");
                let single = path.is_empty();
                path.push(select.field.clone());
                if !segment_ok(&select.field) {
                    return Sets::unknown();
                }
                let field = path.join(".");
                if single {
                    Sets {
                        t: Bound::exact(Cond::clause(&field, "exists", json!(true))),
                        f: Bound::exact(Cond::clause(&field, "exists", json!(false))),
                    }
                } else {
                    // False also when the parent is not a map: not expressible exactly.
                    Sets {
                        t: Bound::exact(Cond::clause(&field, "exists", json!(true))),
                        f: Bound::upper(Cond::clause(&parent, "exists", json!(true))),
                    }
                }
            }
            _ => Sets::unknown(),
        },
        // A bare `resource.data.flag` used as a condition must be the bool itself.
        _ => match field_path(expr) {
            Some(Field::Data(path)) if !path.is_empty() => {
                let field = path.join(".");
                Sets {
                    t: Bound::exact(Cond::clause(&field, "==", json!(true))),
                    f: Bound::exact(Cond::clause(&field, "==", json!(false))),
                }
            }
            _ => Sets::unknown(),
        },
    }
}

/// A document field a rule refers to.
enum Field {
    /// `resource.data.<path>`; empty for `resource.data` itself.
    Data(Vec<String>),
    /// `resource.id` → `$id` (always a string).
    Id,
    /// `resource.created_at` / `resource.updated_at` (always timestamps).
    Time(&'static str),
}

/// Recognises `resource.id`, `resource.created_at`, `resource.updated_at` and
/// `resource.data.a.b`. (cel-interpreter 0.10 turned a missing key named like a function,
/// `resource.data.size`, into that function; `cel` fails on it like on any missing key, so
/// such fields push down too.)
fn field_path(expr: &IdedExpr) -> Option<Field> {
    let mut segments = Vec::new();
    let mut at = expr;
    loop {
        match &at.expr {
            Expr::Select(select) if !select.test => {
                segments.push(select.field.clone());
                at = &select.operand;
            }
            Expr::Ident(name) if name == "resource" => break,
            _ => return None,
        }
    }
    segments.reverse();
    let (first, rest) = segments.split_first()?;
    match (first.as_str(), rest.len()) {
        ("id", 0) => Some(Field::Id),
        ("created_at", 0) => Some(Field::Time("$created_at")),
        ("updated_at", 0) => Some(Field::Time("$updated_at")),
        ("data", _) if rest.iter().all(|s| segment_ok(s)) => Some(Field::Data(rest.to_vec())),
        _ => None,
    }
}

fn segment_ok(segment: &str) -> bool {
    !segment.is_empty() && !segment.starts_with('$')
}

#[derive(Clone, Copy, PartialEq)]
enum Cmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Cmp {
    fn op(self) -> &'static str {
        match self {
            Cmp::Eq => "==",
            Cmp::Ne => "!=",
            Cmp::Lt => "<",
            Cmp::Le => "<=",
            Cmp::Gt => ">",
            Cmp::Ge => ">=",
        }
    }
    /// `k op field` as `field op' k`.
    fn flipped(self) -> Cmp {
        match self {
            Cmp::Lt => Cmp::Gt,
            Cmp::Le => Cmp::Ge,
            Cmp::Gt => Cmp::Lt,
            Cmp::Ge => Cmp::Le,
            same => same,
        }
    }
    fn negated(self) -> Cmp {
        match self {
            Cmp::Eq => Cmp::Ne,
            Cmp::Ne => Cmp::Eq,
            Cmp::Lt => Cmp::Ge,
            Cmp::Le => Cmp::Gt,
            Cmp::Gt => Cmp::Le,
            Cmp::Ge => Cmp::Lt,
        }
    }
}

fn compare_op(name: &str) -> Option<Cmp> {
    Some(match name {
        operators::EQUALS => Cmp::Eq,
        operators::NOT_EQUALS => Cmp::Ne,
        operators::LESS => Cmp::Lt,
        operators::LESS_EQUALS => Cmp::Le,
        operators::GREATER => Cmp::Gt,
        operators::GREATER_EQUALS => Cmp::Ge,
        _ => return None,
    })
}

/// The value of a subexpression known during pushdown, evaluated as the interpreter will
/// evaluate it inside a comparison. `None`: not known yet.
fn known(expr: &IdedExpr, ctx: &Context) -> Option<Result<Value, ()>> {
    refs(expr)
        .foldable()
        .then(|| eval(expr, ctx).map_err(|_| ()))
}

fn comparison(op: Cmp, l: &IdedExpr, r: &IdedExpr, ctx: &Context) -> Sets {
    let (field, op, value) = match (field_path(l), field_path(r)) {
        (Some(field), None) => (field, op, known(r, ctx)),
        (None, Some(field)) => (field, op.flipped(), known(l, ctx)),
        _ => return Sets::unknown(),
    };
    let value = match value {
        None => return Sets::unknown(),
        // Both operands are evaluated, so a failing known side fails for every document.
        Some(Err(())) => return Sets::error(),
        Some(Ok(value)) => value,
    };
    match field {
        Field::Data(path) if !path.is_empty() => data_comparison(&path.join("."), op, &value),
        Field::Data(_) => Sets::unknown(),
        Field::Id => match &value {
            Value::String(_) => metadata_comparison("$id", op, scalar_to_json(&value)),
            _ => mismatched_metadata(op),
        },
        Field::Time(name) => match &value {
            Value::Timestamp(t) => metadata_comparison(name, op, Some(timestamp_to_json(t))),
            _ => mismatched_metadata(op),
        },
    }
}

/// `$id` / `$created_at` / `$updated_at` always exist with one type, so every operator,
/// `!=` included, and its negation are exact.
fn metadata_comparison(field: &str, op: Cmp, value: Option<Json>) -> Sets {
    let Some(value) = value else {
        return Sets::unknown();
    };
    Sets {
        t: Bound::exact(Cond::clause(field, op.op(), value.clone())),
        f: Bound::exact(Cond::clause(field, op.negated().op(), value)),
    }
}

/// A metadata field against a value of another type: `==` is false, `!=` true, ordering an
/// error, for every document.
fn mismatched_metadata(op: Cmp) -> Sets {
    match op {
        Cmp::Eq => Sets::constant(Some(false)),
        Cmp::Ne => Sets::constant(Some(true)),
        _ => Sets::error(),
    }
}

/// Numbers at or beyond 2^53 in magnitude are not pushed into SQL: CEL compares an `int`
/// with a `double` (and SQLite a stored integer with a real, and an integer beyond `i64` is
/// read back as a real) after rounding to a double, so `2^53 + 1 == 2^53.0` holds in one and
/// not in the other. Below 2^53 every integer is exact as a double and no stored number
/// rounds across the literal, so SQL and CEL agree; larger literals are checked per row.
const EXACT_DOUBLE: f64 = 9_007_199_254_740_992.0;

/// A rule's scalar as a query value, when SQL compares it as CEL does.
fn pushable(value: &Value) -> Option<Json> {
    let exact = match value {
        Value::Int(i) => i.unsigned_abs() < EXACT_DOUBLE as u64,
        Value::UInt(u) => *u < EXACT_DOUBLE as u64,
        Value::Float(f) => f.is_finite() && f.abs() < EXACT_DOUBLE,
        _ => true,
    };
    if exact {
        scalar_to_json(value)
    } else {
        None
    }
}

fn data_comparison(field: &str, op: Cmp, value: &Value) -> Sets {
    // A missing field is an error, so even "false" needs the field to exist.
    let present = || Cond::clause(field, "exists", json!(true));
    match op {
        Cmp::Eq | Cmp::Ne => {
            let equal = match value {
                // CEL equality of JSON scalars is the query engine's same-type equality.
                Value::Null
                | Value::Bool(_)
                | Value::Int(_)
                | Value::UInt(_)
                | Value::String(_) => pushable(value).map(|v| Cond::clause(field, "==", v)),
                Value::Float(_) => pushable(value).map(|v| Cond::clause(field, "==", v)),
                // Stored JSON never equals a timestamp, duration or bytes.
                Value::Timestamp(_) | Value::Duration(_) | Value::Bytes(_) => Some(Cond::False),
                _ => None,
            };
            let Some(equal) = equal else {
                return Sets::unknown();
            };
            // "Present and different, of any type" has no operator (`!=` is type-strict):
            // keep it as an upper bound.
            let different = if equal == Cond::False {
                Bound::exact(present())
            } else {
                Bound::upper(present())
            };
            let sets = Sets {
                t: Bound::exact(equal),
                f: different,
            };
            if op == Cmp::Eq {
                sets
            } else {
                sets.not()
            }
        }
        _ => {
            let ordered = match value {
                Value::Int(_) | Value::UInt(_) | Value::String(_) | Value::Float(_) => {
                    pushable(value)
                }
                _ => None,
            };
            match ordered {
                // Other types fail to compare, matching the type-strict query operators.
                Some(v) => Sets {
                    t: Bound::exact(Cond::clause(field, op.op(), v.clone())),
                    f: Bound::exact(Cond::clause(field, op.negated().op(), v)),
                },
                None => Sets::unknown(),
            }
        }
    }
}

fn membership(item: &IdedExpr, container: &IdedExpr, ctx: &Context) -> Sets {
    match (field_path(item), field_path(container)) {
        // `resource.data.x in [..]`, `resource.id in [..]`
        (Some(field), None) => {
            let list = match known(container, ctx) {
                None => return Sets::unknown(),
                Some(Err(())) => return Sets::error(),
                Some(Ok(Value::List(list))) => list,
                // A map on the right would need "field's value is a key": not expressible.
                Some(Ok(Value::Map(_))) => return Sets::unknown(),
                Some(Ok(_)) => return Sets::error(),
            };
            let (name, candidates): (String, Vec<Json>) = match field {
                Field::Data(path) if !path.is_empty() => {
                    let Some(values) = list.iter().map(pushable).collect::<Option<Vec<_>>>() else {
                        return Sets::unknown();
                    };
                    (path.join("."), values)
                }
                Field::Id => (
                    "$id".to_string(),
                    list.iter()
                        .filter(|v| matches!(v, Value::String(_)))
                        .filter_map(scalar_to_json)
                        .collect(),
                ),
                _ => return Sets::unknown(),
            };
            let always_present = name == "$id";
            let t = if candidates.is_empty() {
                Cond::False
            } else {
                Cond::clause(&name, "in", Json::Array(candidates))
            };
            let f = if always_present {
                Bound::upper(Cond::True)
            } else {
                Bound::upper(Cond::clause(&name, "exists", json!(true)))
            };
            Sets {
                t: Bound::exact(t),
                f,
            }
        }
        // `"v" in resource.data.tags`: a list containing it, or a map with that key.
        (None, Some(Field::Data(path))) if !path.is_empty() => {
            let value = match known(item, ctx) {
                None => return Sets::unknown(),
                Some(Err(())) => return Sets::error(),
                Some(Ok(value)) => value,
            };
            let field = path.join(".");
            let Some(json_value) = pushable(&value) else {
                return Sets::unknown();
            };
            let contains = Cond::clause(&field, "array-contains", json_value);
            let t = match &value {
                Value::String(key) => {
                    if key_segment_ok(key) {
                        or(
                            contains,
                            Cond::clause(&format!("{field}.{key}"), "exists", json!(true)),
                        )
                    } else {
                        // The map-key case cannot be addressed by a dotted path.
                        return Sets {
                            t: Bound::upper(or(
                                contains,
                                Cond::clause(&field, "exists", json!(true)),
                            )),
                            f: Bound::upper(Cond::clause(&field, "exists", json!(true))),
                        };
                    }
                }
                // JSON object keys are strings; CEL never finds an int or bool key in them.
                _ => contains,
            };
            Sets {
                t: Bound::exact(t),
                f: Bound::upper(Cond::clause(&field, "exists", json!(true))),
            }
        }
        _ => Sets::unknown(),
    }
}

/// A map key usable as one segment of a dotted query path.
fn key_segment_ok(key: &str) -> bool {
    // All-digit keys might be read as array indexes by the query engine.
    !key.is_empty()
        && !key.starts_with('$')
        && !key.chars().all(|c| c.is_ascii_digit())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}
