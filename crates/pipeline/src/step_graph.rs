//! [`Forward::step`]: one step, run eagerly or, for decode steps the
//! backend can record, recorded once as a graph and replayed
//! ([`StepGraph`]).
//!
//! Scope observers (capture) do not keep steps eager. Before a recorded
//! step (and an eager one the backend can copy for: CUDA decode steps),
//! they are probed ([`ObserverProbe`]): run with each scope's stage log
//! from the scope's last run, they say which slots they would read at each
//! scope's end, without reading anything. The backend copies those slots
//! itself at each scope's end, or records the copies inside the step
//! ([`crate::backend::StepRecorder::set_step_reads`], [`crate::backend::StepRecorder::record_scope_reads`]); after the
//! step (each replay) the observers run for every scope, as they would have
//! after the scope, and their reads are answered from the copies. A replay
//! is launched before the probe, which then runs while the device computes
//! the step ([`crate::backend::StepRecorder::keep_replay`]); a step whose reads differ
//! from the recording's is begun again and recorded anew. Stage
//! observers, amenders and teacher forcing still keep every step eager:
//! they act between stages.

use std::time::Instant;

use stage_types::SaveTensorStage;

use crate::backend::{StepGraph, StepRecorder};
use crate::ecs::{ObserverProbe, ObserversEnabled, StageLog};
use crate::error::{PipelineError, Result};
use crate::forward::{Forward, ForwardEvent, StepScope};
use crate::step_phases::Phase;
use crate::teacher::Teacher;

impl Forward {
    /// Runs one step: `tokens` at positions `start_position..`.
    ///
    /// With no stage observer or amender attached and no teacher forcing
    /// armed, the backend may record a decode step once as a graph and
    /// replay it for later steps ([`StepGraph`]): the same kernels with the
    /// same arguments, so the same bits, without launching each stage from
    /// the host; scope observers then see each scope's outputs after the
    /// replay (see the module's doc).
    pub fn step(
        &mut self,
        step: usize,
        tokens: &[u32],
        start_position: usize,
        on_event: &mut dyn FnMut(ForwardEvent),
    ) -> Result<()> {
        if self.backend_mut().recorder().is_none() {
            self.begin_step(step, tokens, start_position)?;
            on_event(ForwardEvent::StepStarted { step, start_position, tokens: tokens.len() });
            let t = Instant::now();
            let ran = self.run_scopes(step, on_event);
            self.time(if tokens.len() > 1 { Phase::Prompt } else { Phase::Eager }, t);
            return ran;
        }
        let armed = {
            let teacher = self.world.resource::<Teacher>();
            teacher.record || !teacher.forced.is_empty()
        };
        if !self.hooked && !armed {
            self.recorder()?.allow_step_graph();
        }
        self.begin_step(step, tokens, start_position)?;
        on_event(ForwardEvent::StepStarted { step, start_position, tokens: tokens.len() });
        let mut plan = self.recorder()?.step_graph();
        // What the observers read, when a replay launched ahead has probed it.
        let mut probed = None;
        if plan == StepGraph::Replay {
            // Launched first, the replay runs on the device while the
            // observers are probed for what they read; when that is what
            // the recording copies (every step, for a selection that does
            // not change with the step), the probe cost the step nothing.
            let t = Instant::now();
            self.recorder()?.replay_step()?;
            self.time(Phase::Launch, t);
            let t = Instant::now();
            let reads = self.probe_reads()?;
            self.time(Phase::Probe, t);
            if self.recorder()?.keep_replay(reads.as_deref())? {
                return self.observe_replay(step, on_event);
            }
            // The observers read other stages than the recording copies:
            // the step runs again, recorded for what they read.
            if !self.hooked && !armed {
                self.recorder()?.allow_step_graph();
            }
            self.begin_step(step, tokens, start_position)?;
            plan = self.recorder()?.step_graph();
            probed = Some(reads);
        }
        let eager_gathers = self.scope_observed && self.recorder()?.can_gather_reads();
        if plan != StepGraph::Eager || eager_gathers {
            let reads = match probed {
                Some(reads) => reads,
                None => {
                    let t = Instant::now();
                    let reads = self.probe_reads()?;
                    self.time(Phase::Probe, t);
                    reads
                }
            };
            let t = Instant::now();
            plan = self.recorder()?.set_step_reads(reads.as_deref())?;
            self.time(Phase::Plan, t);
        }
        let gathered = self.recorder()?.gathers_reads();
        let t = Instant::now();
        match plan {
            StepGraph::Eager => {
                let ran = if gathered {
                    self.run_scopes_gathering(step, on_event).and_then(|()| self.observe_gathered())
                } else {
                    self.run_scopes(step, on_event)
                };
                self.time(if tokens.len() > 1 { Phase::Prompt } else { Phase::Eager }, t);
                ran
            }
            StepGraph::Replay => self.replay(step, on_event),
            StepGraph::Capture => {
                self.recorder()?.begin_graph_capture()?;
                let ran = self.run_scopes_gathering(step, &mut |_| {});
                let recorded = self.recorder()?.end_graph_capture(ran.err().map(|e| e.to_string()))?;
                self.time(Phase::Record, t);
                if recorded {
                    return self.replay(step, on_event);
                }
                // No graph (the backend said why and runs eagerly from now
                // on): nothing of the step executed, so run it again.
                self.begin_step(step, tokens, start_position)?;
                self.run_scopes(step, on_event)
            }
        }
    }

