"""Write a mini-PAB dataset in PAB's exact on-disk format (see docs/minipab.md).

Determinism: every random draw comes from a numpy SeedSequence keyed by (seed, split, identity,
which), so an image does not depend on which worker drew it or in what order; workers return
records and the parent writes all JSON in identity order. The same seed gives byte-identical files
whatever ``workers`` is.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tpas.errors import TpasError
from tpas.utils.io import atomic_open, write_json

from .appearance import FACTORS, Appearance, sample_appearance
from .captions import make_caption, source_caption
from .pose import ANOMALY_ACTIONS, NORMAL_ACTIONS
from .render import STYLES, render_shot
from .scenes import OOD_SCENES, SCENES

log = logging.getLogger(__name__)

VERSION = "minipab-1"
SPLIT_CODES = {"train": 0, "test": 1, "ood": 2, "challenge": 3, "distractor": 4, "track4": 5}
PAIRS_PER_FILE = 200  # identities per pair_k.json (PAB spreads ~1M pairs over 75 files)
MAX_FILES = 75
CHUNK = 16  # identities a worker renders per task
MANIFEST = "minipab.json"
PARTIAL = ".minipab-partial"  # present while a run is under way; lets a re-run clean up after a crash
# actions that would look out of place in a scene (nobody rides a bicycle in a lobby)
UNLIKELY = {"indoor hall": ("riding a bicycle", "climbing a fence", "kicking a ball"),
            "beach": ("riding a bicycle", "climbing a fence", "slipping")}
OWNED = ("annotation", "train", "test", "ucc", "challenge", "track4", "preview.png", MANIFEST, PARTIAL)
NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"  # Track 4 names: 15 of these, like the real set's
NAME_LENGTH = 15


@dataclass
class SynthSummary:
    """What ``generate`` wrote, and how fast."""

    root: Path
    seed: int
    size: tuple[int, int]
    train_identities: int
    test_identities: int
    ood_identities: int
    images: int
    queries: int
    seconds: float
    preview: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    distractor_identities: int = 0  # people only in the Track 4 gallery (track4/)

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


@dataclass(frozen=True)
class _Job:
    """One identity to render: where its two images go (relative to the root)."""

    seed: int
    split: str
    identity: int
    paths: tuple[str, str]  # normal, anomaly
    size: tuple[int, int]
    root: str
    captions: tuple[int, int] = (1, 1)  # how many captions per image may be drawn (test: 1 or 2)


def _rng(seed: int, split: str, identity: int, which: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_CODES[split], identity, which]))


def _save_jpeg(img, path: Path, quality: int) -> None:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)  # never leave a half-written image under the final name


def identity_plan(seed: int, split: str, identity: int) -> tuple[Appearance, str, str, str, int]:
    """An identity's looks, its scene, its normal and anomalous action, and its background seed."""
    rng = _rng(seed, split, identity, 0)
    look = sample_appearance(rng)
    scenes = OOD_SCENES if split == "ood" else SCENES
    scene = scenes[int(rng.integers(len(scenes)))]
    normals = [a for a in NORMAL_ACTIONS if a not in UNLIKELY.get(scene, ())]
    anomalies = [a for a in ANOMALY_ACTIONS if a not in UNLIKELY.get(scene, ())]
    normal = normals[int(rng.integers(len(normals)))]
    anomaly = anomalies[int(rng.integers(len(anomalies)))]
    return look, scene, normal, anomaly, int(rng.integers(2**31))


def _render_identity(job: _Job) -> list[dict]:
    """Render and save both images of one identity; return their metadata (normal first)."""
    look, scene, normal, anomaly, bg_seed = identity_plan(job.seed, job.split, job.identity)
    style = STYLES["train" if job.split == "train" else job.split if job.split == "ood" else "test"]
    out = []
    for which, (behaviour, action, rel) in enumerate((("normal", normal, job.paths[0]),
                                                       ("anomaly", anomaly, job.paths[1])), start=1):
        rng = _rng(job.seed, job.split, job.identity, which)
        img, quality, meta = render_shot(look, action, scene, job.size, style, bg_seed, rng)
        _save_jpeg(img, Path(job.root) / rel, quality)
        n_caps = int(rng.integers(job.captions[0], job.captions[1] + 1))
        out.append({
            "image": rel, "behaviour": behaviour, "action": action, "scene": scene,
            "captions": [make_caption(look, action, scene, rng) for _ in range(n_caps)],
            "source_caption": source_caption(action, scene, rng),
            "appearance": look.as_dict(), **meta,
        })
    return out


