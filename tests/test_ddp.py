"""DDP on the CPU: torchrun, 2 processes, gloo. After a short training with base-only updates,
both ranks hold identical flow and base parameters (FastFlow and CFlow)."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

SCRIPT = textwrap.dedent(r'''
    import math, os, sys
    import numpy as np
    import torch, torch.nn as nn
    import torch.distributed as dist
    from torch.utils.data import TensorDataset
    from altub_fast.models import CFlow, FastFlow, FeatureExtractor
    from altub_fast.train import AltUBTrainer

    class TinyBackbone(FeatureExtractor):
        def __init__(self):
            super().__init__("tiny", [8, 16], [4, 8], "random")
            self.c1 = nn.Conv2d(3, 8, 4, stride=4)
            self.c2 = nn.Conv2d(8, 16, 2, stride=2)
            self.freeze()
        def forward(self, x):
            a = torch.relu(self.c1(x))
            return [a, torch.relu(self.c2(a))]

    out_dir = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    # every rank starts from a different initialisation: DDP must synchronise them
    torch.manual_seed(100 + rank)
    np.random.seed(100 + rank)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(20, 3, 32, 32, generator=g) * 0.5 + torch.linspace(-1, 1, 32)
    data = TensorDataset(images)
    result = {}
    ff = FastFlow(TinyBackbone(), image_size=32, flow_steps=2, hidden_ratio=1.0, altub=True)
    tr = AltUBTrainer(ff, data, epochs=2, batch_size=4, k=2, warmup=0, progress=False, seed=5)
    assert tr.world_size == 2 and tr.flow_update.ddp is not None
    hist = tr.fit()
    result["fastflow"] = {k: v.detach().clone() for k, v in ff.state_dict().items()}
    result["fastflow_hist"] = [(r["updates"], r["base_only_updates"], r["loss"]) for r in hist]
    cf = CFlow(TinyBackbone(), image_size=32, coupling_blocks=2, condition_dim=8, fiber_batch_size=32, altub=True)
    tr = AltUBTrainer(cf, data, epochs=1, batch_size=4, k=3, warmup=0, progress=False, seed=5,
                      cache_features=False)
    hist = tr.fit()
    result["cflow"] = {k: v.detach().clone() for k, v in cf.state_dict().items()}
    result["cflow_hist"] = [(r["updates"], r["base_only_updates"], r["loss"]) for r in hist]
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
''')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_identical(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:  # pragma: no cover
        pytest.fail(f"torchrun timed out:\n{e.stdout}\n{e.stderr}")
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for model in ("fastflow", "cflow"):
        s0, s1 = r0[model], r1[model]
        assert s0.keys() == s1.keys()
        for k in s0:
            assert torch.equal(s0[k], s1[k]), f"{model}: {k} differs between ranks"
        # the base trained (base-only updates included) and the epoch statistics agree
        assert any(k.startswith("bases.") and k.endswith("mu") and s0[k].abs().sum() > 0 for k in s0)
        assert r0[f"{model}_hist"] == r1[f"{model}_hist"]
    # 20 images, 2 ranks, batch 4: 3 updates per rank per epoch (10 = 4 + 4 + 2)
    assert [h[:2] for h in r0["fastflow_hist"]] == [(3, 1), (3, 2)]
