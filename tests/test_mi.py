"""refmoco.mi: the Gaussian ground truth, the critics' gradients, the bounds' ceilings, the CLI."""

import json
import math
import re

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import refmoco.cpc
import refmoco.mi
from refmoco._checks import SEED_MAX
from refmoco.mi import (
    check_temperature,
    config_from,
    critic_mlp,
    gaussian_mi,
    infonce_loss_and_grads,
    moco_loss_and_grads,
    optimal_critic_estimate,
    rho_for_mi,
    run_infonce_staircase,
    run_moco_queue,
    sample_correlated,
    separable_critic,
)
from refmoco.nn import Model
from refmoco.testing import assert_close, check_grad

seeds = st.integers(0, 2**32 - 1)
fast = settings(deadline=None)


@fast
@given(st.integers(1, 30), st.floats(0.0, 1.0))
def test_rho_and_mi_are_inverse_and_match_the_log_determinant(dim, frac):
    mi = 3.0 * dim * frac  # up to 1 - rho^2 = e^-6
    rho = rho_for_mi(mi, dim)
    # Rounding rho by one ulp moves I by about d * eps / (1 - rho^2) = d * eps * e^(2I/d):
    tol = 4 * dim * np.finfo(float).eps * math.exp(2 * mi / dim)
    assert abs(gaussian_mi(rho, dim) - mi) <= tol
    # I = (log det S_x + log det S_y - log det S) / 2 for the joint covariance S, computed apart
    cov = np.block([[np.eye(dim), rho * np.eye(dim)], [rho * np.eye(dim), np.eye(dim)]])
    assert abs(-0.5 * np.linalg.slogdet(cov)[1] - mi) <= 10 * tol


def test_samples_have_the_correlation(rng):
    rho = rho_for_mi(6.0, 20)
    x, y = sample_correlated(rng, 20000, 20, rho, "float32")
    assert x.dtype == y.dtype == np.float32
    se = math.sqrt((1 + rho**2) / (20000 * 20))  # standard error of mean(x * y)
    assert abs(float(np.mean(x.astype(np.float64) * y)) - rho) < 5 * se
    assert abs(float(np.var(y)) - 1.0) < 0.05


def naive_mlp(p, prefix, x):
    h = np.maximum(x @ p[f"{prefix}0.weight"].T + p[f"{prefix}0.bias"], 0)
    h = np.maximum(h @ p[f"{prefix}2.weight"].T + p[f"{prefix}2.bias"], 0)
    return h @ p[f"{prefix}4.weight"].T + p[f"{prefix}4.bias"]


def naive_infonce(scores, targets):
    """Mean over rows of log sum_j exp(s_ij) - s_i,target, one row at a time."""
    total = 0.0
    for i, row in enumerate(scores):
        total += math.log(sum(math.exp(v - row.max()) for v in row)) + row.max() - row[targets[i]]
    return total / len(scores)


def flat_fun(loss_fn, params):
    def fun(flat, **arrays):
        p = type(params)(params.shapes, flat.dtype, flat=np.ascontiguousarray(flat))
        loss, grads = loss_fn(p, **arrays)[:2]
        return loss, {"flat": grads.flat}

    return fun


@fast
@given(seeds, st.integers(2, 6))
def test_separable_critic_loss_and_gradient(seed, n):
    rng = np.random.default_rng(seed)
    critic = separable_critic(in_dim=3, hidden=4, out_dim=2)
    params, _ = critic.init(rng, "float64")
    x, y = rng.standard_normal((n, 3)), rng.standard_normal((n, 3))
    loss, _ = infonce_loss_and_grads(critic, params, x, y)
    scores = naive_mlp(params, "g.", x) @ naive_mlp(params, "h.", y).T  # (N, N)
    assert loss == pytest.approx(naive_infonce(scores, np.arange(n)), rel=1e-12)
    fun = flat_fun(lambda p, x, y: infonce_loss_and_grads(critic, p, x, y), params)
    check_grad(fun, {"flat": params.flat.copy(), "x": x, "y": y}, wrt=["flat"], rtol=1e-7,
               seed=seed % 1000)  # fmt: skip


