"""The adapter folder: listing, name validation, cached metadata, cached loading, short hashes.

Adapters are addressed by name only: the file name without ``.safetensors``, directly inside the
model folder.  Names with path separators, '..', absolute paths or unknown names are refused with
one sentence before any file is touched, so no request can read a file outside the folder.

Loaded adapters stay on the CPU (the mixer computes V_a on the UNet's device) and are cached by
path + modification time + size, so a generation does not re-read a 300 MB file; so is the verdict of
the full check (every tensor read, finite), so the panel marks damaged files in its list (every
file is read once per version, not at every refresh) and names the damage when one is selected.

Messages name the folder as users see it (``shown_folder``: relative to the WebUI folder, e.g.
"models/VMix"), never the server's absolute path, because they reach HTTP API clients; the
exceptions carry the same sentence with the full path for the server's console (``console``).
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..adapter_file import EXTENSION, PICKLE_EXTENSIONS, AdapterError, AdapterInfo, load_adapter, read_adapter_info
from ..mixing import VMixAdapter

HASH_LENGTH = 10
NO_OFFICIAL_WEIGHTS = (
    "No official VMix weights were ever released, so adapters are made with this extension's trainer "
    "(see the README)."
)
_DRIVE_RE = re.compile(r"^[A-Za-z]:")

Stamp = Tuple[int, int]
Hasher = Callable[[str, str], Optional[str]]  # (path, title) -> full sha256 hex or None


class AdapterNameError(ValueError):
    """An adapter name that cannot be used.  str(): the sentence for users and API clients;
    ``console``: the same sentence with the folder's full path."""

    def __init__(self, message: str, console: Optional[str] = None):
        super().__init__(message)
        self.console = console or message


def console_text(error: BaseException) -> str:
    """The console form of an error's sentence (the full folder path where it names one)."""
    return getattr(error, "console", None) or str(error)


def shown_folder(path: str, roots: Sequence[str] = (), outside: str = "the adapter folder") -> str:
    """``path`` relative to the first of ``roots`` (the WebUI's folders) that holds it, with '/'
    ("models/VMix"); ``outside`` for a folder elsewhere, so no absolute path is shown."""
    path = os.path.normpath(os.path.abspath(path))
    for root in roots:
        if not root:
            continue
        root = os.path.normpath(os.path.abspath(root))
        try:
            relative = os.path.relpath(path, root)
        except ValueError:  # another drive (Windows)
            continue
        if relative == os.curdir:
            return "the WebUI folder"
        if relative != os.pardir and not relative.startswith(os.pardir + os.sep):
            return relative.replace(os.sep, "/")
    return outside


