//! YaRN RoPE scaling (rope_type `yarn`), as Hugging Face transformers'
//! `_compute_yarn_parameters` and `yarn_apply_mscale` compute it:
//! DeepSeek-V3 and gpt-oss extend their context with it. Per frequency
//! pair, a ramp between `beta_fast` and `beta_slow` rotations over the
//! original context blends the extrapolated frequency `theta^(-2i/d)` with
//! the interpolated one (divided by `factor`); cos and sin are multiplied
//! by the attention factor, and DeepSeek's MLA also multiplies its softmax
//! scale by `mscale(factor, mscale_all_dim)^2`. In f64 (transformers
//! computes the frequencies in f32).

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
