//! A time budget for evaluating one rule, so no rule and no document can hold a thread (on
//! SQLite, the one writer) for long.
//!
//! Without comprehensions a rule's cost is linear in its size and in the data it reads, and
//! both are bounded. The macros (`all`, `exists`, `exists_one`, `map`, `filter`) are loops,
//! and a loop inside a loop over a list a client sent — or `x in list` inside one — is
//! quadratic in the client's data: a hostile document of a few hundred kilobytes made such a
//! rule run for seconds. The `cel` interpreter has no budget of its own, so [`instrument`]
//! rewrites each compiled comprehension to call [`TICK`] once per iteration, and the tick
//! fails once the evaluation's deadline has passed. The failure propagates out of every loop
//! at once (the interpreter does not defer errors from a loop's condition), and the caller
//! denies whatever the expression would have made of the error ([`evaluation`]).
//!
//! The deadline is [`RULE_TIME_LIMIT`] per evaluation, shortened by an outer [`within`]
//! scope: a batch write on SQLite runs all its checks inside one, so a batch of many slow
//! checks is bounded as a whole.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cel::common::ast::{operators, CallExpr, EntryExpr, Expr, IdedExpr, ListExpr};
use cel::{ExecutionError, Value};

use super::limits::children;

/// Longest one rule evaluation may run. A typical rule takes a few microseconds; this is a
/// few thousand times that, and still short enough that a stream of slow requests cannot
/// starve the SQLite writer.
pub const RULE_TIME_LIMIT: Duration = Duration::from_millis(50);

/// One request's rule time: the time its evaluations have run, added up (scans, lookups and
/// waiting for the writer or a lock do not count), against a limit. Each evaluation is still
/// within [`RULE_TIME_LIMIT`]. Clones share the clock.
#[derive(Clone, Debug)]
pub struct RuleClock {
    limit: Duration,
    spent_nanos: Arc<AtomicU64>,
}

impl RuleClock {
    pub fn new(limit: Duration) -> RuleClock {
        RuleClock {
            limit,
            spent_nanos: Arc::new(AtomicU64::new(0)),
        }
    }

    fn spent(&self) -> Duration {
        Duration::from_nanos(self.spent_nanos.load(Ordering::Relaxed))
    }

    /// What is left of the limit.
    pub fn remaining(&self) -> Duration {
        self.limit.saturating_sub(self.spent())
    }

    /// Adds an evaluation's time.
    pub fn spend(&self, took: Duration) {
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.spent_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Whether the request has used up its rule time.
    pub fn expired(&self) -> bool {
        self.spent() >= self.limit
    }
}

/// Evaluations of rules with loops that may run at once on the runtime's threads: half the
/// cores (at least one), so that a few requests with expensive rules queue for these instead
/// of taking every core from the rest of the server.
static LOOP_SLOTS: std::sync::LazyLock<Slots> = std::sync::LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    Slots {
        free: std::sync::Mutex::new((cores / 2).max(1)),
        freed: std::sync::Condvar::new(),
    }
});

struct Slots {
    free: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
}

/// One of the loop slots, held until dropped. Blocks: call it where blocking is allowed
/// (inside `block_in_place`).
pub fn loop_slot() -> LoopSlot {
    let slots = &*LOOP_SLOTS;
    let mut free = slots.free.lock().unwrap_or_else(|p| p.into_inner());
    while *free == 0 {
        free = slots.freed.wait(free).unwrap_or_else(|p| p.into_inner());
    }
    *free -= 1;
    LoopSlot(())
}

pub struct LoopSlot(());

impl Drop for LoopSlot {
    fn drop(&mut self) {
        let slots = &*LOOP_SLOTS;
        *slots.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        slots.freed.notify_one();
    }
}

/// Longest text (and pattern) `matches()` takes, in bytes: a regular expression runs to its
/// end, in time linear in the text but with a large factor for counted repetitions (a
/// hostile 900 KB string kept one check busy for 2–5 s). Past it the rule fails, so denies.
pub const MAX_MATCHES_TEXT: usize = 16 * 1024;

/// Largest string or list a `+` in a rule may build, in bytes or elements: as large as a
/// whole document may be.
pub const MAX_BUILT: usize = 1024 * 1024;

/// The function that bounds what `+` builds (see [`MAX_BUILT`]).
pub(crate) const SIZED: &str = "@basalt_sized";

