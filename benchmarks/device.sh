#!/usr/bin/env bash
# First- and second-order overhead at full size on one GPU (curvjax, jax.grad, BackPACK on CUDA).
#
# Run from the repository root on a machine with a CUDA jax (the repository is not installed:
# PYTHONPATH=. makes it importable). BackPACK and unfoldNd, when their wheels lie in .whl/, are
# installed into /tmp/site without network. Results go to $OUT as
# overhead-<gpu>.json and curvature-<gpu>.json (the file names and the JSON name the GPU); copy
# them into benchmarks/results/ and run `python benchmarks/report.py` to add the GPU tables to
# RESULTS.md. Both sides compute in float32 without TF32 (JAX_DEFAULT_MATMUL_PRECISION=highest,
# TF32 off in torch), so that the checks against the JAX reference hold. About 5-6 minutes on
# one H200; each experiment has its own time limit so that the first one's file always comes
# back.
set -u
OUT=${OUT:-/tmp/curvjax-benchmarks}
mkdir -p "$OUT"

export PYTHONPATH=.
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:.
fi
export CURVJAX_BENCHMARK_RESULTS="$OUT"
export JAX_DEFAULT_MATMUL_PRECISION=highest
# Leave GPU memory to torch: JAX would otherwise take 75 % of it at start.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5

{
    date -u
    nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv || true
    python3 -c "import jax; print(jax.__version__, jax.devices())"
    python3 -c "import torch, backpack; print('torch', torch.__version__, torch.cuda.is_available(), 'backpack importable')" \
        || echo "BackPACK not importable: JAX rows only"
} 2>&1 | tee "$OUT/device.log"

# First order: 3c3d and the wide MLP, N = 64 (about 2 minutes).
timeout 180 python3 benchmarks/overhead.py --part first --repeats 20 2>&1 | tee "$OUT/overhead.log"
echo "overhead.py exit status ${PIPESTATUS[0]}" | tee -a "$OUT/device.log"

# Second order: 3c3d with 10 and 100 classes, the sigmoid net (about 3 minutes).
timeout 180 python3 benchmarks/curvature.py --repeats 20 2>&1 | tee "$OUT/curvature.log"
echo "curvature.py exit status ${PIPESTATUS[0]}" | tee -a "$OUT/device.log"
ls -l "$OUT"
