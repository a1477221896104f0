"""The Hugging Face Hub and open_clip's pretrained weights, offline: a Hugging Face cache
folder laid out by hand (models--ORG--NAME/refs/<ref> holding a commit id,
snapshots/<commit>/<files>), HF_HUB_OFFLINE on, and the loaders pointed at it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.model import CLIP
from safetensors.torch import save_file

import vlmoe
from vlmoe.errors import ConfigError, NotFound
from vlmoe.models.hub import model_card, parse_hub_id
from helpers import console

BIN = Path(sys.executable).parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def lay_out_cache(cache: Path, repo_id: str, files: dict, commit: str = COMMIT, refs=("main",)) -> Path:
    """A repo in a Hugging Face cache, as huggingface_hub leaves it after a download."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        if isinstance(src, (str, Path)):
            shutil.copyfile(src, snap / name)
        else:
            (snap / name).write_bytes(src)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE=<tmp> for this process (huggingface_hub reads its
    constants at call time) and for subprocesses (the environment)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def tiny(seed=0, **moe):
    torch.manual_seed(seed)
    return vlmoe.create_model("limoe-tiny", moe=moe).eval() if moe else vlmoe.create_model("limoe-tiny").eval()


def inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randint(1, 400, (2, 16), generator=g)


def test_parse_hub_id():
    assert parse_hub_id("hf-hub:org/name") == ("org/name", None)
    assert parse_hub_id("hf-hub:org/my.model-1@v1.0") == ("org/my.model-1", "v1.0")
    for bad in ("hf-hub:name", "hf-hub:org/name@", "hf-hub:/name", "hf-hub:a/b/c"):
        with pytest.raises(ConfigError, match="hf-hub:ORG/NAME"):
            parse_hub_id(bad)


def test_create_model_from_the_hub_cache_offline_with_revisions(tmp_path, offline_cache):
    a, b = tiny(0), tiny(1)
    export_a, export_b = vlmoe.save_pretrained(a, tmp_path / "a"), vlmoe.save_pretrained(b, tmp_path / "b")
    files = lambda e: {n: e / n for n in ("config.json", "model.safetensors")}  # noqa: E731
    lay_out_cache(offline_cache, "org/limoe", files(export_a), COMMIT, refs=("main",))
    lay_out_cache(offline_cache, "org/limoe", files(export_b), OTHER, refs=("v2",))
    image, text = inputs()
    with torch.no_grad():
        for spec, ref in (("hf-hub:org/limoe", a), ("hf-hub:org/limoe@v2", b), (f"hf-hub:org/limoe@{OTHER}", b),
                          (f"hf-hub:org/limoe@{COMMIT}", a)):
            m = vlmoe.create_model(spec).eval()
            torch.testing.assert_close(m.encode_image(image), ref.encode_image(image), rtol=0, atol=0)
            torch.testing.assert_close(m.encode_text(text), ref.encode_text(text), rtol=0, atol=0)
        # as pretrained= of a named model, and through the loader every CLI uses
        m = vlmoe.create_model("limoe-tiny", pretrained="hf-hub:org/limoe@v2").eval()
        torch.testing.assert_close(m.encode_text(text), b.encode_text(text), rtol=0, atol=0)
        from vlmoe.models.factory import load_model

        torch.testing.assert_close(load_model("hf-hub:org/limoe").eval().encode_image(image), a.encode_image(image), rtol=0, atol=0)


def test_hub_errors_name_the_cache_and_the_fix(tmp_path, offline_cache):
    with pytest.raises(NotFound) as e:
        vlmoe.create_model("hf-hub:org/absent")
    msg = str(e.value)
    assert str(offline_cache) in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg
    lay_out_cache(offline_cache, "org/limoe", {"config.json": b"{}", "model.safetensors": b""})
    with pytest.raises(NotFound, match="config.json.*model.safetensors|not in the Hugging Face cache"):
        vlmoe.create_model("hf-hub:org/limoe@nosuchbranch")
    # an open_clip repo is not a vlmoe export: the error says what to do with it
    lay_out_cache(offline_cache, "org/openclip", {"open_clip_config.json": b"{}"})
    with pytest.raises(NotFound, match="upcycle_open_clip"):
        vlmoe.create_model("hf-hub:org/openclip")


