"""The six methods on the shared loop: each runs through `python -m fastdmd.train`'s code path, and the
piece of math that makes it that method is checked on its own."""

import dataclasses
import json
import math
import os

import pytest
import torch

from fastdmd import ops
from fastdmd.config import ConfigError, parse_args
from fastdmd.distributed import World
from fastdmd.objectives import Batch
from fastdmd.objectives import gndm as gndm_module
from fastdmd.objectives.gndm import group_mean
from fastdmd.objectives.rtdmd import cps_back_coeffs
from fastdmd.roles import LoraRealScore
from fastdmd.rollout.sde import cps_step
from fastdmd.train import main
from fastdmd import trainer as trainer_module
from fastdmd.generate import load_generator
from fastdmd.models.digits import build_digits_unet
from fastdmd.runs import UsageError
from fastdmd.trainer import Trainer, step_generator

TINY = ["--trainer.batch_size", "8", "--reward.group_size", "4", "--trainer.log_every", "1",
        "--trainer.sample_every", "0", "--trainer.warmup_steps", "0", "--eval.at_end", "false", "--threads", "1"]


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def trainer_for(tmp_path, *args) -> Trainer:
    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), *args])
    return Trainer(cfg, World())


def perturb_critic(trainer: Trainer) -> None:
    """At step 1 the critic equals the teacher and every DMD gradient is 0; move it a little."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in trainer.fake.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))


def first_batch(trainer: Trainer, step: int = 1, k: int = 3) -> Batch:
    t, n = trainer.cfg.trainer, trainer.objective.group_size
    rng = step_generator(t.seed, 0, step)
    labels = torch.randint(0, 10, (t.batch_size // n,), generator=rng).repeat_interleave(n)
    noise = torch.randn((t.batch_size, 1, 16, 16), generator=rng)
    return Batch(step, labels, noise, k, rng)


@pytest.fixture(scope="module")
def dmd2_run(tmp_path_factory):
    """A short DMD2 run whose final weights start DrPO."""
    run = tmp_path_factory.mktemp("dmd2")
    main(TINY + ["--trainer.steps", "2", "--run_dir", str(run)])
    return run


@pytest.mark.parametrize("recipe, keys", [
    ("digits-dmdr", {"reward", "reward_on", "loss_dmd"}),
    ("digits-gdmd", {"gdmd_weight_max", "reward_targets"}),
    ("digits-gndm", {"loss_dmd", "dmd_normalizer"}),
    ("digits-gndmr", {"loss_policy", "clip_frac", "fusion_weight_0", "fusion_weight_1"}),
    ("digits-rtdmd", {"stage", "loss_consistency"}),
])
def test_each_recipe_trains_from_the_teacher(tmp_path, recipe, keys):
    extra = ["--rtdmd.stage1_steps", "1"] if recipe == "digits-rtdmd" else []
    main(["--recipe", recipe, *TINY, "--trainer.steps", "2", "--run_dir", str(tmp_path), *extra])
    log = rows(tmp_path)
    assert [r["step"] for r in log] == [1, 2]
    assert keys <= set(log[-1])
    assert all(math.isfinite(r["loss_generator"]) and r["skipped_generator_updates"] == 0 for r in log)
    if recipe == "digits-rtdmd":
        assert [r["stage"] for r in log] == [1.0, 2.0]
        assert "loss_policy" in log[1] and "loss_policy" not in log[0]


def test_drpo_needs_a_distilled_start_and_trains_without_critic(tmp_path, dmd2_run, monkeypatch):
    with pytest.raises(ConfigError, match="model.init_generator"):
        parse_args(["--recipe", "digits-drpo"])
    trainer = trainer_for(tmp_path, "--recipe", "digits-drpo", "--model.init_generator", str(dmd2_run),
                          "--trainer.lr_generator", "1e-3")
    assert trainer.fake is None and "critic" not in trainer.checkpoint_state()
    base = trainer.objective.roles.base
    start = [p.detach().clone() for p in trainer.generator.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(start, base.parameters()))  # base = the DMD2 student
    trainer.train_step(1)
    assert not all(torch.equal(a, b) for a, b in zip(start, trainer.generator.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(start, base.parameters()))  # the base stays frozen

    other = dataclasses.replace(load_generator(str(dmd2_run)), net=build_digits_unet(block_out_channels=(16, 32)))
    monkeypatch.setattr(trainer_module, "load_generator", lambda path: other)
    with pytest.raises(UsageError, match=r"its weights do not fit this run's digits generator .* tensors missing, "
                                         r"extra or of another shape, e\.g\. "):
        trainer._init_generator_from(str(dmd2_run))


def test_dmdr_reward_switches_on_after_the_cold_start(tmp_path):
    main(["--recipe", "digits-dmdr", *TINY, "--trainer.steps", "2", "--dmdr.cold_start", "1",
          "--run_dir", str(tmp_path)])
    first, second = rows(tmp_path)
    assert first["reward_on"] == 0 and second["reward_on"] == 1
    assert first["loss_generator"] == pytest.approx(first["loss_dmd"], rel=1e-5)
    weight = parse_args(["--recipe", "digits-dmdr"]).dmdr.reward_weight  # the recipe's, 0.02
    assert second["loss_generator"] == pytest.approx(second["loss_dmd"] - weight * second["reward"], rel=1e-4)


def test_dmdr_distribution_guidance_shares_one_lora(tmp_path):
    trainer = trainer_for(tmp_path, "--recipe", "digits-dmdr")
    fake = trainer.fake
    assert {n for n, p in fake.named_parameters() if p.requires_grad} and \
        all("lora_" in n for n, p in fake.named_parameters() if p.requires_grad)
    for module in fake.net.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    x, s, y = torch.randn(4, 1, 16, 16), torch.full((4,), 0.5), torch.arange(4)
    teacher = trainer.real.predict(x, s, y, 1.0)[0]
    at_zero = LoraRealScore(fake.net, trainer.adapter, 0.0).predict(x, s, y, 1.0)[0]
    at_start = LoraRealScore(fake.net, trainer.adapter, 0.75).predict(x, s, y, 1.0)[0]
    torch.testing.assert_close(at_zero, teacher)  # scale 0: the real score is the teacher
    assert (at_start - teacher).abs().max() > 1e-3
    with torch.no_grad():
        assert (fake.predict(x, s, y) - at_start).abs().max() > 1e-3  # the fake score uses scale 2
    assert trainer.objective.real_score(1).scale == pytest.approx(0.75)
    assert trainer.objective.real_score(trainer.cfg.dmdr.guidance_steps + 1).scale == pytest.approx(0.0)


def test_new_weights_repeat_from_the_seed_whatever_the_global_stream(tmp_path):
    """peft initializes the LoRA A matrices from torch's global stream; the trainer seeds it from
    trainer.seed, so two runs of one config start alike (they differed before: DMDR seed 0 gave FD
    0.1445 and 0.1413 in two runs of the same config)."""
    def lora_a(seed_arg, disturb):
        torch.manual_seed(disturb)
        trainer = trainer_for(tmp_path / f"{seed_arg}-{disturb}", "--recipe", "digits-dmdr", "--trainer.seed", seed_arg)
        return [p.detach().clone() for n, p in trainer.fake.named_parameters() if "lora_A" in n]

    first, again, other = lora_a("0", 1), lora_a("0", 2), lora_a("1", 1)
    assert first and all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_gdmd_with_a_flat_reward_is_plain_dmd_averaged_over_targets(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, "--recipe", "digits-gdmd")
    perturb_critic(trainer)
    seen = []
    real_op = ops.dmd_target

    def spy(*args, **kwargs):
        out = real_op(*args, **kwargs)
        seen.append((kwargs.get("weights"), out.loss))
        return out

    monkeypatch.setattr(ops, "dmd_target", spy)
    monkeypatch.setattr(type(trainer.reward.rewards[0]), "score", lambda self, images, labels, dmd:
                        torch.zeros(images.shape[0]))
    update = next(trainer.objective.generator_updates(first_batch(trainer)))
    k = trainer.cfg.gdmd.num_targets
    plain, weighted = seen[:k], seen[k:]
    assert all(w is None for w, _ in plain) and all(torch.equal(w, torch.ones(8)) for w, _ in weighted)
    assert len({loss.item() for _, loss in plain}) == k > 1  # K different noise levels
    torch.testing.assert_close(update.loss, torch.stack([loss for _, loss in plain]).mean())


def test_gdmd_weights_favour_the_targets_the_reward_prefers(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, "--recipe", "digits-gdmd")
    perturb_critic(trainer)
    weights = []
    real_op = ops.dmd_target
    monkeypatch.setattr(ops, "dmd_target", lambda *a, **kw: (weights.append(kw.get("weights")), real_op(*a, **kw))[1])
    # Score a target by its mean brightness: the brighter target of each sample must get more weight.
    monkeypatch.setattr(type(trainer.reward.rewards[0]), "score", lambda self, images, labels, dmd:
                        images.flatten(1).mean(1))
    brightness = []
    real_scores = trainer.reward.scores

    def scores(images, labels, dmd=None):
        brightness.append(images.flatten(1).mean(1))
        return real_scores(images, labels, dmd)

    monkeypatch.setattr(trainer.reward, "scores", scores)
    next(trainer.objective.generator_updates(first_batch(trainer)))
    w = torch.stack([x for x in weights if x is not None], dim=1)      # [B, K]
    b = torch.stack(brightness, dim=1)
    best, worst = b.argmax(1), b.argmin(1)
    rows_ = torch.arange(8)
    assert (w[rows_, best] > w[rows_, worst]).all()


def test_group_mean_and_the_gndm_group_forms(tmp_path, monkeypatch):
    torch.testing.assert_close(group_mean(torch.tensor([1.0, 3.0, 10.0, float("nan")]), 2),
                               torch.tensor([2.0, 2.0, 10.0, 10.0]))
    losses, weights = {}, []
    real_op = ops.dmd_target
    monkeypatch.setattr(ops, "dmd_target", lambda *a, **kw: (weights.append(kw.get("weights")), real_op(*a, **kw))[1])
    for form in ("none", "group_normalizer", "baseline"):
        trainer = trainer_for(tmp_path / form, "--recipe", "digits-gndm", "--gndm.normalization", form)
        perturb_critic(trainer)
        weights.clear()
        losses[form] = next(trainer.objective.generator_updates(first_batch(trainer))).loss.item()
        if form == "group_normalizer":
            w = weights[-1]
            torch.testing.assert_close(w.reshape(2, 4).mean(1), torch.ones(2))  # normalizer_i / group mean
            assert w.std() > 0
    # (b) removes the group-mean gradient: what is left is a deviation, never larger than the gradient.
    assert 0 < losses["baseline"] < losses["none"]
    assert losses["group_normalizer"] != pytest.approx(losses["none"])


def test_gndmr_importance_sampling_ratios_and_adaptive_fusion(tmp_path):
    trainer = trainer_for(tmp_path, "--recipe", "digits-gndmr", "--trainer.lr_generator", "1e-3",
                          "--trainer.lr_schedule", "constant")
    updates = trainer.objective.generator_updates(first_batch(trainer))
    first = next(updates)
    assert first.logs["ratio_max_dev"] == 0.0  # on-policy: exactly 1
    first.loss.backward()
    trainer.opt_g.step()
    trainer.opt_g.zero_grad()
    second = next(updates)
    assert second.logs["ratio_max_dev"] > 0  # the same rollout, now off-policy
    with pytest.raises(StopIteration):
        next(updates)

    fusion = trainer.objective
    fusion.spread_ema = torch.tensor([float("nan")] * 2)
    base = torch.tensor([1.0, 1.0])
    spread = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.0, 2.0, 4.0, 6.0], [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]]).T
    torch.testing.assert_close(fusion.fusion_weights(spread, base), base)  # first step: the running mean
    flat_second = spread.clone()
    flat_second[:, 1] = 0.5 * flat_second[:, 1]  # reward 1's groups separate half as much as usual
    w = fusion.fusion_weights(flat_second, base)
    assert w[1] < w[0] and w.sum() == pytest.approx(2.0)


def test_gndmr_fusion_state_has_one_entry_per_named_reward(tmp_path):
    names = "distribution_matching,classifier_log_prob,"  # a trailing comma names no third reward
    trainer = trainer_for(tmp_path, "--recipe", "digits-gndmr", "--reward.names", names)
    assert trainer.reward.names == ("distribution_matching_grad_sq", "classifier_log_prob")
    assert trainer.objective.spread_ema.shape == (2,)
    next(trainer.objective.generator_updates(first_batch(trainer)))  # the fusion weights take their shape from it


def test_gndmr_dm_loss_at_the_backward_simulation_step(tmp_path, monkeypatch):
    trainer = trainer_for(tmp_path, "--recipe", "digits-gndmr", "--gndm.dm_step", "backward_sim")
    perturb_critic(trainer)
    op_inputs, rollouts = [], []
    real_op, real_rollout = ops.dmd_target, gndm_module.sde_rollout
    monkeypatch.setattr(ops, "dmd_target", lambda x0, *a, **kw: (op_inputs.append(x0), real_op(x0, *a, **kw))[1])
    monkeypatch.setattr(gndm_module, "sde_rollout",
                        lambda *a, **kw: (rollouts.append(real_rollout(*a, **kw)), rollouts[-1])[1])
    batch = first_batch(trainer, k=1)
    update = next(trainer.objective.generator_updates(batch))
    rollout, gen = rollouts[0], trainer.objective.roles.generator
    with torch.no_grad():
        sigma = torch.full((8,), trainer.cfg.dmd.generator_sigmas[1])
        step_1_x0 = gen(rollout.trajectory[1], sigma, batch.labels)
    with_grad = [x for x in op_inputs if x.requires_grad]
    assert with_grad, "the DM loss must reach the generator"
    for x0 in with_grad:  # the DM loss is taken on step k's clean prediction, from the rollout's state
        torch.testing.assert_close(x0.detach(), step_1_x0)
    # ... while R_dm, a reward, is measured on the final samples.
    assert any(torch.equal(x0, rollout.sample) for x0 in op_inputs)
    assert not torch.allclose(step_1_x0, rollout.sample)
    update.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gen.parameters())


def test_rtdmd_cps_back_step_is_affine_in_the_velocity():
    torch.manual_seed(0)
    x_t, v, xi = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0.9, 0.6, 0.35])
    for s in (0.0, 0.25, 0.3):
        a, b, c = cps_back_coeffs(t, s, 0.9)
        expected = cps_step(x_t, v, t, torch.full((3,), s), 0.9, xi).x_next
        got = a.view(3, 1, 1, 1) * x_t + b.view(3, 1, 1, 1) * v + c.view(3, 1, 1, 1) * xi
        torch.testing.assert_close(got, expected)
    a, b, c = cps_back_coeffs(t, 0.0, 0.9)
    torch.testing.assert_close((a, b, c), (torch.ones(3), -t, torch.zeros(3)))  # s = 0: DMD2's x0 = x_t - t v


def test_rtdmd_critic_target_is_the_flow_target_at_s_zero(tmp_path):
    trainer = trainer_for(tmp_path, "--recipe", "digits-rtdmd", "--rtdmd.consistency_weight", "0")
    obj = trainer.objective
    x0 = torch.randn(8, 1, 16, 16)
    obj.samples, obj.sample_labels, obj.sample_sigma = x0, torch.arange(8) % 10, 0.0
    rng = torch.Generator().manual_seed(3)
    loss, _ = obj.critic_loss(1, rng)
    rng = torch.Generator().manual_seed(3)
    x_t, t, sigma_ts, eps = obj._renoise(x0, 0.0, rng)
    torch.testing.assert_close(sigma_ts, t)
    with torch.no_grad():
        pred = trainer.fake.predict(x_t, t, obj.sample_labels)
    weight = (10 * t**2).clamp(max=1.0)
    expected = (weight * (pred - (eps - x0)).pow(2).flatten(1).mean(1)).mean()
    torch.testing.assert_close(loss.detach(), expected)


def test_rtdmd_fresh_last_trains_the_critic_on_full_samples_at_s_zero(tmp_path):
    """Stage 1 leaves its generator state at sigma s > 0 (k = 0: after the first step, s = 0.75); with
    critic_samples fresh_last the critic's samples are then fresh 4-step samples, at s = 0."""
    trainer = trainer_for(tmp_path, "--recipe", "digits-rtdmd", "--trainer.critic_samples", "fresh_last")
    obj = trainer.objective
    next(obj.generator_updates(first_batch(trainer, k=0)))
    assert obj.sample_sigma == 0.75
    trainer._fresh_critic_samples(1, 0)
    assert obj.sample_sigma == 0.0 and obj.samples.shape == (8, 1, 16, 16)
    assert not torch.equal(obj.sample_labels, first_batch(trainer, k=0).labels)  # its own labels


