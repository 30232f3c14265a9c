#!/bin/sh
# Pin the deployment's dependencies: every version exact, every file's SHA-256, for the Python
# versions of Raspberry Pi OS (3.11 on bookworm; the wheels cover 3.13 as well). Run from the
# repository root with uv installed, after changing the dependencies in pyproject.toml; extra
# arguments go to uv (e.g. `-c constraints.txt` to hold the versions the tests ran with).
# install.sh installs only what these files list, with pip's --require-hashes.
set -eu
[ -f pyproject.toml ] || { echo "lock.sh: run it from the repository root" >&2; exit 2; }
common="--generate-hashes --universal --python-version 3.11 --no-annotate --quiet --custom-compile-command deploy/pi/lock.sh"
# shellcheck disable=SC2086
uv pip compile pyproject.toml $common -o deploy/pi/requirements.txt "$@"
# shellcheck disable=SC2086
uv pip compile deploy/pi/build-requirements.in $common -o deploy/pi/build-requirements.txt "$@"
