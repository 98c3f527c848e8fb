"""Trace files: aprender's APRT tensor files and the :class:`Trace` that holds one traced forward pass.

APRT file (aprender's ``--save-tensor`` format): ``b"APRT"``, u32 layer (0xFFFFFFFF for whole-model stages),
u32 element count n, n float32, little-endian, NaN bits kept. A ``trace.json`` beside the files records the
model, backend, token ids, fault and shapes (APRT itself stores no shape). Capture lives in
:mod:`apr_numba.debug.tracing`, which re-exports these names.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from apr_numba.arch.stages import ALIASES, COMPUTE_RANK, STAGE_ID, WHOLE_MODEL_STAGES
from apr_numba.errors import ModelFormatError

APRT_MAGIC = b"APRT"
WHOLE_MODEL_LAYER = 0xFFFFFFFF
TRACE_JSON = "trace.json"
TRACE_SCHEMA = "apr-numba-trace-v1"

# ------------------------------------------------------------------------------------------ APRT files


def write_aprt(path, array, layer: int | None) -> Path:
    """Write an APRT file: magic, u32 layer (None -> 0xFFFFFFFF), u32 n, n float32 (little-endian)."""
    a = np.ascontiguousarray(np.asarray(array), dtype="<f4").reshape(-1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(APRT_MAGIC + struct.pack("<II", WHOLE_MODEL_LAYER if layer is None else int(layer), a.size))
        fh.write(a.tobytes())
    return path


def read_aprt(path) -> tuple[int | None, np.ndarray]:
    """(layer or None for whole-model, float32 values) of an APRT file.

    Raises:
        ModelFormatError: not an APRT file, or its size does not match its element count.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ModelFormatError(f"{path}: cannot read ({exc.strerror})") from None
    if len(raw) < 12 or raw[:4] != APRT_MAGIC:
        raise ModelFormatError(f"{path}: not an APRT tensor file (magic {raw[:4]!r}, expected b'APRT')")
    layer, n = struct.unpack("<II", raw[4:12])
    if len(raw) != 12 + 4 * n:
        raise ModelFormatError(f"{path}: APRT header says {n} float32 values ({12 + 4 * n} bytes) but the file "
                               f"has {len(raw)} bytes")
    return (None if layer == WHOLE_MODEL_LAYER else int(layer)), np.frombuffer(raw, "<f4", n, 12).copy()


def stage_path(root, layer: int | None, stage: str) -> Path:
    """``root/layer-N/<stage>.bin``, or ``root/<stage>.bin`` for whole-model stages."""
    root = Path(root)
    return root / f"{stage}.bin" if layer is None else root / f"layer-{layer}" / f"{stage}.bin"


# ------------------------------------------------------------------------------------------- the trace


def chain_order(keys) -> list[tuple[int | None, str]]:
    """(layer, stage) keys in compute order: layer 0's embedding, each layer's stages in the order they are
    computed (arch.stages.COMPUTE_ORDER: a MoE block's router, ids and experts between ffn_norm and ffn_out),
    then final_norm and lm_head."""
    def k(key):
        layer, stage = key
        return (1 << 30 if layer is None else layer, COMPUTE_RANK[stage])
    return sorted(keys, key=k)


def _key_name(key) -> str:
    layer, stage = key
    return stage if layer is None else f"layer-{layer}/{stage}"


@dataclass
class Trace:
    """The captured stages of one forward pass.

    Attributes:
        tensors: {(layer, stage): float32 array}; layer None for final_norm / lm_head.
        tokens: the prompt's token ids. backend: "cpu" / "reference" / "opencl" / "dir".
        model: model path or name. fault: the injected fault spec or None. notes: remarks on the fault.
        n_layer: the model's layer count. source: the folder it was loaded from, if any.
    """

    tensors: dict
    tokens: list[int]
    backend: str
    model: str = ""
    fault: str | None = None
    notes: list[str] = field(default_factory=list)
    n_layer: int = 0
    source: str | None = None

    def get(self, stage: str, layer: int | None = None) -> np.ndarray:
        """The array of ``stage`` (aliases accepted) at ``layer`` (ignored for whole-model stages)."""
        stage = ALIASES.get(stage, stage)
        key = (None, stage) if stage in WHOLE_MODEL_STAGES else (layer, stage)
        if key not in self.tensors:
            raise KeyError(f"stage {_key_name(key)} was not traced")
        return self.tensors[key]

    def keys(self) -> list[tuple[int | None, str]]:
        """Traced (layer, stage) keys in compute order."""
        return chain_order(self.tensors)

    def save(self, root) -> list[Path]:
        """Write every stage as an APRT file under ``root`` and a ``trace.json``; returns the file paths."""
        root = Path(root)
        paths = [write_aprt(stage_path(root, layer, stage), self.tensors[(layer, stage)], layer)
                 for layer, stage in self.keys()]
        meta = {"schema": TRACE_SCHEMA, "model": self.model, "backend": self.backend, "tokens": list(self.tokens),
                "fault": self.fault, "notes": self.notes, "n_layer": self.n_layer,
                "shapes": {_key_name(k): list(self.tensors[k].shape) for k in self.keys()}}
        root.mkdir(parents=True, exist_ok=True)
        (root / TRACE_JSON).write_text(json.dumps(meta, indent=1))
        return paths

    @classmethod
    def load(cls, root) -> Trace:
        """Read a trace folder (APRT files; shapes and tokens from ``trace.json`` when present).

        Raises:
            ModelFormatError: not a folder, no stage files, a bad file or a layer that contradicts its folder.
        """
        root = Path(root)
        if not root.is_dir():
            raise ModelFormatError(f"{root}: not a trace directory")
        meta = {}
        if (root / TRACE_JSON).exists():
            meta = json.loads((root / TRACE_JSON).read_text())
        shapes = meta.get("shapes", {})
        tensors = {}
        files = [(None, p) for p in root.glob("*.bin")]
        for d in root.glob("layer-*"):
            if d.is_dir() and d.name[6:].isdigit():
                files += [(int(d.name[6:]), p) for p in d.glob("*.bin")]
        for want_layer, p in files:
            stage = p.stem
            if stage not in STAGE_ID:
                continue
            layer, a = read_aprt(p)
            if layer != want_layer or (layer is None) != (stage in WHOLE_MODEL_STAGES):
                raise ModelFormatError(f"{p}: APRT layer {'whole-model' if layer is None else layer} does not "
                                       f"match its place in the trace folder")
            key = (layer, stage)
            shp = shapes.get(_key_name(key))
            tensors[key] = a.reshape(shp) if shp and int(np.prod(shp)) == a.size else a
        if not tensors:
            raise ModelFormatError(f"{root}: no APRT stage files (layer-N/<stage>.bin or <stage>.bin)")
        n_layer = meta.get("n_layer") or 1 + max((la for la, _ in tensors if la is not None), default=-1)
        return cls(tensors, list(meta.get("tokens", [])), "dir", meta.get("model", ""), meta.get("fault"),
                   list(meta.get("notes", [])), int(n_layer or 0), str(root))
