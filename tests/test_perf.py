"""The performance switches (config `perf`): each changes how a step runs, not what it computes."""

import json
import os
import warnings

import pytest
import torch

from fastdmd.config import parse_args
from fastdmd.distributed import World, blocks_of
from fastdmd.profiling import StepProfiler
from fastdmd.train import main
from fastdmd.trainer import Trainer

TINY = ["--trainer.batch_size", "8", "--trainer.log_every", "1", "--trainer.sample_every", "0",
        "--trainer.warmup_steps", "0", "--trainer.lr_schedule", "constant", "--trainer.lr_generator", "1e-3",
        "--eval.at_end", "false", "--threads", "1", "--trainer.steps", "3"]


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(r["loss_dmd"], r["loss_critic"]) for r in map(json.loads, f)]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    run = tmp_path_factory.mktemp("plain")
    main(TINY + ["--run_dir", str(run)])
    return losses(run)


def test_activation_checkpointing_recomputes_the_same_numbers(tmp_path, plain):
    main(TINY + ["--run_dir", str(tmp_path), "--perf.activation_checkpointing", "true"])
    assert losses(tmp_path) == plain


def test_per_block_compile_wraps_every_block_and_keeps_the_losses(tmp_path, plain):
    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.compile", "true", "--perf.compile_backend", "aot_eager"])
    trainer = Trainer(cfg, World())
    for net in (trainer.generator.net, trainer.fake.net, trainer.real.net):
        assert all(block._compiled_call_impl is not None for block in blocks_of(net))
    main(TINY + ["--run_dir", str(tmp_path / "run"), "--perf.compile", "true", "--perf.compile_backend", "aot_eager"])
    for got, want in zip(losses(tmp_path / "run"), plain):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_inductor_options_reach_every_block_compile_on_top_of_the_mode(tmp_path, monkeypatch):
    """perf.inductor_options go to each block's torch.compile as options, the mode's own options under them
    (torch.compile takes a mode or options, not both); a bad one is refused, naming it, before any work."""
    from fastdmd.config import ConfigError

    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.compile", "true", "--perf.compile_mode",
                             "max-autotune-no-cudagraphs", "--perf.inductor_options",
                             "coordinate_descent_tuning=false, triton.multi_kernel=1"])
    Trainer(cfg, World())
    assert calls and all(c == dict(backend="inductor", dynamic=False, options={
        "max_autotune": True, "coordinate_descent_tuning": False, "triton.multi_kernel": 1}) for c in calls)
    calls.clear()
    Trainer(parse_args(TINY + ["--run_dir", str(tmp_path / "plain"), "--perf.compile", "true"]), World())
    assert calls and all(c == dict(backend="inductor", dynamic=False, mode=None) for c in calls)
    for options, message in (("triton.multi=1", r"'triton.multi' is not an option .*similar: triton.multi_kernel"),
                             ("triton.multi_kernel=yes", r"triton.multi_kernel='yes' is not of .* type, int"),
                             ("max_autotune", r"'max_autotune' is not name=value"),
                             ("triton.cudagraphs=true", r"perf.compile_mode reduce-overhead, not triton.cudagraphs")):
        with pytest.raises(ConfigError, match=message):
            parse_args(TINY + ["--perf.compile", "true", "--perf.inductor_options", options])
    with pytest.raises(ConfigError, match=r"need perf.compile true and perf.compile_backend inductor"):
        parse_args(TINY + ["--perf.inductor_options", "triton.multi_kernel=1"])


def test_bf16_autocast_runs_the_forwards_in_bf16(tmp_path, plain, monkeypatch):
    seen = []
    from fastdmd import ops
    real_op = ops.dmd_target
    monkeypatch.setattr(ops, "dmd_target", lambda x0, x_t, real_cond, *a, **kw:
                        (seen.append(real_cond.dtype), real_op(x0, x_t, real_cond, *a, **kw))[1])
    main(TINY + ["--run_dir", str(tmp_path), "--perf.mixed_precision", "bf16"])
    assert set(seen) == {torch.bfloat16}
    got = losses(tmp_path)
    assert all(torch.isfinite(torch.tensor(g)).all() for g in got) and got != plain


