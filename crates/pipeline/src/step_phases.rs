//! Host time per part of a step (`MOETRACE_PROFILE_STEPS`), for profiling
//! the step loop (step_graph.rs) without a profiler.

use std::time::Duration;

/// A part of `Forward::step` timed on the host when
/// `MOETRACE_PROFILE_STEPS` is set.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Phase {
    /// Probing the scope observers' reads.
    Probe,
    /// The backend planning the step's reads.
    Plan,
    /// A step of several tokens (the prompt), eager.
    Prompt,
    /// An eager decode step (stage systems and observers).
    Eager,
    /// Recording a step.
    Record,
    /// Launching a replay (and waiting for the last one's reads to land).
    Launch,
    /// The scope observers after a replay.
    Observe,
    /// Waiting for the greedy choice (the step's GPU time left after the host's).
    Token,
}

const PHASES: [&str; 8] = ["probe", "plan", "prompt", "eager", "record", "launch", "observe", "token"];

/// Host time per [`Phase`] over a run, printed when the forward pass is
/// dropped.
#[derive(Debug, Default)]
pub(crate) struct StepPhases {
    total: [Duration; PHASES.len()],
    count: [usize; PHASES.len()],
}

impl StepPhases {
    /// On when `MOETRACE_PROFILE_STEPS` is set.
    pub(crate) fn from_env() -> Option<Self> {
        std::env::var_os("MOETRACE_PROFILE_STEPS").map(|_| Self::default())
    }

    /// Counts `took` against `phase`.
    pub(crate) fn add(&mut self, phase: Phase, took: Duration) {
        self.total[phase as usize] += took;
        self.count[phase as usize] += 1;
    }
}

impl Drop for StepPhases {
    fn drop(&mut self) {
        let mut report = String::from("host time per step phase (MOETRACE_PROFILE_STEPS):\n");
        for (i, name) in PHASES.iter().enumerate() {
            if self.count[i] > 0 {
                let mean = self.total[i].as_secs_f64() * 1e6 / self.count[i] as f64;
                report.push_str(&format!("  {name:<8} {:>6} times, {mean:>9.1} us each\n", self.count[i]));
            }
        }
        eprint!("{report}");
    }
}
