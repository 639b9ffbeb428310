"""Tests for unet.py: EDM architectures, preconditioning, the step/guidance conditions, the toy MLP;
and that unet.py (and solvers.py) import and build every network when copied alone."""
import math

import pytest
import torch
from torch import nn

import models
import unet

TINY = dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4], dropout=0.0)
ADM_TINY = dict(img_resolution=8, img_channels=3, model_type='DhariwalUNet', model_channels=64,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8, 4], dropout=0.0)  # 64: one head
VARIANTS = {  # every SongUNet encoder/decoder/embedding option, and ADM
    'ddpmpp': dict(TINY),
    'ncsnpp': dict(TINY, embedding_type='fourier', encoder_type='residual', channel_mult_noise=2,
                   resample_filter=[1, 3, 3, 1]),
    'skip-skip': dict(TINY, encoder_type='skip', decoder_type='skip', resample_filter=[1, 3, 3, 1]),
    'residual-skip': dict(TINY, encoder_type='residual', decoder_type='skip', channel_mult=[1, 2, 2]),
    'adm': dict(ADM_TINY),
}

# The official checkpoints' constructor keywords (EDM's train.py presets and README options).
DDPMPP = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
              decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
              channel_mult=[2, 2, 2])
NCSNPP = dict(DDPMPP, embedding_type='fourier', encoder_type='residual', channel_mult_noise=2,
              resample_filter=[1, 3, 3, 1])
OFFICIAL = {  # name: (keywords, parameter count, state-dict entries)
    'cifar10-32x32-uncond-vp': (dict(DDPMPP, label_dim=0, augment_dim=9, dropout=0.13), 55_733_891, 425),
    'cifar10-32x32-cond-vp': (dict(DDPMPP, label_dim=10, augment_dim=9, dropout=0.13), 55_735_299, 427),
    'cifar10-32x32-uncond-ve': (dict(NCSNPP, label_dim=0, augment_dim=9, dropout=0.13), 56_397_827, 432),
    'cifar10-32x32-cond-ve': (dict(NCSNPP, label_dim=10, augment_dim=9, dropout=0.13), 56_400_643, 434),
    'ffhq-64x64-uncond-vp': (dict(DDPMPP, channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.05),
                             61_805_571, 553),
    'ffhq-64x64-uncond-ve': (dict(NCSNPP, channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.05),
                             62_761_091, 563),
    'imagenet-64x64-cond-adm': (dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4],
                                     label_dim=1000, dropout=0.1, use_fp16=True), 295_899_267, 553),
}


def tiny(variant='ddpmpp', label_dim=0, seed=0, **kw):
    """A tiny network with every weight random (EDM zero-initialises output layers, which would hide bugs)."""
    torch.manual_seed(seed)
    net = unet.EDMPrecond(**{**VARIANTS[variant], 'label_dim': label_dim, **kw}).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel() if p.ndim > 1 else 9))
    return net


def inputs(net, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    R, C = net.img_resolution, net.img_channels
    x = torch.randn(B, C, R, R, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.02, 1.0, 40.0][:B], dtype=torch.float64)
    y = torch.randint(net.label_dim, (B,), generator=g) if net.label_dim else None
    return x, sigma, y


# ------------------------------------------------------------------------------------------------
# Architectures: shapes, names, parameter counts
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant', VARIANTS)
@pytest.mark.parametrize('label_dim', [0, 5])
def test_every_variant_denoises_at_the_right_shape(variant, label_dim):
    net = tiny(variant, label_dim, augment_dim=9)
    x, sigma, y = inputs(net)
    with torch.no_grad():
        D = net(x, sigma, y, augment_labels=torch.randn(3, 9, dtype=torch.float64))
    assert D.shape == x.shape and D.dtype == torch.float64 and torch.isfinite(D).all()
    assert not torch.allclose(D, x)  # the network contributes
    with pytest.raises(ValueError, match=r'images \[B, 3, 8, 8\]'):
        net(x[:, :, :4, :4], sigma)


