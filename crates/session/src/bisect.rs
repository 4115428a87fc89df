//! `bisect`: a reference and a target backend run the same model in
//! lockstep in one process, scope by scope (prologue, each layer,
//! epilogue), compared in memory. Both runs are fed the reference's greedy
//! tokens, so every step stays comparable.
//!
//! - Free running (default): each error is accumulated from everything
//!   upstream; at the first divergence the graft check re-runs that scope
//!   on the target from the reference's inputs, to tell a wrong stage from
//!   one that only amplifies upstream drift.
//! - Local (`mode: Local`, `--local`): after each stage the target's output
//!   is compared and then replaced by the reference's (teacher forcing,
//!   [`pipeline::teacher`]), so every (step, layer, stage) gets its own
//!   local error, per-expert stages run on the reference's expert ids, and
//!   the router is judged on its own.
//!
//! Beside them runs a third pass, the expected side: the CPU keeping the
//! target's numeric contract ([`pipeline::backend::contract`]), fed what
//! the target is fed and never faulted. Its error is what a correct
//! implementation of that precision makes on the same inputs, row by row
//! ([`compare::expected`]): local findings are rows above it, free-running
//! divergences tensors above it. Forced values are the reference's outputs
//! stored as the target's contract stores them (what a correct target
//! holds in that slot), so every kernel path reads the same inputs.

use std::path::Path;

use compare::expected::RATIO_THRESHOLD;
use compare::findings::{judge_accumulated, mark_findings};
use compare::scope::ExpertIds;
use compare::{Graft, Mode, Report, Row, ScopeTensors, compare_scope};
use pipeline::backend::contract::NumericContract;
use pipeline::{Forward, HostTensor, Model, ScopeOutputs, ScopeTeacher, StepRecord, StepScope};
use stage_types::SaveTensorStage as S;

use crate::error::Result;
use crate::faults::{FaultSpec, attach_faults};
use crate::session_builder::{Session, model_source};
use crate::spec::BackendSpec;
pub use crate::spec::{BisectConfig, BisectMode};
use capture::lifecycle::CaptureSession;

pub use crate::sides::BisectOptions;
use crate::sides::{Side, expected_tensors, view};

/// Both runs' outputs of one scope as a comparison's input.
fn scope_tensors<'a>(reference: &'a ScopeOutputs, target: &'a ScopeOutputs) -> ScopeTensors<'a> {
    let mut tensors = ScopeTensors::new();
    for stage in reference.keys().chain(target.keys()) {
        tensors.insert(*stage, (reference.get(stage).map(view), target.get(stage).map(view)));
    }
    tensors
}

/// The reference's outputs as the target's contract stores them: what a
/// correct target holds in those slots, forced into the target and the
/// expected side alike.
fn as_stored(outputs: &ScopeOutputs, contract: &NumericContract) -> ScopeOutputs {
    let mut outputs = outputs.clone();
    for (stage, tensor) in outputs.iter_mut() {
        contract.round_output(*stage, tensor);
    }
    outputs
}

