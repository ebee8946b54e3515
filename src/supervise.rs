//! Keeps the long-running components of `switchboard serve` (router,
//! presence composer, roster processor, the gateway's deliveries consumer,
//! the archive query responder) running: one that stops with an error is
//! started again after a pause. Their state is derived from the log and
//! their positions are committed only after their outputs are durable, so a
//! new start rebuilds what the failed one held and repeats what it had not
//! finished (duplicates are suppressed downstream).

use std::fmt::Display;
use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{IntCounterVec, Opts};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// First pause before a restart; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// Longest pause between restarts.
const MAX_PAUSE: Duration = Duration::from_secs(30);
/// A run this long counts as healthy: the next failure pauses briefly again.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Restarts by component.
static RESTARTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let counter = IntCounterVec::new(
        Opts::new(
            "switchboard_component_restarts_total",
            "Components of serve started again after they stopped with an error",
        ),
        &["component"],
    )
    .expect("valid counter");
    switchboard_infra::metrics::REGISTRY
        .register(Box::new(counter.clone()))
        .expect("metric registered once");
    counter
});

/// Runs `start()` until `shutdown` turns true, starting it again whenever
/// it returns before that (with an error, logged, or without one).
pub fn supervise<F, Fut, E>(
    component: &'static str,
    mut shutdown: watch::Receiver<bool>,
    mut start: F,
) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Display,
{
    tokio::spawn(async move {
        let mut pause = FIRST_PAUSE;
        loop {
            let started = tokio::time::Instant::now();
            let outcome = start().await.map_err(|e| e.to_string());
            if *shutdown.borrow() {
                return;
            }
            match outcome {
                Err(e) => {
                    tracing::error!(component, error = %e, ?pause, "stopped; starting it again")
                }
                Ok(()) => tracing::error!(
                    component,
                    ?pause,
                    "ended before shutdown; starting it again"
                ),
            }
            RESTARTS.with_label_values(&[component]).inc();
            if started.elapsed() >= HEALTHY_RUN {
                pause = FIRST_PAUSE;
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => return,
            }
            pause = (pause * 2).min(MAX_PAUSE);
        }
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Fails twice, then runs until shutdown: started three times, with
    /// the pauses doubling (1 s, then 2 s), and stops at shutdown.
    #[tokio::test(start_paused = true)]
    async fn a_failed_component_starts_again_until_shutdown() {
        let (stop, shutdown) = watch::channel(false);
        let starts = Arc::new(AtomicUsize::new(0));
        let handle = {
            let (starts, shutdown) = (starts.clone(), shutdown.clone());
            supervise("test", shutdown.clone(), move || {
                let n = starts.fetch_add(1, Ordering::SeqCst);
                let mut shutdown = shutdown.clone();
                async move {
                    if n < 2 {
                        return Err(format!("failure {n}"));
                    }
                    let _ = shutdown.changed().await;
                    Ok(())
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            starts.load(Ordering::SeqCst),
            1,
            "paused after the first failure"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2, "started again after 1 s");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2, "the second pause is 2 s");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 3);
        assert!(RESTARTS.with_label_values(&["test"]).get() >= 2);
        stop.send(true).unwrap();
        handle.await.unwrap();
        assert_eq!(
            starts.load(Ordering::SeqCst),
            3,
            "not started after shutdown"
        );
    }

    /// A component that fails while shutting down is not started again.
    #[tokio::test(start_paused = true)]
    async fn no_restart_after_shutdown() {
        let (stop, shutdown) = watch::channel(false);
        let starts = Arc::new(AtomicUsize::new(0));
        let handle = {
            let (starts, shutdown) = (starts.clone(), shutdown.clone());
            supervise("test-shutdown", shutdown.clone(), move || {
                starts.fetch_add(1, Ordering::SeqCst);
                let mut shutdown = shutdown.clone();
                async move {
                    let _ = shutdown.changed().await;
                    Err("closing")
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(true).unwrap();
        handle.await.unwrap();
        assert_eq!(starts.load(Ordering::SeqCst), 1);
    }
}
