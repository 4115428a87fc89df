//! Helpers shared by the CLI test files: a scratch folder per test, the
//! binary, and the checks every failure must pass (exit 2, no panic, the
//! expected words on stderr).

#![allow(dead_code, reason = "each test file uses a different subset")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Says why a test checked nothing, on a user's machine; fails under CI
/// (`MOETRACE_CI`, set by .ci/run, which installs every tool a test needs).
pub fn skip(why: &str) {
    if std::env::var_os("MOETRACE_CI").is_some() {
        panic!("{why}: CI must run this test (.ci/run installs what it needs and sets MOETRACE_CI)");
    }
    eprintln!("SKIPPED: {why}");
}

/// An empty folder for one test, under cargo's target tmp dir.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `moetrace` with `args`, output captured.
pub fn moetrace(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moetrace")).args(args).output().unwrap()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Checks exit code 2, no panic, and every needle on stderr.
pub fn expect_error(output: &Output, needles: &[&str]) {
    let stderr = stderr(output);
    assert_eq!(output.status.code(), Some(2), "exit code; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks `{n}`:\n{stderr}");
    }
}

/// Writes `(body)` as `<dir>/<name>.ron` and runs it; returns the output.
pub fn run(dir: &Path, name: &str, body: &str) -> Output {
    let path = dir.join(format!("{name}.ron"));
    std::fs::write(&path, format!("({body})")).unwrap();
    moetrace(&["run", "-q", "--config", path.to_str().unwrap()])
}

/// A capture of the 2-layer tiny-moe model at `<dir>/<name>`, with `extra`
/// config fields (each ending in a comma).
pub fn capture(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let out = dir.join(name);
    let body = format!(
        "model: Synthetic(preset: \"tiny-moe\", seed: 1, layers: 2), prompt: Tokens([3, 4, 5]), {extra} capture: (out_dir: {out:?})"
    );
    let output = run(dir, name, &body);
    assert!(output.status.success(), "{}", stderr(&output));
    out
}

/// Names of leftover temporary or moved-aside folders in `dir`.
pub fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("moetrace-tmp") || n.contains("moetrace-old"))
        .collect()
}