/// Runs a bisect config. `on_scope` is told each (step, scope name) as it
/// completes, for progress.
pub fn bisect(
    config: &BisectConfig,
    path: &Path,
    options: &BisectOptions,
    on_scope: &mut dyn FnMut(usize, String),
) -> Result<Report> {
    if let Some(dir) = config.target.capture() {
        if !config.session.faults.is_empty() {
            return Err(crate::SessionError::ConfigValue {
                path: path.to_path_buf(),
                message: "faults cannot be injected into a capture target (edit the capture's .npy files instead)"
                    .into(),
            });
        }
        if config.session.parallel.is_some() {
            return Err(crate::SessionError::ConfigValue {
                path: path.to_path_buf(),
                message: "parallel: a capture target is checked stage by stage on one rank; leave `parallel` out"
                    .into(),
            });
        }
        return crate::check::check_capture(config, dir, path, options, on_scope);
    }
    let spec = &config.session;
    // The expected side is a CPU pass too.
    let opened = Session::open(spec, path, &[&config.reference, &config.target], 1, options.meter.clone())?;
    let model = &opened.model;
    // Declared before the forward passes: see CaptureSession.
    let sessions = match &spec.capture {
        Some(capture) => Some([
            CaptureSession::start(capture, &capture.out_dir.join("reference"))?,
            CaptureSession::start(capture, &capture.out_dir.join("target"))?,
        ]),
        None => None,
    };
    let side = |backend: &BackendSpec, session: Option<&CaptureSession>| -> Result<Side> {
        let prepared = opened.forward(backend, session, true)?;
        Ok(Side { forward: prepared.forward, name: (prepared.name, prepared.dtype) })
    };
    let mut reference = side(&config.reference, sessions.as_ref().map(|s| &s[0]))?;
    let mut target = side(&config.target, sessions.as_ref().map(|s| &s[1]))?;
    let contract = target.forward.backend_mut().numeric_contract();
    let mut expected = Side { forward: opened.emulating(contract)?, name: ("cpu", "emulated") };
    let fault_notes = attach_faults(&mut target.forward, &spec.faults);
    let replay = opened.replay()?;
    if let Some(replay) = &replay {
        replay.attach(&mut target.forward);
        replay.attach(&mut expected.forward);
    }
    // Tolerances follow the coarser precision of the two runs.
    let target_dtype = compare::scope::Tolerances::coarser_dtype(
        config.reference.activation_dtype(),
        config.target.activation_dtype(),
    )
    .to_string();
    let mode = if options.local { BisectMode::Local } else { config.mode };
    let mut report = Report {
        mode: match mode {
            BisectMode::Free => Mode::Accumulated,
            BisectMode::Local => Mode::Local,
        },
        reference: format!("{} on {}", config.reference, model_source(model)),
        target: format!(
            "{}{}",
            config.target,
            if config.session.faults.is_empty() {
                String::new()
            } else {
                format!(
                    " with faults {}",
                    config.session.faults.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(", ")
                )
            }
        ),
        ..Report::default()
    };
    report.notes.push(format!(
        "expected errors: the CPU keeping the target's numeric contract ({}) ran on the same inputs; {}",
        contract.describe(),
        match report.mode {
            Mode::Local => format!("a finding is a row more than {RATIO_THRESHOLD}x its expected error"),
            Mode::Accumulated => format!(
                "a tensor diverges when a row's error is more than {}x the emulation's on that row",
                compare::expected::ACCUMULATED_RATIO_THRESHOLD
            ),
        }
    ));
    let mut progress = Progress { steps: Vec::new(), generated: Vec::new() };
    let mut sides = Sides { reference: &mut reference, target: &mut target, expected: &mut expected, contract };
    lockstep(config, model, options, &mut sides, &target_dtype, &mut report, &mut progress, on_scope)?;
    report.notes.extend(fault_notes.take());
    if let Some(text) = &config.session.resolved.text {
        let all: Vec<u32> = [config.session.tokens(), &progress.generated[..]].concat();
        let starts: Vec<(usize, usize)> = progress.steps.iter().map(|s| (s.step, s.start_position)).collect();
        report.name_tokens(&text.tokenizer.token_texts(&all), &starts);
    }
    let ranks = crate::session_builder::ranks_note(&model.config);
    if !ranks.is_empty() {
        report.notes.push(format!("every pass ran on virtual ranks{}", ranks.replacen(';', ":", 1)));
    }
    let names = [reference.name, target.name];
    drop((reference, target, expected));
    if let Some(note) = opened.products_note() {
        report.notes.push(format!("the reference's {note}"));
    }
    if let Some(sessions) = sessions {
        let faults: [&[FaultSpec]; 2] = [&[], &config.session.faults];
        let routing = [None, replay.as_ref()];
        let forced = [
            None,
            (report.mode == Mode::Local).then(|| {
                format!(
                    "bisect local mode: after every stage the output was replaced by the reference's ({}), as the target's contract stores it; the router logits were its own",
                    config.reference
                )
            }),
        ];
        let generation = (&progress.generated[..], &progress.steps[..]);
        let sides = sessions.into_iter().zip(names).zip(faults).zip(routing).zip(forced);
        for ((((session, name), faults), routing), teacher_forced) in sides {
            session.commit(&opened.record(name, generation, faults, routing, teacher_forced))?;
        }
        report.notes.push(format!(
            "captured to {}/reference and {}/target",
            config.session.capture.as_ref().map(|c| c.out_dir.display().to_string()).unwrap_or_default(),
            config.session.capture.as_ref().map(|c| c.out_dir.display().to_string()).unwrap_or_default()
        ));
    }
    Ok(report)
}

