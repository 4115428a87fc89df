//! `Forward::step` with a backend that records decode steps, checked on the
//! CPU: scope observers (capture) no longer keep steps eager; they are
//! probed for what they read, the recording copies it, and after each
//! replay they get those copies, for the same (step, layer, stage) as an
//! eager run. A step whose reads change is recorded again. The backend here
//! is the CPU reference wrapped in a stand-in for the CUDA graph logic: a
//! "recording" computes the step (the CUDA backend computes it in the first
//! replay instead), a replay computes nothing, so replayed steps' values
//! are the recording's; what is checked is the plumbing, and the recorded
//! step's values against an eager run.

use std::sync::{Arc, Mutex};

use pipeline::backend::{AttentionShape, QkNormArgs, RopeArgs, SharedTerm, Slot, StepGraph, StepRecorder};
use pipeline::ecs::ForwardSchedule;
use pipeline::weights::WeightId;
use pipeline::{Backend, CpuBackend, Forward, HookCtx, HostTensor, Model, PendingTensor, Result};
use stage_types::SaveTensorStage as S;

/// What the stand-in did, for the assertions.
#[derive(Default, Debug)]
struct Counts {
    recordings: usize,
    replays: usize,
}

struct Recording {
    inner: CpuBackend,
    allowed: bool,
    plan: StepGraph,
    warm: bool,
    /// The reads planned for the recording in progress, then recorded.
    planned: Option<Vec<Vec<Slot>>>,
    recorded: Option<Vec<Vec<Slot>>>,
    taps: Vec<(Slot, HostTensor)>,
    cursor: Option<usize>,
    /// The recorded step's logits, which a replay leaves for the greedy
    /// choice.
    logits: Option<HostTensor>,
    layers: usize,
    counts: Arc<Mutex<Counts>>,
}

impl Recording {
    fn new(model: &Model, counts: Arc<Mutex<Counts>>) -> Self {
        Self {
            inner: CpuBackend::new(model.store.clone(), Some(1)).unwrap(),
            allowed: false,
            plan: StepGraph::Eager,
            warm: false,
            planned: None,
            recorded: None,
            taps: Vec::new(),
            cursor: None,
            logits: None,
            layers: model.layers.len(),
            counts,
        }
    }
}

impl Backend for Recording {
    fn name(&self) -> &'static str {
        "recording-cpu"
    }
    fn dtype(&self) -> &'static str {
        self.inner.dtype()
    }
    fn begin_step(&mut self, tokens: &[u32], start_position: usize) -> Result<()> {
        let allowed = std::mem::take(&mut self.allowed);
        self.plan = match (allowed && tokens.len() == 1 && start_position > 0, &self.recorded) {
            (true, Some(_)) => StepGraph::Replay,
            (true, None) if self.warm => StepGraph::Capture,
            (decode, _) => {
                self.warm = decode;
                self.recorded = None;
                StepGraph::Eager
            }
        };
        self.inner.begin_step(tokens, start_position)
    }
    fn read_async(&mut self, slot: Slot) -> Result<PendingTensor> {
        let Some(cursor) = self.cursor.as_mut() else {
            return self.inner.read(slot).map(PendingTensor::ready);
        };
        let (tapped, t) = &self.taps[*cursor];
        assert_eq!(*tapped, slot, "replayed reads come in the recorded order");
        *cursor += 1;
        Ok(PendingTensor::ready(t.clone()))
    }
    fn embedding(&mut self, table: WeightId, out: Slot) -> Result<()> {
        self.inner.embedding(table, out)
    }
    fn rms_norm(&mut self, input: Slot, weight: WeightId, eps: f64, out: Slot) -> Result<()> {
        self.inner.rms_norm(input, weight, eps, out)
    }
    fn linear(&mut self, input: Slot, weights: &[WeightId], out: Slot) -> Result<()> {
        self.inner.linear(input, weights, out)
    }
    fn add_bias(&mut self, input: Slot, biases: &[WeightId], out: Slot) -> Result<()> {
        self.inner.add_bias(input, biases, out)
    }
    fn qk_norm(&mut self, input: Slot, args: QkNormArgs, out: Slot) -> Result<()> {
        self.inner.qk_norm(input, args, out)
    }
    fn rope(&mut self, input: Slot, args: RopeArgs, out: Slot) -> Result<()> {
        self.inner.rope(input, args, out)
    }
    fn append_kv(&mut self, layer: usize, k: Slot, v: Slot, v_col: usize) -> Result<()> {
        self.inner.append_kv(layer, k, v, v_col)
    }
    fn attn_scores(&mut self, layer: usize, q: Slot, shape: AttentionShape, out: Slot) -> Result<()> {
        self.inner.attn_scores(layer, q, shape, out)
    }
    fn attn_softmax(&mut self, scores: Slot, out: Slot) -> Result<()> {
        self.inner.attn_softmax(scores, out)
    }
    fn attention(&mut self, layer: usize, probs: Slot, shape: AttentionShape, out: Slot) -> Result<()> {
        self.inner.attention(layer, probs, shape, out)
    }
    fn add(&mut self, a: Slot, b: Slot, out: Slot) -> Result<()> {
        self.inner.add(a, b, out)
    }
    fn silu(&mut self, input: Slot, out: Slot) -> Result<()> {
        self.inner.silu(input, out)
    }
    fn sigmoid(&mut self, input: Slot, out: Slot) -> Result<()> {
        self.inner.sigmoid(input, out)
    }
    fn mul(&mut self, a: Slot, b: Slot, out: Slot) -> Result<()> {
        self.inner.mul(a, b, out)
    }
    fn swiglu(&mut self, gate: Slot, up: Slot, out: Slot) -> Result<()> {
        self.inner.swiglu(gate, up, out)
    }
    fn router_top_k(&mut self, logits: Slot, k: usize, norm: bool, weights: Slot, indices: Slot) -> Result<()> {
        self.inner.router_top_k(logits, k, norm, weights, indices)
    }
    fn expert_linear(&mut self, input: Slot, indices: Slot, experts: &[WeightId], out: Slot) -> Result<()> {
        self.inner.expert_linear(input, indices, experts, out)
    }
    fn moe_combine(&mut self, expert_out: Slot, weights: Slot, shared: Option<SharedTerm>, out: Slot) -> Result<()> {
        self.inner.moe_combine(expert_out, weights, shared, out)
    }
    fn read(&mut self, slot: Slot) -> Result<HostTensor> {
        self.inner.read(slot)
    }
    fn write(&mut self, slot: Slot, tensor: &HostTensor) -> Result<()> {
        self.inner.write(slot, tensor)
    }
    fn kv_cache(&mut self, layer: usize) -> Result<(HostTensor, HostTensor)> {
        self.inner.kv_cache(layer)
    }
    fn set_kv_cache(&mut self, layer: usize, keys: &HostTensor, values: &HostTensor) -> Result<()> {
        self.inner.set_kv_cache(layer, keys, values)
    }
    fn argmax_last_row(&mut self, slot: Slot) -> Result<u32> {
        self.inner.argmax_last_row(slot)
    }
    fn recorder(&mut self) -> Option<&mut dyn StepRecorder> {
        Some(self)
    }
}

