"""certonnx.allocator: glibc settings applied once, off with CERTONNX_MALLOC_TUNING=0, a
no-op elsewhere; the command applies them at start."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _run(code: str, **env: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return out.stdout.strip()


@pytest.mark.skipif(not glibc, reason="mallopt settings exist only in glibc")
def test_applied_once_on_glibc() -> None:
    code = ("from certonnx.allocator import tune_allocator, tuned; "
            "print(tuned(), tune_allocator(), tune_allocator(), tuned())")
    assert _run(code) == "False True True True"


def test_env_turns_it_off() -> None:
    code = "from certonnx.allocator import tune_allocator, tuned; print(tune_allocator(), tuned())"
    assert _run(code, CERTONNX_MALLOC_TUNING="0") == "False False"


@pytest.mark.skipif(not glibc, reason="mallopt settings exist only in glibc")
def test_command_applies_it() -> None:
    code = ("from certonnx.cli import main; from certonnx import allocator; "
            "main(['--version']); print(allocator.tuned())")
    assert _run(code).splitlines()[-1] == "True"
