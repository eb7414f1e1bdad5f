"""The shape of the library: which way its imports point, what it exports, what it refuses to be configured with.

Dependencies point one way: client and shared pure code at the package root; ``worker`` -> ``store`` -> nothing of
ours but errors. A client that defines and calls batched tasks never imports the worker.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import batching
from batching import ConfigurationError, batched
from batching.worker.tunables import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "batching"

#: What each layer may import of the library (besides itself). Shared pure code is the root's plain modules.
SHARED = {"batching.errors", "batching.merge", "batching.policy", "batching.settings", "batching.model",
          "batching.codec", "batching.signals", "batching.tuning", "batching.cost",
          "batching.coalesce"}
ALLOWED = {
    "batching.store": {"batching.errors"},
    "shared": SHARED,
    "batching.task": SHARED | {"batching.client", "batching.routing", "batching.publish"},
    "batching.routing": set(),
    "batching.shared": SHARED | {"batching.task"},
    "batching.client": SHARED | {"batching.publish"},
    "batching.publish": SHARED | {"batching.store"},
    "batching.listener": SHARED,
    "batching.aio": SHARED | {"batching.client", "batching.publish", "batching.listener", "batching.store"},
    "batching.batcher": SHARED,
    "batching.redis_server": {"batching.errors"},
    "batching.ops": SHARED | {"batching.store"},
    "batching.worker": SHARED | {"batching.store", "batching.task"},
    "batching.cli": SHARED | {"batching.store", "batching.ops", "batching.task"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of ``batching`` that ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks do not count)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] if node.module else [f"{base}.{a.name}" for a in node.names]
            found.update(t for t in targets if t == "batching" or t.startswith("batching."))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("batching"))
    return found - {module}


def _layer(module: str) -> str:
    if module in SHARED:
        return "shared"
    for layer in ALLOWED:
        if module == layer or module.startswith(f"{layer}."):
            return layer
    return module


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = []
    for module, imported in _graph().items():
        layer = _layer(module)
        if layer not in ALLOWED:
            continue  # the package's __init__ re-exports the public surface
        for target in imported:
            if _layer(target) != layer and not any(target == ok or target.startswith(f"{ok}.")
                                                   for ok in ALLOWED[layer]):
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = _graph()
    modules = set(graph)

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges = {m: {t for t in map(resolve, targets) if t and t != m} for m, targets in graph.items()}
    # A package's __init__ importing its own submodules is how a package exposes them, not a cycle.
    for m in edges:
        edges[m] = {t for t in edges[m] if not t.startswith(f"{m}.")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


@pytest.mark.integration
def test_a_client_that_defines_and_calls_tasks_never_imports_the_worker(redis_url: str) -> None:
    code = (
        "import sys\n"
        "from tasks import predict\n"
        "r = predict.delay(text='hello')\n"
        "assert r.id\n"
        "loaded = [m for m in ('batching.worker', 'batching.worker.bootstep', 'batching.worker.consumer',\n"
        "          'batching.worker.keeper', 'batching.worker.limits', 'batching.worker.runner', 'prometheus_client')\n"
        "          if m in sys.modules]\n"
        "print('loaded:', loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "REDIS_URL": redis_url},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "loaded: []"


def test_public_surface_is_pinned() -> None:
    assert sorted(batching.__all__) == [
        "BatchResultError", "BatchSettings", "BatchedTask", "Batcher", "BatcherStopped", "BatchingError",
        "BrokerError", "BrokerOutOfMemory", "ConfigurationError", "ContentDisallowed", "CostError",
        "CostTooLarge", "DeadLetter", "MessageError", "MissingArgumentError", "NotReplicated", "QueueFull",
        "QueueStatus", "RequestAbandoned", "ResultBackendError",
        "ResultEncodeError", "UnbatchedCallError", "UnexpectedArgumentError", "__version__", "aio", "batched",
        "gather", "list_dead", "purge_dead", "queue_status", "requeue_dead", "shared_batched", "submit_many",
    ]
    assert all(hasattr(batching, name) for name in batching.__all__)


def test_version_comes_from_the_package_metadata() -> None:
    assert batching.__version__ == importlib.metadata.version("celery-batching")


def test_the_example_app_is_not_installed_as_a_top_level_package() -> None:
    # Run from anywhere but the checkout, `tasks` is not importable: the install maps only `batching`.
    done = subprocess.run([sys.executable, "-c", "import tasks"], cwd="/", capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "No module named 'tasks'" in done.stderr


def echo(x):
    return x


def test_an_undefined_option_is_refused_by_name_with_the_valid_ones() -> None:
    app = Celery("layout", set_as_current=False)
    with pytest.raises(ConfigurationError) as raised:
        batched(app, batch_sise=8)(echo)
    message = str(raised.value)
    assert "'batch_sise' (did you mean 'batch_size'?)" in message
    assert "Valid options:" in message and "max_delay" in message and "soft_time_limit" in message
    with pytest.raises(ConfigurationError, match="'colour'"):
        batched(app, echo, name="layout.x", colour="blue")


def test_celery_task_options_pass_through() -> None:
    app = Celery("layout", set_as_current=False)
    task = batched(app, echo, name="layout.limited", soft_time_limit=3, ignore_result=True, max_retries=5)
    assert (task.soft_time_limit, task.ignore_result, task.max_retries) == (3, True, 5)
    settings = task.worker_settings()
    assert (settings.soft_time_limit, settings.ignore_result, settings.retry) == (3, True, None)


@pytest.mark.parametrize(("option", "value", "complaint"), [
    ("lease_s", 0, "lease_s must be a positive number"),
    ("lease_s", float("nan"), "lease_s must be a positive number"),
    ("max_deliveries", 0, "max_deliveries must be an integer >= 1"),
    ("max_message_bytes", 1.5, "max_message_bytes must be a positive integer"),
    ("isolate_errors", "yes", "isolate_errors must be True or False"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("max_delay", -1, "max_delay must be a number of seconds"),
    ("instances", 0, "instances must be an integer >= 1"),
    ("instances", 2.0, "instances must be an integer >= 1"),
    ("max_tasks_per_instance", 0, "max_tasks_per_instance must be an integer >= 1 or None"),
    ("max_memory_per_instance", "1G", "max_memory_per_instance must be an integer >= 1 or None"),
])
def test_bad_values_fail_at_definition(option: str, value: Any, complaint: str) -> None:
    app = Celery("layout", set_as_current=False)
    with pytest.raises(ConfigurationError, match=complaint):
        batched(app, echo, name="layout.bad", **{option: value})


def test_unknown_app_settings_fail_naming_the_known_ones() -> None:
    with pytest.raises(ConfigurationError) as raised:
        WorkerSettings.from_app({"batching_metrics_prot": 9808, "broker_url": "redis://"}, {})
    message = str(raised.value)
    assert "'batching_metrics_prot' (did you mean 'batching_metrics_port'?)" in message
    assert "batching_switch_interval" in message
    with pytest.raises(ConfigurationError, match="batching_metrics_port 'x' is out of range"):
        WorkerSettings.from_app({}, {"BATCHING_METRICS_PORT": "x"})
    settings = WorkerSettings.from_app({"batching_switch_interval": None}, {"BATCHING_METRICS_PORT": "9808"})
    assert (settings.metrics_port, settings.metrics_addr, settings.switch_interval_s) == (9808, "0.0.0.0", None)


@pytest.mark.integration
def test_a_worker_with_a_misspelt_setting_refuses_to_start(start_worker) -> None:
    worker = start_worker("tests.apps.typo", "--pool", "solo")
    assert worker.proc.wait(60) != 0
    assert "unknown app setting(s) 'batching_metric_port'" in worker.output()
