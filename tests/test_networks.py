"""DDPM++ SongUNet + EDM preconditioning: EDM's parameter counts, shapes, closed forms, attention vs a naive
implementation, resampling vs EDM's filter convolutions, gradients, dropout, autocast, bad input."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dsd_fast.networks import PRESETS, EDMPrecond, NetworkConfig, SongUNet, UNetBlock, build_network
from dsd_fast.networks.unet import Conv2d, PositionalEmbedding


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def perturb_(net, std=0.05):
    """EDM zero-ish inits (conv1, proj, aux_conv at 1e-5) would hide most of the net: randomise all."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * std)
    return net


def edm_coefficients(sigma):
    sigma_data = 0.5
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, c_in, sigma.log() / 4


# ---------------------------------------------------------------------------------------------------------
# EDM's parameter counts (EDM logs 61,805,571 at 64^2 with its 9 x 128 augment embedding, bias-free).


def test_param_count_ddpmpp_64():
    net = build_network("afhq")
    assert n_params(net) == 61_805_571 - 9 * 128 == 61_804_419
    for name in ("ffhq", "celebahq"):  # the same network, other dropout
        assert dataclasses.replace(PRESETS[name], dropout=0.25) == PRESETS["afhq"]
    sd = net.model.state_dict()
    # EDM module names and shapes (so an EDM checkpoint maps key for key).
    assert sd["enc.64x64_conv.weight"].shape == (128, 3, 3, 3)
    assert sd["enc.16x16_block3.qkv.weight"].shape == (768, 256, 1, 1)
    assert sd["enc.32x32_down.skip.weight"].shape == (128, 128, 1, 1)
    assert sd["dec.8x8_in0.proj.weight"].shape == (256, 256, 1, 1)
    assert "dec.8x8_in1.qkv.weight" not in sd
    assert sd["dec.16x16_block4.qkv.weight"].shape == (768, 256, 1, 1)
    assert "dec.16x16_block3.qkv.weight" not in sd
    assert sd["dec.64x64_block0.norm0.weight"].shape == (256 + 128,)
    assert sd["dec.64x64_aux_conv.weight"].shape == (3, 128, 3, 3)
    assert sd["map_layer0.weight"].shape == (512, 128)


def test_param_count_ddpmpp_32_and_forward():
    net = build_network("cifar10").eval()
    assert n_params(net) == 55_732_739
    attn = [name for name, m in net.model.named_modules() if isinstance(m, UNetBlock) and m.num_heads]
    assert attn == ["enc.16x16_block0", "enc.16x16_block1", "enc.16x16_block2", "enc.16x16_block3",
                    "dec.8x8_in0", "dec.16x16_block4"]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        D_x = net(x, torch.tensor([1.3]))
    assert D_x.shape == x.shape and D_x.dtype == torch.float32 and D_x.isfinite().all()


# ---------------------------------------------------------------------------------------------------------
# Presets and config.


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_forward_shape_every_preset(name):
    config = PRESETS[name]
    # Width and depth do not change shapes: keep every preset's topology (resolution, padding, levels,
    # attention) but narrow it so the 62M-parameter presets run in milliseconds.
    net = build_network(name, model_channels=16, num_blocks=1)
    assert net.config.channel_mult == config.channel_mult and net.config.dropout == config.dropout
    B = (1, 3)[len(name) % 2]
    C, R = config.in_channels, config.img_resolution
    x = torch.randn(B, C, R, R)
    D_x = net(x, torch.rand(B) * 5 + 0.01)
    assert D_x.shape == (B, C, R, R) and D_x.dtype == torch.float32 and D_x.isfinite().all()


def test_preset_values():
    assert {n: c.dropout for n, c in PRESETS.items() if n in ("cifar10", "afhq", "ffhq", "celebahq")} == {
        "cifar10": 0.13, "afhq": 0.25, "ffhq": 0.05, "celebahq": 0.15}
    fm = PRESETS["fashion-mnist"]
    assert (fm.img_resolution, fm.resolution, fm.in_channels, fm.channel_mult) == (28, 32, 1, (2, 2, 2))


def test_config_json_round_trip_and_overrides():
    config = PRESETS["fashion-mnist"]
    assert NetworkConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    net = build_network(config, dropout=0.3, num_blocks=1, model_channels=8)
    assert net.config == dataclasses.replace(config, dropout=0.3, num_blocks=1, model_channels=8)
    assert all(b.dropout == 0.3 for b in net.modules() if isinstance(b, UNetBlock))


