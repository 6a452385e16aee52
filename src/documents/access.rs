//! Access: the collection rules applied to one caller — the write-time [`Judge`] (which
//! asks the store for the documents `get()`/`exists()` need), the read check with lookups
//! fetched asynchronously, and how a `read` rule restricts a scan (pushdown). Realtime
//! applies the same checks to each change it delivers ([`ReadCheck`]).

use super::*;

/// Why a check stopped short of a decision: an answer for the caller, or other documents
/// (`get()`/`exists()` in a rule) that must be fetched before it can go on.
pub(super) enum Halt {
    Api(ApiError),
    Needs(Vec<(String, String)>),
}

impl From<ApiError> for Halt {
    fn from(err: ApiError) -> Self {
        Halt::Api(err)
    }
}

/// Most documents one request keeps for the `get()`/`exists()` of its per-row rule checks.
const MAX_CACHED_LOOKUPS: usize = 1000;

/// One request's rule checks through [`DocumentService::rule_allows`]: its rule time (see
/// `rules::budget`) and the documents `get()`/`exists()` fetched so far.
pub struct RuleSession {
    lookups: Fetched,
    clock: RuleClock,
}

impl RuleSession {
    pub fn new() -> RuleSession {
        RuleSession {
            lookups: Fetched::new(),
            clock: RuleClock::new(budget::RULE_TIME_LIMIT),
        }
    }
}

impl Default for RuleSession {
    fn default() -> Self {
        RuleSession::new()
    }
}

/// Rule checks for one caller at one time, with the documents fetched for them so far.
/// Admins and service keys always may; a missing rule denies; a rule that cannot be decided
/// (too many lookups) denies and is logged.
pub(super) struct Judge<'a> {
    pub(super) principal: &'a Principal,
    pub(super) now: DateTime<Utc>,
    pub(super) fetched: &'a Fetched,
    /// The request's rule time (see `rules::budget`): once used up, rules with loops deny.
    pub(super) clock: &'a RuleClock,
}

impl Judge<'_> {
    /// Whether `rule` lets the caller do `method` on `resource` (the stored document), with
    /// `data` the document as it would be after a write. `Err(Halt::Needs)` when the rule
    /// reads documents not fetched yet.
    pub(super) fn allows(
        &self,
        rule: &Option<Rule>,
        method: &str,
        resource: Option<&DocumentRow>,
        data: Option<&Value>,
    ) -> Result<bool, Halt> {
        self.allows_document(rule, method, resource.map(document_json), data, None)
    }

    /// [`Judge::allows`] with the stored document as the API shows it (a change-stream event
    /// carries it so), and with `extra` fields of `request` when given (storage's).
    pub(super) fn allows_document(
        &self,
        rule: &Option<Rule>,
        method: &str,
        resource: Option<Value>,
        data: Option<&Value>,
        extra: Option<&serde_json::Map<String, Value>>,
    ) -> Result<bool, Halt> {
        if matches!(self.principal, Principal::Privileged) {
            return Ok(true);
        }
        let Some(rule) = rule else { return Ok(false) };
        if let Some(constant) = rule.constant() {
            return Ok(constant);
        }
        let input = RuleInput {
            auth: self.principal.auth().cloned(),
            resource,
            request: RequestInfo {
                method: method.into(),
                time: self.now,
                data: data.cloned(),
                extra: extra.cloned().unwrap_or_default(),
            },
        };
        let spent = self.clock.expired();
        let evaluate = || {
            let started = std::time::Instant::now();
            let evaluated =
                rule.evaluate_until(&input, self.fetched, Some(started + self.clock.remaining()));
            self.clock.spend(started.elapsed());
            evaluated
        };
        // A rule with loops or a regex may run long: on an async worker, hand the
        // worker's other tasks (say, /health) to another thread meanwhile, and take one of
        // the few slots such evaluations share, so that together they leave the other cores
        // to everything else (waiting for a slot is not rule time). The SQLite writer thread
        // is outside the runtime and evaluates in place.
        let evaluated = if spent {
            // The request's rule time is used up. Rules without loops never look at the
            // clock, so deny here, or a batch of slow regular expressions would run on.
            Err(RuleEvalError::OutOfTime)
        } else if rule.may_run_long() && on_multi_thread_runtime() {
            tokio::task::block_in_place(|| {
                let _slot = budget::loop_slot();
                evaluate()
            })
        } else {
            evaluate()
        };
        match evaluated {
            Ok(Evaluation::Decided(allowed)) => Ok(allowed),
            Ok(Evaluation::Needs(keys)) => Err(Halt::Needs(keys)),
            // Said once, by the evaluation that ran out; the rest of the request denies quietly.
            Err(RuleEvalError::OutOfTime) if spent => Ok(false),
            Err(err) => {
                tracing::warn!(error = %err, rule = rule.source(), "rule could not be decided; denying");
                Ok(false)
            }
        }
    }
}

