//! Translates the document query AST (`crate::query`) into SQL for SQLite or PostgreSQL.
//! Every value and every field path from a request is a bound parameter. The one exception is
//! a path the collection declared an index on (validated at `PUT` to `[A-Za-z0-9_-]` keys):
//! it is written as the same literal the index was created with, because both databases only
//! match an expression index against an identical expression.

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::query::{type_rank, Cursor, Direction, Field, Filter, Op, Operand, Order};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A bound parameter.
#[derive(Debug, Clone)]
pub enum Bind {
    Text(String),
    Int(i64),
    Real(f64),
    /// A JSON value (SQLite: its compact text; PostgreSQL: `jsonb`).
    Json(Value),
    Time(DateTime<Utc>),
    /// A PostgreSQL `text[]` path.
    Path(Vec<String>),
}

/// Whether a key may be written literally into an index expression.
pub fn is_index_safe_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The expression an index on `path` is built on (and that queries must repeat verbatim).
/// Only for paths whose keys pass [`is_index_safe_key`].
pub fn index_expression(dialect: Dialect, path: &[String]) -> String {
    match dialect {
        Dialect::Sqlite => format!("json_extract(data, '{}')", sqlite_path(path)),
        Dialect::Postgres => format!("(data #> '{{{}}}')", path.join(",")),
    }
}

/// The `CREATE INDEX` statements of declared index number `n` of `collection`: a composite
/// `(collection, fields…, id)` the planner uses with a bound collection and whose trailing
/// `id` serves the default order, and for a unique index a partial one scoped to the
/// collection (the collection name matched `[a-z0-9][a-z0-9_-]*` before it got here).
pub fn create_index_sql(
    dialect: Dialect,
    collection: &str,
    n: usize,
    index: &super::IndexSpec,
) -> Vec<String> {
    let prefix = super::index_prefix(collection);
    let exprs: Vec<String> = index
        .fields
        .iter()
        .map(|(path, desc)| {
            format!(
                "{}{}",
                index_expression(dialect, path),
                if *desc { " DESC" } else { "" }
            )
        })
        .collect();
    let mut statements = vec![format!(
        "CREATE INDEX \"{prefix}{n}\" ON documents (collection, {}, id)",
        exprs.join(", ")
    )];
    if index.unique {
        statements.push(format!(
            "CREATE UNIQUE INDEX \"{prefix}{n}_unique\" ON documents ({}) WHERE collection = '{collection}'",
            exprs.join(", ")
        ));
    }
    statements
}

fn sqlite_path(path: &[String]) -> String {
    let mut p = String::from("$");
    for key in path {
        p.push_str(".\"");
        p.push_str(key);
        p.push('"');
    }
    p
}

pub struct SqlBuilder<'a> {
    pub dialect: Dialect,
    pub binds: Vec<Bind>,
    indexed: &'a [Vec<String>],
}

/// The expressions for one data path.
struct PathExprs {
    /// The value (SQLite: `json_extract`; PostgreSQL: the `jsonb` at the path).
    value: String,
    /// SQLite: `json_type(...)`; PostgreSQL: `jsonb_typeof(...)`. NULL when the key is absent.
    kind: String,
    /// PostgreSQL only: the value as text (`#>>`).
    text: String,
    /// The argument naming the path, for `json_each` (SQLite).
    path_arg: String,
}

impl<'a> SqlBuilder<'a> {
    pub fn new(dialect: Dialect, indexed: &'a [Vec<String>]) -> Self {
        SqlBuilder {
            dialect,
            binds: Vec::new(),
            indexed,
        }
    }

    /// Binds a parameter and returns its placeholder.
    pub fn bind(&mut self, value: Bind) -> String {
        self.binds.push(value);
        let n = self.binds.len();
        match self.dialect {
            Dialect::Sqlite => format!("?{n}"),
            Dialect::Postgres => match self.binds.last() {
                Some(Bind::Json(_)) => format!("${n}::jsonb"),
                Some(Bind::Path(_)) => format!("${n}::text[]"),
                Some(Bind::Text(_)) => format!("${n}::text"),
                _ => format!("${n}"),
            },
        }
    }

