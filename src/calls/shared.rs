//! What every part of the call domain shares: the store, the configuration in force, the
//! provider clients, the per-call sessions, health handles and the wake-up signals. Each
//! child of `calls` adds its own `impl Shared` block; the facade in `mod.rs` only delegates.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::session::Sessions;
use crate::config::Config;
use crate::engines::breaker::Breakers;
use crate::engines::ultravox::UltravoxClient;
use crate::ops::metrics::Metrics;
use crate::ops::ratelimit::TenantCalls;
use crate::store::Store;
use crate::telephony::Carrier;

/// Wake-ups between the workers: the lifecycle frees capacity and produces jobs, the dialer
/// and the job runner sleep until told (or until their poll interval).
#[derive(Default)]
pub struct Wakers {
    pub dial: Notify,
    pub jobs: Notify,
    /// The campaign scheduler: a campaign changed, recipients arrived or a line came free.
    pub campaigns: Notify,
}

pub struct Shared {
    pub store: Store,
    /// Swapped whole by a reload (SIGHUP); each call keeps the snapshot it started with.
    config: RwLock<Arc<Config>>,
    pub carrier: Carrier,
    pub ultravox: UltravoxClient,
    pub sessions: Sessions,
    pub breakers: Arc<Breakers>,
    pub metrics: Arc<Metrics>,
    /// Per-tenant call creation rates, in memory (`POST /calls` never counts rows).
    pub tenant_calls: TenantCalls,
    pub wake: Wakers,
    draining: AtomicBool,
    pub shutdown: CancellationToken,
    /// Cancelled when the drain time is up: bridges say goodbye and hang up.
    pub wind_down: CancellationToken,
    /// The WebRTC endpoint for browser calls, once started (`Calls::start_webrtc`).
    pub webrtc: std::sync::OnceLock<Arc<crate::telephony::webrtc::Endpoint>>,
    /// The client for tenant tool URLs, for the allow list it was built with: one for every
    /// call (a client holds the TLS roots, about 200 kB, too much to build per call).
    tool_client: std::sync::Mutex<Option<(Vec<String>, reqwest::Client)>>,
}

impl Shared {
    pub fn new(
        store: Store,
        config: Arc<Config>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let carrier = Carrier::from_config(&config)?;
        let ultravox = UltravoxClient::new(&config.ultravox)?;
        let metrics = Arc::new(Metrics::new());
        Ok(Self {
            store,
            config: RwLock::new(config),
            carrier,
            ultravox,
            sessions: Sessions::default(),
            breakers: Arc::new(Breakers::default()),
            tenant_calls: TenantCalls::new(&metrics),
            metrics,
            wake: Wakers::default(),
            draining: AtomicBool::new(false),
            shutdown,
            wind_down: CancellationToken::new(),
            webrtc: std::sync::OnceLock::new(),
            tool_client: std::sync::Mutex::new(None),
        })
    }

    /// The shared client for tenant tool URLs (`timeout` caps any one request), rebuilt only
    /// when `server.allow_private_targets` changed.
    pub fn tool_client(
        &self,
        allow: &[String],
        timeout: std::time::Duration,
    ) -> Option<reqwest::Client> {
        // A poisoned lock still holds a whole value.
        let mut slot = self.tool_client.lock().unwrap_or_else(|p| p.into_inner());
        match &*slot {
            Some((a, c)) if a == allow => Some(c.clone()),
            _ => {
                let c = crate::ops::outbound::tenant_client(allow, timeout).ok()?;
                *slot = Some((allow.to_vec(), c.clone()));
                Some(c)
            }
        }
    }

    /// The configuration now in force (a snapshot: a reload swaps in a new one).
    pub fn config(&self) -> Arc<Config> {
        // A poisoned lock still holds a whole, valid Arc.
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn replace_config(&self, config: Arc<Config>) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = config;
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