# Checksums of D for tiny() weights, computed once by running NVIDIA's own EDM code (training/networks.py,
# commit 008a4e5, its attention evaluated in float64) on the same weights and inputs, outside this repository.
EDM_REFERENCE = {  # variant: (sum of D * linspace(-1, 1), sum of D^2)
    'ddpmpp': (28.187696468538654, 240.306985267456),
    'ncsnpp': (7.4743529114297775, 245.09893153748862),
    'skip-skip': (7.643821172534386, 229.98411028224325),
    'residual-skip': (57.04760116595411, 287.36226920968704),
    'adm': (12.02769021761143, 238.72420117376413),
}


@pytest.mark.parametrize('variant', VARIANTS)
def test_outputs_match_nvidias_edm_code(variant):
    net = tiny(variant, 5, augment_dim=9)
    x, sigma, y = inputs(net)
    aug = torch.randn(3, 9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        D = net(x, sigma, y, augment_labels=aug)
    W = torch.linspace(-1, 1, D.numel(), dtype=torch.float64).reshape(D.shape)
    assert [(D * W).sum().item(), D.square().sum().item()] == pytest.approx(EDM_REFERENCE[variant], rel=1e-10)


@pytest.mark.parametrize('name', OFFICIAL)
def test_official_configurations_have_edms_parameter_counts(name):
    kw, params, entries = OFFICIAL[name]
    with torch.device('meta'):  # no memory, no init cost
        net = unet.EDMPrecond(img_resolution=int(name.split('-')[1].split('x')[0]), img_channels=3, **kw)
    assert sum(p.numel() for p in net.parameters()) == params
    assert len(net.state_dict()) == entries
    assert set(models.EDM_PRESETS) >= set(OFFICIAL)


def test_state_dict_names_are_edms():
    with torch.device('meta'):
        song = unet.EDMPrecond(img_resolution=32, img_channels=3, **OFFICIAL['cifar10-32x32-cond-ve'][0])
        adm = unet.EDMPrecond(img_resolution=64, img_channels=3, **OFFICIAL['imagenet-64x64-cond-adm'][0])
    keys = set(song.state_dict())
    for k in ['model.map_noise.freqs', 'model.map_label.weight', 'model.map_label.bias',
              'model.map_augment.weight', 'model.map_layer0.weight', 'model.map_layer1.bias',
              'model.enc.32x32_conv.weight', 'model.enc.16x16_down.conv0.resample_filter',
              'model.enc.16x16_aux_residual.weight', 'model.enc.16x16_block0.qkv.weight',
              'model.enc.16x16_block3.proj.bias', 'model.dec.8x8_in0.qkv.weight',
              'model.dec.16x16_block4.qkv.weight',
              'model.dec.32x32_aux_norm.weight', 'model.dec.32x32_aux_conv.bias',
              'model.enc.32x32_block0.skip.weight', 'model.dec.16x16_up.skip.resample_filter']:
        assert k in keys, k
    # Attention only where EDM has it; no bias where EDM has none; no condition layers by default.
    assert 'model.dec.16x16_block3.qkv.weight' not in keys and 'model.map_augment.bias' not in keys
    assert not any('step' in k or 'guidance' in k for k in keys)
    akeys = set(adm.state_dict())
    assert {'model.out_norm.weight', 'model.out_conv.weight', 'model.map_label.weight',
            'model.enc.32x32_down.skip.resample_filter', 'model.dec.8x8_block3.qkv.weight'} <= akeys
    assert 'model.map_label.bias' not in akeys and 'model.enc.32x32_down.skip.weight' not in akeys
    assert adm.model.enc['16x16_block0'].num_heads == 192 * 3 // 64  # 64 channels per head


# ------------------------------------------------------------------------------------------------
# Numerics the weights depend on
# ------------------------------------------------------------------------------------------------

def test_attention_uses_edms_interleaved_qkv_layout():
    """Reference: the qkv conv's output reshaped [B * heads, C / heads, 3, H W] (q, k, v interleaved)."""
    torch.manual_seed(0)
    blk = unet.UNetBlock(32, 32, 16, attention=True, num_heads=2, skip_scale=math.sqrt(0.5), eps=1e-6,
                         adaptive_scale=False).double()
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) / 4)
    x, emb = torch.randn(2, 32, 4, 4, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64)
    h = blk.conv0(nn.functional.silu(blk.norm0(x)))
    h = nn.functional.silu(blk.norm1(h + blk.affine(emb)[:, :, None, None]))
    h = (blk.conv1(h) + x) * math.sqrt(0.5)
    q, k, v = blk.qkv(blk.norm2(h)).reshape(2 * 2, 16, 3, 16).unbind(2)
    w = torch.softmax(torch.einsum('ncq,nck->nqk', q, k) / math.sqrt(16), dim=2)
    a = torch.einsum('nqk,nck->ncq', w, v).reshape(2, 32, 4, 4)
    expected = (blk.proj(a) + h) * math.sqrt(0.5)
    torch.testing.assert_close(blk(x, emb), expected, rtol=0, atol=1e-12)


