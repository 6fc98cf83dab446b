"""vit_kernels.ops.flash_attention (and the packed form, dropout, attention_probs).

Outputs and dq/dk/dv are held to the numerics rule against a float64 oracle, with
eager attention (timm's unfused path, vit_kernels.reference.attention) in the same
dtype as the yardstick. Kernel allocations are poisoned with NaN.
bf16 runs on the GPU only: tl.dot on bf16 is wrong under Triton's interpreter.
"""

import pytest
import torch

from vit_kernels import reference
from vit_kernels.nn import FlashAttention
from vit_kernels.ops import attention_probs, flash_attention, flash_attention_qkvpacked
import vit_kernels.ops.attention as attention_module
from vit_kernels.ops.attention import attention_dropout_mask
from vit_kernels.testing import (assert_rule, forcing_one_config, kernel_device, no_host_reads, poisoned_allocations,
                                 recording_launches)

DEVICE = kernel_device()
ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
SEQ_LENS = [1, 17, 50, 197, 257]
HEAD_DIMS = [32, 64, 80, 96, 128]  # the ViT-B/L/H, DeiT and CLIP widths, at every length
# Every other multiple of 8 the kernels take: one block padded (8, 16, 24, 56, 104-120) or two
# (40, 48, 72, 88), each at the lengths the issue names.
OTHER_HEAD_DIMS = [d for d in attention_module.HEAD_DIMS if d not in HEAD_DIMS]


