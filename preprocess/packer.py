"""The packing driver: sources -> worker processes -> in-order shard builder -> shard files -> meta.json.

:func:`pack` checks the options and the output folder, locks it, keeps what an earlier run finished
(``preprocess/pack_plan.py``) and packs the rest: records are encoded in chunks by worker processes
(``preprocess/parallel.py``), the :class:`ShardBuilder` closes a shard after ``--shard-tokens`` tokens at a
record boundary, and meta.json (``preprocess/pack_report.py``) is written last.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from core.files import FolderLock, atomic_write_json, check_output_folder
from core.tokenizer import TokenizerInfo, declare_chat_template, load_tokenizer
from preprocess import shards
from preprocess.encode import (
    EncodedChunk,
    EncodeOptions,
    encode_in_worker,
    encode_items,
    init_worker,
)
from preprocess.pack_plan import (
    STATE_FILE,
    PackError,
    PackOptions,
    PackResult,
    clear_outputs,
    pack_output_file,
    plan_fingerprint,
    prepare_out,
)
from preprocess.pack_report import (
    accounting_line,
    check_has_rows,
    counts_before,
    overlong_warning,
    skipped_warning,
    special_strings_warning,
    summarize,
    tally,
    unmixed_warnings,
    unused_warning,
)
from preprocess.packing import assemble_shard
from preprocess.parallel import chunks, pool_map, usable_cores
from preprocess.sources import (
    BYTES_PER_CHAR_MAX,
    Item,
    SourceSpec,
    count_items,
    iter_items,
    parse_input_args,
)

CHUNK_RECORDS = 512  # a chunk (the work one worker takes at a time) holds at most this many records
CHUNK_BYTES = 128 << 10  # and closes once its lines hold this many bytes, so chunks cost about the same


def worker_count(opts: PackOptions, result: PackResult) -> int:
    """--workers, or every usable core; never more than the usable cores (capping is noted)."""
    cores = usable_cores()
    if opts.workers > cores:
        result.notes.append(f"--workers {opts.workers} capped at the {cores} usable core(s)")
    return min(opts.workers, cores) if opts.workers else cores

class ShardBuilder:
    """Accumulates encoded records in input order and writes a shard every ``shard_tokens`` tokens."""

    def __init__(self, opts: PackOptions, token_dtype: str, first_index: int, records_before: int):
        self.opts, self.token_dtype = opts, token_dtype
        self.index, self.records_end = first_index, records_before
        self.written: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.unit_docs: list[int] = []
        self.outcomes: Counter = Counter()
        self.records = self.tokens = self.literal_specials = 0

    def add(self, chunk: EncodedChunk) -> None:
        """Add a chunk item by item, closing shards at the first item that reaches the token budget."""
        item_docs = np.array(chunk.unit_docs, dtype=np.int64)
        doc_end = np.cumsum(item_docs)
        tok_end = np.concatenate([[0], np.cumsum(chunk.doc_lens)])[doc_end]
        lo = 0
        while lo < len(item_docs):
            tok_lo = int(tok_end[lo - 1]) if lo else 0
            over = np.nonzero(self.tokens + tok_end[lo:] - tok_lo >= self.opts.shard_tokens)[0]
            hi = lo + int(over[0]) + 1 if over.size else len(item_docs)
            doc_lo, doc_hi = (int(doc_end[lo - 1]) if lo else 0), int(doc_end[hi - 1])
            tok_hi = int(tok_end[hi - 1])
            tokens = slice(tok_lo, tok_hi)
            self.parts.append((chunk.tokens[tokens], chunk.weights[tokens], chunk.doc_lens[doc_lo:doc_hi]))
            self.unit_docs.extend(n for n in chunk.unit_docs[lo:hi] if n)
            self.outcomes.update(chunk.outcomes[lo:hi])
            self.literal_specials += sum(chunk.literal_specials[lo:hi])
            self.records += hi - lo
            self.tokens += tok_hi - tok_lo
            if over.size:
                self.flush()
            lo = hi

    def flush(self) -> None:
        if not self.records:
            return
        def cat(i: int, dtype: str) -> np.ndarray:
            return np.concatenate([p[i] for p in self.parts]) if self.parts else np.zeros(0, dtype)
        tokens, weights, doc_lens = cat(0, "uint32"), cat(1, "uint8"), cat(2, "int64")
        packed, seq = self.opts.packed, self.opts.seq_len
        shard = assemble_shard(tokens, weights, doc_lens, np.array(self.unit_docs, dtype=np.int64), seq, packed)
        self.records_end += self.records
        train_rows = shard.training_rows(seq, packed)
        stats = {
            "records_end": self.records_end, "records_read": self.records, **tally(self.outcomes),
            "supervised_tokens": int(np.count_nonzero(weights)), "train_rows": train_rows,
            "records_with_special_strings": self.literal_specials,
            "row_slots": train_rows * seq,
            "row_tokens": len(tokens) if packed else train_rows * seq,
        }
        try:
            self.written.append(shards.write_shard(self.opts.out, self.index, shard, self.token_dtype, stats))
        except BaseException:
            clear_outputs(self.opts.out, keep=self.index)  # no shard is left with only some of its files
            raise
        self.index += 1
        self._reset()

def encoded_chunks(enc: EncodeOptions, tok: TokenizerInfo, items: Iterator[Item], workers: int,
                   expected: int) -> Iterator[EncodedChunk]:
    """Encoded chunks of ``items`` (``expected`` of them, about) in input order; several workers go through
    :func:`preprocess.parallel.pool_map` (at most ``2 x workers`` chunks in flight, and the last chunks
    shrink so the workers end together; a worker that dies is a PackError naming the records it held)."""
    if workers == 1:
        yield from (encode_items(b, enc, tok) for b in chunks(items, CHUNK_RECORDS, CHUNK_BYTES))
        return
    batches = chunks(items, CHUNK_RECORDS, CHUNK_BYTES, expected, parts=2 * workers)

    def died(first: Item) -> PackError:
        return PackError(f"a tokenizer worker process died (killed, or out of memory?) while encoding the "
                         f"chunk of records from {first.source}:{first.line} on; lower --workers or "
                         "--max-record-chars and re-run to resume")
    yield from pool_map(encode_in_worker, batches, workers, init_worker, (tok, enc, True), died)

def counted(items: Iterator[Item], per_source: Counter) -> Iterator[Item]:
    """``items`` unchanged, counting the real records of each source (an empty file's marker counts 0, so
    a source absent from ``per_source`` is one whose weight kept none of its records)."""
    for item in items:
        per_source[item.source] += 1 if item.line else 0
        yield item

def pack(options: PackOptions) -> PackResult:
    """Pack ``options.inputs`` into ``options.out`` (locked for the run) and describe what was done.

    A re-run with the same inputs and options keeps the finished shards of an interrupted run and packs
    the rest, or, when the dataset is complete, writes nothing (``already_complete``); other inputs in
    the same folder are refused unless ``overwrite``. Every problem is a TinyLMError (one line); on one,
    ``out`` holds no half-written file and no meta.json that was not there."""
    if message := options.problem():
        raise PackError(message)
    specs = parse_input_args(options.inputs)
    tok = declare_chat_template(load_tokenizer(options.tokenizer), options.records.chat_template)
    if options.stage != "pretrain":
        tok.require_chat(f"--stage {options.stage}")
    if options.stage == "reason" and options.records.tag_weight != 1 and not tok.has_reasoning_tags:
        raise PackError(f"{tok.path}: <think>/</think>/<answer>/</answer> are not single ids in this tokenizer, "
                        "so they cannot be weighted; use a tokenizer that has them or pass --tag-weight 1")
    max_line = BYTES_PER_CHAR_MAX * options.records.max_record_chars
    total_items = count_items(specs, max_line)  # reads every input once: a broken file is refused here
    fingerprint = plan_fingerprint(options, specs, tok)
    check_output_folder(options.out, "pack.py", pack_output_file,
                        [*(("--input", s.path) for s in specs), ("--tokenizer", tok.path)])
    result = PackResult(options.out)
    if options.stage != "pretrain" and (note := tok.missing_tags_note()):
        result.warnings.append(note)  # said once per run (the workers render quietly)
    with FolderLock(options.out, "pack", create="output folder"):
        done, meta = prepare_out(options, fingerprint, tok, result)
        result.kept_shards = len(done)
        if meta is not None:
            result.meta, result.already_complete = meta, True
            return result
        _pack_rest(options, specs, tok, fingerprint, done, total_items, max_line, result)
    return result


def progress_bar(opts: PackOptions, total: int, initial: int) -> AbstractContextManager:
    """The tqdm bar of the records packed; with ``--quiet`` a stand-in that shows nothing, so tqdm is
    imported only when a bar is shown."""
    if opts.quiet:
        return SilentBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="rec", desc=f"pack {opts.stage}", dynamic_ncols=True)


class SilentBar(nullcontext):
    """What ``--quiet`` shows: nothing (the calls :func:`_pack_rest` makes on a tqdm bar do nothing)."""

    def __init__(self) -> None:
        super().__init__(self)

    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **values: object) -> None:
        pass


def _pack_rest(opts: PackOptions, specs: list[SourceSpec], tok: TokenizerInfo, fingerprint: str,
               done: list[dict], total_items: int, max_line: int, result: PackResult) -> None:
    """Encode and write every shard after ``done``, then meta.json (last); fills ``result``."""
    records_before = done[-1]["records_end"] if done else 0
    builder = ShardBuilder(opts, shards.token_dtype_for(tok.vocab_size), len(done), records_before)
    r = opts.records
    enc = EncodeOptions(opts.stage, opts.seq_len, r.overlong, r.tag_weight, r.max_record_chars, r.parse_special,
                        r.augment, r.hold_out_every, r.held_out_only)
    per_source: Counter = Counter()  # records each source contributed after its weight (resume included)
    items = itertools.islice(counted(iter_items(specs, max_line), per_source), records_before, None)
    start = time.perf_counter()
    encoded = encoded_chunks(enc, tok, items, worker_count(opts, result), total_items - records_before)
    with progress_bar(opts, total_items, records_before) as bar, contextlib.closing(encoded):
        try:
            for chunk in encoded:
                at = None if r.skip_bad else next((i for i, e in enumerate(chunk.errors) if e is not None), None)
                if at is not None:
                    before = counts_before(done + builder.written, builder.outcomes + Counter(chunk.outcomes[:at]))
                    raise chunk.errors[at].with_hint(f"pass --skip-bad to skip and count bad records (before it: "
                                                     f"{accounting_line(before)})")
                builder.add(chunk)
                bar.update(len(chunk.outcomes))
                bar.set_postfix(tokens=f"{sum(r['tokens'] for r in builder.written) + builder.tokens:,}",
                                refresh=False)
        except PackError as e:  # a worker died: say what became of the records read so far
            so_far = accounting_line(counts_before(done + builder.written, builder.outcomes))
            raise e.with_hint(f"so far: {so_far}") from None
        builder.flush()
    meta = summarize(opts, specs, tok, done + builder.written, fingerprint, per_source)
    try:
        check_has_rows(opts, meta["counts"])
    except PackError:
        clear_outputs(opts.out, keep=0)
        (opts.out / STATE_FILE).unlink(missing_ok=True)
        raise
    c = meta["counts"]
    result.warnings += [w for w in (overlong_warning(opts, c), skipped_warning(c), unused_warning(opts, c),
                                    special_strings_warning(opts, c), *unmixed_warnings(meta["sources"], per_source))
                        if w]
    atomic_write_json(opts.out / "meta.json", meta)
    (opts.out / STATE_FILE).unlink(missing_ok=True)
    result.meta, result.seconds = meta, time.perf_counter() - start
