//! Virtual expert-parallel and tensor-parallel ranks on the CPU (issue 27,
//! points 1-3; the plan:
//! docs/decisions/2026-12-07-expert-parallel-plan.md): `parallel: (experts:
//! R)` splits each MoE layer's experts across R ranks, adds the per-rank
//! stages moe_dispatch `[R,T,k]` and moe_combine `[R,T,H]`, and reduces
//! in slot order (the one-rank run to the bit) or in rank order (the last
//! bits differ). Bisect compares the per-rank stages on the tokens both
//! sides routed alike and names the rank of the worst row.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use moetrace_tests::{npy_files, scratch, workspace_root};
use session::RunConfig;
use session::bisect::{BisectConfig, BisectOptions, bisect};

const PROMPT: &str = "[1, 17, 42, 45, 30, 5, 77, 100, 2]";

/// Runs `model` on the CPU with `parallel` (a RON field or ""), capturing
/// every stage to `out`; the generated tokens.
fn capture(model: &str, parallel: &str, out: &Path) -> Vec<u32> {
    let text = format!(
        "(model: {model}, prompt: Tokens({PROMPT}), generate: 4, backend: Cpu, {parallel} \
         capture: (out_dir: {out:?}, stages: \"all\", layers: \"all\", steps: \"all\"))"
    );
    let config = RunConfig::parse(&text, Path::new("ep.ron")).unwrap();
    session::run(&config, Path::new("ep.ron"), &mut |_| {}).unwrap().summary.generated
}

/// Every .npy under `dir` by relative path, read.
fn tensors(dir: &Path) -> BTreeMap<PathBuf, compare::npy::NpyArray> {
    npy_files(dir).into_iter().map(|(path, bytes)| (path, compare::npy::parse_npy(&bytes).unwrap())).collect()
}

/// (name, model, experts).
fn models() -> Vec<(&'static str, String, usize)> {
    let qwen2 = workspace_root().join("tests/fixtures/tiny-qwen2-moe-oracle/model");
    vec![
        ("tiny-moe", "Synthetic(preset: \"tiny-moe\", seed: 7)".to_string(), 16),
        // A shared expert with its sigmoid gate: its term joins the sum.
        ("tiny-qwen2-moe", format!("Path({qwen2:?})"), 8),
    ]
}

#[test]
fn ranks_in_slot_order_compute_the_one_rank_run_to_the_bit_and_dispatch_each_slot_once() {
    let dir = scratch("expert-parallel-slot-order");
    for (name, model, experts) in models() {
        let one = capture(&model, "", &dir.join(name).join("one"));
        let one_rank = tensors(&dir.join(name).join("one"));
        for ranks in [2usize, 4, 8] {
            let out = dir.join(name).join(format!("r{ranks}"));
            assert_eq!(capture(&model, &format!("parallel: (experts: {ranks}),"), &out), one, "{name} R={ranks}");
            let split = tensors(&out);
            for (path, array) in &one_rank {
                assert_eq!(
                    split.get(path),
                    Some(array),
                    "{name} R={ranks}: {} differs from one rank's",
                    path.display()
                );
            }
            let per_rank: Vec<&PathBuf> = split.keys().filter(|p| !one_rank.contains_key(*p)).collect();
            assert!(!per_rank.is_empty(), "{name} R={ranks}: no per-rank stage captured");
            for path in per_rank {
                let stage = path.file_stem().unwrap().to_str().unwrap();
                assert!(["moe_expert_map", "moe_dispatch", "moe_combine"].contains(&stage), "{}", path.display());
                let array = &split[path];
                assert_eq!(array.shape[0], ranks, "{}", path.display());
                if stage == "moe_dispatch" {
                    // Each slot lands on exactly one rank, and each rank's
                    // rows are 0, 1, 2, ... in slot order.
                    let ids = &split[&path.with_file_name("moe_router_indices.npy")];
                    let (d, ids) = (array.values(), ids.values());
                    let (t_len, k) = (array.shape[1], array.shape[2]);
                    for s in 0..t_len * k {
                        let on: Vec<usize> = (0..ranks).filter(|r| d[r * t_len * k + s] >= 0.0).collect();
                        let experts_per_rank = experts / ranks;
                        assert_eq!(on, [ids[s] as usize / experts_per_rank], "{} slot {s}", path.display());
                    }
                    for r in 0..ranks {
                        let rows: Vec<f64> =
                            d[r * t_len * k..(r + 1) * t_len * k].iter().copied().filter(|&x| x >= 0.0).collect();
                        assert_eq!(
                            rows,
                            (0..rows.len()).map(|i| i as f64).collect::<Vec<_>>(),
                            "{} rank {r}",
                            path.display()
                        );
                    }
                }
            }
        }
    }
}