def _make(batch, n_q, n_kv, heads, head_dim, dtype, packed):
    """q, k, v and the leaves gradients are taken for: packed -> views of one qkv tensor."""
    if packed:
        assert n_q == n_kv
        qkv = torch.randn(batch, n_q, 3, heads, head_dim, device=DEVICE).to(dtype).requires_grad_()
        return qkv.unbind(2), [qkv]
    q = torch.randn(batch, n_q, heads, head_dim, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(batch, n_kv, heads, head_dim, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(batch, n_kv, heads, head_dim, device=DEVICE).to(dtype).requires_grad_()
    return (q, k, v), [q, k, v]


def _grads(fn, leaves, dout, as_dtype=None):
    """fn(q, k, v) on fresh copies of the leaves (optionally cast); returns output and leaf grads."""
    copies = [t.detach().to(as_dtype or t.dtype).requires_grad_() for t in leaves]
    qkv = copies[0].unbind(2) if len(copies) == 1 else copies
    out = fn(*qkv)
    grads = torch.autograd.grad(out, copies, dout.to(out.dtype))
    return out, grads


def check_attention(batch, n_q, n_kv, heads, head_dim, dtype, packed, **kwargs):
    _, leaves = _make(batch, n_q, n_kv, heads, head_dim, dtype, packed)
    dout = torch.randn(batch, n_q, heads, head_dim, device=DEVICE).to(dtype)
    with poisoned_allocations():
        out, grads = _grads(lambda q, k, v: flash_attention(q, k, v, **kwargs), leaves, dout)
    out_eager, grads_eager = _grads(reference.attention, leaves, dout)
    out_ref, grads_ref = _grads(reference.attention, leaves, dout, torch.float64)
    assert out.shape == (batch, n_q, heads, head_dim) and out.is_contiguous()
    assert_rule("out", out, out_ref, out_eager)
    names = ["dqkv"] if packed else ["dq", "dk", "dv"]
    for name, g, g_eager, g_ref in zip(names, grads, grads_eager, grads_ref):
        assert_rule(name, g, g_ref, g_eager)


LAYOUTS = [(d, False) for d in HEAD_DIMS] + [(64, True), (80, True)]


@pytest.mark.parametrize("head_dim,packed", LAYOUTS, ids=[f"{d}-{'packed' if p else 'separate'}" for d, p in LAYOUTS])
@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_rule(seed, dtype, seq_len, head_dim, packed):
    check_attention(2, seq_len, seq_len, 2, head_dim, dtype, packed)


@pytest.mark.parametrize("head_dim", OTHER_HEAD_DIMS)
@pytest.mark.parametrize("seq_len", [1, 17, 197, 257])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_head_dim(seed, dtype, seq_len, head_dim):
    """SigLIP so400m's 72, ViT-g's 88, CLIP bigG's 104, test configs' 8 and 16, and the rest."""
    check_attention(1, seq_len, seq_len, 2, head_dim, dtype, packed=False)


def test_head_dim_blocks_pad_at_most_a_quarter():
    """Two power-of-two column blocks where one would pad more; no more than a quarter of the dot
    work on padding anywhere but d = 8 (16 is the narrowest dot operand)."""
    blocks = {d: attention_module.head_dim_blocks(d) for d in attention_module.HEAD_DIMS}
    assert blocks[72] == (64, 16) and blocks[80] == (64, 16) and blocks[96] == (64, 32) and blocks[64] == (64, 0)
    for d, (a, b) in blocks.items():
        assert a & (a - 1) == 0 and b & (b - 1) == 0 and min(a, b or 16) >= 16 and a + b >= d
        assert d == 8 or (a + b - d) / (a + b) <= 0.25, (d, a, b)
        one_block = max(16, 1 << (d - 1).bit_length())
        assert a + b <= one_block


@pytest.mark.parametrize("n_q,n_kv", [(1, 197), (197, 1), (50, 257), (257, 17)])
def test_cross_attention_lengths(seed, n_q, n_kv):
    check_attention(2, n_q, n_kv, 3, 64, torch.float16, packed=False)


@pytest.mark.parametrize("n_q,n_kv", [(64, 128), (128, 64), (129, 65)])
def test_lengths_at_block_boundaries(seed, n_q, n_kv):
    """Whole blocks only (every tile size is 32, 64 or 128) and one row or column past them: the
    kernels run full blocks without masks and a partial last block with them."""
    check_attention(1, n_q, n_kv, 2, 64, torch.float16, packed=False)


@pytest.mark.parametrize("deterministic", [True, False], ids=["deterministic", "atomic_dq"])
@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if ON_GPU else []), ids=str)
def test_scores_past_2_to_the_31_stay_finite(seed, dtype, deterministic):
    """Scaled scores of ~1e10, where eager's softmax is one-hot and finite. There, at a row max,
    a contracted FMA's rounding error (forward) or the backward's recomputed score differing
    from the forward's by its rounding (up to ~1e3 here) overflowed exp2 to inf and the
    gradients to NaN before the backward clamped its exponent (_probs_and_dscores). The
    forward meets the rule; the gradients only stay finite: recomputed from the scores at
    this conditioning, P cannot match the one eager saves (that is the recomputation every
    flash attention does). fp16 is left out: eager's fp16 scores overflow first."""
    q, k, v = (30 * torch.randn(2, 50, 2, 64, device=DEVICE) for _ in range(3))
    leaves = [t.to(dtype) for t in (q, k, v)]
    dout = torch.randn(2, 50, 2, 64, device=DEVICE).to(dtype)
    scale = 1e6
    with poisoned_allocations():
        out, grads = _grads(lambda q, k, v: flash_attention(q, k, v, softmax_scale=scale, deterministic=deterministic),
                            leaves, dout)
    out_eager = reference.attention(*leaves, scale)
    out_ref = reference.attention(*(t.double() for t in leaves), scale)
    assert_rule("out", out, out_ref, out_eager)
    for name, g in zip("qkv", grads):
        assert g.isfinite().all(), f"d{name} is not finite"


@pytest.mark.parametrize("nan_in", ["q", "k", "v"])
def test_nan_propagates_like_eager(seed, nan_in):
    """One NaN in q, k or v: the output and every gradient are NaN exactly where eager's are
    (the backward's clamped exponent propagates NaN instead of turning it into P = 1)."""
    leaves = [torch.randn(1, 17, 2, 32, device=DEVICE) for _ in range(3)]
    leaves["qkv".index(nan_in)][0, 3, 1, 5] = float("nan")
    dout = torch.randn(1, 17, 2, 32, device=DEVICE)
    with poisoned_allocations():
        out, grads = _grads(flash_attention, leaves, dout)
    out_eager, grads_eager = _grads(reference.attention, leaves, dout)
    for name, ours, eager in zip(["out", "dq", "dk", "dv"], [out, *grads], [out_eager, *grads_eager]):
        assert torch.equal(ours.isnan(), eager.isnan()), name
        assert ours.isnan().any() or name == "dv", name


