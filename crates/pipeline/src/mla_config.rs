//! [`MlaConfig`]: what a DeepSeek-V2/V3 config.json says of multi-head
//! latent attention (keys as transformers' `DeepseekV3Config` spells
//! them), and the rotation and softmax scale it implies.

use std::path::Path;

use serde_json::{Map, Value};

use crate::backend::mla::{MlaDims, MlaRope};
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

fn bad(path: &Path, message: String) -> PipelineError {
    PipelineError::BadConfig { path: path.to_path_buf(), message }
}

/// `key` as a count, or None when absent or null.
fn count(obj: &Map<String, Value>, key: &str, path: &Path) -> Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| bad(path, format!("`{key}` must be a non-negative integer, got {v}"))),
    }
}

fn required(obj: &Map<String, Value>, key: &'static str, path: &Path) -> Result<usize> {
    count(obj, key, path)?.ok_or(PipelineError::MissingConfigKey {
        path: path.to_path_buf(),
        key,
        hint: " (multi-head latent attention needs it)".into(),
    })
}

/// The config's YaRN scaling, None for default rope; other scaling types
/// are refused by name.
fn yarn(obj: &Map<String, Value>, path: &Path) -> Result<Option<Yarn>> {
    let Some(p) = obj.get("rope_scaling").or_else(|| obj.get("rope_parameters")).filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = p.get("rope_type").or_else(|| p.get("type")).and_then(Value::as_str).unwrap_or("default");
    match kind {
        "default" => return Ok(None),
        "yarn" => {}
        other => {
            return Err(PipelineError::Unsupported {
                path: path.to_path_buf(),
                message: format!("rope scaling `{other}` is not supported (default and yarn are)"),
            });
        }
    }
    let num = |key: &str| p.get(key).and_then(Value::as_f64);
    let factor = num("factor").ok_or_else(|| bad(path, "yarn rope scaling needs `factor`".into()))?;
    let original = num("original_max_position_embeddings")
        .ok_or_else(|| bad(path, "yarn rope scaling needs `original_max_position_embeddings`".into()))?;
    Ok(Some(Yarn {
        factor,
        original_max_position: original,
        beta_fast: num("beta_fast").unwrap_or(32.0),
        beta_slow: num("beta_slow").unwrap_or(1.0),
        mscale: num("mscale"),
        mscale_all_dim: num("mscale_all_dim"),
        attention_factor: num("attention_factor"),
        truncate: p.get("truncate").and_then(Value::as_bool).unwrap_or(true),
    }))
}

impl MlaConfig {
    /// Reads MLA's keys from a config.json object.
    pub fn from_json(obj: &Map<String, Value>, path: &Path) -> Result<Self> {
        let config = MlaConfig {
            q_lora_rank: count(obj, "q_lora_rank", path)?,
            kv_lora_rank: required(obj, "kv_lora_rank", path)?,
            qk_nope_head_dim: required(obj, "qk_nope_head_dim", path)?,
            qk_rope_head_dim: required(obj, "qk_rope_head_dim", path)?,
            v_head_dim: required(obj, "v_head_dim", path)?,
            rope_interleave: obj.get("rope_interleave").and_then(Value::as_bool).unwrap_or(true),
            yarn: yarn(obj, path)?,
        };
        if !config.qk_rope_head_dim.is_multiple_of(2) {
            return Err(bad(path, format!("qk_rope_head_dim {} must be even for RoPE", config.qk_rope_head_dim)));
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
