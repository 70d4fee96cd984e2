"""X/Y/Z plot axes (vmix_lib.webui.xyz) against a stand-in for the WebUI's scripts/xyz_grid.py.

The stand-in mirrors the real signatures read in A1111 v1.10.1 and Forge scripts/xyz_grid.py:
AxisOption(label, type, apply, format_value=..., confirm=None, cost=0.0, choices=None, prepare=None),
boolean_choice(reverse=False), a module-level axis_options list, and a Script class whose __module__
is the file name the WebUI loads it under.  Float values are the ones xyz_grid produces for
"0-2 (+0.25)" (np.arange(start, end + step, step)), "0-2 [5]" (np.linspace) and "0,0.5,1,1.5,2".
"""
import math
import subprocess
import sys
import types
from collections import namedtuple
from copy import copy
from itertools import product

import numpy as np
import pytest

from vmix_lib.dimensions import DEFAULT_DIMENSIONS, resolve_alphas
from vmix_lib.webui import xyz

ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
VMIX_LABELS = [
    "[VMix] Strength", "[VMix] Enabled", "[VMix] Adapter", "[VMix] Dimensions",
    "[VMix] Start", "[VMix] End", "[VMix] Uncond",
]


def make_xyz_module(module_name="xyz_grid.py"):
    mod = types.ModuleType(module_name)

    def format_value_add_label(p, opt, x):
        if type(x) == float:
            x = round(x, 8)
        return f"{opt.label}: {x}"

    class AxisOption:
        def __init__(self, label, type, apply, format_value=format_value_add_label, confirm=None, cost=0.0,
                     choices=None, prepare=None):
            self.label = label
            self.type = type
            self.apply = apply
            self.format_value = format_value
            self.confirm = confirm
            self.cost = cost
            self.prepare = prepare
            self.choices = choices

    def boolean_choice(reverse=False):
        def choice():
            return ["False", "True"] if reverse else ["True", "False"]
        return choice

    def do_nothing(p, x, xs):
        pass

    def apply_field(field):
        def fun(p, x, xs):
            setattr(p, field, x)
        return fun

    Script = type("Script", (), {"__module__": module_name})
    mod.AxisOption = AxisOption
    mod.boolean_choice = boolean_choice
    mod.format_value_add_label = format_value_add_label
    mod.Script = Script
    mod.axis_options = [AxisOption("Nothing", str, do_nothing), AxisOption("Seed", int, apply_field("seed"))]
    return mod


def scripts_data_for(mod):
    other = type("Script", (), {"__module__": "prompts_from_file.py"})
    return [
        ScriptClassData(other, "/webui/scripts/prompts_from_file.py", "/webui", types.ModuleType("prompts_from_file.py")),
        ScriptClassData(mod.Script, "/webui/scripts/xyz_grid.py", "/webui", mod),
    ]


class P:
    """The few attributes of StableDiffusionProcessing the axes and a grid cell touch."""

    def __init__(self):
        self.seed = 1
        self.extra_generation_params = {}


def registered(mod=None, **helpers):
    mod = mod or make_xyz_module()
    helpers.setdefault("list_adapters", lambda: ["vmix_sd15", "vmix_sdxl"])
    assert xyz.register_xyz_axes(scripts_data_for(mod), **helpers) is True
    return mod, {o.label: o for o in mod.axis_options}


def run_grid(p, axes):
    """The cell loop of xyz_grid: a shallow copy per cell, each axis' apply on it, in order."""
    cells = []
    value_lists = [values for _, values in axes]
    for combo in product(*value_lists):
        pc = copy(p)
        for (opt, values), v in zip(axes, combo):
            opt.apply(pc, v, values)
        cells.append((combo, pc))
    return cells


# ---------------------------------------------------------------- import and registration


