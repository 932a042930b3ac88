"""lm-evaluation-harness's ``local-completions`` model against bin/serve gives the multiple-choice numbers that
``bin/eval --lm-eval`` computes in-process (the harness scores choices from ``echo`` + ``logprobs``).

Offline: the harness tokenizes with the checkpoint's own tokenizer folder (``data/tokenizer``, read by
transformers from disk); skipped when the harness, transformers or the harness's API extra
(``lm-eval[api]``: aiohttp, requests, tenacity) is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_serve import Server

from core.tokenizer import load_tokenizer
from model import ModelConfig, TinyLM
from train.checkpoint import Checkpoint
from train.loading import load_model

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
for _package in ("aiohttp", "requests", "tenacity"):  # lm-eval[api]: what its API models need
    pytest.importorskip(_package)

from lm_eval.tasks import TaskManager  # noqa: E402

from serve.lm_eval_adapter import HarnessModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer"
TASKS = ROOT / "tests" / "fixtures" / "lm_eval"
LL_TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


def test_local_completions_against_the_server_match_in_process(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(3)
    model = TinyLM(ModelConfig.from_preset("tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    Checkpoint.of(model, load_tokenizer(TOKENIZER / "tokenizer.json"), step=5, stage="sft").save(tmp_path / "run")
    server = Server(tmp_path / "run").wait()
    try:
        manager = TaskManager(include_path=str(TASKS), include_defaults=False)
        common = dict(tasks=["tinylm_mc"], task_manager=manager, log_samples=True, bootstrap_iters=0)
        ours = lm_eval.simple_evaluate(model=HarnessModel(load_model(tmp_path / "run"), batch_size=4, progress=False),
                                       **common)
        served = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url={server.base}/v1/completions,model=tinylm,tokenizer_backend=huggingface,"
                       f"tokenizer={TOKENIZER},max_retries=1,num_concurrent=1", **common)
    finally:
        server.stop()

    def responses(out: dict) -> list:
        return [s["resps"] for s in sorted(out["samples"]["tinylm_mc"], key=lambda s: s["doc_id"])]

    a, b = responses(ours), responses(served)
    assert len(a) == len(b) > 0
    for doc_a, doc_b in zip(a, b, strict=True):
        assert len(doc_a) == len(doc_b) > 1
        for (ra,), (rb,) in zip(doc_a, doc_b, strict=True):  # (log-likelihood, is greedy) per choice
            assert ra[0] == pytest.approx(rb[0], abs=LL_TOLERANCE) and ra[1] == rb[1]
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tinylm_mc"][metric] == served["results"]["tinylm_mc"][metric]
