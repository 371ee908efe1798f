"""The working directory cannot shadow fdpo's imports under `python -m fdpo`; user reward modules still resolve."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fdpo.rewards.registry import get_reward_function

REPO = Path(__file__).resolve().parents[1]


def test_working_directory_does_not_shadow_fdpo_imports(tmp_path):
    for name in ("yaml", "trl", "rich"):  # modules `fdpo keys` imports
        (tmp_path / f"{name}.py").write_text("raise SystemExit('shadowed by the working directory')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fdpo", "keys", "sft"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shadowed" not in proc.stderr and "learning_rate" in proc.stdout


def test_user_reward_module_in_working_directory_is_loaded_by_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_for_test.py").write_text("def score(prompts, completions, **kw):\n    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_rewards_for_test", raising=False)
    fn = get_reward_function("my_rewards_for_test:score")
    assert fn(["p"], ["c"]) == [1.0]
    assert get_reward_function("os.path:join") is os.path.join  # an installed module wins over ./ files
