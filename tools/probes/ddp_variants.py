"""Probe (issue 11 item 5): `maskfit` under DDP with one of Dynamo's DDP strategies, to find what costs DDP
5 % on one GPU under torch.compile. Run under torchrun:

    torchrun --nproc-per-node 1 tools/probes/ddp_variants.py VARIANT bench ...maskfit bench arguments...

VARIANT: "split" (PyTorch's default: DDPOptimizer splits the compiled graph at bucket boundaries so the
all-reduces overlap the backward), "nosplit" (torch._dynamo.config.optimize_ddp = False: one graph, every
bucket reduced after the backward) or "bucketN" (split, with DDP's bucket_cap_mb = N instead of 25).
"""
import sys

import torch._dynamo
from torch.nn.parallel import DistributedDataParallel

variant = sys.argv.pop(1)
if variant == "nosplit":
    torch._dynamo.config.optimize_ddp = False
elif variant.startswith("bucket"):
    cap_mb = int(variant[len("bucket"):])
    plain_init = DistributedDataParallel.__init__

    def init_with_cap(self, *args, **kwargs):
        kwargs.setdefault("bucket_cap_mb", cap_mb)
        plain_init(self, *args, **kwargs)

    DistributedDataParallel.__init__ = init_with_cap
elif variant != "split":
    raise SystemExit(f"variant {variant!r}: expected split, nosplit or bucketN")

from maskfit.cli import main  # noqa: E402  (after the patches, which DDP's construction reads)

sys.exit(main(sys.argv[1:]))
