"""VMix script arguments: positional (UI order, API list), a single dict (API), X/Y/Z overrides."""
import math

import pytest

from vmix_lib.webui.arguments import (
    ARG_COUNT,
    MAX_DIMENSION_SLOTS,
    ArgumentDefaults,
    VMixArgumentError,
    VMixSettings,
    apply_overrides,
    parse_script_args,
    to_positional,
)

DIMS = ["color", "lighting", "composition", "focus", "texture", "emotion"]


def positional(**changes):
    values = dict(enabled=True, adapter="a", strength=1.4, alphas=[1.0, 0.5, 0, 1, 1, 1, 1, 1], start=0.1, end=0.9,
                  uncond=False, block_weights="IN:0.5")
    values.update(changes)
    return [values["enabled"], values["adapter"], values["strength"], *values["alphas"], values["start"],
            values["end"], values["uncond"], values["block_weights"]]


def test_positional_in_ui_order():
    s = parse_script_args(positional())
    assert ARG_COUNT == 3 + MAX_DIMENSION_SLOTS + 4 == len(positional())
    assert (s.enabled, s.adapter, s.strength, s.start, s.end, s.uncond, s.block_weights) == (
        True, "a", 1.4, 0.1, 0.9, False, "IN:0.5")
    assert s.alpha_slots == (1.0, 0.5, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0)
    assert s.alphas is None
    assert s.alphas_for(DIMS) == {"color": 1.0, "lighting": 0.5, "composition": 0.0, "focus": 1.0, "texture": 1.0, "emotion": 1.0}
    # slots beyond the adapter's dimensions are ignored
    assert s.alphas_for(["color", "lighting"]) == {"color": 1.0, "lighting": 0.5}


def test_positional_missing_trailing_args_take_defaults():
    s = parse_script_args([True, "a"], ArgumentDefaults(strength=0.8, uncond=False))
    assert (s.strength, s.start, s.end, s.uncond, s.block_weights) == (0.8, 0.0, 1.0, False, "")
    assert s.alpha_slots == (1.0,) * MAX_DIMENSION_SLOTS
    assert parse_script_args([]) == VMixSettings()  # no args: off


def test_positional_accepts_api_json_types():
    s = parse_script_args(positional(enabled="true", strength="1.5", uncond=0, adapter="  a  ", alphas=[1] * 8))
    assert (s.enabled, s.strength, s.uncond, s.adapter) == (True, 1.5, False, "a")
    assert parse_script_args(positional(adapter=None)).adapter is None
    assert parse_script_args(positional(adapter="")).adapter is None


@pytest.mark.parametrize("changes, words", [
    (dict(strength=3.5), "VMix argument strength must be from 0 to 3, got 3.5."),
    (dict(strength=-0.1), "strength must be from 0 to 3"),
    (dict(strength=math.nan), "strength must be from 0 to 3"),
    (dict(strength="lots"), "strength must be a number from 0 to 3, got 'lots'."),
    (dict(strength=True), "strength must be a number"),
    (dict(alphas=[1, 1.5, 1, 1, 1, 1, 1, 1]), "VMix argument alpha 2 must be from 0 to 1, got 1.5."),
    (dict(start=0.6, end=0.4), "VMix start (0.6) must be below end (0.4)"),
    (dict(start=0.5, end=0.5), "must be below end"),
    (dict(end=1.2), "VMix argument end must be from 0 to 1"),
    (dict(enabled="maybe"), "VMix argument enabled must be true or false, got 'maybe'."),
    (dict(adapter=5), "VMix argument adapter must be an adapter name (a string), got 5."),
    (dict(block_weights=["IN:1"]), "VMix argument block weights must be a string"),
])
def test_positional_errors_are_one_sentence(changes, words):
    with pytest.raises(VMixArgumentError) as e:
        parse_script_args(positional(**changes))
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_dict_form_with_defaults():
    s = parse_script_args([{"adapter": "a", "strength": 1.4, "dimensions": {"lighting": 0.5}}, False, "ignored"],
                          ArgumentDefaults(strength=0.7, uncond=False))
    assert (s.enabled, s.adapter, s.strength, s.start, s.end, s.uncond, s.block_weights) == (
        True, "a", 1.4, 0.0, 1.0, False, "")
    assert s.alphas_for(DIMS) == {"lighting": 0.5}  # missing names mean 1 (resolve_alphas)
    assert parse_script_args([{}]).strength == 1.0
    assert parse_script_args([{"enabled": False}]).enabled is False
    assert parse_script_args([{}]).adapter is None  # the first installed adapter, decided by the runner


