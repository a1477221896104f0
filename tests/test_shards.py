"""Writing and reading shards and image folders: make_shards, ShardWriter, labels, image modes."""
from __future__ import annotations

import importlib.util
import io
import tarfile
import numpy as np
import pytest
from PIL import Image
from vlmoe.cli import cli_main, folder_labels, zeroshot_main
from vlmoe.data import ShardWriter
from vlmoe.data.pipeline import _decode_image
from vlmoe.errors import DataError
from helpers import CONFIGS, QUIET, ROOT, data_args  # noqa: F401
from helpers import png


# -- moved from test_first_contact (issues #11, #16) -------------------------------------------------


def test_labels_outside_the_class_range_are_refused(shards, tmp_path):
    """Defect 9: cls -1 was scored as a miss in fit/validate and crashed vlmoe-zeroshot."""
    neg = tmp_path / "neg-000000.tar"
    with ShardWriter(str(tmp_path / "neg-%06d.tar")) as w:
        for i in range(8):
            w.write(f"{i:06d}", png(), label=-1 if i == 5 else i % 4)
    with pytest.raises(DataError, match=r"label -1 in the data is outside \[0, 4\)"):
        zeroshot_main(["--model", "clip-tiny", "--data", str(neg), "--classnames", shards["classnames"],
                       "--templates", shards["templates"], "--num-workers", "0"])
    with pytest.raises(DataError, match=r"label -1 in the data is outside \[0, 4\)"):
        cli_main(["validate", "--config", str(CONFIGS / "clip_tiny.yaml"), *data_args(shards, train_shards="null", zeroshot_shards=neg),
                  "--data.val_batch_size=8", f"--trainer.default_root_dir={tmp_path}", *QUIET])


def test_imagefolder_folders_are_matched_to_class_names_by_name(tmp_path):
    """Defect 9: folders sorted differently from the class-names file were scored against the wrong names."""
    assert folder_labels(["blue_thing", "red_thing"], ["red thing", "blue thing"]) == [1, 0]
    assert folder_labels(["Red", "blue"], ["blue", "red"]) == [1, 0]
    assert folder_labels(["0", "1", "2"], ["c", "b", "a"]) == [0, 1, 2]
    assert folder_labels(["cat"], ["dog", "cat"]) == [1]  # a subset of the classes
    with pytest.raises(DataError, match="do not match the 2 class names"):
        folder_labels(["a", "b"], ["alpha", "beta"])
    root = tmp_path / "f"
    for name, color in (("blue_thing", (0, 0, 250)), ("red_thing", (250, 0, 0))):
        (root / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), color).save(root / name / "x.png")
    from vlmoe.cli import _zeroshot_loader

    batch = next(iter(_zeroshot_loader(str(root), (32, 32), 4, 0, ["red thing", "blue thing"])))
    assert batch["label"].tolist() == [1, 0]  # blue_thing first in the folder order, label of "blue thing"
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="not a usable ImageFolder"):
        _zeroshot_loader(str(tmp_path / "empty"), (32, 32), 4, 0, ["a"])


def test_sixteen_bit_images_keep_their_brightness():
    """Defect 9: a 16-bit grayscale PNG (mode I;16) decoded almost white."""
    a = np.full((16, 16), 32768, dtype=np.uint16)
    a[:, :8] = 6553  # 10%
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    img, why = _decode_image({"png": buf.getvalue()})
    assert why is None and img.mode == "RGB"
    rgb = np.asarray(img)
    assert abs(int(rgb[0, 12, 0]) - 128) <= 1 and abs(int(rgb[0, 2, 0]) - 26) <= 1
    img, _ = _decode_image({"png": png((30, 60, 90))})
    assert np.asarray(img)[0, 0].tolist() == [30, 60, 90]  # 8-bit images untouched


