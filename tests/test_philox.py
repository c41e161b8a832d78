"""Philox4x32-10 (fsq_kernels/philox.py) against Random123's known answers and Triton's generator."""

from __future__ import annotations

import pytest
import torch

from fsq_kernels import philox

# Random123 kat_vectors, philox4x32_10: counter (4 words), key (2 words), expected output.
KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
KEYS_OFFSETS = [(0, 0), (123456789, 7), (-8698006509851141745, 988494398293867196), (2**40 + 5, 2**32 - 3)]


@pytest.mark.parametrize("counter,key,expected", KNOWN_ANSWERS)
def test_known_answers(counter, key, expected):
    words = philox.philox4x32(*[torch.tensor([c], dtype=torch.int64) for c in counter], *key)
    assert [int(w) for w in words] == list(expected)


def test_uniform_range_and_extremes():
    words = torch.tensor([0, 2**31 - 1, 2**31, 2**32 - 1, 12345], dtype=torch.int64)
    u = philox.uint32_to_uniform(words)
    assert u.dtype == torch.float32 and (u >= 0).all() and (u < 1).all()
    assert u[0] == 0 and u[3] == 0 and u[1] == u[2] and u[1] < 1  # ~x folds the negative half


triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _triton_philox(key_ptr, offset_ptr, words_ptr, uniforms_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    key = tl.load(key_ptr)
    counter = tl.load(offset_ptr) + i.to(tl.int64)
    w0, w1, w2, w3 = tl.randint4x(key, counter)
    for j, w in enumerate((w0, w1, w2, w3)):
        tl.store(words_ptr + j * n + i, w.to(tl.int64), mask=mask)
    u0, u1, u2, u3 = tl.rand4x(key, counter)
    for j, u in enumerate((u0, u1, u2, u3)):
        tl.store(uniforms_ptr + j * n + i, u, mask=mask)


@pytest.mark.parametrize("key,offset", KEYS_OFFSETS)
def test_bit_identical_to_triton(key, offset):
    """Triton's tl.randint4x / tl.rand4x (interpreter on CPU; the same code path compiles on GPU)."""
    n = 1500
    words = torch.empty(4, n, dtype=torch.int64)
    uniforms = torch.empty(4, n, dtype=torch.float32)
    _triton_philox[(triton.cdiv(n, 512),)](torch.tensor([key]), torch.tensor([offset]), words, uniforms, n, BLOCK=512)
    counter = torch.arange(n, dtype=torch.int64) + offset
    expected_words = torch.stack(philox.randint4x(key, counter))
    assert torch.equal(words & philox.MASK32, expected_words)
    assert torch.equal(uniforms.view(torch.int32), torch.stack(philox.uniform4x(key, counter)).view(torch.int32))


_HEADER_PROGRAM = r"""
#include "fsq_philox.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
int main(int argc, char** argv) {
  const unsigned long long key = std::strtoull(argv[1], nullptr, 10), offset = std::strtoull(argv[2], nullptr, 10);
  for (int i = 0; i < 64; ++i) {
    const auto r = fsq::philox::randint4x(key, offset + i);
    for (int j = 0; j < 4; ++j) {
      const float u = fsq::philox::uniform(r.w[j]);
      unsigned bits;
      std::memcpy(&bits, &u, 4);
      std::printf("%u %u\n", r.w[j], bits);
    }
  }
}
"""


def test_cpp_header_bit_identical(tmp_path):
    """csrc/fsq_philox.h compiled on the host (the CUDA build includes the same code)."""
    import pathlib
    import shutil
    import subprocess

    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    csrc = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    (tmp_path / "p.cpp").write_text(_HEADER_PROGRAM)
    subprocess.run([compiler, "-O2", "-std=c++17", f"-I{csrc}", str(tmp_path / "p.cpp"), "-o", str(tmp_path / "p")],
                   check=True)
    for key, offset in KEYS_OFFSETS:
        out = subprocess.run([str(tmp_path / "p"), str(key % 2**64), str(offset % 2**64)], check=True,
                             capture_output=True, text=True).stdout.split()
        got = torch.tensor([int(v) for v in out], dtype=torch.int64).view(64, 4, 2)
        counter = torch.arange(64, dtype=torch.int64) + offset
        words = torch.stack(philox.randint4x(key, counter), dim=1)
        bits = torch.stack(philox.uniform4x(key, counter), dim=1).view(torch.int32).to(torch.int64) & philox.MASK32
        assert torch.equal(got[..., 0], words) and torch.equal(got[..., 1], bits)
