"""Presenting results: a rich table with ratios, the raw JSON, and an optional matplotlib figure."""

from __future__ import annotations

import json
from operator import itemgetter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.models import ACCEL_FIXED_S, ACCEL_PER_ITEM_S
from bench.runner import BATCHING_SYSTEMS, RunConfig, columns
from bench.stats import ratio

LABELS = {"plain": "plain Celery", "batches": "celery-batches", "ours": "ours", "raw": "model alone, in-process"}
#: One colour per system in both panels, so a reader can match them across the figure.
COLORS = {"plain": "tab:gray", "batches": "tab:blue", "ours": "tab:orange"}
#: (summary key, row label, format, higher is better)
MEASURES = (
    ("drain_rate", "drain (tasks/s)", "{:,.0f}", True),
    ("redis_us_per_task", "Redis CPU per task (µs)", "{:.1f}", False),
    ("redis_cmd_us_per_task", "Redis commandstats per task (µs)", "{:.1f}", False),
    ("p50_ms", "latency p50 (ms)", "{:.1f}", False),
    ("p99_ms", "latency p99 (ms)", "{:.1f}", False),
    ("submit_rate", "apply_async (req/s)", "{:,.0f}", True),
    ("bulk_submit_rate", "submit_many (req/s)", "{:,.0f}", True),
)
#: Targets for a real model: ours' drain rate over the model's own in-process rate, and over plain Celery's.
TARGET_OURS_RAW = 0.92
TARGET_OURS_PLAIN = 3.0
#: Targets on the synthetic models: ours' no-op drain over celery-batches', ours' accel drain over the model-bound
#: limit at the batch size, and ours' Redis CPU per task over plain Celery's (lower is better).
TARGET_NOOP_VS_BATCHES = 25.0
TARGET_ACCEL_OF_BOUND = 0.95
TARGET_REDIS_VS_PLAIN = 0.35


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
    # The model timed alone (no Celery) is a column of its own: it only has a drain rate (items/s at the batch size).
    summary = {**summary, "raw": results.get("raw_summary", {})}
    shown = [*columns(cfg), *(["raw"] if any(v.get("drain_rate") for v in summary["raw"].values()) else [])]
    table = Table()
    table.add_column("model")
    table.add_column("measure")
    for system in shown:
        table.add_column(heading(system), justify="right")
    candidates = [("ours", "batches"), ("ours", "plain"), ("ours", "raw"),
                  *((column, "ours") for column in shown if column.startswith("ours-i"))]
    pairs = [(a, b) for a, b in candidates if {a, b} <= {*shown}]
    for a, b in pairs:
        table.add_column(f"{a}/{b}", justify="right")
    for model in cfg.models:
        for key, label, pattern, _ in MEASURES:
            values = {s: summary.get(s, {}).get(model, {}).get(key) for s in shown}
            if all(v is None for v in values.values()):
                continue
            ratios = [_fmt(ratio(values[a], values[b]), "{:.2f}x") for a, b in pairs]
            table.add_row(model, label, *(_fmt(values[s], pattern) for s in shown), *ratios)
        table.add_section()
    console.print(table)
    console.print("ratios: higher is better for drain and submit rates, lower is better for latency")
    for line in notes(results, cfg):
        console.print(f"[yellow]note:[/] {line}", highlight=False)


def heading(column: str) -> str:
    """A column's heading: ``ours-i2`` reads "ours, 2 instances"."""
    if column.startswith("ours-i"):
        return f"ours, {column.removeprefix('ours-i')} instances"
    return LABELS[column]