def test_missing_accelerators_fall_back_and_say_so(tmp_path, capsys):
    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.attention", "flash", "--perf.optimizer", "apex"])
    trainer = Trainer(cfg, World())
    assert trainer.attention.startswith("torch SDPA (")
    assert "apex FusedAdam" in trainer.optimizer_name
    assert trainer.optimizer_name.endswith("torch AdamW (fused; beta1 0: no exp_avg kept)")
    assert trainer.opt_g.defaults["fused"] is True
    naive = Trainer(parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.fused_optimizer", "false"]), World())
    assert naive.optimizer_name == "torch AdamW (default)" and not naive.opt_g.defaults["fused"]


def test_rollout_graph_falls_back_to_eager_off_cuda_with_a_reason(tmp_path, capsys):
    from fastdmd.rollout import backward_simulation
    from fastdmd.trainer import step_generator

    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.cuda_graph_rollout", "true"])
    trainer = Trainer(cfg, World())
    assert not trainer.rollout.active and "CUDA device" in trainer.rollout.reason
    noise, labels = torch.randn(4, 1, 16, 16), torch.arange(4)
    got = trainer.rollout(noise, labels, 2, step_generator(0, 0, 5))
    want = backward_simulation(trainer.generator, noise, labels, cfg.dmd.generator_sigmas, 2, step_generator(0, 0, 5))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rollout_graph_replays_the_eager_rollout_on_cuda(tmp_path):
    from fastdmd.rollout import backward_simulation
    from fastdmd.trainer import step_generator

    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.cuda_graph_rollout", "true"])
    trainer = Trainer(cfg, World(device=torch.device("cuda")))
    assert trainer.rollout.active, trainer.rollout.reason
    dev = torch.device("cuda")
    # One graph per k, captured on first use, then replayed out of capture order with new inputs:
    # the graphs share one memory pool.
    for step, k in enumerate([3, 1, 2, 3, 1, 2, 2, 3], start=1):
        noise = torch.randn(8, 1, 16, 16, device=dev)
        labels = torch.randint(0, 10, (8,), device=dev)
        got = trainer.rollout(noise, labels, k, step_generator(0, 0, step, dev))
        want = backward_simulation(trainer.generator, noise, labels, cfg.dmd.generator_sigmas, k,
                                   step_generator(0, 0, step, dev))
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert trainer.rollout.active and len(trainer.rollout.graphs) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rollout_graph_under_bf16_autocast_reads_the_live_weights(tmp_path):
    """Under bf16 autocast the graph must cast the fp32 weights itself at every replay: a cast cached
    by autocast outside the graph is freed when its region ends, and the optimizer changes the
    weights in place between steps."""
    from fastdmd.rollout import backward_simulation
    from fastdmd.trainer import step_generator

    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.cuda_graph_rollout", "true",
                             "--perf.mixed_precision", "bf16"])
    dev = torch.device("cuda")
    trainer = Trainer(cfg, World(device=dev))
    for step in range(1, 4):
        noise = torch.randn(8, 1, 16, 16, device=dev)
        labels = torch.randint(0, 10, (8,), device=dev)
        with trainer._autocast():  # as in a training step; the first call captures
            got = trainer.rollout(noise, labels, 3, step_generator(0, 0, step, dev))
        churn = torch.full((1 << 22,), float("nan"), device=dev)  # reuse what the region freed
        del churn
        with trainer._autocast():
            want = backward_simulation(trainer.generator, noise, labels, cfg.dmd.generator_sigmas, 3,
                                       step_generator(0, 0, step, dev))
        torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=1e-2)
        with torch.no_grad():  # an optimizer step: in place
            for p in trainer.generator.parameters():
                p.mul_(1.05)
    assert trainer.rollout.active and len(trainer.rollout.graphs) == 1


def test_score_graphs_fall_back_to_eager_off_cuda_with_a_reason(tmp_path, capsys):
    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.cuda_graph_scores", "true", "--dmd.guidance_scale", "2"])
    trainer = Trainer(cfg, World())
    assert trainer.scores_graphs == "eager: CUDA graphs need a CUDA device, the run is on cpu"
    x_t, sigma, labels = torch.randn(4, 1, 16, 16), torch.rand(4), torch.arange(4)
    cond, uncond = trainer.real.predict(x_t, sigma, labels, 2.0)
    want = trainer.real.adapter.predict_cond_uncond(trainer.real.net, x_t, sigma, labels)
    assert torch.equal(cond, want[0]) and torch.equal(uncond, want[1])
    with torch.no_grad():
        assert torch.equal(trainer.fake.predict(x_t, sigma, labels),
                           trainer.fake.adapter.predict(trainer.fake.net, x_t, sigma, labels))
    main(TINY + ["--run_dir", str(tmp_path / "run"), "--trainer.steps", "1", "--perf.cuda_graph_scores", "true"])
    assert "scores=eager: CUDA graphs need a CUDA device, the run is on cpu" in capsys.readouterr().out
    off = Trainer(parse_args(TINY + ["--run_dir", str(tmp_path / "off")]), World())
    assert off.scores_graphs == "off (perf.cuda_graph_scores false)"


