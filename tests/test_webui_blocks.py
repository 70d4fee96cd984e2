"""Block-weight text -> per-layer λ factors, on the real SD1.5 (16) and SDXL (70) layer lists."""
import pytest

from vmix_lib.layers import LAYOUTS
from vmix_lib.webui.blocks import block_keys, layer_group, parse_block_weights

SD15 = [l.name for l in LAYOUTS["sd15"]]
SDXL = [l.name for l in LAYOUTS["sdxl"]]


def test_layer_numbering_is_input_middle_output():
    assert len(SD15) == 16 and len(SDXL) == 70
    assert [layer_group(n)[0] for n in SD15] == ["IN"] * 6 + ["MID"] + ["OUT"] * 9
    assert [layer_group(n)[0] for n in SDXL] == ["IN"] * 24 + ["MID"] * 10 + ["OUT"] * 36
    assert block_keys(SD15) == ["IN1", "IN2", "IN4", "IN5", "IN7", "IN8", "MID"] + [f"OUT{i}" for i in range(3, 12)]
    assert block_keys(SDXL) == ["IN4", "IN5", "IN7", "IN8", "MID"] + [f"OUT{i}" for i in range(6)]


def test_empty_means_one_everywhere():
    assert parse_block_weights("", SD15) == {}
    assert parse_block_weights("   ", SD15) == {}
    assert parse_block_weights("ALL:1", SD15) == {}


def test_groups():
    w = parse_block_weights("IN:1, MID:0.5, OUT:0", SD15)
    assert w == {SD15[6]: 0.5, **{n: 0.0 for n in SD15[7:]}}
    w = parse_block_weights("in=0.25; m=0", SDXL)
    assert set(w) == set(SDXL[:34]) and all(w[n] == 0.25 for n in SDXL[:24]) and all(w[n] == 0.0 for n in SDXL[24:34])


def test_blocks_and_override_order():
    w = parse_block_weights("ALL:0, OUT3:1, IN04:0.5", SD15)
    assert w[SD15[2]] == 0.5  # input_blocks.4
    assert SD15[7] not in w  # output_blocks.3 back to 1
    assert sum(1 for v in w.values() if v == 0.0) == 14
    # SDXL input_blocks.7 holds 10 transformer blocks
    w = parse_block_weights("IN7:0", SDXL)
    assert list(w) == [n for n in SDXL if n.startswith("input_blocks.7.")] and len(w) == 10


def test_layer_numbers_and_ranges():
    w = parse_block_weights("0-5:0, 6:2, 15:0.5", SD15)
    assert w == {**{n: 0.0 for n in SD15[:6]}, SD15[6]: 2.0, SD15[15]: 0.5}
    assert parse_block_weights("24-33:0", SDXL) == {n: 0.0 for n in SDXL if n.startswith("middle_block")}


def test_bare_list_of_one_weight_per_layer():
    values = [1.0] * 16
    values[3], values[10] = 0.0, 0.5
    w = parse_block_weights(",".join(str(v) for v in values), SD15)
    assert w == {SD15[3]: 0.0, SD15[10]: 0.5}


@pytest.mark.parametrize("text, words", [
    ("IN3:1", "VMix block weights: IN3 has no cross-attention in SD1.5 adapters; blocks with it are: IN1, IN2, IN4"),
    ("FOO:1", "VMix block weights: 'FOO' is not a block key"),
    ("IN", "VMix block weights: 'IN' has no weight"),
    ("IN:x", "VMix block weights: 'IN:x' needs a weight from 0 to 2"),
    ("OUT:5", "needs a weight from 0 to 2"),
    ("16:1", "VMix block weights: layer number 16 is outside 0-15 (SD1.5 adapters have 16 layers)."),
    ("5-2:1", "layer number 5-2 is outside 0-15"),
    ("1,1,1", "a list of plain numbers needs one weight per layer, 16 for SD1.5 adapters, got 3"),
])
def test_errors_are_one_sentence(text, words):
    with pytest.raises(ValueError) as e:
        parse_block_weights(text, SD15, "SD1.5")
    assert words in str(e.value)
    assert "\n" not in str(e.value)
