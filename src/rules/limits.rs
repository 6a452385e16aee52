//! Size and depth limits on rules and on the values they see, so no rule or document can
//! overflow a thread's stack.
//!
//! The parser, the compile-time checks, pushdown, the interpreter and even dropping the syntax
//! tree all recurse over the tree's depth, and the interpreter recurses over the depth of the
//! values it compares or converts. A tokio worker has a 2 MiB stack, so depth must be bounded
//! before any of that runs: [`prescan`] bounds a rule from its text alone, in one linear pass,
//! before the parser sees it; [`ast_depth`] re-checks the parsed tree without recursing; and
//! [`json_depth`] bounds the documents and claims bound to a rule's variables.
//!
//! The pre-scan cannot parse, so it computes an upper bound of the tree's depth that holds
//! whatever the precedence: every operator token of a term (the operands between `&&`, `||`,
//! `?`, `:`, `,` and brackets) can add one level, a bracketed group adds its own depth plus
//! [`GROUP_COST`], and a chain of `&&`/`||` adds only the depth of the balanced tree the parser
//! builds from it. Real rules stay far below the bound (a 30-clause owner/claims rule is about
//! 20); a few thousand levels are what crash.

use serde_json::Value as Json;

use super::RuleCompileError;

/// Longest rule, in bytes. Generous for hand-written rules (the longest in the docs is about
/// 120 bytes); it also bounds the work of every pass over the rule.
pub const MAX_RULE_BYTES: usize = 16 * 1024;

/// Deepest nesting of brackets: `(`, `[`, `{`, call and macro arguments.
pub const MAX_NESTING: usize = 32;

/// Deepest syntax tree a rule may have (estimated before parsing, checked after).
pub const MAX_DEPTH: usize = 64;

/// Deepest JSON a rule evaluates over (`resource`, `request.data`, `auth.claims`, documents
/// read with `get()`), counted in nested objects and arrays. serde_json refuses deeper text
/// (its recursion limit is 128), and documents are limited to 32 levels by default, so only
/// values built by hand or a raised document limit can reach it; such an evaluation denies.
pub const MAX_VALUE_DEPTH: usize = 128;

/// Levels a bracketed group may add on top of its content: a call is one node, and the macros
/// (`all`, `exists`, `exists_one`, `map`, `filter`) expand to a comprehension whose step wraps
/// the argument in up to three more (`c ? r + [t] : r`).
const GROUP_COST: usize = 4;

/// Checks a rule's text against [`MAX_RULE_BYTES`], [`MAX_NESTING`] and [`MAX_DEPTH`] in one
/// pass, without parsing it. Syntax errors are left to the parser, which reports them better.
pub(crate) fn prescan(source: &str) -> Result<(), RuleCompileError> {
    if source.len() > MAX_RULE_BYTES {
        return Err(RuleCompileError::new(
            format!(
                "rule is {} bytes long; the limit is {MAX_RULE_BYTES}",
                source.len()
            ),
            1,
            1,
        ));
    }
    depth_bound(source, MAX_DEPTH)
        .map(|_| ())
        .map_err(|refusal| {
            let (line, column) = position(source, refusal.at);
            RuleCompileError::new(refusal.message, line, column)
        })
}

struct Refusal {
    at: usize,
    message: String,
}

