"""The command line: every option's help and true default, errors reported without a traceback,
a negative --seed refused by name, an --out that cannot be written refused before anything runs,
and `cpc` / `mi-bound` never overwriting an earlier run."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest

import refmoco.cli_extra
import refmoco.cpc
import refmoco.mi
import refmoco.train
from refmoco.cli import main
from refmoco.cpc import CPCConfig
from refmoco.mi import MIConfig
from refmoco.train import DEFAULT_LR, TrainConfig


class _Stop(Exception):
    """Raised by a stand-in for a long computation once it has recorded what it was given."""


def help_entries(capsys, monkeypatch, command: str) -> dict[str, str]:
    """``refmoco COMMAND --help`` as {option: its help text, whitespace collapsed}."""
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside a help text
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    options = text.split("\noptions:\n", 1)[1]
    entries = {}
    for block in re.split(r"\n(?=  -)", options.rstrip("\n")):
        first, *rest = block.strip("\n").split("\n")
        invocation, *start = re.split(r"\s{2,}", first.strip(), maxsplit=1)
        option = invocation.split()[0].rstrip(",")
        entries[option] = " ".join(" ".join(start + rest).split())
    return entries


def default_shown(help_text: str) -> str | None:
    found = re.findall(r"\(default: ([^)]*)\)$", help_text)
    return found[0] if found else None


def small_npz(path, dtype=np.uint8) -> str:
    """The first 200 of scikit-learn's digits, pixels 0..255 in ``dtype``."""
    load_digits = pytest.importorskip("sklearn.datasets").load_digits

    bunch = load_digits()
    images = np.array((bunch.images[:200] * 255 / 16).round(), dtype=dtype)
    np.savez(path, images=images, labels=bunch.target[:200])
    return str(path)


