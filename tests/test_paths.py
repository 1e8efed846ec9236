"""Every path a user gives (output_dir, model.checkpoint, model.path, model.text_encoder's module,
eplb.stats_file, eplb.placement_file): missing, unreadable, a file where a folder is expected and
the other way round, no permission -- one line naming the field before sampling starts, exit 2,
nothing written. A disk that fills during the run: exit 3, one line naming output_dir and the
file, what was finished is kept. And eplb.placement_file in a full run.

Permissions: the suite may run as root, for whom `os.access` and `open` never refuse a mode bit.
So each "no permission" case runs twice: in-process with `os.access` answering "no" (what a
normal user gets), and for real, with chmod'ed files, in a subprocess that runs as `nobody`
(setpriv) when the suite is root, or as the suite's own user otherwise.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from PIL import Image

import eplb
from moe_ep import config as config_mod
from moe_ep import paths
from moe_ep.atomic import is_temp_file
import moe_ep.job
from moe_ep.job import OutputWriteError, run
from moe_ep.models.moedit.checkpoint import save_from_seed
from moe_ep.parallel import ParallelContext
from moe_ep.stats import read_stats_file
from mp import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))
import infer  # noqa: E402  (launch/infer.py)

# a small model of its own (not the quickstart, whose contents change with the demo)
TINY = {
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "dense_hidden_size": 32, "text_dim": 32,
              "max_prompt_tokens": 8, "moe": {"num_experts": 8, "top_k": 2, "expert_hidden_size": 16}},
    "parallel": {"device": "cpu", "timeout_s": 60},
    "eplb": {"enabled": False, "num_redundant_experts": 2, "window_size": 2, "interval": 100},
    "sampling": {"prompts": ["a red fox", "a blue lake"], "num_inference_steps": 2, "height": 8, "width": 8,
                 "batch_size": 1},
    "telemetry": {"wandb": False},
}
L, E = 2, 8


def tiny(tmp_path, **sets) -> str:
    """A config file: TINY with `sets` ("section.key" -> value) applied; -> its path."""
    data = json.loads(json.dumps(TINY))
    for key, value in sets.items():
        node = data
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


def stats_file(path) -> str:
    json.dump({"format": "moe-ep.expert-load", "version": 1, "num_layers": L, "num_experts": E,
               "load": [[1] * E] * L}, open(path, "w"))
    return str(path)


def placement_file(path, ep: int = 1, load=None) -> str:
    load = np.arange(1, E + 1, dtype=np.float64)[None].repeat(L, 0) ** 2 if load is None else load   # [L, E] skewed
    phy2log, _, _ = eplb.rebalance_experts(torch.tensor(load), E + 2, 1, 1, ep)
    eplb.save_placement(str(path), phy2log, num_gpus=ep, num_nodes=1, num_experts=E)
    return str(path)


def main_err(capsys, argv) -> tuple[int, str]:
    rc = infer.main(argv)
    return rc, capsys.readouterr().err.strip()


def expect_refused(capsys, tmp_path, field: str, words: str, **sets) -> None:
    """launch/infer.py stops before sampling: exit 2, one line naming `field`, no output folder."""
    out = tmp_path / "out"
    sets.setdefault("output_dir", str(out))
    rc, err = main_err(capsys, ["--config", tiny(tmp_path, **sets)])
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"error: config field '{field}'"), err
    assert words in err, err
    if sets["output_dir"] == str(out):
        assert not out.exists()


# ---------------------------------------------------------------- files

FILE_FIELDS = ["model.checkpoint", "eplb.stats_file", "eplb.placement_file"]


def good_file(field: str, tmp_path) -> str:
    if field == "model.checkpoint":
        cfg = config_mod.from_dict(json.loads(json.dumps(TINY)))
        p = str(tmp_path / "model.safetensors")
        save_from_seed(cfg.model, p)
        return p
    if field == "eplb.stats_file":
        return stats_file(tmp_path / "stats.json")
    return placement_file(tmp_path / "placement.json")


@pytest.mark.parametrize("field", FILE_FIELDS)
def test_file_missing_folder_fifo_and_broken_link(tmp_path, capsys, field):
    expect_refused(capsys, tmp_path, field, "file not found", **{field: str(tmp_path / "nope.json")})
    (tmp_path / "adir").mkdir()
    expect_refused(capsys, tmp_path, field, "is a folder, must be a file", **{field: str(tmp_path / "adir")})
    os.mkfifo(tmp_path / "fifo")      # opening it would block: refused before any open
    expect_refused(capsys, tmp_path, field, "is not a regular file", **{field: str(tmp_path / "fifo")})
    os.symlink(tmp_path / "gone", tmp_path / "link")
    expect_refused(capsys, tmp_path, field, "is a broken symbolic link", **{field: str(tmp_path / "link")})


@pytest.mark.parametrize("field", FILE_FIELDS)
def test_file_no_permission_and_unreadable(tmp_path, capsys, monkeypatch, field):
    """A good file refused when the user may not read it (os.access says no), and when reading
    fails (open raises EIO: a bad disk, a stale network mount)."""
    path = good_file(field, tmp_path)
    real_access = os.access
    with monkeypatch.context() as m:
        m.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == path else real_access(p, mode, **kw))
        expect_refused(capsys, tmp_path, field, "cannot be read: no read permission", **{field: path})

    def failing_open(p, *a, **kw):
        if os.fspath(p) == path:
            raise OSError(errno.EIO, "Input/output error", p)
        return open(p, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(paths, "open", failing_open, raising=False)
        expect_refused(capsys, tmp_path, field, "cannot be read: Input/output error", **{field: path})


def test_file_with_unreadable_contents(tmp_path, capsys):
    """Contents that are not what the field needs (the readers' own checks, named the same way)."""
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00\x01 not json, not safetensors")
    expect_refused(capsys, tmp_path, "model.checkpoint", "cannot be read as safetensors", **{"model.checkpoint": str(bad)})
    expect_refused(capsys, tmp_path, "eplb.stats_file", "stats file", **{"eplb.stats_file": str(bad)})
    expect_refused(capsys, tmp_path, "eplb.placement_file", "placement file", **{"eplb.placement_file": str(bad)})


# ---------------------------------------------------------------- folders

def test_output_dir_file_under_a_file_and_no_permission(tmp_path, capsys, monkeypatch):
    f = tmp_path / "a_file"
    f.write_text("x")
    expect_refused(capsys, tmp_path, "output_dir", "is a file, must be a folder", output_dir=str(f))
    expect_refused(capsys, tmp_path, "output_dir", f"cannot be created: '{f}' is a file",
                   output_dir=str(f / "sub" / "run"))
    assert f.read_text() == "x"
    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    m = monkeypatch
    m.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(ro) and mode & os.W_OK
              else real_access(p, mode, **kw))
    expect_refused(capsys, tmp_path, "output_dir", "cannot be written: no write permission", output_dir=str(ro))
    expect_refused(capsys, tmp_path, "output_dir", f"cannot be created: no write permission in '{ro}'",
                   output_dir=str(ro / "new" / "run"))
    assert os.listdir(ro) == []


