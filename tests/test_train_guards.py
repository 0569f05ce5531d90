"""Training: what protects a run (refused flags and --out folders, another run's folder, exports over foreign
folders, a missing `latest`, damaged checkpoints, divergence), what a run prints, resume exactness on the DataLoader
path, held-out folders matched to the training classes by name, image reading."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from _train_helpers import (  # noqa: F401  (images, one_thread: fixtures)
    FAST, TOKENIZER_ARGS, images, job_args, kill_after, one_thread, read_log, save_tokenizer, write_images,
)
from vartk.arguments import class_arguments
from vartk.cli import main as cli_main
from vartk.images import list_images, open_rgb
from vartk.train import train_main
from vartk.train.conditional import load_tokenizer
from vartk.train.data import BatchOrder, find_images, fits_in_memory
from vartk.train.gpt import GPTJob
from vartk.train.loop import Distributed, TrainConfig, load_validation_set
from vartk.train.resume import latest_checkpoint
from vartk.tokenizers.msvq import MultiScaleVQVAE


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A tokenizer run with checkpoints step_0000001 and step_0000002, and the flags that resume it."""
    root = tmp_path_factory.mktemp("saved_run")
    argv = ["--data", str(write_images(root / "images", classes=2, per_class=4)), "--batch-size", "4",
            "--save-every", "1", "--keep-checkpoints", "5", "--log-every", "1", *FAST, *TOKENIZER_ARGS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train_main("tokenizer", ["--out", str(root / "run"), "--max-steps", "2", *argv])
    torch.set_num_threads(threads)
    return root / "run", argv


def copy_of(saved_run, tmp_path):
    run, argv = saved_run
    return shutil.copytree(run, tmp_path / "run"), argv


@pytest.mark.parametrize("argv, message", [
    (["gpt", "--dim", "100", "--n-head", "8"], "these flags do not make a model: dim=100 must split into n_head=8"),
    (["var", "--depth", "0"], "--depth must be >= 1, got 0"),
    (["var", "--width", "100", "--num-heads", "3"], "width 100 is not divisible by num_heads 3"),
    (["tokenizer", "--vocab-size", "0"], "--vocab-size must be >= 2"),
    (["tokenizer", "--ch", "8", "--norm-groups", "3"], "norm_groups=3 must divide every channel count"),
    (["gpt", "--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["gpt", "--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
    (["var", "--lr", "inf"], "--lr must be a finite number, got inf"),
    (["var", "--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["var", "--init-adaln-gamma", "nan"], "--init-adaln-gamma must be a finite number, got nan"),
    (["gpt", "--class-balance", "nan"], "--class-balance must be a finite number, got nan"),
    (["gpt", "--class-balance", "inf"], "--class-balance must be a finite number, got inf"),
    (["tokenizer", "--beta", "-1"], "--beta must be >= 0, got -1.0"),
    (["tokenizer", "--l2-weight", "-1"], "--l2-weight must be >= 0, got -1.0"),
    (["tokenizer", "--gan-weight", "-1"], "--gan-weight must be >= 0, got -1.0"),
    (["tokenizer", "--quantizer", "vqgan"], r"^--quantizer 'vqgan' is unknown; use one of \('multiscale', 'llamagen'\)$"),
    (["tokenizer", "--quantizer", "llamagen", "--codebook-l2-norm"], r"^--codebook-l2-norm factorizes the multiscale"),
    (["tokenizer", "--entropy-temperature", "0"], r"^--entropy-temperature must be > 0, got 0.0$"),
    (["tokenizer", "--entropy-weight", "-1"], "--entropy-weight must be >= 0, got -1.0"),
    (["tokenizer", "--kmeans-iters", "2", "--kmeans-images", "1", "--vocab-size", "4096"],
     r"^--kmeans-images 1 give 680 vectors \(680 per image\) for --vocab-size 4096 codes; .* give --kmeans-images 7 "),
    (["tokenizer", "--crop-scale", "0.9"], r"^--crop-scale must be >= 1 \(1: no random crops\), got 0.9$"),
    (["var", "--drop-path-rate", "-0.5"], r"^--drop-path-rate must be in \[0, 1\) or -1 \(the official .*got -0.5$"),
    (["var", "--width", "-1"], "^--width must be >= 0, got -1$"),
    (["var", "--out", "no-such-folder"], "--out no-such-folder is inside --data no-such-folder"),
    (["var", "--out", "no-such-folder/run"], "--out no-such-folder/run is inside --data no-such-folder"),
    (["var", "--val-data", "held-out", "--out", "held-out/run"], "--out held-out/run is inside --val-data held-out"),
    (["gpt", "--temperature", "-1"], "--temperature must be >= 0"),
    (["var", "--seed", str(2**44)], r"--seed must be in \[0, 2\*\*32\)"),
    (["var", "--min-lr-ratio", "-1"], r"--min-lr-ratio is a fraction of --lr in \[0, 1\], got -1.0"),
    (["var", "--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["var", "--grad-clip", "-1"], "--grad-clip must be >= 0"),
    (["var", "--warmup-steps", "-5"], "--warmup-steps must be >= 0"),
    (["tokenizer", "--num-samples", "0"], "--num-samples must be >= 1"),
    (["var", "--stop-at", "-1"], "--stop-at must be >= 0, got -1"),
    (["var", "--stop-at", "750", "--save-every", "500"],
     r"^--stop-at 750 must be a checkpoint step: a multiple of --save-every 500 and at most --max-steps 1000 "),
    (["var", "--stop-at", "1500", "--save-every", "500"], r"^--stop-at 1500 must be a checkpoint step"),
])
def test_bad_flags_are_refused_before_the_data_is_read(argv, message):
    job, *flags = argv
    needs = ["--tokenizer", "no-such-tokenizer"] if job != "tokenizer" else []
    with pytest.raises(SystemExit, match=message):
        train_main(job, ["--data", "no-such-folder", *needs, *flags])


def test_a_fresh_run_does_not_write_into_another_runs_folder(images, tmp_path):
    argv = ["--data", str(images), "--out", str(tmp_path / "run"), "--batch-size", "4", "--max-steps", "2",
            *FAST, *TOKENIZER_ARGS]
    train_main("tokenizer", argv)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(SystemExit, match=r"holds an earlier run \(step_0000002\); continue it with --resume"):
        train_main("tokenizer", argv)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_a_run_without_progress_bars_prints_one_summary_line(images, tmp_path, capsys):
    run = tmp_path / "run"
    train_main("gpt", ["--data", str(images), "--out", str(run), "--batch-size", "4", "--max-steps", "2", *FAST,
                       *job_args("gpt", images, tmp_path)])
    assert capsys.readouterr().out == (f"2 steps, final loss {read_log(run)[-1]['loss']:.4g}; model written to "
                                       f"{run / 'transformer'}, {run / 'pipeline'}\n")


def test_a_resumed_run_says_from_which_step(saved_run, tmp_path, capsys):
    run, argv = copy_of(saved_run, tmp_path)
    train_main("tokenizer", ["--out", str(run), "--max-steps", "3", "--resume", *argv])
    assert capsys.readouterr().out.splitlines() == [
        f"resumed from step 2 ({run / 'checkpoints' / 'step_0000002'})",
        f"3 steps, final loss {read_log(run)[-1]['loss']:.4g}; model written to {run / 'tokenizer'}",
    ]
    train_main("tokenizer", ["--out", str(run), "--max-steps", "3", "--resume", *argv])  # only the export is redone
    assert capsys.readouterr().out.splitlines() == [
        f"resumed from step 3 ({run / 'checkpoints' / 'step_0000003'})",
        f"3 steps; model written to {run / 'tokenizer'}",
    ]


def test_exports_do_not_replace_folders_that_are_not_pipelines(images, tmp_path):
    run = tmp_path / "run"
    train_main("gpt", ["--data", str(images), "--out", str(run), "--batch-size", "4", "--max-steps", "2", *FAST,
                       *job_args("gpt", images, tmp_path)])
    models = tmp_path / "models"
    models.mkdir()
    (models / "notes.txt").write_text("mine")
    for argv in (["train", "export", "--run", str(run), "--out", str(models)],
                 ["train", "export", "--run", str(run), "--out", str(run)]):
        with pytest.raises(SystemExit, match="holds other files \\(no model_index.json\\)"):
            cli_main(argv)
    assert (models / "notes.txt").read_text() == "mine" and (run / "checkpoints").is_dir()
    cli_main(["train", "export", "--run", str(run), "--out", str(run / "pipeline")])  # an earlier export: replaced
    assert (run / "pipeline" / "model_index.json").is_file()
    with pytest.raises(SystemExit, match=f"--out {models} holds other files"):
        cli_main(["convert", "--vae", "x.pth", "--var", "y.pth", "--out", str(models)])


def test_resume_is_exact_when_images_are_read_by_the_dataloader(images, tmp_path):
    """Uncached data goes through a DataLoader, whose iterator must not draw from the step's random stream:
    the resumed run, the uninterrupted one and the cached one see the same dropout and label dropout."""
    common = ["--data", str(images), "--batch-size", "4", "--max-steps", "6", "--log-every", "1",
              "--save-every", "3", "--keep-checkpoints", "5", "--label-dropout", "0.5", *FAST,
              *job_args("gpt", images, tmp_path)]
    uncached = ["--cache-limit-gb", "0"]
    train_main("gpt", ["--out", str(tmp_path / "cached"), *common])
    train_main("gpt", ["--out", str(tmp_path / "full"), *common, *uncached])
    kill_after(tmp_path / "full", 3, tmp_path / "killed")
    train_main("gpt", ["--out", str(tmp_path / "killed"), "--resume", *common, *uncached])
    losses = {name: [r["loss"] for r in read_log(tmp_path / name)] for name in ("cached", "full", "killed")}
    assert losses["killed"] == losses["full"] == losses["cached"]


def test_logs_of_a_resumed_run_equal_the_uninterrupted_ones_when_windows_straddle_checkpoints(images, tmp_path):
    common = ["--data", str(images), "--batch-size", "4", "--max-steps", "6", "--log-every", "2",
              "--save-every", "3", "--keep-checkpoints", "5", *FAST, *TOKENIZER_ARGS]
    train_main("tokenizer", ["--out", str(tmp_path / "full"), *common])
    kill_after(tmp_path / "full", 3, tmp_path / "killed")
    train_main("tokenizer", ["--out", str(tmp_path / "killed"), "--resume", *common])
    full, resumed = read_log(tmp_path / "full"), read_log(tmp_path / "killed")
    assert [r["step"] for r in full] == [1, 2, 3, 5]  # every 2 steps, and at the checkpoint after step 3
    assert [(r["step"], r["loss"]) for r in resumed] == [(r["step"], r["loss"]) for r in full]


def test_the_checkpoint_is_written_before_the_sample_grid(images, tmp_path, monkeypatch):
    def broken(self, class_labels, generator):
        raise RuntimeError("grid failed")

    monkeypatch.setattr(GPTJob, "generate", broken)
    with pytest.raises(RuntimeError, match="grid failed"):
        train_main("gpt", ["--data", str(images), "--out", str(tmp_path / "run"), "--batch-size", "4",
                           "--max-steps", "2", "--save-every", "2", *FAST, *job_args("gpt", images, tmp_path)])
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "model").is_dir()


def test_a_moved_tokenizer_folder_may_be_given_on_resume(images, tmp_path):
    argv = ["--data", str(images), "--batch-size", "4", "--save-every", "2", *FAST]
    tokenizer_args = job_args("var", images, tmp_path)
    train_main("var", ["--out", str(tmp_path / "run"), "--max-steps", "2", *argv, *tokenizer_args])
    moved = shutil.move(tokenizer_args[1], tmp_path / "moved")
    train_main("var", ["--out", str(tmp_path / "run"), "--max-steps", "4", "--resume", *argv, *tokenizer_args[:1],
                       str(moved), *tokenizer_args[2:]])
    assert [r["step"] for r in read_log(tmp_path / "run")][-1] == 3


def test_held_out_classes_are_matched_to_the_training_ids_by_name(tmp_path):
    train = write_images(tmp_path / "train", classes=3, per_class=2)
    val = tmp_path / "val"
    shutil.copytree(train / "class_2", val / "class_2")  # a held-out split that has only the last class
    cfg = TrainConfig(data=str(train), val_data=str(val), image_size=8)
    held_out = load_validation_set(cfg, ["class_0", "class_1", "class_2"], Distributed(0, 1, torch.device("cpu")))
    assert held_out.labels.tolist() == [2, 2]
    (val / "class_9").mkdir()
    shutil.copy(next((train / "class_0").iterdir()), val / "class_9" / "x.png")
    with pytest.raises(SystemExit, match=r"has classes \['class_9'\] that --data .* lacks"):
        load_validation_set(cfg, ["class_0", "class_1", "class_2"], Distributed(0, 1, torch.device("cpu")))


def test_flat_folders_of_other_names_hold_the_same_single_class(tmp_path):
    train = write_images(tmp_path / "faces_train", classes=1, per_class=2) / "class_0"
    val = shutil.copytree(train, tmp_path / "faces_val")
    cfg = TrainConfig(data=str(train), val_data=str(val), image_size=8)
    held_out = load_validation_set(cfg, find_images(train)[2], Distributed(0, 1, torch.device("cpu")))
    assert held_out.labels.tolist() == [0, 0]


def test_images_beside_class_folders_are_refused(images):
    shutil.copy(next((images / "class_0").iterdir()), images / "stray.png")
    with pytest.raises(ValueError, match=r"holds images \(stray.png, ...\) beside class folders \(class_0, class_1\)"):
        find_images(images)


def test_the_memory_limit_counts_one_copy_per_process(images):
    size = 8 * 3 * 8 * 8  # 8 images of uint8 [3, 8, 8]
    assert fits_in_memory(images, 8, 2 * size / 2**30, copies=2)
    assert not fits_in_memory(images, 8, 2 * size / 2**30, copies=3)


def test_numeric_class_folder_names_are_names_on_the_command_line():
    assert class_arguments(["2", "10"], ["0", "1", "10", "2"]) == ["2", "10"]  # ids 3 and 2, by name
    assert class_arguments(["2", "cat"], ["cat", "dog"]) == [2, "cat"]
    assert class_arguments(["207"], None) == [207]


def test_photos_are_turned_upright_and_tiff_files_are_read(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # landscape as stored, red left half
    pixels[:, :20, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = np.asarray(open_rgb(tmp_path / "photo.jpg"))
    assert upright.shape == (40, 20, 3)  # portrait, as a viewer shows it
    assert upright[5, 10, 0] > 200 and upright[35, 10, 0] < 50  # the red half is now on top
    Image.fromarray(pixels).save(tmp_path / "scan.tif")
    assert [p.name for p in list_images(tmp_path)] == ["photo.jpg", "scan.tif"]
    assert np.array_equal(np.asarray(open_rgb(tmp_path / "scan.tif")), pixels)



def test_walkthrough_mistakes_get_one_clear_line(images, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="--val-data .*nosuch is not a folder"):
        train_main("tokenizer", ["--data", str(images), "--out", str(tmp_path / "a"), "--val-data",
                                 str(tmp_path / "nosuch"), "--batch-size", "4", *FAST, *TOKENIZER_ARGS])
    with pytest.raises(SystemExit, match="--train-decoder-only fine-tunes the decoder of a trained tokenizer"):
        train_main("tokenizer", ["--data", str(images), "--train-decoder-only", *FAST, *TOKENIZER_ARGS])
    single_scale = job_args("gpt", images, tmp_path)[1]  # a one-scale MultiScaleVQVAE folder
    with pytest.raises(SystemExit, match="next-scale training needs a multi-scale MultiScaleVQVAE"):
        train_main("var", ["--data", str(images), "--out", str(tmp_path / "v"), "--tokenizer", single_scale,
                           "--batch-size", "4", *FAST])
    (tmp_path / "fake.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"fake\.pth'.*not a .*checkpoint"):
        cli_main(["convert", "--vae", str(tmp_path / "fake.pth"), "--var", str(tmp_path / "fake.pth"),
                  "--out", str(tmp_path / "c")])
    cli_main(["train", "--help"])
    assert "JOB is tokenizer, var, gpt or export" in capsys.readouterr().out


def test_resume_without_the_latest_file_continues_from_the_newest_complete_checkpoint(saved_run, tmp_path):
    run, argv = copy_of(saved_run, tmp_path)
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "step_0000009.tmp").mkdir()  # a checkpoint cut short: not one to resume
    assert latest_checkpoint(run).name == "step_0000002"
    with pytest.raises(SystemExit, match="these settings differ from the run's \\(--lr 0.0002 -> 0.001\\)"):
        train_main("tokenizer", ["--out", str(run), "--max-steps", "3", "--resume", "--lr", "1e-3", *argv])
    train_main("tokenizer", ["--out", str(run), "--max-steps", "3", "--resume", *argv])
    assert [r["step"] for r in read_log(run)] == [0, 1, 2]  # steps 1 and 2 were not trained again


def test_a_latest_file_naming_a_missing_checkpoint_points_at_the_saved_ones(saved_run, tmp_path):
    run, argv = copy_of(saved_run, tmp_path)
    (run / "checkpoints" / "latest").write_text("step_0000099\n")
    with pytest.raises(FileNotFoundError, match="names step_0000099, which is missing; delete .*latest to use the "
                                                "newest saved checkpoint \\(step_0000002\\)"):
        train_main("tokenizer", ["--out", str(run), "--max-steps", "3", "--resume", *argv])


@pytest.mark.parametrize("damaged", ["model/diffusion_pytorch_model.safetensors", "optimizer.pt",
                                     "trainer_state.json"])
def test_a_damaged_checkpoint_is_named_with_the_way_back_to_the_one_before(saved_run, tmp_path, damaged):
    run, argv = copy_of(saved_run, tmp_path)
    newest = run / "checkpoints" / "step_0000002"
    file = newest / damaged
    file.write_bytes(file.read_bytes()[:20])
    resume = ["--out", str(run), "--max-steps", "3", "--resume", *argv]
    with pytest.raises(SystemExit, match=f"checkpoint {newest} is unreadable .*; delete it and .*latest to go on "
                                         "from the newest one left \\(step_0000001\\)$") as refused:
        train_main("tokenizer", resume)
    assert "\n" not in str(refused.value)  # one line, not torch.load's page of advice
    shutil.rmtree(newest)  # as the message says
    (run / "checkpoints" / "latest").unlink()
    train_main("tokenizer", resume)
    assert [r["step"] for r in read_log(run)] == [0, 1, 2]


def test_an_out_that_is_a_file_is_refused_before_the_data_is_read(tmp_path):
    (tmp_path / "afile.txt").write_text("mine")
    for out in (tmp_path / "afile.txt", tmp_path / "afile.txt" / "run"):
        with pytest.raises(SystemExit, match=f"--out {out}: {tmp_path / 'afile.txt'} is a file, not a folder"):
            train_main("tokenizer", ["--data", "no-such-folder", "--out", str(out), *TOKENIZER_ARGS])
    assert (tmp_path / "afile.txt").read_text() == "mine"


def test_a_diverging_run_stops_before_it_saves_nan_weights(images, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"training diverged at step 2: loss nan.*; the checkpoints before it are "
                                         r"kept \(newest: .*step_0000001\)\. Start again with a lower --lr \(now 1e\+30\)"):
        train_main("tokenizer", ["--data", str(images), "--out", str(out), "--batch-size", "4", "--max-steps", "3",
                                 "--save-every", "1", "--lr", "1e30", *FAST, *TOKENIZER_ARGS])
    assert [p.name for p in (out / "checkpoints").glob("step_*")] == ["step_0000001"]
    assert not (out / "tokenizer").exists()  # nothing exported


def test_class_balance_that_weighs_every_image_zero_is_refused():
    with pytest.raises(ValueError, match=r"--class-balance 1e\+30 weighs every image 0 .*classes of \[2, 6\] images"):
        BatchOrder(8, 4, 0, 0, 1, torch.tensor([0] * 2 + [1] * 6), 1e30)


def test_tokenizer_folders_that_are_not_tokenizers_are_named(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{\n")
    with pytest.raises(SystemExit, match=r"--tokenizer .*broken: .*broken/config.json is not a readable JSON file: Expecting"):
        load_tokenizer(str(tmp_path / "broken"), MultiScaleVQVAE)
    pipeline = tmp_path / "pipeline"
    save_tokenizer(pipeline / "tokenizer", (1, 2, 4))
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit, match=f"did you mean --tokenizer {pipeline / 'tokenizer'}\\?"):
        load_tokenizer(str(pipeline), MultiScaleVQVAE)


def test_an_empty_held_out_folder_is_named_as_val_data(images, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no images .* under --val-data {tmp_path / 'empty'}"):
        train_main("tokenizer", ["--data", str(images), "--out", str(tmp_path / "run"), "--val-data",
                                 str(tmp_path / "empty"), "--batch-size", "4", *FAST, *TOKENIZER_ARGS])
