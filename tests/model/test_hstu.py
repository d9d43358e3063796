"""HSTURetrieval (causal HSTU, next-item sampled softmax) on small hand-made sequences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from grinfer.config import preset
from grinfer.features import RetrievalBatch, retrieval_batch
from grinfer.model import build_model
from grinfer.model.hstu import HSTURetrieval

NUM_ITEMS = 50
ATOL = 1e-5


def hstu_cfg(**update):
    return preset("hstu-ml1m").with_vocab(num_items=NUM_ITEMS).model_copy(update={"dropout": 0.0, **update})


def new_model(seed: int = 0, **update) -> HSTURetrieval:
    torch.manual_seed(seed)
    model = build_model(hstu_cfg(**update))
    assert isinstance(model, HSTURetrieval)
    with torch.no_grad():  # the relative-bias tables start at zero; make them matter
        for layer in model.layers:
            if layer.rel_bias is not None:
                layer.rel_bias.pos_table.normal_(0.0, 0.5)
                layer.rel_bias.time_table.normal_(0.0, 0.5)
    return model.eval()


def seq(length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    items = rng.integers(1, NUM_ITEMS + 1, size=length).astype(np.int64)
    ts = (978_300_000 + np.cumsum(rng.choice([0, 1, 30, 4000, 90_000], size=length))).astype(np.int64)
    return items, ts


def encode(model, sequences, with_targets=False) -> torch.Tensor:
    with torch.no_grad():
        return model.encode(retrieval_batch(sequences, with_targets=with_targets))


def test_retrieval_batch_layout():
    a, b = seq(5, 1), seq(3, 2)
    batch = retrieval_batch([a, b], with_targets=True)
    assert batch.offsets.tolist() == [0, 4, 6]
    assert batch.items.tolist() == a[0][:4].tolist() + b[0][:2].tolist()
    assert batch.targets.tolist() == a[0][1:].tolist() + b[0][1:].tolist()
    assert batch.timestamps.tolist() == a[1][:4].tolist() + b[1][:2].tolist()


@pytest.mark.parametrize("normalizer", ["max_len", "visible"])
@pytest.mark.parametrize("rel_bias", [True, False], ids=["rel_bias", "no_bias"])
def test_causal_prefix_outputs_unchanged_by_appended_items(normalizer, rel_bias):
    model = new_model(normalizer=normalizer, rel_bias=rel_bias)
    items, ts = seq(14, 3)
    full = encode(model, [(items, ts)])
    prefixes = encode(model, [(items[:n], ts[:n]) for n in (1, 5, 9)])
    torch.testing.assert_close(prefixes[:1], full[:1], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(prefixes[1:6], full[:5], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(prefixes[6:], full[:9], atol=ATOL, rtol=1e-5)
    # and the outputs do depend on earlier items: changing item 0 changes position 5
    changed = items.copy()
    changed[0] = changed[0] % NUM_ITEMS + 1
    other = encode(model, [(changed, ts)])
    assert (other[5] - full[5]).abs().max() > 1e-4
    torch.testing.assert_close(other[0:0], full[0:0])


def test_encode_rows_are_unit_norm():
    model = new_model()
    out = encode(model, [seq(7, 4), seq(1, 5), seq(12, 6)])
    assert out.shape == (20, 50)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(20), atol=1e-5, rtol=0)


def test_user_embedding_is_last_position_and_batch_independent():
    model = new_model()
    seqs = [seq(7, 7), seq(1, 8), seq(12, 9)]
    batch = retrieval_batch(seqs, with_targets=False)
    with torch.no_grad():
        users = model.user_embedding(batch)
        enc = model.encode(batch)
    assert users.shape == (3, 50)
    torch.testing.assert_close(users, enc[torch.tensor([6, 7, 19])])
    for i, s in enumerate(seqs):
        alone = encode(model, [s])
        torch.testing.assert_close(users[i], alone[-1], atol=ATOL, rtol=1e-5)
    assert (users[0] - users[2]).abs().max() > 1e-3


def test_item_table_is_normalised():
    model = new_model()
    table = model.item_table()
    assert table.shape == (NUM_ITEMS + 1, 50)
    torch.testing.assert_close(table[1:].norm(dim=-1), torch.ones(NUM_ITEMS), atol=1e-5, rtol=0)


def test_padding_row_gets_no_gradient():
    model = new_model()
    model.sampled_softmax_loss(retrieval_batch([seq(8, 13)], with_targets=True), 10).backward()
    grad = model.item_emb.weight.grad
    assert torch.equal(grad[0], torch.zeros(50))
    assert grad[1:].abs().sum() > 0


def test_padding_row_is_zero():
    model = new_model()
    assert torch.equal(model.item_emb.weight[0], torch.zeros(50))


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    model = build_model(preset("hstu-ml1m").with_vocab(num_items=NUM_ITEMS))  # dropout 0.2
    batch = retrieval_batch([seq(10, 10)], with_targets=False)
    model.eval()
    with torch.no_grad():
        a, b = model.encode(batch), model.encode(batch)
        assert torch.equal(a, b)
        model.train()
        assert not torch.allclose(model.encode(batch), a, atol=1e-4)


def test_rejects_mtgr_config():
    with pytest.raises(ValueError, match="kind"):
        HSTURetrieval(preset("mtgr-tiny"))


def expected_loss(model: HSTURetrieval, batch: RetrievalBatch, negatives: torch.Tensor) -> torch.Tensor:
    """Sampled softmax written row by row: row r of `negatives` [rows with a target, K] belongs to the
    r-th position that has a target; negatives equal to that target are left out."""
    out = model.encode(batch)
    table = torch.nn.functional.normalize(model.item_emb.weight, dim=-1)
    temp = model.cfg.temperature
    losses = []
    kept = [(row, t) for row, t in zip(out, batch.targets.tolist()) if t != 0]
    for (row, target), drawn in zip(kept, negatives.tolist()):
        negs = [n for n in drawn if n != target]
        logits = torch.stack([row @ table[target]] + [row @ table[n] for n in negs]) / temp
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses).mean()


def test_sampled_softmax_matches_row_by_row_definition():
    model = new_model(seed=1)
    batch = retrieval_batch([seq(9, 11), seq(4, 12)], with_targets=True)
    batch.targets[2] = 0  # a position without a target is skipped
    got = model.sampled_softmax_loss(batch, 12, generator=torch.Generator().manual_seed(5))
    kept = int((batch.targets > 0).sum())
    drawn = torch.randint(1, NUM_ITEMS + 1, (kept, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(got.detach(), expected_loss(model, batch, drawn), atol=1e-5, rtol=1e-5)


def test_negatives_equal_to_target_are_masked_single_item():
    """With one item every negative equals the target: all are masked and the loss is exactly 0."""
    torch.manual_seed(0)
    model = build_model(preset("hstu-ml1m").with_vocab(num_items=1).model_copy(update={"dropout": 0.0})).eval()
    items = np.ones(6, np.int64)
    batch = retrieval_batch([(items, np.arange(6, dtype=np.int64))], with_targets=True)
    loss = model.sampled_softmax_loss(batch, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert loss.item() == 0.0


def test_negatives_equal_to_target_are_masked_two_items():
    """Items 1 and 2 alternate; every draw of negatives holds copies of each row's target."""
    torch.manual_seed(2)
    # temperature 1 keeps the logits comparable, so a doubled-up target would visibly change the loss
    cfg = preset("hstu-ml1m").with_vocab(num_items=2).model_copy(update={"dropout": 0.0, "temperature": 1.0})
    model = build_model(cfg).eval()
    items = np.array([1, 2, 1, 2, 1, 2, 1], np.int64)
    batch = retrieval_batch([(items, np.arange(7, dtype=np.int64) * 10)], with_targets=True)
    gen_seed = 3
    drawn = torch.randint(1, 3, (6, 8), generator=torch.Generator().manual_seed(gen_seed))
    assert all(set(row) == {1, 2} for row in drawn.tolist())  # every row has masked and kept negatives
    with torch.no_grad():
        got = model.sampled_softmax_loss(batch, 8, generator=torch.Generator().manual_seed(gen_seed))
        want = expected_loss(model, batch, drawn)
        # the unmasked loss counts the target again among the negatives: log(1 + copies) larger at least
        out = model.encode(batch)
        table = model.item_table()
        neg_logits = torch.einsum("nd,nkd->nk", out, table[drawn])
        logits = torch.cat([(out * table[batch.targets]).sum(-1, keepdim=True), neg_logits], -1)
        unmasked = torch.nn.functional.cross_entropy(logits / model.cfg.temperature,
                                                     torch.zeros(len(out), dtype=torch.long))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got)
    assert unmasked - got > 0.1


