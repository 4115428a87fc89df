//! [`DeviceProducts`]: somewhere else to compute the CPU reference's matrix
//! products, to the bit. The products are almost all of the reference's
//! time; computed in math.rs's exact order (eight f64 lanes combined in
//! one fixed order, no fused multiply-add) they give the same bits on any
//! IEEE machine. Everything else the reference computes stays this
//! backend's own code, so a backend with device products is the reference,
//! not a second implementation of it (`Cuda(dtype: F64)`:
//! backend/cuda/reference_products.rs).

use crate::backend::contract::Precision;
use crate::weights::WeightTensor;

/// Computes [`super::math::matmul_t_as`] elsewhere.
pub trait DeviceProducts: Send + Sync {
    /// `math::matmul_t_as(inputs, w, weights)`, the same to the bit; None
    /// where this does not take `w` (its type, or no room for it): the CPU
    /// computes that product itself. A device that fails says so once and
    /// returns None from then on (the results stay the reference's).
    fn matmul_t(&self, inputs: &[&[f32]], w: &WeightTensor, weights: Precision) -> Option<Vec<f32>>;

    /// One line for reports: the device and what it computed so far.
    fn describe(&self) -> String;

    /// The backend's name in manifests while these products are used,
    /// e.g. `cuda-f64`.
    fn backend_name(&self) -> &'static str;
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::backend::cpu::{CpuBackend, math};
    use crate::backend::{Backend, contract::NumericContract};
    use crate::model::Model;
    use crate::{Forward, HostTensor};
    use stage_types::SaveTensorStage as S;

    /// Computes the products with math.rs itself (a device would run
    /// kernels/reference.cu), taking only tensors of `take` rows or more
    /// and counting what it took.
    struct Counting {
        take: usize,
        taken: AtomicUsize,
        declined: AtomicUsize,
    }

    impl DeviceProducts for Counting {
        fn matmul_t(&self, inputs: &[&[f32]], w: &WeightTensor, weights: Precision) -> Option<Vec<f32>> {
            if w.shape[0] < self.take {
                self.declined.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            self.taken.fetch_add(1, Ordering::Relaxed);
            Some(math::matmul_t_as(inputs, w, weights))
        }
        fn describe(&self) -> String {
            format!("{} taken", self.taken.load(Ordering::Relaxed))
        }
        fn backend_name(&self) -> &'static str {
            "counting"
        }
    }

    fn last_logits(model: &Model, backend: CpuBackend) -> (String, Vec<u32>, HostTensor) {
        let name = backend.name().to_string();
        let mut forward = Forward::new(model, Box::new(backend));
        let generation = forward.generate(&[5, 9, 200, 31, 7], 3, &mut |_| {}).unwrap();
        (name, generation.generated, forward.backend_mut().read(S::LmHead).unwrap())
    }

    /// Every projection of the MoE model, the experts' included, goes to
    /// the products where they take it and to the pool where they decline;
    /// the run is the reference's either way, in each contract (llama.cpp's
    /// converts the inputs first, then the same product).
    #[test]
    fn products_taken_or_declined_leave_every_result_the_references() {
        let model = Model::synthetic("tiny-moe", 3, None).unwrap();
        for contract in [NumericContract::REFERENCE, NumericContract::BF16, NumericContract::llama_cpp_cpu(true)] {
            let cpu = CpuBackend::new(model.store.clone(), Some(1)).unwrap().with_contract(contract);
            let (name, tokens, logits) = last_logits(&model, cpu);
            assert_eq!(name, "cpu");
            for take in [0, 100, usize::MAX] {
                let products = Arc::new(Counting { take, taken: AtomicUsize::new(0), declined: AtomicUsize::new(0) });
                let backend = CpuBackend::new(model.store.clone(), Some(1))
                    .unwrap()
                    .with_contract(contract)
                    .with_device_products(products.clone());
                let (name, t, l) = last_logits(&model, backend);
                assert_eq!(name, "counting");
                assert_eq!((t, l.as_f32().unwrap()), (tokens.clone(), logits.as_f32().unwrap()), "take {take}");
                let (taken, declined) =
                    (products.taken.load(Ordering::Relaxed), products.declined.load(Ordering::Relaxed));
                match take {
                    0 => assert!(taken > 0 && declined == 0),
                    usize::MAX => assert!(taken == 0 && declined > 0),
                    _ => assert!(taken > 0 && declined > 0, "{taken} taken, {declined} declined"),
                }
            }
        }
    }
}
