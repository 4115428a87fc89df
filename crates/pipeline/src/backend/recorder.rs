//! The optional capability of recording a step once and replaying it (CUDA
//! graphs), and of copying what scope observers read itself, so that
//! capture does not keep steps eager. [`crate::Forward::step`] talks to a
//! backend's [`StepRecorder`] only (step_graph.rs); a backend without one
//! runs every step's stage systems eagerly.

use super::Slot;
use crate::error::Result;

/// How the backend runs the step begun last: decode steps can be recorded
/// once as a CUDA graph and replayed (same kernels, same arguments read
/// from device memory, so the same bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepGraph {
    /// Run the stage systems, each launching its own work.
    Eager,
    /// Run the stage systems between [`StepRecorder::begin_graph_capture`] and
    /// [`StepRecorder::end_graph_capture`]; nothing executes until the graph
    /// is replayed.
    Capture,
    /// Do not run the stage systems: [`StepRecorder::replay_step`] does the
    /// step's work.
    Replay,
}

/// A backend that can record steps and gather observers' reads. Each
/// method is one point of the protocol step_graph.rs follows.
pub trait StepRecorder {
    /// Allows the next [`super::Backend::begin_step`] (only that one) to plan a
    /// recorded step ([`StepGraph`]); [`crate::Forward::step`] asks when
    /// nothing observes, amends or forces a stage.
    fn allow_step_graph(&mut self);

    /// What the step begun last does (see [`StepGraph`]).
    fn step_graph(&self) -> StepGraph;

    /// Starts recording the step (after `begin_step` planned
    /// [`StepGraph::Capture`]).
    fn begin_graph_capture(&mut self) -> Result<()>;

    /// Stops recording; `failure` is why a stage system failed while
    /// recording, if one did. Returns whether a graph was made (then
    /// [`StepRecorder::replay_step`] executes the step). If not, graphs are off
    /// from now on and the caller runs the step again eagerly (after
    /// `begin_step`).
    fn end_graph_capture(&mut self, failure: Option<String>) -> Result<bool>;

    /// For a step planned [`StepGraph::Capture`] or [`StepGraph::Replay`]:
    /// the slots the scope observers will read at the end of each scope
    /// (`reads[i]` for the i-th scope of [`crate::Forward::scopes`], in the
    /// order they read them), or None when that is not known. The recorded
    /// step copies these to the host itself, so replayed steps can be
    /// captured. Returns how the step runs now: a recorded step that reads
    /// other slots is recorded again (Capture), and a step whose reads
    /// cannot be recorded runs eagerly.
    fn set_step_reads(&mut self, reads: Option<&[Vec<Slot>]>) -> Result<StepGraph>;

    /// Whether an eager step begun last could copy its scope observers'
    /// reads itself (then [`crate::Forward::step`] probes them and calls
    /// [`StepRecorder::set_step_reads`] for it too).
    fn can_gather_reads(&self) -> bool;

    /// Whether the step begun last copies the planned reads itself
    /// ([`StepRecorder::set_step_reads`]): then the stage systems run with the
    /// observers off, [`StepRecorder::record_scope_reads`] after each scope, and
    /// the observers after the step, their reads answered from the copies.
    /// Always so for a recorded or replayed step.
    fn gathers_reads(&self) -> bool;

    /// Scope `scope` (index as in [`StepRecorder::set_step_reads`]) has run (or
    /// been recorded): copies the slots its observers read.
    fn record_scope_reads(&mut self, scope: usize) -> Result<()>;

    /// The step has run (or its replay was launched): the observers' reads
    /// come next, in the order of [`StepRecorder::set_step_reads`], answered from
    /// the copies.
    fn observe_step_reads(&mut self) -> Result<()>;

    /// The observers have read: the backend lands their reads once the step
    /// has finished.
    fn end_step_reads(&mut self) -> Result<()>;

    /// After [`StepRecorder::replay_step`] was launched ahead of the probe: whether
    /// the recording copies exactly `reads` (what the scope observers will
    /// read; None: not known), so the replay stands. If not, the backend
    /// lets the launched replay finish and forgets its copies, and the
    /// caller begins the step again.
    fn keep_replay(&mut self, reads: Option<&[Vec<Slot>]>) -> Result<bool>;

    /// How many steps so far were replayed from a recorded graph.
    fn graph_replays(&self) -> usize;

    /// Executes the recorded step for the step begun last.
    fn replay_step(&mut self) -> Result<()>;
}
