"""What jobs/train.py, jobs/tune.py and jobs/serve.py share: run a `densiray` command from a checkout
(src/ on the path for the driver) with the script's own arguments."""

import sys
from pathlib import Path


def run(command: str) -> None:
    src = Path(__file__).resolve().parent.parent / "src"
    if src.is_dir():
        sys.path.insert(0, str(src))
    from densiray.cli import main

    sys.exit(main([command, *sys.argv[1:]]))