@pytest.mark.parametrize("loop", ["masked", "peeled", "peeled_narrow_tail"])
@pytest.mark.parametrize("n_q,n_kv", [(197, 197), (65, 129), (145, 17), (16, 80)])
def test_every_kv_loop_form(seed, monkeypatch, loop, n_q, n_kv):
    """The three loop forms the kernels compile, whichever the device picks (the interpreter
    gets Hopper's): one masked loop (Ampere, dropout), whole blocks unmasked with a full-width
    tail, and with a 16-wide tail where the partial block fits in it. The lengths put 5, 1,
    17, 16 and 0 rows or columns past a 64-block, so each form runs its tail or skips it."""
    peel, narrow = {"masked": (False, 0), "peeled": (True, 0), "peeled_narrow_tail": (True, 16)}[loop]
    monkeypatch.setattr(attention_module, "_peel_tail", lambda arch_major, dropout_p: peel)
    monkeypatch.setattr(attention_module, "_narrow_tail", lambda: narrow)
    check_attention(1, n_q, n_kv, 2, 80, torch.float16, packed=False)
    check_attention(1, n_q, n_kv, 2, 64, torch.float16, packed=False, deterministic=False)


@pytest.mark.parametrize("deterministic", [True, False])
def test_overlapping_head_dim_with_every_loop_peeled(seed, monkeypatch, deterministic):
    """What Hopper runs at d = 72 (SigLIP so400m) without dropout: every kernel's loop peeled with
    its 16-wide tail (5 rows past a 64-block at N = 197), and deterministic=False on atomic dQ.
    (Peeled, dK/dV spilled there until the kernels were told their offsets are aligned.)"""
    monkeypatch.setattr(attention_module, "_peel_tail", lambda arch_major, dropout_p: True)
    launches = recording_launches(monkeypatch, attention_module)
    check_attention(1, 197, 197, 2, 72, torch.float16, packed=False, deterministic=deterministic)
    m = attention_module
    assert {kernel for kernel, _ in launches} == ({m._attn_fwd_kernel, m._attn_bwd_dkdv_kernel}
                                                  | ({m._attn_bwd_dq_kernel} if deterministic else set()))
    assert all(c["PEEL_TAIL"] and c["NARROW_TAIL"] == 16 for _, c in launches)
    dkdv = [c for kernel, c in launches if kernel is attention_module._attn_bwd_dkdv_kernel]
    assert [c["ATOMIC_DQ"] for c in dkdv] == [not deterministic]


def test_atomic_dq_runs_but_where_two_64_wide_blocks_overlap(seed, monkeypatch):
    """Past d = 96 with overlapping blocks (104-120) the atomic-dQ dK/dV tile spilled on sm_90:
    deterministic=False runs the deterministic backward there, the same result."""
    launches = recording_launches(monkeypatch, attention_module)
    check_attention(1, 17, 17, 2, 104, torch.float16, packed=False, deterministic=False)
    assert [c["ATOMIC_DQ"] for kernel, c in launches if kernel is attention_module._attn_bwd_dkdv_kernel] == [False]


def test_non_deterministic_dq_matches_rule(seed):
    check_attention(2, 197, 197, 2, 64, torch.float16, packed=True, deterministic=False)


def test_custom_scale(seed):
    _, leaves = _make(1, 50, 50, 2, 32, torch.float32, packed=False)
    dout = torch.randn(1, 50, 2, 32, device=DEVICE)
    out, grads = _grads(lambda q, k, v: flash_attention(q, k, v, softmax_scale=0.3), leaves, dout)
    out_ref, grads_ref = _grads(lambda q, k, v: reference.attention(q, k, v, 0.3), leaves, dout, torch.float64)
    out_eager, grads_eager = _grads(lambda q, k, v: reference.attention(q, k, v, 0.3), leaves, dout)
    assert_rule("out", out, out_ref, out_eager)
    for name, g, g_eager, g_ref in zip("qkv", grads, grads_eager, grads_ref):
        assert_rule(f"d{name}", g, g_ref, g_eager)


def test_packed_form_reads_in_place(seed):
    qkv = torch.randn(2, 33, 3, 2, 64, device=DEVICE)
    torch.testing.assert_close(flash_attention_qkvpacked(qkv), flash_attention(*qkv.unbind(2)), rtol=0, atol=0)