def test_embeddings_and_label_scaling():
    x = torch.tensor([0.3, -1.2], dtype=torch.float64)
    # f_j = 10000^(-j / (C/2 - 1)) with endpoint (DDPM++), [sin, cos]; 10000^(-j / (C/2)) for ADM, [cos, sin]
    f = torch.tensor([10000 ** (-j / 3) for j in range(4)], dtype=torch.float32).double()
    pe = unet.PositionalEmbedding(8, endpoint=True, sin_first=True)(x)
    torch.testing.assert_close(pe, torch.cat([torch.sin(x[:, None] * f), torch.cos(x[:, None] * f)], 1))
    f = torch.tensor([10000 ** (-j / 4) for j in range(4)], dtype=torch.float32).double()  # ADM: no endpoint
    pe = unet.PositionalEmbedding(8)(x)
    torch.testing.assert_close(pe, torch.cat([torch.cos(x[:, None] * f), torch.sin(x[:, None] * f)], 1))
    # SongUNet feeds one-hot labels times sqrt(label_dim) to map_label.
    net, seen = tiny(label_dim=5), []
    net.model.map_label.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    x, sigma, y = inputs(net)
    net(x, sigma, y)
    torch.testing.assert_close(seen[0], nn.functional.one_hot(y, 5).double() * math.sqrt(5))


