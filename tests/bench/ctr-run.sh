#!/usr/bin/env bash
# `make bench`: containerd figures, husk beside runc in the same run, with a
# private containerd (tests/examples/e2e_env.rs; the host's containerd is
# never used):
#  - wall time of `ctr run --rm <image> bench-N /bin/true`, RUNS (default
#    10) runs per runtime, interleaved after one warm-up run each: median,
#    and husk's median over runc's;
#  - per-pod host memory while a `ctr run -d` container sleeps: the shim's
#    RSS and PSS, plus the PSS of any qemu process whose parent is the shim
#    minus the PSS of its guest-RAM mapping (the memfd the size of the
#    guest's memory), so guest memory is excluded; with the hypervisor
#    backend and accelerator read from the qemu command line.
# Figures only: nothing here passes or fails on a number.
#
# HUSK_BENCH_RUNTIMES="runc husk" (default) selects the runtimes; while the
# shim is not built, HUSK_BENCH_RUNTIMES=runc measures the peer alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${RUNS:-10}
read -r -a runtimes <<<"${HUSK_BENCH_RUNTIMES:-runc husk husk-noseccomp}"

type_of() { case $1 in runc) echo io.containerd.runc.v2 ;; husk | husk-noseccomp) echo io.containerd.kata.v2 ;;
  *) echo "ctr-run bench: unknown runtime $1 (runc, husk or husk-noseccomp)" >&2; exit 1 ;; esac; }
# Extra ctr flags of a runtime: husk-noseccomp is husk with
# confinement.seccomp = false (no thread filters, no QEMU -sandbox), the
# cost of the filters measured in the same run.
flags_of() { case $1 in husk-noseccomp) echo "--runtime-config-path $work/noseccomp.toml" ;; esac; }
for rt in "${runtimes[@]}"; do type_of "$rt" >/dev/null; done
if [[ " ${runtimes[*]} " == *" husk"* ]]; then
  shim=${HUSK_SHIM_DIR:-target/release}/containerd-shim-kata-v2
  [ -x "$shim" ] || { echo "ctr-run bench: $shim is missing (make build), or HUSK_BENCH_RUNTIMES=runc" >&2; exit 1; }
fi

cargo build -q --release -p husk-tests --example e2e_env
helper=${CARGO_TARGET_DIR:-target}/release/examples/e2e_env
work=$(mktemp -d /tmp/husk-bench-ctr.XXXXXX)
trap '"$helper" down "$work/containerd" || echo "ctr-run bench: the clean-up had to force something" >&2; rm -rf "$work"' EXIT
eval "$("$helper" up "$work/containerd")"
export CONTAINERD_ADDRESS CONTAINERD_NAMESPACE
image=$HUSK_E2E_IMAGE
sed 's/^seccomp = true/seccomp = false/' "$HUSK_E2E_HUSK_CONFIG" >"$work/noseccomp.toml"
grep -q '^seccomp = false' "$work/noseccomp.toml" || { echo "ctr-run bench: no 'seccomp = true' line in $HUSK_E2E_HUSK_CONFIG" >&2; exit 1; }

# run_ms RUNTIME ID: wall time of one `ctr run --rm ... /bin/true`, in ms.
run_ms() {
  local start end
  start=$(date +%s%N)
  # shellcheck disable=SC2046 # flags_of prints whole words
  if ! ctr run --rm --runtime "$(type_of "$1")" $(flags_of "$1") "$image" "$2" /bin/true >/dev/null 2>"$work/err"; then
    echo "ctr-run bench: ctr run --runtime $(type_of "$1") failed: $(cat "$work/err")" >&2
    return 1
  fi
  end=$(date +%s%N)
  echo $(((end - start) / 1000))
}
median() { sort -n | awk '{v[NR]=$1} END {if (NR%2) m=v[(NR+1)/2]; else m=(v[NR/2]+v[NR/2+1])/2; printf "%.1f", m/1000}'; }

declare -A times
for rt in "${runtimes[@]}"; do run_ms "$rt" "warm-$rt" >/dev/null; times[$rt]=""; done
for i in $(seq "$runs"); do
  for rt in "${runtimes[@]}"; do
    times[$rt]+="$(run_ms "$rt" "bench-$rt-$i") "
  done
