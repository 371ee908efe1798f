"""scripts/gpu_check.py --cpu-dry-run: every check runs at tiny shapes on the CPU and the JSON holds its numbers
(so the GPU script cannot rot between GPU runs; the numbers themselves are not asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_cpu_dry_run_measures_every_pair(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "check.json"
    module.main(["--cpu-dry-run", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["dry_run"] is True
    for section, keys in (("dpo", ("trl_dpo", "fdpo_reverse_kl", "fdpo_js", "sparsepo")),
                          ("fsft", ("trl_sft", "fdpo_fsft_js")),
                          ("full_vocab", ("fdpo_full_vocab_js", "trl_chunked_jsd"))):
        for key in keys:
            assert res[section][key]["s_per_step"] > 0, (section, key)
    assert "skipped" in res["fsdp"] and "skipped" in res["grpo"]
    ratios = {r["comparison"]: r for r in res["ratios"]}
    assert ratios["SparsePO / DPO"]["s_per_step"] > 0
