"""The torch device a serving tool runs on (bin/chat, bin/serve ``--device``).

Contract: ``auto`` (the default) is ``cuda`` when torch sees a usable GPU, else ``cpu``; any other name
(``cpu``, ``cuda``, ``cuda:1``, ``mps``) is passed on as given, and the loader refuses an unusable one in one
line. torch is imported only when ``auto`` is resolved, so ``--help`` stays fast.
"""

from __future__ import annotations

AUTO = "auto"
DEVICE_HELP = "auto (default: cuda when a GPU is available, else cpu), cpu, cuda, cuda:1, ..."


def resolve_device(name: str) -> str:
    """The device ``name`` stands for (``auto`` resolved, anything else unchanged)."""
    if name != AUTO:
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
