"""Token codecs of the re-rank store: sizes, round trips, any token shape."""

import numpy as np
import pytest

from tpas.search.quantize import GROUP, TOKEN_CODECS, decode_tokens, encode_tokens, token_bytes


@pytest.mark.parametrize("shape", [(3, 19, 1280), (2, 1, 7), (2, 73, 100)])
@pytest.mark.parametrize("codec", TOKEN_CODECS)
def test_round_trip_size_and_error(shape, codec):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 3, size=shape[-1])).astype(np.float16)
    before = x.copy()
    codes, scales = encode_tokens(x, codec)
    assert np.array_equal(x, before)  # the caller's array is never written
    stored = codes[0].nbytes + (0 if scales is None else scales[0].nbytes)
    assert stored == token_bytes(shape[1:], codec)  # the formula is what lands on disk
    back = decode_tokens(codes, scales, codec, shape[-1])
    assert back.shape == x.shape
    x32 = x.astype(np.float32)
    err = np.abs(back.astype(np.float32) - x32)
    if codec == "fp16":
        assert err.max() == 0
    elif codec == "int8":  # half a step of max|x| / 127 per token (+ fp16 rounding of the scale)
        assert (err <= np.abs(x32).max(axis=2, keepdims=True) / 127 * 0.51 + 1e-3).all()
    else:  # half a step of each group's range / 15
        pad = -(-shape[-1] // GROUP) * GROUP
        padded = np.concatenate([x32, np.repeat(x32[..., -1:], pad - shape[-1], axis=2)], axis=2)
        groups = padded.reshape(*shape[:2], -1, GROUP)
        step = (groups.max(3) - groups.min(3)) / 15
        assert (err <= np.repeat(step, GROUP, axis=2)[..., :shape[-1]] * 0.51 + 1e-2).all()


def test_lite_store_sizes():
    assert token_bytes((19, 1280), "fp16") == 48_640
    assert token_bytes((19, 1280), "int8") == 24_358
    assert token_bytes((19, 1280), "int4") == 13_680  # under the 16 KB per image of issue 14
    with pytest.raises(ValueError, match="unknown token codec"):
        token_bytes((19, 1280), "int2")


def test_constant_tokens_decode_exactly():
    x = np.full((2, 3, 64), 0.5, np.float32)
    for codec in ("int8", "int4"):
        codes, scales = encode_tokens(x, codec)
        np.testing.assert_allclose(decode_tokens(codes, scales, codec, 64), x, atol=1e-3)
