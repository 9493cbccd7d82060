#!/usr/bin/env bash
# One prepared GPU check (about 10 minutes on one GPU): the throughput table on CUDA (fp32 and bf16, paper sizes and
# the CPU default), the projected wall time of the paper's 100-epoch recipe, a check that the bf16 losses stay
# finite, then a paper-length DxMI run (the mvtec recipe's networks, guards and model selection, on the embedded
# textures) for as long as 4 minutes allow, printing E(data), E(samples) and the validation AUROC over time
# (benchmarks/paper_length.py). Writes the table to ${OUT:-.}/gpu_throughput.json. Needs the package installed.
#
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu_throughput.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 330 python benchmarks/throughput.py --device cuda --iters 20 --skip-memory --json "$out"
python - "$out" <<'PY'
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
bad = [name for name, row in rows.items() if not row["losses finite"]]
if bad:
    sys.exit(f"non-finite losses in: {bad}")

paper = {k: v for k, v in rows.items() if k.startswith("paper")}
for name, row in paper.items():
    print(f"{name}: {row['iterations/s']:.1f} it/s -> paper recipe {row['paper recipe (90,725 it) h'] * 60:.1f} min")
print("gpu_check: OK (losses finite)")
PY
timeout 420 python benchmarks/paper_length.py --device cuda --minutes 4 --ae-minutes 1 --every 500
