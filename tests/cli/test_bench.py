"""`m2mpay bench`: runs, writes its JSON, and judges each figure against its goal."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from m2mpay.agents.bench.cli import GOALS, cpu_table, summary
from m2mpay.agents.bench.cpu import CpuMeter

from tests.commands import m2mpay


def test_quick_protocol_section_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = m2mpay("bench", "--quick", "--only", "protocol", "--json", out)
    assert "hash chain n = 16,384" in result.stdout
    figures = json.loads(out.read_text())
    assert figures["machine"]["quick"] is True and set(figures) >= {"protocol", "seconds"}
    for row in figures["protocol"]["traversal"]:
        log2 = int(math.log2(row["n"]))
        assert row["hashes_worst"] <= math.ceil(log2 / 2) and row["stored_max"] <= log2 + 1
    signing = figures["protocol"]["signing"]
    assert signing["ratio"] == signing["blind_sign_per_s"] / signing["openssl_sign_per_s"] > 0


def _render(results: dict[str, object]) -> str:
    console = Console(width=200, record=True)
    console.print(summary(results))
    return console.export_text()


def test_summary_judges_ratios_and_memory_against_the_goals() -> None:
    # The goals are judged against the echo on the stock client; the echo on the bank's own
    # client (faster here, so its ratio lower) is shown without a verdict.
    bank = {"sqlite/1w/32": {"db": "sqlite", "workers": 1, "in_flight": 32, "bank_req_per_s": 700.0,
                             "echo_req_per_s": 1750.0, "ratio": 0.4, "stock_echo_req_per_s": 1000.0,
                             "stock_ratio": 0.7, "spends_per_s": 350.0, "withdraw_coins_per_s": 900.0},
            "sqlite/1w/1": {"db": "sqlite", "workers": 1, "in_flight": 1, "bank_req_per_s": 500.0,
                            "echo_req_per_s": 500.0, "ratio": 1.0, "stock_echo_req_per_s": 1000.0,
                            "stock_ratio": 0.5, "spends_per_s": 250.0, "withdraw_coins_per_s": 900.0},
            "withdraw": {"coins_per_s": 900.0, "openssl_sign_per_s": 3000.0, "ratio": 0.3}}
    population = {"users": 2, "vendors": 1, "sessions_per_s": 1.0, "tokens_per_s": 5.0, "failures": 0,
                  "audit_ok": True, "balanced": True, "user_pay_peak_mb": GOALS["user_mb"] + 1,
                  "bank_idle_mb": GOALS["bank_idle_mb"] - 1, "bank_peak_mb": 70.0, "vendor_peak_mb": 50.0}
    text = _render({"machine": {"cores": 2, "cpu": "test", "python": "3"}, "bank": bank, "population": population})
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 3}
    assert "met" in lines["bank sqlite, 1 proc, 32 in flight"] and "0.70" in lines["bank sqlite, 1 proc, 32 in flight"]
    assert "missed" in lines["bank sqlite, 1 proc, 1 in flight"]
    own = [line for line in text.splitlines() if "the same beside the echo on the bank's own client" in line]
    assert len(own) == 2 and "0.40" in own[0] and not any("met" in line or "missed" in line for line in own)
    assert "met" in lines["withdrawals (32 coins per request)"]
    assert "missed" in lines["peak RSS, `user pay`"]  # above its ceiling
    assert "met" in lines["RSS, bank serving idle"]
    assert "audit passed" in lines["population 2 users × 1 vendors"]


def test_postgresql_rows_are_judged_on_one_process_and_on_scaling() -> None:
    def row(workers: int, rate: float) -> dict[str, object]:
        return {"db": "postgresql", "workers": workers, "in_flight": 32, "bank_req_per_s": rate,
                "echo_req_per_s": 2000.0, "ratio": rate / 2000, "stock_echo_req_per_s": 1000.0,
                "stock_ratio": rate / 1000, "spends_per_s": rate / 2,
                "withdraw_coins_per_s": 900.0, "cpu_ms_per_request": {"bank": 0.7, "postgres": 0.3, "other": 0.1},
                "echo_cpu_ms_per_request": {"echo": 0.3}, "machine_busy": 0.98,
                "queued_ms_per_request": {"bank": 0.25 * workers, "load": 0.1},
                "locks": {"samples": 10, "active_per_sample": 2.0, "lock_wait_share": 0.0}}

    results = {"machine": {"cores": 2, "cpu": "test", "python": "3"},
               "bank": {"postgresql/1w/32": row(1, 550.0), "postgresql/2w/32": row(2, 660.0),
                        "postgresql/4w/32": row(4, 700.0)}}
    text = _render(results)
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 3}
    assert "met" in lines["bank postgresql, 1 proc, 32 in flight"]  # 0.55 >= 0.50
    assert "missed" in lines["bank postgresql, 2 proc over 1, 32 in flight"]  # 1.20 < 1.30
    assert "≥" not in lines["bank postgresql, 4 proc over 1, 32 in flight"]  # shown, not judged
    console = Console(width=200, record=True)
    console.print(cpu_table(results))
    cpu = console.export_text()
    assert "0.70 (0.30)" in cpu and "0.0%" in cpu
    waited = [line for line in cpu.splitlines() if "2 proc" in line]
    assert len(waited) == 1 and "0.50" in waited[0]  # the bank's wait for a core, 2 processes


def test_the_cpu_meter_sees_processes_wait_for_a_core_only_when_there_are_too_few() -> None:
    """Twice as many spinning processes as the cores this test may use: together they wait for a
    core about half the time, and the meter says so; a sleeping process waits for none."""
    cores = len(os.sched_getaffinity(0))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(10)"])
    time.sleep(0.5)  # up and asleep before the spinners take the cores
    spin = "import time\nend = time.monotonic() + 10\nwhile time.monotonic() < end: pass\n"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2 * cores)]
    try:
        time.sleep(0.3)  # all started
        meter = CpuMeter({"spin": lambda: [p.pid for p in spinners], "sleep": lambda: [sleeper.pid]})
        assert meter.waits_available  # Linux keeps run-queue times: the bench's figures rely on them
        meter.start()
        time.sleep(1.0)
        meter.stop()
    finally:
        for p in (*spinners, sleeper):
            p.kill()
            p.wait()
    # Whatever share of the cores the spinners got, they waited for one at least as long as they
    # ran less than all of them; the sleeper neither ran nor waited.
    assert meter.seconds["spin"] > 0.2 and meter.queued["spin"] > 0.5 * meter.seconds["spin"]
    assert meter.queued["sleep"] < 0.01 and meter.seconds["sleep"] < 0.05
