"""Root conftest: the docstring examples under refmoco/ (``--doctest-modules``) that import an
optional package (PyTorch, JAX, CuPy) are skipped, not failed, where it is not installed."""

import importlib.util
import re

import pytest

_IMPORT = re.compile(r"^\s*(?:import|from)\s+([\w.]+(?:\s*,\s*[\w.]+)*)")


def _missing_modules(example_sources):
    missing = set()
    for source in example_sources:
        match = _IMPORT.match(source)
        if match is None:
            continue
        for name in match.group(1).split(","):
            top = name.strip().split(".")[0]
            if top and importlib.util.find_spec(top) is None:
                missing.add(top)
    return missing


def pytest_collection_modifyitems(config, items):
    for item in items:
        dtest = getattr(item, "dtest", None)  # a DoctestItem
        if dtest is None:
            continue
        missing = _missing_modules(example.source for example in dtest.examples)
        if missing:
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(sorted(missing))}"))
