"""Label a digitized archive with species suggestions, as a Ray job.

Submit it to a cluster from the repository root::

    ray job submit --working-dir . -- python jobs/label.py \\
        --model s3://my-herbarium/models/lite0/ --input s3://my-herbarium/scans/ \\
        --output s3://my-herbarium/labels/2026-12/ --num-actors 4 --gpus-per-actor 1

Submitting the same command again after a crash labels only what is missing.
Every option of ``herbray label --help`` is accepted.
"""

import sys

from herbray.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
