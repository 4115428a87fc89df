//! [`Model`]'s synthetic constructors: a preset's weights made in memory,
//! computed where they are read, or made on the device by the CUDA
//! backend, and the rule that picks between the first two on the host.

use super::{Model, ModelSource};
use crate::config::ModelConfig;
use crate::error::{PipelineError, Result};
use crate::weights::{SyntheticPreset, WeightStore};

/// Synthetic weights above this many bytes are computed where they are
/// read rather than stored, for a command of few decode steps
/// ([`Model::synthetic_for_steps`]).
pub const ON_READ_ABOVE_BYTES: usize = 1 << 30;

/// The most decode steps a pass may take for [`ON_READ_ABOVE_BYTES`] to
/// apply: past it, every step's second generation of the routed weights
/// outweighs storing them once.
pub const ON_READ_MAX_STEPS: usize = 64;

/// Whether synthetic weights of `bytes` for passes of `steps` decode
/// steps are computed where read rather than stored.
fn computes_on_read(bytes: usize, steps: usize) -> bool {
    steps <= ON_READ_MAX_STEPS && bytes > ON_READ_ABOVE_BYTES
}

impl Model {
    /// Builds a synthetic model from a preset name and a seed, optionally
    /// with fewer layers than the preset has.
    pub fn synthetic(preset: &str, seed: u64, layers: Option<usize>) -> Result<Self> {
        Self::synthetic_metered(preset, seed, layers, &crate::LoadMeter::default())
    }

    /// Like [`Model::synthetic`], with `meter` counting the bytes made (a
    /// real-scale preset takes seconds to minutes on the host).
    ///
    /// Weights that would not fit in the host's memory are not made at
    /// all: they are computed where they are read ([`Model::synthetic_on_demand`],
    /// the same values), so the CPU reference runs a model larger than
    /// the machine's memory (more slowly at decode, where every step reads
    /// every routed weight again).
    pub fn synthetic_metered(preset: &str, seed: u64, layers: Option<usize>, meter: &crate::LoadMeter) -> Result<Self> {
        Self::synthetic_with(preset, seed, layers, |preset, config| match preset.generate(config, seed, meter) {
            Err(PipelineError::SyntheticTooLarge { need_gb, available_gb, .. }) => {
                tracing::warn!(
                    "{need_gb:.1} GB of synthetic weights would not fit in the {available_gb:.1} GB of memory available: each weight is computed where it is read"
                );
                Ok(preset.on_demand(config, seed))
            }
            other => other,
        })
    }

    /// [`Model::synthetic_metered`] for a command whose passes decode
    /// `steps` steps each: a model of more than [`ON_READ_ABOVE_BYTES`]
    /// for at most [`ON_READ_MAX_STEPS`] steps is not stored but computed
    /// where it is read (the same values). Storing costs a write of every
    /// weight and the kernel's zeroing of every page first; reading a
    /// computed weight costs its generation each time, about what reading
    /// it from memory costs. Measured on 2 cores (BENCHMARKS.md,
    /// 2026-12-08): bisect --local of 4 qwen3-30b-a3b layers, 64 + 5
    /// tokens, 9.6-11.1 s stored against 6.0 s computed, in 6.5 GB
    /// against 0.5 GB; a 2-layer run of 64 + 32 tokens 5.1 s against 4.3 s.
    pub fn synthetic_for_steps(
        preset: &str,
        seed: u64,
        layers: Option<usize>,
        meter: &crate::LoadMeter,
        steps: usize,
    ) -> Result<Self> {
        let made = SyntheticPreset::by_name(preset)?;
        let bytes = made.stored_bytes(&made.config(layers)?);
        if computes_on_read(bytes, steps) {
            tracing::info!(
                "{:.1} GB of synthetic weights for {steps} decode steps: each weight is computed where it is read, not stored",
                bytes as f64 / 1e9
            );
            return Self::synthetic_on_demand(preset, seed, layers);
        }
        Self::synthetic_metered(preset, seed, layers, meter)
    }

    /// Like [`Model::synthetic`], but no weight is materialised on the host:
    /// each is computed where it is read. For the CUDA backend, which
    /// generates them on the device (a 48-layer Qwen3-30B-A3B never
    /// touches host memory or PCIe); on the host every read recomputes.
    pub fn synthetic_on_demand(preset: &str, seed: u64, layers: Option<usize>) -> Result<Self> {
        Self::synthetic_with(preset, seed, layers, |preset, config| Ok(preset.on_demand(config, seed)))
    }

    fn synthetic_with(
        preset: &str,
        seed: u64,
        layers: Option<usize>,
        store: impl FnOnce(&SyntheticPreset, &ModelConfig) -> Result<WeightStore>,
    ) -> Result<Self> {
        let preset = SyntheticPreset::by_name(preset)?;
        let config = preset.config(layers)?;
        let store = store(preset, &config)?;
        Self::assemble(config, store, ModelSource::Synthetic { preset: preset.name.to_string(), seed })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_synthetic_models_for_few_steps_are_computed_where_read() {
        assert!(computes_on_read(ON_READ_ABOVE_BYTES + 1, 5));
        assert!(computes_on_read(ON_READ_ABOVE_BYTES + 1, ON_READ_MAX_STEPS));
        assert!(!computes_on_read(ON_READ_ABOVE_BYTES + 1, ON_READ_MAX_STEPS + 1));
        assert!(!computes_on_read(ON_READ_ABOVE_BYTES, 5));
        // A real-scale model cut to one layer (2.5 GB) is computed, a tiny
        // one stored; the same values either way.
        let meter = crate::LoadMeter::default();
        let big = Model::synthetic_for_steps("qwen3-30b-a3b", 1, Some(1), &meter, 4).unwrap();
        assert_eq!(big.store.computed_bytes(), big.store.total_bytes());
        let tiny = Model::synthetic_for_steps("tiny-moe", 1, None, &meter, 4).unwrap();
        assert_eq!(tiny.store.computed_bytes(), 0);
        let computed = Model::synthetic_on_demand("tiny-moe", 1, None).unwrap();
        for (a, b) in tiny.store.tensors().iter().zip(computed.store.tensors()) {
            assert_eq!(a.bytes(), b.bytes(), "{}", a.name);
        }
    }
}
