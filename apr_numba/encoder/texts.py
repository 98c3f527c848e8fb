"""Validation of the texts an encoder embeds (shared by the encoder, ``embed`` and the CLI)."""

from __future__ import annotations

from apr_numba.errors import ArgumentError


def check_texts(texts) -> list[str]:
    """A list of strings from ``texts`` (a str counts as one text).

    Raises:
        ArgumentError: not iterable, empty, or an item that is not a str (its index and type named).
    """
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)):
        raise ArgumentError("texts must be str or a list of str, got bytes (decode it first)")
    try:
        lst = list(texts)
    except TypeError as exc:
        raise ArgumentError(f"texts must be a list of str, got {type(texts).__name__}") from exc
    if not lst:
        raise ArgumentError("no texts to embed (empty list)")
    for i, t in enumerate(lst):
        if not isinstance(t, str):
            raise ArgumentError(f"texts[{i}] is {type(t).__name__}, not str")
    return lst
