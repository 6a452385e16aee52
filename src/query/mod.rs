//! The query language of `_query` and `_aggregate` (API.md § Documents): parsing the JSON
//! `where` tree, `order_by`, `limit`, cursors and `select` into a validated AST, and matching
//! documents against it in memory. The AST is dialect-neutral and belongs to no domain: the
//! store turns it into SQL (`store::docsql`, every request value bound), documents parse and
//! run queries with it, and realtime matches changes against subscriptions with [`matches`].
//!
//! Semantics, shared by both databases:
//! - `==`, `<`, `<=`, `>`, `>=`, `in`, `array-contains(-any)` match values of the same JSON type
//!   only (all numbers are one type). `!=` and `not-in` match documents that have the field
//!   with any other value (a value of another type is "not equal"); documents without the field
//!   never match a comparison.
//! - `exists: true` matches a present key, even one holding `null`.
//! - Order across types: missing < null < false < true < numbers < strings < arrays < objects;
//!   strings by code point; `$id` is always the last tie-breaker.

use chrono::{DateTime, Datelike, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

pub const DEFAULT_LIMIT: u32 = 50;
pub const MAX_LIMIT: u32 = 1000;
const MAX_CLAUSES: usize = 100;
const MAX_NESTING: usize = 10;
const MAX_LIST: usize = 100;

/// How large a `where` may be.
struct Limits {
    clauses: usize,
    nesting: usize,
    list: usize,
}

/// A client's `where`: each clause and value is work per row scanned.
const REQUEST: Limits = Limits {
    clauses: MAX_CLAUSES,
    nesting: MAX_NESTING,
    list: MAX_LIST,
};

/// The filter a `read` rule becomes ([`parse_rule_where`]). The rule is bounded already
/// (16 KiB, 64 levels): a rule `x in [...]` with 150 values is the admin's choice, and
/// refusing it would fail every query of every user (a newcomer found exactly that).
const RULE: Limits = Limits {
    clauses: 10_000,
    nesting: 256,
    list: 10_000,
};
/// Values in all the lists of one `where` together: each is compared with every row scanned.
const MAX_VALUES: usize = 500;
const MAX_PATH_DEPTH: usize = 32;

/// Which part of a document a clause or an order addresses.
/// A query that cannot be run: what is wrong, and the field it is about (answered as 400 with
/// `details.field`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct QueryError {
    pub message: String,
    pub field: String,
}

