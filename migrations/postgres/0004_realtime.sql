-- Realtime messages between nodes (channel broadcasts and presence) travel as NOTIFY
-- payloads; one too large for a payload (8000 bytes) is kept here for a few minutes and
-- the NOTIFY carries its id.
CREATE TABLE realtime_messages (
    id BIGSERIAL PRIMARY KEY,
    body TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
