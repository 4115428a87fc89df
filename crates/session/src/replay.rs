//! Routing replay: `routing: Replay("capture dir")` forces the expert ids
//! and router weights of another run (a capture holding moe_router_indices
//! and moe_router, by moetrace or any engine writing the same layout), so
//! a free-running comparison stays meaningful past the first routing flip.
//! An amender on moe_router writes the replayed weights and ids right after
//! the router ran; the target's own choice is counted (tokens whose expert
//! set differed) and recorded in the manifest. The capture is checked
//! before the run: same model, same prompt, and both tensors for every
//! (step, MoE layer) the run needs. A capture with expert ids only (as
//! vLLM and SGLang return them: `python -m moetrace_capture.routing`
//! writes them as a capture) replays the ids, and each token's weights are
//! recomputed from the run's own router logits at those ids.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use compare::CaptureDir;
use pipeline::{Forward, HookCtx, HostTensor, ModelConfig, PipelineError};
use serde::{Deserialize, Serialize};
use stage_types::SaveTensorStage as S;

use crate::error::{Result, SessionError};

/// Where a run's routing comes from.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub enum RoutingSpec {
    /// The run's own router.
    #[default]
    Own,
    /// The expert ids and weights of this capture folder (relative to the
    /// config file).
    Replay(PathBuf),
}

/// A (step, layer) whose routing was replayed, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayedScope {
    /// Step.
    pub step: usize,
    /// Layer.
    pub layer: usize,
    /// Tokens whose own expert set differed from the replayed one.
    pub overridden_tokens: usize,
}

/// What a run with replayed routing records in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReplayRecord {
    /// The capture the routing came from.
    pub replay: String,
    /// Every (step, layer) replayed.
    pub replayed: Vec<ReplayedScope>,
}

/// An opened, checked replay capture.
#[derive(Debug, Clone)]
pub struct Replay {
    source: Arc<CaptureDir>,
    experts: usize,
    /// Whether the top-k weights are renormalised (for weights recomputed
    /// at replayed ids).
    normalise: bool,
    log: Arc<Mutex<Vec<ReplayedScope>>>,
}

