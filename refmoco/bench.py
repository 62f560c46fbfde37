"""``refmoco bench``: the hot path on each backend, side by side with PyTorch, in one process.

Every case is timed once per round, the rounds interleave all cases (so that a busy machine
slows them alike), and the table shows medians and their ratio to PyTorch's official
formulation. Within a group, refmoco's cases run one after another and PyTorch's after them, in a
fixed order: an op that runs right after the other library's is slowed by it (PyTorch's OpenMP
threads spin after each op; a 32 MB copy leaves the caches cold), so each compared case follows
an op of its own library, as in a training loop (``docs/benchmarks.md``, "Order"). The cases:

- InfoNCE forward and backward (gradient of ``q``, as MoCo needs), N=256, C=128, float32, a queue
  of K = 4096 / 16384 / 65536 keys: refmoco on ``numpy``, ``numba`` and ``cupy`` (with a GPU),
  PyTorch as MoCo writes it (``einsum`` for ``l_pos``/``l_neg``, ``cat``, ``cross_entropy``,
  ``backward``), and the floor: the two matrix products ``q @ queue.T`` and ``P @ queue`` alone
  (whole, into preallocated arrays, in the faster of the two layouts).
- The key encoder's momentum update, 11.2M parameters in 62 tensors (a ResNet-18 with MoCo's
  128-d head): refmoco per tensor and on one flat buffer; PyTorch's official loop and
  ``torch._foreach_lerp_``.
- Enqueueing 256 keys into a 65536 x 128 queue: refmoco's ``Queue.enqueue`` (checks included)
  and the bare slice write; PyTorch's ``queue[:, p:p+b] = keys.T`` (MoCo) and the clone-and-slice
  of libraries that return the bank they update.

Threads: OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT`` once, when NumPy loads, so unless it is set
(or ``--inherit-env`` is given) the benchmark reruns itself in a fresh interpreter with
``OPENBLAS_THREAD_TIMEOUT=4``. The settings in effect are printed above the table.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

THREAD_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4"}  # set before NumPy loads (see docs/benchmarks.md)
GROUPS = ("info-nce", "momentum", "enqueue", "step", "gpu")  # what --only can pick


@dataclass
class Case:
    label: str
    fn: Callable[[], object]
    sync: Callable[[], object] | None = None  # waits for a GPU
    timer: Callable | None = None  # fn -> (seconds, late): the GPU's time (DeviceTimer)
    times: list = field(default_factory=list)
    late: int = 0  # timed calls that the timer flagged as possibly holding idle time

    def reset(self) -> None:
        self.times.clear()
        self.late = 0

    def run(self) -> None:
        if self.timer is not None:
            seconds, late = self.timer(self.fn)
            self.times.append(seconds)
            self.late += late
            return
        t0 = time.perf_counter()
        self.fn()
        if self.sync is not None:
            self.sync()
        self.times.append(time.perf_counter() - t0)


@dataclass
class Group:
    title: str
    cases: list  # of Case
    reference: str  # label of the PyTorch case the ratios divide by
    notes: list = field(default_factory=list)
    bandwidth: dict = field(default_factory=dict)  # label -> bytes moved, to print GB/s


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and fewer rounds (15 to 30 s on 2 cores)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per case (default 7; 3 with --quick)")
    parser.add_argument("--only", action="append", choices=GROUPS, default=None,
                        help="run only these groups (repeatable; default: all)")
    parser.add_argument("--inherit-env", action="store_true",
                        help="run with the thread settings of this process as they are")


# -- the cases ----------------------------------------------------------------------------------


def _unit_rows(rng, rows, dim):
    import numpy as np

    x = rng.standard_normal((rows, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy if cupy.is_available() else None


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def info_nce_group(k_size: int, n: int = 256, c: int = 128) -> Group:
    import numpy as np

    import refmoco

    rng = np.random.default_rng(0)
    q, k, queue = _unit_rows(rng, n, c), _unit_rows(rng, n, c), _unit_rows(rng, k_size, c)
    t = 0.07
    logits_t, dq, q_t = np.empty((k_size, n), np.float32), np.empty((n, c), np.float32), q.T.copy()

    def floor():  # the two products every formulation needs, in OpenBLAS's faster layout
        np.dot(queue, q_t, out=logits_t)  # (K, N); q @ queue.T into (N, K) is slower
        np.dot(logits_t.T, queue, out=dq)  # (N, C)

    def ours(backend, q=q, k=k, queue=queue):
        return lambda: refmoco.info_nce_loss(q, k, queue, temperature=t, wrt=("q",),
                                             backend=backend)

    cases = [Case("matrix products only", floor), Case("refmoco numpy", ours("numpy"))]
    notes = []
    try:
        a, b = ours("numpy")(), ours("numba")()  # raises first if Numba is missing
        cases.append(Case("refmoco numba", ours("numba")))
        err = float(np.abs(a.grads["q"] - b.grads["q"]).max() / np.abs(a.grads["q"]).max())
        notes.append(f"numba vs numpy: |loss diff| {abs(float(a.loss) - float(b.loss)):.1e}, "
                     f"max |dq diff| / max |dq| {err:.1e}")
    except refmoco.BackendUnavailableError as exc:
        notes.append(f"numba: {exc}")
    torch = _torch()
    if torch is not None:
        tq, tk = torch.from_numpy(q), torch.from_numpy(k)
        tqueue = torch.from_numpy(np.ascontiguousarray(queue.T))  # MoCo stores it (C, K)

        def official():  # moco/builder.py
            qq = tq.detach().requires_grad_(True)
            l_pos = torch.einsum("nc,nc->n", [qq, tk]).unsqueeze(-1)
            l_neg = torch.einsum("nc,ck->nk", [qq, tqueue])
            logits_ = torch.cat([l_pos, l_neg], dim=1) / t
            labels = torch.zeros(logits_.shape[0], dtype=torch.long)
            torch.nn.functional.cross_entropy(logits_, labels).backward()
            return qq.grad

        cases.append(Case("PyTorch (MoCo's code)", official))
    title = f"InfoNCE forward+backward, N={n}, C={c}, K={k_size}, float32 (gradient of q)"
    return Group(title, cases, "PyTorch (MoCo's code)", notes)


def resnet18_shapes(head: int = 128) -> list:
    """The 62 parameter shapes of a ResNet-18 with MoCo's 128-d fc head (11.2M parameters)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    c_in = 64
    for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            shapes += [(c_out, c_in if block == 0 else c_out, 3, 3), (c_out,), (c_out,),
                       (c_out, c_out, 3, 3), (c_out,), (c_out,)]
            if block == 0 and (stride != 1 or c_in != c_out):
                shapes += [(c_out, c_in, 1, 1), (c_out,), (c_out,)]
        c_in = c_out
    return shapes + [(head, 512), (head,)]


