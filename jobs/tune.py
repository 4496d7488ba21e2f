"""Entry point for `ray job submit`: the same arguments as `densiray tune`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tune.py dnmm --dataset moons --trials 24 --workers-per-trial 2 --store s3://bucket/models

Under `ray job submit` RAY_ADDRESS is set, so the trials run on that cluster; a trial whose node is
lost is retried (Tune's FailureConfig), and submitting the same sweep again resumes it.
"""

from _entry import run

if __name__ == "__main__":
    run("tune")
