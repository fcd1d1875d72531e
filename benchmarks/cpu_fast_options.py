"""What PyTorch offers for the CPU path, measured side by side (interleaved medians): the numbers
behind :mod:`altub_fast.nn.cpu_fast` (which options are on, which were left out).

    python benchmarks/cpu_fast_options.py [--parts backbone,subnet,flow] [--out FILE.json]

Parts:
- ``backbone``: the frozen backbone (efficientnet_lite0 and resnet18, 256 px, batch 1 and 8) plain
  (NCHW, BatchNorm) against channels_last input, the BatchNorm fold, and both (the fast path);
- ``subnet``: one FastFlow subnet (conv - ReLU - conv) in inference at wide_resnet50_2's shapes:
  channels_last, and oneDNN's fused conv + ReLU with prepacked weights
  (``torch.ops.mkldnn._convolution_pointwise``, a private op);
- ``flow``: an 8-block flow kept in channels_last end to end (with a gather that keeps the layout)
  against the NCHW flow, inference and training (several minutes);
- ``vs_freia``: the 8-block flow at C = 1024 @ 16x16, batch 4, as a user gets it (the CPU path)
  against FrEIA 0.2's, inference and training: the issue's targets, with as many rounds as asked.

Threads: torch's default unless ``--threads``. Results go to stdout and, as JSON, to ``--out``.
Weights are random: timing does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TRITON_INTERPRET", "0")

from _common import fastflow_subnet, interleaved_ratio  # noqa: E402

from altub_fast.nn.cpu_common import max_rel_diff as _rel  # noqa: E402

CL = torch.channels_last


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()
    return call


def part_backbone(rounds: int, size: int = 256, batches=(1, 8)):
    from altub_fast.models import FastFlow
    from altub_fast.nn import cpu_fast

    rows = []
    for name in ("efficientnet_lite0", "resnet18"):
        bb = FastFlow(name, image_size=size, pretrained=False, impl="torch").eval().backbone
        for batch in batches:
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            xc = x.contiguous(memory_format=CL)
            folded = cpu_fast.folded_backbone(bb, xc)
            variants = {"channels_last": (bb, xc), "fold": (folded, x), "channels_last+fold": (folded, xc)}
            plain = _no_grad(lambda: bb(x))
            for label, (mod, inp) in variants.items():
                r = interleaved_ratio(plain, _no_grad(lambda mod=mod, inp=inp: mod(inp)), rounds=rounds)
                with torch.no_grad():
                    err = _rel(mod(inp), bb(x))
                rows.append(dict(part="backbone", model=name, image_size=size, batch=batch, option=label,
                                 rel_diff=err, **r))
                print(f"backbone {name:18s} b{batch}: {label:18s} {r['ratio_median']:.2f}x "
                      f"(plain {r['base_median_s'] * 1e3:.0f} ms; rel diff {err:.1e})", flush=True)
    return rows


def part_subnet(rounds: int):
    pw = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
    rows = []
    for C, H, batch, k in ((1024, 16, 4, 3), (512, 32, 4, 3), (256, 64, 4, 3), (1024, 16, 4, 1), (1024, 16, 1, 3)):
        torch.manual_seed(0)
        net = fastflow_subnet(k)(C // 2, C).eval()
        pad = [k // 2] * 2
        x = torch.randn(batch, C, H, H)[:, :C // 2]
        xcl = x.contiguous(memory_format=CL)
        netcl = fastflow_subnet(k)(C // 2, C).eval()
        netcl.load_state_dict(net.state_dict())
        netcl = netcl.to(memory_format=CL)
        plain = _no_grad(lambda: net(x))
        variants = {"channels_last": _no_grad(lambda: netcl(xcl))}
        if pw is not None:
            w1 = torch._C._nn.mkldnn_reorder_conv2d_weight(net[0].weight.to_mkldnn(), pad, [1, 1], [1, 1], 1,
                                                           list(x.shape))
            w2 = torch._C._nn.mkldnn_reorder_conv2d_weight(net[2].weight.to_mkldnn(), pad, [1, 1], [1, 1], 1,
                                                           [batch, C // 2, H, H])

            def packed():
                h = pw(x, w1, net[0].bias, pad, [1, 1], [1, 1], 1, "relu", [], "")
                return pw(h, w2, net[2].bias, pad, [1, 1], [1, 1], 1, "none", [], "")
            variants["prepacked conv+relu"] = _no_grad(packed)
        ref = plain()
        for label, fn in variants.items():
            r = interleaved_ratio(plain, fn, rounds=rounds)
            err = _rel(fn(), ref)
            rows.append(dict(part="subnet", C=C, H=H, batch=batch, kernel=k, option=label, rel_diff=err, **r))
            print(f"subnet {C}@{H}x{H} b{batch} k{k}: {label:20s} {r['ratio_median']:.2f}x "
                  f"(plain {r['base_median_s'] * 1e3:.1f} ms; rel diff {err:.1e})", flush=True)
    return rows


def part_flow(rounds: int):
    import test_block_perf as tb
    from altub_fast import reference

    orig = reference.coupling_forward

    def gather_keeping_layout(v, perm):
        if v.dim() == 4 and v.is_contiguous(memory_format=CL):
            return v.permute(0, 2, 3, 1).index_select(3, perm).permute(0, 3, 1, 2)
        return v.index_select(1, perm)

    def coupling_nhwc(x, a, gs, go, perm=None, **kw):
        out = orig(x, a, gs, go, None, **kw)
        return out if perm is None else (gather_keeping_layout(out[0], perm),) + tuple(out[1:])

    def fn_for(flow, x, mode, nhwc):
        params = [p for p in flow.parameters() if p.requires_grad]

        def fn():
            if nhwc:
                reference.coupling_forward = coupling_nhwc
            try:
                xx = x.contiguous(memory_format=CL) if nhwc else x
                if mode == "inference":
                    with torch.no_grad():
                        return flow(xx)
                return torch.autograd.grad(tb.loss_of(flow, xx), params)
            finally:
                reference.coupling_forward = orig
        return fn

    os.environ["ALTUB_FAST_IMPL"] = "torch"
    rows = []
    for shape in ((1024, 16, 16), (512, 32, 32), (256, 64, 64)):
        flow = tb.build_flow("reference", shape, 8, False)
        x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
        for mode in ("inference", "fwd_bwd"):
            r = interleaved_ratio(fn_for(flow, x, mode, False), fn_for(flow, x, mode, True), rounds=rounds)
            rows.append(dict(part="flow", shape=list(shape), batch=4, mode=mode, option="channels_last end to end", **r))
            print(f"8-block flow {shape} {mode:9s}: channels_last end to end {r['ratio_median']:.2f}x "
                  f"(NCHW {r['base_median_s'] * 1e3:.0f} ms)", flush=True)
    return rows


def part_vs_freia(rounds: int):
    import test_block_perf as tb

    if tb.FrEIABlock is None:
        raise SystemExit("the vs_freia part needs FrEIA==0.2 (a dev dependency)")
    shape = (1024, 16, 16)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2))
    ours, theirs = tb.build_flow("altub", shape, 8, False), tb.build_flow("freia", shape, 8, False)
    rows = []
    for mode in ("inference", "fwd_bwd"):
        r = interleaved_ratio(tb.make_fn(theirs, x, mode, "freia"), tb.make_fn(ours, x, mode, "altub"),
                              rounds=rounds)
        rows.append(dict(part="vs_freia", shape=list(shape), batch=4, mode=mode, option="altub vs FrEIA 0.2", **r))
        print(f"8-block flow {shape} {mode:9s}: altub_fast {r['ratio_median']:.2f}x FrEIA 0.2 "
              f"(CPU time {r.get('cpu_ratio_median', 0):.2f}x; FrEIA {r['base_median_s'] * 1e3:.0f} ms)", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="backbone,subnet", help="comma list of backbone, subnet, flow, vs_freia")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=256, help="backbone part: image side (default 256)")
    ap.add_argument("--batches", default="1,8", help="backbone part: comma list of batch sizes (default 1,8)")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = sorted(set(parts) - {"backbone", "subnet", "flow", "vs_freia"})
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from backbone, subnet, flow, vs_freia")
    t0 = time.time()
    rows = []
    batches = tuple(int(b) for b in args.batches.split(",") if b.strip())
    for p in parts:
        if p == "backbone":
            rows += part_backbone(args.rounds, args.image_size, batches)
        else:
            rows += {"subnet": part_subnet, "flow": part_flow, "vs_freia": part_vs_freia}[p](args.rounds)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.processor() or
                platform.machine(), cpus=os.cpu_count(), seconds=round(time.time() - t0, 1),
                command="python benchmarks/cpu_fast_options.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(meta=meta, results=rows), indent=1))
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
