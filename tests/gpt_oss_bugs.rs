//! The bugs engines shipped in gpt-oss, reproduced by a CPU target
//! (`target: CpuWithBug(...)`) on the gpt-oss oracle fixture (windows of
//! 4 in layers 0 and 2, full attention in layer 1, a 7-token prompt and 3
//! decode steps), each found by local bisect at its own stage first:
//! the SwiGLU's clamp dropped (SGLang #39939, vLLM #42855) at
//! moe_expert_clamp, alpha replaced by 1 (SGLang #16972) at
//! moe_expert_swigl, the sinks left out of the softmax at attn_sink, a
//! window one position too wide and a full layer run with the window
//! (SGLang #11634's class) at attn_window, the router's bias dropped at
//! moe_router_logits, one MXFP4 scale byte off by one at moe_expert_gate
//! of its expert.

use std::path::Path;

use pipeline::backend::cpu::known_bugs::KnownBug;
use session::bisect::{BisectConfig, BisectOptions, bisect};
use stage_types::SaveTensorStage as S;

/// The findings (step, layer, stage, expert), the report, and the clamp
/// counts of the moe_expert_clamp findings.
type Findings = (Vec<(usize, Option<usize>, S, Option<i32>)>, String, Vec<[usize; 2]>);

fn findings(bug: KnownBug) -> Findings {
    let dir = moetrace_tests::workspace_root().join("tests/fixtures/tiny-gpt-oss-oracle/model");
    let text = format!(
        "(model: Path({dir:?}), prompt: Tokens([1, 17, 42, 99, 5, 77, 3]), generate: 3, reference: Cpu, target: CpuWithBug({bug:?}), threads: 1, mode: Local)"
    );
    let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    let report = bisect(&config, Path::new("b.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap();
    let places = report.findings().iter().map(|r| (r.step, r.layer, r.stage, r.worst_expert)).collect();
    let clamps = report.findings().iter().filter_map(|r| r.clamp_changes).collect();
    (places, report.render(false), clamps)
}

#[test]
fn each_gpt_oss_bug_is_found_first_at_its_stage() {
    // (bug, its stage, the layers it must be found in, the stages its
    // effect may also show at, locally, in the same layer)
    let cases: [(KnownBug, S, &[usize], &[S]); 7] = [
        (KnownBug::ClampDropped, S::MoeExpertClamp, &[0, 1, 2], &[]),
        (KnownBug::AlphaOne, S::MoeExpertSwigl, &[0, 1, 2], &[]),
        (KnownBug::SinksDropped, S::AttnSink, &[0, 1, 2], &[S::AttnSoftmax]),
        (KnownBug::WindowOffByOne, S::AttnWindow, &[0, 2], &[S::AttnScores, S::AttnSoftmax, S::AttnSink]),
        (KnownBug::FullLayerWindowed(4), S::AttnWindow, &[1], &[S::AttnScores, S::AttnSoftmax, S::AttnSink]),
        // The router is judged as a unit (its own logits feed its top-k):
        // the weights show the bias too.
        (KnownBug::RouterBiasDropped, S::MoeRouterLogits, &[0, 1, 2], &[S::MoeRouter, S::MoeRouterIndices]),
        (KnownBug::Mxfp4ScaleOffByOne(1, 0), S::MoeExpertGate, &[1], &[]),
    ];
    for (bug, stage, layers, also) in cases {
        let (places, report, clamps) = findings(bug);
        assert!(!places.is_empty(), "{bug:?}: nothing found\n{report}");
        for p in &places {
            assert!(
                p.2 == stage || also.contains(&p.2),
                "{bug:?}: found {p:?}, expected {stage} (or {also:?})\n{report}"
            );
            assert!(layers.contains(&p.1.unwrap_or(usize::MAX)), "{bug:?}: found in layer {:?}\n{report}", p.1);
        }
        for &layer in layers {
            let found = places.iter().any(|p| (p.0, p.1, p.2) == (0, Some(layer), stage));
            assert!(found, "{bug:?}: not found at {stage} of layer {layer} at the prompt\n{report}");
        }
        if bug == KnownBug::ClampDropped {
            // Named with how many values the clamp changed: some in the
            // reference, none in the target.
            assert!(!clamps.is_empty() && clamps.iter().all(|c| c[0] > 0 && c[1] == 0), "{clamps:?}\n{report}");
            assert!(report.contains("the clamp changed"), "{report}");
        }
        if bug == KnownBug::RouterBiasDropped {
            // The logits lack the same bias vector on every prompt token.
            assert!(report.contains("the same error vector on every token"), "{report}");
        }
        if bug == KnownBug::SinksDropped {
            // A per-position error, not a constant: not taken for a bias.
            assert!(!report.contains("the same error vector on every token"), "{report}");
        }
        if let KnownBug::Mxfp4ScaleOffByOne(_, expert) = bug {
            assert!(places.iter().all(|p| p.3 == Some(expert as i32)), "{bug:?}: named expert {expert}: {places:?}");
        }
    }
}
