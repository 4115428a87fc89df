//! diff throughput (not a test): GB of tensors compared per second on an
//! all-stage capture of one step of the qwen3-30b-a3b synthetic model cut
//! to 2 layers (prompt 16 tokens). `cargo bench -p session --bench
//! diff_throughput`; results in BENCHMARKS.md.

use std::path::Path;
use std::time::Instant;

use compare::diff::{DiffOptions, diff};
use session::RunConfig;

fn main() {
    let dir = std::env::temp_dir().join(format!("moetrace-diff-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (name, faults) in [("a", ""), ("b", "(stage: \"post_ffn_residual\", layer: 1, kind: Scale(1.001))")] {
        let text = format!(
            "(model: Synthetic(preset: \"qwen3-30b-a3b\", seed: 7, layers: 2), prompt: Tokens([{}]), faults: [{faults}], capture: (out_dir: {:?}))",
            (0..16).map(|i| (i * 7919 % 151_936).to_string()).collect::<Vec<_>>().join(", "),
            dir.join(name)
        );
        let config = RunConfig::parse(&text, Path::new("bench.ron")).unwrap();
        let out = session::run(&config, Path::new("bench.ron"), &mut |_| {}).unwrap();
        println!(
            "capture {name}: {} tensors, {:.1} MB",
            out.summary.tensors_written,
            out.summary.bytes_written as f64 / 1e6
        );
    }
    let bytes: u64 = ["a", "b"].iter().flat_map(|n| walk(&dir.join(n))).sum();
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let report = diff(&dir.join("a"), &dir.join("b"), &DiffOptions::default()).unwrap();
        times.push(t.elapsed().as_secs_f64());
        assert!(report.first_divergence().is_some());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "diff: {:.1} MB of .npy (both sides) in {:.3} s median of 5 (min {:.3}): {:.2} GB/s",
        bytes as f64 / 1e6,
        median,
        times[0],
        bytes as f64 / median / 1e9
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn walk(dir: &Path) -> Vec<u64> {
    let mut sizes = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            sizes.extend(walk(&path));
        } else if path.extension().is_some_and(|x| x == "npy") {
            sizes.push(entry.metadata().unwrap().len());
        }
    }
    sizes
}
