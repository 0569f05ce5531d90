"""vartk.metrics against independent computations, on a random Inception and a handful of images."""
import json
import urllib.error
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from _fid_helpers import (  # noqa: F401  (image_sets, inception: fixtures)
    FAST, STUB_META, image_sets, independent_fid, independent_kid, inception, random_images, register_stubs,
    write_folder,
)
from vartk import metrics
from vartk.metrics import compute_metrics, frechet_distance, list_images


def test_frechet_distance_of_1d_gaussians_is_closed_form():
    # FID(N(m1, v1), N(m2, v2)) = (m1 - m2)^2 + (sqrt(v1) - sqrt(v2))^2
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)


def test_fid_of_a_set_with_itself_is_zero(inception, image_sets):
    result = compute_metrics(
        image_sets["a"], image_sets["a"], ["fid"], feature_extractor_weights=inception, cache=False, **FAST
    )
    assert abs(result["fid"]) < 1e-3
    assert result["num_generated"] == 12


@pytest.mark.parametrize("count", [2, 12])  # 2: a covariance of rank 1, whose square root rounding hits hardest
def test_fid_of_a_set_with_itself_is_exactly_zero(inception, count):
    """tr sqrtm(S S) equals tr S only up to rounding (about -6e-8 here for 64 features): within the rounding bound
    the distance is 0."""
    images = random_images(count, seed=count)
    result = compute_metrics(images, images, ["fid"], feature_extractor_weights=inception, cache=False, **FAST)
    assert result["fid"] == 0.0


def test_fid_keeps_small_distances_above_the_rounding_bound():
    """1-D unit Gaussians: the distance is the squared mean difference; rounding of tr sqrtm(1 * 1) is bounded by
    2 sqrt(eps) = 3e-8, so 1e-6 is kept and 1e-10 is 0."""
    assert frechet_distance([0.0], [[1.0]], [1e-3], [[1.0]]) == pytest.approx(1e-6, rel=1e-9)
    assert frechet_distance([0.0], [[1.0]], [1e-5], [[1.0]]) == 0.0


