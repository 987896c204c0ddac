"""CLIP-I, CLIP-T, DINO and diversity: the DreamBooth evaluation metrics.

- CLIP-I: mean cosine similarity of CLIP image embeddings (the model's projected image features),
  generated images against the real subject images, over all (generated, real) pairs.
- CLIP-T: mean cosine similarity of a generated image's CLIP embedding and the CLIP text embedding
  of its prompt *without* the identifier token ("a dog on the beach", not "a sks dog on the beach").
- DINO: mean cosine similarity of self-supervised ViT (ViT-S/16 in the DreamBooth paper) CLS
  embeddings, generated against real, over all pairs.
- diversity: mean pairwise DINO distance ``1 - cos`` among the images of one subject and one prompt
  (different seeds); 0 for identical images.

Models come only from a path the user gives: a local directory in Hugging Face layout or an
``s3://`` URI (downloaded once through :func:`dreamblend_ray.io.storage.cached_download`). Nothing is
fetched from a model hub. Image preprocessing uses transformers' PIL image processors (no
torchvision).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreamblend_ray.io import storage

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- pure maths

def normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm. ``(N, D) -> (N, D)``, float32."""
    return torch.nn.functional.normalize(x.float(), dim=-1)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All cosine similarities. ``(N, D), (M, D) -> (N, M)``."""
    return normalize(a) @ normalize(b).T


def mean_pairwise_distance(embeddings: torch.Tensor) -> float:
    """Mean of ``1 - cos`` over the unordered pairs ``i < j`` of ``(N, D)`` embeddings.

    NaN when N < 2 (diversity is undefined for a single image).
    """
    n = embeddings.shape[0]
    if n < 2:
        return math.nan
    sims = cosine_matrix(embeddings, embeddings)
    i, j = torch.triu_indices(n, n, offset=1)
    return float((1.0 - sims[i, j]).mean())


# --------------------------------------------------------------------------- model loading

def resolve_model_path(uri: str | None, option: str) -> Path:
    """A local directory for the model at ``uri``; ValueError naming ``option`` when unusable."""
    if not uri:
        raise ValueError(f"{option} is required: give a local directory or a remote URI (s3://, gs://, "
                         "...) of a transformers model (models are never downloaded from a hub)")
    try:
        path = storage.cached_download(str(uri))  # a local directory as it is
    except (storage.StorageError, OSError) as exc:
        raise ValueError(f"{option}: cannot download {uri}: {exc}") from exc
    if not path.is_dir():
        raise ValueError(f"{option}: {uri} is not a directory (expected a transformers model "
                         "directory with config.json)")
    if not (path / "config.json").is_file():
        raise ValueError(f"{option}: {uri} has no config.json (expected a transformers model "
                         "directory saved with save_pretrained)")
    return path


def _image_processor(path: Path, option: str):
    from transformers import AutoImageProcessor

    if not (path / "preprocessor_config.json").is_file():
        raise ValueError(f"{option}: {path} has no preprocessor_config.json (save the image "
                         "processor next to the model)")
    return AutoImageProcessor.from_pretrained(path, backend="pil", local_files_only=True)


def _as_rgb(images) -> list[Image.Image]:
    if isinstance(images, Image.Image):
        images = [images]
    if not images:
        raise ValueError("at least one image is required")
    return [image.convert("RGB") for image in images]


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class ClipScorer:
    """A CLIPModel with its image processor and tokenizer: projected, unit-norm embeddings."""

    model: object
    processor: object
    tokenizer: object
    batch_size: int = 32

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """``list[PIL.Image]`` (N) -> ``(N, D)`` unit-norm projected image features, on CPU."""
        return _embed_images(self, images,
                             lambda pixels: _pooled(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """``list[str]`` (N) -> ``(N, D)`` unit-norm projected text features, on CPU."""
        if isinstance(texts, str) or not texts:
            raise ValueError("texts must be a non-empty list of strings")
        max_length = min(self.tokenizer.model_max_length,
                         self.model.config.text_config.max_position_embeddings)
        out = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                                    truncation=True, max_length=max_length, return_tensors="pt")
            tokens = {k: v.to(self.device) for k, v in tokens.items()
                      if k in ("input_ids", "attention_mask")}
            out.append(_pooled(self.model.get_text_features(**tokens)).float().cpu())
        return normalize(torch.cat(out))


@dataclass
class DinoScorer:
    """A ViTModel (self-supervised, e.g. DINO ViT-S/16) with its image processor: CLS embeddings."""

    model: object
    processor: object
    batch_size: int = 32

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """``list[PIL.Image]`` (N) -> ``(N, D)`` unit-norm CLS token of the last hidden state."""
        return _embed_images(self, images,
                             lambda pixels: self.model(pixel_values=pixels).last_hidden_state[:, 0])


def _embed_images(scorer, images, embed) -> torch.Tensor:
    """Batched preprocessing + ``embed(pixel_values)`` -> ``(N, D)`` unit-norm float32 on CPU."""
    images = _as_rgb(images)
    out = []
    for start in range(0, len(images), scorer.batch_size):
        pixels = scorer.processor(images=images[start:start + scorer.batch_size],
                                  return_tensors="pt")["pixel_values"]
        out.append(embed(pixels.to(scorer.device, dtype=scorer.model.dtype)).float().cpu())
    return normalize(torch.cat(out))


def load_clip(uri: str | None, device: str | torch.device | None = None,
              option: str = "--clip-model") -> ClipScorer:
    """A :class:`ClipScorer` from a local or s3:// transformers CLIPModel directory."""
    from transformers import AutoTokenizer, CLIPModel

    path = resolve_model_path(uri, option)
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    logger.info("loaded CLIP model from %s", uri)
    return ClipScorer(model.to(device or "cpu"), _image_processor(path, option), tokenizer)


