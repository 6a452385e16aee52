//! `_aggregate`: count, sum, avg, min and max over what the caller may read.

use super::*;

impl DocumentService {
    /// `_aggregate`: count, sum, avg, min, max over the documents the caller may read.
    pub async fn aggregate(
        &self,
        caller: &Caller,
        collection: &str,
        where_: Option<Filter>,
        aggregations: &Map<String, Value>,
    ) -> ApiResult<Map<String, Value>> {
        let principal = &Principal::from(caller);
        let coll = self.collection(collection).await?;
        let specs = parse_aggregations(aggregations)?;
        let filter = match self.read_plan(&coll, principal)? {
            ReadPlan::Nothing => {
                return Ok(specs
                    .iter()
                    .map(|(name, agg)| (name.clone(), agg.empty()))
                    .collect())
            }
            ReadPlan::All => where_,
            ReadPlan::Filter(f) => and(where_, Some(f)),
            // Checked row by row: the `where` applies in memory after the rule (see `read`).
            ReadPlan::PerRow(pre) => {
                // Folded row by row: the rule may admit the whole collection.
                let mut folds: Vec<Fold> = specs.iter().map(|(_, agg)| Fold::new(agg)).collect();
                self.for_each_readable(
                    &coll,
                    principal,
                    pre.as_ref(),
                    where_.as_ref(),
                    &self.read_clock(),
                    |r| {
                        let doc = document_json(r);
                        for fold in &mut folds {
                            fold.add(&doc);
                        }
                    },
                )
                .await?;
                return specs
                    .iter()
                    .zip(folds)
                    .map(|((name, _), fold)| Ok((name.clone(), sum_in_range(name, fold.finish())?)))
                    .collect();
            }
        };
        let mut out = Map::new();
        let order: Vec<Order> = vec![Order {
            field: Field::Id,
            direction: Direction::Asc,
        }];
        let numeric_paths: Vec<Vec<String>> = specs
            .iter()
            .filter_map(|(_, a)| match a {
                Aggregation::Sum(Field::Data(p)) | Aggregation::Avg(Field::Data(p)) => {
                    Some(p.clone())
                }
                _ => None,
            })
            .collect();
        let sums = self
            .store
            .aggregate_numbers(
                &Scan {
                    collection,
                    filter: filter.as_ref(),
                    order: &order,
                    after: None,
                    limit: 0,
                    indexed: &coll.indexed,
                    leading: &coll.leading,
                    index_widths: &coll.index_widths,
                },
                &numeric_paths,
            )
            .await?;
        let mut next_sum = sums.sums.iter();
        for (name, agg) in &specs {
            let value = match agg {
                Aggregation::Count => json!(sums.count),
                Aggregation::Sum(Field::Data(_)) => {
                    let (sum, _) = next_sum.next().copied().unwrap_or((0.0, 0));
                    sum_in_range(name, number(sum))?
                }
                Aggregation::Avg(Field::Data(_)) => {
                    let (sum, n) = next_sum.next().copied().unwrap_or((0.0, 0));
                    if n == 0 {
                        Value::Null
                    } else {
                        sum_in_range(name, number(sum / n as f64))?
                    }
                }
                Aggregation::Sum(_) | Aggregation::Avg(_) => json!(0),
                Aggregation::Min(field) | Aggregation::Max(field) => {
                    let direction = if matches!(agg, Aggregation::Min(_)) {
                        Direction::Asc
                    } else {
                        Direction::Desc
                    };
                    let present = Filter::Clause {
                        field: field.clone(),
                        op: Op::Ne,
                        value: Operand::Json(Value::Null),
                    };
                    let f = and(filter.clone(), Some(present));
                    let order = vec![
                        Order {
                            field: field.clone(),
                            direction,
                        },
                        Order {
                            field: Field::Id,
                            direction: Direction::Asc,
                        },
                    ];
                    let rows = self
                        .store
                        .scan_documents(&Scan {
                            collection,
                            filter: f.as_ref(),
                            order: &order,
                            after: None,
                            limit: 1,
                            indexed: &coll.indexed,
                            leading: &coll.leading,
                            index_widths: &coll.index_widths,
                        })
                        .await?;
                    rows.first()
                        .and_then(|r| field.get(&document_json(r)).map(|v| v.into_owned()))
                        .unwrap_or(Value::Null)
                }
            };
            out.insert(name.clone(), value);
        }
        Ok(out)
    }
}

