"""Rewards: TRL signature, string and conversational completions, name and dotted-path resolution."""

from __future__ import annotations

import pickle
import sys
import textwrap

import pytest

from fdpo.rewards import (
    RewardSpecError,
    TaskReward,
    available_rewards,
    completion_text,
    exact_match,
    get_reward_function,
    math_verify,
    synthetic_task,
)


def _conv(text):
    return [{"role": "assistant", "content": text}]


def test_completion_text_forms():
    assert completion_text("7+5") == "7+5"
    assert completion_text(_conv("7+5")) == "7+5"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "7+5"}]}]) == "7+5"
    assert completion_text([]) == ""


def test_sum_pairs_reward_strings_and_messages():
    reward = get_reward_function("sum_pairs")
    assert reward.__name__ == "sum_pairs"
    completions = ["7+5", "7+6", " 0+12 ", "7+5."]
    targets = [12, 12, 12, 12]
    expected = [1.0, 0.0, 1.0, 0.0]
    # extra kwargs TRL passes (trainer_state, completion_ids, other columns) are ignored
    kwargs = {"target": targets, "trainer_state": None, "completion_ids": [[1]] * 4, "difficulty": [2] * 4}
    assert reward(prompts=["p"] * 4, completions=completions, **kwargs) == expected
    assert reward(prompts=["p"] * 4, completions=[_conv(c) for c in completions], **kwargs) == expected


def test_task_reward_missing_column_and_pickling():
    reward = TaskReward("sum_pairs")
    with pytest.raises(KeyError, match="needs a dataset column 'target'"):
        reward(prompts=["p"], completions=["1+1"], answer=["2"])
    with pytest.raises(ValueError, match="1 values for 2 completions"):
        reward(prompts=["p", "p"], completions=["1+1", "2+0"], target=[2])
    assert pickle.loads(pickle.dumps(reward))(prompts=["p"], completions=["1+1"], target=[2]) == [1.0]


def test_synthetic_task_dispatches_per_row():
    out = synthetic_task(
        prompts=["a", "b", "c"],
        completions=["3+4", "15", "15"],
        task=["sum_pairs", "between", "between"],
        target=[7, None, None],
        low=[None, 12, 15],
        high=[None, 20, 20],
    )
    assert out == [1.0, 1.0, 0.0]


def test_exact_match():
    answers = ["Paris", "42", ["yes", "y"]]
    got = exact_match(prompts=["p"] * 3, completions=[" Paris\n", "41", _conv("y")], answer=answers)
    assert got == [1.0, 0.0, 1.0]
    assert exact_match(prompts=["p"], completions=["paris"], answer=["Paris"]) == [0.0]  # case-sensitive


def test_math_verify_equivalent_forms():
    completions = ["So the result is \\boxed{1/2}.", "\\boxed{\\frac{1}{2}}", _conv("The answer is $0.5$"),
                   "\\boxed{0.6}", "I don't know"]
    got = math_verify(prompts=["p"] * 5, completions=completions, answer=["0.5"] * 5)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0]
    # gold from a `solution` column, GSM8K style
    assert math_verify(prompts=["p"], completions=["\\boxed{72}"], solution=["48 + 24 = 72\n#### 72"]) == [1.0]


def test_registry_names():
    names = available_rewards()
    assert {"sum_pairs", "between", "math_verify", "exact_match", "synthetic_task"} <= set(names)
    assert get_reward_function("math_verify") is math_verify
    with pytest.raises(RewardSpecError, match=r"unknown reward 'math_verfy'.*Did you mean 'math_verify'"):
        get_reward_function("math_verfy")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    pkg = tmp_path / "my_rewards_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "funcs.py").write_text(textwrap.dedent("""
        def length_reward(prompts, completions, **kwargs):
            return [float(len(c)) for c in completions]
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards_pkg.funcs"
    for name in [m for m in sys.modules if m.startswith("my_rewards_pkg")]:
        del sys.modules[name]


def test_dotted_path_user_function(user_module):
    for spec in (f"{user_module}:length_reward", f"{user_module}.length_reward"):
        fn = get_reward_function(spec)
        assert fn(prompts=["p", "p"], completions=["ab", "abcd"]) == [2.0, 4.0]


def test_bad_dotted_paths_name_the_spec(user_module):
    with pytest.raises(RewardSpecError, match=r"'no_such_pkg\.mod:fn'.*could not import module 'no_such_pkg\.mod'"):
        get_reward_function("no_such_pkg.mod:fn")
    with pytest.raises(RewardSpecError, match=r"has no attribute 'lenght_reward'.*Did you mean 'length_reward'"):
        get_reward_function(f"{user_module}:lenght_reward")
    with pytest.raises(RewardSpecError, match="not callable"):
        get_reward_function(f"{user_module}.NOT_CALLABLE")
    with pytest.raises(RewardSpecError, match=r"expected 'package\.module:function'"):
        get_reward_function(f"{user_module}:")
