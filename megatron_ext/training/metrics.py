"""Per-step metrics: reduction over ranks and output to the console, a JSONL file and TensorBoard."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["LOSS_SUM_FIELDS", "MetricsWriter", "sums_to_metrics"]

LOSS_SUM_FIELDS = ("loss", "ce_loss", "entropy", "target_prob", "topk_mass", "tokens")
"""Token sums gathered per micro-batch: shaped loss, CE (-log p(x)), entropy, p(x), top-k mass,
and the number of loss tokens."""


def sums_to_metrics(sums: torch.Tensor, prefix: str = "") -> dict[str, float]:
    """Per-token means from the global token sums (a [len(LOSS_SUM_FIELDS)] tensor)."""
    values = dict(zip(LOSS_SUM_FIELDS, sums.tolist(), strict=True))
    tokens = max(values["tokens"], 1.0)
    out = {
        f"{prefix}{k}": values[k] / tokens
        for k in LOSS_SUM_FIELDS[:-1]
        if not math.isnan(values[k])  # diagnostics absent with megatron's native CE
    }
    ce = out.get(f"{prefix}ce_loss")
    if ce is not None:
        out[f"{prefix}ppl"] = math.exp(ce) if ce < 700 else math.inf
    out[f"{prefix}tokens"] = int(values["tokens"])
    return out


_CONSOLE_FIELDS = (
    ("loss", "loss {:.4f}"),
    ("ce_loss", "ce {:.4f}"),
    ("ppl", "ppl {:.2f}"),
    ("entropy", "H {:.3f}"),
    ("target_prob", "p(x) {:.3f}"),
    ("topk_mass", "topk {:.3f}"),
    ("grad_norm", "gnorm {:.3f}"),
    ("lr", "lr {:.3e}"),
    ("tokens_per_s", "{:.0f} tok/s"),
    ("val_loss", "val loss {:.4f}"),
    ("val_ppl", "val ppl {:.2f}"),
)


class MetricsWriter:
    """Writes metric records; only the rank constructed with enabled=True writes anything."""

    def __init__(
        self,
        log_dir: str | None,
        *,
        enabled: bool,
        console: bool = True,
        tensorboard: bool = True,
    ) -> None:
        self.enabled = enabled
        self.console = console and enabled
        self._jsonl = None
        self._tb = None
        if not enabled or log_dir is None:
            return
        path = Path(log_dir)
        path.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(path / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - kept open
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(path / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """Log one record (must hold 'step'; keys with non-numeric values go to JSONL only)."""
        if not self.enabled:
            return
        step = record["step"]
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, default=str) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if (
                    key != "step"
                    and isinstance(value, (int, float))
                    and not isinstance(value, bool)
                ):
                    self._tb.add_scalar(key.replace("val_", "val/", 1), value, step)
        if self.console:
            parts = [f"step {step}"]
            parts += [fmt.format(record[k]) for k, fmt in _CONSOLE_FIELDS if k in record]
            print(" | ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        """Flush and close the files."""
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
