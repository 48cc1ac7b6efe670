#!/usr/bin/env bash
# The whole pipeline on real herbarium material; docs/real-data.md records its figures.
#
#   bash bench/real_data.sh [DATA_DIR] [OUTPUT_DIR]
#
# DATA_DIR contains violaceae/ (the Violaceae-Dataset, github.com/Sujeong-Han/Violaceae-Dataset,
# with its labels.csv), sheets/ (LeafMachine, BU-Spark ml-herbarium and VoucherVision sheets)
# and bad-inputs/. Defaults: ../shared/data and out/real-data.
#
# Steps: prepare Violaceae twice (a random stratified split, and a split that holds out
# whole source herbaria, the sub-code of its file names); fine-tune EfficientNet-Lite0 on
# each; evaluate each model on its test split; label the sheets and bad-inputs sets with
# the first model. Settings other than the data come from herbray's defaults, except:
EPOCHS=${EPOCHS:-20}      # passes over about 100 training sheets
SPLIT=${SPLIT:-0.6,0.1,0.3}  # train, val, test: 30 % test (about 50 sheets), as the 70/30 reference
BATCH=${BATCH:-16}        # images per batch
THREADS=${THREADS:-$(nproc)}

set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-out/real-data}
HERBRAY=${HERBRAY:-.venv/bin/herbray}
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
mkdir -p "$OUT"

manifest=(--input "$DATA/violaceae/labels.csv" --image-column path --label-column species_code
    --split-fractions "$SPLIT")

for split in random herbaria; do
    group=()
    if [ "$split" = herbaria ]; then group=(--group-column sub_code); fi
    "$HERBRAY" prepare "${manifest[@]}" "${group[@]}" --output "$OUT/violaceae-$split"
    "$HERBRAY" train --shards "$OUT/violaceae-$split" --output "$OUT/model-$split" \
        --name "violaceae-$split" --epochs "$EPOCHS" --batch-size "$BATCH" \
        --torch-threads "$THREADS"
    "$HERBRAY" evaluate --model "$OUT/model-$split" \
        --input "$OUT/violaceae-$split/splits/test.parquet" --output "$OUT/evaluation-$split"
done

for source in sheets bad-inputs; do
    "$HERBRAY" label --model "$OUT/model-random" --input "$DATA/$source" \
        --output "$OUT/labels-$source" --torch-threads "$THREADS" --overwrite
done
