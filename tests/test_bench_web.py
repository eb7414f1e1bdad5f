"""`python -m bench.web --quick`: the web benchmark's smoke run, end to end (about 40 s on a two-core machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


@pytest.mark.timeout(150)
def test_quick_web_bench_measures_all_three_apps_and_the_overload(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.web", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=140)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "web.json").read_text())
    runs = {(r["app"], r["clients"]): r for r in result["runs"]}
    assert set(runs) == {(app, n) for app in ("async", "threaded", "to_thread") for n in (16, 64)}
    for run in runs.values():
        assert run["errors"] == 0 and run["rps"] > 0 and run["p99_ms"] >= run["p50_ms"] > 0
    overload = result["overload"]
    assert overload["drain"]["rps"] > 0
    assert set(overload["statuses"]) <= {"200", "429"}  # refused or served: no errors, no broken connections
    assert 0 < overload["share_429"] < 1
    assert overload["redis_mib"] and max(overload["redis_mib"]) < 64  # the queue is bounded: so is Redis
    assert "req/s" in done.stdout and "answered 429" in done.stdout
