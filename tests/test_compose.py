"""docker-compose.yml and the Dockerfile: what an operator relies on, checked without a Docker engine."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("worker", "flower", "web")


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # safe_load resolves the `<<:` merges
    return compose["services"]


def password_variable(text: str) -> str:
    match = re.search(r"\$\{(REDIS_PASSWORD)(:-[^}]+)?\}", text)
    assert match, f"no ${{REDIS_PASSWORD...}} in {text!r}"
    return match.group(0)


def healthcheck(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), test
    return " ".join(test[1:])


def test_the_four_services_each_with_a_healthcheck(services):
    assert set(services) == {"redis", "worker", "flower", "web"}
    for name, service in services.items():
        assert healthcheck(service), name


def test_redis_requires_a_password_keeps_an_append_only_file_and_pings_with_it(services):
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    command = redis["command"]
    assert isinstance(command, list) and command[0] == "redis-server"
    assert command[command.index("--appendonly") + 1] == "yes"
    password = password_variable(command[command.index("--requirepass") + 1])
    assert ":-" in password, "REDIS_PASSWORD needs a default for a plain `docker compose up`"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the append-only file must outlive the container"
    check = healthcheck(redis)
    assert re.search(r"redis-cli -a \S+ .*ping", check), check
    # The healthcheck's password is the server's: through the container environment, from the same variable.
    assert "$$REDIS_PASSWORD" in check
    assert redis["environment"]["REDIS_PASSWORD"] == password


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_run_the_built_image_in_exec_form_against_the_password_protected_redis(services, name):
    service = services[name]
    assert service["build"] == "."
    assert isinstance(service["command"], list), "exec form: the process gets SIGTERM itself, not a shell"
    url = service["environment"]["REDIS_URL"]
    redis_command = services["redis"]["command"]
    assert password_variable(url) == redis_command[redis_command.index("--requirepass") + 1]
    assert re.fullmatch(r"redis://:\$\{REDIS_PASSWORD[^}]*\}@redis:6379/\d+", url), url
    assert service["depends_on"]["redis"] == {"condition": "service_healthy"}


def test_worker_sends_events_stops_gracefully_and_answers_pings(services):
    worker = services["worker"]
    assert worker["command"] == ["celery", "-A", "tasks", "worker", "-E", "-l", "INFO"]
    assert worker["stop_grace_period"] == "30s"
    assert re.search(r"celery -A tasks inspect ping -d celery@\$\$HOSTNAME", healthcheck(worker))


def test_flower_behind_basic_auth_on_5555(services):
    flower = services["flower"]
    assert flower["command"][:4] == ["celery", "-A", "tasks", "flower"]
    (auth,) = (arg for arg in flower["command"] if arg.startswith("--basic-auth="))
    assert re.fullmatch(r"--basic-auth=\$\{FLOWER_BASIC_AUTH:-[^:}]+:[^}]+\}", auth), auth
    assert "--port=5555" in flower["command"]
    assert "5555:5555" in flower["ports"]
    assert "localhost:5555/healthcheck" in healthcheck(flower)


def test_web_serves_the_fastapi_app_on_8000_once_redis_and_a_worker_are_healthy(services):
    web = services["web"]
    assert web["command"][:2] == ["uvicorn", "tasks.web:app"]
    assert web["command"][web["command"].index("--port") + 1] == "8000"
    assert web["command"][web["command"].index("--host") + 1] == "0.0.0.0"
    assert "8000:8000" in web["ports"]
    assert "localhost:8000/healthz" in healthcheck(web)
    assert web["depends_on"]["worker"] == {"condition": "service_healthy"}


def test_dockerfile_builds_the_example_image():
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    assert lines[[line.startswith("FROM ") for line in lines].index(True)] == "FROM python:3.11-slim"
    assert 'RUN pip install ".[example]"' in lines
    (cmd,) = (line for line in lines if line.startswith("CMD "))
    assert yaml.safe_load(cmd[4:]) == ["celery", "-A", "tasks", "worker", "-E", "-l", "INFO"]


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_docker_compose_accepts_the_file():
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    done = subprocess.run(
        [*command, "-f", "docker-compose.yml", "config", "-q"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