impl Replay {
    /// Opens `dir` and checks it against the run: the same model config,
    /// the same prompt, `steps` steps, and moe_router_indices and moe_router
    /// of every MoE layer at each of them. `config_path` names the config
    /// in errors.
    pub fn open(dir: &Path, model: &ModelConfig, prompt: &[u32], steps: usize, config_path: &Path) -> Result<Self> {
        let bad = |message: String| SessionError::ConfigValue {
            path: config_path.to_path_buf(),
            message: format!("routing: Replay({}): {message}", dir.display()),
        };
        let source = CaptureDir::open(dir).map_err(|e| bad(e.to_string()))?;
        let m = &source.manifest;
        if !ModelConfig::same_computation_json(&m.model.config, &model.json).unwrap_or(false) {
            let of = |c: &serde_json::Value, k: &str| c.get(k).cloned().unwrap_or_default();
            return Err(bad(format!(
                "the capture is of another model ({} layers, hidden {}; this run: {} layers, hidden {})",
                of(&m.model.config, "num_hidden_layers"),
                of(&m.model.config, "hidden_size"),
                model.num_layers,
                model.hidden_size
            )));
        }
        if m.prompt != prompt {
            return Err(bad(format!("the capture's prompt {:?} is not this run's {prompt:?}", m.prompt)));
        }
        for step in 0..steps {
            if !m.steps.iter().any(|s| s.step == step) {
                return Err(bad(format!(
                    "the capture has steps {:?} but this run needs step {step} (generate: at most {})",
                    m.steps.iter().map(|s| s.step).collect::<Vec<_>>(),
                    m.steps.len()
                )));
            }
            // Each step's tokens are fed to this run: checked here, so a bad
            // one is named with the capture that holds it.
            let manifest = dir.join("manifest.json");
            if let Some(s) = m.steps.iter().find(|s| s.step == step)
                && let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= model.vocab_size)
            {
                return Err(bad(format!(
                    "{}: step {step} feeds token id {t}, out of the vocabulary (0..{})",
                    manifest.display(),
                    model.vocab_size
                )));
            }
            for layer in (0..model.num_layers).filter(|&l| model.is_moe_layer(l)) {
                if source.entry(step, Some(layer), S::MoeRouterIndices).is_none() {
                    return Err(bad(format!(
                        "the capture has no moe_router_indices for step {step} layer {layer}; capture it with stages: \"moe_router,moe_router_indices\" at every layer and step (moe_router is optional: without it the weights are recomputed from this run's router logits)"
                    )));
                }
            }
        }
        Ok(Self {
            source: Arc::new(source),
            experts: model.num_experts,
            normalise: model.norm_topk_prob,
            log: Arc::default(),
        })
    }

    /// The tokens the replayed capture fed at each step (a run replaying
    /// its routing feeds the same, so each step's routing belongs to it).
    pub fn step_tokens(&self, steps: usize) -> Vec<Vec<u32>> {
        (0..steps)
            .map(|s| {
                self.source.manifest.steps.iter().find(|m| m.step == s).map(|m| m.tokens.clone()).unwrap_or_default()
            })
            .collect()
    }

    /// Attaches the amender that replays the routing.
    pub fn attach(&self, forward: &mut Forward) {
        let replay = self.clone();
        forward.add_amender(S::MoeRouter, move |ctx: HookCtx| replay.replay_routing(ctx));
    }

    /// What was replayed, for the manifest.
    pub fn record(&self) -> ReplayRecord {
        ReplayRecord {
            replay: self.source.dir.display().to_string(),
            replayed: self.log.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }

    fn replay_routing(&self, mut ctx: HookCtx) {
        if !ctx.produced(S::MoeRouter) {
            return;
        }
        let (step, layer) = (ctx.step().step, ctx.layer().unwrap_or(0));
        let loaded = self.load(step, layer, &ctx.step().tokens).and_then(|(weights, ids)| match weights {
            Some(w) => Ok((w, ids)),
            None => {
                let logits = ctx.read(S::MoeRouterLogits).ok_or("the run's router logits could not be read")?;
                Ok((self.weights_at(&logits, &ids)?, ids))
            }
        });
        match loaded {
            Ok((weights, ids)) => {
                let Some(own) = ctx.read(S::MoeRouterIndices) else { return };
                let overridden_tokens = differing_sets(&own, &ids);
                ctx.write(S::MoeRouter, &weights);
                ctx.write(S::MoeRouterIndices, &ids);
                self.log.lock().unwrap_or_else(|e| e.into_inner()).push(ReplayedScope {
                    step,
                    layer,
                    overridden_tokens,
                });
            }
            Err(message) => ctx.fail(PipelineError::BadInput(format!(
                "routing replay from {}: step {step} layer {layer}: {message}",
                self.source.dir.display()
            ))),
        }
    }

    /// The weights of the replayed `ids` (`[T,k]`) under this run's router
    /// `logits` (`[T,E]`): what the router gives those experts.
    fn weights_at(&self, logits: &HostTensor, ids: &HostTensor) -> std::result::Result<HostTensor, String> {
        let (Some(x), Some(ids_i32)) = (logits.as_f32(), ids.as_i32()) else {
            return Err("the router logits or the replayed ids have the wrong type".into());
        };
        let k = ids.shape.get(1).copied().unwrap_or(1).max(1);
        let experts = logits.shape.last().copied().unwrap_or(0);
        if experts != self.experts || x.len() / experts.max(1) != ids_i32.len() / k {
            return Err(format!("router logits {:?} do not fit the replayed ids {:?}", logits.shape, ids.shape));
        }
        let weights = x
            .chunks(experts)
            .zip(ids_i32.chunks(k))
            .flat_map(|(row, chosen)| {
                let chosen: Vec<usize> = chosen.iter().map(|&e| e as usize).collect();
                pipeline::backend::cpu::math::router_weights(row, &chosen, self.normalise)
            })
            .collect();
        Ok(HostTensor::f32(ids.shape.clone(), weights))
    }

    /// The replayed (weights, if the capture has them, and ids) of one
    /// (step, layer), checked against the tokens this step feeds.
    fn load(
        &self,
        step: usize,
        layer: usize,
        tokens: &[u32],
    ) -> std::result::Result<(Option<HostTensor>, HostTensor), String> {
        let fed = self.source.manifest.steps.iter().find(|s| s.step == step).map(|s| s.tokens.as_slice());
        if fed != Some(tokens) {
            return Err(format!("the capture fed tokens {fed:?} at this step, this run feeds {tokens:?}"));
        }
        let load = |stage| self.source.load(step, Some(layer), stage).map_err(|e| e.to_string());
        let ids = load(S::MoeRouterIndices)?.ok_or("the capture has no moe_router_indices")?;
        let weights = load(S::MoeRouter)?;
        if ids.shape.len() != 2 || ids.shape[0] != tokens.len() {
            return Err(format!("moe_router_indices {:?} is not [T={},k]", ids.shape, tokens.len()));
        }
        if let Some(w) = weights.as_ref().filter(|w| w.shape != ids.shape) {
            return Err(format!("moe_router {:?} and moe_router_indices {:?} differ in shape", w.shape, ids.shape));
        }
        let experts = self.experts;
        let ids_f64 = ids.values();
        if let Some(bad) = ids_f64.iter().find(|&&v| !(v >= 0.0 && v < experts as f64 && v.fract() == 0.0)) {
            return Err(format!("moe_router_indices holds {bad}, not an expert id of 0..{experts}"));
        }
        let shape = ids.shape.clone();
        let weights = weights.map(|w| HostTensor::f32(shape.clone(), w.values().iter().map(|&v| v as f32).collect()));
        let ids = HostTensor::i32(shape, ids_f64.iter().map(|&v| v as i32).collect());
        Ok((weights, ids))
    }
}

/// Tokens whose expert set differs between two `[T,k]` id tensors.
fn differing_sets(a: &HostTensor, b: &HostTensor) -> usize {
    let k = b.shape.get(1).copied().unwrap_or(1).max(1);
    let (Some(a), Some(b)) = (a.as_i32(), b.as_i32()) else { return 0 };
    a.chunks(k)
        .zip(b.chunks(k))
        .filter(|(x, y)| {
            let (mut x, mut y) = (x.to_vec(), y.to_vec());
            x.sort_unstable();
            y.sort_unstable();
            x != y
        })
        .count()
}
