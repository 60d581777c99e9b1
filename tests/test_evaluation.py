"""bigdit.evaluation and tools/evaluate.py: the metric math on synthetic features (exact answers, independent
computations), the Inception wrapper with random weights loaded through the real loading code, ADM-format
batches, the input checks, and the tool end to end (FD-DINOv2 and CLIP score with tiny random models)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy import linalg

from bigdit.evaluation.inception import SPATIAL_DIM, load_inception, spatial_features
from bigdit.evaluation.reference import NpzArray, read_batch, write_reference
from bigdit.evaluation.runner import evaluate, rank_slice
from bigdit.evaluation.stats import (InceptionScoreAccumulator, ManifoldEstimator, MomentAccumulator,
                                     frechet_distance, inception_score, local_reduce, precision_recall)

from conftest import REPO, image

CONFIG_DIR = str(REPO / "configs")


def _tool():
    spec = importlib.util.spec_from_file_location("bigdit_tool_evaluate", REPO / "tools" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


evaluate_tool = _tool()


def tool(**overrides) -> dict:
    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("evaluate", overrides=[f"{k}={v}" for k, v in {"progress": False, **overrides}.items()])
    return evaluate_tool.run(cfg)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def inception(inception_weights):
    return load_inception(inception_weights, "cpu", batch_size=3)


def images(n: int, seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def batches(tmp_path_factory) -> dict[str, Path]:
    """A 4-image sample batch (tools/sample.py's layout: arr_0, arr_1 prompt indices, prompts.txt) and a 4-image
    reference batch holding only arr_0 (precision/recall with k = 3 need 4)."""
    d = tmp_path_factory.mktemp("batches")
    (d / "run" / "samples").mkdir(parents=True)
    samples = d / "run" / "samples" / "samples.npz"
    np.savez(samples, images(4, 1), np.array([0, 0, 1, 2]))
    (samples.parent / "prompts.txt").write_text("a red bus\ntwo cats\na bowl of soup\n")
    np.savez(d / "ref.npz", images(4, 2))
    return {"samples": samples, "ref": d / "ref.npz", "dir": d}


@pytest.fixture(scope="session")
def features(batches, inception) -> dict[str, dict[str, torch.Tensor]]:
    """The Inception features of both batches, computed once (batches of 2, as the tool runs)."""
    return {k: inception.features(np.load(batches[k])["arr_0"]) for k in ("samples", "ref")}


#: the tool's settings for the 4-image batches (the eigh Fréchet distance: scipy's sqrtm of a 2048x2048
#: product takes minutes on two busy cores; the two methods agree, see test_fid_methods_agree)
SMALL = {"num_samples": 4, "is_split_size": 2, "batch_size": 2, "fid_method": "eigh"}


@pytest.fixture(scope="session")
def tool_result(batches, inception_weights, tiny_dinov2, tiny_clip) -> dict:
    """tools/evaluate.py on the 4-image batches, with FD-DINOv2 and the CLIP score (tiny random models)."""
    (dino, arch), (clip_cfg, clip_pt) = tiny_dinov2, tiny_clip
    return tool(samples=batches["samples"], ref=batches["ref"], inception_weights=inception_weights, **SMALL,
                dinov2_weights=dino, dinov2_model="vit_small_patch14_dinov2",
                dinov2_arch="{" + ",".join(f"{k}:{v}" for k, v in arch.items()) + "}",
                clip_model="tiny-clip-test", clip_pretrained=clip_pt, clip_model_config=clip_cfg)


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> tuple[Path, dict]:
    """A 1-block DINOv2-style ViT (timm) at DINOv2's 518x518 grid, saved in DINOv2's checkpoint format."""
    import timm

    arch = {"depth": 1, "embed_dim": 32, "num_heads": 2}
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, **arch)
    sd = dict(vit.state_dict(), mask_token=torch.zeros(1, 32))
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_tiny_pretrain.pth"
    torch.save(sd, path)
    return path, arch


# ------------------------------------------------------------------------------------------ FID / sFID


def test_moments_are_numpys_mean_and_unbiased_cov():
    x = np.random.default_rng(0).normal(2.0, 3.0, (300, 16))
    mu, sigma = MomentAccumulator(16).update(x[:100]).update(x[100:]).mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_fid_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(2000, 256)) ** 2  # non-negative, skewed: like pool_3 features
    mu, sigma = MomentAccumulator(256).update(x).mean_cov()
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_equals_an_independent_computation():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(800, 32)) @ rng.normal(size=(32, 32))
    b = rng.normal(0.3, 1.0, size=(700, 32)) @ rng.normal(size=(32, 32))
    fid = frechet_distance(*MomentAccumulator(32).update(a).mean_cov(), *MomentAccumulator(32).update(b).mean_cov())
    # the textbook formula with numpy's statistics and scipy's sqrtm, on the same features
    m1, m2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    # and tr sqrt(S1 S2) from eigenvalues of sqrt(S1) S2 sqrt(S1) (symmetric, no sqrtm of a product)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w)) @ v.T
    eig = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    ref2 = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
    assert fid > 1
    assert fid == pytest.approx(ref, rel=1e-9)
    assert fid == pytest.approx(ref2, rel=1e-7)


def test_fid_methods_agree():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(900, 128)) ** 2, rng.normal(0.2, 1.1, size=(700, 128)) ** 2
    sa, sb = MomentAccumulator(128).update(a).mean_cov(), MomentAccumulator(128).update(b).mean_cov()
    assert frechet_distance(*sa, *sb, method="eigh") == pytest.approx(frechet_distance(*sa, *sb), rel=1e-9)
    assert abs(frechet_distance(*sa, *sa, method="eigh")) < 1e-6
    with pytest.raises(ValueError, match="method="):
        frechet_distance(*sa, *sb, method="svd")


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")
def test_singular_covariances_and_mismatched_shapes():
    s = np.diag([1.0, 0.0])  # sqrtm of a singular product (fewer samples than dimensions)
    with np.errstate(all="ignore"):
        assert frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="different lengths"):
        frechet_distance(np.zeros(2), s, np.zeros(3), np.eye(3))


def test_sfid_features_are_the_first_7_channels_flattened_channels_last():
    m = torch.arange(2 * 192 * 17 * 17, dtype=torch.float32).reshape(2, 192, 17, 17)
    f = spatial_features(m)
    assert f.shape == (2, SPATIAL_DIM) == (2, 2023)
    n, c, h, w = 1, 5, 3, 11
    assert f[n, (h * 17 + w) * 7 + c] == m[n, c, h, w]
    adm = m.numpy().transpose(0, 2, 3, 1)[..., :7].reshape(2, -1)  # ADM: spatial[..., :7] of NHWC, reshaped
    np.testing.assert_array_equal(f.numpy(), adm)


def test_two_ranks_sums_equal_one_rank():
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(101, 8)))
    logits = torch.from_numpy(np.random.default_rng(4).normal(size=(101, 1008)) * 3)
    whole = MomentAccumulator(8).update(x)
    parts = [MomentAccumulator(8).update(x[slice(*rank_slice(101, r, 2))]) for r in range(2)]
    merged = parts[0].merge(parts[1])
    assert merged.n == whole.n == 101
    for a, b in zip(merged.mean_cov(), whole.mean_cov()):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # the IS split sums of slices land in the same global splits
    isc = InceptionScoreAccumulator(split_size=20)
    for r in range(2):
        a, b = rank_slice(101, r, 2)
        isc.update(logits[a:b], start=a)
    assert isc.compute(local_reduce) == pytest.approx(inception_score(logits, split_size=20), rel=1e-12)
    assert rank_slice(101, 0, 2) == (0, 51) and rank_slice(101, 1, 2) == (51, 101)


# ------------------------------------------------------------------------------------------ IS


def adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """ADM's compute_inception_score on softmax(logits), written out in numpy."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = e / e.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def test_inception_score_of_uniform_logits_is_1_and_of_one_hot_logits_the_class_count():
    assert inception_score(np.zeros((50, 1008))) == pytest.approx(1.0, abs=1e-12)
    one_hot = np.eye(1008)[np.arange(2 * 1008) % 1008] * 100.0
    assert inception_score(one_hot, split_size=1008) == pytest.approx(1008, rel=1e-9)
    ten = np.eye(1008)[np.arange(40) % 10] * 100.0  # 10 classes, each split holds all of them equally
    assert inception_score(ten, split_size=20) == pytest.approx(10, rel=1e-9)


def test_inception_score_matches_adm_with_contiguous_splits():
    logits = np.random.default_rng(5).normal(size=(37, 1008)) * 4
    assert inception_score(logits, split_size=10) == pytest.approx(adm_inception_score(logits, 10), rel=1e-9)
    # contiguous, not shuffled: moving samples between splits changes the score
    swapped = logits[np.r_[np.arange(10, 20), np.arange(0, 10), np.arange(20, 37)]]
    assert inception_score(swapped, split_size=10) == pytest.approx(inception_score(logits, split_size=10))
    mixed = logits[np.random.default_rng(0).permutation(37)]
    assert inception_score(mixed, split_size=10) != pytest.approx(inception_score(logits, split_size=10), rel=1e-6)


def test_inception_score_refuses_overlapping_slices():
    isc = InceptionScoreAccumulator(split_size=5)
    isc.update(np.zeros((4, 1008)), start=0)
    isc.update(np.zeros((4, 1008)), start=2)  # overlaps: samples 2, 3 twice
    with pytest.raises(ValueError, match="overlap|start="):
        isc.compute(local_reduce)


# ------------------------------------------------------------------------------------------ precision/recall


def test_precision_recall_on_point_clouds_with_known_answers():
    line = lambda xs: np.stack([np.asarray(xs, float), *[np.zeros(len(xs))] * 3], 1)  # noqa: E731
    ref = line(range(10))                            # points 0..9
    samples = line([0, 1, 2, 3, 4, 100, 101, 102, 103, 104])
    # samples 0..4 sit on reference points (inside), 100..104 far away: precision 5/10. Sample radii (3rd NN,
    # squared): 9 at 0 and 4, 4 at 1..3; reference 0..7 lie within (7 is 3 from sample 4), 8 and 9 do not.
    for rb, cb in ((10000, 10000), (3, 4)):
        p, r = precision_recall(ref, samples, k=3, row_batch_size=rb, col_batch_size=cb)
        assert (p, r) == (0.5, 0.8)
    assert precision_recall(ref, ref) == (1.0, 1.0)
    assert precision_recall(ref, ref + 1000.0) == (0.0, 0.0)


def brute_force_pr(ref: np.ndarray, samples: np.ndarray, k: int) -> tuple[float, float]:
    d_rr = ((ref[:, None] - ref[None]) ** 2).sum(-1)
    d_ss = ((samples[:, None] - samples[None]) ** 2).sum(-1)
    d_rs = ((ref[:, None] - samples[None]) ** 2).sum(-1)
    r_ref = np.sort(d_rr, 1)[:, k]
    r_smp = np.sort(d_ss, 1)[:, k]
    precision = (d_rs <= r_ref[:, None]).any(0).mean()
    recall = (d_rs <= r_smp[None, :]).any(1).mean()
    return float(precision), float(recall)


def test_precision_recall_match_a_brute_force_manifold_in_any_blocks():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(60, 5)).astype(np.float32)
    samples = (rng.normal(size=(45, 5)) * 1.4 + 0.5).astype(np.float32)
    want = brute_force_pr(ref.astype(np.float64), samples.astype(np.float64), 3)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    for rb, cb in ((10000, 10000), (7, 5), (1, 64)):
        assert precision_recall(ref, samples, row_batch_size=rb, col_batch_size=cb) == pytest.approx(want, abs=1e-12)
    est = ManifoldEstimator(half=True)  # ADM's float16 distance blocks
    assert est.evaluate_pr(ref, est.radii(ref), samples, est.radii(samples)) == pytest.approx(want, abs=0.05)
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(ref[:3], samples)


