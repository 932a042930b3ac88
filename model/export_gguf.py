"""Write a TinyLM as a llama.cpp GGUF file (``llama`` architecture, or ``qwen3`` for a ``qk_norm`` model;
``gpt2`` byte-level BPE tokenizer).

Layout, as llama.cpp's ``convert_hf_to_gguf.py`` writes a ``LlamaForCausalLM``:

- metadata: ``llama.context_length / embedding_length / block_count / feed_forward_length /
  attention.head_count / attention.head_count_kv / rope.dimension_count / rope.freq_base /
  attention.layer_norm_rms_epsilon / vocab_size``, ``general.file_type``;
- tokenizer: ``tokenizer.ggml.model = "gpt2"`` with ``pre = "gpt-2"`` (the GPT-2 split regex that our
  ByteLevel pre-tokenizer uses), one token string per id (byte-level characters, as in tokenizer.json),
  token types (special added tokens CONTROL, other added tokens USER_DEFINED, ids the tokenizer lacks
  UNUSED ``[PADi]``), merges ``"a b"``, bos / eos / eot / padding ids, no automatic bos/eos, the chat template;
- tensors under llama.cpp names (``gguf.get_tensor_name_map``); a tied model has no ``output.weight``
  (llama.cpp then uses ``token_embd.weight``). 1-D norm weights are always F32; 2-D weights F32, F16 or
  Q8_0 (a tensor whose row length is not a multiple of the 32-value Q8_0 block stays F16).

RoPE: we rotate halves (dimension i pairs with i + d/2); llama.cpp's ``llama`` graph rotates adjacent
pairs (2i, 2i+1). Permuting the output rows of ``q_proj`` / ``k_proj`` inside every head from
``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` to ``[x_0, y_0, x_1, y_1, ...]`` makes the two identical, because
q.k is invariant under the same permutation of q and k. That is ``convert_hf_to_gguf.py``'s
``LlamaModel.permute``: ``w.reshape(heads, 2, d/2, in).swapaxes(1, 2).reshape(w.shape)`` with
``heads = num_attention_heads`` for q and ``num_key_value_heads`` for k.

``qwen3`` (as ``convert_hf_to_gguf.py`` writes a ``Qwen3ForCausalLM``): the same metadata under ``qwen3.``,
the per-head norms as ``blk.N.attn_q_norm`` / ``attn_k_norm``, and *no* permutation: llama.cpp runs qwen3 with
NEOX (rotate-half) RoPE, our convention. Both architectures get ``attention.key_length`` / ``value_length`` =
``head_dim``, so a head_dim other than hidden_size / heads is stated, not derived.

The file is written to a temporary name beside ``out`` and renamed into place when complete (fsync-ed); a
full disk or a read-only folder is one FileWriteError naming ``out``, the temporary file removed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.files import FileWriteError, make_dir, os_reason, publish, refuse_special, temp_path
from model.config import ModelConfig
from model.export_hf import ExportError, check_exportable
from model.moe_gguf import ARCHITECTURE as MOE_ARCHITECTURE
from model.moe_gguf import add_moe_metadata, split_moe_tensors

FORMATS = ("f32", "f16", "q8_0")
Q8_BLOCK = 32


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer as GGUF stores it (lists indexed by token id)."""

    tokens: list[str]
    token_types: list[int]  # gguf.TokenType values
    merges: list[str]  # "left right"
    bos_id: int | None
    eos_id: int
    eot_id: int | None
    pad_id: int | None
    chat_template: str


def vocab_from_tokenizer_json(spec: dict, vocab_size: int, chat_template: str, bos: str | None, eos: str,
                              pad: str | None, eot: str | None = None) -> GGUFVocab:
    """Convert a byte-level BPE ``tokenizer.json`` (parsed) into :class:`GGUFVocab` of ``vocab_size`` ids.

    Raises ExportError for a tokenizer llama.cpp's ``gpt2`` model cannot express (not BPE, not
    byte-level, a normaliser, more ids than the model has, or a named special token missing).
    """
    import gguf

    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model is {model.get('type')!r}; GGUF export supports byte-level BPE only")
    if (spec.get("pre_tokenizer") or {}).get("type") != "ByteLevel" or spec.get("normalizer"):
        raise ExportError("tokenizer is not a plain byte-level BPE (ByteLevel pre-tokenizer, no normalizer): "
                          "llama.cpp's gpt2 pre-tokenizer would split it differently")
    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if by_id and max(by_id) >= vocab_size:
        raise ExportError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {t: i for i, t in enumerate(tokens)}
    for name in (bos, eos, pad, eot):
        if name is not None and name not in ids:
            raise ExportError(f"special token {name!r} is not in the tokenizer")
    return GGUFVocab(tokens, [int(t) for t in types], merges, ids.get(bos) if bos else None, ids[eos],
                     ids.get(eot) if eot else None, ids.get(pad) if pad else None, chat_template)


