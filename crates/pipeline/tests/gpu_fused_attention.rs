//! The fused attention of many-row steps (`attention_fused_f32`, and
//! `attention_fused_mma` in Bf16 mode when hd % 16 == 0) against the three
//! unfused kernels and the CPU backend: its output has the same bits
//! whether or not attn_scores and attn_softmax are read; the probabilities
//! it materialises agree with the unfused softmax to rounding; on CUDA
//! cores its scores are the unfused kernel's bit for bit and its output is
//! what the unfused softmax·V computes from its probabilities, bit for bit
//! (tensor cores sum in another order: within rounding). Awkward sizes (hd
//! = 18, GQA 3/1, T = 70 from position 0; hd = 128, GQA 4/2, T = 33 after
//! 50 cached positions; hd = 64, GQA 4/1, T = 150: three blocks of 64
//! rows, the last partly filled), F32 and Bf16, outputs poisoned (NaN)
//! before each run, one q row NaN. GPU only (MOETRACE_GPU=1).
#![cfg(feature = "cuda")]

mod common;

use std::sync::Arc;

use pipeline::backend::cuda::CudaPrecision;
use pipeline::backend::{AttentionShape, Backend};
use pipeline::weights::{WeightStore, synthetic_value, tensor_key};
use pipeline::{CpuBackend, CudaBackend, HostTensor};
use stage_types::SaveTensorStage as S;

fn random(name: &str, n: usize) -> Vec<f32> {
    let key = tensor_key(23, name);
    (0..n).map(|i| synthetic_value(key, i as u64, 0.0, 1.0)).collect()
}

/// One attention case: its inputs and sizes.
struct Case {
    t: usize,
    start: usize,
    shape: AttentionShape,
    q: HostTensor,
    k: HostTensor,
    v: HostTensor,
    cached_k: HostTensor,
    cached_v: HostTensor,
}

impl Case {
    fn new(t: usize, start: usize, shape: AttentionShape, round: bool) -> Self {
        let r = |name: &str, n| -> Vec<f32> {
            let v = random(&format!("{name}{t}.{start}"), n);
            if round { v.into_iter().map(|x| half::bf16::from_f32(x).to_f32()).collect() } else { v }
        };
        let (q_width, kv_width) = (shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim);
        let mut q = r("q", t * q_width);
        // A NaN in one row: that row's probabilities and output are NaN.
        q[5 * q_width + 3] = f32::NAN;
        Case {
            t,
            start,
            shape,
            q: HostTensor::f32(vec![t, q_width], q),
            k: HostTensor::f32(vec![t, kv_width], r("k", t * kv_width)),
            v: HostTensor::f32(vec![t, kv_width], r("v", t * kv_width)),
            cached_k: HostTensor::f32(vec![start, kv_width], r("ck", start * kv_width)),
            cached_v: HostTensor::f32(vec![start, kv_width], r("cv", start * kv_width)),
        }
    }

    /// Begins the step on `b` with the cache and inputs in place.
    fn begin(&self, b: &mut dyn Backend) {
        if self.start > 0 {
            b.set_kv_cache(0, &self.cached_k, &self.cached_v).unwrap();
        }
        let tokens = vec![1u32; self.t];
        b.begin_step(&tokens, self.start).unwrap();
        b.write(S::QPostRope, &self.q).unwrap();
        b.write(S::KPostRope, &self.k).unwrap();
        b.write(S::QkvMatmul, &self.v).unwrap();
        b.append_kv(0, S::KPostRope, S::QkvMatmul, 0).unwrap();
    }

    /// The three stages on `b`; `read` reads scores and probabilities
    /// between them. Returns (scores, probs, output).
    fn run(&self, b: &mut dyn Backend, read: bool) -> (Option<HostTensor>, Option<HostTensor>, HostTensor) {
        self.begin(b);
        b.attn_scores(0, S::QPostRope, self.shape, S::AttnScores).unwrap();
        let scores = read.then(|| b.read(S::AttnScores).unwrap());
        b.attn_softmax(S::AttnScores, S::AttnSoftmax).unwrap();
        let probs = read.then(|| b.read(S::AttnSoftmax).unwrap());
        b.attention(0, S::AttnSoftmax, self.shape, S::Attention).unwrap();
        (scores, probs, b.read(S::Attention).unwrap())
    }
}

fn bits(t: &HostTensor) -> Vec<u32> {
    t.as_f32().unwrap().iter().map(|x| x.to_bits()).collect()
}

/// rel_l2 over the entries that are finite in both, and whether the NaNs
/// are in the same places.
fn compare(a: &HostTensor, b: &HostTensor) -> (f64, bool) {
    assert_eq!(a.shape, b.shape);
    let (x, y) = (a.as_f32().unwrap(), b.as_f32().unwrap());
    let same_nans = x.iter().zip(y).all(|(p, q)| p.is_nan() == q.is_nan());
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (p, q) in x.iter().zip(y).filter(|(p, q)| p.is_finite() && q.is_finite()) {
        diff += (f64::from(*p) - f64::from(*q)).powi(2);
        norm += f64::from(*p).powi(2);
    }
    ((diff / norm.max(f64::MIN_POSITIVE)).sqrt(), same_nans)
}

