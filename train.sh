#!/usr/bin/env bash
# tinylm end to end on this machine: tokenizer -> pack -> pretrain -> SFT -> one chat answer.
#
#   bash train.sh            CPU-sized run (a 4.5M-parameter model, ~10 minutes on 2 cores)
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
#   CLEAN           1: preprocess/clean.py (dedup, noise filters) runs on DATA_DIR/{pretrain,sft} before the
#                   held-out split and pack, into OUT_DIR/data/clean; 0: pack the raw files           [1]
#   CLEAN_ARGS      extra arguments for preprocess/clean.py (both stages)
#   MODEL           model preset                                                 [small; smoke tiny]
#   MODEL_ARGS      space-separated key=value model overrides   [hidden_size=256 num_hidden_layers=4]
#   PRETRAIN_STEPS / SFT_STEPS                                         [200 / 120; smoke 30 / 20]
#   PRETRAIN_OPTIMIZER PRETRAIN_LR PRETRAIN_MUON_LR PRETRAIN_SCHEDULE, and the same with SFT_
#                   [the defaults table train/defaults.py for preset DEFAULTS_PRESET, which
#                    `train/run.py --help` prints too]
#   DEFAULTS_PRESET the table's preset for those                           [train.sh; smoke tiny]
#   PRETRAIN_ARGS / SFT_ARGS   extra arguments for train/run.py (they win over the defaults above)
#   NPROC           processes per node; > 1 launches torchrun (DDP)                              [1]
#   SKIP_PACK=1 SKIP_PRETRAIN=1 SKIP_SFT=1 SKIP_CHAT=1   skip a step (its outputs must exist)
#   SKIP_REPORT=1   no OUT_DIR/report.md (bin/report over the runs trained here; its failure is one warning)
#   HELDOUT_EVERY   1 record in N of every pretrain/sft source is kept out of training (in
#                   OUT_DIR/data/heldout) and bin/eval scores pretrain and SFT on it   [50; 0 = no split]
#   SKIP_EVAL=1     skip those two evaluations (results: OUT_DIR/{pretrain,sft}/eval_results.jsonl)
#   PROMPT          the chat prompt at the end
#
# Optional stages after SFT, off by default; each packs its DATA_DIR folder into rows of OPT_SEQ_LEN
# [2 x SEQ_LEN] and starts from OUT_DIR/sft (steps: [40; smoke 5] each, *_ARGS win over the defaults):
#   REASON=1   reasoning SFT on DATA_DIR/reasoning (<think>/<answer> tags up-weighted) -> OUT_DIR/reason
#   DPO=1      DPO on DATA_DIR/dpo, reference = the SFT model (log-probs stored once) -> OUT_DIR/dpo
#   LORA=1     rank-8 LoRA SFT on DATA_DIR/lora, then merged into a dense model      -> OUT_DIR/lora/merged
#   DISTILL=1  distil the SFT model into a student of DISTILL_MODEL_ARGS on the SFT data -> OUT_DIR/distill
#              [num_hidden_layers=2; smoke num_hidden_layers=1]
#   TOOLS=1    tool-use and thinking SFT on DATA_DIR/tools (calculator calls, reasoning_content)  -> OUT_DIR/tools
#   REASON_STEPS DPO_STEPS LORA_STEPS DISTILL_STEPS TOOLS_STEPS / REASON_ARGS DPO_ARGS LORA_ARGS DISTILL_ARGS TOOLS_ARGS
#   REASON_LR DPO_LR LORA_LR DISTILL_LR TOOLS_LR   [unset: the stage's own default, shown by train/run.py --help]
#   GRPO=1     RL (GRPO family) from GRPO_INIT [OUT_DIR/reason: run REASON=1 first or with it] on the
#              prompts of GRPO_PROMPTS [DATA_DIR/reasoning/gsm8k_en_think.jsonl] with the gsm8k + format@0.5
#              rewards -> OUT_DIR/grpo, then bin/eval pass@k on GRPO_EVAL_N [16; smoke 4] of those prompts
#              (GRPO_STEPS [20; smoke 2], GRPO_LR, GRPO_ARGS; smoke: 2 prompts x 4 samples of <= 32 tokens)
#
# Recipes: RECIPE=NAME bash train.sh runs a named configuration of the same steps under OUT_DIR/NAME, and
# links its last stage's run folder as OUT_DIR/NAME/final. The MiniMind recipes read MiniMind's published files
# from MINIMIND_DATA [dataset] (README: "Train on MiniMind's data on a GPU"), use MiniMind's tokenizer
# (data/tokenizers/), skip clean and the held-out copy (CLEAN [0], HELDOUT_EVERY [0]: validation rows come from
# the packed data), and turn EPOCHS [1] into steps from the packed row counts; NPROC=8 for 8 GPUs keeps the
# global batch (rows per optimizer step) the same:
#   minimind3-mini    pretrain_t2t_mini.jsonl -> sft_t2t_mini.jsonl, preset minimind3 (64M), rows of 768,
#                     128 rows (98K tokens) per pretrain step, 32 rows per SFT step
#   minimind2-small   pretrain_hq.jsonl (--parse-special) -> sft_mini_512.jsonl, preset small (26M), rows of
#                     512, 256 rows per pretrain step, 32 rows per SFT step
#   RECIPE_ROWS_PRETRAIN / RECIPE_ROWS_SFT (global rows per step), MICRO_BATCH [32] (rows per process and
#   micro-step), PRETRAIN_STEPS / SFT_STEPS (a number wins over EPOCHS) as above; PRETRAIN_PACK_ARGS /
#   SFT_PACK_ARGS are each stage's own pack.py flags (minimind3-mini's SFT: MiniMind's seeded augmentations).
#   calculator        a model that calls a tool, from scratch on 2 CPU cores: preprocess/make_calculator.py writes
#                     a synthetic arithmetic tool-use corpus (Chinese and English, calculate_math with 1-3 tools
#                     offered, 1-4 questions per conversation) and short plain-text worked examples into
#                     OUT_DIR/calculator/data; a tokenizer with --split-digits is trained on it (unless
#                     TOKENIZER_DIR is given); pretraining on the short texts (rows of 256) teaches copying
#                     numbers cheaply, SFT on the tool conversations (rows of 1024) teaches the calls; bin/eval
#                     --tool-eval on the held-out questions, GRPO with the tools run in the rollouts (tool_answer
#                     + tool_format rewards), the tool eval again; final -> grpo (GRPO=0: sft). CALC_SEED [0]
#                     (corpus and model init), CALC_TRAIN [24000] questions, CALC_PRETRAIN [40000] texts,
#                     CALC_HELDOUT [200], CALC_PRETRAIN_STEPS [400; smoke 2], CALC_SFT_STEPS [800; smoke 3],
#                     CALC_GRPO_STEPS [20; smoke 1], CALC_MODEL_ARGS [hidden_size=128 num_hidden_layers=4],
#                     CALC_SFT_LR [0.003], CALC_GRPO_LR [1e-4], TOKENIZER_DIR [trained], PRETRAIN_ARGS /
#                     SFT_ARGS / GRPO_ARGS as above
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
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'; exit 0 ;;
    *) echo "train.sh: unknown argument '$arg' (use --smoke or --help)" >&2; exit 2 ;;
  esac
