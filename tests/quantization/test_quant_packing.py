"""AWQ and GPTQ packing pinned against words worked out by hand from the formats' own packers, so that the
test writer (quantized_checkpoints.py) and our loader (quantization/prequantized.py), which share their
reading of the formats, cannot share a misreading unnoticed.

The packers as their projects write them (read, not imported: they need CUDA builds):
- AutoAWQ, awq/modules/linear/gemm.py (WQLinear_GEMM.from_linear): intweight is [in, out]; for each group
  of 8 output columns, `qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)` with
  order_map = [0, 2, 4, 6, 1, 3, 5, 7]; qzeros are packed the same way and hold the zero point itself;
  w = (q - z) * s.
- AutoGPTQ / gptqmodel v1 "gptq" serialisation (QuantLinear.pack): qweight [in * bits / 32, out], input
  channel r * (32 / bits) + i in bits i * bits upward of word r; qzeros [groups, out * bits / 32] packed
  the same way along the output, each stored as zero - 1 (the v1 quirk; v2 stores zero);
  w = (q - (stored + 1)) * s.

Each hex word below is written nibble 7 (bits 28-31) first.
"""
from __future__ import annotations

import torch

from quantized_checkpoints import quantize_awq, quantize_gptq
from qwenstack.quantization.prequantized import PrequantScheme, decode_awq, decode_gptq


def words(*hex_words: int) -> torch.Tensor:
    """32-bit words as int32 (the bits, not the value)."""
    return torch.tensor([w - 2**32 if w >= 2**31 else w for w in hex_words], dtype=torch.int32)


def rotated_rows() -> torch.Tensor:
    """[8, 16]: row n holds ((k + n) % 16 - 3) / 2, so every row's min/max quantization at 4 bits, one group of
    16, has scale 0.5 and zero point 3, and the code of (n, k) is (k + n) % 16."""
    k = torch.arange(16)
    return torch.stack([((k + n) % 16 - 3).float() / 2 for n in range(8)])


def test_awq_gemm_words_by_hand() -> None:
    # Output columns 0..7 hold codes 1..8. Nibble i holds column order_map[i]: 1, 3, 5, 7, 2, 4, 6, 8.
    qweight = words(0x86427531).view(1, 1)
    qzeros = words(0x44443333).view(1, 1)  # zero points: columns 0,2,4,6 -> 3, columns 1,3,5,7 -> 4
    scales = torch.tensor([[0.5, 1, 2, 4, 8, 16, 32, 64]], dtype=torch.float16)
    decoded = decode_awq(qweight, qzeros, scales)
    assert decoded.codes.flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert decoded.zeros.flatten().tolist() == [3, 4, 3, 4, 3, 4, 3, 4]
    # w = (q - z) * s: (1-3)*.5, (2-4)*1, (3-3)*2, (4-4)*4, (5-3)*8, (6-4)*16, (7-3)*32, (8-4)*64
    assert decoded.dequantize().flatten().tolist() == [-1, -2, 0, 0, 16, 32, 128, 256]


def test_awq_writer_packs_by_hand() -> None:
    tensors, deq = quantize_awq(rotated_rows(), group=16)
    # Input row k holds codes (k + n) % 16 for output columns n = 0..7, in nibbles 0,2,4,6,1,3,5,7 order.
    assert tensors["qweight"][0].tolist() == words(0x75316420).tolist()  # codes 0..7
    assert tensors["qweight"][1].tolist() == words(0x86427531).tolist()  # codes 1..8
    assert tensors["qweight"][9].tolist() == words(0x0ECAFDB9).tolist()  # codes 9..15, 0
    assert tensors["qzeros"].tolist() == words(0x33333333).view(1, 1).tolist()  # AWQ stores the zero itself
    assert tensors["scales"].tolist() == [[0.5] * 8]
    torch.testing.assert_close(deq, rotated_rows(), atol=0, rtol=0)


def test_gptq_v1_4bit_words_by_hand() -> None:
    # Output column 0's input channels 0..7 hold codes 1..8 (channel i in nibble i); other columns 0.
    qweight = torch.zeros(1, 8, dtype=torch.int32)
    qweight[0, 0] = words(0x87654321)[0]
    qzeros = words(0x76543210).view(1, 1)  # stored zero - 1: columns 0..7 have zero points 1..8
    scales = torch.full((1, 8), 0.25, dtype=torch.float16)
    scheme = PrequantScheme("gptq", 4, 8, zero_offset=1)
    decoded = decode_gptq(qweight, qzeros, scales, None, scheme)
    assert decoded.codes[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert decoded.zeros.flatten().tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    w = decoded.dequantize()
    assert w[0].tolist() == [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75]  # (q - 1) * 0.25
    assert w[7].tolist() == [-2.0] * 8  # (0 - 8) * 0.25
    v2 = decode_gptq(qweight, qzeros, scales, None, PrequantScheme("gptq", 4, 8, zero_offset=0))
    assert v2.zeros.flatten().tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # gptq_v2 stores the zero itself


def test_gptq_v1_8bit_words_by_hand() -> None:
    # 8 bits: four input channels per word, channel i in byte i.
    qweight = torch.zeros(1, 4, dtype=torch.int32)
    qweight[0, 0] = words(0xFF802010)[0]  # channels 0..3: 0x10, 0x20, 0x80, 0xFF
    qzeros = words(0x807F7F7F).view(1, 1)  # stored 127, 127, 127, 128: zero points 128, 128, 128, 129
    scales = torch.ones(1, 4, dtype=torch.float16)
    decoded = decode_gptq(qweight, qzeros, scales, None, PrequantScheme("gptq", 8, 4, zero_offset=1))
    assert decoded.codes[0].tolist() == [16, 32, 128, 255]
    assert decoded.dequantize()[0].tolist() == [-112, -96, 0, 127]
    assert decoded.dequantize()[3].tolist() == [-129] * 4


def test_gptq_writer_packs_by_hand() -> None:
    tensors, deq = quantize_gptq(rotated_rows(), bits=4, group=16, sym=False, perm=None)
    qweight = tensors["qweight"]  # [16 / 8, 8]: column n, input channels 8r..8r+7 -> codes (k + n) % 16
    assert qweight[:, 0].tolist() == words(0x76543210, 0xFEDCBA98).tolist()
    assert qweight[:, 1].tolist() == words(0x87654321, 0x0FEDCBA9).tolist()
    assert tensors["qzeros"].tolist() == words(0x22222222).view(1, 1).tolist()  # zero point 3, stored minus one
    assert tensors["g_idx"].tolist() == [0] * 16
    torch.testing.assert_close(deq, rotated_rows(), atol=0, rtol=0)


def test_gptq_act_order_g_idx_by_hand() -> None:
    # Act-order: groups are formed in quantization order perm; g_idx[channel] names the channel's group.
    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([3, 0, 6, 5, 1, 7, 2, 4])
    tensors, deq = quantize_gptq(w, bits=4, group=4, sym=True, perm=perm)
    assert tensors["g_idx"].tolist() == [0, 1, 1, 0, 1, 0, 0, 1]  # channels 3, 0, 6, 5 form group 0
    decoded = decode_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"],
                          PrequantScheme("gptq", 4, 4, zero_offset=1))
    assert decoded.order.tolist() == [0, 3, 5, 6, 1, 2, 4, 7]  # group 0's channels, then group 1's
    assert torch.equal(decoded.dequantize(), deq)