# ------------------------------------------------------------------------------------------ the network


@pytest.mark.slow
def test_inception_features_are_torch_fidelitys_with_mixed_6d_branch1x1_as_mixed_6_conv(inception, inception_weights):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = images(2, 7)
    f = inception.features(x)
    assert f["pool"].shape == (2, 2048) and f["spatial"].shape == (2, 2023) and f["logits"].shape == (2, 1008)
    assert f["pool"].std() > 1e-3 and torch.isfinite(f["logits"]).all()
    base = FeatureExtractorInceptionV3("plain", ["2048", "logits_unbiased"],
                                       feature_extractor_weights_path=str(inception_weights))
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        pool, logits = base(t)
        torch.testing.assert_close(f["pool"], pool, rtol=0, atol=0)
        torch.testing.assert_close(f["logits"], pool @ base.fc.weight.T, rtol=1e-5, atol=1e-6)  # no bias
        # mixed_6/conv:0 by hand: TF resize + (x - 128) / 128, the stem, Mixed_5b..Mixed_6c, then the 1x1 branch
        h = interpolate_bilinear_2d_like_tensorflow1x(t.float(), size=(299, 299), align_corners=False)
        h = (h - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            h = getattr(base, name)(h)
        m6 = base.Mixed_6d.branch1x1(h)
    assert m6.shape == (2, 192, 17, 17) and (m6 >= 0).all()  # after BN and ReLU
    torch.testing.assert_close(f["spatial"], m6[:, :7].permute(0, 2, 3, 1).reshape(2, -1), rtol=0, atol=0)


def test_missing_or_wrong_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="6726825d.*download https://github.com/toshas/torch-fidelity"):
        load_inception(tmp_path / "nope.pth")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not torch-fidelity's Inception state dict"):
        load_inception(tmp_path / "other.pth")


