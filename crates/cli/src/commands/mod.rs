//! One module per subcommand; each returns the exit code or an error
//! message (exit code 2).

pub mod bisect;
pub mod check;
pub mod diff;
pub mod report;
pub mod run;
pub mod stages;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
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

/// How a comparison's report is judged and shown: the flags diff, bisect
/// and check share.
#[derive(Args, Debug)]
pub struct ReportFlags {
    /// Print one JSON report (top level: first_divergence, graft, summary, notes, rows).
    #[arg(long)]
    pub json: bool,
    /// Show every row, not only those that are not ok (bisect: and keep
    /// comparing after the first divergence).
    #[arg(long)]
    pub all: bool,
    /// Also write the HTML error map to FILE.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// rel_l2 tolerance, F for every stage or stage=F for one (repeatable),
    /// for rows without an expected error; default by the coarser dtype:
    /// 1e-4 for f32, 3e-2 for bf16.
    #[arg(long = "tolerance", value_name = "[STAGE=]F")]
    pub tolerances: Vec<String>,
    /// After the report, one line per stage: rel_l2 over every step and
    /// layer (median, largest), its worst row against its expected error,
    /// its findings.
    #[arg(long)]
    pub by_stage: bool,
}

impl ReportFlags {
    /// The tolerances given, after checking that the HTML file can be
    /// written (before any work).
    pub fn prepare(&self) -> Result<Tolerances, String> {
        if let Some(path) = &self.html {
            report::check_html_path(path)?;
        }
        parse_tolerances(&self.tolerances)
    }

    /// Prints `report` as asked; the exit code of [`print_report`].
    pub fn print(&self, report: &Report) -> Result<ExitCode, String> {
        let code = print_report(report, self.json, self.all, self.html.as_deref())?;
        if self.by_stage && !self.json {
            crate::print_stdout(&format!("\n{}", compare::stage_table::stage_table(report)))?;
        }
        Ok(code)
    }
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
