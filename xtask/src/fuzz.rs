//! `cargo xtask fuzz`: runs the cargo-fuzz targets of fuzz/ one after the other, each for
//! a fixed time on its committed corpus, and prints per target the runs executed, the
//! corpus size and the crashes; fails if any target crashed.
//!
//! The targets' bodies live in `interceptor::fuzzing`; interceptor/tests/fuzz_corpus.rs
//! replays the corpus and fuzz/regressions on stable, so a crash found here becomes a
//! regression test by copying its input to fuzz/regressions/<target>/.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::cmd;

#[derive(Args)]
pub struct Options {
    /// How long each target runs, in seconds (libFuzzer's -max_total_time).
    #[arg(long)]
    seconds: u64,
    /// Run only this target (may be repeated); default: every target of fuzz/Cargo.toml.
    #[arg(long = "target", value_name = "TARGET")]
    targets: Vec<String>,
    /// libFuzzer's -rss_limit_mb: an input that makes a target use more memory is a crash.
    #[arg(long, default_value_t = 2048)]
    rss_limit_mb: u64,
    /// libFuzzer's -timeout, in seconds: one input that takes longer is a crash (a hang in
    /// a parser of untrusted input is a denial of service).
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// After each run, minimize the target's corpus with `cargo fuzz cmin`.
    #[arg(long)]
    cmin: bool,
}

/// What one target's run gave.
struct Outcome {
    target: String,
    seconds: f64,
    runs: Option<u64>,
    corpus_files: usize,
    corpus_bytes: u64,
    /// New crash inputs in fuzz/artifacts/<target>/.
    crashes: Vec<PathBuf>,
    /// The exit status, when it was not success.
    failure: Option<String>,
}

