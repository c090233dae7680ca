#!/usr/bin/env bash
# The conversion study on a lent GPU machine, in calls of at most ten minutes: import SmolLM2-135M
# from its GGUF, convert it and score the conversions with no training (on this GPU, so every row
# of the file comes from one device), uptrain the chosen conversions at each budget with qkvlab's
# trainer, score those runs on the same windows, and leave the results under $OUT.
#
# Every step skips what an earlier call on the same (warm) machine finished, so the script is
# simply called again until it says "done". Before the first call, on the workstation:
#
#   split -n 3 -d SmolLM2-135M-Instruct.Q4_1.gguf .data/smol-gguf.part   # 98 MB > one carry
#   echo 3 > .data/smol-gguf.parts
#   sha256sum SmolLM2-135M-Instruct.Q4_1.gguf > .data/smol-gguf.sha256
#
# and carry one part per call (with .data/smol-gguf.parts and .data/smol-gguf.sha256): files
# carried earlier stay on a warm machine, and a part of 33 MB fits beside the checkout (17 MB), so
# the parts can ride along other calls. The image has no gguf (nor lm-eval): carry .data/wheels
# from scripts/device_wheels.sh and install them first. The Gutenberg and Dickens zips must be
# there too (scripts/ladder_data.sh stages them), the training split from the first conversion on:
# the fitted ones calibrate on it. A call that makes every conversion of the no-training half
# takes about 9 minutes on an H100 (measured 2026-12-06); the fitted pooling dominates.
#
#   TIME_LIMIT=420 bash scripts/convert_slice.sh          # on the machine; again until "done"
#
# Knobs (environment): TOKENS (uptraining budgets, default 5M,20M), CONVERSIONS (default Q-K=V fit
# and fit+refit, Q-MQA fit+poolfit+refit and MQA poolfit+refit), TIME_LIMIT (seconds for the
# uptraining sweep), DEVICE, UPTRAIN_ARGS (more options for uptrain_study.py config, e.g.
# "--batch-size 8 --grad-accum 2"),
# BASELINE (a results JSON of an earlier slice on the same kind of device, e.g. the committed
# results/convert-smollm2/convert-no-training-cuda.json: its rows are kept, and a conversion the
# uptraining starts from is made again where its folder is not on this machine), CONVERT_ROWS
# (TO:INIT ... for convert_study.py --convert: only these conversions are made; with a BASELINE,
# e.g. the uptraining's four starting points), SWEEP_ARGS (more options for qkvlab sweep, e.g.
# "--devices 0,0" for two runs at once), TRAIN_ZIP (the uptraining and calibration text, default the
# Gutenberg training zip; scripts/zip_subset.py makes a smaller one of its first books),
# SCORE_ARGS (e.g. "--windows-per-book 1" for a quick CPU check of the script), HARNESS_DATA,
# HARNESS_LIMIT (items per task, default 500) and HARNESS_TIME (seconds, default 300) for the
# zero-shot scoring at the end, DEADLINE (epoch seconds: the sweep and the scoring fit in what is
# left before it; it overrides TIME_LIMIT).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/convert-out}
WORK=${WORK:-/tmp/convert-smollm2}
SRC=${SRC:-/tmp/smol-import}
TOKENS=${TOKENS:-5M,20M}
DEVICE=${DEVICE:-cuda}
TIME_LIMIT=${TIME_LIMIT:-420}
STUDY=studies/uptrain-smollm2
# the uptraining text, also the fitted conversions' calibration text (its first documents)
TRAIN_ZIP=${TRAIN_ZIP:-../shared/data/gutenberg/gutenberg-train.zip}
# The results live beside the conversions, on the machine: $OUT starts empty on every call, so a
# file kept only there could not be resumed. Each call leaves a copy in $OUT however it ends.
RESULTS=$WORK/convert-${DEVICE}.json
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT" "$WORK"
trap '[ -f "$RESULTS" ] && cp "$RESULTS" "$OUT/"' EXIT
if [ -n "${BASELINE:-}" ] && [ ! -f "$RESULTS" ]; then cp "$BASELINE" "$RESULTS"; fi
python3 -c "import sys; sys.path.insert(0, 'scripts'); import sweep_slice; sweep_slice.link_data()"

if [ ! -f "$SRC/model.safetensors" ]; then
    nparts=$(cat .data/smol-gguf.parts 2>/dev/null || echo 2)
    parts=()
    for i in $(seq 0 $((nparts - 1))); do
        part=$(printf ".data/smol-gguf.part%02d" "$i")
        if [ ! -f "$part" ]; then
            echo "waiting for the GGUF's part $part ($nparts in all): carry it in a next call"
            exit 0
        fi
        parts+=("$part")
    done
    gguf=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    cat "${parts[@]}" > "$gguf"
    echo "$(cut -d' ' -f1 .data/smol-gguf.sha256)  $gguf" | sha256sum -c -   # the parts joined whole
    python3 -m qkvlab import "$gguf" "$SRC"
fi