@pytest.mark.parametrize("width", [72, 76], ids=["aligned", "unaligned"])
def test_aligned_offsets_are_promised_only_where_every_stride_allows(seed, monkeypatch, width):
    """The kernels promise the compiler offsets that are multiples of 8 elements (STRIDES_ALIGNED)
    only where every stride is one: here q, k, v are the first 72 columns of rows `width` long, and
    a head stride of 76 is not. (On a GPU a false promise reads misaligned vectors.)"""
    launches = recording_launches(monkeypatch, attention_module)
    leaves = [torch.randn(1, 197, 2, width, device=DEVICE).to(torch.float16) for _ in range(3)]
    dout = torch.randn(1, 197, 2, 72, device=DEVICE).to(torch.float16)

    def first_72(fn):
        return lambda q, k, v: fn(q[..., :72], k[..., :72], v[..., :72])

    out, grads = _grads(first_72(flash_attention), leaves, dout)
    out_eager, grads_eager = _grads(first_72(reference.attention), leaves, dout)
    out_ref, grads_ref = _grads(first_72(reference.attention), leaves, dout, torch.float64)
    assert_rule("out", out, out_ref, out_eager)
    for name, g, g_eager, g_ref in zip("qkv", grads, grads_eager, grads_ref):
        assert_rule(f"d{name}", g, g_ref, g_eager)
    assert len(launches) == 3 and all(c["STRIDES_ALIGNED"] == (16 if width == 72 else 0) for _, c in launches)


def test_strides_aligned():
    aligned = attention_module.strides_aligned

    def strides(*tensors):
        return [t.stride()[:-1] for t in tensors]

    qkv = torch.empty(2, 197, 3, 12, 72)
    assert aligned(*strides(*qkv.unbind(2), torch.empty(2, 197, 12, 72))) == 16
    # Three heads of 72: rows of 648 (packed) and 216, multiples of 8 but not of 16.
    assert aligned(*strides(*torch.empty(2, 197, 3, 3, 72).unbind(2))) == 8
    assert aligned(*strides(torch.empty(2, 197, 3, 72))) == 8
    assert aligned(*strides(torch.empty(2, 197, 3, 72), torch.empty(2, 197, 2, 72))) == 8
    assert aligned(*strides(torch.empty(2, 197, 3, 64))) == 16
    assert aligned(*strides(torch.empty(5, 3, 76)[..., :72])) == 0
    assert aligned(*strides(torch.empty(4, 3, 2, 12)[:, 1:])) == 0  # a head stride of 12
    assert aligned((0, 24, 8)) == 8 and aligned((0, 48, 24)) == 16  # varlen's batch stride is 0


@pytest.mark.parametrize("n_heads, want", [(2, 16), (3, 8)])
def test_an_odd_head_count_promises_its_row_strides(seed, monkeypatch, n_heads, want):
    """d = 72 at an odd head count: the row strides are multiples of 8 but not of 16, which the
    kernels then promise themselves (STRIDES_ALIGNED 8, _row_stride); the results by the rule."""
    launches = recording_launches(monkeypatch, attention_module)
    check_attention(2, 197, 197, n_heads, 72, torch.float16, packed=True)
    assert len(launches) == 3 and all(c["STRIDES_ALIGNED"] == want for _, c in launches)


def test_backward_into_refuses_dk_and_dv_with_different_strides():
    q = torch.randn(1, 17, 2, 32, device=DEVICE)
    out, lse = attention_module._flash_attention_fwd(q, q, q, 0.2, 0.0, None, True)
    dq, dk = torch.empty_like(q), torch.empty_like(q)
    dv = torch.empty(1, 2, 17, 32, device=DEVICE).transpose(1, 2)
    with pytest.raises(ValueError, match="dk and dv must have the same strides"):
        attention_module.flash_attention_bwd_into(dq, dk, dv, out, q, q, q, out, lse, 0.2, 0.0, None, True)


def test_gradients_are_bitwise_reproducible(seed):
    (q, k, v), leaves = _make(2, 197, 197, 2, 64, torch.float16, packed=True)
    dout = torch.randn(2, 197, 2, 64, device=DEVICE).half()
    first = _grads(flash_attention, leaves, dout)[1][0]
    second = _grads(flash_attention, leaves, dout)[1][0]
    assert torch.equal(first, second)


# ---- dropout ---------------------------------------------------------------------------------


