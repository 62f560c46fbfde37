"""The one gate of the GPU tests: CuPy with a CUDA device, else a skip (a failure when
REFMOCO_REQUIRE_GPU=1, as on the GPU machine, so that a broken install cannot pass as skipped)."""

import os

import pytest


def require_cupy():
    """The ``cupy`` module, or skip (fail under ``REFMOCO_REQUIRE_GPU=1``)."""
    try:
        import cupy
    except ImportError:
        cupy = None
    if cupy is None or not cupy.is_available():
        if os.environ.get("REFMOCO_REQUIRE_GPU") == "1":
            pytest.fail("REFMOCO_REQUIRE_GPU=1 but CuPy has no CUDA device")
        pytest.skip("needs CuPy and a CUDA GPU")
    return cupy
