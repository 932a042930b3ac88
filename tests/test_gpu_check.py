"""bench/gpu_check.sh in CPU mode (as CI runs it): every check it makes here passes and the table is printed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_in_cpu_mode(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--quick", "--device", "cpu", "--json",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {r["check"]: r for r in json.loads(out.read_text())}
    assert rows["env"]["note"].startswith("CPU mode")
    assert rows["flash_sdpa"]["status"] == "skip"
    assert rows["packed_parity"]["status"] == "ok"
    assert {rows[k]["status"] for k in ("train:tiny:plain", "train:tiny:packed")} == {"ok"}
    assert "tok/s" in rows["train:tiny:packed"]["value"]
    assert rows["train:tiny-moe:packed"]["status"] == "ok" and "tok/s" in rows["train:tiny-moe:packed"]["value"]
    assert rows["yarn_decode:tiny"]["status"] == "ok" and "yarn x4" in rows["yarn_decode:tiny"]["note"]
    assert proc.stdout.splitlines()[0].startswith("| check")
    # the minimind3-mini recipe at toy scale: both stages ran, their loss curves and the final link exist
    assert {rows[k]["status"] for k in ("recipe:pretrain", "recipe:sft", "recipe:final")} == {"ok"}
    assert "tok/s" in rows["recipe:pretrain"]["value"] and "4 steps" in rows["recipe:pretrain"]["note"]
    assert rows["recipe:sft:loss"]["value"].startswith("1:") and "val" in rows["recipe:sft:loss"]["note"]
