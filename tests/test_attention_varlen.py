"""vit_kernels.ops.flash_attention_varlen: attention inside each of several packed sequences.

Held to the numerics rule against per-sequence eager attention (vit_kernels.reference) in the
same dtype and in float64, forward and dq/dk/dv, kernel allocations poisoned with NaN.
"""

import pytest
import torch

from vit_kernels import reference
from vit_kernels.ops import cu_seqlens, flash_attention_varlen
from vit_kernels.ops import attention_varlen as varlen_module
from vit_kernels.ops.attention import attention_dropout_mask
from vit_kernels.testing import assert_rule, kernel_device, no_host_reads, poisoned_allocations, recording_launches

DEVICE = kernel_device()
ON_GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# Lengths of 1, of 0, and on either side of the 64-row blocks (and the 16-row narrow tail).
LENGTHS = [1, 63, 17, 0, 64, 65, 129, 16]


def _leaves(total_q, total_k, heads, head_dim, dtype):
    q = torch.randn(total_q, heads, head_dim, device=DEVICE).to(dtype).requires_grad_()
    k = torch.randn(total_k, heads, head_dim, device=DEVICE).to(dtype).requires_grad_()
    v = torch.randn(total_k, heads, head_dim, device=DEVICE).to(dtype).requires_grad_()
    return [q, k, v]


def _grads(fn, leaves, dout, as_dtype=None):
    copies = [t.detach().to(as_dtype or t.dtype).requires_grad_() for t in leaves]
    out = fn(*copies)
    return out, torch.autograd.grad(out, copies, dout.to(out.dtype))


def check_varlen(lengths_q, lengths_k, heads, head_dim, dtype, dropout_masks=None, **kwargs):
    cu_q, cu_k = cu_seqlens(lengths_q, DEVICE), cu_seqlens(lengths_k, DEVICE)
    leaves = _leaves(sum(lengths_q), sum(lengths_k), heads, head_dim, dtype)
    dout = torch.randn(sum(lengths_q), heads, head_dim, device=DEVICE).to(dtype)
    p = kwargs.get("dropout_p", 0.0)

    def ours(q, k, v):
        return flash_attention_varlen(q, k, v, cu_q, cu_k, **kwargs)

    def eager(q, k, v):
        return reference.attention_varlen(q, k, v, cu_q, cu_k, head_dim ** -0.5, dropout_masks, p)

    with poisoned_allocations():
        out, grads = _grads(ours, leaves, dout)
    out_eager, grads_eager = _grads(eager, leaves, dout)
    out_ref, grads_ref = _grads(eager, leaves, dout, torch.float64)
    assert out.shape == leaves[0].shape and out.is_contiguous()
    assert_rule("out", out, out_ref, out_eager)
    for name, g, g_eager, g_ref in zip(["dq", "dk", "dv"], grads, grads_eager, grads_ref):
        assert_rule(name, g, g_ref, g_eager)
    return out, grads


@pytest.mark.parametrize("head_dim", [64, 72])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_per_sequence_attention(seed, dtype, head_dim):
    check_varlen(LENGTHS, LENGTHS, 2, head_dim, dtype)


def test_overlapping_head_dim_runs_every_loop_peeled(seed, monkeypatch):
    """What Hopper runs for varlen at d = 72 without dropout: every kernel peeled, by the rule."""
    from vit_kernels.ops import attention as attention_module

    monkeypatch.setattr(attention_module, "_peel_tail", lambda arch_major, dropout_p: True)
    launches = recording_launches(monkeypatch, varlen_module)
    check_varlen(LENGTHS, LENGTHS, 2, 72, torch.float16)
    assert len(launches) == 3 and all(c["PEEL_TAIL"] and c["NARROW_TAIL"] == 16 for _, c in launches)
    assert all(c["STRIDES_ALIGNED"] for _, c in launches)  # [T, H, 72] contiguous


def test_an_odd_head_count_promises_its_row_strides(seed, monkeypatch):
    """Three heads of 72: rows of 216, a multiple of 8 but not of 16, which the kernels then promise
    themselves (STRIDES_ALIGNED 8, _row_stride); the results by the rule."""
    launches = recording_launches(monkeypatch, varlen_module)
    check_varlen(LENGTHS, LENGTHS, 3, 72, torch.float16)
    assert len(launches) == 3 and all(c["STRIDES_ALIGNED"] == 8 for _, c in launches)


