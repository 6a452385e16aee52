-- File storage: buckets, object metadata (the bytes live in the storage backend under
-- `blob`), and blobs waiting to be removed from the backend.

CREATE TABLE buckets (
    name                   TEXT PRIMARY KEY,
    public                 INTEGER NOT NULL DEFAULT 0,
    max_object_size        INTEGER,
    allowed_content_types  TEXT NOT NULL DEFAULT '[]',
    rules                  TEXT NOT NULL DEFAULT '{}',
    created_at             TEXT NOT NULL,
    updated_at             TEXT NOT NULL
);

-- Paths compare bytewise (SQLite's BINARY collation), which listing by prefix relies on.
CREATE TABLE objects (
    bucket        TEXT NOT NULL,
    path          TEXT NOT NULL,
    blob          TEXT NOT NULL,
    size          INTEGER NOT NULL,
    content_type  TEXT NOT NULL,
    etag          TEXT NOT NULL,
    metadata      TEXT NOT NULL DEFAULT '{}',
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (bucket, path)
) WITHOUT ROWID;

-- A blob is listed here from the moment an upload starts writing it until an object row
-- points at it, and again once no row does (replaced or deleted): the sweeper removes it
-- from the backend after `due_at`. So a crash between writing bytes and committing the row
-- leaves nothing behind for good, and readers of a replaced version get a grace period.
CREATE TABLE blob_trash (
    blob    TEXT PRIMARY KEY,
    due_at  TEXT NOT NULL
);
CREATE INDEX blob_trash_due ON blob_trash (due_at);
