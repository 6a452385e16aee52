//! Evaluation: the boolean skeleton of a rule (`&&`, `||`, `!`, `?:`, `in`) is evaluated
//! here with CEL-specification semantics, everything below it by `cel_interpreter`.
//!
//! Why not hand the whole expression to the interpreter: cel-interpreter 0.10 treats `&&`/`||`
//! operands by truthiness (`"x" && true` is `true`) and propagates an error from the left
//! operand even when the right one decides (`missing.field == 1 || true` is an error). The
//! specification makes `&&`/`||` commutative over errors and requires bools, which is what
//! rule authors from Firebase expect and what pushdown (`pushdown.rs`) models exactly. The
//! interpreter's `in` also accepts a string on the right (substring); the specification does
//! not, and no query operator matches it, so the skeleton's `in` refuses it.
//!
//! `get()`/`exists()` read other documents, but interpreter functions must be `'static` and
//! synchronous. So the registered functions only read a per-evaluation cache; a miss records
//! the wanted document and fails. The caller (`Rule::evaluate_with`'s) fetches the misses
//! wherever it can — a write on its own transaction — and evaluates again.
//! Results never depend on a miss that was absorbed: `error || true` is true and
//! `error && false` is false whatever the error stood for.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use cel_interpreter::objects::Key;
use cel_interpreter::{Context, ExecutionError, Value};
use cel_parser::ast::{operators, Expr, IdedExpr};

use super::value::document_to_cel;

const MISS: &str = "document not loaded yet";

type DocKey = (String, String);

#[derive(Default)]
pub(crate) struct LookupCache {
    docs: HashMap<DocKey, Option<Value>>,
    misses: Vec<DocKey>,
}

impl LookupCache {
    pub(crate) fn with_documents(fetched: &super::Fetched) -> Self {
        LookupCache {
            docs: fetched
                .iter()
                .map(|(key, doc)| (key.clone(), doc.as_ref().map(document_to_cel)))
                .collect(),
            misses: Vec::new(),
        }
    }
}

fn cached(
    cache: &Mutex<LookupCache>,
    function: &str,
    key: DocKey,
) -> Result<Option<Value>, ExecutionError> {
    let mut cache = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match cache.docs.get(&key) {
        Some(doc) => Ok(doc.clone()),
        None => {
            cache.misses.push(key);
            Err(ExecutionError::function_error(function, MISS))
        }
    }
}

thread_local! {
    /// The lookup cache of the evaluation running on this thread, read by `get`/`exists`.
    static CURRENT_CACHE: std::cell::RefCell<Option<Arc<Mutex<LookupCache>>>> =
        const { std::cell::RefCell::new(None) };
    /// The interpreter's builtins plus `get` and `exists`, built once per thread: building the
    /// function registry cost more than evaluating a typical rule.
    static ROOT: Context<'static> = root_context();
}

fn current_cache(function: &str, key: DocKey) -> Result<Option<Value>, ExecutionError> {
    CURRENT_CACHE.with(|c| match c.borrow().as_ref() {
        Some(cache) => cached(cache, function, key),
        None => Err(ExecutionError::function_error(
            function,
            "not available here",
        )),
    })
}

fn root_context() -> Context<'static> {
    let mut ctx = Context::default();
    ctx.add_function(
        "get",
        |collection: Arc<String>, id: Arc<String>| -> Result<Value, ExecutionError> {
            let doc = current_cache("get", (collection.to_string(), id.to_string()))?;
            Ok(doc.unwrap_or(Value::Null))
        },
    );
    ctx.add_function(
        "exists",
        |collection: Arc<String>, id: Arc<String>| -> Result<Value, ExecutionError> {
            let doc = current_cache("exists", (collection.to_string(), id.to_string()))?;
            Ok(Value::Bool(doc.is_some()))
        },
    );
    ctx
}