def test_dropout_keep_rate(seed):
    p = 0.3
    mask = attention_dropout_mask(torch.tensor(1234), 2, 3, 197, 257, p, DEVICE)
    keep_rate = mask.float().mean().item()
    n = mask.numel()
    assert abs(keep_rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, keep_rate
    other = attention_dropout_mask(torch.tensor(1235), 2, 3, 197, 257, p, DEVICE)
    assert not torch.equal(mask, other)
    # Masks differ across heads (each (batch*head, row, col) has its own draw).
    assert not torch.equal(mask[0, 0], mask[0, 1])


def check_dropout_consistency(monkeypatch, batch, n, heads, head_dim, dtype, p):
    """The kernel's dropped-out output and gradients against the reference's with the same mask, by the rule."""
    seed_value = torch.tensor(987654)
    monkeypatch.setattr("vit_kernels.ops.attention.draw_seed", lambda device: seed_value)
    (q, k, v), leaves = _make(batch, n, n, heads, head_dim, dtype, packed=False)
    dout = torch.randn(batch, n, heads, head_dim, device=DEVICE).to(dtype)
    mask = attention_dropout_mask(seed_value, batch, heads, n, n, p, DEVICE)

    def masked_reference(q, k, v):
        return reference.attention(q, k, v, None, mask, p)

    with poisoned_allocations():
        out, grads = _grads(lambda q, k, v: flash_attention(q, k, v, dropout_p=p), leaves, dout)
    out_eager, grads_eager = _grads(masked_reference, leaves, dout)
    out_ref, grads_ref = _grads(masked_reference, leaves, dout, torch.float64)
    assert_rule("out", out, out_ref, out_eager)
    for name, g, g_eager, g_ref in zip(["dq", "dk", "dv"], grads, grads_eager, grads_ref):
        assert_rule(name, g, g_ref, g_eager)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n", [50, 128])
def test_dropout_forward_and_backward_use_one_mask(seed, dtype, n, monkeypatch):
    check_dropout_consistency(monkeypatch, 2, n, 2, 64, dtype, 0.25)


def test_dropout_seed_is_drawn_on_the_device_and_never_read_on_the_host(monkeypatch):
    """The seed comes from torch's generator for q's device and the kernels load it: two calls
    draw different masks, torch.manual_seed reproduces both, the backward regenerates each
    forward's mask (the rule against the reference with that mask), and nothing reads the
    seed on the host (a host int would be frozen into a CUDA graph, and on a GPU would sync)."""
    from vit_kernels.ops import attention

    drawn = []
    draw = attention.draw_seed
    monkeypatch.setattr(attention, "draw_seed", lambda device: drawn.append(draw(device)) or drawn[-1])
    (q, k, v), leaves = _make(1, 50, 50, 2, 32, torch.float32, packed=False)

    def run():
        with no_host_reads():
            out = flash_attention(q, k, v, dropout_p=0.3)
            grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        return out.detach(), grads

    torch.manual_seed(5)
    first, second = run(), run()
    assert all(s.device == q.device and s.dtype == torch.int64 for s in drawn)
    assert not torch.equal(first[0], second[0])
    torch.manual_seed(5)
    again = run(), run()
    for want, got in zip((first, second), again):
        assert torch.equal(want[0], got[0]) and all(torch.equal(a, b) for a, b in zip(want[1], got[1]))
    for seed, (out, grads) in zip(drawn[:2], (first, second)):
        mask = attention_dropout_mask(seed, 1, 2, 50, 50, 0.3, DEVICE)
        want, want_grads = _grads(lambda q, k, v: reference.attention(q, k, v, None, mask, 0.3), leaves,
                                  torch.ones_like(out), torch.float64)
        eager, eager_grads = _grads(lambda q, k, v: reference.attention(q, k, v, None, mask, 0.3), leaves,
                                    torch.ones_like(out))
        assert_rule("out", out, want, eager)
        for name, g, g_want, g_eager in zip(["dq", "dk", "dv"], grads, want_grads, eager_grads):
            assert_rule(name, g, g_want, g_eager)


def _gpu_tile_shapes():
    from vit_kernels.ops.attention_configs import every_tile

    return sorted({(tile.block_m, tile.block_n) for tile in every_tile()})


def test_forcing_one_config_forces_one_kind_and_keeps_the_others_first():
    """The GPU config sweep below (and scripts/gpu_diag.py) relies on this stand-in."""
    from vit_kernels.ops import attention

    def every_config(kind, head_dim, dtype, kernel, **kwargs):  # the GPU's lists, wherever this runs
        return {"fwd": ("f1", "f2"), "dkdv": ("k1", "k2"), "dq": ("q1", "q2")}[kind]

    forced = forcing_one_config(every_config, "dkdv", "k2")
    args = (64, torch.float16, attention._attn_bwd_dkdv_kernel)
    assert [forced(kind, *args, dropout=True) for kind in attention.KERNEL_KINDS] == [("f1",), ("k2",), ("q1",)]


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS + [72, 88, 104])  # and overlapping blocks, aligned offsets
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_every_autotune_config_is_correct_on_gpu(seed, monkeypatch, dtype, head_dim, dropout):
    """Each config the autotuner may pick, forced one at a time on the device (the other
    kernels run their first), forward and backward by the rule. The interpreter cannot catch a
    config that compiles wrong: on an H100 an earlier backward's (32, 64, 8, 2) at d = 128
    computed dK 20x off eager's error."""
    from vit_kernels.ops import attention

    original = attention.launch_configs
    for kind in attention.KERNEL_KINDS:
        for config in original(kind, head_dim, dtype, attention._attn_fwd_kernel, dropout=dropout):
            monkeypatch.setattr(attention, "launch_configs", forcing_one_config(original, kind, config))
            if dropout:
                check_dropout_consistency(monkeypatch, 2, 197, 2, head_dim, dtype, 0.1)
            else:
                check_attention(2, 197, 197, 2, head_dim, dtype, packed=True)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("head_dim", attention_module.HEAD_DIMS)
