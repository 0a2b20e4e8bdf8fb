#!/usr/bin/env bash
# The accelerator check, one script: parity in float32 (every check at matmul precision
# highest), the benchmarks at equal precision on both sides, the demo, then float64 parity.
# Run from the repository root on a machine whose python has a CUDA jax and a CUDA torch:
#   bash benchmarks/accelerator_check.sh OUTDIR
# PYTHON=... picks the interpreter, DEVICE=cpu|gpu|tpu the backend (default gpu).
# OUTDIR receives parity_float32.json, bench.json, conv_profile.txt (cifar's convolutions),
# scaling.json (only with more than one device), demo_results.json, parity_float64.json;
# the exit status is non-zero if any step failed.
set -uo pipefail
out=${1:?usage: bash benchmarks/accelerator_check.sh OUTDIR}
py=${PYTHON:-python3}
device=${DEVICE:-gpu}
case $device in gpu) platform=cuda ;; cpu|tpu) platform=$device ;;
  *) echo "accelerator_check: DEVICE must be cpu, gpu or tpu, got '$device'" >&2; exit 2 ;; esac
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

step() {  # step NAME COMMAND...: run, time, remember a failure, go on
  local name=$1 t0 rc
  shift
  echo "== $name: $*"
  t0=$(date +%s%N)
  "$@"
  rc=$?
  echo "== $name: exit $rc after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
step versions "$py" -c 'import jax, flax, optax, torch; print("jax", jax.__version__, jax.devices(),
"flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA torch")'
step parity-float32 "$py" -m parity --dtype float32 --device "$device" --json "$out/parity_float32.json"
step benchmarks "$py" -m benchmarks --preset all --device "$device" --precision highest --json "$out/bench.json"
step conv-profile bash -c "JAX_PLATFORMS=$platform $py -m benchmarks.conv_profile > $out/conv_profile.txt"
ndev=$(JAX_PLATFORMS="$platform" "$py" -c 'import jax; print(jax.device_count())' 2>/dev/null || echo 1)
if [ "${ndev:-1}" -gt 1 ]; then
  step scaling "$py" -m benchmarks.scaling --device "$device" --devices 1 "$ndev" --json "$out/scaling.json"
fi
demo=$(mktemp -d)
step demo env JAX_PLATFORMS="$platform" "$py" -m kdjax demo --out "$demo/out" --quiet
cp "$demo/out/results.json" "$out/demo_results.json" 2>/dev/null || true
step parity-float64 "$py" -m parity --dtype float64 --device "$device" --json "$out/parity_float64.json"
exit "$status"
