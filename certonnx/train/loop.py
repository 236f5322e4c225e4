"""The certified-training loop: data, optimizer, schedules, checkpoints, logs.

Design choices (see docs/finetune.md):

* **Data order** comes from ``seed`` and the epoch number alone (a fresh generator per epoch),
  and the random starts of attacks from ``(seed, epoch, step, rank)``; so resuming from a
  checkpoint continues exactly as if the run had never stopped, without replaying RNG streams.
* **ε schedule**: ``warmup_epochs`` with ε = 0 (clean training), then a ramp over
  ``ramp_epochs`` updated every step, either "smooth" (Shi et al. 2021 / CTBench: polynomial
  growth with exponent 4 up to 25 % of the ramp, then linear, with matching slope) or linear.
* **BatchNorm**: every step runs the clean batch in training mode first (this updates the
  running statistics); the bound pass in training mode normalises with the statistics of the
  *clean* batch (the engine's BatchNorm rule observes the clean input), never with statistics
  of perturbed inputs; attacks run in eval mode. Evaluation and export use running statistics.
* **Checkpoints** are written atomically after every epoch; a kill at any moment loses at most
  the current epoch. A NaN/inf loss stops training with a :class:`TrainingError`, keeping the
  last good checkpoint.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certonnx.errors import CertonnxError
from certonnx.train import distributed as D
from certonnx.train.methods import StepContext, get_method
from certonnx.utils import atomic_torch_save, atomic_write_bytes, check_writable

CHECKPOINT_NAME = "last.pt"


class TrainingError(CertonnxError):
    """Training diverged (NaN/inf loss) or a checkpoint does not fit the run."""


@dataclass
class TrainConfig:
    """Everything that determines a training run (stored in checkpoints)."""

    norms: dict[str, float]
    method: str = "ibp"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | sgd
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "step"  # step | cosine | constant
    lr_milestones: list[int] | None = None  # epochs (1-based, decay *after* them); default: 2 before the end
    lr_decay: float = 0.2
    warmup_epochs: int = 0
    ramp_epochs: int = 0
    eps_schedule: str = "smooth"  # smooth | linear
    grad_clip: float = 10.0
    seed: int = 0
    regularize: bool = False  # Shi et al. regularisers during the ramp
    reg_lambda: float = 0.5
    # method flags as a plain dict (checkpoints hold plain data only), parsed by the Trainer into
    # the method's Options dataclass; keys of other methods are dropped (a config shared by a
    # sweep over methods), a key no method has is an error (Method.parse_options)
    options: dict[str, Any] = field(default_factory=dict)
    domain: tuple[float, float] = (0.0, 1.0)
    num_classes: int = 10
    checkpoint_dir: str | None = None
    log_json: str | None = None
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["domain"] = list(self.domain)
        return d

    def resume_key(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint (others, like the number of
        epochs or the log path, may change)."""
        return {k: v for k, v in self.to_dict().items()
                if k in ("norms", "method", "batch_size", "optimizer", "seed", "warmup_epochs", "ramp_epochs",
                         "eps_schedule", "num_classes")}


# -- schedules ---------------------------------------------------------------------------------

def smooth_ramp(f: float, mid: float = 0.25, beta: float = 4.0) -> float:
    """Shi et al. (2021) "smoothed" ramp on [0, 1]: ``a·f^β`` up to ``mid``, then linear with
    the same slope, reaching 1 at ``f = 1``."""
    f = min(max(f, 0.0), 1.0)
    a = 1.0 / (mid**beta + beta * mid ** (beta - 1) * (1 - mid))
    if f <= mid:
        return a * f**beta
    return a * mid**beta + a * beta * mid ** (beta - 1) * (f - mid)


