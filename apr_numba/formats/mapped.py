"""Memory-mapped model sources (GGUF, .apr, safetensors alike): the tensor table entry and resident-memory control."""

from __future__ import annotations

import mmap
from dataclasses import dataclass

from gguf import GGMLQuantizationType


class PageReleaseMixin:
    """``release_tensor`` / ``release_pages`` for a source with ``_mm`` (np.memmap or None) and ``tensors``
    (name -> object with ``offset`` and ``nbytes``). Pages are dropped with MADV_DONTNEED on the read-only
    map: they leave this process's resident set and stay in the OS page cache, so a later read is cheap."""

    def _madvise(self, start: int | None = None, length: int | None = None) -> None:
        mm = getattr(getattr(self, "_mm", None), "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        if start is None:
            mm.madvise(mmap.MADV_DONTNEED)
        elif length:
            mm.madvise(mmap.MADV_DONTNEED, start, length)

    def release_tensor(self, name: str) -> None:
        """Drop the resident pages lying wholly inside tensor ``name`` (called once it is packed)."""
        t = self.tensors.get(name)
        if t is None:
            return
        start = -(-t.offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (t.offset + t.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._madvise(start, end - start)

    def release_pages(self) -> None:
        """Drop every page of the file read so far (after packing: only embedding rows are read later)."""
        self._madvise()


@dataclass(frozen=True)
class TensorRef:
    """One tensor of the file: GGML type id, NumPy-order shape (GGUF ne reversed), absolute byte offset, size."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type{self.ggml_type}"
