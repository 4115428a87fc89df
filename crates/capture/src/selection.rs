//! What a config asks to capture: [`CaptureSpec`] (stages, layers and
//! steps, each written as a string and parsed inside deserialisation so
//! errors carry file:line:col, and the folder).

use std::path::PathBuf;

use serde::Deserialize;
use serde::de::{self, Deserializer};
use stage_types::{IndexSet, StageList};

/// A stage list written as a string in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagesField(pub StageList);

impl<'de> Deserialize<'de> for StagesField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(StagesField).map_err(de::Error::custom)
    }
}

/// A layer range written as a string in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayersField(pub IndexSet);

impl<'de> Deserialize<'de> for LayersField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        IndexSet::parse_layers(&text).map(LayersField).map_err(de::Error::custom)
    }
}

/// A step range written as a string in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepsField(pub IndexSet);

impl<'de> Deserialize<'de> for StepsField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        IndexSet::parse_steps(&text).map(StepsField).map_err(de::Error::custom)
    }
}

fn all_stages() -> StagesField {
    StagesField(StageList::all())
}

fn all_layers() -> LayersField {
    LayersField(IndexSet::All)
}

fn all_steps() -> StepsField {
    StepsField(IndexSet::All)
}

/// What to capture and where.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSpec {
    /// Stages (default all).
    #[serde(default = "all_stages")]
    pub stages: StagesField,
    /// Layers (default all).
    #[serde(default = "all_layers")]
    pub layers: LayersField,
    /// Steps (default all).
    #[serde(default = "all_steps")]
    pub steps: StepsField,
    /// Output folder (relative to the config file).
    pub out_dir: PathBuf,
}
