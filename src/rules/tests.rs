use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{json, Value as Json};

use super::*;

pub(super) fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 1, 12, 0, 0).unwrap()
}

pub(super) fn user(uid: &str) -> AuthInfo {
    AuthInfo {
        uid: uid.to_string(),
        role: "authenticated".to_string(),
        email: Some(format!("{uid}@example.com")),
        email_verified: true,
        is_anonymous: false,
        claims: json!({}),
    }
}

fn moderator(uid: &str) -> AuthInfo {
    AuthInfo {
        claims: json!({"role": "moderator"}),
        ..user(uid)
    }
}

pub(super) fn doc(id: &str, data: Json) -> Json {
    json!({
        "id": id,
        "data": data,
        "version": 1,
        "created_at": "2024-06-01T00:00:00Z",
        "updated_at": "2024-06-02T00:00:00Z",
    })
}

pub(super) fn read_input(auth: Option<AuthInfo>, resource: Json) -> RuleInput {
    RuleInput {
        auth,
        resource: Some(resource),
        request: RequestInfo {
            method: "GET".to_string(),
            time: now(),
            data: None,
            extra: Default::default(),
        },
    }
}

pub(super) fn create_input(auth: Option<AuthInfo>, data: Json) -> RuleInput {
    RuleInput {
        auth,
        resource: None,
        request: RequestInfo {
            method: "POST".to_string(),
            time: now(),
            data: Some(data),
            extra: Default::default(),
        },
    }
}

fn allows(rule: &str, input: &RuleInput) -> bool {
    Rule::compile(rule)
        .unwrap()
        .evaluate(input, &NoLookup)
        .unwrap()
}

fn pushdown(rule: &str, auth: Option<&AuthInfo>) -> Pushdown {
    Rule::compile(rule).unwrap().pushdown(auth, now())
}

/// An in-memory store for `get()`/`exists()` that counts reads.
#[derive(Default)]
struct Docs {
    docs: HashMap<(String, String), Json>,
    reads: AtomicUsize,
}

impl Docs {
    fn with(mut self, collection: &str, id: &str, data: Json) -> Self {
        self.docs
            .insert((collection.to_string(), id.to_string()), doc(id, data));
        self
    }
}

impl DocumentLookup for Docs {
    fn get(&self, collection: &str, id: &str) -> Result<Option<Json>, String> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(self
            .docs
            .get(&(collection.to_string(), id.to_string()))
            .cloned())
    }
}

const OWNER_TODOS: &str = "auth != null && resource.data.owner == auth.uid";
const POSTS_READ: &str =
    "resource.data.public == true || (auth != null && resource.data.author == auth.uid)";
const POSTS_CREATE: &str = "auth != null && request.data.author == auth.uid";
const MODERATOR: &str = "auth.claims.role == \"moderator\"";

// ---- compile -------------------------------------------------------------------------------

#[test]
fn syntax_errors_carry_their_position() {
    let err = Rule::compile("auth != null &&\n  resource.data.owner == ").unwrap_err();
    assert_eq!(err.line, 2, "{err:?}");
    assert!(err.column > 1, "{err:?}");

    let err = Rule::compile("auth.uid == 'a' )").unwrap_err();
    assert_eq!((err.line, err.column), (1, 17), "{err:?}");
}

#[test]
fn an_empty_rule_does_not_compile_to_allow() {
    for source in ["", "   ", "\n"] {
        let err = Rule::compile(source).unwrap_err();
        assert_eq!((err.line, err.column), (1, 1));
    }
}

#[test]
fn unknown_identifiers_are_refused_with_their_position() {
    let err = Rule::compile("auth != null &&\n  usr.uid == 'usr'").unwrap_err();
    assert!(err.message.contains("`usr`"), "{err:?}");
    assert_eq!((err.line, err.column), (2, 3));
}

#[test]
fn unknown_functions_and_wrong_lookup_arity_are_refused() {
    let err = Rule::compile("lookup('a', 'b') != null").unwrap_err();
    assert!(err.message.contains("`lookup`"), "{err:?}");
    assert_eq!((err.line, err.column), (1, 1));
    assert!(Rule::compile("get('teams') != null").is_err());
    assert!(Rule::compile("resource.get('teams', 'a') != null").is_err());
}

