"""pytest-benchmark suite: every available provider over modes, dtypes, level sets, layouts, sizes.

    pytest benchmarks                       # real measurements (sizes 2^10 .. 2^24 tokens)
    pytest benchmarks --benchmark-disable   # smoke test, as CI runs it: each case once, sizes
                                            # capped at 2^14 tokens, no torch.compile providers
"""

from __future__ import annotations

import torch

from .providers import DTYPES, LAYOUTS, LEVEL_SETS, MODES, PROVIDERS, Case, build, build_floor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ALL_LOG2_SIZES = (10, 14, 18, 22, 24)
SMOKE_MAX_LOG2 = 14


def _smoke(config) -> bool:
    return bool(config.getoption("benchmark_disable", default=False))


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    smoke = _smoke(metafunc.config)
    sizes = [k for k in ALL_LOG2_SIZES if not smoke or k <= SMOKE_MAX_LOG2]
    # The floor is the same whatever the mode: it gets the forward cases only.
    modes = MODES if "provider" in metafunc.fixturenames else ("forward",)
    cases = [
        Case(mode, dtype, levels, layout, 2**k, DEVICE)
        for mode in modes for dtype in DTYPES for levels in LEVEL_SETS for layout in LAYOUTS for k in sizes
    ]
    if "provider" in metafunc.fixturenames:
        # ResidualFSQ with 4 and 8 stages (vector-quantize-pytorch's defaults), channel-last.
        cases += [
            Case(mode, "fp32", (8, 5, 5, 5), "channel-last", 2**k, DEVICE, stages)
            for mode in ("forward", "forward+backward") for stages in (4, 8) for k in sizes
        ]
        providers = [p for p in PROVIDERS if not (smoke and p.compiled)]
        pairs = [(p, c) for c in cases for p in providers if p.available(DEVICE, c.op)]
        metafunc.parametrize("provider,case", pairs, ids=[f"{p.name}-{c.label()}" for p, c in pairs])
    else:
        metafunc.parametrize("case", cases, ids=[c.label() for c in cases])


def test_provider(benchmark, provider, case):
    fn = build(provider.functions(), case)
    benchmark.group = case.label()
    benchmark(fn)


def test_floor(benchmark, case):
    benchmark.group = case.label()
    benchmark(build_floor(case))
