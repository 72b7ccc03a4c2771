"""Dataclass configs, recipe files and dotted command-line overrides, validated at start-up.

Precedence: dataclass defaults < recipe (fastdmd/recipes/<name>.toml) < --config FILE < CLI
(`--trainer.steps 200`). Every field carries its help text and valid range; an unknown key, a
value of the wrong type or out of range fails before any work with a message naming the key, the
bad value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import tomllib
import typing
from dataclasses import dataclass
from typing import Any

RECIPES_DIR = os.path.join(os.path.dirname(__file__), "recipes")
METHODS = ("dmd2", "dmdr", "gdmd", "gndm", "gndmr", "rtdmd", "drpo")
GROUP_METHODS = ("gndm", "gndmr", "rtdmd", "drpo")  # methods that draw groups of samples per class
# Where a run goes and whether it continues: the command line's to say, so a --config file (a run's
# config.json included, which records them) does not set them.
RUN_PLACE_KEYS = ("run_dir", "resume")
DM_REWARD_METHODS = ("gdmd", "gndm", "gndmr")  # methods that score samples with the DMD op's statistics at hand
REWARD_NAMES = ("classifier_log_prob", "jpeg", "distribution_matching", "clip_score", "pickscore", "hpsv2")
CLIP_REWARD_NAMES = ("clip_score", "pickscore", "hpsv2")  # each reads its folder from reward.<name>_path


class ConfigError(ValueError):
    """A config problem found before any work starts."""


def opt(default, help: str, *, min=None, max=None, choices=None, factory=None):
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    family: str = opt("digits", "model family (fastdmd/models/family.py)", choices=("digits", "sd3", "flux"))
    path: str = opt("", "folder with the teacher weights (digits: empty = the shipped assets; sd3: a local "
                    "diffusers directory with transformer/ and scheduler/)")
    prompts: str = opt("", "sd3/flux: text file with one training prompt per line")
    prompt_cache: str = opt("", "sd3: safetensors file of the prompts' embeddings (made once with the text encoders; "
                            "empty = ~/.cache/fastdmd/prompts/<hash>)")
    max_sequence_length: int = opt(77, "sd3: T5 tokens per prompt", min=1, max=512)
    resolution: int = opt(0, "sd3: image resolution in pixels (0 = the transformer's sample_size x 8)", min=0)
    flux_guidance: float = opt(3.5, "flux: the guidance embedding of guidance-distilled FLUX (dev)", min=0.0)
    dtype: str = opt("float32", "dtype of the frozen teacher (the trained roles keep fp32 master weights)",
                     choices=("float32", "bfloat16"))
    init_generator: str = opt("", "start the generator (and the frozen base of DrPO) from a DMD2 run's final "
                              "weights: a run directory (its latest checkpoint) or an export of one (empty = the teacher)")


@dataclass
class TrainerConfig:
    steps: int = opt(400, "generator updates", min=1)
    batch_size: int = opt(64, "samples per generator step, per rank", min=1)
    global_batch_size: int = opt(0, "samples per generator step over all ranks, split evenly (0 = trainer.batch_size "
                                 "per rank; otherwise it replaces trainer.batch_size)", min=0)
    seed: int = opt(0, "seed; rank r of a run draws from (seed, r, step)", min=0)
    lr_generator: float = opt(1e-5, "generator learning rate", min=0.0)
    lr_critic: float = opt(5e-5, "critic (fake score) learning rate", min=0.0)
    adam_beta1: float = opt(0.0, "Adam beta1 for both roles (DMD2 uses 0)", min=0.0, max=0.999)
    adam_beta2: float = opt(0.99, "Adam beta2 for both roles", min=0.0, max=0.99999)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0.0)
    warmup_steps: int = opt(20, "linear learning-rate warm-up steps", min=0)
    lr_schedule: str = opt("cosine", "after warm-up: constant, or cosine decay to 0 at trainer.steps "
                           "(the final weights settle instead of oscillating)", choices=("constant", "cosine"))
    grad_clip: float = opt(1.0, "max grad norm per role (0 disables)", min=0.0)
    critic_updates: int = opt(2, "critic updates per generator update", min=1, max=20)
    critic_samples: str = opt("step", "what each critic update trains on: step (the x0 of this generator step, "
                              "reused by every update), fresh (a new no-grad batch of the just-updated generator "
                              "per update, with its own labels, noise and backward-simulation step k, as DMD2's "
                              "TTUR loop does; about 2.5 generator forwards per update), fresh_last (the same, "
                              "always the full few-step sample: the critic tracks the distribution that is "
                              "evaluated, our variant; 4 forwards per update)",
                              choices=("step", "fresh", "fresh_last"))
    ema_decay: float = opt(0.99, "EMA decay of the generator weights used for evaluation (0 disables)", min=0.0, max=0.99999)
    log_every: int = opt(10, "steps between metrics.jsonl lines", min=1)
    sample_every: int = opt(100, "steps between sample grids (0 disables)", min=0)
    checkpoint_every: int = opt(100, "steps between checkpoints (0 = only at the end)", min=0)
    keep_checkpoints: int = opt(2, "complete checkpoints kept on disk", min=1)
    collective_timeout_s: int = opt(1800, "torchrun: seconds a collective (an all-reduce, a barrier, a checkpoint's "
                                    "exchange) waits for the slowest rank before the run fails; it must cover rank 0 "
                                    "reading the weights alone (perf.load_on_rank0) and its evaluation files", min=1)
    max_bad_steps: int = opt(20, "consecutive steps with skipped (non-finite) updates before the run stops", min=1)
    tensorboard: str = opt("auto", "also log metrics to <run_dir>/tensorboard: auto (when installed), on (fail "
                           "if not installed), off", choices=("auto", "on", "off"))


@dataclass
class DMDConfig:
    guidance_scale: float = opt(1.0, "CFG scale g of the real score: uncond + g * (cond - uncond)", min=1.0)
    sigma_min: float = opt(0.02, "lowest DM noise level", min=0.0, max=1.0)
    sigma_max: float = opt(0.98, "highest DM noise level", min=0.0, max=1.0)
    generator_sigmas: tuple = opt(None, "the few-step sampler's noise levels (timesteps / 1000)",
                                  factory=lambda: (1.0, 0.75, 0.5, 0.25))
    eps: float = opt(1e-8, "added to the per-sample normalizer mean|p_real|", min=0.0)
    gan_generator_weight: float = opt(0.0, "DMD2's GAN term for the generator (0 = off; needs real data)", min=0.0)
    gan_critic_weight: float = opt(0.0, "weight of the discriminator loss in the critic update (0 = off)", min=0.0)


@dataclass
class RewardConfig:
    names: str = opt("classifier_log_prob", "comma-separated rewards: classifier_log_prob (differentiable), "
                     "jpeg (compressibility), distribution_matching (R_dm from the DMD statistics), and from "
                     "transformers: clip_score, pickscore, hpsv2 (differentiable; folder in reward.<name>_path)")
    weights: tuple = opt(None, "one weight per reward (default 1 each)", factory=tuple)
    group_size: int = opt(8, "samples per group (same class) for group-normalized advantages", min=2)
    clip: float = opt(5.0, "advantages are clipped to [-clip, clip] (> 0: at 0 every advantage would be 0)", min=1e-6)
    dm_proxy: str = opt("grad_sq", "distribution_matching: the per-sample stand-in for R_dm (fastdmd/rewards/"
                        "distribution_matching.py): grad_sq, disagreement or alignment",
                        choices=("grad_sq", "disagreement", "alignment"))
    clip_score_path: str = opt("", "clip_score: local transformers folder of a CLIP model, e.g. "
                               "openai/clip-vit-large-patch14 (fastdmd/rewards/clip.py says how to make it)")
    pickscore_path: str = opt("", "pickscore: local transformers folder of yuvalkirstain/PickScore_v1 with the "
                              "tokenizer and preprocessor of laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    hpsv2_path: str = opt("", "hpsv2: local transformers folder converted from the HPS v2 open_clip checkpoint")
    dtype: str = opt("bfloat16", "dtype of the CLIP-family reward models", choices=("bfloat16", "float32"))
    micro_batch: int = opt(32, "images per forward of the CLIP-family reward models", min=1)
    device: str = opt("", "device of the CLIP-family reward models, e.g. cuda:1 (empty = the training device)")

    @property
    def name_list(self) -> list[str]:
        """reward.names as a list, blanks dropped (a trailing comma names no reward)."""
        return [n.strip() for n in self.names.split(",") if n.strip()]


@dataclass
class DMDRConfig:
    reward_weight: float = opt(0.05, "weight of the reward loss -log p(label | x0) (DMDR ImageNet: 0.05 x CE)", min=0.0)
    dm_weight: float = opt(1.0, "lambda_dm: weight of the DMD regularizer", min=0.0)
    cold_start: int = opt(100, "generator steps of plain DMD before the reward switches on", min=0)
    renoise: bool = opt(True, "dynamic renoise sampling: DM noise levels from the annealed Beta schedule")
    renoise_steps: int = opt(400, "steps over which the renoise Beta anneals to uniform", min=1)
    distribution_guidance: bool = opt(True, "dynamic distribution guidance: the critic is a LoRA on the teacher "
                                      "and the real score adds that LoRA at a decaying scale")
    lora_rank: int = opt(8, "rank of the critic's LoRA (with distribution_guidance)", min=1)
    fake_lora_scale: float = opt(2.0, "LoRA scale of the fake score (lora_alpha / rank)", min=0.0)
    real_lora_scale: float = opt(0.75, "LoRA scale added to the real score at step 0, cosine-decayed to 0", min=0.0)
    guidance_steps: int = opt(400, "steps over which the real score's LoRA scale decays to 0", min=1)


@dataclass
class GDMDConfig:
    num_targets: int = opt(4, "K: DMD targets per sample, each at its own noise level", min=2, max=16)
    weight_mode: str = opt("linear", "w(A): linear max(0, 1 + lam A), softmax K softmax(A / tau), signed 1 + lam A",
                           choices=("linear", "softmax", "signed"))
    lam: float = opt(0.5, "slope of the linear weight modes", min=0.0)
    tau: float = opt(1.0, "softmax temperature", min=1e-6)
    eps: float = opt(1e-6, "eps of the advantages' denominator std + eps: rewards whose spread over a sample's "
                     "targets is well below it give weights near 1", min=1e-12)


@dataclass
class GNDMConfig:
    normalization: str = opt("group_normalizer", "group form: group_normalizer (a: per-sample normalizer -> group "
                             "mean), baseline (b: subtract the group-mean gradient), norm_scale (c, our reading: "
                             "each gradient rescaled to the group-mean gradient norm), none",
                             choices=("group_normalizer", "baseline",
                                                                                   "norm_scale", "none"))
    pg_weight: float = opt(0.0, "weight of the policy-gradient term on fused R_dm + reward advantages (0 = GNDM; "
                           "> 0 = GNDMR)", min=0.0)
    adaptive_fusion: bool = opt(True, "GNDMR: rescale each reward's fusion weight by its within-group spread "
                                "relative to its running average")
    group_noise: bool = opt(True, "one DM noise level and noise draw per group (false: per sample), so that group "
                            "statistics compare the samples, not the noise levels they drew")
    policy_updates: int = opt(2, "importance sampling: clipped-ratio updates per stochastic rollout", min=1, max=8)
    clip_range: float = opt(0.2, "PPO clip of the importance ratio", min=0.0)
    eta: float = opt(0.7, "CPS noise of the stochastic rollout steps", min=0.01, max=1.0)
    dm_step: str = opt("backward_sim", "GNDMR: rollout step whose clean prediction takes the DM loss: "
                       "backward_sim (the step's backward-simulation step k, as GNDM and DMD2) or last (the final "
                       "sample only; the earlier steps then answer to the policy gradient alone)",
                       choices=("last", "backward_sim"))


@dataclass
class RTDMDConfig:
    stage1_steps: int = opt(200, "AC-DMD steps before the hybrid policy-gradient stage", min=0)
    eta: float = opt(0.9, "CPS noise of the rollout and of the AC-DMD steps", min=0.01, max=1.0)
    consistency_weight: float = opt(0.01, "critic consistency regularizer (0 disables)", min=0.0)
    consistency_max_delta: float = opt(0.2, "largest sigma gap t - t' of the consistency pair", min=0.001, max=0.5)
    clip_range: float = opt(1e-3, "PPO clip of stage 2 (published: 1e-5 at lr 3e-6; 1e-3 is our digits "
                            "setting)", min=0.0)
    subgrpo_trained: int = opt(2, "stochastic steps trained per step (SubGRPO; the others share noise per group)",
                               min=1)
    last_step_dmd_weight: float = opt(1.0, "stage 2: AC-DMD weight on the deterministic last step (published 1e-3 "
                                      "against their loss scales; 1 keeps stage 1's strength on digits)", min=0.0)
    reward_backprop_weight: float = opt(0.1, "stage 2: weight of mean(relu(margin - reward)) through the last step "
                                        "(published 1e-4 next to last_step_dmd_weight 1e-3: the same ratio 0.1 to it)",
                                        min=0.0)
    reward_margin: float = opt(0.0, "stage 2: the reward margin of relu(margin - reward) "
                               "(classifier log-prob <= 0, so 0 means 'until certain')")


@dataclass
class DrPOConfig:
    num_ranked: int = opt(2, "top and bottom samples of each group used as positives and negatives", min=1)
    pos_weight: float = opt(3000.0, "eta: weight of positives and negatives in the preference drift", min=0.0)
    ref_weight: float = opt(0.2, "weight of the base-model drift L_ref", min=0.0)
    features: str = opt("classifier", "feature space of the drift: classifier (pooled conv features) or pixels",
                        choices=("classifier", "pixels"))


@dataclass
class EvalConfig:
    num_samples: int = opt(1000, "samples per sampler for FD and accuracy (balanced classes)", min=10, max=4000)
    teacher_steps: int = opt(50, "Euler steps of the teacher's many-step baseline", min=1)
    batch_size: int = opt(500, "samples per sampler call and per decode in evaluation and sample grids (per rank)",
                          min=1)
    seed: int = opt(1234, "evaluation noise seed (fixed so runs compare)", min=0)
    cache_teacher: bool = opt(True, "reuse teacher baselines computed before with the same weights and settings")
    at_end: bool = opt(True, "score teacher and student at the end of the run (summary table, samples_final.png)")


@dataclass
class PerfConfig:
    compile: bool = opt(False, "torch.compile each block of the generator, critic and teacher (per-block, torchtitan-style)")
    compile_backend: str = opt("inductor", "torch.compile backend (aot_eager: checks the wiring fast, no codegen)",
                               choices=("inductor", "aot_eager", "eager"))
    compile_mode: str = opt("default", "torch.compile mode of each block (inductor): reduce-overhead replays every "
                            "compiled block, forward and backward, from CUDA graphs (cudagraph trees; CUDA only, not "
                            "under torchrun); the rollout and the DMD scores, where perf.cuda_graph_rollout / "
                            "cuda_graph_scores capture them whole, call a second, default-mode compile of the blocks",
                            choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"))
    inductor_options: str = opt("", "torch.compile options of every compiled block (inductor), as name=value pairs "
                                 "separated by commas, names from torch._inductor.config (e.g. triton.multi_kernel=1 or "
                                 "coordinate_descent_tuning=true), on top of perf.compile_mode's; empty: none")
    activation_checkpointing: bool = opt(False, "recompute each block's activations in backward (diffusers' "
                                         "gradient checkpointing)")
    mixed_precision: str = opt("fp32", "bf16: FSDP2 MixedPrecisionPolicy (bf16 params, fp32 reduce) under torchrun, "
                               "bf16 autocast in one process; fp32: none", choices=("fp32", "bf16"))
    fused_optimizer: bool = opt(True, "torch AdamW with fused=True (False: torch's default, foreach on CUDA and the "
                                "per-parameter loop on CPU)")
    optimizer: str = opt("torch", "torch AdamW, or apex FusedAdam (NVIDIA apex built from source; falls back to "
                         "torch fused AdamW when missing)", choices=("torch", "apex"))
    attention: str = opt("sdpa", "attention backend of diffusers models: sdpa (torch), flash (flash-attn), "
                         "xformers; a missing package falls back to sdpa", choices=("sdpa", "flash", "xformers"))
    cudnn_attention: bool = opt(True, "let torch SDPA use its cuDNN backend on CUDA (false: flash / memory-efficient / "
                                "math only; process-wide). Its backward failed with an illegal address on FLUX shapes "
                                "on an H100 (torch 2.11, cuDNN 9.19)")
    cuda_graph_rollout: bool = opt(False, "replay the no-grad rollout from a CUDA graph captured per static shape "
                                   "(CUDA only; eager elsewhere, with the reason logged)")
    batched_cfg: bool = opt(True, "the teacher's conditional and unconditional predictions as one forward of twice "
                            "the batch (false: two forwards, as in issue 6's naive anchor step)")
    cuda_graph_scores: bool = opt(False, "replay the DMD scores (the teacher's and the critic's no-grad predictions) "
                                  "from CUDA graphs captured per static shape (CUDA only; eager elsewhere, with the "
                                  "reason logged)")
    rollout_weights: str = opt("master", "weights of the no-grad rollout: master (the generator's fp32 weights, which "
                               "autocast casts at every forward) or bf16 (a bf16 copy, refreshed after each step's "
                               "generator updates: one cast per step, 2 B/param more; needs mixed_precision bf16, "
                               "one process)", choices=("master", "bf16"))
    master_weights: bool = opt(False, "one process, mixed_precision bf16: the generator and the critic run forward and "
                               "backward on bf16 copies of their weights; the fp32 weights, which the EMA and "
                               "checkpoints keep, are updated by fastdmd's MasterAdamW, which reads the copies' bf16 "
                               "gradients and writes the new weights back into the copies (and moves the EMA) in one "
                               "fused pass (FSDP2's bf16 policy does the like under torchrun). Autocast then casts no "
                               "weight at each forward; the rollout runs on the generator's copy. Memory: 2 B/param per "
                               "trained network for its copy, against autocast's saved weight casts and fp32 "
                               "gradients, and 4 B/param less at adam_beta1 0, where MasterAdamW keeps no first "
                               "moment (memory_plan --master-weights)")
    fuse_qkv: bool = opt(False, "one q/k/v projection of three times the width in each attention of the networks "
                         "whose parameter names nothing keeps (the teacher, the rollout's bf16 copy and, with "
                         "master_weights, the trained networks' bf16 copies, forward and backward): one matmul for "
                         "three (SD3, FLUX)")
    gelu_epilogue: bool = opt(False, "in forwards that autograd does not record (the rollout, the DMD scores) on CUDA, "
                              "each tanh-GELU feed-forward projection (SD3, FLUX) runs as one cuBLASLt matmul with bias "
                              "and GELU in its epilogue instead of a matmul and a GELU kernel; other forwards unchanged")
    shard_teacher: bool = opt(True, "under torchrun, FSDP2-shard the frozen teacher as well")
    load_on_rank0: bool = opt(True, "under torchrun, rank 0 alone reads the networks' weights; the other ranks "
                              "build them on the meta device and receive their shards from rank 0 as each network "
                              "is sharded (host memory on those ranks: none for the networks, instead of ~10 B/param "
                              "each; false: every rank reads the weights)")

    @property
    def blocks_in_cuda_graphs(self) -> bool:
        """torch.compile's reduce-overhead mode: every compiled block replays its own CUDA graphs."""
        return self.compile and self.compile_mode == "reduce-overhead"


