"""eval/fid.py: resumable sharded sampling, torchrun shards, scoring output, compare mode."""
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import FrozenDict

from _fid_helpers import (  # noqa: F401  (inception, tiny_pipeline, uninterrupted: fixtures)
    REPO, RUN, fid, inception, independent_fid, independent_kid, random_images, register_stubs, tiny_pipeline,
    uninterrupted, write_folder,
)
from vartk.images import images_to_uint8, resize_and_clamp
from vartk.metrics import LayerStatistics, read_image, save_statistics
from vartk.pipelines import VARPipeline
from vartk.samplers import NextScaleSampler
from vartk.tokenizers.msvq import MultiScaleVQVAE


def images_of(run) -> dict:
    return {p.name: read_image(p) for p in sorted((run / "samples").glob("batch_*/*.png"))}


def batch_metas(run) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "samples").glob("batch_*/meta.json"))]


def test_killed_run_resumes_to_exactly_the_planned_images(tiny_pipeline, uninterrupted, tmp_path, monkeypatch,
                                                           capsys):
    out = tmp_path / "run"
    monkeypatch.setenv(fid.STOP_AFTER_ENV, "2")
    with pytest.raises(RuntimeError, match="test hook"):
        fid.evaluate(str(tiny_pipeline), out, **RUN)
    assert len(batch_metas(out)) == 2
    died_in = out / "samples" / ".batch_000002.tmp"  # the batch it died in: images written, not committed
    assert len(list(died_in.glob("*.png"))) == 2 and not (died_in / "meta.json").exists()

    monkeypatch.delenv(fid.STOP_AFTER_ENV)
    capsys.readouterr()
    result = fid.evaluate(str(tiny_pipeline), out, **RUN)
    assert result["resumed_batches"] == 2
    assert capsys.readouterr().out.splitlines()[0] == "resuming: 2 of 5 batches done"
    everything = [p.relative_to(out / "samples") for p in (out / "samples").rglob("*")]
    assert not [p for p in everything if p.name.startswith(".") or p.parent.name.startswith(".")]
    metas = batch_metas(out)
    assert sorted(i for m in metas for i in m["indices"]) == list(range(10))
    assert len({m["seed"] for m in metas}) == 5
    assert [label for m in metas for label in m["labels"]] == [i % 10 for i in range(10)]  # class-balanced
    resumed, plain = images_of(out), images_of(uninterrupted)
    assert sorted(resumed) == [f"{i:08d}.png" for i in range(10)]
    assert all(np.array_equal(resumed[name], plain[name]) for name in plain)
    assert len({image.tobytes() for image in plain.values()}) == 10  # seeds and labels differ per image


def test_batch_b_is_sampled_from_seed_sequence_of_seed_and_b(tiny_pipeline, uninterrupted):
    """README: batch b samples from SeedSequence([seed, b]); its meta.json records that seed, and sampling
    image i's class (i % 10) from it with VAR's protocol gives the written images."""
    seeds = [int(np.random.SeedSequence([0, b]).generate_state(1)[0]) for b in range(5)]
    assert [m["seed"] for m in batch_metas(uninterrupted)] == seeds
    pipe = VARPipeline.from_pretrained(tiny_pipeline)
    generator = torch.Generator().manual_seed(seeds[3])  # batch 3: images 6 and 7
    images = pipe(class_labels=[6, 7], guidance_scale=1.5, top_k=900, top_p=0.96, generator=generator,
                  output_type="np", progress=False).images
    written = images_of(uninterrupted)
    assert np.array_equal(images, np.stack([written["00000006.png"], written["00000007.png"]]))


def test_random_labels_are_drawn_per_batch_from_seed_and_batch(tiny_pipeline, tmp_path):
    """--labels random: batch b's labels are default_rng([seed, b, 1]).integers(0, num_classes, size), pinned
    so that earlier runs stay reproducible."""
    fid.evaluate(str(tiny_pipeline), tmp_path, labels="random", seed=3, num_images=3, batch_size=2, sample_only=True)
    expected = [np.random.default_rng([3, b, 1]).integers(0, 10, size).tolist() for b, size in enumerate([2, 1])]
    assert [m["labels"] for m in batch_metas(tmp_path)] == expected