def momentum_group() -> Group:
    import numpy as np

    import refmoco

    m = 0.999
    shapes = resnet18_shapes()
    sizes = [int(np.prod(s)) for s in shapes]
    rng = np.random.default_rng(0)
    flat_k = rng.standard_normal(sum(sizes), dtype=np.float32)
    flat_q = rng.standard_normal(sum(sizes), dtype=np.float32)
    offsets = np.cumsum([0, *sizes])

    def views(flat):
        return {f"p{i}": flat[offsets[i] : offsets[i + 1]].reshape(s) for i, s in enumerate(shapes)}

    pk, pq = views(flat_k), views(flat_q)
    notes = []
    cases = [
        Case("refmoco numpy, 62 tensors", lambda: refmoco.momentum_update(pk, pq, m)),
        Case("refmoco numpy, flat buffer", lambda: refmoco.momentum_update(flat_k, flat_q, m)),
    ]
    try:
        refmoco.momentum_update(flat_k, flat_q, m, backend="numba")
        cases += [
            Case("refmoco numba, 62 tensors",
                 lambda: refmoco.momentum_update(pk, pq, m, backend="numba")),
            Case("refmoco numba, flat buffer",
                 lambda: refmoco.momentum_update(flat_k, flat_q, m, backend="numba")),
        ]
    except refmoco.BackendUnavailableError as exc:
        notes.append(f"numba: {exc}")
    torch = _torch()
    reference = "torch._foreach_lerp_"
    if torch is not None:
        tk = [torch.from_numpy(a.copy()) for a in pk.values()]
        tq = [torch.from_numpy(a.copy()) for a in pq.values()]

        def official():  # moco/builder.py: _momentum_update_key_encoder
            for param_k, param_q in zip(tk, tq):
                param_k.data = param_k.data * m + param_q.data * (1.0 - m)

        cases += [Case("PyTorch loop (MoCo's code)", official),
                  Case(reference, lambda: torch._foreach_lerp_(tk, tq, 1.0 - m))]
    title = f"Momentum update, {sum(sizes) / 1e6:.1f}M float32 parameters in {len(shapes)} tensors"
    return Group(title, cases, reference, notes)


