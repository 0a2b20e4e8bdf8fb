#!/usr/bin/env bash
# Creates tunix's own virtual environment (google-tunix 0.1.7 with jax 0.10.2; it pins transformers
# 5.12 and tokenizers 0.22, so it must not share the project's environment) and prints its python.
#   bash benchmarks/tunix_venv.sh            # ~1 min the first time (106 packages, 1.6 GB; needs the package index)
# KDJAX_TUNIX_VENV=DIR picks the folder (default ~/.cache/kdjax-tunix-venv).
set -euo pipefail
venv=${KDJAX_TUNIX_VENV:-$HOME/.cache/kdjax-tunix-venv}
if ! "$venv/bin/python" -c 'import tunix.distillation' 2>/dev/null; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q "google-tunix==0.1.7" "jax==0.10.2" "jaxlib==0.10.2" >&2
fi
echo "$venv/bin/python"