def test_atomic_dq_at_every_head_dim_on_gpu(seed, head_dim):
    """deterministic=False at every head dim, bf16, on the device (atomic dQ but at 104-120)."""
    check_attention(2, 197, 197, 2, head_dim, torch.bfloat16, packed=True, deterministic=False)


def test_dkdv_with_dropout_past_64_keeps_only_8_warp_tiles():
    """dK/dV with dropout past d = 64 (at a head dim in one column block) drops its 4-warp tile,
    which spilled 20 bytes at d = 128 on sm_90 with triton 3.6 (32 x 64, 4 warps, 1 stage);
    without dropout, and with dropout up to d = 64, the 4-warp tiles stay candidates."""
    from vit_kernels.ops.attention_configs import tiles_for

    def warps(head_dim, dropout):
        tiles = tiles_for("dkdv", head_dim, torch.bfloat16, interpreted=False, dropout=dropout)
        assert tiles
        return {tile.num_warps for tile in tiles}

    assert warps(128, dropout=True) == {8}
    assert warps(128, dropout=False) == {4, 8}
    for head_dim in (32, 64):
        assert warps(head_dim, dropout=True) == {4, 8}


@pytest.mark.skipif(ON_GPU, reason="the interpreter's fixed tile is what this swaps; the GPU autotunes over them")
@pytest.mark.parametrize("block_m, block_n", _gpu_tile_shapes())
def test_every_gpu_tile_shape_is_correct(seed, monkeypatch, request, block_m, block_n):
    """The interpreter run with each tile shape the GPU configs use (non-square ones
    included): forward, both backward paths and dropout by the rule, at N = 197 and d = 80,
    where neither sequence nor head dim fits the tiles."""
    from vit_kernels.ops import attention as attention_module
    from vit_kernels.ops.attention_configs import Tile

    monkeypatch.setattr("vit_kernels.ops.attention_configs.INTERPRETER_TILE", Tile(block_m, block_n, 4, 1))
    # Launches keep their configs per signature: dropped now, and again once the tile is restored.
    attention_module._launch_configs.cache_clear()
    request.addfinalizer(attention_module._launch_configs.cache_clear)
    for kind in ("fwd", "dq", "dkdv"):
        configs = attention_module.launch_configs(kind, 80, torch.float16, attention_module._attn_fwd_kernel)
        assert [config.kwargs for config in configs] == [{"BLOCK_M": block_m, "BLOCK_N": block_n}], kind
    check_attention(1, 197, 197, 2, 80, torch.float32, packed=True)
    check_attention(1, 197, 130, 1, 80, torch.float16, packed=False, deterministic=False)
    monkeypatch.setattr("vit_kernels.ops.attention.draw_seed", lambda device: torch.tensor(77))
    (q, k, v), leaves = _make(1, 197, 197, 1, 80, torch.float32, packed=False)
    mask = attention_dropout_mask(torch.tensor(77), 1, 1, 197, 197, 0.2, DEVICE)
    dout = torch.randn(1, 197, 1, 80, device=DEVICE)
    out, grads = _grads(lambda q, k, v: flash_attention(q, k, v, dropout_p=0.2), leaves, dout)
    want, want_grads = _grads(lambda q, k, v: reference.attention(q, k, v, None, mask, 0.2), leaves, dout,
                              torch.float64)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-5)


