//! Rate limits: keyed GCRA limiters from `governor` ([`KeyedLimiter`], [`TenantCalls`]) and
//! a per-key concurrency cap ([`ConnLimiter`]). The cap stays hand-written: governor limits
//! rates, not how many connections a key holds at once.
//!
//! Memory stays bounded under a flood of distinct keys: a key that has rested completely is
//! indistinguishable from no key, so rested keys are swept periodically, and every second
//! while a limiter tracks more than its `max_keys`.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use super::metrics::{Counter, Metrics};

const SHARDS: usize = 32;
/// Keys tracked per limiter before sweeps run every second (~100 bytes each).
pub const DEFAULT_MAX_KEYS: usize = 100_000;
const SWEEP_EVERY: Duration = Duration::from_secs(30);
const SWEEP_WHEN_FULL: Duration = Duration::from_secs(1);
/// Checks between two looks at the clock and the key count.
const SWEEP_CHECK_EVERY: u64 = 1024;

/// `count` events per second, all of which may come at once.
pub fn per_second(count: u32) -> Quota {
    Quota::per_second(NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN))
}

/// `count` events per minute, all of which may come at once.
pub fn per_minute(count: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(count).unwrap_or(NonZeroU32::MIN))
}

/// A rejected event: how long until the key may try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds for a `Retry-After` header: rounded up, at least 1 (0 would invite an
    /// immediate retry that fails again).
    pub fn as_header_secs(&self) -> u64 {
        let d = self.0;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

impl std::fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rate limit exceeded; retry in {} s",
            self.as_header_secs()
        )
    }
}

/// A governor keyed limiter (client IP, tenant id, …) whose rested keys get swept.
///
/// ```
/// use voicectl::ops::ratelimit::{KeyedLimiter, per_minute};
/// let per_tenant = KeyedLimiter::new(per_minute(60));
/// assert!(per_tenant.check(&42_i64).is_ok());
/// ```
pub struct KeyedLimiter<K: Hash + Eq + Clone, C: Clock = DefaultClock> {
    limiter: RateLimiter<K, DefaultKeyedStateStore<K>, C, NoOpMiddleware<C::Instant>>,
    max_keys: usize,
    checks: AtomicU64,
    last_sweep: Mutex<Instant>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub fn new(quota: Quota) -> Self {
        Self::with_clock(quota, DEFAULT_MAX_KEYS, DefaultClock::default())
    }
}

impl<K: Hash + Eq + Clone, C: Clock> KeyedLimiter<K, C> {
    pub fn with_clock(quota: Quota, max_keys: usize, clock: C) -> Self {
        KeyedLimiter {
            limiter: RateLimiter::dashmap_with_clock(quota, clock),
            max_keys,
            checks: AtomicU64::new(0),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Takes one event for `key`.
    pub fn check(&self, key: &K) -> Result<(), RetryAfter> {
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_CHECK_EVERY)
        {
            self.maybe_sweep();
        }
        self.limiter
            .check_key(key)
            .map_err(|n| RetryAfter(n.wait_time_from(self.limiter.clock().now())))
    }

    fn maybe_sweep(&self) {
        // Another thread sweeping is as good as this one sweeping.
        let Ok(mut last) = self.last_sweep.try_lock() else {
            return;
        };
        let due = if self.limiter.len() > self.max_keys {
            SWEEP_WHEN_FULL
        } else {
            SWEEP_EVERY
        };
        if last.elapsed() >= due {
            self.sweep();
            *last = Instant::now();
        }
    }

    /// Drops every key that has rested completely.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Keys currently tracked (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.limiter.len()
    }
}

/// A tenant went over its call-creation rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantCallsLimited {
    pub per_minute: u32,
    pub retry_after: RetryAfter,
}

impl std::fmt::Display for TenantCallsLimited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "this tenant may start at most {} calls per minute (retry in {} s)",
            self.per_minute,
            self.retry_after.as_header_secs()
        )
    }
}

