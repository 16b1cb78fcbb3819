"""Probe: RoPE's cost inside the attention layer, and one joint form of it (issue 14 item 3).

    PYTHONPATH=src python3 tools/probes/attention_rope.py [IMAGES]

The profile of 2026-12-01 gave the kernels named after RoPE 5.5 ms of a 92.8 ms FiT-B/2-dit step (their backward
fused with the q/k split of the qkv output: 347 us a layer), while RoPE alone on q and k takes 0.8 ms for all
12 layers (tools/probes/rope_variants.py). This times 12 compiled attention layers (768 wide, 12 heads, varlen,
bf16 autocast), forward and backward, on an ImageNet-like packed stream, three ways:

- ``model``: ``maskfit.models.transformer.Attention`` as it is (q and k rotated one after the other);
- ``joint_qk``: q and k rotated together as one (T, 2, H, D_h) slab of the qkv output, so the backward writes
  both gradients into the qkv gradient in one kernel;
- ``no_rope``: no rotation at all (the floor RoPE's in-layer cost is measured against; not a model).

``joint_qk`` is checked equal to ``model`` first. On a machine without CUDA only the equality is checked (dense
attention, fp32). Prints one line per form: ms for 12 layers' forward + backward (median of 20).
"""
import sys

import torch
import torch.nn.functional as F

from maskfit.models.attention import attention, prepare_attention
from maskfit.models.rope import RopeTables, apply_rope, rope_tables
from maskfit.models.transformer import Attention
from maskfit.tokens import pack

from cuda_timing import median_cuda_ms  # tools/probes/, the script's own folder


class JointAttention(Attention):
    def forward(self, x, rope: RopeTables, plan):
        T, D = x.shape
        qkv = self.qkv(x).view(T, 3, self.num_heads, D // self.num_heads)  # (T, 3, H, D_h)
        both = RopeTables(rope.cos[:, None], rope.sin[:, None])  # (T, 1, D_h): broadcast over q/k and heads
        qk = apply_rope(qkv[:, :2], both).to(qkv.dtype)  # (T, 2, H, D_h)
        out = attention(qk[:, 0], qk[:, 1], qkv[:, 2], plan)  # (T, H, D_h)
        return self.proj(out.reshape(T, D))


class NoRopeAttention(Attention):
    def forward(self, x, rope, plan):
        T, D = x.shape
        q, k, v = self.qkv(x).view(T, 3, self.num_heads, D // self.num_heads).unbind(1)
        return self.proj(attention(q, k, v, plan).reshape(T, D))


def stream(num_images: int, device, backend: str):
    g = torch.Generator().manual_seed(0)
    grids = [(int(h), int(w)) for h, w in torch.randint(12, 17, (num_images, 2), generator=g)]  # 144-256 tokens
    batch = pack([torch.zeros(h * w, 1) for h, w in grids], grids, torch.zeros(num_images, dtype=torch.long))
    layout = batch.layout.to(device)
    tables = rope_tables(layout.pos, layout.seq_id, layout.grid, 64, None, 10000.0)
    return layout, tables, prepare_attention(layout, backend)


def main():
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    images = int(sys.argv[1]) if len(sys.argv) > 1 else (256 if cuda else 6)
    layout, tables, plan = stream(images, dev, "varlen" if cuda else "dense")
    T = layout.num_tokens
    torch.manual_seed(0)
    forms = {"model": Attention, "joint_qk": JointAttention, "no_rope": NoRopeAttention}
    layers = {name: torch.nn.ModuleList(cls(768, 12, False) for _ in range(12)).to(dev) for name, cls in forms.items()}
    for name in ("joint_qk", "no_rope"):
        layers[name].load_state_dict(layers["model"].state_dict())
    x0 = torch.randn(T, 768, device=dev)

    def run(name, x):
        for layer in layers[name]:
            x = x + layer(F.layer_norm(x, x.shape[-1:]), tables, plan)
        return x

    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
        a, b = run("model", x0).float(), run("joint_qk", x0).float()
    torch.testing.assert_close(b, a, atol=2e-2 if cuda else 1e-5, rtol=2e-2 if cuda else 1e-5)
    print(f"joint_qk equals model on {T} tokens ({dev.type})", flush=True)
    if not cuda:
        return
    for name in forms:
        compiled = torch.compile(lambda x, name=name: run(name, x))
        x = x0.clone().requires_grad_()

        def step():
            x.grad = None
            for p in layers[name].parameters():
                p.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = compiled(x)
            out.float().square().mean().backward()

        print(f"{name:9s} {median_cuda_ms(step):8.3f} ms (12 attention layers on {T} tokens, forward + "
              "backward, compiled, bf16)", flush=True)


if __name__ == "__main__":
    main()
