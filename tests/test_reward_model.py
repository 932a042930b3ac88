"""--reward-model (train/reward_model.py): a transformers sequence classifier as a reward, checked against a
direct forward; folders that are not reward models are one line; a GRPO step with only a reward model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from core.tokenizer import load_tokenizer
from model import ModelConfig, TinyLM
from train.checkpoint import Checkpoint
from train.metrics import read_metrics
from train.reward_model import RewardModel, RewardModelError, parse_spec, reward_models
from train.rewards import score
from train.run import main

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer"
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[{"role": "user", "content": "What is 2+3?"}],
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number, please."}],
           [{"role": "user", "content": "Hi"}]]
COMPLETIONS = [[{"role": "assistant", "content": "5"}],
               [{"role": "assistant", "content": "Seven is prime; so is eleven, and thirteen too."}],
               "A plain string completion"]


def tiny_classifier(folder: Path, architecture: str = "LlamaForSequenceClassification", labels: int = 1) -> Path:
    """A random tiny Llama reward model with tinylm's tokenizer (and its chat template), saved to ``folder``."""
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, num_labels=labels,
                                      pad_token_id=tokenizer.pad_token_id)
    cls = getattr(transformers, architecture)
    cls(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory) -> Path:
    return tiny_classifier(tmp_path_factory.mktemp("rm") / "tiny_rm")


def test_reward_equals_a_direct_transformers_forward(rm_folder):
    rm = RewardModel(parse_spec(f"{rm_folder}@0.5"), "cpu", batch_size=2)  # batches of 2: padding is exercised
    got = rm(PROMPTS, COMPLETIONS)
    tokenizer = transformers.AutoTokenizer.from_pretrained(rm_folder)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(rm_folder).eval()
    texts = [tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c if isinstance(c, str)
                                                 else c[0]["content"]}], tokenize=False)
             for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    assert texts[0].endswith("<|im_start|>assistant\n5<|im_end|>\n")
    with torch.no_grad():
        want = [model(**tokenizer(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item()
                for t in texts]
    assert len(set(want)) == 3
    assert got == pytest.approx(want, abs=1e-5)
    assert all(not p.requires_grad for p in rm.model.parameters()) and not rm.model.training
    # as a weighted reward beside the others
    [reward] = reward_models([f"{rm_folder}@0.5"], "cpu")
    totals, each = score([reward], PROMPTS, COMPLETIONS, {})
    assert reward.name == "rm_tiny_rm" and each["rm_tiny_rm"] == pytest.approx(want, abs=1e-5)
    assert totals == pytest.approx([0.5 * w for w in want], abs=1e-5)
    sig = RewardModel(parse_spec(str(rm_folder)), "cpu", norm="sigmoid")(PROMPTS, COMPLETIONS)
    assert sig == pytest.approx([1 / (1 + math.exp(-w)) for w in want], abs=1e-5)


def test_tool_turns_are_context_the_reward_model_does_not_see(rm_folder):
    rm = RewardModel(parse_spec(str(rm_folder)), "cpu")
    trajectory = [{"role": "assistant", "content": "Let me compute. "},
                  {"role": "tool", "content": '{"result": "5"}'}, {"role": "assistant", "content": "It is 5."}]
    assert rm.texts(PROMPTS[:1], [trajectory]) == rm.texts(PROMPTS[:1], ["Let me compute. It is 5."])


def test_folders_that_are_not_reward_models_are_one_line(tmp_path):
    causal = tiny_classifier(tmp_path / "causal", "LlamaForCausalLM")
    with pytest.raises(RewardModelError, match="is not a sequence classifier") as e:
        parse_spec(str(causal))
    assert "\n" not in str(e.value)
    two = tiny_classifier(tmp_path / "two", labels=2)
    with pytest.raises(RewardModelError, match="has 2 labels"):
        parse_spec(str(two))
    with pytest.raises(RewardModelError, match="has no config.json"):
        parse_spec(str(tmp_path / "missing"))


def test_a_run_with_only_a_reward_model(rm_folder, tmp_path, capsys):
    torch.manual_seed(0)
    init = Checkpoint.of(TinyLM(ModelConfig.from_preset("tiny")), load_tokenizer(TOKENIZER),
                         stage="sft").save(tmp_path / "init")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ("one", "two")), encoding="utf-8")
    common = ["--stage", "grpo", "--prompts", str(prompts), "--init-from", str(init), "--group-size", "2",
              "--prompts-per-step", "2", "--max-new-tokens", "6", "--grad-accum", "1", "--log-every", "1",
              "--save-every", "0", "--no-progress", "--max-steps", "1"]
    assert main([*common, "--out", str(tmp_path / "run"), "--reward-model", str(rm_folder)]) == 0
    [record] = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert math.isfinite(record["reward/rm_tiny_rm"]) and record["reward"] == record["reward/rm_tiny_rm"]
    causal = tiny_classifier(tmp_path / "causal", "LlamaForCausalLM")
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "bad"), "--reward-model", str(causal)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a sequence classifier" in err[0], err
    assert not (tmp_path / "bad").exists()


def test_bin_eval_scores_prompts_with_a_reward_model(rm_folder, tmp_path):
    from serve.evaluate import RewardOptions, reward_metrics
    from train.loading import load_model
    torch.manual_seed(0)
    init = Checkpoint.of(TinyLM(ModelConfig.from_preset("tiny")), load_tokenizer(TOKENIZER),
                         stage="sft").save(tmp_path / "init")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "one"}) + "\n", encoding="utf-8")
    opts = RewardOptions((), samples=2, batch=1, max_new_tokens=4, reward_models=(f"{rm_folder}@2",))
    record = reward_metrics(load_model(init), prompts, opts, torch.device("cpu"), quiet=True)
    assert record["rewards"] == [f"reward-model:{rm_folder}@2"]
    assert math.isfinite(record["reward_metrics"]["reward"])
    with pytest.raises(RewardModelError, match="is not a sequence classifier"):
        RewardOptions((), reward_models=(str(tiny_classifier(tmp_path / "causal", "LlamaForCausalLM")),))
