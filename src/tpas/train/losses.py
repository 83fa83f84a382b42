"""Training objectives: ITC over the global batch, ITM on sampled hard negatives, optional MLM.

* ITC (image-text contrastive): symmetric cross-entropy between L2-normalised image and text
  features, scaled by the model's learnable clamped temperature. Features from every process are
  gathered *with* gradients so the whole global batch is the contrast set; targets are soft: all
  pairs sharing a ``person_id`` count as positives (optionally label-smoothed).
* ITM (image-text matching): for each positive pair one negative text and one negative image
  drawn from the local batch with probability ∝ softmax(similarity / temperature), never of the
  same id; plus PAB's identity hard pairs (same person, opposite behaviour) as extra negatives.
* MLM: masked-token prediction through the fusion encoder, only for models that expose
  ``mlm_logits`` (X-VLM); others raise :class:`NotImplementedError` with a clear message.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


# -- cross-process gathering ---------------------------------------------------------------------
def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0 (equal shapes on every rank), no autograd."""
    if _world() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class _GatherLocalGrad(torch.autograd.Function):
    """All-gather whose backward keeps only this rank's rows of the incoming gradient.

    This is X-VLM's (and CMP's) ``AllGather``. Every rank computes the same global ITC loss, so the
    rows of its gradient that belong to this rank's slice are already the whole gradient of that
    loss w.r.t. the slice; no backward communication is needed.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # [B,...] -> [W*B,...]
        rank = dist.get_rank()
        ctx.rows = slice(rank * x.shape[0], (rank + 1) * x.shape[0])
        return gather_no_grad(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # [W*B,...] -> [B,...]
        return grad[ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0; gradients flow back to the local slice only.

    Upstream semantics, on purpose: under DDP (which averages gradients over the W processes) the
    encoders then get ``itc * grad(L_itc) / W + itm * grad(mean of the local ITM losses)``, exactly
    what X-VLM/CMP trained with, so the PAB recipe's learning rate and loss weights mean what they
    meant there. (``torch.distributed.nn.functional.all_gather`` would sum the W identical
    gradients instead: ITC W times stronger relative to ITM.) The temperature is not gathered and
    gets the full ``itc * dL_itc/dtemp``, as upstream. See docs/training.md, "Several processes".
    """
    if _world() == 1:
        return x
    return _GatherLocalGrad.apply(x.contiguous())


