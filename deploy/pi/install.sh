#!/usr/bin/env bash
# Install an m2mpay role on a Raspberry Pi OS / Debian machine. Safe to re-run.
#
#   sudo deploy/pi/install.sh --role bank|vendor|user [--dry-run] [--start]
#
# - a venv under /opt/m2mpay with the package from this checkout (upgraded on re-run);
# - /etc/m2mpay with the role's example configuration (never overwrites an existing one);
# - the hardened systemd unit, enabled (started only with --start);
# - for the bank: Mosquitto, and a bank created in its state directory if there is none.
# --dry-run prints every command instead of running it and changes nothing.
set -euo pipefail

role="" dry=0 start=0
while [ $# -gt 0 ]; do
  case "$1" in
    --role) role="${2:-}"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --start) start=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
case "$role" in bank|vendor|user) ;; *) echo "--role must be bank, vendor or user" >&2; exit 2 ;; esac

here="$(cd "$(dirname "$0")/../.." && pwd)"
prefix=/opt/m2mpay
etc=/etc/m2mpay
unit="m2mpay-$role.service"

run() {  # run a command, or print it under --dry-run
  if [ "$dry" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi
}

if [ "$dry" = 0 ] && [ "$(id -u)" != 0 ]; then
  echo "run as root (or with --dry-run to see the plan)" >&2; exit 1
fi

packages=""
python3 -c 'import ensurepip, venv' 2>/dev/null || packages="$packages python3-venv"
if [ "$role" = bank ] && ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  packages="$packages mosquitto"
fi
if [ -n "$packages" ]; then
  run env DEBIAN_FRONTEND=noninteractive apt-get install -y $packages
fi

[ -x "$prefix/venv/bin/python" ] || run python3 -m venv "$prefix/venv"
run "$prefix/venv/bin/python" -m pip install --quiet --upgrade "$here"
run install -d -m 0750 "$etc"

case "$role" in
  vendor) [ -e "$etc/vendor.toml" ] || run install -m 0640 "$here/deploy/examples/vendor.toml" "$etc/vendor.toml"
          [ -e "$etc/vendor.json" ] || echo "note: put the bundle from 'm2mpay bank vendor enroll' at $etc/vendor.json (mode 0600)" ;;
  user)   [ -e "$etc/user.toml" ] || run install -m 0640 "$here/deploy/examples/user.toml" "$etc/user.toml"
          [ -e "$etc/user.json" ] || echo "note: put the credentials from 'm2mpay bank account open' at $etc/user.json (mode 0600)" ;;
  bank)   if [ ! -e /var/lib/private/m2mpay/bank/bank.json ] && [ ! -e /var/lib/m2mpay/bank/bank.json ]; then
            run install -d -m 0700 /var/lib/private/m2mpay/bank
            run "$prefix/venv/bin/m2mpay" bank init --data /var/lib/private/m2mpay/bank --bank bank
          fi ;;
esac

run install -m 0644 "$here/deploy/systemd/$unit" "/etc/systemd/system/$unit"
run systemctl daemon-reload
run systemctl enable "$unit"
if [ "$start" = 1 ]; then
  run systemctl restart "$unit"
fi
echo "m2mpay $role installed$([ "$dry" = 1 ] && echo ' (dry run: nothing changed)')"
