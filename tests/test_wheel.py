"""The package works outside the checkout: sdist -> wheel -> a fresh venv, commands run from a temp folder.

The build is what ``python -m build`` does, offline: the checkout's tracked files are copied to a temp
folder, ``setuptools.build_meta.build_sdist`` makes the sdist there, and the wheel is built from the
*unpacked sdist* (``pip wheel --no-deps --no-build-isolation``), so package data missing from either
fails here. The wheel goes into a fresh ``python -m venv --without-pip`` with ``pip --python VENV install
--no-deps``. Its dependencies come from this test's own environment through one ``.pth`` line naming that
environment's site-packages: a ``.pth`` line only appends the folder to ``sys.path`` (it does not run the
``.pth`` files inside it), so the project's editable install there (setuptools' ``__editable__`` finder) is
not activated, and the fresh venv's own site-packages comes first. The test asserts that ``apr_numba`` is
imported from the fresh venv and that the kernel sources and the registry are read from the installed
package, byte-equal to the checkout's ``opencl/*.cl`` and ``models/registry.toml``.

Then, with ``PYTHONPATH`` unset and the working directory a temp folder (nothing of the checkout on the
path), the installed entry points run: ``apr-numba inspect`` (checked against gguf-py's reader),
the OpenCL programs built by PoCL from the installed ``.cl`` files (a matvec checked against NumPy),
``apr-numba run --backend opencl`` on PoCL (the OpenCL path ran, or the parity gate rejected it on the numbers
and its one line says so; a probe that failed, e.g. on missing sources, fails the test),
``apr-numba run smollm2-135m`` resolved through the packaged registry with ``$APR_NUMBA_MODELS`` at the
checkout's ``models/`` (first token checked against the HF transformers fixture), and ``apr-tui --help``.
Numba compiles the kernels once for the fresh venv's paths (about a minute on two idle cores) into a temp
``NUMBA_CACHE_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
SMOLLM = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"  # prompt 0 of tests/fixtures/hf_smollm2-135m.npz
PARITY_TAG = "[apr-cpu-vs-gpu-output-parity-v1]"  # aprender's gate line (shared/docs/aprender-facts.md)
# not copied into the build: caches, environments, build outputs, and the git-ignored weights
SKIP = {".git", ".venv", ".venv-ref", "build", "dist", "__pycache__", ".pytest_cache", ".ruff_cache",
        ".hypothesis", ".cache", "models"}

pytestmark = [pytest.mark.wheel, pytest.mark.slow,
              pytest.mark.skipif(not SMOLLM.is_file(), reason=f"needs {SMOLLM.name} (apr-numba pull smollm2-135m)")]


def _run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} -> rc {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> dict:
    """Build the sdist and the wheel, install the wheel into a fresh venv; return its paths and environment."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, symlinks=True,
                    ignore=lambda d, names: [n for n in names if n in SKIP or n.endswith(".egg-info")])
    (src / "models").mkdir()
    shutil.copy2(MODELS / "registry.toml", src / "models" / "registry.toml")
    dist = tmp / "dist"
    dist.mkdir()
    sdist = _run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                  "print(b.build_sdist(sys.argv[1]))", str(dist)], cwd=src).stdout.strip().splitlines()[-1]
    with tarfile.open(dist / sdist) as tf:
        tf.extractall(tmp / "sdist", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (sdist_src,) = (tmp / "sdist").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
          str(sdist_src)], cwd=tmp)
    (whl,) = dist.glob("apr_numba-*.whl")

    v = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(v)])
    py = v / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(whl)])
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "_apr_numba_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    env = {k: val for k, val in os.environ.items()
           if k not in ("PYTHONPATH", "APR_NUMBA_MODELS", "APR_OPENCL_KERNELS", "APR_OPENCL_FAULT",
                        "APR_OPENCL_DEVICE", "NUMBA_CACHE_DIR", "APR_NUMBA_KERNEL_CACHE", "APR_NUMBA_CACHE")}
    home = tmp / "home"
    home.mkdir()
    env.update(HOME=str(home), NUMBA_CACHE_DIR=str(tmp / "numba"), APR_NUMBA_CACHE=str(tmp / "startup"),
               # PoCL's compiled-kernel cache stays the user's (it is keyed by the kernel source and options)
               POCL_CACHE_DIR=os.environ.get("POCL_CACHE_DIR") or str(Path.home() / ".cache" / "pocl"))
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    return {"py": py, "bin": v / "bin", "site": site, "env": env, "cwd": cwd, "home": home, "wheel": whl}


