"""Text-image rewards from CLIP-architecture models in transformers: CLIP score, PickScore, HPS v2.

The text-to-image families' prompt-alignment and preference rewards (the digits classifier's role
for SD3 / FLUX). All three are a transformers `CLIPModel` scoring the cosine between an image
embedding and the embedding of the sample's prompt; they differ in the checkpoint and in how the
cosine becomes a score:

    CLIPScore   clip_score   weight * max(cos, 0), weight 100 (torchmetrics' CLIPScore; Hessel et
                             al. use 2.5): an OpenAI/LAION CLIP, e.g. openai/clip-vit-large-patch14
    PickScore   pickscore    exp(logit_scale) * cos, the model's own learned scale (about 100),
                             as the PickScore authors compute it: yuvalkirstain/PickScore_v1
    HPSv2       hpsv2        cos, as the HPS v2 authors compute it (about 0.2 to 0.35)

Each loads from a LOCAL folder in transformers format; nothing is ever fetched (local_files_only).
The folder holds config.json (model_type "clip"), the weights (model.safetensors or
pytorch_model.bin, or their sharded index), the tokenizer (tokenizer.json, or vocab.json +
merges.txt) and preprocessor_config.json. Making one on a machine with internet:

    huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR     # CLIP score
    huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir DIR        # PickScore weights
    huggingface-cli download laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json \
        tokenizer.json tokenizer_config.json vocab.json merges.txt special_tokens_map.json --local-dir DIR

(PickScore's own card loads its processor from laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the model it
was fine-tuned from: the third command puts that tokenizer and preprocessor into the same folder.)

HPS v2 and v2.1 are published only as open_clip checkpoints (HPS_v2_compressed.pt and
HPS_v2.1_compressed.pt in the xswu/HPSv2 hub repo), fine-tunes of open_clip ViT-H-14
laion2b_s32b_b79k, whose transformers twin is laion/CLIP-ViT-H-14-laion2B-s32B-b79K. HPSv2 here
reads a converted folder: that repo's config.json, tokenizer and preprocessor files, plus the HPS
state dict renamed to CLIPModel keys and saved as model.safetensors. The renaming, vision tower
(the text tower is the same without the `visual.` prefix and `vision_model` -> `text_model`):
  visual.conv1.weight -> vision_model.embeddings.patch_embedding.weight
  visual.class_embedding -> vision_model.embeddings.class_embedding
  visual.positional_embedding -> vision_model.embeddings.position_embedding.weight
  visual.ln_pre -> vision_model.pre_layrnorm;  visual.ln_post -> vision_model.post_layernorm
  visual.transformer.resblocks.{i}.ln_1 / ln_2 / attn.out_proj / mlp.c_fc / mlp.c_proj
    -> vision_model.encoder.layers.{i}.layer_norm1 / layer_norm2 / self_attn.out_proj / mlp.fc1 / mlp.fc2
  visual.transformer.resblocks.{i}.attn.in_proj_weight (and _bias), split in three along dim 0
    -> vision_model.encoder.layers.{i}.self_attn.q_proj / k_proj / v_proj
  visual.proj -> visual_projection.weight, TRANSPOSED
  text: token_embedding -> text_model.embeddings.token_embedding, positional_embedding ->
  text_model.embeddings.position_embedding.weight, ln_final -> text_model.final_layer_norm,
  text_projection -> text_projection.weight (transposed); logit_scale as is.
No converter ships with fastdmd: without open_clip and the real checkpoint here it could not be
tested against the model it converts.

ImageReward is left out: it is BLIP (ViT-L) with a BERT text encoder that cross-attends to the
image patches, then an MLP head, distributed as a checkpoint of the authors' own BLIP code. That is
not a transformers folder; transformers' BlipForImageTextRetrieval has a similar encoder under
other key names and no such head, so supporting it means a converter and a head checked against
the official package, not a loader like the three here.

Where it sits in the step: the `reward` phase, like every Reward. Image preprocessing is done in
torch so that gradients reach the images (the PIL processor would cut them): clamp to [-1, 1],
map to [0, 1], grayscale to RGB, resize the shortest edge to the processor's size (bicubic,
antialiased, what the processor does with PIL), center-crop to its crop size, normalize with its
mean and std. The prompts' text embeddings are computed once, at construction, and cached.

`device` puts the model on another device than the training step's (e.g. a second GPU):
images are moved there and the scores back, and gradients flow through both moves. To keep a
slow reward from stalling the step when no gradient is needed, wrap it in
`fastdmd.rewards.background.BackgroundReward` (a worker thread; no separate process is built).
"""

from __future__ import annotations

import abc
import json
import os
from typing import Sequence

import torch
import torch.nn.functional as F