@dataclass
class ProfileConfig:
    trace: bool = opt(False, "write a torch.profiler Chrome trace of steps [start, start + steps) to run_dir/profile/")
    memory: bool = opt(False, "write a CUDA memory snapshot (torch.cuda.memory._dump_snapshot) of the same window "
                       "to run_dir/profile/ (open it at pytorch.org/memory_viz); CUDA only")
    start: int = opt(3, "first profiled step (after compile and graph capture warm-up)", min=1)
    steps: int = opt(3, "profiled steps", min=1)


@dataclass
class OpsConfig:
    backend: str = opt("auto", "fused-op implementation (native needs the CMake build, see README)",
                       choices=("auto", "triton", "reference", "native"))


@dataclass
class Config:
    recipe: str = opt("digits-dmd2", "named recipe in fastdmd/recipes")
    method: str = opt("dmd2", "training method (fastdmd/objectives)", choices=METHODS)
    run_dir: str = opt("", "output folder (default: runs/<recipe>-<date>-<time>)")
    resume: bool = opt(False, "continue from the last complete checkpoint in run_dir; auto: the same when there is "
                       "one, else start (one command for a first launch and the restarts of torchrun --max-restarts)")
    threads: int = opt(0, "torch CPU threads (0 = torch's default)", min=0)
    model: ModelConfig = opt(None, "", factory=ModelConfig)
    trainer: TrainerConfig = opt(None, "", factory=TrainerConfig)
    dmd: DMDConfig = opt(None, "", factory=DMDConfig)
    reward: RewardConfig = opt(None, "", factory=RewardConfig)
    dmdr: DMDRConfig = opt(None, "", factory=DMDRConfig)
    gdmd: GDMDConfig = opt(None, "", factory=GDMDConfig)
    gndm: GNDMConfig = opt(None, "", factory=GNDMConfig)
    rtdmd: RTDMDConfig = opt(None, "", factory=RTDMDConfig)
    drpo: DrPOConfig = opt(None, "", factory=DrPOConfig)
    eval: EvalConfig = opt(None, "", factory=EvalConfig)
    ops: OpsConfig = opt(None, "", factory=OpsConfig)
    perf: PerfConfig = opt(None, "", factory=PerfConfig)
    profile: ProfileConfig = opt(None, "", factory=ProfileConfig)

    def validate(self) -> "Config":
        _check_ranges(self, "")
        if self.dmd.sigma_min >= self.dmd.sigma_max:
            raise ConfigError(f"dmd.sigma_min ({self.dmd.sigma_min}) must be below dmd.sigma_max ({self.dmd.sigma_max})")
        sig = self.dmd.generator_sigmas
        if not sig or any(not 0.0 < s <= 1.0 for s in sig) or any(a <= b for a, b in zip(sig, sig[1:])):
            raise ConfigError(f"dmd.generator_sigmas must be strictly decreasing values in (0, 1], got {sig}")
        names = self.reward.name_list
        unknown = [n for n in names if n not in REWARD_NAMES]
        if not names or unknown:
            raise ConfigError(f"reward.names = {self.reward.names!r}: unknown reward(s) {unknown}; "
                              f"choose from {list(REWARD_NAMES)}")
        unset = [n for n in names if n in CLIP_REWARD_NAMES and not getattr(self.reward, f"{n}_path")]
        if unset:
            raise ConfigError(f"reward {unset[0]} needs reward.{unset[0]}_path: a local transformers folder with "
                              f"config.json, the weights, the tokenizer and preprocessor_config.json "
                              f"(fastdmd/rewards/clip.py says how to make one)")
        if self.reward.weights and len(self.reward.weights) != len(names):
            raise ConfigError(f"reward.weights has {len(self.reward.weights)} values for {len(names)} rewards "
                              f"{names}; give one weight per reward")
        if "distribution_matching" in names and self.method not in ("dmd2", *DM_REWARD_METHODS):  # dmd2 scores nothing
            raise ConfigError(f"reward distribution_matching (R_dm) reads the DMD statistics of the samples it scores, "
                              f"which method {self.method} does not compute; use it with one of {list(DM_REWARD_METHODS)}, "
                              f"or choose other rewards from {[n for n in REWARD_NAMES if n != 'distribution_matching']}")
        last_profiled = self.profile.start + self.profile.steps - 1
        if (self.profile.trace or self.profile.memory) and last_profiled > self.trainer.steps:
            raise ConfigError(f"the profiled steps {self.profile.start}..{last_profiled} (profile.start, profile.steps) "
                              f"run past trainer.steps = {self.trainer.steps}: lower profile.start or profile.steps")
        if self.trainer.tensorboard == "on":
            from fastdmd.tensorboard_log import tensorboard_off_reason  # it imports this module
            tensorboard_off_reason("on")  # fails here, before any work, when TensorBoard is missing
        if self.method == "gndmr" and self.gndm.pg_weight == 0:
            raise ConfigError("method gndmr needs gndm.pg_weight > 0 (the policy-gradient term); "
                              "with gndm.pg_weight = 0 use method gndm")
        if self.method == "gndm" and self.gndm.pg_weight > 0:
            raise ConfigError(f"gndm.pg_weight = {self.gndm.pg_weight} adds the policy gradient of GNDMR; "
                              f"use --method gndmr (or --recipe digits-gndmr), or set gndm.pg_weight 0")
        if self.model.family != "digits":
            if not self.model.path:
                raise ConfigError(f"model.family {self.model.family} needs model.path: a local diffusers directory "
                                  f"(transformer/, scheduler/, optionally vae/ and the text encoders)")
            if not self.model.prompts:
                raise ConfigError(f"model.family {self.model.family} needs model.prompts: a text file with one "
                                  f"prompt per line")
            if self.method == "drpo":
                raise ConfigError(f"method drpo runs on the digits family only (its drift features, drpo.features, "
                                  f"are the digits classifier's or the raw pixels, untried on latents); on "
                                  f"{self.model.family} use one of {[m for m in METHODS if m != 'drpo']}")
            digits_only = [n for n in ("classifier_log_prob",) if n in names] if self.method != "dmd2" else []
            if digits_only:
                raise ConfigError(f"reward {digits_only} needs the digits classifier; on "
                                  f"{self.model.family} use the CLIP-family rewards (reward.names) or method dmd2")
            if self.dmd.gan_generator_weight > 0 or self.dmd.gan_critic_weight > 0:
                raise ConfigError("the GAN term needs real images, which only the digits family has")
        backprop = {"dmdr": "its reward loss", "rtdmd": "rtdmd.reward_backprop_weight > 0: the last step's reward loss"}
        if self.method in backprop and (self.method == "dmdr" or self.rtdmd.reward_backprop_weight > 0):
            from fastdmd.rewards import REWARD_TYPES

            flat = [n for n in names if not REWARD_TYPES[n].differentiable]
            usable = [n for n in REWARD_NAMES if REWARD_TYPES[n].differentiable
                      and (self.model.family == "digits" or n in CLIP_REWARD_NAMES)]
            if flat:
                raise ConfigError(f"method {self.method} backpropagates through the reward ({backprop[self.method]}), "
                                  f"but reward {flat} is not differentiable; choose from {usable}")
        if self.method == "drpo" and not self.model.init_generator:
            raise ConfigError("method drpo starts from a distilled generator and needs model.init_generator: run "
                              "`python -m fastdmd.train --run_dir runs/dmd2` first, then add "
                              "`--model.init_generator runs/dmd2`")
        if self.trainer.critic_samples == "fresh" and self.method == "rtdmd":
            raise ConfigError("trainer.critic_samples = 'fresh' draws a random backward-simulation step, which RTDMD's "
                              "critic (trained at the step's own sigma s) cannot use; use step or fresh_last")
        if self.trainer.critic_samples != "step" and self.method == "drpo":
            raise ConfigError(f"trainer.critic_samples = {self.trainer.critic_samples!r} (recipe {self.recipe}'s unless "
                              f"set): method drpo has no critic; use --recipe digits-drpo, or set it to step")
        if self.method in GROUP_METHODS and self.trainer.batch_size % self.reward.group_size:
            raise ConfigError(f"method {self.method} draws groups of reward.group_size = {self.reward.group_size} "
                              f"samples; trainer.batch_size = {self.trainer.batch_size} is not a multiple of it")
        if self.perf.rollout_weights == "bf16" and self.perf.mixed_precision != "bf16":
            raise ConfigError("perf.rollout_weights = 'bf16' runs the rollout on a bf16 copy of the generator under bf16 "
                              f"autocast: it needs perf.mixed_precision bf16 (got {self.perf.mixed_precision!r})")
        if self.perf.master_weights and self.perf.mixed_precision != "bf16":
            raise ConfigError("perf.master_weights runs the trained networks on bf16 copies of their fp32 weights: it "
                              f"needs perf.mixed_precision bf16 (got {self.perf.mixed_precision!r})")
        if self.perf.master_weights and (self.perf.optimizer != "torch" or not self.perf.fused_optimizer):
            chosen = "perf.optimizer = 'apex'" if self.perf.optimizer != "torch" else "perf.fused_optimizer false"
            raise ConfigError(f"perf.master_weights steps with fastdmd's MasterAdamW (bf16 gradients in, bf16 copy out, "
                              f"one fused update); {chosen} asks for another optimizer: leave perf.optimizer at torch "
                              "and perf.fused_optimizer true")
        if self.perf.master_weights and self.perf.rollout_weights == "bf16":
            raise ConfigError("perf.master_weights already runs the rollout on the generator's bf16 copy: leave "
                              "perf.rollout_weights at master")
        if self.perf.compile_mode != "default" and not (self.perf.compile and self.perf.compile_backend == "inductor"):
            raise ConfigError(f"perf.compile_mode = {self.perf.compile_mode!r} is a mode of the inductor backend: it needs "
                              f"perf.compile true and perf.compile_backend inductor (got {self.perf.compile} and "
                              f"{self.perf.compile_backend!r})")
        if self.perf.inductor_options:
            if not (self.perf.compile and self.perf.compile_backend == "inductor"):
                raise ConfigError(f"perf.inductor_options = {self.perf.inductor_options!r} are options of the inductor "
                                  f"backend: they need perf.compile true and perf.compile_backend inductor (got "
                                  f"{self.perf.compile} and {self.perf.compile_backend!r})")
            parse_inductor_options(self.perf.inductor_options)
        return self