/// Per-tenant call creation rates, in memory. A governor limiter holds one quota, so there is
/// one keyed limiter per distinct `calls_per_minute` in use (a handful); a tenant whose quota
/// changes (its own, or the default on a reload) starts afresh under the new one.
#[derive(Clone)]
pub struct TenantCalls {
    by_quota: Arc<RwLock<HashMap<u32, Arc<KeyedLimiter<i64>>>>>,
    rejected: Counter,
}

impl TenantCalls {
    pub fn new(metrics: &Metrics) -> TenantCalls {
        TenantCalls {
            by_quota: Arc::default(),
            rejected: metrics.rate_limited.with(&["tenant_calls"]),
        }
    }

    /// Takes one new call for `tenant_id`: `own` is the tenant's `calls_per_minute`, else
    /// `default` (`limits.calls_per_minute_per_tenant`). Call once per call actually created
    /// (not for idempotent replays).
    pub fn check(
        &self,
        tenant_id: i64,
        own: Option<u32>,
        default: u32,
    ) -> Result<(), TenantCallsLimited> {
        let n = own.filter(|n| *n > 0).unwrap_or(default).max(1);
        let limiter = self.limiter(n);
        limiter.check(&tenant_id).map_err(|retry_after| {
            self.rejected.inc();
            TenantCallsLimited {
                per_minute: n,
                retry_after,
            }
        })
    }

    fn limiter(&self, n: u32) -> Arc<KeyedLimiter<i64>> {
        // A poisoned lock only means a panic elsewhere; the map is still consistent.
        if let Some(l) = self
            .by_quota
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&n)
        {
            return l.clone();
        }
        self.by_quota
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(n)
            .or_insert_with(|| Arc::new(KeyedLimiter::new(per_minute(n))))
            .clone()
    }
}

/// A poisoned shard only means a panic elsewhere while it was held; the map inside is still a
/// valid map of counts, so keep using it rather than failing every request.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Caps how many long-lived connections (WebSockets) one key may hold at once.
#[derive(Clone)]
pub struct ConnLimiter<K: Hash + Eq + Clone> {
    inner: Arc<ConnInner<K>>,
}

struct ConnInner<K> {
    max_per_key: u32,
    shards: Box<[Mutex<HashMap<K, u32>>]>,
    hasher: RandomState,
    active: AtomicU64,
}

/// The key already holds its maximum number of connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyConnections {
    pub max: u32,
}

/// Holds one connection slot; the slot frees when the guard drops. Keep it alive for the whole
/// life of the connection (move it into the socket's task).
pub struct ConnGuard<K: Hash + Eq + Clone> {
    inner: Arc<ConnInner<K>>,
    key: K,
}

impl<K: Hash + Eq + Clone> ConnLimiter<K> {
    pub fn new(max_per_key: u32) -> Self {
        ConnLimiter {
            inner: Arc::new(ConnInner {
                max_per_key: max_per_key.max(1),
                shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
                hasher: RandomState::new(),
                active: AtomicU64::new(0),
            }),
        }
    }

    pub fn try_acquire(&self, key: K) -> Result<ConnGuard<K>, TooManyConnections> {
        {
            let mut shard = lock(self.inner.shard(&key));
            let n = shard.entry(key.clone()).or_insert(0);
            if *n >= self.inner.max_per_key {
                return Err(TooManyConnections {
                    max: self.inner.max_per_key,
                });
            }
            *n += 1;
        }
        self.inner.active.fetch_add(1, Ordering::Relaxed);
        Ok(ConnGuard {
            inner: self.inner.clone(),
            key,
        })
    }

    /// Connections held across all keys.
    pub fn active(&self) -> u64 {
        self.inner.active.load(Ordering::Relaxed)
    }

    /// Keys holding at least one connection (entries at zero are removed, so memory follows
    /// live connections).
    pub fn tracked_keys(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).len()).sum()
    }
}

impl<K: Hash + Eq> ConnInner<K> {
    fn shard(&self, key: &K) -> &Mutex<HashMap<K, u32>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % self.shards.len()]
    }
}