/// Runs `f` with a context holding the builtins, `get`/`exists` served from `cache`, and the
/// variables `f` adds.
pub(crate) fn with_context<R>(
    cache: Arc<Mutex<LookupCache>>,
    f: impl FnOnce(&mut Context<'_>) -> R,
) -> R {
    CURRENT_CACHE.with(|c| *c.borrow_mut() = Some(cache));
    let result = ROOT.with(|root| {
        let mut ctx = root.new_inner_scope();
        f(&mut ctx)
    });
    CURRENT_CACHE.with(|c| *c.borrow_mut() = None);
    result
}

/// Evaluates once with `get`/`exists` served from `cache`; returns the result and the
/// documents that were wanted but not in the cache (each once).
pub(crate) fn evaluate_once(
    expr: &IdedExpr,
    ctx: &Context,
    cache: &Mutex<LookupCache>,
) -> (Result<Value, ExecutionError>, Vec<DocKey>) {
    let result = eval(expr, ctx);
    let mut misses = std::mem::take(
        &mut cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .misses,
    );
    misses.sort();
    misses.dedup();
    (result, misses)
}

/// Evaluates `expr`; the skeleton operators follow the CEL specification (see module docs).
pub(crate) fn eval(expr: &IdedExpr, ctx: &Context) -> Result<Value, ExecutionError> {
    if let Expr::Call(call) = &expr.expr {
        if call.target.is_none() {
            match (call.func_name.as_str(), call.args.as_slice()) {
                (operators::LOGICAL_AND, [a, b]) => return logical(a, b, ctx, false),
                (operators::LOGICAL_OR, [a, b]) => return logical(a, b, ctx, true),
                (operators::LOGICAL_NOT, [a]) => return eval_bool(a, ctx).map(|b| Value::Bool(!b)),
                (operators::CONDITIONAL, [cond, then, otherwise]) => {
                    return if eval_bool(cond, ctx)? {
                        eval(then, ctx)
                    } else {
                        eval(otherwise, ctx)
                    };
                }
                (operators::IN, [item, container]) => {
                    let item = resolve(item, ctx)?;
                    let container = resolve(container, ctx)?;
                    return membership(item, container).map(Value::Bool);
                }
                _ => {}
            }
        }
    }
    resolve(expr, ctx)
}

pub(crate) fn eval_bool(expr: &IdedExpr, ctx: &Context) -> Result<bool, ExecutionError> {
    match eval(expr, ctx)? {
        Value::Bool(b) => Ok(b),
        other => Err(ExecutionError::UnexpectedType {
            got: format!("{:?}", other.type_of()),
            want: "bool".to_string(),
        }),
    }
}

/// `&&` (`decisive` = false) or `||` (`decisive` = true): the first operand equal to
/// `decisive` decides; otherwise an error from either side wins.
fn logical(
    a: &IdedExpr,
    b: &IdedExpr,
    ctx: &Context,
    decisive: bool,
) -> Result<Value, ExecutionError> {
    let left = eval_bool(a, ctx);
    if left == Ok(decisive) {
        return Ok(Value::Bool(decisive));
    }
    let right = eval_bool(b, ctx);
    if right == Ok(decisive) {
        return Ok(Value::Bool(decisive));
    }
    left?;
    right.map(Value::Bool)
}

/// CEL `in`: list membership by CEL equality, or map key presence.
pub(crate) fn membership(item: Value, container: Value) -> Result<bool, ExecutionError> {
    match container {
        Value::List(items) => Ok(items.contains(&item)),
        Value::Map(map) => {
            let key: Result<Key, _> = item.try_into();
            Ok(key.map(|key| map.map.contains_key(&key)).unwrap_or(false))
        }
        other => Err(ExecutionError::ValuesNotComparable(item, other)),
    }
}

/// The interpreter, with its panics (it has `todo!()`s, e.g. `exists()` over a string)
/// turned into errors so a hostile document cannot take the request down.
pub(crate) fn resolve(expr: &IdedExpr, ctx: &Context) -> Result<Value, ExecutionError> {
    catch_unwind(AssertUnwindSafe(|| Value::resolve(expr, ctx))).unwrap_or_else(|_| {
        Err(ExecutionError::function_error(
            "rule",
            "expression not supported by the interpreter",
        ))
    })
}
