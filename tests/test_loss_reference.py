"""The loss configuration and the single-device reference against independent derivations."""

import dataclasses
import math

import pytest
import torch

from megatron_ext.loss import RewardShapingConfig, reference_shaped_cross_entropy
from megatron_ext.loss.reference import positive_weight

# ---------------------------------------------------------------------------------------------
# Configuration


def test_presets_are_the_papers_settings():
    p = RewardShapingConfig.preset
    assert p("ce").is_cross_entropy
    assert (p("precision").beta, p("precision").uses_top_k) == (-0.25, False)
    assert (p("diversity").beta, p("diversity").uses_top_k) == (0.5, False)
    assert (p("tail_suppression").lambda_tail, p("tail_suppression").top_k) == (-0.1, 100)
    assert (p("head_preservation").lambda_head, p("head_preservation").top_k) == (0.1, 100)
    with pytest.raises(ValueError, match="unknown reward-shaping preset 'precise'.*precision"):
        p("precise")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"beta": -1.0}, r"beta=-1.0 is out of range: beta must be > -1"),
        ({"beta": -3}, r"beta=-3 is out of range"),
        ({"beta": float("nan")}, r"beta must be finite, got nan"),
        ({"lambda_tail": float("inf")}, r"lambda_tail must be finite, got inf"),
        ({"lambda_head": "0.1"}, r"lambda_head must be a float, got '0.1'"),
        (
            {"lambda_tail": -0.1, "top_k": 0},
            r"top_k=0 must be >= 1 when lambda_head or lambda_tail",
        ),
        ({"top_k": 2.5}, r"top_k must be an int, got 2.5"),
    ],
)
def test_config_rejects_bad_values_and_quotes_them(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        RewardShapingConfig(**kwargs)


def test_config_is_frozen_and_keyword_only():
    cfg = RewardShapingConfig(beta=0.1)
    with pytest.raises(AttributeError):
        cfg.beta = 0.2
    with pytest.raises(TypeError):
        RewardShapingConfig(0.1)  # positional


# ---------------------------------------------------------------------------------------------
# The reference against objective.md section 3, derived here independently in float64


def _closed_form(z: torch.Tensor, x: torch.Tensor, cfg: RewardShapingConfig):
    """Loss and dloss/dz from the formulas of objective.md section 3, written out term by term."""
    z = z.double()
    p = torch.softmax(z, -1)
    lp = torch.log_softmax(z, -1)
    n, v = z.shape
    losses, grads = [], []
    for i in range(n):
        xi = int(x[i])
        px = float(p[i, xi])
        w_pos = px ** (1.0 - (1.0 - px) ** cfg.beta) if cfg.beta != 0 else 1.0
        tau = sorted(z[i].tolist(), reverse=True)[min(cfg.top_k, v) - 1]
        w = torch.zeros(v, dtype=torch.float64)
        for a in range(v):
            if a != xi:
                c = cfg.lambda_head if float(z[i, a]) >= tau else cfg.lambda_tail
                w[a] = c * p[i, a]
        loss = -(w_pos * lp[i, xi] + (w * lp[i]).sum())
        big_w = w_pos + w.sum()
        grad = big_w * p[i] - w
        grad[xi] -= w_pos
        losses.append(loss)
        grads.append(grad)
    return torch.stack(losses), torch.stack(grads)


CONFIGS = [  # the paper's presets with k scaled down to the small test vocabularies
    dataclasses.replace(RewardShapingConfig.preset(name), top_k=7)
    for name in RewardShapingConfig.PRESET_NAMES
] + [
    RewardShapingConfig(beta=-0.6, lambda_head=0.3, lambda_tail=-0.2, top_k=5),
    RewardShapingConfig(beta=0.9, lambda_head=-0.1, lambda_tail=0.05, top_k=1),
]


@pytest.mark.parametrize(
    "cfg", CONFIGS, ids=lambda c: f"b{c.beta}_h{c.lambda_head}_t{c.lambda_tail}"
)
def test_reference_matches_closed_form_loss_and_gradient(cfg):
    gen = torch.Generator().manual_seed(3)
    n, v = 6, 40
    z = torch.randn(n, v, generator=gen, dtype=torch.float64) * 2
    z[0, 5:9] = z[0].max()  # ties at the top: all in the set
    z[1] = torch.round(z[1])  # many ties, also at the k-th value
    x = torch.randint(0, v, (n,), generator=gen)
    x[2] = int(z[2].argmax())  # the target inside the top-k set
    zz = z.clone().requires_grad_()
    loss = reference_shaped_cross_entropy(zz, x, cfg)
    loss.sum().backward()
    want_loss, want_grad = _closed_form(z, x, cfg)
    # float64 throughout: agreement to a few ulps of the values involved.
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(zz.grad, want_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "cfg", CONFIGS[1:], ids=lambda c: f"b{c.beta}_h{c.lambda_head}_t{c.lambda_tail}"
)
def test_reference_gradient_matches_finite_differences(cfg):
    """Central differences of the loss with its weights frozen at z (they are stop-gradient)."""
    gen = torch.Generator().manual_seed(11)
    n, v = 3, 12
    z = torch.randn(n, v, generator=gen, dtype=torch.float64) * 1.5
    x = torch.randint(0, v, (n,), generator=gen)
    zz = z.clone().requires_grad_()
    reference_shaped_cross_entropy(zz, x, cfg).sum().backward()

    p = torch.softmax(z, -1)
    px = p.gather(1, x[:, None]).squeeze(1)
    w_pos = px ** (1.0 - (1.0 - px) ** cfg.beta)
    tau = torch.topk(z, min(cfg.top_k, v), -1).values[:, -1:]
    c = torch.where(z >= tau, cfg.lambda_head, cfg.lambda_tail).scatter(1, x[:, None], 0.0)
    w_neg = c * p

    def frozen_loss(zp: torch.Tensor) -> float:
        lp = torch.log_softmax(zp, -1)
        return float(-(w_pos * lp.gather(1, x[:, None]).squeeze(1) + (w_neg * lp).sum(-1)).sum())

    h = 1e-6
    fd = torch.zeros_like(z)
    for i in range(n):
        for j in range(v):
            plus, minus = z.clone(), z.clone()
            plus[i, j] += h
            minus[i, j] -= h
            fd[i, j] = (frozen_loss(plus) - frozen_loss(minus)) / (2 * h)
    # Central differences in float64 with h=1e-6: truncation ~h^2, rounding ~1e-16/h = 1e-10.
    torch.testing.assert_close(zz.grad, fd, rtol=0, atol=1e-8)


def test_positive_weight_is_finite_at_the_extremes():
    lp = torch.tensor([0.0, -1e-30, -1e-7, -0.5, -30.0, -200.0], dtype=torch.float32)
    for beta in (-0.99, -0.25, 0.0, 0.5, 3.0):
        w = positive_weight(lp, beta)
        assert torch.isfinite(w).all(), (beta, w)
        # The exact value where it is representable: p ** (1 - (1 - p) ** beta).
        p = lp[3].double().exp()
        assert math.isclose(float(w[3]), float(p ** (1 - (1 - p) ** beta)), rel_tol=1e-6)
    assert float(positive_weight(torch.tensor([0.0]), -0.25)) == 1.0  # p = 1: reward 1/p = 1


def test_beta_zero_and_no_lambdas_is_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(7, 50, generator=gen)
    x = torch.randint(0, 50, (7,), generator=gen)
    x[3] = -100
    loss = reference_shaped_cross_entropy(z, x, RewardShapingConfig())
    want = torch.nn.functional.cross_entropy(z, x, reduction="none", ignore_index=-100)
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
