"""Evaluator metrics on hand-worked examples and against independent implementations (no model)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rsclip_jax.evaluate.counting import candidate_captions, counting_metrics
from rsclip_jax.evaluate.fewshot import fewshot, sample_shots
from rsclip_jax.evaluate.knn import knn_classify
from rsclip_jax.evaluate.linear_probe import (
    ProbeConfig,
    fit_logistic_regression,
    linear_probe,
    select_l2,
    validation_split,
)
from rsclip_jax.evaluate.tasks import FewShot
from rsclip_jax.evaluate.retrieval import METRIC_KEYS, recall_curve, retrieval_metrics, retrieval_ranks
from rsclip_jax.evaluate.tsne import tsne
from rsclip_jax.evaluate.zeroshot import zeroshot_metrics

# -- retrieval -----------------------------------------------------------------------------------

def test_retrieval_hand_worked_example_with_ties_and_several_captions():
    # 3 images, 6 captions: image 0 owns captions 0, 1; image 1 owns 2, 3, 4; image 2 owns 5.
    # Scores text x image, written out (embeddings chosen so that text @ image.T is this matrix).
    scores = np.array([
        [0.9, 0.1, 0.0],   # t0 (img 0): its image ranks 1st
        [0.2, 0.2, 0.1],   # t1 (img 0): tie with img 1; the lower index (img 0) wins -> rank 0
        [0.5, 0.5, 0.0],   # t2 (img 1): tie with img 0, which has the lower index -> rank 1
        [0.0, 0.3, 0.4],   # t3 (img 1): rank 1
        [0.1, 0.0, 0.2],   # t4 (img 1): rank 2
        [0.3, 0.6, 0.6],   # t5 (img 2): tie with img 1 (lower index) -> rank 1
    ])
    image_emb = np.eye(3)
    t2i = [0, 0, 1, 1, 1, 2]
    i2t, t2i_rank = retrieval_ranks(image_emb, scores, t2i)
    assert t2i_rank.tolist() == [0, 0, 1, 1, 2, 1]
    # Image columns: img 0 = [.9,.2,.5,0,.1,.3] -> t0 first: rank 0.
    # img 1 = [.1,.2,.5,.3,0,.6]: t5 (.6) beats its best caption t2 (.5): rank 1.
    # img 2 = [0,.1,0,.4,.2,.6]: its caption t5 is the highest: rank 0.
    assert i2t.tolist() == [0, 1, 0]
    m = retrieval_metrics(image_emb, scores, t2i)
    assert m["image_to_text_R@1"] == pytest.approx(200 / 3)
    assert m["image_to_text_R@5"] == 100.0
    assert m["text_to_image_R@1"] == pytest.approx(100 * 2 / 6)
    assert m["text_to_image_R@5"] == 100.0 and m["text_to_image_R@10"] == 100.0
    assert m["mean_recall"] == pytest.approx(np.mean([m[k] for k in METRIC_KEYS[:-1]]))
    assert list(m) == list(METRIC_KEYS)


def _brute_force(img: np.ndarray, txt: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    """Independent: full sorts with an explicit (score desc, index asc) key, hit-rate per query."""
    s = txt @ img.T
    out = {}
    for k in (1, 5, 10):
        hits = 0
        for i in range(img.shape[0]):
            order = sorted(range(len(txt)), key=lambda j: (-s[j, i], j))[:k]
            hits += any(t2i[j] == i for j in order)
        out[f"image_to_text_R@{k}"] = 100.0 * hits / img.shape[0]
    for k in (1, 5, 10):
        hits = 0
        for j in range(len(txt)):
            order = sorted(range(img.shape[0]), key=lambda i: (-s[j, i], i))[:k]
            hits += t2i[j] in order
        out[f"text_to_image_R@{k}"] = 100.0 * hits / len(txt)
    out["mean_recall"] = sum(out.values()) / 6
    return out


@pytest.mark.parametrize("quantise", [False, True])
def test_retrieval_matches_brute_force_on_random_embeddings(quantise):
    rng = np.random.default_rng(7)
    img, txt = rng.normal(size=(23, 8)), rng.normal(size=(97, 8))
    if quantise:  # coarse values: many exact score ties
        img, txt = np.round(img), np.round(txt)
    t2i = np.sort(np.concatenate([np.arange(23), rng.integers(0, 23, 97 - 23)]))  # 1..several per image
    got, want = retrieval_metrics(img, txt, t2i), _brute_force(img, txt, t2i)
    for k in METRIC_KEYS:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k
    i2t, t2i_rank = retrieval_ranks(img, txt, t2i)
    curve = recall_curve(t2i_rank, 10)
    assert [curve[0], curve[4], curve[9]] == pytest.approx([got[f"text_to_image_R@{k}"] for k in (1, 5, 10)])
    assert recall_curve(i2t, 97)[-1] == 100.0


# -- zero-shot, k-NN, counting ---------------------------------------------------------------------

def test_zeroshot_metrics_hand_worked():
    classes = np.eye(3)
    images = np.array([[1, 0.1, 0], [0.2, 1, 0], [0, 0.9, 1], [0, 0.5, 0.4], [0.1, 0, 1]])
    labels = np.array([0, 1, 2, 2, 2])  # predictions: 0, 1, 2, 1, 2
    m = zeroshot_metrics(images, labels, classes)
    assert m["top1"] == 80.0 and m["top5"] == 100.0
    assert m["per_class"] == pytest.approx([100.0, 100.0, 200 / 3])
    assert m["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 2]]


def test_knn_hand_worked_and_against_a_loop():
    train = np.array([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    train /= np.linalg.norm(train, axis=1, keepdims=True)
    test = np.array([[1.0, 0.05]]) / np.linalg.norm([1.0, 0.05])
    # k=3: neighbours 0, 1 (class 0) and 3 (class 1); class 0 wins with two heavy votes.
    m = knn_classify(train, np.array([0, 0, 1, 1]), test, np.array([0]), 2, k=3, temperature=0.07)
    assert m["top1"] == 100.0 and m["k"] == 3

    rng = np.random.default_rng(3)
    tr = rng.normal(size=(60, 5))
    tr /= np.linalg.norm(tr, axis=1, keepdims=True)
    te = rng.normal(size=(25, 5))
    te /= np.linalg.norm(te, axis=1, keepdims=True)
    ytr, yte = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
    expected = []
    for q in te:  # the DINO vote, written as a loop
        sims = tr @ q
        votes = np.zeros(4)
        for j in np.argsort(-sims)[:20]:
            votes[ytr[j]] += np.exp(sims[j] / 0.1)
        expected.append(np.argmax(votes))
    got = knn_classify(tr, ytr, te, yte, 4, k=20, temperature=0.1)
    assert got["top1"] == pytest.approx(100 * np.mean(np.array(expected) == yte))


def test_counting_topk_hand_worked():
    assert candidate_captions("There are {} trees .")[2] == "There are 3 trees ."
    numbers = (1, 2, 3)
    img = np.array([[1.0, 0], [0, 1.0]])
    cand = np.array([[[0.2, 0], [0.9, 0], [0.5, 0]],   # image 0 (true 2): its caption is best -> rank 0
                     [[0, 0.7], [0, 0.7], [0, 0.1]]])  # image 1 (true 2): tie with "1", lower first -> rank 1
    m = counting_metrics(img, cand, np.array([2, 2]), numbers)
    assert (m["top1"], m["top2"], m["top3"]) == (50.0, 100.0, 100.0)
    assert m["per_count_top1"] == {"2": 50.0}


# -- linear probe and few-shot ---------------------------------------------------------------------

def _mixture(seed: int, n: int = 1000, classes: int = 8, dim: int = 24):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * 0.4
    y = rng.integers(0, classes, n)
    x = means[y] + rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_linear_probe_within_half_a_point_of_sklearn():
    from sklearn.linear_model import LogisticRegression

    x, y = _mixture(0)
    xtr, ytr, xte, yte = x[:600], y[:600], x[600:], y[600:]
    ours = linear_probe(xtr, ytr, xte, yte, 8)
    assert ours["l2_selection"] == "validation" and len(ours["val_accuracy"]) == 6
    # The same objective in scikit-learn: C = 1 / (l2 * N).
    sk = LogisticRegression(C=1.0 / (ours["l2"] * len(xtr)), max_iter=5000, tol=1e-8).fit(xtr, ytr)
    assert abs(ours["top1"] - 100 * sk.score(xte, yte)) <= 0.5
    assert ours["top1"] > 100 / 8 + 20  # far above chance: the solver actually fits
    W, _, _ = fit_logistic_regression(xtr, ytr, 8, (ours["l2"],) * 2)  # the probe's compiled shape (2 fits)
    np.testing.assert_allclose(W[0], sk.coef_.T, atol=5e-3 * np.abs(sk.coef_).max())
    again = linear_probe(xtr, ytr, xte, yte, 8)
    assert again == ours  # deterministic


def test_validation_split_and_default_regularisation():
    y = np.array([0] * 10 + [1] * 5 + [2] * 2)
    tr, va = validation_split(y, 0.2, seed=0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(17))
    assert np.bincount(y[va]).tolist() == [2, 1, 1] and set(y[tr]) == {0, 1, 2}
    assert validation_split(np.array([0, 0, 1]), 0.2, 0) is None  # class 1 has one image
    x, yy = _mixture(2, n=200, classes=4)
    one_shot = np.array([np.flatnonzero(yy == c)[0] for c in range(4)])
    r = linear_probe(x[one_shot], yy[one_shot], x, yy, 4, ProbeConfig(default_l2=0.05), pad_to=128)
    assert r["l2_selection"] == "default" and r["l2"] == 0.05


def _clustered(seed: int, n: int, classes: int = 4, dim: int = 64, spread: float = 0.3):
    """Balanced class clusters around a large common direction, L2-normalised, as CLIP embeddings are."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(classes, dim)) * spread
    y = np.arange(n) % classes
    x = means[y] + rng.normal(size=(n, dim)) + 2.0
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_probe_choice_and_accuracies_ignore_last_bit_noise():
    """Embeddings from meshes with another number of rows per device differ by up to ~1e-7.
    Features perturbed by ±1e-7 must change neither the validation scores, nor the chosen l2,
    nor any accuracy. Five images per class leave one validation image per class, so one flipped
    image moves a validation score by 25 points. (The former float32 solve, stopped at gradient
    norm 1e-5, fails here: its weakly regularised fits flip validation images.)"""
    keys = ("l2", "l2_selection", "val_accuracy", "top1", "top5", "per_class")
    for seed in (0, 2):
        x, y = _clustered(seed, 1020)
        xtr, ytr, xte, yte = x[:20], y[:20], x[20:], y[20:]
        base = linear_probe(xtr, ytr, xte, yte, 4)
        assert base["l2_selection"] == "validation" and base["converged"]
        rng = np.random.default_rng(100 + seed)
        for _ in range(3):
            def noisy(a):
                return (a + 1e-7 * rng.choice([-1, 1], a.shape)).astype(np.float32)

            r = linear_probe(noisy(xtr), ytr, noisy(xte), yte, 4)
            assert {k: r[k] for k in keys} == {k: base[k] for k in keys}


