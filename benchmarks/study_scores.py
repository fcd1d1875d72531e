"""Study: which anomaly map, image score, loss and feature blocks hold up on real data, chosen
without defect labels (issues 10 and 11; results in docs/results.md, raw data in docs/study_scores/).

For each data set (magnetic_tile, kolektor, the synthetic carpet; bottle for image-level checks) it
trains FastFlow (efficientnet_lite0, 256 px, the package defaults) with and without AltUB, over
several seeds, and records per epoch:
- the held-out NLL (nats per dimension) on the held-out normal split (10 % of train/good, seeded),
  and the training NLL in the same unit: the only signals a label-free stopping rule may use;
- every few epochs, and at the epoch the label-free rule picks: image AUROC, pixel AUROC and AUPRO for
  every score mode (loglik, fastflow, cflow) and image score (max, top-1 % mean), each calibrated on
  the held-out normal images only (never on test data).
It also runs a naive kNN baseline (memory bank of training patches) on the same features, and compares
efficientnet_lite0 block sets for FastFlow (and, briefly, CFLOW-AD).

Numbers chosen on the test set (the best epoch in hindsight) are reported as such and never used for
any default. Run once, in the background, with its log in the repository:

    python benchmarks/study_scores.py --out docs/study_scores > docs/study_scores/study.log 2>&1


The study's parts: this file (data, the arms, the kNN baseline, the command line),
``study_scores_report.py`` (the tables and curves, from the JSON alone) and ``study_harness.py``
(log, JSON, the runner, the merge; shared by the studies).
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from altub_fast.data import MVTecAD, make_synthetic_carpet
from altub_fast.metrics import compute_all, image_auroc
from altub_fast.models import build_model, build_backbone
from altub_fast.models.scoring import SCORE_MODES, concat_parts, image_scores_from_maps
from altub_fast.train import AltUBTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from study_harness import AUTO_RULE, default_data_root, feature_batches, load_stack, log, run_jobs, save_json  # noqa: E402
from study_harness import auto_choice as _auto_choice  # noqa: E402
from study_scores_report import DEFAULT_BLOCKS, merge_json, report  # noqa: E402

BACKBONE = "efficientnet_lite0"
ALL_BLOCKS = (2, 4, 10, 15)          # features extracted once; each run takes its subset
BLOCK_SETS = {"2/4/10": (2, 4, 10), "4/10": (4, 10), "4/10/15": (4, 10, 15)}
IMAGE_RULES = {"max": ("max", 0.0), "top1%": ("topk", 0.01)}

#: Arms: (altub, norm_logdet). "altub" is the package default.
ARMS = {"altub": dict(altub=True, norm_logdet=True),
        "baseline": dict(altub=False, norm_logdet=True),
        "altub_published_loss": dict(altub=True, norm_logdet=False)}

PRESETS: Dict[str, Dict[str, Any]] = {
    # ~2 h on 2 shared CPU cores at 1 thread per process.
    "reduced": dict(image_size=256, batch_size=32, seeds=[0, 1, 2], eval_every=4, heldout_fraction=0.1,
                    epochs={"magnetic_tile": 20, "kolektor": 24, "carpet_synthetic": 16, "bottle": 16},
                    arms={"altub": [0, 1, 2], "baseline": [0, 1, 2], "altub_published_loss": [0]},
                    cflow_epochs=3, cflow_train=100, knn_bank=60000,
                    syn=dict(n_train=120, n_test_good=30, n_test_defect=8, size=256),
                    # magnetic_tile is 4x kolektor's size: half its training images and a stratified
                    # half of its test set keep it within the CPU budget (seeded, the same for every run)
                    subsample={"magnetic_tile": dict(train=360, test_fraction=0.5)}),
    "tiny": dict(image_size=64, batch_size=4, seeds=[0], eval_every=1, heldout_fraction=0.25,
                 epochs={"magnetic_tile": 2, "kolektor": 2, "carpet_synthetic": 2, "bottle": 2},
                 arms={"altub": [0], "baseline": [0]}, cflow_epochs=1, cflow_train=8,
                 knn_bank=2000, syn=dict(n_train=12, n_test_good=3, n_test_defect=1, size=64)),
}


# ----------------------------------------------------------------------------- data
def heldout_indices(n: int, fraction: float, seed: int = 0) -> List[int]:
    """A seeded fraction of the training images, never trained on (as the eval command's split)."""
    k = max(1, int(round(fraction * n)))
    return sorted(int(i) for i in np.random.default_rng(seed).permutation(n)[:k])



def prepare(name: str, cfg: Dict[str, Any], data_root: str, synthetic_root: str) -> Dict[str, Any]:
    size = cfg["image_size"]
    if name == "carpet_synthetic":
        root = make_synthetic_carpet(synthetic_root, seed=0, **cfg["syn"])
        root_dir, category = root.parent, root.name
    else:
        root_dir, category = data_root, name
    train = MVTecAD(root_dir, category, "train", size)
    test = MVTecAD(root_dir, category, "test", size)
    ho = heldout_indices(len(train), cfg["heldout_fraction"])
    tr = [i for i in range(len(train)) if i not in set(ho)]
    te = list(range(len(test)))
    sub = cfg.get("subsample", {}).get(name)
    if sub:
        rng = np.random.default_rng(1)
        tr = sorted(int(i) for i in rng.permutation(tr)[: sub["train"]])
        te = []
        for d in sorted({s.defect for s in test.samples}):
            idx = [i for i, s in enumerate(test.samples) if s.defect == d]
            te += [int(i) for i in rng.permutation(idx)[: max(1, int(round(sub["test_fraction"] * len(idx))))]]
        te = sorted(te)
    train_images = load_stack(train, tr).images
    heldout_images = load_stack(train, ho).images
    test_images, test_masks, test_labels, _ = load_stack(test, te)
    has_masks = test_masks is not None and bool(getattr(test, "has_masks", True)) and name != "bottle"
    log(f"{name}: {len(tr)} train / {len(ho)} held-out normal / {len(te)} test images at {size}px "
        f"({int(test_labels.sum())} defective; pixel masks: {has_masks})")
    return dict(name=name, train_images=train_images, heldout_images=heldout_images, test_images=test_images,
                test_masks=test_masks if has_masks else None, test_labels=test_labels,
                info=dict(n_train=len(tr), n_heldout=len(ho), n_test=len(te), subsample=sub,
                          n_defective=int(test_labels.sum()), image_size=size, has_masks=has_masks))


@torch.no_grad()
def extract_all(images: torch.Tensor, batch_size: int = 32) -> Dict[int, torch.Tensor]:
    bb = build_backbone(BACKBONE, pretrained=True, feature_blocks=ALL_BLOCKS).eval()
    parts = [bb(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return {b: torch.cat([p[j] for p in parts]) for j, b in enumerate(ALL_BLOCKS)}


def take(feats: Dict[int, torch.Tensor], blocks: Sequence[int]) -> List[torch.Tensor]:
    return [feats[b] for b in blocks]



# ----------------------------------------------------------------------------- evaluation
def evaluate(model, data: Dict[str, Any], feats_test: List[torch.Tensor], feats_ho: List[torch.Tensor],
             modes: Sequence[str] = SCORE_MODES) -> Dict[str, Dict[str, float]]:
    """Calibrate on the held-out normal images, then every (mode, image rule) on the test set."""
    model.eval()
    model.calibrate(feature_batches(feats_ho))
    parts = concat_parts([model.score_parts(b) for b in feature_batches(feats_test)])
    out: Dict[str, Dict[str, float]] = {}
    labels = data["test_labels"].numpy()
    for mode in modes:
        try:
            maps = model.scorer.maps(parts, mode=mode)
        except ValueError:
            continue
        pix = None
        if data["test_masks"] is not None:
            pix = compute_all(maps.numpy(), data["test_masks"].numpy(), labels)
        for rule, (r, frac) in IMAGE_RULES.items():
            s = image_scores_from_maps(maps, r, frac).numpy()
            rec = {"image_auroc": float(image_auroc(s, labels))}
            if pix is not None:
                rec["pixel_auroc"] = float(pix["pixel_auroc"])
                rec["aupro"] = float(pix["aupro"])
            out[f"{mode}/{rule}"] = rec
    return out


@torch.no_grad()
def nll(model, feats: List[torch.Tensor]) -> float:
    model.eval()
    return float(torch.cat([model.nll_per_dim(b) for b in feature_batches(feats)]).mean())


def auto_choice(heldout_nll: List[float], rule: Dict[str, Any] = AUTO_RULE) -> Dict[str, int]:
    """(stop epoch, chosen epoch) of the label-free early-stopping rule on a per-epoch curve (epoch
    1..): :func:`study_harness.auto_choice` without its "stopped"."""
    c = _auto_choice(heldout_nll, rule)
    return {"stop": c["stop"], "chosen": c["chosen"]}


def run_fastflow(data, feats, arm: str, seed: int, blocks: Sequence[int], epochs: int, cfg,
                 model_name: str = "fastflow", n_train: Optional[int] = None) -> Dict[str, Any]:
    label = f"{data['name']} {model_name} {arm} blocks {'/'.join(map(str, blocks))} seed {seed}"
    torch.manual_seed(seed)
    np.random.seed(seed)
    kw = dict(ARMS[arm])
    if model_name == "cflow":
        kw.pop("norm_logdet")
    model = build_model(model_name, BACKBONE, pretrained=True, image_size=cfg["image_size"],
                        feature_blocks=blocks, **kw)
    tr = take(feats["train"], blocks)
    if n_train is not None:
        tr = [f[:n_train] for f in tr]
    ho, te = take(feats["heldout"], blocks), take(feats["test"], blocks)
    n = tr[0].shape[0]
    trainer = AltUBTrainer(model, TensorDataset(data["train_images"][:n]), epochs=epochs,
                           batch_size=cfg["batch_size"], seed=seed, progress=False, device="cpu")
    trainer.set_feature_cache(tr)
    train_sub = [f[: max(1, len(ho[0]))] for f in tr]
    eval_at = set(range(cfg["eval_every"], epochs + 1, cfg["eval_every"])) | {epochs}
    curve, snapshots = [], {}
    t0 = time.perf_counter()
    t_eval = 0.0
    for e in range(1, epochs + 1):
        trainer.fit(e)
        rec = {"epoch": e, "heldout_nll": nll(model, ho), "train_nll": nll(model, train_sub),
               "loss": float(trainer.history[-1]["loss"])}
        snapshots[e] = copy.deepcopy(model.trainable_state_dict())
        if e in eval_at:
            t1 = time.perf_counter()
            rec["metrics"] = evaluate(model, data, te, ho)
            t_eval += time.perf_counter() - t1
            m = rec["metrics"].get("loglik/max", {})
            log(f"{label}: epoch {e}/{epochs} heldout NLL {rec['heldout_nll']:.4f} train NLL {rec['train_nll']:.4f} "
                f"loglik img {m.get('image_auroc', float('nan')):.3f} pix {m.get('pixel_auroc', float('nan')):.3f} "
                f"aupro {m.get('aupro', float('nan')):.3f}; fastflow pix "
                f"{rec['metrics'].get('fastflow/max', {}).get('pixel_auroc', float('nan')):.3f}")
        curve.append(rec)
    auto = auto_choice([r["heldout_nll"] for r in curve])
    chosen = curve[auto["chosen"] - 1]
    if "metrics" not in chosen:
        model.load_state_dict(snapshots[auto["chosen"]], strict=False)
        chosen["metrics"] = evaluate(model, data, te, ho)
    log(f"{label}: auto rule stops at epoch {auto['stop']}, chooses {auto['chosen']} "
        f"(loglik/max {chosen['metrics'].get('loglik/max')})")
    return dict(dataset=data["name"], model=model_name, arm=arm, seed=seed, blocks=list(blocks), epochs=epochs,
                n_train=n, curve=curve, auto=auto, wall_s=time.perf_counter() - t0, eval_s=t_eval)


# ----------------------------------------------------------------------------- kNN baseline
@torch.no_grad()
def knn_baseline(data, feats, cfg, blocks=(4, 10), seed: int = 0) -> Dict[str, Any]:
    """Memory bank of training patches (blocks 4 + 10, 3x3 average pooling, block 10 upsampled to
    block 4's grid), nearest-neighbour distance per test patch, bilinear map, image score = max."""
    t0 = time.perf_counter()

    def embed(fs: Dict[int, torch.Tensor]) -> torch.Tensor:
        maps = [F.avg_pool2d(fs[b], 3, 1, 1) for b in blocks]
        size = maps[0].shape[-2:]
        maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        return torch.cat(maps, 1)

    tr = embed(feats["train"])
    N, C, h, w = tr.shape
    bank = tr.permute(0, 2, 3, 1).reshape(-1, C)
    g = torch.Generator().manual_seed(seed)
    if bank.shape[0] > cfg["knn_bank"]:
        bank = bank[torch.randperm(bank.shape[0], generator=g)[: cfg["knn_bank"]]]
    te = embed(feats["test"])
    dists = []
    for i in range(te.shape[0]):
        q = te[i].permute(1, 2, 0).reshape(-1, C)
        dists.append(torch.cdist(q, bank).amin(dim=1).reshape(1, 1, h, w))
    d = torch.cat(dists)
    maps = F.interpolate(d, size=data["test_images"].shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    labels = data["test_labels"].numpy()
    rec = {"image_auroc": float(image_auroc(maps.flatten(1).amax(1).numpy(), labels))}
    if data["test_masks"] is not None:
        m = compute_all(maps.numpy(), data["test_masks"].numpy(), labels)
        rec.update(pixel_auroc=float(m["pixel_auroc"]), aupro=float(m["aupro"]))
    rec["wall_s"] = time.perf_counter() - t0
    log(f"{data['name']} kNN (blocks {blocks}, bank {bank.shape[0]}): {rec}")
    return rec


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/study_scores")
    p.add_argument("--size", choices=sorted(PRESETS), default="reduced")
    p.add_argument("--datasets", default="magnetic_tile,kolektor,carpet_synthetic,bottle")
    p.add_argument("--parts", default="arms,knn,blocks,cflow", help="comma list of arms, knn, blocks, cflow")
    p.add_argument("--data-root", default=None, help="folder holding magnetic_tile/, kolektor/, bottle/ "
                   "(default: shared/data beside the repository)")
    p.add_argument("--synthetic-root", default=None)
    p.add_argument("--seeds", default=None, help="only these seeds of the arms (comma list), to split a study "
                   "over processes")
    p.add_argument("--arms", default=None, help="only these arms (comma list of " + ", ".join(ARMS) + ")")
    p.add_argument("--block-sets", default=None, help="only these block sets (comma list of " + ", ".join(BLOCK_SETS) + ")")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs for every data set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--feature-cache", default=None, help="folder to keep extracted backbone features in "
                   "(a rerun then skips the backbone)")
    p.add_argument("--from-json", default=None, help="rebuild the report from study.json files (comma list: "
                   "studies run per data set are merged)")
    return p.parse_args(argv)


def dataset_features(ds: str, data: Dict[str, Any], cfg: Dict[str, Any], feature_cache: Optional[str]):
    """The backbone features of every block of ALL_BLOCKS for the train, held-out and test images;
    read from (or kept in) ``feature_cache`` where given."""
    t0 = time.perf_counter()
    tag = "_sub" if cfg.get("subsample", {}).get(ds) else ""
    cache = os.path.join(feature_cache, f"{ds}_{cfg['image_size']}{tag}.pt") if feature_cache else None
    if cache and os.path.isfile(cache):
        feats = torch.load(cache)
    else:
        feats = {k: extract_all(data[f"{k}_images"]) for k in ("train", "heldout", "test")}
        if cache:
            os.makedirs(feature_cache, exist_ok=True)
            torch.save(feats, cache + ".tmp")
            os.replace(cache + ".tmp", cache)
    log(f"{ds}: features of blocks {ALL_BLOCKS} in {time.perf_counter() - t0:.1f}s")
    return feats


def dataset_jobs(ds: str, data, feats, cfg: Dict[str, Any], args, results: Dict[str, Any]) -> list:
    """The jobs of one data set for :func:`study_harness.run_jobs`: kNN, then seed by seed (so that
    a study stopped early still holds paired arms) the arms, the block sets after the first seed
    (one seed each), then CFLOW-AD."""
    parts = set(args.parts.split(","))
    E = args.epochs or cfg["epochs"][ds]
    jobs = []

    def add(arm, seed, blocks, epochs, model_name="fastflow", n_train=None):
        def job():
            results["runs"].append(run_fastflow(data, feats, arm, seed, blocks, epochs, cfg,
                                                model_name=model_name, n_train=n_train))
        jobs.append((f"{ds} {model_name} {arm} blocks {'/'.join(map(str, blocks))} seed {seed}", job))

    def knn():
        results["knn"][ds] = knn_baseline(data, feats, cfg)

    if "knn" in parts:
        jobs.append((f"{ds} knn", knn))
    arms = cfg["arms"] if ("arms" in parts and ds != "bottle") else {}
    if args.arms is not None:
        arms = {a: v for a, v in arms.items() if a in args.arms.split(",")}
    seeds = sorted({s for v in arms.values() for s in v})
    if args.seeds is not None:
        seeds = [s for s in seeds if s in {int(x) for x in args.seeds.split(",")}]
    for seed in seeds or [None]:
        for arm, arm_seeds in arms.items():
            if seed in arm_seeds:
                add(arm, seed, DEFAULT_BLOCKS, E)
        if seed in (0, None) and "blocks" in parts:
            for name, blocks in BLOCK_SETS.items():
                if args.block_sets is not None and name not in args.block_sets.split(","):
                    continue
                if blocks == DEFAULT_BLOCKS and arms:
                    continue  # the altub seed-0 run above is this block set
                add("altub", 0, blocks, E)
    if "cflow" in parts and ds != "carpet_synthetic":
        for name, blocks in BLOCK_SETS.items():
            add("altub", 0, blocks, cfg["cflow_epochs"], model_name="cflow", n_train=cfg["cflow_train"])
    return jobs


def log_only_config(log_path: str) -> Dict[str, Any]:
    """The config of a study that stopped before its first run finished (only its log is left)."""
    return dict(PRESETS["reduced"], preset="reduced", auto_rule=AUTO_RULE, backbone=BACKBONE,
                threads=1, torch=torch.__version__, command=f"(log only) {log_path}")


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.from_json:
        return report(merge_json(args.from_json.split(","), log_only_config), args.out)
    torch.set_num_threads(args.threads)
    cfg = PRESETS[args.size]
    data_root = args.data_root or default_data_root()
    syn_root = args.synthetic_root or os.path.join(args.out, "_synthetic")
    results: Dict[str, Any] = dict(config=dict(preset=args.size, **{k: v for k, v in cfg.items()}, auto_rule=AUTO_RULE,
                                               backbone=BACKBONE, threads=torch.get_num_threads(),
                                               torch=torch.__version__, python=platform.python_version(),
                                               machine=platform.machine(), command=" ".join(sys.argv)),
                                   datasets={}, runs=[], knn={})
    path = os.path.join(args.out, "study.json")
    t_start = time.perf_counter()
    for ds in args.datasets.split(","):
        data = prepare(ds, cfg, data_root, syn_root)
        feats = dataset_features(ds, data, cfg, args.feature_cache)
        results["datasets"][ds] = data["info"]
        run_jobs(dataset_jobs(ds, data, feats, cfg, args, results), results, lambda: save_json(results, path))
        del feats, data
    results["wall_s"] = time.perf_counter() - t_start
    save_json(results, path)
    log(f"study done in {results['wall_s'] / 60:.1f} min")
    return report(results, args.out)


if __name__ == "__main__":
    main()