#[test]
fn fused_attention_stores_the_bits_its_output_is_computed_from() {
    if !common::gpu_enabled() {
        return;
    }
    let store = Arc::new(WeightStore::default());
    let cases = [
        (70, 0, AttentionShape { heads: 3, kv_heads: 1, head_dim: 18 }),
        (33, 50, AttentionShape { heads: 4, kv_heads: 2, head_dim: 128 }),
        (150, 0, AttentionShape { heads: 4, kv_heads: 1, head_dim: 64 }),
    ];
    for precision in [CudaPrecision::F32, CudaPrecision::Bf16] {
        let round = precision == CudaPrecision::Bf16;
        for (t, start, shape) in cases {
            let case = Case::new(t, start, shape, round);
            let what = format!("{precision:?} T={t} pos={start} {shape:?}");
            let mut gpu = CudaBackend::with_weights(store.clone(), &[], 0, precision, &Default::default()).unwrap();
            gpu.set_poison(true);
            let (_, _, quiet) = case.run(&mut gpu, false);
            let (scores, probs, read) = case.run(&mut gpu, true);
            let (scores, probs) = (scores.unwrap(), probs.unwrap());
            assert_eq!(bits(&quiet), bits(&read), "{what}: the output changed when its stages were read");
            gpu.set_fused_attention(false);
            let (unfused_scores, unfused_probs, unfused) = case.run(&mut gpu, true);
            // Tensor cores: Bf16 mode with hd % 16 == 0.
            let mma = round && shape.head_dim.is_multiple_of(16);
            let unfused_scores = unfused_scores.unwrap();
            if mma {
                let (rel, same_nans) = compare(&scores, &unfused_scores);
                assert!(same_nans && rel <= 8e-3, "{what}: scores rel_l2 {rel:.2e}, NaNs alike {same_nans}");
            } else {
                assert_eq!(bits(&scores), bits(&unfused_scores), "{what}: scores differ from attn_scores_f32");
            }
            let (rel, same_nans) = compare(&probs, &unfused_probs.unwrap());
            let tolerance = if round { 8e-3 } else { 1e-6 };
            assert!(same_nans && rel <= tolerance, "{what}: probabilities rel_l2 {rel:.2e}, NaNs alike {same_nans}");
            let (rel, same_nans) = compare(&read, &unfused);
            assert!(same_nans && rel <= tolerance, "{what}: outputs rel_l2 {rel:.2e}, NaNs alike {same_nans}");
            // The unfused softmax·V of the materialised probabilities.
            case.begin(&mut gpu);
            gpu.write(S::AttnSoftmax, &probs).unwrap();
            gpu.attention(0, S::AttnSoftmax, shape, S::Attention).unwrap();
            let again = gpu.read(S::Attention).unwrap();
            if mma {
                let (rel, same_nans) = compare(&again, &read);
                assert!(same_nans && rel <= 8e-3, "{what}: against attention_f32 rel_l2 {rel:.2e}");
            } else {
                assert_eq!(bits(&read), bits(&again), "{what}: output differs from attention_f32 of its probabilities");
            }
            // The CPU backend.
            let mut cpu = CpuBackend::new(store.clone(), Some(2)).unwrap();
            let (_, _, reference) = case.run(&mut cpu, false);
            let (rel, same_nans) = compare(&reference, &read);
            let tolerance = if round { 2e-2 } else { 1e-6 };
            assert!(same_nans && rel <= tolerance, "{what}: against the CPU rel_l2 {rel:.2e}, NaNs alike {same_nans}");
            let nan_rows =
                read.as_f32().unwrap().chunks(shape.heads * shape.head_dim).filter(|r| r[0].is_nan()).count();
            assert_eq!(nan_rows, 1, "{what}: only the row with a NaN in q is NaN");
            let kernel = if mma { "tensor cores" } else { "CUDA cores" };
            eprintln!("{what} ({kernel}): ok, against the CPU rel_l2 {rel:.2e}");
        }
    }
}

#[test]
fn a_fused_stage_read_after_its_layer_names_why_it_is_gone() {
    if !common::gpu_enabled() {
        return;
    }
    let store = Arc::new(WeightStore::default());
    let shape = AttentionShape { heads: 2, kv_heads: 1, head_dim: 16 };
    let case = Case::new(20, 0, shape, false);
    let mut gpu = CudaBackend::with_weights(store, &[], 0, CudaPrecision::F32, &Default::default()).unwrap();
    case.run(&mut gpu, false);
    // The next layer's q replaces this one's: the lazy stages are gone.
    gpu.write(S::QPostRope, &case.q).unwrap();
    let err = gpu.read(S::AttnScores).unwrap_err().to_string();
    assert!(err.contains("fused attention") && err.contains("attn_scores"), "{err}");
}