done

RECIPE="${RECIPE:-}"
case "$RECIPE" in
  "") ;;
  minimind3-mini|minimind2-small)
    MINIMIND_DATA="${MINIMIND_DATA:-dataset}"
    if [[ "$RECIPE" == minimind3-mini ]]; then
      PRETRAIN_FILES="${PRETRAIN_FILES:-$MINIMIND_DATA/pretrain_t2t_mini.jsonl}"
      SFT_FILES="${SFT_FILES:-$MINIMIND_DATA/sft_t2t_mini.jsonl}"
      TOKENIZER_DIR="${TOKENIZER_DIR:-data/tokenizers/minimind3}"; MODEL="${MODEL:-minimind3}"
      SEQ_LEN="${SEQ_LEN:-768}"; RECIPE_ROWS_PRETRAIN="${RECIPE_ROWS_PRETRAIN:-128}"
      # MiniMind's two SFT augmentations, seeded (pack.py --help): empty think blocks dropped, a system prompt added
      SFT_PACK_ARGS="${SFT_PACK_ARGS---drop-empty-think 0.8 --add-system-prompt 0.2 --augment-seed 0}"
    else
      PRETRAIN_FILES="${PRETRAIN_FILES:-$MINIMIND_DATA/pretrain_hq.jsonl}"
      SFT_FILES="${SFT_FILES:-$MINIMIND_DATA/sft_mini_512.jsonl}"
      TOKENIZER_DIR="${TOKENIZER_DIR:-data/tokenizers/minimind2}"; MODEL="${MODEL:-small}"
      SEQ_LEN="${SEQ_LEN:-512}"; RECIPE_ROWS_PRETRAIN="${RECIPE_ROWS_PRETRAIN:-256}"
      PRETRAIN_PACK_ARGS="${PRETRAIN_PACK_ARGS:---parse-special}"  # pretrain_hq embeds ChatML in its text
    fi
    RECIPE_ROWS_SFT="${RECIPE_ROWS_SFT:-32}"; MICRO_BATCH="${MICRO_BATCH:-32}"; EPOCHS="${EPOCHS:-1}"
    MODEL_ARGS="${MODEL_ARGS-}"; DEFAULTS_PRESET="${DEFAULTS_PRESET:-$RECIPE}"
    CLEAN="${CLEAN:-0}"; HELDOUT_EVERY="${HELDOUT_EVERY:-0}"
    OUT_DIR="${OUT_DIR:-out}/$RECIPE"
    for f in $PRETRAIN_FILES $SFT_FILES; do
      [[ -f "$f" ]] || { echo "train.sh: RECIPE=$RECIPE needs $f (download it first: README, \"Train on MiniMind's data on a GPU\"; or set MINIMIND_DATA)" >&2; exit 2; }
    done
    ;;
  calculator) ;;  # its own steps, below
  *) echo "train.sh: unknown RECIPE '$RECIPE' (known: minimind3-mini, minimind2-small, calculator)" >&2; exit 2 ;;