def test_output_dir_whose_outputs_are_of_the_wrong_kind(tmp_path, capsys):
    """An earlier run's folder where images is a file, or stats.json / summary.json a folder, and a
    name longer than the file system takes: refused before the run, nothing changed in it."""
    for name, make in [("images", lambda p: p.write_text("x")), ("stats.json", lambda p: p.mkdir()),
                       ("summary.json", lambda p: p.mkdir()), ("metrics.jsonl", lambda p: p.symlink_to(p.parent / "gone"))]:
        out = tmp_path / f"run_{name}"
        out.mkdir()
        make(out / name)
        expect_refused(capsys, tmp_path, "output_dir", f"holds '{name}', which is not a", output_dir=str(out))
        assert os.listdir(out) == [name]
    expect_refused(capsys, tmp_path, "output_dir", "the file system takes at most",
                   output_dir=str(tmp_path / ("x" * 300) / "run"))


def test_model_path_folder(tmp_path, capsys, monkeypatch):
    """model.path (a diffusers folder; its contents are the diffusers family's to check)."""
    base = {"model.type": "diffusers"}
    expect_refused(capsys, tmp_path, "model.path", "diffusers model folder not found",
                   **base, **{"model.path": str(tmp_path / "nope")})
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    expect_refused(capsys, tmp_path, "model.path", "is a file, must be a diffusers model folder",
                   **base, **{"model.path": str(f)})
    folder = tmp_path / "hidream"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(folder)
                        else real_access(p, mode, **kw))
    expect_refused(capsys, tmp_path, "model.path", "cannot be read: no read permission",
                   **base, **{"model.path": str(folder)})


