"""bin/eval --lm-eval: the harness adapter gives the numbers of ``lm_eval --model hf`` on the exported folder of
the same checkpoint (local multiple-choice, generation and perplexity tasks, plain and chat-templated), stop
strings and special-token strings are handled as the HF model handles them, and bad input is one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.tokenizer import load_tokenizer
from model import ModelConfig, TinyLM
from serve.export import export
from train.checkpoint import Checkpoint
from train.loading import load_model

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from serve import lm_eval_run  # noqa: E402
from serve.lm_eval_adapter import HarnessModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "data" / "tokenizer" / "tokenizer.json"
TASKS = ROOT / "tests" / "fixtures" / "lm_eval"
CONTEXT = 32  # short: MC contexts are left-truncated and perplexity texts span several rolling windows
LL_TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory) -> tuple:
    """A random tiny checkpoint (weights far from init) and its ``bin/export --format hf`` folder."""
    root = tmp_path_factory.mktemp("lm_eval")
    torch.manual_seed(3)
    model = TinyLM(ModelConfig.from_preset("tiny", max_position_embeddings=CONTEXT))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    Checkpoint.of(model, load_tokenizer(TOKENIZER), step=5, stage="sft").save(root / "run")
    loaded = load_model(root / "run")
    export(loaded, "hf", root / "hf", "f32")
    return loaded, root / "hf"


@pytest.fixture(scope="module")
def hf_model(model_pair):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(model_pair[1]), dtype="float32", batch_size=4, device="cpu")


def evaluate_both(model_pair, tasks: list[str], chat: bool, fewshot: int | None = None) -> tuple[dict, dict]:
    loaded, folder = model_pair
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    common = dict(tasks=tasks, task_manager=manager, log_samples=True, apply_chat_template=chat, bootstrap_iters=0,
                  num_fewshot=fewshot)
    ours = lm_eval.simple_evaluate(model=HarnessModel(loaded, batch_size=4, progress=False), **common)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", batch_size=4,
                                     device="cpu", **common)
    return ours, theirs


def responses(out: dict, task: str) -> list[list]:
    return [[r for r in s["resps"]] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def assert_same_numbers(ours: dict, theirs: dict, tasks: list[str]) -> None:
    for task in tasks:
        a, b = responses(ours, task), responses(theirs, task)
        assert len(a) == len(b) > 0
        if task == "tinylm_gen":
            assert a == b  # greedy answers, character for character
            assert ours["results"][task]["exact_match,none"] == theirs["results"][task]["exact_match,none"]
            continue
        for doc_a, doc_b in zip(a, b, strict=True):
            for (ra,), (rb,) in zip(doc_a, doc_b, strict=True):
                if task == "tinylm_mc":  # (log-likelihood, is greedy) per choice
                    assert ra[0] == pytest.approx(rb[0], abs=LL_TOLERANCE) and ra[1] == rb[1]
                else:  # a whole text's rolling log-likelihood: a sum over its tokens
                    assert ra == pytest.approx(rb, abs=LL_TOLERANCE * 10)
        if task == "tinylm_mc":
            for metric in ("acc,none", "acc_norm,none"):
                assert ours["results"][task][metric] == theirs["results"][task][metric]


def test_adapter_matches_hf_model_on_local_tasks(model_pair):
    tasks = ["tinylm_mc", "tinylm_gen", "tinylm_ppl"]
    ours, theirs = evaluate_both(model_pair, tasks, chat=False)
    assert_same_numbers(ours, theirs, tasks)
    loaded = model_pair[0]
    texts = [json.loads(line)["text"] for line in (TASKS / "perplexity.jsonl").read_text().splitlines()]
    assert max(len(loaded.tokenizer.tokenizer.encode(t).ids) for t in texts) > CONTEXT  # several windows
    for metric in ("bits_per_byte,none", "byte_perplexity,none"):
        assert ours["results"]["tinylm_ppl"][metric] == pytest.approx(theirs["results"]["tinylm_ppl"][metric],
                                                                      rel=1e-6)


def test_adapter_matches_hf_model_with_chat_template_and_few_shot_turns(model_pair):
    tasks = ["tinylm_mc", "tinylm_gen"]
    ours, theirs = evaluate_both(model_pair, tasks, chat=True, fewshot=1)
    prompt = ours["samples"]["tinylm_gen"][0]["arguments"][0][0]
    assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_start|>assistant\n")
    assert prompt.count("<|im_start|>user\n") == 2  # the example is a turn of its own
    assert prompt == theirs["samples"]["tinylm_gen"][0]["arguments"][0][0]
    assert_same_numbers(ours, theirs, tasks)


def instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_special_strings_empty_context_and_continued_turns_as_hf(model_pair, hf_model):
    ours = HarnessModel(model_pair[0], batch_size=3, progress=False)
    pairs = [("", "Hello world"), ("Question: 1 + 1 = ", "2"), ("<|im_start|>user\nhi<|im_end|>\n", "<|im_start|>"),
             ("<think>", "</think> ok")]
    got, want = ours.loglikelihood(instances("loglikelihood", pairs)), hf_model.loglikelihood(
        instances("loglikelihood", pairs))
    for (a, ga), (b, gb) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=LL_TOLERANCE) and ga == gb
    ids = ours.tok_encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == model_pair[0].tokenizer.special_ids["<|im_start|>"]  # parsed, as the HF tokenizer does
    assert ids == hf_model.tok_encode("<|im_start|>user\nhi<|im_end|>")
    chat = [{"role": "user", "content": "2 + 2 = ?"}, {"role": "assistant", "content": "The answer is"}]
    for prompt in (True, False):
        assert ours.apply_chat_template(chat[:1] if prompt else chat, prompt) == hf_model.apply_chat_template(
            chat[:1] if prompt else chat, prompt)
    assert ours.apply_chat_template(chat, False).endswith("<|im_start|>assistant\nThe answer is")


def test_generation_stops_at_strings_as_hf(model_pair, hf_model):
    ours = HarnessModel(model_pair[0], batch_size=2, progress=False)
    contexts = ["Q: What is 2 + 2?\nA:", "你好，", "The"]
    free = ours.generate_until(instances("generate_until", [(c, {"until": [], "max_gen_toks": 10}) for c in contexts]))
    assert all(len(text) > 2 for text in free)
    stops = [text[len(text) // 2:][:2] for text in free]  # a string each answer meets halfway
    kwargs = [{"until": [s], "max_gen_toks": 10, "do_sample": False} for s in stops]
    requests = list(zip(contexts, kwargs, strict=True))
    got = ours.generate_until(instances("generate_until", requests))
    assert got == hf_model.generate_until(instances("generate_until", requests))
    assert got == [text.split(s)[0] for text, s in zip(free, stops, strict=True)]
    assert all(len(g) < len(t) for g, t in zip(got, free, strict=True))


# ---- the command line ------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bin" / "eval"), *args], capture_output=True, text=True,
                          env=env)


def test_cli_prints_table_and_appends_results(model_pair, tmp_path):
    loaded = model_pair[0]
    results = tmp_path / "results.jsonl"
    proc = run_cli("--ckpt", loaded.checkpoint.path, "--lm-eval", "tinylm_mc", "--lm-eval-include", str(TASKS),
                   "--limit", "4", "--batch-size", "2", "--results", str(results))
    assert proc.returncode == 0, proc.stderr
    assert "|tinylm_mc" in proc.stdout and "acc" in proc.stdout and str(results) in proc.stdout
    (record,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert record["ckpt"] == loaded.checkpoint.path and record["step"] == 5
    assert record["lm_eval"]["tasks"] == ["tinylm_mc"] and record["lm_eval"]["limit"] == 4
    scores = record["lm_eval_results"]["tinylm_mc"]
    assert scores["sample_len"] == 4 and 0.0 <= scores["acc,none"] <= 1.0


@pytest.mark.parametrize("case", ["unknown task", "missing include", "include is a file"])
def test_cli_bad_input_is_one_line_and_appends_nothing(model_pair, tmp_path, case):
    results = tmp_path / "results.jsonl"
    a_file = tmp_path / "tasks.yaml"
    a_file.write_text("task: x\n")
    tasks, include = {"unknown task": ("tinylm_mc,no_such_task_xyz", str(TASKS)),
                      "missing include": ("tinylm_mc", str(tmp_path / "absent")),
                      "include is a file": ("tinylm_mc", str(a_file))}[case]
    proc = run_cli("--ckpt", model_pair[0].checkpoint.path, "--lm-eval", tasks, "--lm-eval-include", include,
                   "--results", str(results))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bin/eval: error: ")
    assert ("no_such_task_xyz" if case == "unknown task" else include) in lines[0]
    assert not results.exists()


def test_missing_lm_eval_is_one_line_saying_how_to_install(model_pair, monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    call = lm_eval_run.HarnessCall(str(model_pair[0].checkpoint.path), "arc_easy", results=tmp_path / "r.jsonl",
                                   device="cpu")
    assert lm_eval_run.run_call(call) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bin/setup --eval" in err[0] and "pip install 'lm-eval[hf]'" in err[0]
    assert not (tmp_path / "r.jsonl").exists()


def test_eval_extra_and_dev_requirements_name_the_same_lm_eval():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["eval"]
    dev = [line.split("#")[0].strip() for line in (ROOT / "requirements-dev.txt").read_text().splitlines()]
    setup = (ROOT / "bin" / "setup").read_text()
    assert extra == [line for line in dev if line.startswith("lm-eval")]
    assert "--eval)" in setup and "requirements-dev.txt" in setup  # bin/setup --eval installs that line
