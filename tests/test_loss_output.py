"""The fused output-layer loss against the unfused path (the output layer's matmul, then
vocab_parallel_shaped_cross_entropy), as a function at TP = 1, 2, 4 and inside megatron-core's
GPTModel (sequence parallelism, tied embeddings, megatron DDP's main_grad), on gloo.

Tolerances, fp32: the loss within 1e-6 relative to its largest element. The logits of a chunk and
of the whole matmul are the same dot products, but the CPU's matmul picks its blocking by the
number of rows, so they may differ by a few ulps (measured: 3e-5 at logits near 100); the
statistics within 1e-5 (as in test_loss_parallel: entropy = log S - T / S cancels, and at positions
with p(x) near 1 the few-ulp logit differences show at 3e-6). The gradients of the hidden states
and of the weight within 1e-5 relative to their largest element (the fused path sums dz^T h over
chunks where the single matmul sums over all positions at once: a different fp32 summation order,
~1e-7 relative per element; a relative bound per element would be meaningless where the sums
cancel). bf16: the logits are the same bf16 values, so the loss keeps 1e-6; the gradients come back
in bf16 and may differ by two bf16 roundings (2**-7 relative): the fused path accumulates the
weight gradient in fp32 and rounds once at the end where the unfused bf16 matmul rounds its own
result, and "precompute" rounds dz for an upstream gradient of 1 where the unfused path rounds it
after the scaling.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.distributed as dist

from megatron_ext.loss import (
    RewardShapingConfig,
    fused_output_shaped_cross_entropy,
    vocab_parallel_shaped_cross_entropy,
)
from megatron_ext.loss.vocab_parallel import INPUT_FLAGS

LOSS_RTOL = 1e-6
STATS_RTOL = 1e-5
GRAD_RTOL = {"fp32": 1e-5, "bf16": 2**-7}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRESETS = RewardShapingConfig.PRESET_NAMES


@dataclasses.dataclass(frozen=True)
class Case:
    scenario: str  # random | ties | sure
    shaping: str
    dtype: str = "fp32"
    positions: int = 37
    hidden: int = 24
    vocab: int = 256
    chunk_rows: int | None = 8  # several chunks and a shorter last one
    gradient: str = "precompute"
    seed: int = 0


def make_inputs(case: Case):
    """hidden [N, h], the full weight [V, h], targets [N] and an upstream gradient [N]."""
    gen = torch.Generator().manual_seed(case.seed)
    n, h, v = case.positions, case.hidden, case.vocab
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.4
    if case.scenario == "ties":
        # Rows of the weight repeated across the vocabulary (and so across the slices): every
        # position's logits tie in groups of 16, at the k-th value too.
        weight = weight[torch.arange(v) % (v // 16)]
    elif case.scenario == "sure":
        hidden = hidden * 20  # p(x) near 1 or 0 at many positions
    target = torch.randint(0, v, (n,), generator=gen)
    target[1] = target[-2] = -100  # ignored positions
    if case.gradient == "precompute":  # what megatron's loss functions send: one scalar
        grad = torch.full((n,), 0.7)
    else:  # any upstream gradient
        grad = torch.rand(n, generator=gen) + 0.5
    return hidden.to(DTYPES[case.dtype]), weight.to(DTYPES[case.dtype]), target, grad


def run_both(case: Case, rank: int, world: int, group, device: str = "cpu"):
    """This rank's loss, stats and gradients (hidden's partial, the weight slice's), unfused
    and fused (computed on `device`, returned on the CPU)."""
    hidden, weight, target, grad = (t.to(device) for t in make_inputs(case))
    vp = case.vocab // world
    piece = weight[rank * vp : (rank + 1) * vp]
    shaping = RewardShapingConfig.preset(case.shaping)
    out = {}
    for name in ("unfused", "fused"):
        h = hidden.clone().requires_grad_()
        w = piece.clone().requires_grad_()
        if name == "unfused":
            logits = h @ w.t()  # [N, V/tp], the output layer's matmul
            loss, stats = vocab_parallel_shaped_cross_entropy(
                logits, target, shaping, group, return_stats=True
            )
        else:
            loss, stats = fused_output_shaped_cross_entropy(
                h,
                w,
                target,
                shaping,
                group,
                return_stats=True,
                chunk_rows=case.chunk_rows,
                gradient=case.gradient,
            )
        (loss * grad).sum().backward()
        stats = type(stats)(*(t.cpu() for t in stats))
        out[name] = (loss.detach().cpu(), stats, h.grad.cpu(), w.grad.cpu())
    return out


def worker_cases(cases: list[Case]):
    rank, world = dist.get_rank(), dist.get_world_size()
    return [run_both(c, rank, world, dist.group.WORLD) for c in cases]


def _close(actual, expected, rtol, what):
    """Within rtol of the largest element of `expected` (see the module docstring)."""
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}"
    )


def check(case: Case, result: dict) -> None:
    loss_u, stats_u, gh_u, gw_u = result["unfused"]
    loss_f, stats_f, gh_f, gw_f = result["fused"]
    _close(loss_f, loss_u, LOSS_RTOL, f"{case} loss")
    for name in ("entropy", "target_prob", "target_logprob", "topk_mass"):
        _close(getattr(stats_f, name), getattr(stats_u, name), STATS_RTOL, f"{case} {name}")
    assert gh_f.dtype == gh_u.dtype and gw_f.dtype == gw_u.dtype
    _close(gh_f, gh_u, GRAD_RTOL[case.dtype], f"{case} d hidden")
    _close(gw_f, gw_u, GRAD_RTOL[case.dtype], f"{case} d weight")
    ignored = make_inputs(case)[2] == -100
    assert (loss_f[ignored] == 0).all() and (gh_f[ignored] == 0).all()


def cases_for(tp: int) -> list[Case]:
    cases = []
    for scenario in ("random", "ties", "sure"):
        for dtype in ("fp32", "bf16"):
            for shaping in PRESETS:
                cases.append(Case(scenario, shaping, dtype, seed=len(cases)))
    # One chunk for everything, one position per chunk, and a top-k beyond the slice.
    cases += [
        Case("random", "tail_suppression", chunk_rows=None, seed=50),
        Case("ties", "head_preservation", chunk_rows=1, positions=9, seed=51),
        Case("ties", "tail_suppression", vocab=128, seed=52),  # k = 100 > V/tp at TP >= 2
    ]
    # The other gradient strategy, under any upstream gradient.
    for scenario in ("random", "ties"):
        for dtype in ("fp32", "bf16"):
            for shaping in ("precision", "tail_suppression"):
                cases.append(Case(scenario, shaping, dtype, gradient="recompute", seed=len(cases)))
    return cases


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_fused_matches_unfused(tp, request):
    cases = cases_for(tp)
    if tp == 1:
        results = [run_both(c, 0, 1, None) for c in cases]
        for case, result in zip(cases, results, strict=True):
            check(case, result)
        return
    per_rank = request.getfixturevalue(f"pool{tp}").run(worker_cases, cases)
    for rank_results in per_rank:
        for case, result in zip(cases, rank_results, strict=True):
            check(case, result)
    for i in range(len(cases)):  # every rank reports the same per-position losses
        assert all(torch.equal(r[i]["fused"][0], per_rank[0][i]["fused"][0]) for r in per_rank)


# ---------------------------------------------------------------------------------------------
# Bad input keeps its errors, on every rank


def worker_bad_input(kind: str, flags: bool):
    rank = dist.get_rank()
    hidden, weight, target, _ = make_inputs(Case("random", "precision"))
    piece = weight[rank * 128 : (rank + 1) * 128]
    if kind == "label":
        target[5] = 256 + 7
    else:
        hidden[4, 0] = float("nan")
    counts = torch.zeros(len(INPUT_FLAGS)) if flags else None
    try:
        loss = fused_output_shaped_cross_entropy(
            hidden,
            piece,
            target,
            RewardShapingConfig.preset("precision"),
            dist.group.WORLD,
            input_flags=counts,
        )
    except ValueError as exc:
        return str(exc)
    return counts.tolist(), loss.isnan().nonzero().flatten().tolist()


@pytest.mark.parametrize("kind", ["label", "nan"])
def test_bad_input_errors_on_every_rank(pool2, kind):
    messages = pool2.run(worker_bad_input, kind, False)
    expected = (
        "target id 263 at flat position 5 is outside the vocabulary [0, 256)"
        if kind == "label"
        else "non-finite logits at flat position 4"
    )
    assert all(expected in m for m in messages), messages
    # With input_flags: counted on the device (the trainer's step), NaN losses, no error.
    counted = pool2.run(worker_bad_input, kind, True)
    want = [1.0, 0.0, 0.0] if kind == "label" else [0.0, 1.0, 0.0]
    assert all(c == (want, [5 if kind == "label" else 4]) for c in counted), counted


# ---------------------------------------------------------------------------------------------
# Inside megatron-core's GPTModel: the output_processor seam


def worker_model(tp: int, sequence_parallel: bool, tie: bool, bf16: bool, shaping: str):
    """The tiny model's loss, statistics and gradients (megatron DDP's main_grad buffers, fp32)
    after one forward and backward, unfused and fused, from the same initial weights."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module
    from megatron.core.utils import unwrap_model

    from megatron_ext.core.cpu_compat import install_cpu_compat
    from megatron_ext.core.parallel import model_parallel
    from megatron_ext.models import build_model, model_preset, to_transformer_config

    install_cpu_compat()
    model_cfg = dataclasses.replace(model_preset("tiny"), tie_embeddings=tie)
    gen = torch.Generator().manual_seed(3)
    b, s = 2, model_cfg.seq_length
    tokens = torch.randint(0, model_cfg.vocab_size, (b, s), generator=gen)
    labels = torch.randint(0, model_cfg.vocab_size, (b, s), generator=gen)
    labels[0, :7] = -100
    positions = torch.arange(s).unsqueeze(0).expand(b, s)
    out = {}
    for fused in (False, True):
        torch.manual_seed(0)
        with model_parallel(tp, seed=0):
            tconfig = to_transformer_config(
                model_cfg,
                tensor_parallel=tp,
                sequence_parallel=sequence_parallel,
                params_dtype=torch.bfloat16 if bf16 else torch.float32,
            )
            model = build_model(
                model_cfg, tconfig, RewardShapingConfig.preset(shaping), fused_output_loss=fused
            )
            if bf16:
                model = Float16Module(tconfig, model)
            ddp = DistributedDataParallel(
                tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
            )
            loss = ddp(tokens, positions, None, labels=labels)  # [b, s]
            (loss.float() * (labels != -100)).sum().backward()
            inner = unwrap_model(ddp)
            grads = {n: p.main_grad.clone() for n, p in inner.named_parameters()}
            out["fused" if fused else "unfused"] = (
                loss.detach().float(),
                inner.last_loss_stats,
                grads,
            )
    return out


