"""The benchmark script's code path (tiny models, CPU) and the Gradio demo end to end on loopback."""
import json
import math
import re
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from vartk.bench import Row, format_row
from vartk.bench import main as bench_main
from vartk.models.var import VARTransformer
from vartk.pipelines import VARPipeline
from vartk.tokenizers.msvq import MultiScaleVQVAE


def test_bench_tiny_runs_every_model_and_batch(capsys):
    rows = bench_main(["--tiny", "--device", "cpu", "--dtype", "float32", "--batches", "1", "2", "--repeats", "1"])
    assert [(r.model, r.batch) for r in rows] == [("VAR-tiny", 1), ("VAR-tiny", 2), ("GPT-tiny", 1), ("GPT-tiny", 2)]
    assert all(r.seconds > 0 and math.isclose(r.images_per_second, r.batch / r.seconds) for r in rows)
    assert [r.forwards_per_image for r in rows] == [10, 10, 16, 16]  # 10 scales; prefill + 15 decode steps
    assert all(r.kv_mib > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "| model | sampler | KV cache | batch |" in printed and printed.count("| VAR-tiny | nextscale | full |") == 2


def test_bench_times_each_sampler_and_kv_cache_of_the_models_family(capsys, tmp_path):
    """Samplers and policies run only on the family they belong to; KV bytes follow the policy; --json."""
    rows = bench_main(["--tiny", "--device", "cpu", "--batches", "2", "--repeats", "1", "--sampler", "sjd:window=4",
                       "--sampler", "nextscale", "--kv-cache", "full", "--kv-cache", "sliding:budget=0.5",
                       "--json", str(tmp_path / "rows.json")])
    assert [(r.model, r.sampler, r.kv_cache) for r in rows] == [
        ("VAR-tiny", "nextscale", "full"), ("VAR-tiny", "nextscale", "sliding:budget=0.5"),
        ("GPT-tiny", "sjd:window=4", "-")]
    full, sliding, sjd = rows
    assert sliding.kv_mib < full.kv_mib
    assert sjd.forwards_per_image < 16 and sjd.tokens_per_forward > 1
    assert [row["sampler"] for row in json.loads((tmp_path / "rows.json").read_text())] == [r.sampler for r in rows]


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    torch.manual_seed(0)
    transformer = VARTransformer(depth=2, width=64, num_heads=2, vocab_size=32, latent_channels=8, num_classes=3,
                                 patch_nums=(1, 2, 4))
    transformer.init_weights(init_adaln_gamma=0.5, init_head=1.0)  # large gates/head: the class shows in the samples
    pipe = VARPipeline(
        tokenizer=MultiScaleVQVAE(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, vocab_size=32,
                                  patch_nums=(1, 2, 4), norm_groups=8),
        transformer=transformer,
        class_names=["cat", "dog", "fox"],
    )
    folder = tmp_path_factory.mktemp("demo") / "tiny"
    pipe.save_pretrained(folder)
    return str(folder)


def test_format_row_compares_with_the_official_throughput():
    row = format_row(Row("GPT-B", "nexttoken:cuda_graph=false", "-", 64, seconds=1.0, first_call=3.0, peak_mib=100.0,
                         forwards_per_image=256, tokens_per_forward=1.0, kv_mib=12.5))
    # 64 img/s against the official GPT-B at batch 64: 18.1 img/s eager (64 / 18.1 = 3.54), 198.6 compiled (0.32)
    assert row == ("| GPT-B | nexttoken:cuda_graph=false | - | 64 | 1.000 | 64.0 | 0.0156 | 256.0 | 1.00 | 12.50 | 100 | "
                   "3.00 | 3.533 | 18.1 | 2583 | 3.54x | 0.32x |")
    row = format_row(Row("VAR-tiny", "nextscale", "full", 2, seconds=0.5, first_call=1.0, peak_mib=float("nan")))
    assert row.startswith("| VAR-tiny | nextscale | full | 2 | 0.500 | 4.0 |") and row.endswith("| - | - | - | - | - |")
    speculative = format_row(Row("GPT-B", "sjd", "-", 64, seconds=1.0, first_call=3.0, peak_mib=1.0))
    assert speculative.endswith("| - | - | - | - | - |")  # the official numbers describe plain sampling only


@pytest.mark.parametrize("argv,message", [
    (["--tiny", "--only", "GPT-B"], r"--only \['GPT-B'\] unknown; the tiny models are \['GPT-tiny', 'VAR-tiny'\]"),
    (["--tiny", "--repeats", "0"], "--repeats: expected an integer >= 1, got '0'"),
    ([], "take hours per row on a CPU; run on a GPU, pass --model for a loaded model, or --tiny"),
    (["--tiny", "--sampler", "sjdd"], r"--sampler 'sjdd': unknown sampler 'sjdd'; available: \['nexttoken'"),
    (["--tiny", "--kv-cache", "scalekv:budget=2"], r"--kv-cache 'scalekv:budget=2': budget must be in \(0, 1\]"),
])
def test_bench_refuses_what_would_mislead_or_take_hours(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_main(["--device", "cpu", *argv])
    assert re.search(message, capsys.readouterr().err)


def test_demo_backend_generates_named_classes(demo_folder):
    from vartk.demo import DemoBackend

    backend = DemoBackend([demo_folder], "cpu")
    assert backend.class_choices(demo_folder) == ["cat", "dog", "fox"]
    images, cost = backend.generate(demo_folder, "dog", 3, 1.5, 10, 0.9, 0)
    assert len(images) == 3 and images[0].size == (8, 8)
    assert re.fullmatch(r"[0-9.]+ s, 3\.0 transformer forwards per image \(7\.00 tokens per forward\), KV cache .*B", cost)
    as_arrays = lambda images: [np.asarray(im) for im in images]  # noqa: E731
    assert np.array_equal(as_arrays(backend.generate(demo_folder, "dog", 3, 1.5, 10, 0.9, None)[0]),
                          as_arrays(images))
    assert len(backend.generate(demo_folder, "dog", 1, 1.5, 10, 0.9, 2**70)[0]) == 1  # a cleared or huge seed box
    assert backend.sampler_choices(demo_folder)[0] == "nextscale" and "scalekv" in backend.kv_cache_choices(demo_folder)


def test_demo_generate_is_the_pipeline_call_for_that_class_and_seed(demo_folder):
    from vartk.demo import DemoBackend
    from vartk.loading import load

    pipe = load(demo_folder)
    run = lambda label: pipe(class_labels=[label], num_images_per_label=2, guidance_scale=1.5, top_k=10,  # noqa: E731
                             top_p=0.9, generator=torch.Generator().manual_seed(7), output_type="np",
                             progress=False).images
    images, _ = DemoBackend([demo_folder], "cpu").generate(demo_folder, "fox", 2, 1.5, 10, 0.9, 7)
    fox = np.stack([np.asarray(image) for image in images])
    np.testing.assert_array_equal(fox, run(2))
    assert not np.array_equal(fox, run(0))  # the class shows in the samples


def test_demo_serves_on_loopback(demo_folder):
    gradio_client = pytest.importorskip("gradio_client")
    from vartk.demo import DemoBackend, build_demo, launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = DemoBackend([demo_folder], "cpu")
    demo = build_demo(backend)
    launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
        gallery, cost = client.predict(demo_folder, "fox", 2, 1.5, 10, 0.9, 0, None, None, api_name="/generate")
        assert len(gallery) == 2 and "transformer forwards per image" in cost
        *images, cost_a, cost_b, difference = client.predict(demo_folder, "fox", 1.5, 10, 0.9, 0, "nextscale", "full",
                                                             None, None, api_name="/compare")
        assert len(images) == 2 and "KV cache" in cost_a and "KV cache" in cost_b
        assert difference == "A and B are identical (PSNR inf)"  # the pipeline's own sampler and cache: the same

        def refuse(*values):
            raise ValueError("guidance_scale must be a finite number >= 0, got nan")

        backend.generate = refuse
        with pytest.raises(Exception, match="guidance_scale must be a finite number"):  # the message reaches the user
            client.predict(demo_folder, "fox", 1, 1.5, 10, 0.9, 0, None, None, api_name="/generate")
    finally:
        demo.close()


def paint(shape: tuple[int, int], *cells: tuple[slice, slice]) -> np.ndarray:
    """A painted-alpha array [H, W]: 200 on the given (rows, columns), 0 elsewhere."""
    painted = np.zeros(shape, np.uint8)
    for cell in cells:
        painted[cell] = 200
    return painted


def test_demo_edit_is_the_pipelines_inpaint_of_the_painted_tokens(demo_folder):
    """An upload four times the model's size (as the editor holds a sample) comes back to the exact sample; the
    tokens any painted pixel touches are regenerated (inpaint, class edit) or kept (outpaint)."""
    from vartk.demo import DemoBackend

    backend = DemoBackend([demo_folder], "cpu")
    (image,), _ = backend.generate(demo_folder, "cat", 1, 1.5, 10, 0.9, 0)  # 8 x 8, 4 x 4 tokens
    upload = image.resize((32, 32), Image.Resampling.NEAREST)
    painted = paint((32, 32), (slice(0, 3), slice(20, 22)), (slice(31, 32), slice(0, 1)))  # tokens (0, 2), (3, 0)
    regenerate = torch.zeros(4, 4)
    regenerate[0, 2] = regenerate[3, 0] = 1
    for mode, keep, label in (("inpaint", 1 - regenerate, None), ("outpaint", regenerate, None),
                              ("class edit", 1 - regenerate, 2)):
        edited, text = backend.edit(demo_folder, upload, painted, mode, "fox", 1.5, 10, 0.9, 3)
        expected = backend.pipes[demo_folder].inpaint(image, keep, class_label=label, guidance_scale=1.5, top_k=10,
                                                      top_p=0.9, generator=torch.Generator().manual_seed(3),
                                                      output_type="np", progress=False).images[0]
        np.testing.assert_array_equal(np.asarray(edited), expected)
        assert text.startswith(f"{mode}: regenerated {int((1 - keep).sum())} of 16 tokens; ")
        assert "transformer forwards per image" in text


def test_demo_token_mask_follows_the_image_fitted_into_a_square():
    """A wide image is fitted into a square with white bands above and below; the mask moves with it."""
    from vartk.demo import fit_square, token_mask

    painted = paint((10, 20), (slice(9, 10), slice(19, 20)))  # the bottom-right pixel of a 20 x 10 image
    mask = token_mask(painted, (10, 20), 4)  # the square is 20 x 20, the image in rows 5-14: token (2, 3)
    assert mask.shape == (4, 4) and mask.sum() == 1 and mask[2, 3] == 1
    square = np.asarray(fit_square(Image.new("RGB", (20, 10), "black"), 8))
    assert (square[:2] == 255).all() and (square[2:6] == 0).all() and (square[6:] == 255).all()


def test_demo_compare_is_one_seed_under_two_policies(demo_folder):
    from vartk.demo import DemoBackend
    from vartk.metrics import psnr

    backend = DemoBackend([demo_folder], "cpu")
    settings = (demo_folder, "dog", 1.5, 10, 0.9, 5)
    image_a, image_b, cost_a, cost_b, difference = backend.compare(*settings, "nextscale", "full", None,
                                                                   "sliding:budget=0.5")
    (alone,), cost = backend.generate(demo_folder, "dog", 1, 1.5, 10, 0.9, 5, "nextscale", "full")
    np.testing.assert_array_equal(np.asarray(image_a), np.asarray(alone))  # A is that call on its own
    kv_bytes = lambda line: re.search(r"KV cache (.*)$", line).group(1)  # noqa: E731
    assert kv_bytes(cost_a) == kv_bytes(cost) and kv_bytes(cost_b) != kv_bytes(cost_a)
    value = psnr(np.asarray(image_a), np.asarray(image_b))
    assert difference == (f"PSNR between A and B: {value:.2f} dB" if math.isfinite(value)
                           else "A and B are identical (PSNR inf)")
    assert backend.compare(*settings, None, None, "nextscale", "full")[4] == "A and B are identical (PSNR inf)"


WHITE = Image.new("RGB", (8, 8), "white")  # an image of the tiny model's size


@pytest.mark.parametrize("method,values,match", [
    ("generate", ("dog", 17, 1.5, 10, 0.9, 0), r"images must be at most 16 \(the demo's cap; `vartk sample --n`"),
    ("generate", ("dog", 1, 1.5, 33, 0.9, 0), r"top-k must be at most 32 \(the model's vocabulary size; 0 = off\), "
                                              "got 33"),
    ("edit", (None, None, "inpaint", "dog", 1.5, 10, 0.9, 0), "no image to edit: upload one, or send one from"),
    ("edit", (WHITE, paint((8, 8)), "inpaint", "dog", 1.5, 10, 0.9, 0), "nothing is painted: paint the region"),
    ("edit", (WHITE, paint((8, 9)), "inpaint", "dog", 1.5, 10, 0.9, 0),
     r"the painted mask is \[8, 9\] but the image is \[8, 8\]"),
    ("edit", (WHITE, paint((8, 8)), "erase", "dog", 1.5, 10, 0.9, 0),
     r"edit mode 'erase' is unknown; choose one of \['inpaint', 'outpaint', 'class edit'\]"),
])
def test_demo_refuses_values_past_its_limits(demo_folder, method, values, match):
    from vartk.demo import DemoBackend

    with pytest.raises(ValueError, match=match):
        getattr(DemoBackend([demo_folder], "cpu"), method)(demo_folder, *values)


def test_demo_edits_with_next_scale_models_only_and_its_controls_follow_the_model(tiny_pipelines):
    pytest.importorskip("gradio")
    from vartk.demo import DemoBackend, setting_sliders, spec_dropdowns

    gpt_pipe, var_pipe = tiny_pipelines
    backend = DemoBackend.__new__(DemoBackend)
    backend.pipes = {"gpt": gpt_pipe, "var": var_pipe}
    assert backend.editable_models() == ["var"]
    with pytest.raises(ValueError, match=r"model 'gpt' cannot edit images \(next-scale models can\); choose one of "
                                         r"\['var'\]"):
        backend.edit("gpt", Image.new("RGB", (8, 8)), paint((8, 8)), "inpaint", "0", 1.5, 10, 0.9, 0)
    for name, pipe in backend.pipes.items():
        guidance, top_k, top_p = setting_sliders(backend, name)
        assert top_k.maximum == pipe.transformer.config.vocab_size
        assert (guidance.value, top_k.value, top_p.value) == backend.sampling_sliders(name)
    sampler, kv_cache = spec_dropdowns(backend, "gpt")
    assert [value for value, _ in sampler.choices] == backend.sampler_choices("gpt") and not kv_cache.interactive
    assert spec_dropdowns(backend, "var")[1].interactive


def test_cli_passes_flags_through_to_bench_and_train(capsys):
    from vartk.cli import main as cli_main

    cli_main(["bench", "--tiny", "--device", "cpu", "--dtype", "float32", "--batches", "1", "--repeats", "1",
              "--only", "VAR-tiny"])
    assert "| VAR-tiny | nextscale | full | 1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="JOB is tokenizer, var, gpt or export"):
        cli_main(["train", "--data", "x"])
    with pytest.raises(SystemExit, match="unknown job 'nope'"):
        cli_main(["train", "nope"])


def test_demo_port_is_checked_by_the_parser(capsys):
    from vartk.demo import main as demo_main

    with pytest.raises(SystemExit):
        demo_main(["--port", "99999"])
    assert "expected an integer in 1-65535, got '99999'" in capsys.readouterr().err


def test_demo_help_gives_every_option_with_its_default(capsys):
    from vartk.arguments import DEFAULT_DEVICE
    from vartk.demo import main as demo_main

    with pytest.raises(SystemExit):
        demo_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (("--model", "(default: the built-in models default and default-gpt)"),
                            ("--device", f"(default: {DEFAULT_DEVICE})"), ("--host", "(default: 127.0.0.1,"),
                            ("--port", "(default: 7860)")):
        described = text.split(f" {option} {option[2:].upper()} ")[1].split(" --")[0]  # its line in the options
        assert default in described, (option, described)
    assert "at most 16 images a call" in text and "Sample" in text and "Edit" in text and "Compare" in text


@pytest.mark.parametrize("limit, start, cap", [(37, 1, 4096), (37, 64, 4096), (1, 8, 100), (0, 4, 100), (500, 16, 300),
                                               (4096, 1, 4096), (100, 100, 1000)])
def test_the_largest_batch_search_brackets_the_limit(limit, start, cap):
    """Doubling then bisection, against a stand-in device on which batches up to `limit` fit: the answer fits,
    is within the resolution (1/8) of the largest that does, and the search stays within the cap."""
    from vartk.bench import largest_batch

    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= limit

    found = largest_batch(fits, start, cap)
    best = min(limit, cap)
    assert found <= best and (best == 0 or found >= best / 1.125 - 1)
    assert all(1 <= b <= cap for b in tried) and len(tried) <= 2 * cap.bit_length() + 2
    if best and best < cap:
        assert found + 1 > limit / 1.125 and any(b > limit for b in tried)  # a failure bounded the answer


def test_bench_max_batch_reports_the_largest_batch_that_fits(capsys, monkeypatch):
    """On a CPU nothing runs out of memory, so the search reaches the cap; a stand-in allocator that refuses
    batches above 5 shows the search stops there."""
    import vartk.bench as bench

    rows = bench_main(["--tiny", "--device", "cpu", "--only", "VAR-tiny", "--max-batch", "--max-batch-cap", "4",
                       "--batches", "1", "--kv-cache", "full", "--kv-cache", "sliding:budget=0.5"])
    assert [(r.kv_cache, r.batch) for r in rows] == [("full", 4), ("sliding:budget=0.5", 4)]
    assert all(r.seconds > 0 and r.kv_gib > 0 for r in rows) and rows[1].kv_gib < rows[0].kv_gib
    real = bench.sample_once

    def refusing(model, sampler, policy, batch, device):
        if batch > 5:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes")
        return real(model, sampler, policy, batch, device)

    monkeypatch.setattr(bench, "sample_once", refusing)
    rows = bench_main(["--tiny", "--device", "cpu", "--only", "VAR-tiny", "--max-batch", "--batches", "2"])
    assert rows[0].batch == 5
    assert "| VAR-tiny | nextscale | full | 5 |" in capsys.readouterr().out
