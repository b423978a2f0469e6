"""`VisionTower`: a frozen image encoder that turns images into patch tokens [B, N, C].

One class covers the three kinds of encoder users bring:
- transformers vision models (ViT, CLIP, SigLIP, DINOv2 ...): hidden state of `feature_layer`,
  leading CLS / register tokens dropped (LLaVA uses the penultimate layer without CLS);
- timm models: `forward_features`, prefix tokens dropped;
- any torch module returning a feature map [B, C, H, W] (flattened to H*W tokens) or tokens [B, N, C].

A full CLIP / SigLIP checkpoint (text tower included) encodes images with its vision model alone; the
whole image-text model is kept beside it, never run by `encode_images`, for zero-shot scoring
(`zero_shot.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from .images import ImageInput, load_image

Preprocessor = Callable[..., Any]
PACKAGED_PREFIX = "vlm_adapters:"  # an encoder whose weights ship in an installed package (demo/assets.py)


def _load_hf_encoder(name: str, revision: str | None, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    # ViT-style models would otherwise add a randomly initialised pooler that is never used.
    extra = {"add_pooling_layer": False} if config.model_type in ("vit", "deit") else {}
    return AutoModel.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code, **extra)


def split_image_text(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """(the image encoder, the image-text model or None): a full CLIP / SigLIP-style model gives its
    vision model and itself; another model with a vision tower gives that tower alone."""
    if getattr(getattr(model, "config", None), "vision_config", None) is None or not hasattr(model, "vision_model"):
        return model, None
    contrastive = hasattr(model, "get_text_features") and hasattr(model, "logit_scale")
    return model.vision_model, model if contrastive else None


def _text_tokenizer(name: str, revision: str | None, trust_remote_code: bool) -> Any:
    """The checkpoint's tokenizer (what its processor holds), or None when it ships none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def _default_processor(image_size: int) -> Preprocessor:
    """Resize + ImageNet normalisation, through transformers' own ViT processor."""
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": image_size, "width": image_size})


