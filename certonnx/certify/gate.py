"""Deployment gate: does a model still meet its robustness requirements?

A CI job states what a model must guarantee (``linf:0.1>=0.90``, ``union>=0.30``, ``clean>=0.95``)
and gets pass/fail. The numbers come from the certificate in the model's metadata, which is only
trusted when its weight fingerprint matches the weights in the file, or from a fresh
certification on data (``recertify``). Kept free of click so it is usable from Python.

Requirement grammar (one per ``--require``)::

    METRIC[:EPS] OP VALUE
    METRIC = linf | l2 | l1 (certified accuracy under that norm) | union (certified under every
             norm at once) | clean (accuracy without perturbation) | pgd-linf | pgd-l2 | pgd-l1
             | smoothed-linf | smoothed-l2 | smoothed-l1 | smoothed-union | smoothed-clean (the
             probabilistic randomized-smoothing certificate of ``certify --method smoothing``,
             read only from the certificate's ``probabilistic`` section, never from the
             deterministic numbers, and the other way round)
    EPS    = radius in the certificate's input space (raw pixels), a number or a fraction like
             8/255; omitted: the certificate's ε
    OP     = >= | >
    VALUE  = a fraction in [0, 1] or a percentage like 90%

Why a certificate at a larger ε satisfies a requirement at a smaller one: the smaller ball is a
subset of the larger, so every sample proved robust at the larger radius is robust at the
smaller one, and the certified accuracy is a valid lower bound there too. The converse is not
true, so a certificate at a smaller ε never satisfies a larger requirement.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from certonnx.certify.norms import canonical_norm, eps_range_error, parse_eps
from certonnx.errors import CertonnxError

_REQ = re.compile(
    r"^\s*(?P<metric>[a-z0-9_\-]+)\s*(?::\s*(?P<eps>[0-9.eE+\-]+(?:\s*/\s*[0-9.eE+\-]+)?))?\s*(?P<op>>=|>)\s*(?P<value>[0-9.eE+\-]+)\s*(?P<pct>%)?\s*$",
    re.I,
)
NORM_METRICS = ("linf", "l2", "l1")
SMOOTHED = "smoothed-"
SMOOTHED_METRICS = tuple(SMOOTHED + m for m in (*NORM_METRICS, "union", "clean"))
METRICS = (*NORM_METRICS, "union", "clean", "pgd-linf", "pgd-l2", "pgd-l1", *SMOOTHED_METRICS)
_ALIASES = {"inf": "linf", "l_inf": "linf", "linfty": "linf", "2": "l2", "l_2": "l2", "1": "l1", "l_1": "l1",
            "all": "union", "accuracy": "clean", "pgd_linf": "pgd-linf", "pgd_l2": "pgd-l2", "pgd_l1": "pgd-l1"}
# ε values are printed with a few digits, so compare them with a relative tolerance
_EPS_RTOL = 1e-6


class RequirementError(CertonnxError):
    """A ``--require`` string that cannot be parsed."""


@dataclass
class Requirement:
    """One parsed requirement, e.g. ``linf:0.1>=0.9``."""

    text: str
    metric: str
    eps: float | None
    op: str
    value: float

    @property
    def probabilistic(self) -> bool:
        """A requirement on the randomized-smoothing certificate (``smoothed-*``)."""
        return self.metric.startswith(SMOOTHED)

    def norm(self) -> str | None:
        """The norm this requirement is about (``None`` for clean/union)."""
        metric = self.metric[len(SMOOTHED):] if self.probabilistic else self.metric
        if metric in NORM_METRICS:
            return metric
        if metric.startswith("pgd-"):
            return metric[4:]
        return None

    def holds(self, actual: float) -> bool:
        return actual >= self.value if self.op == ">=" else actual > self.value


@dataclass
class Outcome:
    """What was checked against one requirement, for the report and the JSON."""

    requirement: str
    passed: bool
    actual: float | None
    required: float
    op: str
    eps: float | None = None
    source: str = "certificate"
    reason: str = ""


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": list(self.reasons),
                "requirements": [asdict(o) for o in self.outcomes]}


def _metric(name: str) -> str:
    """The metric's canonical name: norms as :func:`~certonnx.certify.norms.canonical_norm`
    spells them (``Linf``, ``LINF``, ``L2`` too), also after ``pgd-``."""
    metric = name.lower()
    smoothed = SMOOTHED if metric.startswith(("smoothed-", "smoothed_")) else ""
    metric = metric[len(smoothed):]
    metric = _ALIASES.get(metric, metric)
    prefix = "pgd-" if metric.startswith(("pgd-", "pgd_")) else ""
    try:
        return smoothed + prefix + canonical_norm(metric[len(prefix):])
    except ValueError:
        return smoothed + metric


def parse_requirement(text: str) -> Requirement:
    """``'linf:0.1>=0.90'`` -> Requirement; a clear one-line error for anything else."""
    m = _REQ.match(text)
    if not m:
        raise RequirementError(
            f"cannot parse requirement {text!r}: expected METRIC[:EPS]>=VALUE, e.g. linf:0.1>=0.90, "
            "union>=0.3, clean>=95%"
        )
    metric = _metric(m.group("metric"))
    if metric not in METRICS:
        raise RequirementError(f"unknown metric {m.group('metric')!r} in {text!r} (choose from {', '.join(METRICS)})")
    eps: float | None = None
    if m.group("eps") is not None:
        if metric in ("union", "clean", SMOOTHED + "union", SMOOTHED + "clean"):
            raise RequirementError(f"{text!r}: {metric} takes no ε (the ε of each norm applies)")
        try:
            eps = parse_eps(m.group("eps"))
        except ValueError as e:
            raise RequirementError(f"{text!r}: {e}") from None
    try:
        value = float(m.group("value"))
    except ValueError:
        raise RequirementError(f"{text!r}: {m.group('value')!r} is not a number") from None
    if m.group("pct"):
        value /= 100.0
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise RequirementError(f"{text!r}: the threshold must be a fraction in [0, 1] or a percentage")
    return Requirement(text=text.strip(), metric=metric, eps=eps, op=m.group("op"), value=value)


def _eps_covers(cert_eps: float, required: float) -> bool:
    return cert_eps >= required * (1 - _EPS_RTOL) - 1e-12


def _fmt(v: float) -> str:
    return f"{v:.4f}".rstrip("0").rstrip(".") if v not in (0.0, 1.0) else f"{v:g}"


def evaluate(requirements: list[Requirement], numbers: dict[str, Any], source: str) -> list[Outcome]:
    """Check requirements against certify-style numbers (a certificate or a fresh result).

    ``numbers`` has the certificate/certify keys: ``norms`` (or ``epsilon``), ``clean_accuracy``,
    ``certified_accuracy``, ``union_certified_accuracy``, ``pgd_accuracy``.
    """
    out: list[Outcome] = []
    for r in requirements:
        o = Outcome(requirement=r.text, passed=False, actual=None, required=r.value, op=r.op, eps=r.eps,
                    source=source)
        if r.probabilistic:
            _evaluate_smoothed(r, o, numbers.get("probabilistic"), source)
        else:
            _evaluate_deterministic(r, o, numbers, source)
        if o.actual is not None:
            o.passed = r.holds(float(o.actual))
            if not o.passed:
                eps_txt = f" at ε={o.eps:g}" if o.eps is not None else ""
                o.reason = f"{r.metric}{eps_txt} is {_fmt(float(o.actual))}, required {r.op} {_fmt(r.value)}"
        out.append(o)
    return out


def _evaluate_smoothed(r: Requirement, o: Outcome, prob: dict[str, Any] | None, source: str) -> None:
    """``o.actual`` from the probabilistic section (or ``o.reason`` why there is none)."""
    if not prob:
        o.reason = (f"{source} has no probabilistic (randomized smoothing) certificate: write one with "
                    "`certonnx certify --method smoothing -o`")
        return
    metric = r.metric[len(SMOOTHED):]
    if metric == "clean":
        o.actual = prob.get("smoothed_accuracy")
        return
    if metric == "union":
        o.actual = prob.get("union_certified_accuracy")
        return
    _norm_outcome(r, o, dict(prob.get("norms") or {}), dict(prob.get("certified_accuracy") or {}),
                  f"{source}'s probabilistic section", "smoothed certified", covers_smaller=True,
                  again=" (certify again with --method smoothing at that ε)")


def _norm_outcome(r: Requirement, o: Outcome, norms: dict[str, float], table: dict[str, float], source: str,
                  what: str, covers_smaller: bool, hint: str = "",
                  again: str = " (re-certify with --data ... --recertify)") -> None:
    norm = r.norm()
    if norm not in norms or norm not in table:
        have = ", ".join(f"{k}:{v:g}" for k, v in norms.items()) or "none"
        o.reason = f"{source} has no {what} accuracy for {norm} (it covers {have}){hint}"
        return
    have_eps = float(norms[norm])
    o.eps = have_eps if r.eps is None else r.eps
    # PGD accuracy is an *upper* bound on robust accuracy: it does not transfer to other ε
    ok_eps = (_eps_covers(have_eps, o.eps) if covers_smaller
              else math.isclose(have_eps, o.eps, rel_tol=_EPS_RTOL, abs_tol=1e-12))
    if not ok_eps:
        o.reason = f"{source} covers {norm} at ε={have_eps:g}, not the required ε={o.eps:g}{again}"
    else:
        o.actual = float(table[norm])


def _evaluate_deterministic(r: Requirement, o: Outcome, numbers: dict[str, Any], source: str) -> None:
    """``o.actual`` from the deterministic numbers (or ``o.reason`` why there is none)."""
    norms: dict[str, float] = dict(numbers.get("norms") or numbers.get("epsilon") or {})
    cert_acc: dict[str, float] = dict(numbers.get("certified_accuracy") or {})
    pgd_acc: dict[str, float] = dict(numbers.get("pgd_accuracy") or {})
    hint = (f"; its {', '.join(numbers['probabilistic'].get('norms') or {})} numbers are probabilistic "
            "(randomized smoothing): require smoothed-<norm> for those" if numbers.get("probabilistic") else "")
    if r.metric == "clean":
        o.actual = numbers.get("clean_accuracy")
    elif r.metric == "union":
        u = numbers.get("union_certified_accuracy")
        if u is None and len(cert_acc) == 1:
            u = next(iter(cert_acc.values()))  # one norm: "all norms at once" is that norm
        o.actual = u
        if u is None:
            o.reason = f"{source} has no union certified accuracy{hint}"
    else:
        det = r.metric in NORM_METRICS
        _norm_outcome(r, o, norms, cert_acc if det else pgd_acc, source, "certified" if det else "PGD",
                      covers_smaller=det, hint=hint)


def recertify_norms(requirements: list[Requirement], certificate: dict[str, Any] | None) -> dict[str, float]:
    """The norms and radii a fresh certification must cover: each norm's required ε (the largest
    one asked for), else the certificate's ε for that norm."""
    have = dict((certificate or {}).get("norms") or {})
    out: dict[str, float] = {}
    smoothed = [r.text for r in requirements if r.probabilistic]
    if smoothed:
        raise RequirementError(f"{smoothed[0]!r}: smoothed-* requirements are checked against the stored "
                               "certificate only; re-certify with `certonnx certify --method smoothing -o` and check "
                               "that file without --data")
    for r in requirements:
        norm = r.norm()
        if norm is None:
            continue
        eps = r.eps if r.eps is not None else have.get(norm)
        if eps is None:
            raise RequirementError(f"{r.text!r}: give an ε (e.g. {norm}:0.1>=...) — the model has no certificate "
                                   f"for {norm} to take it from")
        out[norm] = max(out.get(norm, 0.0), float(eps))
    if not out:
        out = {k: float(v) for k, v in have.items()}
    if not out:
        raise RequirementError("nothing to re-certify: no norm in the requirements and no certificate to take "
                               "norms from (add e.g. --require linf:0.1>=0.9)")
    return out