impl QueryError {
    fn new(message: impl Into<String>, field: impl AsRef<str>) -> Self {
        QueryError {
            message: message.into(),
            field: field.as_ref().to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Field {
    Id,
    CreatedAt,
    UpdatedAt,
    /// A dotted path into `data`, split into its keys.
    Data(Vec<String>),
}

impl Field {
    pub fn parse(raw: &str) -> Result<Field, QueryError> {
        match raw {
            "$id" => return Ok(Field::Id),
            "$created_at" => return Ok(Field::CreatedAt),
            "$updated_at" => return Ok(Field::UpdatedAt),
            _ => {}
        }
        let bad = |why: &str| QueryError::new(format!("field `{raw}` {why}"), raw);
        if raw.is_empty() {
            return Err(bad("is empty"));
        }
        let segments: Vec<String> = raw.split('.').map(str::to_string).collect();
        if segments.len() > MAX_PATH_DEPTH {
            return Err(bad("is nested too deeply"));
        }
        for s in &segments {
            if s.is_empty() {
                return Err(bad("has an empty segment"));
            }
            if s.starts_with('$') {
                return Err(bad("uses a reserved `$` name"));
            }
            if s.contains(['"', '\\']) || s.chars().any(char::is_control) {
                return Err(bad("contains a quote, backslash or control character"));
            }
            if s.len() > 256 {
                return Err(bad("has a segment longer than 256 bytes"));
            }
        }
        Ok(Field::Data(segments))
    }

    pub fn name(&self) -> String {
        match self {
            Field::Id => "$id".into(),
            Field::CreatedAt => "$created_at".into(),
            Field::UpdatedAt => "$updated_at".into(),
            Field::Data(p) => p.join("."),
        }
    }

    /// Reads this field from a document as the API shows it.
    pub fn get<'a>(&self, doc: &'a Value) -> Option<std::borrow::Cow<'a, Value>> {
        use std::borrow::Cow;
        match self {
            Field::Id => doc.get("id").map(Cow::Borrowed),
            Field::CreatedAt => doc.get("created_at").map(Cow::Borrowed),
            Field::UpdatedAt => doc.get("updated_at").map(Cow::Borrowed),
            Field::Data(path) => {
                let mut cur = doc.get("data")?;
                for key in path {
                    cur = cur.as_object()?.get(key)?;
                }
                Some(Cow::Borrowed(cur))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
    ArrayContains,
    ArrayContainsAny,
    Exists,
    StartsWith,
}

impl Op {
    fn parse(raw: &str) -> Option<Op> {
        Some(match raw {
            "==" => Op::Eq,
            "!=" => Op::Ne,
            "<" => Op::Lt,
            "<=" => Op::Le,
            ">" => Op::Gt,
            ">=" => Op::Ge,
            "in" => Op::In,
            "not-in" => Op::NotIn,
            "array-contains" => Op::ArrayContains,
            "array-contains-any" => Op::ArrayContainsAny,
            "exists" => Op::Exists,
            "starts-with" => Op::StartsWith,
            _ => return None,
        })
    }
}

/// A comparable value of a metadata field (`$created_at`/`$updated_at` are times).
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Json(Value),
    Time(DateTime<Utc>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Clause {
        field: Field,
        op: Op,
        value: Operand,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Asc,
    Desc,
}

#[derive(Debug, Clone)]
pub struct Order {
    pub field: Field,
    pub direction: Direction,
}

/// A position in a result order: the sort values of the last document seen and its id.
#[derive(Debug, Clone, PartialEq)]
pub struct Cursor {
    /// One entry per `order_by` field but `$id`: the field's value there (`None` when the
    /// document lacked it).
    pub values: Vec<Option<Value>>,
    pub id: String,
}

#[derive(Debug, Clone)]
pub struct Query {
    pub filter: Option<Filter>,
    /// The requested order, always ending with `$id`.
    pub order: Vec<Order>,
    pub limit: u32,
    /// The client's `start_after` cursor, still sealed (see `documents::cursor`).
    pub start_after: Option<String>,
    pub select: Option<Vec<Field>>,
    pub count: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    #[serde(default, rename = "where")]
    pub where_: Option<Value>,
    #[serde(default)]
    pub order_by: Option<Value>,
    #[serde(default)]
    pub limit: Option<Value>,
    #[serde(default)]
    pub start_after: Option<String>,
    #[serde(default)]
    pub select: Option<Vec<String>>,
    /// Extension: also answer the total number of matching documents (like PocketBase's
    /// `totalItems`), ignoring `limit` and cursor.
    #[serde(default)]
    pub count: bool,
}

impl Query {
    pub fn parse(req: QueryRequest) -> Result<Query, QueryError> {
        let filter = req
            .where_
            .as_ref()
            .map(parse_request_where)
            .transpose()?
            .flatten();
        let mut order = match &req.order_by {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => parse_order(v)?,
        };
        if !order.iter().any(|o| o.field == Field::Id) {
            order.push(Order {
                field: Field::Id,
                direction: Direction::Asc,
            });
        } else if order.last().map(|o| &o.field) != Some(&Field::Id) {
            return Err(QueryError::new(
                "`$id` can only be the last order_by field",
                "order_by",
            ));
        }
        let limit = match &req.limit {
            None | Some(Value::Null) => DEFAULT_LIMIT,
            Some(v) => match v.as_u64() {
                Some(n) if (1..=MAX_LIMIT as u64).contains(&n) => n as u32,
                _ => {
                    return Err(QueryError::new(
                        format!("limit must be an integer from 1 to {MAX_LIMIT}"),
                        "limit",
                    ))
                }
            },
        };
        let select = req
            .select
            .map(|fields| {
                fields
                    .iter()
                    .map(|f| match Field::parse(f)? {
                        Field::Data(p) => Ok(Field::Data(p)),
                        _ => Err(QueryError::new(
                            "select lists data fields; id and times are always returned",
                            f,
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        Ok(Query {
            filter,
            order,
            limit,
            start_after: req.start_after,
            select,
            count: req.count,
        })
    }
}

fn parse_order(v: &Value) -> Result<Vec<Order>, QueryError> {
    let bad = |msg: &str| QueryError::new(msg.to_string(), "order_by");
    let list = v
        .as_array()
        .ok_or_else(|| bad("order_by must be a list of [field, \"asc\"|\"desc\"]"))?;
    if list.len() > 8 {
        return Err(bad("order_by has more than 8 fields"));
    }
    let mut out: Vec<Order> = Vec::new();
    for entry in list {
        let (field, dir) = match entry {
            Value::String(f) => (f.as_str(), "asc"),
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(f)] => (f.as_str(), "asc"),
                [Value::String(f), Value::String(d)] => (f.as_str(), d.as_str()),
                _ => return Err(bad("each order_by entry is [field, \"asc\"|\"desc\"]")),
            },
            _ => return Err(bad("each order_by entry is [field, \"asc\"|\"desc\"]")),
        };
        let direction = match dir {
            "asc" => Direction::Asc,
            "desc" => Direction::Desc,
            _ => return Err(bad("order direction must be \"asc\" or \"desc\"")),
        };
        let field = Field::parse(field)?;
        if out.iter().any(|o| o.field == field) {
            return Err(bad("a field appears twice in order_by"));
        }
        out.push(Order { field, direction });
    }
    Ok(out)
}

/// Parses a request's `where` (see [`parse_where`]), which may also hold at most
/// [`MAX_VALUES`] values in all its lists together: a cheap-looking `where` of 100 `in`
/// clauses of 100 values each makes 10,000 comparisons per row scanned.
pub fn parse_request_where(v: &Value) -> Result<Option<Filter>, QueryError> {
    let filter = parse_where(v)?;
    fn values(f: &Filter) -> usize {
        match f {
            Filter::And(parts) | Filter::Or(parts) => parts.iter().map(values).sum(),
            Filter::Clause {
                value: Operand::Json(Value::Array(list)),
                op: Op::In | Op::NotIn | Op::ArrayContainsAny,
                ..
            } => list.len(),
            Filter::Clause { .. } => 1,
        }
    }
    if filter.as_ref().map_or(0, values) > MAX_VALUES {
        return Err(QueryError::new(
            format!("where compares with more than {MAX_VALUES} values in all"),
            "where",
        ));
    }
    Ok(filter)
}

/// Parses a `where` value: a clause, `{"and": [...]}`, `{"or": [...]}`, or a list (AND).
/// `None` when it imposes nothing (an empty list).
pub fn parse_where(v: &Value) -> Result<Option<Filter>, QueryError> {
    let mut clauses = 0;
    parse_node(v, 0, &mut clauses, &REQUEST)
}

/// Parses the `where` a read rule was turned into, within the rule's own bounds rather than
/// a request's.
pub fn parse_rule_where(v: &Value) -> Result<Option<Filter>, QueryError> {
    let mut clauses = 0;
    parse_node(v, 0, &mut clauses, &RULE)
}

fn parse_node(
    v: &Value,
    depth: usize,
    clauses: &mut usize,
    limits: &Limits,
) -> Result<Option<Filter>, QueryError> {
    if depth > limits.nesting {
        return Err(QueryError::new("where is nested too deeply", "where"));
    }
    match v {
        Value::Null => Ok(None),
        Value::Array(items) if items.first().is_some_and(Value::is_string) => {
            *clauses += 1;
            if *clauses > limits.clauses {
                return Err(QueryError::new(
                    format!("where has more than {} clauses", limits.clauses),
                    "where",
                ));
            }
            parse_clause(items, limits).map(Some)
        }
        Value::Array(items) => {
            let parts = items
                .iter()
                .map(|i| parse_node(i, depth + 1, clauses, limits))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(combine(parts.into_iter().flatten().collect(), Filter::And))
        }
        Value::Object(map) if map.len() == 1 && (map.contains_key("and") || map.contains_key("or")) => {
            let (key, items) = map.iter().next().expect("one entry");
            let items = items.as_array().ok_or_else(|| {
                QueryError::new(format!("`{key}` takes a list"), "where")
            })?;
            let parts = items
                .iter()
                .map(|i| parse_node(i, depth + 1, clauses, limits))
                .collect::<Result<Vec<_>, _>>()?;
            let parts: Vec<Filter> = parts.into_iter().flatten().collect();
            if key == "or" {
                if parts.is_empty() {
                    return Err(QueryError::new("`or` needs at least one condition", "where"));
                }
                Ok(combine(parts, Filter::Or))
            } else {
                Ok(combine(parts, Filter::And))
            }
        }
        _ => Err(QueryError::new("where must be a clause [field, op, value], {\"and\": [...]}, {\"or\": [...]} or a list", "where")),
    }
}

fn combine(mut parts: Vec<Filter>, make: fn(Vec<Filter>) -> Filter) -> Option<Filter> {
    match parts.len() {
        0 => None,
        1 => parts.pop(),
        _ => Some(make(parts)),
    }
}

fn parse_clause(items: &[Value], limits: &Limits) -> Result<Filter, QueryError> {
    let bad = |msg: String, field: &str| QueryError::new(msg, field);
    let [Value::String(field), Value::String(op), value] = items else {
        return Err(bad("a clause is [field, op, value]".into(), "where"));
    };
    let f = Field::parse(field)?;
    let op = Op::parse(op).ok_or_else(|| {
        bad(
            format!("unknown operator `{op}`; use ==, !=, <, <=, >, >=, in, not-in, array-contains, array-contains-any, exists or starts-with"),
            field,
        )
    })?;
    check_value_depth(value, 0).map_err(|_| {
        bad(
            "the value is nested too deeply or contains U+0000".into(),
            field,
        )
    })?;
    let list = |v: &Value| -> Result<Vec<Value>, QueryError> {
        let list = v
            .as_array()
            .ok_or_else(|| bad(format!("`{}` takes a list of values", op_name(op)), field))?;
        if list.is_empty() || list.len() > limits.list {
            return Err(bad(
                format!("the list has to hold 1 to {} values", limits.list),
                field,
            ));
        }
        Ok(list.clone())
    };
    let value = match op {
        Op::Exists => match value {
            Value::Bool(_) => value.clone(),
            _ => return Err(bad("`exists` takes true or false".into(), field)),
        },
        Op::StartsWith => match value {
            Value::String(s) if !s.is_empty() => value.clone(),
            _ => return Err(bad("`starts-with` takes a non-empty string".into(), field)),
        },
        Op::In | Op::NotIn | Op::ArrayContainsAny => Value::Array(list(value)?),
        Op::Lt | Op::Le | Op::Gt | Op::Ge => match value {
            Value::Number(_) | Value::String(_) | Value::Bool(_) => value.clone(),
            _ => {
                return Err(bad(
                    "ordering comparisons take a number, string or boolean".into(),
                    field,
                ))
            }
        },
        _ => value.clone(),
    };
    let value = match &f {
        Field::Data(_) => Operand::Json(value),
        Field::Id => {
            let ok = match (&op, &value) {
                (Op::Exists, _) => true,
                (Op::ArrayContains | Op::ArrayContainsAny, _) => false,
                (Op::In | Op::NotIn, Value::Array(l)) => l.iter().all(Value::is_string),
                (_, v) => v.is_string(),
            };
            if !ok {
                return Err(bad("`$id` compares with strings".into(), field));
            }
            Operand::Json(value)
        }
        Field::CreatedAt | Field::UpdatedAt => {
            let time = |v: &Value| -> Result<DateTime<Utc>, QueryError> {
                let s = v.as_str().ok_or_else(|| {
                    bad(
                        format!("`{}` compares with RFC 3339 times", f.name()),
                        field,
                    )
                })?;
                let t = DateTime::parse_from_rfc3339(s)
                    .map_err(|_| bad(format!("`{s}` is not an RFC 3339 time"), field))?
                    .with_timezone(&Utc);
                // An offset can move a valid-looking time out of the years 0000–9999 that
                // stored times (fixed-width RFC 3339 text) can be compared with.
                if !(0..=9999).contains(&t.year()) {
                    return Err(bad(
                        format!("`{s}` is outside the years 0000 to 9999 in UTC"),
                        field,
                    ));
                }
                Ok(t)
            };
            let text =
                |t: DateTime<Utc>| json!(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
            match op {
                Op::Exists => Operand::Json(value),
                Op::In | Op::NotIn => Operand::Json(Value::Array(
                    value
                        .as_array()
                        .expect("checked list")
                        .iter()
                        .map(|v| time(v).map(text))
                        .collect::<Result<_, _>>()?,
                )),
                Op::ArrayContains | Op::ArrayContainsAny | Op::StartsWith => {
                    return Err(bad(
                        format!("`{}` cannot be used with `{}`", op_name(op), f.name()),
                        field,
                    ))
                }
                _ => Operand::Time(time(&value)?),
            }
        }
    };
    Ok(Filter::Clause {
        field: f,
        op,
        value,
    })
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Eq => "==",
        Op::Ne => "!=",
        Op::Lt => "<",
        Op::Le => "<=",
        Op::Gt => ">",
        Op::Ge => ">=",
        Op::In => "in",
        Op::NotIn => "not-in",
        Op::ArrayContains => "array-contains",
        Op::ArrayContainsAny => "array-contains-any",
        Op::Exists => "exists",
        Op::StartsWith => "starts-with",
    }
}

fn check_value_depth(v: &Value, depth: usize) -> Result<(), ()> {
    if depth > 32 {
        return Err(());
    }
    match v {
        // Never stored, so never matched; PostgreSQL cannot even compare it.
        Value::String(s) if s.contains('\0') => Err(()),
        Value::Array(a) => a.iter().try_for_each(|x| check_value_depth(x, depth + 1)),
        Value::Object(o) => o.values().try_for_each(|x| check_value_depth(x, depth + 1)),
        _ => Ok(()),
    }
}

/// The rank of a value's type in the cross-type order (missing is 0).
pub fn type_rank(v: Option<&Value>) -> u8 {
    match v {
        None => 0,
        Some(Value::Null) => 1,
        Some(Value::Bool(false)) => 2,
        Some(Value::Bool(true)) => 3,
        Some(Value::Number(_)) => 4,
        Some(Value::String(_)) => 5,
        Some(Value::Array(_)) => 6,
        Some(Value::Object(_)) => 7,
    }
}

/// The cross-type order of API.md, for values compared in Rust (aggregates, rule filtering).
pub fn compare_values(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (ra, rb) = (type_rank(a), type_rank(b));
    if ra != rb {
        return ra.cmp(&rb);
    }
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .unwrap_or(0.0)
            .partial_cmp(&y.as_f64().unwrap_or(0.0))
            .unwrap_or(Ordering::Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(x @ (Value::Array(_) | Value::Object(_))), Some(y)) => {
            x.to_string().cmp(&y.to_string())
        }
        _ => Ordering::Equal,
    }
}

/// Whether a document (as the API shows it) matches a filter, with the same semantics as the
/// SQL translation. Used where rows are checked in Rust.
pub fn matches(filter: &Filter, doc: &Value) -> bool {
    match filter {
        Filter::And(parts) => parts.iter().all(|p| matches(p, doc)),
        Filter::Or(parts) => parts.iter().any(|p| matches(p, doc)),
        Filter::Clause { field, op, value } => {
            let actual = field.get(doc);
            let actual = actual.as_deref();
            let value = match value {
                Operand::Json(v) => v.clone(),
                Operand::Time(t) => json!(t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
            };
            let same = |a: &Value, b: &Value| {
                type_rank(Some(a)) == type_rank(Some(b)) || (a.is_boolean() && b.is_boolean())
            };
            let equal =
                |a: &Value, b: &Value| same(a, b) && compare_values(Some(a), Some(b)).is_eq();
            match op {
                Op::Exists => actual.is_some() == value.as_bool().unwrap_or(false),
                Op::Eq => actual.is_some_and(|a| equal(a, &value)),
                Op::Ne => actual.is_some_and(|a| !equal(a, &value)),
                Op::Lt | Op::Le | Op::Gt | Op::Ge => actual.is_some_and(|a| {
                    if !same(a, &value) {
                        return false;
                    }
                    let ord = compare_values(Some(a), Some(&value));
                    match op {
                        Op::Lt => ord.is_lt(),
                        Op::Le => ord.is_le(),
                        Op::Gt => ord.is_gt(),
                        _ => ord.is_ge(),
                    }
                }),
                Op::In => actual.is_some_and(|a| {
                    value
                        .as_array()
                        .is_some_and(|l| l.iter().any(|v| equal(a, v)))
                }),
                Op::NotIn => actual.is_some_and(|a| {
                    value
                        .as_array()
                        .is_some_and(|l| !l.iter().any(|v| equal(a, v)))
                }),
                Op::ArrayContains => actual
                    .and_then(Value::as_array)
                    .is_some_and(|arr| arr.iter().any(|e| equal(e, &value))),
                Op::ArrayContainsAny => actual.and_then(Value::as_array).is_some_and(|arr| {
                    value
                        .as_array()
                        .is_some_and(|l| arr.iter().any(|e| l.iter().any(|v| equal(e, v))))
                }),
                Op::StartsWith => match (actual, value.as_str()) {
                    (Some(Value::String(s)), Some(p)) => s.starts_with(p),
                    _ => false,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: Value) -> Result<Query, QueryError> {
        Query::parse(serde_json::from_value(v).unwrap())
    }

    #[test]
    fn where_forms_parse_to_one_tree() {
        let a = q(json!({"where": ["n", ">=", 1]})).unwrap();
        assert!(matches!(a.filter, Some(Filter::Clause { op: Op::Ge, .. })));
        let b = q(json!({"where": [["n", ">=", 1], {"or": [["t", "==", "a"], ["t", "==", "b"]]}]}))
            .unwrap();
        let Some(Filter::And(parts)) = b.filter else {
            panic!()
        };
        assert!(matches!(parts[1], Filter::Or(_)));
        assert!(q(json!({"where": []})).unwrap().filter.is_none());
        assert_eq!(b.order.last().unwrap().field, Field::Id);
    }

    #[test]
    fn hostile_fields_and_operators_are_refused() {
        for bad in [
            json!({"where": ["a.$b", "==", 1]}),
            json!({"where": ["a\"); DROP TABLE documents; --", "==", 1]}),
            json!({"where": ["", "==", 1]}),
            json!({"where": ["a..b", "==", 1]}),
            json!({"where": ["a", "LIKE", "%"]}),
            json!({"where": ["a", "in", []]}),
            json!({"where": ["a", "<", [1]]}),
            json!({"where": ["$created_at", ">", "yesterday"]}),
            json!({"where": ["$created_at", "<", "0000-01-01T00:00:00+01:00"]}),
            json!({"where": ["$updated_at", ">", "9999-12-31T23:59:59-01:00"]}),
            json!({"where": ["$updated_at", "in", ["9999-12-31T23:59:59-01:00"]]}),
            json!({"where": {"xor": []}}),
            json!({"limit": 0}),
            json!({"limit": 1001}),
            json!({"order_by": [["a", "sideways"]]}),
        ] {
            assert!(q(bad.clone()).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn rust_matching_is_type_strict() {
        let doc = json!({"id": "x", "data": {"n": 5, "s": "5", "b": true, "tags": ["a", 1]}});
        let f = |w: Value| parse_where(&w).unwrap().unwrap();
        assert!(matches(&f(json!(["n", "==", 5.0])), &doc));
        assert!(!matches(&f(json!(["s", "==", 5])), &doc));
        assert!(!matches(&f(json!(["b", "==", 1])), &doc));
        assert!(matches(&f(json!(["s", "!=", 5])), &doc));
        assert!(!matches(&f(json!(["missing", "!=", 5])), &doc));
        assert!(matches(&f(json!(["tags", "array-contains", 1])), &doc));
        assert!(!matches(&f(json!(["tags", "array-contains", "1"])), &doc));
        assert!(!matches(&f(json!(["s", "<", 10])), &doc));
    }
}
