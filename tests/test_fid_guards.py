"""FID runs: bad input is refused before any sample is drawn, reference caches never go stale or stay broken,
small sets get errors instead of meaningless numbers, and a run resumes or pairs by what decides its images."""
import json
import shutil

import numpy as np
import pytest
import torch

from _fid_helpers import (  # noqa: F401  (image_sets, inception, tiny_pipeline, uninterrupted: fixtures)
    FAST, RUN, STUB_META, fid, image_sets, inception, random_images, register_stubs, tiny_pipeline, uninterrupted,
    write_folder,
)
from vartk import metrics
from vartk.metrics import INCEPTION_WEIGHTS_FILE, FeatureExtractor, compute_metrics, file_sha256
from vartk.models.gpt import GPTTransformer
from vartk.pipelines import GPTPipeline
from vartk.tokenizers.vq import VQModel

SCORED = dict(RUN, sample_only=False, metrics=("fid",), feature_extractor="stub-classifier")  # stub: 3 features


def batch_folders(out):
    return sorted((out / "samples").glob("batch_*")) if (out / "samples").is_dir() else []


@pytest.mark.parametrize("kwargs, message", [
    (dict(metrics=("fdi",)), r"unknown metric\(s\) \['fdi'\]"),
    (dict(metrics=("fid",)), r"metrics \['fid'\] need a reference"),
    (dict(metrics=("fid",), reference="no-such-folder"), "reference no-such-folder does not exist"),
    (dict(metrics=("is",), feature_extractor="inception-v4"), "feature extractor 'inception-v4' is not registered"),
    (dict(metrics=("is",), score_batch_size=0), "the scoring batch size must be >= 1, got 0"),
    (dict(num_images=0, metrics=("is",)), "num_images and batch_size must be >= 1, got 0"),
])
def test_scoring_settings_are_checked_before_the_first_sample(tiny_pipeline, tmp_path, kwargs, message):
    run = dict(RUN, sample_only=False) | kwargs
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        fid.evaluate(str(tiny_pipeline), tmp_path / "run", **run)
    assert batch_folders(tmp_path / "run") == []