def permute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection [heads * d, in] from rotate-half to llama.cpp's adjacent-pair order."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, float32 array) for every tensor to store, q/k permuted, tied head dropped."""
    import gguf

    arch = gguf.MODEL_ARCH.QWEN3 if cfg.qk_norm else gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    permute = not cfg.qk_norm  # llama: adjacent-pair RoPE; qwen3: NEOX, i.e. rotate-half as ours
    state, out = split_moe_tensors(state, cfg) if cfg.is_moe else (state, [])  # qwen3moe: model/moe_gguf.py
    for name, tensor in state.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        new = names.get_name(name, try_suffixes=(".weight",))
        if new is None:
            raise ExportError(f"no llama.cpp name for tensor {name!r}")
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if permute and name.endswith("self_attn.q_proj.weight"):
            data = permute_rotary(data, cfg.num_attention_heads)
        elif permute and name.endswith("self_attn.k_proj.weight"):
            data = permute_rotary(data, cfg.num_key_value_heads)
        out.append((new, np.ascontiguousarray(data)))
    return out


def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture name for ``cfg``: ``qwen3moe`` for MoE, ``qwen3`` with QK-norm, else ``llama``."""
    if cfg.is_moe:
        return MOE_ARCHITECTURE
    return "qwen3" if cfg.qk_norm else "llama"


def export_gguf(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab: GGUFVocab, out: str | Path,
                fmt: str = "f32", name: str = "tinylm", progress: bool = False) -> Path:
    """Write ``out`` (.gguf) atomically; returns ``out``. ``fmt``: f32, f16 or q8_0 (see module doc)."""
    import gguf

    check_exportable(cfg, "gguf")
    if fmt not in FORMATS:
        raise ExportError(f"GGUF type must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if len(vocab.tokens) != cfg.vocab_size:
        raise ExportError(f"vocab has {len(vocab.tokens)} tokens but the model's vocab_size is {cfg.vocab_size}")
    out = Path(out)
    make_dir(out.parent, "folder of the GGUF file")
    refuse_special(out)
    tmp = temp_path(out)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[fmt]
    writer = gguf.GGUFWriter(tmp, gguf_architecture(cfg))
    try:
        writer.add_name(name)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(float(cfg.rope_theta))
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(int(file_type))
        if cfg.is_moe:
            add_moe_metadata(writer, cfg)
        if fmt == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")  # llama.cpp name of the GPT-2 split regex
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.token_types)
        writer.add_token_merges(vocab.merges)
        if vocab.bos_id is not None:
            writer.add_bos_token_id(vocab.bos_id)
        writer.add_eos_token_id(vocab.eos_id)
        if vocab.eot_id is not None:
            writer.add_eot_token_id(vocab.eot_id)
        if vocab.pad_id is not None:
            writer.add_pad_token_id(vocab.pad_id)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        writer.add_chat_template(vocab.chat_template)

        for tname, data in gguf_tensors(state, cfg):
            if data.ndim == 1 or fmt == "f32":
                writer.add_tensor(tname, data.astype(np.float32))
            elif fmt == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
                q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(tname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(tname, data.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    except BaseException as e:
        with contextlib.suppress(OSError):
            writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise FileWriteError(f"cannot write ({os_reason(e)})", path=out) from None
        raise
    publish(tmp, out)
    return out


def modelfile(gguf_name: str) -> str:
    """An ollama ``Modelfile`` for the GGUF beside it: ChatML as a Go template, stop at ``<|im_end|>``.

    ollama puts a ``SYSTEM`` line and a request's system message into ``.Messages`` with role
    ``system``, so one loop over the messages renders exactly our ChatML (then the generation prompt).
    """
    template = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
                "<|im_start|>assistant\n")
    return "\n".join([f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""', 'PARAMETER stop "<|im_end|>"',
                      'PARAMETER stop "<|endoftext|>"', ""])
