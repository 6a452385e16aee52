//! The rule language's semantics as a table: rule text, caller, document, expected outcome.
//!
//! This is what rule authors rely on, whatever CEL crate runs underneath. cel-parser 0.10.1
//! read `!!false` as `!false`, which turned a read rule meant to deny everything into one that
//! allowed everything; a future upgrade that breaks negation, precedence, null handling or any
//! other row here fails this test instead of failing open in production. Every row that
//! compiles is also checked against pushdown: where the rule becomes a query plan, the plan
//! must admit exactly what evaluation admits.

use serde_json::{json, Value as Json};

use super::tests::{doc, matches, now, read_input, user};
use super::{AuthInfo, NoLookup, Pushdown, Rule};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Allow,
    Deny,
    /// Refused at compile time.
    Refused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    Anonymous,
    SignedIn,
    /// Both callers, same outcome.
    Anyone,
}

use Want::*;
use Who::*;

struct Row {
    rule: &'static str,
    who: Who,
    data: Option<Json>,
    want: Want,
}

fn row(rule: &'static str, who: Who, want: Want) -> Row {
    Row {
        rule,
        who,
        data: None,
        want,
    }
}

fn row_with(rule: &'static str, who: Who, data: Json, want: Want) -> Row {
    Row {
        rule,
        who,
        data: Some(data),
        want,
    }
}

/// The stored document's `data` unless a row brings its own.
fn default_data() -> Json {
    json!({
        "flag": true,
        "off": false,
        "name": "Alice",
        "n": 3,
        "x": 3.0,
        "f": 2.5,
        "nothing": null,
        "tags": ["a", "b"],
        "members": ["u1"],
        "public": "yes",
        "owner": "u1",
        "status": "open",
        "size": 3,
    })
}

fn signed_in() -> AuthInfo {
    AuthInfo {
        claims: json!({"role": "editor", "level": 3, "tags": ["a", "b"], "nested": {"x": null}}),
        ..user("u1")
    }
}

