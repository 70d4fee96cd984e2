"""WebUI glue for VMix (AUTOMATIC1111 1.6-1.10 and Forge).  The only part of vmix_lib that imports
the WebUI (``modules``, ``gradio``, Forge's ``backend``), and only in host.py, ui.py and xyz.py, inside
functions or when the script loads them.  The other modules are pure and tested without a WebUI.

Helpers for the X/Y/Z axes (vmix_lib.webui.xyz looks them up by name on this package):
    list_adapter_names()             installed adapter names
    validate_adapter_name(name)      canonical installed name, ValueError with one sentence otherwise
    list_adapter_dimension_names()   dimension names used by installed adapters
"""
from __future__ import annotations

from typing import List, Optional

from .library import AdapterLibrary

_library: List[Optional[AdapterLibrary]] = [None]


def default_library() -> AdapterLibrary:
    """The library of the WebUI's adapter folder (created on first use)."""
    if _library[0] is None:
        from . import host

        _library[0] = AdapterLibrary(host.adapter_folder, hasher=host.sha256, shown=host.shown_folder)
    return _library[0]


def set_default_library(library: Optional[AdapterLibrary]) -> None:
    """Use ``library`` for the helpers below (tests; None: the WebUI folder again)."""
    _library[0] = library


def list_adapter_names() -> List[str]:
    return default_library().names()


def validate_adapter_name(name: str) -> str:
    return default_library().validate(name)


def list_adapter_dimension_names() -> List[str]:
    library = default_library()
    names: List[str] = []
    for adapter in library.names():
        try:
            dims = library.info(adapter).dimensions
        except Exception:  # a malformed file has no dimensions to offer
            continue
        for d in dims:
            if d.name not in names:
                names.append(d.name)
    return names
