#!/usr/bin/env python3
"""Train tinylm's byte-level BPE tokenizer from pretrain / chat / DPO records.

    python preprocess/train_tokenizer.py --input 'data/sample/*/*.jsonl' --out data/tokenizer

Any record the packer reads is training text: ``{"text"}`` gives its text, ``{"conversations"}`` each
turn's content (and thinking, tool calls and tools: ``preprocess/chat_fields.chat_texts``),
``{"chosen", "rejected"}`` the chosen turns plus the rejected final answer (the shared prompt is counted
once). The special tokens of ``core/chat_template.py`` get ids 0..10 in order and are cut out of the
training text, so no merge is spent on pieces of them. ``<|endoftext|>``, ``<|im_start|>`` and
``<|im_end|>`` are *special* (dropped by ``decode(skip_special_tokens=True)``); the structure tags
(reasoning ``<think>`` ... ``</answer>`` at 3..6, tool ``<tool_call>`` ... ``</tool_response>`` at 7..10)
are plain added tokens, still single ids, that such a decode keeps visible.

The output folder holds ``tokenizer.json`` (the ``tokenizers`` file: no normalizer, ByteLevel
pre-tokenizer (after a digit split with ``--split-digits``) and decoder, no post-processor, so encoding adds
nothing and decoding gives the exact bytes back), ``tokenizer_config.json`` and ``chat_template.jinja`` for
``transformers.AutoTokenizer`` (transformers 5 reads the ``.jinja`` file first, older versions the config
key; both hold CHAT_TEMPLATE).

Records whose (file name, line) hash falls in one of ``--heldout-every`` buckets are kept out of
training and used for the chars-per-token summary. Every problem is one ``train_tokenizer.py: error:``
line (exit 1): a bad record names ``file:line`` (unless ``--skip-bad`` counts and skips it), a missing
input names the file; bad flags exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from tqdm import tqdm  # noqa: E402

from core.chat_template import (  # noqa: E402
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    SPECIAL_TOKENS,
    STRUCTURE_TAGS,
)
from core.errors import TinyLMError, run_main  # noqa: E402
from core.files import FileWriteError, atomic_write_text, make_dir, refuse_inputs  # noqa: E402
from core.numbers import non_negative_int, number, positive_int  # noqa: E402
from preprocess.chat_fields import chat_texts  # noqa: E402
from preprocess.records import RecordError, decode_payload, parse_conversation, parse_pair, parse_text  # noqa: E402
from preprocess.sources import (  # noqa: E402
    Item,
    SourceSpec,
    count_items,
    iter_items,
    parse_input_args,
)

MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens
HELDOUT_MAX_CHARS = 2_000_000  # held-out text kept in memory for the summary, at most
OUTPUT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def record_texts(obj: dict) -> list[str]:
    """The training strings of one decoded record (raises RecordError for an unknown or invalid one)."""
    if "text" in obj:
        return [parse_text(obj)]
    if "conversations" in obj:
        return chat_texts(parse_conversation(obj))
    if "chosen" in obj or "rejected" in obj:
        pair = parse_pair(obj)
        return [turn["content"] for turn in pair.chosen] + [pair.rejected[-1]["content"]]
    raise RecordError("unknown_record", "expected a 'text', 'conversations' or 'chosen'/'rejected' record")


def split_special(texts: list[str]) -> list[str]:
    """The non-empty pieces of ``texts`` between special-token strings."""
    return [piece for text in texts for piece in SPECIAL_RE.split(text) if piece]


def is_heldout(item: Item, every: int) -> bool:
    """A fixed 1-in-``every`` choice by (file name, line), the same on every run and repetition."""
    return every > 0 and zlib.crc32(f"{Path(item.source).name}:{item.line}".encode()) % every == 0


class Corpus:
    """Streams training text from the inputs, collecting counts and a held-out slice on the way."""

    def __init__(self, specs: list[SourceSpec], max_chars: int | None, heldout_every: int, skip_bad: bool):
        self.specs = specs
        self.max_chars = max_chars
        self.heldout_every = heldout_every
        self.skip_bad = skip_bad
        self.records = 0
        self.chars = 0
        self.skipped: Counter[str] = Counter()
        self.heldout: dict[str, list[str]] = {}
        self.heldout_chars = 0

    def _texts(self, item: Item) -> list[str] | None:
        """The record's texts, or None when it is bad and --skip-bad is on (else its RecordError, located)."""
        try:
            return record_texts(decode_payload(item))
        except RecordError as e:
            if not self.skip_bad:
                raise e.at(item) from None
            self.skipped[e.reason] += 1
            return None

    def _hold_out(self, item: Item, texts: list[str]) -> bool:
        """Keep the record for evaluation instead of training, if it is picked and there is room."""
        if not is_heldout(item, self.heldout_every) or self.heldout_chars >= HELDOUT_MAX_CHARS:
            return False
        self.heldout.setdefault(Path(item.source).name, []).extend(texts)
        self.heldout_chars += sum(len(t) for t in texts)
        return True

    def _cap(self, pieces: list[str]) -> list[str]:
        """Cut ``pieces`` so that the total stays within --max-chars."""
        if self.max_chars is None:
            return pieces
        out: list[str] = []
        for piece in pieces:
            room = self.max_chars - self.chars - sum(len(p) for p in out)
            if room <= 0:
                break
            out.append(piece[:room])
        return out

    def __iter__(self) -> Iterator[list[str]]:
        total = count_items(self.specs)
        with tqdm(total=total, unit="rec", desc="tokenizer text", disable=None, file=sys.stderr) as bar:
            for item in iter_items(self.specs):
                bar.update(1)
                texts = self._texts(item)
                if texts is None or self._hold_out(item, texts):
                    continue
                pieces = self._cap(split_special(texts))
                self.records += 1
                self.chars += sum(len(p) for p in pieces)
                if pieces:
                    yield pieces
                if self.max_chars is not None and self.chars >= self.max_chars:
                    return


