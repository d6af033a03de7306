"""The UNet noise-prediction network (Ho et al. 2020, Appendix B), holding only the network.

Encoder: a 3 -> C convolution, then one stage per channel multiplier, each with ``num_res_blocks``
residual blocks (self-attention after each block at the chosen resolutions) and a 2x downsampling
between stages. Bottleneck: residual blocks with attention between them. Decoder: the mirror image with
one more block per stage, each block taking the matching encoder activation as a skip connection, and
2x upsampling between stages. Output: GroupNorm, SiLU, a C -> 3 convolution.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that can normalise in autocast's dtype (bf16/fp16) instead of the fp32 autocast picks.

    With ``low_precision`` set (see :func:`set_low_precision_norms`), a bf16 activation (what autocast's
    convolutions hand on) stays bf16: the statistics still accumulate in fp32 inside the kernel, but
    the fp32 copy of every activation, and the casts before and after each norm, are gone (the norm's
    own weight and bias gradients are then rounded to bf16 before they reach the fp32 parameters). Off
    by default; the weights are the same either way.
    """

    low_precision = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.low_precision or x.dtype == torch.float32:
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):  # keep autocast from casting x up to fp32
            return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def group_norm(channels: int, groups: int | None = None, eps: float = 1e-6) -> GroupNorm:
    """GroupNorm with ``groups`` groups; unset, 32 where the width allows (fewer for narrow demo models)."""
    return GroupNorm(groups or math.gcd(32, channels), channels, eps=eps)


Norm = Callable[[int], nn.Module]  # channels -> a normalisation layer (the model's group_norm settings bound)


def set_low_precision_norms(model: nn.Module, enabled: bool) -> None:
    """Let every GroupNorm of ``model`` run in autocast's dtype (see :class:`GroupNorm`)."""
    for m in model.modules():
        if isinstance(m, GroupNorm):
            m.low_precision = enabled


def timestep_embedding(t: torch.Tensor, dim: int, freq_shift: int = 0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017): (B,) -> (B, dim), [sin | cos].

    Frequencies exp(-ln(max_period) i / (dim/2 - freq_shift)), i < dim/2; Ho et al.'s code uses freq_shift 1.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected time embedding, GroupNorm-SiLU-dropout-conv, plus skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, norm: Norm = group_norm):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]  # (B, out_ch, 1, 1) broadcast over H, W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, manual: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) tensors (Vaswani et al. 2017, Eq. 1)."""
    if manual:  # see spell_out_attention
        return torch.softmax((q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5), dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on CUDA and the CPU


def spell_out_attention(q: torch.Tensor) -> bool:
    """Whether plain matmuls beat scaled_dot_product_attention here.

    MPS: its fused kernel has been unreliable. CPU in bf16 on short sequences: the CPU flash kernel's
    backward is slow there and the plain matmuls trained faster; in fp32 the two were level, so fp32 and
    long sequences (memory grows with their square) keep the fused kernel (docs/performance.md).
    """
    if q.device.type == "mps":
        return True
    return q.device.type == "cpu" and q.dtype != torch.float32 and q.shape[-2] <= 1024


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, num_heads: int, norm: Norm = group_norm):
        super().__init__()
        if channels % num_heads:
            num_heads = math.gcd(channels, num_heads)
        self.num_heads = num_heads
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # The 1x1 convolutions run as matmuls over tokens (B, HW, C), so q, k and v come out with a unit
        # stride on head_dim: the layout the flash kernels (CUDA and CPU) take without a copy. On a
        # channels_last input the token view is free.
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)  # (B, HW, 3C)
        q, k, v = qkv.view(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v, manual=spell_out_attention(q))  # (B, heads, HW, head_dim)
        out = F.linear(out.transpose(1, 2).reshape(b, h * w, c), self.proj.weight.flatten(1), self.proj.bias)
        return x + out.transpose(1, 2).view(b, c, h, w)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution.

    ``padding`` "both": one pixel on every side. "after": right and bottom only, TensorFlow's 'SAME' for a
    stride-2 3x3 kernel on an even size, as in Ho et al.'s released code (diffusers' downsample_padding=0).
    """

    def __init__(self, channels: int, padding: str = "both"):
        super().__init__()
        self.pad_after = padding == "after"
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if self.pad_after else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.pad_after else x)


class Upsample(nn.Module):
    """Double H and W (nearest neighbour), then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, attn: bool, heads: int,
                 norm: Norm = group_norm):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, temb_dim, dropout, norm)
        self.attn = Attention(out_ch, heads, norm) if attn else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        x = self.res(x, temb)
        return self.attn(x) if self.attn is not None else x


