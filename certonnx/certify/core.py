"""Dataset certification: clean accuracy, PGD accuracy and certified accuracy per norm.

Per norm and sample the status is one of

* ``verified``: sound bounds prove every margin positive on the whole set (ball ∩ domain);
  for a model whose final softmax was set aside at import, above the threshold that covers
  the softmax's float rounding (:mod:`certonnx.certify.head`);
* ``falsified``: a point of the set is misclassified (PGD or the clean point itself), and
  onnxruntime on the ORIGINAL file agrees;
* ``unknown``: neither (including PGD hits that onnxruntime does not confirm, counted in
  ``ort_disagreements``).

``method="auto"`` runs the cascade ibp -> crown-ibp -> crown -> alpha-crown and sends only the
samples still unknown to the next (more expensive) method, batched by masking. The later two
run on a batch only while the estimated work of everything done for it stays within
``auto_budget`` × that of ``method="crown-ibp"`` (attack included; the estimate is
:meth:`~certonnx.bounds.engine.BoundedModule.pass_cost`, deterministic, not a clock), so the
default stays close to CROWN-IBP's time on nets where CROWN is expensive (conv nets) and
still uses CROWN where it is cheap; ``auto_budget=math.inf`` always runs the whole cascade.
The report counts the samples each method was skipped for (``auto.skipped``). The invariant
certified <= pgd accuracy <= clean accuracy holds by construction, and a sample that is both
verified and broken by PGD raises an internal error (a bug, never reported as verified).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from certonnx.attacks.pgd import pgd_attack
from certonnx.bounds import METHODS, BoundedModule, InputSet, margin_matrix
from certonnx.certify.norms import canonical_norm, parse_norms  # noqa: F401 - re-exported (older imports)
from certonnx.certify.ort_check import OrtRunner, check_clean_predictions, guard_indices, margin_violated
from certonnx.errors import CertonnxError

AUTO_CASCADE = ("ibp", "crown-ibp", "crown", "alpha-crown")
#: default work budget of ``method="auto"``, in multiples of a ``crown-ibp`` run's work
AUTO_BUDGET = 4.0
#: bound engines: certonnx's own, or an installed auto_LiRPA on the same graph
BACKENDS = ("certonnx", "auto_lirpa")
STATUSES = ("verified", "falsified", "unknown")


class SoundnessError(RuntimeError):
    """A sample was both verified and broken by an attack: a bug in certonnx, never a result."""


def _batches(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _predict(module: torch.nn.Module, x: torch.Tensor, batch_size: int, dev: torch.device) -> torch.Tensor:
    outs = []
    with torch.no_grad():
        for sl in _batches(x.shape[0], batch_size):
            outs.append(module(x[sl].to(dev)).flatten(1).cpu())
    return torch.cat(outs)


# float32 has ~7 significant digits: with weights this large, rounding in the bound passes can
# exceed the tolerance that makes bounds sound (found by fuzzing: a model with 5e36 weights)
WEIGHT_LIMIT = 1e18


def prepare_model(model: Any, x: torch.Tensor, device: str | torch.device
                  ) -> tuple[torch.device, torch.nn.Module, tuple[int, ...], tuple[float, float], bool]:
    """``(device, module, sample_shape, domain, was_training)`` for a CertModel or a bare module,
    with the module moved to the device and put in eval mode (the caller restores the mode)."""
    dev = torch.device(device)
    module = model.module if hasattr(model, "module") else model
    sample_shape = tuple(model.sample_shape) if hasattr(model, "sample_shape") else tuple(x.shape[1:])
    domain = tuple(model.domain) if hasattr(model, "domain") else (0.0, 1.0)
    big = max((float(t.detach().abs().max()) for t in (*module.parameters(), *module.buffers())
               if t.is_floating_point() and t.numel()), default=0.0)
    if not big < WEIGHT_LIMIT:  # also NaN
        raise CertonnxError(f"the model has weights of magnitude {big:.3g}: float32 bounds are not reliable beyond "
                            f"{WEIGHT_LIMIT:.0e} (rounding errors exceed the margins), so certonnx refuses to certify it")
    was_training = module.training
    module.eval()
    module.to(dev)
    return dev, module, sample_shape, domain, was_training


def certify_dataset(
    model: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    norms: dict[str, float],
    method: str = "auto",
    *,
    batch_size: int = 128,
    pgd_steps: int = 20,
    pgd_restarts: int = 1,
    device: str | torch.device = "cpu",
    progress: bool | Callable[[int], None] = True,
    onnx_path: str | os.PathLike[str] | None = None,
    max_memory: int | None = None,
    alpha_steps: int = 20,
    seed: int = 0,
    per_sample: bool = False,
    ort_inputs: np.ndarray | torch.Tensor | None = None,
    timeout: float | None = None,
    sample_timeout: float | None = None,
    auto_budget: float = AUTO_BUDGET,
    backend: str = "certonnx",
    cross_check: bool = False,
) -> dict[str, Any]:
    """Certify ``x, y`` (raw inputs, labels) for every ``{norm: eps}``; see the module docstring.

    ``progress``: True for a rich progress bar on stderr, False for none, or a callable that
    receives the number of samples finished since the last call.

    With ``onnx_path``, before any bound is computed, the clean predictions of the torch model
    on ``x`` are compared with onnxruntime's on the original file for up to
    :data:`~certonnx.certify.ort_check.GUARD_SAMPLES` samples
    (:func:`~certonnx.certify.ort_check.check_clean_predictions`); a disagreement raises
    :class:`~certonnx.errors.ParityError` and nothing is reported. ``ort_inputs`` are the same
    samples as the user stores them (e.g. :func:`certonnx.data.as_stored`), fed to onnxruntime
    with only a channel transpose or a re-view where its input needs one; default ``x``.

    ``timeout`` (seconds, whole call): once it has passed, no further bound pass starts; the
    samples not verified by then stay ``unknown`` (never a claim), attacks still run, and the
    report says for how many (sample, norm) pairs the remaining bound methods did not run
    (``timeout.cut_short``). ``sample_timeout`` (seconds per sample): the bound passes of a
    batch get ``sample_timeout`` × its size; once they are spent, no further method starts on
    that batch (a pass already running is not interrupted) and its open samples count in
    ``timeout.cut_short`` in the same way.

    ``auto_budget``: see the module docstring (only with ``method="auto"``).

    ``backend="auto_lirpa"`` bounds the margins with an installed auto_LiRPA on the same graph
    (no float-rounding allowance: see :mod:`certonnx.bounds.auto_lirpa`); ``cross_check``
    also runs auto_LiRPA beside certonnx's engine on every batch and method and raises
    :class:`~certonnx.bounds.auto_lirpa.CrossCheckError` where certonnx's lower bound exceeds
    the best of auto_LiRPA's beyond float tolerance (``report["cross_check"]`` otherwise).
    """
    t0 = time.monotonic()
    deadline = t0 + timeout if timeout is not None else None
    skipped = 0
    method = method.lower().replace("_", "-")
    if method != "auto" and method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    if not auto_budget >= 1.0:
        raise ValueError(f"auto_budget must be at least 1 (got {auto_budget})")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (expected one of {BACKENDS})")
    cascade = AUTO_CASCADE if method == "auto" else (method,)
    dev, module, sample_shape, domain, was_training = prepare_model(model, x, device)
    n = int(x.shape[0])
    gen = torch.Generator().manual_seed(seed)
    bm = BoundedModule(module, sample_shape)
    lirpa = None
    xcheck: dict[str, dict[str, Any]] = {}
    if backend == "auto_lirpa" or cross_check:
        from certonnx.bounds.auto_lirpa import AutoLirpaBounds

        lirpa = AutoLirpaBounds(module, sample_shape, dev)
    # a final softmax set aside at import: margins must also survive its float rounding
    head = getattr(model, "head", None)

    checker: Callable[[np.ndarray], np.ndarray]
    if onnx_path is not None:
        checker = OrtRunner.for_model(onnx_path, model)
        check_engine = "onnxruntime"
    else:

        def checker(a: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return module(torch.as_tensor(a, device=dev)).flatten(1).double().cpu().numpy()

        check_engine = "torch (no ONNX file given)"

    bar, tick = _progress(progress, n * max(len(norms), 1))
    try:
        logits = _predict(module, x, batch_size, dev)
        clean_check = None
        if isinstance(checker, OrtRunner):
            clean_check = guarded_predictions(checker, x if ort_inputs is None else ort_inputs, logits,
                                              source=str(onnx_path))
        K = logits.shape[1]
        pred = logits.argmax(1)
        correct = pred == y
        ort_disagree = 0
        per_norm: dict[str, dict[str, Any]] = {}
        mem_warnings: list[str] = []
        params_req = [p for p in module.parameters() if p.requires_grad]
        for p in params_req:
            p.requires_grad_(False)
        try:
            for norm, eps in norms.items():
                status = np.full(n, "unknown", dtype=object)
                broken = ~correct.clone()  # torch says: a point of the set is misclassified
                verified = torch.zeros(n, dtype=torch.bool)
                counts = {m: 0 for m in cascade}
                budget_skips = {m: 0 for m in cascade}
                seconds = {"attack": 0.0, **{m: 0.0 for m in cascade}}
                adv_all = x.clone()
                for sl in _batches(n, batch_size):
                    xb, yb = x[sl].to(dev), y[sl].to(dev)
                    cb = correct[sl].to(dev)
                    # 1. attack the correctly classified samples
                    if eps > 0 and bool(cb.any()):
                        t_att = time.monotonic()
                        idx = torch.nonzero(cb).flatten()
                        adv = pgd_attack(module, xb[idx], yb[idx], eps, norm, domain, steps=pgd_steps,
                                         restarts=pgd_restarts, generator=gen)
                        assert isinstance(adv, torch.Tensor)  # return_loss=False
                        with torch.no_grad():
                            hit = module(adv).flatten(1).argmax(1) != yb[idx]
                        b_sl = broken[sl].clone()
                        b_sl[idx.cpu()] = hit.cpu()
                        broken[sl] = b_sl
                        a_sl = adv_all[sl].clone()
                        a_sl[idx.cpu()] = adv.cpu()
                        adv_all[sl] = a_sl
                        seconds["attack"] += time.monotonic() - t_att
                    # 2. bounds: first method on every correct sample (cross-checks the attack),
                    #    later methods only on those still open
                    todo = cb.clone().cpu()
                    t_batch = time.monotonic()
                    nb = sl.stop - sl.start
                    # work of a crown-ibp run on this batch (attack, ibp, crown-ibp), pass_cost units
                    work_base = nb * (3.0 * pgd_steps * pgd_restarts + 2.0) + nb * (2.0 + K - 1)
                    work = 0.0
                    for k, meth in enumerate(cascade):
                        if k > 0:
                            todo = todo & ~broken[sl] & ~verified[sl]
                        if not bool(todo.any()):
                            break
                        if (deadline is not None and time.monotonic() > deadline) or (
                                sample_timeout is not None and time.monotonic() - t_batch > sample_timeout * nb):
                            skipped += int(todo.sum())
                            break
                        idx = torch.nonzero(todo).flatten()
                        if method == "auto" and meth in ("crown", "alpha-crown") and math.isfinite(auto_budget):
                            est = bm.pass_cost(InputSet(xb[idx.to(dev)], eps, norm=norm, domain=domain), meth,
                                               K - 1, alpha_steps)
                            if work_base + work + est > auto_budget * work_base:
                                budget_skips[meth] += int(idx.numel())
                                continue
                            work += est
                        t_meth = time.monotonic()
                        ok, used = _bound_verified(bm, xb[idx.to(dev)], yb[idx.to(dev)], eps, norm, domain, K,
                                                   meth, max_memory, alpha_steps, mem_warnings, head=head,
                                                   lirpa=lirpa, use_lirpa=backend == "auto_lirpa",
                                                   xcheck=xcheck if cross_check else None)
                        v_sl = verified[sl].clone()
                        newly = ok.cpu() & ~v_sl[idx]
                        counts[meth] += int(newly.sum())
                        seconds[meth] += time.monotonic() - t_meth
                        v_sl[idx] = v_sl[idx] | ok.cpu()
                        verified[sl] = v_sl
                    tick(sl.stop - sl.start, f"{norm} ε={eps:g}")
                clash = verified & broken
                if bool(clash.any()):
                    i = int(torch.nonzero(clash)[0])
                    raise SoundnessError(
                        f"internal error: sample {i} is verified for {norm} eps={eps} but an attack/the clean "
                        "point breaks it; this is a certonnx bug, no result is reported"
                    )
                # 3. re-check every torch counterexample on the original file
                cand = torch.nonzero(broken).flatten()
                confirmed = torch.zeros(n, dtype=torch.bool)
                if cand.numel():
                    pts = adv_all[cand].cpu().numpy().astype(np.float32)
                    out = checker(pts)
                    ok_ort = torch.as_tensor(margin_violated(out, y[cand].numpy()))
                    confirmed[cand] = ok_ort
                    ort_disagree += int((~ok_ort).sum())
                status[verified.numpy()] = "verified"
                status[confirmed.numpy()] = "falsified"
                per_norm[norm] = {
                    "status": status,
                    "verified": verified,
                    "broken": broken,
                    "counts": counts,
                    "budget_skips": budget_skips,
                    "seconds": {k: round(v, 3) for k, v in seconds.items()},
                    "ort_disagreements": int(cand.numel() - int(confirmed.sum())),
                }
        finally:
            for p in params_req:
                p.requires_grad_(True)
    finally:
        if bar is not None:
            bar.stop()
        module.train(was_training)

    clean = float(correct.double().mean()) if n else 0.0
    res: dict[str, Any] = {
        "n": n,
        "clean_accuracy": clean,
        "pgd_accuracy": {k: float((correct & ~v["broken"]).double().mean()) for k, v in per_norm.items()},
        "certified_accuracy": {k: float(v["verified"].double().mean()) for k, v in per_norm.items()},
        "union_certified_accuracy": float(
            torch.stack([v["verified"] for v in per_norm.values()]).all(0).double().mean()
        ) if per_norm else 0.0,
        "epsilon": {k: float(e) for k, e in norms.items()},
        "input_space": _input_space(model),
        "method": method,
        "head": head.describe() if head is not None else None,
        "seconds": round(time.monotonic() - t0, 3),
        "per_method": {k: v["counts"] for k, v in per_norm.items()},
        # wall time per norm of the PGD attack and of each bound method of the cascade
        "per_method_seconds": {k: v["seconds"] for k, v in per_norm.items()},
        "status_counts": {
            k: {s: int((v["status"] == s).sum()) for s in STATUSES} for k, v in per_norm.items()
        },
        "ort_disagreements": {k: v["ort_disagreements"] for k, v in per_norm.items()},
        "falsification_check": check_engine,
        "pgd": {"steps": pgd_steps, "restarts": pgd_restarts, "seed": seed},
    }
    if clean_check is not None:
        res["ort_clean_check"] = clean_check
    if backend != "certonnx":
        from certonnx.bounds.auto_lirpa import available

        res["backend"] = {"name": backend, "version": available(),
                          "note": "bounds without float32 rounding allowances (exact arithmetic on the float32 "
                                  "weights); L2 and L1 over the ball alone"}
    if cross_check:
        res["cross_check"] = xcheck
    if method == "auto":
        res["auto"] = {"budget": auto_budget, "skipped": {k: v["budget_skips"] for k, v in per_norm.items()}}
    if timeout is not None or sample_timeout is not None:
        res["timeout"] = {"seconds": None if timeout is None else float(timeout),
                          "per_sample_seconds": None if sample_timeout is None else float(sample_timeout),
                          "reached": skipped > 0, "cut_short": skipped}
    if mem_warnings:
        res["warnings"] = sorted(set(mem_warnings))
    for k in res["certified_accuracy"]:
        c, p_acc = res["certified_accuracy"][k], res["pgd_accuracy"][k]
        if not (c <= p_acc + 1e-12 and p_acc <= clean + 1e-12):
            raise SoundnessError(f"internal error: certified {c} > pgd {p_acc} or pgd > clean {clean} for {k}")
    if per_sample:
        res["per_sample"] = {k: [str(s) for s in v["status"]] for k, v in per_norm.items()}
        res["per_sample"]["correct"] = [bool(c) for c in correct]
        res["per_sample"]["prediction"] = [int(c) for c in pred]
    return res


def clean_prediction_guard(model: Any, x: torch.Tensor, onnx_path: str | os.PathLike[str], *,
                           ort_inputs: np.ndarray | torch.Tensor | None = None,
                           batch_size: int = 128) -> dict[str, int]:
    """The guard of :func:`certify_dataset` on its own (e.g. before fine-tuning starts): the
    torch model (on whatever device it is) on up to 256 samples of ``x`` against onnxruntime
    on ``onnx_path`` fed ``ort_inputs`` (the same samples as the user stores them; default ``x``)."""
    module = model.module if hasattr(model, "module") else model
    device = next((t.device for t in (*module.parameters(), *module.buffers())), torch.device("cpu"))
    runner = OrtRunner.for_model(onnx_path, model)
    xu = x if ort_inputs is None else ort_inputs
    idx = guard_indices(int(x.shape[0]))
    was_training = module.training
    module.eval()
    try:
        logits = _predict(module, x[torch.as_tensor(idx)], batch_size, torch.device(device))
    finally:
        module.train(was_training)
    xs = xu[torch.as_tensor(idx)] if isinstance(xu, torch.Tensor) else np.asarray(xu)[idx]
    xs = xs.detach().cpu().numpy() if isinstance(xs, torch.Tensor) else xs
    return check_clean_predictions(runner, xs, logits.double().numpy(), source=str(onnx_path), indices=idx)


def guarded_predictions(runner: OrtRunner, x_user: np.ndarray | torch.Tensor, logits: torch.Tensor, *,
                        source: str) -> dict[str, int]:
    """:func:`~certonnx.certify.ort_check.check_clean_predictions` on an even spread of up to
    256 samples: ``x_user`` (the data as the user stores it) through onnxruntime against the
    torch ``logits`` already computed for all samples (one onnxruntime batch, no extra torch pass)."""
    n = int(logits.shape[0])
    if int(x_user.shape[0]) != n:
        raise ValueError(f"ort_inputs has {int(x_user.shape[0])} samples but x has {n}")
    idx = guard_indices(n)
    xs = x_user[torch.as_tensor(idx)] if isinstance(x_user, torch.Tensor) else np.asarray(x_user)[idx]
    xs = xs.detach().cpu().numpy() if isinstance(xs, torch.Tensor) else xs
    return check_clean_predictions(runner, xs, logits[torch.as_tensor(idx)].double().numpy(), source=source,
                                   indices=idx)


def _input_space(model: Any) -> dict[str, Any]:
    if hasattr(model, "input_space"):
        return model.input_space()
    return {"domain": [0.0, 1.0], "normalization": None, "description": "raw inputs in [0, 1]"}


def _bound_verified(
    bm: BoundedModule,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str,
    domain: tuple[float, float],
    K: int,
    method: str,
    max_memory: int | None,
    alpha_steps: int,
    warn_log: list[str],
    *,
    head: Any = None,
    lirpa: Any = None,
    use_lirpa: bool = False,
    xcheck: dict[str, dict[str, Any]] | None = None,
) -> tuple[torch.Tensor, str]:
    """Verified mask for one batch; falls back to cheaper methods (warning) over the budget.
    With a softmax ``head`` the margins must exceed its rounding threshold
    (:func:`certonnx.certify.head.margins_certify`). ``lirpa``: an auto_LiRPA engine, which bounds
    the margins with ``use_lirpa``; ``xcheck``: compare certonnx's bounds with it (accumulated
    per norm and method)."""
    used = method
    s = InputSet(x, eps, norm=norm, domain=domain)
    C = margin_matrix(y, K)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if not use_lirpa:
            with torch.no_grad():
                lb, _ = bm.compute(s, C=C, method=method, upper=False, alpha_steps=alpha_steps,
                                   max_memory=max_memory)
    # auto_LiRPA's own warnings (graph tracing) are its business, not the report's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if use_lirpa:
            lb = lirpa.compute(s, C, method, alpha_steps=alpha_steps)
        if xcheck is not None:
            _cross_check(bm, lirpa, s, C, method, alpha_steps, xcheck, lb if s.norm == "linf" else None)
    for w in caught:
        warn_log.append(str(w.message))
    from certonnx.certify.head import margins_certify

    return margins_certify(bm, lb.detach().amin(1), x, eps, norm, domain, head), used


def _cross_check(bm: BoundedModule, lirpa: Any, s: InputSet, C: torch.Tensor, method: str, alpha_steps: int,
                 log: dict[str, dict[str, Any]], ours: torch.Tensor | None = None) -> None:
    """certonnx's ``method`` bound against the best of auto_LiRPA's reference methods on the same
    set (L2, L1: the ball alone on both sides); raise on a bound tighter than auto_LiRPA's.
    ``ours``: certonnx's bound on ``s`` when the caller has it (L∞: the same set)."""
    from certonnx.bounds.auto_lirpa import ESCALATE, REFERENCES, CrossCheckError, cross_check, informational

    same = s if s.norm == "linf" else InputSet(s.x, s.eps, norm=s.norm, domain=None)  # L2, L1: the ball alone
    if ours is None:
        with torch.no_grad():
            ours, _ = bm.compute(same, C=C, method=method, upper=False, alpha_steps=alpha_steps)
    refs = {m: lirpa.compute(same, C, m, alpha_steps=alpha_steps) for m in REFERENCES[method]}
    got = cross_check(ours, refs)
    key = f"{s.norm}/{method}"
    acc = log.setdefault(key, {"pairs": 0, "disagreements": 0, "max_tighter": 0.0, "max_looser": 0.0,
                               "reference": list(REFERENCES[method]), "escalated": 0,
                               "informational": informational(method, s.norm)})
    failed = ""
    if got["disagreements"] and ESCALATE not in refs and not informational(method, s.norm):
        acc["escalated"] += 1
        try:
            refs[ESCALATE] = lirpa.compute(same, C, ESCALATE, alpha_steps=max(alpha_steps, 20))
            got = cross_check(ours, refs)
        except CertonnxError as e:
            failed = f"; {e}"
    acc["pairs"] += got["pairs"]
    acc["disagreements"] += got["disagreements"]
    acc["max_tighter"] = max(acc["max_tighter"], got["tighter"])
    acc["max_looser"] = max(acc["max_looser"], got["looser"])
    if got["disagreements"] and not informational(method, s.norm):
        raise CrossCheckError(
            f"cross-check failed: certonnx's {method} lower bound exceeds the best of auto_LiRPA's "
            f"({', '.join(refs)}) by {got['tighter']:.3g} beyond tolerance on "
            f"{got['disagreements']} margin(s) ({s.norm}){failed}; this may be a soundness bug in certonnx, no result "
            "is reported")


