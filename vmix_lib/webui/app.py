"""The VMix script's process-wide state in a running WebUI: one runner, callbacks registered once.

vmix_lib stays imported across "Reload UI" while scripts/vmix.py is executed again, so the runner
and the callback functions live here: the script file calls ``setup()`` each time it loads, and the
callbacks (module-level functions, stable identities) are de-duplicated before registering.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from . import default_library, host, infotext
from .runner import VMixRunner

_runner: List[Optional[VMixRunner]] = [None]
_notice_shown = [False]


def runner() -> VMixRunner:
    if _runner[0] is None:
        _runner[0] = VMixRunner(host.WebUIHost(), default_library(), host.runner_options)
    return _runner[0]


def on_cfg_denoiser(params) -> None:
    runner().on_cfg_denoiser(params)


def unload_report(removed: int, left: int) -> str:
    """The console line "Reload UI" leaves (browser checks read it to see that nothing stays hooked)."""
    state = "nothing of VMix is left on the loaded model" if not left else f"{left} VMix hook(s) are still there"
    return f"[VMix] Reload UI: removed {removed} VMix hook(s); {state}."


def on_ui_tabs():
    try:
        from .making import tab

        return tab.on_ui_tabs()
    except Exception as e:  # the tab must never keep the panel from loading
        print(f"[VMix] the VMix tab is not shown: {type(e).__name__}: {e}", file=sys.stderr)
        return []


def on_app_started(demo, app) -> None:
    try:
        from .making import api

        api.on_app_started(demo, app)
    except Exception as e:
        print(f"[VMix] the /vmix/v1 API routes are not available: {type(e).__name__}: {e}", file=sys.stderr)


def on_script_unloaded() -> None:
    from .making.job import BOARD

    BOARD.request_stop()  # a VMix tab job stops after its current step and saves
    removed, left = runner().shutdown()
    print(unload_report(removed, left), file=sys.stderr, flush=True)


def on_ui_settings() -> None:
    host.add_settings()


def on_before_ui() -> None:
    try:
        from . import xyz

        xyz.register_xyz_axes()
    except Exception as e:  # optional axes must never keep the script from loading
        print(f"[VMix] X/Y/Z plot axes not registered: {type(e).__name__}: {e}", file=sys.stderr)


def has_input_accordion() -> bool:
    try:
        from modules.ui_components import InputAccordion  # noqa: F401  (A1111 1.6+ and Forge have it)

        return True
    except ImportError:
        return False


def setup() -> bool:
    """Called by scripts/vmix.py at every load.  False when this WebUI is too old for VMix."""
    if not has_input_accordion():
        print("[VMix] needs AUTOMATIC1111 1.6 or newer, or Forge; this WebUI is older, so VMix is not shown.",
              file=sys.stderr)
        return False
    host.register_callbacks(on_cfg_denoiser, on_script_unloaded, on_ui_settings, on_before_ui, on_ui_tabs, on_app_started)
    infotext.set_adapter_resolver(infotext.library_resolver(default_library()))
    on_before_ui()  # also now: with --nowebui the API snapshots the X/Y/Z axes before on_before_ui
    if not _notice_shown[0]:
        _notice_shown[0] = True
        notice = host.startup_notice()
        if notice:
            print(f"[VMix] {notice}", file=sys.stderr)
    return True


def build_ui(script):
    from . import ui

    return ui.build(script, default_library(), host.loaded_model_report, host.runner_options())
