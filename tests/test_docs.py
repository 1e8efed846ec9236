"""The user guide stays true to the code: every config key is documented with its default."""
from __future__ import annotations

import dataclasses
import os
import re

from moe_ep.config import Config

DOCS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs")


def _leaf_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaf_fields(type(default), f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", default


def _section(text: str, name: str) -> str:
    match = re.search(rf"^## `{name}`$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"docs/config.md has no section ## `{name}`"
    return match.group(1)


def test_every_config_key_is_documented_with_its_default():
    text = open(os.path.join(DOCS, "config.md")).read()
    missing = []
    for section in ("model", "parallel", "eplb", "sampling", "telemetry"):
        body = _section(text, section)
        cls = type(getattr(Config(), section))
        for key, default in _leaf_fields(cls):
            rows = [line for line in body.splitlines() if line.startswith("|") and f"`{key}`" in line]
            if not rows:
                missing.append(f"{section}.{key}")
                continue
            if isinstance(default, (list, str)):
                continue  # long defaults (prompts, names) are described in words
            shown = {None: "null", True: "true", False: "false"}.get(default, default) \
                if default is None or isinstance(default, bool) else default
            variants = {str(shown)} | ({str(int(default))} if isinstance(default, float) and default.is_integer() else set())
            if not any(v in rows[0] for v in variants):
                missing.append(f"{section}.{key} (default {shown!r} not shown)")
    assert "`output_dir`" in text
    assert not missing, f"undocumented config keys: {missing}"


def test_benchmark_shell_scripts_parse_and_gpu_runs_refuses_an_unknown_part(tmp_path):
    """The GPU scripts run only on lent machines, where a syntax error costs device time: each
    parses (`bash -n`), and benchmarks/gpu_runs.sh names its parts on a wrong one (its EP = 2
    plumbing is rehearsed on CPU ranks with REHEARSE=1, docs/benchmarks.md 1e)."""
    import glob
    import subprocess

    root = os.path.dirname(DOCS)
    scripts = sorted(glob.glob(os.path.join(root, "benchmarks", "*.sh")) + glob.glob(os.path.join(root, "launch", "*.sh")))
    assert os.path.join(root, "benchmarks", "gpu_runs.sh") in scripts
    for path in scripts:
        proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
        assert proc.returncode == 0, (path, proc.stderr)
    proc = subprocess.run(["bash", os.path.join(root, "benchmarks", "gpu_runs.sh"), "nosuchpart"], capture_output=True,
                          text=True, cwd=root, env=dict(os.environ, OUT=str(tmp_path), REHEARSE="1"))
    # the list it prints is every part the script's case statement has, in order
    arms = [a for arm in re.findall(r"^  ([a-z0-9|-]+)\)", open(os.path.join(root, "benchmarks", "gpu_runs.sh")).read(),
                                    re.M) for a in arm.split("|")]
    assert {"checks", "layer", "shapes", "gemm-variants", "gemm-sweep", "graph-stats", "whole", "ep2", "sp2", "usp4"} <= set(arms)
    assert f"unknown part nosuchpart ({', '.join(arms)})" in proc.stdout
    assert proc.returncode == 2


def test_gemm_benchmarks_refuse_without_a_gpu():
    """benchmarks/gemm_variants.py and gemm_sweep.py (gpu_runs.sh gemm-variants, gemm-sweep) need
    CUDA: on a CPU machine each says so and exits 2 before any work (a GPU-only benchmark that would
    otherwise crash)."""
    import subprocess
    import sys

    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for script in ("gemm_variants.py", "gemm_sweep.py"):
        proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", script)],
                              capture_output=True, text=True, cwd=root, timeout=120)
        assert proc.returncode == 2 and f"{script} needs a CUDA GPU" in proc.stderr, (script, proc.stderr[-500:])
