"""vit_kernels.ops.patch_embed (the csrc/ extension: its C++ CPU path here, CUDA on a GPU) and FusedPatchEmbed.

Tokens and every gradient are held to the numerics rule against the float64 reference,
with eager (normalize, Conv2d, flatten, cat, add) in the same dtype as the yardstick.
"""

import pytest
import torch

from vit_kernels import reference
from vit_kernels.nn import FusedPatchEmbed
from vit_kernels.ops import patch_embed
from vit_kernels.testing import assert_rule, kernel_device, poisoned_allocations

DEVICE = kernel_device()
MEAN = torch.tensor([0.485, 0.456, 0.406])
STD = torch.tensor([0.229, 0.224, 0.225])


def _inputs(batch, size, patch, dim, dtype, *, cls, pos, uint8=False, channels_last=False):
    h, w = size
    n = (h // patch) * (w // patch)
    if uint8:
        images = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8, device=DEVICE)
    else:
        images = torch.randn(batch, 3, h, w, device=DEVICE).to(dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    params = dict(
        weight=(torch.randn(dim, 3, patch, patch, device=DEVICE) * (3 * patch * patch) ** -0.5).to(dtype),
        bias=(0.1 * torch.randn(dim, device=DEVICE)).to(dtype),
        cls_token=torch.randn(1, 1, dim, device=DEVICE).to(dtype) if cls else None,
        pos_embed=torch.randn(1, n + (1 if pos == "with_cls" else 0), dim, device=DEVICE).to(dtype) if pos else None,
    )
    return images, params


def _run(fn, images, params, dout, cast, **kwargs):
    image_leaf = cast(images).detach()
    if image_leaf.is_floating_point():
        image_leaf.requires_grad_()
    leaves = {k: cast(v).detach().requires_grad_() for k, v in params.items() if v is not None}
    out = fn(image_leaf, leaves["weight"], leaves.get("bias"), cls_token=leaves.get("cls_token"),
             pos_embed=leaves.get("pos_embed"), **{k: cast(v) for k, v in kwargs.items()})
    names = (["dimages"] if image_leaf.requires_grad else []) + [f"d{k}" for k in leaves]
    grads = torch.autograd.grad(out, ([image_leaf] if image_leaf.requires_grad else []) + list(leaves.values()),
                                cast(dout))
    return {"tokens": out, **dict(zip(names, grads))}


def check(images, params, **norm):
    n_out = (images.shape[2] // params["weight"].shape[-1]) * (images.shape[3] // params["weight"].shape[-1])
    n_out += 1 if params["cls_token"] is not None else 0
    dtype = params["weight"].dtype if images.dtype == torch.uint8 else images.dtype
    dout = torch.randn(images.shape[0], n_out, params["weight"].shape[0], device=DEVICE).to(dtype)
    norm = {k: v.to(DEVICE) for k, v in norm.items()}
    with poisoned_allocations():
        got = _run(patch_embed, images, params, dout, lambda t: t, **norm)
    eager = _run(reference.patch_embed, images, params, dout, lambda t: t, **norm)
    as64 = lambda t: t if t.dtype == torch.uint8 else t.double()  # noqa: E731
    oracle = _run(reference.patch_embed, images, params, dout, as64, **norm)
    assert got.keys() == eager.keys()
    for name in got:
        assert got[name].dtype == eager[name].dtype, name
        assert_rule(name, got[name], oracle[name], eager[name])
    return got


@pytest.mark.parametrize("pos", [None, "with_cls", "patches_only"])
@pytest.mark.parametrize("cls", [True, False], ids=["cls", "no-cls"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_rule(seed, dtype, cls, pos):
    if pos == "with_cls" and not cls:
        pytest.skip("pos_embed with a class-token row needs a class token")
    images, params = _inputs(2, (32, 48), 16, 96, dtype, cls=cls, pos=pos)
    check(images, params)


@pytest.mark.parametrize("patch", [1, 14, 16, 32])
def test_patch_sizes_and_rectangles(seed, patch):
    size = {1: (6, 10), 14: (28, 42), 16: (32, 64), 32: (64, 32)}[patch]
    images, params = _inputs(2, size, patch, 64, torch.float32, cls=True, pos="with_cls")
    check(images, params)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_uint8_with_normalization(seed, channels_last):
    images, params = _inputs(3, (32, 32), 16, 64, torch.float32, cls=True, pos="with_cls", uint8=True,
                             channels_last=channels_last)
    got = check(images, params, mean=MEAN, std=STD)
    assert "dimages" not in got  # uint8 images carry no gradient


def test_float_images_with_normalization_and_channels_last(seed):
    images, params = _inputs(2, (32, 32), 16, 64, torch.float32, cls=False, pos="patches_only", channels_last=True)
    got = check(images, params, mean=MEAN, std=STD)
    assert got["dimages"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "image_dtype, patch, layout",
    [(torch.uint8, 16, "nchw"), (torch.float32, 16, "nchw"), (torch.bfloat16, 16, "nchw"), (torch.float16, 14, "nchw"),
     (torch.uint8, 14, "nchw"), (torch.bfloat16, 16, "channels_last"), (torch.float32, 16, "offset"),
     (torch.uint8, 16, "offset")],
    ids=["u8-P16", "f32-P16", "bf16-P16", "f16-P14", "u8-P14", "bf16-channels_last", "f32-misaligned",
         "u8-misaligned"],
)
def test_every_gather_width(seed, image_dtype, patch, layout):
    """The CUDA gather moves 16-byte vectors when the patch width, strides and alignment allow
    and narrower ones (down to one element) when not: P = 16 and 14, channels_last, and an
    image one element into its storage all run here (on the CPU this is the C++ path)."""
    size = (2 * patch, 3 * patch)
    weight_dtype = torch.bfloat16 if image_dtype == torch.uint8 and DEVICE.type == "cuda" else torch.float32
    if image_dtype == torch.uint8:
        images = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, device=DEVICE)
    else:
        images = torch.randn(2, 3, *size, device=DEVICE).to(image_dtype)
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    elif layout == "offset":
        storage = torch.empty(images.numel() + 1, dtype=images.dtype, device=DEVICE)
        images = storage[1:].view(images.shape).copy_(images)
    dtype = weight_dtype if image_dtype == torch.uint8 else image_dtype
    _, params = _inputs(2, size, patch, 64, dtype, cls=True, pos="with_cls")
    check(images, params, **({"mean": MEAN, "std": STD} if image_dtype == torch.uint8 else {}))


def test_empty_batch():
    images, params = _inputs(0, (32, 32), 16, 64, torch.float32, cls=True, pos="with_cls")
    out = patch_embed(images, **params)
    assert out.shape == (0, 5, 64)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(images=torch.randn(2, 4, 32, 32)), ValueError, "4 channels but weight expects 3"),
        (dict(images=torch.randn(2, 3, 30, 32)), ValueError, "not divisible by the patch size 16"),
        (dict(images=torch.randn(3, 32, 32)), ValueError, r"images must be \[B, C, H, W\]"),
        (dict(images=torch.randint(0, 5, (2, 3, 32, 32), dtype=torch.int32)), TypeError, "images must have dtype"),
        (dict(weight=torch.randn(64, 3, 16, 8)), ValueError, "square patches"),
        (dict(bias=torch.randn(63)), ValueError, "bias must have shape"),
        (dict(cls_token=torch.randn(1, 64)), ValueError, "cls_token must have shape"),
        (dict(pos_embed=torch.randn(1, 6, 64)), ValueError, "pos_embed must have shape"),
        (dict(cls_token=None, pos_embed=torch.randn(1, 5, 64)), ValueError, "pos_embed must have shape"),
        (dict(mean=MEAN), ValueError, "mean and std must be given together"),
        (dict(mean=MEAN[:2], std=STD[:2]), ValueError, "mean must have shape"),
        (dict(bias=torch.randn(64, device="meta")), ValueError, "bias is on meta"),
    ],
)
def test_bad_input_is_named(change, error, match):
    args = dict(images=torch.randn(2, 3, 32, 32), weight=torch.randn(64, 3, 16, 16), bias=torch.randn(64),
                cls_token=torch.randn(1, 1, 64), pos_embed=torch.randn(1, 5, 64))
    args.update(change)
    with pytest.raises(error, match=match):
        patch_embed(args.pop("images"), args.pop("weight"), args.pop("bias"), **args)


