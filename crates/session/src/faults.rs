//! Fault injection: rewrite one token of one stage's output at one step
//! (or, with an expert selector, the slots routed to one expert), right
//! after the stage and before anything reads or captures it. Fault
//! systems attach in `StageHookSystems::Amend(stage)` from outside the
//! pipeline, which does not know faults exist.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use pipeline::weights::{synthetic_value, tensor_key};
use pipeline::{Forward, HookCtx, HostTensor, ModelConfig, PipelineError, TensorData};
use serde::Deserialize;
use serde::de::{self, Deserializer};
use stage_types::SaveTensorStage;

/// What a fault does to the chosen token's values.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub enum FaultKind {
    /// Every value becomes NaN.
    Nan,
    /// Every value becomes +Inf.
    Inf,
    /// Every value becomes 0.
    Zero,
    /// Every value is multiplied by the factor.
    Scale(f32),
    /// Gaussian noise of this standard deviation, seeded, is added.
    Noise {
        /// Standard deviation.
        std: f32,
        /// Seed.
        seed: u64,
    },
    /// The token's first and second experts (moe_router_indices) or
    /// weights (moe_router) trade places.
    SwapExperts,
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultKind::Nan => f.write_str("nan"),
            FaultKind::Inf => f.write_str("inf"),
            FaultKind::Zero => f.write_str("zero"),
            FaultKind::Scale(x) => write!(f, "scale({x})"),
            FaultKind::Noise { std, seed } => write!(f, "noise({std},{seed})"),
            FaultKind::SwapExperts => f.write_str("swap-experts"),
        }
    }
}

/// One stage name in a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StageName(pub SaveTensorStage);

impl<'de> Deserialize<'de> for StageName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(StageName).map_err(de::Error::custom)
    }
}

/// A fault: which stage, layer, step and token, and what to do.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// The stage whose output is rewritten.
    pub stage: StageName,
    /// The layer (layer stages only).
    #[serde(default)]
    pub layer: Option<usize>,
    /// The step (default 0, the prompt).
    #[serde(default)]
    pub step: usize,
    /// The token within the step (default 0; with `expert`, default every
    /// token routed to that expert).
    #[serde(default)]
    pub token: Option<usize>,
    /// For per-expert stages and moe_router: only the slots routed to this
    /// expert are hit (the bug class of one expert's weights read wrongly).
    #[serde(default)]
    pub expert: Option<usize>,
    /// What to do.
    pub kind: FaultKind,
}

/// Stages whose `[T,k,...]` slots belong to experts (an `expert` selector
/// applies to them): the per-expert stages and moe_router, the two inputs
/// of moe_ffn_out's weighted sum.
pub const EXPERT_SLOT_STAGES: [SaveTensorStage; 6] = [
    SaveTensorStage::MoeRouter,
    SaveTensorStage::MoeExpertGate,
    SaveTensorStage::MoeExpertUp,
    SaveTensorStage::MoeExpertClamp,
    SaveTensorStage::MoeExpertSwigl,
    SaveTensorStage::MoeExpertOut,
];

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.stage.0)?;
        if let Some(l) = self.layer {
            write!(f, "@{l}")?;
        }
        write!(f, ".{}", self.step)?;
        if let Some(t) = self.token {
            write!(f, ":{t}")?;
        }
        if let Some(e) = self.expert {
            write!(f, "#{e}")?;
        }
        write!(f, "={}", self.kind)
    }
}

const CLI_FORM: &str = "write stage@layer[.step][:token][#expert]=kind (model stages: stage[.step][:token]=kind), kind one of nan, inf, zero, scale(F), noise(STD[,SEED]), swap-experts; e.g. moe_router@2=nan, attn_out@1.3=scale(1.5), moe_expert_out@30#17=scale(1.05)";

impl FromStr for FaultSpec {
    type Err = String;

