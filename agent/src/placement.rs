//! Where the agent's HTTP threads and its Lambda instances run (`sandbox.colocate_instances`).
//!
//! A warm call is a ping-pong between the HTTP thread serving it and the instance's runtime:
//! the event handed over, the answer back, the runtime's 202 and its next `/next`. Left to the
//! kernel, each of those wake-ups lands on whichever CPU is idle, which costs an interrupt to
//! another CPU and its exit from idle (BENCHMARKS.md, Lambda run 23). So each HTTP thread is
//! pinned to one CPU, and after a call's answer has gone out the instance is moved onto the CPU
//! of the thread that served it (never on a caller's path), where its next call on that thread
//! finds it; a call that runs longer than [`SHORT_CALL`] gets every CPU back, so a busy
//! function is never held to one core while others idle.
//!
//! Off by default: a pinned thread cannot leave a CPU that other work keeps busy, so calls made
//! between other processes' work got slower where back-to-back calls on a quiet host got ~40 %
//! faster (BENCHMARKS.md, Lambda runs 24-26).

use std::sync::OnceLock;
use std::time::Duration;

/// A call still running after this long is released to every CPU: past it the wake-ups the
/// pinning saves are a small part of the call, and the function may want more than one core.
pub const SHORT_CALL: Duration = Duration::from_millis(2);

struct Cpus {
    /// The CPUs the agent may use, as it started (before any thread was pinned).
    all: Vec<usize>,
    colocate: bool,
}

static CPUS: OnceLock<Cpus> = OnceLock::new();

thread_local! {
    static SERVING_CPU: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Records the CPUs the agent may use and whether to colocate; call once, early, from a
/// thread that is not pinned (the main thread). Later calls change nothing.
pub fn init(colocate: bool) {
    CPUS.get_or_init(|| Cpus {
        all: allowed_cpus(),
        colocate,
    });
}

fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(e) => {
            tracing::warn!("reading the agent's CPUs: {e}; instances are not colocated");
            Vec::new()
        }
    }
}

fn colocating() -> Option<&'static Cpus> {
    CPUS.get().filter(|c| c.colocate && c.all.len() > 1)
}

/// Every CPU the agent may use, for a sandbox to start on (`None`: colocation is off, and
/// sandboxes inherit the cloning thread's CPUs as before).
pub fn all_cpus() -> Option<&'static [usize]> {
    colocating().map(|c| c.all.as_slice())
}

/// Pins the calling thread, HTTP thread `index`, to one CPU (the index-th the agent may use,
/// round robin). Without colocation, or if the kernel refuses, it stays where it was.
pub fn pin_serving_thread(index: usize) {
    let Some(cpus) = colocating() else {
        return;
    };
    let cpu = cpus.all[index % cpus.all.len()];
    match set_this_threads_cpus(&[cpu]) {
        Ok(()) => SERVING_CPU.with(|c| c.set(Some(cpu))),
        Err(e) => tracing::warn!(thread = index, cpu, "pinning an HTTP thread: {e}"),
    }
}

fn set_this_threads_cpus(cpus: &[usize]) -> Result<(), String> {
    let set = isolate::cpu_set(cpus).map_err(|e| e.to_string())?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).map_err(|e| e.to_string())
}

/// Gives the calling thread every CPU the agent may use back (a thread started by a pinned
/// one inherits its single CPU). Without colocation nothing was pinned: nothing to do.
pub fn unpin_current_thread() {
    let Some(cpus) = colocating() else {
        return;
    };
    if let Err(e) = set_this_threads_cpus(&cpus.all) {
        tracing::warn!("giving a thread every CPU: {e}");
    }
}

/// The CPU this HTTP thread is pinned to (None: not an HTTP thread, or not pinned).
pub fn serving_cpu() -> Option<usize> {
    SERVING_CPU.with(|c| c.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_may_use_at_least_the_cpu_it_runs_on() {
        let all = allowed_cpus();
        assert!(!all.is_empty());
        let mut sorted = all.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted, all, "ascending, no repeats");
    }

    /// The CPUs the calling thread may run on.
    fn this_threads_cpus() -> Vec<usize> {
        let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
        (0..nix::sched::CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap())
            .collect()
    }

    #[test]
    fn a_serving_thread_is_pinned_and_the_threads_it_starts_are_not() {
        init(true);
        let all = all_cpus()
            .expect("colocating: this test needs two CPUs")
            .to_vec();
        std::thread::spawn(move || {
            pin_serving_thread(1);
            assert_eq!(serving_cpu(), Some(all[1]));
            assert_eq!(this_threads_cpus(), [all[1]]);
            // A blocking thread the serving thread's runtime starts.
            let rt = tokio::runtime::Builder::new_current_thread()
                .on_thread_start(unpin_current_thread)
                .build()
                .unwrap();
            let started =
                rt.block_on(async { tokio::task::spawn_blocking(this_threads_cpus).await });
            assert_eq!(started.unwrap(), all);
            assert_eq!(
                this_threads_cpus(),
                [all[1]],
                "the serving thread stays pinned"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_thread_that_is_not_serving_has_no_cpu() {
        std::thread::spawn(|| assert_eq!(serving_cpu(), None))
            .join()
            .unwrap();
    }
}
