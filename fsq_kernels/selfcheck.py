"""`python -m fsq_kernels check`: every available backend on a device against the reference.

Through the public API only, under the matching rule of fsq_kernels.matching (the one the test
suite uses): quantize over every variant and hard_clamp, fp32/bf16/fp16, channel-last,
channel-first and strided views built on the device, one and two codebooks; the straight-through
gradient against the float64 reference's; the training forward (quantize_train: "peer" and
"taae" dither and the usage histogram inside the quantize kernel, and its gradient) against the
reference's for one Philox key and offset; decode of contiguous and permuted indices of several
integer dtypes; fused residual FSQ; empty tensors. `--quick` is a subset that runs in seconds on
a CPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Callable

import torch

import fsq_kernels

from . import reference
from .envinfo import backends_on as _available_on
from .matching import (
    MismatchError,
    assert_decode_matches_reference,
    assert_grad_close,
    assert_matches_reference,
    assert_residual_consistent,
    assert_residual_output,
)

__all__ = ["Outcome", "format_table", "run_check", "summarize", "timed_check"]

VARIANT_CLAMPS = (("paper", False), ("atanh", False), ("atanh", True), ("symmetric", False), ("symmetric", True))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYOUTS = ("channel-last", "channel-first", "strided channel-last", "channels-last memory")
QUICK_LEVELS = ((8, 5, 5, 5),)
FULL_LEVELS = ((8, 5, 5, 5), (8, 6, 5), (7, 5, 5, 5, 5), (8, 8, 8, 5, 5, 5), (2, 3, 4), (3, 3, 2, 5), (300, 7))
INDEX_DTYPES = (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8)
_BACKEND_ORDER = ("reference", "cpp", "cuda", "triton")
_GROUP_ORDER = ("quantize+grad", "quantize", "train+grad", "decode", "residual", "empty")


@dataclasses.dataclass
class Outcome:
    backend: str
    group: str
    case: str
    ok: bool
    window_diffs: int = 0  # tokens that differ from the reference, all inside the boundary window
    grad_err: float = 0.0
    detail: str = ""


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _input(levels, num_codebooks: int, layout: str, dtype, device, gen, tokens: int) -> tuple[torch.Tensor, bool]:
    """(z, channel_first): random values x 2 (both sides of every level, and saturated ones), the
    strided views taken on the device from a dense tensor already in the target dtype."""
    c = len(levels) * num_codebooks
    side = max(1, int((tokens // 2) ** 0.5))

    def dense(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 2).to(dtype).to(device)

    if layout == "channel-last":
        return dense(tokens, c), False
    if layout == "channel-first":
        return dense(2, c, side, side + 1), True
    if layout == "strided channel-last":
        return dense(tokens, 2 * c)[:, 1::2], False  # channel stride 2, token stride 2c
    return dense(2, side, side + 1, c).permute(0, 3, 1, 2), True  # channel-first view of NHWC memory


def _run(outcomes: list, backend: str, group: str, case: str, body: Callable[[], tuple[int, float]]) -> None:
    try:
        diffs, grad_err = body()
        outcomes.append(Outcome(backend, group, case, True, diffs, grad_err))
    except Exception as exc:  # a mismatch, or a backend that raised: both are failures to report
        outcomes.append(Outcome(backend, group, case, False, detail=f"{type(exc).__name__}: {exc}"))


def _quantize_case(backend, levels, variant, hard_clamp, dtype, layout, num_codebooks, device, gen, tokens, grad):
    z, channel_first = _input(levels, num_codebooks, layout, dtype, device, gen, tokens)
    kw = dict(variant=variant, hard_clamp=hard_clamp, channel_first=channel_first, num_codebooks=num_codebooks)

    def body():
        zg = z.detach().requires_grad_(grad)
        codes, indices = fsq_kernels.quantize(zg, levels, backend=backend, **kw)
        diffs = assert_matches_reference(codes, indices, z, levels, **kw)
        err = 0.0
        if grad:
            g = torch.randn(z.shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
            (got,) = torch.autograd.grad(codes, zg, g)
            z64 = z.detach().cpu().to(torch.float64).requires_grad_(True)
            want_codes, _ = reference.quantize(z64, levels, **kw)
            (want,) = torch.autograd.grad(want_codes, z64, g.cpu().to(torch.float64))
            err = assert_grad_close(got, want)
        return diffs, err

    return body


def _train_case(backend, mode, dtype, layout, device, gen, tokens):
    """quantize_train (noise and histogram inside the quantize kernel) against the reference
    backend's with the same Philox key and offset: indices and histogram equal, peer codes bit
    for bit, taae codes within float rounding (tanh differs by ulps), gradients within tolerance."""
    levels = (8, 5, 5, 5)
    z, channel_first = _input(levels, 1, layout, dtype, device, gen, tokens)
    key_offset = torch.tensor([int(torch.randint(0, 2**31, (1,), generator=gen)), 12345], dtype=torch.int64)
    kw = dict(variant="symmetric", channel_first=channel_first, dither=mode, dither_p=0.5, return_usage=True)

    def run(x, on, ko):
        x = x.detach().requires_grad_(True)
        codes, indices, usage = fsq_kernels.quantize_train(x, levels, key_offset=ko, backend=on, **kw)
        g = torch.linspace(-1.0, 1.0, x.numel(), dtype=torch.float64).reshape(x.shape).to(dtype).to(x.device)
        (grad,) = torch.autograd.grad(codes, x, g)
        return codes.detach().cpu(), indices.cpu(), usage.cpu(), grad.cpu()

    def body():
        got = run(z, backend, key_offset.to(device))
        want = run(z.cpu(), "reference", key_offset)
        if not (torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])):
            raise MismatchError(f"{mode}: indices or usage histogram differ from the reference")
        if mode == "peer":
            if not torch.equal(got[0].nan_to_num(7.0), want[0].nan_to_num(7.0)):
                raise MismatchError("peer: dithered codes differ from the reference bit for bit")
        else:
            tol = 1e-5 if dtype == torch.float32 else 2**-7
            torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol, equal_nan=True)
        return 0, assert_grad_close(got[3], want[3])

    return body


def _decode_case(backend, levels, variant, index_dtype, dtype, permuted, channel_first, num_codebooks, device, gen):
    size = reference.codebook_size(levels)
    high = min(size, torch.iinfo(index_dtype).max + 1)
    shape = (2, 9, 7) if channel_first else (9, 7)
    if num_codebooks > 1:
        shape = (*shape, num_codebooks)
    if permuted:  # the same shape as a non-contiguous view of a larger, transposed buffer
        base = torch.randint(0, high, (shape[1], shape[0], *shape[2:]), generator=gen).to(index_dtype).to(device)
        indices = base.transpose(0, 1)
    else:
        indices = torch.randint(0, high, shape, generator=gen).to(index_dtype).to(device)
    kw = dict(variant=variant, channel_first=channel_first, num_codebooks=num_codebooks)

    def body():
        codes = fsq_kernels.indices_to_codes(indices, levels, dtype=dtype, backend=backend, **kw)
        assert_decode_matches_reference(codes, indices, levels, **kw)
        return 0, 0.0

    return body


def _residual_case(backend, levels, num_stages, dtype, channel_first, device, gen, tokens, active=None):
    c = len(levels)
    shape = (2, c, 5, max(1, tokens // 10)) if channel_first else (tokens, c)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 1.5).to(dtype).to(device)
    soft = reference.residual_soft_clamp(levels)

    def body():
        out, indices = fsq_kernels.residual_quantize(x, levels, num_stages, soft_clamp=soft, channel_first=channel_first,
                                                     active_stages=active, backend=backend)
        stage_axis = 1 if channel_first else -1
        dropped = indices.narrow(stage_axis, active, num_stages - active) if active is not None else indices[:0]
        if not bool((dropped == -1).all()):
            raise MismatchError(f"stages from active_stages={active} on must be -1")
        diffs = assert_residual_consistent(indices, x, levels, soft_clamp=soft, channel_first=channel_first)
        assert_residual_output(out, indices, x, levels, channel_first=channel_first)
        return diffs, 0.0

    return body


def _empty_case(backend, device):
    def body():
        levels = (8, 5, 5, 5)
        for shape, channel_first in (((0, 4), False), ((2, 4, 0, 3), True)):
            z = torch.empty(shape, device=device)
            codes, indices = fsq_kernels.quantize(z, levels, channel_first=channel_first, backend=backend)
            assert_matches_reference(codes, indices, z, levels, channel_first=channel_first)
            decoded = fsq_kernels.indices_to_codes(indices, levels, channel_first=channel_first, backend=backend)
            assert_decode_matches_reference(decoded, indices, levels, channel_first=channel_first)
        return 0, 0.0

    return body


def _quantize_cases(backend, level_sets, quick, device, gen, tokens):
    dtypes = DTYPES + ((torch.float64,) if backend in ("reference", "cpp") else ())
    for levels, (variant, hard), dtype in itertools.product(level_sets, VARIANT_CLAMPS, dtypes):
        for i, layout in enumerate(LAYOUTS):
            for ncb in ((1 + i % 2,) if quick else (1, 2)):
                grad = not quick or layout == "channel-last"
                case = f"{list(levels)} {variant}{'+hard' if hard else ''} {_short(dtype)} {layout} x{ncb}"
                yield ("quantize+grad" if grad else "quantize", case,
                       _quantize_case(backend, levels, variant, hard, dtype, layout, ncb, device, gen, tokens, grad))
    yield "empty", "(0, 4) and (2, 4, 0, 3)", _empty_case(backend, device)


def _train_cases(backend, quick, device, gen, tokens):
    layouts = LAYOUTS[:2] if quick else LAYOUTS
    for mode, dtype, layout in itertools.product(("peer", "taae"), DTYPES[:1] if quick else DTYPES, layouts):
        yield "train+grad", f"[8, 5, 5, 5] {mode} {_short(dtype)} {layout}", _train_case(backend, mode, dtype, layout, device,
                                                                                   gen, tokens)


def _decode_cases(backend, quick, device, gen):
    if quick:  # each index dtype once, with a codebook it can hold
        pairs = [((8, 5, 5, 5), t) for t in INDEX_DTYPES[:3]] + [((2, 3, 4), t) for t in INDEX_DTYPES[3:]]
        variants, dtypes = ("paper", "symmetric"), DTYPES[:2]
    else:
        pairs = [(levels, t) for levels in ((2, 3, 4), (8, 5, 5, 5), (8, 8, 8, 5, 5, 5)) for t in INDEX_DTYPES
                 if t == torch.int16 or reference.codebook_size(levels) <= torch.iinfo(t).max + 1]
        variants, dtypes = reference.VARIANTS, DTYPES
    for (levels, index_dtype), variant, dtype, permuted, channel_first in itertools.product(
            pairs, variants, dtypes, (False, True), (False, True)):
        ncb = 2 if permuted and not channel_first else 1
        case = (f"{list(levels)} {variant} {_short(index_dtype)}->{_short(dtype)} "
                f"{'permuted' if permuted else 'contiguous'} {'channel-first' if channel_first else 'channel-last'} x{ncb}")
        yield "decode", case, _decode_case(backend, levels, variant, index_dtype, dtype, permuted, channel_first, ncb,
                                           device, gen)


def _residual_cases(backend, quick, device, gen, tokens):
    stage_sets = ((8, None),) if quick else ((4, None), (8, None), (8, 5))  # (stages, active_stages)
    for (stages, active), dtype, channel_first in itertools.product(stage_sets, DTYPES[:2], (False, True)):
        case = (f"[8, 5, 5, 5] x{stages} stages{'' if active is None else f' ({active} active)'} {_short(dtype)} "
                f"{'channel-first' if channel_first else 'channel-last'}")
        yield "residual", case, _residual_case(backend, (8, 5, 5, 5), stages, dtype, channel_first, device, gen, tokens,
                                               active)


def run_check(device: str = "cpu", quick: bool = False, seed: int = 0, backends: list[str] | None = None,
              progress: Callable[[str], None] | None = None) -> list[Outcome]:
    """Run every case on every available backend of `device` (or those of `backends` among
    them); never raises for a mismatch. `progress` gets a line after each backend's group."""
    device_type = torch.device(device).type
    gen = torch.Generator().manual_seed(seed)
    tokens = 97 if quick else 4099  # odd: vector tails
    outcomes: list[Outcome] = []
    for op, make_cases in (
        ("quantize", lambda b: _quantize_cases(b, QUICK_LEVELS if quick else FULL_LEVELS, quick, device, gen, tokens)),
        ("quantize_train", lambda b: _train_cases(b, quick, device, gen, tokens)),
        ("indices_to_codes", lambda b: _decode_cases(b, quick, device, gen)),
        ("residual_quantize", lambda b: _residual_cases(b, quick, device, gen, tokens)),
    ):
        for backend in _available_on(device_type, op):
            if backends is not None and backend not in backends:
                continue
            first = len(outcomes)
            for group, case, body in make_cases(backend):
                _run(outcomes, backend, group, case, body)
            if progress:
                new = outcomes[first:]
                for group in dict.fromkeys(o.group for o in new):
                    done = [o for o in new if o.group == group]
                    progress(f"{backend:<10} {group:<14} {len(done):>4} cases, {sum(not o.ok for o in done)} failed")
    return outcomes