# The no-training half on this device (a previous call's rows are kept: --resume).
python3 scripts/convert_study.py "$SRC" --work "$WORK" --device "$DEVICE" --out "$RESULTS" \
    --calib "$TRAIN_ZIP" ${SCORE_ARGS:-} $( [ -f "$RESULTS" ] && echo --resume ) $(for c in ${CONVERT_ROWS:-}; do echo --convert "$c"; done)

# fit alone beside fit+refit for Q-K=V (does the better start save uptraining tokens?), and the
# pooled models at their best start (fitted pooling and the refit; averaged and not refitted they
# start at perplexities above 10,000). The source itself trains on the same tokens as their control
# (--control): training on Gutenberg lowers its Gutenberg perplexity too.
CONVERSIONS=${CONVERSIONS:-"Q-K=V:fit=$WORK/q-kv-fit Q-K=V:fit+refit=$WORK/q-kv-fit-refit \
Q-MQA:fit+poolfit+refit=$WORK/q-mqa-fit-poolfit-refit MQA:poolfit+refit=$WORK/mqa-poolfit-refit"}
if [ ! -f "$STUDY.yaml" ]; then
    python3 scripts/uptrain_study.py config --out "$STUDY.yaml" --tokens "$TOKENS" --study-dir "$STUDY" \
        --train-zip "$TRAIN_ZIP" --val-zip ../shared/data/gutenberg/gutenberg-val.zip \
        --control "$SRC" $(for c in $CONVERSIONS; do echo --conversion "$c"; done) ${UPTRAIN_ARGS:-}
fi
if [ ! -e "$TRAIN_ZIP" ]; then
    echo "waiting for $TRAIN_ZIP (the uptraining text): carry it in a next call"
    exit 0
fi
# DEADLINE (epoch seconds, e.g. the call's start + 560) bounds the sweep and the zero-shot scoring
# by what is left of the call once the import and the conversions are done.
left_s() { echo $(( ${DEADLINE} - $(date +%s) - $1 )); }
if [ -n "${DEADLINE:-}" ]; then
    TIME_LIMIT=$(left_s 60)   # a minute for scoring the finished runs and packing the results
    if [ "$TIME_LIMIT" -lt 30 ]; then echo "no time left for the uptraining in this call: call again"; exit 0; fi
fi
# --stop-at-limit: a run the limit cuts off stops with a checkpoint, and the next call on this warm
# machine resumes it, so no call's tail is spent idle.
python3 -m qkvlab sweep "$STUDY.yaml" --time-limit "$TIME_LIMIT" --stop-at-limit ${SWEEP_ARGS:-}
python3 scripts/uptrain_study.py score "$STUDY" --into "$RESULTS" --device "$DEVICE" --resume
# small files only: the run folders' configs and logs, not their weights
tar czf "$OUT/uptrain-runs.tar.gz" "$STUDY.yaml" "$STUDY.conversions.json" \
    $(find "$STUDY" -name config.yaml -o -name summary.json -o -name metrics.jsonl -o -name results.jsonl)
todo=()
left=$(python3 - "$STUDY.yaml" "$STUDY" <<'EOF'
import sys
from qkvlab.study import ResultsStore, expand, load_sweep
done = ResultsStore(sys.argv[2]).finished_ids()
print(sum(p.run_id not in done for p in expand(load_sweep(sys.argv[1]))))
EOF
)
if [ "$left" = 0 ]; then echo "uptraining done: every run scored into $RESULTS"; else echo "$left uptraining runs left: call again"; fi
# Zero-shot accuracy (lm-eval) of the source, the conversions the uptraining starts from and the
# uptrained runs, here, where their checkpoints are, once every run has trained: with HARNESS_DATA
# (the task files, e.g. .data/tasks unpacked from .data/harness-data.tar.xz) and lm-eval installed
# (its wheels: scripts/device_wheels.sh). A folder with a harness.json is done, so a call cut off
# by HARNESS_TIME is continued by the next; only the harness.json files come back.
unscored() {
    todo=()
    for d in "$SRC" $(for c in $CONVERSIONS; do echo "${c##*=}"; done) \
        $(find "$STUDY/runs" -mindepth 2 -maxdepth 2 -name model.safetensors -printf '%h\n' 2>/dev/null | sort); do
        [ -f "$d/harness.json" ] || todo+=("$d")
    done
}
if [ "$left" = 0 ] && [ -n "${HARNESS_DATA:-}" ]; then
    unscored
    if [ ${#todo[@]} -gt 0 ]; then
        harness_s=${HARNESS_TIME:-300}
        if [ -n "${DEADLINE:-}" ] && [ "$(left_s 20)" -lt "$harness_s" ]; then harness_s=$(left_s 20); fi
        timeout -s TERM "$((harness_s > 1 ? harness_s : 1))" python3 -m qkvlab eval harness "${todo[@]}" --tasks all \
            --limit "${HARNESS_LIMIT:-500}" --data-root "$HARNESS_DATA" --batch-size 32 \
            || echo "harness: stopped before every model was scored; call again"
        unscored
    fi
    find "$SRC" "$WORK" "$STUDY" -name harness.json -print0 | tar czf "$OUT/harness.tar.gz" --null -T -
    echo "harness: ${#todo[@]} model(s) left to score"
fi
if [ "$left" = 0 ] && [ ${#todo[@]} = 0 ]; then echo "done"; fi
