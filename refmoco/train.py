"""The trainer behind ``refmoco train``: data, views, the mechanism's steps, evaluation, and
checkpoints that resume a run bit for bit.

With ``backend="cupy"`` the model, optimizer state and queue (or bank) live on the GPU. The data
pipeline stays on the host: the views are drawn by the NumPy augmentations from the seeded
generator, exactly as on the other backends, and each batch is copied to the device right before
its step (as a data loader would). Evaluation copies the features back to the host. Checkpoints
hold host NumPy arrays only, so a run saved on one backend resumes on any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np

from ._checks import SEED_MAX, check_int
from .augment import Augment, two_views
from .backend import to_backend, to_numpy
from .data import Dataset, load_dataset
from .dictionary import MemoryBank, Queue, atomic_savez, rng_from_array, rng_to_array
from .evaluate import alignment, knn_accuracy, linear_probe_accuracy, pixel_baseline, uniformity
from .mechanisms import MECHANISMS, EndToEnd, MemoryBankMechanism, MoCo
from .nn import cnn_encoder, mlp_encoder
from .optim import SGD, cosine_lr

CHECKPOINT = "checkpoint.npz"
RUN_FILES = (CHECKPOINT, "metrics.json", "curves.png")  # what a run writes into --out


# SGD's base learning rate when none is given. The memory bank collapses at MoCo's 0.06 on these
# datasets (digits, 100 epochs, numba backend: kNN 0.644, below the untrained encoder's 0.754;
# at 0.01: 0.943, linear probe 0.978), as in docs/training.md.
DEFAULT_LR = {"moco": 0.06, "end-to-end": 0.06, "memory-bank": 0.01}


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run (``metrics.json`` records them all)."""

    mechanism: str = "moco"
    encoder: str = "cnn"
    data: str = "digits"  # "digits", "translated-digits" or a path to an .npz file
    epochs: int = 100
    batch_size: int = 256
    queue_size: int = 512  # K for moco; the number of negatives M for memory-bank
    temperature: float = 0.1
    momentum: float = 0.99  # the key encoder's EMA momentum (moco)
    bank_momentum: float = 0.5  # the memory bank's update momentum (Wu et al.)
    lr: float | None = None  # None: DEFAULT_LR of the mechanism
    weight_decay: float = 5e-4
    sgd_momentum: float = 0.9
    bn_groups: int = 4  # shuffle BN: per-"GPU" batch-norm groups (moco)
    out_dim: int = 128
    translate: float = 0.125
    intensity: tuple = (0.6, 1.4)
    noise: float = 0.05
    dtype: str = "float32"
    backend: str = "numpy"
    seed: int = 0

    def __post_init__(self):
        if self.mechanism in MECHANISMS and self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LR[self.mechanism])
        counts = {"epochs": 1, "batch_size": 2, "queue_size": 1, "bn_groups": 1, "out_dim": 1}
        for name, minimum in counts.items():  # 1.5 epochs or bn_groups=True is a TypeError
            check_int(getattr(self, name), name, minimum=minimum)
        checks = [
            (self.mechanism in MECHANISMS, "mechanism", f"one of {MECHANISMS}"),
            (self.encoder in ("mlp", "cnn"), "encoder", "'mlp' or 'cnn'"),
            (math.isfinite(self.temperature) and self.temperature > 0, "temperature",
             "a finite number > 0"),
            (0 <= self.momentum <= 1, "momentum", "a number in [0, 1]"),
            (0 <= self.bank_momentum <= 1, "bank_momentum", "a number in [0, 1]"),
            (self.lr is not None and math.isfinite(self.lr) and self.lr > 0, "lr",
             "a finite number > 0"),
            (self.dtype in ("float32", "float64"), "dtype", "'float32' or 'float64'"),
            (self.backend in ("numpy", "numba", "cupy"), "backend", "numpy, numba or cupy"),
            (isinstance(self.seed, (int, np.integer)) and not isinstance(self.seed, bool)
             and 0 <= self.seed <= SEED_MAX, "seed", f"an integer in [0, {SEED_MAX}]"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {getattr(self, name)!r}")

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


def refuse_existing(out: str, names, remedy: str = "choose another --out, or remove those "
                    "files") -> None:
    """Raise ``FileExistsError`` if any of ``names`` is already in the folder ``out`` (a dangling
    link too): refmoco never overwrites an earlier run's results. ``remedy`` says what to do."""
    found = [name for name in names if os.path.lexists(os.path.join(out, name))]
    if found:
        raise FileExistsError(f"{out} already holds {', '.join(found)} from an earlier run: "
                              f"{remedy} (refmoco never overwrites saved results)")


# Options that may differ between a run and its resumption (they do not change the result).
# ``data`` names a file; what must not change is its contents, checked by their digest.
_RESUMABLE = {"epochs", "backend"}


def data_digest(dataset: Dataset) -> str:
    """SHA-256 of the dataset's arrays (train and test images and labels, shapes and dtypes):
    a resumed run must see the data its checkpoint was trained on, wherever the file now is."""
    h = hashlib.sha256()
    for a in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()


def _check_data_fits(c: TrainConfig, dataset: Dataset, batch: int) -> None:
    """What training and evaluation need of the data, checked before anything runs: batch norm
    in training needs 2 samples per (shuffle-BN) group, the evaluation 2 test images (its
    uniformity) and the linear probe 2 classes."""
    n_train, n_test = len(dataset.x_train), len(dataset.x_test)
    if n_train < 2:
        raise ValueError(f"data: the training split has {n_train} image(s); batch norm in "
                         f"training needs at least 2")
    if n_test < 2:
        raise ValueError(f"data: the test split has {n_test} image(s); the evaluation needs at "
                         f"least 2")
    if len(np.unique(dataset.y_train)) < 2:
        raise ValueError("data: the training split holds one class; the linear probe needs at "
                         "least 2")
    groups = min(c.bn_groups, batch) if c.mechanism == "moco" else 1
    if batch // groups < 2:
        what = f"a batch of {batch}" + ("" if batch == c.batch_size else
                                         f" (all {n_train} training images)")
        raise ValueError(f"batch_size: {what} split into bn_groups={c.bn_groups} shuffle-BN "
                         f"groups leaves a group of 1 sample (batch norm in training needs 2): "
                         f"use batch_size >= {2 * c.bn_groups} or a smaller bn_groups")


class Trainer:
    """Builds the encoder and mechanism for a config and runs epochs of training."""

    def __init__(self, config: TrainConfig, dataset: Dataset | None = None):
        self.config = c = config
        self.dataset = dataset if dataset is not None else load_dataset(c.data, seed=c.seed)
        self.x_train = self.dataset.x_train.astype(c.dtype)
        self.x_test = self.dataset.x_test.astype(c.dtype)
        n_train = len(self.x_train)
        self.batch_size = min(c.batch_size, n_train)
        _check_data_fits(c, self.dataset, self.batch_size)  # before any model is built
        in_channels = self.x_train.shape[1]
        if c.encoder == "cnn":
            self.encoder = cnn_encoder(in_channels=in_channels, out_dim=c.out_dim)
        else:
            self.encoder = mlp_encoder(in_features=int(np.prod(self.x_train.shape[1:])),
                                       out_dim=c.out_dim)
        # drawn on the host from the seed (the same weights on every backend), then moved
        params, buffers = self.encoder.init(np.random.default_rng(c.seed), c.dtype,
                                            backend=c.backend)
        optimizer = SGD(lr=c.lr, momentum=c.sgd_momentum, weight_decay=c.weight_decay,
                        backend=c.backend)
        if c.mechanism == "moco":
            queue = Queue(c.queue_size, c.out_dim, dtype=c.dtype, seed=c.seed,
                          backend=c.backend)
            self.mechanism = MoCo(self.encoder, params, buffers, optimizer, queue=queue,
                                  momentum=c.momentum, temperature=c.temperature,
                                  bn_groups=c.bn_groups, seed=c.seed, backend=c.backend)
        elif c.mechanism == "end-to-end":
            self.mechanism = EndToEnd(self.encoder, params, buffers, optimizer,
                                      temperature=c.temperature, backend=c.backend)
        else:
            bank = MemoryBank(n_train, c.out_dim, momentum=c.bank_momentum, dtype=c.dtype,
                              seed=c.seed, backend=c.backend)
            self.mechanism = MemoryBankMechanism(self.encoder, params, buffers, optimizer,
                                                 bank=bank, num_negatives=c.queue_size,
                                                 temperature=c.temperature, backend=c.backend)
        self.augment = Augment(translate=c.translate, intensity=tuple(c.intensity),
                               noise=c.noise)
        self.rng = np.random.default_rng([c.seed, 1])  # batch order and views
        self.steps_per_epoch = n_train // self.batch_size  # the last partial batch is dropped
        self.epoch = 0
        self.history: list[dict] = []
        self.random_init = None
        self.data_digest = data_digest(self.dataset)

    # -- evaluation ---------------------------------------------------------------------------
    def features(self, x, batch: int = 512):
        """Eval-mode (z, h) on the host: the normalised head output and the backbone features
        (each chunk of ``x`` goes to the model's device and its features come back)."""
        zs, hs = [], []
        m = self.mechanism
        for i in range(0, len(x), batch):
            chunk = to_backend(x[i:i + batch], m.backend)
            z, h, _ = self.encoder.forward_features(m.params, m.buffers, chunk,
                                                    train=False, backend=m.backend)
            zs.append(to_numpy(z))
            hs.append(to_numpy(h))
        z, h = np.concatenate(zs), np.concatenate(hs)
        if not (np.isfinite(z).all() and np.isfinite(h).all()):  # the data are finite
            raise FloatingPointError(f"after epoch {self.epoch}: training diverged: the "
                                     f"encoder's features are not finite; lower the learning "
                                     f"rate or raise the temperature (--lr, --temperature)")
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12), h

    def evaluate(self, *, linear: bool) -> dict:
        """kNN accuracy (MoCo's monitor, on the normalised head output), alignment and
        uniformity on the test split, and the linear probe on the backbone features."""
        ds = self.dataset
        z_train, h_train = self.features(self.x_train)
        z_test, h_test = self.features(self.x_test)
        view_rng = np.random.default_rng([self.config.seed, 2])  # the same views every time
        a, b = two_views(self.x_test, self.augment, view_rng)
        za, zb = self.features(a)[0], self.features(b)[0]
        out = {
            "knn_accuracy": knn_accuracy(z_train, ds.y_train, z_test, ds.y_test),
            "alignment": alignment(za, zb),
            "uniformity": uniformity(z_test),
        }
        if linear:
            out["linear_accuracy"] = linear_probe_accuracy(h_train, ds.y_train, h_test,
                                                           ds.y_test, seed=self.config.seed)
        return out

    # -- training -----------------------------------------------------------------------------
    def train_epoch(self) -> dict:
        c, m = self.config, self.mechanism
        order = self.rng.permutation(len(self.x_train))
        total_steps = c.epochs * self.steps_per_epoch
        sums = np.zeros(4)
        start = time.perf_counter()
        for s in range(self.steps_per_epoch):
            ids = order[s * self.batch_size:(s + 1) * self.batch_size]
            x_q, x_k = two_views(self.x_train[ids], self.augment, self.rng)  # on the host
            step = self.epoch * self.steps_per_epoch + s
            lr = cosine_lr(step, total_steps, c.lr)
            try:
                stats = m.step(to_backend(x_q, m.backend), to_backend(x_k, m.backend), ids, lr)
            except FloatingPointError as exc:  # the mechanism's: its features are not finite
                raise FloatingPointError(f"at step {step}: {exc} (--lr, --temperature)") from exc
            if not math.isfinite(stats.loss):
                raise FloatingPointError(f"at step {step}: training diverged: the loss is "
                                         f"{stats.loss}; lower the learning rate or raise the "
                                         f"temperature (--lr, --temperature)")
            sums += np.array(stats)
        seconds = time.perf_counter() - start
        self.epoch += 1
        mean = sums / self.steps_per_epoch
        return {"epoch": self.epoch, "loss": mean[0], "pos_sim": mean[1], "neg_sim": mean[2],
                "own_sample_share": mean[3], "step_seconds": seconds / self.steps_per_epoch}

    def num_candidates(self) -> int:
        c = self.config
        return {"moco": c.queue_size + 1, "end-to-end": self.batch_size,
                "memory-bank": c.queue_size + 1}[c.mechanism]

    def warnings(self) -> list[str]:
        c, n = self.config, len(self.x_train)
        notes = []
        if c.mechanism == "moco" and c.queue_size >= n:
            notes.append(f"queue_size {c.queue_size} >= {n} training images: the queue fills "
                         f"with stale keys of each query's own image, which trains worse")
        return notes

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {f"mechanism/{k}": v for k, v in self.mechanism.state_dict().items()}
        state["trainer/rng_state"] = rng_to_array(self.rng)
        state["trainer/epoch"] = np.int64(self.epoch)
        state["trainer/history"] = np.array(json.dumps(self.history))
        state["trainer/random_init"] = np.array(json.dumps(self.random_init))
        state["trainer/config"] = np.array(json.dumps(self.config.to_json()))
        state["trainer/data_digest"] = np.array(self.data_digest)
        return state

    def save(self, folder: str) -> str:
        path = os.path.join(folder, CHECKPOINT)
        atomic_savez(path, **self.state_dict())
        return path

    def load(self, folder: str) -> None:
        """Resume from ``folder/checkpoint.npz``; a corrupt or mismatched file raises before
        anything changes."""
        path = os.path.join(folder, CHECKPOINT)
        try:
            with np.load(path, allow_pickle=False) as f:
                state = {k: f[k] for k in f.files}
            saved = json.loads(str(state["trainer/config"]))
            rng = rng_from_array(state["trainer/rng_state"])
            epoch = check_int(state["trainer/epoch"], "trainer/epoch", minimum=0)
            history = json.loads(str(state["trainer/history"]))
            if not isinstance(history, list):
                raise TypeError(f"trainer/history: expected a list, got {type(history).__name__}")
            random_init = json.loads(str(state["trainer/random_init"]))
            digest = str(state["trainer/data_digest"]) if "trainer/data_digest" in state else None
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ValueError(f"{path}: not a readable refmoco checkpoint ({exc})") from exc
        mine = self.config.to_json()
        same = _RESUMABLE | ({"data"} if digest is not None else set())  # the digest decides
        diff = {k: (saved.get(k), v) for k, v in mine.items()
                if k not in same and saved.get(k) != v}
        if diff:
            listing = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{path}: the checkpoint was made with other options ({listing})")
        if digest is not None and digest != self.data_digest:
            raise ValueError(f"{path}: the checkpoint was trained on other data (the contents of "
                             f"{self.config.data!r} differ from what it saw)")
        if epoch > self.config.epochs:
            raise ValueError(f"epochs: the checkpoint has trained {epoch} epochs already; pass "
                             f"--epochs {epoch} or more to resume it")
        mech = {k[len("mechanism/"):]: v for k, v in state.items() if k.startswith("mechanism/")}
        try:
            self.mechanism.check_state(mech)
            self.mechanism.load_state_dict(mech)
        except (ValueError, TypeError) as exc:  # all or nothing: the mechanism is unchanged
            raise ValueError(f"{path}: {exc}") from exc
        self.rng, self.epoch, self.history, self.random_init = rng, epoch, history, random_init


def _finished_metrics(out: str, history: list) -> dict | None:
    """The metrics.json in ``out`` if it was written at the end of the run whose checkpoint
    holds ``history`` (its epochs are those); None if it is missing, unreadable or older (a
    run resumed for more epochs and killed before its end: it is evaluated and written again)."""
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return None
    same = isinstance(metrics, dict) and metrics.get("epochs") == json.loads(json.dumps(history))
    return metrics if same else None


_OUT_EXPECTED = "out: expected a writable folder, or a path where one can be made (--out)"


def _probe(out: str, folder: str) -> None:
    """Make a uniquely named empty file in ``folder`` and remove it: what every write into
    ``out`` needs (``folder`` is ``out``, or the nearest folder above it that exists, where
    ``out`` would be made). A ``ValueError`` naming ``out`` and the reason if it cannot be made;
    the file is removed even when closing it fails, and nothing is made when it cannot be."""
    try:
        fd, path = tempfile.mkstemp(prefix=".refmoco-write-check-", dir=folder)
        try:
            os.close(fd)
        finally:
            os.remove(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        what = f"{out} is not writable" if folder == out else (
            f"{out} cannot be made: {folder} is not writable")
        raise ValueError(f"{_OUT_EXPECTED}, but {what} (no file can be made in {folder}: "
                         f"{reason})") from exc


def _check_out(out: str, *, probe: bool = True) -> None:
    """``out`` must be a folder, or a path a folder can be made at, and (with ``probe``) files
    must be writable there: checked before the data is loaded or a model built, naming the
    option, without making anything (an existing ``out`` is probed, else the nearest folder above
    it, by a file made and removed in it)."""
    path = os.path.abspath(out)
    while not os.path.exists(path):  # the nearest part of the path that exists
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(out) else f"is below the file {path}"
        raise ValueError(f"{_OUT_EXPECTED}, but {out} {where}")
    if probe:
        _probe(out, out if path == os.path.abspath(out) else path)


def make_out(out: str) -> None:
    """Make the folder ``out`` (and those above it) if it is not there, and check that a file can
    be made in it, before anything long runs: a ``ValueError`` naming ``--out``, the path and the
    reason (a file in the way, no permission, a read-only file system). A folder that is already
    there is left as it was (the check's file is removed)."""
    _check_out(out, probe=False)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"{_OUT_EXPECTED}, but {out} cannot be made ({exc})") from exc
    _probe(out, out)


def run(config: TrainConfig, out: str, *, resume: bool = False, progress: bool = True,
        dataset: Dataset | None = None) -> dict:
    """Train, evaluate every epoch, checkpoint every epoch; write metrics.json and a plot.

    Resuming a run that has finished (its checkpoint at ``config.epochs``, and a metrics.json
    written from that checkpoint: the same epochs) changes nothing and returns those metrics.

    Before the data is loaded, ``out`` is checked to be (or to be makeable as) a folder that
    files can be written in, so that a bad ``out`` fails at once (``ValueError``) rather than
    after the first epoch; with ``resume`` the write check waits until the checkpoint is read
    (a finished run is returned without writing), still before any evaluation or training."""
    _check_out(out, probe=not resume)
    trainer = Trainer(config, dataset)  # first: a missing backend fails before any file is made
    if resume:
        trainer.load(out)  # a missing or refused checkpoint: nothing is made or changed
        if trainer.epoch == config.epochs:
            done = _finished_metrics(out, trainer.history)
            if done is not None:
                return done
    else:
        refuse_existing(out, RUN_FILES, "pass --resume to continue it, or choose another --out")
    make_out(out)  # the first write into out; before the random-init evaluation and epoch 1
    for note in trainer.warnings():
        warnings.warn(note, stacklevel=2)
    if trainer.random_init is None:
        trainer.random_init = trainer.evaluate(linear=True)
    bar = _progress(config.epochs, trainer.epoch, progress)
    wall = time.perf_counter()
    while trainer.epoch < config.epochs:
        row = trainer.train_epoch()
        row.update(trainer.evaluate(linear=False))
        row["log_num_candidates"] = math.log(trainer.num_candidates())
        trainer.history.append(row)
        trainer.save(out)
        bar.update(row)
    bar.close()
    final = trainer.evaluate(linear=True)
    metrics = {
        # every option: the run's (--dataset and --data both as "data") and the command's own
        "config": {**config.to_json(), "out": out, "resume": resume, "progress": progress},
        "dataset": {"name": trainer.dataset.name, "train": len(trainer.x_train),
                    "test": len(trainer.x_test), "shape": list(trainer.x_train.shape[1:])},
        "epochs": trainer.history,
        "final": {k: final[k] for k in ("knn_accuracy", "linear_accuracy")},
        "final_alignment_uniformity": {k: final[k] for k in ("alignment", "uniformity")},
        "random_init": {k: trainer.random_init[k] for k in ("knn_accuracy", "linear_accuracy")},
        "train_seconds_this_run": time.perf_counter() - wall,
        "warnings": trainer.warnings(),
    }
    metrics["raw_pixels"] = pixel_baseline(trainer.dataset)
    tmp = os.path.join(out, ".metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=2)
    os.replace(tmp, os.path.join(out, "metrics.json"))
    _plot(metrics, os.path.join(out, "curves.png"))
    return metrics


class _progress:
    """A tqdm bar when tqdm is installed and wanted; one line per epoch otherwise."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=done, unit="epoch", file=sys.stderr)
            except ImportError:
                pass

    def update(self, row: dict) -> None:
        text = (f"loss {row['loss']:.3f} (ln(K+1) {row['log_num_candidates']:.2f}) "
                f"knn {row['knn_accuracy']:.3f}")
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif self.enabled:
            print(f"epoch {row['epoch']}: {text}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plot(metrics: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = metrics["epochs"]
    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [r["loss"] for r in rows], label="loss")
    axes[0].plot(ep, [r["log_num_candidates"] for r in rows], "--", label="ln(K+1)")
    axes[0].set_title("InfoNCE loss")
    axes[1].plot(ep, [r["knn_accuracy"] for r in rows], label="kNN (test)")
    axes[1].axhline(metrics["random_init"]["knn_accuracy"], ls=":", c="gray",
                    label="random init")
    axes[1].set_title("kNN accuracy")
    axes[2].plot(ep, [r["alignment"] for r in rows], label="alignment")
    axes[2].plot(ep, [r["uniformity"] for r in rows], label="uniformity")
    axes[2].set_title("alignment / uniformity (lower is better)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
