"""The command-line options every tool that reads weights shares for foreign sources (bin/chat, bin/serve,
bin/eval, bin/export): a bare state dict (MiniMind ``.pth``) has no config, so its shape comes from
``--model`` / ``--model-arg``; ``--tokenizer`` replaces (or, for a state dict, supplies) the tokenizer.
:class:`ToolError` is these tools' one-line error.

Free of torch imports at module level, so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from core.errors import TinyLMError

if TYPE_CHECKING:
    from train.loading import SourceOptions

CKPT_HELP = ("checkpoint file or run folder (its latest checkpoint), a transformers folder (Llama, Qwen3, "
             "Qwen2/3-MoE), or a MiniMind .pth state dict with --model")


class ToolError(TinyLMError):
    """A user-facing problem of a tool that uses a trained model (bin/export, bin/eval): one line naming the
    file or field."""


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--model-arg`` and ``--tokenizer`` (in their own help group)."""
    g = p.add_argument_group("weights from elsewhere (a transformers folder needs none of these)")
    g.add_argument("--model", metavar="PRESET",
                   help="shape of a bare state dict (a MiniMind .pth holds no config): a preset, e.g. small "
                        "(MiniMind2-small), base (MiniMind2), minimind3, minimind3-moe (MiniMind-3-MoE)")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of --model's config, repeatable (e.g. num_hidden_layers=16)")
    g.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer folder (tokenizer.json) to use instead of the source's own; a state dict needs it")


def source_options(model: str | None, model_args: list[str], tokenizer: str | None) -> SourceOptions:
    """The :class:`train.loading.SourceOptions` of ``--model``, ``--model-arg`` and ``--tokenizer`` (a bad
    preset or override is one ToolError line naming it). No ``--model`` / ``--model-arg``: no shape, so a
    bare state dict is refused."""
    from model import ModelConfig
    from train.loading import SourceOptions

    config = None
    if model or model_args:
        try:
            config = ModelConfig.from_preset(model or "small").override(model_args)
        except ValueError as e:
            raise ToolError(f"--model / --model-arg: {e}") from None
    return SourceOptions(config, tokenizer)
