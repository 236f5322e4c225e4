"""Small shared helpers: atomic writes, hashing, device choice.

Atomic writes matter because certonnx promises never to leave a half-written model or
checkpoint behind: we write to a temporary file in the same directory, fsync, then rename.
"""

from __future__ import annotations

import glob
import hashlib
import os
import tempfile
from pathlib import Path

import torch

from certonnx.errors import OutputPathError


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early (before any long work) when ``path`` cannot be written."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise OutputPathError(f"output directory does not exist: {parent}")
    if p.exists() and p.is_dir():
        raise OutputPathError(f"output path is a directory: {p}")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"output directory is not writable: {parent}")
    return p


def check_outputs(inputs: dict[str, str | None], outputs: dict[str, str | None]) -> None:
    """Before any work: no output path may name an input file (model, data, property) or another
    output, and every output must be writable. Inputs are never modified, whatever the flags.

    Keys are the labels errors use (the CLI's flag names: ``-o``, ``--json``); ``None`` and
    ``-`` (stdout) outputs are skipped."""
    from certonnx.errors import CertonnxError

    def same(a: str, b: str) -> bool:
        pa, pb = Path(a), Path(b)
        if pa.resolve() == pb.resolve():
            return True
        try:
            return pa.exists() and pb.exists() and os.path.samefile(pa, pb)  # hard links
        except OSError:
            return False

    seen: dict[str, str] = {}
    for label, p in outputs.items():
        if p is None or p == "-":
            continue
        for ilabel, ip in inputs.items():
            if ip is not None and same(p, ip):
                raise CertonnxError(f"{label} {p} would overwrite the input {ilabel}; choose another path")
        for olabel, op in seen.items():
            if same(p, op):
                raise CertonnxError(f"{label} and {olabel} name the same file {p}; choose different paths")
        seen[label] = p
        check_writable(p)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files that earlier writers of ``path`` left when they were killed between
    creating the temp file and the rename (SIGKILL, OOM killer, power loss): they are named
    ``.<name>.<pid>.<random>.tmp``; only those whose process no longer exists are removed."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    removed = []
    for t in parent.glob(f".{glob.escape(p.name)}.*.tmp"):
        pid_text = t.name[len(p.name) + 2:].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        try:
            t.unlink()
            removed.append(t)
        except OSError:
            pass
    return removed


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename).

    A process killed mid-write leaves ``path`` as it was (absent or the previous complete file)
    plus a hidden ``.<name>.<pid>.<random>.tmp``; the next successful write of ``path`` removes
    such leftovers (:func:`remove_stale_temps`).
    """
    p = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp",
                               dir=p.parent if str(p.parent) else ".")
    try:
        umask = os.umask(0)  # mkstemp creates 0600 files; give outputs the usual permissions
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OutputPathError(f"cannot write {p}: {e.strerror or e}") from e
    remove_stale_temps(p)
    return p


def atomic_torch_save(obj: object, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` with the same atomic guarantee as :func:`atomic_write_bytes`."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_arrays(*arrays: object) -> str:
    """Fingerprint of evaluated data (stored in certificates)."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        arr = np.ascontiguousarray(np.asarray(a))
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; anything else is passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        from certonnx.errors import CertonnxError

        raise CertonnxError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        from certonnx.errors import CertonnxError

        raise CertonnxError("--device cuda asked for, but no CUDA device is available")
    return dev
