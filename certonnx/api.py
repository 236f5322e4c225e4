"""Python API: the pipelines behind ``certonnx certify`` and ``certonnx finetune``.

Each CLI command is a thin adapter over one function here (parse flags, call, print), so a
script gets exactly what the command line gets, without click::

    from certonnx import api

    report = api.certify("model.onnx", "mnist.npz", norms={"linf": 0.1}, n=100)
    model, report = api.finetune("model.onnx", "mnist.npz", norms={"linf": 0.1}, method="sabr",
                                 options={"sabr_lambda": 0.3}, epochs=2, output="robust.onnx")

``certonnx.finetune`` is the same function as :func:`finetune`. :func:`certify` is not
exported as ``certonnx.certify``: that name is the ``certonnx.certify`` subpackage (importing
any of its modules rebinds the attribute), so it stays ``certonnx.api.certify``.

Errors are :class:`~certonnx.errors.CertonnxError` subclasses with one-line messages; a bad
argument is a :class:`~certonnx.errors.ConfigError` naming the CLI flag it corresponds to.
Nothing is printed unless ``echo`` is given (a callable receiving one-line messages);
``progress=True`` shows rich progress bars on stderr.

Radius search (``certify(radius=True)``, ``finetune(eval_radius=True)``): per-sample
certified radii by batched bisection up to ``eps_max`` (default 2 × ε per norm), with the
certification's bound method, where ``auto`` means :data:`RADIUS_AUTO` (CROWN-IBP) in both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from certonnx.errors import CertonnxError, ConfigError

if TYPE_CHECKING:
    import torch

    from certonnx.certify.smoothing import SmoothingOptions
    from certonnx.graph.model import CertModel
    from certonnx.train.methods.options import MethodOptions

Echo = Callable[[str], None]

#: bound method of the radius search when certification runs ``auto``, in ``certify`` and
#: ``finetune`` alike: CROWN-IBP, because the bisection runs ~10 bound passes per sample and
#: full CROWN on a convolutional net costs hundreds of times more per pass (docs/benchmarks.md);
#: ``--method crown`` / ``--eval-method crown`` ask for the tighter radii explicitly
RADIUS_AUTO = "crown-ibp"

ARCHS = ("mlp", "cnn3", "cnn7")


def _quiet(msg: str) -> None:
    pass


def _bound_methods() -> tuple[str, ...]:
    from certonnx.bounds.registry import METHODS

    return tuple(METHODS)


def radius_method(method: str) -> str:
    """The bound method of the radius search for certification ``method``."""
    method = method.lower()
    return RADIUS_AUTO if method == "auto" else method


def default_eps_max(norms: Mapping[str, float]) -> dict[str, float]:
    """Upper end of the radius search: 2 × ε per norm (0.1 for ε = 0)."""
    return {k: (2 * v if v > 0 else 0.1) for k, v in norms.items()}


# -- shared pieces ----------------------------------------------------------------------------------

def _norms(norms: Mapping[str, float] | str) -> dict[str, float]:
    if isinstance(norms, str):
        from certonnx.certify.norms import parse_norms

        try:
            return parse_norms(norms)
        except ValueError as e:
            raise ConfigError(str(e), "--norm") from None
    from certonnx.certify.norms import canonical_norm, parse_eps

    try:
        out: dict[str, float] = {}
        for k, v in norms.items():
            out[canonical_norm(k)] = parse_eps(v if isinstance(v, str) else repr(float(v)))
        return out
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e), "--norm") from None


def _eps_max(value: float | str | Mapping[str, float] | None, norms: dict[str, float]) -> dict[str, float]:
    """One number for every norm, ``{norm: eps}`` or the text ``linf:0.3,l2:2``; default 2 × ε."""
    from certonnx.certify.norms import parse_eps, parse_norms

    if value is None:
        return default_eps_max(norms)
    try:
        if isinstance(value, str):  # "0.3", "8/255" for every norm, or "linf:0.3,l2:2"
            out = ({k: parse_eps(value) for k in norms} if ":" not in value
                   else {**{k: 2 * e for k, e in norms.items()}, **parse_norms(value)})
        elif isinstance(value, Mapping):
            out = {**{k: 2 * e for k, e in norms.items()}, **_norms(value)}
        else:
            out = {k: float(value) for k in norms}
    except (TypeError, ValueError, ConfigError) as e:
        raise ConfigError(str(e), "--eps-max") from None
    if any(not (x > 0) for x in out.values()):
        raise ConfigError("must be positive", "--eps-max")
    return out


def check_eps_range(norms: Mapping[str, float], cm: CertModel, flag: str = "--norm") -> None:
    """ConfigError when an ε is larger than the model's input range (``linf:8`` for pixels in
    [0, 1]: every input in the ball, almost always ``8/255`` meant), see
    :func:`certonnx.certify.norms.eps_range_error`."""
    from certonnx.certify.norms import check_eps_range as check

    try:
        check(norms, tuple(cm.domain), cm.sample_shape)
    except ValueError as e:
        raise ConfigError(str(e), flag) from None


def _check_mean_std(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    if (mean is None) != (std is None):
        raise ConfigError("--mean and --std must be given together", "--mean/--std")


def _with_normalization(cm: CertModel, mean: Sequence[float] | None, std: Sequence[float] | None) -> CertModel:
    """Prepend ``(x - mean) / std`` when the model expects normalized input (ε stays in pixels)."""
    if mean is None or std is None:
        return cm
    if cm.normalization is not None and cm.normalization.inside:
        raise CertonnxError(f"the model already normalizes its input inside "
                            f"({cm.normalization.describe()}); drop --mean/--std")
    from certonnx.io.normalization import prepend_normalization

    return prepend_normalization(cm, list(mean), list(std))


def _correct(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             dev: torch.device) -> torch.Tensor:
    """Clean correctness (N,) bool on the CPU, in batches."""
    import torch

    with torch.no_grad():
        pred = torch.cat([module(x[i:i + batch_size].to(dev)).flatten(1).argmax(1).cpu()
                          for i in range(0, x.shape[0], batch_size)])
    return pred == y.cpu()


def certified_radii(cm: CertModel, x: torch.Tensor, y: torch.Tensor, eps_max: Mapping[str, float], method: str, *,
                    batch_size: int = 128, device: torch.device | str = "cpu") -> dict[str, dict[str, Any]]:
    """``{norm: {"eps_max", "acr", "curve", "radii"}}``: per-sample certified radii in
    ``[0, eps_max]`` of the model (eval mode; ``radii``, in the order of ``x``, 0 where the
    sample is misclassified or nothing is certified), their average (ACR) and the
    certified-accuracy-vs-ε curve.

    ``method`` is a bound method (``auto`` means :data:`RADIUS_AUTO`) searched by batched
    bisection, or ``lipschitz`` (margin / Lipschitz constant, closed form). The one radius
    evaluation behind ``certonnx certify --radius`` and ``certonnx finetune --eval-radius``.
    """
    import torch

    from certonnx.bounds import BoundedModule
    from certonnx.certify.radius import certified_radius, radius_summary
    from certonnx.utils import resolve_device

    dev = resolve_device(device) if isinstance(device, str) else device
    method = radius_method(method)
    bm = BoundedModule(cm.module, cm.sample_shape)
    if method != "lipschitz":
        for p in cm.module.parameters():
            p.requires_grad_(False)
    correct = _correct(cm.module, x, y, batch_size, dev)
    out: dict[str, dict[str, Any]] = {}
    for norm, e in eps_max.items():
        if method == "lipschitz":
            from certonnx.certify.lipschitz_cert import lipschitz_radii

            r = lipschitz_radii(bm, x, y, norm, batch_size=batch_size, device=dev, head=cm.head,
                                domain=cm.domain).clamp(max=e)
        else:
            r = certified_radius(bm, x.to(dev), y.to(dev), norm, e, method, domain=(float(cm.domain[0]), float(cm.domain[1])),
                                 batch_size=batch_size, num_classes=cm.num_classes, head=cm.head).cpu()
        r = torch.where(correct.to(r.device), r, torch.zeros_like(r))
        out[norm] = {"eps_max": e, **radius_summary(r, e, correct=correct), "radii": r.double().tolist()}
    return out


# -- certify --------------------------------------------------------------------------------------

def certify(model: str | Path, data: str | Path, *, norms: Mapping[str, float] | str, method: str = "auto",
            split: str = "test", n: int | None = None, radius: bool = False,
            eps_max: float | str | Mapping[str, float] | None = None, plot: str | None = None,
            output: str | None = None, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            batch_size: int = 128, device: str = "auto", max_memory: int | None = None, pgd_steps: int = 20,
            pgd_restarts: int = 1, seed: int = 0, progress: bool = False, echo: Echo | None = None,
            extra_outputs: Mapping[str, str | None] | None = None, per_sample: bool = False,
            timeout: float | None = None, sample_timeout: float | None = None,
            auto_budget: float | None = None, backend: str = "certonnx",
            cross_check: bool = False, smoothing: SmoothingOptions | None = None) -> dict[str, Any]:
    """Certify the ONNX file ``model`` on ``data`` (an .npz or any form of
    :func:`certonnx.data.load_data`, split ``split``): the ``certonnx certify`` report.

    Per norm: clean, PGD and certified accuracy and per-sample status counts (PGD
    counterexamples are re-checked with onnxruntime on the file). ``radius`` (implied by
    ``plot``) adds ``report["radius"]`` (see :func:`certified_radii`); ``plot`` writes the
    certified-accuracy curve as PNG; ``output`` writes a copy of the model with the certificate
    in its metadata. ``extra_outputs`` (label -> path) are files the caller will write, checked
    with ours before any work (the CLI's ``--json``). ``per_sample`` adds
    ``report["per_sample"]``: each sample's status per norm (verified / falsified / unknown), its
    clean correctness and prediction, in data order (bound methods; not with ``lipschitz``).
    ``timeout``: seconds for the bound passes of the whole run (see
    :func:`certonnx.certify.core.certify_dataset`; the radius search is not limited by it);
    ``sample_timeout``: seconds per sample for the bound passes of each batch. ``auto_budget``
    (``method="auto"`` only; default :data:`~certonnx.certify.core.AUTO_BUDGET`): crown and
    alpha-crown run on a batch only while the estimated work stays within this multiple of a
    crown-ibp run's (``math.inf``: the full cascade). ``backend="auto_lirpa"`` bounds with an
    installed auto_LiRPA on the same imported graph; ``cross_check`` runs it beside certonnx's
    engine and fails where certonnx claims more (:mod:`certonnx.bounds.auto_lirpa`).
    ``method="smoothing"``: randomized smoothing with ``smoothing``'s parameters
    (:mod:`certonnx.certify.smoothing`), a probabilistic certificate about the smoothed
    classifier, reported under ``report["smoothing"]`` and never as a deterministic number.
    """
    import torch

    from certonnx.data import data_inputs
    from certonnx.utils import check_outputs, resolve_device

    model, data, say = str(model), str(data), echo or _quiet
    norms, method = _norms(norms), method.lower()
    choices = ("auto", *_bound_methods(), "lipschitz", "smoothing")
    if method not in choices:
        raise ConfigError(f"{method!r} is not one of {', '.join(choices)}", "--method")
    if smoothing is not None and method != "smoothing":
        raise ConfigError(f"--sigma/--noise-samples/--selection-samples/--alpha apply to --method smoothing "
                          f"(got --method {method})", "--sigma")
    if method == "smoothing":
        _check_smoothing_flags(radius or plot is not None, per_sample, backend, cross_check, timeout,
                               sample_timeout, auto_budget)
        from certonnx.certify.smoothing import SmoothingOptions as _Opts

        smoothing = smoothing or _Opts()
        smoothing.validate()
    if timeout is not None and not timeout > 0:
        raise ConfigError("must be a positive number of seconds", "--timeout")
    if sample_timeout is not None and not sample_timeout > 0:
        raise ConfigError("must be a positive number of seconds", "--sample-timeout")
    backend = backend.lower().replace("-", "_")
    if backend not in ("certonnx", "auto_lirpa"):
        raise ConfigError(f"{backend!r} is not one of certonnx, auto_lirpa", "--backend")
    if backend != "certonnx" or cross_check:
        flag = "--cross-check" if cross_check else "--backend"
        if method == "lipschitz":
            raise ConfigError("needs a bound method (auto_LiRPA has no Lipschitz certificate)", flag)
        if cross_check and backend != "certonnx":
            raise ConfigError("compares certonnx's engine with auto_LiRPA: use it with --backend certonnx",
                              "--cross-check")
        from certonnx.bounds.auto_lirpa import INSTALL_HINT, available

        if available() is None:
            raise ConfigError(INSTALL_HINT, flag)
        if any(k not in ("linf", "l2", "l1") for k in norms):
            raise ConfigError("auto_LiRPA is used for linf, l2 and l1 only", flag)
    if auto_budget is not None:
        if method != "auto":
            raise ConfigError(f"applies to --method auto only (got --method {method})", "--auto-budget")
        if not auto_budget >= 1:  # also NaN
            raise ConfigError("must be at least 1 (a multiple of crown-ibp's work; inf = the whole cascade)",
                              "--auto-budget")
    if per_sample and method == "lipschitz":
        raise ConfigError("needs a bound method (lipschitz gives per-sample radii: use --radius)", "--per-sample")
    _check_mean_std(mean, std)
    radius = radius or plot is not None
    # every output path is checked before any work, and the data's form (before the slow model import)
    check_outputs({"model": model, **data_inputs(data)}, {**(extra_outputs or {}), "--plot": plot, "-o": output})
    if output == "-":
        raise ConfigError("cannot write the model to stdout", "-o")
    eps_max_d = _eps_max(eps_max, norms) if radius else {}
    dev = resolve_device(device)
    torch.manual_seed(seed)

    cm, x, y, info, stored, note = _load_for_certify(model, data, norms, split, n, mean, std)
    for msg in (info.get("warning"), note):
        if msg:
            say(f"note: {msg}")
    from certonnx.io.normalization import normalization_hint

    # a model trained on normalized input, certified on raw pixels, gives meaningless numbers
    hint = normalization_hint(cm, x, y)
    if hint is not None:
        say(f"note: {hint['message']}")
    if method == "smoothing":
        from certonnx.certify.smoothing import certify_smoothing

        assert smoothing is not None
        res = certify_smoothing(cm, x, y, norms, smoothing, device=dev, seed=seed, onnx_path=model,
                                ort_inputs=stored, progress=progress)
    elif method == "lipschitz":
        # margin / (Lipschitz constant): cheap and sound, usually loose except for Lipschitz-trained models
        from certonnx.certify.lipschitz_cert import certify_lipschitz

        res = certify_lipschitz(cm, x, y, norms, batch_size=batch_size, pgd_steps=pgd_steps,
                                pgd_restarts=pgd_restarts, device=dev, seed=seed, onnx_path=model, ort_inputs=stored)
    else:
        from certonnx.certify.core import AUTO_BUDGET, certify_dataset

        res = certify_dataset(cm, x, y, norms, method, batch_size=batch_size, pgd_steps=pgd_steps,
                              pgd_restarts=pgd_restarts, device=dev, progress=progress, onnx_path=model,
                              max_memory=max_memory, seed=seed, ort_inputs=stored, per_sample=per_sample,
                              timeout=timeout, sample_timeout=sample_timeout, backend=backend,
                              cross_check=cross_check,
                              auto_budget=AUTO_BUDGET if auto_budget is None else auto_budget)
    res["data"] = {"path": data, "format": info["format"], "split": split, "sha256": info["sha256"],
                   "layout": info["layout"],
                   "scale": info["scale"], **({"reshaped": note} if note else {})}
    res["model"] = model
    res["normalization_hint"] = hint
    if radius:
        res["radius"] = {"method": radius_method(method),
                         **certified_radii(cm, x, y, eps_max_d, method, batch_size=batch_size, device=dev)}
        if plot is not None:
            from certonnx.certify.radius import pgd_accuracy_curve, plot_curves

            curves = {k: v for k, v in res["radius"].items() if isinstance(v, dict)}
            pgd = {}
            for k, v in curves.items():  # PGD at every 4th ε of the curve (6 points): the other side of the gap
                e_pts = v["curve"]["eps"][::4]
                v["pgd_curve"] = {"eps": e_pts, "accuracy": pgd_accuracy_curve(
                    cm.module, x, y, k, e_pts, (float(cm.domain[0]), float(cm.domain[1])), steps=pgd_steps,
                    restarts=pgd_restarts, seed=seed, batch_size=batch_size, device=dev)}
                pgd[k] = (v["pgd_curve"]["eps"], v["pgd_curve"]["accuracy"])
            plot_curves({k: (v["curve"]["eps"], v["curve"]["accuracy"]) for k, v in curves.items()}, plot,
                        title=f"{Path(model).name}: certified ({res['radius']['method']}) vs PGD, n = {res['n']}",
                        pgd=pgd, marks={k: float(e) for k, e in norms.items()})
    if output is not None:
        _export_certified(cm, res, info, output)
    return res


def _check_smoothing_flags(radius: bool, per_sample: bool, backend: str, cross_check: bool,
                           timeout: float | None, sample_timeout: float | None, auto_budget: float | None) -> None:
    """Flags of the deterministic methods that mean nothing for randomized smoothing (its JSON
    always holds each sample's radius and prediction)."""
    given = {"--radius/--plot": radius, "--per-sample": per_sample, "--backend": backend != "certonnx",
             "--cross-check": cross_check, "--timeout": timeout is not None,
             "--sample-timeout": sample_timeout is not None, "--auto-budget": auto_budget is not None}
    for flag, on in given.items():
        if on:
            raise ConfigError("does not apply to --method smoothing (its JSON holds every sample's certified "
                              "L2 radius and smoothed prediction)", flag)


def _load_for_certify(model: str, data: str, norms: dict[str, float], split: str, n: int | None,
                      mean: Sequence[float] | None, std: Sequence[float] | None
                      ) -> tuple[Any, Any, Any, dict[str, Any], Any, str]:
    """``(model, x, y, info, x as stored, layout note)`` with the data fitted to the model's input."""
    import certonnx
    from certonnx.data import as_stored, check_against_model, load_data

    cm = _with_normalization(certonnx.load(model), mean, std)
    check_eps_range(norms, cm, "--norm")
    x, y, info = load_data(data, split, n, mean=mean, std=std, num_classes=cm.num_classes)
    stored = as_stored(x, info)  # what onnxruntime is fed by the clean-prediction guard
    x, note = check_against_model(x, cm.sample_shape, info)
    return cm, x, y, info, stored, note


def _export_certified(cm: CertModel, res: dict[str, Any], info: dict[str, Any], output: str) -> None:
    import certonnx
    from certonnx.io.metadata import certificate_from_result, certificate_from_smoothing

    if res["method"] == "smoothing":
        cert = certificate_from_smoothing(res, dataset_sha256=info["sha256"], extra={"data": res["data"]})
        certonnx.export(cm, output, certificate=cert)
        res["output"] = str(output)
        return

    cert = certificate_from_result(
        res, dataset_sha256=info["sha256"],
        verifier=f"certonnx certify ({res['method']}"
                 + (f", bounds by auto_LiRPA {res['backend']['version']}" if "backend" in res else "")
                 + f"; counterexamples checked with {res['falsification_check']})",
        extra={"data": res["data"], "per_method": res["per_method"], "status_counts": res["status_counts"]},
    )
    certonnx.export(cm, output, certificate=cert)
    res["output"] = str(output)


# -- finetune -------------------------------------------------------------------------------------

def finetune(model: str | Path | None, data: str | Path, *, norms: Mapping[str, float] | str, method: str = "ibp",
             options: Mapping[str, Any] | MethodOptions | None = None, arch: str | None = None, epochs: int = 10,
             batch_size: int = 128, lr: float | None = None, optimizer: str = "adam", lr_schedule: str = "step",
             lr_milestones: list[int] | None = None, lr_decay: float = 0.2, weight_decay: float = 0.0,
             warmup_epochs: int | None = None, ramp_epochs: int | None = None, eps_schedule: str = "smooth",
             grad_clip: float = 10.0, radii: str = "small", regularize: bool | None = None, init: str = "ibp",
             eval_n: int | None = None, eval_method: str = "auto", eval_radius: bool | None = None,
             n_train: int | None = None, output: str | None = None, checkpoint_dir: str | None = None,
             resume: bool = False, keep_checkpoints: bool = False, log_json: str | None = None,
             device: str = "auto", seed: int = 0,
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None, progress: bool = False,
             echo: Echo | None = None, extra_outputs: Mapping[str, str | None] | None = None,
             accept_worse: bool = False, max_clean_drop: float | None = None,
             ) -> tuple[CertModel, dict[str, Any] | None]:
    """Certified fine-tuning of the ONNX file ``model`` (or training ``arch`` from scratch, with
    ``model=None``) on ``data``'s train split, certification on its test split, export to
    ``output`` with the certificate: ``(trained model, the certonnx finetune report)``.

    ``norms``: ``{norm: eps}``, or text where radii may be left out (``"linf,l2"``: defaults for
    the data's shape, ``radii`` = small | large). ``options``: the method's options (a dict,
    strings or typed values, or its ``Options`` instance); an unknown key or a bad value is a
    :class:`~certonnx.train.methods.options.MethodOptionError` before any work.
    ``None`` defaults depend on the run (docs/finetune.md): ``lr`` 1e-3 and ``regularize`` on,
    from scratch and fine-tuning alike (measured in docs/training.md); warm-up and ramp epochs;
    ``eval_radius`` the method's ``eval_radius_default``; ``output`` ``<MODEL>_<method>.onnx``; ``eval_n=0`` skips
    certification (the model is exported without a certificate, ``report["certified"]`` False).
    The checkpoint folder (``checkpoint_dir``, default ``<output>.ckpt``) is removed once the
    model is exported, unless ``keep_checkpoints``; a failed or interrupted run keeps it for
    ``resume``. Under torchrun every rank trains; only rank 0 certifies and exports, the others
    get ``(model, None)``.

    Guard rail: a fine-tuned model is first certified as it came in (``report["before"]``, same
    test samples and method). If the result is no improvement (union certified accuracy not
    above the input's), collapsed (clean accuracy no better than always predicting the most
    frequent test label) or lost more than ``max_clean_drop`` points of clean accuracy, it is
    written to ``<output>.rejected.onnx`` instead of ``output`` (which is never replaced by it)
    and ``report["verdict"]["accepted"]`` is False, unless ``accept_worse``.
    """
    from certonnx.train import distributed as D
    from certonnx.utils import resolve_device

    t_start = time.monotonic()
    plan = _FinetunePlan.make(model, data, norms=norms, method=method, options=options, arch=arch, epochs=epochs,
                              lr=lr, warmup_epochs=warmup_epochs, ramp_epochs=ramp_epochs, regularize=regularize,
                              eval_radius=eval_radius, output=output, checkpoint_dir=checkpoint_dir, mean=mean,
                              std=std, log_json=log_json, eval_method=eval_method, extra_outputs=extra_outputs)
    dev = resolve_device(device)
    rank, world = D.init_from_env(dev)
    say = echo if (echo is not None and rank == 0) else _quiet
    cm, x, y, info, xt, yt, tinfo, norms_d = _finetune_inputs(plan, norms, radii=radii, init=init, seed=seed,
                                                             n_train=n_train, eval_n=eval_n, say=say)
    before = None
    if rank == 0 and not plan.scratch and xt is not None and yt is not None:
        from certonnx.certify.core import certify_dataset

        say("certifying the input model first (the result must improve on it)")
        cm.module.eval()
        before = certify_dataset(cm, xt, yt, norms_d, eval_method.lower(), batch_size=max(batch_size, 128),
                                 device=dev, progress=False, seed=seed)
        for msg in reach_warnings(before):
            say(f"note: {msg}")
    cfg, log = _train(plan, cm, x, y, norms_d, num_classes=cm.num_classes, epochs=epochs, batch_size=batch_size,
                      optimizer=optimizer, lr_schedule=lr_schedule, lr_milestones=lr_milestones, lr_decay=lr_decay,
                      weight_decay=weight_decay, eps_schedule=eps_schedule, grad_clip=grad_clip, seed=seed,
                      resume=resume, dev=dev, world=world, progress=progress, say=say)
    t_train = time.monotonic() - t_start
    if rank != 0:
        D.barrier()
        D.cleanup()
        return cm, None

    # -- certification and export (rank 0) ------------------------------------------------------
    cm.module.eval()
    for p in cm.module.parameters():
        p.requires_grad_(False)
    res: dict[str, Any] = {"model": plan.model, "arch": plan.arch, "method": plan.method, "norms": norms_d,
                           "output": plan.output,
                           "training": {"config": cfg.to_dict(), "log": log, "seconds": round(t_train, 2),
                                        "processes": world},
                           "data": {"path": plan.data, "sha256_train": info["sha256"]}}
    cert = None
    if xt is not None and yt is not None:
        cert = _evaluate(plan, cm, xt, yt, tinfo, res, eval_method=eval_method.lower(),
                         batch_size=max(batch_size, 128), dev=dev, seed=seed, epochs=epochs, train_info=info,
                         progress=progress, say=say)
    import certonnx

    reasons = _worse_reasons(res.get("evaluation"), before, yt, max_clean_drop)
    accepted = not reasons or accept_worse
    res["before"] = before
    if before is not None:
        res["reach_warnings"] = reach_warnings(before)
    res["verdict"] = {"accepted": accepted, "reasons": reasons, "accept_worse": accept_worse}
    if not accepted:
        out = Path(plan.output)
        res["output"] = str(out.with_name(out.stem + ".rejected" + (out.suffix or ".onnx")))
        say(f"rejected: written to {res['output']} instead of {plan.output}")
    certonnx.export(cm, res["output"], certificate=cert)
    res["certified"] = cert is not None
    res["seconds"] = round(time.monotonic() - t_start, 2)
    D.barrier()
    D.cleanup()
    res["checkpoint_dir"] = str(plan.ckdir) if keep_checkpoints else None
    if not keep_checkpoints:
        remove_checkpoints(plan.ckdir)
    return cm, res


#: a target radius where the input model keeps less than this fraction of its clean accuracy
#: under PGD is far from what it is robust at: finetune says so before training starts
REACH_FRACTION = 0.5


def reach_warnings(before: Mapping[str, Any]) -> list[str]:
    """One line per target radius the input model is far from (PGD accuracy there below
    :data:`REACH_FRACTION` of its clean accuracy), e.g. L2 0.75 for an L∞-trained net: certified
    accuracy cannot start above PGD accuracy, so training there costs much clean accuracy or
    does not get there, and the user should know before hours are spent."""
    clean = float(before["clean_accuracy"])
    out = []
    for norm, eps in before["epsilon"].items():
        pgd = float(before["pgd_accuracy"][norm])
        if clean > 0 and pgd < REACH_FRACTION * clean:
            out.append(f"the input model keeps {pgd:.1%} of its samples under PGD at {norm} {eps:g} (clean {clean:.1%}, "
                       f"certified {float(before['certified_accuracy'][norm]):.1%}): far from robust at this radius, "
                       "so fine-tuning to it will cost clean accuracy or fall short; a smaller radius or a longer "
                       "--ramp-epochs may help")
    return out


def _worse_reasons(after: dict[str, Any] | None, before: dict[str, Any] | None, yt: torch.Tensor | None,
                   max_clean_drop: float | None) -> list[str]:
    """Why a trained model is not an improvement (empty: it is, or nothing was measured)."""
    if after is None or yt is None or yt.numel() == 0:
        return []
    import torch

    reasons = []
    majority = float(torch.bincount(yt.long()).max()) / yt.numel()
    if after["clean_accuracy"] <= majority + 1e-12:
        reasons.append(f"collapsed: clean accuracy {after['clean_accuracy']:.1%} is no better than always predicting "
                       f"the most frequent class ({majority:.1%})")
    if before is not None:
        u0, u1 = before["union_certified_accuracy"], after["union_certified_accuracy"]
        if u1 <= u0:
            reasons.append(f"certified accuracy {u1:.1%} not above the input model's {u0:.1%}")
        drop = 100 * (before["clean_accuracy"] - after["clean_accuracy"])
        if max_clean_drop is not None and drop > max_clean_drop:
            reasons.append(f"clean accuracy fell {drop:.1f} points (--max-clean-drop {max_clean_drop:g})")
    return reasons


def remove_checkpoints(ckdir: Path) -> None:
    """Delete what the trainer wrote into ``ckdir`` (``last.pt``, temp files of killed writes),
    then the folder itself when nothing else is in it: files of the user's are never touched."""
    from certonnx.train.loop import CHECKPOINT_NAME

    for f in (ckdir / CHECKPOINT_NAME, *ckdir.glob(f".{CHECKPOINT_NAME}.*.tmp")):
        f.unlink(missing_ok=True)
    try:
        ckdir.rmdir()
    except OSError:
        pass  # absent, or holds other files


@dataclass
class _FinetunePlan:
    """The resolved settings of one finetune run, checked before any work (cheap checks only:
    flags, method options, output paths), so a bad flag never costs a model import."""

    model: str | None
    data: str
    arch: str | None
    method: str
    options: MethodOptions
    lr: float
    warmup: int
    ramp: int
    regularize: bool
    eval_radius: bool
    output: str
    ckdir: Path
    mean: Sequence[float] | None
    std: Sequence[float] | None
    log_json: str | None

    @property
    def scratch(self) -> bool:
        return self.arch is not None

    @classmethod
    def make(cls, model: str | Path | None, data: str | Path, *, norms: Mapping[str, float] | str, method: str,
             options: Mapping[str, Any] | MethodOptions | None, arch: str | None, epochs: int, lr: float | None,
             warmup_epochs: int | None, ramp_epochs: int | None, regularize: bool | None, eval_radius: bool | None,
             output: str | None, checkpoint_dir: str | None, mean: Sequence[float] | None,
             std: Sequence[float] | None, log_json: str | None, eval_method: str,
             extra_outputs: Mapping[str, str | None] | None) -> _FinetunePlan:
        from certonnx.train.methods import method_class
        from certonnx.utils import check_outputs, check_writable

        model = None if model is None else str(model)
        if (model is None) == (arch is None):
            raise ConfigError("give either MODEL.onnx (fine-tuning) or --arch (training from scratch)")
        if arch is not None and arch not in ARCHS:
            raise ConfigError(f"{arch!r} is not one of {', '.join(ARCHS)}", "--arch")
        _check_mean_std(mean, std)
        if arch is not None and mean is not None:
            raise ConfigError("--mean/--std describe an imported MODEL's input; not used with --arch", "--mean/--std")
        if not isinstance(norms, str):  # (text with radii left out is resolved once the data's shape is known)
            from certonnx.certify.norms import check_eps_range as check

            try:  # L∞ against the pixel range [0, 1] of every finetune model, before the data is read
                check(_norms(norms))
            except ValueError as e:
                raise ConfigError(str(e), "--norm") from None
        if eval_method.lower() not in ("auto", *_bound_methods()):
            raise ConfigError(f"{eval_method!r} is not one of auto, {', '.join(_bound_methods())}", "--eval-method")
        scratch = arch is not None
        lr = lr if lr is not None else 1e-3  # fine-tuning too: 2e-4 certified far less (docs/training.md)
        warmup = warmup_epochs if warmup_epochs is not None else (1 if scratch and epochs > 2 else 0)
        # fine-tuning a normally trained model needs a long ramp (a short one collapses it, see
        # docs/training.md); from scratch half of the remaining epochs is the CTBench-like choice
        ramp = ramp_epochs if ramp_epochs is not None else (
            max(1, (epochs - warmup) // 2) if scratch else max(1, epochs - warmup - 1))
        if warmup + ramp > epochs:
            raise ConfigError(f"--warmup-epochs ({warmup}) + --ramp-epochs ({ramp}) exceed --epochs ({epochs})",
                              "--ramp-epochs")
        mcls = method_class(method)
        opts = mcls.parse_options(options, strict=True)
        # -- every output path, before any work -------------------------------------------------
        name = mcls.name
        if output is None:
            output = (str(Path(model).with_name(f"{Path(model).stem}_{name}.onnx")) if model
                      else f"{arch}_{name}.onnx")
        if output == "-":
            raise ConfigError("cannot write the model to stdout", "-o")
        ckdir = Path(checkpoint_dir) if checkpoint_dir else Path(output + ".ckpt")
        from certonnx.data import data_inputs

        check_outputs({"model": model, **data_inputs(data)},
                      {"-o": output, **(extra_outputs or {}), "--log-json": log_json})
        if ckdir.exists() and not ckdir.is_dir():
            raise CertonnxError(f"--checkpoint-dir {ckdir} exists and is not a directory")
        check_writable(ckdir / "last.pt" if ckdir.exists() else ckdir)  # (the parent must be writable to create it)
        return cls(model=model, data=str(data), arch=arch, method=name, options=opts, lr=lr, warmup=warmup,
                   ramp=ramp, regularize=regularize if regularize is not None else True,
                   eval_radius=eval_radius if eval_radius is not None else mcls.eval_radius_default,
                   output=output, ckdir=ckdir, mean=mean, std=std, log_json=log_json)


def _finetune_inputs(plan: _FinetunePlan, norms: Mapping[str, float] | str, *, radii: str, init: str, seed: int,
                     n_train: int | None, eval_n: int | None, say: Echo) -> tuple[Any, ...]:
    """Model and data, checked against each other before any training: ``(model, x, y, info,
    x_test, y_test, test_info, norms)`` (test data None with ``eval_n=0``)."""
    import certonnx
    from certonnx.data import as_stored, check_against_model, load_data

    x, y, info = load_data(plan.data, "train", n_train, mean=plan.mean, std=plan.std)
    if plan.scratch:
        from certonnx.train.archs import build_model

        num_classes = max(int(y.max()) + 1 if y.numel() else 10, 2)
        cm = build_model(plan.arch, tuple(x.shape[1:]), num_classes, init=init, seed=seed)  # type: ignore[arg-type]
    else:
        cm = _with_normalization(certonnx.load(plan.model), plan.mean, plan.std)  # type: ignore[arg-type]
        num_classes = cm.num_classes
        if int(y.max()) >= num_classes:
            from certonnx.errors import DataError

            raise DataError(f"labels go up to {int(y.max())} but the model has {num_classes} outputs")
    stored = as_stored(x, info)
    x, note = check_against_model(x, cm.sample_shape, info)
    for msg in (info.get("warning"), note):
        if msg:
            say(f"note: {msg}")
    if not plan.scratch:
        # before any training: the imported model on the prepared data must predict what
        # onnxruntime predicts on the original file fed the data as stored (one batch)
        from certonnx.certify.core import clean_prediction_guard

        clean_prediction_guard(cm, x, plan.model, ort_inputs=stored)  # type: ignore[arg-type]
    del stored
    if isinstance(norms, str):
        norms_d = _norms_for_shape(norms, cm.sample_shape, radii)
        if not all(":" in p for p in norms.split(",") if p.strip()):
            say(f"radii for --norm {','.join(norms_d)} ({radii} setting for inputs {tuple(cm.sample_shape)}): "
                f"{norms_d}")
    else:
        norms_d = _norms(norms)
    check_eps_range(norms_d, cm, "--norm")
    # unsupported ops fail here, naming the op, before training
    from certonnx.bounds import BoundedModule

    BoundedModule(cm.module, cm.sample_shape)
    xt = yt = tinfo = None
    if eval_n != 0:
        xt, yt, tinfo = load_data(plan.data, "test", eval_n, mean=plan.mean, std=plan.std, num_classes=num_classes)
        xt, _ = check_against_model(xt, cm.sample_shape, tinfo)
    return cm, x, y, info, xt, yt, tinfo, norms_d


def _norms_for_shape(text: str, sample_shape: Sequence[int], radii: str) -> dict[str, float]:
    from certonnx.train.radii import parse_norms_with_defaults

    try:
        return parse_norms_with_defaults(text, sample_shape, radii)
    except ValueError as e:
        raise ConfigError(str(e), "--norm") from None


def _train(plan: _FinetunePlan, cm: CertModel, x: torch.Tensor, y: torch.Tensor, norms: dict[str, float], *,
           num_classes: int, epochs: int, batch_size: int, optimizer: str, lr_schedule: str,
           lr_milestones: list[int] | None, lr_decay: float, weight_decay: float, eps_schedule: str, grad_clip: float, seed: int, resume: bool,
           dev: torch.device, world: int, progress: bool, say: Echo) -> tuple[Any, list[dict[str, Any]]]:
    """Train ``cm`` in place: ``(TrainConfig, per-epoch log)``."""
    import torch

    from certonnx.train import TrainConfig, Trainer

    for p in cm.module.parameters():
        p.requires_grad_(True)
    cfg = TrainConfig(
        norms=dict(norms), method=plan.method, epochs=epochs, batch_size=batch_size, lr=plan.lr, optimizer=optimizer,
        weight_decay=weight_decay, lr_schedule=lr_schedule, lr_milestones=lr_milestones, lr_decay=lr_decay,
        warmup_epochs=plan.warmup, ramp_epochs=plan.ramp, eps_schedule=eps_schedule, grad_clip=grad_clip, seed=seed,
        regularize=plan.regularize, options=plan.options.to_dict(), domain=(float(cm.domain[0]), float(cm.domain[1])),
        num_classes=num_classes, checkpoint_dir=str(plan.ckdir),
        log_json=plan.log_json, device=str(dev),
    )
    what = f"{plan.arch} from scratch" if plan.scratch else f"fine-tuning {plan.model}"
    say(f"{what}: {plan.method} on {x.shape[0]} samples, ε {norms} ({plan.warmup} warm-up + {plan.ramp} ramp epochs "
        f"of {epochs}), lr {plan.lr:g}, batch {batch_size}" + (f", {world} processes" if world > 1 else "")
        + f", device {dev}")
    torch.manual_seed(seed)
    trainer = Trainer(cm.module, x, y, cfg, sample_shape=cm.sample_shape, progress=progress, echo=say)
    log = trainer.fit(resume=resume)
    trainer.method.finalize(cm.module)  # e.g. SaC folds its shrinkage into plain weights
    return cfg, log


def _evaluate(plan: _FinetunePlan, cm: CertModel, xt: torch.Tensor, yt: torch.Tensor, tinfo: dict[str, Any],
              res: dict[str, Any], *, eval_method: str, batch_size: int, dev: torch.device, seed: int, epochs: int,
              train_info: dict[str, Any], progress: bool, say: Echo) -> dict[str, Any]:
    """Certify the trained model on the test split (and its radii with ``eval_radius``): fills
    ``res`` and returns the certificate to export."""
    from certonnx.certify.core import certify_dataset
    from certonnx.io.metadata import certificate_from_result

    norms = res["norms"]
    ev = certify_dataset(cm, xt, yt, norms, eval_method, batch_size=batch_size, device=dev, progress=progress,
                         seed=seed)
    res["evaluation"] = ev
    res["data"]["sha256_test"] = tinfo["sha256"]
    radius_info: dict[str, Any] = {}
    if plan.eval_radius:
        rmeth = radius_method(eval_method)
        found = certified_radii(cm, xt, yt, {k: 2 * e for k, e in norms.items()}, rmeth, batch_size=batch_size,
                                device=dev)
        radius_info = {k: {"acr": v["acr"], "eps_max": v["eps_max"], "method": rmeth, "curve": v["curve"]}
                       for k, v in found.items()}
        res["radius"] = radius_info
        say("average certified radius (ACR): " + ", ".join(f"{k} {v['acr']:.4f}" for k, v in radius_info.items()))
    log = res["training"]["log"]
    return certificate_from_result(
        ev, dataset_sha256=tinfo["sha256"],
        verifier=f"certonnx finetune ({ev['method']} bounds after {plan.method} training)",
        extra={"training": {"method": plan.method, "epochs": epochs, "source": plan.model or f"--arch {plan.arch}",
                            "train_sha256": train_info["sha256"], "final": log[-1] if log else None},
               **({"average_certified_radius": {k: v["acr"] for k, v in radius_info.items()},
                   "radius_search": {k: {"eps_max": v["eps_max"], "method": v["method"]}
                                     for k, v in radius_info.items()}} if radius_info else {})},
    )


__all__ = ["RADIUS_AUTO", "certified_radii", "certify", "default_eps_max", "finetune", "radius_method"]
