"""`fdpo presample` and `RehearsalBuffer` (DPH-RL, docs/objectives.md §7) on the tiny SFT model.

Independent truths: the sum_pairs checker applied by the test itself to every sampled completion
(recorded through a spy reward), the split recomputed from those verdicts, log π_ref recomputed in
float64 by a plain forward of each sample alone (no padding, logits / T), TRL's fused LM head on the
buffer's batch layout, and the DPH per-sample formula in float64.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from fdpo.data.presample import presample, resolve_presample_settings
from fdpo.data.rehearsal import (
    MANIFEST,
    SAMPLES,
    RehearsalBuffer,
    RehearsalMismatchError,
    load_rehearsal_tensors,
    read_manifest,
    write_rehearsal_dir,
)
from fdpo.data.tasks import get_task
from fdpo.recipe import load_presample_recipe

N = 4
TEMPERATURE = 0.7
NUM_PROMPTS = 12


class SpyReward:
    """The real sum_pairs verdict, recomputed here from the decoded text, with every call recorded."""

    __name__ = "spy_sum_pairs"

    def __init__(self) -> None:
        self.calls: list[tuple[object, str, int]] = []
        self.task = get_task("sum_pairs")

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        out = []
        for p, c, ids, target in zip(prompts, completions, completion_ids, kwargs["target"]):
            text = c[-1]["content"]
            self.calls.append((p, text, list(ids)))
            out.append(float(self.task.check({"target": target}, text)))
        return out


@pytest.fixture(scope="module")
def store(tiny_sft_dir: Path, task_data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """presample run twice with the same seed: once through the CLI (sum_pairs reward by name), once
    through the API with the spy reward; returns (settings, out_dir, spy, rows)."""
    from fdpo.cli import main

    tmp = tmp_path_factory.mktemp("dph")
    base = [json.loads(line) for line in (task_data_dir / "rl.jsonl").read_text().splitlines()[:NUM_PROMPTS]]
    rows = [*base[:5], base[0], *base[5:], base[3], base[3]]  # duplicated prompts must stay on one side
    data = tmp / "rl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp / "grpo.yaml"
    recipe.write_text(
        f"trainer: grpo\nmodel_name_or_path: {tiny_sft_dir}\ndataset_name: {data}\noutput_dir: {tmp / 'run'}\n"
        f"reward_funcs: [sum_pairs]\ntemperature: {TEMPERATURE}\nmax_completion_length: 10\n"
        "num_generations: 4\nper_device_train_batch_size: 4\npresample_batch_size: 20\nseed: 3\n"
    )
    with warnings.catch_warnings():  # "trainer 'grpo' is not registered" until FGRPOTrainer is merged
        warnings.simplefilter("ignore", UserWarning)
        assert main(["presample", str(recipe), "--presample_n", str(N)]) == 0
        settings = resolve_presample_settings(load_presample_recipe(recipe, {"presample_n": N, "presample_dir": str(tmp / "spy")}))
    spy = SpyReward()
    presample(dataclasses.replace(settings, reward_funcs=[spy]))
    return settings, tmp / "run" / "dph", tmp / "spy", spy, rows


def _samples(tensors):
    po, co = tensors["prompt_offsets"], tensors["completion_offsets"]
    for i in range(int(tensors["sample_prompt_row"].numel())):
        yield (
            int(tensors["sample_prompt_row"][i]),
            tensors["prompt_ids"][po[i] : po[i + 1]].long(),
            tensors["completion_ids"][co[i] : co[i + 1]].long(),
            tensors["ref_logps"][co[i] : co[i + 1]].double(),
            tensors["completion_mask"][co[i] : co[i + 1]],
        )


def _key(row):
    return (row["prompt"][-1]["content"], row["target"])


def test_split_matches_the_verifier_on_every_sample(store, tiny_sft_dir):
    from transformers import AutoTokenizer

    _, out, spy_out, spy, rows = store
    tok = AutoTokenizer.from_pretrained(tiny_sft_dir)
    keys = list(dict.fromkeys(_key(r) for r in rows))  # distinct prompts, first-appearance order
    first_row = {k: next(i for i, r in enumerate(rows) if _key(r) == k) for k in keys}
    assert len(keys) < len(rows)
    assert len(spy.calls) == len(keys) * N  # each distinct prompt sampled n times, once
    # the test's own verdicts, per distinct prompt (samples are prompt-major, N per prompt)
    task = get_task("sum_pairs")
    verdicts = {}
    for g, k in enumerate(keys):
        calls = spy.calls[g * N : (g + 1) * N]
        assert all(c[0] == rows[first_row[k]]["prompt"] for c in calls)
        verdicts[k] = [task.check(rows[first_row[k]], c[1]) for c in calls]
    pef_keys = {k for k in keys if sum(verdicts[k]) >= N}  # pef_threshold 1.0 (the default)
    want_pef = {i for i, r in enumerate(rows) if _key(r) in pef_keys}
    want_exp = set(range(len(rows))) - want_pef
    assert pef_keys and want_exp, "the tiny SFT model should solve some prompts always and some not"

    for directory in (out, spy_out):  # the CLI run (named reward) and the spy run draw the same samples
        manifest, tensors = load_rehearsal_tensors(directory)
        pef = set(tensors["pef_rows"].tolist())
        exp = set(tensors["exp_rows"].tolist())
        assert pef == want_pef and exp == want_exp and not (pef & exp) and (pef | exp) == set(range(len(rows)))
        assert manifest["counts"] == {
            "rows": len(rows),
            "prompts": len(keys),
            "d_pef": len(want_pef),
            "d_exp": len(want_exp),
            "d_pef_prompts": len(pef_keys),
            "d_exp_prompts": len(keys) - len(pef_keys),
            "samples": len(keys) * N,
            "samples_correct": sum(map(sum, verdicts.values())),
            "samples_finished": manifest["counts"]["samples_finished"],
            "stored_samples": N * len(pef_keys),
            "stored_tokens": int(tensors["completion_ids"].numel()),
        }
        assert math.isclose(manifest["frac_pef"], len(pef_keys) / len(keys))
        assert math.isclose(manifest["frac_pef_rows"], len(want_pef) / len(rows))
        # the jsonl files hold exactly those rows (duplicates included), unchanged
        d_exp = [json.loads(x) for x in (directory / "d_exp.jsonl").read_text().splitlines()]
        d_pef = [json.loads(x) for x in (directory / "d_pef.jsonl").read_text().splitlines()]
        assert d_exp == [rows[i] for i in sorted(want_exp)]
        assert d_pef == [rows[i] for i in sorted(want_pef)]
        # every stored sample: a D_pef prompt, the verifier accepts its text, prompt ids are the template's
        stored = list(_samples(tensors))
        assert sorted(r for r, *_ in stored) == sorted(first_row[k] for k in pef_keys for _ in range(N))
        eos = tok.eos_token_id
        for row, p_ids, c_ids, _, mask in stored:
            text = tok.decode(c_ids.tolist(), skip_special_tokens=True)
            assert task.check(rows[row], text)
            assert int(c_ids[-1]) == eos and eos not in c_ids[:-1].tolist()  # cut after the first eos, kept
            assert mask.tolist() == [1] * len(c_ids)
            rendered = tok.apply_chat_template(rows[row]["prompt"], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
            assert p_ids.tolist() == list(rendered)
        # the spy saw the same completions (by token ids) as were stored
        if directory == spy_out:
            recorded = {
                (first_row[k], tuple(spy.calls[g * N + j][2]))
                for g, k in enumerate(keys) if k in pef_keys for j in range(N)
            }
            assert {(r, tuple(c.tolist())) for r, _, c, _, _ in stored} == recorded


def test_manifest_records_settings_and_fingerprint(store, tiny_sft_dir):
    from transformers import AutoTokenizer

    _, out, *_ = store
    m = read_manifest(out)
    g = m["generation"]
    assert (g["temperature"], g["top_p"], g["top_k"], g["max_completion_length"], g["n"], g["seed"]) == (
        TEMPERATURE, 1.0, 0, 10, N, 3)
    assert m["model_name_or_path"] == str(tiny_sft_dir)
    assert m["reward_funcs"] == ["sum_pairs"] and m["pef_threshold"] == 1.0
    tok = AutoTokenizer.from_pretrained(tiny_sft_dir)
    t = m["tokenizer"]
    assert t["vocab_size"] == len(tok.get_vocab())
    assert t["special_tokens"]["eos_token"] == tok.eos_token and t["special_tokens"]["pad_token_id"] == 0
    assert set(m["files"]) == {SAMPLES, "d_exp.jsonl", "d_pef.jsonl"}


def test_stored_logps_equal_a_fresh_teacher_forced_forward_at_the_temperature(store, tiny_sft_dir):
    from transformers import AutoModelForCausalLM

    _, out, *_ = store
    model = AutoModelForCausalLM.from_pretrained(tiny_sft_dir, dtype=torch.float64).eval()
    _, tensors = load_rehearsal_tensors(out)
    worst, worst_t1 = 0.0, 0.0
    with torch.no_grad():
        for _, p_ids, c_ids, stored, _ in _samples(tensors):
            ids = torch.cat([p_ids, c_ids]).unsqueeze(0)  # one sequence alone: no padding at all
            logits = model(input_ids=ids).logits[0, len(p_ids) - 1 : -1]
            fresh = torch.log_softmax(logits / TEMPERATURE, -1).gather(-1, c_ids[:, None]).squeeze(-1)
            at_t1 = torch.log_softmax(logits, -1).gather(-1, c_ids[:, None]).squeeze(-1)
            worst = max(worst, float((fresh - stored).abs().max()))
            worst_t1 = max(worst_t1, float((at_t1 - stored).abs().max()))
    assert worst < 2e-5, worst
    assert worst_t1 > 1e-2  # the temperature matters: T = 1 log-probs are not what is stored


def test_buffer_batches_match_trl_fused_head_and_rehearsal_loss_matches_float64(store, tiny_sft_dir):
    """The buffer's batch, run through TRL's fused LM head (the GRPOTrainer training path), reproduces
    the stored log π_ref; the rehearsal loss against a perturbed policy equals the DPH formulas in
    float64 from unpadded forwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    from fdpo.losses.dph import rehearsal_loss

    _, out, *_ = store
    tok = AutoTokenizer.from_pretrained(tiny_sft_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_sft_dir).eval()
    add_fused_lm_head(ref, temperature=TEMPERATURE)
    buf = RehearsalBuffer(out, tokenizer=tok, temperature=TEMPERATURE, batch_size=7, seed=5)
    batch = buf.next_batch()
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    labels[:, : -batch.logits_to_keep] = -100
    with torch.no_grad():
        lp = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels,
                 fused_lm_head=True).log_probs[:, -batch.logits_to_keep :]
    assert float(((lp - batch.ref_logps) * batch.completion_mask).abs().max()) < 2e-5

    policy = AutoModelForCausalLM.from_pretrained(tiny_sft_dir, dtype=torch.float64).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        pol = torch.log_softmax(policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                                .logits[:, -batch.logits_to_keep - 1 : -1] / TEMPERATURE, -1)
        pol = pol.gather(-1, batch.input_ids[:, -batch.logits_to_keep :, None]).squeeze(-1)
    _, tensors = load_rehearsal_tensors(out)
    samples = list(_samples(tensors))
    ref64 = AutoModelForCausalLM.from_pretrained(tiny_sft_dir, dtype=torch.float64).eval()
    direct = {"forward_kl": [], "js": []}
    with torch.no_grad():
        for idx in batch.indices.tolist():
            _, p_ids, c_ids, _, _ = samples[idx]
            ids = torch.cat([p_ids, c_ids]).unsqueeze(0)
            sl = slice(len(p_ids) - 1, -1)
            lq = torch.log_softmax(ref64(input_ids=ids).logits[0, sl] / TEMPERATURE, -1)
            lpp = torch.log_softmax(policy(input_ids=ids).logits[0, sl] / TEMPERATURE, -1)
            u = torch.exp(lpp.gather(-1, c_ids[:, None]) - lq.gather(-1, c_ids[:, None])).squeeze(-1)
            direct["forward_kl"].append(u - torch.log(u) - 1)
            direct["js"].append(u * torch.log(u) - (u + 1) * torch.log((u + 1) / 2))
    for name, per_sample in direct.items():
        want = torch.cat(per_sample).mean()
        loss, metrics = rehearsal_loss(pol, batch.ref_logps, batch.completion_mask, name)
        assert float(want) > 1e-4
        assert abs(float(loss) - float(want)) < 1e-4 * max(1.0, float(want)), (name, float(loss), float(want))
        assert int(metrics["rehearsal/tokens"]) == int(batch.completion_mask.sum())