def test_split_head_dkdv_tiles():
    """Varlen's dK/dV at a head dim in two column blocks takes the tiles that compiled spill-free
    on sm_90 with triton 3.6 and 3.8 (VARLEN_SPLIT_HEAD_DKDV_TILES): a 16-row Q step up to d = 96,
    16 x 64 with dropout at 104-120; dense launches and dQ, the usual tiles."""
    from vit_kernels.ops.attention_configs import SPLIT_HEAD_DKDV_TILES, VARLEN_SPLIT_HEAD_DKDV_TILES, tiles_for

    def tiles(kind, head_dim, **kwargs):
        return tiles_for(kind, head_dim, torch.bfloat16, interpreted=False, split_head=True, **kwargs)

    for head_dim in (72, 80, 88, 96):
        for dropout in (False, True):
            assert tiles("dkdv", head_dim, dropout=dropout, varlen=True) == (VARLEN_SPLIT_HEAD_DKDV_TILES["dkdv"],)
            assert tiles("dkdv", head_dim, dropout=dropout) == SPLIT_HEAD_DKDV_TILES["dkdv"]
    for head_dim in (104, 112, 120):
        assert tiles("dkdv", head_dim, dropout=True, varlen=True) == (
            VARLEN_SPLIT_HEAD_DKDV_TILES["wide_overlap_dropout"],)
        assert tiles("dkdv", head_dim, dropout=True) == SPLIT_HEAD_DKDV_TILES["dkdv"]
        assert tiles("dkdv", head_dim, dropout=False, varlen=True) == SPLIT_HEAD_DKDV_TILES["dkdv"]
    for head_dim in (72, 80, 88, 96, 104):
        assert tiles("dq", head_dim, dropout=True, varlen=True) == tiles("dq", head_dim, dropout=True)


def test_atomic_dq_matches_per_sequence_attention(seed):
    check_varlen(LENGTHS, LENGTHS, 2, 64, torch.float16, deterministic=False)


def test_query_and_key_lengths_differ(seed):
    """Cross-attention per sequence (attention pooling's one query, a sequence with no keys: 0)."""
    out, grads = check_varlen([1, 17, 3, 65], [197, 1, 0, 64], 2, 32, torch.float32)
    assert torch.equal(out[18:21], torch.zeros_like(out[18:21]))