def test_text_encoder_module(tmp_path, capsys, monkeypatch):
    """model.text_encoder = 'module:function': missing module, a file where a package is expected,
    a folder (namespace package) where a module with the function is expected, no permission."""
    monkeypatch.syspath_prepend(str(tmp_path))
    expect_refused(capsys, tmp_path, "model.text_encoder", "cannot import module 'no_such_mod_xyz'",
                   **{"model.text_encoder": "no_such_mod_xyz:encode"})
    (tmp_path / "enc_file.py").write_text("def encode(prompts, **kw):\n    raise RuntimeError\n")
    expect_refused(capsys, tmp_path, "model.text_encoder", "cannot import module 'enc_file.sub'",
                   **{"model.text_encoder": "enc_file.sub:encode"})
    (tmp_path / "enc_dir").mkdir()
    expect_refused(capsys, tmp_path, "model.text_encoder", "has no function 'encode'",
                   **{"model.text_encoder": "enc_dir:encode"})
    origin = str(tmp_path / "enc_file.py")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == origin
                        else real_access(p, mode, **kw))
    expect_refused(capsys, tmp_path, "model.text_encoder", "no read permission",
                   **{"model.text_encoder": "enc_file:encode"})


CHECK = """
import sys
sys.path.insert(0, {root!r})
from moe_ep import config
from moe_ep.config import ConfigError
from moe_ep.paths import check_paths
assert config.__file__.startswith({root!r}), config.__file__   # this copy, not an installed one
for sets in {cases!r}:
    try:
        check_paths(config.from_dict(sets))
        print("accepted")
    except ConfigError as err:
        print(err)
"""


