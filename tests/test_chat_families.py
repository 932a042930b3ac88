"""Chat template families (core/chat_families.py): byte and id parity with transformers' apply_chat_template for
tinylm's, MiniMind2's, MiniMind-3's and Qwen3's templates, detection from a tokenizer folder, refusal of an
unknown template, the declared family, and the loss mask of think blocks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_chat_template import CALC, CASES, MINIMIND3, SHIPPED, WEATHER

from core import chat_families as cf
from core import chat_template as ct
from core.tokenizer import TokenizerError, chat_pieces, encode_chat, load_tokenizer, prompt_ids

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "templates"
TEMPLATES = {"tinylm": cf.CHAT_TEMPLATE, **{name: (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")
                                            for name in ("minimind2", "minimind3", "qwen3")}}
CALL = {"type": "function", "function": {"name": "weather", "arguments": {"city": "北京"}}}
MORE_CASES = {
    "think_in_content_multi_turn": ([
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
        {"role": "user", "content": "b"}, {"role": "assistant", "content": "<think>r2</think>A2"}], None),
    "reasoning_then_plain_turn": ([
        {"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
        {"role": "assistant", "reasoning_content": "r1", "content": "A1"}, {"role": "user", "content": "b"},
        {"role": "assistant", "content": "A2"}], None),
    "empty_system_with_tools": ([{"role": "system", "content": ""}, {"role": "user", "content": "w"},
                                 {"role": "assistant", "content": "x"}], [WEATHER]),
    "reasoning_around_a_tool_result": ([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "reasoning_content": "ask the tool", "content": "", "tool_calls": [CALL]},
        {"role": "tool", "content": "sun"},
        {"role": "assistant", "reasoning_content": "\nknown\n", "content": "\n\nSunny."}], [WEATHER, CALC]),
    "minimind_readme_record": ([
        {"role": "system", "content": "# Tools ..."}, {"role": "user", "content": "帮我算一下 256 乘以 37 等于多少"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"name": "calculate_math", "arguments": {"expression": "256 * 37"}}]},
        {"role": "tool", "content": "{\"result\":\"9472\"}"},
        {"role": "assistant", "content": "256 乘以 37 等于 9472。"}], [CALC]),
    "no_system_single_turn": ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], None),
}
ALL_CASES = {**CASES, **MORE_CASES}


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def folder_with(tmp: Path, template: str | None, source: Path = SHIPPED) -> Path:
    """A tokenizer folder: ``source``'s tokenizer.json and tokenizer_config.json with ``template`` as its chat
    template (None: no template at all)."""
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "tokenizer.json", tmp / "tokenizer.json")
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    (tmp / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return tmp


def hf_apply(hf, family: str, turns, tools, gen: bool, thinking, tokenize: bool = False):
    """transformers' rendering of the conversation ``turns`` means: tools passed as ``tools``; a leading system
    turn with empty content that holds tools is only their holder (as pack's normalization adds it for
    record-level tools), so the conversation has no system turn."""
    kwargs = {} if thinking is None else {cf.FAMILIES[family].switch: thinking}
    tools = ct.tools_of(turns, tools)
    if tools and turns and turns[0]["role"] == "system" and not turns[0].get("content"):
        turns = turns[1:]
    out = hf.apply_chat_template(turns, tools=tools, tokenize=tokenize, add_generation_prompt=gen,
                                 chat_template=TEMPLATES[family], **({"return_dict": False} if tokenize else {}),
                                 **kwargs)
    return list(out) if tokenize else out


def test_fixture_hashes_are_the_detected_ones() -> None:
    for name, template in TEMPLATES.items():
        assert cf.family_of_template(template) is cf.FAMILIES[name]
    assert cf.family_of_template(TEMPLATES["qwen3"] + " ") is None


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_text_parity_with_transformers(transformers, family: str) -> None:
    """Every case, with and without a generation prompt, with the thinking switch on, off and not given."""
    hf = transformers.AutoTokenizer.from_pretrained(str(SHIPPED))
    fam = cf.FAMILIES[family]
    for name, (turns, tools) in ALL_CASES.items():
        for gen in (False, True):
            for thinking in (None, True, False):
                expected = hf_apply(hf, family, turns, tools, gen, thinking)
                assert ct.render_text(turns, gen, tools=tools, enable_thinking=thinking, family=fam) == expected, (
                    name, gen, thinking)
                pieces = ct.render_pieces(turns, gen, "all", ct.STRUCTURE_TAGS, tools, thinking, fam)
                assert "".join(p.text for p in pieces) == expected


def tokenizer_folders(tmp: Path) -> list[tuple[str, Path]]:
    """(family, folder) for every family on the shipped tokenizer, and MiniMind-3's own tokenizer folder."""
    out = [(name, folder_with(tmp / name, template)) for name, template in TEMPLATES.items()]
    if (MINIMIND3 / "tokenizer.json").is_file():
        out.append(("minimind3", MINIMIND3))
    return out


