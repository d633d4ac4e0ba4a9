//! Locks that survive a panicking holder: the agent's maps stay usable (a poisoned lock
//! only means another task panicked mid-update, and every update here is a single
//! insert or remove). And [`Coalesced`]: rebuilds asked for often, run one at a time;
//! [`in_background`]: such work at a lower CPU priority than the CNI path.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

/// Requests for an expensive rebuild (the route table), served by at most one builder
/// at a time: requests that arrive during a build are all served by the next one.
#[derive(Debug, Default)]
pub struct Coalesced {
    wanted: AtomicU64,
    building: AtomicBool,
}

impl Coalesced {
    /// Record a request. True when no builder runs: the caller must start one, which
    /// calls [`Coalesced::serve`]; false when a running builder will serve it.
    pub fn request(&self) -> bool {
        self.wanted.fetch_add(1, Ordering::SeqCst);
        !self.building.swap(true, Ordering::SeqCst)
    }

    /// The builder: runs `build` until every request made before a build started has
    /// been served by it.
    pub fn serve(&self, mut build: impl FnMut()) {
        loop {
            let served = self.wanted.load(Ordering::SeqCst);
            build();
            self.building.store(false, Ordering::SeqCst);
            // A request after `served` either saw the flag still set (and left its build
            // to this loop) or set it itself (and started a builder): never neither.
            if self.wanted.load(Ordering::SeqCst) == served
                || self.building.swap(true, Ordering::SeqCst)
            {
                return;
            }
        }
    }
}

/// Ask `owner` for `work` without waiting for it: the requests of `owner`'s
/// [`Coalesced`] (`requests`) are served by one build at a time on a pooled blocking
/// thread of the current tokio runtime, [`in_background`], and requests that arrive
/// during a build are served by the next one. Outside a runtime (or while `owner` is
/// being dropped) the build runs in place. The route table's builder and the probe SNAT
/// writer: work a CNI ADD asks for and must not wait for.
pub fn request_in_background<T: Send + Sync + 'static>(
    owner: &T,
    me: &std::sync::Weak<T>,
    requests: fn(&T) -> &Coalesced,
    work: fn(&T),
) {
    if !requests(owner).request() {
        return;
    }
    match (me.upgrade(), tokio::runtime::Handle::try_current()) {
        (Some(me), Ok(runtime)) => {
            runtime.spawn_blocking(move || in_background(|| requests(&me).serve(|| work(&me))));
        }
        _ => requests(owner).serve(|| work(owner)),
    }
}

/// How much lower than the agent's other threads background work runs (nice steps):
/// under contention it gets about a tenth of the CPU a normal thread gets.
const BACKGROUND_NICE: i32 = 10;

/// Run `work` on this thread at a lower CPU priority, and put it back after (it is a
/// runtime's pooled thread, which serves the CNI path next). On Linux the nice value is
/// per thread. Putting it back needs CAP_SYS_NICE, which the agent has; without it the
/// thread stays lower, which is logged once.
pub fn in_background<R>(work: impl FnOnce() -> R) -> R {
    use rustix::process::{getpriority_process, setpriority_process};
    let before = getpriority_process(None).ok();
    if let Some(before) = before {
        let _ = setpriority_process(None, (before + BACKGROUND_NICE).min(19));
    }
    let result = work();
    if let Some(before) = before {
        if let Err(error) = setpriority_process(None, before) {
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                tracing::warn!(%error, "a background thread's priority could not be restored");
            });
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::Coalesced;

    /// Many threads request while builds are slow: every request is followed by a build
    /// that started after it (the last build saw the last request), fewer builds run than
    /// were asked for, and never two at once.
    #[test]
    fn every_request_is_served_by_a_later_build_and_builds_coalesce() {
        const THREADS: u64 = 8;
        const REQUESTS: u64 = 50;
        let coalesced = Arc::new(Coalesced::default());
        let requested = Arc::new(AtomicU64::new(0));
        let builds = Arc::new(AtomicU64::new(0));
        let running = Arc::new(AtomicU64::new(0));
        // The number of requests made when the latest build started.
        let seen_by_last_build = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let (coalesced, requested, builds, running, seen) = (
                    Arc::clone(&coalesced),
                    Arc::clone(&requested),
                    Arc::clone(&builds),
                    Arc::clone(&running),
                    Arc::clone(&seen_by_last_build),
                );
                std::thread::spawn(move || {
                    for _ in 0..REQUESTS {
                        requested.fetch_add(1, Ordering::SeqCst);
                        if coalesced.request() {
                            coalesced.serve(|| {
                                assert_eq!(running.fetch_add(1, Ordering::SeqCst), 0);
                                seen.store(requested.load(Ordering::SeqCst), Ordering::SeqCst);
                                builds.fetch_add(1, Ordering::SeqCst);
                                std::thread::sleep(Duration::from_micros(300));
                                running.fetch_sub(1, Ordering::SeqCst);
                            });
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("worker");
        }
        let total = THREADS * REQUESTS;
        assert_eq!(seen_by_last_build.load(Ordering::SeqCst), total);
        let builds = builds.load(Ordering::SeqCst);
        assert!(
            builds >= 1 && builds < total,
            "{builds} builds for {total} requests"
        );
    }

    #[test]
    fn background_work_runs_at_a_lower_priority_and_the_thread_gets_its_own_back() {
        use rustix::process::getpriority_process;
        // A thread of its own: its nice value is its own (Linux), whatever happens.
        std::thread::spawn(|| {
            let before = getpriority_process(None).unwrap();
            let during = super::in_background(|| getpriority_process(None).unwrap());
            assert_eq!(during, (before + super::BACKGROUND_NICE).min(19));
            if rustix::process::geteuid().is_root() {
                assert_eq!(getpriority_process(None).unwrap(), before);
            }
        })
        .join()
        .unwrap();
    }
}