#[test]
fn macro_variables_builtins_and_lookups_compile() {
    for source in [
        "resource.data.tags.exists(t, t == 'a')",
        "resource.data.tags.all(t, size(t) > 0) && has(resource.data.tags)",
        "resource.data.name.startsWith('a') && request.time > resource.created_at",
        "exists('teams', resource.data.team) && get('teams', resource.data.team).data.open",
        "true",
    ] {
        Rule::compile(source).unwrap_or_else(|e| panic!("{source}: {e}"));
    }
}

#[test]
fn a_rule_keeps_its_source_and_is_shareable() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Rule>();
    let rule = Rule::compile(OWNER_TODOS).unwrap();
    assert_eq!(rule.clone().source(), OWNER_TODOS);
}

// ---- evaluate ------------------------------------------------------------------------------

#[test]
fn owner_only_todos() {
    let todo = doc("t1", json!({"owner": "u1", "title": "milk"}));
    assert!(allows(
        OWNER_TODOS,
        &read_input(Some(user("u1")), todo.clone())
    ));
    assert!(!allows(
        OWNER_TODOS,
        &read_input(Some(user("u2")), todo.clone())
    ));
    assert!(!allows(OWNER_TODOS, &read_input(None, todo)));
}

#[test]
fn public_read_owner_write_posts() {
    let public = doc("p1", json!({"public": true, "author": "u1"}));
    let private = doc("p2", json!({"public": false, "author": "u1"}));
    let no_flag = doc("p3", json!({"author": "u1"}));
    assert!(allows(POSTS_READ, &read_input(None, public.clone())));
    assert!(allows(POSTS_READ, &read_input(Some(user("u2")), public)));
    assert!(allows(
        POSTS_READ,
        &read_input(Some(user("u1")), private.clone())
    ));
    assert!(!allows(
        POSTS_READ,
        &read_input(Some(user("u2")), private.clone())
    ));
    assert!(!allows(POSTS_READ, &read_input(None, private)));
    // A missing `public` field is an error on the left of `||`; the right side still decides.
    assert!(allows(
        POSTS_READ,
        &read_input(Some(user("u1")), no_flag.clone())
    ));
    assert!(!allows(POSTS_READ, &read_input(None, no_flag)));

    let mine = json!({"author": "u1", "title": "hi"});
    assert!(allows(
        POSTS_CREATE,
        &create_input(Some(user("u1")), mine.clone())
    ));
    assert!(!allows(
        POSTS_CREATE,
        &create_input(Some(user("u2")), mine.clone())
    ));
    assert!(!allows(POSTS_CREATE, &create_input(None, mine)));
    assert!(!allows(
        POSTS_CREATE,
        &create_input(Some(user("u1")), json!({"title": "x"}))
    ));
}

#[test]
fn moderator_role_claims() {
    let post = doc("p1", json!({"author": "u1"}));
    assert!(allows(
        MODERATOR,
        &read_input(Some(moderator("m")), post.clone())
    ));
    assert!(!allows(
        MODERATOR,
        &read_input(Some(user("u2")), post.clone())
    ));
    assert!(!allows(MODERATOR, &read_input(None, post)));
}

#[test]
fn null_auth_and_missing_fields_deny_without_panicking() {
    let todo = doc("t1", json!({"title": "milk", "name": "abc"}));
    for rule in [
        "auth.uid == 'u1'",
        "resource.data.owner == auth.uid",
        "resource.data.missing.deeper == 1",
        "request.data.author == 'u1'",
        "resource.data.name.exists(c, c == 'a')",
        "resource.data.name",
        "auth.uid",
        "1 < 'a'",
        "'bc' in resource.data.name",
    ] {
        assert!(!allows(rule, &read_input(None, todo.clone())), "{rule}");
    }
}

#[test]
fn non_bool_operands_of_logic_deny() {
    let post = doc("p1", json!({"title": "x"}));
    // cel-interpreter alone would call a non-empty string truthy.
    assert!(!allows(
        "resource.data.title && true",
        &read_input(None, post.clone())
    ));
    assert!(!allows("!resource.data.title", &read_input(None, post)));
}

