"""The demo's own pieces (the demo itself is the README's main job: `vllm-smoothquant demo`)."""

import pytest


@pytest.mark.parametrize("requested, used, alphas, want", [
    (None, None, [], "no smoothing"),
    (None, 0.8, [0.8] * 4, "α = 0.8 (family default) in all 4 smoothing groups"),
    (0.5, None, [0.5] * 2, "α = 0.5 (given) in all 2 smoothing groups"),
    ("auto", None, [0.9, 0.1, 0.5], "α searched per group (given; 3 groups): min 0.10, median 0.50, max 0.90"),
    (None, "auto", [0.9, 0.1, 0.5], "α searched per group (default; 3 groups): min 0.10, median 0.50, max 0.90"),
])
def test_demo_alpha_summary(requested, used, alphas, want):
    from vllm_smoothquant.offline.demo import alpha_summary
    from vllm_smoothquant.offline.pipeline import GroupReport

    assert alpha_summary([GroupReport(0, "qkv", a, 1.0, 1.0) for a in alphas], requested, used) == want