impl<K: Hash + Eq + Clone> Drop for ConnGuard<K> {
    fn drop(&mut self) {
        let mut shard = lock(self.inner.shard(&self.key));
        if let Some(n) = shard.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                shard.remove(&self.key);
            }
        }
        self.inner.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limiter<K: Hash + Eq + Clone>(
        q: Quota,
        max_keys: usize,
    ) -> (KeyedLimiter<K, FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        (KeyedLimiter::with_clock(q, max_keys, clock.clone()), clock)
    }

    #[test]
    fn burst_then_steady_rate() {
        let (l, clock) = limiter(per_second(10), DEFAULT_MAX_KEYS);
        for i in 0..10 {
            assert!(l.check(&"a").is_ok(), "burst event {i}");
        }
        let retry = l.check(&"a").unwrap_err();
        assert_eq!(retry.0, Duration::from_millis(100));
        assert_eq!(retry.as_header_secs(), 1);
        // Other keys are unaffected.
        assert!(l.check(&"b").is_ok());
        // One interval later exactly one more event fits.
        clock.advance(Duration::from_millis(100));
        assert!(l.check(&"a").is_ok());
        assert!(l.check(&"a").is_err());
        // After a full period the whole burst is back.
        clock.advance(Duration::from_secs(1));
        for _ in 0..10 {
            assert!(l.check(&"a").is_ok());
        }
        assert!(l.check(&"a").is_err());
    }

    #[test]
    fn per_minute_retry_after_is_whole_seconds() {
        let (l, _clock) = limiter(per_minute(2), DEFAULT_MAX_KEYS);
        assert!(l.check(&1).is_ok());
        assert!(l.check(&1).is_ok());
        let r = l.check(&1).unwrap_err();
        assert_eq!(r.as_header_secs(), 30);
    }

    #[test]
    fn rested_keys_are_swept() {
        let (l, clock) = limiter(per_second(5), 1000);
        for i in 0..50_000u32 {
            let _ = l.check(&i);
        }
        assert_eq!(l.tracked_keys(), 50_000);
        // Idle keys are swept once they have rested.
        clock.advance(Duration::from_secs(2));
        for i in 0..SHARDS as u32 * 64 {
            let _ = l.check(&(1_000_000 + i));
        }
        l.sweep();
        assert!(l.tracked_keys() <= SHARDS * 64, "{}", l.tracked_keys());
    }

    #[test]
    fn tenant_call_rate_uses_override_and_says_so() {
        let metrics = Metrics::new();
        let t = TenantCalls::new(&metrics);
        assert!(t.check(1, Some(2), 60).is_ok());
        assert!(t.check(1, Some(2), 60).is_ok());
        let e = t.check(1, Some(2), 60).unwrap_err();
        assert_eq!(e.retry_after.as_header_secs(), 30);
        assert!(e.to_string().contains("2 calls per minute"), "{e}");
        // Another tenant has its own budget.
        assert!(t.check(2, Some(2), 60).is_ok());
        assert_eq!(metrics.rate_limited.with(&["tenant_calls"]).get(), 1);
        // Without its own limit a tenant gets the default.
        for _ in 0..3 {
            assert!(t.check(3, None, 3).is_ok());
        }
        assert!(t.check(3, None, 3).is_err());
    }

    #[test]
    fn conn_guard_frees_its_slot_on_drop() {
        let l = ConnLimiter::new(2);
        let a = l.try_acquire("ip").unwrap();
        let b = l.try_acquire("ip").unwrap();
        assert_eq!(
            l.try_acquire("ip").err(),
            Some(TooManyConnections { max: 2 })
        );
        assert!(l.try_acquire("other").is_ok());
        assert_eq!(l.active(), 2);
        drop(a);
        let c = l.try_acquire("ip").unwrap();
        drop((b, c));
        assert_eq!(l.active(), 0);
        assert_eq!(l.tracked_keys(), 0, "entries at zero are removed");
    }
}
