//! Storage metadata on SQLite, with the SQL shared in `store::storage`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension, Row, Transaction};

use super::{map_err, parse_ts, ts, SqliteStore};
use crate::store::storage::{
    self as sql, BucketRow, Expect, ObjectRow, ObjectWrite, StorageStore, UploadPart, UploadRow,
};
use crate::store::{Actor, EventOp, StoreResult};

fn bucket_from_row(r: &Row<'_>) -> rusqlite::Result<BucketRow> {
    Ok(BucketRow {
        name: r.get(0)?,
        public: r.get(1)?,
        max_object_size: r.get(2)?,
        allowed_content_types: r.get(3)?,
        rules: r.get(4)?,
        created_at: parse_ts(&r.get::<_, String>(5)?)?,
        updated_at: parse_ts(&r.get::<_, String>(6)?)?,
    })
}

fn object_from_row(r: &Row<'_>) -> rusqlite::Result<ObjectRow> {
    Ok(ObjectRow {
        bucket: r.get(0)?,
        path: r.get(1)?,
        blob: r.get(2)?,
        size: r.get(3)?,
        content_type: r.get(4)?,
        etag: r.get(5)?,
        metadata: r.get(6)?,
        created_at: parse_ts(&r.get::<_, String>(7)?)?,
        updated_at: parse_ts(&r.get::<_, String>(8)?)?,
    })
}

fn upload_from_row(r: &Row<'_>) -> rusqlite::Result<UploadRow> {
    Ok(UploadRow {
        id: r.get(0)?,
        bucket: r.get(1)?,
        path: r.get(2)?,
        owner: r.get(3)?,
        length: r.get(4)?,
        offset: r.get(5)?,
        content_type: r.get(6)?,
        metadata: r.get(7)?,
        created_at: parse_ts(&r.get::<_, String>(8)?)?,
        expires_at: parse_ts(&r.get::<_, String>(9)?)?,
    })
}

fn part_from_row(r: &Row<'_>) -> rusqlite::Result<UploadPart> {
    Ok(UploadPart {
        upload_id: r.get(0)?,
        start: r.get(1)?,
        size: r.get(2)?,
        blob: r.get(3)?,
    })
}

fn parts_of(c: &rusqlite::Connection, id: &str) -> StoreResult<Vec<UploadPart>> {
    c.prepare_cached(sql::SELECT_UPLOAD_PARTS)
        .and_then(|mut s| {
            s.query_map([id], part_from_row)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        })
        .map_err(map_err)
}

fn current_object(
    tx: &Transaction<'_>,
    bucket: &str,
    path: &str,
) -> StoreResult<Option<ObjectRow>> {
    tx.prepare_cached(&sql::select_object())
        .and_then(|mut s| {
            s.query_row(params![bucket, path], object_from_row)
                .optional()
        })
        .map_err(map_err)
}

fn trash(tx: &Transaction<'_>, blob: &str, due: DateTime<Utc>) -> StoreResult<()> {
    tx.prepare_cached(sql::TRASH_BLOB)
        .and_then(|mut s| s.execute(params![blob, ts(&due)]))
        .map_err(map_err)?;
    Ok(())
}

#[async_trait]
impl StorageStore for SqliteStore {
    async fn bucket(&self, name: &str) -> StoreResult<Option<BucketRow>> {
        let name = name.to_string();
        self.read(move |c| {
            c.prepare_cached(&sql::select_bucket())
                .and_then(|mut s| s.query_row([&name], bucket_from_row).optional())
                .map_err(map_err)
        })
        .await
    }

    async fn list_buckets(&self) -> StoreResult<Vec<BucketRow>> {
        self.read(move |c| {
            let mut s = c.prepare_cached(&sql::list_buckets()).map_err(map_err)?;
            let rows = s
                .query_map([], bucket_from_row)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(map_err)?;
            Ok(rows)
        })
        .await
    }

    async fn put_bucket(&self, row: &BucketRow) -> StoreResult<BucketRow> {
        let row = row.clone();
        self.write_unit(move |unit| {
            unit.tx
                .prepare_cached(&sql::upsert_bucket())
                .and_then(|mut s| {
                    s.query_row(
                        params![
                            row.name,
                            row.public,
                            row.max_object_size,
                            row.allowed_content_types,
                            row.rules,
                            ts(&row.created_at),
                            ts(&row.updated_at)
                        ],
                        bucket_from_row,
                    )
                })
                .map_err(map_err)
        })
        .await
    }