def _render_chunk(jobs: list[_Job]) -> list[list[dict]]:
    return [_render_identity(job) for job in jobs]


def _run(jobs: list[_Job], workers: int, desc: str) -> list[list[dict]]:
    """Render jobs in order, in a process pool when ``workers`` > 1 (results keep job order)."""
    from tqdm import tqdm

    chunks = [jobs[i:i + CHUNK] for i in range(0, len(jobs), CHUNK)]
    results: list[list[dict]] = []
    with tqdm(total=len(jobs), desc=desc, unit="id", disable=len(jobs) < 50, leave=False) as bar:
        if workers <= 1:
            for c in chunks:
                results.extend(_render_chunk(c))
                bar.update(len(c))
        else:
            import multiprocessing as mp

            with mp.get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
                for part in pool.imap(_render_chunk, chunks):
                    results.extend(part)
                    bar.update(len(part))
    return results


def _jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _attrs(item: dict) -> dict:
    return {item["behaviour"]: item["action"], "scene": item["scene"]}


def _prepare(out: Path) -> None:
    """Refuse to mix with foreign files; clear what an earlier mini-PAB run left behind."""
    if out.exists() and not out.is_dir():
        raise TpasError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not ((out / MANIFEST).is_file() or (out / PARTIAL).is_file()):
            raise TpasError(f"{out}: folder is not empty and holds no {MANIFEST}; choose a new or empty folder")
        for name in OWNED:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTIAL).write_text("mini-PAB generation in progress\n")


def _split_counts(identities: int, test_fraction: float) -> tuple[int, int]:
    if identities < 2:
        raise TpasError(f"--identities must be at least 2 (one train, one test), got {identities}")
    if not 0.0 < test_fraction < 1.0:
        raise TpasError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = min(identities - 1, max(1, round(identities * test_fraction)))
    return identities - n_test, n_test


def _write_train(out: Path, seed: int, n: int, size, workers: int) -> int:
    n_files = min(MAX_FILES, max(1, math.ceil(n / PAIRS_PER_FILE)))
    per_file = math.ceil(n / n_files)
    jobs = []
    for ident in range(n):
        k, local = divmod(ident, per_file)
        jobs.append(_Job(seed, "train", ident, (f"train/imgs_{k}/goal/{local}.jpg", f"train/imgs_{k}/full/{local}.jpg"),
                         size, str(out)))
    results = _run(jobs, workers, "mini-PAB train")
    files: dict[int, list[dict]] = {}
    attrs = []
    for ident, (job, pair) in enumerate(zip(jobs, results)):
        k = ident // per_file
        rows = files.setdefault(k, [])
        ids = [f"{k}_{len(rows)}", f"{k}_{len(rows) + 1}"]
        for w, item in enumerate(pair):  # goal (normal) line, then full (anomalous) line
            other = pair[1 - w]
            rows.append({
                "image": item["image"], "caption": item["captions"][0], "image_id": ids[w],
                "hard_i": other["image"].removeprefix("train/"), "hard_c": other["captions"][0],
                "hard_i_id": ids[1 - w], "source_id": f"{ident}_{0 if w == 0 else 2}",
                "source_caption": item["source_caption"], **_attrs(item),
            })
            attrs.append(_sidecar(item, ids[w], "train", ident))
    for k, rows in files.items():
        _jsonl(out / "annotation" / "train" / f"pair_{k}.json", rows)
    _jsonl(out / "annotation" / "synth_train.json", attrs)
    return n_files


def _sidecar(item: dict, image_id: str, split: str, ident: int) -> dict:
    """Generator truth beyond PAB's fields (appearance, pose facts) for analysis and tests."""
    keep = ("image", "behaviour", "action", "scene", "appearance", "mirrored", "occluded", "scale")
    return {"image_id": image_id, "split": split, "identity": ident, **{k: item[k] for k in keep}}