def parse_inductor_options(text: str) -> dict:
    """perf.inductor_options ("name=value,name=value") as torch.compile's options: each name one of
    torch._inductor.config's, each value read as that option's type (bool: true/false/1/0)."""
    import torch._inductor.config as inductor_config

    known = inductor_config.get_config_copy()
    options = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = (part.strip() for part in pair.partition("="))
        if not sep or not name or not value:
            raise ConfigError(f"perf.inductor_options: {pair!r} is not name=value (e.g. triton.multi_kernel=1)")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=3)
            raise ConfigError(f"perf.inductor_options: {name!r} is not an option of torch._inductor.config"
                              + (f" (similar: {', '.join(close)})" if close else ""))
        if name == "triton.cudagraphs":  # the trainer must know (twins, graph pools): the mode says so
            raise ConfigError("perf.inductor_options: CUDA graphs of the compiled blocks are perf.compile_mode "
                              "reduce-overhead, not triton.cudagraphs")
        kind = type(known[name])
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                options[name] = value.lower() in ("true", "1")
            elif kind in (int, float, str):
                options[name] = kind(value)
            else:
                raise ConfigError(f"perf.inductor_options: {name!r} takes a {kind.__name__}, which this option does "
                                  "not set; only bool, int, float and str options")
        except ValueError:
            raise ConfigError(f"perf.inductor_options: {name}={value!r} is not of {name}'s type, "
                              f"{kind.__name__}") from None
    return options