esac

if [[ -z "${PYTHON:-}" ]]; then
  bin/setup  # idempotent: creates .venv and installs requirements.txt the first time only
  PYTHON="$ROOT/.venv/bin/python"
fi
run() { printf '$ %s\n' "$*"; "$@"; }
if [[ "$RECIPE" == calculator ]]; then
  OUT_DIR="${OUT_DIR:-$([[ "$SMOKE" == 1 ]] && echo out/smoke || echo out)}/calculator"
calculator_recipe() {  # RECIPE=calculator (header): corpus -> tokenizer -> pretrain -> SFT -> tool eval -> GRPO -> tool eval
calc_step() { printf '\n\033[1m== [calculator] %s\033[0m\n' "$1"; }
CALC_SEED="${CALC_SEED:-0}"; GRPO="${GRPO:-1}"
if [[ "$SMOKE" == 1 ]]; then
  CALC_TRAIN="${CALC_TRAIN:-200}"; CALC_PRETRAIN="${CALC_PRETRAIN:-200}"; CALC_HELDOUT="${CALC_HELDOUT:-4}"
  CALC_GRPO_PROMPTS=16; CALC_PRETRAIN_STEPS="${CALC_PRETRAIN_STEPS:-2}"; CALC_SFT_STEPS="${CALC_SFT_STEPS:-3}"
  CALC_GRPO_STEPS="${CALC_GRPO_STEPS:-1}"; CALC_MODEL_ARGS="${CALC_MODEL_ARGS-}"; BATCH=2; PRE_BATCH=2
  GROUP=(--group-size 2 --prompts-per-step 2); NEW=48
else
  CALC_TRAIN="${CALC_TRAIN:-24000}"; CALC_PRETRAIN="${CALC_PRETRAIN:-40000}"; CALC_HELDOUT="${CALC_HELDOUT:-200}"
  CALC_GRPO_PROMPTS=2000; CALC_PRETRAIN_STEPS="${CALC_PRETRAIN_STEPS:-400}"; CALC_SFT_STEPS="${CALC_SFT_STEPS:-800}"
  CALC_GRPO_STEPS="${CALC_GRPO_STEPS:-20}"; CALC_MODEL_ARGS="${CALC_MODEL_ARGS-hidden_size=128 num_hidden_layers=4}"
  BATCH=4; PRE_BATCH=16; GROUP=(--group-size 8 --prompts-per-step 4); NEW=96  # the call, its result, the answer
fi
MODEL_FLAGS=(--model tiny --model-arg max_position_embeddings=1024)  # three tool rounds with two tools fit
for kv in $CALC_MODEL_ARGS; do MODEL_FLAGS+=(--model-arg "$kv"); done
# shellcheck disable=SC2206  # word splitting of the *_ARGS variables is intended
PRETRAIN_EXTRA=(${PRETRAIN_ARGS:-}); SFT_EXTRA=(${SFT_ARGS:-}); GRPO_EXTRA=(${GRPO_ARGS:-})
DATA="$OUT_DIR/data"; HELDOUT="$DATA/heldout.jsonl"
START=$SECONDS
mkdir -p "$OUT_DIR"

calc_step "corpus: $CALC_TRAIN questions in conversations of 1-4 (seed $CALC_SEED), $CALC_PRETRAIN short texts, $CALC_HELDOUT held-out questions -> $DATA"
[[ -f "$HELDOUT" ]] && echo "already written: $DATA" || run "$PYTHON" preprocess/make_calculator.py --out "$DATA" \
  --train "$CALC_TRAIN" --questions-per-conversation 4 --pretrain "$CALC_PRETRAIN" --heldout "$CALC_HELDOUT" \
  --grpo "$CALC_GRPO_PROMPTS" --seed "$CALC_SEED"

if [[ -z "${TOKENIZER_DIR:-}" ]]; then  # a tokenizer of its own: every digit one id, wherever the number stands
  TOKENIZER_DIR="$OUT_DIR/tokenizer"
  calc_step "tokenizer: byte-level BPE with --split-digits on $DATA/sft -> $TOKENIZER_DIR"
  [[ -f "$TOKENIZER_DIR/tokenizer.json" ]] && echo "already trained: $TOKENIZER_DIR" || run "$PYTHON" \
    preprocess/train_tokenizer.py --input "$DATA/sft/*.jsonl" --out "$TOKENIZER_DIR" --vocab-size 1024 --split-digits
fi

calc_step "pack $DATA/pretrain into rows of 256 tokens, $DATA/sft into rows of 1024"
run "$PYTHON" preprocess/pack.py --stage pretrain --input "$DATA/pretrain/*.jsonl" --out "$OUT_DIR/packed/pretrain" \
  --tokenizer "$TOKENIZER_DIR" --seq-len 256 --quiet
run "$PYTHON" preprocess/pack.py --stage sft --input "$DATA/sft/*.jsonl" --out "$OUT_DIR/packed/sft" \
  --tokenizer "$TOKENIZER_DIR" --seq-len 1024 --quiet

calc_step "pretrain from scratch on the short texts for $CALC_PRETRAIN_STEPS steps -> $OUT_DIR/pretrain"
run "$PYTHON" train/run.py --stage pretrain --data "$OUT_DIR/packed/pretrain" --out "$OUT_DIR/pretrain" --resume \
  "${MODEL_FLAGS[@]}" --seed "$CALC_SEED" --max-steps "$CALC_PRETRAIN_STEPS" --batch-size "$PRE_BATCH" --grad-accum 1 \
  --optimizer muon --lr 0.003 --log-every 50 --eval-every 100000 --save-every 200 --val-rows 8 "${PRETRAIN_EXTRA[@]}"

calc_step "SFT on the tool conversations for $CALC_SFT_STEPS steps -> $OUT_DIR/sft"
run "$PYTHON" train/run.py --stage sft --data "$OUT_DIR/packed/sft" --out "$OUT_DIR/sft" --resume \
  --init-from "$OUT_DIR/pretrain" --seed "$CALC_SEED" --max-steps "$CALC_SFT_STEPS" --batch-size "$BATCH" \
  --grad-accum 1 --optimizer muon --lr "${CALC_SFT_LR:-0.003}" --schedule cosine --log-every 50 --eval-every 100000 \
  --save-every 200 --val-rows 8 "${SFT_EXTRA[@]}"
tool_eval() {  # tool_eval RUN: the held-out questions, appended to RUN/eval_results.jsonl
  run "$PYTHON" bin/eval --ckpt "$OUT_DIR/$1" --tool-eval "$HELDOUT" --max-new-tokens 64 --quiet
}
tool_eval sft
FINAL=sft
if [[ "$GRPO" == 1 ]]; then
  calc_step "GRPO with the tools run in the rollouts (tool_answer + tool_format rewards) from $OUT_DIR/sft for $CALC_GRPO_STEPS steps -> $OUT_DIR/grpo"
  run "$PYTHON" train/run.py --stage grpo --prompts "$DATA/grpo.jsonl" --out "$OUT_DIR/grpo" --resume \
    --init-from "$OUT_DIR/sft" --seed "$CALC_SEED" --tools builtin --max-tool-rounds 2 \
    --reward tool_answer --reward tool_format@0.1 "${GROUP[@]}" --max-new-tokens "$NEW" \
    --max-steps "$CALC_GRPO_STEPS" --grad-accum 1 --log-every 1 --save-every 10 --lr "${CALC_GRPO_LR:-1e-4}" \
    "${GRPO_EXTRA[@]}"
  tool_eval grpo
  FINAL=grpo
fi
ln -sfn "$FINAL" "$OUT_DIR/final"
echo
echo "done in $((SECONDS - START)) s. final model: $OUT_DIR/final -> $OUT_DIR/$FINAL"
echo "ask it:  bin/chat --ckpt $OUT_DIR/final --tools builtin --prompt \"123乘以45等于多少？\""
}
  calculator_recipe
  exit 0