def test_cpu_tiny_is_small():
    net = build_network("cpu-tiny")
    assert n_params(net) < 500_000
    assert PRESETS["cpu-tiny"].resolution == 32


# ---------------------------------------------------------------------------------------------------------
# EDM preconditioning.


def test_precond_closed_form_and_scalar_sigma():
    net = perturb_(build_network("cpu-tiny")).eval()
    B = 3
    x = torch.randn(B, 3, 32, 32)
    sigma = torch.exp(torch.randn(B) * 2)
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
    r = lambda v: v.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        expected = r(c_skip) * x + r(c_out) * net.model(r(c_in) * x, c_noise)
        torch.testing.assert_close(net(x, sigma), expected, rtol=1e-5, atol=1e-5)
        s = float(sigma[1])
        by_scalar = net(x, s)
        torch.testing.assert_close(by_scalar, net(x, torch.full([B], s)), rtol=0, atol=0)
        torch.testing.assert_close(by_scalar, net(x, torch.tensor(s)), rtol=0, atol=0)


def test_precond_identity_at_small_sigma():
    net = perturb_(build_network("cpu-tiny")).eval()
    B = 7
    x = torch.rand(B, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        D_x = net(x, torch.full([B], 1e-8))
        D_1 = net(x, torch.ones(B))
    # D - x = c_out F with c_out ~ sigma = 1e-8: gone at fp32; at sigma = 1 the (perturbed) net matters.
    torch.testing.assert_close(D_x, x, rtol=0, atol=1e-6)
    assert (D_1 - x).abs().max() > 1e-2


def test_precond_large_sigma_is_c_out_F():
    # sigma -> inf: c_skip -> 0, c_out -> sigma_data, so D -> 0.5 F(c_in x) regardless of x's scale.
    net = perturb_(build_network("cpu-tiny")).eval()
    x = torch.randn(2, 3, 32, 32) * 1e3
    sigma = torch.full([2], 1e3)
    with torch.no_grad():
        F_x = net.model(x / (sigma[:, None, None, None] ** 2 + 0.25).sqrt(), sigma.log() / 4)
        torch.testing.assert_close(net(x, sigma), 0.25 / (1e6 + 0.25) * x + 0.5 / (1 + 0.25e-6) ** 0.5 * F_x,
                                   rtol=1e-5, atol=1e-4)


def test_precond_padding_28_to_32():
    net = perturb_(build_network("fashion-mnist", model_channels=16, num_blocks=1)).eval()
    assert net.model.img_resolution == 32 and net.pad == (2, 2, 2, 2)
    B = 3
    x = torch.randn(B, 1, 28, 28)
    sigma = torch.rand(B) * 3 + 0.05
    c_skip, c_out, c_in, c_noise = edm_coefficients(sigma)
    r = lambda v: v.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        F_pad = net.model(F.pad(r(c_in) * x, (2, 2, 2, 2)), c_noise)
        expected = r(c_skip) * x + r(c_out) * F_pad[:, :, 2:30, 2:30]
        D_x = net(x, sigma)
    assert D_x.shape == (B, 1, 28, 28)
    torch.testing.assert_close(D_x, expected, rtol=1e-5, atol=1e-5)


def test_precond_fp64_and_batch_independence():
    net = perturb_(build_network("cpu-tiny")).double().eval()
    B = 3
    x = torch.randn(B, 3, 32, 32, dtype=torch.float64)
    sigma = torch.rand(B, dtype=torch.float64) * 4 + 0.02
    with torch.no_grad():
        D_x = net(x, sigma)
        one_by_one = torch.cat([net(x[i:i + 1], sigma[i:i + 1]) for i in range(B)])
    assert D_x.dtype == torch.float64
    # GroupNorm is per sample: an image's denoising never depends on its batch mates.
    torch.testing.assert_close(D_x, one_by_one, rtol=1e-12, atol=1e-12)


def test_precond_autocast_bf16_keeps_fp32_combination():
    net = perturb_(build_network("cpu-tiny")).eval()
    x = torch.randn(3, 3, 32, 32)
    sigma = torch.tensor([0.01, 0.5, 20.0])
    with torch.no_grad():
        ref = net(x, sigma)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            D_x = net(x, sigma)
    assert D_x.dtype == torch.float32
    # At sigma = 0.01, D = c_skip x + 0.01 F: the bf16 error of F is scaled by c_out, so the result stays
    # fp32-close to x even though F ran in bf16 (this fails if the combination itself were done in bf16).
    torch.testing.assert_close(D_x[0], ref[0], rtol=0, atol=2e-3)
    err = (D_x - ref).abs().max() / ref.abs().max()
    assert err < 5e-2, err


# ---------------------------------------------------------------------------------------------------------
# Building blocks against naive / EDM formulations.


def naive_attention(block, x):
    """EDM's formulation: per head, w = softmax_k(q^T k / sqrt(c)), a = v w^T; qkv layout (head, c, 3)."""
    B, C, H, W = x.shape
    h = block.num_heads
    q, k, v = block.qkv(x).reshape(B * h, C // h, 3, H * W).unbind(2)
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(C // h)).softmax(dim=2)
    return torch.einsum("nqk,nck->ncq", w, v).reshape(B, C, H, W)


@pytest.mark.parametrize("num_heads,shape", [(1, (1, 8, 5, 7)), (2, (3, 16, 8, 8)), (4, (7, 32, 4, 3)),
                                             (1, (2, 64, 16, 16))])
def test_attention_sdpa_matches_naive(num_heads, shape):
    B, C, H, W = shape
    block = UNetBlock(C, C, emb_channels=8, attention=True, num_heads=num_heads).double()
    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    a = block.attention(x)
    a_ref = naive_attention(block, x)
    torch.testing.assert_close(a, a_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(a)
    grads = torch.autograd.grad(a, [x, block.qkv.weight, block.qkv.bias], g)
    grads_ref = torch.autograd.grad(a_ref, [x, block.qkv.weight, block.qkv.bias], g)
    for u, v in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-10)


def test_attention_fp32_matches_naive():
    block = UNetBlock(64, 64, emb_channels=8, attention=True)
    with torch.no_grad():
        block.qkv.weight.mul_(3)  # sharper softmax
        x = torch.randn(2, 64, 16, 16)
        torch.testing.assert_close(block.attention(x), naive_attention(block, x), rtol=1e-4, atol=1e-5)


def test_attention_heads_must_divide_channels():
    with pytest.raises(ValueError, match="num_heads"):
        UNetBlock(24, 24, emb_channels=8, attention=True, num_heads=5)


@pytest.mark.parametrize("B,C,R", [(1, 3, 8), (3, 5, 6), (2, 4, 28)])
def test_resampling_matches_edm_filter(B, C, R):
    # EDM: resample_filter [1,1] -> f = outer(f, f) / sum(f)^2, depthwise stride-2 conv (down) or stride-2
    # transposed conv with 4 f (up), then the kxk conv.
    f = torch.full((1, 1, 2, 2), 0.25, dtype=torch.float64)
    x = torch.randn(B, C, R, R, dtype=torch.float64)
    for kernel in (1, 3):
        down = Conv2d(C, 2 * C, kernel, down=True).double()
        up = Conv2d(C, 2 * C, kernel, up=True).double()
        for conv, r in ((down, F.conv2d(x, f.tile(C, 1, 1, 1), groups=C, stride=2)),
                        (up, F.conv_transpose2d(x, 4 * f.tile(C, 1, 1, 1), groups=C, stride=2))):
            with torch.no_grad():
                conv.bias.normal_()
            expected = F.conv2d(r, conv.weight, conv.bias, padding=kernel // 2)
            torch.testing.assert_close(conv(x), expected, rtol=1e-12, atol=1e-12)


def test_positional_embedding_closed_form():
    n = 16
    c_noise = torch.randn(5, dtype=torch.float64) * 3
    emb = PositionalEmbedding(n)(c_noise)
    i = torch.arange(n // 2, dtype=torch.float64)
    arg = c_noise[:, None] * 10000.0 ** (-i / (n // 2 - 1))  # endpoint: the last frequency is 1/10000
    torch.testing.assert_close(emb, torch.cat([arg.sin(), arg.cos()], 1), rtol=1e-12, atol=1e-12)


def test_weight_init_as_edm():
    net = build_network("cpu-tiny")
    seen = set()
    for name, m in net.model.named_modules():
        if not isinstance(m, Conv2d):
            continue
        out_c, in_c, k, _ = m.weight.shape
        zero = name.endswith(("conv1", "proj", "aux_conv"))
        gain = 1e-5 if zero else math.sqrt(0.2) if name.endswith("qkv") else 1.0
        seen.add(gain)
        bound = gain * math.sqrt(6 / ((in_c + out_c) * k * k))
        w = m.weight.detach().abs()
        # U(-bound, bound): max near the bound, mean |w| = bound / 2 (every conv here has >= 256 weights).
        assert w.max() <= bound and w.max() > 0.5 * bound and float(w.mean()) == pytest.approx(bound / 2, rel=0.3)
        assert (m.bias == 0).all()
    assert seen == {1e-5, math.sqrt(0.2), 1.0}
    bound = math.sqrt(6 / (16 + 64))
    assert net.model.map_layer0.weight.abs().max() <= bound and (net.model.map_layer0.bias == 0).all()


# ---------------------------------------------------------------------------------------------------------
# Gradients, determinism, dropout.


def test_gradients_reach_every_parameter_and_the_input():
    net = perturb_(build_network("cpu-tiny"))
    B = 3
    x = torch.randn(B, 3, 32, 32, requires_grad=True)
    net(x, torch.rand(B) * 2 + 0.1).square().sum().backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert x.grad.abs().sum() > 0


def test_gradcheck_input_and_sigma_fp64():
    config = NetworkConfig(img_resolution=6, net_resolution=8, in_channels=2, model_channels=8,
                           channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)
    net = perturb_(EDMPrecond(config).double(), std=0.2).eval()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(2, dtype=torch.float64) + 0.2).requires_grad_()
    assert torch.autograd.gradcheck(net, (x, sigma), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_eval_is_deterministic():
    net = perturb_(build_network("cpu-tiny", dropout=0.5)).eval()
    x = torch.randn(3, 3, 32, 32)
    sigma = torch.rand(3) + 0.1
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma), net(x, sigma), rtol=0, atol=0)


def test_dropout_active_in_train_mode_only():
    net = perturb_(build_network("cpu-tiny", dropout=0.5))
    x = torch.randn(3, 3, 32, 32)
    sigma = torch.rand(3) + 0.1
    with torch.no_grad():
        a, b = net.train()(x, sigma), net.train()(x, sigma)
        e = net.eval()(x, sigma)
    assert (a - b).abs().max() > 1e-3 and (a - e).abs().max() > 1e-3
    net_nodrop = build_network("cpu-tiny", dropout=0.0)
    net_nodrop.load_state_dict(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(net_nodrop.train()(x, sigma), e, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_raises():
    net = build_network("cpu-tiny")
    with pytest.raises(ValueError, match="x: expected shape"):
        net(torch.randn(2, 3, 28, 28), torch.ones(2))
    with pytest.raises(ValueError, match="x: expected shape"):
        net(torch.randn(2, 1, 32, 32), torch.ones(2))
    with pytest.raises(ValueError, match="x: expected shape"):
        net(torch.randn(3, 32, 32), torch.ones(3))
    with pytest.raises(ValueError, match="sigma: expected"):
        net(torch.randn(2, 3, 32, 32), torch.ones(3))
    with pytest.raises(ValueError, match="sigma: expected"):
        net(torch.randn(2, 3, 32, 32), torch.ones(2, 1, 1, 1))
    with pytest.raises(ValueError, match="preset_or_config"):
        build_network("cifar100")
    with pytest.raises(ValueError, match="overrides"):
        build_network("cpu-tiny", channels=3)
    with pytest.raises(ValueError, match="channel_mult"):
        NetworkConfig(img_resolution=32, in_channels=3, channel_mult=())
    with pytest.raises(ValueError, match="net_resolution"):
        NetworkConfig(img_resolution=32, in_channels=3, net_resolution=28)
    with pytest.raises(ValueError, match="net_resolution"):
        NetworkConfig(img_resolution=28, in_channels=3, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="dropout"):
        NetworkConfig(img_resolution=32, in_channels=3, dropout=1.0)
    with pytest.raises(ValueError, match="in_channels"):
        NetworkConfig(img_resolution=32, in_channels=0)
    with pytest.raises(ValueError, match="model_channels"):
        build_network("cpu-tiny", model_channels=6)
    with pytest.raises(ValueError, match="img_resolution"):
        SongUNet(img_resolution=20, in_channels=3, out_channels=3, channel_mult=(1, 2, 2, 2))
