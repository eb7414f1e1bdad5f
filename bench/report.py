"""Presenting results: a rich table with ratios, the raw JSON, and an optional matplotlib figure."""

from __future__ import annotations

import json
from operator import itemgetter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.runner import BATCHING_SYSTEMS, RunConfig
from bench.stats import ratio

LABELS = {"plain": "plain Celery", "batches": "celery-batches", "ours": "ours"}
#: One colour per system in both panels, so a reader can match them across the figure.
COLORS = {"plain": "tab:gray", "batches": "tab:blue", "ours": "tab:orange"}
#: (summary key, row label, format, higher is better)
MEASURES = (
    ("drain_rate", "drain (tasks/s)", "{:,.0f}", True),
    ("p50_ms", "latency p50 (ms)", "{:.1f}", False),
    ("p99_ms", "latency p99 (ms)", "{:.1f}", False),
    ("submit_rate", "apply_async (req/s)", "{:,.0f}", True),
    ("bulk_submit_rate", "submit_many (req/s)", "{:,.0f}", True),
)


def _fmt(value: float | None, pattern: str) -> str:
    return "—" if value is None else pattern.format(value)


def print_table(results: dict[str, Any], cfg: RunConfig, console: Console) -> None:
    summary = results["summary"]
    console.print(
        f"N={cfg.n}, median of {cfg.runs} run(s), batch {cfg.batch_size}, celery-batches flush_interval "
        f"{cfg.max_delay_s * 1000:g} ms, ours max_delay {cfg.ours_max_delay_s * 1000:g} ms,"
        f" latency at {cfg.rate:g} req/s for {cfg.duration_s:g} s; one worker, --pool solo",
        highlight=False,
    )
    table = Table()
    table.add_column("model")
    table.add_column("measure")
    for system in cfg.systems:
        table.add_column(LABELS[system], justify="right")
    pairs = [(a, b) for a, b in (("ours", "batches"), ("ours", "plain")) if a in cfg.systems and b in cfg.systems]
    for a, b in pairs:
        table.add_column(f"{a}/{b}", justify="right")
    for model in cfg.models:
        for key, label, pattern, _ in MEASURES:
            values = {s: summary.get(s, {}).get(model, {}).get(key) for s in cfg.systems}
            if all(v is None for v in values.values()):
                continue
            ratios = [_fmt(ratio(values[a], values[b]), "{:.2f}x") for a, b in pairs]
            table.add_row(model, label, *(_fmt(values[s], pattern) for s in cfg.systems), *ratios)
        table.add_section()
    console.print(table)
    console.print("ratios: higher is better for drain and submit rates, lower is better for latency")
    for line in notes(results, cfg):
        console.print(f"[yellow]note:[/] {line}", highlight=False)


def notes(results: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Things a reader must know to trust the table: skipped systems, errors, lost or stuck requests."""
    out = [f"{s} skipped: {why}" for s, why in cfg.skipped.items()]
    for s in results["sessions"] + results["sweep"]:
        tag = f"{s['system']}/{s['model']}/b{s['batch_size']}/run{s['run']}"
        if "error" in s:
            out.append(f"{tag}: {s['error']}")
        states = s.get("drain", {}).get("states", {})
        if set(states) - {"SUCCESS"}:
            out.append(f"{tag}: drain result states {states}")
        for lat in s.get("latency", []):
            if lat.get("error") or lat.get("received") != lat.get("sent"):
                lost = {k: lat.get(k) for k in ("error", "sent", "received", "pending", "stored_unpublished")}
                out.append(f"{tag} @ {lat.get('offered_rate')} req/s: {lost}")
        if s.get("worker_log_errors"):
            out.append(f"{tag}: {s['worker_log_errors']} ERROR/Traceback line(s) in its worker log")
    return out


def write_json(results: dict[str, Any], out: Path) -> Path:
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    return path


def plot(results: dict[str, Any], cfg: RunConfig, out: Path) -> Path | None:
    """Throughput vs batch size and latency vs offered load; skipped (returns None) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display here; the rejected default would fail on a headless machine
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter
    except ImportError:
        return None
    model = cfg.sweep_model
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for system in cfg.systems:
        main = results["summary"].get(system, {}).get(model, {}).get("drain_rate")
        if system not in BATCHING_SYSTEMS:
            if main:
                left.axhline(main, linestyle="--", color=COLORS[system], label=f"{LABELS[system]} (no batching)")
            continue
        points = {s["batch_size"]: s.get("drain", {}).get("rate") for s in results["sweep"] if s["system"] == system}
        points[cfg.batch_size] = main
        xs = sorted(b for b, rate in points.items() if rate)
        if xs:
            left.plot(xs, [points[b] for b in xs], marker="o", color=COLORS[system], label=LABELS[system])
    left.set(
        xlabel="batch size",
        ylabel="drain throughput (tasks/s)",
        title=f"Drain, model '{model}'",
    )
    left.set_xscale("log", base=2)
    # Ticks at the measured points, printed as plain numbers ("64", not "2^6" or "64.0").
    left.xaxis.set_major_locator(FixedLocator(sorted({*cfg.sweep_sizes, cfg.batch_size})))
    left.xaxis.set_major_formatter("{x:g}")
    left.xaxis.set_minor_locator(NullLocator())
    left.grid(alpha=0.3)
    left.legend()

    first_runs = [s for s in results["sessions"] if s["run"] == 0 and s["model"] == model]
    for session in first_runs:
        lats = sorted(
            (lat for lat in session.get("latency", []) if lat.get("p50_ms") is not None),
            key=itemgetter("offered_rate"),
        )
        if not lats:
            continue
        loads = [lat["offered_rate"] for lat in lats]
        system = session["system"]
        for key, style in (("p50_ms", "-"), ("p99_ms", ":")):
            right.plot(
                loads,
                [lat[key] for lat in lats],
                marker="o" if style == "-" else "x",
                linestyle=style,
                color=COLORS[system],
                label=f"{LABELS[system]} {key[:3]}",
            )
    right.set(xlabel="offered load (req/s)", ylabel="latency (ms)", yscale="log", title=f"Latency, model '{model}'")
    right.set_xscale("log", base=2)
    right.xaxis.set_major_locator(FixedLocator(cfg.loads))
    right.xaxis.set_major_formatter("{x:g}")
    right.xaxis.set_minor_locator(NullLocator())
    right.yaxis.set_major_formatter(ScalarFormatter())
    right.grid(alpha=0.3, which="both")
    right.legend(fontsize="small")
    fig.suptitle(
        f"N={cfg.n}, batch {cfg.batch_size}, flush_interval {cfg.max_delay_s * 1000:g} ms / max_delay "
        f"{cfg.ours_max_delay_s * 1000:g} ms, one worker --pool solo"
    )
    fig.tight_layout()
    path = out / "bench.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
