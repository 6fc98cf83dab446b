# Flash attention's launch configurations, as data: the tiles (BLOCK_M, BLOCK_N, num_warps,
# num_stages) each kernel's autotuner chooses among, and the one tile where timing is
# impossible or pointless.
#
# For fp16/bf16 on Hopper and Ampere the autotuner times its tiles on the device at the first
# launch per (N bucket, head dim, dropout, dtypes) (ops/_tuning.py). Each tile listed compiles
# without register spills for sm_90 (and sm_80, but where noted) at the head dims and dropout
# setting it is listed for, with every Triton release tests/gpu_compile_check.py is run against
# (scripts/compile_check_tritons.sh): their ptxas builds allocate registers differently, and a
# tile that fits one can spill under another. A tile seen to spill is left out, not listed.
#
# - The block that is the M dimension of a kernel's dots (BLOCK_M in the forward and the dQ
#   kernel, BLOCK_N in the dK/dV kernel) is 16 rows per warp, 64 per warpgroup: Hopper's wgmma
#   runs 64-row tiles per warpgroup, so a smaller one falls back to mma.sync. The one tile seen
#   to compile wrong on a GPU (dK at d = 128) had 64 rows on 8 warps.
# - The other block is the loop's step: 64 only at d <= 64 without dropout (wide_step), where
#   it stays spill-free; 128 x 128 forward tiles only at d = 32 without dropout.
# - dK/dV at d > 64 (BLOCK_D = 128): the 4-warp tile runs unpipelined (num_stages 1); two
#   stages spilled on sm_90.
# - Ampere's forward skips the 64-wide step at d >= 80 with dropout (it spills there).
# - One tile, not tuned: the interpreter (64 x 64, so N = 197 and 257 still cross several tile
#   boundaries), float32 (dots without tensor cores, on small tiles), and the dK/dV kernel with
#   atomic dQ (an autotuner's repeated runs would accumulate dQ several times; at d > 64 a
#   16-row Q step on 128 KV rows, where 32 Q rows spilled with dropout).

import functools
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class Tile:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def config(self) -> triton.Config:
        return triton.Config({"BLOCK_M": self.block_m, "BLOCK_N": self.block_n}, num_warps=self.num_warps,
                             num_stages=self.num_stages)


@dataclass(frozen=True)
class KernelTiles:
    """One kernel's fp16/bf16 tiles: `base`, replaced by `wide_head` at d > 64 where given, plus
    `wide_step` at d <= 64 without dropout and `d32` at d <= 32 without dropout."""

    base: tuple
    wide_head: tuple = ()
    wide_step: tuple = ()
    d32: tuple = ()

    def tiles(self) -> tuple:
        return self.base + self.wide_head + self.wide_step + self.d32


KERNEL_KINDS = ("fwd", "dkdv", "dq")
TILES = {
    "fwd": KernelTiles(base=(Tile(128, 64, 8, 3), Tile(128, 32, 8, 2), Tile(64, 64, 4, 3), Tile(64, 32, 4, 2)),
                       d32=(Tile(128, 128, 8, 2),)),
    "dkdv": KernelTiles(base=(Tile(32, 128, 8, 2), Tile(32, 64, 4, 2)),
                        wide_head=(Tile(32, 128, 8, 2), Tile(32, 64, 4, 1)),
                        wide_step=(Tile(64, 128, 8, 2), Tile(64, 64, 4, 2))),
    "dq": KernelTiles(base=(Tile(128, 32, 8, 2), Tile(64, 32, 4, 2)),
                      wide_step=(Tile(128, 64, 8, 2), Tile(64, 64, 4, 2))),
}
# dK/dV at a head dim held as two column blocks (attention.head_dim_blocks): the 8-warp tile
# alone (at d = 80 the 4-warp one spilled 44 bytes, sm_90), and for atomic dQ a 16 x 64 tile on
# 4 warps, unpipelined (16 x 128 on 8 warps spilled 1276 bytes there).
SPLIT_HEAD_DKDV_TILES = {"dkdv": (Tile(32, 128, 8, 2),), "atomic": Tile(16, 64, 4, 1)}
# Varlen's dK/dV at a head dim in two column blocks (its prologue holds more registers): up to
# d = 96 a 16-row Q step (32 x 128 spilled 16 bytes at d = 80 peeled with triton 3.6, sm_90), and
# with dropout where two 64-wide blocks overlap (104-120) a 16-row step on 64 KV rows, unpipelined
# (32 x 128 on 8 warps spilled 52 bytes there).
VARLEN_SPLIT_HEAD_DKDV_TILES = {"dkdv": Tile(16, 128, 8, 2), "wide_overlap_dropout": Tile(16, 64, 4, 1)}
INTERPRETER_TILE = Tile(64, 64, 4, 1)
FLOAT32_TILES = {"fwd": Tile(64, 32, 4, 1), "bwd": Tile(32, 32, 4, 1)}
ATOMIC_DKDV_TILES = {"narrow_head": Tile(32, 128, 8, 2), "wide_head": Tile(16, 128, 8, 2)}


