"""``certonnx finetune [MODEL.onnx] --data FILE.npz --norm linf:0.1 --method sabr -o OUT.onnx``.

Certified training of an imported ONNX model (fine-tuning) or of a built-in architecture from
scratch (``--arch``), then certification on the test split and export to ONNX with the
certificate in its metadata. Everything that can fail cheaply (paths, flags, data shape, ops
without bound rules) is checked before the first training step. See docs/finetune.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from certonnx.commands.options import check_outputs, floats_option, norms_option
from certonnx.errors import CertonnxError
from certonnx.utils import atomic_write_bytes, check_writable

METHOD_CHOICES = ["standard", "pgd", "ibp", "crown-ibp", "sabr", "mtl-ibp"]


def _norms(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, float] | str | None:
    if value is None:
        return None
    from certonnx.certify.core import canonical_norm

    parts = [p.strip() for p in value.split(",") if p.strip()]
    if parts and all(":" in p for p in parts):
        return norms_option(ctx, param, value)
    try:
        # radii left out (e.g. --norm linf,l2): filled from the data's shape later
        for p in parts:
            canonical_norm(p.split(":")[0])
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return value


_floats = floats_option


def _ints(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated epochs, e.g. 50,60", ctx=ctx,
                                 param=param) from None


def _parse_opts(items: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values become int, float or bool where they look like one."""
    out: dict[str, Any] = {}
    for it in items:
        key, sep, val = it.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{it!r}: expected KEY=VALUE", param_hint="'--method-opt'")
        v: Any = val.strip()
        if v.lower() in ("true", "false"):
            v = v.lower() == "true"
        else:
            for conv in (int, float):
                try:
                    v = conv(v)
                    break
                except ValueError:
                    pass
        out[key.strip().replace("-", "_")] = v
    return out


def _method(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from certonnx.train.methods import REGISTRY

    key = value.lower().replace("_", "-")
    if key not in REGISTRY:
        raise click.BadParameter(f"{value!r} is not one of {', '.join(REGISTRY)}", ctx=ctx, param=param)
    return key


@click.command("finetune")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="Dataset .npz with x_train/y_train (training) and x_test/y_test (certification).")
@click.option("--norm", "norms", required=True, callback=_norms, metavar="NORM:EPS[,NORM:EPS]",
              help="Target radii in raw input space, e.g. linf:0.1 (several norms train for all of them).")
@click.option("--method", callback=_method, default="ibp", show_default=True, metavar="METHOD",
              help=f"Training method: {', '.join(METHOD_CHOICES)} or any other registered in "
                   "certonnx.train.methods (see docs/finetune.md for the papers).")
