//! A `deepseek2` GGUF quantized by llama.cpp's own llama-quantize
//! (tests/fixtures/tiny-deepseek-v3-q4km: Q4_K_M of a tiny DeepSeek-V3
//! with hidden 256, so the experts, q_a and kv_a are Q4_K and the down
//! projections Q6_K, while MLA's attn_k_b, attn_v_b, q_b and o_proj, whose
//! rows are not whole 256-value blocks, fell back to Q5_0 as they do in the
//! published DeepSeek GGUFs) reads as its F32 twin reads: the twin is the
//! same file with every tensor decoded by gguf-py
//! (python/tools/dequantize_gguf.py), independent of moetrace's decoders.
//! Every tensor moetrace loads (kv_b put back from the quantized k_b and
//! v_b included) equals the twin's bit for bit (FNV-1a of the f32 bits,
//! recorded from the twin in twin.json), and a run of 6 + 4 tokens
//! generates what the twin's run generated.
//!
//! Made so (the twin is not kept: 5.4 MB):
//!   make_oracle_fixture.py OUT tiny-deepseek-v3-q4km deepseek 43 layers=2 dense_first=1 hidden=256
//!     experts=4 topk=2 n_group=2 topk_group=1 moe_inter=256 inter=256 q_lora=32 kv_lora=32 nope=32
//!     rope=32 v_dim=32 heads=2; config.json given scoring_func sigmoid; make_gguf_with_llama_cpp.py
//!     --outtype f32; llama_model_quantize(..., LLAMA_FTYPE_MOSTLY_Q4_K_M) (llama-cpp-python 0.3.36);
//!   dequantize_gguf.py model.gguf twin.gguf;
//!   MOETRACE_TWIN=twin.gguf cargo test -p moetrace-tests --test gguf_deepseek2_quant (rewrites twin.json).

use std::collections::BTreeMap;
use std::path::Path;

use pipeline::Model;
use pipeline::weights::WeightDtype;
use session::RunConfig;

/// FNV-1a over the f32 bits of each tensor, by name.
fn fingerprints(model: &Model) -> BTreeMap<String, String> {
    model
        .store
        .tensors()
        .iter()
        .map(|t| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for v in t.to_f32_vec() {
                for b in v.to_bits().to_le_bytes() {
                    h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
                }
            }
            (t.name.clone(), format!("{h:016x}"))
        })
        .collect()
}

/// The tokens a CPU run of `model` generates after the fixture's prompt.
fn generated(model: &Path) -> Vec<u32> {
    let text = format!("(model: Path({model:?}), prompt: Tokens([1, 17, 42, 99, 5, 77]), generate: 4, backend: Cpu)");
    let config = RunConfig::parse(&text, Path::new("quant.ron")).unwrap();
    session::run(&config, Path::new("quant.ron"), &mut |_| {}).unwrap().summary.generated
}

#[test]
fn a_llama_quantized_deepseek2_gguf_reads_as_gguf_py_decodes_it() {
    let dir = moetrace_tests::workspace_root().join("tests/fixtures/tiny-deepseek-v3-q4km");
    let record = dir.join("twin.json");
    if let Ok(twin) = std::env::var("MOETRACE_TWIN") {
        let twin = Path::new(&twin);
        let json = serde_json::json!({
            "fingerprints": fingerprints(&Model::load(twin).unwrap()),
            "generated": generated(twin),
        });
        std::fs::write(&record, serde_json::to_string_pretty(&json).unwrap() + "\n").unwrap();
    }
    let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    let model = Model::load(&dir.join("model.gguf")).unwrap();
    let kinds: std::collections::BTreeSet<String> = model
        .store
        .tensors()
        .iter()
        .filter_map(|t| match t.dtype {
            WeightDtype::Quant(kind) => Some(kind.name()),
            _ => None,
        })
        .collect();
    assert!(["Q4_K", "Q6_K", "Q5_0"].iter().all(|k| kinds.contains(*k)), "the file's block types: {kinds:?}");
    let got = fingerprints(&model);
    let want_prints: BTreeMap<String, String> = serde_json::from_value(want["fingerprints"].clone()).unwrap();
    assert_eq!(got.keys().collect::<Vec<_>>(), want_prints.keys().collect::<Vec<_>>(), "the tensors moetrace loads");
    let differ: Vec<&String> = got.iter().filter(|(k, v)| want_prints[*k] != **v).map(|(k, _)| k).collect();
    assert!(differ.is_empty(), "tensors that decode unlike gguf-py's twin: {differ:?}");
    let want_tokens: Vec<u32> = serde_json::from_value(want["generated"].clone()).unwrap();
    assert_eq!(generated(&dir.join("model.gguf")), want_tokens, "the run's greedy tokens");
    eprintln!("{} tensors equal the twin's bit for bit ({kinds:?}); generated {want_tokens:?}", got.len());
}
