"""Fault injection (issue 11): ``kill -9`` at chosen and at random (seeded) moments.

* ``certonnx finetune`` killed during an epoch, while a checkpoint is written (mid-write, after
  the fsync before the rename, right after the rename) and while the output model is written:
  ``--resume`` finishes, the number of completed epochs is right at every step, and the final
  model certifies (certificate readable, ``weights_match``, same weights as an uninterrupted run).
* ``certonnx certify -o`` killed at random moments and inside the atomic write: the output path
  never holds a half-written model (absent, the previous file, or a complete valid one), and the
  hidden temp files a kill leaves are removed by the next write.

Killing a fresh ``python -m certonnx`` costs ~3 s of imports per run, so most runs are forked
from a *zygote*: a subprocess that imported certonnx, torch and onnxruntime once (and started no
threads) and forks one child per run. Each child is a separate process running
``certonnx.cli.main(argv)``; it is killed with SIGKILL, by the test (random moments) or by itself
at an exact point (hooks on ``os.replace``, ``os.fdopen`` and the optimizer step). One run is a
real ``python -m certonnx finetune`` subprocess, killed from outside.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from certonnx.utils import sha256_file
from tests.paths import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
FIX = FIXTURES
MODEL = FIX / "mlp_ts.onnx"
DATA = FIX / "mnist_200.npz"
SEED = int(os.environ.get("CERTONNX_FAULT_SEED", "11"))
#: what each kill hit, for docs/reliability.md (written to $CERTONNX_FAULT_REPORT when set)
RECORD: dict[str, list[Any]] = {}


def record(test: str, entry: Any) -> None:
    RECORD.setdefault(test, []).append(entry)
    dest = os.environ.get("CERTONNX_FAULT_REPORT")
    if dest:
        Path(dest).write_text(json.dumps({"seed": SEED, **RECORD}, indent=2) + "\n")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork, /proc and SIGKILL: Linux only")

ZYGOTE = r"""
import json, os, signal, sys
import torch, onnx, onnx2torch  # the expensive imports, once (not onnxruntime: its import starts a thread)
from torch.optim.optimizer import register_optimizer_step_pre_hook
from certonnx.cli import cli, main
import click
for _name in ("certify", "finetune"):
    cli.get_command(click.Context(cli), _name)
import certonnx.train, certonnx.bounds, certonnx.certify.core, certonnx.io.export, certonnx.io.load  # noqa


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def install(hook):
    kind = hook.get("kind")
    if kind == "step":  # SIGKILL just before the optimizer step number `at` of this run
        count = [0]

        def pre(opt, args, kwargs):
            count[0] += 1
            if count[0] == hook["at"]:
                die()

        register_optimizer_step_pre_hook(pre)
    elif kind in ("replace-before", "replace-after"):  # around the rename that publishes a file
        real, n = os.replace, [0]

        def replace(src, dst, *a, **k):
            hit = os.path.basename(str(dst)) == hook["match"]
            n[0] += hit
            if hit and n[0] == hook["at"] and kind == "replace-before":
                die()
            real(src, dst, *a, **k)
            if hit and n[0] == hook["at"] and kind == "replace-after":
                die()

        os.replace = replace
    elif kind == "partial-write":  # SIGKILL after writing a fraction of the temp file
        real_fdopen = os.fdopen

        def fdopen(fd, *a, **k):
            f = real_fdopen(fd, *a, **k)
            name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            if not name.startswith("." + hook["match"] + "."):
                return f

            class Partial:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()

                def write(self, data):
                    f.write(data[: int(len(data) * hook["frac"])])
                    f.flush()
                    os.fsync(f.fileno())
                    die()

                def __getattr__(self, item):
                    return getattr(f, item)

            return Partial()

        os.fdopen = fdopen


def threads():
    with open("/proc/self/status") as f:
        return int(f.read().split("Threads:")[1].split()[0])


for line in sys.stdin:
    req = json.loads(line)
    if "wait" in req:
        _, status = os.waitpid(req["wait"], 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"status": code}), flush=True)
        continue
    n_threads = threads()  # fork is only safe from a single-threaded process
    pid = os.fork()
    if pid == 0:
        try:
            for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.chdir(req["cwd"])
            torch.set_num_threads(1)
            install(req.get("hook") or {})
            rc = main(req["argv"])
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            rc = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc or 0)
    print(json.dumps({"pid": pid, "threads": n_threads}), flush=True)