def load_dino(uri: str | None, device: str | torch.device | None = None,
              option: str = "--dino-model") -> DinoScorer:
    """A :class:`DinoScorer` from a local or s3:// transformers ViTModel directory."""
    from transformers import ViTModel

    path = resolve_model_path(uri, option)
    model = ViTModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True).eval()
    logger.info("loaded DINO model from %s", uri)
    return DinoScorer(model.to(device or "cpu"), _image_processor(path, option))


# --------------------------------------------------------------------------- the metrics

def _mean_cross_similarity(embed, generated, real) -> float:
    return float(cosine_matrix(embed(generated), embed(real)).mean())


def clip_i(clip: ClipScorer, generated, real) -> float:
    """Mean CLIP image-image cosine over all (generated, real) pairs."""
    return _mean_cross_similarity(clip.image_embeddings, generated, real)


def clip_t_per_image(clip: ClipScorer, images, prompts: list[str]) -> list[float]:
    """CLIP image-text cosine of each image with its own prompt (identifier token removed)."""
    images = _as_rgb(images)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    sims = (clip.image_embeddings(images) * clip.text_embeddings(prompts)).sum(-1)
    return [float(s) for s in sims]


def clip_t(clip: ClipScorer, images, prompts: list[str]) -> float:
    """Mean CLIP-T over (image, prompt) entries."""
    return float(np.mean(clip_t_per_image(clip, images, prompts)))


def dino(dino_scorer: DinoScorer, generated, real) -> float:
    """Mean DINO CLS cosine over all (generated, real) pairs."""
    return _mean_cross_similarity(dino_scorer.image_embeddings, generated, real)


def diversity(dino_scorer: DinoScorer, images) -> float:
    """Mean pairwise DINO distance ``1 - cos`` among ``images`` (one subject, one prompt)."""
    return mean_pairwise_distance(dino_scorer.image_embeddings(images))


# --------------------------------------------------------------------------- a checkpoint scorer

@dataclass
class ClipDinoScorer:
    """Scores generated images of one subject for checkpoint choice on real models.

    prompt_fidelity = CLIP-T (prompts without the identifier token);
    subject_fidelity = DINO against the real subject images.
    """

    clip: ClipScorer
    dino: DinoScorer
    reference_images: list

    def __post_init__(self):
        if not self.reference_images:
            raise ValueError("reference_images must hold at least one real subject image")
        self._reference = self.dino.image_embeddings(self.reference_images)

    def __call__(self, images, plain_prompts: list[str]) -> dict:
        generated = self.dino.image_embeddings(images)
        return {
            "prompt_fidelity": clip_t(self.clip, images, plain_prompts),
            "subject_fidelity": float(cosine_matrix(generated, self._reference).mean()),
        }


# --------------------------------------------------------------------------- tiny random scorers

def save_tiny_clip(directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A random tiny CLIPModel (+ PIL image processor and tokenizer) saved to ``directory``.

    For tests and smoke runs only: its scores are well-defined cosines, not meaningful ones.
    """
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    from dreamblend_ray.models.tokenizers import TINY_WORDS, build_tokenizer

    tokenizer = build_tokenizer(list(TINY_WORDS) + ["jungle", "sidewalk", "street"], max_length=32)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_tiny_dino(directory: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A random tiny ViTModel (+ PIL image processor) saved to ``directory``; tests and smoke runs."""
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, image_size=image_size, patch_size=8),
                     add_pooling_layer=False)
    processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