    /// Parses the command-line form `stage@layer[.step][:token][#expert]=kind`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("bad fault `{s}`: {why}; {CLI_FORM}");
        let (target, kind) = s.split_once('=').ok_or_else(|| bad("no `=`"))?;
        let (target, expert) = match target.split_once('#') {
            Some((t, e)) => (t, Some(e.trim().parse().map_err(|_| bad("expert is not an integer"))?)),
            None => (target, None),
        };
        let (target, token) = match target.split_once(':') {
            Some((t, tok)) => (t, Some(tok.trim().parse().map_err(|_| bad("token is not an integer"))?)),
            None => (target, None),
        };
        let (target, step) = match target.split_once('.') {
            Some((t, st)) => (t, st.trim().parse().map_err(|_| bad("step is not an integer"))?),
            None => (target, 0),
        };
        let (stage, layer) = match target.split_once('@') {
            Some((st, l)) => (st, Some(l.trim().parse().map_err(|_| bad("layer is not an integer"))?)),
            None => (target, None),
        };
        let stage = stage.parse::<SaveTensorStage>().map_err(|e| format!("bad fault `{s}`: {e}"))?;
        Ok(FaultSpec {
            stage: StageName(stage),
            layer,
            step,
            token,
            expert,
            kind: parse_kind(kind.trim()).map_err(|why| bad(&why))?,
        })
    }
}

/// Parses a fault kind; the error says what is wrong with it.
fn parse_kind(text: &str) -> Result<FaultKind, String> {
    let lower = text.to_ascii_lowercase();
    let args = |name: &str| -> Option<Vec<String>> {
        let inner = lower.strip_prefix(name)?.trim_start().strip_prefix('(')?.strip_suffix(')')?;
        Some(inner.split(',').map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect())
    };
    match lower.as_str() {
        "nan" => return Ok(FaultKind::Nan),
        "inf" => return Ok(FaultKind::Inf),
        "zero" => return Ok(FaultKind::Zero),
        "swap-experts" | "swapexperts" | "swap_experts" => return Ok(FaultKind::SwapExperts),
        _ => {}
    }
    let number = |a: &str, what: &str| -> Result<f32, String> {
        a.parse::<f32>().ok().filter(|x| x.is_finite()).ok_or_else(|| format!("{what} `{a}` is not a finite number"))
    };
    if let Some(a) = args("scale") {
        return match a.as_slice() {
            [x] => Ok(FaultKind::Scale(number(x, "scale factor")?)),
            _ => Err("scale takes one number, the factor: scale(1.5)".into()),
        };
    }
    if let Some(a) = args("noise") {
        return match a.as_slice() {
            [std] => Ok(FaultKind::Noise { std: number(std, "noise std")?, seed: 0 }),
            [std, seed] => Ok(FaultKind::Noise {
                std: number(std, "noise std")?,
                seed: seed.parse().map_err(|_| format!("noise seed `{seed}` is not a whole number"))?,
            }),
            _ => Err("noise takes a number and an optional whole-number seed: noise(0.01) or noise(0.01, 7)".into()),
        };
    }
    Err(format!("unknown kind `{text}`"))
}

impl FaultSpec {
    /// Checks the fault against the model and the run: the layer exists
    /// and has this stage, the kind applies to the stage's element type,
    /// the step runs and the token exists in it.
    pub fn check(&self, config: &ModelConfig, prompt_len: usize, steps: usize) -> Result<(), String> {
        let stage = self.stage.0;
        let bad = |why: String| Err(format!("fault {self}: {why}"));
        match (stage.is_layer_stage(), self.layer) {
            (true, None) => return bad(format!("{stage} is a layer stage; give a layer (0..{})", config.num_layers)),
            (false, Some(_)) => return bad(format!("{stage} is a model stage; give no layer")),
            (true, Some(l)) if l >= config.num_layers => {
                return bad(format!("layer {l} does not exist (the model has layers 0..{})", config.num_layers));
            }
            (true, Some(l)) if !stage.applies_to(config.layer_traits(l)) => {
                let kind = if config.is_moe_layer(l) { "a MoE" } else { "a dense" };
                return bad(format!("layer {l} is {kind} layer of {} without a {stage} stage", config.architecture));
            }
            _ => {}
        }
        let ids = stage.is_integer();
        match self.kind {
            FaultKind::SwapExperts
                if !matches!(stage, SaveTensorStage::MoeRouter | SaveTensorStage::MoeRouterIndices) =>
            {
                return bad("swap-experts applies to moe_router and moe_router_indices only".into());
            }
            FaultKind::SwapExperts if config.experts_per_token < 2 => {
                return bad("swap-experts needs at least 2 experts per token".into());
            }
            FaultKind::Nan | FaultKind::Inf | FaultKind::Scale(_) | FaultKind::Noise { .. } if ids => {
                let (what, valid) = match stage {
                    SaveTensorStage::MoeRouterIndices => ("expert ids", "zero or swap-experts"),
                    SaveTensorStage::MoeRouterGroups => ("group ids", "zero"),
                    _ => ("positions", "zero"),
                };
                return bad(format!("{stage} holds int32 {what}; use {valid}"));
            }
            _ => {}
        }
        if let Some(e) = self.expert {
            if !EXPERT_SLOT_STAGES.contains(&stage) {
                let names: Vec<&str> = EXPERT_SLOT_STAGES.iter().map(|s| s.name()).collect();
                return bad(format!("an expert selector applies to {} only", names.join(", ")));
            }
            if e >= config.num_experts {
                return bad(format!("expert {e} does not exist (the model has experts 0..{})", config.num_experts));
            }
            if self.kind == FaultKind::SwapExperts {
                return bad("swap-experts swaps two slots and takes no expert selector".into());
            }
        }
        if self.step >= steps {
            return bad(format!("step {} does not run (the run makes steps 0..{steps})", self.step));
        }
        let tokens = if self.step == 0 { prompt_len } else { 1 };
        if let Some(t) = self.token
            && t >= tokens
        {
            return bad(format!("token {t} does not exist: step {} computes {tokens} token(s)", self.step));
        }
        Ok(())
    }

