"""Recipe validation: every bad key or value is an error naming the key and the file, with a fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fdpo.data.loading import check_columns, load_any_dataset
from fdpo.errors import RecipeError
from fdpo.recipe import load_recipe, parse_overrides

BASE = {
    "trainer": "sft",
    "model_name_or_path": "runs/tiny/model",
    "dataset_name": "runs/tiny/data/sft.jsonl",
    "output_dir": "runs/test",
    "learning_rate": 1.0e-3,
    "max_steps": 3,
}


def write_recipe(tmp_path: Path, **changes) -> Path:
    data = {**BASE, **changes}
    data = {k: v for k, v in data.items() if v is not None}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_recipe_builds_configs(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path))
    assert recipe.training_args.learning_rate == pytest.approx(1e-3)
    assert recipe.training_args.max_steps == 3
    assert recipe.model_args.model_name_or_path == "runs/tiny/model"
    assert type(recipe.training_args).__name__ == "FSFTConfig"
    resolved = recipe.resolved()
    assert resolved["max_steps"] == 3 and resolved["trainer"] == "sft"
    yaml.safe_dump(resolved)  # plain values only


def test_unknown_key_names_file_and_nearest(tmp_path):
    path = write_recipe(tmp_path, learnig_rate=0.1)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert str(path) in msg and "'learnig_rate'" in msg and "learning_rate" in msg


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("max_steps", 2.5, "integer"),  # TRL's parser would accept a float for an int
        ("learning_rate", "fast", "number"),
        ("per_device_train_batch_size", [2, 4], "integer"),  # a list for a scalar
        ("bf16", "maybe", "true/false"),
        ("lr_scheduler_type", "cosin", "cosine"),  # unknown enum value, with the nearest one
        ("truncation_mode", "keep_middle", "keep_end"),  # choices metadata
        ("trainer", "sftt", "sft"),
    ],
)
def test_bad_values_are_named(tmp_path, key, value, expected):
    path = write_recipe(tmp_path, **{key: value})
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    msg = str(exc.value)
    assert f"'{key}'" in msg and str(path) in msg and expected in msg


def test_yaml_scientific_string_is_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE).replace("learning_rate: 0.001", "learning_rate: 1e-3"))
    assert "1e-3" in path.read_text()
    assert load_recipe(path).training_args.learning_rate == pytest.approx(1e-3)


def test_missing_required_keys_and_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match="model_name_or_path"):
        load_recipe(write_recipe(tmp_path, model_name_or_path=None))
    with pytest.raises(RecipeError, match="output_dir"):
        load_recipe(write_recipe(tmp_path, output_dir=None))
    with pytest.raises(RecipeError, match="dataset_name"):
        load_recipe(write_recipe(tmp_path, dataset_name=None))
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(bad)


def test_overrides_are_parsed_and_validated(tmp_path):
    over = parse_overrides(["--max_steps", "7", "--learning_rate=2e-4", "--bf16", "false", "--save_strategy", "no"])
    assert over == {"max_steps": 7, "learning_rate": 2e-4, "bf16": False, "save_strategy": "no"}
    recipe = load_recipe(write_recipe(tmp_path), over)
    assert recipe.training_args.max_steps == 7
    assert recipe.training_args.learning_rate == pytest.approx(2e-4)
    with pytest.raises(RecipeError, match=r"'max_step'.*max_steps"):
        load_recipe(write_recipe(tmp_path), {"max_step": 3})
    with pytest.raises(RecipeError, match="needs a value"):
        parse_overrides(["--max_steps"])


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_missing_column_names_file_and_columns(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": "b"}])
    ds = load_any_dataset(str(f))
    with pytest.raises(RecipeError) as exc:
        check_columns(ds, ["prompt", "completion"], source=str(f))
    msg = str(exc.value)
    assert str(f) in msg and "completion" in msg and "answer" in msg


def test_empty_or_malformed_row_names_row_and_column(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": []},
    ]
    f = _jsonl(tmp_path / "d.jsonl", rows)
    ds = load_any_dataset(str(f))
    with pytest.raises(RecipeError, match=r"row 1, column 'completion' is empty"):
        check_columns(ds, ["prompt", "completion"], source=str(f))
    f2 = _jsonl(tmp_path / "e.jsonl", [{"prompt": "x", "completion": "  "}])
    with pytest.raises(RecipeError, match=r"row 0, column 'completion'"):
        check_columns(load_any_dataset(str(f2)), ["prompt", "completion"], source=str(f2))
    f3 = _jsonl(tmp_path / "m.jsonl", [{"prompt": [{"role": "user"}], "completion": "x"}])
    with pytest.raises(RecipeError, match=r"row 0, column 'prompt': message 0"):
        check_columns(load_any_dataset(str(f3)), ["prompt", "completion"], source=str(f3), text_columns=["prompt"])


def test_local_formats_and_errors(tmp_path):
    rows = [{"prompt": "p", "completion": "c"}] * 3
    f = _jsonl(tmp_path / "d.jsonl", rows)
    assert len(load_any_dataset(str(f))) == 3
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_any_dataset(str(tmp_path / "d.parquet")).column_names == ["prompt", "completion"]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
    assert len(load_any_dataset(str(tmp_path / "d.csv"))) == 3
    folder = tmp_path / "dir"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", rows)
    assert len(load_any_dataset(str(folder))) == 3
    with pytest.raises(RecipeError, match="does not exist"):
        load_any_dataset(str(tmp_path / "missing.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(RecipeError, match="extension"):
        load_any_dataset(str(tmp_path / "d.txt"))


def test_hub_name_offline_says_hub(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here; skip the retries
    with pytest.raises(RecipeError, match="hub"):
        load_any_dataset("some-org/some-dataset-that-is-not-here")
