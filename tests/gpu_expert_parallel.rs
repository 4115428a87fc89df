//! GPU tests of virtual expert-parallel ranks on one device (issue 27,
//! point 3; kernels/moe.cu's `ep_*`): in slot order every tensor a
//! one-rank CUDA run captures is the same file in an R-rank run (F32 and
//! Bf16); bisect --local of the CPU against CUDA Bf16 ranks summed in rank
//! order finds nothing, and finds a fault in one partial sum at its stage
//! with a rank. Run with MOETRACE_GPU=1; elsewhere SKIPPED.

use std::path::Path;

use moetrace_tests::{gpu_enabled, npy_files, scratch};
use session::RunConfig;
use session::bisect::{BisectConfig, BisectOptions, bisect};

const PROMPT: &str = "[1, 17, 42, 45, 30, 5, 77, 100, 2, 9, 11, 120, 64, 3, 7, 88, 21, 40]";

fn capture(backend: &str, parallel: &str, out: &Path) -> Vec<u32> {
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe\", seed: 7), prompt: Tokens({PROMPT}), generate: 5, backend: {backend}, \
         {parallel} capture: (out_dir: {out:?}, stages: \"all\", layers: \"all\", steps: \"all\"))"
    );
    let config = RunConfig::parse(&text, Path::new("gpu-ep.ron")).unwrap();
    session::run(&config, Path::new("gpu-ep.ron"), &mut |_| {}).unwrap().summary.generated
}

#[test]
fn cuda_ranks_in_slot_order_capture_the_one_rank_run_bit_for_bit() {
    if !gpu_enabled() {
        return;
    }
    let dir = scratch("gpu-expert-parallel");
    for dtype in ["F32", "Bf16"] {
        let backend = format!("Cuda(device: 0, dtype: {dtype})");
        let one = capture(&backend, "", &dir.join(dtype).join("one"));
        let four = capture(
            &backend,
            "parallel: (experts: 4, replicas: [(expert: 5, rank: 3)]),",
            &dir.join(dtype).join("four"),
        );
        assert_eq!(one, four, "{dtype}");
        let (a, b) = (npy_files(&dir.join(dtype).join("one")), npy_files(&dir.join(dtype).join("four")));
        for (path, bytes) in &a {
            assert!(b.get(path) == Some(bytes), "{dtype}: {} differs with ranks", path.display());
        }
        assert!(b.keys().any(|p| p.ends_with("moe_dispatch.npy")) && b.keys().any(|p| p.ends_with("moe_combine.npy")));
    }
}

#[test]
fn cpu_against_cuda_ranks_is_clean_and_names_the_rank_of_a_faulty_partial_sum() {
    if !gpu_enabled() {
        return;
    }
    let report = |faults: &str| {
        let text = format!(
            "(model: Synthetic(preset: \"tiny-moe\", seed: 7), prompt: Tokens({PROMPT}), generate: 4, reference: Cpu, \
             target: Cuda(device: 0, dtype: Bf16), parallel: (experts: 4, combine: RankSum), faults: [{faults}])"
        );
        let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
        let options = BisectOptions { local: true, ..BisectOptions::default() };
        bisect(&config, Path::new("b.ron"), &options, &mut |_, _| {}).unwrap()
    };
    let clean = report("");
    assert!(clean.findings().is_empty(), "{}", clean.render(false));
    let faulty = report("(stage: \"moe_combine\", layer: 1, step: 2, token: 0, kind: Scale(1.05))");
    let found = faulty.findings();
    assert_eq!(found.len(), 1, "{}", faulty.render(false));
    assert_eq!((found[0].stage, found[0].layer, found[0].step), (stage_types::SaveTensorStage::MoeCombine, Some(1), 2));
    assert!(found[0].worst_rank.is_some(), "{:?}", found[0]);
}
