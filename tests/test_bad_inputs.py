"""Every bad input a user can give gets ONE clear error: exit code 2, no traceback, the place named.

One row per case (recipes, data, models, command line, run directories), run in-process through the
CLI's `main()`; each fails before any model weights load. A few rows also run as a real
`python -m fdpo` subprocess, and `--debug` / FDPO_DEBUG=1 bring the traceback back.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fdpo.cli import main

REPO = Path(__file__).resolve().parents[1]


class Env:
    """The files a case may point at: a good tiny model, good SFT data, and a tmp dir for broken copies."""

    def __init__(self, tmp: Path, model: Path, data: Path) -> None:
        self.tmp, self.model, self.data = tmp, model, data

    def recipe(self, name: str = "recipe.yaml", text: str | None = None, **changes) -> str:
        base = {"trainer": "sft", "model_name_or_path": str(self.model), "dataset_name": str(self.data / "sft.jsonl"),
                "output_dir": str(self.tmp / "out"), "max_steps": 2, "per_device_train_batch_size": 2,
                "learning_rate": 1.0e-3, "report_to": "none", "save_strategy": "no"}
        base.update(changes)
        path = self.tmp / name
        path.write_text(text if text is not None else yaml.safe_dump({k: v for k, v in base.items() if v is not None}))
        return str(path)

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def data_recipe(self, name: str, content: str | bytes) -> str:
        return self.recipe(dataset_name=self.file(name, content))

    def broken_model(self, *, drop: tuple[str, ...] = (), write: dict[str, bytes] | None = None) -> str:
        out = self.tmp / "broken_model"
        shutil.copytree(self.model, out)
        for name in drop:
            (out / name).unlink()
        for name, content in (write or {}).items():
            (out / name).write_bytes(content)
        return str(out)

    def model_recipe(self, **kwargs) -> str:
        return self.recipe(model_name_or_path=self.broken_model(**kwargs))


def _rows(*rows: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


GOOD = {"prompt": "1+1=", "completion": "2"}


def _chat(role: str = "user", content: str = "hi") -> dict:
    return {"prompt": [{"role": role, "content": content}], "completion": [{"role": "assistant", "content": "2"}]}


def _truncated(env: Env) -> str:
    weights = (env.model / "model.safetensors").read_bytes()
    return env.model_recipe(write={"model.safetensors": weights[: len(weights) // 2]})


def _foreign_out(env: Env) -> str:
    (env.tmp / "out").mkdir()
    (env.tmp / "out" / "notes.txt").write_text("mine")
    return env.recipe()


def _quarantined(env: Env) -> str:
    folder = env.tmp / "out" / "incomplete-checkpoint-2-1"
    folder.mkdir(parents=True)
    return env.recipe(resume_from_checkpoint=str(folder))


def _pipeline(env: Env, text: str) -> str:
    return env.file("pipe.yaml", text)


# (case id, argv builder: Env -> list[str], strings the message must contain)
CASES = [
    # recipes
    ("unknown key", lambda e: ["train", e.recipe(learnig_rate=0.1)], ["recipe.yaml", "'learnig_rate'", "learning_rate"]),
    ("float for int", lambda e: ["train", e.recipe(max_steps=2.5)], ["recipe.yaml", "'max_steps'", "integer"]),
    ("lr zero", lambda e: ["train", e.recipe(learning_rate=0.0)], ["recipe.yaml", "'learning_rate'", "> 0"]),
    ("lr negative", lambda e: ["train", e.recipe(learning_rate=-1e-3)], ["recipe.yaml", "'learning_rate'"]),
    ("batch zero", lambda e: ["train", e.recipe(per_device_train_batch_size=0)],
     ["recipe.yaml", "'per_device_train_batch_size'", "≥ 1"]),
    ("grad accum zero", lambda e: ["train", e.recipe(gradient_accumulation_steps=0)],
     ["recipe.yaml", "'gradient_accumulation_steps'"]),
    ("max_steps zero", lambda e: ["train", e.recipe(max_steps=0)], ["recipe.yaml", "'max_steps'", "-1"]),
    ("max_steps negative", lambda e: ["train", e.recipe(max_steps=-5)], ["recipe.yaml", "'max_steps'"]),
    ("save_steps zero", lambda e: ["train", e.recipe(save_strategy="steps", save_steps=0)],
     ["recipe.yaml", "'save_steps'"]),
    ("epochs zero", lambda e: ["train", e.recipe(max_steps=-1, num_train_epochs=0)], ["'num_train_epochs'"]),
    ("warmup negative", lambda e: ["train", e.recipe(warmup_steps=-1)], ["'warmup_steps'", "≥ 0"]),
    ("bad enum", lambda e: ["train", e.recipe(lr_scheduler_type="cosin")], ["'lr_scheduler_type'", "cosine"]),
    ("duplicate key", lambda e: ["train", e.recipe(text="trainer: sft\nmax_steps: 3\nmax_steps: 4\n")],
     ["recipe.yaml", "duplicate key 'max_steps'", "line 2", "line 3"]),
    ("recipe not UTF-8", lambda e: ["train", e.file("latin1.yaml", b"trainer: sft\n# caf\xe9\n")],
     ["latin1.yaml", "line 2", "UTF-8"]),
    ("recipe is a directory", lambda e: ["train", str(e.tmp)], ["is a directory", "a recipe file"]),
    ("recipe missing", lambda e: ["train", str(e.tmp / "nope.yaml")], ["nope.yaml", "does not exist"]),
    ("recipe not a mapping", lambda e: ["train", e.recipe(text="- a\n- b\n")], ["recipe.yaml", "mapping"]),
    ("recipe bad YAML", lambda e: ["train", e.recipe(text="trainer: [sft\n")], ["recipe.yaml", "not valid YAML"]),
    ("unknown trainer", lambda e: ["train", e.recipe(trainer="sfft")], ["'trainer'", "'sft'"]),
    ("missing output_dir", lambda e: ["train", e.recipe(output_dir=None)], ["recipe.yaml", "'output_dir'"]),
    ("loss_type bad item", lambda e: ["train", e.recipe(trainer="dpo", loss_type="sigmoidd")], ["loss_type"]),
    # the command line (named as such, not blamed on the recipe file)
    ("cli bad type", lambda e: ["train", e.recipe(), "--max_steps", "abc"], ["command line", "--max_steps", "integer"]),
    ("cli bad YAML", lambda e: ["train", e.recipe(), "--learning_rate", "[1e-3"], ["command line", "--learning_rate"]),
    ("cli lr zero", lambda e: ["train", e.recipe(), "--learning_rate", "0"], ["command line", "'learning_rate'"]),
    ("cli unknown key", lambda e: ["train", e.recipe(), "--max_step", "3"], ["command line", "'max_step'", "max_steps"]),
    ("cli dangling key", lambda e: ["train", e.recipe(), "--max_steps"], ["command line", "needs a value"]),
    ("cli bad trainer", lambda e: ["train", e.recipe(), "--trainer", "dpp"], ["command line", "'trainer'"]),
    ("cli resume+overwrite", lambda e: ["train", e.recipe(), "--resume", "--overwrite"], ["--resume", "--overwrite"]),
    ("eval -k a", lambda e: ["eval", str(e.model), "-k", "a"], ["command line", "-k", "1,4,16"]),
    ("eval -k 0", lambda e: ["eval", str(e.model), "-k", "0,4"], ["command line", "-k"]),
    ("eval temperature", lambda e: ["eval", str(e.model), "--temperature", "-1"], ["command line", "--temperature"]),
    ("eval num-samples", lambda e: ["eval", str(e.model), "--num-samples", "0"], ["command line", "--num-samples"]),
    ("eval missing ckpt", lambda e: ["eval", str(e.tmp / "no_ckpt")], ["no_ckpt", "does not exist"]),
    ("eval missing data", lambda e: ["eval", str(e.model), "--data", str(e.tmp / "no.jsonl")],
     ["--data", "no.jsonl", "does not exist"]),
    # data files
    ("jsonl bad line", lambda e: ["train", e.data_recipe("d.jsonl", _rows(GOOD, GOOD) + "{oops\n" + _rows(GOOD))],
     ["d.jsonl", "line 3", "column 2"]),
    ("jsonl not object", lambda e: ["train", e.data_recipe("d.jsonl", _rows(GOOD) + "[1, 2]\n")], ["d.jsonl", "line 2"]),
    ("json document bad", lambda e: ["train", e.data_recipe("d.json", '[{"prompt": "a", ')], ["d.json", "line 1"]),
    ("data empty", lambda e: ["train", e.data_recipe("d.jsonl", "")], ["d.jsonl", "is empty"]),
    ("data blank lines", lambda e: ["train", e.data_recipe("d.jsonl", "\n\n")], ["d.jsonl", "is empty"]),
    ("data not UTF-8", lambda e: ["train", e.data_recipe("d.jsonl", _rows(GOOD).encode() + b'{"prompt": "\xff"}\n')],
     ["d.jsonl", "line 2", "UTF-8"]),
    ("data csv not UTF-8", lambda e: ["train", e.data_recipe("d.csv", b"prompt,completion\n\xe9,2\n")],
     ["d.csv", "line 2", "UTF-8"]),
    ("data missing", lambda e: ["train", e.recipe(dataset_name=str(e.tmp / "gone.jsonl"))], ["gone.jsonl", "does not exist"]),
    ("data bad extension", lambda e: ["train", e.data_recipe("d.txt", "x")], ["d.txt", "extension"]),
    ("data missing column", lambda e: ["train", e.data_recipe("d.jsonl", _rows({"question": "a", "answer": "b"}))],
     ["d.jsonl", "missing column"]),
    ("data empty completion", lambda e: ["train", e.data_recipe("d.jsonl", _rows(GOOD, {"prompt": "a", "completion": ""}))],
     ["d.jsonl", "row 1", "'completion'"]),
    ("data unknown role", lambda e: ["train", e.data_recipe("d.jsonl", _rows(_chat(), _chat(role="usr")))],
     ["d.jsonl", "row 1", "'prompt'", "'usr'"]),
    ("data empty content", lambda e: ["train", e.data_recipe("d.jsonl", _rows(_chat(content="")))],
     ["d.jsonl", "row 0", "empty content"]),
    ("data mixed types", lambda e: ["train", e.data_recipe("d.jsonl", _rows(GOOD, {"prompt": 3, "completion": [1]}))],
     ["d.jsonl"]),
    # model directories
    ("model missing", lambda e: ["train", e.recipe(model_name_or_path=str(e.tmp / "no_model"))],
     ["'model_name_or_path'", "no_model", "does not exist"]),
    ("model no config", lambda e: ["train", e.model_recipe(drop=("config.json",))], ["broken_model", "config.json"]),
    ("model config garbage", lambda e: ["train", e.model_recipe(write={"config.json": b"{nope"})],
     ["config.json", "not valid JSON"]),
    ("model no tokenizer", lambda e: ["train", e.model_recipe(drop=("tokenizer.json", "tokenizer_config.json"))],
     ["broken_model", "no tokenizer"]),
    ("weights empty", lambda e: ["train", e.model_recipe(write={"model.safetensors": b""})],
     ["model.safetensors", "empty"]),
    ("weights truncated", lambda e: ["train", _truncated(e)], ["model.safetensors", "truncated"]),
    ("weights garbage", lambda e: ["train", e.model_recipe(write={"model.safetensors": os.urandom(4096)})],
     ["model.safetensors", "not a safetensors file"]),
    ("weights missing", lambda e: ["train", e.model_recipe(drop=("model.safetensors",))], ["broken_model", "no weights"]),
    ("no chat template", lambda e: ["train", e.model_recipe(drop=("chat_template.jinja",))],
     ["'model_name_or_path'", "no chat template"]),
    ("eval ckpt no weights", lambda e: ["eval", e.broken_model(drop=("model.safetensors",))], ["no weights"]),
    # run directories
    ("foreign output_dir", lambda e: ["train", _foreign_out(e)], ["out", "notes.txt", "--overwrite"]),
    ("resume from missing", lambda e: ["train", e.recipe(resume_from_checkpoint=str(e.tmp / "ck"))],
     ["'resume_from_checkpoint'", "ck", "not a directory"]),
    ("resume from quarantined", lambda e: ["train", _quarantined(e)], ["incomplete-checkpoint-2-1", "incomplete"]),
    # pipelines
    ("pipeline unknown key", lambda e: ["pipeline", _pipeline(e, "run_dir: r\nstages: []\nstagse: 1\n")],
     ["pipe.yaml", "'stagse'", "stages"]),
    ("pipeline bad kind", lambda e: ["pipeline", _pipeline(e, "run_dir: r\nstages:\n  - {name: a, kind: tinyy}\n")],
     ["pipe.yaml", "stage 0", "tiny"]),
    ("pipeline bad --from", lambda e: ["pipeline", _pipeline(e, "run_dir: r\nstages:\n  - {name: a, kind: tiny}\n"),
                                      "--from", "b"], ["--from b", "no such stage"]),
]


@pytest.fixture
def env(tmp_path, tiny_model_dir, task_data_dir) -> Env:
    return Env(tmp_path, Path(tiny_model_dir), Path(task_data_dir))


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch):
    """Every case must fail before weights load: loading them is itself a failure of the test."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded: the bad input was not caught first")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