def test_cfg_as_two_forwards_gives_the_batched_predictions(tmp_path):
    """perf.batched_cfg false (the naive benchmark step): the teacher runs cond and uncond as two
    forwards of the batch instead of one of twice the batch, with the same predictions."""
    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--dmd.guidance_scale", "2", "--perf.batched_cfg", "false"])
    trainer = Trainer(cfg, World())
    real = trainer.real
    batches = []
    hook = real.net.register_forward_pre_hook(lambda module, args, kwargs: batches.append(
        (args[0] if args else kwargs["sample"]).shape[0]), with_kwargs=True)
    x_t, sigma, labels = torch.randn(4, 1, 16, 16), torch.rand(4), torch.arange(4)
    cond, uncond = real.predict(x_t, sigma, labels, 2.0)
    hook.remove()
    assert batches == [4, 4] and real.batched_cfg is False
    want = real.adapter.predict_cond_uncond(real.net, x_t, sigma, labels, batched=True)
    torch.testing.assert_close(cond, want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uncond, want[1], rtol=1e-5, atol=1e-6)
    assert Trainer(parse_args(TINY + ["--run_dir", str(tmp_path / "b")]), World()).real.batched_cfg is True


def test_dmdr_real_score_is_never_captured(tmp_path):
    """DMDR's real score is the critic's network at a LoRA scale that changes every step: a graph
    would replay the first scale, so it is built per step without graphs."""
    cfg = parse_args(["--recipe", "digits-dmdr"] + TINY + ["--run_dir", str(tmp_path), "--perf.cuda_graph_scores", "true"])
    trainer = Trainer(cfg, World())
    assert trainer.fake.graphs is not None and trainer.objective.real_score(5).graphs is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("master_weights", [False, True], ids=["autocast", "master_weights"])
def test_a_dmd2_step_waits_for_the_gpu_once_per_update_and_once_for_its_logs(tmp_path, master_weights):
    """Each device-to-host read makes the host wait for the GPU's whole queue, after which the GPU idles
    until the host queues more. A DMD2 step reads once per update (its loss and gradient norm together:
    skip a non-finite update, clip), so once for the generator and once per critic update, and once for
    every logged value at the end. With perf.master_weights MasterAdamW decides the skip and the clipping
    on the device: the step reads once, at its end."""
    dev = torch.device("cuda")
    extra = ["--perf.master_weights", "true"] if master_weights else []
    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.mixed_precision", "bf16", *extra])
    trainer = Trainer(cfg, World(device=dev))
    trainer.train_step(1)  # first-use work (optimizer state, library handles) out of the way
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train_step(2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    waits = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)]
    assert cfg.trainer.critic_updates == 2
    assert len(waits) == (1 if master_weights else 1 + cfg.trainer.critic_updates + 1), "\n".join(waits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_score_graphs_replay_the_eager_scores_and_read_the_live_critic(tmp_path):
    dev = torch.device("cuda")
    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.cuda_graph_scores", "true",
                             "--perf.mixed_precision", "bf16"])
    trainer = Trainer(cfg, World(device=dev))
    assert trainer.scores_graphs == "CUDA graph"
    real, fake = trainer.real, trainer.fake
    for _ in range(3):
        x_t, sigma = torch.randn(8, 1, 16, 16, device=dev), torch.rand(8, device=dev)
        labels = torch.randint(0, 10, (8,), device=dev)
        with trainer._autocast(), torch.no_grad():  # as in a training step; the first calls capture
            got = real.predict(x_t, sigma, labels, 2.0), real.predict(x_t, sigma, labels, 1.0), \
                fake.predict(x_t, sigma, labels)
        churn = torch.full((1 << 22,), float("nan"), device=dev)  # reuse what the region freed
        del churn
        with trainer._autocast(), torch.no_grad():
            want = real.eager_predict(x_t, sigma, labels, 2.0), real.eager_predict(x_t, sigma, labels, 1.0), \
                fake.eager_predict(x_t, sigma, labels)
        assert got[1][1] is None
        for g, w in [(got[0][0], want[0][0]), (got[0][1], want[0][1]), (got[1][0], want[1][0]), (got[2], want[2])]:
            torch.testing.assert_close(g, w, rtol=1e-2, atol=1e-2)
        with torch.no_grad():  # a critic optimizer step: in place
            for p in fake.parameters():
                p.mul_(1.05)
    assert trainer.scores_graphs == "CUDA graph" and len(real.graphs) == 2 and len(fake.graphs) == 1
    with torch.no_grad():  # outside autocast: a graph of its own, in fp32 like the eager call (well inside
        # bf16's error, which a replay of the autocast graph would show; TF32 convolutions allow some noise)
        torch.testing.assert_close(fake.predict(x_t, sigma, labels), fake.eager_predict(x_t, sigma, labels),
                                   rtol=2e-3, atol=2e-3)
    assert len(fake.graphs) == 2
    with trainer._autocast():  # the critic's training forward needs its autograd graph: eager
        assert fake.predict(x_t, sigma, labels).requires_grad and len(fake.graphs) == 2  # no capture


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_score_graphs_keep_the_losses(tmp_path, monkeypatch):
    # fp32 convolutions: with TF32 (PyTorch's default for cuDNN) the captured graph and the eager call
    # may run different cuDNN algorithms, whose TF32 roundings, amplified by the real-minus-fake
    # difference, moved the second step's loss by 0.2% on an H100.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    dev = torch.device("cuda")
    runs = {}
    for name, extra in [("eager", []), ("graphs", ["--perf.cuda_graph_scores", "true"])]:
        cfg = parse_args(TINY + ["--run_dir", str(tmp_path / name), *extra])
        trainer = Trainer(cfg, World(device=dev))
        runs[name] = [trainer.train_step(step)["loss_dmd"] for step in range(1, 4)]
    assert trainer.scores_graphs == "CUDA graph"
    torch.testing.assert_close(runs["graphs"], runs["eager"], rtol=1e-4, atol=1e-8)


