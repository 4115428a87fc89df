//! Checkpoint layouts a loader must read: bf16, f16 and f32 tensors, one
//! file or shards with an index, tied or untied lm_head (each made here
//! from a synthetic model); FP8 block-scaled ones refused by name when
//! their scales or config are wrong (from tests/fixtures' FP8 oracle).

use std::path::Path;

use moetrace_tests::{rel_l2, scratch};
use pipeline::weights::{WeightDtype, WeightStore, WeightTensor, save_safetensors};
use pipeline::{CpuBackend, Forward, Model};

const PROMPT: [u32; 5] = [3, 141, 59, 265, 35];

/// Last-step logits of a greedy run of 3 tokens.
fn logits(model: &Model) -> (Vec<u32>, Vec<f32>) {
    let backend = CpuBackend::new(model.store.clone(), Some(2)).unwrap();
    let mut forward = Forward::new(model, Box::new(backend));
    let generation = forward.generate(&PROMPT, 3, &mut |_| {}).unwrap();
    let logits = forward.backend_mut().read(stage_types::SaveTensorStage::LmHead).unwrap();
    (generation.generated, logits.as_f32().unwrap().to_vec())
}

/// The same tensors stored as `dtype` (rounded to nearest where narrower).
fn convert(store: &WeightStore, dtype: WeightDtype) -> WeightStore {
    let mut out = WeightStore::default();
    for t in store.tensors() {
        let values = t.to_f32_vec();
        let bytes: Vec<u8> = match dtype {
            WeightDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            WeightDtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect(),
            WeightDtype::Bf16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect(),
            WeightDtype::Quant(kind) => panic!("safetensors checkpoints are not stored as {}", kind.name()),
            WeightDtype::Fp8E4m3 => panic!("FP8 needs block scales: tiny-moe-fp8-oracle is one"),
            WeightDtype::U8 => panic!("U8 holds MXFP4 blocks and scales, not values"),
        };
        out.insert(WeightTensor::owned(t.name.clone(), dtype, t.shape.clone(), bytes));
    }
    out
}

fn write_config(model: &Model, dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut json = model.config.json.clone();
    edit(&mut json);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&json).unwrap()).unwrap();
}

#[test]
fn f32_and_sharded_checkpoints_give_the_same_bits_as_bf16() {
    let dir = scratch("formats");
    let model = Model::synthetic("tiny-moe", 9, Some(2)).unwrap();
    let reference = logits(&model);

    let f32_dir = dir.join("f32");
    write_config(&model, &f32_dir, |_| {});
    save_safetensors(&convert(&model.store, WeightDtype::F32), &f32_dir.join("model.safetensors")).unwrap();
    let f32_model = Model::load(&f32_dir).unwrap();
    assert_eq!(f32_model.weight_dtype(), "F32");
    assert_eq!(logits(&f32_model), reference, "f32 holds bf16 values exactly");

    let sharded = dir.join("sharded");
    write_config(&model, &sharded, |_| {});
    let (mut first, mut second) = (WeightStore::default(), WeightStore::default());
    let mut map = serde_json::Map::new();
    for (i, t) in model.store.tensors().iter().enumerate() {
        let (store, file) = if i % 2 == 0 {
            (&mut first, "model-00001-of-00002.safetensors")
        } else {
            (&mut second, "model-00002-of-00002.safetensors")
        };
        store.insert(t.clone());
        map.insert(t.name.clone(), serde_json::json!(file));
    }
    save_safetensors(&first, &sharded.join("model-00001-of-00002.safetensors")).unwrap();
    save_safetensors(&second, &sharded.join("model-00002-of-00002.safetensors")).unwrap();
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    assert_eq!(logits(&Model::load(&sharded).unwrap()), reference);
}

#[test]
fn f16_checkpoints_load_and_stay_close() {
    let dir = scratch("f16");
    let model = Model::synthetic("tiny-dense", 9, Some(2)).unwrap();
    let reference = logits(&model);
    write_config(&model, &dir, |_| {});
    save_safetensors(&convert(&model.store, WeightDtype::F16), &dir.join("model.safetensors")).unwrap();
    let f16_model = Model::load(&dir).unwrap();
    assert_eq!(f16_model.weight_dtype(), "F16");
    let got = logits(&f16_model);
    let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let r = rel_l2(&widen(&reference.1), &widen(&got.1));
    assert!(r > 0.0 && r < 1e-2, "f16 rounding of bf16 weights moves logits by rel_l2 {r:e}");
}

