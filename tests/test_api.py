"""The public functional API: shapes, backends, and every documented error."""

from __future__ import annotations

import pytest
import torch

import fsq_kernels

from .conftest import GRAD_TOLERANCE, VARIANT_CLAMPS, assert_matches_reference, backend_device, backend_params, expected_grad

LEVELS = (8, 5, 5, 5)


def test_available_backends_lists_reference_first():
    names = fsq_kernels.available_backends()
    assert names[0] == "reference"
    assert set(names) <= {"reference", "cpp", "cuda", "triton"}


@pytest.mark.parametrize(
    "shape,channel_first,num_codebooks,index_shape",
    [
        ((5, 4), False, 1, (5,)),
        ((2, 3, 8), False, 2, (2, 3, 2)),
        ((2, 4, 3, 5), True, 1, (2, 3, 5)),
        ((2, 8, 2, 3, 3), True, 2, (2, 2, 3, 3, 2)),
        ((4,), False, 1, ()),
    ],
)
def test_shapes(shape, channel_first, num_codebooks, index_shape):
    z = torch.randn(shape)
    codes, indices = fsq_kernels.quantize(z, LEVELS, channel_first=channel_first, num_codebooks=num_codebooks)
    assert codes.shape == z.shape and codes.dtype == z.dtype
    assert indices.shape == index_shape and indices.dtype == torch.int32
    decoded = fsq_kernels.indices_to_codes(indices, LEVELS, channel_first=channel_first, num_codebooks=num_codebooks)
    assert decoded.shape == z.shape
    assert torch.equal(decoded, codes)
    codes_only, none = fsq_kernels.quantize(z, LEVELS, channel_first=channel_first, num_codebooks=num_codebooks, return_indices=False)
    assert none is None and torch.equal(codes_only, codes)


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("variant,hard_clamp", VARIANT_CLAMPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_backend_matches_reference(backend, device, variant, hard_clamp, dtype):
    """A small smoke matrix over every available backend, on the device it runs on; each backend
    has its own full suite."""
    z = (torch.randn(2, 8, 3, 5) * 2).to(dtype).to(device).requires_grad_(True)
    codes, indices = fsq_kernels.quantize(
        z, LEVELS, variant=variant, hard_clamp=hard_clamp, channel_first=True, num_codebooks=2, backend=backend
    )
    assert_matches_reference(codes, indices, z, LEVELS, variant=variant, hard_clamp=hard_clamp, channel_first=True, num_codebooks=2)
    (grad,) = torch.autograd.grad(codes.float().sum(), z)
    want = expected_grad(z, LEVELS, variant, hard_clamp, True, 2).to(dtype)
    torch.testing.assert_close(grad.cpu(), want, **GRAD_TOLERANCE[dtype])
    decoded = fsq_kernels.indices_to_codes(indices, LEVELS, variant=variant, channel_first=True, num_codebooks=2, backend=backend)
    assert torch.equal(fsq_kernels.codes_to_indices(decoded, LEVELS, variant=variant, channel_first=True, num_codebooks=2), indices)


def test_auto_picks_a_cpu_backend_for_cpu_tensors():
    z = torch.randn(3, 4)
    for backend in ["auto", "reference"]:
        fsq_kernels.quantize(z, LEVELS, backend=backend)


# ---------------------------------------------------------------------------------------------
# Errors: class and a message naming the argument, the expected and the actual value
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "levels,match",
    [
        ([], "non-empty"),
        ((8, 1, 5), r"levels\[1\] must be >= 2; got 1"),
        ((8, 5.0), r"levels\[1\] must be an int >= 2; got 5.0"),
        ((8, True), r"levels\[1\] must be an int"),
        ("855", "sequence of ints"),
        (8, "sequence of ints"),
    ],
)
def test_bad_levels(levels, match):
    with pytest.raises(ValueError, match=match):
        fsq_kernels.quantize(torch.randn(2, 3), levels)
    with pytest.raises(ValueError, match=match):
        fsq_kernels.FSQ(levels)


def test_hard_clamp_with_paper_is_a_value_error():
    with pytest.raises(ValueError, match="hard_clamp=True applies to the 'atanh' and 'symmetric' variants; got variant='paper'"):
        fsq_kernels.quantize(torch.randn(2, 4), LEVELS, variant="paper", hard_clamp=True)
    with pytest.raises(ValueError, match="bound_hard_clamp"):
        fsq_kernels.FSQ(LEVELS, bound_hard_clamp=True)


def test_unknown_variant_and_num_codebooks():
    with pytest.raises(ValueError, match="variant must be one of .*got 'tanh'"):
        fsq_kernels.quantize(torch.randn(2, 4), LEVELS, variant="tanh")
    with pytest.raises(ValueError, match="num_codebooks must be an int >= 1; got 0"):
        fsq_kernels.quantize(torch.randn(2, 4), LEVELS, num_codebooks=0)


