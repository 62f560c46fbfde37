"""The two ways refmoco launches its Numba CUDA kernels on a GPU (``refmoco.kernels.cuda.LAUNCHER``,
``REFMOCO_CUDA_LAUNCHER``): numba-cuda's own launch, and CuPy's launch of the PTX that Numba
compiles for the same kernel and argument types. They run the same compiled code on the same
inputs, so every result must be bitwise equal; a misplaced argument (the layout of
``param_format`` and ``param_values``) would show here as garbage or a crash. The layout is
checked without a GPU in ``test_cuda_ptx.py``, against the PTX's parameters and numba-cuda's
marshalling.

Marked ``gpu``: skipped without CuPy and a CUDA device (a failure under REFMOCO_REQUIRE_GPU=1).
"""

import numpy as np
import pytest
from gpu import require_cupy

pytestmark = pytest.mark.gpu


@pytest.fixture
def cupy():
    return require_cupy()


@pytest.fixture
def kernels():
    from refmoco.kernels import cuda

    if cuda.SIMULATOR:  # scripts/gpu_dryrun.py: the simulator launches through neither
        pytest.skip("Numba's CUDA simulator has neither launcher")
    return cuda


def inputs(dtype, seed=0):
    """Host arrays for one call of every kernel: InfoNCE's q, k and queue; the momentum update's
    target and source; SGD's parameters, gradient and momentum buffer; a channels-last image batch and window gradients (im2col, col2im); batch
    norm's input (channels-first, so its (rows, C) view is strided), affine parameters and
    running statistics, and an upstream gradient."""
    rng = np.random.default_rng(seed)

    def unit(rows, dim):
        x = rng.normal(size=(rows, dim))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)

    return {"q": unit(9, 16), "k": unit(9, 16), "queue": unit(300, 16),
            "target": rng.normal(size=1000).astype(dtype),
            "p": rng.normal(size=700).astype(dtype), "g": rng.normal(size=700).astype(dtype),
            "buf": rng.normal(size=700).astype(dtype),
            "source": rng.normal(size=1000).astype(dtype),
            "x_nhwc": rng.normal(size=(3, 7, 7, 4)).astype(dtype),
            "dcols": rng.normal(size=(3, 4, 4, 3, 3, 4)).astype(dtype),
            "x_nchw": rng.normal(size=(5, 6, 3, 3)).astype(dtype),
            "gamma": rng.normal(size=6).astype(dtype), "beta": rng.normal(size=6).astype(dtype),
            "mean": rng.normal(size=6).astype(dtype),
            "var": rng.uniform(0.5, 2, size=6).astype(dtype),
            "dy": rng.normal(size=(5, 6, 3, 3)).astype(dtype)}


def run_kernels(cupy, kernels, host, *, with_cublas=True):
    """Every kernel once, on fresh device copies of ``host``; every result back on the host."""
    d = {name: cupy.asarray(a) for name, a in host.items()}
    out = []
    if with_cublas:  # InfoNCE's products are cuBLAS's; the softmax kernel sits between them
        losses, grads = kernels.info_nce_queue(d["q"], d["k"], d["queue"], 0.07, "mean",
                                               ("q", "k", "negatives"))
        out += [losses, grads["q"], grads["k"], grads["negatives"]]
    kernels.momentum_update(d["target"], d["source"], 0.99)
    out.append(d["target"])
    kernels.sgd_step(d["p"], d["g"], d["buf"], 0.1, 0.9, 0.0, 5e-4, True, False)
    out += [d["p"], d["buf"]]
    y, denom, clamped = kernels.l2_normalize_rows(d["q"] * 1e-13, 1e-12)  # a clamped row or more
    out += [y, denom, clamped, kernels.l2_normalize_rows_backward(y, d["k"], denom, clamped)]
    out.append(kernels.relu_backward(d["dy"], d["x_nchw"]))  # x as ReLU's output: signs mixed
    out.append(kernels.im2col(d["x_nhwc"], 3, 3, 2, 1, 4, 4))
    out.append(kernels.col2im(d["dcols"], 7, 7, 2, 1))
    counter = cupy.asarray(np.array(41, np.int64))  # counted in the launch in training
    for train in (True, False):
        y, cache = kernels.batch_norm_forward(d["x_nchw"], d["gamma"], d["beta"], d["mean"],
                                              d["var"], train=train, num_batches_tracked=counter)
        out += [y, d["mean"].copy(), d["var"].copy(), counter.copy(),
                *kernels.batch_norm_backward(d["dy"], cache)]
    assert int(counter) == 42
    cupy.cuda.get_current_stream().synchronize()
    return [cupy.asnumpy(a) for a in out]


def assert_bitwise(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)), i


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_kernel_gives_the_same_bits_through_either_launcher(cupy, kernels, monkeypatch,
                                                                    dtype):
    host = inputs(dtype)
    results = {}
    for launcher in kernels.LAUNCHERS:
        monkeypatch.setattr(kernels, "LAUNCHER", launcher)
        monkeypatch.setattr(kernels, "_FUNCTIONS", {})
        results[launcher] = run_kernels(cupy, kernels, host)
        assert bool(kernels._FUNCTIONS) == (launcher == "cupy")  # the CuPy launch was used
    assert_bitwise(results["cupy"], results["numba"])


def test_the_cupy_launcher_runs_on_cupys_current_stream(cupy, kernels, monkeypatch):
    """Under a non-blocking stream (which does not wait for the default one), the kernels read
    inputs copied on that stream and their results are read after syncing it alone: a kernel
    launched on another stream would race both. Same bits as on the default stream."""
    monkeypatch.setattr(kernels, "LAUNCHER", "cupy")
    host = inputs(np.float32, seed=1)
    on_default = run_kernels(cupy, kernels, host, with_cublas=False)
    with cupy.cuda.Stream(non_blocking=True):
        on_stream = run_kernels(cupy, kernels, host, with_cublas=False)
    assert_bitwise(on_stream, on_default)


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_moco_steps_take_the_same_bits_through_either_launcher(cupy, kernels, monkeypatch, kind):
    """Three MoCo steps (shuffled batch norm, InfoNCE, SGD, the momentum update, the enqueue):
    the state after them is bitwise the same through either launcher."""
    from refmoco import Queue
    from refmoco.mechanisms import MoCo
    from refmoco.nn import cnn_encoder, mlp_encoder
    from refmoco.optim import SGD

    enc = (cnn_encoder(in_channels=1, widths=(4, 8, 8), out_dim=8) if kind == "cnn"
           else mlp_encoder(in_features=16, hidden=24, feat_dim=12, out_dim=8))
    shape = (1, 6, 6) if kind == "cnn" else (16,)
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(2, 16, *shape)).astype(np.float32) for _ in range(3)]
    states = {}
    for launcher in kernels.LAUNCHERS:
        monkeypatch.setattr(kernels, "LAUNCHER", launcher)
        params, buffers = enc.init(np.random.default_rng(0), "float32", backend="cupy")
        moco = MoCo(enc, params, buffers, SGD(0.1, momentum=0.9, weight_decay=5e-4),
                    queue=Queue(40, 8, seed=0, backend="cupy"), momentum=0.99,
                    temperature=0.1, bn_groups=2)
        for s, (xq, xk) in enumerate(batches):
            moco.step(cupy.asarray(xq), cupy.asarray(xk), np.arange(16) + 16 * s, 0.1)
        states[launcher] = moco.state_dict()
    assert set(states["cupy"]) == set(states["numba"])
    for key, want in states["numba"].items():
        assert_bitwise([np.asarray(states["cupy"][key])], [np.asarray(want)])