pub fn run(options: Options) -> Result<()> {
    let fuzz_dir = cmd::workspace_root().join("fuzz");
    let manifest = fs::read_to_string(fuzz_dir.join("Cargo.toml"))
        .with_context(|| format!("reading {}", fuzz_dir.join("Cargo.toml").display()))?;
    let all = targets_of(&manifest);
    let targets = if options.targets.is_empty() {
        all
    } else {
        for t in &options.targets {
            if !all.contains(t) {
                bail!("no fuzz target {t:?}; the targets are {}", all.join(", "));
            }
        }
        options.targets.clone()
    };
    if targets.is_empty() {
        bail!("fuzz/Cargo.toml declares no fuzz target");
    }

    crate::setup::nightly()?;
    ensure_cargo_fuzz()?;
    let started = Instant::now();
    // One build of every target first (`cargo fuzz build` takes one target or none), so
    // each run's time is spent fuzzing.
    cmd::run(cargo_fuzz().arg("build"))?;
    let built = started.elapsed();

    let logs = fuzz_dir.join("target/logs");
    fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let mut outcomes = Vec::new();
    for target in &targets {
        outcomes.push(run_target(&fuzz_dir, &logs, target, &options)?);
    }

    println!(
        "\nfuzzing: {} target(s), {} s each, -rss_limit_mb={} -timeout={}; build {:.0} s, \
         total wall time {:.0} s",
        targets.len(),
        options.seconds,
        options.rss_limit_mb,
        options.timeout,
        built.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    print!("{}", table(&outcomes));
    let crashed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| !o.crashes.is_empty() || o.failure.is_some())
        .collect();
    if crashed.is_empty() {
        return Ok(());
    }
    for o in &crashed {
        for file in &o.crashes {
            println!("crash input of {}: {}", o.target, file.display());
        }
        if let Some(failure) = &o.failure {
            println!("{}: {failure}", o.target);
        }
    }
    println!(
        "reproduce with `cargo +nightly fuzz run <target> <input>`; once fixed, copy the \
         input to fuzz/regressions/<target>/ so `cargo test` keeps replaying it"
    );
    bail!(
        "{} target(s) crashed: {}",
        crashed.len(),
        crashed
            .iter()
            .map(|o| o.target.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `cargo +nightly fuzz`, run from the workspace root (cargo-fuzz finds fuzz/ there).
/// Through rustup's `cargo` proxy rather than `$CARGO`: the `+nightly` selector only
/// exists in the proxy, and cargo-fuzz needs nightly for its sanitizer flags.
fn cargo_fuzz() -> Command {
    let mut cargo = cmd::new("cargo");
    cargo
        .args(["+nightly", "fuzz"])
        // interceptor/build.rs would build the eBPF object, which no target uses.
        .env("AYA_BUILD_SKIP", "1")
        // Sanitizer builds stay in fuzz/target, never mixed into the workspace's target.
        .env_remove("CARGO_TARGET_DIR");
    cargo
}

/// Installs cargo-fuzz unless `cargo fuzz --version` already works.
fn ensure_cargo_fuzz() -> Result<()> {
    if let Some(version) = cmd::probe(cmd::new("cargo").args(["+nightly", "fuzz", "--version"])) {
        println!("ok {}", version.trim());
        return Ok(());
    }
    println!("installing cargo-fuzz");
    cmd::run(cmd::cargo().args(["install", "cargo-fuzz", "--locked"]))
}

fn run_target(fuzz_dir: &Path, logs: &Path, target: &str, options: &Options) -> Result<Outcome> {
    let corpus = fuzz_dir.join("corpus").join(target);
    fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let artifacts = fuzz_dir.join("artifacts").join(target);
    let before = crash_files(&artifacts);

    let mut fuzz = cargo_fuzz();
    fuzz.arg("run")
        .arg(target)
        .arg(&corpus)
        .arg("--")
        .arg(format!("-max_total_time={}", options.seconds))
        .arg(format!("-rss_limit_mb={}", options.rss_limit_mb))
        .arg(format!("-timeout={}", options.timeout))
        .arg("-print_final_stats=1");
    let log_path = logs.join(format!("{target}.log"));
    println!("+ {fuzz:?}  (full output in {})", log_path.display());
    let started = Instant::now();
    let (status, log) = run_logged(&mut fuzz, &log_path)?;
    let seconds = started.elapsed().as_secs_f64();

    if options.cmin {
        cmd::run(cargo_fuzz().arg("cmin").arg(target).arg(&corpus))?;
    }
    let (corpus_files, corpus_bytes) = dir_size(&corpus);
    let crashes = crash_files(&artifacts)
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    Ok(Outcome {
        target: target.to_owned(),
        seconds,
        runs: executed_runs(&log),
        corpus_files,
        corpus_bytes,
        crashes,
        failure: (!status.success()).then(|| format!("cargo fuzz run exited with {status}")),
    })
}

/// Runs `cmd` with its stderr (where libFuzzer reports) copied to `log_path` and
/// returned; only libFuzzer's non-progress lines are echoed, since its `#N NEW ...` lines
/// run to thousands in a long run.
fn run_logged(cmd: &mut Command, log_path: &Path) -> Result<(std::process::ExitStatus, String)> {
    let mut log_file =
        fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    let stderr = child.stderr.take().context("no stderr pipe")?;
    let mut log = String::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading cargo fuzz's output")?;
        writeln!(log_file, "{line}").context("writing the fuzz log")?;
        if !is_progress(&line) {
            eprintln!("{line}");
        }
        log.push_str(&line);
        log.push('\n');
    }
    let status = child.wait().context("waiting for cargo fuzz")?;
    Ok((status, log))
}

/// libFuzzer's periodic status lines (`#1024 NEW cov: ...`, `#2048 pulse ...`) and the
/// `NEW_FUNC` lines under them; the `INITED` and `DONE` ones are kept.
fn is_progress(line: &str) -> bool {
    (line.starts_with('#') && !line.contains("INITED") && !line.contains("DONE"))
        || line.trim_start().starts_with("NEW_FUNC[")
}

/// The runs libFuzzer executed: `stat::number_of_executed_units: N` (from
/// -print_final_stats), else its `Done N runs in M second(s)` line.
fn executed_runs(log: &str) -> Option<u64> {
    let stat = log.lines().rev().find_map(|l| {
        l.strip_prefix("stat::number_of_executed_units:")
            .and_then(|n| n.trim().parse().ok())
    });
    stat.or_else(|| {
        log.lines().rev().find_map(|l| {
            l.strip_prefix("Done ")
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
    })
}

/// The inputs libFuzzer saved in `dir` as failures: crashes, leaks, timeouts and
/// out-of-memory (not `slow-unit-*`, which only reports a slow input).
fn crash_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| !n.starts_with("slow-unit-") && !n.starts_with('.'))
        })
        .collect();
    files.sort();
    files
}

