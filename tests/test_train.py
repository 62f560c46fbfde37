"""The trainer: resuming is bit-identical, checkpoints are never lost, bad input is reported."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from refmoco.cli import main
from refmoco.data import Dataset, load_digits
from refmoco.train import CHECKPOINT, TrainConfig, Trainer, run

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def small():
    d = load_digits(seed=0)
    return Dataset(d.x_train[:200], d.y_train[:200], d.x_test[:100], d.y_test[:100], "small")


def config(**kw):
    base = dict(encoder="mlp", epochs=2, batch_size=64, queue_size=96, bn_groups=2)
    base.update(kw)
    return TrainConfig(**base)


def load_checkpoint(folder):
    with np.load(os.path.join(folder, CHECKPOINT), allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("mechanism, backend", [
    ("moco", "numpy"), ("end-to-end", "numpy"), ("memory-bank", "numpy"),
    pytest.param("moco", "numba", id="moco-numba-cnn"),
])
def test_resume_continues_bit_identically(tmp_path, small, mechanism, backend, monkeypatch):
    """Killed in epoch two, resumed: the same checkpoint and metrics as an uninterrupted run.
    On numba with the CNN, the kernels (conv, batch norm, ReLU, InfoNCE, EMA, SGD) and the
    optimizer's backend survive the checkpoint."""
    if backend == "numba":
        pytest.importorskip("numba")
    extra = {"backend": backend}
    if backend == "numba":
        extra.update(encoder="cnn")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    a = run(config(mechanism=mechanism, epochs=2, **extra), full, progress=False, dataset=small)
    real_epoch = Trainer.train_epoch

    def killed_in_epoch_two(self):
        if self.epoch == 1:
            raise KeyboardInterrupt  # the process dies mid-run
        return real_epoch(self)

    monkeypatch.setattr(Trainer, "train_epoch", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        run(config(mechanism=mechanism, epochs=2, **extra), part, progress=False, dataset=small)
    monkeypatch.setattr(Trainer, "train_epoch", real_epoch)
    b = run(config(mechanism=mechanism, epochs=2, **extra), part, resume=True, progress=False,
            dataset=small)
    ca, cb = load_checkpoint(full), load_checkpoint(part)
    assert set(ca) == set(cb)
    for key in ca:
        if key in ("trainer/history", "trainer/config"):
            continue
        np.testing.assert_array_equal(ca[key], cb[key], err_msg=key)
    strip = [{k: v for k, v in row.items() if k != "step_seconds"} for row in a["epochs"]]
    assert strip == [{k: v for k, v in row.items() if k != "step_seconds"}
                     for row in b["epochs"]]
    assert a["final"] == b["final"] and a["random_init"] == b["random_init"]


def test_metrics_json_and_plot(tmp_path, small):
    out = str(tmp_path / "run")
    metrics = run(config(), out, progress=False, dataset=small)
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["config"] == {**config().to_json(), "out": out, "resume": False,
                               "progress": False}  # every option (API.md), the command's too
    assert len(saved["epochs"]) == 2
    for row in saved["epochs"]:
        assert {"loss", "knn_accuracy", "alignment", "uniformity", "pos_sim", "neg_sim",
                "own_sample_share", "log_num_candidates"} <= set(row)
        assert row["log_num_candidates"] == pytest.approx(np.log(97))
    for part in ("final", "random_init"):
        assert set(saved[part]) == {"knn_accuracy", "linear_accuracy"}
        assert all(0 <= v <= 1 for v in saved[part].values())
    assert metrics["final"] == saved["final"]
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000


def test_an_existing_run_is_never_overwritten(tmp_path, small):
    out = str(tmp_path / "run")
    run(config(epochs=1), out, progress=False, dataset=small)
    before = open(os.path.join(out, CHECKPOINT), "rb").read()
    with pytest.raises(FileExistsError, match="--resume"):
        run(config(epochs=1), out, progress=False, dataset=small)
    with pytest.raises(ValueError, match="queue_size"):  # a mismatched checkpoint
        run(config(epochs=2, queue_size=50), out, resume=True, progress=False, dataset=small)
    assert open(os.path.join(out, CHECKPOINT), "rb").read() == before


def folder_bytes(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


@pytest.mark.parametrize("kept", ["metrics.json", "curves.png"])
def test_a_previous_run_without_its_checkpoint_is_not_overwritten(tmp_path, small, kept):
    out = str(tmp_path / "run")
    run(config(epochs=1), out, progress=False, dataset=small)
    for name in os.listdir(out):
        if name != kept:
            os.remove(os.path.join(out, name))
    before = folder_bytes(out)
    with pytest.raises(FileExistsError, match=kept):
        run(config(epochs=1), out, progress=False, dataset=small)
    assert folder_bytes(out) == before


def test_a_refused_resume_changes_nothing(tmp_path, small):
    """Fewer epochs than done, or other data under the same name: refused, the folder byte for
    byte as it was; the same data (any path) resumes."""
    out = str(tmp_path / "run")
    run(config(epochs=2), out, progress=False, dataset=small)
    before = folder_bytes(out)
    with pytest.raises(ValueError, match="epochs"):
        run(config(epochs=1), out, resume=True, progress=False, dataset=small)
    other = Dataset(small.x_train[::-1].copy(), small.y_train[::-1].copy(), small.x_test,
                    small.y_test, "small")  # the same images, in another order
    with pytest.raises(ValueError, match="other data"):
        run(config(epochs=3), out, resume=True, progress=False, dataset=other)
    assert folder_bytes(out) == before
    moved = config(epochs=3, data=str(tmp_path / "elsewhere.npz"))  # another path, same data
    assert run(moved, out, resume=True, progress=False, dataset=small)["config"]["data"] == \
        moved.data


def test_resuming_a_finished_run_changes_nothing(tmp_path, small):
    """Its metrics.json (with the run's own training time) stays byte for byte, and is what the
    call returns; nothing is trained or evaluated again."""
    out = str(tmp_path / "run")
    first = run(config(epochs=1), out, progress=False, dataset=small)
    before = folder_bytes(out)
    again = run(config(epochs=1), out, resume=True, progress=False, dataset=small)
    assert folder_bytes(out) == before
    assert again == json.loads(json.dumps(first))


def test_resuming_after_a_kill_before_the_final_metrics_writes_them(tmp_path, small,
                                                                     monkeypatch):
    """A finished 1-epoch run resumed for 2 epochs and killed after epoch 2's checkpoint, before
    its metrics.json: the old metrics.json (1 epoch) is not this checkpoint's, so the next
    resume evaluates and writes epoch 2's, as an uninterrupted 2-epoch run does."""
    import refmoco.train as train_module

    out = str(tmp_path / "run")
    run(config(epochs=1), out, progress=False, dataset=small)
    real = train_module.Trainer.evaluate

    def killed(self, linear=False):
        if linear and self.epoch == 2:
            raise KeyboardInterrupt  # during the final evaluation
        return real(self, linear=linear)

    monkeypatch.setattr(train_module.Trainer, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        run(config(epochs=2), out, resume=True, progress=False, dataset=small)
    monkeypatch.setattr(train_module.Trainer, "evaluate", real)
    metrics = run(config(epochs=2), out, resume=True, progress=False, dataset=small)
    with open(os.path.join(out, "metrics.json")) as f:
        assert len(metrics["epochs"]) == len(json.load(f)["epochs"]) == 2
    twin = str(tmp_path / "twin")  # the same two runs, the second one not killed
    run(config(epochs=1), twin, progress=False, dataset=small)
    whole = run(config(epochs=2), twin, resume=True, progress=False, dataset=small)
    def figures(m):  # all but the timings
        rows = [{k: v for k, v in row.items() if k != "step_seconds"} for row in m["epochs"]]
        return json.loads(json.dumps([rows, m["final"], m["random_init"]]))

    assert figures(metrics) == figures(whole)


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_an_out_that_cannot_be_a_folder_is_refused_before_the_data_is_loaded(tmp_path, where,
                                                                              monkeypatch):
    import refmoco.train as train_module

    afile = tmp_path / "afile"
    afile.write_text("mine")
    out = afile if where == "file" else afile / "sub"
    monkeypatch.setattr(train_module, "Trainer", None)  # building one would fail differently
    with pytest.raises(ValueError, match=f"out: .*{where.replace('below a', 'below the')}"):
        run(config(), str(out), progress=False)
    assert afile.read_text() == "mine"


@pytest.mark.parametrize("where", ["the folder", "below it"])
def test_a_read_only_out_is_refused_before_the_data_is_loaded(read_only_folder, where,
                                                              monkeypatch):
    """A read-only --out, or a path below one, fails at once (not after the first epoch, when the
    checkpoint is saved), naming the option and the reason, and nothing is left in it."""
    import refmoco.train as train_module

    out = read_only_folder if where == "the folder" else read_only_folder / "run"
    monkeypatch.setattr(train_module, "Trainer", None)  # building one would fail differently
    with pytest.raises(ValueError, match=r"out: .*\(--out\), but .*Permission denied"):
        run(config(), str(out), progress=False)
    assert os.listdir(read_only_folder) == []


def test_resuming_in_a_read_only_folder(read_only_folder, small, monkeypatch):
    """A finished run is returned without writing anything; one with epochs left is refused
    once its checkpoint is read, before any evaluation or training."""
    import refmoco.train as train_module

    out = str(read_only_folder)
    read_only_folder.chmod(0o755)
    first = run(config(epochs=1), out, progress=False, dataset=small)
    read_only_folder.chmod(0o555)
    before = folder_bytes(out)
    assert run(config(epochs=1), out, resume=True, progress=False, dataset=small) == \
        json.loads(json.dumps(first))
    for name in ("evaluate", "train_epoch"):
        monkeypatch.setattr(train_module.Trainer, name,
                            lambda *a, _name=name, **k: pytest.fail(f"{_name} ran"))
    with pytest.raises(ValueError, match=r"out: .*\(--out\), but .* is not writable"):
        run(config(epochs=2), out, resume=True, progress=False, dataset=small)
    assert folder_bytes(out) == before


def test_the_write_check_leaves_no_file_even_when_it_fails(tmp_path, monkeypatch):
    """The check's file is removed when closing it fails, and the failure is reported."""
    import errno

    from refmoco.train import make_out

    real_close = os.close

    def close_fails(fd):
        real_close(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "close", close_fails)
    with pytest.raises(ValueError, match="is not writable .*Input/output error"):
        make_out(str(tmp_path / "run"))
    monkeypatch.undo()
    assert os.listdir(tmp_path / "run") == []  # made by make_out, and empty


def test_resuming_a_missing_run_makes_no_folder(tmp_path, small):
    out = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError):
        run(config(), str(out), resume=True, progress=False, dataset=small)
    assert not out.exists()


@pytest.mark.parametrize("kw, data, words", [
    (dict(batch_size=6, bn_groups=4), None, "batch_size.*bn_groups"),  # a group of 1
    (dict(batch_size=64, bn_groups=4), slice(0, 5), "batch_size.*5 training images"),
    (dict(), slice(0, 1), "training split has 1"),
    (dict(), "one class", "one class"),
    (dict(), "one test image", "test split has 1"),
])
def test_data_that_cannot_train_or_evaluate_is_refused_before_anything_runs(
        tmp_path, small, kw, data, words):
    d = small
    if isinstance(data, slice):
        d = Dataset(small.x_train[data], small.y_train[data], small.x_test, small.y_test, "s")
    elif data == "one class":
        d = Dataset(small.x_train, np.zeros_like(small.y_train), small.x_test, small.y_test, "s")
    elif data == "one test image":
        d = Dataset(small.x_train, small.y_train, small.x_test[:1], small.y_test[:1], "s")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=words):
        run(config(**kw), str(out), progress=False, dataset=d)
    assert not out.exists()


@pytest.mark.parametrize("name, value", [("epochs", 1.5), ("batch_size", 8.0),
                                         ("queue_size", np.float64(16)), ("bn_groups", True),
                                         ("out_dim", 2.0)])
def test_a_count_that_is_not_an_integer_is_refused(name, value):
    """1.5 epochs trained one epoch, checkpointed it and then failed; bn_groups=True was 1."""
    with pytest.raises(TypeError, match=f"{name}: expected an integer"):
        config(**{name: value})


@pytest.mark.parametrize("name, value", [("temperature", float("inf")), ("lr", float("inf")),
                                         ("temperature", float("nan")), ("lr", float("nan"))])
def test_a_rate_that_is_not_finite_is_refused(name, value):
    with pytest.raises(ValueError, match=f"{name}: expected a finite number > 0"):
        config(**{name: value})


@pytest.mark.parametrize("seed", [-1, 1.5, True, 2**32])  # 2**32: scikit-learn's probes refuse it
def test_a_bad_seed_is_named(seed):
    with pytest.raises(ValueError, match="seed"):
        config(seed=seed)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning",
                            "ignore:invalid value:RuntimeWarning")  # what diverging means