def _tok(tiny_sft_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_sft_dir)


def test_buffer_refuses_mismatched_tokenizer_template_or_temperature(store, tiny_sft_dir):
    _, out, *_ = store
    where = str(out / MANIFEST)
    with pytest.raises(RehearsalMismatchError, match=r"generation\.temperature") as exc:
        RehearsalBuffer(out, tokenizer=_tok(tiny_sft_dir), temperature=1.0, batch_size=2)
    assert where in str(exc.value)
    tok = _tok(tiny_sft_dir)
    tok.chat_template = tok.chat_template.replace("<|assistant|>", "<|assistant|> ")
    with pytest.raises(RehearsalMismatchError, match=r"chat_template_sha256") as exc:
        RehearsalBuffer(out, tokenizer=tok, temperature=TEMPERATURE, batch_size=2)
    assert where in str(exc.value)
    with pytest.raises(RehearsalMismatchError, match=r"chat_template_kwargs"):
        RehearsalBuffer(out, tokenizer=_tok(tiny_sft_dir), temperature=TEMPERATURE, batch_size=2,
                        chat_template_kwargs={"enable_thinking": False})
    tok = _tok(tiny_sft_dir)
    tok.add_tokens(["<|brand_new|>"])
    with pytest.raises(RehearsalMismatchError, match=r"tokenizer\.vocab_sha256"):
        RehearsalBuffer(out, tokenizer=tok, temperature=TEMPERATURE, batch_size=2)
    tok = _tok(tiny_sft_dir)
    tok.pad_token = tok.eos_token
    with pytest.raises(RehearsalMismatchError, match=r"special_tokens\.pad_token"):
        RehearsalBuffer(out, tokenizer=tok, temperature=TEMPERATURE, batch_size=2)
    # the matching settings load
    assert len(RehearsalBuffer(out, tokenizer=_tok(tiny_sft_dir), temperature=TEMPERATURE, batch_size=2)) > 0