    /// The backend's step recorder (only asked for once `step` has seen
    /// that the backend has one).
    fn recorder(&mut self) -> Result<&mut dyn StepRecorder> {
        self.backend_mut().recorder().ok_or_else(|| PipelineError::BadInput("the backend records no steps".into()))
    }

    fn run_scopes(&mut self, step: usize, on_event: &mut dyn FnMut(ForwardEvent)) -> Result<()> {
        for scope in self.scopes() {
            self.run_scope(scope)?;
            if let StepScope::Layer(layer) = scope {
                on_event(ForwardEvent::LayerDone { step, layer, layers: self.layers.len() });
            }
        }
        Ok(())
    }

    /// Runs every scope with the observers off; after each, the backend
    /// copies (or, recording, records the copies of) what the observers
    /// will read.
    fn run_scopes_gathering(&mut self, step: usize, on_event: &mut dyn FnMut(ForwardEvent)) -> Result<()> {
        self.world.resource_mut::<ObserversEnabled>().0 = false;
        let ran = (|| {
            for scope in self.scopes() {
                self.run_scope(scope)?;
                let index = self.scope_index(scope);
                self.recorder()?.record_scope_reads(index)?;
                if let StepScope::Layer(layer) = scope {
                    on_event(ForwardEvent::LayerDone { step, layer, layers: self.layers.len() });
                }
            }
            Ok(())
        })();
        self.world.resource_mut::<ObserversEnabled>().0 = true;
        ran
    }

    /// Replays the recorded step, then runs each scope's observers on
    /// what the recording copied.
    fn replay(&mut self, step: usize, on_event: &mut dyn FnMut(ForwardEvent)) -> Result<()> {
        let t = Instant::now();
        self.recorder()?.replay_step()?;
        self.time(Phase::Launch, t);
        self.observe_replay(step, on_event)
    }

    /// After a replay was launched: each scope's observers on what it
    /// copied.
    fn observe_replay(&mut self, step: usize, on_event: &mut dyn FnMut(ForwardEvent)) -> Result<()> {
        self.observe_gathered()?;
        let layers = self.layers.len();
        for layer in 0..layers {
            on_event(ForwardEvent::LayerDone { step, layer, layers });
        }
        Ok(())
    }

    /// After a step that copied its reads itself: each scope's observers,
    /// their reads answered from the copies.
    fn observe_gathered(&mut self) -> Result<()> {
        let t = Instant::now();
        let observed = self.recorder()?.observe_step_reads().and_then(|()| self.observe_replayed());
        let landed = self.recorder()?.end_step_reads();
        self.time(Phase::Observe, t);
        observed.and(landed)
    }

    /// Runs the observers of each scope the probe found reads in (an
    /// observer that reads nothing does nothing).
    fn observe_replayed(&mut self) -> Result<()> {
        if !self.scope_observed {
            return Ok(());
        }
        for scope in self.scopes() {
            if !self.probed_reads.get(self.scope_index(scope)).copied().unwrap_or(true) {
                continue;
            }
            self.enter_logged_scope(scope);
            self.observe(scope.schedule())?;
        }
        Ok(())
    }

    /// What the scope observers would read at the end of each scope of
    /// this step, or None when a scope has not run yet (nothing says what
    /// it produces).
    fn probe_reads(&mut self) -> Result<Option<Vec<Vec<SaveTensorStage>>>> {
        let scopes: Vec<StepScope> = self.scopes().collect();
        if !self.scope_observed {
            return Ok(Some(vec![Vec::new(); scopes.len()]));
        }
        if self.scope_logs.iter().any(Option::is_none) {
            return Ok(None);
        }
        let mut reads = Vec::with_capacity(scopes.len());
        for scope in scopes {
            self.enter_logged_scope(scope);
            self.world.resource_mut::<ObserverProbe>().0 = Some(Vec::new());
            let ran = self.observe(scope.schedule());
            let probed = self.world.resource_mut::<ObserverProbe>().0.take();
            ran?;
            reads.push(probed.unwrap_or_default());
        }
        self.probed_reads = reads.iter().map(|r| !r.is_empty()).collect();
        Ok(Some(reads))
    }

    /// Sets the current layer and stage log to those of `scope`'s last run.
    fn enter_logged_scope(&mut self, scope: StepScope) {
        self.set_layer(scope.layer());
        let log = self.scope_logs[self.scope_index(scope)].unwrap_or_default();
        self.world.resource_mut::<StageLog>().0 = log;
    }
}

impl Forward {
    /// Adds the time since `since` to `phase` (when profiling).
    pub(crate) fn time(&mut self, phase: Phase, since: Instant) {
        if let Some(p) = self.phases.as_mut() {
            p.add(phase, since.elapsed());
        }
    }
}
