"""The model package on tiny sizes: shapes, masks, slices, seeding and the frozen up-projections."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stackwise import compat
from stackwise.errors import ArtifactError
from stackwise.model.attention import GroupedQueryAttention, MultiHeadLatentAttention
from stackwise.model.config import ModelConfig
from stackwise.model.layers import RotaryEmbedding, SwiGLU
from stackwise.model.transformer import Block, Embedding, Head, Transformer, init_layer
from stackwise.model.weights import LayerModules, LayerWeights, next_layer
from stackwise.utils import tensor_sha256
from tests.cli_runner import CliRun

KINDS = ["mha", "gqa", "mla", ["gqa", "mla"]]


def tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=64,
        attention="gqa",
        mla_rq=16,
        mla_rkv=8,
        qk_rope_head_dim=4,
        qk_nope_head_dim=8,
        v_head_dim=8,
        mask_id=62,
        pad_id=63,
        seed=7,
    )
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def ids_for(cfg: ModelConfig, B: int = 2, T: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def kind_id(kind) -> str:
    return kind if isinstance(kind, str) else "+".join(kind)


# ---------------------------------------------------------------------------- shapes, forward, backward
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_forward_backward(kind, causal, tie):
    cfg = tiny(attention=kind, causal=causal, tie_embeddings=tie)
    model = Transformer(cfg)
    ids = ids_for(cfg)
    logits = model(ids)
    assert logits.shape == (2, 16, cfg.vocab_size)
    assert torch.isfinite(logits).all()
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name
    assert (model.head.proj is None) == tie


def test_attention_kinds_per_layer():
    model = Transformer(tiny(attention=["gqa", "mla", "mha"], n_layers=3))
    attn = [b.attn for b in model.blocks]
    assert isinstance(attn[0], GroupedQueryAttention) and attn[0].n_kv_heads == 2
    assert isinstance(attn[1], MultiHeadLatentAttention)
    assert isinstance(attn[2], GroupedQueryAttention) and attn[2].n_kv_heads == 4
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_causal_output_ignores_the_future():
    cfg = tiny(attention=["gqa", "mla"], causal=True)
    model = Transformer(cfg).eval()
    ids = ids_for(cfg)
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(ids)[:, :10], model(changed)[:, :10], atol=1e-6, rtol=0)
    bidirectional = Transformer(tiny(attention=["gqa", "mla"])).eval()
    assert not torch.allclose(bidirectional(ids)[:, :10], bidirectional(changed)[:, :10])


# ---------------------------------------------------------------------------- key padding mask
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("kind", KINDS, ids=kind_id)
def test_pad_tokens_do_not_leak(kind, causal):
    cfg = tiny(attention=kind, causal=causal)
    model = Transformer(cfg).eval()
    ids = ids_for(cfg, B=3)
    pad = torch.zeros(3, 16, dtype=torch.bool)
    pad[0, 11:] = True  # right padding
    pad[1, :4] = True  # left padding: under causal, position 4 sees only itself among real tokens
    pad[2, ::3] = True  # scattered
    other = torch.where(pad, (ids + 5) % cfg.vocab_size, ids)
    a, b = model(ids, pad), model(other, pad)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a[~pad], b[~pad], atol=1e-6, rtol=0)
    # without the mask the pad contents do change the real positions
    assert not torch.allclose(model(ids)[~pad], model(other)[~pad], atol=1e-4)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_all_padding_row_stays_finite(causal):
    cfg = tiny(attention=["gqa", "mla"], causal=causal)
    model = Transformer(cfg)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[1] = True
    logits = model(ids_for(cfg), pad)
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_no_pad_mask_equals_all_false_mask():
    cfg = tiny(attention=["gqa", "mla"])
    model = Transformer(cfg).eval()
    ids = ids_for(cfg)
    torch.testing.assert_close(model(ids), model(ids, torch.zeros(2, 16, dtype=torch.bool)), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- slices
def test_any_slice_composes_to_the_full_forward():
    cfg = tiny(attention=["gqa", "mla", "mha"], n_layers=3, tie_embeddings=False)
    model = Transformer(cfg).eval()
    ids = ids_for(cfg)
    pad = torch.zeros(2, 16, dtype=torch.bool)
    pad[0, 12:] = True
    h0 = model.embed_tokens(ids)
    assert h0.shape == (2, 16, cfg.d_model)
    h1 = model.run_layers(h0, 1, 1, pad)
    h3 = model.run_layers(model.run_layers(h1, 2, 2, pad), 3, 3, pad)
    torch.testing.assert_close(model.logits(h3), model(ids, pad), atol=0, rtol=0)
    torch.testing.assert_close(model.run_layers(h0, 1, 3, pad), h3, atol=0, rtol=0)
    assert model.run_layers(h1, 2, 1) is h1
    assert model.logits(h3[~pad]).shape == (int((~pad).sum()), cfg.vocab_size)  # any leading shape
    with pytest.raises(ValueError, match="outside 1..3"):
        model.run_layers(h0, 2, 4)


def test_parts_built_alone_equal_the_whole_model():
    cfg = tiny(attention=["gqa", "mla"], tie_embeddings=False, mla_freeze_up=True)
    model = Transformer(cfg)
    torch.manual_seed(123)  # global RNG state must not matter
    torch.randn(1000)
    parts = {"embed": Embedding(cfg), "blocks.1": Block(cfg, 2), "blocks.0": Block(cfg, 1), "head": Head(cfg)}
    for prefix, part in parts.items():
        for name, t in part.state_dict().items():
            assert torch.equal(t, model.state_dict()[f"{prefix}.{name}"]), f"{prefix}.{name}"
    h = torch.randn(2, 16, cfg.d_model)
    torch.testing.assert_close(parts["blocks.1"](parts["blocks.0"](h)), model.run_layers(h, 1, 2), atol=0, rtol=0)


# ---------------------------------------------------------------------------- seeding
def _params(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in Transformer(cfg).named_parameters()}


def test_same_seed_same_weights_other_seed_other_weights():
    cfg = tiny(attention=["gqa", "mla"], tie_embeddings=False, mla_freeze_up=True)
    a = _params(cfg)
    torch.manual_seed(999)
    Transformer(tiny(seed=1))  # build something else in between
    b = _params(cfg)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    c = _params(tiny(attention=["gqa", "mla"], tie_embeddings=False, mla_freeze_up=True, seed=8))
    for n in a:
        if a[n].ndim == 2:  # norms start at 1 whatever the seed
            assert not torch.equal(a[n], c[n]), n


def test_different_layer_index_different_weights():
    cfg = tiny(attention="gqa")
    b1, b2 = Block(cfg, 1).state_dict(), Block(cfg, 2).state_dict()
    for n, t in b1.items():
        if t.ndim == 2:
            assert not torch.equal(t, b2[n]), n


def test_init_scales():
    cfg = tiny(d_model=64, d_ff=256, n_layers=8, init_std=0.02)
    block = Block(cfg, 3)
    assert torch.equal(block.attn_norm.weight, torch.ones(64)) and torch.equal(block.mlp_norm.weight, torch.ones(64))
    assert abs(block.attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(block.mlp.up.std().item() - 0.02) < 0.002
    assert abs(block.mlp.down.weight.std().item() - 0.02 / 4) < 0.0005  # 1/sqrt(2 * n_layers)


# ---------------------------------------------------------------------------- frozen up-projections
def test_frozen_tensors_are_non_persistent_buffers():
    model = Transformer(tiny(attention=["gqa", "mla"], mla_freeze_up=True))
    frozen = {"blocks.0.mlp.up", "blocks.1.mlp.up", "blocks.1.attn.q_b.weight", "blocks.1.attn.kv_b.weight"}
    assert {n for n, _ in model.named_buffers()} == frozen
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen is a parameter
    assert not frozen & set(model.state_dict())  # so no checkpoint carries them
    model.requires_grad_(True)
    assert not any(b.requires_grad for b in model.buffers())  # and nothing can unfreeze them
    assert model.blocks[1].frozen_names == ("attn.q_b.weight", "attn.kv_b.weight", "mlp.up")
    assert model.blocks[1].frozen_tensors()["mlp.up"] is model.blocks[1].mlp.up
    trainable_mla = Transformer(tiny(attention="mla", mla_freeze_up=False))
    assert trainable_mla.blocks[0].attn.q_b.weight.requires_grad and trainable_mla.blocks[0].frozen_names == ("mlp.up",)


def test_frozen_up_regenerates_bit_identically_in_a_fresh_process():
    cfg = tiny(attention=["gqa", "mla"], mla_freeze_up=True)
    block = Transformer(cfg).blocks[1]
    script = textwrap.dedent(
        f"""
        import torch
        from stackwise.model.config import ModelConfig
        from stackwise.model.layers import SwiGLU
        from stackwise.model.transformer import Block, Transformer
        from stackwise.utils import tensor_sha256
        torch.manual_seed(31337)
        torch.randn(4096)
        cfg = ModelConfig(**{cfg.to_dict()!r})
        Transformer(ModelConfig(**{{**cfg.to_dict(), "seed": 3}}))  # other modules first
        Block(cfg, 1)
        with torch.device("meta"):
            Block(cfg, 2)
        block = Block(cfg, 2)
        print(tensor_sha256(block.mlp.up), block.frozen_up_checksum(), tensor_sha256(SwiGLU(cfg, 2).up))
        """
    )
    # a process where nothing of stackwise ran: `python -c script`, forked from the preloaded server
    done = CliRun([], Path.cwd(), dict(os.environ), timeout=120, code=script).wait()
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout.split()
    assert out == [tensor_sha256(block.mlp.up), block.frozen_up_checksum(), tensor_sha256(block.mlp.up)]


def _train_steps(model: Transformer, steps: int = 3) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = ids_for(model.cfg)
    for _ in range(steps):
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_frozen_tensors_unchanged_by_training():
    model = Transformer(tiny(attention=["gqa", "mla"], mla_freeze_up=True, dropout=0.1))
    model.requires_grad_(True)  # what a careless caller may do: it reaches parameters only
    frozen = dict(model.named_buffers())
    before = {n: t.detach().clone() for n, t in [*model.named_parameters(), *frozen.items()]}
    opt = _train_steps(model)
    in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
    assert in_opt == {id(p) for p in model.parameters()} and not in_opt & {id(t) for t in frozen.values()}
    for n, t in [*model.named_parameters(), *frozen.items()]:
        assert torch.equal(t, before[n]) == (n in frozen), n  # frozen: bit-identical; trainable: moved
    for block in model.blocks:
        block.verify_frozen()
    with torch.no_grad():
        model.blocks[0].mlp.up.add_(1e-3)
    with pytest.raises(ArtifactError, match="layer 1"):
        model.blocks[0].verify_frozen()


def test_trainable_state_dict_round_trip_and_checksum():
    cfg = tiny(attention=["gqa", "mla"], mla_freeze_up=True)
    trained = Transformer(cfg)
    _train_steps(trained, steps=1)
    src = trained.blocks[1]
    sd, checksum = src.trainable_state_dict(), src.frozen_up_checksum()
    assert not set(src.frozen_names) & set(sd)
    assert set(sd) == set(src.state_dict())

    fresh = Block(cfg, 2)
    with torch.no_grad():
        fresh.mlp.up.zero_()  # regenerated by the load, not kept
    fresh.load_trainable_state_dict(sd, checksum)
    for n, t in [*src.state_dict().items(), *src.frozen_tensors().items()]:
        assert torch.equal({**fresh.state_dict(), **fresh.frozen_tensors()}[n], t), n

    untouched = Block(cfg, 2)
    before = {n: t.clone() for n, t in untouched.state_dict().items()}
    with pytest.raises(ArtifactError, match="layer 2: frozen up-projection checksum mismatch"):
        untouched.load_trainable_state_dict(sd, "0" * 64)
    assert all(torch.equal(t, before[n]) for n, t in untouched.state_dict().items())
    with pytest.raises(ArtifactError, match="layer 2: frozen up-projection checksum mismatch"):
        Block(tiny(attention=["gqa", "mla"], mla_freeze_up=True, seed=8), 2).load_trainable_state_dict(sd, checksum)
    with pytest.raises(ArtifactError, match=r"layer 2: checkpoint keys .*missing \['mlp.gate.weight'\]"):
        Block(cfg, 2).load_trainable_state_dict({n: t for n, t in sd.items() if n != "mlp.gate.weight"}, checksum)
    with pytest.raises(ArtifactError, match="layer 2: mlp.gate.weight has shape"):
        Block(cfg, 2).load_trainable_state_dict({**sd, "mlp.gate.weight": torch.zeros(3, 3)}, checksum)


def test_checksum_covers_mla_frozen_ups_and_checks_the_live_tensors():
    cfg = tiny(attention="mla", n_layers=1, mla_freeze_up=True)
    a, b = Block(cfg, 1), Block(cfg, 1)
    assert a.frozen_up_checksum() == b.frozen_up_checksum()
    assert a.frozen_up_checksum() != Block(tiny(attention="mla", n_layers=1), 1).frozen_up_checksum()
    with torch.no_grad():
        b.attn.kv_b.weight[0, 0] += 1.0
    with pytest.raises(ArtifactError, match=r"layer 1: frozen tensor attn\.kv_b\.weight differs"):
        b.frozen_up_checksum()  # a checksum is never recorded for tensors that were changed


# ---------------------------------------------------------------------------- layers and compat
def test_rope_cache_made_under_inference_mode_is_usable_for_training():
    cfg = tiny(attention=["gqa", "mla"])
    model = Transformer(cfg)
    with torch.inference_mode():
        model(ids_for(cfg))  # fills the rotary caches, as Lightning's sanity validation does
    model(ids_for(cfg)).sum().backward()


def test_rope_rotates_pairs_by_position():
    rope = RotaryEmbedding(dim=4, theta=10000.0)
    x = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(3, 4)  # (T, dim): the same vector at positions 0..2
    y = rope(x)
    torch.testing.assert_close(y[:, 0], torch.cos(torch.arange(3.0)))
    torch.testing.assert_close(y[:, 2], torch.sin(torch.arange(3.0)))  # dim 0 pairs with dim 0 + dim/2
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(3))
    assert set(rope._cache) == {(3, torch.device("cpu"))}


def test_swiglu_formula():
    cfg = tiny()
    mlp = SwiGLU(cfg, 1)
    x = torch.randn(5, cfg.d_model)
    expected = (F.silu(x @ mlp.gate.weight.T) * (x @ mlp.up.T)) @ mlp.down.weight.T
    torch.testing.assert_close(mlp(x), expected)


def test_bfloat16_model_runs_and_keeps_the_fp32_checksum():
    cfg = tiny(attention=["gqa", "mla"], mla_freeze_up=True)
    fp32 = Transformer(cfg)
    model = Transformer(cfg).to(torch.bfloat16)  # what a bf16-true precision plugin does
    assert all(t.dtype == torch.bfloat16 for t in model.blocks[1].frozen_tensors().values())
    logits = model(ids_for(cfg))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    model.blocks[1].verify_frozen()
    # the checksum describes the canonical fp32 draw, so a bf16 run records what an fp32 run regenerates
    assert model.blocks[1].frozen_up_checksum() == fp32.blocks[1].frozen_up_checksum()
    fp32.blocks[1].load_trainable_state_dict(
        model.blocks[1].trainable_state_dict(), model.blocks[1].frozen_up_checksum()
    )


@pytest.mark.skipif(not hasattr(torch.nn, "RMSNorm"), reason="torch < 2.4 has only the fallback")
def test_compat_rms_norm_fallback_matches_torch():
    x = torch.randn(3, 5, 32)
    ref, ours = torch.nn.RMSNorm(32, eps=1e-5), compat._RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ref.weight.uniform_()
        ours.weight.copy_(ref.weight)
    torch.testing.assert_close(ours(x), ref(x))
    assert ours.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("masked", [False, True])
def test_compat_sdpa_gqa_fallback_matches(monkeypatch, masked):
    q, k, v = torch.randn(2, 8, 6, 4), torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    mask = torch.rand(2, 1, 1, 6) > 0.3 if masked else None
    if masked:
        mask[..., 0] = True
    fast = compat.sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    monkeypatch.setattr(compat, "_SDPA_HAS_GQA", False)
    slow = compat.sdpa(q, k, v, attn_mask=mask, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), attn_mask=mask)
    torch.testing.assert_close(fast, ref)
    torch.testing.assert_close(slow, ref)


# ------------------------------------------------------------------------------ layer-wise init levers
def test_identity_init_starts_as_the_identity_map():
    cfg = tiny()
    block = Block(cfg, 2)
    block.zero_residual_branches()
    h = torch.randn(2, 8, cfg.d_model)
    assert torch.equal(block(h), h)


@pytest.mark.parametrize("kinds", [["gqa", "gqa"], ["gqa", "mla"]])
def test_previous_init_copies_what_matches_and_keeps_frozen_tensors(kinds):
    cfg = tiny(attention=kinds, n_layers=2)
    below, block = Block(cfg, 1), Block(cfg, 2)
    with torch.no_grad():  # a "trained" layer 1: every trainable tensor moved
        for p in below.parameters():
            if p.requires_grad:
                p.add_(1.0)
    fresh = {n: t.clone() for n, t in block.state_dict().items()}
    from_state = Block(cfg, 2)  # the same start from layer 1's file section, its block never built
    init_layer(from_state, "previous", LayerWeights.of(LayerModules(below, Head(cfg))).block)
    block.copy_trainable_from(below)
    src, got = below.state_dict(), block.state_dict()
    assert all(torch.equal(t, from_state.state_dict()[n]) for n, t in got.items())
    for name, t in got.items():
        if name in block.frozen_names or (
            name.startswith("attn.") and kinds[0] != kinds[1]
        ):  # the frozen up-projection stays layer 2's own (seed, k) draw
            assert torch.equal(t, fresh[name]), name
        else:
            assert torch.equal(t, src[name]), name
    block.verify_frozen()


def test_init_layer_policies_are_plain_model_code():
    """`layerwise.init` is decided by init_layer / next_layer (no Lightning): random keeps the block's
    own draw, identity zeroes its residual branches, previous copies layer k-1's trained block."""
    cfg = tiny(n_layers=2)
    below, below_head = Block(cfg, 1), Head(cfg)
    with torch.no_grad():
        for p in list(below.parameters()) + list(below_head.parameters()):
            if p.requires_grad:
                p.add_(0.5)
    trained = LayerWeights.of(LayerModules(below, below_head))
    fresh = Block(cfg, 2).state_dict()
    h = torch.randn(2, 8, cfg.d_model)
    for policy in ("random", "identity", "previous"):
        block, head = next_layer(cfg, 2, policy, trained)[:2]
        assert torch.equal(head.norm.weight, below_head.norm.weight)  # the final norm is carried forward
        got = block.state_dict()
        if policy == "random":
            assert all(torch.equal(got[n], fresh[n]) for n in fresh)
        elif policy == "identity":
            assert torch.equal(block(h), h)
        else:
            assert all(torch.equal(got[n], below.state_dict()[n]) for n in block.trainable_state_dict())
        block.verify_frozen()  # the frozen up-projection stays layer 2's own
    with pytest.raises(ValueError, match="needs layer k-1"):
        init_layer(Block(cfg, 2), "previous", None)
    with pytest.raises(ValueError, match="unknown layer init"):
        init_layer(Block(cfg, 2), "zeros")
