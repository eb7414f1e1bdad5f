"""The task request of one message, as Celery's tracer, result backend and canvas read it (``task.request``)."""

from __future__ import annotations

from typing import Any

from ..codec import Request


class TaskRequest:
    """The task request as Celery's tracer and result backend read it (``Task.request``'s fields that matter).

    Not ``celery.app.task.Context``, whose constructor costs more than the rest of a request's bookkeeping
    together: a few slots are filled per message and everything else is read from the message's headers when (and
    only if) a backend helper, a chord, a callback or an event asks for it.
    """

    __slots__ = ("_embed", "_headers", "_props", "args", "children", "delivery_info", "hostname", "id",
                 "ignore_result", "kwargs", "task")
    called_directly = False
    is_eager = False
    stamps: dict[str, Any] | None = None
    stamped_headers: list[str] | None = None

    def __init__(self, request: Request, hostname: str, queue: str, ignore_result: bool) -> None:
        self.id = request.id
        self.task = request.task
        self.args = request.args
        self.kwargs = request.kwargs
        self.hostname = hostname
        self.delivery_info = {"routing_key": queue}
        self._headers = request.headers
        self._props = request.properties
        self._embed = request.embed
        self.ignore_result = bool(request.headers.get("ignore_result")) or ignore_result
        self.children: list[Any] = []

    group = property(lambda self: self._headers.get("group"))
    group_index = property(lambda self: self._headers.get("group_index"))
    parent_id = property(lambda self: self._headers.get("parent_id"))
    root_id = property(lambda self: self._headers.get("root_id"))
    retries = property(lambda self: self._headers.get("retries") or 0)
    timelimit = property(lambda self: self._headers.get("timelimit"))
    argsrepr = property(lambda self: self._headers.get("argsrepr"))
    kwargsrepr = property(lambda self: self._headers.get("kwargsrepr"))
    eta = property(lambda self: self._headers.get("eta"))
    expires = property(lambda self: self._headers.get("expires"))
    callbacks = property(lambda self: self._embed.get("callbacks"))
    errbacks = property(lambda self: self._embed.get("errbacks"))
    chain = property(lambda self: self._embed.get("chain"))
    chord = property(lambda self: self._embed.get("chord"))
    reply_to = property(lambda self: self._props.get("reply_to"))
    correlation_id = property(lambda self: self._props.get("correlation_id"))

    @property
    def sent_at(self) -> float | None:
        """Unix time the client sent the message (``sent_at`` header of this library's clients)."""
        value = self._headers.get("sent_at")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
