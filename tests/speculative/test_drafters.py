"""The drafters on their own and as the engine builds them from folders: the EAGLE draft format round trip,
MTP conversion, tree selection, chain drafting with a small MiniCPM model, FR-Spec files."""

from __future__ import annotations

import pytest
import torch

from minicpm4.checkpoint import save_model
from minicpm4.config import tiny
from minicpm4.engine import EngineConfig, LLMEngine
from minicpm4.generate import generate
from minicpm4.model import build_model
from minicpm4.mtp import MTPHead
from minicpm4.speculative.chain import ChainDrafter
from minicpm4.speculative.config import SpeculativeConfig
from minicpm4.speculative.draft_model import DraftOptions, build_draft, draft_from_mtp, load_draft, save_draft
from minicpm4.speculative.eagle import EagleDrafter
from minicpm4.speculative.tree import CandidateHistory, TreeShape, prune_tree, select_tree
from tests.speculative.drafters import GREEDY, PROMPTS, run_all

pytestmark = pytest.mark.usefixtures("one_thread")


def test_draft_folder_round_trip_and_options(tmp_path, model):
    draft = build_draft(model.config, DraftOptions(residual_scale="cpmcu", output_scale="width"), seed=3)
    save_draft(draft, tmp_path / "d")
    back = load_draft(tmp_path / "d", model.config)
    assert back.options == draft.options
    for (name, a), (_, b) in zip(draft.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    # CPM.cu's residual scale: scale_depth / sqrt(L_target + 1).
    assert back.layer.residual_scale == pytest.approx(1.4 / (model.config.num_hidden_layers + 1) ** 0.5)
    with pytest.raises(ValueError, match="hidden_size"):
        load_draft(tmp_path / "d", model.config.replace(hidden_size=128, num_attention_heads=8))
    with pytest.raises(ValueError, match="residual_scale"):
        DraftOptions(residual_scale="bogus")


def test_released_layout_names_load(tmp_path, model):
    """The names of openbmb/MiniCPM4-8B-Eagle-FRSpec (fc, input_norm1/2, layers.0.*; an unused norm)."""
    draft = build_draft(model.config, seed=1)
    names = set(draft.state_dict())
    assert {"fc.weight", "input_norm1.weight", "input_norm2.weight", "norm.weight",
            "layers.0.self_attn.q_proj.weight", "layers.0.mlp.down_proj.weight",
            "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight"} <= names


def test_mtp_head_converts_exactly(model):
    mtp = MTPHead(model.config, embed_first=False)
    torch.manual_seed(0)
    for p in mtp.parameters():
        p.data.normal_(0, 0.3)
    ids = torch.randint(3, 1000, (1, 9))
    pos = torch.arange(9)[None]
    with torch.no_grad():
        hidden = model.hidden_states(ids, pos)
        want = model.logits(mtp(model, hidden, ids, pos))[0]  # [8, V]
        draft = draft_from_mtp(mtp, model.config)
        from minicpm4.attention.dense import DenseAttention
        from minicpm4.attention.metadata import AttentionMetadata

        x = draft.fuse_inputs(model, ids[0, 1:], hidden[0, :-1])[None]
        cos, sin = model.rotary(pos[:, :-1], 9)
        feats = draft.layer(x, cos, sin, AttentionMetadata(positions=pos[:, :-1]), DenseAttention())
        got = model.logits(draft.head_input(feats))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_tree_selection_keeps_parents_and_the_best_scores():
    hist = CandidateHistory()
    lvl0 = hist.add(torch.tensor([10, 11, 12]), torch.log(torch.tensor([0.5, 0.3, 0.2])), torch.tensor([-1, -1, -1]))
    scores = torch.log(torch.tensor([0.5, 0.3, 0.2]))[:, None] + torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]]))
    hist.add(torch.tensor([[20, 21], [22, 23], [24, 25]]), scores, lvl0[:, None].expand(3, 2))
    tree = select_tree(7, hist, tree_size=5)
    # best four: 0.5 (10), 0.45 (10->20), 0.3 (11), 0.2 (12) ; 0.18 (11->22) is fifth
    assert tree.tokens == [7, 10, 11, 12, 20] and tree.parents == [-1, 0, 0, 0, 1] and tree.depths == [0, 1, 1, 1, 2]
    assert tree.children[1] == {20: 4}
    mask = tree.ancestor_mask()
    assert mask[4].tolist() == [True, True, False, False, True]
    pruned = prune_tree(tree, 1)
    assert pruned.tokens == [7, 10, 11, 12] and max(pruned.depths) == 1