def enqueue_group(size: int = 65536, dim: int = 128, batch: int = 256) -> Group:
    import numpy as np

    from refmoco import Queue

    rng = np.random.default_rng(0)
    keys = _unit_rows(rng, batch, dim)
    queue = Queue(size, dim, seed=0)
    raw = np.array(queue.keys)
    ptr = [0]

    def bare():
        raw[ptr[0] : ptr[0] + batch] = keys
        ptr[0] = (ptr[0] + batch) % size

    # the bare write first: it, not Queue.enqueue, follows the op before the group (docs: Order)
    cases = [Case("NumPy slice write, (K, C) rows", bare),
             Case("refmoco Queue.enqueue (with checks)", lambda: queue.enqueue(keys))]
    torch = _torch()
    reference = "PyTorch queue[:, p:p+b] = keys.T"
    if torch is not None:
        tqueue, tkeys, tptr = torch.from_numpy(raw.T.copy()), torch.from_numpy(keys), [0]

        def official():  # moco/builder.py: _dequeue_and_enqueue, queue stored (C, K)
            tqueue[:, tptr[0] : tptr[0] + batch] = tkeys.T
            tptr[0] = (tptr[0] + batch) % size

        def cloned():
            bank = tqueue.clone()
            bank[:, tptr[0] : tptr[0] + batch] = tkeys.T
            return bank

        cases += [Case(reference, official), Case("PyTorch clone, then slice", cloned)]
    return Group(f"Enqueue {batch} keys into a {size} x {dim} float32 queue", cases, reference)


def training_step_groups(quick: bool) -> list:
    """One MoCo training step (query forward and backward, momentum update, key forward, the
    loss against a queue of 4096 keys, SGD with momentum and weight decay, enqueue), batch 256,
    float32: refmoco on ``numpy`` and ``numba`` against the same step in PyTorch written as
    MoCo's ``builder.py`` (one process: no shuffle BN; refmoco runs with ``bn_groups=1``)."""
    return [training_step_group(*spec) for spec in _step_specs()]


def _queue_sizes(quick: bool) -> tuple:
    """The queue sizes K of the InfoNCE groups."""
    return (4096, 16384) if quick else (4096, 16384, 65536)


def _step_specs() -> list:
    from .nn import cnn_encoder, mlp_encoder

    return [("small CNN (32-64-64) on 1x8x8 images", cnn_encoder(in_channels=1), (1, 8, 8)),
            ("MLP 64-256-256 + head 256-128", mlp_encoder(in_features=64), (64,))]


def training_step_group(name: str, encoder, shape: tuple, n: int = 256,
                        k_size: int = 4096) -> Group:
    import numpy as np

    from .backend import BackendUnavailableError

    t, m, lr = 0.1, 0.99, 0.03
    rng = np.random.default_rng(0)
    xq, xk = rng.random((n, *shape), dtype=np.float32), rng.random((n, *shape), dtype=np.float32)
    cases, notes = [], []
    for backend in ("numpy", "numba"):
        try:
            step = _refmoco_moco_step(encoder, backend, xq, xk, k_size, t, m, lr)
        except (ImportError, BackendUnavailableError) as exc:
            notes.append(f"{backend}: {exc}")
            continue
        cases.append(Case(f"refmoco {backend}", step))
    torch = _torch()
    if torch is not None:
        cases.append(Case("PyTorch (MoCo's builder.py)",
                          _torch_moco_step(torch, encoder, xq, xk, k_size, t, m, lr, "cpu")))
    return Group(f"MoCo training step: {name}, batch {n}, K={k_size}, float32", cases,
                 "PyTorch (MoCo's builder.py)", notes)


