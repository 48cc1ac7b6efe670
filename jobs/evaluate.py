"""Evaluate a model on labelled specimens, as a Ray job.

Label a held-out labelled collection with the model and evaluate it, from the
repository root::

    ray job submit --working-dir . -- python jobs/evaluate.py \\
        --model s3://my-herbarium/models/lite0/ --input s3://my-herbarium/test-set.csv \\
        --output s3://my-herbarium/evaluations/lite0-test/ --num-actors 4 --gpus-per-actor 1

Or evaluate labels written earlier by ``herbray label``, without running the model::

    ray job submit --working-dir . -- python jobs/evaluate.py \\
        --labels s3://my-herbarium/labels/2026-12/ \\
        --truth s3://my-herbarium/archive-truth.csv \\
        --output s3://my-herbarium/evaluations/2026-12/

The output folder gets report.md, evaluation.json, per_species.csv and the
pictures. Every option of ``herbray evaluate --help`` is accepted.
"""

import sys

from herbray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
