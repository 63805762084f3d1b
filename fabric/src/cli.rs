//! What the command-line tools share.

use std::process::ExitCode;

/// Ends a tool: on error prints `tool: error: cause: …` on one line (never a
/// backtrace, whatever `RUST_BACKTRACE` says: users need the reason, not
/// our stack) and exits with status 1.
pub fn report(tool: &str, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{tool}: {e:#}");
            ExitCode::FAILURE
        }
    }
}
