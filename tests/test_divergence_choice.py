"""The divergence choice, declared once (fdpo/trainers/divergence_choice.py) in every trainer config.

Truth: TRL's own config classes (every TRL field present, with TRL's default and TRL's value after
construction) and the registry (the help lists exactly its names and its f-DPO-valid entries).
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from trl import DPOConfig, GRPOConfig, SFTConfig
from trl.experimental.gkd import GKDConfig

from fdpo.divergences import available_divergences, divergence_class
from fdpo.trainers.distill import FDistillConfig
from fdpo.trainers.divergence_choice import DivergenceChoice
from fdpo.trainers.dpo import FDPOConfig
from fdpo.trainers.grpo_config import FGRPOConfig
from fdpo.trainers.sft import FSFTConfig

CONFIGS = [(FDPOConfig, DPOConfig), (FSFTConfig, SFTConfig), (FDistillConfig, GKDConfig), (FGRPOConfig, GRPOConfig)]
CHOICE = ("divergence", "alpha", "divergence_params")


def _default(f: dataclasses.Field):
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


@pytest.mark.parametrize(("ours", "parent"), CONFIGS, ids=lambda c: c.__name__)
def test_every_trl_field_kept_with_trl_default_and_value(ours, parent):
    fields = {f.name: f for f in dataclasses.fields(ours)}
    for f in dataclasses.fields(parent):
        assert f.name in fields, f"{ours.__name__} lost TRL's field {f.name}"
        assert repr(_default(fields[f.name])) == repr(_default(f)), f.name
    # bf16 defaults to True in TRL, which a CPU-only machine refuses for TRL's class as for ours
    a, b = ours(bf16=False), parent(bf16=False)
    for f in dataclasses.fields(parent):
        if f.name != "logging_dir":
            assert repr(getattr(a, f.name)) == repr(getattr(b, f.name)), f.name
    assert [n for n in fields if n in CHOICE] == list(CHOICE)
    assert isinstance(a, DivergenceChoice)


@pytest.mark.parametrize(("ours", "parent"), CONFIGS, ids=lambda c: c.__name__)
def test_choice_declared_once_and_help_from_registry(ours, parent):
    # the three fields are the mixin's: only a config whose default differs redeclares `divergence`
    for name in CHOICE:
        if not (ours is FDistillConfig and name == "divergence"):
            for klass in ours.__mro__:
                if name in inspect.get_annotations(klass):
                    assert klass is DivergenceChoice, (ours.__name__, name, klass.__name__)
                    break
    help_text = {f.name: f.metadata["help"] for f in dataclasses.fields(ours)}["divergence"]
    for name in available_divergences():
        assert f"`{name}`" in help_text
    valid = [n for n in available_divergences() if divergence_class(n).f_dpo_valid]
    assert ", ".join(valid) in help_text and "bdkd" in help_text


def test_one_canonical_form_stored():
    a = FDPOConfig(bf16=False, divergence="alpha(0.3)")
    assert (a.divergence, a.alpha, a.divergence_params) == ("alpha", 0.3, None)
    s = FSFTConfig(bf16=False, divergence="gjsd", divergence_params={"beta": 0.25})
    assert (s.divergence, s.alpha, s.divergence_params) == ("generalized_jsd", None, {"beta": 0.25})
    gkd = FDistillConfig(bf16=False)  # GKD's default loss: the generalised JSD with TRL's beta 0.5
    assert (gkd.divergence, gkd.divergence_params) == ("generalized_jsd", {"beta": 0.5})
    assert FDistillConfig(bf16=False, divergence="balanced_kl").divergence == "bdkd"
    with pytest.raises(ValueError, match="FDPOConfig: divergence='total_variation'"):
        FDPOConfig(bf16=False, divergence="total_variation")
    with pytest.raises(ValueError, match="FGRPOConfig"):
        FGRPOConfig(bf16=False, divergence="alpha")
