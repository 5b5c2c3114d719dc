"""Tensors through TVM's runtime library alone (builder/vm.py): numpy
arrays in and out, bfloat16 included (numpy's DLPack has none), viewed where they lie on the
CPU and copied for another device."""

from __future__ import annotations

import numpy as np
import pytest

from builder import artifact, vm

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_arrays_round_trip_through_tensors(dtype):
    values = np.random.default_rng(0).standard_normal((5, 7)).astype(artifact.numpy_dtype(dtype))
    (aligned,) = artifact.empty_arrays([(values.shape, values.dtype)])
    aligned[...] = values
    tensor = vm.tensor(aligned)
    assert str(tensor.dtype) == dtype and tuple(tensor.shape) == values.shape
    back = vm.array(tensor)
    assert back.dtype == values.dtype
    np.testing.assert_array_equal(back.view(np.uint8), values.view(np.uint8))
    assert back.ctypes.data == aligned.ctypes.data  # a view both ways, no copy
    # An array TVM cannot take as it is (strided, here) goes in as an aligned copy.
    strided = values.T
    copied = vm.array(vm.tensor(strided))
    np.testing.assert_array_equal(
        copied.view(np.uint8), np.ascontiguousarray(strided).view(np.uint8)
    )
    assert copied.ctypes.data % artifact.ALIGN == 0

    # The copies a GPU's tensors take (here on the CPU, through the same runtime functions).
    on_device = vm.copied(strided, vm.cpu())
    assert str(on_device.dtype) == dtype
    np.testing.assert_array_equal(
        vm.copied_back(on_device).view(np.uint8), np.ascontiguousarray(strided).view(np.uint8)
    )
