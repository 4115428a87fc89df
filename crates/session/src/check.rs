//! `check`: each stage's local error of another engine's capture, from the
//! capture alone (bisect with `target: Capture("dir")`, or `moetrace check
//! CAPTURE --model MODEL`). The capture is the teacher: the reference
//! re-runs every stage on the capture's own inputs of that stage (its
//! previous stages, its keys and values of earlier steps, its expert ids
//! and router weights: every captured stage is forced after it runs), and
//! what it computes is compared with what the capture holds. Beside it, the
//! CPU keeping the capture's precision (its manifest's dtype) runs on the
//! same inputs: its error is what a correct implementation of that
//! precision makes, so rows are judged as `bisect --local` judges them.
//!
//! A stage is checked only where the capture holds it and every input it
//! reads ([`stage_types::SaveTensorStage::inputs`]); the others are named,
//! with what they need, never passed silently.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use compare::expected::RATIO_THRESHOLD;
use compare::findings::mark_findings;
use compare::scope::ExpertIds;
use compare::{CaptureDir, Mode, NpyArray, NpyData, Report, ScopeTensors, compare_scope};
use pipeline::backend::contract::NumericContract;
use pipeline::{HostTensor, ModelConfig, ScopeOutputs, StepScope};
use stage_types::{LayerTraits, SaveTensorStage as S, StageInput};

use crate::error::{Result, SessionError};
use crate::session_builder::{Session, model_source};
use crate::sides::{BisectOptions, Side, expected_tensors, view};
use crate::spec::BisectConfig;

/// One step of the capture: its index, first position and tokens.
struct CapturedStep {
    step: usize,
    start: usize,
    tokens: Vec<u32>,
}