    /// Rewrites the fault's token in `tensor`, the output of its stage;
    /// with an expert selector, the slots of `expert_ids` (the step's
    /// `[T,k]` moe_router_indices) routed to that expert instead. Returns
    /// how many rows it hit.
    pub fn apply(&self, tensor: &mut HostTensor, expert_ids: Option<&HostTensor>) -> Result<usize, String> {
        let ranges = match self.expert {
            None => token_ranges(self.stage.0, &tensor.shape, self.token.unwrap_or(0))?,
            Some(e) => {
                let ids = expert_ids.ok_or("an expert selector needs the step's moe_router_indices")?;
                expert_slot_ranges(&tensor.shape, ids, e, self.token)?
            }
        };
        match &mut tensor.data {
            TensorData::F32(values) => {
                for &(start, end) in &ranges {
                    let row = &mut values[start..end];
                    match self.kind {
                        FaultKind::Nan => row.fill(f32::NAN),
                        FaultKind::Inf => row.fill(f32::INFINITY),
                        FaultKind::Zero => row.fill(0.0),
                        FaultKind::Scale(f) => row.iter_mut().for_each(|x| *x *= f),
                        FaultKind::Noise { std, seed } => {
                            let key = tensor_key(seed, "moetrace-fault-noise");
                            for (i, x) in row.iter_mut().enumerate() {
                                *x += synthetic_value(key, (start + i) as u64, 0.0, std);
                            }
                        }
                        FaultKind::SwapExperts => row.swap(0, 1),
                    }
                }
            }
            TensorData::I32(values) => {
                for &(start, end) in &ranges {
                    match self.kind {
                        FaultKind::Zero => values[start..end].fill(0),
                        FaultKind::SwapExperts => values[start..end].swap(0, 1),
                        other => return Err(format!("{other} does not apply to int32 expert ids")),
                    }
                }
            }
        }
        Ok(ranges.len())
    }
}

/// The element ranges holding token `t` of a stage tensor: row t of a
/// `[T, ...]` tensor, or row t of every head of a `[nh,T,P]` attention map
/// and of every rank of a per-rank `[R,T,...]` stage.
pub fn token_ranges(stage: SaveTensorStage, shape: &[usize], t: usize) -> Result<Vec<(usize, usize)>, String> {
    use SaveTensorStage as S;
    let attention_map = matches!(stage, S::AttnScores | S::AttnSoftmax | S::MoeCombine | S::MoeDispatch);
    let (tokens, row, heads) = if attention_map && shape.len() == 3 {
        (shape[1], shape[2], shape[0])
    } else {
        (shape.first().copied().unwrap_or(0), shape.iter().skip(1).product(), 1)
    };
    if t >= tokens {
        return Err(format!("token {t} is beyond the {tokens} tokens of {stage} {shape:?}"));
    }
    Ok((0..heads).map(|h| ((h * tokens + t) * row, (h * tokens + t + 1) * row)).collect())
}

