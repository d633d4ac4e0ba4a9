//! The soak of `tb-soak` (issue 13, item 8): the workload (connection churn with RST and
//! FIN closes, resets from a reset server, long-lived connections, pod add/delete churn,
//! agent hand-overs), the snapshots of what could leak (kernel map entries, pins, the
//! agent's fds, threads and RSS) and the report that compares the end with the baseline.

pub mod report;
pub mod snapshot;
pub mod workload;

use std::sync::atomic::AtomicBool;
use std::time::{SystemTime, UNIX_EPOCH};

/// Set by SIGINT/SIGTERM: every loop ends, every running tb-pod is killed, and `main`
/// returns normally so the testbed is dropped (and cleans up).
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// xorshift64*: the workload's random choices (round lengths, RST or FIN closes, churn
/// intervals); the seed is printed so a run can be repeated.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point.
        Self(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}