def summarize(outcomes: list[Outcome]) -> list[dict]:
    """One row per (backend, group): cases, failures, in-window differences, largest gradient error."""
    rows: dict[tuple[str, str], dict] = {}
    for o in sorted(outcomes, key=lambda o: (_BACKEND_ORDER.index(o.backend), _GROUP_ORDER.index(o.group))):
        row = rows.setdefault((o.backend, o.group), dict(backend=o.backend, group=o.group, cases=0, failed=0,
                                                         window_diffs=0, max_grad_err=0.0))
        row["cases"] += 1
        row["failed"] += not o.ok
        row["window_diffs"] += o.window_diffs
        row["max_grad_err"] = max(row["max_grad_err"], o.grad_err)
    return list(rows.values())


def format_table(outcomes: list[Outcome], device: str, seconds: float) -> str:
    rows = summarize(outcomes)
    header = f"{'backend':<10} {'check':<14} {'cases':>6} {'failed':>7} {'in-window diffs':>16} {'max grad err':>13}"
    lines = [f"check on {device}: {len(outcomes)} cases in {seconds:.1f} s", header, "-" * len(header)]
    for r in rows:
        grad = f"{r['max_grad_err']:.2e}" if r["group"].endswith("+grad") else "-"
        lines.append(f"{r['backend']:<10} {r['group']:<14} {r['cases']:>6} {r['failed']:>7} {r['window_diffs']:>16} {grad:>13}")
    failures = [o for o in outcomes if not o.ok]
    for o in failures[:20]:
        lines.append(f"FAIL {o.backend} {o.group} {o.case}: {o.detail.splitlines()[0][:300]}")
    if len(failures) > 20:
        lines.append(f"... and {len(failures) - 20} more failures (--json lists them all)")
    lines.append("OK: every backend matches the reference" if not failures else f"MISMATCH: {len(failures)} failed cases")
    return "\n".join(lines)


def timed_check(device: str, quick: bool, backends=None, progress=None) -> tuple[list[Outcome], float]:
    start = time.perf_counter()
    outcomes = run_check(device, quick, backends=backends, progress=progress)
    return outcomes, time.perf_counter() - start
