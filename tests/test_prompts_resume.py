"""sampling.prompts_file (moe_ep/prompts.py), the per-image records and manifest, and a rerun into
the same folder that keeps finished images (moe_ep/manifest.py, job.run). The runs use
tests/test_job.py's toy ServedModel (one MoE layer, 3 steps), one process."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import moe_ep.job as job
from moe_ep import config as config_mod
from moe_ep import manifest
from moe_ep.config import ConfigError
from moe_ep.parallel import ParallelContext
from moe_ep.prompts import NAME_MAX_LEN, PromptItem, prompt_items
from test_job import ToyModel, toy_cfg


def cfg_with_file(tmp_path, text: str, suffix: str = ".jsonl", sampling=None, eplb=None):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    s = {"prompts_file": str(path), "num_inference_steps": 3, "batch_size": 2, "seed": 7, **(sampling or {})}
    return toy_cfg(tmp_path, {"sampling": s, **({"eplb": eplb} if eplb else {})}.items())


# ---------------------------------------------------------------- the file

def test_text_file_one_prompt_a_line(tmp_path):
    cfg = cfg_with_file(tmp_path, "a red fox\n\n  a blue bird  \r\nthird\n", suffix=".txt")
    assert prompt_items(cfg) == [PromptItem(0, "a red fox", 7, "", "000"), PromptItem(1, "a blue bird", 8, "", "001"),
                                 PromptItem(2, "third", 9, "", "002")]


def test_jsonl_file_with_seeds_names_and_the_jobs_negative(tmp_path):
    lines = [{"prompt": "fox", "seed": 123, "name": "fox-1"}, {"prompt": "bird"},
             {"prompt": "cat", "negative_prompt": "blurry", "name": "Cat_2.v1"}]
    cfg = cfg_with_file(tmp_path, "\n".join(json.dumps(x) for x in lines) + "\n\n",
                        sampling={"negative_prompt": "blurry"})
    assert prompt_items(cfg) == [PromptItem(0, "fox", 123, "blurry", "fox-1"), PromptItem(1, "bird", 8, "blurry", "001"),
                                 PromptItem(2, "cat", 9, "blurry", "Cat_2.v1")]


BAD_LINES = {   # what line 2 holds -> what the one error says (after "line 2: ")
    "not_json": ('{"prompt": "x"', "is not valid JSON"),
    "not_object": ('["x"]', "is a JSON list, must be an object"),
    "unknown_key": ('{"prompt": "x", "steps": 3}', "has the unknown key 'steps'; allowed keys: prompt, seed, "
                                                   "negative_prompt, name"),
    "duplicate_key": ('{"prompt": "x", "prompt": "y"}', "has the key 'prompt' twice"),
    "no_prompt": ('{"seed": 3}', "has no 'prompt'"),
    "prompt_not_string": ('{"prompt": 3}', "'prompt' must be a string, got int"),
    "seed_float": ('{"prompt": "x", "seed": 1.5}', "'seed' must be an integer, got 1.5"),
    "seed_bool": ('{"prompt": "x", "seed": true}', "'seed' must be an integer, got True"),
    "seed_range": ('{"prompt": "x", "seed": 18446744073709551616}', "must be >= -2**63 and < 2**64"),
    "negative_not_string": ('{"prompt": "x", "negative_prompt": null}', "'negative_prompt' must be a string"),
    "negative_differs": ('{"prompt": "x", "negative_prompt": "ugly"}', "differs from sampling.negative_prompt ''; "
                                                                       "the samplers take one negative prompt per batch"),
    "name_slash": ('{"prompt": "x", "name": "a/b"}', "may hold only letters, digits, '.', '_' and '-'"),
    "name_dotdot": ('{"prompt": "x", "name": "x..y"}', "contains '..'"),
    "name_hidden": ('{"prompt": "x", "name": ".tmp-a"}', "not start with '.'"),
    "name_empty": ('{"prompt": "x", "name": ""}', "is empty"),
    "name_long": ('{"prompt": "x", "name": "' + "a" * (NAME_MAX_LEN + 1) + '"}', f"at most {NAME_MAX_LEN}"),
    "name_not_string": ('{"prompt": "x", "name": 5}', "must be a string, got int"),
    "name_taken": ('{"prompt": "x", "name": "FOX"}', "the name 'FOX' is taken by line 1"),
    "name_is_a_default": ('{"prompt": "x", "name": "000"}', "the name '000' is taken by line 1"),
    "nul": ('{"prompt": "a\u0000"}', "holds a NUL character"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_each_kind_of_bad_line_is_one_clear_error(tmp_path, kind):
    """Line 1 is good; line 2 is bad in one way: one ConfigError naming sampling.prompts_file,
    the line and what is wrong; checked by preflight, before any process group."""
    text, why = BAD_LINES[kind]
    first = '{"prompt": "fox", "name": "fox"}' if kind == "name_taken" else '{"prompt": "fox"}'
    cfg = cfg_with_file(tmp_path, first + "\n" + text + "\n")
    with pytest.raises(ConfigError) as err:
        job.preflight(cfg, 1)
    assert err.value.field_name == "sampling.prompts_file"
    assert str(err.value).startswith(f"config field 'sampling.prompts_file' = '{cfg.sampling.prompts_file}': "
                                     f"line 2: "), str(err.value)
    assert why in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_bad_text_files(tmp_path):
    for name, content, why in [("latin1.txt", b"ok\ncaf\xe9\n", "line 2: is not UTF-8"),
                               ("empty.txt", b"\n  \n", "holds no prompt"),
                               ("big_seed.txt", b"a\nb\n", "line 2: has no 'seed' and sampling.seed + 1")]:
        seed = 2 ** 64 - 1 if name == "big_seed.txt" else 0
        cfg = cfg_with_file(tmp_path, content, suffix="_" + name, sampling={"seed": seed})
        with pytest.raises(ConfigError, match="sampling.prompts_file") as err:
            job.preflight(cfg, 1)
        assert why in str(err.value), str(err.value)


def test_names_that_try_to_leave_the_output_folder_are_refused(tmp_path):
    """No name reaches outside output_dir/images, whatever the file says."""
    for name in ["../escape", "..", "/etc/passwd", "a/../../b", "sub/x", "..\\x", "~root", "x\u2215y", "a b"]:
        cfg = cfg_with_file(tmp_path, json.dumps({"prompt": "x", "name": name}) + "\n")
        with pytest.raises(ConfigError, match=r"'sampling.prompts_file' = .*: line 1: 'name'"):
            job.preflight(cfg, 1)
    assert not (tmp_path / "out").exists() and not (tmp_path / "escape.png").exists()


def test_the_file_and_the_list_together_and_a_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="'sampling.prompts_file' = .*given together with sampling.prompts"):
        toy_cfg(tmp_path, {"sampling": {"prompts": ["a"], "prompts_file": "p.txt"}}.items())
    cfg = toy_cfg(tmp_path, {"sampling": {"prompts_file": str(tmp_path / "nope.txt")}}.items())
    with pytest.raises(ConfigError, match="'sampling.prompts_file' = .*file not found"):
        job.preflight(cfg, 1)


# ---------------------------------------------------------------- runs: records, manifest, resume

class CountingToy(ToyModel):
    """The toy, remembering the seeds of every batch it sampled."""

    def __init__(self, ctx, log):
        super().__init__(ctx)
        self.log = log

    def sample(self, prompts, seeds, hooks):
        self.log.append(list(seeds))
        return super().sample(prompts, seeds, hooks)


def run_toy(cfg, monkeypatch, log=None):
    ctx = ParallelContext()
    monkeypatch.setattr(job, "build_served_model", lambda c, x: CountingToy(ctx, [] if log is None else log))
    return job.run(cfg, ctx, progress=False)


FIVE = [{"prompt": "fox", "name": "fox"}, {"prompt": "bird", "seed": 40}, {"prompt": "cat"}, {"prompt": "dog"},
        {"prompt": "owl", "name": "owl"}]


def jsonl(lines) -> str:
    return "".join(json.dumps(x) + "\n" for x in lines)


def files_state(folder) -> dict:
    """name -> (inode, mtime_ns, bytes) of every file in images/."""
    d = folder / "images"
    return {n: (os.stat(d / n).st_ino, os.stat(d / n).st_mtime_ns, (d / n).read_bytes()) for n in sorted(os.listdir(d))}


def test_every_image_has_its_record_and_the_manifest_lists_them(tmp_path, monkeypatch):
    cfg = cfg_with_file(tmp_path, jsonl(FIVE))
    summary = run_toy(cfg, monkeypatch)
    out = tmp_path / "out"
    names = ["fox", "001", "002", "003", "owl"]
    assert sorted(os.listdir(out / "images")) == sorted(f"{n}.{x}" for n in names for x in ("png", "json"))
    lines = manifest.read_manifest(str(out))
    assert [r["name"] for r in lines] == names and [r["index"] for r in lines] == list(range(5))
    for k, (rec, line) in enumerate(zip(lines, FIVE)):
        assert rec == json.load(open(out / "images" / f"{names[k]}.json"))     # the same record both places
        assert (rec["prompt"], rec["seed"], rec["negative_prompt"]) == (line["prompt"], line.get("seed", 7 + k), "")
        assert rec["path"] == f"images/{names[k]}.png"
        assert rec["png_sha256"] == manifest.sha256_file(str(out / "images" / f"{names[k]}.png"))
        assert rec["sampling"] == {"num_inference_steps": 3, "guidance_scale": 4.0, "height": 32, "width": 32,
                                   "shift": 1.0}
        assert rec["model"]["config"]["moe"]["num_experts"] == 8 and rec["model"]["weights"] == {"seed": 0}
        assert rec["layout"] == {}        # batch invariance (auto on the CPU) covers the built-in model whole
    assert [(x["name"], x["seed"]) for x in summary["images"]] == [(n, r["seed"]) for n, r in zip(names, lines)]
    assert summary["resume"] == {"kept": 0, "sampled": 5}


def test_a_rerun_keeps_finished_images_untouched_and_samples_only_the_rest(tmp_path, monkeypatch, capsys):
    """A complete run; then the last round's files are lost as a killed run loses them (the
    last image's PNG without its record, the one before with neither): the same config again
    samples only that round, leaves every finished file as it was (inode, mtime, bytes) and
    ends with the bytes of the complete run."""
    cfg = cfg_with_file(tmp_path, jsonl(FIVE), sampling={"batch_size": 1})
    out = tmp_path / "out"
    run_toy(cfg, monkeypatch)
    full = files_state(out)
    (out / "images" / "owl.json").unlink()            # a PNG whose record was never written
    for f in ("003.png", "003.json"):
        (out / "images" / f).unlink()
    (out / "summary.json").unlink()
    before = files_state(out)
    capsys.readouterr()
    log = []
    summary = run_toy(cfg, monkeypatch, log)
    assert log == [[10], [11]]                         # prompts 3 and 4 (seeds 7 + 3, 7 + 4) only
    after = files_state(out)
    assert after == full | {n: after[n] for n in ("003.png", "003.json", "owl.png", "owl.json")}
    for n in ("fox", "001", "002"):                   # finished: not rewritten
        for x in ("png", "json"):
            assert after[f"{n}.{x}"] == before[f"{n}.{x}"]
    assert {n: v[2] for n, v in after.items()} == {n: v[2] for n, v in full.items()}   # bytes as the full run's
    assert after["owl.png"][:2] != before["owl.png"][:2]   # the unrecorded PNG was written anew
    assert summary["resume"] == {"kept": 3, "sampled": 2}
    err = capsys.readouterr().err
    assert "keeping 3 of 5 images (finished, same record); sampling again 1 left unfinished" in err, err
    assert len(manifest.read_manifest(str(out))) == 5


def test_a_whole_round_runs_when_one_of_its_images_is_missing(tmp_path, monkeypatch):
    """Batches of 2: losing image 3 reruns the batch [2, 3] (its images come out of the same
    batch as in an uninterrupted run) but rewrites only image 3."""
    cfg = cfg_with_file(tmp_path, jsonl(FIVE))
    out = tmp_path / "out"
    run_toy(cfg, monkeypatch)
    full = files_state(out)
    (out / "images" / "003.json").unlink()
    log = []
    run_toy(cfg, monkeypatch, log)
    assert log == [[9, 10]]
    after = files_state(out)
    assert after["002.png"] == full["002.png"]             # same inode and mtime: not rewritten
    assert after["003.png"][2] == full["003.png"][2] and after["003.png"][:2] != full["003.png"][:2]


def test_a_changed_setting_replaces_what_it_changes_and_says_so(tmp_path, monkeypatch, capsys):
    cfg = cfg_with_file(tmp_path, jsonl(FIVE), sampling={"batch_size": 1})
    out = tmp_path / "out"
    run_toy(cfg, monkeypatch)
    first = files_state(out)
    # one line's seed changes: only that image is sampled again
    changed = [dict(x) for x in FIVE]
    changed[2]["seed"] = 99
    capsys.readouterr()
    log = []
    run_toy(cfg_with_file(tmp_path, jsonl(changed), sampling={"batch_size": 1}), monkeypatch, log)
    assert log == [[99]]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "held earlier images" in ln]
    assert lines == [f"moe-ep: {out} held earlier images: keeping 4 of 5 images (finished, same record); "
                     "replacing 1 whose seed changed (9 -> 99); statistics carried over from its stats.json"], lines
    after = files_state(out)
    assert all(after[n] == first[n] for n in first if not n.startswith("002."))
    # the number of steps changes: every image is sampled again
    log = []
    run_toy(cfg_with_file(tmp_path, jsonl(changed), sampling={"batch_size": 1, "num_inference_steps": 4}),
            monkeypatch, log)
    assert len(log) == 5
    err = capsys.readouterr().err
    assert "keeping 0 of 5 images (finished, same record); replacing 5 whose sampling.num_inference_steps changed " \
           "(3 -> 4)" in err, err


def test_a_png_that_is_not_the_recorded_one_is_sampled_again(tmp_path, monkeypatch):
    cfg = cfg_with_file(tmp_path, jsonl(FIVE), sampling={"batch_size": 1})
    out = tmp_path / "out"
    run_toy(cfg, monkeypatch)
    good = (out / "images" / "fox.png").read_bytes()
    (out / "images" / "fox.png").write_bytes(good[:-10])   # truncated by something else
    log = []
    run_toy(cfg, monkeypatch, log)
    assert log == [[7]] and (out / "images" / "fox.png").read_bytes() == good


def test_the_record_is_written_only_after_its_png(tmp_path, monkeypatch):
    """A PNG write that fails (disk full) leaves no record of that image; the images before it
    keep theirs, and a rerun samples the rest."""
    cfg = cfg_with_file(tmp_path, jsonl(FIVE), sampling={"batch_size": 1})
    out = tmp_path / "out"
    real, calls = job.save_png, []

    def failing(image, path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(image, path)

    monkeypatch.setattr(job, "save_png", failing)
    with pytest.raises(job.OutputWriteError):
        run_toy(cfg, monkeypatch)
    assert sorted(os.listdir(out / "images")) == ["001.json", "001.png", "fox.json", "fox.png"]
    monkeypatch.setattr(job, "save_png", real)
    log = []
    run_toy(cfg, monkeypatch, log)
    assert log == [[9], [10], [11]]


def test_an_earlier_runs_other_images_go_and_the_users_files_stay(tmp_path, monkeypatch):
    cfg = cfg_with_file(tmp_path, jsonl(FIVE), sampling={"batch_size": 1})
    out = tmp_path / "out"
    run_toy(cfg, monkeypatch)
    (out / "images" / "notes.txt").write_text("mine")
    (out / "images" / "mine.png").write_bytes(b"not a run's")
    run_toy(cfg_with_file(tmp_path, jsonl(FIVE[:2]), sampling={"batch_size": 1}), monkeypatch)
    assert sorted(os.listdir(out / "images")) == ["001.json", "001.png", "fox.json", "fox.png", "mine.png", "notes.txt"]


def test_the_statistics_carry_over_on_resume(tmp_path, monkeypatch, capsys):
    """A rerun that keeps images seeds its statistics from the folder's stats.json, as
    eplb.stats_file does: with eplb on it plans from them before its first forward. A rerun that
    keeps nothing starts afresh."""
    eplb = {"enabled": True, "num_redundant_experts": 2, "window_size": 2, "min_gain": -1}
    cfg = cfg_with_file(tmp_path, jsonl(FIVE), sampling={"batch_size": 1}, eplb=eplb)
    out = tmp_path / "out"
    first = run_toy(cfg, monkeypatch)
    assert first["rebalances"] == [] or first["rebalances"][0]["trigger"] != "stats_file"
    (out / "images" / "owl.json").unlink()
    capsys.readouterr()
    summary = run_toy(cfg, monkeypatch)
    assert summary["config"]["eplb"]["stats_file"] == str(out / "stats.json")
    assert summary["rebalances"][0]["trigger"] == "stats_file" and summary["rebalances"][0]["forward_idx"] == -1
    assert "statistics carried over from its stats.json" in capsys.readouterr().err
    fresh = run_toy(cfg_with_file(tmp_path, jsonl(FIVE), sampling={"batch_size": 1, "num_inference_steps": 4},
                                  eplb=eplb), monkeypatch)
    assert fresh["config"]["eplb"]["stats_file"] is None and fresh["resume"]["kept"] == 0


def test_the_layout_is_part_of_a_record_only_where_the_images_depend_on_it(tmp_path):
    """The world and EP sizes only where a token's expert output depends on the rows beside it
    (model.moe.batch_invariant off, or auto on GPUs); the batch size too where the dense parts are
    not covered (a user text encoder, compile, diffusers models); a cfg / sp split always."""
    cfg = cfg_with_file(tmp_path, jsonl(FIVE))
    lay = lambda *a, **k: manifest.image_settings(cfg, *a, **k)["layout"]
    assert lay(4, 2, "cpu") == {}
    assert lay(4, 2, "cuda") == {"batch_size": 2, "world_size": 4, "ep_size": 2}
    assert lay(4, 2, "cpu", {"cfg": 2, "ulysses": 2, "ring": 1}) == {"cfg": 2, "ulysses": 2, "ring": 1}
    assert lay(4, 2, "cpu", {"cfg": 1, "ulysses": 1, "ring": 1}) == {}
    cfg.model.moe.batch_invariant = "off"
    assert lay(4, 2, "cpu") == {"batch_size": 2, "world_size": 4, "ep_size": 2}
    cfg.model.moe.batch_invariant = "on"
    assert lay(4, 2, "cuda") == {}
    cfg.model.compile = True
    assert lay(4, 2, "cuda") == {"batch_size": 2}


def test_a_cuda_graph_is_not_part_of_an_images_identity(tmp_path):
    """model.cuda_graph replays the same kernels: records written with it, without it, or by a
    version before the key existed all match (a resume keeps them)."""
    cfg = cfg_with_file(tmp_path, jsonl(FIVE))
    plain = manifest.image_settings(cfg, 1, 1, "cuda")
    cfg.model.cuda_graph = True
    assert manifest.image_settings(cfg, 1, 1, "cuda") == plain
    assert "cuda_graph" not in plain["model"]["config"]
    cfg.model.compile = True                                       # compiling does change the bits
    assert manifest.image_settings(cfg, 1, 1, "cuda")["model"] != plain["model"]
