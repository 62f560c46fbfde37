"""`import refmoco` imports NumPy only; every public name of API.md exists and is documented."""

import subprocess
import sys

import refmoco

API_NAMES = [
    "contrastive_loss", "softmax_cross_entropy", "info_nce_loss", "cpc_loss", "mi_lower_bound",
    "l2_normalize", "Queue", "MemoryBank", "momentum_update", "cosine_momentum", "LossOutput",
]


def test_import_pulls_in_no_heavy_dependency():
    code = ("import sys, refmoco, refmoco.testing; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'numba', 'cupy', 'torch', 'jax', 'scipy', 'sklearn', 'matplotlib', 'hypothesis'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_names_exist_with_numpydoc_docstrings():
    for name in API_NAMES:
        obj = getattr(refmoco, name)
        doc = obj.__doc__ or ""
        assert doc.strip(), name
        if callable(obj) and name not in ("LossOutput",):
            assert "Examples" in doc, f"{name} has no Examples section"
