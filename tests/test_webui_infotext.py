"""Infotext: written by the runner, formatted and parsed the way the WebUI does, pasted back into
the controls ("Read generation parameters"), "Send to", and a paste without VMix."""
import json
import os
import re

import pytest

from test_webui_fakes import single_thread, A1111Model, P, TestHost, make_unet, write_adapter  # noqa: F401  (single_thread: autouse fixture)
from vmix_lib import __version__
from vmix_lib.dimensions import AestheticDimension
from vmix_lib.layers import LAYOUTS
from vmix_lib.webui import infotext
from vmix_lib.webui.arguments import parse_script_args
from vmix_lib.webui.library import AdapterLibrary
from vmix_lib.webui.runner import VMixRunner

# The WebUI's infotext rules (A1111 infotext_utils, same in Forge): keys match \w[\w \-/]+ (so no
# ':', '(' or ')'), "key: value" pairs joined by ", ", a value holding ',', ':' or a new line is
# written as a JSON string.
KEY_RE = re.compile(r"\w[\w \-/]+")
PAIR_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def webui_infotext(params):
    return "a photo\nNegative prompt: blurry\n" + ", ".join(f"{k}: {infotext.quote(v)}" for k, v in params.items())


def webui_parse(text):
    last = text.strip().split("\n")[-1]
    out = {}
    for key, value in PAIR_RE.findall(last):
        out[key] = json.loads(value) if value[:1] == '"' and value[-1:] == '"' else value
    return out


def paste(params, controls_before):
    """What the WebUI does with infotext_fields on paste: None leaves the control as it is."""
    values = []
    for fn, before in zip(infotext.PASTE_FUNCTIONS, controls_before):
        value = fn(params)
        values.append(before if value is None else value)
    return values