    fn path(&mut self, path: &[String]) -> PathExprs {
        let literal = self.indexed.iter().any(|p| p.as_slice() == path)
            && path.iter().all(|k| is_index_safe_key(k));
        match self.dialect {
            Dialect::Sqlite => {
                let arg = if literal {
                    format!("'{}'", sqlite_path(path))
                } else {
                    self.bind(Bind::Text(sqlite_path(path)))
                };
                PathExprs {
                    value: format!("json_extract(data, {arg})"),
                    kind: format!("json_type(data, {arg})"),
                    text: String::new(),
                    path_arg: arg,
                }
            }
            Dialect::Postgres => {
                let arg = if literal {
                    format!("'{{{}}}'", path.join(","))
                } else {
                    self.bind(Bind::Path(path.to_vec()))
                };
                PathExprs {
                    value: format!("(data #> {arg})"),
                    kind: format!("jsonb_typeof(data #> {arg})"),
                    text: format!("(data #>> {arg})"),
                    path_arg: arg,
                }
            }
        }
    }

    /// SQLite: a condition that `kind` (a `json_type` result) is the type of `v`.
    fn sqlite_type_is(kind: &str, v: &Value) -> String {
        match v {
            Value::Null => format!("{kind} = 'null'"),
            Value::Bool(true) => format!("{kind} = 'true'"),
            Value::Bool(false) => format!("{kind} = 'false'"),
            Value::Number(_) => format!("{kind} IN ('integer', 'real')"),
            Value::String(_) => format!("{kind} = 'text'"),
            Value::Array(_) => format!("{kind} = 'array'"),
            Value::Object(_) => format!("{kind} = 'object'"),
        }
    }

    /// SQLite: binds `v` the way `json_extract` returns it.
    fn sqlite_scalar(&mut self, v: &Value) -> String {
        match v {
            Value::Number(n) => match n.as_i64() {
                Some(i) => self.bind(Bind::Int(i)),
                None => self.bind(Bind::Real(n.as_f64().unwrap_or(0.0))),
            },
            Value::String(s) => self.bind(Bind::Text(s.clone())),
            Value::Bool(b) => self.bind(Bind::Int(*b as i64)),
            other => self.bind(Bind::Text(other.to_string())),
        }
    }

    /// SQLite: `value`/`kind` (a JSON value and its `json_type`) equal `v`, type-strictly.
    fn sqlite_equal(&mut self, value: &str, kind: &str, v: &Value) -> String {
        let ty = Self::sqlite_type_is(kind, v);
        match v {
            Value::Null | Value::Bool(_) => ty,
            _ => {
                let p = self.sqlite_scalar(v);
                format!("({value} = {p} AND {ty})")
            }
        }
    }