@pytest.mark.parametrize("mechanism", ["moco", "end-to-end", "memory-bank"])
def test_divergence_is_a_floating_point_error_naming_the_remedy(tmp_path, small, mechanism):
    """At a learning rate of 1e8 the features overflow within a few steps: every mechanism
    says that training diverged (the queue's and the bank's refusal of non-finite rows
    included), not which internal argument was refused."""
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"diverged.*--lr"):
        run(config(mechanism=mechanism, epochs=1, lr=1e8), str(out), progress=False,
            dataset=small)


def test_a_run_without_sgd_momentum_resumes(tmp_path, small):
    """No momentum buffer to save: the checkpoint must still load without pickle."""
    out = str(tmp_path / "run")
    run(config(epochs=1, sgd_momentum=0.0), out, progress=False, dataset=small)
    metrics = run(config(epochs=2, sgd_momentum=0.0), out, resume=True, progress=False,
                  dataset=small)
    assert len(metrics["epochs"]) == 2


def _drop_key_bias(state):
    del state["mechanism/key_params/head.2.bias"]


def _negative_step_count(state):
    state["mechanism/optimizer/step_count"] = np.array(-3)


def _short_momentum_buffer(state):
    state["mechanism/optimizer/momentum_buffer"] = np.zeros(10, np.float32)


