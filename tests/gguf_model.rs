//! A GGUF model whose K-quant rows span several super-blocks and whose
//! expert width differs from the hidden size (the fixture's rows are one
//! super-block and I = H; Qwen3-30B-A3B's are 8 and I = 768 != H = 2048):
//! built here byte by byte (Q8_0 embedding, Q4_K/Q5_K/Q6_K projections,
//! stacked experts [H, I, E] and [I, H, E], F32 norms and router), loaded
//! through `model: Path("x.gguf")`, and run on the CPU against the same
//! weights dequantized block by block into Hugging Face-named f32 tensors
//! with a config.json written by hand: the logits and the greedy tokens
//! agree bit for bit. So the loader's dimension order, expert split and
//! names, and the row reader's walk over several blocks, are the ones a
//! separate reading of the same bytes gives.

use half::f16;
use moetrace_tests::{gguf_bytes, gguf_string, scratch};
use pipeline::weights::gguf::GgmlType;
use pipeline::weights::quant::dequantize;
use pipeline::weights::{WeightDtype, WeightStore, WeightTensor, synthetic_value, tensor_key};
use pipeline::{CpuBackend, Forward, Model, ModelConfig};

const H: usize = 512;
const HEADS: usize = 4;
const KV: usize = 2;
const HD: usize = 64;
const E: usize = 4;
const K: usize = 2;
const I: usize = 256;
const V: usize = 96;
const LAYERS: usize = 2;

/// One tensor: GGUF name, ggml dims (row length first), type, bytes.
struct Tensor {
    name: String,
    dims: Vec<u64>,
    kind: GgmlType,
    bytes: Vec<u8>,
}

/// Bytes of `n` values as `kind`: F32 values near `mean`, or random blocks
/// whose f16 scales are small and finite.
fn tensor(name: &str, dims: &[usize], kind: GgmlType, mean: f32) -> Tensor {
    let n: usize = dims.iter().product();
    let key = tensor_key(5, name);
    let byte = |i: usize| (synthetic_value(key, i as u64, 0.0, 1.0).to_bits() >> 7) as u8;
    let bytes = if kind == GgmlType::F32 {
        (0..n).flat_map(|i| (mean + 0.1 * synthetic_value(key, i as u64, 0.0, 1.0)).to_le_bytes()).collect()
    } else {
        let (len, size) = (kind.block_len().unwrap() as usize, kind.block_bytes().unwrap() as usize);
        let mut bytes: Vec<u8> = (0..n / len * size).map(byte).collect();
        for block in bytes.chunks_mut(size) {
            // Where each block type keeps its f16 scale (and Q4_K/Q5_K's
            // min), and a scale that keeps weights within about ±0.5.
            let (d, dmin, scale) = match kind {
                GgmlType::Q8_0 => (0, None, 0.004),
                GgmlType::Q4_K | GgmlType::Q5_K => (0, Some(2), 0.0005),
                GgmlType::Q6_K => (208, None, 0.0001),
                other => panic!("{}", other.name()),
            };
            block[d..d + 2].copy_from_slice(&f16::from_f32(scale).to_bits().to_le_bytes());
            if let Some(m) = dmin {
                block[m..m + 2].copy_from_slice(&f16::from_f32(scale).to_bits().to_le_bytes());
            }
        }
        bytes
    };
    Tensor { name: name.into(), dims: dims.iter().map(|&d| d as u64).collect(), kind, bytes }
}