    fn data_clause(&mut self, path: &[String], op: Op, v: &Value) -> String {
        let e = self.path(path);
        match self.dialect {
            Dialect::Sqlite => match op {
                Op::Exists => {
                    if v.as_bool() == Some(true) {
                        format!("{} IS NOT NULL", e.kind)
                    } else {
                        format!("{} IS NULL", e.kind)
                    }
                }
                Op::Eq => self.sqlite_equal(&e.value, &e.kind, v),
                Op::Ne => {
                    let eq = self.sqlite_equal(&e.value, &e.kind, v);
                    format!("({} IS NOT NULL AND NOT {eq})", e.kind)
                }
                Op::Lt | Op::Le | Op::Gt | Op::Ge => {
                    let ty = Self::sqlite_type_is(&e.kind, v);
                    let ty = if v.is_boolean() {
                        format!("{} IN ('true', 'false')", e.kind)
                    } else {
                        ty
                    };
                    let p = self.sqlite_scalar(v);
                    format!("({} {} {p} AND {ty})", e.value, cmp_sql(op))
                }
                Op::In | Op::NotIn => {
                    let list = v.as_array().cloned().unwrap_or_default();
                    let parts: Vec<String> = list
                        .iter()
                        .map(|x| self.sqlite_equal(&e.value, &e.kind, x))
                        .collect();
                    let any = balanced(parts, "OR");
                    if op == Op::In {
                        any
                    } else {
                        format!("({} IS NOT NULL AND NOT {any})", e.kind)
                    }
                }
                Op::ArrayContains | Op::ArrayContainsAny => {
                    let list = if op == Op::ArrayContains {
                        vec![v.clone()]
                    } else {
                        v.as_array().cloned().unwrap_or_default()
                    };
                    let parts: Vec<String> = list
                        .iter()
                        .map(|x| self.sqlite_equal("je.value", "je.type", x))
                        .collect();
                    format!(
                        "({} = 'array' AND EXISTS (SELECT 1 FROM json_each(data, {}) AS je WHERE {}))",
                        e.kind,
                        e.path_arg,
                        balanced(parts, "OR")
                    )
                }
                Op::StartsWith => {
                    let p = self.bind(Bind::Text(v.as_str().unwrap_or_default().to_string()));
                    format!(
                        "({} = 'text' AND substr({}, 1, length({p})) = {p})",
                        e.kind, e.value
                    )
                }
            },
            Dialect::Postgres => match op {
                Op::Exists => {
                    if v.as_bool() == Some(true) {
                        format!("{} IS NOT NULL", e.value)
                    } else {
                        format!("{} IS NULL", e.value)
                    }
                }
                Op::Eq => {
                    let p = self.bind(Bind::Json(v.clone()));
                    format!("{} = {p}", e.value)
                }
                Op::Ne => {
                    let p = self.bind(Bind::Json(v.clone()));
                    format!("({} IS NOT NULL AND {} <> {p})", e.value, e.value)
                }
                Op::Lt | Op::Le | Op::Gt | Op::Ge => match v {
                    Value::String(s) => {
                        let p = self.bind(Bind::Text(s.clone()));
                        format!(
                            "({} = 'string' AND {} COLLATE \"C\" {} {p})",
                            e.kind,
                            e.text,
                            cmp_sql(op)
                        )
                    }
                    _ => {
                        let ty = if v.is_boolean() { "boolean" } else { "number" };
                        let p = self.bind(Bind::Json(v.clone()));
                        format!("({} = '{ty}' AND {} {} {p})", e.kind, e.value, cmp_sql(op))
                    }
                },
                Op::In | Op::NotIn => {
                    let list = v.as_array().cloned().unwrap_or_default();
                    let ps: Vec<String> =
                        list.into_iter().map(|x| self.bind(Bind::Json(x))).collect();
                    if op == Op::In {
                        format!("{} IN ({})", e.value, ps.join(", "))
                    } else {
                        format!(
                            "({} IS NOT NULL AND {} NOT IN ({}))",
                            e.value,
                            e.value,
                            ps.join(", ")
                        )
                    }
                }
                Op::ArrayContains | Op::ArrayContainsAny => {
                    let list = if op == Op::ArrayContains {
                        vec![v.clone()]
                    } else {
                        v.as_array().cloned().unwrap_or_default()
                    };
                    let ps: Vec<String> =
                        list.into_iter().map(|x| self.bind(Bind::Json(x))).collect();
                    format!(
                        "(CASE WHEN {kind} = 'array' THEN EXISTS (SELECT 1 FROM jsonb_array_elements({val}) AS je(v) WHERE je.v IN ({list})) ELSE false END)",
                        kind = e.kind,
                        val = e.value,
                        list = ps.join(", ")
                    )
                }
                Op::StartsWith => {
                    let p = self.bind(Bind::Text(v.as_str().unwrap_or_default().to_string()));
                    format!(
                        "({} = 'string' AND left({}, length({p})) = {p})",
                        e.kind, e.text
                    )
                }
            },
        }
    }

