"""Steerable preservation (issue 16): --cat_prompts (the CAT term on more trigger-free prompts, their
reference the base model with every adapter off) and --cat_drift_budget (alpha follows a budget), each
in the objective, the trainer, resume, and bad input."""

import json
import math
from dataclasses import replace

import pytest
import torch

import library.training.trainer as trainer
import train_network_cat
from library.cat.drift_budget import BETA, DriftBudget
from library.cat.objective import base_prediction, cat_step, preservation_loss
from library.families.sd.denoiser import SDDenoiser
from library.testing.tiny_cli import tiny_sd_argv, write_tiny_sd_workspace
from library.testing.tiny_sd import build_tiny_sd
from networks.lora_cat.file_format import read_lora_file
from test_cat_objective import CountingDenoiser, _batch, _mse, _setup


def _with_prompts(sd, batch, *prompts, weight=0.5):
    ids = [sd.tokenizer([p] * 2, padding="max_length", return_tensors="pt").input_ids for p in prompts]
    return replace(batch, prompt_ids=tuple(ids), prompt_weight=weight)


def _step(sd, network, batch, alpha, mode, denoiser=None):
    network.zero_grad(set_to_none=True)
    losses = cat_step(denoiser or SDDenoiser(sd.unet, sd.text_encoder), network, batch, alpha, mode, _mse,
                      lambda loss, last: loss.backward())
    return losses, {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}


def test_prompt_terms_are_against_the_separately_built_base_model_and_added_with_their_weight():
    sd, pristine, network = _setup()
    batch = _with_prompts(sd, _batch(sd), "a red car on a street", "a bowl of fruit")
    losses, grads = _step(sd, network, batch, 2.0, "sequential")
    denoiser = SDDenoiser(sd.unet, sd.text_encoder)
    terms = []
    with torch.no_grad():
        for ids in batch.prompt_ids:
            base = pristine.unet(batch.noisy_latents, batch.timesteps, pristine.text_encoder(ids).last_hidden_state).sample
            assert torch.allclose(base_prediction(denoiser, network, batch, ids), base, atol=1e-6)
            adapted = denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(ids))
            terms.append((preservation_loss(adapted, base) * batch.weights).mean())
    expected = torch.stack(terms).mean()
    assert expected > 0 and losses.prompts == pytest.approx(expected.item(), rel=1e-5)
    assert losses.preservation == pytest.approx((losses.cat + 0.5 * losses.prompts).item(), rel=1e-6)
    assert losses.total == pytest.approx((losses.main + 2.0 * losses.preservation).item(), rel=1e-6)
    # The gradients are those of the whole objective written out here.
    network.zero_grad(set_to_none=True)
    with torch.no_grad():
        reference = base_prediction(denoiser, network, batch)
    main = (_mse(denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(batch.trigger_ids)),
                 batch.target) * batch.weights).mean()
    cat = (preservation_loss(denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(batch.free_ids)),
                             reference) * batch.weights).mean()
    prompt_terms = []
    for ids in batch.prompt_ids:
        with torch.no_grad():
            base = base_prediction(denoiser, network, batch, ids)
        adapted = denoiser.predict(batch.noisy_latents, batch.timesteps, denoiser.encode(ids))
        prompt_terms.append((preservation_loss(adapted, base) * batch.weights).mean())
    (main + 2.0 * (cat + 0.5 * torch.stack(prompt_terms).mean())).backward()
    for name, p in network.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7)


def test_batched_and_sequential_agree_with_prompts_and_count_their_passes():
    sd, _, network = _setup()
    batch = _with_prompts(sd, _batch(sd), "a red car on a street", "a bowl of fruit", "a mountain lake")
    counting = CountingDenoiser(sd.unet, sd.text_encoder)
    batched, batched_grads = _step(sd, network, batch, 1.0, "batched", counting)
    assert counting.predict_calls == [2, 2, 2, 2, 10]  # 4 references, then one call on (2 + 3) x 2 samples
    counting.predict_calls.clear()
    sequential, sequential_grads = _step(sd, network, batch, 1.0, "sequential", counting)
    assert counting.predict_calls == [2, 2, 2, 2, 2, 2, 2, 2, 2]  # one at a time: plain-LoRA memory
    assert batched.prompts == pytest.approx(sequential.prompts.item(), rel=1e-5)
    for name in batched_grads:
        torch.testing.assert_close(batched_grads[name], sequential_grads[name], rtol=1e-4, atol=1e-7)


def test_without_prompts_the_step_is_unchanged_bitwise():
    sd, _, network = _setup()
    batch = _batch(sd)
    for mode in ("batched", "sequential"):
        losses, grads = _step(sd, network, batch, 1.0, mode)
        again, again_grads = _step(sd, network, replace(batch, prompt_ids=(), prompt_weight=7.0), 1.0, mode)
        assert losses.prompts is None and torch.equal(losses.total, again.total)
        assert torch.equal(losses.preservation, losses.cat)
        assert all(torch.equal(grads[n], again_grads[n]) for n in grads)


