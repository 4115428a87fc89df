//! The GGUF container reader (pipeline::weights::gguf): the fixture's
//! header read as llama.cpp wrote it, and bad files (every truncation of a
//! valid one, bad magic and version, counts and lengths the file cannot
//! hold, unknown value and tensor types, offsets past the end, misaligned
//! or duplicated entries) as errors naming the cause, never panics.

use std::path::Path;

use moetrace_tests::{gguf_bytes, gguf_fixture, gguf_string};
use pipeline::weights::gguf::{GgmlType, GgufHeader, GgufValue};

/// Builds GGUF v3 bytes: metadata (key, type, value bytes), then tensor
/// infos (name, dims, type, offset), then `data_len` bytes of data at the
/// 32-byte alignment.
struct Builder {
    kvs: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, u64)>,
    data_len: usize,
    version: u32,
}

impl Builder {
    fn valid() -> Self {
        // Two tensors: a Q8_0 [64, 2] (4 blocks of 34 bytes) and an f32 [3].
        let mut array = 4u32.to_le_bytes().to_vec();
        array.extend_from_slice(&2u64.to_le_bytes());
        array.extend_from_slice(&7u32.to_le_bytes());
        array.extend_from_slice(&9u32.to_le_bytes());
        Self {
            kvs: vec![
                ("general.architecture".into(), 8, gguf_string("qwen3moe")),
                ("qwen3moe.block_count".into(), 4, 3u32.to_le_bytes().to_vec()),
                ("qwen3moe.rope.freq_base".into(), 6, 1e6f32.to_le_bytes().to_vec()),
                ("some.list".into(), 9, array),
            ],
            tensors: vec![("a.weight".into(), vec![64, 2], 8, 0), ("b.weight".into(), vec![3], 0, 160)],
            data_len: 160 + 12,
            version: 3,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        gguf_bytes(self.version, &self.kvs, &self.tensors, self.data_len)
    }
}

fn parse(bytes: &[u8]) -> Result<GgufHeader, String> {
    GgufHeader::parse(bytes, Path::new("x.gguf")).map_err(|e| e.to_string())
}

#[test]
fn a_hand_built_file_reads_back_with_its_metadata_and_tensor_extents() {
    let bytes = Builder::valid().bytes();
    let h = parse(&bytes).unwrap();
    assert_eq!((h.version, h.alignment), (3, 32));
    assert_eq!(h.get("general.architecture").and_then(GgufValue::as_str), Some("qwen3moe"));
    assert_eq!(h.get("qwen3moe.block_count").and_then(GgufValue::as_u64), Some(3));
    assert_eq!(h.get("qwen3moe.rope.freq_base").and_then(GgufValue::as_f64), Some(1e6));
    assert_eq!(h.get("some.list"), Some(&GgufValue::Array(vec![GgufValue::U32(7), GgufValue::U32(9)])));
    assert_eq!(h.tensors.len(), 2);
    let (a, b) = (&h.tensors[0], &h.tensors[1]);
    assert_eq!((a.ggml_type, a.numel(), a.byte_len, a.offset), (GgmlType::Q8_0, 128, 4 * 34, h.data_offset));
    assert_eq!((b.ggml_type, b.byte_len, b.offset), (GgmlType::F32, 12, h.data_offset + 160));
    assert_eq!(h.data_offset + 172, bytes.len() as u64);
}

#[test]
fn every_truncation_of_a_valid_file_is_an_error_not_a_panic() {
    let bytes = Builder::valid().bytes();
    for len in 0..bytes.len() {
        let err = parse(&bytes[..len]).unwrap_err();
        assert!(err.contains("x.gguf") && err.contains("malformed GGUF"), "{len}: {err}");
    }
}

/// Each bad file is refused with a message holding `want`.
fn refused(bytes: Vec<u8>, want: &str) {
    let err = parse(&bytes).unwrap_err();
    assert!(err.contains(want), "expected `{want}` in: {err}");
}

#[test]
fn bad_files_are_refused_with_the_cause() {
    let mut magic = Builder::valid().bytes();
    magic[..4].copy_from_slice(b"GGML");
    refused(magic, "does not start with `GGUF`");
    refused(Builder { version: 2, ..Builder::valid() }.bytes(), "version 2");
    // Counts and lengths no file of this size could hold.
    let mut count = Builder::valid().bytes();
    count[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    refused(count, "the tensor count is 18446744073709551615");
    let mut b = Builder::valid();
    b.kvs[0].2 = u64::MAX.to_le_bytes().to_vec();
    refused(b.bytes(), "more than the");
    let mut b = Builder::valid();
    b.kvs[3].2[4..12].copy_from_slice(&(1u64 << 60).to_le_bytes());
    refused(b.bytes(), "metadata array `some.list`");
    let mut b = Builder::valid();
    b.kvs[1].1 = 13;
    refused(b.bytes(), "value type 13");
    let mut b = Builder::valid();
    b.kvs.push(("qwen3moe.block_count".into(), 4, 3u32.to_le_bytes().to_vec()));
    refused(b.bytes(), "`qwen3moe.block_count` appears twice");
    let mut b = Builder::valid();
    b.kvs.push(("general.alignment".into(), 4, 24u32.to_le_bytes().to_vec()));
    refused(b.bytes(), "power of two");
    // Tensors.
    let mut b = Builder::valid();
    b.tensors[1].2 = 99;
    refused(b.bytes(), "tensor `b.weight` has ggml type 99");
    let mut b = Builder::valid();
    b.tensors[1].3 = 192;
    refused(b.bytes(), "run past the end of the file");
    let mut b = Builder::valid();
    b.tensors[1].3 = u64::MAX - 31;
    refused(b.bytes(), "run past the end of the file");
    let mut b = Builder::valid();
    b.tensors[1].3 = 161;
    refused(b.bytes(), "not a multiple of the alignment 32");
    let mut b = Builder::valid();
    b.tensors[0].1 = vec![48, 2];
    refused(b.bytes(), "not whole blocks of 32");
    let mut b = Builder::valid();
    b.tensors[0].1 = vec![1 << 40, 1 << 40];
    refused(b.bytes(), "overflow");
    let mut b = Builder::valid();
    b.tensors[0].1 = vec![64, 0];
    refused(b.bytes(), "zero dimension");
    let mut b = Builder::valid();
    b.tensors[0].1 = vec![32, 1, 1, 1, 1];
    refused(b.bytes(), "5 dimensions");
    let mut b = Builder::valid();
    b.tensors[1].0 = "a.weight".into();
    refused(b.bytes(), "`a.weight` appears twice");
}

/// The GGUF fixture's folder, its model file's bytes and parsed header.
fn fixture_file() -> Option<(std::path::PathBuf, Vec<u8>, GgufHeader)> {
    let dir = gguf_fixture("tiny-qwen3-moe-q4km")?;
    let path = dir.join("model/model.gguf");
    let bytes = std::fs::read(&path).unwrap();
    let header = GgufHeader::parse(&bytes, &path).unwrap();
    Some((dir, bytes, header))
}

#[test]
fn the_fixture_header_reads_as_llama_cpp_wrote_it() {
    let Some((_, bytes, h)) = fixture_file() else { return };
    assert_eq!(h.get("general.architecture").and_then(GgufValue::as_str), Some("qwen3moe"));
    let key = |k: &str| h.get(&format!("qwen3moe.{k}")).and_then(GgufValue::as_u64);
    // fixtures/README.md: 3 layers, H 256, 4/2 heads, 12 experts top-4, I 256.
    assert_eq!(key("block_count"), Some(3));
    assert_eq!(key("embedding_length"), Some(256));
    assert_eq!((key("attention.head_count"), key("attention.head_count_kv")), (Some(4), Some(2)));
    assert_eq!((key("expert_count"), key("expert_used_count")), (Some(12), Some(4)));
    assert_eq!(key("expert_feed_forward_length"), Some(256));
    assert_eq!(h.tensors.len(), 39);
    let types: std::collections::BTreeSet<String> = h.tensors.iter().map(|t| t.ggml_type.name()).collect();
    for want in ["F32", "Q4_K", "Q6_K", "Q8_0"] {
        assert!(types.contains(want), "{types:?}");
    }
    let gate = h.tensors.iter().find(|t| t.name == "blk.0.ffn_gate_exps.weight").expect("stacked experts");
    assert_eq!(gate.dims, [256, 256, 12], "ggml order: cols, rows, experts");
    // Tensors lie in the data section, in order, without overlap.
    let mut end = h.data_offset;
    for t in &h.tensors {
        assert!(t.offset >= end, "{} overlaps the tensor before it", t.name);
        end = t.offset + t.byte_len;
    }
    assert!(end <= bytes.len() as u64);
}

/// The fixture's weights decoded here against what its oracle computed
/// from the same weights decoded by the gguf Python package: the embedding
/// rows (token_embd is Q4_K), lm_head (output is Q6_K) and layer 1's keys
/// (attn_k is Q8_0 there), each recomputed in f64 from the oracle's own
/// inputs. An independent check of the decoders' bit layouts (their unit
/// tests pack blocks from the formats' descriptions).
#[test]
fn the_fixtures_q4_k_q6_k_and_q8_0_weights_decode_to_the_oracles() {
    let Some((dir, bytes, h)) = fixture_file() else { return };
    // A [rows, cols] weight (ggml dims [cols, rows]) decoded, with its type.
    let weight = |name: &str| {
        let t = h.tensors.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no {name}"));
        let data = &bytes[t.offset as usize..(t.offset + t.byte_len) as usize];
        let mut values = vec![0.0f32; t.numel() as usize];
        pipeline::weights::quant::dequantize(t.ggml_type, data, &mut values).unwrap();
        (values, t.dims[0] as usize, t.ggml_type.name())
    };
    let npy = |rel: &str| compare::npy::parse_npy(&std::fs::read(dir.join("activations").join(rel)).unwrap()).unwrap();
    // x [T, cols] times w [rows, cols] transposed, columns `from..from + n` of the product.
    let project = |x: &compare::npy::NpyArray, w: &[f32], cols: usize| -> Vec<f64> {
        let rows = w.len() / cols;
        x.values()
            .chunks(cols)
            .flat_map(|xr| (0..rows).map(move |r| (0..cols).map(|c| xr[c] * f64::from(w[r * cols + c])).sum::<f64>()))
            .collect()
    };
    let recipe: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("recipe.json")).unwrap()).unwrap();
    let prompt: Vec<usize> =
        recipe["prompt"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as usize).collect();