def _stamp(path: str) -> Stamp:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class AdapterLibrary:
    """One model folder.  ``folder`` is called each time, so a changed setting takes effect at once;
    ``shown`` turns it into the text users see (default: the full path, for use outside a WebUI)."""

    def __init__(self, folder: Callable[[], str], hasher: Optional[Hasher] = None, cache_size: int = 2,
                 loader: Callable[..., VMixAdapter] = load_adapter, shown: Optional[Callable[[str], str]] = None):
        self._folder = folder
        self._hasher = hasher
        self._loader = loader
        self._shown = shown
        self._cache_size = max(1, int(cache_size))
        self._lock = threading.RLock()
        self._infos: Dict[str, Tuple[Stamp, object]] = {}
        self._adapters: "OrderedDict[str, Tuple[Stamp, VMixAdapter]]" = OrderedDict()
        self._hashes: Dict[str, Tuple[Stamp, Optional[str]]] = {}
        self._checks: Dict[str, Tuple[Stamp, Optional[AdapterError]]] = {}
        self.loads = 0  # files actually read by load() (for tests and diagnostics)

    # -- folder -----------------------------------------------------------------------------
    def folder(self) -> Optional[str]:
        """The adapter folder, or None when there is none (outside a WebUI, without --vmix-dir)."""
        raw = self._folder()
        return os.path.abspath(os.path.expanduser(raw)) if raw else None

    def names(self) -> List[str]:
        """Installed adapter names, sorted case-insensitively."""
        folder = self.folder()
        if folder is None:
            return []
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return []
        names = []
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.lower().endswith(EXTENSION):
                continue
            try:
                if not entry.is_file():
                    continue
            except OSError:
                continue
            names.append(entry.name[: -len(EXTENSION)])
        return sorted(names, key=lambda n: (n.lower(), n))

    def shown_folder(self) -> Optional[str]:
        """The folder as users and API clients see it (see the module docstring)."""
        folder = self.folder()
        if folder is None or self._shown is None:
            return folder
        try:
            return self._shown(folder)
        except Exception:  # never show a path because the helper failed
            return "the adapter folder"

    def default_name(self) -> Optional[str]:
        """The adapter a new panel and a dict without "adapter" use: the first installed one that
        loads completely, so a stray LoRA, a broken download or a file holding NaN that sorts first is
        not picked (it would hide the α sliders behind a warning, or be skipped after the job); the
        first name when none loads (its problem is then shown)."""
        names = self.names()
        for name in names:
            try:
                if self.check(name) is None:
                    return name
            except Exception:  # never let one odd file break the panel (it is built at startup)
                continue
        return names[0] if names else None

    def no_adapter_message(self, console: bool = False) -> str:
        folder = self.folder() if console else self.shown_folder()
        if folder is None:
            return f"no VMix adapter folder is available (the WebUI's models folder was not found; use --vmix-dir). {NO_OFFICIAL_WEIGHTS}"
        return f"no VMix adapter is installed in {folder}; put a VMix adapter (.safetensors) there. {NO_OFFICIAL_WEIGHTS}"

    def _error(self, sentence: Callable[[Optional[str]], str]) -> AdapterNameError:
        """An AdapterNameError whose sentence names the folder as shown, and in full on the console."""
        return AdapterNameError(sentence(self.shown_folder()), console=sentence(self.folder()))

    # -- names ------------------------------------------------------------------------------
    def validate(self, name) -> str:
        """The canonical installed name for ``name``; ValueError with one sentence otherwise."""
        if not isinstance(name, str):
            raise ValueError(f"a VMix adapter name must be a string, got {name!r}.")
        raw = name
        name = name.strip()
        if not name:
            raise ValueError("no VMix adapter name was given; pick one of the installed adapters.")
        if "\x00" in name or "/" in name or "\\" in name or (os.sep in name) or (os.altsep and os.altsep in name):
            raise ValueError(
                f"VMix adapter name {raw!r} must be a plain name from the adapter folder, without folders or path separators."
            )
        if os.path.isabs(name) or _DRIVE_RE.match(name):
            raise ValueError(f"VMix adapter name {raw!r} is a path; give only the adapter's name from the adapter folder.")
        if ".." in name:
            raise ValueError(f"VMix adapter name {raw!r} contains '..'; give only the adapter's name from the adapter folder.")
        lower = name.lower()
        if lower.endswith(PICKLE_EXTENSIONS):
            raise ValueError(
                f"VMix adapter {raw!r} is a pickle file, which can run code when loaded; VMix adapters are .safetensors files."
            )
        if lower.endswith(EXTENSION):
            name = name[: -len(EXTENSION)]
        names = self.names()
        if name in names:
            return name
        folded = [n for n in names if n.lower() == name.lower()]
        if len(folded) == 1:
            return folded[0]
        if not names:
            raise AdapterNameError(f"VMix adapter {raw!r} is not installed: {self.no_adapter_message()}",
                                   console=f"VMix adapter {raw!r} is not installed: {self.no_adapter_message(console=True)}")
        listed = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise self._error(lambda folder: f"VMix adapter {raw!r} is not installed in {folder}; installed adapters: {listed}.")

    def path_of(self, name: str) -> str:
        name = self.validate(name)
        folder = self.folder()
        for entry in os.scandir(folder):  # validate() found the name, so the folder exists
            if entry.name[: -len(EXTENSION)] == name and entry.name.lower().endswith(EXTENSION):
                return os.path.join(folder, entry.name)
        raise self._error(lambda shown: f"VMix adapter {name!r} disappeared from {shown}; press the refresh button.")

    # -- metadata, loading, hashes ----------------------------------------------------------
    def info(self, name: str) -> AdapterInfo:
        """Metadata only (cached); raises AdapterError for a malformed file."""
        path = self.path_of(name)
        stamp = _stamp(path)
        with self._lock:
            cached = self._infos.get(path)
            if cached is None or cached[0] != stamp:
                try:
                    result: object = read_adapter_info(path)
                except AdapterError as e:
                    result = e
                cached = (stamp, result)
                self._infos[path] = cached
        if isinstance(cached[1], AdapterError):
            raise cached[1]
        return cached[1]  # type: ignore[return-value]

    def load(self, name: str) -> VMixAdapter:
        """The adapter on the CPU, from the cache when the file has not changed."""
        path = self.path_of(name)
        stamp = _stamp(path)
        with self._lock:
            cached = self._adapters.get(path)
            if cached is not None and cached[0] == stamp:
                self._adapters.move_to_end(path)
                return cached[1]
            self._adapters.pop(path, None)
            try:
                adapter = self._loader(path, device="cpu")
            except AdapterError as e:
                self._checks[path] = (stamp, e)
                raise
            self.loads += 1
            self._checks[path] = (stamp, None)
            self._adapters[path] = (stamp, adapter)
            while len(self._adapters) > self._cache_size:
                self._adapters.popitem(last=False)
            return adapter

    def check(self, name: str, keep: bool = True) -> Optional[AdapterError]:
        """None when the file loads completely (every tensor read and finite), else the loader's
        AdapterError.  Cached by path, modification time and size: each file is checked once.
        ``keep``: keep the loaded adapter in the cache (False when checking a whole list, so the
        adapter in use is not pushed out)."""
        path = self.path_of(name)
        stamp = _stamp(path)
        with self._lock:
            cached = self._checks.get(path)
            if cached is not None and cached[0] == stamp:
                return cached[1]
            try:
                if keep:
                    self.load(name)
                else:
                    self._loader(path, device="cpu")
                verdict = None
            except AdapterError as e:
                verdict = e
            self._checks[path] = (stamp, verdict)
            return verdict

    def verdicts(self) -> Dict[str, Optional[AdapterError]]:
        """check() of every listed file, for marking the unusable ones in the adapter list: each
        version of a file is read once (the check's cache), later calls only look at the folder.
        Names that cannot be checked (gone since listing, refused names, an unexpected loader
        error) are left out: their problem shows when they are chosen."""
        out: Dict[str, Optional[AdapterError]] = {}
        for name in self.names():
            try:
                out[name] = self.check(name, keep=False)
            except Exception:
                continue
        return out

    def short_hash(self, name: str) -> Optional[str]:
        """First 10 hex digits of the file's sha256 (cached by path, mtime and size); None if hashing is off."""
        path = self.path_of(name)
        stamp = _stamp(path)
        with self._lock:
            cached = self._hashes.get(path)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        full = self._hasher(path, f"vmix/{name}") if self._hasher is not None else sha256_file(path)
        short = full[:HASH_LENGTH].lower() if full else None
        with self._lock:
            self._hashes[path] = (stamp, short)
        return short

    def find_by_hash(self, short: str) -> Optional[str]:
        """The installed adapter whose short hash is ``short`` (hashes files not hashed yet)."""
        short = (short or "").lower()
        if not short:
            return None
        for name in self.names():
            try:
                if self.short_hash(name) == short:
                    return name
            except (OSError, ValueError):
                continue
        return None

    def refresh(self) -> None:
        """Forget cached metadata of files that are gone (loaded adapters are kept by stamp)."""
        with self._lock:
            for cache in (self._infos, self._hashes, self._adapters, self._checks):
                for path in [p for p in cache if not os.path.exists(p)]:
                    cache.pop(path, None)