/// An upper bound of the depth of the tree `source` parses to; refused as soon as it passes
/// `limit` or brackets nest deeper than [`MAX_NESTING`].
fn depth_bound(source: &str, limit: usize) -> Result<usize, Refusal> {
    let mut scan = Scan::new(source);
    let mut groups = vec![Group::new(0)];
    while let Some(token) = scan.next_token() {
        let open = groups.len() - 1;
        let group = &mut groups[open];
        match token.kind {
            Kind::Value => continue,
            Kind::Open(bracket) => {
                if open >= MAX_NESTING {
                    return Err(Refusal {
                        at: token.start,
                        message: format!("rule nests brackets more than {MAX_NESTING} levels deep"),
                    });
                }
                let cost = match bracket {
                    // `f(...)`, `x.m(...)`: a call, or a macro.
                    b'(' if token.after_operand => GROUP_COST,
                    // `a[i]` is one more operator of the term (the index node).
                    b'[' if token.after_operand => {
                        group.term_ops += 1;
                        1
                    }
                    // Grouping parentheses make no node; lists and maps make one.
                    _ => 1,
                };
                groups.push(Group::new(cost));
            }
            Kind::Close => {
                // A stray closing bracket is the parser's to report.
                if groups.len() > 1 {
                    let closed = groups.pop().unwrap_or_else(|| Group::new(0));
                    let parent = groups.last_mut().unwrap_or_else(|| unreachable!());
                    parent.term_child = parent.term_child.max(closed.depth());
                }
            }
            Kind::Logical => group.end_term(true),
            Kind::Question => {
                group.end_term(false);
                group.ternaries += 1;
            }
            Kind::Colon => group.end_term(false),
            Kind::Comma => group.end_segment(),
            Kind::Operator | Kind::Unary | Kind::Dot => group.term_ops += 1,
        }
        let depth = open_depth(&groups);
        if depth > limit {
            return Err(Refusal {
                at: token.start,
                message: format!(
                    "rule is nested too deeply (more than {limit} levels of operators, calls \
                     and brackets); shorten chains of operators or split the rule with && or ||"
                ),
            });
        }
    }
    Ok(open_depth(&groups))
}

/// The bound so far, as if every open group closed now: each one's content ends in the group
/// open inside it.
fn open_depth(groups: &[Group]) -> usize {
    groups.iter().rev().fold(0, |inner, group| {
        let mut closed = *group;
        closed.term_child = closed.term_child.max(inner);
        closed.depth()
    })
}

