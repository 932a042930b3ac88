"""Chat template families: what differs between the templates tinylm renders, as data for one renderer.

Every family renders ChatML (``<|im_start|>{role}\\n{content}<|im_end|>\\n``) with an optional leading system
turn, a tools block in the system turn, ``<tool_call>`` blocks after assistant content, and each run of ``tool``
turns as one ``user`` turn of ``\\n<tool_response>\\n{content}\\n</tool_response>`` parts (the same wrapping in
every family). :class:`ChatFamily` holds what differs; ``core.chat_template.render_pieces`` reads it:

- the tools block's text (``tools_intro`` / ``tools_outro``);
- a default system turn when a conversation has neither a system turn nor tools (``default_system``);
- which assistant turns get a think block ``<think>\\n{reasoning}\\n</think>\\n\\n`` (``think``): ``"reasoning"``
  only those with reasoning_content (as given); ``"always"`` every turn (empty when there is no reasoning);
  ``"after_last_query"`` the turns after the last user query, the last one always, others only with reasoning;
  ``"never"``: reasoning_content is not rendered. ``"always"`` and ``"after_last_query"`` take the reasoning
  from a ``<think>…</think>`` prefix of the content when reasoning_content is not a string, and strip the
  reasoning's newlines and the content's leading ones in a block;
- how a call's name is written: as JSON (``call_name_json``) or verbatim between quotes;
- the keyword of the thinking switch (``switch``: ``enable_thinking`` / ``open_thinking``) and what the
  generation prompt adds after ``<|im_start|>assistant\\n`` for the switch off / on / not given.

A tokenizer directory's template is matched to a family by the sha256 of its text (:func:`choose_family`); a template
that matches none is refused by name, never guessed; a user may declare the family instead
(``--chat-template FAMILY``). No template at all means tinylm's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

THINK_BLOCKS = ("reasoning", "always", "after_last_query", "never")
OPEN_THINK, EMPTY_THINK = "<think>\n", "<think>\n\n</think>\n\n"

# The tools block of tinylm's system turn: TOOLS_INTRO, one JSON line per tool (each after a "\n"), TOOLS_OUTRO.
TOOLS_INTRO = ("# Tools\n\nYou can call functions to help with the request. Their JSON signatures are listed "
               "between <tools> and </tools>:\n<tools>")
TOOLS_OUTRO = ("\n</tools>\n\nTo call a function, reply with one block per call, each holding a JSON "
               "object with the function's name and its arguments:\n"
               '<tool_call>\n{"name": <function-name>, "arguments": <arguments-object>}\n</tool_call>')
# The tools block of Qwen3's template (and of MiniMind's, which copy it).
QWEN_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
                    "with function signatures within <tools></tools> XML tags:\n<tools>")
QWEN_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                    "within <tool_call></tool_call> XML tags:\n"
                    '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


# The Jinja form of render_text, written into tokenizer_config.json and chat_template.jinja for
# transformers / llama.cpp. ``tojson`` is transformers' filter: json.dumps(x, ensure_ascii=False).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(tools=none, prev='') %}"
    "{%- if tools is defined and tools is not none %}{%- set ns.tools = tools %}"
    "{%- elif messages and messages[0].role == 'system' and messages[0].tools is defined %}"
    "{%- set ns.tools = messages[0].tools %}{%- endif %}"
    "{%- if ns.tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role == 'system' and messages[0].content %}"
    "{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- " + json.dumps(TOOLS_INTRO) + " }}"
    "{%- for tool in ns.tools %}{{- '\\n' + tool | tojson }}{%- endfor %}"
    "{{- " + json.dumps(TOOLS_OUTRO) + " + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'tool' %}"
    "{%- if ns.prev != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content is string and message.reasoning_content %}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- content }}"
    "{%- for call in (message.tool_calls or []) %}"
    "{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- set function = call.function if call.function is defined else call %}"
    "{{- '<tool_call>\\n{\"name\": ' + function.name | tojson + ', \"arguments\": ' }}"
    "{%- if function.arguments is string %}{{- function.arguments }}{%- else %}{{- function.arguments | tojson }}"
    "{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif not (loop.first and message.role == 'system' and ns.tools) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns.prev = message.role %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is true %}{{- '<think>\\n' }}"
    "{%- elif enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


@dataclass(frozen=True)
class ChatFamily:
    """One template family (see the module docstring for each field's meaning)."""

    name: str
    tools_intro: str
    tools_outro: str
    think: str
    call_name_json: bool
    switch: str
    generation_think: dict  # the switch's value (None: not given) -> text after "<|im_start|>assistant\n"
    default_system: str | None = None
    template_sha256: tuple[str, ...] = field(default=())  # the template texts known to render this family

    def __post_init__(self) -> None:
        if self.think not in THINK_BLOCKS:
            raise ValueError(f"think must be one of {THINK_BLOCKS}, not {self.think!r}")

    def thinking_prompt(self, thinking: bool | None) -> str:
        """The text the generation prompt adds after ``<|im_start|>assistant\\n`` for the switch ``thinking``."""
        return self.generation_think[thinking]


TINYLM = ChatFamily("tinylm", TOOLS_INTRO, TOOLS_OUTRO, think="reasoning",
                    call_name_json=True, switch="enable_thinking",
                    generation_think={None: "", True: OPEN_THINK, False: EMPTY_THINK},
                    template_sha256=(hashlib.sha256(CHAT_TEMPLATE.encode("utf-8")).hexdigest(),))
MINIMIND2 = ChatFamily("minimind2", QWEN_TOOLS_INTRO, QWEN_TOOLS_OUTRO, think="never",
                       call_name_json=False, switch="enable_thinking",
                       generation_think={None: "", True: "", False: EMPTY_THINK},
                       default_system="You are a helpful assistant",
                       template_sha256=("4f57494cd38c0e4e50e27f4632fb6907414a68cc48d0bbc48da5449c596c69fa",))
MINIMIND3 = ChatFamily("minimind3", QWEN_TOOLS_INTRO, QWEN_TOOLS_OUTRO, think="always",
                       call_name_json=False, switch="open_thinking",
                       generation_think={None: EMPTY_THINK, True: OPEN_THINK, False: EMPTY_THINK},
                       template_sha256=("97c6a9ef3f8d35044f435bb7773f1af160a7328ab6e8d2e9d67702941320a711",))
QWEN3 = ChatFamily("qwen3", QWEN_TOOLS_INTRO, QWEN_TOOLS_OUTRO, think="after_last_query",
                   call_name_json=False, switch="enable_thinking",
                   generation_think={None: "", True: "", False: EMPTY_THINK},
                   template_sha256=("a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",))
FAMILIES = {f.name: f for f in (TINYLM, MINIMIND2, MINIMIND3, QWEN3)}
FAMILY_NAMES = tuple(FAMILIES)


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def family_of_template(template: str) -> ChatFamily | None:
    """The family whose known template texts include ``template`` (by sha256), or None."""
    digest = template_sha256(template)
    return next((f for f in FAMILIES.values() if digest in f.template_sha256), None)


def read_template(folder: Path) -> tuple[str | None, Path | None]:
    """The chat template a tokenizer folder carries and the file it came from: ``chat_template.jinja``
    (read first, as transformers 5 does), else ``tokenizer_config.json``'s ``chat_template`` (a string, or a
    list of named templates whose ``default`` is used); (None, None) when there is none."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None, None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None, None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return (template, config) if isinstance(template, str) and template else (None, None)


@dataclass(frozen=True)
class ChatTemplateChoice:
    """Which family renders a tokenizer's chats and why: what meta.json and checkpoints record.

    ``family`` is None when the folder's template matches no family and none was declared; ``problem`` then
    says so in one line (raised where a chat is rendered). ``template_sha256`` is the hash of the folder's
    template text (None: it has none); ``declared``: the family came from ``--chat-template``."""

    family: ChatFamily | None
    template_sha256: str | None = None
    declared: bool = False
    problem: str | None = None
    template: str | None = field(default=None, repr=False)  # the folder's template text (None: it has none)

    @property
    def jinja(self) -> str | None:
        """The Jinja text that renders as this choice does (for an exported tokenizer_config.json): tinylm's
        own for the tinylm family, else the folder's template (None when the family is unknown)."""
        if self.family is None:
            return None
        return CHAT_TEMPLATE if self.family is TINYLM else self.template

    def record(self) -> dict:
        """The JSON record of this choice (meta.json ``chat_template``, checkpoint tokenizer records)."""
        return {"family": self.family.name if self.family else None, "template_sha256": self.template_sha256,
                "declared": self.declared}


def choose_family(folder: Path, declared: str | None = None) -> ChatTemplateChoice:
    """The family for the tokenizer in ``folder``: ``declared`` (a :data:`FAMILY_NAMES` name) when given, else
    tinylm's when the folder has no template, else the family the template's hash names (see the module
    docstring); an unknown template gives a choice with ``family=None`` and a ``problem``."""
    template, source = read_template(folder)
    digest = template_sha256(template) if template is not None else None
    if declared is not None:
        if declared not in FAMILIES:
            raise ValueError(f"unknown chat template family {declared!r} (known: {', '.join(FAMILY_NAMES)})")
        return ChatTemplateChoice(FAMILIES[declared], digest, declared=True, template=template)
    if template is None:
        return ChatTemplateChoice(TINYLM)
    family = family_of_template(template)
    if family is not None:
        return ChatTemplateChoice(family, digest, template=template)
    return ChatTemplateChoice(None, digest, template=template, problem=(
        f"{source}: its chat template (sha256 {digest[:12]}) is none of the known families "
        f"({', '.join(FAMILY_NAMES)}), so tinylm cannot render what it renders; pass --chat-template tinylm to "
        "use tinylm's template anyway, or --chat-template FAMILY if it renders as one of them"))


def trained_family(record: dict | None) -> str | None:
    """The family to declare when loading the tokenizer of a model whose data recorded ``record`` (meta.json's
    ``chat_template``, kept in the checkpoint): the model renders as it was trained. None: no record."""
    return record.get("family") if isinstance(record, dict) else None