MODEL_LAYOUTS = {
    "tp1-untied": (1, False, False, False),
    "tp1-tied": (1, False, True, False),
    "tp2-sp-untied": (2, True, False, False),
    "tp2-sp-tied": (2, True, True, False),
    "tp2-nosp-tied": (2, False, True, False),
    "tp2-sp-tied-bf16": (2, True, True, True),
}


@pytest.mark.parametrize("layout", sorted(MODEL_LAYOUTS))
def test_gpt_model_fused_matches_unfused(pool2, layout):
    tp, sp, tie, bf16 = MODEL_LAYOUTS[layout]
    shaping = "tail_suppression" if tie else "precision"
    for rank, result in enumerate(pool2.run(worker_model, tp, sp, tie, bf16, shaping)):
        loss_u, stats_u, grads_u = result["unfused"]
        loss_f, stats_f, grads_f = result["fused"]
        # bf16: the hidden states and logits are bf16 on both paths; the same rule as above.
        _close(loss_f, loss_u, 1e-6 if not bf16 else 2**-8, f"{layout} rank {rank} loss")
        _close(stats_f.entropy, stats_u.entropy, 1e-5 if not bf16 else 2**-7, "entropy")
        assert grads_f.keys() == grads_u.keys()
        # Every parameter's gradient: the output weight's (or the embedding's, tied), and those
        # of the layers below, through the hidden states' gradient (and its all-reduce or
        # reduce-scatter over the tensor-parallel ranks).
        for name, grad in grads_u.items():
            rtol = 1e-5 if not bf16 else 2**-6  # bf16: rounding of every layer's backward
            _close(grads_f[name], grad, rtol, f"{layout} rank {rank} {name}")
        assert grads_f["embedding.word_embeddings.weight"].abs().max() > 0


