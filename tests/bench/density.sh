#!/usr/bin/env bash
# `make bench`: pod density, measured the way Kata's metrics CI measures its
# memory footprint (N busybox containers started with ctr, a 5 s settle,
# then the PSS of every process that serves them), each runtime in the same
# run against a private containerd (tests/examples/e2e_env.rs):
#  - per pod: the total PSS of the pod's host process tree (husk: the shim
#    and its QEMU, guest RAM included; runc: its shim and the container's
#    processes), and of that the guest RAM's PSS (QEMU's memfd);
#  - the node's MemAvailable drop per pod, from before the first pod to
#    after the settle;
#  - husk with `hypervisor.free_page_reporting = false` beside it, so the
#    figure the virtio-balloon's free page reporting saves is measured in
#    the same run.
# For each N in DENSITY_PODS (default "20 40"). Figures only: nothing here
# passes or fails on a number.
set -euo pipefail
cd "$(dirname "$0")/../.."
read -r -a counts <<<"${DENSITY_PODS:-20 40}"
read -r -a runtimes <<<"${HUSK_BENCH_RUNTIMES:-runc husk husk-nofpr}"
settle_s=${DENSITY_SETTLE_S:-5}

type_of() { case $1 in runc) echo io.containerd.runc.v2 ;; husk | husk-nofpr) echo io.containerd.kata.v2 ;;
  *) echo "density bench: unknown runtime $1 (runc, husk or husk-nofpr)" >&2; exit 1 ;; esac; }
flags_of() { case $1 in husk-nofpr) echo "--runtime-config-path $work/nofpr.toml" ;; esac; }
for rt in "${runtimes[@]}"; do type_of "$rt" >/dev/null; done

cargo build -q --release -p husk-tests --example e2e_env
helper=${CARGO_TARGET_DIR:-target}/release/examples/e2e_env
work=$(mktemp -d /tmp/husk-bench-density.XXXXXX)
started_ids=()
cleanup() {
  for id in "${started_ids[@]}"; do remove_pod "$id"; done
  "$helper" down "$work/containerd" || echo "density bench: the clean-up had to force something" >&2
  rm -rf "$work"
}
trap cleanup EXIT
eval "$("$helper" up "$work/containerd")"
export CONTAINERD_ADDRESS CONTAINERD_NAMESPACE
image=$HUSK_E2E_IMAGE
# husk-nofpr: the same configuration without free page reporting.
if grep -q '^free_page_reporting' "$HUSK_E2E_HUSK_CONFIG"; then
  sed 's/^free_page_reporting *=.*/free_page_reporting = false/' "$HUSK_E2E_HUSK_CONFIG" >"$work/nofpr.toml"
else
  sed 's/^\[hypervisor\]$/[hypervisor]\nfree_page_reporting = false/' "$HUSK_E2E_HUSK_CONFIG" >"$work/nofpr.toml"
fi
grep -q '^free_page_reporting = false' "$work/nofpr.toml" ||
  { echo "density bench: could not write free_page_reporting = false into $work/nofpr.toml" >&2; exit 1; }

remove_pod() {
  ctr task kill -s SIGKILL "$1" >/dev/null 2>&1 || true
  for _ in $(seq 100); do ctr task ls 2>/dev/null | grep -q "^$1 .*STOPPED" && break; sleep 0.1; done
  ctr task delete "$1" >/dev/null 2>&1 || true
  ctr container rm "$1" >/dev/null 2>&1 || true
}

mem_available_kib() { awk '/^MemAvailable:/ {print $2}' /proc/meminfo; }

shim_of() {
  for pid in $(pgrep -f "containerd-shim-.*$CONTAINERD_ADDRESS" || true); do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-id $1 "; then echo "$pid"; fi
  done | head -1
}

# measure RUNTIME N: starts N idle pods, lets them settle, prints the
# figures and removes the pods.
measure() {
  local rt=$1 n=$2 i id before after shims=()
  sync
  echo 3 >/proc/sys/vm/drop_caches
  before=$(mem_available_kib)
  for i in $(seq "$n"); do
    id="dens-$rt-$i"
    # shellcheck disable=SC2046 # flags_of prints whole words
    ctr run -d --runtime "$(type_of "$rt")" $(flags_of "$rt") "$image" "$id" sleep 100000 >/dev/null
    started_ids+=("$id")
    for _ in $(seq 300); do ctr task ls | grep -q "^$id .*RUNNING" && break; sleep 0.1; done
  done
  sleep "$settle_s"
  after=$(mem_available_kib)
  for i in $(seq "$n"); do shims+=("$(shim_of "dens-$rt-$i")"); done
  python3 - "$rt" "$n" "$before" "$after" "${shims[@]}" <<'EOF'
import os, re, sys

runtime, n, before, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
shims = [int(p) for p in sys.argv[5:] if p]

def children():
    tree = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                ppid = int(stat[stat.rfind(")") + 2:].split()[1])
                tree.setdefault(ppid, []).append(int(entry))
            except OSError:
                pass
    return tree

def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("Pss:"))
    except (OSError, StopIteration):
        return 0

def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []

def memfd_pss_kib(pid):
    """PSS of QEMU's guest-RAM memfd in one process."""
    total, inside = 0, False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    inside = "/memfd:memory-backend-memfd" in line
                elif inside and line.startswith("Pss:"):
                    total += int(line.split()[1])
    except OSError:
        pass
    return total

tree = children()
totals, guest_ram, backends = [], [], set()
for shim in shims:
    pids, stack = [], [shim]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(tree.get(pid, []))
    totals.append(sum(pss_kib(p) for p in pids))
    guest_ram.append(sum(memfd_pss_kib(p) for p in pids))
    for p in pids:
        args = cmdline(p)
        if args and os.path.basename(args[0]).startswith("qemu-system"):
            accel = args[args.index("-accel") + 1].split(",")[0] if "-accel" in args else "?"
            backends.add(f"qemu -M microvm, accel {accel}")
if not backends:
    backends.add("built-in VMM in the shim" if runtime.startswith("husk") else "none (host kernel)")
found = len(totals)
avg = lambda values: sum(values) / max(len(values), 1) / 1024
drop = (before - after) / n / 1024
print(f"  {runtime:<10} N={n:<3} pods found {found:<3} backend: {', '.join(sorted(backends))}")
print(f"  {runtime:<10} N={n:<3} PSS per pod {avg(totals):7.1f} MiB (of which guest RAM {avg(guest_ram):6.1f} MiB); "
      f"MemAvailable drop per pod {drop:7.1f} MiB; total PSS {sum(totals) / 1024:8.1f} MiB")
print(f"RESULT {runtime} {n} {avg(totals):.1f} {avg(guest_ram):.1f} {drop:.1f}")
EOF
  if [ "$rt" != runc ]; then churn "$rt" "dens-$rt-1"; fi
  for i in $(seq "$n"); do remove_pod "dens-$rt-$i"; done
  started_ids=()
}

# guest_ram_allocated_mib SHIM: the guest RAM the host holds for a pod:
# the allocated size of its QEMU's memfd (what free page reporting gives
# back shrinks it), in MiB.
guest_ram_allocated_mib() {
  local qemu fd
  qemu=$(pgrep -P "$1" qemu-system || true)
  [ -n "$qemu" ] || { echo "n/a"; return; }
  fd=$(find "/proc/$qemu/fd" -lname '/memfd:memory-backend-memfd*' -printf '%f\n' 2>/dev/null | head -1)
  [ -n "$fd" ] || { echo "n/a"; return; }
  echo $(($(stat -L -c %b "/proc/$qemu/fd/$fd") * 512 / 1048576))
}

# churn RUNTIME ID: what free page reporting is for: 100 MiB written to
# the container's /dev/shm and removed, then 6 s for the guest to report.
churn() {
  local rt=$1 id=$2 shim before during after
  shim=$(shim_of "$id")
  before=$(guest_ram_allocated_mib "$shim")
  ctr task exec --exec-id churn "$id" sh -c 'dd if=/dev/zero of=/dev/shm/churn bs=1M count=100 2>/dev/null; rm /dev/shm/churn'
  during=$(guest_ram_allocated_mib "$shim")
  sleep 6
  after=$(guest_ram_allocated_mib "$shim")
  echo "  $rt  one pod's guest RAM held by the host: idle $before MiB; 100 MiB used and freed in the container: $during MiB, 6 s later $after MiB"
  echo "RESULT-CHURN $rt $after"
}

echo "pod density: N idle busybox pods per runtime (ctr run -d ... sleep), ${settle_s} s settle, PSS of each pod's host processes:"
results=$work/results
: >"$results"
for n in "${counts[@]}"; do
  for rt in "${runtimes[@]}"; do
    measure "$rt" "$n" | tee -a "$results" | grep -v '^RESULT'
  done
done
python3 - "$results" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    if line.startswith("RESULT "):
        _, rt, n, pss, ram, drop = line.split()
        rows[(rt, int(n))] = (float(pss), float(ram), float(drop))
for n in sorted({n for _, n in rows}):
    runc, husk, nofpr = rows.get(("runc", n)), rows.get(("husk", n)), rows.get(("husk-nofpr", n))
    if runc and husk:
        print(f"  N={n}: husk / runc: PSS per pod {husk[0] / runc[0]:.1f}x, MemAvailable drop per pod "
              f"{husk[2] / max(runc[2], 0.1):.1f}x")
    if husk and nofpr:
        print(f"  N={n}: idle pods, without -> with free page reporting: guest RAM PSS per pod "
              f"{nofpr[1]:.1f} -> {husk[1]:.1f} MiB, PSS per pod {nofpr[0]:.1f} -> {husk[0]:.1f} MiB")
churn = {}
for line in open(sys.argv[1]):
    if line.startswith("RESULT-CHURN "):
        _, rt, after = line.split()
        churn[rt] = after
if "husk" in churn and "husk-nofpr" in churn:
    print(f"  after 100 MiB used and freed in one pod: the host holds {churn['husk-nofpr']} MiB of its guest RAM "
          f"without free page reporting, {churn['husk']} MiB with it")
EOF