fi
DATA_DIR="${DATA_DIR:-data/sample}"
TOKENIZER_DIR="${TOKENIZER_DIR:-data/tokenizer}"
VOCAB_SIZE="${VOCAB_SIZE:-6400}"
NPROC="${NPROC:-1}"
PROMPT="${PROMPT:-请介绍一下你自己。}"
if [[ "$SMOKE" == 1 ]]; then
  OUT_DIR="${OUT_DIR:-out/smoke}"; SEQ_LEN="${SEQ_LEN:-128}"; MODEL="${MODEL:-tiny}"
  MODEL_ARGS="${MODEL_ARGS-}"; PRETRAIN_STEPS="${PRETRAIN_STEPS:-30}"; SFT_STEPS="${SFT_STEPS:-20}"
  DEFAULTS_PRESET="${DEFAULTS_PRESET:-tiny}"
  COMMON=(--batch-size 8 --grad-accum 1 --log-every 10 --eval-every 10 --save-every 10 --val-rows 16)
else
  OUT_DIR="${OUT_DIR:-out}"; SEQ_LEN="${SEQ_LEN:-512}"; MODEL="${MODEL:-small}"
  MODEL_ARGS="${MODEL_ARGS-hidden_size=256 num_hidden_layers=4}"
  if [[ -n "$RECIPE" ]]; then  # EPOCHS over the packed rows, counted after packing
    PRETRAIN_STEPS="${PRETRAIN_STEPS:-epochs}"; SFT_STEPS="${SFT_STEPS:-epochs}"
  fi
  PRETRAIN_STEPS="${PRETRAIN_STEPS:-200}"; SFT_STEPS="${SFT_STEPS:-120}"
  DEFAULTS_PRESET="${DEFAULTS_PRESET:-train.sh}"
  COMMON=(--batch-size 8 --grad-accum 1 --log-every 10 --eval-every 50 --save-every 50)
