"""Prepare a labelled collection into training shards, as a Ray job.

Submit it to a cluster from the repository root::

    ray job submit --working-dir . -- python jobs/prepare.py \\
        --input s3://my-herbarium/collection/ --output s3://my-herbarium/prepared/

Every option of ``herbray prepare --help`` is accepted; the job joins the
cluster that runs it through RAY_ADDRESS.
"""

import sys

from herbray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