fn rows() -> Vec<Row> {
    vec![
        // Negation: even runs cancel, odd runs negate, never the other way round.
        row("!!false", Anyone, Deny),
        row("!!true", Anyone, Allow),
        row("!!!true", Anyone, Deny),
        row("!!!false", Anyone, Allow),
        row("!!!!false", Anyone, Deny),
        row("!!(1 == 2)", Anyone, Deny),
        row("!!(1 == 1)", Anyone, Allow),
        row("!(!(1 == 2))", Anyone, Deny),
        row("! ! false", Anyone, Deny),
        row("--1 == 1", Anyone, Allow),
        row("--1 == -1", Anyone, Deny),
        row("-(-1) == 1", Anyone, Allow),
        row("---1 == -1", Anyone, Allow),
        row("- -1 == 1", Anyone, Allow),
        row("-(-(-1)) == -1", Anyone, Allow),
        row("!!resource.data.flag", Anyone, Allow),
        row("!!resource.data.off", Anyone, Deny),
        row("!resource.data.off", Anyone, Allow),
        // `!` and `?:` need bools; a double negation cannot make a string truthy.
        row("!!resource.data.name", Anyone, Deny),
        row("!resource.data.name", Anyone, Deny),
        row("!-1 == 1", Anyone, Deny),
        // Precedence.
        row("!true && false", Anyone, Deny),
        row("!(true && false)", Anyone, Allow),
        row("!false && true", Anyone, Allow),
        row("true || true && false", Anyone, Allow),
        row("(true || true) && false", Anyone, Deny),
        row("false && true || true", Anyone, Allow),
        row("false && (true || true)", Anyone, Deny),
        row("1 + 2 * 3 == 7", Anyone, Allow),
        row("(1 + 2) * 3 == 9", Anyone, Allow),
        row("10 - 2 - 3 == 5", Anyone, Allow),
        row("2 * 3 % 4 == 2", Anyone, Allow),
        row("1 < 2 == true", Anyone, Allow),
        row("1 < 2 && 2 < 3", Anyone, Allow),
        row("1 + 1 == 2 && 3 > 2", Anyone, Allow),
        row("true || false ? false : true", Anyone, Deny),
        row("1 == 1 ? 2 == 2 : false", Anyone, Allow),
        row("-resource.data.n < 0", Anyone, Allow),
        // null and missing values.
        row("auth == null", Anonymous, Allow),
        row("auth == null", SignedIn, Deny),
        row("auth != null", Anonymous, Deny),
        row("auth != null", SignedIn, Allow),
        row("auth.uid == 'u1'", Anonymous, Deny),
        row("auth.uid == 'u1'", SignedIn, Allow),
        row("auth == null || auth.uid == 'u1'", Anyone, Allow),
        // `||` and `&&` are commutative over errors.
        row("auth.uid == 'u1' || auth == null", Anyone, Allow),
        row("auth.uid != 'u1' && auth != null", Anyone, Deny),
        row("resource.data.missing == 1 || true", Anyone, Allow),
        row("true || resource.data.missing == 1", Anyone, Allow),
        row("resource.data.missing == 1 && false", Anyone, Deny),
        row("!(resource.data.missing == 1 && false)", Anyone, Allow),
        row("!(resource.data.missing == 1 || true)", Anyone, Deny),
        row("resource.data.missing == 1 || false", Anyone, Deny),
        row("!(resource.data.missing == 1)", Anyone, Deny),
        row("resource.data.missing == null", Anyone, Deny),
        row("resource.data.missing.deeper == 1", Anyone, Deny),
        row("resource.data.nothing == null", Anyone, Allow),
        row("resource.data.nothing == false", Anyone, Deny),
        row("resource.data.nothing.x == 1", Anyone, Deny),
        row("null == null", Anyone, Allow),
        row("auth.claims.nested.x == null", SignedIn, Allow),
        row("auth.claims.missing == 'x'", SignedIn, Deny),
        // has()
        row("has(resource.data.flag)", Anyone, Allow),
        row("has(resource.data.missing)", Anyone, Deny),
        row("!has(resource.data.missing)", Anyone, Allow),
        row("has(resource.data.nothing)", Anyone, Allow),
        row("has(resource.data.name.first)", Anyone, Deny),
        row("has(auth.claims.role)", SignedIn, Allow),
        row("has(auth.claims.role)", Anonymous, Deny),
        row("has(resource.data.size)", Anyone, Allow),
        // in: list membership by CEL equality, map key presence, never a substring test.
        row("'a' in ['a', 'b']", Anyone, Allow),
        row("'c' in ['a', 'b']", Anyone, Deny),
        row("1 in [1.0, 2]", Anyone, Allow),
        row("1 in ['1']", Anyone, Deny),
        row("[1, 2] in [[1, 2]]", Anyone, Allow),
        row("'k' in {'k': 1}", Anyone, Allow),
        row("1 in {'k': 1}", Anyone, Deny),
        row("'v' in {'k': 'v'}", Anyone, Deny),
        row("'b' in 'abc'", Anyone, Deny),
        row("!('b' in 'abc')", Anyone, Deny),
        row("'a' in resource.data.tags", Anyone, Allow),
        row("'z' in resource.data.tags", Anyone, Deny),
        row("'a' in auth.claims.tags", SignedIn, Allow),
        row("auth.uid in resource.data.members", SignedIn, Allow),
        row_with(
            "auth.uid in resource.data.members",
            SignedIn,
            json!({"members": {"u1": "admin"}}),
            Allow,
        ),
        row_with(
            "auth.uid in resource.data.members",
            SignedIn,
            json!({"members": "u1"}),
            Deny,
        ),
        row("resource.data.status in ['open', 'held']", Anyone, Allow),
        row("resource.data.status in []", Anyone, Deny),
        row("resource.data.n in [3.0]", Anyone, Allow),
        // Strings.
        row("resource.data.name.startsWith('Al')", Anyone, Allow),
        row("resource.data.name.startsWith('al')", Anyone, Deny),
        row("resource.data.name.endsWith('ce')", Anyone, Allow),
        row("resource.data.name.contains('lic')", Anyone, Allow),
        row("resource.data.name.contains('')", Anyone, Allow),
        row("resource.data.name.matches('^A.*e$')", Anyone, Allow),
        row("resource.data.name.matches('^l')", Anyone, Deny),
        row("resource.data.name.matches('[')", Anyone, Deny),
        row("size(resource.data.name) == 5", Anyone, Allow),
        row("resource.data.name.size() == 5", Anyone, Allow),
        row("size('héllo') == 5", Anyone, Allow),
        row("resource.data.n.startsWith('3')", Anyone, Deny),
        row("resource.data.name + '!' == 'Alice!'", Anyone, Allow),
        row("resource.data.name < 'Bob'", Anyone, Allow),
        // Lists and macros.
        row("size(resource.data.tags) == 2", Anyone, Allow),
        row("resource.data.tags.size() == 2", Anyone, Allow),
        row("resource.data.tags[0] == 'a'", Anyone, Allow),
        row("resource.data.tags[5] == 'a'", Anyone, Deny),
        row("[1, 2, 3].exists(x, x > 2)", Anyone, Allow),
        row("[1, 2, 3].exists(x, x > 3)", Anyone, Deny),
        row("[1, 2, 3].all(x, x > 0)", Anyone, Allow),
        row("[1, 2, 3].all(x, x > 1)", Anyone, Deny),
        row("[].all(x, x > 1)", Anyone, Allow),
        row("[].exists(x, true)", Anyone, Deny),
        row("[1, 2, 3].exists_one(x, x > 2)", Anyone, Allow),
        row("[1, 2, 3].exists_one(x, x > 1)", Anyone, Deny),
        row("[1, 2, 3].filter(x, x > 1) == [2, 3]", Anyone, Allow),
        row("[1, 2, 3].map(x, x * 2) == [2, 4, 6]", Anyone, Allow),
        row("[1, 2, 3].map(x, x > 1, x * 10) == [20, 30]", Anyone, Allow),
        row("[1, 'a'].exists(x, x == 'a')", Anyone, Allow),
        row("[1, 'a'].all(x, x > 0)", Anyone, Deny),
        row("['a', 1].exists(x, x > 0)", Anyone, Allow),
        row("{'a': 1}.all(k, k == 'a')", Anyone, Allow),
        row("resource.data.name.exists(c, c == 'A')", Anyone, Deny),
        row("resource.data.tags.exists(t, t == auth.uid)", SignedIn, Deny),
        row("resource.data.members.exists(m, m == auth.uid)", SignedIn, Allow),
        row("resource.data.members.exists(m, m == auth.uid)", Anonymous, Deny),
        row("{'a': 1, 'a': 2}.size() == 2", Anyone, Deny),
        // Ternaries.
        row("resource.data.flag ? true : false", Anyone, Allow),
        row("resource.data.off ? true : false", Anyone, Deny),
        row("resource.data.name ? true : true", Anyone, Deny),
        row("true ? 'yes' : false", Anyone, Deny),
        row("false ? resource.data.missing : true", Anyone, Allow),
        row("true ? resource.data.missing : true", Anyone, Deny),
        row(
            "auth == null ? resource.data.status == 'open' : resource.data.owner == auth.uid",
            Anyone,
            Allow,
        ),
        // Cross-type comparisons: numbers compare across int, uint and double; nothing else
        // converts.
        row("1 == 1.0", Anyone, Allow),
        row("1 == 1u", Anyone, Allow),
        row("1.0 == 1u", Anyone, Allow),
        row("'1' == 1", Anyone, Deny),
        row("'1' != 1", Anyone, Allow),
        row("1 < 1.5", Anyone, Allow),
        row("1u < 2", Anyone, Allow),
        row("1 < 'a'", Anyone, Deny),
        row("!(1 < 'a')", Anyone, Deny),
        row("false < true", Anyone, Allow),
        row("null == 0", Anyone, Deny),
        row("[1] == [1.0]", Anyone, Allow),
        row("{'a': 1} == {'a': 1.0}", Anyone, Allow),
        row("resource.data.n == 3", Anyone, Allow),
        row("resource.data.x == 3", Anyone, Allow),
        row("resource.data.n == 3.0 && resource.data.x == 3u", Anyone, Allow),
        row("resource.data.f > resource.data.n", Anyone, Deny),
        row("resource.data.public == true", Anyone, Deny),
        row("resource.data.owner == 1", Anyone, Deny),
        row("resource.data.size == 3", Anyone, Allow),
        // Arithmetic and overflow: an overflow is an error, never a wrapped number.
        row("9223372036854775807 + 1 > 0", Anyone, Deny),
        row("!(9223372036854775807 + 1 > 0)", Anyone, Deny),
        row("-9223372036854775808 - 1 < 0", Anyone, Deny),
        row("9223372036854775807 * 2 > 0", Anyone, Deny),
        row("-(-9223372036854775808) > 0", Anyone, Deny),
        row("18446744073709551615u + 1u > 0u", Anyone, Deny),
        row("0u - 1u > 0u", Anyone, Deny),
        row("1u + 1 == 2", Anyone, Deny),
        row("1 + 1.0 == 2.0", Anyone, Deny),
        row("7 / 2 == 3", Anyone, Allow),
        row("-7 / 2 == -3", Anyone, Allow),
        row("7 % 3 == 1", Anyone, Allow),
        row("1 / 0 == 0", Anyone, Deny),
        row("1 % 0 == 0", Anyone, Deny),
        row("7.0 / 2.0 == 3.5", Anyone, Allow),
        row("1.0 / 0.0 > 1e308", Anyone, Allow),
        row("int(9.9e20) > 0", Anyone, Deny),
        row("int('12') == 12", Anyone, Allow),
        row("uint(-1) == 0u", Anyone, Deny),
        row("double(1) == 1.0", Anyone, Allow),
        row("string(1) == '1'", Anyone, Allow),
        row("resource.data.n + 1 == 4", Anyone, Allow),
        row("resource.data.n * 1.5 > 0.0", Anyone, Deny),
        // Timestamps and durations.
        row("resource.created_at < request.time", Anyone, Allow),
        row("resource.updated_at > resource.created_at", Anyone, Allow),
        row(
            "resource.created_at == timestamp('2024-06-01T00:00:00Z')",
            Anyone,
            Allow,
        ),
        row(
            "resource.created_at == timestamp('2024-06-01T02:00:00+02:00')",
            Anyone,
            Allow,
        ),
        row("resource.created_at == '2024-06-01T00:00:00Z'", Anyone, Deny),
        row("resource.created_at < 5", Anyone, Deny),
        row(
            "request.time - resource.created_at > duration('24h')",
            Anyone,
            Allow,
        ),
        row("duration('1h') < duration('61m')", Anyone, Allow),
        row("duration('1h') == duration('3600s')", Anyone, Allow),
        row(
            "timestamp('2024-01-01T00:00:00Z') + duration('24h') == timestamp('2024-01-02T00:00:00Z')",
            Anyone,
            Allow,
        ),
        row("timestamp('bad') < request.time", Anyone, Deny),
        row("request.time.getFullYear() == 2025", Anyone, Allow),
        row("resource.created_at.getMonth() == 5", Anyone, Allow),
        row("resource.id == 'd1'", Anyone, Allow),
        row("resource.version == 1", Anyone, Allow),
        // Refused at compile time.
        row("1 +", Anyone, Refused),
        row("(", Anyone, Refused),
        row("a == ", Anyone, Refused),
        row("resource.data.x == 1)", Anyone, Refused),
        row("'abc", Anyone, Refused),
        row("user.id == 1", Anyone, Refused),
        row("max(1, 2) == 2", Anyone, Refused),
        row("get('a') == null", Anyone, Refused),
        row("Foo{a: 1} == null", Anyone, Refused),
        row("{'a': 1}.?a == 1", Anyone, Refused),
        row("resource.data.`a-b` == 1", Anyone, Refused),
        row("   ", Anyone, Refused),
    ]
}

