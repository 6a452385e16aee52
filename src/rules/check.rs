//! Compile-time checks on a parsed rule: only `auth`, `resource`, `request`, `get`, `exists`
//! and the listed builtins may be named, so a typo fails at `PUT` instead of denying every
//! request at run time. Also the reference analysis pushdown uses to decide what is known
//! before a document is seen.
//!
//! Both walks recurse over the tree; [`super::limits`] has bounded its depth before they run.

use cel::common::ast::{CallExpr, EntryExpr, Expr, IdedExpr};

use super::RuleCompileError;

pub(crate) const VARIABLES: &[&str] = &["auth", "resource", "request"];
/// The variables of a realtime channel rule (`realtime.channels` in the config).
pub(crate) const CHANNEL_VARIABLES: &[&str] = &["auth", "channel"];

/// Functions of cel's standard library that rules may call, plus ours. An allow-list rather
/// than whatever the library registers: a function a future version adds is refused at
/// compile time until it is listed here, which is the safe direction. A unit test checks that
/// each one is still known to the interpreter. (`max` and `min` of cel-interpreter 0.10 are
/// not in the standard library any more.)
pub(crate) const FUNCTIONS: [&str; 24] = [
    "contains",
    "size",
    "startsWith",
    "endsWith",
    "string",
    "bytes",
    "double",
    "int",
    "uint",
    "matches",
    "duration",
    "timestamp",
    "getFullYear",
    "getMonth",
    "getDayOfYear",
    "getDayOfMonth",
    "getDate",
    "getDayOfWeek",
    "getHours",
    "getMinutes",
    "getSeconds",
    "getMilliseconds",
    "get",
    "exists",
];

/// Operators are calls whose names the parser spells with `_`, `@` or `!_`/`-_`.
pub(crate) fn is_operator(name: &str) -> bool {
    name.starts_with('_') || name.starts_with('@') || name == "!_" || name == "-_"
}

pub(crate) fn validate(
    expr: &IdedExpr,
    source: &str,
    variables: &[&str],
) -> Result<(), RuleCompileError> {
    let mut bound = Vec::new();
    Walk { source, variables }.walk(expr, &mut bound)
}

struct Walk<'a> {
    source: &'a str,
    variables: &'a [&'a str],
}

