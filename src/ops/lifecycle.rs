//! Process signals as events: SIGTERM/SIGINT request a stop, SIGHUP a reload.
//!
//! [`Lifecycle::install`] runs first thing in `serve`, so a stop requested while the server is
//! still starting (opening the database, binding, waiting for a certificate) is recorded
//! instead of killing the process half-way; startup then ends cleanly before READY.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
#[error("cannot install the {which} handler: {source}")]
pub struct SignalError {
    which: &'static str,
    source: std::io::Error,
}

/// Cheap to clone; every clone sees the same stop and reload events.
#[derive(Clone)]
pub struct Lifecycle {
    stop: CancellationToken,
    /// A second stop signal: skip the drain and exit now.
    force: CancellationToken,
    reloads: watch::Receiver<u64>,
}

impl Lifecycle {
    /// Takes over SIGTERM, SIGINT and SIGHUP for the life of the process. Must run inside the
    /// Tokio runtime.
    pub fn install() -> Result<Lifecycle, SignalError> {
        let handler = |kind, which| signal(kind).map_err(|source| SignalError { which, source });
        let mut term = handler(SignalKind::terminate(), "SIGTERM")?;
        let mut int = handler(SignalKind::interrupt(), "SIGINT")?;
        let mut hup = handler(SignalKind::hangup(), "SIGHUP")?;
        let stop = CancellationToken::new();
        let force = CancellationToken::new();
        let (reload_tx, reloads) = watch::channel(0u64);
        let token = stop.clone();
        let force_token = force.clone();
        let on_stop = move |signal: &'static str| {
            if token.is_cancelled() {
                tracing::warn!(
                    signal,
                    "second stop signal: exiting without waiting for calls"
                );
                force_token.cancel();
            } else {
                tracing::info!(signal, "stop requested");
                token.cancel();
            }
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => on_stop("SIGTERM"),
                    _ = int.recv() => on_stop("SIGINT"),
                    _ = hup.recv() => {
                        tracing::info!(signal = "SIGHUP", "reload requested");
                        reload_tx.send_modify(|n| *n += 1);
                    }
                }
            }
        });
        Ok(Lifecycle {
            stop,
            force,
            reloads,
        })
    }

    /// A lifecycle driven by hand (tests, embedding).
    pub fn manual() -> (Lifecycle, CancellationToken, watch::Sender<u64>) {
        let stop = CancellationToken::new();
        let (tx, reloads) = watch::channel(0);
        (
            Lifecycle {
                stop: stop.clone(),
                force: CancellationToken::new(),
                reloads,
            },
            stop,
            tx,
        )
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves once a stop is requested (at once if it already was).
    pub async fn stopped(&self) {
        self.stop.cancelled().await
    }

    /// Cancelled by a second stop signal: give up draining.
    pub fn force_token(&self) -> CancellationToken {
        self.force.clone()
    }

    /// The token behind [`Self::stopped`], for tasks that hold their own clone.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs a startup step unless a stop is requested first: `None` means "stop now". Wrap
    /// slow steps (certificate issuance, recovery) so SIGTERM never waits for them.
    pub async fn unless_stopped<F: std::future::Future>(&self, step: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = self.stop.cancelled() => None,
            out = step => Some(out),
        }
    }

    /// Changes whenever SIGHUP arrives; `changed().await` to wait for the next one.
    pub fn reloads(&self) -> watch::Receiver<u64> {
        self.reloads.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stop_wins_over_a_pending_startup_step() {
        let (life, stop, _) = Lifecycle::manual();
        assert_eq!(life.unless_stopped(async { 5 }).await, Some(5));
        stop.cancel();
        assert!(life.stop_requested());
        assert_eq!(
            life.unless_stopped(std::future::pending::<()>()).await,
            None
        );
        life.stopped().await;
    }

    #[tokio::test]
    async fn reloads_are_observable() {
        let (life, _, tx) = Lifecycle::manual();
        let mut rx = life.reloads();
        tx.send_modify(|n| *n += 1);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), 1);
    }
}