def per_rank_batch(cfg: Config, world_size: int) -> int:
    """Samples per rank: trainer.global_batch_size split over the ranks, or trainer.batch_size as given."""
    t = cfg.trainer
    if not t.global_batch_size:
        return t.batch_size
    if t.global_batch_size % world_size:
        lower = t.global_batch_size - t.global_batch_size % world_size
        valid = f"{lower} or {lower + world_size}" if lower else f"{world_size}"
        raise ConfigError(f"trainer.global_batch_size = {t.global_batch_size} does not divide over {world_size} ranks; "
                          f"use a multiple of {world_size} (e.g. {valid}), or run on a number of ranks that divides it")
    batch = t.global_batch_size // world_size
    if cfg.method in GROUP_METHODS and batch % cfg.reward.group_size:
        raise ConfigError(f"trainer.global_batch_size = {t.global_batch_size} over {world_size} ranks gives {batch} "
                          f"samples per rank, not a multiple of reward.group_size = {cfg.reward.group_size}; use a "
                          f"multiple of {world_size * cfg.reward.group_size}")
    return batch


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_config(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def _check_ranges(node, prefix: str) -> None:
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if _is_config(value):
            _check_ranges(value, key + ".")
            continue
        m = f.metadata
        if m.get("choices") is not None and value not in m["choices"]:
            raise ConfigError(f"{key} = {value!r} is not valid; choose one of {list(m['choices'])}")
        if m.get("min") is not None and value < m["min"]:
            raise ConfigError(f"{key} = {value!r} is out of range; it must be >= {m['min']}")
        if m.get("max") is not None and value > m["max"]:
            raise ConfigError(f"{key} = {value!r} is out of range; it must be <= {m['max']}")


def _coerce(key: str, tp, value, from_cli: bool):
    """Turn a CLI string, or a value of a TOML / JSON file, into the field's type, or say why not. A file's
    value must have the type already: a quoted "3" for an integer is a slip the file's own syntax can show."""
    if not from_cli and isinstance(value, str) and tp is not str:
        kind = {bool: "true or false, unquoted", int: "an integer, unquoted", float: "a number, unquoted",
                tuple: "a list of numbers, e.g. [1.0, 0.5]"}[tp]
        raise ConfigError(f"{key} = {value!r} is a string in a file; expected {kind}")
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if from_cli and value.lower() in ("1", "true", "yes", "on"):
                return True
            if from_cli and value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not from_cli):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return _finite(key, float(value))
        if tp is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if tp is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(_finite(key, float(v)) for v in items)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        pass
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            tuple: "a comma-separated list of numbers" if from_cli else "a list of numbers"}[tp]
    raise ConfigError(f"{key} = {value!r} has the wrong type; expected {kind}")


