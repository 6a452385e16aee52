//! Documents, collections and the change log on PostgreSQL.

use async_trait::async_trait;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{Postgres, Row};

use super::{events, map_err, PgStore};
use crate::store::docsql::{
    aggregate_sql, create_index_sql, scan_where, Bind, Dialect, SqlBuilder,
};
use crate::store::{
    index_prefix, plan_row_write, Actor, CollectionRow, DecideLoop, DocumentRow, DocumentStore,
    IndexSpec, NumericAggregates, PlannedRow, PlannedWrite, RowWrite, Scan, StoreError,
    StoreResult, WriteOutcome,
};

const DOC_COLUMNS: &str = "collection, id, data, version, created_at, updated_at";

fn document_from_row(row: &PgRow) -> Result<DocumentRow, sqlx::Error> {
    Ok(DocumentRow {
        collection: row.try_get(0)?,
        id: row.try_get(1)?,
        data: row.try_get(2)?,
        version: row.try_get(3)?,
        created_at: row.try_get(4)?,
        updated_at: row.try_get(5)?,
    })
}

fn collection_from_row(row: &PgRow) -> Result<CollectionRow, sqlx::Error> {
    Ok(CollectionRow {
        name: row.try_get(0)?,
        rules: row.try_get(1)?,
        indexes: row.try_get(2)?,
        schema: row.try_get(3)?,
        created_at: row.try_get(4)?,
        updated_at: row.try_get(5)?,
    })
}

fn bind_all<'q>(
    mut q: Query<'q, Postgres, PgArguments>,
    binds: Vec<Bind>,
) -> Query<'q, Postgres, PgArguments> {
    for b in binds {
        q = match b {
            Bind::Text(s) => q.bind(s),
            Bind::Int(i) => q.bind(i),
            Bind::Real(f) => q.bind(f),
            Bind::Json(v) => q.bind(v),
            Bind::Time(t) => q.bind(t),
            Bind::Path(p) => q.bind(p),
        };
    }
    q
}

async fn create_indexes(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    collection: &str,
    indexes: &[IndexSpec],
) -> StoreResult<()> {
    let prefix = index_prefix(collection);
    let existing: Vec<String> = sqlx::query_scalar(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'documents' AND left(indexname, length($1)) = $1",
    )
    .bind(&prefix)
    .fetch_all(&mut **tx)
    .await
    .map_err(map_err)?;
    for name in existing {
        sqlx::query(&format!("DROP INDEX \"{name}\""))
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
    }
    for (n, index) in indexes.iter().enumerate() {
        for statement in create_index_sql(Dialect::Postgres, collection, n, index) {
            // Only a unique index can fail here: existing documents violate it.
            sqlx::query(&statement)
                .execute(&mut **tx)
                .await
                .map_err(|e| match map_err(e) {
                    StoreError::AlreadyExists(_) => {
                        StoreError::Conflict("existing documents violate the unique index".into())
                    }
                    other => other,
                })?;
        }
    }
    Ok(())
}

/// The current document inside a write transaction (its rows are already locked by the
/// advisory locks, or not written by this batch).
async fn read_document(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    collection: &str,
    id: &str,
) -> StoreResult<Option<DocumentRow>> {
    sqlx::query(&format!(
        "SELECT {DOC_COLUMNS} FROM documents WHERE collection = $1 AND id = $2"
    ))
    .bind(collection)
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(map_err)?
    .as_ref()
    .map(document_from_row)
    .transpose()
    .map_err(map_err)
}

