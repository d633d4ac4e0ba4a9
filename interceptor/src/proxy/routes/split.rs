//! Weighted choice among a rule's backends, per connection: smooth weighted round-robin
//! (nginx's), so any window of `sum(weights)` connections follows the weights exactly and
//! the backends interleave rather than come in runs.
use std::sync::Mutex;

use super::Backend;
use crate::sync::lock;

#[derive(Debug)]
pub(super) struct Split {
    backends: Vec<(Backend, u32)>,
    /// The running scores of smooth weighted round-robin, one per backend.
    current: Mutex<Vec<i64>>,
}

impl Split {
    pub(super) fn new(backends: Vec<(Backend, u32)>) -> Self {
        let split = Self {
            current: Mutex::new(vec![0; backends.len()]),
            backends,
        };
        // A table is rebuilt on every model change and starts its sequence afresh; from a
        // random point of the cycle, so a small share is not starved by frequent rebuilds.
        let total: u64 = split.backends.iter().map(|(_, w)| u64::from(*w)).sum();
        for _ in 0..random_below(total.min(1_000)) {
            split.pick();
        }
        split
    }

    /// Every backend of the split, whatever its weight.
    pub(super) fn backends(&self) -> impl Iterator<Item = &Backend> {
        self.backends.iter().map(|(backend, _)| backend)
    }

    /// The backend for the next connection; `None` when every weight is zero.
    pub(super) fn pick(&self) -> Option<&Backend> {
        let total: i64 = self.backends.iter().map(|(_, w)| i64::from(*w)).sum();
        if total == 0 {
            return None;
        }
        let mut current = lock(&self.current);
        let mut best = 0;
        for (i, (_, weight)) in self.backends.iter().enumerate() {
            current[i] += i64::from(*weight);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        Some(&self.backends[best].0)
    }
}

/// A number in `0..n` (0 when `n` is 0), from the standard library's per-process random
/// hash keys: spreading start points needs no stronger randomness.
pub(super) fn random_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    if n == 0 {
        return 0;
    }
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(n);
    hasher.finish() % n
}

/// Istio's weights: destinations without a weight share what the explicit ones leave of
/// 100 equally (the first ones take the remainder of the division); a lone destination
/// without a weight takes everything.
pub(super) fn istio_weights(explicit: &[Option<u32>]) -> Vec<u32> {
    let given: u32 = explicit
        .iter()
        .flatten()
        .fold(0u32, |a, w| a.saturating_add(*w));
    let unset = explicit.iter().filter(|w| w.is_none()).count() as u32;
    let left = 100u32.saturating_sub(given);
    let (share, mut extra) = match unset {
        0 => (0, 0),
        n => (left / n, left % n),
    };
    explicit
        .iter()
        .map(|w| {
            w.unwrap_or_else(|| {
                let bonus = u32::from(extra > 0);
                extra = extra.saturating_sub(1);
                share + bonus
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::routes::UpstreamSettings;

    fn split(weights: &[u32]) -> Split {
        Split::new(
            weights
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    let settings = UpstreamSettings::default_for(format!("test/b{i}"));
                    (
                        Backend::new(format!("b{i}"), Vec::new(), settings.into()),
                        *w,
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn every_window_follows_the_weights_and_backends_interleave() {
        // Whatever random point the cycle starts from.
        let s = split(&[80, 20]);
        let picks: Vec<String> = (0..100).map(|_| s.pick().unwrap().name.clone()).collect();
        assert_eq!(picks.iter().filter(|n| *n == "b1").count(), 20);
        // Interleaved: never more than 4 b0 in a row for 80/20.
        assert!(
            !picks.windows(5).any(|w| w.iter().all(|n| n == "b0")),
            "{picks:?}"
        );
    }

    #[test]
    fn zero_weights_everywhere_pick_nothing_and_zero_never_wins() {
        assert!(split(&[0, 0]).pick().is_none());
        let s = split(&[0, 1]);
        assert!((0..10).all(|_| s.pick().unwrap().name == "b1"));
    }

    #[test]
    fn istio_splits_the_remainder_equally() {
        assert_eq!(istio_weights(&[None]), vec![100]);
        assert_eq!(istio_weights(&[None, None, None]), vec![34, 33, 33]);
        assert_eq!(istio_weights(&[Some(80), Some(20)]), vec![80, 20]);
        assert_eq!(istio_weights(&[Some(50), None, None]), vec![50, 25, 25]);
        assert_eq!(istio_weights(&[Some(100), None]), vec![100, 0]);
        assert_eq!(istio_weights(&[Some(0), Some(0)]), vec![0, 0]);
    }
}
