#!/usr/bin/env bash
# make gpu-check: every CUDA check of issue #23 in one time-boxed run (at most 8 minutes on one GPU), summarised
# as OUT/gpu_check.json and OUT/gpu_check.md. The work is in benchmarks/gpu_check.py; this only picks the
# interpreter, the folder and the mode.
#   scripts/gpu_check.sh [OUT] [--steps a,b] [--budget-s S]     OUT defaults to $OUT, else outputs/gpu-check
#   DEVICE=cpu scripts/gpu_check.sh [OUT]                         the CPU dry run (tiny sizes, every code path)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-outputs/gpu-check}}"
[[ $# -gt 0 ]] && shift
# The project's virtual environment unless PY names another interpreter (the Makefile passes its own).
python="${PY:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
args=(--out "$out")
case "${DEVICE:-cuda}" in
  cuda|gpu) ;;
  cpu) args+=(--dry-run) ;;
  *) echo "gpu_check.sh: DEVICE must be cuda or cpu, not '${DEVICE}'" >&2; exit 2 ;;
esac
exec "$python" "$repo/benchmarks/gpu_check.py" "${args[@]}" "$@"
