"""TinyLM: a Llama-style decoder whose parameter names map 1:1 onto transformers' LlamaForCausalLM.

    x = dropout(embed_tokens(ids))
    per layer:  x = x + dropout(o_proj(attn(rope(q), rope(k), v)))      on input_layernorm(x)
                x = x + dropout(mlp(.))                                  on post_attention_layernorm(x)
    logits = lm_head(norm(x)).float()

RMSNorm is computed in fp32 (fp64 for fp64) and cast back before the weight multiply; RoPE uses the
rotate-half convention with cos/sin computed in fp32 for the ``position_ids`` of each forward, exactly as
transformers does (no table sized by ``max_position_embeddings``). Generation passes a preallocated
:class:`KVCache` (k/v written in place per layer) and, for left-padded batches, a key-padding
``attention_mask``; the training path (no cache, no attention_mask) is untouched by either. Attention is
grouped-query, no biases anywhere. With ``num_experts > 0`` each ``mlp`` is a :class:`MoE` block
(DeepSeek/MiniMind style: softmax router, top-k routed experts plus always-on shared experts).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from model.attention import (
    AttentionMask,
    InferenceMask,
    attend,
    attend_inference,
    build_attention_mask,
    inference_mask,
    positions_from_doc_ids,
    resolve_backend,
)
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.lean_autograd import norm_linear, rms_norm, swiglu_down


class ModelOutput(NamedTuple):
    logits: Tensor  # float32 [B, T, V]
    aux_loss: Tensor  # scalar; MoE load-balance loss already scaled by moe_aux_loss_coef, 0 for dense


class HeadInput(NamedTuple):
    """``forward(..., select=index)``: what the output head needs at the selected positions only."""

    hidden: Tensor  # [N, H]: final-normalised hidden states at the N selected flat positions of [B, T]
    weight: Tensor  # [V, H]: the output head (a view of lm_head.weight; logits = hidden @ weight.T)
    aux_loss: Tensor  # as in ModelOutput


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)), normalised in fp32 (fp64 for fp64 x), cast back to x's dtype.

    Backward keeps x and the per-row rstd only (:func:`model.lean.rms_norm`)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin [B or 1, 1, T, head_dim] of the positions asked for (frequencies repeated twice: rotate-half).

    Computed per forward from the fp32 inverse frequencies (one buffer of head_dim / 2, non-persistent: not
    in the state dict), so memory follows the positions actually run, never ``max_position_embeddings``;
    each angle is one fp32 product ``position * inv_freq``, the same value a precomputed table holds.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """position_ids [B or 1, T] -> cos, sin [B or 1, 1, T, head_dim] (broadcast over heads)."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
        return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention: num_key_value_heads k/v heads shared by groups of q heads.

    With ``qk_norm`` (Qwen3) each q and k head is RMS-normalised over ``head_dim`` (``q_norm`` / ``k_norm``,
    one weight vector shared by all heads) before RoPE, so the KV cache holds normalised, rotated keys.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, h, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask,
                cache: KVCache | None = None, layer: int = 0, norm: RMSNorm | None = None) -> Tensor:
        """Attention over ``x`` [B, T, H], or over ``norm(x)`` when ``norm`` is given (fused: see norm_linear)."""
        b, t, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = norm_linear(x, norm, projections) if norm is not None else (p(x) for p in projections)
        q = q.view(b, t, self.n_head, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is None and not isinstance(mask, InferenceMask):
            y = attend(q, k, v, mask)
        else:
            if cache is not None:
                k, v = cache.update(layer, k, v)
            y = attend_inference(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x)).

    Backward keeps gate_proj(x) and up_proj(x) only, not silu(gate) nor the product
    (:func:`model.lean.swiglu_down`), and with ``norm`` not the normalised input either
    (:func:`model.lean.norm_linear`); the three projections stay separate ``nn.Linear`` s (state dict,
    LoRA targets and export see the same modules)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor, norm: RMSNorm | None = None) -> Tensor:
        """The SwiGLU of ``x``, or of ``norm(x)`` when ``norm`` is given (fused: see norm_linear)."""
        projections = (self.gate_proj, self.up_proj)
        gate, up = norm_linear(x, norm, projections) if norm is not None else (p(x) for p in projections)
        return swiglu_down(gate, up, self.down_proj)


