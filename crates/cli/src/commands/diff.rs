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
    /// Print one JSON report (top level: first_divergence, graft, summary, notes, rows).
    #[arg(long)]
    pub json: bool,
    /// Show every row, not only those that are not ok.
    #[arg(long)]
    pub all: bool,
    /// Also write the HTML error map to FILE.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// rel_l2 tolerance: F for every stage or stage=F for one (repeatable); default
    /// by the coarser dtype of the two runs: 1e-4 for f32, 3e-2 for bf16.
    #[arg(long = "tolerance", value_name = "[STAGE=]F")]
    pub tolerances: Vec<String>,
    /// Compare even if the prompts or model configs differ.
    #[arg(long)]
    pub force: bool,
}

/// Exit code 0 without divergence, 1 with one.
pub fn execute(args: &DiffArgs) -> Result<ExitCode, String> {
    let tolerances = super::parse_tolerances(&args.tolerances)?;
    if let Some(path) = &args.html {
        super::report::check_html_path(path)?;
    }
    let report = diff(
        &args.reference,
        &args.target,
        &DiffOptions { tolerances, force: args.force, same_model: Some(pipeline::ModelConfig::same_computation_json) },
    )
    .map_err(|e| e.to_string())?;
    super::print_report(&report, args.json, args.all, args.html.as_deref())
}
