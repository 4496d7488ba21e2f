"""Engine against plain PyTorch: samples/s, time to the first step and peak memory, side by side.

A thin driver of ``densiray.bench.engine``: the engine runs through densiray's own ``fit``; the plain
PyTorch loop it is compared with is the clearly labelled baseline in that module. Repeats are
interleaved; the results take medians.

    python jobs/bench_engine.py --out jobs/results                 # CPU cases here, GPU cases on a GPU
    python jobs/bench_engine.py --out /tmp/b --repeats 1 --scale 0.3 --cases dnmm-moons   # smoke test

GPU cases (MiniLM-size full fine-tuning and LoRA at batch 256 x 128 tokens, a ~335 M BERT) run only
where Ray sees a GPU; elsewhere they are listed as skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parent.parent / "src"
if _SRC.is_dir():
    sys.path.insert(0, str(_SRC))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SRC), os.environ.get("PYTHONPATH")]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="jobs/results", help="folder for engine.json and engine.md")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per case (medians reported)")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the CPU cases' epochs")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    from densiray.bench.engine import run_benchmark, write_results

    only = [c for c in args.cases.split(",") if c] or None
    command = "python jobs/bench_engine.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    doc = run_benchmark(repeats=args.repeats, only=only, scale=args.scale, out=args.out, command=command)
    write_results(doc, args.out)
    for case in doc["cases"]:
        ratio = "skipped" if case.get("skipped") else f"{case['ratio']:.2f}x plain"
        print(f"{case['name']} ({case['device']}): {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
