//! Operations: what keeps one box running well. Rate limits and abuse guards, metrics,
//! systemd integration (readiness, watchdog, signals), data-dir checks, `status` and `doctor`.
//!
//! [`Ops`] is the per-server bundle (metrics registry, limiters, allow-lists) that lives in
//! `AppState`; handlers reach it as `state.ops()`.

pub mod doctor;
pub mod fscheck;
pub mod lifecycle;
pub mod metrics;
pub mod net;
pub mod outbound;
pub mod ratelimit;
pub mod sdnotify;

use std::net::IpAddr;
use std::sync::Arc;

use axum::http::HeaderMap;

use crate::config::Config;
use metrics::Metrics;
use net::IpNet;
use ratelimit::{ConnGuard, ConnLimiter, KeyedLimiter, RetryAfter, per_second};

/// Which per-IP budget a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitClass {
    /// voicectl's own API and probes: `limits.api_requests_per_second_per_ip`.
    Api,
    /// Twilio webhooks and media upgrades (`/twilio/…`): `limits.webhook_requests_per_second_per_ip`.
    Webhook,
}

impl LimitClass {
    /// Proxied sites and unknown paths are not voicectl's to limit (None).
    pub fn for_path(path: &str) -> Option<LimitClass> {
        let under = |p: &str| path == p || path.starts_with(&format!("{p}/"));
        if under("/twilio") {
            Some(LimitClass::Webhook)
        } else if under("/api") || under("/health") || path == "/info" || path == "/metrics" {
            Some(LimitClass::Api)
        } else {
            None
        }
    }

    fn label(self) -> &'static str {
        match self {
            LimitClass::Api => "api",
            LimitClass::Webhook => "webhook",
        }
    }
}

/// Why a request was refused before any handler ran; the HTTP layer maps it to 429 or 431.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{message} (retry in {retry_after_secs} s)")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    #[error("request line and headers exceed {max} bytes")]
    HeadersTooLarge { max: usize },
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Ops(Arc<Inner>);

struct Inner {
    metrics: Arc<Metrics>,
    api: KeyedLimiter<IpAddr>,
    webhook: KeyedLimiter<IpAddr>,
    talk: KeyedLimiter<IpAddr>,
    websockets: ConnLimiter<IpAddr>,
    trusted_proxies: Vec<IpNet>,
    metrics_allow: Vec<IpNet>,
    max_header_bytes: usize,
    started_ms: i64,
}

impl Ops {
    pub fn new(config: &Config) -> Ops {
        Self::with_metrics(config, Arc::new(Metrics::new()))
    }

