//! [`MlaConfig`]: what a DeepSeek-V2/V3 config.json says of multi-head
//! latent attention (keys as transformers' `DeepseekV3Config` spells
//! them), and the rotation and softmax scale it implies.

use std::path::Path;

use serde_json::{Map, Value};

use crate::backend::mla::{MlaDims, MlaRope};
use crate::config_keys::Keys;
use crate::error::{PipelineError, Result};
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

/// The config's YaRN scaling, None for default rope; other scaling types
/// are refused by name.
fn yarn(keys: &Keys) -> Result<Option<Yarn>> {
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
            yarn: yarn(&keys)?,
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