def _refmoco_moco_step(encoder, backend, xq, xk, k_size, t, m, lr):
    """refmoco's MoCo step on ``backend`` (the views ``xq``, ``xk`` already there), with the
    weights of ``encoder`` initialised from seed 0 as in :func:`_torch_moco_step`; runs one step
    (which raises if the backend is unavailable) and returns the step as a function of no
    arguments."""
    import numpy as np

    from .dictionary import Queue
    from .mechanisms import MoCo
    from .optim import SGD

    params, buffers = encoder.init(np.random.default_rng(0), "float32", backend=backend)
    moco = MoCo(encoder, params, buffers,
                SGD(lr, momentum=0.9, weight_decay=5e-4, backend=backend),
                queue=Queue(k_size, 128, seed=0, backend=backend), momentum=m, temperature=t,
                bn_groups=1, backend=backend)
    ids = np.arange(len(xq))
    moco.step(xq, xk, ids, lr)
    return lambda: moco.step(xq, xk, ids, lr)


def _torch_moco_step(torch, encoder, xq, xk, k_size, t, m, lr, device):
    """MoCo's ``builder.py`` step (one process, no shuffle BN) with the weights of ``encoder``
    initialised from seed 0, on ``device``; returns the step as a function of no arguments."""
    import numpy as np

    from .testing.torch_models import torch_twin

    n = len(xq)
    F = torch.nn.functional
    params, buffers = encoder.init(np.random.default_rng(0), "float32")
    net_q = torch_twin(encoder, params, buffers).to(device)
    net_k = torch_twin(encoder, params, buffers).to(device)
    for p in net_k.parameters():
        p.requires_grad = False
    opt = torch.optim.SGD(net_q.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    queue = F.normalize(torch.randn(128, k_size), dim=0).to(device)  # MoCo stores it (C, K)
    tq, tk = torch.from_numpy(xq).to(device), torch.from_numpy(xk).to(device)
    labels = torch.zeros(n, dtype=torch.long, device=device)
    state = {"ptr": 0}

    def official():
        q = F.normalize(net_q(tq), dim=1)
        with torch.no_grad():  # _momentum_update_key_encoder, then the keys
            for pk, pq in zip(net_k.parameters(), net_q.parameters()):
                pk.data = pk.data * m + pq.data * (1.0 - m)
            k = F.normalize(net_k(tk), dim=1)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", [q, queue.clone().detach()])
        logits = torch.cat([l_pos, l_neg], dim=1) / t
        loss = F.cross_entropy(logits, labels)
        ptr = state["ptr"]  # _dequeue_and_enqueue
        queue[:, ptr:ptr + n] = k.T
        state["ptr"] = (ptr + n) % k_size
        opt.zero_grad()
        loss.backward()
        opt.step()

    return official


# -- on the GPU: refmoco cupy against PyTorch CUDA ---------------------------------------------


def _torch_cuda():
    torch = _torch()
    return torch if torch is not None and torch.cuda.is_available() else None


def gpu_groups(quick: bool) -> list:
    """The GPU cases, each group against PyTorch on the same GPU (when it has CUDA): InfoNCE,
    the momentum update next to a device-to-device copy of the same buffer (the bandwidth the
    update is measured against), and the MoCo training step. Empty without a GPU."""
    cupy = _cupy()
    if cupy is None:
        return []
    return ([gpu_info_nce_group(cupy, k) for k in _queue_sizes(quick)]
            + gpu_momentum_groups(cupy)
            + [gpu_training_step_group(cupy, *spec) for spec in _step_specs()])


def _gpu_sync(cupy):
    torch = _torch_cuda()
    stream = cupy.cuda.get_current_stream()

    def sync():
        stream.synchronize()
        if torch is not None:
            torch.cuda.synchronize()

    return sync


def _launched_by(launcher, fn):
    """``fn`` with refmoco's Numba CUDA kernels launched by ``launcher`` (numba-cuda's launch or
    CuPy's; :data:`refmoco.kernels.cuda.LAUNCHER`), whatever the setting outside it."""
    from .kernels import cuda as kernels

    def run():
        outside, kernels.LAUNCHER = kernels.LAUNCHER, launcher
        try:
            return fn()
        finally:
            kernels.LAUNCHER = outside

    return run


def _launchers():
    from .kernels.cuda import LAUNCHERS

    return LAUNCHERS


def gpu_info_nce_group(cupy, k_size: int, n: int = 256, c: int = 128) -> Group:
    import numpy as np

    import refmoco

    rng = np.random.default_rng(0)
    q, k, queue = _unit_rows(rng, n, c), _unit_rows(rng, n, c), _unit_rows(rng, k_size, c)
    t, sync = 0.07, _gpu_sync(cupy)
    qd, kd, queued = cupy.asarray(q), cupy.asarray(k), cupy.asarray(queue)
    logits, dq = cupy.empty((n, k_size), cupy.float32), cupy.empty((n, c), cupy.float32)

    def floor():  # the two products, cuBLAS through CuPy, into preallocated arrays
        cupy.matmul(qd, queued.T, out=logits)
        cupy.matmul(logits, queued, out=dq)

    cases = [Case("matrix products only (cupy)", floor, sync),
             Case("refmoco cupy", lambda: refmoco.info_nce_loss(qd, kd, queued, temperature=t,
                                                                wrt=("q",), backend="cupy"), sync)]
    reference, torch = "PyTorch CUDA (MoCo's code)", _torch_cuda()
    if torch is not None:
        tq, tk = torch.from_numpy(q).cuda(), torch.from_numpy(k).cuda()
        tqueue = torch.from_numpy(np.ascontiguousarray(queue.T)).cuda()  # (C, K) as MoCo

        def official():
            qq = tq.detach().requires_grad_(True)
            l_pos = torch.einsum("nc,nc->n", [qq, tk]).unsqueeze(-1)
            l_neg = torch.einsum("nc,ck->nk", [qq, tqueue])
            logits_ = torch.cat([l_pos, l_neg], dim=1) / t
            labels = torch.zeros(logits_.shape[0], dtype=torch.long, device=tq.device)
            torch.nn.functional.cross_entropy(logits_, labels).backward()
            return qq.grad

        cases.append(Case(reference, official, sync))
    return Group(f"GPU: InfoNCE forward+backward, N={n}, C={c}, K={k_size}, float32", cases,
                 reference)


class DeviceTimer:
    """The GPU's own time for a call, without the host's: CUDA events around it, recorded behind a
    busy stream. A float32 matrix product (4096 x 4096, 137 GFLOP: milliseconds) runs first, so
    the start event and the call's kernels are all queued before the GPU reaches them and the
    time between the events is the kernels' alone (a plain event pair would also time the
    launch, which for a kernel of tens of microseconds may be most of it). A call is ``late`` when the GPU had passed the start event
    before the host finished issuing it: its time may hold idle gaps, and the report says how
    many were. ``lib`` is CuPy or PyTorch; each times the work on its own current stream."""

    def __init__(self, lib):
        if lib.__name__ == "torch":
            a = lib.ones((4096, 4096), device="cuda")
            self.event = lambda: lib.cuda.Event(enable_timing=True)
            self.record = lambda e: e.record()  # on PyTorch's current stream
            self.passed = lambda e: e.query()
            self.seconds = lambda s, e: s.elapsed_time(e) / 1e3
        else:
            a = lib.ones((4096, 4096), lib.float32)
            self.event = lib.cuda.Event
            self.record = lambda e: e.record(lib.cuda.get_current_stream())  # default: null
            self.passed = lambda e: e.done
            self.seconds = lambda s, e: lib.cuda.get_elapsed_time(s, e) / 1e3
        self.busy = lambda: a @ a

    def __call__(self, fn) -> tuple:
        start, end = self.event(), self.event()
        self.busy()
        self.record(start)
        fn()
        self.record(end)
        late = bool(self.passed(start))  # the GPU reached the start before the call was issued
        end.synchronize()
        return self.seconds(start, end), late


def gpu_momentum_groups(cupy) -> list:
    """The momentum update on the GPU twice: wall time (launch, kernel, synchronisation: what a
    training loop pays) and the GPU's time alone (:class:`DeviceTimer`), which the bandwidth
    target is about: the update against a device-to-device copy of the same buffer."""
    import numpy as np

    import refmoco

    m, sync = 0.999, _gpu_sync(cupy)
    sizes = [int(np.prod(s)) for s in resnet18_shapes()]
    size = sum(sizes)
    rng = np.random.default_rng(0)
    dk = cupy.asarray(rng.standard_normal(size, dtype=np.float32))
    dq = cupy.asarray(rng.standard_normal(size, dtype=np.float32))
    dst = cupy.empty_like(dk)
    copy = "device-to-device copy (cupy)"
    update = lambda: refmoco.momentum_update(dk, dq, m, backend="cupy")  # noqa: E731
    ours = {f"refmoco cupy ({launcher} launch)": _launched_by(launcher, update)
            for launcher in _launchers()}
    copy_fn = lambda: dst.__setitem__(Ellipsis, dq)  # noqa: E731
    reference, torch = "torch._foreach_lerp_ (CUDA)", _torch_cuda()
    if torch is not None:
        tk = list(torch.from_numpy(cupy.asnumpy(dk)).cuda().split(sizes))
        tq = list(torch.from_numpy(cupy.asnumpy(dq)).cuda().split(sizes))
        lerp = lambda: torch._foreach_lerp_(tk, tq, 1.0 - m)  # noqa: E731
    title = f"GPU: momentum update, {size / 1e6:.1f}M float32 parameters"
    wall = Group(title + ", wall time",
                 [Case(label, fn, sync) for label, fn in ours.items()] + [Case(copy, copy_fn, sync)],
                 reference)
    on_gpu = DeviceTimer(cupy)
    device = Group(title + ", GPU time alone (CUDA events behind a busy stream)",
                   [Case(label, fn, timer=on_gpu) for label, fn in ours.items()]
                   + [Case(copy, copy_fn, timer=on_gpu)], reference)
    if torch is not None:
        wall.cases.append(Case(reference, lerp, sync))
        device.cases.append(Case(reference, lerp, timer=DeviceTimer(torch)))
    for group in (wall, device):
        # bytes moved: the update reads two buffers and writes one, the copy reads one, writes one
        group.bandwidth = {**dict.fromkeys(ours, 12 * size), copy: 8 * size}
    return [wall, device]


def gpu_training_step_group(cupy, name, encoder, shape, n=256, k_size=4096) -> Group:
    import numpy as np

    from .backend import BackendUnavailableError

    t, m, lr, sync = 0.1, 0.99, 0.03, _gpu_sync(cupy)
    rng = np.random.default_rng(0)
    xq, xk = rng.random((n, *shape), dtype=np.float32), rng.random((n, *shape), dtype=np.float32)
    cases, notes = [], []
    for launcher in _launchers():  # a step each, its first (compiling) step run here
        label = f"refmoco cupy ({launcher} launch)"
        try:
            step = _launched_by(launcher, functools.partial(
                _refmoco_moco_step, encoder, "cupy", cupy.asarray(xq), cupy.asarray(xk), k_size,
                t, m, lr))()
            cases.append(Case(label, _launched_by(launcher, step), sync))
        except (TypeError, ValueError, NotImplementedError, RuntimeError,
                BackendUnavailableError) as exc:
            notes.append(f"{label}: {exc}")
    reference, torch = "PyTorch CUDA (MoCo's builder.py)", _torch_cuda()
    if torch is not None:
        cases.append(Case(reference, _torch_moco_step(torch, encoder, xq, xk, k_size, t, m, lr,
                                                      "cuda"), sync))
    return Group(f"GPU: MoCo training step: {name}, batch {n}, K={k_size}, float32", cases,
                 reference, notes)


# -- running and reporting ----------------------------------------------------------------------


def settings() -> list:
    import numpy as np

    lines = [f"python {platform.python_version()}, numpy {np.__version__}, "
             f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} before timing"]
    try:
        from threadpoolctl import threadpool_info

        pools = ", ".join(f"{p['internal_api']} {p['num_threads']} threads "
                          f"({os.path.basename(p['filepath'])})" for p in threadpool_info())
        lines.append(f"thread pools: {pools}")
    except ImportError:
        pass
    try:
        import numba

        from .kernels._jit import thread_settings

        info = thread_settings()
        lines.append(f"numba {numba.__version__}: kernels on {info.pop('kernel_threads')} threads "
                     f"(refmoco's pool), Numba threading layer "
                     f"{info.pop('numba_threading_layer')}")
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in info.items()
                                                  if k != "cpus"))
    except ImportError:
        lines.append("numba: not installed")
    torch = _torch()
    if torch is not None:
        lines.append(f"torch {torch.__version__}: {torch.get_num_threads()} threads")
    cupy = _cupy()
    if cupy is None:
        lines.append("cupy: no GPU")
    else:
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
        name = name.decode() if isinstance(name, bytes) else name
        lines.append(f"cupy {cupy.__version__}: GPU {name}")
    return lines


