#!/usr/bin/env bash
# `make demo` with containerd: a private containerd (its own root, state and
# sockets under a temporary directory; the host's containerd is never used)
# runs the busybox test image through `ctr` with husk's runtime
# (io.containerd.kata.v2), shows the guest kernel beside the host's, the
# shim and VM processes of a running pod, then cleans everything up.
#
# RUNTIME=io.containerd.runc.v2 runs the same demo with Debian's runc shim.
# HUSK_SHIM_DIR names the directory of containerd-shim-kata-v2
# (default target/release); CARGO_TARGET_DIR is honoured for the helper.
set -euo pipefail
cd "$(dirname "$0")/../.."
runtime=${RUNTIME:-io.containerd.kata.v2}

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (containerd, mounts, cgroups)" >&2
  exit 1
fi
if [ "$runtime" = io.containerd.kata.v2 ]; then
  shim=${HUSK_SHIM_DIR:-target/release}/containerd-shim-kata-v2
  if [ ! -x "$shim" ]; then
    echo "demo: $shim is missing: run \`make build\` (or set HUSK_SHIM_DIR)" >&2
    exit 1
  fi
fi

echo "=== building the private-containerd helper (tests/examples/e2e_env.rs)"
cargo build -q --release -p husk-tests --example e2e_env
helper=${CARGO_TARGET_DIR:-target}/release/examples/e2e_env

work=$(mktemp -d /tmp/husk-demo.XXXXXX)
cleanup() {
  local rc=$?
  echo
  echo "=== cleaning up: containers, containerd, mounts, $work"
  if "$helper" down "$work/containerd"; then
    echo "nothing was left behind"
  else
    echo "demo: the clean-up had to force something (listed above)" >&2
    rc=1
  fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

echo "=== starting a private containerd in $work/containerd and importing the busybox image"
eval "$("$helper" up "$work/containerd")"
export CONTAINERD_ADDRESS CONTAINERD_NAMESPACE
echo "containerd pid $HUSK_E2E_CONTAINERD_PID at $CONTAINERD_ADDRESS, namespace $CONTAINERD_NAMESPACE"
ctr images ls

echo
echo "=== ctr run --rm --runtime $runtime $HUSK_E2E_IMAGE demo sh -c '...'"
out=$(ctr run --rm --runtime "$runtime" "$HUSK_E2E_IMAGE" demo \
  sh -c 'echo hello from husk; uname -r; cat /proc/cpuinfo | grep -c processor')
echo "$out"
guest_release=$(sed -n 2p <<<"$out")
echo
echo "container kernel: $guest_release    ($(sed -n 3p <<<"$out") processor(s) seen in the container)"
echo "host kernel:      $(uname -r)"
if [ "$guest_release" = "$(uname -r)" ]; then
  echo "the container shares the host's kernel ($runtime)"
else
  echo "the container runs on its own guest kernel: a microVM"
fi

echo
echo "=== a running pod: ctr run -d, then its shim and VM processes"
ctr run -d --runtime "$runtime" "$HUSK_E2E_IMAGE" demo-bg sleep 1000 >/dev/null
ctr task ls
shims=$(pgrep -d, -f "containerd-shim-.*-address $CONTAINERD_ADDRESS" || true)
if [ -n "$shims" ]; then
  ps -o pid,ppid,rss,etime,args -p "$shims" | cut -c1-200
  vms=$(pgrep -d, -P "$shims" qemu-system || true)
  if [ -n "$vms" ]; then
    echo "VM processes (children of the shim):"
    ps -o pid,ppid,rss,etime,args -p "$vms" | cut -c1-300
  elif [ "$runtime" = io.containerd.kata.v2 ]; then
    echo "no qemu process: the VM runs in the shim itself (built-in VMM)"
  else
    echo "no VM: $runtime runs the container on the host kernel"
  fi
fi
ctr task kill -s SIGKILL demo-bg
for _ in $(seq 100); do
  ctr task ls | grep -q 'demo-bg .*STOPPED' && break
  sleep 0.1
done
ctr task delete demo-bg >/dev/null 2>&1 || true
ctr container rm demo-bg
