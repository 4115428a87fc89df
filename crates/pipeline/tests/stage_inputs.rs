//! [`SaveTensorStage::inputs`] against what the stage systems read: a
//! forward pass (prompt and decode steps) through a backend that logs every
//! operation's input and output slots, on a model of each kind of layer
//! (dense; MoE with q/k norm; MoE with q/k/v biases and a gated shared
//! expert). Each stage must read exactly the inputs the table lists, so a
//! check of another engine's capture knows which captured tensors a stage
//! was fed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use pipeline::backend::{AttentionShape, QkNormArgs, RopeArgs, SharedTerm, Slot};
use pipeline::weights::WeightId;
use pipeline::{Backend, CpuBackend, Forward, HostTensor, Model, Result};
use stage_types::{SaveTensorStage as S, StageInput};

/// Per output stage, every slot an operation producing it read.
type Reads = Arc<Mutex<BTreeMap<S, BTreeSet<S>>>>;

struct Logging {
    inner: CpuBackend,
    reads: Reads,
}

impl Logging {
    fn note(&self, outs: &[Slot], ins: &[Slot]) {
        let mut reads = self.reads.lock().unwrap();
        for out in outs {
            reads.entry(*out).or_default().extend(ins.iter().copied());
        }
    }
}

impl Backend for Logging {
    fn name(&self) -> &'static str {
        "logging-cpu"
    }
    fn dtype(&self) -> &'static str {
        self.inner.dtype()
    }
    fn begin_step(&mut self, tokens: &[u32], start_position: usize) -> Result<()> {
        self.inner.begin_step(tokens, start_position)
    }
    fn embedding(&mut self, table: WeightId, out: Slot) -> Result<()> {
        self.note(&[out], &[]);
        self.inner.embedding(table, out)
    }
    fn rms_norm(&mut self, input: Slot, weight: WeightId, eps: f64, out: Slot) -> Result<()> {
        self.note(&[out], &[input]);
        self.inner.rms_norm(input, weight, eps, out)
    }
    fn linear(&mut self, input: Slot, weights: &[WeightId], out: Slot) -> Result<()> {
        self.note(&[out], &[input]);
        self.inner.linear(input, weights, out)
    }
    fn add_bias(&mut self, input: Slot, biases: &[WeightId], out: Slot) -> Result<()> {
        self.note(&[out], &[input]);
        self.inner.add_bias(input, biases, out)
    }
    fn qk_norm(&mut self, input: Slot, args: QkNormArgs, out: Slot) -> Result<()> {
        self.note(&[out], &[input]);
        self.inner.qk_norm(input, args, out)
    }
    fn rope(&mut self, input: Slot, args: RopeArgs, out: Slot) -> Result<()> {
        self.note(&[out], &[input]);
        self.inner.rope(input, args, out)
    }
    fn append_kv(&mut self, layer: usize, k: Slot, v: Slot, v_col: usize) -> Result<()> {
        // The keys reach the scores, the values the attention, through the
        // cache.
        self.note(&[S::AttnScores], &[k]);
        self.note(&[S::Attention], &[v]);
        self.inner.append_kv(layer, k, v, v_col)
    }
    fn attn_scores(&mut self, layer: usize, q: Slot, shape: AttentionShape, out: Slot) -> Result<()> {
        self.note(&[out], &[q]);
        self.inner.attn_scores(layer, q, shape, out)
    }
    fn attn_softmax(&mut self, scores: Slot, out: Slot) -> Result<()> {
        self.note(&[out], &[scores]);
        self.inner.attn_softmax(scores, out)
    }
    fn attention(&mut self, layer: usize, probs: Slot, shape: AttentionShape, out: Slot) -> Result<()> {
        self.note(&[out], &[probs]);
        self.inner.attention(layer, probs, shape, out)
    }
    fn add(&mut self, a: Slot, b: Slot, out: Slot) -> Result<()> {
        self.note(&[out], &[a, b]);
        self.inner.add(a, b, out)
    }
    fn silu(&mut self, input: Slot, out: Slot) -> Result<()> {
        self.note(&[out], &[input]);
        self.inner.silu(input, out)
    }
    fn sigmoid(&mut self, input: Slot, out: Slot) -> Result<()> {
        self.note(&[out], &[input]);
        self.inner.sigmoid(input, out)
    }
    fn mul(&mut self, a: Slot, b: Slot, out: Slot) -> Result<()> {
        self.note(&[out], &[a, b]);
        self.inner.mul(a, b, out)
    }
    fn swiglu(&mut self, gate: Slot, up: Slot, out: Slot) -> Result<()> {
        self.note(&[out], &[gate, up]);
        self.inner.swiglu(gate, up, out)
    }
    fn router_top_k(&mut self, logits: Slot, k: usize, norm: bool, weights: Slot, indices: Slot) -> Result<()> {
        self.note(&[weights, indices], &[logits]);
        self.inner.router_top_k(logits, k, norm, weights, indices)
    }
    fn expert_linear(&mut self, input: Slot, indices: Slot, experts: &[WeightId], out: Slot) -> Result<()> {
        self.note(&[out], &[input, indices]);
        self.inner.expert_linear(input, indices, experts, out)
    }
    fn moe_combine(&mut self, expert_out: Slot, weights: Slot, shared: Option<SharedTerm>, out: Slot) -> Result<()> {
        let mut ins = vec![expert_out, weights];
        ins.extend(shared.iter().flat_map(|s| std::iter::once(s.out).chain(s.weight)));
        self.note(&[out], &ins);
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
}

#[test]
fn every_stage_reads_exactly_the_inputs_the_table_lists() {
    for preset in ["tiny-dense", "tiny-moe", "tiny-qwen2-moe"] {
        let model = Model::synthetic(preset, 3, None).unwrap();
        let reads: Reads = Arc::default();
        let backend = Logging { inner: CpuBackend::new(model.store.clone(), Some(1)).unwrap(), reads: reads.clone() };
        let mut forward = Forward::new(&model, Box::new(backend));
        forward.generate(&[1, 17, 42, 99], 3, &mut |_| {}).unwrap();
        // Every layer of these presets has the same parts.
        let traits = model.config.layer_traits(0);
        let reads = reads.lock().unwrap();
        let mut checked = 0;
        for &stage in S::ALL.iter().filter(|s| s.applies_to(traits)) {
            let mut listed = BTreeSet::new();
            for input in stage.inputs(traits) {
                match input {
                    StageInput::Stage(s) => {
                        listed.insert(s);
                    }
                    // The embedding (layer 0), or the previous layer's output.
                    StageInput::ScopeInput => {
                        listed.extend([S::Embedding, S::PostFfnResidual]);
                    }
                    StageInput::EarlierKeysAndValues => {}
                }
            }
            let read = reads.get(&stage).cloned().unwrap_or_default();
            let read: BTreeSet<S> = if listed.contains(&S::Embedding) {
                // A scope input is one of the two, by layer.
                read.into_iter().chain([S::Embedding, S::PostFfnResidual]).collect()
            } else {
                read
            };
            assert_eq!(read, listed, "{preset}: {stage} reads {read:?}, the table lists {listed:?}");
            checked += 1;
        }
        assert!(checked >= 20, "{preset}: only {checked} stages");
    }
}