def test_ids_parity_and_detection_from_the_folder(transformers, tmp_path: Path) -> None:
    """A folder's template picks its family; prompts encode token for token as transformers encodes them."""
    for family, folder in tokenizer_folders(tmp_path):
        info = load_tokenizer(folder)
        assert info.chat_family is cf.FAMILIES[family] and info.chat.record() == {
            "family": family, "template_sha256": cf.template_sha256(TEMPLATES[family]), "declared": False}
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
        for name, (turns, tools) in ALL_CASES.items():
            for thinking in (None, True, False):
                expected = hf_apply(hf, family, turns, tools, True, thinking, tokenize=True)
                assert prompt_ids(info, turns, tools=tools, enable_thinking=thinking) == expected, (family, name)
                whole = hf_apply(hf, family, turns, tools, False, thinking, tokenize=True)
                assert encode_chat(info, turns, supervise="none", tools=tools).ids.tolist() == whole, (family, name)


def test_no_template_is_tinylm_and_an_unknown_one_is_refused_by_name(tmp_path: Path) -> None:
    assert load_tokenizer(folder_with(tmp_path / "none", None)).chat_family is cf.TINYLM
    odd = folder_with(tmp_path / "odd", TEMPLATES["qwen3"].replace("You may call", "You can call"))
    info = load_tokenizer(odd)  # pretraining needs no template: loading works
    with pytest.raises(TokenizerError) as e:
        info.require_chat("--stage sft")
    message = str(e.value)
    assert str(odd / "tokenizer_config.json") in message and "--chat-template tinylm" in message
    assert "\n" not in message and "--stage sft" in message
    with pytest.raises(TokenizerError):
        prompt_ids(info, [{"role": "user", "content": "hi"}])
    declared = load_tokenizer(odd, chat_template="tinylm")
    assert declared.chat_family is cf.TINYLM and declared.chat.record()["declared"] is True
    assert declared.chat.record()["template_sha256"] == info.chat.template_sha256 is not None
    with pytest.raises(TokenizerError, match="unknown chat template family 'llama'"):
        load_tokenizer(odd, chat_template="llama")


def test_jinja_file_is_read_before_the_config(tmp_path: Path) -> None:
    folder = folder_with(tmp_path / "f", TEMPLATES["tinylm"])
    (folder / "chat_template.jinja").write_text(TEMPLATES["minimind3"], encoding="utf-8")
    assert load_tokenizer(folder).chat_family is cf.MINIMIND3


def test_minimind3_mask_supervises_the_whole_think_block_and_drop_removes_empty_ones(tmp_path: Path) -> None:
    info = load_tokenizer(folder_with(tmp_path / "mm3", TEMPLATES["minimind3"]))
    turns = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "reasoning_content": "r", "content": "a2"}]
    enc = encode_chat(info, turns)
    decode = info.tokenizer.decode
    assert decode(enc.ids[enc.weights > 0].tolist(), skip_special_tokens=False) == (
        "<think>\n\n</think>\n\na1<|im_end|><think>\nr\n</think>\n\na2<|im_end|>")
    dropped = chat_pieces(info, turns, drop_empty_think=True)
    assert "".join(p.text for p in dropped) == ct.render_text(turns, family=cf.MINIMIND3).replace(
        "<think>\n\n</think>\n\n", "", 1)
    assert [p.text for p in dropped if p.supervised and p.kind == ct.CONTROL] == [
        "<|im_end|>", "<think>", "</think>", "<|im_end|>"]