#[test]
fn metadata_and_request_time_are_comparable() {
    let post = doc("p1", json!({}));
    let input = read_input(None, post);
    assert!(allows("resource.created_at < request.time", &input));
    assert!(allows(
        "request.time - resource.updated_at > duration('24h')",
        &input
    ));
    assert!(allows(
        "resource.id == 'p1' && resource.version == 1",
        &input
    ));
}

#[test]
fn get_and_exists_read_other_documents() {
    let docs = Docs::default().with("teams", "t1", json!({"members": ["u1", "u2"]}));
    let rule = Rule::compile(
        "exists('teams', resource.data.team) && auth.uid in get('teams', resource.data.team).data.members",
    )
    .unwrap();
    let input =
        |uid: &str, team: &str| read_input(Some(user(uid)), doc("d", json!({"team": team})));
    assert!(rule.evaluate(&input("u1", "t1"), &docs).unwrap());
    assert!(!rule.evaluate(&input("u3", "t1"), &docs).unwrap());
    assert!(!rule.evaluate(&input("u1", "nope"), &docs).unwrap());
    // Repeated reads of one document are served from the evaluation's cache.
    let before = docs.reads.load(Ordering::SeqCst);
    rule.evaluate(&input("u1", "t1"), &docs).unwrap();
    assert_eq!(docs.reads.load(Ordering::SeqCst) - before, 1);

    let missing = Rule::compile("get('teams', 'nope') == null").unwrap();
    assert!(missing.evaluate(&input("u1", "t1"), &docs).unwrap());
}

#[test]
fn a_decided_rule_does_not_read_documents() {
    let docs = Docs::default();
    let rule = Rule::compile("true || get('teams', 'a').data.open").unwrap();
    assert!(rule
        .evaluate(&read_input(None, doc("d", json!({}))), &docs)
        .unwrap());
    assert_eq!(docs.reads.load(Ordering::SeqCst), 0);
}

#[test]
fn lookups_are_bounded_per_evaluation() {
    let mut docs = Docs::default();
    for i in 0..20 {
        docs = docs.with("c", &i.to_string(), json!({"ok": true}));
    }
    let ten = (0..MAX_LOOKUPS)
        .map(|i| format!("exists('c', '{i}')"))
        .collect::<Vec<_>>()
        .join(" && ");
    let input = read_input(None, doc("d", json!({})));
    assert!(Rule::compile(&ten)
        .unwrap()
        .evaluate(&input, &docs)
        .unwrap());
    let eleven = format!("{ten} && exists('c', '{MAX_LOOKUPS}')");
    assert_eq!(
        Rule::compile(&eleven).unwrap().evaluate(&input, &docs),
        Err(RuleEvalError::TooManyLookups { limit: MAX_LOOKUPS })
    );
}

#[test]
fn lookup_failures_are_errors_not_allows() {
    let rule = Rule::compile("!exists('teams', 'a')").unwrap();
    let result = rule.evaluate(&read_input(None, doc("d", json!({}))), &NoLookup);
    assert!(matches!(result, Err(RuleEvalError::Lookup(_))));
}

// ---- pushdown ------------------------------------------------------------------------------

#[test]
fn pushdown_owner_only_todos() {
    assert_eq!(
        pushdown(OWNER_TODOS, Some(&user("u123"))),
        Pushdown::Filter(json!([["owner", "==", "u123"]]))
    );
    assert_eq!(pushdown(OWNER_TODOS, None), Pushdown::Deny);
}

#[test]
fn pushdown_public_read_owner_write_posts() {
    assert_eq!(
        pushdown(POSTS_READ, Some(&user("u1"))),
        Pushdown::Filter(json!({"or": [["public", "==", true], ["author", "==", "u1"]]}))
    );
    assert_eq!(
        pushdown(POSTS_READ, None),
        Pushdown::Filter(json!([["public", "==", true]]))
    );
    // Write rules depend on request.data: nothing to push.
    assert_eq!(
        pushdown(POSTS_CREATE, Some(&user("u1"))),
        Pushdown::Residual
    );
}