    async fn delete_bucket(
        &self,
        name: &str,
        actor: &Actor,
        grace: chrono::Duration,
    ) -> StoreResult<bool> {
        let name = name.to_string();
        let actor = actor.clone();
        self.write_unit(move |unit| {
            let deleted = unit
                .tx
                .execute(sql::DELETE_BUCKET, [&name])
                .map_err(map_err)?;
            if deleted == 0 {
                return Ok(false);
            }
            let objects = unit
                .tx
                .prepare_cached(&sql::bucket_objects())
                .and_then(|mut s| {
                    s.query_map([&name], object_from_row)
                        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                })
                .map_err(map_err)?;
            unit.tx
                .execute(sql::DELETE_BUCKET_OBJECTS, [&name])
                .map_err(map_err)?;
            let due = unit.now + grace;
            let mut events = Vec::with_capacity(objects.len());
            for o in &objects {
                trash(unit.tx, &o.blob, due)?;
                events.push(sql::object_event(EventOp::Delete, o, Some(o), &actor));
            }
            unit.append(events)?;
            Ok(true)
        })
        .await
    }

    async fn object(&self, bucket: &str, path: &str) -> StoreResult<Option<ObjectRow>> {
        let (bucket, path) = (bucket.to_string(), path.to_string());
        self.read(move |c| {
            c.prepare_cached(&sql::select_object())
                .and_then(|mut s| {
                    s.query_row(params![bucket, path], object_from_row)
                        .optional()
                })
                .map_err(map_err)
        })
        .await
    }

