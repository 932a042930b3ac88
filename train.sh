#!/usr/bin/env bash
# tinylm end to end on this machine: tokenizer -> pack -> pretrain -> SFT -> one chat answer.
#
#   bash train.sh            CPU-sized run (a ~5M-parameter model, a few minutes on 2 cores)
#   bash train.sh --smoke    the whole chain in about a minute (tiny model, few steps, short rows)
#
# Every step can be tuned or skipped with environment variables (defaults in brackets):
#   PYTHON          interpreter; when unset, bin/setup prepares .venv (once) and .venv/bin/python is used
#   DATA_DIR        raw JSONL with pretrain/ and sft/ subfolders                       [data/sample]
#   OUT_DIR         where packed data and runs go                     [out, or out/smoke with --smoke]
#   TOKENIZER_DIR   tokenizer to use                                               [data/tokenizer]
#   TRAIN_TOKENIZER=1   train a new tokenizer on DATA_DIR into OUT_DIR/tokenizer (VOCAB_SIZE [6400])
#   SEQ_LEN         row length for packing                                      [512; smoke 128]
#   PACK_ARGS       extra arguments for preprocess/pack.py (both stages)
#   MODEL           model preset                                                 [small; smoke tiny]
#   MODEL_ARGS      space-separated key=value model overrides   [hidden_size=256 num_hidden_layers=4]
#   PRETRAIN_STEPS / SFT_STEPS                                          [120 / 40; smoke 30 / 20]
#   PRETRAIN_ARGS / SFT_ARGS   extra arguments for train/run.py (they win over the defaults above)
#   NPROC           processes per node; > 1 launches torchrun (DDP)                              [1]
#   SKIP_PACK=1 SKIP_PRETRAIN=1 SKIP_SFT=1 SKIP_CHAT=1   skip a step (its outputs must exist)
#   PROMPT          the chat prompt at the end
#
# Re-running continues where it stopped: packing skips finished shards and both training runs are
# started with --resume (a finished run just reports itself). Use a new OUT_DIR for a different setup.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

SMOKE=0
for arg in "$@"; do
  case "$arg" in
    --smoke) SMOKE=1 ;;
    -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "train.sh: unknown argument '$arg' (use --smoke or --help)" >&2; exit 2 ;;
  esac
done

if [[ -z "${PYTHON:-}" ]]; then
  bin/setup  # idempotent: creates .venv and installs requirements.txt the first time only
  PYTHON="$ROOT/.venv/bin/python"
fi
DATA_DIR="${DATA_DIR:-data/sample}"
TOKENIZER_DIR="${TOKENIZER_DIR:-data/tokenizer}"
VOCAB_SIZE="${VOCAB_SIZE:-6400}"
NPROC="${NPROC:-1}"
PROMPT="${PROMPT:-请介绍一下你自己。}"
if [[ "$SMOKE" == 1 ]]; then
  OUT_DIR="${OUT_DIR:-out/smoke}"; SEQ_LEN="${SEQ_LEN:-128}"; MODEL="${MODEL:-tiny}"
  MODEL_ARGS="${MODEL_ARGS-}"; PRETRAIN_STEPS="${PRETRAIN_STEPS:-30}"; SFT_STEPS="${SFT_STEPS:-20}"
  COMMON=(--batch-size 8 --grad-accum 1 --lr 3e-3 --log-every 10 --eval-every 10 --save-every 10 --val-rows 16)
else
  OUT_DIR="${OUT_DIR:-out}"; SEQ_LEN="${SEQ_LEN:-512}"; MODEL="${MODEL:-small}"
  MODEL_ARGS="${MODEL_ARGS-hidden_size=256 num_hidden_layers=4}"
  PRETRAIN_STEPS="${PRETRAIN_STEPS:-120}"; SFT_STEPS="${SFT_STEPS:-40}"
  COMMON=(--batch-size 8 --grad-accum 1 --lr 1e-3 --log-every 10 --eval-every 50 --save-every 50)
fi
PACKED="$OUT_DIR/packed"