@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        ((2, 5), {}, r"must have 4 channels .* got 5"),
        ((2, 4), {"num_codebooks": 2}, r"must have 8 channels .*num_codebooks=2.* got 4"),
        ((2, 3, 4, 4), {"channel_first": True}, r"must have 4 channels .* on dim 1; got 3"),
        ((4,), {"channel_first": True}, r"must have shape \(B, C, ...\)"),
    ],
)
def test_channel_count(shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fsq_kernels.quantize(torch.randn(shape), LEVELS, **kwargs)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8])
def test_bad_z_dtype_is_a_type_error(dtype):
    z = torch.zeros(2, 4, dtype=dtype)
    with pytest.raises(TypeError, match=f"z must be float16, bfloat16, float32 or float64; got {dtype}"):
        fsq_kernels.quantize(z, LEVELS)


def test_z_must_be_a_tensor():
    with pytest.raises(TypeError, match="z must be a torch.Tensor; got list"):
        fsq_kernels.quantize([[0.0] * 4], LEVELS)


@pytest.mark.parametrize("bad", [-1, 1000, 10**6])
def test_decode_out_of_range(bad):
    indices = torch.tensor([0, 5, bad])
    with pytest.raises(ValueError, match=rf"indices must lie in \[0, 1000\) for levels \[8, 5, 5, 5\]; got {bad}"):
        fsq_kernels.indices_to_codes(indices, LEVELS)
    for backend in fsq_kernels.available_backends():
        with pytest.raises(ValueError, match="indices must lie in"):
            fsq_kernels.indices_to_codes(indices, LEVELS, backend=backend)


def test_decode_bad_dtypes_and_shapes():
    with pytest.raises(TypeError, match="indices must be an integer tensor; got torch.float32"):
        fsq_kernels.indices_to_codes(torch.zeros(3), LEVELS)
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16, float32 or float64; got torch.int32"):
        fsq_kernels.indices_to_codes(torch.zeros(3, dtype=torch.long), LEVELS, dtype=torch.int32)
    with pytest.raises(ValueError, match="trailing axis of size num_codebooks=2"):
        fsq_kernels.indices_to_codes(torch.zeros(3, 3, dtype=torch.long), LEVELS, num_codebooks=2)


def test_codes_to_indices_errors():
    with pytest.raises(TypeError, match="codes must be float16"):
        fsq_kernels.codes_to_indices(torch.zeros(2, 4, dtype=torch.long), LEVELS)
    with pytest.raises(ValueError, match="codes must have 4 channels"):
        fsq_kernels.codes_to_indices(torch.zeros(2, 3), LEVELS)


def test_backend_errors():
    z = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'fast'"):
        fsq_kernels.quantize(z, LEVELS, backend="fast")
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available for a tensor on device 'cpu'"):
        fsq_kernels.quantize(z, LEVELS, backend="cuda")
    if "triton" in fsq_kernels.available_backends():
        z64 = z.double().to(backend_device("triton"))
        with pytest.raises(TypeError, match="backend 'triton' supports float16, bfloat16 and float32 inputs; got torch.float64"):
            fsq_kernels.quantize(z64, LEVELS, backend="triton")


def test_module_input_on_another_device_is_a_value_error():
    fsq = fsq_kernels.FSQ(LEVELS, dim=16).to("meta")
    with pytest.raises(ValueError, match="z is on cpu but the module's parameters are on meta"):
        fsq(torch.randn(2, 16))


def test_backend_choice_reads_no_tensor_data():
    """Dispatch decides from device type, dtype and levels alone (so compile/export trace it)."""
    from fsq_kernels.ops import _reference, backends

    # A float64 decode of CUDA indices runs on the reference, decided without a GPU.
    chosen = backends.resolve("auto", torch.device("cuda"), torch.float64, (8, 5, 5, 5), "t", "indices_to_codes")
    assert chosen is _reference
    # Devices without fused kernels go to the reference.
    assert backends.resolve("auto", torch.device("meta"), torch.float32, (8, 5, 5, 5), "t") is _reference
    if "cpp" in fsq_kernels.available_backends():
        assert backends.resolve("auto", torch.device("cpu"), torch.float32, (8, 5, 5, 5), "t") is backends.module("cpp")
    with pytest.raises(ValueError, match="available_backends: op must be one of"):
        fsq_kernels.available_backends("decode")


@pytest.mark.parametrize("levels", [[3] * 17, [2**24 + 1, 2]], ids=["17_channels", "huge_level"])
def test_auto_handles_level_sets_beyond_the_cpp_limits(levels):
    """`auto` on a CPU tensor accepts every level set the reference accepts (bug in review)."""
    z = torch.randn(3, len(levels), dtype=torch.float64)
    codes, indices = fsq_kernels.quantize(z, levels)
    ref_codes, ref_indices = fsq_kernels.quantize(z, levels, backend="reference")
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(codes, ref_codes)
