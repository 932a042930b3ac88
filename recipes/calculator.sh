#!/usr/bin/env bash
# RECIPE=calculator of train.sh (its header lists the variables): a synthetic tool-use corpus -> pack -> SFT from
# scratch -> tool eval -> GRPO (calculator_call reward) -> tool eval, under OUT_DIR; final -> the last stage.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
: "${PYTHON:?}" "${OUT_DIR:?}" "${SMOKE:=0}"
TOKENIZER_DIR="${TOKENIZER_DIR:-data/tokenizer}"; CALC_SEED="${CALC_SEED:-0}"; GRPO="${GRPO:-1}"
if [[ "$SMOKE" == 1 ]]; then
  CALC_TRAIN="${CALC_TRAIN:-200}"; CALC_HELDOUT="${CALC_HELDOUT:-4}"; CALC_GRPO_PROMPTS=16
  CALC_SFT_STEPS="${CALC_SFT_STEPS:-3}"; CALC_GRPO_STEPS="${CALC_GRPO_STEPS:-1}"
  CALC_MODEL_ARGS="${CALC_MODEL_ARGS-}"; BATCH=2; GROUP=(--group-size 2 --prompts-per-step 2); NEW=24
else
  CALC_TRAIN="${CALC_TRAIN:-6000}"; CALC_HELDOUT="${CALC_HELDOUT:-200}"; CALC_GRPO_PROMPTS=2000
  CALC_SFT_STEPS="${CALC_SFT_STEPS:-100}"; CALC_GRPO_STEPS="${CALC_GRPO_STEPS:-20}"
  CALC_MODEL_ARGS="${CALC_MODEL_ARGS-hidden_size=128 num_hidden_layers=4}"; BATCH=4
  GROUP=(--group-size 8 --prompts-per-step 4); NEW=48
fi
MODEL_FLAGS=(--model tiny --model-arg max_position_embeddings=1024)  # three tool rounds with two tools fit
for kv in $CALC_MODEL_ARGS; do MODEL_FLAGS+=(--model-arg "$kv"); done
# shellcheck disable=SC2206  # word splitting of the *_ARGS variables is intended
SFT_EXTRA=(${SFT_ARGS:-}); GRPO_EXTRA=(${GRPO_ARGS:-})
DATA="$OUT_DIR/data"; HELDOUT="$DATA/heldout.jsonl"
run() { printf '$ %s\n' "$*"; "$@"; }
step() { printf '\n\033[1m== [calculator] %s\033[0m\n' "$1"; }
START=$SECONDS
mkdir -p "$OUT_DIR"

step "corpus: $CALC_TRAIN conversations (seed $CALC_SEED), $CALC_HELDOUT held-out questions -> $DATA"
[[ -f "$HELDOUT" ]] && echo "already written: $DATA" || run "$PYTHON" preprocess/make_calculator.py --out "$DATA" \
  --train "$CALC_TRAIN" --heldout "$CALC_HELDOUT" --grpo "$CALC_GRPO_PROMPTS" --seed "$CALC_SEED"

step "pack $DATA/sft into rows of 1024 tokens"
run "$PYTHON" preprocess/pack.py --stage sft --input "$DATA/sft/*.jsonl" --out "$OUT_DIR/packed/sft" \
  --tokenizer "$TOKENIZER_DIR" --seq-len 1024 --quiet

step "SFT from scratch for $CALC_SFT_STEPS steps -> $OUT_DIR/sft"
run "$PYTHON" train/run.py --stage sft --data "$OUT_DIR/packed/sft" --out "$OUT_DIR/sft" --resume "${MODEL_FLAGS[@]}" \
  --seed "$CALC_SEED" --max-steps "$CALC_SFT_STEPS" --batch-size "$BATCH" --grad-accum 1 --optimizer adamw \
  --lr "${CALC_SFT_LR:-0.003}" --schedule cosine --log-every 10 --eval-every 1000 --save-every 50 --val-rows 8 \
  "${SFT_EXTRA[@]}"
tool_eval() {  # tool_eval RUN: the held-out questions, appended to RUN/eval_results.jsonl
  run "$PYTHON" bin/eval --ckpt "$OUT_DIR/$1" --tool-eval "$HELDOUT" --max-new-tokens 64 --quiet
}
tool_eval sft
FINAL=sft
if [[ "$GRPO" == 1 ]]; then
  step "GRPO (calculator_call reward) from $OUT_DIR/sft for $CALC_GRPO_STEPS steps -> $OUT_DIR/grpo"
  run "$PYTHON" train/run.py --stage grpo --prompts "$DATA/grpo.jsonl" --out "$OUT_DIR/grpo" --resume \
    --init-from "$OUT_DIR/sft" --seed "$CALC_SEED" --reward calculator_call "${GROUP[@]}" --max-new-tokens "$NEW" \
    --max-steps "$CALC_GRPO_STEPS" --grad-accum 1 --log-every 1 --save-every 10 --lr "${CALC_GRPO_LR:-1e-4}" \
    "${GRPO_EXTRA[@]}"
  tool_eval grpo
  FINAL=grpo
fi
ln -sfn "$FINAL" "$OUT_DIR/final"
echo
echo "done in $((SECONDS - START)) s. final model: $OUT_DIR/final -> $OUT_DIR/$FINAL"
echo "ask it:  bin/chat --ckpt $OUT_DIR/final --tools builtin --prompt \"123乘以45等于多少？\""