fn tensors() -> Vec<Tensor> {
    use GgmlType as G;
    let mut out = vec![tensor("token_embd.weight", &[H, V], G::Q8_0, 0.0)];
    for l in 0..LAYERS {
        let b = |s: &str| format!("blk.{l}.{s}");
        out.extend([
            tensor(&b("attn_norm.weight"), &[H], G::F32, 1.0),
            tensor(&b("attn_q.weight"), &[H, HEADS * HD], G::Q4_K, 0.0),
            tensor(&b("attn_k.weight"), &[H, KV * HD], G::Q5_K, 0.0),
            tensor(&b("attn_v.weight"), &[H, KV * HD], G::Q6_K, 0.0),
            tensor(&b("attn_output.weight"), &[HEADS * HD, H], G::Q4_K, 0.0),
            tensor(&b("attn_q_norm.weight"), &[HD], G::F32, 1.0),
            tensor(&b("attn_k_norm.weight"), &[HD], G::F32, 1.0),
            tensor(&b("ffn_norm.weight"), &[H], G::F32, 1.0),
            tensor(&b("ffn_gate_inp.weight"), &[H, E], G::F32, 0.0),
            tensor(&b("ffn_gate_exps.weight"), &[H, I, E], G::Q4_K, 0.0),
            tensor(&b("ffn_up_exps.weight"), &[H, I, E], G::Q5_K, 0.0),
            tensor(&b("ffn_down_exps.weight"), &[I, H, E], G::Q6_K, 0.0),
        ]);
    }
    out.push(tensor("output_norm.weight", &[H], G::F32, 1.0));
    out.push(tensor("output.weight", &[H, V], G::Q6_K, 0.0));
    out
}

