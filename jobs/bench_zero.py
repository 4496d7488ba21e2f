"""ZeRO benchmark driver: per-rank parameter+optimiser memory and samples/s for ZeRO 0-3 and CPU
optimiser offload, 2 Ray Train workers, a randomly initialised BERT-base (~110 M parameters).

    python jobs/bench_zero.py                      # all configurations -> jobs/results/zero.{json,md}
    python jobs/bench_zero.py --steps 4 --seq-len 128 --out /tmp/zero

The measuring worker lives in densiray.bench.zero (it drives DeepSpeed through the engine's own
deepspeed_config); this file only picks the configurations and writes the results.
"""

import argparse
import sys
from pathlib import Path

src = Path(__file__).resolve().parent.parent / "src"
if src.is_dir():
    sys.path.insert(0, str(src))

from densiray.api import ensure_ray  # noqa: E402
from densiray.bench import zero  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3, help="steps per configuration (the first is not timed)")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--layers", type=int, default=12, help="BERT layers (12: BERT-base, ~110 M parameters)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "zero"))
    args = p.parse_args()
    ensure_ray(num_cpus=2, log_to_driver=False)
    report = zero.run(out=args.out, steps=args.steps, micro_batch=args.micro_batch, seq_len=args.seq_len,
                      bert={**zero.BERT_BASE, "num_hidden_layers": args.layers})
    print(zero.markdown(report))