/// Passes a value through unless it is a string or list past [`MAX_BUILT`].
pub(crate) fn bounded_size(value: Value) -> Result<Value, ExecutionError> {
    let too_big = match &value {
        Value::String(s) => s.len() > MAX_BUILT,
        Value::List(l) => l.len() > MAX_BUILT,
        Value::Bytes(b) => b.len() > MAX_BUILT,
        _ => false,
    };
    if too_big {
        return Err(ExecutionError::function_error(
            "+",
            format!("result larger than {MAX_BUILT} bytes or elements"),
        ));
    }
    Ok(value)
}

/// The function that bounds `matches()`'s arguments (see [`MAX_MATCHES_TEXT`]).
pub(crate) const TEXT: &str = "@basalt_text";

/// Passes a string of at most [`MAX_MATCHES_TEXT`] bytes (or any other value) through.
pub(crate) fn bounded_text(value: Value) -> Result<Value, ExecutionError> {
    match &value {
        Value::String(s) if s.len() > MAX_MATCHES_TEXT => Err(ExecutionError::function_error(
            "matches",
            format!("text longer than {MAX_MATCHES_TEXT} bytes"),
        )),
        _ => Ok(value),
    }
}

/// The function the rewritten comprehensions call; not a name a rule can use (the checker
/// admits only the documented functions).
pub(crate) const TICK: &str = "@basalt_tick";