#[test]
fn tied_lm_head_reads_the_embedding_and_needs_no_lm_head_tensor() {
    let dir = scratch("tied");
    let model = Model::synthetic("tiny-moe", 9, Some(1)).unwrap();
    write_config(&model, &dir, |json| json["tie_word_embeddings"] = serde_json::json!(true));
    let mut store = WeightStore::default();
    for t in model.store.tensors().iter().filter(|t| t.name != "lm_head.weight") {
        store.insert(t.clone());
    }
    save_safetensors(&store, &dir.join("model.safetensors")).unwrap();
    let tied = Model::load(&dir).unwrap();
    assert_eq!(tied.lm_head, tied.embedding);

    let backend = CpuBackend::new(tied.store.clone(), Some(1)).unwrap();
    let mut forward = Forward::new(&tied, Box::new(backend));
    forward.step(0, &PROMPT, 0, &mut |_| {}).unwrap();
    let normed = forward.backend_mut().read(stage_types::SaveTensorStage::FinalNorm).unwrap();
    let logits = forward.backend_mut().read(stage_types::SaveTensorStage::LmHead).unwrap();
    let embed = tied.store.get(tied.embedding).to_f32_vec();
    let (h, v) = (tied.config.hidden_size, tied.config.vocab_size);
    let x = &normed.as_f32().unwrap()[(PROMPT.len() - 1) * h..];
    for token in [0usize, 7, v - 1] {
        let expect: f64 = (0..h).map(|i| x[i] as f64 * embed[token * h + i] as f64).sum();
        let got = logits.as_f32().unwrap()[(PROMPT.len() - 1) * v + token] as f64;
        assert!((got - expect).abs() <= 1e-5 * expect.abs().max(1.0), "token {token}: {got} vs {expect}");
    }
}

/// A tensor of a safetensors file: name, dtype as the header spells it,
/// shape, bytes.
type RawEntry = (String, String, Vec<usize>, Vec<u8>);

/// Writes a safetensors file of `entries`.
fn write_raw_safetensors(path: &Path, entries: &[RawEntry]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in entries {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let mut head = serde_json::to_vec(&header).unwrap();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut file = (head.len() as u64).to_le_bytes().to_vec();
    file.extend(head);
    entries.iter().for_each(|e| file.extend(&e.3));
    std::fs::write(path, file).unwrap();
}

#[test]
fn fp8_checkpoints_with_scales_that_do_not_cover_their_weights_are_refused_by_name() {
    let fixture = moetrace_tests::workspace_root().join("tests/fixtures/tiny-moe-fp8-oracle/model");
    let bytes = std::fs::read(fixture.join("model.safetensors")).unwrap();
    let entries: Vec<RawEntry> = pipeline::weights::index_safetensors(&bytes)
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.dtype.name().to_string(), e.shape, bytes[e.start..e.end].to_vec()))
        .collect();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap()).unwrap();
    let refused = |name: &str, edit: &dyn Fn(&mut Vec<RawEntry>, &mut serde_json::Value)| {
        let dir = scratch(&format!("fp8-{name}"));
        let (mut entries, mut config) = (entries.clone(), config.clone());
        edit(&mut entries, &mut config);
        write_raw_safetensors(&dir.join("model.safetensors"), &entries);
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        Model::load(&dir).expect_err("refused").to_string()
    };
    let q = "model.layers.0.self_attn.q_proj.weight";
    // The fixture itself loads, and its q projection decodes by block.
    assert!(Model::load(&fixture).is_ok());
    let err = refused("short-scales", &|entries, _| {
        let scales = entries.iter_mut().find(|e| e.0 == format!("{q}_scale_inv")).unwrap();
        scales.2 = vec![1, 1];
        scales.3.truncate(4);
    });
    assert!(err.contains(&format!("{q}_scale_inv")) && err.contains("do not cover") && err.contains("[2, 2]"), "{err}");
    let err = refused("no-scales", &|entries, _| entries.retain(|e| e.0 != format!("{q}_scale_inv")));
    assert!(err.contains(q) && err.contains("without"), "{err}");
    let err = refused("no-config", &|_, config| {
        config.as_object_mut().unwrap().remove("quantization_config");
    });
    assert!(err.contains("quantization_config"), "{err}");
    let err = refused("per-tensor", &|_, config| {
        config["quantization_config"]["weight_block_size"] = serde_json::json!(null)
    });
    assert!(err.contains("weight_block_size"), "{err}");
}