/// A sum or average as JSON: an integer when it is one (and exact), else a double; `Err` for
/// a sum beyond a double's range (only infinity cannot be JSON).
fn number(f: f64) -> Result<Value, OutOfRange> {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Ok(json!(f as i64))
    } else {
        serde_json::Number::from_f64(f)
            .map(Value::Number)
            .ok_or(OutOfRange)
    }
}

struct OutOfRange;

/// Sums are doubles on both databases (SQLite's `total()`, PostgreSQL's exact `numeric`
/// read as a double): past a double's range the answer is this 400, naming the aggregation
/// and no value — before, SQLite failed with a 500 on an integer overflow and PostgreSQL's
/// error quoted the exact sum.
fn sum_in_range(name: &str, value: Result<Value, OutOfRange>) -> ApiResult<Value> {
    value.map_err(|OutOfRange| {
        ApiError::invalid_with(
            format!("`{name}` is beyond the range of a double"),
            json!({"field": name}),
        )
    })
}

#[derive(Debug, Clone)]
enum Aggregation {
    Count,
    Sum(Field),
    Avg(Field),
    Min(Field),
    Max(Field),
}

impl Aggregation {
    pub(super) fn empty(&self) -> Value {
        match self {
            Aggregation::Count | Aggregation::Sum(_) => json!(0),
            _ => Value::Null,
        }
    }
}

/// One aggregation computed in Rust over documents already filtered by the rule, one
/// document at a time.
struct Fold<'a> {
    agg: &'a Aggregation,
    count: u64,
    sum: f64,
    pick: Option<Value>,
}

impl<'a> Fold<'a> {
    fn new(agg: &'a Aggregation) -> Self {
        Fold {
            agg,
            count: 0,
            sum: 0.0,
            pick: None,
        }
    }

    fn add(&mut self, doc: &Value) {
        match self.agg {
            Aggregation::Count => self.count += 1,
            Aggregation::Sum(f) | Aggregation::Avg(f) => {
                if let Some(n) = f.get(doc).and_then(|v| v.as_f64()) {
                    self.sum += n;
                    self.count += 1;
                }
            }
            Aggregation::Min(f) | Aggregation::Max(f) => {
                let Some(v) = f.get(doc).filter(|v| !v.is_null()) else {
                    return;
                };
                let order = self
                    .pick
                    .as_ref()
                    .map(|cur| query::compare_values(Some(&v), Some(cur)));
                // Documents come in id order: among equals the first is kept, as the SQL path's
                // order by the field, then `$id`, keeps it.
                let replace = match (self.agg, order) {
                    (_, None) => true,
                    (Aggregation::Min(_), Some(o)) => o == std::cmp::Ordering::Less,
                    (_, Some(o)) => o == std::cmp::Ordering::Greater,
                };
                if replace {
                    self.pick = Some(v.into_owned());
                }
            }
        }
    }

    fn finish(self) -> Result<Value, OutOfRange> {
        match self.agg {
            Aggregation::Count => Ok(json!(self.count)),
            Aggregation::Sum(_) => number(self.sum),
            Aggregation::Avg(_) if self.count == 0 => Ok(Value::Null),
            Aggregation::Avg(_) => number(self.sum / self.count as f64),
            Aggregation::Min(_) | Aggregation::Max(_) => Ok(self.pick.unwrap_or(Value::Null)),
        }
    }
}

fn parse_aggregations(aggs: &Map<String, Value>) -> ApiResult<Vec<(String, Aggregation)>> {
    if aggs.is_empty() || aggs.len() > 20 {
        return Err(ApiError::invalid_with(
            "aggregations has 1 to 20 entries",
            json!({"field": "aggregations"}),
        ));
    }
    aggs.iter()
        .map(|(name, spec)| {
            let bad = || {
                ApiError::invalid_with(
                    format!("aggregation `{name}` is {{\"count\": {{}}}}, {{\"sum\": field}}, {{\"avg\": field}}, {{\"min\": field}} or {{\"max\": field}}"),
                    json!({"field": name}),
                )
            };
            let obj = spec.as_object().filter(|o| o.len() == 1).ok_or_else(bad)?;
            let (kind, arg) = obj.iter().next().expect("one entry");
            let field = || -> ApiResult<Field> { Ok(Field::parse(arg.as_str().ok_or_else(bad)?)?) };
            let agg = match kind.as_str() {
                "count" => Aggregation::Count,
                "sum" => Aggregation::Sum(field()?),
                "avg" => Aggregation::Avg(field()?),
                "min" => Aggregation::Min(field()?),
                "max" => Aggregation::Max(field()?),
                _ => return Err(bad()),
            };
            Ok((name.clone(), agg))
        })
        .collect()
}
