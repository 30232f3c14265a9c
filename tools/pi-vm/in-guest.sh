#!/bin/bash
# Runs once at boot inside the virtual Pi (m2mpay-vm-check.service, see build.sh): installs the
# three roles with deploy/pi/install.sh as an operator would, starts the units and checks them.
#
#   in-guest.sh SRC WHEEL WHEELHOUSE OUT
#
# SRC is the checkout (owned by an ordinary user), WHEEL the m2mpay wheel and WHEELHOUSE the
# aarch64 wheels of deploy/pi/requirements.txt, both fetched on the host (the guest has no
# network). One line per check goes to OUT/summary and to the console; the last console line is
# "PI-VM RESULT: PASS" or "PI-VM RESULT: FAIL". The machine powers off afterwards.
set -uo pipefail

src=$1 wheel=$2 wheelhouse=$3 out=$4
mkdir -p "$out"
: >"$out/summary"
t0=$SECONDS failed=0
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

say() { printf 'PI-VM %4ds %s\n' $((SECONDS - t0)) "$*" | tee -a "$out/summary" >/dev/console; }
ok() { say "ok    $*"; }
bad() { say "FAIL  $*"; failed=1; }
wait_for() {  # wait_for SECONDS COMMAND...: until the command succeeds
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do [ $SECONDS -lt $end ] || return 1; sleep 2; done
}
units="m2mpay-bank m2mpay-vendor m2mpay-user"
balance() { m2mpay-bank balance "$1" 2>/dev/null | tail -1 | tr -dc '0-9-'; }
grew() { local now; now=$(balance "$1"); [ -n "$now" ] && [ "$now" -gt "$2" ]; }
all_active() { local u; for u in $units; do systemctl is-active --quiet "$u" || return 1; done; }
dump_logs() {
  local u
  for u in mosquitto $units; do
    journalctl -b -u "$u" --no-pager -o short-monotonic >"$out/$u.log" 2>&1
  done
}
finish() {
  trap - EXIT
  dump_logs
  say "logs: journalctl -u m2mpay-* in $out"
  if [ "$failed" = 0 ]; then say "RESULT: PASS ($((SECONDS - t0)) s)"; else say "RESULT: FAIL ($((SECONDS - t0)) s)"; fi
  sync
  systemctl poweroff --no-block
  exit 0
}
trap finish EXIT

say "booted: $(uname -srm), systemd $(systemctl --version | head -1 | cut -d' ' -f2), PID 1 $(cat /proc/1/comm), $(nproc) cpus, python $(python3 -V | cut -d' ' -f2), $(mosquitto -h 2>/dev/null | head -1 | cut -d' ' -f1-3)"
say "up $(cut -d" " -f1 /proc/uptime) s since the kernel started (multi-user.target reached)"

# --- 1. install the roles, as in docs/OPERATOR.md and docs/DEVICE.md
install_role() {  # install_role ROLE OPTION...: sudo deploy/pi/install.sh --role ROLE --wheelhouse … OPTION...
  local role=$1; shift
  local t=$SECONDS
  if "$src/deploy/pi/install.sh" --role "$role" --wheelhouse "$wheelhouse" "$@" \
      >"$out/install-$role.log" 2>&1; then
    ok "install.sh --role $role ($((SECONDS - t)) s): $(tail -1 "$out/install-$role.log")"
  else
    bad "install.sh --role $role exited $? (install-$role.log): $(tail -1 "$out/install-$role.log")"
    return 1
  fi
}
# The plan first, as the checkout's owner (docs/OPERATOR.md), then the bank with the wheel built
# from the checkout by its owner (the default), the devices with the wheel given (--wheel).
if runuser -u pi -- "$src/deploy/pi/install.sh" --role bank --dry-run >"$out/dry-run-bank.log" 2>&1; then
  ok "install.sh --role bank --dry-run as pi: $(grep -c '^[+?] ' "$out/dry-run-bank.log") steps planned"
else
  bad "install.sh --role bank --dry-run as pi (dry-run-bank.log): $(tail -1 "$out/dry-run-bank.log")"
fi
install_role bank --start || exit 1
wait_for 120 systemctl is-active --quiet m2mpay-bank && systemctl is-active --quiet mosquitto ||
  bad "bank or mosquitto not active after install: $(systemctl is-active mosquitto m2mpay-bank | tr '\n' ' ')"

# The operator's part: an account and a vendor at the bank, their broker logins. The bundles hold
# private keys: a private directory, not the logs copied out of the image.
creds=$(mktemp -d)
{
  m2mpay-bank account open alice --out "$creds/alice.json" &&
  m2mpay-bank account deposit alice 10000 &&
  m2mpay-bank vendor enroll meter-1 --category parking --out "$creds/meter-1.json" &&
  m2mpay broker pki --dir /etc/m2mpay/pki --client meter-1 --client alice
} >"$out/provision.log" 2>&1 || { bad "provisioning the account and the vendor (provision.log)"; exit 1; }
ok "account alice (10000), vendor meter-1 enrolled, broker logins issued"

