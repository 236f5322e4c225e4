"""Accuracy-robustness trade-off curves for several runs, overlaid (PNG + JSON).

Each RUN is either

* a JSON written by ``certonnx certify MODEL --radius --json OUT`` (or any JSON with the same
  ``radius: {norm: {eps_max, acr, curve: {eps, accuracy}}}`` block and ``clean_accuracy``), or
* a model file (``.onnx``) together with ``--data``: the radii are computed here with
  :func:`certonnx.certify.radius.certified_radius` (``--method``, ``--eps-max``, ``--n``).

Left panel(s): certified accuracy vs ε, one line per run (one panel per norm). Right panel:
the trade-off itself, clean accuracy vs average certified radius (ACR), one point per run, as
in the ACERT paper's figures. The JSON written beside the PNG holds every run's curve, ACR and
clean accuracy, so the plot can be redrawn or tabulated without recomputing.

    python tools/tradeoff.py run1.json run2.json -o curves.png
    python tools/tradeoff.py a.onnx b.onnx --data mnist.npz --n 500 --norm linf --eps-max 0.4 -o curves.png
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

Run = dict[str, Any]  # {"label", "clean_accuracy", "radius": {norm: {"eps_max", "acr", "curve"}}}


def run_from_json(path: str | Path, label: str | None = None) -> Run:
    """A run from a ``certonnx certify --radius --json`` file; raises ValueError on anything else."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: cannot read JSON ({e})") from e
    rad = d.get("radius") if isinstance(d, dict) else None
    if not isinstance(rad, dict):
        raise ValueError(f"{p}: no 'radius' block; write it with `certonnx certify ... --radius --json {p.name}`")
    norms = {k: v for k, v in rad.items() if isinstance(v, dict) and "curve" in v}
    if not norms:
        raise ValueError(f"{p}: the 'radius' block has no per-norm curves")
    for k, v in norms.items():
        c = v["curve"]
        if len(c.get("eps", [])) != len(c.get("accuracy", [])) or not c.get("eps"):
            raise ValueError(f"{p}: radius curve for {k} is malformed")
    clean = d.get("clean_accuracy")
    if clean is None:  # fall back to the curve at ε = 0
        clean = next(iter(norms.values()))["curve"]["accuracy"][0]
    return {"label": label or str(d.get("label") or p.stem), "source": str(p), "clean_accuracy": float(clean),
            "method": rad.get("method"), "radius": norms}


def run_from_model(path: str | Path, data: str | Path, norm: str, eps_max: float, *, method: str = "ibp",
                   n: int | None = 500, split: str = "test", iters: int = 10, batch_size: int = 256,
                   label: str | None = None) -> Run:
    """A run computed from a model file and a dataset (radius by batched bisection)."""
    import torch

    import certonnx
    from certonnx.bounds import BoundedModule
    from certonnx.certify.radius import certified_radius, radius_summary
    from certonnx.data import check_against_model, load_npz

    cm = certonnx.load(path)
    x, y, info = load_npz(data, split, n, num_classes=cm.num_classes)
    x, _ = check_against_model(x, cm.sample_shape, info)
    m = cm.module.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        correct = torch.cat([m(x[i:i + batch_size]).flatten(1).argmax(1) for i in range(0, x.shape[0], batch_size)]) == y
    bm = BoundedModule(m, cm.sample_shape)
    r = certified_radius(bm, x, y, norm, eps_max, method, iters=iters, domain=tuple(cm.domain),
                         batch_size=batch_size, num_classes=cm.num_classes).cpu()
    return {"label": label or Path(path).stem, "source": str(path), "clean_accuracy": float(correct.float().mean()),
            "method": method, "radius": {norm: {"eps_max": eps_max, **radius_summary(r, eps_max, correct=correct)}}}


def plot_tradeoff(runs: list[Run], out: str | Path, title: str = "accuracy-robustness trade-off") -> None:
    """PNG: certified accuracy vs ε per norm (runs overlaid) and clean accuracy vs ACR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from certonnx.utils import atomic_write_bytes

    norms: list[str] = []
    for r in runs:
        norms += [k for k in r["radius"] if k not in norms]
    fig, axes = plt.subplots(1, len(norms) + 1, figsize=(4.4 * (len(norms) + 1), 3.6), squeeze=False)
    for ax, norm in zip(axes[0], norms):
        for r in runs:
            v = r["radius"].get(norm)
            if v is None:
                continue
            ax.plot(v["curve"]["eps"], v["curve"]["accuracy"], marker="o", markersize=2.5,
                    label=f"{r['label']} (ACR {v['acr']:.3g})")
        ax.set_xlabel(f"ε ({norm})")
        ax.set_ylabel("certified accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"certified accuracy vs ε ({norm})")
    ax = axes[0][-1]
    for norm in norms:
        for r in runs:
            v = r["radius"].get(norm)
            if v is not None:
                ax.scatter([v["acr"]], [r["clean_accuracy"]])
                ax.annotate(f"{r['label']}" + (f" [{norm}]" if len(norms) > 1 else ""),
                            (v["acr"], r["clean_accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("average certified radius (ACR)")
    ax.set_ylabel("clean accuracy")
    ax.grid(alpha=0.3)
    ax.set_title("clean accuracy vs ACR")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="certify --radius --json files, or model files with --data")
    ap.add_argument("-o", "--output", required=True, help="output PNG (the JSON goes beside it, same stem)")
    ap.add_argument("--labels", default=None, help="comma-separated labels, one per run")
    ap.add_argument("--data", default=None, help="dataset .npz for model-file runs")
    ap.add_argument("--n", type=int, default=500, help="samples for model-file runs")
    ap.add_argument("--norm", default="linf", help="norm for model-file runs (linf or l2)")
    ap.add_argument("--eps-max", type=float, default=None, help="radius search limit for model-file runs")
    ap.add_argument("--method", default="ibp", help="bound method for model-file runs (ibp, crown-ibp, crown, ...)")
    ap.add_argument("--title", default="accuracy-robustness trade-off")
    a = ap.parse_args(argv)
    labels = a.labels.split(",") if a.labels else [None] * len(a.runs)
    if len(labels) != len(a.runs):
        print(f"error: {len(labels)} labels for {len(a.runs)} runs", file=sys.stderr)
        return 2
    runs: list[Run] = []
    try:
        for src, lab in zip(a.runs, labels):
            if src.endswith(".json"):
                runs.append(run_from_json(src, lab))
            else:
                if a.data is None or a.eps_max is None:
                    raise ValueError(f"{src}: model files need --data and --eps-max")
                runs.append(run_from_model(src, a.data, a.norm, a.eps_max, method=a.method, n=a.n, label=lab))
        from certonnx.utils import atomic_write_bytes

        out = Path(a.output)
        plot_tradeoff(runs, out, a.title)
        summary = {"runs": runs}
        atomic_write_bytes(out.with_suffix(".json"), (json.dumps(summary, indent=2) + "\n").encode())
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # certonnx errors (bad model/data) as one line
        from certonnx.errors import CertonnxError

        if isinstance(e, CertonnxError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise
    for r in runs:
        accs = ", ".join(f"{k}: ACR {v['acr']:.4g}" for k, v in r["radius"].items())
        print(f"{r['label']}: clean {r['clean_accuracy']:.2%}, {accs}")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
