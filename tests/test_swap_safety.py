"""swap_modules on models it does not fully know: the same numbers or a clear refusal, never a broken model.

Each case compares the swapped model's outputs and gradients with the unswapped model's by the
numerics rule (against a float64 copy), and checks what a user relies on besides the numbers:
masks, hooks, FX tracing, TorchScript's refusal, pickling, atomicity, no state shared across
models, and a summary that says what happened.
"""

import copy
import io

import pytest
import torch
from torch import nn

import vit_kernels
from vit_kernels.nn import FlashAttention, FusedLayerNorm
from swap_checks import check_swap_by_rule, perturbed
from vit_kernels.testing import kernel_device, output_and_grads

timm = pytest.importorskip("timm")
DEVICE = kernel_device()
SMALL = dict(num_classes=10, img_size=64, depth=2)


def _timm(name="vit_tiny_patch16_224", **config):
    return perturbed(timm.create_model(name, pretrained=False, **{**SMALL, **config}))


def _images(batch=2, size=64):
    images = torch.randn(batch, 3, size, size, device=DEVICE)
    return lambda m, dtype: m(images.to(dtype))


# ---- timm: models the swap knows only in part ------------------------------------------------------


TIMM_PARTLY_KNOWN = {
    # (model name, config): what must be left alone
    "diff-attention": ("vit_tiny_patch16_224", dict(attn_layer="diff"), "DiffAttention is not timm's Attention"),
    "hybrid": ("vit_tiny_r_s16_p8_224", dict(), "HybridEmbed is not timm's PatchEmbed"),
    "parallel-scaling": ("vit_base_patch16_xp_224", dict(embed_dim=192, num_heads=3),
                         "ParallelScalingBlock is not timm's pre-LN Block"),
    "parallel-things": ("vit_small_patch16_18x2_224", dict(embed_dim=192, num_heads=3),
                        "ParallelThingsBlock is not timm's pre-LN Block"),
    "res-post": ("vit_base_patch16_rpn_224", dict(embed_dim=192, num_heads=3),
                 "ResPostBlock is not timm's pre-LN Block"),
}


@pytest.mark.parametrize("case", list(TIMM_PARTLY_KNOWN), ids=list(TIMM_PARTLY_KNOWN))
def test_timm_models_known_in_part_swap_what_they_can(seed, case):
    name, config, left = TIMM_PARTLY_KNOWN[case]
    original = _timm(name, **config)
    keys = list(original.state_dict())
    model, summary = check_swap_by_rule(original, _images(), train=True)
    assert left in str(summary), str(summary)
    assert list(model.state_dict()) == keys
    if case == "diff-attention":
        assert not any(isinstance(m, FlashAttention) for m in model.modules())
    if case == "parallel-things":  # its inner timm Attention modules are still swapped
        assert any(isinstance(m, FlashAttention) for m in model.modules()), str(summary)
    if case == "parallel-scaling":  # RmsNorm models say their norms were left alone
        assert "RmsNorm is not a LayerNorm this swap fuses" in str(summary)


@pytest.mark.parametrize("name", ["vit_relpos_small_patch16_224", "eva02_tiny_patch14_224"])
def test_timm_models_of_other_classes_are_left_alone(seed, name):
    model = timm.create_model(name, pretrained=False, num_classes=10, img_size=64, depth=2).eval()
    classes = {path: type(m) for path, m in model.named_modules()}
    same, summary = vit_kernels.swap_modules(model)
    assert same is model and {path: type(m) for path, m in model.named_modules()} == classes
    assert "not a supported model" in str(summary)


