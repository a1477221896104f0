import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from PIL import Image
from safetensors.torch import save_file

import vlmoe
from vlmoe.errors import DataError
from vlmoe.cli import zeroshot_main
from vlmoe.data.text import load_classnames, load_templates
from vlmoe.eval import retrieval_metrics
from vlmoe.eval.zeroshot import build_classifier, evaluate_zeroshot

CLASSES = ["red", "green", "blue"]


class KnownAnswerModel(torch.nn.Module):
    """Image embedding = one-hot of the dominant colour channel; text embedding = one-hot of
    the colour word in the prompt (+ template-dependent noise that the ensemble averages)."""

    def __init__(self):
        super().__init__()
        self.tok = vlmoe.get_tokenizer(16)
        self.word_ids = {c: self.tok([c])[0, 1].item() for c in CLASSES}
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, images, normalize=False):
        return F.normalize(F.one_hot(images.mean((2, 3)).argmax(1), 3).float(), dim=-1)

    def encode_text(self, tokens, normalize=False):
        out = torch.zeros(tokens.shape[0], 3)
        for i, row in enumerate(tokens):
            for c, wid in self.word_ids.items():
                if (row == wid).any():
                    out[i, CLASSES.index(c)] = 1.0
        out += 0.1 * torch.randn(out.shape, generator=torch.Generator().manual_seed(int(tokens.sum())))
        return F.normalize(out, dim=-1) if normalize else out


def colour_batches(n_per_class=4):
    images, labels = [], []
    for label in range(3):
        for _ in range(n_per_class):
            img = torch.rand(3, 8, 8) * 0.2
            img[label] += 0.8
            images.append(img)
            labels.append(label)
    return [{"image": torch.stack(images), "label": torch.tensor(labels), "skipped": 1}]


def test_zero_shot_accuracy_on_a_known_answer_model():
    model = KnownAnswerModel()
    templates = ["a photo of {}.", "something {}", "{} colour"]
    clf = build_classifier(model, model.tok, CLASSES, templates, device="cpu")
    r = evaluate_zeroshot(model, colour_batches(), clf)
    assert (r["top1"], r["top5"], r["n"], r["skipped"]) == (1.0, 1.0, 12, 1)
    assert r["per_class"] == [1.0, 1.0, 1.0]
    wrong = build_classifier(model, model.tok, ["green", "blue", "red"], templates, device="cpu")  # names permuted
    assert evaluate_zeroshot(model, colour_batches(), wrong)["top1"] == 0.0


def test_classifier_is_the_prompt_ensemble_open_clip_builds():
    # dropless: routing per token, so embeddings don't depend on what else is in the batch
    model = vlmoe.create_model("limoe-tiny", moe={"capacity_factor": None}).eval()
    tok = vlmoe.get_tokenizer(model)
    templates = load_templates("digits")
    names = load_classnames("digits")[:5]
    ours = build_classifier(model, tok, names, templates, device="cpu")
    theirs = build_zero_shot_classifier(model, tok, names, templates, num_classes_per_batch=3, device="cpu", use_tqdm=False)
    torch.testing.assert_close(ours, theirs)
    with torch.no_grad():  # by hand: normalise per template, average, renormalise
        manual = []
        for c in names:
            e = model.encode_text(tok([t.format(c) for t in templates]), normalize=True).mean(0)
            manual.append(e / e.norm())
    torch.testing.assert_close(ours, torch.stack(manual, 1), atol=1e-5, rtol=1e-5)


def test_retrieval_metrics():
    img = torch.eye(4)
    txt = torch.eye(4)[[0, 1, 3, 2]]  # pairs 2 and 3 swapped
    m = retrieval_metrics(img, txt, ks=(1, 2))
    assert m["image_to_text_R@1"] == 0.5 and m["image_to_text_R@2"] == 0.5 and m["text_to_image_R@1"] == 0.5
    assert retrieval_metrics(img, img)["image_to_text_R@1"] == 1.0
    tied = torch.ones(3, 2) / 2**0.5  # all candidates equal: the true one ranks last
    assert retrieval_metrics(tied, tied, ks=(1, 3))["text_to_image_R@1"] == 0.0


def run_cli(args) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        zeroshot_main(args)
    return buf.getvalue()


