"""`diffunet info` and `diffunet check` from the command line."""

from diffunet.cli import main


def test_info_prints_counted_parameters_flops_and_levels(capsys):
    assert main(["info", "ddpm-cifar10"]) == 0
    out = capsys.readouterr().out
    assert "parameters: 35,746,307" in out
    assert "FLOPs per forward (batch 1, size (32, 32)): " in out
    assert "16×16       256       2  full" in out


def test_info_reads_a_config_file(tmp_path, capsys):
    from diffunet import preset

    preset("emdiffuse").to_json(tmp_path / "config.json")
    assert main(["info", str(tmp_path), "--no-flops"]) == 0
    assert "parameters: 15,677,345" in capsys.readouterr().out


def test_check_runs_every_preset(capsys):
    assert main(["check", "ldm", "efficient-unet"]) == 0
    out = capsys.readouterr().out
    assert out.count(" ok") == 4  # ldm in 2D, efficient-unet in 1D, 2D and 3D


def test_unknown_preset_is_one_line_and_non_zero(capsys):
    # In-process: test_cli_train.py runs the console entry point itself in a subprocess.
    assert main(["info", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0
    assert "unknown preset 'nope'" in err
    assert "Traceback" not in err


def test_info_without_a_name_lists_every_preset_and_its_source(capsys):
    from diffunet import list_presets, preset_info

    assert main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list_presets()
    for line, name in zip(lines, list_presets()):
        assert line.endswith(preset_info(name).source)