def readable_copy_of_package(base: str) -> str:
    """moe_ep copied to base/code (every file and folder readable by all) -> the folder to import from."""
    code = os.path.join(base, "code")
    shutil.copytree(os.path.join(ROOT, "moe_ep"), os.path.join(code, "moe_ep"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for d, _, files in os.walk(code):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    return code


def python_the_user_can_run(as_user: list[str]) -> str:
    """An interpreter `as_user` can start: this one, or (a venv inside a folder that user cannot
    enter, e.g. a checkout under `mktemp -d` with its .venv) the interpreter the venv was made from
    (the check needs only the standard library and the copied package); else skip, saying why."""
    tried = []
    for exe in dict.fromkeys([sys.executable, os.path.realpath(sys.executable),
                              getattr(sys, "_base_executable", None)]):
        if exe:
            if subprocess.run(as_user + [exe, "-c", "pass"], capture_output=True, timeout=60).returncode == 0:
                return exe
            tried.append(exe)
    pytest.skip(f"no Python interpreter that user nobody may run: tried {tried} (the venv and its base "
                f"interpreter sit in folders nobody cannot enter); run the suite from a readable checkout")


def test_real_permissions_as_a_normal_user():
    """chmod'ed files and folders, checked by a process that is not root (nobody via setpriv when
    the suite runs as root): the same messages as the in-process cases above."""
    base = tempfile.mkdtemp(prefix="moe-ep-perm-", dir="/tmp")
    try:
        os.chmod(base, 0o755)
        secret = os.path.join(base, "secret.safetensors")
        open(secret, "wb").write(b"x")
        os.chmod(secret, 0)
        ro = os.path.join(base, "ro")
        os.mkdir(ro)
        os.chmod(ro, 0o555)
        closed = os.path.join(base, "closed")
        os.mkdir(closed)
        os.chmod(closed, 0)
        ok_out = os.path.join(base, "ok")
        os.mkdir(ok_out)
        os.chmod(ok_out, 0o777)
        cases = [{"output_dir": ok_out, "model": {"checkpoint": secret}},
                 {"output_dir": ro},
                 {"output_dir": os.path.join(ro, "new")},
                 {"output_dir": ok_out, "model": {"type": "diffusers", "path": closed}},
                 {"output_dir": ok_out}]
        as_user = []
        if os.geteuid() == 0:
            setpriv = shutil.which("setpriv")
            assert setpriv, "running as root needs setpriv (util-linux) to drop to nobody for this test"
            as_user = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        # The checkout may sit in a folder that user cannot enter (a clone under `mktemp -d`, mode
        # 700): it imports the package from a copy of its own, in this world-readable folder.
        code = readable_copy_of_package(base)
        python = python_the_user_can_run(as_user)
        cmd = as_user + [python, "-c", CHECK.format(root=code, cases=cases)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=base)
        assert proc.returncode == 0, proc.stderr[-2000:]
        lines = proc.stdout.strip().splitlines()
        assert lines == [
            f"config field 'model.checkpoint' = {secret!r}: cannot be read: no read permission",
            f"config field 'output_dir' = {ro!r}: cannot be written: no write permission (or a read-only file system)",
            f"config field 'output_dir' = {os.path.join(ro, 'new')!r}: cannot be created: no write permission "
            f"in '{ro}' (or a read-only file system)",
            f"config field 'model.path' = {closed!r}: cannot be read: no read permission",
            "accepted"], proc.stdout
    finally:
        for d, dirs, _ in os.walk(base):
            for x in dirs:
                os.chmod(os.path.join(d, x), 0o755)
        shutil.rmtree(base)


def test_accepted_paths(tmp_path):
    """Good paths pass: an output folder not made yet (under an existing one), an existing one,
    readable files (a refusal of valid input would fail here)."""
    cfg = config_mod.from_dict(dict(json.loads(json.dumps(TINY)), output_dir=str(tmp_path / "new" / "run")))
    cfg.model.checkpoint = good_file("model.checkpoint", tmp_path)
    cfg.eplb.stats_file = good_file("eplb.stats_file", tmp_path)
    cfg.eplb.placement_file = good_file("eplb.placement_file", tmp_path)
    paths.check_paths(cfg)
    assert not (tmp_path / "new").exists()
    cfg.output_dir = str(tmp_path)
    paths.check_paths(cfg)


# ---------------------------------------------------------------- a disk that fills during the run

class FullDisk:
    """os.fdopen (what every atomic writer opens its temp file with) on a disk that is full
    from the `fail_at`-th file on: writes raise OSError(ENOSPC). The atomic writer then removes
    its temp file, as it does on a real full disk."""

    def __init__(self, fail_at: int):
        self.fail_at, self.opened = fail_at, 0
        self.real = os.fdopen

    def __call__(self, fd, *args, **kwargs):
        f = self.real(fd, *args, **kwargs)
        self.opened += 1
        if self.opened < self.fail_at:
            return f

        class Full:
            def __getattr__(self, name):
                return getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()
                return False

            def write(self, data):
                raise OSError(errno.ENOSPC, "No space left on device")

        return Full()


@pytest.mark.parametrize("fail_at, finished, failed_file", [
    # 1 rank, 2 prompts in batches of 1: files are 000.png (1), its record 000.json (2), stats.json (3),
    # 001.png (4), 001.json (5), stats.json (6), stats.json (7, the end), manifest.jsonl (8), summary.json (9)
    pytest.param(4, ["000.json", "000.png"], "images/001.png", id="mid-run"),
    pytest.param(9, ["000.json", "000.png", "001.json", "001.png"], "summary.json", id="summary"),
])
def test_disk_fills_during_the_run(tmp_path, monkeypatch, fail_at, finished, failed_file):
    out = tmp_path / "out"
    cfg = config_mod.load(tiny(tmp_path, output_dir=str(out)))
    monkeypatch.setattr(moe_ep.job, "STATS_SAVE_EVERY_S", 1e9)   # no timed stats.json writes: a fixed file order
    monkeypatch.setattr(os, "fdopen", FullDisk(fail_at))
    with pytest.raises(OutputWriteError) as info:
        run(cfg, ParallelContext(), progress=False)
    monkeypatch.undo()
    msg = str(info.value)
    assert len(msg.splitlines()) == 1 and msg.startswith("config field 'output_dir': rank 0 could not write "), msg
    assert os.path.join(str(out), failed_file) in msg and "No space left on device" in msg, msg
    assert sorted(os.listdir(out / "images")) == finished
    data = read_stats_file(str(out / "stats.json"), L, E)          # the finished rounds' statistics, valid
    rows = (8 // 2) ** 2 * 2                                       # MoE rows per prompt and forward (tokens x branches)
    assert (np.asarray(data["load"]).sum(1) == len(finished) // 2 * 2 * rows * 2).all()   # images x 2 steps x top-2
    assert not (out / "summary.json").exists()
    assert not [f for d, _, fs in os.walk(out) for f in fs if is_temp_file(f)]


def test_write_failure_is_one_line_and_exit_3(tmp_path, capsys, monkeypatch):
    """launch/infer.py on OutputWriteError: one `error:` line, exit status 3."""
    import moe_ep.parallel

    def failing_run(cfg, ctx, progress=True):
        raise OutputWriteError(0, os.path.join(cfg.output_dir, "images", "000.png"),
                               OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(moe_ep.job, "run", failing_run)
    monkeypatch.setattr(moe_ep.parallel, "init_distributed", lambda cfg: ParallelContext())
    rc, err = main_err(capsys, ["--config", tiny(tmp_path, output_dir=str(tmp_path / "out"))])
    assert rc == infer.WRITE_FAILED == 3
    assert err.splitlines() == [f"error: config field 'output_dir': rank 0 could not write "
                                f"{tmp_path / 'out' / 'images' / '000.png'}: No space left on device (errno 28); "
                                "the images and stats.json written before are kept, no summary.json"]


# ---------------------------------------------------------------- eplb.placement_file in a full run

def _placement_ranks(rank: int, world: int, cfg_path: str, placement: str, outs: dict) -> None:
    from moe_ep.parallel import context_for_tests

    for enabled, out in outs.items():
        cfg = config_mod.load(cfg_path, [f"output_dir={out}", f"eplb.placement_file={placement}",
                                         f"eplb.enabled={json.dumps(enabled == 'rebalancer')}"])
        run(cfg, context_for_tests(rank, world), progress=False)


def test_placement_file_in_a_full_run(tmp_path):
    """A placement planned offline (skewed load, replicas) is installed at start-up on 2 ranks,
    by the rebalancer (weights moved between ranks) and without one (each rank fills its slots
    from the weight source); the run ends with it in effect (interval 100: no rebalance after)
    and the images equal a run without it."""
    ref = tmp_path / "ref"
    run(config_mod.load(tiny(tmp_path), [f"output_dir={ref}"]), ParallelContext(), progress=False)
    placement = placement_file(tmp_path / "placement.json", ep=2)
    want = eplb.load_placement(placement).tolist()
    assert want != json.load(open(ref / "summary.json"))["placement"]      # a change to install
    outs = {"rebalancer": str(tmp_path / "with"), "weights": str(tmp_path / "without")}
    run_ranks(2, _placement_ranks, tiny(tmp_path), placement, outs)
    for kind, out in outs.items():
        summary = json.load(open(os.path.join(out, "summary.json")))
        assert summary["placement"] == want, kind
        if kind == "rebalancer":
            ev = summary["rebalances"][0]
            assert ev["trigger"] == "placement_file" and ev["ok"] and ev["experts_moved"] > 0, ev
        for n in ("000.png", "001.png"):
            a = np.asarray(Image.open(ref / "images" / n))
            b = np.asarray(Image.open(os.path.join(out, "images", n)))
            assert np.array_equal(a, b), (kind, n)
