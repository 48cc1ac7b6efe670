"""Fine-tune a species classifier on prepared shards, as a Ray job.

Submit it to a cluster from the repository root::

    ray job submit --working-dir . -- python jobs/train.py \\
        --shards s3://my-herbarium/prepared/ --output s3://my-herbarium/models/lite0/ \\
        --num-workers 4 --use-gpu --epochs 20

Submitting the same command again resumes the run from its newest checkpoint.
Every option of ``herbray train --help`` is accepted.
"""

import sys

from herbray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
