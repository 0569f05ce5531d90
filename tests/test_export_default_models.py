"""tools/export_default_models.py: everything is checked and staged before any shipped asset is replaced."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from vartk.classifier import SHIPPED_WEIGHTS
from vartk.loading import BUILTIN_MODELS, load

TOOL = Path(__file__).resolve().parents[1] / "tools" / "export_default_models.py"
spec = importlib.util.spec_from_file_location("export_default_models", TOOL)
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


@pytest.fixture
def assets(tmp_path, monkeypatch):
    """Sources: copies of the shipped models; destinations: folders holding a marker, standing in for the package's."""
    sources = {name: shutil.copytree(folder, tmp_path / "src" / name) for name, folder in BUILTIN_MODELS.items()}
    sources["classifier"] = shutil.copytree(SHIPPED_WEIGHTS, tmp_path / "src" / "classifier")
    destinations = {name: tmp_path / "assets" / name for name in ("default", "default-gpt", "emoji-classifier")}
    for folder in destinations.values():
        folder.mkdir(parents=True)
        (folder / "old.txt").write_text("the previous release")
    monkeypatch.setattr(tool, "BUILTIN_MODELS", {k: destinations[k] for k in ("default", "default-gpt")})
    monkeypatch.setattr(tool, "SHIPPED_WEIGHTS", destinations["emoji-classifier"])
    argv = ["--var", str(sources["default"]), "--gpt", str(sources["default-gpt"]),
            "--classifier", str(sources["classifier"])]
    return argv, sources, destinations


def untouched(destinations) -> bool:
    return all(sorted(p.name for p in folder.iterdir()) == ["old.txt"] for folder in destinations.values())


@pytest.mark.parametrize("change, message", [
    ({"--gpt": "default"}, r"is a VARPipeline; 'default-gpt' must be a llamagen pipeline"),
    ({"--var-sampling": '{"guidance": 3}'}, r"default sampling \['guidance'\] unknown"),
    ({"--var-sampling": '{"top_k": -5}'}, r"top_k must be an integer >= 0"),
    ({"--var-sampler": "sjd"}, r"default sampler 'sjd': unknown next-scale sampler 'sjd'; available: \['nextscale'\]"),
    ({"--var-sampler": "nextscale:guidance_schedule=cosine"}, r"guidance_schedule must be one of"),
    ({"--max-mb": "1"}, r"would take .* more than --max-mb 1.0; nothing was replaced"),
])
def test_a_bad_export_replaces_nothing(assets, change, message):
    argv, sources, destinations = assets
    extra = []
    for flag, value in change.items():
        if flag in argv:
            argv = argv.copy()
            argv[argv.index(flag) + 1] = str(sources[value])
        else:
            extra += [flag, value]
    with pytest.raises(SystemExit, match=message):
        tool.main([*argv, *extra])
    assert untouched(destinations)
    assert not list(destinations["default"].parent.glob("*.staged"))


def test_models_of_other_classes_are_refused(assets):
    argv, sources, destinations = assets
    config_file = sources["classifier"] / "config.json"
    config = json.loads(config_file.read_text())
    config["class_names"] = config["class_names"][::-1]  # the same 9 classes, other ids
    config_file.write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="the models must share their classes"):
        tool.main(argv)
    assert untouched(destinations)


def test_a_good_export_replaces_every_asset(assets):
    argv, _, destinations = assets
    tool.main([*argv, "--var-sampling", '{"guidance_scale": 5.0, "top_k": 10, "top_p": 0.9}',
               "--var-sampler", "nextscale:guidance_schedule=constant"])
    assert not any((folder / "old.txt").exists() for folder in destinations.values())
    index = json.loads((destinations["default"] / "model_index.json").read_text())
    assert index["sampling_defaults"] == {"guidance_scale": 5.0, "top_k": 10, "top_p": 0.9}
    assert index["sampler"] == {"name": "nextscale", "settings": {"more_smooth": False, "guidance_schedule": "constant"}}
    assert json.loads((destinations["default-gpt"] / "model_index.json").read_text())["sampler"] is None
    assert load(str(destinations["default-gpt"])).family == "llamagen"


