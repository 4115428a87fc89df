//! [`Keys`]: typed access to a config.json object, the file named in
//! every error; shared by `ModelConfig` and the configs of its parts
//! (`MlaConfig`).

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{PipelineError, Result};

/// Typed access to config.json keys with the file named in errors.
pub(crate) struct Keys<'a> {
    /// The object read.
    pub(crate) obj: &'a Map<String, Value>,
    /// The file, for errors.
    pub(crate) path: &'a Path,
}

impl Keys<'_> {
    pub(crate) fn bad(&self, key: &str, wanted: &str) -> PipelineError {
        PipelineError::BadConfig { path: self.path.to_path_buf(), message: format!("`{key}` must be {wanted}") }
    }

    pub(crate) fn find<'k>(&self, names: &[&'k str]) -> Option<(&'k str, &Value)> {
        names.iter().find_map(|n| self.obj.get(*n).filter(|v| !v.is_null()).map(|v| (*n, v)))
    }

    pub(crate) fn opt_usize(&self, names: &[&str]) -> Result<Option<usize>> {
        match self.find(names) {
            None => Ok(None),
            Some((key, v)) => {
                v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| self.bad(key, "a non-negative integer"))
            }
        }
    }

    pub(crate) fn usize(&self, names: &[&'static str]) -> Result<usize> {
        self.opt_usize(names)?.ok_or_else(|| PipelineError::MissingConfigKey {
            path: self.path.to_path_buf(),
            key: names[0],
            hint: if names.len() > 1 { format!(" (or {})", names[1..].join(", ")) } else { String::new() },
        })
    }

    /// [`Keys::usize`] of one key, saying in a missing key's error why
    /// the model needs it.
    pub(crate) fn usize_because(&self, name: &'static str, because: &str) -> Result<usize> {
        self.opt_usize(&[name])?.ok_or_else(|| PipelineError::MissingConfigKey {
            path: self.path.to_path_buf(),
            key: name,
            hint: format!(" ({because})"),
        })
    }

    pub(crate) fn opt_f64(&self, names: &[&str]) -> Result<Option<f64>> {
        match self.find(names) {
            None => Ok(None),
            Some((key, v)) => v.as_f64().map(Some).ok_or_else(|| self.bad(key, "a number")),
        }
    }

    pub(crate) fn opt_bool(&self, name: &str) -> Result<Option<bool>> {
        match self.find(&[name]) {
            None => Ok(None),
            Some((key, v)) => v.as_bool().map(Some).ok_or_else(|| self.bad(key, "true or false")),
        }
    }

    pub(crate) fn opt_str(&self, name: &str) -> Result<Option<String>> {
        match self.find(&[name]) {
            None => Ok(None),
            Some((key, v)) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| self.bad(key, "a string")),
        }
    }
}
