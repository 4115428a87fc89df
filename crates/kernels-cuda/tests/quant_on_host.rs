//! The quantized-weight kernel code checked on the CPU: `host/quant_on_host.cpp`
//! compiles kernels/quant.cu (with blocks.cuh) with the host's C++
//! compiler, the few CUDA intrinsics it uses defined with the same IEEE
//! semantics, and checks the fast decoders and the decode-step dot
//! products value for value against the file's one-value reference
//! decoder. This runs where no GPU is (CI); the GPU tests check the same
//! code compiled by NVRTC against the Rust decoder.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The first C++ compiler found: `$CXX`, else c++, g++, clang++.
fn cxx() -> Option<String> {
    let candidates = std::env::var("CXX").into_iter().chain(["c++", "g++", "clang++"].map(String::from));
    candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

#[test]
fn quantized_kernel_code_decodes_every_value_as_the_reference_decoder() {
    let Some(compiler) = cxx() else {
        let why = "no C++ compiler ($CXX, c++, g++ or clang++) to build tests/host/quant_on_host.cpp";
        assert!(std::env::var_os("MOETRACE_CI").is_none(), "{why}: CI must run this test (.ci/run installs one)");
        eprintln!("SKIPPED: {why}");
        return;
    };
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/host/quant_on_host.cpp");
    let dir: PathBuf = std::env::temp_dir().join(format!("moetrace-quant-on-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating a temporary directory");
    let exe = dir.join("quant_on_host");
    let build = Command::new(&compiler)
        .args(["-std=c++17", "-O1", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", "-o"])
        .arg(&exe)
        .arg(&source)
        .output()
        .expect("running the C++ compiler");
    assert!(
        build.status.success(),
        "{compiler} could not build {}:\n{}",
        source.display(),
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe).output().expect("running the host build of the kernels");
    let report = String::from_utf8_lossy(&run.stdout);
    eprintln!("{report}");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(run.status.success(), "the host build of the quantized kernels differs from the reference:\n{report}");
    assert!(report.contains("all identical"));
}
