//! One module per subcommand; each returns the exit code or an error
//! message (exit code 2).

pub mod bisect;
pub mod check;
pub mod diff;
pub mod report;
pub mod run;
pub mod stages;

use std::process::ExitCode;

use compare::{Report, Tolerances};
use session::faults::FaultSpec;

/// Parses `--fault` values.
pub fn parse_faults(texts: &[String]) -> Result<Vec<FaultSpec>, String> {
    texts.iter().map(|t| t.parse().map_err(|e: String| format!("--fault (command line): {e}"))).collect()
}

/// Parses `--tolerance` values.
pub fn parse_tolerances(texts: &[String]) -> Result<Tolerances, String> {
    let mut tolerances = Tolerances::default();
    for t in texts {
        tolerances.add(t).map_err(|e| format!("--tolerance: {e}"))?;
    }
    Ok(tolerances)
}

/// Prints a comparison report (JSON or human), writes its HTML error map
/// when asked, and returns 1 if it found a divergence (a finding or a
/// wrong router, for local errors), 0 if not.
pub fn print_report(
    report: &Report,
    json: bool,
    all: bool,
    html: Option<&std::path::Path>,
) -> Result<ExitCode, String> {
    if let Some(path) = html {
        report::write_html(path, &[report])?;
    }
    let text = if json {
        serde_json::to_string_pretty(&report.to_json()).map_err(|e| e.to_string())? + "\n"
    } else {
        report.render(all)
    };
    crate::print_stdout(&text)?;
    Ok(if report.findings().is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
