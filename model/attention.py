"""Causal self-attention kernels for plain rows and for packed rows (several documents per row).

A packed row carries ``doc_ids`` [B, T]: query t may attend to key s iff ``s <= t`` and
``doc_ids[b, s] == doc_ids[b, t]`` (block-diagonal causal). Padding carries doc id -1, so padding
attends among itself: no row of the mask is empty, hence no NaN. Within a row every document has its
own id (ids are compared, not boundaries, so an id must not be reused by two documents of one row).

Two interchangeable backends for packed rows:

- ``"flex"``: FlexAttention with a ``BlockMask`` built from a document ``mask_mod``; fully masked
  128x128 tiles are skipped. On CUDA the call is ``torch.compile``-d (fused kernel). On CPU (torch
  2.13) FlexAttention has **no backward**: it serves inference only.
- ``"sdpa"``: ``scaled_dot_product_attention`` with a dense additive float [B, 1, T, T] mask (built
  once per forward in the compute dtype and shared by all layers, so backward keeps one copy, not one
  per layer): works everywhere with autograd, but costs O(T^2) mask memory and loses the CUDA flash
  kernel.

- ``"docs"``: one ``is_causal`` SDPA call per document of each row (:func:`attend_documents`): no
  mask at all, and only the causal half of each document is computed, so a packed row costs no more
  than a plain causal one. Needs the row layout on the host (one sync per forward); inside
  ``torch.compile`` it falls back to "sdpa".

``"auto"`` resolves to flex on CUDA and docs elsewhere: on CPU a training step with per-document calls
costs about what a plain causal step does, less than the dense mask (``bench/attention.py`` measures the
three).

The mask is built once per forward pass, with shapes fixed by (B, T) only, and is shared by all
layers; the BlockMask construction is kept out of ``torch.compile`` graphs (``torch.compiler.disable``),
so new doc_ids of the same shape cause no recompilation.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from model import lean_autograd as lean


class InferenceMask(NamedTuple):
    """Mask of a generation step (queries are the T newest of S = past + T positions).

    ``mask`` is bool [B or 1, 1, T, S] (True = attend), or None when every query may see every key
    (one new token, no padding): then SDPA runs without a mask.
    """

    mask: Tensor | None


class DocumentSplit(NamedTuple):
    """Packed rows as runs of equal doc id: ``lengths[b]`` are row b's run lengths (sum T), host ints."""

    lengths: list[list[int]]


AttentionMask = BlockMask | Tensor | DocumentSplit | InferenceMask | None
"""None: plain causal rows; Tensor: dense float [B, 1, T, T] (0 = attend, -inf = not); BlockMask: flex;
DocumentSplit: one causal call per document; InferenceMask: a KV-cache / padded generation step."""


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Map "auto" to the default for ``device``: "flex" on CUDA, "docs" otherwise (``bench/attention.py``)."""
    if name not in ("auto", "flex", "sdpa", "docs"):
        raise ValueError(f"attn_backend must be 'auto', 'flex', 'sdpa' or 'docs', got {name!r}")
    if name != "auto":
        return name
    return "flex" if torch.device(device).type == "cuda" else "docs"


def positions_from_doc_ids(doc_ids: Tensor) -> Tensor:
    """Position of each token inside its document: 0 at every change of doc id along a row."""
    _, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def dense_document_mask(doc_ids: Tensor) -> Tensor:
    """Bool [B, 1, T, T]: same document and causal."""
    t = doc_ids.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


@torch.compiler.disable
def document_block_mask(doc_ids: Tensor) -> BlockMask:
    """FlexAttention BlockMask for block-diagonal causal attention (heads broadcast)."""
    docs = doc_ids

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (docs[b, q_idx] == docs[b, kv_idx]) & (q_idx >= kv_idx)

    b, t = doc_ids.shape
    return create_block_mask(mask_mod, b, None, t, t, device=doc_ids.device)


def additive_document_mask(doc_ids: Tensor, dtype: torch.dtype) -> Tensor:
    """Float [B, 1, T, T] in ``dtype``: 0 where :func:`dense_document_mask` allows, -inf elsewhere.

    SDPA turns a bool mask into exactly this float mask inside every call and keeps that copy for
    backward, one per layer; given the float mask, all layers save the same tensor (the one
    [B, 1, T, T] the training step holds, instead of one per layer).
    """
    allowed = dense_document_mask(doc_ids)
    return torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device).masked_fill_(~allowed, float("-inf"))


@torch.compiler.disable
def document_split(doc_ids: Tensor) -> DocumentSplit:
    """The run lengths of equal doc ids in every row (read on the host: one sync per forward)."""
    return DocumentSplit([torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in doc_ids.cpu()])


def build_attention_mask(doc_ids: Tensor | None, backend: str, dtype: torch.dtype = torch.float32) -> AttentionMask:
    """The mask for one forward pass (shared by all layers). ``backend`` is "flex", "sdpa" or "docs";
    ``dtype`` is the dtype of q / k / v (the sdpa mask is built in it). Inside ``torch.compile`` "docs"
    becomes "sdpa": per-document calls would make every new row layout a recompilation."""
    if doc_ids is None:
        return None
    if backend == "docs" and torch.compiler.is_compiling():
        backend = "sdpa"
    if backend == "flex":
        return document_block_mask(doc_ids)
    if backend == "sdpa":
        return additive_document_mask(doc_ids, dtype)
    if backend == "docs":
        return document_split(doc_ids)
    raise ValueError(f"unresolved attention backend {backend!r}")


def _document_runs(split: DocumentSplit) -> list[tuple[int, int, int]]:
    """(row, start, end) of every run of equal doc id (padding runs too); together they cover [B, T]."""
    runs = []
    for row, lengths in enumerate(split.lengths):
        start = 0
        for n in lengths:
            runs.append((row, start, start + n))
            start += n
    return runs


def _piece(t: Tensor, run: tuple[int, int, int]) -> Tensor:
    """Run ``run``'s [1, heads, length, D] view of a [B, heads, T, D] tensor ([1, heads, length] of [B, heads, T])."""
    row, start, end = run
    return t[row:row + 1, :, start:end]


