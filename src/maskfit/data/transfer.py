"""A training batch as two tensors for the trip from a loader worker to the GPU.

Every tensor a DataLoader worker returns crosses to the main process as a shared-memory file of its own
(a file descriptor passed over a socket, then mapped), and is then pinned and copied to the device on its
own. That costs about 0.5 ms per tensor on the main process's side (measured on the 2-core CPU machine:
2 tensors per batch 2.0 ms, 6 tensors 3.3 ms, 12 tensors 6.3 ms), and a masked batch is 14 tensors:
more than the whole GPU step of a small model, and paid in the Python thread that launches the step.

So the worker flattens the batch (:func:`flatten`) into its float tokens and ONE int64 buffer holding
every index, position, offset, label and flag, and the main process cuts device views back out of them
after one copy each (:meth:`FlatBatch.to`). The two forms hold the same values (tested).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import torch
from torch import Tensor

from maskfit.tokens import MaskedView, TokenBatch, TokenLayout

# (field path, offset into ints, shape, dtype name) for every integer or boolean tensor of the batch.
Spec = tuple[tuple[str, int, tuple[int, ...], str], ...]


@dataclass
class FlatBatch:
    tokens: Tensor  # (T, D) float: the patch tokens of the full stream
    ints: Tensor  # (N,) int64: every other tensor of the batch, back to back (bools as 0/1)
    spec: Spec
    scalars: dict  # Python ints of the layouts (max_seqlen, uniform_len), and whether a mask is present

    def pin_memory(self) -> "FlatBatch":
        return dataclasses.replace(self, tokens=self.tokens.pin_memory(), ints=self.ints.pin_memory())

    def to(self, device, non_blocking: bool = True) -> TokenBatch:
        """The batch on ``device``: two copies, then views (and three small casts) on the device."""
        return self._unflatten(self.tokens.to(device, non_blocking=non_blocking),
                               self.ints.to(device, non_blocking=non_blocking))

    def unflatten(self) -> TokenBatch:
        """The batch where it is (views of the flat tensors)."""
        return self._unflatten(self.tokens, self.ints)

    def _unflatten(self, tokens: Tensor, ints: Tensor) -> TokenBatch:
        parts: dict[str, Tensor] = {}
        for path, offset, shape, dtype in self.spec:
            numel = 1
            for n in shape:
                numel *= n
            flat = ints[offset : offset + numel].view(shape)
            parts[path] = flat if dtype == "int64" else (flat != 0 if dtype == "bool" else flat.to(getattr(torch, dtype)))

        def layout(prefix: str) -> TokenLayout:
            fields = {f.name: parts.get(f"{prefix}{f.name}") for f in dataclasses.fields(TokenLayout)
                      if f.name not in ("max_seqlen", "uniform_len")}
            return TokenLayout(**fields, max_seqlen=self.scalars[f"{prefix}max_seqlen"],
                               uniform_len=self.scalars[f"{prefix}uniform_len"])

        mask = None
        if self.scalars["has_mask"]:
            mask = MaskedView(parts["mask.index"], layout("mask.layout."))
        return TokenBatch(tokens, parts["y"], layout("layout."), mask=mask)


def flatten(batch: TokenBatch) -> FlatBatch:
    """Pack a (CPU) token batch into a :class:`FlatBatch`; ``flatten(b).unflatten()`` equals ``b``."""
    tensors: list[tuple[str, Tensor]] = [("y", batch.y)]
    scalars: dict = {"has_mask": batch.mask is not None}

    def add_layout(prefix: str, lay: TokenLayout) -> None:
        for f in dataclasses.fields(TokenLayout):
            value = getattr(lay, f.name)
            if f.name in ("max_seqlen", "uniform_len"):
                scalars[f"{prefix}{f.name}"] = value
            elif value is not None:
                tensors.append((f"{prefix}{f.name}", value))

    add_layout("layout.", batch.layout)
    if batch.mask is not None:
        tensors.append(("mask.index", batch.mask.index))
        add_layout("mask.layout.", batch.mask.layout)
    spec, offset, pieces = [], 0, []
    for path, t in tensors:
        if t.dtype not in (torch.int64, torch.int32, torch.bool):
            raise TypeError(f"flatten: {path} has dtype {t.dtype}; only integer and boolean tensors are flattened")
        spec.append((path, offset, tuple(t.shape), str(t.dtype).removeprefix("torch.")))
        pieces.append(t.reshape(-1).to(torch.int64))
        offset += t.numel()
    ints = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)
    return FlatBatch(batch.tokens, ints, tuple(spec), scalars)
