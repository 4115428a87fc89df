//! `moetrace`: find where a GPU implementation of a Mixture-of-Experts
//! transformer first disagrees with a reference.
//!
//! Library errors become messages on stderr and exit code 2 here, and
//! only here.

mod commands;
mod progress;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Command-line interface.
#[derive(Parser, Debug)]
#[command(name = "moetrace", version, about = "Run a MoE transformer forward pass stage by stage, capture any stage tensor, and find where two implementations disagree.", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the forward pass a RON config describes, capturing the selected stage tensors.
    Run(commands::run::RunArgs),
    /// Run a reference and a target backend in lockstep and name the first divergent stage (exit 0/1/2).
    Bisect(commands::bisect::BisectArgs),
    /// Check each stage of another engine's capture on its own inputs: local errors, findings, exit 0/1/2.
    Check(commands::check::CheckArgs),
    /// Compare two captures stage by stage and name the first divergence (exit 0: none, 1: found, 2: error).
    Diff(commands::diff::DiffArgs),
    /// List every stage: name, scope, which layers have it, and its shape.
    Stages(commands::stages::StagesArgs),
    /// Write the HTML error map of one or two JSON reports (diff/bisect --json).
    Report(commands::report::ReportArgs),
}

/// Writes to stdout; a closed pipe (`moetrace stages | head`) is not an
/// error, anything else is.
pub(crate) fn print_stdout(text: &str) -> Result<(), String> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("cannot write to stdout: {e}")),
        _ => Ok(()),
    }
}

/// Writes a line to stderr, ignoring errors: a closed stderr must not turn
/// into a panic (progress is best effort).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Like [`say!`] without the newline.
#[macro_export]
macro_rules! say_inline {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, $($arg)*);
        let _ = err.flush();
    }};
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Warnings by default (e.g. a GPU feature turned off with its
        // reason); MOETRACE_LOG=debug etc. for more.
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MOETRACE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .without_time()
        .log_internal_errors(false)
        .init();
    // SIGINT, SIGTERM (and SIGHUP): remove the capture folder being
    // written, then exit as an interrupted process does.
    let _ = ctrlc::set_handler(|| {
        capture::target::remove_temporary_folders();
        say!("interrupted: the capture being written was removed; nothing was replaced");
        std::process::exit(130);
    });
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => commands::run::execute(&args),
        Command::Bisect(args) => commands::bisect::execute(&args),
        Command::Check(args) => commands::check::execute(&args),
        Command::Diff(args) => commands::diff::execute(&args),
        Command::Stages(args) => commands::stages::execute(&args),
        Command::Report(args) => commands::report::execute(&args),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            say!("error: {message}");
            ExitCode::from(2)
        }
    }
}
