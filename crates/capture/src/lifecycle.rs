//! [`CaptureSession`]: one capture from start to commit — the temporary
//! folder, the writer thread, the capture systems on a forward pass, and
//! the manifest written at the end. Used by `run` and by `bisect` (one per
//! side).

use std::path::{Path, PathBuf};

use pipeline::{Forward, Model, ModelSource, StepRecord};
use stage_types::{SaveTensorStage, Scope};

use crate::error::Result;
use crate::selection::CaptureSpec;
use crate::systems::{CaptureSelection, attach_capture};
use crate::target::CaptureTarget;
use crate::writer::CaptureWriter;
use compare::manifest::{FORMAT, Manifest, ManifestModel, ManifestPromptText, ManifestStep};

/// What a manifest records about the run that produced it.
pub struct RunRecord<'a> {
    /// The model.
    pub model: &'a Model,
    /// Backend name.
    pub backend: &'a str,
    /// Activation dtype.
    pub dtype: &'a str,
    /// Prompt tokens.
    pub prompt: &'a [u32],
    /// Greedy tokens produced.
    pub generated: &'a [u32],
    /// Steps that ran.
    pub steps: &'a [StepRecord],
    /// Faults injected, as their specs read.
    pub faults: Vec<String>,
    /// The replayed routing, if any (what the replay recorded, as JSON).
    pub routing: Option<serde_json::Value>,
    /// The prompt's text and tokenizer, for a text prompt.
    pub prompt_text: Option<ManifestPromptText>,
    /// The text of each token (prompt then generated), for a text prompt.
    pub token_texts: Vec<String>,
    /// What forced the run's stages, when it was teacher-forced.
    pub teacher_forced: Option<String>,
}

/// What a committed capture holds.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureStats {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes written.
    pub bytes: u64,
    /// The capture folder.
    pub out_dir: PathBuf,
}

/// At most this much pinned memory is reserved before a run (see
/// [`CaptureSession::reserve_elements`]).
pub const RESERVE_LIMIT_BYTES: usize = 1 << 30;

/// A capture in progress. Declare it before the forward pass it observes,
/// so that on an early return the forward pass (holding the channel's
/// sender) is dropped first; dropping an unfinished session removes its
/// temporary folder.
pub struct CaptureSession {
    target: CaptureTarget,
    writer: CaptureWriter,
    selection: CaptureSelection,
}

impl CaptureSession {
    /// Prepares `out_dir` (refusing to replace anything but a capture) and
    /// starts the writer.
    pub fn start(spec: &CaptureSpec, out_dir: &Path) -> Result<Self> {
        let target = CaptureTarget::prepare(out_dir)?;
        let writer = CaptureWriter::spawn(target.tmp_dir().to_path_buf())?;
        let selection =
            CaptureSelection { stages: spec.stages.0, layers: spec.layers.0.clone(), steps: spec.steps.0.clone() };
        Ok(Self { target, writer, selection })
    }

    /// The element counts of the tensors this capture takes at `step` (of
    /// `tokens` tokens, `positions` cached positions after it), in capture
    /// order; none when the step is not selected.
    pub fn step_elements(
        &self,
        config: &pipeline::ModelConfig,
        step: usize,
        tokens: usize,
        positions: usize,
    ) -> Vec<usize> {
        let sel = &self.selection;
        if !sel.steps.contains(step) {
            return Vec::new();
        }
        let numel = |stage| config.stage_shape(stage, tokens, positions).iter().product::<usize>();
        let mut wanted = Vec::new();
        let model_stages = |before_layers: bool| {
            sel.stages
                .iter()
                .filter(move |s| s.scope() == Scope::Model && (*s == SaveTensorStage::Embedding) == before_layers)
        };
        wanted.extend(model_stages(true).map(numel));
        for layer in 0..config.num_layers {
            if !sel.layers.contains(layer) {
                continue;
            }
            let traits = config.layer_traits(layer);
            wanted.extend(sel.stages.iter().filter(|s| s.scope() == Scope::Layer && s.applies_to(traits)).map(numel));
        }
        wanted.extend(model_stages(false).map(numel));
        wanted
    }