def new_tokenizer(split_digits: bool = False) -> Tokenizer:
    """An empty byte-level BPE: GPT-2 split regex, no prefix space, no normalizer, no post-processor.
    ``split_digits`` first cuts every digit into its own piece (LLaMA's and Qwen's convention), so a number
    is the same ids wherever it stands (after a space, a quote or a letter) and no merge joins digits."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    return tok


def train(corpus: Corpus, vocab_size: int, split_digits: bool = False) -> Tokenizer:
    """Train on the corpus stream; special tokens take ids 0..len(SPECIAL_TOKENS)-1 in order."""
    tok = new_tokenizer(split_digits)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return unmark_structure_tags(tok)


def unmark_structure_tags(tok: Tokenizer) -> Tokenizer:
    """Make the structure tags plain added tokens (single ids, kept by a skip-special decode)."""
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] not in STRUCTURE_TAGS
    return Tokenizer.from_str(json.dumps(data, ensure_ascii=False))


def check_special_ids(tok: Tokenizer) -> None:
    """Fail loudly if a special token is not the single id the rest of tinylm expects."""
    for expected, token in enumerate(SPECIAL_TOKENS):
        ids = tok.encode(token, add_special_tokens=False).ids
        if ids != [expected]:
            raise RuntimeError(f"special token {token!r} encodes to {ids}, expected [{expected}]")


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json for transformers (PreTrainedTokenizerFast over tokenizer.json)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": IM_START,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": ENDOFTEXT,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def save(tok: Tokenizer, out_dir: Path, model_max_length: int) -> list[Path]:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja, each atomically (core.files)."""
    make_dir(out_dir, "tokenizer folder")
    config = json.dumps(tokenizer_config(model_max_length), ensure_ascii=False, indent=2) + "\n"
    texts = (tok.to_str(pretty=True), config, CHAT_TEMPLATE)
    files = dict(zip(OUTPUT_FILES, texts, strict=True))
    for name, text in files.items():
        atomic_write_text(out_dir / name, text)
    return [out_dir / name for name in files]


def chars_per_token(tok: Tokenizer, texts: list[str]) -> float:
    """Characters per token over ``texts`` (0 when there is no text)."""
    if not texts:
        return 0.0
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    tokens = sum(len(e.ids) for e in encodings)
    return sum(len(t) for t in texts) / max(tokens, 1)