fi
PRETRAIN_FILES="${PRETRAIN_FILES:-$DATA_DIR/pretrain/*.jsonl}"; SFT_FILES="${SFT_FILES:-$DATA_DIR/sft/*.jsonl}"
PRETRAIN_BATCH=(); SFT_BATCH=()
batch_flags() {  # batch_flags ROWS: --batch-size/--grad-accum for ROWS rows per optimizer step over NPROC processes
  local per=$(( $1 / NPROC )) size
  (( per >= 1 && per * NPROC == $1 )) || { echo "train.sh: $1 rows per step do not split over NPROC=$NPROC" >&2; exit 2; }
  size=$(( per < MICRO_BATCH ? per : MICRO_BATCH ))
  (( per % size == 0 )) || { echo "train.sh: $per rows per process are not a multiple of MICRO_BATCH=$size" >&2; exit 2; }
  echo "--batch-size $size --grad-accum $(( per / size ))"
}
if [[ -n "$RECIPE" ]]; then
  COMMON=(--log-every 50 --eval-every 500 --save-every 1000)
  flags="$(batch_flags "$RECIPE_ROWS_PRETRAIN")"; read -r -a PRETRAIN_BATCH <<< "$flags"
  flags="$(batch_flags "$RECIPE_ROWS_SFT")"; read -r -a SFT_BATCH <<< "$flags"
fi
PACKED="$OUT_DIR/packed"
# optimizer, LRs and schedule of pretrain and SFT: `: "${PRETRAIN_LR:=...}"` lines from the one table (a set variable wins)
eval "$("$PYTHON" -m train.defaults --shell "$DEFAULTS_PRESET")"
PRETRAIN_OPT=(--optimizer "$PRETRAIN_OPTIMIZER" --lr "$PRETRAIN_LR" --muon-lr "$PRETRAIN_MUON_LR" --schedule "$PRETRAIN_SCHEDULE")
SFT_OPT=(--optimizer "$SFT_OPTIMIZER" --lr "$SFT_LR" --muon-lr "$SFT_MUON_LR" --schedule "$SFT_SCHEDULE")

MODEL_FLAGS=(--model "$MODEL")
for kv in $MODEL_ARGS; do MODEL_FLAGS+=(--model-arg "$kv"); done
if [[ "$NPROC" -gt 1 ]]; then
  LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC")
else
  LAUNCH=("$PYTHON")
fi
# shellcheck disable=SC2206  # word splitting of the *_ARGS variables is intended
PACK_EXTRA=(${PACK_ARGS:-}); PRETRAIN_EXTRA=(${PRETRAIN_ARGS:-}); SFT_EXTRA=(${SFT_ARGS:-})
OPT_SEQ_LEN="${OPT_SEQ_LEN:-$((2 * SEQ_LEN))}"; OPT_STEPS=$([[ "$SMOKE" == 1 ]] && echo 5 || echo 40)
# shellcheck disable=SC2206
REASON_EXTRA=(${REASON_ARGS:-}); DPO_EXTRA=(${DPO_ARGS:-}); LORA_EXTRA=(${LORA_ARGS:-}); DISTILL_EXTRA=(${DISTILL_ARGS:-})
# shellcheck disable=SC2206
TOOLS_EXTRA=(${TOOLS_ARGS:-})
DISTILL_MODEL_ARGS="${DISTILL_MODEL_ARGS-$([[ "$SMOKE" == 1 ]] && echo num_hidden_layers=1 || echo num_hidden_layers=2)}"

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

