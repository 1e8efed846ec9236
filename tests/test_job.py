"""The job's parts on their own (moe_ep/job.py): the work split, the stats.json writer, the
per-forward recorder (balancedness under the placement in effect, next timestep to the
rebalancer), and a whole run of a served model the job has never seen (a toy ServedModel of one
MoE layer), so that the job provably knows no model."""
from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import pytest
import torch

import moe_ep.job as job
import moe_ep.models
from moe_ep import config as config_mod
from moe_ep.layer import MoELayer
from moe_ep.models.base import NoHooks, ServedModel
from moe_ep.parallel import ParallelContext
from moe_ep.rebalance import RebalanceRecord
from moe_ep.stats import ExpertLoadStats

E, TOP_K, H = 8, 2, 16


# ---------------------------------------------------------------- work split

@pytest.mark.parametrize("prompts, batch, world", [(5, 2, 2), (1, 3, 4), (7, 1, 3), (4, 2, 2), (6, 4, 1)])
def test_work_split(prompts, batch, world):
    """Batch j (prompts j*batch ..) runs on rank j % world in round j // world; every rank runs
    ceil(batches / world) rounds; ranks without a batch get [] (written here from the rule)."""
    split = job.WorkSplit.of(prompts, batch, world)
    n_batches = -(-prompts // batch)
    assert split.rounds == -(-n_batches // world)
    seen = []
    for r in range(split.rounds):
        in_round = 0
        for rank in range(world):
            j = r * world + rank
            want = list(range(j * batch, min((j + 1) * batch, prompts))) if j < n_batches else []
            assert split.batch(r, rank) == want, (r, rank)
            seen += want
            in_round += len(want)
        assert split.prompts_in_round(r) == in_round
    assert seen == list(range(prompts))        # every prompt once, in order


# ---------------------------------------------------------------- stats writer

class FakeStats:
    def __init__(self):
        self.saved = []

    def save(self, path):
        self.saved.append(path)


def test_stats_writer_rounds_and_timed_windows(tmp_path):
    now = [0.0]
    stats = FakeStats()
    w = job.StatsWriter(stats, str(tmp_path), ParallelContext(rank=0, world_size=2), every_s=10.0, clock=lambda: now[0])
    now[0] = 5.0
    w.window_closed()                       # 5 s after the last write: not yet
    assert stats.saved == []
    now[0] = 10.0
    w.window_closed()                       # 10 s: written
    assert stats.saved == [str(tmp_path / "stats.json")]
    now[0] = 12.0
    w.window_closed()                       # 2 s after that write: not yet
    w.round_done()                          # every round: always
    assert len(stats.saved) == 2
    other = FakeStats()
    w1 = job.StatsWriter(other, str(tmp_path), ParallelContext(rank=1, world_size=2), every_s=0.0)
    w1.round_done()
    w1.window_closed()
    assert other.saved == []                # only rank 0 writes


def test_write_error_names_the_file(tmp_path):
    def full():
        raise OSError(28, "No space left on device")

    with pytest.raises(job.OutputWriteError, match=r"^config field 'output_dir': rank 3 could not write /x/y.png: "
                                                   r"No space left on device \(errno 28\)"):
        job._write(3, "/x/y.png", full)


# ---------------------------------------------------------------- a toy served model

def moe_cfg():
    return config_mod.MoEConfig(num_experts=E, top_k=TOP_K, expert_hidden_size=8)


class ToyModel(ServedModel):
    """One MoE layer; a "forward" sends every prompt's `tokens` rows (twice: conditional rows,
    then unconditional ones) through it. Images are the mean of the layer's output per prompt."""

    def __init__(self, ctx, steps=3, tokens=5, redundant=2):
        self.layer = MoELayer(H, moe_cfg(), ctx, num_redundant=redundant, layer_idx=0)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.layer.router.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.layer.load_expert_weights(self.weight_source(0))
        self.tokens, self.num_inference_steps = tokens, steps
        self.tokens_per_image, self.rows_per_prompt = tokens, 2 * tokens
        self.seen_t = []

    def moe_layers(self):
        return [self.layer]

    def weight_source(self, layer_idx):
        def source(e):
            g = torch.Generator().manual_seed(100 * layer_idx + e)
            return torch.randn(H, 16, generator=g) * 0.1, torch.randn(8, H, generator=g) * 0.1
        return source

    @property
    def timesteps(self):
        return [1.0 - i / self.num_inference_steps for i in range(self.num_inference_steps)]

    def sample(self, prompts, seeds, hooks):
        B = len(prompts)
        x = torch.stack([torch.randn(self.tokens, H, generator=torch.Generator().manual_seed(s)) for s in seeds]) \
            if B else torch.zeros(0, self.tokens, H)                                   # [B, tokens, H]
        info = {"batch": B, "rows": 2 * B * self.tokens, "cond_rows": B * self.tokens,
                "sample_branch": [0] * B + [1] * B}
        for i, t in enumerate(self.timesteps):
            self.seen_t.append(t)
            hooks.on_forward_begin(i, t, info)
            y = self.layer(torch.cat([x, x]).reshape(-1, H))                         # [2B*tokens, H]
            hooks.on_forward_end(i, t, info)
            x = x + 0.1 * y[: B * self.tokens].view_as(x)
        v = (x.mean(-1) * 100).clamp(0, 255).to(torch.uint8).numpy()                 # [B, tokens]
        return [np.repeat(row[None, :, None], 3, axis=2) for row in v]                # [1, tokens, 3]

    def describe(self):
        return {"type": "toy"}


def toy_cfg(tmp_path, extra=()):
    return config_mod.from_dict({
        "model": {"moe": {"num_experts": E, "top_k": TOP_K, "expert_hidden_size": 8}},
        "eplb": {"enabled": False, "num_redundant_experts": 2, "window_size": 2},
        "sampling": {"prompts": ["a", "b", "c"], "num_inference_steps": 3, "batch_size": 2, "seed": 7},
        "telemetry": {"wandb": False}, "output_dir": str(tmp_path / "out"), **dict(extra)})


def test_the_job_runs_a_model_it_has_never_seen(tmp_path, monkeypatch):
    """build_served_model returns the toy: the job writes its images, stats.json with every routed
    copy in the right guidance branch, summary.json with the toy's description."""
    cfg = toy_cfg(tmp_path)
    ctx = ParallelContext()
    toy = ToyModel(ctx)
    monkeypatch.setattr(job, "build_served_model", lambda c, x: toy)
    summary = job.run(cfg, ctx, progress=False)
    out = tmp_path / "out"
    assert sorted(os.listdir(out / "images")) == ["000.json", "000.png", "001.json", "001.png", "002.json", "002.png"]
    assert summary["model"] == {"type": "toy"} and summary["tokens_per_image"] == 5
    assert summary["num_forwards"] == 2 * 3                    # 2 rounds (batches [0, 1] and [2]) x 3 steps
    assert [s["tokens"] for s in summary["steps"]] == [2 * 10] * 3 + [1 * 10] * 3   # prompts in round x rows
    stats = json.load(open(out / "stats.json"))
    load = np.asarray(stats["load"])                           # [1, E]
    assert load.sum() == 3 * 3 * 5 * 2 * TOP_K                 # prompts x steps x tokens x branches x k
    cond, uncond = np.asarray(stats["branches"]["cond"]), np.asarray(stats["branches"]["uncond"])
    assert cond.sum() == uncond.sum() == load.sum() // 2
    assert np.array_equal(cond, uncond)                        # the same rows in both halves: same experts
    assert toy.seen_t == toy.timesteps * 2
    # 6 forwards, windows of 2: three closed windows, each with its balancedness
    assert len(summary["balancedness"]["windows"]) == 3
    assert "model" in json.load(open(out / "summary.json"))


def test_empty_prompt_list_still_runs_every_forward():
    """A rank without a batch: the toy (like every ServedModel) runs the forwards with zero rows."""
    toy = ToyModel(ParallelContext())
    calls = []

    class Hooks(NoHooks):
        def on_forward_begin(self, step, t, info):
            calls.append((step, info["rows"]))

    assert toy.sample([], [], Hooks()) == []
    assert calls == [(0, 0), (1, 0), (2, 0)]


# ---------------------------------------------------------------- the recorder

class MovingRebalancer:
    """Closes windows like the real one, and installs a different placement whenever a window
    closes (as a rebalance would), recording the next timestep it was given."""

    def __init__(self, stats, layer, groups=(None, None)):
        self.stats, self.layer, self.groups = stats, layer, groups
        self.next_ts = []

    def after_forward(self, forward_idx, t, next_timestep=None):
        self.next_ts.append(next_timestep)
        if self.stats.end_forward(self.groups):
            self.closes = getattr(self, "closes", 0) + 1
            if self.closes % 2:   # the window's 5 heaviest experts on GPU 0: unbalanced on purpose
                order = np.argsort(-self.stats.windows[-1][0], kind="stable").tolist()
                new = order[:5] + order[5:] + order[-2:]
            else:                 # back to the contiguous start-up placement
                new = list(range(E)) + list(range(10 - E))
            self.layer.set_placement(torch.tensor(new))
            return RebalanceRecord(forward_idx, "interval", status="ok", ok=True)
        return None


def gpu_balancedness(load: np.ndarray, phy2log: list[int], ep: int) -> float:
    """mean / max GPU load; a GPU's load = sum over its slots of load[expert] / replicas[expert]."""
    reps = np.bincount(phy2log, minlength=len(load))
    per_slot = np.array([load[e] / reps[e] for e in phy2log])
    gpu = per_slot.reshape(ep, -1).sum(1)
    return float(gpu.mean() / gpu.max())


def test_recorder_balancedness_under_the_placement_in_effect():
    """A window's balancedness is computed with the placement that served it, not the one a
    rebalance installs right after; the rebalancer gets the next forward's t (wrapping to the
    first at the end of a batch)."""
    ctx = ParallelContext(ep_size=1)
    toy = ToyModel(ctx, steps=4)
    stats = ExpertLoadStats(1, E, ctx.device, window_size=2, top_k=TOP_K)
    toy.layer.stats = stats
    split = job.WorkSplit.of(2, 2, 1)
    # EP = 1 would make every placement perfectly balanced: score it as if over 2 GPUs
    ctx2 = ParallelContext(ep_size=2)
    reb = MovingRebalancer(stats, toy.layer)
    rec = job.ForwardRecorder(ctx2, stats, [toy.layer], toy.timesteps, split, toy.rows_per_prompt, reb)
    placements = []
    real_end = rec.on_forward_end

    def end(step, t, info):
        placements.append(toy.layer.placement.phy2log.tolist())   # in effect during this forward
        real_end(step, t, info)

    toy.sample(["a", "b"], [1, 2], types.SimpleNamespace(on_forward_begin=rec.on_forward_begin, on_forward_end=end))
    ts = toy.timesteps
    assert reb.next_ts == ts[1:] + ts[:1]
    closed = [r for r in rec.steps if "balancedness" in r]
    assert [r["forward"] for r in closed] == [1, 3] and all(r["rebalanced"] == 1 for r in closed)
    assert placements[1] != placements[2]                  # the rebalance changed the placement
    for k, r in enumerate(closed):
        load = stats.windows[k].astype(np.float64)[0]      # [E]
        want = gpu_balancedness(load, placements[r["forward"]], 2)
        assert r["balancedness"] == pytest.approx(want, abs=1e-12), (k, r)
        f = r["forward"]
        installed = placements[f + 1] if f + 1 < len(placements) else toy.layer.placement.phy2log.tolist()
        assert want != pytest.approx(gpu_balancedness(load, installed, 2))   # the two differ on this load
    assert [r["tokens"] for r in rec.steps] == [2 * toy.rows_per_prompt] * 4


def test_build_served_model_dispatch(tmp_path, monkeypatch):
    """model.type 'diffusers' goes to moe_ep.models.diffusers; when it is not complete the
    error names model.type."""
    cfg = toy_cfg(tmp_path, {"model": {"type": "diffusers", "path": str(tmp_path)}})
    fake = types.ModuleType("moe_ep.models.diffusers")
    monkeypatch.setitem(sys.modules, "moe_ep.models.diffusers", fake)
    monkeypatch.setattr(moe_ep.models, "diffusers", fake, raising=False)
    with pytest.raises(config_mod.ConfigError, match=r"'model.type' = 'diffusers': .*no function 'build_served_model'"):
        moe_ep.models.build_served_model(cfg, ParallelContext())
    fake.build_served_model = lambda c, ctx: ("built", c.model.path)
    fake.preflight = lambda c, world: None
    assert moe_ep.models.build_served_model(cfg, ParallelContext()) == ("built", str(tmp_path))
    assert moe_ep.models.preflight_model(cfg, 1) is None


class FailingToy(ToyModel):
    """Samples its first batch, then finds a bad input after 2 forwards of the second (as a user
    text encoder returning the wrong shape would): a ConfigError in the middle of a round."""

    def sample(self, prompts, seeds, hooks):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls != 2:
            return super().sample(prompts, seeds, hooks)

        class RaiseAfterTwo(NoHooks):
            def on_forward_begin(self, step, t, info):
                hooks.on_forward_begin(step, t, info)

            def on_forward_end(self, step, t, info):
                hooks.on_forward_end(step, t, info)
                if step == 1:
                    raise config_mod.ConfigError("model.text_encoder", "x:y", "must return [batch, tokens, text_dim]")
        return super().sample(prompts, seeds, RaiseAfterTwo())


def test_a_rerun_into_the_same_folder_replaces_the_earlier_outputs(tmp_path, monkeypatch):
    """A complete run of 5 prompts, then a run of 3 prompts into the same output_dir that fails in
    its second batch: the earlier summary.json, stats.json and images are gone (no summary.json:
    this run is incomplete), this run's first image is there, and the mid-run ConfigError went
    through the error path (the closed statistics windows saved)."""
    ctx = ParallelContext()
    out = tmp_path / "out"
    monkeypatch.setattr(job, "build_served_model", lambda c, x: ToyModel(ctx))
    job.run(toy_cfg(tmp_path, {"sampling": {"prompts": list("abcde"), "num_inference_steps": 3, "batch_size": 1}}.items()),
            ctx, progress=False)
    assert sorted(os.listdir(out / "images")) == sorted(f"{i:03d}.{x}" for i in range(5) for x in ("png", "json"))
    assert (out / "summary.json").exists()
    (out / "images" / "notes.txt").write_text("the user's own file")
    monkeypatch.setattr(job, "build_served_model", lambda c, x: FailingToy(ctx))
    cfg = toy_cfg(tmp_path, {"sampling": {"prompts": list("xyz"), "num_inference_steps": 3, "batch_size": 1,
                                          "seed": 99},
                             "eplb": {"enabled": False, "window_size": 1}}.items())
    with pytest.raises(config_mod.ConfigError, match="model.text_encoder"):
        job.run(cfg, ctx, progress=False)
    assert not (out / "summary.json").exists()
    assert sorted(os.listdir(out / "images")) == ["000.json", "000.png", "notes.txt"]
    # this run's windows: 3 of batch 0 (written after round 0) and 2 of batch 1, which only the
    # error path writes
    stats = json.load(open(out / "stats.json"))
    assert len(stats["windows"]) == 5
    assert np.asarray(stats["load"]).sum() == 5 * 5 * 2 * TOP_K    # 5 forwards x 5 tokens x 2 branches x k


def test_a_resume_in_place_keeps_its_statistics_until_it_writes_its_own(tmp_path):
    """eplb.stats_file = <output_dir>/stats.json (resume into the same folder): that file is not
    removed with the earlier outputs, so a run that fails before its first window still leaves
    a stats.json to resume from; the earlier summary.json and images go."""
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "report").mkdir()
    for name in ("summary.json", "stats.json", "images/000.png", "images/001.png", "images/notes.txt",
                 "report/report.md", "report/latency.png", "report/mine.png"):
        (out / name).write_text("earlier")
    removed = job.remove_earlier_outputs(str(out), keep=str(out / "stats.json"))
    assert sorted(removed) == ["images/000.png", "images/001.png", "report/latency.png", "report/report.md",
                               "summary.json"]
    assert sorted(os.listdir(out)) == ["images", "report", "stats.json"] and os.listdir(out / "images") == ["notes.txt"]
    assert os.listdir(out / "report") == ["mine.png"]              # not a file launch/report.py writes
    assert job.remove_earlier_outputs(str(out), keep=None) == ["stats.json"]
    assert job.remove_earlier_outputs(str(out), keep=str(tmp_path / "gone.json")) == []
