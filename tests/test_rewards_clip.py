"""CLIP-family rewards (fastdmd/rewards/clip.py) through the path a user takes: a tiny random
CLIPModel and a byte-level CLIP tokenizer built offline, save_pretrained to a temp dir with a
preprocessor_config.json, loaded by folder. Also the background scorer (rewards/background.py)."""

import json
import os
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from fastdmd.config import CLIP_REWARD_NAMES, Config, ConfigError
from fastdmd.rewards import (CLIP_REWARDS, BackgroundReward, CLIPScore, HPSv2, JpegCompressibility, PickScore, Reward,
                             build_reward)

PROMPTS = ["a red square", "a blue circle", "a green triangle", "seven"]
IMAGE_SIZE, MAX_TOKENS = 40, 20  # unusual sizes: code that assumes 224 / 77 fails here
MEAN, STD = [0.3, 0.5, 0.7], [0.2, 0.3, 0.25]
# The score each class must give, written out from the papers' definitions (module docstring).
SCALES = {
    CLIPScore: lambda cos, model: 100.0 * cos.clamp(min=0),
    PickScore: lambda cos, model: model.logit_scale.exp() * cos,
    HPSv2: lambda cos, model: cos,
}


def byte_level_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer with no merges: every byte-level character is a token (with and without </w>)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {ch + "</w>": i + len(alphabet) for i, ch in enumerate(alphabet)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    assert len(tokenizer) == 514  # a silently truncated vocabulary would map every word to one token
    return tokenizer


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip-tiny"))


def make_tiny_clip(root) -> str:
    """A random CLIP folder in transformers format (model, tokenizer, preprocessor), built offline."""
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=36, intermediate_size=52, num_hidden_layers=2,
                         num_attention_heads=3, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=40, intermediate_size=56, num_hidden_layers=2, num_attention_heads=5,
                           image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=24)
    CLIPModel(config).save_pretrained(root)
    tokenizer.save_pretrained(root)
    (root / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN, "image_std": STD,
        "do_convert_rgb": True}))
    return str(root)


def images_and_labels(batch=6, seed=0, height=48, width=56):
    """Non-square images, so both the resize and the center crop do something."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, height, width, generator=g) * 2 - 1, torch.arange(batch) % len(PROMPTS)


def reference_cosines(path, pixels, prompts):
    """cos(image, prompt) [B, P] straight from CLIPModel's feature functions, fp32."""
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    tokens = CLIPTokenizer.from_pretrained(path, local_files_only=True)(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels)
        text = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    image, text = (getattr(f, "pooler_output", f) for f in (image, text))
    return F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T, model


@pytest.mark.parametrize("cls", [CLIPScore, PickScore, HPSv2])
def test_scores_are_the_papers_formula_on_clipmodel_features(clip_dir, cls):
    images, labels = images_and_labels()
    reward = cls(clip_dir, PROMPTS, dtype="float32")
    scores = reward(images, labels)
    assert scores.shape == (6,) and scores.dtype == torch.float32
    cosines, model = reference_cosines(clip_dir, reward.transform(images), PROMPTS)
    expected = SCALES[cls](cosines[torch.arange(6), labels], model)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert reward.differentiable and isinstance(reward, Reward)


def test_preprocessing_matches_the_clip_image_processor(clip_dir):
    # Smooth images (upsampled 6x7 noise): PIL rounds to uint8 after its horizontal and its vertical
    # pass (up to one grey level; on pixel noise the clipped intermediate differs by up to ~14).
    g = torch.Generator().manual_seed(3)
    smooth = F.interpolate(torch.rand(3, 3, 6, 7, generator=g), size=(48, 56), mode="bilinear", align_corners=False)
    uint8 = (smooth * 255).round().to(torch.uint8)
    with warnings.catch_warnings():  # transformers 5 without torchvision falls back to its PIL processor, and says so
        warnings.simplefilter("ignore")
        processor = CLIPImageProcessor.from_pretrained(clip_dir, local_files_only=True)
    expected = processor(images=[im.permute(1, 2, 0).numpy() for im in uint8], return_tensors="pt").pixel_values
    ours = HPSv2(clip_dir, PROMPTS, dtype="float32").transform(uint8.float() / 127.5 - 1)
    assert ours.shape == expected.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    grey_levels = (ours - expected).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255
    assert grey_levels.max() <= 1.5 and grey_levels.mean() <= 0.5


