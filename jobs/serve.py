"""Entry point for `ray job submit`: the same arguments as `densiray serve`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/serve.py --store s3://bucket/models --replicas 2 --max-replicas-per-node 1 --host 0.0.0.0

Under `ray job submit` RAY_ADDRESS is set, so Serve runs on that cluster (its proxy on the head node,
the replicas wherever they fit); `ray job stop` stops it as Ctrl-C does (in-flight requests answered).
"""

from _entry import run

if __name__ == "__main__":
    run("serve")