/// What the lockstep ran, for capture manifests.
struct Progress {
    steps: Vec<StepRecord>,
    generated: Vec<u32>,
}

/// The three passes of the lockstep and the target's contract.
struct Sides<'a> {
    reference: &'a mut Side,
    target: &'a mut Side,
    /// The CPU keeping the target's contract, fed what the target is fed.
    expected: &'a mut Side,
    contract: NumericContract,
}

/// The step loop of [`bisect`]; in free mode returns early after the
/// first divergence unless `options.all`.
#[expect(clippy::too_many_arguments, reason = "the loop's state is owned by bisect, which commits captures after it")]
fn lockstep(
    config: &BisectConfig,
    model: &Model,
    options: &BisectOptions,
    sides: &mut Sides<'_>,
    target_dtype: &str,
    report: &mut Report,
    progress: &mut Progress,
    on_scope: &mut dyn FnMut(usize, String),
) -> Result<()> {
    let Sides { reference, target, expected, contract } = sides;
    let contract = *contract;
    let local = report.mode == Mode::Local;
    let expert_ids = if local { ExpertIds::Reference } else { ExpertIds::EachSide };
    let steps = config.session.generate.max(1);
    let mut tokens = config.session.tokens().to_vec();
    let mut position = 0;
    for step in 0..steps {
        progress.steps.push(StepRecord { step, start_position: position, tokens: tokens.clone() });
        reference.forward.begin_step(step, &tokens, position)?;
        target.forward.begin_step(step, &tokens, position)?;
        expected.forward.begin_step(step, &tokens, position)?;
        let mut reference_input: Option<HostTensor> = None;
        for scope in StepScope::all(model.config.num_layers) {
            let r = reference.run(scope, None)?;
            // The router is judged as a unit (gate projection, softmax,
            // top-k) on the reference's input: its own logits feed its own
            // top-k; from the weights and ids on, the reference's are forced.
            let forced = local.then(|| {
                let mut forced = as_stored(&r, &contract);
                forced.remove(&S::MoeRouterLogits);
                forced
            });
            let t = target.run(scope, forced.clone())?;
            let e = expected.run(scope, forced)?;
            let tensors = scope_tensors(&r, &t);
            let emulated = expected_tensors(&e, &contract);
            let mut rows = compare_scope(
                step,
                scope.layer(),
                &tensors,
                &options.tolerances,
                target_dtype,
                expert_ids,
                Some(&emulated),
            );
            if !local {
                // A tolerance the user set for a stage overrides the model.
                let set = &options.tolerances;
                judge_accumulated(&mut rows, &|stage| set.per_stage.get(&stage).copied().or(set.default));
            }
            on_scope(step, scope.to_string());
            let first_new = report.first_divergence().is_none();
            report.rows.extend(rows);
            let next_input = match scope {
                StepScope::Prologue => r.get(&S::Embedding).cloned(),
                StepScope::Layer(_) => r.get(&S::PostFfnResidual).cloned(),
                StepScope::Epilogue => None,
            };
            if !local
                && first_new
                && let Some(row) = report.first_divergence().cloned()
            {
                let teacher = ScopeTeacher {
                    input: reference_input.take(),
                    kv_cache: scope.layer().and_then(|l| reference.forward.backend_mut().kv_cache(l).ok()),
                    outputs: r,
                };
                let grafted = [&mut target.forward, &mut expected.forward];
                let g = graft(grafted, scope, teacher, &row, &report.rows, options, target_dtype, &contract)?;
                report.graft = Some(g);
                if !options.all {
                    return Ok(());
                }
            }
            reference_input = next_input;
        }
        if config.session.generate == 0 {
            break;
        }
        let next_ref = reference.forward.next_token()?;
        let next_target = target.forward.next_token()?;
        progress.generated.push(next_ref);
        if next_ref != next_target {
            report.notes.push(format!(
                "step {step}: greedy tokens differ (reference {next_ref}, target {next_target}); both runs continue with the reference's"
            ));
        }
        position += tokens.len();
        tokens = vec![next_ref];
    }
    if local {
        mark_findings(&mut report.rows);
    }
    Ok(())
}

