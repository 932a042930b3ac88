"""model/: packed == unpacked for both attention backends, 1:1 load into transformers' Llama, MoE, config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import PRESETS, ModelConfig, TinyLM
from model.attention import dense_document_mask, positions_from_doc_ids
from model.config import ConfigError, parse_overrides
from model.transformer import MLP, MoE, state_shapes

# Two packed rows: documents of different lengths, then padding (doc id -1).
ROWS = [[7, 13, 11], [15, 5, 12, 3]]
SEQ = 40


def tiny(**overrides) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(ModelConfig.from_preset("tiny", **overrides)).eval()


def packed_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    """ids, doc_ids, position_ids [2, SEQ] and, per row, each document's tokens."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (len(ROWS), SEQ), generator=gen)
    doc_ids = torch.full((len(ROWS), SEQ), -1)
    positions = torch.zeros(len(ROWS), SEQ, dtype=torch.long)
    docs: list[list[torch.Tensor]] = []
    for r, lengths in enumerate(ROWS):
        start, row_docs = 0, []
        for d, n in enumerate(lengths):
            doc_ids[r, start:start + n] = d
            positions[r, start:start + n] = torch.arange(n)
            row_docs.append(ids[r, start:start + n])
            start += n
        positions[r, start:] = torch.arange(SEQ - start)
        docs.append(row_docs)
    return ids, doc_ids, positions, docs


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe", "tiny-qwen3"])
@pytest.mark.parametrize("backend", ["sdpa", "flex", "docs"])
def test_packed_rows_equal_documents_alone(backend: str, preset: str) -> None:
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset(preset, attn_backend=backend)).eval()
    ids, doc_ids, positions, docs = packed_batch(model.config.vocab_size)
    with torch.no_grad():  # CPU FlexAttention is inference-only
        packed = model(ids, position_ids=positions, doc_ids=doc_ids).logits
        derived = model(ids, doc_ids=doc_ids).logits  # positions derived from doc_ids
        assert torch.isfinite(packed).all()  # padding rows attend among themselves: no NaN
        assert torch.equal(packed, derived)
        for r, row_docs in enumerate(docs):
            start = 0
            for doc in row_docs:
                alone = model(doc[None]).logits[0]
                diff = (packed[r, start:start + len(doc)] - alone).abs().max().item()
                assert diff < 1e-5, f"row {r} doc at {start}: max abs diff {diff}"
                start += len(doc)


def test_packed_backends_agree_and_sdpa_trains() -> None:
    model = tiny()
    ids, doc_ids, _, _ = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        model.config.attn_backend = "flex"
        flex = model(ids, doc_ids=doc_ids).logits
    model.config.attn_backend = "sdpa"
    sdpa = model(ids, doc_ids=doc_ids).logits
    assert (flex - sdpa).abs().max().item() < 1e-5
    sdpa.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    model.config.attn_backend = "flex"
    with pytest.raises(NotImplementedError, match="no backward on CPU"):
        model(ids, doc_ids=doc_ids)


@pytest.mark.parametrize("preset", ["tiny", "tiny-moe"])
def test_per_document_attention_equals_dense_mask_with_gradients(preset: str) -> None:
    """The CPU default ("docs": one causal call per document) computes the dense-mask function: logits and
    every weight gradient of a packed batch agree (< 1e-5 in float32; gradients < 1e-9 in float64)."""
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset(preset, dropout=0.0))
    ids, doc_ids, _, _ = packed_batch(model.config.vocab_size)
    with torch.no_grad():
        model.config.attn_backend = "sdpa"
        dense32 = model(ids, doc_ids=doc_ids).logits
        model.config.attn_backend = "docs"
        assert (model(ids, doc_ids=doc_ids).logits - dense32).abs().max().item() < 1e-5
    model.double()
    results = {}
    for backend in ("sdpa", "docs"):
        model.config.attn_backend = backend
        model.zero_grad(set_to_none=True)
        logits = model(ids, doc_ids=doc_ids).logits
        (logits * torch.linspace(-1, 1, logits.size(-1))).sum().backward()
        results[backend] = (logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()})
    (dense, dense_grads), (docs, docs_grads) = results["sdpa"], results["docs"]
    assert (dense - docs).abs().max().item() < 1e-5
    for k, g in dense_grads.items():
        assert (g - docs_grads[k]).abs().max().item() < 1e-9, k
    model.config.attn_backend = "auto"
    assert torch.equal(model(ids, doc_ids=doc_ids).logits, docs)  # auto on CPU is docs


def test_positions_and_dense_mask() -> None:
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    mask = dense_document_mask(doc_ids)[0, 0]
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask[7].tolist() == [False] * 6 + [True, True]
    assert mask.sum(-1).min() >= 1  # every query sees at least itself


