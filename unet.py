"""The denoiser networks: EDM's U-Nets, their preconditioning and conditions, and the toy MLP.

Karras et al. 2022 (EDM) wrap a network F in a preconditioning that makes it a denoiser D(x; sigma)
(EDM Eq. 7, Table 1). Two U-Nets cover every official checkpoint: `SongUNet` (DDPM++ / NCSN++ of
Song et al.: CIFAR-10, FFHQ, AFHQv2) and `DhariwalUNet` (ADM: ImageNet-64). Parameter names and the
numerics the weights depend on equal EDM's, so NVIDIA's weights load with strict=True and give EDM's
outputs. `ToyMLP` is the same idea for 2-D points (toy.py). Two conditions serve distillation, off
by default, switched on as an exact no-op:
  * SFD-v's step condition (SFD Sec. 3.3, App. D.1, Alg. 10 and 12): `net(x, t, step=N)`;
  * Meng et al.'s guidance strength (Sec. 3.1, App. B.2): `net(x, t, guidance=w)`, w = 0 conditional.
This file imports no sibling module: copied alone it builds every network. Reading and writing
checkpoints (ours and NVIDIA's pickles) is models.py's job.

    python unet.py                    # build the official CIFAR-10 DDPM++ and count its parameters
"""

import contextlib
import math

import numpy as np
import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F
from torch.nn.functional import silu

# ---------------------------------------------------------------------------------------------
# Layers. EDM initialises every weight as gain(mode, fan_in, fan_out) * uniform or normal noise.
# ---------------------------------------------------------------------------------------------


def weight_init(shape, mode, fan_in, fan_out):
    """Xavier / Kaiming initialisation, uniform or normal (EDM's four modes)."""
    var = {'xavier': 2 / (fan_in + fan_out), 'kaiming': 1 / fan_in}[mode.split('_')[0]]
    if mode.endswith('uniform'):  # U(-a, a) has variance a^2 / 3
        return math.sqrt(3 * var) * (torch.rand(*shape) * 2 - 1)
    return math.sqrt(var) * torch.randn(*shape)


class Linear(nn.Module):
    """Fully connected layer with EDM's initialisation."""

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1,
                 init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fan = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fan) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fan) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """Convolution with optional 2x up/down-sampling by a FIR filter; kernel=0 only resamples."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), fused_resample=False, init_mode='kaiming_normal', init_weight=1,
                 init_bias=0):
        assert not (up and down) and not (fused_resample and up)  # no EDM network fuses an up-sampling
        super().__init__()
        self.in_channels, self.out_channels, self.up, self.down = in_channels, out_channels, up, down
        self.fused_resample = fused_resample
        fan = dict(mode=init_mode, fan_in=in_channels * kernel ** 2, fan_out=out_channels * kernel ** 2)
        shape = [out_channels, in_channels, kernel, kernel]
        self.weight = nn.Parameter(weight_init(shape, **fan) * init_weight) if kernel else None
        self.bias = nn.Parameter(weight_init([out_channels], **fan) * init_bias) if kernel and bias else None
        # outer(f, f) / sum(f)^2: unit DC gain; [1,1] is a 2x2 box filter, [1,3,3,1] a binomial one
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum() ** 2
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        w, b, f = self.weight, self.bias, self.resample_filter
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and w is not None:  # NCSN++ residual path: conv, then blur with stride 2
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            f = f.to(x.dtype).tile([self.out_channels, 1, 1, 1])
            x = F.conv2d(x, f, groups=self.out_channels, stride=2)
        else:  # depthwise filter per channel; up-sampling zero-stuffs, so the filter is scaled by 4
            f = f.to(x.dtype).tile([self.in_channels, 1, 1, 1]) if f is not None else None
            if self.up:
                x = F.conv_transpose2d(x, f * 4, groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f, groups=self.in_channels, stride=2, padding=f_pad)
            x = F.conv2d(x, w, padding=w_pad) if w is not None else x
        return x if b is None else x + b.reshape(1, -1, 1, 1)


class GroupNorm(nn.Module):
    """Group normalisation with min(32, C/4) groups, as EDM."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups, self.eps = min(num_groups, num_channels // min_channels_per_group), eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class PositionalEmbedding(nn.Module):
    """Sinusoids of one scalar per sample: [cos(x f_j), sin(x f_j)], f_j = 10000^(-j / (C/2 - endpoint))."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False, sin_first=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint
        self.sin_first = sin_first  # EDM's SongUNet swaps the halves to [sin, cos]

    def forward(self, x):
        # f_j in float32 even for float64 inputs, exactly as the official weights were trained
        j = torch.arange(self.num_channels // 2, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (j / (self.num_channels // 2 - self.endpoint))
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.sin(), x.cos()] if self.sin_first else [x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """NCSN++'s random Fourier features [cos(2 pi x f), sin(2 pi x f)], fixed f ~ N(0, 16^2)."""

    def __init__(self, num_channels, scale=16, sin_first=False):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)
        self.sin_first = sin_first

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.sin(), x.cos()] if self.sin_first else [x.cos(), x.sin()], dim=1)


