"""Entry point for `ray job submit`: the same arguments as `densiray train`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py dnmm --dataset moons --workers 4 --zero-stage 2 --store s3://bucket/models

Under `ray job submit` RAY_ADDRESS is set, so the run uses that cluster; run directly, it starts a
local Ray. The nodes need densiray installed (cluster.yaml's setup_commands do it); running from a
source checkout, src/ is put on the path for the driver (jobs/_entry.py).
"""

from _entry import run

if __name__ == "__main__":
    run("train")
