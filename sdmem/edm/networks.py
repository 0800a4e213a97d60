"""EDM's pixel-space U-Nets: DDPM++ and NCSN++ (Song et al., 2021) as configured by Karras et al. (2022).

`SongUNet` covers both presets (`NETWORKS`); module names, shapes and parameter counts follow EDM's SongUNet.
Added: the paper's skip mask (Sec. 4.3), one switch per encoder activation the decoder concatenates, in
encoder order; a switched-off skip feeds zeros of its shape. Call ``net(x, noise_labels, class_labels=None)``:
x [B, C, R, R], noise_labels [B] (c_noise), class_labels one-hot [B, label_dim] or int [B].
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError


def _init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A freshly drawn weight of `shape` under EDM's named init (uniform on [-a, a] or normal with std a)."""
    # a² = 6/(fan_in + fan_out) (xavier_uniform), 3/fan_in (kaiming_uniform); std² = 2/(fan_in + fan_out)
    # (xavier_normal), 1/fan_in (kaiming_normal).
    var = {"xavier_uniform": 6 / (fan_in + fan_out), "kaiming_uniform": 3 / fan_in,
           "xavier_normal": 2 / (fan_in + fan_out), "kaiming_normal": 1 / fan_in}[mode]
    return math.sqrt(var) * ((2 * torch.rand(*shape) - 1) if mode.endswith("uniform") else torch.randn(*shape))


class Linear(nn.Module):
    """Fully connected layer with EDM's init (weight and bias scaled by init_weight / init_bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """kernel×kernel conv (kernel 0: resampling only) with optional 2× FIR up/downsampling before it."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[int] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        assert not (up and down)
        self.up, self.down, self.fused_resample = up, down, fused_resample and down
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = nn.Parameter(_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) \
            if kernel else None
        self.bias = nn.Parameter(_init([out_channels], **fans) * init_bias) if kernel and bias else None
        # Separable FIR filter f fᵀ / (Σf)², so that it preserves a constant image.
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        self.register_buffer("resample_filter", (torch.outer(f, f) / f.sum() ** 2)[None, None] if up or down else None)

    def _resample(self, x: torch.Tensor, f: torch.Tensor, up: bool, pad: int) -> torch.Tensor:
        fk = f.to(x.dtype).expand(x.shape[1], 1, *f.shape[-2:])
        if up:  # transposed depthwise conv, stride 2; ×4 keeps the mean
            return F.conv_transpose2d(x, fk * 4, groups=x.shape[1], stride=2, padding=pad)
        return F.conv2d(x, fk, groups=x.shape[1], stride=2, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, f = self.weight, self.resample_filter
        w_pad, f_pad = (w.shape[-1] // 2 if w is not None else 0), ((f.shape[-1] - 1) // 2 if f is not None else 0)
        if self.fused_resample and w is not None and self.down:  # conv first, then filter (NCSN++ aux path)
            x = self._resample(F.conv2d(x, w, padding=w_pad + f_pad), f, False, 0)
        else:
            if f is not None:
                x = self._resample(x, f, self.up, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        return x if self.bias is None else x + self.bias.to(x.dtype).view(1, -1, 1, 1)


class GroupNorm(nn.GroupNorm):
    """GroupNorm with min(num_groups, C // min_channels_per_group) groups, as in EDM."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__(min(num_groups, num_channels // min_channels_per_group), num_channels, eps=eps)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Self-attention softmax_k(qᵀk / √c) v over positions; q, k, v [N, c, L]; in fp32 even under autocast."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        w = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(k.shape[1])).softmax(dim=2)
        return torch.einsum("nqk,nck->ncq", w, v.float()).to(v.dtype)


class UNetBlock(nn.Module):
    """Residual block (GroupNorm-SiLU-conv, noise-embedding affine, dropout, conv) + optional self-attention."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int = 1, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5, resample_filter: Sequence[int] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: dict | None = None, init_zero: dict | None = None,
                 init_attn: dict | None = None):
        super().__init__()
        init, init_zero = init or {}, init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_heads = num_heads if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        kernel = 1 if resample_proj or out_channels != in_channels else 0  # 0: resample only
        self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter,
                           **init) if out_channels != in_channels or up or down else None
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:  # FiLM: h ← SiLU(shift + GN(h)·(1 + scale))
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:  # additive embedding: h ← SiLU(GN(h + e))
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (self.skip(x) if self.skip is not None else x)) * self.skip_scale  # 1/√2 in DDPM++/NCSN++
        if self.num_heads:  # qkv channels are interleaved per head as (c/heads, 3), EDM's layout
            b, c, hh, ww = h.shape
            q, k, v = self.qkv(self.norm2(h)).reshape(b * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            h = (self.proj(_attention(q, k, v).reshape(b, c, hh, ww)) + h) * self.skip_scale
        return h


class PositionalEmbedding(nn.Module):
    """Transformer sinusoidal embedding of the noise label, [sin | cos] halves (DDPM++)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = True):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        # ω_j = (1/max_positions)^(j / (half − endpoint)), j = 0..half−1; emb = [sin(xω), cos(xω)].
        j = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        angle = torch.outer(x, ((1 / self.max_positions) ** j).to(x.dtype))
        return torch.cat([angle.sin(), angle.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of the noise label (Tancik et al., 2020), [sin | cos] halves (NCSN++)."""

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # emb = [sin(2π f x), cos(2π f x)], f ~ N(0, scale²) fixed at init.
        angle = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angle.sin(), angle.cos()], dim=1)


