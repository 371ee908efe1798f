"""FGRPOTrainer against TRL's own GRPOTrainer, reference-model bookkeeping, recipe errors and tiny training runs.

Oracle for `estimator: k3_ratio`: TRL 1.16's inline KL (`beta > 0`, `use_bias_correction_kl=True`) with the
same seed, data and reward: losses, KL values and the trained weights must agree for every loss aggregation.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def parity_reward(prompts, completions, **kwargs):
    """A deterministic 0/1 reward of the completion text (so an untrained model gets non-zero advantages)."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(float(zlib.crc32(text.encode()) % 2))
    return out


def _data(task_data_dir: Path, n: int = 16):
    from datasets import load_dataset

    return load_dataset("json", data_files=str(task_data_dir / "rl.jsonl"), split="train").select(range(n))


COMMON = dict(
    max_steps=3,
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=6,
    learning_rate=3e-3,
    logging_steps=1,
    report_to="none",
    bf16=False,
    save_strategy="no",
    seed=0,
    disable_tqdm=True,
)


def _run(cls_cfg, cls_trainer, model_dir, data, out, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    args = cls_cfg(output_dir=str(out), **{**COMMON, **kw})
    trainer = cls_trainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=[parity_reward],
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    trainer.train()
    return trainer


@pytest.mark.parametrize(
    "loss_type,extra",
    [("dapo", {}), ("grpo", {}), ("dr_grpo", {}), ("bnpo", {}), ("dapo", {"num_iterations": 2})],
    ids=["dapo", "grpo", "dr_grpo", "bnpo", "dapo-2iter"],
)
def test_k3_ratio_matches_trl_inline_kl(tiny_model_dir, task_data_dir, tmp_path, loss_type, extra):
    from trl import GRPOConfig, GRPOTrainer

    from fdpo.trainers.grpo_trainer import FGRPOConfig, FGRPOTrainer

    data = _data(task_data_dir)
    eta = 0.5
    trl = _run(GRPOConfig, GRPOTrainer, tiny_model_dir, data, tmp_path / "trl", beta=eta, loss_type=loss_type, **extra)
    ours = _run(
        FGRPOConfig, FGRPOTrainer, tiny_model_dir, data, tmp_path / "fdpo",
        divergence_coef=eta, estimator="k3_ratio", loss_type=loss_type, **extra,
    )
    assert ours.beta == 0.0 and ours.ref_model is not None
    h_trl = [h for h in trl.state.log_history if "loss" in h]
    h_ours = [h for h in ours.state.log_history if "loss" in h]
    assert len(h_trl) == len(h_ours) == 3
    kls = [h["kl"] for h in h_trl]
    assert max(kls) > 1e-4, "the KL term must be active for the comparison to mean anything"
    for a, b in zip(h_trl, h_ours):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["div/reverse_kl"] == pytest.approx(a["kl"], rel=1e-4, abs=1e-7)
        assert b.get("reward") == a.get("reward")
    for (n, p), (_, q) in zip(trl.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=n)


def test_no_penalty_loads_no_reference_and_matches_trl_beta0(tiny_model_dir, task_data_dir, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    from fdpo.trainers.grpo_trainer import FGRPOConfig, FGRPOTrainer

    data = _data(task_data_dir)
    trl = _run(GRPOConfig, GRPOTrainer, tiny_model_dir, data, tmp_path / "trl", beta=0.0, max_steps=2)
    ours = _run(FGRPOConfig, FGRPOTrainer, tiny_model_dir, data, tmp_path / "fdpo", max_steps=2)
    assert ours.ref_model is None and not ours.has_reference_model
    for (n, p), (_, q) in zip(trl.model.named_parameters(), ours.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=n)


def test_full_vocab_skips_reference_logps(tiny_model_dir, task_data_dir, tmp_path):
    """full_vocab keeps the reference's hidden states instead of TRL's reference log-prob pass; at π = π_ref
    (first step) its value is 0, then positive."""
    from fdpo.trainers.grpo_trainer import FGRPOConfig, FGRPOTrainer

    tr = _run(
        FGRPOConfig, FGRPOTrainer, tiny_model_dir, _data(task_data_dir), tmp_path / "fv",
        divergence_coef=0.5, estimator="full_vocab", divergence="js",
    )
    batch = tr._buffered_inputs[0]
    assert "ref_per_token_logps" not in batch and "ref_hidden_states" in batch
    vals = [h["div/js"] for h in tr.state.log_history if "div/js" in h]
    assert vals[0] == pytest.approx(0.0, abs=1e-6) and vals[-1] > 1e-5


def test_disco_regroups_shuffled_rollouts(tiny_model_dir, task_data_dir, tmp_path):
    """TRL shuffles the generation batch; DisCO's groups must be whole questions again: rows with the same
    `group_index` carry the same prompt, every group has num_generations rows, and no reference is loaded."""
    from fdpo.trainers.grpo_trainer import FGRPOConfig, FGRPOTrainer

    tr = _run(FGRPOConfig, FGRPOTrainer, tiny_model_dir, _data(task_data_dir), tmp_path / "disco", loss_type="disco",
              max_steps=1)
    assert tr.ref_model is None
    batch = tr._buffered_inputs[0]
    groups = batch["group_index"]
    assert not torch.equal(groups, groups.sort().values), "expected TRL to have shuffled the rows"
    for g in groups.unique():
        rows = (groups == g).nonzero().flatten()
        assert len(rows) == 4
        prompts = batch["prompt_ids"][rows]
        assert (prompts == prompts[0]).all()
    logs = [h for h in tr.state.log_history if "disco/objective" in h]
    assert logs and logs[0]["disco/groups_total"] == 2.0


def test_rehearsal_only_loads_no_reference(tiny_model_dir, task_data_dir, tmp_path, monkeypatch):
    """DPH-RL: presample (on the tiny task) then train with rehearsal and η_KL = 0: no reference model."""
    from fdpo.recipe import load_recipe, presample_recipe
    from fdpo.train import run_training

    out = tmp_path / "dph"
    rows = (task_data_dir / "rl.jsonl").read_text().splitlines()[:32]
    (tmp_path / "rl32.jsonl").write_text("\n".join(rows) + "\n")
    over = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_name": str(tmp_path / "rl32.jsonl"),
        "output_dir": str(out),
        "rehearsal_file": str(out / "dph"),
        "reward_funcs": ["tests.test_grpo_trainer:parity_reward"],
        "presample_n": 4,
        "pef_threshold": 0.5,
        "max_completion_length": 6,
    }
    manifest = presample_recipe(RECIPES / "tiny" / "grpo" / "dph_js.yaml", over)
    assert manifest["counts"]["stored_samples"] > 0
    recipe = load_recipe(
        RECIPES / "tiny" / "grpo" / "dph_js.yaml",
        {**over, "max_steps": 2, "per_device_train_batch_size": 8, "eval_task": None, "save_strategy": "steps",
         "save_steps": 1, "logging_steps": 1},
    )
    from fdpo.trainers import grpo_trainer as grpo

    seen = {}
    original = grpo.FGRPOTrainer.__init__

    def spy(self, *a, **k):
        original(self, *a, **k)
        seen["trainer"] = self

    monkeypatch.setattr(grpo.FGRPOTrainer, "__init__", spy)
    metrics = run_training(recipe)
    tr = seen["trainer"]
    assert tr.ref_model is None and tr.rehearsal is not None
    assert len(tr.train_dataset) == manifest["counts"]["d_exp"]
    assert any("div/js" in h for h in metrics["log_history"])
    # the rehearsal stream position is checkpointed (resume continues the stream, not restarts it)
    saved = json.loads((out / "checkpoint-2" / tr.STATE_FILE).read_text())["rehearsal"]
    assert saved["epoch"] * len(tr.rehearsal) + saved["cursor"] == 2 * tr.rehearsal.batch_size


@pytest.mark.parametrize(
    "override,fragment",
    [
        ({"estimator": "k4"}, "estimator"),
        ({"estimator": "k3", "divergence": "js", "divergence_coef": 0.1}, "divergence"),
        ({"beta": 0.1, "divergence_coef": 0.2}, "(?s)'beta'.*'divergence_coef'"),
        ({"loss_type": "disco", "steps_per_generation": 2}, "steps_per_generation"),
        ({"divergence": "no_such_divergence"}, "no_such_divergence"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, override, fragment):
    from fdpo.errors import RecipeError
    from fdpo.recipe import load_recipe

    with pytest.raises(RecipeError, match=fragment):
        load_recipe(RECIPES / "tiny" / "grpo" / "grpo_k3_ratio.yaml", {"output_dir": str(tmp_path), **override})


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*/grpo/*.yaml")), ids=lambda p: f"{p.parents[1].name}/{p.name}")
def test_grpo_recipes_validate(path, tmp_path):
    """Every GRPO-family recipe (tiny and GPU) loads through the recipe loader (no model is loaded)."""
    from fdpo.recipe import load_recipe
    from fdpo.recipe.load import read_yaml

    if read_yaml(path).get("trainer") != "grpo":
        pytest.skip("not a GRPO recipe")
    recipe = load_recipe(path, {"output_dir": str(tmp_path)})
    assert recipe.training_args.beta == 0.0


TINY = ["grpo_none", "grpo_k3_ratio", "grpo_k2", "grpo_k3", "grpo_k1_reward", "grpo_generator_js",
        "grpo_full_vocab", "grpo_chi2", "disco_log_l", "disco_l_ratio", "fdpg_js"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_tiny_recipe_trains_a_few_steps(name, tiny_sft_dir, task_data_dir, tmp_path):
    """Each recipe, from the tiny SFT checkpoint, 2 steps with 4 rollouts: finite loss, its terms logged."""
    from fdpo.recipe import load_recipe
    from fdpo.train import run_training

    recipe = load_recipe(
        RECIPES / "tiny" / "grpo" / f"{name}.yaml",
        {
            "model_name_or_path": str(tiny_sft_dir),
            "dataset_name": str(task_data_dir / "rl.jsonl"),
            "output_dir": str(tmp_path / name),
            "max_steps": 2,
            "per_device_train_batch_size": 8,
            "num_generations": 4,
            "max_completion_length": 8,
            "logging_steps": 1,
            "save_strategy": "no",
            "eval_every_steps": 0,
            "eval_num_prompts": 2,
            "eval_num_samples": 4,
            "eval_ks": [1, 4],
        },
    )
    metrics = run_training(recipe)
    logs = [h for h in metrics["log_history"] if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)
    keys = set().union(*logs)
    args = recipe.training_args
    if args.divergence_coef > 0:
        assert f"div/{args.divergence if args.divergence != 'js' else 'js'}" in keys
    if args.chi2_coef > 0:
        assert "div/chi2_occupancy" in keys
    if args.loss_type == "disco":
        assert "disco/objective" in keys
    if args.loss_type == "fdpg":
        assert "fdpg/log_z" in keys
    final = [h for h in metrics["log_history"] if "eval/pass@1" in h]
    assert final and 0.0 <= final[-1]["eval/pass@1"] <= 1.0
    history = json.loads((tmp_path / name / "eval_during_training.json").read_text())
    assert history[-1]["step"] == 2


@pytest.mark.parametrize("estimator", ["k3_ratio", "full_vocab"])
def test_peft_reference_is_the_adapter_free_base(tiny_model_dir, task_data_dir, tmp_path, estimator):
    """With LoRA no reference copy is loaded (TRL's adapter-disabled base serves both the reference log-probs
    and, for full_vocab, the reference hidden states); the divergence starts at 0 and grows as the adapter trains."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fdpo.trainers.grpo_trainer import FGRPOConfig, FGRPOTrainer

    args = FGRPOConfig(output_dir=str(tmp_path / "peft"), **{**COMMON, "learning_rate": 3e-2},
                       divergence_coef=0.5, estimator=estimator)
    tr = FGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=[parity_reward], args=args,
        train_dataset=_data(task_data_dir), processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    tr.train()
    assert tr.ref_model is None
    vals = [h["div/reverse_kl"] for h in tr.state.log_history if "div/reverse_kl" in h]
    assert abs(vals[0]) < 1e-6 and vals[-1] > 1e-6


def test_reference_logps_are_the_initial_model_at_the_sampling_temperature(tiny_model_dir, task_data_dir, tmp_path):
    """The reference log-probs fdpo's penalty uses (TRL's reference pass, switched on only during generation) equal
    an independent forward of the initial checkpoint: log_softmax(logits / T) of the sampled tokens, after the
    policy has moved (step 2), and the policy's own log-probs differ from them."""
    from transformers import AutoModelForCausalLM

    from fdpo.trainers.grpo_trainer import FGRPOConfig, FGRPOTrainer

    T = 0.7
    tr = _run(FGRPOConfig, FGRPOTrainer, tiny_model_dir, _data(task_data_dir), tmp_path / "k2",
              divergence_coef=0.5, estimator="k2", temperature=T, max_steps=2)
    batch = tr._buffered_inputs[0]
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    c = batch["completion_ids"].size(1)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).double().eval()
    with torch.no_grad():
        logits = ref(input_ids=ids, attention_mask=attn).logits[:, -c - 1 : -1] / T
        want = logits.log_softmax(-1).gather(-1, batch["completion_ids"][..., None])[..., 0]
    m = batch["completion_mask"].bool()
    torch.testing.assert_close(batch["ref_per_token_logps"][m].double(), want[m], rtol=0, atol=2e-5)
    with torch.no_grad():
        pol = tr.model(input_ids=ids, attention_mask=attn).logits[:, -c - 1 : -1].double() / T
    moved = pol.log_softmax(-1).gather(-1, batch["completion_ids"][..., None])[..., 0]
    assert (moved[m] - want[m]).abs().max() > 1e-3


def test_k1_reward_advantages_from_an_independent_recomputation(tiny_model_dir, task_data_dir, tmp_path):
    """k1_reward: the advantages of the second generation batch equal, recomputed from scratch, the group-normalised
    (r − η Σ_t [log π_old − log π_ref]) with π_old = the policy after step 1 (snapshotted by a callback), π_ref = the
    initial checkpoint, both at the sampling temperature, r = the reward of the decoded completion."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from fdpo.trainers.grpo_trainer import FGRPOConfig, FGRPOTrainer

    class Snapshot(TrainerCallback):
        state = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                Snapshot.state = copy.deepcopy(model.state_dict())

    eta, T = 2.0, 0.9
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = FGRPOConfig(output_dir=str(tmp_path / "k1"), **{**COMMON, "max_steps": 2, "temperature": T},
                       divergence_coef=eta, estimator="k1_reward")
    tr = FGRPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model_dir), reward_funcs=[parity_reward],
                      args=args, train_dataset=_data(task_data_dir), processing_class=tok, callbacks=[Snapshot()])
    tr.train()
    b = tr._buffered_inputs[0]
    ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    attn = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
    c, m = b["completion_ids"].size(1), b["completion_mask"].double()

    def seq_logp(state_dict):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        if state_dict is not None:
            model.load_state_dict(state_dict)
        with torch.no_grad():
            logits = model.double()(input_ids=ids, attention_mask=attn).logits[:, -c - 1 : -1] / T
        return (logits.log_softmax(-1).gather(-1, b["completion_ids"][..., None])[..., 0] * m).sum(-1)

    k1 = seq_logp(Snapshot.state) - seq_logp(None)
    assert k1.abs().max() > 1e-3
    texts = [tok.decode(row[mask.bool()], skip_special_tokens=True) for row, mask in zip(b["completion_ids"], m)]
    r = torch.tensor(parity_reward(None, texts), dtype=torch.float64) - eta * k1
    groups = [tuple(x.tolist()) for x in b["prompt_ids"]]
    want = torch.empty_like(r)
    for g in set(groups):
        rows = torch.tensor([i for i, x in enumerate(groups) if x == g])
        want[rows] = (r[rows] - r[rows].mean()) / (r[rows].std() + 1e-4)
    torch.testing.assert_close(b["advantages"].double(), want, rtol=1e-4, atol=1e-4)
