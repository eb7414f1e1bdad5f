"""What a drain costs Redis: its CPU time per task, and which commands took it.

One Redis serves a whole fleet of workers, so its CPU per task caps the fleet: at 20 µs per task one Redis core
tops out near 50k tasks/s whatever the workers do. Two readings, from before the worker starts to the moment the
last result is stored:

- ``INFO cpu``: the server's user + system CPU time. The headline: it counts everything Redis does for a task,
  reading and parsing commands and writing replies included, which ``commandstats`` leaves out.
- ``INFO commandstats``: calls and microseconds per command, to see where that time goes. A command a Lua script
  calls is counted under its own name *and* inside the script's ``evalsha``, so these do not add up to a total.

The harness's own polling (``EXISTS`` on the results it still waits for) is part of both, for every system alike;
``wait_for_results`` keeps it near one ``EXISTS`` per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis


@dataclass(frozen=True)
class Reading:
    cpu_s: float
    #: command name -> (calls, usec)
    commands: dict[str, tuple[int, int]]


def read(client: redis.Redis) -> Reading:
    cpu = client.info("cpu")
    stats = client.info("commandstats")
    commands = {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in stats.items()
        if isinstance(v, dict)
    }
    return Reading(float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), commands)


def per_task(before: Reading, after: Reading, n: int, top: int = 6) -> dict[str, Any]:
    """CPU µs per task, commandstats' µs per task, and the `top` commands by time: calls and µs per task each."""
    spent: dict[str, tuple[float, float]] = {}
    for name, (calls, usec) in after.commands.items():
        calls0, usec0 = before.commands.get(name, (0, 0))
        if usec > usec0:
            spent[name] = ((calls - calls0) / n, (usec - usec0) / n)
    ranked = sorted(spent.items(), key=lambda kv: kv[1][1], reverse=True)[:top]
    total_usec = sum(usec for _, usec in after.commands.values()) - sum(usec for _, usec in before.commands.values())
    return {
        "cpu_us_per_task": (after.cpu_s - before.cpu_s) * 1e6 / n,
        # An upper bound for a system that uses scripts (their commands count twice), exact for one that does not.
        "commands_us_per_task": total_usec / n,
        "commands": {name: {"calls_per_task": calls, "us_per_task": us} for name, (calls, us) in ranked},
    }