def _set_epoch(value):
    def spoil(state):
        state["trainer/epoch"] = np.array(value)
    return spoil


@pytest.mark.parametrize("spoil, words", [
    (_drop_key_bias, "head.2.bias"),  # refused before anything is loaded
    (_negative_step_count, "step_count"),  # refused by the optimizer, after the parameters
    (_short_momentum_buffer, "momentum_buffer"),  # was accepted, to fail at the first step
    (_set_epoch(-2), "trainer/epoch"),  # was accepted: the schedule's step went negative
    (_set_epoch(1.5), "trainer/epoch"),  # was cut to 1
])
def test_a_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(tmp_path, small, spoil,
                                                                      words):
    """A fresh trainer (no momentum buffer yet) loading a spoiled checkpoint: the error names
    the entry, and the mechanism is as it was (all or nothing; the second case reaches the
    rollback)."""
    out = str(tmp_path / "run")
    run(config(epochs=1), out, progress=False, dataset=small)
    state = load_checkpoint(out)
    spoil(state)
    np.savez(os.path.join(out, CHECKPOINT), **state)
    trainer = Trainer(config(epochs=2), small)
    before = trainer.mechanism.state_dict()
    with pytest.raises(ValueError, match=words):
        trainer.load(out)
    after = trainer.mechanism.state_dict()
    assert set(after) == set(before)
    for key in before:
        np.testing.assert_array_equal(after[key], before[key])
    assert trainer.mechanism.optimizer.momentum_buffer is None