def eps_fraction(step: int, steps_per_epoch: int, warmup_epochs: int, ramp_epochs: int,
                 kind: str = "smooth") -> float:
    """Fraction of the target ε at global step ``step`` (0-based): 0 in warm-up, then the ramp
    (updated every step), then 1."""
    start = warmup_epochs * steps_per_epoch
    length = ramp_epochs * steps_per_epoch
    if step < start:
        return 0.0
    if length <= 0:
        return 1.0
    f = (step - start + 1) / length
    if f >= 1:
        return 1.0
    if kind == "linear":
        return f
    if kind == "smooth":
        return smooth_ramp(f)
    raise CertonnxError(f"unknown ε schedule {kind!r} (expected smooth or linear)")


def lr_at(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate for (0-based) ``epoch``."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / max(cfg.epochs, 1)))
    if cfg.lr_schedule == "step":
        ms = cfg.lr_milestones
        if ms is None:  # decay twice near the end (CTBench-like), never during warm-up/ramp
            end_ramp = cfg.warmup_epochs + cfg.ramp_epochs
            ms = [m for m in (cfg.epochs - 2, cfg.epochs - 1) if m > end_ramp]
        return cfg.lr * cfg.lr_decay ** sum(1 for m in ms if epoch >= m)
    raise CertonnxError(f"unknown LR schedule {cfg.lr_schedule!r} (expected step, cosine or constant)")


# -- trainer -----------------------------------------------------------------------------------

class Trainer:
    """Trains ``module`` (an fx GraphModule or any nn.Module) on ``(x, y)`` with ``config``."""

    def __init__(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig,
                 *, sample_shape: tuple[int, ...] | None = None, progress: bool = True,
                 echo: Callable[[str], None] | None = None) -> None:
        from certonnx.utils import resolve_device

        self.cfg = config
        self.dev = resolve_device(config.device)
        self.rank, self.world = D.init_from_env(self.dev)
        self.module = module.to(self.dev)
        self.x, self.y = x, y
        self.sample_shape = tuple(sample_shape or x.shape[1:])
        self.method = get_method(config.method)
        self.method_options = self.method.parse_options(config.options, strict=False)
        self.progress = progress and self.rank == 0
        self.echo = echo or (lambda s: None)
        self.bm = None
        if self.method.needs_bounds:
            from certonnx.bounds import BoundedModule

            self.bm = BoundedModule(self.module, self.sample_shape)
        # methods that reparametrise the model (SaC) do it before the bound engine and the
        # optimizer see the module; parameters they optimise themselves are not the trainer's
        owned = {id(p) for p in self.method.setup(self.module, self.method_options)}
        if owned and self.bm is not None:
            from certonnx.bounds import BoundedModule

            self.bm = BoundedModule(self.module, self.sample_shape)
        self.params = [p for p in self.module.parameters() if p.requires_grad and id(p) not in owned]
        if not self.params:
            raise TrainingError("the model has no trainable parameters")
        if config.optimizer == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(self.params, lr=config.lr,
                                                               weight_decay=config.weight_decay)
        elif config.optimizer == "sgd":
            self.opt = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum,
                                       weight_decay=config.weight_decay)
        else:
            raise TrainingError(f"unknown optimizer {config.optimizer!r} (expected adam or sgd)")
        self.epoch = 0  # epochs completed
        self.log: list[dict[str, Any]] = []
        n = int(x.shape[0])
        self.steps_per_epoch = max(1, math.ceil(n / config.batch_size))
        D.broadcast_module(self.module)

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        d = self.cfg.checkpoint_dir
        return Path(d) / CHECKPOINT_NAME if d else None

    def state(self) -> dict[str, Any]:
        return {
            "format": "certonnx.train/1",
            "model": self.module.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": {"kind": self.cfg.lr_schedule, "last_epoch": self.epoch, "lr": lr_at(self.cfg, self.epoch)},
            "epoch": self.epoch,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": self.cfg.to_dict(),
            "log": self.log,
            "method": self.method.state_dict(),
        }

    def save_checkpoint(self) -> None:
        p = self.checkpoint_path
        if p is not None and self.rank == 0:
            atomic_torch_save(self.state(), p)

    def load_checkpoint(self, path: str | Path | None = None) -> bool:
        """Restore the state saved after the last completed epoch; False if there is none."""
        p = Path(path) if path is not None else self.checkpoint_path
        if p is None or not p.exists():
            return False
        import pickle

        try:
            # tensors and plain containers only: unpickling arbitrary objects would run code
            # from whoever wrote the checkpoint folder
            st = torch.load(p, map_location=self.dev, weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"refusing checkpoint {p}: it holds objects other than tensors and plain "
                                f"data, which loading would execute ({first})") from e
        except Exception as e:  # noqa: BLE001 - torch raises many types on corrupt files
            raise TrainingError(f"cannot read checkpoint {p}: {e}") from e
        if not isinstance(st, dict) or st.get("format") != "certonnx.train/1":
            raise TrainingError(f"{p} is not a certonnx training checkpoint")
        saved = TrainConfig(**{**st["config"], "domain": tuple(st["config"]["domain"])}).resume_key()
        now = self.cfg.resume_key()
        diff = {k: (saved[k], now[k]) for k in now if saved.get(k) != now[k]}
        if diff:
            what = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise TrainingError(f"checkpoint {p} was made with different settings ({what}); "
                                "use the same flags or another --checkpoint-dir")
        try:
            self.module.load_state_dict(st["model"])
        except RuntimeError as e:
            raise TrainingError(f"checkpoint {p} does not fit this model: {str(e).splitlines()[0]}") from e
        self.opt.load_state_dict(st["optimizer"])
        self.method.load_state_dict(st.get("method", {}))
        self.epoch = int(st["epoch"])
        self.log = list(st["log"])
        torch.set_rng_state(st["rng"]["torch"].cpu())
        return True

    # -- one epoch -----------------------------------------------------------------------------
    def _gen(self, *key: int) -> torch.Generator:
        g = torch.Generator(device=self.dev)
        h = self.cfg.seed
        for k in key:
            h = (h * 1_000_003 + k + 1) % (2**62)
        g.manual_seed(h)
        return g

    def current_eps(self, global_step: int) -> tuple[dict[str, float], float]:
        f = eps_fraction(global_step, self.steps_per_epoch, self.cfg.warmup_epochs, self.cfg.ramp_epochs,
                         self.cfg.eps_schedule)
        return {k: v * f for k, v in self.cfg.norms.items()}, f

    def train_epoch(self, max_steps: int | None = None) -> dict[str, Any]:
        """One pass over the data (or ``max_steps`` batches, for benchmarks)."""
        cfg = self.cfg
        e = self.epoch
        lr = lr_at(cfg, e)
        for g in self.opt.param_groups:
            g["lr"] = lr
        n = int(self.x.shape[0])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + e))
        t0 = time.monotonic()
        sums = torch.zeros(6, dtype=torch.float64)  # n, loss*n, clean*n, cert*n, cert_n, steps
        self.module.train()
        bar = _Bar(self.steps_per_epoch if max_steps is None else min(max_steps, self.steps_per_epoch),
                   f"epoch {e + 1}/{cfg.epochs} [{cfg.method}]", enabled=self.progress)
        eps: dict[str, float] = {}
        try:
            for s in range(self.steps_per_epoch):
                if max_steps is not None and s >= max_steps:
                    break
                gstep = e * self.steps_per_epoch + s
                idx_glob = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
                idx = D.shard(idx_glob, self.rank, self.world)
                xb = self.x[idx].to(self.dev, non_blocking=True)
                yb = self.y[idx].to(self.dev, non_blocking=True)
                eps, frac = self.current_eps(gstep)
                ctx = StepContext(
                    module=self.module, epoch=e, step=gstep, eps=eps, eps_target=dict(cfg.norms), progress=frac,
                    domain=(float(cfg.domain[0]), float(cfg.domain[1])), num_classes=cfg.num_classes, generator=self._gen(e, gstep, self.rank),
                    options=self.method_options, regularize=cfg.regularize and 0 < frac < 1,
                    reg_lambda=cfg.reg_lambda,
                )
                self.opt.zero_grad(set_to_none=True)
                nb = int(idx.numel())
                if nb > 0:
                    loss, st = self.method.loss_multi(self.module, self.bm, xb, yb, ctx)
                    n_bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach())) else 1.0], dtype=torch.float64)
                else:  # an empty shard (global batch smaller than the world): contributes nothing
                    loss, st = None, {}
                    n_bad = torch.zeros(1, dtype=torch.float64)
                if float(D.all_reduce_sum(n_bad)[0]) > 0:
                    raise TrainingError(self._nan_message(gstep))
                if loss is not None:
                    # each rank's mean loss weighted by its share of the global batch; the
                    # all-reduce below sums the gradients: the gradient of the global mean
                    (loss * (nb / int(idx_glob.numel()))).backward()
                D.all_reduce_grads(self.params)
                gnorm = torch.nn.utils.clip_grad_norm_(
                    self.params, cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else float("inf"))
                if not bool(torch.isfinite(gnorm)):  # finite loss, non-finite gradient: same verdict
                    raise TrainingError(self._nan_message(gstep))
                self.opt.step()
                self.method.on_step(ctx)
                cert = st.get("cert_acc")
                part = torch.tensor([nb, float(loss.detach()) * nb if loss is not None else 0.0,
                                     (st.get("clean_acc") or 0.0) * nb, (cert or 0.0) * nb,
                                     nb if cert is not None else 0, 1], dtype=torch.float64)
                sums += D.all_reduce_sum(part) if self.world > 1 else part
                seen = sums[0].clamp(min=1)
                bar.update(loss=sums[1] / seen, clean=sums[2] / seen,
                           cert=(sums[3] / sums[4]) if sums[4] > 0 else None, eps=eps)
        finally:
            bar.close()
        N = max(float(sums[0]), 1.0)
        entry = {
            "epoch": e + 1,
            "eps": {k: round(v, 8) for k, v in eps.items()},
            "lr": lr,
            "loss": float(sums[1]) / N,
            "clean_acc": float(sums[2]) / N,
            "cert_acc": (float(sums[3]) / float(sums[4])) if sums[4] > 0 else None,
            "seconds": round(time.monotonic() - t0, 3),
            "steps": int(sums[5]) // max(self.world, 1) if self.world > 1 else int(sums[5]),
        }
        return entry

    def natural_epoch(self, module: nn.Module, opt_state: dict[str, Any], epoch: int) -> None:
        """One epoch of plain cross-entropy on ``module`` (a copy of the trained one), with an
        optimizer of the trainer's kind loaded from ``opt_state`` and the epoch's learning rate,
        over the same batches in the same order as :meth:`train_epoch` (CURE's ``train_clean``;
        unlike the official code, gradients are zeroed before every step)."""
        cfg = self.cfg
        params = [p for p in module.parameters() if p.requires_grad]
        opt = type(self.opt)(params, **{k: v for k, v in self.opt.defaults.items()})
        opt.load_state_dict(opt_state)
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, epoch)
        n = int(self.x.shape[0])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        module.train()
        for s in range(self.steps_per_epoch):
            idx = perm[s * cfg.batch_size:(s + 1) * cfg.batch_size]
            xb, yb = self.x[idx].to(self.dev), self.y[idx].to(self.dev)
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(module(xb).flatten(1), yb)
            if not bool(torch.isfinite(loss.detach())):
                raise TrainingError(self._nan_message(epoch * self.steps_per_epoch + s))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip and cfg.grad_clip > 0 else float("inf"))
            opt.step()

    def _nan_message(self, gstep: int) -> str:
        p = self.checkpoint_path
        keep = (f"the last good checkpoint (after epoch {self.epoch}) is kept at {p}"
                if p is not None and p.exists() else "no checkpoint was written yet")
        return (f"training diverged: the {self.cfg.method} loss became NaN/inf at epoch {self.epoch + 1}, "
                f"step {gstep + 1}; {keep}. Try a smaller --lr, a longer --ramp-epochs or --grad-clip")

    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train until ``config.epochs``; with ``resume`` continue from the checkpoint if any."""
        if self.checkpoint_path is not None and self.rank == 0:
            self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            check_writable(self.checkpoint_path)
            for stale in self.checkpoint_path.parent.glob(f".{CHECKPOINT_NAME}.*.tmp"):  # from a killed run
                stale.unlink(missing_ok=True)
        if resume:
            if self.load_checkpoint():
                self.echo(f"resumed from {self.checkpoint_path} after epoch {self.epoch}")
            else:
                self.echo(f"--resume: no checkpoint at {self.checkpoint_path}; starting from the beginning")
        while self.epoch < self.cfg.epochs:
            e = self.epoch
            hook = self.method.wants_epoch_start(e, self.method_options, self.cfg.warmup_epochs + self.cfg.ramp_epochs)
            if hook:
                if self.world > 1:
                    raise TrainingError(f"{self.cfg.method}: the per-epoch step of these options (CURE's gradient "
                                        "projection) does not run under torchrun yet; train on one process")
                start = ({k: v.detach().clone() for k, v in self.module.state_dict().items()},
                         copy.deepcopy(self.opt.state_dict()))
            entry = self.train_epoch()
            if hook:
                from certonnx.train.methods.base import EpochRun

                t_hook = time.monotonic()
                self.method.after_epoch(EpochRun(
                    module=self.module, start_state=start[0], start_optimizer=start[1],
                    options=self.method_options, epoch=e,
                    natural_epoch=functools.partial(self.natural_epoch, epoch=e)))
                entry["seconds"] = round(entry["seconds"] + time.monotonic() - t_hook, 3)
            self.epoch += 1
            self.log.append(entry)
            self.save_checkpoint()
            self.write_log()
            self.echo(_fmt_entry(entry, self.cfg.epochs))
        return self.log

    def write_log(self) -> None:
        if self.cfg.log_json and self.rank == 0:
            atomic_write_bytes(self.cfg.log_json, (json.dumps(self.log, indent=2) + "\n").encode())


def _fmt_entry(e: dict[str, Any], epochs: int) -> str:
    eps = ", ".join(f"{k} {v:.4g}" for k, v in e["eps"].items())
    cert = "-" if e["cert_acc"] is None else f"{e['cert_acc']:.2%}"
    return (f"epoch {e['epoch']}/{epochs}: loss {e['loss']:.4f}, clean {e['clean_acc']:.2%}, "
            f"cert (batch) {cert}, ε {eps}, lr {e['lr']:.2g}, {e['seconds']:.1f}s")


class _Bar:
    """A transient rich progress bar on stderr (no-op when disabled)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.p = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(stderr=True)
        if not console.is_terminal:  # CI logs and pipes: the per-epoch lines are the progress report
            return
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          TextColumn("{task.fields[info]}"), console=console, transient=True)
        self.p.start()
        self.t = self.p.add_task(desc, total=total, info="")

    def update(self, loss: Any, clean: Any, cert: Any, eps: dict[str, float]) -> None:
        if self.p is None:
            return
        c = "-" if cert is None else f"{float(cert):.1%}"
        e = ",".join(f"{v:.3g}" for v in eps.values())
        self.p.update(self.t, advance=1, info=f"loss {float(loss):.3f} clean {float(clean):.1%} cert {c} ε {e}")

    def close(self) -> None:
        if self.p is not None:
            self.p.stop()
            self.p = None


def train(config: TrainConfig, module: nn.Module, x: torch.Tensor, y: torch.Tensor, *, resume: bool = False,
          progress: bool = False, echo: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train ``module`` in place on ``(x, y)``; returns the per-epoch log."""
    return Trainer(module, x, y, config, progress=progress, echo=echo).fit(resume=resume)