    let check = |what: &str, oracle: &[f64], ours: &[f64]| {
        let rel = moetrace_tests::rel_l2(oracle, ours);
        eprintln!("{what}: rel_l2 {rel:e}");
        assert!(rel < 1e-6, "{what}: rel_l2 {rel:e}");
    };
    let (embd, h_dim, kind) = weight("token_embd.weight");
    assert_eq!(kind, "Q4_K");
    let rows: Vec<f64> =
        prompt.iter().flat_map(|&t| embd[t * h_dim..(t + 1) * h_dim].iter().map(|&v| f64::from(v))).collect();
    check("Q4_K embedding rows", &npy("step-0/embedding.npy").values(), &rows);
    let (output, cols, kind) = weight("output.weight");
    assert_eq!(kind, "Q6_K");
    let logits = project(&npy("step-0/final_norm.npy"), &output, cols);
    check("Q6_K lm_head", &npy("step-0/lm_head.npy").values(), &logits);
    let (wk, cols, kind) = weight("blk.1.attn_k.weight");
    assert_eq!(kind, "Q8_0");
    let keys = project(&npy("step-0/layer-1/attn_norm.npy"), &wk, cols);
    let qkv = npy("step-0/layer-1/qkv_matmul.npy");
    // qkv columns: q (4 heads x 64), then k (2 x 64), then v.
    let oracle_keys: Vec<f64> = qkv.values().chunks(qkv.shape[1]).flat_map(|r| r[256..384].to_vec()).collect();
    check("Q8_0 keys", &oracle_keys, &keys);
}