class MoE(nn.Module):
    """Mixture of SwiGLU experts: y = sum_k w_k * expert_{i_k}(x) + shared_experts(x).

    Router ``gate``: p = softmax(gate(x)) in fp32; (w, i) = top-k of p; w is renormalised to sum 1
    when ``norm_topk_prob`` and k > 1, and for k = 1 too with ``norm_top1_prob`` (then w == 1 and the router
    gets no gradient from the LM loss, as in transformers' Qwen-MoE and MiniMind-3-MoE). Otherwise w
    multiplies the expert outputs, so the router learns from the LM loss itself.
    The ``n_shared_experts`` always-on experts are one SwiGLU of width n_shared * intermediate_size
    (the sum of n equal-width experts). Load-balance loss (Switch Transformer / MiniMind):
    ``coef * E * sum_e f_e * P_e`` with f_e the fraction of routed slots sent to expert e and P_e its
    mean router probability; it equals ``coef`` under perfectly uniform routing.
    Tokens are grouped per expert (sort by expert id) so each expert runs one matmul on its tokens;
    the per-expert counts are read on the host (one sync and one graph break under torch.compile).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.top_k, self.num_experts = cfg.num_experts_per_tok, cfg.num_experts
        self.norm_topk = cfg.norm_topk_prob and (self.top_k > 1 or cfg.norm_top1_prob)
        self.aux_coef = cfg.moe_aux_loss_coef
        self.gate = nn.Linear(h, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(h, i) for _ in range(cfg.num_experts))
        self.shared_experts = MLP(h, i * cfg.n_shared_experts) if cfg.n_shared_experts > 0 else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs = self.gate(flat).float().softmax(dim=-1)  # [N, E]
        weights, experts = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)

        slot_expert = experts.reshape(-1)  # [N * k]
        order = slot_expert.argsort(stable=True)
        per_expert = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        per_expert.scatter_add_(0, slot_expert, torch.ones_like(slot_expert))  # fixed shape [E]
        counts = per_expert.tolist()
        token = order // self.top_k
        outs = [e(chunk) for e, chunk in zip(self.experts, flat[token].split(counts), strict=True)]
        routed = torch.cat(outs) * weights.reshape(-1)[order, None].to(outs[0].dtype)
        y = torch.zeros_like(flat).index_add_(0, token, routed.to(flat.dtype))
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat).to(flat.dtype)

        frac = per_expert.float() / slot_expert.numel()
        aux = self.aux_coef * self.num_experts * (frac * probs.mean(dim=0)).sum()
        return y.view(shape), aux


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: MLP | MoE = MoE(cfg) if cfg.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: AttentionMask,
                cache: KVCache | None = None, layer: int = 0) -> tuple[Tensor, Tensor]:
        x = x + self.dropout(self.self_attn(x, cos, sin, mask, cache, layer, norm=self.input_layernorm))
        if isinstance(self.mlp, MoE):
            out, aux = self.mlp(self.post_attention_layernorm(x))
        else:
            out, aux = self.mlp(x, norm=self.post_attention_layernorm), None
        return x + self.dropout(out), aux


class Backbone(nn.Module):
    """transformers' ``LlamaModel`` layout: embed_tokens, layers, norm (+ non-persistent rotary_emb)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.dropout = nn.Dropout(cfg.dropout)