# ------------------------------------------------------------------------------------------ ADM batches


def test_adm_format_reference_is_written_and_read_back(tmp_path):
    rng = np.random.default_rng(8)
    imgs = images(5, 3, 16)
    stats = {"pool": (rng.normal(size=2048), np.eye(2048)), "spatial": (rng.normal(size=2023), np.eye(2023) * 2)}
    path = write_reference(tmp_path / "ref.npz", imgs, stats)
    with np.load(path) as z:
        assert sorted(z.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]  # ADM's keys, as its evaluator reads
        assert z["arr_0"].dtype == np.uint8 and z["sigma"].dtype == np.float64
    batch = read_batch(path, "reference batch")
    assert batch.resolution == (16, 16) and len(batch.images) == 5
    np.testing.assert_array_equal(batch.images.read(1, 4), imgs[1:4])
    np.testing.assert_array_equal(batch.stats["spatial"][1], np.eye(2023) * 2)
    # np.savez (memory-mapped) and np.savez_compressed (streamed) read the same slices
    np.savez_compressed(tmp_path / "c.npz", imgs)
    c = NpzArray(tmp_path / "c.npz")
    assert c._mm is None and batch.images._mm is not None
    np.testing.assert_array_equal(c.read(2, 5), imgs[2:5])
    np.testing.assert_array_equal(c.take(np.array([0, 3, 4])), imgs[[0, 3, 4]])


