//! The backend-parity harness the GPU parity tests share (included with
//! `#[path = "common/parity.rs"] mod parity;`): seeded random weights and
//! inputs, and [`Pair`], which runs one operation on the CPU and the CUDA
//! backend and compares what each wrote. Each target uses a part of it.
#![allow(dead_code, reason = "each test target uses a part of the harness")]

use pipeline::backend::Backend;
use pipeline::backend::contract::{NumericContract, Precision};
use pipeline::weights::{WeightDtype, WeightId, WeightStore, WeightTensor, synthetic_value, tensor_key};
use pipeline::{CpuBackend, CudaBackend, HostTensor};
use stage_types::SaveTensorStage as S;

/// Seeded values of one name.
pub fn random(name: &str, n: usize, mean: f32, std: f32) -> Vec<f32> {
    let key = tensor_key(11, name);
    (0..n).map(|i| synthetic_value(key, i as u64, mean, std)).collect()
}

/// A seeded f32 weight.
pub fn weight(store: &mut WeightStore, name: &str, shape: Vec<usize>, mean: f32, std: f32) -> WeightId {
    let n = shape.iter().product();
    let bytes = random(name, n, mean, std).iter().flat_map(|v| v.to_le_bytes()).collect();
    store.insert(WeightTensor::owned(name.into(), WeightDtype::F32, shape, bytes))
}

/// The nearest bf16 value (round to nearest even), as f32.
pub fn bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    f32::from_bits((bits + 0x7fff + ((bits >> 16) & 1)) & 0xffff_0000)
}

/// The two backends, and the table of what was compared.
pub struct Pair {
    /// The reference.
    pub cpu: CpuBackend,
    /// The backend under test.
    pub gpu: CudaBackend,
    /// One line per comparison.
    pub rows: Vec<String>,
    /// Comparisons that failed.
    pub failures: usize,
    /// Bf16 mode: every float output except the routing stages must hold
    /// bf16 values only (rounded at the store).
    pub bf16: bool,
}

impl Pair {
    /// Writes the same input to both backends.
    pub fn put(&mut self, slot: S, t: HostTensor) {
        self.cpu.write(slot, &t).unwrap();
        self.gpu.write(slot, &t).unwrap();
    }

    /// Compares the greedy choice of `slot`'s last row on both backends.
    pub fn argmax(&mut self, slot: S, what: &str, shape: &str) {
        let (a, g) = (self.cpu.argmax_last_row(slot).unwrap(), self.gpu.argmax_last_row(slot).unwrap());
        self.rows.push(format!(
            "{:<16} {:<20} {:<26} f32  exact       argmax {a} vs {g}{:<20} {}",
            "argmax",
            what,
            shape,
            "",
            if a == g { "ok" } else { "FAIL" }
        ));
        self.failures += usize::from(a != g);
    }

    /// Runs `op` on both backends and compares `outputs`.
    pub fn case(
        &mut self,
        name: &str,
        shape: &str,
        tolerance: f64,
        outputs: &[S],
        op: impl Fn(&mut dyn Backend) -> pipeline::Result<()>,
    ) {
        op(&mut self.cpu).unwrap_or_else(|e| panic!("{name} on cpu: {e}"));
        op(&mut self.gpu).unwrap_or_else(|e| panic!("{name} on cuda: {e}"));
        for &slot in outputs {
            let (a, b) = (self.cpu.read(slot).unwrap(), self.gpu.read(slot).unwrap());
            let (ok, measure) = if a.shape != b.shape {
                (false, format!("shape {:?} vs {:?}", a.shape, b.shape))
            } else if let (Some(x), Some(y)) = (a.as_i32(), b.as_i32()) {
                (x == y, format!("ids {}", if x == y { "identical" } else { "DIFFER" }))
            } else {
                let (x, y) = (a.to_f64(), b.to_f64());
                let diff: f64 = x.iter().zip(&y).map(|(p, q)| (p - q) * (p - q)).sum();
                let norm: f64 = x.iter().map(|p| p * p).sum();
                let rel = if diff == 0.0 { 0.0 } else { (diff / norm).sqrt() };
                // What the Bf16 contract keeps in f32 (the router's
                // outputs) is not rounded.
                let routing = NumericContract::BF16.output(slot) != Some(Precision::Bf16);
                let unrounded =
                    if self.bf16 && !routing { y.iter().filter(|&&q| q as f32 != bf16(q as f32)).count() } else { 0 };
                let extra = if unrounded > 0 { format!(", {unrounded} NOT bf16") } else { String::new() };
                (rel <= tolerance && unrounded == 0, format!("rel_l2 {rel:.2e} (NMSE {:.2e}){extra}", rel * rel))
            };
            self.failures += usize::from(!ok);
            self.rows.push(format!(
                "{:<16} {:<20} {:<26} {:<4} tol {tolerance:.0e}  {measure:<32} {}",
                name,
                slot.name(),
                shape,
                if self.bf16 { "bf16" } else { "f32" },
                if ok { "ok" } else { "FAIL" }
            ));
        }
    }

    /// Prints the table and fails on any failed comparison.
    pub fn finish(self) {
        println!(
            "{:<16} {:<20} {:<26} {:<4} {:<11} {:<32} result",
            "op", "output", "shapes", "type", "tolerance", "measure"
        );
        for row in &self.rows {
            println!("{row}");
        }
        assert_eq!(self.failures, 0, "{} parity failures", self.failures);
    }
}

/// A weight of bf16 values (so the Bf16 backend's conversion is exact and
/// both backends multiply by the same numbers).
pub fn weight_bf16(store: &mut WeightStore, name: &str, shape: Vec<usize>, mean: f32, std: f32) -> WeightId {
    let values: Vec<f32> = random(name, shape.iter().product(), mean, std).into_iter().map(bf16).collect();
    let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    store.insert(WeightTensor::owned(name.into(), WeightDtype::F32, shape, bytes))
}
