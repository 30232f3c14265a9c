#!/usr/bin/env bash
# Install an m2mpay role on Raspberry Pi OS (64-bit) or Debian 12. Safe to re-run.
#
#   sudo deploy/pi/install.sh --role bank|vendor|user [--wheel FILE] [--wheelhouse DIR]
#        [--bank-id ID] [--server-name NAME]... [--root DIR] [--dry-run] [--start]
#
#  1. the package: --wheel FILE, or a wheel built from this checkout by the checkout's owner (never
#     by root), with the build tools pinned in deploy/pi/build-requirements.txt;
#  2. /opt/m2mpay/venv: exactly the dependencies of deploy/pi/requirements.txt (versions pinned,
#     hashes checked, wheels only), then the wheel by its hash; the wheel stays in /opt/m2mpay/dist,
#     the command is linked from /usr/local/bin/m2mpay;
#  3. /etc/m2mpay (0755): the role's example configuration (0644) and environment file (0600),
#     never overwriting yours; secrets stay 0600 root and reach the services as credentials;
#  4. bank: /var/lib/private 0700 (systemd refuses it otherwise), a bank in its state directory if
#     there is none, the broker's PKI in /etc/m2mpay/pki (the bank's logins copied to
#     /etc/m2mpay/bank-tls, without the CA's key, on every run), Mosquitto configured by the drop-in
#     /etc/mosquitto/conf.d/m2mpay.conf (TLS with client certificates, CRL, ACL; written once, then
#     yours), and m2mpay-bank, which runs admin commands so that the bank's files stay the bank's;
#  5. the hardened systemd unit, enabled (started with --start).
# --wheelhouse DIR takes every package from DIR instead of the package index (offline installs).
# --root DIR installs below DIR as if it were / (tests): no packages, no service is touched.
# --dry-run prints each command instead of running it; run by a user who cannot see some files,
# it marks the steps that depend on them with '?'.
set -euo pipefail
umask 022

usage_end=22
die() { echo "install.sh: $*" >&2; exit 2; }   # a mistake on the command line
fail() { echo "install.sh: $*" >&2; exit 1; }  # something on this machine stops the install
value() { [ $# -ge 2 ] && [ -n "$2" ] || die "$1 needs a value"; }

role="" wheel="" wheelhouse="" bank_id="" root="" dry=0 start=0 server_names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --role) value "$@"; role=$2; shift 2 ;;
    --wheel) value "$@"; wheel=$2; shift 2 ;;
    --wheelhouse) value "$@"; wheelhouse=$2; shift 2 ;;
    --bank-id) value "$@"; bank_id=$2; shift 2 ;;
    --server-name) value "$@"; server_names+=("$2"); shift 2 ;;
    --root) value "$@"; root=$2; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --start) start=1; shift ;;
    -h|--help) sed -n "2,${usage_end}p" "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
case "$role" in bank|vendor|user) ;; *) die "--role must be bank, vendor or user" ;; esac
[ -z "$wheel" ] || [[ "$wheel" == *.whl && -f "$wheel" ]] || die "--wheel $wheel: not a wheel file"
[ -z "$wheelhouse" ] || [ -d "$wheelhouse" ] || die "--wheelhouse $wheelhouse: not a directory"
[ -z "$root" ] || [ -d "$root" ] || die "--root $root: not a directory"
[ -z "$root" ] || [ "$start" = 0 ] || die "--start cannot start a service installed under --root"
[ -n "$bank_id" ] || bank_id=bank
[[ "$bank_id" =~ ^[A-Za-z0-9._-]{1,64}$ ]] || die "--bank-id $bank_id: use letters, digits, '.', '_' or '-'"
if [ "$dry" = 0 ] && [ "$(id -u)" != 0 ]; then
  fail "run as root (or with --dry-run to see the plan)"
fi