class Probe(nn.Module):
    """An inner model that records its inputs: F(x_in, c_noise) = tanh(x_in) + c_noise."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim, scale=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))
        self.seen = {}

    def forward(self, x, c_noise, class_labels, **cond):
        self.seen = dict(x=x, c_noise=c_noise, class_labels=class_labels, **cond)
        return self.scale * torch.tanh(x) + c_noise.reshape(-1, *[1] * (x.ndim - 1))


def test_preconditioning_formulas_on_any_shape():
    net = unet.EDMPrecond(img_resolution=1, img_channels=2, label_dim=4, sigma_data=0.7, model_type=Probe)
    net = net.double()
    assert unet.MODELS['Probe'] is Probe and net.init_kwargs['model_type'] == 'Probe'
    x = torch.randn(5, 2, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.1, 0.7, 5.0, 80.0], dtype=torch.float64)
    D = net(x, sigma)
    s, sd = sigma[:, None], 0.7
    c_in = 1 / torch.sqrt(s ** 2 + sd ** 2)
    F_x = torch.tanh(c_in * x) + torch.log(s) / 4
    c_skip, c_out = sd ** 2 / (s ** 2 + sd ** 2), s * sd / torch.sqrt(s ** 2 + sd ** 2)  # EDM Table 1
    torch.testing.assert_close(D, c_skip * x + c_out * F_x, rtol=1e-14, atol=0)
    torch.testing.assert_close(net.model.seen['x'], c_in * x, rtol=1e-15, atol=0)
    torch.testing.assert_close(net.model.seen['c_noise'], torch.log(sigma) / 4, rtol=1e-15, atol=0)
    assert torch.equal(net.model.seen['class_labels'], torch.zeros(5, 4, dtype=torch.float64))  # None: zeros
    # A float, a 0-d tensor and a [B] tensor of the same sigma agree; float32 stays float32.
    full = net(x, torch.full((5,), 0.5, dtype=torch.float64))
    assert torch.equal(net(x, 0.5), full) and torch.equal(net(x, torch.tensor(0.5)), full)
    assert net.float()(x.float(), 0.5).dtype == torch.float32
    with pytest.raises(ValueError, match='step'):
        net(x.float(), 0.5, step=4)


def test_class_labels_integer_one_hot_and_none():
    net = tiny('adm', label_dim=5)
    x, sigma, y = inputs(net)
    assert torch.equal(net(x, sigma, y), net(x, sigma, nn.functional.one_hot(y, 5).double()))
    assert torch.equal(net(x, sigma), net(x, sigma, torch.zeros(3, 5, dtype=torch.float64)))
    assert not torch.allclose(net(x, sigma, y), net(x, sigma))


def test_dropout_only_in_train_mode():
    net = tiny(dropout=0.5)
    x, sigma, _ = inputs(net)
    assert torch.equal(net(x, sigma), net(x, sigma))
    net.train()
    assert not torch.allclose(net(x, sigma), net(x, sigma))


def test_channels_last_and_float32_agree_with_float64():
    net = tiny('ncsnpp')
    x, sigma, _ = inputs(net)
    with torch.no_grad():
        D = net(x, sigma)
        cl = net.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), sigma)
        torch.testing.assert_close(cl, D, rtol=0, atol=1e-12)
        D32 = net.float()(x.float(), sigma.float())
    assert D32.dtype == torch.float32
    torch.testing.assert_close(D32.double(), D, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# The step (SFD-v) and guidance (Meng et al.) conditions
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant', ['ddpmpp', 'adm'])
def test_new_conditions_start_as_an_exact_no_op(variant):
    net = tiny(variant, label_dim=5).float()
    x, sigma, y = (t.float() if t.is_floating_point() else t for t in inputs(net))
    D = net(x, sigma, y)
    net.enable_step_condition()
    assert net.use_step_condition and net.model.map_step.layer0.weight.dtype == torch.float32
    assert torch.equal(net(x, sigma, y, step=4), D)
    net.enable_guidance_condition()
    step, w = torch.tensor([4, 5, 6]), torch.tensor([0.0, 1.5, 4.0])
    assert torch.equal(net(x, sigma, y, step=step, guidance=w), D)
    assert net.init_kwargs['use_step_condition'] and net.init_kwargs['use_guidance_condition']
    with pytest.raises(ValueError, match='step'):
        net(x, sigma, y, guidance=1.0)  # the step is required once the condition is on


@pytest.mark.parametrize('adaptive', [False, True])
def test_step_embedding_enters_blocks_as_in_sfd(adaptive):
    """SFD App. D.1, Alg. 12: the block's affine_step(emb_step) is added next to affine(emb); for ADM's
    scale/shift blocks the official code stacks a second FiLM. Checked with random (trained) weights."""
    torch.manual_seed(0)
    blk = unet.UNetBlock(8, 8, 12, adaptive_scale=adaptive, eps=1e-6, skip_scale=0.7).double()
    blk.affine_step = unet.Linear(12, 16 if adaptive else 8).double()
    with torch.no_grad():
        for p in blk.parameters():
            p.copy_(torch.randn_like(p) / 3)
    x, emb, emb_step = (torch.randn(*size, dtype=torch.float64) for size in ([2, 8, 4, 4], [2, 12], [2, 12]))
    silu = nn.functional.silu
    h = blk.conv0(silu(blk.norm0(x)))
    p, ps = blk.affine(emb)[:, :, None, None], blk.affine_step(emb_step)[:, :, None, None]
    if adaptive:
        (scale, shift), (scale_s, shift_s) = p.chunk(2, dim=1), ps.chunk(2, dim=1)
        h = silu(shift_s + (shift + blk.norm1(h) * (1 + scale)) * (1 + scale_s))
    else:
        h = silu(blk.norm1(h + p + ps))
    torch.testing.assert_close(blk(x, emb, emb_step), (blk.conv1(h) + x) * 0.7, rtol=0, atol=1e-12)


@pytest.mark.parametrize('variant', ['ddpmpp', 'adm'])
def test_step_and_guidance_embeddings_follow_the_noise_embedding(variant):
    net = tiny(variant).enable_step_condition().enable_guidance_condition()
    m, song = net.model, variant != 'adm'
    v = torch.tensor([4.0, 7.0], dtype=torch.float64)
    pe = unet.PositionalEmbedding(m.map_layer0.in_features, endpoint=song, sin_first=song)(v)
    silu = nn.functional.silu
    assert torch.equal(m.map_step(v), silu(m.map_step.layer1(silu(m.map_step.layer0(pe)))))
    assert torch.equal(m.map_guidance(v), m.map_guidance.layer1(silu(m.map_guidance.layer0(pe))))
    assert m.map_guidance(v).shape == (2, m.map_layer0.in_features)  # added to the noise features


def test_label_dropout_drops_whole_labels_in_training_only():
    net = tiny(label_dim=5, label_dropout=1.0)
    x, sigma, y = inputs(net)
    D_eval = net(x, sigma, y)
    net.train()
    assert torch.equal(net(x, sigma, y), net(x, sigma)) and not torch.allclose(net(x, sigma, y), D_eval)


@pytest.mark.parametrize('variant', ['ddpmpp', 'adm'])
@pytest.mark.parametrize('condition', ['step', 'guidance'])
def test_gradients_reach_the_new_layers(variant, condition):
    net = tiny(variant, label_dim=5).train()
    getattr(net, f'enable_{condition}_condition')()
    emb = getattr(net.model, f'map_{condition}')
    blocks = [b for b in net.model.modules() if isinstance(b, unet.UNetBlock)]
    last = [b.affine_step for b in blocks] if condition == 'step' else [emb.layer1]
    x, sigma, y = inputs(net)
    value = {'step': 4, 'guidance': 2.0}[condition]
    opt = torch.optim.SGD(net.parameters(), lr=0.05)

    def step():
        opt.zero_grad()
        D = net(x, sigma, y, **{condition: value})
        (D - x).square().sum().backward()
        return D.detach()

    D0 = step()
    assert all(m.weight.grad.abs().sum() > 0 for m in last)  # zero-initialised layers get gradients...
    assert emb.layer0.weight.grad.abs().sum() == 0  # ...and shield the earlier ones at first
    opt.step()
    D1 = step()
    assert not torch.allclose(D0, D1)
    assert emb.layer0.weight.grad.abs().sum() > 0  # after one update the gradient reaches every new layer
    other = {'step': 6, 'guidance': 0.0}[condition]
    assert not torch.allclose(net(x, sigma, y, **{condition: other}), D1)  # the output now depends on it


# ------------------------------------------------------------------------------------------------
# One file per concept: unet.py and solvers.py need no sibling module
# ------------------------------------------------------------------------------------------------

def test_unet_and_solvers_import_when_copied_alone(tmp_path):
    """Copied into an empty folder, each file imports and works: unet.py builds every network
    (EDM's U-Nets and the toy MLP), solvers.py samples a closed-form denoiser."""
    import shutil
    import subprocess
    import sys

    from conftest import ROOT
    for name, code in (('unet.py', 'import unet\n'
                        'for kw in [dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1],'
                        ' num_blocks=1, attn_resolutions=[]), dict(img_resolution=8, img_channels=3,'
                        ' model_type="DhariwalUNet", model_channels=64, channel_mult=[1], num_blocks=1,'
                        ' attn_resolutions=[]), dict(img_resolution=1, img_channels=2, model_type="ToyMLP")]:\n'
                        '    print(type(unet.EDMPrecond(**kw).model).__name__)'),
                       ('solvers.py', 'import solvers, torch\n'
                        'x = solvers.sample(solvers.gaussian_denoiser(0.0, 1.0), torch.zeros(2, 2),'
                        ' solvers.time_schedule(4), "heun")\nprint(x.shape)')):
        folder = tmp_path / name[:-3]
        folder.mkdir()
        shutil.copy(ROOT / name, folder / name)
        out = subprocess.run([sys.executable, '-c', code], cwd=folder, capture_output=True, text=True,
                             env={'PATH': '', 'PYTHONPATH': ''})
        assert out.returncode == 0, out.stderr
        if name == 'unet.py':
            assert out.stdout.split() == ['SongUNet', 'DhariwalUNet', 'ToyMLP']