class ConditionEmbedding(nn.Module):
    """A scalar condition (SFD's step N, Meng's w) -> a vector: sinusoids, Linear, SiLU, Linear [, SiLU].

    The reusable piece of both extra conditions (toy.py's MLP may use it). `zero_out` zero-initialises
    the last layer, so a new embedding is exactly 0 and the network's output does not change.
    """

    def __init__(self, num_channels, hidden_channels, out_channels, endpoint=True, sin_first=True,
                 out_act=False, zero_out=False, init=None):
        super().__init__()
        init = init or dict(init_mode='xavier_uniform')
        self.embed = PositionalEmbedding(num_channels, endpoint=endpoint, sin_first=sin_first)
        self.layer0 = Linear(num_channels, hidden_channels, **init)
        self.layer1 = Linear(hidden_channels, out_channels, **(dict(init_weight=0) if zero_out else init))
        self.out_act = out_act

    def forward(self, v):
        h = self.layer1(silu(self.layer0(self.embed(v))))
        return silu(h) if self.out_act else h


class UNetBlock(nn.Module):
    """Residual block of DDPM++, NCSN++ and ADM: norm-SiLU-conv, noise embedding (added, or ADM's
    scale/shift), dropout-conv, skip, optional self-attention; optionally SFD-v's step (Alg. 12)."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=(1, 1), resample_proj=False, adaptive_scale=True, init=None, init_zero=None,
                 init_attn=None):
        super().__init__()
        init, init_zero = init or {}, init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = 0 if not attention else num_heads or out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        resample = dict(up=up, down=down, resample_filter=resample_filter)
        self.conv0 = Conv2d(in_channels, out_channels, 3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None  # identity, a 1x1 projection, or (ADM, kernel 0) a pure resample
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, **resample, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x, emb, emb_step=None):
        orig, x = x, self.conv0(silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        step = self.affine_step(emb_step)[:, :, None, None].to(x.dtype) if emb_step is not None else None
        if self.adaptive_scale:  # ADM: shift + norm(h) (1 + scale); SFD's code adds a second such FiLM
            scale, shift = params.chunk(2, dim=1)
            x = torch.addcmul(shift, self.norm1(x), scale + 1)
            if step is not None:
                scale, shift = step.chunk(2, dim=1)
                x = torch.addcmul(shift, x, scale + 1)
            x = silu(x)
        else:  # DDPM++: emb added before the norm; SFD Alg. 12 adds the step embedding next to it
            x = silu(self.norm1(x + params if step is None else x + params + step))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            # EDM's qkv conv interleaves its 3C outputs as [head, channel, q/k/v] (not [q | k | v]);
            # attention is softmax(q.k / sqrt(C / heads)) v over the H W positions of each head.
            qkv = self.qkv(self.norm2(x))
            q, k, v = rearrange(qkv, 'b (h c t) y x -> t b h (y x) c', h=self.num_heads, t=3)
            a = rearrange(F.scaled_dot_product_attention(q, k, v), 'b h (y x) c -> b (h c) y x', y=x.shape[2])
            x = (self.proj(a) + x) * self.skip_scale
        return x


# ---------------------------------------------------------------------------------------------
# The U-Nets: DDPM++ / NCSN++ (Song et al. 2021) and ADM (Dhariwal & Nichol 2021), as EDM has them
# ---------------------------------------------------------------------------------------------


class _UNet(nn.Module):
    """What both U-Nets share: encoder/decoder construction and pass, and the two switchable conditions.

    A subclass sets `_cond`, the ConditionEmbedding keywords that embed a scalar the way it embeds
    the noise level: extra conditions are treated "the same way as the time step" (SFD App. D.1,
    Meng Sec. 3.1).
    """
    use_step_condition = use_guidance_condition = False

    def _new(self, module):  # a new layer goes to the network's device and dtype
        p = next(self.parameters())
        return module.to(device=p.device, dtype=p.dtype)

    def enable_step_condition(self):
        """SFD App. D.1, Alg. 10/12: map_step = sinusoids(N) -> Linear-SiLU-Linear-SiLU, plus an
        `affine_step` in every block. The official code initialises them randomly, which perturbs
        the teacher at step 0; ours start at zero, so the output is unchanged bit for bit."""
        if not self.use_step_condition:
            c = self._cond  # silu(layer1(silu(layer0(sinusoids(N))))), as the noise embedding's MLP
            self.map_step = self._new(ConditionEmbedding(**c, out_channels=c['hidden_channels'],
                                                         out_act=True))
            for block in (m for m in self.modules() if isinstance(m, UNetBlock)):
                affine_step = Linear(block.emb_channels, block.affine.out_features, init_weight=0)
                block.affine_step = self._new(affine_step)
            self.use_step_condition = True
        return self

    def enable_guidance_condition(self):
        """Meng Sec. 3.1: sinusoids(w) -> Linear-SiLU-Linear, zero-initialised, added to the noise
        features (where the time step enters): the student starts as the conditional teacher."""
        if not self.use_guidance_condition:
            c = self._cond
            self.map_guidance = self._new(ConditionEmbedding(**c, out_channels=c['num_channels'],
                                                             zero_out=True))
            self.use_guidance_condition = True
        return self

    def _embed(self, noise_labels, step, guidance):
        """(noise features + guidance features, step embedding or None)."""
        emb = self.map_noise(noise_labels)
        emb = emb + self.map_guidance(guidance) if guidance is not None else emb
        return emb, self.map_step(step) if step is not None else None

    def _drop_labels(self, y, B):  # classifier-free guidance training drops whole labels
        if self.training and self.label_dropout:
            y = y * (torch.rand([B, 1], device=y.device) >= self.label_dropout).to(y.dtype)
        return y

    def _build(self, res, in_channels, out_channels, stem, channels, num_blocks, attn_resolutions, block,
               init, init_zero, song, encoder_type='standard', decoder_type='standard', f=(1, 1)):
        """Encoder and decoder ModuleDicts under EDM's names. DDPM++/NCSN++ (`song`) and ADM differ in
        the stem width, the aux image paths, where the decoder attends, and the output head."""
        self.enc, self.dec, cout, caux = nn.ModuleDict(), nn.ModuleDict(), in_channels, in_channels
        for level, c in enumerate(channels):  # encoder: per level a down block, then num_blocks blocks
            r = f'{res >> level}x{res >> level}'
            if level == 0:
                self.enc[f'{r}_conv'], cout = Conv2d(cout, stem, 3, **init), stem
            else:
                self.enc[f'{r}_down'] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == 'skip':
                    self.enc[f'{r}_aux_down'] = Conv2d(caux, caux, 0, down=True, resample_filter=f)
                    self.enc[f'{r}_aux_skip'] = Conv2d(caux, cout, 1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{r}_aux_residual'] = Conv2d(caux, cout, 3, down=True, resample_filter=f,
                                                           fused_resample=True, **init)
                    caux = cout
            for i in range(num_blocks):
                attn = res >> level in attn_resolutions
                self.enc[f'{r}_block{i}'], cout = UNetBlock(cout, c, attention=attn, **block), c
        skips = [b.out_channels for name, b in self.enc.items() if 'aux' not in name]
        for level in reversed(range(len(channels))):
            r, c, attn = f'{res >> level}x{res >> level}', channels[level], res >> level in attn_resolutions
            if level == len(channels) - 1:  # bottom: two blocks, the first with attention
                self.dec[f'{r}_in0'] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f'{r}_in1'] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f'{r}_up'] = UNetBlock(cout, cout, up=True, **block)
            for i in range(num_blocks + 1):  # each eats one encoder skip; Song attends only in the last
                a = attn and (i == num_blocks or not song)
                self.dec[f'{r}_block{i}'], cout = UNetBlock(cout + skips.pop(), c, attention=a, **block), c
            if song and (decoder_type == 'skip' or level == 0):  # output head(s): norm, SiLU, conv
                if decoder_type == 'skip' and level < len(channels) - 1:
                    self.dec[f'{r}_aux_up'] = Conv2d(out_channels, out_channels, 0, up=True,
                                                     resample_filter=f)
                self.dec[f'{r}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                self.dec[f'{r}_aux_conv'] = Conv2d(cout, out_channels, 3, **init_zero)
        if not song:
            self.out_norm, self.out_conv = GroupNorm(cout), Conv2d(cout, out_channels, 3, **init_zero)

    def _encode_decode(self, x, emb, emb_step):
        """The U-Net pass (`aux_*` layers: SongUNet's image paths and output heads)."""
        skips, aux = [], x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:  # progressive input: the down-sampled image joins each level
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:  # NCSN++: a residual path of strided convs from the image
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb, emb_step) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        aux = tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:  # progressive output sums the heads of all levels
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:  # U-Net skip connections are concatenated
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb, emb_step)
        return x, aux


