//! [`MlaConfig`]: what a DeepSeek-V2/V3 config.json says of multi-head
//! latent attention (keys as transformers' `DeepseekV3Config` spells
//! them), and the rotation and softmax scale it implies.

use std::path::Path;

use serde_json::{Map, Value};

use crate::backend::mla::{MlaDims, MlaRope};
use crate::config_keys::Keys;
use crate::error::Result;
use crate::rope_scaling::Yarn;

/// Multi-head latent attention's hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// `q_lora_rank`: the compressed query's width (null: a plain q_proj).
    pub q_lora_rank: Option<usize>,
    /// `kv_lora_rank`: the latent's width.
    pub kv_lora_rank: usize,
    /// `qk_nope_head_dim`.
    pub qk_nope_head_dim: usize,
    /// `qk_rope_head_dim`.
    pub qk_rope_head_dim: usize,
    /// `v_head_dim`.
    pub v_head_dim: usize,
    /// `rope_interleave` (true unless the config says false).
    pub rope_interleave: bool,
    /// YaRN scaling, when `rope_scaling` (or `rope_parameters`) says so.
    pub yarn: Option<Yarn>,
}

impl MlaConfig {
    /// Reads MLA's keys from a config.json object.
    pub fn from_json(obj: &Map<String, Value>, path: &Path) -> Result<Self> {
        let keys = Keys { obj, path };
        let because = "multi-head latent attention needs it";
        let config = MlaConfig {
            q_lora_rank: keys.opt_usize(&["q_lora_rank"])?,
            kv_lora_rank: keys.usize_because("kv_lora_rank", because)?,
            qk_nope_head_dim: keys.usize_because("qk_nope_head_dim", because)?,
            qk_rope_head_dim: keys.usize_because("qk_rope_head_dim", because)?,
            v_head_dim: keys.usize_because("v_head_dim", because)?,
            rope_interleave: keys.opt_bool("rope_interleave")?.unwrap_or(true),
            yarn: Yarn::from_config(&keys)?,
        };
        if !config.qk_rope_head_dim.is_multiple_of(2) {
            return Err(keys.bad("qk_rope_head_dim", &format!("even for RoPE, not {}", config.qk_rope_head_dim)));
        }
        Ok(config)
    }

    /// Query and key width per head.
    pub fn qk_head(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// The widths the MLA operations take, for `heads` heads.
    pub fn dims(&self, heads: usize) -> MlaDims {
        MlaDims {
            heads,
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank: self.kv_lora_rank,
            qk_nope: self.qk_nope_head_dim,
            qk_rope: self.qk_rope_head_dim,
            v_head_dim: self.v_head_dim,
        }
    }

    /// The rotation of the rope columns with base `theta`.
    pub fn rope(&self, theta: f64) -> MlaRope {
        let d = self.qk_rope_head_dim;
        let (inv_freq, attention_factor) = match &self.yarn {
            Some(y) => (y.inv_freq(theta, d), y.attention_factor()),
            None => ((0..d / 2).map(|i| theta.powf(-2.0 * i as f64 / d as f64)).collect(), 1.0),
        };
        MlaRope { inv_freq, attention_factor, interleave: self.rope_interleave }
    }

    /// The softmax scale: `qk_head^-0.5`, times YaRN's mscale squared
    /// where `mscale_all_dim` is given.
    pub fn softmax_scale(&self) -> f64 {
        let plain = (self.qk_head() as f64).powf(-0.5);
        self.yarn.map_or(plain, |y| y.softmax_scale(plain))
    }
}
