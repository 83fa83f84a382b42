"""ITC / ITM / MLM / EDA against hand computations on tiny tensors; the negative sampler's id rule."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from tpas.data.text_augment import eda
from tpas.train.losses import itc_loss, itm_loss, mask_tokens, sample_negatives, soft_targets
from tpas.train.optim import lr_multiplier, no_weight_decay, param_groups, schedule_fn


def _xent(row_logits, target_row):
    """-sum_j t_j log softmax(row)_j, written out with math for the hand computation."""
    z = max(row_logits)
    lse = z + math.log(sum(math.exp(v - z) for v in row_logits))
    return -sum(t * (v - lse) for v, t in zip(row_logits, target_row))


def test_itc_matches_hand_computation_with_same_id_positives():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    txt = F.normalize(torch.tensor([[0.8, 0.6], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    ids = torch.tensor([7, 7, 9])  # pairs 0 and 1 are the same person
    temp = torch.tensor(0.5)
    loss = itc_loss(img, txt, temp, ids)

    sim = (img @ txt.t() / 0.5).tolist()
    simt = [list(col) for col in zip(*sim)]
    targets = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    i2t = sum(_xent(sim[i], targets[i]) for i in range(3)) / 3
    t2i = sum(_xent(simt[i], targets[i]) for i in range(3)) / 3
    assert loss.item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_itc_without_ids_is_clip_loss_and_smoothing_moves_mass():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(4, 8), dim=1)
    temp = torch.tensor(0.07)
    logits = img @ txt.t() / 0.07
    clip = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))) / 2
    assert itc_loss(img, txt, temp).item() == pytest.approx(clip.item(), rel=1e-6)
    smoothed = (F.cross_entropy(logits, torch.arange(4), label_smoothing=0.1)
                + F.cross_entropy(logits.t(), torch.arange(4), label_smoothing=0.1)) / 2
    assert itc_loss(img, txt, temp, label_smoothing=0.1).item() == pytest.approx(smoothed.item(), rel=1e-6)
    t = soft_targets(torch.tensor([1, 1, 2]), torch.tensor([1, 1, 2]), 0.3)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert t[0, 2].item() == pytest.approx(0.1)


def test_itc_temperature_gets_gradient():
    img = F.normalize(torch.randn(3, 4), dim=1)
    txt = F.normalize(torch.randn(3, 4), dim=1)
    temp = torch.tensor(0.1, requires_grad=True)
    itc_loss(img, txt, temp).backward()
    assert temp.grad is not None and temp.grad.abs().item() > 0


def test_sampler_never_draws_same_id_over_many_trials():
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        b = int(torch.randint(2, 12, (1,), generator=g))
        ids = torch.randint(0, max(1, b // 2), (b,), generator=g)
        sim = torch.randn(b, b, generator=g) * 5
        picks = sample_negatives(sim, ids, 0.07, generator=g)
        for row, col in enumerate(picks.tolist()):
            others = (ids != ids[row]).any().item()
            if col < 0:
                assert not others, f"trial {trial}: row {row} had a valid negative but got none"
            else:
                assert ids[col] != ids[row], f"trial {trial}: same-id negative drawn"


def test_sampler_all_same_id_returns_minus_one_and_follows_softmax():
    assert sample_negatives(torch.randn(4, 4), torch.zeros(4, dtype=torch.long)).tolist() == [-1] * 4
    # row 0: columns 1 and 2 valid; sim 2 vs 0 at temperature 1 -> P(col 1) = e^2 / (e^2 + 1) ~ 0.88.
    # 1000 independent copies in one call: a block-diagonal matrix, -inf (weight 0) across blocks.
    block = torch.tensor([[9.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    n = 1000
    sim = torch.full((3 * n, 3 * n), float("-inf"))
    for k in range(n):
        sim[3 * k:3 * k + 3, 3 * k:3 * k + 3] = block
    picks = sample_negatives(sim, torch.arange(3 * n), 1.0, generator=torch.Generator().manual_seed(1))
    offsets = (picks[0::3] - torch.arange(0, 3 * n, 3)).tolist()
    assert set(offsets) <= {1, 2}
    share = offsets.count(1) / n
    assert abs(share - math.exp(2) / (math.exp(2) + 1)) < 0.04  # ~4 standard deviations


class _DotITM(torch.nn.Module):
    """ITM double: logit_match = <mean image token, first text token>, logit_no = 0."""

    def itm_logits(self, image_tokens, text_tokens, text_mask):
        match = (image_tokens.mean(1) * text_tokens[:, 0]).sum(-1)
        return torch.stack([torch.zeros_like(match), match], dim=1)


def test_itm_loss_hand_computation_with_forced_negatives_and_extra_pairs():
    img_tok = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [B=2, N=1, D=2]
    txt_tok = torch.tensor([[[2.0, 0.0]], [[0.0, 3.0]]])  # [B=2, L=1, D=2]
    mask = torch.ones(2, 1, dtype=torch.long)
    ids = torch.tensor([0, 1])  # with 2 ids the only valid negative of i is 1-i: no randomness left
    sim = torch.eye(2)
    extra = [(img_tok[:1], torch.tensor([[[1.0, 1.0]]]), torch.ones(1, 1, dtype=torch.long))]
    loss, stats = itm_loss(_DotITM(), img_tok, txt_tok, mask, sim, ids, torch.tensor(0.07), extra)
    # pairs: pos (0,0)=2, pos (1,1)=3, neg img0+txt1=0, img1+txt0=0, neg img1+txt0 (for text 0)=0,
    # img0+txt1 (for text 1)=0, extra img0+[1,1]=1
    match_logits = [2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    labels = [1, 1, 0, 0, 0, 0, 0]
    expected = sum(_xent([0.0, m], [1 - y, y]) for m, y in zip(match_logits, labels)) / len(labels)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["itm_pairs"] == 7


def test_mask_tokens_labels_only_masked_and_never_special():
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (8, 20))
    ids[:, 0], ids[:, -1] = 101, 102
    mask = torch.ones_like(ids)
    mask[:, 15:] = 0
    masked, labels = mask_tokens(ids, mask, mask_id=103, vocab_size=30522, probability=0.5)
    chosen = labels != -100
    assert chosen.any()
    assert not chosen[:, 0].any() and not chosen[:, 15:].any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_eda_keeps_words_and_never_empties():
    rng = random.Random(0)
    text = "a man in a red coat is running"
    for _ in range(200):
        out = eda(text, rng, p_delete=0.5)
        assert out.split() and set(out.split()) <= set(text.split())
    assert eda("single", rng) == "single"


def test_param_groups_decay_and_multipliers():
    model = torch.nn.ModuleDict({"tower": torch.nn.Linear(3, 3), "head": torch.nn.Sequential(
        torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))})
    model.temp = torch.nn.Parameter(torch.tensor(0.07))
    groups = param_groups(model, lr=1e-4, weight_decay=0.01, lr_mult={"head.*": 5.0})
    by = {(g["lr_mult"], g["weight_decay"] > 0): set(g["names"]) for g in groups}
    assert by[(1.0, True)] == {"tower.weight"}
    assert by[(1.0, False)] == {"tower.bias", "temp"}
    assert by[(5.0, True)] == {"head.0.weight"}
    assert by[(5.0, False)] == {"head.0.bias", "head.1.weight", "head.1.bias"}
    assert all(g["lr"] == pytest.approx(1e-4 * g["lr_mult"]) for g in groups)
    assert lr_multiplier("fusion.layers.0.ffn.0.weight", {"fusion.*": 3, "*": 2}) == 3
    assert no_weight_decay("x.bias", torch.zeros(3))


def test_schedules_warmup_then_decay():
    cos = schedule_fn("cosine", total_steps=10, warmup=2)
    assert [round(cos(s), 4) for s in (0, 1)] == [0.5, 1.0]
    assert cos(2) == pytest.approx(1.0) and cos(10) == pytest.approx(0.0, abs=1e-9)
    assert cos(6) == pytest.approx(0.5)
    lin = schedule_fn("linear", total_steps=10, warmup=0.0)
    assert lin(5) == pytest.approx(0.5)
    step = schedule_fn("step", total_steps=10, warmup=0, milestones=[0.5], gamma=0.1)
    assert step(4) == 1.0 and step(5) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        schedule_fn("bogus", 10)


def _tiny_batch(model, b: int = 4) -> dict[str, torch.Tensor]:
    h, w = model.image_size
    ids, mask = model.tokenize([f"a person number {i} walking" for i in range(b)])
    h_ids, h_mask = model.tokenize([f"a person number {i} falling down" for i in range(b)])
    return {"images": torch.randn(b, 3, h, w), "input_ids": ids, "attention_mask": mask,
            "labels": torch.tensor([0, 0, 1, 2])[:b], "hard_rows": torch.tensor([0, 2]),
            "hard_images": torch.randn(2, 3, h, w), "hard_input_ids": h_ids[[0, 2]],
            "hard_attention_mask": h_mask[[0, 2]]}


def test_train_step_combines_losses_and_mlm_on_lite_tiny():
    from tpas.config import LossSection
    from tpas.models import create_model
    from tpas.train.loop import TrainStep

    torch.manual_seed(0)
    model = create_model("lite-tiny")
    batch = _tiny_batch(model)
    out = TrainStep(model, LossSection(itc=1.0, itm=0.5, mlm=0.2))(batch)
    assert set(out) >= {"itc", "itm", "mlm", "loss", "itm_acc"}
    expected = out["itc"] + 0.5 * out["itm"] + 0.2 * out["mlm"]
    assert torch.allclose(out["loss"], expected)
    out["loss"].backward()
    assert model.mlm_head.bias.grad is not None and model.itm_head.net[0].weight.grad is not None
    assert model.temp.grad is not None


def test_train_step_scores_hard_pairs_as_labelled_negatives(monkeypatch):
    from tpas.config import LossSection
    from tpas.models import create_model
    from tpas.train.loop import TrainStep

    torch.manual_seed(0)
    model = create_model("lite-tiny")  # eval mode: no dropout, so the encodings can be recomputed below
    batch = _tiny_batch(model)
    seen = []
    real = model.itm_logits_indexed  # lite scores pairs by index into the distinct images and captions

    def spy(image_tokens, text_tokens, text_mask, image_index=None, text_index=None):
        logits = real(image_tokens, text_tokens, text_mask, image_index, text_index)
        ii = torch.arange(len(image_tokens)) if image_index is None else image_index
        ti = torch.arange(len(text_tokens)) if text_index is None else text_index
        seen.append((image_tokens[ii], text_tokens[ti], text_mask[ti], logits))
        return logits

    monkeypatch.setattr(model, "itm_logits_indexed", spy)
    out = TrainStep(model, LossSection(itc=0.0, itm=1.0))(batch)
    (img, txt, mask, logits), = seen
    rows = batch["hard_rows"]
    with torch.no_grad():
        image = model.encode_image(batch["images"]).tokens
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        hard_image = model.encode_image(batch["hard_images"]).tokens
        hard_text = model.encode_text(batch["hard_input_ids"], batch["hard_attention_mask"])
    b, n_hard = 4, len(rows)
    width = text.tokens.shape[1]
    # the first b pairs are the positives (image i, caption i)
    assert torch.allclose(img[:b], image, atol=1e-6) and torch.allclose(txt[:b, :width], text.tokens, atol=1e-6)
    # the last 2 x n_hard pairs: (image of a hard row, its other-behaviour caption), then
    # (the other-behaviour image, the hard row's own caption)
    tail_img, tail_txt, tail_mask = img[-2 * n_hard:], txt[-2 * n_hard:], mask[-2 * n_hard:]
    assert torch.allclose(tail_img[:n_hard], image[rows], atol=1e-6)
    assert torch.allclose(tail_img[n_hard:], hard_image, atol=1e-6)
    h = hard_text.tokens.shape[1]
    assert torch.allclose(tail_txt[:n_hard, :h], hard_text.tokens, atol=1e-6)
    assert torch.equal(tail_mask[:n_hard, :h], batch["hard_attention_mask"])
    assert torch.allclose(tail_txt[n_hard:, :width], text.tokens[rows], atol=1e-6)
    # labels: 1 for the b positives, 0 for every negative, hard pairs included
    labels = torch.zeros(len(logits), dtype=torch.long)
    labels[:b] = 1
    assert torch.allclose(out["itm"], F.cross_entropy(logits.float(), labels))
    wrong = labels.clone()
    wrong[-2 * n_hard:] = 1
    assert not torch.allclose(out["itm"], F.cross_entropy(logits.float(), wrong))


def test_mlm_on_a_model_without_head_is_a_clear_not_implemented():
    from tpas.config import LossSection
    from tpas.models import create_model
    from tpas.train.loop import TrainStep

    model = create_model("lite-tiny", mlm_head=False)
    with pytest.raises(NotImplementedError, match="mlm_head=False"):
        TrainStep(model, LossSection(mlm=1.0))(_tiny_batch(model))