here="$(cd "$(dirname "$0")/../.." && pwd)"
R="" && [ -z "$root" ] || R="$(cd "$root" && pwd)"
python=${PYTHON:-/usr/bin/python3}
prefix=$R/opt/m2mpay
venv=$prefix/venv
etc=$R/etc/m2mpay
private=$R/var/lib/private
bank_data=$private/m2mpay/bank
mosquitto=$R/etc/mosquitto
unit="m2mpay-$role.service"
pip_source=() && [ -z "$wheelhouse" ] || pip_source=(--no-index --find-links "$(cd "$wheelhouse" && pwd)")
unsure=0

run() {  # run a command, or print it under --dry-run
  if [ "$dry" = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi
}

run_to() {  # run_to FILE MODE COMMAND...: COMMAND's output becomes FILE (whole or not at all)
  local out=$1 mode=$2; shift 2
  if [ "$dry" = 1 ]; then printf '+ %s > %s\n' "$*" "$out"; return; fi
  "$@" > "$out.new" && chmod "$mode" "$out.new" && mv -f "$out.new" "$out"
}

probe() {  # 0: PATH exists; 1: it does not; 2: this user cannot tell (a directory on the way is closed)
  if [ "$(id -u)" = 0 ]; then [ -e "$1" ] || [ -L "$1" ]; return; fi
  [ -e "$1" ] && return 0
  local d=$1
  while [ "$d" != / ]; do
    [ -L "$d" ] && return 2  # a link this user cannot follow
    d=$(dirname "$d")
    if [ -d "$d" ]; then if [ -x "$d" ]; then return 1; else return 2; fi; fi
  done
  return 1
}

unless_exists() {  # unless_exists PATH COMMAND...: run COMMAND when PATH does not exist
  local path=$1 state=0; shift
  probe "$path" || state=$?
  case $state in
    1) run "$@" ;;
    2) printf '? %s   (only if %s is missing: this user cannot tell)\n' "$*" "$path"; unsure=1 ;;
  esac
}

# --- system packages (a real machine only)
if [ -z "$R" ]; then
  packages=""
  "$python" -c 'import ensurepip, venv' 2>/dev/null || packages="$packages python3-venv"
  if [ "$role" = bank ] && ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    packages="$packages mosquitto"
  fi
  if [ -n "$packages" ]; then
    # shellcheck disable=SC2086
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y $packages
  fi
fi
if [ "$role" = bank ] && ! getent group mosquitto >/dev/null && { [ -n "$R" ] || [ "$dry" = 0 ]; }; then
  fail "no group mosquitto on this machine: install the mosquitto package"
fi

# --- 1. the wheel: given, or built by whoever owns the checkout
if [ -n "$wheel" ]; then
  wheel="$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")"
else
  owner=$(stat -c %u "$here") group=$(stat -c %g "$here")
  as_owner=() && [ "$owner" = 0 ] || as_owner=(setpriv --reuid="$owner" --regid="$group" --clear-groups --)
  if [ "$dry" = 1 ]; then build="<build-dir>"; else build=$(mktemp -d); trap 'rm -rf "$build"' EXIT; fi
  [ "$owner" = 0 ] || run chown "$owner:$group" "$build"
  builder=("${as_owner[@]}" env HOME="$build" PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1)
  run "${builder[@]}" "$python" -m venv "$build/venv"
  run "${builder[@]}" "$build/venv/bin/pip" install --quiet "${pip_source[@]}" --require-hashes \
      --only-binary :all: -r "$here/deploy/pi/build-requirements.txt"
  run "${builder[@]}" "$build/venv/bin/pip" wheel --quiet --no-deps --no-build-isolation --no-index \
      --wheel-dir "$build/dist" "$here"
  if [ "$dry" = 1 ]; then
    wheel="$build/dist/m2mpay-VERSION-py3-none-any.whl"
  else
    wheel=$(ls "$build"/dist/m2mpay-*.whl)
  fi
fi
name=$(basename "$wheel")

# --- 2. the virtual environment: pinned, hashed dependencies, then the wheel by its hash
unless_exists "$venv/bin/python" "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
run "${pip[@]}" install --quiet "${pip_source[@]}" --require-hashes --only-binary :all: \
    -r "$here/deploy/pi/requirements.txt"
