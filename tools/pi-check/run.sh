#!/usr/bin/env bash
# `make pi-check`: m2mpay on 64-bit Debian arm64 (the base of 64-bit Raspberry Pi OS), emulated.
#
# Builds once, and caches, a Debian arm64 root with debootstrap (Python, Mosquitto, libcoap from
# the arm64 packages), runs it through qemu-user-static, installs m2mpay from this checkout into
# a venv there with every dependency as an aarch64 wheel (pip --only-binary=:all:, so a missing
# wheel fails here), then runs inside it, all as arm64 processes on loopback:
#   tests  the suite without the tests that need servers or take long (-m "not network and not heavy")
#   e2e    one payment through the CLI: Mosquitto, bank, vendor, user; then the bank's audit
#   bench  m2mpay bench --quick (under emulation it measures the emulator, not a Pi)
#
# Runs as root (debootstrap, chroot, mounts). Settings, from the environment:
#   PI_SUITE=bookworm   Debian suite (trixie: Python 3.13)
#   PI_CACHE=.pi-root   where the root and the logs are kept (git-ignored)
#   PI_MIRROR=URL       Debian mirror (default: the one this machine's apt uses)
#   PI_STEPS="tests e2e bench"
#   PI_TEST_TIMEOUT=3600   seconds the test step may take before it is stopped
# The root is rebuilt only when the suite or the package list changes; the venv is kept in it,
# m2mpay itself is reinstalled from the checkout on every run. /proc, /sys and /dev are mounted
# into the root only while it runs and always unmounted on exit.
set -euo pipefail

die() { echo "pi-check: $*" >&2; exit 1; }

here=$(cd "$(dirname "$0")/../.." && pwd -P)
suite=${PI_SUITE:-bookworm}
cache=${PI_CACHE:-$here/.pi-root}
steps=${PI_STEPS:-tests e2e bench}
packages=python3,python3-venv,ca-certificates,mosquitto,libcoap3-bin,systemd,procps
root=$cache/$suite-arm64
logs=$cache/$suite-logs
inside=/opt/m2mpay           # in the root: src/ (a copy of the checkout), venv/, out/

[ "$(id -u)" = 0 ] || die "needs root for debootstrap, chroot and mounts: sudo make pi-check"
for step in $steps; do
  case "$step" in tests|e2e|bench) ;; *) die "unknown step '$step' in PI_STEPS (tests, e2e, bench)" ;; esac
done
mkdir -p "$cache"
cache=$(cd "$cache" && pwd -P)
root=$cache/$suite-arm64 logs=$cache/$suite-logs
exec 9>"$cache/$suite.lock"
flock -n 9 || die "another pi-check is using ${root#"$here"/}"
t_start=$SECONDS
phase() { printf 'pi-check: %-44s (%d s so far)\n' "$*" $((SECONDS - t_start)); }