install_role vendor --wheel "$wheel" || exit 1
install_role user --wheel "$wheel" || exit 1
# This one machine is both devices: each gets its bundle and its broker login in /etc/m2mpay.
install -m 0600 "$creds/meter-1.json" /etc/m2mpay/vendor.json
install -m 0600 "$creds/alice.json" /etc/m2mpay/user.json
for f in ca.crt meter-1.crt meter-1.key alice.crt alice.key; do
  install -m 0600 "/etc/m2mpay/pki/$f" "/etc/m2mpay/tls/$f"
done
sed -i 's|^M2MPAY_BROKER=.*|M2MPAY_BROKER=mqtts://localhost:8883|' /etc/m2mpay/vendor.env
# The example meter, metering every 0.5 s instead of every minute.
sed -i 's/^meter_interval = .*/meter_interval = 0.5/' /etc/m2mpay/vendor.toml
sed -i -e 's|^broker = .*|broker = "mqtts://localhost:8883"|' \
       -e 's|^vendors = .*|vendors = ["coap://[::1]:5683"]|' \
       -e 's|^interval = .*|interval = 5.0|' /etc/m2mpay/user.toml
systemctl start m2mpay-vendor m2mpay-user

# --- 2. all three active, a withdrawal and a payment over TLS
if wait_for 180 all_active; then
  ok "active: $(systemctl is-active $units | tr '\n' ' ')"
else
  bad "not all active: $(systemctl is-active $units | tr '\n' ' ')"
fi
t=$SECONDS
if wait_for 600 grew meter-1 0; then
  ok "withdrawal and payment end to end over TLS ($((SECONDS - t)) s): alice $(balance alice) (from 10000), meter-1 $(balance meter-1)"
else
  bad "no payment reached the bank within 600 s: alice $(balance alice), meter-1 $(balance meter-1)"
fi
say "broker: $(grep -E '^(listener|require_certificate|crlfile|tls_version) ' /etc/mosquitto/conf.d/m2mpay.conf | tr '\n' ';')"
ss -ltnup >"$out/sockets.log" 2>&1 || true
if grep -q ':1883 ' "$out/sockets.log"; then bad "something listens on 1883 (sockets.log)"; fi

# --- 3. keyset rotation (docs/OPERATOR.md, "Keyset rotation")
keysets() { m2mpay-bank keys --json | python3 -c 'import json,sys; d=json.load(sys.stdin); ks=d.get("keysets", d); print(" ".join(sorted(k if isinstance(k, str) else k.get("id", "?") for k in ks)))'; }
before=$(keysets 2>"$out/rotation.log")
{
  m2mpay-bank keyset add --value 500 --tokens 500 --valid-days 365 &&
  old=$(m2mpay-bank keys --json | python3 -c '
import json, sys
d = json.load(sys.stdin)
ks = d["keysets"]
items = ks.items() if isinstance(ks, dict) else [(k["id"], k) for k in ks]
# the 1000-token set made by bank init (the wallet refills with the cheapest coins: the 100s)
print(next(i for i, k in items if k.get("n") == 1000 and not k.get("retired")))') &&
  echo "retiring $old" && m2mpay-bank keyset retire "$old" &&
  systemctl restart m2mpay-bank
} >>"$out/rotation.log" 2>&1
rc=$?
after=$(keysets 2>>"$out/rotation.log")
m2mpay-bank keys --json >"$out/keys-after.json" 2>&1
if [ $rc = 0 ] && wait_for 120 systemctl is-active --quiet m2mpay-bank; then
  paid=$(balance meter-1)
  if wait_for 600 grew meter-1 "$paid"; then
    ok "keyset rotation: add 500x500, retire the 1000-token set, restart; keysets [$before] -> [$after]; payments go on (meter-1 $paid -> $(balance meter-1))"
  else
    bad "after the keyset rotation no payment within 600 s (meter-1 $paid; rotation.log)"
  fi
else
  bad "keyset rotation (rotation.log: $(tail -1 "$out/rotation.log"))"
fi
m2mpay-bank audit >"$out/audit.log" 2>&1 && ok "bank audit: $(tail -1 "$out/audit.log")" ||
  bad "bank audit: $(tail -1 "$out/audit.log")"

# --- 4. each service restarted, still serving
for u in $units; do
  pid=$(systemctl show -p MainPID --value "$u")
  systemctl restart "$u"
  if wait_for 120 systemctl is-active --quiet "$u" && [ "$(systemctl show -p MainPID --value "$u")" != "$pid" ]; then
    paid=$(balance meter-1)
    if wait_for 600 grew meter-1 "$paid"; then
      ok "$u restarted (pid $pid -> $(systemctl show -p MainPID --value "$u")), payments go on (meter-1 $paid -> $(balance meter-1))"
    else
      bad "$u restarted but no payment within 600 s (meter-1 $paid)"
    fi
  else
    bad "$u did not come back: $(systemctl is-active "$u")"
  fi
done
all_active && ok "active after the restarts: $(systemctl is-active $units | tr '\n' ' ')" ||
  bad "not all active at the end: $(systemctl is-active $units | tr '\n' ' ')"

# --- 5. systemd-analyze security
for u in $units; do
  systemd-analyze security --no-pager "$u.service" >"$out/security-$u.log" 2>&1
  say "security $u.service: $(grep -E 'Overall exposure level' "$out/security-$u.log" | sed 's/.*: //; s/\x1b\[[0-9;]*m//g')"
done