#[test]
fn pushdown_moderator_claims_fold_to_allow_or_deny() {
    assert_eq!(pushdown(MODERATOR, Some(&moderator("m"))), Pushdown::Allow);
    assert_eq!(pushdown(MODERATOR, Some(&user("u"))), Pushdown::Deny);
    assert_eq!(pushdown(MODERATOR, None), Pushdown::Deny);
    let either = format!("({MODERATOR}) || {OWNER_TODOS}");
    assert_eq!(pushdown(&either, Some(&moderator("m"))), Pushdown::Allow);
    assert_eq!(
        pushdown(&either, Some(&user("u1"))),
        Pushdown::Filter(json!([["owner", "==", "u1"]]))
    );
    assert_eq!(pushdown("auth != null", Some(&user("u1"))), Pushdown::Allow);
    assert_eq!(pushdown("true", None), Pushdown::Allow);
    assert_eq!(pushdown("false", None), Pushdown::Deny);
}

#[test]
fn pushdown_conjunctions_and_operators() {
    let u = user("u1");
    assert_eq!(
        pushdown(
            "resource.data.owner == auth.uid && resource.data.public == true && resource.data.n >= 3",
            Some(&u)
        ),
        Pushdown::Filter(json!([["owner", "==", "u1"], ["public", "==", true], ["n", ">=", 3]]))
    );
    assert_eq!(
        pushdown("5.5 > resource.data.score && resource.data.a.b < 'm'", None),
        Pushdown::Filter(json!([["score", "<", 5.5], ["a.b", "<", "m"]]))
    );
    assert_eq!(
        pushdown("resource.data.status in ['open', 'held']", None),
        Pushdown::Filter(json!([["status", "in", ["open", "held"]]]))
    );
    assert_eq!(
        pushdown("resource.id == auth.uid", Some(&u)),
        Pushdown::Filter(json!([["$id", "==", "u1"]]))
    );
    assert_eq!(
        pushdown(
            "resource.created_at >= timestamp('2024-01-01T00:00:00Z')",
            None
        ),
        Pushdown::Filter(json!([["$created_at", ">=", "2024-01-01T00:00:00Z"]]))
    );
    assert_eq!(
        pushdown(
            "has(resource.data.archived) && !resource.data.archived",
            None
        ),
        Pushdown::Filter(json!([
            ["archived", "exists", true],
            ["archived", "==", false]
        ]))
    );
    assert_eq!(
        pushdown("!has(resource.data.deleted_at)", None),
        Pushdown::Filter(json!([["deleted_at", "exists", false]]))
    );
    assert_eq!(
        pushdown("!(resource.data.n < 3)", None),
        Pushdown::Filter(json!([["n", ">=", 3]]))
    );
    assert_eq!(
        pushdown("auth.uid in resource.data.members", Some(&u)),
        Pushdown::Filter(json!({"or": [
            ["members", "array-contains", "u1"],
            ["members.u1", "exists", true]
        ]}))
    );
    assert_eq!(
        pushdown("7 in resource.data.lucky", None),
        Pushdown::Filter(json!([["lucky", "array-contains", 7]]))
    );
    assert_eq!(pushdown("resource.data.status in []", None), Pushdown::Deny);
}

#[test]
fn pushdown_keeps_residual_parts_for_per_row_evaluation() {
    let u = user("u1");
    assert_eq!(
        pushdown(
            "get('teams', resource.data.team).data.open == true",
            Some(&u)
        ),
        Pushdown::Residual
    );
    assert_eq!(
        pushdown("exists('flags', resource.id)", Some(&u)),
        Pushdown::Residual
    );
    assert_eq!(
        pushdown("request.data.x == 1", Some(&u)),
        Pushdown::Residual
    );
    assert_eq!(
        pushdown("resource.data.tags.exists(t, t == auth.uid)", Some(&u)),
        Pushdown::Residual
    );
    assert_eq!(
        pushdown("resource.data.a == resource.data.b", Some(&u)),
        Pushdown::Residual
    );
    assert_eq!(
        pushdown(
            "resource.data.owner == auth.uid && get('teams', resource.data.team).data.open",
            Some(&u)
        ),
        Pushdown::Partial {
            filter: json!([["owner", "==", "u1"]])
        }
    );
    // `!=` on data is type-loose in CEL: pre-filter on presence, check per row.
    assert_eq!(
        pushdown("resource.data.status != 'deleted'", None),
        Pushdown::Partial {
            filter: json!([["status", "exists", true]])
        }
    );
}