# --- mounts and processes in the root: found from /proc, so a killed earlier run is cleaned too
mounts_under() {  # deepest first
  awk -v r="$1" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/self/mounts | sort -r
}
release_root() {  # stop processes still running in the root, then unmount everything under it
  local dir=$1 p m n=0
  [ -d "$dir" ] || return 0
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$dir" ] && kill -TERM "${p#/proc/}" 2>/dev/null && n=$((n + 1)) || true
  done
  if [ "$n" -gt 0 ]; then
    sleep 2
    for p in /proc/[0-9]*; do
      [ "$(readlink "$p/root" 2>/dev/null)" = "$dir" ] && kill -KILL "${p#/proc/}" 2>/dev/null || true
    done
    sleep 0.5
  fi
  for m in $(mounts_under "$dir"); do
    umount "$m" 2>/dev/null || umount -l "$m" || echo "pi-check: could not unmount $m" >&2
  done
}
child=""
run_child() {  # run a command in the background and wait, so that a signal reaches the traps at once
  "$@" &
  child=$!
  wait "$child"
}
cleanup() {
  [ -z "$child" ] || kill -TERM "$child" 2>/dev/null || true
  release_root "$root"
  release_root "$root.tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
safe_rm() {  # rm -rf a root, never while anything is mounted under it
  release_root "$1"
  [ -z "$(mounts_under "$1")" ] || die "still mounted under $1; not removing it"
  rm -rf "$1"
}

# --- host tools: debootstrap and qemu-user-static from Debian
missing=""
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
[ -x /usr/bin/qemu-aarch64-static ] || missing="$missing qemu-user-static"
if [ -n "$missing" ]; then
  phase "installing:$missing"
  { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing; } >"$cache/apt.log" 2>&1 ||
    die "apt-get install$missing failed (log: $cache/apt.log)"
fi

# --- binfmt_misc: run aarch64 binaries through qemu-aarch64-static (the F flag: also in a chroot)
binfmt=/proc/sys/fs/binfmt_misc
if [ ! -e "$binfmt/status" ]; then
  mount -t binfmt_misc binfmt_misc "$binfmt" 2>/dev/null || die "cannot mount binfmt_misc at $binfmt"
fi
if [ ! -e "$binfmt/qemu-aarch64" ]; then
  conf=/usr/lib/binfmt.d/qemu-aarch64.conf
  if [ -x /usr/lib/systemd/systemd-binfmt ] && [ -f "$conf" ]; then
    /usr/lib/systemd/systemd-binfmt "$conf" || die "systemd-binfmt could not register $conf"
  elif command -v update-binfmts >/dev/null 2>&1; then
    update-binfmts --enable qemu-aarch64 || die "update-binfmts could not enable qemu-aarch64"
  else
    die "no way to register qemu-aarch64 with binfmt_misc (need $conf or update-binfmts)"
  fi
fi
grep -q '^enabled' "$binfmt/qemu-aarch64" 2>/dev/null || die "the qemu-aarch64 binfmt entry is disabled"
grep -q '^flags:.*F' "$binfmt/qemu-aarch64" || die "the qemu-aarch64 binfmt entry lacks the F flag, needed in a chroot"

# --- the mirror: the Debian archive this machine's apt uses
mirror=${PI_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(
    { for f in /etc/apt/sources.list.d/*.sources; do [ ! -f "$f" ] || { cat "$f"; echo; }; done
    } | awk 'BEGIN { RS = ""; FS = "\n" }
      { types = uris = suites = ""; enabled = 1
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^Types:/) types = $i; if ($i ~ /^URIs:/) uris = $i; if ($i ~ /^Suites:/) suites = $i
          if ($i ~ /^Enabled: *no/) enabled = 0 }
        if (enabled && types ~ /(^|[ :])deb( |$)/ && suites !~ /security/ && uris ~ /debian\/?( |$)/) {
          sub(/^URIs: */, "", uris); split(uris, u, " "); if (found == "") found = u[1] } }
      END { if (found != "") print found }'
  )
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}

# --- the root, built once per suite and package list
want="suite=$suite arch=arm64 variant=minbase packages=$packages"
if [ "$(cat "$root/.pi-check-root" 2>/dev/null)" != "$want" ]; then
  phase "building the $suite arm64 root from $mirror"
  mkdir -p "$logs"
  safe_rm "$root.tmp"
  run_child debootstrap --arch=arm64 --variant=minbase --include="$packages" "$suite" "$root.tmp" "$mirror" \
      >"$logs/debootstrap.log" 2>&1 || die "debootstrap failed (log: $logs/debootstrap.log)"
  echo "$want" >"$root.tmp/.pi-check-root"
  safe_rm "$root"
  mv "$root.tmp" "$root"
else
  phase "reusing the $suite arm64 root"
fi

# --- enter the root
mount -t proc proc "$root/proc" || die "cannot mount /proc in the root"
mount -t sysfs sysfs "$root/sys" || die "cannot mount /sys in the root"
mount --bind /dev "$root/dev" || die "cannot bind /dev into the root"
mount --bind /dev/pts "$root/dev/pts" || die "cannot bind /dev/pts into the root"
mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm" || die "cannot mount /dev/shm in the root"
# This machine's name resolution and trusted certificates, for pip in the root.
rm -f "$root/etc/resolv.conf"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
host_ca=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}
[ -f "$host_ca" ] && cp -L "$host_ca" "$root/etc/ssl/certs/host-ca-certificates.crt"
in_root() {  # a command in the root, with a clean environment (no host pip settings)
  local pass=() v
  for v in http_proxy https_proxy no_proxy PIP_INDEX_URL PI_TEST_TIMEOUT; do
    [ -n "${!v:-}" ] && pass+=("$v=${!v}")
  done
  [ -f "$root/etc/ssl/certs/host-ca-certificates.crt" ] && pass+=(PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt)
  env -i HOME=/root LANG=C.UTF-8 TERM=dumb PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      "${pass[@]}" chroot "$root" "$@"
}
in_root /bin/true || die "cannot run arm64 binaries in $root (qemu-user-static / binfmt_misc)"
[ "$(in_root uname -m)" = aarch64 ] || die "the root does not run as aarch64"

