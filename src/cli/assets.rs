//! `walfs generate-assets DIR`: man pages and shell completions for packages, generated from
//! the same argument definitions the binary parses (so they never drift).

use super::{exit, Cli, Failure};
use clap::CommandFactory;
use clap_complete::Shell;
use std::path::Path;

pub(super) fn generate(dir: &Path) -> Result<(), Failure> {
    let fail = |what: &str, e: std::io::Error| {
        Failure::new(
            exit::UNAVAILABLE,
            format!("{what} in {}: {e}", dir.display()),
        )
    };
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man).map_err(|e| fail("man pages", e))?;
    std::fs::create_dir_all(&completions).map_err(|e| fail("completions", e))?;
    clap_mangen::generate_to(Cli::command(), &man).map_err(|e| fail("man pages", e))?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "walfs", &completions)
            .map_err(|e| fail("completions", e))?;
    }
    Ok(())
}
