#!/usr/bin/env bash
# Runs every test tier this machine supports (see docs/architecture.md,
# "Test tiers") and ends with one line per tier: ran, or not run and why.
# Tests announce the form they ran in lines starting with "husk-test-form:";
# those are repeated in the summary. Exits non-zero if any tier failed.
#
# Tier membership is explicit: TIER_MEMBERS below names every integration
# test target of the workspace (each CRATE/tests/*.rs file and each [[test]]
# of a Cargo.toml) in exactly one tier. Before running anything, the script
# checks that list against the workspace and fails, naming the file, when a
# test target is claimed by no tier or by two, or when a listed file is not a
# test target. `tests/run-tiers.sh --check-claims` does only that check.
set -uo pipefail
cd "$(dirname "$0")/.."

# TIER FILE: one integration test target per line. The unit tier also runs
# every crate's lib and bin unit tests.
TIER_MEMBERS='
unit      fuzz-targets/tests/corpus_replay.rs
host      ctl/tests/check.rs
host      ctl/tests/env.rs
host      runtime/tests/bad_inputs.rs
host      runtime/tests/runc_differential.rs
host      agent/tests/host_tier.rs
host      devices/tests/fs_config.rs
host      devices/tests/fs_confinement.rs
host      devices/tests/fs_lifecycle.rs
host      devices/tests/fs_requests.rs
host      devices/tests/fs_limits.rs
host      devices/tests/fs_vhost_user.rs
host      devices/tests/fs_confined_mmio.rs
host      devices/tests/net_tap.rs
host      shim/tests/shared_dir.rs
host      shim/tests/pod_network.rs
host      confine/tests/violation.rs
host      confine/tests/private_root.rs
kvm       vmm/tests/kvm_payloads.rs
kvm       vmm/tests/linux_boot.rs
kvm       vmm/tests/kvm_virtio_probe.rs
kvm       vmm/tests/kvm_snapshot.rs
kvm-arch  vmm/arch/tests/kvm.rs
guest     tests/tests/guest_boot.rs
guest     tests/tests/guest_devices.rs
guest     tests/tests/guest_agent.rs
hostile   tests/tests/hostile_guest.rs
e2e       tests/tests/e2e_ctr.rs
cri       tests/tests/cri.rs
'
TIERS=(unit host kvm kvm-arch guest hostile e2e cri)

# test_targets: "FILE PACKAGE TARGET" for every integration test target
# cargo knows in the workspace, and "FILE - -" for every CRATE/tests/*.rs
# file it does not build as one (a crate outside the workspace, say).
test_targets() {
  local files=() file
  while IFS= read -r file; do
    file=${file#./}
    # Only files directly in a crate's tests/ directory are test targets;
    # files in its subdirectories are modules the targets share.
    [ "$(basename "$(dirname "$file")")" = tests ] || continue
    [ -f "$(dirname "$(dirname "$file")")/Cargo.toml" ] && files+=("$file")
  done < <(find . \( -name target -o -name .git \) -prune -o -type f -path '*/tests/*.rs' -print)
  cargo metadata --no-deps --format-version 1 | python3 -c '
import json, os, sys
targets = {}
for package in json.load(sys.stdin)["packages"]:
    for target in package["targets"]:
        if "test" in target["kind"]:
            targets[os.path.relpath(target["src_path"])] = (package["name"], target["name"])
for path in sys.argv[1:]:
    targets.setdefault(path, ("-", "-"))
for path, (package, name) in sorted(targets.items()):
    print(path, package, name)
' "${files[@]}"
}

declare -A target_of=()   # FILE -> "PACKAGE TARGET"
declare -A tier_of=()     # FILE -> TIER

# check_claims: every test target in exactly one tier; prints one line per
# problem and returns non-zero if there is any.
check_claims() {
  local problems=0 file package name tier known lines
  lines=$(test_targets) || { echo "tier membership: cargo metadata failed"; return 1; }
  declare -A owner_of_name=()
  while read -r file package name; do
    [ -n "$file" ] || continue
    target_of[$file]="$package $name"
    [ "$package" = - ] && continue
    if [ -n "${owner_of_name[$name]:-}" ]; then
      echo "tier membership: test target name $name is used by ${owner_of_name[$name]} and $package; tiers select targets by name, so names must be unique"
      problems=$((problems + 1))
    fi
    owner_of_name[$name]=$package
  done <<< "$lines"
  while read -r tier file; do
    [ -n "$tier" ] || continue
    known=0
    for name in "${TIERS[@]}"; do [ "$name" = "$tier" ] && known=1; done
    if [ "$known" -eq 0 ]; then
      echo "tier membership: $file is listed in unknown tier $tier"
      problems=$((problems + 1))
      continue
    elif [ -n "${tier_of[$file]:-}" ]; then
      echo "tier membership: $file is claimed by tiers ${tier_of[$file]} and $tier"
      problems=$((problems + 1))
    elif [ -z "${target_of[$file]:-}" ]; then
      echo "tier membership: tier $tier lists $file, which does not exist or is not an integration test"
      problems=$((problems + 1))
    elif [ "${target_of[$file]}" = "- -" ]; then
      echo "tier membership: tier $tier lists $file, which no workspace package builds as a test target"
      problems=$((problems + 1))
    fi
    tier_of[$file]=$tier
  done <<< "$TIER_MEMBERS"
  for file in "${!target_of[@]}"; do
    if [ -z "${tier_of[$file]:-}" ]; then
      echo "tier membership: $file is claimed by no tier (add it to TIER_MEMBERS in tests/run-tiers.sh)"
      problems=$((problems + 1))
    fi
  done
  if [ "$problems" -gt 0 ]; then
    echo "tier membership: $problems problem(s); no tier was run"
    return 1
  fi
  echo "tier membership: ${#target_of[@]} integration test targets, each claimed by exactly one tier"
}

# tier_targets TIER: the `-p PACKAGE --test TARGET` arguments of its
# members, in the order TIER_MEMBERS lists them.
tier_targets() {
  local tier file package name
  while read -r tier file; do
    [ "$tier" = "$1" ] || continue
    read -r package name <<< "${target_of[$file]}"
    printf '%s\n' -p "$package" --test "$name"
  done <<< "$TIER_MEMBERS"
}

case "${1:-}" in
  "") ;;
  --check-claims) check_claims; exit ;;
  *) echo "usage: $0 [--check-claims]" >&2; exit 2 ;;
