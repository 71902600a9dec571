"""The regression record's choice of entry per CPU kind (tests/regression_record.py)."""
import regression_record
from regression_record import FIRST_KIND, RECORD_THREADS, cpu_kind, values_for_this_machine


def test_cpu_kind_names_vendor_instruction_level_and_the_recorded_threads():
    import platform

    import torch

    kind = cpu_kind()
    assert kind.startswith(platform.machine()) and torch.backends.cpu.get_cpu_capability() in kind
    assert kind.endswith(f"{RECORD_THREADS} threads")


def test_own_entry_when_recorded_else_the_first_machines(monkeypatch):
    record = {"kinds": {FIRST_KIND: {"original": 1}, "x86_64 V AVX9 2 threads": {"original": 2}}}
    monkeypatch.setattr(regression_record, "cpu_kind", lambda: "x86_64 V AVX9 2 threads")
    assert values_for_this_machine(record) == ("x86_64 V AVX9 2 threads", {"original": 2})
    monkeypatch.setattr(regression_record, "cpu_kind", lambda: "aarch64 W SVE 4 threads")
    assert values_for_this_machine(record) == (FIRST_KIND, {"original": 1})