    /// Ops sharing `metrics` with the call path (which owns the call metrics).
    pub fn with_metrics(config: &Config, metrics: Arc<Metrics>) -> Ops {
        let l = &config.limits;
        // Config::validate has checked these lists; a hand-built config with a bad entry
        // simply gets that entry ignored (and logged).
        let nets = |key: &str, items: &[String]| -> Vec<IpNet> {
            items
                .iter()
                .filter_map(|s| match IpNet::parse(s) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        tracing::warn!(key, error = %e, "ignoring invalid address block");
                        None
                    }
                })
                .collect()
        };
        Ops(Arc::new(Inner {
            metrics,
            api: KeyedLimiter::new(per_second(l.api_requests_per_second_per_ip)),
            webhook: KeyedLimiter::new(per_second(l.webhook_requests_per_second_per_ip)),
            talk: KeyedLimiter::new(ratelimit::per_minute(l.talk_calls_per_minute_per_ip.max(1))),
            websockets: ConnLimiter::new(l.max_websockets_per_ip),
            trusted_proxies: nets("server.trusted_proxies", &config.server.trusted_proxies),
            metrics_allow: nets("server.metrics_allow", &config.server.metrics_allow),
            max_header_bytes: l.max_header_bytes,
            started_ms: crate::domain::timefmt::now_ms(),
        }))
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.0.metrics
    }

    /// Wall-clock time (Unix ms) the server state was built, i.e. when serving began.
    pub fn started_ms(&self) -> i64 {
        self.0.started_ms
    }

    /// The client behind `peer` (see [`net::client_ip`]).
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        net::client_ip(peer, headers, &self.0.trusted_proxies)
    }

    /// Loopback always; others only when listed in `server.metrics_allow`.
    pub fn metrics_allowed(&self, ip: IpAddr) -> bool {
        let ip = net::canonical(ip);
        ip.is_loopback() || self.0.metrics_allow.iter().any(|n| n.contains(ip))
    }

    /// The per-IP request budget for `class`; Err is a ready 429.
    pub fn check_request_rate(&self, class: LimitClass, ip: IpAddr) -> Result<(), Refused> {
        let limiter = match class {
            LimitClass::Api => &self.0.api,
            LimitClass::Webhook => &self.0.webhook,
        };
        limiter.check(&net::limit_key(ip)).map_err(|r| {
            self.rejected(class.label());
            too_many(
                r,
                "too many requests from your address; slow down and retry later",
            )
        })
    }

    /// A browser call through a public `/talk/<token>` link from `ip`
    /// (`limits.talk_calls_per_minute_per_ip`); Err is a ready 429.
    pub fn check_talk_call(&self, ip: IpAddr) -> Result<(), Refused> {
        self.0.talk.check(&net::limit_key(ip)).map_err(|r| {
            self.rejected("talk");
            too_many(
                r,
                "too many browser calls from your address; try again in a minute",
            )
        })
    }

    /// A WebSocket slot for `ip` (`limits.max_websockets_per_ip`; IPv6 counted per /64). Take
    /// it before upgrading and move it into the socket's task; the slot frees when the guard
    /// drops. Err is a ready 429.
    pub fn websocket_guard(&self, ip: IpAddr) -> Result<WsGuard, Refused> {
        match self.0.websockets.try_acquire(net::limit_key(ip)) {
            Ok(slot) => {
                self.0.metrics.websockets_active.inc();
                Ok(WsGuard {
                    _slot: slot,
                    metrics: self.0.metrics.clone(),
                })
            }
            Err(e) => {
                self.rejected("websocket");
                Err(Refused::RateLimited {
                    message: format!(
                        "too many open WebSocket connections from your address (at most {})",
                        e.max
                    ),
                    retry_after_secs: 1,
                })
            }
        }
    }

    /// Requests whose line and headers exceed `limits.max_header_bytes` get 431.
    pub fn check_header_size(&self, uri_len: usize, headers: &HeaderMap) -> Result<(), Refused> {
        let size = uri_len
            + headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if size <= self.0.max_header_bytes {
            return Ok(());
        }
        self.rejected("headers");
        Err(Refused::HeadersTooLarge {
            max: self.0.max_header_bytes,
        })
    }

    fn rejected(&self, limit: &str) {
        self.0.metrics.rate_limited.with(&[limit]).inc();
    }
}

fn too_many(r: RetryAfter, message: &str) -> Refused {
    Refused::RateLimited {
        message: message.to_owned(),
        retry_after_secs: r.as_header_secs(),
    }
}

/// One WebSocket slot; see [`Ops::websocket_guard`].
pub struct WsGuard {
    _slot: ConnGuard<IpAddr>,
    metrics: Arc<Metrics>,
}

impl Drop for WsGuard {
    fn drop(&mut self) {
        self.metrics.websockets_active.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;

    #[test]
    fn paths_map_to_their_budget() {
        for (p, c) in [
            ("/api/v1/calls", Some(LimitClass::Api)),
            ("/health", Some(LimitClass::Api)),
            ("/health/ready", Some(LimitClass::Api)),
            ("/metrics", Some(LimitClass::Api)),
            ("/info", Some(LimitClass::Api)),
            ("/twilio/voice", Some(LimitClass::Webhook)),
            ("/twilio/media/abc", Some(LimitClass::Webhook)),
            ("/", None),
            ("/apix", None),
            ("/site/api/v1", None),
        ] {
            assert_eq!(LimitClass::for_path(p), c, "{p}");
        }
    }

    #[test]
    fn websocket_guard_counts_and_frees() {
        let mut cfg = Config::dev();
        cfg.limits.max_websockets_per_ip = 1;
        let ops = Ops::new(&cfg);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let g = ops.websocket_guard(ip).unwrap();
        assert_eq!(ops.metrics().websockets_active.get(), 1);
        let e = crate::http::ApiError::from(ops.websocket_guard(ip).err().unwrap());
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        drop(g);
        assert_eq!(ops.metrics().websockets_active.get(), 0);
        assert!(ops.websocket_guard(ip).is_ok());
    }

    #[test]
    fn metrics_allow_list() {
        let mut cfg = Config::dev();
        cfg.server.metrics_allow = vec!["10.0.0.0/8".into()];
        let ops = Ops::new(&cfg);
        for (ip, ok) in [
            ("127.0.0.1", true),
            ("::1", true),
            ("10.2.3.4", true),
            ("::ffff:10.2.3.4", true),
            ("192.0.2.1", false),
        ] {
            assert_eq!(ops.metrics_allowed(ip.parse().unwrap()), ok, "{ip}");
        }
    }
}
