//! How far loading has got, in bytes: generating a synthetic model's
//! weights, uploading (and converting) weights to a device. The code that
//! loads advances a [`LoadMeter`]; whoever displays progress holds a clone
//! and reads it when it redraws, so loading never waits on a display and
//! threads of a parallel loop can all advance the same meter.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A shared count of the bytes done in the current loading phase. Cloning
/// gives another handle on the same count.
#[derive(Clone, Default)]
pub struct LoadMeter(Arc<MeterState>);

#[derive(Default)]
struct MeterState {
    phase: Mutex<Option<&'static str>>,
    done: AtomicU64,
    total: AtomicU64,
}

/// One reading of a [`LoadMeter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReading {
    /// What is being loaded ("generating synthetic weights").
    pub phase: &'static str,
    /// Bytes done so far in this phase.
    pub done: u64,
    /// Bytes the phase will take in all.
    pub total: u64,
}

impl LoadMeter {
    /// Starts a phase of `total` bytes (the count goes back to 0).
    pub fn begin(&self, phase: &'static str, total: u64) {
        let mut current = self.0.phase.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.0.done.store(0, Ordering::Relaxed);
        self.0.total.store(total, Ordering::Relaxed);
        *current = Some(phase);
    }

    /// Adds `bytes` to the current phase's count (from any thread).
    pub fn advance(&self, bytes: u64) {
        self.0.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The current phase and its count; `None` before any phase began.
    pub fn read(&self) -> Option<LoadReading> {
        let phase = (*self.0.phase.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))?;
        let total = self.0.total.load(Ordering::Relaxed);
        // `done` can pass `total` by a rounding of the caller's estimate.
        let done = self.0.done.load(Ordering::Relaxed).min(total);
        Some(LoadReading { phase, done, total })
    }
}

impl PartialEq for LoadMeter {
    /// Two handles are equal when they share one count.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for LoadMeter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LoadMeter").field(&self.read()).finish()
    }
}

impl fmt::Display for LoadReading {
    /// "generating synthetic weights: 1.2 of 3.4 GB (35%)".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let percent = if self.total == 0 { 100.0 } else { 100.0 * self.done as f64 / self.total as f64 };
        write!(f, "{}: {} of {} ({percent:.0}%)", self.phase, bytes(self.done), bytes(self.total))
    }
}

/// Bytes in the unit a person reads at a glance (kB, MB, GB).
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} kB", n as f64 / 1e3),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_meter_counts_from_every_thread_and_restarts_per_phase() {
        let meter = LoadMeter::default();
        assert_eq!(meter.read(), None);
        meter.begin("generating synthetic weights", 4_000);
        std::thread::scope(|s| {
            for _ in 0..4 {
                let m = meter.clone();
                s.spawn(move || (0..10).for_each(|_| m.advance(100)));
            }
        });
        let r = meter.read().unwrap();
        assert_eq!((r.done, r.total), (4_000, 4_000));
        assert_eq!(r.to_string(), "generating synthetic weights: 4.0 kB of 4.0 kB (100%)");
        meter.begin("uploading weights", 3_000_000_000);
        meter.advance(1_500_000_000);
        assert_eq!(meter.read().unwrap().to_string(), "uploading weights: 1.50 GB of 3.00 GB (50%)");
        assert_eq!(meter, meter.clone());
        assert_ne!(meter, LoadMeter::default());
    }
}
