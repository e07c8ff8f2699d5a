"""pytest plugin of scripts/gpu_check.sh (loaded with `-p gpu_check_plugin`, scripts/ on PYTHONPATH).

- GPU_CHECK_NO_SMOLLM2=1 leaves out (deselects) every test that uses the `smollm2` fixture, directly
  or through another fixture: without the SmolLM2 file and without a registry it cannot be built.
- GPU_CHECK_NO_MKDOCS=1 leaves out every test whose own source names mkdocs (the docs-site build),
  where mkdocs is not installed.
- GPU_CHECK_NO_DATASETS=1 leaves out the tests of task.dataset, where the optional `datasets`
  library is not installed: tests/test_datasets.py is not collected (it imports the library), the
  run of examples/dataset.yaml is deselected.
- The tests left out are written to $GPU_CHECK_LEFT_OUT, one a line: "smollm2 <node id>",
  "mkdocs <node id>" or "datasets <node id>".
- GPU_CHECK_TALLY=FILE appends one line per test outcome ("passed tests/x.py::t") as it is reported,
  so that a suite stopped at its time cap still leaves its counts and its failures.

With pytest-xdist the workers deselect (they collect) and the controller keeps the tally.
"""

from __future__ import annotations

import inspect
import os

_WORKER = False
_NOT_COLLECTED: set[str] = set()


def pytest_configure(config):
    global _WORKER
    _WORKER = hasattr(config, "workerinput")


def _names_mkdocs(item) -> bool:
    try:
        return "mkdocs" in inspect.getsource(item.obj)
    except (AttributeError, OSError, TypeError):
        return False


def pytest_ignore_collect(collection_path, config):
    """tests/test_datasets.py imports `datasets` at its top: without the library it is not collected
    at all (a collection error would stop the whole suite); it is listed as left out."""
    if os.environ.get("GPU_CHECK_NO_DATASETS") == "1" and collection_path.name == "test_datasets.py":
        _NOT_COLLECTED.add(f"tests/{collection_path.name}")
        return True
    return None


def pytest_collection_modifyitems(config, items):
    no_smollm2 = os.environ.get("GPU_CHECK_NO_SMOLLM2") == "1"
    no_mkdocs = os.environ.get("GPU_CHECK_NO_MKDOCS") == "1"
    no_datasets = os.environ.get("GPU_CHECK_NO_DATASETS") == "1"
    if not (no_smollm2 or no_mkdocs or no_datasets):
        return
    keep, drop = [], []
    for item in items:
        if no_smollm2 and "smollm2" in getattr(item, "fixturenames", ()):
            drop.append(("smollm2", item))
        elif no_mkdocs and _names_mkdocs(item):
            drop.append(("mkdocs", item))
        elif no_datasets and item.nodeid.endswith("[dataset]"):
            drop.append(("datasets", item))
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=[item for _, item in drop])
        items[:] = keep
    path = os.environ.get("GPU_CHECK_LEFT_OUT")
    if path:  # every worker collects the same tests: each writes the same list, atomically
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.writelines(f"{why} {item.nodeid}\n" for why, item in drop)
            fh.writelines(f"datasets {name}\n" for name in sorted(_NOT_COLLECTED))
        os.replace(tmp, path)


def pytest_runtest_logreport(report):
    path = os.environ.get("GPU_CHECK_TALLY")
    if not path or _WORKER:
        return
    if report.when == "call":
        outcome = report.outcome
    elif report.failed:
        outcome = "error"
    elif report.skipped and report.when == "setup":
        outcome = "skipped"
    else:
        return
    with open(path, "a") as fh:
        fh.write(f"{outcome} {report.nodeid}\n")
