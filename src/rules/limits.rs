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
        // The open groups stack: each one's bound so far, plus what is open inside it.
        let depth: usize = groups.iter().map(Group::depth).sum();
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
    Ok(groups.iter().map(Group::depth).sum())
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

/// Depth of a parsed rule's tree, computed without recursion (the tree may be the one that
/// would overflow a recursive walk).
pub(crate) fn ast_depth(expr: &cel::IdedExpr) -> usize {
    use cel::common::ast::Expr;
    let mut deepest = 0;
    let mut stack = vec![(expr, 1usize)];
    while let Some((node, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        let children: Vec<&cel::IdedExpr> = match &node.expr {
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
        };
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