@pytest.mark.parametrize(("argv", "expected"), [pytest.param(a, x, id=i) for i, a, x in CASES])
def test_bad_input_is_one_clear_error(env, argv, expected, capsys):
    args = argv(env)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("fdpo: error:")]
    assert len(message) == 1, err
    for part in expected:
        assert part in message[0], (part, message[0])


def test_the_table_is_wide():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


def test_non_finite_loss_is_an_error_not_a_traceback(env, monkeypatch, capsys):
    from fdpo import train
    from fdpo.trainers.guards import NonFiniteError

    def blow_up(recipe, **kwargs):
        raise NonFiniteError("step 3: the loss term 'fdpo_sigmoid' is not finite ([nan]).")

    monkeypatch.setattr(train, "run_training", blow_up)
    assert main(["train", env.recipe()]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "step 3" in err and "fdpo_sigmoid" in err


def test_gradient_message_suggests_clipping_only_when_off():
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from fdpo.trainers.guards import NonFiniteError, NonFiniteGradientCallback

    model = torch.nn.Linear(2, 1)
    model.weight.grad = torch.full_like(model.weight, float("nan"))
    for norm, suggests in ((1.0, False), (0.0, True)):
        args = TrainingArguments(output_dir="unused", max_grad_norm=norm, report_to="none")
        with pytest.raises(NonFiniteError, match="'weight'") as exc:
            NonFiniteGradientCallback().on_pre_optimizer_step(args, TrainerState(), TrainerControl(), model=model)
        assert ("enable gradient clipping" in str(exc.value)) is suggests


def _run_cli(argv: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "fdpo", *argv], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=300)


def test_real_process_exit_code(env):
    proc = _run_cli(["train", env.data_recipe("d.jsonl", _rows(GOOD) + "{bad\n")], env.tmp)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "line 2" in proc.stderr, proc.stderr


def test_debug_brings_the_traceback_back(env, monkeypatch):
    from fdpo.errors import RecipeError

    argv = ["train", env.recipe(learning_rate=0.0)]
    with pytest.raises(RecipeError, match="learning_rate"):
        main(["--debug", *argv])
    with pytest.raises(RecipeError, match="learning_rate"):
        main([*argv, "--debug"])
    monkeypatch.setenv("FDPO_DEBUG", "1")
    with pytest.raises(RecipeError, match="learning_rate"):
        main(argv)