    async fn list_objects(
        &self,
        bucket: &str,
        lower: &str,
        after: &str,
        upper: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<ObjectRow>> {
        let (bucket, lower, after) = (bucket.to_string(), lower.to_string(), after.to_string());
        let upper = upper.map(str::to_string);
        self.read(move |c| {
            let mut s = c.prepare_cached(&sql::list_objects()).map_err(map_err)?;
            let rows = s
                .query_map(params![bucket, lower, after, upper, limit], object_from_row)
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(map_err)?;
            Ok(rows)
        })
        .await
    }

    async fn trash_blob(&self, blob: &str, due: DateTime<Utc>) -> StoreResult<()> {
        let blob = blob.to_string();
        self.write_unit(move |unit| trash(unit.tx, &blob, due))
            .await
    }

    async fn commit_object(
        &self,
        row: ObjectRow,
        expect: Expect,
        grace: chrono::Duration,
        actor: &Actor,
    ) -> StoreResult<ObjectWrite> {
        let actor = actor.clone();
        self.write_unit(move |unit| {
            let previous = current_object(unit.tx, &row.bucket, &row.path)?;
            if !expect.holds(previous.as_ref()) {
                return Ok(ObjectWrite::Changed);
            }
            let (row, op) = sql::committed_row(row, previous.as_ref(), unit.now);
            unit.tx
                .prepare_cached(&sql::upsert_object())
                .and_then(|mut s| {
                    s.execute(params![
                        row.bucket,
                        row.path,
                        row.blob,
                        row.size,
                        row.content_type,
                        row.etag,
                        row.metadata,
                        ts(&row.created_at),
                        ts(&row.updated_at)
                    ])
                })
                .map_err(map_err)?;
            unit.tx
                .prepare_cached(sql::UNTRASH_BLOB)
                .and_then(|mut s| s.execute([&row.blob]))
                .map_err(map_err)?;
            if let Some(p) = &previous {
                trash(unit.tx, &p.blob, unit.now + grace)?;
            }
            let event = sql::object_event(op, &row, previous.as_ref(), &actor);
            let position = unit.append(vec![event])?[0].position;
            Ok(ObjectWrite::Done {
                row: Box::new(row),
                previous: previous.map(Box::new),
                position,
            })
        })
        .await
    }

    async fn delete_object(
        &self,
        bucket: &str,
        path: &str,
        expect: Expect,
        grace: chrono::Duration,
        actor: &Actor,
    ) -> StoreResult<ObjectWrite> {
        let (bucket, path) = (bucket.to_string(), path.to_string());
        let actor = actor.clone();
        self.write_unit(move |unit| {
            let Some(previous) = current_object(unit.tx, &bucket, &path)? else {
                return Ok(ObjectWrite::Missing);
            };
            if !expect.holds(Some(&previous)) {
                return Ok(ObjectWrite::Changed);
            }
            unit.tx
                .execute(sql::DELETE_OBJECT, params![bucket, path])
                .map_err(map_err)?;
            trash(unit.tx, &previous.blob, unit.now + grace)?;
            let event = sql::object_event(EventOp::Delete, &previous, Some(&previous), &actor);
            let position = unit.append(vec![event])?[0].position;
            Ok(ObjectWrite::Done {
                row: Box::new(previous.clone()),
                previous: Some(Box::new(previous)),
                position,
            })
        })
        .await
    }

    async fn due_blobs(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<String>> {
        self.read(move |c| {
            let mut s = c.prepare_cached(sql::DUE_BLOBS).map_err(map_err)?;
            let rows = s
                .query_map(params![ts(&now), limit], |r| r.get(0))
                .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
                .map_err(map_err)?;
            Ok(rows)
        })
        .await
    }

    async fn forget_blobs(&self, blobs: &[String]) -> StoreResult<()> {
        let blobs = blobs.to_vec();
        self.write_unit(move |unit| {
            let mut s = unit.tx.prepare_cached(sql::UNTRASH_BLOB).map_err(map_err)?;
            for b in &blobs {
                s.execute([b]).map_err(map_err)?;
            }
            Ok(())
        })
        .await
    }

    async fn hasten_blobs(&self, prefix: &str, due: DateTime<Utc>) -> StoreResult<u64> {
        let prefix = prefix.to_string();
        self.write_unit(move |unit| {
            let n = unit
                .tx
                .prepare_cached(sql::HASTEN_BLOBS)
                .and_then(|mut s| s.execute(params![ts(&due), prefix]))
                .map_err(map_err)?;
            Ok(n as u64)
        })
        .await
    }

    async fn create_upload(&self, row: &UploadRow) -> StoreResult<()> {
        let row = row.clone();
        self.write_unit(move |unit| {
            unit.tx
                .prepare_cached(&sql::insert_upload())
                .and_then(|mut s| {
                    s.execute(params![
                        row.id,
                        row.bucket,
                        row.path,
                        row.owner,
                        row.length,
                        row.offset,
                        row.content_type,
                        row.metadata,
                        ts(&row.created_at),
                        ts(&row.expires_at)
                    ])
                })
                .map_err(map_err)?;
            Ok(())
        })
        .await
    }

    async fn upload(&self, id: &str) -> StoreResult<Option<UploadRow>> {
        let id = id.to_string();
        self.read_point(move |c| {
            c.prepare_cached(&sql::select_upload())
                .and_then(|mut s| s.query_row([&id], upload_from_row).optional())
                .map_err(map_err)
        })
        .await
    }

    async fn upload_parts(&self, id: &str) -> StoreResult<Vec<UploadPart>> {
        let id = id.to_string();
        self.read(move |c| parts_of(c, &id)).await
    }

    async fn append_upload_part(&self, part: &UploadPart, now: DateTime<Utc>) -> StoreResult<bool> {
        let part = part.clone();
        self.write_unit(move |unit| {
            let moved = unit
                .tx
                .prepare_cached(sql::ADVANCE_UPLOAD)
                .and_then(|mut s| {
                    s.execute(params![
                        part.start + part.size,
                        part.upload_id,
                        part.start,
                        ts(&now)
                    ])
                })
                .map_err(map_err)?;
            if moved == 0 {
                return Ok(false);
            }
            unit.tx
                .prepare_cached(sql::INSERT_UPLOAD_PART)
                .and_then(|mut s| {
                    s.execute(params![part.upload_id, part.start, part.size, part.blob])
                })
                .map_err(map_err)?;
            Ok(true)
        })
        .await
    }

    async fn delete_upload(
        &self,
        id: &str,
        due: DateTime<Utc>,
    ) -> StoreResult<Option<Vec<String>>> {
        let id = id.to_string();
        self.write_unit(move |unit| {
            let parts = parts_of(unit.tx, &id)?;
            let deleted = unit
                .tx
                .execute(sql::DELETE_UPLOAD, [&id])
                .map_err(map_err)?;
            if deleted == 0 {
                return Ok(None);
            }
            unit.tx
                .execute(sql::DELETE_UPLOAD_PARTS, [&id])
                .map_err(map_err)?;
            for p in &parts {
                trash(unit.tx, &p.blob, due)?;
            }
            Ok(Some(parts.into_iter().map(|p| p.blob).collect()))
        })
        .await
    }

    async fn delete_expired_uploads(&self, now: DateTime<Utc>) -> StoreResult<u64> {
        self.write_unit(move |unit| {
            let now = ts(&now);
            unit.tx
                .execute(sql::DELETE_EXPIRED_UPLOAD_PARTS, [&now])
                .map_err(map_err)?;
            let n = unit
                .tx
                .execute(sql::DELETE_EXPIRED_UPLOADS, [&now])
                .map_err(map_err)?;
            Ok(n as u64)
        })
        .await
    }
}
