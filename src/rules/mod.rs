//! Access rules: compiling CEL rule text, evaluating it against one request, and turning a
//! `read` rule into a query filter ("pushdown") so a query over a large collection is
//! answered by an index instead of a scan and a per-row check.
//!
//! This module owns the rule language and nothing else: it never touches SQL, HTTP or the
//! store. Collections (`read`, `create`, `update`, `delete`) and buckets (`read`, `write`,
//! `delete`) both store compiled [`Rule`]s; the caller keeps them (a `Rule` is an `Arc`, cheap
//! to clone and share across threads) and decides that a missing rule denies.
//!
//! # API
//! - [`Rule::compile`]`(source) -> Result<Rule, RuleCompileError>`: bound the rule's size and
//!   depth ([`limits`]), parse, and check that only `auth`, `resource`, `request`,
//!   `get(collection, id)`, `exists(collection, id)` and the listed builtins are used. Errors
//!   carry a 1-based `line` and `column`. An empty rule is an error, never "allow".
//! - [`Rule::evaluate`]`(&input, &lookup) -> Result<bool, RuleEvalError>`: `Ok(true)` only when
//!   the rule yields the bool `true`. A CEL runtime error (`auth.uid` with `auth == null`, a
//!   missing field, mixed-type ordering, …) or a non-bool result is `Ok(false)`: that is a
//!   normal deny. `Err` means the rule could not be decided (a lookup failed or more than
//!   [`MAX_LOOKUPS`] documents were needed); the caller must deny and should log it.
//!   Evaluation is synchronous: run it inside `tokio::task::block_in_place` when the
//!   [`DocumentLookup`] blocks on the database.
//! - [`Rule::pushdown`]`(auth, now) -> Pushdown`: see [`Pushdown`].
//!
//! # Semantics
//! The `cel` crate evaluates the whole expression, and it follows the CEL specification where
//! rules depend on it (`conformance.rs` pins each point, so an upgrade that breaks one fails
//! the tests): `&&` and `||` need bools and are commutative over errors, so
//! `resource.data.public == true || resource.data.owner == auth.uid` admits a document that
//! has no `public` field; `!` and `?:` need bools; `in` is list membership or a map key test,
//! never a substring test; even runs of `!` or unary `-` cancel (`!!false` is `false`); a
//! missing key is an error whatever its name. `resource.created_at` and
//! `resource.updated_at` are CEL timestamps (compare with `request.time`); `request.time` is
//! the request's time; JSON integers are `int`, other numbers `double`, and `1 == 1.0` is true.
//!
//! # Filter assumptions
//! A [`Pushdown::Filter`] is in the public `where` syntax (API.md § Documents) and is exactly
//! the set of documents the rule admits, given these query-engine semantics: `==`, `<`, `<=`,
//! `>`, `>=`, `in` and `array-contains` match values of the same JSON type only (numbers are one
//! type); `[f, "exists", true]` matches when the key is present, even with a `null` value, and
//! `false` when it is absent; `!=` is emitted only for `$id`, `$created_at` and `$updated_at`,
//! which always exist with one type; `$created_at`/`$updated_at` values are RFC 3339 UTC
//! strings compared as times.

pub mod budget;
mod check;
#[cfg(test)]
mod conformance;
mod eval;
pub mod limits;
mod panics;
mod pushdown;
mod value;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use cel::common::ast::{Expr, IdedExpr, LiteralValue};
use cel::parser::PrattParser;
use cel::Value;
use chrono::{DateTime, Utc};
use serde_json::Value as Json;

pub(crate) use limits::json_depth;
pub use limits::{MAX_DEPTH, MAX_NESTING, MAX_RULE_BYTES, MAX_VALUE_DEPTH};
pub use pushdown::Pushdown;

/// How many distinct documents `get()`/`exists()` may read in one evaluation. Bounds the cost
/// an author (or a hostile document feeding ids into `get`) can impose per request or row.
pub const MAX_LOOKUPS: usize = 10;

/// A compiled rule. Cloning shares the parsed program.
#[derive(Clone)]
pub struct Rule {
    inner: Arc<Compiled>,
}

struct Compiled {
    source: String,
    /// The rule as parsed, for pushdown and [`Rule::constant`].
    expr: IdedExpr,
    /// The same, with the per-iteration [`budget`] checks in its loops, for evaluation.
    program: IdedExpr,
    /// Whether the rule has loops (macros) or regular expressions: the rules that can take
    /// long.
    slow: bool,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Rule").field(&self.inner.source).finish()
    }
}