def snapshot(folder) -> dict:
    """Each file under ``folder``: its bytes and modification time."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------- --help


def test_train_help_shows_every_default_that_a_run_uses(capsys, monkeypatch, tmp_path):
    seen = {}

    def fake_run(config, out, **kwargs):
        seen.update(config=config, out=out)
        return {"final": {}, "random_init": {}, "raw_pixels": {}, "train_seconds_this_run": 0.0}

    monkeypatch.setattr(refmoco.train, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 0
    capsys.readouterr()
    assert seen["config"] == TrainConfig()  # no option given: the library's defaults

    entries = help_entries(capsys, monkeypatch, "train")
    assert set(entries) >= {"--mechanism", "--encoder", "--epochs", "--batch-size",
                            "--queue-size", "--temperature", "--momentum", "--lr",
                            "--weight-decay", "--bn-groups", "--dataset", "--data", "--dtype",
                            "--backend", "--seed", "--out", "--resume", "--no-progress"}
    for option, text in entries.items():
        assert text and "None" not in text, (option, text)
    fields = {"--dataset": "data"}
    for option in ("--mechanism", "--encoder", "--epochs", "--batch-size", "--queue-size",
                   "--temperature", "--momentum", "--weight-decay", "--bn-groups", "--dataset",
                   "--dtype", "--backend", "--seed"):
        field = fields.get(option, option[2:].replace("-", "_"))
        value = getattr(seen["config"], field)
        shown = default_shown(entries[option])  # --dataset: "digits, unless --data is given"
        assert shown is not None and shown.split(",")[0] == str(value), (option, shown, value)
    assert default_shown(entries["--out"]) == seen["out"]
    for flag in ("--data", "--resume", "--no-progress"):  # nothing to show: no "(default: ...)"
        assert default_shown(entries[flag]) is None, flag


# option: (its value on the command line, the TrainConfig field, the value the field must hold);
# none of them the default
TRAIN_OPTIONS = {
    "--mechanism": ("memory-bank", "mechanism", "memory-bank"),
    "--encoder": ("mlp", "encoder", "mlp"),
    "--epochs": ("7", "epochs", 7),
    "--batch-size": ("48", "batch_size", 48),
    "--queue-size": ("80", "queue_size", 80),
    "--temperature": ("0.23", "temperature", 0.23),
    "--momentum": ("0.95", "momentum", 0.95),
    "--lr": ("0.017", "lr", 0.017),
    "--weight-decay": ("0.002", "weight_decay", 0.002),
    "--bn-groups": ("3", "bn_groups", 3),
    "--dataset": ("translated-digits", "data", "translated-digits"),
    "--dtype": ("float64", "dtype", "float64"),
    "--backend": ("numba", "backend", "numba"),
    "--seed": ("17", "seed", 17),
}


@pytest.mark.parametrize("source", ["--dataset", "--data"])
def test_every_train_option_reaches_the_trainers_config(capsys, monkeypatch, tmp_path, source):
    """A non-default value for every option of ``refmoco train`` (--data and --dataset, which
    exclude each other, in turn): each TrainConfig field holds it where the trainer is built
    inside the real ``run``, and --out, --resume, --no-progress reach ``run``."""
    options = dict(TRAIN_OPTIONS)
    data = str(tmp_path / "mine.npz")  # never read: the trainer is stopped before
    if source == "--data":
        del options["--dataset"]
        options["--data"] = (data, "data", data)
    out = str(tmp_path / "run")
    argv = ["train", *[a for option, (value, _, _) in options.items() for a in (option, value)],
            "--out", out, "--resume", "--no-progress"]
    for option, (_, field, expected) in options.items():
        assert expected != getattr(TrainConfig(), field), option
    assert 0.017 != TrainConfig(mechanism="memory-bank").lr  # not memory-bank's default either
    help_options = set(help_entries(capsys, monkeypatch, "train")) - {"-h"}
    assert help_options == set(TRAIN_OPTIONS) | {"--data", "--out", "--resume", "--no-progress"}

    seen = {}

    def trainer_built(config, dataset=None):
        seen["config"] = config
        raise _Stop

    monkeypatch.setattr(refmoco.train, "Trainer", trainer_built)  # inside the real run
    with pytest.raises(_Stop):
        main(argv)
    config = seen.pop("config")
    for option, (_, field, expected) in options.items():
        assert getattr(config, field) == expected, (option, field, getattr(config, field))
    assert config == TrainConfig(**{field: expected for _, field, expected in options.values()})

    def fake_run(config, out, **kwargs):
        seen.update(config=config, out=out, **kwargs)
        return {"final": {}, "random_init": {}, "raw_pixels": {}, "train_seconds_this_run": 0.0}

    monkeypatch.setattr(refmoco.train, "run", fake_run)
    assert main(argv) == 0
    assert seen == {"config": config, "out": out, "resume": True, "progress": False}
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("mechanism", sorted(DEFAULT_LR))
def test_train_help_gives_each_mechanisms_learning_rate(capsys, monkeypatch, tmp_path, mechanism):
    seen = {}

    def fake_run(config, out, **kwargs):
        seen["lr"] = config.lr
        return {"final": {}, "random_init": {}, "raw_pixels": {}, "train_seconds_this_run": 0.0}

    monkeypatch.setattr(refmoco.train, "run", fake_run)
    assert main(["train", "--mechanism", mechanism, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    lr_help = help_entries(capsys, monkeypatch, "train")["--lr"]
    assert f"{seen['lr']:g} for {mechanism}" in lr_help
    assert seen["lr"] == TrainConfig(mechanism=mechanism).lr


def test_cpc_help_shows_every_default_that_a_run_uses(capsys, monkeypatch, tmp_path):
    seen = {}

    def fake_train(config, on_step=None):
        seen["config"] = config
        raise _Stop

    refuse = refmoco.cli_extra.refuse_existing
    monkeypatch.setattr(refmoco.cli_extra, "refuse_existing",
                        lambda out, names: (seen.update(out=out), refuse(out, names)))
    monkeypatch.setattr(refmoco.cpc, "train_cpc", fake_train)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(_Stop):
        main(["cpc"])
    assert seen["config"] == CPCConfig()

    entries = help_entries(capsys, monkeypatch, "cpc")
    fields = {"--steps": "train_steps", "--predict-steps": "num_steps"}
    for option, text in entries.items():
        assert text and "None" not in text, (option, text)
        if option in ("-h", "--no-progress"):
            continue
        if option == "--out":
            assert default_shown(text) == seen["out"]
            continue
        value = getattr(seen["config"], fields.get(option, option[2:].replace("-", "_")))
        assert default_shown(text) == str(value), (option, value)


def test_mi_bound_help_shows_every_default_that_a_run_uses(capsys, monkeypatch, tmp_path):
    seen = {}

    def record(name):
        def stand_in(config, on_step=None, **kwargs):
            seen[name] = (config, kwargs)
            raise _Stop

        return stand_in

    library_temperature = inspect.signature(
        refmoco.mi.run_moco_queue).parameters["temperature"].default
    monkeypatch.setattr(refmoco.mi, "run_infonce_staircase", record("staircase"))
    monkeypatch.setattr(refmoco.mi, "run_moco_queue", record("moco"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(_Stop):
        main(["mi-bound"])  # the staircase first
    with pytest.raises(_Stop):
        main(["mi-bound", "--levels"])  # no staircase: MoCo's queues
    assert seen["staircase"][0] == MIConfig() and seen["moco"][0] == MIConfig(mis=())
    temperature = seen["moco"][1]["temperature"]
    assert temperature == library_temperature

    entries = help_entries(capsys, monkeypatch, "mi-bound")
    config = seen["staircase"][0]
    expected = {"--levels": str(list(config.mis)), "--queue-sizes": str(list(config.queue_sizes)),
                "--temperature": str(temperature), "--out": "runs/mi-bound"}
    for option, text in entries.items():
        assert text and "None" not in text, (option, text)
        if option in ("-h", "--no-progress"):
            continue
        value = expected.get(option) or str(getattr(config, option[2:].replace("-", "_")))
        assert default_shown(text) == value, (option, value)


# --------------------------------------------------------------------- errors, not tracebacks


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflow on the way to NaN
def test_a_diverging_run_is_an_error_message_not_a_traceback(tmp_path, capsys):
    data = small_npz(tmp_path / "small.npz")
    code = main(["train", "--data", data, "--encoder", "mlp", "--batch-size", "32",
                 "--queue-size", "64", "--epochs", "1", "--mechanism", "end-to-end",
                 "--lr", "1e8", "--no-progress", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("refmoco train: error: ") and "--lr" in err
    assert "Traceback" not in err


def test_floating_point_errors_of_any_command_are_reported(tmp_path, capsys, monkeypatch):
    def diverge(*args, **kwargs):
        raise FloatingPointError("the loss became nan")

    monkeypatch.setattr(refmoco.train, "run", diverge)
    assert main(["train", "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err == "refmoco train: error: the loss became nan\n"
    monkeypatch.setattr(refmoco.cpc, "train_cpc", diverge)
    for entry in (main, refmoco.cli_extra.main):  # also python -m refmoco.cli_extra
        assert entry(["cpc", "--no-progress", "--out", str(tmp_path / "b")]) == 2
        assert capsys.readouterr().err == "refmoco cpc: error: the loss became nan\n"


@pytest.mark.parametrize("command", ["train", "cpc", "mi-bound"])
@pytest.mark.parametrize("seed", ["-1", "1.5", "x"])
def test_a_bad_seed_is_refused_by_name_before_anything_runs(tmp_path, capsys, command, seed):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main([command, "--seed", seed, "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"refmoco {command}: error: argument --seed: expected an integer >= 0" in err
    assert not out.exists()


def test_data_and_dataset_together_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", "x.npz", "--dataset", "digits", "--out", str(out)]) == 2
    assert capsys.readouterr().err == "refmoco train: error: give --data or --dataset, not both\n"
    assert not out.exists()


def test_signed_integer_images_are_refused_with_what_to_do(tmp_path, capsys):
    data = small_npz(tmp_path / "ints.npz", dtype=np.int64)  # 0..255, NumPy's default int
    out = tmp_path / "run"
    assert main(["train", "--data", data, "--encoder", "mlp", "--epochs", "1", "--no-progress",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refmoco train: error: ")
    assert "'images'" in err and "int64" in err and "uint8" in err
    assert not out.exists()


# ----------------------------------------------------- an --out that cannot be made or written


@pytest.fixture
def nothing_may_train(monkeypatch):
    """Every command's data loading and training, each failing the test if it is called."""
    for module, name in ((refmoco.train, "Trainer"), (refmoco.train, "load_dataset"),
                         (refmoco.cpc, "train_cpc"), (refmoco.mi, "run_infonce_staircase"),
                         (refmoco.mi, "run_moco_queue")):  # fmt: skip
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran"))