# --- the drift budget ---------------------------------------------------------------------------------


def test_alpha_rises_above_the_budget_and_falls_below_it():
    budget = DriftBudget(target=0.01, rate=0.1, alpha=1.0)
    assert budget.update(0.02) == pytest.approx(math.exp(0.1))  # running mean 0.02: above, by 100% (clipped)
    assert budget.running == 0.02
    above = budget.alpha
    budget.update(0.001)  # running mean 0.9 * 0.02 + 0.1 * 0.001 = 0.0181: still above
    assert budget.running == pytest.approx(BETA * 0.02 + (1 - BETA) * 0.001) and budget.alpha > above
    for _ in range(60):
        budget.update(0.001)
    assert budget.running < 0.01 and budget.alpha < above  # below the budget for a while: alpha came down
    low = budget.alpha
    budget.update(0.0)
    assert budget.alpha == pytest.approx(low * math.exp(0.1 * (budget.running - 0.01) / 0.01))
    at_target = DriftBudget(target=0.01, rate=0.1, alpha=3.0, running=0.01)
    assert at_target.update(0.01) == pytest.approx(3.0)


def test_alpha_stays_in_its_range_and_round_trips_through_its_state():
    budget = DriftBudget(target=1e-6, rate=5.0, alpha=1.0)
    for _ in range(20):
        budget.update(1.0)
    assert budget.alpha == 1e4
    restored = DriftBudget(target=1e-6, rate=5.0, alpha=1.0)
    restored.load_state_dict(json.loads(json.dumps(budget.state_dict())))
    assert restored == budget


# --- end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = write_tiny_sd_workspace(tmp_path_factory.mktemp("steering"))
    (root / "prompts.txt").write_text("# scenes the LoRA must leave alone\na red car on a street\na bowl of fruit\n"
                                      "a mountain lake at dawn\n", encoding="utf-8")
    return root


def _argv(workspace, out, *extra):
    return tiny_sd_argv(workspace, out, "--learning_rate", "1e-2", "--max_train_steps", "6", *extra)


def _steps(monkeypatch):
    """(alpha, prompts, the CATBatch's prompt ids) of every step the trainer runs."""
    seen = []
    real = trainer.cat_step

    def spy(denoiser, network, batch, alpha, mode, loss_fn, backward):
        losses = real(denoiser, network, batch, alpha, mode, loss_fn, backward)
        seen.append((alpha, losses, batch))
        return losses

    monkeypatch.setattr(trainer, "cat_step", spy)
    return seen


def test_cat_prompts_reach_every_step_drawn_reproducibly(workspace, tmp_path, monkeypatch):
    seen = _steps(monkeypatch)
    flags = ("--cat_prompts", str(workspace / "prompts.txt"), "--cat_prompts_per_step", "2",
             "--cat_prompts_weight", "0.5")
    assert train_network_cat.main(_argv(workspace, tmp_path / "a", *flags)) == 0
    tokenizer = build_tiny_sd(seed=0).tokenizer
    prompts = {p: tokenizer([p], padding="max_length", return_tensors="pt").input_ids[0]
               for p in ("a red car on a street", "a bowl of fruit", "a mountain lake at dawn")}
    drawn = []
    for _, losses, batch in seen:
        assert len(batch.prompt_ids) == 2 and batch.prompt_weight == 0.5 and losses.prompts is not None
        names = []
        for ids in batch.prompt_ids:
            assert all(torch.equal(row, ids[0]) for row in ids)  # every sample on the same prompt
            names.append(next(p for p, row in prompts.items() if torch.equal(row, ids[0])))
        assert len(set(names)) == 2
        drawn.append(tuple(names))
    assert len(set(drawn)) > 1  # drawn per batch
    first = list(drawn)
    seen.clear()
    assert train_network_cat.main(_argv(workspace, tmp_path / "b", *flags)) == 0
    assert [tuple(next(p for p, row in prompts.items() if torch.equal(row, ids[0])) for ids in batch.prompt_ids)
            for _, _, batch in seen] == first
    _, metadata = read_lora_file(tmp_path / "a" / "cat.safetensors")
    assert metadata["ss_cat_prompts"] == "prompts.txt" and metadata["ss_cat_prompts_per_step"] == "2"
    with_prompts, _ = read_lora_file(tmp_path / "a" / "cat.safetensors")
    assert train_network_cat.main(_argv(workspace, tmp_path / "c")) == 0
    without, _ = read_lora_file(tmp_path / "c" / "cat.safetensors")
    assert any(not torch.equal(with_prompts[k], without[k]) for k in with_prompts)  # the prompts changed what was learnt


