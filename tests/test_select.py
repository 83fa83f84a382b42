"""Choosing training pairs: groups stay whole, each strategy does what it says (balanced evens labels
out, k-center equals plain greedy, hard takes the worst-ranked), the files round-trip, the PAB
subset folder is a PAB root, data.select never trains on validation identities, the CLI works."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tpas.data.pab import read_pab_train
from tpas.data.records import Behaviour, ImageText
from tpas.data.select import (GroupIndex, apply_selection, budget_pairs, read_ids, select_balanced, select_random,
                              select_training_pairs, selection_stats, write_pab_subset, write_selection)
from tpas.errors import DataError, TpasError
from tpas.search.coreset import (PairEmbeddings, kcenter_greedy, pair_embeddings, select_hard, select_pairs,
                                 true_image_ranks)


@pytest.fixture(scope="module")
def minipab(tmp_path_factory) -> Path:
    """A real mini-PAB set: 40 identities (32 train), tiny images; behaviour, action and scene labels."""
    from tpas.data.synth import generate

    root = tmp_path_factory.mktemp("minipab") / "data"
    generate(root, 40, seed=3, size=(64, 32))
    return root


def person_pairs(scenes: list[str], actions: list[str] | None = None) -> list[ImageText]:
    """Two pairs per person (normal + anomaly, pointing at each other), person k in scenes[k]."""
    pairs = []
    for k, scene in enumerate(scenes):
        for b, behaviour in enumerate((Behaviour.NORMAL, Behaviour.ANOMALY)):
            action = (actions[k] if actions else "walking") if b == 0 else "falling"
            pairs.append(ImageText(image=f"train/{k}_{b}.jpg", caption=f"person {k} {action}", image_id=f"{k}_{b}",
                                   person_id=f"{k}_{b}", behaviour=behaviour, action=action, scene=scene,
                                   hard_image=f"train/{k}_{1 - b}.jpg", hard_image_id=f"{k}_{1 - b}"))
    return pairs


def chosen_people(pairs: list[ImageText], rows) -> list[str]:
    people = [pairs[i].image_id.split("_")[0] for i in rows]
    assert all(n == 2 for n in Counter(people).values()), "a person's two pairs must travel together"
    return sorted(set(people), key=int)


# -- groups, budgets, model-free strategies ------------------------------------------------------
def test_budget_and_groups():
    pairs = person_pairs(["a"] * 10)
    groups = GroupIndex.of(pairs)
    assert len(groups) == 10 and groups.sizes.tolist() == [2] * 10
    assert budget_pairs(0.25, 20) == 5 and budget_pairs(7, 20) == 7 and budget_pairs(50, 20) == 20
    for bad in (0, -1, 2.5):
        with pytest.raises(TpasError):
            budget_pairs(bad, 20)
    assert groups.take(np.array([3, 1, 4]), 3).tolist() == [3, 1]  # 2 pairs < 3: one more person, never half


def test_random_is_seeded_and_keeps_people_whole():
    pairs = person_pairs(["a"] * 50)
    a, b, c = (select_random(pairs, 0.2, seed) for seed in (1, 1, 2))
    assert a.rows.tolist() == b.rows.tolist() and a.rows.tolist() != c.rows.tolist()
    assert a.pairs == 20 and a.groups == 10 and len(chosen_people(pairs, a.rows)) == 10


def test_balanced_evens_out_scenes_and_actions_that_random_does_not():
    # 80 people in "street", 10 each in three rarer scenes; normal actions skewed 60/20/20 in every scene
    scenes = ["street"] * 80 + ["park"] * 10 + ["hall"] * 10 + ["plaza"] * 10
    actions = [(["walking"] * 6 + ["running"] * 2 + ["waving"] * 2)[k % 10] for k in range(110)]
    pairs = person_pairs(scenes, actions)
    balanced = select_balanced(pairs, 40, seed=0)
    chosen_people(pairs, balanced.rows)
    stats = selection_stats([pairs[i] for i in balanced.rows])
    assert balanced.pairs == 40 and stats["scene"] == {"street": 10, "park": 10, "hall": 10, "plaza": 10}
    normal = {k: v for k, v in stats["action"].items() if k.startswith("normal")}
    assert max(normal.values()) - min(normal.values()) <= 2, normal
    random_scenes = selection_stats([pairs[i] for i in select_random(pairs, 40, seed=0).rows])["scene"]
    assert random_scenes.get("street", 0) > 10  # what balanced corrects
    with pytest.raises(TpasError, match="labels"):
        select_balanced([ImageText("i.jpg", "c", "1", "1"), ImageText("j.jpg", "d", "2", "2")], 1)


def test_balanced_on_minipab_labels(minipab):
    pairs = read_pab_train(minipab, progress=False).pairs
    selection = select_balanced(pairs, 0.5, seed=0)
    stats = selection_stats([pairs[i] for i in selection.rows])
    assert stats["behaviour"]["normal"] == stats["behaviour"]["anomaly"] == selection.pairs // 2
    assert stats["scene"].keys() == selection_stats(pairs)["scene"].keys()


def test_balanced_with_independent_labels_is_even():
    """mini-PAB-like: 10 normal x 10 anomalous actions x 5 scenes drawn independently for 600 people."""
    rng = np.random.default_rng(0)
    pairs = []
    for k in range(600):
        normal, anomaly, scene = f"n{rng.integers(10)}", f"a{rng.integers(10)}", f"s{rng.integers(5)}"
        pairs += [ImageText(f"{k}_0.jpg", "c", f"{k}_0", f"{k}_0", Behaviour.NORMAL, normal, scene, hard_image_id=f"{k}_1"),
                  ImageText(f"{k}_1.jpg", "c", f"{k}_1", f"{k}_1", Behaviour.ANOMALY, anomaly, scene, hard_image_id=f"{k}_0")]
    for people in (50, 150):
        stats = selection_stats([pairs[i] for i in select_balanced(pairs, 2 * people, seed=1).rows])
        for kind, values in (("normal:", 10), ("anomaly:", 10)):
            counts = [v for k, v in stats["action"].items() if k.startswith(kind)]
            assert len(counts) == values and max(counts) - min(counts) <= 2, (kind, counts)
        assert len(stats["scene"]) == 5 and max(stats["scene"].values()) - min(stats["scene"].values()) <= 4


# -- diverse: k-center ---------------------------------------------------------------------------
def plain_greedy(points: np.ndarray, groups: GroupIndex, budget: int, first: int) -> list[int]:
    """Textbook farthest-point greedy over groups: the reference for the round-based version."""
    d = np.full(len(points), np.inf)
    chosen, filled, g = [], 0, first
    while True:
        rows = groups.members(g)
        chosen.append(g)
        filled += len(rows)
        d = np.minimum(d, ((points[:, None, :] - points[rows][None]) ** 2).sum(-1).min(1))
        if filled >= budget:
            return chosen
        g = int(groups.group_of[int(np.argmax(d))])


def test_kcenter_equals_plain_greedy_and_covers_better_than_random():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(12, 8)) * 4
    points = (centres[rng.integers(0, 12, 600)] + rng.normal(size=(600, 8))).astype(np.float32)
    groups = GroupIndex(rows=np.arange(600), offsets=np.arange(0, 601, 2), group_of=np.arange(600) // 2)
    chosen, stats = kcenter_greedy(points, groups, 120, seed=5, pool=64, round_limit=16, progress=False)
    reference = plain_greedy(points, groups, 120, first=int(chosen[0]))
    assert chosen.tolist() == reference and stats["rounds"] > 1
    rows = groups.pair_rows(chosen)
    radius = np.sqrt(((points[:, None] - points[rows][None]) ** 2).sum(-1).min(1).max())
    assert abs(radius - stats["radius_end"]) < 1e-3
    random_rows = groups.pair_rows(np.random.default_rng(1).permutation(300)[:60])
    random_radius = np.sqrt(((points[:, None] - points[random_rows][None]) ** 2).sum(-1).min(1).max())
    assert radius < 0.8 * random_radius


# -- hard: worst-ranked --------------------------------------------------------------------------
def one_hot_embeddings(n_people: int, confused: set[int]) -> PairEmbeddings:
    """Pair i's caption matches its own image, except for confused people, whose captions match the
    partner (the other behaviour) better: their true image ranks second."""
    n = 2 * n_people
    image = np.eye(n, dtype=np.float32)
    text = np.eye(n, dtype=np.float32)
    partner = np.arange(n) ^ 1
    for k in confused:
        for i in (2 * k, 2 * k + 1):
            text[i] = 0.6 * image[i] + 0.8 * image[partner[i]]
    return PairEmbeddings(image=image, image_row=np.arange(n), text=text, partner_row=partner)


def test_true_image_ranks_count_the_partner_once():
    emb = one_hot_embeddings(6, confused={2})
    ranks = true_image_ranks(emb, gallery=12, seed=0)  # the gallery sample holds every image
    assert ranks.tolist() == [1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1]


def test_hard_takes_worst_ranked_people_and_mix_adds_diverse():
    pairs = person_pairs(["a"] * 10)
    emb = one_hot_embeddings(10, confused={3, 7})
    hard = select_pairs(pairs, "hard", 4, embeddings=emb, gallery=8, progress=False)
    assert chosen_people(pairs, hard.rows) == ["3", "7"]
    mixed = select_hard(emb, GroupIndex.of(pairs), 8, gallery=8, mix=0.5, dims=0, progress=False)
    people = chosen_people(pairs, mixed.rows)
    assert len(people) == 4 and {"3", "7"} <= set(people)
    with pytest.raises(TpasError, match="embeddings"):
        select_pairs(pairs, "diverse", 4)


# -- files ---------------------------------------------------------------------------------------
def test_id_list_round_trip_and_errors(tmp_path):
    pairs = person_pairs(["a"] * 8)
    selection = select_random(pairs, 4, seed=0)
    out = write_selection(tmp_path / "sel", pairs, selection, {"note": 1})
    summary = json.loads((out / "selection.json").read_text())
    assert summary["pairs"] == 4 and summary["note"] == 1 and summary["labels"]["behaviour"] == {"normal": 2,
                                                                                                 "anomaly": 2}
    ids = read_ids(out)
    assert ids == [pairs[i].image_id for i in selection.rows]
    assert [p.image_id for p in apply_selection(pairs, ids, out)] == ids
    assert len(apply_selection(pairs, ids[:1], "hand-made")) == 2  # the partner comes along
    (tmp_path / "dup.txt").write_text("0_0\n\n0_0\n")
    with pytest.raises(DataError, match=r"dup.txt:3: .*listed twice \(first on line 1\)"):
        read_ids(tmp_path / "dup.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="no image ids"):
        read_ids(tmp_path / "empty.txt")
    with pytest.raises(TpasError, match="none of its 1 image ids"):
        apply_selection(pairs, ["nope"], "other.txt")


def test_select_specs_at_load_time(tmp_path):
    pairs = person_pairs(["a", "b"] * 10)
    assert len(select_training_pairs(pairs, "random:0.5", seed=0)) == 20
    assert len(select_training_pairs(pairs, "balanced:8", seed=0)) == 8
    for bad, message in (("diverse:0.1", "tpas select"), ("best:0.1", "strategies"), ("nothing.txt", "not found")):
        with pytest.raises(TpasError, match=message):
            select_training_pairs(pairs, bad, seed=0)


def test_pab_subset_folder_is_a_pab_root(minipab, tmp_path):
    pairs = read_pab_train(minipab, progress=False).pairs
    selection = select_random(pairs, 0.25, seed=0)
    ids = [pairs[i].image_id for i in selection.rows]
    assert write_pab_subset(minipab, tmp_path / "subset", ids) == len(ids)
    subset = read_pab_train(tmp_path / "subset", progress=False).pairs
    assert [p for p in subset] == [pairs[i] for i in selection.rows]  # same records: captions, hard pairs, labels
    assert (tmp_path / "subset" / subset[0].image).is_file() and (tmp_path / "subset" / subset[0].hard_image).is_file()
    with pytest.raises(TpasError, match="must not be the dataset root"):
        write_pab_subset(minipab, minipab, ids)
    other = tmp_path / "other-dataset"
    (other / "annotation" / "train").mkdir(parents=True)
    (other / "annotation" / "train" / "pair_0.json").write_text("{}\n")
    with pytest.raises(TpasError, match="holds a dataset"):  # never wipes someone's annotation files
        write_pab_subset(minipab, other, ids)
    assert (other / "annotation" / "train" / "pair_0.json").read_text() == "{}\n"


# -- model embeddings ------------------------------------------------------------------------------
def test_pair_embeddings_cache_resumes(minipab, tmp_path, monkeypatch):
    import torch

    from tpas.models import create_model
    from tpas.search import coreset

    torch.manual_seed(0)
    model = create_model("lite-tiny", device="cpu")
    pairs = read_pab_train(minipab, progress=False).pairs
    emb = pair_embeddings(model, pairs, minipab, tmp_path / "cache", text_chunk=16, progress=False)
    assert emb.image.shape == (len(pairs), 32) and emb.text.shape == (len(pairs), 32)
    assert (emb.partner_row[emb.partner_row[:4]] == np.arange(4)).all()  # partners point at each other
    progress = tmp_path / "cache" / "texts" / "progress.json"
    state = json.loads(progress.read_text())
    progress.write_text(json.dumps({**state, "done": state["done"][:-1]}))  # as if killed in the last chunk
    calls = []
    real = coreset.encode_texts
    monkeypatch.setattr(coreset, "encode_texts", lambda m, texts, **kw: calls.append(len(texts)) or real(m, texts, **kw))
    again = pair_embeddings(model, pairs, minipab, tmp_path / "cache", text_chunk=16, progress=False)
    assert calls == [len(pairs) - 16 * (len(state["done"]) - 1)]
    np.testing.assert_allclose(again.text, emb.text, atol=1e-6)
    np.testing.assert_array_equal(again.image, emb.image)


# -- the trainer and the command line ----------------------------------------------------------------
def test_data_select_never_trains_on_validation_identities(minipab, tmp_path):
    from tpas.config import load_config
    from tpas.data.loader import identity_group, split_by_identity
    from tpas.train.loop import Trainer

    pairs = read_pab_train(minipab, progress=False).pairs
    everything = write_selection(tmp_path / "all", pairs, select_random(pairs, 1.0, seed=0))  # includes val people
    config = load_config(Path(__file__).parents[1] / "src/tpas/configs/minipab-lite.yaml", [
        f"data.root={minipab}", "model.name=lite-tiny", "model.train_text_layers=null",
        "model.train_image_blocks=null", "data.val_identities=4", "train.batch_size=4", "data.workers=0",
        f"data.select={everything}", f"train.out={tmp_path / 'run'}"])
    trainer = Trainer(config)
    _, val = split_by_identity(pairs, 4, config.train.seed)
    val_people = {identity_group(p) for p in val}
    trained = {identity_group(p) for p in trainer.dataset.pairs}
    assert len(val_people) == 4 and not trained & val_people and len(trainer.dataset) == len(pairs) - len(val)
    config.data.select = "balanced:0.5"
    assert len(Trainer(config).dataset) == round(0.5 * (len(pairs) - len(val)))


def test_cli_select_writes_a_trainable_selection(minipab, tmp_path, capsys):
    from tpas.cli import main

    out = tmp_path / "sel"
    assert main(["select", str(minipab), "--out", str(out), "--strategy", "diverse", "--size", "0.5",
                 "--model", "lite-tiny", "--val-identities", "4", "--workers", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "selection.json").read_text())
    assert f"selected {summary['pairs']} of 56 pairs" in printed and summary["validation"]["held_out_pairs"] == 8
    assert summary["settings"]["rounds"] >= 1 and len(read_ids(out)) == summary["pairs"]
    assert len(read_pab_train(out, progress=False).pairs) == summary["pairs"]
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage + one error line
        main(["select", str(minipab), "--out", str(out), "--strategy", "random", "--size", "1.5"])
    assert exit_info.value.code == 2 and "whole number of pairs" in capsys.readouterr().err
    assert main(["select", str(tmp_path / "missing"), "--out", str(out), "--strategy", "random", "--size", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tpas select: error: ") and "missing/annotation/train" in err[0]


def test_selections_of_one_pool_share_one_feature_cache(minipab, tmp_path):
    """cache_pool=True (benchmarks/select_ablation.py): the frozen features of every pair a selection
    may take are cached once; a run on another selection of the same pool loads that file."""
    from tpas.config import load_config
    from tpas.data.loader import split_by_identity
    from tpas.train.loop import Trainer

    config = load_config("minipab-lite", [
        f"data.root={minipab}", "model.name=lite-tiny", "data.val_identities=4", "train.batch_size=4",
        "data.workers=0", "data.augment=false", "data.select=random:0.5", f"train.out={tmp_path / 'run'}"])
    pool = {p.image for p in split_by_identity(read_pab_train(minipab, progress=False).pairs, 4, 42)[0]}
    first = Trainer(config, cache_dir=tmp_path / "pool", cache_pool=True)
    files = sorted((tmp_path / "pool").glob("feature-cache-*.pt"))
    assert len(files) == 2 and set(first.dataset.cache.images) == pool
    assert len({p.image for p in first.dataset.pairs}) == len(pool) // 2  # trains on its selection only
    config.data.select = "balanced:0.5"
    second = Trainer(config, cache_dir=tmp_path / "pool", cache_pool=True)
    assert sorted((tmp_path / "pool").glob("feature-cache-*.pt")) == files  # loaded, not recomputed
    assert {p.image for p in second.dataset.pairs} != {p.image for p in first.dataset.pairs}
    own = Trainer(config, cache_dir=tmp_path / "own")  # the default: a cache of the selection alone
    assert set(own.dataset.cache.images) == {p.image for p in own.dataset.pairs}