def test_cudnn_attention_off_is_applied_and_reported(tmp_path):
    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.cudnn_attention", "false"])
    try:
        trainer = Trainer(cfg, World())
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert trainer.attention == "torch SDPA, SDPA's cuDNN backend off"
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)
    assert parse_args(["--recipe", "flux-dmd2", "--model.path", "x", "--model.prompts", "y"]).perf.cudnn_attention is False


def test_bf16_rollout_weights_follow_the_generator(tmp_path):
    """perf.rollout_weights bf16: the rollout runs a bf16 copy of the generator, refreshed after every
    step's generator updates, and gives the master weights' rollout up to bf16 rounding."""
    from fastdmd.rollout import backward_simulation
    from fastdmd.trainer import step_generator

    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.mixed_precision", "bf16",
                             "--perf.rollout_weights", "bf16"])
    trainer = Trainer(cfg, World())
    copy_net, master = trainer.rollout.x0_fn.net, trainer.generator.net
    assert copy_net is not master and {p.dtype for p in copy_net.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in copy_net.parameters())
    trainer.train_step(1)
    for c, m in zip(copy_net.parameters(), master.parameters()):
        assert torch.equal(c, m.detach().to(torch.bfloat16))
    noise, labels = torch.randn(4, 1, 16, 16), torch.arange(4)
    with trainer._autocast():
        got = trainer.rollout(noise, labels, 3, step_generator(0, 0, 5))
        want = backward_simulation(trainer.generator, noise, labels, cfg.dmd.generator_sigmas, 3, step_generator(0, 0, 5))
    torch.testing.assert_close(got[0], want[0], rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="rollout_weights.*mixed_precision bf16"):
        parse_args(TINY + ["--perf.rollout_weights", "bf16"])