def report(groups: list, repeats: int) -> str:
    out = []
    for g in groups:
        ref = next((c for c in g.cases if c.label == g.reference), None)
        ref_t = statistics.median(ref.times) if ref else None
        out += ["", g.title, f"  {'':38s} {'median':>10s} {'vs PyTorch':>11s}"]
        for c in g.cases:
            t = statistics.median(c.times)
            unit, scale = ("ms", 1e3) if t >= 1e-3 else ("us", 1e6)
            ratio = f"{t / ref_t:10.2f}x" if ref_t else f"{'-':>11s}"
            moved = g.bandwidth.get(c.label)
            rate = f"  {moved / t / 1e9:6.1f} GB/s" if moved else ""
            out.append(f"  {c.label:38s} {t * scale:7.2f} {unit} {ratio}{rate}")
        out += [f"  ({n})" for n in g.notes]
        out += [f"  ({c.label}: the GPU reached {c.late} of {len(c.times)} calls before they were "
                "all issued; those times may include idle gaps)" for c in g.cases if c.late]
    out.append(f"\nmedians of {repeats} interleaved rounds; ratio = time / PyTorch's time")
    return "\n".join(out)


def run(args) -> int:
    repeats = args.repeats or (3 if args.quick else 7)
    if repeats < 1:
        raise SystemExit("refmoco bench: --repeats must be >= 1")
    print("refmoco bench" + (" --quick" if args.quick else ""), flush=True)
    only = set(args.only or GROUPS)
    groups = [info_nce_group(k) for k in _queue_sizes(args.quick)] if "info-nce" in only else []
    groups += [momentum_group()] if "momentum" in only else []
    groups += [enqueue_group()] if "enqueue" in only else []
    groups += training_step_groups(args.quick) if "step" in only else []
    if "gpu" in only:
        found = gpu_groups(args.quick)
        if not found and args.only:
            print("  (--only gpu: no CuPy with a CUDA GPU here, nothing to time)", flush=True)
        groups += found
    cases = [c for g in groups for c in g.cases]
    for c in cases:  # warm-up: compiles Numba kernels, starts thread pools, fills caches
        c.run()
        c.reset()
    for line in settings():  # after the warm-up: the thread pools in effect have started
        print("  " + line, flush=True)
    for _ in range(repeats):
        for c in cases:
            c.run()
    print(report(groups, repeats))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


def main(argv=None) -> int:
    """Entry point of ``refmoco bench`` (``argv`` without the program name)."""
    parser = argparse.ArgumentParser(prog="refmoco bench", description=__doc__.split("\n")[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    missing = {k: v for k, v in THREAD_ENV.items() if k not in os.environ}
    if missing and not args.inherit_env:  # NumPy is loaded: rerun with the settings in place
        env = {**os.environ, **missing}
        return subprocess.call([sys.executable, "-m", "refmoco.bench", *argv], env=env)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
