"""The task request of one message, as Celery's tracer, result backend, canvas and observability tools read it
(``task.request``, and the ``request`` of the ``task_*`` signals)."""

from __future__ import annotations

from typing import Any

from ..codec import Request

#: Header names that are Celery's own: what is left of a message's headers is its custom headers (``Context``'s
#: ``headers`` when the client sent no nested ``headers`` dict).
_CELERY_HEADERS = frozenset({
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries", "timelimit", "root_id",
    "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result", "replaced_task_nesting", "stamped_headers",
    "stamps", "compression", "headers",
})


class TaskRequest:
    """The task request as Celery's ``Context`` presents it, for the fields anyone reads.

    Not ``celery.app.task.Context``, whose constructor costs more than the rest of a request's bookkeeping
    together: a few slots are filled per message and everything else is read from the message's headers and
    properties when (and only if) a backend helper, a chord, a callback, a signal receiver or an event asks for it.
    As in ``Context``, every message header reads as an attribute (OpenTelemetry finds ``traceparent`` that way),
    and ``get(name, default)`` works like ``getattr``.
    """

    __slots__ = ("_embed", "_headers", "_props", "_queue", "args", "children", "hostname", "id", "ignore_result",
                 "kwargs", "task")
    called_directly = False
    is_eager = False
    stamps: dict[str, Any] | None = None
    stamped_headers: list[str] | None = None
    logfile = None
    loglevel = None
    taskset = None
    utc = None

    def __init__(self, request: Request, hostname: str, queue: str, ignore_result: bool) -> None:
        self.id = request.id
        self.task = request.task
        self.args = request.args
        self.kwargs = request.kwargs
        self.hostname = hostname
        self._queue = queue
        self._headers = request.headers
        self._props = request.properties
        self._embed = request.embed
        self.ignore_result = bool(request.headers.get("ignore_result")) or ignore_result
        self.children: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        """Any other message header, as an attribute (called only for names not found above)."""
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._headers[name]
        except KeyError:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}") from None

    def get(self, key: str, default: Any = None) -> Any:
        # OpenTelemetry reads ~20 names per span this way, most of them absent: a dict lookup, not an exception.
        if key in _ATTRIBUTES:
            return getattr(self, key, default)
        return self._headers.get(key, default)

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
    origin = property(lambda self: self._headers.get("origin"))
    shadow = property(lambda self: self._headers.get("shadow"))
    replaced_task_nesting = property(lambda self: self._headers.get("replaced_task_nesting") or 0)
    callbacks = property(lambda self: self._embed.get("callbacks"))
    errbacks = property(lambda self: self._embed.get("errbacks"))
    chain = property(lambda self: self._embed.get("chain"))
    chord = property(lambda self: self._embed.get("chord"))
    properties = property(lambda self: self._props)
    reply_to = property(lambda self: self._props.get("reply_to"))
    correlation_id = property(lambda self: self._props.get("correlation_id"))
    priority = property(lambda self: self._props.get("priority"))
    # What a worker's ``celery.worker.request.Request`` calls the task's name (``task_received`` receivers).
    name = property(lambda self: self._headers.get("shadow") or self.task)
    task_name = property(lambda self: self.task)

    @property
    def time_limit(self) -> Any:
        limits = self.timelimit
        return limits[0] if isinstance(limits, (list, tuple)) and len(limits) >= 2 else None

    @property
    def soft_time_limit(self) -> Any:
        limits = self.timelimit
        return limits[1] if isinstance(limits, (list, tuple)) and len(limits) >= 2 else None

    @property
    def delivery_info(self) -> dict[str, Any]:
        """kombu's delivery info of the message; ``routing_key`` is the batch queue it was taken from."""
        given = self._props.get("delivery_info")
        info = dict(given) if isinstance(given, dict) else {}
        info.setdefault("exchange", "")
        info["routing_key"] = self._queue
        info.setdefault("priority", self._props.get("priority"))
        info.setdefault("redelivered", False)
        return info

    @property
    def headers(self) -> dict[str, Any] | None:
        """As ``Context.headers``: the nested ``headers`` dict a client sent, else the custom (non-Celery) headers."""
        nested = self._headers.get("headers")
        if isinstance(nested, dict):
            return nested
        return {k: v for k, v in self._headers.items() if k not in _CELERY_HEADERS} or None

    @property
    def sent_at(self) -> float | None:
        """Unix time the client sent the message (``sent_at`` header of this library's clients)."""
        value = self._headers.get("sent_at")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def __repr__(self) -> str:
        return f"<TaskRequest {self.task}[{self.id}]>"


#: The names ``TaskRequest`` itself defines (slots, properties, defaults); any other name is a message header.
_ATTRIBUTES = frozenset(name for cls in TaskRequest.__mro__ for name in vars(cls))
