"""The UNet: shapes across configurations, the attention kernels agree, memory formats agree, preset size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddpmctl.config import ModelConfig, load_yaml
from ddpmctl.model import Attention, UNet, attend, attention_resolutions, count_parameters

TINY = dict(starting_channels=8, channel_multipliers=(1, 2), num_res_blocks=1, num_heads=2)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(img_size=8),
        dict(img_size=16, channel_multipliers=(1, 2, 2), attention_resolutions=(8,)),
        dict(img_size=16, num_res_blocks=2, bottleneck_blocks=1, num_heads=1, dropout=0.1),
        dict(img_size=8, starting_channels=12, num_heads=5, attention_resolutions=()),  # heads not dividing C
    ],
)
def test_output_has_the_input_shape(overrides):
    cfg = ModelConfig(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = UNet(cfg)
    for batch in (1, 3):
        x = torch.randn(batch, 3, cfg.img_size, cfg.img_size)
        out = model(x, torch.randint(0, 1000, (batch,)))
        assert out.shape == x.shape
        assert torch.isfinite(out).all()


def test_default_attention_sits_below_the_image_size():
    assert attention_resolutions(ModelConfig(img_size=32, channel_multipliers=(1, 2, 2))) == (16, 8)
    assert attention_resolutions(ModelConfig(img_size=32, attention_resolutions=(16,))) == (16,)


def test_ddpm_cifar10_preset_keeps_its_size_and_keys():
    with torch.device("meta"):
        model = UNet(load_yaml("configs/cifar10_ddpm.yaml").model)
    assert count_parameters(model) == 35_746_307  # the DDPM paper's 35.7M
    keys = model.state_dict().keys()
    assert len(keys) == 304
    # checkpoints written before the token-layout attention still load: the 1x1 convolutions stay Conv2d
    assert model.mid[0].attn.qkv.weight.shape == (768, 256, 1, 1)
    assert "mid.0.attn.proj.weight" in keys and "up.0.res.skip.weight" in keys


def reference_attention(module: Attention, x: torch.Tensor) -> torch.Tensor:
    """The plain formulation: 1x1 conv to q, k, v over (B, C, HW), softmax(q k^T / sqrt(d)) v, 1x1 conv out."""
    b, c, h, w = x.shape
    heads = module.num_heads
    qkv = module.qkv(module.norm(x)).reshape(b, 3, heads, c // heads, h * w)
    q, k, v = qkv.unbind(1)  # (B, heads, d, HW)
    weights = torch.softmax(torch.einsum("bhdn,bhdm->bhnm", q, k) / (c // heads) ** 0.5, dim=-1)
    out = torch.einsum("bhnm,bhdm->bhdn", weights, v).reshape(b, c, h, w)
    return x + module.proj(out)


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_matches_the_plain_formulation_values_and_gradients(heads):
    torch.manual_seed(0)
    module = Attention(32, heads)
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    fast = module(x)
    grads_fast = torch.autograd.grad(fast.square().sum(), [x, module.qkv.weight, module.proj.weight])
    ref = reference_attention(module, x)
    grads_ref = torch.autograd.grad(ref.square().sum(), [x, module.qkv.weight, module.proj.weight])
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_manual_attention_path_matches_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    torch.testing.assert_close(attend(q, k, v, manual=True), attend(q, k, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attend(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_channels_last_gives_the_same_outputs_and_gradients():
    cfg = ModelConfig(**{**TINY, "img_size": 8})
    torch.manual_seed(0)
    model = UNet(cfg)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 700])
    out = model(x, t)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    model_cl = model.to(memory_format=torch.channels_last)
    out_cl = model_cl(x.contiguous(memory_format=torch.channels_last), t)
    grads_cl = torch.autograd.grad(out_cl.square().mean(), list(model_cl.parameters()))
    torch.testing.assert_close(out_cl, out, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_cl, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_bf16_autocast_forward_keeps_shape_and_is_close():
    cfg = ModelConfig(**{**TINY, "img_size": 8})
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        ref = model(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t)
    assert low.shape == ref.shape
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_spelled_out_attention_matches_the_fused_kernel_and_is_chosen_for_cpu_bf16():
    from ddpmctl.model import attend, spell_out_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 16) for _ in range(3))
    torch.testing.assert_close(attend(q, k, v, manual=True), attend(q, k, v), atol=1e-5, rtol=1e-4)
    assert not spell_out_attention(q)  # fp32 on the CPU: the fused kernel (level speed, less memory)
    assert spell_out_attention(q.bfloat16())  # bf16 on the CPU: matmuls (its flash backward is slow there)
    assert not spell_out_attention(torch.randn(1, 1, 4096, 8).bfloat16())  # long sequences keep the fused kernel


def _saved_bytes(model: UNet, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The output and the bytes autograd keeps for backward (outside checkpointed blocks: their inputs only)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(x, t)
    return out, sum(saved.values())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_and_keeps_less(monkeypatch):
    cfg = ModelConfig(**{**TINY, "img_size": 16, "attention_resolutions": (8,), "dropout": 0.1})  # dropout: RNG replayed
    torch.manual_seed(0)
    model = UNet(cfg)
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([1, 400, 999])
    results = {}
    for on in (False, True):
        model.gradient_checkpointing = on
        torch.manual_seed(5)
        out, kept = _saved_bytes(model, x, t)
        grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
        results[on] = (out.detach(), grads, kept, torch.rand(1))  # the RNG after backward, too
    (out, grads, kept, after), (out_c, grads_c, kept_c, after_c) = results[False], results[True]
    assert torch.equal(out, out_c) and torch.equal(after, after_c)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_c, strict=True))
    assert kept_c < 0.5 * kept  # the blocks' insides are recomputed in backward, not kept
    def no_checkpoint(*_a, **_k):
        raise AssertionError("checkpointed without gradients")

    monkeypatch.setattr("ddpmctl.model.checkpoint", no_checkpoint)
    with torch.no_grad():  # sampling (the EMA copy too): nothing is saved, so nothing is checkpointed
        assert model(x, t).shape == x.shape
