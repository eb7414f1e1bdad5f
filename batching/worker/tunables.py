"""Worker-wide settings (the app's ``batching_*`` settings, checked at worker start) and the consumer's timings."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError

#: Longest single blocking read while idle, in seconds: bounds how late a stop request or a message on a
#: non-default priority list (Redis can block on one list only) is noticed.
IDLE_POLL_S = 1.0
#: While a batch forms under ``max_delay``, how often it is topped up from Redis, in seconds.
FORM_POLL_S = 0.001
#: While the model is busy, how often the batch in hand is topped up from Redis (doubling while nothing comes).
TOPUP_MIN_S, TOPUP_MAX_S = 0.002, 0.02
#: Batches that may wait for the keeper thread (results to store) before the model thread waits for it.
MAX_UNSETTLED = 2
#: Seconds to wait for a consumer to finish its batch in hand at warm shutdown.
STOP_TIMEOUT_S = 30.0
#: The worker process's GIL switch interval while batching consumers run, in seconds (Python's default: 0.005).
#: A model thread waking from a GPU wait (or a sleep) would otherwise wait up to 5 ms for the GIL while the fetch
#: or keeper thread decodes or encodes; at 0.5 ms the three threads hand the GIL over promptly.
SWITCH_INTERVAL_S = 0.0005

#: The app settings this library reads, with what they mean; any other ``batching_*`` setting is refused.
APP_SETTINGS = {
    "batching_metrics_port": "port of the Prometheus endpoint (env BATCHING_METRICS_PORT); unset: no endpoint",
    "batching_metrics_addr": "address it listens on (env BATCHING_METRICS_ADDR), default 0.0.0.0",
    "batching_switch_interval": f"the worker's GIL switch interval in seconds, default {SWITCH_INTERVAL_S}; "
                                "0 or None keeps Python's",
}


@dataclass(frozen=True)
class WorkerSettings:
    """What the worker's ``batching_*`` settings (and their environment variables) say."""

    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"
    switch_interval_s: float | None = SWITCH_INTERVAL_S

    @classmethod
    def from_app(cls, conf: Mapping[str, Any], environ: Mapping[str, str]) -> WorkerSettings:
        """Read and check the settings; raises ``ConfigurationError`` naming an unknown or unusable one."""
        unknown = sorted(k for k in conf if isinstance(k, str) and k.lower().startswith("batching_")
                         and k.lower() not in APP_SETTINGS)
        if unknown:
            hints = [f"{k!r} (did you mean {close[0]!r}?)"
                     if (close := difflib.get_close_matches(k.lower(), APP_SETTINGS, 1)) else repr(k)
                     for k in unknown]
            known = "; ".join(f"{name}: {meaning}" for name, meaning in APP_SETTINGS.items())
            raise ConfigurationError(f"unknown app setting(s) {', '.join(hints)}. Known: {known}")
        port = conf.get("batching_metrics_port") or environ.get("BATCHING_METRICS_PORT")
        addr = conf.get("batching_metrics_addr") or environ.get("BATCHING_METRICS_ADDR") or "0.0.0.0"
        interval = conf.get("batching_switch_interval", SWITCH_INTERVAL_S)
        return cls(
            metrics_port=_number(int, port, "batching_metrics_port", lambda p: 0 < p < 65536) if port else None,
            metrics_addr=str(addr),
            switch_interval_s=_number(float, interval, "batching_switch_interval", lambda s: 0 < s < 1)
            if interval else None,
        )


def _number(kind: Callable[[Any], Any], value: Any, name: str, ok: Callable[[Any], bool]) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not ok(number):
        raise ConfigurationError(f"{name} {value!r} is out of range: {APP_SETTINGS[name]}")
    return number