def every_tile() -> tuple:
    """Every tile any launch may use, for tests that run each shape."""
    tuned = tuple(tile for kernel in TILES.values() for tile in kernel.tiles())
    return (tuned + (INTERPRETER_TILE,) + tuple(FLOAT32_TILES.values()) + tuple(ATOMIC_DKDV_TILES.values())
            + SPLIT_HEAD_DKDV_TILES["dkdv"] + (SPLIT_HEAD_DKDV_TILES["atomic"],)
            + tuple(VARLEN_SPLIT_HEAD_DKDV_TILES.values()))


def tiles_for(kind: str, head_dim: int, dtype: torch.dtype, *, interpreted: bool, atomic_dq: bool = False,
              dropout: bool = False, arch_major: int = 9, split_head: bool = False, varlen: bool = False) -> tuple:
    """The tiles a launch of `kind` (one of KERNEL_KINDS) chooses among: one (run as is) or several
    (tuned). `split_head`: the head dim is held as two column blocks (past d = 96 two overlapping
    64-wide ones). `varlen` dK/dV at a split head dim: VARLEN_SPLIT_HEAD_DKDV_TILES."""
    if kind not in KERNEL_KINDS:
        raise ValueError(f"kind must be one of {KERNEL_KINDS}, got {kind!r}")
    if interpreted:
        return (INTERPRETER_TILE,)
    if dtype == torch.float32:
        return (FLOAT32_TILES["fwd" if kind == "fwd" else "bwd"],)
    if kind == "dkdv" and split_head:
        if atomic_dq:
            return (SPLIT_HEAD_DKDV_TILES["atomic"],)
        if varlen and head_dim <= 96:
            return (VARLEN_SPLIT_HEAD_DKDV_TILES["dkdv"],)
        if varlen and dropout:  # 104-120
            return (VARLEN_SPLIT_HEAD_DKDV_TILES["wide_overlap_dropout"],)
        return SPLIT_HEAD_DKDV_TILES["dkdv"]
    if kind == "dkdv" and atomic_dq:
        return (ATOMIC_DKDV_TILES["narrow_head" if head_dim <= 64 else "wide_head"],)
    kernel = TILES[kind]
    tiles = kernel.wide_head if head_dim > 64 and kernel.wide_head else kernel.base
    if head_dim <= 64 and not dropout:
        tiles += kernel.wide_step
    if head_dim <= 32 and not dropout:
        tiles += kernel.d32
    if kind == "fwd" and arch_major < 9 and head_dim >= 80 and dropout:
        tiles = tuple(tile for tile in tiles if tile.block_n <= 32)
    if kind == "dkdv" and head_dim > 64 and dropout:  # 32 x 64 on 4 warps spilled 20 bytes at d = 128 (triton 3.6)
        tiles = tuple(tile for tile in tiles if tile.num_warps == 8)
    return tiles


@functools.lru_cache(maxsize=None)
def as_configs(tiles: tuple) -> tuple:
    """triton.Configs of `tiles`, the same tuple object for the same tiles (the tuning cache is keyed on it)."""
    return tuple(tile.config() for tile in tiles)
