//! The CPU reference backend: f32 activations, f64 accumulation in every
//! reduction, weights read in their checkpoint dtype and converted on use,
//! and a private rayon pool whose size never changes a result. Given a
//! [`NumericContract`] other than the reference's, it keeps that contract
//! (weights and stage outputs rounded where it says), which is how bisect
//! measures the error a correct implementation of it makes.

mod attention;
pub mod device_products;
mod dot_many;
mod expert_parallel;
mod ggml_activations;
pub mod ggml_cuda;
mod grouped_router_ops;
pub mod grouped_routing;
pub mod known_bugs;
pub mod math;
mod mla;
mod moe;
mod oss;
mod tensor_parallel;

use std::sync::Arc;

use rayon::prelude::*;

use attention::{HeadDims, KvCache};

use super::contract::NumericContract;
use super::{AttentionShape, Backend, QkNormArgs, RopeArgs, SharedTerm, Slot};
use crate::error::{PipelineError, Result};
use crate::tensor::HostTensor;
use crate::weights::{WeightId, WeightStore, WeightTensor};

/// The CPU reference backend.
pub struct CpuBackend {
    store: Arc<WeightStore>,
    pool: rayon::ThreadPool,
    threads: usize,
    slots: Vec<Option<HostTensor>>,
    tokens: Vec<u32>,
    start_position: usize,
    caches: Vec<KvCache>,
    /// The rounding points kept (the reference's own by default; its
    /// `ggml_activations` converts activations before each dot product as
    /// llama.cpp's CPU path does: ggml_activations.rs).
    contract: NumericContract,
    /// A public bug this backend reproduces on purpose (a test target), or
    /// None: the reference.
    bug: Option<known_bugs::KnownBug>,
    /// Where the products run when not on this pool (the same bits), or
    /// None.
    products: Option<Arc<dyn device_products::DeviceProducts>>,
    /// The expert-parallel layout and expert count of the last dispatch
    /// (what the bugs between ranks need to know), or None.
    ranks: Option<(crate::parallel_config::ExpertParallel, usize)>,
}

