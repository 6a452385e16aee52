-- Resumable (tus) uploads: their state lives here, so an upload started on one node resumes
-- on another. Each PATCH's bytes are one blob in the backend (`upload_parts`), listed in
-- `blob_trash` due at the upload's expiry from the moment it is written: an upload that is
-- never finished leaves nothing behind once the sweeper has passed.

CREATE TABLE uploads (
    id             TEXT PRIMARY KEY,
    bucket         TEXT NOT NULL,
    path           TEXT NOT NULL,
    -- `kind:id` of the caller who created it; only they (or an admin) may continue it.
    owner          TEXT NOT NULL,
    upload_length  INTEGER NOT NULL,
    upload_offset  INTEGER NOT NULL DEFAULT 0,
    content_type   TEXT NOT NULL,
    metadata       TEXT NOT NULL DEFAULT '{}',
    created_at     TEXT NOT NULL,
    expires_at     TEXT NOT NULL
);
CREATE INDEX uploads_expires ON uploads (expires_at);

CREATE TABLE upload_parts (
    upload_id    TEXT NOT NULL,
    start_offset INTEGER NOT NULL,
    size         INTEGER NOT NULL,
    blob         TEXT NOT NULL,
    PRIMARY KEY (upload_id, start_offset)
) WITHOUT ROWID;
