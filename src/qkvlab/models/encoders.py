"""Non-causal families on the same blocks: sequence labeller, ViT classifier, set encoder."""

from __future__ import annotations

import torch
from torch import nn

from qkvlab.errors import ConfigError
from qkvlab.models.blocks import Backbone, init_weights
from qkvlab.models.config import EncoderConfig, SetConfig, ViTConfig


class SequenceEncoder(nn.Module):
    """Labels every token of a sequence (the paper's synthetic tasks).

    ``forward(idx, padding_mask=None)``: ``idx`` ``(B, T)`` -> logits ``(B, T, n_labels)``.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.backbone = Backbone(config)
        self.head = nn.Linear(config.d_model, config.n_labels)
        init_weights(self, config)

    def forward(self, idx: torch.Tensor, *, padding_mask: torch.Tensor | None = None, need_weights: bool = False):
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int32):
            raise ConfigError(
                f"SequenceEncoder expects token ids of shape (batch, seq) and integer dtype, got shape "
                f"{tuple(idx.shape)} and dtype {idx.dtype}."
            )
        h = self.backbone(self.embed(idx), padding_mask=padding_mask, need_weights=need_weights)
        if need_weights:
            h, infos = h
            return self.head(h), infos
        return self.head(h)


class ViT(nn.Module):
    """Vision transformer classifier (Dosovitskiy et al., 2021): patches + class token.

    ``forward(images)``: ``(B, C, H, W)`` -> logits ``(B, n_classes)``.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.patch = nn.Conv2d(config.channels, config.d_model, config.patch_size, stride=config.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.d_model))
        self.backbone = Backbone(config)
        self.head = nn.Linear(config.d_model, config.n_classes)
        init_weights(self, config)

    def forward(self, images: torch.Tensor, *, need_weights: bool = False):
        c = self.config
        if images.dim() != 4 or images.shape[1:] != (c.channels, c.image_size, c.image_size):
            raise ConfigError(
                f"ViT expects images of shape (batch, {c.channels}, {c.image_size}, {c.image_size}), "
                f"got {tuple(images.shape)}; resize the images or set channels/image_size in the config."
            )
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, N, d)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        h = self.backbone(x, need_weights=need_weights)
        if need_weights:
            h, infos = h
            return self.head(h[:, 0]), infos
        return self.head(h[:, 0])


class SetEncoder(nn.Module):
    """Permutation-equivariant scorer of set elements (odd-one-out); no positions.

    ``forward(x, padding_mask=None)``: features ``(B, N, in_features)`` -> scores ``(B, N)``.
    """

    def __init__(self, config: SetConfig):
        super().__init__()
        self.config = config
        self.inp = nn.Linear(config.in_features, config.d_model)
        self.backbone = Backbone(config)
        self.head = nn.Linear(config.d_model, 1)
        init_weights(self, config)

    def forward(self, x: torch.Tensor, *, padding_mask: torch.Tensor | None = None, need_weights: bool = False):
        if x.dim() != 3 or x.shape[-1] != self.config.in_features:
            raise ConfigError(
                f"SetEncoder expects features (batch, set size, {self.config.in_features}), got {tuple(x.shape)}."
            )
        h = self.backbone(self.inp(x), padding_mask=padding_mask, need_weights=need_weights)
        if need_weights:
            h, infos = h
            return self.head(h).squeeze(-1), infos
        return self.head(h).squeeze(-1)