done
declare -A medians
echo "ctr run --rm /bin/true, $runs runs per runtime, interleaved (wall time of ctr, milliseconds):"
for rt in "${runtimes[@]}"; do
  medians[$rt]=$(tr ' ' '\n' <<<"${times[$rt]}" | grep . | median)
  printf '  %-14s %-22s median %8s ms   (runs: %s)\n' "$rt" "$(type_of "$rt")" "${medians[$rt]}" \
    "$(tr ' ' '\n' <<<"${times[$rt]}" | grep . | awk '{printf "%s%.0f", (NR>1?" ":""), $1/1000}')"
done
if [ -n "${medians[husk]:-}" ] && [ -n "${medians[runc]:-}" ]; then
  awk -v h="${medians[husk]}" -v r="${medians[runc]}" 'BEGIN {printf "  husk / runc: %.2f\n", h/r}'
fi
if [ -n "${medians[husk]:-}" ] && [ -n "${medians[husk-noseccomp]:-}" ]; then
  awk -v h="${medians[husk]}" -v n="${medians[husk-noseccomp]}" \
    'BEGIN {printf "  husk (seccomp on) / husk-noseccomp: %.3f  (the filters cost %+.1f ms per run)\n", h/n, h-n}'
fi

# Where husk's start went: the shim logs its boot phases once per pod
# (shim/src/boot_phases.rs); the medians over the timed husk runs.
if [[ " ${runtimes[*]} " == *" husk "* ]]; then
  echo "where a husk pod's start goes (the shim's boot phases, median over the timed husk runs, ms):"
  grep 'boot phases' "$HUSK_E2E_CONTAINERD_LOG" | grep -E 'sandbox_id="?bench-husk-' | python3 -c '
import re, statistics, sys
phases = ["vm_start", "guest_kernel", "agent_ready", "sandbox_create", "first_container_start", "total"]
values = {p: [] for p in phases}
for line in sys.stdin:
    for p in phases:
        m = re.search(rf"\b{p}_ms=(-?\d+)", line)
        if m and int(m.group(1)) >= 0:
            values[p].append(int(m.group(1)))
notes = {"guest_kernel": "(part of agent_ready: the guest kernel to init, as the guest tells it)",
         "total": "(VMM made to first container started; ctr, containerd and teardown are the rest)"}
for p in phases:
    if values[p]:
        print(f"  {p:<22} {statistics.median(values[p]):7.0f}  {notes.get(p, str())}")
    else:
        print(f"  {p:<22}     n/a  (no boot phases line found in the log)")
'
fi

# remove_detached ID: kills, deletes and removes a `ctr run -d` container.
remove_detached() {
  ctr task kill -s SIGKILL "$1" >/dev/null 2>&1 || true
  for _ in $(seq 100); do ctr task ls | grep -q "^$1 .*STOPPED" && break; sleep 0.1; done
  ctr task delete "$1" >/dev/null 2>&1 || true
  ctr container rm "$1" >/dev/null 2>&1 || true
}

# pod_memory RUNTIME: memory figures of one running pod.
pod_memory() {
  local rt=$1 id="mem-$1" shim_pid
  ctr run -d --runtime "$(type_of "$rt")" "$image" "$id" sleep 1000 >/dev/null
  for _ in $(seq 100); do ctr task ls | grep -q "^$id .*RUNNING" && break; sleep 0.1; done
  sleep 1
  shim_pid=$(for pid in $(pgrep -f "containerd-shim-.*$CONTAINERD_ADDRESS" || true); do
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "-id $id " && echo "$pid"; done | head -1)
  if [ -z "$shim_pid" ]; then
    echo "  $rt: no shim process found for $id" >&2
  else
    # The pod's memory size in the test configuration, for the built-in VMM.
    config_mib=$(sed -n 's/^default_memory_mib *= *\([0-9]*\).*/\1/p' "$HUSK_E2E_HUSK_CONFIG")
    python3 - "$rt" "$shim_pid" "${config_mib:-0}" <<'EOF'
import os, re, sys

runtime, shim, config_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def rollup(pid):
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields

def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]

