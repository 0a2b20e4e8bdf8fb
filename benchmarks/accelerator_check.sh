#!/usr/bin/env bash
# The accelerator check, one script, ready for the first minutes a device is lent:
# parity at matmul precision highest (float32 and float64), then every benchmark preset at its
# GPU shapes (equal precision on both sides), each step under its own time limit so that the
# whole run stays within 8 minutes of device time (the limits sum to 480 s on one device).
# Run from the repository root on a machine whose python has a CUDA jax and a CUDA torch:
#   bash benchmarks/accelerator_check.sh OUTDIR
#   DRY_RUN=1 bash benchmarks/accelerator_check.sh OUTDIR   # CPU, tiny shapes, the presets in one process
#     (bench_all.json; of the generic MLPs hinton only: wide is the same rows), parity's `loss` check only
#     (~1 min on 2 cores; tests/test_accelerator_check.py)
# PYTHON=... picks the interpreter, DEVICE=cpu|gpu|tpu the backend (default gpu; cpu when DRY_RUN=1).
# DEMO=1 adds `kdjax demo` (not counted in the 8 minutes).
# OUTDIR receives versions.txt, parity.json, bench_mlp.json (seed hinton wide), bench_image.json
# (cifar features), bench_lm.json, bench_gpt2.json, bench_llama.json, bench_on_policy.json,
# conv_profile.txt (GPU runs), scaling.json (more than one device), steps.json (each step's exit
# status and seconds: 124 = stopped at its time limit, then rerun that preset alone with a longer
# limit); the exit status is non-zero if any step failed. No tunix row on the device (its venv is
# built from the package index, which the device cannot reach): that row reports itself skipped.
set -uo pipefail
out=${1:?usage: bash benchmarks/accelerator_check.sh OUTDIR}
py=${PYTHON:-python3}
dry=${DRY_RUN:-0}
if [ "$dry" = 1 ]; then device=${DEVICE:-cpu}; else device=${DEVICE:-gpu}; fi
case $device in gpu) platform=cuda ;; cpu|tpu) platform=$device ;;
  *) echo "accelerator_check: DEVICE must be cpu, gpu or tpu, got '$device'" >&2; exit 2 ;; esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
steps_json="$out/steps.json"
echo "{" > "$steps_json"
sep=""

step() {  # step NAME LIMIT_S COMMAND...: run under a time limit, time it, remember a failure, go on
  local name=$1 limit=$2 t0 rc ms
  shift 2
  echo "== $name (limit ${limit} s): $*"
  t0=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "== $name: exit $rc after $ms ms"
  printf '%s  "%s": {"exit": %d, "ms": %d, "limit_s": %d}\n' "$sep" "$name" "$rc" "$ms" "$limit" >> "$steps_json"
  sep=","
  [ "$rc" -eq 0 ] || status=1
}

if [ "$dry" = 1 ]; then
  # the same steps at tiny shapes: code paths, loss checks and the JSON, not speed
  bench=(--tiny --eager-torch --repeats 1)
  parity_only=(--only loss)
else
  bench=(--repeats 3)
  parity_only=()
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$out/versions.txt" 2>/dev/null || true
step versions 30 bash -c "$py -c 'import jax, flax, optax, torch; print(\"jax\", jax.__version__, jax.devices(),
\"flax\", flax.__version__, \"optax\", optax.__version__, \"torch\", torch.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA torch\")' >> $out/versions.txt"
# parity: every check at matmul precision highest, float32 then float64
step parity 90 "$py" -m parity --dtype all --device "$device" "${parity_only[@]}" --json "$out/parity.json"
common=(--device "$device" --precision highest "${bench[@]}")
if [ "$dry" = 1 ]; then  # one process for the presets: six interpreter start-ups cost more than the tiny runs
  step bench-all 240 "$py" -m benchmarks --preset seed hinton cifar features lm gpt2 llama on_policy "${common[@]}" \
    --json "$out/bench_all.json"
else
  step bench-mlp 60 "$py" -m benchmarks --preset seed hinton wide "${common[@]}" --json "$out/bench_mlp.json"
  step bench-image 45 "$py" -m benchmarks --preset cifar features "${common[@]}" --json "$out/bench_image.json"
  step bench-lm 30 "$py" -m benchmarks --preset lm "${common[@]}" --json "$out/bench_lm.json"
  step bench-gpt2 60 "$py" -m benchmarks --preset gpt2 "${common[@]}" --json "$out/bench_gpt2.json"
  step bench-llama 90 "$py" -m benchmarks --preset llama "${common[@]}" --json "$out/bench_llama.json"
  step bench-on_policy 45 "$py" -m benchmarks --preset on_policy "${common[@]}" --json "$out/bench_on_policy.json"
fi
if [ "$dry" != 1 ]; then
  step conv-profile 30 bash -c "JAX_PLATFORMS=$platform $py -m benchmarks.conv_profile > $out/conv_profile.txt"
  ndev=$(JAX_PLATFORMS="$platform" "$py" -c 'import jax; print(jax.device_count())' 2>/dev/null || echo 1)
  if [ "${ndev:-1}" -gt 1 ]; then
    step scaling 60 "$py" -m benchmarks.scaling --device "$device" --devices 1 "$ndev" --json "$out/scaling.json"
  fi
fi
if [ "${DEMO:-0}" = 1 ]; then
  demo=$(mktemp -d)
  step demo 300 env JAX_PLATFORMS="$platform" "$py" -m kdjax demo --out "$demo/out" --quiet
  cp "$demo/out/results.json" "$out/demo_results.json" 2>/dev/null || true
fi
echo "}" >> "$steps_json"
exit "$status"
