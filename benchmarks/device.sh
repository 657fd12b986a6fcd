#!/usr/bin/env bash
# The benchmarks at full size on one GPU: first- and second-order overhead (curvjax, jax.grad,
# BackPACK on CUDA) and the GPT-style LM (curvjax, curvlinops on CUDA).
#
# Run from the repository root on a machine with a CUDA jax (the repository is not installed:
# PYTHONPATH=. makes it importable). BackPACK, unfoldNd and curvlinops with its pure-Python
# dependencies, when their wheels lie in .whl/, are installed into /tmp/site without network.
# Results go to $OUT as overhead-<gpu>.json, curvature-<gpu>.json and transformer-<gpu>.json (the
# file names and the JSON name the GPU); copy
# them into benchmarks/results/ and run `python benchmarks/report.py` to add the GPU tables to
# RESULTS.md. Both sides compute in float32 without TF32 (JAX_DEFAULT_MATMUL_PRECISION=highest,
# TF32 off in torch), so that the checks against the JAX reference hold. About 8-9 minutes on
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

# Which experiments (default: all three): EXPERIMENTS="transformer" bash benchmarks/device.sh
EXPERIMENTS=${EXPERIMENTS:-"overhead curvature transformer"}

for experiment in $EXPERIMENTS; do
    case $experiment in
        # First order: 3c3d and the wide MLP, N = 64 (about 2 minutes).
        overhead) timeout 180 python3 benchmarks/overhead.py --part first --repeats 20 ;;
        # Second order: 3c3d with 10 and 100 classes, the sigmoid net (about 3 minutes).
        curvature) timeout 180 python3 benchmarks/curvature.py --repeats 20 ;;
        # The GPT-style LM against curvlinops (its wheels in .whl/ too; about 3 minutes).
        # XLA's GPU autotuning alone takes minutes here (jax.grad compiled in 26 s with it, 5 s
        # without); extract is left out for the same reason (39 s to compile).
        transformer) XLA_FLAGS=--xla_gpu_autotune_level=0 timeout 400 python3 \
            benchmarks/transformer.py --repeats 10 \
            --rows "batch_l2,per_example_grads,ggn_diag_mc,kfac (expand),kfac (reduce),ggn_vp,hvp" ;;
        # Per-example clipping on 3c3d and the LM against jax-privacy and Opacus (their wheels
        # and jax-privacy's pure-Python dependencies chex, toolz, attrs, absl-py, dp-accounting
        # in .whl/ too). Not in the default list: EXPERIMENTS=private. With autotuning: without
        # it XLA picks slow convolutions for 3c3d's jax.grad (14.4 ms instead of 1.0 ms).
        private) timeout 540 python3 benchmarks/private.py --repeats 20 ;;
        *) echo "unknown experiment $experiment" ;;
    esac 2>&1 | tee "$OUT/$experiment.log"
    echo "$experiment exit status ${PIPESTATUS[0]}" | tee -a "$OUT/device.log"
done
ls -l "$OUT"
