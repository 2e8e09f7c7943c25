//! The systemd units in `config/`: `systemd-analyze verify` accepts them
//! without a warning, and `systemd-analyze security --offline=yes` rates
//! their sandboxing at most 2.0 (server) and 4.9 (relay-client).
//!
//! Needs `systemd-analyze` (Debian package `systemd`; `scripts/test`
//! installs it), but no running systemd: both commands only read files.
//! Only copies of the units in temporary directories are handed to them.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary's path in the units, as installed.
const INSTALLED_BINARY: &str = "/usr/local/bin/http-relay";

struct Unit {
    /// File name under `config/`.
    file: &'static str,
    /// The `ExecStart=` line the unit must have.
    exec_start: &'static str,
    /// Highest accepted overall exposure, in tenths (20 = 2.0).
    max_exposure_tenths: u32,
}

const SERVER: Unit = Unit {
    file: "http-relay-server.service",
    exec_start: "ExecStart=/usr/local/bin/http-relay server --config /etc/http-relay/server.toml",
    max_exposure_tenths: 20,
};

const CLIENT: Unit = Unit {
    file: "http-relay-client.service",
    exec_start: "ExecStart=/usr/local/bin/http-relay client --config /etc/http-relay/client.toml",
    max_exposure_tenths: 49,
};

/// `systemd-analyze` with its output made predictable: logs on stderr
/// (never the journal, even when the test runs under a systemd service),
/// at info level whatever the caller's SYSTEMD_LOG_LEVEL (debug level would
/// name our unit in harmless lines), no colours, no pager.
fn systemd_analyze() -> Command {
    let mut cmd = Command::new("systemd-analyze");
    cmd.env("SYSTEMD_LOG_LEVEL", "info")
        .env("SYSTEMD_LOG_TARGET", "console")
        .env("SYSTEMD_LOG_COLOR", "0")
        .env("SYSTEMD_LOG_TIME", "0")
        .env("SYSTEMD_LOG_LOCATION", "0")
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "cat")
        .arg("--no-pager");
    cmd
}

fn run(mut cmd: Command) -> Output {
    match cmd.output() {
        Ok(output) => output,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "systemd-analyze not found ({e}); install the Debian package `systemd` \
             (scripts/test installs it when missing)"
        ),
        Err(e) => panic!("cannot run {cmd:?}: {e}"),
    }
}

fn describe(output: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Lines of stdout and stderr that name the unit (systemd's warnings about
/// a unit start with its path or its name).
fn lines_about(output: &Output, name: &str) -> Vec<String> {
    [&output.stdout, &output.stderr]
        .into_iter()
        .flat_map(|bytes| {
            String::from_utf8_lossy(bytes)
                .lines()
                .filter(|line| line.contains(name))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A path as one word of a systemd command line.
fn systemd_word(path: &str) -> String {
    let path = path.replace('%', "%%").replace('$', "$$");
    if path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._+-%$".contains(c))
    {
        path
    } else {
        format!("\"{}\"", path.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// A copy of the unit under its own name in a fresh temporary directory.
/// `systemd-analyze verify` checks that the binaries of Exec*= lines exist,
/// so the installed path of http-relay is replaced by the one cargo built;
/// nothing else in the unit changes.
fn unit_copy(unit: &Unit) -> (tempfile::TempDir, PathBuf) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config")
        .join(unit.file);
    let text = std::fs::read_to_string(&source)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", source.display()));
    assert!(
        text.lines().any(|line| line == unit.exec_start),
        "{} has no line `{}`",
        unit.file,
        unit.exec_start
    );
    let built = systemd_word(env!("CARGO_BIN_EXE_http-relay"));
    let text = text.replace(INSTALLED_BINARY, &built);
    let dir = tempfile::tempdir().expect("temporary directory");
    let copy = dir.path().join(unit.file);
    std::fs::write(&copy, text).expect("write the unit copy");
    (dir, copy)
}

fn verify(unit: &Unit) {
    let (_dir, copy) = unit_copy(unit);
    let mut cmd = systemd_analyze();
    // --man=no: no man pages to look up (Documentation=), none installed in
    // containers. --recursive-errors=one: errors in the unit and in the
    // units it names fail the check; those further down the host's
    // dependency tree (not ours) do not.
    cmd.args(["verify", "--man=no", "--recursive-errors=one"])
        .arg(&copy);
    let output = run(cmd);
    assert!(
        output.status.success(),
        "systemd-analyze verify {} failed\n{}",
        unit.file,
        describe(&output)
    );
    let warnings = lines_about(&output, unit.file);
    assert!(
        warnings.is_empty(),
        "systemd-analyze verify warns about {}:\n{}\n\n{}",
        unit.file,
        warnings.join("\n"),
        describe(&output)
    );
}

/// Runs `systemd-analyze security --offline=yes` and checks the overall
/// exposure against the unit's maximum.
fn security(unit: &Unit) {
    let (_dir, copy) = unit_copy(unit);
    let mut cmd = systemd_analyze();
    cmd.args(["security", "--offline=yes"])
        // Also let systemd-analyze compare (in tenths, like ours).
        .arg(format!("--threshold={}", unit.max_exposure_tenths))
        .arg(&copy);
    let output = run(cmd);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let prefix = format!("Overall exposure level for {}:", unit.file);
    let line = stdout
        .lines()
        .find(|line| line.contains(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line\n{}", describe(&output)));
    let mut words = line[line.find(&prefix).unwrap() + prefix.len()..].split_whitespace();
    let (figure, label) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let tenths = figure
        .split_once('.')
        .and_then(|(whole, tenth)| {
            Some(whole.parse::<u32>().ok()? * 10 + tenth.parse::<u32>().ok()?)
        })
        .unwrap_or_else(|| panic!("cannot parse the exposure in `{line}`"));
    eprintln!(
        "{}: overall exposure {figure} {label} (at most {}.{} accepted)",
        unit.file,
        unit.max_exposure_tenths / 10,
        unit.max_exposure_tenths % 10
    );
    assert!(
        tenths <= unit.max_exposure_tenths,
        "{}: exposure {figure} is above {}.{}\n{}",
        unit.file,
        unit.max_exposure_tenths / 10,
        unit.max_exposure_tenths % 10,
        describe(&output)
    );
    assert!(
        ["OK", "SAFE", "PERFECT"].contains(&label),
        "{}: exposure rated {label}, expected OK or better",
        unit.file
    );
    assert!(
        output.status.success(),
        "systemd-analyze security --threshold={} failed for {}\n{}",
        unit.max_exposure_tenths,
        unit.file,
        describe(&output)
    );
    let warnings = lines_about(&output, unit.file);
    let warnings: Vec<_> = warnings.iter().filter(|l| !l.contains(&prefix)).collect();
    assert!(
        warnings.is_empty(),
        "systemd-analyze security warns about {}:\n{warnings:?}",
        unit.file
    );
}

#[test]
fn server_unit_verifies() {
    verify(&SERVER);
}

#[test]
fn client_unit_verifies() {
    verify(&CLIENT);
}

#[test]
fn server_unit_exposure_at_most_2_0() {
    security(&SERVER);
}

#[test]
fn client_unit_exposure_at_most_4_9() {
    security(&CLIENT);
}