MODEL_FLAGS=(--model "$MODEL")
for kv in $MODEL_ARGS; do MODEL_FLAGS+=(--model-arg "$kv"); done
if [[ "$NPROC" -gt 1 ]]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
else
  LAUNCH=("$PYTHON")
fi
# shellcheck disable=SC2206  # word splitting of the *_ARGS variables is intended
PACK_EXTRA=(${PACK_ARGS:-}); PRETRAIN_EXTRA=(${PRETRAIN_ARGS:-}); SFT_EXTRA=(${SFT_ARGS:-})

step() { printf '\n\033[1m== [%s] %s\033[0m\n' "$1" "$2"; }
run() { printf '$ %s\n' "$*"; "$@"; }
START=$SECONDS
mkdir -p "$OUT_DIR"

step 1/5 "tokenizer"
if [[ "${TRAIN_TOKENIZER:-0}" == 1 ]]; then
  TOKENIZER_DIR="$OUT_DIR/tokenizer"
  echo "training a byte-level BPE tokenizer (vocab $VOCAB_SIZE) on $DATA_DIR into $TOKENIZER_DIR"
  run "$PYTHON" preprocess/train_tokenizer.py --input "$DATA_DIR/pretrain/*.jsonl" "$DATA_DIR/sft/*.jsonl" \
    --out "$TOKENIZER_DIR" --vocab-size "$VOCAB_SIZE"
else
  echo "using the shipped tokenizer $TOKENIZER_DIR (TRAIN_TOKENIZER=1 trains a new one)"
fi

step 2/5 "pack $DATA_DIR/{pretrain,sft} into $PACKED (rows of $SEQ_LEN tokens)"
if [[ "${SKIP_PACK:-0}" == 1 ]]; then
  echo "skipped (SKIP_PACK=1)"
else
  for stage in pretrain sft; do
    run "$PYTHON" preprocess/pack.py --stage "$stage" --input "$DATA_DIR/$stage/*.jsonl" --out "$PACKED/$stage" \
      --tokenizer "$TOKENIZER_DIR" --seq-len "$SEQ_LEN" "${PACK_EXTRA[@]}"
  done
fi

step 3/5 "pretrain $MODEL ${MODEL_ARGS} for $PRETRAIN_STEPS steps -> $OUT_DIR/pretrain"
if [[ "${SKIP_PRETRAIN:-0}" == 1 ]]; then
  echo "skipped (SKIP_PRETRAIN=1)"
else
  run "${LAUNCH[@]}" train/run.py --stage pretrain --data "$PACKED/pretrain" --out "$OUT_DIR/pretrain" --resume \
    "${MODEL_FLAGS[@]}" --max-steps "$PRETRAIN_STEPS" "${COMMON[@]}" "${PRETRAIN_EXTRA[@]}"
fi

step 4/5 "SFT from the pretrained weights for $SFT_STEPS steps -> $OUT_DIR/sft"
if [[ "${SKIP_SFT:-0}" == 1 ]]; then
  echo "skipped (SKIP_SFT=1)"
else
  run "${LAUNCH[@]}" train/run.py --stage sft --data "$PACKED/sft" --out "$OUT_DIR/sft" --resume \
    --init-from "$OUT_DIR/pretrain" --max-steps "$SFT_STEPS" "${COMMON[@]}" "${SFT_EXTRA[@]}"
fi

step 5/5 "chat: one greedy answer from $OUT_DIR/sft"
if [[ "${SKIP_CHAT:-0}" == 1 ]]; then
  echo "skipped (SKIP_CHAT=1)"
else
  echo "prompt: $PROMPT"
  printf 'answer: '
  "$PYTHON" bin/chat --ckpt "$OUT_DIR/sft" --prompt "$PROMPT" --temperature 0 --max-new-tokens 64
fi
echo
echo "done in $((SECONDS - START)) s. Runs: $OUT_DIR/pretrain $OUT_DIR/sft (metrics.jsonl, loss.png, ckpt_*.pt)"
echo "chat again:  bin/chat --ckpt $OUT_DIR/sft --prompt \"...\""
