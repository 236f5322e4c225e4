"""``certonnx certify MODEL --data FILE.npz --norm linf:0.1,l2:0.5``: certified accuracy.

Reports clean, PGD and certified accuracy per norm (and for all norms at once), says what ε
means for this model (raw input space, normalization inside or declared), and can write the
numbers as JSON, a radius curve as PNG, and a copy of the model carrying the certificate.
Every output path is checked before any work starts; the input model is never written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from certonnx.commands.options import check_outputs, floats_option, norms_option
from certonnx.errors import CertonnxError
from certonnx.utils import atomic_write_bytes

_norms = norms_option
_floats = floats_option


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


def _eps_max(value: str | None, norms: dict[str, float]) -> dict[str, float]:
    """``--eps-max``: one number for every norm, or ``linf:0.3,l2:2``; default 2 × ε (or 0.1)."""
    from certonnx.certify.core import parse_norms

    if value is None:
        return {k: (2 * v if v > 0 else 0.1) for k, v in norms.items()}
    try:
        v = float(value)
        out = {k: v for k in norms}
    except ValueError:
        try:
            out = {**{k: 2 * e for k, e in norms.items()}, **parse_norms(value)}
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--eps-max'") from None
    if any(not (x > 0) for x in out.values()):
        raise click.BadParameter("must be positive", param_hint="'--eps-max'")
    return out


@click.command("certify")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False),
              help="Dataset .npz with x_<split>/y_<split> (or x/y); uint8 pixels or floats in [0, 1].")
@click.option("--split", default="test", show_default=True, help="Which split of the .npz to use.")
@click.option("--n", "n", type=click.IntRange(min=1), default=None, help="Use the first N samples only.")
@click.option("--norm", "norms", required=True, callback=_norms, metavar="NORM:EPS[,NORM:EPS]",
              help="Perturbation radii in raw input space, e.g. linf:0.1,l2:0.5 (norms: linf/inf, l2).")
@click.option("--method", type=click.Choice(["auto", "ibp", "crown-ibp", "crown", "alpha-crown", "lipschitz"],
              case_sensitive=False), default="auto", show_default=True,
              help="Bound method; auto = ibp -> crown-ibp -> crown -> alpha-crown, each only on samples still open.")
@click.option("--json", "json_out", default=None, metavar="OUT",
              help="Write the result as JSON to OUT ('-' = stdout; the table then goes to stderr).")
@click.option("--radius", is_flag=True, help="Also compute per-sample certified radii, ACR and the ε curve.")
@click.option("--eps-max", default=None, metavar="EPS|NORM:EPS,...",
              help="Upper end of the radius search (default 2 × ε per norm).")
@click.option("--plot", default=None, metavar="OUT.png", help="Plot certified accuracy vs ε (implies --radius).")
@click.option("-o", "--output", default=None, metavar="CERTIFIED.onnx",
              help="Write a copy of the model with the certificate in its metadata (never the input file).")
@click.option("--mean", callback=_floats, default=None, metavar="M[,M,...]",
              help="Per-channel mean, when MODEL expects normalized input (ε stays in pixel space).")
@click.option("--std", callback=_floats, default=None, metavar="S[,S,...]", help="Per-channel std (with --mean).")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Samples per bound/attack batch (memory use grows with it).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--max-memory", callback=_memory, default=None, metavar="SIZE",
              help="Memory budget per batch (e.g. 4G); methods over it fall back to cheaper ones, with a warning.")
@click.option("--pgd-steps", type=click.IntRange(min=0), default=20, show_default=True, help="PGD steps per restart.")
@click.option("--pgd-restarts", type=click.IntRange(min=1), default=1, show_default=True, help="PGD restarts.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Seed of PGD's random starts.")
def command(model: str, data: str, split: str, n: int | None, norms: dict[str, float], method: str,
            json_out: str | None, radius: bool, eps_max: str | None, plot: str | None, output: str | None,
            mean: list[float] | None, std: list[float] | None, batch_size: int, device: str,
            max_memory: int | None, pgd_steps: int, pgd_restarts: int, seed: int) -> int:
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
    """
    import torch

    import certonnx
    from certonnx.data import as_stored, check_against_model, load_npz
    from certonnx.utils import resolve_device

    if (mean is None) != (std is None):
        raise click.BadParameter("--mean and --std must be given together", param_hint="'--mean/--std'")
    if plot is not None:
        radius = True
    # every output path is checked before any work
    check_outputs({"model": model, "--data": data}, {"--json": json_out, "--plot": plot, "-o": output})
    if output == "-":
        raise click.BadParameter("cannot write the model to stdout", param_hint="'-o'")
    eps_max_d = _eps_max(eps_max, norms) if radius else {}
    if not Path(data).is_file():  # fail before the (slow) model import
        from certonnx.errors import DataError

        raise DataError(f"data file not found: {data}" if not Path(data).exists() else f"data path is not a file: {data}")
    dev = resolve_device(device)
    torch.manual_seed(seed)

    cm = certonnx.load(model)
    if mean is not None and std is not None:
        if cm.normalization is not None and cm.normalization.inside:
            raise CertonnxError(
                f"the model already normalizes its input inside ({cm.normalization.describe()}); drop --mean/--std"
            )
        from certonnx.io.normalization import prepend_normalization

        cm = prepend_normalization(cm, mean, std)
    x, y, info = load_npz(data, split, n, mean=mean, std=std, num_classes=cm.num_classes)
    stored = as_stored(x, info)  # what onnxruntime is fed by the clean-prediction guard
    x, note = check_against_model(x, cm.sample_shape, info)

    from rich.console import Console

    to_stdout_json = json_out == "-"
    console = Console(stderr=to_stdout_json)
    err = Console(stderr=True)
    if note:
        err.print(f"[yellow]note:[/] {note}")

    from certonnx.certify.core import certify_dataset

    if method.lower() == "lipschitz":
        # margin / (Lipschitz constant): cheap and sound, usually loose except for Lipschitz-trained models
        from certonnx.certify.lipschitz_cert import certify_lipschitz

        res = certify_lipschitz(cm, x, y, norms, batch_size=batch_size, pgd_steps=pgd_steps,
                                pgd_restarts=pgd_restarts, device=dev, seed=seed, onnx_path=model,
                                ort_inputs=stored)
    else:
        res = certify_dataset(cm, x, y, norms, method.lower(), batch_size=batch_size, pgd_steps=pgd_steps,
                              pgd_restarts=pgd_restarts, device=dev, progress=True, onnx_path=model,
                              max_memory=max_memory, seed=seed, ort_inputs=stored)
    res["data"] = {"path": str(data), "split": split, "sha256": info["sha256"], "layout": info["layout"],
                   "scale": info["scale"], **({"reshaped": note} if note else {})}
    res["model"] = str(model)

    if radius and method.lower() == "lipschitz":
        from certonnx.bounds import BoundedModule
        from certonnx.certify.lipschitz_cert import lipschitz_radii
        from certonnx.certify.radius import radius_summary

        bm = BoundedModule(cm.module, cm.sample_shape)
        res["radius"] = {"method": "lipschitz"}
        with torch.no_grad():
            correct = torch.cat([cm.module(x[i:i + batch_size].to(dev)).flatten(1).argmax(1).cpu()
                                 for i in range(0, x.shape[0], batch_size)]) == y
        for norm in norms:
            r = lipschitz_radii(bm, x, y, norm, batch_size=batch_size, device=dev)
            res["radius"][norm] = {"eps_max": eps_max_d[norm],
                                   **radius_summary(r.clamp(max=eps_max_d[norm]), eps_max_d[norm], correct=correct)}
        if plot is not None:
            from certonnx.certify.radius import plot_curves

            plot_curves({k: (v["curve"]["eps"], v["curve"]["accuracy"]) for k, v in res["radius"].items()
                         if isinstance(v, dict)}, plot, title=f"certified accuracy (Lipschitz): {Path(model).name}")
    elif radius:
        from certonnx.bounds import BoundedModule
        from certonnx.certify.radius import certified_radius, plot_curves, radius_summary

        bm = BoundedModule(cm.module, cm.sample_shape)
        rmeth = "crown" if method.lower() == "auto" else method.lower()
        res["radius"] = {"method": rmeth}
        for p in cm.module.parameters():
            p.requires_grad_(False)
        xs = x.to(dev)
        with torch.no_grad():
            correct = torch.cat([cm.module(xs[i:i + batch_size]).flatten(1).argmax(1).cpu()
                                 for i in range(0, xs.shape[0], batch_size)]) == y
        for norm in norms:
            r = certified_radius(bm, xs, y.to(dev), norm, eps_max_d[norm], rmeth, domain=tuple(cm.domain),
                                 batch_size=batch_size, num_classes=cm.num_classes).cpu()
            res["radius"][norm] = {"eps_max": eps_max_d[norm], **radius_summary(r, eps_max_d[norm], correct=correct)}
        if plot is not None:
            plot_curves({k: (v["curve"]["eps"], v["curve"]["accuracy"]) for k, v in res["radius"].items()
                         if isinstance(v, dict)}, plot, title=f"certified accuracy: {Path(model).name}")

    if output is not None:
        from certonnx.io.metadata import certificate_from_result

        cert = certificate_from_result(
            res, dataset_sha256=info["sha256"],
            verifier=f"certonnx certify ({res['method']}; counterexamples checked with {res['falsification_check']})",
            extra={"data": res["data"], "per_method": res["per_method"], "status_counts": res["status_counts"]},
        )
        certonnx.export(cm, output, certificate=cert)
        res["output"] = str(output)

    _table(console, res, model)
    if json_out is not None:
        text = json.dumps(res, indent=2, sort_keys=False)
        if to_stdout_json:
            click.echo(text)
        else:
            atomic_write_bytes(json_out, (text + "\n").encode())
    return 0


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
    dis = sum(res["ort_disagreements"].values())
    if dis:
        console.print(f"[yellow]{dis} PGD counterexample(s) not confirmed by onnxruntime: counted as unknown.[/]")
    for w in res.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    console.print(f"{res['seconds']:.1f}s" + (f"; model with certificate written to {res['output']}"
                                               if "output" in res else ""))
