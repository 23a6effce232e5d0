//! The line a suite prints to say in which form it ran (which backend and
//! accelerator, or that it did not run and why). `tests/run-tiers.sh`
//! greps every line starting with [`FORM_PREFIX`] and repeats it in the
//! tier summary, so a check that could only run in a weaker form never
//! passes for the full one unseen.

use std::fmt::Display;
use std::io::Write;

/// What every form line starts with; `tests/run-tiers.sh` greps it.
pub const FORM_PREFIX: &str = "husk-test-form: ";

/// The form line for `form`.
pub fn form_line(form: impl Display) -> String {
    format!("{FORM_PREFIX}{form}")
}

/// Prints the form line for `form` on stdout, past the test harness's
/// output capture (which catches only the print macros), so the line
/// reaches the tier log with or without `--nocapture`.
pub fn announce_form(form: impl Display) {
    let mut stdout = std::io::stdout().lock();
    // A test cannot do better than carry on if its stdout is gone.
    let _ = writeln!(stdout, "{}", form_line(form));
    let _ = stdout.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_form_line_starts_with_the_prefix_the_tier_runner_greps() {
        let line = form_line(format_args!("agent guest tier via qemu ({})", "tcg"));
        assert_eq!(line, "husk-test-form: agent guest tier via qemu (tcg)");
        let runner =
            std::fs::read_to_string(crate::artifacts::workspace_root().join("tests/run-tiers.sh"))
                .unwrap();
        assert!(
            runner.contains(&format!("grep -o '{FORM_PREFIX}.*'")),
            "tests/run-tiers.sh no longer greps {FORM_PREFIX:?}"
        );
    }
}
