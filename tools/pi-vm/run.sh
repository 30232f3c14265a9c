#!/usr/bin/env bash
# `make pi-vm`: the systemd units on a Debian bookworm arm64 machine booted for real, emulated.
#
# Builds once, and caches in .pi-vm/ (git-ignored), a Debian bookworm arm64 root with Debian's
# arm64 kernel, systemd as init and Mosquitto (debootstrap, then apt-get in the root through
# qemu-user-static; a root already built by `make pi-check` is copied instead of bootstrapped).
# On every run, on the host: the m2mpay wheel is built from this checkout and the aarch64 wheels
# of deploy/pi/requirements.txt are downloaded (hashes checked), so the guest needs no network;
# a fresh copy of the root gets the checkout (owned by an ordinary user, "pi"), the wheels and a
# oneshot unit that runs tools/pi-vm/in-guest.sh at boot; `mkfs.ext4 -d` makes the disk image
# (no loop mount). Then qemu-system-aarch64 (TCG, no KVM, no network: -nic none) boots it with
# the console on stdio; in-guest.sh installs the three roles with deploy/pi/install.sh, starts
# the units, checks them and powers the machine off. The console is kept in .pi-vm/console.log.
# Exits 0 only when the guest printed "PI-VM RESULT: PASS".
#
# Runs as root (debootstrap, chroot, mkfs of a root-owned tree). Settings, from the environment:
#   PI_VM_CACHE=.pi-vm   the cache: root/, wheels/, image.raw, console.log, summary, guest-logs/
#   PI_VM_TIMEOUT=60m    the longest the guest may run
#   PI_VM_MIRROR=URL     Debian mirror (default: deb.debian.org)
#   PI_VM_SMP=2 PI_VM_MEM=2048
set -euo pipefail

die() { echo "pi-vm: $*" >&2; exit 1; }
here=$(cd "$(dirname "$0")/../.." && pwd -P)
cache=${PI_VM_CACHE:-$here/.pi-vm}
timeout=${PI_VM_TIMEOUT:-60m}
mirror=${PI_VM_MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mkfs -d of a root-owned tree): sudo make pi-vm"
mkdir -p "$cache"
cache=$(cd "$cache" && pwd -P)
root=$cache/root stage=$cache/stage image=$cache/image.raw log=$cache/console.log
t_start=$SECONDS
phase() { printf 'pi-vm: %-52s (%d s so far)\n' "$*" $((SECONDS - t_start)); }
in_root() { bash "$here/tools/pi-vm/chroot.sh" "$@"; }

# --- host tools
missing=""
command -v debootstrap >/dev/null 2>&1 || missing="$missing debootstrap"
[ -x /usr/bin/qemu-aarch64-static ] || missing="$missing qemu-user-static"
command -v qemu-system-aarch64 >/dev/null 2>&1 || missing="$missing qemu-system-arm"
command -v mkfs.ext4 >/dev/null 2>&1 || missing="$missing e2fsprogs"
if [ -n "$missing" ]; then
  phase "installing:$missing"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >"$cache/apt.log" 2>&1 ||
    die "apt-get install$missing failed (log: $cache/apt.log)"
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || die "qemu-aarch64 is not registered with binfmt_misc (see tools/pi-check/run.sh)"

# --- the root, built once per package list
packages="python3 python3-venv ca-certificates mosquitto libcoap3-bin systemd systemd-sysv udev dbus"
packages+=" linux-image-arm64 kmod openssl procps iproute2"
want="suite=bookworm arch=arm64 packages=$packages"
if [ "$(cat "$root/.pi-vm-root" 2>/dev/null)" != "$want" ]; then
  rm -rf "$root.tmp"
  if [ -d "$here/.pi-root/bookworm-arm64/usr" ]; then
    phase "copying the arm64 root of make pi-check"
    cp -a "$here/.pi-root/bookworm-arm64" "$root.tmp"
    rm -rf "$root.tmp/opt/m2mpay"
  else
    phase "debootstrap bookworm arm64 from $mirror"
    debootstrap --arch=arm64 --variant=minbase "bookworm" "$root.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
      die "debootstrap failed (log: $cache/debootstrap.log)"
  fi
  phase "apt-get install in the root (kernel, systemd, mosquitto)"
  # The initramfs holds only what the virt machine's root needs: MODULES=most under qemu-user
  # takes a quarter of an hour (a few processes per module, each one emulated).
  # shellcheck disable=SC2086
  in_root "$root.tmp" /bin/bash -ec "apt-get update -q && apt-get install -y -q --no-install-recommends initramfs-tools
      sed -i 's/^MODULES=.*/MODULES=list/' /etc/initramfs-tools/initramfs.conf
      printf '%s\\n' virtio_pci virtio_mmio virtio_blk ext4 crc32c_generic >>/etc/initramfs-tools/modules
      apt-get install -y -q --no-install-recommends $packages
      id pi >/dev/null 2>&1 || useradd -m -u 1000 -s /bin/bash pi
      apt-get clean" >"$cache/root.log" 2>&1 || die "installing the packages failed (log: $cache/root.log)"
  echo "$want" >"$root.tmp/.pi-vm-root"
  rm -rf "$root"
  mv "$root.tmp" "$root"
else
  phase "reusing the arm64 root"
