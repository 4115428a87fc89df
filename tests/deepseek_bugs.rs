//! The bugs engines shipped in DeepSeek's MoE block, reproduced by a CPU
//! target (`target: CpuWithBug(...)`) on the DeepSeek-V3 MoE oracle fixture
//! (negative biased scores: group masking matters), each found by local
//! bisect at its own stage in every MoE layer and nowhere upstream:
//! the correction bias in the combine weights (vLLM #12002) and a dropped
//! routed_scaling_factor (SGLang #8333) at moe_router, masked groups at 0
//! instead of -inf (SGLang #3705) as a wrong router (not a near-tie) at
//! moe_router_indices, a dropped shared expert at moe_ffn_out; and one FP8
//! block scale misread, at the projection that reads it.

use std::path::Path;

use compare::Verdict;
use pipeline::backend::cpu::known_bugs::KnownBug;
use session::bisect::{BisectConfig, BisectOptions, bisect};
use stage_types::SaveTensorStage as S;

#[test]
fn each_deepseek_moe_bug_is_found_at_its_stage_in_every_moe_layer() {
    let dir = moetrace_tests::workspace_root().join("tests/fixtures/tiny-deepseek-v3-moe-oracle/model");
    for (bug, stage) in [
        (KnownBug::BiasInCombineWeights, S::MoeRouter),
        (KnownBug::MaskedGroupsAtZero, S::MoeRouterIndices),
        (KnownBug::RoutedScalingDropped, S::MoeRouter),
        (KnownBug::SharedExpertDropped, S::MoeFfnOut),
    ] {
        let text = format!(
            "(model: Path({dir:?}), prompt: Tokens([1, 17, 42, 99, 5, 77, 3]), generate: 3, reference: Cpu, target: CpuWithBug({bug:?}), threads: 1, mode: Local)"
        );
        let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
        let report = bisect(&config, Path::new("b.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap();
        // Every finding row, lone or part of a systematic one.
        let places: Vec<(usize, Option<usize>, S)> =
            report.findings().iter().map(|r| (r.step, r.layer, r.stage)).collect();
        assert!(!places.is_empty(), "{bug:?}: nothing found\n{}", report.render(false));
        assert!(places.iter().all(|p| p.2 == stage), "{bug:?}: found {places:?}, expected only {stage}");
        // Layer 0 is dense (first_k_dense_replace 1); both MoE layers at the prompt.
        for layer in [1, 2] {
            assert!(places.contains(&(0, Some(layer), stage)), "{bug:?}: layer {layer} at the prompt: {places:?}");
        }
        if stage == S::MoeRouterIndices {
            let rows = report.findings();
            assert!(rows.iter().all(|r| r.verdict == Verdict::WrongRouter), "{bug:?}: a wrong router, not a near-tie");
        }
    }
}

/// One FP8 block's scale read from its neighbour (flashinfer #2356's
/// class), on the FP8 DeepSeek fixture: layer 1's kv_a_proj_with_mqa (192
/// x 160: 2 x 2 blocks of 128, the last partial on both axes) reads the
/// last block's scale from the block beside it. Local bisect names
/// mla_kv_a of layer 1, at every step (the prompt and two decode steps),
/// and nothing else.
#[test]
fn a_misread_fp8_block_scale_is_found_at_its_projection_alone() {
    let dir = moetrace_tests::workspace_root().join("tests/fixtures/tiny-deepseek-v3-fp8-oracle/model");
    let text = format!(
        "(model: Path({dir:?}), prompt: Tokens([1, 17, 42, 99, 5, 77, 3]), generate: 3, reference: Cpu, target: CpuWithBug(Fp8NeighbourScale(1)), threads: 1, mode: Local)"
    );
    let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    let report = bisect(&config, Path::new("b.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap();
    let places: Vec<(usize, Option<usize>, S)> = report.findings().iter().map(|r| (r.step, r.layer, r.stage)).collect();
    let steps: Vec<usize> = places.iter().map(|p| p.0).collect();
    assert!(places.iter().all(|p| (p.1, p.2) == (Some(1), S::MlaKvA)), "found {places:?}\n{}", report.render(false));
    assert_eq!(steps, [0, 1, 2], "{}", report.render(false));
    // A model without that tensor in FP8: refused, naming why.
    let plain = moetrace_tests::workspace_root().join("tests/fixtures/tiny-deepseek-v3-moe-oracle/model");
    let text = text.replace(&format!("{dir:?}"), &format!("{plain:?}"));
    let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    let err = bisect(&config, Path::new("b.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("not an FP8 block-scaled tensor"), "{err}");
}
