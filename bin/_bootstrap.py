"""Start-up shared by the bin/ tools: run under the repo's .venv when it exists; make the repo importable.

Each tool starts with ``import _bootstrap`` (bin/ is on sys.path as the script's folder). If
``<repo>/.venv`` exists and is not the running interpreter's environment, the tool re-executes itself
with ``.venv/bin/python`` so that ``bin/peek ...`` works without activating the venv.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_VENV = REPO_ROOT / ".venv"

if (_VENV / "bin" / "python").exists() and Path(sys.prefix).resolve() != _VENV.resolve():
    os.execv(str(_VENV / "bin" / "python"), [str(_VENV / "bin" / "python"), *sys.argv])
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
