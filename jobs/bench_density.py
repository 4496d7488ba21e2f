"""Density benchmark: tuned DNMM against KDE, GMM, zuko MAF and NSF on every bundled dataset.

    .venv/bin/python jobs/bench_density.py [--datasets moons,iris] [--trials 24] [--out jobs/results/density]

Same as `densiray bench density`; results go to <out>/density.{json,md} and <out>/plots/.
"""

import sys

from densiray.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "density", *sys.argv[1:]]))
