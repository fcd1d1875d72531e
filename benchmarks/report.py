"""Turn pytest-benchmark JSON into a markdown table and a PNG chart of speed-ups.

    python benchmarks/report.py RUN.json [RUN2.json ...] [--md OUT.md] [--png OUT.png]

RUN.json is ``pytest benchmarks --benchmark-only --benchmark-json RUN.json`` output, from the
reduced default or the full sweep (``--full-sweep``); the table says which (``bench_scale``).

Speed-ups are only computed between benchmarks of the same JSON file (the same run): each row's
mean against the ``reference`` provider's mean for the same case. Where a benchmark also measured
an interleaved A/B ratio (``vs_reference_interleaved``, ``vs_freia_interleaved`` in extra_info,
calls alternating under the same load) those are shown too; on a shared, noisy machine they are
the numbers to quote; on the CPU the ratio of median process CPU times (the work done, less
sensitive to what else runs) is shown beside them.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study_harness import md_table  # noqa: E402


def case_key(b: dict) -> tuple:
    info = b.get("extra_info", {})
    rest = {k: v for k, v in (b.get("params") or {}).items() if k != "provider"}
    return (b.get("fullname", b["name"]).split("[")[0], tuple(sorted((k, str(v)) for k, v in rest.items())),
            info.get("level", ""))


def label(b: dict) -> str:
    info = b.get("extra_info", {})
    parts = [info.get("level") or b["name"].split("[")[0].replace("test_", "")]
    for k in ("dataset", "backbone", "shape", "mode", "dtype"):
        if k in info:
            v = info[k]
            parts.append("x".join(map(str, v)) if isinstance(v, list) else str(v))
    return " ".join(parts)


def load(path: str):
    data = json.loads(Path(path).read_text())
    rows = []
    ref_mean = {}
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        prov = info.get("provider", (b.get("params") or {}).get("provider", "?"))
        if prov == "reference":
            ref_mean[case_key(b)] = b["stats"]["mean"]
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        prov = info.get("provider", (b.get("params") or {}).get("provider", "?"))
        mean = b["stats"]["mean"]
        ref = ref_mean.get(case_key(b))
        rows.append({
            "case": label(b), "provider": prov, "mean_ms": mean * 1e3, "median_ms": b["stats"]["median"] * 1e3,
            "rounds": b["stats"]["rounds"],
            "speedup_vs_reference": (ref / mean) if ref else None,
            "interleaved_vs_reference": (info.get("vs_reference_interleaved") or {}).get("ratio_median"),
            "interleaved_vs_freia": (info.get("vs_freia_interleaved") or {}).get("ratio_median"),
            "cpu_time_vs_freia": (info.get("vs_freia_interleaved") or {}).get("cpu_ratio_median"),
            "GB_per_s": info.get("GB_per_s"), "peak_memory_MiB": (info.get("peak_memory_bytes") or 0) / 2**20 or None,
            "device": info.get("device", ""),
        })
    machine = data.get("machine_info", {})
    scale = machine.get("bench_scale") or next((r.get("extra_info", {}).get("bench_scale") for r in data["benchmarks"]
                                                if r.get("extra_info", {}).get("bench_scale")), "unrecorded")
    for r in rows:
        r["scale"] = scale
    return rows, machine


def fmt(v, spec=".2f"):
    return "" if v is None else format(v, spec)


def markdown(rows, machine) -> str:
    out = [f"Machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor', '?'))}; "
           f"device(s): {', '.join(sorted({r['device'] for r in rows if r['device']}))}; "
           f"size: {', '.join(sorted({r['scale'] for r in rows}))}", ""]
    out += md_table(["case", "provider", "mean ms", "speed-up vs reference (means)", "interleaved vs reference",
                     "interleaved vs FrEIA", "vs FrEIA, CPU time", "GB/s", "peak MiB"],
                    ([r["case"], r["provider"], fmt(r["mean_ms"], ".3f"), fmt(r["speedup_vs_reference"]),
                      fmt(r["interleaved_vs_reference"]), fmt(r["interleaved_vs_freia"]), fmt(r["cpu_time_vs_freia"]),
                      fmt(r["GB_per_s"], ".1f"), fmt(r["peak_memory_MiB"], ".0f")]
                     for r in sorted(rows, key=lambda r: (r["case"], r["provider"]))),
                    align=["---", "---"] + ["---:"] * 7)
    return "\n".join(out) + "\n"


def chart(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_case = defaultdict(dict)
    for r in rows:
        v = r["interleaved_vs_reference"] or r["speedup_vs_reference"]
        if r["provider"] != "reference" and v:
            by_case[r["case"]][f"{r['provider']} vs reference"] = v
        if r["interleaved_vs_freia"]:
            by_case[r["case"]][f"{r['provider']} vs FrEIA 0.2"] = r["interleaved_vs_freia"]
    cases = sorted(by_case)
    provs = sorted({p for d in by_case.values() for p in d})
    if not cases:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cases) * max(1, len(provs))), 4.5))
    width = 0.8 / max(1, len(provs))
    for i, p in enumerate(provs):
        xs = [k + i * width for k in range(len(cases))]
        ax.bar(xs, [by_case[c].get(p, 0) for c in cases], width, label=p)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))])
    ax.set_xticklabels(cases, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up (x), interleaved where measured")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--md", help="write the markdown table here (default: stdout)")
    ap.add_argument("--png", help="write the speed-up chart here")
    args = ap.parse_args(argv)
    rows, machine = [], {}
    for p in args.json:
        r, machine = load(p)
        rows += r
    md = markdown(rows, machine)
    if args.md:
        Path(args.md).write_text(md)
    else:
        sys.stdout.write(md)
    if args.png:
        chart(rows, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
