"""The CUDA kernels (refmoco.kernels.cuda) on Numba's CUDA simulator, against the NumPy reference.

The simulator must be switched on before Numba is imported, so the kernels run in a subprocess:
this file, run as a script with NUMBA_ENABLE_CUDASIM=1, computes every case and prints, for each
result, its error and how far it exceeds its bound as JSON; the tests below check them. InfoNCE is
compared with the float64 reference on the same inputs, within the rounding bound of
``naive.info_nce_rounding_bound`` (as in test_backends.py); the other kernels bitwise. The simulator
runs the kernels with 4 threads per block and at most 3 blocks, so the shapes below exercise the
tree reductions, several blocks, and the grid-stride loops over rows and columns."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba")

SKIP = 3  # the child's exit status when the simulator is unavailable

# (N, C, K): rows > 3 blocks, columns > 4 threads, an empty queue, an empty batch
SHAPES = [(1, 1, 1), (2, 3, 5), (5, 4, 9), (7, 2, 13), (3, 2, 0), (0, 3, 4)]
MODES = [("mean", ("q", "k", "negatives")), ("sum", ("q", "k", "negatives")), ("mean", ("k",)),
         ("sum", ())]  # (reduction, wrt)


# (N, H, W, C, kh, kw, stride, padding): windows cut by the border, strides that skip pixels,
# padding wider than the kernel reaches, 1x1 kernels; every size > 3 blocks of 4 threads
CONV_SHAPES = [(2, 5, 5, 3, 3, 3, 1, 1), (1, 6, 7, 2, 3, 3, 2, 1), (3, 4, 4, 1, 1, 1, 1, 0),
               (2, 5, 6, 2, 2, 3, 2, 0), (1, 3, 3, 2, 3, 3, 1, 2), (2, 8, 8, 3, 3, 3, 2, 1)]


def child() -> None:
    """Run in the subprocess: every case, as JSON lines ``{case, name, err, over, ok}``."""
    from numba import config

    assert config.ENABLE_CUDASIM, "NUMBA_ENABLE_CUDASIM=1 must be set before numba is imported"
    try:
        from numba import cuda  # noqa: F401
    except Exception as exc:  # an install without the simulator: the tests skip
        print(f"no simulator: {exc!r}", file=sys.stderr)
        sys.exit(SKIP)
    import naive

    import refmoco
    from refmoco.kernels import cuda as kernels

    rng = np.random.default_rng(0)
    for dtype in ("float32", "float64"):
        for n, c, size in SHAPES:
            q, k, queue = (rng.uniform(-1.5, 1.5, s).astype(dtype)
                           for s in ((n, c), (n, c), (size, c)))
            t = 0.01 if n % 2 else 0.2  # 0.01: logits up to 900, exp overflows without the max
            wide = [a.astype(np.float64) for a in (q, k, queue)]
            for reduction, wrt in MODES:
                ref = refmoco.info_nce_loss(*wide, temperature=t, reduction=reduction, wrt=wrt)
                # the kernel's rounding in its dtype plus the float64 reference's own
                bounds = [naive.info_nce_rounding_bound(q, k, queue, t, reduction, d)
                          for d in (dtype, np.float64)]
                losses, grads = kernels.info_nce_queue(q, k, queue, t, reduction, wrt)
                loss = losses.sum(dtype=dtype) * (1 / n if n and reduction == "mean" else 1)
                case = f"info_nce {dtype} N={n} C={c} K={size} {reduction} wrt={wrt}"
                report(case, "loss", loss, ref.loss, bounds[0][0] + bounds[1][0],
                       losses.dtype == dtype and losses.shape == (n,))
                if set(grads) != set(ref.grads):
                    report(case, "grads", 1.0, 0.0, 0.0, False)
                for name, g in grads.items():
                    report(case, name, g, ref.grads[name], bounds[0][1][name] + bounds[1][1][name],
                           g.dtype == dtype and g.shape == ref.grads[name].shape)
        for size, layout in ((1, "C"), (10, "C"), (37, "C"), (12, "F"), (12, "strided")):
            base = rng.standard_normal((size, 3)).astype(dtype)
            source = rng.standard_normal((size, 3))  # float64: cast to the target's dtype
            ref = base.copy()
            refmoco.momentum_update(ref, source, 0.9)
            target = {"C": base.copy(), "F": np.asfortranarray(base),
                      "strided": np.repeat(base, 2, axis=1)[:, ::2]}[layout]
            kernels.momentum_update(target, source, 0.9)
            report(f"momentum {dtype} size={size} layout={layout}", "target", target, ref, 0.0,
                   target.dtype == dtype)
        conv_cases(rng, dtype)
        bn_cases(rng, dtype)
        sgd_cases(rng, dtype)
        normalize_cases(rng, dtype)
        relu_cases(rng, dtype)


# (rows, columns): rows beyond 3 blocks, columns beyond 4 threads, one column
NORMALIZE_SHAPES = [(1, 1), (5, 3), (7, 9), (4, 1)]
NORMALIZE_TOL = {"float64": 1e-13, "float32": 1e-5}  # relative to the size of the terms


# (shape, channels-last memory): more elements than 3 blocks of 4 threads (grid-stride loop)
RELU_SHAPES = [((7,), False), ((5, 3), False), ((4, 5, 3, 2), False), ((4, 5, 3, 2), True),
               ((2, 3, 1, 1), True)]


def relu_cases(rng, dtype) -> None:
    """ReLU's backward kernel against ``dy * (y > 0)``, bitwise: the zeros' signs and where the
    NaNs are included (``y``: both zeros, a subnormal, the infinities, NaN; ``dy``: negatives,
    NaN)."""
    from refmoco.kernels import cuda as kernels

    special = np.array([0.0, -0.0, np.finfo(dtype).smallest_subnormal, np.inf, -np.inf, np.nan],
                       dtype)
    for shape, last in RELU_SHAPES:
        y = np.maximum(rng.standard_normal(shape), 0).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        y.reshape(-1)[:len(special)] = special[:y.size]
        dy.reshape(-1)[-1] = np.nan
        if last:
            y, dy = (np.moveaxis(np.ascontiguousarray(np.moveaxis(a, 1, -1)), -1, 1)
                     for a in (y, dy))
        want = dy * (y > 0)
        fits = kernels.relu_backward_fits(dy, y)
        got = kernels.relu_backward(dy, y)
        same_bits = (np.array_equal(np.isnan(got), np.isnan(want))
                     and np.array_equal(np.signbit(got), np.signbit(want)))
        report(f"relu {dtype} {shape} last={last}", "dx", np.nan_to_num(got), np.nan_to_num(want),
               0.0, fits and same_bits and got.dtype == want.dtype and got.strides == want.strides)


def normalize_cases(rng, dtype) -> None:
    """The row normalisation kernels against :func:`refmoco.l2_normalize` in the same dtype:
    ordinary rows, a zero row and a row below ``eps`` (both clamped), a row of huge entries
    (squares that overflow without the scaled norm) and one of tiny ones (squares that
    underflow), also through a strided view; the gradient too."""
    import refmoco
    from refmoco.kernels import cuda as kernels

    big = 1e30 if dtype == "float32" else 1e200
    for n, c in NORMALIZE_SHAPES:
        wide = rng.standard_normal((n, 2 * c))
        wide[0] = 0.0  # clamped: y = 0, dx = dy / eps
        if n > 2:
            wide[1] *= big
            wide[2] *= 1 / big
        if n > 3:
            wide[3] *= 1e-14  # a norm below eps = 1e-12: clamped, not zero
        if n > 4:
            wide[4] = 0.0
            wide[4, 0] = 1e-12  # a norm of eps exactly: not clamped (torch's clamp_min)
        for layout in ("C", "strided"):
            x = (wide[:, ::2] if layout == "strided" else wide[:, :c]).astype(dtype)
            if layout == "strided":
                x = np.repeat(x, 2, axis=1)[:, ::2]  # the same rows, a strided view
            dy = rng.standard_normal((n, c)).astype(dtype)
            y_ref, backward = refmoco.l2_normalize(x)
            dx_ref = backward(dy)
            y, denom, clamped = kernels.l2_normalize_rows(x, 1e-12)
            dx = kernels.l2_normalize_rows_backward(y, dy, denom, clamped)
            # dx: each term is at most |dy| (1 + |y|^2) / denom, and denom is at least eps
            eps = float(np.dtype(dtype).type(1e-12))  # as the kernel and the reference see it
            norms = np.maximum(np.linalg.norm(x.astype(np.float64), axis=1), eps)
            d_scale = float(np.max(2 * np.abs(dy).max(axis=1) / norms))
            case = f"normalize {dtype} x={x.shape} {layout}"
            tol = NORMALIZE_TOL[dtype]
            report(case, "y", y, y_ref, tol, y.dtype == dtype and y.shape == x.shape)
            report(case, "dx", dx, dx_ref, tol * d_scale, dx.dtype == dtype)
            exact = np.linalg.norm(x.astype(np.float64), axis=1)
            report(case, "clamped", clamped, exact < eps, 0.0, clamped.dtype == np.bool_)


# (momentum, dampening, weight_decay, nesterov): plain, heavy-ball, dampened, Nesterov, decay only
SGD_CASES = [(0.0, 0.0, 0.0, False), (0.9, 0.0, 5e-4, False), (0.9, 0.3, 1e-2, False),
             (0.9, 0.0, 5e-4, True), (0.0, 0.0, 1e-3, False)]


def sgd_cases(rng, dtype) -> None:
    """Three steps of the SGD kernel against :class:`refmoco.optim.SGD` on NumPy, bitwise: the
    parameters and the momentum buffer (its first step sets the buffer to the gradient)."""
    from refmoco.kernels import cuda as kernels
    from refmoco.optim import SGD

    for size in (1, 13, 40):
        for momentum, dampening, wd, nesterov in SGD_CASES:
            ref = SGD(0.1, momentum=momentum, weight_decay=wd, dampening=dampening,
                      nesterov=nesterov)
            p_ref = rng.standard_normal(size).astype(dtype)
            p, buf = p_ref.copy(), np.empty(size, dtype) if momentum else None
            for step in range(3):
                g = rng.standard_normal(size).astype(dtype)
                ref.step(p_ref, g, lr=0.1 / (step + 1))
                kernels.sgd_step(p, g, buf, 0.1 / (step + 1), momentum, dampening, wd,
                                 nesterov, first_step=step == 0)
            case = f"sgd {dtype} size={size} m={momentum} damp={dampening} wd={wd} nesterov={nesterov}"
            report(case, "params", p, p_ref, 0.0, p.dtype == dtype)
            if momentum:
                report(case, "buffer", buf, ref.momentum_buffer, 0.0, buf.dtype == dtype)


# (shape, channels-last memory): 2-d (BatchNorm1d), 3-d and 4-d; rows and channels beyond 4
# threads and 3 blocks, so that the reductions, the grid-stride loops and the channel loop run
BN_SHAPES = [((5, 3), False), ((9, 7), False), ((4, 5, 3, 2), False), ((4, 5, 3, 2), True),
             ((3, 4, 5), False), ((2, 1, 1, 1), False)]
BN_TOL = {"float64": 1e-12, "float32": 1e-5}  # relative to the size of each result's terms


def bn_cases(rng, dtype) -> None:
    """Batch norm's kernels against the reference, within a tolerance relative to the size of
    the terms each result is a sum of (as tests/test_nn_kernels.py bounds the Numba kernels):
    the kernels sum in float64, NumPy pairwise in the dtype. The running statistics too."""
    from refmoco.kernels import cuda as kernels
    from refmoco.nn import functional as F

    for shape, last in BN_SHAPES:
        for train in (True, False):
            c = shape[1]
            x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
            if last:
                x = np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
            gamma, beta = (rng.standard_normal(c).astype(dtype) for _ in range(2))
            stats = rng.standard_normal(c).astype(dtype), (rng.random(c) + 0.5).astype(dtype)
            ref_stats, our_stats = [s.copy() for s in stats], [s.copy() for s in stats]
            y_ref, c_ref = F.batch_norm_forward(x, gamma, beta, *ref_stats, train=train)
            counter = np.array(41, np.int64)  # counted by the kernel's launch in training
            y, cache = kernels.batch_norm_forward(x, gamma, beta, *our_stats, train=train,
                                                  momentum=0.1, eps=1e-5,
                                                  num_batches_tracked=counter)
            dy = rng.standard_normal(shape).astype(dtype)
            s_x = float(np.max(np.abs(x)) * np.max(c_ref.inv_std))
            d_max, m = float(np.max(np.abs(dy))), x.size // c
            scales = {"y": float(np.max(np.abs(gamma))) * s_x + float(np.max(np.abs(beta))),
                      "x_hat": s_x, "inv_std": float(np.max(c_ref.inv_std)),
                      "running_mean": float(np.max(np.abs(ref_stats[0]))),
                      "running_var": float(np.max(ref_stats[1])),
                      "dx": float(np.max(np.abs(gamma * c_ref.inv_std.reshape(-1)))) * d_max
                      * (1 + s_x * s_x),
                      "dgamma": m * d_max * s_x, "dbeta": m * d_max, "num_batches_tracked": 0}
            results = {"y": (y, y_ref), "x_hat": (cache.x_hat, c_ref.x_hat),
                       "inv_std": (cache.inv_std, c_ref.inv_std),
                       "running_mean": (our_stats[0], ref_stats[0]),
                       "running_var": (our_stats[1], ref_stats[1]),
                       "num_batches_tracked": (counter, np.array(41 + train, np.int64))}
            grads = kernels.batch_norm_backward(dy, cache)
            for name, got, want in zip(("dx", "dgamma", "dbeta"), grads,
                                       F.batch_norm_backward(dy, c_ref), strict=True):
                results[name] = (got, want)
            case = f"batch_norm {dtype} x={shape} last={last} train={train}"
            for name, (got, want) in results.items():
                report(case, name, got, want, BN_TOL[dtype] * scales[name],
                       got.dtype == want.dtype and got.shape == want.shape)
            # into given arrays (a model's gradient buffer): NaN before, the same bits after
            flat = np.full(2 * c + 1, np.nan, dtype)
            out = flat[1:c + 1], flat[c + 1:]
            into = kernels.batch_norm_backward(dy, cache, out)
            for name, got, want, target in zip(("dgamma into", "dbeta into"), into[1:], grads[1:],
                                               out, strict=True):
                report(case, name, got, want, 0.0, got is target)


def conv_cases(rng, dtype) -> None:
    """im2col and col2im against the reference's window view and scatter, bitwise."""
    from refmoco.kernels import cuda as kernels
    from refmoco.nn import functional as F

    for n, h, w, c, kh, kw, s, p in CONV_SHAPES:
        ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
        x = rng.standard_normal((n, h, w, c)).astype(dtype)
        case = f"conv {dtype} x={x.shape} k={kh}x{kw} s={s} p={p}"
        cols = kernels.im2col(x, kh, kw, s, p, ho, wo)
        ref = F._im2col(x, kh, kw, s, p, ho, wo)
        report(case, "im2col", cols, ref, 0.0,
               cols.dtype == dtype and cols.shape == (n, ho, wo, kh, kw, c))
        dcols = rng.standard_normal((n, ho, wo, kh, kw, c)).astype(dtype)
        dcols[0, 0, 0, 0, 0, 0] = -0.0  # the reference's zero start turns -0.0 into +0.0
        dx = kernels.col2im(dcols, h, w, s, p)
        ref = F._col2im(dcols, h, w, s, p)
        report(case, "col2im", dx, ref, 0.0, dx.dtype == dtype and dx.shape == (n, h, w, c)
               and np.array_equal(np.signbit(dx), np.signbit(ref)))