/// A replicated expert served by its copy on another rank: the same
/// tensors as one rank, its slots received by the copy's rank.
#[test]
fn a_replica_serves_its_experts_tokens_and_changes_no_value() {
    let dir = scratch("expert-parallel-replica");
    let (_, model, _) = models().remove(0);
    let one = capture(&model, "", &dir.join("one"));
    let parallel = "parallel: (experts: 4, replicas: [(expert: 5, rank: 3)]),";
    assert_eq!(capture(&model, parallel, &dir.join("replica")), one);
    let (a, b) = (tensors(&dir.join("one")), tensors(&dir.join("replica")));
    for (path, array) in &a {
        assert_eq!(b.get(path), Some(array), "{}", path.display());
    }
    let mut served = 0;
    for (path, map) in b.iter().filter(|(p, _)| p.ends_with("moe_expert_map.npy")) {
        let map = map.values();
        assert!((0..4).all(|r| map[r * 16 + 5] == 3.0 && map[r * 16 + 4] == 1.0), "{}", path.display());
        let ids = b[&path.with_file_name("moe_router_indices.npy")].values();
        let d = b[&path.with_file_name("moe_dispatch.npy")].values();
        let n = ids.len();
        for s in (0..n).filter(|&s| ids[s] == 5.0) {
            let on: Vec<usize> = (0..4).filter(|r| d[r * n + s] >= 0.0).collect();
            assert_eq!(on, [3], "{} slot {s}", path.display());
            served += 1;
        }
    }
    assert!(served > 0, "expert 5 was never routed: pick another");
    // The manifest says how the run was split.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("replica/manifest.json")).unwrap()).unwrap();
    assert_eq!(
        manifest["parallel"],
        serde_json::json!({"experts": 4, "tensor": 1, "combine": "SlotOrder", "replicas": [[5, 3]]})
    );
    let one_rank: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("one/manifest.json")).unwrap()).unwrap();
    assert!(one_rank.get("parallel").is_none());
    let e = RunConfig::parse(
        &format!("(model: {model}, prompt: Tokens({PROMPT}), backend: Cpu, parallel: (experts: 4, replicas: [(expert: 5, rank: 1)]))"),
        Path::new("ep.ron"),
    )
    .map(|c| session::run(&c, Path::new("ep.ron"), &mut |_| {}).unwrap_err().to_string())
    .unwrap();
    assert!(e.contains("rank 1 holds expert 5 already"), "{e}");
}