class SkipGate(nn.Module):
    """One U-Net skip connection's switch: passes the encoder activation, or zeros of its shape when off."""

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.enabled = bool(enabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.enabled else torch.zeros_like(x)


class SongUNet(nn.Module):
    """DDPM++ / NCSN++ U-Net (EDM's SongUNet) with a per-skip switch mask; forward(x, noise_labels, class_labels)."""

    def __init__(self, img_resolution: int, in_channels: int = 3, out_channels: int = 3, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult: Sequence[int] = (2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 2, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.13, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[int] = (1, 1), skip_mask: Sequence[bool] | None = None):
        super().__init__()
        levels = len(channel_mult)
        _check_config(img_resolution, levels, num_blocks, embedding_type, encoder_type, decoder_type, dropout)
        self.img_resolution, self.in_channels, self.out_channels = img_resolution, in_channels, out_channels
        self.label_dim, self.label_dropout = label_dim, label_dropout
        self.num_skips = levels * (num_blocks + 1)
        emb_ch, noise_ch = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        # EDM's init: xavier_uniform; ×1e-5 on each residual branch's last conv and the output conv, ×√0.2 on qkv.
        init, init_zero = dict(init_mode="xavier_uniform"), dict(init_mode="xavier_uniform", init_weight=1e-5)
        blk = dict(emb_channels=emb_ch, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                   resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init,
                   init_zero=init_zero, init_attn=dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2)))
        # Mapping network: noise embedding (+ label, + augment) → two SiLU linears.
        self.map_noise = (PositionalEmbedding(noise_ch, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_ch))
        self.map_label = Linear(label_dim, noise_ch, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_ch, bias=False, **init) if augment_dim else None
        self.map_layer0, self.map_layer1 = Linear(noise_ch, emb_ch, **init), Linear(emb_ch, emb_ch, **init)
        # Encoder: per level, a stem conv (top) or a downsampling block, then num_blocks blocks; each of these
        # outputs is one skip. `aux_*` modules carry the input image alongside (skip / residual encoders).
        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        skip_channels = []
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cout = model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(in_channels, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **blk)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, fused_resample=True,
                                                                   resample_filter=resample_filter, **init)
                    caux = cout
            skip_channels.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **blk)
                skip_channels.append(cout)
        self.skip_gates = nn.ModuleList(SkipGate() for _ in range(self.num_skips))
        self.set_skip_mask(skip_mask)
        # Decoder: bottleneck (attention + plain) or upsampling block, then num_blocks + 1 blocks that each take
        # one skip (concatenated, last-in first-out); output head at the top (and every level if 'skip').
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **blk)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **blk)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **blk)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **blk)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < levels - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def set_skip_mask(self, skip_mask: Sequence[bool] | None) -> None:
        """Switch skips on/off (None = all on); InputError on a wrong length or a non-boolean switch."""
        mask = [True] * self.num_skips if skip_mask is None else list(skip_mask)
        if len(mask) != self.num_skips or any(isinstance(m, str) or m not in (0, 1) for m in mask):
            raise InputError("model.skip_mask", f"expected {self.num_skips} switches (booleans; len(channel_mult) "
                                                f"× (num_blocks + 1)), got {len(mask)}: {mask!r}")
        for gate, on in zip(self.skip_gates, mask):
            gate.enabled = bool(on)
        self.skip_mask = tuple(bool(m) for m in mask)  # the switches in encoder order (True = connected)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor, class_labels: torch.Tensor | None = None,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """F_θ(x; c_noise, labels): [B, out_channels, R, R]."""
        if tuple(x.shape[1:]) != (self.in_channels, self.img_resolution, self.img_resolution):
            raise InputError("data.resolution", f"network built for {self.in_channels}×{self.img_resolution}×"
                                                f"{self.img_resolution} inputs, got {tuple(x.shape[1:])}")
        emb = self.map_noise(noise_labels.reshape(-1))
        if self.map_label is not None:
            onehot = torch.zeros(x.shape[0], self.label_dim, device=x.device) if class_labels is None else class_labels
            if not onehot.is_floating_point():  # int indices [B]
                onehot = F.one_hot(onehot.reshape(-1).long(), self.label_dim)
            if self.training and self.label_dropout:  # classifier-free-guidance style label dropout
                onehot = onehot * (torch.rand(onehot.shape[0], 1, device=x.device) >= self.label_dropout)
            # EDM feeds √label_dim · one-hot so the label input has unit mean square.
            emb = emb + self.map_label(onehot.to(emb.dtype) * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips, aux = [], x
        for name, module in self.enc.items():
            if name.endswith("aux_down"):
                aux = module(aux)
            elif name.endswith("aux_skip"):
                x = skips[-1] = x + module(aux)
            elif name.endswith("aux_residual"):
                # Residual encoder: x ← (x + conv↓(aux)) / √2, and the result is also the next aux input.
                x = skips[-1] = aux = (x + module(aux)) / math.sqrt(2)
            else:
                x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
                skips.append(x)
        skips = [gate(s) for gate, s in zip(self.skip_gates, skips)]

        out = tmp = None
        for name, module in self.dec.items():
            if name.endswith("aux_up"):
                out = module(out)
            elif name.endswith("aux_norm"):
                tmp = module(x)
            elif name.endswith("aux_conv"):
                tmp = module(F.silu(tmp))
                out = tmp if out is None else out + tmp
            else:  # decoder blocks `_block{i}` take the next skip (last in, first out)
                x = module(torch.cat([x, skips.pop()], dim=1) if "_block" in name else x, emb)
        return out


def _check_config(res, levels: int, num_blocks: int, embedding: str, encoder: str, decoder: str, dropout) -> None:
    """InputError for a configuration SongUNet cannot build."""
    factor = 2 ** max(levels - 1, 0)
    if levels < 1 or num_blocks < 0:
        raise InputError("model.num_blocks", f"expected >= 1 levels and >= 0 blocks, got {levels}, {num_blocks}")
    if not isinstance(res, numbers.Integral) or isinstance(res, bool) or res < factor or res % factor:
        raise InputError("data.resolution", f"expected a positive multiple of {factor} (the U-Net halves it "
                                            f"{levels - 1} times), got {res!r}")
    for key, value, allowed in (("embedding_type", embedding, ("positional", "fourier")),
                                ("encoder_type", encoder, ("standard", "skip", "residual")),
                                ("decoder_type", decoder, ("standard", "skip"))):
        if value not in allowed:
            raise InputError(f"model.{key}", f"expected one of {', '.join(allowed)}, got {value!r}")
    if not 0 <= dropout < 1:
        raise InputError("model.dropout", f"expected a probability in [0, 1), got {dropout}")


# EDM's two presets (train.py --arch ddpmpp / ncsnpp), with the paper's basic setup (Appendix B): 2 blocks per
# resolution (EDM's CIFAR default is 4) and dropout 0.13.
_COMMON = dict(model_channels=128, channel_mult=(2, 2, 2), num_blocks=2, attn_resolutions=(16,), dropout=0.13)
NETWORKS: dict[str, dict] = {
    "ddpmpp": dict(_COMMON, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                   decoder_type="standard", resample_filter=(1, 1)),
    "ncsnpp": dict(_COMMON, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
                   decoder_type="standard", resample_filter=(1, 3, 3, 1)),
}
_OPTIONS = set(inspect.signature(SongUNet.__init__).parameters) - {"self"}


def build_network(arch: str, *, img_resolution: int, in_channels: int = 3, out_channels: int = 3,
                  label_dim: int = 0, **overrides) -> SongUNet:
    """A SongUNet from the `NETWORKS` preset `arch`, with `overrides` (e.g. num_blocks, skip_mask) on top."""
    if arch not in NETWORKS:
        raise InputError("model.arch", f"expected one of {', '.join(NETWORKS)}, got {arch!r}")
    for key in overrides:
        if key not in _OPTIONS:
            raise InputError(f"model.{key}", f"not a network option (known: {', '.join(sorted(_OPTIONS))})")
    try:
        return SongUNet(img_resolution=img_resolution, in_channels=in_channels, out_channels=out_channels,
                        label_dim=label_dim, **dict(NETWORKS[arch], **overrides))
    except ValueError as exc:  # e.g. GroupNorm: a width its groups cannot divide
        raise InputError("model.channels", f"the network cannot be built with these widths ({exc}); "
                                           "try a multiple of 32") from None
