//! [`OssConfig`]: what a gpt-oss config.json says beyond the shared decoder
//! (keys as transformers' `GptOssConfig` spells them, its defaults where
//! a key is absent): which layers attend through a sliding window
//! (`layer_types`, `sliding_window`), the clamped SwiGLU of the experts
//! (`swiglu_limit`, `swiglu_alpha`) and YaRN RoPE on the ordinary heads.
//! Attention sinks and the o_proj, router and expert biases come with the
//! family; they have no key.

use std::path::Path;

use serde_json::{Map, Value};

use crate::config_keys::Keys;
use crate::error::{PipelineError, Result};
use crate::rope_scaling::Yarn;

/// `layer_types` entry of a layer attending through the sliding window.
pub const SLIDING: &str = "sliding_attention";
/// `layer_types` entry of a layer attending to every earlier position.
pub const FULL: &str = "full_attention";

/// gpt-oss's hyper-parameters beyond the shared decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct OssConfig {
    /// Per layer, the positions a query sees at most (itself included),
    /// None for full attention.
    pub windows: Vec<Option<usize>>,
    /// `swiglu_limit`: the gate clamped above, the up projection to
    /// +-limit, before `(up + 1) * gate * sigmoid(alpha * gate)`.
    pub swiglu_limit: f64,
    /// `swiglu_alpha` (1.702).
    pub swiglu_alpha: f64,
    /// YaRN scaling of the rotation, when `rope_scaling` (or
    /// `rope_parameters`) says so.
    pub yarn: Option<Yarn>,
}

impl OssConfig {
    /// Reads gpt-oss's keys for a model of `layers` layers. A
    /// `layer_types` of the wrong length or with an unknown entry, a
    /// window of 0, or a limit or alpha that is not a positive number is
    /// refused with the reason.
    pub fn from_json(obj: &Map<String, Value>, path: &Path, layers: usize) -> Result<Self> {
        let keys = Keys { obj, path };
        let bad = |message: String| PipelineError::BadConfig { path: path.to_path_buf(), message };
        let window = keys.opt_usize(&["sliding_window"])?;
        if window == Some(0) {
            return Err(bad("`sliding_window` is 0: a sliding layer must see at least its own position".into()));
        }
        let types: Vec<String> = match obj.get("layer_types") {
            None | Some(Value::Null) => {
                // transformers' default: sliding and full layers alternate,
                // sliding first.
                (0..layers).map(|l| if l % 2 == 0 { SLIDING } else { FULL }.to_string()).collect()
            }
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|_| keys.bad("layer_types", &format!("a list of \"{SLIDING}\" and \"{FULL}\"")))?,
        };
        if types.len() != layers {
            return Err(bad(format!(
                "`layer_types` has {} entries for num_hidden_layers {layers}: it needs one per layer",
                types.len()
            )));
        }
        let windows = types
            .iter()
            .enumerate()
            .map(|(l, kind)| match kind.as_str() {
                SLIDING => Ok(window),
                FULL => Ok(None),
                other => Err(bad(format!(
                    "`layer_types[{l}]` is \"{other}\": valid entries are \"{SLIDING}\" and \"{FULL}\""
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let positive = |name: &str, default: f64| -> Result<f64> {
            let value = keys.opt_f64(&[name])?.unwrap_or(default);
            if value.is_finite() && value > 0.0 {
                Ok(value)
            } else {
                Err(bad(format!("`{name}` is {value}: it must be a positive number")))
            }
        };
        Ok(OssConfig {
            windows,
            swiglu_limit: positive("swiglu_limit", 7.0)?,
            swiglu_alpha: positive("swiglu_alpha", 1.702)?,
            yarn: Yarn::from_config(&keys)?,
        })
    }

    /// The window of `layer` (None: full attention, or no such layer).
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.windows.get(layer).copied().flatten()
    }
}

/// The first and last position a query at `position` sees through
/// `window` (itself included; all earlier positions without one).
pub fn visible(position: usize, window: Option<usize>) -> (usize, usize) {
    let first = window.map_or(0, |w| (position + 1).saturating_sub(w));
    (first, position)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value, layers: usize) -> Result<OssConfig> {
        OssConfig::from_json(v.as_object().unwrap(), Path::new("config.json"), layers)
    }

    #[test]
    fn layer_types_give_each_layer_its_window_and_bad_ones_are_named() {
        let c = parse(json!({"sliding_window": 4, "layer_types": [SLIDING, FULL, SLIDING]}), 3).unwrap();
        assert_eq!(c.windows, [Some(4), None, Some(4)]);
        assert_eq!((c.swiglu_limit, c.swiglu_alpha, c.yarn), (7.0, 1.702, None));
        assert_eq!(parse(json!({"sliding_window": 4}), 4).unwrap().windows, [Some(4), None, Some(4), None]);
        let err = parse(json!({"sliding_window": 4, "layer_types": [SLIDING, FULL]}), 3).unwrap_err().to_string();
        assert!(err.contains("has 2 entries for num_hidden_layers 3"), "{err}");
        let err = parse(json!({"sliding_window": 0}), 2).unwrap_err().to_string();
        assert!(err.contains("`sliding_window` is 0"), "{err}");
        let err = parse(json!({"layer_types": [SLIDING, "chunked_attention"]}), 2).unwrap_err().to_string();
        assert!(err.contains("`layer_types[1]` is \"chunked_attention\"") && err.contains(FULL), "{err}");
        let err = parse(json!({"swiglu_limit": -1.0}), 2).unwrap_err().to_string();
        assert!(err.contains("`swiglu_limit` is -1"), "{err}");
    }

    #[test]
    fn a_window_covers_its_own_position_and_the_ones_before() {
        assert_eq!(visible(0, Some(3)), (0, 0));
        assert_eq!(visible(5, Some(3)), (3, 5));
        assert_eq!(visible(5, None), (0, 5));
        assert_eq!(visible(2, Some(3)), (0, 2));
    }
}
