//! Versioned schema migrations, embedded in the binary. The version lives in
//! `PRAGMA user_version`; each step runs in its own transaction. Later capabilities append
//! steps (add columns/tables); shipped steps are never edited.

use std::path::Path;

use rusqlite::Connection;

use super::{Result, StoreError};

const STEPS: &[&str] = &[
    // 1: tenants, keys, calls, transcripts, events, work queue.
    r#"
CREATE TABLE tenants (
    id                   INTEGER PRIMARY KEY,
    name                 TEXT NOT NULL UNIQUE,
    company              TEXT NOT NULL DEFAULT '',
    agent_name           TEXT NOT NULL DEFAULT '',
    system_prompt        TEXT,
    greeting             TEXT,
    voice                TEXT,
    engine               TEXT,
    from_number          TEXT,
    max_concurrent_calls INTEGER,
    calls_per_minute     INTEGER,
    webhook_url          TEXT,
    webhook_secret       TEXT,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
) STRICT;

CREATE TABLE tenant_numbers (
    number    TEXT PRIMARY KEY,
    tenant_id INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE
) STRICT;
CREATE INDEX tenant_numbers_tenant ON tenant_numbers(tenant_id);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    tenant_id    INTEGER REFERENCES tenants(id) ON DELETE CASCADE,
    is_admin     INTEGER NOT NULL DEFAULT 0,
    name         TEXT NOT NULL DEFAULT '',
    secret_hash  BLOB NOT NULL,
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER,
    last_used_at INTEGER,
    revoked_at   INTEGER,
    CHECK ((is_admin = 1) = (tenant_id IS NULL))
) STRICT;
CREATE INDEX api_keys_tenant ON api_keys(tenant_id);

CREATE TABLE calls (
    id                TEXT PRIMARY KEY,
    tenant_id         INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    direction         TEXT NOT NULL CHECK (direction IN ('outbound', 'inbound')),
    to_number         TEXT NOT NULL,
    from_number       TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('queued', 'initiating', 'ringing',
                          'in_progress', 'completed', 'busy', 'no_answer', 'failed', 'canceled')),
    engine            TEXT NOT NULL,
    system_prompt     TEXT,
    greeting          TEXT,
    voice             TEXT,
    max_duration_secs INTEGER,
    machine_detection INTEGER NOT NULL DEFAULT 0,
    metadata          TEXT NOT NULL DEFAULT '{}',
    twilio_call_sid   TEXT UNIQUE,
    answered_by       TEXT,
    end_reason        TEXT,
    error             TEXT,
    idempotency_key   TEXT,
    request_hash      TEXT,
    stream_token_hash BLOB,
    last_callback_seq INTEGER NOT NULL DEFAULT -1,
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    answered_at       INTEGER,
    ended_at          INTEGER,
    duration_seconds  INTEGER,
    updated_at        INTEGER NOT NULL,
    UNIQUE (tenant_id, idempotency_key)
) STRICT;
CREATE INDEX calls_tenant_created ON calls(tenant_id, created_at DESC, id DESC);
CREATE INDEX calls_created ON calls(created_at DESC, id DESC);
CREATE INDEX calls_live ON calls(status)
    WHERE status IN ('queued', 'initiating', 'ringing', 'in_progress');

CREATE TABLE transcript_entries (
    id      INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL REFERENCES calls(id) ON DELETE CASCADE,
    speaker TEXT NOT NULL CHECK (speaker IN ('agent', 'caller')),
    text    TEXT NOT NULL,
    at_ms   INTEGER NOT NULL
) STRICT;
CREATE INDEX transcript_entries_call ON transcript_entries(call_id, at_ms, id);

CREATE TABLE call_events (
    id      INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL REFERENCES calls(id) ON DELETE CASCADE,
    at      INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    data    TEXT NOT NULL DEFAULT '{}'
) STRICT;
CREATE INDEX call_events_call ON call_events(call_id, id);

CREATE TABLE jobs (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL,
    call_id    TEXT REFERENCES calls(id) ON DELETE CASCADE,
    tenant_id  INTEGER REFERENCES tenants(id) ON DELETE CASCADE,
    dedupe_key TEXT UNIQUE,
    payload    TEXT NOT NULL DEFAULT '{}',
    state      TEXT NOT NULL DEFAULT 'pending'
                   CHECK (state IN ('pending', 'running', 'done', 'dead')),
    run_at     INTEGER NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
CREATE INDEX jobs_due ON jobs(run_at) WHERE state IN ('pending', 'running');
"#,
    // 2: per-call latency figures (JSON) and the engine's own id for the call (Ultravox).
    r#"
ALTER TABLE calls ADD COLUMN latency TEXT;
ALTER TABLE calls ADD COLUMN engine_call_id TEXT;
"#,
    // 3: the dial queue in order. The dialer reads its head and the expired calls on every
    // wake; through `calls_created` both walked the whole call history from its oldest row
    // until they met a queued one, a cost that grew with every finished call.
    r#"
CREATE INDEX calls_queue ON calls(created_at, id) WHERE status = 'queued';
"#,
    // 4: dashboard logins. One-time login tokens (`voicectl open`) and browser sessions, both
    // stored as SHA-256 of their secret. `tenant_id` NULL is the admin; `key_id` is set when a
    // session was opened with an API key, so revoking the key ends the session too.
    r#"
CREATE TABLE ui_sessions (
    id          TEXT PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('login', 'session')),
    tenant_id   INTEGER REFERENCES tenants(id) ON DELETE CASCADE,
    key_id      TEXT REFERENCES api_keys(id) ON DELETE CASCADE,
    secret_hash BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    revoked_at  INTEGER
) STRICT;
CREATE INDEX ui_sessions_expiry ON ui_sessions(expires_at);
"#,
    // 5: the providers a pipeline call used (JSON {"stt","llm","tts"}).
    r#"