run install -d -m 0755 "$prefix/dist"
if [ "$dry" = 0 ]; then
  for old in "$prefix"/dist/m2mpay-*.whl; do
    [ -e "$old" ] && [ "$(basename "$old")" != "$name" ] && rm -f "$old"
  done
fi
[ "$wheel" -ef "$prefix/dist/$name" ] || run install -m 0644 "$wheel" "$prefix/dist/$name"
if [ -f "$wheel" ]; then digest=$(sha256sum "$wheel" | cut -d' ' -f1); else digest="SHA256-OF-THE-WHEEL"; fi
run_to "$prefix/dist/m2mpay.txt" 0644 echo "m2mpay @ file://$prefix/dist/$name --hash=sha256:$digest"
run "${pip[@]}" install --quiet --require-hashes --only-binary :all: --no-deps --force-reinstall \
    -r "$prefix/dist/m2mpay.txt"
m2mpay=$venv/bin/m2mpay
run install -d -m 0755 "$R/usr/local/bin"
run ln -sfn /opt/m2mpay/venv/bin/m2mpay "$R/usr/local/bin/m2mpay"  # the command, on root's PATH too

# --- 3. /etc/m2mpay: readable by the services (DynamicUser=); the secrets in it are not
run install -d -m 0755 "$etc"
conf="" env=""
case "$role" in
  bank) env=bank.env ;;
  vendor) conf=vendor.toml env=vendor.env ;;
  user) conf=user.toml ;;
esac
if [ -n "$conf" ]; then
  unless_exists "$etc/$conf" install -m 0644 "$here/deploy/examples/$conf" "$etc/$conf"
  run chmod 0644 "$etc/$conf"  # an earlier install made it 0640 root:root, which the service cannot read
fi
[ -z "$env" ] || unless_exists "$etc/$env" install -m 0600 "$here/deploy/examples/$env" "$etc/$env"
if [ "$role" != bank ]; then
  run install -d -m 0700 "$etc/tls"
  case "$role" in
    vendor) what="the bundle from 'm2mpay-bank vendor enroll NAME --category … --out FILE'" ;;
    user) what="the credentials from 'm2mpay-bank account open NAME --out FILE'" ;;
  esac
  state=0 && probe "$etc/$role.json" || state=$?
  [ "$state" = 0 ] || echo "note: put $what at /etc/m2mpay/$role.json (mode 0600)"
  echo "note: /etc/m2mpay/tls holds this device's broker login: ca.crt, NAME.crt, NAME.key from 'm2mpay broker pki'"
fi