#[test]
fn ranks_summed_in_rank_order_differ_from_one_rank_in_the_last_bits_only() {
    let dir = scratch("expert-parallel-rank-sum");
    let (name, model, _) = models().remove(0);
    let one = capture(&model, "", &dir.join("one"));
    let summed = capture(&model, "parallel: (experts: 4, combine: RankSum),", &dir.join("sum"));
    assert_eq!(one, summed, "{name}: the same tokens");
    let (a, b) = (tensors(&dir.join("one")), tensors(&dir.join("sum")));
    let mut differing = 0;
    for (path, array) in a.iter().filter(|(p, _)| p.ends_with("moe_ffn_out.npy")) {
        let (x, y) = (array.values(), b[path].values());
        let scale = x.iter().map(|v| v.abs()).fold(0.0, f64::max);
        // The first layer's sum differs by the reduction alone (a few
        // ulps); later layers carry what earlier ones moved.
        let first = path.starts_with("step-0/layer-0");
        let (mut err, mut norm) = (0.0, 0.0);
        for (u, v) in x.iter().zip(&y) {
            assert!(!first || (u - v).abs() <= 4.0 * f32::EPSILON as f64 * scale, "{}: {u} vs {v}", path.display());
            differing += usize::from(u != v);
            (err, norm) = (err + (u - v) * (u - v), norm + u * u);
        }
        assert!((err / norm).sqrt() < 1e-5, "{}: rel_l2 {}", path.display(), (err / norm).sqrt());
        // The partials add up to the sum.
        let partials = b[&path.with_file_name("moe_combine.npy")].values();
        let (ranks, n) = (4, y.len());
        for (i, v) in y.iter().enumerate() {
            let total: f64 = (0..ranks).map(|r| partials[r * n + i]).sum();
            assert!((total - v).abs() <= 4.0 * f32::EPSILON as f64 * scale);
        }
    }
    assert!(differing > 0, "rank order should move some last bits");
}

fn bisect_local(parallel: &str, faults: &str) -> compare::Report {
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe\", seed: 7), prompt: Tokens({PROMPT}), generate: 4, \
         reference: Cpu, target: CpuEmulating(Bf16), {parallel} faults: [{faults}])"
    );
    let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    let options = BisectOptions { local: true, ..BisectOptions::default() };
    bisect(&config, Path::new("b.ron"), &options, &mut |_, _| {}).unwrap()
}

#[test]
fn bisect_of_ranks_is_clean_and_names_the_rank_of_a_fault_in_a_partial_sum() {
    let parallel = "parallel: (experts: 4, combine: RankSum),";
    let clean = bisect_local(parallel, "");
    assert!(clean.findings().is_empty(), "{}", clean.render(false));
    assert!(clean.rows.iter().any(|r| r.stage == stage_types::SaveTensorStage::MoeCombine));
    assert!(
        clean.notes.iter().any(|n| n == "every pass ran on virtual ranks: 4 expert-parallel ranks (rank order)"),
        "{:?}",
        clean.notes
    );
    let faulty = bisect_local(parallel, "(stage: \"moe_combine\", layer: 1, step: 2, token: 0, kind: Scale(1.05))");
    let found = faulty.findings();
    assert_eq!(found.len(), 1, "{}", faulty.render(false));
    let row = found[0];
    assert_eq!(
        (row.stage, row.layer, row.step, row.worst_token),
        (stage_types::SaveTensorStage::MoeCombine, Some(1), 2, Some(0))
    );
    assert!(row.worst_rank.is_some_and(|r| r < 4), "{row:?}");
    assert!(faulty.render(false).contains("rank "), "{}", faulty.render(false));
}

#[test]
fn ranks_that_do_not_divide_the_experts_or_a_dense_model_are_refused_with_the_reason() {
    let refuse = |model: &str, backend: &str, parallel: &str| {
        let text = format!(
            "(model: {model}, prompt: Tokens({PROMPT}), generate: 1, backend: {backend}, parallel: {parallel})"
        );
        let config = RunConfig::parse(&text, Path::new("ep.ron")).unwrap();
        session::run(&config, Path::new("ep.ron"), &mut |_| {}).unwrap_err().to_string()
    };
    let moe = "Synthetic(preset: \"tiny-moe\", seed: 7)";
    let e = refuse(moe, "Cpu", "(experts: 3)");
    assert!(
        e.contains("parallel: 3 expert-parallel ranks cannot split 16 experts evenly (valid: 1, 2, 4, 8, 16)"),
        "{e}"
    );
    let e = refuse("Synthetic(preset: \"tiny-dense\", seed: 7)", "Cpu", "(experts: 2)");
    assert!(e.contains("no routed experts"), "{e}");
    let e = RunConfig::parse(
        &format!("(model: {moe}, prompt: Tokens({PROMPT}), backend: Cpu, parallel: (experts: 2, combine: Sideways))"),
        Path::new("ep.ron"),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("SlotOrder") && e.contains("RankSum"), "{e}");
}