class SongUNet(_UNet):
    """DDPM++ (positional embedding, standard encoder) and NCSN++ (Fourier, residual encoder) U-Net."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), dropout=0.10, label_dropout=0, embedding_type='positional',
                 channel_mult_noise=1, encoder_type='standard', decoder_type='standard',
                 resample_filter=(1, 1)):
        assert embedding_type in ('fourier', 'positional') and decoder_type in ('standard', 'skip')
        assert encoder_type in ('standard', 'skip', 'residual')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels, noise_channels = model_channels * channel_mult_emb, model_channels * channel_mult_noise
        init, init_zero = dict(init_mode='xavier_uniform'), dict(init_mode='xavier_uniform', init_weight=1e-5)
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                     eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=dict(init_mode='xavier_uniform',
                                                                    init_weight=math.sqrt(0.2)))
        self._cond = dict(num_channels=noise_channels, hidden_channels=emb_channels, init=init)
        # Mapping network: noise features (+ labels, augmentation) -> Linear-SiLU-Linear-SiLU.
        self.map_noise = (FourierEmbedding(noise_channels, sin_first=True) if embedding_type == 'fourier'
                          else PositionalEmbedding(noise_channels, endpoint=True, sin_first=True))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self._build(img_resolution, in_channels, out_channels, model_channels,
                    [model_channels * m for m in channel_mult], num_blocks, attn_resolutions, block, init,
                    init_zero, True, encoder_type, decoder_type, resample_filter)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, step=None, guidance=None):
        emb, emb_step = self._embed(noise_labels, step, guidance)
        if self.map_label is not None:  # one-hot labels times sqrt(label_dim), added to the noise features
            y = self._drop_labels(class_labels, x.shape[0])
            emb = emb + self.map_label(y * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer1(silu(self.map_layer0(emb))))
        return self._encode_decode(x, emb, emb_step)[1]


class DhariwalUNet(_UNet):
    """ADM U-Net (ImageNet-64): scale/shift blocks, attention at 32, 16, 8, labels after the mapping MLP."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
                     init_zero=init_zero)
        self._cond = dict(num_channels=model_channels, hidden_channels=emb_channels, endpoint=False,
                          sin_first=False, init=init)
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = (Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim
                            else None)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode='kaiming_normal',
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)
        channels = [model_channels * m for m in channel_mult]
        self._build(img_resolution, in_channels, out_channels, channels[0], channels, num_blocks,
                    attn_resolutions, block, init, init_zero, False)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None, step=None, guidance=None):
        emb, emb_step = self._embed(noise_labels, step, guidance)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(silu(self.map_layer0(emb)))
        if self.map_label is not None:  # ADM adds the (unscaled) label embedding after the mapping MLP
            emb = emb + self.map_label(self._drop_labels(class_labels, x.shape[0]))
        x, _ = self._encode_decode(x, silu(emb), emb_step)
        return self.out_conv(silu(self.out_norm(x)))