def test_gradient_reaches_the_images_and_an_ascent_step_raises_every_score(clip_dir):
    images, labels = images_and_labels()
    images = (images * 1.2).requires_grad_(True)  # partly outside [-1, 1]: those pixels are clamped
    reward = PickScore(clip_dir, PROMPTS, dtype="float32")
    scores = reward(images, labels)
    scores.sum().backward()
    grad = images.grad
    assert torch.isfinite(grad).all()
    inside = images.detach().abs() <= 1
    assert grad[inside].abs().sum() > 0 and (grad[~inside] == 0).all()
    assert all(p.grad is None for p in reward.model.parameters())
    with torch.no_grad():
        stepped = reward(images + 2e-3 * grad.sign() * inside, labels)
    assert (stepped > scores.detach()).all()


def test_an_image_made_to_match_a_prompt_scores_highest_with_it(clip_dir):
    # "Matching" in this random model's embedding space: climb the margin of prompt 0's cosine over
    # the best other prompt's, then every scorer must rank prompt 0 first for those images, in the
    # order of the embedding cosines.
    hps = HPSv2(clip_dir, PROMPTS, dtype="float32")
    images, _ = images_and_labels(batch=4, seed=5)

    def margin(x):
        per_prompt = torch.stack([hps(x, torch.full((4,), p)) for p in range(len(PROMPTS))], dim=1)
        return per_prompt[:, 0] - per_prompt[:, 1:].max(dim=1).values

    assert (margin(images) < 0).any()  # prompt 0 does not already win everywhere
    for _ in range(30):
        images.requires_grad_(True)
        grad, = torch.autograd.grad(margin(images).sum(), images)
        images = (images + 0.02 * grad.sign()).clamp(-1, 1).detach()
    cosines, model = reference_cosines(clip_dir, hps.transform(images), PROMPTS)
    assert (cosines.argmax(dim=1) == 0).all()
    for cls in (CLIPScore, PickScore, HPSv2):
        reward = cls(clip_dir, PROMPTS, dtype="float32")
        per_prompt = torch.stack([reward(images, torch.full((4,), p)) for p in range(len(PROMPTS))], dim=1)
        assert (per_prompt.argmax(dim=1) == 0).all()
        torch.testing.assert_close(per_prompt, SCALES[cls](cosines, model), rtol=1e-5, atol=1e-5)


def test_micro_batches_give_the_scores_of_one_batch(clip_dir):
    images, labels = images_and_labels(batch=7)
    whole = PickScore(clip_dir, PROMPTS, dtype="float32", micro_batch=64)(images, labels)
    # images in chunks of 3 + 3 + 1, prompts in 3 + 1
    chunked = PickScore(clip_dir, PROMPTS, dtype="float32", micro_batch=3)(images, labels)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)


def test_bf16_is_close_to_fp32(clip_dir):
    images, labels = images_and_labels()
    bf16 = HPSv2(clip_dir, PROMPTS)  # the default dtype
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    fp32 = HPSv2(clip_dir, PROMPTS, dtype="float32")
    scores = bf16(images, labels)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, fp32(images, labels), rtol=0, atol=0.02)  # cosines, in [-1, 1]
    # PickScore's temperature is read before the cast to bf16, so its scale stays exact
    assert PickScore(clip_dir, PROMPTS).logit_scale == PickScore(clip_dir, PROMPTS, dtype="float32").logit_scale


def test_grayscale_is_scored_as_rgb_and_clip_score_clamps(clip_dir):
    images, labels = images_and_labels()
    gray = images[:, :1]
    reward = CLIPScore(clip_dir, PROMPTS, dtype="float32", clamp=False, weight=2.5)
    torch.testing.assert_close(reward(gray, labels), reward(gray.expand(-1, 3, -1, -1), labels))
    clamped = CLIPScore(clip_dir, PROMPTS, dtype="float32", weight=2.5)(gray, labels)
    raw = reward(gray, labels)
    assert (raw < 0).any(), "fixture should give some negative cosines"
    torch.testing.assert_close(clamped, raw.clamp(min=0))


def _drop(name):
    return lambda d: os.remove(os.path.join(d, name))


def _set_config(key, value, section=None):
    def change(d):
        path = os.path.join(d, "config.json")
        with open(path) as f:
            config = json.load(f)
        (config[section] if section else config)[key] = value
        with open(path, "w") as f:
            json.dump(config, f)
    return change