    /// A metadata column compared with a string or time.
    fn meta_clause(&mut self, column: &str, is_time: bool, op: Op, value: &Operand) -> String {
        let bind_one = |b: &mut Self, v: &Value| -> String {
            if is_time {
                let t = v
                    .as_str()
                    .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                    .map(|t| t.with_timezone(&Utc))
                    .unwrap_or_default();
                b.bind_time(t)
            } else {
                b.bind(Bind::Text(v.as_str().unwrap_or_default().to_string()))
            }
        };
        let col = if self.dialect == Dialect::Postgres && !is_time {
            format!("{column} COLLATE \"C\"")
        } else {
            column.to_string()
        };
        match (op, value) {
            (Op::Exists, Operand::Json(v)) => {
                if v.as_bool() == Some(true) {
                    "TRUE".into()
                } else {
                    "FALSE".into()
                }
            }
            (Op::In | Op::NotIn, Operand::Json(Value::Array(list))) => {
                let ps: Vec<String> = list.iter().map(|v| bind_one(self, v)).collect();
                let not = if op == Op::NotIn { "NOT " } else { "" };
                format!("{column} {not}IN ({})", ps.join(", "))
            }
            (Op::StartsWith, Operand::Json(v)) => {
                let p = bind_one(self, v);
                match self.dialect {
                    Dialect::Sqlite => format!("substr({column}, 1, length({p})) = {p}"),
                    Dialect::Postgres => format!("left({column}, length({p})) = {p}"),
                }
            }
            (_, Operand::Time(t)) => {
                let p = self.bind_time(*t);
                format!("{column} {} {p}", cmp_sql(op))
            }
            (_, Operand::Json(v)) => {
                let p = bind_one(self, v);
                format!("{col} {} {p}", cmp_sql(op))
            }
        }
    }

    fn bind_time(&mut self, t: DateTime<Utc>) -> String {
        match self.dialect {
            Dialect::Sqlite => self.bind(Bind::Text(super::sqlite::ts(&t))),
            Dialect::Postgres => self.bind(Bind::Time(t)),
        }
    }

    /// The SQL condition for a filter tree.
    pub fn filter(&mut self, filter: &Filter) -> String {
        match filter {
            Filter::And(parts) => {
                let parts: Vec<String> = parts.iter().map(|p| self.filter(p)).collect();
                balanced(parts, "AND")
            }
            Filter::Or(parts) => {
                let parts: Vec<String> = parts.iter().map(|p| self.filter(p)).collect();
                balanced(parts, "OR")
            }
            Filter::Clause { field, op, value } => match field {
                Field::Data(path) => match value {
                    Operand::Json(v) => self.data_clause(path, *op, v),
                    Operand::Time(_) => "FALSE".into(),
                },
                Field::Id => self.meta_clause("id", false, *op, value),
                Field::CreatedAt => self.meta_clause("created_at", true, *op, value),
                Field::UpdatedAt => self.meta_clause("updated_at", true, *op, value),
            },
        }
    }

    /// The cross-type rank expression of a data path (see `query::type_rank`).
    fn rank(&self, e: &PathExprs) -> String {
        match self.dialect {
            Dialect::Sqlite => format!(
                "(CASE {} WHEN 'null' THEN 1 WHEN 'false' THEN 2 WHEN 'true' THEN 3 WHEN 'integer' THEN 4 \
                 WHEN 'real' THEN 4 WHEN 'text' THEN 5 WHEN 'array' THEN 6 WHEN 'object' THEN 7 ELSE 0 END)",
                e.kind
            ),
            Dialect::Postgres => format!(
                "(CASE {kind} WHEN 'null' THEN 1 WHEN 'boolean' THEN (CASE WHEN {val} = 'true'::jsonb THEN 3 ELSE 2 END) \
                 WHEN 'number' THEN 4 WHEN 'string' THEN 5 WHEN 'array' THEN 6 WHEN 'object' THEN 7 ELSE 0 END)",
                kind = e.kind,
                val = e.value
            ),
        }
    }

    /// The expressions a data path sorts by after its rank.
    fn sort_values(&self, e: &PathExprs) -> Vec<String> {
        match self.dialect {
            Dialect::Sqlite => vec![e.value.clone()],
            Dialect::Postgres => vec![
                format!("(CASE WHEN {} = 'number' THEN {} END)", e.kind, e.value),
                format!(
                    "(CASE WHEN {} <> 'number' THEN {} END) COLLATE \"C\"",
                    e.kind, e.text
                ),
            ],
        }
    }