def test_l2_choice_counts_validation_images_and_ties_go_to_the_larger_l2():
    assert select_l2({1e-6: 3, 1e-4: 4, 1e-2: 4, 1e-1: 2}) == 1e-2
    assert select_l2({1e-6: 5, 1e-4: 4, 1e-1: 4}) == 1e-6
    # Well-separated classes: every l2 classifies the validation images alike, so the largest wins.
    x, y = _clustered(1, 40, spread=3.0)
    r = linear_probe(x[:20], y[:20], x[20:], y[20:], 4)
    assert set(r["val_accuracy"].values()) == {100.0} and r["l2"] == 0.1 and r["top1"] == 100.0


def test_fewshot_options_are_checked_and_n_may_exceed_a_class():
    x, y = _mixture(2, n=200, classes=4)
    xtr, ytr, xte, yte = x[:120], y[:120], x[120:], y[120:]
    with pytest.raises(ValueError, match=r"shots \(--shots, or the task's 'shots'\) must be a list of positive "
                                         r"integers .*: 0 is not one; pass e.g. --shots 1,2,4"):
        fewshot(xtr, ytr, xte, yte, 4, shots=(0, 1))
    with pytest.raises(ValueError, match=r"seeds \(--seeds, or the task's 'seeds'\).*-1 is not one"):
        fewshot(xtr, ytr, xte, yte, 4, shots=(1,), seeds=(-1,))
    for shots in ([1, -2], [2.5], [], 4):  # a task spec is checked when it is built, before any model loads
        with pytest.raises(ValueError, match="the task's 'shots'"):
            FewShot(root="not/read/yet", shots=shots)
    # Class 3 has 3 training images: at n = 8 it gives all 3, which is recorded.
    keep = np.concatenate([np.flatnonzero(ytr != 3), np.flatnonzero(ytr == 3)[:3]])
    r = fewshot(xtr[keep], ytr[keep], xte, yte, 4, shots=(2, 8), seeds=(0, 1))["shots"]
    assert (r["8"]["effective_shots"], r["8"]["min_shots"]) == (8, 3)
    assert (r["2"]["effective_shots"], r["2"]["min_shots"]) == (2, 2)