def summary(tok: Tokenizer, corpus: Corpus, files: list[Path]) -> str:
    """The closing report: vocabulary, what was read, compression on the held-out slice."""
    lines = [
        f"vocab size {tok.get_vocab_size()} (special ids: "
        + ", ".join(f"{t}={tok.token_to_id(t)}" for t in SPECIAL_TOKENS)
        + ")",
        f"trained on {corpus.records} records, {corpus.chars:,} characters",
    ]
    if corpus.skipped:
        lines.append("skipped bad records: " + ", ".join(f"{k}={v}" for k, v in sorted(corpus.skipped.items())))
    if corpus.heldout:
        every = [t for texts in corpus.heldout.values() for t in texts]
        lines.append(
            f"held-out slice ({sum(len(t) for t in every):,} chars): {chars_per_token(tok, every):.2f} chars/token"
        )
        for name, texts in sorted(corpus.heldout.items()):
            lines.append(f"  {name}: {chars_per_token(tok, texts):.2f} chars/token")
    lines.extend(f"wrote {path}" for path in files)
    return "\n".join(lines)


@dataclass(frozen=True)
class TokenizerOptions:
    """One training run, as the command line gives it (see :func:`parse_args` for each flag)."""

    inputs: list[str]
    out: Path
    vocab_size: int = 6400
    max_chars: int | None = None  # None: every training character
    heldout_every: int = 100  # 0: none held out
    model_max_length: int = 32768
    skip_bad: bool = False
    split_digits: bool = False


def parse_args(argv: list[str] | None) -> TokenizerOptions:
    d = TokenizerOptions([], Path())
    p = argparse.ArgumentParser(description="Train the byte-level BPE tokenizer (special tokens at ids 0..10).")
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="PATH_OR_GLOB[:WEIGHT]",
        help="JSONL, .jsonl.zst or Parquet files / globs, optionally with a mixing weight",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--vocab-size", type=number(int, low=MIN_VOCAB), default=d.vocab_size)
    p.add_argument("--max-chars", type=positive_int, default=d.max_chars,
                   help="stop after this many training characters")
    p.add_argument(
        "--heldout-every",
        type=non_negative_int,
        default=d.heldout_every,
        help="hold out 1 record in N for the chars/token summary (0: none)",
    )
    p.add_argument("--model-max-length", type=positive_int, default=d.model_max_length,
                   help="model_max_length in tokenizer_config")
    p.add_argument("--skip-bad", action="store_true", help="count and skip bad records instead of stopping")
    p.add_argument("--split-digits", action="store_true",
                   help="every digit its own token, the same ids wherever a number stands (LLaMA, Qwen); "
                   "default: GPT-2's split, where ' 6778' and '6778' tokenize differently")
    args = p.parse_args(argv)
    return TokenizerOptions(args.input, args.out, args.vocab_size, args.max_chars, args.heldout_every,
                            args.model_max_length, args.skip_bad, args.split_digits)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    return run_main("train_tokenizer.py", lambda: run(options))


def check_out(out: Path, specs: list[SourceSpec]) -> None:
    """Before training: refuse an --out that is a file, or whose output files would replace an input."""
    if out.exists() and not out.is_dir():
        raise FileWriteError("the tokenizer folder is a file, not a folder", path=out)
    inputs = [("--input", spec.path) for spec in specs]
    for name in OUTPUT_FILES:
        refuse_inputs(out / name, inputs, f"--out's {name}")


def run(options: TokenizerOptions) -> None:
    """Read the inputs, train, check the special ids, write the files, print the summary."""
    specs = parse_input_args(options.inputs)
    check_out(options.out, specs)
    corpus = Corpus(specs, options.max_chars, options.heldout_every, options.skip_bad)
    tok = train(corpus, options.vocab_size, options.split_digits)
    if corpus.chars == 0:
        raise TinyLMError("no training text in the inputs")
    check_special_ids(tok)
    print(summary(tok, corpus, save(tok, options.out, options.model_max_length)))


if __name__ == "__main__":
    sys.exit(main())