/// A rule that does not compile, with the 1-based position of the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (line {line}, column {column})")]
pub struct RuleCompileError {
    pub message: String,
    pub line: usize,
    pub column: usize,
}

impl RuleCompileError {
    pub(crate) fn new(message: impl Into<String>, line: usize, column: usize) -> Self {
        Self {
            message: message.into(),
            line: line.max(1),
            column: column.max(1),
        }
    }
}

/// Evaluation could not decide; the caller must deny.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleEvalError {
    #[error("rule reads more than {limit} documents with get()/exists()")]
    TooManyLookups { limit: usize },
    #[error("get()/exists() failed: {0}")]
    Lookup(String),
    #[error("rule evaluation ran out of time")]
    OutOfTime,
}

/// The signed-in caller as rules see it (`auth`); `None` in [`RuleInput`] is CEL `null`.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthInfo {
    pub uid: String,
    pub role: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub is_anonymous: bool,
    /// Custom claims set by admins; a JSON object (anything else is seen as `{}`).
    pub claims: Json,
}

/// `request`: the method, the request time and, for writes, the document data after the write.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestInfo {
    pub method: String,
    pub time: DateTime<Utc>,
    pub data: Option<Json>,
    /// More fields of `request` (storage rules see `size`, `content_type` and `path`).
    pub extra: serde_json::Map<String, Json>,
}

/// Everything a rule can see about one request.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleInput {
    pub auth: Option<AuthInfo>,
    /// The stored document `{id, data, version, created_at, updated_at}`; `None` on create.
    pub resource: Option<Json>,
    pub request: RequestInfo,
}

/// Documents read for `get()`/`exists()`, by `(collection, id)`; `None`: it does not exist.
pub type Fetched = HashMap<(String, String), Option<Json>>;

/// What [`Rule::evaluate_with`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evaluation {
    Decided(bool),
    /// The outcome depends on these documents, not fetched yet.
    Needs(Vec<(String, String)>),
}

/// Reads another document for `get()`/`exists()`. `Ok(None)` means it does not exist; the
/// returned value is the whole document `{id, data, version, created_at, updated_at}`.
pub trait DocumentLookup: Send + Sync {
    fn get(&self, collection: &str, id: &str) -> Result<Option<Json>, String>;
}

/// For rules evaluated where other documents are not reachable: every lookup fails, so a rule
/// that needs one denies.
pub struct NoLookup;

impl DocumentLookup for NoLookup {
    fn get(&self, _collection: &str, _id: &str) -> Result<Option<Json>, String> {
        Err("get()/exists() are not available here".to_string())
    }
}

impl Rule {
    pub fn compile(source: &str) -> Result<Rule, RuleCompileError> {
        Rule::compile_with(source, check::VARIABLES)
    }

    /// Compiles a realtime channel rule (`realtime.channels.*` in the config): its variables
    /// are `auth` and `channel` (the channel's name, a string). Evaluate it with
    /// [`Rule::allows_channel`].
    pub fn compile_channel(source: &str) -> Result<Rule, RuleCompileError> {
        Rule::compile_with(source, check::CHANNEL_VARIABLES)
    }

    fn compile_with(source: &str, variables: &[&str]) -> Result<Rule, RuleCompileError> {
        if source.trim().is_empty() {
            return Err(RuleCompileError::new(
                "empty rule; write `true` to allow everyone",
                1,
                1,
            ));
        }
        let expr = parse(source)?;
        check::validate(&expr, source, variables)?;
        let mut program = expr.clone();
        let loops = budget::instrument(&mut program);
        let slow = loops || budget::calls(&expr, "matches");
        Ok(Rule {
            inner: Arc::new(Compiled {
                source: source.to_string(),
                expr,
                program,
                slow,
            }),
        })
    }

    /// The rule text as written.
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// Whether the rule may run long: it loops (`all`, `exists`, `exists_one`, `map`,
    /// `filter`: up to its time budget) or matches a regular expression (linear in the text,
    /// but not interruptible: a second or more over a large string). A caller on an async
    /// worker should evaluate it where it does not hold the worker.
    pub fn may_run_long(&self) -> bool {
        self.inner.slow
    }