# --- 4. the bank: state directory, broker PKI, Mosquitto, admin wrapper
if [ "$role" = bank ]; then
  run install -d -m 0700 -o root -g root "$private"  # systemd's private state root: exactly 0700 root:root
  state=0 && probe "$bank_data/bank.json" || state=$?
  if [ "$state" = 0 ]; then
    echo "keeping the bank in /var/lib/private/m2mpay/bank"
    bank_id=$("$venv/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["bank"])' \
              "$bank_data/bank.json")
  fi
  unless_exists "$bank_data/bank.json" install -d -m 0755 "$private/m2mpay"
  unless_exists "$bank_data/bank.json" install -d -m 0700 "$bank_data"
  unless_exists "$bank_data/bank.json" "$m2mpay" bank init --data "$bank_data" --bank "$bank_id"

  pki=$etc/pki
  names=(--server-name localhost --server-name 127.0.0.1 --server-name "$(hostname)")
  for extra in "${server_names[@]}"; do names+=(--server-name "$extra"); done
  state=0 && probe "$pki/ca.crt" || state=$?
  if [ "$state" = 0 ]; then
    unless_exists "$pki/ca.crl" "$m2mpay" broker pki --dir "$pki"  # a PKI from before revocation: add the CRL
  else
    unless_exists "$pki/ca.crt" "$m2mpay" broker pki --dir "$pki" --client bank "${names[@]}"
  fi
  # Mosquitto reads its certificate, key and the CRL after dropping to its own user: its group may
  # read the broker's key, never the CA's or the clients' (0600)
  run chgrp mosquitto "$pki" "$pki/broker.key"
  run chmod 0750 "$pki"
  run chmod 0640 "$pki/broker.key"
  # The bank's broker logins, apart from the CA's key: what m2mpay-bank.service is handed. Copied
  # again on every run, so a worker's certificate added to the PKI (bank-2 ...) reaches it too.
  run install -d -m 0700 "$etc/bank-tls"
  if [ "$dry" = 1 ]; then
    printf '+ install -m 0600 %s/{ca.crt,bank.crt,bank.key,bank-N.crt,bank-N.key} %s/\n' "$pki" "$etc/bank-tls"
  else
    for f in "$pki/ca.crt" "$pki"/bank.crt "$pki"/bank.key "$pki"/bank-[0-9]*.crt "$pki"/bank-[0-9]*.key; do
      if [ -e "$f" ]; then run install -m 0600 "$f" "$etc/bank-tls/${f##*/}"; fi
    done
  fi

  main=$mosquitto/mosquitto.conf dropin=$mosquitto/conf.d/m2mpay.conf
  if [ -f "$main" ]; then
    grep -Eq '^[[:space:]]*include_dir[[:space:]]+/etc/mosquitto/conf\.d/?[[:space:]]*$' "$main" ||
      fail "$main does not include /etc/mosquitto/conf.d: add the line 'include_dir /etc/mosquitto/conf.d'"
    # another listener, or an option Mosquitto applies to a default listener on port 1883 (in any
    # file but the one naming the listener), or a login without a certificate
    opens='(listener|port|bind_address|bind_interface|max_connections|mount_point|protocol|socket_domain'
    opens+='|password_file|psk_file)[[:space:]]|allow_anonymous[[:space:]]+true'
    for f in "$main" "$mosquitto"/conf.d/*.conf; do
      [ -f "$f" ] && [ "$f" != "$dropin" ] || continue
      other=$(grep -EnH "^[[:space:]]*($opens)" "$f" | head -1) || true
      [ -z "$other" ] || fail "${other%:*:*}:$(cut -d: -f2 <<< "$other"): '${other#*:*:}' opens the broker beside its TLS listener: remove it"
    done
  elif [ "$dry" = 0 ] || [ -n "$R" ]; then
    fail "no $main: install the mosquitto package first"
  fi
  state=0 && probe "$dropin" || state=$?
  if [ "$state" = 0 ]; then
    echo "keeping $dropin (yours now: delete it to have it written again)"
  else
    run install -d -m 0755 "$mosquitto/conf.d"
    run_to "$dropin" 0644 "$m2mpay" broker config --dropin ${R:+--root "$R"} --data /var/lib/mosquitto \
        --bank "$bank_id" --tls /etc/m2mpay/pki
    [ -n "$R" ] || run systemctl restart mosquitto.service
  fi
  [ -n "$R" ] || [ "$dry" = 1 ] || systemctl is-active --quiet mosquitto.service ||
    echo "note: mosquitto.service is not running: systemctl status mosquitto"
  run install -D -m 0755 "$here/deploy/pi/m2mpay-bank" "$R/usr/local/sbin/m2mpay-bank"
fi

# --- 5. the unit
run install -D -m 0644 "$here/deploy/systemd/$unit" "$R/etc/systemd/system/$unit"
if [ -z "$R" ]; then
  run systemctl daemon-reload
  run systemctl enable "$unit"
  [ "$start" = 0 ] || run systemctl restart "$unit"
else
  run systemctl --quiet --root="$R" enable "$unit"
fi
if [ "$unsure" = 1 ]; then
  echo "'?' marks steps that depend on files this user cannot see: run the dry run as root for the exact plan"
fi
echo "m2mpay $role installed$([ "$dry" = 1 ] && echo ' (dry run: nothing changed)')"