/// The element ranges of the `[T,k,...]` slots routed to `expert`
/// (of `token` only, when given), from the step's `[T,k]` expert ids.
pub fn expert_slot_ranges(
    shape: &[usize],
    ids: &HostTensor,
    expert: usize,
    token: Option<usize>,
) -> Result<Vec<(usize, usize)>, String> {
    let ids_i32 = ids.as_i32().ok_or("moe_router_indices is not int32")?;
    let (tokens, k) = match ids.shape[..] {
        [t, k] => (t, k),
        _ => return Err(format!("moe_router_indices has shape {:?}, not [T,k]", ids.shape)),
    };
    if shape.len() < 2 || shape[0] != tokens || shape[1] != k {
        return Err(format!("a tensor of shape {shape:?} has no [T={tokens},k={k}] expert slots"));
    }
    let inner: usize = shape[2..].iter().product();
    Ok((0..tokens)
        .filter(|t| token.is_none_or(|only| only == *t))
        .flat_map(|t| (0..k).map(move |j| (t, j)))
        .filter(|&(t, j)| ids_i32[t * k + j] == expert as i32)
        .map(|(t, j)| ((t * k + j) * inner, (t * k + j + 1) * inner))
        .collect())
}

/// What the faults of a run did not do, for the report: a fault whose
/// expert selector met no slot routed to that expert changed nothing, and
/// says so (also logged as a warning when it happens).
#[derive(Debug, Clone, Default)]
pub struct FaultNotes(Arc<Mutex<Vec<String>>>);

impl FaultNotes {
    /// The notes so far.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn push(&self, note: String) {
        tracing::warn!("{note}");
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(note);
    }
}

fn inject(spec: &FaultSpec, notes: &FaultNotes, mut ctx: HookCtx) {
    let stage = spec.stage.0;
    if !ctx.produced(stage) || ctx.step().step != spec.step {
        return;
    }
    if stage.is_layer_stage() && ctx.layer() != spec.layer {
        return;
    }
    let Some(mut tensor) = ctx.read(stage) else { return };
    let ids = match spec.expert {
        Some(_) => match ctx.read(SaveTensorStage::MoeRouterIndices) {
            Some(ids) => Some(ids),
            None => return,
        },
        None => None,
    };
    match spec.apply(&mut tensor, ids.as_ref()) {
        Ok(0) if spec.expert.is_some() => notes.push(format!(
            "fault {spec}: no slot of step {}{} is routed to expert {}{}; nothing was changed",
            spec.step,
            spec.layer.map(|l| format!(" layer {l}")).unwrap_or_default(),
            spec.expert.unwrap_or_default(),
            spec.token.map(|t| format!(" at token {t}")).unwrap_or_default(),
        )),
        Ok(_) => ctx.write(stage, &tensor),
        Err(e) => ctx.fail(PipelineError::BadInput(format!("fault {spec}: {e}"))),
    }
}

