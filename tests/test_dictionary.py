"""Queue against collections.deque(maxlen=size); MemoryBank; saving and restoring."""

from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from strategies import arrays

from refmoco import MemoryBank, Queue


class QueueAgainstDeque(RuleBasedStateMachine):
    """Every enqueue is mirrored row by row into a deque(maxlen=size) pre-filled with the
    queue's initial rows; ``ordered()`` must equal the deque, and the pointer must be the
    number of rows written so far modulo size."""

    @initialize(size=st.integers(1, 9), dim=st.integers(1, 3),
                dtype=st.sampled_from(["float32", "float64"]), seed=st.integers(0, 2**16))
    def start(self, size, dim, dtype, seed):
        self.queue = Queue(size, dim, dtype=dtype, seed=seed)
        self.model = deque(zip(self.queue.keys.copy(), self.queue.ids.tolist()), maxlen=size)
        self.written = 0
        self.next_id = 0

    @rule(data=st.data(), b=st.integers(0, 25), with_ids=st.booleans())
    def enqueue(self, data, b, with_ids):
        keys = data.draw(arrays((b, self.queue.dim), st.floats(-4, 4, width=32)))
        ids = np.arange(self.next_id, self.next_id + b) if with_ids else None
        self.queue.enqueue(keys, ids=ids)
        for j in range(b):
            self.model.append((keys[j].astype(self.queue.dtype), -1 if ids is None else ids[j]))
        self.written += b
        self.next_id += b

    @precondition(lambda self: hasattr(self, "queue"))
    @rule(data=st.data())
    def enqueue_its_own_keys(self, data):
        """The batch is a view of the buffer being written (``enqueue(queue.keys[i:j])``): the
        rows must be the ones the view held before the call, even where the write wraps."""
        size = self.queue.size
        i = data.draw(st.integers(0, size))
        j = data.draw(st.integers(i, size))
        view = self.queue.keys[i:j]
        rows = view.copy()  # what the deque is fed: the values before the call
        self.queue.enqueue(view)
        for row in rows:
            self.model.append((row, -1))
        self.written += j - i

    @precondition(lambda self: hasattr(self, "queue"))
    @rule(bad=st.sampled_from(["dim", "nan", "ids_length", "ids_float", "int_keys",
                               "overflows_the_dtype", "ids_beyond_int64"]))
    def rejected_enqueue_changes_nothing(self, bad):
        before = self.queue.state_dict()
        dim = self.queue.dim
        huge = np.finfo(self.queue.dtype).max
        args = {
            "dim": (np.zeros((2, dim + 1)), None),
            "nan": (np.full((2, dim), np.nan), None),
            "ids_length": (np.zeros((2, dim)), np.arange(3)),
            "ids_float": (np.zeros((2, dim)), np.zeros(2)),
            "int_keys": (np.zeros((2, dim), dtype=int), None),
            # finite as given, inf in the queue's dtype (float64: inf as given)
            "overflows_the_dtype": (np.full((2, dim), 2 * float(huge)), None),
            "ids_beyond_int64": (np.zeros((2, dim)), np.array([1, 2**64 - 1], np.uint64)),
        }[bad]
        with pytest.raises((ValueError, TypeError), match="keys|ids"):
            self.queue.enqueue(*args)
        after = self.queue.state_dict()
        for name in ("keys", "ids", "ptr", "rng_state"):
            np.testing.assert_array_equal(after[name], before[name])

    @rule()
    def save_and_restore(self):
        clone = Queue(self.queue.size, self.queue.dim, dtype=self.queue.dtype, seed=99)
        clone.load_state_dict(self.queue.state_dict())
        self.queue = clone

    @invariant()
    def matches_the_deque(self):
        if not hasattr(self, "queue"):
            return
        expected_keys = np.stack([row for row, _ in self.model])
        np.testing.assert_array_equal(self.queue.ordered(), expected_keys)
        np.testing.assert_array_equal(self.queue.ordered_ids(), [i for _, i in self.model])
        assert self.queue.ptr == self.written % self.queue.size
        assert self.queue.keys.dtype == self.queue.dtype
        assert len(self.queue) == self.queue.size


TestQueueAgainstDeque = QueueAgainstDeque.TestCase
TestQueueAgainstDeque.settings = settings(max_examples=60, stateful_step_count=12, deadline=None)


def test_initial_rows_are_unit_normal_and_reproducible():
    a, b = Queue(64, 16, seed=3), Queue(64, 16, seed=3)
    np.testing.assert_array_equal(a.keys, b.keys)
    assert not np.array_equal(a.keys, Queue(64, 16, seed=4).keys)
    np.testing.assert_allclose(np.linalg.norm(a.keys, axis=1), 1.0, rtol=1e-6)
    assert a.keys.dtype == np.float32 and (a.ids == -1).all() and a.ptr == 0