fn bisect_bug(bug: &str) -> compare::Report {
    bisect_bug_with(bug, "")
}

/// [`bisect_bug`] with more of `parallel:` (e.g. its replicas).
fn bisect_bug_with(bug: &str, more: &str) -> compare::Report {
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe\", seed: 7), prompt: Tokens({PROMPT}), generate: 3, \
         reference: Cpu, target: CpuWithBug({bug}), parallel: (experts: 4, combine: RankSum, {more}))"
    );
    let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    let options = BisectOptions { local: true, ..BisectOptions::default() };
    bisect(&config, Path::new("b.ron"), &options, &mut |_, _| {}).unwrap()
}

/// The bugs between ranks, each found at its stage with its rank: a
/// dropped slot at moe_dispatch on the rank holding its expert (every MoE
/// layer of the prompt, nothing else), a rank's partial added twice at
/// moe_ffn_out, named by the partial the error equals, and a rank
/// weighting its experts' inputs at moe_expert_gate on that rank's experts.
#[test]
fn bugs_between_ranks_are_found_at_their_stage_and_rank() {
    use stage_types::SaveTensorStage as S;
    let dir = scratch("expert-parallel-bugs");
    capture("Synthetic(preset: \"tiny-moe\", seed: 7)", "parallel: (experts: 4, combine: RankSum),", &dir);
    let dropped = bisect_bug("DispatchDropped(3)");
    let found = dropped.findings();
    assert!(!found.is_empty(), "{}", dropped.render(false));
    for row in &found {
        let ids =
            compare::npy::read_npy(&dir.join(format!("step-0/layer-{}/moe_router_indices.npy", row.layer.unwrap())))
                .unwrap()
                .values();
        let holder = ids[3 * ids.len() / 9] as usize / 4;
        assert_eq!(
            (row.stage, row.step, row.worst_token, row.worst_rank),
            (S::MoeDispatch, 0, Some(3), Some(holder)),
            "{row:?}"
        );
    }
    let twice = bisect_bug("PartialAddedTwice(1)");
    let found = twice.findings();
    assert!(found.len() >= 4, "{}", twice.render(false));
    for row in &found {
        assert_eq!((row.stage, row.worst_rank), (S::MoeFfnOut, Some(1)), "{row:?}");
    }
    assert!(twice.render(false).contains("rank 1"), "{}", twice.render(false));
    // Expert 5 (home: rank 1) copied to rank 3; rank 1's view still sends
    // it home: found at moe_expert_map on rank 1, and nowhere else.
    let stale = bisect_bug_with("ReplicaMismatch(1)", "replicas: [(expert: 5, rank: 3)]");
    let found = stale.findings();
    assert!(!found.is_empty(), "{}", stale.render(false));
    for row in &found {
        assert_eq!((row.stage, row.worst_rank), (S::MoeExpertMap, Some(1)), "{row:?}");
    }
    // Rank 2 weighting its experts' inputs instead of their outputs: its
    // experts' gate and up first, then its partial sum, all on rank 2.
    let before = bisect_bug("WeightBeforeExperts(2)");
    let found = before.findings();
    assert!(!found.is_empty(), "{}", before.render(false));
    assert_eq!(found[0].stage, S::MoeExpertGate, "{}", before.render(false));
    for row in &found {
        assert!(matches!(row.stage, S::MoeExpertGate | S::MoeExpertUp | S::MoeCombine), "{row:?}");
        assert_eq!(row.worst_rank, Some(2), "{row:?}");
    }
}