@pytest.mark.parametrize("change, error, message", [
    (None, FileNotFoundError, r"model folder '.*/nowhere' does not exist; it must hold a CLIP model in transformers "
                              r"format: config.json .*preprocessor_config.json; make it .*huggingface-cli download "
                              r"yuvalkirstain/PickScore_v1 --local-dir DIR"),
    (_drop("preprocessor_config.json"), FileNotFoundError, r"lacks preprocessor_config.json; it must hold"),
    (_drop("tokenizer.json"), FileNotFoundError,
     r"lacks the tokenizer \(tokenizer.json, or vocab.json \+ merges.txt\)"),
    (_drop("model.safetensors"), FileNotFoundError, r"lacks model weights \(model.safetensors or"),
    (_set_config("model_type", "blip"), ValueError, r"config.json is a 'blip' model, expected a CLIP model"),
    (_set_config("eos_token_id", 7, "text_config"), ValueError,
     r"text eos_token_id 7 but the tokenizer's end token is 513"),
])
def test_a_bad_folder_says_what_to_put_there(clip_dir, tmp_path, change, error, message):
    folder = str(tmp_path / "nowhere")
    if change is not None:
        shutil.copytree(clip_dir, folder)
        change(folder)
    with pytest.raises(error, match=message) as raised:
        PickScore(folder, PROMPTS)
    assert folder in str(raised.value)


def test_argument_errors(clip_dir):
    reward = HPSv2(clip_dir, PROMPTS, dtype="float32")
    images, _ = images_and_labels(batch=2)
    with pytest.raises(ValueError, match=r"label 4 is not a prompt index; it has 4 prompts \(labels 0..3\)"):
        reward(images, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"1 \(grayscale\) or 3 \(RGB\) channels, got 2"):
        reward(images[:, :2], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"needs a non-empty list of prompt strings"):
        HPSv2(clip_dir, [])
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float32'\], got 'float16'"):
        HPSv2(clip_dir, PROMPTS, dtype="float16")
    with pytest.raises(ValueError, match=r"micro_batch must be >= 1, got 0"):
        HPSv2(clip_dir, PROMPTS, micro_batch=0)


def test_rewards_are_chosen_by_name_from_the_config(clip_dir):
    assert set(CLIP_REWARDS) == set(CLIP_REWARD_NAMES)
    cfg = Config()
    cfg.reward.names, cfg.reward.weights = "pickscore, jpeg", (1.0, 0.5)
    with pytest.raises(ConfigError, match="reward pickscore needs reward.pickscore_path"):
        cfg.validate()
    cfg.reward.pickscore_path, cfg.reward.dtype = clip_dir, "float32"
    cfg.validate()
    with pytest.raises(ValueError, match="reward 'pickscore' scores images against prompts"):
        build_reward(cfg.reward, classifier=None)
    combined = build_reward(cfg.reward, classifier=None, prompts=PROMPTS)
    assert combined.names == ("pickscore", "jpeg_compressibility") and not combined.differentiable
    images, labels = images_and_labels()
    pickscore = PickScore(clip_dir, PROMPTS, dtype="float32")
    expected = pickscore(images, labels) + 0.5 * JpegCompressibility()(images, labels)
    torch.testing.assert_close(combined(images, labels), expected)


class _Gate(Reward):
    """Waits for a signal before scoring: shows whether submit() returned before the scoring ended."""

    name, differentiable = "gate", False

    def __init__(self):
        self.opened = threading.Event()

    def score(self, images, labels, dmd):
        if not self.opened.wait(timeout=30):
            raise TimeoutError("the test never opened the gate")
        if (labels < 0).any():
            raise ValueError("negative label")
        return images.flatten(1).mean(1)


def test_background_scoring_returns_at_once_and_gives_the_same_scores(clip_dir):
    gate = _Gate()
    background = BackgroundReward(gate)
    images, labels = images_and_labels(batch=3)
    future = background.submit(images, labels)
    images.add_(1.0)  # the caller reuses its buffer: the worker scores the images as submitted
    assert not future.done()
    gate.opened.set()
    torch.testing.assert_close(future.result(timeout=30), (images - 1.0).flatten(1).mean(1))
    with pytest.raises(ValueError, match="negative label"):
        background.submit(images, -labels - 1).result(timeout=30)
    background.close()

    reward = HPSv2(clip_dir, PROMPTS, dtype="float32")
    images, labels = images_and_labels()
    images.requires_grad_(True)
    background = BackgroundReward(reward)
    scores = background.submit(images, labels).result(timeout=60)
    background.close()
    assert not scores.requires_grad
    torch.testing.assert_close(scores, reward(images, labels).detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_reward_on_another_device_returns_scores_and_gradients_to_the_images(clip_dir):
    images, labels = images_and_labels()
    images.requires_grad_(True)
    on_gpu = PickScore(clip_dir, PROMPTS, dtype="float32", device="cuda")
    scores = on_gpu(images, labels)
    assert scores.device.type == "cpu"
    scores.sum().backward()
    assert images.grad.device.type == "cpu" and images.grad.abs().sum() > 0
    torch.testing.assert_close(scores.detach(), PickScore(clip_dir, PROMPTS, dtype="float32")(images, labels).detach(),
                               rtol=1e-4, atol=1e-3)
