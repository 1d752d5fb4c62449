//! In-memory view of calls in flight: an event stream per call (for SSE followers) and an
//! end signal (for `POST /calls/{id}/end`, governors and shutdown). The database stays the
//! source of truth; this only fans out what was just written there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CallEvent {
    Status {
        status: crate::calls::CallStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        end_reason: Option<String>,
    },
    Transcript {
        speaker: &'static str,
        text: String,
        at_ms: i64,
    },
}

pub struct LiveCall {
    pub events: broadcast::Sender<CallEvent>,
    /// Cancelled to end the call's media session (the reason is recorded before).
    pub end: CancellationToken,
}

#[derive(Default)]
pub struct Registry {
    calls: Mutex<HashMap<String, Arc<LiveCall>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<LiveCall>>> {
        // Holders never panic mid-update (plain map operations), so poison is harmless.
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get_or_create(&self, id: &str) -> Arc<LiveCall> {
        self.lock()
            .entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(LiveCall {
                    // The buffer is allocated up front (~90 bytes a slot) for every live call;
                    // events come at speech pace and followers drain them at once, so 32 is
                    // ample (a follower that lags further skips ahead; the database has all).
                    events: broadcast::channel(32).0,
                    end: CancellationToken::new(),
                })
            })
            .clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<LiveCall>> {
        self.lock().get(id).cloned()
    }

    pub fn publish(&self, id: &str, ev: CallEvent) {
        if let Some(c) = self.get(id) {
            let _ = c.events.send(ev);
        }
    }

    /// The call reached a terminal state: tell followers, then forget it (dropping the
    /// sender ends their streams).
    pub fn finish(&self, id: &str, ev: CallEvent) {
        if let Some(c) = self.lock().remove(id) {
            let _ = c.events.send(ev);
            c.end.cancel();
        }
    }

    /// Ends every follower stream (shutdown): nothing more will be published.
    pub fn close_all(&self) {
        self.lock().clear();
    }

    /// Forgets a call without announcing anything (followers' streams end).
    pub fn discard(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
