//! `moetrace check CAPTURE --model MODEL`: each stage's local error of
//! another engine's capture, the short form of a bisect config with
//! `target: Capture("CAPTURE")` and `mode: Local`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use session::bisect::{BisectConfig, BisectOptions, bisect};

use crate::progress::Progress;

/// Arguments of `moetrace check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The capture folder to check (manifest.json and .npy files, from any engine).
    pub capture: PathBuf,
    /// The model the capture is of: a checkpoint folder or .gguf file, or a
    /// config's model spec such as `Synthetic(preset: "tiny-moe", seed: 5)`.
    #[arg(long, value_name = "MODEL")]
    pub model: String,
    /// The backend that re-runs each stage (a config's backend spec).
    #[arg(long, value_name = "BACKEND", default_value = "Cpu")]
    pub reference: String,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// How the report is judged and shown.
    #[command(flatten)]
    pub report: super::ReportFlags,
}

/// Exit code 0 without a finding, 1 with one.
pub fn execute(args: &CheckArgs) -> Result<ExitCode, String> {
    let capture = compare::CaptureDir::open(&args.capture).map_err(|e| e.to_string())?;
    let dir = absolute(&args.capture)?;
    let model = model_spec(&args.model)?;
    let m = &capture.manifest;
    let steps = if m.steps.is_empty() { 1 + m.generated.len() } else { m.steps.len() };
    let text = format!(
        "(model: {model}, prompt: Tokens({:?}), generate: {steps}, reference: {}, target: Capture({:?}), mode: Local)",
        capture.manifest.prompt,
        args.reference,
        dir.display().to_string()
    );
    let origin = Path::new("moetrace check");
    let config = BisectConfig::parse(&text, origin).map_err(|e| format!("{e}\n(check made this config: {text})"))?;
    let tolerances = args.report.prepare()?;
    let options = BisectOptions { tolerances, all: args.report.all, local: true, meter: Default::default() };
    let mut progress = Progress::new(!args.quiet, 1);
    progress.stage("loading the model, checking the capture");
    progress.loading(options.meter.clone());
    let report = bisect(&config, origin, &options, &mut |step, scope| {
        progress.line(&format!("checked step {step} {scope}"));
    })
    .map_err(|e| e.to_string());
    progress.clear();
    args.report.print(&report?)
}

/// `--model` as a config's model spec: given as one (`Synthetic(..)`,
/// `Path(..)`), or a path.
fn model_spec(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.starts_with("Synthetic(") || t.starts_with("Path(") {
        return Ok(t.to_string());
    }
    let path = absolute(Path::new(t))?;
    if !path.exists() {
        return Err(format!(
            "--model {t}: no such checkpoint folder or .gguf file (or give a model spec such as `Synthetic(preset: \"tiny-moe\", seed: 5)`)"
        ));
    }
    Ok(format!("Path({:?})", path.display().to_string()))
}

/// `path` made absolute against the working directory.
fn absolute(path: &Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))
}
