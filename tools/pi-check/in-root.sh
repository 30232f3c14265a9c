#!/usr/bin/env bash
# Runs inside the arm64 root (see run.sh): tests, one end-to-end payment, the quick bench.
#
#   in-root.sh SRC VENV OUT STEP...      STEP: info | tests | e2e | bench
#
# SRC is a copy of the checkout, VENV the venv m2mpay is installed in, OUT a directory for logs
# and one summary line per step (OUT/summary). Every process it starts is stopped before it exits.
set -uo pipefail

src=$1 venv=$2 out=$3; shift 3
py="$venv/bin/python" m2mpay="$venv/bin/m2mpay"
mkdir -p "$out"
pids=()

stop_all() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$p" 2>/dev/null; wait "$p" 2>/dev/null
  done
  pids=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM

say() { printf '%s\n' "$*" | tee -a "$out/summary"; }
elf_machine() {  # the ELF e_machine of a binary: aarch64 or x86_64
  case "$(od -An -tx1 -j18 -N2 "$(readlink -f "$1")" | tr -d ' \n')" in
    b700) echo aarch64 ;; 3e00) echo x86_64 ;; *) echo unknown ;;
  esac
}

step_info() {
  say "info: kernel machine $(uname -m); python $("$py" -c 'import platform,sys; print(platform.python_version(), platform.machine(), sys.implementation.cache_tag)'); python binary $(elf_machine "$venv/bin/python"), mosquitto binary $(elf_machine /usr/sbin/mosquitto) ($(/usr/sbin/mosquitto -h 2>/dev/null | head -1 | sed 's/ is an MQTT.*//'))"
  # Every compiled module the wheels brought, by the machine it is built for.
  say "info: compiled modules in the venv: $("$py" - "$venv" <<'PY'
import collections, pathlib, sys
names = {0xB7: "aarch64", 0x3E: "x86_64"}
seen = collections.Counter()
for path in pathlib.Path(sys.argv[1]).rglob("*.so*"):
    if path.is_file() and not path.is_symlink():
        head = path.read_bytes()[:20]
        if head[:4] == b"\x7fELF":
            seen[names.get(int.from_bytes(head[18:20], "little"), "other")] += 1
print(", ".join(f"{n} {m}" for m, n in sorted(seen.items())) or "none")
PY
)"
}

step_tests() {
  # The suite minus what needs servers (marker 'network': Mosquitto, CoAP, PostgreSQL) and the
  # long fault runs ('heavy'). Collection errors are reported, not fatal, so one broken file
  # does not hide the rest.
  local t0=$SECONDS rc
  (cd "$src" && timeout -k 30 "${PI_TEST_TIMEOUT:-3600}" "$py" -m pytest -m "not network and not heavy" -v --durations=15 -p no:cacheprovider \
      --continue-on-collection-errors -o addopts="-ra --strict-markers" tests) >"$out/tests.log" 2>&1
  rc=$?
  [ "$rc" = 124 ] && say "tests: stopped after ${PI_TEST_TIMEOUT:-3600} s in $(grep -E '^tests/' "$out/tests.log" | tail -1 | cut -d' ' -f1)"
  say "tests: $(grep -E '^(=+ )?[0-9]+ (passed|failed|error)|no tests ran' "$out/tests.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//') (pytest exit $rc, $((SECONDS - t0)) s)"
  grep -E '^(FAILED|ERROR) ' "$out/tests.log" | sed 's/^/  /' | tee -a "$out/summary"
  [ "$rc" = 0 ]
}

wait_for() {  # wait_for SECONDS COMMAND...: until the command succeeds
  local limit=$1; shift
  local end=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || return 1
    sleep 1
  done
}

step_e2e() {
  # One payment through the CLI, every process an arm64 one: Mosquitto, the bank, the vendor, the user.
  local t0=$SECONDS w="$out/e2e" ports mqtt coap before after
  rm -rf "$w"; mkdir -p "$w"
  ports=$(cd "$src" && "$py" -c 'from broker.launcher import free_port, free_udp_port; print(free_port(), free_udp_port())')
  mqtt="mqtt://127.0.0.1:${ports% *}" coap=${ports#* }
  e2e_fail() { say "e2e: FAILED at $1 ($((SECONDS - t0)) s; logs in e2e/)"; stop_all; return 1; }

  "$m2mpay" broker run --data "$w/broker" --port "${ports% *}" >"$w/broker.log" 2>&1 & pids+=($!)
  wait_for 60 "$py" -c "import socket; socket.create_connection(('127.0.0.1', ${ports% *}), 1)" || { e2e_fail "broker run"; return; }
  "$m2mpay" bank init --data "$w/bank" --bank bank-a >"$w/cli.log" 2>&1 || { e2e_fail "bank init"; return; }
  "$m2mpay" bank serve --data "$w/bank" --broker "$mqtt" >"$w/bank.log" 2>&1 & pids+=($!)
  { "$m2mpay" bank account open --data "$w/bank" alice --out "$w/alice.json" &&
    "$m2mpay" bank account deposit --data "$w/bank" alice 10000 &&
    "$m2mpay" bank vendor enroll --data "$w/bank" meter-1 --category parking --out "$w/meter-1.json"
  } >>"$w/cli.log" 2>&1 || { e2e_fail "account open/deposit, vendor enroll"; return; }
  # The example parking meter, metering a unit every 0.2 s instead of every minute.
  sed 's/^meter_interval = .*/meter_interval = 0.2/' "$src/deploy/examples/vendor.toml" >"$w/vendor.toml"
  "$m2mpay" vendor serve --credentials "$w/meter-1.json" --broker "$mqtt" --coap-port "$coap" \
      --config "$w/vendor.toml" --data "$w/meter-1" >"$w/vendor.log" 2>&1 & pids+=($!)
  "$m2mpay" user withdraw --wallet "$w/alice" --credentials "$w/alice.json" --broker "$mqtt" --coins 2 \
      >"$w/withdraw.log" 2>&1 || { e2e_fail "user withdraw"; return; }
  wait_for 90 bash -c "! \"$py\" -c \"import socket; socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).bind(('::1', $coap))\"" ||
      { e2e_fail "vendor serve (its CoAP port never opened)"; return; }
  "$m2mpay" user pay --wallet "$w/alice" "coap://[::1]:$coap" --units 10 >"$w/pay.log" 2>&1 || { e2e_fail "user pay"; return; }
  # The vendor settles when the session closes; wait for the credit to reach the books.
  wait_for 60 bash -c "\"$m2mpay\" bank balance --data \"$w/bank\" meter-1 | grep -qvx 0"
  "$m2mpay" bank balance --data "$w/bank" meter-1 >"$w/balance.log" 2>&1
  "$m2mpay" vendor status --data "$w/meter-1" >"$w/status.log" 2>&1
  stop_all
  "$m2mpay" bank audit --data "$w/bank" >"$w/audit.log" 2>&1 || { e2e_fail "bank audit"; return; }
  say "e2e: payment done ($((SECONDS - t0)) s): pay: $(tail -1 "$w/pay.log"); vendor balance: $(tail -1 "$w/balance.log"); audit: $(tail -1 "$w/audit.log")"
}

step_bench() {
  local t0=$SECONDS rc
  (cd "$out" && "$m2mpay" bench --quick --pg '' --json "$out/bench.json") >"$out/bench.log" 2>&1
  rc=$?
  say "bench: m2mpay bench --quick exit $rc ($((SECONDS - t0)) s)"
  cat "$out/bench.log" >>"$out/summary"
}

status=0
for step in "$@"; do
  "step_$step" || status=1
done
exit $status