def check_eps_ranges(requirements: list[Requirement], domain: Any = (0.0, 1.0),
                     sample_shape: Any = None) -> None:
    """RequirementError when a requirement's ε is larger than the input range (see
    :func:`~certonnx.certify.norms.eps_range_error`): ``linf:8>=0.5`` for pixels in [0, 1]
    would otherwise just fail, hiding that 8/255 was meant."""
    for r in requirements:
        norm = r.norm()
        if norm is None or r.eps is None:
            continue
        msg = eps_range_error(norm, r.eps, domain, sample_shape)
        if msg:
            raise RequirementError(f"{r.text!r}: {msg}")


def check_certificate(certificate: dict[str, Any] | None, requirements: list[Requirement],
                      fresh: dict[str, Any] | None = None) -> GateResult:
    """The whole gate: certificate present and untampered, then every requirement.

    A modified model (fingerprint mismatch) fails even with ``fresh`` numbers: a pipeline must
    notice that the file it is about to ship is not the one that was certified.
    """
    res = GateResult(passed=True)
    if certificate is None and fresh is None:
        res.reasons.append("the model carries no certonnx certificate (certify it with "
                           "`certonnx certify ... -o`, or pass --data FILE --recertify)")
    if certificate is not None:
        from certonnx.io.metadata import SCHEMA

        if certificate.get("schema") != SCHEMA:
            res.reasons.append(f"unknown certificate schema {certificate.get('schema')!r} (expected {SCHEMA})")
        elif not certificate.get("weights_match"):
            res.reasons.append("the weights do not match the certificate's fingerprint (weights_sha256): the "
                               "model was modified after certification")
        elif certificate.get("graph_match") is False:
            res.reasons.append("the graph does not match the certificate's fingerprint (graph_sha256): nodes, "
                               "constants or wiring were modified after certification")
    if not res.reasons:
        res.outcomes = evaluate(requirements, fresh if fresh is not None else certificate or {},
                                "re-certification" if fresh is not None else "certificate")
        res.reasons += [o.reason for o in res.outcomes if not o.passed]
    res.passed = not res.reasons
    return res