/// `block_in_place` panics on a current-thread runtime (some tests run on one).
fn on_multi_thread_runtime() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
}

pub(super) enum ReadPlan {
    All,
    Nothing,
    Filter(Filter),
    /// Evaluate the rule per row, after an optional SQL pre-filter.
    PerRow(Option<Filter>),
}

fn parse_rule_filter(v: &Value) -> ApiResult<Filter> {
    query::parse_rule_where(v)?
        .ok_or_else(|| ApiError::internal(anyhow::anyhow!("empty rule filter")))
}

impl DocumentService {
    /// Whether `rule` lets the caller `method` (`get` or `list`) the stored document `row`,
    /// fetching what `get()`/`exists()` read from the store (after the scan: no connection is
    /// held meanwhile). `cache` keeps fetched documents for the rest of the request.
    pub(super) async fn may_read(
        &self,
        rule: &Option<Rule>,
        principal: &Principal,
        method: &str,
        row: Option<&DocumentRow>,
        cache: &mut Fetched,
        clock: &RuleClock,
    ) -> bool {
        self.may_read_document(
            rule,
            principal,
            method,
            row.map(document_json),
            None,
            cache,
            clock,
        )
        .await
    }

    /// Whether `rule` lets `caller` do `method` on `resource` (a stored thing as the API shows
    /// it) with `request` carrying `extra` fields besides `method` and `time`, reading what
    /// `get()`/`exists()` ask for from the documents. The one rule path other domains use
    /// (storage's bucket rules): admins and service keys always may, a missing rule denies.
    /// `session` carries the request's rule time and the documents fetched so far, so a
    /// request that asks many times (a listing) shares one budget and one lookup cache.
    pub async fn rule_allows(
        &self,
        rule: &Option<Rule>,
        caller: &Caller,
        method: &str,
        resource: Option<Value>,
        extra: &serde_json::Map<String, Value>,
        session: &mut RuleSession,
    ) -> bool {
        let principal = Principal::from(caller);
        self.may_read_document(
            rule,
            &principal,
            method,
            resource,
            Some(extra),
            &mut session.lookups,
            &session.clock,
        )
        .await
    }