impl CpuBackend {
    /// A backend over `store` using `threads` worker threads (all cores
    /// when `None`).
    pub fn new(store: Arc<WeightStore>, threads: Option<usize>) -> Result<Self> {
        let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        if threads == 0 {
            return Err(PipelineError::BadInput("the CPU backend needs at least 1 thread".into()));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("moetrace-cpu-{i}"))
            .build()
            .map_err(|e| PipelineError::BackendUnavailable(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(Self {
            store,
            pool,
            contract: NumericContract::REFERENCE,
            bug: None,
            products: None,
            ranks: None,
            threads,
            slots: vec![None; Slot::ALL.len()],
            tokens: Vec::new(),
            start_position: 0,
            caches: Vec::new(),
        })
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Turns llama.cpp's CPU numerics on or off (off by default): on, each
    /// projection's input rows are first converted as ggml's CPU path
    /// converts them for that weight's type (Q8_K for K-quants, Q8_0 for
    /// Q8_0, f16 and bf16 for those weights; ggml_activations.rs), so a
    /// GGUF model's CPU result is the one llama.cpp's CPU would compare.
    pub fn set_ggml_activations(&mut self, on: bool) {
        self.contract.ggml_activations = on.then_some(super::contract::GgmlPath::Cpu);
    }

    /// Reproduces `bug` from now on (a target for testing that moetrace
    /// finds it): the grouped router's bugs in its routing, a dropped
    /// shared expert in the MoE sum, a misread FP8 block scale in the
    /// weights it reads. Fails when the model has nothing the bug can
    /// touch (no FP8 kv_a_proj_with_mqa of more than one block in that
    /// layer).
    pub fn with_bug(mut self, bug: known_bugs::KnownBug) -> Result<Self> {
        if let known_bugs::KnownBug::Fp8NeighbourScale(layer) = bug {
            let name = format!("model.layers.{layer}.self_attn.kv_a_proj_with_mqa.weight");
            let store = crate::weights::fp8::with_neighbour_scale(&self.store, &name)
                .map_err(|why| PipelineError::BadInput(format!("CpuWithBug(Fp8NeighbourScale({layer})): {why}")))?;
            self.store = Arc::new(store);
        }
        if let known_bugs::KnownBug::Mxfp4ScaleOffByOne(layer, expert) = bug {
            let name = format!("model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight");
            let store = crate::weights::oss_experts::with_scale_off_by_one(&self.store, &name).map_err(|why| {
                PipelineError::BadInput(format!("CpuWithBug(Mxfp4ScaleOffByOne({layer}, {expert})): {why}"))
            })?;
            self.store = Arc::new(store);
        }
        self.bug = Some(bug);
        Ok(self)
    }

    /// Keeps `contract` from now on: weights are rounded as it multiplies
    /// them and every stage output (forced ones included) is stored as it
    /// stores them; accumulation stays f64. The CPU reference by default
    /// keeps [`NumericContract::REFERENCE`].
    pub fn with_contract(mut self, contract: NumericContract) -> Self {
        self.contract = contract;
        self
    }

    /// Computes the products on `products` where it takes them (the same
    /// bits: a reference whose products run on a device, `Cuda(dtype:
    /// F64)`); llama.cpp's CPU contract converts the inputs here first, and
    /// its CUDA contract's batched kernels stay here.
    pub fn with_device_products(mut self, products: Arc<dyn device_products::DeviceProducts>) -> Self {
        self.products = Some(products);
        self
    }

    /// The device products this backend uses, if any.
    pub fn device_products(&self) -> Option<&Arc<dyn device_products::DeviceProducts>> {
        self.products.as_ref()
    }

    /// `math::matmul_t` on the pool (or on the device products), the input
    /// rows converted first when llama.cpp's numerics are on.
    fn matmul(&self, inputs: &[&[f32]], w: &WeightTensor) -> Vec<f32> {
        if self.ggml_cuda_batched() {
            if let Some(out) = self.pool.install(|| ggml_cuda::matmul_mmq(inputs, w)) {
                return out;
            }
            if w.dtype == crate::weights::WeightDtype::F32 {
                return self.pool.install(|| ggml_cuda::matmul_tf32(inputs, w));
            }
        }
        let converted: Option<Vec<Vec<f32>>> = match self.contract.ggml_activations {
            Some(path) => inputs.iter().map(|x| ggml_activations::as_vec_dot_input(path, w.dtype, x)).collect(),
            None => None,
        };
        let rows: Vec<&[f32]> = match &converted {
            Some(rows) => rows.iter().map(Vec::as_slice).collect(),
            None => inputs.to_vec(),
        };
        if let Some(out) = self.products.as_ref().and_then(|p| p.matmul_t(&rows, w, self.contract.weights)) {
            return out;
        }
        self.pool.install(|| math::matmul_t_as(&rows, w, self.contract.weights))
    }

    /// Whether this step runs llama.cpp's batched CUDA kernels (a contract
    /// of llama.cpp's CUDA backend and more than 8 tokens: ggml_cuda.rs).
    fn ggml_cuda_batched(&self) -> bool {
        self.contract.ggml_activations == Some(super::contract::GgmlPath::Cuda) && ggml_cuda::batched(self.tokens.len())
    }

    fn slot(&self, slot: Slot) -> Result<&HostTensor> {
        self.slots[slot.index()]
            .as_ref()
            .ok_or_else(|| PipelineError::BadInput(format!("stage `{slot}` has not been computed in this step")))
    }

    /// The f32 data of a slot as rows of its last dimension: (rows, width, data).
    fn rows(&self, slot: Slot) -> Result<(usize, usize, &[f32])> {
        let t = self.slot(slot)?;
        let data = t
            .as_f32()
            .ok_or_else(|| PipelineError::BadInput(format!("stage `{slot}` holds int32, expected float32")))?;
        let width = t.shape.last().copied().unwrap_or(1);
        Ok((data.len() / width.max(1), width, data))
    }

    /// Stores a stage's output as the contract stores it.
    fn set(&mut self, slot: Slot, mut tensor: HostTensor) {
        self.contract.round_output(slot, &mut tensor);
        self.slots[slot.index()] = Some(tensor);
    }

    fn weight(&self, id: WeightId) -> Vec<f32> {
        let mut w = self.store.get(id).to_f32_vec();
        self.contract.round_weights(&mut w);
        w
    }

    fn check_width(&self, slot: Slot, width: usize, expected: usize, what: &str) -> Result<()> {
        if width != expected {
            return Err(PipelineError::BadInput(format!(
                "stage `{slot}` has rows of {width} but {what} needs {expected}"
            )));
        }
        Ok(())
    }

    fn elementwise(&mut self, a: Slot, b: Slot, out: Slot, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<()> {
        let ta = self.slot(a)?;
        let tb = self.slot(b)?;
        if ta.shape != tb.shape {
            return Err(PipelineError::BadInput(format!(
                "stages `{a}` {:?} and `{b}` {:?} differ in shape",
                ta.shape, tb.shape
            )));
        }
        let (_, _, xa) = self.rows(a)?;
        let (_, _, xb) = self.rows(b)?;
        let data = xa.iter().zip(xb).map(|(&x, &y)| f(x, y)).collect();
        let shape = ta.shape.clone();
        self.set(out, HostTensor::f32(shape, data));
        Ok(())
    }

    fn cache(&self, layer: usize) -> Result<&KvCache> {
        self.caches.get(layer).filter(|c| c.len == self.start_position + self.tokens.len()).ok_or_else(|| {
            PipelineError::BadInput(format!("the KV cache of layer {layer} was not filled for this step"))
        })
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        self.products.as_ref().map_or("cpu", |p| p.backend_name())
    }

    fn numeric_contract(&self) -> NumericContract {
        self.contract
    }

    fn dtype(&self) -> &'static str {
        match (self.contract.ggml_activations, self.contract.activations) {
            (Some(super::contract::GgmlPath::Cpu), _) => "f32, activations as llama.cpp's CPU (q8_k, q8_0, f16, bf16)",
            (Some(super::contract::GgmlPath::Cuda), _) => "f32, activations as llama.cpp's CUDA (q8_1, f16, bf16)",
            (None, super::contract::Precision::Bf16) => "f32 emulating bf16 (weights and activations rounded)",
            (None, super::contract::Precision::F32) => "f32",
        }
    }

    fn begin_step(&mut self, tokens: &[u32], start_position: usize) -> Result<()> {
        for (layer, cache) in self.caches.iter_mut().enumerate() {
            if cache.len < start_position {
                return Err(PipelineError::BadInput(format!(
                    "step starts at position {start_position} but the KV cache of layer {layer} holds only {}",
                    cache.len
                )));
            }
            cache.len = start_position;
            cache.k.truncate(start_position * cache.k_width);
            cache.v.truncate(start_position * cache.v_width);
        }
        if self.caches.is_empty() && start_position > 0 {
            return Err(PipelineError::BadInput(format!(
                "step starts at position {start_position} but the KV cache is empty"
            )));
        }
        self.tokens = tokens.to_vec();
        self.start_position = start_position;
        self.slots.iter_mut().for_each(|s| *s = None);
        Ok(())
    }

    fn mla(&mut self) -> Option<&mut dyn super::mla::MlaOps> {
        Some(self)
    }

    fn oss(&mut self) -> Option<&mut dyn super::oss::OssOps> {
        Some(self)
    }

    fn expert_parallel(&mut self) -> Option<&mut dyn super::expert_parallel::ExpertParallelOps> {
        Some(self)
    }

    fn tensor_parallel(&mut self) -> Option<&mut dyn super::tensor_parallel::TensorParallelOps> {
        Some(self)
    }

    fn grouped_router(&mut self) -> Option<&mut dyn super::grouped_router::GroupedRouting> {
        Some(self)
    }

    fn embedding(&mut self, table: WeightId, out: Slot) -> Result<()> {
        let w = self.store.get(table);
        let (vocab, h) = (w.shape[0], w.row_len());
        let mut data = vec![0.0f32; self.tokens.len() * h];
        for (row, &token) in data.chunks_mut(h).zip(&self.tokens) {
            if token as usize >= vocab {
                return Err(PipelineError::BadInput(format!(
                    "token id {token} is out of range: the vocabulary has {vocab} tokens (0..{vocab})"
                )));
            }
            w.read_row(token as usize, row);
            self.contract.round_weights(row);
        }
        self.set(out, HostTensor::f32(vec![self.tokens.len(), h], data));
        Ok(())
    }

    fn rms_norm(&mut self, input: Slot, weight: WeightId, eps: f64, out: Slot) -> Result<()> {
        let w = self.weight(weight);
        let (rows, width, x) = self.rows(input)?;
        self.check_width(input, width, w.len(), "the norm weight")?;
        let mut data = vec![0.0f32; x.len()];
        self.pool.install(|| {
            data.par_chunks_mut(width).zip(x.par_chunks(width)).for_each(|(o, xr)| math::rms_norm_row(xr, &w, eps, o));
        });
        self.set(out, HostTensor::f32(vec![rows, width], data));
        Ok(())
    }

    fn linear(&mut self, input: Slot, weights: &[WeightId], out: Slot) -> Result<()> {
        let (rows, width, x) = self.rows(input)?;
        let inputs: Vec<&[f32]> = x.chunks(width).collect();
        let total: usize = weights.iter().map(|&id| self.store.get(id).shape[0]).sum();
        let mut parts = Vec::with_capacity(weights.len());
        for &id in weights {
            let w = self.store.get(id);
            self.check_width(input, width, w.row_len(), &format!("weight `{}`", w.describe()))?;
            parts.push((w.shape[0], self.matmul(&inputs, w)));
        }
        // One matrix's product is the output as it is; several are laid
        // side by side, row by row.
        let data = match parts.as_mut_slice() {
            [(_, only)] => std::mem::take(only),
            _ => {
                let mut data = vec![0.0f32; rows * total];
                let mut col = 0;
                for (n, part) in &parts {
                    for (dst, src) in data.chunks_mut(total).zip(part.chunks(*n)) {
                        dst[col..col + n].copy_from_slice(src);
                    }
                    col += n;
                }
                data
            }
        };
        self.set(out, HostTensor::f32(vec![rows, total], data));
        Ok(())
    }

    fn add_bias(&mut self, input: Slot, biases: &[WeightId], out: Slot) -> Result<()> {
        let bias: Vec<f32> = biases.iter().flat_map(|&id| self.weight(id)).collect();
        let (rows, width, x) = self.rows(input)?;
        self.check_width(input, width, bias.len(), "the biases")?;
        let data =
            x.chunks(width).flat_map(|r| r.iter().zip(&bias).map(|(&a, &b)| (a as f64 + b as f64) as f32)).collect();
        self.set(out, HostTensor::f32(vec![rows, width], data));
        Ok(())
    }

    fn qk_norm(&mut self, input: Slot, args: QkNormArgs, out: Slot) -> Result<()> {
        let (qw, kw) = (self.weight(args.q_weight), self.weight(args.k_weight));
        let (rows, width, x) = self.rows(input)?;
        let hd = args.head_dim;
        let out_width = (args.q_heads + args.kv_heads) * hd;
        if width < out_width || qw.len() != hd || kw.len() != hd {
            return Err(PipelineError::BadInput(format!(
                "qk_norm needs rows of at least {out_width} and weights of {hd}; got {width}, {}, {}",
                qw.len(),
                kw.len()
            )));
        }
        let mut data = vec![0.0f32; rows * out_width];
        for (o, xr) in data.chunks_mut(out_width).zip(x.chunks(width)) {
            for h in 0..args.q_heads + args.kv_heads {
                let w = if h < args.q_heads { &qw } else { &kw };
                math::rms_norm_row(&xr[h * hd..(h + 1) * hd], w, args.eps, &mut o[h * hd..(h + 1) * hd]);
            }
        }
        self.set(out, HostTensor::f32(vec![rows, out_width], data));
        Ok(())
    }

    fn rope(&mut self, input: Slot, args: RopeArgs, out: Slot) -> Result<()> {
        let RopeArgs { col_start, heads, head_dim, theta } = args;
        let (rows, width, x) = self.rows(input)?;
        let out_width = heads * head_dim;
        if col_start + out_width > width {
            return Err(PipelineError::BadInput(format!(
                "rope reads columns {col_start}..{} of `{input}` but its rows have {width}",
                col_start + out_width
            )));
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half).map(|i| theta.powf(-2.0 * i as f64 / head_dim as f64)).collect();
        let mut data = vec![0.0f32; rows * out_width];
        for (t, (o, xr)) in data.chunks_mut(out_width).zip(x.chunks(width)).enumerate() {
            let position = (self.start_position + t) as f64;
            let xr = &xr[col_start..col_start + out_width];
            for h in 0..heads {
                let (xh, oh) = (&xr[h * head_dim..(h + 1) * head_dim], &mut o[h * head_dim..(h + 1) * head_dim]);
                for i in 0..half {
                    let (sin, cos) = (position * inv_freq[i]).sin_cos();
                    let (a, b) = (xh[i] as f64, xh[i + half] as f64);
                    oh[i] = (a * cos - b * sin) as f32;
                    oh[i + half] = (b * cos + a * sin) as f32;
                }
            }
        }
        self.set(out, HostTensor::f32(vec![rows, out_width], data));
        Ok(())
    }

    fn append_kv(&mut self, layer: usize, k: Slot, v: Slot, v_col: usize) -> Result<()> {
        let (k_rows, kw, kd) = self.rows(k)?;
        let (v_rows, vw, vd) = self.rows(v)?;
        if v_rows != k_rows || v_col + kw > vw {
            return Err(PipelineError::BadInput(format!(
                "append_kv: `{k}` is [{k_rows},{kw}] but `{v}` is [{v_rows},{vw}] (values from column {v_col})"
            )));
        }
        let values: Vec<f32> = vd.chunks(vw).flat_map(|r| r[v_col..v_col + kw].iter().copied()).collect();
        let keys = kd.to_vec();
        self.append_cache(layer, keys, values, kw, kw)
    }

    fn attn_scores(&mut self, layer: usize, q: Slot, shape: AttentionShape, out: Slot) -> Result<()> {
        let AttentionShape { heads, kv_heads, head_dim } = shape;
        let heads = HeadDims { heads, kv_heads, qk: head_dim, v: head_dim };
        self.scores_with(layer, q, heads, 1.0 / (head_dim as f64).sqrt(), None, out)
    }

    fn attn_softmax(&mut self, scores: Slot, out: Slot) -> Result<()> {
        let t = self.slot(scores)?;
        let shape = t.shape.clone();
        if shape.len() != 3 {
            return Err(PipelineError::BadInput(format!("attn_softmax needs [nh,T,P] scores, got {shape:?}")));
        }
        let (t_len, p_len) = (shape[1], shape[2]);
        let start = self.start_position;
        let mut data = self.rows(scores)?.2.to_vec();
        for (r, row) in data.chunks_mut(p_len).enumerate() {
            math::softmax_prefix(row, (start + r % t_len + 1).min(p_len));
        }
        self.set(out, HostTensor::f32(shape, data));
        Ok(())
    }

    fn attention(&mut self, layer: usize, probs: Slot, shape: AttentionShape, out: Slot) -> Result<()> {
        let AttentionShape { heads, kv_heads, head_dim } = shape;
        self.attention_with(layer, probs, HeadDims { heads, kv_heads, qk: head_dim, v: head_dim }, out)
    }

    fn add(&mut self, a: Slot, b: Slot, out: Slot) -> Result<()> {
        self.elementwise(a, b, out, |x, y| (x as f64 + y as f64) as f32)
    }

    fn silu(&mut self, input: Slot, out: Slot) -> Result<()> {
        let t = self.slot(input)?;
        let shape = t.shape.clone();
        let data = self.rows(input)?.2.iter().map(|&x| math::silu(x)).collect();
        self.set(out, HostTensor::f32(shape, data));
        Ok(())
    }

    fn sigmoid(&mut self, input: Slot, out: Slot) -> Result<()> {
        let shape = self.slot(input)?.shape.clone();
        let data = self.rows(input)?.2.iter().map(|&x| (1.0 / (1.0 + (-(x as f64)).exp())) as f32).collect();
        self.set(out, HostTensor::f32(shape, data));
        Ok(())
    }

    fn mul(&mut self, a: Slot, b: Slot, out: Slot) -> Result<()> {
        self.elementwise(a, b, out, |x, y| (x as f64 * y as f64) as f32)
    }

    fn swiglu(&mut self, gate: Slot, up: Slot, out: Slot) -> Result<()> {
        self.elementwise(gate, up, out, |g, u| {
            let g = g as f64;
            (g / (1.0 + (-g).exp()) * u as f64) as f32
        })
    }

    fn router_top_k(
        &mut self,
        logits: Slot,
        k: usize,
        normalise: bool,
        weights_out: Slot,
        indices_out: Slot,
    ) -> Result<()> {
        let (rows, experts, x) = self.rows(logits)?;
        if k == 0 || k > experts {
            return Err(PipelineError::BadInput(format!("top-{k} of {experts} experts is impossible")));
        }
        let mut weights = Vec::with_capacity(rows * k);
        let mut indices = Vec::with_capacity(rows * k);
        for row in x.chunks(experts) {
            let (w, i) = math::top_k(row, k, normalise);
            weights.extend(w);
            indices.extend(i);
        }
        self.set(weights_out, HostTensor::f32(vec![rows, k], weights));
        self.set(indices_out, HostTensor::i32(vec![rows, k], indices));
        Ok(())
    }

    fn expert_linear(&mut self, input: Slot, indices: Slot, experts: &[WeightId], out: Slot) -> Result<()> {
        self.expert_projection(input, indices, experts, out)
    }

    fn moe_combine(&mut self, expert_out: Slot, weights: Slot, shared: Option<SharedTerm>, out: Slot) -> Result<()> {
        let shared = shared.filter(|_| self.bug != Some(known_bugs::KnownBug::SharedExpertDropped));
        self.weighted_sum(expert_out, weights, shared, out)
    }

    fn read(&mut self, slot: Slot) -> Result<HostTensor> {
        self.slot(slot).cloned()
    }

    fn write(&mut self, slot: Slot, tensor: &HostTensor) -> Result<()> {
        self.set(slot, tensor.clone());
        Ok(())
    }

    fn kv_cache(&mut self, layer: usize) -> Result<(HostTensor, HostTensor)> {
        let c = self
            .caches
            .get(layer)
            .ok_or_else(|| PipelineError::BadInput(format!("layer {layer} has no KV cache yet")))?;
        Ok((HostTensor::f32(vec![c.len, c.k_width], c.k.clone()), HostTensor::f32(vec![c.len, c.v_width], c.v.clone())))
    }

    fn set_kv_cache(&mut self, layer: usize, keys: &HostTensor, values: &HostTensor) -> Result<()> {
        let (Some(k), Some(v)) = (keys.as_f32(), values.as_f32()) else {
            return Err(PipelineError::BadInput("a KV cache holds float32".into()));
        };
        if keys.shape.len() != 2 || values.shape.len() != 2 || keys.shape[0] != values.shape[0] {
            return Err(PipelineError::BadInput(format!(
                "KV cache keys {:?} and values {:?} must both be [len, width]",
                keys.shape, values.shape
            )));
        }
        if self.caches.len() <= layer {
            self.caches.resize_with(layer + 1, KvCache::default);
        }
        self.caches[layer] = KvCache {
            k: k.to_vec(),
            v: v.to_vec(),
            k_width: keys.shape[1],
            v_width: values.shape[1],
            len: keys.shape[0],
        };
        Ok(())
    }

    fn argmax_last_row(&mut self, slot: Slot) -> Result<u32> {
        let (rows, width, x) = self.rows(slot)?;
        if rows == 0 {
            return Err(PipelineError::BadInput(format!("stage `{slot}` is empty")));
        }
        Ok(super::argmax(&x[(rows - 1) * width..]) as u32)
    }
}
