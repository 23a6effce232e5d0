#!/usr/bin/env bash
# Runs husk's fuzz targets one after another (`make fuzz`), each for
# FUZZ_SECONDS seconds (default 60) with libFuzzer through cargo-fuzz on
# nightly, and ends with one line per target: what ran and the result.
# Exits non-zero if any target crashed (or failed to build or run).
#
#   fuzz/run.sh                    every target
#   fuzz/run.sh vsock_packets ...  only these
#
# Each target starts from its committed seeds (fuzz/corpus/<target>) and
# writes what it finds to fuzz/work-corpus/<target>, so the committed
# corpus only changes by hand. A crash leaves its input in
# fuzz/artifacts/<target>/; after fixing the bug, copy it into the corpus
# as repro-<name> so the replay test (make test) keeps it fixed.
set -uo pipefail
cd "$(dirname "$0")"

SECONDS_PER_TARGET=${FUZZ_SECONDS:-60}
CARGO=${CARGO:-cargo}
ALL_TARGETS=(vsock_packets fuse_requests mmio_registers hybrid_vsock_connect shim_config agent_responses)
if [ $# -gt 0 ]; then targets=("$@"); else targets=("${ALL_TARGETS[@]}"); fi

if ! command -v cargo-fuzz >/dev/null; then
  echo "fuzz: installing cargo-fuzz"
  "$CARGO" install cargo-fuzz --locked || { echo "fuzz: cannot install cargo-fuzz"; exit 1; }
fi

# The fuzz workspace has its own target directory (fuzz/target), whatever
# the caller's CARGO_TARGET_DIR says: it is built with nightly,
# instrumentation and sanitizers, and must not mix with the main build.
unset CARGO_TARGET_DIR

summary=()
failed=0
for target in "${targets[@]}"; do
  work=work-corpus/$target
  log=work-corpus/$target.log
  mkdir -p "$work" "artifacts/$target"
  echo "=== fuzz $target: $SECONDS_PER_TARGET s from corpus/$target"
  "$CARGO" +nightly fuzz run --target-dir target "$target" "$work" "corpus/$target" -- \
    -max_total_time="$SECONDS_PER_TARGET" -timeout=30 -print_final_stats=1 >"$log" 2>&1
  rc=$?
  stats=$(grep -E '^#[0-9]+' "$log" | tail -1 | awk '{
    for (i = 1; i <= NF; i++) { if ($i == "cov:") cov = $(i+1); if ($i == "ft:") ft = $(i+1) }
    print substr($1, 2) " runs, cov " cov ", ft " ft }')
  if [ "$rc" -eq 0 ]; then
    summary+=("fuzz $target: ran $SECONDS_PER_TARGET s, ${stats:-no stats}: no crash")
  else
    failed=1
    artifact=$(grep -Eo 'artifacts/[^ ]+' "$log" | tail -1)
    tail -40 "$log"
    summary+=("fuzz $target: FAILED (exit $rc) after ${stats:-no stats}; input: ${artifact:-none, see fuzz/$log}")
  fi
done

echo
echo "=== husk fuzz summary"
printf '%s\n' "${summary[@]}"
exit $failed