#[test]
fn pushdown_or_with_an_unexpressible_side_never_narrows() {
    let u = user("u1");
    // Pushing only the owner side would hide documents the lookup side admits.
    assert_eq!(
        pushdown(
            "resource.data.owner == auth.uid || get('teams', resource.data.team).data.open",
            Some(&u)
        ),
        Pushdown::Residual
    );
    assert_eq!(
        pushdown(
            "resource.data.owner == auth.uid || request.method == 'GET'",
            Some(&u)
        ),
        Pushdown::Residual
    );
    // An `or` that widens the rule with an auth-only condition stays exactly the rule.
    assert_eq!(
        pushdown(
            "resource.data.owner == auth.uid || auth.uid == 'root'",
            Some(&u)
        ),
        Pushdown::Filter(json!([["owner", "==", "u1"]]))
    );
    // A negated `or` needs "different value" sets: only an upper bound.
    assert_eq!(
        pushdown("!(resource.data.a == 1 || resource.data.b == 2)", None),
        Pushdown::Partial {
            filter: json!([["a", "exists", true], ["b", "exists", true]])
        }
    );
}

#[test]
fn pushdown_treats_fields_named_like_functions_as_fields() {
    // cel-interpreter 0.10 turned a missing `size` key into the `size` function; `cel` fails
    // on it like on any missing key, so the field is an ordinary filter.
    assert_eq!(
        pushdown("resource.data.size == 3", None),
        Pushdown::Filter(json!([["size", "==", 3]]))
    );
    assert_eq!(
        pushdown("resource.data.size != 3", None),
        Pushdown::Partial {
            filter: json!([["size", "exists", true]])
        }
    );
}

// ---- pushdown is equivalent to evaluation --------------------------------------------------

/// The query engine's documented semantics, as `Pushdown::Filter` assumes them.
pub(super) fn matches(filter: &Json, document: &Json) -> bool {
    match filter {
        Json::Array(items) if items.first().is_some_and(Json::is_string) => clause(items, document),
        Json::Array(items) => items.iter().all(|f| matches(f, document)),
        Json::Object(o) if o.contains_key("and") => o["and"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| matches(f, document)),
        Json::Object(o) if o.contains_key("or") => o["or"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| matches(f, document)),
        other => panic!("not a filter: {other}"),
    }
}

