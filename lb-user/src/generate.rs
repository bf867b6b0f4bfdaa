//! `xdplb generate man|completions DIR`: the man pages and shell completions
//! of this very binary, written from its own `Cli` definition.
//!
//! Not part of [`Cli`]: it serves packaging (`cargo xtask dist`), not
//! operators, so `--help`, the man pages and the completions leave it out
//! (clap_complete would list a merely hidden subcommand). `main` hands the
//! command line here first. It lives in the binary rather than in xtask because xtask
//! would otherwise have to depend on lb-user, and lb-user's build script
//! compiles the eBPF object on nightly: every `cargo xtask` verb would pay
//! for that build. Generating from the shipped binary also means the pages
//! describe exactly the binary they ship with.

use std::{
    fs,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result};
use clap::{CommandFactory as _, Parser, ValueEnum as _};
use clap_complete::Shell;

use crate::cli::Cli;

/// `xdplb generate`.
#[derive(Parser, Debug)]
#[command(name = "xdplb generate", bin_name = "xdplb generate", version)]
struct GenerateCli {
    #[command(subcommand)]
    what: Generate,
}

/// What `xdplb generate` writes.
#[derive(clap::Subcommand, Debug)]
pub enum Generate {
    /// One roff man page per command: xdplb.1, xdplb-run.1, xdplb-stats.1, ...
    Man {
        /// Directory to write into (created if missing).
        dir: PathBuf,
    },
    /// Completion scripts for bash (xdplb.bash), zsh (_xdplb) and fish (xdplb.fish).
    Completions {
        /// Directory to write into (created if missing).
        dir: PathBuf,
    },
}

/// The shells `generate completions` writes for: the ones Debian ships
/// completion directories for.
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// `xdplb generate ...` when that is the command line: its exit code.
/// `None` for every other command line, which [`Cli`] parses.
pub fn main() -> Option<ExitCode> {
    let mut args = std::env::args_os();
    let program = args.next()?;
    if args.next()? != "generate" {
        return None;
    }
    let cli = GenerateCli::parse_from(std::iter::once(program).chain(args));
    Some(match run(&cli.what) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xdplb: error: {e:#}");
            ExitCode::FAILURE
        }
    })
}

pub fn run(what: &Generate) -> Result<()> {
    let written = match what {
        Generate::Man { dir } => man_pages(dir)?,
        Generate::Completions { dir } => completions(dir)?,
    };
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes `xdplb.1` and one page per visible subcommand (`xdplb-run.1`, ...).
pub fn man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))?;
    let mut pages: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    pages.sort();
    Ok(pages)
}

/// Writes one completion script per shell in [`SHELLS`].
pub fn completions(dir: &Path) -> Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut cmd = Cli::command();
    let name = cmd.get_name().to_string();
    SHELLS
        .iter()
        .map(|&shell| {
            clap_complete::generate_to(shell, &mut cmd, &name, dir).with_context(|| {
                let shell = shell.to_possible_value().expect("no shell is skipped");
                format!(
                    "writing the {} completions into {}",
                    shell.get_name(),
                    dir.display()
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_cover_every_visible_command_and_not_generate() {
        let dir = std::env::temp_dir().join(format!("xdplb-man-{}", std::process::id()));
        let pages = man_pages(&dir).expect("writing man pages");
        let names: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        fs::remove_dir_all(&dir).ok();
        for page in ["xdplb.1", "xdplb-run.1", "xdplb-down.1", "xdplb-stats.1"] {
            assert!(
                names.iter().any(|n| n == page),
                "expected {page} among {names:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n.contains("generate")),
            "the hidden `generate` command must have no man page, saw {names:?}"
        );
    }

    #[test]
    fn completions_are_written_for_bash_zsh_and_fish() {
        let dir = std::env::temp_dir().join(format!("xdplb-compl-{}", std::process::id()));
        let files = completions(&dir).expect("writing completions");
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let bash = fs::read_to_string(dir.join("xdplb.bash")).unwrap_or_default();
        fs::remove_dir_all(&dir).ok();
        assert_eq!(names, ["xdplb.bash", "_xdplb", "xdplb.fish"]);
        assert!(
            bash.contains("--persist") && !bash.contains("generate"),
            "bash completions should offer run's --persist and hide `generate`"
        );
    }
}