fn write_gguf(path: &std::path::Path, tensors: &[Tensor]) {
    let u32v = |v: usize| (4u32, (v as u32).to_le_bytes().to_vec());
    let f32v = |v: f32| (6u32, v.to_le_bytes().to_vec());
    let mut kvs = vec![("general.architecture".to_string(), 8u32, gguf_string("qwen3moe"))];
    for (key, (kind, value)) in [
        ("block_count", u32v(LAYERS)),
        ("context_length", u32v(4096)),
        ("embedding_length", u32v(H)),
        ("attention.head_count", u32v(HEADS)),
        ("attention.head_count_kv", u32v(KV)),
        ("attention.key_length", u32v(HD)),
        ("attention.value_length", u32v(HD)),
        ("rope.freq_base", f32v(1e6)),
        ("attention.layer_norm_rms_epsilon", f32v(1e-6)),
        ("expert_count", u32v(E)),
        ("expert_used_count", u32v(K)),
        ("expert_feed_forward_length", u32v(I)),
    ] {
        kvs.push((format!("qwen3moe.{key}"), kind, value));
    }
    let mut infos = Vec::new();
    let mut data = Vec::new();
    for t in tensors {
        while !data.len().is_multiple_of(32) {
            data.push(0);
        }
        infos.push((t.name.clone(), t.dims.clone(), t.kind.0, data.len() as u64));
        data.extend(&t.bytes);
    }
    let mut bytes = gguf_bytes(3, &kvs, &infos, 0);
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

/// The same weights as Hugging Face names them, each block dequantized
/// here, experts split from their stacks.
fn reference_store(tensors: &[Tensor]) -> WeightStore {
    let mut store = WeightStore::default();
    let mut put = |name: String, shape: Vec<usize>, values: &[f32]| {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        store.insert(WeightTensor::owned(name, WeightDtype::F32, shape, bytes));
    };
    for t in tensors {
        let n = t.dims.iter().product::<u64>() as usize;
        let mut values = vec![0.0f32; n];
        if t.kind == GgmlType::F32 {
            values.iter_mut().zip(t.bytes.chunks(4)).for_each(|(v, b)| *v = f32::from_le_bytes(b.try_into().unwrap()));
        } else {
            dequantize(t.kind, &t.bytes, &mut values).unwrap();
        }
        let hf = |s: &str| s.replace("blk.", "model.layers.");
        let name = match t.name.as_str() {
            "token_embd.weight" => "model.embed_tokens.weight".to_string(),
            "output_norm.weight" => "model.norm.weight".into(),
            "output.weight" => "lm_head.weight".into(),
            other => hf(other)
                .replace("attn_norm", "input_layernorm")
                .replace("attn_q_norm", "self_attn.q_norm")
                .replace("attn_k_norm", "self_attn.k_norm")
                .replace("attn_q.", "self_attn.q_proj.")
                .replace("attn_k.", "self_attn.k_proj.")
                .replace("attn_v.", "self_attn.v_proj.")
                .replace("attn_output", "self_attn.o_proj")
                .replace("ffn_norm", "post_attention_layernorm")
                .replace("ffn_gate_inp", "mlp.gate"),
        };
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        if dims.len() == 3 {
            let projection = ["gate", "up", "down"].iter().find(|p| name.contains(&format!("ffn_{p}_exps"))).unwrap();
            let layer = name.split('.').nth(2).unwrap();
            let each = dims[0] * dims[1];
            for e in 0..dims[2] {
                let expert = format!("model.layers.{layer}.mlp.experts.{e}.{projection}_proj.weight");
                put(expert, vec![dims[1], dims[0]], &values[e * each..(e + 1) * each]);
            }
        } else {
            put(name, dims.iter().rev().copied().collect(), &values);
        }
    }
    store
}

fn run(model: &Model) -> (Vec<u32>, Vec<u32>) {
    let backend = CpuBackend::new(model.store.clone(), Some(2)).unwrap();
    let mut forward = Forward::new(model, Box::new(backend));
    let generation = forward.generate(&[3, 41, 59, 26, 5, 90, 7], 4, &mut |_| {}).unwrap();
    let logits = forward.backend_mut().read(stage_types::SaveTensorStage::LmHead).unwrap();
    (generation.generated, logits.as_f32().unwrap().iter().map(|v| v.to_bits()).collect())
}

#[test]
fn a_gguf_with_multi_block_rows_and_expert_width_unlike_hidden_runs_as_its_dequantized_weights() {
    let dir = scratch("gguf-multiblock");
    let tensors = tensors();
    let path = dir.join("model.gguf");
    write_gguf(&path, &tensors);
    let gguf = Model::load(&path).unwrap();
    assert_eq!((gguf.config.hidden_size, gguf.config.moe_intermediate_size), (H, I));
    let config = serde_json::json!({
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": V,
        "hidden_size": H, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "head_dim": HD, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "tie_word_embeddings": false, "attention_bias": false, "num_experts": E,
        "num_experts_per_tok": K, "moe_intermediate_size": I, "norm_topk_prob": true,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 4096,
    });
    let config = ModelConfig::from_json(config, &dir.join("config.json")).unwrap();
    let source = pipeline::ModelSource::Checkpoint(dir.clone());
    let reference = Model::assemble(config, reference_store(&tensors), source).unwrap();
    let (ours, theirs) = (run(&gguf), run(&reference));
    assert_eq!(ours.0, theirs.0, "greedy tokens");
    assert!(ours.1 == theirs.1, "logits differ in their bits");
    // Not a vacuous match: the logits spread and the tokens vary.
    assert!(theirs.0.iter().any(|&t| t != theirs.0[0]) || theirs.1.iter().any(|&b| b != theirs.1[0]));
}

/// `model` on `backend` from a prompt of `prompt` tokens, 4 generated:
/// the tokens and the last logits.
fn run_with(model: &Model, backend: Box<dyn pipeline::Backend>, prompt: usize) -> (Vec<u32>, Vec<f32>) {
    let mut forward = Forward::new(model, backend);
    let tokens: Vec<u32> = (0..prompt as u32).map(|i| (i * 37 + 3) % V as u32).collect();
    let generation = forward.generate(&tokens, 4, &mut |_| {}).unwrap();
    let logits = forward.backend_mut().read(stage_types::SaveTensorStage::LmHead).unwrap();
    (generation.generated, logits.as_f32().unwrap().to_vec())
}

/// The same model on the GPU, its weights kept quantized there (a quarter
/// to a half of their bf16 bytes): a 40-token prompt (80 expert slots: the
/// grouped kernel decodes the experts' blocks inside its tiles in Bf16
/// mode, one warp per output reads them in F32; dense projections decoded
/// for cuBLAS),
/// then decode steps whose projections read the blocks themselves, match
/// the CPU: F32 within 1e-5 with the same tokens, Bf16 within 3e-2.
#[cfg(feature = "cuda")]
#[test]
fn on_the_gpu_the_blocks_stay_quantized_and_match_the_cpu() {
    use pipeline::CudaBackend;
    use pipeline::backend::cuda::CudaPrecision;
    if !moetrace_tests::gpu_enabled() {
        return;
    }
    let dir = scratch("gguf-multiblock-gpu");
    let tensors = tensors();
    let path = dir.join("model.gguf");
    write_gguf(&path, &tensors);
    let model = Model::load(&path).unwrap();
    let cpu = run_with(&model, Box::new(CpuBackend::new(model.store.clone(), Some(2)).unwrap()), 40);
    let quantized_bytes: usize = tensors.iter().map(|t| t.bytes.len()).sum();
    for (precision, tolerance) in [(CudaPrecision::F32, 1e-5), (CudaPrecision::Bf16, 3e-2)] {
        let backend = CudaBackend::new(&model, 0, precision).unwrap();
        let bytes = backend.weight_bytes();
        assert!(bytes <= quantized_bytes, "{precision:?}: {bytes} bytes on the device, {quantized_bytes} in the file");
        let gpu = run_with(&model, Box::new(backend), 40);
        let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
        let e = moetrace_tests::rel_l2(&f64s(&cpu.1), &f64s(&gpu.1));
        eprintln!("{precision:?}: {bytes} weight bytes on the device; logits rel_l2 {e:.2e}; tokens {:?}", gpu.0);
        assert!(e <= tolerance, "{precision:?}: logits rel_l2 {e:.3e}");
        if precision == CudaPrecision::F32 {
            assert_eq!(gpu.0, cpu.0, "greedy tokens");
        }
    }
}

/// Errors about a GGUF file's tensors name them as the file does
/// (`blk.1.attn_q.weight` in the file), the Hugging Face name after it in
/// brackets: a missing tensor, a tensor of the wrong shape (in GGUF's
/// dimension order), a missing expert stack.
#[test]
fn gguf_tensor_errors_name_the_file_and_its_own_tensor_names() {
    let dir = moetrace_tests::scratch("gguf-names");
    type Edit = Box<dyn Fn(&mut Vec<Tensor>)>;
    let cases: [(&str, Edit, [&str; 2]); 3] = [
        (
            "missing",
            Box::new(|t: &mut Vec<Tensor>| t.retain(|t| t.name != "blk.1.attn_q.weight")),
            ["blk.1.attn_q.weight [model.layers.1.self_attn.q_proj.weight]", "missing.gguf"],
        ),
        (
            "shape",
            Box::new(|t: &mut Vec<Tensor>| {
                let i = t.iter().position(|t| t.name == "blk.0.attn_norm.weight").unwrap();
                t[i] = tensor("blk.0.attn_norm.weight", &[H + 1], GgmlType::F32, 1.0);
            }),
            ["blk.0.attn_norm.weight in shape.gguf", &format!("[{}]", H + 1)],
        ),
        (
            "experts",
            Box::new(|t: &mut Vec<Tensor>| t.retain(|t| t.name != "blk.1.ffn_up_exps.weight")),
            ["blk.1.ffn_up_exps.weight (expert 0)", "experts.gguf"],
        ),
    ];
    for (name, edit, needles) in cases {
        let mut t = tensors();
        edit(&mut t);
        let path = dir.join(format!("{name}.gguf"));
        write_gguf(&path, &t);
        let err = Model::load(&path).err().unwrap_or_else(|| panic!("{name}: loaded")).to_string();
        for needle in needles {
            assert!(err.contains(needle), "{name}: `{needle}` not in: {err}");
        }
    }
}