@click.option("--arch", type=click.Choice(["mlp", "cnn3", "cnn7"]), default=None,
              help="Train this architecture from scratch instead of fine-tuning MODEL.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Training epochs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="Global batch size (split over processes under torchrun).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate [default: 1e-3 from scratch, 2e-4 fine-tuning].")
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
@click.option("--kappa-end", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="ibp/crown-ibp: final weight of the clean loss (κ goes 1 → this over the ramp).")
@click.option("--sabr-lambda", type=click.FloatRange(0, 1, min_open=True), default=0.4, show_default=True,
              help="sabr: size of the propagated box relative to ε.")
@click.option("--mtl-alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="mtl-ibp: weight of the adversarial loss.")
@click.option("--pgd-steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="PGD steps of the training attack (pgd, sabr, mtl-ibp).")
@click.option("--radii", type=click.Choice(["small", "large"]), default="small", show_default=True,
              help="Default radii for norms given without one (--norm linf,l2), per dataset shape: "
                   "MNIST small linf 0.1 / l2 0.75, large 0.3 / 1.0; CIFAR 2/255 / 0.25, 8/255 / 0.5 (CURE).")
@click.option("--gls-estimator", type=click.Choice(["pgpe", "rgs"]), default=None,
              help="gls: zeroth-order PGPE or randomized gradient smoothing (see docs/gls.md).")
@click.option("--relaxation", type=click.Choice(["ibp", "crown-ibp", "crown", "alpha-crown"]), default=None,
              help="Bound relaxation the method trains on (gls; acert uses ibp or crown-ibp).")
@click.option("--eval-radius/--no-eval-radius", default=None,
              help="Also compute per-sample certified radii and the average certified radius (ACR) on the "
                   "test split and store them in the certificate [default: on for acert].")
@click.option("--method-opt", "method_opts", multiple=True, metavar="KEY=VALUE",
              help="Extra option for the method (repeatable), e.g. --method-opt beta_end=0.2; numbers are "
                   "parsed as numbers. Overrides the dedicated flags above.")
@click.option("--init", "init", type=click.Choice(["ibp", "default"]), default="ibp", show_default=True,
              help="--arch only: Shi et al. IBP initialisation or PyTorch's default.")
@click.option("--regularize/--no-regularize", default=None,
              help="Shi et al. tightness + ReLU-balance regularisers in the ramp [default: on with --arch].")
@click.option("-o", "--output", default=None, metavar="OUT.onnx",
              help="Output model [default: <MODEL>_<method>.onnx, or <arch>_<method>.onnx].")
@click.option("--checkpoint-dir", default=None, metavar="DIR",
              help="Checkpoint after every epoch here [default: <OUT>.ckpt].")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --checkpoint-dir, if any.")
@click.option("--log-json", default=None, metavar="FILE", help="Per-epoch training log as JSON.")
@click.option("--n-train", type=click.IntRange(min=1), default=None, help="Train on the first N samples only.")
@click.option("--eval-n", type=click.IntRange(min=0), default=None,
              help="Certify on the first N test samples [default: all]; 0 skips evaluation.")
@click.option("--eval-method", type=click.Choice(["auto", "ibp", "crown-ibp", "crown", "alpha-crown"]),
              default="auto", show_default=True, help="Bound method for the final certification.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, show_default=True, help="Seed of data order, init and attacks.")
@click.option("--mean", callback=_floats, default=None, metavar="M[,M,...]",
              help="Per-channel mean when MODEL expects normalized input (ε stays in pixel space).")
@click.option("--std", callback=_floats, default=None, metavar="S[,S,...]", help="Per-channel std (with --mean).")
@click.option("--json", "json_out", default=None, metavar="OUT", help="Write the result as JSON ('-' = stdout).")
def command(model: str | None, data: str, norms: dict[str, float], method: str, arch: str | None, epochs: int,
            batch_size: int, lr: float | None, optimizer: str, lr_schedule: str, lr_milestones: list[int] | None,
            lr_decay: float, weight_decay: float, warmup_epochs: int | None, ramp_epochs: int | None,
            eps_schedule: str, grad_clip: float, kappa_end: float, sabr_lambda: float, mtl_alpha: float,
            pgd_steps: int, radii: str, gls_estimator: str | None, relaxation: str | None,
            eval_radius: bool | None, method_opts: tuple[str, ...], init: str, regularize: bool | None, output: str | None, checkpoint_dir: str | None,
            resume: bool, log_json: str | None, n_train: int | None, eval_n: int | None, eval_method: str,
            device: str, seed: int, mean: list[float] | None, std: list[float] | None,
            json_out: str | None) -> int:
    """Certified fine-tuning of MODEL (or training --arch from scratch), certification, export.

    \b
    certonnx finetune model.onnx --data mnist.npz --norm linf:0.1 --method sabr --epochs 5 -o robust.onnx
    certonnx finetune --arch cnn3 --data mnist.npz --norm linf:0.1 --method ibp --epochs 20 -o cnn3.onnx
    torchrun --nproc_per_node 2 -m certonnx finetune model.onnx --data mnist.npz --norm linf:0.1
    certonnx finetune model.onnx --data mnist.npz --norm linf:0.1 --resume   # after an interruption

    ε is measured in raw input space (pixels in [0, 1]). The output ONNX carries the test-set
    certificate (clean / PGD / certified accuracy) in its metadata.
    """
    import torch

    import certonnx
    from certonnx.data import as_stored, check_against_model, load_npz
    from certonnx.train import TrainConfig, Trainer
    from certonnx.train import distributed as D
    from certonnx.utils import resolve_device

    t_start = time.monotonic()
    method = method.lower()
    if (model is None) == (arch is None):
        raise click.UsageError("give either MODEL.onnx (fine-tuning) or --arch (training from scratch)")
    if (mean is None) != (std is None):
        raise click.BadParameter("--mean and --std must be given together", param_hint="'--mean/--std'")
    if arch is not None and mean is not None:
        raise click.BadParameter("--mean/--std describe an imported MODEL's input; not used with --arch",
                                 param_hint="'--mean/--std'")
    scratch = arch is not None
    lr = lr if lr is not None else (1e-3 if scratch else 2e-4)
    warmup = warmup_epochs if warmup_epochs is not None else (1 if scratch and epochs > 2 else 0)
    # fine-tuning a normally trained model needs a long ramp (a short one collapses it, see
    # docs/training.md); from scratch half of the remaining epochs is the CTBench-like choice
    ramp = ramp_epochs if ramp_epochs is not None else (
        max(1, (epochs - warmup) // 2) if scratch else max(1, epochs - warmup - 1))
    if warmup + ramp > epochs:
        raise click.BadParameter(f"--warmup-epochs ({warmup}) + --ramp-epochs ({ramp}) exceed --epochs ({epochs})",
                                 param_hint="'--ramp-epochs'")
    reg = regularize if regularize is not None else scratch

    # -- every output path, before any work ----------------------------------------------------
    if output is None:
        output = (str(Path(model).with_name(f"{Path(model).stem}_{method}.onnx")) if model
                  else f"{arch}_{method}.onnx")
    if output == "-":
        raise click.BadParameter("cannot write the model to stdout", param_hint="'-o'")
    ckdir = Path(checkpoint_dir) if checkpoint_dir else Path(output + ".ckpt")
    check_outputs({"model": model, "--data": data}, {"-o": output, "--json": json_out, "--log-json": log_json})
    if ckdir.exists() and not ckdir.is_dir():
        raise CertonnxError(f"--checkpoint-dir {ckdir} exists and is not a directory")
    check_writable(ckdir / "last.pt" if ckdir.exists() else ckdir)  # (the parent must be writable to create it)

    dev = resolve_device(device)
    rank, world = D.init_from_env(dev)
    from rich.console import Console

    to_stdout_json = json_out == "-"
    console = Console(stderr=to_stdout_json)
    err = Console(stderr=True)

    def say(msg: str) -> None:
        if rank == 0:
            err.print(msg, highlight=False, soft_wrap=True)  # one log line per message in CI logs

    # -- model ---------------------------------------------------------------------------------
    x, y, info = load_npz(data, "train", n_train, mean=mean, std=std)
    if scratch:
        from certonnx.train.archs import build_model

        num_classes = int(y.max()) + 1 if y.numel() else 10
        num_classes = max(num_classes, 2)
        cm = build_model(arch, tuple(x.shape[1:]), num_classes, init=init, seed=seed)  # type: ignore[arg-type]
    else:
        cm = certonnx.load(model)  # type: ignore[arg-type]
        if mean is not None and std is not None:
            if cm.normalization is not None and cm.normalization.inside:
                raise CertonnxError(f"the model already normalizes its input inside "
                                    f"({cm.normalization.describe()}); drop --mean/--std")
            from certonnx.io.normalization import prepend_normalization

            cm = prepend_normalization(cm, mean, std)
        num_classes = cm.num_classes
        if int(y.max()) >= num_classes:
            from certonnx.errors import DataError

            raise DataError(f"labels go up to {int(y.max())} but the model has {num_classes} outputs")
    stored = as_stored(x, info)
    x, note = check_against_model(x, cm.sample_shape, info)
    if note:
        say(f"[yellow]note:[/] {note}")
    if not scratch:
        # before any training: the imported model on the prepared data must predict what
        # onnxruntime predicts on the original file fed the data as stored (one batch)
        from certonnx.certify.core import clean_prediction_guard

        clean_prediction_guard(cm, x, model, ort_inputs=stored)  # type: ignore[arg-type]
    del stored
    if isinstance(norms, str):
        from certonnx.train.methods.cure import parse_norms_with_defaults

        try:
            norms = parse_norms_with_defaults(norms, cm.sample_shape, radii)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="'--norm'") from None
        say(f"radii for --norm {','.join(norms)} ({radii} setting for inputs {tuple(cm.sample_shape)}): {norms}")
    # unsupported ops fail here, naming the op, before training
    from certonnx.bounds import BoundedModule

    BoundedModule(cm.module, cm.sample_shape)
    xt = yt = None
    if eval_n != 0:
        xt, yt, tinfo = load_npz(data, "test", eval_n, mean=mean, std=std, num_classes=num_classes)
        xt, _ = check_against_model(xt, cm.sample_shape, tinfo)

    for p in cm.module.parameters():
        p.requires_grad_(True)
    cfg = TrainConfig(
        norms=dict(norms), method=method, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
        weight_decay=weight_decay, lr_schedule=lr_schedule, lr_milestones=lr_milestones, lr_decay=lr_decay,
        warmup_epochs=warmup, ramp_epochs=ramp, eps_schedule=eps_schedule, grad_clip=grad_clip, seed=seed,
        regularize=reg, options={"kappa_end": kappa_end, "sabr_lambda": sabr_lambda, "mtl_alpha": mtl_alpha,
                                 "pgd_steps": pgd_steps,
                                 **({"gls_estimator": gls_estimator} if gls_estimator else {}),
                                 **({"gls_relaxation": relaxation, "acert_bounds": relaxation} if relaxation else {}),
                                 **_parse_opts(method_opts)},
        domain=tuple(cm.domain), num_classes=num_classes, checkpoint_dir=str(ckdir), log_json=log_json,
        device=str(dev),
    )
    what = f"{arch} from scratch" if scratch else f"fine-tuning {model}"
    say(f"{what}: {method} on {x.shape[0]} samples, ε {norms} ({warmup} warm-up + {ramp} ramp epochs of "
        f"{epochs}), lr {lr:g}, batch {batch_size}" + (f", {world} processes" if world > 1 else "")
        + f", device {dev}")
    torch.manual_seed(seed)
    trainer = Trainer(cm.module, x, y, cfg, sample_shape=cm.sample_shape, progress=True, echo=say)
    log = trainer.fit(resume=resume)
    trainer.method.finalize(cm.module)  # e.g. SaC folds its shrinkage into plain weights
    t_train = time.monotonic() - t_start
    if rank != 0:
        D.barrier()
        D.cleanup()
        return 0

    # -- certification and export (rank 0) ------------------------------------------------------
    cm.module.eval()
    for p in cm.module.parameters():
        p.requires_grad_(False)
    res: dict[str, Any] = {"model": model, "arch": arch, "method": method, "norms": norms, "output": output,
                           "training": {"config": cfg.to_dict(), "log": log, "seconds": round(t_train, 2),
                                        "processes": world},
                           "data": {"path": str(data), "sha256_train": info["sha256"]}}
    cert = None
    if xt is not None and yt is not None:
        from certonnx.certify.core import certify_dataset
        from certonnx.io.metadata import certificate_from_result

        ev = certify_dataset(cm, xt, yt, norms, eval_method, batch_size=max(batch_size, 128), device=dev,
                             progress=True, seed=seed)
        res["evaluation"] = ev
        res["data"]["sha256_test"] = tinfo["sha256"]
        radius_info: dict[str, Any] = {}
        if eval_radius or (eval_radius is None and method == "acert"):
            from certonnx.bounds import BoundedModule
            from certonnx.certify.radius import certified_radius, radius_summary

            rbm = BoundedModule(cm.module, cm.sample_shape)
            rmeth = "crown-ibp" if eval_method in ("auto", "crown", "alpha-crown") else eval_method
            xd, yd = xt.to(dev), yt.to(dev)
            with torch.no_grad():
                correct = (cm.module(xd).flatten(1).argmax(1) == yd).cpu()
            for norm, eps in norms.items():
                r = certified_radius(rbm, xd, yd, norm, 2 * eps, rmeth, domain=tuple(cm.domain),
                                     batch_size=max(batch_size, 128), num_classes=num_classes).cpu()
                summ = radius_summary(r, 2 * eps, correct=correct)
                radius_info[norm] = {"acr": summ["acr"], "eps_max": 2 * eps, "method": rmeth, "curve": summ["curve"]}
            res["radius"] = radius_info
            say("average certified radius (ACR): " + ", ".join(f"{k} {v['acr']:.4f}" for k, v in radius_info.items()))
        cert = certificate_from_result(
            ev, dataset_sha256=tinfo["sha256"],
            verifier=f"certonnx finetune ({ev['method']} bounds after {method} training)",
            extra={"training": {"method": method, "epochs": epochs, "source": model or f"--arch {arch}",
                                "train_sha256": info["sha256"], "final": log[-1] if log else None},
                   **({"average_certified_radius": {k: v["acr"] for k, v in radius_info.items()},
                       "radius_search": {k: {"eps_max": v["eps_max"], "method": v["method"]}
                                         for k, v in radius_info.items()}} if radius_info else {})},
        )
    certonnx.export(cm, output, certificate=cert)
    res["seconds"] = round(time.monotonic() - t_start, 2)
    _table(console, res)
    if json_out is not None:
        text = json.dumps(res, indent=2, default=str)
        if to_stdout_json:
            click.echo(text)
        else:
            atomic_write_bytes(json_out, (text + "\n").encode())
    D.barrier()
    D.cleanup()
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
    ev = res.get("evaluation")
    if ev:
        row = [f"test ({ev['n']} samples, {ev['method']})", f"{ev['clean_accuracy']:.2%}"]
        for norm in res["norms"]:
            row += [f"{ev['pgd_accuracy'][norm]:.2%}", f"{ev['certified_accuracy'][norm]:.2%}"]
        t.add_row(*row)
    console.print(t)
    per_epoch = [e["seconds"] for e in log]
    if per_epoch:
        console.print(f"{sum(per_epoch) / len(per_epoch):.1f}s per epoch; total {res['seconds']:.1f}s; "
                      f"model with certificate written to {res['output']}")
