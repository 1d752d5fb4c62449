//! Rate limits without a global lock: keyed GCRA token buckets ([`KeyedLimiter`]) and
//! per-key concurrency caps ([`ConnLimiter`]), both sharded so concurrent requests for
//! different keys rarely touch the same mutex.
//!
//! Memory stays bounded under a flood of distinct keys: a bucket that has refilled completely
//! is indistinguishable from no bucket, so it is dropped (swept periodically and whenever a
//! shard is full); past the hard cap the buckets nearest to full are dropped first, which at
//! worst hands those clients a fresh burst.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const SHARDS: usize = 32;
/// Keys tracked per limiter before eviction kicks in (~100 bytes each).
pub const DEFAULT_MAX_KEYS: usize = 100_000;
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// How many events a key may have: `burst` at once, refilling at `rate` per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    /// Time between two events at the sustained rate.
    interval: Duration,
    /// How far ahead of the sustained rate a key may run: `interval * (burst - 1)`.
    tolerance: Duration,
}

impl Quota {
    /// `count` events per `period`, all of which may come at once.
    pub fn new(count: u32, period: Duration) -> Quota {
        let count = count.max(1);
        let interval = period / count;
        Quota {
            interval,
            tolerance: interval * (count - 1),
        }
    }

    pub fn per_second(count: u32) -> Quota {
        Self::new(count, Duration::from_secs(1))
    }

    pub fn per_minute(count: u32) -> Quota {
        Self::new(count, Duration::from_secs(60))
    }
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

struct Shard<K> {
    /// GCRA's "theoretical arrival time" per key: the key is exactly at its limit when this
    /// lies `tolerance` in the future, and fully rested when it lies in the past.
    tat: HashMap<K, Instant>,
    last_sweep: Instant,
}

/// Token buckets keyed by `K` (client IP, tenant id, …).
///
/// ```
/// use voicectl::ops::ratelimit::{KeyedLimiter, Quota};
/// let per_tenant = KeyedLimiter::new(Quota::per_minute(60));
/// assert!(per_tenant.check(&42_i64).is_ok());
/// // A tenant with its own limit:
/// assert!(per_tenant.check_with(&7_i64, Quota::per_minute(5)).is_ok());
/// ```
pub struct KeyedLimiter<K> {
    quota: Quota,
    shards: Box<[Mutex<Shard<K>>]>,
    max_per_shard: usize,
    hasher: RandomState,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    pub fn new(quota: Quota) -> Self {
        Self::with_max_keys(quota, DEFAULT_MAX_KEYS)
    }

    pub fn with_max_keys(quota: Quota, max_keys: usize) -> Self {
        let now = Instant::now();
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    tat: HashMap::new(),
                    last_sweep: now,
                })
            })
            .collect();
        KeyedLimiter {
            quota,
            shards,
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    /// Takes one event for `key` under the limiter's quota.
    pub fn check(&self, key: &K) -> Result<(), RetryAfter> {
        self.check_at(key, self.quota, Instant::now())
    }

    /// Takes one event for `key` under `quota` (for keys with their own limit, e.g. a tenant's
    /// `calls_per_minute`). Use one quota per key consistently.
    pub fn check_with(&self, key: &K, quota: Quota) -> Result<(), RetryAfter> {
        self.check_at(key, quota, Instant::now())
    }

    pub fn check_at(&self, key: &K, quota: Quota, now: Instant) -> Result<(), RetryAfter> {
        let mut shard = self.shard(key);
        if now.saturating_duration_since(shard.last_sweep) >= SWEEP_EVERY {
            shard.tat.retain(|_, tat| *tat > now);
            shard.last_sweep = now;
        }
        if let Some(tat) = shard.tat.get_mut(key) {
            let start = (*tat).max(now);
            let ahead = start - now;
            if ahead > quota.tolerance {
                return Err(RetryAfter(ahead - quota.tolerance));
            }
            *tat = start + quota.interval;
            return Ok(());
        }
        if shard.tat.len() >= self.max_per_shard {
            evict(&mut shard.tat, now, self.max_per_shard);
        }
        shard.tat.insert(key.clone(), now + quota.interval);
        Ok(())
    }

    /// Keys currently tracked (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.shards.iter().map(|s| lock(s).tat.len()).sum()
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, Shard<K>> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        lock(&self.shards[i])
    }
}

