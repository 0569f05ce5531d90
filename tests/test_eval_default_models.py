"""tools/eval_default_models.py: the real reference set, the choice of sampling settings, the grid names."""
import importlib.util
from pathlib import Path

import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "eval_default_models.py"
spec = importlib.util.spec_from_file_location("eval_default_models", TOOL)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


def test_picks_are_distinct_random_images_with_the_wanted_labels():
    labels = torch.tensor([0] * 50 + [1] * 7 + [2] * 20)  # [77], unbalanced like the emoji splits
    balanced = tool.pick_with_labels(labels, torch.arange(3).repeat_interleave(5), seed=3)
    assert sorted(labels[balanced].tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    matched = tool.pick_with_labels(labels, torch.tensor([2, 0, 0, 2, 2, 1]), seed=3)
    assert sorted(labels[matched].tolist()) == [0, 0, 1, 2, 2, 2]
    for pick in (balanced, matched):
        assert len(set(pick.tolist())) == len(pick)
    assert torch.equal(balanced, tool.pick_with_labels(labels, torch.arange(3).repeat_interleave(5), seed=3))
    assert not torch.equal(balanced, tool.pick_with_labels(labels, torch.arange(3).repeat_interleave(5), seed=4))


def run(cfg: float, accuracy: float, fid: float) -> dict:
    return {"sampling": {"guidance_scale": cfg}, "classifier_accuracy_generated": accuracy, "fid_in_domain": fid}


def test_the_chosen_settings_are_the_most_accurate_within_ten_percent_of_the_best_fid():
    runs = [run(2, 0.57, 10.0), run(3, 0.65, 10.9), run(4, 0.70, 11.1), run(5, 0.60, 10.2)]
    assert tool.choose_settings(runs) == {"guidance_scale": 3}  # cfg 4 is more accurate but 11 % worse in FID
    assert tool.choose_settings(runs, fid_slack=0.2) == {"guidance_scale": 4}
    assert tool.choose_settings(runs[:1]) == {"guidance_scale": 2}
    assert tool.choose_settings([run(2, 0.5, -6.7e-6), run(3, 0.6, 0.4)]) == {"guidance_scale": 2}  # FID ~0
    assert tool.choose_settings([run(2, 0.9, float("nan")), run(3, 0.6, 1.0)]) == {"guidance_scale": 3}
    constant = {**run(2, 0.7, 1.0), "sampler": "nextscale:guidance_schedule=constant"}
    assert tool.choose_settings([{**run(2, 0.6, 1.0), "sampler": "nextscale"}, constant]) == {
        "guidance_scale": 2, "sampler": "nextscale:guidance_schedule=constant"}


def test_grid_names_are_flat_file_names_with_the_settings():
    settings = {"guidance_scale": 4.0, "top_k": 20, "top_p": 0.9}
    assert tool.grid_name("runs/var/pipeline/", settings) == "runs_var_pipeline-cfg4-k20-p0.9-grid.png"
    assert tool.grid_name("default", settings, "nextscale") == "default-cfg4-k20-p0.9-grid.png"
    assert (tool.grid_name("default", settings, "nextscale:guidance_schedule=constant,more_smooth=true")
            == "default-cfg4-k20-p0.9-nextscale-guidance_schedule-constant-more_smooth-true-grid.png")


def test_accuracy_by_class_counts_each_class_on_its_own():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = torch.tensor([0, 0, 1, 0, 1, 2, 2, 0, 0, 0])
    assert tool.accuracy_by_class(predicted, labels, 3) == [0.75, 0.5, 0.25]


def test_several_seeds_report_the_mean_and_the_sample_standard_deviation():
    def seed_run(accuracy, fid, by_class):
        return {"classifier_accuracy_generated": accuracy, "fid_in_domain": fid, "fid_in_domain_balanced": 9.0,
                "is_in_domain": 2.5, "sampling_seconds_per_image": 0.1, "classifier_accuracy_per_class": by_class}

    summary = tool.mean_and_spread([seed_run(0.70, 1.0, [0.6, 1.0]), seed_run(0.80, 1.2, [0.4, 0.8]),
                                    seed_run(0.75, 1.4, [0.5, 0.6])])
    assert abs(summary["classifier_accuracy_generated"] - 0.75) < 1e-9
    assert abs(summary["classifier_accuracy_generated_std"] - 0.05) < 1e-9  # sqrt((0.05² + 0.05²) / 2)
    assert abs(summary["fid_in_domain_std"] - 0.2) < 1e-9 and summary["fid_in_domain_balanced_std"] == 0
    assert [round(a, 9) for a in summary["classifier_accuracy_per_class"]] == [0.5, 0.8]
    one = tool.mean_and_spread([seed_run(0.7, 1.0, [0.6, 1.0])])
    assert one["fid_in_domain"] == 1.0 and one["fid_in_domain_std"] == 0.0


def test_the_table_shows_the_spread_of_several_seeds_and_the_lowest_category():
    run = {"model": "default", "family": "var", "sampling": {"guidance_scale": 4.0, "top_k": 20, "top_p": 0.9},
           "vocab_size": 512, "tokenizer_psnr_held_out": 26.9, "tokenizer_codes_used_held_out": 510,
           "classifier_accuracy_reconstructed_held_out": 0.76, "classifier_accuracy_generated": 0.8,
           "classifier_accuracy_generated_std": 0.012, "fid_in_domain": 1.1, "fid_in_domain_std": 0.05,
           "fid_in_domain_balanced": 9.0, "fid_in_domain_balanced_std": 0.1, "is_in_domain": 2.9,
           "is_in_domain_std": 0.02, "sampling_seconds_per_image": 0.1, "seeds": [1, 2, 3],
           "classifier_accuracy_per_class": [0.9, 0.55, 0.7]}
    results = {"runs": [run], "split": "test", "classifier_accuracy_real_held_out": 0.753,
               "class_names": ["a", "b", "c"],
               "real_train_vs_held_out": {"per_class": 50, "fid_in_domain": 0.86, "fid_in_domain_balanced": 7.97,
                                          "is_in_domain": 2.82}}
    results["real_accuracy_per_class"] = {"real test images": [0.5, float("nan"), 0.25]}
    table = tool.markdown_table(results)
    assert "| real test images | - | 0.50 | - | 0.25 | 0.25 |" in table
    assert "| 0.800 ± 0.012 | 1.10 ± 0.05 |" in table
    assert "| `default` | 4 / 20 / 0.9 | 0.90 | 0.55 | 0.70 | 0.55 |" in table
    assert "| model | sampling | a | b | c | lowest |" in table
    one_seed = tool.markdown_table({**results, "runs": [{**run, "seeds": [1]}]})
    assert "| 0.800 | 1.10 |" in one_seed
    constant = tool.markdown_table({**results, "runs": [{**run, "sampler": "nextscale:guidance_schedule=constant"}]})
    assert "| `default` | 4 / 20 / 0.9 (`nextscale:guidance_schedule=constant`) | 0.90 | 0.55 |" in constant
