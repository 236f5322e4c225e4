"""``certonnx finetune [MODEL.onnx] --data FILE.npz --norm linf:0.1 --method sabr -o OUT.onnx``.

Certified training of an imported ONNX model (fine-tuning) or of a built-in architecture from
scratch (``--arch``), then certification on the test split and export to ONNX with the
certificate in its metadata. Everything that can fail cheaply (paths, flags, data shape, ops
without bound rules) is checked before the first training step. See docs/finetune.md.
"""

from __future__ import annotations

from typing import Any

import click

from certonnx.commands.options import (
    MethodOptionsCommand,
    bound_method_option,
    consoles,
    device_option,
    json_file_option,
    mean_std_options,
    method_flag_options,
    method_options,
    norms_option,
    pop_method_flags,
    seed_option,
    stderr_echo,
    usage_errors,
    write_json,
)


def _norms(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, float] | str | None:
    """``linf:0.1,l2:0.5`` -> a dict; ``linf,l2`` (radii left out) stays text, filled from the
    data's shape by :func:`certonnx.api.finetune` (after the norm names are checked here)."""
    if value is None:
        return None
    from certonnx.certify.norms import canonical_norm

    parts = [p.strip() for p in value.split(",") if p.strip()]
    if parts and all(":" in p for p in parts):
        return norms_option(ctx, param, value)
    try:
        for p in parts:
            canonical_norm(p.split(":")[0])
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return value


def _ints(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated epochs, e.g. 50,60", ctx=ctx,
                                 param=param) from None


def _method(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from certonnx.train.methods import REGISTRY

    key = value.lower().replace("_", "-")
    if key not in REGISTRY:
        raise click.BadParameter(f"{value!r} is not one of {', '.join(REGISTRY)}", ctx=ctx, param=param)
    return key


@click.command("finetune", cls=MethodOptionsCommand)
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--data", required=True, metavar="DATA",
              help="Training split 'train', certification split 'test': an .npz with x_train/y_train and "
                   "x_test/y_test, X.npy,Y.npy, a folder of x_<split>.npy, an image folder (train/ and test/ "
                   "of class subfolders), MNIST idx or CIFAR batches (docs/certify.md).")
@click.option("--norm", "norms", required=True, callback=_norms, metavar="NORM:EPS[,NORM:EPS]",
              help="Target radii in raw input space, e.g. linf:0.1 or linf:8/255 (several norms train for all "
                   "of them).")
@click.option("--method", callback=_method, default="ibp", show_default=True, metavar="METHOD",
              help="Training method: any registered in certonnx.train.methods, listed with their options below "
                   "(see docs/finetune.md for the papers).")
@click.option("--arch", type=click.Choice(["mlp", "cnn3", "cnn7"]), default=None,
              help="Train this architecture from scratch instead of fine-tuning MODEL.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Training epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Global batch size (split over processes under torchrun).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate [default: 1e-3, from scratch and fine-tuning].")
