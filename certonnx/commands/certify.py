"""``certonnx certify MODEL --data FILE.npz --norm linf:0.1,l2:0.5``: certified accuracy.

Reports clean, PGD and certified accuracy per norm (and for all norms at once), says what ε
means for this model (raw input space, normalization inside or declared), and can write the
numbers as JSON, a radius curve as PNG, and a copy of the model carrying the certificate.
Every output path is checked before any work starts; the input model is never written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from certonnx.commands.options import (
    bound_method_option,
    consoles,
    device_option,
    json_file_option,
    mean_std_options,
    norms_option,
    seed_option,
    stderr_echo,
    usage_errors,
    write_json,
)

_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.I)


def _memory(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    m = _MEM.match(value)
    if not m:
        raise click.BadParameter(f"{value!r}: expected a size like 4G, 512M or 1000000", ctx=ctx, param=param)
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise click.BadParameter("must be positive", ctx=ctx, param=param)
    return n


@click.command("certify")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data", required=True, metavar="DATA",
              help="An .npz with x_<split>/y_<split> (or x/y), X.npy,Y.npy, a folder of x_<split>.npy/y_<split>.npy, "
                   "an image folder (one subfolder per class), MNIST idx files or CIFAR python batches; uint8 "
                   "pixels or floats in [0, 1] (docs/certify.md).")
@click.option("--split", default="test", show_default=True, help="Which split of the data to use.")
@click.option("--n", "n", type=click.IntRange(min=1), default=None, help="Use the first N samples only.")
@click.option("--norm", "norms", required=True, callback=norms_option, metavar="NORM:EPS[,NORM:EPS]",
              help="Perturbation radii in raw input space, e.g. linf:0.1,l2:0.5 or linf:8/255 (norms: linf/inf, l2, l1; "
                   "any case).")
@bound_method_option(before=("auto",), after=("lipschitz", "smoothing"), default="auto",
                     help="Bound method; auto = ibp -> crown-ibp -> crown -> alpha-crown, each only on samples "
                          "still open, crown and alpha-crown only within --auto-budget. smoothing: randomized "
                          "smoothing, a probabilistic certificate of the smoothed classifier, reported apart.")
@click.option("--auto-budget", type=float, default=None, metavar="X",
              help="With --method auto: run crown / alpha-crown on a batch only while the estimated work stays "
                   "within X × that of --method crown-ibp (attack included) [default: 4; inf = the whole "
                   "cascade]. The estimate is deterministic (model size and unstable neurons), not a clock.")
@json_file_option("Write the result as JSON to OUT ('-' = stdout; the table then goes to stderr).")
@click.option("--radius", is_flag=True, help="Also compute per-sample certified radii, ACR and the ε curve "
              "(bound method: --method, crown-ibp for auto).")
@click.option("--timeout", type=float, default=None, metavar="SECONDS",
              help="Stop starting bound passes after SECONDS (whole run); samples not verified by then are "
                   "reported unknown, never as a claim. Not applied to --radius.")
@click.option("--backend", type=click.Choice(["certonnx", "auto_lirpa"], case_sensitive=False), default="certonnx",
              show_default=True, help="Bound engine: certonnx's, or an installed auto_LiRPA (torch < 2.9) on the same "
              "imported graph; auto_LiRPA's bounds carry no float32 rounding allowance (docs/certify.md).")
@click.option("--cross-check", is_flag=True, help="Also run auto_LiRPA on every batch and method and fail (exit 1) "
              "where certonnx's bound is tighter than the best of auto_LiRPA's beyond float tolerance.")
@click.option("--sample-timeout", type=float, default=None, metavar="SECONDS",
              help="Seconds per sample for the bound passes: a batch of B samples gets B × SECONDS; no further "
                   "method starts on it after that (its open samples stay unknown).")
@click.option("--per-sample", is_flag=True, help="Add each sample's status per norm (verified / falsified / "
              "unknown), correctness and prediction to the JSON, in data order.")
@click.option("--eps-max", default=None, metavar="EPS|NORM:EPS,...",
              help="Upper end of the radius search (default 2 × ε per norm).")
@click.option("--plot", default=None, metavar="OUT.png", help="Plot certified accuracy vs ε (implies --radius).")
@click.option("-o", "--output", default=None, metavar="CERTIFIED.onnx",
              help="Write a copy of the model with the certificate in its metadata (never the input file).")
@mean_std_options("Per-channel mean, when MODEL expects normalized input (ε stays in pixel space).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Samples per bound/attack batch (memory use grows with it).")
@device_option()
@click.option("--max-memory", callback=_memory, default=None, metavar="SIZE",
              help="Memory budget per batch (e.g. 4G); methods over it fall back to cheaper ones, with a warning.")
@click.option("--pgd-steps", type=click.IntRange(min=0), default=20, show_default=True, help="PGD steps per restart.")
@click.option("--pgd-restarts", type=click.IntRange(min=1), default=1, show_default=True, help="PGD restarts.")
@click.option("--sigma", type=float, default=None, metavar="SIGMA",
              help="--method smoothing: std of the Gaussian noise in raw input units [default: 0.25].")
@click.option("--noise-samples", type=click.IntRange(min=1), default=None, metavar="N",
              help="--method smoothing: noisy copies per sample for the estimate [default: 10000].")
@click.option("--selection-samples", type=click.IntRange(min=1), default=None, metavar="N0",
              help="--method smoothing: noisy copies that select the class [default: 100].")
@click.option("--alpha", type=float, default=None, metavar="ALPHA",
              help="--method smoothing: failure probability of each sample's certificate [default: 0.001].")
@seed_option("Seed of PGD's random starts (and of the smoothing noise).")
def command(model: str, data: str, json_out: str | None, **kw: Any) -> int:
    """Certify MODEL on a dataset: clean, PGD and certified accuracy for each norm.

    \b
    certonnx certify model.onnx --data mnist.npz --n 1000 --norm linf:0.1,l2:0.5
    certonnx certify model.onnx --data mnist.npz --norm linf:0.1 --radius --plot curve.png
    certonnx certify model.onnx --data mnist.npz --norm linf:0.1 -o certified.onnx --json result.json

    ε is measured in the model's raw input space (pixels in [0, 1]). If the ONNX file
    normalizes inside, ε is still in pixel space; if it expects normalized input, pass
    --mean/--std so certonnx prepends the normalization (ε again in pixel space).
    Per sample and norm: verified (proven robust), falsified (an attack found a
    misclassified point, confirmed by onnxruntime) or unknown.

    --method smoothing certifies the smoothed classifier instead (randomized smoothing,
    Cohen et al. 2019): a probabilistic claim, reported and stored apart from the others.
    """
    from certonnx import api

    console, err = consoles(json_out)
    with usage_errors():
        kw["smoothing"] = _smoothing_options(kw)
        res = api.certify(model, data, progress=True, echo=stderr_echo(err), extra_outputs={"--json": json_out},
                          **kw)
    if res["method"] == "smoothing":
        _smoothing_table(console, res, model)
    else:
        _table(console, res, model)
    write_json(json_out, res)
    return 0


def _smoothing_options(kw: dict[str, Any]) -> Any:
    """The smoothing flags as :class:`~certonnx.certify.smoothing.SmoothingOptions` (None when
    none is given), popped from ``kw``."""
    given = {k: kw.pop(f) for k, f in (("sigma", "sigma"), ("n", "noise_samples"), ("n0", "selection_samples"),
                                       ("alpha", "alpha"))}
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return None
    from certonnx.certify.smoothing import SmoothingOptions

    return SmoothingOptions(**given, batch=max(1, int(kw.get("batch_size") or 128)) * 8)


def _smoothing_table(console: Any, res: dict[str, Any], model: str) -> None:
    from rich.table import Table

    s = res["smoothing"]
    t = Table(title=f"certonnx certify {Path(model).name}: {res['n']} samples, randomized smoothing "
                    f"(σ {s['sigma']:g}, n0 {s['n0']}, n {s['n']}, α {s['alpha']:g})")
    for col in ("norm", "ε", "L2 radius needed", "smoothed accuracy", "certified (probabilistic)"):
        t.add_column(col, justify="right" if col != "norm" else "left")
    for norm, eps in res["epsilon"].items():
        t.add_row(norm, f"{eps:g}", f"{s['l2_equivalent'][norm]:.4g}", f"{s['accuracy']:.2%}",
                  f"{s['certified_accuracy'][norm]:.2%}")
    if len(res["epsilon"]) > 1:
        t.add_row("all at once", "", "", "", f"{s['union_certified_accuracy']:.2%}")
    console.print(t)
    console.print(f"model itself (no noise): clean accuracy {res['clean_accuracy']:.2%}; the smoothed classifier "
                  f"abstained on {s['abstained']} sample(s); mean certified L2 radius {s['mean_radius_l2']:.4g}; "
                  f"votes from {s['votes_from']}.")
    console.print(f"The certificate is {s['meaning']}.")
    console.print(f"ε is measured in {res['input_space']['description']}.")
    console.print(f"{res['seconds']:.1f}s" + (f"; model with certificate written to {res['output']}"
                                               if "output" in res else ""))


def _table(console: Any, res: dict[str, Any], model: str) -> None:
    from rich.table import Table

    t = Table(title=f"certonnx certify {Path(model).name}: {res['n']} samples, method {res['method']}")
    t.add_column("norm")
    t.add_column("ε", justify="right")
    t.add_column("clean", justify="right")
    t.add_column("PGD", justify="right")
    t.add_column("certified", justify="right")
    t.add_column("verified / falsified / unknown", justify="right")
    if "radius" in res:
        t.add_column("ACR", justify="right")
    for norm, eps in res["epsilon"].items():
        sc = res["status_counts"][norm]
        row = [norm, f"{eps:g}", f"{res['clean_accuracy']:.2%}", f"{res['pgd_accuracy'][norm]:.2%}",
               f"{res['certified_accuracy'][norm]:.2%}", f"{sc['verified']} / {sc['falsified']} / {sc['unknown']}"]
        if "radius" in res:
            row.append(f"{res['radius'][norm]['acr']:.4g}")
        t.add_row(*row)
    if len(res["epsilon"]) > 1:
        t.add_row("all at once", "", "", "", f"{res['union_certified_accuracy']:.2%}", "")
    console.print(t)
    console.print(f"ε is measured in {res['input_space']['description']}.")
    if res.get("head"):
        console.print(f"head: {res['head']}; a sample counts as certified only when its logit margin also "
                      "survives the head's float32 rounding.")
    dis = sum(res["ort_disagreements"].values())
    if dis:
        console.print(f"[yellow]{dis} PGD counterexample(s) not confirmed by onnxruntime: counted as unknown.[/]")
    auto = res.get("auto")
    if auto:
        skip = {m: sum(v.get(m, 0) for v in auto["skipped"].values()) for m in ("crown", "alpha-crown")}
        if any(skip.values()):
            said = ", ".join(f"{m} on {k}" for m, k in skip.items() if k)
            console.print(f"auto: skipped {said} open sample·norm pair(s), over the work budget "
                          f"({auto['budget']:g} × crown-ibp); --auto-budget inf runs the whole cascade.")
    cut = res.get("timeout")
    if cut and cut["reached"]:
        console.print(f"[yellow]timeout:[/] the bound methods did not finish for {cut['cut_short']} "
                      "sample·norm pair(s) (reported unknown).")
    if "backend" in res:
        console.print(f"[yellow]bounds by auto_LiRPA {res['backend']['version']}:[/] {res['backend']['note']}.")
    if "cross_check" in res:
        xc = res["cross_check"]
        parts = []
        for k, v in xc.items():
            if v["informational"]:
                parts.append(f"{k}: {v['pairs']} compared only (see docs/certify.md), {v['disagreements']} "
                             f"tighter than auto_LiRPA's, at most {v['max_looser']:.3g} looser")
            else:
                parts.append(f"{k}: {v['pairs']} checked, none tighter than auto_LiRPA's, at most "
                             f"{v['max_looser']:.3g} looser")
        console.print("cross-check with auto_LiRPA (margin lower bounds): " + "; ".join(parts) + ".")
    from rich.markup import escape

    for w in res.get("warnings", []):
        console.print(f"[yellow]warning:[/] {escape(w)}")
    console.print(f"{res['seconds']:.1f}s" + (f"; model with certificate written to {res['output']}"
                                               if "output" in res else ""))