"""


class Zygote:
    """Forks pre-imported ``certonnx`` processes on request (see the module docstring)."""

    def __init__(self, workdir: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=workdir)
        self.n = 0
        self.workdir = workdir

    def _ask(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the zygote process died"
        return json.loads(line)

    def start(self, argv: list[str], cwd: Path, hook: dict[str, Any] | None = None) -> Run:
        self.n += 1
        out, err = self.workdir / f"run{self.n}.out", self.workdir / f"run{self.n}.err"
        reply = self._ask({"argv": argv, "cwd": str(cwd), "hook": hook or {}, "stdout": str(out), "stderr": str(err)})
        assert reply["threads"] == 1, "the zygote must fork from a single thread (an import started one?)"
        return Run(self, reply["pid"], out, err, time.monotonic())

    def wait(self, pid: int) -> int:
        return int(self._ask({"wait": pid})["status"])

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Run:
    def __init__(self, z: Zygote, pid: int, out: Path, err: Path, t0: float) -> None:
        self.z, self.pid, self.out, self.err, self.t0 = z, pid, out, err, t0
        self.status: int | None = None

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def wait(self, limit: float = 120) -> int:
        # the zygote blocks in waitpid; a child that hangs is killed after `limit` seconds
        deadline = time.monotonic() + limit
        while self.status is None:
            if not Path(f"/proc/{self.pid}").exists() or _is_zombie(self.pid):
                self.status = self.z.wait(self.pid)
            elif time.monotonic() > deadline:
                self.kill()
                self.status = self.z.wait(self.pid)
                pytest.fail(f"run {self.pid} did not finish within {limit:g}s: {self.stderr()[-2000:]}")
            else:
                time.sleep(0.01)
        return self.status

    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    try:
        yield z
    finally:
        z.close()


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def ckpt_epoch(ckdir: Path) -> int:
    """Epochs completed according to the checkpoint (0 when there is none)."""
    import torch

    p = ckdir / "last.pt"
    if not p.exists():
        return 0
    st = torch.load(p, map_location="cpu", weights_only=False)  # our own file, written by the run
    assert st["format"] == "certonnx.train/1"
    assert [e["epoch"] for e in st["log"]] == list(range(1, st["epoch"] + 1))
    return int(st["epoch"])


def temps(d: Path, name: str) -> list[Path]:
    return sorted(d.glob(f".{name}.*.tmp"))


def check_model_file(path: Path, n: int) -> dict[str, Any]:
    """A complete model with a certificate that matches its weights; runs in onnxruntime."""
    import onnxruntime as ort

    from certonnx.io.load import read_model
    from certonnx.io.metadata import read_certificate

    read_model(path)  # parses, passes the ONNX checker
    cert = read_certificate(path)
    assert cert is not None and cert["weights_match"] is True, cert
    assert cert["n"] == n
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    y = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert y.shape == (2, 10) and np.all(np.isfinite(y))
    return cert


def no_stray_models(d: Path, allowed: set[str]) -> None:
    """Nothing that looks like a model besides the expected files (temps are hidden ``.tmp``)."""
    stray = [p.name for p in d.iterdir() if p.suffix == ".onnx" and p.name not in allowed]
    assert not stray, stray


def _wait_for(cond: Any, run: Run, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        if _is_zombie(run.pid) or time.monotonic() > deadline:
            pytest.fail(f"condition not reached before the run ended: {run.stderr()[-2000:]}")
        time.sleep(0.005)


# --------------------------------------------------------------------------------------------
# finetune: kill, resume, repeat
# --------------------------------------------------------------------------------------------
EPOCHS = 4
N_TRAIN = 160
BATCH = 8
STEPS = N_TRAIN // BATCH
EVAL_N = 20


def _finetune_argv(out: str, *extra: str) -> list[str]:
    return ["finetune", str(MODEL), "--data", str(DATA), "--norm", "linf:0.02", "--method", "pgd", "--pgd-steps",
            "3", "--epochs", str(EPOCHS), "--n-train", str(N_TRAIN), "--batch-size", str(BATCH), "--eval-n",
            str(EVAL_N), "--eval-method", "ibp", "--device", "cpu", "--seed", "3", "-o", out, "--log-json",
            "log.json", "--json", "res.json", "--accept-worse", *extra]


def test_finetune_killed_and_resumed(zygote: Zygote, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    model_sha, data_sha = sha256_file(MODEL), sha256_file(DATA)

    # reference: the same run, never interrupted
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    ref = zygote.start(_finetune_argv("out.onnx"), ref_dir)
    assert ref.wait() == 0, ref.stderr()
    ref_cert = check_model_file(ref_dir / "out.onnx", EVAL_N)

    d = tmp_path / "run"
    d.mkdir()
    ck = d / "out.onnx.ckpt"
    history: list[tuple[str, int]] = []

    def expect_killed(run: Run, what: str, epochs: int) -> None:
        status = run.wait()
        assert status == -signal.SIGKILL, f"{what}: exit {status}\n{run.stderr()[-3000:]}"
        assert ckpt_epoch(ck) == epochs, what
        assert not (d / "out.onnx").exists() or what == "after the output rename", what
        no_stray_models(d, {"out.onnx"})
        history.append((what, epochs))
        record("finetune", {"kill": what, "checkpoint_epoch": epochs, "seconds": round(time.monotonic() - run.t0, 2)})

    def resumed_after(run: Run, epochs: int) -> None:
        assert f"after epoch {epochs}" in run.stderr(), run.stderr()[-2000:]

    # 1. a real `python -m certonnx finetune`, killed from outside at a random moment after the
    #    first checkpoint (inside epoch 2 or 3: each epoch takes far longer than the delay)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.Popen([sys.executable, "-m", "certonnx", *_finetune_argv("out.onnx")], cwd=d, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (ck / "last.pt").exists():
        assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.005)
    epoch_s = float(np.mean([e["seconds"] for e in json.loads((ref_dir / "log.json").read_text())]))
    time.sleep(rng.uniform(0.1, 0.6) * epoch_s)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    k = ckpt_epoch(ck)
    assert 1 <= k < EPOCHS, k  # the steps below need an epoch left to train
    history.append(("external SIGKILL", k))
    record("finetune", {"kill": "external SIGKILL of python -m certonnx", "checkpoint_epoch": k})

    # 2. during an epoch: just before a random optimizer step of the first epoch this run trains
    run = zygote.start(_finetune_argv("out.onnx", "--resume"), d, {"kind": "step", "at": rng.randint(1, STEPS)})
    expect_killed(run, "during an epoch", k)
    resumed_after(run, k)

    # 3. while the next checkpoint is written: a random fraction of its bytes in the temp file
    run = zygote.start(_finetune_argv("out.onnx", "--resume"), d,
                       {"kind": "partial-write", "match": "last.pt", "frac": rng.uniform(0.05, 0.95)})
    expect_killed(run, "checkpoint half written", k)
    assert temps(ck, "last.pt"), "the killed write should have left its temp file"

    # 4. checkpoint written and fsynced, killed before the rename that publishes it
    run = zygote.start(_finetune_argv("out.onnx", "--resume"), d,
                       {"kind": "replace-before", "match": "last.pt", "at": 1})
    expect_killed(run, "before the checkpoint rename", k)

    # 5. right after the rename (before the log and the progress line): the epoch counts
    run = zygote.start(_finetune_argv("out.onnx", "--resume"), d,
                       {"kind": "replace-after", "match": "last.pt", "at": 1})
    expect_killed(run, "after the checkpoint rename", k + 1)
    resumed_after(run, k)
    assert not temps(ck, "last.pt"), "a resumed run removes the temp files of killed ones"

    # 6. training finished, killed while the output model is renamed into place
    run = zygote.start(_finetune_argv("out.onnx", "--resume"), d,
                       {"kind": "replace-before", "match": "out.onnx", "at": 1})
    expect_killed(run, "before the output rename", EPOCHS)
    assert temps(d, "out.onnx")

    # 7. resume to the end
    run = zygote.start(_finetune_argv("out.onnx", "--resume"), d)
    assert run.wait() == 0, run.stderr()[-3000:]
    resumed_after(run, EPOCHS)
    assert not temps(d, "out.onnx"), "the finished write removes the temp file of the killed one"
    cert = check_model_file(d / "out.onnx", EVAL_N)
    log = json.loads((d / "log.json").read_text())
    assert [e["epoch"] for e in log] == list(range(1, EPOCHS + 1))
    res = json.loads((d / "res.json").read_text())
    assert [e["epoch"] for e in res["training"]["log"]] == list(range(1, EPOCHS + 1))
    assert cert["extra"]["training"]["epochs"] == EPOCHS
    # resuming continues exactly where the run stopped: the weights of an uninterrupted run
    assert cert["weights_sha256"] == ref_cert["weights_sha256"], history
    assert cert["certified_accuracy"] == ref_cert["certified_accuracy"]
    assert (sha256_file(MODEL), sha256_file(DATA)) == (model_sha, data_sha)

    # and the model certifies with `certonnx certify`
    run = zygote.start(["certify", str(d / "out.onnx"), "--data", str(DATA), "--n", str(EVAL_N), "--norm",
                        "linf:0.02", "--method", "ibp", "--device", "cpu", "--json", "c.json"], d)
    assert run.wait() == 0, run.stderr()
    again = json.loads((d / "c.json").read_text())
    assert again["certified_accuracy"]["linf"] == pytest.approx(cert["certified_accuracy"]["linf"])
    assert len(history) == 6


# --------------------------------------------------------------------------------------------
# certify -o: the output is never half written
# --------------------------------------------------------------------------------------------
def _certify_argv(out: str) -> list[str]:
    return ["certify", str(MODEL), "--data", str(DATA), "--n", str(EVAL_N), "--norm", "linf:0.02,l2:0.3",
            "--method", "crown-ibp", "--pgd-steps", "5", "--device", "cpu", "-o", out]


def test_certify_output_never_half_written(zygote: Zygote, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    d = tmp_path
    out = d / "cert.onnx"
    model_sha = sha256_file(MODEL)

    def state(expect_present: bool | None = None) -> bytes | None:
        no_stray_models(d, {"cert.onnx"})
        if not out.exists():
            assert expect_present is not True
            return None
        assert expect_present is not False
        check_model_file(out, EVAL_N)
        return out.read_bytes()

    # a clean run gives the time scale for the random kills: when the output appears
    run = zygote.start(_certify_argv("cert.onnx"), d)
    _wait_for(out.exists, run)
    t_write = time.monotonic() - run.t0
    assert run.wait() == 0, run.stderr()
    state(True)
    out.unlink()

    kills = 0
    # SIGKILL at random moments (seeded), from the middle of a run to just after the write
    for frac in sorted(rng.uniform(0.4, 1.1) for _ in range(5)):
        run = zygote.start(_certify_argv("cert.onnx"), d)
        time.sleep(frac * t_write)
        if not _is_zombie(run.pid):
            run.kill()
        status = run.wait()
        kills += status == -signal.SIGKILL
        present = state() is not None  # absent or complete; never partial
        record("certify", {"kill_at_fraction_of_write_time": round(frac, 3), "killed": status == -signal.SIGKILL,
                           "output_present": present, "temps": len(temps(d, "cert.onnx"))})
        if out.exists():
            out.unlink()
    assert kills >= 1

    # inside the atomic write: part of the bytes, all bytes before the rename, after the rename
    run = zygote.start(_certify_argv("cert.onnx"), d, {"kind": "partial-write", "match": "cert.onnx",
                                                       "frac": rng.uniform(0.05, 0.95)})
    assert run.wait() == -signal.SIGKILL
    assert state(False) is None and temps(d, "cert.onnx")
    run = zygote.start(_certify_argv("cert.onnx"), d, {"kind": "replace-before", "match": "cert.onnx", "at": 1})
    assert run.wait() == -signal.SIGKILL
    assert state(False) is None
    run = zygote.start(_certify_argv("cert.onnx"), d, {"kind": "replace-after", "match": "cert.onnx", "at": 1})
    assert run.wait() == -signal.SIGKILL
    first = state(True)

    # an existing output survives a killed overwrite byte for byte
    run = zygote.start(_certify_argv("cert.onnx"), d, {"kind": "partial-write", "match": "cert.onnx",
                                                       "frac": rng.uniform(0.05, 0.95)})
    assert run.wait() == -signal.SIGKILL
    assert state(True) == first
    assert len(temps(d, "cert.onnx")) >= 3  # left by the killed writes (hidden, never named *.onnx)
    run = zygote.start(_certify_argv("cert.onnx"), d)
    assert run.wait() == 0
    state(True)
    assert not temps(d, "cert.onnx"), "the finished write removes the temp files of killed ones"
    assert sha256_file(MODEL) == model_sha