def test_drift_budget_moves_alpha_and_resume_is_exact_across_a_change(workspace, tmp_path, monkeypatch):
    seen = _steps(monkeypatch)
    budget = ("--cat_drift_budget", "1e-9", "--cat_budget_rate", "0.2", "--cat_weight", "0.5")
    assert train_network_cat.main(_argv(workspace, tmp_path / "full", *budget)) == 0
    alphas = [alpha for alpha, _, _ in seen]
    # Step 1's CAT term is exactly 0 (a fresh LoRA is the base model): below any budget, alpha falls once;
    # from then on the term is far above a tiny budget, and alpha rises at every step.
    assert alphas[0] == 0.5 and alphas[1] == pytest.approx(0.5 * math.exp(-0.2))
    assert all(b > a for a, b in zip(alphas[1:], alphas[2:]))
    seen.clear()
    assert train_network_cat.main(_argv(workspace, tmp_path / "saving", *budget, "--save_state",
                                        "--save_every_n_steps", "3")) == 0
    state = tmp_path / "saving" / "cat-step00000003-state"
    saved = json.loads((state / "cat_budget.json").read_text())
    assert saved["alpha"] == pytest.approx(alphas[3])
    seen.clear()
    assert train_network_cat.main(_argv(workspace, tmp_path / "resumed", *budget, "--resume", str(state))) == 0
    assert [alpha for alpha, _, _ in seen] == alphas[3:]  # the same alphas, restored exactly
    full, _ = read_lora_file(tmp_path / "full" / "cat.safetensors")
    resumed, metadata = read_lora_file(tmp_path / "resumed" / "cat.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert metadata["ss_cat_drift_budget"] == "1e-09"
    # A generous budget lowers alpha from the start.
    seen.clear()
    assert train_network_cat.main(_argv(workspace, tmp_path / "loose", "--cat_drift_budget", "10", "--max_train_steps",
                                        "3")) == 0
    assert [alpha for alpha, _, _ in seen] == pytest.approx([1.0, math.exp(-0.05), math.exp(-0.1)], rel=1e-4)


def test_alpha_is_logged(workspace, tmp_path, monkeypatch):
    logged = []
    monkeypatch.setattr(trainer, "log_values", lambda accelerator, values, step, **_: logged.append((step, dict(values))))
    argv = _argv(workspace, tmp_path / "out", "--cat_drift_budget", "10", "--max_train_steps", "2", "--log_with",
                 "tensorboard", "--logging_dir", str(tmp_path / "logs"), "--cat_prompts", str(workspace / "prompts.txt"))
    assert train_network_cat.main(argv) == 0
    steps = [(step, values) for step, values in logged if "cat/alpha" in values]
    assert [step for step, _ in steps] == [1, 2] and steps[0][1]["cat/alpha"] == 1.0
    assert all("loss/cat_prompts" in values for _, values in steps)


@pytest.mark.parametrize("extra, expected", [
    (("--cat_prompts", "{empty}"), "holds no prompt"),
    (("--cat_prompts", "{missing}"), "does not exist"),
    (("--cat_prompts", "{trigger}"), "contain a trigger ['sks']"),
    (("--cat_prompts", "{prompts}", "--cat_prompts_per_step", "4"), "draw between 1 and the 3 prompts"),
    (("--cat_prompts", "{prompts}", "--cat_weight", "0"), "--cat_weight 0 turns off"),
    (("--cat_prompts_weight", "-1"), "--cat_prompts_weight"),
    (("--cat_drift_budget", "-0.5"), "--cat_drift_budget"),
    (("--cat_drift_budget", "0"), "finite number > 0"),
    (("--cat_drift_budget", "0.1", "--cat_budget_rate", "0"), "--cat_budget_rate"),
    (("--cat_drift_budget", "0.1", "--cat_weight", "0"), "--cat_weight 0 turns off"),
])
def test_bad_steering_input(workspace, tmp_path, capsys, extra, expected):
    files = {"empty": tmp_path / "empty.txt", "missing": tmp_path / "nope.txt", "trigger": tmp_path / "t.txt",
             "prompts": workspace / "prompts.txt"}
    files["empty"].write_text("# nothing\n\n", encoding="utf-8")
    files["trigger"].write_text("a red car\na photo of sks teapot\n", encoding="utf-8")
    argv = _argv(workspace, tmp_path / "out", *(arg.format(**files) for arg in extra))
    assert train_network_cat.main(argv) == 2
    assert expected in capsys.readouterr().err
    assert not any((tmp_path / "out").glob("*.safetensors"))


def test_resuming_a_budget_run_from_a_state_without_one_is_refused(workspace, tmp_path, capsys):
    assert train_network_cat.main(_argv(workspace, tmp_path / "a", "--save_state", "--save_every_n_steps", "3")) == 0
    argv = _argv(workspace, tmp_path / "b", "--cat_drift_budget", "0.1", "--resume",
                 str(tmp_path / "a" / "cat-step00000003-state"))
    assert train_network_cat.main(argv) == 2
    assert "saved by a run without --cat_drift_budget" in capsys.readouterr().err