def test_a_kv_calibration_file_is_saved_with_the_next_scale_model(assets, tmp_path):
    argv, sources, destinations = assets
    index_file = sources["default"] / "model_index.json"
    index = json.loads(index_file.read_text())
    calibration, index["kv_calibration"] = index["kv_calibration"], None  # a freshly trained pipeline has none
    index_file.write_text(json.dumps(index))
    calibration_file = tmp_path / "scalekv.json"
    calibration_file.write_text(json.dumps(calibration))
    tool.main([*argv, "--var-kv-calibration", str(calibration_file)])
    assert json.loads((destinations["default"] / "model_index.json").read_text())["kv_calibration"] == calibration
    assert load(str(destinations["default"])).kv_calibration == calibration


def test_a_kv_calibration_of_another_model_replaces_nothing(assets, tmp_path):
    argv, sources, destinations = assets
    calibration = json.loads((sources["default"] / "model_index.json").read_text())["kv_calibration"]
    calibration_file = tmp_path / "scalekv.json"
    calibration_file.write_text(json.dumps({**calibration, "num_layers": calibration["num_layers"] + 2}))
    with pytest.raises(SystemExit, match=r"--var-kv-calibration .*scalekv.json: .*calibrate this model"):
        tool.main([*argv, "--var-kv-calibration", str(calibration_file)])
    with pytest.raises(SystemExit, match="does not exist"):
        tool.main([*argv, "--var-kv-calibration", str(tmp_path / "missing.json")])
    assert untouched(destinations)


@pytest.fixture
def shipped_kept(assets):
    """`assets` whose next-token and classifier destinations hold real shipped copies, as the package does."""
    argv, sources, destinations = assets
    for name, source in (("default-gpt", sources["default-gpt"]), ("emoji-classifier", sources["classifier"])):
        shutil.rmtree(destinations[name])
        shutil.copytree(source, destinations[name])
    return argv, sources, destinations


def test_exporting_one_model_keeps_the_other_shipped_assets(shipped_kept):
    _, sources, destinations = shipped_kept
    kept = {name: {f.relative_to(destinations[name]): f.read_bytes() for f in destinations[name].rglob("*")
                   if f.is_file()} for name in ("default-gpt", "emoji-classifier")}
    tool.main(["--var", str(sources["default"]), "--var-sampling", '{"guidance_scale": 2.0}'])
    index = json.loads((destinations["default"] / "model_index.json").read_text())
    assert index["sampling_defaults"] == {"guidance_scale": 2.0} and not (destinations["default"] / "old.txt").exists()
    for name, files in kept.items():
        assert {f.relative_to(destinations[name]): f.read_bytes() for f in destinations[name].rglob("*")
                if f.is_file()} == files, name


def test_one_model_whose_classes_differ_from_the_kept_ones_is_refused(shipped_kept):
    _, sources, destinations = shipped_kept
    index_file = sources["default"] / "model_index.json"
    index = json.loads(index_file.read_text())
    index["class_names"] = index["class_names"][::-1]
    index_file.write_text(json.dumps(index))
    with pytest.raises(SystemExit, match=r"must share their classes.*emoji-classifier \(shipped, kept\)"):
        tool.main(["--var", str(sources["default"])])
    assert sorted(p.name for p in destinations["default"].iterdir()) == ["old.txt"]


def test_an_export_of_nothing_is_refused(capsys):
    with pytest.raises(SystemExit):
        tool.main([])
    assert "nothing to export: give --var, --gpt or --classifier" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--classifier", "c", "--var-kv-calibration", "f.json"], "--var-kv-calibration set without --var"),
    (["--var", "v", "--gpt-sampling", '{"guidance_scale": 2}'], "--gpt-sampling set without --gpt"),
])
def test_settings_of_a_model_not_given_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        tool.main(argv)
    assert message in capsys.readouterr().err