def test_buffer_order_is_deterministic_complete_and_resumable(store, tiny_sft_dir):
    _, out, *_ = store
    tok = _tok(tiny_sft_dir)

    def make(**kw):
        return RehearsalBuffer(out, tokenizer=tok, temperature=TEMPERATURE, **{"batch_size": 5, "seed": 11, **kw})

    a, b = make(), make()
    n = len(a)
    stream = torch.cat([a.next_indices() for _ in range(2 * n)])  # 10 n indices = 5 full epochs... exactly
    assert torch.equal(stream, torch.cat([b.next_indices() for _ in range(2 * n)]))
    for e in range(5):  # each epoch visits every sample once
        assert sorted(stream[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # reshuffled per epoch
    assert not torch.equal(stream[:n], torch.cat([make(seed=12).next_indices() for _ in range(n)])[:n])
    # resume mid-epoch
    c = make()
    for _ in range(3):
        c.next_indices()
    state = json.loads(json.dumps(c.state_dict()))
    d = make()
    d.load_state_dict(state)
    assert torch.equal(torch.cat([d.next_indices() for _ in range(4)]), stream[15:35])
    # two ranks split each global batch of the single-process stream with batch 2 × 5
    single = make(batch_size=10)
    r0, r1 = make(rank=0, world_size=2), make(rank=1, world_size=2)
    for _ in range(3):
        glob = single.next_indices()
        assert torch.equal(torch.cat([r0.next_indices(), r1.next_indices()]), glob)
    # a different store cannot resume this state
    state["samples_sha256"] = "0" * 64
    with pytest.raises(RehearsalMismatchError, match="samples_sha256"):
        make().load_state_dict(state)


def test_store_write_is_atomic(tmp_path):
    out = tmp_path / "dph"
    tensors = {"x": torch.arange(3)}

    def boom(path):
        path.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_rehearsal_dir(out, {"a": 1}, tensors, {"d_exp.jsonl": boom})
    assert not out.exists() and list(tmp_path.iterdir()) == []  # absent, no temp left behind
    write_rehearsal_dir(out, {"a": 1}, tensors, {"d_exp.jsonl": lambda p: p.write_text("ok\n")})
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RuntimeError, match="disk full"):
        write_rehearsal_dir(out, {"a": 2}, tensors, {"d_exp.jsonl": boom})
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old store, intact
    assert [p.name for p in tmp_path.iterdir()] == ["dph"]
    assert read_manifest(out)["a"] == 1
    # a replaced store is complete, and a tampered tensor file is refused
    write_rehearsal_dir(out, {"a": 3}, {"x": torch.arange(4)}, {})
    assert read_manifest(out)["a"] == 3 and [p.name for p in tmp_path.iterdir()] == ["dph"]
    (out / SAMPLES).write_bytes((out / SAMPLES).read_bytes()[:-1] + b"\x01")
    with pytest.raises(RehearsalMismatchError, match="sha256"):
        load_rehearsal_tensors(out)


def test_recipe_errors_name_the_key(tmp_path):
    from fdpo.errors import RecipeError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("trainer: grpo\nmodel_name_or_path: m\ndataset_name: d.jsonl\noutput_dir: o\n"
                      "reward_funcs: [sum_pairs]\nnum_generations: 2\nper_device_train_batch_size: 2\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(RecipeError, match="pef_threshold"):
            resolve_presample_settings(load_presample_recipe(recipe, {"pef_threshold": 1.5}))
        with pytest.raises(RecipeError, match="presample_nn"):
            resolve_presample_settings(load_presample_recipe(recipe, {"presample_nn": 3}))
        with pytest.raises(RecipeError, match="reward_funcs"):
            resolve_presample_settings(load_presample_recipe(recipe, {"reward_funcs": []}))
        s = resolve_presample_settings(load_presample_recipe(recipe, {"temperature": 0.5, "top_p": 0.9}))
    assert (s.temperature, s.top_p, s.n, s.pef_threshold, s.max_completion_length) == (0.5, 0.9, 8, 1.0, 512)
    assert s.out_dir == str(Path("o") / "dph")


def test_buffer_checkpoint_state_file_roundtrip(store, tiny_sft_dir, tmp_path):
    _, out, *_ = store
    tok = _tok(tiny_sft_dir)

    def make():
        return RehearsalBuffer(out, tokenizer=tok, temperature=TEMPERATURE, batch_size=3, seed=4)

    buf = make()
    first = buf.next_batch()
    assert first.input_ids.shape[0] == 3 and first.ref_logps.shape == first.completion_mask.shape
    buf.save_state(tmp_path)
    second = buf.next_batch()
    again = make()
    assert again.load_state(tmp_path) and torch.equal(again.next_batch().indices, second.indices)
    assert not make().load_state(tmp_path / "none")


def test_pipeline_presample_stage_runs_once_into_its_folder(store, tmp_path):
    from fdpo.pipeline import run_pipeline

    settings, *_ = store
    pipe = tmp_path / "pipeline.yaml"
    pipe.write_text(
        f"run_dir: {tmp_path / 'run'}\nstages:\n  - name: dph\n    kind: presample\n"
        f"    recipe: {settings.recipe_path}\n    overrides: {{presample_n: 2}}\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        first = run_pipeline(pipe)
        again = run_pipeline(pipe)
    manifest = read_manifest(tmp_path / "run" / "dph")
    assert manifest["generation"]["n"] == 2 and manifest["out_dir"] == str((tmp_path / "run" / "dph").resolve())
    assert first[0].status == "ran" and again[0].status == "skipped"
    assert again[0].metrics["d_pef"] == manifest["counts"]["d_pef_prompts"] == first[0].metrics["d_pef"]
