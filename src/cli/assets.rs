//! Man pages and shell completions, generated from the command-line definition so they
//! never drift from it: `walhook completions SHELL` prints one script, and the hidden
//! `walhook assets --out DIR` writes everything the Debian package installs.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use clap_complete::Shell;
use roff::{Roff, bold, italic, roman};

use super::Cli;

/// The program name in scripts and pages.
const BIN: &str = "walhook";

/// The man page DESCRIPTION: what `--help`'s one line cannot say.
const DESCRIPTION: &str = "walhook reads a PostgreSQL database's logical replication stream (pgoutput), \
turns row changes into entity events (\"Customer 42 was Updated; first_name and city changed\"), \
keeps them in queue tables inside the same database (schema walhook: new, processed, failed) and \
delivers them to listeners as signed webhooks, with retries, per-entity ordering and a \
dead-letter table. The replication slot only advances past a change once its event is \
committed in the queue, so stopping or killing walhook loses nothing. One TOML file \
configures it; config.example.toml documents every key.";

/// `walhook completions SHELL`: the script on stdout.
pub(super) fn print_completions(shell: Shell) {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, BIN, &mut std::io::stdout());
}

/// Writes `DIR/man/*.1` (walhook.1 and one page per command) and
/// `DIR/completions/{walhook.bash,_walhook,walhook.fish}`; returns the files written.
pub(super) fn write_assets(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let man_dir = dir.join("man");
    let completion_dir = dir.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&completion_dir)?;

    let cmd = Cli::command();
    // One page per command (walhook-run.1, …) plus a plain walhook.1, replaced below.
    clap_mangen::generate_to(cmd.clone(), &man_dir)?;
    let main_page = man_dir.join(format!("{BIN}.1"));
    let mut file = std::fs::File::create(&main_page)?;
    render_main_page(cmd.clone(), &mut file)?;
    file.flush()?;

    let mut written: Vec<PathBuf> = std::fs::read_dir(&man_dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let mut cmd = cmd.clone();
        written.push(clap_complete::generate_to(
            shell,
            &mut cmd,
            BIN,
            &completion_dir,
        )?);
    }
    written.sort();
    Ok(written)
}

/// walhook(1): the generated sections plus exit status, environment, files and see also.
fn render_main_page(cmd: clap::Command, w: &mut dyn Write) -> std::io::Result<()> {
    let subcommands: Vec<String> = cmd
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| format!("{BIN}-{}", c.get_name()))
        .collect();
    let cmd = cmd.long_about(DESCRIPTION).disable_help_subcommand(true);
    let man = clap_mangen::Man::new(cmd).manual("walhook manual");
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    man.render_subcommands_section(w)?;
    extra_sections(&subcommands).to_writer(w)?;
    man.render_version_section(w)?;
    Ok(())
}

fn extra_sections(subcommands: &[String]) -> Roff {
    let mut r = Roff::new();
    r.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in [
        (
            "0",
            "Stopped cleanly (SIGTERM, SIGINT), or the command succeeded.",
        ),
        (
            "1",
            "Another error, such as a database that stayed unreachable.",
        ),
        ("2", "Bad command-line arguments."),
        (
            "69",
            "EX_UNAVAILABLE: a permanent problem outside the configuration, such as a missing privilege.",
        ),
        (
            "78",
            "EX_CONFIG: the configuration or a database prerequisite must be fixed first. The systemd units stop instead of restarting (RestartPreventExitStatus=78); walhook check lists every problem.",
        ),
    ] {
        r.control("TP", [])
            .text([bold(code)])
            .text([roman(meaning)]);
    }

    r.control("SH", ["ENVIRONMENT"]);
    for (name, meaning) in [
        (
            "WALHOOK_CONFIG",
            "The configuration file when --config is not given (default /etc/walhook/walhook.toml).",
        ),
        (
            "WALHOOK_LOG",
            "Which log lines to write, in tracing's EnvFilter syntax: a level (error, warn, info, debug, trace) or per-module directives such as info,walhook::delivery=debug. Default: info.",
        ),
        (
            "NO_COLOR",
            "When set and not empty, text logs on a terminal carry no colours.",
        ),
        (
            "JOURNAL_STREAM",
            "Set by systemd when stderr leads to the journal: log lines then carry sd-daemon priority prefixes (<4> for warnings) so journalctl -p filters on them, and no timestamps.",
        ),
        (
            "NOTIFY_SOCKET, WATCHDOG_USEC",
            "Set by systemd for Type=notify units: walhook reports READY=1, STATUS= lines and watchdog pings.",
        ),
        (
            "CREDENTIALS_DIRECTORY",
            "Set by systemd's LoadCredential=; use it in the configuration as password_file = \"${CREDENTIALS_DIRECTORY}/pgpassword\".",
        ),
    ] {
        r.control("TP", [])
            .text([bold(name)])
            .text([roman(meaning)]);
    }
    r.control("PP", []).text([roman(
        "Any string in the configuration may contain ${NAME}, replaced by the environment variable NAME; PGPASSWORD and ~/.pgpass are read as libpq reads them.",
    )]);

    r.control("SH", ["FILES"]);
    for (path, meaning) in [
        (
            "/etc/walhook/walhook.toml",
            "The configuration of walhook.service.",
        ),
        (
            "/etc/walhook/walhook.env",
            "Optional KEY=value secrets for walhook.service, read by systemd as root (mode 0600).",
        ),
        (
            "/etc/walhook/NAME.toml, /etc/walhook/NAME.env",
            "Configuration and secrets of the instance walhook@NAME.service.",
        ),
        (
            "/usr/share/doc/walhook/README.md",
            "Installation, operation and the queue tables.",
        ),
        (
            "/usr/share/doc/walhook/examples/config.example.toml",
            "Every configuration key with a comment.",
        ),
    ] {
        r.control("TP", [])
            .text([bold(path)])
            .text([roman(meaning)]);
    }

    r.control("SH", ["SEE ALSO"]);
    let mut refs: Vec<(String, &str)> = subcommands.iter().map(|s| (s.clone(), "1")).collect();
    refs.extend(
        [
            ("systemctl", "1"),
            ("journalctl", "1"),
            ("systemd.exec", "5"),
            ("psql", "1"),
        ]
        .map(|(n, s)| (n.to_owned(), s)),
    );
    let mut inlines = Vec::new();
    for (i, (name, section)) in refs.iter().enumerate() {
        if i > 0 {
            inlines.push(roman(", "));
        }
        inlines.push(italic(name.as_str()));
        inlines.push(roman(format!("({section})")));
    }
    r.text(inlines);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assets_cover_every_command_and_three_shells() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_assets(dir.path()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for expected in [
            "walhook.1",
            "walhook-run.1",
            "walhook-check.1",
            "walhook-retry.1",
            "walhook.bash",
            "_walhook",
            "walhook.fish",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
        assert!(
            !names.iter().any(|n| n.contains("assets")),
            "the hidden command has no page: {names:?}"
        );
        let page = std::fs::read_to_string(dir.path().join("man/walhook.1")).unwrap();
        for section in [
            "EXIT STATUS",
            "ENVIRONMENT",
            "WALHOOK_LOG",
            "FILES",
            "SEE ALSO",
        ] {
            assert!(page.contains(section), "{section} missing:\n{page}");
        }
        assert!(page.contains("walhook\\-check"), "{page}");
        let bash = std::fs::read_to_string(dir.path().join("completions/walhook.bash")).unwrap();
        assert!(bash.contains("--offline"), "check --offline completes");
    }
}
