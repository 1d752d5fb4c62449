//! The bottom HTTP layer that every handler module shares (`api`, and through it the ops,
//! certificate and Twilio endpoints): the application state, the SPEC §3 error shape, and the
//! API-key extractor. Services below it (calls, ops, tls, proxy) return their own typed
//! errors; this layer maps them to statuses.

pub mod auth;
pub mod error;
pub mod openapi;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

pub use auth::Auth;
pub use error::ApiError;

use crate::calls::Calls;
use crate::config::Config;
use crate::store::Store;

/// Everything a request handler may need; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Store,
    pub started: Instant,
    draining: AtomicBool,
    calls: Arc<Calls>,
    ops: crate::ops::Ops,
    proxy: Arc<crate::proxy::Proxy>,
    /// Set by `serve` when TLS is on: readiness and `/api/v1/tls/*` consult it.
    tls: OnceLock<crate::tls::Tls>,
}

impl AppState {
    /// State with a call manager whose background workers are not started (tests that only
    /// exercise the HTTP surface). `serve` uses [`AppState::with_manager`].
    pub fn new(store: Store, config: Arc<Config>) -> Self {
        let calls = Calls::new(store.clone(), config.clone(), Default::default())
            // Only fails if the HTTP client cannot be built (no TLS backend): a build defect.
            .expect("HTTP client");
        Self::with_manager(calls)
    }

    /// State around a call manager, which holds the store and the configuration.
    pub fn with_manager(calls: Arc<Calls>) -> Self {
        let config = calls.config();
        let store = calls.store().clone();
        let ops = crate::ops::Ops::with_metrics(&config, calls.metrics());
        let proxy = Arc::new(crate::proxy::Proxy::from_config(&config));
        Self(Arc::new(Inner {
            store,
            started: Instant::now(),
            draining: AtomicBool::new(false),
            calls,
            ops,
            proxy,
            tls: OnceLock::new(),
        }))
    }

    /// Attaches the TLS handle (once; later calls are ignored).
    pub fn set_tls(&self, tls: crate::tls::Tls) {
        let _ = self.0.tls.set(tls);
    }

    pub fn tls(&self) -> Option<&crate::tls::Tls> {
        self.0.tls.get()
    }

    pub fn calls(&self) -> &Arc<Calls> {
        &self.0.calls
    }

    /// Metrics, rate limiters and guards.
    pub fn ops(&self) -> &crate::ops::Ops {
        &self.0.ops
    }

    /// The `[[proxy]]` routes; `reload` swaps its table (SIGHUP).
    pub fn proxy(&self) -> &Arc<crate::proxy::Proxy> {
        &self.0.proxy
    }

    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// The configuration in force; a reload (SIGHUP) swaps it, so hold the snapshot only
    /// for the request at hand.
    pub fn config(&self) -> Arc<Config> {
        self.0.calls.config()
    }

    pub fn uptime_secs(&self) -> u64 {
        self.0.started.elapsed().as_secs()
    }

    pub fn set_draining(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
        self.0.calls.set_draining();
    }

    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::SeqCst)
    }
}