# ---------------------------------------------------------------------------------------------
# The toy denoiser's inner network: the same conditions on 2-D points (toy.py trains it)
# ---------------------------------------------------------------------------------------------

class ToyMLP(nn.Module):
    """The inner network F of a toy denoiser: [x, embedding] -> `depth` SiLU layers -> 2 outputs.

    The embedding is built like a U-Net's: sinusoids of c_noise = ln(sigma) / 4 and a linear map
    of the (sqrt(C)-scaled, as EDM does) one-hot label, through Linear-SiLU. The step and guidance
    conditions are the U-Nets' too (ConditionEmbedding, zero-initialised): switching them on
    leaves the output unchanged until trained.
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, width=256, depth=4, emb=64):
        super().__init__()
        self.label_dim, self.emb = label_dim, emb
        self.use_step_condition = self.use_guidance_condition = False
        self.map_noise = PositionalEmbedding(emb, endpoint=True)
        self.map_label = Linear(label_dim, emb) if label_dim else None
        self.map_layer = Linear(emb, emb)
        self.layers = nn.ModuleList([Linear(in_channels + emb, width)] +
                                          [Linear(width, width) for _ in range(depth - 1)])
        self.out = Linear(width, out_channels)

    def _new(self, module):
        p = next(self.parameters())
        return module.to(device=p.device, dtype=p.dtype)

    def enable_step_condition(self):
        """SFD-v's step N, embedded like the noise level and added to the embedding (App. D.1)."""
        if not self.use_step_condition:
            self.map_step = self._new(ConditionEmbedding(self.emb, self.emb, self.emb, zero_out=True))
            self.use_step_condition = True
        return self

    def enable_guidance_condition(self):
        """Meng's w, embedded like the noise level and added to the noise features (Sec. 3.1)."""
        if not self.use_guidance_condition:
            self.map_guidance = self._new(ConditionEmbedding(self.emb, self.emb, self.emb, zero_out=True))
            self.use_guidance_condition = True
        return self

    def forward(self, x, noise_labels, class_labels=None, step=None, guidance=None, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if guidance is not None:
            emb = emb + self.map_guidance(guidance)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels * math.sqrt(self.label_dim))
        emb = silu(self.map_layer(emb))
        if step is not None:
            emb = emb + self.map_step(step)
        h = torch.cat([x, emb], dim=1)
        for layer in self.layers:
            h = silu(layer(h))
        return self.out(h)