def _write_eval(out: Path, seed: int, split: str, n: int, size, workers: int, max_captions: int) -> list[dict]:
    folder = "test" if split == "test" else "ucc"
    jobs = [_Job(seed, split, i, (f"{folder}/{2 * i}.jpg", f"{folder}/{2 * i + 1}.jpg"), size, str(out),
                 (1, max_captions))
            for i in range(n)]
    results = _run(jobs, workers, f"mini-PAB {folder}")
    rows, side = [], []
    for i, pair in enumerate(results):
        for w, item in enumerate(pair):
            image_id = str(2 * i + w)
            rows.append({"image": item["image"], "caption": item["captions"], "image_id": image_id, **_attrs(item)})
            side.append(_sidecar(item, image_id, split, i))
    _jsonl(out / "annotation" / "test" / ("attr.json" if split == "test" else "ucc.json"), rows)
    _jsonl(out / "annotation" / f"synth_{folder}.json", side)
    return rows


def _write_challenge(out: Path, seed: int, rows: list[dict]) -> int:
    """Masked copy of the test split: shuffled queries, gallery files renamed to random hex IDs."""
    rng = _rng(seed, "challenge", 0, 0)
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < len(rows):
        gid = f"{int(rng.integers(16**8)):08x}"
        if gid not in seen:
            seen.add(gid)
            ids.append(gid)
    gallery = out / "challenge" / "gallery"
    gallery.mkdir(parents=True, exist_ok=True)
    queries = []
    for gid, row in zip(ids, rows):
        shutil.copyfile(out / row["image"], gallery / f"{gid}.jpg")
        behaviour = "normal" if "normal" in row else "anomaly"
        queries.extend((caption, gid, behaviour) for caption in row["caption"])
    order = rng.permutation(len(queries))
    _jsonl(out / "challenge" / "query.json",
           [{"query_index": q, "caption": queries[i][0]} for q, i in enumerate(order)])
    _jsonl(out / "challenge" / "answer_key.json",
           [{"query_index": q, "image_id": queries[i][1], "behaviour": queries[i][2]} for q, i in enumerate(order)])
    return len(queries)