def _cli(venv: dict, script: str, *args: str, models: Path | None = None, timeout: float = 600):
    env = dict(venv["env"])
    if models is not None:
        env["APR_NUMBA_MODELS"] = str(models)
    return _run([str(venv["bin"] / script), *args], env=env, cwd=venv["cwd"], timeout=timeout)


def test_installed_package_data(venv):
    probe = ("import json, apr_numba, tui\n"
             "from apr_numba.backends.opencl_kernels import kernel_dir\n"
             "from apr_numba.hub.registry import registry_path, models_dir, known_models\n"
             "print(json.dumps({'pkg': apr_numba.__file__, 'tui': tui.__file__, 'cl': str(kernel_dir()),\n"
             "                  'reg': str(registry_path()), 'models': str(models_dir()), 'names': known_models()}))")
    r = _run([str(venv["py"]), "-c", probe], env=venv["env"], cwd=venv["cwd"])
    got = json.loads(r.stdout.strip().splitlines()[-1])
    site = venv["site"]
    assert Path(got["pkg"]) == site / "apr_numba" / "__init__.py"  # the wheel's copy, not the checkout's
    assert Path(got["tui"]) == site / "tui" / "__init__.py"
    cl = Path(got["cl"])
    assert cl == site / "apr_numba" / "opencl"
    assert sorted(p.name for p in cl.glob("*.cl")) == sorted(p.name for p in (ROOT / "opencl").glob("*.cl"))
    for p in (ROOT / "opencl").glob("*.cl"):
        assert (cl / p.name).read_bytes() == p.read_bytes(), p.name
    reg = Path(got["reg"])
    assert reg == site / "apr_numba" / "hub" / "data" / "registry.toml"
    assert reg.read_bytes() == (MODELS / "registry.toml").read_bytes()
    assert "smollm2-135m" in got["names"]
    # outside a checkout, models go to ~/.cache/apr_numba/models (HOME is the test's)
    assert Path(got["models"]) == venv["home"] / ".cache" / "apr_numba" / "models"
    assert not list(site.glob("apr_numba/hub/data/*.gguf")) and not (site / "models").exists()
    # every module and data file of the checkout's packages is in the wheel (setup.py's package discovery)
    for f in [*ROOT.glob("apr_numba/**/*"), *ROOT.glob("tui/**/*")]:
        if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".pyc", ".nbi", ".nbc"):
            assert (site / f.relative_to(ROOT)).read_bytes() == f.read_bytes(), f"{f.relative_to(ROOT)} differs"


def test_inspect(venv):
    info = json.loads(_cli(venv, "apr-numba", "inspect", str(SMOLLM), "--json").stdout)
    reader = GGUFReader(SMOLLM)
    assert info["architecture"] == reader.fields["general.architecture"].contents() == "llama"
    assert info["file_bytes"] == SMOLLM.stat().st_size
    assert len(info["tensors"]) == len(reader.tensors)
    assert info["config"]["n_layer"] == reader.fields["llama.block_count"].contents()


def _hf():
    return np.load(ROOT / "tests" / "fixtures" / "hf_smollm2-135m.npz")


