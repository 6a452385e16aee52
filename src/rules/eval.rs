//! Evaluation: the `cel` interpreter with `get()`/`exists()` served from a per-evaluation
//! cache, and its panics turned into errors.
//!
//! cel-interpreter 0.10 needed a hand-written evaluator for the boolean skeleton of a rule
//! (`&&`, `||`, `!`, `?:`, `in`): it treated operands by truthiness, let a left error win over
//! a deciding right side, and read `in` on a string as a substring test. The `cel` crate
//! follows the specification on all of these, so the whole expression is now its to evaluate;
//! `conformance.rs` pins that behaviour for future upgrades.
//!
//! `get()`/`exists()` read other documents, but interpreter functions must be `'static` and
//! synchronous. So the registered functions only read a per-evaluation cache; a miss records
//! the wanted document and fails. The caller (`Rule::evaluate_with`'s) fetches the misses
//! wherever it can — a write on its own transaction — and evaluates again.
//! Results never depend on a miss that was absorbed: `error || true` is true and
//! `error && false` is false whatever the error stood for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cel::common::ast::IdedExpr;
use cel::{Context, ExecutionError, Value};

use super::panics::catch_quietly;
use super::value::fetched_to_cel;

const MISS: &str = "document not loaded yet";

type DocKey = (String, String);

/// A fetched document as rules see it: `Err` when it is nested too deeply to convert, so a
/// `get()` of it fails (and denies) while `exists()` still answers.
type CachedDoc = Option<Result<Value, ()>>;

#[derive(Default)]
pub(crate) struct LookupCache {
    docs: HashMap<DocKey, CachedDoc>,
    misses: Vec<DocKey>,
}

impl LookupCache {
    pub(crate) fn with_documents(fetched: &super::Fetched) -> Self {
        LookupCache {
            docs: fetched
                .iter()
                .map(|(key, doc)| (key.clone(), doc.as_ref().map(fetched_to_cel)))
                .collect(),
            misses: Vec::new(),
        }
    }
}

fn cached(
    cache: &Mutex<LookupCache>,
    function: &str,
    key: DocKey,
) -> Result<CachedDoc, ExecutionError> {
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
    /// The standard library plus `get` and `exists`, built once per thread: building the
    /// function registry costs more than evaluating a typical rule.
    static ROOT: Context<'static, 'static> = root_context();
}

fn current_cache(function: &str, key: DocKey) -> Result<CachedDoc, ExecutionError> {
    CURRENT_CACHE.with(|c| match c.borrow().as_ref() {
        Some(cache) => cached(cache, function, key),
        None => Err(ExecutionError::function_error(
            function,
            "not available here",
        )),
    })
}

fn root_context() -> Context<'static, 'static> {
    let mut ctx = Context::default();
    let get = ctx.add_function(
        "get",
        |collection: Arc<String>, id: Arc<String>| -> Result<Value, ExecutionError> {
            match current_cache("get", (collection.to_string(), id.to_string()))? {
                None => Ok(Value::Null),
                Some(Ok(doc)) => Ok(doc),
                Some(Err(())) => Err(ExecutionError::function_error(
                    "get",
                    "document nested too deeply",
                )),
            }
        },
    );
    let exists = ctx.add_function(
        "exists",
        |collection: Arc<String>, id: Arc<String>| -> Result<Value, ExecutionError> {
            let doc = current_cache("exists", (collection.to_string(), id.to_string()))?;
            Ok(Value::Bool(doc.is_some()))
        },
    );
    let tick = ctx.add_function(super::budget::TICK, super::budget::tick);
    let text = ctx.add_function(super::budget::TEXT, super::budget::bounded_text);
    let sized = ctx.add_function(super::budget::SIZED, super::budget::bounded_size);
    if let Err(error) = tick.and(text).and(sized) {
        tracing::error!(%error, "rule time budget not registered");
    }
    // Only a standard-library overload of the same name could refuse them (a unit test pins
    // that none exists); rules using them would then fail, hence deny.
    for (name, added) in [("get", get), ("exists", exists)] {
        if let Err(error) = added {
            tracing::error!(function = name, %error, "rule function not registered");
        }
    }
    ctx
}

/// Runs `f` with a context holding the builtins, `get`/`exists` served from `cache`, and the
/// variables `f` adds.
pub(crate) fn with_context<R>(
    cache: Arc<Mutex<LookupCache>>,
    f: impl FnOnce(&mut Context<'_, 'static>) -> R,
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

/// The interpreter, with a panic (none is known in this version; 0.10 had `todo!()`s) turned
/// into an error so a hostile document cannot take the request down or flood the logs.
pub(crate) fn eval(expr: &IdedExpr, ctx: &Context) -> Result<Value, ExecutionError> {
    catch_quietly(|| Value::resolve(expr, ctx)).unwrap_or_else(|panic| {
        tracing::warn!(panic, "the CEL interpreter failed on a rule: deny");
        Err(ExecutionError::function_error(
            "rule",
            "expression not supported by the interpreter",
        ))
    })
}