def test_a_corrupt_checkpoint_is_reported_and_kept(tmp_path, small):
    out = tmp_path / "run"
    out.mkdir()
    (out / CHECKPOINT).write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable refmoco checkpoint"):
        run(config(), str(out), resume=True, progress=False, dataset=small)
    assert (out / CHECKPOINT).read_bytes() == b"not a zip file"


def test_a_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path, small, monkeypatch):
    out = str(tmp_path / "run")
    run(config(epochs=1), out, progress=False, dataset=small)
    good = open(os.path.join(out, CHECKPOINT), "rb").read()

    def crash(*args, **kwargs):
        raise OSError("killed mid-write")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="killed"):
        run(config(epochs=2), out, resume=True, progress=False, dataset=small)
    assert open(os.path.join(out, CHECKPOINT), "rb").read() == good
    assert sorted(os.listdir(out)) == sorted(["checkpoint.npz", "metrics.json", "curves.png"])


def test_queue_as_large_as_the_training_set_warns(tmp_path, small):
    with pytest.warns(UserWarning, match="stale keys"):
        run(config(epochs=1, queue_size=200), str(tmp_path / "r"), progress=False,
            dataset=small)


@pytest.mark.parametrize("arrays, words", [
    ({"images": np.zeros((10, 8, 8))}, "labels"),
    ({"images": np.zeros((10, 8)), "labels": np.zeros(10, int)}, "images"),
    ({"images": np.full((10, 8, 8), np.nan), "labels": np.arange(10) % 2}, "images"),
    ({"images": np.zeros((10, 8, 8)), "labels": np.zeros(9, int)}, "labels"),
])
def test_cli_reports_bad_npz_files(tmp_path, capsys, arrays, words):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    code = main(["train", "--data", str(path), "--out", str(tmp_path / "out"), "--epochs", "1",
                 "--no-progress", "--encoder", "mlp"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error" in err and words in err
    assert not os.path.exists(tmp_path / "out" / CHECKPOINT)


def test_cli_trains_on_a_user_npz(tmp_path, capsys):
    d = load_digits(seed=0)
    images = (np.concatenate([d.x_train, d.x_test])[:240, 0] * 255).astype(np.uint8)
    labels = np.concatenate([d.y_train, d.y_test])[:240]
    np.savez(tmp_path / "mine.npz", images=images, labels=labels,
             train=np.arange(240) < 180)
    code = main(["train", "--data", str(tmp_path / "mine.npz"), "--out", str(tmp_path / "o"),
                 "--epochs", "1", "--batch-size", "60", "--queue-size", "60",
                 "--encoder", "mlp", "--no-progress"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0 <= summary["final"]["knn_accuracy"] <= 1
    metrics = json.load(open(tmp_path / "o" / "metrics.json"))
    assert metrics["dataset"]["train"] == 180 and metrics["dataset"]["test"] == 60


def test_cli_without_a_gpu_says_what_to_install_and_writes_nothing(tmp_path, capsys):
    from refmoco.backend import BackendUnavailableError, resolve

    try:
        resolve("cupy")
    except BackendUnavailableError:
        pass
    else:
        pytest.skip("this machine has CuPy and a GPU")
    out = tmp_path / "run"
    assert main(["train", "--backend", "cupy", "--epochs", "1", "--out", str(out)]) == 2
    assert "pip install 'refmoco[gpu]'" in capsys.readouterr().err
    assert not out.exists()


def test_learning_rate_defaults_per_mechanism_and_explicit_values_win():
    from refmoco.train import DEFAULT_LR

    for mechanism in ("moco", "end-to-end", "memory-bank"):
        assert TrainConfig(mechanism=mechanism).lr == DEFAULT_LR[mechanism]
        assert TrainConfig(mechanism=mechanism, lr=0.2).lr == 0.2
    assert TrainConfig(mechanism="memory-bank").lr < TrainConfig().lr
    assert TrainConfig(mechanism="memory-bank").to_json()["lr"] == DEFAULT_LR["memory-bank"]
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)


def test_without_numba_the_numba_backend_says_what_to_install(tmp_path):
    """Numba hidden from a fresh interpreter: the optimizer, the layers and `refmoco train`
    fail at once with the install hint (exit 2, no output folder), not deep inside a step."""
    code = f"""if True:
        import sys
        sys.modules["numba"] = None  # import numba now raises ImportError
        import numpy as np
        from refmoco.backend import BackendUnavailableError
        from refmoco.optim import SGD
        from refmoco.nn import functional as F
        from refmoco.cli import main
        for make in (lambda: SGD(0.1, backend="numba"),
                     lambda: F.relu_forward(np.ones(3), backend="numba")):
            try:
                make()
            except BackendUnavailableError as exc:
                assert "pip install 'refmoco[numba]'" in str(exc), exc
            else:
                raise AssertionError("no error")
        out = {str(tmp_path / "run")!r}
        assert main(["train", "--backend", "numba", "--epochs", "1", "--no-progress",
                     "--out", out]) == 2
        import os
        assert not os.path.exists(out)
        print("ok")
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
    assert "refmoco[numba]" in result.stderr  # the CLI's message


def test_evaluation_protocol_and_random_init_are_those_of_the_api(tmp_path, small, monkeypatch):
    """API.md: kNN on the L2-normalised head output, the linear probe on the backbone features
    before the head, and ``random_init`` the same model untrained (same seed). The evaluators
    are recorded where the trainer looks them up, and their inputs compared with the features
    computed here from the encoder itself: the fresh model's for the first evaluation, the
    checkpoint's for the last."""
    import refmoco.train as train_module

    real_knn = train_module.knn_accuracy
    real_probe = train_module.linear_probe_accuracy
    knn_calls, probe_calls = [], []

    def knn(train_x, train_y, test_x, test_y, *args, **kwargs):
        knn_calls.append((np.array(train_x), np.array(test_x)))
        return real_knn(train_x, train_y, test_x, test_y, *args, **kwargs)

    def probe(train_x, train_y, test_x, test_y, *args, **kwargs):
        probe_calls.append((np.array(train_x), np.array(test_x), args, kwargs))
        return real_probe(train_x, train_y, test_x, test_y, *args, **kwargs)

    monkeypatch.setattr(train_module, "knn_accuracy", knn)
    monkeypatch.setattr(train_module, "linear_probe_accuracy", probe)
    c = config(epochs=1, out_dim=24, seed=3)  # out_dim 24 vs the MLP's 256 features
    out = str(tmp_path / "run")
    metrics = run(c, out, progress=False, dataset=small)

    def own_features(trainer):
        """(normalised z, h) for the train and test splits, from the encoder's forward pass."""
        m = trainer.mechanism
        feats = []
        for x in (small.x_train, small.x_test):
            z, h, _ = trainer.encoder.forward_features(m.params, m.buffers, x.astype(c.dtype),
                                                       train=False)
            z, h = np.asarray(z, np.float64), np.asarray(h)
            feats.append((z / np.sqrt((z * z).sum(axis=1, keepdims=True)), h))
        return feats

    feature_dim = Trainer(c, small).encoder.feature_dim
    assert (feature_dim, c.out_dim) == (256, 24)
    # random_init and the one evaluation per epoch: kNN each time, the probe at start and end
    assert len(knn_calls) == 1 + c.epochs + 1 and len(probe_calls) == 2
    for z_train, z_test in knn_calls:
        assert z_train.shape == (len(small.x_train), c.out_dim)
        assert z_test.shape == (len(small.x_test), c.out_dim)
        for z in (z_train, z_test):  # unit rows (float32 rounding of the division)
            np.testing.assert_allclose(np.linalg.norm(z.astype(np.float64), axis=1), 1.0,
                                       rtol=0, atol=4 * np.finfo(np.float32).eps)
    for h_train, h_test, args, kwargs in probe_calls:
        assert h_train.shape == (len(small.x_train), feature_dim)
        assert h_test.shape == (len(small.x_test), feature_dim)
        assert (list(args) + [kwargs.get("seed")])[0] == c.seed

    fresh = Trainer(c, small)  # the same seed, never trained
    finished = Trainer(c, small)
    finished.load(out)  # the trained model, from the run's checkpoint
    for name, trainer, knn_call, probe_call in (("random_init", fresh, knn_calls[0],
                                                 probe_calls[0]),
                                                ("final", finished, knn_calls[-1],
                                                 probe_calls[-1])):
        (z_train, h_train), (z_test, h_test) = own_features(trainer)
        for got, expected in zip(knn_call, (z_train, z_test)):  # float32 normalisation
            np.testing.assert_allclose(got, expected, rtol=0, atol=4 * np.finfo(np.float32).eps,
                                       err_msg=name)
        for got, expected in zip(probe_call[:2], (h_train, h_test)):  # the same forward pass
            np.testing.assert_array_equal(got, expected, err_msg=name)
        assert metrics[name]["linear_accuracy"] == real_probe(
            h_train, small.y_train, h_test, small.y_test, seed=c.seed), name
        assert metrics[name]["knn_accuracy"] == real_knn(  # on the inputs just checked
            knn_call[0], small.y_train, knn_call[1], small.y_test), name
    assert fresh.epoch == 0 and finished.epoch == c.epochs