fn clause(items: &[Json], document: &Json) -> bool {
    let (field, op, value) = (
        items[0].as_str().unwrap(),
        items[1].as_str().unwrap(),
        &items[2],
    );
    let actual = match field {
        "$id" => Some(document["id"].clone()),
        "$created_at" | "$updated_at" => Some(document[&field[1..]].clone()),
        path => path
            .split('.')
            .try_fold(&document["data"], |v, seg| v.as_object()?.get(seg))
            .cloned(),
    };
    let cmp = |a: &Json, b: &Json| -> Option<std::cmp::Ordering> {
        match (a, b) {
            (Json::Number(x), Json::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
            (Json::String(x), Json::String(y)) if field.starts_with("$") && field != "$id" => {
                let x = DateTime::parse_from_rfc3339(x).ok()?;
                let y = DateTime::parse_from_rfc3339(y).ok()?;
                Some(x.cmp(&y))
            }
            (Json::String(x), Json::String(y)) => Some(x.cmp(y)),
            (Json::Bool(x), Json::Bool(y)) => Some(x.cmp(y)),
            (Json::Null, Json::Null) => Some(std::cmp::Ordering::Equal),
            _ => None,
        }
    };
    use std::cmp::Ordering::*;
    match (op, actual) {
        ("exists", actual) => actual.is_some() == value.as_bool().unwrap(),
        (_, None) => false,
        ("==", Some(a)) => cmp(&a, value) == Some(Equal),
        ("!=", Some(a)) => matches!(cmp(&a, value), Some(Less | Greater)),
        ("<", Some(a)) => cmp(&a, value) == Some(Less),
        ("<=", Some(a)) => matches!(cmp(&a, value), Some(Less | Equal)),
        (">", Some(a)) => cmp(&a, value) == Some(Greater),
        (">=", Some(a)) => matches!(cmp(&a, value), Some(Greater | Equal)),
        ("in", Some(a)) => value
            .as_array()
            .unwrap()
            .iter()
            .any(|v| cmp(&a, v) == Some(Equal)),
        ("array-contains", Some(Json::Array(xs))) => {
            xs.iter().any(|x| cmp(x, value) == Some(Equal))
        }
        ("array-contains", Some(_)) => false,
        (op, _) => panic!("unexpected operator {op}"),
    }
}

#[test]
fn pushdown_filters_admit_exactly_what_evaluation_admits() {
    let documents: Vec<Json> = [
        json!({"owner": "u1", "public": true, "n": 3, "tags": ["a", "u1"], "status": "open"}),
        json!({"owner": "u2", "public": false, "n": 3.0, "tags": {"u1": 1}, "status": "held"}),
        json!({"owner": "u1", "public": "yes", "n": "3", "tags": "u1", "status": 7}),
        json!({"public": null, "n": 2.5, "tags": [], "a": {"b": "k"}}),
        json!({"owner": null, "n": -1, "tags": [7, "b"], "a": {"b": 3}, "archived": false}),
        json!({"owner": 1, "n": 10, "a": "flat", "archived": true, "members": {"u1": "admin"}}),
        json!({"size": 3, "contains": "x", "owner": "u1"}),
        json!({"size": "3"}),
        json!({}),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, data)| doc(&format!("d{i}"), data))
    .collect();
    let rules = [
        OWNER_TODOS,
        POSTS_READ,
        MODERATOR,
        "resource.data.public",
        "!resource.data.public || resource.data.n > 2",
        "resource.data.n == 3",
        "resource.data.n <= 3 && resource.data.n > -1",
        "!(resource.data.n < 3)",
        "resource.data.owner == null",
        "resource.data.status in ['open', 7]",
        "'u1' in resource.data.tags",
        "7 in resource.data.tags",
        "has(resource.data.a.b)",
        "has(resource.data.archived) ? resource.data.archived : resource.data.public == true",
        "resource.data.a.b == 'k' || resource.data.a.b > 2",
        "resource.id == 'd1' || resource.id > 'd4'",
        "resource.id != 'd1' && resource.created_at < request.time",
        "resource.updated_at == timestamp('2024-06-02T00:00:00Z') && !(resource.id in ['d0', 'd2'])",
        "resource.data.owner == auth.uid || auth.claims.role == 'moderator'",
        "!(resource.data.owner == auth.uid)",
        "resource.data.owner != auth.uid",
        "resource.data.size == 3 || resource.data.contains == 'x'",
        "!(resource.data.size >= 3)",
    ];
    let callers = [None, Some(user("u1")), Some(moderator("u2"))];
    for rule_source in rules {
        let rule = Rule::compile(rule_source).unwrap();
        for auth in &callers {
            let plan = rule.pushdown(auth.as_ref(), now());
            for document in &documents {
                let allowed = rule
                    .evaluate(&read_input(auth.clone(), document.clone()), &NoLookup)
                    .unwrap();
                let context =
                    format!("rule {rule_source}, auth {auth:?}, plan {plan:?}, doc {document}");
                match &plan {
                    Pushdown::Allow => assert!(allowed, "{context}"),
                    Pushdown::Deny => assert!(!allowed, "{context}"),
                    Pushdown::Filter(f) => assert_eq!(allowed, matches(f, document), "{context}"),
                    Pushdown::Partial { filter } => {
                        assert!(!allowed || matches(filter, document), "{context}")
                    }
                    Pushdown::Residual => {}
                }
            }
        }
    }
}
