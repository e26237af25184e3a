"""One export, for `aift export` and the web UI: merge an adapter if there is one -> write -> verify.

```python
from aift.export.run import run_export
result = run_export("outputs/run/final", "model.q8_0.gguf", quant="q8_0")   # an adapter: merged first
assert result.passed                                                       # read back and compared
run_export("outputs/run/final", "outputs/run/plain", format="safetensors")
```

A GGUF is written from a whole model folder: an adapter is merged into a temp folder beside the output first
(fp32, so that ``quant`` alone decides the precision), and the file is then read back with transformers and
compared with that folder. A safetensors export merges the adapter straight into the output folder.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aift.errors import AiftError
from aift.export.gguf_writer import GGUF_QUANTS

__all__ = ["FORMATS", "GGUF_QUANTS", "SAFETENSORS_DTYPES", "ExportResult", "run_export"]

FORMATS = ("gguf", "safetensors")
SAFETENSORS_DTYPES = ("bf16", "fp16", "fp32")


@dataclass
class ExportResult:
    """What an export wrote, and for a verified GGUF, how its read-back compared with the source."""

    path: Path
    format: str
    quant: str | None = None  # GGUF only
    check: dict[str, Any] | None = None  # verify_gguf's report; None when not verified

    @property
    def passed(self) -> bool:
        """False only when a read-back check ran and failed."""
        return self.check is None or bool(self.check["passed"])

    @property
    def size_mb(self) -> float:
        return self.path.stat().st_size / 1e6


def run_export(
    model: str | Path,
    output: str | Path,
    *,
    format: str = "gguf",
    adapter: str | Path | None = None,
    quant: str = "f16",
    dtype: str | None = None,
    verify: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Exports a model folder, alias or adapter folder (``model``), or ``adapter`` merged into ``model``.

    Args:
        model: A model folder or alias, or an adapter folder (its base is read from the adapter).
        output: FILE.gguf, or the folder of a safetensors export.
        format: gguf or safetensors.
        adapter: A LoRA adapter to merge into ``model`` first.
        quant: GGUF storage type, one of :data:`GGUF_QUANTS` (1-D tensors such as norms stay f32).
        dtype: safetensors: the weights' dtype (an adapter's merge defaults to bf16; a plain folder keeps its own).
        verify: GGUF: read the file back and compare it with its source.
        overwrite: safetensors: replace a non-empty output folder.

    Raises:
        AiftError: A bad format or output name, or what merging or writing reports.
    """
    from aift.models.run_folder import is_adapter_dir

    if format not in FORMATS:
        raise AiftError(f"export format must be one of {', '.join(FORMATS)}; got {format!r}")
    adapter = adapter or (model if is_adapter_dir(model) else None)
    base = None if adapter == model else str(model)
    if format == "safetensors":
        return _export_safetensors(model, output, adapter, base, dtype, overwrite)
    if not str(output).endswith(".gguf"):
        raise AiftError(f"output {output} should be a .gguf file for the gguf format")
    if adapter is None:
        return _export_gguf(model, Path(output), quant, verify)
    from aift.export.merge import merge_adapter

    with tempfile.TemporaryDirectory(prefix=".aift-merge-", dir=Path(output).parent or ".") as tmp:
        merged = merge_adapter(adapter, Path(tmp) / "merged", base=base, dtype="fp32")
        return _export_gguf(merged, Path(output), quant, verify)


def _export_safetensors(model, output, adapter, base, dtype: str | None, overwrite: bool) -> ExportResult:
    from aift.export.merge import merge_adapter, save_plain_folder

    if adapter:
        path = merge_adapter(adapter, output, base=base, dtype=dtype or "bf16", overwrite=overwrite)
    else:
        path = save_plain_folder(str(model), output, dtype=dtype, overwrite=overwrite)
    return ExportResult(Path(path), "safetensors")


def _export_gguf(folder, output: Path, quant: str, verify: bool) -> ExportResult:
    from aift.export.gguf_writer import export_gguf

    path = export_gguf(folder, output, quant=quant)
    if not verify:
        return ExportResult(path, "gguf", quant)
    from aift.export.verify import verify_gguf

    return ExportResult(path, "gguf", quant, verify_gguf(folder, path, quant))