#[test]
fn a_bug_between_ranks_without_ranks_is_refused_with_what_to_add() {
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe\", seed: 7), prompt: Tokens({PROMPT}), generate: 2, \
         reference: Cpu, target: CpuWithBug(PartialAddedTwice(1)), parallel: (experts: 4))"
    );
    let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
    let e = bisect(&config, Path::new("b.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("combine: RankSum"), "{e}");
    // Every bug between ranks, in a run without ranks.
    for bug in pipeline::backend::cpu::known_bugs::KnownBug::RANKS {
        let text = text.replace("PartialAddedTwice(1)", &format!("{bug:?}")).replace(", parallel: (experts: 4)", "");
        let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
        let e = bisect(&config, Path::new("b.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap_err().to_string();
        assert!(e.contains("parallel: (experts: R)"), "{bug:?}: {e}");
    }
    // A stale replica view needs replicas.
    let config =
        BisectConfig::parse(&text.replace("PartialAddedTwice(1)", "ReplicaMismatch(1)"), Path::new("b.ron")).unwrap();
    let e = bisect(&config, Path::new("b.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("add `replicas: [(expert: e, rank: r)]`"), "{e}");
}

/// Tensor-parallel ranks: the row-split projections (o_proj here; the
/// shared expert's down_proj in Qwen2-MoE) add their ranks' f32 partial
/// sums in rank order, a few ulps from one rank's sum; every stage before
/// the first of them is the one-rank bits; the tokens are the same.
#[test]
fn tensor_ranks_move_the_row_split_projections_by_a_rounding_only() {
    let dir = scratch("tensor-parallel");
    for (name, model, _) in models() {
        let one = capture(&model, "", &dir.join(name).join("one"));
        let two = capture(&model, "parallel: (tensor: 2),", &dir.join(name).join("two"));
        assert_eq!(one, two, "{name}");
        let (a, b) = (tensors(&dir.join(name).join("one")), tensors(&dir.join(name).join("two")));
        let first = Path::new("step-0/layer-0");
        for stage in ["attn_norm", "qkv_matmul", "attention"] {
            let path = first.join(format!("{stage}.npy"));
            assert_eq!(a[&path], b[&path], "{name}: {stage} before any row-split projection");
        }
        let path = first.join("attn_out.npy");
        let (x, y) = (a[&path].values(), b[&path].values());
        let scale = x.iter().map(|v| v.abs()).fold(0.0, f64::max);
        assert!(x.iter().zip(&y).all(|(u, v)| (u - v).abs() <= 4.0 * f32::EPSILON as f64 * scale), "{name}");
        assert!(x.iter().zip(&y).any(|(u, v)| u != v), "{name}: two ranks' partials should move some last bits");
        if name == "tiny-qwen2-moe" {
            let path = first.join("moe_shared_out.npy");
            assert_ne!(a[&path], b[&path], "{name}: the shared expert's down_proj is split too");
        }
    }
    let clean = bisect_local("parallel: (tensor: 2, experts: 4, combine: RankSum),", "");
    assert!(clean.findings().is_empty(), "{}", clean.render(false));
}

#[test]
fn tensor_ranks_that_do_not_divide_the_heads_are_refused_with_the_valid_counts() {
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe\", seed: 7), prompt: Tokens({PROMPT}), generate: 1, backend: Cpu, parallel: (tensor: 3))"
    );
    let config = RunConfig::parse(&text, Path::new("tp.ron")).unwrap();
    let e = session::run(&config, Path::new("tp.ron"), &mut |_| {}).unwrap_err().to_string();
    assert!(
        e.contains(
            "parallel: 3 tensor-parallel ranks cannot split 4 query heads, 2 key-value heads evenly (valid: 1, 2)"
        ),
        "{e}"
    );
}

/// The shipped example finds what its comment says it finds.
#[test]
fn the_ranks_example_config_names_rank_2() {
    let path = workspace_root().join("configs/bisect-ranks.ron");
    let config = BisectConfig::load(&path).unwrap();
    let options = BisectOptions { local: true, ..BisectOptions::default() };
    let report = bisect(&config, &path, &options, &mut |_, _| {}).unwrap();
    let found = report.findings();
    assert!(!found.is_empty() && found.iter().all(|r| r.worst_rank == Some(2)), "{}", report.render(false));
}

/// A capture that names only per-rank stages of a run without ranks would
/// capture nothing: refused with what they need.
#[test]
fn capturing_only_per_rank_stages_without_ranks_is_refused() {
    let dir = scratch("per-rank-without-ranks");
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe\", seed: 7), prompt: Tokens({PROMPT}), generate: 1, backend: Cpu, \
         capture: (out_dir: {:?}, stages: \"moe_dispatch,moe_combine\"))",
        dir.join("out")
    );
    let config = RunConfig::parse(&text, Path::new("ep.ron")).unwrap();
    let e = session::run(&config, Path::new("ep.ron"), &mut |_| {}).unwrap_err().to_string();
    assert!(
        e.contains("capture.stages: moe_dispatch, moe_combine are produced by no selected layer")
            && e.contains("parallel: (experts: R)")
            && e.contains("nothing would be captured"),
        "{e}"
    );
    assert!(!dir.join("out").exists(), "nothing is written");
}

/// A row-split projection's bias added on every tensor-parallel rank
/// before the all-reduce (TGI #1036, nano-vllm #99): gpt-oss's o_proj,
/// found by bisect --local at attn_out and nowhere else, in every layer;
/// the same two ranks without the bug have no finding; the bug is refused
/// without tensor ranks, and on a model whose row-split projections have
/// no bias.
#[test]
fn a_bias_added_on_every_tensor_rank_is_found_at_attn_out() {
    use stage_types::SaveTensorStage as S;
    let dir = workspace_root().join("tests/fixtures/tiny-gpt-oss-oracle/model");
    let run = |model: &str, target: &str, parallel: &str| {
        let text = format!(
            "(model: {model}, prompt: Tokens([1, 17, 42, 99, 5, 77, 3]), generate: 3, reference: Cpu, \
             target: {target}, {parallel})"
        );
        let config = BisectConfig::parse(&text, Path::new("b.ron")).unwrap();
        let options = BisectOptions { local: true, ..BisectOptions::default() };
        bisect(&config, Path::new("b.ron"), &options, &mut |_, _| {})
    };
    let oss = format!("Path({dir:?})");
    let clean = run(&oss, "Cpu", "parallel: (tensor: 2)").unwrap();
    assert!(clean.findings().is_empty(), "{}", clean.render(false));
    let bug = run(&oss, "CpuWithBug(BiasOnEveryRank)", "parallel: (tensor: 2)").unwrap();
    let found = bug.findings();
    assert!(!found.is_empty(), "{}", bug.render(false));
    for row in &found {
        assert_eq!(row.stage, S::AttnOut, "{row:?}");
        // The extra bias is the same vector on every prompt token, and
        // the report says so (a decode step has one token).
        assert_eq!(row.same_offset.is_some_and(|o| o > 0.0), row.step == 0, "{row:?}");
    }
    assert!(bug.render(false).contains("the same error vector on every token in each"), "{}", bug.render(false));
    // The decode steps (one token each) point to what the prompt showed.
    assert!(bug.render(false).contains("one token a step; at the prompt"), "{}", bug.render(false));
    let layers: std::collections::BTreeSet<_> = found.iter().filter_map(|r| r.layer).collect();
    assert_eq!(layers.len(), 3, "every layer's o_proj has the bias twice: {}", bug.render(false));
    let e = run(&oss, "CpuWithBug(BiasOnEveryRank)", "").unwrap_err().to_string();
    assert!(e.contains("parallel: (tensor: T)"), "{e}");
    let tiny = "Synthetic(preset: \"tiny-moe\", seed: 7)";
    let e = run(tiny, "CpuWithBug(BiasOnEveryRank)", "parallel: (tensor: 2)").unwrap_err().to_string();
    assert!(e.contains("gpt-oss's o_proj"), "{e}");
}