def state_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The name -> shape of every tensor in ``TinyLM(cfg).state_dict()``, computed from the config alone (no
    module built, nothing allocated), so a checkpoint's tensors are compared with its config before a model
    of that config exists."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    assert i is not None and d is not None  # filled in by ModelConfig.__post_init__

    def mlp(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.gate_proj.weight": (width, h), f"{prefix}.up_proj.weight": (width, h),
                f"{prefix}.down_proj.weight": (h, width)}

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_hidden_layers):
        layer = f"model.layers.{n}"
        shapes[f"{layer}.input_layernorm.weight"] = (h,)
        shapes[f"{layer}.self_attn.q_proj.weight"] = (cfg.num_attention_heads * d, h)
        shapes[f"{layer}.self_attn.k_proj.weight"] = (cfg.num_key_value_heads * d, h)
        shapes[f"{layer}.self_attn.v_proj.weight"] = (cfg.num_key_value_heads * d, h)
        shapes[f"{layer}.self_attn.o_proj.weight"] = (h, cfg.num_attention_heads * d)
        if cfg.qk_norm:
            shapes[f"{layer}.self_attn.q_norm.weight"] = (d,)
            shapes[f"{layer}.self_attn.k_norm.weight"] = (d,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (h,)
        if cfg.is_moe:
            shapes[f"{layer}.mlp.gate.weight"] = (cfg.num_experts, h)
            for e in range(cfg.num_experts):
                shapes.update(mlp(f"{layer}.mlp.experts.{e}", i))
            if cfg.n_shared_experts > 0:
                shapes.update(mlp(f"{layer}.mlp.shared_experts", i * cfg.n_shared_experts))
        else:
            shapes.update(mlp(f"{layer}.mlp", i))
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


class TinyLM(nn.Module):
    """Causal LM. ``forward(input_ids, position_ids=None, doc_ids=None) -> ModelOutput(logits, aux_loss)``.

    Generation adds ``attention_mask`` (left padding) and ``cache`` (a :class:`KVCache`); see ``forward``.

    Plain rows (``doc_ids is None``): causal SDPA (flash on CUDA), positions 0..T-1 unless given.
    Packed rows: ``doc_ids`` [B, T] int (padding = -1); a token attends only to earlier tokens of its
    document, ``position_ids`` restart at 0 per document (derived from ``doc_ids`` if not given).
    The caller computes the loss; for MoE add ``aux_loss`` (0-dim tensor, zero for dense models).

    ``activation_checkpointing`` (a run-time switch, not part of the config): with autograd on, each
    decoder block runs under non-reentrant ``torch.utils.checkpoint``, so backward keeps only every
    block's input and recomputes the block's activations (same values and gradients, ~1/3 more compute).
    """

    activation_checkpointing: bool = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, std) for every matrix; o_proj/down_proj (residual outputs) get std / sqrt(2 * layers)."""
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scaled = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=resid_std if scaled else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids: Tensor, position_ids: Tensor | None = None, doc_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, cache: KVCache | None = None,
                last_only: bool = False, select: Tensor | None = None) -> ModelOutput | HeadInput:
        """Logits for ``input_ids`` [B, T] (``last_only``: for the last position only, [B, 1, V]).

        ``select`` (int64 [N], flat indices into the B x T positions): no logits; a :class:`HeadInput`
        with the normalised hidden states of those positions and the head matrix, for a loss computed
        only where it is (``model/head.py``: chunked, never [B, T, V]).

        Training / scoring: ``doc_ids`` and ``position_ids`` as in the class docstring. Generation:
        ``cache`` holds the k/v of the earlier ``cache.length`` positions (the T new ones are written
        into it and ``cache.length`` advances by T); ``attention_mask`` [B, past + T] (1 = real token,
        0 = left padding) covers past and new slots. Without ``position_ids``, a row's positions count
        its real tokens only (``cumsum(attention_mask) - 1``), so a padded prompt gets the same
        positions as when run alone.
        """
        b, t = input_ids.shape
        if cache is None and attention_mask is None:
            if position_ids is None:
                if doc_ids is None:
                    position_ids = torch.arange(t, device=input_ids.device)[None]
                else:
                    position_ids = positions_from_doc_ids(doc_ids)
            backend = resolve_backend(self.config.attn_backend, input_ids.device)
            # once per forward, shared by all layers
            mask: AttentionMask = build_attention_mask(doc_ids, backend, self.compute_dtype(input_ids.device))
        else:
            if doc_ids is not None:
                raise ValueError("doc_ids (packed rows) cannot be combined with a KV cache or attention_mask")
            past = cache.length if cache is not None else 0
            if attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
                raise ValueError(f"attention_mask must be [B, past + T] = {[b, past + t]}, "
                                 f"got {list(attention_mask.shape)}")
            if position_ids is None:
                if attention_mask is None:
                    position_ids = torch.arange(past, past + t, device=input_ids.device)[None]
                else:
                    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            mask = inference_mask(attention_mask, past, t, input_ids.device)
        body = self.model
        cos, sin = body.rotary_emb(position_ids)
        x = body.dropout(body.embed_tokens(input_ids))
        aux = torch.zeros((), device=input_ids.device)
        recompute = self.activation_checkpointing and cache is None and torch.is_grad_enabled()
        for i, layer in enumerate(body.layers):
            if recompute:
                x, layer_aux = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x, layer_aux = layer(x, cos, sin, mask, cache, i)
            if layer_aux is not None:
                aux = aux + layer_aux
        if cache is not None:
            cache.length += t
        if select is not None:
            hidden = body.norm(x.reshape(b * t, x.size(-1))[select])
            # a view, so the returned head has a grad_fn: DDP's unused-parameter search then sees it used
            return HeadInput(hidden, self.lm_head.weight.view_as(self.lm_head.weight), aux)
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(body.norm(x)).float()
        return ModelOutput(logits, aux)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the attention inputs have: autocast's on ``device`` when it is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.lm_head.weight.dtype

    # ---- reporting ------------------------------------------------------------------------------
    def num_params(self, trainable_only: bool = False) -> int:
        """Unique parameters (a tied embedding/head counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def param_breakdown(self) -> dict[str, int]:
        """Parameters by component: embedding, attention, mlp (router + experts), norms, head."""
        out = dict.fromkeys(("embedding", "attention", "mlp", "norm", "lm_head"), 0)
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            key = ("embedding" if "embed_tokens" in name else "lm_head" if name.startswith("lm_head")
                   else "attention" if ".self_attn." in name else "mlp" if ".mlp." in name else "norm")
            out[key] += p.numel()
        return out

    def summary(self, seq_len: int | None = None) -> str:
        """A few human-readable lines: shape, parameter counts, FLOPs per token."""
        c = self.config
        seq_len = seq_len or c.max_position_embeddings
        parts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in self.param_breakdown().items() if v)
        lines = [
            f"TinyLM: {c.num_hidden_layers} layers, hidden {c.hidden_size}, ffn {c.intermediate_size}, "
            f"heads {c.num_attention_heads}/{c.num_key_value_heads} kv, head_dim {c.head_dim}, "
            f"vocab {c.vocab_size}, tied {c.tie_word_embeddings}",
            f"params: {self.num_params() / 1e6:.2f}M ({parts})",
        ]
        if c.is_moe:
            lines.append(f"moe: {c.num_experts} experts top-{c.num_experts_per_tok} + {c.n_shared_experts} "
                         f"shared; active params/token {c.num_params(active=True) / 1e6:.2f}M")
        lines.append(f"train FLOPs/token @ T={seq_len}: {c.flops_per_token(seq_len) / 1e6:.1f} MFLOP")
        return "\n".join(lines)
