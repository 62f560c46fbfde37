#!/usr/bin/env bash
# The GPU checks of refmoco as one script, for a machine with an NVIDIA GPU, CuPy, numba-cuda and
# PyTorch (CUDA): the tests marked `gpu` (REFMOCO_REQUIRE_GPU=1 makes a skip a failure), once
# with each way of launching the Numba CUDA kernels (REFMOCO_CUDA_LAUNCHER: numba-cuda's launch,
# the default, then CuPy's), the kernel compilation and simulator tests, then
# `refmoco bench --only gpu` (refmoco cupy, each launcher, against PyTorch CUDA on the same GPU),
# then scripts/gpu_profile.py (launch costs, GPU busy time of a step: what to speed up next).
# The timeouts add up to 570 s: give the device call timeout_s 580.
# Run from the repository root: bash scripts/gpu_check.sh [OUTDIR]   (logs go to OUTDIR)
set -u -o pipefail
out=${1:-${OUT:-.}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 REFMOCO_REQUIRE_GPU=1
export HYPOTHESIS_PROFILE=ci  # derandomised, 40 examples a test: bounded time on the device
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu_env.txt"
python3 - <<'PY' 2>&1 | tee -a "$out/gpu_env.txt"
import importlib
for name in ("numpy", "cupy", "numba", "numba_cuda", "torch", "hypothesis", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001 - report whatever is missing
        print(name, "unavailable:", exc)
PY
status=0
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu_tests.txt" \
    || status=1
REFMOCO_CUDA_LAUNCHER=cupy timeout 100 python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 \
    | tee "$out/gpu_tests_cupy_launch.txt" || status=1
# this machine's numba-cuda compiling the kernels (PTX), the simulator, CuPy's API against the
# stand-in's record (tests/cupy_api_*.json)
timeout 70 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_ptx.py tests/test_cuda_sim.py \
    tests/test_fake_cupy.py 2>&1 | tee "$out/gpu_kernel_tests.txt" || status=1
timeout 190 python3 -m refmoco.bench --only gpu --repeats 5 --inherit-env 2>&1 \
    | tee "$out/gpu_bench.txt" || status=1
timeout 60 python3 scripts/gpu_profile.py 2>&1 | tee "$out/gpu_profile.txt" || status=1
exit $status
