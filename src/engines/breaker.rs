//! A circuit breaker per engine: after consecutive failures, new calls fail fast with a
//! clear error instead of ringing someone into dead air; after a cool-down one call is let
//! through as a probe, and its success closes the breaker again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::EngineKind;

/// Consecutive failures that open the breaker.
pub const THRESHOLD: u32 = 3;
/// How long it stays open before a probe is allowed.
pub const COOL_DOWN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Default)]
struct Entry {
    failures: u32,
    opened_at: Option<Instant>,
    probing: bool,
}

#[derive(Default)]
pub struct Breakers {
    inner: Mutex<HashMap<EngineKind, Entry>>,
    /// The pipeline's providers, per slot and name (`stt:deepgram`, `llm:groq`, …): the same
    /// rule, so a dead provider is skipped at once for the next in its list.
    providers: Mutex<HashMap<String, Entry>>,
}

impl Entry {
    fn admit(&mut self) -> bool {
        match self.opened_at {
            None => true,
            Some(t) if t.elapsed() >= COOL_DOWN && !self.probing => {
                self.probing = true;
                true
            }
            Some(_) => false,
        }
    }

    /// Returns true when this failure opened the breaker.
    fn fail(&mut self) -> bool {
        self.failures += 1;
        self.probing = false;
        if self.failures >= THRESHOLD || self.opened_at.is_some() {
            let opened = self.opened_at.is_none();
            self.opened_at = Some(Instant::now());
            return opened;
        }
        false
    }
}

impl Breakers {
    fn with<R>(&self, kind: EngineKind, f: impl FnOnce(&mut Entry) -> R) -> R {
        // Plain field updates; a poisoned lock still holds consistent counters.
        let mut map = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(map.entry(kind).or_default())
    }

    /// May a new call use `kind` now? Admits a single probe once the cool-down has passed.
    pub fn admit(&self, kind: EngineKind) -> bool {
        self.with(kind, |e| match e.opened_at {
            None => true,
            Some(t) if t.elapsed() >= COOL_DOWN && !e.probing => {
                e.probing = true;
                true
            }
            Some(_) => false,
        })
    }

    pub fn success(&self, kind: EngineKind) {
        self.with(kind, |e| *e = Entry::default());
    }

    pub fn failure(&self, kind: EngineKind) {
        self.with(kind, |e| {
            e.failures += 1;
            e.probing = false;
            if e.failures >= THRESHOLD || e.opened_at.is_some() {
                if e.opened_at.is_none() {
                    tracing::error!(engine = %kind, failures = e.failures, "engine circuit breaker opened");
                }
                e.opened_at = Some(Instant::now());
            }
        })
    }

    fn provider<R>(&self, name: &str, f: impl FnOnce(&mut Entry) -> R) -> R {
        // Plain field updates; a poisoned lock still holds consistent counters.
        let mut map = self.providers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(name) {
            return f(e);
        }
        f(map.entry(name.to_owned()).or_default())
    }

    /// May this call use pipeline provider `name` (`slot:provider`) now?
    pub fn admit_provider(&self, name: &str) -> bool {
        self.provider(name, Entry::admit)
    }

    pub fn provider_success(&self, name: &str) {
        self.provider(name, |e| *e = Entry::default());
    }

    pub fn provider_failure(&self, name: &str) {
        if self.provider(name, Entry::fail) {
            tracing::error!(provider = name, "provider circuit breaker opened");
        }
    }

    pub fn state(&self, kind: EngineKind) -> State {
        self.with(kind, |e| match e.opened_at {
            None => State::Closed,
            Some(t) if t.elapsed() >= COOL_DOWN => State::HalfOpen,
            Some(_) => State::Open,
        })
    }

    pub fn states(&self) -> Vec<(EngineKind, State)> {
        EngineKind::ALL
            .iter()
            .map(|&k| (k, self.state(k)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_closes_on_success() {
        let b = Breakers::default();
        let k = EngineKind::OpenAiRealtime;
        for _ in 0..THRESHOLD - 1 {
            b.failure(k);
            assert!(b.admit(k));
        }
        b.failure(k);
        assert_eq!(b.state(k), State::Open);
        assert!(!b.admit(k));
        assert!(b.admit(EngineKind::Scripted), "other engines unaffected");
        b.success(k);
        assert!(b.admit(k));
        assert_eq!(b.state(k), State::Closed);
    }

    #[test]
    fn providers_have_breakers_of_their_own() {
        let b = Breakers::default();
        for _ in 0..THRESHOLD {
            assert!(b.admit_provider("tts:elevenlabs"));
            b.provider_failure("tts:elevenlabs");
        }
        assert!(!b.admit_provider("tts:elevenlabs"));
        assert!(b.admit_provider("tts:deepgram"));
        b.provider_success("tts:elevenlabs");
        assert!(b.admit_provider("tts:elevenlabs"));
    }
}