/// Checks the capture in `dir` against `config`'s model on its reference
/// backend; `path` is the config's, for messages. `on_scope` is told each
/// (step, scope) as it is checked.
pub(crate) fn check_capture(
    config: &BisectConfig,
    dir: &Path,
    path: &Path,
    options: &BisectOptions,
    on_scope: &mut dyn FnMut(usize, String),
) -> Result<Report> {
    let bad = |message: String| SessionError::ConfigValue { path: path.to_path_buf(), message };
    let capture = CaptureDir::open(dir)?;
    let manifest = &capture.manifest;
    let spec = &config.session;
    if manifest.prompt != spec.tokens() {
        return Err(bad(format!(
            "the capture {} was made from the prompt {:?}, the config gives {:?}: a capture is checked on its own prompt",
            dir.display(),
            manifest.prompt,
            spec.tokens()
        )));
    }
    let opened = Session::open(spec, path, &[&config.reference], 1, options.meter.clone())?;
    let model = &opened.model;
    match ModelConfig::same_computation_json(&manifest.model.config, &model.config.json) {
        Ok(true) => {}
        Ok(false) => {
            return Err(bad(format!(
                "the capture {} is of another model ({}) than {} ({}): its config.json differs",
                dir.display(),
                manifest.model.architecture,
                model_source(model),
                model.config.architecture
            )));
        }
        Err(why) => tracing::warn!("the capture's model config was not compared: {why}"),
    }
    let steps = captured_steps(&capture);
    let contract = capture_contract(&manifest.dtype);
    let prepared = opened.forward(&config.reference, None, true)?;
    let mut reference = Side { forward: prepared.forward, name: (prepared.name, prepared.dtype) };
    let mut expected = Side { forward: opened.emulating(contract)?, name: ("cpu", "emulated") };
    let mut report = Report {
        mode: Mode::Local,
        reference: format!("{} on {}", config.reference, model_source(model)),
        target: format!("capture {} ({}, {})", dir.display(), manifest.backend, manifest.dtype),
        ..Report::default()
    };
    let judged = if contract.emulation_replicates() {
        format!(
            "that CPU replays the capture's arithmetic, so a finding is a row further from the replay's than {RATIO_THRESHOLD}x the floor of f32 accumulation order ({:e} of the row norm)",
            contract.activations.error_floor()
        )
    } else {
        format!("a finding is a row more than {RATIO_THRESHOLD}x its expected error")
    };
    report.notes.push(format!(
        "check: the reference re-ran every stage on the capture's own inputs of that stage (its earlier stages, keys and values, expert ids and weights); expected errors: the CPU keeping the capture's precision ({}) on the same inputs; {judged}",
        contract.describe()
    ));
    let mut unchecked: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut shared_non_finite: Vec<String> = Vec::new();
    let mut checked = 0usize;
    let mut folded: BTreeSet<String> = BTreeSet::new();
    for step in &steps {
        reference.forward.begin_step(step.step, &step.tokens, step.start)?;
        expected.forward.begin_step(step.step, &step.tokens, step.start)?;
        for scope in StepScope::all(model.config.num_layers) {
            let layer = scope.layer();
            let traits = layer.map(|l| model.config.layer_traits(l)).unwrap_or_default();
            let mut arrays = scope_arrays(&capture, step, scope, &model.config)?;
            let forced = teacher_outputs(&arrays).map_err(&bad)?;
            let mut own = reference.run(scope, Some(forced.clone()))?;
            let emulated = expected.run(scope, Some(forced))?;
            for (stage, array) in arrays.iter_mut() {
                if let Some(ours) = own.get_mut(stage) {
                    let n = leave_out_shared_non_finite(ours, array);
                    if n > 0 {
                        shared_non_finite.push(format!("{n} in {stage} of {}", place(step.step, layer)));
                    }
                }
            }
            let mut tensors = ScopeTensors::new();
            for (&stage, array) in &arrays {
                match missing_input(&capture, (step, &steps), scope, stage, traits, model.config.num_layers) {
                    Some(needs) => {
                        unchecked.entry(format!("{stage} needs {needs}")).or_default().push(place(step.step, layer));
                    }
                    None => {
                        if let Some(ours) = own.get(&stage) {
                            tensors.insert(stage, (Some(view(ours)), Some(array.view())));
                        }
                        for input in stage.inputs(traits) {
                            if let StageInput::Stage(s) = input
                                && capture.entry(step.step, layer, s).is_none()
                            {
                                folded.insert(format!("{stage} (with {s})"));
                            }
                        }
                    }
                }
            }
            checked += tensors.len();
            let emulated = expected_tensors(&emulated, &contract);
            let rows = compare_scope(
                step.step,
                layer,
                &tensors,
                &options.tolerances,
                contract.activations.name(),
                ExpertIds::Reference,
                Some(&emulated),
            );
            report.rows.extend(rows);
            on_scope(step.step, scope.to_string());
        }
    }
    if checked == 0 {
        return Err(bad(format!(
            "the capture {} holds nothing checkable: a stage is checked where the capture holds it and every input it reads ({})",
            dir.display(),
            unchecked_text(&unchecked)
        )));
    }
    if !unchecked.is_empty() {
        report.notes.push(format!("not checkable (inputs not captured): {}", unchecked_text(&unchecked)));
    }
    if !folded.is_empty() {
        report.notes.push(format!(
            "checked together with an input the capture does not hold (the reference computed that input from the capture's inputs of it, as a fused op would): {}",
            folded.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    if !shared_non_finite.is_empty() {
        let more = shared_non_finite.len().saturating_sub(5);
        shared_non_finite.truncate(5);
        report.notes.push(format!(
            "values NaN or infinite in the capture and in the reference alike (the reference fed the capture's own non-finite inputs) were left out of those stages' errors: {}{}",
            shared_non_finite.join(", "),
            if more > 0 { format!(" and {more} more") } else { String::new() }
        ));
    }
    if let Some(note) = opened.products_note() {
        report.notes.push(format!("the reference's {note}"));
    }
    mark_findings(&mut report.rows);
    clear_consumer_findings(&mut report, &model.config);
    let starts: Vec<(usize, usize)> = steps.iter().map(|s| (s.step, s.start)).collect();
    report.name_tokens(&manifest.token_texts, &starts);
    Ok(report)
}

/// Clears the finding of a stage that reads, at the same step, a stage
/// whose finding is at the same token: that is not a second bug. The
/// capture holds a value of the input that its engine did not consume (an
/// edited or mis-recorded tensor), and the consumer, which the engine
/// computed from the value it did consume, disagrees with what the recorded
/// one gives. A note names each one under its input's finding.
fn clear_consumer_findings(report: &mut Report, config: &ModelConfig) {
    let flagged: BTreeSet<(usize, Option<usize>, S, Option<usize>)> =
        report.rows.iter().filter(|r| r.finding.is_some()).map(|r| (r.step, r.layer, r.stage, r.worst_token)).collect();
    let mut cleared = Vec::new();
    for row in report.rows.iter_mut().filter(|r| r.finding.is_some()) {
        let traits = row.layer.map(|l| config.layer_traits(l)).unwrap_or_default();
        let scope = match row.layer {
            Some(l) => StepScope::Layer(l),
            None if row.stage == S::Embedding => StepScope::Prologue,
            None => StepScope::Epilogue,
        };
        let input = row.stage.inputs(traits).into_iter().find_map(|input| {
            let (layer, stage) = match input {
                StageInput::Stage(stage) => (row.layer, stage),
                StageInput::ScopeInput => scope_input(scope, config.num_layers)?,
                StageInput::EarlierKeysAndValues => return None,
            };
            flagged.contains(&(row.step, layer, stage, row.worst_token)).then_some((layer, stage))
        });
        if let Some((layer, stage)) = input {
            row.finding = None;
            let token = row.worst_token.map(|t| format!(" token {t}")).unwrap_or_default();
            let input = format!("{stage} at {}{token}", place(row.step, layer));
            cleared.push(format!(
                "{} {} (from the capture's {input}, itself a finding)",
                place(row.step, row.layer),
                row.stage
            ));
            row.follows = Some(input);
        }
    }
    if !cleared.is_empty() {
        report.notes.push(format!(
            "not counted as findings: {}; the capture holds a value of that input its engine did not consume (an edited or mis-recorded tensor), so what the engine computed from it disagrees with the recorded value",
            cleared.join("; ")
        ));
    }
}

/// Where `scope`'s input is ([`StageInput::ScopeInput`]) in a model of
/// `layers` layers: the embedding for layer 0, the layer before's
/// post_ffn_residual for the others, the last layer's for the epilogue;
/// the prologue has none.
fn scope_input(scope: StepScope, layers: usize) -> Option<(Option<usize>, S)> {
    match scope {
        StepScope::Prologue => None,
        StepScope::Layer(0) => Some((None, S::Embedding)),
        StepScope::Layer(l) => Some((Some(l - 1), S::PostFfnResidual)),
        StepScope::Epilogue => layers.checked_sub(1).map(|l| (Some(l), S::PostFfnResidual)),
    }
}

/// `step S layer L` or `step S` (model stages).
fn place(step: usize, layer: Option<usize>) -> String {
    match layer {
        Some(l) => format!("step {step} layer {l}"),
        None => format!("step {step}"),
    }
}

/// `stage needs X (at step 0 layer 1, step 0 layer 2 and 4 more); ...`,
/// at most a few places per reason.
fn unchecked_text(unchecked: &BTreeMap<String, Vec<String>>) -> String {
    unchecked
        .iter()
        .map(|(why, places)| {
            let shown: Vec<&str> = places.iter().take(3).map(String::as_str).collect();
            let more = if places.len() > 3 { format!(" and {} more", places.len() - 3) } else { String::new() };
            format!("{why} (at {}{more})", shown.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The capture's steps: its manifest's, or, for a producer that wrote
/// none, the prompt then one generated token a step.
fn captured_steps(capture: &CaptureDir) -> Vec<CapturedStep> {
    let m = &capture.manifest;
    if !m.steps.is_empty() {
        let mut steps: Vec<CapturedStep> = m
            .steps
            .iter()
            .map(|s| CapturedStep { step: s.step, start: s.start_position, tokens: s.tokens.clone() })
            .collect();
        steps.sort_by_key(|s| s.step);
        return steps;
    }
    let mut steps = vec![CapturedStep { step: 0, start: 0, tokens: m.prompt.clone() }];
    let captured: BTreeSet<usize> = capture.keys().into_iter().map(|k| k.0).collect();
    for (i, &token) in m.generated.iter().enumerate() {
        if !captured.contains(&(i + 1)) {
            break;
        }
        steps.push(CapturedStep { step: i + 1, start: m.prompt.len() + i, tokens: vec![token] });
    }
    steps
}

/// The arithmetic a capture was made with, as a numeric contract, from its
/// manifest's dtype: llama.cpp's CPU numerics for a llama.cpp capture
/// (`llama.cpp cpu, kv f16`), bf16 (or f16, the nearest contract) where the
/// dtype names it (`bfloat16`, `bf16`, moetrace's `f32 emulating bf16
/// ...`), else the reference's.
fn capture_contract(dtype: &str) -> NumericContract {
    let dtype = dtype.to_ascii_lowercase();
    let words: Vec<&str> = dtype.split(|c: char| !c.is_alphanumeric() && c != '.').filter(|w| !w.is_empty()).collect();
    let has = |w: &str| words.contains(&w);
    if has("llama.cpp") {
        // moetrace_capture.llamacpp writes `llama.cpp <device>, kv <type>`
        // (`llama.cpp cuda offload of 99 layers, kv f16`).
        let kv_f16 = !has("f32");
        return if has("cuda") {
            NumericContract::llama_cpp_cuda(kv_f16)
        } else {
            NumericContract::llama_cpp_cpu(kv_f16)
        };
    }
    if ["bf16", "bfloat16", "f16", "float16", "half"].iter().any(|d| has(d)) {
        NumericContract::BF16
    } else {
        NumericContract::REFERENCE
    }
}

/// The captured tensors of one scope of one step, each checked against the
/// shape the model gives that stage there.
fn scope_arrays(
    capture: &CaptureDir,
    step: &CapturedStep,
    scope: StepScope,
    config: &ModelConfig,
) -> Result<BTreeMap<S, NpyArray>> {
    let layer = scope.layer();
    let traits = layer.map(|l| config.layer_traits(l)).unwrap_or_default();
    let positions = step.start + step.tokens.len();
    let mut arrays = BTreeMap::new();
    for &stage in S::ALL.iter().filter(|s| s.is_layer_stage() == layer.is_some() && in_scope(**s, scope)) {
        if layer.is_some() && !stage.applies_to(traits) {
            continue;
        }
        let Some(array) = capture.load(step.step, layer, stage)? else { continue };
        let want = config.stage_shape(stage, step.tokens.len(), positions);
        if array.shape != want {
            return Err(SessionError::ConfigValue {
                path: capture.dir.clone(),
                message: format!(
                    "{stage} of {} is {:?} in the capture, but the model's is {want:?} (another model, or another layout)",
                    place(step.step, layer),
                    array.shape
                ),
            });
        }
        arrays.insert(stage, array);
    }
    Ok(arrays)
}

/// Whether `stage` runs in `scope` (the model stages: embedding in the
/// prologue, final_norm and lm_head in the epilogue).
fn in_scope(stage: S, scope: StepScope) -> bool {
    match scope {
        StepScope::Prologue => stage == S::Embedding,
        StepScope::Layer(_) => stage.is_layer_stage(),
        StepScope::Epilogue => matches!(stage, S::FinalNorm | S::LmHead),
    }
}

/// The captured tensors as the values forced into the reference.
fn teacher_outputs(arrays: &BTreeMap<S, NpyArray>) -> std::result::Result<ScopeOutputs, String> {
    arrays
        .iter()
        .map(|(&stage, a)| {
            let shape = a.shape.clone();
            let tensor = match (&a.data, stage.element_type()) {
                (NpyData::I32(v), "int32") => HostTensor::i32(shape, v.clone()),
                (NpyData::I64(v), "int32") => HostTensor::i32(shape, v.iter().map(|&x| x as i32).collect()),
                (NpyData::F32(v), "float32") => HostTensor::f32(shape, v.clone()),
                (NpyData::F64(v), "float32") => HostTensor::f32(shape, v.iter().map(|&x| x as f32).collect()),
                (_, want) => return Err(format!("{stage} is {} in the capture, not {want}", a.dtype())),
            };
            Ok((stage, tensor))
        })
        .collect()
}

/// Sets to 0, on both sides, each value that is non-finite in the
/// reference's output and the capture's alike (NaN on both, or the same
/// infinity): the reference fed the capture's own NaN computes NaN where
/// the engine did, which says nothing about the stage; the rest of the
/// tensor is still compared, and a value non-finite on one side only still
/// shows. Returns how many were left out.
fn leave_out_shared_non_finite(ours: &mut HostTensor, captured: &mut NpyArray) -> usize {
    let Some(ours) = ours.as_f32_mut() else { return 0 };
    let same = |a: f64, b: f64| (a.is_nan() && b.is_nan()) || (a.is_infinite() && a == b);
    let mut n = 0;
    match &mut captured.data {
        NpyData::F32(theirs) => {
            for (a, b) in ours.iter_mut().zip(theirs.iter_mut()) {
                if same(*a as f64, *b as f64) {
                    (*a, *b, n) = (0.0, 0.0, n + 1);
                }
            }
        }
        NpyData::F64(theirs) => {
            for (a, b) in ours.iter_mut().zip(theirs.iter_mut()) {
                if same(*a as f64, *b) {
                    (*a, *b, n) = (0.0, 0.0, n + 1);
                }
            }
        }
        NpyData::I32(_) | NpyData::I64(_) => {}
    }
    n
}

/// What `stage` of `scope` at `step` reads that the capture lacks, if
/// anything (then its local error cannot be told from the capture).
fn missing_input(
    capture: &CaptureDir,
    (step, steps): (&CapturedStep, &[CapturedStep]),
    scope: StepScope,
    stage: S,
    traits: LayerTraits,
    layers: usize,
) -> Option<String> {
    let layer = scope.layer();
    let has = |step: usize, layer: Option<usize>, stage: S| capture.entry(step, layer, stage).is_some();
    for input in stage.inputs(traits) {
        match input {
            // Not captured (a fused op's intermediate): the reference
            // computes it, from the capture's inputs of it if those are
            // captured in turn, and the stage is checked with it folded in.
            StageInput::Stage(s) if !has(step.step, layer, s) => {
                if missing_input(capture, (step, steps), scope, s, traits, layers).is_some() {
                    return Some(s.to_string());
                }
            }
            StageInput::Stage(_) => {}
            StageInput::ScopeInput => {
                let Some((input_layer, input_stage)) = scope_input(scope, layers) else { continue };
                if !has(step.step, input_layer, input_stage) {
                    return Some(match input_layer {
                        Some(_) if scope.layer().is_some() => format!("{input_stage} of the layer before"),
                        Some(_) => format!("{input_stage} of the last layer"),
                        None => input_stage.to_string(),
                    });
                }
            }
            StageInput::EarlierKeysAndValues => {
                let kv = [S::KPostRope, S::qkv_source(traits)];
                for earlier in steps.iter().filter(|s| s.step < step.step) {
                    if let Some(s) = kv.iter().find(|&&s| !has(earlier.step, layer, s)) {
                        return Some(format!(
                            "{s} of {} (the keys and values of its positions)",
                            place(earlier.step, layer)
                        ));
                    }
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipeline::backend::contract::GgmlPath;

    #[test]
    fn a_captures_dtype_names_its_contract() {
        let cpu = capture_contract("llama.cpp cpu without repacked weights, kv f16");
        assert_eq!((cpu.ggml_activations, cpu.attention_f16), (Some(GgmlPath::Cpu), true));
        assert!(cpu.emulation_replicates());
        let cuda = capture_contract("llama.cpp cuda offload of 99 layers, kv f32");
        assert_eq!((cuda.ggml_activations, cuda.attention_f16), (Some(GgmlPath::Cuda), false));
        assert!(!cuda.emulation_replicates());
        assert_eq!(capture_contract("bfloat16"), NumericContract::BF16);
        assert_eq!(capture_contract("f32 emulating bf16 (weights and activations rounded)"), NumericContract::BF16);
        assert_eq!(capture_contract("float64"), NumericContract::REFERENCE);
    }
}