thread_local! {
    /// The deadline of the evaluation (or [`within`] scope) running on this thread.
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
    /// Set when a tick found the deadline passed, so the caller denies even if the
    /// expression absorbed the error (`slow() || true`).
    static EXPIRED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every rule evaluation inside it sharing one deadline `limit` from now (or
/// an earlier one already in force).
pub fn within<R>(limit: Duration, f: impl FnOnce() -> R) -> R {
    let _scope = Scope::enter(limit);
    f()
}

/// The guard form of [`within`]: the deadline holds until the scope is dropped.
#[must_use = "the deadline holds only while the scope lives"]
pub struct Scope(Option<Instant>);

impl Scope {
    pub fn enter(limit: Duration) -> Scope {
        let outer = DEADLINE.get();
        DEADLINE.set(Some(earliest(outer, Instant::now() + limit)));
        Scope(outer)
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        DEADLINE.set(self.0);
    }
}

fn earliest(outer: Option<Instant>, own: Instant) -> Instant {
    outer.map_or(own, |outer| outer.min(own))
}

/// Runs one evaluation under its deadline (and `until`, when earlier); the result and
/// whether the deadline passed.
pub(crate) fn evaluation<R>(until: Option<Instant>, f: impl FnOnce() -> R) -> (R, bool) {
    let was_expired = EXPIRED.replace(false);
    let limit = until.map_or(RULE_TIME_LIMIT, |until| {
        RULE_TIME_LIMIT.min(until.saturating_duration_since(Instant::now()))
    });
    let result = within(limit, f);
    let expired = EXPIRED.replace(was_expired);
    (result, expired)
}

/// The per-iteration check: passes its argument through, or fails once the deadline passed.
pub(crate) fn tick(value: Value) -> Result<Value, ExecutionError> {
    match DEADLINE.get() {
        Some(deadline) if Instant::now() > deadline => {
            EXPIRED.set(true);
            Err(ExecutionError::function_error(
                "rule",
                "evaluation ran out of time",
            ))
        }
        _ => Ok(value),
    }
}

/// Rewrites every comprehension in `expr` to [`tick`] once per iteration.
///
/// Where the tick goes matters: the interpreter builds `map`/`filter` results in place only
/// when the loop condition is a literal and the step is `acc + [e]` or `g ? acc + [e] : acc`,
/// so those keep their shape and tick inside `g` or `e`; every other comprehension ticks in
/// its loop condition, whose errors the interpreter never absorbs.
/// Also bounds `matches()`'s text ([`MAX_MATCHES_TEXT`]). Answers whether anything was
/// rewritten (a loop or a `matches()`).
pub(crate) fn instrument(expr: &mut IdedExpr) -> bool {
    let first_new = max_id(expr) + 1;
    let mut next_id = first_new;
    rewrite(expr, &mut next_id);
    next_id > first_new
}

/// Whether `expr` calls the function `name` anywhere.
pub(crate) fn calls(expr: &IdedExpr, name: &str) -> bool {
    matches!(&expr.expr, Expr::Call(call) if call.func_name == name)
        || children(expr).into_iter().any(|child| calls(child, name))
}

fn max_id(expr: &IdedExpr) -> u64 {
    let mut max = expr.id;
    for child in children(expr) {
        max = max.max(max_id(child));
    }
    max
}

fn rewrite(expr: &mut IdedExpr, next_id: &mut u64) {
    match &mut expr.expr {
        Expr::Call(call) => {
            if let Some(target) = call.target.as_deref_mut() {
                rewrite(target, next_id);
            }
            for arg in &mut call.args {
                rewrite(arg, next_id);
            }
            // Concatenation doubles: a tree of `s + s` over a 1 MB string built gigabytes
            // without a loop. Bound each result (not a macro's own `@result + [e]` step,
            // whose shape the interpreter needs to build lists in place).
            let appends_to_accumulator = matches!(
                call.args.first(),
                Some(IdedExpr { expr: Expr::Ident(name), .. }) if name.starts_with('@')
            );
            if call.func_name == operators::ADD && !appends_to_accumulator {
                wrap_with(expr, SIZED, next_id);
                return;
            }
            // A regular expression cannot be stopped once it runs: bound its text and
            // pattern instead (`x.matches(p)` and `matches(x, p)`).
            if call.func_name == "matches" {
                if let Some(target) = call.target.as_deref_mut() {
                    wrap_with(target, TEXT, next_id);
                }
                for arg in &mut call.args {
                    wrap_with(arg, TEXT, next_id);
                }
            }
        }
        Expr::Comprehension(c) => {
            for part in [
                &mut c.iter_range,
                &mut c.accu_init,
                &mut c.loop_cond,
                &mut c.loop_step,
                &mut c.result,
            ] {
                rewrite(part, next_id);
            }
            let accu = c.accu_var.clone();
            let built_in_place = is_ident(&c.result, &accu)
                && matches!(c.loop_cond.expr, Expr::Literal(_))
                && append_target(&mut c.loop_step, &accu).is_some();
            if built_in_place {
                if let Some(target) = append_target(&mut c.loop_step, &accu) {
                    wrap(target, next_id);
                }
            } else {
                wrap(&mut c.loop_cond, next_id);
            }
        }
        Expr::List(list) => {
            for element in &mut list.elements {
                rewrite(element, next_id);
            }
        }
        Expr::Map(map) => {
            for e in &mut map.entries {
                rewrite_entry(&mut e.expr, next_id);
            }
        }
        Expr::Struct(s) => {
            for e in &mut s.entries {
                rewrite_entry(&mut e.expr, next_id);
            }
        }
        Expr::Select(select) => rewrite(&mut select.operand, next_id),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

fn rewrite_entry(entry: &mut EntryExpr, next_id: &mut u64) {
    match entry {
        EntryExpr::MapEntry(e) => {
            rewrite(&mut e.key, next_id);
            rewrite(&mut e.value, next_id);
        }
        EntryExpr::StructField(f) => rewrite(&mut f.value, next_id),
    }
}

fn is_ident(expr: &IdedExpr, name: &str) -> bool {
    matches!(&expr.expr, Expr::Ident(n) if n == name)
}

/// In a step of the shape `acc + [e]` or `g ? acc + [e] : acc`, the expression evaluated on
/// every iteration that can tick without changing the shape: `g`, or else `e`.
fn append_target<'a>(step: &'a mut IdedExpr, accu: &str) -> Option<&'a mut IdedExpr> {
    fn appended<'a>(step: &'a mut IdedExpr, accu: &str) -> Option<&'a mut ListExpr> {
        match &mut step.expr {
            Expr::Call(call) if call.func_name == operators::ADD && call.target.is_none() => {
                match call.args.as_mut_slice() {
                    [lhs, rhs] if is_ident(lhs, accu) => match &mut rhs.expr {
                        Expr::List(list) => Some(list),
                        _ => None,
                    },
                    _ => None,
                }
            }
            _ => None,
        }
    }
    let guarded = matches!(&step.expr, Expr::Call(call)
        if call.func_name == operators::CONDITIONAL && call.target.is_none() && call.args.len() == 3
            && is_ident(&call.args[2], accu));
    if guarded {
        let Expr::Call(call) = &mut step.expr else {
            return None;
        };
        let [guard, then, _] = call.args.as_mut_slice() else {
            return None;
        };
        appended(then, accu)?;
        return Some(guard);
    }
    appended(step, accu)?.elements.first_mut()
}

fn wrap(expr: &mut IdedExpr, next_id: &mut u64) {
    wrap_with(expr, TICK, next_id)
}

