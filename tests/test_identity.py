"""Run identity: the device fingerprint (machine id, name, CPU ISA), devices that share a host name, and the sweep's resume key."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import mlflow
import pytest

from ptq import report, sweep, tracking
from ptq.config import RunConfig

BASE = dict(weights="random", calib_size=8, eval_size=16, min_queries=4, min_duration_s=0, blocks=2, warmup=1, monitor=False, progress=False)

# Captured /proc/cpuinfo (one core of each; the kernel repeats the block per core)
SAPPHIRE_RAPIDS = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\n"
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss ht syscall nx "
    "pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 "
    "sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm abm 3dnowprefetch invpcid_single ssbd "
    "ibrs ibpb stibp ibrs_enhanced fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx smap avx512ifma "
    "clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 wbnoinvd ida arat avx512vbmi "
    "umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg tme avx512_vpopcntdq rdpid cldemote movdiri "
    "movdir64b md_clear serialize amx_bf16 avx512_fp16 amx_tile amx_int8 flush_l1d arch_capabilities\n"
    "vmx flags\t: vnmi preemption_timer invvpid ept_x_only ept_ad ept_1gb\n"
)
ZEN4 = (
    "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n"
    "flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall nx mmxext "
    "fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid tsc_known_freq pni pclmulqdq ssse3 fma "
    "cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm "
    "sse4a misalignsse 3dnowprefetch osvw topoext vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx "
    "smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero xsaveerptr arat "
    "avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq rdpid fsrm\n"
)
ORIN = (  # Jetson AGX Orin, Cortex-A78AE
    "processor\t: 0\nBogoMIPS\t: 62.50\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp uscat ilrcpc flagm paca pacg\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd42\nCPU revision\t: 1\n\n"
)
XAVIER = (  # Jetson AGX Xavier, NVIDIA Carmel
    "processor\t: 0\nmodel name\t: ARMv8 Processor rev 0 (v8l)\nBogoMIPS\t: 62.50\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm dcpop\n"
    "CPU implementer\t: 0x4e\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0x004\nCPU revision\t: 0\n\n"
)


def test_cpu_isa_from_captured_cpuinfo() -> None:
    assert tracking.cpu_isa(SAPPHIRE_RAPIDS) == "avx2,avx512f,avx512_vnni,avx_vnni,avx512_bf16,avx512_fp16,amx_int8,amx_bf16"
    assert tracking.cpu_isa(ZEN4) == "avx2,avx512f,avx512_vnni,avx512_bf16"
    assert tracking.cpu_isa(ORIN) == "asimd,asimdhp,asimddp"  # dot product: fast INT8
    assert tracking.cpu_isa(XAVIER) == "asimd,asimdhp"  # no dot product
    assert tracking.cpu_isa(ORIN * 12) == "asimd,asimdhp,asimddp"  # one block per core, listed once
    little = ORIN.replace(" asimddp", "")
    assert tracking.cpu_isa(ORIN + little) == "asimd,asimdhp"  # what every core has, not just the big ones
    assert tracking.cpu_isa(ZEN4.replace(" fsrm", " sme fsrm")) == "avx2,avx512f,avx512_vnni,avx512_bf16"  # AMD's sme is memory encryption
    assert tracking.cpu_isa(ZEN4.replace(" avx2 ", " ").replace(" avx512", " x")) == "none"
    assert tracking.cpu_isa("") == "unknown"  # no /proc/cpuinfo (macOS, Windows)
    assert tracking.cpu_isa("processor\t: 0\nmodel name\t: something\n") == "unknown"


def test_cpu_model_names_arm_cores_without_a_model_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tracking.platform, "machine", lambda: "aarch64")
    assert tracking._cpu_model(ORIN * 2) == "aarch64 (CPU implementer 0x41, part 0xd42)"
    assert tracking._cpu_model(XAVIER) == "ARMv8 Processor rev 0 (v8l)"
    assert tracking._cpu_model(SAPPHIRE_RAPIDS) == "Intel(R) Xeon(R) Platinum 8488C"


def machine(monkeypatch: pytest.MonkeyPatch, folder: Path, raw_id: str) -> str:
    """Pretend to be the machine whose /etc/machine-id holds `raw_id`; returns its ptq machine id."""
    path = folder / f"machine-id-{raw_id[:4]}"
    path.write_text(raw_id + "\n")
    monkeypatch.setattr(tracking, "MACHINE_ID_FILES", (path, folder / "absent"))
    return tracking.machine_id()


def test_machine_id_is_a_stable_hash_never_the_raw_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = "3d1219c7c4c5404aaa1f6d2a48adfda4"
    first = machine(monkeypatch, tmp_path, raw)
    assert re.fullmatch(r"[0-9a-f]{12}", first) and first not in raw and first == tracking.machine_id()
    assert machine(monkeypatch, tmp_path, "aaaa" + raw[4:]) != first
    dbus = tmp_path / "dbus-machine-id"
    dbus.write_text(raw)
    (tmp_path / "empty").write_text("\n")
    monkeypatch.setattr(tracking, "MACHINE_ID_FILES", (tmp_path / "empty", dbus))  # systemd's is empty: D-Bus's copy
    assert tracking.machine_id() == first
    monkeypatch.setattr(tracking, "MACHINE_ID_FILES", (tmp_path / "absent",))
    monkeypatch.setattr(tracking.uuid, "getnode", lambda: 0x0242AC110002)  # a real MAC address
    by_mac = tracking.machine_id()
    assert by_mac != first and by_mac == tracking.machine_id()
    monkeypatch.setattr(tracking.socket, "gethostname", lambda: "lab-pi")
    by_host = []
    for random_node in (0x0342AC110002, 0x0F17D00D0001):  # multicast bit set: a random number, drawn anew by every process
        monkeypatch.setattr(tracking.uuid, "getnode", lambda node=random_node: node)
        by_host.append(tracking.machine_id())
    assert by_host[0] == by_host[1] and by_host[0] not in (by_mac, first)  # the host name, not the random number


def test_fingerprint_names_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = "0123456789abcdef0123456789abcdef"
    mid = machine(monkeypatch, tmp_path, raw)
    monkeypatch.setattr(tracking.socket, "gethostname", lambda: "jetson")
    monkeypatch.delenv("PTQ_DEVICE_NAME", raising=False)
    tags = tracking.fingerprint()
    assert tags["device.name"] == f"jetson-{mid[:6]}" and tags["device.host"] == "jetson" and tags["device.machine_id"] == mid
    assert tags["device.cpu_isa"] == tracking.cpu_isa(Path("/proc/cpuinfo").read_text())
    assert not any(raw[:8] in v for v in tags.values())  # the raw id stays on the machine
    monkeypatch.setenv("PTQ_DEVICE_NAME", "orin-agx-1")
    tags = tracking.fingerprint()
    assert tags["device.name"] == "orin-agx-1" and tags["device.host"] == "jetson" and tags["device.machine_id"] == mid


def test_two_machines_with_one_host_name_stay_apart(small_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "jetson")  # both answer to the same host name
    monkeypatch.delenv("PTQ_DEVICE_NAME", raising=False)
    base = RunConfig(model="mob-s", precision="fp32", data=small_dir, **BASE)  # type: ignore[arg-type]
    a = machine(monkeypatch, tmp_path, "a" * 32)
    assert sweep.run_sweep("lab", base, ["mob-s"], ["fp32"]).passed == ["mob-s/fp32/ort"]
    b = machine(monkeypatch, tmp_path, "b" * 32)
    on_b = sweep.run_sweep("lab", base, ["mob-s"], ["fp32"])
    assert on_b.passed == ["mob-s/fp32/ort"] and on_b.skipped == []  # A's run does not stand for B's
    table = report.build(["ptq"], tmp_path / "rep", log_run=False).table
    assert table[["device", "host", "machine_id"]].values.tolist() == sorted([[f"jetson-{a[:6]}", "jetson", a], [f"jetson-{b[:6]}", "jetson", b]])
    assert report.build(["ptq"], tmp_path / "one", device=f"jetson-{b[:6]}", log_run=False).table["machine_id"].tolist() == [b]
    assert len(report.build(["ptq"], tmp_path / "both", device="jetson", log_run=False).table) == 2  # by host name: both machines
    machine(monkeypatch, tmp_path, "a" * 32)
    assert sweep.run_sweep("lab", base, ["mob-s"], ["fp32"]).skipped == ["mob-s/fp32/ort"]  # back on A: nothing to redo


def test_sweep_reruns_on_new_commit_library_or_data_and_only_then(small_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = ["mob-s/fp32/ort", "mob-s/int8/ort"]

    def sweep_on(data: Path) -> sweep.SweepResult:
        return sweep.run_sweep("r", RunConfig(model="mob-s", data=data, **BASE), ["mob-s"], ["fp32", "int8"])  # type: ignore[arg-type]

    assert sweep_on(small_dir).passed == grid
    assert sweep_on(small_dir).skipped == grid  # unchanged: nothing to redo
    elsewhere = tmp_path / "same-images"
    elsewhere.mkdir()
    for f in small_dir.iterdir():
        (elsewhere / f.name).symlink_to(f.resolve())
    assert sweep_on(elsewhere).skipped == grid  # the same images in another folder are the same data

    real = tracking.fingerprint
    for change in ({"ptq.commit": "0" * 40}, {"version.onnxruntime": "0.0.1"}):
        monkeypatch.setattr(tracking, "fingerprint", lambda change=change: {**real(), **change})
        rerun = sweep_on(small_dir)
        assert rerun.passed == grid and rerun.skipped == [], change
        assert sweep_on(small_dir).skipped == grid, change  # and resumable under the new identity
        parent = mlflow.get_run(rerun.parent_run_id).data.tags  # a new parent, which says what its runs ran with
        assert {k: parent[k] for k in change} == change, change
    monkeypatch.setattr(tracking, "fingerprint", real)

    fewer = tmp_path / "fewer-images"
    fewer.mkdir()
    for f in sorted(small_dir.iterdir())[:100]:
        (fewer / f.name).symlink_to(f.resolve())
    assert sweep_on(fewer).passed == grid  # other images: every combination again
    assert sweep_on(small_dir).skipped == grid
    children = mlflow.search_runs(experiment_names=["ptq"], filter_string="tags.`ptq.sweep` = 'r' and params.model = 'mob-s'")
    assert len(children) == 4 * len(grid) and (children["status"] == "FINISHED").all()  # no attempt deleted another identity's run