def test_dropout_draws_a_new_mask_each_call(seed):
    q = torch.randn(1, 17, 2, 32, device=DEVICE)
    a = flash_attention(q, q, q, dropout_p=0.5)
    b = flash_attention(q, q, q, dropout_p=0.5)
    assert not torch.equal(a, b)


# ---- edges, errors -------------------------------------------------------------------------------


def test_empty_batch():
    q = torch.randn(0, 197, 3, 64, device=DEVICE, requires_grad=True)
    out = flash_attention(q, q, q)
    assert out.shape == (0, 197, 3, 64)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_float64_runs_the_reference(seed):
    q, k, v = (torch.randn(1, 9, 2, 32, dtype=torch.float64) for _ in range(3))
    assert torch.equal(flash_attention(q, k, v), reference.attention(q, k, v))


def test_attention_probs(seed):
    q, k = torch.randn(2, 17, 3, 64, device=DEVICE), torch.randn(2, 19, 3, 64, device=DEVICE)
    probs = attention_probs(q, k)
    assert probs.shape == (2, 3, 17, 19) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 17, device=DEVICE))
    v = torch.randn(2, 19, 3, 64, device=DEVICE)
    torch.testing.assert_close(
        torch.einsum("bhqk,bkhd->bqhd", probs, v), flash_attention(q, k, v), rtol=1e-4, atol=1e-4
    )


def _qkv(n=17, d=64, dtype=torch.float32, device=DEVICE):
    return [torch.randn(2, n, 3, d, device=device, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: _qkv(d=44), ValueError, r"head dim \(q, k and v.s last dim\) must be a multiple of 8 from 8 to 128"),
        (lambda: _qkv(d=136), ValueError, r"head dim \(q, k and v.s last dim\) must be a multiple of 8"),
        (lambda: _qkv(d=4), ValueError, r"head dim \(q, k and v.s last dim\) must be a multiple of 8"),
        (lambda: [*_qkv()[:2], torch.randn(2, 18, 3, 64, device=DEVICE)], ValueError, "k and v must have the same shape"),
        (lambda: [_qkv()[0], *_qkv(dtype=torch.float16)[1:]], TypeError, "must share one dtype"),
        (lambda: [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in _qkv()], ValueError, "must be contiguous"),
        (lambda: [_qkv()[0], *_qkv(device="meta")[1:]], ValueError, "k is on meta"),
        (lambda: [t.int() for t in _qkv()], TypeError, "q must have dtype"),
        (lambda: [t[0] for t in _qkv()], ValueError, r"must be \[B, N, H, d\]"),
        (lambda: [torch.randn(2, 17, 4, 64, device=DEVICE), *_qkv()[1:]], ValueError, "must agree in batch, heads"),
        (lambda: [_qkv()[0], torch.randn(2, 0, 3, 64, device=DEVICE), torch.randn(2, 0, 3, 64, device=DEVICE)],
         ValueError, "at least one token"),
    ],
)
def test_bad_input_is_named(make, error, match):
    with pytest.raises(error, match=match):
        flash_attention(*make())


@pytest.mark.parametrize("kwargs,match", [(dict(dropout_p=1.0), "dropout_p"), (dict(dropout_p=-0.1), "dropout_p"),
                                          (dict(softmax_scale=0.0), "softmax_scale")])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flash_attention(*_qkv(), **kwargs)


def test_bad_packed_shape():
    with pytest.raises(ValueError, match=r"qkv must be \[B, N, 3, H, d\]"):
        flash_attention_qkvpacked(torch.randn(2, 17, 4, 3, 64))