def unwritable_out(tmp_path, read_only_folder, where: str):
    """An --out of each kind that cannot be written."""
    if where in ("a file", "below a file"):
        afile = tmp_path / "afile"
        afile.write_text("mine")
        return afile if where == "a file" else afile / "run"
    return read_only_folder if where == "a read-only folder" else read_only_folder / "run"


def everything_under(folder) -> dict:
    """Each folder and file under ``folder``: None for a folder, a file's bytes and mtime."""
    return {p.relative_to(folder): None if p.is_dir() else (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


OUT_CASES = [("a file", "is a file"), ("below a file", "is below the file"),
             ("a read-only folder", "is not writable"),
             ("below a read-only folder", "cannot be made")]


@pytest.mark.parametrize("command", ["train", "cpc", "mi-bound"])
@pytest.mark.parametrize("where, words", OUT_CASES)
def test_an_out_that_cannot_be_written_is_refused_before_anything_runs(
        request, tmp_path, capsys, nothing_may_train, command, where, words):
    """A file, a path below a file, a read-only folder or a path below one: the command stops at
    once (exit 2, one line naming --out, the path and the reason), before any data is loaded or
    step run, and leaves every folder as it was (no folder made, no file of the write check)."""
    read_only = request.getfixturevalue("read_only_folder") if "read-only" in where else None
    out = unwritable_out(tmp_path, read_only, where)
    before = everything_under(tmp_path)
    assert main([command, "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"refmoco {command}: error: out: ") and err.count("\n") == 1
    assert "(--out)" in err and f"{out} {words}" in err
    if "read-only" in where:
        assert "Permission denied" in err  # the reason
    assert everything_under(tmp_path) == before


@pytest.mark.parametrize("command", ["train", "cpc", "mi-bound"])
def test_the_write_check_leaves_nothing_in_a_folder_it_accepts(tmp_path, monkeypatch, command):
    """An empty --out that exists, and one to be made below it: the check passes (the training
    entry point is reached) and leaves no file. ``train`` makes a new folder once the data is
    loaded (stopped here before), ``cpc`` and ``mi-bound`` before their first step."""
    reached = []

    def stop(*args, **kwargs):
        reached.append(command)
        raise _Stop

    for module, name in ((refmoco.train, "Trainer"), (refmoco.cpc, "train_cpc"),
                         (refmoco.mi, "run_infonce_staircase")):  # fmt: skip
        monkeypatch.setattr(module, name, stop)
    out = tmp_path / "out"
    out.mkdir()
    for folder in (out, out / "new" / "run"):
        with pytest.raises(_Stop):
            main([command, "--no-progress", "--out", str(folder)])
        if command == "train" and folder != out:
            assert not (out / "new").exists()
        else:
            assert list(folder.iterdir()) == []
    assert len(reached) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing beside it either


# ------------------------------------------------------------ cpc and mi-bound: no overwriting


@pytest.mark.parametrize("saved", ["cpc.json", "cpc.png"])
def test_cpc_refuses_an_out_holding_an_earlier_run(tmp_path, capsys, monkeypatch, saved):
    calls = []
    monkeypatch.setattr(refmoco.cpc, "train_cpc", lambda *a, **k: calls.append(a))
    (tmp_path / saved).write_text("an earlier run")
    before = snapshot(tmp_path)
    assert main(["cpc", "--steps", "4", "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refmoco cpc: error: ") and saved in err
    assert "another --out" in err and "remove" in err
    assert calls == []  # refused before training
    assert snapshot(tmp_path) == before  # untouched, nothing added


TINY_MI = ["--steps-per-level", "3", "--batch-size", "4", "--dim", "2", "--hidden", "4",
           "--embed-dim", "2", "--eval-batches", "2", "--moco-steps", "3", "--no-progress"]


def test_mi_bound_refuses_to_overwrite_and_leaves_the_earlier_run_as_it_was(tmp_path, capsys):
    out = tmp_path / "mi"
    assert main(["mi-bound", "--levels", "1", "--queue-sizes", "3", *TINY_MI,
                 "--out", str(out)]) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert set(before) >= {"mi_bound.json", "moco_queue.json"}
    for experiment in (["--levels", "2", "--queue-sizes"], ["--levels", "--queue-sizes", "5"]):
        assert main(["mi-bound", *experiment, *TINY_MI, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("refmoco mi-bound: error: ") and "another --out" in err
        assert ("mi_bound.json" in err) == (experiment[1] == "2")
        assert snapshot(out) == before


def test_mi_bound_checks_only_the_files_it_would_write(tmp_path):
    """A staircase in --out does not stop MoCo's queues from being written beside it."""
    out = tmp_path / "mi"
    assert main(["mi-bound", "--levels", "1", "--queue-sizes", *TINY_MI, "--out", str(out)]) == 0
    staircase = snapshot(out)
    assert main(["mi-bound", "--levels", "--queue-sizes", "3", *TINY_MI, "--out", str(out)]) == 0
    after = snapshot(out)
    assert {k: after[k] for k in staircase} == staircase
    assert "moco_queue.json" in after


def test_the_cli_extra_entry_point_reports_a_refusal_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(refmoco.mi, "run_moco_queue", lambda *a, **k: pytest.fail("ran"))
    (tmp_path / "moco_queue.png").write_bytes(b"a plot")
    code = refmoco.cli_extra.main(["mi-bound", "--levels", "--out", str(tmp_path)])
    assert code == 2
    assert "moco_queue.png" in capsys.readouterr().err
    assert (tmp_path / "moco_queue.png").read_bytes() == b"a plot"