    /// `ORDER BY` terms for the query's order. With `filter_first` (SQLite only), `$id` is
    /// written `+id` so that no index can supply the order and the planner cannot choose to
    /// walk the primary key in id order testing every row.
    pub fn order_by(&mut self, order: &[Order], filter_first: bool) -> String {
        let mut terms = Vec::new();
        for o in order {
            let dir = match o.direction {
                Direction::Asc => "ASC",
                Direction::Desc => "DESC",
            };
            match &o.field {
                Field::Id if filter_first && self.dialect == Dialect::Sqlite => {
                    terms.push(format!("+id {dir}"))
                }
                Field::Id => terms.push(format!("{} {dir}", self.id_col())),
                Field::CreatedAt => terms.push(format!("created_at {dir}")),
                Field::UpdatedAt => terms.push(format!("updated_at {dir}")),
                Field::Data(path) => {
                    let e = self.path(path);
                    terms.push(format!("{} {dir}", self.rank(&e)));
                    for v in self.sort_values(&e) {
                        terms.push(format!("{v} {dir}"));
                    }
                }
            }
        }
        terms.join(", ")
    }

    fn id_col(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "id",
            Dialect::Postgres => "id COLLATE \"C\"",
        }
    }

    /// The condition "comes after `cursor` in `order`" (keyset pagination): stable while
    /// documents are inserted, since it depends only on sort values, never on offsets.
    pub fn after(&mut self, order: &[Order], cursor: &Cursor) -> String {
        // For each position i: all earlier keys equal AND key i strictly after.
        let mut equal_so_far: Vec<String> = Vec::new();
        let mut alternatives: Vec<String> = Vec::new();
        let mut values = cursor.values.iter();
        for o in order {
            let (eq, after) = match &o.field {
                Field::Id => {
                    let p = self.bind(Bind::Text(cursor.id.clone()));
                    let col = self.id_col();
                    let cmp = if o.direction == Direction::Asc {
                        ">"
                    } else {
                        "<"
                    };
                    (format!("{col} = {p}"), format!("{col} {cmp} {p}"))
                }
                Field::CreatedAt | Field::UpdatedAt => {
                    let col = if o.field == Field::CreatedAt {
                        "created_at"
                    } else {
                        "updated_at"
                    };
                    let v = values.next().cloned().flatten();
                    let t = v
                        .as_ref()
                        .and_then(Value::as_str)
                        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                        .map(|t| t.with_timezone(&Utc))
                        .unwrap_or_default();
                    let p = self.bind_time(t);
                    let cmp = if o.direction == Direction::Asc {
                        ">"
                    } else {
                        "<"
                    };
                    (format!("{col} = {p}"), format!("{col} {cmp} {p}"))
                }
                Field::Data(path) => {
                    let v = values.next().cloned().flatten();
                    let e = self.path(path);
                    let rank = self.rank(&e);
                    let r0 = type_rank(v.as_ref());
                    let cmp = if o.direction == Direction::Asc {
                        ">"
                    } else {
                        "<"
                    };
                    let value_cmp = match &v {
                        Some(
                            v @ (Value::Number(_)
                            | Value::String(_)
                            | Value::Array(_)
                            | Value::Object(_)),
                        ) => Some(self.sort_value_compare(&e, v)),
                        _ => None,
                    };
                    match value_cmp {
                        Some((lhs, p)) => (
                            format!("({rank} = {r0} AND {lhs} = {p})"),
                            format!("({rank} {cmp} {r0} OR ({rank} = {r0} AND {lhs} {cmp} {p}))"),
                        ),
                        None => (format!("{rank} = {r0}"), format!("{rank} {cmp} {r0}")),
                    }
                }
            };
            let mut alt = equal_so_far.clone();
            alt.push(after);
            alternatives.push(format!("({})", alt.join(" AND ")));
            equal_so_far.push(eq);
        }
        format!("({})", alternatives.join(" OR "))
    }

    /// The expression to compare a cursor value `v` with, and its bound placeholder.
    fn sort_value_compare(&mut self, e: &PathExprs, v: &Value) -> (String, String) {
        match self.dialect {
            Dialect::Sqlite => {
                let p = self.sqlite_scalar(v);
                (e.value.clone(), p)
            }
            Dialect::Postgres => match v {
                Value::Number(_) => {
                    let p = self.bind(Bind::Json(v.clone()));
                    (e.value.clone(), p)
                }
                Value::String(s) => {
                    let p = self.bind(Bind::Text(s.clone()));
                    (format!("{} COLLATE \"C\"", e.text), p)
                }
                other => {
                    // Arrays and objects sort by their text as PostgreSQL prints it.
                    let p = self.bind(Bind::Json(other.clone()));
                    (format!("{} COLLATE \"C\"", e.text), format!("({p})::text"))
                }
            },
        }
    }

    /// Numeric aggregate of a data path: `sum` and the count of numeric values.
    pub fn numeric(&mut self, path: &[String]) -> (String, String) {
        let e = self.path(path);
        match self.dialect {
            Dialect::Sqlite => (
                // total(): always a double, never an integer overflow (SUM() fails on one).
                format!(
                    "TOTAL(CASE WHEN {} IN ('integer', 'real') THEN {} END)",
                    e.kind, e.value
                ),
                format!(
                    "COUNT(CASE WHEN {} IN ('integer', 'real') THEN 1 END)",
                    e.kind
                ),
            ),
            Dialect::Postgres => (
                // Exact, as text: a cast to float8 fails past a double's range (quoting the
                // sum); the caller reads it as a double, infinite when out of range.
                format!(
                    "SUM(CASE WHEN {} = 'number' THEN ({})::numeric END)::text",
                    e.kind, e.text
                ),
                format!("COUNT(CASE WHEN {} = 'number' THEN 1 END)", e.kind),
            ),
        }
    }
}