@pytest.mark.inductor
def test_opcheck_and_compile(seed):
    images, params = _inputs(2, (32, 32), 16, 64, torch.float32, cls=True, pos="with_cls")
    patch_embed(images, **params)  # loads the extension and registers the fake kernels
    leaves = [images.requires_grad_()] + [p.requires_grad_() for p in params.values()]
    torch.library.opcheck(torch.ops.vit_kernels.patch_embed_fwd.default, (*leaves, None, None))
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, device=DEVICE)
    torch.library.opcheck(torch.ops.vit_kernels.patch_embed_fwd.default,
                          (u8, *leaves[1:], MEAN.to(DEVICE), STD.to(DEVICE)))
    compiled = torch.compile(lambda x: patch_embed(x, **params) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(images), patch_embed(images, **params) * 2, rtol=0, atol=0)


def test_module_matches_timm_patch_embed(seed):
    timm_layers = pytest.importorskip("timm.layers")
    theirs = timm_layers.PatchEmbed(img_size=64, patch_size=16, in_chans=3, embed_dim=96).to(DEVICE)
    ours = FusedPatchEmbed(img_size=64, patch_size=16, in_chans=3, embed_dim=96).to(DEVICE)
    for attr in ("img_size", "patch_size", "grid_size", "num_patches"):
        assert getattr(ours, attr) == getattr(theirs, attr)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_module_resamples_pos_embed_for_another_resolution(seed):
    from vit_kernels.models import resample_pos_embed

    embed = FusedPatchEmbed(img_size=64, patch_size=16, embed_dim=32).to(DEVICE)
    cls, pos = torch.randn(1, 1, 32, device=DEVICE), torch.randn(1, 17, 32, device=DEVICE)
    x = torch.randn(1, 3, 96, 96, device=DEVICE)
    want = reference.patch_embed(x, embed.proj.weight, embed.proj.bias, cls_token=cls,
                                 pos_embed=resample_pos_embed(pos, (6, 6), (4, 4)))
    torch.testing.assert_close(embed(x, cls_token=cls, pos_embed=pos), want, rtol=1e-4, atol=1e-4)