BASE = {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7", "Seed": "1", "Size": "512x512"}
CUSTOM_DIMS = (AestheticDimension("texture", "detailed texture", "tqz"), AestheticDimension("color", "vibrant color", "sks"))


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    folder = tmp_path_factory.mktemp("VMix")
    write_adapter(folder / "my_adapter.safetensors")
    write_adapter(folder / "two dims, v2.safetensors", seed=3, dimensions=CUSTOM_DIMS)
    lib = AdapterLibrary(lambda: str(folder))
    infotext.set_adapter_resolver(infotext.library_resolver(lib))
    yield lib
    infotext.set_adapter_resolver(None)


@pytest.fixture(scope="module")
def model():
    return A1111Model(make_unet(LAYOUTS["sd15"], device="meta"))  # real shapes for the fit check


def generate(library, model, args, **p_attrs):
    runner = VMixRunner(TestHost(model), library)
    p = P(model, **p_attrs)
    p.extra_generation_params.update(BASE)
    runner.process(p, args)
    runner.postprocess(p)
    return p.extra_generation_params, runner


ARGS = [True, "my_adapter", 1.4, 1.0, 0.5, 0.0, 1.0, 0.25, 1.0, 1.0, 1.0, 0.2, 0.8, False, "IN:1, MID:0.5"]
DEFAULT_CONTROLS = [False, "my_adapter", 1.0] + [1.0] * 8 + [0.0, 1.0, True, ""]


def test_keys_follow_the_webui_rules_and_read_well(library, model):
    params, _ = generate(library, model, ARGS)
    vmix = {k: v for k, v in params.items() if k.startswith("VMix")}
    short = library.short_hash("my_adapter")
    assert vmix == {
        "VMix": "True",
        "VMix adapter": f"my_adapter ({short})",
        "VMix strength": "1.4",
        "VMix dimensions": "lighting=0.5 composition=0 texture=0.25",
        "VMix range": "0.2-0.8",
        "VMix uncond": "False",
        "VMix block weights": "IN:1, MID:0.5",
        "VMix version": __version__,
    }
    for key in vmix:
        assert KEY_RE.fullmatch(key) and not set(key) & set(":()")


def test_round_trip_restores_every_control(library, model):
    params, _ = generate(library, model, ARGS)
    text = webui_infotext(params)
    assert '"IN:1, MID:0.5"' in text  # quoted by the WebUI's rule, unquoted on parse
    parsed = webui_parse(text)
    restored = paste(parsed, DEFAULT_CONTROLS)
    assert restored == ARGS
    assert parse_script_args(restored) == parse_script_args(ARGS)


def test_round_trip_of_defaults_and_dict_args(library, model):
    params, _ = generate(library, model, [{"adapter": "my_adapter"}])
    assert "VMix dimensions" not in params and "VMix block weights" not in params
    restored = paste(webui_parse(webui_infotext(params)), [False, "x", 2.0] + [0.0] * 8 + [0.5, 0.6, False, "OUT:0"])
    assert restored == [True, "my_adapter", 1.0] + [1.0] * 8 + [0.0, 1.0, True, ""]


def test_paste_without_vmix_turns_it_off_and_leaves_the_rest(library):
    parsed = webui_parse(webui_infotext(BASE))
    before = list(ARGS)
    assert paste(parsed, before) == [False] + ARGS[1:]
    assert infotext.paste_enabled({"VMix": "False"}) is False


def test_skipped_generation_still_restores_the_settings(library, model):
    sdxl = A1111Model(make_unet(LAYOUTS["sdxl"], device="meta"))
    params, _ = generate(library, sdxl, ARGS)
    assert params["VMix"].startswith("skipped (this SD1.5 adapter does not fit the loaded model, which is SDXL")
    parsed = webui_parse(webui_infotext(params))
    assert paste(parsed, DEFAULT_CONTROLS) == ARGS


def test_extra_generation_params_are_rewritten_every_generation(library, model):
    """X/Y/Z cells and batch img2img share one dict: nothing of a cell may reach the next one."""
    shared = dict(BASE)
    runner = VMixRunner(TestHost(model), library)
    p1 = P(model)
    p1.extra_generation_params = shared
    runner.process(p1, ARGS)
    runner.postprocess(p1)
    assert shared["VMix block weights"] == "IN:1, MID:0.5"
    p2 = P(model, vmix_overrides={"strength": 0.5})
    p2.extra_generation_params = shared
    runner.process(p2, [True, "my_adapter", 1.0])
    runner.postprocess(p2)
    assert shared["VMix strength"] == "0.5" and "VMix block weights" not in shared and "VMix dimensions" not in shared
    p3 = P(model)
    p3.extra_generation_params = shared
    runner.process(p3, [False])
    assert not [k for k in shared if k.startswith("VMix")] and shared == BASE


def test_dimensions_map_to_the_pasted_adapters_slots(library, model):
    args = [True, "two dims, v2", 1.0, 0.0, 0.5] + [1.0] * 6 + [0.0, 1.0, True, ""]
    params, _ = generate(library, model, args)
    assert params["VMix dimensions"] == "texture=0 color=0.5"
    assert params["VMix adapter"].startswith("two dims, v2 (")
    assert '"two dims, v2 (' in webui_infotext(params)  # the comma makes the WebUI quote it
    restored = paste(webui_parse(webui_infotext(params)), DEFAULT_CONTROLS)
    assert restored[:5] == [True, "two dims, v2", 1.0, 0.0, 0.5]


def test_renamed_adapter_is_found_by_its_hash(library, model, tmp_path):
    params, _ = generate(library, model, ARGS)
    folder = library.folder()
    os.link(os.path.join(folder, "my_adapter.safetensors"), os.path.join(folder, "renamed.safetensors"))
    try:
        moved = dict(params, **{"VMix adapter": params["VMix adapter"].replace("my_adapter", "gone")})
        assert infotext.paste_adapter(webui_parse(webui_infotext(moved))) in ("my_adapter", "renamed")
        unknown = dict(params, **{"VMix adapter": "elsewhere (0123456789)"})
        assert infotext.paste_adapter(unknown) == "elsewhere"  # shown as is; generation then says it is not installed
    finally:
        os.remove(os.path.join(folder, "renamed.safetensors"))


def test_paste_functions_never_raise():
    junk = {"VMix": "True", "VMix strength": "lots", "VMix range": "a-b", "VMix dimensions": "x=y z", "VMix uncond": "?",
            "VMix block weights": 5, "VMix adapter": 7}
    values = [fn(junk) for fn in infotext.PASTE_FUNCTIONS]
    assert values[0] is True and values[2] is None and values[-4:] == [0.0, 1.0, True, ""]


def test_send_to_pairs_the_controls_of_both_tabs():
    """"Send to" copies the fields whose target is in paste_field_names, pairing the two tabs' lists
    in order; the targets are the same module-level objects in both tabs."""
    txt2img = list(zip([f"t{i}" for i in range(15)], infotext.PASTE_FUNCTIONS))
    img2img = list(zip([f"i{i}" for i in range(15)], infotext.PASTE_FUNCTIONS))
    names = ["Prompt", "Negative prompt", "Steps"] + list(infotext.PASTE_FUNCTIONS)
    inputs = [c for c, name in txt2img if name in names]
    outputs = [c for c, name in img2img if name in names]
    assert inputs == [f"t{i}" for i in range(15)] and outputs == [f"i{i}" for i in range(15)]