/// Re-runs the divergent scope on the target and on the expected side
/// from the reference's state (its layer input, KV cache and every stage's
/// output, as the target's contract stores them, forced in turn) and judges
/// the divergent stage's own output as local mode does: against what the
/// emulation's recomputation explains.
#[expect(clippy::too_many_arguments, reason = "the graft needs the divergence, the run so far and the contract")]
fn graft(
    [target, expected]: [&mut Forward; 2],
    scope: StepScope,
    teacher: ScopeTeacher,
    row: &Row,
    rows: &[Row],
    options: &BisectOptions,
    target_dtype: &str,
    contract: &NumericContract,
) -> Result<Graft> {
    let reference = teacher.outputs.clone();
    let stored = |t: &HostTensor| {
        let mut t = t.clone();
        if let pipeline::TensorData::F32(v) = &mut t.data {
            contract.activations.round(v);
        }
        t
    };
    let teacher = ScopeTeacher {
        input: teacher.input.as_ref().map(stored),
        kv_cache: teacher.kv_cache.as_ref().map(|(k, v)| (stored(k), stored(v))),
        outputs: as_stored(&teacher.outputs, contract),
    };
    let own = target.graft_scope(scope, teacher.clone())?;
    let emulated = expected.graft_scope(scope, teacher)?;
    let tensors = scope_tensors(&reference, &own);
    let expected_tensors = expected_tensors(&emulated, contract);
    let mut graft_rows = compare_scope(
        row.step,
        row.layer,
        &tensors,
        &options.tolerances,
        target_dtype,
        ExpertIds::Reference,
        Some(&expected_tensors),
    );
    mark_findings(&mut graft_rows);
    let graft_row = graft_rows.into_iter().find(|r| r.stage == row.stage).ok_or_else(|| {
        pipeline::PipelineError::BadInput(format!("the graft of {scope} did not produce {}", row.stage))
    })?;
    let stage_is_wrong =
        graft_row.finding.is_some() || !matches!(graft_row.verdict, compare::Verdict::Ok | compare::Verdict::Diverged);
    Ok(Graft {
        rel_l2: graft_row.rel_l2().unwrap_or(if stage_is_wrong { f64::INFINITY } else { 0.0 }),
        verdict: graft_row.verdict,
        stage_is_wrong,
        largest_jump: if stage_is_wrong { None } else { largest_jump(rows) },
        first_error: if stage_is_wrong {
            None
        } else {
            rows.iter().find_map(|r| r.rel_l2().filter(|e| *e > 0.0).map(|e| (r.place(), e)))
        },
    })
}

/// The row whose rel_l2 grew the most over the row before it, among rows
/// with an error (an exact row, such as the embedding, is no base for a
/// ratio: every error after it would be an infinite jump).
fn largest_jump(rows: &[Row]) -> Option<(String, f64)> {
    let errors: Vec<(usize, f64)> = rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.rel_l2().filter(|e| *e > 0.0 && e.is_finite()).map(|e| (i, e)))
        .collect();
    errors
        .windows(2)
        .map(|w| {
            let ratio = if w[0].1 > 0.0 {
                w[1].1 / w[0].1
            } else if w[1].1 > 0.0 {
                f64::INFINITY
            } else {
                1.0
            };
            (rows[w[1].0].place(), ratio)
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
}
