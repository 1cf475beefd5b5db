"""The loss's Triton kernels (its CUDA path) against the reference and the torch ops.

Without a GPU the kernels run on CPU tensors under Triton's interpreter: this module sets
TRITON_INTERPRET=1 before the kernels are first imported (in the gloo workers too, which import
this module) and functional.TRITON_ON_CPU sends CPU tensors through them, so the code checked is
the code a GPU runs. Tests marked `gpu` repeat the comparisons on CUDA (compiled kernels).

Tolerances are tests/test_loss_parallel.py's, for the same reasons: the kernels sum the same fp32
terms in another order (per slice, then across slices from each slice's maximum; the merge in
fp64, as the CPU kernel) and take the tail sums as total minus head, so the loss stays within
2e-6 absolute + 2e-6 relative of the reference and the fp32 gradient within 1e-6 + 1e-5
relative; a bf16 gradient is one bf16 rounding (2**-8 relative) from the fp32 one. The compiled
exp on a GPU is within 2 ulp, far inside both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the CUDA path's kernels")

if not torch.cuda.is_available() and "megatron_ext.loss._triton_kernels" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are built (workers inherit it)

from megatron_ext.loss import (  # noqa: E402
    RewardShapingConfig,
    functional,
    reference_shaped_cross_entropy,
    vocab_parallel_shaped_cross_entropy,
)
from megatron_ext.loss import _triton_kernels as tk  # noqa: E402
from megatron_ext.loss.vocab_parallel import INPUT_FLAGS  # noqa: E402
from tests.test_loss_parallel import (  # noqa: E402
    DTYPES,
    GRAD_TOL,
    LOSS_TOL,
    Case,
    check,
    run_case,
    worker_cases,
)

# numpy's warnings from the interpreter's arithmetic on masked lanes and non-finite rows
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:All-NaN slice encountered:RuntimeWarning",
)

ROOT = Path(__file__).resolve().parents[1]
PRESETS = list(RewardShapingConfig.PRESET_NAMES)
SPLIT = RewardShapingConfig(beta=-0.25, lambda_head=0.2, lambda_tail=-0.1, top_k=3)

interpreted = pytest.mark.skipif(
    not tk.INTERPRETED,
    reason="the kernels were built for the GPU in this process (TRITON_INTERPRET unset); the "
    "interpreter tests run where there is no CUDA device",
)
compiled_on_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or tk.INTERPRETED,
    reason="needs a CUDA device"
    if not torch.cuda.is_available()
    else "TRITON_INTERPRET=1: the kernels were not compiled",
)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """CPU tensors through the Triton kernels (the interpreter)."""
    monkeypatch.setattr(functional, "TRITON_ON_CPU", True)


@contextlib.contextmanager
def small_tiles(chunk: int = 64, group: int = 2):
    """Row loops in several chunks and small groups, so that short test rows take every branch of
    the forward (the candidate tile as well as the fallback)."""
    saved = tk.INTERPRETER_CHUNK, tk.GROUP
    tk.INTERPRETER_CHUNK, tk.GROUP = chunk, group
    try:
        yield
    finally:
        tk.INTERPRETER_CHUNK, tk.GROUP = saved


def _torch_ops(monkeypatch):
    """Switch the loss to the torch ops alone (no Triton, no numba)."""
    monkeypatch.setattr(functional, "triton_kernels", lambda: None)
    monkeypatch.setattr(functional, "cpu_kernels", lambda: None)
    monkeypatch.setattr("megatron_ext.loss.select.cpu_kernels", lambda: None)


def _cases(tp: int) -> list[Case]:
    """Every preset on tied logits in bf16 (and at TP = 1 in fp32), the other scenarios once on a
    rank-split config (at TP = 1), and k at and beyond the slice up to the vocabulary (3 x 2
    positions each; make_inputs ties one row's k-th value across every slice)."""
    small = {"seq": 3, "batch": 2}
    cases = []
    for dtype in ("fp32", "bf16") if tp == 1 else ("bf16",):
        for name in PRESETS:
            cfg = RewardShapingConfig.preset(name)
            cases.append(Case("ties", cfg, dtype=dtype, seed=len(cases), **small))
    if tp == 2:
        cases.append(Case("ties", RewardShapingConfig.preset("tail_suppression"), **small))
    for scenario in ("random", "top_ties", "sure", "hopeless", "wide") if tp == 1 else ():
        cases.append(Case(scenario, SPLIT, dtype="bf16", seed=len(cases), **small))
    v = 256
    for k in sorted({v // tp, min(v, v // tp + 3), v - 1, v}):
        cases.append(Case("ties", dataclasses.replace(SPLIT, top_k=k), seed=len(cases), **small))
    return cases


# ---------------------------------------------------------------------------------------------
# The forward's block, marks and buffer against the torch ops


def _rows(n: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of every kind a forward meets, in one batch (one kernel call per check)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, width, generator=g) * 3
    x[2:5] = torch.round(x[2:5])  # many ties, also at the k-th value; -0.0 beside +0.0
    x[3, ::2] = -0.0
    x[5] = 1.5  # a constant row
    x[6, ::3] = float("-inf")  # masked logits
    x[7] = x[7].sort().values  # ascending
    x[8, 40:48] += 50.0  # every large value in a few groups
    x[9] = x[9] * 1e4  # wide
    x[10, 17] = float("nan")
    x[11, 2] = float("inf")
    return x.to(dtype)


FORWARD_CONFIGS = {
    "ce": RewardShapingConfig.preset("ce"),
    "tail": RewardShapingConfig.preset("tail_suppression"),
    "head_k7": RewardShapingConfig(lambda_head=-0.2, lambda_tail=0.1, top_k=7),
    "k_300": RewardShapingConfig(lambda_tail=-0.1, top_k=300),  # the whole slice
}


def _statistics(x, target, config, in_place):
    n, vp = x.shape
    plan = functional.plan_shard(config, vp, 2 * vp, return_stats=True)  # as if TP = 2
    z = x.clone()
    out = z if in_place and z.dtype == torch.float32 else torch.empty(n, vp)
    block, idx, marked = functional.shard_statistics(z, target, target >= 0, 0, plan, out)
    return plan, block, idx, marked, out


@interpreted
@pytest.mark.parametrize("config", list(FORWARD_CONFIGS.values()), ids=list(FORWARD_CONFIGS))
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("tiles", ["one_tile", "small_tiles"])
def test_forward_matches_the_torch_ops(config, dtype, tiles, monkeypatch):
    x = _rows(12, 261, DTYPES[dtype])  # 261: a short last group and chunk
    target = torch.randint(-1, 261, (12,), generator=torch.Generator().manual_seed(3))
    with monkeypatch.context() as m:
        _torch_ops(m)
        plan, b_ref, i_ref, m_ref, out_ref = _statistics(x, target, config, in_place=True)
    monkeypatch.setattr(functional, "TRITON_ON_CPU", True)
    with small_tiles() if tiles == "small_tiles" else contextlib.nullcontext():
        _, b_new, i_new, m_new, out_new = _statistics(x, target, config, in_place=True)
    kk = plan.kk
    # Rows 10 (NaN) and 11 (+inf) are non-finite in both (m, S or T), which the loss reports.
    for b in (b_ref, b_new):
        assert not bool(torch.isfinite(b[[10, 11]][:, [0, kk, kk + 1]]).all(-1).any())
    rows = list(range(10))
    xf = x.float()[rows]
    b_ref, b_new, out_ref, out_new = b_ref[rows], b_new[rows], out_ref[rows], out_new[rows]
    # The top values as a set, the maximum first and the kk-th at kk - 1, their columns.
    assert torch.equal(b_new[:, :kk].sort(-1).values, b_ref[:, :kk].sort(-1).values)
    assert torch.equal(b_new[:, [0, kk - 1]], b_ref[:, [0, kk - 1]])
    if i_ref is not None:
        assert torch.equal(xf.gather(1, i_new[rows]), b_new[:, :kk])
        cols = i_new[rows].sort(-1).values
        assert bool((cols[:, 1:] != cols[:, :-1]).all())  # no column twice
    # Sums (both fp32, other orders), target logit, ownership, counts and width.
    torch.testing.assert_close(b_new[:, kk:], b_ref[:, kk:], rtol=2e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(b_new[:, kk + 2 :], b_ref[:, kk + 2 :])
    # exp(z - m) with the same sign marks, within the fp32 exp's few ulp.
    torch.testing.assert_close(out_new, out_ref, rtol=1e-6, atol=1e-30)
    assert torch.equal(out_new < 0, out_ref < 0)
    if m_ref is None:
        assert m_new is None
    else:
        assert torch.equal(m_new[rows], m_ref[rows])  # the same rows marked
        if plan.kk < 261:
            assert bool(m_new[rows].any())  # the tie path ran


@interpreted
def test_merge_matches_the_torch_ops(monkeypatch):
    """Two slices' blocks of tied rows, merged by the kernel and by the torch ops."""
    g = torch.Generator().manual_seed(5)
    z = torch.round(torch.randn(8, 2, 96, generator=g) * 2)  # ties at the k-th across slices
    target = torch.randint(0, 192, (8,), generator=g)
    target[3] = -100
    valid = target != -100
    for cfg in (SPLIT, dataclasses.replace(SPLIT, top_k=20), dataclasses.replace(SPLIT, top_k=192)):
        plan = functional.plan_shard(cfg, 96, 192, return_stats=True)
        with monkeypatch.context() as m:
            _torch_ops(m)
            blocks = [
                functional.shard_statistics(
                    z[:, r].contiguous(), target, valid, 96 * r, plan, torch.empty(8, 96)
                )[0]
                for r in range(2)
            ]
            gathered = torch.stack(blocks)
            want = functional.merge_statistics(gathered, valid, cfg, plan, 192)
        monkeypatch.setattr(functional, "TRITON_ON_CPU", True)
        got = functional.merge_statistics(gathered, valid, cfg, plan, 192)
        monkeypatch.setattr(functional, "TRITON_ON_CPU", False)
        for name in ("loss", "shift", "tau", "w_pos", "weight_sum"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), **LOSS_TOL)
        for name in ("entropy", "target_prob", "target_logprob", "topk_mass"):
            torch.testing.assert_close(
                getattr(got.stats, name), getattr(want.stats, name), rtol=1e-5, atol=2e-6
            )
        assert torch.equal(got.tau, want.tau)  # tau is one of the logits, exactly
        assert torch.equal(got.flags, want.flags)


# ---------------------------------------------------------------------------------------------
# The whole loss against the reference, TP = 1 and TP = 2 (gloo)


@interpreted
@pytest.mark.parametrize("tiles", ["default", "small_tiles"])
def test_loss_matches_reference_at_tp1(tiles, triton_on_cpu):
    cases = _cases(1)
    if tiles == "small_tiles":  # the tie cases of every preset, through the candidate tile
        cases = [c for c in cases if c.scenario == "ties"]
    with small_tiles() if tiles == "small_tiles" else contextlib.nullcontext():
        for case in cases:
            check(case, [run_case(case, 0, 1, None)])


def worker_triton_cases(cases: list[Case]):
    """worker_cases through the Triton kernels (this module set TRITON_INTERPRET on import)."""
    functional.TRITON_ON_CPU = True
    try:
        return worker_cases(cases)
    finally:
        functional.TRITON_ON_CPU = False


@interpreted
def test_loss_matches_reference_at_tp2(pool2):
    cases = _cases(2)
    per_rank = pool2.run(worker_triton_cases, cases)
    for i, case in enumerate(cases):
        check(case, [per_rank[r][i] for r in range(2)])


# ---------------------------------------------------------------------------------------------
# No host synchronisation with input_flags


_SYNCING = {
    torch.Tensor: ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"),
    torch: ("nonzero", "masked_select", "unique"),
}
_SYNCING_MAYBE = ("cpu", "numpy", "to", "__getitem__")  # syncing for some arguments


@contextlib.contextmanager
def no_host_sync_from(package: str = "megatron_ext"):
    """Make every call that reads a tensor on the host raise when the loss's own code (a frame of
    `package`) makes it: .item(), .tolist(), bool(), int(), float(), nonzero(), masked_select,
    unique, .cpu(), .numpy(), .to('cpu') and boolean-mask indexing. Triton's interpreter may
    still move data (it is not the loss's code; on a GPU it is not there)."""

    def ours() -> bool:
        return sys._getframe(2).f_globals.get("__name__", "").startswith(package)

    def wrap(owner, name):
        original = getattr(owner, name)

        def guarded(*args, **kwargs):
            syncing = name not in _SYNCING_MAYBE
            if name == "to":
                syncing = any(
                    isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu"
                    for a in (*args[1:], kwargs.get("device"))
                    if a is not None
                )
            elif name == "__getitem__":
                index = args[1] if isinstance(args[1], tuple) else (args[1],)
                syncing = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
            elif name in ("cpu", "numpy"):
                syncing = True
            if syncing and ours():
                raise AssertionError(f"host synchronisation: {name} called by the loss")
            return original(*args, **kwargs)

        return original, guarded

    patched = []
    try:
        for owner, names in ((torch.Tensor, _SYNCING[torch.Tensor] + _SYNCING_MAYBE),
                             (torch, _SYNCING[torch])):  # fmt: skip
            for name in names:
                original, guarded = wrap(owner, name)
                setattr(owner, name, guarded)
                patched.append((owner, name, original))
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def _flag_inputs(device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(7)
    z = torch.round(torch.randn(3, 2, 256, generator=g) * 2).to(dtype)  # ties, marks
    x = torch.randint(0, 256, (3, 2), generator=g)
    x[0, 1] = -100
    return z.to(device), x.to(device)


def _loss_and_grad(z, x, cfg, **kwargs):
    leaf = z.clone().requires_grad_()
    loss = vocab_parallel_shaped_cross_entropy(leaf * 1, x, cfg, None, **kwargs)
    loss.sum().backward()
    return loss.detach(), leaf.grad


def _check_no_sync_call(device: str, guard) -> None:
    """input_flags: no host read in forward and backward, the same loss and gradient as the
    default call, the counts of bad positions added on the device, NaN losses there."""
    for name in ("ce", "tail_suppression"):
        cfg = RewardShapingConfig.preset(name)
        for dtype in (torch.float32, torch.bfloat16):
            z, x = _flag_inputs(device, dtype)
            want_loss, want_grad = _loss_and_grad(z, x, cfg)
            flags = torch.zeros(len(INPUT_FLAGS), device=device)
            with guard():
                loss, grad = _loss_and_grad(z, x, cfg, input_flags=flags)
            torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
            torch.testing.assert_close(grad, want_grad, rtol=0, atol=0)
            assert flags.tolist() == [0.0, 0.0, 0.0]
            # Two bad labels and one non-finite logit, twice: the counts add up.
            x[1, 0], x[2, 1] = 256, -3
            z[2, 0, 5] = float("nan")
            with guard():
                for _ in range(2):
                    loss, _ = _loss_and_grad(z, x, cfg, input_flags=flags)
            assert flags.tolist() == [4.0, 2.0, 0.0]
            bad = torch.zeros(3, 2, dtype=torch.bool, device=device)
            bad[1, 0] = bad[2, 1] = bad[2, 0] = True
            assert bool(loss[bad].isnan().all()) and bool(loss[~bad].isfinite().all())
            with pytest.raises(ValueError, match="non-finite logits at flat position 4"):
                _loss_and_grad(z, x, cfg)  # the default call still raises
            with pytest.raises(ValueError, match="target id 256 at flat position 2"):
                _loss_and_grad(z, x, cfg, check_finite=False)


@interpreted
def test_input_flags_call_makes_no_host_synchronisation(triton_on_cpu):
    _check_no_sync_call("cpu", no_host_sync_from)


def test_input_flags_must_be_a_small_float_tensor():
    z, x = _flag_inputs("cpu", torch.float32)
    cfg = RewardShapingConfig.preset("ce")
    for bad in (torch.zeros(2), torch.zeros(3, dtype=torch.long), [0.0, 0.0, 0.0]):
        with pytest.raises(ValueError, match=r"input_flags must be a floating-point tensor"):
            vocab_parallel_shaped_cross_entropy(z, x, cfg, None, input_flags=bad)


# ---------------------------------------------------------------------------------------------
# On a GPU: the compiled kernels


def _emulated_tp(z, x, cfg, tp, return_grad=True):
    """The loss's three steps for `tp` slices of z [N, V] in one process (the merge sees every
    slice's block, as after the all-gather): loss, stats and the reassembled gradient."""
    n, v = z.shape
    vp = v // tp
    valid = x != -100
    plan = functional.plan_shard(cfg, vp, v, return_stats=True)
    pieces, blocks, saved = [], [], []
    for r in range(tp):
        piece = z[:, r * vp : (r + 1) * vp].contiguous()
        buf = piece if piece.dtype == torch.float32 else torch.empty(n, vp, device=z.device)
        block, idx, marked = functional.shard_statistics(piece, x, valid, r * vp, plan, buf)
        pieces.append(piece)
        blocks.append(block)
        saved.append((buf, block, idx, marked))
    merged = functional.merge_statistics(torch.stack(blocks), valid, cfg, plan, v)
    grads = []
    for r, (buf, block, idx, marked) in enumerate(saved):
        grads.append(
            functional.shard_gradient_(
                buf,
                torch.ones(n, device=z.device),
                block,
                idx,
                marked,
                x,
                valid,
                r * vp,
                merged.shift,
                merged.tau,
                merged.stats.target_logprob,
                merged.w_pos,
                merged.weight_sum,
                cfg,
                plan,
                out_dtype=z.dtype,
            )  # fmt: skip
        )
    return merged.loss, merged.stats, torch.cat(grads, -1)


def _reference(z, x, cfg):
    zz = z.float().clone().requires_grad_()
    loss, stats = reference_shaped_cross_entropy(zz, x, cfg, return_stats=True)
    loss.sum().backward()
    return loss.detach(), stats, zz.grad


@pytest.mark.gpu
@compiled_on_cuda
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(64, 16384, 1), (32, 151_936, 2), (16, 151_936, 4)])
def test_cuda_kernels_match_reference(preset, dtype, shape):
    """Qwen3-sized slices (one tile, and chunked rows) at TP = 1, 2, 4 emulated on one GPU,
    logits rounded so that the k-th value ties, across slices too."""
    n, v, tp = shape
    cfg = RewardShapingConfig.preset(preset)
    g = torch.Generator(device="cuda").manual_seed(1)
    z = torch.randn(n, v, device="cuda", generator=g) * 3
    z[: n // 2] = torch.round(z[: n // 2] * 4) / 4  # ties everywhere, also at the k-th value
    z = z.to(DTYPES[dtype])
    x = torch.randint(0, v, (n,), device="cuda", generator=g)
    x[1] = -100
    want_loss, want_stats, want_grad = _reference(z, x, cfg)
    loss, stats, grad = _emulated_tp(z, x, cfg, tp)
    torch.testing.assert_close(loss, want_loss, **LOSS_TOL)
    torch.testing.assert_close(grad.float(), want_grad, **GRAD_TOL[dtype])
    assert grad.dtype == z.dtype
    for name in ("entropy", "target_prob", "target_logprob", "topk_mass"):
        torch.testing.assert_close(
            getattr(stats, name), getattr(want_stats, name), rtol=1e-5, atol=2e-6
        )


@pytest.mark.gpu
@compiled_on_cuda
def test_cuda_forward_matches_the_torch_ops(monkeypatch):
    for name, config in FORWARD_CONFIGS.items():
        for dtype in (torch.float32, torch.bfloat16):
            x = _rows(12, 261, dtype).cuda()
            target = torch.randint(-1, 261, (12,), device="cuda")
            with monkeypatch.context() as m:
                _torch_ops(m)
                plan, b_ref, i_ref, m_ref, out_ref = _statistics(x, target, config, True)
            _, b_new, i_new, m_new, out_new = _statistics(x, target, config, True)
            kk, rows = plan.kk, list(range(10))
            assert torch.equal(
                b_new[rows, :kk].sort(-1).values, b_ref[rows, :kk].sort(-1).values
            ), name
            torch.testing.assert_close(
                b_new[rows, kk:], b_ref[rows, kk:], rtol=2e-6, atol=1e-6, equal_nan=True
            )
            torch.testing.assert_close(out_new[rows], out_ref[rows], rtol=2e-6, atol=1e-30)
            assert torch.equal(out_new[rows] < 0, out_ref[rows] < 0), name


@pytest.mark.gpu
@compiled_on_cuda
def test_cuda_input_flags_call_makes_no_host_synchronisation():
    """torch's sync debug mode raises on any synchronising CUDA call inside the loss."""

    @contextlib.contextmanager
    def sync_errors():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")

    _check_no_sync_call("cuda", sync_errors)


# ---------------------------------------------------------------------------------------------
# The GPU check's pieces that run on CPU


def test_gpu_bench_runs_on_cpu():
    """The loss benchmark's code on tiny sizes (the CPU path: the kernels are checked above)."""
    from tests.test_benchmarks import _run_tool

    out = _run_tool(
        "bench_gpu.py", "loss", "--device", "cpu", "--small", drop=("TRITON_INTERPRET",)
    )
    for name in ("megatron_ce", "torch_ce", *PRESETS):
        assert f"| {name} " in out, out


def test_gpu_check_script_parses():
    for script in ("gpu_check.sh", "gpu_wheels.sh"):
        done = subprocess.run(["bash", "-n", str(ROOT / "tools" / script)], capture_output=True)
        assert done.returncode == 0, done.stderr.decode()


@interpreted
@pytest.mark.parametrize("stats", [False, True], ids=["plain-step", "logged-step"])
def test_trainer_loss_call_makes_no_host_synchronisation(triton_on_cpu, stats):
    """The call the trainer makes each micro-batch (ShapedLossGPTModel's loss with the trainer's
    input_flags; diagnostics on logged steps): no host read in forward or backward, the bad
    labels counted on the device for the step's all-reduce."""
    import types

    from megatron_ext.models.gpt import ShapedLossGPTModel

    flags = torch.zeros(len(INPUT_FLAGS))
    model = types.SimpleNamespace(
        native_cross_entropy=False,
        shaping=RewardShapingConfig.preset("tail_suppression"),
        pg_collection=types.SimpleNamespace(tp=None),
        ignore_index=-100,
        compute_loss_stats=stats,
        check_finite_logits=False,
        input_flags=flags,
        last_loss_stats=None,
    )
    z, x = _flag_inputs("cpu", torch.bfloat16)  # [s, b, V], [s, b]
    x[2, 1] = 300  # outside the vocabulary of 256
    leaf = z.clone().requires_grad_()
    with no_host_sync_from():
        loss = ShapedLossGPTModel.compute_language_model_loss(model, x.t(), leaf * 1)  # [b, s]
        loss.nan_to_num().sum().backward()
    assert flags.tolist() == [1.0, 0.0, 0.0]
    assert bool(loss[1, 2].isnan()) and (model.last_loss_stats is not None) == stats


def _fused_call(device: str, dtype: torch.dtype, flags: torch.Tensor, stats: bool):
    """The trainer's fused call (ShapedLossOutputProcessor with its input_flags) on a stand-in
    output layer: hidden [s, b, h], labels [b, s] with one label outside the vocabulary."""
    import types

    from megatron_ext.models.output import ShapedLossOutputProcessor

    g = torch.Generator().manual_seed(5)
    hidden = (torch.randn(6, 2, 32, generator=g)).to(device, dtype).requires_grad_()
    weight = torch.round(torch.randn(256, 32, generator=g) * 4).div(8)  # tied logits
    weight = weight.to(device, dtype).requires_grad_()
    labels = torch.randint(0, 256, (2, 6), generator=g).to(device)
    labels[1, 2] = 300
    labels[0, 0] = -100
    layer = types.SimpleNamespace(sequence_parallel=False, tp_group=None, weight=weight, bias=None)
    processor = ShapedLossOutputProcessor(
        RewardShapingConfig.preset("tail_suppression"),
        return_stats=stats,
        check_finite=False,
        input_flags=flags,
        chunk_rows=5,
    )
    loss = processor(hidden_states=hidden, output_layer=layer, output_weight=None, labels=labels)
    loss.nan_to_num().sum().backward()
    return loss, processor


@interpreted
@pytest.mark.parametrize("stats", [False, True], ids=["plain-step", "logged-step"])
def test_fused_output_call_makes_no_host_synchronisation(triton_on_cpu, stats):
    """The trainer's default call, the fused output-layer loss (Triton kernels per chunk, the
    chunk matmuls, one all-gather), makes no host read in forward or backward either."""
    flags = torch.zeros(len(INPUT_FLAGS))
    with no_host_sync_from():
        loss, processor = _fused_call("cpu", torch.float32, flags, stats)
    assert flags.tolist() == [1.0, 0.0, 0.0]
    assert bool(loss[1, 2].isnan()) and (processor.last_stats is not None) == stats


@pytest.mark.gpu
@compiled_on_cuda
def test_cuda_fused_output_call_makes_no_host_synchronisation():
    for dtype in (torch.float32, torch.bfloat16):
        flags = torch.zeros(len(INPUT_FLAGS), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, _ = _fused_call("cuda", dtype, flags, True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert flags.tolist() == [1.0, 0.0, 0.0] and bool(loss[1, 2].isnan())


@pytest.mark.gpu
@compiled_on_cuda
def test_cuda_fused_output_matches_unfused():
    """On CUDA (cuBLAS chunk matmuls, Triton per chunk) against the output layer's matmul and
    the loss, every preset, fp32 and bf16, with the tolerances of tests/test_loss_output.py."""
    from tests.test_loss_output import Case, check, run_both

    for dtype in ("fp32", "bf16"):
        for shaping in PRESETS:
            for scenario in ("random", "ties"):
                case = Case(scenario, shaping, dtype, positions=300, hidden=64, vocab=4096)
                check(case, run_both(case, 0, 1, None, device="cuda"))
