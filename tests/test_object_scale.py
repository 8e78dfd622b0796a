"""``data.object_scale``: larger objects, same captions. The renderer scales only the size, the
analyser is told the sizes and keeps its accuracy on ground truth, the config refuses a scale
whose largest shape would not fit, and the datasets hand the scale to the renderer."""

import numpy as np
import pytest

from megatron_starflow.config import OBJECT_SCALE_MAX, ConfigError, load_config
from megatron_starflow.data.synthetic import SIZE_RANGE, attributes_for, make_clip, render_clip, scaled, size_range
from megatron_starflow.evaluation.adherence import ground_truth, heldout_cases
from megatron_starflow.evaluation.analyser import ATTRIBUTES, accuracy, analyse_clip, score


def test_scale_changes_only_the_size():
    base = attributes_for(3, "heldout")
    big = scaled(base, 1.5)
    assert big.size == pytest.approx(1.5 * base.size)
    assert big.to_dict() | {"size": base.size} == base.to_dict()
    clip, caption, attrs = make_clip(3, "heldout", 8, 16, 16, object_scale=1.5)
    np.testing.assert_array_equal(clip, render_clip(big, 8, 16, 16))
    assert caption == make_clip(3, "heldout", 8, 16, 16)[1]
    # more object pixels in every frame, the same background
    small = render_clip(base, 8, 16, 16)
    bg = np.asarray(small[0, 0, 0])
    assert all((clip[t] != bg).any(-1).sum() > (small[t] != bg).any(-1).sum() for t in range(8))
    assert size_range(2.0) == pytest.approx((0.28, 0.44))


@pytest.mark.parametrize("scale, side", [(1.5, 16), (1.8, 16), (1.5, 32)])
def test_analyser_reads_scaled_ground_truth(scale, side):
    cases = heldout_cases(60)
    rows = [score(analyse_clip(ground_truth(i, 8, side, side, scale), object_scale=scale), truth)
            for i, (_, truth) in enumerate(cases)]
    acc = {k: v["accuracy"] for k, v in accuracy(rows).items()}
    for a in ATTRIBUTES:
        assert acc[a] >= 0.95, (scale, side, acc)


def test_analyser_needs_the_scale_it_was_rendered_with():
    """Told the wrong sizes (scale 1 for objects 1.8x larger), the analyser misreads shapes: the
    scale is a real input, not decoration."""
    cases = heldout_cases(40)
    right = [score(analyse_clip(ground_truth(i, 8, 16, 16, 1.8), object_scale=1.8), t)["overall"]
             for i, (_, t) in enumerate(cases)]
    wrong = [score(analyse_clip(ground_truth(i, 8, 16, 16, 1.8)), t)["overall"]
             for i, (_, t) in enumerate(cases)]
    assert np.mean(right) >= 0.95 and np.mean(wrong) < np.mean(right) - 0.3


def test_config_refuses_a_scale_that_does_not_fit():
    assert load_config(None, ["data.object_scale=2.2"]).data.object_scale == 2.2
    for bad in ("0", "-1", "2.3"):
        with pytest.raises(ConfigError, match=r"data\.object_scale must be in \(0, 2\.27\]"):
            load_config(None, [f"data.object_scale={bad}"])
    assert OBJECT_SCALE_MAX * SIZE_RANGE[1] == pytest.approx(0.5)  # the config's bound is the renderer's


def test_datasets_render_at_the_configured_scale():
    from megatron_starflow.data.datasets import make_datasets

    cfg = load_config(None, ["data.object_scale=1.7", "data.num_train_clips=4", "data.num_heldout_clips=4"])
    data = make_datasets(cfg)
    for split, ds in (("train", data.train), ("heldout", data.heldout)):
        item = ds[1]
        video = item["video"] if isinstance(item, dict) else item[0]
        expect = render_clip(scaled(attributes_for(1, split), 1.7), 8, 16, 16)
        np.testing.assert_array_equal(np.asarray(video), expect)
