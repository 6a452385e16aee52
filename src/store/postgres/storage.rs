//! Storage metadata on PostgreSQL, with the SQL shared in `store::storage`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{Postgres, Row, Transaction};

use super::{map_err, PgStore};
use crate::store::storage::{
    self as sql, BucketRow, Expect, ObjectRow, ObjectWrite, StorageStore, UploadPart, UploadRow,
};
use crate::store::{Actor, EventOp, StoreResult};

fn bucket_from_row(r: &PgRow) -> Result<BucketRow, sqlx::Error> {
    Ok(BucketRow {
        name: r.try_get(0)?,
        public: r.try_get(1)?,
        max_object_size: r.try_get(2)?,
        allowed_content_types: r.try_get(3)?,
        rules: r.try_get(4)?,
        created_at: r.try_get(5)?,
        updated_at: r.try_get(6)?,
    })
}

fn object_from_row(r: &PgRow) -> Result<ObjectRow, sqlx::Error> {
    Ok(ObjectRow {
        bucket: r.try_get(0)?,
        path: r.try_get(1)?,
        blob: r.try_get(2)?,
        size: r.try_get(3)?,
        content_type: r.try_get(4)?,
        etag: r.try_get(5)?,
        metadata: r.try_get(6)?,
        created_at: r.try_get(7)?,
        updated_at: r.try_get(8)?,
    })
}

fn upload_from_row(r: &PgRow) -> Result<UploadRow, sqlx::Error> {
    Ok(UploadRow {
        id: r.try_get(0)?,
        bucket: r.try_get(1)?,
        path: r.try_get(2)?,
        owner: r.try_get(3)?,
        length: r.try_get(4)?,
        offset: r.try_get(5)?,
        content_type: r.try_get(6)?,
        metadata: r.try_get(7)?,
        created_at: r.try_get(8)?,
        expires_at: r.try_get(9)?,
    })
}

fn part_from_row(r: &PgRow) -> Result<UploadPart, sqlx::Error> {
    Ok(UploadPart {
        upload_id: r.try_get(0)?,
        start: r.try_get(1)?,
        size: r.try_get(2)?,
        blob: r.try_get(3)?,
    })
}

/// Locks the object (see [`sql::LOCK_OBJECT_PG`]) and reads what is stored.
async fn locked_object(
    tx: &mut Transaction<'static, Postgres>,
    bucket: &str,
    path: &str,
) -> StoreResult<Option<ObjectRow>> {
    sqlx::query(sql::LOCK_OBJECT_PG)
        .bind(format!("{bucket}/{path}"))
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    let row = sqlx::query(&sql::select_object())
        .bind(bucket)
        .bind(path)
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?;
    row.as_ref()
        .map(object_from_row)
        .transpose()
        .map_err(map_err)
}

async fn trash(
    tx: &mut Transaction<'static, Postgres>,
    blob: &str,
    due: DateTime<Utc>,
) -> StoreResult<()> {
    sqlx::query(sql::TRASH_BLOB)
        .bind(blob)
        .bind(due)
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(())
}

#[async_trait]
impl StorageStore for PgStore {
    async fn bucket(&self, name: &str) -> StoreResult<Option<BucketRow>> {
        let row = sqlx::query(&sql::select_bucket())
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref()
            .map(bucket_from_row)
            .transpose()
            .map_err(map_err)
    }

    async fn list_buckets(&self) -> StoreResult<Vec<BucketRow>> {
        let rows = sqlx::query(&sql::list_buckets())
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(bucket_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err)
    }