# ---------------------------------------------------------------------------------------------
# The README's Megatron-LM example, with megatron-core's own GPTModel and schedule


def _readme_example() -> str:
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    return next(b for b in blocks if "output_processor=output_loss" in b)


def worker_readme_example(code: str):
    """Run the README's forward_step / loss_func through megatron-core's schedule on a plain
    megatron-core GPTModel, with the CE preset, and the same model's own loss (megatron-core's
    vocab_parallel_cross_entropy) without the output processor: reported losses and gradients."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_ext.core.cpu_compat import install_cpu_compat
    from megatron_ext.core.parallel import model_parallel
    from megatron_ext.models import model_preset, to_transformer_config
    from megatron_ext.models.spec import decoder_block_spec

    install_cpu_compat()
    model_cfg = model_preset("tiny")
    gen = torch.Generator().manual_seed(11)
    b, s = 2, model_cfg.seq_length
    batches = []
    for _ in range(2):  # two micro-batches, Megatron-LM's get_batch convention
        tokens = torch.randint(0, model_cfg.vocab_size, (b, s + 1), generator=gen)
        loss_mask = torch.ones(b, s)
        loss_mask[1, :9] = 0
        positions = torch.arange(s).unsqueeze(0).expand(b, s)
        batches.append((tokens[:, :-1], tokens[:, 1:], loss_mask, None, positions))
    out = {}
    for fused in (False, True):
        namespace = {"get_batch": next}
        # The README's block: output_loss, loss_func, forward_step.
        exec(code, namespace)  # noqa: S102
        namespace["output_loss"].shaping = RewardShapingConfig.preset("ce")

        def own_loss_step(data_iterator, model, ns=namespace):
            tokens, labels, loss_mask, attention_mask, position_ids = next(data_iterator)
            output = model(tokens, position_ids, attention_mask, labels=labels)
            return output, ns["partial"](ns["loss_func"], loss_mask)

        torch.manual_seed(0)
        with model_parallel(2, seed=0):
            tconfig = to_transformer_config(model_cfg, tensor_parallel=2)
            model = GPTModel(
                config=tconfig,
                transformer_layer_spec=decoder_block_spec(model_cfg, tconfig),
                vocab_size=model_cfg.padded_vocab_size(2),
                max_sequence_length=s,
                position_embedding_type="rope",
            )
            reports = get_forward_backward_func()(
                forward_step_func=namespace["forward_step"] if fused else own_loss_step,
                data_iterator=iter(batches),
                model=[model],
                num_microbatches=len(batches),
                seq_length=s,
                micro_batch_size=b,
                forward_only=False,
            )
            out["fused" if fused else "own"] = (
                torch.stack([r["lm loss"] for r in reports]),
                {n: p.grad.clone() for n, p in model.named_parameters()},
            )
    return out


def test_readme_megatron_lm_example_matches_the_models_own_loss(pool2):
    """With the CE preset the README's forward_step gives what megatron-core's own loss gives:
    the reported loss sums and token counts, and every parameter's gradient."""
    code = _readme_example()
    assert "def forward_step(data_iterator, model)" in code and "def loss_func" in code
    for result in pool2.run(worker_readme_example, code):
        own_reports, own_grads = result["own"]
        reports, grads = result["fused"]
        _close(reports, own_reports, LOSS_RTOL, "reported loss and tokens")
        assert reports[:, 1].tolist() == [2 * 64 - 9] * 2  # the masked tokens do not count
        for name, grad in own_grads.items():
            _close(grads[name], grad, GRAD_RTOL["fp32"], name)


