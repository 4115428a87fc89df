//! `moetrace bisect --config FILE`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use session::bisect::{BisectConfig, BisectOptions, bisect};

use crate::progress::Progress;

/// Arguments of `moetrace bisect`.
#[derive(Args, Debug)]
pub struct BisectArgs {
    /// The RON bisect config (see configs/bisect.ron): a run config with `reference` and `target`.
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
    /// Inject a fault into the target (repeatable): stage@layer[.step][:token]=kind.
    #[arg(long = "fault", value_name = "SPEC")]
    pub faults: Vec<String>,
    /// Local errors: teacher-force the target after every stage (its output
    /// compared, then replaced by the reference's), per-expert stages on the
    /// reference's expert ids, each row judged against the error the CPU
    /// keeping the target's precision makes on the same inputs. Same as
    /// `mode: Local` in the config.
    #[arg(long)]
    pub local: bool,
    /// No progress on stderr.
    #[arg(long, short)]
    pub quiet: bool,
    /// How the report is judged and shown.
    #[command(flatten)]
    pub report: super::ReportFlags,
}

/// Exit code 0 without divergence, 1 with one.
pub fn execute(args: &BisectArgs) -> Result<ExitCode, String> {
    let mut config = BisectConfig::load(&args.config).map_err(|e| e.to_string())?;
    config.session.faults.extend(super::parse_faults(&args.faults)?);
    let tolerances = args.report.prepare()?;
    let options = BisectOptions { tolerances, all: args.report.all, local: args.local, meter: Default::default() };
    let mut progress = Progress::new(!args.quiet, 1);
    progress.stage("loading the model, running both sides");
    progress.loading(options.meter.clone());
    let report = bisect(&config, &args.config, &options, &mut |step, scope| {
        progress.line(&format!("compared step {step} {scope}"));
    })
    .map_err(|e| e.to_string());
    progress.clear();
    let report = report?;
    args.report.print(&report)
}