def test_autocast_runs_the_gemm_in_the_autocast_dtype(seed):
    images, params = _inputs(2, (32, 32), 16, 64, torch.float32, cls=True, pos="with_cls")
    weight = params["weight"].requires_grad_()
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = patch_embed(images, **params)
        want = reference.patch_embed(images, **params).to(torch.bfloat16)  # what autocast's conv gives
        u8 = patch_embed(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, device=DEVICE), weight,
                         mean=MEAN.to(DEVICE), std=STD.to(DEVICE))
    assert out.dtype == torch.bfloat16 and u8.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=2e-2, atol=2e-2)
    (grad,) = torch.autograd.grad(out.float().sum(), weight)
    assert grad.dtype == torch.float32


@pytest.mark.parametrize(
    "batch,channels,size,patch",
    [(1, 1, (224, 224), 16), (1, 3, (384, 384), 16), (2, 4, (224, 160), 32), (1, 3, (224, 224), 14)],
    ids=["B1-C1-224", "B1-C3-384", "B2-C4-224x160", "B1-P14"],
)
def test_odd_sizes(seed, batch, channels, size, patch):
    images = torch.randn(batch, channels, *size, device=DEVICE)
    n = (size[0] // patch) * (size[1] // patch)
    params = dict(
        weight=torch.randn(48, channels, patch, patch, device=DEVICE) * (channels * patch * patch) ** -0.5,
        bias=torch.randn(48, device=DEVICE),
        cls_token=torch.randn(1, 1, 48, device=DEVICE),
        pos_embed=torch.randn(1, n + 1, 48, device=DEVICE),
    )
    check(images, params)


@pytest.mark.parametrize("pos_rows", ["with_cls", "patches_only"])
def test_gradcheck_float64_cpu(seed, pos_rows):
    """The C++ CPU path in float64 against finite differences, for every input (images included)."""
    DEVICE = torch.device("cpu")  # noqa: N806  (the GPU path computes in float32; it runs the reference for float64)
    images = torch.randn(1, 2, 8, 12, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(5, 2, 4, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    cls = torch.randn(1, 1, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, 6 + (pos_rows == "with_cls"), 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mean, std = torch.rand(2, dtype=torch.float64, device=DEVICE), torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, w, b, c, p: patch_embed(x, w, b, cls_token=c, pos_embed=p, mean=mean, std=std),
        (images, weight, bias, cls, pos),
    )
