"""The emulator benchmarks' own arithmetic and plumbing (benchmarks/fanout.py,
benchmarks/emulated_parity.py, benchmarks/_emulator.py): the credentials they read back from the
emulator's file are the ones it accepts and never reach what they print; a parameter comparison
reports a real difference; the overhead subtracts the handler's own time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import emulated_parity, fanout, fanout_handler
from benchmarks._emulator import SECRETS, read_env_file, redacted
from smlt.emulator import Emulator
from smlt.protocol.payload import WorkerReport


def test_the_env_file_reads_back_as_the_emulator_wrote_it(tmp_path: Path) -> None:
    with Emulator() as emu:
        path = emu.write_env_file(tmp_path / "emulator.env")
        found = read_env_file(path)
        assert found == emu.client_environment()
        assert set(SECRETS) <= set(found)
        text = f"key {found['__OW_API_KEY']} and {found['AWS_SECRET_ACCESS_KEY']} leaked"
        cleaned = redacted(text, found)
        assert all(found[name] not in cleaned for name in SECRETS)
        assert cleaned == "key *** and *** leaked"


def test_run_environments_give_credentials_only_to_emulated_runs(tmp_path: Path) -> None:
    secret = {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "__OW_API_KEY": "u:k", "AWS_ACCESS_KEY_ID": "AK"}
    ray = emulated_parity.run_environment("ray", secret, tmp_path)
    assert not set(secret) & set(ray)
    lam = emulated_parity.run_environment("aws_lambda", secret, tmp_path)
    assert lam["AWS_SECRET_ACCESS_KEY"] == "s3cr3t" and "SMLT_LAMBDA_IMAGE" in lam
    ow = emulated_parity.run_environment("openwhisk", secret, tmp_path)
    assert ow["__OW_API_KEY"] == "u:k" and ow["WSK_CONFIG_FILE"].startswith(str(tmp_path))


def test_compare_reports_the_largest_difference(tmp_path: Path) -> None:
    a = {"w": torch.zeros(3), "b": torch.ones(2)}
    b = {"w": torch.tensor([0.0, 2.5e-7, 0.0]), "b": torch.ones(2)}
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    torch.save(a, tmp_path / "a2.pt")
    differ = emulated_parity.compare(str(tmp_path / "b.pt"), str(tmp_path / "a.pt"))
    assert differ["max_abs_diff_vs_ray"] == float(torch.tensor(2.5e-7).double())
    assert differ["bit_identical"] is False
    same = emulated_parity.compare(str(tmp_path / "a2.pt"), str(tmp_path / "a.pt"))
    assert same == {"max_abs_diff_vs_ray": 0.0, "bit_identical": True}


def test_the_stand_in_answers_a_worker_report_and_stamps_its_start(tmp_path: Path) -> None:
    """Its report's wall_s covers its hold (what the overhead subtracts), and each rank's stamp
    says when it started and in which process."""
    import os
    import time

    options = {"stamps": str(tmp_path), "round": "r", "hold_s": 0.05}
    before = time.time()
    for rank in range(3):
        answer = fanout_handler.main(fanout.payload("job", rank, 3, options).to_dict())
        report = WorkerReport.from_dict(answer)
        assert report.rank == rank and report.wall_s >= 0.05
    stamps = fanout._stamps(tmp_path, "r", 3)
    assert [pid for _, pid in stamps] == [os.getpid()] * 3
    assert before <= stamps[0][0] < stamps[1][0] < stamps[2][0] <= time.time()
    with pytest.raises(RuntimeError, match="no start stamp"):
        fanout._stamps(tmp_path, "r", 4)


def test_quantile_picks_from_the_sorted_values() -> None:
    values = [float(v) for v in range(10, 0, -1)]
    assert fanout._quantile(values, 0.1) == 2.0
    assert fanout._quantile(values, 0.9) == 10.0
