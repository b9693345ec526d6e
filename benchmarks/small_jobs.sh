#!/bin/bash
# Small-job timings, this checkout against an older commit, in one run:
#   git worktree add /tmp/featx-old a923a1d && bash benchmarks/small_jobs.sh /tmp/featx-old
# Prints "SIDE WHAT SECONDS" lines (old/new; --version, train, train -j 1, run of an unchanged pipeline).
set -e
OLD=${1:?give the folder of the older checkout}
NEW=$(cd "$(dirname "$0")/.." && pwd)
PY=$NEW/.venv/bin/python
D=/tmp/hymen; C=/tmp/hymen-cache
if [ ! -d $D ]; then $PY - <<'PY'
from pathlib import Path
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for split, n in (("train", 123), ("val", 77)):
    for cls, col in (("ants", (150, 90, 40)), ("bees", (220, 190, 40))):
        d = Path("/tmp/hymen") / split / cls; d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = np.clip(np.array(col) + rng.normal(0, 40, (120, 160, 3)), 0, 255).astype("uint8")
            Image.fromarray(a).save(d / f"{cls}_{i}.jpg", quality=85)
PY
fi
t() { local s=$(date +%s.%N); "$@" > /dev/null 2>&1; echo "$(echo "$(date +%s.%N) - $s" | bc)"; }
for side in old new; do
  if [ $side = old ]; then export PYTHONPATH=$OLD; else export PYTHONPATH=$NEW; fi
  cd /tmp
  # warm the cache for this side (its own cache: keys may differ)
  $PY -m featx.cli train $D -b resnet18 -w none -q --cache $C-$side -o /tmp/m-$side.featx > /dev/null 2>&1 || true
  echo "$side version $(t $PY -m featx.cli --version)"
  echo "$side train $(t $PY -m featx.cli train $D -b resnet18 -w none -q --cache $C-$side -o /tmp/m-$side.featx)"
  echo "$side train-j1 $(t $PY -m featx.cli train $D -b resnet18 -w none -q -j 1 --cache $C-$side -o /tmp/m-$side.featx)"
done
for side in old new; do
  if [ $side = old ]; then export PYTHONPATH=$OLD; else export PYTHONPATH=$NEW; fi
  cat > /tmp/hymen-$side.toml <<TOML
[dataset]
path = "/tmp/hymen"
[[backbones]]
name = "resnet18"
weights = "none"
[classifiers]
names = ["logreg"]
[output]
dir = "/tmp/hymen-run-$side"
cache = "/tmp/hymen-cache-$side"
TOML
  $PY -m featx.cli run /tmp/hymen-$side.toml -q > /dev/null 2>&1 || echo "$side run failed"
  echo "$side run-unchanged $(t $PY -m featx.cli run /tmp/hymen-$side.toml -q)"
done