# -- ITC ------------------------------------------------------------------------------------------
def soft_targets(ids_rows: torch.Tensor, ids_cols: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Row-normalised same-id matrix; smoothing moves ``label_smoothing`` of the mass to uniform."""
    pos = (ids_rows[:, None] == ids_cols[None, :]).float()
    targets = pos / pos.sum(1, keepdim=True).clamp_min(1.0)
    if label_smoothing > 0:
        targets = (1.0 - label_smoothing) * targets + label_smoothing / targets.shape[1]
    return targets


def itc_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, temperature: torch.Tensor,
             ids: torch.Tensor | None = None, label_smoothing: float = 0.0, gather: bool = True) -> torch.Tensor:
    """Symmetric contrastive loss; ``ids`` [B] int (None = each pair its own class).

    With ``gather`` and a process group, the loss is computed on the concatenated global batch,
    identical on every rank.
    """
    if ids is None:
        ids = torch.arange(image_embeds.shape[0], device=image_embeds.device)
        if gather and _world() > 1:
            ids = ids + dist.get_rank() * image_embeds.shape[0]  # unique across ranks (equal batches)
    if gather:
        image_embeds, text_embeds, ids = gather_with_grad(image_embeds), gather_with_grad(text_embeds), gather_no_grad(ids)
    logits = image_embeds.float() @ text_embeds.float().t() / temperature.float()
    targets = soft_targets(ids, ids, label_smoothing)
    loss_i2t = -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(logits.t(), dim=1) * targets.t()).sum(1).mean()
    return (loss_i2t + loss_t2i) / 2


# -- ITM hard-negative sampling -----------------------------------------------------------------
@torch.no_grad()
def sample_negatives(sim: torch.Tensor, ids: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                     generator: torch.Generator | None = None, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """For each row of ``sim`` [B,B] pick one column ∝ softmax(sim/temperature) with a different id.

    ``exclude`` [B,B] bool marks further columns a row must not draw (e.g. a negative it already
    has). Returns [B] column indices, -1 where the row has no column left (all-same-id batch).
    """
    same = ids[:, None] == ids[None, :]
    if exclude is not None:
        same = same | exclude
    weights = F.softmax(sim.float() / float(temperature), dim=1)
    # a tiny floor keeps rows whose softmax underflowed to 0 on every valid column samplable
    weights = (weights + 1e-12).masked_fill(same, 0.0)
    valid = (~same).any(dim=1)
    picks = torch.full((sim.shape[0],), -1, dtype=torch.long, device=sim.device)
    if valid.any():
        drawn = torch.multinomial(weights[valid], 1, generator=generator).squeeze(1)
        picks[valid] = drawn
    return picks


def itm_loss(model, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
             sim_i2t: torch.Tensor, ids: torch.Tensor, temperature: torch.Tensor,
             extra_negatives: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
             partner: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Binary matching loss over positives, sampled in-batch negatives, partner pairs and ``extra_negatives``.

    ``sim_i2t`` [B,B] is the local image-text cosine matrix (no grad needed). Pairs, in order: the
    B positives; for each image a negative text and for each text a negative image, drawn
    ∝ softmax(sim / temperature) among other ids; with ``partner`` [B] (batch position of each
    row's opposite-behaviour pair, -1 = none; PAB's hard pairs met in the batch, as CMP's separate
    hard-pair term) the pairs (image i, caption of partner(i)) as negatives, and the partner is
    then not drawn again; then the ready-made (image_tokens, text_tokens, text_mask) triples of
    ``extra_negatives``. Models with ``itm_logits_indexed`` score the pairs from the distinct
    images and texts (each projected once); others get the gathered pairs. Returns the mean
    cross-entropy and, for logging, the accuracy overall and on the partner pairs.
    """
    sim = sim_i2t.detach()
    b = image_tokens.shape[0]
    device = image_tokens.device
    rows = torch.arange(b, device=device)
    exclude = None
    has_partner = torch.zeros(b, dtype=torch.bool, device=device)
    if partner is not None:
        has_partner = partner >= 0
        exclude = torch.zeros(b, b, dtype=torch.bool, device=device)
        exclude[rows[has_partner], partner[has_partner]] = True
        exclude = exclude | exclude.t()
    neg_text_for_image = sample_negatives(sim, ids, temperature, exclude=exclude)  # [B] text index per image
    neg_image_for_text = sample_negatives(sim.t(), ids, temperature,
                                          exclude=exclude.t() if exclude is not None else None)
    vi, vt = neg_text_for_image >= 0, neg_image_for_text >= 0
    image_index = [rows, rows[vi], neg_image_for_text[vt], rows[has_partner]]
    text_index = [rows, neg_text_for_image[vi], rows[vt], partner[has_partner] if partner is not None else rows[:0]]
    images, texts, masks = image_tokens, text_tokens, text_mask
    if extra_negatives:
        width = max([text_tokens.shape[1]] + [t.shape[1] for _, t, _ in extra_negatives])
        img_parts, txt_parts, mask_parts = [image_tokens], [_pad_to(text_tokens, width)], [_pad_to(text_mask, width)]
        n_img, n_txt = b, b
        for img, txt, msk in extra_negatives:
            img_parts.append(img)
            txt_parts.append(_pad_to(txt, width))
            mask_parts.append(_pad_to(msk, width))
            image_index.append(torch.arange(n_img, n_img + len(img), device=device))
            text_index.append(torch.arange(n_txt, n_txt + len(txt), device=device))
            n_img, n_txt = n_img + len(img), n_txt + len(txt)
        images, texts, masks = torch.cat(img_parts), torch.cat(txt_parts), torch.cat(mask_parts)
    ii, ti = torch.cat(image_index), torch.cat(text_index)
    if hasattr(model, "itm_logits_indexed"):
        logits = model.itm_logits_indexed(images, texts, masks, ii, ti)
    else:
        logits = model.itm_logits(images[ii], texts[ti], masks[ti])
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:b] = 1
    loss = F.cross_entropy(logits.float(), labels)
    correct = (logits.argmax(1) == labels).float()
    stats = {"itm_acc": correct.mean().item(), "itm_pairs": float(logits.shape[0])}
    n_hard = int(has_partner.sum())
    if n_hard:
        start = b + int(vi.sum()) + int(vt.sum())
        stats["itm_hard_acc"] = correct[start:start + n_hard].mean().item()
    return loss, stats


def _pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad the sequence dim (dim 1) with zeros: texts of different batches have other widths."""
    if t.shape[1] == width:
        return t
    pad = [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]]
    return F.pad(t, pad)


# -- MLM -----------------------------------------------------------------------------------------
def mask_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor, mask_id: int, vocab_size: int,
                probability: float = 0.25, special_ids: tuple[int, ...] = (0, 101, 102),
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: of the chosen tokens 80% -> [MASK], 10% random, 10% kept. Labels -100 elsewhere."""
    ids = input_ids.clone()
    probs = torch.full(ids.shape, probability, device=ids.device)
    special = attention_mask == 0
    for sid in special_ids:
        special |= ids == sid
    probs.masked_fill_(special, 0.0)
    chosen = torch.bernoulli(probs, generator=generator).bool()
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8, device=ids.device), generator=generator).bool() & chosen
    ids[to_mask] = mask_id
    to_random = torch.bernoulli(torch.full(ids.shape, 0.5, device=ids.device), generator=generator).bool()
    to_random &= chosen & ~to_mask
    ids[to_random] = torch.randint(vocab_size, ids.shape, device=ids.device, generator=generator)[to_random]
    return ids, labels


def mlm_loss(model, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             probability: float = 0.25) -> torch.Tensor:
    """Masked-token prediction conditioned on the image; needs ``model.mlm_logits``."""
    head = getattr(model, "mlm_logits", None)
    if head is None:
        raise NotImplementedError(
            f"MLM needs a model with an MLM head (mlm_logits); the {getattr(model, 'family', '?')!r} "
            "family has none: set loss.mlm=0")
    tok = model.tokenizer
    special = (tok.pad_id, tok.cls_id, tok.sep_id)
    masked, labels = mask_tokens(input_ids, attention_mask, tok.mask_id, tok.vocab_size, probability, special)
    logits = head(image_tokens, masked, attention_mask)  # [B,L,V]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
