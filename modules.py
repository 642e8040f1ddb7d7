"""Networks only: the U-Net that predicts the noise eps, its blocks, the judge classifier of evaluate.py, and
the EMA of its weights; the PatchGAN discriminator that train_vae.py may train beside diffusers' AutoencoderKL.

`UNet` and `UNet_conditional` keep the parameter names and shapes of the reference repository
(dome272/Diffusion-Models-pytorch), so its released 64x64 checkpoints load with `strict=True` and give the
same outputs. Unlike the reference they run at any H and W divisible by 8, read their device from the input,
use fused attention and broadcast the embeddings. `UNet_conditional(conditioning=...)` offers three more
ways to condition on the class label (concat, xattn, adanorm) built from the same blocks; `add` is the
reference's. `UNet_text` is the same network with cross-attention on text tokens, for latent text-to-image.
`DiT` and `DiT_text` are the transformer backbone beside them (Diffusion Transformers, Peebles & Xie 2023):
patches as tokens, adaLN-Zero blocks, the same `attention` helper and the same forward signatures.
Nothing here knows about betas or timesteps beyond encoding `t`.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

NULL_LABEL = -1  # a row with this label is unconditional: its label embedding is zero


def timestep_encoding(t, dim):
    """Sinusoidal encoding of the timesteps t, shape (B,), as (B, dim) float32 on t's device."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=t.device).float() / dim))  # (dim/2,)
    angles = t.float()[:, None] * inv_freq[None, :]  # (B, 1) * (1, dim/2) -> (B, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def zero_modulation(emb_dim, out_features):
    """SiLU, then a zero-initialised Linear: an embedding (B, emb_dim) -> modulation parameters (B, out_features).

    Zero at initialisation (DiT's adaLN-Zero), so a block that it modulates starts as the block without it.
    """
    linear = nn.Linear(emb_dim, out_features)
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.SiLU(), linear)


class DoubleConv(nn.Module):
    """Two 3x3 convolutions, each followed by GroupNorm(1); GELU between them; optional residual.

    With `norm_emb_dim`, an embedding (B, norm_emb_dim) predicts a per-channel scale and shift for both
    norms, norm(h) * (1 + scale) + shift (AdaGN: ADM's use_scale_shift_norm). The prediction is
    zero-initialised (as DiT's adaLN-Zero), so the block starts as the one without it.
    `dropout` zeroes activations between the two convolutions in training, where ADM's ResBlock has its dropout
    (Ho et al. 2020 used 0.1 on CIFAR-10); it has no weights, so a checkpoint loads with any value.
    """

    def __init__(self, in_channels, out_channels, mid_channels=None, residual=False, norm_emb_dim=None, dropout=0.0):
        super().__init__()
        mid_channels = mid_channels or out_channels
        self.residual = residual
        self.dropout = dropout
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, mid_channels),
            nn.GELU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, out_channels),
        )
        if norm_emb_dim is not None:
            self.split = [mid_channels, mid_channels, out_channels, out_channels]  # scale1, shift1, scale2, shift2
            self.modulation = zero_modulation(norm_emb_dim, sum(self.split))

    def convolve(self, x, norm_emb):
        conv1, norm1, act, conv2, norm2 = self.double_conv
        if norm_emb is None:
            h = act(norm1(conv1(x)))
            return norm2(conv2(F.dropout(h, self.dropout, self.training)))
        scale1, shift1, scale2, shift2 = (
            m[:, :, None, None] for m in self.modulation(norm_emb).split(self.split, dim=1)  # (B, C) -> (B, C, 1, 1)
        )
        h = act(norm1(conv1(x)) * (1 + scale1) + shift1)
        return norm2(conv2(F.dropout(h, self.dropout, self.training))) * (1 + scale2) + shift2

    def forward(self, x, norm_emb=None):
        if self.residual:
            return F.gelu(x + self.convolve(x, norm_emb))
        return self.convolve(x, norm_emb)


class Down(nn.Module):
    """Halve H and W, convolve, then add the projected embedding to every pixel."""

    def __init__(self, in_channels, out_channels, emb_dim=256, norm_emb_dim=None, dropout=0.0):
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            nn.MaxPool2d(2),
            DoubleConv(in_channels, in_channels, residual=True, norm_emb_dim=norm_emb_dim, dropout=dropout),
            DoubleConv(in_channels, out_channels, norm_emb_dim=norm_emb_dim, dropout=dropout),
        )
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))

    def forward(self, x, emb, norm_emb=None):
        pool, conv1, conv2 = self.maxpool_conv
        x = conv2(conv1(pool(x), norm_emb), norm_emb)
        return x + self.emb_layer(emb)[:, :, None, None]  # (B, C) -> (B, C, 1, 1), broadcast over H, W