def test_fid_warns_about_sets_with_no_more_images_than_features(tmp_path):
    """The stub's FID features are 3 mean colours: 3 images have a singular covariance (rank 2), 4 do not. A statistics
    file counts the images its meta records; ADM's files record none."""
    register_stubs()
    run = dict(feature_extractor="stub-classifier", device="cpu", cache=False)
    small, large = random_images(3, seed=0, size=8), random_images(4, seed=1, size=8)
    assert compute_metrics(small, large, ["fid"], **run)["warnings"] == [
        "FID: the generated set has 3 images, no more than the 3 features of stub-classifier layer colour, so its "
        "covariance is singular and the FID mostly measures the set sizes; use many more images than features, and "
        "compare FIDs of equal set sizes only"
    ]
    assert compute_metrics(large, large, ["fid", "kid"], **run)["warnings"] == []
    statistics = tmp_path / "stats.npz"
    metrics.save_statistics(statistics, metrics.LayerStatistics(np.zeros(3), np.eye(3), None),
                            {**STUB_META, "num_images": 2})
    warnings = compute_metrics(large, statistics, ["fid"], **run)["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("FID: the reference has 2 images, no more than the 3 ")
    metrics.save_statistics(statistics, metrics.LayerStatistics(np.zeros(3), np.eye(3), None), STUB_META)
    assert compute_metrics(large, statistics, ["fid"], **run)["warnings"] == []


def test_fid_equals_independent_frechet_distance(inception, image_sets):
    extractor = metrics.FeatureExtractor(weights=str(inception), device="cpu")
    features_a = extractor.extract(image_sets["a"], ["64"])["64"]
    features_b = extractor.extract(image_sets["b"], ["64"])["64"]
    expected = independent_fid(features_a, features_b)
    result = compute_metrics(
        image_sets["a"], image_sets["b"], ["fid"], feature_extractor_weights=inception, cache=False, **FAST
    )
    assert expected > 1.0
    assert result["fid"] == pytest.approx(expected, rel=1e-4)


def test_kid_equals_independent_unbiased_mmd(inception, image_sets):
    """With as many images as the subset size (default 1000, shrunk to 12), every KID subset is the whole
    set, so KID is one unbiased MMD^2 whatever the subsets drawn."""
    extractor = metrics.FeatureExtractor(weights=str(inception), device="cpu")
    features_a = extractor.extract(image_sets["a"], ["64"])["64"]
    features_b = extractor.extract(image_sets["b"], ["64"])["64"]
    result = compute_metrics(
        image_sets["a"], image_sets["b"], ["kid"], feature_extractor_weights=inception, cache=False, **FAST
    )
    assert result["kid_subset_size"] == 12
    assert result["kid"] == pytest.approx(independent_kid(features_a, features_b), rel=1e-5)
    assert abs(independent_kid(features_a, features_a)) < 0.01 * result["kid"]  # a's own MMD would not pass


def knn_precision_recall(generated, reference, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al.: the share of each set inside the other's manifold, the union of balls around
    its features reaching their k-th nearest neighbour in the same set."""

    def share_inside(points, manifold):
        radius = np.sort(np.linalg.norm(manifold[:, None] - manifold[None], axis=-1), axis=1)[:, k]  # [0] is itself
        return float((np.linalg.norm(points[:, None] - manifold[None], axis=-1) <= radius).any(axis=1).mean())

    generated, reference = (np.asarray(f, dtype=np.float64) for f in (generated, reference))
    return share_inside(generated, reference), share_inside(reference, generated)


def test_precision_recall_equal_independent_knn_manifolds(inception, image_sets):
    a, b = image_sets["a_array"], image_sets["b_array"]
    generated, reference = np.concatenate([a[:8], b[:4]]), np.concatenate([a[4:], b[6:]])  # overlapping mixes
    extractor = metrics.FeatureExtractor(weights=str(inception), device="cpu")
    features = [extractor.extract(images, ["64"])["64"] for images in (generated, reference)]
    result = compute_metrics(generated, reference, ["prc"], feature_extractor_weights=inception, cache=False, **FAST)
    expected = knn_precision_recall(*features, k=3)  # compute_metrics' default prc_neighborhood
    assert expected[0] != expected[1] and expected != knn_precision_recall(*features, k=4)
    assert (result["precision"], result["recall"]) == pytest.approx(expected, abs=1e-6)


def test_generated_subset_of_reference_has_precision_one_and_partial_recall(inception, image_sets):
    """Every generated image is a reference image (precision 1); the reference's darker 12 are far from the 6
    generated ones (recall 6 / 18)."""
    a, b = image_sets["a_array"], image_sets["b_array"]
    result = compute_metrics(
        a[:6], np.concatenate([a[:6], b]), ["prc"], feature_extractor_weights=inception, cache=False, **FAST
    )
    assert result["precision"] == 1.0
    assert result["recall"] == pytest.approx(1 / 3, abs=1e-6)


def test_inception_score_of_known_predictions():
    register_stubs()
    images = random_images(8, seed=2)
    images[:, 0, 0, 0] = np.repeat([0, 64, 128, 192], 2)  # classes 0..3, two images each
    uniform = compute_metrics(images, None, ["is"], feature_extractor="stub-uniform", device="cpu", isc_splits=1)
    confident = compute_metrics(images, None, ["is"], feature_extractor="stub-classifier", device="cpu", isc_splits=1)
    assert uniform["is"] == pytest.approx(1.0, abs=1e-9)
    assert confident["is"] == pytest.approx(4.0, rel=1e-6)  # confident and balanced over 4 classes


def test_reference_statistics_are_cached_and_reused(inception, image_sets, tmp_path):
    reference = write_folder(tmp_path / "ref", image_sets["b_array"])
    first = compute_metrics(image_sets["a"], reference, ["fid"], feature_extractor_weights=inception, **FAST)
    cached = sorted(tmp_path.glob("ref.inception-v3-compat-64.*.stats.npz"))
    assert len(cached) == 1
    stats, meta = metrics.read_statistics(cached[0])
    assert meta["feature_layer"] == "64" and meta["num_images"] == 12 and stats.features.shape == (12, 64)

    calls = []
    extract = metrics.FeatureExtractor.extract
    counting = lambda self, images, layers: calls.append(images) or extract(self, images, layers)  # noqa: E731
    with mock.patch.object(metrics.FeatureExtractor, "extract", counting):
        second = compute_metrics(image_sets["a"], reference, ["fid"], feature_extractor_weights=inception, **FAST)
    assert [images.paths for images in calls] == [list_images(image_sets["a"])]  # only the generated set
    assert second["fid"] == first["fid"]


def test_new_shipped_classifier_weights_change_the_cache_key(tmp_path, monkeypatch):
    """The emoji classifier's default weights live in the package; a release that replaces them must not reuse
    statistics cached with the old ones."""
    import shutil

    from vartk import classifier
    from vartk.emoji_extractor import EMOJI_CLASSIFIER, register_emoji_extractor

    register_emoji_extractor()
    shipped = shutil.copytree(classifier.SHIPPED_WEIGHTS, tmp_path / "emoji-classifier")
    monkeypatch.setattr(classifier, "SHIPPED_WEIGHTS", shipped)
    extractor = metrics.FeatureExtractor(EMOJI_CLASSIFIER, device="cpu")
    before = extractor.weights_id
    (shipped / "config.json").write_text((shipped / "config.json").read_text() + " ")
    assert extractor.weights_id != before


def test_statistics_file_npz_and_folder_references_agree(inception, image_sets, tmp_path):
    reference = write_folder(tmp_path / "ref", image_sets["b_array"])
    score = lambda ref, which=("fid", "kid", "prc"): compute_metrics(  # noqa: E731
        image_sets["a"], ref, which, feature_extractor_weights=inception, kid_subset_size=6, **FAST
    )
    from_folder = score(reference)
    stats_file = next(tmp_path.glob("ref.*.stats.npz"))
    np.savez(tmp_path / "adm_style.npz", arr_0=image_sets["b_array"])
    from_stats = score(stats_file)
    from_npz = score(tmp_path / "adm_style.npz")
    for key in ("fid", "kid", "precision", "recall"):
        assert from_stats[key] == pytest.approx(from_folder[key], rel=1e-9)
        assert from_npz[key] == pytest.approx(from_folder[key], rel=1e-6)


def test_precision_recall_of_a_set_with_itself_are_one(inception, image_sets):
    result = compute_metrics(
        image_sets["a"], image_sets["a_array"], ["prc"], feature_extractor_weights=inception, cache=False, **FAST
    )
    assert result["precision"] == 1.0 and result["recall"] == 1.0


def test_adm_statistics_are_used_for_fid_and_images_for_kid(inception, image_sets, tmp_path, monkeypatch):
    # ADM's reference batch: mu / sigma next to other images under arr_0. Its statistics describe
    # Inception layer "2048" of the official weights; pretend they describe "64" of the test's random weights so
    # the test stays fast.
    monkeypatch.setattr(metrics, "ADM_STATISTICS_LAYER", "64")
    mu, sigma = np.zeros(64), np.eye(64)
    np.savez(tmp_path / "VIRTUAL_like.npz", arr_0=image_sets["b_array"], mu=mu, sigma=sigma)
    np.savez(tmp_path / "adm_stats_only.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match="come from the official weights-inception"):  # other weights: not used
        compute_metrics(image_sets["a"], tmp_path / "adm_stats_only.npz", ["fid"], feature_extractor_weights=inception,
                        cache=False, **FAST)
    monkeypatch.setattr(metrics.FeatureExtractor, "has_official_inception_weights", True)
    result = compute_metrics(
        image_sets["a"], tmp_path / "VIRTUAL_like.npz", ["fid", "kid"], feature_extractor_weights=inception,
        kid_subset_size=6, cache=False, **FAST,
    )
    from_images = compute_metrics(
        image_sets["a"], image_sets["b"], ["fid", "kid"], feature_extractor_weights=inception, kid_subset_size=6,
        cache=False, **FAST,
    )
    extractor = metrics.FeatureExtractor(weights=str(inception), device="cpu")
    generated = metrics.feature_statistics(extractor.extract(image_sets["a"], ["64"])["64"])
    assert result["fid"] == pytest.approx(frechet_distance(*generated, mu, sigma), rel=1e-9)
    assert result["kid"] == pytest.approx(from_images["kid"], rel=1e-9)
    np.savez(tmp_path / "stats_only.npz", mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match="ADM"):  # statistics of another layer, and no images to fall back on
        compute_metrics(
            image_sets["a"], tmp_path / "stats_only.npz", ["fid"], feature_extractor_weights=inception,
            feature_layer="192", device="cpu",
        )


def test_statistics_of_another_layer_are_refused(inception, image_sets, tmp_path):
    reference = write_folder(tmp_path / "ref", image_sets["b_array"][:4])
    compute_metrics(image_sets["a"], reference, ["fid"], feature_extractor_weights=inception, **FAST)
    stats_file = next(tmp_path.glob("ref.*.stats.npz"))
    with pytest.raises(ValueError, match="layer 64"):
        compute_metrics(
            image_sets["a"], stats_file, ["fid"], feature_extractor_weights=inception, feature_layer="192", device="cpu"
        )


def test_missing_inception_weights_offline_names_the_file(tmp_path, monkeypatch, image_sets):
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    offline = mock.Mock(side_effect=urllib.error.URLError("Name or service not known"))
    monkeypatch.setattr(inception_module, "load_state_dict_from_url", offline)
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth") as err:
        compute_metrics(image_sets["a"], None, ["is"], device="cpu")
    assert "hub/checkpoints" in str(err.value) and "--inception-weights" in str(err.value)


def test_bad_arguments_say_what_is_allowed(inception, image_sets):
    with pytest.raises(ValueError, match="not registered.*inception-v3-compat"):
        compute_metrics(image_sets["a"], None, ["is"], feature_extractor="no-such-net")
    with pytest.raises(ValueError, match="choose from"):
        compute_metrics(image_sets["a"], image_sets["b"], ["fid", "sfid"])
    with pytest.raises(ValueError, match="need a reference"):
        compute_metrics(image_sets["a"], None, ["fid"])
    with pytest.raises(ValueError, match="'4096' is not provided"):
        compute_metrics(
            image_sets["a"], image_sets["b"], ["fid"], feature_extractor_weights=inception, feature_layer="4096"
        )


def test_metrics_may_be_one_string_of_names():
    register_stubs()
    images = random_images(8, seed=2)
    result = compute_metrics(images, None, "is", feature_extractor="stub-classifier", device="cpu", isc_splits=1)
    assert {"is", "is_std"} <= result.keys()
    assert metrics._check_metrics("fid, kid") == ("fid", "kid")


@pytest.mark.parametrize("arrays, message", [
    (dict(sigma=np.full((3, 3), np.inf)), "mu and sigma must be finite, but they hold NaN or inf"),
    (dict(mu=np.zeros((3, 3)), sigma=np.zeros(3)), r"mu must be numbers \[D\] and sigma \[D, D\], got float64"),
    (dict(meta=np.array('{"feature_layer": 1}')), r"its 'meta' must be a JSON object with \['feature_extractor'"),
    (dict(meta=np.array("{")), "its 'meta' must be a JSON object"),
])
def test_a_statistics_file_fid_cannot_use_is_named(tmp_path, arrays, message):
    path = tmp_path / "stats.npz"
    np.savez(path, **{"mu": np.zeros(3), "sigma": np.eye(3), "meta": np.array(json.dumps(STUB_META)), **arrays})
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        metrics.read_statistics(path)


def test_transparent_images_are_scored_as_on_white(inception, tmp_path):
    """A folder of RGBA images scores as the same images composited onto white (as training reads them)."""
    rgb = random_images(6, seed=3)  # [N, H, W, 3]
    alpha = np.random.default_rng(4).choice(np.array([0, 255], dtype=np.uint8), rgb.shape[:3])[..., None]
    on_white = np.where(alpha == 255, rgb, 255).astype(np.uint8)
    (tmp_path / "rgba").mkdir()
    for i, image in enumerate(np.concatenate([rgb, alpha], axis=-1)):
        Image.fromarray(image, "RGBA").save(tmp_path / "rgba" / f"{i}.png")
    extractor = metrics.FeatureExtractor(weights=str(inception), device="cpu")
    features = [extractor.extract(images, ["64"])["64"] for images in (tmp_path / "rgba", on_white)]
    np.testing.assert_allclose(features[0], features[1], atol=1e-5)


def test_a_set_of_mixed_sizes_names_the_odd_file(inception, tmp_path):
    write_folder(tmp_path / "mixed", random_images(3, seed=5))
    Image.fromarray(random_images(1, seed=6, size=8)[0]).save(tmp_path / "mixed" / "odd.png")
    with pytest.raises(ValueError, match=r"odd.png is 8x8, .* is 16x16: the images of a set must share one"):
        compute_metrics(tmp_path / "mixed", tmp_path / "mixed", ["fid"], feature_extractor_weights=inception,
                        cache=False, **FAST)


def test_psnr_matches_definition():
    a = random_images(1, seed=3)[0]
    b = a.copy()
    b[0, 0, 0] ^= 0xFF
    mse = (int(a[0, 0, 0]) - int(b[0, 0, 0])) ** 2 / a.size
    assert metrics.psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse), rel=1e-12)
    assert metrics.psnr(a, a) == float("inf")
    assert torch.isfinite(torch.tensor(metrics.psnr(a, b)))


def _other_weights(inception, path):
    """Weights B: weights A with the stem's first convolution scaled, so layer "64" gives other features."""
    state = torch.load(inception)
    key = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    state[key] = state[key] * 1.5
    torch.save(state, path)
    return path


def test_a_reference_cached_with_other_weights_is_not_reused(inception, image_sets, tmp_path):
    weights_b = _other_weights(inception, tmp_path / "inception-b.pth")
    reference = write_folder(tmp_path / "ref", image_sets["b_array"])
    with_a = compute_metrics(image_sets["a"], reference, ["fid"], feature_extractor_weights=inception, **FAST)
    with_b = compute_metrics(image_sets["a"], reference, ["fid"], feature_extractor_weights=weights_b, **FAST)
    uncached_b = compute_metrics(image_sets["a"], reference, ["fid"], feature_extractor_weights=weights_b,
                                 cache=False, **FAST)
    assert abs(with_a["fid"] - uncached_b["fid"]) > 1e-3 * abs(uncached_b["fid"])  # the weights matter
    assert with_b["fid"] == pytest.approx(uncached_b["fid"], rel=1e-9)
    assert len(list(tmp_path.glob("ref.inception-v3-compat-64.*.stats.npz"))) == 2  # one per weights


def test_a_statistics_file_of_other_weights_is_refused(inception, image_sets, tmp_path):
    weights_b = _other_weights(inception, tmp_path / "inception-b.pth")
    reference = write_folder(tmp_path / "ref", image_sets["b_array"])
    compute_metrics(image_sets["a"], reference, ["fid"], feature_extractor_weights=inception, **FAST)
    stats_file = next(tmp_path.glob("ref.inception-v3-compat-64.*.stats.npz"))
    with pytest.raises(ValueError, match="come from other inception-v3-compat weights"):
        compute_metrics(image_sets["a"], stats_file, ["fid"], feature_extractor_weights=weights_b, cache=False,
                        **FAST)


def test_inception_score_splits_shrink_to_the_number_of_images():
    register_stubs()
    images = random_images(5, seed=3)
    images[:, 0, 0, 0] = [0, 64, 128, 192, 0]
    default = compute_metrics(images, None, ["is"], feature_extractor="stub-classifier", device="cpu")
    five = compute_metrics(images, None, ["is"], feature_extractor="stub-classifier", device="cpu", isc_splits=5)
    assert np.isfinite(default["is"]) and np.isfinite(default["is_std"])
    assert default["is"] == pytest.approx(five["is"], rel=1e-12)
    assert default["is_std"] == pytest.approx(five["is_std"], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("which", [("kid", "fid"), ("fid", "kid")])
def test_kid_and_fid_against_a_statistics_file(which, image_sets, tmp_path):
    """KID needs features from the reference whatever the order of the metrics: a statistics file with
    features serves both; one without features or images is refused by name."""
    register_stubs()
    colours = lambda images: images.reshape(len(images), -1, 3).astype(np.float64).mean(1)  # noqa: E731
    ref = colours(image_sets["b_array"])
    with_features = tmp_path / "with_features.npz"
    metrics.save_statistics(with_features, metrics.LayerStatistics.from_features(torch.from_numpy(ref).float()),
                            STUB_META)
    result = compute_metrics(image_sets["a_array"], with_features, which, feature_extractor="stub-classifier",
                             device="cpu", kid_subset_size=12, cache=False)
    generated = colours(image_sets["a_array"])
    assert result["kid"] == pytest.approx(independent_kid(generated, ref), rel=1e-3)
    assert result["fid"] == pytest.approx(independent_fid(generated, ref), rel=1e-4)
    assert result["num_reference"] == 12
    without = tmp_path / "without_features.npz"
    metrics.save_statistics(without, metrics.LayerStatistics(ref.mean(0), np.cov(ref, rowvar=False), None), STUB_META)
    with pytest.raises(ValueError, match="holds no features or images"):
        compute_metrics(image_sets["a_array"], without, which, feature_extractor="stub-classifier", device="cpu",
                        cache=False)


def test_paired_psnr_skips_identical_pairs_in_the_mean_and_minimum(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    zeros = np.zeros((4, 4, 3), np.uint8)
    pairs = {"same.png": (zeros, zeros), "ten.png": (zeros, zeros + 10), "twenty.png": (zeros, zeros + 20)}
    for name, (x, y) in pairs.items():
        Image.fromarray(x).save(a / name)
        Image.fromarray(y).save(b / name)
    result = metrics.paired_psnr(a, b)
    ten, twenty = 10 * np.log10(255**2 / 100), 10 * np.log10(255**2 / 400)  # mse 10^2 and 20^2
    assert result["psnr_mean"] == pytest.approx((ten + twenty) / 2, rel=1e-12)
    assert result["psnr_min"] == pytest.approx(twenty, rel=1e-12)
    assert (result["num_pairs"], result["num_identical"]) == (3, 1)
    assert result["per_image"]["same.png"] is None
    assert result["per_image"]["ten.png"] == pytest.approx(ten, rel=1e-12)
    json.dumps(result, allow_nan=False)
    for name in ("ten.png", "twenty.png"):
        (a / name).unlink()
    only_identical = metrics.paired_psnr(a, b)
    assert (only_identical["psnr_mean"], only_identical["psnr_min"], only_identical["num_identical"]) == (None, None, 1)
