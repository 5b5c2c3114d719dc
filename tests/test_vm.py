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
    kept = vm.array(tensor, copy=True)  # what a caller keeps: numpy's own memory
    np.testing.assert_array_equal(kept.view(np.uint8), values.view(np.uint8))
    assert not np.shares_memory(kept, aligned)
    # An array TVM cannot take as it is (strided, or not aligned) goes in as a copy.
    strided = values.T
    (raw,) = artifact.empty_arrays([((values.nbytes + values.itemsize,), np.dtype(np.uint8))])
    shifted = raw[values.itemsize :].view(values.dtype).reshape(strided.shape)
    shifted[...] = strided  # contiguous, off TVM's alignment
    scalar = shifted.reshape(-1)[:1].reshape(())  # 0-d, off TVM's alignment
    for given in (strided, shifted, scalar):  # the last as a model's scalar input
        copied = vm.array(vm.tensor(given))
        assert copied.shape == given.shape
        assert copied.tobytes() == given.tobytes()  # C order, bit for bit
        assert not np.shares_memory(copied, given)
        # What a kernel writes into is never a copy: such an array is refused.
        with pytest.raises(ValueError, match="cannot take this array"):
            vm.view(given)
    assert vm.array(vm.view(aligned)).ctypes.data == aligned.ctypes.data

    # The copies a GPU's tensors take (here on the CPU, through the same runtime functions).
    on_device = vm.copied(strided, vm.cpu())
    assert str(on_device.dtype) == dtype
    np.testing.assert_array_equal(
        vm.copied_back(on_device).view(np.uint8), np.ascontiguousarray(strided).view(np.uint8)
    )
