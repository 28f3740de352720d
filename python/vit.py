"""A small Vision Transformer and the LeJEPA projector, in plain PyTorch.

The encoder is the usual pre-norm ViT: a strided convolution cuts the image
into patches, a learned CLS token and learned position embeddings are added,
then ``depth`` blocks of (LayerNorm -> multi-head attention) and
(LayerNorm -> MLP), each with a residual connection. The representation used
downstream is the final-normed CLS token.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # The fused attention kernel picks the fastest path for the device (flash on GPU).
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """ViT encoder mapping images ``[N, C, H, W]`` to CLS embeddings ``[N, dim]``."""

    def __init__(self, image_size: int = 16, patch_size: int = 4, in_chans: int = 1,
                 dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch size {patch_size}")
        self.dim = dim
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self._init_weights()

    def _init_weights(self):
        # Xavier-uniform linear layers (as MAE does) rather than the tiny std=0.02
        # normal: with the latter the attention logits start near zero, attention is
        # uniform, and the CLS token is little more than the average patch embedding,
        # which knows nothing about *where* strokes are; short runs learned
        # noticeably slower from there.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [N, patches, dim]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, 0])


class Projector(nn.Module):
    """MLP head whose outputs the LeJEPA loss sees; the encoder's CLS token stays the representation.

    LayerNorm rather than BatchNorm keeps every sample's projection independent
    of the others in its batch, so the result does not depend on how a global
    batch is split across processes.
    """

    def __init__(self, dim: int, hidden: int = 512, out_dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.GELU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x):
        return self.net(x)
