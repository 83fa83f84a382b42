"""Helpers shared by the model tests."""

from __future__ import annotations

import torch


def run_interface(model, pixels: torch.Tensor, texts: list[str]):
    """(ImageEncoding, TextEncoding, ITM logits of the aligned pairs) through the public interface."""
    ids, mask = model.tokenize(texts)
    with torch.no_grad():
        img = model.encode_image(pixels)
        txt = model.encode_text(ids, mask)
        logits = model.itm_logits(img.tokens, txt.tokens, txt.mask)
    return img, txt, logits