def test_imports_without_a_webui():
    code = ("import sys, vmix_lib.webui.xyz as m; "
            "assert not {'modules', 'gradio'} & set(sys.modules), sorted({'modules', 'gradio'} & set(sys.modules)); "
            "print(m.register_xyz_axes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    # no WebUI: one warning line, no traceback
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("[VMix] X/Y/Z plot axes not registered: ModuleNotFoundError"), lines


def test_registration_appends_all_axes_once():
    mod = make_xyz_module()
    before = list(mod.axis_options)
    data = scripts_data_for(mod)
    assert xyz.register_xyz_axes(data, list_adapters=lambda: []) is True
    assert [o.label for o in mod.axis_options] == ["Nothing", "Seed"] + VMIX_LABELS
    assert mod.axis_options[:2] == before  # existing options untouched, same objects
    after_first = list(mod.axis_options)
    assert xyz.register_xyz_axes(data, list_adapters=lambda: []) is True  # e.g. again from on_before_ui
    assert xyz.register_xyz_axes(data) is True
    assert mod.axis_options == after_first
    assert all(type(o) is mod.AxisOption for o in mod.axis_options[2:])  # both tabs: plain AxisOption


def test_registration_adds_only_missing_labels():
    mod = make_xyz_module()
    mod.axis_options.append(mod.AxisOption("[VMix] Strength", float, lambda p, x, xs: None))
    assert xyz.register_axes(mod, lambda: []) == VMIX_LABELS[1:]
    labels = [o.label for o in mod.axis_options]
    assert sorted(labels) == sorted(set(labels))
    assert xyz.register_axes(mod, lambda: []) == []


@pytest.mark.parametrize("module_name", ["xyz_grid.py", "scripts.xyz_grid"])
def test_finds_xyz_grid_under_both_module_names(module_name):
    mod = make_xyz_module(module_name)
    assert xyz.find_xyz_module(scripts_data_for(mod)) is mod
    assert xyz.register_xyz_axes(scripts_data_for(mod), list_adapters=lambda: []) is True
    assert [o.label for o in mod.axis_options][2:] == VMIX_LABELS


def test_xyz_grid_not_loaded_returns_false_quietly(capsys):
    other = type("Script", (), {"__module__": "xy_grid_of_someone_else.py"})
    data = [ScriptClassData(other, "/x.py", "/", types.ModuleType("x"))]
    assert xyz.register_xyz_axes(data) is False
    assert xyz.register_xyz_axes([]) is False
    # an entry with the right name but no axis list (e.g. a broken copy) is not xyz_grid
    broken = type("Script", (), {"__module__": "xyz_grid.py"})
    assert xyz.register_xyz_axes([ScriptClassData(broken, "/x.py", "/", types.ModuleType("xyz_grid.py"))]) is False
    assert capsys.readouterr().err == ""


def test_registration_failure_is_one_warning_line(capsys):
    mod = make_xyz_module()
    mod.axis_options.append(object())  # something without .label is tolerated...
    mod.AxisOption = None  # ...but a module whose AxisOption cannot be called is not
    assert xyz.register_xyz_axes(scripts_data_for(mod)) is False
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("[VMix] X/Y/Z plot axes not registered: TypeError")


def test_api_only_snapshot_sees_import_time_axes():
    # xyz_grid's ui() snapshots [x for x in axis_options if type(x) == AxisOption or ...] when the
    # API is created, before on_before_ui in --nowebui mode: registering at import must suffice.
    mod, _ = registered()
    current = [x for x in mod.axis_options if type(x) == mod.AxisOption or x.is_img2img is False]
    labels = [x.label for x in current]
    assert labels.index("[VMix] Strength") == 2 and set(VMIX_LABELS) <= set(labels)


# ---------------------------------------------------------------- Strength, Start, End


XYZ_FLOAT_LISTS = {
    "0-2 (+0.25)": np.arange(0.0, 2.0 + 0.25, 0.25).tolist(),
    "0-2 [5]": np.linspace(start=0.0, stop=2.0, num=5).tolist(),
    "0,0.5,1,1.5,2": [float(v) for v in "0,0.5,1,1.5,2".split(",")],
}


@pytest.mark.parametrize("text", sorted(XYZ_FLOAT_LISTS))
def test_strength_values_xyz_produces(text):
    _, axes = registered()
    opt = axes["[VMix] Strength"]
    assert opt.type is float and opt.choices is None  # a text box; xyz parses the ranges itself
    xs = [opt.type(x) for x in XYZ_FLOAT_LISTS[text]]
    opt.confirm(P(), xs)
    cells = run_grid(P(), [(opt, xs)])
    assert [pc.vmix_overrides for _, pc in cells] == [{"strength": x} for x in xs]
    if text != "0-2 (+0.25)":
        assert [pc.vmix_overrides["strength"] for _, pc in cells] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [opt.format_value(P(), opt, x) for x in xs][:2] == ["[VMix] Strength: 0.0",
                                                              f"[VMix] Strength: {xs[1]}"]


def test_float_values_are_rounded_like_their_labels():
    _, axes = registered()
    opt = axes["[VMix] Strength"]
    xs = np.arange(0.0, 0.4 + 0.1, 0.1).tolist()  # "0-0.4 (+0.1)": 0.30000000000000004
    assert xs[3] != 0.3
    cells = run_grid(P(), [(opt, xs)])
    assert cells[3][1].vmix_overrides == {"strength": 0.3}
    assert opt.format_value(P(), opt, xs[3]) == "[VMix] Strength: 0.3"


@pytest.mark.parametrize("bad", [3.25, -0.25, math.nan, math.inf])
def test_strength_out_of_range_is_refused_before_the_grid(bad):
    _, axes = registered()
    with pytest.raises(ValueError) as e:
        axes["[VMix] Strength"].confirm(P(), [0.0, 1.0, bad])
    msg = str(e.value)
    assert msg.startswith(f"[VMix] Strength value {bad!r} is ") and "between 0 and 3" in msg
    assert "\n" not in msg


def test_start_end_are_fractions():
    _, axes = registered()
    for label, key in (("[VMix] Start", "start"), ("[VMix] End", "end")):
        opt = axes[label]
        xs = np.linspace(0.0, 1.0, 5).tolist()
        opt.confirm(P(), xs)
        cells = run_grid(P(), [(opt, xs)])
        assert [pc.vmix_overrides for _, pc in cells] == [{key: v} for v in (0.0, 0.25, 0.5, 0.75, 1.0)]
        # "0-1 (+0.3)" overshoots to 1.2 in xyz_grid's arange: refused with the axis named
        with pytest.raises(ValueError, match=rf"^\[VMix\] {label[7:]} value 1\.2 is outside 0 to 1; "):
            opt.confirm(P(), np.arange(0.0, 1.0 + 0.3, 0.3).tolist())


# ---------------------------------------------------------------- Enabled, Uncond


@pytest.mark.parametrize("label,key", [("[VMix] Enabled", "enabled"), ("[VMix] Uncond", "uncond")])
def test_boolean_axes(label, key):
    mod, axes = registered()
    opt = axes[label]
    assert opt.type is str
    assert opt.choices() == ["False", "True"] == mod.boolean_choice(reverse=True)()
    values = ["False", "True", "true", "no", "1"]  # dropdown values, or typed with "Use text inputs"
    opt.confirm(P(), values)
    cells = run_grid(P(), [(opt, values)])
    assert [pc.vmix_overrides for _, pc in cells] == [{key: v} for v in (False, True, True, False, True)]
    assert all(type(pc.vmix_overrides[key]) is bool for _, pc in cells)
    with pytest.raises(ValueError, match=rf"^\[VMix\] {label[7:]} value 'maybe' is not True or False; use True or False\.$"):
        opt.confirm(P(), ["True", "maybe"])


def test_any_value_axis_switches_vmix_on_and_enabled_false_wins():
    _, axes = registered()
    strength, enabled = axes["[VMix] Strength"], axes["[VMix] Enabled"]
    cells = run_grid(P(), [(strength, [0.0, 1.0]), (enabled, ["True", "False"])])
    got = {combo: (pc.vmix_overrides, xyz.vmix_enabled_for(False, xyz.overrides_of(pc))) for combo, pc in cells}
    assert got == {
        (0.0, "True"): ({"strength": 0.0, "enabled": True}, True),
        (0.0, "False"): ({"strength": 0.0, "enabled": False}, False),
        (1.0, "True"): ({"strength": 1.0, "enabled": True}, True),
        (1.0, "False"): ({"strength": 1.0, "enabled": False}, False),
    }
    # a strength sweep alone switches VMix on without ticking the accordion
    only_strength = run_grid(P(), [(strength, [0.5])])[0][1]
    assert xyz.vmix_enabled_for(False, xyz.overrides_of(only_strength)) is True
    # outside a grid: the accordion decides
    assert xyz.overrides_of(P()) == {}
    assert xyz.vmix_enabled_for(False, {}) is False and xyz.vmix_enabled_for(True, {}) is True
    assert xyz.vmix_enabled_for(False, {"enabled": True}) is True


# ---------------------------------------------------------------- no leaks between cells


def test_apply_never_mutates_a_dict_shared_between_cells():
    _, axes = registered()
    p = P()
    shared = {"strength": 9.0}
    p.vmix_overrides = shared
    egp = p.extra_generation_params
    cells = run_grid(p, [(axes["[VMix] Strength"], [0.0, 2.0]), (axes["[VMix] Dimensions"], ["color", "all"])])
    dicts = [pc.vmix_overrides for _, pc in cells]
    assert len({id(d) for d in dicts} | {id(shared)}) == 5  # a fresh dict per cell
    assert shared == {"strength": 9.0} and p.vmix_overrides is shared
    assert egp == {} and all(pc.extra_generation_params is egp for _, pc in cells)
    assert [d["strength"] for d in dicts] == [0.0, 0.0, 2.0, 2.0]
    dicts[0]["alphas"]["color"] = 0.25  # the alphas dicts are not shared either
    assert dicts[2]["alphas"] == {"*": 0.0, "color": 1.0}


def test_a_failing_cell_leaves_nothing_for_the_next():
    # cell 1 gets an adapter the script will refuse; cell 2 must start from p's state, not cell 1's
    _, axes = registered(list_adapters=lambda: ["ok", "wrong_model"])
    p = P()
    cells = run_grid(p, [(axes["[VMix] Adapter"], ["wrong_model", "ok"])])
    assert cells[0][1].vmix_overrides == {"adapter": "wrong_model"}
    assert cells[1][1].vmix_overrides == {"adapter": "ok"}
    assert not hasattr(p, "vmix_overrides")


# ---------------------------------------------------------------- Adapter


def test_adapter_axis_choices_confirm_and_canonical_names():
    def validate(name):
        names = {"vmix_sd15": "vmix_sd15", "vmix_sd15.safetensors": "vmix_sd15"}
        if name not in names:
            raise ValueError(f"no VMix adapter named {name!r} in models/VMix; installed: vmix_sd15")
        return names[name]

    installed = ["vmix_sd15"]
    _, axes = registered(list_adapters=lambda: list(installed), validate_adapter=validate)
    opt = axes["[VMix] Adapter"]
    assert opt.type is str and opt.cost > 0.0
    assert opt.choices() == ["vmix_sd15"]
    installed.append("vmix_new")  # choices are read each time the dropdown is filled
    assert opt.choices() == ["vmix_sd15", "vmix_new"]
    opt.confirm(P(), ["vmix_sd15", "vmix_sd15.safetensors"])
    with pytest.raises(ValueError) as e:
        opt.confirm(P(), ["vmix_sd15", "missing"])
    assert str(e.value) == "[VMix] Adapter: no VMix adapter named 'missing' in models/VMix; installed: vmix_sd15"
    with pytest.raises(ValueError, match=r"^\[VMix\] Adapter has an empty adapter name"):
        opt.confirm(P(), [" "])
    cells = run_grid(P(), [(opt, ["vmix_sd15.safetensors", "missing"])])
    # apply runs outside xyz_grid's per-cell try, so it never raises; the script reports "missing"
    assert [pc.vmix_overrides for _, pc in cells] == [{"adapter": "vmix_sd15"}, {"adapter": "missing"}]
    assert opt.format_value(P(), opt, "vmix_sd15") == "[VMix] Adapter: vmix_sd15"


def test_helpers_are_looked_up_lazily_in_vmix_lib_webui(monkeypatch):
    import vmix_lib.webui as package

    mod, axes = registered(list_adapters=None)  # what register_xyz_axes() with no arguments does
    monkeypatch.setattr(package, "list_adapter_names", lambda: [])
    assert axes["[VMix] Adapter"].choices() == []
    monkeypatch.delattr(package, "validate_adapter_name")
    axes["[VMix] Adapter"].confirm(P(), ["anything"])  # no validator: the script checks at generation

    def validate_adapter_name(name):
        if name != "late_adapter":
            raise ValueError(f"no VMix adapter named {name!r}")
        return name

    # Helpers are read from the package each time, so later definitions are picked up.
    monkeypatch.setattr(package, "list_adapter_names", lambda: ["late_adapter"])
    monkeypatch.setattr(package, "validate_adapter_name", validate_adapter_name, raising=False)
    monkeypatch.setattr(package, "list_adapter_dimension_names", lambda: ["gloss"])
    assert axes["[VMix] Adapter"].choices() == ["late_adapter"]
    with pytest.raises(ValueError, match=r"^\[VMix\] Adapter: no VMix adapter named 'anything'$"):
        axes["[VMix] Adapter"].confirm(P(), ["anything"])
    assert axes["[VMix] Dimensions"].choices()[-1] == "gloss"
    axes["[VMix] Dimensions"].confirm(P(), ["gloss+color"])


# ---------------------------------------------------------------- Dimensions


DEFAULT_NAMES = [d.name for d in DEFAULT_DIMENSIONS]


def test_dimension_choices_and_presets():
    _, axes = registered()
    opt = axes["[VMix] Dimensions"]
    assert opt.type is str
    assert opt.choices() == ["all", "none"] + DEFAULT_NAMES
    values = ["all", "none", "color", "color+lighting", " Color + Lighting ", "color=0.5+focus"]
    opt.confirm(P(), values)
    cells = run_grid(P(), [(opt, values)])
    assert [pc.vmix_overrides["alphas"] for _, pc in cells] == [
        {"*": 1.0},
        {"*": 0.0},
        {"*": 0.0, "color": 1.0},
        {"*": 0.0, "color": 1.0, "lighting": 1.0},
        {"*": 0.0, "color": 1.0, "lighting": 1.0},
        {"*": 0.0, "color": 0.5, "focus": 1.0},
    ]
    assert opt.format_value(P(), opt, "color+lighting") == "[VMix] Dimensions: color+lighting"


def test_presets_resolve_against_the_adapters_dimensions():
    dims = list(DEFAULT_DIMENSIONS)
    expect = {
        "all": [1.0] * 6,
        "none": [0.0] * 6,
        "color": [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
        "color+lighting": [1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
        "emotion=0.25+color": [1.0, 0.0, 0.0, 0.0, 0.0, 0.25],
    }
    for text, alphas in expect.items():
        override = xyz.parse_dimensions(text, DEFAULT_NAMES)
        assert resolve_alphas(dims, xyz.expand_alphas(override, DEFAULT_NAMES)) == alphas, text
    # an adapter with other dimensions: "*" follows the adapter, named ones are kept for its error
    assert xyz.expand_alphas({"*": 0.0, "color": 1.0}, ["color", "gloss"]) == {"color": 1.0, "gloss": 0.0}
    assert xyz.expand_alphas({"*": 0.0, "color": 1.0}, ["gloss"]) == {"gloss": 0.0, "color": 1.0}
    assert xyz.expand_alphas({}, ["color"]) == {} and xyz.expand_alphas(None, ["color"]) == {}
    assert xyz.expand_alphas({"color": 0.5}, ["color", "gloss"]) == {"color": 0.5}


@pytest.mark.parametrize("value,problem", [
    ("colour", "names an unknown aesthetic dimension 'colour'"),
    ("color+", "has an empty dimension name"),
    ("color+color", "names 'color' twice"),
    ("all+color", "combines 'all' with other names"),
    ("color+none", "combines 'none' with other names"),
    ("", "has an empty dimension name"),
])
def test_dimension_errors_name_the_problem(value, problem):
    _, axes = registered()
    with pytest.raises(ValueError) as e:
        axes["[VMix] Dimensions"].confirm(P(), ["all", value])
    msg = str(e.value)
    assert msg.startswith(f"[VMix] Dimensions value {value!r} {problem}; use all, none, or dimension names joined with +")
    assert msg.endswith("from: " + ", ".join(DEFAULT_NAMES) + ".")


@pytest.mark.parametrize("weight", ["2", "-0.5", "abc", "nan", ""])
def test_dimension_weight_errors(weight):
    with pytest.raises(ValueError) as e:
        xyz.parse_dimensions(f"color={weight}", DEFAULT_NAMES)
    assert str(e.value) == (f"[VMix] Dimensions value 'color={weight}' gives 'color' the weight {weight!r}; "
                            "a weight after = must be a number between 0 and 1.")


def test_dimension_vocabulary_includes_installed_adapters():
    _, axes = registered(list_dimensions=lambda: ["gloss", "color"])
    opt = axes["[VMix] Dimensions"]
    assert opt.choices() == ["all", "none"] + DEFAULT_NAMES + ["gloss"]
    opt.confirm(P(), ["gloss", "gloss+color"])
    _, plain = registered(list_dimensions=lambda: [])
    with pytest.raises(ValueError, match="unknown aesthetic dimension 'gloss'"):
        plain["[VMix] Dimensions"].confirm(P(), ["gloss"])


def test_start_and_end_mean_one_thing_in_the_422_message_the_hints_and_the_axes():
    """Issue 21: the 422 said "fractions of the sampling steps" while the hover hint spoke of the noise
    schedule.  One sentence, arguments.RANGE_MEANING, true on A1111 (the sampler's denoiser calls)
    and on Forge (percent_to_sigma's noise schedule), is used by all of them."""
    from vmix_lib.webui import panel
    from vmix_lib.webui.arguments import RANGE_MEANING, VMixArgumentError, parse_script_args

    assert RANGE_MEANING == ("fractions of the denoising from 0 (most noise) to 1 (no noise left), counted in the "
                             "sampler's steps on A1111 and along the model's noise schedule on Forge")
    with pytest.raises(VMixArgumentError) as e:
        parse_script_args([{"start": 0.6, "end": 0.4}])
    assert str(e.value) == f"VMix start (0.6) must be below end (0.4); both are {RANGE_MEANING}."
    hints = panel.hints()
    assert hints["start"] == f"Start: where VMix begins acting (0 = from the first step). Start and End are {RANGE_MEANING}."
    assert hints["end"] == f"End: where VMix stops acting, above Start (1 = until the last step). Start and End are {RANGE_MEANING}."
    _, axes = registered()
    for label in ("[VMix] Start", "[VMix] End"):
        with pytest.raises(ValueError) as e:
            axes[label].confirm(P(), [1.5])
        assert str(e.value) == f"{label} value 1.5 is outside 0 to 1; use {RANGE_MEANING}."