    /// [`DocumentService::may_read`] with the document as the API shows it.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn may_read_document(
        &self,
        rule: &Option<Rule>,
        principal: &Principal,
        method: &str,
        doc: Option<Value>,
        extra: Option<&serde_json::Map<String, Value>>,
        cache: &mut Fetched,
        clock: &RuleClock,
    ) -> bool {
        let now = Utc::now();
        let mut fetched = Fetched::new();
        loop {
            let judge = Judge {
                principal,
                now,
                fetched: &fetched,
                clock,
            };
            match judge.allows_document(rule, method, doc.clone(), None, extra) {
                Ok(allowed) => return allowed,
                Err(Halt::Api(_)) => return false,
                Err(Halt::Needs(keys)) => {
                    for key in keys {
                        let doc = match cache.get(&key) {
                            Some(doc) => doc.clone(),
                            None => match self.store.get_document(&key.0, &key.1).await {
                                Ok(doc) => {
                                    let doc = doc.as_ref().map(document_json);
                                    if cache.len() < MAX_CACHED_LOOKUPS {
                                        cache.insert(key.clone(), doc.clone());
                                    }
                                    doc
                                }
                                Err(err) => {
                                    tracing::warn!(error = %err, "get()/exists() failed; denying");
                                    return false;
                                }
                            },
                        };
                        fetched.insert(key, doc);
                    }
                }
            }
        }
    }

    /// How the `read` rule restricts a scan for this caller.
    pub(super) fn read_plan(
        &self,
        coll: &Collection,
        principal: &Principal,
    ) -> ApiResult<ReadPlan> {
        if matches!(principal, Principal::Privileged) {
            return Ok(ReadPlan::All);
        }
        let rule = coll
            .read
            .as_ref()
            .ok_or_else(|| ApiError::PermissionDenied("this collection has no read rule".into()))?;
        match rule.constant() {
            Some(true) => return Ok(ReadPlan::All),
            Some(false) => return Ok(ReadPlan::Nothing),
            None => {}
        }
        Ok(match rule.pushdown(principal.auth(), Utc::now()) {
            Pushdown::Allow => ReadPlan::All,
            Pushdown::Deny => ReadPlan::Nothing,
            Pushdown::Filter(f) => ReadPlan::Filter(parse_rule_filter(&f)?),
            Pushdown::Partial { filter } => ReadPlan::PerRow(Some(parse_rule_filter(&filter)?)),
            Pushdown::Residual => ReadPlan::PerRow(None),
        })
    }
}

/// The `read` rule of one collection for one caller, for documents checked one at a time as
/// they change (realtime): the same plan a query uses — no check, no document, an in-memory
/// filter, or the rule evaluated per document.
pub struct ReadCheck {
    principal: Principal,
    coll: Arc<Collection>,
    plan: ReadPlan,
}

impl ReadCheck {
    /// The collection's definition the check was made from (compare with
    /// [`DocumentService::collection`] to notice new rules).
    pub fn collection(&self) -> &Arc<Collection> {
        &self.coll
    }
}

impl DocumentService {
    /// How the collection's `read` rule applies to `caller`'s view of single documents.
    /// `permission_denied` when the collection has no `read` rule (and the caller is not
    /// privileged), as for a query.
    pub async fn read_check(&self, caller: &Caller, collection: &str) -> ApiResult<ReadCheck> {
        let principal = Principal::from(caller);
        let coll = self.collection(collection).await?;
        let mut plan = self.read_plan(&coll, &principal)?;
        // A plan made from a rule that reads `request.time` (a filter, or a constant "all" or
        // "nothing") holds only now; changes arrive later, so such a rule is evaluated on each
        // document when its change arrives.
        if !matches!(principal, Principal::Privileged)
            && coll.read.as_ref().is_some_and(Rule::reads_request)
        {
            plan = ReadPlan::PerRow(None);
        }
        Ok(ReadCheck {
            principal,
            coll,
            plan,
        })
    }

    /// Whether the caller of `check` may read `doc` (a document as the API shows it, such as
    /// a change-stream event's `data`). `get()`/`exists()` read the database now; `lookups`
    /// keeps what they fetched for the caller's next checks.
    pub async fn readable(&self, check: &ReadCheck, doc: &Value, lookups: &mut Fetched) -> bool {
        match &check.plan {
            ReadPlan::All => true,
            ReadPlan::Nothing => false,
            ReadPlan::Filter(f) => query::matches(f, doc),
            ReadPlan::PerRow(pre) => {
                if pre.as_ref().is_some_and(|f| !query::matches(f, doc)) {
                    return false;
                }
                if lookups.len() > MAX_CACHED_LOOKUPS {
                    lookups.clear();
                }
                self.may_read_document(
                    &check.coll.read,
                    &check.principal,
                    "get",
                    Some(doc.clone()),
                    None,
                    lookups,
                    &RuleClock::new(budget::RULE_TIME_LIMIT),
                )
                .await
            }
        }
    }
}
