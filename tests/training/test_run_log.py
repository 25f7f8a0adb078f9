"""`RunLog`'s text lines (what a run without a terminal prints): rate and eta."""

import io

from diffunet.training import run_log


def test_rate_and_eta_come_from_the_last_interval(tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(run_log.time, "perf_counter", lambda: now[0])
    stream = io.StringIO()
    log = run_log.RunLog(tmp_path, start_step=0, total_steps=100, stream=stream)
    now[0] = 100.0  # step 10 after 100 s of compilation
    log.step(10, {"loss": 1.0, "lr": 1e-3}, log_line=True)
    now[0] = 101.0
    log.step(20, {"loss": 0.5, "lr": 1e-3}, log_line=True)
    log.close()
    first, second = stream.getvalue().splitlines()
    assert "0.10 it/s  elapsed 1:40" in first
    assert "10.00 it/s  elapsed 1:41  eta 0:08" in second  # 80 steps left at 10 it/s
    rows = (tmp_path / run_log.CSV_NAME).read_text().splitlines()
    assert rows[2].split(",")[-2:] == ["10", "101.00"]  # log.csv: the same interval rate