HELDOUT_EVERY="${HELDOUT_EVERY:-50}"
stage_files() { if [[ "$1" == pretrain ]]; then echo "$PRETRAIN_FILES"; else echo "$SFT_FILES"; fi; }
# shellcheck disable=SC2206
CLEAN="${CLEAN:-1}"; CLEAN_EXTRA=(${CLEAN_ARGS:-}); CLEANED="$OUT_DIR/data/clean"
clean_stage() {  # clean_stage STAGE: DATA_DIR/STAGE/*.jsonl -> CLEANED/STAGE/STAGE.jsonl (once) + its report
  local out="$CLEANED/$1/$1.jsonl"
  [[ -f "$out" ]] && { echo "already cleaned: $out"; return 0; }  # once: pack records its inputs' mtimes
  local inputs; read -r -a inputs <<< "$(stage_files "$1")"
  run "$PYTHON" preprocess/clean.py --stage "$1" --input "${inputs[@]}" --out "$out" \
    --report "$CLEANED/$1.report.json" "${CLEAN_EXTRA[@]}"
}
evaluate() {  # evaluate RUN STAGE: held-out loss / perplexity / bits per byte of OUT_DIR/RUN on the held-out slice
  if [[ "${SKIP_EVAL:-0}" == 1 || "$HELDOUT_EVERY" -le 0 ]]; then echo "eval skipped (SKIP_EVAL=1 or HELDOUT_EVERY=0)"; return 0; fi
  local files
  read -r -a files <<< "$(cat "$PACKED/$2.inputs")"
  # shellcheck disable=SC2206  # the recorded patterns expand to the files pack.py read
  files=( ${files[@]} )
  run "$PYTHON" bin/eval --ckpt "$OUT_DIR/$1" --data "${files[@]}" --stage "$2" --seq-len "$SEQ_LEN" \
    --overlong truncate --hold-out-every "$HELDOUT_EVERY" --quiet
}

step 2/5 "pack $DATA_DIR/{pretrain,sft} into $PACKED (rows of $SEQ_LEN tokens; CLEAN=$CLEAN)"
if [[ "${SKIP_PACK:-0}" == 1 ]]; then
  echo "skipped (SKIP_PACK=1)"
else
  for stage in pretrain sft; do
    INPUT="$(stage_files "$stage")"
    if [[ "$CLEAN" == 1 ]]; then
      clean_stage "$stage"; INPUT="$CLEANED/$stage/*.jsonl"
    fi
    HOLD=()
    if [[ "$HELDOUT_EVERY" -gt 0 ]]; then  # pack leaves the slice out by line number; bin/eval reads only it
      HOLD=(--hold-out-every "$HELDOUT_EVERY")
      echo "held out: the record on every ${HELDOUT_EVERY}th line of each input, for bin/eval (no copy is made)"
    fi
    STAGE_PACK=()
    if [[ "$stage" == pretrain ]]; then read -r -a STAGE_PACK <<< "${PRETRAIN_PACK_ARGS:-}"
    else read -r -a STAGE_PACK <<< "${SFT_PACK_ARGS:-}"; fi
    read -r -a INPUTS <<< "$INPUT"  # words, not globs: pack.py expands the patterns itself
    run "$PYTHON" preprocess/pack.py --stage "$stage" --input "${INPUTS[@]}" --out "$PACKED/$stage" \
      --tokenizer "$TOKENIZER_DIR" --seq-len "$SEQ_LEN" "${HOLD[@]}" "${STAGE_PACK[@]}" "${PACK_EXTRA[@]}"
    printf '%s\n' "$INPUT" > "$PACKED/$stage.inputs"  # what bin/eval reads the held-out slice from
  done
fi

epoch_steps() {  # epoch_steps PACKED_DIR ROWS_PER_STEP: EPOCHS passes over the packed rows, in optimizer steps
  "$PYTHON" -c 'import json, math, sys
rows = json.load(open(sys.argv[1] + "/meta.json"))["counts"]["rows"]
print(max(1, math.ceil(float(sys.argv[3]) * rows / int(sys.argv[2]))))' "$1" "$2" "$EPOCHS"
}
if [[ "$PRETRAIN_STEPS" == epochs ]]; then PRETRAIN_STEPS="$(epoch_steps "$PACKED/pretrain" "$RECIPE_ROWS_PRETRAIN")"; fi
if [[ "$SFT_STEPS" == epochs ]]; then SFT_STEPS="$(epoch_steps "$PACKED/sft" "$RECIPE_ROWS_SFT")"; fi

step 3/5 "pretrain $MODEL ${MODEL_ARGS} for $PRETRAIN_STEPS steps -> $OUT_DIR/pretrain"
if [[ "${SKIP_PRETRAIN:-0}" == 1 ]]; then
  echo "skipped (SKIP_PRETRAIN=1)"