def test_master_weights_need_bf16_serve_the_rollout_themselves_and_step_with_master_adamw():
    with pytest.raises(ValueError, match=r"master_weights.*needs perf.mixed_precision bf16 \(got 'fp32'\)"):
        parse_args(TINY + ["--perf.master_weights", "true"])
    with pytest.raises(ValueError, match="master_weights already runs the rollout on the generator's bf16 copy"):
        parse_args(TINY + ["--perf.mixed_precision", "bf16", "--perf.master_weights", "true",
                           "--perf.rollout_weights", "bf16"])
    for other, named in ((["--perf.optimizer", "apex"], "perf.optimizer = 'apex'"),
                         (["--perf.fused_optimizer", "false"], "perf.fused_optimizer false")):
        with pytest.raises(ValueError, match=f"master_weights steps with fastdmd's MasterAdamW.*; {named} asks for "
                                             "another optimizer"):
            parse_args(TINY + ["--perf.mixed_precision", "bf16", "--perf.master_weights", "true", *other])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_rollout_copy_in_a_cuda_graph_follows_the_generator(tmp_path):
    """The rollout graph, captured before training, reads the bf16 copy in place: after steps that
    update the generator (and refresh the copy), it replays the eager rollout of the updated copy."""
    from fastdmd.rollout import backward_simulation
    from fastdmd.trainer import step_generator

    dev = torch.device("cuda")
    cfg = parse_args(TINY + ["--run_dir", str(tmp_path), "--perf.mixed_precision", "bf16", "--perf.rollout_weights",
                             "bf16", "--perf.cuda_graph_rollout", "true"])
    trainer = Trainer(cfg, World(device=dev))
    noise, labels = torch.randn(8, 1, 16, 16, device=dev), torch.randint(0, 10, (8,), device=dev)
    with trainer._autocast():
        before = trainer.rollout(noise, labels, 3, step_generator(0, 0, 99, dev))[0]  # captures
    for step in range(1, 4):
        trainer.train_step(step)
    copy_net = trainer.rollout.x0_fn.net
    for c, m in zip(copy_net.parameters(), trainer.generator.net.parameters()):
        assert torch.equal(c, m.detach().to(torch.bfloat16))
    with trainer._autocast():
        got = trainer.rollout(noise, labels, 3, step_generator(0, 0, 99, dev))[0]
        want = backward_simulation(trainer.rollout.x0_fn, noise, labels, cfg.dmd.generator_sigmas, 3,
                                   step_generator(0, 0, 99, dev))[0]
    assert trainer.rollout.active  # (the training steps captured graphs for their own k too)
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert not torch.equal(got, before)  # the generator did change


def test_uncached_autocast_keeps_the_callers_state_and_cache():
    from fastdmd.rollout.graphs import uncached_autocast

    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight = torch.nn.Parameter(torch.randn(4, 4))
        x = torch.randn(2, 4)
        torch.mm(x, weight)  # cached cast of the leaf weight
        with uncached_autocast("cpu"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert not torch.is_autocast_cache_enabled()
            assert torch.mm(x, weight).dtype == torch.bfloat16
        assert torch.is_autocast_cache_enabled() and torch.is_autocast_enabled("cpu")
    with uncached_autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")


def test_a_resume_past_the_profiled_window_says_so(tmp_path):
    cfg = parse_args(["--profile.trace", "true", "--profile.start", "3"]).profile
    assert StepProfiler(cfg, str(tmp_path), 0, torch.device("cpu"), done_steps=2).notes == []
    note, = StepProfiler(cfg, str(tmp_path), 0, torch.device("cpu"), done_steps=3).notes
    assert "resumes after step 3, past profile.start = 3: nothing is profiled" in note


def test_profile_trace_covers_the_window_and_names_the_phases(tmp_path, capsys):
    main(TINY + ["--run_dir", str(tmp_path), "--trainer.steps", "4", "--profile.trace", "true",
                 "--profile.start", "2", "--profile.steps", "2", "--profile.memory", "true"])
    out = capsys.readouterr().out
    assert "profile.memory needs CUDA" in out
    trace = tmp_path / "profile" / "trace_rank0_steps2-3.json"
    assert trace.exists() and str(trace) in out
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"rollout", "generator_fwd", "real_score", "fake_score", "dmd_op", "generator_bwd", "optimizer",
            "critic_update"} <= names
    assert sum(e.get("name") == "dmd_op" for e in events) == 2  # two profiled steps, one DMD op each


@pytest.mark.parametrize("norm", [0.1, 1.0 - 1.1e-6, 1.0 - 1e-6, 1.0 - 0.9e-6, 1.0, 30.0])
def test_gradient_clipping_gives_clip_grad_norm_numbers(tmp_path, norm):
    """The trainer scales gradients only on the steps that reach trainer.grad_clip: the gradients and
    the reported norm are bit for bit what torch's clip_grad_norm_ gives, at the limit too."""
    trainer = Trainer(parse_args(TINY + ["--run_dir", str(tmp_path), "--trainer.grad_clip", "1.0"]), World())
    module = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    grads = [torch.randn_like(p) for p in module.parameters()]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    for p, g in zip(module.parameters(), grads):
        p.grad = g * (norm / total)
    reference = [torch.nn.Parameter(torch.zeros_like(p)) for p in module.parameters()]
    for r, p in zip(reference, module.parameters()):
        r.grad = p.grad.clone()
    want_norm = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    norm = trainer._grad_norm(list(module.parameters()))
    trainer._clip(list(module.parameters()), norm, float(norm))  # torch AdamW: in place
    assert float(norm) == float(want_norm)
    assert all(torch.equal(p.grad, r.grad) for p, r in zip(module.parameters(), reference))


