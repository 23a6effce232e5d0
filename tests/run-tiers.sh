#!/usr/bin/env bash
# Runs every test tier this machine supports (see ../shared/ARCHITECTURE.md,
# "Test tiers") and ends with one line per tier: ran, or not run and why.
# Tests announce the form they ran in lines starting with "husk-test-form:";
# those are repeated in the summary. Exits non-zero if any tier failed.
set -uo pipefail
cd "$(dirname "$0")/.."

summary=()
forms=()
passed_total=0
failed_total=0
any_failed=0

# run_tier NAME COMMAND...: runs the tier, counts cargo's test results.
run_tier() {
  local name=$1; shift
  local log; log=$(mktemp /tmp/husk-tier-"$name".XXXXXX)
  echo "=== tier $name: $*"
  "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local passed failed
  passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
  failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
  passed_total=$((passed_total + passed))
  failed_total=$((failed_total + failed))
  while IFS= read -r line; do forms+=("  $name: ${line#*husk-test-form: }"); done \
    < <(grep -o 'husk-test-form: .*' "$log" || true)
  if [ "$rc" -eq 0 ]; then
    summary+=("tier $name: ran, passed ($passed tests)")
  else
    summary+=("tier $name: ran, FAILED (exit $rc; $passed passed, $failed failed)")
    any_failed=1
  fi
  rm -f "$log"
}

not_run() { summary+=("tier $1: not run: $2"); }

# has_tests GLOB...: whether any integration test file matches.
has_tests() { compgen -G "$1" >/dev/null; }

run_tier unit cargo test --workspace --lib --bins

if [ "$(id -u)" -ne 0 ]; then
  not_run host "needs root (namespaces, mounts, cgroups)"
elif ! command -v runc >/dev/null; then
  not_run host "Debian's runc is missing (make deps)"
else
  host_targets=()
  for f in runtime/tests/*.rs agent/tests/*.rs; do
    [ -e "$f" ] || continue
    pkg=$( [ "${f%%/*}" = runtime ] && echo husk-runtime || echo husk-agent )
    host_targets+=(-p "$pkg" --test "$(basename "$f" .rs)")
  done
  if [ ${#host_targets[@]} -gt 0 ]; then
    run_tier host cargo test "${host_targets[@]}" -- --test-threads=1
  else
    not_run host "no host-tier suites exist yet"
  fi
fi

if [ -c /dev/kvm ] && [ -r /dev/kvm ]; then
  kvm_targets=(--test kvm_payloads --test linux_boot)
  has_tests "vmm/tests/kvm_virtio_*.rs" && for f in vmm/tests/kvm_virtio_*.rs; do kvm_targets+=(--test "$(basename "$f" .rs)"); done
  run_tier kvm cargo test -p husk-vmm "${kvm_targets[@]}" -- --nocapture --test-threads=1
  run_tier kvm-arch cargo test -p husk-arch --test kvm -- --test-threads=1
else
  not_run kvm "/dev/kvm is missing or not accessible"
fi

guest_targets=()
for f in tests/tests/guest_*.rs; do
  [ -e "$f" ] || continue
  pkg=$( [ "${f%%/*}" = vmm ] && echo husk-vmm || echo husk-tests )
  guest_targets+=(-p "$pkg" --test "$(basename "$f" .rs)")
done
if [ ${#guest_targets[@]} -eq 0 ]; then
  not_run guest "no guest-tier suites exist yet"
elif ! command -v qemu-system-x86_64 >/dev/null; then
  not_run guest "qemu-system-x86_64 is missing (make deps installs qemu-system-x86)"
else
  run_tier guest cargo test "${guest_targets[@]}" -- --nocapture --test-threads=1
fi

if [ "$(id -u)" -ne 0 ]; then
  not_run e2e "needs root (a private containerd, mounts, cgroups)"
elif ! command -v containerd >/dev/null || ! command -v ctr >/dev/null; then
  not_run e2e "containerd or ctr is missing (make deps installs containerd)"
elif ! command -v qemu-system-x86_64 >/dev/null && [ ! -c /dev/kvm ]; then
  not_run e2e "neither /dev/kvm nor qemu-system-x86_64 is available to run a pod"
else
  # HUSK_E2E_RUNTIMES=runc|husk|runc,husk (default both); the suite prints its form.
  run_tier e2e cargo test -p husk-tests --test e2e_ctr
fi

echo
echo "=== husk test summary"
printf '%s\n' "${summary[@]}"
if [ ${#forms[@]} -gt 0 ]; then
  echo "forms the tests ran in:"
  printf '%s\n' "${forms[@]}"
fi
echo "tests: $passed_total passed, $failed_total failed"
exit $any_failed