    async fn put_bucket(&self, row: &BucketRow) -> StoreResult<BucketRow> {
        let stored = sqlx::query(&sql::upsert_bucket())
            .bind(&row.name)
            .bind(row.public)
            .bind(row.max_object_size)
            .bind(&row.allowed_content_types)
            .bind(&row.rules)
            .bind(row.created_at)
            .bind(row.updated_at)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)?;
        bucket_from_row(&stored).map_err(map_err)
    }

    async fn delete_bucket(
        &self,
        name: &str,
        actor: &Actor,
        grace: chrono::Duration,
    ) -> StoreResult<bool> {
        let mut unit = self.begin_unit().await?;
        let deleted = sqlx::query(sql::DELETE_BUCKET)
            .bind(name)
            .execute(&mut *unit.tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        if deleted == 0 {
            return Ok(false);
        }
        let objects: Vec<ObjectRow> = sqlx::query(&sql::bucket_objects())
            .bind(name)
            .fetch_all(&mut *unit.tx)
            .await
            .map_err(map_err)?
            .iter()
            .map(object_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err)?;
        sqlx::query(sql::DELETE_BUCKET_OBJECTS)
            .bind(name)
            .execute(&mut *unit.tx)
            .await
            .map_err(map_err)?;
        let due = unit.now + grace;
        let mut events = Vec::with_capacity(objects.len());
        for o in &objects {
            trash(&mut unit.tx, &o.blob, due).await?;
            events.push(sql::object_event(EventOp::Delete, o, Some(o), actor));
        }
        unit.append(events).await?;
        unit.commit().await?;
        Ok(true)
    }

    async fn object(&self, bucket: &str, path: &str) -> StoreResult<Option<ObjectRow>> {
        let row = sqlx::query(&sql::select_object())
            .bind(bucket)
            .bind(path)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref()
            .map(object_from_row)
            .transpose()
            .map_err(map_err)
    }

    async fn list_objects(
        &self,
        bucket: &str,
        lower: &str,
        after: &str,
        upper: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<ObjectRow>> {
        let rows = sqlx::query(&sql::list_objects())
            .bind(bucket)
            .bind(lower)
            .bind(after)
            .bind(upper)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(object_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err)
    }

    async fn trash_blob(&self, blob: &str, due: DateTime<Utc>) -> StoreResult<()> {
        sqlx::query(sql::TRASH_BLOB)
            .bind(blob)
            .bind(due)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn commit_object(
        &self,
        row: ObjectRow,
        expect: Expect,
        grace: chrono::Duration,
        actor: &Actor,
    ) -> StoreResult<ObjectWrite> {
        let mut unit = self.begin_unit().await?;
        let previous = locked_object(&mut unit.tx, &row.bucket, &row.path).await?;
        if !expect.holds(previous.as_ref()) {
            return Ok(ObjectWrite::Changed);
        }
        let (row, op) = sql::committed_row(row, previous.as_ref(), unit.now);
        sqlx::query(&sql::upsert_object())
            .bind(&row.bucket)
            .bind(&row.path)
            .bind(&row.blob)
            .bind(row.size)
            .bind(&row.content_type)
            .bind(&row.etag)
            .bind(&row.metadata)
            .bind(row.created_at)
            .bind(row.updated_at)
            .execute(&mut *unit.tx)
            .await
            .map_err(map_err)?;
        sqlx::query(sql::UNTRASH_BLOB)
            .bind(&row.blob)
            .execute(&mut *unit.tx)
            .await
            .map_err(map_err)?;
        if let Some(p) = &previous {
            let due = unit.now + grace;
            trash(&mut unit.tx, &p.blob, due).await?;
        }
        let event = sql::object_event(op, &row, previous.as_ref(), actor);
        let position = unit.append(vec![event]).await?[0].position;
        unit.commit().await?;
        Ok(ObjectWrite::Done {
            row: Box::new(row),
            previous: previous.map(Box::new),
            position,
        })
    }

    async fn delete_object(
        &self,
        bucket: &str,
        path: &str,
        expect: Expect,
        grace: chrono::Duration,
        actor: &Actor,
    ) -> StoreResult<ObjectWrite> {
        let mut unit = self.begin_unit().await?;
        let Some(previous) = locked_object(&mut unit.tx, bucket, path).await? else {
            return Ok(ObjectWrite::Missing);
        };
        if !expect.holds(Some(&previous)) {
            return Ok(ObjectWrite::Changed);
        }
        sqlx::query(sql::DELETE_OBJECT)
            .bind(bucket)
            .bind(path)
            .execute(&mut *unit.tx)
            .await
            .map_err(map_err)?;
        let due = unit.now + grace;
        trash(&mut unit.tx, &previous.blob, due).await?;
        let event = sql::object_event(EventOp::Delete, &previous, Some(&previous), actor);
        let position = unit.append(vec![event]).await?[0].position;
        unit.commit().await?;
        Ok(ObjectWrite::Done {
            row: Box::new(previous.clone()),
            previous: Some(Box::new(previous)),
            position,
        })
    }

    async fn due_blobs(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<String>> {
        let rows = sqlx::query(sql::DUE_BLOBS)
            .bind(now)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<_, _>>()
            .map_err(map_err)
    }

    async fn forget_blobs(&self, blobs: &[String]) -> StoreResult<()> {
        sqlx::query("DELETE FROM blob_trash WHERE blob = ANY($1)")
            .bind(blobs)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn hasten_blobs(&self, prefix: &str, due: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query(sql::HASTEN_BLOBS)
            .bind(due)
            .bind(prefix)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn create_upload(&self, row: &UploadRow) -> StoreResult<()> {
        sqlx::query(&sql::insert_upload())
            .bind(&row.id)
            .bind(&row.bucket)
            .bind(&row.path)
            .bind(&row.owner)
            .bind(row.length)
            .bind(row.offset)
            .bind(&row.content_type)
            .bind(&row.metadata)
            .bind(row.created_at)
            .bind(row.expires_at)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn upload(&self, id: &str) -> StoreResult<Option<UploadRow>> {
        let row = sqlx::query(&sql::select_upload())
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref()
            .map(upload_from_row)
            .transpose()
            .map_err(map_err)
    }

    async fn upload_parts(&self, id: &str) -> StoreResult<Vec<UploadPart>> {
        let rows = sqlx::query(sql::SELECT_UPLOAD_PARTS)
            .bind(id)
            .fetch_all(&self.pool)
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(part_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err)
    }

    async fn append_upload_part(&self, part: &UploadPart, now: DateTime<Utc>) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        // The row lock the UPDATE takes makes a second PATCH at the same offset wait, then
        // find the offset moved (READ COMMITTED re-checks the WHERE on the new version).
        let moved = sqlx::query(sql::ADVANCE_UPLOAD)
            .bind(part.start + part.size)
            .bind(&part.upload_id)
            .bind(part.start)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        if moved == 0 {
            return Ok(false);
        }
        sqlx::query(sql::INSERT_UPLOAD_PART)
            .bind(&part.upload_id)
            .bind(part.start)
            .bind(part.size)
            .bind(&part.blob)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn delete_upload(
        &self,
        id: &str,
        due: DateTime<Utc>,
    ) -> StoreResult<Option<Vec<String>>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let deleted = sqlx::query(sql::DELETE_UPLOAD)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        if deleted == 0 {
            return Ok(None);
        }
        // The upload's row is locked by the DELETE: no part can be added any more.
        let parts: Vec<UploadPart> = sqlx::query(sql::SELECT_UPLOAD_PARTS)
            .bind(id)
            .fetch_all(&mut *tx)
            .await
            .map_err(map_err)?
            .iter()
            .map(part_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err)?;
        sqlx::query(sql::DELETE_UPLOAD_PARTS)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        for p in &parts {
            trash(&mut tx, &p.blob, due).await?;
        }
        tx.commit().await.map_err(map_err)?;
        Ok(Some(parts.into_iter().map(|p| p.blob).collect()))
    }

    async fn delete_expired_uploads(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        sqlx::query(sql::DELETE_EXPIRED_UPLOAD_PARTS)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        let n = sqlx::query(sql::DELETE_EXPIRED_UPLOADS)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?
            .rows_affected();
        tx.commit().await.map_err(map_err)?;
        Ok(n)
    }
}