class Up(nn.Module):
    """Double H and W, concatenate the skip connection, convolve, then add the projected embedding."""

    def __init__(self, in_channels, out_channels, emb_dim=256, norm_emb_dim=None, dropout=0.0):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = nn.Sequential(
            DoubleConv(in_channels, in_channels, residual=True, norm_emb_dim=norm_emb_dim, dropout=dropout),
            DoubleConv(in_channels, out_channels, in_channels // 2, norm_emb_dim=norm_emb_dim, dropout=dropout),
        )
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))

    def forward(self, x, skip, emb, norm_emb=None):
        x = torch.cat([skip, self.up(x)], dim=1)
        conv1, conv2 = self.conv
        x = conv2(conv1(x, norm_emb), norm_emb)
        return x + self.emb_layer(emb)[:, :, None, None]


def to_tokens(x):
    """(B, C, H, W) -> (B, H*W, C)"""
    return x.flatten(2).transpose(1, 2)


def from_tokens(tokens, like):
    """(B, H*W, C) -> (B, C, H, W), with H and W taken from the tensor `like`."""
    return tokens.transpose(1, 2).reshape(like.shape)


def attention(mha, x, context=None):
    """What the nn.MultiheadAttention `mha` computes for queries x (B, N, C) and keys/values `context`
    (B, L, kdim; None means x itself), on the fused kernel F.scaled_dot_product_attention, which never
    builds the N x L weight matrix. The module only holds the parameters: its own inference fast path
    materialises that matrix on the CPU (2.8 GB and 4x slower at 64x64).
    """
    batch, n, channels = x.shape
    heads = mha.num_heads
    context = x if context is None else context
    if mha.in_proj_weight is not None:  # one packed (3C, C) projection when kdim == vdim == C
        weight_q, weight_k, weight_v = mha.in_proj_weight.chunk(3)
    else:
        weight_q, weight_k, weight_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    bias_q, bias_k, bias_v = mha.in_proj_bias.chunk(3)
    q = F.linear(x, weight_q, bias_q)
    k = F.linear(context, weight_k, bias_k)
    v = F.linear(context, weight_v, bias_v)
    q, k, v = (y.unflatten(-1, (heads, -1)).transpose(1, 2) for y in (q, k, v))  # (B, L, C) -> (B, heads, L, C/heads)
    out = F.scaled_dot_product_attention(q, k, v)
    out = out.transpose(1, 2).reshape(batch, n, channels)  # (B, heads, N, C/heads) -> (B, N, C)
    return mha.out_proj(out)


class SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention over all pixels, then a pre-norm feed-forward; both residual.

    `context` is accepted and ignored, so every attention block of the U-Net has the same call signature.
    """

    def __init__(self, channels, heads=4):
        super().__init__()
        self.mha = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.ln = nn.LayerNorm(channels)
        self.ff_self = nn.Sequential(
            nn.LayerNorm(channels),
            nn.Linear(channels, channels),
            nn.GELU(),
            nn.Linear(channels, channels),
        )

    def forward(self, x, context=None):
        tokens = to_tokens(x)
        h = self.ln(tokens)
        a = attention(self.mha, h) + tokens
        out = self.ff_self(a) + a
        return from_tokens(out, x)


class CrossAttention(nn.Module):
    """Multi-head attention from image tokens (B, N, query_dim) to text tokens (B, L, context_dim)."""

    def __init__(self, query_dim, context_dim, heads=4):
        super().__init__()
        self.mha = nn.MultiheadAttention(query_dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)

    def forward(self, x, context):
        return attention(self.mha, x, context)


class TransformerBlock(nn.Module):
    """Stable Diffusion's attention block: self-attention, cross-attention on the text, feed-forward.

    Each sub-layer is pre-norm with a residual. Input and output are feature maps (B, C, H, W);
    `context` holds the text encoder's token states (B, L, context_dim).
    """

    def __init__(self, channels, context_dim, heads=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.self_attn = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(channels)
        self.cross_attn = CrossAttention(channels, context_dim, heads)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def forward(self, x, context):
        tokens = to_tokens(x)
        h = self.norm1(tokens)
        tokens = tokens + attention(self.self_attn, h)
        tokens = tokens + self.cross_attn(self.norm2(tokens), context)
        tokens = tokens + self.ff(self.norm3(tokens))
        return from_tokens(tokens, x)


class NoAttention(nn.Module):
    """The identity, in the place of an attention block that a U-Net leaves out (see UNet's attn_factors)."""

    def forward(self, x, context=None):
        return x


def check_image_size(x):
    """The U-Net halves H and W three times, so both must be divisible by 8."""
    height, width = x.shape[-2:]
    if height % 8 or width % 8:
        raise ValueError(
            f"image size {height}x{width} is not divisible by 8: the U-Net halves it 3 times; use e.g. 16, 32 or 64"
        )


class GradientCheckpointing:
    """`enable_gradient_checkpointing()` and `block` of the U-Net and DiT: the blocks that a network passes through
    `self.block(module, *args)` are recomputed in the backward pass (torch.utils.checkpoint, non-reentrant) instead
    of storing their activations, while gradients are recorded and the switch is on (off by default)."""

    gradient_checkpointing = False

    def enable_gradient_checkpointing(self, enabled=True):
        """Recompute each checkpointed block in the backward pass instead of storing its activations."""
        self.gradient_checkpointing = enabled
        return self

    def block(self, module, *args):
        """module(*args), checkpointed when gradient checkpointing is on and gradients are being recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled() and not isinstance(module, NoAttention):
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)


class UNet(GradientCheckpointing, nn.Module):
    """The reference U-Net: 3 downsamplings, each followed by attention; widths scale with base_channels.

    `attention(channels)` builds the block that follows each Down and Up; the default is the reference's
    SelfAttention. `attn_factors` lists the downsampling factors that keep their attention blocks (1: the one
    at full resolution, after the last Up; 2: the two at 1/2; 4: the two at 1/4; 8: the one at 1/8); the others
    become NoAttention, with no weights. The reference has all four. Attention over the H*W pixels of a full-size
    map is the costliest block at small widths, and the one that small images need least.
    `norm_emb_dim` gives every DoubleConv an AdaGN modulation, `dropout` its dropout rate in training (see DoubleConv).
    `enable_gradient_checkpointing()` keeps only the inputs of each Down, Up and attention block in training and
    recomputes the block in the backward pass (torch.utils.checkpoint), trading compute for activation memory.
    forward(x, t): x (B, c_in, H, W), t (B,) integer timesteps -> eps (B, c_out, H, W).
    """

    ATTN_FACTORS = (1, 2, 4, 8)  # the downsampling factors of the attention blocks: the reference has all four

    def __init__(self, c_in=3, c_out=3, time_dim=256, base_channels=64, attention=SelfAttention, norm_emb_dim=None,
                 attn_factors=ATTN_FACTORS, dropout=0.0):
        super().__init__()
        unknown = set(attn_factors) - set(self.ATTN_FACTORS)
        if unknown:
            raise ValueError(f"attn_factors {sorted(unknown)} are not downsampling factors of the U-Net: use some "
                             f"of {', '.join(map(str, self.ATTN_FACTORS))}")
        self.time_dim = time_dim
        c, n, p = base_channels, norm_emb_dim, dropout

        def attention_at(factor, channels):  # a block without parameters where the factor has no attention
            return attention(channels) if factor in attn_factors else NoAttention()

        self.inc = DoubleConv(c_in, c, norm_emb_dim=n, dropout=p)
        self.down1 = Down(c, 2 * c, time_dim, n, p)
        self.sa1 = attention_at(2, 2 * c)
        self.down2 = Down(2 * c, 4 * c, time_dim, n, p)
        self.sa2 = attention_at(4, 4 * c)
        self.down3 = Down(4 * c, 4 * c, time_dim, n, p)
        self.sa3 = attention_at(8, 4 * c)
        self.bot1 = DoubleConv(4 * c, 8 * c, norm_emb_dim=n, dropout=p)
        self.bot2 = DoubleConv(8 * c, 8 * c, norm_emb_dim=n, dropout=p)
        self.bot3 = DoubleConv(8 * c, 4 * c, norm_emb_dim=n, dropout=p)
        self.up1 = Up(8 * c, 2 * c, time_dim, n, p)
        self.sa4 = attention_at(4, 2 * c)
        self.up2 = Up(4 * c, c, time_dim, n, p)
        self.sa5 = attention_at(2, c)
        self.up3 = Up(2 * c, c, time_dim, n, p)
        self.sa6 = attention_at(1, c)
        self.outc = nn.Conv2d(c, c_out, kernel_size=1)

    def time_embedding(self, t):
        return timestep_encoding(t, self.time_dim)

    def denoise(self, x, emb, context=None, norm_emb=None):
        """The U-Net proper, given the embedding emb (B, time_dim) that is added after each Down and Up;
        for cross-attention the context (B, L, context_dim); for AdaGN the norm_emb (B, norm_emb_dim)."""
        check_image_size(x)
        e = norm_emb
        block = self.block
        x1 = self.inc(x, e)  # full resolution
        x2 = block(self.sa1, block(self.down1, x1, emb, e), context)  # 1/2
        x3 = block(self.sa2, block(self.down2, x2, emb, e), context)  # 1/4
        x4 = block(self.sa3, block(self.down3, x3, emb, e), context)  # 1/8
        x4 = self.bot3(self.bot2(self.bot1(x4, e), e), e)
        y = block(self.sa4, block(self.up1, x4, x3, emb, e), context)  # 1/4
        y = block(self.sa5, block(self.up2, y, x2, emb, e), context)  # 1/2
        y = block(self.sa6, block(self.up3, y, x1, emb, e), context)  # full resolution
        return self.outc(y)

    def forward(self, x, t):
        return self.denoise(x, self.time_embedding(t))


def all_null_if_none(y, x):
    """The labels y (B,), or for y=None a NULL_LABEL for every row of the batch x: no row has a label."""
    if y is None:
        return torch.full((x.shape[0],), NULL_LABEL, dtype=torch.long, device=x.device)
    return y


def label_rows(y, num_classes):
    """Rows of an embedding with a learned null label: class ids stay, NULL_LABEL becomes the last row, num_classes."""
    return torch.where(y == NULL_LABEL, num_classes, y)


class UNet_conditional(UNet):
    """The U-Net conditioned on a class label, in one of four ways (`conditioning`):

    - "add" (the reference's, default): a label embedding is added to the time embedding.
    - "concat": a label embedding of `concat_channels` numbers, broadcast to an H x W map, is concatenated to
      the input channels (as image-to-image models concatenate their source image).
    - "xattn": the label becomes `context_tokens` learned tokens, read by the cross-attention of a
      TransformerBlock after each Down and Up (Stable Diffusion's way of reading text).
    - "adanorm": time + label embedding predict a scale and shift for every GroupNorm (ADM's AdaGN, DiT's
      adaLN); zero-initialised, so the untrained network ignores the label.

    forward(x, t, y): y (B,) holds class ids in 0..num_classes-1, or NULL_LABEL (-1) for rows without a
    label; y=None means no row has a label. An unlabelled row gets the null condition (a zero embedding or
    map; a learned null token sequence for "xattn"), so one batch can hold both halves of guidance.

    Image conditioning (SR3, Saharia et al. 2021; Palette, Saharia et al. 2022): with `cond_channels` > 0 the
    network also reads an image of that many channels, forward(x, t, y, cond) with cond (B, cond_channels, H, W),
    concatenated to x_t as more input channels, by the same `concat_maps` as the class map of "concat": the
    low-resolution image upsampled back to H x W, or the masked image and its mask. cond=None is the null
    condition, a zero image (the rows whose condition was dropped). num_classes=None with cond_channels is a
    network conditioned on the image alone.
    """

    CONDITIONINGS = ("add", "concat", "xattn", "adanorm")

    def __init__(self, c_in=3, c_out=3, time_dim=256, num_classes=None, base_channels=64, conditioning="add",
                 concat_channels=8, context_tokens=4, heads=4, attn_factors=UNet.ATTN_FACTORS, cond_channels=0,
                 dropout=0.0):
        if conditioning not in self.CONDITIONINGS:
            raise ValueError(f"conditioning {conditioning!r} is unknown: use one of {', '.join(self.CONDITIONINGS)}")
        if conditioning != "add" and num_classes is None:
            raise ValueError(f"conditioning {conditioning!r} needs num_classes")
        extra_channels = cond_channels + (concat_channels if conditioning == "concat" else 0)
        attention = SelfAttention
        if conditioning == "xattn":
            attention = functools.partial(TransformerBlock, context_dim=time_dim, heads=heads)
        norm_emb_dim = time_dim if conditioning == "adanorm" else None
        super().__init__(c_in + extra_channels, c_out, time_dim, base_channels, attention, norm_emb_dim, attn_factors,
                         dropout)
        self.num_classes = num_classes
        self.conditioning = conditioning
        self.cond_channels = cond_channels
        if conditioning in ("add", "adanorm") and num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_dim)
        elif conditioning == "concat":
            self.label_map = nn.Embedding(num_classes, concat_channels)
        elif conditioning == "xattn":
            self.context_tokens = context_tokens
            self.label_tokens = nn.Embedding(num_classes + 1, context_tokens * time_dim)  # last row: the null label

    def null_masked(self, embedding, y):
        """embedding(y) (B, D), with zero rows where y is NULL_LABEL."""
        has_label = (y != NULL_LABEL).unsqueeze(-1)  # (B, 1)
        return embedding(y.clamp(min=0)) * has_label

    def label_embedding(self, y):
        return self.null_masked(self.label_emb, y)

    def concat_maps(self, x, y, cond):
        """x_t (B, C, H, W) with the maps this network reads as more input channels, in this order: the condition
        image (B, cond_channels, H, W; zeros for cond=None), then the class map of "concat" (B, K, H, W)."""
        maps = []
        if self.cond_channels:
            if cond is None:
                cond = x.new_zeros(x.shape[0], self.cond_channels, *x.shape[2:])
            if cond.shape[0] != x.shape[0] or cond.shape[1:] != (self.cond_channels, *x.shape[2:]):
                raise ValueError(f"condition image of shape {tuple(cond.shape)} for x_t of shape {tuple(x.shape)}: "
                                 f"the network takes ({x.shape[0]}, {self.cond_channels}, {x.shape[2]}, "
                                 f"{x.shape[3]})")
            maps.append(cond.to(x.dtype))
        if self.conditioning == "concat":
            label_map = self.null_masked(self.label_map, y)[:, :, None, None]  # (B, K) -> (B, K, 1, 1)
            maps.append(label_map.expand(-1, -1, *x.shape[2:]).to(x.dtype))  # (B, K, 1, 1) -> (B, K, H, W)
        return torch.cat([x, *maps], dim=1) if maps else x  # (B, C + cond_channels [+ K], H, W)

    def forward(self, x, t, y=None, cond=None):
        emb = self.time_embedding(t)
        if self.num_classes is None:
            return self.denoise(self.concat_maps(x, None, cond), emb)
        y = all_null_if_none(y, x)
        x = self.concat_maps(x, y, cond)
        if self.conditioning == "add":
            return self.denoise(x, emb + self.label_embedding(y))
        if self.conditioning == "adanorm":
            return self.denoise(x, emb, norm_emb=emb + self.label_embedding(y))
        if self.conditioning == "concat":
            return self.denoise(x, emb)
        rows = label_rows(y, self.num_classes)  # xattn: the null label has its own tokens
        context = self.label_tokens(rows).unflatten(1, (self.context_tokens, -1))  # (B, L*D) -> (B, L, D)
        return self.denoise(x, emb, context)


class TextForward:
    """The forward of a text-conditioned network (UNet_text, DiT_text), given its `time_embedding`, `denoise` and,
    for conditioning "add", `text_proj`: the pooled text embedding is added to the time embedding, or the token
    states go to the cross-attentions."""

    def forward(self, x, t, context):
        emb = self.time_embedding(t)
        if self.conditioning == "add":
            return self.denoise(x, emb + self.text_proj(context))
        return self.denoise(x, emb, context)


class UNet_text(TextForward, UNet):
    """The U-Net conditioned on text, for latent text-to-image (a small Stable Diffusion).

    conditioning="cross_attention": every attention block is a TransformerBlock that attends to the
    text encoder's token states; forward(x, t, context) takes context (B, L, context_dim).
    conditioning="add": the pooled text embedding (B, context_dim) is projected and added to the time
    embedding, like a class label; forward(x, t, context) takes that pooled embedding.
    """

    CONDITIONINGS = ("cross_attention", "add")

    def __init__(
        self, c_in=4, c_out=4, time_dim=256, base_channels=64, context_dim=768, heads=4, conditioning="cross_attention",
        attn_factors=UNet.ATTN_FACTORS, dropout=0.0,
    ):
        if conditioning not in self.CONDITIONINGS:
            raise ValueError(f"conditioning {conditioning!r} is unknown: use one of {', '.join(self.CONDITIONINGS)}")
        if conditioning == "cross_attention":
            attention = functools.partial(TransformerBlock, context_dim=context_dim, heads=heads)
        else:
            attention = functools.partial(SelfAttention, heads=heads)
        super().__init__(c_in, c_out, time_dim, base_channels, attention=attention, attn_factors=attn_factors,
                         dropout=dropout)
        self.conditioning = conditioning
        if conditioning == "add":
            self.text_proj = nn.Linear(context_dim, time_dim)


# ----------------------------------------------------------------------------- the transformer backbone: DiT
PATCH_SIZES = (2, 4)
# name: (depth, width, heads). dit-s and dit-b are the paper's S and B (Peebles & Xie 2023, Table 1); the smaller
# ones are for the CPU: dit-t with patch size 2 matches the FLOPs of the base_channels-32 U-Net at 16 px, dit-xs
# its parameters.
DIT_SIZES = {
    "dit-n": (4, 64, 2),
    "dit-t": (8, 128, 4),
    "dit-xs": (8, 192, 3),
    "dit-s": (12, 384, 6),
    "dit-b": (12, 768, 12),
}


def check_patch_size(x, patch_size):
    """DiT cuts the image into patch_size x patch_size patches, so H and W must be multiples of it."""
    height, width = x.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {patch_size}: DiT with "
                         f"patch_size {patch_size} takes multiples of {patch_size}, e.g. 16, 32 or 64")


def patchify(x, patch_size):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C): the p x p patches in row-major order, each flattened as (p, p, C)."""
    check_patch_size(x, patch_size)
    batch, channels, height, width = x.shape
    p = patch_size
    x = x.view(batch, channels, height // p, p, width // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, C, H/p, p, W/p, p) -> (B, H/p, W/p, p, p, C)
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


def unpatchify(tokens, patch_size, height, width):
    """(B, H/p * W/p, p*p*C) -> (B, C, H, W): the inverse of `patchify`, for an image of height x width."""
    batch, _, features = tokens.shape
    p = patch_size
    x = tokens.view(batch, height // p, width // p, p, p, features // (p * p))
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, H/p, W/p, p, p, C) -> (B, C, H/p, p, W/p, p)
    return x.reshape(batch, features // (p * p), height, width)


def position_embedding_2d(rows, cols, dim, device=None):
    """Fixed 2-D sin-cos position embedding of a rows x cols grid of tokens in row-major order, (rows*cols, dim).

    As DiT (from MAE): the first dim/2 numbers encode the token's row, the last dim/2 its column, each with the
    sinusoidal encoding of the timesteps.
    """
    row = torch.arange(rows, device=device).repeat_interleave(cols)  # (rows*cols,): 0, 0, ..., 1, 1, ...
    col = torch.arange(cols, device=device).repeat(rows)  # (rows*cols,): 0, 1, ..., 0, 1, ...
    return torch.cat([timestep_encoding(row, dim // 2), timestep_encoding(col, dim // 2)], dim=1)


def modulate(h, shift, scale):
    """adaLN: a normalised h (B, N, D) scaled and shifted per row by (B, 1, D) parameters, h * (1 + scale) + shift."""
    return h * (1 + scale) + shift


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero (Peebles & Xie 2023, Fig. 3): self-attention and an MLP, each pre-norm and residual,
    with shift, scale and gate of both predicted from the conditioning vector (B, cond_dim).

    The prediction is zero-initialised, so every gate is 0 and the block starts as the identity. With
    `context_dim`, a cross-attention on context tokens (B, L, context_dim) sits between the two (as PixArt-alpha
    reads text); its output projection starts at zero too, so the block still starts as the identity.
    """

    def __init__(self, dim, heads, cond_dim, context_dim=None, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_attn = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross_attn = CrossAttention(dim, context_dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * dim, dim))
        self.modulation = zero_modulation(cond_dim, 6 * dim)

    def forward(self, tokens, cond, context=None):
        """tokens (B, N, D), cond (B, cond_dim) -> (B, N, D)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)  # 6 x (B, 1, D)
        tokens = tokens + gate1 * attention(self.attn, modulate(self.norm1(tokens), shift1, scale1))
        if self.cross_attn is not None:
            tokens = tokens + self.cross_attn(self.norm_cross(tokens), context)
        return tokens + gate2 * self.mlp(modulate(self.norm2(tokens), shift2, scale2))


class DiT(GradientCheckpointing, nn.Module):
    """Diffusion Transformer (Peebles & Xie 2023): eps from the patches of x_t, conditioned by adaLN-Zero.

    The image is cut into patch_size x patch_size patches, each a token (a Linear of its pixels, as DiT's strided
    convolution) plus a fixed 2-D sin-cos position embedding; `depth` DiTBlocks of width `dim`; a final adaLN
    layer and a Linear to each patch's eps; the patches are put back as an image. The conditioning vector is the
    time embedding (the sinusoidal encoding through an MLP) plus the class embedding.

    forward(x, t, y): y (B,) holds class ids in 0..num_classes-1, or NULL_LABEL (-1) for rows without a label,
    which get the learned null class (the embedding's last row); y=None means no row has a label, so one batch
    holds both halves of guidance. num_classes=None is the unconditional network, forward(x, t).
    Sizes: any H, W that are multiples of patch_size (2 or 4); the number of tokens is H*W / patch_size^2.
    c_in = c_out: the image's channels (3, or 1 for grey data) or the latents'. `enable_gradient_checkpointing()`
    recomputes each DiTBlock in the backward pass (see GradientCheckpointing).
    """

    def __init__(self, c_in=3, c_out=3, num_classes=None, patch_size=2, depth=12, dim=384, heads=6, time_dim=256,
                 context_dim=None):
        super().__init__()
        if patch_size not in PATCH_SIZES:
            raise ValueError(f"patch_size {patch_size} is not allowed: use {' or '.join(map(str, PATCH_SIZES))}")
        if dim % heads or dim % 4:
            raise ValueError(f"dim {dim} must be divisible by 4 (the 2-D position embedding) and by heads {heads}")
        self.patch_size = patch_size
        self.time_dim = time_dim
        self.num_classes = num_classes
        self.patch_embed = nn.Linear(patch_size * patch_size * c_in, dim)
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        if num_classes is not None:
            self.class_emb = nn.Embedding(num_classes + 1, dim)  # the last row: the learned null class
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, dim, context_dim) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.modulation_out = zero_modulation(dim, 2 * dim)
        self.out = nn.Linear(dim, patch_size * patch_size * c_out)
        self.initialize()

    def initialize(self):
        """DiT's initialisation: Xavier-uniform Linears with zero biases, N(0, 0.02) embeddings and time MLP, then
        zero for every adaLN modulation, the cross-attentions' output and the output layer (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_mlp[2].weight, std=0.02)
        if self.num_classes is not None:
            nn.init.normal_(self.class_emb.weight, std=0.02)
        zeroed = [self.modulation_out[1], self.out]
        for block in self.blocks:
            zeroed.append(block.modulation[1])
            if block.cross_attn is not None:
                zeroed.append(block.cross_attn.mha.out_proj)
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def time_embedding(self, t):
        return self.time_mlp(timestep_encoding(t, self.time_dim))  # (B,) -> (B, time_dim) -> (B, D)

    def denoise(self, x, cond, context=None):
        """The transformer proper: x (B, c_in, H, W), the conditioning vector cond (B, D), for cross-attention the
        context (B, L, context_dim) -> eps (B, c_out, H, W)."""
        p = self.patch_size
        height, width = x.shape[-2:]
        tokens = self.patch_embed(patchify(x, p))  # (B, C, H, W) -> (B, N, p*p*C) -> (B, N, D)
        position = position_embedding_2d(height // p, width // p, tokens.shape[-1], x.device)  # (N, D)
        tokens = tokens + position.to(tokens.dtype)
        for block in self.blocks:
            tokens = self.block(block, tokens, cond, context)
        shift, scale = self.modulation_out(cond)[:, None].chunk(2, dim=-1)  # (B, 2D) -> 2 x (B, 1, D)
        tokens = self.out(modulate(self.norm_out(tokens), shift, scale))  # (B, N, D) -> (B, N, p*p*c_out)
        return unpatchify(tokens, p, height, width)

    def forward(self, x, t, y=None):
        cond = self.time_embedding(t)
        if self.num_classes is None:
            return self.denoise(x, cond)
        y = all_null_if_none(y, x)
        return self.denoise(x, cond + self.class_emb(label_rows(y, self.num_classes)))


class DiT_text(TextForward, DiT):
    """DiT conditioned on text, for latent text-to-image, as UNet_text.

    conditioning="cross_attention": every block cross-attends to the text encoder's token states; forward(x, t,
    context) takes context (B, L, context_dim). conditioning="add": the pooled text embedding (B, context_dim) is
    projected and added to the time embedding in the conditioning vector, like a class label.
    """

    CONDITIONINGS = UNet_text.CONDITIONINGS

    def __init__(self, c_in=4, c_out=4, patch_size=2, depth=12, dim=384, heads=6, time_dim=256, context_dim=768,
                 conditioning="cross_attention"):
        if conditioning not in self.CONDITIONINGS:
            raise ValueError(f"conditioning {conditioning!r} is unknown: use one of {', '.join(self.CONDITIONINGS)}")
        tokens_dim = context_dim if conditioning == "cross_attention" else None
        super().__init__(c_in, c_out, None, patch_size, depth, dim, heads, time_dim, tokens_dim)
        self.conditioning = conditioning
        if conditioning == "add":
            self.text_proj = nn.Linear(context_dim, dim)


def build_network(arch):
    """The one network builder: the network that an architecture dict describes, from a Config (config.network_arch)
    or from a checkpoint's weights (checkpoints.infer_network).

    arch: backbone ("unet" or "dit"), c_in, c_out, num_classes (None: no label), conditioning; with context_dim a
    text-conditioned network (UNet_text, DiT_text); a DiT's patch_size, depth, dim and heads; a U-Net's
    base_channels, attn_factors, dropout and cond_channels (an image condition: UNet_conditional), with concat_channels
    and context_tokens where they are not the defaults; time_dim (default 256). gradient_checkpointing and
    channels_last, when true, switch those on.
    """
    time_dim = arch.get("time_dim", 256)
    c_in, c_out, conditioning = arch["c_in"], arch["c_out"], arch.get("conditioning") or "add"
    text = arch.get("context_dim") is not None
    if arch.get("backbone") == "dit":
        size = (arch["patch_size"], arch["depth"], arch["dim"], arch["heads"], time_dim)
        if text:
            net = DiT_text(c_in, c_out, *size, context_dim=arch["context_dim"], conditioning=conditioning)
        else:
            net = DiT(c_in, c_out, arch["num_classes"], *size)
    else:
        unet = {"base_channels": arch["base_channels"], "attn_factors": arch["attn_factors"],
                "dropout": arch.get("dropout", 0.0)}
        options = {key: arch[key] for key in ("concat_channels", "context_tokens") if key in arch}
        if text:
            net = UNet_text(c_in, c_out, time_dim, context_dim=arch["context_dim"], conditioning=conditioning, **unet)
        elif arch["num_classes"] is None and not arch.get("cond_channels"):
            net = UNet(c_in, c_out, time_dim, **unet)
        else:
            net = UNet_conditional(c_in, c_out, time_dim, arch["num_classes"], conditioning=conditioning,
                                   cond_channels=arch.get("cond_channels", 0), **options, **unet)
    if arch.get("gradient_checkpointing"):
        net.enable_gradient_checkpointing()
    if arch.get("channels_last"):
        net = net.to(memory_format=torch.channels_last)
    return net


class JudgeNet(nn.Module):
    """The judge of evaluate.py, a small CNN classifier: images (B, C, S, S) in [-1, 1] -> logits (B, K); `features` is
    its last hidden layer. C = `channels`: 3 (RGB) or 1 (grey data)."""

    def __init__(self, num_classes, width=32, channels=3):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.body = nn.Sequential(*block(channels, width), nn.MaxPool2d(2), *block(width, 2 * width), nn.MaxPool2d(2),
                                  *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())  # (B, C, S, S) -> (B, 4 * width)
        self.head = nn.Linear(4 * width, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix, Isola et al. 2017), the discriminator of LDM's autoencoders: one real-or-fake logit per
    overlapping patch. `layers` stride-2 convolutions, then two stride-1 ones: (B, 3, S, S) -> (B, 1, s, s) with
    s = S / 2^layers - 2 (32 px, 2 layers: 6 x 6 patches of 22 px each)."""

    def __init__(self, channels=64, layers=3):
        super().__init__()
        blocks = [nn.Conv2d(3, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.body = nn.Sequential(*blocks)

    def forward(self, x):
        return self.body(x)


class Autoencoder(nn.Module):
    """diffusers' AutoencoderKL as train_vae.py trains it, with an optional PatchDiscriminator.

    forward(x) runs every network of one training step in one call, so that DDP sees all the parameters used:
    returns the reconstruction of a posterior sample, the posterior (a DiagonalGaussianDistribution), and, with a
    discriminator, its logits {"real": D(x), "fake": D(x_rec) for D's loss (x_rec detached), "generator": D(x_rec)
    for the autoencoder's loss, through D's weights detached}, so each loss reaches only its own network.
    """

    def __init__(self, vae, discriminator=None):
        super().__init__()
        self.vae = vae
        self.discriminator = discriminator

    def forward(self, x):
        posterior = self.vae.encode(x).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        if self.discriminator is None:
            return reconstruction, posterior, None
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        logits = {"real": self.discriminator(x.detach()), "fake": self.discriminator(reconstruction.detach()),
                  "generator": torch.func.functional_call(self.discriminator, frozen, (reconstruction,))}
        return reconstruction, posterior, logits


class EMA:
    """Exponential moving average of a model's weights; the defaults are the reference's semantics.

    For the first `start_step` calls of `step_ema` the EMA model is a plain copy of the model; after that
    every parameter moves as ema = decay * ema + (1 - decay) * param. Buffers are always copied. The decay is
    `beta` (the reference), or with `warmup` min(beta, (1 + n) / (10 + n)) at the n-th averaging call,
    n = 0, 1, ..., as diffusers' EMAModel: short runs average their recent weights instead of their first ones.
    """

    def __init__(self, beta=0.995, start_step=2000, warmup=False):
        self.beta = beta
        self.start_step = start_step
        self.warmup = warmup
        self.step = 0

    def decay(self):
        """The decay of the next averaging call."""
        if not self.warmup:
            return self.beta
        n = self.step - self.start_step
        return min(self.beta, (1 + n) / (10 + n))

    @torch.no_grad()
    def step_ema(self, ema_model, model):
        """One update of all tensors at once: multi-tensor kernels (torch._foreach_*), not ~180 small ops per step."""
        ema_params, params = list(ema_model.parameters()), list(model.parameters())
        if self.step < self.start_step:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1.0 - self.decay())  # ema + (1 - decay) * (p - ema)
        ema_buffers, buffers = list(ema_model.buffers()), list(model.buffers())
        if buffers:
            torch._foreach_copy_(ema_buffers, buffers)
        self.step += 1

    def state_dict(self):
        return {"beta": self.beta, "start_step": self.start_step, "warmup": self.warmup, "step": self.step}

    def load_state_dict(self, state):
        self.beta = state["beta"]
        self.start_step = state["start_step"]
        self.warmup = state.get("warmup", False)  # states saved before the warm-up existed
        self.step = state["step"]