def test_tools_sample_batches_are_read_with_their_prompts(tmp_path):
    import zipfile

    from bigdit.evaluation.runner import sample_prompts

    imgs, idx = images(5, 4, 8), np.array([2, 0, 1, 1, 0])
    with open(tmp_path / "samples.npz", "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in (("arr_0", imgs), ("arr_1", idx)):  # as tools/sample.py writes them: zip64 members
            with zf.open(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w", force_zip64=True) as m:
                np.lib.format.write_array(m, arr, allow_pickle=False)
    arr = NpzArray(tmp_path / "samples.npz")
    assert arr._mm is not None
    np.testing.assert_array_equal(arr.read(1, 5), imgs[1:5])
    assert sample_prompts(tmp_path / "samples.npz", 4) is None
    (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
    assert sample_prompts(tmp_path / "samples.npz", 4) == ["c", "a", "b", "b"]
    (tmp_path / "samples.json").write_text(json.dumps({"prompts": ["x", "y", "z"]}))
    assert sample_prompts(tmp_path / "samples.npz", 5) == ["z", "x", "y", "y", "x"]
    (tmp_path / "samples.json").write_text(json.dumps({"prompts": ["x"]}))
    with pytest.raises(ValueError, match="outside 0..0"):
        sample_prompts(tmp_path / "samples.npz", 5)


@pytest.mark.parametrize("arr, match", [
    (np.zeros((4, 8, 8, 3), np.float32), r"float32 with values in \[0, 0\].*expected uint8"),
    (np.zeros((4, 8, 8, 3), np.float32) - 1, r"to_uint8_images"),
    (np.zeros((4, 3, 8, 8), np.uint8), "NCHW"),
    (np.zeros((4, 8, 8, 1), np.uint8), "grayscale"),
    (np.zeros((8, 8, 3), np.uint8), "expected \\(N, H, W, 3\\)"),
])
def test_bad_sample_batches_are_refused_before_any_compute(tmp_path, batches, arr, match):
    np.savez(tmp_path / "bad.npz", arr)
    with pytest.raises(ValueError, match=match):  # the weights do not exist: the batch is checked first
        evaluate(tmp_path / "bad.npz", batches["ref"], inception_weights=tmp_path / "none.pth", num_samples=4)


def test_too_few_samples_or_another_resolution_are_refused_before_any_compute(tmp_path, batches):
    with pytest.raises(ValueError, match="holds 4 images; the protocol needs 50000"):
        evaluate(batches["samples"], batches["ref"], inception_weights=tmp_path / "none.pth")
    np.savez(tmp_path / "ref64.npz", images(6, 0, 64))
    with pytest.raises(ValueError, match="32x32 but the reference batch .* is 64x64"):
        evaluate(batches["samples"], tmp_path / "ref64.npz", inception_weights=tmp_path / "none.pth", num_samples=4)
    np.savez(tmp_path / "half.npz", images(6, 0), mu=np.zeros(2048))
    with pytest.raises(ValueError, match="has mu without sigma"):
        evaluate(batches["samples"], tmp_path / "half.npz", inception_weights=tmp_path / "none.pth", num_samples=4)
    np.savez(tmp_path / "wrong.npz", images(6, 0), mu=np.zeros(100), sigma=np.eye(100))
    with pytest.raises(ValueError, match=r"expected \(2048,\)"):
        evaluate(batches["samples"], tmp_path / "wrong.npz", inception_weights=tmp_path / "none.pth", num_samples=4)
    with pytest.raises(ValueError, match="no 'arr_0'"):
        np.savez(tmp_path / "noimg.npz", mu=np.zeros(2048), sigma=np.eye(2048))
        evaluate(batches["samples"], tmp_path / "noimg.npz", inception_weights=tmp_path / "none.pth", num_samples=4)
    with pytest.raises(FileNotFoundError, match="6726825d"):  # good inputs: now the missing weights
        evaluate(batches["samples"], batches["ref"], inception_weights=tmp_path / "none.pth", num_samples=4)


def test_make_ref_refuses_inputs_it_cannot_use(tmp_path):
    with pytest.raises(ValueError, match="grayscale|RGB"):
        tool(make_ref=True, images="sklearn:digits", out=tmp_path / "r.npz")
    (tmp_path / "imgs").mkdir()
    image(0).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(ValueError, match="resolution="):
        tool(make_ref=True, images=tmp_path / "imgs", out=tmp_path / "r.npz")
    with pytest.raises(ValueError, match="an .npz file"):
        tool(make_ref=True, images=tmp_path / "imgs", out=tmp_path / "r.json", resolution=16)


# ------------------------------------------------------------------------------------------ the tool


@pytest.mark.slow
def test_evaluate_end_to_end_with_fd_dinov2_and_clip_score(batches, tool_result, features, tiny_clip):
    res = tool_result
    assert json.loads((batches["samples"].parent / "eval-ref.json").read_text()) == res
    for k in ("fid", "sfid", "is", "precision", "recall", "fd_dinov2", "clip_score"):
        assert np.isfinite(res[k]), k
    assert res["fid"] > 0 and res["sfid"] > 0 and res["fd_dinov2"] > 0 and 1 <= res["is"] <= 2
    assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1 and 0 <= res["clip_score"] <= 100
    assert res["statistics"]["ref"] == {"pool": "images", "spatial": "images", "dinov2": "images"}
    assert res["cached"] == {"samples": False, "ref": False} and res["num_samples"] == 4

    # what the tool computed from the images is what the pure functions give on the same features
    from bigdit.evaluation.runner import SetStats

    cache = {p.name.split("-")[-2]: SetStats.load(p) for p in (batches["samples"].parent / ".eval-cache").glob("*.npz")}
    for role in ("samples", "ref"):
        f = features[role]
        np.testing.assert_array_equal(cache[role].pool, f["pool"].numpy())
        for name in ("pool", "spatial"):
            for got, want in zip(cache[role].moments[name], MomentAccumulator(f[name].shape[1]).update(f[name]).mean_cov()):
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    s, r = features["samples"], features["ref"]
    assert res["is"] == pytest.approx(inception_score(s["logits"], split_size=2), rel=1e-12)
    assert (res["precision"], res["recall"]) == precision_recall(r["pool"], s["pool"])

    # CLIP score: torchmetrics' max(mean(100 cos), 0) over (image, prompt) pairs
    from bigdit.evaluation.clip import CLIPScorer

    clip_cfg, clip_pt = tiny_clip
    scorer = CLIPScorer("tiny-clip-test", str(clip_pt), model_config=clip_cfg)
    cos = scorer.scores(np.load(batches["samples"])["arr_0"], ["a red bus", "a red bus", "two cats", "a bowl of soup"])
    assert res["clip_score"] == pytest.approx(max(float(cos.mean()), 0.0), rel=1e-5, abs=1e-6)


def test_cached_statistics_are_reused_only_for_the_same_inputs(tmp_path):
    from bigdit.evaluation.runner import SetStats, cached_set_stats

    calls = []

    def compute():
        calls.append(1)
        return SetStats(4, {"pool": (np.ones(3), np.eye(3))}, np.zeros((4, 3), np.float32), 1.5)

    key = {"role": "samples", "file": {"path": str(tmp_path / "s.npz"), "size": 1}, "count": 4}
    first, hit1 = cached_set_stats(tmp_path / "cache", key, compute)
    again, hit2 = cached_set_stats(tmp_path / "cache", key, compute)
    other, hit3 = cached_set_stats(tmp_path / "cache", {**key, "count": 3}, compute)
    assert (hit1, hit2, hit3) == (False, True, False) and len(calls) == 2
    assert again.inception_score == 1.5 and np.array_equal(again.moments["pool"][1], np.eye(3))
    assert cached_set_stats(None, key, compute)[1] is False and len(calls) == 3


def test_statistics_stored_in_a_batch_are_used_as_adm_uses_them(tmp_path):
    from bigdit.evaluation.reference import Batch
    from bigdit.evaluation.runner import SetStats, metrics

    file_stats = (np.full(4, 3.0), np.eye(4))  # 4-d stand-ins for the 2048-d statistics
    np.savez(tmp_path / "ref.npz", images(5, 0, 8))
    np.savez(tmp_path / "s.npz", images(5, 1, 8))
    sb = Batch(tmp_path / "s.npz", NpzArray(tmp_path / "s.npz"), {"pool": (np.zeros(4), np.eye(4))})
    rb = Batch(tmp_path / "ref.npz", NpzArray(tmp_path / "ref.npz"), {"pool": file_stats})

    def stats(seed):
        x = np.random.default_rng(seed).normal(size=(5, 4))
        return SetStats(5, {"pool": MomentAccumulator(4).update(x).mean_cov(),
                            "spatial": MomentAccumulator(4).update(x * 2).mean_cov()}, x.astype(np.float32), 1.0)

    s, r = stats(1), stats(2)
    whole = metrics(sb, s, rb, r, 5, 3, torch.device("cpu"))
    assert whole["statistics"] == {"samples": {"pool": "file", "spatial": "images"},
                                   "ref": {"pool": "file", "spatial": "images"}}
    assert whole["fid"] == pytest.approx(frechet_distance(np.zeros(4), np.eye(4), *file_stats))
    part = metrics(sb, s, rb, r, 4, 3, torch.device("cpu"))  # not all samples scored: the file's are not theirs
    assert part["statistics"]["samples"]["pool"] == "images"
    assert part["fid"] == pytest.approx(frechet_distance(*s.moments["pool"], *file_stats))


@pytest.mark.slow
def test_make_ref_writes_an_adm_reference_from_a_folder_or_pixel_shards(tmp_path, inception_weights, inception):
    from PIL import Image

    from bigdit.data.images import center_crop_arr

    folder = tmp_path / "imgs"
    for c, n in (("a", 2), ("b", 1)):
        (folder / c).mkdir(parents=True)
        for i in range(n):
            image(20 + 2 * (c == "b") + i, size=(40, 36)).save(folder / c / f"{i}.png")
    common = {"inception_weights": inception_weights, "batch_size": 2, "num_workers": 0, "max_images": 2}
    summary = tool(make_ref=True, images=folder, out=tmp_path / "folder.npz", resolution=32, **common)
    assert summary["images"] == 3 and summary["arr_0"] == 2 and summary["resolution"] == 32
    batch = read_batch(tmp_path / "folder.npz", "reference batch")
    assert sorted(batch.stats) == ["pool", "spatial"] and batch.images.shape == (2, 32, 32, 3)
    with np.load(tmp_path / "folder.npz") as z:
        assert sorted(z.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    # statistics over all three images (ADM: the whole dataset), arr_0 a subset of them
    every = np.stack([center_crop_arr(Image.open(p).convert("RGB"), 32) for p in sorted(folder.rglob("*.png"))])
    f = inception.features(every)
    for name in ("pool", "spatial"):
        for got, want in zip(batch.stats[name], MomentAccumulator(f[name].shape[1]).update(f[name]).mean_cov()):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    arr = batch.images.read(0, 2)
    assert all(any((a == e).all() for e in every) for a in arr)

    # the same images as pixel shards (tools/encode_latents.py vae=none): the same reference
    sys.path.insert(0, str(REPO / "tools"))
    import encode_latents

    with initialize_config_dir(CONFIG_DIR, version_base=None):
        cfg = compose("encode_latents", overrides=[f"input={folder}", f"out={tmp_path / 'shards'}", "vae=none",
                                                   "resolution=32", "shard_size=2", "num_workers=0", "progress=false"])
    encode_latents.run(cfg)
    tool(make_ref=True, images=tmp_path / "shards", out=tmp_path / "shards.npz", **common)
    shards = read_batch(tmp_path / "shards.npz", "reference batch")
    np.testing.assert_array_equal(shards.images.read(0, 2), arr)
    for name in ("pool", "spatial"):
        np.testing.assert_allclose(shards.stats[name][1], batch.stats[name][1], rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_fid_evaluator_and_feature_fd_match_the_tool(tmp_path, batches, tool_result, features, inception):
    from bigdit.evaluation.evaluator import FeatureFD, FIDEvaluator

    r = features["ref"]
    ref = write_reference(tmp_path / "ref.npz", np.load(batches["ref"])["arr_0"],
                          {k: MomentAccumulator(r[k].shape[1]).update(r[k]).mean_cov() for k in ("pool", "spatial")})
    ev = FIDEvaluator(ref, device="cpu", is_split_size=2, fid_method="eigh", net=inception)
    x = np.load(batches["samples"])["arr_0"]
    ev.update(x[:3], start=0)
    ev.update(x[3:], start=3)
    got = ev.compute()
    assert got["num_samples"] == 4
    for k in ("fid", "sfid", "is"):
        assert got[k] == pytest.approx(tool_result[k], rel=1e-6), k
    with pytest.raises(ValueError, match="64x64 but the reference batch is 32x32"):
        ev.update(images(2, 0, 64))
    feats = np.random.default_rng(0).normal(size=(50, 6))
    fd = FeatureFD.from_features(feats)
    fd.update(feats[:20])
    fd.update(feats[20:])
    assert abs(fd.compute()) < 1e-9
    assert abs(fd.compute()) < 1e-9  # compute does not consume the state
    fd.reset()
    fd.update(feats[:25] + 1.0)
    assert fd.compute() > 1


def test_dinov2_checkpoint_loads_with_dinov2s_position_embedding_resize(tiny_dinov2):
    import torch.nn.functional as F

    from bigdit.evaluation.dinov2 import load_dinov2

    path, arch = tiny_dinov2
    net = load_dinov2(path, "vit_small_patch14_dinov2", **arch)
    assert net.dim == 32 and net.vit.pos_embed.shape == (1, 1 + 16 * 16, 32)
    pos = torch.load(path)["pos_embed"]  # (1, 1 + 37 * 37, 32), resized as DinoVisionTransformer does per forward
    grid = F.interpolate(pos[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2), scale_factor=(16.1 / 37, 16.1 / 37),
                         mode="bicubic", antialias=False).permute(0, 2, 3, 1).reshape(1, 256, 32)
    torch.testing.assert_close(net.vit.pos_embed.data, torch.cat([pos[:, :1], grid], 1))
    f = net.features(images(3, 9, 40))
    assert f.shape == (3, 32) and torch.isfinite(f).all()
    torch.testing.assert_close(net.features(images(3, 9, 40)), f)
    with pytest.raises(FileNotFoundError, match="dinov2_vitl14_pretrain"):
        load_dinov2(path.parent / "missing.pth")


# ------------------------------------------------------------------------------------------ ranks


def _gloo_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from bigdit.evaluation.runner import gather_to_main

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(101, 8)))
    logits = torch.from_numpy(np.random.default_rng(4).normal(size=(101, 1008)) * 3)
    a, b = rank_slice(101, rank, 2)
    mu, sigma = MomentAccumulator(8).update(x[a:b]).reduced().mean_cov()
    score = InceptionScoreAccumulator(split_size=20).update(logits[a:b], start=a).compute()
    rows = gather_to_main(x[a:b])
    if rank == 0:
        np.savez(out, mu=mu, sigma=sigma, score=score, rows=rows.numpy())
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_give_one_ranks_statistics(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_worker, args=(port, str(tmp_path / "two.npz")), nprocs=2)
    two = np.load(tmp_path / "two.npz")
    x = np.random.default_rng(3).normal(size=(101, 8))
    logits = np.random.default_rng(4).normal(size=(101, 1008)) * 3
    mu, sigma = MomentAccumulator(8).update(x).mean_cov()
    np.testing.assert_allclose(two["mu"], mu, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(two["sigma"], sigma, rtol=1e-12, atol=1e-15)
    assert float(two["score"]) == pytest.approx(inception_score(logits, split_size=20), rel=1e-12)
    np.testing.assert_array_equal(two["rows"], x)


def run_tool(ranks: int, *args: str) -> dict:
    if ranks == 1:
        cmd = [sys.executable, str(REPO / "tools" / "evaluate.py"), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               str(REPO / "tools" / "evaluate.py"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.slow
def test_evaluate_and_make_ref_on_two_ranks_match_one_rank(tmp_path, batches, inception_weights):
    common = [f"inception_weights={inception_weights}", "batch_size=2", "progress=false"]
    ev = [f"samples={batches['samples']}", f"ref={batches['ref']}", "num_samples=4", "is_split_size=2", "clip=false",
          "cache=false", "fid_method=eigh", *common]
    one = run_tool(1, *ev, f"out={tmp_path / 'one.json'}")
    two = run_tool(2, *ev, f"out={tmp_path / 'two.json'}")
    assert two["world_size"] == 2 and one["world_size"] == 1
    for k in ("fid", "sfid", "is", "precision", "recall"):  # same batches per rank: only the sum order differs
        assert two[k] == pytest.approx(one[k], rel=1e-9, abs=1e-12), k
    mk = ["make_ref=true", f"images={batches['samples']}", "max_images=3", *common]
    run_tool(1, *mk, f"out={tmp_path / 'one.npz'}")
    run_tool(2, *mk, f"out={tmp_path / 'two.npz'}")
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])  # the same subset whatever the ranks
    for k in ("mu", "sigma", "mu_s", "sigma_s"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-9, atol=1e-12)