impl StepRecorder for Recording {
    fn allow_step_graph(&mut self) {
        self.allowed = true;
    }
    fn step_graph(&self) -> StepGraph {
        self.plan
    }
    fn set_step_reads(&mut self, reads: Option<&[Vec<Slot>]>) -> Result<StepGraph> {
        let Some(reads) = reads else {
            self.recorded = None;
            self.plan = StepGraph::Eager;
            return Ok(self.plan);
        };
        if self.plan == StepGraph::Replay && self.recorded.as_deref() != Some(reads) {
            self.recorded = None;
            self.plan = StepGraph::Capture;
        }
        if self.plan == StepGraph::Capture {
            self.planned = Some(reads.to_vec());
            self.taps.clear();
        }
        Ok(self.plan)
    }
    fn begin_graph_capture(&mut self) -> Result<()> {
        assert_eq!(self.plan, StepGraph::Capture);
        Ok(())
    }
    fn record_scope_reads(&mut self, scope: usize) -> Result<()> {
        let slots = self.planned.as_ref().expect("reads planned before recording")[scope].clone();
        for slot in slots {
            let t = self.inner.read(slot)?;
            self.taps.push((slot, t));
        }
        Ok(())
    }
    fn end_graph_capture(&mut self, failure: Option<String>) -> Result<bool> {
        assert!(failure.is_none(), "{failure:?}");
        self.recorded = self.planned.take();
        self.logits = Some(self.inner.read(Slot::LmHead)?);
        self.counts.lock().unwrap().recordings += 1;
        self.plan = StepGraph::Replay;
        Ok(true)
    }
    fn keep_replay(&mut self, reads: Option<&[Vec<Slot>]>) -> Result<bool> {
        let same = reads.is_some() && reads == self.recorded.as_deref();
        if !same {
            self.counts.lock().unwrap().replays -= 1;
        }
        Ok(same)
    }
    fn replay_step(&mut self) -> Result<()> {
        assert_eq!(self.plan, StepGraph::Replay);
        self.counts.lock().unwrap().replays += 1;
        self.cursor = Some(0);
        // What the next step needs of this one: a cache row per layer
        // (the last one again) and logits.
        for layer in 0..self.layers {
            let (k, v) = self.inner.kv_cache(layer)?;
            let grow = |t: &HostTensor| {
                let (rows, width) = (t.shape[0], t.shape[1]);
                let mut values = t.as_f32().unwrap().to_vec();
                values.extend_from_within((rows - 1) * width..);
                HostTensor::f32(vec![rows + 1, width], values)
            };
            self.inner.set_kv_cache(layer, &grow(&k), &grow(&v))?;
        }
        self.inner.write(Slot::LmHead, self.logits.as_ref().expect("recorded"))
    }
    fn graph_replays(&self) -> usize {
        self.counts.lock().unwrap().replays
    }
    fn end_step_reads(&mut self) -> Result<()> {
        let read = self.cursor.take().expect("after a replay");
        assert_eq!(read, self.taps.len(), "every recorded copy was read");
        Ok(())
    }
    fn can_gather_reads(&self) -> bool {
        false
    }
    fn gathers_reads(&self) -> bool {
        self.plan != StepGraph::Eager
    }
    fn observe_step_reads(&mut self) -> Result<()> {
        Ok(())
    }
}

