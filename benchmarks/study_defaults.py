"""Study for issue 19 ("Defaults that hold on data nobody tuned them on"): which anomaly map and
which image score hold up in the worst case over data sets, chosen without defect labels.

What it does, per data set (magnetic_tile with its whole training set, kolektor, bottle without
masks, the synthetic carpet), with the package defaults (FastFlow, efficientnet_lite0 blocks
4/10/15 from its packaged weights, 256 px, AltUB, exact-NLL loss):

- holds out a seeded 10 % of train/good (split seed 0, the same for every model seed); trains 30
  epochs, records the held-out NLL (nats/dim) every epoch and applies the trainer's label-free
  ``epochs="auto"`` rule to that curve (lowest held-out NLL, patience 5, min 5 epochs);
- evaluates every 5 epochs and at the auto-chosen epoch: from one pass of ``model.score_parts``
  every pixel map (fastflow, loglik, cflow, loglik_pos, fastflow+loglik; see :func:`base_maps`) and
  every image score (max, top-k mean at 0.5/1/5/10/20 %, the image NLL per dimension, and
  NLL + top-k combinations), every constant calibrated on the held-out normal images only;
  image AUROC, pixel AUROC and AUPRO on the test set;
- paints synthetic defects (foreign texture, colour, contrast, thin scratches) on the object of the
  held-out normal images (found without labels: pixels unlike the image border; the whole image
  for textures) and, for comparison, anywhere in the image, and scores them with the same rules:
  a label-free estimate whose ranking of the rules is compared with the real test ranking;
- a naive kNN baseline (blocks 4 + 10, a seeded memory bank of training patches), CFLOW-AD for 10
  epochs and FastFlow at 384 px where time allows.

The report (summary.md) has the worst-case tables (minimum over data sets including the issue's
held-out sets A and B, mean as tie-break), the stability check, the synthetic-estimate agreement
and the targets. Anything picked on test labels is marked "test-chosen" and sets no default.

    python benchmarks/study_defaults.py --out docs/study_defaults --tag p1 --datasets magnetic_tile
    python benchmarks/study_defaults.py --from-json docs/study_defaults/study.json

The study's parts: this file (data, model passes, the runs and the command line),
``study_defaults_paint.py`` (the synthetic defects), ``study_defaults_rules.py`` (maps, image
scores, calibration), ``study_defaults_report.py`` (the tables, from the JSON alone) and
``study_harness.py`` (log, JSON, the runner, the merge, markdown tables; shared by the studies).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from study_defaults_paint import DEFECT_KINDS, paint_defects  # noqa: E402
from study_defaults_report import merge_json, report  # noqa: E402
from study_defaults_rules import MAPS, all_maps, fit_calibration, image_rules, score_set, upsample  # noqa: E402
from study_harness import (AUTO_RULE, auto_choice, default_data_root, feature_batches, load_stack,  # noqa: E402
                           log, run_jobs, save_json)

BACKBONE = "efficientnet_lite0"
SYN_VARIANTS = ("syn_object", "syn_anywhere")

PRESETS: Dict[str, Dict[str, Any]] = {
    "full": dict(image_size=256, hires_size=384, batch_size=32, epochs=30, keep=[10, 30], eval_every=5, heldout_fraction=0.1,
                 seeds=[0, 1, 2], knn_bank=100_000, cflow_epochs=10, max_epochs=150, cflow_options={}, syn_per_image=2,
                 carpet=dict(n_train=120, n_test_good=30, n_test_defect=10, size=256)),
    "tiny": dict(image_size=64, hires_size=96, batch_size=4, epochs=3, keep=[1, 3], eval_every=1, heldout_fraction=0.25,
                 seeds=[0], knn_bank=2_000, cflow_epochs=1, max_epochs=8, cflow_options=dict(fiber_batch_size=4), syn_per_image=1,
                 carpet=dict(n_train=12, n_test_good=3, n_test_defect=3, size=64)),
}

# ----------------------------------------------------------------------------- data
def split_heldout(n: int, fraction: float, seed: int = 0) -> Tuple[List[int], List[int]]:
    """(train, held-out) indices: a seeded ``fraction`` of range(n) held out (>= 1, leaving >= 1)."""
    k = min(n - 1, max(1, int(round(fraction * n))))
    held = sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:k])
    hs = set(held)
    return [i for i in range(n) if i not in hs], held



def load_images(ds, idx: Optional[Sequence[int]] = None):
    """(images in [0, 1], masks (N, H, W) bool or None, labels) of a dataset (or a subset)."""
    st = load_stack(ds, idx)
    return st.images, (None if st.masks is None else st.masks[:, 0] > 0.5), st.labels


def load_dataset(name: str, cfg: Dict[str, Any], size: int, data_root: str, tmp_root: str) -> Dict[str, Any]:
    from altub_fast.data import MVTecAD, make_synthetic_carpet
    if name == "carpet_synthetic":
        root = make_synthetic_carpet(tmp_root, seed=0, **cfg["carpet"])
        root_dir, category = str(root.parent), root.name
    else:
        root_dir, category = data_root, name
    train = MVTecAD(root_dir, category, "train", size, normalize=False)
    test = MVTecAD(root_dir, category, "test", size, normalize=False)
    tr, ho = split_heldout(len(train), cfg["heldout_fraction"])
    test_images, test_masks, test_labels = load_images(test)
    if not test.has_masks:
        test_masks = None
    d = dict(name=name, size=size, train=load_images(train, tr)[0], heldout=load_images(train, ho)[0],
             test=test_images, test_masks=test_masks, test_labels=test_labels.numpy().astype(int))
    d["info"] = dict(n_train=len(tr), n_heldout=len(ho), n_test=len(test), n_defective=int(test_labels.sum()),
                     image_size=size, has_masks=test_masks is not None)
    log(f"{name} @{size}px: {len(tr)} train / {len(ho)} held-out normal / {len(test)} test "
        f"({d['info']['n_defective']} defective; masks {d['info']['has_masks']})")
    return d


# ----------------------------------------------------------------------------- model passes
@torch.no_grad()
def extract(model, images: torch.Tensor, bs: int = 32) -> List[torch.Tensor]:
    from altub_fast.imagenet import normalise
    out = [model.extract_features(normalise(images[i:i + bs])) for i in range(0, len(images), bs)]
    return [torch.cat([o[j] for o in out]) for j in range(len(out[0]))]


@torch.no_grad()
def parts_of(model, feats: List[torch.Tensor]):
    """Per scale (ll_full, ll_base) float32 (N, h, w) and the image NLL per dimension (N,)."""
    model.eval()
    ps, nl = [], []
    for b in feature_batches(feats):
        ps.append(model.score_parts(b))
        nl.append(model.nll_per_dim(b).float().cpu())
    parts = [(torch.cat([p[j].ll_full for p in ps]).float().cpu(), torch.cat([p[j].ll_base for p in ps]).float().cpu())
             for j in range(len(ps[0]))]
    return parts, torch.cat(nl)


@torch.no_grad()
def evaluate_state(model, D: Dict[str, Any]) -> Dict[str, Any]:
    """Calibrate on the held-out normals, then every rule on the test set and the synthetic sets."""
    size = (D["size"], D["size"])
    parts_ho, nll_ho = parts_of(model, D["feats"]["heldout"])
    cal, maps_ho = fit_calibration(parts_ho, nll_ho, size)
    scores_ho = image_rules(maps_ho, nll_ho, cal)
    p, n = parts_of(model, D["feats"]["test"])
    maps = all_maps(p, cal, size)
    res = {"test": score_set(maps, image_rules(maps, n, cal), D["test_labels"], D["test_masks"])}
    del maps
    for v in SYN_VARIANTS:
        p, n = parts_of(model, D["feats"][v])
        maps = all_maps(p, cal, size)
        sc = image_rules(maps, n, cal)
        n_ho, n_syn = len(nll_ho), len(n)
        res[v] = score_set({k: torch.cat([maps_ho[k], maps[k]]) for k in maps},
                           {k: torch.cat([scores_ho[k], sc[k]]) for k in sc}, [0] * n_ho + [1] * n_syn,
                           torch.cat([torch.zeros_like(D["syn_masks"][v][:1]).expand(n_ho, -1, -1), D["syn_masks"][v]]),
                           with_aupro=False)
    return res



# ----------------------------------------------------------------------------- runs
def prepare(name: str, cfg: Dict[str, Any], size: int, data_root: str, tmp_root: str) -> Dict[str, Any]:
    """The data set, its backbone features (train, held-out, test, both synthetic sets) and masks."""
    from altub_fast.models import build_model
    D = load_dataset(name, cfg, size, data_root, tmp_root)
    t0 = time.perf_counter()
    model = build_model("fastflow", BACKBONE, pretrained=True, image_size=size)
    D["feats"] = {k: extract(model, D[k]) for k in ("train", "heldout", "test")}
    D["syn_masks"], D["syn_meta"] = {}, {}
    for j, v in enumerate(SYN_VARIANTS):
        imgs, masks, meta = paint_defects(D["heldout"], v == "syn_object", cfg["syn_per_image"], seed=100 + j)
        D["feats"][v], D["syn_masks"][v] = extract(model, imgs), masks
        D["info"][v] = dict(n=len(meta), object_found=float(np.mean([m["object_found"] for m in meta])),
                            mean_area=float(np.mean([m["area"] for m in meta])))
        if j == 0:
            D["syn_example"] = (imgs[:8], masks[:8])
    D["info"]["features_s"] = time.perf_counter() - t0
    for k in ("train", "heldout", "test"):
        D[k] = None                        # images are not needed once their features exist
    log(f"{name} @{size}px: features and synthetic sets in {D['info']['features_s']:.0f}s; "
        f"object found on {D['info']['syn_object']['object_found']:.0%} of the held-out images")
    return D


def run_flow(D: Dict[str, Any], model_name: str, seed: int, epochs: int, cfg: Dict[str, Any], save,
             until_stop: bool = False) -> Dict[str, Any]:
    """Train ``epochs`` epochs, held-out NLL every epoch, every rule every ``eval_every`` epochs and at
    the auto-chosen epoch; ``save(run)`` after each evaluation (the run is marked partial until done).
    ``until_stop``: end where the auto rule stops instead (``epochs`` is then the cap), recorded as
    model "<name>_until_stop"."""
    from altub_fast.models import build_model
    from altub_fast.train import AltUBTrainer
    label = f"{D['name']} {model_name} @{D['size']}px seed {seed}"
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = build_model(model_name, BACKBONE, pretrained=True, image_size=D["size"],
                        **(cfg["cflow_options"] if model_name == "cflow" else {}))
    tr = D["feats"]["train"]
    trainer = AltUBTrainer(model, TensorDataset(torch.zeros(tr[0].shape[0], 1)), epochs=epochs,
                           batch_size=cfg["batch_size"], seed=seed, progress=False, device="cpu",
                           train_nll_images=0, calibrate=False)
    trainer.set_feature_cache(tr)
    run = dict(dataset=D["name"], model=model_name + ("_until_stop" if until_stop else ""), size=D["size"],
               seed=seed, epochs=epochs, curve=[],
               evals={}, partial=True, config=dict(model.config))
    eval_at = set(range(cfg["eval_every"], epochs + 1, cfg["eval_every"])) | {epochs}
    best_state, t0 = None, time.perf_counter()
    for e in range(1, epochs + 1):
        trainer.fit(e)
        model.eval()
        with torch.no_grad():
            ho = float(torch.cat([model.nll_per_dim(b).float() for b in feature_batches(D["feats"]["heldout"])]).mean())
        run["curve"].append(dict(epoch=e, heldout_nll=ho, loss=float(trainer.history[-1]["loss"]),
                                 t=time.perf_counter() - t0))
        auto = auto_choice([r["heldout_nll"] for r in run["curve"]])
        if auto["chosen"] == e:           # once the rule has stopped, its choice no longer moves
            best_state = copy.deepcopy(model.trainable_state_dict())
        if e in eval_at:
            run["evals"][str(e)] = evaluate_state(model, D)
            t = run["evals"][str(e)]["test"]
            log(f"{label}: epoch {e}/{epochs} held-out NLL {ho:.4f}; pixel AUROC fastflow "
                f"{t['pixel'].get('fastflow', {}).get('pixel_auroc', float('nan')):.3f} loglik "
                f"{t['pixel'].get('loglik', {}).get('pixel_auroc', float('nan')):.3f}; image AUROC fastflow/top1% "
                f"{t['image']['fastflow/top1%']:.3f} loglik/top1% {t['image']['loglik/top1%']:.3f} "
                f"nll {t['image']['nll']:.3f} ({time.perf_counter() - t0:.0f}s)")
            save(run)
        if auto["stopped"] and auto["stop"] == e:
            log(f"{label}: the auto rule stops at epoch {e}, choosing epoch {auto['chosen']}"
                + ("" if until_stop else " (training goes on)"))
            if until_stop:
                break
    run["auto"] = auto_choice([r["heldout_nll"] for r in run["curve"]])
    if str(run["auto"]["chosen"]) not in run["evals"]:
        model.load_state_dict(best_state, strict=False)
        run["evals"][str(run["auto"]["chosen"])] = evaluate_state(model, D)
    run.update(partial=False, wall_s=time.perf_counter() - t0)
    log(f"{label}: done in {run['wall_s'] / 60:.1f} min; auto epoch {run['auto']}")
    save(run)
    return run


@torch.no_grad()
def knn_baseline(D: Dict[str, Any], cfg: Dict[str, Any], seed: int = 0) -> Dict[str, Any]:
    """Blocks 4 + 10 (the default backbone's first two scales), 3x3 average pooling, block 10
    upsampled to block 4's grid; a seeded bank of ``knn_bank`` training patches; nearest-neighbour
    distance per patch, bilinear map; every image score of :func:`image_rules` on it."""
    t0 = time.perf_counter()

    def embed(fs):
        a, b = (F.avg_pool2d(f, 3, 1, 1) for f in fs[:2])
        return torch.cat([a, F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)], 1)

    def dmaps(fs):
        e = embed(fs)
        N, C, h, w = e.shape
        d = [torch.cdist(e[i].permute(1, 2, 0).reshape(-1, C), bank).amin(1).reshape(1, h, w) for i in range(N)]
        return upsample(torch.cat(d), (D["size"], D["size"]))

    tr = embed(D["feats"]["train"])
    bank = tr.permute(0, 2, 3, 1).reshape(-1, tr.shape[1])
    n_all = bank.shape[0]
    if n_all > cfg["knn_bank"]:
        bank = bank[torch.randperm(n_all, generator=torch.Generator().manual_seed(seed))[: cfg["knn_bank"]]]
    maps = {"knn": dmaps(D["feats"]["test"])}
    res = {"test": score_set(maps, image_rules(maps, None), D["test_labels"], D["test_masks"])}
    ho = dmaps(D["feats"]["heldout"])
    for v in SYN_VARIANTS:
        m = {"knn": torch.cat([ho, dmaps(D["feats"][v])])}
        masks = torch.cat([torch.zeros_like(D["syn_masks"][v][:1]).expand(len(ho), -1, -1), D["syn_masks"][v]])
        res[v] = score_set(m, image_rules(m, None), [0] * len(ho) + [1] * (len(m["knn"]) - len(ho)), masks,
                           with_aupro=False)
    res.update(bank=int(bank.shape[0]), patches=int(n_all), wall_s=time.perf_counter() - t0)
    t = res["test"]
    log(f"{D['name']} kNN (bank {bank.shape[0]} of {n_all}): pixel AUROC "
        f"{t['pixel'].get('knn', {}).get('pixel_auroc', float('nan')):.3f}; image AUROC knn/max "
        f"{t['image']['knn/max']:.3f} ({res['wall_s']:.0f}s)")
    return res


def save_examples(D: Dict[str, Any], out: str) -> None:
    """A strip of painted held-out images (top) and their masks (bottom), for the reader to judge."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    imgs, masks = D["syn_example"]
    fig, ax = plt.subplots(2, len(imgs), figsize=(1.6 * len(imgs), 3.4))
    for j in range(len(imgs)):
        ax[0, j].imshow(imgs[j].permute(1, 2, 0).numpy())
        ax[1, j].imshow(masks[j].numpy(), cmap="gray")
        ax[0, j].set_title(DEFECT_KINDS[j % len(DEFECT_KINDS)], fontsize=7)
        for a in ax[:, j]:
            a.axis("off")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"synthetic_{D['name']}.png"), dpi=80)
    plt.close(fig)


