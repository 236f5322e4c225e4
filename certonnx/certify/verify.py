"""Verification of one VNN-LIB property: attack, bound, then branch and bound.

Answers (VNN-COMP words):

* ``sat``: a counterexample was found *and* re-checked with onnxruntime on the original file
  (inside the box, output condition met with no tolerance);
* ``unsat``: every disjunct of the output condition is proven impossible on every (sub-)box by
  sound bounds; never answered otherwise;
* ``timeout``: the time ran out with sub-boxes still open;
* ``unknown``: the search gave up (too many open sub-boxes) before the timeout.

The branch and bound is batched: a batch of domains is bounded in one pass, attacked in one PGD
call and split in one tensor operation. ReLU networks split activations (α/β-optimised CROWN,
:mod:`certonnx.certify.relu_split`); other networks, and inputs with few dimensions, split input
dimensions.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from certonnx.attacks.pgd import pgd_attack, property_tensors
from certonnx.certify.ort_check import OrtRunner, condition_holds
from certonnx.certify.vnnlib import VnnlibProperty
from certonnx.errors import PropertyError

ALPHA_STEPS = 20
BETA_STEPS = 10  # α/β optimisation steps per domain in ReLU branch and bound
BETA_LR = 0.1
#: the attack's schedule: random starts spread by output-diversified steps (ODS), then PGD
#: from half the box's radius with the step decayed per step (measured on the VNN-COMP mnist_fc
#: sat instances: docs/verify.md); 0 / None / 1.0 is the plain fixed-step PGD
ATTACK_ODS_STEPS = 10
ATTACK_STEP: float | None = 0.5
ATTACK_DECAY = 0.9
INPUT_SPLIT_MAX_DIM = 16  # below this many inputs, split input dimensions rather than ReLUs
RESULTS = ("sat", "unsat", "unknown", "timeout", "error")


@dataclass
class VerifyStats:
    """What the search did, for --json and benchmarks."""

    phase: str = ""
    boxes_bounded: int = 0
    boxes_split: int = 0
    max_open: int = 0
    attack_calls: int = 0
    ort_checks: int = 0
    ort_rejected: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextmanager
def frozen(module: torch.nn.Module):
    """Parameters without grad while attacking (faster; restored afterwards)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _f32_outward(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 box that contains the float64 box (rounding outward keeps the proof sound)."""
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    lo32 = np.where(lo32.astype(np.float64) > lo, np.nextafter(lo32, np.float32(-np.inf)), lo32)
    hi32 = np.where(hi32.astype(np.float64) < hi, np.nextafter(hi32, np.float32(np.inf)), hi32)
    return lo32, hi32


def _f32_inside(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """float32 point inside the float64 box (rounding inward), for counterexamples."""
    x = np.clip(x.astype(np.float64), lo, hi)
    x32 = x.astype(np.float32)
    x32 = np.where(x32.astype(np.float64) < lo, np.nextafter(x32, np.float32(np.inf)), x32)
    x32 = np.where(x32.astype(np.float64) > hi, np.nextafter(x32, np.float32(-np.inf)), x32)
    return x32


class _Checker:
    """Re-checks candidate counterexamples on the original file with onnxruntime."""

    def __init__(self, onnx_path: str | os.PathLike[str] | None, model: Any, stats: VerifyStats) -> None:
        self.stats = stats
        self.run: Callable[[np.ndarray], np.ndarray]
        if onnx_path is not None:
            norm = getattr(model, "normalization", None)
            # a normalisation declared with --mean/--std is not in the file: the runner applies it
            declared = norm if norm is not None and not norm.inside else None
            self.run = OrtRunner(onnx_path, declared.mean if declared else None, declared.std if declared else None)
        else:  # library use on a plain torch model: the torch model is the reference
            mod = model.module if hasattr(model, "module") else model

            def _torch(x: np.ndarray) -> np.ndarray:
                with torch.no_grad():
                    return mod(torch.as_tensor(x)).flatten(1).double().numpy()

            self.run = _torch

    def check(
        self, xs: np.ndarray, lo: np.ndarray, hi: np.ndarray, disjuncts: list[tuple[np.ndarray, np.ndarray]]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The first candidate (rows of ``xs``, flat) that is a genuine counterexample."""
        x32 = _f32_inside(xs, lo, hi)
        self.stats.ort_checks += int(x32.shape[0])
        out = self.run(x32)
        ok = condition_holds(out, disjuncts, atol=0.0)
        inside = np.all((x32 >= lo - 1e-9) & (x32 <= hi + 1e-9), axis=1)
        good = np.where(ok & inside)[0]
        self.stats.ort_rejected += int(x32.shape[0] - good.size)
        if good.size == 0:
            return None
        i = int(good[0])
        return x32[i], out[i]


def verify(
    model: Any,
    prop: VnnlibProperty,
    timeout: float = 60.0,
    onnx_path: str | os.PathLike[str] | None = None,
    *,
    method: str = "crown",
    batch_size: int = 512,
    attack_restarts: int = 8,
    attack_steps: int = 50,
    max_open: int = 200_000,
    seed: int = 0,
    device: torch.device | str = "cpu",
    stats: VerifyStats | None = None,
) -> tuple[str, dict[str, np.ndarray] | None]:
    """Decide one property; returns ``(result, counterexample)``.

    ``counterexample`` (for ``sat``) is ``{"x": flat inputs, "y": outputs}`` as computed by
    onnxruntime on ``onnx_path`` (or by the torch model when no file is given).
    """
    from certonnx.bounds import BoundedModule, InputSet

    t0 = time.monotonic()
    deadline = t0 + float(timeout)
    st = stats if stats is not None else VerifyStats()
    module = model.module if hasattr(model, "module") else model
    sample_shape = tuple(model.sample_shape) if hasattr(model, "sample_shape") else None
    if sample_shape is None:
        raise PropertyError("verify needs the model's input shape")
    n_in = int(np.prod(sample_shape))
    if prop.n_inputs != n_in:
        raise PropertyError(
            f"the property has {prop.n_inputs} inputs but the model input {list(sample_shape)} has {n_in} values"
        )
    n_cls = int(model.num_classes) if hasattr(model, "num_classes") else None
    if n_cls is not None and prop.n_outputs != n_cls:
        raise PropertyError(f"the property has {prop.n_outputs} outputs but the model has {n_cls}")
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    checker = _Checker(onnx_path, model, st)
    if not prop.regions:
        st.phase = "empty input set"
        return "unsat", None

    with frozen(module):
        fn = module.to(dev)
        bm = BoundedModule(module, sample_shape)
        search = _Search(fn, bm, InputSet, checker, sample_shape, deadline, method, batch_size, max_open, gen, dev,
                         st)

        # phase 1: attack every region (cheap, finds most sat instances)
        st.phase = "attack"
        for lo, hi, dis in prop.regions:
            cex = _attack_boxes(search, lo[None], hi[None], dis, attack_steps, attack_restarts, targeted=True)
            if cex is not None:
                st.seconds = time.monotonic() - t0
                return "sat", cex
            if time.monotonic() > deadline:
                st.seconds = time.monotonic() - t0
                return "timeout", None

        # phase 2: branch and bound per region
        st.phase = "bab"
        for lo, hi, dis in prop.regions:
            res, cex = _bab(search, lo, hi, dis)
            if res != "unsat":
                st.seconds = time.monotonic() - t0
                return res, cex
        st.seconds = time.monotonic() - t0
        return "unsat", None


#: attack copies (box × restart × disjunct) per PGD call of :func:`_attack_boxes`
ATTACK_CHUNK = 4096


@dataclass
class _Search:
    """What every phase of one ``verify`` call shares: the model (torch, bounded, and the
    onnxruntime checker), the input shape, the budget and options, the random generator and the
    statistics. One object instead of the same dozen arguments on every helper."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    bm: Any
    input_set: Any  # certonnx.bounds.InputSet, imported lazily
    checker: _Checker
    sample_shape: tuple[int, ...]
    deadline: float
    method: str
    batch_size: int
    max_open: int
    gen: torch.Generator
    dev: torch.device
    st: VerifyStats


def _attack_boxes(
    search: _Search,
    lo: np.ndarray,
    hi: np.ndarray,
    dis: list[tuple[np.ndarray, np.ndarray]],
    steps: int,
    restarts: int,
    box_lo: np.ndarray | None = None,
    box_hi: np.ndarray | None = None,
    targeted: bool = False,
) -> dict[str, np.ndarray] | None:
    """PGD on a batch of boxes ``(N, n_in)``; candidates with loss <= 0 go to onnxruntime.

    ``box_lo/box_hi`` is the region the counterexample must lie in (the sub-boxes are inside it).
    """
    fn, checker, sample_shape, gen, dev, st = (search.fn, search.checker, search.sample_shape, search.gen,
                                               search.dev, search.st)
    st.attack_calls += 1
    N = lo.shape[0]
    R = max(restarts, 1)
    A, b = property_tensors([(torch.as_tensor(a), torch.as_tensor(bb)) for a, bb in dis])
    D = A.shape[0]
    targeted = targeted and D > 1
    # targeted: one copy per (box, restart, disjunct), each chasing a single disjunct, which
    # gives far more diverse restarts than always following the currently easiest one
    reps = D * R if targeted else R
    total = N * reps
    lo_all = torch.as_tensor(lo, dtype=torch.float32, device=dev)
    hi_all = torch.as_tensor(hi, dtype=torch.float32, device=dev)
    A, b = A.to(dev), b.to(dev)
    rlo = lo[0] if box_lo is None else box_lo
    rhi = hi[0] if box_hi is None else box_hi
    # in chunks of copies: memory stays bounded for properties with thousands of disjuncts,
    # the deadline is checked between chunks, and a counterexample ends the search early
    for start in range(0, total, ATTACK_CHUNK):
        c = torch.arange(start, min(start + ATTACK_CHUNK, total), device=dev)
        box = c // reps
        if targeted:
            A_t, b_t = A[c % D].unsqueeze(1), b[c % D].unsqueeze(1)  # (n, 1, M, K), (n, 1, M)
        else:
            A_t, b_t = A.unsqueeze(0).expand(c.numel(), *A.shape), b.unsqueeze(0).expand(c.numel(), *b.shape)
        lo_t, hi_t = lo_all[box].view(-1, *sample_shape), hi_all[box].view(-1, *sample_shape)
        x_adv, loss = pgd_attack(fn, (lo_t + hi_t) / 2, None, steps=steps, restarts=1, spec=(A_t, b_t),
                                 box=(lo_t, hi_t), generator=gen, return_loss=True, random_init=True,
                                 ods_steps=ATTACK_ODS_STEPS, step_size=ATTACK_STEP, step_decay=ATTACK_DECAY)
        cand = torch.nonzero(loss <= 1e-4).flatten()
        if cand.numel():
            order = cand[torch.argsort(loss[cand])][:16]
            found = checker.check(x_adv[order].flatten(1).detach().cpu().double().numpy(), rlo, rhi, dis)
            if found is not None:
                return {"x": found[0], "y": found[1]}
        if time.monotonic() > search.deadline:
            break
    return None


def _bab(
    search: _Search,
    lo: np.ndarray,
    hi: np.ndarray,
    dis: list[tuple[np.ndarray, np.ndarray]],
) -> tuple[str, dict[str, np.ndarray] | None]:
    """Branch and bound on one region. A domain is a box, a ReLU sign assignment (ReLU
    networks with more than ``INPUT_SPLIT_MAX_DIM`` inputs split activations, others split input
    dimensions) and the mask of disjuncts not yet proven impossible on it; a domain is closed
    when all are proven, and the region is unsat when no domain is left open."""
    from certonnx.certify.relu_split import ReluSplitBounder

    fn, bm, InputSet, sample_shape, dev, st = (search.fn, search.bm, search.input_set, search.sample_shape,
                                               search.dev, search.st)
    deadline, method, batch_size, max_open = search.deadline, search.method, search.batch_size, search.max_open

    A, b = property_tensors([(torch.as_tensor(a), torch.as_tensor(bb)) for a, bb in dis])
    D, M, K = A.shape
    n_in = int(np.prod(sample_shape))
    lo32, hi32 = _f32_outward(lo, hi)
    b = _proof_threshold(dis, A, b, lambda: _output_magnitude(bm, InputSet, lo32, hi32, sample_shape))
    A, b = A.to(dev), b.to(dev)
    open_lo = torch.as_tensor(lo32, device=dev)[None]
    open_hi = torch.as_tensor(hi32, device=dev)[None]
    open_mask = torch.ones(1, D, dtype=torch.bool, device=dev)
    rb = ReluSplitBounder(bm) if method in ("crown", "alpha-crown") else None
    relu_mode = rb is not None and rb.usable and n_in > INPUT_SPLIT_MAX_DIM
    total = 0
    if relu_mode:
        assert rb is not None
        with torch.no_grad():
            rb._init_sizes(bm.ibp_pass(InputSet.from_box(open_lo.view(1, *sample_shape),
                                                         open_hi.view(1, *sample_shape))))
        total = rb.total
    open_split = torch.zeros(1, total, dtype=torch.int8, device=dev)
    # parents' pre-activation bounds and final bounds (valid on a superset of each child)
    open_plo = torch.full((1, total), -torch.inf, device=dev)
    open_phi = torch.full((1, total), torch.inf, device=dev)
    open_plb = torch.full((1, D * M), -torch.inf, device=dev)
    C_full = A.reshape(1, D * M, K)
    if relu_mode:
        assert rb is not None
        root = _root_alpha_bounds(search, rb, open_lo, open_hi, C_full)
        if root is not None:
            open_plb, open_plo, open_phi = root
    st.phase = "bab (relu splits)" if relu_mode else "bab (input splits)"
    first = True
    cur_batch = 1  # grows while a batch takes well under the time left
    per_box = 0.0  # seconds per domain of the last batch
    t_crown = 0.0
    while open_lo.shape[0] > 0:
        t_batch = time.monotonic()
        if time.monotonic() > deadline:
            return "timeout", None
        st.max_open = max(st.max_open, int(open_lo.shape[0]))
        if open_lo.shape[0] > max_open:
            st.notes.append(f"gave up: more than {max_open} open domains")
            return "unknown", None
        n = min(cur_batch, open_lo.shape[0])
        if per_box > 0:  # never start a batch that cannot finish before the deadline
            fit = int((deadline - time.monotonic()) / per_box)
            if fit < 1:
                return "timeout", None
            n = min(n, fit)
        blo, bhi, bmask, bsplit = open_lo[:n], open_hi[:n], open_mask[:n], open_split[:n]
        bplo, bphi, bplb = open_plo[:n], open_phi[:n], open_plb[:n]
        open_lo, open_hi, open_mask, open_split = open_lo[n:], open_hi[n:], open_mask[n:], open_split[n:]
        open_plo, open_phi, open_plb = open_plo[n:], open_phi[n:], open_plb[n:]
        proven = ~bmask
        pre_lo = pre_hi = None
        if relu_mode:
            assert rb is not None
            t_m = time.monotonic()
            st.boxes_bounded += n
            lb, empty, pre_lo, pre_hi = rb.bound(blo.view(n, *sample_shape), bhi.view(n, *sample_shape),
                                                 bsplit, C_full.expand(n, D * M, K), prior=(bplo, bphi),
                                                 opt_steps=BETA_STEPS, lr=BETA_LR)
            lb = torch.maximum(lb, bplb)
            proven = proven | empty[:, None] | _gap_proves(lb, b, n, D, M)
        else:
            meths = ["crown", "alpha-crown"] if first and method == "crown" else [method]
            for meth in meths:
                # each α step re-runs every CROWN pass with its gradient (~3 CROWN runs)
                if meth == "alpha-crown" and t_crown * (3 * ALPHA_STEPS + 2) > 0.5 * (deadline - time.monotonic()):
                    continue  # alpha-CROWN could not finish in time: go straight to splitting
                t_m = time.monotonic()
                proven = proven | _prove(bm, InputSet, blo, bhi, A, b, sample_shape, meth, st)
                if meth == "crown":
                    t_crown = time.monotonic() - t_m
                if bool(proven.all()):
                    break
        first = False
        keep = ~proven.all(1)
        if not bool(keep.any()):
            continue
        blo, bhi, bmask, bsplit = blo[keep], bhi[keep], ~proven[keep], bsplit[keep]
        bscore = None
        if relu_mode and pre_lo is not None and pre_hi is not None:
            bplo, bphi, bplb = pre_lo[keep], pre_hi[keep], lb[keep]
            bscore = rb.scores[keep] if rb is not None and rb.scores is not None else None
        else:
            bplo, bphi, bplb = bplo[keep], bphi[keep], bplb[keep]
        if time.monotonic() > deadline:
            return "timeout", None
        # attack: a counterexample anywhere in the region settles the property
        if relu_mode:  # domains share the region's box: a few fresh random restarts on it
            cex = _attack_boxes(search, lo[None], hi[None], dis, steps=20, restarts=2)
        else:
            cex = _attack_boxes(search, blo.double().cpu().numpy(), bhi.double().cpu().numpy(), dis,
                                steps=20, restarts=1, box_lo=lo, box_hi=hi)
        if cex is not None:
            return "sat", cex
        took = time.monotonic() - t_batch
        per_box = took / n
        if took * 4 < deadline - time.monotonic() and cur_batch < batch_size:
            cur_batch = min(cur_batch * 2, batch_size)
        elif took * 2 > deadline - time.monotonic() and cur_batch > 1:
            cur_batch = max(cur_batch // 2, 1)
        # split: an unstable ReLU where one is left (relu mode), else an input dimension (smear)
        nid = torch.full((blo.shape[0],), -1, dtype=torch.long, device=dev)
        if relu_mode and pre_lo is not None and pre_hi is not None:
            nid = ReluSplitBounder.choose(bplo, bphi, bsplit, bscore)
        use_relu = nid >= 0
        c_lo, c_hi, c_mask, c_split, c_plo, c_phi, c_plb = [], [], [], [], [], [], []
        if bool(use_relu.any()):
            r = torch.nonzero(use_relu).flatten()
            sp_pos, sp_neg = bsplit[r].clone(), bsplit[r].clone()
            sp_pos.scatter_(1, nid[r][:, None], 1)
            sp_neg.scatter_(1, nid[r][:, None], -1)
            c_lo += [blo[r], blo[r]]
            c_hi += [bhi[r], bhi[r]]
            c_mask += [bmask[r], bmask[r]]
            c_split += [sp_pos, sp_neg]
            c_plo += [bplo[r], bplo[r]]
            c_phi += [bphi[r], bphi[r]]
            c_plb += [bplb[r], bplb[r]]
        if bool((~use_relu).any()):
            r = torch.nonzero(~use_relu).flatten()
            ilo, ihi, imask, isplit = blo[r], bhi[r], bmask[r], bsplit[r]
            dim = _split_dims(fn, ilo, ihi, A, b, imask, sample_shape)
            mid = ((ilo + ihi) / 2).gather(1, dim[:, None])
            lo_r, hi_l = ilo.clone(), ihi.clone()
            lo_r.scatter_(1, dim[:, None], mid)
            hi_l.scatter_(1, dim[:, None], mid)
            c_lo += [ilo, lo_r]
            c_hi += [hi_l, ihi]
            c_mask += [imask, imask]
            c_split += [isplit, isplit]
            # input splits change the box: the parent's bounds still hold on the smaller box
            c_plo += [bplo[r], bplo[r]]
            c_phi += [bphi[r], bphi[r]]
            c_plb += [bplb[r], bplb[r]]
        st.boxes_split += int(blo.shape[0])
        # new domains go to the front: depth-first keeps the queue short
        open_lo = torch.cat([*c_lo, open_lo])
        open_hi = torch.cat([*c_hi, open_hi])
        open_mask = torch.cat([*c_mask, open_mask])
        open_split = torch.cat([*c_split, open_split])
        open_plo = torch.cat([*c_plo, open_plo])
        open_phi = torch.cat([*c_phi, open_phi])
        open_plb = torch.cat([*c_plb, open_plb])
    return "unsat", None


def _root_alpha_bounds(search: _Search, rb: Any, lo: torch.Tensor, hi: torch.Tensor, C: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """α-CROWN on the whole region, with the slopes of every intermediate bound optimised:
    its bound and its pre-activation intervals, which every domain of the ReLU branch and
    bound then starts from (children are intersected with their parents'). Skipped when
    one CROWN pass says that ``ALPHA_STEPS`` steps (about 3 passes each) would take more than
    a quarter of the time left."""
    bm, shape = search.bm, search.sample_shape
    inset = search.input_set.from_box(lo.view(1, *shape), hi.view(1, *shape))
    t0 = time.monotonic()
    with torch.no_grad():
        bm.compute(inset, C, "crown", upper=False)
    t_crown = time.monotonic() - t0
    if t_crown * (3 * ALPHA_STEPS + 2) > 0.25 * (search.deadline - time.monotonic()):
        return None
    with torch.no_grad():
        lb, itv = bm.alpha_crown_intermediate(inset, C, steps=ALPHA_STEPS)
    search.st.notes.append(f"root alpha-CROWN in {time.monotonic() - t0:.2f}s")
    plo = torch.cat([itv[n].lower.reshape(1, -1) for n in rb.nodes], 1)
    phi = torch.cat([itv[n].upper.reshape(1, -1) for n in rb.nodes], 1)
    return lb.detach(), plo.detach(), phi.detach()


def _gap_proves(lb: torch.Tensor, b: torch.Tensor, N: int, D: int, M: int) -> torch.Tensor:
    """``(N, D)``: some row of the disjunct has ``lb(A_row y) > b_row``.

    ``lb`` is a bound of the float32 model's outputs that already includes every rounding
    term (:mod:`certonnx.bounds.rounding`) and ``b`` the threshold of :func:`_proof_threshold`,
    so no extra margin is needed: a float32 difference is positive exactly when ``lb > b``."""
    gap = lb.detach().view(N, D, M) - b[None]
    gap = torch.where(torch.isfinite(gap), gap, torch.full_like(gap, -math.inf))
    return (gap > 0).any(2)


def _output_magnitude(bm: Any, InputSet: Any, lo32: np.ndarray, hi32: np.ndarray,
                      sample_shape: tuple[int, ...]) -> torch.Tensor:
    """``max |y_k|`` over the region (IBP), shape ``(K,)``."""
    s = InputSet.from_box(torch.as_tensor(lo32).view(1, *sample_shape), torch.as_tensor(hi32).view(1, *sample_shape))
    with torch.no_grad():
        lb, ub = bm.compute(s, method="ibp")
    return torch.maximum(lb.abs(), ub.abs())[0].double()


def _proof_threshold(dis: list[tuple[np.ndarray, np.ndarray]], A32: torch.Tensor, b32: torch.Tensor,
                     y_mag: Callable[[], torch.Tensor]) -> torch.Tensor:
    """float32 thresholds ``t`` (D, M) such that ``A32·y > t`` proves ``A·y > b`` for the
    property's exact (float64) coefficients.

    ``A·y ≥ A32·y − Σ_k |A − A32|_k |y_k|``, so ``t = b + Σ_k |A − A32|_k max|y_k|``, rounded up
    to float32. Coefficients that float32 represents exactly (±1, 0, small integers: almost
    every VNN-LIB file) need no output magnitude; others take ``max|y|`` from IBP over the region.
    """
    D, M, K = A32.shape
    t = np.full((D, M), np.inf)
    mag: np.ndarray | None = None
    for i, (a, bb) in enumerate(dis):
        a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(bb, dtype=np.float64)
        da = np.abs(a64 - a64.astype(np.float32).astype(np.float64))
        row = b64.copy()
        if np.any(da > 0):
            if mag is None:
                mag = y_mag().cpu().numpy()
            row = row + (da * mag[None, :]).sum(1) * (1 + 1e-12)
        t[i, : len(row)] = row
    t32 = t.astype(np.float32)
    t32 = np.where(t32.astype(np.float64) < t, np.nextafter(t32, np.float32(np.inf)), t32)
    return torch.as_tensor(t32)  # padding rows stay +inf: never proven


def _prove(
    bm: Any,
    InputSet: Any,
    blo: torch.Tensor,
    bhi: torch.Tensor,
    A: torch.Tensor,
    b: torch.Tensor,
    sample_shape: tuple[int, ...],
    method: str,
    st: VerifyStats,
) -> torch.Tensor:
    """``(N, D)``: disjunct proven impossible on the box (some row has ``lb(A y) - b > 0``)."""
    N = blo.shape[0]
    D, M, K = A.shape
    st.boxes_bounded += N
    s = InputSet.from_box(blo.view(N, *sample_shape), bhi.view(N, *sample_shape))
    C = A.reshape(1, D * M, K).expand(N, D * M, K)
    with torch.no_grad():
        lb, _ = bm.compute(s, C=C, method=method, upper=False, alpha_steps=ALPHA_STEPS)
    return _gap_proves(lb, b, N, D, M)


def _split_dims(
    fn: Callable[[torch.Tensor], torch.Tensor],
    blo: torch.Tensor,
    bhi: torch.Tensor,
    A: torch.Tensor,
    b: torch.Tensor,
    bmask: torch.Tensor,
    sample_shape: tuple[int, ...],
) -> torch.Tensor:
    """Smear heuristic: width × |gradient| of the open disjuncts' objective at the box center."""
    N = blo.shape[0]
    c = ((blo + bhi) / 2).view(N, *sample_shape).detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(c).flatten(1)
        v = torch.einsum("dmk,nk->ndm", A, out) - b[None]
        # objective per open disjunct: its least violated row; disjuncts already proven are ignored
        obj = torch.where(bmask, v.amax(2), torch.zeros_like(v[..., 0]))
        (g,) = torch.autograd.grad(obj.sum(), c)
    width = (bhi - blo)
    score = width * g.flatten(1).abs() + 1e-12 * width  # width alone breaks ties (zero gradients)
    return score.argmax(1)