def test_keys_and_ids_are_read_only_views():
    queue = Queue(4, 2)
    with pytest.raises(ValueError):
        queue.keys[0, 0] = 1.0
    with pytest.raises(ValueError):
        queue.ids[0] = 1


def test_batch_larger_than_the_queue_keeps_its_newest_rows():
    queue = Queue(3, 1, dtype="float64")
    queue.enqueue(np.arange(7.0)[:, None], ids=np.arange(7))
    np.testing.assert_array_equal(queue.ordered()[:, 0], [4.0, 5.0, 6.0])
    np.testing.assert_array_equal(queue.ordered_ids(), [4, 5, 6])
    assert queue.ptr == 7 % 3


def test_save_and_load_round_trip(tmp_path):
    queue = Queue(10, 3, seed=1)
    queue.enqueue(np.ones((4, 3), dtype=np.float32), ids=[1, 2, 3, 4])
    queue.save(tmp_path / "queue.npz")
    restored = Queue.load(tmp_path / "queue.npz")
    np.testing.assert_array_equal(restored.keys, queue.keys)
    np.testing.assert_array_equal(restored.ids, queue.ids)
    assert restored.ptr == queue.ptr
    assert restored.rng.bit_generator.state == queue.rng.bit_generator.state


def test_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "queue.npz"
    Queue(4, 2, seed=1).save(path)
    good = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        Queue(4, 2, seed=2).save(path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["queue.npz"]  # no temporary left behind


def test_load_state_dict_rejects_a_mismatched_state_and_changes_nothing():
    queue = Queue(5, 2, seed=0)
    before = queue.state_dict()
    bad = Queue(6, 2).state_dict()
    with pytest.raises(ValueError, match="keys"):
        queue.load_state_dict(bad)
    bad = dict(before, ptr=np.int64(9))
    with pytest.raises(ValueError, match="ptr"):
        queue.load_state_dict(bad)
    np.testing.assert_array_equal(queue.keys, before["keys"])


@pytest.mark.parametrize("change, error, words", [
    (lambda st: st["keys"].__setitem__((0, 0), np.nan), ValueError, "state\\['keys'\\].*finite"),
    (lambda st: st["keys"].__setitem__((1, 1), np.inf), ValueError, "state\\['keys'\\].*finite"),
    (lambda st: st.__setitem__("ptr", np.float64(1.9)), TypeError, "state\\['ptr'\\]"),
    (lambda st: st.__setitem__("ptr", np.array(2.0)), TypeError, "state\\['ptr'\\]"),
])
def test_load_state_dict_refuses_what_enqueue_refuses(change, error, words):
    """A restore takes no state the queue could not reach itself: non-finite keys (refused by
    enqueue), a pointer that is not an integer (it was cut: 1.9 became 1)."""
    queue = Queue(5, 2, seed=0)
    queue.enqueue(np.ones((2, 2), np.float32), ids=[7, 8])
    before = queue.state_dict()
    bad = Queue(5, 2, seed=3).state_dict()
    change(bad)
    with pytest.raises(error, match=words):
        queue.load_state_dict(bad)
    after = queue.state_dict()
    for name in ("keys", "ids", "ptr", "rng_state"):
        np.testing.assert_array_equal(after[name], before[name])


@pytest.mark.parametrize("row", [[np.nan, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
def test_memory_bank_load_refuses_rows_a_bank_cannot_hold(row):
    bank = MemoryBank(4, 3, seed=0)
    before = bank.bank.copy()
    bad = MemoryBank(4, 3, seed=1).state_dict()
    bad["bank"][2] = row
    with pytest.raises(ValueError, match="state\\['bank'\\].*unit norm"):
        bank.load_state_dict(bad)
    np.testing.assert_array_equal(bank.bank, before)


@settings(max_examples=25)
@given(st.sampled_from(["float32", "float64"]), st.integers(1, 64), st.integers(0, 2**32 - 1),
       st.floats(0.0, 1.0))
def test_memory_bank_rows_after_updates_load_back(dtype, dim, seed, momentum):
    """The unit-norm check of a restore accepts every bank that updates produce: rows moved by
    features of any scale, including the exact cancellation of a row by its antipode."""
    rng = np.random.default_rng(seed)
    bank = MemoryBank(6, dim, momentum=momentum, dtype=dtype, seed=seed)
    for _ in range(5):
        idx = rng.choice(6, size=3, replace=False)
        feats = rng.standard_normal((3, dim)) * 10.0 ** rng.integers(-30, 30)
        bank.update(idx, feats.astype(dtype))
    bank.update([0], -bank.bank[:1] * momentum / (1 - momentum) if momentum < 1 else bank.bank[:1])
    clone = MemoryBank(6, dim, dtype=dtype)
    clone.load_state_dict(bank.state_dict())
    np.testing.assert_array_equal(clone.bank, bank.bank)


def test_a_save_removes_the_partial_file_a_killed_save_left_and_keeps_permissions(tmp_path):
    """A process killed mid-write leaves its partial file (nothing in it can remove it): the
    next save of the same file removes it, and no other file: not another target's, not the
    one a live writer is still writing. A new file gets the permissions the umask gives
    (mkstemp's were owner-only); an existing one keeps its own."""
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = tmp_path / "queue.npz"
        (tmp_path / f".queue.npz.partial-{dead}-abc123").write_bytes(b"half a file")
        kept = [f".queue.npz.partial-{live.pid}-abc123", f".other.npz.partial-{dead}-abc123"]
        for name in kept:
            (tmp_path / name).write_bytes(b"someone's")
        mask = os.umask(0o022)
        try:
            Queue(4, 2, seed=1).save(path)
            assert (path.stat().st_mode & 0o777) == 0o644
            os.chmod(path, 0o640)
            Queue(4, 2, seed=2).save(path)
        finally:
            os.umask(mask)
    finally:
        live.kill()
        live.wait()
    assert (path.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "queue.npz"])
    np.testing.assert_array_equal(Queue.load(path).keys, Queue(4, 2, seed=2).keys)


@pytest.mark.parametrize("kwargs, words", [
    (dict(size=0, dim=2), "size"), (dict(size=2, dim=0), "dim"),
    (dict(size=2, dim=2, dtype="int32"), "dtype"), (dict(size=2.5, dim=2), "size"),
    (dict(size=2, dim=2, backend="torch"), "backend"),
])
def test_bad_constructor_arguments(kwargs, words):
    with pytest.raises((ValueError, TypeError), match=words):
        Queue(**kwargs)
    with pytest.raises((ValueError, TypeError), match=words):
        MemoryBank(**kwargs)


@pytest.mark.parametrize("cls", [Queue, MemoryBank])
def test_a_bad_seed_is_named(cls):
    for seed in (-1, 1.5, "0"):
        with pytest.raises((ValueError, TypeError), match="seed"):
            cls(4, 2, seed=seed)
    fresh = cls(4, 2, seed=None)  # fresh entropy, still saved and restored exactly
    clone = cls(4, 2, seed=7)
    clone.load_state_dict(fresh.state_dict())
    for key, value in fresh.state_dict().items():
        np.testing.assert_array_equal(clone.state_dict()[key], value)


@pytest.mark.parametrize("cls", [Queue, MemoryBank])
def test_backend_numba_without_numba_says_what_to_install(cls, without_numba):
    import refmoco

    with pytest.raises(refmoco.BackendUnavailableError, match=r"pip install 'refmoco\[numba\]'"):
        cls(4, 2, backend="numba")


# -- MemoryBank ------------------------------------------------------------------------------


@given(st.data(), st.floats(0.0, 1.0))
def test_memory_bank_update_is_the_normalised_moving_average(data, momentum):
    size, dim = data.draw(st.integers(2, 8)), data.draw(st.integers(1, 4))
    bank = MemoryBank(size, dim, momentum=momentum, dtype="float64", seed=0)
    idx = np.array(data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=size,
                                      unique=True)))
    feats = data.draw(arrays((len(idx), dim), st.floats(0.1, 1.0, width=64)))
    old = bank.bank.copy()
    bank.update(idx, feats)
    for row, i in enumerate(idx):  # loop reference
        v = momentum * old[i] + (1 - momentum) * feats[row]
        np.testing.assert_allclose(bank.bank[i], v / np.sqrt(sum(x * x for x in v)), rtol=1e-12)
    untouched = np.setdiff1d(np.arange(size), idx)
    np.testing.assert_array_equal(bank.bank[untouched], old[untouched])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_memory_bank_update_of_huge_features_does_not_overflow(dtype):
    """The squared norm of a row near the dtype's largest value overflows; the row's direction
    does not."""
    big = np.finfo(dtype).max / 4
    bank = MemoryBank(3, 3, momentum=0.0, dtype=dtype, seed=0)
    bank.update(np.array([0, 2]), np.array([[big, 0, 0], [big, -big, 0]], dtype))
    np.testing.assert_array_equal(bank.bank[0], [1, 0, 0])
    np.testing.assert_allclose(bank.bank[2], [2**-0.5, -(2**-0.5), 0], rtol=1e-6)


def test_memory_bank_sampling_is_uniform_over_the_other_rows():
    bank = MemoryBank(5, 2, seed=0)
    draws = bank.sample(np.full(20000, 2), num_negatives=1, rng=np.random.default_rng(0))[:, 0]
    counts = np.bincount(draws, minlength=5)
    assert counts[2] == 0
    expected = 20000 / 4  # binomial sd ~ 61: 5 sd bound
    assert np.all(np.abs(counts[[0, 1, 3, 4]] - expected) < 5 * np.sqrt(20000 * 0.25 * 0.75))


def test_memory_bank_bad_update_changes_nothing():
    bank = MemoryBank(6, 3, seed=0)
    before = bank.bank.copy()
    for idx, feats, words in [
        (np.array([0, 6]), np.ones((2, 3)), "indices"),
        (np.array([1, 1]), np.ones((2, 3)), "indices"),
        (np.array([0, 1]), np.ones((2, 2)), "feats"),
        (np.array([0, 1]), np.full((2, 3), np.inf), "feats"),
        (np.array([0, 1]), np.full((2, 3), 1e300), "feats"),  # inf in the bank's float32
        (np.array([0.0, 1.0]), np.ones((2, 3)), "indices"),
    ]:
        with pytest.raises((ValueError, TypeError), match=words):
            bank.update(idx, feats)
    np.testing.assert_array_equal(bank.bank, before)


def test_memory_bank_save_and_load(tmp_path):
    bank = MemoryBank(6, 3, momentum=0.7, seed=0)
    bank.update([1, 4], np.ones((2, 3), dtype=np.float32))
    bank.sample([0], 3)  # advances the bank's own generator
    bank.save(tmp_path / "bank.npz")
    restored = MemoryBank.load(tmp_path / "bank.npz")
    np.testing.assert_array_equal(restored.bank, bank.bank)
    assert restored.momentum == 0.7
    np.testing.assert_array_equal(restored.sample([0, 1], 4), bank.sample([0, 1], 4))


# -- MemoryBank.update: a sum that cancels -----------------------------------------------------


def _bank_backends():
    backends = ["numpy", "fake-cupy", pytest.param("cupy", marks=pytest.mark.gpu)]
    try:
        import numba  # noqa: F401
    except ImportError:
        return backends
    return ["numba", *backends]


@pytest.mark.parametrize("backend", _bank_backends())
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_memory_bank_update_with_an_antipodal_feature_keeps_unit_rows(dtype, backend, monkeypatch):
    """m v + (1 - m) f = 0 has no direction: the row becomes f / ||f|| (the fresh feature), or
    stays as it was when f = 0 too; every other row follows the normalised moving average."""
    from fake_cupy import device_module

    from refmoco.backend import to_numpy

    xp = None
    if backend in ("fake-cupy", "cupy"):
        xp = device_module("fake" if backend == "fake-cupy" else "cupy", monkeypatch)
        backend = "cupy"
    bank = MemoryBank(6, 4, momentum=0.5, dtype=dtype, seed=0, backend=backend)
    old = to_numpy(bank.bank).copy()
    rng = np.random.default_rng(1)
    other = rng.standard_normal(4)
    # rows 0 and 2 get their antipodes (0.5 v - 0.5 v = 0 exactly), row 5 an ordinary feature
    feats = np.stack([-old[0], -old[2], other]).astype(dtype)
    idx = np.array([0, 2, 5])
    bank.update(idx if xp is None else xp.asarray(idx), feats if xp is None else xp.asarray(feats))
    got = to_numpy(bank.bank)
    assert got.dtype == np.dtype(dtype)
    tol = 1e-6 if dtype == "float32" else 1e-14
    np.testing.assert_allclose(np.linalg.norm(got.astype(np.float64), axis=1), 1.0, atol=tol)
    # the cancelled rows hold the fresh feature's direction, computed here in float64
    f = feats.astype(np.float64)
    np.testing.assert_allclose(got[0], f[0] / np.linalg.norm(f[0]), atol=tol)
    np.testing.assert_allclose(got[2], f[1] / np.linalg.norm(f[1]), atol=tol)
    mixed = 0.5 * old[5].astype(np.float64) + 0.5 * f[2]
    np.testing.assert_allclose(got[5], mixed / np.linalg.norm(mixed), atol=tol)
    np.testing.assert_array_equal(got[[1, 3, 4]], old[[1, 3, 4]])

    # momentum 0 and a zero feature: nothing to move to, the row stays as it was
    bank = MemoryBank(3, 4, momentum=0.0, dtype=dtype, seed=0, backend=backend)
    old = to_numpy(bank.bank).copy()
    zero = np.zeros((1, 4), dtype)
    bank.update(np.array([1]) if xp is None else xp.asarray(np.array([1])),
                zero if xp is None else xp.asarray(zero))
    np.testing.assert_array_equal(to_numpy(bank.bank), old)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_memory_bank_update_near_cancellation_keeps_unit_rows(dtype):
    """A sum cancelled only to within rounding (f = -v m / (1 - m), rounded) is normalised like
    any other sum, to unit norm (its direction is rounding); a tiny feature with momentum 0,
    far below ``l2_normalize``'s default clamp of 1e-12, is normalised too."""
    bank = MemoryBank(4, 5, momentum=0.3, dtype=dtype, seed=2)
    v = bank.bank[1].astype(np.float64)
    f = (-v * 0.3 / 0.7).astype(dtype)[None]
    bank.update(np.array([1]), f)
    tol = 1e-6 if dtype == "float32" else 1e-14
    assert abs(np.linalg.norm(bank.bank[1].astype(np.float64)) - 1) <= tol

    # sums made of subnormals only (momentum 0: the rows are the features) are normalised too
    tiny = np.finfo(dtype).tiny
    feats = np.zeros((2, 5), dtype)
    feats[0, 0] = tiny / 4
    feats[1, :] = tiny / 16
    bank = MemoryBank(4, 5, momentum=0.0, dtype=dtype, seed=2)
    bank.update(np.array([0, 1]), feats)
    # a norm of magnitude tiny/16 is subnormal: 4 fewer significant bits, so 16 eps, twice
    np.testing.assert_allclose(np.linalg.norm(bank.bank[:2].astype(np.float64), axis=1), 1.0,
                               rtol=32 * np.finfo(dtype).eps)
    np.testing.assert_array_equal(bank.bank[0], [1, 0, 0, 0, 0])

    bank = MemoryBank(4, 5, momentum=0.0, dtype=dtype, seed=2)
    tiny = np.array([[3e-20, -4e-20, 0, 0, 0]], dtype)  # norm far below l2_normalize's 1e-12
    bank.update(np.array([3]), tiny)
    np.testing.assert_allclose(bank.bank[3], [0.6, -0.8, 0, 0, 0], atol=tol)


@pytest.mark.parametrize("value", [np.array(2.5), 2.0, np.float64(2.0), True, np.True_, "2",
                                   np.array([2])])
def test_an_integer_argument_is_never_truncated_from_a_float(value):
    """``check_int`` goes through ``operator.index``: ``np.array(2.5)`` used to pass (it has an
    ``__index__`` method that refuses it, but ``int()`` truncated it to 2)."""
    bank = MemoryBank(10, 4)
    state = bank.rng.bit_generator.state
    with pytest.raises(TypeError, match="num_negatives: expected an integer"):
        bank.sample(np.arange(3), value)
    with pytest.raises(TypeError, match="size"):
        Queue(value, 4)
    assert bank.rng.bit_generator.state == state


@pytest.mark.parametrize("value", [2, np.int64(2), np.uint8(2), np.array(2)])
def test_integer_arguments_take_numpy_integers(value):
    assert MemoryBank(10, 4, seed=0).sample(np.arange(3), value).shape == (3, 2)
    assert Queue(value, 4).size == 2


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", ["smallest_subnormal", "tiny", "max"])
def test_memory_bank_update_of_subnormal_or_huge_rows_gives_unit_rows(dtype, scale):
    """A row of subnormal entries was divided by a norm rounded to the subnormal grid
    (2**-149 * [2, 1] became [1, 0.5], norm 1.118), so the bank could not load its own state.
    Rows at the bottom and top of the range now get the float64 direction, at unit norm."""
    unit = np.float64(getattr(np.finfo(dtype), scale))
    feats = np.array([[2, 1, 0], [3, 0, -4], [7, 5, 1]], np.float64)
    feats = (feats / 8 * unit if scale == "max" else feats * unit).astype(dtype)
    bank = MemoryBank(4, 3, momentum=0.0, dtype=dtype, seed=0)
    bank.update([0, 1, 2], feats)
    wide = np.ldexp(feats.astype(np.float64), -np.frexp(np.abs(feats).max(axis=1))[1][:, None])
    expected = wide / np.linalg.norm(wide, axis=1, keepdims=True)
    eps = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(bank.bank[:3], expected, rtol=0, atol=4 * eps)
    MemoryBank(4, 3, dtype=dtype).load_state_dict(bank.state_dict())  # its own state loads back