def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                    found.append(int(entry))
            except OSError:
                pass
    return found

def guest_ram_kib(args):
    """The guest's memory from -object memory-backend-*,size= or -m."""
    for arg in args:
        m = re.search(r"memory-backend-[a-z]+,.*size=(\d+)([KMG]?)", arg)
        if m:
            return int(m.group(1)) * {"": 1 / 1024, "K": 1, "M": 1024, "G": 1 << 20}[m.group(2)]
    if "-m" in args:
        m = re.match(r"(\d+)([MG]?)", args[args.index("-m") + 1])
        if m:
            return int(m.group(1)) * (1 << 20 if m.group(2) == "G" else 1024)
    return None

def mappings(pid):
    """Each mapping of a process: name, (device, inode), Size and Pss in KiB."""
    found, current = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                current = {"name": head[5] if len(head) > 5 else "[anon]",
                           "file": (head[3], head[4]), "Size": 0, "Pss": 0}
                found.append(current)
            elif current is not None and head and head[0] in ("Size:", "Pss:"):
                current[head[0].rstrip(":")] = int(head[1])
    return found

def guest_ram_mapping(pid, size_kib):
    """The mapping that is the guest's RAM: a memfd (or anonymous mapping)
    whose size is the guest memory size; the one with the most Pss."""
    candidates = [m for m in mappings(pid) if m["Size"] == size_kib
                  and (m["name"].startswith("/memfd:") or m["name"] == "[anon]")]
    return max(candidates, key=lambda m: m["Pss"], default=None)

def pss_of_file(pid, file):
    """Pss of every mapping of one file (a memfd) in a process; vhost-user
    back-ends map the guest RAM in several regions."""
    return sum(m["Pss"] for m in mappings(pid) if m["file"] == file)

shim_roll = rollup(shim)
shim_args = cmdline(shim)
with open(f"/proc/{shim}/status") as f:
    rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
vms = [p for p in children(shim) if os.path.basename(cmdline(p)[0]).startswith("qemu-system")]
# The guest's RAM: QEMU's memory backend size, else the configured size
# (the built-in VMM maps it in the shim). The shim maps QEMU's memfd too
# (vhost-user), so its share of the guest RAM is subtracted as well.
size_kib = None
for vm in vms:
    size_kib = guest_ram_kib(cmdline(vm)) or size_kib
if size_kib is None and runtime == "husk" and config_mib:
    size_kib = config_mib * 1024
vm_ram = [guest_ram_mapping(vm, size_kib) for vm in vms] if size_kib else []
vm_ram = [m for m in vm_ram if m]
if vm_ram:
    # QEMU's memfd, as the shim's vhost-user device servers map it.
    shim_ram_name = vm_ram[0]["name"]
    shim_ram_pss = sum(pss_of_file(shim, m["file"]) for m in vm_ram)
else:
    shim_ram = guest_ram_mapping(shim, size_kib) if size_kib else None
    shim_ram_name = shim_ram["name"] if shim_ram else None
    shim_ram_pss = shim_ram["Pss"] if shim_ram else 0
total = shim_roll.get("Pss", 0) - shim_ram_pss
print(f"  {runtime}: shim pid {shim} ({os.path.basename(shim_args[0])}): RSS {rss / 1024:.1f} MiB, "
      f"PSS {shim_roll.get('Pss', 0) / 1024:.1f} MiB"
      + (f", of which guest RAM ({shim_ram_name}) {shim_ram_pss / 1024:.1f} MiB" if shim_ram_name else ""))
backend = None
for vm in vms:
    args = cmdline(vm)
    accel = args[args.index("-accel") + 1] if "-accel" in args else "unknown"
    machine = args[args.index("-M") + 1].split(",")[0] if "-M" in args else "?"
    backend = f"qemu ({os.path.basename(args[0])} -M {machine}, accel {accel})"
    roll = rollup(vm)
    ram = guest_ram_mapping(vm, size_kib) if size_kib else None
    ram_pss = ram["Pss"] if ram else 0
    vm_pss = roll.get("Pss", 0) - ram_pss
    total += vm_pss
    where = f"{ram['name']} {ram['Size'] / 1024:.0f} MiB" if ram else "not found: nothing subtracted"
    print(f"  {runtime}: qemu pid {vm}: PSS {roll.get('Pss', 0) / 1024:.1f} MiB, guest RAM mapping "
          f"({where}) PSS {ram_pss / 1024:.1f} MiB, VMM overhead {vm_pss / 1024:.1f} MiB")