def _finite(key: str, number: float) -> float:
    """NaN would pass every range check (each comparison is False) and surface steps later as skipped updates."""
    if not math.isfinite(number):
        raise ConfigError(f"{key} = {number!r} is not a finite number")
    return number


def _set(cfg: Config, key: str, value, from_cli: bool = False) -> None:
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            valid = sorted(n for n in names)
            raise ConfigError(f"unknown config key {key!r}: {where} has no {part!r}; valid keys there: {valid}")
        if i == len(parts) - 1:
            tp = _hints(type(node))[part]
            if _is_config(tp):
                raise ConfigError(f"{key!r} is a section; set one of its keys, e.g. --{key}.<name>")
            setattr(node, part, _coerce(key, tp, value, from_cli))
        else:
            node = getattr(node, part)
            if not _is_config(node):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} is not a section")


def _flatten(table: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in table.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((prefix + k, v))
    return out


def recipe_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(RECIPES_DIR) if f.endswith(".toml"))


def _load_toml(path: str, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid TOML: {e}") from None


def _load_config_file(path: str) -> dict:
    """A TOML file, or the config.json that every run writes (to replay a run)."""
    if path.endswith(".json"):
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    return _load_toml(path, "config file")


def _shown(value) -> str:
    """A value as the command line takes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" for v in value)
    return str(value)


def help_text(recipe: str = Config.recipe) -> str:
    lines = ["usage: python -m fastdmd.train [--recipe NAME] [--config FILE.toml] [--key.sub VALUE ...]",
             "", f"recipes: {', '.join(recipe_names())}", "",
             f"options (in brackets: recipe {recipe}'s value; `--recipe NAME --help` shows another recipe's):"]

    def walk(node, prefix):
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if _is_config(value):
                walk(value, f"{prefix}{f.name}.")
                continue
            m = f.metadata
            rng = ""
            if m.get("choices"):
                rng = f" one of {list(m['choices'])}"
            elif m.get("min") is not None or m.get("max") is not None:
                rng = f" range [{m.get('min', '-inf')}, {m.get('max') if m.get('max') is not None else 'inf'}]"
            lines.append(f"  --{prefix}{f.name} [{_shown(value)}]  {m['help']}{rng}")

    walk(_recipe_config(recipe), "")
    return "\n".join(lines)


def _recipe_config(recipe: str) -> Config:
    """The dataclass defaults with the recipe's values over them (not validated)."""
    if recipe not in recipe_names():
        raise ConfigError(f"unknown recipe {recipe!r}; available: {recipe_names()}")
    cfg = Config()
    for key, value in _flatten(_load_toml(os.path.join(RECIPES_DIR, recipe + ".toml"), "recipe")):
        _set(cfg, key, value)
    cfg.recipe = recipe
    return cfg


def _resolve_auto_resume(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """--resume auto: resume when run_dir holds a complete checkpoint, else start it (over), so that one command
    serves a first launch and every restart of `torchrun --max-restarts`."""
    from fastdmd.checkpoint import complete_checkpoints

    run_dir = dict(pairs).get("run_dir", "")
    if not run_dir:
        raise ConfigError("--resume auto needs --run_dir: the folder the run writes its checkpoints to")
    found = "true" if complete_checkpoints(run_dir) else "false"
    return [(key, found if key == "resume" else value) for key, value in pairs]


def parse_args(argv: list[str] | None = None) -> Config:
    """Build the run's Config from defaults, the recipe, an optional file and the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        named = [a.partition("=")[2] or (argv[i + 1] if i + 1 < len(argv) else "")
                 for i, a in enumerate(argv) if a == "--recipe" or a.startswith("--recipe=")]
        print(help_text(*named[-1:]))
        raise SystemExit(0)
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}; options look like --trainer.steps 200 (see --help)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or nxt.startswith("--"):
                value = "true"  # a bare flag, e.g. --resume
            else:
                value, i = nxt, i + 1
        pairs.append((key, value))
        i += 1

    if dict(pairs).get("resume") == "auto":
        pairs = _resolve_auto_resume(pairs)
    given = dict(pairs)
    saved = os.path.join(given.get("run_dir", ""), "config.json")
    cfg = Config()
    resumed = given.get("resume", "false").lower() in ("1", "true", "yes", "on") and os.path.exists(saved)
    if resumed:
        # Resuming continues the saved run; the command line may still change e.g. trainer.steps.
        try:
            for key, value in _flatten(_load_config_file(saved)):
                _set(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"--resume: cannot read the run's saved settings ({e}); restore {saved}, or delete "
                              f"it and pass the run's original options again with --resume") from None
    else:
        cfg = _recipe_config(given.get("recipe", cfg.recipe))
    for key, value in pairs:
        if key == "config":
            if value == "true":  # a bare --config
                raise ConfigError("--config needs a file: --config FILE.toml (or a run's config.json)")
            for k, v in _flatten(_load_config_file(value)):
                if k not in RUN_PLACE_KEYS:
                    _set(cfg, k, v)
    for key, value in pairs:
        if key in ("recipe", "method") and resumed and value != getattr(cfg, key):
            raise ConfigError(f"--{key} {value} differs from the resumed run's {key} {getattr(cfg, key)!r}, whose "
                              f"checkpoints it saved; leave --{key} out, or start a new run without --resume")
        if key == "recipe" and value != cfg.recipe:
            raise ConfigError(f"--recipe {value} differs from the recipe {cfg.recipe!r} that --config "
                              f"{given.get('config')} sets; leave one of them out")
        if key not in ("config", "recipe"):
            _set(cfg, key, value, from_cli=True)
    if "trainer.batch_size" in given and "trainer.global_batch_size" not in given and cfg.trainer.global_batch_size:
        # Given beside each other on the command line, the global batch replaces the per-rank one, as its help says;
        # a global batch from a file would drop a per-rank one given on the command line without a word.
        origin = "the resumed run's config.json" if resumed else f"--config {given.get('config')}"
        raise ConfigError(f"--trainer.batch_size {given['trainer.batch_size']} would be ignored: trainer.global_batch_size "
                          f"= {cfg.trainer.global_batch_size} (from {origin}) sets the batch and splits it over the "
                          f"ranks; give --trainer.global_batch_size instead, or add --trainer.global_batch_size 0 to "
                          f"set the batch per rank")
    return cfg.validate()


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = Config()
    for key, value in _flatten(data):
        _set(cfg, key, value)
    return cfg.validate()
