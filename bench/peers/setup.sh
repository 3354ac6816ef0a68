#!/usr/bin/env bash
# Create the peer-tool venvs used by the agreement tests and the benchmark:
#   .peers/tl  TransformerLens 4.x (TransformerBridge over the HF model)
#   .peers/ac  auto-circuit 1.0.1 + TransformerLens 2.x (HookedTransformer)
#   .peers/sl  SAELens 6.x (its SAE classes, for the SAE agreement test)
# Both are created with --system-site-packages so they reuse the system's CPU
# torch 2.13.0; constraints.txt pins torch so pip can never replace it with a
# CUDA build. Idempotent: an existing venv is reused and pip only fills gaps.
#
# Usage: bench/peers/setup.sh [tl|ac|sl ...]   (default: tl and ac)
# Env:   PYTHON (default: python3), PEERS_DIR (default: <repo>/.peers)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
peers="${PEERS_DIR:-$repo/.peers}"
constraints="$here/constraints.txt"

check_torch() {
    # The venv must see exactly the pinned CPU torch, nothing else.
    local want
    want="$(sed -n 's/^torch==//p' "$constraints")"
    "$1/bin/python" - "$want" <<'PY'
import sys, torch
want = sys.argv[1]
have = torch.__version__.split("+")[0]
if have != want:
    sys.exit(f"peer venv sees torch {torch.__version__}, expected {want}")
PY
}

make_venv() {
    local name="$1" reqs="$2" probe="$3"
    local venv="$peers/$name"
    if [[ ! -x "$venv/bin/python" ]]; then
        echo "[$name] creating $venv"
        "$python" -m venv --system-site-packages "$venv"
    fi
    check_torch "$venv"
    echo "[$name] checking that pip would not touch torch (dry run)"
    local plan
    plan="$("$venv/bin/pip" install --dry-run -c "$constraints" -r "$reqs" 2>&1 | grep '^Would install' || true)"
    if grep -Eq '(^| )(torch|nvidia-[a-z0-9-]+|triton)-[0-9]' <<<"$plan"; then
        echo "[$name] refusing: pip would install a torch/CUDA package: $plan" >&2
        exit 1
    fi
    echo "[$name] installing ${plan:-nothing new}"
    "$venv/bin/pip" install --quiet -c "$constraints" -r "$reqs"
    check_torch "$venv"
    "$venv/bin/python" -c "$probe"
    echo "[$name] ok: $("$venv/bin/python" -m pip list 2>/dev/null | grep -Ei '^(torch|transformers|transformer-lens|auto-circuit|datasets|pyarrow|numpy) ' | tr -s ' ' | tr '\n' ';')"
}

targets=("$@")
[[ ${#targets[@]} -eq 0 ]] && targets=(tl ac)
mkdir -p "$peers"
for target in "${targets[@]}"; do
    case "$target" in
        tl) make_venv tl "$here/requirements-tl.txt" \
                "from transformer_lens.model_bridge import TransformerBridge; from transformer_lens import patching" ;;
        ac) make_venv ac "$here/requirements-ac.txt" \
                "import auto_circuit.utils.graph_utils, datasets; from transformer_lens import HookedTransformer; from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights" ;;
        sl) make_venv sl "$here/requirements-sl.txt" "from sae_lens import SAE" ;;
        *) echo "unknown peer '$target' (valid: tl, ac, sl)" >&2; exit 2 ;;
    esac
done