_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _flash_documents_cpu(q: Tensor, k: Tensor, v: Tensor, runs: list[tuple[int, int, int]]) -> tuple[Tensor, Tensor]:
    """(output [B, H, T, D] as the transpose of a [B, T, H, D] buffer, logsumexp [B, H, T]): one CPU flash
    ``is_causal`` call per run, written into the two buffers."""
    b, h, t, d = q.shape
    out = q.new_empty(b, t, h, d).transpose(1, 2)
    lse = None
    for run in runs:
        o, piece_lse = _FLASH_CPU(_piece(q, run), _piece(k, run), _piece(v, run), 0.0, True)
        if lse is None:
            lse = piece_lse.new_empty(b, h, t)
        _piece(out, run).copy_(o)
        _piece(lse, run).copy_(piece_lse)
    return out, lse


class _DocumentAttention(torch.autograd.Function):
    """CPU per-document causal attention writing into one output buffer: keeps q, k, v, that output and
    one logsumexp [B, H, T], not a separately allocated output (and logsumexp) per document plus the
    concatenated copies. The output buffer is laid out [B, T, H, D] (returned as its [B, H, T, D]
    transpose), so ``o_proj``'s input ``y.transpose(1, 2).reshape(B, T, H * D)`` is a view of it and
    is not kept a second time. Forward and backward run the same CPU flash kernels, per document, as
    ``F.scaled_dot_product_attention(..., is_causal=True)`` and its autograd do.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, runs: list[tuple[int, int, int]]) -> Tensor:
        out, lse = _flash_documents_cpu(q, k, v, runs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.runs = runs
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        q, k, v, out, lse = ctx.saved_tensors
        grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
        for run in ctx.runs:
            pieces = _FLASH_CPU_BACKWARD(_piece(grad_out, run), _piece(q, run), _piece(k, run), _piece(v, run),
                                         _piece(out, run), _piece(lse, run), 0.0, True)
            for grad, piece in zip(grads, pieces, strict=True):
                _piece(grad, run).copy_(piece)
        return (*grads, None)


def attend_documents(q: Tensor, k: Tensor, v: Tensor, split: DocumentSplit) -> Tensor:
    """Block-diagonal causal attention as one ``is_causal`` SDPA call per document (padding runs too).

    On CPU: the flash kernel per run, into one output buffer (under autograd :class:`_DocumentAttention`,
    which keeps that buffer, not a copy per document; unless ``model.lean.ENABLED`` is off). Elsewhere
    rows and documents are cut with ``unbind`` / ``split`` (views whose backward is one concatenation;
    slicing instead would give every piece a full-size zero gradient) and the outputs concatenated.
    Same function as the dense mask, with only the causal half of each document's tiles computed.
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.device.type == "cpu" and (lean.use_lean(q, k, v) or not grad):
        runs = _document_runs(split)
        return _DocumentAttention.apply(q, k, v, runs) if grad else _flash_documents_cpu(q, k, v, runs)[0]
    gqa = q.size(1) != k.size(1)
    rows = []
    for lengths, qr, kr, vr in zip(split.lengths, q.unbind(0), k.unbind(0), v.unbind(0), strict=True):
        parts = [F.scaled_dot_product_attention(a[None], b[None], c[None], is_causal=True, enable_gqa=gqa)[0]
                 for a, b, c in zip(qr.split(lengths, 1), kr.split(lengths, 1), vr.split(lengths, 1), strict=True)]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, 1))
    return torch.stack(rows)