# ---- custom ops, compile -------------------------------------------------------------------------


@pytest.mark.inductor
def test_opcheck(seed):
    qkv = torch.randn(2, 33, 3, 2, 64, device=DEVICE, requires_grad=True)
    q, k, v = qkv.unbind(2)
    fwd = torch.ops.vit_kernels.flash_attention_fwd.default
    torch.library.opcheck(fwd, (q, k, v, 0.125, 0.0, None, True))
    torch.library.opcheck(fwd, (q, k, v, 0.125, 0.2, torch.tensor(7), False))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = fwd(q, k, v, 0.125, 0.0, None, True)
    torch.library.opcheck(
        torch.ops.vit_kernels.flash_attention_bwd.default,
        (torch.randn_like(out), q, k, v, out, lse, 0.125, 0.0, None, True),
    )


@pytest.mark.inductor
def test_compile_fullgraph(seed):
    def attend(qkv, dropout_p):
        b, n = qkv.shape[:2]
        return flash_attention_qkvpacked(qkv, dropout_p=dropout_p).reshape(b, n, -1)

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    qkv = torch.randn(2, 33, 3, 2, 32, device=DEVICE, requires_grad=True)
    out = compiled(qkv, 0.0)
    (grad,) = torch.autograd.grad(out.sum(), qkv)
    out_eager = attend(qkv, 0.0)
    (grad_eager,) = torch.autograd.grad(out_eager.sum(), qkv)
    torch.testing.assert_close(out, out_eager, rtol=0, atol=0)
    torch.testing.assert_close(grad, grad_eager, rtol=0, atol=0)
    # With dropout the seed draw is traced too: two calls of the compiled graph differ.
    assert not torch.equal(compiled(qkv, 0.5), compiled(qkv, 0.5))


# ---- GPU only ----------------------------------------------------------------------------------


@pytest.mark.requires_cuda
def test_long_sequence_runs_in_linear_memory(seed):
    """N = 16384: the scores would take 16 GiB in eager per (B=1, H=16); the kernel needs O(N)."""
    q = torch.randn(1, 16384, 16, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = flash_attention(q, q, q)
    out.float().sum().backward()
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < 20 * q.numel() * q.element_size()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


@pytest.mark.requires_cuda
@pytest.mark.parametrize("seq_len", [577, 1025, 4096])
def test_long_matches_rule_gpu(seed, seq_len):
    check_attention(1, seq_len, seq_len, 4, 128 if seq_len == 4096 else 64, torch.bfloat16, packed=True)


@pytest.mark.inductor
@pytest.mark.requires_cuda
def test_compile_inductor_cuda(seed):
    qkv = torch.randn(4, 197, 3, 12, 64, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(flash_attention_qkvpacked, fullgraph=True)
    torch.testing.assert_close(compiled(qkv), flash_attention_qkvpacked(qkv))


# ---- the module --------------------------------------------------------------------------------


@pytest.mark.parametrize("qk_norm", [False, True])
def test_module_matches_timm_attention(seed, qk_norm):
    timm_layers = pytest.importorskip("timm.layers")
    ours = FlashAttention(192, num_heads=3, qkv_bias=True, qk_norm=qk_norm).to(DEVICE)
    theirs = timm_layers.Attention(192, num_heads=3, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm)
    theirs = theirs.to(DEVICE)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 50, 192, device=DEVICE)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    mask = torch.rand(2, 1, 50, 50, device=DEVICE) > 0.2
    torch.testing.assert_close(ours(x, attn_mask=mask), theirs(x, attn_mask=mask), rtol=1e-4, atol=1e-4)


def test_module_refuses_unsupported_head_dim():
    with pytest.raises(ValueError, match="head dim"):
        FlashAttention(176, num_heads=4)  # d = 44
    with pytest.raises(ValueError, match="divisible"):
        FlashAttention(190, num_heads=4)


def test_module_attn_drop_in_training_only(seed):
    attn = FlashAttention(64, num_heads=2, attn_drop=0.5).to(DEVICE)
    x = torch.randn(1, 17, 64, device=DEVICE)
    attn.eval()
    assert torch.equal(attn(x), attn(x))
    attn.train()
    assert not torch.equal(attn(x), attn(x))