def test_installed_zeroshot_reads_a_hub_model_offline(tmp_path, offline_cache, shards, capsys):
    """What a user types: vlmoe-zeroshot --model hf-hub:ORG/NAME with HF_HUB_OFFLINE=1 and
    HF_HUB_CACHE set in the environment: the same top-1 as the export folder itself (scored
    in this process: the installed script's path is the hub one)."""
    from vlmoe.cli import zeroshot_main

    export = vlmoe.save_pretrained(tiny(3), tmp_path / "export")
    lay_out_cache(offline_cache, "org/limoe", {n: export / n for n in ("config.json", "model.safetensors")})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(offline_cache)}
    common = ["--data", shards["zeroshot"], "--classnames", shards["classnames"], "--templates", shards["templates"],
              "--json", "--num-workers", "0"]
    p = subprocess.run([str(BIN / "vlmoe-zeroshot"), "--model", "hf-hub:org/limoe", *common], capture_output=True, text=True,
                       timeout=240, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(p.stdout)[0], zeroshot_main(["--model", str(export), *common])[0]]
    capsys.readouterr()
    assert rows[0]["top1"] == rows[1]["top1"] and rows[0]["n"] == rows[1]["n"] == 24
    # a repo not in the cache: one line, status 2 (the same run_console, in this process)
    p = console(zeroshot_main, "vlmoe-zeroshot", ["--model", "hf-hub:org/missing", *common], capsys)
    assert p.returncode == 2 and str(offline_cache) in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_push_to_hub_uploads_the_export_a_card_and_an_open_clip_config(tmp_path, offline_cache, monkeypatch):
    from huggingface_hub import HfApi

    model = tiny(5)
    calls, uploaded = [], tmp_path / "uploaded"

    def create_repo(self, repo_id, **kw):
        calls.append(("create_repo", repo_id, kw))

    def create_branch(self, repo_id, **kw):
        calls.append(("create_branch", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        calls.append(("upload_folder", repo_id, kw))
        shutil.copytree(folder_path, uploaded)
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    bench = {"dataset": "wds/digits", "model": "m", "pretrained": "none", "task": "zeroshot_classification",
             "metrics": {"acc1": 0.625, "acc5": 0.9, "mean_per_class_recall": 0.61}}
    out = vlmoe.push_to_hub(model, "org/limoe-tiny", revision="exp1", private=True, training_data="bundled digits, 250 x 64",
                            results=[bench])
    assert out == "commit-info"
    assert [c[0] for c in calls] == ["create_repo", "create_branch", "upload_folder"]
    assert calls[0][2]["private"] is True and calls[1][2]["branch"] == "exp1" and calls[2][2]["revision"] == "exp1"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors", "open_clip_config.json"]
    # exactly what save_pretrained writes
    ref = vlmoe.save_pretrained(model, tmp_path / "ref")
    assert (uploaded / "config.json").read_bytes() == (ref / "config.json").read_bytes()
    from safetensors import safe_open

    with safe_open(uploaded / "model.safetensors", "pt") as up, safe_open(ref / "model.safetensors", "pt") as want:
        assert sorted(up.keys()) == sorted(want.keys()) and up.metadata() == want.metadata()
        assert all(torch.equal(up.get_tensor(k), want.get_tensor(k)) for k in want.keys())
    # the model card: counts computed here independently of the package's stats
    card = (uploaded / "README.md").read_text()
    total = sum(p.numel() for p in model.parameters())  # parameters() lists shared tensors once
    assert f"| parameters | {total / 1e6:.2f}M |" in card
    assert "bundled digits, 250 x 64" in card and "| wds/digits | acc1 | 0.6250 |" in card
    assert "library_name: vlmoe" in card and 'vlmoe.create_model("hf-hub:org/limoe-tiny")' in card
    # open_clip reads the config through its own hub reader; the upload loads back through the cache
    files = {p.name: p for p in uploaded.iterdir()}
    lay_out_cache(offline_cache, "org/limoe-tiny", files, refs=("main", "exp1"))
    from open_clip.factory import _get_hf_config

    oc = _get_hf_config("org/limoe-tiny")
    assert oc["model_cfg"] == model.config and oc["preprocess_cfg"]["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    image, text = inputs()
    with torch.no_grad():
        again = vlmoe.create_model("hf-hub:org/limoe-tiny@exp1").eval()
        torch.testing.assert_close(again.encode_image(image), model.encode_image(image), rtol=0, atol=0)


def test_model_card_results_forms_and_dense_models():
    model = tiny(6)
    card = model_card(model, "org/x", results={"digits": {"top1": 0.5}})
    assert "| digits | top1 | 0.5000 |" in card and "mixture-of-experts" in card
    rows = [{"model": "m", "top1": 0.25, "top5": 0.75, "n": 8}]  # vlmoe-zeroshot --json rows
    assert "| zero-shot | top5 | 0.7500 |" in model_card(model, "org/x", results=rows)
    with pytest.raises(ConfigError, match="metrics"):
        model_card(model, "org/x", results=[{"acc": 1}])
    dense = vlmoe.create_model("clip-tiny")
    card = model_card(dense, "org/clip")
    assert "A dense CLIP" in card and "mixture-of-experts" not in card and "None given" in card


# -- open_clip pretrained weights by name ------------------------------------------------------

OC_NAME, OC_TAG, OC_REPO = "vlmoe-test-tiny", "testtag", "testorg/tiny-clip"
OC_CFG = {"embed_dim": 64, "vision_cfg": {"layers": 2, "width": 64, "head_width": 16, "patch_size": 8, "image_size": 32},
          "text_cfg": {"context_length": 12, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 2}}


@pytest.fixture
def registered_open_clip(monkeypatch):
    """A tiny architecture and a pretrained tag served from the Hub, registered in open_clip's
    own tables (as its bundled configs and pretrained list are)."""
    from open_clip import factory, pretrained

    monkeypatch.setitem(factory._MODEL_CONFIGS, OC_NAME, json.loads(json.dumps(OC_CFG)))
    monkeypatch.setitem(pretrained._PRETRAINED, OC_NAME, {OC_TAG: {"hf_hub": OC_REPO + "/", "quick_gelu": False}})
    torch.manual_seed(7)
    dense = CLIP(**json.loads(json.dumps(OC_CFG))).eval()
    return dense


def dense_inputs():
    g = torch.Generator().manual_seed(2)
    text = torch.randint(1, 999, (3, 12), generator=g)
    text[:, 9:] = 0
    return torch.randn(3, 3, 32, 32, generator=g), text


def test_upcycle_open_clip_by_name_and_tag_through_open_clips_cache(tmp_path, offline_cache, registered_open_clip):
    dense = registered_open_clip
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, weights)
    lay_out_cache(offline_cache, OC_REPO, {"open_clip_model.safetensors": weights})
    moe = vlmoe.upcycle_open_clip(OC_NAME, pretrained=OC_TAG, num_experts=4, moe_layers="all").eval()
    assert moe.moe_config.num_experts == 4 and moe.image_moe_layers == [0, 1]
    image, text = dense_inputs()
    with torch.no_grad():
        torch.testing.assert_close(moe.encode_image(image), dense.encode_image(image), rtol=0, atol=1e-5)
        torch.testing.assert_close(moe.encode_text(text), dense.encode_text(text), rtol=0, atol=1e-5)
    # a weights file as pretrained=, as open_clip takes it
    moe2 = vlmoe.upcycle_open_clip(OC_NAME, pretrained=str(weights), num_experts=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(moe2.encode_text(text), dense.encode_text(text), rtol=0, atol=1e-5)
    # an open_clip-style Hub repo (open_clip_config.json + weights)
    lay_out_cache(offline_cache, "testorg/oc-hub", {"open_clip_config.json": json.dumps({"model_cfg": OC_CFG}).encode(),
                                                  "open_clip_model.safetensors": weights})
    moe3 = vlmoe.upcycle_open_clip("hf-hub:testorg/oc-hub", num_experts=2).eval()
    with torch.no_grad():
        torch.testing.assert_close(moe3.encode_image(image), dense.encode_image(image), rtol=0, atol=1e-5)


def test_upcycle_by_name_errors(tmp_path, offline_cache, registered_open_clip):
    with pytest.raises(NotFound) as e:  # the tag is known, its weights are not in the cache, and we are offline
        vlmoe.upcycle_open_clip(OC_NAME, pretrained=OC_TAG)
    msg = str(e.value)
    assert str(offline_cache) in msg and OC_REPO in msg and "\n" not in msg
    with pytest.raises(NotFound, match=str(tmp_path / "elsewhere")):  # cache_dir= is the folder named
        vlmoe.upcycle_open_clip(OC_NAME, pretrained=OC_TAG, cache_dir=str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match=f"tags: {OC_TAG}"):
        vlmoe.upcycle_open_clip(OC_NAME, pretrained="nosuchtag")
    with pytest.raises(ConfigError, match="needs its weights"):
        vlmoe.upcycle_open_clip(OC_NAME)
    with pytest.raises(ConfigError, match="neither a file nor an open_clip model name"):
        vlmoe.upcycle_open_clip("ViT-Nonexistent-99", pretrained="x")
    with pytest.raises(NotFound, match="testorg/absent"):
        vlmoe.upcycle_open_clip("hf-hub:testorg/absent")


def test_top_level_names():
    from vlmoe import push_to_hub, upcycle_open_clip, upcycle_timm_vit  # noqa: F401

    assert {"push_to_hub", "upcycle_open_clip", "upcycle_timm_vit"} <= set(vlmoe.__all__)
