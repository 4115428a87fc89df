//! The `Cuda(dtype: F64)` reference's kernel (kernels-cuda's
//! kernels/reference.cu) checked on the CPU: compiled by the host's C++
//! compiler (crates/kernels-cuda/tests/host/reference_on_host.cpp), run one
//! thread per block, its every output must be math.rs's product to the bit,
//! for f32 and bf16 weights, with and without the Bf16 contract's weight
//! rounding, at lengths that end on and off a group of eight and on and
//! off the kernel's shared-memory chunk, with NaN, infinities and
//! subnormals (a NaN's sign and payload excepted: any NaN meets NaN).
//! This runs where no GPU is (CI); tests/gpu_reference.rs
//! holds the device's captures to the CPU's.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use pipeline::backend::contract::Precision;
use pipeline::backend::cpu::math::matmul_t_as;
use pipeline::weights::gguf::GgmlType;
use pipeline::weights::{WeightDtype, WeightTensor};

/// The first C++ compiler found: `$CXX`, else c++, g++, clang++.
fn cxx() -> Option<String> {
    let candidates = std::env::var("CXX").into_iter().chain(["c++", "g++", "clang++"].map(String::from));
    candidates.into_iter().find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
}

/// Builds the host harness into a folder of its own (`tag`: one per test,
/// which removes it); None (after saying so) without a compiler.
fn build(tag: &str) -> Option<PathBuf> {
    let Some(compiler) = cxx() else {
        let why = "no C++ compiler ($CXX, c++, g++ or clang++) to build reference_on_host.cpp";
        assert!(std::env::var_os("MOETRACE_CI").is_none(), "{why}: CI must run this test (.ci/run installs one)");
        eprintln!("SKIPPED: {why}");
        return None;
    };
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernels-cuda/tests/host/reference_on_host.cpp");
    let dir = std::env::temp_dir().join(format!("moetrace-reference-on-host-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("reference_on_host");
    let built = Command::new(&compiler)
        .args(["-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", "-o"])
        .arg(&exe)
        .arg(&source)
        .output()
        .expect("running the C++ compiler");
    assert!(built.status.success(), "{compiler}: {}", String::from_utf8_lossy(&built.stderr));
    Some(exe)
}

/// The kernel's `[m, n]` outputs for inputs `xs` and weight `w`.
fn kernel(exe: &Path, xs: &[Vec<f32>], w: &WeightTensor, round_bf16: bool) -> Vec<f32> {
    let (m, n, k) = (xs.len(), w.shape[0], w.row_len());
    let format = match w.dtype {
        WeightDtype::F32 => 0,
        WeightDtype::F16 => 1,
        WeightDtype::Bf16 => 30,
        WeightDtype::Quant(kind) => kind.0 as usize,
        other => panic!("{other:?} is not a format of the reference kernel"),
    };
    let mut input = Vec::new();
    for v in [m, n, k, format, usize::from(round_bf16), w.bytes().len()] {
        input.extend_from_slice(&(v as i32).to_le_bytes());
    }
    for c in 0..k {
        for x in xs {
            input.extend_from_slice(&x[c].to_le_bytes());
        }
    }
    input.extend_from_slice(&w.bytes());
    let mut child = Command::new(exe).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the host build of reference.cu failed: {:?}", out.status);
    out.stdout.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// A value stream with a wide spread of exponents and subnormals; with
/// `specials` = r > 0, NaN, +inf and -inf each one value in r. With `big`
/// = b > 0 instead: inputs of +-1 and weights of +-1, or +-2^60 one in b:
/// a few products of +-2^60 that often cancel exactly, and between them
/// products of +-1 that a running sum near 2^60 absorbs, so that any other
/// summation order shows in the f32 result (f64 sums of ordinary values
/// round to the same f32 in almost any order).
struct Values {
    state: u64,
    specials: u64,
    big: u64,
}

impl Values {
    fn input(&mut self) -> f32 {
        self.next(false)
    }

    fn weight(&mut self) -> f32 {
        self.next(true)
    }

    fn next(&mut self, weight: bool) -> f32 {
        self.state = self.state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let r = self.state >> 11;
        if self.big > 0 {
            let sign = if r & 1 == 0 { 1.0 } else { -1.0 };
            return sign * if weight && (r >> 1).is_multiple_of(self.big) { 2f32.powi(60) } else { 1.0 };
        }
        let special = if self.specials > 0 { r % self.specials } else { u64::MAX };
        match (special, r % 997) {
            (0, _) => f32::NAN,
            (1, _) => f32::INFINITY,
            (2, _) => f32::NEG_INFINITY,
            (_, 2 | 3) => -1e-40 * (r % 7) as f32, // subnormal
            _ => ((r % 2_000_001) as f32 / 1e6 - 1.0) * 2f32.powi((r % 13) as i32 - 6),
        }
    }
}

#[test]
fn the_reference_kernel_computes_maths_product_to_the_bit() {
    let Some(exe) = build("plain") else { return };
    let (mut checked, mut nan) = (0, 0);
    let cases = [(1, 3, 1), (3, 5, 7), (2, 4, 8), (5, 3, 9), (4, 6, 2880), (2, 3, 4099), (3, 2, 8200), (1, 2, 12301)];
    // Finite values, the short cases again with NaN and infinities, then
    // every case with a few huge weights a row (2 to 4 expected).
    let runs = cases.iter().map(|&c| (c, 0, 0));
    let runs = runs.chain(cases[..4].iter().map(|&c| (c, 23, 0)));
    let runs = runs.chain(cases.iter().map(|&(m, n, k)| ((4 * m, 8 * n, k), 0, (k as u64 / 3).max(2))));
    for (run, ((m, n, k), specials, big)) in runs.enumerate() {
        let mut values = Values { state: 0x5eed + run as u64, specials, big };
        let xs: Vec<Vec<f32>> = (0..m).map(|_| (0..k).map(|_| values.input()).collect()).collect();
        let raw: Vec<f32> = (0..n * k).map(|_| values.weight()).collect();
        let f32_bytes: Vec<u8> = raw.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = raw.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        let tensors = [
            WeightTensor::owned("w32".into(), WeightDtype::F32, vec![n, k], f32_bytes),
            WeightTensor::owned("w16".into(), WeightDtype::Bf16, vec![n, k], bf16_bytes),
        ];
        let inputs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
        for w in &tensors {
            for weights in [Precision::F32, Precision::Bf16] {
                let expected = matmul_t_as(&inputs, w, weights);
                let got = kernel(&exe, &xs, w, weights == Precision::Bf16);
                assert_eq!(got.len(), expected.len());
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    // A NaN's sign and payload are the machine's (IEEE
                    // leaves them open; x86 makes a negative default NaN,
                    // a GPU one canonical NaN): NaN must meet NaN.
                    if e.is_nan() {
                        nan += 1;
                        assert!(g.is_nan(), "{m}x{n}x{k} {} as {weights:?}: output {i}: {g} vs NaN", w.name);
                        continue;
                    }
                    assert_eq!(
                        g.to_bits(),
                        e.to_bits(),
                        "{}x{}x{} {} as {weights:?}: output {i}: {g} vs {e}",
                        m,
                        n,
                        k,
                        w.name
                    );
                }
                checked += got.len();
            }
        }
    }
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
    eprintln!("{checked} outputs identical ({nan} of them NaN on both)");
    assert!(nan > 0 && nan * 2 < checked, "{nan} NaN of {checked}: the cases must hold both");
}

/// Random blocks of `kind` for `values` values: every byte random, but the
/// f16 scales kept finite and modest (exponents 1 to 20) and MXFP4's e8m0
/// exponent spread around 127.
fn random_blocks(kind: GgmlType, values: usize, seed: u64) -> Vec<u8> {
    let (len, bytes) = (kind.block_len().unwrap() as usize, kind.block_bytes().unwrap() as usize);
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as u8
    };
    let mut out = Vec::with_capacity(values / len * bytes);
    for _ in 0..values / len {
        let mut block: Vec<u8> = (0..bytes).map(|_| next()).collect();
        let half = |block: &mut Vec<u8>, at: usize, r: u8| {
            let h: u16 = (u16::from(r & 0x80) << 8) | ((u16::from(r % 20) + 1) << 10) | u16::from(r & 0x3f);
            block[at..at + 2].copy_from_slice(&h.to_le_bytes());
        };
        match kind {
            GgmlType::Q8_0 => half(&mut block, 0, next()),
            GgmlType::Q4_K | GgmlType::Q5_K => {
                half(&mut block, 0, next());
                half(&mut block, 2, next());
            }
            GgmlType::Q6_K => half(&mut block, 208, next()),
            GgmlType::MXFP4 => block[0] = 110 + next() % 36,
            _ => {}
        }
        out.extend(block);
    }
    out
}

/// The block formats a GGUF model holds, decoded by the kernel's own
/// decoders: every output math.rs's product over pipeline's decoders, to
/// the bit, rows of one block and rows that cross the kernel's chunk.
#[test]
fn the_reference_kernel_decodes_every_block_format_as_the_reference() {
    let Some(exe) = build("blocks") else { return };
    let mut checked = 0;
    for kind in [GgmlType::Q8_0, GgmlType::MXFP4, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::F16] {
        let len = kind.block_len().unwrap() as usize;
        for (m, n, blocks) in [(1, 3, 1), (3, 2, 17 * 256 / len), (2, 2, 2)] {
            let k = blocks * len;
            let seed = u64::from(kind.0) * 1000 + k as u64;
            let mut values = Values { state: seed, specials: 0, big: 0 };
            let xs: Vec<Vec<f32>> = (0..m).map(|_| (0..k).map(|_| values.input()).collect()).collect();
            let bytes = if kind == GgmlType::F16 {
                (0..n * k).flat_map(|_| half::f16::from_f32(values.weight()).to_le_bytes()).collect()
            } else {
                random_blocks(kind, n * k, seed)
            };
            let dtype = if kind == GgmlType::F16 { WeightDtype::F16 } else { WeightDtype::Quant(kind) };
            let w = WeightTensor::owned(kind.name().to_string(), dtype, vec![n, k], bytes);
            let inputs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
            for weights in [Precision::F32, Precision::Bf16] {
                let expected = matmul_t_as(&inputs, &w, weights);
                let got = kernel(&exe, &xs, &w, weights == Precision::Bf16);
                for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        e.to_bits(),
                        "{} {m}x{n}x{k} as {weights:?}: output {i}: {g} vs {e}",
                        kind.name()
                    );
                }
                assert!(expected.iter().all(|v| v.is_finite()), "{}: the case should be finite", kind.name());
                checked += got.len();
            }
        }
    }
    let _ = std::fs::remove_dir_all(exe.parent().unwrap());
    eprintln!("{checked} outputs over block formats identical");
}
