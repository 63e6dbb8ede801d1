"""bench/device_check.py in --smoke mode (CPU, tiny shapes, interpreted kernels): every section runs, the JSON holds
the rows and sane error ratios, and a failing kernel is reported by name with a non-zero exit status."""

import json

import pytest

from bench import device_check


def test_smoke_runs_every_section_and_writes_json(tmp_path, capsys):
    out = tmp_path / "dc.json"
    assert device_check.main(["--smoke", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["device"]["smoke"] and res["failures"] == []
    assert set(res["sections"]) == set(device_check.SECTIONS)
    kda = {r["impl"]: r for r in res["sections"]["kda"]}
    assert kda["pallas"]["oracle"] == "reference" and kda["pallas"]["err_o"] < 5e-3   # bf16 inputs
    assert kda["chunk"]["err_o"] < 5e-3 and kda["pallas"]["fwd_bwd"]["ms"] > 0
    assert all(r["err_o"] < 1e-5 for r in res["sections"]["step"] if "err_o" in r)
    assert all(r["err_o"] < 2e-2 for r in res["sections"]["attention"] if "err_o" in r)
    assert all(r["err"] < 1e-2 for r in res["sections"]["int4"] if "err" in r)
    mla = res["sections"]["mla_cache"]
    assert {(r["queries"], r["form"]) for r in mla} == {(16, "absorbed"), (16, "expanded"), (1, "absorbed"),
                                                         (1, "expanded")}
    assert all(r["err_vs_absorbed"] < 2e-2 for r in mla if r["form"] == "expanded")
    train = res["sections"]["train"]
    assert {r.get("kda_impl") for r in train} >= {"pallas", "chunk"}
    assert train[-1]["loss_ratio"] < 1e-3 and train[-1]["grad_err"] < 1e-2
    assert "### kda" in capsys.readouterr().out


def test_a_failing_kernel_is_reported_by_name(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("Mosaic lowering failed (simulated)")

    monkeypatch.setattr(device_check, "int4_matmul", broken)
    out = tmp_path / "dc.json"
    assert device_check.main(["--smoke", "--sections", "int4", "--out", str(out)]) == 1
    res = json.loads(out.read_text())
    assert len(res["failures"]) == 1 and "int4_matmul" in res["failures"][0]["message"]
    assert "failed to compile" in res["failures"][0]["message"]
    assert "FAILED" in capsys.readouterr().err


def test_refuses_to_run_without_an_accelerator_unless_smoke(capsys):
    assert device_check.main(["--sections", "step"]) == 2
    assert "--smoke" in capsys.readouterr().err


def test_unknown_section_is_rejected():
    with pytest.raises(SystemExit):
        device_check.main(["--smoke", "--sections", "kda,bogus"])