@click.option("--optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True)
@click.option("--lr-schedule", type=click.Choice(["step", "cosine", "constant"]), default="step",
              show_default=True, help="step: ×--lr-decay after each --lr-milestones epoch.")
@click.option("--lr-milestones", callback=_ints, default=None, metavar="E[,E]",
              help="Epochs after which the LR decays [default: the last two epochs after the ramp].")
@click.option("--lr-decay", type=float, default=0.2, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--warmup-epochs", type=click.IntRange(min=0), default=None,
              help="Epochs with ε = 0 before the ramp [default: 1 from scratch, 0 fine-tuning].")
@click.option("--ramp-epochs", type=click.IntRange(min=0), default=None,
              help="Epochs over which ε grows to its target [default: half of the remaining epochs].")
@click.option("--eps-schedule", type=click.Choice(["smooth", "linear"]), default="smooth", show_default=True,
              help="smooth: Shi et al. 2021 (polynomial, then linear); linear.")
@click.option("--grad-clip", type=float, default=10.0, show_default=True, help="Gradient-norm clipping (0: off).")
@method_flag_options()
@click.option("--radii", type=click.Choice(["small", "large"]), default="small", show_default=True,
              help="Default radii for norms given without one (--norm linf,l2), per dataset shape: "
                   "MNIST small linf 0.1 / l2 0.75, large 0.3 / 1.0; CIFAR 2/255 / 0.25, 8/255 / 0.5 (CURE).")
@click.option("--eval-radius/--no-eval-radius", default=None,
              help="Also compute per-sample certified radii (bisection up to 2ε, bound method --eval-method, "
                   "crown-ibp for auto) and the average certified radius (ACR) on the test split and store them in "
                   "the certificate [default: on for acert].")
@click.option("--method-opt", "method_opts", multiple=True, metavar="KEY=VALUE",
              help="Option of the method (repeatable; keys, defaults and accepted values listed below), e.g. "
                   "--method-opt beta_end=0.2. Overrides the dedicated flags above; an unknown key is an error.")
@click.option("--init", "init", type=click.Choice(["ibp", "default"]), default="ibp", show_default=True,
              help="--arch only: Shi et al. IBP initialisation or PyTorch's default.")
@click.option("--regularize/--no-regularize", default=None,
              help="Shi et al. tightness + ReLU-balance regularisers in the ramp [default: on].")
@click.option("-o", "--output", default=None, metavar="OUT.onnx",
              help="Output model [default: <MODEL>_<method>.onnx, or <arch>_<method>.onnx].")
@click.option("--checkpoint-dir", default=None, metavar="DIR",
              help="Checkpoint after every epoch here [default: <OUT>.ckpt].")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir, if any.")
@click.option("--keep-checkpoints", is_flag=True,
              help="Keep the checkpoint folder after a successful run (it is always kept when a run fails or "
                   "is interrupted, for --resume).")
@click.option("--log-json", default=None, metavar="FILE", help="Per-epoch training log as JSON.")
@click.option("--n-train", type=click.IntRange(min=1), default=None, help="Train on the first N samples only.")
@click.option("--eval-n", type=click.IntRange(min=0), default=None,
              help="Certify on the first N test samples [default: all]; 0 skips evaluation.")
@bound_method_option("--eval-method", before=("auto",), default="auto",
                     help="Bound method for the final certification.")
@click.option("--accept-worse", is_flag=True,
              help="Write OUTPUT even when the result is no improvement on the input model (see --max-clean-drop).")
@click.option("--max-clean-drop", type=click.FloatRange(min=0), default=None, metavar="POINTS",
              help="Also reject a result whose clean accuracy fell more than POINTS [default: no limit].")
@device_option()
@seed_option("Seed of data order, init and attacks.")
@mean_std_options("Per-channel mean when MODEL expects normalized input (ε stays in pixel space).")
@json_file_option()
def command(model: str | None, data: str, method: str, method_opts: tuple[str, ...], json_out: str | None,
            **kw: Any) -> int:
    """Certified fine-tuning of MODEL (or training --arch from scratch), certification, export.

    \b
    certonnx finetune model.onnx --data mnist.npz --norm linf:0.1 --method sabr --epochs 5 -o robust.onnx
    certonnx finetune --arch cnn3 --data mnist.npz --norm linf:0.1 --method ibp --epochs 20 -o cnn3.onnx
    torchrun --nproc_per_node 2 -m certonnx finetune model.onnx --data mnist.npz --norm linf:0.1
    certonnx finetune model.onnx --data mnist.npz --norm linf:0.1 --resume   # after an interruption

    ε is measured in raw input space (pixels in [0, 1]). The output ONNX carries the test-set
    certificate (clean / PGD / certified accuracy) in its metadata. A fine-tuned model that is
    no improvement on the input (certified accuracy not higher, or collapsed) goes to
    OUTPUT.rejected.onnx, leaving OUTPUT alone, and the exit code is 1 (--accept-worse).
    """
    from certonnx import api

    options = method_options(method, pop_method_flags(kw), method_opts)
    console, err = consoles(json_out)
    with usage_errors():
        _, res = api.finetune(model, data, method=method, options=options, progress=True,
                              echo=stderr_echo(err, highlight=False, soft_wrap=True),  # one line per message in CI logs
                              extra_outputs={"--json": json_out}, **kw)
    if res is None:  # not rank 0 under torchrun: rank 0 reports
        return 0
    _table(console, res)
    write_json(json_out, res, default=str)
    verdict = res.get("verdict", {})
    if not verdict.get("accepted", True):  # one error line, after the table: the run failed its gate
        err.print(f"error: not an improvement ({'; '.join(verdict['reasons'])}); written to {res['output']}, "
                  f"{kw.get('output') or 'the output'} left as it was (--accept-worse to keep it)",
                  soft_wrap=True, highlight=False, markup=False)
        return 1
    return 0


def _table(console: Any, res: dict[str, Any]) -> None:
    from rich.table import Table

    log = res["training"]["log"]
    src = res["model"] or f"--arch {res['arch']}"
    t = Table(title=f"certonnx finetune {src}: {res['method']}, {len(log)} epochs")
    t.add_column("")
    t.add_column("clean", justify="right")
    for norm, eps in res["norms"].items():
        t.add_column(f"PGD {norm} {eps:g}", justify="right")
        t.add_column(f"certified {norm} {eps:g}", justify="right")
    if log:
        last = log[-1]
        cert = "-" if last["cert_acc"] is None else f"{last['cert_acc']:.2%}"
        row = ["train (last epoch, batch bounds)", f"{last['clean_acc']:.2%}"]
        for _ in res["norms"]:
            row += ["", cert]
        t.add_row(*row)
    for key, label in (("before", "input model ({n} test samples, {method})"),
                       ("evaluation", "test ({n} samples, {method})")):
        ev = res.get(key)
        if ev:
            row = [label.format(n=ev["n"], method=ev["method"]), f"{ev['clean_accuracy']:.2%}"]
            for norm in res["norms"]:
                row += [f"{ev['pgd_accuracy'][norm]:.2%}", f"{ev['certified_accuracy'][norm]:.2%}"]
            t.add_row(*row)
    console.print(t)
    per_epoch = [e["seconds"] for e in log]
    timing = f"{sum(per_epoch) / len(per_epoch):.1f}s per epoch; " if per_epoch else ""
    written = ("model with certificate written to" if res.get("certified", True)
               else "model written without a certificate (--eval-n 0) to")
    console.print(f"{timing}total {res['seconds']:.1f}s; {written} {res['output']}")

    if res.get("checkpoint_dir"):
        console.print(f"checkpoints kept in {res['checkpoint_dir']}")
