"""The vocab-parallel loss at TP = 1, 2, 4 (gloo) against the single-device reference.

Tolerances (fp32 math): loss within 2e-6 absolute + 2e-6 relative, gradient within 1e-6 absolute
+ 1e-5 relative. The two implementations sum the same fp32 terms in different orders (per slice,
then across slices, rescaled from each slice's maximum), and the vocab-parallel one obtains the
tail sums as total minus head: both differ from the reference by a few fp32 ulps of the sums.
bf16 logits are compared with the reference on the same values upcast to fp32, so the loss keeps
the fp32 tolerance; the gradient comes back in bf16 and is compared within one bf16 rounding
(relative 2**-8).
"""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch
import torch.distributed as dist

from megatron_ext.loss import (
    RewardShapingConfig,
    reference_shaped_cross_entropy,
    vocab_parallel_shaped_cross_entropy,
)

LOSS_TOL = {"rtol": 2e-6, "atol": 2e-6}
GRAD_TOL = {"fp32": {"rtol": 1e-5, "atol": 1e-6}, "bf16": {"rtol": 2**-8, "atol": 1e-6}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Case:
    scenario: str
    config: RewardShapingConfig
    vocab: int = 256
    seq: int = 6
    batch: int = 3
    dtype: str = "fp32"
    seed: int = 0


def make_inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full logits [s, b, V] (in the case's dtype), targets [s, b] and an upstream gradient."""
    gen = torch.Generator().manual_seed(case.seed)
    s, b, v = case.seq, case.batch, case.vocab
    z = torch.randn(s, b, v, generator=gen) * 3
    x = torch.randint(0, v, (s, b), generator=gen)
    k = min(case.config.top_k, v)
    if case.scenario == "ties":
        z = torch.round(z * 2) / 2  # many exact ties, also at the k-th value
        # A row whose k-th value is repeated across every slice.
        kth = torch.topk(z[0, 0], k).values[-1]
        z[0, 0, torch.randperm(v, generator=gen)[: max(4, v // 8)]] = kth
    elif case.scenario == "top_ties":
        z[1, 0] = 5.0  # the whole row equal: everything is in the set
        z[1, 1, :] = -2.0
        z[1, 1, ::3] = 4.0
    elif case.scenario == "sure":  # p(x) -> 1
        z.scatter_(-1, x.unsqueeze(-1), 80.0)
    elif case.scenario == "hopeless":  # p(x) -> 0
        z.scatter_(-1, x.unsqueeze(-1), -80.0)
    elif case.scenario == "wide":
        z = z * 8
    x[0, 1] = -100  # an ignored position in every case
    x[-1, -1] = -100
    grad = torch.rand(s, b, generator=gen) + 0.5
    return z.to(DTYPES[case.dtype]), x, grad


def reference(case: Case):
    z, x, grad = make_inputs(case)
    zz = z.float().requires_grad_()
    loss, stats = reference_shaped_cross_entropy(zz, x, case.config, return_stats=True)
    (loss * grad).sum().backward()
    return loss.detach(), zz.grad, stats


def run_case(case: Case, rank: int, world: int, group):
    """This rank's slice through the vocab-parallel loss: loss, gradient slice, stats."""
    z, x, grad = make_inputs(case)
    vp = case.vocab // world
    piece = z[..., rank * vp : (rank + 1) * vp].clone()
    leaf = piece.requires_grad_()
    inp = leaf * 1 if case.dtype == "fp32" else leaf  # fp32 logits are overwritten: not the leaf
    loss, stats = vocab_parallel_shaped_cross_entropy(inp, x, case.config, group, return_stats=True)
    (loss * grad).sum().backward()
    return loss.detach(), leaf.grad, stats


def worker_cases(cases: list[Case]):
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    return [run_case(c, rank, world, group) for c in cases]


def worker_cases_torch_ops(cases: list[Case]):
    """worker_cases with the CPU kernels switched off: the torch ops the GPU path runs."""
    from megatron_ext.loss import functional, select

    saved = functional.cpu_kernels, select.cpu_kernels
    functional.cpu_kernels = select.cpu_kernels = lambda: None
    try:
        return worker_cases(cases)
    finally:
        functional.cpu_kernels, select.cpu_kernels = saved


def check(case: Case, per_rank: list) -> None:
    want_loss, want_grad, want_stats = reference(case)
    losses = [r[0] for r in per_rank]
    for other in losses[1:]:  # every rank computes the same per-position numbers
        assert torch.equal(other, losses[0]), case
    torch.testing.assert_close(losses[0], want_loss, **LOSS_TOL, msg=lambda m: f"{case}: {m}")
    grad = torch.cat([r[1] for r in per_rank], dim=-1)  # reassembled [s, b, V]
    assert grad.dtype == DTYPES[case.dtype]
    torch.testing.assert_close(
        grad.float(), want_grad, **GRAD_TOL[case.dtype], msg=lambda m: f"{case}: {m}"
    )
    stats = per_rank[0][2]
    for name in ("entropy", "target_prob", "target_logprob", "topk_mass"):
        torch.testing.assert_close(
            getattr(stats, name),
            getattr(want_stats, name),
            rtol=1e-5,
            atol=2e-6,
            msg=lambda m: f"{case} {name}: {m}",
        )
    # Ignored positions: zero loss and zero gradient.
    _, x, _ = make_inputs(case)
    ignored = x == -100
    assert (losses[0][ignored] == 0).all() and (grad[ignored] == 0).all()


def _random_configs(n: int, seed: int) -> list[RewardShapingConfig]:
    rng = random.Random(seed)
    return [
        RewardShapingConfig(
            beta=rng.choice([0.0, rng.uniform(-0.9, 2.0)]),
            lambda_head=rng.choice([0.0, rng.uniform(-0.5, 0.5)]),
            lambda_tail=rng.choice([0.0, rng.uniform(-0.5, 0.5)]),
            top_k=rng.choice([1, 3, 17, 64, 100]),
        )
        for _ in range(n)
    ]


def cases_for(tp: int) -> list[Case]:
    presets = [RewardShapingConfig.preset(n) for n in RewardShapingConfig.PRESET_NAMES]
    cases = []
    for scenario in ("random", "ties", "top_ties", "sure", "hopeless", "wide"):
        for dtype in ("fp32", "bf16"):
            for cfg in presets:
                cases.append(Case(scenario, cfg, dtype=dtype, seed=len(cases)))
    for i, cfg in enumerate(_random_configs(12, seed=tp)):
        cases.append(Case(("random", "ties")[i % 2], cfg, seed=100 + i))
    v = 256
    split = RewardShapingConfig(beta=-0.25, lambda_head=0.2, lambda_tail=-0.1, top_k=1)
    for k in sorted({v // tp, min(v, v // tp + 3), v - 1, v}):  # at and beyond the slice, to V
        cfg = dataclasses.replace(split, top_k=k)
        cases += [Case("random", cfg, seed=7), Case("ties", cfg, seed=8)]
    cases.append(Case("ties", split, vocab=192, seq=4, batch=2, dtype="bf16", seed=9))
    return cases


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_matches_reference(tp, request):
    cases = cases_for(tp)
    if tp == 1:
        results = [[run_case(c, 0, 1, None)] for c in cases]
    else:
        pool = request.getfixturevalue(f"pool{tp}")
        per_rank = pool.run(worker_cases, cases)  # [rank][case]
        results = [[per_rank[r][i] for r in range(tp)] for i in range(len(cases))]
    for case, per_rank_results in zip(cases, results, strict=True):
        check(case, per_rank_results)


def test_torch_ops_match_reference_at_tp2(pool2):
    """The path CUDA takes (torch ops for the top-k search, the merge and the gradient), on
    every case at TP = 2."""
    cases = cases_for(2)
    per_rank = pool2.run(worker_cases_torch_ops, cases)
    for i, case in enumerate(cases):
        check(case, [per_rank[r][i] for r in range(2)])


# ---------------------------------------------------------------------------------------------
# beta = lambda = 0 against megatron-core's own vocab-parallel cross-entropy


def worker_megatron_ce(seed: int, vocab: int):
    from megatron.core.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy

    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(8, 2, vocab, generator=gen) * 4
    x = torch.randint(0, vocab, (8, 2), generator=gen)
    grad = torch.rand(8, 2, generator=gen)
    vp = vocab // world
    piece = z[..., rank * vp : (rank + 1) * vp]
    out = []
    for fn in (
        lambda t: vocab_parallel_cross_entropy(t, x, tp_group=group),
        lambda t: vocab_parallel_shaped_cross_entropy(t, x, RewardShapingConfig(), group),
    ):
        leaf = piece.clone().requires_grad_()
        loss = fn(leaf * 1)
        (loss * grad).sum().backward()
        out.append((loss.detach(), leaf.grad))
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_cross_entropy_config_matches_megatron_core(tp, request):
    pool = request.getfixturevalue(f"pool{tp}") if tp > 1 else None
    if tp == 1:
        request.getfixturevalue("world1")
        per_rank = [worker_megatron_ce(5, 512)]
    else:
        per_rank = pool.run(worker_megatron_ce, 5, 512)
    for (mc_loss, mc_grad), (our_loss, our_grad) in per_rank:
        torch.testing.assert_close(our_loss, mc_loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(our_grad, mc_grad, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error on every rank, never a silent wrong loss


def worker_bad_input(kind: str):
    group = dist.group.WORLD
    rank, world = dist.get_rank(), dist.get_world_size()
    vp = 64
    z = torch.randn(4, 2, vp, generator=torch.Generator().manual_seed(rank))
    x = torch.randint(0, vp * world, (4, 2), generator=torch.Generator().manual_seed(0))
    cfg = RewardShapingConfig()
    if kind == "label_high":
        x[2, 1] = vp * world
    elif kind == "label_negative":
        x[1, 0] = -5
    elif kind == "unequal":
        z = torch.randn(4, 2, vp + rank)
    elif kind == "k_too_large":
        cfg = RewardShapingConfig(lambda_tail=-0.1, top_k=vp * world + 1)
    elif kind == "nan" and rank == world - 1:
        z[3, 1, 5] = float("nan")
    elif kind == "inf" and rank == 0:
        z[0, 0, 1] = float("-inf")
    try:
        vocab_parallel_shaped_cross_entropy(z, x, cfg, group)
    except ValueError as err:
        return str(err)
    return None


@pytest.mark.parametrize(
    "kind, message",
    [
        ("label_high", r"target id 128 at flat position 5 is outside the vocabulary \[0, 128\)"),
        ("label_negative", r"target id -5 at flat position 2 is outside the vocabulary"),
        ("unequal", r"vocabulary slices of different sizes"),
        ("k_too_large", r"top_k=129 exceeds the vocabulary size 128.*choose top_k <= 128"),
        ("nan", r"non-finite logits at flat position 7 .*"),
        ("inf", r"non-finite logits at flat position 0 .*"),
    ],
)
def test_bad_input_raises_on_every_rank(kind, message, pool2):
    errors = pool2.run(worker_bad_input, kind)
    for rank, err in enumerate(errors):
        assert err is not None, f"rank {rank} accepted bad input ({kind})"
        assert re.search(message, err), (rank, err)
    if kind == "nan":
        assert all("TP rank 1 holds NaN" in e and "rank 0" not in e for e in errors)
    if kind == "inf":
        assert all("TP rank 0 holds -inf" in e and "rank 1" not in e for e in errors)
    if kind == "unequal":
        assert all("different sizes [64, 65]" in e for e in errors)
