"""Tiny datasets in the exact published on-disk formats, for the reader/check tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200)]


def tiny_jpeg(path: Path, k: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 16), COLORS[k % len(COLORS)]).save(path, "JPEG")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pab_train_rows(file_index: int, persons: int = 2, attrs: bool = True) -> list[dict]:
    """Each person: a normal line (goal/) and an anomaly line (full/) pointing at each other."""
    rows = []
    for p in range(persons):
        n_id, a_id = f"{file_index}_{2 * p}", f"{file_index}_{2 * p + 1}"
        n_img, a_img = f"imgs_{file_index}/goal/{p}.jpg", f"imgs_{file_index}/full/{p}.jpg"
        n_cap, a_cap = f"A person walks along the street, file {file_index} person {p}.", \
            f"A person falls to the ground, file {file_index} person {p}."
        src = {"source_id": f"{p}_0", "source_caption": f"someone on a street {p}"}
        normal = {"image": "train/" + n_img, "caption": n_cap, "image_id": n_id, "hard_i": a_img,
                  "hard_c": a_cap, "hard_i_id": a_id, **src}
        anomaly = {"image": "train/" + a_img, "caption": a_cap, "image_id": a_id, "hard_i": n_img,
                   "hard_c": n_cap, "hard_i_id": n_id, **src}
        if attrs:
            normal.update(normal="Walking", scene="street")
            anomaly.update(anomaly="Falling", scene="street")
        rows += [normal, anomaly]
    return rows


def make_pab(root: Path, files: int = 2, persons: int = 2, kind: str = "attr", images: bool = True) -> Path:
    """annotation/train/<kind>_<n>.json, annotation/test/{attr,ucc}.json and the images they name."""
    for f in range(files):
        rows = pab_train_rows(f, persons, attrs=kind == "attr")
        write_jsonl(root / "annotation" / "train" / f"{kind}_{f}.json", rows)
        if images:
            for k, row in enumerate(rows):
                tiny_jpeg(root / row["image"], k)
    test = []
    for i in range(4):
        label = {"normal": "Standing"} if i % 2 == 0 else {"anomaly": "Fighting"}
        test.append({"image": f"test/imgs/{i}.jpg", "caption": [f"test caption {i} a", f"test caption {i} b"],
                     "image_id": f"t_{i}", **label, "scene": "park"})
    write_jsonl(root / "annotation" / "test" / "attr.json", test)
    ucc = [{"image": f"test/ucc/{i}.jpg", "caption": [f"ucc caption {i}"], "image_id": f"u_{i}"} for i in range(3)]
    write_jsonl(root / "annotation" / "test" / "ucc.json", ucc)
    if images:
        for row in test + ucc:
            tiny_jpeg(root / row["image"], 1)
    return root


def make_challenge(root: Path, queries: int = 3, gallery: int = 12, key: bool = True) -> Path:
    """query.json + gallery/<ID>.jpg (+ answer_key.json, the mini-PAB contract)."""
    write_jsonl(root / "query.json",
                [{"query_index": i, "caption": f"challenge query number {i}"} for i in range(queries)])
    for g in range(gallery):
        tiny_jpeg(root / "gallery" / f"{g}.jpg", g)
    if key:
        write_jsonl(root / "answer_key.json",
                    [{"query_index": i, "image_id": str(gallery - 1 - i), "behaviour": ("normal", "anomaly")[i % 2]}
                     for i in range(queries)])
    return root


TBPS_FILES = {"cuhk": ("reid_raw.json", "file_path"), "icfg": ("ICFG-PEDES.json", "file_path"),
              "rstp": ("data_captions.json", "img_path")}


def tbps_entries(fmt: str) -> list[dict]:
    """Two images per person; CUHK ids are 1-based, the others 0-based (as published)."""
    splits = {"cuhk": ["train", "val", "test"], "icfg": ["train", "test"], "rstp": ["train", "val", "test"]}[fmt]
    base = 1 if fmt == "cuhk" else 0
    path_field = TBPS_FILES[fmt][1]
    entries = []
    pid = base
    for split in splits:
        for person in range(2):
            for view in range(2):
                entries.append({"split": split, "id": pid, path_field: f"{split}/{pid}_{view}.jpg",
                                "captions": [f"{split} person {pid} view {view} first.",
                                             f"{split} person {pid} view {view} second."]})
            pid += 1
    if fmt == "cuhk":
        for e in entries:
            e["processed_tokens"] = [c.lower().split() for c in e["captions"]]
    return entries


def make_tbps(root: Path, fmt: str, images: bool = True) -> Path:
    name, path_field = TBPS_FILES[fmt]
    entries = tbps_entries(fmt)
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(entries), encoding="utf-8")
    if images:
        for k, e in enumerate(entries):
            tiny_jpeg(root / "imgs" / e[path_field], k)
    return root
