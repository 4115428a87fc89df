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
    /// Print one JSON report.
    #[arg(long)]
    pub json: bool,
    /// Also write the HTML error map to FILE.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// rel_l2 tolerance, F or stage=F (repeatable), for rows without an expected error.
    #[arg(long = "tolerance", value_name = "[STAGE=]F")]
    pub tolerances: Vec<String>,
    /// Show every row.
    #[arg(long)]
    pub all: bool,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
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
    let tolerances = super::parse_tolerances(&args.tolerances)?;
    if let Some(path) = &args.html {
        super::report::check_html_path(path)?;
    }
    let options = BisectOptions { tolerances, all: args.all, local: true, meter: Default::default() };
    let mut progress = Progress::new(!args.quiet, 1);
    progress.stage("loading the model, checking the capture");
    progress.loading(options.meter.clone());
    let report = bisect(&config, origin, &options, &mut |step, scope| {
        progress.line(&format!("checked step {step} {scope}"));
    })
    .map_err(|e| e.to_string());
    progress.clear();
    super::print_report(&report?, args.json, args.all, args.html.as_deref())
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
