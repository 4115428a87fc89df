//! `moetrace diff REF TARGET`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use compare::diff::{DiffOptions, diff};

/// Arguments of `moetrace diff`.
#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The reference capture folder (moetrace capture, oracle fixture, or APRT).
    pub reference: PathBuf,
    /// The target capture folder.
    pub target: PathBuf,
    /// Compare even if the prompts or model configs differ.
    #[arg(long)]
    pub force: bool,
    /// How the report is judged and shown.
    #[command(flatten)]
    pub report: super::ReportFlags,
}

/// Exit code 0 without divergence, 1 with one.
pub fn execute(args: &DiffArgs) -> Result<ExitCode, String> {
    let tolerances = args.report.prepare()?;
    let report = diff(
        &args.reference,
        &args.target,
        &DiffOptions { tolerances, force: args.force, same_model: Some(pipeline::ModelConfig::same_computation_json) },
    )
    .map_err(|e| e.to_string())?;
    args.report.print(&report)
}
