//! Per-operation GPU time, on when `MOETRACE_PROFILE_OPS` is set: CUDA
//! events around every backend operation, read back at the start of the
//! next step (so they add no synchronisation inside a step), summed per
//! phase (prefill: steps of more than one token; decode: one token) and
//! operation, printed to stderr when the backend is dropped. Also the GPU's
//! idle time inside steps (the span from a step's first to its last event
//! minus the operations' time): what launch overhead and host work cost.
//! Each operation's host time (from its call to its return: bookkeeping
//! and launches) is summed too. The events themselves cost about a
//! microsecond of host time per operation, so the idle share is slightly
//! overstated.

use std::collections::BTreeMap;
use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};

/// Totals for one (phase, operation).
#[derive(Debug, Default, Clone, Copy)]
struct Total {
    calls: u64,
    ms: f64,
    host_ms: f64,
}

/// Events of the step in flight and the totals so far.
#[derive(Default)]
pub(super) struct OpProfiler {
    pending: Vec<(&'static str, CudaEvent, CudaEvent, f64)>,
    phase: &'static str,
    totals: BTreeMap<(&'static str, &'static str), Total>,
    /// Per phase: steps, GPU span of the steps (ms), operations' time (ms).
    spans: BTreeMap<&'static str, (u64, f64, f64)>,
    /// Per phase: wall time from one step's start to the next's (ms).
    walls: BTreeMap<&'static str, f64>,
    step_start: Option<std::time::Instant>,
}

impl OpProfiler {
    /// A profiler when `MOETRACE_PROFILE_OPS` is set.
    pub(super) fn from_env() -> Option<Self> {
        std::env::var_os("MOETRACE_PROFILE_OPS").map(|_| Self::default())
    }

    /// Records an event with timing on `stream`.
    pub(super) fn event(stream: &Arc<CudaStream>) -> Option<CudaEvent> {
        stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).ok()
    }

    /// One operation's events and host time.
    pub(super) fn push(&mut self, name: &'static str, start: CudaEvent, end: CudaEvent, host: std::time::Duration) {
        self.pending.push((name, start, end, host.as_secs_f64() * 1e3));
    }

    /// Reads back the finished step's events (waiting for its last one) and
    /// starts a step of `tokens` tokens.
    pub(super) fn begin_step(&mut self, tokens: usize) {
        self.flush();
        self.phase = if tokens > 1 { "prefill" } else { "decode" };
        self.step_start = Some(std::time::Instant::now());
    }

    fn flush(&mut self) {
        if let Some(start) = self.step_start.take() {
            *self.walls.entry(self.phase).or_default() += start.elapsed().as_secs_f64() * 1e3;
        }
        let pending = std::mem::take(&mut self.pending);
        let (Some(first), Some(last)) = (pending.first(), pending.last()) else { return };
        if last.2.synchronize().is_err() {
            return;
        }
        let span = first.1.elapsed_ms(&last.2).unwrap_or(0.0) as f64;
        let mut busy = 0.0;
        for (name, start, end, host_ms) in &pending {
            let ms = start.elapsed_ms(end).unwrap_or(0.0) as f64;
            busy += ms;
            let t = self.totals.entry((self.phase, name)).or_default();
            t.calls += 1;
            t.ms += ms;
            t.host_ms += host_ms;
        }
        let s = self.spans.entry(self.phase).or_default();
        *s = (s.0 + 1, s.1 + span, s.2 + busy);
    }

    /// The table, as printed on drop.
    pub(super) fn report(&mut self) -> String {
        self.flush();
        let mut out = String::from("GPU time per operation (MOETRACE_PROFILE_OPS)\n");
        for (phase, (steps, span, busy)) in &self.spans {
            let n = *steps as f64;
            let host: f64 = self.totals.iter().filter(|((p, _), _)| p == phase).map(|(_, t)| t.host_ms).sum();
            out += &format!(
                "{phase}: {steps} steps, wall {:.3} ms/step (host in operations {:.3}), GPU span {:.3} ms/step, operations {:.3} ms/step, idle {:.1}%\n",
                self.walls.get(phase).copied().unwrap_or(0.0) / n,
                host / n,
                span / n,
                busy / n,
                100.0 * (span - busy).max(0.0) / span.max(1e-9)
            );
            let mut rows: Vec<_> = self.totals.iter().filter(|((p, _), _)| p == phase).collect();
            rows.sort_by(|a, b| b.1.ms.total_cmp(&a.1.ms));
            for ((_, name), t) in rows {
                out += &format!(
                    "  {name:<20} {:>7} calls {:>10.3} ms/step {:>9.2} us/call {:>5.1}%  host {:>7.2} us/call\n",
                    t.calls,
                    t.ms / *steps as f64,
                    1e3 * t.ms / t.calls as f64,
                    100.0 * t.ms / busy.max(1e-9),
                    1e3 * t.host_ms / t.calls as f64
                );
            }
        }
        out
    }
}

/// `MOETRACE_PROFILE_STEPS`: the GPU time of each replayed decode step,
/// and of what runs between two replays (the greedy choice, and the GPU
/// idle while the host takes it and launches the next), from events around
/// each graph launch; printed to stderr when the backend is dropped.
/// (`MOETRACE_PROFILE_OPS` keeps every step eager, so it cannot say this.)
#[derive(Default)]
pub(super) struct ReplayClock {
    /// The end event of the replay before the last...
    before_last: Option<CudaEvent>,
    /// ... and the last replay's start and end events.
    last: Option<(CudaEvent, CudaEvent)>,
    replays: u64,
    replay_ms: f64,
    between: u64,
    between_ms: f64,
}

impl ReplayClock {
    /// A clock when `MOETRACE_PROFILE_STEPS` is set.
    pub(super) fn from_env() -> Option<Self> {
        std::env::var_os("MOETRACE_PROFILE_STEPS").map(|_| Self::default())
    }

    /// Runs `launch` (a graph launch on `stream`) between two events. The
    /// last replay's events are read first: by now its greedy choice was
    /// waited for, so they have completed.
    pub(super) fn around<R>(&mut self, stream: &Arc<CudaStream>, launch: impl FnOnce() -> R) -> R {
        if let Some((start, end)) = self.last.take() {
            if let Ok(ms) = start.elapsed_ms(&end) {
                self.replays += 1;
                self.replay_ms += ms as f64;
            }
            if let Some(Ok(ms)) = self.before_last.as_ref().map(|e| e.elapsed_ms(&start)) {
                self.between += 1;
                self.between_ms += ms as f64;
            }
            self.before_last = Some(end);
        }
        let start = OpProfiler::event(stream);
        let result = launch();
        if let (Some(start), Some(end)) = (start, OpProfiler::event(stream)) {
            self.last = Some((start, end));
        }
        result
    }

    /// Per replay, on the GPU: the step, and the time from one step's end
    /// to the next one's start.
    pub(super) fn report(&self) -> String {
        let per = |ms: f64, n: u64| if n == 0 { 0.0 } else { 1e3 * ms / n as f64 };
        format!(
            "replayed decode steps on the GPU (MOETRACE_PROFILE_STEPS): {} replays, {:.1} us each; {:.1} us from one's end to the next one's start\n",
            self.replays,
            per(self.replay_ms, self.replays),
            per(self.between_ms, self.between)
        )
    }
}