@fast
@given(seeds, st.integers(2, 5), st.integers(1, 6))
@example(seed=40193, n=3, k=6)
def test_moco_loss_and_gradient_reach_the_query_encoder_only(seed, n, k):
    rng = np.random.default_rng(seed)
    net = critic_mlp(3, 4, 2)
    params_q, _ = Model(net).init(rng, "float64")
    params_k, _ = Model(net).init(rng, "float64")
    x, y = rng.standard_normal((n, 3)), rng.standard_normal((n, 3))
    queue = rng.standard_normal((k, 2))
    queue /= np.linalg.norm(queue, axis=1, keepdims=True)
    frozen_k = params_k.flat.copy()
    loss, grads, keys = moco_loss_and_grads(net, params_q, params_k, x, y, queue, 0.2)
    np.testing.assert_array_equal(params_k.flat, frozen_k)
    q = naive_mlp(params_q, "", x)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    kk = naive_mlp(params_k, "", y)
    kk /= np.linalg.norm(kk, axis=1, keepdims=True)
    assert_close(keys, kk, name="keys")
    scores = np.concatenate([np.sum(q * kk, axis=1)[:, None], q @ queue.T], axis=1) / 0.2
    assert loss == pytest.approx(naive_infonce(scores, np.zeros(n, int)), rel=1e-12)
    fun = flat_fun(lambda p, x, y: moco_loss_and_grads(net, p, params_k, x, y, queue, 0.2),
                   params_q)  # fmt: skip
    # eps = 3e-7: the central difference's truncation error (~eps^2) reached 1.09e-7 at eps = 1e-6
    # (seed=40193, n=3, k=6; 7e-9 at 3e-7, so it is the difference, not the gradient)
    check_grad(fun, {"flat": params_q.flat.copy(), "x": x, "y": y}, wrt=["flat"], rtol=1e-7,
               eps=3e-7, seed=seed % 1000)  # fmt: skip


def test_optimal_critic_is_tight_for_small_mi_and_capped_for_large(rng):
    """With e^I much below the candidates the best critic's bound is close to I; with e^I far
    above, it stays below ln(K + 1) and rises with K."""
    small = optimal_critic_estimate(rng, rho_for_mi(1.0), 20, 64, 1023, batches=40)
    assert abs(small[0] - 1.0) < 0.1
    prev = -np.inf
    for k in (15, 127, 1023):
        est, se = optimal_critic_estimate(rng, rho_for_mi(12.0), 20, 16, k, batches=20)
        assert prev < est <= math.log(k + 1)
        prev = est
    est, _ = optimal_critic_estimate(rng, rho_for_mi(12.0), 20, 16, batches=20)
    assert math.log(16) - 0.1 < est <= math.log(16)


TINY = dict(dim=4, hidden=16, embed_dim=8, batch_size=8, eval_batches=60, lr=3e-3)


def test_the_training_curve_knows_the_step_of_each_window():
    """Windows of 50 steps; a level's incomplete last window is dropped, so the points of the
    second level start at 120 + 25, not where an even spacing would put them."""
    m = run_infonce_staircase(config_from(mis=[0.0, 1.0], steps_per_level=120, **TINY))
    assert [r["step"] for r in m["curve"]] == [25, 75, 145, 195]
    assert [r["true_mi"] for r in m["curve"]] == [0.0, 0.0, 1.0, 1.0]


def test_staircase_stays_below_ln_n_and_below_zero_without_information():
    cfg = config_from(mis=[0.0, 6.0], steps_per_level=150, **TINY)
    m = run_infonce_staircase(cfg)
    zero, high = m["levels"]
    assert m["ceiling"] == pytest.approx(math.log(8))
    assert zero["estimate"] < 3 * zero["estimate_se"]  # a lower bound on I = 0
    assert all(lv["train_max"] <= math.log(8) for lv in m["levels"])  # L >= 0 for every batch
    assert 1.0 < high["estimate"] < math.log(8)
    assert len(m["curve"]) == 2 * 150 // 50


def test_moco_queue_lifts_the_ceiling():
    cfg = config_from(queue_sizes=[7, 63], moco_steps=200, moco_mi=8.0, moco_momentum=0.9,
                      **TINY)  # fmt: skip
    small, large = run_moco_queue(cfg, temperature=0.1)["runs"]
    for r in (small, large):
        assert r["ceiling"] == pytest.approx(math.log(r["queue_size"] + 1))
        assert r["estimate"] < r["ceiling"] and r["optimal_critic"] < r["ceiling"]
    assert large["estimate"] > small["ceiling"]  # beyond what 7 negatives could ever show


