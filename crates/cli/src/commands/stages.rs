//! `moetrace stages`: the stage table.

use std::fmt::Write as _;
use std::process::ExitCode;

use clap::Args;
use stage_types::{SaveTensorStage, Scope};

/// Arguments of `moetrace stages`.
#[derive(Args, Debug)]
pub struct StagesArgs {
    /// Print only the names, one per line (for scripts).
    #[arg(long)]
    pub names: bool,
}

/// The stage table (or the bare names) as text.
fn render(names_only: bool) -> String {
    let mut out = String::new();
    if names_only {
        for stage in SaveTensorStage::ALL {
            let _ = writeln!(out, "{stage}");
        }
        return out;
    }
    let _ = writeln!(out, "{:<20} {:<6} {:<9} {:<18} holds", "stage", "scope", "applies", "shape");
    for &stage in SaveTensorStage::ALL {
        let scope = match stage.scope() {
            Scope::Model => "model",
            Scope::Layer => "layer",
        };
        let _ = writeln!(
            out,
            "{:<20} {:<6} {:<9} {:<18} {}",
            stage.name(),
            scope,
            stage.applicability().name(),
            stage.shape(),
            stage.holds()
        );
    }
    out.push_str(
        "\nAliases: layer_output = post_ffn_residual. Stage lists: `all` or comma-separated names (case-insensitive).\n\
         T = positions this step, P = positions attended, H = hidden, nh/nkv = heads, hd = head_dim,\n\
         E = experts, k = experts per token, I = intermediate, V = vocab.\n",
    );
    out
}

/// Prints every stage in execution order.
pub fn execute(args: &StagesArgs) -> Result<ExitCode, String> {
    crate::print_stdout(&render(args.names))?;
    Ok(ExitCode::SUCCESS)
}
