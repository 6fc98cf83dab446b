"""swap_modules on transformers 4.x's CLIP and SigLIP vision towers (tiny configs, no downloads).

4.x keeps 5.x's modules but not their calls: the attention takes ``output_attentions`` and
returns ``(output, maps)``, the layers take their masks positionally and return tuples, and up
to 4.47 each attention implementation is a class of its own (``CLIPSdpaAttention``, ...).
`scripts/check_transformers4.sh` runs this file under 4.46 (a class per implementation) and 4.57
(CLIP's old call form on the attention registry, SigLIP's new one), each installed in a
directory of its own beside the project's transformers 5; under 5.x it skips.
"""

import copy
import io

import pytest
import torch

import vit_kernels
from swap_checks import check_swap_by_rule, perturbed
from vit_kernels.testing import kernel_device

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) >= 5:
    pytest.skip("transformers 4.x's layout: bash scripts/check_transformers4.sh runs these under 4.46 and 4.57",
                allow_module_level=True)
from vit_kernels.swap import transformers_clip  # noqa: E402

DEVICE = kernel_device()
# head dim 72 (SigLIP so400m's), a width the MLP kernels mask, two layers.
VISION = dict(hidden_size=144, intermediate_size=200, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
            max_position_embeddings=16)
CASES = {"clip-quick_gelu": ("clip", "quick_gelu"), "clip-gelu": ("clip", "gelu"),
         "siglip-tanh": ("siglip", "gelu_pytorch_tanh")}


def _tower(family, act, attn_implementation):
    t = transformers
    if family == "clip":
        config = t.CLIPVisionConfig(hidden_act=act, attn_implementation=attn_implementation, **VISION)
        return perturbed(t.CLIPVisionModel(config))
    config = t.SiglipVisionConfig(hidden_act=act, attn_implementation=attn_implementation, **VISION)
    return perturbed(t.SiglipVisionModel(config))


def _run(batch=2, **kwargs):
    images = torch.randn(batch, 3, 32, 32, device=DEVICE)

    def run(model, dtype):
        out = model(pixel_values=images.to(dtype), **kwargs)
        return torch.cat([out.last_hidden_state.reshape(-1), out.pooler_output.reshape(-1)])

    return run


def _counted_attention_calls(monkeypatch):
    calls = []
    real = transformers_clip.flash_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers_clip, "flash_attention", counted)
    return calls


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(CASES))
def test_vision_towers_match_by_rule(seed, case, attn_implementation, monkeypatch):
    family, act = CASES[case]
    original = _tower(family, act, attn_implementation)
    attention_classes = {type(m) for m in original.modules() if type(m).__name__.endswith("Attention")
                         and hasattr(m, "q_proj")}
    calls = _counted_attention_calls(monkeypatch)
    model, summary = check_swap_by_rule(original, _run(), train=True)
    text, counts = str(summary), summary.counts()
    assert counts["attention"]["swapped"] == 2 and counts["block"] == {"swapped": 2}, text
    assert counts["patch_embed"] == {"swapped": 1} and counts["mlp"]["swapped"] >= 2, text
    assert len(calls) == 2  # one forward through two layers: the kernel ran
    swapped = [m for m in model.modules() if isinstance(m, transformers_clip.ClipAttention)]
    # Each keeps its implementation's class (CLIPSdpaAttention under 4.46's SDPA) as its base.
    assert len(swapped) == 2 and {type(m)._vk_base for m in swapped} == attention_classes
    _, second = vit_kernels.swap_modules(model)
    assert second.swapped == [] and "already swapped" in str(second)


def test_attention_maps_and_hidden_states_take_the_models_own_attention(seed):
    original = _tower("clip", "quick_gelu", "eager").eval()
    model, _ = vit_kernels.swap_modules(copy.deepcopy(original))
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        ours = model(pixel_values=images, output_attentions=True, output_hidden_states=True)
        theirs = original(pixel_values=images, output_attentions=True, output_hidden_states=True)
    assert len(ours.attentions) == len(theirs.attentions) == 2
    for a, b in zip(ours.attentions + ours.hidden_states, theirs.attentions + theirs.hidden_states):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_gradient_checkpointing(seed, family):
    """4.x's encoder hands the layer's masks and output_attentions to the checkpoint positionally."""
    original = _tower(family, "gelu_pytorch_tanh", "sdpa")
    original.gradient_checkpointing_enable()
    check_swap_by_rule(original, _run(), train=True)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_two_tower_models_leave_the_text_tower_alone(seed, family):
    """4.x's two-tower models hold the text transformer itself (CLIPTextTransformer), not a *TextModel."""
    t = transformers
    if family == "clip":
        model = t.CLIPModel(t.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=32))
    else:
        text = dict(TEXT, hidden_size=VISION["hidden_size"])  # SigLIP compares the two towers without a projection
        model = t.SiglipModel(t.SiglipConfig(text_config=text, vision_config=VISION))
    model = perturbed(model).eval()
    text_classes = {path: type(m) for path, m in model.text_model.named_modules()}
    ids = torch.randint(0, TEXT["vocab_size"], (2, 7), device=DEVICE)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=images)
    model, summary = vit_kernels.swap_modules(model)
    assert {path: type(m) for path, m in model.text_model.named_modules()} == text_classes
    assert "text tower" in str(summary) and summary.counts()["attention"]["swapped"] == 2, str(summary)
    with torch.no_grad():
        after = model(input_ids=ids, pixel_values=images)
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        torch.testing.assert_close(after[name], before[name])


def test_save_and_load_round_trip(seed):
    model, _ = vit_kernels.swap_modules(_tower("clip", "quick_gelu", "sdpa").eval())
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded.vision_model.encoder.layers[0]) is type(model.vision_model.encoder.layers[0])
    images = torch.randn(1, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=images).pooler_output, model(pixel_values=images).pooler_output)