def _make_shards():
    spec = importlib.util.spec_from_file_location("make_shards", ROOT / "scripts" / "make_shards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _keys(pattern_glob):
    out = []
    for p in sorted(pattern_glob):
        with tarfile.open(p) as t:
            out += [m.name for m in t.getmembers()]
    return out


def test_make_shards_refuses_to_mix_old_and_new_shards(tmp_path):
    """Defect 9: a rerun with fewer samples left the old extra shards in place."""
    main = _make_shards()
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        (imgs / f"{i}.png").write_bytes(png((i * 60, 0, 0)))
    (tmp_path / "three.csv").write_text("image,caption\n0.png,a\n1.png,b\n2.png,c\n")
    (tmp_path / "one.csv").write_text("image,caption\n0.png,a\n")
    out = tmp_path / "out"
    main(["captions", "--images", str(imgs), "--captions", str(tmp_path / "three.csv"), "--out", str(out / "s-%06d.tar"), "--max-count", "1"])
    assert len(list(out.glob("s-*.tar"))) == 3
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="is not empty"):
        main(["captions", "--images", str(imgs), "--captions", str(tmp_path / "one.csv"), "--out", str(out / "s-%06d.tar")])
    main(["captions", "--images", str(imgs), "--captions", str(tmp_path / "one.csv"), "--out", str(out / "s-%06d.tar"), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "s-000000.tar"]


def test_make_shards_validates_every_row_and_never_leaves_a_partial_shard(tmp_path, capsys):
    """Defect 13."""
    main = _make_shards()
    imgs = tmp_path / "imgs"
    (imgs / "sub").mkdir(parents=True)
    (imgs / "a.png").write_bytes(png())
    (imgs / "sub" / "b.jpg").write_bytes(png())  # a PNG named .jpg: stored by its real format
    (imgs / "fake.jpg").write_bytes(b"not an image")
    (tmp_path / "secret.png").write_bytes(png())
    out = lambda n: str(tmp_path / n / "s-%06d.tar")  # noqa: E731
    run = lambda *a: main(["captions", "--images", str(imgs), *a])  # noqa: E731

    (tmp_path / "header.csv").write_text("image,caption\n")
    with pytest.raises(DataError, match="lists no images"):
        run("--captions", str(tmp_path / "header.csv"), "--out", out("h"))
    (tmp_path / "latin.csv").write_bytes("image,caption\na.png,café crème\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv:2: not utf-8 \(byte 0xe9\); pass the file's encoding"):
        run("--captions", str(tmp_path / "latin.csv"), "--out", out("l"))
    assert run("--captions", str(tmp_path / "latin.csv"), "--out", out("l2"), "--encoding", "latin-1") == 1
    (tmp_path / "bom.csv").write_bytes("\ufeffimage,caption\na.png,hello\n".encode("utf-8"))
    assert run("--captions", str(tmp_path / "bom.csv"), "--out", out("b")) == 1

    rows = ["image,caption", "a.png,fine", "sub/b.jpg,also fine", "a.png,", f"{tmp_path / 'secret.png'},absolute",
            "../secret.png,escapes", "fake.jpg,not an image", "missing.png,gone"]
    (tmp_path / "mixed.csv").write_text("\n".join(rows) + "\n")
    capsys.readouterr()
    assert run("--captions", str(tmp_path / "mixed.csv"), "--out", out("m")) == 2
    err = capsys.readouterr().err
    for line, why in ((4, "no caption"), (5, "is outside --images"), (6, "is outside --images"), (7, "fake.jpg is not a readable image"),
                      (8, "missing.png not found")):
        assert f"mixed.csv:{line}: skipped: " in err and why in err, (line, why, err)
    assert _keys((tmp_path / "m").glob("*.tar")) == ["000000000.png", "000000000.txt", "000000000.json",
                                                     "000000001.png", "000000001.txt", "000000001.json"]

    lines = ['{"image": "a.png", "caption": "ok"}', '{"image": "a.png", "caption": 7}', '{"image": "a.png"', '{"image": "a.png"}']
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    assert run("--captions", str(tmp_path / "c.jsonl"), "--out", out("j")) == 1
    err = capsys.readouterr().err
    assert "c.jsonl:2: skipped: the caption 7 is not text" in err and "c.jsonl:3: skipped: not a JSON line" in err
    assert "c.jsonl:4: skipped: no caption" in err
    assert not list(tmp_path.rglob("*.partial"))

    classes = tmp_path / "classes"
    (classes / "cat").mkdir(parents=True)
    (classes / "dog").mkdir()
    (classes / "cat" / "1.png").write_bytes(png())
    assert main(["classes", "--images", str(classes), "--out", out("k")]) == 1  # an empty class folder keeps its label
    assert (tmp_path / "k" / "classnames.txt").read_text() == "cat\ndog\n"
    assert "dog: no images" in capsys.readouterr().err


def test_shard_writer_drops_a_partial_shard_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path / "s-%06d.tar"), max_count=2) as w:
            for i in range(3):
                w.write(f"{i}", png(), caption="x")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-000000.tar"]  # the complete shard stays
