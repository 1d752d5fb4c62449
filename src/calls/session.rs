//! One in-memory entry per call in flight: its event stream (SSE followers), its end signal
//! (`POST /calls/{id}/end`, governors, shutdown), the engine session opened while the phone
//! rings, and whether a bridge in this process serves its media. The database stays the
//! source of truth; this only fans out what was just written there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::domain::event::CallEvent;
use crate::engines::{Engine, EngineError};
use crate::media::tools::ToolReply;

/// An engine session being opened while the phone rings.
pub type Prewarm = JoinHandle<Result<Engine, EngineError>>;

pub struct Session {
    events: broadcast::Sender<CallEvent>,
    /// Cancelled to end the call's media session (the reason is recorded before).
    end: CancellationToken,
    prewarmed: Mutex<Option<Prewarm>>,
    bridged: AtomicBool,
    /// Set while the carrier moves the call's media to a new stream (keypad out, transfer):
    /// the bridge ending then parks the engine here for the next stream.
    handover: Arc<AtomicBool>,
    parking: Mutex<Option<tokio::sync::oneshot::Sender<Engine>>>,
    /// When the call's first media stream started: governors count from here across
    /// handovers.
    first_stream: std::sync::OnceLock<tokio::time::Instant>,
    /// What the agent says when it is back after a handover (e.g. a transfer that failed).
    resume_say: Mutex<Option<String>>,
    /// A transfer being dialed: (the target as listed, the summary for a warm whisper).
    transfer: Mutex<Option<PendingTransfer>>,
    /// Into the live bridge's reply queue (set while a stream is bridged).
    bridge: Mutex<Option<UnboundedSender<ToolReply>>>,
}

#[derive(Debug, Clone)]
pub struct PendingTransfer {
    pub number: String,
    pub label: String,
    pub summary: String,
}

impl Session {
    fn new() -> Self {
        Self {
            // The buffer is allocated up front (~90 bytes a slot) for every live call; events
            // come at speech pace and followers drain them at once, so 32 is ample (a
            // follower that lags further skips ahead; the database has all).
            events: broadcast::channel(32).0,
            end: CancellationToken::new(),
            prewarmed: Mutex::new(None),
            bridged: AtomicBool::new(false),
            handover: Arc::new(AtomicBool::new(false)),
            parking: Mutex::new(None),
            first_stream: std::sync::OnceLock::new(),
            resume_say: Mutex::new(None),
            transfer: Mutex::new(None),
            bridge: Mutex::new(None),
        }
    }

    /// The live bridge's reply queue, for the call domain to ask things of it.
    pub fn set_bridge(&self, to_bridge: Option<UnboundedSender<ToolReply>>) {
        *self.bridge.lock().unwrap_or_else(|p| p.into_inner()) = to_bridge;
    }