ALTER TABLE calls ADD COLUMN providers TEXT;
"#,
    // 6: campaigns, their recipients, the per-tenant do-not-call list, and the campaign of a
    // call. The scheduler reads due recipients through `campaign_recipients_due` (never a scan
    // of the whole list); progress reads `campaign_counts`, kept by triggers.
    r#"
CREATE TABLE campaigns (
    id             TEXT PRIMARY KEY,
    tenant_id      INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name           TEXT NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('running', 'paused', 'completed', 'canceled')),
    settings       TEXT NOT NULL DEFAULT '{}',
    hours_start    INTEGER NOT NULL,
    hours_end      INTEGER NOT NULL,
    days           INTEGER NOT NULL,
    max_concurrent INTEGER NOT NULL,
    calls_per_second REAL NOT NULL,
    retry          TEXT NOT NULL DEFAULT '{}',
    calls_placed   INTEGER NOT NULL DEFAULT 0,
    answered       INTEGER NOT NULL DEFAULT 0,
    voicemail      INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    completed_at   INTEGER
) STRICT;
CREATE INDEX campaigns_tenant ON campaigns(tenant_id, created_at DESC, id DESC);
CREATE INDEX campaigns_running ON campaigns(status) WHERE status = 'running';

CREATE TABLE campaign_recipients (
    id              INTEGER PRIMARY KEY,
    campaign_id     TEXT NOT NULL REFERENCES campaigns(id) ON DELETE CASCADE,
    to_number       TEXT NOT NULL,
    timezone        TEXT,
    vars            TEXT NOT NULL DEFAULT '{}',
    metadata        TEXT NOT NULL DEFAULT '{}',
    state           TEXT NOT NULL CHECK (state IN ('pending', 'scheduled', 'dialing', 'in_call',
                        'done', 'failed', 'suppressed', 'canceled')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    tries           TEXT NOT NULL DEFAULT '{}',
    next_attempt_at INTEGER,
    last_outcome    TEXT,
    last_call_id    TEXT,
    UNIQUE (campaign_id, to_number)
) STRICT;
CREATE INDEX campaign_recipients_due ON campaign_recipients(campaign_id, next_attempt_at)
    WHERE state IN ('pending', 'scheduled');
CREATE INDEX campaign_recipients_state ON campaign_recipients(campaign_id, state);

-- Recipients per state, kept by triggers: progress reads eight rows, not 300,000 index entries.
CREATE TABLE campaign_counts (
    campaign_id TEXT NOT NULL REFERENCES campaigns(id) ON DELETE CASCADE,
    state       TEXT NOT NULL,
    n           INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (campaign_id, state)
) STRICT, WITHOUT ROWID;
CREATE TRIGGER campaigns_counts_init AFTER INSERT ON campaigns BEGIN
    INSERT INTO campaign_counts (campaign_id, state) VALUES
        (NEW.id, 'pending'), (NEW.id, 'scheduled'), (NEW.id, 'dialing'), (NEW.id, 'in_call'),
        (NEW.id, 'done'), (NEW.id, 'failed'), (NEW.id, 'suppressed'), (NEW.id, 'canceled');
END;
CREATE TRIGGER campaign_recipients_count_insert AFTER INSERT ON campaign_recipients BEGIN
    UPDATE campaign_counts SET n = n + 1 WHERE campaign_id = NEW.campaign_id AND state = NEW.state;
END;
CREATE TRIGGER campaign_recipients_count_update AFTER UPDATE OF state ON campaign_recipients
WHEN OLD.state <> NEW.state BEGIN
    UPDATE campaign_counts SET n = n - 1 WHERE campaign_id = OLD.campaign_id AND state = OLD.state;
    UPDATE campaign_counts SET n = n + 1 WHERE campaign_id = NEW.campaign_id AND state = NEW.state;
END;
CREATE TRIGGER campaign_recipients_count_delete AFTER DELETE ON campaign_recipients BEGIN
    UPDATE campaign_counts SET n = n - 1 WHERE campaign_id = OLD.campaign_id AND state = OLD.state;
END;

CREATE TABLE dnc (
    tenant_id  INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    number     TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, number)
) STRICT, WITHOUT ROWID;

