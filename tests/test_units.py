import pytest

from crepa_mem.units import GiB, MiB, dtype_bytes, format_bytes, parse_size


@pytest.mark.parametrize("text,expected", [
    ("24GiB", 24 * GiB), ("24GB", 24 * GiB), ("24 gb", 24 * GiB), ("80G", 80 * GiB),
    ("512MiB", 512 * MiB), ("1.5GiB", int(1.5 * GiB)), ("4096", 4096),
])
def test_parse_size_reads_card_sizes_as_binary(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "24 parsecs", "GiB", "-3GiB"])
def test_parse_size_rejects_garbage_with_examples(text):
    with pytest.raises(ValueError, match="examples: 24GB"):
        parse_size(text)


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536 * MiB) == "1.50 GiB"
    assert format_bytes(-2 * MiB) == "-2.00 MiB"
    assert format_bytes(2 * 10**9, binary=False) == "2.00 GB"


def test_dtype_bytes():
    assert dtype_bytes("fp32") == dtype_bytes("torch.float32") == 4
    assert dtype_bytes("bf16") == dtype_bytes("fp16") == 2
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        dtype_bytes("fp64")
