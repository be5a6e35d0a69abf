//! The Runtime API over a Unix socket pair: an instance's `connect` calls stop in the kernel
//! until the agent answers them ([`isolate::ConnectNotifier`]). A connect to the Runtime API's
//! address gets one end of a fresh socket pair, the instance's Runtime API server the other;
//! any other connect goes on unchanged (to the function's network, if it has one).
//!
//! Why: loopback TCP costs ~20 us of sender CPU and ~55 us per round trip here, a Unix socket
//! ~14 us and ~33 us, and a warm call makes two round trips with its runtime (BENCHMARKS.md,
//! Lambda run 14). The TCP listener stays behind the address for anything the answer misses.

use std::os::unix::net::UnixStream;

use isolate::ConnectNotifier;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Answers `notifier`'s calls from a task of its own until the instance stops (or no task of
/// it is left); the Runtime API's connections come out of the returned channel.
pub fn answer_connects(
    notifier: ConnectNotifier,
    instance: String,
    stop: CancellationToken,
) -> mpsc::UnboundedReceiver<UnixStream> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let answering = notifier.answer_all(|ours| {
            // Without a server (its instance has gone) the pair just closes.
            let _ = tx.send(ours);
        });
        tokio::select! {
            answered = answering => if let Err(e) = answered {
                // Dropping the listener makes the kernel fail whatever still waits (ENOSYS)
                // rather than leave the function's thread hanging.
                tracing::warn!(%instance, "answering the function's connect calls: {e}");
            },
            _ = stop.cancelled() => {}
        }
    });
    rx
}