def pattern_data() -> list[tuple[np.ndarray, np.ndarray]]:
    """Four users, each repeating a short item cycle: the next item is fully predictable."""
    cycles = [[1, 2, 3, 4, 5], [10, 11, 12], [20, 21, 22, 23], [30, 31, 32, 33, 34, 35]]
    out = []
    for u, cyc in enumerate(cycles):
        items = np.resize(np.array(cyc, np.int64), 16)
        out.append((items, (1_000_000 + 60 * np.arange(16) + u).astype(np.int64)))
    return out


def test_sampled_softmax_loss_decreases_with_adam():
    model = new_model(seed=3)
    batch = retrieval_batch(pattern_data(), with_targets=True)

    def eval_loss() -> float:
        model.eval()
        with torch.no_grad():
            return model.sampled_softmax_loss(batch, 20, generator=torch.Generator().manual_seed(99)).item()

    before = eval_loss()
    assert math.isfinite(before)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        model.train()
        opt.zero_grad()
        loss = model.sampled_softmax_loss(batch, 20, generator=gen)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.25 * before, (before, after)
    # and the model now ranks the true next item first for most positions
    model.eval()
    with torch.no_grad():
        scores = model.encode(batch) @ model.item_table().T
        scores[:, 0] = -math.inf
        hit = (scores.argmax(-1) == batch.targets).float().mean().item()
    assert hit > 0.6, hit