def test_resuming_with_other_settings_is_refused(tiny_pipeline, uninterrupted):
    with pytest.raises(ValueError, match="guidance_scale: 1.5 -> 3.0"):
        fid.evaluate(str(tiny_pipeline), uninterrupted, guidance_scale=3.0, **RUN)


def test_resuming_after_the_models_weights_changed_is_refused(tiny_pipeline, tmp_path):
    model, out = tmp_path / "model", tmp_path / "run"
    pipe = VARPipeline.from_pretrained(tiny_pipeline)
    pipe.save_pretrained(model)
    fid.evaluate(str(model), out, **{**RUN, "num_images": 2})
    with torch.no_grad():
        pipe.transformer.head.bias.add_(1.0)  # retrained into the same folder
    pipe.save_pretrained(model)
    with pytest.raises(ValueError, match=r"sampled with other settings \(weights: '[0-9a-f]{16}' -> '[0-9a-f]{16}'\)"):
        fid.evaluate(str(model), out, **{**RUN, "num_images": 2})


def test_torchrun_ranks_write_disjoint_complete_shards(tiny_pipeline, uninterrupted, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO / "eval" / "fid.py"), "--model", str(tiny_pipeline), "--out", str(out),
        "--num-images", "8", "--batch-size", "2", "--sample-only",
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    metas = batch_metas(out)
    assert [m["batch"] for m in metas] == [0, 1, 2, 3]
    assert [m["rank"] for m in metas] == [0, 1, 0, 1]  # batch b on rank b % 2
    shards, plain = images_of(out), images_of(uninterrupted)
    assert sorted(shards) == [f"{i:08d}.png" for i in range(8)]
    assert all(np.array_equal(shards[name], plain[name]) for name in shards)  # same images as one process


def test_scored_run_writes_results_json(tiny_pipeline, uninterrupted, tmp_path, capsys):
    register_stubs()
    reference = write_folder(tmp_path / "ref", random_images(6, seed=0, size=8))
    result = fid.main([
        "--model", str(tiny_pipeline), "--out", str(uninterrupted), "--num-images", "10", "--batch-size", "2",
        "--reference", str(reference), "--metrics", "fid,is,kid,prc", "--feature-extractor", "stub-classifier",
    ])
    saved = json.loads((uninterrupted / "results.json").read_text())
    assert saved["metrics"] == pytest.approx(result["metrics"])
    assert {"fid", "is", "kid", "precision", "recall"} <= saved["metrics"].keys()
    assert saved["metrics"]["num_generated"] == 10 and saved["metrics"]["num_reference"] == 6
    assert saved["settings"]["guidance_scale"] == 1.5 and saved["settings"]["top_k"] == 900
    assert saved["settings"]["top_p"] == 0.96 and saved["resumed_batches"] == 5
    assert {"torch", "torch_fidelity", "vartk"} <= saved["versions"].keys() and "scoring" in saved["time_s"]
    assert "FID" in capsys.readouterr().out.strip().splitlines()[-1]


def test_without_progress_bars_a_run_prints_only_its_summary_line(tiny_pipeline, tmp_path, capsys):
    register_stubs()
    reference = write_folder(tmp_path / "ref", random_images(6, seed=0, size=8))
    run = tmp_path / "run"
    capsys.readouterr()
    result = fid.main([
        "--model", str(tiny_pipeline), "--out", str(run), "--num-images", "4", "--batch-size", "2", "--reference",
        str(reference), "--metrics", "fid", "--feature-extractor", "stub-classifier", "--no-progress",
    ])
    out, err = capsys.readouterr()
    assert err == ""  # no sampling bar, no feature extraction bar
    summary = rf"{tiny_pipeline}: FID {result['metrics']['fid']:.4g} \| 4 images \| sampling \d+s scoring \d+s \| "
    assert re.fullmatch(summary + str(run / "results.json") + "\n", out)


