//! Man pages and shell completions, generated from the clap definitions so they never drift from
//! `--help`. The Debian package ships them; `cargo install` users generate them with the commands.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::cli::Cli;

/// Writes the completion script for `shell` to `out`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut Cli::command(), "cloudimg", out);
}

/// Writes `cloudimg.1` and `cloudimg-COMMAND.1` for each command into `dir`; returns the files.
pub fn manpages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let top = Cli::command();
    let mut pages = vec![("cloudimg".to_string(), top.clone())];
    for sub in top.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("cloudimg-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name).version(top.get_version().unwrap_or_default().to_owned())));
    }
    let mut written = Vec::new();
    for (name, command) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut page = Vec::new();
        clap_mangen::Man::new(command).render(&mut page).with_context(|| format!("rendering {name}.1"))?;
        crate::image::output::write_small_file(&path, &page)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_gets_a_man_page_with_its_options() {
        let dir = tempfile::tempdir().unwrap();
        let pages = manpages(dir.path()).unwrap();
        let names: Vec<String> = pages.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        for expected in ["cloudimg.1", "cloudimg-customize.1", "cloudimg-doctor.1"] {
            assert!(names.contains(&expected.to_string()), "{names:?}");
        }
        let customize = std::fs::read_to_string(dir.path().join("cloudimg-customize.1")).unwrap();
        assert!(customize.starts_with(".ie") || customize.contains(".TH cloudimg-customize"), "{customize:.200}");
        assert!(customize.contains("password\\-file"), "options are documented");
    }

    #[test]
    fn completions_know_the_commands_and_flags() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let mut out = Vec::new();
            completions(shell, &mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains("customize") && text.contains("doctor"), "{shell}");
            assert!(text.contains("password-file"), "{shell}");
        }
    }
}