def _random_names(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    """``n`` new random 15-character names (uppercase letters and digits), none in ``taken``."""
    names: list[str] = []
    while len(names) < n:
        name = "".join(NAME_CHARS[i] for i in rng.integers(len(NAME_CHARS), size=NAME_LENGTH))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _write_track4(out: Path, seed: int, rows: list[dict], distractors: int, size, workers: int) -> int:
    """An AICity'26 Track 4-style masked set of the test split plus ``distractors`` people in no query.

    Every test caption becomes a query under a random name (``query_index.txt``, shuffled, and
    ``query_text.json``); the gallery holds the test images and both images of each distractor
    identity (new people, test style, their own seeds, so the test split is untouched), all under
    random names; ``answer_key.json`` maps each query name to its image.
    """
    folder = out / "track4"
    gallery = folder / "gallery"
    gallery.mkdir(parents=True, exist_ok=True)
    rng = _rng(seed, "track4", 0, 0)
    taken: set[str] = set()
    image_names = _random_names(rng, len(rows) + 2 * distractors, taken)
    queries = []
    for name, row in zip(image_names, rows):
        shutil.copyfile(out / row["image"], gallery / f"{name}.jpg")
        behaviour = "normal" if "normal" in row else "anomaly"
        queries.extend((caption, name, behaviour) for caption in row["caption"])
    extra = image_names[len(rows):]
    jobs = [_Job(seed, "distractor", i, (f"track4/gallery/{extra[2 * i]}.jpg",
                                         f"track4/gallery/{extra[2 * i + 1]}.jpg"), size, str(out))
            for i in range(distractors)]
    _run(jobs, workers, "mini-PAB distractors")
    query_names = _random_names(rng, len(queries), taken)
    order = rng.permutation(len(queries))
    with atomic_open(folder / "query_index.txt") as fh:
        fh.write("".join(name + "\n" for name in query_names))
    write_json(folder / "query_text.json", {query_names[q]: queries[i][0] for q, i in enumerate(order)})
    _jsonl(folder / "answer_key.json", [{"query_id": query_names[q], "image_id": queries[i][1],
                                         "behaviour": queries[i][2]} for q, i in enumerate(order)])
    return len(queries)


def generate(out: str | os.PathLike, identities: int, seed: int = 0, size: tuple[int, int] = (256, 128),
             workers: int = 1, ood: bool = False, preview: bool = False, test_fraction: float = 0.2,
             test_captions: int = 1, distractors: int = 0) -> SynthSummary:
    """Write a mini-PAB dataset with ``identities`` people (train + disjoint test) under ``out``.

    ``size`` is (height, width). ``ood`` adds a UCC-like split (other scenes, far camera) with as
    many identities as the test split. ``preview`` writes ``preview.png``, a contact sheet.
    ``test_captions``: each test/UCC image gets 1 to this many captions (1 = one query per gallery
    image, as PAB's test pairs; the setting SCA and its relatives assume). ``distractors`` > 0 also
    writes ``track4/``, an AICity'26 Track 4-style masked copy of the test split whose gallery adds
    both images of that many new people who are in no query (every other file is the same either way).
    """
    if test_captions < 1:
        raise TpasError(f"test_captions must be >= 1, got {test_captions}")
    if distractors < 0:
        raise TpasError(f"distractors must be >= 0, got {distractors}")
    out = Path(out)
    size = (int(size[0]), int(size[1]))
    if size[0] < 32 or size[1] < 16:
        raise TpasError(f"image size {size[0]}x{size[1]} is too small (at least 32x16)")
    n_train, n_test = _split_counts(identities, test_fraction)
    workers = max(1, int(workers))
    _prepare(out)
    start = time.perf_counter()
    n_files = _write_train(out, seed, n_train, size, workers)
    test_rows = _write_eval(out, seed, "test", n_test, size, workers, test_captions)
    n_ood = n_test if ood else 0
    if ood:
        _write_eval(out, seed, "ood", n_ood, size, workers, test_captions)
    n_queries = _write_challenge(out, seed, test_rows)
    if distractors:
        _write_track4(out, seed, test_rows, distractors, size, workers)
    seconds = time.perf_counter() - start
    images = 2 * (n_train + n_test + n_ood + distractors)
    files = {"train": f"annotation/train/pair_{{0..{n_files - 1}}}.json", "test": "annotation/test/attr.json",
             "challenge": "challenge/query.json", "answer_key": "challenge/answer_key.json"}
    if ood:
        files["ucc"] = "annotation/test/ucc.json"
    if distractors:
        files["track4"] = "track4/query_index.txt"
        files["track4_key"] = "track4/answer_key.json"
    summary = SynthSummary(out, seed, size, n_train, n_test, n_ood, images, n_queries, seconds, files=files,
                           distractor_identities=distractors)
    if preview:
        from .preview import contact_sheet

        summary.preview = contact_sheet(out, out / "preview.png")
    write_json(out / MANIFEST, {
        "generator": VERSION, "seed": seed, "size": list(size),
        "identities": {"train": n_train, "test": n_test, "ucc": n_ood,
                       **({"distractor": distractors} if distractors else {})},
        "images": images, "test_queries": n_queries, "test_captions_per_image": [1, test_captions], "files": files,
        "actions": {"normal": list(NORMAL_ACTIONS), "anomaly": list(ANOMALY_ACTIONS)},
        "scenes": list(SCENES), "ood_scenes": list(OOD_SCENES) if ood else [],
        "appearance_factors": {k: list(v) for k, v in FACTORS.items()},
        "layout": {"goal": "normal image of an identity", "full": "anomalous image of the same identity",
                   "source_id": "<identity>_<0 normal | 2 anomalous>"},
    })
    (out / PARTIAL).unlink()
    log.info("wrote %d images (%d train, %d test, %d ucc identities) to %s in %.1fs (%.0f images/s)",
             images, n_train, n_test, n_ood, out, seconds, summary.images_per_second)
    return summary