/// (step, layer, stage, values) of one read.
type Read = (usize, Option<usize>, S, HostTensor);

/// Reads in the order the observers made them.
type Seen = Arc<Mutex<Vec<Read>>>;

/// Attaches a scope observer to each scope that reads `stages` (those the
/// scope produced) at the steps `steps` accepts.
fn observe(forward: &mut Forward, stages: &[S], steps: fn(usize) -> bool) -> Seen {
    let seen: Seen = Arc::default();
    for scope in [ForwardSchedule::Prologue, ForwardSchedule::Layer, ForwardSchedule::Epilogue] {
        let mine: Vec<S> = stages.iter().copied().filter(|&s| ForwardSchedule::of(s) == scope).collect();
        let seen = seen.clone();
        forward.add_scope_observer(scope, move |mut ctx: HookCtx| {
            let step = ctx.step().step;
            if !steps(step) {
                return;
            }
            for &stage in &mine {
                if !ctx.produced(stage) {
                    continue;
                }
                if let Some(t) = ctx.read_async(stage) {
                    let layer = ctx.layer();
                    seen.lock().unwrap().push((step, layer, stage, t.wait().unwrap()));
                }
            }
        });
    }
    seen
}

const STAGES: &[S] = &[S::Embedding, S::AttnScores, S::MoeRouterIndices, S::MoeFfnOut, S::PostFfnResidual, S::LmHead];

fn run(graphs: bool, steps: fn(usize) -> bool) -> (Vec<Read>, Counts) {
    let model = Model::synthetic("tiny-moe", 3, Some(2)).unwrap();
    let counts = Arc::new(Mutex::new(Counts::default()));
    let backend: Box<dyn Backend> = if graphs {
        Box::new(Recording::new(&model, counts.clone()))
    } else {
        Box::new(CpuBackend::new(model.store.clone(), Some(1)).unwrap())
    };
    let mut forward = Forward::new(&model, backend);
    let seen = observe(&mut forward, STAGES, steps);
    forward.generate(&[5, 9, 200, 31], 7, &mut |_| {}).unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let counts = std::mem::take(&mut *counts.lock().unwrap());
    (seen, counts)
}

fn labels(seen: &[Read]) -> Vec<(usize, Option<usize>, S)> {
    seen.iter().map(|(s, l, st, _)| (*s, *l, *st)).collect()
}

#[test]
fn scope_observers_read_the_same_stages_from_replayed_steps_as_from_eager_ones() {
    let all = |_| true;
    let (eager, _) = run(false, all);
    let (replayed, counts) = run(true, all);
    // Steps 0 and 1 eager, step 2 recorded (then replayed), 3-6 replayed.
    assert_eq!((counts.recordings, counts.replays), (1, 5));
    assert_eq!(labels(&replayed), labels(&eager));
    assert_eq!(eager.iter().filter(|e| e.0 == 4).count(), 1 + 2 * 4 + 1, "{:?}", labels(&eager));
    // The recorded step's copies are that step's values.
    for (r, e) in replayed.iter().zip(&eager).filter(|(r, _)| r.0 <= 2) {
        assert_eq!(r.3, e.3, "step {} layer {:?} {}", r.0, r.1, r.2);
    }
}

#[test]
fn a_step_that_reads_other_stages_is_recorded_again() {
    // Reads at steps 0-3 and 6: step 4 reads nothing (recorded again
    // without copies), step 6 reads again (recorded again with them).
    let some = |step| step <= 3 || step == 6;
    let (eager, _) = run(false, some);
    let (replayed, counts) = run(true, some);
    assert_eq!(labels(&replayed), labels(&eager));
    assert_eq!((counts.recordings, counts.replays), (3, 5), "steps 2, 4 and 6 are recorded");
}