def test_sets_with_no_more_images_than_features_are_warned_about(tiny_pipeline, uninterrupted, tmp_path, capsys):
    """The stub's FID features are the 3 mean colours: a covariance of 3 images has rank 2 < 3."""
    register_stubs()
    run = ["--model", str(tiny_pipeline), "--out", str(uninterrupted), "--num-images", "10", "--batch-size", "2",
           "--metrics", "fid,kid", "--feature-extractor", "stub-classifier", "--json", str(tmp_path / "results.json")]
    small = write_folder(tmp_path / "small", random_images(3, seed=0, size=8))
    capsys.readouterr()
    result = fid.main([*run, "--reference", str(small)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["warnings"] == result["warnings"] and len(saved["warnings"]) == 1
    assert saved["warnings"][0].startswith("FID: the reference has 3 images, no more than the 3 features of "
                                           "stub-classifier layer colour")
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2] == f"warning: {saved['warnings'][0]}" and lines[-1].startswith(f"{tiny_pipeline}: FID ")
    large = write_folder(tmp_path / "large", random_images(4, seed=0, size=8))
    assert fid.main([*run, "--reference", str(large)])["warnings"] == []
    assert json.loads((tmp_path / "results.json").read_text())["warnings"] == []


def test_identical_sets_score_and_print_fid_0(uninterrupted, inception, capsys):  # noqa: F811
    result = fid.compare(uninterrupted, uninterrupted, metrics=("fid",), feature_extractor_weights=inception,
                         feature_layer="64", device="cpu")
    assert result["metrics"]["fid"] == 0.0
    assert " FID 0 | " in capsys.readouterr().out


def test_scoring_without_metrics_gives_the_documented_default_set(tiny_pipeline, uninterrupted, tmp_path):
    """No --metrics: FID, IS and precision/recall against a reference with images (the README's summary
    line), FID and IS against statistics only, IS without a reference."""
    register_stubs()
    reference = write_folder(tmp_path / "ref", random_images(6, seed=0, size=8))
    statistics = tmp_path / "stats.npz"
    meta = {"feature_extractor": "stub-classifier", "feature_layer": "colour", "weights": "default"}
    save_statistics(statistics, LayerStatistics(np.zeros(3), np.eye(3), None), meta)
    run = ["--model", str(tiny_pipeline), "--out", str(uninterrupted), "--num-images", "10", "--batch-size", "2",
           "--feature-extractor", "stub-classifier", "--json", str(tmp_path / "results.json")]
    scored = lambda *reference: set(fid.main([*run, *reference])["metrics"])  # noqa: E731
    assert scored("--reference", str(reference)) == {
        "fid", "is", "is_std", "precision", "recall", "num_generated", "num_reference",
    }
    assert scored("--reference", str(statistics)) == {"fid", "is", "is_std", "num_generated"}
    assert scored() == {"is", "is_std", "num_generated"}


def test_compare_mode_matches_independent_computations(tiny_pipeline, uninterrupted, tmp_path):
    """FID and KID (compare's default metrics) of the stub's features, the mean colours, and per-image PSNR."""
    register_stubs()
    other = tmp_path / "smooth"  # the same seeds and labels, another sampler: image i of both runs pairs up
    fid.evaluate(str(tiny_pipeline), other, sampler="nextscalesampler:more_smooth=true", **RUN)
    result = fid.main([
        "--compare", str(uninterrupted), str(other), "--out", str(tmp_path / "compare.json"),
        "--feature-extractor", "stub-classifier",
    ])
    a, b = images_of(uninterrupted), images_of(other)
    colours = [np.stack([image.reshape(-1, 3).mean(0) for image in run.values()]) for run in (a, b)]  # [10, 3]
    assert result["metrics"]["fid"] == pytest.approx(independent_fid(*colours), rel=1e-5)
    assert result["metrics"]["kid"] == pytest.approx(independent_kid(*colours), rel=1e-3)  # kernel ~1e12 in float32
    expected = {}
    for name in a:
        mse = ((torch.tensor(a[name], dtype=torch.float64) - torch.tensor(b[name], dtype=torch.float64)) ** 2).mean()
        expected[name] = (20 * torch.log10(torch.tensor(255.0, dtype=torch.float64)) - 10 * torch.log10(mse)).item()
    per_image = result["metrics"]["per_image"]
    assert per_image.keys() == expected.keys()
    assert all(per_image[name] == pytest.approx(expected[name], rel=1e-9) for name in expected)
    assert result["metrics"]["psnr_mean"] == pytest.approx(np.mean(list(expected.values())), rel=1e-9)
    assert json.loads((tmp_path / "compare.json").read_text())["metrics"]["num_pairs"] == 10
    fid.evaluate(str(tiny_pipeline), tmp_path / "seed1", seed=1, **RUN)
    with pytest.raises(SystemExit, match=r"drew image i from different seeds or labels \(seed 0 vs 1\)"):
        fid.main(["--compare", str(uninterrupted), str(tmp_path / "seed1"), "--feature-extractor", "stub-classifier",
                  "--metrics", "fid"])


def test_sampler_specs_are_parsed_by_name(tiny_pipeline, tmp_path):
    result = fid.evaluate(str(tiny_pipeline), tmp_path / "smooth", sampler="nextscale:more_smooth=true", **RUN)
    assert result["settings"]["sampler"] == "nextscale:more_smooth=true"
    with pytest.raises(ValueError, match=r"unknown next-scale sampler 'nosuch'; available: \['nextscale'"):
        fid.evaluate(str(tiny_pipeline), tmp_path / "bad", sampler="nosuch:window=16", **RUN)


def test_llamagen_protocol_follows_the_model_size():
    def gpt(dim, n_layer, n_head, grid_size=24):
        config = FrozenDict(dim=dim, n_layer=n_layer, n_head=n_head, grid_size=grid_size)  # as diffusers' .config
        return SimpleNamespace(family="llamagen", transformer=SimpleNamespace(config=config),
                               tokenizer=SimpleNamespace(downsample_factor=16), config=FrozenDict())

    # the cfg of each released checkpoint's FID in the LlamaGen README (c2i_L_256's 3.80 is at 1.75, B_384's 6.09
    # at 2.25); presets are recognised from the config or the official name
    readme_rows = [((768, 12, 12, 16), "b", 2.0), ((768, 12, 12, 24), "b", 2.25), ((1024, 24, 16, 16), "l", 1.75),
                   ((1024, 24, 16, 24), "l", 2.0), ((1280, 36, 20, 24), "xl", 1.75), ((1536, 48, 24, 24), "xxl", 1.75),
                   ((3200, 24, 32, 24), "3b", 1.65), ((1, 1, 1, 16), "llamagen-l", 1.75), ((1, 1, 1), "llamagen-3b", 1.65)]
    for config, name, cfg in readme_rows:
        assert fid.protocol_settings(gpt(*config), name) == {"guidance_scale": cfg, "top_k": 0, "top_p": 1.0}, name
    assert fid.resolve_eval_size(gpt(768, 12, 12, grid_size=24), "auto") == 256  # 384 px -> 256 for FID
    assert fid.resolve_eval_size(gpt(768, 12, 12, grid_size=16), "auto") is None


def test_labels_follow_each_familys_fid_script(tiny_pipeline, tmp_path):
    """VAR's protocol is 50 per class (balanced); LlamaGen's script draws labels uniformly per batch."""
    from vartk.models.gpt import GPTTransformer
    from vartk.pipelines import GPTPipeline

    assert fid.evaluate(str(tiny_pipeline), tmp_path / "var", **RUN)["settings"]["labels"] == "balanced"
    torch.manual_seed(0)
    tokenizer = MultiScaleVQVAE(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32, patch_nums=(2,),
                                norm_groups=8)
    transformer = GPTTransformer(dim=32, n_layer=1, n_head=2, vocab_size=32, num_classes=10, grid_size=2)
    result = fid.evaluate(GPTPipeline(tokenizer=tokenizer, transformer=transformer), tmp_path / "gpt", **RUN)
    assert result["settings"]["labels"] == "random"
    drawn = [meta["labels"] for meta in batch_metas(tmp_path / "gpt")]
    assert drawn == [np.random.default_rng([0, b, 1]).integers(0, 10, 2).tolist() for b in range(5)]


def test_resize_to_256_matches_llamagen_official_script():
    """384 -> 256 px as LlamaGen's sample_c2i_ddp.py does it: bicubic on the decoder's unclamped samples (which
    overshoot [-1, 1]), then clamp(127.5 x + 128, 0, 255) cast to uint8; the two differ only where round(255 x)
    meets a tie. Clamping before the resize is another protocol: it differs in many pixels."""
    decoded = 1.3 * (2 * torch.rand(2, 3, 384, 384, generator=torch.Generator().manual_seed(0)) - 1)  # [-1.3, 1.3]
    samples = F.interpolate(decoded, size=(256, 256), mode="bicubic")
    official = torch.clamp(127.5 * samples + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8).numpy()
    ours = images_to_uint8(resize_and_clamp((decoded + 1) / 2, 256))  # what the pipelines give for output_size=256
    assert ours.shape == official.shape == (2, 256, 256, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(np.int64) - official)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999
    clamped_first = images_to_uint8(resize_and_clamp((decoded.clamp(-1, 1) + 1) / 2, 256))
    assert (clamped_first != official).mean() > 0.01


def test_pipelines_resize_the_unclamped_decoder_output(tiny_pipeline):
    """output_size resizes what the decoder gives before any clamp (random weights overshoot [0, 1]): the images
    equal the sampler's latent decoded unclamped, resized, then clamped, and differ from clamping first."""
    pipe = VARPipeline.from_pretrained(tiny_pipeline)
    size = pipe.tokenizer.latent_size * pipe.tokenizer.downsample_factor * 3 // 2
    with torch.no_grad():
        images = pipe(class_labels=[1, 2], output_type="pt", output_size=size, progress=False,
                      generator=torch.Generator().manual_seed(0)).images  # [2, 3, size, size]
        latent = NextScaleSampler()(pipe.transformer, pipe.tokenizer, torch.tensor([1, 2]),
                                    **pipe.sampling_options(), generator=torch.Generator().manual_seed(0),
                                    progress=False).latent
        decoded = pipe.tokenizer.decode_latent(latent, clamp=False)
    assert decoded.min() < 0 or decoded.max() > 1
    torch.testing.assert_close(images, resize_and_clamp(decoded, size))
    assert not torch.allclose(images, resize_and_clamp(decoded.clamp(0, 1), size))


def test_saved_sampling_defaults_replace_the_published_protocol_and_flags_replace_both(tiny_pipeline, tmp_path):
    pipe = VARPipeline.from_pretrained(tiny_pipeline)
    assert fid.evaluate(pipe, tmp_path / "published", **RUN)["settings"]["top_k"] == 900  # VAR's FID settings
    pipe.register_to_config(sampling_defaults={"guidance_scale": 6.0, "top_k": 20})
    settings = fid.evaluate(pipe, tmp_path / "saved", **RUN)["settings"]
    assert (settings["guidance_scale"], settings["top_k"], settings["top_p"]) == (6.0, 20, 0.96)
    settings = fid.evaluate(pipe, tmp_path / "flag", top_k=7, **RUN)["settings"]
    assert (settings["guidance_scale"], settings["top_k"]) == (6.0, 7)


def test_reference_labels_follow_the_class_mix_of_the_reference_folder(tiny_pipeline, tmp_path):
    counts = [12, 1, 1, 6, 1, 1, 1, 1, 1, 1]  # 26 reference images, unbalanced like a held-out split
    reference = tmp_path / "reference"
    for c, n in enumerate(counts):
        write_folder(reference / f"class_{c}", random_images(n, seed=c, size=8))
    out = tmp_path / "run"
    run = dict(reference=str(reference), labels="reference", num_images=13, batch_size=5, sample_only=True)
    fid.evaluate(str(tiny_pipeline), out, **run)
    labels = [label for meta in batch_metas(out) for label in meta["labels"]]
    assert len(labels) == 13
    for c, n in enumerate(counts):  # each class within one image of its share of the 13
        assert abs(labels.count(c) - 13 * n / 26) < 1, (c, labels.count(c))
    plan = fid.SamplingPlan(13, 2, 10, 0, "reference", tuple(counts))  # other batch size, same image -> label
    assert [label for b in range(plan.num_batches) for label in plan.labels_of(b)] == labels
    fid.evaluate(str(tiny_pipeline), out, **run)  # the rerun resumes: the pinned counts compare equal
    assert len(batch_metas(out)) == 3
    write_folder(reference / "class_10", random_images(1, seed=10, size=8))
    with pytest.raises(ValueError, match=r"class folders \['class_0', .*'class_10'.*10 classes"):
        fid.evaluate(str(tiny_pipeline), tmp_path / "run2", **run)


def test_compare_refuses_runs_of_another_batch_size(tiny_pipeline, uninterrupted, tmp_path):
    """Image i's seed depends on its batch: runs differing only in --batch-size do not pair up."""
    register_stubs()
    other = tmp_path / "batch5"
    fid.evaluate(str(tiny_pipeline), other, **{**RUN, "batch_size": 5})
    with pytest.raises(SystemExit, match=r"different seeds or labels \(batch_size 2 vs 5\)"):
        fid.main(["--compare", str(uninterrupted), str(other), "--feature-extractor", "stub-classifier",
                  "--metrics", "fid"])


def test_a_stray_image_in_a_finished_batch_is_refused_at_scoring(tiny_pipeline, uninterrupted, tmp_path):
    import shutil

    register_stubs()
    run = shutil.copytree(uninterrupted, tmp_path / "run")
    batch = run / "samples" / "batch_000004"
    shutil.copy(next(batch.glob("*.png")), batch / "stray.png")
    with pytest.raises(ValueError, match="holds 11 images, not the 10 planned"):
        fid.evaluate(str(tiny_pipeline), run, num_images=10, batch_size=2, metrics=["is"],
                     feature_extractor="stub-classifier")


def test_reference_label_order_is_the_seeded_permutation_of_the_class_blocks():
    from vartk.evaluation import SamplingPlan

    counts = (3, 1, 0, 2)  # 6 images: the shares are whole, so the label multiset is exact
    for seed in (0, 7):
        plan = SamplingPlan(6, 4, 4, seed, "reference", counts)
        expected = np.random.default_rng([seed, 2]).permutation([0, 0, 0, 1, 3, 3])
        assert plan.reference_labels.tolist() == expected.tolist()
    orders = {tuple(SamplingPlan(6, 4, 4, seed, "reference", counts).reference_labels) for seed in range(5)}
    assert len(orders) > 1  # the seed matters, so the pin above would see another seed's order


def test_weights_fingerprint_hashes_tensor_names_and_bytes():
    import hashlib

    from vartk.evaluation import weights_fingerprint

    def module(**buffers):
        m = torch.nn.Module()
        for name, value in buffers.items():
            m.register_buffer(name, value)
        return m

    w = torch.arange(6, dtype=torch.float32)
    pipe = SimpleNamespace(tokenizer=module(a=w), transformer=module(b=torch.ones(2, dtype=torch.int64)))
    digest = hashlib.sha256()
    digest.update(b"a"), digest.update(w.numpy().tobytes())
    digest.update(b"b"), digest.update(np.ones(2, np.int64).tobytes())
    assert weights_fingerprint(pipe) == digest.hexdigest()[:16]
    renamed = SimpleNamespace(tokenizer=module(c=w), transformer=pipe.transformer)  # same bytes, other name
    assert weights_fingerprint(renamed) != weights_fingerprint(pipe)