    /// `Some(b)` when the rule is the literal `true` or `false`: the caller can decide without
    /// building an activation (the common public-read case).
    pub fn constant(&self) -> Option<bool> {
        match &self.inner.expr.expr {
            Expr::Literal(LiteralValue::Boolean(b)) => Some(*b.inner()),
            _ => None,
        }
    }

    /// Evaluates with `get()`/`exists()` answered from `fetched` only, so the caller decides
    /// where other documents come from (a write reads them on its own transaction's
    /// connection, never on a second pooled one while holding the first). When the outcome
    /// depends on documents not in `fetched`, answers [`Evaluation::Needs`] with their keys:
    /// fetch them (a missing document is `None`) and call again. `Ok(Decided(true))` only when
    /// the rule yields the bool `true`; a CEL runtime error or a non-bool result is
    /// `Decided(false)`, a normal deny. `Err` when more than [`MAX_LOOKUPS`] documents would be
    /// needed.
    pub fn evaluate_with(
        &self,
        input: &RuleInput,
        fetched: &Fetched,
    ) -> Result<Evaluation, RuleEvalError> {
        self.evaluate_until(input, fetched, None)
    }

    /// [`Rule::evaluate_with`], stopping at `until` when that comes before the evaluation's
    /// own [`budget::RULE_TIME_LIMIT`] (a request's [`budget::RuleClock`]).
    pub fn evaluate_until(
        &self,
        input: &RuleInput,
        fetched: &Fetched,
        until: Option<std::time::Instant>,
    ) -> Result<Evaluation, RuleEvalError> {
        if let Some(too_deep) = value::too_deep(input) {
            tracing::warn!(rule = %self.inner.source, value = too_deep, limit = MAX_VALUE_DEPTH, "rule input nested too deeply: deny");
            return Ok(Evaluation::Decided(false));
        }
        let cache = Arc::new(Mutex::new(eval::LookupCache::with_documents(fetched)));
        let ((outcome, misses), out_of_time) = budget::evaluation(until, || {
            eval::with_context(cache.clone(), |ctx| {
                ctx.add_variable_from_value("auth", value::auth_to_cel(input.auth.as_ref()));
                ctx.add_variable_from_value(
                    "resource",
                    input
                        .resource
                        .as_ref()
                        .map(value::document_to_cel)
                        .unwrap_or(Value::Null),
                );
                ctx.add_variable_from_value("request", value::request_to_cel(&input.request));
                eval::evaluate_once(&self.inner.program, ctx, &cache)
            })
        });
        if out_of_time {
            return Err(RuleEvalError::OutOfTime);
        }
        // A result that is known despite a miss (`get(..) == x || true`) does not depend on it.
        if outcome.is_err() && !misses.is_empty() {
            if fetched.len() + misses.len() > MAX_LOOKUPS {
                return Err(RuleEvalError::TooManyLookups { limit: MAX_LOOKUPS });
            }
            return Ok(Evaluation::Needs(misses));
        }
        Ok(Evaluation::Decided(match outcome {
            Ok(Value::Bool(allowed)) => allowed,
            Ok(other) => {
                tracing::debug!(rule = %self.inner.source, result = ?other, "rule result is not a bool: deny");
                false
            }
            Err(error) => {
                tracing::debug!(rule = %self.inner.source, %error, "rule failed: deny");
                false
            }
        }))
    }

    /// [`Rule::evaluate_with`] in a loop, fetching what it needs from a synchronous `lookup`.
    /// `Err` when the rule could not be decided (a lookup failed, or too many were needed);
    /// the caller must deny.
    pub fn evaluate(
        &self,
        input: &RuleInput,
        lookup: &dyn DocumentLookup,
    ) -> Result<bool, RuleEvalError> {
        let mut fetched = Fetched::new();
        loop {
            match self.evaluate_with(input, &fetched)? {
                Evaluation::Decided(allowed) => return Ok(allowed),
                Evaluation::Needs(keys) => {
                    for (collection, id) in keys {
                        let doc = lookup
                            .get(&collection, &id)
                            .map_err(RuleEvalError::Lookup)?;
                        fetched.insert((collection, id), doc);
                    }
                }
            }
        }
    }

    /// Whether the rule reads `request` (its time, for one): a filter made from it holds only
    /// at the moment it was made.
    pub fn reads_request(&self) -> bool {
        self.reads("request")
    }

