# The two set-up commands of the README: `make demo` and `make test`.
# Each installs what it needs: system packages when missing, then a venv with the package.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
STAMP  := $(VENV)/.installed
DURATION ?= 30

.PHONY: demo test check bench reliability system-deps clean pi-check pi-vm

demo: $(STAMP)
	$(VENV)/bin/m2mpay demo --duration $(DURATION)

# Types (mypy --strict on every package), lint (the rules in pyproject.toml), then the tests.
test: $(STAMP)
	$(PY) -m mypy --strict -p m2mpay
	$(PY) -m ruff check --quiet .
	$(PY) -m pytest

# The heavy reliability runs: 1,000 races, 10,000 fuzz inputs per surface, repeated crashes.
reliability: $(STAMP)
	$(PY) -m pytest -m heavy -v

bench: $(STAMP)
	$(VENV)/bin/m2mpay bench --json bench.json

# Tests, one payment and the quick bench in an emulated Debian arm64 root (cached in .pi-root/;
# root; too slow for CI: see docs/DEVICE.md, "Proof on arm64 (emulated)").
pi-check:
	$(SUDO) bash tools/pi-check/run.sh

# The systemd units on Debian arm64 booted for real in qemu-system-aarch64 (TCG; cached in .pi-vm/;
# root; too slow for CI: see docs/DEVICE.md, "A virtual Pi, booted").
pi-vm:
	$(SUDO) bash tools/pi-vm/run.sh

# Debian / Raspberry Pi OS packages, installed only when something is missing.
system-deps:
	@missing=""; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v coap-client-notls >/dev/null 2>&1 || missing="$$missing libcoap3-bin"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(STAMP): pyproject.toml | system-deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .hypothesis