#[test]
fn rule_semantics_match_the_table() {
    let mut failures = Vec::new();
    for row in rows() {
        let rule = match (Rule::compile(row.rule), row.want) {
            (Err(_), Refused) => continue,
            (Err(error), want) => {
                failures.push(format!("{:?}: wanted {want:?}, refused: {error}", row.rule));
                continue;
            }
            (Ok(_), Refused) => {
                failures.push(format!("{:?}: compiled, wanted it refused", row.rule));
                continue;
            }
            (Ok(rule), _) => rule,
        };
        let callers: Vec<Option<AuthInfo>> = match row.who {
            Anonymous => vec![None],
            SignedIn => vec![Some(signed_in())],
            Anyone => vec![None, Some(signed_in())],
        };
        let document = doc("d1", row.data.clone().unwrap_or_else(default_data));
        for auth in callers {
            let input = read_input(auth.clone(), document.clone());
            let allowed = match rule.evaluate(&input, &NoLookup) {
                Ok(allowed) => allowed,
                Err(error) => {
                    failures.push(format!("{:?}: not decided: {error}", row.rule));
                    continue;
                }
            };
            let who = if auth.is_some() { "u1" } else { "anonymous" };
            if allowed != (row.want == Allow) {
                failures.push(format!(
                    "{:?} for {who}: wanted {:?}, got {}",
                    row.rule,
                    row.want,
                    if allowed { "Allow" } else { "Deny" }
                ));
            }
            let plan = rule.pushdown(auth.as_ref(), now());
            let agrees = match &plan {
                Pushdown::Allow => allowed,
                Pushdown::Deny => !allowed,
                Pushdown::Filter(filter) => matches(filter, &document) == allowed,
                Pushdown::Partial { filter } => !allowed || matches(filter, &document),
                Pushdown::Residual => true,
            };
            if !agrees {
                failures.push(format!(
                    "{:?} for {who}: evaluation {allowed}, pushdown {plan:?}",
                    row.rule
                ));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The negation bypass of cel-parser 0.10.1, as a read rule: the query plan and every
/// document must be "deny".
#[test]
fn a_double_negated_false_read_rule_denies_everything() {
    for source in [
        "!!false",
        "!!!!false",
        "!!(1 == 2)",
        "!(!(false))",
        "--1 == -1",
    ] {
        let rule = Rule::compile(source).unwrap();
        for auth in [None, Some(signed_in())] {
            assert_eq!(
                rule.pushdown(auth.as_ref(), now()),
                Pushdown::Deny,
                "{source}"
            );
            let input = read_input(auth, doc("d1", default_data()));
            assert!(!rule.evaluate(&input, &NoLookup).unwrap(), "{source}");
        }
    }
}

/// Every builtin the compile-time check lets through is one the interpreter knows: a
/// function dropped by an upgrade would otherwise compile and deny at run time.
#[test]
fn every_listed_builtin_is_known_to_the_interpreter() {
    let uses = [
        ("contains", "'abc'.contains('b')"),
        ("size", "size('abc') == 3"),
        ("startsWith", "'abc'.startsWith('a')"),
        ("endsWith", "'abc'.endsWith('c')"),
        ("string", "string(1) == '1'"),
        ("bytes", "bytes('a') == b'a'"),
        ("double", "double(1) == 1.0"),
        ("int", "int(1.5) == 1"),
        ("uint", "uint(1) == 1u"),
        ("matches", "'abc'.matches('^a')"),
        ("duration", "duration('1s') > duration('0s')"),
        (
            "timestamp",
            "timestamp('2024-01-01T00:00:00Z') < request.time",
        ),
        ("getFullYear", "request.time.getFullYear() == 2025"),
        ("getMonth", "request.time.getMonth() == 0"),
        ("getDayOfYear", "request.time.getDayOfYear() == 0"),
        ("getDayOfMonth", "request.time.getDayOfMonth() == 0"),
        ("getDate", "request.time.getDate() == 1"),
        ("getDayOfWeek", "request.time.getDayOfWeek() == 3"),
        ("getHours", "request.time.getHours() == 12"),
        ("getMinutes", "request.time.getMinutes() == 0"),
        ("getSeconds", "request.time.getSeconds() == 0"),
        ("getMilliseconds", "request.time.getMilliseconds() == 0"),
        ("get", "get('c', 'a') == null"),
        ("exists", "!exists('c', 'a')"),
    ];
    let listed: Vec<&str> = uses.iter().map(|(name, _)| *name).collect();
    assert_eq!(listed, super::check::FUNCTIONS.to_vec());
    let fetched: super::Fetched = [(("c".to_string(), "a".to_string()), None)].into();
    for (name, source) in uses {
        let rule = Rule::compile(source).unwrap_or_else(|e| panic!("{name}: {e}"));
        let input = read_input(None, doc("d1", json!({})));
        assert_eq!(
            rule.evaluate_with(&input, &fetched),
            Ok(super::Evaluation::Decided(true)),
            "{name}: {source}"
        );
    }
}
