# Helpers for guest-tier test scripts, sourced from /test/lib.sh inside the
# guest (busybox sh). Each check prints one console line the host parses:
#   HUSK_CHECK <name> ok
#   HUSK_CHECK <name> FAIL <what the command printed>
# and `value` prints `HUSK_VALUE <key>=<value>` for the host to compare.
# `finish CODE` exits with CODE when every check passed, else with 1.

HUSK_FAILED=0

# check NAME COMMAND...: runs COMMAND and reports whether it succeeded.
check() {
  husk_name=$1
  shift
  if husk_out=$("$@" 2>&1); then
    echo "HUSK_CHECK $husk_name ok"
  else
    echo "HUSK_CHECK $husk_name FAIL $(echo "$husk_out" | tr '\n' ' ' | cut -c1-400)"
    HUSK_FAILED=$((HUSK_FAILED + 1))
  fi
}

# value KEY VALUE: reports a value the host checks.
value() {
  echo "HUSK_VALUE $1=$2"
}

# check_live NAME COMMAND...: like check, but COMMAND's output goes to the
# console as it runs (for commands whose progress lines the host waits for).
check_live() {
  husk_name=$1
  shift
  if "$@"; then
    echo "HUSK_CHECK $husk_name ok"
  else
    echo "HUSK_CHECK $husk_name FAIL exit status $?"
    HUSK_FAILED=$((HUSK_FAILED + 1))
  fi
}

# wait_for PATH SECONDS: waits until PATH exists.
wait_for() {
  husk_tries=$(($2 * 10))
  while [ ! -e "$1" ] && [ "$husk_tries" -gt 0 ]; do
    sleep 0.1
    husk_tries=$((husk_tries - 1))
  done
  [ -e "$1" ]
}

# finish CODE: exits with CODE if every check passed, else with 1.
finish() {
  if [ "$HUSK_FAILED" -eq 0 ]; then
    exit "$1"
  fi
  echo "HUSK_CHECKS_FAILED count=$HUSK_FAILED"
  exit 1
}