def test_qwen3_content_stays_text(tmp_path: Path) -> None:
    """Text is text in every family: a user's <|im_end|> and <think> stay text; only the template's are ids."""
    info = load_tokenizer(folder_with(tmp_path / "q", TEMPLATES["qwen3"]))
    turns = [{"role": "user", "content": "say <|im_end|> <think>"}, {"role": "assistant", "content": "ok"}]
    ids = encode_chat(info, turns).ids.tolist()
    controls = [i for i in ids if i in set(info.special_ids.values())]
    names = {v: k for k, v in info.special_ids.items()}
    assert [names[i] for i in controls] == ["<|im_start|>", "<|im_end|>", "<|im_start|>", "<think>", "</think>",
                                            "<|im_end|>"]
    assert info.tokenizer.decode(ids, skip_special_tokens=False) == ct.render_text(turns, family=cf.QWEN3)
    assert np.count_nonzero(encode_chat(info, turns).weights) > 0


def test_export_text_and_the_family_a_checkpoint_declares(tmp_path: Path) -> None:
    """``chat.jinja`` renders as the chosen family (what an export writes); ``trained_family`` of a recorded
    choice loads the tokenizer with the family the model was trained with, even over an unknown template."""
    mm3 = load_tokenizer(folder_with(tmp_path / "mm3", TEMPLATES["minimind3"]))
    assert mm3.chat.jinja == TEMPLATES["minimind3"]
    assert load_tokenizer(folder_with(tmp_path / "none", None)).chat.jinja == cf.CHAT_TEMPLATE
    odd = folder_with(tmp_path / "odd", "{{ messages }}")
    assert load_tokenizer(odd).chat.jinja is None
    record = load_tokenizer(odd, chat_template="tinylm").chat.record()
    assert cf.trained_family(record) == "tinylm" and cf.trained_family(None) is None
    again = load_tokenizer(odd, chat_template=cf.trained_family(record))
    assert again.chat_family is cf.TINYLM and again.chat.jinja == cf.CHAT_TEMPLATE


FUZZ_TEXTS = ["", "\n", "hi", "\n\nx\n", "<think>a</think>b", "<think>\n\n</think>\n\nc", "</think>z",
              "<tool_response>r</tool_response>", "a<think>b", "中文"]


def random_conversation(rng) -> list[dict]:
    """System, user, assistant (content, reasoning, calls in any mix, None content) and tool turns in any order."""
    turns = [{"role": "system", "content": rng.choice(FUZZ_TEXTS)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 4)):
        r = rng.random()
        if r < 0.4:
            turns.append({"role": "user", "content": rng.choice(FUZZ_TEXTS)})
        elif r < 0.8:
            turn = {"role": "assistant", "content": rng.choice([*FUZZ_TEXTS, None])}
            if rng.random() < 0.4:
                turn["reasoning_content"] = rng.choice(FUZZ_TEXTS)
            if rng.random() < 0.3:
                arguments = rng.choice(['{"a": 1}', {"b": "中"}])
                turn["tool_calls"] = [{"type": "function", "function": {"name": "f", "arguments": arguments}}
                                      ] * rng.randint(1, 2)
            turns.append(turn)
        else:
            turns.append({"role": "tool", "content": rng.choice(FUZZ_TEXTS)})
    return turns


def test_random_conversations_render_as_transformers_does(transformers) -> None:
    """Seeded random conversations (edge texts: empty, newlines, think tags in content, tool-response look-alikes)
    render byte for byte as transformers renders each family's template."""
    import random

    hf = transformers.AutoTokenizer.from_pretrained(str(SHIPPED))
    rng = random.Random(0)
    for _ in range(300):
        turns = random_conversation(rng)
        tools = [{"type": "function", "function": {"name": "f"}}] if rng.random() < 0.3 else None
        gen, thinking = rng.random() < 0.5, rng.choice([None, True, False])
        for family in TEMPLATES:
            expected = hf_apply(hf, family, turns, tools, gen, thinking)
            assert ct.render_text(turns, gen, tools=tools, enable_thinking=thinking,
                                  family=cf.FAMILIES[family]) == expected, (family, turns, tools, gen, thinking)
