"""The adapter folder: listing, name validation (no file outside the folder), caching, short hash."""
import os

import pytest
import torch

from test_webui_fakes import single_thread, write_adapter  # noqa: F401  (single_thread: autouse fixture)
from vmix_lib.adapter_file import AdapterError
from vmix_lib.webui.library import HASH_LENGTH, AdapterLibrary, sha256_file


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "source.safetensors"
    write_adapter(path)
    return path


@pytest.fixture
def folder(tmp_path, sd15_file):
    models = tmp_path / "models" / "VMix"
    models.mkdir(parents=True)
    os.link(sd15_file, models / "Beta.safetensors")
    os.link(sd15_file, models / "alpha.safetensors")
    (models / "notes.txt").write_text("not an adapter")
    (models / "old.ckpt").write_bytes(b"pickle")
    (models / "sub").mkdir()
    (models / "sub" / "nested.safetensors").write_bytes(b"x")
    (models / ".hidden.safetensors").write_bytes(b"x")
    # a file outside the folder that a crafted name might try to reach
    (tmp_path / "models" / "secret.safetensors").write_bytes(b"outside")
    return models


def test_lists_only_safetensors_files_in_the_folder(folder):
    lib = AdapterLibrary(lambda: str(folder))
    assert lib.names() == ["alpha", "Beta"]
    assert lib.default_name() == "alpha"
    assert AdapterLibrary(lambda: str(folder / "missing")).names() == []