def attention_resolutions(cfg: ModelConfig) -> tuple[int, ...]:
    """Resolutions that get self-attention; by default every resolution below img_size (after each downsampling)."""
    if cfg.attention_resolutions is not None:
        return tuple(cfg.attention_resolutions)
    return tuple(cfg.img_size // 2**i for i in range(1, len(cfg.channel_multipliers)))


def attention_heads(cfg: ModelConfig, channels: int) -> int:
    """Heads of an attention layer over ``channels``: channels / attention_head_dim when set, else num_heads."""
    return channels // cfg.attention_head_dim if cfg.attention_head_dim else cfg.num_heads


class UNet(nn.Module):
    """Predicts the noise (or v) in x_t given t: (B, 3, H, W), (B,) -> (B, 3, H, W)."""

    # Set by parts.build_parts (--gradient-checkpointing): each Block (residual block and its attention), each
    # Upsample and the output head keep only their inputs for backward and recompute the rest there. Same
    # outputs and gradients; a training-time switch, not part of the weights.
    gradient_checkpointing = False

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.starting_channels
        temb_dim = 4 * ch
        attn_at = set(attention_resolutions(cfg))
        norm = functools.partial(group_norm, groups=cfg.norm_groups, eps=cfg.norm_eps)

        def block(i: int, o: int, attn: bool) -> Block:
            return Block(i, o, temb_dim, cfg.dropout or 0.0, attn, attention_heads(cfg, o), norm)

        self.temb = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.stem = nn.Conv2d(3, ch, 3, padding=1)

        self.down = nn.ModuleList()
        skips = [ch]  # channels of every activation the decoder will concatenate
        cur, res = ch, cfg.img_size
        for level, mult in enumerate(cfg.channel_multipliers):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(cur, ch * mult, res in attn_at))
                cur = ch * mult
                skips.append(cur)
            if level != len(cfg.channel_multipliers) - 1:
                self.down.append(Downsample(cur, cfg.downsample_padding))
                res //= 2
                skips.append(cur)

        self.mid = nn.ModuleList(block(cur, cur, i < cfg.bottleneck_blocks - 1) for i in range(cfg.bottleneck_blocks))

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_multipliers))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(block(cur + skips.pop(), ch * mult, res in attn_at))
                cur = ch * mult
            if level != 0:
                self.up.append(Upsample(cur))
                res *= 2

        self.out = nn.Sequential(norm(cur), nn.SiLU(), nn.Conv2d(cur, 3, 3, padding=1))

        # Conditioning, created last so that the layers above draw the same initial weights with or without it.
        # Classes: a learned vector per class added to the time embedding (guided-diffusion, as in Ho & Salimans'
        # classifier-free guidance), one more for "no class" (index num_classes; label -1 asks for it).
        self.num_classes = len(cfg.class_names)
        self.class_embedding = nn.Embedding(self.num_classes + 1, temb_dim) if self.num_classes else None
        # Augmentations (Karras et al. 2022, App. F.2): a linear map without bias, so "no augmentation" (zeros, what
        # sampling passes) adds nothing; it enters before the time MLP, as in EDM's networks.py.
        self.augment_embedding = nn.Linear(cfg.augment_dim, ch, bias=False) if cfg.augment_dim else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``class_labels`` (B,) class indices, -1 or None for no class; ``augment_labels`` (B, augment_dim) or None."""
        emb = timestep_embedding(t, self.config.starting_channels, self.config.time_embedding_freq_shift)
        if self.augment_embedding is not None and augment_labels is not None:
            emb = emb + self.augment_embedding(augment_labels.to(emb.dtype))
        temb = self.temb(emb)
        if self.class_embedding is not None:
            labels = torch.full((x.shape[0],), -1, device=x.device) if class_labels is None else class_labels
            temb = temb + self.class_embedding(torch.where(labels < 0, self.num_classes, labels))
        if self.config.time_embedding_silu:  # Ho et al.: each block projects nonlinearity(temb); applied once here
            temb = F.silu(temb)
        temb = temb.to(x.dtype)
        h = self.stem(x)
        hs = [h]
        for layer in self.down:
            h = self._block(layer, h, temb) if isinstance(layer, Block) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = self._block(layer, h, temb)
        for layer in self.up:
            if isinstance(layer, Block):
                h = self._block(layer, h, temb, hs.pop())
            else:  # Upsample: checkpointed, it keeps its half-size input instead of the interpolated one
                h = self._block(layer, h)
        return self._block(self.out, h)

    def _block(self, layer: nn.Module, h: torch.Tensor, temb: torch.Tensor | None = None,
               skip: torch.Tensor | None = None) -> torch.Tensor:
        """``layer`` on h (concatenated with the encoder's ``skip``), checkpointed when training with it on."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Non-reentrant (PyTorch's recommendation); the dropout RNG is replayed, so gradients are unchanged.
            return checkpoint(_run_block, layer, h, temb, skip, use_reentrant=False)
        return _run_block(layer, h, temb, skip)


def _run_block(layer: nn.Module, h: torch.Tensor, temb: torch.Tensor | None, skip: torch.Tensor | None) -> torch.Tensor:
    """A decoder block takes its encoder activation concatenated on the channels (inside the checkpoint: not kept)."""
    if skip is not None:
        h = torch.cat([h, skip], dim=1)
    return layer(h) if temb is None else layer(h, temb)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
