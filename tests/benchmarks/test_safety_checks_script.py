"""`benchmarks/safety_checks.py` runs and reports a positive host time for every check."""


def test_safety_checks_script_measures_every_check(benchmark_script, capsys):
    results = benchmark_script("safety_checks").main(["--device", "cpu", "--steps", "20"])
    assert len(results) == 3 and all(value > 0 for value in results.values())
    printed = capsys.readouterr().out
    assert all(name in printed for name in results)
