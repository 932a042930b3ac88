"""core/startup.py: what exists at the first call leaves the garbage collector's reach; what is made
after it, even across a second call, is still collected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CODE = """\
import gc, sys, weakref
sys.path.insert(0, sys.argv[1])
from core.startup import freeze_startup_objects
class Node: pass
def cycle():
    node = Node(); node.me = node
    return node, weakref.ref(node)
before, before_alive = cycle()
freeze_startup_objects()
between, between_alive = cycle()
freeze_startup_objects()
after, after_alive = cycle()
del before, between, after
gc.collect()
print(before_alive() is not None, between_alive() is None, after_alive() is None)
"""


def test_freezes_what_exists_at_the_first_call_and_nothing_later():
    """A fresh interpreter, so that the first call is really the first."""
    out = subprocess.run([sys.executable, "-c", CODE, str(REPO)], capture_output=True, text=True, check=True)
    kept_frozen, between_collected, after_collected = out.stdout.split()
    assert kept_frozen == "True", "an object that existed at the first call must leave the collector's reach"
    assert between_collected == "True", "a second call must not freeze garbage made after the first"
    assert after_collected == "True"