def test_fsdp2_dtensor_parameters_step_without_exp_avg_as_torch_fused_adamw_does():
    """At beta1 0 make_adamw gives NoMomentumAdamW, which steps FSDP2's sharded (DTensor) parameters as
    torch's fused AdamW does, bit for bit, and keeps its second moment as a DTensor (DCP saves it sharded)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from fastdmd.accel import make_adamw
    from fastdmd.config import PerfConfig
    from fastdmd.optim import NoMomentumAdamW

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        start = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
        ours, plain = (torch.nn.Parameter(distribute_tensor(start.clone(), mesh, [Shard(0)])) for _ in range(2))
        opt, name = make_adamw([ours], 1e-2, (0.0, 0.999), 0.1, PerfConfig())
        assert isinstance(opt, NoMomentumAdamW) and name == "torch AdamW (fused; beta1 0: no exp_avg kept)"
        torch_opt = torch.optim.AdamW([plain], lr=1e-2, betas=(0.0, 0.999), weight_decay=0.1, fused=True)
        for seed in (1, 2):
            grad = distribute_tensor(torch.randn(6, 3, generator=torch.Generator().manual_seed(seed)), mesh, [Shard(0)])
            ours.grad, plain.grad = grad.clone(), grad.clone()
            opt.step()
            torch_opt.step()
        assert torch.equal(ours.full_tensor(), plain.full_tensor())
        assert isinstance(opt.state[ours]["exp_avg_sq"], DTensor) and "exp_avg" not in opt.state[ours]
    finally:
        dist.destroy_process_group()


def test_apex_is_not_handed_fsdp2_dtensors(monkeypatch):
    """apex FusedAdam's kernels read raw storage, which FSDP2's DTensor parameters do not have: under
    torchrun the fused torch AdamW steps them instead, and the header says why."""
    import sys
    import types

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from fastdmd.accel import make_adamw
    from fastdmd.config import PerfConfig

    apex, optimizers = types.ModuleType("apex"), types.ModuleType("apex.optimizers")
    optimizers.FusedAdam = lambda *args, **kwargs: pytest.fail("apex FusedAdam was given DTensors")
    apex.optimizers = optimizers
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", optimizers)
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = torch.nn.Parameter(distribute_tensor(torch.zeros(6), mesh, [Shard(0)]))
        opt, name = make_adamw([param], 1e-3, (0.9, 0.999), 0.0, PerfConfig(optimizer="apex"))
        assert isinstance(opt, torch.optim.AdamW) and name.startswith("apex FusedAdam cannot step FSDP2's")
    finally:
        dist.destroy_process_group()


class ApexLikeFusedAdam(torch.optim.Optimizer):
    """apex.optimizers.FusedAdam's interface and state layout (NVIDIA/apex, 2026-07): one step count per param
    group (group["step"]), exp_avg and exp_avg_sq per parameter, its own group key bias_correction, zero_grad()
    without arguments; its AdamW update (adam_w_mode) in torch, on CPU, written as torch's AdamW computes it."""

    def __init__(self, params, lr=1e-3, bias_correction=True, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True,
                 weight_decay=0.0):
        assert adam_w_mode and bias_correction
        super().__init__(params, dict(lr=lr, bias_correction=bias_correction, betas=betas, eps=eps,
                                      weight_decay=weight_decay))

    def zero_grad(self):
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["step"] = t = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p).float(), torch.zeros_like(p).float()
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / (1 - beta2 ** t) ** 0.5).add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** t))