def test_nan_reward_skips_the_update_and_is_counted(tmp_path, monkeypatch):
    from fastdmd.rewards import ClassifierLogProb

    real_score = ClassifierLogProb.score

    def poisoned(self, images, labels, dmd):
        out = real_score(self, images, labels, dmd)
        return out * float("nan") if images.requires_grad else out

    monkeypatch.setattr(ClassifierLogProb, "score", poisoned)
    main(["--recipe", "digits-dmdr", *TINY, "--trainer.steps", "2", "--dmdr.cold_start", "1",
          "--run_dir", str(tmp_path)])
    first, second = rows(tmp_path)
    assert first["skipped_generator_updates"] == 0  # cold start: the reward is not in the loss
    assert second["skipped_generator_updates"] == 1


def test_gndmr_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["--recipe", "digits-gndmr", *TINY, "--trainer.lr_schedule", "constant", "--trainer.checkpoint_every", "2"]
    main(args + ["--trainer.steps", "3", "--run_dir", str(tmp_path / "straight")])
    main(args + ["--trainer.steps", "2", "--run_dir", str(tmp_path / "resumed")])
    main(["--resume", "--run_dir", str(tmp_path / "resumed"), "--trainer.steps", "3"])
    keys = ("loss_generator", "loss_policy", "fusion_weight_0", "loss_critic")
    assert [[r[k] for k in keys] for r in rows(tmp_path / "straight")] == \
        [[r[k] for k in keys] for r in rows(tmp_path / "resumed")]


