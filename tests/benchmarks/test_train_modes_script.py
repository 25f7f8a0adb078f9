"""`benchmarks/train_modes.py` end to end on the CPU: real `diffunet train` runs, read back."""

import json

TINY = (
    "tiny:--image-size 8 --batch-size 8 --threads 1 --precision fp32 --sample-steps 2 "
    "model_channels=8 norm_groups=4 channel_mult=[1,2] attention_resolutions=[] "
    "num_res_blocks=1"
)


def test_train_modes_reads_the_last_interval_of_each_run(tmp_path, capsys, benchmark_script):
    out = tmp_path / "modes.json"
    code = benchmark_script("train_modes").main(
        [
            "--modes",
            "eager",
            "--steps",
            "6",
            "--log-every",
            "3",
            "--run",
            TINY,
            "--run",
            "broken:--batch-size 0",
            "--out",
            str(out),
        ]
    )
    assert code == 1  # the broken run failed, and says why
    results = json.loads(out.read_text())["results"]
    tiny = results["tiny"]["eager"]
    assert len(tiny["it_per_s_all"]) == 2 and tiny["it_per_s"] == tiny["it_per_s_all"][-1] > 0
    assert tiny["samples_per_s"] == tiny["it_per_s"] * 8
    assert "6 steps × batch 8 on 1× cpu" in tiny["banner"]
    assert "--batch-size" in results["broken"]["eager"]["error"]
    table = capsys.readouterr().out
    assert "tiny       eager" in table and "broken     eager            failed:" in table