else
  run "${LAUNCH[@]}" train/run.py --stage pretrain --data "$PACKED/pretrain" --out "$OUT_DIR/pretrain" --resume \
    "${MODEL_FLAGS[@]}" --max-steps "$PRETRAIN_STEPS" "${COMMON[@]}" "${PRETRAIN_BATCH[@]}" "${PRETRAIN_OPT[@]}" \
    "${PRETRAIN_EXTRA[@]}"
  evaluate pretrain pretrain
fi

step 4/5 "SFT from the pretrained weights for $SFT_STEPS steps -> $OUT_DIR/sft"
if [[ "${SKIP_SFT:-0}" == 1 ]]; then
  echo "skipped (SKIP_SFT=1)"
else
  run "${LAUNCH[@]}" train/run.py --stage sft --data "$PACKED/sft" --out "$OUT_DIR/sft" --resume \
    --init-from "$OUT_DIR/pretrain" --max-steps "$SFT_STEPS" "${COMMON[@]}" "${SFT_BATCH[@]}" "${SFT_OPT[@]}" \
    "${SFT_EXTRA[@]}"
  evaluate sft sft
fi

opt_pack() {  # opt_pack PACK_STAGE DATA_SUBFOLDER NAME: pack an optional stage's data (a no-op when done)
  run "$PYTHON" preprocess/pack.py --stage "$1" --input "$DATA_DIR/$2/*.jsonl" --out "$PACKED/$3" \
    --tokenizer "$TOKENIZER_DIR" --seq-len "$OPT_SEQ_LEN" --quiet "${PACK_EXTRA[@]}"
}
if [[ "${REASON:-0}" == 1 ]]; then
  step + "reasoning SFT from $OUT_DIR/sft for ${REASON_STEPS:-$OPT_STEPS} steps -> $OUT_DIR/reason"
  opt_pack reason reasoning reason
  run "${LAUNCH[@]}" train/run.py --stage reason --data "$PACKED/reason" --out "$OUT_DIR/reason" --resume \
    --init-from "$OUT_DIR/sft" --max-steps "${REASON_STEPS:-$OPT_STEPS}" "${COMMON[@]}" ${REASON_LR:+--lr "$REASON_LR"} "${REASON_EXTRA[@]}"
fi
if [[ "${DPO:-0}" == 1 ]]; then
  step + "DPO from $OUT_DIR/sft (also the reference) for ${DPO_STEPS:-$OPT_STEPS} steps -> $OUT_DIR/dpo"
  opt_pack dpo dpo dpo
  run "${LAUNCH[@]}" train/run.py --stage dpo --data "$PACKED/dpo" --out "$OUT_DIR/dpo" --resume \
    --init-from "$OUT_DIR/sft" --max-steps "${DPO_STEPS:-$OPT_STEPS}" "${COMMON[@]}" ${DPO_LR:+--lr "$DPO_LR"} "${DPO_EXTRA[@]}"
fi
if [[ "${LORA:-0}" == 1 ]]; then
  step + "LoRA SFT on $DATA_DIR/lora from $OUT_DIR/sft for ${LORA_STEPS:-$OPT_STEPS} steps -> $OUT_DIR/lora"
  opt_pack sft lora lora
  run "${LAUNCH[@]}" train/run.py --stage sft --data "$PACKED/lora" --out "$OUT_DIR/lora" --resume \
    --init-from "$OUT_DIR/sft" --max-steps "${LORA_STEPS:-$OPT_STEPS}" "${COMMON[@]}" ${LORA_LR:+--lr "$LORA_LR"} --lora-rank 8 --merge \
    "${LORA_EXTRA[@]}"
fi
if [[ "${DISTILL:-0}" == 1 ]]; then
  step + "distil $OUT_DIR/sft into a $MODEL $DISTILL_MODEL_ARGS student for ${DISTILL_STEPS:-$OPT_STEPS} steps"
  STUDENT_FLAGS=("${MODEL_FLAGS[@]}")
  for kv in $DISTILL_MODEL_ARGS; do STUDENT_FLAGS+=(--model-arg "$kv"); done
  run "${LAUNCH[@]}" train/run.py --stage distill --data "$PACKED/sft" --out "$OUT_DIR/distill" --resume \
    --teacher "$OUT_DIR/sft" "${STUDENT_FLAGS[@]}" --max-steps "${DISTILL_STEPS:-$OPT_STEPS}" "${COMMON[@]}" \
    ${DISTILL_LR:+--lr "$DISTILL_LR"} "${DISTILL_EXTRA[@]}"
fi
if [[ "${TOOLS:-0}" == 1 ]]; then
  step + "tool-use and thinking SFT on $DATA_DIR/tools from $OUT_DIR/sft for ${TOOLS_STEPS:-$OPT_STEPS} steps -> $OUT_DIR/tools"
  opt_pack sft tools tools
  run "${LAUNCH[@]}" train/run.py --stage sft --data "$PACKED/tools" --out "$OUT_DIR/tools" --resume \
    --init-from "$OUT_DIR/sft" --max-steps "${TOOLS_STEPS:-$OPT_STEPS}" "${COMMON[@]}" ${TOOLS_LR:+--lr "$TOOLS_LR"} \
    "${TOOLS_EXTRA[@]}"