# Inner models by the name a checkpoint stores (init_kwargs['model_type']): one explicit table.
MODELS = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet, 'ToyMLP': ToyMLP}


class EDMPrecond(nn.Module):
    """The denoiser D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) of EDM (Eq. 7, Table 1).

    Keywords are EDM's (the `_init_kwargs` in NVIDIA's files build it), the inner model's, and
    `use_step_condition` / `use_guidance_condition`. `model_type` is a name in MODELS (default
    SongUNet; EDM's is DhariwalUNet, but its files always name one) or a class, added to MODELS.
    Such a class (e.g. ToyMLP) is built as cls(img_resolution=, in_channels=, out_channels=,
    label_dim=, **model_kwargs), called as F(x_in [B, ...], c_noise [B], class_labels, **conds)
    with conds among augment_labels, step, guidance (only those given), and has methods
    enable_step_condition / enable_guidance_condition setting flags use_*_condition (see _UNet).
    Tiny test net: EDMPrecond(img_resolution=8, img_channels=3, model_channels=16,
    channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]).
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='SongUNet', use_step_condition=False,
                 use_guidance_condition=False, **model_kwargs):
        super().__init__()
        if isinstance(model_type, type):
            MODELS[model_type.__name__], model_type = model_type, model_type.__name__
        if model_type not in MODELS:
            raise ValueError(f'unknown model_type {model_type!r}: this file knows {sorted(MODELS)}')
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16  # EDM's flag; here it means bf16 autocast on CUDA
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)  # the protocol's floats
        self.sigma_data = float(sigma_data)
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max,
                                sigma_data=sigma_data, model_type=model_type, **model_kwargs)  # save_model
        self.model = MODELS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                        out_channels=img_channels, label_dim=label_dim, **model_kwargs)
        if use_step_condition:
            self.enable_step_condition()
        if use_guidance_condition:
            self.enable_guidance_condition()

    # The denoiser protocol's metadata (models.Denoiser): no prompts; one sample's shape.
    text = False
    prior = 'edm'  # sampling starts from x = t_max z
    use_step_condition = property(lambda self: bool(getattr(self.model, 'use_step_condition', False)))
    use_guidance_condition = property(lambda self: bool(getattr(self.model, 'use_guidance_condition', False)))

    @property
    def shape(self):
        """One sample's shape: [C, R, R] images for the U-Nets, [C] points for any other model (ToyMLP)."""
        if isinstance(self.model, _UNet):
            return [self.img_channels, self.img_resolution, self.img_resolution]
        return [self.img_channels]

    def decode(self, x, sigma=0.0):
        """Images of a final sample: a pixel-space network's samples are the images themselves."""
        return x

    def enable_step_condition(self):
        """Add SFD-v's step condition (zero-initialised: D unchanged until trained); returns self."""
        self.model.enable_step_condition()
        self.init_kwargs['use_step_condition'] = True  # so that save_model / load_model rebuild it
        return self

    def enable_guidance_condition(self):
        """Add Meng et al.'s guidance-strength condition w (zero-initialised); returns self."""
        self.model.enable_guidance_condition()
        self.init_kwargs['use_guidance_condition'] = True
        return self

    def forward(self, x, sigma, class_labels=None, step=None, guidance=None, augment_labels=None,
                force_fp32=False):
        """D(x; sigma). sigma: float or [B]; class_labels: one-hot [B, C], integer [B] or None (zeros,
        as EDM); step (SFD-v) and guidance (Meng's w): number or [B], required iff that condition is on.
        Preconditioning runs in float32 (float64 for float64 x); F under bf16 autocast if use_fp16."""
        B, C, R = x.shape[0], self.img_channels, self.img_resolution
        if isinstance(self.model, (SongUNet, DhariwalUNet)) and tuple(x.shape[1:]) != (C, R, R):
            raise ValueError(f'this network takes images [B, {C}, {R}, {R}], got {list(x.shape)}')
        for name, value in ('step', step), ('guidance', guidance):
            if (value is None) == getattr(self, f'use_{name}_condition'):
                raise ValueError(f'pass {name}= exactly when the network has the {name} condition '
                                 f'(net.enable_{name}_condition() adds it)')
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dtype)
        sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device).reshape(-1).expand(B)
        s, sd = sigma.reshape(B, *[1] * (x.ndim - 1)), self.sigma_data
        # EDM Table 1: unit-variance input and training target; c_noise = ln(sigma) / 4.
        c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in, c_noise = 1 / (sd ** 2 + s ** 2).sqrt(), sigma.log() / 4
        mdtype = next(self.model.parameters()).dtype  # F's inputs follow its weights
        y = None
        if self.label_dim:
            y = torch.zeros(B, self.label_dim, device=x.device) if class_labels is None else class_labels
            y = y if y.is_floating_point() else F.one_hot(y.long(), self.label_dim)
            y = y.to(mdtype).reshape(-1, self.label_dim)
        cond = {k: torch.as_tensor(v, device=x.device).to(mdtype).reshape(-1).expand(B)
                for k, v in (('step', step), ('guidance', guidance)) if v is not None}
        if augment_labels is not None:
            cond['augment_labels'] = augment_labels.to(mdtype)
        amp = contextlib.nullcontext()  # bf16 autocast replaces EDM's fp16 casts; force_fp32 disables any
        if x.device.type == 'cuda' and (self.use_fp16 or force_fp32):
            amp = torch.autocast('cuda', torch.bfloat16, enabled=not force_fp32)
        with amp:
            F_x = self.model((c_in * x).to(mdtype), c_noise.to(mdtype), y, **cond)
        return c_skip * x + c_out * F_x.to(dtype)


if __name__ == '__main__':
    # EDM's CIFAR-10 DDPM++, the network of edm-cifar10-32x32-uncond-vp.pkl (55,733,891 parameters).
    net = EDMPrecond(img_resolution=32, img_channels=3, model_type='SongUNet', embedding_type='positional',
                     encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
                     resample_filter=[1, 1], model_channels=128, channel_mult=[2, 2, 2], augment_dim=9,
                     dropout=0.13)
    print(f'{type(net.model).__name__}: {sum(p.numel() for p in net.parameters()):,} parameters')