def print_soak(result: dict[str, Any], console: Console) -> None:
    s, c = result["summary"], result["checks"]
    mib = lambda kib: f"{kib / 1024:,.1f} MiB"  # noqa: E731
    title = f"soak: {result['n']:,} tasks, one ours worker (solo, noop, batch 64), pid {result['worker_pid']}"
    if result.get("instances", 1) > 1:  # RSS rows: the worker's main process and its instances together
        title += f", instances={result['instances']} (RSS: main process + instances)"
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    slope_kib = s["slope_kib_per_100k"]
    rows = [
        ("throughput (tasks/s)", f"{result['rate']:,.0f}" if result["rate"] else "—"),
        ("elapsed (s)", f"{result['elapsed_s']:,.0f}"),
        (f"worker RSS at first sample ({result['samples'][0]['done']:,} tasks)", mib(s["rss_first_kib"])),
        (f"worker RSS at {s['reference_tasks']:,} tasks", mib(s["rss_at_reference_kib"])),
        ("worker RSS at the end", mib(s["rss_end_kib"])),
        ("worker RSS max (sampled) / VmHWM", f"{mib(s['rss_max_kib'])} / {mib(result['vm_hwm_kib'] or 0)}"),
        (
            f"RSS slope from {s['reference_tasks']:,} (KiB per 100k tasks)",
            "—" if slope_kib is None else f"{slope_kib:+,.0f}",
        ),
        ("redis used_memory max", mib(s["redis_used_max_kib"])),
        ("claims open max (batches claimed, not yet settled)", f"{s['claims_max']:,}"),
        (
            "queue depth max / mean / share of polls empty",
            f"{result['queue_depth']['max']:,} / {result['queue_depth']['mean']:,.0f} / "
            f"{result['queue_depth']['empty_share']:.0%}",
        ),
        ("completed / failed", f"{c['completed']:,} / {c['failed']:,}"),
        (
            "stats: requests / from the size histogram / batches",
            f"{c['requests']:,} / {c['requests_by_size']:,} / {c['batches']:,}",
        ),
        (
            "result keys reappeared / queued / claims / delayed / dead",
            " / ".join(str(c[k]) for k in ("result_keys_left", "queued", "claims", "delayed", "dead")),
        ),
        ("ERROR/Traceback lines in worker log", str(result["worker_log_errors"])),
        ("checks", "[green]ok[/]" if c["ok"] else "[red]FAILED[/]"),
    ]
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)


def notes(results: dict[str, Any], cfg: RunConfig) -> list[str]:
    """Things a reader must know to trust the table: skipped systems, errors, lost or stuck requests."""
    out = [f"{s} skipped: {why}" for s, why in cfg.skipped.items()]
    summary = results["summary"]
    for model, raw in results.get("raw_summary", {}).items():
        ours = summary.get("ours", {}).get(model, {}).get("drain_rate")
        plain = summary.get("plain", {}).get(model, {}).get("drain_rate")
        vs_raw, vs_plain = ratio(ours, raw.get("drain_rate")), ratio(ours, plain)
        if vs_raw is not None or vs_plain is not None:
            out.append(
                f"{model}: ours/raw = {_fmt(vs_raw and vs_raw * 100, '{:.0f}%')} (target >= {TARGET_OURS_RAW:.0%}), "
                f"ours/plain = {_fmt(vs_plain, '{:.2f}x')} (target >= {TARGET_OURS_PLAIN:g}x); raw = the model's own "
                f"run_batch at batch {cfg.batch_size} in one process, no Celery"
            )
    out.extend(target_notes(summary, cfg))
    for r in results.get("raw", []):
        if "error" in r:
            out.append(f"raw/{r['model']}/run{r['run']}: {r['error']}")
    for s in results["sessions"] + results["sweep"]:
        tag = f"{s.get('column', s['system'])}/{s['model']}/b{s['batch_size']}/run{s['run']}"
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