@pytest.mark.parametrize("options, message", [
    (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0, got -1.0"),
    (dict(top_p=2.0), r"top_p must be in \(0, 1\] \(1 = no top-p filtering\), got 2.0"),
    (dict(top_k=-5), r"top_k must be an integer >= 0 \(0 = no top-k filtering\), got -5"),
    (dict(sampler="nexttokensampler"), r"unknown next-scale sampler 'nexttokensampler'; available: \['nextscale'"),
])
def test_bad_sampling_options_are_refused_before_settings_are_pinned(tiny_pipeline, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        fid.evaluate(str(tiny_pipeline), tmp_path / "run", **RUN, **options)
    assert not (tmp_path / "run").exists()  # no settings.json to refuse the corrected rerun


def test_a_kv_cache_policy_for_a_llamagen_model_is_refused_before_settings_are_pinned(tmp_path):
    tokenizer = VQModel(ch=32, ch_mult=(1, 1), num_res_blocks=1, z_channels=16, codebook_size=64, codebook_embed_dim=8)
    transformer = GPTTransformer(dim=64, n_layer=2, n_head=2, vocab_size=64, num_classes=3, grid_size=4)
    pipe = GPTPipeline(tokenizer=tokenizer, transformer=transformer)
    with pytest.raises(ValueError, match=r"kv_cache policies apply to next-scale models; GPTPipeline uses a static cache"):
        fid.evaluate(pipe, tmp_path / "run", kv_cache="fullkvcache", **RUN)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("out, reference", [("ref", "ref"), ("ref/run", "ref"), ("run", "run/ref")])
def test_an_out_nested_with_the_reference_folder_is_refused(tiny_pipeline, tmp_path, out, reference):
    write_folder(tmp_path / reference, random_images(4, seed=0, size=8))
    with pytest.raises(ValueError, match="lie inside one another, so samples would mix with the reference images"):
        fid.evaluate(str(tiny_pipeline), tmp_path / out, str(tmp_path / reference), **RUN)
    assert not list(tmp_path.rglob("samples"))


def _statistics(path, mu=np.zeros(3), sigma=np.eye(3), meta=json.dumps(STUB_META)):
    np.savez(path, mu=mu, sigma=sigma, meta=np.array(meta))


REFERENCES = {  # file name: (writes a reference the stub cannot score against, the error)
    "empty": (lambda p: p.mkdir(), r"reference \S*empty has 0 image\(s\), too few for fid: FID needs at least 2"),
    "one": (lambda p: write_folder(p, random_images(1, seed=0, size=8)), r"has 1 image\(s\), too few for fid"),
    "one.npz": (lambda p: np.savez(p, arr_0=random_images(1, seed=0, size=8)), r"one.npz has 1 image\(s\)"),
    "keys.npz": (lambda p: np.savez(p, images=random_images(4, seed=0, size=8)),
                 r"holds neither images \('arr_0'\) nor statistics \('mu' and 'sigma'\); its keys are \['images'\]"),
    "float.npz": (lambda p: np.savez(p, arr_0=random_images(4, seed=0, size=8) / 255),
                  r"float.npz must be uint8 \[N, H, W, 3\], got float64 \[4, 8, 8, 3\]"),
    "chw.npz": (lambda p: np.savez(p, arr_0=random_images(4, seed=0, size=8).transpose(0, 3, 1, 2)),
                r"got uint8 \[4, 3, 8, 8\]"),
    "gray.npz": (lambda p: np.savez(p, arr_0=random_images(4, seed=0, size=8)[..., 0]), r"got uint8 \[4, 8, 8\]"),
    "junk.npz": (lambda p: p.write_bytes(b"not an npz"), "junk.npz is not an .npz of arrays as np.savez writes"),
    "adm.npz": (lambda p: np.savez(p, mu=np.zeros(3), sigma=np.eye(3)),
                r"cannot be used for stub-classifier layer colour: its statistics \(no metadata: ADM's\)"),
    "dim.npz": (lambda p: _statistics(p, np.zeros(5), np.eye(5)),
                "dim.npz holds statistics of 5 features, but stub-classifier layer colour gives 3"),
    "nan.npz": (lambda p: _statistics(p, mu=np.array([0, np.nan, 0])), "nan.npz: mu and sigma must be finite"),
    "meta.npz": (lambda p: _statistics(p, meta='{"feature_extractor": "stub-classifier"}'),
                 r"meta.npz: its 'meta' must be a JSON object with \['feature_extractor', 'feature_layer', 'weights"),
    "json.npz": (lambda p: _statistics(p, meta="not json"), "json.npz: its 'meta' must be a JSON object"),
}


@pytest.mark.parametrize("name", REFERENCES)
def test_a_reference_that_cannot_be_scored_against_is_refused_before_the_first_sample(tiny_pipeline, tmp_path, name):
    register_stubs()
    write, message = REFERENCES[name]
    write(tmp_path / name)
    with pytest.raises(ValueError, match=message):
        fid.evaluate(str(tiny_pipeline), tmp_path / "run", str(tmp_path / name), **SCORED)
    assert not (tmp_path / "run").exists()


def _stub_statistics_with_features(path, count):
    features = torch.from_numpy(random_images(count, seed=0, size=1).reshape(count, 3).astype(np.float32))  # [N, 3]
    metrics.save_statistics(path, metrics.LayerStatistics(np.zeros(3), np.eye(3), features), STUB_META)


SMALL_REFERENCES = {  # (metrics asked, writes a reference too small for them, the refusal)
    "fid-1": (("fid",), lambda p: write_folder(p, random_images(1, seed=0, size=8)),
              r"reference \S*fid-1 has 1 image\(s\), too few for fid: FID needs at least 2 images per set "
              r"\(a covariance\)\. Use more images, or leave fid out of the metrics"),
    "fid-kid-1": (("fid", "kid"), lambda p: write_folder(p, random_images(1, seed=0, size=8)),
                  r"has 1 image\(s\), too few for fid, kid: FID needs at least 2 images per set \(a covariance\); "
                  r"KID needs at least 2 images per set \(subsets of two\)"),
    "default-2": (None, lambda p: write_folder(p, random_images(2, seed=0, size=8)),  # fid, is, prc
                  r"reference \S*default-2 has 2 image\(s\), too few for prc: precision/recall needs more than "
                  r"k = 3 images per set \(each image's k nearest neighbours in its own set\)\. Use more images, "
                  r"or leave prc out"),
    "prc-3.npz": (("prc", "is"), lambda p: np.savez(p, arr_0=random_images(3, seed=0, size=8)),
                  r"prc-3.npz has 3 image\(s\), too few for prc: precision/recall needs more than k = 3"),
    "kid-features-1.npz": (("kid",), lambda p: _stub_statistics_with_features(p, 1),
                           r"kid-features-1.npz has 1 image\(s\), too few for kid: KID needs at least 2"),
}


@pytest.mark.parametrize("name", SMALL_REFERENCES)
def test_a_reference_too_small_for_a_metric_is_refused_before_anything_is_written(tiny_pipeline, tmp_path, name):
    register_stubs()
    asked, write, message = SMALL_REFERENCES[name]
    write(tmp_path / name)
    with pytest.raises(ValueError, match=message):
        fid.evaluate(str(tiny_pipeline), tmp_path / "run", str(tmp_path / name), **dict(SCORED, metrics=asked))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("asked, num_images, message", [
    (("fid",), 1, r"the generated set has 1 image\(s\), too few for fid: FID needs at least 2 images per set"),
    (None, 3, r"the generated set has 3 image\(s\), too few for prc: precision/recall needs more than k = 3"),
    (("is", "kid"), 1, r"the generated set has 1 image\(s\), too few for kid: KID needs at least 2"),
])
def test_too_few_planned_images_for_a_metric_are_refused_before_anything_is_written(tiny_pipeline, tmp_path, asked,
                                                                                   num_images, message):
    register_stubs()
    reference = write_folder(tmp_path / "ref", random_images(6, seed=0, size=8))
    with pytest.raises(ValueError, match=message):
        fid.evaluate(str(tiny_pipeline), tmp_path / "run", str(reference),
                     **dict(SCORED, metrics=asked, num_images=num_images))
    assert not (tmp_path / "run").exists()


def test_an_out_that_is_a_file_or_was_sampled_otherwise_is_refused_before_anything_is_written(tiny_pipeline, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"--out \S*file: \S*file is a file, not a folder"):
        fid.evaluate(str(tiny_pipeline), tmp_path / "file", **RUN)
    run = tmp_path / "run"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(ValueError, match=r"was sampled with other settings \(.*seed: 1 -> 0"):
        fid.evaluate(str(tiny_pipeline), run, **RUN)
    assert [p.name for p in run.iterdir()] == ["settings.json"]


@pytest.mark.parametrize("json_path, message", [
    ("folder", "results file .*folder is a folder; give a file name such as .*folder/results.json"),
    ("file/results.json", "results file .*file/results.json: .*file is a file, not a folder"),
])
def test_a_results_file_that_cannot_be_written_is_refused_before_the_first_sample(tiny_pipeline, tmp_path,
                                                                                   json_path, message):
    register_stubs()
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("")
    reference = write_folder(tmp_path / "ref", random_images(4, seed=0, size=8))
    with pytest.raises(ValueError, match=message):
        fid.evaluate(str(tiny_pipeline), tmp_path / "run", str(reference), **SCORED, json_path=tmp_path / json_path)
    assert not (tmp_path / "run").exists()


def test_a_corrupt_settings_file_is_named(tiny_pipeline, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "settings.json").write_text('{"seed": 0,\n')  # hand-edited
    with pytest.raises(ValueError, match=r"run/settings.json is not the JSON object .*; restore it .* new --out"):
        fid.evaluate(str(tiny_pipeline), tmp_path / "run", **RUN)
    assert batch_folders(tmp_path / "run") == []


@pytest.mark.parametrize("argv, message", [
    (["--num-images", "0"], "expected an integer >= 1, got '0'"),
    (["--seed", "-1"], "expected an integer >= 0, got '-1'"),
    (["--image-size-eval", "0"], "expected auto, native or a size in pixels >= 1, got '0'"),
    (["--score-batch-size", "x"], "expected an integer >= 1, got 'x'"),
])
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        fid.main(["--out", "x", *argv])
    assert message in capsys.readouterr().err


def test_native_eval_size_keeps_the_samples_size(tiny_pipeline, tmp_path):
    args = fid.build_parser().parse_args(["--image-size-eval", "native"])
    assert args.image_size_eval is None
    fid.evaluate(str(tiny_pipeline), tmp_path / "run", **RUN, image_size_eval=args.image_size_eval)
    assert json.loads((tmp_path / "run" / "settings.json").read_text())["image_size_eval"] is None


def test_a_run_resumes_from_its_model_by_another_path_but_pins_the_generators_device(tiny_pipeline, tmp_path):
    run = tmp_path / "run"
    fid.evaluate(str(tiny_pipeline), run, **dict(RUN, num_images=4))
    fid.evaluate(str(tiny_pipeline) + "/", run, **dict(RUN, num_images=4))  # same weights, other spelling
    settings = json.loads((run / "settings.json").read_text())
    assert settings["generator"] == "cpu" and "model" not in settings


def test_compare_pairs_samples_folders_by_their_runs_settings(uninterrupted, tiny_pipeline, tmp_path):
    other = tmp_path / "seed1"
    fid.evaluate(str(tiny_pipeline), other, **dict(RUN, seed=1))
    with pytest.raises(ValueError, match="drew image i from different seeds or labels \\(seed 0 vs 1\\)"):
        fid.compare(uninterrupted / "samples", other / "samples")


def test_incomplete_samples_are_a_plain_error(tiny_pipeline, tmp_path):
    plan = fid.SamplingPlan(4, 2, 10)
    (tmp_path / "samples").mkdir()
    with pytest.raises(ValueError, match="2 batches are not written yet"):
        fid.collect_samples(tmp_path / "samples", plan)


def test_the_default_inception_file_is_identified_by_its_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert FeatureExtractor(device="cpu").weights_id == "default"  # not downloaded yet
    weights = tmp_path / "checkpoints" / INCEPTION_WEIGHTS_FILE
    weights.parent.mkdir()
    weights.write_bytes(b"first download")
    first = FeatureExtractor(device="cpu").weights_id
    assert first == file_sha256(weights) == FeatureExtractor(weights=str(weights), device="cpu").weights_id
    weights.write_bytes(b"fixed download")
    assert FeatureExtractor(device="cpu").weights_id not in (first, "default")


def test_a_new_cache_format_changes_the_cache_file(tmp_path, monkeypatch):
    extractor = FeatureExtractor(device="cpu")
    before = metrics._cache_files(tmp_path / "ref", "digest", extractor, "2048")
    monkeypatch.setattr(metrics, "CACHE_FORMAT", "next")
    assert metrics._cache_files(tmp_path / "ref", "digest", extractor, "2048")[0] != before[0]


def test_a_torn_cache_file_is_recomputed(inception, image_sets, tmp_path):  # noqa: F811
    reference = write_folder(tmp_path / "ref", image_sets["b_array"])
    first = compute_metrics(image_sets["a"], reference, ["fid"], feature_extractor_weights=inception, **FAST)
    cached = next(tmp_path.glob("ref.*.stats.npz"))
    cached.write_bytes(cached.read_bytes()[:100])  # a power loss mid-write
    again = compute_metrics(image_sets["a"], reference, ["fid"], feature_extractor_weights=inception, **FAST)
    assert again["fid"] == first["fid"]
    assert metrics.read_statistics(cached)[1]["num_images"] == 12  # rewritten whole


def test_small_sets_get_errors_not_meaningless_numbers(inception, image_sets, tmp_path):  # noqa: F811
    few = write_folder(tmp_path / "few", image_sets["b_array"][:3])
    with pytest.raises(ValueError, match=r"few has 3 image\(s\), too few for prc: precision/recall needs more than"):
        compute_metrics(image_sets["a"], few, ["prc"], feature_extractor_weights=inception, **FAST)
    with pytest.raises(ValueError, match="KID needs subsets of >= 2 images"):
        compute_metrics(image_sets["a"], few, ["kid"], feature_extractor_weights=inception, kid_subset_size=1, **FAST)
    same_size = shutil.copytree(image_sets["b"], tmp_path / "b12")
    whole = compute_metrics(image_sets["a"], same_size, ["kid"], feature_extractor_weights=inception, **FAST)
    assert whole["kid_subset_size"] == 12 and whole["kid_std"] is None  # 100 copies of one subset: no spread
