"""GPU placement of a local generation pipeline: each teacher replica gets GPUs of its own, planned before it starts."""

import pytest

from magpie_teach.errors import ConfigError
from magpie_teach.generation.placement import GpuDemand, plan_gpus, replica_of, take_gpus, visible_gpus

EIGHT = [str(i) for i in range(8)]


def test_two_tensor_parallel_engines_of_two_replicas_each_take_disjoint_gpus():
    plan = plan_gpus([GpuDemand("big", 2, 2, True), GpuDemand("other", 4, 1, True)], EIGHT)
    assert plan == {"big": ["0,1", "2,3"], "other": ["4,5,6,7"]}
    used = [gpu for replicas in plan.values() for one in replicas for gpu in one.split(",")]
    assert sorted(used) == EIGHT  # every GPU once: no engine shares one


def test_the_documented_tensor_parallel_4_times_2_replicas_on_8_gpus():
    assert plan_gpus([GpuDemand("llama-70b", 4, 2, True)], EIGHT) == {"llama-70b": ["0,1,2,3", "4,5,6,7"]}


def test_vllm_teachers_asking_more_gpus_than_there_are_fail_naming_each():
    with pytest.raises(ConfigError, match=r"need 10 GPUs .*a: 2 x 4, b: 1 x 2.* has 8 visible"):
        plan_gpus([GpuDemand("a", 4, 2, True), GpuDemand("b", 2, 1, True)], EIGHT)


def test_transformers_teachers_take_the_gpus_vllm_left_in_turn():
    plan = plan_gpus([GpuDemand("v", 2, 1, True), GpuDemand("t1", 1, 2, False), GpuDemand("t2", 1, 2, False)],
                     ["0", "1", "2", "3", "4"])  # fmt: skip
    assert plan == {"v": ["0,1"], "t1": ["2", "3"], "t2": ["4", "2"]}


def test_transformers_teachers_share_every_gpu_when_vllm_took_them_all(caplog):
    with caplog.at_level("WARNING", logger="magpie_teach.generation.placement"):
        plan = plan_gpus([GpuDemand("v", 2, 1, True), GpuDemand("t", 1, 3, False)], ["0", "1"])
    assert plan == {"v": ["0,1"], "t": ["0", "1", "0"]}
    assert "share them" in caplog.text


def test_the_parents_own_cuda_visible_devices_are_the_ones_planned(monkeypatch):
    import torch

    from magpie_teach import modeling

    monkeypatch.setattr(modeling, "cuda_visible", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, 6,GPU-1f2e")
    assert visible_gpus() == ["4", "6", "GPU-1f2e"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1", "2"]
    monkeypatch.setattr(modeling, "cuda_visible", lambda: False)
    assert visible_gpus() == []


def test_a_replica_keeps_only_its_gpus_visible(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert replica_of("generate_1-replica-1") == 1 and replica_of("my-replica-step-replica-12") == 12
    assert replica_of(None) == 0
    take_gpus(["0,1,2,3", "4,5,6,7"], "generate_1-replica-1")
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    take_gpus(None, "generate_1-replica-0")  # no plan (CPU, Ray): left as it is
    assert __import__("os").environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def test_the_generate_config_plans_gpu_teachers_only(monkeypatch, tmp_path):
    from magpie_teach.generation import placement, run
    from magpie_teach.generation.config import GenerateConfig, InstructionsConfig, RayConfig, TeacherConfig

    teachers = [
        TeacherConfig(name="v", model="m", backend="vllm", tensor_parallel_size=2, replicas=2),
        TeacherConfig(name="t", model="m"),
        TeacherConfig(name="pinned", model="m", device="cuda:3"),  # the user's own choice: not planned
        TeacherConfig(name="api", model="m", backend="openai", base_url="http://127.0.0.1:1/v1"),
        TeacherConfig(name="cpu", model="m", device="cpu"),
    ]
    config = GenerateConfig(
        output_dir=str(tmp_path), instructions=InstructionsConfig(path="x.jsonl"), teachers=teachers
    )
    monkeypatch.setattr(
        "magpie_teach.modeling.resolve_device", lambda device="auto": "cpu" if device == "cpu" else "cuda"
    )
    monkeypatch.setattr(placement, "visible_gpus", lambda: ["0", "1", "2", "3", "4"])
    assert run.gpu_plan(config, teachers) == {"v": ["0,1", "2,3"], "t": ["4"]}
    config.ray = RayConfig()
    assert run.gpu_plan(config, teachers) == {}  # Ray places the actors