def test_precompute_refuses_a_per_position_upstream_gradient():
    """The precomputed weight gradient holds for one upstream gradient at every counted
    position; a per-position weighting raises (or, without host synchronisation, gives a NaN
    weight gradient, never a wrong one). The hidden states' gradient is exact either way."""
    hidden, weight, target, _ = make_inputs(Case("random", "precision"))
    shaping = RewardShapingConfig.preset("precision")
    weights = torch.linspace(0.5, 1.5, hidden.shape[0])
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_output_shaped_cross_entropy(h, w, target, shaping, None)
    with pytest.raises(ValueError, match=r"got values from 0\.5.* pass gradient='recompute'"):
        (loss * weights).sum().backward()
    flags = torch.zeros(len(INPUT_FLAGS))
    loss = fused_output_shaped_cross_entropy(h, w, target, shaping, None, input_flags=flags)
    (loss * weights).sum().backward()
    assert w.grad.isnan().all() and h.grad.isfinite().all()
    want = hidden.clone().requires_grad_()
    (
        vocab_parallel_shaped_cross_entropy(want @ weight.t(), target, shaping, None) * weights
    ).sum().backward()
    _close(h.grad, want.grad, GRAD_RTOL["fp32"], "d hidden")
    # Ignored positions may carry any upstream gradient (theirs is zero anyway).
    h.grad = w.grad = None
    loss = fused_output_shaped_cross_entropy(h, w, target, shaping, None)
    (loss * torch.where(target == -100, 5.0, 1.0)).sum().backward()
    assert w.grad.isfinite().all()
    # One backward per forward: a second one (retain_graph) says so instead of returning nothing.
    loss = fused_output_shaped_cross_entropy(h, w, target, shaping, None)
    loss.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.sum().backward()