def test_grinfers_own_conventions_by_default():
    """The convention options default to the layout every earlier checkpoint has (and the forward it computed)."""
    model = new_model()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("layers.0.")}
    d, n = model.cfg.d_model, model.cfg.max_seq_len
    assert shapes == {"layers.0.norm_in.weight": (1, d), "layers.0.norm_in.bias": (1, d),
                      "layers.0.uvqk.weight": (4 * d, d), "layers.0.uvqk.bias": (4 * d,),
                      "layers.0.norm_attn.weight": (1, d), "layers.0.norm_attn.bias": (1, d),
                      "layers.0.out.weight": (d, d), "layers.0.out.bias": (d,),
                      "layers.0.rel_bias.pos_table": (2 * n + 1,),
                      "layers.0.rel_bias.time_table": (model.cfg.num_time_buckets,)}
    batch = retrieval_batch([(np.array([3, 9, 4]), np.array([0, 100, 5000]))], False)
    with torch.no_grad():
        mine = model.encode(batch)
        # a query's time bias uses its own timestamp; the next event's only with time_bias_from="next"
        nxt = build_model(model.cfg.replace(time_bias_from="next")).eval()
        nxt.load_state_dict(model.state_dict())
        assert not torch.allclose(nxt.encode(batch), mine)
        assert torch.allclose(model.encode(batch, torch.tensor([10**6])), mine)  # next_ts ignored by default