esac
check_claims || exit 1

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

mapfile -t unit_targets < <(tier_targets unit)
run_tier unit cargo test --workspace --lib --bins "${unit_targets[@]}"

mapfile -t host_targets < <(tier_targets host)
if [ "$(id -u)" -ne 0 ]; then
  not_run host "needs root (namespaces, mounts, cgroups)"
elif ! command -v runc >/dev/null; then
  not_run host "Debian's runc is missing (make deps)"
else
  run_tier host cargo test "${host_targets[@]}" -- --test-threads=1
fi

if [ -c /dev/kvm ] && [ -r /dev/kvm ]; then
  mapfile -t kvm_targets < <(tier_targets kvm)
  run_tier kvm cargo test "${kvm_targets[@]}" -- --nocapture --test-threads=1
  mapfile -t kvm_arch_targets < <(tier_targets kvm-arch)
  run_tier kvm-arch cargo test "${kvm_arch_targets[@]}" -- --test-threads=1
else
  not_run kvm "/dev/kvm is missing or not accessible"
fi

mapfile -t guest_targets < <(tier_targets guest)
if ! command -v qemu-system-x86_64 >/dev/null; then
  not_run guest "qemu-system-x86_64 is missing (make deps installs qemu-system-x86)"
else
  run_tier guest cargo test "${guest_targets[@]}" -- --nocapture --test-threads=1
fi

mapfile -t hostile_targets < <(tier_targets hostile)
if [ "$(id -u)" -ne 0 ]; then
  not_run hostile "needs root (the share's mounts)"
elif ! command -v qemu-system-x86_64 >/dev/null; then
  not_run hostile "qemu-system-x86_64 is missing (make deps installs qemu-system-x86)"
else
  run_tier hostile cargo test "${hostile_targets[@]}" -- --nocapture
fi

mapfile -t e2e_targets < <(tier_targets e2e)
if [ "$(id -u)" -ne 0 ]; then
  not_run e2e "needs root (a private containerd, mounts, cgroups)"
elif ! command -v containerd >/dev/null || ! command -v ctr >/dev/null; then
  not_run e2e "containerd or ctr is missing (make deps installs containerd)"
elif ! command -v qemu-system-x86_64 >/dev/null && [ ! -c /dev/kvm ]; then
  not_run e2e "neither /dev/kvm nor qemu-system-x86_64 is available to run a pod"
else
  # HUSK_E2E_RUNTIMES=runc|husk|runc,husk (default both); the suite prints its form.
  run_tier e2e cargo test "${e2e_targets[@]}"
fi

mapfile -t cri_targets < <(tier_targets cri)
if [ "$(id -u)" -ne 0 ]; then
  not_run cri "needs root (a private containerd, CNI networks, mounts)"
elif ! command -v containerd >/dev/null || [ ! -x /usr/lib/cni/bridge ]; then
  not_run cri "containerd or the CNI plugins are missing (make deps installs containerd and containernetworking-plugins)"
elif ! command -v qemu-system-x86_64 >/dev/null && [ ! -c /dev/kvm ]; then
  not_run cri "neither /dev/kvm nor qemu-system-x86_64 is available to run a pod"
else
  run_tier cri cargo test "${cri_targets[@]}"
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
