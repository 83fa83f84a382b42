"""What one optimiser step sees under DDP: 2 gloo processes against a single-process reference.

The ITC all-gather follows X-VLM/CMP (its backward keeps this rank's rows of the gradient), so
with W processes DDP's averaged gradient is

    encoders:     itc * dL_itc(global batch)/dθ / W  +  itm * mean over ranks of dL_itm(local batch)/dθ
    temperature:  itc * dL_itc(global batch)/dtemp   (+ 0 from ITM, which reads a detached temperature)

which is upstream's, and what the PAB recipe's lr and loss weights were tuned for
(docs/training.md, "Several processes").
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from test_train import _env, _free_port

WORLD = 2
LOCAL = 4  # pairs per rank
SEED = 0

# Runs in each process: the model, the global batch and the ITM seeds are the same as the reference's.
CHILD = r"""
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, sys.argv[2])
from test_ddp_gradients import LOCAL, build, global_batch, local_batch, itm_seed
from tpas.config import LossSection
from tpas.train.loop import TrainStep

dist.init_process_group("gloo")
rank = dist.get_rank()
model = build()
step = DDP(TrainStep(model, LossSection(itc=1.0, itm=1.0, itm_hard_pairs=False)))
batch = local_batch(global_batch(model), rank)
torch.manual_seed(itm_seed(rank))  # ITM negatives are drawn from this stream
step(batch)["loss"].backward()
torch.save({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, f"{sys.argv[1]}/grad{rank}.pt")
dist.destroy_process_group()
"""


def build():
    """A tiny X-VLM in eval mode (no dropout, so the processes and the reference compute the same function)."""
    from tpas.models import create_model

    torch.manual_seed(SEED)
    return create_model("xvlm-small", image_size=(32, 32), window_size=4, device="cpu").eval()


def global_batch(model) -> dict[str, torch.Tensor]:
    """WORLD * LOCAL pairs; ids 0..15 with two repeated persons (soft ITC targets across ranks)."""
    g = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL
    mask = torch.ones(n, 9, dtype=torch.long)
    mask[::3, 6:] = 0  # some captions are shorter
    return {"images": torch.randn(n, 3, *model.image_size, generator=g),
            "input_ids": torch.randint(1000, (n, 9), generator=g), "attention_mask": mask,
            "labels": torch.tensor([0, 1, 2, 0, 3, 4, 5, 3])}


def local_batch(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    return {k: v[rank * LOCAL:(rank + 1) * LOCAL] for k, v in batch.items()}


def itm_seed(rank: int) -> int:
    return 100 + rank


def _grads(model, batch, itc: float, itm: float, seed: int) -> dict[str, torch.Tensor]:
    from tpas.config import LossSection
    from tpas.train.loop import TrainStep

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    TrainStep(model, LossSection(itc=itc, itm=itm, itm_hard_pairs=False))(batch)["loss"].backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def test_ddp_gradient_is_upstreams_itc_over_world_plus_mean_itm(tmp_path):
    here = str(Path(__file__).resolve().parent)
    script = tmp_path / "child.py"
    script.write_text(CHILD, encoding="utf-8")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), here], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT,
                              env=_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE=str(WORLD),
                                       RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(WORLD)]
    outs = [p.communicate(timeout=240)[0].decode() for p in procs]
    for p, text in zip(procs, outs):
        assert p.returncode == 0, text[-4000:]
    ddp = [torch.load(tmp_path / f"grad{r}.pt") for r in range(WORLD)]

    model = build()
    batch = global_batch(model)
    itc = _grads(model, batch, 1.0, 0.0, 0)  # ITC of the whole global batch in one process
    itm = [_grads(model, local_batch(batch, r), 0.0, 1.0, itm_seed(r)) for r in range(WORLD)]
    mean_itm = {n: sum(g[n] for g in itm) / WORLD for n in itc}
    expected = {n: itc[n] * (1.0 if n == "temp" else 1.0 / WORLD) + mean_itm[n] for n in itc}
    summed = {n: itc[n] + mean_itm[n] for n in itc}  # what a summing all-gather would give

    assert set(ddp[0]) == set(expected)
    for name, grad in expected.items():
        assert torch.equal(ddp[0][name], ddp[1][name]), f"{name}: ranks disagree after DDP's all-reduce"
        # float32 noise of two summation orders (all-reduce vs one process) is ~1e-7; the summing
        # all-gather's error is ~0.3, so 1e-6 separates the semantics by five orders of magnitude
        assert torch.allclose(ddp[0][name], grad, rtol=1e-4, atol=1e-6), \
            f"{name}: max diff {(ddp[0][name] - grad).abs().max():.3g}"
    assert float(itc["temp"].abs()) > 0
    # the test can tell the two semantics apart: the encoders' ITC share differs by W
    proj = "vision_proj.weight"
    assert not torch.allclose(ddp[0][proj], summed[proj], rtol=1e-2, atol=1e-6)