# --- this checkout, copied in (what is in the working tree, not what is committed)
phase "copying the checkout into the root"
safe_rm "$root$inside/src"
mkdir -p "$root$inside/src"
if git -c safe.directory="$here" -C "$here" rev-parse --git-dir >/dev/null 2>&1; then
  # Tracked files, and new ones git does not ignore, outside hidden top-level folders.
  list() {
    git -c safe.directory="$here" -C "$here" ls-files -z --cached
    git -c safe.directory="$here" -C "$here" ls-files -z --others --exclude-standard | grep -zv '^\.[^/]*/' || true
  }
  copy=(--null --files-from=-)
else
  list() { :; }
  copy=(--exclude=./.git --exclude=./.venv --exclude=./var --exclude=./build --exclude=./dist
        --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.mypy_cache
        --exclude=.hypothesis --exclude='./.pi-*' .)
fi
# Files being edited meanwhile are copied as they are (tar status 1); deleted ones are skipped.
set +e
list | tar -C "$here" --ignore-failed-read --warning=no-file-changed --warning=no-failed-read \
    "${copy[@]}" -cf - | tar -C "$root$inside/src" -xf -
st=("${PIPESTATUS[@]}")
set -e
[ "${st[1]}" -le 1 ] && [ "${st[2]}" = 0 ] || die "could not copy the checkout into the root"

# --- the venv: dependencies as aarch64 wheels only, then m2mpay built from the copy
phase "installing m2mpay and its aarch64 wheels"
mkdir -p "$logs"
if ! run_child in_root /bin/bash -euc '
    v='"$inside"'/venv
    [ -x $v/bin/python ] || python3 -m venv $v
    $v/bin/pip install -q --only-binary=:all: "setuptools>=68" wheel
    rm -rf /tmp/m2mpay-wheel
    $v/bin/pip wheel -q --no-deps --no-build-isolation -w /tmp/m2mpay-wheel '"$inside"'/src
    whl=$(ls /tmp/m2mpay-wheel/m2mpay-*.whl)
    $v/bin/pip install -q --only-binary=:all: "$whl[test]"
    $v/bin/pip install -q --no-deps --force-reinstall "$whl"
    $v/bin/pip check
    $v/bin/pip list --format=freeze' >"$logs/install.log" 2>&1; then
  grep -qE 'SSLError|NewConnectionError|ConnectTimeout|ReadTimeout|ProxyError' "$logs/install.log" &&
    die "pip in the root cannot reach the package index (log: $logs/install.log)"
  nowheel=$(sed -n 's/.*Could not find a version that satisfies the requirement \([^ ]*\).*/\1/p' "$logs/install.log" | sort -u | tr '\n' ' ')
  [ -n "$nowheel" ] && die "no aarch64 wheel for: ${nowheel% } (log: $logs/install.log)"
  die "installing m2mpay in the arm64 venv failed (log: $logs/install.log)"
fi

# --- the checks, inside the root
phase "running: $steps"
safe_rm "$root$inside/out"
set +e
run_child in_root /bin/bash "$inside/src/tools/pi-check/in-root.sh" "$inside/src" "$inside/venv" "$inside/out" info $steps
status=$?
set -e
rm -rf "$logs/out"
cp -r "$root$inside/out" "$logs/out"
cp "$logs/install.log" "$logs/out/" 2>/dev/null || true

phase "done in $((SECONDS - t_start)) s; logs in ${logs#"$here"/}/out"
echo "--- summary"
cat "$logs/out/summary"
[ "$status" = 0 ] || die "some checks failed inside arm64 (see the summary above and ${logs#"$here"/}/out)"