def inference_mask(attention_mask: Tensor | None, past: int, t: int, device: torch.device) -> InferenceMask:
    """Causal mask of T new queries over S = past + T keys, AND the key-padding ``attention_mask`` [B, S].

    Query i (absolute slot past + i) may see key j iff j <= past + i and ``attention_mask[b, j]``;
    it always sees itself, so a padding query has a non-empty row (finite output, no NaN) while no
    real query ever sees a padding key.
    """
    if attention_mask is None and t == 1:
        return InferenceMask(None)
    s = past + t
    key = torch.arange(s, device=device)
    query = past + torch.arange(t, device=device)
    allowed = key[None, :] <= query[:, None]  # [T, S]
    if attention_mask is None:
        return InferenceMask(allowed[None, None])
    own = key[None, :] == query[:, None]
    return InferenceMask((allowed[None] & attention_mask.bool()[:, None, :] | own[None])[:, None])


def attend_inference(q: Tensor, k: Tensor, v: Tensor, mask: InferenceMask) -> Tensor:
    """q [B, H, T, D] over cached k/v [B, Hkv, S, D] with an :class:`InferenceMask` -> [B, H, T, D].

    Few queries (decode steps, T <= 8): explicit grouped matmuls, softmax in fp32 -- the query heads of
    one kv head are stacked as rows ([B, Hkv, G*T, D]), so k/v are neither copied nor repeated: on CPU this
    beats SDPA's flash kernel for a few queries over strided cache views.
    Longer prefills go to SDPA.
    """
    b, h, t, d = q.shape
    hkv, s = k.size(1), k.size(2)
    if t > 8:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, enable_gqa=h != hkv)
    g = h // hkv
    scores = (q.reshape(b, hkv, g * t, d) @ k.transpose(-1, -2)).float() * d ** -0.5  # [B, Hkv, G*T, S]
    if mask.mask is not None:
        keep = mask.mask[:, :, None]  # [B or 1, 1, 1, T, S] over [B, Hkv, G, T, S]
        scores = scores.view(b, hkv, g, t, s).masked_fill(~keep, float("-inf")).view(b, hkv, g * t, s)
    probs = scores.softmax(dim=-1).to(v.dtype)
    return (probs @ v).view(b, h, t, d)


@functools.cache
def _flex_fn(device_type: str, compiled: bool) -> Callable[..., Tensor]:
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


FLEX_COMPILE: bool | None = None
"""Wrap flex_attention in torch.compile? None = auto: on CUDA yes (fused kernel), on CPU no
(inference only there; see bench/attention.py for the measurement)."""


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttentionMask) -> Tensor:
    """Causal attention; q [B, H, T, D], k/v [B, Hkv, T, D] with H a multiple of Hkv (GQA) -> [B, H, T, D].

    No attention-probability dropout (FlexAttention has none; every backend must compute the same
    function): the model applies dropout to the embeddings and the residual branches instead.
    """
    gqa = q.size(1) != k.size(1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, DocumentSplit):
        return attend_documents(q, k, v, mask)
    if isinstance(mask, BlockMask):
        cpu = q.device.type == "cpu"
        if cpu and (q.requires_grad or k.requires_grad or v.requires_grad):
            if torch.is_grad_enabled():
                raise NotImplementedError(
                    f"FlexAttention has no backward on CPU in torch {torch.__version__}; "
                    "train on CPU with attn_backend='sdpa' (or 'auto'), or run under torch.no_grad()")
            q, k, v = q.detach(), k.detach(), v.detach()  # torch refuses leaves that require grad
        compiled = not cpu if FLEX_COMPILE is None else FLEX_COMPILE
        fn = _flex_fn(q.device.type, compiled)
        if compiled or torch.compiler.is_compiling():
            return fn(q, k, v, block_mask=mask, enable_gqa=gqa)
        with warnings.catch_warnings():  # eager (unfused) flex is a deliberate choice on CPU
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            return fn(q, k, v, block_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