def test_dict_form_full():
    d = {"enabled": True, "adapter": "name", "strength": 1.4, "dimensions": {"color": 1, "lighting": 0.5},
         "start": 0, "end": 1, "uncond": True, "block_weights": "OUT:0.5"}
    s = parse_script_args([d])
    assert s.alphas == {"color": 1.0, "lighting": 0.5}
    assert (s.start, s.end, s.uncond, s.block_weights) == (0.0, 1.0, True, "OUT:0.5")


@pytest.mark.parametrize("data, words", [
    ({"strenght": 1}, "VMix argument 'strenght' is not known; the keys are: enabled, adapter, strength, dimensions"),
    ({"strength": 9}, "VMix argument 'strength' must be from 0 to 3, got 9."),
    ({"dimensions": [1, 0]}, "VMix argument 'dimensions' must be an object mapping dimension names to weights"),
    ({"dimensions": {"color": 2}}, "VMix argument 'dimensions.color' must be from 0 to 1, got 2."),
    ({"start": 0.9, "end": 0.1}, "VMix start (0.9) must be below end (0.1)"),
    ({"uncond": "sometimes"}, "VMix argument 'uncond' must be true or false"),
])
def test_dict_form_errors(data, words):
    with pytest.raises(VMixArgumentError) as e:
        parse_script_args([data])
    assert words in str(e.value)


def test_overrides_switch_vmix_on_unless_enabled_false():
    off = parse_script_args(positional(enabled=False))
    assert apply_overrides(off, {}) is off
    assert apply_overrides(off, {"strength": 2.0}).enabled is True
    assert apply_overrides(off, {"strength": 2.0}).strength == 2.0
    assert apply_overrides(off, {"enabled": False, "strength": 2.0}).enabled is False
    on = parse_script_args(positional())
    assert apply_overrides(on, {"enabled": False}).enabled is False
    assert apply_overrides(on, {"enabled": True}).enabled is True


def test_overrides_replace_each_field():
    base = parse_script_args(positional())
    s = apply_overrides(base, {"adapter": "b", "start": 0.2, "end": 0.8, "uncond": True})
    assert (s.adapter, s.start, s.end, s.uncond, s.strength) == ("b", 0.2, 0.8, True, base.strength)
    # the original is unchanged (frozen settings, the next X/Y/Z cell starts from the UI values)
    assert (base.adapter, base.start) == ("a", 0.1)


def test_alphas_override_replaces_slots():
    base = parse_script_args(positional())
    assert apply_overrides(base, {"alphas": {}}).alphas_for(DIMS) == {}  # "all": every dimension 1
    preset = apply_overrides(base, {"alphas": {"color": 1.0, "lighting": 1.0, "composition": 0.0, "focus": 0.0,
                                               "texture": 0.0, "emotion": 0.0}})
    assert preset.alphas_for(DIMS)["composition"] == 0.0
    # "*": the weight of every dimension not named (the adapter may come from another axis)
    star = apply_overrides(base, {"alphas": {"*": 0.0, "color": 1.0}})
    assert star.alphas_for(DIMS) == {"color": 1.0, "lighting": 0.0, "composition": 0.0, "focus": 0.0,
                                      "texture": 0.0, "emotion": 0.0}
    assert star.alphas_for(["color", "mood"]) == {"color": 1.0, "mood": 0.0}


@pytest.mark.parametrize("overrides, words", [
    ({"strength": 4.0}, "strength' must be from 0 to 3"),
    ({"start": 0.95}, "VMix start (0.95) must be below end (0.9)"),
    ({"alphas": {"color": 3}}, "'alphas.color' must be from 0 to 1"),
    ({"alphas": ["color"]}, "X/Y/Z override 'alphas' must map dimension names to weights"),
    ({"lambda": 1}, "X/Y/Z override 'lambda' is not known"),
])
def test_override_errors(overrides, words):
    with pytest.raises(VMixArgumentError) as e:
        apply_overrides(parse_script_args(positional()), overrides)
    assert words in str(e.value)


def test_to_positional_round_trip():
    s = parse_script_args(positional())
    assert parse_script_args(to_positional(s)) == s
    d = parse_script_args([{"adapter": "a", "dimensions": {"lighting": 0.25}}])
    again = parse_script_args(to_positional(d, DIMS))
    assert again.alphas_for(DIMS) == {**{n: 1.0 for n in DIMS}, "lighting": 0.25}