def snapshot_commit() -> Dict[str, Any]:
    """The commit of the altub_fast that is imported (the frozen snapshot) and whether it is clean."""
    import altub_fast
    where = os.path.dirname(os.path.abspath(altub_fast.__file__))
    git = lambda *a: subprocess.run(["git", "-C", where, *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    return dict(altub_fast=where, commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain", "--", ".")))


def phase_jobs(ph: str, ds: str, args, cfg: Dict[str, Any]) -> List[Tuple[str, int, int, int]]:
    """(model, seed, epochs, image size) of phase ``ph`` on data set ``ds``."""
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else cfg["seeds"]
    epochs = args.epochs or cfg["epochs"]
    return {"s0": [("fastflow", seeds[0], epochs, cfg["image_size"])],
            "seeds": [("fastflow", s, epochs, cfg["image_size"]) for s in seeds[1:]],
            "cflow": [("cflow", seeds[0], cfg["cflow_epochs"], cfg["image_size"])],
            "384": [("fastflow", seeds[0], epochs, cfg["hires_size"])] if ds in args.hires.split(",") else [],
            "knn": [("knn", 0, 0, cfg["image_size"])],
            "until_stop": [("fastflow_until_stop", seeds[0], cfg["max_epochs"], cfg["image_size"])]}[ph]


def study_jobs(args, cfg: Dict[str, Any], results: Dict[str, Any], save):
    """The study's jobs for :func:`study_harness.run_jobs`: the phases in the order given (e.g.
    s0,knn,seeds,cflow,384), each over the data sets; a data set's features are made on first use
    and kept (those at the hires size only for their phase)."""
    tmp = tempfile.mkdtemp(prefix="study_defaults_")
    data_root = args.data_root or default_data_root()
    cache: Dict[Tuple[str, int], Dict[str, Any]] = {}

    def data(ds: str, size: int) -> Dict[str, Any]:
        if (ds, size) not in cache:
            cache[(ds, size)] = D = prepare(ds, cfg, size, data_root, tmp)
            results["datasets"].setdefault(ds if size == cfg["image_size"] else f"{ds}@{size}", D["info"])
            try:
                save_examples(D, args.out)
            except Exception as e:  # a convenience; the JSON is the record
                log(f"example strip failed: {e}")
        return cache[(ds, size)]

    def job(ph: str, ds: str, model_name: str, seed: int, n_ep: int, size: int) -> None:
        try:
            D = data(ds, size)
            if model_name == "knn":
                results["knn"][ds] = knn_baseline(D, cfg)
            else:
                run_flow(D, model_name.replace("_until_stop", ""), seed, n_ep, cfg, save,
                         until_stop=model_name.endswith("_until_stop"))
        finally:
            if ph == "384":
                cache.pop((ds, size), None)

    return [(f"{ph} {ds} {model_name} seed {seed}", partial(job, ph, ds, model_name, seed, n_ep, size))
            for ph in args.phases.split(",") for ds in args.datasets.split(",")
            for model_name, seed, n_ep, size in phase_jobs(ph, ds, args, cfg)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/study_defaults")
    p.add_argument("--tag", default="study", help="results go to <out>/<tag>.json")
    p.add_argument("--size", choices=sorted(PRESETS), default="full")
    p.add_argument("--datasets", default="magnetic_tile,kolektor,bottle,carpet_synthetic")
    p.add_argument("--phases", default="s0,knn,seeds,cflow,384", help="comma list, run in this order: "
                   "s0 (first seed), knn, seeds (the others), cflow, 384 (FastFlow at the hires size), "
                   "until_stop (first seed trained until the auto rule stops, at most max_epochs)")
    p.add_argument("--hires", default="kolektor", help="data sets of the 384 phase")
    p.add_argument("--seeds", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--data-root", default=None, help="folder with magnetic_tile/, kolektor/, bottle/ "
                   "(default: shared/data beside the repository)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--from-json", default=None, help="rebuild the report from JSON files (comma list: merged, and "
                   "the merge written to <out>/study.json)")
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        paths = args.from_json.split(",")
        results = merge_json(paths)
        if len(paths) > 1:
            save_json(results, os.path.join(args.out, "study.json"))
        return report(results, args.out)
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.size]
    results: Dict[str, Any] = dict(
        config=dict(preset=args.size, **cfg, auto_rule=AUTO_RULE, backbone=BACKBONE, maps=list(MAPS),
                    threads=torch.get_num_threads(), torch=torch.__version__, python=platform.python_version(),
                    command=" ".join(sys.argv), snapshot=snapshot_commit(), started=time.strftime("%Y-%m-%d %H:%M:%S")),
        datasets={}, runs=[], knn={})
    path = os.path.join(args.out, f"{args.tag}.json")
    log(f"altub_fast from {results['config']['snapshot']}")

    def save(run: Optional[Dict[str, Any]]) -> None:
        if run is not None and not any(r is run for r in results["runs"]):
            results["runs"].append(run)
        save_json(results, path)

    t0 = time.perf_counter()
    run_jobs(study_jobs(args, cfg, results, save), results, lambda: save(None))
    results["wall_s"] = time.perf_counter() - t0
    save(None)
    log(f"study done in {results['wall_s'] / 60:.1f} min")
    return report(results, args.out, name=f"summary_{args.tag}.md" if args.tag != "study" else "summary.md")


if __name__ == "__main__":
    main()
