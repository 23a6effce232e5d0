//! Every committed fuzz corpus file (`fuzz/corpus/<target>/*`: the seeds
//! and the reproducers of fixed crashes) replayed through its target's
//! body on stable, as a regression test in `make test`'s unit tier. A file
//! that panics fails the test, naming the target and the file.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

fn corpus_files(target: &str) -> Vec<PathBuf> {
    let dir = corpus_root().join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {} is missing: {e}", dir.display()))
        .map(|entry| entry.expect("read the corpus directory").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Every target has seeds, and every corpus directory is a target's.
fn check_corpus_directories() {
    let targets: Vec<&str> = husk_fuzz_targets::TARGETS.iter().map(|t| t.0).collect();
    for target in &targets {
        assert!(
            !corpus_files(target).is_empty(),
            "fuzz/corpus/{target} has no seeds"
        );
    }
    for entry in std::fs::read_dir(corpus_root()).expect("read fuzz/corpus") {
        let name = entry.expect("read fuzz/corpus").file_name();
        let name = name.to_string_lossy();
        assert!(
            targets.contains(&name.as_ref()),
            "fuzz/corpus/{name} belongs to no target"
        );
    }
}

/// One test, not several: the targets count the process's file
/// descriptors, so nothing may run beside them.
#[test]
fn every_corpus_file_replays_without_a_panic() {
    check_corpus_directories();
    // One quiet line per failure instead of a backtrace per file.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    let mut replayed = 0;
    for (target, run) in husk_fuzz_targets::TARGETS {
        for file in corpus_files(target) {
            let data = std::fs::read(&file)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
            replayed += 1;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                failures.push(format!("{target}: {}: {message}", file.display()));
            }
        }
    }
    std::panic::set_hook(default_hook);
    assert!(
        failures.is_empty(),
        "{} of {replayed} corpus files panicked:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("replayed {replayed} corpus files");
}