    /// What a backend that stages copies through pinned memory reserves
    /// before the run, up to [`RESERVE_LIMIT_BYTES`]: the element counts of
    /// the tensors of the first two decode steps (the steps before a decode
    /// graph is recorded run eagerly, each into buffers of its own while the
    /// one before is still landing: unreserved, they pinned their buffers
    /// one by one, 43 ms for the first step of a bisect-style selection of
    /// 48 layers on an H200 and about 5 ms each once the first was
    /// reserved), then of the prompt step (the largest), so that none pays
    /// for pinning. Later steps reuse these buffers.
    pub fn reserve_elements(&self, config: &pipeline::ModelConfig, prompt_len: usize) -> Vec<usize> {
        let first = self.step_elements(config, 1, 1, prompt_len + 1);
        let second = self.step_elements(config, 2, 1, prompt_len + 2);
        let prompt = self.step_elements(config, 0, prompt_len, prompt_len);
        let mut bytes = 0usize;
        first
            .into_iter()
            .chain(second)
            .chain(prompt)
            .take_while(|n| {
                bytes += n * 4;
                bytes <= RESERVE_LIMIT_BYTES
            })
            .collect()
    }

    /// Whether the prompt step captures attn_scores or attn_softmax (which
    /// a fused attention then keeps in memory).
    pub fn captures_prompt_attention(&self) -> bool {
        let sel = &self.selection;
        sel.steps.contains(0)
            && sel.stages.iter().any(|s| matches!(s, SaveTensorStage::AttnScores | SaveTensorStage::AttnSoftmax))
    }

    /// Adds the capture systems to `forward`.
    pub fn attach(&self, forward: &mut Forward) {
        attach_capture(forward, self.selection.clone(), self.writer.sender());
    }

    /// Waits for the writer, writes the manifest and renames the folder
    /// into place. The forward pass must have been dropped.
    pub fn commit(self, run: &RunRecord) -> Result<CaptureStats> {
        let report = self.writer.finish()?;
        let model = run.model;
        let manifest = Manifest {
            format: FORMAT.into(),
            producer: Some(format!("moetrace {}", env!("CARGO_PKG_VERSION"))),
            backend: run.backend.to_string(),
            dtype: run.dtype.to_string(),
            model: ManifestModel {
                architecture: model.config.architecture.clone(),
                config: model.config.json.clone(),
                source: Some(match &model.source {
                    ModelSource::Checkpoint(p) => p.display().to_string(),
                    ModelSource::Synthetic { preset, seed } => format!("synthetic:{preset}:{seed}"),
                }),
            },
            prompt: run.prompt.to_vec(),
            generated: run.generated.to_vec(),
            steps: run
                .steps
                .iter()
                .map(|s| ManifestStep { step: s.step, start_position: s.start_position, tokens: s.tokens.clone() })
                .collect(),
            tensors: report.entries,
            faults: run.faults.clone(),
            teacher_forced: run.teacher_forced.clone(),
            parallel: parallel_record(&model.config),
            routing: run.routing.clone(),
            prompt_text: run.prompt_text.clone(),
            token_texts: run.token_texts.clone(),
        };
        let stats = CaptureStats {
            tensors: manifest.tensors.len(),
            bytes: report.bytes,
            out_dir: self.target.out_dir().to_path_buf(),
        };
        self.target.commit(&manifest)?;
        tracing::info!(out_dir = %stats.out_dir.display(), tensors = stats.tensors, "capture committed");
        Ok(stats)
    }
}

/// The manifest's record of a run's virtual ranks, None for one rank.
fn parallel_record(config: &pipeline::ModelConfig) -> Option<serde_json::Value> {
    let experts = config.expert_parallel.as_ref();
    if experts.is_none() && config.tensor_ranks <= 1 {
        return None;
    }
    Some(serde_json::json!({
        "experts": experts.map_or(1, |p| p.ranks),
        "tensor": config.tensor_ranks,
        "combine": if experts.is_some_and(|p| p.rank_sum) { "RankSum" } else { "SlotOrder" },
        "replicas": experts.map(|p| p.replicas.clone()).unwrap_or_default(),
    }))
}
