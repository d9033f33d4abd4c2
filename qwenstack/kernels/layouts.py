"""Weight layouts of the tiled linear kernels (linear_tiled_cpu.cpp): packing a matrix into the blocks the
kernel reads, and back. Pure torch: a packed weight can be made and checked on any machine.
"""
from __future__ import annotations

import torch

TILE_N, TILE_K = 16, 32  # the tile-packed layout's block: 16 output rows x 32 columns (linear_tiled_cpu.cpp)


def can_tile(weight: torch.Tensor) -> bool:
    """Whether a weight [N, K] has a tile-packed form: bfloat16, N a multiple of 16 and K of 32."""
    return weight.dim() == 2 and weight.dtype == torch.bfloat16 and weight.shape[0] % TILE_N == 0 \
        and weight.shape[1] % TILE_K == 0


def pack_tiles(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] -> [N / 16, K / 32, 16, 16, 2]: packed[n / 16][k / 32][(k % 32) / 2][n % 16][k % 2], the
    same elements in the order linear_tiled reads them (one contiguous 1 KiB block per 16 rows x 32 columns)."""
    n, k = weight.shape
    pairs = weight.detach().contiguous().view(torch.int32).view(n // TILE_N, TILE_N, k // TILE_K, TILE_K // 2)
    return pairs.permute(0, 2, 3, 1).contiguous().view(weight.dtype).view(n // TILE_N, k // TILE_K, TILE_K // 2, TILE_N, 2)


def unpack_tiles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_tiles: a new [N, K] matrix. (Pairs of columns move as one int32: eight times
    faster than moving single bfloat16 elements.)"""
    nb, kb = packed.shape[:2]
    pairs = packed.view(torch.int32).view(nb, kb, TILE_K // 2, TILE_N)
    return pairs.permute(0, 3, 1, 2).reshape(nb * TILE_N, kb * TILE_K // 2).contiguous().view(packed.dtype)


def tiled_rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the matrix in pack_tiles' layout, [*ids.shape, K]: an embedding lookup on a tile-packed
    table (each row's column pairs are one int32 every 16 int32 of its blocks, gathered in one indexing)."""
    nb, kb = packed.shape[:2]
    pairs = packed.view(torch.int32).view(nb, kb, TILE_K // 2, TILE_N)
    flat = ids.reshape(-1)
    rows = pairs[flat // TILE_N, :, :, flat % TILE_N]  # [T, K / 32, 16]
    return rows.reshape(flat.numel(), kb * TILE_K // 2).view(packed.dtype).view(*ids.shape, kb * TILE_K)


INT8_TILE_MAX_K = 65536
INT8_TILE_K = 64  # the int8 layout's block: 16 output rows x 64 columns (linear_tiled_cpu.cpp)


def can_tile_int8(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether int8 matrices of shape [*, N, K] have a tile-packed form: N a multiple of 16, K of 64 and at
    most INT8_TILE_MAX_K (the kernel's int32 sums)."""
    return len(shape) >= 2 and shape[-2] % TILE_N == 0 and shape[-1] % INT8_TILE_K == 0 \
        and shape[-1] <= INT8_TILE_MAX_K


def pack_tiles_int8(qweight: torch.Tensor) -> torch.Tensor:
    """int8 [*, N, K] -> uint8 [*, N / 16, K / 64, 16, 16, 4]: packed[n / 16][k / 64][(k % 64) / 4][n % 16][k % 4]
    = w[n][k] + 128, the order and offset linear_tiled_int8 reads (one 1 KiB block per 16 rows x 64 columns,
    a B operand of AMX-INT8; the offset makes the weights the unsigned operand of the byte products)."""
    *stack, n, k = qweight.shape
    offset = qweight.detach().contiguous().view(torch.uint8) ^ 0x80  # two's complement w + 128
    quads = offset.view(torch.int32).view(*stack, n // TILE_N, TILE_N, k // INT8_TILE_K, 16)
    dims = len(stack)
    order = (*range(dims), dims, dims + 2, dims + 3, dims + 1)
    return quads.permute(order).contiguous().view(torch.uint8).view(*stack, n // TILE_N, k // INT8_TILE_K, 16, TILE_N, 4)


def unpack_tiles_int8(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_tiles_int8: a new [*, N, K] matrix (groups of 4 columns move as one int32)."""
    *stack, nb, kb = packed.shape[:-3]
    dims = len(stack)
    quads = packed.contiguous().view(torch.int32).view(*stack, nb, kb, 16, TILE_N)
    order = (*range(dims), dims, dims + 3, dims + 1, dims + 2)
    rows = quads.permute(order).reshape(*stack, nb * TILE_N, kb * INT8_TILE_K // 4).contiguous().view(torch.uint8)
    return (rows ^ 0x80).view(torch.int8)


INT4_COLUMNS = 8  # the int4 layout's unit: 16 output rows x 8 columns in one 64-byte line (linear_tiled_cpu.cpp)


def can_tile_int4(shape: torch.Size | tuple[int, ...], group_size: int) -> bool:
    """Whether int4 codes of shape [*, N, K] in groups of `group_size` columns have a tile-packed form: N a
    multiple of 16, K of the group, the group of 8."""
    return len(shape) >= 2 and shape[-2] % TILE_N == 0 and group_size % INT4_COLUMNS == 0 \
        and shape[-1] % group_size == 0


def pack_tiles_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes uint8 [*, N, K] in 0..15 -> int16 [*, N / 16, K / 8, 16, 2]: packed[n / 16][k / 8][n % 16][e] = sum
    over t in 0..3 of q[n][k0 + 2t + e] << 4t (k0 = k / 8 * 8), the order linear_tiled_int4 reads (one 64-byte
    line per 16 rows x 8 columns; nibble t of its words is the column pair k0 + 2t of a bfloat16 dot product)."""
    *stack, n, k = codes.shape
    octets = codes.detach().contiguous().to(torch.int32).view(*stack, n // TILE_N, TILE_N, k // INT4_COLUMNS, 4, 2)
    nibbles = octets.unbind(dim=-2)  # nibble t: columns k0 + 2t, k0 + 2t + 1
    words = nibbles[0] | (nibbles[1] << 4) | (nibbles[2] << 8) | (nibbles[3] << 12)  # [*, N / 16, 16, K / 8, 2]
    dims = len(stack)
    order = (*range(dims), dims, dims + 2, dims + 1, dims + 3)
    return words.permute(order).contiguous().to(torch.uint16).view(torch.int16)


def unpack_tiles_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_tiles_int4: the codes uint8 [*, N, K]."""
    *stack, nb, octets = packed.shape[:-2]
    dims = len(stack)
    order = (*range(dims), dims, dims + 2, dims + 1, dims + 3)
    words = packed.view(torch.uint16).to(torch.int32).permute(order)  # [*, N / 16, 16, K / 8, 2]
    shifts = torch.arange(0, 16, 4, dtype=torch.int32, device=packed.device).view(4, 1)
    codes = (words.unsqueeze(-2) >> shifts) & 0xF  # [*, N / 16, 16, K / 8, 4, 2]
    return codes.to(torch.uint8).reshape(*stack, nb * TILE_N, octets * INT4_COLUMNS)


def pack_scale_zeros_int4(scale_zeros: torch.Tensor) -> torch.Tensor:
    """Scales and zero points [*, K / G, N, 2] -> [*, N / 16, K / G, 16, 2]: each 16 outputs' pairs for every
    group in one contiguous run, read beside their codes by linear_tiled_int4 (in the [K / G, N] order each
    group's line lay N x 4 bytes from the next: scattered reads that cost the one-row product ~13%)."""
    *stack, groups, n, two = scale_zeros.shape
    dims = len(stack)
    blocks = scale_zeros.view(*stack, groups, n // TILE_N, TILE_N, two)
    return blocks.permute(*range(dims), dims + 1, dims, dims + 2, dims + 3).contiguous()


def unpack_scale_zeros_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_scale_zeros_int4: [*, K / G, N, 2]."""
    *stack, nb, groups, tile, two = packed.shape
    dims = len(stack)
    return packed.permute(*range(dims), dims + 1, dims, dims + 2, dims + 3).reshape(*stack, groups, nb * tile, two)