impl Walk<'_> {
    fn walk(&self, expr: &IdedExpr, bound: &mut Vec<String>) -> Result<(), RuleCompileError> {
        let source = self.source;
        match &expr.expr {
            Expr::Unspecified => Err(RuleCompileError::new("incomplete expression", 1, 1)),
            Expr::Ident(name) => {
                if self.variables.contains(&name.as_str()) || bound.iter().any(|b| b == name) {
                    Ok(())
                } else {
                    Err(at(
                        source,
                        name,
                        format!(
                            "unknown identifier `{name}`: rules can use {}",
                            self.variables
                                .iter()
                                .map(|v| format!("`{v}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ))
                }
            }
            Expr::Literal(_) => Ok(()),
            Expr::Select(select) => self.walk(&select.operand, bound),
            Expr::List(list) => list.elements.iter().try_for_each(|e| self.walk(e, bound)),
            Expr::Map(map) => map.entries.iter().try_for_each(|entry| match &entry.expr {
                EntryExpr::MapEntry(e) => {
                    self.walk(&e.key, bound)?;
                    self.walk(&e.value, bound)
                }
                EntryExpr::StructField(f) => Err(at(
                    source,
                    &f.field,
                    "message construction is not supported in rules".to_string(),
                )),
            }),
            Expr::Struct(s) => Err(at(
                source,
                &s.type_name,
                "message construction is not supported in rules".to_string(),
            )),
            Expr::Call(call) => self.check_call(call, bound),
            Expr::Comprehension(c) => {
                self.walk(&c.iter_range, bound)?;
                self.walk(&c.accu_init, bound)?;
                let scope = bound.len();
                bound.push(c.iter_var.clone());
                bound.extend(c.iter_var2.clone());
                bound.push(c.accu_var.clone());
                let inner = self
                    .walk(&c.loop_cond, bound)
                    .and_then(|_| self.walk(&c.loop_step, bound))
                    .and_then(|_| self.walk(&c.result, bound));
                bound.truncate(scope);
                inner
            }
        }
    }

    fn check_call(&self, call: &CallExpr, bound: &mut Vec<String>) -> Result<(), RuleCompileError> {
        let source = self.source;
        let name = call.func_name.as_str();
        if !is_operator(name) {
            if !FUNCTIONS.contains(&name) {
                return Err(at(source, name, format!("unknown function `{name}`")));
            }
            if (name == "get" || name == "exists")
                && (call.target.is_some() || call.args.len() != 2)
            {
                return Err(at(
                    source,
                    name,
                    format!("`{name}` takes two arguments: {name}(collection, id)"),
                ));
            }
        }
        if let Some(target) = &call.target {
            self.walk(target, bound)?;
        }
        call.args.iter().try_for_each(|a| self.walk(a, bound))
    }
}

fn at(source: &str, word: &str, message: String) -> RuleCompileError {
    let (line, column) = locate_word(source, word).unwrap_or((1, 1));
    RuleCompileError::new(message, line, column)
}

/// 1-based line and column of the first occurrence of `word` as a whole word outside string
/// literals. The parser keeps node offsets private, so this recovers a useful position for
/// errors found after parsing.
pub(crate) fn locate_word(source: &str, word: &str) -> Option<(usize, usize)> {
    let bytes = source.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'"' || b == b'\'' {
            let triple = bytes.get(i..i + 3) == Some(&[b, b, b][..]);
            let quote_len = if triple { 3 } else { 1 };
            i += quote_len;
            while i < bytes.len() {
                if bytes[i] == b'\\' {
                    i += 2;
                } else if bytes[i] == b && (!triple || bytes.get(i..i + 3) == Some(&[b, b, b][..]))
                {
                    i += quote_len;
                    break;
                } else {
                    i += 1;
                }
            }
            continue;
        }
        if is_word(b) && (i == 0 || !is_word(bytes[i - 1])) {
            let end = i + source[i..].bytes().take_while(|c| is_word(*c)).count();
            if &source[i..end] == word {
                let line_start = source[..i].rfind('\n').map(|p| p + 1).unwrap_or(0);
                let line = source[..i].matches('\n').count() + 1;
                let column = source[line_start..i].chars().count() + 1;
                return Some((line, column));
            }
            i = end;
            continue;
        }
        i += 1;
    }
    None
}

/// What an expression depends on, for deciding what pushdown can fold.
#[derive(Default, Debug, Clone, Copy)]
pub(crate) struct Refs {
    pub resource: bool,
    /// `request` other than `request.time` (unknown during pushdown).
    pub request_other: bool,
    /// `get()` / `exists()`: another document's content.
    pub lookup: bool,
}

impl Refs {
    /// Known once `auth` and `request.time` are: can be evaluated during pushdown.
    pub fn foldable(&self) -> bool {
        !self.resource && !self.request_other && !self.lookup
    }
}

pub(crate) fn refs(expr: &IdedExpr) -> Refs {
    let mut out = Refs::default();
    collect(expr, &mut Vec::new(), &mut out);
    out
}

fn collect(expr: &IdedExpr, bound: &mut Vec<String>, out: &mut Refs) {
    match &expr.expr {
        Expr::Ident(name) if !bound.iter().any(|b| b == name) => match name.as_str() {
            "resource" => out.resource = true,
            "request" => out.request_other = true,
            "auth" => {}
            // Unknown names cannot survive `validate`; treat them as unknowable anyway.
            _ => out.request_other = true,
        },
        Expr::Select(select) => {
            if select.field == "time" && !select.test {
                if let Expr::Ident(name) = &select.operand.expr {
                    if name == "request" && !bound.iter().any(|b| b == name) {
                        return;
                    }
                }
            }
            collect(&select.operand, bound, out)
        }
        Expr::List(list) => list.elements.iter().for_each(|e| collect(e, bound, out)),
        Expr::Map(map) => {
            for entry in &map.entries {
                if let EntryExpr::MapEntry(e) = &entry.expr {
                    collect(&e.key, bound, out);
                    collect(&e.value, bound, out);
                }
            }
        }
        Expr::Call(call) => {
            if call.target.is_none() && (call.func_name == "get" || call.func_name == "exists") {
                out.lookup = true;
            }
            if let Some(t) = &call.target {
                collect(t, bound, out);
            }
            call.args.iter().for_each(|a| collect(a, bound, out));
        }
        Expr::Comprehension(c) => {
            collect(&c.iter_range, bound, out);
            collect(&c.accu_init, bound, out);
            let scope = bound.len();
            bound.push(c.iter_var.clone());
            bound.extend(c.iter_var2.clone());
            bound.push(c.accu_var.clone());
            collect(&c.loop_cond, bound, out);
            collect(&c.loop_step, bound, out);
            collect(&c.result, bound, out);
            bound.truncate(scope);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_word_skips_string_literals_and_longer_words() {
        assert_eq!(locate_word("'usr' == usrx || usr", "usr"), Some((1, 18)));
        assert_eq!(locate_word("a &&\n  b == \"b\"", "b"), Some((2, 3)));
    }
}