fn wrap_with(expr: &mut IdedExpr, function: &str, next_id: &mut u64) {
    let inner = std::mem::take(expr);
    *expr = IdedExpr {
        id: *next_id,
        expr: Expr::Call(CallExpr {
            func_name: function.to_string(),
            target: None,
            args: vec![inner],
        }),
    };
    *next_id += 1;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{create_input, user};
    use super::super::{Rule, RuleEvalError};
    use super::*;

    fn numbers(n: usize) -> serde_json::Value {
        json!({ "xs": (0..n).collect::<Vec<_>>() })
    }

    fn run(rule: &str, data: serde_json::Value) -> Result<bool, RuleEvalError> {
        let rule = Rule::compile(rule).unwrap();
        rule.evaluate(
            &create_input(Some(user("u1")), data),
            &super::super::NoLookup,
        )
    }

    #[test]
    fn a_rule_that_would_loop_for_hours_is_stopped_and_denies() {
        // 1000^3 iterations: hours without the budget.
        let slow = "request.data.xs.all(a, request.data.xs.all(b, request.data.xs.all(c, a + b + c >= 0)))";
        assert_eq!(run(slow, numbers(1000)), Err(RuleEvalError::OutOfTime));
        // An expression that would absorb the error still denies.
        let absorbed = format!("{slow} || true");
        assert_eq!(run(&absorbed, numbers(1000)), Err(RuleEvalError::OutOfTime));
        // Every macro is a loop that is checked, also `x in list` inside one.
        for slow in [
            "request.data.xs.exists(a, request.data.xs.exists(b, request.data.xs.exists(c, a + b + c < 0)))",
            "request.data.xs.filter(a, request.data.xs.filter(b, request.data.xs.exists_one(c, c == a + b)).size() > 0).size() > 0",
            "request.data.xs.map(a, request.data.xs.map(b, request.data.xs.map(c, c))).size() > 0",
            "request.data.xs.all(a, request.data.xs.all(b, request.data.xs.all(c, c in request.data.xs)))",
        ] {
            assert_eq!(run(slow, numbers(1000)), Err(RuleEvalError::OutOfTime), "{slow}");
        }
    }

    #[test]
    fn matches_takes_bounded_text_and_patterns() {
        let rule = "request.data.s.matches(request.data.p)";
        let input = |s: String, p: &str| json!({"xs": [], "s": s, "p": p});
        let short = "a".repeat(MAX_MATCHES_TEXT);
        assert_eq!(run(rule, input(short.clone(), "^a+$")), Ok(true));
        assert_eq!(run(rule, input(short.clone() + "a", "^a+$")), Ok(false));
        assert_eq!(
            run(rule, input("aaa".into(), &"a?".repeat(MAX_MATCHES_TEXT))),
            Ok(false)
        );
        // The function form too, and an absorbing `||` still sees a deny only where it
        // decides.
        assert_eq!(
            run(
                "matches(request.data.s, '^a+$')",
                input(short.clone() + "a", "")
            ),
            Ok(false)
        );
        assert_eq!(
            run(
                "matches(request.data.s, '^a+$') || true",
                input(short + "a", "")
            ),
            Ok(true)
        );
    }

    #[test]
    fn concatenation_is_bounded_and_list_building_loops_keep_their_shape() {
        let half = "a".repeat(MAX_BUILT / 2);
        let data = json!({"xs": [1, 2], "s": half});
        // Exactly the limit is fine; one doubling more is an error, so a deny.
        assert_eq!(
            run("size(request.data.s + request.data.s) > 0", data.clone()),
            Ok(true)
        );
        let tree =
            "size(((request.data.s + request.data.s) + (request.data.s + request.data.s)) + \
                    ((request.data.s + request.data.s) + (request.data.s + request.data.s))) > 0";
        assert_eq!(run(tree, data.clone()), Ok(false));
        assert_eq!(
            run("request.data.xs + [3] == [1, 2, 3]", data.clone()),
            Ok(true)
        );
        assert_eq!(
            run("1 + 2 == 3 && 'a' + 'b' == 'ab'", data.clone()),
            Ok(true)
        );
        assert_eq!(
            run("request.data.xs.map(x, x + 1) == [2, 3]", data.clone()),
            Ok(true)
        );
        assert_eq!(
            run("request.data.xs.exists_one(x, x + 1 == 2)", data),
            Ok(true)
        );
    }

    #[test]
    fn a_rule_knows_whether_it_may_run_long() {
        for (source, loops) in [
            ("auth != null && resource.data.owner == auth.uid", false),
            ("size(request.data.tags) < 10", false),
            ("request.data.tags.all(t, t != '')", true),
            ("auth != null || [1, 2].exists(x, x == 3)", true),
            ("request.data.xs.map(x, x * 2).size() > 0", true),
            ("request.data.s.matches('^a+$')", true),
            ("auth != null && matches(request.data.s, 'x')", true),
        ] {
            assert_eq!(
                Rule::compile(source).unwrap().may_run_long(),
                loops,
                "{source}"
            );
        }
    }

    #[test]
    fn loops_keep_their_results() {
        let xs = numbers(2000);
        for (rule, expected) in [
            ("request.data.xs.map(x, x * 2)[1999] == 3998", true),
            ("request.data.xs.filter(x, x % 2 == 0).size() == 1000", true),
            ("request.data.xs.map(x, x % 2 == 0, x).size() == 1000", true),
            ("request.data.xs.all(x, x >= 0)", true),
            ("request.data.xs.all(x, x > 0)", false),
            ("request.data.xs.exists(x, x == 1999)", true),
            ("request.data.xs.exists(x, x < 0)", false),
            ("request.data.xs.exists_one(x, x == 5)", true),
            ("request.data.xs.exists_one(x, x >= 5)", false),
        ] {
            assert_eq!(run(rule, xs.clone()), Ok(expected), "{rule}");
        }
    }

    /// The interpreter builds `map`/`filter` results in place only for one shape of loop (a
    /// literal condition, `acc + [e]` or `g ? acc + [e] : acc`); a check that broke the shape
    /// would make them quadratic. Every loop must still tick once per iteration.
    #[test]
    fn map_and_filter_keep_the_shape_that_is_built_in_place() {
        for source in [
            "[1, 2].map(x, x * 2) == [2, 4]",
            "[1, 2].filter(x, x > 1) == [2]",
            "[1, 2].map(x, x > 1, x) == [2]",
            "[[1]].map(x, x.map(y, y + 1)) == [[2]]",
        ] {
            let mut expr = cel::parser::PrattParser::new().parse(source).unwrap();
            instrument(&mut expr);
            let mut loops = Vec::new();
            comprehensions(&expr, &mut loops);
            assert!(!loops.is_empty(), "{source}");
            for c in loops {
                let accu = c.accu_var.as_str();
                assert!(is_ident(&c.result, accu), "{source}");
                assert!(matches!(c.loop_cond.expr, Expr::Literal(_)), "{source}");
                let mut step = c.loop_step.clone();
                let target = append_target(&mut step, accu).expect(source);
                assert!(
                    matches!(&target.expr, Expr::Call(call) if call.func_name == TICK),
                    "{source}: {target:?}"
                );
            }
        }
        for source in [
            "[1].all(x, x > 0)",
            "[1].exists(x, x > 0)",
            "[1].exists_one(x, x > 0)",
        ] {
            let mut expr = cel::parser::PrattParser::new().parse(source).unwrap();
            instrument(&mut expr);
            let mut loops = Vec::new();
            comprehensions(&expr, &mut loops);
            assert!(
                matches!(&loops[0].loop_cond.expr, Expr::Call(call) if call.func_name == TICK),
                "{source}"
            );
        }
    }

    fn comprehensions<'a>(
        expr: &'a IdedExpr,
        found: &mut Vec<&'a cel::common::ast::ComprehensionExpr>,
    ) {
        if let Expr::Comprehension(c) = &expr.expr {
            found.push(c);
        }
        for child in children(expr) {
            comprehensions(child, found);
        }
    }

    #[test]
    fn a_scope_shares_one_deadline_between_evaluations() {
        let slow = "request.data.xs.all(a, request.data.xs.all(b, a + b >= 0))";
        let results = within(Duration::from_millis(1), || {
            std::thread::sleep(Duration::from_millis(2));
            // The scope's deadline has passed: even a rule that would take a millisecond
            // stops at its first iteration; one without loops is unaffected.
            (
                run(slow, numbers(50)),
                run("request.data.xs.size() == 50", numbers(50)),
            )
        });
        assert_eq!(results, (Err(RuleEvalError::OutOfTime), Ok(true)));
        // Outside the scope the same rule has its own budget again.
        assert_eq!(run(slow, numbers(50)), Ok(true));
    }
}
