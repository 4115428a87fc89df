//! YaRN RoPE scaling (rope_type `yarn`), as Hugging Face transformers'
//! `_compute_yarn_parameters` and `yarn_apply_mscale` compute it:
//! DeepSeek-V3 and gpt-oss extend their context with it. Per frequency
//! pair, a ramp between `beta_fast` and `beta_slow` rotations over the
//! original context blends the extrapolated frequency `theta^(-2i/d)` with
//! the interpolated one (divided by `factor`); cos and sin are multiplied
//! by the attention factor, and DeepSeek's MLA also multiplies its softmax
//! scale by `mscale(factor, mscale_all_dim)^2`. In f64 (transformers
//! computes the frequencies in f32).

use crate::config_keys::Keys;
use crate::error::{PipelineError, Result};

/// A config's `rope_parameters` (or `rope_scaling`) of type `yarn`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Yarn {
    /// `factor`: the context extension.
    pub factor: f64,
    /// `original_max_position_embeddings`.
    pub original_max_position: f64,
    /// `beta_fast` (32 when absent).
    pub beta_fast: f64,
    /// `beta_slow` (1 when absent).
    pub beta_slow: f64,
    /// `mscale`, if given.
    pub mscale: Option<f64>,
    /// `mscale_all_dim`, if given.
    pub mscale_all_dim: Option<f64>,
    /// `attention_factor`, if given (else derived from the above).
    pub attention_factor: Option<f64>,
    /// `truncate` (true when absent): the ramp's ends rounded outwards to
    /// whole dimensions.
    pub truncate: bool,
}

/// YaRN's `0.1 * mscale * ln(scale) + 1` (1 for `scale <= 1`).
pub fn yarn_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 { 1.0 } else { 0.1 * mscale * scale.ln() + 1.0 }
}

impl Yarn {
    /// The config's YaRN scaling, None for default rope; other scaling types
    /// are refused by name.
    pub(crate) fn from_config(keys: &Keys) -> Result<Option<Yarn>> {
        let Some(p) = keys.find(&["rope_scaling", "rope_parameters"]).map(|(_, p)| p) else {
            return Ok(None);
        };
        let p = Keys { obj: p.as_object().ok_or_else(|| keys.bad("rope_scaling", "an object"))?, path: keys.path };
        let kind = match p.opt_str("rope_type")? {
            Some(kind) => Some(kind),
            None => p.opt_str("type")?,
        };
        match kind.as_deref().unwrap_or("default") {
            "default" => return Ok(None),
            "yarn" => {}
            other => {
                return Err(PipelineError::Unsupported {
                    path: keys.path.to_path_buf(),
                    message: format!("rope scaling `{other}` is not supported (default and yarn are)"),
                });
            }
        }
        let needs = |key: &str| PipelineError::BadConfig {
            path: keys.path.to_path_buf(),
            message: format!("yarn rope scaling needs `{key}`"),
        };
        Ok(Some(Yarn {
            factor: p.opt_f64(&["factor"])?.ok_or_else(|| needs("factor"))?,
            original_max_position: p
                .opt_f64(&["original_max_position_embeddings"])?
                .ok_or_else(|| needs("original_max_position_embeddings"))?,
            beta_fast: p.opt_f64(&["beta_fast"])?.unwrap_or(32.0),
            beta_slow: p.opt_f64(&["beta_slow"])?.unwrap_or(1.0),
            mscale: p.opt_f64(&["mscale"])?,
            mscale_all_dim: p.opt_f64(&["mscale_all_dim"])?,
            attention_factor: p.opt_f64(&["attention_factor"])?,
            truncate: p.opt_bool("truncate")?.unwrap_or(true),
        }))
    }

    /// The inverse frequencies of a rotary dimension `dim` with base
    /// `theta`: `dim / 2` of them.
    pub fn inv_freq(&self, theta: f64, dim: usize) -> Vec<f64> {
        let d = dim as f64;
        let correction_dim = |rotations: f64| {
            d * (self.original_max_position / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (correction_dim(self.beta_fast), correction_dim(self.beta_slow));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, high) = (low.max(0.0), high.min(d - 1.0));
        let span = if low == high { 0.001 } else { high - low };
        (0..dim / 2)
            .map(|i| {
                let extrapolated = theta.powf(-2.0 * i as f64 / d);
                let interpolated = extrapolated / self.factor;
                let ramp = ((i as f64 - low) / span).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                interpolated * (1.0 - keep) + extrapolated * keep
            })
            .collect()
    }

    /// The factor cos and sin are multiplied by.
    pub fn attention_factor(&self) -> f64 {
        if let Some(f) = self.attention_factor {
            return f;
        }
        match (self.mscale, self.mscale_all_dim) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                yarn_mscale(self.factor, m) / yarn_mscale(self.factor, all)
            }
            _ => yarn_mscale(self.factor, 1.0),
        }
    }

    /// DeepSeek's softmax scale: `qk_scale * mscale(factor,
    /// mscale_all_dim)^2` where `mscale_all_dim` is given and non-zero,
    /// else `qk_scale`.
    pub fn softmax_scale(&self, qk_scale: f64) -> f64 {
        match self.mscale_all_dim {
            Some(all) if all != 0.0 => {
                let m = yarn_mscale(self.factor, all);
                qk_scale * m * m
            }
            _ => qk_scale,
        }
    }
}