def target_notes(summary: dict[str, Any], cfg: RunConfig) -> list[str]:
    """The issue's targets on the synthetic models, met or missed, with the measured figure."""
    ours = summary.get("ours", {})
    out: list[str] = []

    def judge(what: str, value: float | None, target: float, higher: bool, pattern: str) -> None:
        if value is not None:
            met = value >= target if higher else value <= target
            sign = ">=" if higher else "<="
            out.append(f"{what} = {pattern.format(value)} (target {sign} {pattern.format(target)}): "
                       f"{'met' if met else 'MISSED'}")

    noop_batches = summary.get("batches", {}).get("noop", {}).get("drain_rate")
    judge("noop: ours/celery-batches drain", ratio(ours.get("noop", {}).get("drain_rate"), noop_batches),
          TARGET_NOOP_VS_BATCHES, True, "{:.1f}x")
    bound = cfg.batch_size / (ACCEL_FIXED_S + ACCEL_PER_ITEM_S * cfg.batch_size)
    judge(f"accel: ours drain / model-bound limit ({bound:,.0f}/s at batch {cfg.batch_size})",
          ratio(ours.get("accel", {}).get("drain_rate"), bound), TARGET_ACCEL_OF_BOUND, True, "{:.0%}")
    for model in cfg.models:
        for key, what in (("redis_us_per_task", "Redis CPU"), ("redis_cmd_us_per_task", "Redis commandstats")):
            plain = summary.get("plain", {}).get(model, {}).get(key)
            judge(f"{model}: ours/plain {what} per task", ratio(ours.get(model, {}).get(key), plain),
                  TARGET_REDIS_VS_PLAIN, False, "{:.2f}x")
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
        from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator
    except ImportError:
        return None
    model = cfg.sweep_model
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.4))
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
    raw = results.get("raw_summary", {}).get(model, {}).get("drain_rate")
    if raw:
        left.axhline(raw, linestyle=":", color="black", label=f"{LABELS['raw']} (batch {cfg.batch_size})")
    left.set_ylim(bottom=0)  # ratios between the curves read true only from a zero baseline
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
    # Legends under the panels: inside, "best" still covered the baselines drawn near the bottom.
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small", frameon=False)

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
    # Log scale with plain labels at 1-2-5 steps; matplotlib's default minor labels ("6x10^1") are unreadable.
    right.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    right.yaxis.set_major_formatter("{x:g}")
    right.yaxis.set_minor_formatter(NullFormatter())
    right.grid(alpha=0.3, which="both")
    # One legend column per system: its p50 above its p99.
    ncol = max(len({s["system"] for s in first_runs if s.get("latency")}), 1)
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=ncol, fontsize="small", frameon=False)
    ran = {s["system"] for s in results["sessions"]}
    delays = [f"celery-batches flush_interval {cfg.max_delay_s * 1000:g} ms"] if "batches" in ran else []
    delays += [f"ours max_delay {cfg.ours_max_delay_s * 1000:g} ms"] if "ours" in ran else []
    fig.suptitle(", ".join([f"N={cfg.n}, batch {cfg.batch_size}", *delays, "one worker --pool solo"]))
    fig.tight_layout()
    path = out / "bench.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_scale(result: dict[str, Any], console: Console) -> None:
    one, many = result["phases"]
    k = many["workers"]
    table = Table(title=f"scale-out: N={result['n']:,} pre-filled, model '{result['model']}', batch "
                        f"{result['batch_size']}, ours workers --pool solo on one queue")
    table.add_column("measure")
    table.add_column("1 worker", justify="right")
    table.add_column(f"{k} workers", justify="right")
    table.add_column(f"{k}/1", justify="right")

    def shares(phase: dict[str, Any], key: str) -> str:
        total = sum(phase[key].values()) or 1
        return ", ".join(f"{w.split('@')[0]} {c / total:.0%}" for w, c in sorted(phase[key].items()))

    combined = (many.get("all_busy") or {}).get("rate")
    rows = [
        ("drain, all results (tasks/s)", one["drain"]["rate"], many["drain"]["rate"]),
        (f"drain while all {k} were storing results (tasks/s)", None, combined),
    ]
    for label, a, b in rows:
        vs = ratio(b, one["drain"]["rate"])
        table.add_row(label, _fmt(a, "{:,.0f}"), _fmt(b, "{:,.0f}"), _fmt(vs, "{:.2f}x"))
    for key, label in (("by_worker_meta", "share per worker (result meta `worker`)"),
                       ("by_worker_recorded", "share per worker (inputs the model ran)")):
        table.add_row(label, shares(one, key), shares(many, key))
    for fields, label in ((("results", "success"), "results stored / SUCCESS"),
                          (("inputs_distinct", "inputs_run"), "inputs distinct / run (model's record)"),
                          (("requests", "requests_by_size", "batches"), "stats requests / from histogram / batches")):
        table.add_row(label, *(" / ".join(f"{p['checks'][f]:,}" for f in fields) for p in (one, many)))
    table.add_row("claims left / dead letters", *(f"{p['checks']['claims_left']} / {p['checks']['dead']}"
                                                   for p in (one, many)))
    table.add_row("ERROR/Traceback lines in worker logs", *(str(p["worker_log_errors"]) for p in (one, many)))
    table.add_row("checks", *("[green]ok[/]" if p["checks"]["ok"] else "[red]FAILED[/]" for p in (one, many)))
    console.print(table)
