"""How often a process that read S3 aborts at interpreter exit, by how it ends (issue 21.6).

Each run is a fresh ``python -c`` process that reads a one-row Parquet table from a moto S3
server on loopback and exits. Variants, side by side against the same server:

- ``exit_process``: ends through ``lifecycle.exit_process(0)``, as every entry point does;
- ``finalize``: ``storage.finalize()`` as the script's last line;
- ``plain``: nothing at the end (only the at-exit hook in io/storage.py).

    python benchmarks/s3_exit.py --runs 150

Prints a table and ``RESULT {json}`` with the abort counts. Needs ``moto[server]`` (a test extra).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

COMMON = "import sys\nfrom dreamblend_ray.jobs.common import read_parquet\nprint(read_parquet(sys.argv[1]))\n"
VARIANTS = {
    "exit_process": COMMON + "from dreamblend_ray.runtime import lifecycle\nlifecycle.exit_process(0)\n",
    "finalize": COMMON + "from dreamblend_ray.io import storage\nstorage.finalize()\n",
    "plain": COMMON,
}


def start_s3() -> tuple[object, str]:
    """A moto S3 server on loopback with one bucket holding a one-row results table."""
    from moto.server import ThreadedMotoServer

    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ["DREAMBLEND_S3_ENDPOINT"] = f"http://{host}:{port}"
    import boto3
    import pyarrow as pa

    from dreamblend_ray.jobs.common import write_parquet

    boto3.client("s3", endpoint_url=os.environ["DREAMBLEND_S3_ENDPOINT"]).create_bucket(Bucket="s3-exit")
    uri = write_parquet("s3://s3-exit/runs/r/results.parquet", [{"subject_id": "a"}],
                        pa.schema([("subject_id", pa.string())]))
    return server, uri


def count_aborts(script: str, uri: str, runs: int) -> dict:
    aborts, failures = 0, 0
    for _ in range(runs):
        done = subprocess.run([sys.executable, "-c", script, uri], capture_output=True, text=True, timeout=120)
        if "'subject_id': 'a'" not in done.stdout:
            failures += 1
        elif done.returncode != 0:
            aborts += 1
    return {"runs": runs, "aborts": aborts, "failed_reads": failures}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="processes per variant")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    server, uri = start_s3()
    try:
        results = {name: count_aborts(VARIANTS[name], uri, args.runs) for name in args.variants}
    finally:
        server.stop()
    logging.info("%-14s %6s %7s %12s", "variant", "runs", "aborts", "failed reads")
    for name, row in results.items():
        logging.info("%-14s %6d %7d %12d", name, row["runs"], row["aborts"], row["failed_reads"])
    print("RESULT " + json.dumps({"results": results}))


if __name__ == "__main__":
    main()