def hf_llama(cfg: ModelConfig):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        hidden_act="silu", attention_dropout=0.0, attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize(("tied", "kv_heads"), [(True, 2), (False, 2), (True, 1), (False, 4)])
def test_state_dict_loads_into_transformers_llama(tied: bool, kv_heads: int) -> None:
    ours = tiny(tie_word_embeddings=tied, num_key_value_heads=kv_heads, rope_theta=1e4)
    hf = hf_llama(ours.config)
    hf.load_state_dict(ours.state_dict(), strict=True)
    assert set(hf.state_dict()) == set(ours.state_dict())
    ids = torch.randint(0, ours.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits.float()
        mine = ours(ids).logits
    assert mine.dtype == torch.float32 and mine.shape == (2, 33, ours.config.vocab_size)
    assert (mine - theirs).abs().max().item() < 1e-4
    if tied:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight
        assert ours.num_params() == ours.config.num_params()


def test_moe_aux_loss_and_router_gets_lm_gradient() -> None:
    torch.manual_seed(0)
    model = TinyLM(ModelConfig.from_preset("tiny-moe")).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    out = model(ids)
    assert torch.isfinite(out.aux_loss) and out.aux_loss.item() > 0
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    ce.backward()  # without the aux loss
    router = model.model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum().item() > 0
    assert tiny().forward(ids).aux_loss.item() == 0.0


def test_moe_dispatch_matches_per_token_reference() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", num_experts=4, num_experts_per_tok=2)
    moe = MoE(cfg)
    for m in moe.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=0.2)
    x = torch.randn(3, 5, cfg.hidden_size)
    y, _ = moe(x)
    for b in range(3):
        for t in range(5):
            p = moe.gate(x[b, t]).softmax(-1)
            w, i = p.topk(2)
            w = w / w.sum()
            ref = sum(w[k] * moe.experts[int(i[k])](x[b, t]) for k in range(2)) + moe.shared_experts(x[b, t])
            assert torch.allclose(y[b, t], ref, atol=1e-5)
    assert isinstance(moe.shared_experts, MLP) and moe.shared_experts.up_proj.out_features == cfg.intermediate_size


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_counts(name: str) -> None:
    cfg = ModelConfig.from_preset(name)
    with torch.device("meta"):
        model = TinyLM(cfg)
    assert model.num_params() == cfg.num_params()
    if name == "small":
        assert 25e6 <= cfg.num_params() <= 27e6
        assert cfg.intermediate_size == 1408
    if name == "tiny":
        assert cfg.num_params() < 1e6
    if name == "base":
        assert 100e6 <= cfg.num_params() <= 108e6
    if name == "minimind3":  # minimind-3's published count
        assert cfg.num_params() == 63_912_192 and cfg.head_dim == 96 and cfg.qk_norm
    if name == "tiny-qwen3":
        assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
        assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 32, 64)


def test_head_dim_derived_unless_given() -> None:
    cfg = ModelConfig.from_preset("tiny")
    assert cfg.head_dim == 16 and cfg.override(["hidden_size=128"]).head_dim == 32
    explicit = ModelConfig.from_preset("tiny-qwen3")
    assert explicit.override(["hidden_size=128"]).head_dim == 32  # stated: kept
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("head_dim", "qk_norm")}  # an older checkpoint
    assert ModelConfig.from_dict(old) == cfg
    with pytest.raises(ValueError, match="not divisible by num_attention_heads 3 .give head_dim"):
        ModelConfig.from_preset("tiny", num_attention_heads=3, num_key_value_heads=1)
    assert ModelConfig.from_preset("tiny", num_attention_heads=3, num_key_value_heads=1, head_dim=8).head_dim == 8
    with pytest.raises(ValueError, match="head_dim 7 must be even"):
        ModelConfig.from_preset("tiny", head_dim=7)


