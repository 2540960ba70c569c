//! Manual pages and shell completions, generated from the command's clap definition so that they always
//! describe the command as built. The package build runs the hidden `p11shim generate-docs DIR`.

use clap_complete::Shell;
use std::fs;
use std::io::{Result, Write};
use std::path::Path;

/// Writes into `dir` (created if needed):
/// - `man/p11shim.1` and one page per visible subcommand, named as git and cargo name theirs
///   (`man/p11shim-backup.1`, `man/p11shim-mbk-create.1`, …);
/// - `completions/p11shim.bash`, `completions/_p11shim` (zsh), `completions/p11shim.fish`.
///
/// Hidden subcommands (this one) get no page; the completion scripts do not offer them.
pub fn generate(cmd: clap::Command, dir: &Path) -> Result<()> {
    let mut pages = cmd.clone().disable_help_subcommand(true);
    pages.build();
    let man = dir.join("man");
    fs::create_dir_all(&man)?;
    let source = format!("{} {}", pages.get_name(), pages.get_version().unwrap_or_default());
    man_pages(&pages, None, &source, &man)?;

    let completions = dir.join("completions");
    fs::create_dir_all(&completions)?;
    let name = cmd.get_name().to_string();
    let mut cmd = visible_copy(&cmd);
    for (shell, file) in
        [(Shell::Bash, format!("{name}.bash")), (Shell::Zsh, format!("_{name}")), (Shell::Fish, format!("{name}.fish"))]
    {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, &name, &mut script);
        fs::write(completions.join(file), script)?;
    }
    Ok(())
}

/// The page of `cmd` and, recursively, of each of its visible subcommands. A subcommand's page is titled by
/// its full name (`p11shim-mbk-create`), its synopsis shows how it is typed (`p11shim mbk create`), its
/// SUBCOMMANDS section names its children's pages, and its SEE ALSO section its `parent`'s page.
/// `source` ("p11shim 0.1.0") is every page's footer.
fn man_pages(cmd: &clap::Command, parent: Option<&str>, source: &str, dir: &Path) -> Result<()> {
    let page = clap_mangen::Man::new(cmd.clone()).source(source).manual("p11shim Manual");
    let mut out = Vec::new();
    page.render(&mut out)?;
    if let Some(parent) = parent {
        writeln!(out, ".SH \"SEE ALSO\"\n.BR {parent} (1)")?;
    }
    fs::write(dir.join(page.get_filename()), out)?;
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    for sub in visible_subcommands(cmd) {
        man_pages(sub, Some(name), source, dir)?;
    }
    Ok(())
}

fn visible_subcommands(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands().filter(|s| !s.is_hide_set())
}

/// `cmd` as the completion scripts should know it: clap_complete's static scripts offer every subcommand,
/// hidden or not, so the hidden ones are left out of a copy (its arguments, its visible subcommands, its
/// about line), named and versioned as this binary. `cmd` must not be built yet: its arguments are then only
/// those it declares.
fn visible_copy(cmd: &clap::Command) -> clap::Command {
    let mut copy = clap::Command::new(env!("CARGO_BIN_NAME"))
        .version(env!("CARGO_PKG_VERSION"))
        .args(cmd.get_arguments().cloned())
        .subcommands(visible_subcommands(cmd).cloned());
    if let Some(about) = cmd.get_about() {
        copy = copy.about(about.clone());
    }
    copy
}