def test_an_apex_checkpoint_resumes_with_torch_adamw_and_a_torch_one_with_apex(tmp_path):
    """apex counts steps per param group and takes no zero_grad(set_to_none=...), which the trainer and DCP
    pass: through apex_adamw it steps, and its checkpoint (saved as the trainer saves, RoleState through DCP)
    resumes with torch's AdamW (perf.optimizer apex's fallback where apex is missing) or apex, and a torch
    AdamW checkpoint with apex; each continues as one uninterrupted torch AdamW run."""
    import torch.distributed.checkpoint as dcp

    from fastdmd.optim import apex_adamw
    from fastdmd.trainer import RoleState

    apex_class = apex_adamw(ApexLikeFusedAdam)
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)

    def net():
        torch.manual_seed(0)
        return torch.nn.Linear(3, 2)

    grads = [[torch.randn(p.shape, generator=gen) for p in net().parameters()] for _ in range(4)]

    def train(module, opt, steps):
        for step_grads in steps:
            for p, g in zip(module.parameters(), step_grads):
                p.grad = g.clone()
            opt.step()
            opt.zero_grad(set_to_none=True)

    uninterrupted = net()
    train(uninterrupted, torch.optim.AdamW(uninterrupted.parameters(), **hyper), grads)
    for name, (first, then) in {"apex_then_torch": (apex_class, torch.optim.AdamW),
                                "torch_then_apex": (torch.optim.AdamW, apex_class),
                                "apex_then_apex": (apex_class, apex_class)}.items():
        written = net()
        opt = first(written.parameters(), **hyper)
        train(written, opt, grads[:2])
        if first is apex_class:  # apex's own layout, as its kernels read it
            assert opt.param_groups[0]["step"] == 2
            assert all(state.keys() == {"exp_avg", "exp_avg_sq"} for state in opt.state.values())
        dcp.save({"generator": RoleState(written, opt)}, checkpoint_id=str(tmp_path / name), no_dist=True)
        resumed = torch.nn.Linear(3, 2)
        opt = then(resumed.parameters(), **hyper)
        dcp.load({"generator": RoleState(resumed, opt)}, checkpoint_id=str(tmp_path / name), no_dist=True)
        if then is apex_class:
            group = opt.param_groups[0]
            assert group["step"] == 2 and group["bias_correction"] is True
            assert all(state.keys() == {"exp_avg", "exp_avg_sq"} for state in opt.state.values())
        train(resumed, opt, grads[2:])
        for p, q in zip(resumed.parameters(), uninterrupted.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="makes a capture fail by having no CUDA at all")
def test_a_failed_capture_warns_once_and_stays_eager():
    """The run header, printed before the first capture, says "CUDA graph": a capture that fails later
    must say so when it happens (FLUX's image ids once made every capture fail, silently)."""
    from fastdmd.rollout.graphs import CudaGraphs

    calls = []

    def double(x):
        calls.append(x)
        return 2 * x

    graphs = CudaGraphs(double, None, "rollout")
    x = torch.arange(3.0)
    with pytest.warns(RuntimeWarning, match=r"^rollout: eager: CUDA graph capture failed \(.+\); running eagerly"):
        torch.testing.assert_close(graphs(x), 2 * x)
    assert not graphs.active and len(graphs) == 0
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(graphs(x + 1), 2 * (x + 1))
    assert len(calls) == 1  # eager, once


def test_a_failed_captures_reason_is_the_errors_first_line(monkeypatch):
    """A CUDA error's message goes on with lines of advice (a CUDA build of torch without a driver says
    "CUDA driver version is insufficient ..." and then where to search): the reason, which the run header
    and the warning show on one line, keeps the first."""
    from fastdmd.rollout.graphs import CudaGraphs

    def fail(self, tensors, constants):
        raise RuntimeError("CUDA error: driver too old\nSearch for `cudaErrorInsufficientDriver' in the docs")

    monkeypatch.setattr(CudaGraphs, "_capture", fail)
    graphs = CudaGraphs(lambda x: 2 * x, None, "rollout")
    with pytest.warns(RuntimeWarning) as caught:
        torch.testing.assert_close(graphs(torch.ones(2)), torch.full((2,), 2.0))
    assert graphs.reason == "eager: CUDA graph capture failed (RuntimeError: CUDA error: driver too old)"
    assert [str(w.message) for w in caught] == [f"rollout: {graphs.reason}; running eagerly from now on"]


