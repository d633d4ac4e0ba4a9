//! Replays the fuzz corpus (fuzz/corpus/<target>) and every crash input the fuzzer found
//! (fuzz/regressions/<target>) through the fuzz targets' bodies in `interceptor::fuzzing`,
//! on the stable toolchain and without libFuzzer, so `cargo test` keeps them passing.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use interceptor::fuzzing::{Body, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.expect("reading a fuzz input directory").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `body` on every file of `files`, and names every file it panicked on.
fn replay(body: Body, files: &[PathBuf]) -> Vec<String> {
    let mut failed = Vec::new();
    for file in files {
        let data = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if catch_unwind(AssertUnwindSafe(|| body(&data))).is_err() {
            failed.push(file.display().to_string());
        }
    }
    failed
}

#[test]
fn every_target_passes_its_corpus_and_regressions() {
    let root = fuzz_dir();
    let mut failed = Vec::new();
    for (name, body) in TARGETS {
        let corpus = inputs(&root.join("corpus").join(name));
        // An empty or missing corpus would make this test pass having checked nothing.
        assert!(
            !corpus.is_empty(),
            "fuzz/corpus/{name} is missing or empty: every target keeps a committed corpus"
        );
        failed.extend(replay(*body, &corpus));
        failed.extend(replay(*body, &inputs(&root.join("regressions").join(name))));
    }
    assert!(failed.is_empty(), "fuzz bodies panicked on: {failed:#?}");
}

/// Every target of the fuzz crate has a body here and the other way round, so a target
/// added on one side only is caught on stable.
#[test]
fn the_fuzz_crate_declares_exactly_these_targets() {
    let manifest = fs::read_to_string(fuzz_dir().join("Cargo.toml")).expect("fuzz/Cargo.toml");
    let mut declared: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .filter(|name| *name != "interceptor-fuzz")
        .collect();
    declared.sort_unstable();
    let mut bodies: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    bodies.sort_unstable();
    assert_eq!(declared, bodies);
    for name in bodies {
        let path = fuzz_dir().join(format!("fuzz_targets/{name}.rs"));
        let source =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            source.contains(&format!("interceptor::fuzzing::{name}(")),
            "{} does not call interceptor::fuzzing::{name}",
            path.display()
        );
    }
}