def test_tree_shape_validation():
    assert TreeShape().num_candidates == 110  # CPM.cu CLI defaults: 10 + 100
    with pytest.raises(ValueError, match="tree_size"):
        TreeShape(tree_size=65)
    with pytest.raises(ValueError, match="num_iter"):
        TreeShape(num_iter=0)


def test_chain_drafting_with_a_small_model(model, reference):
    small = build_model(tiny(initializer_range=0.3, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                             num_attention_heads=2, num_key_value_heads=1), seed=9).eval()
    drafter = ChainDrafter(model, small, TreeShape(tree_size=4))
    engine = LLMEngine(model, config=EngineConfig(block_size=16), drafter=drafter)
    assert run_all(engine, PROMPTS, GREEDY, stagger=2) == reference


def test_chain_drafting_with_the_target_itself_accepts_everything(model, reference):
    drafter = ChainDrafter(model, model, TreeShape(tree_size=5))
    engine = LLMEngine(model, config=EngineConfig(block_size=16), drafter=drafter)
    assert run_all(engine, PROMPTS, GREEDY) == reference
    # every drafted token is the target's own greedy choice: ~5 tokens per verification (less at the ends)
    assert engine.stats.spec_tokens_total / engine.stats.spec_verify_total > 3.5


def test_engine_builds_drafters_from_folders(tmp_path, model, reference):
    from minicpm4.data.frspec import save_cpmcu_index

    save_draft(build_draft(model.config, seed=5), tmp_path / "eagle")
    save_model(build_model(tiny(initializer_range=0.3, num_hidden_layers=1), seed=2), tmp_path / "small")
    ids = torch.arange(300)
    save_cpmcu_index(ids, tmp_path / "freq_300.pt")
    for spec in (SpeculativeConfig(str(tmp_path / "eagle"), frspec=str(tmp_path / "freq_300.pt")),
                 SpeculativeConfig(str(tmp_path / "eagle"), shape=TreeShape(3, 2, 6)),
                 SpeculativeConfig(str(tmp_path / "small"), mode="chain", shape=TreeShape(tree_size=3))):
        engine = LLMEngine(model, config=EngineConfig(block_size=16, speculative=spec))
        assert run_all(engine, PROMPTS, GREEDY) == reference
    assert engine.drafter.shape.tree_size == 3
    with pytest.raises(ValueError, match="mode"):
        SpeculativeConfig("x", mode="medusa")


@pytest.mark.parametrize("config", ["int4-head", "ternary"])
def test_speculation_on_quantized_targets(config):
    """Packed INT4 / ternary targets (the head packed too): the draft reads a dense copy of the head rows it
    uses; verification runs the packed kernels; output == the quantized model's own reference path."""
    from minicpm4.quant import Int4WeightOnlyConfig, TernaryQATConfig, quantize_

    model = build_model(tiny(initializer_range=0.3, intermediate_size=192), seed=4).eval()
    qconfig = Int4WeightOnlyConfig(group_size=32, lm_head=True) if config == "int4-head" else \
        TernaryQATConfig(step="convert", group_size=32)
    quantize_(model, qconfig)
    ref = [o.token_ids for o in generate(model, PROMPTS, GREEDY)]
    drafter = EagleDrafter(model, build_draft(model.config, seed=6), TreeShape(3, 3, 8),
                           frspec_ids=torch.arange(512))
    engine = LLMEngine(model, config=EngineConfig(block_size=16), drafter=drafter)
    assert run_all(engine, PROMPTS, GREEDY) == ref
    assert engine.stats.spec_verify_total > 0