def test_the_critic_with_the_gan_head_denoises_at_the_noise_levels_it_is_given():
    """DMDR's dynamic renoise hands the critic its sigma; with DMD2's GAN head on, the denoising part
    must use it too (it drew its own U(0, 1) before), and the discriminator sees the real batch at the
    same levels (else the noise level alone would tell real from generated)."""
    from fastdmd.config import ModelConfig
    from fastdmd.models.family import load_family
    from fastdmd.roles import build_roles

    family = load_family(ModelConfig())
    _, _, fake = build_roles(family.teacher, family.adapter, gan=True)
    seen, predict_and_logit = [], fake.predict_and_logit
    fake.predict_and_logit = lambda x, s, y: (seen.append(s), predict_and_logit(x, s, y))[1]
    sigma, labels = torch.tensor([0.9, 0.95]), torch.tensor([3, 7])
    x0 = torch.randn(2, *family.sample_shape)
    fake.critic_loss(x0, labels, x0.flip(0), labels, 0.1, torch.Generator().manual_seed(0), sigma=sigma)
    assert torch.equal(seen[0], sigma) and torch.equal(seen[1], sigma)  # generated and real at the same levels


@pytest.mark.parametrize("recipe", ["digits-gndm", "digits-gndmr"])
def test_a_groups_samples_are_noised_alike_for_the_group_statistics(tmp_path, recipe):
    """gndm.group_noise: one DM noise level and noise draw per group (the samples of a group are then
    compared with each other, not with the noise levels they drew); off, a draw per sample."""
    def noised(*flags):
        trainer = trainer_for(tmp_path / "-".join(flags or ("on",)), "--recipe", recipe, *flags)
        seen, dm_inputs = [], trainer.objective.dm_inputs

        def spy(x0, labels, rng):
            inputs = dm_inputs(x0, labels, rng)
            s = inputs.sigma[:, None, None, None]
            seen.append((inputs.sigma, (inputs.x_t - (1 - s) * x0.detach()) / s))  # flow: x_t = (1 - s) x0 + s eps
            return inputs

        trainer.objective.dm_inputs = spy
        next(trainer.objective.generator_updates(first_batch(trainer)))
        return seen[0], trainer.objective.group_size

    ((sigma, eps), n), ((sigma_off, eps_off), _) = noised(), noised("--gndm.group_noise", "false")
    groups, eps_groups = sigma.reshape(-1, n), eps.reshape(-1, n, *eps.shape[1:])
    assert (groups == groups[:, :1]).all() and len(groups[:, 0].unique()) == len(groups)
    torch.testing.assert_close(eps_groups, eps_groups[:, :1].expand_as(eps_groups), rtol=0, atol=1e-5)
    assert len(sigma_off.unique()) == len(sigma_off) and not torch.allclose(eps_off[0], eps_off[1], atol=0.1)