#[async_trait]
impl DocumentStore for PgStore {
    async fn collection(&self, name: &str) -> StoreResult<Option<CollectionRow>> {
        let row = sqlx::query(
            "SELECT name, rules, indexes, schema, created_at, updated_at FROM collections WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref()
            .map(collection_from_row)
            .transpose()
            .map_err(map_err)
    }

    async fn list_collections(&self) -> StoreResult<Vec<CollectionRow>> {
        let rows = sqlx::query(
            "SELECT name, rules, indexes, schema, created_at, updated_at FROM collections ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(collection_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err)
    }

    async fn put_collection(&self, row: &CollectionRow, indexes: &[IndexSpec]) -> StoreResult<()> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(
            "INSERT INTO collections (name, rules, indexes, schema, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (name) DO UPDATE SET rules = excluded.rules, indexes = excluded.indexes,
                schema = excluded.schema, updated_at = excluded.updated_at",
        )
        .bind(&row.name)
        .bind(&row.rules)
        .bind(&row.indexes)
        .bind(&row.schema)
        .bind(row.created_at)
        .bind(row.updated_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        create_indexes(&mut tx, &row.name, indexes).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn delete_collection(&self, name: &str, actor: &Actor) -> StoreResult<bool> {
        let mut unit = self.begin_unit().await?;
        let done = sqlx::query("DELETE FROM collections WHERE name = $1")
            .bind(name)
            .execute(&mut *unit.tx)
            .await
            .map_err(map_err)?;
        // Deletes the documents and appends their events in one statement: a document
        // written meanwhile is either deleted with its event or not deleted at all.
        let events = events::drop_collection(&mut unit.tx, unit.now, name, actor).await?;
        unit.appended(events);
        create_indexes(&mut unit.tx, name, &[]).await?;
        unit.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn get_document(&self, collection: &str, id: &str) -> StoreResult<Option<DocumentRow>> {
        let row = sqlx::query(&format!(
            "SELECT {DOC_COLUMNS} FROM documents WHERE collection = $1 AND id = $2"
        ))
        .bind(collection)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref()
            .map(document_from_row)
            .transpose()
            .map_err(map_err)
    }

    async fn apply_writes(
        &self,
        writes: Vec<PlannedWrite>,
        actor: &Actor,
    ) -> StoreResult<Vec<WriteOutcome>> {
        let mut unit = self.begin_unit().await?;
        let now = unit.now;
        // Serialise writers of each document, including creators of a missing one (the
        // advisory lock covers the id before the row exists). All of a batch's locks are
        // taken at once, in one order, so two batches naming the same documents in opposite
        // orders queue behind each other instead of deadlocking.
        let keys: Vec<String> = writes
            .iter()
            .map(|w| format!("{}/{}", w.collection, w.id))
            .collect();
        sqlx::query(
            "SELECT count(pg_advisory_xact_lock(h)) FROM (
                 SELECT DISTINCT hashtextextended(k, 0) AS h FROM unnest($1::text[]) AS k ORDER BY h
             ) AS locks",
        )
        .bind(&keys)
        .execute(&mut *unit.tx)
        .await
        .map_err(map_err)?;
        let mut outcomes = Vec::with_capacity(writes.len());
        let mut appended = Vec::with_capacity(writes.len());
        for w in writes {
            let current = read_document(&mut unit.tx, &w.collection, &w.id).await?;
            let mut decide = w.decide;
            let mut rounds = DecideLoop::default();
            let decision = loop {
                match rounds.step(&mut decide, current.as_ref(), now)? {
                    Ok(decision) => break decision,
                    Err(keys) => {
                        for (collection, id) in keys {
                            let doc = read_document(&mut unit.tx, &collection, &id).await?;
                            rounds.supply((collection, id), doc.as_ref());
                        }
                    }
                }
            };
            let PlannedRow {
                write,
                event,
                version,
            } = plan_row_write(&w.collection, &w.id, decision, current.as_ref(), now, actor)?;
            let statement = match &write {
                RowWrite::Update(doc) => sqlx::query(
                    "UPDATE documents SET data = $3, version = $4, updated_at = $5
                     WHERE collection = $1 AND id = $2",
                )
                .bind(&doc.collection)
                .bind(&doc.id)
                .bind(&doc.data)
                .bind(doc.version)
                .bind(now),
                RowWrite::Insert(doc) => sqlx::query(
                    "INSERT INTO documents (collection, id, data, version, created_at, updated_at)
                     VALUES ($1, $2, $3, 1, $4, $4)",
                )
                .bind(&doc.collection)
                .bind(&doc.id)
                .bind(&doc.data)
                .bind(now),
                RowWrite::Delete => {
                    sqlx::query("DELETE FROM documents WHERE collection = $1 AND id = $2")
                        .bind(&w.collection)
                        .bind(&w.id)
                }
            };
            statement.execute(&mut *unit.tx).await.map_err(map_err)?;
            let op = event.op;
            appended.push(event);
            outcomes.push(WriteOutcome {
                collection: w.collection,
                id: w.id,
                op,
                version,
                document: write.into_document(),
                position: 0,
            });
        }
        let events = unit.append(appended).await?;
        for (o, e) in outcomes.iter_mut().zip(events) {
            o.position = e.position;
        }
        unit.commit().await?;
        Ok(outcomes)
    }

    async fn scan_documents(&self, scan: &Scan<'_>) -> StoreResult<Vec<DocumentRow>> {
        let mut b = SqlBuilder::new(Dialect::Postgres, scan.indexed);
        let where_sql = scan_where(&mut b, scan, true);
        let order = b.order_by(scan.order, false);
        let sql = format!(
            "SELECT {DOC_COLUMNS} FROM documents WHERE {where_sql} ORDER BY {order} LIMIT {}",
            scan.limit
        );
        let rows = bind_all(sqlx::query(&sql), b.binds)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(document_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err)
    }

    async fn count_documents(&self, scan: &Scan<'_>) -> StoreResult<u64> {
        let mut b = SqlBuilder::new(Dialect::Postgres, scan.indexed);
        let where_sql = scan_where(&mut b, scan, false);
        let sql = format!("SELECT COUNT(*) FROM documents WHERE {where_sql}");
        let row = bind_all(sqlx::query(&sql), b.binds)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        let n: i64 = row.try_get(0).map_err(map_err)?;
        Ok(n as u64)
    }

    async fn aggregate_numbers(
        &self,
        scan: &Scan<'_>,
        paths: &[Vec<String>],
    ) -> StoreResult<NumericAggregates> {
        let mut b = SqlBuilder::new(Dialect::Postgres, scan.indexed);
        let sql = aggregate_sql(&mut b, scan, paths, "documents");
        let row = bind_all(sqlx::query(&sql), b.binds)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        let mut out = NumericAggregates {
            count: row.try_get::<i64, _>(0).map_err(map_err)? as u64,
            sums: Vec::with_capacity(paths.len()),
        };
        for i in 0..paths.len() {
            let sum: Option<String> = row.try_get(1 + 2 * i).map_err(map_err)?;
            // Rust reads a decimal past f64's range as infinity, which the caller refuses.
            let sum = sum.and_then(|text| text.parse::<f64>().ok());
            let count: i64 = row.try_get(2 + 2 * i).map_err(map_err)?;
            out.sums.push((sum.unwrap_or(0.0), count as u64));
        }
        Ok(out)
    }

    async fn optimize(&self) -> StoreResult<()> {
        Ok(())
    }
}