# ---------------------------------------------------------------------------------------------
# The output processor's sequence parallelism at TP = 2 and 4 (a stand-in output layer)


def worker_processor_sequence_parallel(shaping: str):
    """ShapedLossOutputProcessor with sequence-parallel hidden states [s/tp, b, h] against the
    unfused path on the gathered [s, b, h] (the output layer's matmul, then the loss): this
    rank's loss and the gradients of its hidden-state shard and weight slice."""
    import types

    from megatron_ext.core.cpu_compat import install_cpu_compat
    from megatron_ext.models.output import ShapedLossOutputProcessor

    install_cpu_compat()
    group, rank, tp = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(21)
    s, b, h, v = 8 * tp, 2, 16, 64 * tp
    hidden = torch.randn(s, b, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.5
    labels = torch.randint(0, v, (b, s), generator=gen)
    labels[0, 3] = -100
    shard = slice(rank * s // tp, (rank + 1) * s // tp)
    piece = weight[rank * (v // tp) : (rank + 1) * (v // tp)]
    cfg = RewardShapingConfig.preset(shaping)

    mine = hidden[shard].clone().requires_grad_()  # [s/tp, b, h]
    w = piece.clone().requires_grad_()
    layer = types.SimpleNamespace(sequence_parallel=True, tp_group=group, weight=w, bias=None)
    loss = ShapedLossOutputProcessor(cfg)(
        hidden_states=mine, output_layer=layer, output_weight=None, labels=labels
    )  # [b, s]
    loss.sum().backward()

    full = hidden.clone().requires_grad_()  # [s, b, h], every rank
    w_ref = piece.clone().requires_grad_()
    logits = full @ w_ref.t()  # [s, b, V/tp]
    ref = vocab_parallel_shaped_cross_entropy(logits, labels.t().contiguous(), cfg, group)
    ref.sum().backward()
    grad_full = full.grad.clone()
    dist.all_reduce(grad_full)  # the hidden states' gradient summed over the vocabulary slices
    return loss.detach(), ref.detach().t(), mine.grad, grad_full[shard], w.grad, w_ref.grad


@pytest.mark.parametrize("tp", [2, 4])
def test_output_processor_sequence_parallel_matches_unfused(tp, request):
    pool = request.getfixturevalue(f"pool{tp}")
    for shaping in ("precision", "tail_suppression"):
        for rank, r in enumerate(pool.run(worker_processor_sequence_parallel, shaping)):
            loss, want, grad_h, want_h, grad_w, want_w = r
            _close(loss, want, LOSS_RTOL, f"tp {tp} rank {rank} loss")
            _close(grad_h, want_h, GRAD_RTOL["fp32"], f"tp {tp} rank {rank} d hidden shard")
            _close(grad_w, want_w, GRAD_RTOL["fp32"], f"tp {tp} rank {rank} d weight")