fi

if [[ "${GRPO:-0}" == 1 ]]; then
  GRPO_INIT="${GRPO_INIT:-$OUT_DIR/reason}"; GRPO_PROMPTS="${GRPO_PROMPTS:-$DATA_DIR/reasoning/gsm8k_en_think.jsonl}"
  # shellcheck disable=SC2206
  GRPO_EXTRA=(${GRPO_ARGS:-})
  if [[ "$SMOKE" == 1 ]]; then
    GRPO_NEW=32; GRPO_SHAPE=(--group-size 4 --prompts-per-step 2); GRPO_EVAL_N="${GRPO_EVAL_N:-4}"
  else
    GRPO_NEW=128; GRPO_SHAPE=(--group-size 8 --prompts-per-step 4); GRPO_EVAL_N="${GRPO_EVAL_N:-16}"
  fi
  step + "RL (grpo) from $GRPO_INIT on $GRPO_PROMPTS for ${GRPO_STEPS:-$([[ "$SMOKE" == 1 ]] && echo 2 || echo 20)} steps -> $OUT_DIR/grpo"
  run "${LAUNCH[@]}" train/run.py --stage grpo --prompts "$GRPO_PROMPTS" --out "$OUT_DIR/grpo" --resume \
    --init-from "$GRPO_INIT" --reward gsm8k --reward format@0.5 "${GRPO_SHAPE[@]}" --max-new-tokens "$GRPO_NEW" \
    --max-steps "${GRPO_STEPS:-$([[ "$SMOKE" == 1 ]] && echo 2 || echo 20)}" --grad-accum 1 --log-every 1 \
    --save-every 10 ${GRPO_LR:+--lr "$GRPO_LR"} "${GRPO_EXTRA[@]}"
  mkdir -p "$OUT_DIR/data"; head -n "$GRPO_EVAL_N" "$GRPO_PROMPTS" > "$OUT_DIR/data/grpo_eval.jsonl"
  for ckpt in "$GRPO_INIT" "$OUT_DIR/grpo"; do  # pass@k before and after RL, same prompts and seeds
    run "$PYTHON" bin/eval --ckpt "$ckpt" --prompts "$OUT_DIR/data/grpo_eval.jsonl" --reward gsm8k \
      --reward format@0.5 --samples 4 --max-new-tokens "$GRPO_NEW" --results "$OUT_DIR/grpo/eval_results.jsonl" --quiet
  done
fi

step 5/5 "chat: one greedy answer from $OUT_DIR/sft"
if [[ "${SKIP_CHAT:-0}" == 1 ]]; then
  echo "skipped (SKIP_CHAT=1)"
else
  echo "prompt: $PROMPT"
  printf 'answer: '
  "$PYTHON" bin/chat --ckpt "$OUT_DIR/sft" --prompt "$PROMPT" --temperature 0 --repetition-penalty 1.3 \
    --max-new-tokens 64
fi
if [[ -n "$RECIPE" && -d "$OUT_DIR/sft" ]]; then
  ln -sfn sft "$OUT_DIR/final"  # the last stage's run folder
  echo "final model: $OUT_DIR/final -> $OUT_DIR/sft"
fi
REPORT_RUNS=()  # the run folders this invocation trained, in stage order
[[ "${SKIP_PRETRAIN:-0}" == 1 ]] || REPORT_RUNS+=("$OUT_DIR/pretrain")
[[ "${SKIP_SFT:-0}" == 1 ]] || REPORT_RUNS+=("$OUT_DIR/sft")
for opt in REASON:reason DPO:dpo LORA:lora DISTILL:distill TOOLS:tools GRPO:grpo; do
  flag="${opt%%:*}"; if [[ "${!flag:-0}" == 1 ]]; then REPORT_RUNS+=("$OUT_DIR/${opt#*:}"); fi
done
if [[ "${SKIP_REPORT:-0}" != 1 && ${#REPORT_RUNS[@]} -gt 0 ]]; then  # a failed report warns, never fails the run
  if report_said="$("$PYTHON" bin/report "${REPORT_RUNS[@]}" --out "$OUT_DIR/report.md" 2>&1)"; then
    echo "$report_said"
  else
    echo "train.sh: warning: no report written: ${report_said##*$'\n'}" >&2
  fi
fi
echo
echo "done in $((SECONDS - START)) s. Runs: $OUT_DIR/pretrain $OUT_DIR/sft (metrics.jsonl, loss.png, ckpt_*.pt)"
echo "chat again:  bin/chat --ckpt $OUT_DIR/sft --prompt \"...\""
