#!/usr/bin/env bash
# Stage what a device call of the scaling ladder carries (the device tool sends the checkout, not
# ../shared): the Gutenberg and Dickens zips, the committed BPE and the downstream task files (one
# compressed archive, for sweep_slice.py --harness-models), under the git-ignored .data/.
# Then, for example (the device tool's carry list and command):
#   carry: .data/gutenberg-train.zip .data/gutenberg-val.zip .data/dickens.zip .data/cache/tokens/tokenizers
#   python3 scripts/sweep_slice.py configs/studies/ladder-gutenberg.yaml \
#       --results results/ladder-gutenberg --devices 0,0,0,0,0,0 --time-limit 420
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${SHARED:-../shared/data}
mkdir -p .data/cache/tokens/tokenizers
cp -n "$shared/gutenberg/gutenberg-train.zip" "$shared/gutenberg/gutenberg-val.zip" "$shared/dickens/dickens.zip" .data/
cp -rn results/ladder-gutenberg/tokenizer/. .data/cache/tokens/tokenizers/
# On the machine: mkdir -p .data/tasks && tar xf .data/harness-data.tar.xz -C .data/tasks,
# then --harness-data .data/tasks.
tar cJf .data/harness-data.tar.xz -C "$shared" arc/arc_challenge.jsonl arc/arc_easy.jsonl \
    hellaswag/hellaswag_val_full.txt.bz2 lambada/lambada_openai.jsonl piqa/piqa.jsonl winogrande/winogrande.jsonl
du -ch .data/*.zip .data/harness-data.tar.xz .data/cache/tokens/tokenizers | tail -1
