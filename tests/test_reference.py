"""The PyTorch references (the spec) against independent dense formulas and diffusers' own code."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import gaussian_blur_2d

from sagfast import ops
from sagfast.attention.lse import lse_chunked, sdpa_with_lse
from sagfast.attention.processors import SAGCaptureProcessor


def dense_mass(q, k, scale):
    return torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, dim=-1).sum(2).mean(1)


@pytest.mark.parametrize("b, h, n, d", [(1, 8, 64, 40), (3, 2, 35, 64), (2, 5, 96, 160)])
def test_attention_mass_ref_matches_dense_softmax(b, h, n, d):
    g = torch.Generator().manual_seed(n)
    # Non-contiguous [B, H, N, D] views, as the capture processor passes them.
    q = torch.randn(b, n, h, d, generator=g).transpose(1, 2)
    k = torch.randn(b, n, h, d, generator=g).transpose(1, 2)
    scale = d**-0.5
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * scale, dim=-1)
    mass = ops.attention_mass_ref(q, k, lse, scale)
    assert mass.dtype == torch.float32 and mass.shape == (b, n)
    torch.testing.assert_close(mass.double(), dense_mass(q, k, scale), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass.mean(1), torch.ones(b), rtol=1e-5, atol=1e-5)


def test_attention_mass_ref_tiles_queries(monkeypatch):
    import importlib

    am = importlib.import_module("sagfast.ops.attention_mass")  # the module, not the function of that name

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 50, 16, generator=g), torch.randn(2, 3, 50, 16, generator=g)
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * 0.25, dim=-1)
    whole = am.attention_mass_ref(q, k, lse, 0.25)
    monkeypatch.setattr(am, "TILE_ELEMENTS", 2 * 3 * 50 * 7)  # 7 query rows per tile, a ragged last tile
    torch.testing.assert_close(am.attention_mass_ref(q, k, lse, 0.25), whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sdpa_with_lse_on_cpu(dtype):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 37, 40, generator=g).to(dtype) for _ in range(3))
    out, lse = sdpa_with_lse(q, k, v, 0.2)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.2), rtol=tol, atol=tol)
    want = torch.logsumexp(q.float() @ k.float().transpose(-1, -2) * 0.2, dim=-1)
    assert lse.dtype == torch.float32
    torch.testing.assert_close(lse, want, rtol=tol, atol=tol)
    torch.testing.assert_close(lse_chunked(q, k, 0.2), want, rtol=tol, atol=tol)


def test_capture_processor_output_and_mass():
    torch.manual_seed(0)
    attn = Attention(query_dim=64, heads=4, dim_head=16).eval()
    x = torch.randn(3, 6 * 5, 64)
    with torch.no_grad():
        stock = AttnProcessor2_0()(attn, x)
        proc = SAGCaptureProcessor(2)
        out = proc(attn, x)
        torch.testing.assert_close(out, stock, rtol=1e-6, atol=1e-6)
        q = attn.to_q(x[:2]).view(2, 30, 4, 16).transpose(1, 2)
        k = attn.to_k(x[:2]).view(2, 30, 4, 16).transpose(1, 2)
    assert proc.mass.shape == (2, 30)
    torch.testing.assert_close(proc.mass.double(), dense_mass(q, k, attn.scale), rtol=1e-5, atol=1e-5)


def test_mask_layout_is_the_true_map():
    mass = torch.arange(12.0).reshape(1, 12) / 6  # values 0 .. 1.83 on a 3x4 map
    mask = ops.sag_mask_ref(mass, 1.0, (3, 4))
    assert mask.shape == (1, 3, 4)
    assert mask.flatten().tolist() == [v > 1.0 for v in mass.flatten().tolist()]
    with pytest.raises(ValueError, match=r"mass must be \[B, h\*w\] = \[B, 10\] for map 2x5; got \(1, 12\)"):
        ops.sag_mask_ref(mass, 1.0, (2, 5))


@pytest.mark.parametrize("h_in, w_in, h_out, w_out", [(4, 3, 16, 12), (3, 5, 7, 11), (8, 8, 15, 15)])
def test_upsample_mask_by_index(h_in, w_in, h_out, w_out):
    mask = torch.rand(2, h_in, w_in, generator=torch.Generator().manual_seed(h_out)) > 0.5
    up = ops.upsample_mask_ref(mask, h_out, w_out)
    assert up.shape == (2, 1, h_out, w_out)
    for i in range(h_out):
        for j in range(w_out):
            assert torch.equal(up[:, 0, i, j], mask[:, i * h_in // h_out, j * w_in // w_out])


@pytest.mark.parametrize("shape, map_hw", [((2, 4, 16, 12), (8, 6)), ((3, 4, 13, 9), (7, 5)), ((1, 3, 5, 5), (5, 5))])
def test_degrade_ref_matches_diffusers_blur_and_the_formula(shape, map_hw):
    g = torch.Generator().manual_seed(sum(shape))
    x0, eps = torch.randn(*shape, generator=g) * 3, torch.randn(*shape, generator=g)
    mask = torch.rand(shape[0], *map_hw, generator=g) > 0.5
    abar = torch.rand(shape[0], generator=g) * 0.9 + 0.05
    got = ops.degrade_ref(x0, mask, eps, abar, 9, 1.0)
    m = F.interpolate(mask[:, None].float(), shape[2:]) if shape[2] % map_hw[0] == 0 else ops.upsample_mask_ref(mask, *shape[2:]).float()
    x0d = gaussian_blur_2d(x0, 9, 1.0) * m + x0 * (1 - m)
    a = abar.view(-1, 1, 1, 1)
    want = a.sqrt() * x0d + (1 - a).sqrt() * eps
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_degrade_keeps_unmasked_pixels_exactly():
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    abar = torch.tensor([1.0])
    assert torch.equal(ops.degrade_ref(x0, mask, eps, abar, 9, 1.0), x0)


def test_combine_ref_adds_the_sag_term_to_every_chunk():
    o, guide, deg = torch.randn(6, 4, 5, 3), torch.randn(3, 4, 5, 3), torch.randn(3, 4, 5, 3)
    out = ops.combine_ref(o, guide, deg, 0.75)
    torch.testing.assert_close(out[:3], o[:3] + 0.75 * (guide - deg))
    torch.testing.assert_close(out[3:], o[3:] + 0.75 * (guide - deg))
    # The pipeline's CFG line on these outputs gives cfg + s * (guide - deg).
    g = 7.5
    cfg_line = out[:3] + g * (out[3:] - out[:3])
    torch.testing.assert_close(cfg_line, o[:3] + g * (o[3:] - o[:3]) + 0.75 * (guide - deg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.degrade_ref(torch.randn(1, 4, 8, 8), torch.ones(2, 4, 4), torch.randn(1, 4, 8, 8), torch.ones(1)), "mask must be"),
        (lambda: ops.degrade_ref(torch.randn(1, 4, 8, 8), torch.ones(1, 4, 4), torch.randn(1, 4, 8, 9), torch.ones(1)), "eps must have"),
        (
            lambda: ops.degrade_ref(torch.randn(1, 4, 8, 8), torch.ones(1, 4, 4), torch.randn(1, 4, 8, 8), torch.tensor(0.5)),
            "abar must be a",
        ),
        (lambda: ops.attention_mass_ref(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 8), 1.0), "one shape"),
        (lambda: ops.combine_ref(torch.randn(5, 4), torch.randn(2, 4), torch.randn(2, 4), 1.0), r"o must be \[n\*B"),
        (
            lambda: ops.attention_mass(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8), 1.0, backend="nope"),
            "unknown backend 'nope'",
        ),
    ],
)
def test_op_input_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