if backend is None:
    if runtime == "husk":
        backend = "built-in VMM inside the shim (KVM)"
    else:
        backend = "none: runc runs the container on the host kernel (the container's own processes are not counted)"
print(f"  {runtime}: hypervisor: {backend}")
print(f"  {runtime}: host memory per pod, guest RAM excluded: {total / 1024:.1f} MiB PSS")
EOF
  fi
  remove_detached "$id"
}

echo
echo "host memory per pod while a ctr run -d container sleeps:"
for rt in "${runtimes[@]}"; do [ "$rt" = husk-noseccomp ] || pod_memory "$rt"; done
if [[ " ${runtimes[*]} " == *" husk "* ]]; then
  echo "  husk's shim log lines about the VM (containerd's log):"
  grep -iE 'hypervisor|accel|backend' "$HUSK_E2E_CONTAINERD_LOG" | tail -n 3 | cut -c1-240 | sed 's/^/    /' || true
fi

# throughput RUNTIME: stdio (husk: vsock) and root-filesystem (husk:
# virtio-fs) throughput of one running container, by `ctr task exec`; each
# figure is 64 MiB / (median of 3 execs - median of 3 execs of `true`), so
# the exec's own start is not counted.
#  - stdio: 64 MiB of zeros written to the exec's stdout, counted on the host;
#  - fs write: 64 MiB written to the container's root with conv=fsync;
#  - fs read: that file read back with iflag=direct (not from the guest's
#    page cache).
throughput() {
  local rt=$1 id="tput-$1" i
  # shellcheck disable=SC2046 # flags_of prints whole words
  ctr run -d --runtime "$(type_of "$rt")" $(flags_of "$rt") "$image" "$id" sleep 1000 >/dev/null
  for _ in $(seq 100); do ctr task ls | grep -q "^$id .*RUNNING" && break; sleep 0.1; done
  exec_ms() {
    local start end
    start=$(date +%s%N)
    ctr task exec --exec-id "x$RANDOM$RANDOM" "$id" sh -c "$1" | wc -c >"$work/bytes"
    end=$(date +%s%N)
    echo $(((end - start) / 1000000))
  }
  median3() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
  rate() { awk -v e="$1" -v f="$2" 'BEGIN { if (f > e) printf "%.1f MiB/s", 64000 / (f - e); else printf "n/a" }'; }
  local empty=() stdio=() write=() read=() bytes
  for i in 1 2 3; do
    empty+=("$(exec_ms true)")
    stdio+=("$(exec_ms 'dd if=/dev/zero bs=1048576 count=64 2>/dev/null')")
    bytes=$(cat "$work/bytes")
    write+=("$(exec_ms 'dd if=/dev/zero of=/bench.img bs=1048576 count=64 conv=fsync 2>/dev/null')")
    read+=("$(exec_ms 'dd if=/bench.img of=/dev/null bs=1048576 iflag=direct 2>/dev/null')")
  done
  local e s w r
  e=$(median3 "${empty[@]}") s=$(median3 "${stdio[@]}") w=$(median3 "${write[@]}") r=$(median3 "${read[@]}")
  if [ "$bytes" != 67108864 ]; then
    echo "  $rt: stdio: the host counted $bytes bytes, not 67108864" >&2
  fi
  echo "  $rt: empty exec $e ms; stdio $(rate "$e" "$s") ($s ms); rootfs write $(rate "$e" "$w") ($w ms); rootfs read, direct $(rate "$e" "$r") ($r ms)"
  remove_detached "$id"
}

echo
echo "throughput of one container (stdio; root file system), husk with and without seccomp beside runc:"
for rt in "${runtimes[@]}"; do throughput "$rt"; done
