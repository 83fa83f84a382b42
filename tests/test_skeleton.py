import torch

from tpas.cli import main
from tpas.models.tokenizer import WordPieceTokenizer


def test_cli_help_lists_commands(capsys):
    assert main([]) == 2
    assert "Text-based Person Anomaly Search" in capsys.readouterr().out


def test_wordpiece_known_ids():
    tok = WordPieceTokenizer()
    assert tok.vocab_size == 30522
    ids, mask = tok(["a woman falls off her bicycle", "Man"], max_length=16)
    assert ids[0].tolist() == [101, 1037, 2450, 4212, 2125, 2014, 10165, 102]
    assert ids[1].tolist()[:3] == [101, 2158, 102] and mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    long_ids, _ = tok(["word " * 100], max_length=10)
    assert long_ids.shape == (1, 10) and long_ids[0, -1].item() == 102
    assert ids.dtype == torch.long
