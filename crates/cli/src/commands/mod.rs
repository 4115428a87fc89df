//! One module per subcommand; each returns the exit code or an error
//! message (exit code 2).

pub mod run;
pub mod stages;