def report(case, name, actual, expected, bound, ok) -> None:
    """``err``: the largest error; ``over``: the largest excess over ``bound`` (a number, or one
    per entry), positive when an entry is beyond it (NaN counts as beyond)."""
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape == e.shape:
        diff = np.abs(a - e)
        err = float(diff.max(initial=0.0))
        over = float(np.where(np.isnan(diff), np.inf, diff - bound).max(initial=-np.inf))
    else:
        err = over = float("inf")
    print(json.dumps({"case": case, "name": name, "err": err, "over": over, "ok": bool(ok)}))


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                          timeout=600)
    if proc.returncode == SKIP:
        pytest.skip(f"Numba's CUDA simulator cannot run here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, f"the simulator run failed:\n{proc.stderr[-3000:]}"
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_case_ran(results):
    cases = {r["case"] for r in results}
    assert len([c for c in cases if c.startswith("info_nce")]) == 2 * len(SHAPES) * len(MODES)
    assert len([c for c in cases if c.startswith("momentum")]) == 2 * 5


def test_info_nce_kernel_matches_the_reference(results):
    bad = [r for r in results if r["case"].startswith("info_nce")
           and not (r["ok"] and r["over"] <= 0)]
    assert not bad, bad[:5]


def test_conv_kernels_are_bitwise_the_reference(results):
    conv = [r for r in results if r["case"].startswith("conv")]
    assert len(conv) == 2 * 2 * len(CONV_SHAPES)  # im2col and col2im, two dtypes
    bad = [r for r in conv if not (r["ok"] and r["err"] == 0)]
    assert not bad, bad[:5]


def test_batch_norm_kernels_match_the_reference(results):
    bn = [r for r in results if r["case"].startswith("batch_norm")]
    assert len({r["case"] for r in bn}) == 2 * 2 * len(BN_SHAPES)  # two dtypes, train and eval
    # y, x_hat, inv_std, running stats, the counter, 3 gradients, 2 of them into given arrays
    assert len(bn) == 11 * 2 * 2 * len(BN_SHAPES)
    bad = [r for r in bn if not (r["ok"] and r["over"] <= 0)]
    assert not bad, bad[:5]


def test_normalize_kernels_match_the_reference(results):
    rows = [r for r in results if r["case"].startswith("normalize")]
    assert len(rows) == 3 * 2 * 2 * len(NORMALIZE_SHAPES)  # y, dx, clamped; dtypes; layouts
    bad = [r for r in rows if not (r["ok"] and r["over"] <= 0)]
    assert not bad, bad[:5]


def test_relu_backward_kernel_is_bitwise_the_reference(results):
    rows = [r for r in results if r["case"].startswith("relu")]
    assert len(rows) == 2 * len(RELU_SHAPES)
    bad = [r for r in rows if not (r["ok"] and r["err"] == 0)]
    assert not bad, bad[:5]


def test_sgd_kernel_is_bitwise_the_reference(results):
    sgd = [r for r in results if r["case"].startswith("sgd")]
    with_buffer = sum(1 for m, *_ in SGD_CASES if m)
    assert len(sgd) == 2 * 3 * (len(SGD_CASES) + with_buffer)  # dtypes, sizes, arrays
    bad = [r for r in sgd if not (r["ok"] and r["err"] == 0)]
    assert not bad, bad[:5]


def test_momentum_kernel_is_bitwise_the_reference(results):
    bad = [r for r in results if r["case"].startswith("momentum") and not (r["ok"] and r["err"] == 0)]
    assert not bad, bad[:5]


if __name__ == "__main__":
    child()