def test_a_block_called_with_a_positional_mask_honours_it(seed):
    original = _timm().eval()
    swapped, _ = vit_kernels.swap_modules(copy.deepcopy(original))
    x = torch.randn(2, 5, 192, device=DEVICE)
    mask = torch.ones(5, 5, dtype=torch.bool, device=DEVICE).tril()
    want = original.blocks[0](x, mask)
    got = swapped.blocks[0](x, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(swapped.blocks[0](x), got, atol=1e-3)  # the mask was not dropped
    # forward_features and forward_intermediates with a mask take timm's per-block path, same numbers
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    mask = torch.ones(17, 17, dtype=torch.bool, device=DEVICE).tril()
    torch.testing.assert_close(swapped.forward_features(images, attn_mask=mask),
                               original.forward_features(images, attn_mask=mask), rtol=1e-4, atol=1e-5)


def test_a_failed_swap_leaves_the_model_as_it_was(seed, monkeypatch):
    from vit_kernels.swap import _class_swap

    model = _timm(init_values=0.1).eval()
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    want = model(images)
    classes = {path: type(m) for path, m in model.named_modules()}
    attributes = {path: set(vars(m)) for path, m in model.named_modules()}
    real_apply = _class_swap.Plan.apply

    def failing_apply(plan, summary):
        victim = plan.changes[len(plan.changes) // 2]  # half the changes made, then one fails

        def boom():
            raise RuntimeError("planted failure")

        victim.apply = boom
        real_apply(plan, summary)

    monkeypatch.setattr(_class_swap.Plan, "apply", failing_apply)
    with pytest.raises(RuntimeError, match="planted failure"):
        vit_kernels.swap_modules(model)
    assert {path: type(m) for path, m in model.named_modules()} == classes
    assert {path: set(vars(m)) for path, m in model.named_modules()} == attributes
    torch.testing.assert_close(model(images), want, rtol=0, atol=0)


def test_hooks_on_blocks_and_attention_fire_as_before(seed):
    original = _timm(init_values=0.1).eval()
    swapped, _ = vit_kernels.swap_modules(copy.deepcopy(original))
    images = torch.randn(2, 3, 64, 64, device=DEVICE)

    def record(model):
        seen = []
        handles = [model.blocks[i].register_forward_hook(lambda m, a, out: seen.append(("block", a[0], out)))
                   for i in range(len(model.blocks))]
        handles.append(model.blocks[1].attn.register_forward_hook(lambda m, a, out: seen.append(("attn", a[0], out))))
        logits = model(images)
        for handle in handles:
            handle.remove()
        return logits, seen

    want_logits, want = record(original)
    got_logits, got = record(swapped)
    assert [kind for kind, _, _ in got] == [kind for kind, _, _ in want]
    for (_, a_in, a_out), (_, b_in, b_out) in zip(got, want):
        torch.testing.assert_close(a_in, b_in, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a_out, b_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    # a hook registered before the swap stays (same module objects)
    model = _timm().eval()
    calls = []
    model.blocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    vit_kernels.swap_modules(model)
    model(images)
    assert calls == [1] and isinstance(model.blocks[0].attn, FlashAttention)


def test_fx_feature_extraction_and_symbolic_trace(seed):
    from timm.models import create_feature_extractor

    original = _timm(init_values=0.1).eval()
    swapped, _ = vit_kernels.swap_modules(copy.deepcopy(original))
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    nodes = {"blocks.0": "b0", "blocks.1": "b1", "norm": "norm"}
    want = create_feature_extractor(original, return_nodes=nodes)(images)
    extractor = create_feature_extractor(swapped, return_nodes=nodes)
    got = extractor(images)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)
    # With a mask left symbolic every attention takes timm's masked path (as timm's own code does);
    # traced without one, the fused attention is a leaf of the graph.
    traced = torch.fx.symbolic_trace(swapped, concrete_args={"attn_mask": None, "is_causal": False})
    targets = {getattr(node.target, "__name__", str(node.target)) for node in traced.graph.nodes}
    assert {"flash_attention", "add_layer_norm"} <= targets, targets  # the fused ops are leaf functions
    torch.testing.assert_close(traced(images), original(images), rtol=1e-4, atol=1e-5)


def test_torchscript_fails_at_once_with_the_alternatives(seed):
    model, _ = vit_kernels.swap_modules(_timm().eval())
    with pytest.raises(RuntimeError, match=r"vit_kernels.*torch\.compile.*torch\.export.*before swap_modules"):
        torch.jit.script(model)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_save_load_and_deepcopy_round_trip(seed, how):
    model, _ = vit_kernels.swap_modules(_timm(init_values=0.1, reg_tokens=2).eval())
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    want = model(images)
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copy_ = torch.load(buffer, weights_only=False)
    else:
        copy_ = copy.deepcopy(model)
    assert [type(m) for m in copy_.modules()] == [type(m) for m in model.modules()]
    torch.testing.assert_close(copy_(images), want, rtol=0, atol=0)
    assert vit_kernels.swap_modules(copy_)[1].swapped == []  # still swapped: a second swap is a no-op


def test_no_state_shared_across_models(seed):
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    class_forwards = (VisionTransformer.forward_features, Block.forward, Attention.forward, nn.LayerNorm.forward)
    first, other = _timm().eval(), _timm().eval()
    classes = {path: type(m) for path, m in other.named_modules()}
    vit_kernels.swap_modules(first)
    assert {path: type(m) for path, m in other.named_modules()} == classes
    assert (VisionTransformer.forward_features, Block.forward, Attention.forward, nn.LayerNorm.forward) == class_forwards
    assert type(other) is VisionTransformer and type(first) is not VisionTransformer


def test_summary_always_says_what_happened(seed):
    model = _timm()
    _, first = vit_kernels.swap_modules(model)
    counts = first.counts()
    assert counts["attention"] == {"swapped": 2} and counts["layer_norm"] == {"swapped": 5}
    assert counts["block"] == {"swapped": 2} and counts["model"] == {"swapped": 1}
    _, second = vit_kernels.swap_modules(model)
    text = str(second)
    assert second.swapped == [] and "already swapped" in text
    assert second.counts()["attention"] == {"already swapped": 2}
    assert "0 swapped, 0 left alone, 13 already swapped" in text


# ---- transformers ---------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
HF_COMMON = dict(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, image_size=64, patch_size=16)


def _hf(kind, attn_implementation="sdpa", dtype=torch.float32, config=None):
    t = transformers
    makers = {
        "vit": lambda: t.ViTForImageClassification(config or t.ViTConfig(intermediate_size=384, num_labels=5, **HF_COMMON),
                                                   ),
        "deit": lambda: t.DeiTForImageClassificationWithTeacher(
            config or t.DeiTConfig(intermediate_size=384, num_labels=5, **HF_COMMON)),
        "dinov2": lambda: t.Dinov2Model(config or t.Dinov2Config(layerscale_value=0.5, mlp_ratio=2, **HF_COMMON)),
        "dinov2-backbone": lambda: t.Dinov2Backbone(config or t.Dinov2Config(
            layerscale_value=0.5, mlp_ratio=2, out_features=["stage1", "stage2"], **HF_COMMON)),
        "dinov2-registers": lambda: t.Dinov2WithRegistersModel(config or t.Dinov2WithRegistersConfig(
            layerscale_value=0.5, mlp_ratio=2, num_register_tokens=2, **HF_COMMON)),
        "vitmae": lambda: t.ViTMAEModel(config or t.ViTMAEConfig(intermediate_size=384, mask_ratio=0.5, **HF_COMMON)),
        "vitmsn": lambda: t.ViTMSNForImageClassification(
            config or t.ViTMSNConfig(intermediate_size=384, num_labels=5, **HF_COMMON)),
    }
    model = makers[kind]()
    model.set_attn_implementation(attn_implementation)
    return perturbed(model).to(dtype)


HF_KINDS = ["vit", "deit", "dinov2", "dinov2-backbone", "dinov2-registers", "vitmae", "vitmsn"]


def _hf_run(kind, images, **kwargs):
    """Every tensor of the model output, flattened to one vector (so every field is compared)."""
    noise = torch.rand(images.shape[0], 16, device=images.device) if kind == "vitmae" else None

    def run(model, dtype):
        extra = {"noise": noise.to(dtype)} if noise is not None else {}
        out = model(pixel_values=images.to(dtype), **extra, **kwargs)
        tensors = [v for v in out.values() if isinstance(v, torch.Tensor)]
        for v in out.values():
            if isinstance(v, tuple):
                tensors += [t for t in v if isinstance(t, torch.Tensor)]
        assert tensors
        return torch.cat([t.reshape(-1).to(dtype) for t in tensors])

    return run


@pytest.mark.parametrize("kind", HF_KINDS)
def test_transformers_families_and_heads_match_by_rule(seed, kind):
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    original = _hf(kind)
    out_type = type(original(pixel_values=images, **({"noise": torch.rand(2, 16)} if kind == "vitmae" else {})))
    model, summary = check_swap_by_rule(original, _hf_run(kind, images), train=True)
    counts = summary.counts()
    assert counts["attention"] == {"swapped": 2} and counts["block"] == {"swapped": 2}, str(summary)
    model.eval()
    out = model(pixel_values=images, **({"noise": torch.rand(2, 16)} if kind == "vitmae" else {}))
    assert type(out) is out_type
    if kind == "dinov2-backbone":
        assert len(out.feature_maps) == 2 and out.feature_maps[0].shape == (2, 192, 4, 4)


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_transformers_attention_mask_is_honoured(seed, kind):
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    original = _hf(kind).eval()
    swapped, _ = vit_kernels.swap_modules(copy.deepcopy(original))
    mask = torch.ones(2, 17, dtype=torch.long, device=DEVICE)
    mask[0, 9:] = 0
    want = original(pixel_values=images, attention_mask=mask).last_hidden_state \
        if kind == "dinov2" else original(pixel_values=images, attention_mask=mask).logits
    out = swapped(pixel_values=images, attention_mask=mask)
    got = out.last_hidden_state if kind == "dinov2" else out.logits
    unmasked = swapped(pixel_values=images)
    unmasked = unmasked.last_hidden_state if kind == "dinov2" else unmasked.logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got[0], unmasked[0], atol=1e-3)  # the mask changed the result
    torch.testing.assert_close(got[1], unmasked[1], rtol=1e-4, atol=1e-5)  # an all-ones row did not


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_transformers_output_attentions_and_hidden_states(seed, implementation):
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    original = _hf("vit", attn_implementation=implementation).eval()
    swapped, _ = vit_kernels.swap_modules(copy.deepcopy(original))
    want = original(pixel_values=images, output_attentions=True, output_hidden_states=True)
    got = swapped(pixel_values=images, output_attentions=True, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for a, b in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert (got.attentions is None) == (want.attentions is None)
    if implementation == "eager":
        assert len(got.attentions) == 2 and got.attentions[0].shape == (2, 3, 17, 17)
        for a, b in zip(got.attentions, want.attentions):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if implementation == "eager":
        swapped.config.output_attentions = True  # the config's default asks for them too
        assert len(swapped(pixel_values=images).attentions) == 2


def test_transformers_gradient_checkpointing_is_honoured(seed):
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    model, _ = vit_kernels.swap_modules(_hf("vit").train())
    attention_calls = []
    for layer in model.vit.layers:
        layer.attention.register_forward_hook(lambda *a: attention_calls.append(1))
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        attention_calls.clear()
        results.append(output_and_grads(model, lambda m: m(pixel_values=images).logits))
        # with checkpointing, each layer's forward runs again in backward
        assert len(attention_calls) == (4 if checkpointing else 2)
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-6, msg=name)


# Triton's interpreter computes bf16 dots wrongly (docs/design.md, "Testing without a GPU"): fp16 stands in on the CPU.
HALF = torch.bfloat16 if torch.cuda.is_available() else torch.float16


def test_transformers_half_model_takes_float32_pixels(seed):
    """A bf16 Dinov2 fed the float32 pixels image processors give: the model casts them itself."""
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    original = _hf("dinov2", dtype=HALF).eval()
    oracle = copy.deepcopy(original).double()(pixel_values=images.double()).last_hidden_state
    eager = original(pixel_values=images).last_hidden_state  # the model casts the pixels itself
    model, _ = vit_kernels.swap_modules(original)
    got = model(pixel_values=images).last_hidden_state
    assert got.dtype == eager.dtype == HALF
    from vit_kernels.testing import assert_rule

    assert_rule("last_hidden_state", got, oracle, eager)


def test_transformers_models_sharing_a_config_stay_apart(seed):
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    config = transformers.ViTConfig(intermediate_size=384, num_labels=5, **HF_COMMON)
    first, second = _hf("vit", config=config).eval(), _hf("vit", config=config).eval()
    assert first.config is second.config
    implementation = config._attn_implementation
    classes = {path: type(m) for path, m in second.named_modules()}
    want = second(pixel_values=images).logits
    vit_kernels.swap_modules(first)
    assert config._attn_implementation == implementation
    assert {path: type(m) for path, m in second.named_modules()} == classes
    torch.testing.assert_close(second(pixel_values=images).logits, want, rtol=0, atol=0)


def test_transformers_save_load_and_second_swap(seed):
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    model, _ = vit_kernels.swap_modules(_hf("dinov2").eval())
    want = model(pixel_values=images).last_hidden_state
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(pixel_values=images).last_hidden_state, want, rtol=0, atol=0)
    _, summary = vit_kernels.swap_modules(loaded)
    assert summary.swapped == [] and "already swapped" in str(summary)