    /// Asks the live bridge for `r`; false when no bridge is listening.
    pub fn tell_bridge(&self, r: ToolReply) -> bool {
        self.bridge
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|b| b.send(r).is_ok())
    }

    pub fn set_transfer(&self, t: Option<PendingTransfer>) {
        *self.transfer.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    pub fn transfer(&self) -> Option<PendingTransfer> {
        self.transfer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The flag the bridge reads: a stream closing while it is set is a handover.
    pub fn handover_flag(&self) -> Arc<AtomicBool> {
        self.handover.clone()
    }

    pub fn in_handover(&self) -> bool {
        self.handover.load(Ordering::SeqCst)
    }

    /// Starts a handover: the running bridge's engine will be parked when its stream
    /// closes, and the next stream's engine is that one (through the pre-warm slot, so a
    /// stream arriving before the old one is fully closed still waits for it).
    pub fn begin_handover(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel::<Engine>();
        *self.parking.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        self.set_prewarm(tokio::spawn(async move {
            rx.await.map_err(|_| {
                EngineError::Failed("the engine was not handed over to the new stream".into())
            })
        }));
        self.handover.store(true, Ordering::SeqCst);
    }

    /// The carrier refused the redirect: the running bridge keeps its engine.
    pub fn cancel_handover(&self) {
        self.handover.store(false, Ordering::SeqCst);
        self.parking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.drop_prewarm();
    }

    /// The old bridge hands its engine over (true), or there was no handover (false: the
    /// engine is the caller's to close).
    pub fn park(&self, engine: Engine) -> Result<(), Engine> {
        match self
            .parking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(tx) => tx.send(engine),
            None => Err(engine),
        }
    }

    /// The new stream took the call back: the handover is over.
    pub fn end_handover(&self) {
        self.handover.store(false, Ordering::SeqCst);
    }

    /// When the first stream started (set on the first call).
    pub fn first_stream_at(&self) -> tokio::time::Instant {
        *self.first_stream.get_or_init(tokio::time::Instant::now)
    }

    pub fn set_resume_say(&self, text: Option<String>) {
        *self.resume_say.lock().unwrap_or_else(|p| p.into_inner()) = text;
    }

    pub fn take_resume_say(&self) -> Option<String> {
        self.resume_say
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn events(&self) -> &broadcast::Sender<CallEvent> {
        &self.events
    }

    pub fn subscribe(&self) -> broadcast::Receiver<CallEvent> {
        self.events.subscribe()
    }

    pub fn end_token(&self) -> &CancellationToken {
        &self.end
    }

    pub fn is_bridged(&self) -> bool {
        self.bridged.load(Ordering::SeqCst)
    }

    fn prewarm_lock(&self) -> std::sync::MutexGuard<'_, Option<Prewarm>> {
        // A plain slot swap; poison cannot leave it inconsistent.
        self.prewarmed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `handle` as the call's pre-warmed engine (aborting an earlier one).
    pub fn set_prewarm(&self, handle: Prewarm) {
        if let Some(old) = self.prewarm_lock().replace(handle) {
            old.abort();
        }
    }

    pub fn take_prewarm(&self) -> Option<Prewarm> {
        self.prewarm_lock().take()
    }

    fn drop_prewarm(&self) {
        if let Some(h) = self.take_prewarm() {
            // Aborting drops a finished session too, which closes its socket.
            h.abort();
        }
    }
}

#[derive(Default)]
pub struct Sessions {
    calls: Mutex<HashMap<String, Arc<Session>>>,
    /// Bridges running in this process, including ones still flushing after their call's
    /// record closed (a provider callback can close it while the bridge writes).
    bridges: Arc<AtomicUsize>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        // Holders never panic mid-update (plain map operations), so poison is harmless.
        self.calls.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get_or_create(&self, id: &str) -> Arc<Session> {
        self.lock()
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(Session::new()))
            .clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.lock().get(id).cloned()
    }

    pub fn publish(&self, id: &str, ev: CallEvent) {
        if let Some(c) = self.get(id) {
            let _ = c.events.send(ev);
        }
    }

    /// The call reached a terminal state: tell followers, end its media, drop a pre-warmed
    /// engine, then forget it (dropping the sender ends followers' streams).
    pub fn finish(&self, id: &str, ev: CallEvent) {
        if let Some(c) = self.lock().remove(id) {
            let _ = c.events.send(ev);
            c.end.cancel();
            c.drop_prewarm();
        }
    }

    /// Ends every follower stream (shutdown): nothing more will be published.
    pub fn close_all(&self) {
        self.lock().clear();
    }

    /// Forgets a call without announcing anything (followers' streams end).
    pub fn discard(&self, id: &str) {
        if let Some(c) = self.lock().remove(id) {
            c.drop_prewarm();
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A bridge started serving `session`; the guard marks its end.
    pub fn bridge_started(&self, session: Arc<Session>) -> BridgeGuard {
        session.bridged.store(true, Ordering::SeqCst);
        self.bridges.fetch_add(1, Ordering::SeqCst);
        BridgeGuard {
            session,
            bridges: self.bridges.clone(),
        }
    }

    /// Bridges running in this process now.
    pub fn bridged_count(&self) -> usize {
        self.bridges.load(Ordering::SeqCst)
    }
}

/// Clears the session's bridged flag when its bridge ends.
pub struct BridgeGuard {
    session: Arc<Session>,
    bridges: Arc<AtomicUsize>,
}

impl Drop for BridgeGuard {
    fn drop(&mut self) {
        self.session.bridged.store(false, Ordering::SeqCst);
        self.bridges.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::CallStatus;

    #[tokio::test]
    async fn finish_announces_ends_and_forgets_but_a_running_bridge_still_counts() {
        let sessions = Sessions::default();
        let s = sessions.get_or_create("c1");
        let mut rx = s.subscribe();
        let guard = sessions.bridge_started(s.clone());
        assert!(s.is_bridged());
        assert_eq!(sessions.bridged_count(), 1);
        s.set_prewarm(tokio::spawn(async { Err(EngineError::Failed("x".into())) }));
        sessions.finish(
            "c1",
            CallEvent::Status {
                status: CallStatus::Completed,
                end_reason: None,
            },
        );
        assert!(sessions.is_empty());
        assert!(s.end_token().is_cancelled());
        assert!(s.take_prewarm().is_none());
        assert!(matches!(rx.recv().await, Ok(CallEvent::Status { .. })));
        // The bridge is still flushing: drain must wait for it.
        assert_eq!(sessions.bridged_count(), 1);
        drop(guard);
        assert_eq!(sessions.bridged_count(), 0);
        assert!(!s.is_bridged());
    }
}