from fastdmd.ops.checks import check_number
from fastdmd.rewards.base import Reward

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# transformers.image_utils.OPENAI_CLIP_MEAN / _STD, the processor's defaults when its config omits them
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def missing_files(path: str) -> list[str]:
    """What a transformers CLIP folder lacks, in words (empty when complete)."""
    have = set(os.listdir(path))
    missing = []
    if "config.json" not in have:
        missing.append("config.json")
    if not have & set(WEIGHT_FILES):
        missing.append("model weights (" + " or ".join(WEIGHT_FILES) + ")")
    if "tokenizer.json" not in have and not {"vocab.json", "merges.txt"} <= have:
        missing.append("the tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    if "preprocessor_config.json" not in have:
        missing.append("preprocessor_config.json")
    return missing


class ImageTransform:
    """The CLIP image processor's steps as differentiable torch ops, read from preprocessor_config.json."""

    def __init__(self, config: dict):
        size = config.get("size", {"shortest_edge": 224}) if config.get("do_resize", True) else None
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if size is not None and "shortest_edge" not in size and not {"height", "width"} <= set(size):
            raise ValueError(f"preprocessor_config.json: size = {size!r}; expected an int, "
                             f"{{'shortest_edge': N}} or {{'height': H, 'width': W}}")
        crop = config.get("crop_size", 224) if config.get("do_center_crop", True) else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        self.size = size
        self.crop = None if crop is None else (crop["height"], crop["width"])
        normalize = config.get("do_normalize", True)
        mean, std = config.get("image_mean", OPENAI_CLIP_MEAN), config.get("image_std", OPENAI_CLIP_STD)
        self.mean = torch.tensor(mean if normalize else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        self.std = torch.tensor(std if normalize else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        if self.size is None:
            return height, width
        if "shortest_edge" not in self.size:
            return self.size["height"], self.size["width"]
        # transformers' get_resize_output_image_size: the short side becomes the size, the long side
        # is scaled by the same factor and truncated.
        short, long = sorted((height, width))
        new_short, new_long = self.size["shortest_edge"], int(self.size["shortest_edge"] * long / short)
        return (new_short, new_long) if height <= width else (new_long, new_short)

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        return self.crop or self.resized_shape(height, width)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 1 or 3, H, W] in [-1, 1] -> normalized pixel values [B, 3, h, w] in fp32."""
        x = (images.float().clamp(-1, 1) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        height, width = self.resized_shape(*x.shape[-2:])
        if (height, width) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        if self.crop is not None:
            crop_h, crop_w = self.crop
            if crop_h > height or crop_w > width:
                raise ValueError(f"images resize to {height}x{width}, smaller than the processor's center crop "
                                 f"{crop_h}x{crop_w}")
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            x = x[..., top:top + crop_h, left:left + crop_w]
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def _features(output) -> torch.Tensor:
    """get_*_features returns the tensor (transformers 4) or an output whose pooler_output it is (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPReward(Reward):
    """A CLIP-architecture text-image reward: score = from_cosine(cos(image embedding, prompt embedding)).

    path: local transformers folder (see the module docstring); prompts: the sample labels index
    into this list; dtype: of the model ("bfloat16" default, or "float32"); micro_batch: images
    (and prompts) per forward; device: where the model runs (scores come back to the images' device).
    Differentiable w.r.t. the images; the model is frozen.
    """

    differentiable = True
    download = ""  # how to make the folder, for error messages (subclasses)

    def __init__(self, path: str, prompts: Sequence[str], *, dtype: str = "bfloat16", micro_batch: int = 32,
                 device: str | torch.device = "cpu"):
        from transformers import AutoTokenizer, CLIPConfig, CLIPModel  # here: every run imports fastdmd.rewards

        prompts = list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"reward {self.name!r} needs a non-empty list of prompt strings, got {prompts!r:.80}")
        if dtype not in DTYPES:
            raise ValueError(f"reward {self.name!r}: dtype must be one of {list(DTYPES)}, got {dtype!r}")
        check_number("micro_batch", micro_batch, minimum=1)
        expected = ("config.json (model_type 'clip'), model weights (model.safetensors or pytorch_model.bin), "
                    "the tokenizer (tokenizer.json, or vocab.json + merges.txt) and preprocessor_config.json")
        how = f"make it on a machine with internet: {self.download}"
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"reward {self.name!r}: model folder {path!r} does not exist; it must hold a CLIP "
                                    f"model in transformers format: {expected}; {how}")
        missing = missing_files(path)
        if missing:
            raise FileNotFoundError(f"reward {self.name!r}: model folder {path} lacks {', '.join(missing)}; it must "
                                    f"hold {expected}; {how}")
        with open(os.path.join(path, "config.json")) as f:
            model_type = json.load(f).get("model_type")
        if model_type != "clip":
            raise ValueError(f"reward {self.name!r}: {path}/config.json is a {model_type!r} model, expected a CLIP "
                             f"model (model_type 'clip'); {how}")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        text_config = CLIPConfig.from_pretrained(path, local_files_only=True).text_config
        # eos_token_id 2 is transformers' legacy marker (pool at the highest token id); any other
        # value must be the tokenizer's end token, or the text embedding is read at the wrong position.
        if text_config.eos_token_id != 2 and text_config.eos_token_id != tokenizer.eos_token_id:
            raise ValueError(f"reward {self.name!r}: {path}/config.json has text eos_token_id "
                             f"{text_config.eos_token_id} but the tokenizer's end token is {tokenizer.eos_token_id}; "
                             f"the tokenizer and the model come from different checkpoints")
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            self.transform = ImageTransform(json.load(f))
        self.device, self.dtype, self.micro_batch = torch.device(device), DTYPES[dtype], int(micro_batch)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
        # the learned temperature, read before the cast: in bf16 exp(logit_scale) would be off by up to 0.4%
        self.logit_scale = float(self.model.logit_scale.float().exp())
        self.model.to(self.device, self.dtype)
        self.prompts = prompts
        self.text_embeddings = self._embed_prompts(tokenizer, text_config.max_position_embeddings)

    @torch.no_grad()
    def _embed_prompts(self, tokenizer, max_length: int) -> torch.Tensor:
        """[P, D] fp32 unit vectors, one per prompt, on the model's device."""
        tokens = tokenizer(self.prompts, padding="max_length", truncation=True, max_length=max_length,
                           return_tensors="pt").to(self.device)
        chunks = [_features(self.model.get_text_features(input_ids=tokens.input_ids[i:i + self.micro_batch],
                                                          attention_mask=tokens.attention_mask[i:i + self.micro_batch]))
                  for i in range(0, len(self.prompts), self.micro_batch)]
        return F.normalize(torch.cat(chunks).float(), dim=-1)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[B, D] fp32 unit vectors of images in [-1, 1] (on the model's device, differentiable)."""
        pixels = self.transform(images.to(self.device)).to(self.dtype)
        return F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    @abc.abstractmethod
    def from_cosine(self, cosine: torch.Tensor) -> torch.Tensor:
        """The score of each image from its cosine with its prompt (fp32)."""

    def score(self, images, labels, dmd):
        if images.shape[1] not in (1, 3):
            raise ValueError(f"reward {self.name!r} takes 1 (grayscale) or 3 (RGB) channels, got {images.shape[1]} "
                             f"(shape {tuple(images.shape)})")
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= len(self.prompts):
            bad = low if low < 0 else high
            raise ValueError(f"reward {self.name!r}: label {bad} is not a prompt index; it has {len(self.prompts)} "
                             f"prompts (labels 0..{len(self.prompts) - 1})")
        labels = labels.to(self.device)
        scores = []
        for i in range(0, images.shape[0], self.micro_batch):
            cosine = (self.image_embeddings(images[i:i + self.micro_batch])
                      * self.text_embeddings[labels[i:i + self.micro_batch]]).sum(-1)
            scores.append(self.from_cosine(cosine))
        return torch.cat(scores).to(images.device)


class CLIPScore(CLIPReward):
    """weight * max(cos, 0) (torchmetrics' CLIPScore with weight 100); clamp=False gives weight * cos.

    With the clamp, images whose cosine is negative get no gradient (real CLIP cosines of generated
    images are about 0.15 to 0.35, so this rarely matters)."""

    name = "clip_score"
    download = "huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR"

    def __init__(self, path: str, prompts: Sequence[str], *, weight: float = 100.0, clamp: bool = True, **kwargs):
        check_number("clip_score weight", weight)
        self.weight, self.clamp = float(weight), clamp
        super().__init__(path, prompts, **kwargs)

    def from_cosine(self, cosine):
        return self.weight * (cosine.clamp(min=0) if self.clamp else cosine)


class PickScore(CLIPReward):
    """exp(logit_scale) * cos, PickScore's scale (the model's learned temperature)."""

    name = "pickscore"
    download = ("huggingface-cli download yuvalkirstain/PickScore_v1 --local-dir DIR, then the processor of the "
                "model it was fine-tuned from into the same folder: huggingface-cli download "
                "laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json tokenizer.json tokenizer_config.json "
                "vocab.json merges.txt special_tokens_map.json --local-dir DIR")

    def from_cosine(self, cosine):
        return self.logit_scale * cosine


class HPSv2(CLIPReward):
    """cos, the HPS v2 score, from a transformers folder converted from the open_clip checkpoint."""

    name = "hpsv2"
    download = ("HPS v2 is published as an open_clip checkpoint only (xswu/HPSv2: HPS_v2.1_compressed.pt); "
                "take config.json, tokenizer and preprocessor files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K and "
                "save the checkpoint renamed to CLIPModel keys as model.safetensors (mapping in "
                "fastdmd/rewards/clip.py)")

    def from_cosine(self, cosine):
        return cosine