ALTER TABLE calls ADD COLUMN campaign_id TEXT;
ALTER TABLE calls ADD COLUMN recipient_id INTEGER;
CREATE INDEX calls_campaign ON calls(campaign_id) WHERE campaign_id IS NOT NULL;
"#,
    // 7: recording (SPEC §8): the tenant's and the call's `record` choice (NULL: not set, the
    // next level decides), the tenant's spoken notice, and the call's recording status (JSON
    // `{"status": "recorded"|"failed", "error"?}`; NULL: not recorded).
    r#"
ALTER TABLE tenants ADD COLUMN record INTEGER;
ALTER TABLE tenants ADD COLUMN recording_notice TEXT;
ALTER TABLE calls ADD COLUMN record INTEGER;
ALTER TABLE calls ADD COLUMN recording TEXT;
"#,
    // 8: tenant HTTP tools (SPEC §8): one JSON definition per tenant and name; transcript
    // lines may be the tool's (`speaker = 'tool'`), which the CHECK needs a table rebuild for.
    r#"
CREATE TABLE transcript_entries_v8 (
    id      INTEGER PRIMARY KEY,
    call_id TEXT NOT NULL REFERENCES calls(id) ON DELETE CASCADE,
    speaker TEXT NOT NULL CHECK (speaker IN ('agent', 'caller', 'tool')),
    text    TEXT NOT NULL,
    at_ms   INTEGER NOT NULL
) STRICT;
INSERT INTO transcript_entries_v8 (id, call_id, speaker, text, at_ms)
    SELECT id, call_id, speaker, text, at_ms FROM transcript_entries;
DROP TABLE transcript_entries;
ALTER TABLE transcript_entries_v8 RENAME TO transcript_entries;
CREATE INDEX transcript_entries_call ON transcript_entries(call_id, at_ms, id);

CREATE TABLE tools (
    tenant_id  INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    definition TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, name)
) STRICT, WITHOUT ROWID;
"#,
    // 9: keys the carrier presses once an outbound call is answered (`send_digits`), and what
    // to do when answering-machine detection reports a machine (`machine_action`: 'hangup').
    r#"
ALTER TABLE calls ADD COLUMN send_digits TEXT;
ALTER TABLE calls ADD COLUMN machine_action TEXT;
"#,
    // 10: browser calls: `calls.direction` may be 'web'. SQLite's documented way to loosen a
    // CHECK (writable_schema) keeps every column any other step adds; the throwaway table
    // bumps schema_version so other connections reload, RESET reloads this one.
    r#"
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
   SET sql = replace(sql, 'CHECK (direction IN (''outbound'', ''inbound''))',
                          'CHECK (direction IN (''outbound'', ''inbound'', ''web''))')
 WHERE type = 'table' AND name = 'calls';
PRAGMA writable_schema = RESET;
CREATE TABLE schema_bump_10 (x INTEGER) STRICT;
DROP TABLE schema_bump_10;
"#,
    // 11: transfers: a tenant's transfer numbers and mode, and a call's transfer outcome.
    r#"
ALTER TABLE tenants ADD COLUMN transfer_numbers TEXT;
ALTER TABLE tenants ADD COLUMN transfer_mode TEXT;
ALTER TABLE calls ADD COLUMN transfer TEXT;
"#,
    // 12: voicemail drop: a call's message, and a tenant's detection mode and message.
    r#"
ALTER TABLE calls ADD COLUMN voicemail_message TEXT;
ALTER TABLE tenants ADD COLUMN machine_detection TEXT;
ALTER TABLE tenants ADD COLUMN voicemail_message TEXT;
"#,
    // 13: post-call analysis: what a tenant asks for, what a call got.
    r#"
ALTER TABLE tenants ADD COLUMN analysis TEXT;
ALTER TABLE calls ADD COLUMN analysis TEXT;
"#,
    // 14: public browser-call links (`/talk/<token>`), stored hashed.
    r#"
CREATE TABLE web_links (
    id          TEXT PRIMARY KEY,
    tenant_id   INTEGER NOT NULL REFERENCES tenants(id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    token_hash  BLOB NOT NULL UNIQUE,
    max_duration_secs INTEGER,
    expires_at  INTEGER,
    created_at  INTEGER NOT NULL
) STRICT;
CREATE INDEX web_links_tenant ON web_links(tenant_id);
"#,
];

pub fn apply(conn: &Connection, path: &Path) -> Result<()> {
    let known = STEPS.len() as i64;
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > known {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found,
            known,
        });
    }
    for (i, sql) in STEPS.iter().enumerate().skip(found as usize) {
        let version = i as i64 + 1;
        // IMMEDIATE so two processes opening a fresh database cannot both migrate it.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if current >= version {
            conn.execute_batch("COMMIT")?;
            continue;
        }
        let res = conn
            .execute_batch(sql)
            .and_then(|_| conn.pragma_update(None, "user_version", version));
        match res {
            Ok(()) => conn.execute_batch("COMMIT")?,
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                return Err(e.into());
            }
        }
    }
    Ok(())
}
