//! `moetrace run --config FILE`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use session::{RunConfig, RunEvent};

use crate::progress::Progress;

/// Arguments of `moetrace run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The RON run config (see configs/debug.ron).
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
    /// Inject a fault (repeatable): stage@layer[.step][:token]=kind, kind one of
    /// nan, inf, zero, scale(F), noise(STD[,SEED]), swap-experts; e.g. moe_router@2=nan.
    #[arg(long = "fault", value_name = "SPEC")]
    pub faults: Vec<String>,
    /// Print only the final summary, no progress.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Loads the config, runs it with progress on stderr, prints a summary.
pub fn execute(args: &RunArgs) -> Result<ExitCode, String> {
    let mut config = RunConfig::load(&args.config).map_err(|e| e.to_string())?;
    config.session.faults.extend(super::parse_faults(&args.faults)?);
    let mut progress = Progress::new(!args.quiet, config.step_count());
    let output = session::run(&config, &args.config, &mut |event| match event {
        RunEvent::Loading(meter) => progress.loading(meter),
        RunEvent::ModelLoaded { description, elapsed } => {
            progress.line(&format!("model: {description} (loaded in {:.2} s)", elapsed.as_secs_f64()));
            progress.stage("setting up the backend");
        }
        RunEvent::BackendReady { description, elapsed } => {
            progress.line(&format!("backend: {description} (ready in {:.2} s)", elapsed.as_secs_f64()))
        }
        RunEvent::Forward(e) => progress.forward(&e),
    })
    .map_err(|e| {
        progress.clear();
        e.to_string()
    })?;
    progress.clear();
    let s = &output.summary;
    let secs = s.forward_time.as_secs_f64();
    let prefill = s.prefill_time.as_secs_f64();
    let decode_steps = s.steps.saturating_sub(1);
    let decode = if decode_steps > 0 {
        let d = (secs - prefill).max(0.0);
        let graph = match s.graph_replays {
            0 => String::new(),
            n => format!(", {n} replayed from a CUDA graph"),
        };
        format!("; decode {decode_steps} steps {:.3} s, {:.1} tokens/s{graph}", d, decode_steps as f64 / d.max(1e-9))
    } else {
        String::new()
    };
    crate::say!(
        "run: {} prompt tokens, {} generated {:?}, {} steps on {} in {:.3} s (prefill {:.3} s, {:.1} tokens/s{decode})",
        s.prompt_tokens,
        s.generated.len(),
        s.generated,
        s.steps,
        s.backend,
        secs,
        prefill,
        s.prompt_tokens as f64 / prefill.max(1e-9)
    );
    if let Some(text) = &s.generated_text {
        crate::say!("text: {text:?}");
    }
    if let Some(products) = &s.products {
        crate::say!("reference {products}");
    }
    match &s.out_dir {
        Some(dir) => crate::say!(
            "capture: {} tensors, {:.2} MB written to {}",
            s.tensors_written,
            s.bytes_written as f64 / 1e6,
            dir.display()
        ),
        None => crate::say!("capture: none configured"),
    }
    Ok(ExitCode::SUCCESS)
}