def test_cli_writes_metrics_and_plots(tmp_path, capsys):
    from refmoco.cli_extra import main

    rc = main(["mi-bound", "--levels", "1", "3", "--steps-per-level", "50", "--batch-size", "8",
               "--dim", "4", "--hidden", "16", "--embed-dim", "8", "--eval-batches", "5", "--queue-sizes", "7", "--moco-steps", "50",
               "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert rc == 0
    m = json.loads((tmp_path / "mi_bound.json").read_text())
    assert [lv["true_mi"] for lv in m["levels"]] == [1.0, 3.0]
    assert m["config"]["steps_per_level"] == 50 and len(m["curve"]) == 2
    moco = json.loads((tmp_path / "moco_queue.json").read_text())
    assert moco["runs"][0]["ceiling"] == pytest.approx(math.log(8))
    assert (tmp_path / "mi_bound.png").stat().st_size > 0
    assert (tmp_path / "moco_queue.png").stat().st_size > 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["infonce"]["ceiling_ln_N"] == pytest.approx(math.log(8))
    assert printed["moco"]["runs"][0]["estimate"] == pytest.approx(moco["runs"][0]["estimate"],
                                                                   abs=1e-3)  # fmt: skip


def test_cli_runs_one_experiment_alone(tmp_path):
    from refmoco.cli_extra import main

    rc = main(["mi-bound", "--levels", "--queue-sizes", "3", "--moco-steps", "5", "--dim", "2",
               "--hidden", "4", "--embed-dim", "2", "--batch-size", "4", "--eval-batches", "2",
               "--out", str(tmp_path), "--no-progress"])  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moco_queue.json", "moco_queue.png"]


@pytest.mark.parametrize(
    ("overrides", "name"),
    [({"batch_size": 0}, "batch_size"), ({"batch_size": 1}, "batch_size"), ({"lr": -1.0}, "lr"),
     ({"mis": [2.0, -1.0]}, "mis (--levels)"), ({"mis": [1e4]}, "mis (--levels)"),
     ({"moco_mi": -1.0}, "moco_mi"), ({"moco_mi": math.nan}, "moco_mi"),
     ({"moco_mi": 1e4}, "moco_mi"),
     ({"queue_sizes": [0]}, "queue_sizes"), ({"moco_momentum": 1.5}, "moco_momentum"),
     ({"eval_batches": 1}, "eval_batches"), ({"dtype": "int32"}, "dtype"),
     ({"steps_per_level": 1}, "steps_per_level"), ({"moco_steps": 1}, "moco_steps")],
)  # fmt: skip
def test_bad_config_names_the_argument(overrides, name):
    with pytest.raises(ValueError, match=f"^{re.escape(name)}: "):
        config_from(**overrides)


@pytest.mark.parametrize("dim", [1, 2, 20])
def test_rho_for_mi_refuses_an_mi_whose_correlation_rounds_to_one(dim):
    """Beyond about 18.7 nats per dimension rho is 1.0 in double precision: the best critic's
    1 / (1 - rho^2) was a ZeroDivisionError after a level's training."""
    rho = rho_for_mi(18.7 * dim, dim)
    assert 1.0 - rho * rho > 0
    with pytest.raises(ValueError, match=r"^levels: expected at most about"):
        rho_for_mi(18.8 * dim, dim, name="levels")
    with pytest.raises(ValueError, match=r"^mi: expected a finite number >= 0"):
        rho_for_mi(-1.0, dim)


def test_temperature_is_positive_with_a_finite_reciprocal_in_the_dtype():
    assert check_temperature(0.05) == 0.05
    assert check_temperature(1e-40, "float64") == 1e-40  # 1e40 is finite in float64 only
    for bad, dtype in ((0.0, "float32"), (-0.1, "float32"), (math.nan, "float32"),
                       (math.inf, "float32"), (1e-40, "float32"), (1e-310, "float64")):  # fmt: skip
        with pytest.raises(ValueError, match="^temperature: "):
            check_temperature(bad, dtype)
    for bad in ("0.05", True):
        with pytest.raises(TypeError, match="^temperature: "):
            check_temperature(bad)


@pytest.mark.parametrize("temperature", [0.0, math.nan, 1e-40])
def test_run_moco_queue_checks_the_temperature_before_building_anything(monkeypatch, temperature):
    monkeypatch.setattr(refmoco.mi, "critic_mlp", lambda *a, **k: pytest.fail("built a critic"))
    cfg = config_from(queue_sizes=[3], moco_steps=2, **TINY)
    with pytest.raises(ValueError, match="^temperature: "):
        run_moco_queue(cfg, temperature=temperature)


# ------------------------------------------- the CLI: a bad option is refused before anything

TINY_CLI = ["--steps-per-level", "2", "--batch-size", "4", "--dim", "2", "--hidden", "4",
            "--embed-dim", "2", "--eval-batches", "2", "--moco-steps", "2", "--queue-sizes", "3",
            "--no-progress"]  # fmt: skip


@pytest.fixture
def nothing_may_run(monkeypatch):
    """The experiments and CPC's training, each failing the test if it is called."""
    for module, name in ((refmoco.mi, "run_infonce_staircase"), (refmoco.mi, "run_moco_queue"),
                         (refmoco.cpc, "train_cpc")):  # fmt: skip
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran"))


@pytest.mark.parametrize(
    ("options", "message"),
    [(["--temperature", "0"], "temperature: expected a finite number > 0"),
     (["--temperature", "nan"], "temperature: expected a finite number > 0"),
     (["--temperature", "-0.1"], "temperature: expected a finite number > 0"),
     (["--temperature", "inf"], "temperature: expected a finite number > 0"),
     (["--temperature", "1e-40"], "temperature: expected a number > 2.94e-39"),  # 1/T: inf
     (["--temperature", "0", "--levels"], "temperature: "),  # MoCo's queues alone
     (["--temperature", "0", "--queue-sizes"], "temperature: "),  # the staircase alone
     (["--levels", "1", "-1"], "mis (--levels): expected a finite number >= 0"),
     (["--levels", "nan"], "mis (--levels): expected a finite number >= 0"),
     (["--levels", "1", "40"], "mis (--levels): expected at most about 37.4 nats"),  # dim 2
     (["--moco-mi", "-1"], "moco_mi: expected a finite number >= 0"),
     (["--moco-mi", "40"], "moco_mi: expected at most about 37.4 nats"),
     (["--batch-size", "1"], "batch_size: expected an integer >= 2"),
     (["--batch-size", "1", "--levels"], "batch_size: expected an integer >= 2")],
)  # fmt: skip
def test_cli_refuses_a_bad_option_before_any_file_or_step(tmp_path, capsys, nothing_may_run,
                                                          options, message):  # fmt: skip
    from refmoco.cli_extra import main

    out = tmp_path / "run"
    assert main(["mi-bound", *TINY_CLI, *options, "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"refmoco mi-bound: error: {message}")
    assert not out.exists()  # no folder, so no mi_bound.json / moco_queue.json either


@pytest.mark.parametrize("command", ["mi-bound", "cpc"])
def test_a_seed_beyond_scikit_learns_range_is_refused_before_anything(tmp_path, capsys,
                                                                      nothing_may_run, command):
    """cpc's linear probe (LogisticRegression's random_state) takes seeds below 2**32 only; a
    larger one failed after the folder was made. Every command takes the same seeds."""
    from refmoco.cli_extra import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        main([command, "--seed", str(SEED_MAX + 1), "--no-progress", "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"refmoco {command}: error: argument --seed: expected an integer <= {SEED_MAX}" in err
    assert not out.exists()


def test_the_largest_seed_is_taken(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    seen = {}

    def stand_in(config, on_step=None, **kwargs):
        seen["seed"] = config.seed
        raise Stop

    monkeypatch.setattr(refmoco.mi, "run_infonce_staircase", stand_in)
    from refmoco.cli_extra import main

    with pytest.raises(Stop):
        main(["mi-bound", *TINY_CLI, "--seed", str(SEED_MAX), "--out", str(tmp_path)])
    assert seen["seed"] == SEED_MAX == 2**32 - 1


@pytest.mark.parametrize(
    ("overrides", "name"),
    [({"lr": "5e-4"}, "lr"), ({"lr": True}, "lr"), ({"moco_momentum": "0.99"}, "moco_momentum"),
     ({"moco_momentum": True}, "moco_momentum"), ({"batch_size": True}, "batch_size")],
)  # fmt: skip
def test_config_numbers_of_the_wrong_type_are_a_type_error(overrides, name):
    with pytest.raises(TypeError, match=f"^{name}: "):
        config_from(**overrides)
