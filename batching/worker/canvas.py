"""What follows a batched task's outcome, as Celery's tracer does it for ordinary tasks.

- ``link`` callbacks and the next ``chain`` step are sent with the result before it is stored (their ids land in
  the meta's ``children``), ``link_error`` errbacks and chord bookkeeping (``on_chord_part_return``) come from the
  result backend's own machinery after it is stored.
- Per-request retries: with ``autoretry_for`` on ``@batched``, a failed request whose error matches and whose
  ``retries`` are below ``max_retries`` is stored as RETRY and re-sent alone (same task id, ``retries + 1``, the
  countdown of ``retry_backoff`` or ``default_retry_delay``); the client sees RETRY, then the final state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from celery import group, signature, states
from celery.utils.time import get_exponential_backoff_interval

from ..settings import RetryPolicy
from .batch import Outcome

logger = logging.getLogger(__name__)


def plan_retries(policy: RetryPolicy | None, outcomes: Sequence[Outcome]) -> list[tuple[Outcome, float]]:
    """Turn retryable failures into RETRY outcomes (in place); return them with their countdowns."""
    if policy is None:
        return []
    planned = []
    for outcome in outcomes:
        request = outcome.request
        if outcome.state != states.FAILURE or request is None or not isinstance(outcome.value, policy.on):
            continue
        if policy.dont and isinstance(outcome.value, policy.dont):
            continue
        if policy.max_retries is not None and request.retries >= policy.max_retries:
            continue
        if policy.backoff:  # as Celery's add_autoretry_behaviour computes it
            countdown = float(get_exponential_backoff_interval(
                factor=int(max(1.0, policy.backoff)), retries=request.retries, maximum=int(policy.backoff_max_s),
                full_jitter=policy.jitter,
            ))
        else:
            countdown = policy.delay_s
        outcome.state = states.RETRY
        planned.append((outcome, countdown))
    return planned


def send_retries(app: Any, task_name: str, planned: Sequence[tuple[Outcome, float]]) -> None:
    """Re-send each retried request alone, keeping its id, links, chain and group.

    Sent by name through a signature, as Celery sends a chain's next step: the task's own options and publish
    path apply, exactly as for the first send.
    """
    for outcome, countdown in planned:
        r = outcome.request
        assert r is not None  # plan_retries only plans outcomes that have a request
        signature(task_name, app=app).apply_async(
            r.args, r.kwargs, task_id=r.id, retries=r.retries + 1, countdown=countdown,
            link=r.callbacks, link_error=r.errbacks, chain=r.chain, group_id=r.group, group_index=r.group_index,
            chord=r.chord, root_id=r.root_id, parent_id=r.parent_id,
        )
        logger.info("batching %s[%s]: retry %d in %.1fs: %r", task_name, r.id, r.retries + 1, countdown, outcome.value)


def sends_before_store(outcomes: Sequence[Outcome]) -> bool:
    """True if ``send_callbacks`` has anything to send: a success with callbacks or a next chain step."""
    return any(o.state == states.SUCCESS and o.request is not None and (o.request.callbacks or o.request.chain)
               for o in outcomes)


def send_callbacks(app: Any, outcomes: Sequence[Outcome]) -> None:
    """For successes: ``link`` callbacks and the next chain step, with the result as first argument."""
    for outcome in outcomes:
        r = outcome.request
        if outcome.state != states.SUCCESS or r is None or not (r.callbacks or r.chain):
            continue
        root_id = r.root_id or r.id
        try:
            callbacks = [signature(cb, app=app) for cb in r.callbacks or ()]
            if len(callbacks) == 1:
                r.children.append(callbacks[0].apply_async((outcome.value,), parent_id=r.id, root_id=root_id))
            elif callbacks:
                r.children.append(group(callbacks, app=app).apply_async(
                    (outcome.value,), parent_id=r.id, root_id=root_id))
            if r.chain:
                step = signature(r.chain[-1], app=app)
                r.children.append(step.apply_async(
                    (outcome.value,), chain=r.chain[:-1] or None, parent_id=r.id, root_id=root_id))
        except Exception as exc:  # a broken signature fails this task, not the batch
            logger.exception("batching %s: could not send the callbacks of %s", r.task, r.id)
            failed = Outcome.failure(r.id, exc, r)
            outcome.state, outcome.value, outcome.traceback = failed.state, failed.value, failed.traceback


def after_store(app: Any, outcomes: Sequence[Outcome]) -> None:
    """Chord counting and ``link_error`` errbacks, through the result backend exactly as ``mark_as_*`` does."""
    backend = app.backend
    for outcome in outcomes:
        r = outcome.request
        if r is None or outcome.state not in (states.SUCCESS, states.FAILURE):
            continue
        try:
            if r.chord:
                backend.on_chord_part_return(r, outcome.state, outcome.value)
            if outcome.state == states.FAILURE and r.errbacks:
                backend._call_task_errbacks(r, outcome.value, outcome.traceback)
        except Exception:
            logger.exception("batching %s: chord or errback handling failed for %s", r.task, r.id)
