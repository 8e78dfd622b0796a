"""Best-of-N sampling (sampling/rerank.py) on a tiny float64 system with random flow heads: the
score is the flow's log-likelihood ratio of caption vs empty caption (checked against the flow's
own NLL), the kept sample is
the top-scored candidate of one batched generation, N = 1 is plain generation, I2V prefixes are
repeated per candidate, and the CLI refuses what it cannot do."""

import pytest
import torch

from helpers_system import TINY_SYSTEM

pytestmark = pytest.mark.usefixtures("one_thread")
CAPTIONS = ["a red circle moves right on a black background",
            "a blue square moves left on a gray background"]


@pytest.fixture(scope="module")
def system(tmp_path_factory, megatron_ready):
    from megatron_starflow.config import load_config
    from megatron_starflow.data.tokenizer import ensure_tokenizer
    from megatron_starflow.models.system import StarFlowSystem

    run_dir = str(tmp_path_factory.mktemp("rerank"))
    cfg = load_config(None, TINY_SYSTEM + [f"train.out_dir={run_dir}"])
    ensure_tokenizer(cfg, run_dir)
    torch.manual_seed(0)
    sys_ = StarFlowSystem(cfg, run_dir).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # random flow heads and a text path that matters
        for module in list(sys_.model.blocks) + [sys_.model.learnable_self_denoiser]:
            for p in (module.proj_out.weight, module.proj_out.bias, module.final_norm.weight):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
    return sys_.eval()


def test_score_is_the_likelihood_ratio(system):
    from megatron_starflow.sampling.rerank import caption_scores

    x = 0.5 * torch.randn(3, 4, 4, 4, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    caps = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]]
    got = caption_scores(system, x, caps)
    with torch.no_grad():
        cond = system.model(x, system.encode_text(caps)).nll_per_dim()
        empty = system.model(x, system.encode_text([""] * 3)).nll_per_dim()
    torch.testing.assert_close(got, empty - cond, rtol=0, atol=1e-12)
    assert got.dtype == torch.float64 and got.abs().min() > 0  # the text changes the density
    # one clip scored against two captions: the ratio of the two scores is the captions' ratio
    two = caption_scores(system, x[:1].expand(2, -1, -1, -1, -1), CAPTIONS)
    assert two[0] != two[1]
    torch.testing.assert_close(two[0], got[0], rtol=0, atol=1e-12)


def test_best_of_keeps_the_top_candidate_of_one_batch(system):
    from megatron_starflow.sampling.generate import generate
    from megatron_starflow.sampling.jacobi import SolverOptions
    from megatron_starflow.sampling.rerank import caption_scores, generate_best_of

    opts = SolverOptions(solver="sequential")
    k = 3
    many = [c for c in CAPTIONS for _ in range(k)]
    ref = generate(system, many, seed=7, opts=opts)
    scores = caption_scores(system, ref.tokens, many).view(2, k)
    out = generate_best_of(system, CAPTIONS, k, seed=7, opts=opts)
    for i in range(2):
        j = i * k + int(scores[i].argmax())
        assert torch.equal(out.video[i], ref.video[j])
        assert torch.equal(out.tokens[i], ref.tokens[j])
        assert scores[i].max() >= scores[i].min()
    assert out.seconds["candidates"] == k
    # the candidates differ, so the choice is a real one
    assert not torch.equal(ref.tokens[0], ref.tokens[1])


def test_one_candidate_is_plain_generation(system):
    from megatron_starflow.sampling.generate import generate
    from megatron_starflow.sampling.jacobi import SolverOptions
    from megatron_starflow.sampling.rerank import generate_best_of

    opts = SolverOptions(solver="sequential")
    a = generate_best_of(system, CAPTIONS, 1, seed=3, opts=opts)
    b = generate(system, CAPTIONS, seed=3, opts=opts)
    assert torch.equal(a.video, b.video) and torch.equal(a.tokens, b.tokens)
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        generate_best_of(system, CAPTIONS, 0)


def test_prefix_is_repeated_per_candidate(system):
    from megatron_starflow.data.synthetic import make_clip
    from megatron_starflow.sampling.jacobi import SolverOptions
    from megatron_starflow.sampling.rerank import generate_best_of

    d = system.cfg.data
    clips = torch.stack([torch.from_numpy(make_clip(i, "heldout", d.frames, d.height, d.width)[0])
                         for i in range(2)])
    out = generate_best_of(system, CAPTIONS, 2, seed=1, opts=SolverOptions(solver="sequential"),
                           prefix_video=clips[:, :1])
    assert out.video.shape[0] == 2
    assert torch.equal(out.video[:, 0], clips[:, 0])  # each caption keeps its own given frame
