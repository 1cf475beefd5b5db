"""The error raised for bad data-pipeline input (files, records, tokenizers, sizes)."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad input to the data pipeline.

    The message always names what is wrong and where (file and line or record number, the field,
    the numbers involved) and, where there is one, the fix. The command-line tools print it
    without a traceback.
    """
