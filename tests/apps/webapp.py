"""The example web app (tasks/web.py) serving the shop's bounded task, for tests that run it under a real uvicorn."""

from __future__ import annotations

from pydantic import BaseModel

from tasks.web import create_app
from tests.apps.shop import bounded


class XRequest(BaseModel):
    x: int


#: A short timeout: the overload test's accepted requests wait for a worker that is not there yet.
app = create_app(bounded, XRequest, timeout_s=3.0)