def test_zeroshot_cli_json_with_every_model_kind(tmp_path, shards):
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    export = vlmoe.save_pretrained(vlmoe.create_model("limoe-tiny"), tmp_path / "export")
    torch.manual_seed(0)
    clip = CLIP(64, CLIPVisionCfg(layers=2, width=64, head_width=16, patch_size=8, image_size=32),
                CLIPTextCfg(context_length=16, vocab_size=49408, width=64, heads=4, layers=2))
    oc = tmp_path / "oc.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, oc)
    arch = {"embed_dim": 64, "vision_cfg": {"layers": 2, "width": 64, "head_width": 16, "patch_size": 8, "image_size": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
    from vlmoe.models import factory

    factory._configs()["test-oc-arch"] = arch  # register the architecture by name for ARCH@PATH
    try:
        out = run_cli(["--model", str(export), "--model", f"test-oc-arch@{oc}", "--model", "clip-tiny",
                       "--data", shards["zeroshot"], "--classnames", shards["classnames"], "--templates", shards["templates"],
                       "--json", "--num-workers", "0", "--batch-size", "10"])
    finally:
        del factory._configs()["test-oc-arch"]
    rows = json.loads(out)
    assert [r["model"] for r in rows] == [str(export), f"test-oc-arch@{oc}", "clip-tiny"]
    for r in rows:
        assert {"model", "top1", "top5", "n"} <= set(r) and r["n"] == 24 and 0 <= r["top1"] <= r["top5"] <= 1
    table = run_cli(["--model", "clip-tiny", "--data", shards["zeroshot"], "--classnames", shards["classnames"],
                     "--templates", shards["templates"], "--per-class", "--num-workers", "0"])
    assert "| clip-tiny |" in table and "| red |" in table


def test_zeroshot_cli_imagefolder_and_bad_input(tmp_path, shards):
    root = tmp_path / "folder"
    for i, c in enumerate(["alpha", "beta"]):
        (root / c).mkdir(parents=True)
        for j in range(3):
            Image.new("RGB", (40, 40), (250 * (i == 0), 0, 250 * (i == 1))).save(root / c / f"{j}.png")
    names = tmp_path / "names.txt"
    names.write_text("alpha\nbeta\n")
    rows = json.loads(run_cli(["--model", "clip-tiny", "--data", str(root), "--classnames", str(names), "--templates", "digits", "--json", "--num-workers", "0"]))
    assert rows[0]["n"] == 6
    other = tmp_path / "other_names.txt"
    other.write_text("gamma\ndelta\n")
    with pytest.raises(DataError, match="do not match the 2 class names"):
        run_cli(["--model", "clip-tiny", "--data", str(root), "--classnames", str(other), "--templates", "digits"])
    with pytest.raises(DataError, match="label [23] in the data is outside \\[0, 2\\)"):
        run_cli(["--model", "clip-tiny", "--data", shards["zeroshot"], "--classnames", str(names), "--templates", "digits", "--num-workers", "0"])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="is empty"):
        run_cli(["--model", "clip-tiny", "--data", str(root), "--classnames", str(names), "--templates", str(empty)])
    nobrace = tmp_path / "nobrace.txt"
    nobrace.write_text("a photo of a thing\n")
    with pytest.raises(ValueError, match="templates need"):
        run_cli(["--model", "clip-tiny", "--data", str(root), "--classnames", str(names), "--templates", str(nobrace)])
    wrong = tmp_path / "notes.txt"
    wrong.write_text("hello")
    with pytest.raises(vlmoe.models.CheckpointError, match="don't know how to load"):
        run_cli(["--model", str(wrong), "--data", str(root), "--classnames", str(names), "--templates", "digits"])
    foreign = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, foreign)
    with pytest.raises(vlmoe.models.CheckpointError, match="not a checkpoint written by `vlmoe fit`"):
        run_cli(["--model", str(foreign), "--data", str(root), "--classnames", str(names), "--templates", "digits"])


def test_bundled_demo_data_is_readable():
    root = Path(__file__).resolve().parents[1] / "data" / "digits"
    from vlmoe.data import count_samples, expand_shards

    assert count_samples(expand_shards(str(root / "train-{000000..000003}.tar"))) == 4000
    assert count_samples(expand_shards(str(root / "test-000000.tar"))) == 500
    assert load_classnames(str(root / "classnames.txt"))[7] == "seven"
    assert all("{}" in t for t in load_templates(str(root / "templates.txt")))


def test_topk_correct_counts_the_label_at_each_rank():
    """Audit plant: top-k read as top-(k-1). Row r has its label at rank r (0-based) among 8
    classes: top-1 counts row 0, top-5 rows 0..4, and k above the class count is capped."""
    from vlmoe.eval.zeroshot import topk_correct

    logits = torch.arange(8, 0, -1, dtype=torch.float32).repeat(8, 1)  # class c scores 8 - c: rank c
    labels = torch.arange(8)
    assert topk_correct(logits, labels, ks=(1, 5, 8, 20)) == {1: 1, 5: 5, 8: 8, 20: 8}