fi
kernel=$(ls "$root"/boot/vmlinuz-* | sort -V | tail -1)
initrd=$root/boot/initrd.img-${kernel##*/vmlinuz-}
[ -f "$initrd" ] || die "no initrd for $kernel in the root"

# --- on the host: the m2mpay wheel and the aarch64 wheels (the guest has no network)
phase "building the wheel, fetching aarch64 wheels"
wheels=$cache/wheels
rm -rf "$wheels"
mkdir -p "$wheels/house" "$wheels/dist"
[ -x "$cache/build-venv/bin/pip" ] || python3 -m venv "$cache/build-venv"
"$cache/build-venv/bin/pip" install -q --disable-pip-version-check --require-hashes --only-binary :all: \
    -r "$here/deploy/pi/build-requirements.txt"
(cd "$here" && "$cache/build-venv/bin/pip" wheel -q --disable-pip-version-check --no-deps --no-build-isolation \
    --no-index -w "$wheels/dist" .)
"$cache/build-venv/bin/pip" download -q --disable-pip-version-check --only-binary=:all: \
    --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
    --implementation cp --python-version 3.11 --abi cp311 --require-hashes \
    -r "$here/deploy/pi/requirements.txt" -d "$wheels/house"
# the build tools too: install.sh builds the wheel in the guest as the checkout's owner for the bank
"$cache/build-venv/bin/pip" download -q --disable-pip-version-check --only-binary=:all: --require-hashes \
    -r "$here/deploy/pi/build-requirements.txt" -d "$wheels/house"
wheel=$(ls "$wheels"/dist/m2mpay-*.whl)

# --- a fresh copy of the root, with the checkout, the wheels and the check unit
phase "staging the image"
rm -rf "$stage"
cp -a "$root" "$stage"
src=/home/pi/m2mpay
mkdir -p "$stage$src"
tar -C "$here" --exclude=./.git --exclude=./.venv --exclude=./var --exclude=./build --exclude=./dist \
    --exclude=__pycache__ --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.mypy_cache \
    --exclude=.hypothesis --exclude=./.pi-root --exclude=./.pi-vm --exclude=./bench.json \
    --exclude=./bench.png -cf - . | tar -C "$stage$src" -xf -
chown -R 1000:1000 "$stage$src"
mkdir -p "$stage/opt/pi-vm"
cp -r "$wheels/house" "$stage/opt/pi-vm/wheelhouse"
cp "$wheel" "$stage/opt/pi-vm/"
echo m2mpay-pi >"$stage/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tm2mpay-pi\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$stage/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$stage/etc/fstab"
rm -f "$stage/etc/resolv.conf"
cat >"$stage/etc/systemd/system/m2mpay-vm-check.service" <<EOF
[Unit]
Description=m2mpay: install the roles and check the units (make pi-vm)
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/bash $src/tools/pi-vm/in-guest.sh $src /opt/pi-vm/${wheel##*/} /opt/pi-vm/wheelhouse /var/log/pi-vm
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity
[Install]
WantedBy=default.target
EOF
mkdir -p "$stage/etc/systemd/system/default.target.wants"
ln -sf ../m2mpay-vm-check.service "$stage/etc/systemd/system/default.target.wants/m2mpay-vm-check.service"

phase "mkfs.ext4 -d (the disk image)"
rm -f "$image"
mkfs.ext4 -q -F -L pi-root -d "$stage" "$image" 4G >"$cache/mkfs.log" 2>&1 || die "mkfs.ext4 failed (log: $cache/mkfs.log)"
rm -rf "$stage"

# --- boot
phase "booting qemu-system-aarch64 (TCG; at most $timeout)"
t_boot=$SECONDS
qpid=""
stop_qemu() { [ -z "$qpid" ] || kill -TERM "$qpid" 2>/dev/null || true; }  # timeout passes it on to qemu
trap stop_qemu EXIT
trap 'exit 130' INT TERM
set +e
timeout --foreground -k 30s "$timeout" qemu-system-aarch64 -M virt -cpu cortex-a72 -smp "${PI_VM_SMP:-2}" \
    -m "${PI_VM_MEM:-2048}" -kernel "$kernel" -initrd "$initrd" \
    -append "root=/dev/vda rw console=ttyAMA0 systemd.show_status=1" \
    -drive "file=$image,if=virtio,format=raw" -nographic -nic none -no-reboot \
    </dev/null >"$log" 2>&1 &
qpid=$!
echo "$qpid" >"$cache/qemu.pid"
wait "$qpid"
rc=$?
set -e
qpid=""
rm -f "$cache/qemu.pid"
phase "the guest stopped (qemu exit $rc, $((SECONDS - t_boot)) s in the guest)"
# the guest's logs (install, journal of each unit, systemd-analyze security), read from the image
rm -rf "$cache/guest-logs" "$cache/pi-vm"
debugfs -R "rdump /var/log/pi-vm $cache" "$image" >/dev/null 2>&1 && mv "$cache/pi-vm" "$cache/guest-logs" || true
# (a line may follow the login prompt on the console)
tr -d '\r' <"$log" | grep -ao 'PI-VM  *[0-9]*s .*' >"$cache/summary" || true
echo "--- summary (from ${log#"$here"/})"
[ -s "$cache/summary" ] && cat "$cache/summary" || echo "(no summary: the guest never reached the check; see the log)"
grep -q '^PI-VM .*RESULT: PASS' "$cache/summary" || die "the checks did not pass in the virtual Pi"
phase "PASS in $((SECONDS - t_start)) s"