def _json_line(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


OPENCL_PROBE = """
import json, numpy as np, pyopencl as cl
from gguf import GGMLQuantizationType as T
from apr_numba.backends.opencl_kernels import Programs, find_device
info, dev = find_device(None)
p = Programs(info, dev, head_dim=64)  # builds the ops program from the installed .cl files
rng = np.random.default_rng(0)
w = rng.standard_normal((8, 256)).astype(np.float32)
x = rng.standard_normal(256).astype(np.float32)
mf = cl.mem_flags
wb = cl.Buffer(p.ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=w)
xb = cl.Buffer(p.ctx, mf.READ_ONLY | mf.COPY_HOST_PTR, hostbuf=x)
yb = cl.Buffer(p.ctx, mf.WRITE_ONLY, 8 * 4)
p.matvec(int(T.F32), wb, 256, 8, xb, 256, yb, 8, 0, 1)  # builds quants.cl + matvec_f32.cl + get_rows_f32.cl
y = np.empty(8, np.float32)
cl.enqueue_copy(p.queue, y, yb)
p.queue.finish()
print(json.dumps({"device": info.label(), "y": y.tolist(), "ref": (w.astype(np.float64) @ x).tolist()}))
"""


def _checkout_devices() -> list:
    """The OpenCL devices this test's own (checkout) environment sees; the fresh venv must see the same."""
    from apr_numba.backends.opencl_kernels import list_devices

    devs = list_devices()
    if not devs:
        pytest.skip("no usable OpenCL device in this environment (test_opencl.py skips too)")
    return devs


def test_opencl_kernels_build_from_package(venv):
    """PoCL builds the installed kernel sources, and a matvec equals NumPy's float64 product."""
    devs = _checkout_devices()
    r = _run([str(venv["py"]), "-c", OPENCL_PROBE], env=venv["env"], cwd=venv["cwd"], timeout=300)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["device"] == devs[0].label()  # the same driver as in the checkout's environment
    np.testing.assert_allclose(got["y"], got["ref"], rtol=1e-5, atol=1e-4, err_msg=got["device"])


def test_run_opencl_pocl(venv):
    _checkout_devices()
    r = _cli(venv, "apr-numba", "run", str(SMOLLM), "-p", PROMPT, "-n", "2", "--backend", "opencl", "--json")
    out = _json_line(r.stdout)
    assert out["prompt_token_ids"] == _hf()["prompt_ids_0"].tolist()
    assert len(out["token_ids"]) == 2
    gate = [line for line in r.stderr.splitlines() if PARITY_TAG in line]
    if out["backend"] == "opencl":  # the kernels were built from the installed .cl files and passed the gate
        assert out["parity"]["passed"] and not gate, r.stderr
    else:
        # rejected on the numbers (cosine / argmax vs the CPU), said in exactly one line, and the CPU answered;
        # a probe that failed (missing kernel sources, an import error) is a broken install, not a rejection
        assert out["backend"] == "cpu" and len(gate) == 1, r.stderr
        assert "probe failed" not in gate[0], gate[0]


def test_run_registry_name_from_package_data(venv):
    r = _cli(venv, "apr-numba", "run", "smollm2-135m", "-p", PROMPT, "-n", "2", "--backend", "cpu", "--json",
             models=MODELS)
    out = _json_line(r.stdout)
    hf = _hf()
    assert Path(out["model"]) == SMOLLM
    assert out["prompt_token_ids"] == hf["prompt_ids_0"].tolist()
    assert out["token_ids"][0] == int(hf["greedy_ids_0"][0])  # " Paris", HF margin 0.05


def test_tui_help(venv):
    r = _cli(venv, "apr-tui", "--help", timeout=120)
    assert r.stdout.startswith("usage: apr-tui")


def test_cold_start_compiled_the_products_in_a_second_process(venv):
    """The fresh venv's first runs started on an empty Numba cache, so ``load`` ran the two-process compile
    (apr_numba.kernels.precompile). Numba's own cache index of each precompiled kernel must hold exactly the
    signatures precompile lists: one missing means it was not compiled ahead; one more means the forward
    called the kernel with other types and compiled it again itself (the signatures have drifted)."""
    import pickle

    from apr_numba.kernels import precompile

    folder = Path(venv["env"]["NUMBA_CACHE_DIR"])
    files = {"product_task": "kernels_*/matmul.product_task", "products": "backends_*/cpu_decode._products",
             "embed_tokens": "kernels_*/embed.embed_tokens", "attention_task": "kernels_*/attention.attention_task",
             "store_kv": "kernels_*/attention.store_kv", "rope_inplace": "kernels_*/rope.rope_inplace",
             "rmsnorm": "kernels_*/norm.rmsnorm", "rmsnorm_heads": "kernels_*/norm.rmsnorm_heads"}
    sigs = precompile.signatures()
    assert set(sigs) == set(files) == {k for g in precompile.GROUPS.values() for k in g}
    for name, stem in files.items():
        (index,) = folder.glob(f"{stem}-*.nbi")
        with open(index, "rb") as f:
            pickle.load(f)  # Numba's version
            _stamp, overloads = pickle.loads(f.read())
        assert {key[0] for key in overloads} == {tuple(args) for _, args in sigs[name]}, name