def test_qk_norm_normalises_each_head_before_rope() -> None:
    """q_norm / k_norm change the function (a scaled q_proj gives the same logits: per-head RMS invariance)."""
    m = tiny(rms_norm_eps=1e-12)  # so that eps does not blur the scale invariance
    q = tiny(qk_norm=True, rms_norm_eps=1e-12)
    q.load_state_dict({**q.state_dict(), **m.state_dict()})
    ids = torch.randint(0, 6400, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = q(ids).logits
        for layer in q.model.layers:
            layer.self_attn.q_proj.weight.mul_(7.0)
            layer.self_attn.k_proj.weight.mul_(0.2)
        after = q(ids).logits
        assert (before - after).abs().max().item() < 1e-4
        assert (m(ids).logits - before).abs().max().item() > 1e-3


def test_flops_per_token() -> None:
    cfg = ModelConfig.from_preset("small")
    n, layers, heads, hd = cfg.num_params(), 8, 8, 64
    assert cfg.flops_per_token(512) == 6 * n + 12 * layers * heads * hd * 512
    untied = cfg.override(["tie_word_embeddings=false"])
    assert untied.flops_per_token(512) == cfg.flops_per_token(512)  # the input lookup costs no matmul
    moe = ModelConfig.from_preset("small-moe")
    assert moe.num_params(active=True) < moe.num_params()


def test_config_errors_and_overrides() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny.*small"):
        ModelConfig.from_preset("huge")
    with pytest.raises(ValueError, match="unknown ModelConfig field.*hiden_size"):
        ModelConfig.from_preset("small", hiden_size=3)
    with pytest.raises(ValueError, match="unknown ModelConfig field.*n_layer"):
        parse_overrides(["n_layer=4"])
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["hidden_size"])
    with pytest.raises(ValueError, match="expected int"):
        parse_overrides(["hidden_size=abc"])
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelConfig.from_preset("small", num_key_value_heads=3)

    assert parse_overrides(["hidden_size=256", "dropout=0.1", "tie_word_embeddings=false", "rope_theta=1e4",
                            "intermediate_size=none", "attn_backend=sdpa"]) == {
        "hidden_size": 256, "dropout": 0.1, "tie_word_embeddings": False, "rope_theta": 1e4,
        "intermediate_size": None, "attn_backend": "sdpa"}
    cfg = ModelConfig.from_preset("small").override(["hidden_size=256", "num_hidden_layers=4"])
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (256, 704, 4)
    kept = ModelConfig.from_preset("small", intermediate_size=1000).override(["hidden_size=256"])
    assert kept.intermediate_size == 1000
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_embd": 3})


def test_dropout_only_in_training() -> None:
    model = tiny(dropout=0.2)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("tied", [True, False])
def test_qk_norm_state_dict_loads_into_transformers_qwen3(tied: bool) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = TinyLM(ModelConfig.from_preset("tiny-qwen3", tie_word_embeddings=tied, initializer_range=0.2)).eval()
    with torch.no_grad():
        for layer in ours.model.layers:  # non-trivial norm weights, so a mis-mapped norm shows
            layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
            layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    c = ours.config
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=tied,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta}, attn_implementation="eager")).eval()
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids = torch.randint(0, c.vocab_size, (2, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(ids).logits - hf(input_ids=ids).logits.float()).abs().max().item() < 1e-4


@pytest.mark.parametrize(("field", "value", "words"), [
    ("rms_norm_eps", "abc", "expected a number, got 'abc'"),
    ("rms_norm_eps", None, "expected a number, got None"),
    ("rms_norm_eps", float("nan"), "must be finite"),
    ("rms_norm_eps", 0.0, "must be finite and in (0, 1)"),
    ("rope_theta", float("inf"), "must be finite"),
    ("rope_theta", -1.0, "must be finite and in (0, inf)"),
    ("initializer_range", [1], "expected a number, got [1]"),
    ("moe_aux_loss_coef", float("nan"), "must be finite"),
    ("dropout", 1.0, "must be finite and in [0, 1)"),
    ("num_hidden_layers", 10**9, "must be in [1, 1024]"),
    ("max_position_embeddings", 10**12, "must be in [1, 16777216]"),
    ("vocab_size", 10**5000, "must be in [1, 16777216], got an integer of about 5001 digits"),
    ("hidden_size", 64.0, "expected an integer, got 64.0"),
    ("tie_word_embeddings", 1, "expected true or false, got 1"),
    ("attn_backend", ["auto"], "must be one of"),
], ids=lambda v: repr(v)[:30] if not isinstance(v, int) else str(v.bit_length()))
def test_every_config_field_is_type_finiteness_and_range_checked(field, value, words) -> None:
    """One place checks every field (every source builds its config through it); the error names the field
    and stays short whatever the value, and nothing is built."""
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_preset("tiny", **{field: value})
    assert info.value.field == field and words in info.value.message and len(str(info.value)) < 200, str(info.value)


def test_a_long_context_allocates_no_rope_table() -> None:
    """RoPE follows the positions run, not max_position_embeddings: a 16M-position model holds only its
    head_dim / 2 inverse frequencies, and its cos/sin at any position equal the closed form."""
    model = tiny(max_position_embeddings=2**24)
    assert sum(b.numel() for b in model.buffers()) == model.config.head_dim // 2
    positions = torch.tensor([[0, 5, 2**24 - 1]])
    cos, sin = model.model.rotary_emb(positions)
    d = model.config.head_dim
    inv = 1.0 / (model.config.rope_theta ** (torch.arange(0, d, 2).float() / d))
    angles = torch.cat((positions[0, :, None].float() * inv,) * 2, dim=-1)
    assert cos.shape == (1, 1, 3, d) and torch.equal(cos[0, 0], angles.cos()) and torch.equal(sin[0, 0], angles.sin())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_state_shapes_are_the_models_without_building_it(preset) -> None:
    cfg = ModelConfig.from_preset(preset)
    with torch.device("meta"):
        built = {k: tuple(v.shape) for k, v in TinyLM(cfg).state_dict().items()}
    assert state_shapes(cfg) == built