/// Loading a model from a GGUF file: the architecture, the metadata it
/// needs and every tensor's type are checked first, each failure naming
/// its cause (and, for choices, the valid ones).
#[test]
fn a_gguf_model_that_cannot_be_read_is_refused_with_the_cause() {
    let dir = moetrace_tests::scratch("gguf-model");
    let load = |b: Builder, name: &str| {
        let path = dir.join(name);
        std::fs::write(&path, b.bytes()).unwrap();
        pipeline::Model::load(&path).map(|_| ()).unwrap_err().to_string()
    };
    let mut b = Builder::valid();
    b.kvs[0].2 = gguf_string("phimoe");
    let err = load(b, "arch.gguf");
    assert!(
        err.contains("architecture `phimoe`")
            && err.contains("qwen3moe (Qwen3MoeForCausalLM), qwen3")
            && err.contains("llama (MixtralForCausalLM)")
            && err.contains("deepseek2 (DeepseekV3ForCausalLM)"),
        "{err}"
    );
    let mut b = Builder::valid();
    b.kvs[0].2 = gguf_string("llama");
    let err = load(b, "dense-llama.gguf");
    assert!(err.contains("dense Llama") && err.contains("Mixtral"), "{err}");
    let err = load(Builder::valid(), "keys.gguf");
    assert!(err.contains("no tensor `token_embd.weight`"), "{err}");
    let mut b = Builder::valid();
    b.tensors[0].2 = 10;
    b.tensors[0].1 = vec![256, 2];
    b.data_len = 160 + 12;
    let err = load(b, "type.gguf");
    assert!(err.contains("tensor `a.weight` is Q2_K") && err.contains("Q4_K") && err.contains("Q5_0"), "{err}");
    let mut b = Builder::valid();
    b.tensors[0].0 = "token_embd.weight".into();
    let err = load(b, "missing.gguf");
    assert!(err.contains("missing integer metadata key `qwen3moe.attention.key_length`"), "{err}");
}
