"""A training batch as two tensors for the trip from a loader worker to the GPU.

Every tensor a DataLoader worker returns crosses to the main process as a shared-memory file of its own
(a file descriptor passed over a socket, then mapped), and is then pinned and copied to the device on its
own. That costs about 0.5 ms per tensor on the main process's side (measured on the 2-core CPU machine:
2 tensors per batch 2.0 ms, 6 tensors 3.3 ms, 12 tensors 6.3 ms), and a masked batch is 14 tensors:
more than the whole GPU step of a small model, and paid in the Python thread that launches the step.

So the worker flattens the batch (:func:`flatten`) into its float tokens and ONE int64 buffer holding
every index, position, offset, label and flag, and the main process cuts device views back out of them
after one copy each (:meth:`FlatBatch.to`). The two forms hold the same values (tested).

Pixel-space tokens travel as their 8-bit codes (``pixel_codes=True``): every pixel value the datasets
make is ``u / 127.5 - 1`` for an 8-bit ``u`` (``maskfit.data.datasets.to_tensor_image``) and padding is 0,
so the worker sends ``u`` (a quarter of the bytes to share, pin and copy) and the device computes the
same float32 values with the same expression, bit for bit (tested; the worker checks a sample of every
batch and refuses values off the 8-bit grid).
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
    tokens: Tensor  # (T, D) float, or uint8 pixel codes: the patch tokens of the full stream
    ints: Tensor  # (N,) int64: every other tensor of the batch, back to back (bools as 0/1)
    spec: Spec
    scalars: dict  # Python ints of the layouts (max_seqlen, uniform_len), and whether a mask is present
    pixel_codes: bool = False  # tokens hold u with value u / 127.5 - 1 (0 on padding)

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
        full = layout("layout.")
        if self.pixel_codes:
            tokens = decode_pixels(tokens, full.valid)
        return TokenBatch(tokens, parts["y"], full, mask=mask)


def decode_pixels(codes: Tensor, valid: Optional[Tensor]) -> Tensor:
    """(T, D) uint8 codes -> float32 pixel values in [-1, 1], 0 where ``valid`` is False (padding).

    The expression of ``to_tensor_image``, so the values are the ones the dataset made, bit for bit.
    """
    x = codes.float() / 127.5 - 1.0
    return x if valid is None else torch.where(valid[:, None], x, 0.0)


def encode_pixels(tokens: Tensor, valid: Optional[Tensor], check_every: int = 61) -> Tensor:
    """(T, D) float pixel values -> uint8 codes; refuses values that are not ``u / 127.5 - 1`` (or 0 on
    padding), checked on every ``check_every``-th value (a dataset off the 8-bit grid fails at once)."""
    codes = ((tokens + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    sample = slice(None, None, check_every)
    flat_tokens, flat_codes = tokens.reshape(-1)[sample], codes.reshape(-1)[sample]
    decoded = flat_codes.float() / 127.5 - 1.0
    if valid is not None:
        real = valid[:, None].expand_as(tokens).reshape(-1)[sample]
        decoded = torch.where(real, decoded, 0.0)
    if not torch.equal(decoded, flat_tokens):
        raise ValueError(
            "pixel tokens are not 8-bit values u / 127.5 - 1 (and 0 on padding), so they cannot travel as 8-bit "
            "codes; the dataset changed pixel values after to_tensor_image (set pixel_codes=False in "
            "StepBatchBuilder for such data)"
        )
    return codes


def flatten(batch: TokenBatch, pixel_codes: bool = False) -> FlatBatch:
    """Pack a (CPU) token batch into a :class:`FlatBatch`; ``flatten(b).unflatten()`` equals ``b``.

    pixel_codes: the tokens are 8-bit pixel values (pixel-space data): send their codes (see module doc).
    """
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
    tokens = encode_pixels(batch.tokens, batch.layout.valid) if pixel_codes else batch.tokens
    return FlatBatch(tokens, ints, tuple(spec), scalars, pixel_codes)
