"""The Lua scripts of ``lua/``, registered on a client once each (redis-py sends EVALSHA, re-loading on NOSCRIPT)."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import redis


@cache
def source(name: str) -> str:
    """The text of ``lua/<name>``; each script's header states its KEYS, ARGV and guarantees."""
    return resources.files(__package__).joinpath("lua", name).read_text()


def script(client: redis.Redis, name: str) -> Any:
    """``lua/<name>`` as a callable redis-py ``Script`` on ``client``."""
    return client.register_script(source(name))
