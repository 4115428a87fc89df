//! `moetrace report JSON [JSON] --html FILE`: the error map of one or two
//! reports written by `diff --json` or `bisect --json` (typically a local
//! bisect and a free-running one of the same run).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use compare::Report;

/// Arguments of `moetrace report`.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// One or two JSON reports (from `diff --json` or `bisect --json`).
    #[arg(required = true, num_args = 1..=2, value_name = "JSON")]
    pub reports: Vec<PathBuf>,
    /// Where to write the HTML error map (one self-contained file).
    #[arg(long, value_name = "FILE")]
    pub html: PathBuf,
}

/// Writes the page; exit 0.
pub fn execute(args: &ReportArgs) -> Result<ExitCode, String> {
    let reports = args
        .reports
        .iter()
        .map(|path| {
            let text = stage_types::input::read_regular_text(path, compare::manifest::MAX_MANIFEST_BYTES)
                .map_err(|e| format!("cannot read report {}: {e}", path.display()))?;
            Report::from_json(&text, path).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let refs: Vec<&Report> = reports.iter().collect();
    write_html(&args.html, &refs)?;
    crate::say!("error map written to {}", args.html.display());
    Ok(ExitCode::SUCCESS)
}

/// Fails now, before any long work, when `path`'s folder cannot take the
/// file (an existing file at `path` is left alone).
pub fn check_html_path(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!("--html {}: is a folder; give a file name such as report.html", path.display()));
    }
    let tmp = temp_sibling(path)?;
    std::fs::write(&tmp, b"")
        .and_then(|()| std::fs::remove_file(&tmp))
        .map_err(|e| format!("cannot write the HTML report {}: {e}", path.display()))
}

fn temp_sibling(path: &Path) -> Result<PathBuf, String> {
    let name = path.file_name().ok_or_else(|| format!("--html {}: not a file name", path.display()))?;
    Ok(path.with_file_name(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id())))
}

/// Writes the error map of `reports` to `path`: to a temporary sibling
/// first, renamed into place, so a failed write leaves no half file.
pub fn write_html(path: &Path, reports: &[&Report]) -> Result<(), String> {
    let html = compare::html::render_html(reports);
    let tmp = temp_sibling(path)?;
    capture::target::register_temporary(&tmp);
    let written = std::fs::write(&tmp, html).and_then(|()| std::fs::rename(&tmp, path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write the HTML report {}: {e}", path.display())
    });
    capture::target::unregister_temporary(&tmp);
    written
}