def test_one_sequence_is_flash_attention(seed):
    from vit_kernels.ops import flash_attention

    q, k, v = (torch.randn(197, 2, 64, device=DEVICE) for _ in range(3))
    cu = cu_seqlens([197], DEVICE)
    torch.testing.assert_close(flash_attention_varlen(q, k, v, cu, cu), flash_attention(q[None], k[None], v[None])[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hint", [1, 10_000], ids=["too_small", "huge"])
def test_max_seqlen_is_only_a_hint(seed, hint):
    """The grid has a slot per block of every sequence whatever max_seqlen says: any value
    computes every row, bit for bit the same."""
    cu = cu_seqlens(LENGTHS, DEVICE).clone()  # a tensor the op did not build: read once, no hint from it
    q, k, v = _leaves(sum(LENGTHS), sum(LENGTHS), 2, 32, torch.float32)
    want = flash_attention_varlen(q, k, v, cu, cu, max(LENGTHS), max(LENGTHS))
    got = flash_attention_varlen(q, k, v, cu, cu, hint, hint)
    assert torch.equal(want, got)
    (dq_want,) = torch.autograd.grad(want.sum(), q)
    (dq_got,) = torch.autograd.grad(got.sum(), q)
    assert torch.equal(dq_want, dq_got)


def test_dropout_masks_match_between_forward_and_backward(seed, monkeypatch):
    """Sequence i draws with seed + i the mask a batch of one would: the forward and the backward
    by the rule against per-sequence eager attention with those masks."""
    seed_value = torch.tensor(4242)
    monkeypatch.setattr(varlen_module, "draw_seed", lambda device: seed_value)
    lengths, p = [17, 1, 65, 33], 0.2
    masks = [attention_dropout_mask(seed_value + i, 1, 2, n, n, p, DEVICE) for i, n in enumerate(lengths)]
    check_varlen(lengths, lengths, 2, 64, torch.float32, dropout_masks=masks, dropout_p=p)
    check_varlen(lengths, lengths, 2, 64, torch.float16, dropout_masks=masks, dropout_p=p, deterministic=False)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dropout", [False, True], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("head_dim", [72, 88, 104])
def test_every_varlen_config_is_correct_on_gpu(seed, monkeypatch, head_dim, dropout):
    """Each config varlen's launches may pick at the overlapping head dims (its own tiles with
    dropout there), forced one at a time on the device, by the rule: the interpreter runs one tile."""
    from vit_kernels.ops.attention import KERNEL_KINDS, _attn_fwd_kernel
    from vit_kernels.testing import forcing_one_config

    seed_value = torch.tensor(4242)
    monkeypatch.setattr(varlen_module, "draw_seed", lambda device: seed_value)
    lengths, p = [17, 1, 197, 65], (0.2 if dropout else 0.0)
    masks = [attention_dropout_mask(seed_value + i, 1, 2, n, n, p, DEVICE) for i, n in enumerate(lengths)] \
        if dropout else None
    original = varlen_module.launch_configs
    for kind in KERNEL_KINDS:
        for config in original(kind, head_dim, torch.bfloat16, _attn_fwd_kernel, dropout=dropout, varlen=True):
            monkeypatch.setattr(varlen_module, "launch_configs", forcing_one_config(original, kind, config))
            check_varlen(lengths, lengths, 2, head_dim, torch.bfloat16, dropout_masks=masks, dropout_p=p)


def test_dropout_draws_new_masks_and_never_reads_the_host(seed):
    lengths = [17, 40]
    cu = cu_seqlens(lengths, DEVICE)
    q = torch.randn(sum(lengths), 2, 32, device=DEVICE, requires_grad=True)
    with no_host_reads():
        a = flash_attention_varlen(q, q, q, cu, cu, dropout_p=0.5)
        b = flash_attention_varlen(q, q, q, cu, cu, dropout_p=0.5)
        torch.autograd.grad((a + b).sum(), q)
    assert not torch.equal(a, b)


def test_no_host_read_with_built_or_once_checked_lengths(seed):
    """cu_seqlens() checks its lengths on the host; a tensor built elsewhere is read once, the
    first time it is seen (the step's other layers and the backward read nothing)."""
    q = torch.randn(sum(LENGTHS), 2, 32, device=DEVICE, requires_grad=True)
    cu = cu_seqlens(LENGTHS, DEVICE)
    with no_host_reads():
        out = flash_attention_varlen(q, q, q, cu, cu)
        torch.autograd.grad(out.sum(), q)
    other = cu.clone()
    flash_attention_varlen(q, q, q, other, other)
    with no_host_reads():
        flash_attention_varlen(q, q, q, other, other)
    other.add_(0)  # a write (version bump): read again
    with pytest.raises(AssertionError), no_host_reads():
        flash_attention_varlen(q, q, q, other, other)


def test_empty_and_float64(seed):
    q = torch.randn(0, 2, 32, device=DEVICE, requires_grad=True)
    cu = cu_seqlens([0, 0], DEVICE)
    out = flash_attention_varlen(q, q, q, cu, cu)
    assert out.shape == (0, 2, 32)
    out.sum().backward()
    q64, k64, v64 = (torch.randn(20, 2, 16, dtype=torch.float64) for _ in range(3))
    cu = cu_seqlens([5, 15])
    assert torch.equal(flash_attention_varlen(q64, k64, v64, cu, cu),
                       reference.attention_varlen(q64, k64, v64, cu, cu, 16 ** -0.5))


def _qkv(total=20, d=32, dtype=torch.float32):
    return [torch.randn(total, 2, d, device=DEVICE, dtype=dtype) for _ in range(3)]


def _cu(values, dtype=torch.int32, device=DEVICE):
    return torch.tensor(values, dtype=dtype, device=device)


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((*_qkv(), _cu([0, 5, 20], torch.int64), _cu([0, 5, 20])), {}, TypeError, "cu_seqlens_q must be int32"),
        ((*_qkv(), [0, 5, 20], _cu([0, 5, 20])), {}, TypeError, "cu_seqlens_q must be a torch.Tensor"),
        ((*_qkv(), _cu([1, 5, 20]), _cu([1, 5, 20])), {}, ValueError, "cu_seqlens_q must start at 0"),
        ((*_qkv(), _cu([0, 12, 5, 20]), _cu([0, 12, 5, 20])), {}, ValueError, "non-decreasing, got 12 then 5"),
        ((*_qkv(), _cu([0, 5, 19]), _cu([0, 5, 19])), {}, ValueError, r"last entry must be the token count \(20\)"),
        ((*_qkv(), _cu([0, 5, 20]), _cu([0, 5, 21])), {}, ValueError, "cu_seqlens_k's last entry"),
        ((*_qkv(), _cu([0, 5, 20]), _cu([0, 5, 20], device="meta")), {}, ValueError, "cu_seqlens_k is on meta"),
        ((*_qkv(), _cu([[0, 20]]), _cu([[0, 20]])), {}, ValueError, "must be 1-D with at least 2 entries"),
        ((*_qkv(), _cu([0]), _cu([0])), {}, ValueError, "must be 1-D with at least 2 entries"),
        ((*_qkv(), _cu([0, 20]), _cu([0, 5, 20])), {}, ValueError, "one entry per sequence boundary"),
        ((*_qkv(d=44), _cu([0, 20]), _cu([0, 20])), {}, ValueError, "multiple of 8 from 8 to 128"),
        ((*[t[None] for t in _qkv()], _cu([0, 20]), _cu([0, 20])), {}, ValueError, r"\[total_tokens, H, d\]"),
        ((_qkv()[0], *_qkv(dtype=torch.float16)[1:], _cu([0, 20]), _cu([0, 20])), {}, TypeError, "share one dtype"),
        ((*_qkv(), _cu([0, 20]), _cu([0, 20]), 2.5), {}, TypeError, "max_seqlen_q must be an int"),
        ((*_qkv(), _cu([0, 20]), _cu([0, 20]), -1), {}, ValueError, "max_seqlen_q must be >= 0"),
        ((*_qkv(), _cu([0, 20]), _cu([0, 20])), dict(dropout_p=1.0), ValueError, "dropout_p"),
    ],
)
def test_bad_input_is_named(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        flash_attention_varlen(*args, **kwargs)


@pytest.mark.parametrize("lengths,error,match", [([3, -1], ValueError, r"lengths\[1\] must be >= 0"),
                                                 ([3, 2.0], TypeError, r"lengths\[1\] must be an int")])
def test_cu_seqlens_checks_lengths(lengths, error, match):
    with pytest.raises(error, match=match):
        cu_seqlens(lengths)


def test_built_lengths_must_match_the_token_count():
    with pytest.raises(ValueError, match=r"cu_seqlens_q's last entry must be the token count \(20\), got 19"):
        flash_attention_varlen(*_qkv(), cu_seqlens([4, 15], DEVICE), cu_seqlens([4, 16], DEVICE))


@pytest.mark.inductor
def test_opcheck(seed):
    q, k, v = (torch.randn(30, 2, 32, device=DEVICE, requires_grad=True) for _ in range(3))
    cu = cu_seqlens([10, 1, 19], DEVICE)
    fwd = torch.ops.vit_kernels.flash_attention_varlen_fwd.default
    torch.library.opcheck(fwd, (q, k, v, cu, cu, 19, 19, 0.125, 0.0, None, True))
    torch.library.opcheck(fwd, (q, k, v, cu, cu, 0, 0, 0.125, 0.2, torch.tensor(7), False))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = fwd(q, k, v, cu, cu, 19, 19, 0.125, 0.0, None, True)
    torch.library.opcheck(torch.ops.vit_kernels.flash_attention_varlen_bwd.default,
                          (torch.randn_like(out), q, k, v, out, lse, cu, cu, 19, 19, 0.125, 0.0, None, True))


@pytest.mark.inductor
def test_compile_fullgraph_without_a_host_read(seed):
    """Traced whole (no graph break): no .item() of a length, no value check while tracing."""
    def attend(qkv, cu):
        q, k, v = qkv.unbind(1)
        return flash_attention_varlen(q, k, v, cu, cu).sum()

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    qkv = torch.randn(30, 3, 2, 32, device=DEVICE, requires_grad=True)
    cu = torch.tensor([0, 10, 11, 30], dtype=torch.int32, device=DEVICE)
    out = compiled(qkv, cu)
    (grad,) = torch.autograd.grad(out, qkv)
    eager_qkv = qkv.detach().requires_grad_()
    want = attend(eager_qkv, cu)
    (want_grad,) = torch.autograd.grad(want, eager_qkv)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(grad, want_grad)


# ---- key-padded batches (SigLIP2's NaFlex): flash_attention_key_padded ---------------------------------


def _key_valid(batch, n_k, valid_counts, scattered=False):
    valid = torch.zeros(batch, n_k, dtype=torch.bool, device=DEVICE)
    for b, count in enumerate(valid_counts):
        if scattered:  # not a prefix: every other key, then the rest
            valid[b, torch.randperm(n_k, generator=torch.Generator().manual_seed(b))[:count].to(DEVICE)] = True
        else:
            valid[b, :count] = True
    return valid


@pytest.mark.parametrize("scattered", [False, True], ids=["prefix", "scattered"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padded_matches_masked_attention(seed, dtype, scattered):
    """Every query row (padded ones too) attends to its batch's valid keys, by the rule against
    eager masked attention; forward and dq/dk/dv (masked keys get zero dk, dv)."""
    from vit_kernels.ops import flash_attention_key_padded

    valid = _key_valid(3, 70, [70, 41, 1], scattered)
    leaves = [torch.randn(3, 70, 2, 72, device=DEVICE).to(dtype).requires_grad_() for _ in range(3)]
    dout = torch.randn(3, 70, 2, 72, device=DEVICE).to(dtype)
    with poisoned_allocations():
        out, grads = _grads(lambda q, k, v: flash_attention_key_padded(q, k, v, valid), leaves, dout)
    eager = _grads(lambda q, k, v: reference.attention_key_padded(q, k, v, valid), leaves, dout)
    oracle = _grads(lambda q, k, v: reference.attention_key_padded(q, k, v, valid), leaves, dout, torch.float64)
    assert out.shape == (3, 70, 2, 72)
    assert_rule("out", out, oracle[0], eager[0])
    for name, g, g_eager, g_ref in zip(["dq", "dk", "dv"], grads, eager[1], oracle[1]):
        assert_rule(name, g, g_ref, g_eager)
    assert torch.count_nonzero(grads[1][~valid]) == 0 and torch.count_nonzero(grads[2][~valid]) == 0


def test_key_padded_never_reads_the_host_and_compiles(seed):
    from vit_kernels.ops import flash_attention_key_padded

    valid = _key_valid(2, 33, [33, 20])
    q, k, v = (torch.randn(2, 33, 2, 64, device=DEVICE) for _ in range(3))
    with no_host_reads():
        out = flash_attention_key_padded(q, k, v, valid)
    torch.testing.assert_close(out, reference.attention_key_padded(q, k, v, valid), rtol=1e-4, atol=1e-4)
    no_keys = flash_attention_key_padded(q, k, v, torch.zeros_like(valid))
    assert torch.count_nonzero(no_keys) == 0  # a batch with no valid key gets 0
    compiled = torch.compile(flash_attention_key_padded, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, valid), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key_valid, error, match", [
    (torch.ones(2, 33, dtype=torch.int64), TypeError, "key_valid must be a bool tensor"),
    (torch.ones(2, 32, dtype=torch.bool), ValueError, r"key_valid must have shape \(2, 33\)"),
])
def test_key_padded_bad_mask_is_named(key_valid, error, match):
    from vit_kernels.ops import flash_attention_key_padded

    q = torch.randn(2, 33, 2, 64)
    with pytest.raises(error, match=match):
        flash_attention_key_padded(q, q, q, key_valid)
