"""A diffusers folder that does not match its model fails with one clear line naming the file and
the key (ConfigError on model.path), before any process group (`preflight`); the disk weight
source and the load report at EP = 1."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_ep.config import Config, ConfigError
from moe_ep.models.diffusers import inspect_folder, load_transformer, preflight
from moe_ep.models.diffusers.loader import build_meta_model
from moe_ep.models.diffusers.tiny import save_tiny_folders
from moe_ep.parallel import ParallelContext

EXPERT_KEY = "double_stream_blocks.0.block.ff_i.experts.1.w2.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return save_tiny_folders(str(tmp_path_factory.mktemp("diffusers_models")))


@pytest.fixture
def hidream(saved, tmp_path):
    """A private copy of the sharded HiDream transformer folder."""
    return shutil.copytree(saved["hidream"], tmp_path / "hidream")


@pytest.fixture
def nucleus(saved, tmp_path):
    """A private copy of the NucleusMoE pipeline folder."""
    return shutil.copytree(saved["nucleus"], tmp_path / "nucleus")


def shard_of(folder, key: str) -> str:
    with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")) as f:
        return os.path.join(folder, json.load(f)["weight_map"][key])


def edit_index(folder, fn) -> None:
    path = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    with open(path) as f:
        index = json.load(f)
    fn(index["weight_map"])
    with open(path, "w") as f:
        json.dump(index, f)


def edit_config(folder, **changes) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def fails(folder, *needles) -> str:
    """Loading and preflight both refuse `folder` with one line on model.path containing `needles`."""
    cfg = Config()
    cfg.model.type, cfg.model.path = "diffusers", str(folder)
    for call in (lambda: preflight(cfg, 1), lambda: load_transformer(str(folder), ParallelContext())):
        with pytest.raises(ConfigError) as err:
            call()
        msg = str(err.value)
        assert err.value.field_name == "model.path" and "\n" not in msg, msg
        for needle in needles:
            assert str(needle) in msg, (needle, msg)
    return msg


def test_wrong_shape_names_shard_and_key(hidream):
    shard = shard_of(hidream, EXPERT_KEY)
    tensors = load_file(shard)
    tensors[EXPERT_KEY] = tensors[EXPERT_KEY][:, :-1].contiguous()
    save_file(tensors, shard)
    msg = fails(hidream, os.path.basename(shard), EXPERT_KEY, "has shape")
    assert "[32, 255]" in msg and "[32, 256]" in msg


def test_missing_key_names_index_and_key(hidream):
    shard = shard_of(hidream, EXPERT_KEY)
    tensors = load_file(shard)
    del tensors[EXPERT_KEY]
    save_file(tensors, shard)
    # still listed in the index: the index names a shard that does not hold it
    fails(hidream, "index.json", EXPERT_KEY, os.path.basename(shard))
    edit_index(hidream, lambda m: m.pop(EXPERT_KEY))
    fails(hidream, "index.json", EXPERT_KEY, "is missing")


def test_unexpected_key_and_config_that_does_not_match_the_weights(nucleus):
    weights = os.path.join(nucleus, "transformer", "diffusion_pytorch_model.safetensors")
    tensors = load_file(weights)
    save_file({**tensors, "transformer_blocks.7.img_mlp.gate.weight": torch.zeros(8, 128)}, weights)
    fails(nucleus, "diffusion_pytorch_model.safetensors", "transformer_blocks.7.img_mlp.gate.weight", "is not in")
    save_file(tensors, weights)
    # the config says 16 experts, the weights hold 8: the first key (in order) whose shape differs
    edit_config(os.path.join(nucleus, "transformer"), num_experts=16)
    fails(nucleus, "diffusion_pytorch_model.safetensors", "transformer_blocks.1.img_mlp.experts.down_proj",
          "[8, 24, 64]", "[16, 24, 64]")


def test_bad_config(hidream, tmp_path):
    cfg_file = os.path.join(hidream, "config.json")
    with open(cfg_file) as f:
        good = f.read()
    edit_config(hidream, _class_name="FluxTransformer2DModel")
    fails(hidream, "config.json", "_class_name", "FluxTransformer2DModel", "HiDreamImageTransformer2DModel")
    edit_config(hidream, _class_name="HiDreamImageTransformer2DModel", num_attention_heads="four")
    fails(hidream, "config.json", "cannot be built")
    with open(cfg_file, "w") as f:
        f.write(good[:-5])
    fails(hidream, "config.json", "JSON")
    fails(tmp_path / "nowhere", "is not a folder")
    os.makedirs(tmp_path / "empty")
    fails(tmp_path / "empty", "config.json", "model_index.json")


def test_truncated_shard(hidream):
    shard = shard_of(hidream, EXPERT_KEY)
    with open(shard, "r+b") as f:
        f.truncate(100)
    fails(hidream, os.path.basename(shard), "cannot be read as safetensors")


def test_module_tensor_without_rebuild_rule_is_refused(saved):
    info = inspect_folder(saved["nucleus"])
    build_meta_model(info)  # with the spec's rule: fine
    bare = dataclasses.replace(info, spec=dataclasses.replace(info.spec, rebuild={}))
    with pytest.raises(ConfigError, match=r"module 'pos_embed' holds tensor '(pos|neg)_freqs'.*rebuild rule"):
        build_meta_model(bare)


def test_preflight_shape_and_layout(saved):
    from moe_ep.models import preflight_model

    cfg = Config()
    cfg.model.type, cfg.model.path = "diffusers", saved["hidream"]
    # a transformer-only folder has no pipeline to sample with: refused before any weight is read
    with pytest.raises(ConfigError, match="has no model_index.json") as err:
        preflight_model(cfg, 4)
    assert err.value.field_name == "model.path"
    cfg.model.text_encoder = "no_such_module_xyz:build"
    with pytest.raises(ConfigError, match="cannot import") as err:
        preflight_model(cfg, 4)
    assert err.value.field_name == "model.text_encoder"
    cfg.model.text_encoder = "moe_ep.models.diffusers.tiny_pipeline:hidream_pipeline_for"
    shape = preflight_model(cfg, 4)
    assert (shape.num_layers, shape.num_experts, shape.top_k) == (3, 4, 2)
    cfg.model.path = saved["nucleus"]
    shape = preflight(cfg, 2)
    assert (shape.num_layers, shape.num_experts) == (3, 8)
    cfg.eplb.num_redundant_experts = 1   # 9 slots over 2 ranks
    with pytest.raises(ConfigError) as err:
        preflight(cfg, 2)
    assert err.value.field_name == "eplb.num_redundant_experts"
    cfg.model.path = None
    with pytest.raises(ConfigError, match="model.path"):
        preflight(cfg, 1)


def test_disk_source_and_report(saved):
    """The disk weight source gives what the slots hold; the report counts this rank's experts.
    (`build_served_model` around the loader, with its pipeline, is tested with the pipeline.)"""
    loaded = load_transformer(saved["nucleus"], ParallelContext(), num_redundant=2)
    layers = loaded.moe_layers
    assert len(layers) == 3 and all(layer.num_slots == 10 for layer in layers)
    for i, layer in enumerate(layers):
        for slot, expert in enumerate(layer.local_experts):
            w13, w2 = loaded.sources[i](expert)      # read from disk again
            assert torch.equal(w13, layer.experts.w13[slot]) and torch.equal(w2, layer.experts.w2[slot])
    report = loaded.report
    # 10 slots hold 8 distinct experts (slots 8, 9 replicate experts 0, 1): each read once
    assert report.expert_bytes_read == 3 * 8 * (64 * 48 + 24 * 64) * 4
    assert report.expert_slot_bytes == 3 * 10 * (64 * 48 + 24 * 64) * 4
    assert report.peak_tensor_bytes >= report.expert_slot_bytes + report.other_bytes
    json.dumps(report.as_dict())


def test_top_k_above_the_expert_count_is_refused(tmp_path):
    """A HiDream config picking 5 of 4 experts: diffusers' own gate could not run it (torch.topk),
    so the folder is refused naming model.path and the config file, not served with k clamped."""
    from moe_ep.models.diffusers.loader import check_folder
    from moe_ep.models.diffusers.tiny import tiny_hidream

    folder = str(tmp_path / "k5")
    tiny_hidream(0, experts=4, top_k=5).save_pretrained(folder)
    with pytest.raises(ConfigError, match="top 5 of 4 experts") as err:
        check_folder(folder)
    assert err.value.field_name == "model.path" and "config.json" in str(err.value)


def test_index_and_config_that_json_cannot_hold_as_diffusers_does(hidream):
    """A weight_map entry that is not a plain file name of the folder (a number, a path out of
    it) and a config.json nested too deeply: one model.path line each, not a traceback."""
    edit_index(hidream, lambda m: m.__setitem__(EXPERT_KEY, 5))
    fails(hidream, "index.json", EXPERT_KEY, "must be the name of a file")
    edit_index(hidream, lambda m: m.__setitem__(EXPERT_KEY, "../elsewhere.safetensors"))
    fails(hidream, "index.json", "../elsewhere.safetensors")
    with open(os.path.join(hidream, "config.json"), "w") as f:
        f.write("[" * 100000)
    fails(hidream, "config.json", "nested too deeply")


def test_pipeline_folder_missing_components_is_refused_in_preflight(saved, tmp_path):
    """model.text_encoder = "builtin" samples through the folder's own pipeline: a folder whose
    model_index.json class needs components it lacks (the tiny NucleusMoE folder holds only its
    transformer; a partial download) is refused in preflight, naming them; null entries and
    present subfolders pass; an unknown class or unreadable model_index.json is one line too."""
    import json
    import shutil

    from moe_ep.models import preflight_model

    cfg = Config()
    cfg.model.type, cfg.model.path = "diffusers", saved["nucleus"]
    with pytest.raises(ConfigError, match=r"lacks the NucleusMoEImagePipeline components processor, "
                                          r"scheduler, text_encoder, vae") as err:
        preflight_model(cfg, 2)
    assert err.value.field_name == "model.path"
    folder = tmp_path / "nucleus"
    shutil.copytree(saved["nucleus"], folder)
    index = json.load(open(folder / "model_index.json"))
    for name in ("processor", "scheduler", "text_encoder"):
        os.makedirs(folder / name)
    index["vae"] = [None, None]
    json.dump(index, open(folder / "model_index.json", "w"))
    cfg.model.path = str(folder)
    assert preflight_model(cfg, 2).num_experts == 8
    os.rmdir(folder / "scheduler")
    with pytest.raises(ConfigError, match=r"lacks the NucleusMoEImagePipeline components scheduler \("):
        preflight_model(cfg, 2)
    json.dump(dict(index, _class_name="NoSuchPipeline"), open(folder / "model_index.json", "w"))
    with pytest.raises(ConfigError, match="names the pipeline class 'NoSuchPipeline'"):
        preflight_model(cfg, 2)
    (folder / "model_index.json").write_text("{")
    with pytest.raises(ConfigError, match="model_index.json cannot be read"):
        preflight_model(cfg, 2)