def test_fewshot_sampling_and_cap():
    y = np.array([0] * 5 + [1] * 3)
    idx = sample_shots(y, 4, seed=0)
    assert np.bincount(y[idx]).tolist() == [4, 3]  # class 1 has only 3
    assert sample_shots(y, 2, 0).tolist() == sample_shots(y, 2, 0).tolist()
    assert any(sample_shots(y, 2, 0).tolist() != sample_shots(y, 2, s).tolist() for s in range(1, 5))
    x, yy = _mixture(2, n=200, classes=4)
    r = fewshot(x[:120], yy[:120], x[120:], yy[120:], 4, shots=(1, 4, 1000), seeds=(0, 1, 2))
    s = r["shots"]
    assert s["1000"]["effective_shots"] == max(np.bincount(yy[:120]))
    assert s["1000"]["std"] == 0.0  # every seed draws the whole training set
    assert s["1"]["std"] > 0 and len(s["4"]["runs"]) == 3
    assert s["4"]["mean"] == pytest.approx(np.mean(s["4"]["runs"]))


def test_tsne_separates_clusters_deterministically():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    y = np.repeat(np.arange(3), 30)
    x = centres[y] + rng.normal(size=(90, 16))
    z = tsne(x, perplexity=15, iterations=300)
    np.testing.assert_array_equal(z, tsne(x, perplexity=15, iterations=300))
    # Every point's nearest other point in 2-D has its class.
    d = np.linalg.norm(z[:, None] - z[None], axis=-1) + np.eye(90) * 1e9
    assert (y[np.argmin(d, axis=1)] == y).all()
    for i, j in itertools.combinations(range(3), 2):
        between = np.linalg.norm(z[y == i].mean(0) - z[y == j].mean(0))
        assert between > 2 * np.linalg.norm(z[y == i] - z[y == i].mean(0), axis=1).mean()