#: seconds between two plain-text progress lines when stderr is not a terminal
PLAIN_PROGRESS_EVERY = 5.0


def _progress(progress: bool | Callable[[int], None], total: int) -> tuple[Any, Callable[[int, str], None]]:
    """``(bar, tick)``: ``tick(k, stage)`` reports ``k`` more (sample, norm) pairs done. A rich
    bar on a terminal; on a pipe or a CI log, one plain line every few seconds (and at the end),
    so a long run is never silent; nothing with ``progress=False``; a callable gets ``k``."""
    if callable(progress):
        user = progress
        return None, lambda k, stage="": user(k)
    if not progress:
        return None, lambda k, stage="": None
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        import sys

        state = {"done": 0, "last": time.monotonic()}
        t0 = state["last"]

        def plain(k: int, stage: str = "") -> None:
            state["done"] += k
            now = time.monotonic()
            if now - state["last"] >= PLAIN_PROGRESS_EVERY or state["done"] >= total:
                state["last"] = now
                print(f"certifying: {int(state['done'])}/{total} samples·norms done ({stage}), {now - t0:.0f} s",
                      file=sys.stderr, flush=True)

        return None, plain
    bar = Progress(TextColumn("certifying {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=console, transient=True)
    task = bar.add_task("", total=total)
    bar.start()

    def advance(k: int, stage: str = "") -> None:
        bar.update(task, advance=k, description=stage)

    return bar, advance