def test_default_name_skips_files_that_are_not_adapters(folder):
    # In the real A1111 a LoRA-like file sorting first was preselected in the panel, which then
    # showed only its error and hid the α sliders.
    lib = AdapterLibrary(lambda: str(folder))
    (folder / "a_lora.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (folder / "Aa_cut.safetensors").write_bytes((folder / "alpha.safetensors").read_bytes()[:500])
    assert lib.names()[:3] == ["a_lora", "Aa_cut", "alpha"]
    assert lib.default_name() == "alpha"
    for name in ("alpha", "Beta"):
        os.remove(folder / f"{name}.safetensors")
    assert lib.default_name() == "a_lora"  # none reads: the first, whose problem the panel then shows


def test_validate_returns_the_installed_name(folder):
    lib = AdapterLibrary(lambda: str(folder))
    assert lib.validate("alpha") == "alpha"
    assert lib.validate(" Beta ") == "Beta"
    assert lib.validate("beta") == "Beta"  # unique case-insensitive match
    assert lib.validate("alpha.safetensors") == "alpha"
    assert lib.path_of("Beta") == os.path.join(str(folder), "Beta.safetensors")


@pytest.mark.parametrize("name, words", [
    ("../secret", "must be a plain name from the adapter folder, without folders or path separators"),
    ("..\\secret", "without folders or path separators"),
    ("sub/nested", "without folders or path separators"),
    ("..", "contains '..'"),
    ("x..y", "contains '..'"),
    ("C:secret", "is a path"),
    ("old.ckpt", "is a pickle file, which can run code when loaded"),
    ("missing", "is not installed in"),
    ("", "no VMix adapter name was given"),
    (None, "a VMix adapter name must be a string"),
])
def test_bad_names_are_refused_before_any_file_is_read(folder, monkeypatch, name, words):
    lib = AdapterLibrary(lambda: str(folder))
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
    with pytest.raises(ValueError) as e:
        lib.validate(name)
    assert words in str(e.value)
    with pytest.raises(ValueError):
        lib.load(name)
    assert opened == []


def test_absolute_path_is_refused(folder):
    lib = AdapterLibrary(lambda: str(folder))
    with pytest.raises(ValueError) as e:
        lib.validate(str(folder.parent / "secret.safetensors"))
    assert "without folders or path separators" in str(e.value)


def test_unknown_name_lists_installed_and_empty_folder_says_where_and_why(folder, tmp_path):
    with pytest.raises(ValueError) as e:
        AdapterLibrary(lambda: str(folder)).validate("gamma")
    assert str(e.value) == f"VMix adapter 'gamma' is not installed in {folder}; installed adapters: alpha, Beta."
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as e:
        AdapterLibrary(lambda: str(empty)).validate("gamma")
    assert f"no VMix adapter is installed in {empty}" in str(e.value)
    assert "No official VMix weights were ever released" in str(e.value)


def test_load_reads_a_real_file_to_the_cpu_once(folder):
    lib = AdapterLibrary(lambda: str(folder))
    first = lib.load("alpha")
    assert first.family == "sd15" and next(first.parameters()).device == torch.device("cpu")
    assert lib.load("alpha") is first and lib.loads == 1
    assert lib.info("alpha").family == "sd15"


def counting_loader(paths):
    def load(path, device):
        paths.append((os.path.basename(path), device))
        return object()
    return load


def test_load_is_cached_by_path_mtime_and_size(folder):
    paths = []
    lib = AdapterLibrary(lambda: str(folder), loader=counting_loader(paths))
    first = lib.load("alpha")
    assert lib.load("alpha") is first and paths == [("alpha.safetensors", "cpu")]
    os.utime(folder / "alpha.safetensors", ns=(1, 1))  # the file changed: load again
    assert lib.load("alpha") is not first and len(paths) == 2


def test_cache_keeps_the_most_recent_adapters(folder):
    paths = []
    lib = AdapterLibrary(lambda: str(folder), cache_size=1, loader=counting_loader(paths))
    a = lib.load("alpha")
    lib.load("Beta")
    assert lib.load("alpha") is not a and len(paths) == 3


def test_malformed_file_gives_one_sentence(folder):
    (folder / "broken.safetensors").write_bytes(b"\x0a\x00\x00\x00\x00\x00\x00\x00{not json}")
    lib = AdapterLibrary(lambda: str(folder))
    for call in (lib.info, lib.load):
        with pytest.raises(AdapterError) as e:
            call("broken")
        assert str(e.value) == "VMix adapter 'broken.safetensors' is not a safetensors file (its header is not JSON)."


def test_short_hash_is_lazy_cached_and_uses_the_webui_hasher(folder, sd15_file):
    calls = []

    def hasher(path, title):
        calls.append(title)
        return sha256_file(path)

    lib = AdapterLibrary(lambda: str(folder), hasher=hasher)
    assert calls == []
    short = lib.short_hash("alpha")
    assert short == sha256_file(sd15_file)[:HASH_LENGTH] and len(short) == 10
    assert lib.short_hash("alpha") == short and calls == ["vmix/alpha"]
    assert lib.find_by_hash(short) == "alpha"
    assert lib.find_by_hash("0" * 10) is None
    assert AdapterLibrary(lambda: str(folder), hasher=lambda p, t: None).short_hash("alpha") is None  # --no-hashing


def test_package_helpers_for_xyz(folder):
    import vmix_lib.webui as webui

    webui.set_default_library(AdapterLibrary(lambda: str(folder)))
    try:
        assert webui.list_adapter_names() == ["alpha", "Beta"]
        assert webui.validate_adapter_name("beta") == "Beta"
        with pytest.raises(ValueError):
            webui.validate_adapter_name("../secret")
        assert webui.list_adapter_dimension_names() == ["color", "lighting", "composition", "focus", "texture", "emotion"]
    finally:
        webui.set_default_library(None)


def test_without_a_folder_nothing_is_installed():
    """Outside a WebUI (no models folder, no --vmix-dir) the helpers still answer sensibly."""
    lib = AdapterLibrary(lambda: None)
    assert lib.folder() is None and lib.names() == [] and lib.default_name() is None
    with pytest.raises(ValueError) as e:
        lib.validate("anything")
    assert "no VMix adapter folder is available" in str(e.value)


def test_package_helpers_outside_a_webui():
    import vmix_lib.webui as webui

    webui.set_default_library(None)
    try:
        assert webui.list_adapter_names() == [] and webui.list_adapter_dimension_names() == []
        with pytest.raises(ValueError):
            webui.validate_adapter_name("anything")
    finally:
        webui.set_default_library(None)


def test_messages_name_the_folder_as_shown_and_keep_the_full_path_for_the_console(folder, tmp_path):
    from vmix_lib.webui.library import AdapterNameError, console_text

    lib = AdapterLibrary(lambda: str(folder), shown=lambda path: "models/VMix")
    with pytest.raises(AdapterNameError) as e:
        lib.validate("gamma")
    assert str(e.value) == "VMix adapter 'gamma' is not installed in models/VMix; installed adapters: alpha, Beta."
    assert console_text(e.value) == f"VMix adapter 'gamma' is not installed in {folder}; installed adapters: alpha, Beta."
    assert str(folder) not in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    lib = AdapterLibrary(lambda: str(empty), shown=lambda path: "models/VMix")
    assert lib.no_adapter_message().startswith("no VMix adapter is installed in models/VMix;")
    assert lib.no_adapter_message(console=True).startswith(f"no VMix adapter is installed in {empty};")
    with pytest.raises(AdapterNameError) as e:
        lib.validate("gamma")
    assert "models/VMix" in str(e.value) and str(empty) in console_text(e.value) and str(empty) not in str(e.value)
    broken = AdapterLibrary(lambda: str(folder), shown=lambda path: 1 / 0)
    assert broken.shown_folder() == "the adapter folder"  # never the path because the helper failed


def test_checking_the_whole_list_reads_each_file_once_and_keeps_the_adapter_in_use(folder):
    """The adapter list's marks (issue 22) need every file's full check: each version of a file is
    read once, and checking the list does not push the adapter in use out of the cache."""
    data = (folder / "alpha.safetensors").read_bytes()
    os.remove(folder / "alpha.safetensors")  # its own file, not a hard link to Beta's
    (folder / "alpha.safetensors").write_bytes(data)
    paths = []
    lib = AdapterLibrary(lambda: str(folder), cache_size=1, loader=counting_loader(paths))
    in_use = lib.load("Beta")
    for _ in range(3):
        assert lib.verdicts() == {"alpha": None, "Beta": None}
    assert paths == [("Beta.safetensors", "cpu"), ("alpha.safetensors", "cpu")]
    assert lib.load("Beta") is in_use and lib.loads == 1
    os.utime(folder / "alpha.safetensors", ns=(1, 1))  # a new version: read again, once
    lib.verdicts()
    lib.verdicts()
    assert paths[2:] == [("alpha.safetensors", "cpu")]
