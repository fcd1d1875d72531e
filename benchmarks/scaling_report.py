"""The scaling benchmark's JSON as a markdown table and a PNG plot.

    python benchmarks/scaling_report.py RUN.json [RUN2.json ...] --out DIR [--fastest]

RUN.json is ``pytest benchmarks/test_scaling_perf.py --benchmark-only [--full-sweep]
--benchmark-json RUN.json`` output. Writes

- ``DIR/scaling.md``: one line per (mode, size, batch): images/s, peak MiB (``ru_maxrss`` of the
  measured process), the part of it the work added (peak - RSS after imports and model), median
  ms per call and the timed calls it is from; for training, the update alone (the rate on cached
  features); then the configurations the run skipped and why;
- ``DIR/scaling.png``: two panels, images/s against image size and peak memory against image
  size, a line per (mode, batch), log y.

Only benchmarks with ``extra_info["level"] == "scaling"`` are read; where several files hold the
same (backbone, mode, size, batch), the last one given wins, or with ``--fastest`` the row with
the most images/s (repeated runs of a sweep on a shared machine: other work there only slows a
run down, so the faster run is the better estimate; the table says which rule was used).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_harness import md_table  # noqa: E402

MODE_ORDER = ("infer_torch", "infer_onnxruntime", "train_torch")
MODE_LABEL = {"infer_torch": "inference, eager torch", "infer_onnxruntime": "inference, ONNX Runtime",
              "train_torch": "training step, eager torch"}


def load(paths, fastest: bool = False):
    """(rows keyed by (backbone, mode, size, batch), skipped configurations, facts about the runs);
    a configuration in several files: the last one's row, or (``fastest``) the one with the most images/s."""
    rows, skipped, facts = {}, {}, {"scales": set(), "machines": set(), "threads": set(), "backbones": set(),
                                    "runs": len(paths), "fastest": fastest}
    for p in paths:
        data = json.loads(Path(p).read_text())
        machine = data.get("machine_info", {})
        facts["machines"].add(machine.get("cpu", {}).get("brand_raw") or machine.get("processor") or "?")
        if machine.get("bench_scale"):
            facts["scales"].add(machine["bench_scale"])
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            if info.get("level") != "scaling":
                continue
            for r in info.get("rows", []):
                key = (r.get("backbone"), r["mode"], int(r["size"]), int(r["batch"]))
                if not (fastest and key in rows and rows[key]["images_per_s"] >= r["images_per_s"]):
                    rows[key] = r
                facts["threads"].add(r.get("threads"))
                facts["backbones"].add(r.get("backbone"))
            for s in info.get("skipped_configs", []):
                skipped[(info.get("backbone"), s["mode"], int(s["size"]), int(s["batch"]))] = s
    for key in rows:       # measured after all (another run) -> not skipped
        skipped.pop(key, None)
    return rows, skipped, facts


def _order(key):
    backbone, mode, size, batch = key
    return (str(backbone), MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode, size, batch)


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def markdown(rows, skipped, facts) -> str:
    out = ["# Images/s and peak memory against image size and batch", "",
           f"Machine: {', '.join(sorted(facts['machines']))}; backbone: "
           f"{', '.join(sorted(map(str, facts['backbones'])))}; threads: "
           f"{', '.join(sorted(map(str, facts['threads'])))}; sweep: {', '.join(sorted(facts['scales'])) or '?'}.",
           "Each configuration ran in a fresh process: images/s = batch / median wall time of the timed calls "
           "(after a warm-up call); peak MiB = ru_maxrss of that process; +work MiB = peak - its RSS after "
           "imports and model construction (ONNX Runtime: after opening the session)."
           + (f" Where a configuration ran in several of the {facts['runs']} runs, the faster run's row is shown."
              if facts["fastest"] and facts["runs"] > 1 else ""), ""]
    body = []
    for key in sorted(rows, key=_order):
        r = rows[key]
        note = []
        if r.get("update_images_per_s") is not None:
            note.append(f"update alone {r['update_images_per_s']:.2f} images/s")
        if r.get("onnx_rel_err_vs_torch") is not None:
            note.append(f"export vs torch rel err {r['onnx_rel_err_vs_torch']:.1e}")
        body.append([r["mode"], r["size"], r["batch"], fmt(r.get("images_per_s"), ".2f"),
                     fmt(r.get("peak_rss_mib"), ".0f"), fmt(r.get("peak_minus_baseline_mib"), ".0f"),
                     fmt(1e3 * r["median_s"] if r.get("median_s") else None, ".1f"), r.get("rounds", ""),
                     "; ".join(note)])
    out += md_table(["mode", "size", "batch", "images/s", "peak MiB", "+work MiB", "median ms", "timed calls", "note"],
                    body, align=["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:", "---"])
    if skipped:
        out += ["", "Not run:", ""]
        out += [f"- {s['mode']} {s['size']} px batch {s['batch']}: {s['reason']}"
                for k, s in sorted(skipped.items(), key=lambda kv: _order(kv[0]))]
    return "\n".join(out) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    lines = {}
    for (backbone, mode, size, batch), r in rows.items():
        lines.setdefault((backbone, mode, batch), []).append((size, r["images_per_s"], r["peak_rss_mib"]))
    fig, (ax_rate, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = {m: f"C{i}" for i, m in enumerate(MODE_ORDER)}     # colour: the mode
    styles = {1: ":", 8: "--", 32: "-"}                             # line and marker: the batch
    markers = {1: "o", 8: "s", 32: "^"}
    many_backbones = len({k[0] for k in lines}) > 1
    for key in sorted(lines, key=lambda k: _order((k[0], k[1], 0, k[2]))):
        backbone, mode, batch = key
        pts = sorted(lines[key])
        label = f"{MODE_LABEL.get(mode, mode)}, batch {batch}" + (f" ({backbone})" if many_backbones else "")
        kw = dict(color=colours.get(mode), linestyle=styles.get(batch, "-."), marker=markers.get(batch, "x"),
                  label=label)
        ax_rate.plot([p[0] for p in pts], [p[1] for p in pts], **kw)
        ax_mem.plot([p[0] for p in pts], [p[2] for p in pts], **kw)
    sizes = sorted({k[2] for k in rows})
    for ax, ylabel in ((ax_rate, "images/s"), (ax_mem, "peak RSS of the process (MiB)")):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("image size (px, square)")
        ax.set_xticks(sizes)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_rate.set_title("throughput")
    ax_mem.set_title("peak memory")
    ax_mem.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s) of test_scaling_perf.py")
    ap.add_argument("--out", required=True, help="folder for scaling.md and scaling.png")
    ap.add_argument("--fastest", action="store_true",
                    help="a configuration in several files: keep its fastest row (default: the last file's)")
    args = ap.parse_args(argv)
    rows, skipped, facts = load(args.json, fastest=args.fastest)
    if not rows:
        print(f"no scaling rows (extra_info level 'scaling') in {', '.join(args.json)}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.md").write_text(markdown(rows, skipped, facts))
    plot(rows, out / "scaling.png")
    print(f"wrote {out / 'scaling.md'} and {out / 'scaling.png'} ({len(rows)} configurations)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