/// The number of files in `dir` and their total size in bytes.
fn dir_size(dir: &Path) -> (usize, u64) {
    let Ok(entries) = fs::read_dir(dir) else {
        return (0, 0);
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .fold((0, 0), |(n, bytes), m| (n + 1, bytes + m.len()))
}

/// The `[[bin]]` names of fuzz/Cargo.toml, in order: cargo-fuzz makes each target a bin.
fn targets_of(manifest: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin {
            if let Some(name) = line
                .strip_prefix("name")
                .map(str::trim_start)
                .and_then(|l| l.strip_prefix('='))
            {
                targets.push(name.trim().trim_matches('"').to_owned());
            }
        }
    }
    targets
}

fn table(outcomes: &[Outcome]) -> String {
    let mut out = format!(
        "{:<16} {:>8} {:>12} {:>9} {:>13} {:>11} {:>8}\n",
        "target", "seconds", "runs", "runs/s", "corpus files", "corpus KiB", "crashes"
    );
    for o in outcomes {
        let runs = o.runs.map_or("?".to_owned(), |r| r.to_string());
        let rate = o
            .runs
            .map_or("?".to_owned(), |r| format!("{:.0}", r as f64 / o.seconds));
        let crashes = if o.crashes.is_empty() && o.failure.is_some() {
            // Failed without leaving an input (e.g. the build broke): not a clean run.
            "failed".to_owned()
        } else {
            o.crashes.len().to_string()
        };
        out.push_str(&format!(
            "{:<16} {:>8.0} {:>12} {:>9} {:>13} {:>11.1} {:>8}\n",
            o.target,
            o.seconds,
            runs,
            rate,
            o.corpus_files,
            o.corpus_bytes as f64 / 1024.0,
            crashes
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_the_bin_names() {
        let manifest = r#"
[package]
name = "interceptor-fuzz"

[dependencies]
libfuzzer-sys = "0.4"

[[bin]]
name = "cni_stdin"
path = "fuzz_targets/cni_stdin.rs"

[[bin]]
path = "fuzz_targets/manifests.rs"
name="manifests"
"#;
        assert_eq!(targets_of(manifest), ["cni_stdin", "manifests"]);
    }

    #[test]
    fn the_repo_declares_every_target() {
        let manifest = fs::read_to_string(cmd::workspace_root().join("fuzz/Cargo.toml")).unwrap();
        let targets = targets_of(&manifest);
        for t in [
            "cni_stdin",
            "cni_env",
            "agent_protocol",
            "annotations",
            "manifests",
            "mesh_config",
            "client_hello",
        ] {
            assert!(targets.iter().any(|x| x == t), "{t} missing: {targets:?}");
        }
    }

    #[test]
    fn runs_come_from_the_final_stats_or_the_done_line() {
        let log = "#2\tINITED cov: 9 ft: 9 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   Done 123456 runs in 601 second(s)\n\
                   stat::number_of_executed_units: 123457\n\
                   stat::average_exec_per_sec:     205\n";
        assert_eq!(executed_runs(log), Some(123457));
        assert_eq!(executed_runs("Done 99 runs in 1 second(s)\n"), Some(99));
        assert_eq!(
            executed_runs("==1== ERROR: libFuzzer: deadly signal\n"),
            None
        );
    }

    #[test]
    fn progress_lines_are_not_echoed() {
        assert!(is_progress("#4096\tpulse  cov: 1 ft: 2 corp: 3/4b"));
        assert!(is_progress("#17\tNEW    cov: 1 ft: 2 corp: 3/4b"));
        assert!(is_progress(
            "\tNEW_FUNC[1/4]: 0x5624 in serde_yaml::de::f de.rs:1660"
        ));
        assert!(!is_progress("#2\tINITED cov: 9 ft: 9 corp: 1/1b"));
        assert!(!is_progress("#99\tDONE   cov: 9 ft: 9 corp: 1/1b"));
        assert!(!is_progress("==1== ERROR: libFuzzer: deadly signal"));
    }
}