class VisionTower(nn.Module):
    """Frozen encoder + its preprocessing. Never trained, never quantized, always in eval mode."""

    def __init__(
        self,
        encoder: nn.Module,
        image_processor: Preprocessor | None = None,
        feature_layer: int = -2,
        image_size: int = 224,
        source: str | None = None,
    ) -> None:
        super().__init__()
        self.source = source  # "name@revision" when loaded by name: identifies the weights for the feature cache
        encoder, image_text = split_image_text(encoder)
        # CLIP / SigLIP with its text tower (for zero-shot scoring), its vision model shared with `encoder`
        self.image_text_model = image_text.eval().requires_grad_(False) if image_text is not None else None
        self.text_tokenizer: Any = None  # the image-text model's tokenizer, when loaded by name
        self.encoder = encoder.eval().requires_grad_(False)
        # CNN backbones run faster on CPU in channels-last layout, with the same results.
        self.channels_last = sum(isinstance(m, nn.Conv2d) for m in encoder.modules()) > 1
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        self.feature_layer = feature_layer
        self.kind = self._kind(encoder)
        self.image_processor = image_processor or self._processor_for(encoder, image_size)

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        *,
        revision: str | None = None,
        image_processor: Preprocessor | None = None,
        feature_layer: int = -2,
        trust_remote_code: bool = False,
    ) -> VisionTower:
        if name.startswith(PACKAGED_PREFIX):
            from .demo.assets import packaged_encoder

            encoder, processor = packaged_encoder(name)
            # no `source`: the weights are hashed as an in-memory module's are, so both share cached features
            return cls(encoder, image_processor or processor, feature_layer)
        if name.startswith(("timm/", "hf-hub:timm/")):
            import timm

            encoder = timm.create_model("hf-hub:" + name.removeprefix("hf-hub:"), pretrained=True)
            return cls(encoder, image_processor, feature_layer, source=f"{name}@{revision}")
        encoder = _load_hf_encoder(name, revision, trust_remote_code)
        if image_processor is None:
            from transformers import AutoImageProcessor

            image_processor = AutoImageProcessor.from_pretrained(name, revision=revision)
        tower = cls(encoder, image_processor, feature_layer, source=f"{name}@{revision}")
        if tower.image_text_model is not None:
            tower.text_tokenizer = _text_tokenizer(name, revision, trust_remote_code)
        return tower

    @staticmethod
    def _kind(encoder: nn.Module) -> str:
        from transformers import PreTrainedModel

        if isinstance(encoder, PreTrainedModel):
            return "hf"
        if hasattr(encoder, "forward_features") and hasattr(encoder, "pretrained_cfg"):
            return "timm"
        return "module"

    def _processor_for(self, encoder: nn.Module, image_size: int) -> Preprocessor:
        if self.kind == "timm":
            import timm.data

            transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=encoder))
            return lambda images: torch.stack([transform(image) for image in images])
        if self.kind == "hf":
            size = getattr(encoder.config, "image_size", image_size)
            return _default_processor(size if isinstance(size, int) else image_size)
        return _default_processor(image_size)

    def train(self, mode: bool = True) -> VisionTower:
        """Stay in eval mode: a frozen encoder must not update batch-norm statistics or use dropout."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        for tensor in self.encoder.parameters():
            return tensor.device
        return torch.device("cpu")

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images of any supported kind -> pixel tensor [B, 3, H, W] via the encoder's processor."""
        pil: list[Image.Image] = [load_image(image) for image in images]
        if self.kind == "timm":
            return self.image_processor(pil)
        out = self.image_processor(images=pil, return_tensors="pt")
        return out if isinstance(out, torch.Tensor) else out["pixel_values"]

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels -> patch tokens [B, N, C] in float32."""
        weight = next(self.encoder.parameters(), None)
        pixel_values = pixel_values.to(self.device, weight.dtype if weight is not None else torch.float32)
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        if self.kind == "hf":
            out = self.encoder(pixel_values=pixel_values, output_hidden_states=True)
            tokens = out.hidden_states[self.feature_layer]
            tokens = tokens[:, self._num_prefix_tokens(tokens.shape[1], pixel_values.shape[-2:]) :]
        elif self.kind == "timm":
            tokens = self.encoder.forward_features(pixel_values)
            if tokens.ndim == 3:
                tokens = tokens[:, getattr(self.encoder, "num_prefix_tokens", 0) :]
        else:
            tokens = self.encoder(pixel_values)
            if isinstance(tokens, (tuple, list)):
                tokens = tokens[0]
            elif isinstance(tokens, dict):
                tokens = tokens.get("last_hidden_state", next(iter(tokens.values())))
        if tokens.ndim == 4:  # feature map [B, C, H, W] -> [B, H*W, C]
            tokens = tokens.flatten(2).transpose(1, 2)
        if tokens.ndim != 3 or tokens.shape[1] == 0:
            raise ValueError(
                f"the vision encoder returned an output of shape {tuple(tokens.shape)}, which holds no patch "
                "tokens; pass a module whose forward returns a feature map [B, C, H, W] or tokens [B, N, C]."
            )
        return tokens.float()

    def _num_prefix_tokens(self, num_tokens: int, pixels: Sequence[int]) -> int:
        """CLS and register tokens = tokens beyond the patch grid of these pixels (0 for SigLIP, 1 for
        ViT/CLIP, 1+R for DINOv2). The grid comes from the pixels, not the config: DINOv2 checkpoints
        declare image_size=518 while their processor crops 224."""
        config = self.encoder.config
        patch = getattr(config, "patch_size", None)
        if isinstance(patch, int) and patch > 0:
            grid = (pixels[0] // patch) * (pixels[1] // patch)
            if num_tokens >= grid:
                return num_tokens - grid
        return 1 + getattr(config, "num_register_tokens", 0) if num_tokens > 1 else 0

    def encode_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        return self(self.preprocess(images))
