"""The size rules of one image request (imagegen/limits.py): each refusal names the rule it breaks."""
from __future__ import annotations

import pytest

from qwenstack.imagegen.limits import ImageRequestLimits, parse_size


@pytest.mark.parametrize("size, message", [
    ("1024", "WIDTHxHEIGHT"),
    ("100000x100000", "over this server's limit"),  # a size too large says so, not that it is malformed
    ("1000x1000", "multiples of 16"),
    ("0x1024", "at least 16"),
])
def test_sizes_are_refused_for_the_rule_they_break(size: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(size, 16, ImageRequestLimits())


def test_a_size_within_the_limits_is_width_then_height() -> None:
    assert parse_size("1024x512", 16, ImageRequestLimits()) == (1024, 512)