def test_the_r_dm_proxy_is_chosen_in_the_config():
    from fastdmd.rewards import build_reward

    cfg = parse_args(TINY + ["--recipe", "digits-gndmr", "--reward.dm_proxy", "alignment"])
    from fastdmd.models.family import load_family

    reward = build_reward(cfg.reward, load_family(cfg.model).classifier, [str(i) for i in range(10)], torch.device("cpu"))
    assert "distribution_matching_alignment" in [r.name for r in reward.rewards]


def test_rtdmd_standardizes_the_weighted_sum_of_its_rewards(tmp_path, monkeypatch):
    """RTDMD (from flow-GRPO's code): several rewards are weighted and summed, then standardized per
    group (standardizing each reward first, as GNDMR does, can flip an advantage's sign)."""
    trainer = trainer_for(tmp_path, "--recipe", "digits-rtdmd", "--reward.names", "classifier_log_prob,jpeg",
                          "--reward.weights", "1,0.5", "--rtdmd.stage1_steps", "0",
                          "--rtdmd.reward_backprop_weight", "0")  # JPEG is not differentiable
    calls, group_advantages = [], ops.group_advantages
    monkeypatch.setattr(ops, "group_advantages", lambda r, **kw: (calls.append((r, kw)), group_advantages(r, **kw))[1])
    seen, scores = [], trainer.reward.scores
    monkeypatch.setattr(trainer.reward, "scores", lambda *a, **kw: (seen.append(scores(*a, **kw)), seen[-1])[1])
    next(trainer.objective.generator_updates(first_batch(trainer, step=1)))
    (rewards, kwargs), = calls
    assert rewards.shape == (8, 1) and kwargs.get("weights") is None
    torch.testing.assert_close(rewards[:, 0], seen[0].total)