    /// Whether the rule reads the variable `name` anywhere.
    pub fn reads(&self, name: &str) -> bool {
        fn walk(e: &IdedExpr, name: &str) -> bool {
            matches!(&e.expr, Expr::Ident(n) if n == name)
                || limits::children(e).into_iter().any(|c| walk(c, name))
        }
        walk(&self.inner.expr, name)
    }

    /// Whether a channel rule ([`Rule::compile_channel`]) lets `auth` use `channel`. Only the
    /// bool `true` allows; an error, a non-bool, a `get()` (no documents are read here) or
    /// running out of time denies.
    pub fn allows_channel(&self, auth: Option<&AuthInfo>, channel: &str) -> bool {
        if let Some(constant) = self.constant() {
            return constant;
        }
        if value::auth_too_deep(auth) {
            return false;
        }
        let cache = Arc::new(Mutex::new(eval::LookupCache::with_documents(
            &Fetched::new(),
        )));
        let (outcome, out_of_time) = budget::evaluation(None, || {
            eval::with_context(cache.clone(), |ctx| {
                ctx.add_variable_from_value("auth", value::auth_to_cel(auth));
                ctx.add_variable_from_value("channel", Value::String(Arc::new(channel.into())));
                eval::eval(&self.inner.program, ctx)
            })
        });
        !out_of_time && matches!(outcome, Ok(Value::Bool(true)))
    }

    /// Partially evaluates the rule for a query by this caller at `now`; see [`Pushdown`].
    pub fn pushdown(&self, auth: Option<&AuthInfo>, now: DateTime<Utc>) -> Pushdown {
        pushdown::pushdown(&self.inner.expr, auth, now)
    }
}

/// Parses with cel's hand-written Pratt parser rather than its default ANTLR one: both read
/// `!!false` right now, but the Pratt parser reports errors at the right position, counts its
/// own recursion, and is a fraction of the code. Neither is trusted with unbounded input:
/// [`limits::prescan`] bounds the text first, and a panic (none is known) is a syntax error,
/// logged once, never printed with a backtrace.
fn parse(source: &str) -> Result<IdedExpr, RuleCompileError> {
    limits::prescan(source)?;
    let parsed = panics::catch_quietly(|| {
        PrattParser::new()
            .max_recursion_depth(PARSER_RECURSION_LIMIT)
            .parse(source)
    });
    let expr = match parsed {
        Ok(Ok(expr)) => expr,
        Ok(Err(errors)) => {
            return Err(match errors.errors.first() {
                Some(first) => {
                    let (line, column) = char_position(source, first.pos);
                    RuleCompileError::new(first.msg.clone(), line, column)
                }
                None => RuleCompileError::new("syntax error", 1, 1),
            })
        }
        Err(panic) => {
            tracing::warn!(rule = source, panic, "the CEL parser failed on a rule");
            return Err(RuleCompileError::new(
                "syntax error: the rule could not be parsed",
                1,
                1,
            ));
        }
    };
    // The pre-scan's bound holds by construction; this re-check keeps every recursive walk
    // safe even if it did not, without recursing itself.
    let depth = limits::ast_depth(&expr);
    if depth > MAX_DEPTH {
        limits::dismantle(expr);
        return Err(RuleCompileError::new(
            format!("rule is nested too deeply ({depth} levels; the limit is {MAX_DEPTH})"),
            1,
            1,
        ));
    }
    Ok(expr)
}

/// Brackets nest at most [`MAX_NESTING`] deep once the pre-scan passed, and the parser counts
/// about one level per bracket; its own limit is a second line that should never be reached.
const PARSER_RECURSION_LIMIT: u16 = 2 * MAX_NESTING as u16;

/// The parser's 1-based (line, byte column) as (line, character column); `(0, 0)` (no
/// position) becomes `(1, 1)`.
fn char_position(source: &str, (line, column): (isize, isize)) -> (usize, usize) {
    let line = usize::try_from(line).unwrap_or(0).max(1);
    let column = usize::try_from(column).unwrap_or(0).max(1);
    let text = source.split('\n').nth(line - 1).unwrap_or("");
    let mut byte = (column - 1).min(text.len());
    while !text.is_char_boundary(byte) {
        byte -= 1;
    }
    (line, text[..byte].chars().count() + 1)
}

#[cfg(test)]
mod tests;