/// Makes room in a full shard: first drop every rested key, then, if the shard is still full
/// (a flood of active keys), the eighth of keys nearest to rested.
fn evict<K: Hash + Eq>(map: &mut HashMap<K, Instant>, now: Instant, cap: usize) {
    map.retain(|_, tat| *tat > now);
    if map.len() < cap {
        return;
    }
    let mut tats: Vec<Instant> = map.values().copied().collect();
    let n = (tats.len() / 8).max(1);
    let (_, cutoff, _) = tats.select_nth_unstable(n - 1);
    let cutoff = *cutoff;
    map.retain(|_, tat| *tat > cutoff);
}

/// A poisoned shard only means a panic elsewhere while it was held; the map inside is still a
/// valid map of timestamps, so keep using it rather than failing every request.
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

    #[test]
    fn burst_then_steady_rate() {
        let l = KeyedLimiter::new(Quota::per_second(10));
        let q = Quota::per_second(10);
        let t0 = Instant::now();
        for i in 0..10 {
            assert!(l.check_at(&"a", q, t0).is_ok(), "burst event {i}");
        }
        let retry = l.check_at(&"a", q, t0).unwrap_err();
        assert_eq!(retry.0, Duration::from_millis(100));
        assert_eq!(retry.as_header_secs(), 1);
        // Other keys are unaffected.
        assert!(l.check_at(&"b", q, t0).is_ok());
        // One interval later exactly one more event fits.
        let t1 = t0 + Duration::from_millis(100);
        assert!(l.check_at(&"a", q, t1).is_ok());
        assert!(l.check_at(&"a", q, t1).is_err());
        // After a full period the whole burst is back.
        let t2 = t1 + Duration::from_secs(1);
        for _ in 0..10 {
            assert!(l.check_at(&"a", q, t2).is_ok());
        }
        assert!(l.check_at(&"a", q, t2).is_err());
    }

    #[test]
    fn per_minute_retry_after_is_whole_seconds() {
        let l = KeyedLimiter::new(Quota::per_minute(2));
        let q = Quota::per_minute(2);
        let t0 = Instant::now();
        assert!(l.check_at(&1, q, t0).is_ok());
        assert!(l.check_at(&1, q, t0).is_ok());
        let r = l.check_at(&1, q, t0).unwrap_err();
        assert_eq!(r.as_header_secs(), 30);
    }

    #[test]
    fn memory_stays_bounded_under_many_keys() {
        let q = Quota::per_second(5);
        let l = KeyedLimiter::with_max_keys(q, 1000);
        let t0 = Instant::now();
        for i in 0..50_000u32 {
            let _ = l.check_at(&i, q, t0);
        }
        assert!(l.tracked_keys() <= 1000 + SHARDS, "{}", l.tracked_keys());
        // Idle keys are swept once they have rested.
        let later = t0 + SWEEP_EVERY + Duration::from_secs(1);
        for i in 0..SHARDS as u32 * 64 {
            let _ = l.check_at(&(1_000_000 + i), q, later);
        }
        assert!(l.tracked_keys() <= SHARDS * 64, "{}", l.tracked_keys());
    }

    #[test]
    fn eviction_keeps_the_most_indebted_keys() {
        let mut map = HashMap::new();
        let now = Instant::now();
        for i in 0..16u32 {
            map.insert(i, now + Duration::from_secs(u64::from(i) + 1));
        }
        evict(&mut map, now, 16);
        assert_eq!(map.len(), 14);
        assert!(!map.contains_key(&0) && !map.contains_key(&1));
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
