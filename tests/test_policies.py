"""Shape policies: slice/pad, input-channel adaptation, position-embedding resampling."""

from __future__ import annotations

import pytest
import torch

from archalign.errors import PlanError
from archalign.policies import choose_policy, resize, resolve_auto


def test_slice_takes_the_leading_block_and_pad_keeps_the_destination_elsewhere() -> None:
    src = torch.arange(12.0).reshape(3, 4)
    out = resize(src, torch.full((2, 2), -1.0), "slice")
    assert out.tolist() == [[0.0, 1.0], [4.0, 5.0]]
    grown = resize(src, torch.full((4, 5), -1.0), "slice")
    assert torch.equal(grown[:3, :4], src)
    assert (grown[3:] == -1).all() and (grown[:, 4:] == -1).all()


def test_slice_centres_kernel_axes() -> None:
    src = torch.arange(25.0).reshape(1, 1, 5, 5)
    out = resize(src, torch.zeros(1, 1, 3, 3), "slice")
    assert torch.equal(out[0, 0], src[0, 0, 1:4, 1:4])


def test_input_channels_sum_for_one_and_rescale_for_many() -> None:
    src = torch.randn(8, 3, 3, 3)
    one = resize(src, torch.zeros(8, 1, 3, 3), "input_channels")
    torch.testing.assert_close(one, src.sum(dim=1, keepdim=True))
    four = resize(src, torch.zeros(8, 4, 3, 3), "input_channels")
    torch.testing.assert_close(four[:, :3], src * 0.75)
    torch.testing.assert_close(four[:, 3], src[:, 0] * 0.75)
    # an image repeated over 3 channels gives the same response as in the 3-channel model
    x = torch.randn(1, 1, 3, 3)
    torch.testing.assert_close(torch.nn.functional.conv2d(x.repeat(1, 3, 1, 1), src),
                               torch.nn.functional.conv2d(x, one))


def test_resample_keeps_prefix_tokens_and_interpolates_the_grid() -> None:
    src = torch.randn(1, 1 + 4 * 4, 8)
    out = resize(src, torch.zeros(1, 1 + 8 * 8, 8), "resample")
    assert out.shape == (1, 65, 8)
    assert torch.equal(out[:, 0], src[:, 0])
    same = resize(src, torch.zeros(1, 17, 8), "resample")
    torch.testing.assert_close(same, src)


@pytest.mark.parametrize(("src", "dst", "expected"), [
    ((64, 3, 7, 7), (64, 1, 7, 7), "input_channels"),
    ((1, 197, 64), (1, 65, 64), "resample"),
    ((8, 10), (5, 10), "slice"),
])
def test_auto_picks_by_shape(src, dst, expected) -> None:  # type: ignore[no-untyped-def]
    assert resolve_auto(src, dst) == expected


def test_choose_policy_by_glob_and_unknown_names() -> None:
    assert choose_policy({"blocks.*.weight": "slice"}, "blocks.3.weight") == "slice"
    assert choose_policy({"blocks.*.weight": "slice"}, "head.weight") is None
    assert choose_policy(None, "x") is None
    with pytest.raises(PlanError, match="unknown shape policy 'stretch'"):
        choose_policy("stretch", "x")


def test_policies_refuse_shapes_they_do_not_fit() -> None:
    with pytest.raises(PlanError, match=r"\(8, 10\) and \(5, 10, 1\)"):
        resize(torch.zeros(8, 10), torch.zeros(5, 10, 1), "slice")
    with pytest.raises(PlanError, match="input_channels"):
        resize(torch.zeros(8, 10), torch.zeros(5, 10), "input_channels")
    with pytest.raises(PlanError, match="resample"):
        resize(torch.zeros(1, 15, 4), torch.zeros(1, 17, 4), "resample")


def test_dtype_and_device_follow_the_destination() -> None:
    out = resize(torch.randn(4, 4), torch.zeros(2, 2, dtype=torch.float64), "slice")
    assert out.dtype == torch.float64