/// Attaches one amending system per fault; the returned notes say what a
/// fault could not do.
pub fn attach_faults(forward: &mut Forward, faults: &[FaultSpec]) -> FaultNotes {
    let notes = FaultNotes::default();
    for spec in faults {
        let spec = spec.clone();
        let notes = notes.clone();
        forward.add_amender(spec.stage.0, move |ctx: HookCtx| inject(&spec, &notes, ctx));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_form_parses_every_kind_and_the_optional_parts() {
        let f: FaultSpec = "moe_router@2=nan".parse().unwrap();
        assert_eq!(
            (f.stage.0, f.layer, f.step, f.token, f.kind),
            (SaveTensorStage::MoeRouter, Some(2), 0, None, FaultKind::Nan)
        );
        let f: FaultSpec = "attn_out@1.3:0=Scale(1.5)".parse().unwrap();
        assert_eq!((f.layer, f.step, f.kind), (Some(1), 3, FaultKind::Scale(1.5)));
        let f: FaultSpec = "lm_head.2:4=noise(0.1, 9)".parse().unwrap();
        assert_eq!((f.layer, f.step, f.token, f.kind), (None, 2, Some(4), FaultKind::Noise { std: 0.1, seed: 9 }));
        assert!("x@1=zero".parse::<FaultSpec>().unwrap_err().contains("unknown stage `x`"));
        for bad in ["moe_router@2", "moe_router@a=nan", "moe_router@2=boom", "moe_router@2=scale(a)"] {
            let e = bad.parse::<FaultSpec>().unwrap_err();
            assert!(e.contains(bad) && e.contains("stage@layer"), "{e}");
        }
        assert_eq!("moe_router_indices@0=swap-experts".parse::<FaultSpec>().unwrap().kind, FaultKind::SwapExperts);
    }

    #[test]
    fn apply_touches_only_the_chosen_token() {
        let spec: FaultSpec = "attn_out@0:1=zero".parse().unwrap();
        let mut t = HostTensor::f32(vec![3, 2], vec![1.0; 6]);
        spec.apply(&mut t, None).unwrap();
        assert_eq!(t.as_f32().unwrap(), [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]);
        let spec: FaultSpec = "attn_scores@0:1=nan".parse().unwrap();
        let mut t = HostTensor::f32(vec![2, 2, 3], vec![1.0; 12]);
        spec.apply(&mut t, None).unwrap();
        let nan: Vec<bool> = t.as_f32().unwrap().iter().map(|x| x.is_nan()).collect();
        assert_eq!(nan, [false, false, false, true, true, true, false, false, false, true, true, true]);
        let spec: FaultSpec = "moe_router_indices@0:0=swap-experts".parse().unwrap();
        let mut t = HostTensor::i32(vec![2, 3], vec![4, 7, 1, 2, 3, 5]);
        spec.apply(&mut t, None).unwrap();
        assert_eq!(t.as_i32().unwrap(), [7, 4, 1, 2, 3, 5]);
        let spec: FaultSpec = "attn_out@0:5=zero".parse().unwrap();
        assert!(spec.apply(&mut HostTensor::f32(vec![3, 2], vec![1.0; 6]), None).unwrap_err().contains("token 5"));
    }

    #[test]
    fn an_expert_selector_hits_only_the_slots_routed_to_that_expert() {
        let spec: FaultSpec = "moe_expert_out@1#7=scale(2)".parse().unwrap();
        assert_eq!((spec.expert, spec.token), (Some(7), None));
        assert_eq!(spec.to_string(), "moe_expert_out@1.0#7=scale(2)");
        // [T=3,k=2,H=2]; expert 7 is token 0 slot 1 and token 2 slot 0.
        let ids = HostTensor::i32(vec![3, 2], vec![4, 7, 1, 2, 7, 5]);
        let mut t = HostTensor::f32(vec![3, 2, 2], vec![1.0; 12]);
        assert_eq!(spec.apply(&mut t, Some(&ids)).unwrap(), 2);
        assert_eq!(t.as_f32().unwrap(), [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 1.0, 1.0]);
        let one: FaultSpec = "moe_router@1:2#7=zero".parse().unwrap();
        let mut w = HostTensor::f32(vec![3, 2], vec![0.5; 6]);
        assert_eq!(one.apply(&mut w, Some(&ids)).unwrap(), 1);
        assert_eq!(w.as_f32().unwrap(), [0.5, 0.5, 0.5, 0.5, 0.0, 0.5]);
        let config = pipeline::weights::SyntheticPreset::by_name("tiny-moe").unwrap().config(None).unwrap();
        let check = |s: &str| s.parse::<FaultSpec>().unwrap().check(&config, 9, 3);
        assert!(check("moe_expert_out@1#7=scale(2)").is_ok());
        assert!(check("attn_out@1#7=zero").unwrap_err().contains("expert selector applies to moe_router"));
        assert!(check("moe_expert_up@1#99=zero").unwrap_err().contains("expert 99"));
        assert!("moe_expert_up@1#x=zero".parse::<FaultSpec>().unwrap_err().contains("expert is not an integer"));
    }

    #[test]
    fn check_rejects_impossible_faults_with_reasons() {
        let config = pipeline::weights::SyntheticPreset::by_name("tiny-moe").unwrap().config(None).unwrap();
        let check = |s: &str| s.parse::<FaultSpec>().unwrap().check(&config, 9, 3);
        assert!(check("moe_router@2=nan").is_ok());
        assert!(check("moe_router@9=nan").unwrap_err().contains("layer 9"));
        assert!(check("moe_router=nan").unwrap_err().contains("give a layer"));
        assert!(check("lm_head@1=nan").unwrap_err().contains("give no layer"));
        assert!(check("ffn_gate@1=nan").unwrap_err().contains("MoE layer"));
        assert!(check("moe_router_indices@1=nan").unwrap_err().contains("int32"));
        assert!(check("attn_out@1=swap-experts").unwrap_err().contains("moe_router"));
        assert!(check("attn_out@1.3=zero").unwrap_err().contains("step 3"));
        assert!(check("attn_out@1.1:1=zero").unwrap_err().contains("1 token"));
        assert!(check("attn_out@1.0:8=zero").is_ok());
    }
}
