"""The backbone F: any timm model, seen through one contract, images -> (B, C, h, w)."""
from __future__ import annotations

import timm
import torch
from torch import nn

from ..config import CSRConfig
from .grid import FeatureGrid


class Backbone(nn.Module):
    """Wraps a timm model so that every family returns a feature map f of shape (B, C, h, w).

    CNNs (resnet, convnext, efficientnet, ...) are built with ``features_only`` when a
    ``feature_stage`` is asked for, else read through ``forward_features``. Transformers
    return tokens (B, L, C) from ``forward_features``; their patch tokens are reshaped into
    the (h, w) grid after dropping the prefix (class/register) tokens. The difference is
    read from the output's rank, never from the model's name.
    """

    def __init__(self, config: CSRConfig):
        super().__init__()
        kwargs = dict(pretrained=config.pretrained, in_chans=config.in_channels, num_classes=0)
        if config.feature_stage is not None:
            kwargs.update(features_only=True, out_indices=(config.feature_stage,))
        try:
            self.net = timm.create_model(config.backbone, **kwargs)
        except RuntimeError as error:  # timm: unknown model name
            raise ValueError(f"CSRConfig.backbone={config.backbone!r}: {error}") from None
        except (AssertionError, IndexError) as error:  # features_only out of range
            raise ValueError(
                f"CSRConfig.feature_stage={config.feature_stage!r} is not a stage of "
                f"{config.backbone!r} ({error or 'index out of range'})."
            ) from None
        self.features_only = config.feature_stage is not None
        patch_embed = getattr(self.net, "patch_embed", None)
        # ViTs built without dynamic_img_size only accept the size they were built for.
        self.fixed_input_size = bool(getattr(patch_embed, "strict_img_size", False)) and not bool(
            getattr(self.net, "dynamic_img_size", False)
        )
        self.num_prefix_tokens = int(getattr(self.net, "num_prefix_tokens", 0))
        self.image_size = config.image_size
        self.grid = FeatureGrid.probe(self, config.in_channels, config.image_size, config.cell_offset)

    @property
    def out_channels(self) -> int:
        return self.grid.channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) normalised images -> f (B, C, h, w)."""
        if self.features_only:
            return self.net(images)[0]
        features = self.net.forward_features(images)
        if features.ndim == 4:
            return features
        # Tokens (B, L, C): drop prefix tokens, lay the patches out on their grid.
        tokens = features[:, self.num_prefix_tokens :]
        height = images.shape[-2] // self.net.patch_embed.patch_size[0]
        width = tokens.shape[1] // height
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)
