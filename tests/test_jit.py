"""megatron_ext.core.jit: megatron-core's torch.compile decorations compile at first call, with
torch's own torch.compile, once; importing megatron-core no longer imports TorchDynamo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from megatron_ext.core.jit import compile_on_first_call

REPO = Path(__file__).resolve().parents[1]


def test_importing_megatron_core_compiles_nothing_and_the_first_call_does():
    code = """
import json, sys
import megatron_ext, megatron.core, torch
import megatron.core.jit as jit
from megatron.core.fusions.fused_bias_swiglu import swiglu
from megatron.core.transformer.moe.router import InferenceTopKRouter
from megatron_ext.core.jit import compile_on_first_call
state = {
    "dynamo_imported": "torch._dynamo" in sys.modules,
    "jit_fuser_defers": jit.jit_fuser is compile_on_first_call,
    "torch_compile_restored": torch.compile.__module__ == "torch"
    and not hasattr(torch.compile, "__wrapped_compile__"),
    "router_topk_deferred": InferenceTopKRouter._compiled_topk_routing.__wrapped__.__name__,
}
calls = []
def recording_compile(fn, **kwargs):  # torch's compile, recorded; the function runs as it is
    calls.append((fn is swiglu.__wrapped__, kwargs))
    return lambda *a, **k: ("compiled", fn(*a, **k))
torch.compile = recording_compile
y = torch.arange(8.0).reshape(2, 4)
first, second = swiglu(y), swiglu(y)
y1, y2 = torch.chunk(y, 2, -1)
state["calls"] = calls
state["results"] = [first[0], second[0], torch.equal(first[1], torch.nn.functional.silu(y1) * y2)]
print(json.dumps(state))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    state = json.loads(out.stdout.strip().splitlines()[-1])
    assert state["dynamo_imported"] is False
    assert state["jit_fuser_defers"] and state["torch_compile_restored"]
    assert state["router_topk_deferred"] == "_compiled_topk_routing"
    assert state["calls"] == [[True, {}]]  # compiled once, the same function, bare
    assert state["results"] == ["compiled", "compiled", True]


def test_inside_a_compiled_region_the_function_runs_as_it_is(monkeypatch):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn: calls.append(fn) or fn)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    def double(x):
        return 2 * x

    deferred = compile_on_first_call(double)
    assert deferred.__name__ == "double" and deferred.__wrapped__ is double
    assert deferred(3) == 6 and calls == []  # TorchDynamo traces it where it is called
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert deferred(3) == 6 and deferred(4) == 8 and calls == [double]
