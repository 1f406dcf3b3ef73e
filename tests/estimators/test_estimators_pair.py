"""Pair-consistency scores against a plain per-pair loop, competitor rules, and the cancellation algebra."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ALPACA_ROWS
from infscope.data.formatting import format_prompt
from infscope.errors import InfscopeError
from infscope.estimators.pair import (
    PAIR_SCORES,
    PAIR_TASKS,
    competitor_index,
    ifd,
    label_margin,
    nearest_competitors,
    pair_options,
    pair_score,
    pair_scores,
    pmi,
    random_competitors,
    xprompt,
    xprompt_plan,
    xresponse,
    xresponse_plan,
)
from infscope.models.encode import batches, encode_rows
from infscope.models.loss import forward_losses
from infscope.models.pair_losses import EMPTY, pair_losses, prompt_embeddings

ROWS = [
    *ALPACA_ROWS,
    {"id": "d", "instruction": "Name a color.", "input": "", "output": "Blue is a color of the sky and sea."},
    {"id": "e", "instruction": "Translate to French.", "input": "good day", "output": "bonjour"},
    {"id": "f", "instruction": "List two animals.", "input": "", "output": "dog, cat"},
]
ENCODE = {"max_length": 256, "batch_size": 2, "response_only": True}


def _ref_loss(model, tok, response_row, prompt_row) -> float:
    """One pair alone, no padding: Alpaca prompt + response + EOS, cross-entropy on the response part."""
    prompt_fields = prompt_row if prompt_row is not None else {"instruction": "", "input": ""}
    prompt = tok(format_prompt(prompt_fields))["input_ids"]
    response = tok(response_row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].double()
    # the logit at position t predicts token t + 1
    predicting = logits[len(prompt) - 1 : len(prompt) + len(response) - 1]
    return F.cross_entropy(predicting, torch.tensor(response)).item()


@pytest.fixture(scope="module")
def ref_table(llama):
    """Reference loss of every response under every prompt (last column: empty instruction)."""
    n = len(ROWS)
    table = np.empty((n, n + 1))
    for r in range(n):
        for p in range(n):
            table[r, p] = _ref_loss(llama.model, llama.tokenizer, ROWS[r], ROWS[p])
        table[r, n] = _ref_loss(llama.model, llama.tokenizer, ROWS[r], None)
    return table


def test_pair_losses_match_row_loop(llama, ref_table):
    pairs = np.array([[0, 0], [1, 3], [3, 1], [2, EMPTY], [5, 4], [1, 3], [4, EMPTY], [0, 5]])
    got = pair_losses(llama.model, llama.tokenizer, ROWS, pairs, **ENCODE)
    cols = np.where(pairs[:, 1] == EMPTY, len(ROWS), pairs[:, 1])
    np.testing.assert_allclose(got, ref_table[pairs[:, 0], cols], rtol=1e-5, atol=1e-5)
    assert got[1] == got[5]  # a repeated pair gives the same value


def _chat(row_id, instruction, output):
    turns = [("system", "Be brief."), ("user", instruction), ("assistant", output)]
    return {"id": row_id, "messages": [{"role": r, "content": c} for r, c in turns]}


@pytest.mark.filterwarnings("ignore:tokenizer .* has no chat template")
def test_pair_losses_recombine_chat_rows(llama):
    chat = [_chat(r["id"], r["instruction"], r["output"]) for r in ROWS[:4]]
    pairs = np.array([[0, 1], [2, EMPTY], [1, 1], [3, 0]])
    got = pair_losses(llama.model, llama.tokenizer, chat, pairs, batch_size=3)
    ref = []
    for r, p in pairs:
        instruction = ROWS[p]["instruction"] if p != EMPTY else ""
        enc = encode_rows([_chat("x", instruction, ROWS[r]["output"])], llama.tokenizer, task="causal")
        with torch.no_grad():
            logits = llama.model(input_ids=torch.tensor(enc.input_ids)).logits[0].double()
        target = torch.tensor(enc.labels[0][1:])
        keep = target != -100
        ref.append(F.cross_entropy(logits[:-1][keep], target[keep]).item())
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_pmi_and_ifd_match_reference(llama, ref_table):
    n = len(ROWS)
    own, empty = np.diag(ref_table[:, :n]), ref_table[:, n]
    np.testing.assert_allclose(pmi(llama.model, llama.tokenizer, ROWS, **ENCODE), own - empty, atol=1e-5)
    np.testing.assert_allclose(
        ifd(llama.model, llama.tokenizer, ROWS, **ENCODE), own / empty, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("competitors", ["random", "nearest"])
def test_xprompt_and_xresponse_match_reference(llama, ref_table, competitors):
    n, k = len(ROWS), 2
    emb = np.random.default_rng(1).normal(size=(n, 4))
    opts = {"k": k, "competitors": competitors, "embeddings": emb, "seed": 5}
    comp = competitor_index([r["id"] for r in ROWS], **opts)
    L, empty = ref_table[:, :n], ref_table[:, n]
    ref_xp = [L[i, i] - np.mean([L[i, c] for c in comp[i]]) for i in range(n)]
    ref_xr = [(L[i, i] - empty[i]) - np.mean([L[c, i] - empty[c] for c in comp[i]]) for i in range(n)]
    got_xp = xprompt(llama.model, llama.tokenizer, ROWS, **ENCODE, **opts)
    got_xr = xresponse(llama.model, llama.tokenizer, ROWS, **ENCODE, **opts)
    np.testing.assert_allclose(got_xp, ref_xp, atol=1e-5)
    np.testing.assert_allclose(got_xr, ref_xr, atol=1e-5)
    together = pair_scores(
        ["xprompt", "pmi", "xresponse"], llama.model, llama.tokenizer, ROWS, **ENCODE, **opts
    )
    np.testing.assert_allclose(together["xprompt"], got_xp, atol=1e-5)
    np.testing.assert_allclose(together["xresponse"], got_xr, atol=1e-5)
    np.testing.assert_allclose(together["pmi"], np.diag(L) - empty, atol=1e-5)


def test_label_margin_matches_loop(bert):
    rows = [{"id": str(i), "text": "word " * (i + 1) + "good film", "label": i % 3} for i in range(7)]
    got = label_margin(bert.model, bert.tokenizer, rows, max_length=64, batch_size=3)
    ref = []
    with torch.no_grad():
        for row in rows:
            ids = bert.tokenizer(row["text"])["input_ids"]
            logits = bert.model(input_ids=torch.tensor([ids])).logits.double()
            ce = [F.cross_entropy(logits, torch.tensor([y])).item() for y in range(3)]
            ref.append(ce[row["label"]] - min(c for y, c in enumerate(ce) if y != row["label"]))
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_prompt_embeddings_are_mean_prompt_hidden_states(llama):
    got = prompt_embeddings(llama.model, llama.tokenizer, ROWS[:4], batch_size=3)
    with torch.no_grad():
        for row, vec in zip(ROWS[:4], got, strict=True):
            prompt = llama.tokenizer(format_prompt(row))["input_ids"]
            response = llama.tokenizer(row["output"], add_special_tokens=False)["input_ids"]
            ids = prompt + response + [llama.tokenizer.eos_token_id]
            hidden = llama.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
            np.testing.assert_allclose(vec, hidden[0, : len(prompt)].double().mean(0).numpy(), atol=1e-5)


def test_random_competitors_seeded_distinct_never_self():
    ids = [f"row{i}" for i in range(30)]
    comp = random_competitors(ids, 4, seed=7)
    assert comp.shape == (30, 4)
    assert np.array_equal(comp, random_competitors(ids, 4, seed=7))
    assert not np.array_equal(comp, random_competitors(ids, 4, seed=8))
    assert all(i not in comp[i] and len(set(comp[i])) == 4 for i in range(30))
    assert comp.min() >= 0 and comp.max() < 30
    # the same row gets the same competitor ids whatever the row order
    perm = np.random.default_rng(0).permutation(30)
    shuffled = random_competitors([ids[j] for j in perm], 4, seed=7)
    for pos, j in enumerate(perm):
        assert [ids[perm[c]] for c in shuffled[pos]] == [ids[c] for c in comp[j]]
    # k = n - 1 takes every other row
    full = random_competitors(ids[:5], 4, seed=0)
    assert all(sorted(full[i]) == [j for j in range(5) if j != i] for i in range(5))


def test_nearest_competitors_pick_highest_cosine():
    emb = np.random.default_rng(3).normal(size=(25, 6))
    got = nearest_competitors(emb, 3, chunk_elements=40)  # several chunks
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    np.testing.assert_array_equal(got, np.argsort(-sim, axis=1)[:, :3])
    # scaling a vector does not change cosine neighbours; an exact duplicate direction is nearest
    emb2 = emb.copy()
    emb2[10] = 5.0 * emb[4]
    assert nearest_competitors(emb2, 1)[4, 0] == 10 and nearest_competitors(emb2, 1)[10, 0] == 4


def test_xresponse_cancels_response_difficulty_and_prompt_effect():
    """With L(y|x) = d(y) + e(x) + g(x, y), xresponse depends only on g; xprompt does not depend on d."""
    rng = np.random.default_rng(0)
    n, k = 8, 3
    g = rng.normal(size=(n, n + 1))  # g[response, prompt]; last column: empty instruction
    d, e = rng.normal(size=n) * 10, np.append(rng.normal(size=n) * 10, 0.0)
    comp = random_competitors([str(i) for i in range(n)], k, seed=1)

    def evaluate(plan, table):
        cols = np.where(plan.pairs[:, 1] == EMPTY, n, plan.pairs[:, 1])
        return plan.combine(table[plan.pairs[:, 0], cols])

    full = g + d[:, None] + e[None, :]
    np.testing.assert_allclose(
        evaluate(xresponse_plan(comp), full), evaluate(xresponse_plan(comp), g), atol=1e-9
    )
    hand = [(g[i, i] - g[i, n]) - np.mean([g[c, i] - g[c, n] for c in comp[i]]) for i in range(n)]
    np.testing.assert_allclose(evaluate(xresponse_plan(comp), g), hand, atol=1e-12)
    with_d = g + d[:, None]
    np.testing.assert_allclose(
        evaluate(xprompt_plan(comp), with_d), evaluate(xprompt_plan(comp), g), atol=1e-9
    )
    assert not np.allclose(evaluate(xprompt_plan(comp), full), evaluate(xprompt_plan(comp), g))


def test_swapped_pairs_stand_out_on_a_separable_toy():
    """A loss table where every response fits its own prompt best except two swapped rows."""
    n = 10
    table = np.full((n, n + 1), 3.0)
    np.fill_diagonal(table, 1.0)
    # rows 2 and 7 hold each other's response: each fits the other's prompt
    table[[2, 7], [2, 7]], table[2, 7], table[7, 2] = 3.0, 1.0, 1.0
    table += np.arange(n)[:, None] * 0.5  # responses of varied difficulty
    comp = random_competitors([str(i) for i in range(n)], 4, seed=0)
    for plan in (xprompt_plan(comp), xresponse_plan(comp)):
        cols = np.where(plan.pairs[:, 1] == EMPTY, n, plan.pairs[:, 1])
        values = plan.combine(table[plan.pairs[:, 0], cols])
        assert set(np.argsort(-values)[:2]) == {2, 7}


def test_bad_options_are_one_line_errors(llama, bert):
    ids = [r["id"] for r in ROWS]
    for k in (0, len(ROWS), -1, True, 2.5):
        with pytest.raises(InfscopeError, match="k="):
            random_competitors(ids, k)
    with pytest.raises(InfscopeError, match="k="):
        xprompt(llama.model, llama.tokenizer, ROWS, k=len(ROWS))
    with pytest.raises(InfscopeError, match="k="):
        nearest_competitors(np.ones((3, 2)), 3)
    with pytest.raises(InfscopeError, match="embeddings"):
        competitor_index(ids, 2, competitors="nearest")
    with pytest.raises(InfscopeError, match="one embedding per row"):
        competitor_index(ids, 2, competitors="nearest", embeddings=np.ones((2, 3)))
    with pytest.raises(InfscopeError, match="unknown competitors"):
        competitor_index(ids, 2, competitors="closest")
    with pytest.raises(InfscopeError, match="no option 'k'"):
        pair_score("pmi", llama.model, llama.tokenizer, ROWS, k=2)
    with pytest.raises(InfscopeError, match="unknown pair score"):
        pair_score("pmx", llama.model, llama.tokenizer, ROWS)
    with pytest.raises(InfscopeError, match="causal scores only"):
        pair_scores(["pmi", "label_margin"], llama.model, llama.tokenizer, ROWS)
    with pytest.raises(InfscopeError, match="shape"):
        pair_losses(llama.model, llama.tokenizer, ROWS, [0, 1])
    with pytest.raises(InfscopeError, match="indices"):
        pair_losses(llama.model, llama.tokenizer, ROWS, [[0, len(ROWS)]])
    with pytest.raises(InfscopeError, match="no rows"):
        pmi(llama.model, llama.tokenizer, [])
    with pytest.raises(InfscopeError, match="classifier has 3 outputs") as info:
        label_margin(bert.model, bert.tokenizer, [{"id": "1", "text": "good", "label": 5}])
    assert "\n" not in str(info.value)


def test_registry_is_uniform(llama):
    assert set(PAIR_SCORES) == set(PAIR_TASKS)
    for name in PAIR_SCORES:
        assert pair_options(name)[:3] == ["max_length", "batch_size", "response_only"]
    got = pair_score("xprompt", llama.model, llama.tokenizer, ROWS[:4], k=1, seed=2, batch_size=4)
    np.testing.assert_allclose(got, xprompt(llama.model, llama.tokenizer, ROWS[:4], k=1, seed=2), atol=1e-5)


def test_swapped_rows_get_the_largest_xprompt_after_training(llama):
    """Tiny-llama trained a few steps on clean word-repeat pairs; two rows then hold each other's response.

    Over 3 model seeds the swapped rows lead by a margin of more than 1 nat, so this does not flip.
    """
    words = ["cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "sky", "sea", "river", "mountain"]
    clean = [
        {
            "id": f"r{i}",
            "instruction": f"Say the word {w} three times.",
            "input": "",
            "output": f"{w} {w} {w}",
        }
        for i, w in enumerate(words)
    ]
    model, tok = copy.deepcopy(llama.model), llama.tokenizer  # a copy: the fixture model stays untrained
    batch = next(batches(encode_rows(clean, tok, task="causal"), len(clean)))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        optimizer.zero_grad()
        forward_losses(model, batch, torch.device("cpu")).mean().backward()
        optimizer.step()
    model.eval()
    noisy = [dict(r) for r in clean]
    noisy[3]["output"], noisy[8]["output"] = clean[8]["output"], clean[3]["output"]
    values = xprompt(model, tok, noisy, k=3, seed=0, batch_size=12)
    assert set(np.argsort(-values)[:2]) == {3, 8}


def test_response_competitors_are_the_rows_whose_responses_share_the_most_words():
    from infscope.estimators.pair import competitor_index, response_words

    rows = [
        {"id": "a", "instruction": "x", "input": "", "output": "red apples and green pears"},
        {"id": "b", "instruction": "y", "input": "", "output": "blue sky over the sea"},
        {"id": "c", "instruction": "z", "input": "", "output": "green pears and red apples today"},
        {"id": "d", "instruction": "w", "input": "", "output": "the sea is blue"},
    ]
    words = response_words(rows)
    np.testing.assert_allclose(np.linalg.norm(words, axis=1), 1.0, rtol=1e-6)
    comp = competitor_index([r["id"] for r in rows], 1, competitors="response", embeddings=words)
    assert comp[:, 0].tolist() == [2, 3, 0, 1]


def test_xprompt_min_aggregate_takes_the_best_competitor():
    from infscope.errors import InfscopeError
    from infscope.estimators.pair import xprompt_plan

    comp = np.array([[1, 2], [0, 2], [0, 1]])
    plan = xprompt_plan(comp, "min")
    own = np.array([3.0, 1.0, 2.0])
    cross = np.array([2.5, 4.0, 0.5, 0.7, 1.0, 9.0])  # row 0 vs rows 1, 2; row 1 vs 0, 2; row 2 vs 0, 1
    np.testing.assert_allclose(plan.combine(np.concatenate([own, cross])), [3.0 - 2.5, 1.0 - 0.5, 2.0 - 1.0])
    np.testing.assert_allclose(
        xprompt_plan(comp).combine(np.concatenate([own, cross])), [3.0 - 3.25, 1.0 - 0.6, 2.0 - 5.0]
    )
    with pytest.raises(InfscopeError, match="aggregate"):
        xprompt_plan(comp, "median")