# ---- torchvision ----------------------------------------------------------------------------------


def _torchvision():
    tv = pytest.importorskip("torchvision.models.vision_transformer")
    return perturbed(tv.VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=3, hidden_dim=192,
                                           mlp_dim=384, num_classes=10))


def test_torchvision_hooks_fire_as_before(seed):
    original = _torchvision().eval()
    swapped, _ = vit_kernels.swap_modules(copy.deepcopy(original))
    images = torch.randn(2, 3, 64, 64, device=DEVICE)

    def record(model):
        seen = []
        for layer in model.encoder.layers:
            layer.register_forward_hook(lambda m, a, out: seen.append(out))
        model.encoder.layers[0].self_attention.register_forward_hook(lambda m, a, out: seen.append(out[0]))
        return model(images), seen

    want_logits, want = record(original)
    got_logits, got = record(swapped)
    assert len(got) == len(want) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)


def test_torchvision_fx_feature_extraction(seed):
    from torchvision.models.feature_extraction import create_feature_extractor

    original = _torchvision().eval()
    swapped, _ = vit_kernels.swap_modules(copy.deepcopy(original))
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    nodes = ["encoder.layers.encoder_layer_0", "encoder.ln", "heads"]
    want = create_feature_extractor(original, return_nodes=nodes)(images)
    got = create_feature_extractor(swapped, return_nodes=nodes)(images)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_torchvision_save_load_round_trip(seed):
    model, _ = vit_kernels.swap_modules(_torchvision().eval())
    images = torch.randn(2, 3, 64, 64, device=DEVICE)
    want = model(images)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(images), want, rtol=0, atol=0)
    assert isinstance(loaded.encoder.ln, FusedLayerNorm)