/// 1-based line and column (in characters) of byte offset `at`.
pub(crate) fn position(source: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(source.len());
    while !source.is_char_boundary(at) {
        at -= 1;
    }
    let before = &source[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|p| p + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

/// The depth bound of one bracketed group (or of the whole rule) while it is being read.
#[derive(Clone, Copy)]
struct Group {
    /// Levels the group adds around its content.
    cost: usize,
    /// Operators in the current term.
    term_ops: usize,
    /// Deepest group closed inside the current term.
    term_child: usize,
    /// Deepest finished term of the current segment.
    terms_max: usize,
    /// `&&` and `||` in the current segment.
    logical: usize,
    /// `?` in the current segment.
    ternaries: usize,
    /// Deepest finished segment (segments are separated by commas).
    segments_max: usize,
}

impl Group {
    fn new(cost: usize) -> Self {
        Group {
            cost,
            term_ops: 0,
            term_child: 0,
            terms_max: 0,
            logical: 0,
            ternaries: 0,
            segments_max: 0,
        }
    }

    /// A term's operators form one path at most, ending in a leaf or in a group.
    fn term(&self) -> usize {
        self.term_ops + self.term_child.max(1)
    }

    fn end_term(&mut self, logical: bool) {
        self.terms_max = self.terms_max.max(self.term());
        self.term_ops = 0;
        self.term_child = 0;
        if logical {
            self.logical += 1;
        }
    }

    /// A chain of n `&&` (or `||`) is a balanced tree of height ceil(log2 n): the parser
    /// balances it. An `||` chain of `&&` chains stacks two such trees, hence twice the height.
    fn segment(&self) -> usize {
        let terms = self.logical + 1;
        let height = (usize::BITS - (terms - 1).leading_zeros()) as usize;
        self.ternaries + 2 * height + self.terms_max.max(self.term())
    }

    fn end_segment(&mut self) {
        self.segments_max = self.segments_max.max(self.segment());
        let (cost, segments_max) = (self.cost, self.segments_max);
        *self = Group::new(cost);
        self.segments_max = segments_max;
    }

    fn depth(&self) -> usize {
        self.cost + self.segments_max.max(self.segment())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An identifier, keyword, number or string: a leaf.
    Value,
    Open(u8),
    Close,
    /// `&&`, `||`
    Logical,
    Question,
    Colon,
    Comma,
    /// A binary operator other than `&&`/`||`, including `in`.
    Operator,
    /// `!` or a unary `-`
    Unary,
    Dot,
}

struct Token {
    kind: Kind,
    start: usize,
    /// Whether the token follows an operand: `[` then indexes and `(` calls.
    after_operand: bool,
}

/// Just enough of CEL's lexical grammar to find brackets and operators outside string
/// literals and comments.
struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
    /// Whether the previous token ends an operand, so that a `-` is binary.
    operand_before: bool,
}

impl<'a> Scan<'a> {
    fn new(source: &'a str) -> Self {
        Scan {
            bytes: source.as_bytes(),
            at: 0,
            operand_before: false,
        }
    }

    fn peek(&self, ahead: usize) -> u8 {
        self.bytes.get(self.at + ahead).copied().unwrap_or(0)
    }

    fn next_token(&mut self) -> Option<Token> {
        loop {
            let b = self.peek(0);
            if self.at >= self.bytes.len() {
                return None;
            }
            if b.is_ascii_whitespace() {
                self.at += 1;
            } else if b == b'/' && self.peek(1) == b'/' {
                while self.at < self.bytes.len() && self.bytes[self.at] != b'\n' {
                    self.at += 1;
                }
            } else {
                break;
            }
        }
        let start = self.at;
        let b = self.peek(0);
        let kind = if b == b'"' || b == b'\'' {
            self.string(false);
            Kind::Value
        } else if is_word_start(b) {
            let word_end = start
                + self.bytes[start..]
                    .iter()
                    .take_while(|c| is_word(**c))
                    .count();
            let word = &self.bytes[start..word_end];
            let quote = self.bytes.get(word_end).copied().unwrap_or(0);
            if (quote == b'"' || quote == b'\'') && is_string_prefix(word) {
                let raw = word.iter().any(|c| c.eq_ignore_ascii_case(&b'r'));
                self.at = word_end;
                self.string(raw);
                Kind::Value
            } else {
                self.at = word_end;
                if word == b"in" {
                    Kind::Operator
                } else {
                    Kind::Value
                }
            }
        } else if b.is_ascii_digit() || (b == b'.' && self.peek(1).is_ascii_digit()) {
            self.number();
            Kind::Value
        } else {
            let two = [b, self.peek(1)];
            let (kind, len) = match &two {
                b"&&" | b"||" => (Kind::Logical, 2),
                b"==" | b"!=" | b"<=" | b">=" => (Kind::Operator, 2),
                _ => match b {
                    b'(' | b'[' | b'{' => (Kind::Open(b), 1),
                    b')' | b']' | b'}' => (Kind::Close, 1),
                    b'?' => (Kind::Question, 1),
                    b':' => (Kind::Colon, 1),
                    b',' => (Kind::Comma, 1),
                    b'.' => (Kind::Dot, 1),
                    b'!' => (Kind::Unary, 1),
                    b'-' if !self.operand_before => (Kind::Unary, 1),
                    b'<' | b'>' | b'+' | b'-' | b'*' | b'/' | b'%' => (Kind::Operator, 1),
                    // Anything else is the parser's to refuse; one byte at a time keeps the
                    // scan linear and on character boundaries of ASCII.
                    _ => (Kind::Value, 1),
                },
            };
            self.at += len;
            kind
        };
        let after_operand = self.operand_before;
        self.operand_before = matches!(kind, Kind::Value | Kind::Close);
        Some(Token {
            kind,
            start,
            after_operand,
        })
    }

    /// Skips a string or bytes literal starting at the quote; an unterminated one runs to the
    /// end (the parser reports it).
    fn string(&mut self, raw: bool) {
        let quote = self.peek(0);
        let triple = self.peek(1) == quote && self.peek(2) == quote;
        let quote_len = if triple { 3 } else { 1 };
        self.at += quote_len;
        while self.at < self.bytes.len() {
            let b = self.bytes[self.at];
            if b == b'\\' && !raw {
                self.at += 2;
            } else if b == quote && (!triple || (self.peek(1) == quote && self.peek(2) == quote)) {
                self.at += quote_len;
                return;
            } else if b == b'\n' && !triple {
                // A single-quoted string cannot span lines; let the parser say so.
                return;
            } else {
                self.at += 1;
            }
        }
        self.at = self.at.min(self.bytes.len());
    }

    fn number(&mut self) {
        while self.at < self.bytes.len() {
            let b = self.bytes[self.at];
            if b.is_ascii_alphanumeric() || b == b'_' {
                // An exponent's sign belongs to the number: `1e-5`.
                if (b == b'e' || b == b'E')
                    && matches!(self.peek(1), b'+' | b'-')
                    && self.peek(2).is_ascii_digit()
                {
                    self.at += 1;
                }
                self.at += 1;
            } else if b == b'.' && self.peek(1).is_ascii_digit() {
                self.at += 1;
            } else {
                return;
            }
        }
    }
}

fn is_word_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_'
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `r`, `b` and their combinations in either case prefix raw and bytes literals.
fn is_string_prefix(word: &[u8]) -> bool {
    let lower: Vec<u8> = word.iter().map(u8::to_ascii_lowercase).collect();
    matches!(lower.as_slice(), b"r" | b"b" | b"rb" | b"br")
}

/// The direct subexpressions of `node`.
pub(crate) fn children(node: &cel::IdedExpr) -> Vec<&cel::IdedExpr> {
    use cel::common::ast::Expr;
    match &node.expr {
        Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => Vec::new(),
        Expr::Call(call) => call
            .target
            .as_deref()
            .into_iter()
            .chain(&call.args)
            .collect(),
        Expr::Comprehension(c) => vec![
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ],
        Expr::List(list) => list.elements.iter().collect(),
        Expr::Map(map) => map
            .entries
            .iter()
            .flat_map(|e| entry_children(&e.expr))
            .collect(),
        Expr::Struct(s) => s
            .entries
            .iter()
            .flat_map(|e| entry_children(&e.expr))
            .collect(),
        Expr::Select(select) => vec![&*select.operand],
    }
}

/// Depth of a parsed rule's tree, computed without recursion (the tree may be the one that
/// would overflow a recursive walk).
pub(crate) fn ast_depth(expr: &cel::IdedExpr) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(expr, 1usize)];
    while let Some((node, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        let children = children(node);
        stack.extend(children.into_iter().map(|child| (child, depth + 1)));
    }
    deepest
}

fn entry_children(entry: &cel::common::ast::EntryExpr) -> Vec<&cel::IdedExpr> {
    use cel::common::ast::EntryExpr;
    match entry {
        EntryExpr::MapEntry(e) => vec![&e.key, &e.value],
        EntryExpr::StructField(f) => vec![&f.value],
    }
}

/// Nesting of objects and arrays in `value` (a scalar is 0), computed without recursion.
pub(crate) fn json_depth(value: &Json) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((node, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        match node {
            Json::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
            Json::Object(fields) => stack.extend(fields.values().map(|v| (v, depth + 1))),
            _ => {}
        }
    }
    deepest
}

/// Drops a tree without recursing: moves every node's children onto a heap stack first, so a
/// tree of any depth is freed one flat node at a time.
pub(crate) fn dismantle(expr: cel::IdedExpr) {
    use cel::common::ast::{EntryExpr, Expr};
    let mut stack = vec![expr];
    while let Some(mut node) = stack.pop() {
        match std::mem::take(&mut node.expr) {
            Expr::Call(call) => {
                stack.extend(call.target.map(|t| *t));
                stack.extend(call.args);
            }
            Expr::Comprehension(c) => {
                let c = *c;
                stack.extend([
                    c.iter_range,
                    c.accu_init,
                    c.loop_cond,
                    c.loop_step,
                    c.result,
                ]);
            }
            Expr::List(list) => stack.extend(list.elements),
            Expr::Map(map) => {
                for entry in map.entries {
                    match entry.expr {
                        EntryExpr::MapEntry(e) => stack.extend([e.key, e.value]),
                        EntryExpr::StructField(f) => stack.push(f.value),
                    }
                }
            }
            Expr::Struct(s) => {
                for entry in s.entries {
                    match entry.expr {
                        EntryExpr::MapEntry(e) => stack.extend([e.key, e.value]),
                        EntryExpr::StructField(f) => stack.push(f.value),
                    }
                }
            }
            Expr::Select(select) => stack.push(*select.operand),
            Expr::Unspecified | Expr::Ident(_) | Expr::Literal(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::rules::tests::{doc, now, read_input, user};
    use crate::rules::{AuthInfo, NoLookup, Rule};

    /// Families of rules that grow deep with `n`, as a hostile admin (or a leaked service key)
    /// would write them.
    /// A named way of writing a rule `n` levels deep.
    type Family = (&'static str, fn(usize) -> String);

    fn families() -> Vec<Family> {
        vec![
            ("nested parentheses", |n| {
                format!("{}true{}", "(".repeat(n), ")".repeat(n))
            }),
            ("nested sums", |n| {
                format!("{}1{} == 1", "(1 + ".repeat(n), ")".repeat(n))
            }),
            ("&& chain", |n| vec!["true"; n + 1].join(" && ")),
            ("|| chain of && chains", |n| {
                vec!["true && false"; n + 1].join(" || ")
            }),
            ("+ chain", |n| {
                format!("{} == 1", vec!["1"; n + 1].join(" + "))
            }),
            ("! run", |n| format!("{}true", "!".repeat(n))),
            ("- run", |n| format!("{}1 == 1", "-".repeat(n))),
            ("alternating !- run", |n| {
                format!("{}1 == 1", "!-".repeat(n))
            }),
            ("nested lists", |n| {
                format!("size({}1{}) == 1", "[".repeat(n), "]".repeat(n))
            }),
            ("nested maps", |n| {
                format!("size({}1{}) == 1", "{'a': ".repeat(n), "}".repeat(n))
            }),
            ("member chain", |n| {
                format!("resource.data{} == 1", ".a".repeat(n))
            }),
            ("index chain", |n| {
                format!("resource.data.tags{} == 1", "[0]".repeat(n))
            }),
            ("nested calls", |n| {
                format!("{}'a'{} == 1", "size(".repeat(n), ")".repeat(n))
            }),
            ("nested macros", |n| {
                let mut rule = "true".to_string();
                for i in 0..n {
                    rule = format!("[1].all(x{i}, {rule})");
                }
                rule
            }),
            ("ternary chain", |n| {
                format!("{}true", "false ? true : ".repeat(n))
            }),
            ("comparison chain", |n| {
                format!("1 < 2{}", " == true".repeat(n))
            }),
        ]
    }

    fn compiles(rule: &str) -> bool {
        Rule::compile(rule).is_ok()
    }

    /// Chains of `&&`/`||` parse to balanced trees (depth log n): long ones are safe, and only
    /// the length limit stops them.
    const BALANCED: [&str; 2] = ["&& chain", "|| chain of && chains"];

    #[test]
    fn every_deep_family_is_refused_with_a_position_at_300_3000_and_100000() {
        for (name, family) in families() {
            for n in [300, 3000, 100_000] {
                if BALANCED.contains(&name) && family(n).len() <= MAX_RULE_BYTES {
                    Rule::compile(&family(n)).unwrap_or_else(|e| panic!("{name} × {n}: {e}"));
                    continue;
                }
                let rule = family(n);
                let err = Rule::compile(&rule).expect_err(name);
                assert!(
                    err.message.contains("nested")
                        || err.message.contains("nests")
                        || err.message.contains("bytes long"),
                    "{name} × {n}: {err:?}"
                );
                assert!(err.line >= 1 && err.column >= 1, "{name}: {err:?}");
            }
        }
    }

    #[test]
    fn ordinary_depths_compile() {
        for (name, family) in families() {
            assert!(
                compiles(&family(5)),
                "{name} × 5: {:?}",
                Rule::compile(&family(5))
            );
        }
        // A long flat rule is balanced by the parser and stays shallow.
        let clauses: Vec<String> = (0..300)
            .map(|i| format!("resource.data.f{i} == auth.uid"))
            .collect();
        let rule = clauses.join(" || ");
        assert!(rule.len() < MAX_RULE_BYTES);
        Rule::compile(&rule).unwrap();
    }

    #[test]
    fn the_length_limit_counts_bytes() {
        let padding = "x".repeat(MAX_RULE_BYTES - "'' == 'x'".len());
        let at_limit = format!("'{padding}' == 'x'");
        assert_eq!(at_limit.len(), MAX_RULE_BYTES);
        Rule::compile(&at_limit).unwrap();
        let over = format!("'{padding}é' == 'x'");
        let err = Rule::compile(&over).unwrap_err();
        assert!(err.message.contains("bytes long"), "{err:?}");
        let err = Rule::compile(&"a".repeat(1 << 20)).unwrap_err();
        assert!(err.message.contains("bytes long"), "{err:?}");
    }

    #[test]
    fn a_refusal_points_at_where_the_rule_gets_too_deep() {
        let rule = format!("true &&\n  {}1{} == 1", "(".repeat(40), ")".repeat(40));
        let err = Rule::compile(&rule).unwrap_err();
        assert_eq!(err.line, 2, "{err:?}");
        assert!(err.column > 3, "{err:?}");
        assert!(err.message.contains(&MAX_NESTING.to_string()), "{err:?}");
    }

    #[test]
    fn brackets_and_operators_inside_strings_and_comments_do_not_count() {
        let brackets = "(".repeat(200);
        for rule in [
            format!("resource.data.a == '{brackets}'"),
            format!("resource.data.a == \"{brackets}\""),
            format!("resource.data.a == '''{brackets}'''"),
            format!("resource.data.a == r'\\{brackets}'"),
            format!("resource.data.a == b'{brackets}'"),
            format!("resource.data.a == 'it\\'s {brackets}'"),
            format!("// {brackets}\nresource.data.a == 1"),
            format!("resource.data.a == '{}'", "!-".repeat(500)),
        ] {
            Rule::compile(&rule).unwrap_or_else(|e| panic!("{rule}: {e}"));
        }
    }

    /// The pre-scan's estimate is an upper bound of the parsed depth, whatever the rule.
    #[test]
    fn the_estimate_bounds_the_parsed_depth() {
        let mut corpus: Vec<String> = vec![
            "auth != null && resource.data.owner == auth.uid",
            "resource.data.public == true || (auth != null && resource.data.author == auth.uid)",
            "a.b.c.d(e[f].g, {h: [i, -j]})",
            "a ? b ? c : d : e ? f : g",
            "!a.b.all(x, x.c.exists(y, y > -x.d[0] && !y.e.map(z, z * 2, z + 1).filter(w, w in [1, 2]).size() == 0))",
            "a.exists_one(x, x) || has(a.b.c) && -a < b - -c * d % e / f",
            "[a, b, [c, [d, [e]]]][0][1][1][1][0] == {'k': {'l': [m]}}.k.l[0]",
            "!!!(!-!-a) && !(!(b)) || --c == d",
            "a in b ? c in d : e in f",
        ]
        .into_iter()
        .map(str::to_string)
        .collect();
        for (_, family) in families() {
            corpus.extend((0..12).map(family));
        }
        for source in corpus {
            let Ok(expr) = cel::parser::PrattParser::new()
                .max_recursion_depth(u16::MAX)
                .parse(&source)
            else {
                continue;
            };
            let actual = ast_depth(&expr);
            let bound =
                depth_bound(&source, usize::MAX).unwrap_or_else(|r| panic!("{}", r.message));
            assert!(actual <= bound, "{source}: parsed {actual} > bound {bound}");
        }
    }

    /// Runs `f` on a thread with the stack of a tokio worker (the smallest any rule code runs
    /// on); a stack overflow aborts the whole test binary, so passing means it fits.
    fn on_a_worker_stack(f: impl FnOnce() + Send + 'static) {
        std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(f)
            .unwrap()
            .join()
            .unwrap();
    }

    /// The deepest rule of each family that still compiles is compiled, evaluated and pushed
    /// down on a 2 MiB stack (run in debug and release builds: debug frames are the larger).
    #[test]
    fn the_deepest_accepted_rules_run_on_a_worker_stack() {
        on_a_worker_stack(|| {
            for (name, family) in families() {
                let mut n = 1;
                while compiles(&family(n + 1)) {
                    n += 1;
                }
                let rule = Rule::compile(&family(n)).unwrap();
                let data = json!({"tags": [[[[1]]]], "a": {"a": {"a": 1}}});
                for auth in [None, Some(user("u1"))] {
                    let input = read_input(auth.clone(), doc("d1", data.clone()));
                    rule.evaluate(&input, &NoLookup).unwrap();
                    rule.pushdown(auth.as_ref(), now());
                }
                assert!(n >= 8, "{name}: only {n} levels compile");
            }
        });
    }

    fn nested_object(depth: usize) -> Json {
        let mut value = json!(1);
        for _ in 0..depth {
            value = json!({ "a": value });
        }
        value
    }

    fn nested_array(depth: usize) -> Json {
        let mut value = json!(1);
        for _ in 0..depth {
            value = json!([value]);
        }
        value
    }

    #[test]
    fn deep_documents_and_claims_evaluate_on_a_worker_stack_or_deny() {
        on_a_worker_stack(|| {
            let rule = Rule::compile(
                "resource.data == request.data && resource.data.a != auth.claims.a && size(resource.data) == 1",
            )
            .unwrap();
            for make in [nested_object, nested_array] {
                // The document wrapper adds one level to `data`.
                let fits = make(MAX_VALUE_DEPTH - 1);
                let too_deep = make(MAX_VALUE_DEPTH + 1);
                let input = |data: &Json, claims: &Json| {
                    let mut input = read_input(
                        Some(AuthInfo {
                            claims: claims.clone(),
                            ..user("u1")
                        }),
                        doc("d1", data.clone()),
                    );
                    input.request.data = Some(data.clone());
                    input
                };
                let claims = json!({"a": nested_object(MAX_VALUE_DEPTH - 1)});
                // Evaluated (both sides compared level by level): no overflow.
                rule.evaluate(&input(&fits, &claims), &NoLookup).unwrap();
                assert!(!rule
                    .evaluate(&input(&too_deep, &claims), &NoLookup)
                    .unwrap());
                let deep_claims = json!({"a": nested_object(MAX_VALUE_DEPTH + 1)});
                assert!(!rule
                    .evaluate(&input(&fits, &deep_claims), &NoLookup)
                    .unwrap());
                let deep_caller = AuthInfo {
                    claims: deep_claims,
                    ..user("u1")
                };
                // Evaluation denies such a caller everything; so does the query plan.
                assert_eq!(
                    Rule::compile("true || auth.uid == 'u1'")
                        .unwrap()
                        .pushdown(Some(&deep_caller), now()),
                    crate::rules::Pushdown::Deny
                );
                assert_eq!(
                    Rule::compile("auth.uid == 'u1'")
                        .unwrap()
                        .pushdown(Some(&deep_caller), now()),
                    crate::rules::Pushdown::Deny
                );
            }
        });
    }

    #[test]
    fn a_fetched_document_too_deep_to_read_still_exists() {
        let mut fetched = crate::rules::Fetched::new();
        fetched.insert(
            ("c".to_string(), "deep".to_string()),
            Some(doc("deep", nested_object(MAX_VALUE_DEPTH + 1))),
        );
        let input = read_input(None, doc("d1", json!({})));
        let decided = |source: &str| {
            Rule::compile(source)
                .unwrap()
                .evaluate_with(&input, &fetched)
        };
        use crate::rules::Evaluation::Decided;
        assert_eq!(decided("exists('c', 'deep')"), Ok(Decided(true)));
        assert_eq!(decided("get('c', 'deep') != null"), Ok(Decided(false)));
        assert_eq!(decided("!(get('c', 'deep') != null)"), Ok(Decided(false)));
    }

    #[test]
    fn dismantling_frees_a_tree_too_deep_to_drop_recursively() {
        let source = format!("{} == 1", vec!["1"; 200_000].join("+"));
        let expr = cel::parser::PrattParser::new()
            .max_recursion_depth(u16::MAX)
            .parse(&source)
            .unwrap();
        assert!(ast_depth(&expr) > 100_000);
        on_a_worker_stack(move || dismantle(expr));
    }
}
