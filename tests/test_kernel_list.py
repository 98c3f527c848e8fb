"""``kernel_list`` (apr_numba/model/weights.py): the typed List the compiled forward reads holds the packed arrays
themselves, in order, with the item type a Python-built typed List would have (reference: numba.typed.List.append)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from numba import typed

from apr_numba.kernels.matmul import packed_tuple
from apr_numba.model.weights import kernel_list
from apr_numba.quants.layouts import decode_codes
from apr_numba.quants.repack import pack, pack_raw
from tests.tiny_gguf import random_blocks


def test_same_arrays_same_type_as_python_appends():
    rng = np.random.default_rng(0)
    pms = [pack_raw(int(t), random_blocks(t, 70, 256, rng), (70, 256)) for t in (T.Q4_K, T.Q6_K, T.Q8_0, T.Q5_0)]
    pms.append(pack(decode_codes(int(T.F32), rng.standard_normal((3, 64)).astype(np.float32).view(np.uint8),
                                 (3, 64))))
    tuples = [packed_tuple(pm) for pm in pms]
    got = kernel_list(tuples)
    ref = typed.List()
    for x in tuples:
        ref.append(x)
    assert got._numba_type_ == ref._numba_type_
    assert len(got) == len(tuples)
    for a, b in zip(got, tuples, strict=True):
        assert a[0] == b[0] and a[1] == b[1]
        for x, y in zip(a[2:], b[2:], strict=True):
            assert np.shares_memory(x, y) or x.size == 0 and y.size == 0
            assert x.shape == y.shape and np.array_equal(x, y)


def test_empty_is_refused():
    with pytest.raises(ValueError, match="no matrices"):
        kernel_list([])