def test_a_twin_runs_inside_twins_in_place_and_the_blocks_own_compile_outside():
    """reduce-overhead's blocks cannot record their CUDA graphs inside a whole-call capture: there they call
    a default-mode twin. Two counting backends stand for the two compiles: each is used where it should be,
    and going back and forth compiles neither again (dynamo keeps both, told apart by their backends)."""
    from fastdmd.rollout.graphs import add_twin, twins_in_place

    compiles = {"own": 0, "twin": 0}

    def counting(name):
        def backend(gm, example_inputs):
            compiles[name] += 1
            return gm.forward
        return backend

    class Block(torch.nn.Module):  # (dynamo skips the frames of torch.nn's own containers)
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 5)

        def forward(self, x):
            return torch.nn.functional.gelu(self.linear(x))

    block = Block()
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="not compiled"):
        add_twin(block, counting("twin"))
    block.compile(backend=counting("own"), dynamic=False)
    own_call = block._compiled_call_impl
    add_twin(block, counting("twin"))
    want = block._call_impl(x)
    for _ in range(2):
        torch.testing.assert_close(block(x), want)
        assert block._compiled_call_impl is own_call
        with twins_in_place():
            assert block._compiled_call_impl is not own_call
            torch.testing.assert_close(block(x), want)
    assert block._compiled_call_impl is own_call
    assert compiles == {"own": 1, "twin": 1}
    with pytest.raises(RuntimeError, match="raised inside"), twins_in_place():
        raise RuntimeError("raised inside")
    assert block._compiled_call_impl is own_call  # put back on the way out of an error too


def test_a_twin_is_freed_with_its_block():
    """The twin lives on its block: a trainer's blocks (and their weights) are freed with the trainer."""
    import gc
    import weakref

    from fastdmd.rollout.graphs import _twinned, add_twin

    block = torch.nn.Linear(3, 5)
    block.compile(backend="eager", dynamic=False)
    add_twin(block, "eager")
    assert block in _twinned
    gone = weakref.ref(block)
    del block
    gc.collect()
    assert gone() is None and len(_twinned) == 0


def test_graphs_share_one_pool_while_a_graph_holds_it_and_take_a_new_one_after(monkeypatch):
    """CUDA's allocator releases a private pool with its last graph; a capture into the released pool's id
    fails (what a second trainer in one process hit). So: the pool is shared while some live graph holds
    it, and a new one is made once none does."""
    import gc
    import itertools

    from fastdmd.rollout import graphs as graphs_mod

    ids = itertools.count()
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: (next(ids), 0))
    monkeypatch.setattr(graphs_mod, "_pool", None)
    monkeypatch.setattr(graphs_mod, "_pool_users", graphs_mod.weakref.WeakSet())
    first, second = graphs_mod.CudaGraphs(abs, None, "a"), graphs_mod.CudaGraphs(abs, None, "b")
    pool = graphs_mod.shared_pool()
    first._graphs["key"] = "a captured graph"
    graphs_mod._pool_users.add(first)
    assert graphs_mod.shared_pool() == pool and graphs_mod.shared_pool() == pool  # shared while first holds it
    graphs_mod._pool_users.add(second)  # a user without a graph holds no pool
    del first
    gc.collect()
    assert graphs_mod.shared_pool() != pool  # its only holder is gone: a new pool


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_perf_optimizer_apex_on_cuda_parameters_steps_as_torch_adamw(monkeypatch):
    """make_adamw's apex branch, which only CUDA parameters reach: with apex.optimizers.FusedAdam importable
    (here the stand-in above, since apex is built from source and the GPU image has none) it returns apex
    through apex_adamw, which takes the trainer's zero_grad(set_to_none=True) and steps as torch's AdamW."""
    import sys
    import types

    from fastdmd.accel import make_adamw
    from fastdmd.config import PerfConfig

    apex = types.ModuleType("apex")
    apex.optimizers = types.ModuleType("apex.optimizers")
    apex.optimizers.FusedAdam = ApexLikeFusedAdam
    monkeypatch.setitem(sys.modules, "apex", apex)
    monkeypatch.setitem(sys.modules, "apex.optimizers", apex.optimizers)
    torch.manual_seed(0)
    nets = [torch.nn.Linear(5, 3).cuda() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opt, name = make_adamw(nets[0].parameters(), 1e-2, (0.9, 0.99), 0.1, PerfConfig(optimizer="apex"))
    assert name == "apex FusedAdam" and isinstance(opt, ApexLikeFusedAdam)
    reference = torch.optim.AdamW(nets[1].parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    for _ in range(3):
        x = torch.randn(4, 5, device="cuda")
        for net, o in zip(nets, (opt, reference)):
            net(x).square().sum().backward()
            o.step()
            o.zero_grad(set_to_none=True)
    for p, q in zip(*(net.parameters() for net in nets)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
