"""The memory plan: exact parameter counts, sharding, activation accounting on the meta device."""

import pytest
import torch

from fastdmd.memory_plan import build_meta_network, main, plan, saved_activation_bytes
from fastdmd.models.digits import build_digits_unet


def test_digits_counts_match_the_real_network_and_its_saved_tensors():
    real = build_digits_unet()
    p = plan("digits", 8, 16, 1, "fp32", False, 80)
    assert p.params == sum(q.numel() for q in real.parameters())
    assert p.items["generator weights + AdamW (exp_avg_sq only) + EMA (fp32)"] == 12 * p.params
    assert p.items["critic weights + AdamW (exp_avg_sq only) (fp32)"] == 8 * p.params
    unfused = plan("digits", 8, 16, 1, "fp32", False, 80, first_moment=True)  # the naive step's optimizer
    assert unfused.items["generator weights + AdamW + EMA (fp32)"] == 16 * p.params
    assert unfused.total - p.total == 8 * p.params
    assert p.items["gradients of one network (fp32)"] == 4 * p.params
    net, inputs = build_meta_network("digits", None)
    net.requires_grad_(True)
    meta = saved_activation_bytes(net, inputs(8, 16, torch.float32), torch.float32)
    real.requires_grad_(True)
    cpu_inputs = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in inputs(8, 16, torch.float32).items()}
    cpu = saved_activation_bytes(real, cpu_inputs, torch.float32)
    # The meta kernels save a little more than the CPU ones: the estimate leans high, never low.
    assert 0 < cpu <= meta <= 1.25 * cpu


def test_attention_is_counted_as_a_fused_kernel_saves_it():
    """q, k, v, output and an fp32 log-sum-exp per query: no L x L matrix, whatever the device's
    own SDPA path would save."""
    class Attention(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    q, k, v = (torch.empty(2, 3, 100, 8, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    saved = saved_activation_bytes(Attention(), dict(q=q, k=k, v=v), torch.bfloat16)
    assert saved == 4 * (2 * 3 * 100 * 8 * 2) + 2 * 3 * 100 * 4


def test_a_storage_saved_twice_or_through_views_counts_once():
    class Twice(torch.nn.Module):
        def forward(self, x):
            y = x * 2
            return (y * y).sum() + (y[:, :3] * y[:, :3]).sum()

    x = torch.zeros(4, 10, requires_grad=True)
    assert saved_activation_bytes(Twice(), dict(x=x), torch.float32) == 4 * 10 * 4


def test_sharding_batch_and_checkpointing_move_the_right_parts():
    one = plan("sd3-medium", 1, 256, 1, "bf16", False, 80, depth=2)
    eight = plan("sd3-medium", 1, 256, 8, "bf16", False, 80, depth=2)
    key = "generator weights + AdamW (exp_avg_sq only) + EMA (fp32)"
    assert eight.items[key] == pytest.approx(one.items[key] / 8)
    assert one.items["FSDP unsharded working set (2 blocks)"] == 0 < eight.items["FSDP unsharded working set (2 blocks)"]
    copies = "autocast weight copies (bf16, one process)"
    assert one.items[copies] == 2 * one.params and eight.items[copies] == 0
    with_copy = plan("sd3-medium", 1, 256, 1, "bf16", False, 80, depth=2, rollout_copy=True)
    assert with_copy.total - one.total == 2 * one.params
    master = plan("sd3-medium", 1, 256, 1, "bf16", False, 80, depth=2, master_weights=True)
    assert master.items[copies] == 0  # no autocast casts: two whole bf16 networks instead (+4 B/param)
    assert master.items["gradients of one network (bf16)"] == one.items["gradients of one network (fp32)"] / 2
    assert master.total == pytest.approx(one.total)  # +4 copies, -2 casts, -2 gradients
    act = "activations (generator or critic forward + backward)"
    two = plan("sd3-medium", 2, 256, 1, "bf16", False, 80, depth=2)
    assert 1.8 < two.items[act] / one.items[act] <= 2.0
    ckpt = plan("sd3-medium", 1, 256, 1, "bf16", True, 80, depth=2)
    kept = "activations (checkpointed: kept + one block recomputed)"
    assert 0 < ckpt.items[kept] < one.items[act]
    assert plan("sd3-medium", 1, 256, 1, "bf16", False, 80, depth=4).params > one.params


def test_fits_verdict_and_cli(capsys):
    assert main(["--preset", "digits", "--batch", "4", "--gpu-memory", "80"]).fits
    small = main(["--preset", "digits", "--batch", "4", "--gpu-memory", "0.001"])
    assert not small.fits and "does NOT fit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--preset", "digits", "--world-size", "0"])
    with pytest.raises(SystemExit):
        main(["--preset", "digits", "--master-weights", "--world-size", "2"])


@pytest.mark.parametrize("argv, message", [
    (["--depth", "0"], "--depth 0: give a number of blocks >= 1"),
    (["--model-path", "/nonexistent"], "--model-path /nonexistent: no transformer/config.json there"),
    (["--preset", "digits", "--model-path", "."], "the digits preset has none"),
])
def test_bad_model_arguments_are_named_before_any_work(capsys, argv, message):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and message in capsys.readouterr().err


def test_torchrun_start_up_host_memory_is_the_whole_networks(capsys):
    """Under torchrun rank 0 holds the whole teacher (bf16) and fp32 generator and critic in host
    memory until their shards are sent out: 10 bytes per parameter; the other ranks none."""
    one = main(["--preset", "digits", "--batch", "4"])
    assert one.startup_host_bytes == 0 and "start-up" not in capsys.readouterr().out
    eight = main(["--preset", "digits", "--batch", "4", "--world-size", "8"])
    assert eight.startup_host_bytes == 10 * eight.params
    assert "GiB of host memory on rank 0" in capsys.readouterr().out
