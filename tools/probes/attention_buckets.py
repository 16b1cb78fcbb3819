"""Probe: FlashAttention-2 varlen against dense attention per length bucket and nested jagged SDPA (issue 14 item 3).

    PYTHONPATH=src python3 tools/probes/attention_buckets.py [IMAGES]

Attention is 14.3 ms of the 92.8 ms FiT-B/2-dit step on the H200 (BENCHMARKS, item 3), all of it in the FA2 varlen
kernels `torch.nn.attention.varlen` bundles. FiT's resize leaves few distinct token counts (the bench's 256
ImageNet-like images have 7; the study's crops fill the budget, so one), so the stream can be ordered by length and
each run of equal lengths viewed as a dense (n, L, H, D_h) batch, with no gather and no mask, for whichever dense
kernel is fastest on the device (cuDNN's fused attention on Hopper among them). This times one attention call's
forward and backward, 12 times (a model's 12 layers), on q, k, v of shape (T, 12, 64) in bf16:

- ``varlen_fa2``: the model's path;
- ``buckets_<backend>``: the stream sorted by length, one ``scaled_dot_product_attention`` per length with the
  backend forced (flash, cudnn, efficient), results written back in place;
- ``njt_<backend>``: the packed stream as a nested jagged tensor (a view with the stream's offsets, no sorting),
  one ``scaled_dot_product_attention`` call with the backend forced: a general varlen path if a faster backend
  takes it (the buckets need the stream sorted and a composition fixed per compiled graph; this does not).

Two layouts: the bench's ImageNet-like mix (``imagenet``) and every image at 256 tokens (``uniform``). Each
bucketed form is checked against varlen first (max abs difference of the outputs printed). Prints one line per
(layout, form): ms for 12 calls' forward + backward (median of 20), or why the backend refused. On a machine
without CUDA only the equality of the bucketed dense path (math backend, fp32) with the model's dense attention is
checked.
"""
import sys
from collections import Counter

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from maskfit.bench import imagenet_like_grids
from maskfit.models.attention import attention, prepare_attention
from maskfit.tokens import pack

from cuda_timing import median_cuda_ms  # tools/probes/, the script's own folder

HEADS, HEAD_DIM, LAYERS = 12, 64, 12
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def sorted_by_length(grids):
    """The grids ordered by token count (longest first), and the runs of equal counts: [(length, images)]."""
    ordered = sorted(grids, key=lambda g: -g[0] * g[1])
    runs = Counter(h * w for h, w in ordered)
    return ordered, sorted(runs.items(), key=lambda kv: -kv[0])


def jagged_attention(q, k, v, layout, kernel):
    """q, k, v: (T, H, D_h) packed -> (T, H, D_h): one SDPA call on nested jagged views (offsets = cu_seqlens, no
    padding) with ``kernel`` the only one allowed (jagged SDPA otherwise tries FlashAttention-2 first)."""
    offsets = layout.cu_seqlens.long()

    def nested(x):  # (T, H, D_h) -> (B, H, j, D_h); max_seqlen spares a host sync
        # Jagged SDPA wants each input contiguous before its transpose (v is a strided slice of qkv).
        return torch.nested.nested_tensor_from_jagged(
            x.contiguous(), offsets=offsets, max_seqlen=layout.max_seqlen).transpose(1, 2)

    with sdpa_kernel([kernel]):
        out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v))  # (B, H, j, D_h)
    return out.transpose(1, 2).values()  # (T, H, D_h)


def bucketed_attention(q, k, v, runs, backend):
    """q, k, v: (T, H, D_h) of a stream ordered by length -> (T, H, D_h), one dense call per run of equal lengths."""
    outs, start = [], 0
    for length, count in runs:
        rows = slice(start, start + length * count)
        qb, kb, vb = (x[rows].view(count, length, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))  # (n, H, L, D_h)
        with sdpa_kernel(BACKENDS[backend]):
            out = F.scaled_dot_product_attention(qb, kb, vb)  # (n, H, L, D_h)
        outs.append(out.transpose(1, 2).reshape(length * count, *q.shape[1:]))
        start += length * count
    return torch.cat(outs)  # (T, H, D_h)


def layout_for(grids, device):
    """The packed layout of images with these grids, in this order."""
    tokens = [torch.zeros(h * w, 1) for h, w in grids]
    return pack(tokens, grids, torch.zeros(len(grids), dtype=torch.long)).layout.to(device)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    images = int(argv[0]) if argv else 256
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    layouts = {"imagenet": imagenet_like_grids(images), "uniform": [(16, 16)] * images}
    for name, grids in layouts.items():
        ordered, runs = sorted_by_length(grids)
        layout = layout_for(ordered, device)
        T = layout.num_tokens
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(T, HEADS, HEAD_DIM, device=device, dtype=dtype, generator=g) for _ in range(3))
        plan = prepare_attention(layout, "varlen" if cuda else "dense")
        reference = attention(q, k, v, plan)  # (T, H, D_h)
        forms = {"varlen_fa2" if cuda else "dense": lambda q, k, v: attention(q, k, v, plan)}
        candidates = {}
        for backend in (("flash", "cudnn", "efficient") if cuda else ("math",)):
            candidates[f"buckets_{backend}"] = lambda q, k, v, b=backend: bucketed_attention(q, k, v, runs, b)
            candidates[f"njt_{backend}"] = lambda q, k, v, b=backend: jagged_attention(q, k, v, layout, BACKENDS[b])
        for form, fn in candidates.items():  # each checked against the model's attention before it is timed
            where = f"{name} ({len(runs)} lengths, {T} tokens) {form}"
            try:
                diff = (fn(q, k, v).float() - reference.float()).abs().max().item()
            except RuntimeError as err:  # a backend that refuses these shapes or dtypes
                print(f"{where}: refused ({str(err)[:120]})")
                continue
            print(f"{where}: max |difference| from the model's attention {diff:.2e}")
            if not cuda and diff > 1e-5:
                raise SystemExit(f"{form} differs from the model's dense attention by {diff:.2e}")
            forms[form] = fn
        if not cuda:
            continue
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        grad = torch.randn_like(reference)
        for form, fn in forms.items():
            def step(fn=fn):
                for _ in range(LAYERS):
                    fn(qg, kg, vg).backward(grad)
            ms = median_cuda_ms(step)
            print(f"{name} ({len(runs)} lengths, {T} tokens) {form}: {ms:.2f} ms for {LAYERS} calls, forward + backward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