/// `(a OP b OP c …)` as a balanced tree of parenthesised halves. SQLite parses a flat chain
/// into a tree as deep as it is long and refuses one deeper than 1000 ("Expression tree is
/// too large"): a read rule listing 1000 values failed every query with a 500. Balanced, a
/// chain of n terms is log2(n) deep.
fn balanced(mut parts: Vec<String>, op: &str) -> String {
    const FLAT: usize = 64;
    if parts.len() <= FLAT {
        return format!("({})", parts.join(&format!(" {op} ")));
    }
    let right = parts.split_off(parts.len() / 2);
    format!("({} {op} {})", balanced(parts, op), balanced(right, op))
}

/// `WHERE` for a scan: the collection, its filter and (when `with_cursor`) its start position.
pub fn scan_where(b: &mut SqlBuilder<'_>, scan: &super::Scan<'_>, with_cursor: bool) -> String {
    let c = b.bind(Bind::Text(scan.collection.to_string()));
    let mut sql = format!("collection = {c}");
    if let Some(filter) = scan.filter {
        sql.push_str(" AND ");
        sql.push_str(&b.filter(filter));
    }
    if with_cursor {
        if let Some(after) = scan.after {
            sql.push_str(" AND ");
            sql.push_str(&b.after(scan.order, after));
        }
    }
    sql
}

/// `SELECT COUNT(*), SUM(..), COUNT(numeric ..) ... FROM {from} WHERE ...` for
/// `aggregate_numbers`: the count, then a (sum, count of numbers) pair per path.
pub fn aggregate_sql(
    b: &mut SqlBuilder<'_>,
    scan: &super::Scan<'_>,
    paths: &[Vec<String>],
    from: &str,
) -> String {
    let mut columns = vec!["COUNT(*)".to_string()];
    for path in paths {
        let (sum, count) = b.numeric(path);
        columns.push(sum);
        columns.push(count);
    }
    let where_sql = scan_where(b, scan, false);
    format!(
        "SELECT {} FROM {from} WHERE {where_sql}",
        columns.join(", ")
    )
}

fn cmp_sql(op: Op) -> &'static str {
    match op {
        Op::Eq => "=",
        Op::Ne => "<>",
        Op::Lt => "<",
        Op::Le => "<=",
        Op::Gt => ">",
        Op::Ge => ">=",
        _ => "=",
    }
}
